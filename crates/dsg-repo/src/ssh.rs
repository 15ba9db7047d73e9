//! The SSH transport: `ssh HOST <remote dsg> agent --repo DIR --type T`,
//! through the system `ssh` so that `~/.ssh/config`, agents, ProxyJump and
//! known_hosts all work. Host-key checking is never weakened: an unknown or
//! changed key is an error with a hint. `DSG_SSH_COMMAND` (like git's
//! `GIT_SSH_COMMAND`) replaces `ssh` and its options.

use std::io::{self, Read};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use dsg_core::config::{ProjectConfig, REMOTE_DSG_ENV};

use crate::client::{RepoClient, RepoError};

pub struct SshChild {
    child: Child,
    host: String,
    remote_cmd: String,
    /// Where the server's dsg path came from, for the hint when it fails.
    remote_dsg_from: String,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl SshChild {
    /// Waits for ssh to exit (after its stdin was closed).
    pub fn wait(&mut self) {
        let _ = self.child.wait();
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
    }

    /// Stops an ssh whose connection is no longer wanted (it may still be
    /// handshaking: waiting for it could take its whole connect timeout).
    fn kill(&mut self) {
        let _ = self.child.kill();
        self.wait();
    }

    /// Turns a dead connection into an error that says what to do.
    pub fn explain(mut self, source: io::Error) -> RepoError {
        let status = self.child.wait().ok();
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let err = String::from_utf8_lossy(&self.stderr.lock().unwrap())
            .trim()
            .to_string();
        let code = status.and_then(|s| s.code());
        let host = self.host.clone();
        let last = err.lines().last().unwrap_or("").to_string();
        let msg = |message: String, hint: &str| RepoError::Unsupported {
            message,
            hint: Some(hint.to_string()),
        };
        if err.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
            return msg(
                format!("the host key of {host} has CHANGED since you last connected ({last})"),
                &format!(
                    "this can be an attack; confirm the new key's fingerprint with the server's administrator, and only then remove the old key from your known_hosts with 'ssh-keygen -R {host}' and connect once with ssh to record the new one; dsg never accepts keys on its own"
                ),
            );
        }
        if err.contains("Host key verification failed")
            || err.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || err.contains("No ED25519 host key is known")
            || err.contains("host key for")
        {
            return msg(
                format!("ssh refused the host key of {host}: it is unknown or has changed ({last})"),
                &format!(
                    "check the server's key fingerprint with its administrator, then add it to your known_hosts (e.g. run 'ssh {host}' once and compare the fingerprint); dsg never accepts keys on its own"
                ),
            );
        }
        if code == Some(127)
            || err.contains("command not found")
            || err.contains("No such file or directory")
        {
            return msg(
                format!(
                    "dsg could not be started on {host}: `{}` failed ({last}); its path came from {}",
                    self.remote_cmd, self.remote_dsg_from
                ),
                &format!(
                    "install dsg on the server (the same version as here), or give its path: in your dsg.yml\n  remote_dsg:\n    {host}: /path/to/dsg\n(or 'dsg init --remote-dsg PATH', or {REMOTE_DSG_ENV}=PATH for this shell)"
                ),
            );
        }
        if code == Some(255) {
            return msg(
                format!("cannot connect to {host} over ssh: {last}"),
                &format!(
                    "check that 'ssh {host}' works from this machine (host name, keys, network)"
                ),
            );
        }
        RepoError::Connection {
            host,
            source: io::Error::new(
                source.kind(),
                format!(
                    "{source}; the remote agent exited ({}) saying: {}",
                    code.map(|c| c.to_string()).unwrap_or("signal".into()),
                    if err.is_empty() { "nothing" } else { &err }
                ),
            ),
        }
    }
}

/// The ssh command line: `DSG_SSH_COMMAND` split like a shell would, or `ssh`.
fn ssh_argv() -> Result<Vec<String>, RepoError> {
    match std::env::var("DSG_SSH_COMMAND") {
        Ok(s) if !s.trim().is_empty() => shell_words::split(&s).map_err(|e| {
            RepoError::unsupported(format!(
                "DSG_SSH_COMMAND {s:?} is not a valid command line: {e}"
            ))
        }),
        _ => Ok(vec!["ssh".into()]),
    }
}

