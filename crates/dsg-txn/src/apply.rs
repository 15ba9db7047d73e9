//! The one apply engine: what a committed transaction does to a tree, on
//! the repository (its browsable mirror) and on the client (the working
//! tree) alike.
//!
//! A transaction stages its new files and metadata beside the tree, then
//! `prepare` checks and creates everything the apply will need — folders,
//! write permission, a little free space — *before* the commit point, so a
//! cause that would stop the apply halfway fails the transaction while
//! nothing was changed. After the commit point `apply` only renames: each
//! step looks at what is already done, so recovery can run it again after
//! a crash anywhere inside it.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use dsg_core::hash::Hash;
use dsg_core::scan::Stat;
use serde::{Deserialize, Serialize};

use crate::failpoint::failpoint;

/// One committed operation. Retires run deepest path first, so a folder
/// is emptied before something else takes its place; installs follow.
///
/// Kept small (a clone holds two per file): the path shared with the plan
/// that made it, what is known about a retired file boxed because most
/// retires know nothing (24 bytes an operation instead of 40). The journal
/// holds them in their wire shape, unchanged since the first journal:
/// written as `OpWireRef` (as every `OpList` is), read as `OpWire`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(from = "OpWire")]
pub enum Op {
    /// Move what is at `path` (if anything) aside; see `Known`.
    Retire {
        path: std::sync::Arc<str>,
        known: Option<Box<Known>>,
    },
    /// Move the staged `path` into place.
    Install { path: std::sync::Arc<str> },
}

/// What a retire knows of the file it moves aside. `hash`: its content
/// hash (names its object); `expect`: its stat (size, mtime ns, inode)
/// when planned — a file that no longer matches was changed by someone
/// during the sync and is kept beside its path instead.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Known {
    pub hash: Option<u64>,
    pub expect: Option<(u64, i64, u64)>,
}

impl Op {
    pub fn retire(
        path: impl Into<std::sync::Arc<str>>,
        hash: Option<u64>,
        expect: Option<(u64, i64, u64)>,
    ) -> Op {
        let known = (hash.is_some() || expect.is_some()).then(|| Box::new(Known { hash, expect }));
        Op::Retire {
            path: path.into(),
            known,
        }
    }

    pub fn path(&self) -> &str {
        match self {
            Op::Retire { path, .. } | Op::Install { path } => path,
        }
    }

    /// The operation as the engine reads it.
    pub fn as_op_ref(&self) -> OpRef<'_> {
        match self {
            Op::Retire { path, known } => OpRef::Retire {
                path,
                known: known.as_deref().copied().unwrap_or_default(),
            },
            Op::Install { path } => OpRef::Install { path },
        }
    }
}

impl Serialize for Op {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        OpWireRef::from(self.as_op_ref()).serialize(s)
    }
}

/// One operation as the engine reads it, from any `OpList`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OpRef<'a> {
    Retire { path: &'a str, known: Known },
    Install { path: &'a str },
}

impl<'a> OpRef<'a> {
    pub fn path(&self) -> &'a str {
        match *self {
            OpRef::Retire { path, .. } | OpRef::Install { path } => path,
        }
    }

    fn is_install(&self) -> bool {
        matches!(self, OpRef::Install { .. })
    }
}

/// A transaction's operations in order, however they are held: a list of
/// `Op`s (recovery, the repository), or a view that makes each one from
/// what the caller holds anyway (a clone's are two per file of the
/// repository's manifest, which names them all: no path copied).
pub trait OpList {
    fn len(&self) -> usize;
    /// The `i`th operation; `i < len()`.
    fn get(&self, i: usize) -> OpRef<'_>;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The operations of `ops`, in order.
pub fn iter_ops<O: OpList + ?Sized>(ops: &O) -> OpIter<'_, O> {
    OpIter { ops, i: 0 }
}

/// The operations of an `OpList`, in order.
pub struct OpIter<'a, O: OpList + ?Sized> {
    ops: &'a O,
    i: usize,
}

impl<'a, O: OpList + ?Sized> Iterator for OpIter<'a, O> {
    type Item = OpRef<'a>;
    fn next(&mut self) -> Option<OpRef<'a>> {
        (self.i < self.ops.len()).then(|| {
            self.i += 1;
            self.ops.get(self.i - 1)
        })
    }
}

impl OpList for [Op] {
    fn len(&self) -> usize {
        <[Op]>::len(self)
    }
    fn get(&self, i: usize) -> OpRef<'_> {
        self[i].as_op_ref()
    }
}

impl OpList for Vec<Op> {
    fn len(&self) -> usize {
        <[Op]>::len(self)
    }
    fn get(&self, i: usize) -> OpRef<'_> {
        <[Op] as OpList>::get(self, i)
    }
}

