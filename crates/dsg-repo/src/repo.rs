//! The repository the agent drives, for every kind of store.
//!
//! Uploads are staged and verified here the same way for a directory and
//! for ZFS; the new manifest is checked against what was staged and the
//! base; the apply is prepared (`dsg_txn::apply::prepare`) before the
//! store's commit point. The store (`store.rs`) makes, commits, undoes
//! and recovers transactions its own way.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dsg_core::atomic::write_atomic;
use dsg_core::manifest::{
    stream_entries, strict_snapshot_number, Entry, EntryKind, ManifestError, Metadata, ShapeCheck,
    StreamedManifest, SyncMessages,
};
use dsg_core::paths::{check_link_target, check_relpath};
use dsg_txn::failpoint::failpoint;
use dsg_txn::Op;
use xxhash_rust::xxh3::Xxh3;

use crate::backend::{AgentError, Backend, CommitData, LocalFile, Stored, Version};
use crate::protocol::{ErrorKind, StagedFile};
use crate::site::{
    is_base, original_busy, syncfs, tx_error, Base, CopyOf, Lock, LockMode, Site, Stamp,
    FLAT_FILES, FLAT_INDEX, HEAD_COPY,
};
use crate::store::{Store, TxRef};
use crate::writeback::Writeback;
use rayon::prelude::*;

/// What was staged at a path, checked against the new manifest at commit.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum StagedKind {
    File { size: u64, hash: u64 },
    Link { target: String },
}

/// What a transaction staged, in staging order, checked against the new
/// manifest at commit. An init stages every file, so the list is held
/// compactly: each path as the bytes it does not share with the one
/// before (a client sends in path order: mostly a file name), its size as
/// a varint and its hash, about 20 bytes a file where a `String` and an
/// enum took 100.
#[derive(Default)]
pub(crate) struct StagedList {
    bytes: Vec<u8>,
    last: String,
    /// Every path came after the one before (none twice): the commit check
    /// walks the list as it is, without sorting a copy.
    sorted: bool,
}

const STAGED_FILE: u8 = 0;
const STAGED_LINK: u8 = 1;

impl StagedList {
    pub(crate) fn push(&mut self, path: &str, kind: &StagedKind) {
        let shared = common_prefix(&self.last, path);
        self.sorted = self.bytes.is_empty() || (self.sorted && path > self.last.as_str());
        put_varint(&mut self.bytes, shared as u64);
        put_varint(&mut self.bytes, (path.len() - shared) as u64);
        self.bytes.extend_from_slice(&path.as_bytes()[shared..]);
        match kind {
            StagedKind::File { size, hash } => {
                self.bytes.push(STAGED_FILE);
                put_varint(&mut self.bytes, *size);
                self.bytes.extend_from_slice(&hash.to_le_bytes());
            }
            StagedKind::Link { target } => {
                self.bytes.push(STAGED_LINK);
                put_varint(&mut self.bytes, target.len() as u64);
                self.bytes.extend_from_slice(target.as_bytes());
            }
        }
        self.last.truncate(shared);
        self.last.push_str(&path[shared..]);
    }

    /// In staging order.
    pub(crate) fn iter(&self) -> StagedIter<'_> {
        StagedIter {
            rest: &self.bytes,
            path: String::new(),
        }
    }

    /// In path order; of a path staged twice, the later staging last.
    /// Sorted here only if a client sent its files out of order.
    fn in_path_order(&self) -> Box<dyn Iterator<Item = (String, StagedKind)> + '_> {
        if self.sorted {
            return Box::new(self.iter());
        }
        let mut all: Vec<_> = self.iter().collect();
        // Stable: the later staging stays later.
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Box::new(all.into_iter())
    }
}

/// The length in bytes of the prefix `a` and `b` share, at a character
/// boundary (each stored piece is valid UTF-8).
fn common_prefix(a: &str, b: &str) -> usize {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    (0..=n).rev().find(|&i| b.is_char_boundary(i)).unwrap_or(0)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads back what `put_varint` wrote (the list is only ever read by the
/// process that wrote it).
fn take_varint(rest: &mut &[u8]) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let b = rest[0];
        *rest = &rest[1..];
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return v;
        }
        shift += 7;
    }
}

fn take_str<'b>(rest: &mut &'b [u8], n: usize) -> &'b str {
    let (s, r) = rest.split_at(n);
    *rest = r;
    std::str::from_utf8(s).expect("a staged list holds whole characters")
}

/// The staged paths, decoded one at a time.
pub(crate) struct StagedIter<'a> {
    rest: &'a [u8],
    path: String,
}

impl Iterator for StagedIter<'_> {
    type Item = (String, StagedKind);

    fn next(&mut self) -> Option<(String, StagedKind)> {
        if self.rest.is_empty() {
            return None;
        }
        let shared = take_varint(&mut self.rest) as usize;
        let n = take_varint(&mut self.rest) as usize;
        self.path.truncate(shared);
        self.path.push_str(take_str(&mut self.rest, n));
        let tag = self.rest[0];
        self.rest = &self.rest[1..];
        let kind = if tag == STAGED_FILE {
            let size = take_varint(&mut self.rest);
            let (h, r) = self.rest.split_at(8);
            self.rest = r;
            let hash = u64::from_le_bytes(h.try_into().expect("8 bytes"));
            StagedKind::File { size, hash }
        } else {
            let n = take_varint(&mut self.rest) as usize;
            let target = take_str(&mut self.rest, n).to_string();
            StagedKind::Link { target }
        };
        Some((self.path.clone(), kind))
    }
}

/// A repository served to the agent: its place, its store, and the open
/// transaction, which owns the locks it holds (released when it is
/// committed, rolled back, detached or dropped).
pub struct Repository {
    /// Reused for every received file (a fresh 1 MiB buffer per small file
    /// costs an mmap and page faults each time).
    buf: Vec<u8>,
    pub(crate) site: Site,
    pub(crate) store: Box<dyn Store>,
    /// The shared lock of a read of several files (`read_lock`).
    read_lock: Option<Lock>,
    pub(crate) tx: Option<OpenTx>,
}

pub(crate) struct OpenTx {
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
    staged: StagedList,
    /// An init's staging directories known to exist (saves a stat per
    /// path component).
    dirs: std::collections::HashSet<String>,
    /// A sync's flat staging folder (`site::FLAT_FILES`) exists.
    flat_made: bool,
    base: Option<Base>,
    /// Started at the first staged file (`None` inside: it could not be).
    writeback: Option<Option<Writeback>>,
    /// A sync's commit checked and staged up to its commit point
    /// (`Backend::prepare_commit`).
    prepared: Option<Prepared>,
}

/// What a commit has ready before its commit point: the apply's
/// operations, prepared, and the tag of the head the agent wrote itself.
pub(crate) struct Prepared {
    ops: Vec<Op>,
    head_written: Option<u64>,
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
        base: Option<Base>,
    ) -> OpenTx {
        OpenTx {
            _locks: vec![lock],
            id: id.into(),
            root,
            staging,
            init,
            replace: false,
            staged: StagedList::default(),
            dirs: Default::default(),
            flat_made: false,
            base,
            writeback: None,
            prepared: None,
        }
    }
}

impl OpenTx {
    /// A transaction whose exclusion is held by its backend rather than by
    /// lock files (an object store's lease): only what the commit check
    /// reads — the staged paths, the base — and a local scratch folder
    /// (`staging`) for what the check writes.
    pub(crate) fn unlocked(id: &str, staging: PathBuf, init: bool, base: Option<Base>) -> OpenTx {
        OpenTx {
            _locks: Vec::new(),
            id: id.into(),
            root: staging.clone(),
            staging,
            init,
            replace: false,
            staged: StagedList::default(),
            dirs: Default::default(),
            flat_made: false,
            base,
            writeback: None,
            prepared: None,
        }
    }

