//! The `xfs` backend: a repository on any POSIX filesystem.
//!
//! Layout of `<mountpoint>/<name>/`:
//! - the project's data files at their relpaths (a plain, browsable mirror);
//! - `.dsg/last-sync.json` (head manifest), `.dsg/sync-messages.json`,
//!   `.dsg/archive/sN-sync.json.lz4`;
//! - `.dsg/objects/<hh>/<hash>`: superseded and deleted file versions, moved
//!   there (not copied) so every snapshot stays retrievable;
//! - `.dsg/staging/<tx>/`: uploads of the open transaction;
//! - `.dsg/journal`: the transaction journal (see `journal.rs`);
//! - `.dsg/lock`: the `flock` target that serialises writers.
//!
//! Init builds the whole repository in a sibling staging directory and moves
//! it into place with one `renameat2(RENAME_NOREPLACE)`: that rename is the
//! commit point, so a failed init leaves no repository at all.
//!
//! Sync: uploads are staged and verified, made durable with one `syncfs`,
//! then a `committed` journal record (fsynced) is the commit point. Applying
//! the renames afterwards is idempotent, so recovery after the commit point
//! rolls forward and before it rolls back (deletes the staging directory).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{symlink, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dsg_core::atomic::{sync_dir, write_atomic};
use dsg_core::manifest::{EntryKind, Manifest};
use dsg_core::paths::{check_link_target, check_relpath};
use xxhash_rust::xxh3::Xxh3;

use dsg_txn::failpoint::failpoint;
use dsg_txn::{Aside, Journal, Layout, Log, Op, Record, TxError};
use serde::{Deserialize, Serialize};

use crate::backend::{AgentError, Backend, CommitData, Stored};
use crate::protocol::{ErrorKind, StagedFile};

/// What a repository directory's journal remembers of a `begin`: the head
/// the transaction builds on (a resume must find the same one).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct RepoBegin {
    base: String,
}

type RepoRecord = Record<RepoBegin>;
type RepoLog = Log<RepoBegin>;

#[derive(Clone, Copy)]
enum LockMode {
    Exclusive,
    Shared,
}

/// What was staged at a path, checked against the new manifest at commit.
#[derive(Clone, Debug, PartialEq)]
enum StagedKind {
    File { size: u64, hash: u64 },
    Link { target: String },
}

pub struct PosixBackend {
    /// Reused for every received file (a fresh 1 MiB buffer per small file
    /// costs an mmap and page faults each time).
    buf: Vec<u8>,
    mountpoint: PathBuf,
    /// The shared lock of a read of several files (`read_lock`).
    read_lock: Option<Lock>,
    name: String,
    /// The open transaction owns the locks it holds: they are released
    /// when it is committed, rolled back, detached or dropped.
    tx: Option<OpenTx>,
    lock_timeout: Duration,
    who: String,
    /// Set for a ZFS repository: transactions are clones (see `zfs.rs`).
    zfs: Option<crate::zfs::Zfs>,
}

/// A `flock` held on an open lock file, released when dropped (closing
/// the file releases it). The holder text written into an exclusive lock
/// file stays; it is only read while someone holds the lock.
struct Lock(File);

struct OpenTx {
    /// Held for the transaction's life (a replacing init of a plain
    /// directory holds the init lock and the repository's).
    _locks: Vec<Lock>,
    id: String,
    /// Where uploads go: the init staging dir, or `.dsg/staging/<tx>`.
    staging: PathBuf,
    /// Where the transaction's data lives: the repository directory, or
    /// for ZFS the clone's mountpoint.
    root: PathBuf,
    init: bool,
    /// An init that replaces an existing repository (confirmed by the user).
    replace: bool,
    staged: Vec<(String, StagedKind)>,
    /// Staging directories known to exist (saves a stat per path component).
    dirs: std::collections::HashSet<String>,
    base: Option<Manifest>,
}

impl OpenTx {
    /// Uploads go to `staging` and are applied in `root` (for an init both
    /// are the new repository's directory); `base` is the head a sync
    /// builds on.
    fn new(
        lock: Lock,
        id: &str,
        root: PathBuf,
        staging: PathBuf,
        init: bool,
        base: Option<Manifest>,
    ) -> OpenTx {
        OpenTx {
            _locks: vec![lock],
            id: id.into(),
            root,
            staging,
            init,
            replace: false,
            staged: Vec::new(),
            dirs: Default::default(),
            base,
        }
    }
}

impl PosixBackend {
    pub fn new(repo_dir: &Path) -> Result<PosixBackend, AgentError> {
        let name = repo_name_of(repo_dir)?;
        let mountpoint = repo_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
        let secs = std::env::var("DSG_LOCK_TIMEOUT")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(30.0);
        Ok(PosixBackend {
            buf: vec![0u8; 1 << 20],
            mountpoint,
            read_lock: None,
            name,
            tx: None,
            lock_timeout: Duration::from_secs_f64(secs),
            who: String::new(),
            zfs: None,
        })
    }

    /// A repository that is the ZFS dataset `POOL/<name>` mounted at `repo_dir`.
    pub fn new_zfs(repo_dir: &Path, pool: &str) -> Result<PosixBackend, AgentError> {
        let mut b = PosixBackend::new(repo_dir)?;
        b.zfs = Some(crate::zfs::Zfs::new(pool, repo_dir)?);
        Ok(b)
    }

    /// The lock that serialises writers. For ZFS it lives beside the
    /// dataset, which is renamed during a commit.
    fn repo_lock_path(&self) -> PathBuf {
        match &self.zfs {
            Some(z) => z.lock_path(),
            None => self.dsg().join("lock"),
        }
    }

    fn dir(&self) -> PathBuf {
        self.mountpoint.join(&self.name)
    }

    fn dsg(&self) -> PathBuf {
        self.dir().join(".dsg")
    }

    fn init_lock_path(&self) -> PathBuf {
        match &self.zfs {
            Some(z) => z.lock_path(),
            None => self
                .mountpoint
                .join(format!(".dsg-init.{}.lock", self.name)),
        }
    }

    /// Takes the exclusive lock at `path`, waiting up to the timeout.
    fn lock(&self, path: &Path) -> Result<Lock, AgentError> {
        let f = self
            .take_flock(path, LockMode::Exclusive, true)?
            .expect("waited");
        // Who holds it, for the message a waiting client prints. The flock is
        // the truth; this text is only informative.
        let info = format!(
            "{} (pid {} on {}, since {})",
            if self.who.is_empty() {
                "unknown user"
            } else {
                &self.who
            },
            std::process::id(),
            hostname(),
            dsg_core::timefmt::now_la()
        );
        let _ = f.0.set_len(0);
        let _ = (&f.0).write_all(info.as_bytes());
        Ok(f)
    }

