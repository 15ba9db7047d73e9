//! dsg-sync: the client-side engine. It ties the core (scan, manifests, the
//! 15-state table) to a repository connection and runs each command as a
//! transaction with local recovery. The CLI only parses and prints.

pub mod clean;
pub mod conflicts;
pub mod guard;
pub mod history;
pub mod init;
pub mod local_tx;
pub mod mounts;
pub mod names;
pub mod project;
pub mod prune;
pub mod recover;
pub mod repos;
pub mod retry;
pub mod snapshots;
pub mod status;
pub mod sync;
pub mod upload;

use std::path::PathBuf;

use dsg_core::config::ConfigError;
use dsg_core::manifest::ManifestError;
use dsg_repo::protocol::ErrorKind;
use dsg_repo::RepoError;

pub use project::Project;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something the user must fix first (conflicts, invalid names, unsafe
    /// links). Nothing was changed.
    #[error("{message}\nhint: {hint}")]
    Blocked {
        message: String,
        hint: String,
        paths: Vec<String>,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{message}\nhint: {hint}")]
    State { message: String, hint: String },
    #[error("interrupted; nothing was changed")]
    Interrupted,
    /// Already reported to the user (e.g. a failing check list); only the
    /// exit code is left to give.
    #[error("{message}\nhint: {hint}")]
    Reported {
        message: String,
        hint: String,
        code: i32,
    },
}

impl EngineError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> EngineError {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }

    /// The process exit code (DESIGN §6).
    pub fn exit_code(&self) -> i32 {
        match self {
            EngineError::Blocked { .. } => 3,
            EngineError::Usage(_) => 2,
            EngineError::Interrupted => 130,
            EngineError::Reported { code, .. } => *code,
            EngineError::Repo(r) if r.kind() == Some(ErrorKind::Busy) => 4,
            _ => 1,
        }
    }

    /// What the user can do about it, for `--json` consumers that should not
    /// have to parse the message.
    pub fn hint(&self) -> Option<String> {
        let hint = match self {
            EngineError::Config(e) => e.hint(),
            EngineError::Manifest(e) => Some(e.hint()),
            EngineError::Repo(e) => e.hint(),
            EngineError::Blocked { hint, .. }
            | EngineError::State { hint, .. }
            | EngineError::Reported { hint, .. } => Some(hint.as_str()),
            EngineError::Io { .. } | EngineError::Usage(_) | EngineError::Interrupted => None,
        };
        hint.filter(|h| !h.is_empty()).map(String::from)
    }

    /// The message without its hint.
    pub fn message(&self) -> String {
        match self {
            EngineError::Config(e) => e.message(),
            EngineError::Manifest(e) => e.message(),
            EngineError::Repo(e) => e.message(),
            EngineError::Blocked { message, .. }
            | EngineError::State { message, .. }
            | EngineError::Reported { message, .. } => message.clone(),
            EngineError::Io { .. } | EngineError::Usage(_) | EngineError::Interrupted => {
                self.to_string()
            }
        }
    }

    /// The project paths that caused it (conflicts, invalid names, unsafe
    /// links); empty when it is not about particular paths.
    pub fn paths(&self) -> &[String] {
        match self {
            EngineError::Blocked { paths, .. } => paths,
            _ => &[],
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Progress reporting hooks; the CLI draws bars, tests pass `()`.
pub trait Reporter: Sync {
    /// True when progress is shown (a terminal); scans then poll counters.
    fn wants_progress(&self) -> bool {
        false
    }
    fn scanning(&self, _p: &dsg_core::scan::Progress) {}
    fn transfer_start(&self, _what: &str, _files: u64, _bytes: u64) {}
    fn transfer_progress(&self, _files: u64, _bytes: u64) {}
    fn transfer_done(&self) {}
    fn warn(&self, _msg: &str) {}
}

impl Reporter for () {}

/// Set by the CLI's Ctrl-C handler; long loops check it and roll back.
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
        Err(EngineError::Interrupted)
    } else {
        Ok(())
    }
}

/// A debug mark at the end of one phase of a command, with the memory
/// held now and at most so far (`DSG_LOG=debug`; the log lines carry the
/// seconds since start): where a slow or large sync spends its time and
/// its memory, on any machine, without a profiler.
pub(crate) fn phase(name: &str) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    tracing::debug!(
        "{name} (memory {} MB, peak {} MB)",
        kib("VmRSS:") / 1024,
        kib("VmHWM:") / 1024
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsg_repo::protocol::RemoteError;

    /// Each error as the CLI prints it (Display), and as `--json` gives it
    /// (message and hint apart): the human text is the message, then the
    /// hint line.
    fn check(e: EngineError, text: &str, message: &str, hint: Option<&str>) {
        assert_eq!(e.to_string(), text);
        assert_eq!(e.message(), message);
        assert_eq!(e.hint().as_deref(), hint);
    }

    #[test]
    fn config_errors_give_message_and_hint_apart() {
        check(
            ConfigError::NoProject {
                start: "/x".into(),
            }
            .into(),
            "no .dsgconfig.yml found in /x or any parent directory\nhint: run dsg inside a project, or create one with 'dsg init'",
            "no .dsgconfig.yml found in /x or any parent directory",
            Some("run dsg inside a project, or create one with 'dsg init'"),
        );
        check(
            ConfigError::Invalid {
                file: "/x/.dsgconfig.yml".into(),
                msg: "bad key".into(),
                hint: "fix it".into(),
            }
            .into(),
            "/x/.dsgconfig.yml: bad key\nhint: fix it",
            "/x/.dsgconfig.yml: bad key",
            Some("fix it"),
        );
        let e: EngineError = ConfigError::NoUserConfig {
            looked: "/h".into(),
        }
        .into();
        assert!(e
            .to_string()
            .starts_with("no dsg.yml found (looked in: /h)\nhint: create ~/.config/dsg/dsg.yml with\n  user_name: "));
        assert!(e.hint().unwrap().ends_with("a directory holding dsg.yml"));
        check(
            ConfigError::Io {
                file: "/c".into(),
                source: std::io::Error::other("boom"),
            }
            .into(),
            "cannot read /c: boom",
            "cannot read /c: boom",
            None,
        );
    }

    #[test]
    fn manifest_errors_give_message_and_hint_apart() {
        check(
            ManifestError::Corrupt {
                path: "/m.json".into(),
                msg: "bad".into(),
            }
            .into(),
            "manifest /m.json is corrupt: bad\nhint: restore it from the repository or a backup; dsg never treats a damaged manifest as empty",
            "manifest /m.json is corrupt: bad",
            Some("restore it from the repository or a backup; dsg never treats a damaged manifest as empty"),
        );
        check(
            ManifestError::Io {
                path: "/m.json".into(),
                source: std::io::Error::other("boom"),
            }
            .into(),
            "cannot read manifest /m.json: boom\nhint: check the file exists and is readable",
            "cannot read manifest /m.json: boom",
            Some("check the file exists and is readable"),
        );
    }

    #[test]
    fn repository_errors_give_message_and_hint_apart() {
        let remote = |hint: Option<&str>| RepoError::Remote {
            host: "h".into(),
            repo: "/r".into(),
            err: RemoteError {
                kind: ErrorKind::Busy,
                message: "locked".into(),
                hint: hint.map(String::from),
            },
        };
        check(
            remote(Some("wait")).into(),
            "repository /r on h: locked\nhint: wait",
            "repository /r on h: locked",
            Some("wait"),
        );
        check(
            remote(None).into(),
            "repository /r on h: locked",
            "repository /r on h: locked",
            None,
        );
        check(
            RepoError::Connection {
                host: "h".into(),
                source: std::io::Error::other("eof"),
            }
            .into(),
            "lost the connection to the repository agent on h: eof\nhint: the next dsg command recovers any interrupted transaction",
            "lost the connection to the repository agent on h: eof",
            Some("the next dsg command recovers any interrupted transaction"),
        );
        check(
            RepoError::Unsupported {
                message: "cannot run \"ssh\"".into(),
                hint: Some("install it".into()),
            }
            .into(),
            "cannot run \"ssh\"\nhint: install it",
            "cannot run \"ssh\"",
            Some("install it"),
        );
        check(
            RepoError::protocol("h", "odd").into(),
            "protocol error talking to h: odd",
            "protocol error talking to h: odd",
            None,
        );
    }

    #[test]
    fn engine_errors_give_message_and_hint_apart() {
        check(
            EngineError::Blocked {
                message: "sync blocked:\n  a".into(),
                hint: "decide".into(),
                paths: vec!["a".into()],
            },
            "sync blocked:\n  a\nhint: decide",
            "sync blocked:\n  a",
            Some("decide"),
        );
        check(
            EngineError::Reported {
                message: "check failed".into(),
                hint: "fix".into(),
                code: 1,
            },
            "check failed\nhint: fix",
            "check failed",
            Some("fix"),
        );
        check(EngineError::Usage("bad".into()), "bad", "bad", None);
    }
}