    pub(crate) fn stage(&mut self, path: String, kind: StagedKind) {
        self.staged.push(&path, &kind);
    }

    fn as_ref(&self) -> TxRef<'_> {
        TxRef {
            id: &self.id,
            root: &self.root,
            staging: &self.staging,
            init: self.init,
            replace: self.replace,
        }
    }
}

impl Repository {
    pub(crate) fn new(repo_dir: &Path, store: Box<dyn Store>) -> Result<Repository, AgentError> {
        Ok(Repository {
            buf: vec![0u8; 1 << 20],
            site: Site::new(repo_dir)?,
            store,
            read_lock: None,
            tx: None,
        })
    }

    /// `begin` of an init: the new repository is made aside.
    fn begin_init(&mut self, tx_id: &str) -> Result<OpenTx, AgentError> {
        let site = &self.site;
        if !site.mountpoint.is_dir() {
            return Err(AgentError::new(
                ErrorKind::NotFound,
                format!(
                    "repository path {} does not exist",
                    site.mountpoint.display()
                ),
            )
            .hint("create it on the repository host, or pass the right --repo-path"));
        }
        let lock = site.lock(&self.store.init_lock(site))?;
        if fs::symlink_metadata(site.dir()).is_ok() {
            let hint = if site.exists() {
                "choose another --repo-name, or replace it with 'dsg init --force' (asks for confirmation)"
            } else {
                "it is not a dsg repository: choose another --repo-name, or move it away yourself"
            };
            return Err(AgentError::new(
                ErrorKind::Exists,
                format!("{} already exists", site.dir().display()),
            )
            .hint(hint));
        }
        let staging = self.store.begin_init(site, tx_id)?;
        let tx = OpenTx::new(lock, tx_id, staging.clone(), staging.clone(), true, None);
        fs::create_dir_all(staging.join(".dsg/archive")).map_err(|e| {
            let _ = self.store.undo(site, &tx.as_ref());
            AgentError::io(staging.display(), e)
        })?;
        Ok(tx)
    }

    /// `begin` of a sync: locked, recovered, and only on the planned base.
    fn begin_sync(
        &mut self,
        tx_id: &str,
        base_id: &str,
        base_hash: Option<&str>,
    ) -> Result<OpenTx, AgentError> {
        let site = &self.site;
        let start = Instant::now();
        let lock = loop {
            // Before the existence check: between the two renames of the
            // original's commit the repository is missing for a moment.
            self.wait_for_original(start)?;
            if !site.exists() {
                return Err(AgentError::new(
                    ErrorKind::NotFound,
                    format!(
                        "{} is not a dsg repository (no .dsg/last-sync.json)",
                        site.dir().display()
                    ),
                ));
            }
            let lock = site.lock(&self.store.repo_lock(site))?;
            if self.store.original_transaction(site).is_none() {
                break lock;
            }
            // It began while we took the lock. Its commit swaps in a copy
            // of the directory, lock file and all, so our lock would then
            // hold nothing: let go, wait, and take the one there then.
        };
        self.store.recover_locked(site)?;
        crate::prune::recover_locked(site, &*self.store)?;
        let head = site.head_base()?;
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
        // The id names the store's base (a ZFS snapshot) and, at commit,
        // the archive file: refuse a strange one before it is used.
        checked_head_id(base_id)?;
        let root = self.store.begin_sync(site, tx_id, base_id)?;
        let staging = root.join(".dsg/staging").join(tx_id);
        let tx = OpenTx::new(lock, tx_id, root, staging.clone(), false, head);
        if let Err(e) = fs::create_dir_all(staging.join(".dsg-meta/archive")) {
            // A full disk, say: leave the repository as it was (the next
            // command's recovery would, but a reader must not find
            // leftovers now).
            let _ = self.store.undo(site, &tx.as_ref());
            return Err(AgentError::io(staging.display(), e));
        }
        Ok(tx)
    }