    /// `wait = false`: returns `Ok(None)` at once when the lock is taken.
    fn take_flock(
        &self,
        path: &Path,
        mode: LockMode,
        wait: bool,
    ) -> Result<Option<Lock>, AgentError> {
        // Readers never create the lock file, and open it read-only:
        // reading must not write, and read-only users must be able to read.
        // A repository made by dsg always has one; one made by the original
        // needs no lock for readers until dsg first writes to it.
        let f = match mode {
            LockMode::Shared => match File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(AgentError::io(
                        format!("cannot open lock {}", path.display()),
                        e,
                    ))
                }
            },
            LockMode::Exclusive => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| AgentError::io(format!("cannot open lock {}", path.display()), e))?,
        };
        let op = match mode {
            LockMode::Exclusive => rustix::fs::FlockOperation::NonBlockingLockExclusive,
            LockMode::Shared => rustix::fs::FlockOperation::NonBlockingLockShared,
        };
        let start = Instant::now();
        let mut f = f;
        loop {
            match rustix::fs::flock(f.as_fd(), op) {
                // A replacing init swaps the whole directory, lock file and
                // all: a lock taken on the file that was moved away locks
                // nothing. Take it again on the one now at the path.
                Ok(()) if !same_file(&f, path) => {
                    f = match mode {
                        LockMode::Shared => match File::open(path) {
                            Ok(f) => f,
                            Err(_) => return Ok(None),
                        },
                        LockMode::Exclusive => OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .open(path)
                            .map_err(|e| {
                                AgentError::io(format!("cannot open lock {}", path.display()), e)
                            })?,
                    };
                }
                Ok(()) => return Ok(Some(Lock(f))),
                Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                    if !wait {
                        return Ok(None);
                    }
                    if start.elapsed() >= self.lock_timeout {
                        let holder = fs::read_to_string(path).unwrap_or_default();
                        return Err(AgentError::new(
                            ErrorKind::Busy,
                            format!(
                                "repository {} is busy: locked by {}",
                                self.dir().display(),
                                if holder.trim().is_empty() { "another dsg process" } else { holder.trim() }
                            ),
                        )
                        .hint("wait for the other sync to finish and run the command again (DSG_LOCK_TIMEOUT sets the wait in seconds)"));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(AgentError::io(
                        format!("cannot lock {}", path.display()),
                        e.into(),
                    ))
                }
            }
        }
    }

    fn head(&self) -> Result<Option<Manifest>, AgentError> {
        let p = self.dsg().join("last-sync.json");
        Manifest::load_optional(&p).map_err(|e| AgentError::new(ErrorKind::Corrupt, e.to_string()))
    }

    /// Finishes or undoes an interrupted transaction, and removes leftovers.
    /// Must be called with the lock held.
    fn recover_locked(&self) -> Result<(), AgentError> {
        if let Some(z) = &self.zfs {
            return z.recover();
        }
        let dsg = self.dsg();
        let jpath = dsg.join("journal");
        if let Some(log) =
            RepoLog::read(&jpath).map_err(|e| AgentError::io("cannot read the journal", e))?
        {
            if let Some((tx, ops, _)) = log.unfinished_commit() {
                tracing::info!("rolling forward committed transaction {tx}");
                self.apply(&self.dir(), tx, ops)?;
            }
        }
        // Everything not committed is rolled back by deleting it.
        remove_dir_all_if_exists(&dsg.join("staging"))?;
        remove_temp_files(&dsg)?;
        if jpath.exists() {
            fs::remove_file(&jpath).map_err(|e| AgentError::io("cannot remove the journal", e))?;
            sync_dir(&dsg).map_err(|e| AgentError::io("fsync .dsg", e))?;
        }
        Ok(())
    }

    fn init_staging(&self, tx_id: &str) -> PathBuf {
        self.mountpoint
            .join(format!(".dsg-init.{}.{}", self.name, tx_id))
    }

    fn cleanup_init_leftovers(&self) -> Result<(), AgentError> {
        self.cleanup_init_leftovers_except(None)
    }

    fn cleanup_init_leftovers_except(&self, keep: Option<&Path>) -> Result<(), AgentError> {
        let prefix = format!(".dsg-init.{}.", self.name);
        if let Ok(rd) = fs::read_dir(&self.mountpoint) {
            for de in rd.flatten() {
                let n = de.file_name().to_string_lossy().to_string();
                if n.starts_with(&prefix) && !n.ends_with(".lock") && Some(&*de.path()) != keep {
                    remove_dir_all_if_exists(&de.path())?;
                }
            }
        }
        Ok(())
    }

    /// Where a transaction rooted at `root` stages, and where it puts
    /// what it replaces: the object store, or nothing for ZFS, whose
    /// snapshots keep every old version.
    fn layout_dirs(&self, root: &Path, tx: &str) -> LayoutDirs {
        let dsg = root.join(".dsg");
        let staging = dsg.join("staging").join(tx);
        LayoutDirs {
            root: root.to_path_buf(),
            meta: staging.join(".dsg-meta"),
            files: staging,
            keep_objects: self.zfs.is_none(),
            dsg,
        }
    }

    fn apply(&self, root: &Path, tx: &str, ops: &[Op]) -> Result<(), AgentError> {
        let d = self.layout_dirs(root, tx);
        dsg_txn::apply::apply(&d.layout(), ops).map_err(tx_error)
    }
}

/// The owned paths of a transaction's `Layout`.
struct LayoutDirs {
    root: PathBuf,
    files: PathBuf,
    meta: PathBuf,
    dsg: PathBuf,
    keep_objects: bool,
}

impl LayoutDirs {
    fn layout(&self) -> Layout<'_> {
        Layout {
            root: &self.root,
            files: &self.files,
            meta: &self.meta,
            dsg: &self.dsg,
            aside: if self.keep_objects {
                Aside::Objects { dsg: &self.dsg }
            } else {
                Aside::Discard
            },
            keep_top_level: false,
            fp: "repo",
        }
    }
}

/// The agent's error for an engine error, with the hint a repository
/// user needs.
fn tx_error(e: TxError) -> AgentError {
    let kind = match &e {
        TxError::ThroughLink { .. } => ErrorKind::Unsafe,
        TxError::InTheWay { .. } => ErrorKind::Exists,
        _ => ErrorKind::Io,
    };
    let hint = if e.is_no_space() {
        "the repository's filesystem is full; free space there and run the command again"
    } else if e.is_not_writable() {
        "ask the repository's owner to make it writable for you, then run the command again"
    } else if matches!(e, TxError::InTheWay { .. }) {
        "move it out of the repository directory, then run the command again"
    } else {
        "run the command again; if it persists, check the repository's filesystem"
    };
    AgentError::new(kind, e.to_string()).hint(hint)
}

/// The repository's name: the last component of `<mountpoint>/<name>`.
pub(crate) fn repo_name_of(repo_dir: &Path) -> Result<String, AgentError> {
    repo_dir
        .file_name()
        .and_then(|n| n.to_str())
        .map(String::from)
        .ok_or_else(|| {
            AgentError::new(
                ErrorKind::NotFound,
                format!("{} is not a repository path", repo_dir.display()),
            )
        })
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .to_string()
}

fn syncfs(p: &Path) -> Result<(), AgentError> {
    dsg_txn::apply::syncfs(p).map_err(tx_error)
}

