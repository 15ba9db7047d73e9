//! The parallel walk of the working tree. Each directory is opened once;
//! its entries are stat'ed relative to it (`statx` on the open directory:
//! no path walk per file). A directory whose own stat matches its record in
//! the stat cache, and is not racy, is not listed again: its entries come
//! from the cache (git's untracked cache). Its files are still stat'ed one
//! by one, which is what catches a changed file.
//!
//! Why an unchanged directory stat means an unchanged listing: adding,
//! removing or renaming an entry sets the directory's mtime and ctime to
//! the current time, and ctime cannot be set back. The stat is taken before
//! the listing, so a change during the listing leaves a stat that no longer
//! matches next time. A change within the same clock tick as the listing
//! may leave the stat as it was: such a directory is "racy" (its mtime or
//! ctime is not safely older than the moment the cache was made) and is
//! listed again, as racy files are hashed again.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir, StatxFlags};

use super::stat_cache::{listing_entries, push_listing_entry, ChildKind, DirListing};
use super::{
    join_rel, problem, LocalEntry, LocalKind, Problem, ProblemKind, Progress, Rules, Stat,
    StatCache, RACY_WINDOW_NS,
};
use crate::hash::Hash;
use crate::names;
use crate::paths::check_link_target;

#[derive(Default)]
pub(super) struct WalkOut {
    /// Files carry a placeholder hash until the hashing pass.
    pub cands: Vec<LocalEntry>,
    pub problems: Vec<Problem>,
    pub ignored: Vec<String>,
    pub hidden: u64,
    /// Every directory walked, with its listing, for the next stat cache.
    pub dirs: Vec<DirListing>,
    /// Directories whose listing came from the cache.
    pub dirs_reused: usize,
    /// Data files seen, for the progress counter (added once a directory:
    /// one shared counter bumped by every file on both cores cost more
    /// than the bookkeeping it reports).
    seen: u64,
    /// Runs of `cands` (start, length), each contiguous in path order: a
    /// directory's files, sorted, cut where its subdirectories fall.
    segments: Vec<(usize, usize)>,
}

struct Walker<'a> {
    root: &'a Path,
    root_fd: OwnedFd,
    rules: &'a Rules,
    cache: &'a StatCache,
    progress: &'a Progress,
    out: Mutex<WalkOut>,
    reused: AtomicUsize,
}

/// The walk's findings, entries, ignored paths and directories sorted.
pub(super) fn walk(root: &Path, rules: &Rules, cache: &StatCache, progress: &Progress) -> WalkOut {
    // The root may be reached through a link (a project under a linked
    // home); below it, a directory never is.
    let root_fd = match rustix::fs::openat(
        rustix::fs::CWD,
        root,
        DIR_FLAGS.difference(OFlags::NOFOLLOW),
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => {
            let mut out = WalkOut::default();
            out.problems.push(problem(
                ".",
                ProblemKind::Unreadable,
                format!("cannot read directory: {e}"),
            ));
            return out;
        }
    };
    // The last scan's size is the best guess of this one's: growing a
    // large Vec by doubling would hold two copies for a moment.
    let cached = cache.len();
    let w = Walker {
        root,
        root_fd,
        rules,
        cache,
        progress,
        out: Mutex::new(WalkOut {
            cands: Vec::with_capacity(cached + cached / 32 + 16),
            dirs: Vec::with_capacity(cache.dir_count() + 16),
            ..WalkOut::default()
        }),
        reused: AtomicUsize::new(0),
    };
    let t0 = std::time::Instant::now();
    w.walk_dir(String::new(), rules.all(), true);
    let reused = w.reused.load(Ordering::Relaxed);
    let mut out = w.out.into_inner().unwrap_or_else(|e| e.into_inner());
    tracing::debug!(
        "walked in {:?} ({} directories, {} listed)",
        t0.elapsed(),
        out.dirs.len(),
        out.dirs.len() - reused
    );
    out.dirs_reused = reused;
    let segments = std::mem::take(&mut out.segments);
    into_path_order(&mut out.cands, segments);
    debug_assert!(out
        .cands
        .windows(2)
        .all(|w| w[0].path.as_bytes() < w[1].path.as_bytes()));
    out.ignored.sort();
    out.dirs
        .sort_unstable_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    out
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOFOLLOW);