/// An operation in its journal shape, borrowed: how every operation is
/// written (`OpWire` reads it back).
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum OpWireRef<'a> {
    Retire {
        path: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        hash: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        expect: Option<(u64, i64, u64)>,
    },
    Install {
        path: &'a str,
    },
}

impl<'a> From<OpRef<'a>> for OpWireRef<'a> {
    fn from(o: OpRef<'a>) -> OpWireRef<'a> {
        match o {
            OpRef::Retire { path, known } => OpWireRef::Retire {
                path,
                hash: known.hash,
                expect: known.expect,
            },
            OpRef::Install { path } => OpWireRef::Install { path },
        }
    }
}

/// Serializes an `OpList` as the journal's array of operations, made one
/// at a time.
pub(crate) struct WireList<'a, O: OpList + ?Sized>(pub(crate) &'a O);

impl<O: OpList + ?Sized> Serialize for WireList<'_, O> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(iter_ops(self.0).map(OpWireRef::from))
    }
}

/// An operation in its journal shape, as read (older journals' names
/// included).
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum OpWire {
    #[serde(alias = "remove")]
    Retire {
        path: std::sync::Arc<str>,
        #[serde(default)]
        hash: Option<u64>,
        #[serde(default)]
        expect: Option<(u64, i64, u64)>,
    },
    Install {
        path: std::sync::Arc<str>,
    },
}

impl From<OpWire> for Op {
    fn from(w: OpWire) -> Op {
        match w {
            OpWire::Retire { path, hash, expect } => Op::retire(path, hash, expect),
            OpWire::Install { path } => Op::Install { path },
        }
    }
}

/// Where retired versions go.
#[derive(Debug, Clone)]
pub enum Aside {
    /// A repository directory keeps every version: into its object store
    /// (`<dsg>/objects/<hh>/<hash>`), deleted if the object is already there.
    Objects,
    /// The version is kept elsewhere (a ZFS snapshot): delete it.
    Discard,
    /// A working tree: into the transaction's backup folder, which is
    /// removed once the transaction is done. A version changed since it
    /// was planned, or a folder holding untracked files, stays beside its
    /// path under a conflict-backup name (`name~STAMP~`), which scans ignore.
    Backup { dir: PathBuf },
}

/// The places a transaction works with.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The tree the transaction changes.
    pub root: PathBuf,
    /// The staged files: at their paths, or (`flat`) by `flat_name`.
    pub files: PathBuf,
    /// Staged files lie side by side in `files` under `flat_name(path)`,
    /// not in a mirror of the tree's folders: staging then makes (and its
    /// removal deletes) no folder per parent.
    pub flat: bool,
    /// The staged metadata: `archive/*`, `sync-messages.json`,
    /// `last-sync.json` (installed last: it switches the head).
    pub meta: PathBuf,
    /// Where the metadata (and, for `Aside::Objects`, the object store)
    /// goes: `<root>/.dsg`.
    pub dsg: PathBuf,
    pub aside: Aside,
    /// Folders directly under the root (the data folders) stay when a
    /// transaction empties them.
    pub keep_top_level: bool,
    /// Failpoint names: `<fp>.apply.<i>`, `<fp>.apply.meta`.
    pub fp: &'static str,
}

impl Layout {
    /// Where the staged version of `path` is.
    pub fn staged(&self, path: &str) -> PathBuf {
        if self.flat {
            self.files.join(flat_name(path))
        } else {
            self.files.join(path)
        }
    }
}

/// The name a flat staging area gives `path`: its 128-bit hash, so the
/// apply (and recovery, from the journal's paths alone) finds it with no
/// index. Two paths of one transaction could share a name only by a
/// collision, which the repository refuses before the commit point.
pub fn flat_name(path: &str) -> String {
    format!("{:032x}", flat_hash(path))
}

/// The hash `flat_name` spells.
pub fn flat_hash(path: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(path.as_bytes())
}

#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: Permission denied (this folder is not writable)", path.display())]
    NotWritable { path: PathBuf },
    #[error("{}: no space left: the filesystem has {free} bytes free (or too few inodes), and committing needs at least {need} bytes", path.display())]
    NoSpace { path: PathBuf, free: u64, need: u64 },
    #[error("{path}: its parent {} is a symlink", link.display())]
    ThroughLink { path: String, link: PathBuf },
    #[error("{} is in the way and is not in any snapshot", path.display())]
    InTheWay { path: PathBuf },
}

impl TxError {
    fn io(path: impl Into<PathBuf>, source: io::Error) -> TxError {
        TxError::Io {
            path: path.into(),
            source,
        }
    }

    /// The path the error is about.
    pub fn path(&self) -> PathBuf {
        match self {
            TxError::Io { path, .. }
            | TxError::NotWritable { path }
            | TxError::NoSpace { path, .. }
            | TxError::InTheWay { path } => path.clone(),
            TxError::ThroughLink { link, .. } => link.clone(),
        }
    }