/// OpenSSH's default cipher list (unchanged from 6.9 to 9.x): a user whose
/// effective list is this one has not chosen ciphers.
const OPENSSH_DEFAULT_CIPHERS: &str = "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,\
aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com";

/// The same ciphers with AES-GCM first, when this CPU has AES
/// instructions and the user has not chosen ciphers (`ssh -G` shows the
/// default list, and no `-c`/`Ciphers` in DSG_SSH_COMMAND). OpenSSH
/// prefers ChaCha20-Poly1305, which costs about three times the CPU of
/// AES-GCM on such a CPU: a 1 GiB upload over loopback took 5.1 s with it
/// and 2.4 s with AES-GCM, the ssh client's CPU time 1.0 s against 0.35 s.
/// The set offered is unchanged, only its order; the server still decides
/// among them with the client's order first, as the SSH protocol says.
fn preferred_ciphers(prog: &str, argv: &[String], host: &str) -> Option<String> {
    let is_ssh = std::path::Path::new(prog)
        .file_name()
        .is_some_and(|n| n == "ssh");
    let chose = argv.iter().any(|a| {
        a == "-c"
            || a.starts_with("-c") && a.len() > 2
            || a.to_ascii_lowercase().contains("ciphers")
    });
    if !is_ssh || chose || !cpu_has_aes() {
        return None;
    }
    // Read the effective configuration for this host (no connection is
    // made, though a `Match exec` in the config runs); any failure means no
    // preference, never an error. Bounded: a wrapper called `ssh` that
    // ignored `-G` and connected, or a slow `Match exec`, costs at most
    // this long, and BatchMode keeps anything from asking on the terminal.
    let mut child = Command::new(prog)
        .args(argv)
        .args(["-o", "BatchMode=yes", "-G", "--"])
        .arg(host)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    if !status.success() {
        return None;
    }
    // A few KB, all written before ssh exited (a pipe holds 64 KiB).
    let mut stdout = Vec::new();
    child.stdout.take()?.read_to_end(&mut stdout).ok()?;
    let text = String::from_utf8_lossy(&stdout);
    let current = text
        .lines()
        .find_map(|l| l.strip_prefix("ciphers "))?
        .trim();
    gcm_first(current)
}

/// `list` with its AES-GCM ciphers moved to the front, if it is OpenSSH's
/// default list (anything else was chosen by someone: left alone).
fn gcm_first(list: &str) -> Option<String> {
    if list != OPENSSH_DEFAULT_CIPHERS {
        return None;
    }
    let (gcm, rest): (Vec<&str>, Vec<&str>) = list.split(',').partition(|c| c.contains("-gcm@"));
    Some(gcm.into_iter().chain(rest).collect::<Vec<_>>().join(","))
}

fn cpu_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

pub fn connect(cfg: &ProjectConfig) -> Result<RepoClient, RepoError> {
    spawn(cfg)?.ready()
}

/// `ssh` started towards a repository's agent, not yet greeted. ssh
/// connects, authenticates and starts the agent in its own process, so the
/// handshake (0.1–0.5 s even on a LAN) overlaps with whatever the caller
/// does before `ready`. Dropped unused, the ssh is stopped.
pub struct Spawned {
    parts: Option<(SshChild, ChildStdout, ChildStdin)>,
    host: String,
    dir: String,
}

impl Spawned {
    /// Greets the agent: the connection is usable, or the error says why not.
    pub fn ready(mut self) -> Result<RepoClient, RepoError> {
        let (child, stdout, stdin) = self.parts.take().expect("taken only here");
        RepoClient::over_child(
            child,
            Box::new(stdout),
            Box::new(stdin),
            &self.host,
            &self.dir,
        )
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some((mut child, _, stdin)) = self.parts.take() {
            drop(stdin);
            child.kill();
        }
    }
}