    /// Waits, up to the lock timeout counted from `start`, while the
    /// original dsg has a transaction open on the repository.
    pub(crate) fn wait_for_original(&self, start: Instant) -> Result<(), AgentError> {
        while let Some(st) = self.store.original_transaction(&self.site) {
            if start.elapsed() >= self.site.lock_timeout {
                return Err(original_busy(&self.site, &st, Some(start.elapsed())));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The new manifest, checked against what was staged and the base:
    /// the repository must equal its manifest afterwards. Returns the
    /// base's paths it drops or replaces, with their content hashes.
    ///
    /// Neither manifest is held: both are sorted by path, so one read of
    /// the upload walks the base (read by a helper thread) and the staged
    /// paths alongside it. Its findings are reported after the read, in
    /// the order the checks had when the upload was parsed whole first.
    fn verify_commit(&self, tx: &OpenTx, c: &CommitData) -> Result<Verified, AgentError> {
        let head_path = self.site.dsg().join("last-sync.json");
        verify_commit_at(tx, c, &head_path, &self.meta_dir(tx))
    }

    /// Where the transaction stages the repository's metadata: an init's
    /// future `.dsg/`, or what the apply moves into `.dsg/`.
    fn meta_dir(&self, tx: &OpenTx) -> PathBuf {
        tx.staging.join(if tx.init { ".dsg" } else { ".dsg-meta" })
    }

    /// An init's commit: the new repository's metadata, durable, then the
    /// store's commit point.
    fn commit_init(&self, tx: &OpenTx, c: &CommitData) -> Result<(), AgentError> {
        let dsg = tx.staging.join(".dsg");
        c.manifest
            .write_atomic(&dsg.join("last-sync.json"))
            .map_err(|e| AgentError::io("staging manifest", e.source))?;
        write_atomic(&dsg.join("sync-messages.json"), &c.sync_messages)
            .map_err(|e| AgentError::io("staging sync-messages", e.source))?;
        File::create(dsg.join("lock")).map_err(|e| AgentError::io("creating the lock file", e))?;
        syncfs(&tx.staging)?;
        failpoint("repo.init.before_rename");
        if dsg_txn::failpoint::injected_error("repo.init.before_rename") {
            return Err(AgentError::new(
                ErrorKind::Io,
                "injected failure before the init's commit point (DSG_FAILPOINT)",
            ));
        }
        self.store.commit_init(&self.site, &tx.as_ref())
    }

    /// Everything a commit does before its commit point: the new manifest
    /// checked; for a sync also the metadata and the old head's archive
    /// staged and durable, and the apply prepared.
    fn stage_commit(&self, tx: &OpenTx, c: &CommitData) -> Result<Prepared, AgentError> {
        let t0 = std::time::Instant::now();
        let v = self.verify_commit(tx, c)?;
        tracing::debug!("agent: new manifest checked in {:?}", t0.elapsed());
        let ops = match tx.init {
            true => Vec::new(),
            false => self.stage_sync(tx, c, &v)?,
        };
        Ok(Prepared {
            ops,
            head_written: v.head_written,
        })
    }

    /// A sync's commit up to its commit point: the metadata and the old
    /// head's archive staged and durable, the apply prepared.
    fn stage_sync(&self, tx: &OpenTx, c: &CommitData, v: &Verified) -> Result<Vec<Op>, AgentError> {
        // Sync: stage the metadata, make everything durable, then commit.
        let retired = &v.retired[..];
        let meta = tx.staging.join(".dsg-meta");
        if v.head_written.is_none() {
            c.manifest
                .write_atomic(&meta.join("last-sync.json"))
                .map_err(|e| AgentError::io("staging manifest", e.source))?;
        }
        write_atomic(&meta.join("sync-messages.json"), &c.sync_messages)
            .map_err(|e| AgentError::io("staging sync-messages", e.source))?;
        // Archive the old head exactly as it is on disk, so its stored
        // entries_hash still verifies; never overwrite an archived snapshot.
        // The name is built from the validated number, never from the text
        // read off disk.
        if let Some(n) = base_number(tx)? {
            let name = dsg_core::manifest::archive_name(&format!("s{n}"));
            if !self.site.dsg().join("archive").join(&name).exists() {
                // Streamed: the head's text is never held whole.
                let raw = File::open(self.site.dsg().join("last-sync.json"))
                    .map_err(|e| AgentError::io("reading the head manifest", e))?;
                let path = meta.join("archive").join(&name);
                let mut out = dsg_core::atomic::AtomicFile::create(&path)
                    .map_err(|e| AgentError::io("staging archive", e.source))?;
                dsg_core::manifest::compress_archive_stream(
                    std::io::BufReader::with_capacity(1 << 16, raw),
                    std::io::BufWriter::with_capacity(1 << 16, out.file()),
                )
                .map_err(|e| AgentError::io("staging archive", e))?;
                out.commit(true)
                    .map_err(|e| AgentError::io("staging archive", e.source))?;
            }
        }
        let t0 = std::time::Instant::now();
        tracing::debug!("agent: metadata and archive staged");
        syncfs(&tx.staging)?;
        tracing::debug!("agent: staging durable in {:?}", t0.elapsed());
        failpoint("repo.before_commit");
        let mut ops = Self::sync_ops(tx, retired)?;
        // Everything the apply needs is made and checked now, before the
        // commit point: after it, only renames remain.
        let layout = crate::site::layout(&tx.root, &tx.id, self.store.keeps_objects(), true);
        dsg_txn::apply::prepare(&layout, &mut ops).map_err(|e| {
            let mut e = tx_error(e);
            e.message.push_str("; nothing was changed");
            e
        })?;
        tracing::debug!("agent: apply prepared");
        Ok(ops)
    }

    /// A sync's commit point and apply, of what `stage_sync` prepared.
    fn commit_sync(&self, tx: &OpenTx, c: &CommitData, ops: &[Op]) -> Result<(), AgentError> {
        let t0 = std::time::Instant::now();
        let done = self
            .store
            .commit_sync(&self.site, &tx.as_ref(), ops, &c.snapshot_id);
        tracing::debug!("agent: committed and applied in {:?}", t0.elapsed());
        done
    }

    /// Retire what is deleted or replaced (deepest first, so a folder is
    /// emptied before it may be replaced), then install what was staged.
    /// Refused if two staged paths share a flat name: one's file would be
    /// the other's, and the apply would install it as both.
    fn sync_ops(tx: &OpenTx, retired: &[(String, Option<u64>)]) -> Result<Vec<Op>, AgentError> {
        let staged: Vec<String> = tx.staged.iter().map(|(p, _)| p).collect();
        let paths = staged.iter().map(String::as_str);
        if let Some((a, b)) = sharing_a_name(paths, dsg_txn::apply::flat_hash) {
            return Err(AgentError::new(
                ErrorKind::Unsafe,
                format!("{a} and {b} have the same staging name; refusing to commit them"),
            )
            .hint("nothing was changed; rename one of the two files and run the command again"));
        }
        let mut ops = Vec::new();
        let mut retire: Vec<(&str, Option<u64>)> =
            retired.iter().map(|(p, h)| (p.as_str(), *h)).collect();
        retire.extend(staged.iter().map(|p| (p.as_str(), None)));
        // Deepest first, so a directory is emptied before it may be
        // replaced; of a path given twice, the one with the base's hash.
        retire.sort_by(|a, b| b.0.cmp(a.0).then(b.1.is_some().cmp(&a.1.is_some())));
        retire.dedup_by(|later, earlier| later.0 == earlier.0);
        for (p, hash) in retire {
            ops.push(Op::retire(p, hash, None));
        }
        let mut installs: Vec<&str> = staged.iter().map(String::as_str).collect();
        installs.sort();
        for p in installs {
            ops.push(Op::Install { path: p.into() });
        }
        Ok(ops)
    }

    /// Opens the staging file for `path` in the open transaction, keeping
    /// its first `keep` bytes (a resumed upload) and positioned after them.
    /// `resumable`: a file received over a connection, listed for a resume
    /// when it is staged from its start.
    /// Where a local copy of `path` is staged (never resumed: a copy on
    /// this host has no connection to lose), its folders made.
    fn staged_dst(&mut self, path: &str) -> Result<PathBuf, AgentError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| AgentError::new(ErrorKind::Protocol, "no open transaction"))?;
        checked(path)?;
        staged_path(tx, path, false)
    }

    fn open_staged(
        &mut self,
        path: &str,
        keep: u64,
        resumable: bool,
    ) -> Result<(PathBuf, File), AgentError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| AgentError::new(ErrorKind::Protocol, "no open transaction"))?;
        checked(path)?;
        let dst = staged_path(tx, path, resumable && keep == 0)?;
        let err = |e| AgentError::io(format!("cannot stage {path}"), e);
        if keep == 0 {
            let f = create_staged(&dst).map_err(err)?;
            return Ok((dst, f));
        }
        let f = staged_options().open(&dst).map_err(err)?;
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
        tx.staged.push(path, &StagedKind::File { size, hash });
        if let Some(w) = tx
            .writeback
            .get_or_insert_with(|| Writeback::start(&tx.staging))
        {
            w.staged(size);
        }
        failpoint("repo.stage_file");
        Ok(())
    }

    fn open_meta_once(&self, name: &str) -> Result<Option<File>, AgentError> {
        if name == crate::prune::RECORD {
            return crate::prune::open_record(&self.site, &*self.store);
        }
        let ok = matches!(name, "last-sync.json" | "sync-messages.json")
            || name
                .strip_prefix("archive/")
                .is_some_and(|n| !n.is_empty() && !n.contains('/') && !n.starts_with('.'));
        if !ok {
            return Err(AgentError::new(
                ErrorKind::Unsafe,
                format!("refusing to read .dsg/{name}"),
            )
            .hint("a client reads only last-sync.json, sync-messages.json, pruned.json and archive/<file>"));
        }
        match File::open(self.site.dsg().join(name)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AgentError::io(
                format!("cannot read {}", self.site.dsg().join(name).display()),
                e,
            )),
        }
    }
}

/// Readable too: a resumed prefix is hashed, and a local copy verified,
/// through the handle. O_NOFOLLOW: a staged path is ours, but never write
/// through a link.
fn staged_options() -> OpenOptions {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).custom_flags(libc::O_NOFOLLOW);
    opts
}

fn create_staged(dst: &Path) -> std::io::Result<File> {
    staged_options().create(true).truncate(true).open(dst)
}

/// Copies the local file `src` into a new staged file `dst`, then reads
/// back what landed: the staged file and its (size, XXH3).
fn copy_verified(path: &str, dst: &Path, src: &Path) -> Result<(File, (u64, u64)), AgentError> {
    let mut to =
        create_staged(dst).map_err(|e| AgentError::io(format!("cannot stage {path}"), e))?;
    let mut from = dsg_core::hash::open_nofollow(src)
        .map_err(|e| AgentError::io(format!("cannot read {}", src.display()), e))?;
    // std's copy uses copy_file_range between files: a reflink on XFS and
    // btrfs, an in-kernel copy elsewhere.
    std::io::copy(&mut from, &mut to)
        .map_err(|e| AgentError::io(format!("cannot stage {path}"), e))?;
    // Verify what landed, not what was meant to be sent.
    let verified =
        std::io::Seek::rewind(&mut to).and_then(|()| dsg_core::hash::hash_reader(&mut to));
    let (got, n) = verified.map_err(|e| AgentError::io(format!("verifying {path}"), e))?;
    Ok((to, (n, got.0)))
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

/// Where `path` is staged in the open transaction. An init's file at its
/// path in the new repository (its folders made as needed); a sync's side
/// by side with the others in `site::FLAT_FILES`, so no folder is made
/// (and removed after) per parent. `listed`: added to the index a resume
/// reads (`site::FLAT_INDEX`).
fn staged_path(tx: &mut OpenTx, path: &str, listed: bool) -> Result<PathBuf, AgentError> {
    if tx.init {
        let parent = staged_parent(tx, path)?;
        return Ok(parent.join(path.rsplit('/').next().unwrap_or(path)));
    }
    let files = tx.staging.join(FLAT_FILES);
    if !tx.flat_made {
        match fs::create_dir(&files) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(AgentError::io(files.display(), e)),
        }
        tx.flat_made = true;
    }
    let name = dsg_txn::apply::flat_name(path);
    if listed {
        // One write, never fsynced: the index only serves a resume, and a
        // line a crash tore is skipped (its file is sent again). Not kept
        // open: an open file would keep a ZFS clone busy at its unmount.
        let p = tx.staging.join(FLAT_INDEX);
        let line = [name.as_bytes(), b" ", path.as_bytes(), b"\0"].concat();
        OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .and_then(|mut f| f.write_all(&line))
            .map_err(|e| AgentError::io(p.display(), e))?;
    }
    Ok(files.join(name))
}

