//! Errors over ssh say what failed and what to do, exit 1, and write
//! nothing: unknown or changed host keys (never accepted on their own), a
//! missing remote dsg, a repository path that does not exist on the server,
//! a protocol mismatch.

mod ssh_support;
mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use ssh_support::*;

/// A world with project `a` initialised over ssh (the good connection).
fn initialised(prefix: &str, ssh: &Ssh) -> World {
    let w = World::new(prefix, Transport::Ssh, Some(ssh));
    w.write("a", "task/input/a.txt", "hello\n");
    w.write("a", "task/output/b.txt", "world\n");
    w.init("a");
    w
}

#[track_caller]
fn assert_fails_with(o: &Output, what: &str, needles: &[&str]) {
    assert_exit(o, 1, what);
    let err = stderr(o);
    eprintln!("--- {what}:\n{}", err.trim_end());
    for n in needles {
        assert!(
            err.contains(n),
            "{what}: stderr should mention {n:?}:\n{}",
            show(o)
        );
    }
}

/// Runs `args` in client `a` through `ssh_command` and asserts it fails
/// with `needles` in stderr, changing nothing on either side (also after
/// the next, good command).
fn assert_refused_on_existing(w: &World, ssh_command: &str, args: &[&str], needles: &[&str]) {
    let client = state_listing(&w.client("a"));
    let repo = state_listing(&w.repo());
    let snap = w.repo_snapshot();
    w.write("a", "task/input/pending.txt", "to upload\n");
    let client_with_edit = state_listing(&w.client("a"));
    let o = w.run_via("a", args, ssh_command);
    assert_fails_with(&o, &format!("dsg {args:?}"), needles);
    assert_same(
        &format!("client after a refused {args:?}"),
        &client_with_edit,
        &state_listing(&w.client("a")),
    );
    assert_same(
        &format!("repository after a refused {args:?}"),
        &repo,
        &state_listing(&w.repo()),
    );
    assert_eq!(w.repo_snapshot(), snap);
    w.remove("a", "task/input/pending.txt");
    w.ok("a", &["status"]);
    assert_same(
        "client after the next command",
        &client,
        &state_listing(&w.client("a")),
    );
}

/// Runs `dsg init` over ssh in a fresh client through `ssh_command` (plus
/// `extra` init args) and asserts it fails with `needles`, writing nothing
/// locally or on the server.
fn assert_init_refused(
    w: &World,
    ssh_command: &str,
    init_args: Vec<String>,
    needles: &[&str],
) -> Output {
    w.write("fresh", "task/input/x.txt", "x\n");
    let client = state_listing(&w.client("fresh"));
    let server = state_listing(&w.repo_parent);
    let args: Vec<&str> = init_args.iter().map(|s| s.as_str()).collect();
    let o = w.run_via("fresh", &args, ssh_command);
    assert_fails_with(&o, "dsg init", needles);
    assert_same(
        "client after a refused init",
        &client,
        &state_listing(&w.client("fresh")),
    );
    assert_same(
        "server after a refused init",
        &server,
        &state_listing(&w.repo_parent),
    );
    o
}

#[test]
fn unknown_host_key_is_refused_with_a_hint() {
    let ssh = need_ssh!();
    let w = initialised("unknown-key", &ssh);
    let bad = ssh.command_with("-o UserKnownHostsFile=/dev/null");
    for args in [&["status"][..], &["sync", "-m", "x"][..]] {
        assert_refused_on_existing(&w, &bad, args, &["hint:", "known_hosts", &ssh.host]);
    }
    assert_init_refused(&w, &bad, w.init_args(), &["hint:", "known_hosts"]);
}

#[test]
fn changed_host_key_is_refused_with_a_hint() {
    let ssh = need_ssh!();
    let w = initialised("changed-key", &ssh);
    // known_hosts naming another ed25519 key for the same host and port.
    let dir = w.tmp.path().join("otherkey");
    fs::create_dir_all(&dir).unwrap();
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(dir.join("key"))
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    let pubkey = fs::read_to_string(dir.join("key.pub")).unwrap();
    let mut it = pubkey.split_whitespace();
    let (kt, kb) = (it.next().unwrap(), it.next().unwrap());
    let kh = dir.join("known_hosts");
    fs::write(&kh, format!("[127.0.0.1]:{} {kt} {kb}\n", ssh.port())).unwrap();
    let bad = ssh.command_with(&format!("-o UserKnownHostsFile={}", kh.display()));
    for args in [&["status"][..], &["sync", "-m", "x"][..]] {
        assert_refused_on_existing(&w, &bad, args, &["hint:", "known_hosts", &ssh.host]);
    }
    assert_init_refused(&w, &bad, w.init_args(), &["hint:", "known_hosts"]);
    // ssh must not have replaced the key on its own.
    assert_eq!(
        fs::read_to_string(&kh).unwrap(),
        format!("[127.0.0.1]:{} {kt} {kb}\n", ssh.port())
    );
}

