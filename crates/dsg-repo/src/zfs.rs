//! ZFS: the dataset is the repository, and a clone is the transaction.
//!
//! A sync clones `POOL/NAME@sK` (the head) to `POOL/NAME--tx-<id>`, writes
//! the verified staged changes and the new metadata into the clone,
//! snapshots it as `@sK+1`, promotes it and swaps names, so `POOL/NAME`
//! becomes the new state holding `@s1 … @sK+1`; the old dataset is
//! destroyed. Rollback destroys the clone. Snapshot names are the logical
//! snapshot ids.
//!
//! Every step is journaled in `<mountpoint>/.dsg-zfs.<name>.journal`
//! (outside the dataset, which is renamed under us). The commit point is the
//! `committed` record, written after the new snapshot exists. Recovery
//! before it destroys the clone; after it, it finishes the swap. Each swap
//! step checks the actual state first (names, origins), so a crash between
//! any two `zfs` commands recovers to exactly the old or the new state —
//! never a missing dataset.
//!
//! `zfs` runs with argument vectors (never a shell string) and a timeout;
//! its errors carry the command, and a permission error names the
//! `zfs allow` that grants the right (no sudo, G6).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use dsg_txn::failpoint::failpoint;
use dsg_txn::{Journal, Log, Op, Record};

use crate::backend::AgentError;
use crate::protocol::ErrorKind;
use crate::site::{
    is_base, list_staged, list_staged_flat, remove_dir_all_if_exists, repo_name_of, syncfs, Lock,
    LockMode, Site,
};
use crate::store::{Resumable, SnapshotTree, Store, TxRef};

#[derive(Debug, Clone)]
pub struct Zfs {
    pub pool: String,
    pub name: String,
    pub mountpoint: PathBuf,
    timeout: Duration,
}

/// What the ZFS journal remembers of a `begin`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ZBegin {
    /// The transaction's dataset.
    pub clone: String,
    /// The head snapshot it was cloned from (empty for a replacing init).
    pub base: String,
    /// An init replacing the live dataset (`init --force`, confirmed):
    /// `clone` is a new dataset, not a clone, and rolling back destroys
    /// it all the same; past the commit point the swap is a sync's.
    #[serde(default)]
    pub replace: bool,
}

/// The commit point of a ZFS transaction is its `committed` record,
/// written once the clone holds the new snapshot (`snap`).
pub type ZRecord = Record<ZBegin>;
type ZLog = Log<ZBegin>;

