//! The client's local transaction: its journal records, the committed
//! operations and their idempotent apply, and recovery after a crash.
//!
//! Recovery (`recover_sync`) rolls back before the commit point and forward
//! after it; every apply step checks what is already done.

use std::path::{Path, PathBuf};

use dsg_core::atomic::sync_dir;
use dsg_core::scan::Stat;
use dsg_repo::failpoint::failpoint;
use dsg_repo::journal::Journal;
use dsg_repo::RepoClient;
use serde::{Deserialize, Serialize};

use crate::project::DSG_DIR;
use crate::status::fetch_remote;
use crate::{EngineError, Project, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "rec", rename_all = "snake_case")]
pub enum LocalRecord {
    Begin {
        tx: String,
        clone: bool,
    },
    /// Everything is staged. `new_hash`: the snapshot the repository will
    /// hold after its commit (None: no repository commit in this sync).
    Prepared {
        tx: String,
        new_hash: Option<String>,
        ops: Vec<LocalOp>,
    },
    /// The commit point has passed.
    Committed {
        tx: String,
    },
    Done {
        tx: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LocalOp {
    /// Move the local path (if any) into the backup area. `expect` is its
    /// stat when planned (size, mtime ns, inode); a file that no longer
    /// matches was changed by someone during the sync and is kept beside
    /// the path as a conflict backup instead.
    Remove {
        path: String,
        #[serde(default)]
        expect: Option<(u64, i64, u64)>,
    },
    /// Move the staged download into place.
    Install { path: String },
}

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
    // One syncfs makes every staged file durable: far cheaper than an fsync
    // per small file, and the journal record that follows is what makes the
    // staged state count.
    let f = std::fs::File::open(root).map_err(|e| EngineError::io(root, e))?;
    let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    if rc != 0 {
        return Err(EngineError::io(root, std::io::Error::last_os_error()));
    }
    Ok(())
}

pub(crate) fn make_parent(base: &Path, rel: &str) -> Result<()> {
    if let Some(parent) = Path::new(rel).parent() {
        let p = base.join(parent);
        std::fs::create_dir_all(&p).map_err(|e| EngineError::io(&p, e))?;
    }
    Ok(())
}

/// `YYYYMMDDTHHMMSS+0000` in UTC, the conflict-backup suffix format.
pub(crate) fn chrono_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let m = dsg_core::manifest::Mtime::Fixed {
        utc_secs: secs,
        offset_min: 0,
    }
    .to_string();
    // 2025-06-01T10:00:00+00:00 -> 20250601T100000+0000
    format!(
        "{}{}{}T{}{}{}+0000",
        &m[0..4],
        &m[5..7],
        &m[8..10],
        &m[11..13],
        &m[14..16],
        &m[17..19]
    )
}