/// The user's own config of world `w` (`DSG_CONFIG_HOME`), where
/// `--remote-dsg` is saved.
fn user_config(w: &World) -> std::path::PathBuf {
    w.client("a").parent().unwrap().join("cfg/dsg.yml")
}

const IDENTITY: &str = "user_name: Alice\nuser_id: alice@example.org\nmax_delete: 100\n";

#[test]
fn missing_remote_dsg_names_remote_dsg() {
    let ssh = need_ssh!();
    let w = initialised("no-remote-dsg", &ssh);
    // init with a remote dsg that does not exist.
    let ucfg = user_config(&w);
    let saved = fs::read_to_string(&ucfg).unwrap();
    let mut args = w.init_args();
    let i = args.iter().position(|a| a == "--remote-dsg").unwrap();
    args[i + 1] = "/nonexistent/dsg".into();
    assert_init_refused(&w, &ssh.command(), args, &["hint:", "remote_dsg"]);
    // A path that did not work is not saved for the host.
    assert_eq!(fs::read_to_string(&ucfg).unwrap(), saved);

    // An existing project whose user config names a missing remote dsg.
    let bin = dsg_bin().to_str().unwrap().to_string();
    assert!(saved.contains(&bin), "remote_dsg in user config:\n{saved}");
    fs::write(&ucfg, saved.replace(&bin, "/nonexistent/dsg")).unwrap();
    for args in [&["status"][..], &["sync", "-m", "x"][..]] {
        let client = state_listing(&w.client("a"));
        let repo = state_listing(&w.repo());
        let o = w.run("a", args);
        assert_fails_with(
            &o,
            &format!("{args:?}"),
            &["hint:", "remote_dsg", "dsg.yml"],
        );
        assert_same("client", &client, &state_listing(&w.client("a")));
        assert_same("repository", &repo, &state_listing(&w.repo()));
    }
    fs::write(&ucfg, saved).unwrap();
    w.ok("a", &["status"]);
}

/// The keys the original dsg accepts in `.dsgconfig.yml`
/// (spec-data-model §5.2/§5.2.1); `repository` refuses any other key.
const ORIGINAL_TOP: &[&str] = &[
    "name",
    "repository",
    "transport",
    "ssh",
    "rclone",
    "ipfs",
    "data_dirs",
    "ignore",
    "migrated",
];
const ORIGINAL_REPOSITORY: &[&str] = &["type", "host", "pool", "mountpoint"];

#[test]
fn init_saves_remote_dsg_in_the_user_config_not_the_project_file() {
    let ssh = need_ssh!();
    let w = World::new("remote-dsg-home", Transport::Ssh, Some(&ssh));
    w.write("a", "task/input/a.txt", "hello\n");
    let ucfg = user_config(&w);
    // A dry run says where it would go and writes nothing.
    let mut dry = w.init_args();
    dry.push("--dry-run".into());
    let dry: Vec<&str> = dry.iter().map(|s| s.as_str()).collect();
    let out = stdout(&w.ok("a", &dry));
    assert!(out.contains("would be saved in"), "{out}");
    assert_eq!(fs::read_to_string(&ucfg).unwrap(), IDENTITY);
    let o = w.init("a");
    let out = stdout(&o);
    assert!(
        out.contains("saved in") && out.contains(&ucfg.display().to_string()),
        "{out}"
    );

    let project = fs::read_to_string(w.client("a").join(".dsgconfig.yml")).unwrap();
    assert!(!project.contains("remote_dsg"), "{project}");
    let mut section = "";
    for line in project.lines() {
        let (indented, key) = (
            line.starts_with(' '),
            line.trim().split(':').next().unwrap(),
        );
        if indented {
            assert_eq!(section, "repository", "{project}");
            assert!(
                ORIGINAL_REPOSITORY.contains(&key),
                "repository.{key}:\n{project}"
            );
        } else {
            assert!(ORIGINAL_TOP.contains(&key), "{key}:\n{project}");
            section = key;
        }
    }

    let user = fs::read_to_string(&ucfg).unwrap();
    let bin = dsg_bin().to_str().unwrap().to_string();
    assert!(user.starts_with(IDENTITY), "{user}");
    assert!(
        user.contains(&format!("remote_dsg:\n  \"{}\": \"{bin}\"\n", ssh.host)),
        "{user}"
    );
    // A second client of the same user reaches the server through it.
    w.clone_client("a", "b");
    w.ok("b", &["status"]);
}