/// Two different paths to which `name` gives the same name, if any (the
/// same path staged twice shares its own).
fn sharing_a_name<'a>(
    paths: impl Iterator<Item = &'a str>,
    name: impl Fn(&str) -> u128,
) -> Option<(&'a str, &'a str)> {
    let mut named: Vec<(u128, &str)> = paths.map(|p| (name(p), p)).collect();
    named.sort_unstable();
    named
        .windows(2)
        .find(|w| w[0].0 == w[1].0 && w[0].1 != w[1].1)
        .map(|w| (w[0].1, w[1].1))
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

/// What a refused commit tells its client.
const REFUSED: &str =
    "nothing was changed; the client sent what no dsg client sends: run the command again with dsg";

/// The base's paths a commit drops or replaces, each with its content
/// hash (a file's; the apply files superseded versions by it).
type Retired = Vec<(String, Option<u64>)>;

/// The new manifest, checked against what was staged and the base (the
/// head file at `head_path`); a delta's merged head and the head's binary
/// copy are written into `meta`. See `Repository::verify_commit`.
pub(crate) fn verify_commit_at(
    tx: &OpenTx,
    c: &CommitData,
    head_path: &Path,
    meta: &Path,
) -> Result<Verified, AgentError> {
    // The id becomes a file name and a ZFS snapshot name: only the one
    // id this commit can have is accepted, before anything is read or
    // written on its behalf.
    let expected = format!("s{}", base_number(tx)?.unwrap_or(0) + 1);
    if c.snapshot_id != expected {
        return Err(AgentError::new(
            ErrorKind::Protocol,
            format!(
                "refusing snapshot id {:?}: this commit can only be {expected}",
                c.snapshot_id
            ),
        )
        .hint(
            "nothing was changed; run the command again with dsg, which numbers snapshots itself",
        ));
    }
    let delta = match &c.removed {
        Some(removed) => Some(Delta::read(tx, c, removed)?),
        None => None,
    };
    let mut copy = HeadCopy::create(&meta.join(HEAD_COPY));
    let (check, upload, base_reads, tag) =
        walk_new_manifest(tx, c, delta, &mut copy, head_path, meta);
    let new = upload?;
    check_base_reads(tx, check.base_done, base_reads)?;
    new.verify_integrity().map_err(|e| {
        AgentError::new(ErrorKind::Corrupt, format!("uploaded manifest: {e}")).hint(REFUSED)
    })?;
    if new.metadata.as_ref().map(|m| m.snapshot_id.as_str()) != Some(c.snapshot_id.as_str()) {
        return Err(AgentError::new(
            ErrorKind::Protocol,
            "manifest snapshot id does not match the commit",
        )
        .hint(REFUSED));
    }
    // A manifest that cannot be one tree on disk would pass the commit
    // point and then fail to apply, leaving every later command stuck.
    // Every dsg writes its manifests in path order, which the checks
    // walking it need.
    let shape = match (&check.disorder, check.shape_err) {
        (Some((a, b)), _) => Err(format!(
            "entries are not in path order: {b:?} comes after {a:?}"
        )),
        (None, Some(e)) => Err(e),
        (None, None) => check.shape.finish(|| -> Box<dyn Read + '_> {
            match &c.removed {
                None => c.manifest.reader(),
                // What a delta commit wrote (an unreadable file fails
                // the check).
                Some(_) => match File::open(meta.join("last-sync.json")) {
                    Ok(f) => Box::new(std::io::BufReader::with_capacity(1 << 16, f)),
                    Err(_) => Box::new(std::io::empty()),
                },
            }
        }),
    };
    shape.map_err(|e| {
        AgentError::new(ErrorKind::Corrupt, format!("uploaded manifest: {e}")).hint(REFUSED)
    })?;
    // Every later command reads the sync-messages: they must parse, and
    // record the snapshot they are committed with.
    let messages =
        SyncMessages::from_json_bytes(&c.sync_messages, Path::new("uploaded sync-messages"))
            .map_err(|e| AgentError::new(ErrorKind::Corrupt, e.to_string()).hint(REFUSED))?;
    if !messages.snapshots.contains_key(&c.snapshot_id) {
        return Err(AgentError::new(
            ErrorKind::Corrupt,
            format!(
                "uploaded sync-messages do not record snapshot {}",
                c.snapshot_id
            ),
        )
        .hint(REFUSED));
    }
    if let Some(e) = check.entry_err.or(check.stray_err) {
        return Err(e);
    }
    if let Some(w) = copy {
        // Only a cache: without it the next sync reads the JSON.
        let _ = w.finish(new.metadata.as_ref(), &new.stored_entries_hash, tag);
    }
    Ok(Verified {
        retired: check.retired,
        head_written: c.removed.as_ref().map(|_| tag),
    })
}

/// Walks the new manifest — the upload, or the base with a delta
/// applied (written as the new head meanwhile) — through the commit
/// check and into the head's binary copy, the base read alongside by
/// helper threads. Returns the check, the new manifest's summary, each
/// base read's outcome and the XXH3 of the new head's bytes.
fn walk_new_manifest<'t>(
    tx: &'t OpenTx,
    c: &CommitData,
    delta: Option<Delta>,
    copy: &mut Option<HeadCopy>,
    head_path: &Path,
    meta: &Path,
) -> Walk<'t> {
    std::thread::scope(|scope| {
        let mut readers = Vec::new();
        let mut base_cursor = || match &tx.base {
            None => BaseCursor::new(BaseSource::Empty),
            Some(Base { whole: Some(m), .. }) => {
                BaseCursor::new(BaseSource::Whole(m.entries().iter()))
            }
            Some(Base {
                whole: None,
                copy_of,
                ..
            }) => {
                // A bounded channel: the base is never more than a few
                // hundred entries ahead of the upload (a commit runs while
                // the client still holds its manifests: every MB counts).
                let (send, recv) = std::sync::mpsc::sync_channel(8);
                let (path, copy) = (&head_path, *copy_of);
                readers.push(scope.spawn(move || match copy {
                    Some(of) => read_base_copy(path, of, send),
                    None => read_base(path, send),
                }));
                BaseCursor::streamed(recv)
            }
        };
        let mut check = CommitCheck::new(&tx.staged, base_cursor());
        let mut visit = |e: Entry| {
            if let Some(w) = copy.as_mut() {
                if w.push(&e).is_err() {
                    *copy = None;
                }
            }
            check.entry(e);
        };
        let (upload, tag) = match delta {
            // The new manifest is the base with the delta applied,
            // written as the new head while the check walks it.
            Some(d) => d
                .apply(base_cursor(), &meta.join("last-sync.json"), &mut visit)
                .map(|(new, tag)| (Ok(new), tag))
                .unwrap_or_else(|e| (Err(e), 0)),
            None => {
                let mut bytes = dsg_core::hash::HashingReader::new(c.manifest.reader());
                let new = stream_entries(&mut bytes, Path::new("uploaded manifest"), |e| {
                    visit(e);
                    Ok(())
                })
                .map_err(|e| AgentError::new(ErrorKind::Corrupt, e.to_string()).hint(REFUSED));
                (new, bytes.digest().0)
            }
        };
        if upload.is_ok() {
            check.finish();
        }
        // Lets a reader still sending stop.
        check.base = BaseCursor::new(BaseSource::Empty);
        let base_reads: Vec<_> = readers
            .into_iter()
            .map(|r| r.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        (check, upload, base_reads, tag)
    })
}