fn remove_dir_all_if_exists(p: &Path) -> Result<(), AgentError> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(format!("cannot remove {}", p.display()), e)),
    }
}

fn remove_temp_files(dir: &Path) -> Result<(), AgentError> {
    if let Ok(rd) = fs::read_dir(dir) {
        for de in rd.flatten() {
            if dsg_core::atomic::is_temp_name(&de.file_name().to_string_lossy()) {
                let _ = fs::remove_file(de.path());
            }
        }
    }
    Ok(())
}

/// Creates the parent directories of `rel` under `base`, refusing to go
/// through a symlink (a repository path must never lead outside it).
fn safe_parent(base: &Path, rel: &str) -> Result<PathBuf, AgentError> {
    let mut cur = base.to_path_buf();
    let comps: Vec<&str> = rel.split('/').collect();
    for c in &comps[..comps.len() - 1] {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(AgentError::new(
                    ErrorKind::Unsafe,
                    format!("{rel}: {} is not a directory", cur.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(|e| AgentError::io(cur.display(), e))?;
            }
            Err(e) => return Err(AgentError::io(cur.display(), e)),
        }
    }
    Ok(cur)
}

/// The staging directory for `path`'s parent, created as needed. Staging is
/// ours alone, so directories made once in this transaction are trusted.
fn staged_parent(tx: &mut OpenTx, path: &str) -> Result<PathBuf, AgentError> {
    let parent_rel = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
    if parent_rel.is_empty() || tx.dirs.contains(parent_rel) {
        return Ok(tx.staging.join(parent_rel));
    }
    let p = safe_parent(&tx.staging, path)?;
    let mut cur = parent_rel;
    loop {
        tx.dirs.insert(cur.to_string());
        match cur.rsplit_once('/') {
            Some((up, _)) => cur = up,
            None => break,
        }
    }
    Ok(p)
}

/// Whether the open file `f` is still the file at `path`.
fn same_file(f: &File, path: &Path) -> bool {
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether `head` is the snapshot a client planned against: its id, and
/// its hash when the client sent one (ids start again at s1 in a replaced
/// repository, so an id alone can name another repository's snapshot).
fn is_base(head: Option<&Manifest>, id: &str, hash: Option<&str>) -> bool {
    let md = head.and_then(|h| h.metadata.as_ref());
    md.is_some_and(|m| m.snapshot_id == id)
        && hash.is_none_or(|h| md.and_then(|m| m.snapshot_hash.as_deref()) == Some(h))
}

fn valid_tx_id(tx_id: &str) -> bool {
    !tx_id.is_empty() && tx_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Regular files under a transaction's staging directory (not `skip`, its
/// own metadata) with their lengths: what a resumed upload can build on.
fn list_staged(staging: &Path, skip: &str) -> Result<Vec<StagedFile>, AgentError> {
    let mut out = Vec::new();
    let mut stack = vec![(staging.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(|e| AgentError::io(dir.display(), e))?;
        for de in rd {
            let de = de.map_err(|e| AgentError::io(dir.display(), e))?;
            let Some(name) = de.file_name().to_str().map(String::from) else {
                continue;
            };
            if rel.is_empty() && name == skip {
                continue;
            }
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let m = de
                .metadata()
                .map_err(|e| AgentError::io(de.path().display(), e))?;
            if m.is_dir() {
                stack.push((de.path(), path));
            } else if m.is_file() {
                out.push(StagedFile { path, len: m.len() });
            }
        }
    }
    Ok(out)
}

fn checked(path: &str) -> Result<(), AgentError> {
    check_relpath(path).map_err(|e| AgentError::new(ErrorKind::Unsafe, e.to_string()))
}

impl Backend for PosixBackend {
    fn describe(&self) -> String {
        match &self.zfs {
            Some(z) => format!("zfs {} at {}", z.dataset(), self.dir().display()),
            None => format!("xfs {}", self.dir().display()),
        }
    }

    fn exists(&self) -> bool {
        self.dsg().join("last-sync.json").is_file()
    }

    fn open_meta(&self, name: &str) -> Result<Option<File>, AgentError> {
        let first = self.open_meta_once(name)?;
        if first.is_none() && self.zfs.is_some() && self.tx.is_none() {
            // A ZFS commit swaps datasets: for a moment the repository is
            // not mounted. Wait for the writer (shared lock), then look again.
            if let Some(z) = &self.zfs {
                let _guard = self.take_flock(&z.lock_path(), LockMode::Shared, true)?;
                return self.open_meta_once(name);
            }
        }
        Ok(first)
    }

    fn begin(
        &mut self,
        tx_id: &str,
        base: Option<&str>,
        base_hash: Option<&str>,
        user: &str,
    ) -> Result<(), AgentError> {
        self.who = user.to_string();
        if self.tx.is_some() {
            return Err(AgentError::new(
                ErrorKind::Protocol,
                "a transaction is already open",
            ));
        }
        if !valid_tx_id(tx_id) {
            return Err(AgentError::new(
                ErrorKind::Protocol,
                format!("bad transaction id {tx_id:?}"),
            ));
        }
        match base {
            None => {
                if !self.mountpoint.is_dir() {
                    return Err(AgentError::new(
                        ErrorKind::NotFound,
                        format!(
                            "repository path {} does not exist",
                            self.mountpoint.display()
                        ),
                    )
                    .hint("create it on the repository host, or pass the right --repo-path"));
                }
                let lock = self.lock(&self.init_lock_path())?;
                if let Some(z) = &self.zfs {
                    z.recover()?;
                    let ds = z.dataset();
                    if z.exists(&ds).unwrap_or(false) {
                        let hint = if self.exists() {
                            "choose another --repo-name, or replace it with 'dsg init --force' (asks for confirmation)".to_string()
                        } else {
                            format!("it is not a dsg repository: choose another --repo-name, or destroy it yourself (zfs destroy -r {ds})")
                        };
                        return Err(AgentError::new(
                            ErrorKind::Exists,
                            format!("dataset {ds} already exists"),
                        )
                        .hint(hint));
                    }
                } else {
                    self.cleanup_init_leftovers()?;
                }
                if fs::symlink_metadata(self.dir()).is_ok() {
                    let hint = if self.exists() {
                        "choose another --repo-name, or replace it with 'dsg init --force' (asks for confirmation)"
                    } else {
                        "it is not a dsg repository: choose another --repo-name, or move it away yourself"
                    };
                    return Err(AgentError::new(
                        ErrorKind::Exists,
                        format!("{} already exists", self.dir().display()),
                    )
                    .hint(hint));
                }
                let staging = match &self.zfs {
                    Some(z) => z.create_init(tx_id)?,
                    None => {
                        let st = self.init_staging(tx_id);
                        fs::create_dir(&st).map_err(|e| AgentError::io(st.display(), e))?;
                        st
                    }
                };
                fs::create_dir_all(staging.join(".dsg/archive"))
                    .map_err(|e| AgentError::io(staging.display(), e))?;
                self.tx = Some(OpenTx::new(
                    lock,
                    tx_id,
                    staging.clone(),
                    staging,
                    true,
                    None,
                ));
            }
            Some(base_id) => {
                if !self.exists() {
                    return Err(AgentError::new(
                        ErrorKind::NotFound,
                        format!(
                            "{} is not a dsg repository (no .dsg/last-sync.json)",
                            self.dir().display()
                        ),
                    ));
                }
                let lock_path = self.repo_lock_path();
                let lock = self.lock(&lock_path)?;
                self.recover_locked()?;
                let head = self.head()?;
                let head_id = head
                    .as_ref()
                    .and_then(|h| h.metadata.as_ref())
                    .map(|m| m.snapshot_id.clone());
                if head_id.as_deref() != Some(base_id) {
                    return Err(AgentError::new(
                        ErrorKind::Moved,
                        format!(
                            "the repository moved: its head is {}, this sync was planned against {base_id}",
                            head_id.as_deref().unwrap_or("nothing")
                        ),
                    )
                    .hint("run the command again; dsg will plan against the new head"));
                }
                if !is_base(head.as_ref(), base_id, base_hash) {
                    return Err(AgentError::new(
                        ErrorKind::Moved,
                        format!(
                            "the repository was replaced: its head {base_id} is not the {base_id} this sync was planned against"
                        ),
                    )
                    .hint("run the command again; dsg will plan against the new head"));
                }
                let root = match &self.zfs {
                    // The clone is the transaction: changes are made in it.
                    Some(z) => match z.begin(tx_id, base_id) {
                        Ok(mp) => mp,
                        Err(e) => {
                            let _ = z.rollback(tx_id);
                            return Err(e);
                        }
                    },
                    None => self.dir(),
                };
                let staging = root.join(".dsg/staging").join(tx_id);
                let started = fs::create_dir_all(staging.join(".dsg-meta/archive"))
                    .map_err(|e| AgentError::io(staging.display(), e))
                    .and_then(|()| {
                        if self.zfs.is_some() {
                            return Ok(());
                        }
                        let j = Journal::create(&self.dsg().join("journal"))
                            .map_err(|e| AgentError::io("cannot create the journal", e))?;
                        j.append(&RepoRecord::Begin {
                            tx: tx_id.into(),
                            begin: RepoBegin {
                                base: base_id.into(),
                            },
                        })
                        .map_err(|e| AgentError::io("cannot write the journal", e))
                    });
                if let Err(e) = started {
                    // A full disk, say: leave the repository as it was
                    // (the next command's recovery would, but a reader
                    // must not find leftovers now).
                    match &self.zfs {
                        Some(z) => {
                            let _ = z.rollback(tx_id);
                        }
                        None => {
                            let _ = remove_dir_all_if_exists(&staging);
                            let _ = fs::remove_dir(self.dsg().join("staging"));
                            let _ = fs::remove_file(self.dsg().join("journal"));
                        }
                    }
                    return Err(e);
                }
                if self.zfs.is_none() {
                    failpoint("repo.journal.begin");
                }
                self.tx = Some(OpenTx::new(lock, tx_id, root, staging, false, head));
            }
        }
        Ok(())
    }

    fn stage_file(
        &mut self,
        path: &str,
        size: u64,
        hash: u64,
        mtime_ns: i64,
        offset: u64,
        data: &mut dyn Read,
    ) -> Result<(), AgentError> {
        let (dst, mut f) = self.open_staged(path, offset)?;
        let mut h = Xxh3::new();
        let buf = &mut self.buf;
        let mut n = 0u64;
        if offset > 0 {
            // The staged prefix is verified with the rest: hash it as it is
            // on disk now, not as it was meant to be written.
            let mut prefix = (&f).take(offset);
            loop {
                let k = prefix
                    .read(buf)
                    .map_err(|e| AgentError::io(format!("reading staged {path}"), e))?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                n += k as u64;
            }
        }
        loop {
            let k = data
                .read(buf)
                .map_err(|e| AgentError::io(format!("receiving {path}"), e))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            f.write_all(&buf[..k])
                .map_err(|e| AgentError::io(format!("cannot stage {path}"), e))?;
            n += k as u64;
        }
        self.accept_staged(path, &dst, f, (n, h.digest()), (size, hash), mtime_ns)
    }

    fn stage_file_from(
        &mut self,
        path: &str,
        size: u64,
        hash: u64,
        mtime_ns: i64,
        src: &Path,
    ) -> Result<(), AgentError> {
        let (dst, mut to) = self.open_staged(path, 0)?;
        let mut from = dsg_core::hash::open_nofollow(src)
            .map_err(|e| AgentError::io(format!("cannot read {}", src.display()), e))?;
        // std's copy uses copy_file_range between files: a reflink on XFS
        // and btrfs, an in-kernel copy elsewhere.
        std::io::copy(&mut from, &mut to)
            .map_err(|e| AgentError::io(format!("cannot stage {path}"), e))?;
        // Verify what landed, not what was meant to be sent.
        let verified =
            std::io::Seek::rewind(&mut to).and_then(|()| dsg_core::hash::hash_reader(&mut to));
        let (got, n) = verified.map_err(|e| AgentError::io(format!("verifying {path}"), e))?;
        self.accept_staged(path, &dst, to, (n, got.0), (size, hash), mtime_ns)
    }

    fn stage_link(&mut self, path: &str, target: &str) -> Result<(), AgentError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| AgentError::new(ErrorKind::Protocol, "no open transaction"))?;
        checked(path)?;
        check_link_target(path, target)
            .map_err(|e| AgentError::new(ErrorKind::Unsafe, e.to_string()))?;
        let parent = staged_parent(tx, path)?;
        let dst = parent.join(path.rsplit('/').next().unwrap());
        let _ = fs::remove_file(&dst);
        symlink(target, &dst)
            .map_err(|e| AgentError::io(format!("cannot stage link {path}"), e))?;
        tx.staged.push((
            path.into(),
            StagedKind::Link {
                target: target.into(),
            },
        ));
        Ok(())
    }

    fn begin_replace(
        &mut self,
        tx_id: &str,
        user: &str,
        expect_hash: Option<&str>,
    ) -> Result<(), AgentError> {
        if self.tx.is_some() || !valid_tx_id(tx_id) {
            return Err(AgentError::new(
                ErrorKind::Protocol,
                format!("cannot begin transaction {tx_id:?} here"),
            ));
        }
        let exists = match &self.zfs {
            Some(z) => z.exists(&z.dataset())?,
            None => fs::symlink_metadata(self.dir()).is_ok(),
        };
        if !exists {
            return self.begin(tx_id, None, None, user);
        }
        self.who = user.to_string();
        // Locks first (ZFS: its one lock; a directory: the init lock and
        // the repository's, so no init of this name and no sync of the
        // repository runs meanwhile), then recovery, then the check that
        // the head is the one the user confirmed, and only then is
        // anything created.
        let locks = match self.zfs.clone() {
            Some(z) => {
                let lock = self.lock(&z.lock_path())?;
                z.recover()?;
                vec![lock]
            }
            None => {
                if !self.dsg().is_dir() {
                    return Err(AgentError::new(
                        ErrorKind::Exists,
                        format!("{} exists and is not a dsg repository", self.dir().display()),
                    )
                    .hint("dsg replaces only a dsg repository; move it away or choose another --repo-name"));
                }
                let init = self.lock(&self.init_lock_path())?;
                let repo = self.lock(&self.repo_lock_path())?;
                self.recover_locked()?;
                self.cleanup_init_leftovers()?;
                vec![init, repo]
            }
        };
        // What the user confirmed replacing must be what is replaced: a
        // sync committed since then would be lost unseen. The head file's
        // own hash: it exists even for a head without a snapshot hash.
        if let Some(expect) = expect_hash {
            let now = fs::read(self.dsg().join("last-sync.json"))
                .map(|b| format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&b)))
                .unwrap_or_default();
            if now != expect {
                return Err(AgentError::new(
                    ErrorKind::Moved,
                    "the repository changed since you confirmed replacing it; nothing was replaced",
                )
                .hint("run the command again to see what it holds now and confirm again"));
            }
        }
        let staging = match self.zfs.clone() {
            Some(z) => z.create_replace(tx_id).inspect_err(|_| {
                let _ = z.rollback(tx_id);
            })?,
            None => {
                let st = self.init_staging(tx_id);
                fs::create_dir(&st).map_err(|e| AgentError::io(st.display(), e))?;
                st
            }
        };
        let mut locks = locks.into_iter();
        let first = locks.next().expect("a lock");
        let mut tx = OpenTx::new(first, tx_id, staging.clone(), staging.clone(), true, None);
        tx._locks.extend(locks);
        tx.replace = true;
        self.tx = Some(tx);
        fs::create_dir_all(staging.join(".dsg/archive"))
            .map_err(|e| AgentError::io(staging.display(), e))?;
        Ok(())
    }

    fn resume(
        &mut self,
        tx_id: &str,
        base: Option<&str>,
        base_hash: Option<&str>,
        user: &str,
    ) -> Result<Vec<StagedFile>, AgentError> {
        if self.tx.is_some() || !valid_tx_id(tx_id) {
            return self
                .begin(tx_id, base, base_hash, user)
                .map(|()| Vec::new());
        }
        if let Some(z) = self.zfs.clone() {
            return self.resume_zfs(&z, tx_id, base, base_hash, user);
        }
        self.who = user.to_string();
        match base {
            None => {
                if !self.mountpoint.is_dir() {
                    return self
                        .begin(tx_id, base, base_hash, user)
                        .map(|()| Vec::new());
                }
                let lock = self.lock(&self.init_lock_path())?;
                let st = self.init_staging(tx_id);
                let is_dir = fs::symlink_metadata(&st)
                    .map(|m| m.is_dir())
                    .unwrap_or(false);
                if !is_dir || fs::symlink_metadata(self.dir()).is_ok() {
                    // begin() takes the lock again, and reports why not.
                    drop(lock);
                    return self
                        .begin(tx_id, base, base_hash, user)
                        .map(|()| Vec::new());
                }
                self.cleanup_init_leftovers_except(Some(&st))?;
                let staged = list_staged(&st, ".dsg")?;
                self.tx = Some(OpenTx::new(lock, tx_id, st.clone(), st, true, None));
                Ok(staged)
            }
            Some(base_id) => {
                if !self.exists() {
                    return self
                        .begin(tx_id, base, base_hash, user)
                        .map(|()| Vec::new());
                }
                let lock = self.lock(&self.repo_lock_path())?;
                let dsg = self.dsg();
                let staging = dsg.join("staging").join(tx_id);
                let log = RepoLog::read(&dsg.join("journal")).ok().flatten();
                let ours = matches!(
                    log.as_ref().map(|l| l.records.as_slice()),
                    Some([Record::Begin { tx, begin }]) if tx == tx_id && begin.base == base_id
                );
                let head = self.head().ok().flatten();
                let is_dir = fs::symlink_metadata(&staging)
                    .map(|m| m.is_dir())
                    .unwrap_or(false);
                if !ours || !is_dir || !is_base(head.as_ref(), base_id, base_hash) {
                    drop(lock);
                    return self
                        .begin(tx_id, base, base_hash, user)
                        .map(|()| Vec::new());
                }
                // Only this transaction's staging survives.
                if let Ok(rd) = fs::read_dir(dsg.join("staging")) {
                    for de in rd.flatten() {
                        if de.file_name() != std::ffi::OsStr::new(tx_id) {
                            remove_dir_all_if_exists(&de.path())?;
                        }
                    }
                }
                remove_temp_files(&dsg)?;
                let staged = list_staged(&staging, ".dsg-meta")?;
                self.tx = Some(OpenTx::new(lock, tx_id, self.dir(), staging, false, head));
                Ok(staged)
            }
        }
    }

    fn commit(&mut self, c: &CommitData) -> Result<(), AgentError> {
        let mut tx = self
            .tx
            .take()
            .ok_or_else(|| AgentError::new(ErrorKind::Protocol, "no open transaction"))?;
        // On success the transaction, and with it its locks, goes here.
        let Err(e) = self.commit_tx(&tx, c) else {
            return Ok(());
        };
        if let Some(z) = &self.zfs {
            // Past the zfs commit point the journal says so: finish
            // (roll forward) or report that recovery will; never undo.
            if z.is_committed(&tx.id) {
                return z.recover().map_err(|e2| {
                    AgentError::new(
                        ErrorKind::Incomplete,
                        format!("the snapshot was committed but finishing it failed: {e2} (first error: {e})"),
                    )
                    .hint("run any dsg command to complete it once the problem is fixed")
                });
            }
        }
        // Before the commit point this rolls back; after it, it rolls
        // forward, and then the commit did happen. Decided under the
        // locks, by the exact bytes: an id alone could be an older
        // repository's (a replaced one starts again at s1).
        let _locks = std::mem::take(&mut tx._locks);
        let tx_id = tx.id.clone();
        let _ = self.undo(tx);
        if let Some(z) = &self.zfs {
            // An init renamed into place whose mount did not finish.
            let _ = z.cleanup_init();
        }
        let landed = fs::read(self.dsg().join("last-sync.json")).is_ok_and(|b| b == c.manifest);
        // Committed in the journal but not rolled forward (the roll
        // forward failed too): recovery finishes it; never "failed".
        let committed = self.zfs.is_none()
            && RepoLog::read(&self.dsg().join("journal"))
                .ok()
                .flatten()
                .is_some_and(|l| l.unfinished_commit().is_some_and(|(t, ..)| t == tx_id));
        if landed {
            Ok(())
        } else if committed {
            Err(AgentError::new(
                ErrorKind::Incomplete,
                format!("the snapshot was committed but applying it failed: {e}"),
            )
            .hint("run any dsg command to complete it once the problem is fixed"))
        } else {
            Err(e)
        }
    }

    fn rollback(&mut self) -> Result<(), AgentError> {
        match self.tx.take() {
            Some(tx) => self.undo(tx),
            None => Ok(()),
        }
    }

    fn detach(&mut self) {
        // A replacing init starts over rather than resume (its journal
        // and dataset are undone now).
        if self.tx.as_ref().is_none_or(|t| t.replace) {
            let _ = self.rollback();
            return;
        }
        // What was staged stays — the staging directory and the journal's
        // `begin` record; for ZFS the transaction's clone or init dataset —
        // for `resume` to continue, or for the next `recover` to remove.
        // Dropping the transaction releases its locks.
        self.tx = None;
    }

    fn open(&self, path: &str) -> Result<Stored, AgentError> {
        checked(path)?;
        let p = self.dir().join(path);
        // Refuse to follow a symlinked parent out of the repository.
        if let Some(parent) = Path::new(path).parent() {
            let mut cur = self.dir();
            for c in parent.components() {
                cur.push(c);
                if fs::symlink_metadata(&cur)
                    .map(|m| m.file_type().is_symlink())
                    .unwrap_or(false)
                {
                    return Err(AgentError::new(
                        ErrorKind::Unsafe,
                        format!("{path}: a parent is a symlink"),
                    ));
                }
            }
        }
        let md = fs::symlink_metadata(&p)
            .map_err(|e| AgentError::io(format!("{path} in the repository"), e))?;
        if md.file_type().is_symlink() {
            let t = fs::read_link(&p).map_err(|e| AgentError::io(path, e))?;
            return Ok(Stored::Link {
                target: t.to_string_lossy().into(),
            });
        }
        if !md.is_file() {
            return Err(AgentError::new(
                ErrorKind::Corrupt,
                format!("{path} in the repository is not a file"),
            ));
        }
        let file = File::open(&p).map_err(|e| AgentError::io(path, e))?;
        Ok(Stored::File {
            file,
            size: md.size(),
        })
    }

    fn root(&self) -> PathBuf {
        self.dir()
    }

    fn read_lock(&mut self) -> Result<(), AgentError> {
        if self.tx.is_some()
            || self.read_lock.is_some()
            || (self.zfs.is_none() && !self.dsg().is_dir())
        {
            return Ok(());
        }
        self.read_lock = self.take_flock(&self.repo_lock_path(), LockMode::Shared, true)?;
        Ok(())
    }

    fn read_unlock(&mut self) {
        self.read_lock = None;
    }

    fn recover(&mut self, wait: bool) -> Result<(), AgentError> {
        if self.tx.is_some() {
            return Ok(());
        }
        if wait {
            // A shared lock is granted once the writer's exclusive one is
            // released (a finished commit, or a dead agent).
            for path in [self.repo_lock_path(), self.init_lock_path()] {
                drop(self.take_flock(&path, LockMode::Shared, true)?);
            }
        }
        if let Some(z) = &self.zfs {
            // A dataset that is not mounted where it belongs (a crash
            // between a rename and its mount) also needs recovery.
            let pending = z.journal_path().exists()
                || !self.dsg().is_dir()
                || self
                    .mountpoint
                    .read_dir()
                    .map(|rd| {
                        rd.flatten().any(|d| {
                            d.file_name()
                                .to_string_lossy()
                                .starts_with(&format!(".dsg-tx.{}.", self.name))
                        })
                    })
                    .unwrap_or(false);
            let unfinished = || z.has_unfinished_commit();
            if pending && self.may_recover(&self.mountpoint, &z.lock_path(), &unfinished)? {
                if let Some(_lock) = self.take_flock(&z.lock_path(), LockMode::Exclusive, false)? {
                    z.recover()?;
                }
            }
            return Ok(());
        }
        let dsg = self.dsg();
        // Only when something was left behind: recovery needs the exclusive
        // lock, and reading (status, clone) must neither write nor need
        // write access.
        let pending = dsg.join("journal").exists()
            || dsg.join("staging").exists()
            || fs::read_dir(&dsg)
                .map(|rd| {
                    rd.flatten()
                        .any(|d| dsg_core::atomic::is_temp_name(&d.file_name().to_string_lossy()))
                })
                .unwrap_or(false);
        let jpath = dsg.join("journal");
        let unfinished = || {
            RepoLog::read(&jpath)
                .ok()
                .flatten()
                .is_some_and(|l| l.unfinished_commit().is_some())
        };
        if pending && self.may_recover(&dsg, &dsg.join("lock"), &unfinished)? {
            // A live writer holds the lock: its transaction is not ours to touch.
            if let Some(_lock) =
                self.take_flock(&self.dsg().join("lock"), LockMode::Exclusive, false)?
            {
                self.recover_locked()?;
            }
        }
        let prefix = format!(".dsg-init.{}.", self.name);
        let init_leftovers = fs::read_dir(&self.mountpoint)
            .map(|rd| {
                rd.flatten().any(|d| {
                    let n = d.file_name().to_string_lossy().to_string();
                    n.starts_with(&prefix) && !n.ends_with(".lock")
                })
            })
            .unwrap_or(false);
        if init_leftovers
            && self.may_recover(&self.mountpoint, &self.init_lock_path(), &|| false)?
        {
            if let Some(_lock) =
                self.take_flock(&self.init_lock_path(), LockMode::Exclusive, false)?
            {
                self.cleanup_init_leftovers()?;
            }
        }
        Ok(())
    }

    fn list_archives(&self) -> Result<Vec<String>, AgentError> {
        let mut names = Vec::new();
        match fs::read_dir(self.dsg().join("archive")) {
            Ok(rd) => {
                for de in rd.flatten() {
                    let n = de.file_name().to_string_lossy().to_string();
                    if !n.starts_with('.') && de.file_type().map(|t| t.is_file()).unwrap_or(false) {
                        names.push(n);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AgentError::io("listing archives", e)),
        }
        names.sort();
        Ok(names)
    }
}

impl PosixBackend {
    /// Undoes transaction `tx`; its locks (if it still holds them) are
    /// released when it drops, after the undo.
    fn undo(&self, tx: OpenTx) -> Result<(), AgentError> {
        match (&self.zfs, tx.init) {
            (Some(z), true) if tx.replace => z.rollback(&tx.id),
            (Some(z), true) => z.run(&["destroy", "-r", &z.tx_dataset(&tx.id)]).map(|_| {
                let _ = fs::remove_dir(&tx.staging);
            }),
            (Some(z), false) => z.rollback(&tx.id),
            (None, true) => remove_dir_all_if_exists(&tx.staging),
            (None, false) => self.recover_locked(),
        }
    }

    /// Whether this user can run a recovery in `dir`. A reader who may not
    /// write there skips leftovers that do not touch the head (an upload's
    /// staging, an init's) — a writer's next command removes them — but
    /// cannot read past a committed transaction that is not finished:
    /// after waiting for the writer holding `lock` (it may be finishing it
    /// right now), it fails if `unfinished` still says so.
    fn may_recover(
        &self,
        dir: &Path,
        lock: &Path,
        unfinished: &dyn Fn() -> bool,
    ) -> Result<bool, AgentError> {
        if rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).is_ok() {
            return Ok(true);
        }
        if unfinished() {
            // Held across the re-check: no new writer slips in between.
            let _shared = self.take_flock(lock, LockMode::Shared, true)?;
            if unfinished() {
                return Err(AgentError::new(
                    ErrorKind::Incomplete,
                    format!(
                        "{} holds a committed transaction that is not finished yet, and this user may not finish it",
                        self.dir().display()
                    ),
                )
                .hint("run any dsg command as a user who may write the repository; it finishes the transaction"));
            }
        }
        tracing::debug!(
            "{}: leftovers of an unfinished upload; not ours to remove (read-only)",
            dir.display()
        );
        Ok(false)
    }

    /// `resume` on ZFS: the transaction's dataset (a clone of the base for
    /// a sync, a new dataset for an init) is still there, mounted, with its
    /// staging, and nothing else happened since.
    fn resume_zfs(
        &mut self,
        z: &crate::zfs::Zfs,
        tx_id: &str,
        base: Option<&str>,
        base_hash: Option<&str>,
        user: &str,
    ) -> Result<Vec<StagedFile>, AgentError> {
        self.who = user.to_string();
        let lock = self.lock(&z.lock_path())?;
        let ds = z.tx_dataset(tx_id);
        let mp = z.tx_mountpoint(tx_id);
        let (staging, skip, head) = match base {
            None => {
                let ok = !z.exists(&z.dataset())?
                    && z.exists(&ds)?
                    && z.origin(&ds)?.is_none()
                    && !z.journal_path().exists()
                    && mp.join(".dsg").is_dir();
                (ok.then(|| mp.clone()), ".dsg", None)
            }
            Some(b) => {
                let ours = matches!(
                    z.journal().as_deref(),
                    Some([crate::zfs::ZRecord::Begin { tx, begin }])
                        if tx == tx_id && begin.base == b && !begin.replace
                );
                let head = self.head().ok().flatten();
                let staging = mp.join(".dsg/staging").join(tx_id);
                let ok = ours
                    && is_base(head.as_ref(), b, base_hash)
                    && z.exists(&ds)?
                    && z.origin(&ds)?.is_some()
                    && staging.is_dir();
                (ok.then_some(staging), ".dsg-meta", head)
            }
        };
        let Some(staging) = staging else {
            // begin() takes the lock again, recovers what is left and says
            // why not, if it cannot begin either.
            drop(lock);
            return self
                .begin(tx_id, base, base_hash, user)
                .map(|()| Vec::new());
        };
        let staged = list_staged(&staging, skip)?;
        self.tx = Some(OpenTx::new(lock, tx_id, mp, staging, base.is_none(), head));
        Ok(staged)
    }

    /// Opens the staging file for `path` in the open transaction, keeping
    /// its first `keep` bytes (a resumed upload) and positioned after them.
    fn open_staged(&mut self, path: &str, keep: u64) -> Result<(PathBuf, File), AgentError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| AgentError::new(ErrorKind::Protocol, "no open transaction"))?;
        checked(path)?;
        let parent = staged_parent(tx, path)?;
        let dst = parent.join(path.rsplit('/').next().unwrap());
        let err = |e| AgentError::io(format!("cannot stage {path}"), e);
        // Readable too: a resumed prefix is hashed, and a local copy
        // verified, through this handle. O_NOFOLLOW: a staged path is ours,
        // but never write through a link.
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).custom_flags(libc::O_NOFOLLOW);
        if keep == 0 {
            let f = opts.create(true).truncate(true).open(&dst).map_err(err)?;
            return Ok((dst, f));
        }
        let f = opts.open(&dst).map_err(err)?;
        let len = f.metadata().map_err(err)?.len();
        if len < keep {
            return Err(AgentError::new(
                ErrorKind::Protocol,
                format!("{path}: cannot resume at byte {keep}, only {len} are staged"),
            ));
        }
        f.set_len(keep).map_err(err)?;
        Ok((dst, f))
    }

    /// Accepts a staged file only if what arrived is what was promised.
    fn accept_staged(
        &mut self,
        path: &str,
        dst: &Path,
        f: File,
        (n, got): (u64, u64),
        (size, hash): (u64, u64),
        mtime_ns: i64,
    ) -> Result<(), AgentError> {
        if n != size || got != hash {
            drop(f);
            let _ = fs::remove_file(dst);
            return Err(AgentError::new(
                ErrorKind::Verify,
                format!("{path}: received {n} bytes hashing to {got:016x}, expected {size} bytes hashing to {hash:016x}"),
            )
            .hint("the file changed while it was sent, or the transfer was damaged; nothing was committed, run the command again"));
        }
        // On the open file: no second open per file.
        let t = std::time::UNIX_EPOCH + Duration::from_nanos(mtime_ns.max(0) as u64);
        let _ = f.set_modified(t);
        drop(f);
        let tx = self.tx.as_mut().expect("open transaction");
        tx.staged
            .push((path.into(), StagedKind::File { size, hash }));
        failpoint("repo.stage_file");
        Ok(())
    }

    fn open_meta_once(&self, name: &str) -> Result<Option<File>, AgentError> {
        let ok = matches!(name, "last-sync.json" | "sync-messages.json")
            || (name.starts_with("archive/")
                && !name[8..].contains('/')
                && !name[8..].starts_with('.'));
        if !ok {
            return Err(AgentError::new(
                ErrorKind::Unsafe,
                format!("refusing to read .dsg/{name}"),
            ));
        }
        match File::open(self.dsg().join(name)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AgentError::io(
                format!("cannot read {}", self.dsg().join(name).display()),
                e,
            )),
        }
    }

    fn commit_tx(&mut self, tx: &OpenTx, c: &CommitData) -> Result<(), AgentError> {
        let new = Manifest::from_json_bytes(&c.manifest, Path::new("uploaded manifest"))
            .map_err(|e| AgentError::new(ErrorKind::Corrupt, e.to_string()))?;
        new.verify_integrity()
            .map_err(|e| AgentError::new(ErrorKind::Corrupt, format!("uploaded manifest: {e}")))?;
        if new.metadata.as_ref().map(|m| m.snapshot_id.as_str()) != Some(c.snapshot_id.as_str()) {
            return Err(AgentError::new(
                ErrorKind::Protocol,
                "manifest snapshot id does not match the commit",
            ));
        }
        // Every entry of the new manifest must be staged now (and staged as
        // the manifest says) or unchanged from the base: the repository must
        // equal its manifest afterwards.
        let staged: std::collections::HashMap<&str, &StagedKind> =
            tx.staged.iter().map(|(p, k)| (p.as_str(), k)).collect();
        for e in new.entries() {
            if let Some(k) = staged.get(&*e.path) {
                let matches = match (&e.kind, k) {
                    (
                        EntryKind::File { size, hash, .. },
                        StagedKind::File { size: s2, hash: h2 },
                    ) => size == s2 && hash.map(|h| h.0) == Some(*h2),
                    (EntryKind::Link { target }, StagedKind::Link { target: t2 }) => {
                        &**target == t2.as_str()
                    }
                    _ => false,
                };
                if !matches {
                    return Err(AgentError::new(
                        ErrorKind::Verify,
                        format!(
                            "{}: the uploaded content does not match the new manifest",
                            e.path
                        ),
                    ));
                }
                continue;
            }
            let same = tx
                .base
                .as_ref()
                .and_then(|b| b.get(&e.path))
                .is_some_and(|b| b.same_content(e));
            if !same {
                return Err(AgentError::new(
                    ErrorKind::Protocol,
                    format!(
                        "{}: in the new manifest but neither uploaded nor unchanged",
                        e.path
                    ),
                ));
            }
        }
        for p in staged.keys() {
            if new.get(p).is_none() {
                return Err(AgentError::new(
                    ErrorKind::Protocol,
                    format!("{p}: uploaded but not in the new manifest"),
                ));
            }
        }
        let deletes: Vec<String> = tx
            .base
            .as_ref()
            .map(|b| {
                b.entries()
                    .iter()
                    .filter(|e| new.get(&e.path).is_none())
                    .map(|e| e.path.to_string())
                    .collect()
            })
            .unwrap_or_default();
        if tx.init {
            let dsg = tx.staging.join(".dsg");
            write_atomic(&dsg.join("last-sync.json"), &c.manifest)
                .map_err(|e| AgentError::io("staging manifest", e.source))?;
            write_atomic(&dsg.join("sync-messages.json"), &c.sync_messages)
                .map_err(|e| AgentError::io("staging sync-messages", e.source))?;
            File::create(dsg.join("lock"))
                .map_err(|e| AgentError::io("creating the lock file", e))?;
            syncfs(&tx.staging)?;
            failpoint("repo.init.before_rename");
            if crate::failpoint::injected_error("repo.init.before_rename") {
                return Err(AgentError::new(
                    ErrorKind::Io,
                    "injected failure before the init's commit point (DSG_FAILPOINT)",
                ));
            }
            if let Some(z) = &self.zfs {
                return if tx.replace {
                    z.commit_replace(&tx.id)
                } else {
                    z.commit_init(&tx.id)
                };
            }
            // One rename is the commit point: a new repository takes its
            // name (never over an existing one); a replacing one swaps with
            // the old tree, which takes the staging name, where the next
            // recovery (or the line below) deletes it.
            let replacing = tx.replace && fs::symlink_metadata(self.dir()).is_ok();
            let (flags, verb) = if replacing {
                (rustix::fs::RenameFlags::EXCHANGE, "replace")
            } else {
                (rustix::fs::RenameFlags::NOREPLACE, "create")
            };
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                &tx.staging,
                rustix::fs::CWD,
                self.dir(),
                flags,
            )
            .map_err(|e| {
                AgentError::io(format!("cannot {verb} {}", self.dir().display()), e.into())
            })?;
            sync_dir(&self.mountpoint).map_err(|e| AgentError::io(self.mountpoint.display(), e))?;
            if replacing {
                failpoint("repo.replace.exchanged");
                remove_dir_all_if_exists(&tx.staging)?;
            } else {
                failpoint("repo.init.after_rename");
            }
            return Ok(());
        }
        // Sync: stage the metadata, make everything durable, then commit.
        let meta = tx.staging.join(".dsg-meta");
        write_atomic(&meta.join("last-sync.json"), &c.manifest)
            .map_err(|e| AgentError::io("staging manifest", e.source))?;
        write_atomic(&meta.join("sync-messages.json"), &c.sync_messages)
            .map_err(|e| AgentError::io("staging sync-messages", e.source))?;
        // Archive the old head exactly as it is on disk, so its stored
        // entries_hash still verifies; never overwrite an archived snapshot.
        let base_id = tx
            .base
            .as_ref()
            .and_then(|b| b.metadata.as_ref())
            .map(|m| m.snapshot_id.clone());
        if let Some(base_id) = base_id {
            let name = dsg_core::manifest::archive_name(&base_id);
            if !self.dsg().join("archive").join(&name).exists() {
                let raw = fs::read(self.dsg().join("last-sync.json"))
                    .map_err(|e| AgentError::io("reading the head manifest", e))?;
                write_atomic(
                    &meta.join("archive").join(&name),
                    &dsg_core::manifest::compress_archive(&raw),
                )
                .map_err(|e| AgentError::io("staging archive", e.source))?;
            }
        }
        syncfs(&tx.staging)?;
        failpoint("repo.before_commit");
        let zfs_tx = self.zfs.is_some();
        let base = tx.base.as_ref();
        let old_hash = |p: &str| -> Option<u64> {
            base.and_then(|b| b.get(p)).and_then(|e| match &e.kind {
                EntryKind::File { hash, .. } => hash.map(|h| h.0),
                _ => None,
            })
        };
        let mut ops = Vec::new();
        let mut retire: Vec<&str> = deletes.iter().map(|s| s.as_str()).collect();
        retire.extend(tx.staged.iter().map(|s| s.0.as_str()));
        // Deepest first, so a directory is emptied before it may be replaced.
        retire.sort_by(|a, b| b.cmp(a));
        retire.dedup();
        for p in retire {
            ops.push(Op::Retire {
                path: p.into(),
                hash: old_hash(p),
                expect: None,
            });
        }
        let mut installs: Vec<&str> = tx.staged.iter().map(|s| s.0.as_str()).collect();
        installs.sort();
        for p in installs {
            ops.push(Op::Install { path: p.into() });
        }
        // Everything the apply needs is made and checked now, before the
        // commit point: after it, only renames remain.
        let dirs = self.layout_dirs(&tx.root, &tx.id);
        dsg_txn::apply::prepare(&dirs.layout(), &mut ops).map_err(|e| {
            let mut e = tx_error(e);
            e.message.push_str("; nothing was changed");
            e
        })?;
        if zfs_tx {
            // Everything happens inside the clone; nobody sees it until the
            // swap. Staging must not end up in the snapshot.
            self.apply(&tx.root, &tx.id, &ops)?;
            remove_dir_all_if_exists(&tx.root.join(".dsg/staging"))?;
            syncfs(&tx.root)?;
            return self
                .zfs
                .as_ref()
                .expect("zfs")
                .commit(&tx.id, &c.snapshot_id);
        }
        let j = Journal::open(&self.dsg().join("journal"))
            .map_err(|e| AgentError::io("cannot open the journal", e))?;
        j.append(&RepoRecord::Committed {
            tx: tx.id.clone(),
            ops: ops.clone(),
            snap: None,
        })
        .map_err(|e| AgentError::io("cannot write the journal", e))?;
        // The commit point has passed: from here on, errors are finished by
        // recovery (roll forward), never undone.
        failpoint("repo.journal.committed");
        self.apply(&self.dir(), &tx.id, &ops)?;
        j.append(&RepoRecord::Done { tx: tx.id.clone() })
            .map_err(|e| AgentError::io("cannot write the journal", e))?;
        failpoint("repo.journal.done");
        self.recover_locked()?;
        Ok(())
    }
}

impl Drop for PosixBackend {
    fn drop(&mut self) {
        if self.tx.is_some() {
            let _ = self.rollback();
        }
    }
}

#[allow(dead_code)]
fn _assert_object_safe(_: &dyn Backend) {}