#[test]
fn legacy_remote_dsg_in_the_project_file_still_works() {
    let ssh = need_ssh!();
    let w = initialised("legacy-remote-dsg", &ssh);
    let bin = dsg_bin().to_str().unwrap().to_string();
    let cfg = w.client("a").join(".dsgconfig.yml");
    let ucfg = user_config(&w);
    let text = fs::read_to_string(&cfg).unwrap();
    let legacy = |p: &str| {
        text.replace(
            "repository:\n",
            &format!("repository:\n  remote_dsg: {p:?}\n"),
        )
    };

    // As an earlier dsg wrote it: only in the project file.
    fs::write(&cfg, legacy(&bin)).unwrap();
    fs::write(&ucfg, IDENTITY).unwrap();
    w.ok("a", &["status"]);
    w.write("a", "task/input/more.txt", "more\n");
    w.ok("a", &["sync", "-m", "legacy"]);

    // A wrong legacy path is named as such.
    fs::write(&cfg, legacy("/nonexistent/dsg")).unwrap();
    let o = w.run("a", &["status"]);
    assert_fails_with(&o, "status", &["repository.remote_dsg", "hint:"]);

    // DSG_REMOTE_DSG and the user config both come before it.
    let mut c = w.command("a", &["status"], None);
    c.env("DSG_REMOTE_DSG", &bin);
    assert_ok(
        &run_bounded(c, std::time::Duration::from_secs(90)),
        "status with DSG_REMOTE_DSG",
    );
    fs::write(
        &ucfg,
        format!("{IDENTITY}remote_dsg:\n  {}: {bin:?}\n", ssh.host),
    )
    .unwrap();
    w.ok("a", &["status"]);
}

#[test]
fn wrong_repository_path_says_what_to_do() {
    let ssh = need_ssh!();
    let w = initialised("wrong-path", &ssh);
    let missing = format!("/nonexistent-{}", unique("dsg"));

    // status (and sync) on a project whose mountpoint is not on the server.
    let cfg = w.client("a").join(".dsgconfig.yml");
    let text = fs::read_to_string(&cfg).unwrap();
    let parent = w.repo_parent.to_str().unwrap().to_string();
    assert!(text.contains(&parent));
    fs::write(&cfg, text.replace(&parent, &missing)).unwrap();
    for args in [&["status"][..], &["sync", "-m", "x"][..]] {
        let client = state_listing(&w.client("a"));
        let o = w.run("a", args);
        assert_fails_with(&o, &format!("{args:?}"), &["hint:", &missing, &ssh.host]);
        assert_same("client", &client, &state_listing(&w.client("a")));
    }
    assert!(!Path::new(&missing).exists(), "{missing} was created");
    fs::write(&cfg, text).unwrap();

    // init with a --repo-path that does not exist on the server.
    let mut args = w.init_args();
    let i = args.iter().position(|a| a == "--repo-path").unwrap();
    args[i + 1] = missing.clone();
    assert_init_refused(&w, &ssh.command(), args, &["hint:", &missing]);
    assert!(!Path::new(&missing).exists(), "{missing} was created");
}

/// The agent refuses a client that speaks another protocol version, with a
/// hint (driven directly; no ssh needed).
#[test]
fn agent_refuses_another_protocol_version() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = AgentProc::spawn(&tmp.path().join("repo"));
    a.send(serde_json::json!({"op": "hello", "protocol": 999, "client_version": "99.0.0"}));
    a.flush();
    let r = a.recv();
    let msg = expect_err(&r, "hello with protocol 999");
    assert!(msg.contains("protocol"), "{r}");
    assert_eq!(r["kind"], "protocol", "{r}");
    assert!(
        r["hint"].as_str().unwrap_or("").contains("version"),
        "a hint about installing the same version: {r}"
    );
    a.finish();
    assert!(!tmp.path().join("repo").exists());
}

/// A client meeting an agent of another protocol version (simulated by a
/// remote "dsg" that answers the handshake as a mismatched agent does)
/// exits 1 with the agent's message and hint, writing nothing.
#[test]
fn client_reports_a_protocol_mismatch_over_ssh() {
    let ssh = need_ssh!();
    let w = initialised("proto", &ssh);
    let reply = serde_json::to_vec(&serde_json::json!({
        "reply": "err",
        "kind": "protocol",
        "message": "protocol mismatch: the client speaks 1, this agent (dsg 9.9.9) speaks 2",
        "hint": "install the same dsg version on both machines",
    }))
    .unwrap();
    let mut frame = vec![b'J'];
    frame.extend_from_slice(&(reply.len() as u32).to_le_bytes());
    frame.extend_from_slice(&reply);
    let fake = w.tmp.path().join("fake-agent");
    fs::create_dir_all(&fake).unwrap();
    fs::write(fake.join("reply.bin"), &frame).unwrap();
    let script = fake.join("dsg");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat '{}'\nexec cat >/dev/null\n",
            fake.join("reply.bin").display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let cfg = user_config(&w);
    let text = fs::read_to_string(&cfg).unwrap();
    let bin = dsg_bin().to_str().unwrap().to_string();
    fs::write(&cfg, text.replace(&bin, script.to_str().unwrap())).unwrap();
    let client = state_listing(&w.client("a"));
    let repo = state_listing(&w.repo());
    for args in [&["status"][..], &["sync", "-m", "x"][..]] {
        let o = w.run("a", args);
        assert_fails_with(
            &o,
            &format!("{args:?} against another protocol"),
            &["protocol mismatch", "hint:", "same dsg version"],
        );
    }
    assert_same("client", &client, &state_listing(&w.client("a")));
    assert_same("repository", &repo, &state_listing(&w.repo()));
    fs::write(&cfg, text).unwrap();
}
