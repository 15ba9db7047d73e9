//! Where a repository lives and how it is locked: what both kinds of
//! repository (a directory, a ZFS dataset) share.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dsg_core::manifest::{stream_entries, Manifest, ManifestError, Metadata};
use dsg_txn::{Aside, Layout, Op, TxError};

use crate::backend::AgentError;
use crate::protocol::{ErrorKind, StagedFile};

/// The head a sync builds on, as read at its `begin`: not its entries,
/// which would be over 100 MB at a million files.
pub(crate) struct Base {
    pub metadata: Option<Metadata>,
    pub entry_count: u64,
    /// The entries, sorted, of a head file that does not have them in
    /// path order.
    pub whole: Option<Manifest>,
    /// Read from the binary copy (`HEAD_COPY`) made from the head file
    /// hashing to this: the commit check reads the entries from it too.
    pub copy_of: Option<CopyOf>,
}

/// The head file a binary copy was found current for at `begin`.
#[derive(Clone, Copy)]
pub(crate) struct CopyOf {
    /// The head's XXH3, the copy's tag.
    pub tag: u64,
    /// The head file's stat while it was hashed: while the path still
    /// stats the same, its bytes are those hashed, and the commit check
    /// need not read the head again to know it.
    pub stamp: Option<Stamp>,
}

/// How long ago a file must have been written for its `Stamp` to tell
/// every later write: two coarse clock ticks.
const STAMP_SETTLED_NS: i64 = 20_000_000;

/// What changes whenever a file's bytes do, read without reading them:
/// a writer changes the ctime (which no call can set back), an atomic
/// replace the inode.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stamp {
    pub fn of(md: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
        }
    }

    pub fn of_path(p: &Path) -> Option<Stamp> {
        std::fs::symlink_metadata(p).ok().map(|m| Stamp::of(&m))
    }
}

/// The repository's binary copy of its head (`.dsg/last-sync.bin`),
/// written by the commit that made the head, while it checked the upload.
/// Reading it costs a fraction of parsing the JSON (24 MB at 100 000
/// files); it counts only while the JSON file hashes to its tag, so a head
/// written by anything else (the original dsg) is read as JSON again.
pub(crate) const HEAD_COPY: &str = "last-sync.bin";

/// A head file's summary for `begin` (see `Site::head_base`), read from
/// its JSON: a head not in path order is held sorted.
pub(crate) fn head_base_of(f: File, p: &Path) -> Result<Option<Base>, AgentError> {
    let corrupt = |e: ManifestError| AgentError::new(ErrorKind::Corrupt, e.to_string());
    let read = stream_entries(std::io::BufReader::with_capacity(1 << 16, f), p, |_| Ok(()))
        .map_err(corrupt)?;
    if read.sorted {
        return Ok(Some(Base {
            metadata: read.metadata,
            entry_count: read.entry_count,
            whole: None,
            copy_of: None,
        }));
    }
    // Not in path order (the original writes its own order): the commit
    // check walks the base in path order, so it is held sorted; this also
    // makes the checks a stream could not.
    let m = Manifest::load_optional(p).map_err(corrupt)?;
    Ok(m.map(|m| Base {
        metadata: m.metadata.clone(),
        entry_count: m.len() as u64,
        whole: Some(m),
        copy_of: None,
    }))
}

/// The XXH3 of the head file, the tag its binary copy must carry.
pub(crate) fn head_tag(head: &Path) -> std::io::Result<u64> {
    dsg_core::hash::hash_file(head).map(|(h, _)| h.0)
}

#[derive(Clone, Copy)]
pub(crate) enum LockMode {
    Exclusive,
    Shared,
}

/// A `flock` held on an open lock file, released when dropped (closing
/// the file releases it). The holder text written into an exclusive lock
/// file stays; it is only read while someone holds the lock.
pub(crate) struct Lock(File);

/// A repository: `<mountpoint>/<name>`, its lock timeout, and who works
/// on it (shown to others waiting for its lock).
pub(crate) struct Site {
    pub mountpoint: PathBuf,
    pub name: String,
    pub lock_timeout: Duration,
    pub who: String,
}

impl Site {
    pub fn new(repo_dir: &Path) -> Result<Site, AgentError> {
        let name = repo_name_of(repo_dir)?;
        let mountpoint = repo_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
        let secs = std::env::var("DSG_LOCK_TIMEOUT")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(30.0);
        Ok(Site {
            mountpoint,
            name,
            lock_timeout: Duration::from_secs_f64(secs),
            who: String::new(),
        })
    }

    pub fn dir(&self) -> PathBuf {
        self.mountpoint.join(&self.name)
    }