    /// The filesystem is full (a disk or a quota).
    pub fn is_no_space(&self) -> bool {
        match self {
            TxError::NoSpace { .. } => true,
            TxError::Io { source, .. } => {
                matches!(source.raw_os_error(), Some(c) if c == ENOSPC || c == EDQUOT)
            }
            _ => false,
        }
    }

    /// Permission or a read-only filesystem.
    pub fn is_not_writable(&self) -> bool {
        match self {
            TxError::NotWritable { .. } => true,
            TxError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(c) if c == EACCES || c == EPERM || c == EROFS
            ),
            _ => false,
        }
    }
}

const ENOSPC: i32 = rustix::io::Errno::NOSPC.raw_os_error();
const EDQUOT: i32 = rustix::io::Errno::DQUOT.raw_os_error();
const EACCES: i32 = rustix::io::Errno::ACCESS.raw_os_error();
const EPERM: i32 = rustix::io::Errno::PERM.raw_os_error();
const EROFS: i32 = rustix::io::Errno::ROFS.raw_os_error();

/// Free space the apply may still need after the commit point: its journal
/// records, and directory blocks for the entries it moves. Renames allocate
/// no data, so this margin is small and fixed per operation.
fn space_needed<O: OpList + ?Sized>(ops: &O, new_dirs: usize) -> u64 {
    // An entry moved into a folder grows it by its name and a few bytes
    // (128 is generous); a new folder costs a directory block and an
    // inode (XFS allocates inodes in chunks: count a share of one). Sized
    // so that a clone of a million files into an empty tree asks for
    // space it really needs, not gigabytes.
    256 * 1024 + 128 * ops.len() as u64 + (4096 + 512) * new_dirs as u64
}

/// Before the commit point: checks everything `apply` needs and creates
/// what it can out of sight (object folders, backup folders), so that
/// after the commit point nothing foreseeable can fail: the folders the
/// tree changes are writable and free of links, and the space the apply
/// needs (its new folders, its journal) is there. Fills in the hash of a
/// retired file that has none (its object's name).
///
/// Folders it makes are out of sight (in `.dsg`) and stay if the
/// transaction does not commit; the tree itself is not touched.
pub fn prepare(l: &Layout, ops: &mut [Op]) -> Result<(), TxError> {
    for (i, h) in prepare_list(l, &*ops)? {
        if let Op::Retire { known, .. } = &mut ops[i] {
            known.get_or_insert_with(Box::default).hash = Some(h);
        }
    }
    Ok(())
}

/// `prepare` for operations held in any form. Returns the hashes it
/// computed of retired files without one (`Aside::Objects` only), by
/// operation index: `prepare` records them; a view that cannot hold them
/// leaves the apply to hash those files again.
pub fn prepare_list<O: OpList + ?Sized>(l: &Layout, ops: &O) -> Result<Vec<(usize, u64)>, TxError> {
    let mut writable: BTreeSet<PathBuf> = Default::default();
    let mut to_make: BTreeSet<PathBuf> = Default::default();
    // Folders made now, out of sight in `.dsg`, deepest last.
    let mut make_now: BTreeSet<PathBuf> = Default::default();
    let mut known_dirs = std::collections::HashSet::new();
    writable.insert(l.dsg.to_path_buf());
    make_now.insert(l.dsg.join("archive"));
    let mut retired = Retired { ops, set: None };
    for op in iter_ops(ops) {
        let install = op.is_install();
        let parent = parent_dir(
            l,
            op.path(),
            &mut retired,
            install,
            &mut to_make,
            &mut known_dirs,
        )?;
        writable.insert(parent);
    }
    let mut hashed = Vec::new();
    for (i, op) in iter_ops(ops).enumerate() {
        match (op, &l.aside) {
            (OpRef::Retire { path, known }, Aside::Objects) => {
                let dsg = &l.dsg;
                let p = l.root.join(path);
                if !fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) {
                    continue;
                }
                let h = match known.hash {
                    Some(h) => Hash(h),
                    None => {
                        let h = dsg_core::hash::hash_file(&p)
                            .map_err(|e| TxError::io(&p, e))?
                            .0;
                        hashed.push((i, h.0));
                        h
                    }
                };
                let obj = object_path(dsg, h);
                let dir = obj.parent().expect("objects/<hh>");
                make_now.insert(dsg.join("objects"));
                make_now.insert(dir.to_path_buf());
            }
            (OpRef::Retire { path, .. }, Aside::Backup { dir }) => {
                // Its folders inside the backup are made when a version
                // actually moves there: made now, one could stand where a
                // retired file of the same name is going.
                make_now.insert(dir.to_path_buf());
                let mut par = Path::new(path).parent();
                while let Some(p) = par.filter(|p| !p.as_os_str().is_empty()) {
                    to_make.insert(dir.join(p));
                    par = p.parent();
                }
            }
            _ => {}
        }
    }
    // A folder made now needs its parent writable; one that exists, itself.
    for d in &make_now {
        let existing = if d.is_dir() {
            d
        } else {
            d.parent().unwrap_or(d)
        };
        writable.insert(existing.to_path_buf());
    }
    for d in &writable {
        if d.exists() && rustix::fs::access(d, rustix::fs::Access::WRITE_OK).is_err() {
            return Err(TxError::NotWritable { path: d.clone() });
        }
    }
    let missing: Vec<&PathBuf> = make_now.iter().filter(|d| !d.is_dir()).collect();
    check_space(&l.root, ops, to_make.len() + missing.len())?;
    // Parents sort before their children.
    let mut made: Vec<&PathBuf> = Vec::new();
    for d in missing {
        if let Err(e) = mkdir(d) {
            for m in made.iter().rev() {
                let _ = fs::remove_dir(m);
            }
            return Err(e);
        }
        made.push(d);
    }
    Ok(hashed)
}

