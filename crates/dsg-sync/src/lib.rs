//! dsg-sync: the client-side engine. It ties the core (scan, manifests, the
//! 15-state table) to a repository connection and runs each command as a
//! transaction with local recovery. The CLI only parses and prints.

pub mod init;
pub mod local_tx;
pub mod names;
pub mod project;
pub mod recover;
pub mod retry;
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
    #[error("{message}")]
    Blocked { message: String, paths: Vec<String> },
    #[error("{0}")]
    Usage(String),
    #[error("{message}\nhint: {hint}")]
    State { message: String, hint: String },
    #[error("interrupted; nothing was changed")]
    Interrupted,
    /// Already reported to the user (e.g. a failing check list); only the
    /// exit code is left to give.
    #[error("{message}")]
    Reported { message: String, code: i32 },
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
        match self {
            EngineError::State { hint, .. } => Some(hint.clone()).filter(|h| !h.is_empty()),
            EngineError::Config(ConfigError::Invalid { hint, .. }) => Some(hint.clone()),
            EngineError::Repo(RepoError::Remote { err, .. }) => err.hint.clone(),
            // Many messages (blocked syncs, config, manifest and transport
            // errors) are built elsewhere with the hint as their last part.
            _ => split_hint(&self.to_string()).1.map(String::from),
        }
    }

    /// The message without its hint.
    pub fn message(&self) -> String {
        match self {
            EngineError::State { message, .. } => message.clone(),
            _ => split_hint(&self.to_string()).0.to_string(),
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

/// Splits "message\nhint: hint" at its first hint line; a hint may span
/// several lines (e.g. the missing user config's example file).
fn split_hint(text: &str) -> (&str, Option<&str>) {
    match text.find("\nhint: ") {
        Some(i) => (&text[..i], Some(&text[i + "\nhint: ".len()..])),
        None => (text, None),
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
