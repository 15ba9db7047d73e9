//! The project's record of its live `snapmount`s, and the cleanup of
//! mounts whose process died.
//!
//! A mount is recorded before it is made, in `.dsg/mounts/<id>/mount.json`
//! (its pid and that process's start time, the mountpoint, the kind, the
//! snapshot, a ZFS clone's name); a FUSE mount keeps its verified file
//! copies in `.dsg/mounts/<id>/cache/`. The record goes when the mount is
//! undone. A record whose process is gone (`kill -9`, a crash) is stale:
//! the next command's start-up recovery (`recover_stale`, run from
//! `recover::recover_init`) lazily unmounts the FUSE filesystem
//! (`fusermount -u -z`), or has the repository's agent destroy the clone
//! (a clone's name carries its owner's pid, and the agent's recovery
//! destroys those whose owner died), then removes the record.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use dsg_repo::RepoClient;

use crate::project::DSG_DIR;

/// How a snapshot is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MountKind {
    /// A read-only FUSE filesystem served by the snapmount process.
    Fuse,
    /// A read-only clone of the ZFS snapshot, mounted by ZFS (local ZFS
    /// repositories).
    ZfsClone,
}

impl MountKind {
    pub fn label(self) -> &'static str {
        match self {
            MountKind::Fuse => "fuse",
            MountKind::ZfsClone => "zfs-clone",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountRecord {
    pub id: String,
    /// The process serving (FUSE) or holding (ZFS) the mount.
    pub pid: u32,
    /// Its start time (clock ticks since boot, /proc/PID/stat field 22),
    /// so that a reused pid is not taken for the owner.
    pub start_ticks: Option<u64>,
    /// Absolute.
    pub mountpoint: PathBuf,
    pub kind: MountKind,
    pub snapshot: String,
    /// The clone's dataset (`POOL/NAME--mount-p<pid>-<id>`), once made.
    #[serde(default)]
    pub clone: Option<String>,
}

/// `.dsg/mounts` of the project at `root`.
pub fn mounts_dir(root: &Path) -> PathBuf {
    root.join(DSG_DIR).join("mounts")
}

/// The start time of process `pid` (None: no such process, or one that
/// has exited and waits to be reaped).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let mut rest = s[s.rfind(')')? + 1..].split_whitespace();
    if matches!(rest.next(), Some("Z") | Some("X")) {
        return None;
    }
    rest.nth(18)?.parse().ok()
}

impl MountRecord {
    /// A record for this process.
    pub fn new(kind: MountKind, mountpoint: &Path, snapshot: &str) -> MountRecord {
        let pid = std::process::id();
        MountRecord {
            id: format!(
                "m{}-{}",
                pid,
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            pid,
            start_ticks: start_ticks(pid),
            mountpoint: mountpoint.to_path_buf(),
            kind,
            snapshot: snapshot.into(),
            clone: None,
        }
    }

    /// Whether the owning process still runs (same pid, same start time).
    pub fn owner_alive(&self) -> bool {
        match (start_ticks(self.pid), self.start_ticks) {
            (None, _) => false,
            (Some(now), Some(then)) => now == then,
            (Some(_), None) => true,
        }
    }

    /// Its folder: `.dsg/mounts/<id>`.
    pub fn dir(&self, root: &Path) -> PathBuf {
        mounts_dir(root).join(&self.id)
    }

    /// Where a FUSE mount keeps its verified copies (private to the user).
    pub fn cache_dir(&self, root: &Path) -> PathBuf {
        self.dir(root).join("cache")
    }

    /// Writes (or rewrites) the record; makes its folder and cache.
    pub fn save(&self, root: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.dir(root);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.cache_dir(root))?;
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        dsg_core::atomic::write_atomic(&dir.join("mount.json"), &bytes)
            .map_err(|e| std::io::Error::new(e.source.kind(), e.to_string()))
    }

