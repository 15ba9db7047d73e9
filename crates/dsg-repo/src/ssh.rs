//! The SSH transport: `ssh HOST <remote dsg> agent --repo DIR --type T`,
//! through the system `ssh` so that `~/.ssh/config`, agents, ProxyJump and
//! known_hosts all work. Host-key checking is never weakened: an unknown or
//! changed key is an error with a hint. `DSG_SSH_COMMAND` (like git's
//! `GIT_SSH_COMMAND`) replaces `ssh` and its options.

use std::io::{self, Read};
use std::process::{Child, Command, Stdio};
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

pub fn connect(cfg: &ProjectConfig) -> Result<RepoClient, RepoError> {
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
    RepoClient::over_child(
        ssh_child,
        Box::new(stdout),
        Box::new(stdin),
        &repo.host,
        &dir.to_string_lossy(),
    )
}