/// Applies committed local operations. Idempotent: each step looks at what
/// is already done, so recovery can run it again after a crash.
pub fn apply_local(root: &Path, tx: &str, ops: &[LocalOp]) -> Result<()> {
    let staging = staging_dir(root, tx);
    let files = staging.join("files");
    let backup = staging.join("backup");
    let mut parents: Vec<PathBuf> = Vec::new();
    let installs: std::collections::HashSet<&str> = ops
        .iter()
        .filter_map(|o| match o {
            LocalOp::Install { path } => Some(path.as_str()),
            _ => None,
        })
        .collect();
    for (i, op) in ops.iter().enumerate() {
        failpoint(&format!("client.apply.{i}"));
        match op {
            LocalOp::Remove { path, expect } => {
                let p = root.join(path);
                let b = backup.join(path);
                if let Some(par) = p.parent() {
                    parents.push(par.to_path_buf());
                }
                // Already moved (a recovery re-run). Backups are files or
                // links; a directory there only holds backups of children.
                if std::fs::symlink_metadata(&b).is_ok_and(|m| !m.is_dir()) {
                    continue;
                }
                // Already replaced by its download (a recovery re-run).
                if installs.contains(path.as_str())
                    && std::fs::symlink_metadata(files.join(path)).is_err()
                {
                    continue;
                }
                if let Ok(md) = std::fs::symlink_metadata(&p) {
                    let st = Stat::of(&md);
                    let now = (st.size, st.mtime_ns, st.ino);
                    if !md.is_dir() && *expect != Some(now) {
                        // Changed (or created) while we synced: never lose
                        // it. Keep it beside the path under a conflict-backup
                        // name, which scans ignore.
                        let stamp = chrono_stamp();
                        let keep = p.with_file_name(format!(
                            "{}~{stamp}~",
                            p.file_name()
                                .map(|n| n.to_string_lossy().to_string())
                                .unwrap_or_default()
                        ));
                        std::fs::rename(&p, &keep).map_err(|e| EngineError::io(&p, e))?;
                        tracing::warn!(
                            "{} changed during the sync; your version is kept as {}",
                            p.display(),
                            keep.display()
                        );
                        continue;
                    }
                }
                match std::fs::symlink_metadata(&p) {
                    Ok(md) if md.is_dir() => {
                        // Its tracked files went first (deepest first). What
                        // is left is empty directories — or files dsg does
                        // not track, which are kept under a backup name.
                        if dsg_repo::posix::remove_empty_tree(&p).is_err() {
                            let keep = p.with_file_name(format!(
                                "{}~{}~",
                                p.file_name()
                                    .map(|n| n.to_string_lossy().to_string())
                                    .unwrap_or_default(),
                                chrono_stamp()
                            ));
                            std::fs::rename(&p, &keep).map_err(|e| EngineError::io(&p, e))?;
                            tracing::warn!(
                                "{} held untracked files; kept as {}",
                                p.display(),
                                keep.display()
                            );
                        }
                    }
                    Ok(_) => {
                        make_parent(&backup, path)?;
                        std::fs::rename(&p, &b).map_err(|e| EngineError::io(&p, e))?;
                    }
                    Err(_) => {}
                }
            }
            LocalOp::Install { path } => {
                let src = files.join(path);
                if std::fs::symlink_metadata(&src).is_err() {
                    continue;
                }
                let dst = root.join(path);
                if let Some(par) = dst.parent() {
                    std::fs::create_dir_all(par).map_err(|e| EngineError::io(par, e))?;
                }
                std::fs::rename(&src, &dst).map_err(|e| EngineError::io(&dst, e))?;
            }
        }
    }
    // Directories emptied by deletions go too (below the top level).
    parents.sort();
    parents.dedup();
    for d in parents.iter().rev() {
        let mut cur = d.clone();
        while cur.starts_with(root) && cur.parent() != Some(root) && cur != root {
            if std::fs::remove_dir(&cur).is_err() {
                break;
            }
            cur = cur.parent().unwrap().to_path_buf();
        }
    }
    let meta = staging.join("meta");
    let dsg = root.join(DSG_DIR);
    let archive = dsg.join("archive");
    std::fs::create_dir_all(&archive).map_err(|e| EngineError::io(&archive, e))?;
    if let Ok(rd) = std::fs::read_dir(meta.join("archive")) {
        for de in rd.flatten() {
            let dst = archive.join(de.file_name());
            std::fs::rename(de.path(), &dst).map_err(|e| EngineError::io(&dst, e))?;
        }
    }
    failpoint("client.apply.meta");
    for name in ["sync-messages.json", "last-sync.json"] {
        let src = meta.join(name);
        if src.exists() {
            std::fs::rename(&src, dsg.join(name))
                .map_err(|e| EngineError::io(dsg.join(name), e))?;
        }
    }
    sync_fs(root)?;
    Ok(())
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
    let records: Vec<LocalRecord> = match Journal::read(&journal_path(root)).map_err(jerr(root))? {
        Some(r) => r,
        None => {
            // No journal: any staging is from before a journal existed.
            if root.join(DSG_DIR).join("staging").exists() {
                cleanup_local(root);
            }
            return Ok(());
        }
    };
    let (tx, is_clone) = match records.first() {
        Some(LocalRecord::Begin { tx, clone }) => (tx.clone(), *clone),
        _ => {
            cleanup_local(root);
            return Ok(());
        }
    };
    if records
        .iter()
        .any(|r| matches!(r, LocalRecord::Done { .. }))
    {
        cleanup_local(root);
        return Ok(());
    }
    let prepared = records.iter().find_map(|r| match r {
        LocalRecord::Prepared { new_hash, ops, .. } => Some((new_hash.clone(), ops.clone())),
        _ => None,
    });
    let committed = records
        .iter()
        .any(|r| matches!(r, LocalRecord::Committed { .. }));
    let Some((new_hash, ops)) = prepared else {
        rollback_local(root, &tx, is_clone);
        return Ok(());
    };
    let forward = if committed {
        true
    } else if let Some(h) = new_hash {
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
        apply_local(root, &tx, &ops)?;
        // The stat cache may be stale for the installed files; drop it.
        let _ = std::fs::remove_file(project.stat_cache_path());
        cleanup_local(root);
    } else {
        tracing::info!("rolling back an interrupted sync ({tx})");
        rollback_local(root, &tx, is_clone);
    }
    Ok(())
}