    pub fn dsg(&self) -> PathBuf {
        self.dir().join(".dsg")
    }

    /// True when the repository exists (has a manifest).
    pub fn exists(&self) -> bool {
        self.dsg().join("last-sync.json").is_file()
    }

    pub fn head(&self) -> Result<Option<Manifest>, AgentError> {
        let p = self.dsg().join("last-sync.json");
        Manifest::load_optional(&p).map_err(|e| AgentError::new(ErrorKind::Corrupt, e.to_string()))
    }

    /// The head as a sync needs it at `begin`: read through and checked
    /// like `head`, but only its metadata kept (its entries are read again,
    /// streamed, by the commit check).
    pub fn head_base(&self) -> Result<Option<Base>, AgentError> {
        let p = self.dsg().join("last-sync.json");
        let corrupt = |e: ManifestError| AgentError::new(ErrorKind::Corrupt, e.to_string());
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(corrupt(ManifestError::Io { path: p, source })),
        };
        if let Some(base) = self.head_from_copy(&p, &f) {
            return Ok(Some(base));
        }
        // The copy's check may have read some of it.
        (&f).seek(std::io::SeekFrom::Start(0)).map_err(|source| {
            corrupt(ManifestError::Io {
                path: p.clone(),
                source,
            })
        })?;
        head_base_of(f, &p)
    }

    /// The head's summary from its binary copy, when there is one made
    /// from the head file as it is now and it reads back intact; else the
    /// JSON is read (and a damaged copy is replaced by the next commit).
    /// `f` is the head file open at `head`.
    fn head_from_copy(&self, head: &Path, mut f: &File) -> Option<Base> {
        let copy = File::open(self.dsg().join(HEAD_COPY)).ok()?;
        let before = f.metadata().ok().map(|m| Stamp::of(&m));
        let tag = dsg_core::hash::hash_reader(&mut f).ok()?.0 .0;
        // Stamped only if nothing wrote the file while it was hashed, the
        // path still names it, and it was last written a few clock ticks
        // ago: a kernel stamps files from a coarse clock (up to 10 ms a
        // tick), so a write within the tick of the last one could leave
        // every field as it was.
        let after = f.metadata().ok().map(|m| Stamp::of(&m));
        let settled = dsg_core::scan::now_ns() - STAMP_SETTLED_NS;
        let stamp = before.filter(|b| {
            after == Some(*b)
                && Stamp::of_path(head) == Some(*b)
                && b.mtime_ns.max(b.ctime_ns) < settled
        });
        let read = dsg_core::manifest::binary::read_stream(
            std::io::BufReader::with_capacity(1 << 16, copy),
            tag,
            |_| Ok(()),
        )
        .ok()?;
        Some(Base {
            metadata: read.metadata,
            entry_count: read.entry_count,
            whole: None,
            copy_of: Some(CopyOf { tag, stamp }),
        })
    }

    /// Applies committed operations to the tree at `root` (the repository,
    /// or a ZFS transaction's clone).
    pub fn apply(
        &self,
        root: &Path,
        tx: &str,
        ops: &[Op],
        keep_objects: bool,
        flat: bool,
    ) -> Result<(), AgentError> {
        dsg_txn::apply::apply(&layout(root, tx, keep_objects, flat), ops).map_err(tx_error)
    }

    /// Takes the exclusive lock at `path`, waiting up to the timeout.
    pub fn lock(&self, path: &Path) -> Result<Lock, AgentError> {
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
    pub fn take_flock(
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

    /// Whether this user can run a recovery in `dir`. A reader who may not
    /// write there skips leftovers that do not touch the head (an upload's
    /// staging, an init's) — a writer's next command removes them — but
    /// cannot read past a committed transaction that is not finished:
    /// after waiting for the writer holding `lock` (it may be finishing it
    /// right now), it fails if `unfinished` still says so.
    pub fn may_recover(
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
}

/// The original dsg's transaction `staging` is open beside `site`'s
/// repository (`waited`: at begin, for how long; `None`: it appeared while
/// this sync uploaded). A crashed original leaves it for good, and which
/// repository it was for cannot be told from its name: the hint says how
/// to clear it rather than dsg guessing.
pub(crate) fn original_busy(site: &Site, staging: &Path, waited: Option<Duration>) -> AgentError {
    let (dir, st) = (site.dir(), staging.display());
    let message = match waited {
        Some(w) => format!(
            "repository {} is busy: the original dsg is writing it ({st} exists beside it; waited {:.1} s); nothing was changed",
            dir.display(),
            w.as_secs_f64()
        ),
        None => format!(
            "repository {} is busy: the original dsg began writing it while this sync uploaded ({st} exists beside it), and its commit would discard this snapshot; nothing was changed",
            dir.display()
        ),
    };
    let crashed = if fs::symlink_metadata(&dir).is_ok() {
        format!("a crashed one left it: remove it (rm -r {st})")
    } else {
        format!(
            "a crashed one left it in the middle of its commit, and it holds the repository: mv {st} {} and remove {}.old-*",
            dir.display(),
            dir.display()
        )
    };
    AgentError::new(ErrorKind::Busy, message).hint(format!(
        "the original dsg takes no lock and replaces the whole repository when it commits; let its sync or clone finish, then run the command again (DSG_LOCK_TIMEOUT sets the wait in seconds). If no original dsg is working on a repository in {} (the name does not say which), {crashed}",
        site.mountpoint.display()
    ))
}

/// In a sync's staging directory `.dsg/staging/<tx>/`: the staged files
/// side by side, each named by `dsg_txn::apply::flat_name` of its path.
pub(crate) const FLAT_FILES: &str = ".dsg-files";
/// Beside them: `<name> <path>\0` per staged file, what a resumed upload
/// is told it can build on (the names alone do not give the paths back).
pub(crate) const FLAT_INDEX: &str = ".dsg-index";
/// And the transaction's metadata (manifest, messages, archive).
pub(crate) const STAGED_META: &str = ".dsg-meta";

/// Where a repository transaction rooted at `root` stages, and where it
/// puts what it replaces: the object store, or nothing (ZFS snapshots keep
/// every old version). `flat`: the files are staged in `FLAT_FILES`; not
/// so (at their paths) only for a transaction an older dsg staged.
pub(crate) fn layout(root: &Path, tx: &str, keep_objects: bool, flat: bool) -> Layout {
    let dsg = root.join(".dsg");
    let staging = dsg.join("staging").join(tx);
    Layout {
        root: root.to_path_buf(),
        meta: staging.join(STAGED_META),
        files: if flat {
            staging.join(FLAT_FILES)
        } else {
            staging
        },
        flat,
        dsg,
        aside: if keep_objects {
            Aside::Objects
        } else {
            Aside::Discard
        },
        keep_top_level: false,
        fp: "repo",
    }
}

/// The agent's error for an engine error, with the hint a repository
/// user needs.
pub(crate) fn tx_error(e: TxError) -> AgentError {
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
pub fn repo_name_of(repo_dir: &Path) -> Result<String, AgentError> {
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

pub(crate) fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .to_string()
}

pub(crate) fn syncfs(p: &Path) -> Result<(), AgentError> {
    dsg_txn::apply::syncfs(p).map_err(tx_error)
}

pub(crate) fn remove_dir_all_if_exists(p: &Path) -> Result<(), AgentError> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(format!("cannot remove {}", p.display()), e)),
    }
}