/// The paths a transaction retires, as a set only once one is looked up:
/// that happens when a parent on the way is not a folder, which is rare,
/// and the set costs memory per operation (a clone has one per file).
struct Retired<'a, O: OpList + ?Sized> {
    ops: &'a O,
    set: Option<std::collections::HashSet<&'a str>>,
}

impl<O: OpList + ?Sized> Retired<'_, O> {
    fn contains(&mut self, path: &str) -> bool {
        self.set
            .get_or_insert_with(|| {
                iter_ops(self.ops)
                    .filter(|o| !o.is_install())
                    .map(|o| o.path())
                    .collect()
            })
            .contains(path)
    }
}

/// The filesystem has the space and the inodes the apply still needs.
fn check_space<O: OpList + ?Sized>(root: &Path, ops: &O, new_dirs: usize) -> Result<(), TxError> {
    let st = rustix::fs::statvfs(root).map_err(|e| TxError::io(root, e.into()))?;
    let need = space_needed(ops, new_dirs);
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    // Filesystems without a fixed inode count report none.
    let inodes_short = st.f_files > 0 && st.f_favail < new_dirs as u64 + 4;
    if free < need || inodes_short {
        return Err(TxError::NoSpace {
            path: root.to_path_buf(),
            free,
            need,
        });
    }
    Ok(())
}

/// The folder that an operation on `path` changes; for an install, the
/// folders the apply will have to make are added to `to_make`. Refuses to
/// go through a symlink in the tree: a link is a leaf, and following one
/// could lead out of the tree. A parent that is a file or link retired by
/// this transaction is replaced by a folder only during the apply; its own
/// parent is the one changed.
fn parent_dir<O: OpList + ?Sized>(
    l: &Layout,
    path: &str,
    retired: &mut Retired<'_, O>,
    install: bool,
    to_make: &mut BTreeSet<PathBuf>,
    known_dirs: &mut std::collections::HashSet<PathBuf>,
) -> Result<PathBuf, TxError> {
    let comps: Vec<&str> = path.split('/').collect();
    let mut cur = l.root.to_path_buf();
    for (i, c) in comps[..comps.len() - 1].iter().enumerate() {
        let next = cur.join(c);
        // Siblings share their parents: one lstat per folder, not per path.
        if known_dirs.contains(&next) {
            cur = next;
            continue;
        }
        match fs::symlink_metadata(&next) {
            Ok(m) if m.is_dir() => {
                known_dirs.insert(next.clone());
            }
            Ok(_) if retired.contains(&comps[..=i].join("/")) => return Ok(cur),
            Ok(m) if m.file_type().is_symlink() => {
                return Err(TxError::ThroughLink {
                    path: path.to_string(),
                    link: next,
                })
            }
            Ok(_) => return Err(TxError::InTheWay { path: next }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !install {
                    return Ok(cur);
                }
                // The apply makes the rest of the chain (made now, a
                // transaction that does not commit would leave empty
                // folders in the tree); `cur` is the folder it changes.
                let mut rest = next.clone();
                for c in &comps[i + 1..comps.len() - 1] {
                    to_make.insert(rest.clone());
                    rest.push(c);
                }
                to_make.insert(rest);
                return Ok(cur);
            }
            Err(e) => return Err(TxError::io(next, e)),
        }
        cur = next;
    }
    Ok(cur)
}

fn mkdir(d: &Path) -> Result<(), TxError> {
    match fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => Ok(()),
        Err(e) => Err(TxError::io(d, e)),
    }
}

pub fn object_path(dsg: &Path, h: Hash) -> PathBuf {
    let hex = h.to_hex();
    dsg.join("objects").join(&hex[..2]).join(hex)
}