fn open_dir(at: impl AsFd, path: impl rustix::path::Arg) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::openat(at, path, DIR_FLAGS, Mode::empty())?)
}

/// What a scan needs of an entry's stat: its kind and the cache key.
struct Found {
    kind: FileType,
    stat: Stat,
}

const MASK: StatxFlags = StatxFlags::TYPE
    .union(StatxFlags::SIZE)
    .union(StatxFlags::MTIME)
    .union(StatxFlags::CTIME)
    .union(StatxFlags::INO);

/// `lstat` of `name` in the directory `dir` (`""`: the directory itself).
fn stat_at(dir: BorrowedFd<'_>, name: &[u8]) -> std::io::Result<Found> {
    let flags = if name.is_empty() {
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW
    } else {
        AtFlags::SYMLINK_NOFOLLOW
    };
    let name = OsStr::from_bytes(name);
    match rustix::fs::statx(dir, name, flags, MASK) {
        Ok(x) => Ok(Found {
            kind: FileType::from_raw_mode(x.stx_mode.into()),
            stat: Stat {
                size: x.stx_size,
                mtime_ns: x.stx_mtime.tv_sec * 1_000_000_000 + i64::from(x.stx_mtime.tv_nsec),
                ctime_ns: x.stx_ctime.tv_sec * 1_000_000_000 + i64::from(x.stx_ctime.tv_nsec),
                ino: x.stx_ino,
            },
        }),
        // No statx (an old kernel, or a sandbox that forbids it).
        Err(rustix::io::Errno::NOSYS) | Err(rustix::io::Errno::PERM) => {
            let s = rustix::fs::statat(dir, name, flags)?;
            Ok(Found {
                kind: FileType::from_raw_mode(s.st_mode),
                stat: Stat {
                    size: s.st_size as u64,
                    mtime_ns: s.st_mtime as i64 * 1_000_000_000 + s.st_mtime_nsec as i64,
                    ctime_ns: s.st_ctime as i64 * 1_000_000_000 + s.st_ctime_nsec as i64,
                    ino: s.st_ino as u64,
                },
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn child_kind(t: FileType) -> ChildKind {
    match t {
        FileType::RegularFile => ChildKind::File,
        FileType::Directory => ChildKind::Dir,
        FileType::Symlink => ChildKind::Link,
        _ => ChildKind::Other,
    }
}

/// Lists the directory open at `fd`, as `getdents` gives it.
fn list(fd: BorrowedFd<'_>) -> std::io::Result<Vec<u8>> {
    let mut listing = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(32 * 1024);
    loop {
        let mut grow = false;
        {
            let mut it = RawDir::new(fd, buf.spare_capacity_mut());
            while let Some(e) = it.next() {
                let e = match e {
                    Ok(e) => e,
                    // The buffer cannot hold one entry: grow it.
                    Err(rustix::io::Errno::INVAL) => {
                        grow = true;
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
                let name = e.file_name().to_bytes();
                if name == b"." || name == b".." {
                    continue;
                }
                let kind = match e.file_type() {
                    FileType::Unknown => stat_at(fd, name).map(|f| f.kind)?,
                    t => t,
                };
                if !push_listing_entry(&mut listing, child_kind(kind), name) {
                    return Err(std::io::Error::other("a file name longer than 65535 bytes"));
                }
            }
        }
        if !grow {
            return Ok(listing);
        }
        let n = buf.capacity() * 2;
        buf.reserve(n);
    }
}

/// A listing with its entries sorted by name (byte order), as the stat
/// cache keeps them: a directory's files then come out of it in path
/// order, and `segment` need not sort them (that sort, of every directory
/// on every warm status, was most of the walk's own work).
fn by_name(listing: Cow<'_, [u8]>) -> Cow<'_, [u8]> {
    let mut entries: Vec<(ChildKind, &[u8])> = listing_entries(&listing).collect();
    if entries.is_sorted_by(|a, b| a.1 <= b.1) {
        return listing;
    }
    entries.sort_unstable_by(|a, b| a.1.cmp(b.1));
    let mut sorted = Vec::with_capacity(listing.len());
    for (kind, name) in entries {
        // Every name was pushed once already: it fits.
        push_listing_entry(&mut sorted, kind, name);
    }
    Cow::Owned(sorted)
}

/// Where one directory entry goes next.
enum Sorted {
    /// Hidden, ignored, outside the data or unreadable (then in `local`).
    Done,
    /// A directory to walk: its path and whether it is inside the data.
    Subdir(String, bool),
    /// A tracked non-directory, with its path.
    Data(String),
}

impl Walker<'_> {
    /// Walks one directory, then its subdirectories in parallel. Findings
    /// are gathered per directory so that the shared `out` is locked once
    /// each. `valid` says the directory's own path passed the name rules.
    fn walk_dir(&self, rel: String, in_data: bool, valid: bool) {
        let mut local = WalkOut::default();
        let subdirs = self.one_dir(&rel, in_data, valid, &mut local);
        {
            let mut o = self.out.lock().unwrap_or_else(|e| e.into_inner());
            let base = o.cands.len();
            o.segments
                .extend(local.segments.iter().map(|&(s, n)| (base + s, n)));
            o.cands.append(&mut local.cands);
            o.problems.append(&mut local.problems);
            o.ignored.append(&mut local.ignored);
            o.dirs.append(&mut local.dirs);
            o.hidden += local.hidden;
        }
        self.progress
            .files_seen
            .fetch_add(local.seen, Ordering::Relaxed);
        subdirs.into_par_iter().for_each(|(r, d)| {
            let valid = names::validate_path(&r).is_ok();
            self.walk_dir(r, d, valid)
        });
    }

    /// The entries of one directory into `local`; returns its
    /// subdirectories. The directory is closed before they are walked, so
    /// a deep tree does not hold a descriptor per level.
    fn one_dir(
        &self,
        rel: &str,
        in_data: bool,
        valid: bool,
        local: &mut WalkOut,
    ) -> Vec<(String, bool)> {
        let unreadable = |local: &mut WalkOut, e: &dyn std::fmt::Display| {
            let path = if rel.is_empty() { "." } else { rel };
            local.problems.push(problem(
                path,
                ProblemKind::Unreadable,
                format!("cannot read directory: {e}"),
            ));
        };
        let owned;
        let fd = if rel.is_empty() {
            self.root_fd.as_fd()
        } else {
            match open_dir(&self.root_fd, rel) {
                Ok(fd) => {
                    owned = fd;
                    owned.as_fd()
                }
                Err(e) => {
                    unreadable(local, &e);
                    return Vec::new();
                }
            }
        };
        // The stat before the listing: a change made while listing leaves
        // a stat that will not match next time.
        let stat = match stat_at(fd, b"") {
            Ok(f) => f.stat,
            Err(e) => {
                unreadable(local, &e);
                return Vec::new();
            }
        };
        let listing: Cow<'_, [u8]> = match self.cache.dir(rel) {
            // A listing cached before listings were kept sorted is sorted
            // now and counted as listed again, so the cache is rewritten.
            Some(r) if r.stat == stat && !self.racy(&stat) => {
                match by_name(Cow::Borrowed(r.listing)) {
                    l @ Cow::Borrowed(_) => {
                        self.reused.fetch_add(1, Ordering::Relaxed);
                        l
                    }
                    l => l,
                }
            }
            _ => match list(fd) {
                Ok(l) => by_name(Cow::Owned(l)),
                Err(e) => {
                    unreadable(local, &e);
                    return Vec::new();
                }
            },
        };
        let mut subdirs = Vec::new();
        for (kind, name) in listing_entries(&listing) {
            match self.sort_entry(rel, kind, name, in_data, local) {
                Sorted::Done => {}
                Sorted::Subdir(child, here_data) => subdirs.push((child, here_data)),
                Sorted::Data(child) => self.data_entry(fd, name, child, valid, local),
            }
        }
        local.dirs.push(DirListing {
            path: rel.to_string(),
            stat,
            listing: listing.into_owned(),
        });
        segment(rel, &mut local.cands, &mut local.segments, &subdirs);
        subdirs
    }

    /// A stat too close to the cache's making to trust: a change in the
    /// same clock tick may not have moved it.
    fn racy(&self, s: &Stat) -> bool {
        s.mtime_ns.max(s.ctime_ns) >= self.cache.made_ns - RACY_WINDOW_NS
    }

    /// Applies the name, hidden and ignore rules to one directory entry.
    fn sort_entry(
        &self,
        rel: &str,
        kind: ChildKind,
        bytes: &[u8],
        in_data: bool,
        local: &mut WalkOut,
    ) -> Sorted {
        let rules = self.rules;
        if bytes.first() == Some(&b'.') {
            local.hidden += 1;
            return Sorted::Done;
        }
        let Ok(name) = std::str::from_utf8(bytes) else {
            let lossy = join_rel(rel, &String::from_utf8_lossy(bytes));
            local.problems.push(problem(
                lossy,
                ProblemKind::Name,
                "Path must be UTF-8 encodable",
            ));
            return Sorted::Done;
        };
        let is_dir = kind == ChildKind::Dir;
        let here_data = in_data || rules.data_dirs.contains(name);
        if rules.ignored_name(name) || (is_dir && names::is_conflict_backup_name(name)) {
            if here_data {
                local.ignored.push(join_rel(rel, name));
            }
            return Sorted::Done;
        }
        if is_dir {
            let child_rel = join_rel(rel, name);
            if rules.ignored_path(&child_rel) {
                if here_data {
                    local.ignored.push(child_rel);
                }
                return Sorted::Done;
            }
            return Sorted::Subdir(child_rel, here_data);
        }
        if !here_data {
            return Sorted::Done;
        }
        local.seen += 1;
        let child_rel = join_rel(rel, name);
        if rules.ignored_file(&child_rel, name) {
            local.ignored.push(child_rel);
            return Sorted::Done;
        }
        Sorted::Data(child_rel)
    }

    /// A tracked file or link becomes a candidate; anything else, a problem.
    fn data_entry(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        child_rel: String,
        dir_valid: bool,
        local: &mut WalkOut,
    ) {
        let found = match stat_at(dir, name) {
            Ok(f) => f,
            Err(e) => {
                local.problems.push(problem(
                    child_rel,
                    ProblemKind::Unreadable,
                    format!("cannot stat: {e}"),
                ));
                return;
            }
        };
        if !(dir_valid && plain_name(name)) {
            if let Err(p) = names::validate_path(&child_rel) {
                local
                    .problems
                    .push(problem(&child_rel, ProblemKind::Name, p.to_string()));
            }
        }
        match found.kind {
            FileType::Symlink => {
                let path = self.root.join(&child_rel);
                match link_entry(self.root, &path, child_rel, found.stat) {
                    Ok(e) => local.cands.push(e),
                    Err(p) => local.problems.push(p),
                }
            }
            FileType::RegularFile => local.cands.push(LocalEntry {
                path: child_rel.into(),
                kind: LocalKind::File {
                    size: found.stat.size,
                    hash: Hash(0),
                },
                stat: found.stat,
            }),
            FileType::Directory => {}
            _ => local.problems.push(problem(
                child_rel,
                ProblemKind::Special,
                "not a regular file, directory or symlink; not synced",
            )),
        }
    }
}

/// Records the runs of one directory's entries (`cands`, all in `rel`, sorted)
/// between the places its subdirectories' entries go: in path (byte)
/// order `rel/b.txt` < `rel/b/…` < `rel/b0`, i.e. a subdirectory sorts as
/// its name followed by `/`.
fn segment(
    rel: &str,
    cands: &mut [LocalEntry],
    segments: &mut Vec<(usize, usize)>,
    subdirs: &[(String, bool)],
) {
    let skip = if rel.is_empty() { 0 } else { rel.len() + 1 };
    fn name(e: &LocalEntry, skip: usize) -> &[u8] {
        &e.path.as_bytes()[skip..]
    }
    // The listing was sorted by name, and the files came out of it in
    // its order.
    debug_assert!(cands.is_sorted_by(|a, b| name(a, skip) < name(b, skip)));
    let mut cuts: Vec<usize> = subdirs
        .iter()
        .map(|(child, _)| {
            let key = &child.as_bytes()[skip..];
            cands.partition_point(|e| sorts_before_dir(name(e, skip), key))
        })
        .collect();
    cuts.push(cands.len());
    cuts.sort_unstable();
    let mut start = 0;
    for c in cuts {
        if c > start {
            segments.push((start, c - start));
            start = c;
        }
    }
}

/// `name < key + "/"` in byte order (a name never holds a `/`).
fn sorts_before_dir(name: &[u8], key: &[u8]) -> bool {
    match name.get(..key.len()) {
        Some(head) if head == key => name.get(key.len()).is_none_or(|&c| c < b'/'),
        _ => name < key,
    }
}

/// Puts `cands` in path order, given runs that are each contiguous in that
/// order: the runs are ordered by their first path, then every entry is
/// moved to its place in one in-place pass (no second copy of the scan,
/// and no full sort of long, mostly shared path prefixes).
fn into_path_order(cands: &mut [LocalEntry], mut segments: Vec<(usize, usize)>) {
    segments.sort_unstable_by(|a, b| cands[a.0].path.as_bytes().cmp(cands[b.0].path.as_bytes()));
    // dest[i]: where the entry now at i belongs.
    let mut dest = vec![0u32; cands.len()];
    let mut next = 0u32;
    for (start, len) in segments {
        for d in &mut dest[start..start + len] {
            *d = next;
            next += 1;
        }
    }
    debug_assert_eq!(next as usize, cands.len());
    for i in 0..cands.len() {
        while dest[i] as usize != i {
            let j = dest[i] as usize;
            cands.swap(i, j);
            dest.swap(i, j);
        }
    }
}

/// A name that passes every filename rule on sight: ASCII letters, digits,
/// `.`, `_` and `-`, not hidden, not too long, no Windows reserved stem.
/// In a directory whose own path is valid, such a name makes a valid path
/// (the full check, `names::validate_path`, allocates and checks every
/// component again: it was a tenth of a warm status).
fn plain_name(name: &[u8]) -> bool {
    if name.is_empty() || name.len() > names::MAX_COMPONENT_BYTES || name[0] == b'.' {
        return false;
    }
    if !name
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return false;
    }
    let stem = name.split(|&c| c == b'.').next().unwrap_or_default();
    !names::WINDOWS_RESERVED_NAMES
        .iter()
        .any(|r| r.as_bytes().eq_ignore_ascii_case(stem))
}

/// The symlink at `path` as an entry, if its target stays inside the project.
fn link_entry(
    root: &Path,
    path: &Path,
    child_rel: String,
    stat: Stat,
) -> Result<LocalEntry, Problem> {
    let target = std::fs::read_link(path).map_err(|e| {
        problem(
            &child_rel,
            ProblemKind::Unreadable,
            format!("cannot read symlink: {e}"),
        )
    })?;
    let Ok(t) = std::str::from_utf8(OsStr::as_bytes(target.as_os_str())) else {
        return Err(problem(
            child_rel,
            ProblemKind::Link,
            "symlink target is not UTF-8",
        ));
    };
    // The text check, then the real one: a target may leave the
    // project through another link (`up -> ../..`, `x -> up/..`).
    let escapes = std::fs::canonicalize(path)
        .ok()
        .zip(std::fs::canonicalize(root).ok())
        .is_some_and(|(real, top)| !real.starts_with(&top));
    let checked = check_link_target(&child_rel, t).and_then(|()| {
        if escapes {
            Err(crate::paths::UnsafePath {
                path: format!("{child_rel} -> {t}"),
                why: "symlink target leaves the project through another link",
            })
        } else {
            Ok(())
        }
    });
    if let Err(e) = checked {
        return Err(problem(
            child_rel,
            ProblemKind::Link,
            format!(
                "{}; only relative links inside the project can be synced",
                e.why
            ),
        ));
    }
    Ok(LocalEntry {
        path: child_rel.into(),
        kind: LocalKind::Link { target: t.into() },
        stat,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_name_is_a_valid_one() {
        let names_ = [
            "f000.csv",
            "data_1.tar.gz",
            "a-b",
            "CON.txt",
            "con",
            "Lpt9.x",
            "com",
            "nul.",
            "x~",
            "~x",
            "a b",
            "é",
            "a:b",
            "aux.tar.gz",
            "COM10",
            "lpt",
        ];
        for n in names_ {
            let full = names::validate_path(&format!("input/{n}")).is_ok();
            if plain_name(n.as_bytes()) {
                assert!(full, "{n} passed the quick check but is invalid");
            }
        }
        assert!(plain_name(b"f000.csv"));
        assert!(!plain_name(b"CON.txt"));
        assert!(!plain_name(b".hidden"));
        assert!(!plain_name(&[b'a'; 256]));
    }
}
