//! Recovery that every command runs first: finish or undo whatever an
//! interrupted command left on the client side.

use std::path::Path;

use dsg_core::atomic::sync_dir;
use dsg_core::manifest::Manifest;
use dsg_repo::RepoClient;

use crate::project::DSG_DIR;
use crate::status::fetch_remote;
use crate::{EngineError, Result};

/// Handles `.dsg.init-<tx>` directories: an init that crashed after the
/// repository committed is rolled forward; any other is removed. Also
/// undoes the snapmounts whose process died (`mounts::recover_stale`).
pub fn recover_init(root: &Path, mut connect: impl FnMut() -> Option<RepoClient>) -> Result<()> {
    crate::mounts::recover_stale(root, &mut connect);
    let leftovers: Vec<_> = match std::fs::read_dir(root) {
        Ok(rd) => rd
            .flatten()
            .filter(|d| d.file_name().to_string_lossy().starts_with(".dsg.init-"))
            .map(|d| d.path())
            .collect(),
        Err(_) => return Ok(()),
    };
    if leftovers.is_empty() {
        return Ok(());
    }
    let mut connect = Some(connect);
    let mut client: Option<RepoClient> = None;
    for staged in leftovers {
        if root.join(DSG_DIR).exists() {
            let _ = std::fs::remove_dir_all(&staged);
            continue;
        }
        let staged_manifest = Manifest::load(&staged.join("last-sync.json")).ok();
        if client.is_none() {
            if let Some(mut f) = connect.take() {
                client = f();
            }
        }
        let Some(c) = client.as_mut() else {
            tracing::warn!(
                "an interrupted init left {}; the repository is unreachable, so it is kept for now",
                staged.display()
            );
            return Ok(());
        };
        // The repository finishes its own interrupted steps first; if it
        // cannot be read now, the outcome is unknown: keep the staged .dsg.
        if c.settle().is_err() {
            tracing::warn!(
                "cannot tell whether an interrupted init committed (the repository stays busy); keeping {}",
                staged.display()
            );
            return Ok(());
        }
        let remote = match fetch_remote(c, None) {
            Ok(r) => r.map(|x| x.0),
            Err(e) => {
                let missing = matches!(&e, crate::EngineError::State { message, .. } if message.contains("does not exist"));
                if !missing {
                    tracing::warn!(
                        "cannot tell whether an interrupted init committed ({e}); keeping {}",
                        staged.display()
                    );
                    return Ok(());
                }
                None
            }
        };
        let staged_hash = staged_manifest
            .as_ref()
            .and_then(|m| m.metadata.as_ref())
            .and_then(|m| m.snapshot_hash.clone());
        let remote_hash = remote
            .as_ref()
            .and_then(|m| m.metadata.as_ref())
            .and_then(|m| m.snapshot_hash.clone());
        if staged_hash.is_some() && staged_hash == remote_hash {
            tracing::info!("finishing an interrupted init: the repository has its snapshot");
            finish_local_init(root, &staged)?;
        } else {
            let _ = std::fs::remove_dir_all(&staged);
        }
    }
    Ok(())
}

/// Moves a staged `.dsg.init-<tx>` into place (init's own last step, and recovery's roll-forward).
pub fn finish_local_init(root: &Path, staging: &Path) -> Result<()> {
    let dst = root.join(DSG_DIR);
    std::fs::rename(staging, &dst).map_err(|e| EngineError::io(&dst, e))?;
    sync_dir(root).map_err(|e| EngineError::io(root, e))?;
    Ok(())
}