/// Where the commit check's base entries come from, in path order.
enum BaseSource<'a> {
    /// An init: no base.
    Empty,
    /// A head file not in path order, held sorted.
    Whole(std::slice::Iter<'a, Entry>),
    /// Read off the head file by `read_base`, in batches (a channel
    /// message per entry cost more than reading the entry).
    Streamed(
        std::sync::mpsc::Receiver<Vec<Entry>>,
        std::vec::IntoIter<Entry>,
    ),
}

/// The base's entries, one looked ahead.
struct BaseCursor<'a> {
    src: BaseSource<'a>,
    next: Option<Entry>,
}

impl<'a> BaseCursor<'a> {
    fn new(src: BaseSource<'a>) -> BaseCursor<'a> {
        BaseCursor { src, next: None }
    }

    fn streamed(rx: std::sync::mpsc::Receiver<Vec<Entry>>) -> BaseCursor<'a> {
        Self::new(BaseSource::Streamed(rx, Vec::new().into_iter()))
    }

    fn peek(&mut self) -> Option<&Entry> {
        if self.next.is_none() {
            self.next = match &mut self.src {
                BaseSource::Empty => None,
                BaseSource::Whole(it) => it.next().cloned(),
                // Ends early if the reader fails: its error is checked
                // before anything found here is used.
                BaseSource::Streamed(rx, batch) => loop {
                    if let Some(e) = batch.next() {
                        break Some(e);
                    }
                    match rx.recv() {
                        Ok(b) => *batch = b.into_iter(),
                        Err(_) => break None,
                    }
                },
            };
        }
        self.next.as_ref()
    }

    /// The next entry if `take` says so.
    fn next_if(&mut self, take: impl FnOnce(&Entry) -> bool) -> Option<Entry> {
        if self.peek().is_some_and(take) {
            self.next.take()
        } else {
            None
        }
    }
}

/// The base's entries on their way to the commit check, a batch at a time.
struct BaseSender {
    send: std::sync::mpsc::SyncSender<Vec<Entry>>,
    batch: Vec<Entry>,
}

impl BaseSender {
    /// 64: a message per 64 entries costs nothing against reading them,
    /// and 512 held ~1 MB more in flight at a commit's peak.
    const BATCH: usize = 64;

    fn new(send: std::sync::mpsc::SyncSender<Vec<Entry>>) -> BaseSender {
        BaseSender {
            send,
            batch: Vec::with_capacity(Self::BATCH),
        }
    }

    fn push(&mut self, e: Entry) -> Result<(), String> {
        self.batch.push(e);
        if self.batch.len() == Self::BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        let b = std::mem::replace(&mut self.batch, Vec::with_capacity(Self::BATCH));
        self.send
            .send(b)
            .map_err(|_| "the commit check stopped reading".to_string())
    }

    /// Sends what is left once the read ended well (after a failure the
    /// check must not take a partial batch for the whole).
    fn end<T, E>(mut self, read: Result<T, E>) -> Result<T, E> {
        if read.is_ok() && !self.batch.is_empty() {
            let _ = self.flush();
        }
        read
    }
}

/// Sends the head file's entries, in its order, to the commit check.
fn read_base(
    path: &Path,
    send: std::sync::mpsc::SyncSender<Vec<Entry>>,
) -> Result<StreamedManifest, ManifestError> {
    let f = File::open(path).map_err(|source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = BaseSender::new(send);
    let read = stream_entries(std::io::BufReader::with_capacity(1 << 16, f), path, |e| {
        out.push(e)
    });
    out.end(read)
}

/// `read_base` from the head's binary copy that `begin` found made from
/// the head file: if the file hashes to anything else now, it changed, and
/// the JSON is read (its metadata then tells the commit so).
fn read_base_copy(
    head: &Path,
    of: CopyOf,
    send: std::sync::mpsc::SyncSender<Vec<Entry>>,
) -> Result<StreamedManifest, ManifestError> {
    let copy = head.with_file_name(HEAD_COPY);
    let io = |source| ManifestError::Io {
        path: head.to_path_buf(),
        source,
    };
    // The head as `begin` hashed it (24 MB at 100 000 files, read once a
    // base reader instead), or hashed again.
    let unchanged = of.stamp.is_some() && Stamp::of_path(head) == of.stamp;
    let tag = of.tag;
    if !unchanged && crate::site::head_tag(head).map_err(io)? != tag {
        return read_base(head, send);
    }
    let f = File::open(&copy).map_err(|source| ManifestError::Io {
        path: copy.clone(),
        source,
    })?;
    let mut out = BaseSender::new(send);
    let read = dsg_core::manifest::binary::read_stream(
        std::io::BufReader::with_capacity(1 << 16, f),
        tag,
        |e| out.push(e),
    );
    out.end(read).map_err(|e| {
        use dsg_core::manifest::binary::StreamError;
        let why = match e {
            StreamError::NotACopy => "not a copy of the head".to_string(),
            StreamError::Unusable(w) | StreamError::Visit(w) => w,
        };
        ManifestError::Corrupt {
            path: copy.clone(),
            msg: why,
        }
    })
}

/// The base the commit check walked must be the one `begin` read (the
/// lock keeps writers out): anything else, and what was walked is not the
/// base. (A walk stopped early stopped its readers too, and is refused.)
fn check_base_reads(
    tx: &OpenTx,
    base_done: bool,
    base_reads: Vec<Result<StreamedManifest, ManifestError>>,
) -> Result<(), AgentError> {
    for read in base_reads {
        let Some(base) = tx.base.as_ref().filter(|_| base_done) else {
            break;
        };
        let same = read.as_ref().is_ok_and(|r| {
            r.sorted && r.metadata == base.metadata && r.entry_count == base.entry_count
        });
        if !same {
            // Unreadable or damaged is the repository's problem, not a
            // race: a client told `Moved` would plan again and retry.
            let (kind, why) = match read {
                Err(e @ dsg_core::manifest::ManifestError::Io { .. }) => {
                    (ErrorKind::Io, e.message())
                }
                Err(e) => (ErrorKind::Corrupt, e.message()),
                Ok(_) => (
                    ErrorKind::Moved,
                    "it is not the head this sync began on".into(),
                ),
            };
            return Err(AgentError::new(
                kind,
                format!("reading the repository's head again failed: {why}"),
            )
            .hint("nothing was changed; run the command again"));
        }
    }
    Ok(())
}
/// What the walk of a new manifest gives `verify_commit` (see
/// `walk_new_manifest`).
type Walk<'t> = (
    CommitCheck<'t>,
    Result<StreamedManifest, AgentError>,
    Vec<Result<StreamedManifest, ManifestError>>,
    u64,
);

/// What a commit's check found: the base's paths it retires, and, for a
/// delta commit, the XXH3 of the head it wrote into staging.
pub(crate) struct Verified {
    pub retired: Retired,
    pub head_written: Option<u64>,
}

/// A delta commit's changes: added and changed entries and dropped paths,
/// each in path order, and the new manifest's metadata.
struct Delta {
    upserts: Vec<Entry>,
    removed: Vec<String>,
    metadata: Metadata,
}

