//! The client's local transaction: its journal records, the committed
//! operations and their idempotent apply, and recovery after a crash.
//!
//! Recovery (`recover_sync`) rolls back before the commit point and forward
//! after it; every apply step checks what is already done.

use std::path::{Path, PathBuf};

use dsg_core::atomic::sync_dir;
use dsg_repo::RepoClient;
use dsg_txn::{Aside, Layout, Log, OpList, Record, TxError};
use serde::{Deserialize, Serialize};

use crate::project::DSG_DIR;
use crate::status::fetch_remote;
use crate::{EngineError, Project, Result};

/// What the client's journal remembers of a `begin`: whether the
/// transaction is a clone (a clone that does not commit leaves no `.dsg/`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientBegin {
    pub clone: bool,
}

pub type LocalRecord = Record<ClientBegin>;
type LocalLog = Log<ClientBegin>;

pub(crate) fn journal_path(root: &Path) -> PathBuf {
    root.join(DSG_DIR).join("journal")
}

pub(crate) fn staging_dir(root: &Path, tx: &str) -> PathBuf {
    root.join(DSG_DIR).join("staging").join(tx)
}

pub(crate) fn jerr(root: &Path) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::io(journal_path(root), e)
}

pub(crate) fn sync_fs(root: &Path) -> Result<()> {
    dsg_txn::apply::syncfs(root).map_err(local_error)
}

pub(crate) fn make_parent(base: &Path, rel: &str) -> Result<()> {
    if let Some(parent) = Path::new(rel).parent() {
        let p = base.join(parent);
        std::fs::create_dir_all(&p).map_err(|e| EngineError::io(&p, e))?;
    }
    Ok(())
}

/// The places of the local transaction `tx`: what it replaces or deletes
/// goes to its backup folder, removed once it is done.
fn local_layout(root: &Path, tx: &str) -> Layout {
    let staging = staging_dir(root, tx);
    Layout {
        root: root.to_path_buf(),
        files: staging.join("files"),
        flat: false,
        meta: staging.join("meta"),
        dsg: root.join(DSG_DIR),
        aside: Aside::Backup {
            dir: staging.join("backup"),
        },
        keep_top_level: true,
        fp: "client",
    }
}

/// The engine's error as the user of a working tree needs it.
fn local_error(e: TxError) -> EngineError {
    let hint = if e.is_no_space() {
        format!(
            "the local disk holding {} is full; free space there and run the command again",
            e.path().display()
        )
    } else if e.is_not_writable() {
        format!(
            "make {} writable for you (or move it away), then run the command again",
            e.path().display()
        )
    } else if let TxError::ThroughLink { .. } = e {
        "replace the symlink by a folder, or ignore the path (ignore.paths in .dsgconfig.yml)"
            .to_string()
    } else {
        "run the command again".to_string()
    };
    EngineError::State {
        message: e.to_string(),
        hint,
    }
}

/// Before the commit point: makes and checks everything `apply_local`
/// needs (folders for downloads, write permission, a little free space),
/// so a local cause fails the sync while nothing was changed.
pub(crate) fn prepare_local(root: &Path, tx: &str, ops: &dyn OpList) -> Result<()> {
    // Retired versions go to the backup folder, not to objects: nothing
    // is hashed, so no hash comes back to record.
    dsg_txn::apply::prepare_list(&local_layout(root, tx), ops)
        .map(drop)
        .map_err(|e| {
            let EngineError::State { message, hint } = local_error(e) else {
                unreachable!("local_error gives State")
            };
            EngineError::State {
                message: format!("{message}; nothing was changed"),
                hint,
            }
        })
}

/// Applies committed local operations. Idempotent: each step looks at what
/// is already done, so recovery can run it again after a crash.
pub fn apply_local<O: OpList + ?Sized>(root: &Path, tx: &str, ops: &O) -> Result<()> {
    dsg_txn::apply::apply_list(&local_layout(root, tx), ops).map_err(local_error)
}

pub(crate) fn rollback_local(root: &Path, tx: &str, is_clone: bool) {
    let _ = std::fs::remove_dir_all(staging_dir(root, tx));
    let _ = std::fs::remove_file(journal_path(root));
    if is_clone {
        // A clone that did not commit leaves no .dsg/, so it can be rerun.
        let _ = std::fs::remove_dir_all(root.join(DSG_DIR));
    }
    let _ = sync_dir(&root.join(DSG_DIR));
}

pub(crate) fn cleanup_local(root: &Path) {
    let _ = std::fs::remove_dir_all(root.join(DSG_DIR).join("staging"));
    let _ = std::fs::remove_file(journal_path(root));
    let _ = sync_dir(&root.join(DSG_DIR));
}

/// Finishes or undoes an interrupted sync or clone on the client side.
/// `client` is needed only to learn whether the repository committed.
pub fn recover_sync(project: &Project, client: Option<&mut RepoClient>) -> Result<()> {
    let root = &project.root;
    // Half-written files of a killed command (its stat cache, say, or an
    // init's .dsgconfig.yml in the project root).
    dsg_core::atomic::remove_stale_temps(&project.dsg());
    dsg_core::atomic::remove_stale_temps(root);
    let log = match LocalLog::read(&journal_path(root)).map_err(jerr(root))? {
        Some(l) => l,
        None => {
            // No journal: any staging is from before a journal existed.
            if root.join(DSG_DIR).join("staging").exists() {
                cleanup_local(root);
            }
            return Ok(());
        }
    };
    let Some((tx, is_clone)) = log.begin().map(|(tx, b)| (tx.to_string(), b.clone)) else {
        cleanup_local(root);
        return Ok(());
    };
    if log.is_done() {
        cleanup_local(root);
        return Ok(());
    }
    let committed = log.is_committed();
    let Some((new_hash, ops)) = log.prepared() else {
        rollback_local(root, &tx, is_clone);
        return Ok(());
    };
    let forward = if committed {
        true
    } else if let Some(h) = new_hash {
        let h = h.to_string();
        // The repository decides: did it commit our snapshot?
        let Some(c) = client else {
            return Err(EngineError::State {
                message: "an interrupted sync must be finished, and that needs the repository"
                    .into(),
                hint: "run the command again when the repository is reachable".into(),
            });
        };
        // Wait out a writer that may still be finishing our commit.
        c.settle()?;
        let remote = fetch_remote(c, None)?;
        remote.and_then(|(m, _)| m.metadata.and_then(|m| m.snapshot_hash)) == Some(h)
    } else {
        false
    };
    if forward {
        tracing::info!("finishing an interrupted sync ({tx})");
        apply_local(root, &tx, ops)?;
        // The stat cache may be stale for the installed files; drop it.
        let _ = std::fs::remove_file(project.stat_cache_path());
        cleanup_local(root);
    } else {
        tracing::info!("rolling back an interrupted sync ({tx})");
        rollback_local(root, &tx, is_clone);
    }
    Ok(())
}