/// Applies committed operations, then the metadata, then makes it all
/// durable. Idempotent: a re-run after a crash skips what is done.
pub fn apply(l: &Layout, ops: &[Op]) -> Result<(), TxError> {
    apply_list(l, ops)
}

/// `apply` for operations held in any form.
pub fn apply_list<O: OpList + ?Sized>(l: &Layout, ops: &O) -> Result<(), TxError> {
    let installs = Installs::of(ops);
    // A folder that receives a file is not left empty: only the parents
    // of other retires are looked at for pruning (an `rmdir` each).
    let filled: std::collections::HashSet<&str> = iter_ops(ops)
        .filter(|o| o.is_install())
        .map(|o| parent_of(o.path()))
        .collect();
    let mut touched: Vec<PathBuf> = Vec::new();
    let mut parents = Parents::new(&l.root);
    for (i, op) in iter_ops(ops).enumerate() {
        failpoint(&format!("{}.apply.{i}", l.fp));
        let dst = l.root.join(op.path());
        match op {
            OpRef::Retire { path, known } => {
                let parent = parent_of(path);
                // Operations come in path order, so siblings follow each
                // other: one entry per run of them, not one per file.
                if !filled.contains(parent) && touched.last() != Some(&l.root.join(parent)) {
                    touched.push(l.root.join(parent));
                }
                // A re-run after a crash: a path whose staged file is gone
                // was already installed; what is there is the new version.
                if installs.contains(path) && fs::symlink_metadata(l.staged(path)).is_err() {
                    continue;
                }
                // Below a link (or a file) nothing of this tree is at the
                // path: a link is a leaf, and what lies beyond it is
                // another path, tracked or not, never this one.
                if parents.check(path)? != Way::Folders {
                    continue;
                }
                retire(l, path, &dst, known.hash, known.expect)?;
                parents.forget(&dst);
            }
            OpRef::Install { path } => {
                let src = l.staged(path);
                if fs::symlink_metadata(&src).is_err() {
                    continue;
                }
                if let Way::Link(link) = parents.check(path)? {
                    // `prepare` refuses this before the commit point.
                    return Err(TxError::ThroughLink {
                        path: path.to_string(),
                        link,
                    });
                }
                if let Some(parent) = dst.parent() {
                    // Siblings share a parent: made (or found) once.
                    if !parents.is_folder(parent) {
                        fs::create_dir_all(parent).map_err(|e| TxError::io(parent, e))?;
                        parents.made(parent);
                    }
                }
                fs::rename(&src, &dst).map_err(|e| TxError::io(&dst, e))?;
            }
        }
    }
    prune_emptied(l, touched);
    install_meta(l)?;
    syncfs(&l.root)
}

/// The folder part of a relative path (`""` at the top).
fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

/// The paths an apply installs, looked up for each retire. Both sides
/// write their installs last and in path order: then they are searched
/// where they are, since a set of them would cost a clone ~25 bytes a file.
enum Installs<'a, O: OpList + ?Sized> {
    /// The operations from this index on.
    SortedTail(&'a O, usize),
    Set(std::collections::HashSet<&'a str>),
}

impl<'a, O: OpList + ?Sized> Installs<'a, O> {
    fn of(ops: &'a O) -> Installs<'a, O> {
        let first = iter_ops(ops)
            .position(|o| o.is_install())
            .unwrap_or(ops.len());
        let tail = || (first..ops.len()).map(|i| ops.get(i));
        let sorted_tail = tail().all(|o| o.is_install())
            && tail().zip(tail().skip(1)).all(|(a, b)| a.path() < b.path());
        if sorted_tail {
            return Installs::SortedTail(ops, first);
        }
        Installs::Set(
            iter_ops(ops)
                .filter(|o| o.is_install())
                .map(|o| o.path())
                .collect(),
        )
    }

    fn contains(&self, path: &str) -> bool {
        match self {
            Installs::SortedTail(ops, first) => {
                // A binary search over the tail's indices.
                let (mut lo, mut hi) = (*first, ops.len());
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    match ops.get(mid).path().cmp(path) {
                        std::cmp::Ordering::Less => lo = mid + 1,
                        std::cmp::Ordering::Greater => hi = mid,
                        std::cmp::Ordering::Equal => return true,
                    }
                }
                false
            }
            Installs::Set(s) => s.contains(path),
        }
    }
}

/// What lies on the way from the root to a path's parent.
#[derive(Debug, PartialEq)]
enum Way {
    /// Real folders all the way (or folders still to be made).
    Folders,
    /// A symlink at this place.
    Link(PathBuf),
    /// A file or something else where a folder would be.
    Blocked,
}

/// Walks paths' parents under a root without following links, looking at
/// each folder once per apply.
struct Parents<'a> {
    root: &'a Path,
    real: std::collections::HashSet<PathBuf>,
}

