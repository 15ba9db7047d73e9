//! `ListRepos`: the repositories in one directory of the repository host,
//! for `dsg list-repos`. The agent serves it for the directory it was
//! started on (`dsg agent --repo DIR`, checked by `--restrict-to` like any
//! repository), never for a path the client names, and reads only each
//! child's head manifest.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use dsg_core::manifest::{EntryKind, Manifest};
use serde::{Deserialize, Serialize};

use crate::backend::AgentError;
use crate::protocol::MAX_MANIFEST_BYTES;

/// At most this many repositories are listed (the answer is one frame).
pub const MAX_REPOS: usize = 10_000;

/// One repository of a `ListRepos` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepoInfo {
    pub name: String,
    /// `xfs` (a directory) or `zfs` (a mounted ZFS dataset).
    #[serde(rename = "type")]
    pub kind: String,
    /// `active` (it has a head), `uninitialized` (a `.dsg/` without a
    /// manifest) or `error` (the manifest cannot be read).
    pub status: String,
    pub snapshot_id: Option<String>,
    /// The head's `created_at`, as the manifest records it.
    pub timestamp: Option<String>,
    pub file_count: Option<u64>,
    /// Bytes of the head's files (links count nothing).
    pub size: Option<u64>,
    pub error: Option<String>,
}

/// Mount points of ZFS filesystems (zfs, or zfs-fuse's `fuse.zfs`), from
/// /proc/self/mountinfo (octal escapes undone).
fn zfs_mounts() -> Vec<String> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let unescape = |s: &str| {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\' && i + 4 <= b.len() {
                let code = std::str::from_utf8(&b[i + 1..i + 4])
                    .ok()
                    .and_then(|d| u8::from_str_radix(d, 8).ok());
                if let Some(v) = code {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).to_string()
    };
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mnt = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            (fstype == "zfs" || fstype.starts_with("fuse.zfs")).then(|| unescape(mnt))
        })
        .collect()
}

/// Reads `<child>/.dsg/last-sync.json` without following a symlink on the
/// way (the child itself was checked to be a directory, not a link).
fn read_head(child: &Path) -> Result<Option<Manifest>, String> {
    let dsg = child.join(".dsg");
    match fs::symlink_metadata(&dsg) {
        Ok(md) if md.is_dir() => {}
        _ => return Err(".dsg is not a directory".into()),
    }
    let p = dsg.join("last-sync.json");
    let f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&p)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!(".dsg/last-sync.json: {e}")),
    };
    let md = f.metadata().map_err(|e| e.to_string())?;
    if !md.is_file() {
        return Err(".dsg/last-sync.json is not a regular file".into());
    }
    if md.len() > MAX_MANIFEST_BYTES {
        return Err(format!(
            ".dsg/last-sync.json is larger than {MAX_MANIFEST_BYTES} bytes"
        ));
    }
    let mut bytes = Vec::with_capacity(md.len() as usize);
    File::take(f, MAX_MANIFEST_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| format!(".dsg/last-sync.json: {e}"))?;
    Manifest::from_json_bytes(&bytes, &p)
        .map(Some)
        .map_err(|e| e.to_string())
}

pub(crate) fn info_of(name: &str, kind: &str, head: Result<Option<Manifest>, String>) -> RepoInfo {
    let mut info = RepoInfo {
        name: name.into(),
        kind: kind.into(),
        status: "uninitialized".into(),
        snapshot_id: None,
        timestamp: None,
        file_count: None,
        size: None,
        error: None,
    };
    match head {
        Ok(None) => {}
        Err(e) => {
            info.status = "error".into();
            info.error = Some(e);
        }
        Ok(Some(m)) => match &m.metadata {
            None => {
                info.status = "error".into();
                info.error = Some("the head manifest has no metadata".into());
            }
            Some(md) => {
                info.status = "active".into();
                info.snapshot_id = Some(md.snapshot_id.clone());
                info.timestamp = Some(md.created_at.clone());
                info.file_count = Some(m.len() as u64);
                info.size = Some(
                    m.entries()
                        .iter()
                        .map(|e| match e.kind {
                            EntryKind::File { size, .. } => size,
                            EntryKind::Link { .. } => 0,
                        })
                        .sum(),
                );
            }
        },
    }
    info
}

/// The repositories directly in `dir`: its children (not hidden, not
/// symlinks) that hold a `.dsg/` folder, sorted by name.
pub fn list_dir(dir: &Path) -> Result<Vec<RepoInfo>, AgentError> {
    let rd =
        fs::read_dir(dir).map_err(|e| AgentError::io(format!("listing {}", dir.display()), e))?;
    let real = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let zfs = zfs_mounts();
    let mut out = Vec::new();
    for de in rd.flatten() {
        let Some(name) = de.file_name().to_str().map(String::from) else {
            continue;
        };
        if name.starts_with('.') || !de.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let child = dir.join(&name);
        if !fs::symlink_metadata(child.join(".dsg")).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let mounted = real.join(&name).to_string_lossy().to_string();
        let kind = if zfs.contains(&mounted) { "zfs" } else { "xfs" };
        out.push(info_of(&name, kind, read_head(&child)));
        if out.len() >= MAX_REPOS {
            break;
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