impl Zfs {
    pub fn new(pool: &str, repo_dir: &Path) -> Result<Zfs, AgentError> {
        let name = repo_name_of(repo_dir)?;
        let secs = std::env::var("DSG_ZFS_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120.0);
        Ok(Zfs {
            pool: pool.to_string(),
            name,
            mountpoint: repo_dir.parent().unwrap_or(Path::new("/")).to_path_buf(),
            timeout: Duration::from_secs_f64(secs),
        })
    }

    /// `POOL/NAME`.
    pub fn dataset(&self) -> String {
        format!("{}/{}", self.pool, self.name)
    }

    pub fn tx_dataset(&self, tx: &str) -> String {
        format!("{}--{}", self.dataset(), tx)
    }

    pub fn tx_mountpoint(&self, tx: &str) -> PathBuf {
        self.mountpoint
            .join(format!(".dsg-tx.{}.{}", self.name, tx))
    }

    /// The journal's records, if it exists and reads.
    pub fn journal(&self) -> Option<Vec<ZRecord>> {
        self.log().map(|l| l.records)
    }

    fn log(&self) -> Option<ZLog> {
        ZLog::read(&self.journal_path()).ok().flatten()
    }

    pub fn journal_path(&self) -> PathBuf {
        self.mountpoint
            .join(format!(".dsg-zfs.{}.journal", self.name))
    }

    pub fn lock_path(&self) -> PathBuf {
        self.mountpoint.join(format!(".dsg-zfs.{}.lock", self.name))
    }

    /// Runs `zfs ARGS…`, with a timeout; returns stdout. "Busy" is retried
    /// for a while: FUSE (zfs-fuse) releases closed files asynchronously, so
    /// a rename right after writing can briefly find the dataset busy.
    pub fn run(&self, args: &[&str]) -> Result<String, AgentError> {
        let mut attempt = 0;
        loop {
            match self.run_once(args) {
                Err(e) if e.message.contains("busy") && attempt < 40 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(25 * attempt.min(8)));
                }
                r => return r,
            }
        }
    }

    fn run_once(&self, args: &[&str]) -> Result<String, AgentError> {
        let shown = format!("zfs {}", args.join(" "));
        tracing::debug!("{shown}");
        let mut child = Command::new("zfs")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                AgentError::new(ErrorKind::Io, format!("cannot run `{shown}`: {e}"))
                    .hint("install ZFS on the repository host (Debian: zfsutils-linux or zfs-fuse)")
            })?;
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let t_out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let t_err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if start.elapsed() > self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(AgentError::new(
                        ErrorKind::Io,
                        format!("`{shown}` did not finish within {:?}", self.timeout),
                    )
                    .hint("check the ZFS daemon on the repository host; DSG_ZFS_TIMEOUT sets the limit in seconds"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(AgentError::io(format!("waiting for `{shown}`"), e)),
            }
        };
        let stdout = t_out.join().unwrap_or_default();
        let stderr = t_err.join().unwrap_or_default();
        if status.success() {
            return Ok(stdout);
        }
        let msg = stderr.trim();
        let mut e = AgentError::new(ErrorKind::Io, format!("`{shown}` failed: {msg}"));
        if msg.contains("permission denied") || msg.contains("Permission denied") {
            let user = std::env::var("USER").unwrap_or_else(|_| "<user>".into());
            e = e.hint(format!(
                "grant the right without sudo: zfs allow {user} create,mount,snapshot,clone,promote,rename,destroy,mountpoint {}",
                self.pool
            ));
        }
        Err(e)
    }

    pub fn exists(&self, ds: &str) -> Result<bool, AgentError> {
        match self.run(&["list", "-H", "-o", "name", ds]) {
            Ok(_) => Ok(true),
            Err(e) if e.message.contains("does not exist") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The origin snapshot of a clone, `None` for a dataset that is not one.
    pub fn origin(&self, ds: &str) -> Result<Option<String>, AgentError> {
        let v = self.run(&["get", "-H", "-o", "value", "origin", ds])?;
        let v = v.trim();
        Ok((!v.is_empty() && v != "-").then(|| v.to_string()))
    }

    pub fn snapshots(&self, ds: &str) -> Result<Vec<String>, AgentError> {
        let out = self.run(&["list", "-H", "-t", "snapshot", "-o", "name", "-r", ds])?;
        Ok(out
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{ds}@")).map(String::from))
            .collect())
    }

    fn set_mountpoint(&self, ds: &str, mp: &str) -> Result<(), AgentError> {
        self.run(&["set", &format!("mountpoint={mp}"), ds])
            .map(|_| ())
    }

    /// zfs-fuse does not remount a renamed dataset, and cannot rename one
    /// that is mounted inside the pool's own mount: unmount around renames
    /// and mount explicitly afterwards.
    fn unmount(&self, ds: &str) -> Result<(), AgentError> {
        match self.run(&["umount", ds]) {
            Ok(_) => Ok(()),
            Err(e)
                if e.message.contains("not currently mounted")
                    || e.message.contains("not mounted") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn ensure_mounted(&self, ds: &str) -> Result<(), AgentError> {
        let mounted = self.run(&["get", "-H", "-o", "value", "mounted", ds])?;
        if mounted.trim() != "yes" {
            match self.run(&["mount", ds]) {
                Ok(_) => {}
                Err(e) if e.message.contains("already mounted") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn mountpoint_of(&self, ds: &str) -> Result<String, AgentError> {
        Ok(self
            .run(&["get", "-H", "-o", "value", "mountpoint", ds])?
            .trim()
            .to_string())
    }

    /// Creates a new dataset for an init, mounted at a staging path.
    pub fn create_init(&self, tx: &str) -> Result<PathBuf, AgentError> {
        let mp = self.tx_mountpoint(tx);
        self.run(&[
            "create",
            "-o",
            &format!("mountpoint={}", mp.display()),
            &self.tx_dataset(tx),
        ])?;
        Ok(mp)
    }

    /// Init's commit: snapshot `@s1`, then the rename into place (the
    /// commit point), then the final mountpoint.
    pub fn commit_init(&self, tx: &str) -> Result<(), AgentError> {
        let ds = self.tx_dataset(tx);
        self.run(&["snapshot", &format!("{ds}@s1")])?;
        failpoint("zfs.init.snapshot");
        self.unmount(&ds)?;
        self.run(&["rename", &ds, &self.dataset()])?;
        failpoint("zfs.init.rename");
        self.set_mountpoint(
            &self.dataset(),
            &self.mountpoint.join(&self.name).to_string_lossy(),
        )?;
        self.ensure_mounted(&self.dataset())?;
        let _ = std::fs::remove_dir(self.tx_mountpoint(tx));
        Ok(())
    }

    /// Begins an init that replaces the live dataset: journal first (so a
    /// crash anywhere is recovered), then a new, empty dataset.
    pub fn create_replace(&self, tx: &str) -> Result<PathBuf, AgentError> {
        let j = Journal::create(&self.journal_path())
            .map_err(|e| AgentError::io("cannot create the zfs journal", e))?;
        j.append(&ZRecord::Begin {
            tx: tx.into(),
            begin: ZBegin {
                clone: self.tx_dataset(tx),
                base: String::new(),
                replace: true,
            },
        })
        .map_err(|e| AgentError::io("cannot write the zfs journal", e))?;
        failpoint("zfs.replace.journal");
        self.create_init(tx)
    }

    /// The replacing init's commit: `@s1` on the new dataset, the
    /// `committed` record (the commit point), then the same guarded swap
    /// as a sync (no promote: the new dataset is not a clone).
    pub fn commit_replace(&self, tx: &str) -> Result<(), AgentError> {
        self.commit(tx, "s1")
    }

    /// Removes datasets of inits that never committed and history-read
    /// clones whose reader died, and fixes the mountpoint of an init that
    /// committed but did not finish.
    pub fn cleanup_init(&self) -> Result<(), AgentError> {
        let prefix = format!("{}--tx-", self.dataset());
        let read_prefix = format!("{}--read-p", self.dataset());
        let mount_prefix = format!("{}--mount-p", self.dataset());
        let children = self.children()?;
        for ds in &children {
            if let Some(rest) = ds.strip_prefix(&mount_prefix) {
                // A snapmount's clone: destroyed once its owner died. Best
                // effort: a shell still inside the mount keeps it busy,
                // and the next command tries again (its marker stays).
                let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
                if pid.is_some_and(|p| !process_alive(p)) {
                    tracing::info!("destroying {ds}, left by a snapmount that was killed");
                    match self.run(&["destroy", "-r", ds]) {
                        Ok(_) => {
                            let id = &ds[self.dataset().len() + 2..];
                            let _ = std::fs::remove_dir(self.tx_mountpoint(id));
                        }
                        Err(e) => tracing::warn!("cannot destroy {ds} yet: {}", e.message),
                    }
                }
                continue;
            }
            if let Some(rest) = ds.strip_prefix(&read_prefix) {
                let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
                if pid.is_some_and(|p| !process_alive(p)) {
                    tracing::info!("destroying {ds}, left by a history read that was killed");
                    self.run(&["destroy", "-r", ds])?;
                    if let Some(id) = ds.strip_prefix(&format!("{}--", self.dataset())) {
                        let _ = std::fs::remove_dir(self.tx_mountpoint(id));
                    }
                }
                continue;
            }
            if ds.starts_with(&prefix) && self.origin(ds)?.is_none() && !self.journal_mentions(ds) {
                self.run(&["destroy", "-r", ds])?;
                if let Some(tx) = ds.strip_prefix(&format!("{}--", self.dataset())) {
                    let _ = std::fs::remove_dir(self.tx_mountpoint(tx));
                }
            }
        }
        // Markers of snapmount clones never made (a snapmount killed
        // between the two) or already destroyed.
        let marker = format!(".dsg-tx.{}.mount-p", self.name);
        if let Ok(rd) = std::fs::read_dir(&self.mountpoint) {
            for d in rd.flatten() {
                let n = d.file_name().to_string_lossy().to_string();
                let Some(rest) = n.strip_prefix(&marker) else {
                    continue;
                };
                let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
                let id = &n[format!(".dsg-tx.{}.", self.name).len()..];
                if pid.is_some_and(|p| !process_alive(p))
                    && !children.contains(&self.tx_dataset(id))
                {
                    let _ = std::fs::remove_dir(d.path());
                }
            }
        }
        if self.exists(&self.dataset())? {
            let want = self
                .mountpoint
                .join(&self.name)
                .to_string_lossy()
                .to_string();
            if self.mountpoint_of(&self.dataset())? != want {
                self.set_mountpoint(&self.dataset(), &want)?;
            }
            self.ensure_mounted(&self.dataset())?;
        }
        Ok(())
    }

    fn journal_mentions(&self, ds: &str) -> bool {
        self.log()
            .is_some_and(|l| l.begin().is_some_and(|(_, b)| b.clone == ds))
    }

    fn children(&self) -> Result<Vec<String>, AgentError> {
        let out = self.run(&[
            "list",
            "-H",
            "-o",
            "name",
            "-r",
            "-t",
            "filesystem",
            &self.pool,
        ])?;
        Ok(out.lines().map(String::from).collect())
    }

    /// Begins a sync: journal, then clone the head snapshot.
    pub fn begin(&self, tx: &str, base: &str) -> Result<PathBuf, AgentError> {
        let clone = self.tx_dataset(tx);
        let j = Journal::create(&self.journal_path())
            .map_err(|e| AgentError::io("cannot create the zfs journal", e))?;
        j.append(&ZRecord::Begin {
            tx: tx.into(),
            begin: ZBegin {
                clone: clone.clone(),
                base: base.into(),
                replace: false,
            },
        })
        .map_err(|e| AgentError::io("cannot write the zfs journal", e))?;
        failpoint("zfs.journal.begin");
        let mp = self.tx_mountpoint(tx);
        self.run(&[
            "clone",
            "-o",
            &format!("mountpoint={}", mp.display()),
            &format!("{}@{base}", self.dataset()),
            &clone,
        ])?;
        failpoint("zfs.clone");
        Ok(mp)
    }

    /// Whether the journal holds a transaction past its commit point that
    /// is not finished (the swap still to complete).
    pub fn has_unfinished_commit(&self) -> bool {
        self.log().is_some_and(|l| l.unfinished_commit().is_some())
    }

    /// Whether the journal records transaction `tx` as committed.
    pub fn is_committed(&self, tx: &str) -> bool {
        self.log().is_some_and(|l| {
            l.records
                .iter()
                .any(|r| matches!(r, ZRecord::Committed { tx: t, .. } if t == tx))
        })
    }

    /// Snapshots the clone and passes the commit point.
    pub fn commit(&self, tx: &str, snap: &str) -> Result<(), AgentError> {
        let clone = self.tx_dataset(tx);
        self.run(&["snapshot", &format!("{clone}@{snap}")])?;
        failpoint("zfs.snapshot");
        let j = Journal::open(&self.journal_path())
            .map_err(|e| AgentError::io("cannot open the zfs journal", e))?;
        j.append(&ZRecord::Committed {
            tx: tx.into(),
            ops: Vec::new(),
            snap: Some(snap.into()),
        })
        .map_err(|e| AgentError::io("cannot write the zfs journal", e))?;
        failpoint("zfs.journal.committed");
        self.finish(tx)?;
        j.append(&ZRecord::Done { tx: tx.into() })
            .map_err(|e| AgentError::io("cannot write the zfs journal", e))?;
        failpoint("zfs.journal.done");
        let _ = std::fs::remove_file(self.journal_path());
        Ok(())
    }

    /// The swap after the commit point, each step guarded by the state it
    /// finds, so it can run again after a crash anywhere inside it.
    fn finish(&self, tx: &str) -> Result<(), AgentError> {
        let clone = self.tx_dataset(tx);
        let live = self.dataset();
        let old = format!("{live}--old-{tx}");
        let final_mp = self
            .mountpoint
            .join(&self.name)
            .to_string_lossy()
            .to_string();
        if self.exists(&clone)? && self.origin(&clone)?.is_some() {
            self.run(&["promote", &clone])?;
        }
        failpoint("zfs.promote");
        if self.exists(&clone)? && self.exists(&live)? {
            // The live dataset is now a clone of ours: move it aside.
            self.unmount(&live)?;
            self.run(&["rename", &live, &old])?;
            failpoint("zfs.rename_old");
        }
        if self.exists(&old)? && self.mountpoint_of(&old)? != "none" {
            self.set_mountpoint(&old, "none")?;
            failpoint("zfs.unmount_old");
        }
        if self.exists(&clone)? && !self.exists(&live)? {
            self.unmount(&clone)?;
            self.run(&["rename", &clone, &live])?;
            failpoint("zfs.rename_new");
        }
        if self.mountpoint_of(&live)? != final_mp {
            self.set_mountpoint(&live, &final_mp)?;
            failpoint("zfs.mount_new");
        }
        self.ensure_mounted(&live)?;
        if self.exists(&old)? {
            // After a replace the old dataset keeps its snapshots (nothing
            // was promoted), and history reads may have cloned them: those
            // clones go with the history they show.
            let read_prefix = format!("{live}--read-p");
            for ds in self.children()? {
                if ds.starts_with(&read_prefix)
                    && self
                        .origin(&ds)?
                        .is_some_and(|o| o.starts_with(&format!("{old}@")))
                {
                    // Best effort: a reader still inside it keeps it busy;
                    // then the destroy below fails, and a later recovery
                    // (after the reader closed it) finishes.
                    if self.run(&["destroy", "-r", &ds]).is_ok() {
                        if let Some(id) = ds.strip_prefix(&format!("{live}--")) {
                            let _ = std::fs::remove_dir(self.tx_mountpoint(id));
                        }
                    }
                }
            }
            self.run(&["destroy", "-r", &old])?;
            failpoint("zfs.destroy_old");
        }
        let _ = std::fs::remove_dir(self.tx_mountpoint(tx));
        Ok(())
    }

    /// Destroys the clone of an uncommitted transaction.
    pub fn rollback(&self, tx: &str) -> Result<(), AgentError> {
        let clone = self.tx_dataset(tx);
        // A replacing init's dataset is new (no origin) and, before the
        // commit point, never live: it may be destroyed.
        let replacing = self
            .log()
            .is_some_and(|l| l.begin().is_some_and(|(t, b)| t == tx && b.replace));
        if self.exists(&clone)? {
            // A promoted clone is the live data: never destroy that here.
            if !replacing && self.origin(&clone)?.is_none() {
                return Err(AgentError::new(
                    ErrorKind::Corrupt,
                    format!("{clone} is not a clone any more; refusing to destroy it"),
                )
                .hint("run any dsg command again: recovery finishes a promoted transaction"));
            }
            self.run(&["destroy", "-r", &clone])?;
        }
        let _ = std::fs::remove_dir(self.tx_mountpoint(tx));
        let _ = std::fs::remove_file(self.journal_path());
        Ok(())
    }

    /// Finishes or undoes whatever the journal says was interrupted.
    pub fn recover(&self) -> Result<(), AgentError> {
        let Some(log) = ZLog::read(&self.journal_path())
            .map_err(|e| AgentError::io("cannot read the zfs journal", e))?
        else {
            return self.cleanup_init();
        };
        let Some(tx) = log.begin().map(|(tx, _)| tx.to_string()) else {
            let _ = std::fs::remove_file(self.journal_path());
            return Ok(());
        };
        let committed = log.is_committed();
        if log.unfinished_commit().is_some() {
            tracing::info!("finishing an interrupted zfs transaction {tx}");
            self.finish(&tx)?;
            let _ = std::fs::remove_file(self.journal_path());
        } else if !committed {
            tracing::info!("rolling back an interrupted zfs transaction {tx}");
            self.rollback(&tx)?;
        } else {
            let _ = std::fs::remove_file(self.journal_path());
        }
        self.cleanup_init()
    }

    /// Mounts snapshot `snap` read-only for a history read: through a
    /// temporary clone (zfs-fuse has no visible `.zfs/snapshot`). The clone
    /// is destroyed when the guard drops.
    pub fn open_snapshot(&self, snap: &str) -> Result<SnapshotView, AgentError> {
        let visible = self
            .mountpoint
            .join(&self.name)
            .join(".zfs/snapshot")
            .join(snap);
        if visible.is_dir() {
            return Ok(SnapshotView {
                path: visible,
                clone: None,
                zfs: self.clone(),
            });
        }
        // The pid lets recovery tell a clone whose reader was killed (to
        // destroy) from one still being read (to leave alone).
        let id = format!(
            "read-p{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        let ds = self.tx_dataset(&id);
        let mp = self.tx_mountpoint(&id);
        self.run(&[
            "clone",
            "-o",
            "readonly=on",
            "-o",
            &format!("mountpoint={}", mp.display()),
            &format!("{}@{snap}", self.dataset()),
            &ds,
        ])?;
        Ok(SnapshotView {
            path: mp,
            clone: Some(ds),
            zfs: self.clone(),
        })
    }
}

/// A snapmount's clone, unmounted and destroyed when dropped.
struct MountClone {
    zfs: Zfs,
    id: String,
}

impl Drop for MountClone {
    fn drop(&mut self) {
        let ds = self.zfs.tx_dataset(&self.id);
        match self.zfs.run(&["destroy", "-r", &ds]) {
            Ok(_) => {
                let _ = std::fs::remove_dir(self.zfs.tx_mountpoint(&self.id));
            }
            Err(e) if e.message.contains("does not exist") => {
                let _ = std::fs::remove_dir(self.zfs.tx_mountpoint(&self.id));
            }
            Err(e) => tracing::warn!(
                "cannot destroy {ds}: {} (the next command retries once this process ended)",
                e.message
            ),
        }
    }
}

impl Zfs {
    /// `snapmount`: a read-only clone of `@snap` mounted at `mountpoint`
    /// (absolute, an empty folder, not a symlink), named by us:
    /// `POOL/NAME--mount-p<pid>-<id>`. The pid lets recovery destroy the
    /// clone of a snapmount that was killed; an empty marker folder
    /// `<mountpoint>/.dsg-tx.NAME.mount-p<pid>-<id>` beside the dataset
    /// (made first, removed last) makes the next command's recovery look.
    pub fn mount_clone(
        &self,
        snap: &str,
        mountpoint: &Path,
    ) -> Result<(String, Box<dyn Send>), AgentError> {
        let bad = |why: &str| {
            AgentError::new(
                ErrorKind::Unsafe,
                format!("cannot mount at {}: {why}", mountpoint.display()),
            )
        };
        if !mountpoint.is_absolute() {
            return Err(bad("not an absolute path"));
        }
        let md = std::fs::symlink_metadata(mountpoint)
            .map_err(|e| AgentError::io(mountpoint.display(), e))?;
        if !md.is_dir() {
            return Err(bad("not a directory"));
        }
        let mut rd =
            std::fs::read_dir(mountpoint).map_err(|e| AgentError::io(mountpoint.display(), e))?;
        if rd.next().is_some() {
            return Err(bad("not empty"));
        }
        let origin = format!("{}@{snap}", self.dataset());
        if !self.snapshots(&self.dataset())?.iter().any(|s| s == snap) {
            return Err(AgentError::new(
                ErrorKind::NotFound,
                format!("snapshot {origin} does not exist"),
            )
            .hint("dsg log lists the snapshots"));
        }
        let id = format!(
            "mount-p{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let dataset = self.tx_dataset(&id);
        let marker = self.tx_mountpoint(&id);
        std::fs::create_dir(&marker).map_err(|e| AgentError::io(marker.display(), e))?;
        let guard = MountClone {
            zfs: self.clone(),
            id,
        };
        self.run(&[
            "clone",
            "-o",
            "readonly=on",
            "-o",
            &format!("mountpoint={}", mountpoint.display()),
            &origin,
            &dataset,
        ])?;
        if let Err(e) = self.ensure_mounted(&dataset) {
            drop(guard);
            return Err(e);
        }
        Ok((dataset, Box::new(guard)))
    }
}

/// Whether process `pid` exists on this machine (the agent runs on the
/// repository host, where the reader ran).
fn process_alive(pid: i32) -> bool {
    match rustix::process::Pid::from_raw(pid) {
        Some(p) => !matches!(
            rustix::process::test_kill_process(p),
            Err(rustix::io::Errno::SRCH)
        ),
        None => false,
    }
}

/// A snapshot's files, readable at `path` while this lives.
pub struct SnapshotView {
    pub path: PathBuf,
    clone: Option<String>,
    zfs: Zfs,
}

impl Drop for SnapshotView {
    fn drop(&mut self) {
        if let Some(ds) = self.clone.take() {
            let _ = self.zfs.run(&["destroy", &ds]);
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

/// A ZFS dataset is a repository whose transactions are clones: see the
/// module's header.
impl Store for Zfs {
    fn describe(&self, site: &Site) -> String {
        format!("zfs {} at {}", self.dataset(), site.dir().display())
    }

    /// One lock beside the dataset (which is renamed during a commit)
    /// serialises writers and inits alike.
    fn repo_lock(&self, _site: &Site) -> PathBuf {
        self.lock_path()
    }

    fn init_lock(&self, _site: &Site) -> PathBuf {
        self.lock_path()
    }

    fn keeps_objects(&self) -> bool {
        false
    }

    fn swaps(&self) -> bool {
        true
    }

    fn recover_locked(&self, _site: &Site) -> Result<(), AgentError> {
        Zfs::recover(self)
    }

    fn recover(&self, site: &Site) -> Result<(), AgentError> {
        // A dataset that is not mounted where it belongs (a crash between a
        // rename and its mount) also needs recovery.
        let prefix = format!(".dsg-tx.{}.", site.name);
        let pending = self.journal_path().exists()
            || !site.dsg().is_dir()
            || site
                .mountpoint
                .read_dir()
                .map(|rd| {
                    rd.flatten()
                        .any(|d| d.file_name().to_string_lossy().starts_with(&prefix))
                })
                .unwrap_or(false);
        let unfinished = || self.has_unfinished_commit();
        if pending && site.may_recover(&site.mountpoint, &self.lock_path(), &unfinished)? {
            if let Some(_lock) = site.take_flock(&self.lock_path(), LockMode::Exclusive, false)? {
                Zfs::recover(self)?;
            }
        }
        Ok(())
    }

    fn begin_init(&self, site: &Site, tx: &str) -> Result<PathBuf, AgentError> {
        Zfs::recover(self)?;
        let ds = self.dataset();
        if self.exists(&ds).unwrap_or(false) {
            let hint = if site.exists() {
                "choose another --repo-name, or replace it with 'dsg init --force' (asks for confirmation)".to_string()
            } else {
                format!("it is not a dsg repository: choose another --repo-name, or destroy it yourself (zfs destroy -r {ds})")
            };
            return Err(
                AgentError::new(ErrorKind::Exists, format!("dataset {ds} already exists"))
                    .hint(hint),
            );
        }
        self.create_init(tx)
    }

    fn begin_sync(&self, _site: &Site, tx: &str, base: &str) -> Result<PathBuf, AgentError> {
        // The clone is the transaction: changes are made in it.
        Zfs::begin(self, tx, base).inspect_err(|_| {
            let _ = self.rollback(tx);
        })
    }

    fn occupied(&self, _site: &Site) -> Result<bool, AgentError> {
        self.exists(&self.dataset())
    }

    fn lock_for_replace(&self, site: &Site) -> Result<Vec<Lock>, AgentError> {
        let lock = site.lock(&self.lock_path())?;
        Zfs::recover(self)?;
        Ok(vec![lock])
    }

    fn begin_replace(&self, _site: &Site, tx: &str) -> Result<PathBuf, AgentError> {
        self.create_replace(tx).inspect_err(|_| {
            let _ = self.rollback(tx);
        })
    }

    /// The transaction's dataset (a clone of the base for a sync, a new
    /// dataset for an init) is still there, mounted, with its staging, and
    /// nothing else happened since.
    fn resumable(
        &self,
        site: &Site,
        tx: &str,
        base: Option<&str>,
        base_hash: Option<&str>,
    ) -> Result<Option<Resumable>, AgentError> {
        let lock = site.lock(&self.lock_path())?;
        let ds = self.tx_dataset(tx);
        let mp = self.tx_mountpoint(tx);
        let (staging, flat, head) = match base {
            None => {
                let ok = !self.exists(&self.dataset())?
                    && self.exists(&ds)?
                    && self.origin(&ds)?.is_none()
                    && !self.journal_path().exists()
                    && mp.join(".dsg").is_dir();
                (ok.then(|| mp.clone()), false, None)
            }
            Some(b) => {
                let ours = matches!(
                    self.journal().as_deref(),
                    Some([ZRecord::Begin { tx: t, begin }])
                        if t == tx && begin.base == b && !begin.replace
                );
                let head = site.head_base().ok().flatten();
                let staging = mp.join(".dsg/staging").join(tx);
                let ok = ours
                    && is_base(head.as_ref(), b, base_hash)
                    && self.exists(&ds)?
                    && self.origin(&ds)?.is_some()
                    && staging.is_dir();
                (ok.then_some(staging), true, head)
            }
        };
        let Some(staging) = staging else {
            return Ok(None);
        };
        // A sync's files are staged flat: what an older dsg staged at
        // their paths is not listed (sent again, and never installed).
        let staged = if flat {
            list_staged_flat(&staging)?
        } else {
            list_staged(&staging, ".dsg")?
        };
        Ok(Some(Resumable {
            lock,
            staged,
            root: mp,
            staging,
            head,
        }))
    }

    fn commit_init(&self, _site: &Site, tx: &TxRef) -> Result<(), AgentError> {
        if tx.replace {
            self.commit_replace(tx.id)
        } else {
            Zfs::commit_init(self, tx.id)
        }
    }

    fn commit_sync(
        &self,
        site: &Site,
        tx: &TxRef,
        ops: &[Op],
        snapshot_id: &str,
    ) -> Result<(), AgentError> {
        // Everything happens inside the clone; nobody sees it until the
        // swap. Staging must not end up in the snapshot.
        site.apply(tx.root, tx.id, ops, false, true)?;
        remove_dir_all_if_exists(&tx.root.join(".dsg/staging"))?;
        syncfs(tx.root)?;
        self.commit(tx.id, snapshot_id)
    }

    fn finish_failed_commit(&self, _site: &Site, tx: &str) -> Option<Result<(), AgentError>> {
        // Past the zfs commit point the journal says so: finish (roll
        // forward) or report that recovery will; never undo.
        if !self.is_committed(tx) {
            return None;
        }
        Some(Zfs::recover(self).map_err(|e| {
            AgentError::new(
                ErrorKind::Incomplete,
                format!("the snapshot was committed but finishing it failed: {e}"),
            )
            .hint("run any dsg command to complete it once the problem is fixed")
        }))
    }

    fn committed_unfinished(&self, _site: &Site, _tx: &str) -> bool {
        // `finish_failed_commit` has settled a committed one already.
        false
    }

    fn mount_snapshot(
        &self,
        _site: &Site,
        snap: &str,
        mountpoint: &Path,
    ) -> Result<(String, Box<dyn Send>), AgentError> {
        self.mount_clone(snap, mountpoint)
    }

    fn snapshot_tree(&self, _site: &Site, snap: &str) -> Result<Option<SnapshotTree>, AgentError> {
        let view = self.open_snapshot(snap)?;
        Ok(Some(SnapshotTree {
            path: view.path.clone(),
            _guard: Some(Box::new(view)),
        }))
    }

    fn side_file(&self, _site: &Site, what: &str) -> PathBuf {
        self.mountpoint
            .join(format!(".dsg-zfs.{}.{what}", self.name))
    }

    fn zfs(&self) -> Option<&Zfs> {
        Some(self)
    }

    fn undo(&self, _site: &Site, tx: &TxRef) -> Result<(), AgentError> {
        let r = match (tx.init, tx.replace) {
            (true, false) => self
                .run(&["destroy", "-r", &self.tx_dataset(tx.id)])
                .map(|_| {
                    let _ = std::fs::remove_dir(tx.staging);
                }),
            _ => self.rollback(tx.id),
        };
        if tx.init {
            // An init renamed into place whose mount did not finish.
            let _ = self.cleanup_init();
        }
        r
    }
}