pub(crate) fn remove_temp_files(dir: &Path) -> Result<(), AgentError> {
    if let Ok(rd) = fs::read_dir(dir) {
        for de in rd.flatten() {
            if dsg_core::atomic::is_temp_name(&de.file_name().to_string_lossy()) {
                let _ = fs::remove_file(de.path());
            }
        }
    }
    Ok(())
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
pub(crate) fn is_base(head: Option<&Base>, id: &str, hash: Option<&str>) -> bool {
    let md = head.and_then(|h| h.metadata.as_ref());
    md.is_some_and(|m| m.snapshot_id == id)
        && hash.is_none_or(|h| md.and_then(|m| m.snapshot_hash.as_deref()) == Some(h))
}

/// The regular files a sync staged flat in `staging`, by its index, with
/// their lengths: what a resumed upload can build on. A line that does not
/// name its file (torn by a crash) is skipped: that file is sent again.
pub(crate) fn list_staged_flat(staging: &Path) -> Result<Vec<StagedFile>, AgentError> {
    let index = staging.join(FLAT_INDEX);
    let bytes = match fs::read(&index) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(AgentError::io(index.display(), e)),
    };
    let files = staging.join(FLAT_FILES);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in bytes.split(|b| *b == 0) {
        let Some((name, path)) = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.split_once(' '))
        else {
            continue;
        };
        if name != dsg_txn::apply::flat_name(path) || !seen.insert(name) {
            continue;
        }
        match fs::symlink_metadata(files.join(name)) {
            Ok(m) if m.is_file() => out.push(StagedFile {
                path: path.to_string(),
                len: m.len(),
            }),
            _ => {}
        }
    }
    Ok(out)
}

/// Regular files under a transaction's staging directory (not `skip`, its
/// own metadata) with their lengths: what a resumed upload can build on.
pub(crate) fn list_staged(staging: &Path, skip: &str) -> Result<Vec<StagedFile>, AgentError> {
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
