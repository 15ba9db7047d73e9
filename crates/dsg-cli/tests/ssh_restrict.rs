//! `dsg agent --restrict-to` as the forced command of an SSH key, through
//! the real test sshd: the key reaches repositories under its directory
//! and nothing else — not a repository elsewhere (by path, `..` or a
//! symlink), and not a shell.

mod ssh_support;
mod support;

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ssh_support::*;

const MARK: &str = "dsg-ssh-restrict-test";

/// A second key pair, authorised in the test sshd's authorized_keys with
/// `command="<dsg under test> agent --restrict-to <dir>",restrict`. The
/// line is removed on drop, so also when an assertion panics: a leftover
/// would be a standing key to the test user.
struct RestrictedKey {
    authorized_keys: PathBuf,
    line: String,
    /// An ssh config like the test's, with this key as its only identity.
    config: PathBuf,
    key: PathBuf,
    host: String,
    _dir: tempfile::TempDir,
}

impl RestrictedKey {
    fn new(ssh: &Ssh, allowed: &Path) -> RestrictedKey {
        let dir = tempfile::Builder::new()
            .prefix("dsg-restrict-key-")
            .tempdir()
            .unwrap();
        let key = dir.path().join("id_ed25519");
        let comment = format!("{MARK} pid={} {}", std::process::id(), dir.path().display());
        let o = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", &comment, "-f"])
            .arg(&key)
            .stdin(Stdio::null())
            .output()
            .expect("run ssh-keygen");
        assert_ok(&o, "ssh-keygen");
        let public = fs::read_to_string(key.with_extension("pub")).unwrap();
        let forced = format!(
            "{} agent --restrict-to {}",
            sh_quote(dsg_bin().to_str().unwrap()),
            sh_quote(allowed.to_str().unwrap())
        );
        assert!(!forced.contains('"'), "a path with '\"': {forced}");
        let line = format!("command=\"{forced}\",restrict {}", public.trim());

        // Without the test config's own key, ssh cannot fall back to the
        // unrestricted key when this one is refused: a refusal must show.
        let text = fs::read_to_string(&ssh.config).unwrap();
        let text: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("IdentityFile"))
            .map(|l| format!("{l}\n"))
            .collect();
        let config = dir.path().join("config");
        fs::write(&config, text).unwrap();

        let authorized_keys = authorized_keys_of(ssh);
        edit_authorized_keys(&authorized_keys, |lines| {
            lines.retain(|l| !stale(l));
            lines.push(line.clone());
        });
        RestrictedKey {
            authorized_keys,
            line,
            config,
            key,
            host: ssh.host.clone(),
            _dir: dir,
        }
    }

    /// `DSG_SSH_COMMAND` (and the ssh options) that log in with this key.
    fn ssh_command(&self) -> String {
        format!(
            "ssh -F {} -i {} -o IdentitiesOnly=yes",
            self.config.display(),
            self.key.display()
        )
    }

    /// Runs `ssh <options> -T HOST <remote>` with this key.
    fn ssh(&self, remote: Option<&str>) -> Output {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(&self.config)
            .arg("-i")
            .arg(&self.key)
            .args(["-o", "IdentitiesOnly=yes", "-T", "--", &self.host])
            .args(remote)
            .stdin(Stdio::null());
        run_bounded(c, Duration::from_secs(60))
    }
}

impl Drop for RestrictedKey {
    fn drop(&mut self) {
        edit_authorized_keys(&self.authorized_keys, |lines| {
            lines.retain(|l| *l != self.line);
        });
    }
}

/// The sshd's AuthorizedKeysFile (from the sshd_config that
/// scripts/setup-services writes next to the client config).
fn authorized_keys_of(ssh: &Ssh) -> PathBuf {
    let dir = ssh.config.parent().unwrap();
    let sshd_config = fs::read_to_string(dir.join("sshd_config")).unwrap_or_default();
    sshd_config
        .lines()
        .filter_map(|l| l.trim().strip_prefix("AuthorizedKeysFile"))
        .map(|p| PathBuf::from(p.trim()))
        .next()
        .unwrap_or_else(|| dir.join("authorized_keys"))
}