impl Delta {
    fn read(tx: &OpenTx, c: &CommitData, removed: &[u8]) -> Result<Delta, AgentError> {
        let refused = |why: String| {
            AgentError::new(ErrorKind::Corrupt, format!("uploaded delta: {why}")).hint(REFUSED)
        };
        if tx.init || tx.base.is_none() {
            return Err(AgentError::new(
                ErrorKind::Protocol,
                "a delta commit needs a base to apply to",
            )
            .hint(REFUSED));
        }
        // Its entries are held: a client may not make that the whole
        // manifest (a dsg client sends a delta of at most 1/16 of it).
        let base_count = tx.base.as_ref().map_or(0, |b| b.entry_count);
        let most = (base_count / 8 + 4096) as usize;
        let mut upserts = Vec::new();
        let read = stream_entries(c.manifest.reader(), Path::new("uploaded delta"), |e| {
            if upserts.len() == most {
                return Err(format!(
                    "more than {most} entries for a base of {base_count}; send the whole manifest"
                ));
            }
            upserts.push(e);
            Ok(())
        })
        .map_err(|e| refused(e.message()))?;
        if !read.sorted {
            return Err(refused("entries are not in path order".into()));
        }
        let metadata = read
            .metadata
            .ok_or_else(|| refused("it has no metadata".into()))?;
        let removed: Vec<String> =
            serde_json::from_slice(removed).map_err(|e| refused(format!("dropped paths: {e}")))?;
        if removed
            .windows(2)
            .any(|w| w[0].as_bytes() >= w[1].as_bytes())
        {
            return Err(refused("dropped paths are not in path order".into()));
        }
        let mut up = upserts.iter().peekable();
        for p in &removed {
            while up.next_if(|e| e.path.as_bytes() < p.as_bytes()).is_some() {}
            if up.peek().is_some_and(|e| &*e.path == p) {
                return Err(refused(format!("{p:?} is both dropped and given")));
            }
        }
        Ok(Delta {
            upserts,
            removed,
            metadata,
        })
    }

    /// Merges the delta into the base, in path order: each entry of the new
    /// manifest goes to `visit` and into the new head written at `out`.
    /// Returns the new manifest's summary and the XXH3 of what was written.
    fn apply(
        self,
        mut base: BaseCursor<'_>,
        out: &Path,
        visit: &mut impl FnMut(Entry),
    ) -> Result<(StreamedManifest, u64), AgentError> {
        let io = |e| AgentError::io("staging manifest", e);
        let f = File::create(out).map_err(io)?;
        let mut json = dsg_core::manifest::JsonWriter::new(TagWriter {
            w: std::io::BufWriter::with_capacity(1 << 16, f),
            h: Xxh3::new(),
        });
        let mut hash = dsg_core::manifest::EntriesHasher::default();
        let mut count = 0u64;
        let mut up = self.upserts.into_iter().peekable();
        let mut removed = self.removed.iter().peekable();
        loop {
            let next_up = up.peek().map(|e| e.path.as_bytes());
            let from_delta = match (base.peek().map(|e| e.path.as_bytes()), next_up) {
                (None, None) => break,
                (Some(b), Some(u)) => u <= b,
                (b, _) => b.is_none(),
            };
            let e = if from_delta {
                let e = up.next().expect("peeked");
                // Replaces the base's entry of the same path.
                base.next_if(|b| b.path == e.path);
                e
            } else {
                let e = base.next_if(|_| true).expect("peeked");
                while removed
                    .next_if(|p| p.as_bytes() < e.path.as_bytes())
                    .is_some()
                {}
                if removed.next_if(|p| **p == *e.path).is_some() {
                    continue;
                }
                e
            };
            hash.push(&e);
            json.push(&e).map_err(io)?;
            count += 1;
            visit(e);
        }
        let mut w = json.finish(Some(&self.metadata)).map_err(io)?;
        w.w.flush().map_err(io)?;
        let tag = w.h.digest();
        Ok((
            StreamedManifest {
                metadata: Some(self.metadata),
                entry_count: count,
                stored_entries_hash: hash.finish(),
                sorted: true,
            },
            tag,
        ))
    }
}

/// Hashes what it writes: the tag of a head written as a stream.
struct TagWriter<W> {
    w: W,
    h: Xxh3,
}

