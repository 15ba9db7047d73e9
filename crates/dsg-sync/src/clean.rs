//! `dsg clean`: what may be removed from a project, and removing it.
//!
//! Three targets, none of which is ever tracked data or part of a
//! transaction:
//! - `cache`: derived caches the next command rebuilds (`.dsg/stat-cache`,
//!   `.dsg/stat-cache.manifest`, `.dsg/history-sizes.json`) — never the
//!   last sync's manifest, the snapshot index or the archives;
//! - `temp`: leftovers of dead commands: `.dsg/staging/` when no journal
//!   exists, the original's `.dsg/tmp`, `.dsg/temp`, `.dsg/working`, and
//!   `.dsg-tmp.<pid>.…` temp files whose process is gone;
//! - `backups`: conflict backups (`name~YYYYMMDDTHHMMSS±ZZZZ~`, files and
//!   links only) in the data folders, except a path the last sync tracks.
//!
//! While `.dsg/journal` or an init's `.dsg.init-*` exists a sync or an init
//! is running or was interrupted: clean refuses (checked when planning and
//! again just before removing anything).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use dsg_core::manifest::Manifest;
use dsg_core::names::is_conflict_backup_name;
use serde::Serialize;

use crate::project::DSG_DIR;
use crate::{EngineError, Project, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Cache,
    Temp,
    Backups,
}

impl Target {
    pub const ALL: [Target; 3] = [Target::Cache, Target::Temp, Target::Backups];

    pub fn as_str(self) -> &'static str {
        match self {
            Target::Cache => "cache",
            Target::Temp => "temp",
            Target::Backups => "backups",
        }
    }
}

/// Derived caches in `.dsg/` (never `last-sync.json`, `sync-messages.json`
/// or `archive/`).
pub const CACHE_FILES: [&str; 3] = ["stat-cache", "stat-cache.manifest", "history-sizes.json"];
/// Leftover folders in `.dsg/` (`staging` only without a journal; the
/// others are the original's).
const TEMP_DIRS: [&str; 3] = ["tmp", "temp", "working"];

/// One thing clean removes (or would).
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// Relative to the project root, `/`-separated.
    pub path: String,
    /// `file`, `link` or `dir`.
    pub kind: &'static str,
    /// Bytes it takes (a folder: everything in it).
    pub bytes: u64,
    pub target: Target,
    #[serde(skip)]
    pub abs: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct CleanPlan {
    pub items: Vec<Item>,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub path: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CleanOutcome {
    pub removed: Vec<Item>,
    pub bytes_freed: u64,
    pub errors: Vec<Failure>,
}

/// Refuses while a sync or an init is running or was interrupted: their
/// staging and temp files are theirs to finish or undo.
pub fn check_no_transaction(root: &Path) -> Result<()> {
    let journal = root.join(DSG_DIR).join("journal");
    let init = fs::read_dir(root).ok().and_then(|rd| {
        rd.flatten()
            .map(|d| d.file_name().to_string_lossy().to_string())
            .find(|n| n.starts_with(".dsg.init-"))
    });
    let what = if fs::symlink_metadata(&journal).is_ok() {
        format!("a sync is in progress or was interrupted ({DSG_DIR}/journal exists)")
    } else if let Some(n) = init {
        format!("an init is in progress or was interrupted ({n} exists)")
    } else {
        return Ok(());
    };
    Err(EngineError::State {
        message: format!("clean refused: {what}; nothing was removed"),
        hint: "wait for it to finish; after a crash, run `dsg status` or `dsg sync`, which finish \
               or undo it, then clean again"
            .into(),
    })
}

fn rel_of(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .to_string_lossy()
        .to_string()
}

/// Bytes under `p` (not following links): a file's size, a link's own size,
/// a folder's contents.
fn size_of(p: &Path) -> u64 {
    let Ok(md) = fs::symlink_metadata(p) else {
        return 0;
    };
    if !md.is_dir() {
        return md.len();
    }
    let mut n = 0;
    if let Ok(rd) = fs::read_dir(p) {
        for d in rd.flatten() {
            n += size_of(&d.path());
        }
    }
    n
}

fn kind_of(md: &fs::Metadata) -> &'static str {
    if md.file_type().is_symlink() {
        "link"
    } else if md.is_dir() {
        "dir"
    } else {
        "file"
    }
}

/// A `.dsg-tmp.<pid>.…` temp file whose writer is gone.
fn is_dead_temp(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(".dsg-tmp.") else {
        return false;
    };
    match rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) {
        Some(p) if p == std::process::id() => false,
        Some(p) => !Path::new(&format!("/proc/{p}")).exists(),
        None => false,
    }
}