impl<'a> Parents<'a> {
    fn new(root: &'a Path) -> Parents<'a> {
        Parents {
            root,
            real: Default::default(),
        }
    }

    fn check(&mut self, path: &str) -> Result<Way, TxError> {
        let mut cur = self.root.to_path_buf();
        let comps: Vec<&str> = path.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            cur.push(c);
            if self.real.contains(&cur) {
                continue;
            }
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {
                    self.real.insert(cur.clone());
                }
                Ok(m) if m.file_type().is_symlink() => return Ok(Way::Link(cur)),
                Ok(_) => return Ok(Way::Blocked),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Way::Folders),
                Err(e) => return Err(TxError::io(cur, e)),
            }
        }
        Ok(Way::Folders)
    }

    /// Whether `dir` (the root or below it) is known to be a real folder.
    fn is_folder(&self, dir: &Path) -> bool {
        dir == self.root || self.real.contains(dir)
    }

    /// `dir` and the folders above it up to the root were just made.
    fn made(&mut self, dir: &Path) {
        let mut cur = Some(dir);
        while let Some(d) = cur.filter(|d| *d != self.root && d.starts_with(self.root)) {
            if !self.real.insert(d.to_path_buf()) {
                break;
            }
            cur = d.parent();
        }
    }

    /// `p` was retired: if it was a folder, it is gone, with any folders
    /// it still held.
    fn forget(&mut self, p: &Path) {
        if self.real.remove(p) {
            self.real.retain(|d| !d.starts_with(p));
        }
    }
}

fn retire(
    l: &Layout,
    path: &str,
    p: &Path,
    hash: Option<u64>,
    expect: Option<(u64, i64, u64)>,
) -> Result<(), TxError> {
    if let Aside::Backup { dir } = &l.aside {
        // Already moved (a re-run). Backups are files or links; a folder
        // there only holds backups of its children.
        if fs::symlink_metadata(dir.join(path)).is_ok_and(|m| !m.is_dir()) {
            return Ok(());
        }
    }
    let md = match fs::symlink_metadata(p) {
        Ok(md) => md,
        // Nothing there, or a parent is now a file (a file→folder change).
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) =>
        {
            return Ok(())
        }
        Err(e) => return Err(TxError::io(p, e)),
    };
    if md.is_dir() {
        // Its tracked files were retired before it (deepest first), so
        // only empty folders should remain.
        return match (remove_empty_tree(p), &l.aside) {
            (Ok(()), _) => Ok(()),
            (Err(_), Aside::Backup { .. }) => keep_beside(p, "held untracked files"),
            (Err(e), _) => Err(e),
        };
    }
    match &l.aside {
        Aside::Backup { dir } => {
            let st = Stat::of(&md);
            if expect != Some((st.size, st.mtime_ns, st.ino)) {
                return keep_beside(p, "changed during the sync");
            }
            let b = dir.join(path);
            if let Some(par) = b.parent() {
                fs::create_dir_all(par).map_err(|e| TxError::io(par, e))?;
            }
            fs::rename(p, &b).map_err(|e| TxError::io(p, e))
        }
        Aside::Objects if md.is_file() => {
            let dsg = &l.dsg;
            let h = match hash {
                Some(h) => Hash(h),
                None => {
                    dsg_core::hash::hash_file(p)
                        .map_err(|e| TxError::io(p, e))?
                        .0
                }
            };
            let obj = object_path(dsg, h);
            if obj.exists() {
                return fs::remove_file(p).map_err(|e| TxError::io(p, e));
            }
            let dir = obj.parent().expect("objects/<hh>");
            if !dir.is_dir() {
                // Made by prepare; only a re-run of an older journal lacks it.
                fs::create_dir_all(dir).map_err(|e| TxError::io(dir, e))?;
            }
            fs::rename(p, &obj).map_err(|e| TxError::io(p, e))
        }
        Aside::Objects | Aside::Discard => fs::remove_file(p).map_err(|e| TxError::io(p, e)),
    }
}

/// Never lose what the user has: keep it beside its path under a
/// conflict-backup name.
fn keep_beside(p: &Path, why: &str) -> Result<(), TxError> {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let keep = p.with_file_name(format!("{name}~{}~", backup_stamp()));
    fs::rename(p, &keep).map_err(|e| TxError::io(p, e))?;
    tracing::warn!(
        "{} {why}; your version is kept as {}",
        p.display(),
        keep.display()
    );
    Ok(())
}