    /// Removes the record and its cache.
    pub fn remove(&self, root: &Path) {
        let _ = std::fs::remove_dir_all(self.dir(root));
    }
}

/// Every record of the project (unreadable ones are skipped and reported).
pub fn list(root: &Path) -> Vec<MountRecord> {
    let Ok(rd) = std::fs::read_dir(mounts_dir(root)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for d in rd.flatten() {
        let p = d.path().join("mount.json");
        match std::fs::read(&p)
            .ok()
            .and_then(|b| serde_json::from_slice::<MountRecord>(&b).ok())
        {
            Some(r) if r.id == d.file_name().to_string_lossy() => out.push(r),
            _ => {
                // A folder without a record: a mount being set up by a live
                // process has written its record first, so this is debris
                // (unless it is very young).
                let young = d
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_none_or(|a| a.as_secs() < 60);
                if !young {
                    let _ = std::fs::remove_dir_all(d.path());
                }
            }
        }
    }
    out
}

/// Whether `dir` is a mountpoint now (`/proc/self/mountinfo`).
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape_mountinfo(mp) == want)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The fusermount of this machine (`fusermount3`, else `fusermount`).
pub fn fusermount() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    for name in ["fusermount3", "fusermount"] {
        for d in std::env::split_paths(&path) {
            let p = d.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Unmounts a FUSE mount; `lazy` detaches it even while it is busy (or
/// its server is dead). Not mounted is success.
pub fn fuse_unmount(dir: &Path, lazy: bool) -> Result<(), String> {
    if !is_mounted(dir) {
        return Ok(());
    }
    let Some(fm) = fusermount() else {
        // root can do without it.
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|e| e.to_string())?;
        if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
            return Ok(());
        }
        return Err(format!(
            "cannot unmount {}: {} (and no fusermount3 or fusermount on PATH)",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    };
    let mut cmd = std::process::Command::new(&fm);
    cmd.arg("-u").arg("-q");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd
        .arg("--")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", fm.display()))?;
    if out.status.success() || !is_mounted(dir) {
        Ok(())
    } else {
        Err(format!(
            "{} -u {} failed: {}",
            fm.display(),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Undoes the mount of a record whose process is gone, then removes the
/// record. `connect` reaches the repository (a ZFS clone is destroyed by
/// its agent's recovery). Returns what could not be cleaned.
pub fn clean_dead(
    root: &Path,
    rec: &MountRecord,
    connect: &mut dyn FnMut() -> Option<RepoClient>,
) -> Result<(), String> {
    match rec.kind {
        MountKind::Fuse => fuse_unmount(&rec.mountpoint, true)?,
        MountKind::ZfsClone => {
            // The agent destroys clones whose owner died (its name carries
            // the owner's pid) when it recovers.
            let Some(mut c) = connect() else {
                return Err(format!(
                    "the clone mounted at {} could not be destroyed: the repository is unreachable",
                    rec.mountpoint.display()
                ));
            };
            let r = c.recover();
            let _ = c.close();
            r.map_err(|e| e.to_string())?;
            if is_mounted(&rec.mountpoint) {
                return Err(format!(
                    "{} is still mounted after the repository's recovery",
                    rec.mountpoint.display()
                ));
            }
        }
    }
    rec.remove(root);
    Ok(())
}

/// Start-up recovery: every mount whose owner died is undone. Failures
/// are warnings (the record stays for the next command).
pub fn recover_stale(root: &Path, connect: &mut dyn FnMut() -> Option<RepoClient>) {
    for rec in list(root) {
        if rec.owner_alive() {
            continue;
        }
        tracing::info!(
            "removing the snapmount of {} at {}: its process {} is gone",
            rec.snapshot,
            rec.mountpoint.display(),
            rec.pid
        );
        if let Err(e) = clean_dead(root, &rec, connect) {
            tracing::warn!("a dead snapmount is left: {e}");
        }
    }
}