/// What `targets` would remove in `project`, sorted by target then path.
pub fn plan(project: &Project, targets: &[Target]) -> Result<CleanPlan> {
    let root = &project.root;
    check_no_transaction(root)?;
    let dsg = project.dsg();
    let mut items: Vec<Item> = Vec::new();
    let push = |abs: PathBuf, target: Target, items: &mut Vec<Item>| {
        if let Ok(md) = fs::symlink_metadata(&abs) {
            items.push(Item {
                path: rel_of(root, &abs),
                kind: kind_of(&md),
                bytes: size_of(&abs),
                target,
                abs,
            });
        }
    };
    if targets.contains(&Target::Cache) {
        for name in CACHE_FILES {
            let p = dsg.join(name);
            // A folder of that name is not ours to remove.
            if fs::symlink_metadata(&p).is_ok_and(|m| !m.is_dir()) {
                push(p, Target::Cache, &mut items);
            }
        }
    }
    let want_temp = targets.contains(&Target::Temp);
    let want_backups = targets.contains(&Target::Backups);
    if want_temp {
        // No journal (checked above): staging is an abandoned sync's.
        push(dsg.join("staging"), Target::Temp, &mut items);
        for name in TEMP_DIRS {
            push(dsg.join(name), Target::Temp, &mut items);
        }
        if let Ok(rd) = fs::read_dir(&dsg) {
            for d in rd.flatten() {
                let name = d.file_name().to_string_lossy().to_string();
                if is_dead_temp(&name) && d.file_type().is_ok_and(|t| !t.is_dir()) {
                    push(d.path(), Target::Temp, &mut items);
                }
            }
        }
    }
    if want_temp || want_backups {
        let tracked = Manifest::load_optional(&project.cache_path())?;
        let data_dirs = &project.config.data_dirs;
        let all = data_dirs.contains("*");
        let mut found = Vec::new();
        walk(
            root,
            root,
            all,
            &mut |abs, name, in_data| {
                let rel = rel_of(root, abs);
                if tracked.as_ref().is_some_and(|m| m.get(&rel).is_some()) {
                    return; // never tracked data, whatever its name
                }
                if want_backups && in_data && is_conflict_backup_name(name) {
                    found.push((abs.to_path_buf(), Target::Backups));
                } else if want_temp && is_dead_temp(name) {
                    found.push((abs.to_path_buf(), Target::Temp));
                }
            },
            data_dirs,
        );
        for (p, t) in found {
            push(p, t, &mut items);
        }
    }
    items.sort_by(|a, b| (a.target, &a.path).cmp(&(b.target, &b.path)));
    items.dedup_by(|a, b| a.abs == b.abs);
    let bytes = items.iter().map(|i| i.bytes).sum();
    Ok(CleanPlan { items, bytes })
}

/// Visits every file and link below `dir` (not following links, not
/// entering hidden folders — `.dsg`, `.git`, `.dsg.init-*`) with its name
/// and whether it lies in a data folder (a component of its path is one of
/// `data_dirs`, or `*`).
fn walk(
    root: &Path,
    dir: &Path,
    in_data: bool,
    f: &mut dyn FnMut(&Path, &str, bool),
    data_dirs: &std::collections::BTreeSet<String>,
) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    let dev = fs::symlink_metadata(root).map(|m| m.dev()).ok();
    for d in rd.flatten() {
        let Ok(t) = d.file_type() else { continue };
        let name = d.file_name().to_string_lossy().to_string();
        let p = d.path();
        if t.is_dir() {
            // Stay on the project's filesystem and out of hidden folders.
            let same_dev = fs::symlink_metadata(&p).is_ok_and(|m| Some(m.dev()) == dev);
            if !name.starts_with('.') && same_dev {
                walk(root, &p, in_data || data_dirs.contains(&name), f, data_dirs);
            }
        } else {
            f(&p, &name, in_data);
        }
    }
}

/// Removes what `plan` listed, each item after checking again that no
/// transaction began and that a backup is still a file or a link.
pub fn execute(project: &Project, plan: &CleanPlan) -> Result<CleanOutcome> {
    check_no_transaction(&project.root)?;
    let mut out = CleanOutcome {
        removed: Vec::new(),
        bytes_freed: 0,
        errors: Vec::new(),
    };
    for item in &plan.items {
        let md = match fs::symlink_metadata(&item.abs) {
            Ok(md) => md,
            // Gone meanwhile: nothing to do.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                out.errors.push(Failure {
                    path: item.path.clone(),
                    error: e.to_string(),
                });
                continue;
            }
        };
        let r = if md.is_dir() {
            if item.target == Target::Backups || item.kind != "dir" {
                // It was a file when planned: leave what replaced it.
                out.errors.push(Failure {
                    path: item.path.clone(),
                    error: "became a folder since it was listed; left in place".into(),
                });
                continue;
            }
            if item.path == format!("{DSG_DIR}/staging") {
                // A sync may have begun since the plan.
                check_no_transaction(&project.root)?;
            }
            fs::remove_dir_all(&item.abs)
        } else {
            fs::remove_file(&item.abs)
        };
        match r {
            Ok(()) => {
                out.bytes_freed += item.bytes;
                out.removed.push(item.clone());
            }
            Err(e) => out.errors.push(Failure {
                path: item.path.clone(),
                error: e.to_string(),
            }),
        }
    }
    let _ = dsg_core::atomic::sync_dir(&project.dsg());
    Ok(out)
}