/// Starts `ssh` towards the agent of the repository `cfg` names.
pub fn spawn(cfg: &ProjectConfig) -> Result<Spawned, RepoError> {
    let repo = &cfg.repository;
    let dir = cfg.repo_dir();
    let choice = repo
        .remote_dsg_command()
        .map_err(|e| RepoError::Unsupported {
            message: e.message(),
            hint: e.hint().map(String::from),
        })?;
    let remote_dsg = choice.path;
    // ssh joins the remote command into one string for the remote shell:
    // quote every word so paths with spaces or metacharacters stay intact.
    let dir_s = dir.to_string_lossy().to_string();
    let mut words = vec![
        remote_dsg.as_str(),
        "agent",
        "--repo",
        &dir_s,
        "--type",
        repo.kind.as_str(),
    ];
    if let Some(pool) = &repo.pool {
        words.extend(["--pool", pool.as_str()]);
    }
    let remote_cmd = shell_words::join(words);
    let mut argv = ssh_argv()?;
    let prog = argv.remove(0);
    if let Some(ciphers) = preferred_ciphers(&prog, &argv, &repo.host) {
        argv.extend(["-o".into(), format!("Ciphers={ciphers}")]);
    }
    let mut cmd = Command::new(&prog);
    // `-T`: no terminal (the protocol is binary); `--` ends ssh's options.
    cmd.args(&argv)
        .arg("-T")
        .arg("--")
        .arg(&repo.host)
        .arg(&remote_cmd);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tracing::debug!("running {prog} {:?} -T -- {} {remote_cmd}", argv, repo.host);
    let mut child = cmd.spawn().map_err(|e| RepoError::Unsupported {
        message: format!("cannot run {prog:?} to reach {}: {e}", repo.host),
        hint: Some("install an OpenSSH client, or set DSG_SSH_COMMAND".into()),
    })?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    let stderr_thread = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut chunk) {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&chunk[..n]).to_string();
            for line in text.lines() {
                tracing::debug!("ssh: {line}");
            }
            let mut b = sink.lock().unwrap();
            // Keep the tail only: an agent could print a lot.
            b.extend_from_slice(&chunk[..n]);
            if b.len() > 64 * 1024 {
                let cut = b.len() - 32 * 1024;
                b.drain(..cut);
            }
        }
    });
    let ssh_child = SshChild {
        child,
        host: repo.host.clone(),
        remote_cmd,
        remote_dsg_from: choice.from,
        stderr: buf,
        stderr_thread: Some(stderr_thread),
    };
    Ok(Spawned {
        parts: Some((ssh_child, stdout, stdin)),
        host: repo.host.clone(),
        dir: dir.to_string_lossy().into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_list_gets_gcm_first_with_the_same_set() {
        let got = gcm_first(OPENSSH_DEFAULT_CIPHERS).unwrap();
        assert_eq!(
            got,
            "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,\
aes128-ctr,aes192-ctr,aes256-ctr"
        );
        let mut a: Vec<&str> = got.split(',').collect();
        let mut b: Vec<&str> = OPENSSH_DEFAULT_CIPHERS.split(',').collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }

    #[test]
    fn a_chosen_list_is_left_alone() {
        assert_eq!(gcm_first("chacha20-poly1305@openssh.com"), None);
        assert_eq!(gcm_first("aes256-ctr,aes128-gcm@openssh.com"), None);
    }

    #[test]
    fn ciphers_chosen_on_the_command_line_are_left_alone() {
        for argv in [
            vec!["-c".to_string(), "aes256-ctr".into()],
            vec!["-caes256-ctr".into()],
            vec!["-o".into(), "Ciphers=aes256-ctr".into()],
        ] {
            assert_eq!(preferred_ciphers("ssh", &argv, "localhost"), None);
        }
        // Not OpenSSH's client: never asked for its configuration.
        assert_eq!(preferred_ciphers("/bin/false", &[], "localhost"), None);
    }

    /// An `ssh` that hangs (a wrapper that ignores `-G` and connects, say)
    /// costs at most the bound, and gives no preference.
    #[test]
    fn a_hanging_ssh_is_given_up_on() {
        if !cpu_has_aes() {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("ssh");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let t = std::time::Instant::now();
        assert_eq!(preferred_ciphers(fake.to_str().unwrap(), &[], "h"), None);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            t.elapsed()
        );
    }
}