impl<W: Write> Write for TagWriter<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(b)?;
        self.h.update(&b[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// The binary copy of the new head, written while the upload is checked
/// and moved into `.dsg/` with the rest of the metadata. A failure to
/// write it only loses the copy; unfinished, it is removed.
struct HeadCopy {
    path: PathBuf,
    w: Option<dsg_core::manifest::binary::StreamWriter<std::io::BufWriter<File>>>,
}

impl HeadCopy {
    fn create(path: &Path) -> Option<HeadCopy> {
        let f = File::create(path).ok()?;
        let w = std::io::BufWriter::with_capacity(1 << 16, f);
        Some(HeadCopy {
            path: path.to_path_buf(),
            w: Some(dsg_core::manifest::binary::StreamWriter::new(w)),
        })
    }

    fn push(&mut self, e: &Entry) -> std::io::Result<()> {
        match &mut self.w {
            Some(w) => w.push(e),
            None => Ok(()),
        }
    }

    fn finish(
        mut self,
        md: Option<&Metadata>,
        entries_hash: &str,
        tag: u64,
    ) -> std::io::Result<()> {
        let w = self.w.take().expect("finished once");
        w.finish(md, entries_hash, tag)?
            .into_inner()
            .map_err(|e| e.into_error())?;
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for HeadCopy {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn content_hash(e: &Entry) -> Option<u64> {
    match &e.kind {
        EntryKind::File { hash, .. } => hash.map(|h| h.0),
        EntryKind::Link { .. } => None,
    }
}

/// The walk of the uploaded manifest, in path order, alongside the base
/// and the staged paths (sorted here: few but for an init). What it finds
/// wrong is kept, first of each kind, for `verify_commit` to report in
/// its order.
struct CommitCheck<'a> {
    /// The staged paths not yet passed, in path order.
    staged: std::iter::Peekable<Box<dyn Iterator<Item = (String, StagedKind)> + 'a>>,
    base: BaseCursor<'a>,
    last: Option<String>,
    /// The first two paths out of order; the walk stops there.
    disorder: Option<(String, String)>,
    shape: ShapeCheck,
    shape_err: Option<String>,
    /// An entry neither staged as the manifest says nor unchanged.
    entry_err: Option<AgentError>,
    /// A staged path the manifest does not have.
    stray_err: Option<AgentError>,
    retired: Retired,
    /// The whole base was walked (not so after a refusal it caused).
    base_done: bool,
}

impl<'a> CommitCheck<'a> {
    fn new(staged: &'a StagedList, base: BaseCursor<'a>) -> CommitCheck<'a> {
        CommitCheck {
            staged: staged.in_path_order().peekable(),
            base,
            last: None,
            disorder: None,
            shape: ShapeCheck::new(),
            shape_err: None,
            entry_err: None,
            stray_err: None,
            retired: Vec::new(),
            base_done: false,
        }
    }

    fn entry(&mut self, e: Entry) {
        if self.disorder.is_some() {
            return;
        }
        let p = &*e.path;
        match &mut self.last {
            Some(last) if last.as_str() >= p => {
                self.disorder = Some((std::mem::take(last), p.to_string()));
                return;
            }
            Some(last) => {
                last.clear();
                last.push_str(p);
            }
            None => self.last = Some(p.to_string()),
        }
        if self.shape_err.is_none() {
            self.shape_err = self.shape.push(p).err();
        }
        self.strays_before(p);
        // Of a path staged twice, the later staging is the one kept.
        let mut staged = None;
        while let Some(s) = self.staged.next_if(|s| s.0 == p) {
            staged = Some(s.1);
        }
        while let Some(gone) = self.base.next_if(|b| &*b.path < p) {
            let hash = content_hash(&gone);
            self.retired.push((gone.path.into(), hash));
        }
        let old = self.base.next_if(|b| &*b.path == p);
        if self.entry_err.is_some() {
            return;
        }
        if let Some(k) = staged {
            let matches = match (&e.kind, &k) {
                (EntryKind::File { size, hash, .. }, StagedKind::File { size: s2, hash: h2 }) => {
                    size == s2 && hash.map(|h| h.0) == Some(*h2)
                }
                (EntryKind::Link { target }, StagedKind::Link { target: t2 }) => {
                    &**target == t2.as_str()
                }
                _ => false,
            };
            if !matches {
                self.entry_err = Some(AgentError::new(
                    ErrorKind::Verify,
                    format!("{p}: the uploaded content does not match the new manifest"),
                ));
            } else if let Some(old) = old {
                let hash = content_hash(&old);
                self.retired.push((old.path.into(), hash));
            }
        } else if !old.is_some_and(|b| b.same_content(&e)) {
            self.entry_err = Some(AgentError::new(
                ErrorKind::Protocol,
                format!("{p}: in the new manifest but neither uploaded nor unchanged"),
            ));
        }
    }

    /// Staged paths before `p` are not in the manifest.
    fn strays_before(&mut self, p: &str) {
        while let Some(s) = self.staged.next_if(|s| s.0.as_str() < p) {
            if self.stray_err.is_none() {
                self.stray_err = Some(AgentError::new(
                    ErrorKind::Protocol,
                    format!("{}: uploaded but not in the new manifest", s.0),
                ));
            }
        }
    }

    /// After the last entry: what remains of the base is dropped, what
    /// remains staged is not in the manifest.
    fn finish(&mut self) {
        if self.disorder.is_some() {
            return;
        }
        if let Some(s) = self.staged.peek() {
            self.stray_err.get_or_insert_with(|| {
                AgentError::new(
                    ErrorKind::Protocol,
                    format!("{}: uploaded but not in the new manifest", s.0),
                )
            });
        }
        while let Some(gone) = self.base.next_if(|_| true) {
            let hash = content_hash(&gone);
            self.retired.push((gone.path.into(), hash));
        }
        self.base_done = true;
    }
}

/// The number of the base's snapshot id (none for an init). The id was read
/// off disk and is used in paths: one not of the form `sN` (a repository
/// written by another tool, or tampered with) is refused, not used.
fn base_number(tx: &OpenTx) -> Result<Option<u64>, AgentError> {
    if tx.init {
        return Ok(None);
    }
    let id = tx
        .base
        .as_ref()
        .and_then(|b| b.metadata.as_ref())
        .map(|m| m.snapshot_id.as_str())
        .unwrap_or("");
    checked_head_id(id).map(Some)
}

/// `N` of a head id `sN`, or an error naming the id.
fn checked_head_id(id: &str) -> Result<u64, AgentError> {
    strict_snapshot_number(id)
        .filter(|n| *n < u64::MAX)
        .ok_or_else(|| {
            AgentError::new(
                ErrorKind::Corrupt,
                format!("the repository's head has snapshot id {id:?}, which is not of the form s<N>"),
            )
            .hint("the head manifest (.dsg/last-sync.json) was not written by dsg or was altered; restore it from a backup")
        })
}

fn valid_tx_id(tx_id: &str) -> bool {
    !tx_id.is_empty() && tx_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn checked(path: &str) -> Result<(), AgentError> {
    check_relpath(path).map_err(|e| AgentError::new(ErrorKind::Unsafe, e.to_string()))
}

impl Backend for Repository {
    fn describe(&self) -> String {
        self.store.describe(&self.site)
    }

    fn exists(&self) -> bool {
        self.site.exists()
    }

    fn open_meta(&self, name: &str) -> Result<Option<File>, AgentError> {
        let first = self.open_meta_once(name)?;
        if first.is_none() && self.store.swaps() && self.tx.is_none() {
            // A commit may swap the repository: for a moment it is not
            // mounted. Wait for the writer (shared lock), then look again.
            let lock = self.store.repo_lock(&self.site);
            let _guard = self.site.take_flock(&lock, LockMode::Shared, true)?;
            return self.open_meta_once(name);
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
        self.site.who = user.to_string();
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
        let tx = match base {
            None => self.begin_init(tx_id)?,
            Some(base_id) => self.begin_sync(tx_id, base_id, base_hash)?,
        };
        self.tx = Some(tx);
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
        let (dst, mut f) = self.open_staged(path, offset, true)?;
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
        // Never resumed: a copy on this host has no connection to lose.
        let dst = self.staged_dst(path)?;
        let (to, got) = copy_verified(path, &dst, src)?;
        self.accept_staged(path, &dst, to, got, (size, hash), mtime_ns)
    }

    fn stage_files_from(&mut self, files: &[LocalFile]) -> Result<(), AgentError> {
        // Paths are checked and their folders made one by one (the
        // transaction's list of made folders is shared); the copies, each
        // a file creation, a copy and a read to verify it, run on every
        // core; the files are accepted in order, as they were sent.
        let mut dsts = Vec::with_capacity(files.len());
        for f in files {
            dsts.push(self.staged_dst(&f.path)?);
        }
        let copied: Vec<_> = files
            .par_iter()
            .zip(&dsts)
            .map(|(f, dst)| copy_verified(&f.path, dst, &f.src))
            .collect();
        for ((f, dst), c) in files.iter().zip(&dsts).zip(copied) {
            let (to, got) = c?;
            self.accept_staged(&f.path, dst, to, got, (f.size, f.hash), f.mtime_ns)?;
        }
        Ok(())
    }

    fn stage_link(&mut self, path: &str, target: &str) -> Result<(), AgentError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| AgentError::new(ErrorKind::Protocol, "no open transaction"))?;
        checked(path)?;
        check_link_target(path, target)
            .map_err(|e| AgentError::new(ErrorKind::Unsafe, e.to_string()))?;
        let dst = staged_path(tx, path, false)?;
        let _ = fs::remove_file(&dst);
        symlink(target, &dst)
            .map_err(|e| AgentError::io(format!("cannot stage link {path}"), e))?;
        tx.staged.push(
            path,
            &StagedKind::Link {
                target: target.into(),
            },
        );
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
        if !self.store.occupied(&self.site)? {
            return self.begin(tx_id, None, None, user);
        }
        self.site.who = user.to_string();
        // Locks first, then recovery, then the check that the head is the
        // one the user confirmed, and only then is anything created.
        let mut locks = self.store.lock_for_replace(&self.site)?.into_iter();
        // What the user confirmed replacing must be what is replaced: a
        // sync committed since then would be lost unseen. The head file's
        // own hash: it exists even for a head without a snapshot hash.
        if let Some(expect) = expect_hash {
            let now = fs::read(self.site.dsg().join("last-sync.json"))
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
        let staging = self.store.begin_replace(&self.site, tx_id)?;
        let first = locks.next().expect("a replace holds a lock");
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
        self.site.who = user.to_string();
        let Some(r) = self.store.resumable(&self.site, tx_id, base, base_hash)? else {
            // begin() recovers what is left and says why not, if it cannot
            // begin either.
            return self
                .begin(tx_id, base, base_hash, user)
                .map(|()| Vec::new());
        };
        self.tx = Some(OpenTx::new(
            r.lock,
            tx_id,
            r.root,
            r.staging,
            base.is_none(),
            r.head,
        ));
        Ok(r.staged)
    }

    fn commit(&mut self, c: &CommitData) -> Result<(), AgentError> {
        let mut tx = self
            .tx
            .take()
            .ok_or_else(|| AgentError::new(ErrorKind::Protocol, "no open transaction"))?;
        // Its open directory would keep a ZFS clone from being unmounted.
        tx.writeback = None;
        // On success the transaction, and with it its locks, goes here.
        let staged = match tx.prepared.take() {
            Some(p) => Ok(p),
            None => self.stage_commit(&tx, c),
        };
        let head_written = staged.as_ref().ok().and_then(|p| p.head_written);
        let result = staged.and_then(|p| {
            if tx.init {
                self.commit_init(&tx, c)
            } else {
                self.commit_sync(&tx, c, &p.ops)
            }
        });
        let Err(e) = result else {
            return Ok(());
        };
        if let Some(done) = self.store.finish_failed_commit(&self.site, &tx.id) {
            return done.map_err(|mut e2| {
                e2.message.push_str(&format!(" (first error: {e})"));
                e2
            });
        }
        // Before the commit point this rolls back; after it, it rolls
        // forward, and then the commit did happen. Decided under the
        // locks, by the exact bytes: an id alone could be an older
        // repository's (a replaced one starts again at s1).
        let _locks = std::mem::take(&mut tx._locks);
        let _ = self.store.undo(&self.site, &tx.as_ref());
        let head = self.site.dsg().join("last-sync.json");
        let landed = match head_written {
            Some(tag) => crate::site::head_tag(&head).is_ok_and(|t| t == tag),
            None => c.manifest.same_as_file(&head),
        };
        // Committed in the journal but not rolled forward (the roll
        // forward failed too): recovery finishes it; never "failed".
        if landed {
            Ok(())
        } else if self.store.committed_unfinished(&self.site, &tx.id) {
            Err(AgentError::new(
                ErrorKind::Incomplete,
                format!("the snapshot was committed but applying it failed: {e}"),
            )
            .hint("run any dsg command to complete it once the problem is fixed"))
        } else {
            Err(e)
        }
    }

    fn prepare_commit(&mut self, c: &CommitData) -> Result<(), AgentError> {
        let mut tx = self
            .tx
            .take()
            .ok_or_else(|| AgentError::new(ErrorKind::Protocol, "no open transaction"))?;
        // An init has nothing to stage before its commit: it all happens
        // at once, at `commit`.
        let staged = match tx.init {
            true => Ok(()),
            false => {
                // Its open directory would keep a ZFS clone from being
                // unmounted; and the uploads are over.
                tx.writeback = None;
                self.stage_commit(&tx, c).map(|p| {
                    tx.prepared = Some(p);
                    failpoint("repo.prepared");
                })
            }
        };
        self.tx = Some(tx);
        staged
    }

    fn spool_file(&mut self) -> Option<File> {
        self.tx.as_ref()?;
        // Beside the repository (where the init lock and an init's staging
        // live), not in the transaction's tree: an open file, even
        // unlinked, would keep a ZFS clone busy when it is unmounted.
        let repo_dir = self.site.dir();
        let p = repo_dir.parent()?.join(format!(
            ".dsg-spool.{}.{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p);
        match f {
            Ok(f) => {
                // Unlinked at once: nothing is left behind, whatever happens.
                let _ = fs::remove_file(&p);
                Some(f)
            }
            Err(e) => {
                tracing::warn!("cannot spool the manifest in {}: {e}", p.display());
                None
            }
        }
    }

    fn rollback(&mut self) -> Result<(), AgentError> {
        match self.tx.take() {
            // Its locks are released after the undo, when it drops.
            Some(mut tx) => {
                tx.writeback = None;
                self.store.undo(&self.site, &tx.as_ref())
            }
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
        crate::history::open_in_tree(&self.site.dir(), path)
    }

    fn open_version(&mut self, snapshot: &str) -> Result<Box<dyn Version>, AgentError> {
        crate::history::open_version(&self.site, &*self.store, snapshot)
    }

    fn root(&self) -> PathBuf {
        self.site.dir()
    }

    fn mount_snapshot(
        &mut self,
        snapshot: &str,
        mountpoint: &Path,
    ) -> Result<(String, Box<dyn Send>), AgentError> {
        self.store.mount_snapshot(&self.site, snapshot, mountpoint)
    }

    fn read_lock(&mut self) -> Result<(), AgentError> {
        if self.tx.is_some()
            || self.read_lock.is_some()
            || (!self.store.swaps() && !self.site.dsg().is_dir())
        {
            return Ok(());
        }
        let lock = self.store.repo_lock(&self.site);
        self.read_lock = self.site.take_flock(&lock, LockMode::Shared, true)?;
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
            for path in [
                self.store.repo_lock(&self.site),
                self.store.init_lock(&self.site),
            ] {
                drop(self.site.take_flock(&path, LockMode::Shared, true)?);
            }
        }
        self.store.recover(&self.site)?;
        crate::prune::recover(&self.site, &*self.store)
    }

    fn prune(
        &mut self,
        policy: &crate::prune::Policy,
    ) -> Result<crate::protocol::PruneReport, AgentError> {
        crate::prune::prune(self, policy)
    }

    fn list_archives(&self) -> Result<Vec<String>, AgentError> {
        let mut names = Vec::new();
        match fs::read_dir(self.site.dsg().join("archive")) {
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

impl Drop for Repository {
    fn drop(&mut self) {
        if self.tx.is_some() {
            let _ = self.rollback();
        }
    }
}

#[allow(dead_code)]
fn _assert_object_safe(_: &dyn Backend) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_paths_sharing_a_staging_name_are_found() {
        // A name that collides on purpose: the length.
        let len = |p: &str| p.len() as u128;
        let paths = ["in/a", "in/bb", "in/a", "in/c"];
        assert_eq!(
            sharing_a_name(paths.iter().copied(), len),
            Some(("in/a", "in/c"))
        );
        // The same path staged twice shares only its own name.
        assert_eq!(
            sharing_a_name(["in/a", "in/bb", "in/a"].iter().copied(), len),
            None
        );
        assert_eq!(
            sharing_a_name(paths.iter().copied(), dsg_txn::apply::flat_hash),
            None
        );
    }

    fn file(size: u64, hash: u64) -> StagedKind {
        StagedKind::File { size, hash }
    }

    #[test]
    fn a_staged_list_gives_back_what_was_staged() {
        let link = StagedKind::Link {
            target: "../ä/b".into(),
        };
        let staged = [
            ("a/b/c.txt", file(0, 0)),
            ("a/b/cd", file(1 << 40, u64::MAX)),
            ("a/bé/x", link.clone()),
            ("a/bê", file(127, 1)),
            ("b", file(128, 2)),
        ];
        let mut list = StagedList::default();
        for (p, k) in &staged {
            list.push(p, k);
        }
        let want: Vec<_> = staged
            .iter()
            .map(|(p, k)| (p.to_string(), k.clone()))
            .collect();
        assert_eq!(list.iter().collect::<Vec<_>>(), want);
        assert!(list.sorted);
        assert_eq!(list.in_path_order().collect::<Vec<_>>(), want);
    }

    #[test]
    fn a_staged_list_out_of_order_is_sorted_keeping_the_later_staging() {
        let mut list = StagedList::default();
        for (p, k) in [("b/x", file(1, 1)), ("a", file(2, 2)), ("b/x", file(3, 3))] {
            list.push(p, &k);
        }
        assert!(!list.sorted);
        let got: Vec<_> = list.in_path_order().collect();
        assert_eq!(
            got,
            [
                ("a".to_string(), file(2, 2)),
                ("b/x".to_string(), file(1, 1)),
                ("b/x".to_string(), file(3, 3)),
            ]
        );
        // The same path twice in a row is not in path order either.
        let mut list = StagedList::default();
        list.push("a", &file(1, 1));
        list.push("a", &file(2, 2));
        assert!(!list.sorted);
        assert_eq!(StagedList::default().in_path_order().count(), 0);
    }
}