/// A line this test added in a process that no longer runs (killed before
/// its guard ran).
fn stale(line: &str) -> bool {
    let Some(rest) = line.split(&format!("{MARK} pid=")).nth(1) else {
        return false;
    };
    let pid = rest.split_whitespace().next().unwrap_or("");
    !Path::new("/proc").join(pid).exists()
}

/// Edits authorized_keys under a lock (other ssh tests may run at the same
/// time), replacing the file by rename: sshd reading it concurrently must
/// never see it half-written, or the other tests' logins would fail.
fn edit_authorized_keys(path: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.with_extension("dsg-test-lock"))
        .unwrap();
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    edit(&mut lines);
    let mut tmp = tempfile::NamedTempFile::new_in(path.parent().unwrap()).unwrap();
    for l in &lines {
        writeln!(tmp, "{l}").unwrap();
    }
    tmp.as_file().sync_all().unwrap();
    tmp.persist(path).unwrap();
    // The lock goes with `lock`.
}

/// `from/../../..` up to `/`, then `to`: a path that starts inside `from`
/// but names `to`.
fn dotdot_to(from: &Path, to: &Path) -> PathBuf {
    let mut p = from.to_path_buf();
    for _ in 1..from.components().count() {
        p.push("..");
    }
    p.join(to.strip_prefix("/").unwrap())
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn init_args(host: &str, repo_path: &Path) -> Vec<String> {
    let mut v = init_args_for(host, repo_path, "repo", "xfs");
    v.extend(["--remote-dsg".into(), dsg_bin().to_str().unwrap().into()]);
    v
}

/// Every entry under `dir`, recursively (to show that nothing was created).
fn entries(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            v.push(e.path().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    v.sort();
    v
}

#[test]
fn restricted_key_serves_its_directory() {
    let ssh = need_ssh!();
    let w = World::new("restrict", Transport::Ssh, Some(&ssh));
    let key = RestrictedKey::new(&ssh, &w.repo_parent);
    let via = key.ssh_command();
    let run = |client: &str, args: &[&str]| {
        run_bounded(w.command(client, args, Some(&via)), Duration::from_secs(90))
    };
    w.write("a", "task/input/a.txt", "hello\n");
    let args = init_args(&ssh.host, &w.repo_parent);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    assert_ok(&run("a", &args), "init through the restricted key");
    w.write("a", "task/output/b.txt", "world\n");
    assert_ok(
        &run("a", &["sync", "-m", "second"]),
        "sync through the restricted key",
    );
    w.prepare_clone("a", "b");
    assert_ok(&run("b", &["clone"]), "clone through the restricted key");
    w.assert_in_sync("a");
    w.assert_in_sync("b");
}

#[test]
fn restricted_key_refuses_repositories_elsewhere() {
    let ssh = need_ssh!();
    let w = World::new("restrict-out", Transport::Ssh, Some(&ssh));
    let dir_a = w.repo_parent.clone();
    let dir_b = w.tmp.path().join("dirB");
    fs::create_dir_all(&dir_b).unwrap();
    std::os::unix::fs::symlink(&dir_b, dir_a.join("escape")).unwrap();
    let key = RestrictedKey::new(&ssh, &dir_a);
    let via = key.ssh_command();
    let attempts = [
        ("a path outside", dir_b.clone(), "outside the allowed paths"),
        (
            "a symlink out",
            dir_a.join("escape"),
            "outside the allowed paths",
        ),
        ("'..' out", dotdot_to(&dir_a, &dir_b), "contains '..'"),
    ];
    for (i, (what, repo_path, needle)) in attempts.iter().enumerate() {
        let client = format!("c{i}");
        w.write(&client, "task/input/a.txt", "hello\n");
        let args = init_args(&ssh.host, repo_path);
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let o = run_bounded(
            w.command(&client, &args, Some(&via)),
            Duration::from_secs(90),
        );
        eprintln!("--- {what}:\n{}", stderr(&o).trim_end());
        assert_ne!(
            o.status.code(),
            Some(0),
            "{what}: init succeeded:\n{}",
            show(&o)
        );
        assert!(
            stderr(&o).contains(needle),
            "{what}: stderr should say {needle:?}:\n{}",
            show(&o)
        );
        assert_eq!(
            entries(&dir_b),
            Vec::<String>::new(),
            "{what}: wrote under dirB"
        );
    }
    // An existing repository outside (made with the unrestricted key):
    // the restricted key can neither read nor change it.
    let dir_c = w.tmp.path().join("dirC");
    fs::create_dir_all(&dir_c).unwrap();
    w.write("d", "task/input/a.txt", "hello\n");
    let args = init_args(&ssh.host, &dir_c);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    assert_ok(&w.run("d", &args), "init of dirC with the test's own key");
    let before = (entries(&dir_c), data_tree(&dir_c.join("repo")));
    w.write("d", "task/input/a.txt", "changed\n");
    w.prepare_clone("d", "e");
    let repo_c = dir_c.join("repo");
    for (client, args) in [
        ("d", &["status"][..]),
        ("d", &["sync", "-m", "x"]),
        ("e", &["clone"]),
    ] {
        let o = run_bounded(w.command(client, args, Some(&via)), Duration::from_secs(90));
        let err = stderr(&o);
        assert_ne!(o.status.code(), Some(0), "{args:?}: {}", show(&o));
        assert!(
            err.contains(&*repo_c.to_string_lossy()) && err.contains("outside the allowed paths"),
            "{args:?} should name {} and the restriction:\n{}",
            repo_c.display(),
            show(&o)
        );
    }
    assert!(
        before == (entries(&dir_c), data_tree(&repo_c)),
        "the refused commands changed the repository in dirC"
    );
    assert!(!w.client("e").join("task").exists(), "clone fetched data");
}

#[test]
fn restricted_key_runs_no_shell() {
    let ssh = need_ssh!();
    let w = World::new("restrict-sh", Transport::Ssh, Some(&ssh));
    let key = RestrictedKey::new(&ssh, &w.repo_parent);
    let marker = w.tmp.path().join("pwned-marker");
    let o = key.ssh(Some(&format!(
        "echo pwned; touch {}",
        sh_quote(marker.to_str().unwrap())
    )));
    eprintln!("--- shell command:\n{}", show(&o));
    assert!(
        !marker.exists(),
        "the key ran a shell command:\n{}",
        show(&o)
    );
    assert!(
        !stdout(&o).contains("pwned"),
        "the key ran echo:\n{}",
        show(&o)
    );
    assert_exit(&o, 2, "a shell command through the restricted key");
    assert!(
        stderr(&o).contains("refused to run"),
        "the agent should say it refused the command:\n{}",
        show(&o)
    );
    // No command at all (an interactive login) gets no shell either.
    let o = key.ssh(None);
    assert_exit(
        &o,
        2,
        "a login without a command through the restricted key",
    );
    assert!(stderr(&o).contains("SSH_ORIGINAL_COMMAND"), "{}", show(&o));
}

/// The same refusal without sshd: the agent answers the client's first
/// request with an `unsafe` error and exits non-zero, creating nothing.
#[test]
fn restricted_agent_answers_hello_with_the_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    let repo = b.join("repo");
    let mut child = Command::new(dsg_bin())
        .args(["agent", "--restrict-to", a.to_str().unwrap()])
        .env(
            "SSH_ORIGINAL_COMMAND",
            format!(
                "/opt/dsg agent --repo {} --type xfs",
                sh_quote(repo.to_str().unwrap())
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = child.stdin.take().unwrap();
    let hello = serde_json::to_vec(&serde_json::json!({
        "op": "hello",
        "protocol": dsg_repo::protocol::PROTOCOL_VERSION,
        "client_version": "x"
    }))
    .unwrap();
    w.write_all(b"J").unwrap();
    w.write_all(&(hello.len() as u32).to_le_bytes()).unwrap();
    w.write_all(&hello).unwrap();
    drop(w);
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let (o, killed) = wait_within(child, Duration::from_secs(30));
    assert!(!killed, "the agent did not exit");
    assert!(out.len() > 5 && out[0] == b'J', "no reply frame: {out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out[5..]).unwrap();
    assert_eq!(reply["reply"], "err", "{reply}");
    assert_eq!(reply["kind"], "unsafe", "{reply}");
    let msg = reply["message"].as_str().unwrap();
    assert!(
        msg.contains(&*repo.to_string_lossy()) && msg.contains("outside the allowed paths"),
        "{msg}"
    );
    assert!(reply["hint"].is_string(), "{reply}");
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!repo.exists(), "the refused repository was created");
}
