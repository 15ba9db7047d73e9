//! The mass-deletion guard (anchor: rclone bisync's `--max-delete`): a
//! sync that would delete more than a share of the tracked files, or every
//! file of a data folder, on either side, stops before changing anything.
//! An `rm -rf input/` here is published only when the user says so, and
//! one made by another client is not received unasked either.

use std::collections::BTreeMap;

use dsg_core::manifest::{Entry, Manifest};
use dsg_core::scan::LocalView;

use crate::sync::{plural, Plan};
use crate::{EngineError, Result};

/// The default `--max-delete`, as rclone's.
pub const DEFAULT_MAX_DELETE: u8 = 50;

/// Refuses `plan` when its deletions on one side exceed `max_percent` of
/// that side's tracked files, or empty a whole data folder there.
/// `max_percent` 100 lets everything through.
pub fn check(
    plan: &Plan,
    local: LocalView<'_>,
    remote: &Manifest,
    data_dirs: &std::collections::BTreeSet<String>,
    max_percent: u8,
) -> Result<()> {
    if max_percent >= 100 {
        return Ok(());
    }
    let sides = [
        (
            "in the repository (deleted here, published by this sync)",
            &plan.remote_deletions,
            remote.len(),
            &plan.uploads,
        ),
        (
            "here (deleted in the repository, received by this sync)",
            &plan.local_deletions,
            local.len(),
            &plan.downloads,
        ),
    ];
    for (side, (where_, deleted, before, added)) in sides.into_iter().enumerate() {
        if deleted.is_empty() {
            continue;
        }
        let total = before.max(1);
        let share = format!("{:.1}", deleted.len() as f64 * 100.0 / total as f64);
        let share = share.trim_end_matches(".0");
        let over = deleted.len() * 100 > total * max_percent as usize;
        let emptied = if side == 0 {
            emptied_folders(deleted, remote.entries(), added, data_dirs)
        } else {
            emptied_folders(deleted, local.iter(), added, data_dirs)
        };
        if !over && emptied.is_empty() {
            continue;
        }
        let mut what = format!(
            "this sync would delete {} of {} ({share} %) {where_}",
            plural(deleted.len(), "tracked file"),
            total
        );
        if !emptied.is_empty() {
            what.push_str(&format!(
                ", emptying the whole data folder{} {}",
                if emptied.len() == 1 { "" } else { "s" },
                emptied.join(", ")
            ));
        }
        return Err(EngineError::Blocked {
            message: format!("{what}; nothing was changed (the limit is {max_percent} %, or a whole data folder)"),
            hint: format!(
                "if that is what you want, run the sync again with --max-delete 100; otherwise bring the files back first ('dsg status' lists them){}",
                if std::ptr::eq(deleted, &plan.local_deletions) {
                    ", or ask who deleted them in the repository ('dsg log')"
                } else {
                    ""
                }
            ),
            paths: if emptied.is_empty() {
                deleted.iter().take(20).map(|p| p.to_string()).collect()
            } else {
                emptied
            },
        });
    }
    Ok(())
}

/// The data folders (a path up to its first component named in
/// `data_dirs`) whose every file in `before` is deleted and none added.
fn emptied_folders<'a>(
    deleted: &[std::sync::Arc<str>],
    before: impl IntoIterator<Item = &'a Entry>,
    added: &[std::sync::Arc<str>],
    data_dirs: &std::collections::BTreeSet<String>,
) -> Vec<String> {
    let root_of = |p: &str| -> Option<String> {
        if data_dirs.contains("*") {
            // Every top-level folder is a data folder; a file at the root
            // is not a folder.
            return p.split_once('/').map(|(top, _)| top.to_string());
        }
        let mut end = 0;
        for c in p.split('/') {
            end += c.len();
            if data_dirs.contains(c) {
                return Some(p[..end].to_string());
            }
            end += 1;
        }
        None
    };
    // Per data folder: (tracked files before, deleted).
    let mut count: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for e in before {
        if let Some(r) = root_of(&e.path) {
            count.entry(r).or_default().0 += 1;
        }
    }
    for p in deleted {
        if let Some(r) = root_of(p) {
            count.entry(r).or_default().1 += 1;
        }
    }
    for p in added {
        if let Some(r) = root_of(p) {
            // Something lands in it: not emptied.
            count.remove(&r);
        }
    }
    count
        .into_iter()
        .filter(|(_, (n, d))| *n > 0 && d >= n)
        .map(|(r, _)| format!("{r}/"))
        .collect()
}