/// `YYYYMMDDTHHMMSS+0000` in UTC, the conflict-backup suffix format.
pub fn backup_stamp() -> String {
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

/// Deleting files can leave empty folders behind (the original kept them
/// forever); remove those, up to the root.
fn prune_emptied(l: &Layout, mut touched: Vec<PathBuf>) {
    touched.sort();
    touched.dedup();
    for d in touched.iter().rev() {
        let mut cur = d.clone();
        while cur.starts_with(&l.root)
            && cur != l.root
            && !(l.keep_top_level && cur.parent() == Some(l.root.as_path()))
        {
            if fs::remove_dir(&cur).is_err() {
                break;
            }
            cur = cur.parent().expect("below the root").to_path_buf();
        }
    }
}

/// Metadata last: `last-sync.json` switches the head readers see.
fn install_meta(l: &Layout) -> Result<(), TxError> {
    let archive = l.dsg.join("archive");
    fs::create_dir_all(&archive).map_err(|e| TxError::io(&archive, e))?;
    if let Ok(rd) = fs::read_dir(l.meta.join("archive")) {
        for de in rd.flatten() {
            let dst = archive.join(de.file_name());
            fs::rename(de.path(), &dst).map_err(|e| TxError::io(&dst, e))?;
        }
        dsg_core::atomic::sync_dir(&archive).map_err(|e| TxError::io(&archive, e))?;
    }
    failpoint(&format!("{}.apply.meta", l.fp));
    // The repository's binary copy of its head before the head itself: a
    // crash between leaves a copy whose tag the old head does not match.
    for name in ["sync-messages.json", "last-sync.bin", "last-sync.json"] {
        let src = l.meta.join(name);
        if src.exists() {
            let dst = l.dsg.join(name);
            fs::rename(&src, &dst).map_err(|e| TxError::io(dst, e))?;
        }
    }
    Ok(())
}

/// Removes a folder tree that holds only folders. Anything else in it is
/// an error: it is not ours to delete.
pub fn remove_empty_tree(p: &Path) -> Result<(), TxError> {
    for de in fs::read_dir(p).map_err(|e| TxError::io(p, e))? {
        let de = de.map_err(|e| TxError::io(p, e))?;
        let ft = de.file_type().map_err(|e| TxError::io(de.path(), e))?;
        if !ft.is_dir() {
            return Err(TxError::InTheWay { path: de.path() });
        }
        remove_empty_tree(&de.path())?;
    }
    fs::remove_dir(p).map_err(|e| TxError::io(p, e))
}

/// One `syncfs` makes everything staged or moved durable: far cheaper than
/// an fsync per small file, and the journal record that follows is what
/// makes the state count.
pub fn syncfs(p: &Path) -> Result<(), TxError> {
    let f = fs::File::open(p).map_err(|e| TxError::io(p, e))?;
    rustix::fs::syncfs(f.as_fd()).map_err(|e| TxError::io(p, e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(root: &Path, st: &Path, aside: Aside) -> (Layout, PathBuf) {
        let dsg = root.join(".dsg");
        fs::create_dir_all(&dsg).unwrap();
        let l = Layout {
            root: root.to_path_buf(),
            files: st.join("files"),
            flat: false,
            meta: st.join("meta"),
            dsg,
            aside,
            keep_top_level: false,
            fp: "test",
        };
        let files = l.files.clone();
        (l, files)
    }

    #[test]
    fn prepare_creates_object_folders_and_apply_moves_into_them() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        let st = d.path().join("st");
        fs::create_dir_all(root.join("in")).unwrap();
        fs::write(root.join("in/a"), b"old").unwrap();
        let dsg = root.join(".dsg");
        let (l, files) = layout(&root, &st, Aside::Objects);
        fs::create_dir_all(files.join("in/new")).unwrap();
        fs::write(files.join("in/a"), b"new").unwrap();
        fs::write(files.join("in/new/b"), b"b").unwrap();
        let mut ops = vec![
            Op::retire("in/a", None, None),
            Op::Install {
                path: "in/a".into(),
            },
            Op::Install {
                path: "in/new/b".into(),
            },
        ];
        prepare(&l, &mut ops).unwrap();
        let Op::Retire { known: Some(k), .. } = &ops[0] else {
            panic!("hash filled in")
        };
        let h = k.hash.expect("hash filled in");
        let obj = object_path(&dsg, Hash(h));
        assert!(
            obj.parent().unwrap().is_dir(),
            "objects/<hh> exists before commit"
        );
        assert!(
            !root.join("in/new").exists(),
            "the tree is unchanged before commit"
        );
        apply(&l, &ops).unwrap();
        assert_eq!(fs::read(&obj).unwrap(), b"old");
        assert_eq!(fs::read(root.join("in/a")).unwrap(), b"new");
        // A re-run (recovery after a crash at the end) changes nothing.
        apply(&l, &ops).unwrap();
        assert_eq!(fs::read(root.join("in/a")).unwrap(), b"new");
        assert_eq!(fs::read(&obj).unwrap(), b"old");
    }

    #[test]
    fn prepare_refuses_a_link_in_the_path() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        let st = d.path().join("st");
        fs::create_dir_all(root.join("in")).unwrap();
        std::os::unix::fs::symlink("/tmp", root.join("in/l")).unwrap();
        let (l, _) = layout(&root, &st, Aside::Discard);
        let mut ops = vec![Op::Install {
            path: "in/l/x".into(),
        }];
        let e = prepare(&l, &mut ops).unwrap_err();
        assert!(matches!(e, TxError::ThroughLink { .. }), "{e}");
    }

    #[test]
    fn a_flat_staging_is_applied_from_the_names_of_the_paths() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        let st = d.path().join("st");
        fs::create_dir_all(root.join("in/gone")).unwrap();
        fs::create_dir_all(root.join("in/kept")).unwrap();
        fs::write(root.join("in/gone/x"), b"x").unwrap();
        fs::write(root.join("in/kept/y"), b"old y").unwrap();
        let (mut l, files) = layout(&root, &st, Aside::Discard);
        l.flat = true;
        fs::create_dir_all(&files).unwrap();
        for (p, b) in [
            ("in/kept/y", "new y"),
            ("in/new/deep/z", "z"),
            ("in/new/w", "w"),
        ] {
            fs::write(files.join(flat_name(p)), b).unwrap();
        }
        let mut ops = vec![
            Op::retire("in/kept/y", None, None),
            Op::retire("in/gone/x", None, None),
            Op::Install {
                path: "in/kept/y".into(),
            },
            Op::Install {
                path: "in/new/deep/z".into(),
            },
            Op::Install {
                path: "in/new/w".into(),
            },
        ];
        prepare(&l, &mut ops).unwrap();
        apply(&l, &ops).unwrap();
        assert_eq!(fs::read(root.join("in/kept/y")).unwrap(), b"new y");
        assert_eq!(fs::read(root.join("in/new/deep/z")).unwrap(), b"z");
        assert_eq!(fs::read(root.join("in/new/w")).unwrap(), b"w");
        assert!(!root.join("in/gone").exists(), "the emptied folder pruned");
        assert_eq!(fs::read_dir(&files).unwrap().count(), 0, "all installed");
        // A re-run (recovery after a crash at the end) changes nothing.
        apply(&l, &ops).unwrap();
        assert_eq!(fs::read(root.join("in/kept/y")).unwrap(), b"new y");
        assert_eq!(fs::read(root.join("in/new/w")).unwrap(), b"w");
    }

    #[test]
    fn op_reads_the_client_journal_of_older_versions() {
        let old = r#"{"op":"remove","path":"a","expect":[1,2,3]}"#;
        let op: Op = serde_json::from_str(old).unwrap();
        assert_eq!(op, Op::retire("a", None, Some((1, 2, 3))));
    }

    /// The boxed in-memory shape writes the journal's wire shape, field
    /// for field, so older and newer dsg read each other's journals.
    #[test]
    fn op_writes_the_journal_shape_it_always_wrote() {
        let cases = [
            (Op::retire("a", None, None), r#"{"op":"retire","path":"a"}"#),
            (
                Op::retire("a", Some(7), None),
                r#"{"op":"retire","path":"a","hash":7}"#,
            ),
            (
                Op::retire("a", Some(7), Some((1, -2, 3))),
                r#"{"op":"retire","path":"a","hash":7,"expect":[1,-2,3]}"#,
            ),
            (
                Op::Install { path: "b".into() },
                r#"{"op":"install","path":"b"}"#,
            ),
        ];
        for (op, json) in cases {
            assert_eq!(serde_json::to_string(&op).unwrap(), json);
            assert_eq!(serde_json::from_str::<Op>(json).unwrap(), op);
        }
        assert_eq!(std::mem::size_of::<Op>(), 24);
    }
}

#[cfg(test)]
mod installs_tests {
    use super::*;

    fn retire(p: &str) -> Op {
        Op::retire(p, None, None)
    }

    fn install(p: &str) -> Op {
        Op::Install { path: p.into() }
    }

    /// Searched in place or through a set, the answer is the same: every
    /// installed path and no other.
    #[test]
    fn installs_are_found_however_the_operations_come() {
        let sorted = vec![retire("b/y"), retire("a"), install("a"), install("b/x")];
        let unsorted = vec![retire("a"), install("b/x"), retire("c"), install("a")];
        assert!(matches!(
            Installs::of(&sorted[..]),
            Installs::SortedTail(_, 2)
        ));
        assert!(matches!(Installs::of(&unsorted[..]), Installs::Set(_)));
        for ops in [&sorted, &unsorted] {
            let i = Installs::of(&ops[..]);
            assert!(i.contains("a") && i.contains("b/x"));
            assert!(!i.contains("b/y") && !i.contains("c") && !i.contains("b"));
        }
        assert!(!Installs::of(&[retire("a")][..]).contains("a"));
        assert!(!Installs::of(&[][..]).contains("a"));
        assert!(!Installs::of(&[install("b")][..]).contains("a"));
        assert!(Installs::of(&[install("b")][..]).contains("b"));
    }
}
