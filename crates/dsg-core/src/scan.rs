//! Scanning the working tree: a parallel walk that applies the inclusion and
//! ignore rules, a stat cache that lets unchanged files skip hashing, and
//! parallel XXH3 hashing of the rest.
//!
//! Inclusion (spec-data-model §3.2, kept): a path is tracked when some
//! component of it (the file name included) is one of `data_dirs`, or
//! `data_dirs` holds `*`; hidden components (leading `.`) are never tracked.
//! Ignore rules (fixed, defect 8): `names` match any component, so a directory
//! name ignores its subtree; `paths` match the path or any ancestor directory;
//! `suffixes` match the end of the file name; conflict backups are ignored.
//!
//! The stat cache (`.dsg/stat-cache`) keeps size, mtime and ctime in
//! nanoseconds, and the inode, per path. A file whose stat matches may reuse
//! its hash — unless it is "racy" (its mtime is not safely older than the
//! moment the cache was made), the case git handles the same way: an edit in
//! the same clock tick as the previous scan would otherwise go unseen.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::config::{IgnoreRules, ProjectConfig};
use crate::hash::{hash_file, ChecksummedWriter, Hash};
use crate::manifest::{Entry, EntryKind, Manifest, Mtime};
use crate::names;
use crate::paths::check_link_target;

/// What a scan records per tracked path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEntry {
    pub path: Box<str>,
    pub kind: LocalKind,
    pub stat: Stat,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalKind {
    File { size: u64, hash: Hash },
    Link { target: Box<str> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
}

impl Stat {
    pub fn of(md: &std::fs::Metadata) -> Stat {
        Stat {
            size: md.len(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            ino: md.ino(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// The name breaks a filename rule (spec-data-model §4); `--normalize` may fix it.
    Name,
    /// A symlink that is absolute or leaves the project.
    Link,
    /// Could not be read or stat'ed.
    Unreadable,
    /// Not a regular file, directory or symlink (socket, FIFO, device).
    Special,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub kind: ProblemKind,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct ScanResult {
    /// Sorted by path (byte order).
    pub entries: Vec<LocalEntry>,
    pub problems: Vec<Problem>,
    pub ignored: Vec<String>,
    /// Hidden files and directories skipped (not tracked by design).
    pub hidden: u64,
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    /// True when the stat cache should be rewritten.
    pub cache_dirty: bool,
    /// Wall clock when the scan started; becomes the new cache's timestamp.
    pub started_ns: i64,
}

/// Progress counters the CLI turns into a bar.
#[derive(Default, Debug)]
pub struct Progress {
    pub files_seen: AtomicU64,
    pub files_to_hash: AtomicU64,
    pub bytes_to_hash: AtomicU64,
    pub files_hashed: AtomicU64,
    pub bytes_hashed: AtomicU64,
}

pub struct Rules {
    pub data_dirs: BTreeSet<String>,
    pub ignore: IgnoreRules,
}

impl Rules {
    pub fn from_config(c: &ProjectConfig) -> Rules {
        Rules {
            data_dirs: c.data_dirs.clone(),
            ignore: c.ignore.clone(),
        }
    }

    fn all(&self) -> bool {
        self.data_dirs.contains("*")
    }

    fn ignored_name(&self, name: &str) -> bool {
        self.ignore.names.contains(name)
    }

    fn ignored_file(&self, rel: &str, name: &str) -> bool {
        self.ignore
            .suffixes
            .iter()
            .any(|s| !s.is_empty() && name.ends_with(s.as_str()))
            || names::is_conflict_backup_name(name)
            // dsg's own file at the project root: never data, even when
            // `data_dirs` holds `*`.
            || rel == "conflicts.txt"
            || self.ignored_path(rel)
    }

    fn ignored_path(&self, rel: &str) -> bool {
        self.ignore.paths.contains(rel)
    }
}

/// The stat cache, sorted by path. Kept as the verified file bytes and
/// read with a cursor in path order alongside the sorted scan: no
/// allocation per record, and no second copy of every path in memory.
#[derive(Debug, Default)]
pub struct StatCache {
    pub made_ns: i64,
    count: usize,
    /// Record bytes (`u32 len, path, size, mtime, ctime, ino, hash`).
    body: Vec<u8>,
}

/// One record of the stat cache.
pub struct StatRec<'a> {
    pub path: &'a str,
    pub stat: Stat,
    pub hash: Hash,
}

/// Reads records in order.
pub struct StatCursor<'a> {
    body: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for StatCursor<'a> {
    type Item = StatRec<'a>;
    fn next(&mut self) -> Option<StatRec<'a>> {
        let b = self.body;
        let len = u32::from_le_bytes(b.get(self.pos..self.pos + 4)?.try_into().ok()?) as usize;
        let o = self.pos + 4;
        let path = std::str::from_utf8(b.get(o..o + len)?).ok()?;
        let o = o + len;
        let v = |k: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                b.get(o + k * 8..o + k * 8 + 8)?.try_into().ok()?,
            ))
        };
        let rec = StatRec {
            path,
            stat: Stat {
                size: v(0)?,
                mtime_ns: v(1)? as i64,
                ctime_ns: v(2)? as i64,
                ino: v(3)?,
            },
            hash: Hash(v(4)?),
        };
        self.pos = o + 40;
        Some(rec)
    }
}

const CACHE_MAGIC: &[u8; 8] = b"DSGSTAT1";

impl StatCache {
    /// Loads the cache; a missing or damaged cache is just an empty one (it
    /// only ever lets us skip work, so dropping it is always safe).
    pub fn load(path: &Path) -> StatCache {
        match std::fs::read(path) {
            Ok(b) => StatCache::decode(b).unwrap_or_else(|| {
                tracing::warn!("stat cache {} is damaged; rehashing", path.display());
                StatCache::default()
            }),
            Err(_) => StatCache::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn records(&self) -> StatCursor<'_> {
        StatCursor {
            body: &self.body,
            pos: 0,
        }
    }

    fn decode(mut b: Vec<u8>) -> Option<StatCache> {
        if b.len() < 32 || &b[..8] != CACHE_MAGIC {
            return None;
        }
        let (body, sum) = b.split_at(b.len() - 8);
        if Hash::of_bytes(body).0.to_le_bytes() != sum {
            return None;
        }
        let made_ns = u64::from_le_bytes(body[8..16].try_into().ok()?) as i64;
        let count = u64::from_le_bytes(body[16..24].try_into().ok()?) as usize;
        let n = b.len() - 8;
        b.truncate(n);
        b.drain(..24);
        let c = StatCache {
            made_ns,
            count,
            body: b,
        };
        // Every record must parse, and in order.
        let mut k = 0;
        let mut prev: Option<&str> = None;
        for r in c.records() {
            if prev.is_some_and(|p| p.as_bytes() >= r.path.as_bytes()) {
                return None;
            }
            prev = Some(r.path);
            k += 1;
        }
        (k == count).then_some(c)
    }

    pub fn encode_entries(made_ns: i64, entries: &[LocalEntry]) -> Vec<u8> {
        StatCache::encode(made_ns, StatCache::records_of(entries))
    }

    /// The records of a scan's files (links have none).
    pub fn records_of(entries: &[LocalEntry]) -> impl Iterator<Item = (&str, Stat, Hash)> + Clone {
        entries.iter().filter_map(|e| match e.kind {
            LocalKind::File { hash, .. } => Some((&*e.path, e.stat, hash)),
            LocalKind::Link { .. } => None,
        })
    }

    /// Encodes `(path, stat, hash)` records, which must come sorted by path.
    pub fn encode<'a>(made_ns: i64, recs: impl Iterator<Item = (&'a str, Stat, Hash)>) -> Vec<u8> {
        // Never spilled: the count, known only at the end, is patched in
        // the buffer before the checksum is taken.
        let mut w = ChecksummedWriter::new(Vec::new());
        put_header(w.buf(), made_ns, 0);
        let mut n = 0u64;
        for r in recs {
            put_record(w.buf(), r);
            n += 1;
        }
        w.buf()[16..24].copy_from_slice(&n.to_le_bytes());
        let mut out = w.finish().expect("a Vec takes every write");
        out.shrink_to_fit();
        out
    }

    /// Streams exactly `count` records (sorted by path) to `out`, holding
    /// one piece of the file at a time: what `encode` would have built.
    pub fn write_to<'a>(
        out: impl std::io::Write,
        made_ns: i64,
        count: u64,
        recs: impl Iterator<Item = (&'a str, Stat, Hash)>,
    ) -> std::io::Result<()> {
        let mut w = ChecksummedWriter::new(out);
        put_header(w.buf(), made_ns, count);
        let mut n = 0u64;
        for r in recs {
            put_record(w.buf(), r);
            n += 1;
            w.spill()?;
        }
        if n != count {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("stat cache: {n} records written, {count} announced"),
            ));
        }
        w.finish().map(drop)
    }
}

fn put_header(out: &mut Vec<u8>, made_ns: i64, count: u64) {
    out.extend_from_slice(CACHE_MAGIC);
    out.extend_from_slice(&(made_ns as u64).to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
}

fn put_record(out: &mut Vec<u8>, (path, stat, hash): (&str, Stat, Hash)) {
    out.extend_from_slice(&(path.len() as u32).to_le_bytes());
    out.extend_from_slice(path.as_bytes());
    for v in [
        stat.size,
        stat.mtime_ns as u64,
        stat.ctime_ns as u64,
        stat.ino,
        hash.0,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// A file's hash and byte count, and its stat after reading.
type HashOutcome = std::io::Result<(Hash, u64, Stat)>;

/// How far back from the cache's timestamp an mtime counts as racy. One
/// second covers filesystems with coarse timestamps and small clock steps.
const RACY_WINDOW_NS: i64 = 1_000_000_000;

#[derive(Default)]
struct WalkOut {
    /// Files carry a placeholder hash until the hashing pass.
    cands: Vec<LocalEntry>,
    problems: Vec<Problem>,
    ignored: Vec<String>,
    hidden: u64,
}

fn now_ns() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_nanos() as i64
}

fn problem(path: impl Into<String>, kind: ProblemKind, message: impl Into<String>) -> Problem {
    Problem {
        path: path.into(),
        kind,
        message: message.into(),
    }
}

/// Scans `root` (the project root). `only` restricts the scan to paths under
/// a relpath prefix (for `list-files --path`).
pub fn scan(root: &Path, rules: &Rules, cache: StatCache, progress: &Progress) -> ScanResult {
    let started_ns = now_ns();
    let WalkOut {
        cands: mut entries,
        mut problems,
        ignored,
        hidden,
    } = walk(root, rules, cache.len(), progress);
    let (need, dirty) = reuse_cached_hashes(&mut entries, &cache);
    drop(cache);
    let results = hash_files(root, &entries, &need, progress);
    let (hashed_files, hashed_bytes) = record_hashes(&mut entries, results, &mut problems);
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    ScanResult {
        entries,
        problems,
        ignored,
        hidden,
        hashed_files,
        hashed_bytes,
        cache_dirty: dirty,
        started_ns,
    }
}

/// The walk's findings, entries and ignored paths sorted.
fn walk(root: &Path, rules: &Rules, cached: usize, progress: &Progress) -> WalkOut {
    // The last scan's size is the best guess of this one's: growing a
    // large Vec by doubling would hold two copies for a moment.
    let out = Mutex::new(WalkOut {
        cands: Vec::with_capacity(cached + cached / 32 + 16),
        ..WalkOut::default()
    });
    let t0 = std::time::Instant::now();
    walk_dir(root, String::new(), rules.all(), rules, &out, progress);
    tracing::debug!("walked in {:?}", t0.elapsed());
    let mut out = out.into_inner().unwrap();
    out.cands
        .sort_unstable_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    out.ignored.sort();
    out
}

/// Gives files whose stat the cache trusts their cached hash. Returns the
/// indexes of the files still to hash, and whether the cache must be
/// rewritten.
fn reuse_cached_hashes(entries: &mut [LocalEntry], cache: &StatCache) -> (Vec<usize>, bool) {
    let mut need: Vec<usize> = Vec::new();
    let mut dirty = cache.is_empty() && !entries.is_empty();
    let mut cached_files = 0usize;
    // Both are sorted by path: walk the cache alongside.
    let mut recs = cache.records().peekable();
    for (i, e) in entries.iter_mut().enumerate() {
        let LocalKind::File { hash, .. } = &mut e.kind else {
            continue;
        };
        cached_files += 1;
        while recs
            .peek()
            .is_some_and(|r| r.path.as_bytes() < e.path.as_bytes())
        {
            recs.next();
        }
        match recs.peek().filter(|r| r.path == &*e.path) {
            Some(r) if r.stat == e.stat && e.stat.mtime_ns < cache.made_ns - RACY_WINDOW_NS => {
                *hash = r.hash;
            }
            // Racy (unchanged stat but too recent to trust) or changed:
            // hash, and rewrite the cache so the entry is trusted next time.
            _ => {
                need.push(i);
                dirty = true;
            }
        }
    }
    if cached_files != cache.len() {
        dirty = true;
    }
    (need, dirty)
}

/// Hashes the files at `need` in parallel, each with its stat after reading.
fn hash_files(
    root: &Path,
    entries: &[LocalEntry],
    need: &[usize],
    progress: &Progress,
) -> Vec<(usize, HashOutcome)> {
    let bytes: u64 = need.iter().map(|&i| entries[i].stat.size).sum();
    progress
        .files_to_hash
        .store(need.len() as u64, Ordering::Relaxed);
    progress.bytes_to_hash.store(bytes, Ordering::Relaxed);
    need.par_iter()
        .map(|&i| {
            let p = root.join(&*entries[i].path);
            let r = hash_file(&p).and_then(|(h, n)| {
                // Re-stat after reading: a file that changed while we hashed it
                // must not be recorded with a hash of a mix of versions.
                let after = Stat::of(&std::fs::symlink_metadata(&p)?);
                Ok((h, n, after))
            });
            progress.files_hashed.fetch_add(1, Ordering::Relaxed);
            progress
                .bytes_hashed
                .fetch_add(entries[i].stat.size, Ordering::Relaxed);
            (i, r)
        })
        .collect()
}

/// Records the hashes; a file that could not be read, or changed while it
/// was, becomes a problem and leaves the entries. Returns the files and
/// bytes hashed.
fn record_hashes(
    entries: &mut Vec<LocalEntry>,
    results: Vec<(usize, HashOutcome)>,
    problems: &mut Vec<Problem>,
) -> (u64, u64) {
    let mut hashed_files = 0;
    let mut hashed_bytes = 0;
    let mut failed: Vec<usize> = Vec::new();
    for (i, r) in results {
        let e = &mut entries[i];
        match r {
            Ok((h, n, after)) if after == e.stat && n == after.size => {
                if let LocalKind::File { hash, .. } = &mut e.kind {
                    *hash = h;
                }
                hashed_files += 1;
                hashed_bytes += n;
            }
            Ok(_) => {
                failed.push(i);
                problems.push(problem(
                    &*e.path,
                    ProblemKind::Unreadable,
                    "file changed while it was being read; run the command again",
                ));
            }
            Err(err) => {
                failed.push(i);
                problems.push(problem(
                    &*e.path,
                    ProblemKind::Unreadable,
                    format!("cannot read: {err}"),
                ));
            }
        }
    }
    if !failed.is_empty() {
        failed.sort_unstable();
        let mut k = 0;
        let mut idx = 0;
        entries.retain(|_| {
            let keep = failed.get(k) != Some(&idx);
            if !keep {
                k += 1;
            }
            idx += 1;
            keep
        });
    }
    (hashed_files, hashed_bytes)
}

fn join_rel(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        let mut s = String::with_capacity(parent.len() + 1 + name.len());
        s.push_str(parent);
        s.push('/');
        s.push_str(name);
        s
    }
}

/// Walks one directory, then its subdirectories in parallel. Findings are
/// gathered per directory so that the shared `out` is locked once each.
fn walk_dir(
    root: &Path,
    rel: String,
    in_data: bool,
    rules: &Rules,
    out: &Mutex<WalkOut>,
    progress: &Progress,
) {
    let dir: PathBuf = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(&rel)
    };
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) => {
            let path = if rel.is_empty() { "." } else { &rel };
            out.lock().unwrap().problems.push(problem(
                path,
                ProblemKind::Unreadable,
                format!("cannot read directory: {e}"),
            ));
            return;
        }
    };
    let mut subdirs: Vec<(String, bool)> = Vec::new();
    let mut local = WalkOut::default();
    for de in rd {
        match sort_entry(de, &rel, in_data, rules, progress, &mut local) {
            Sorted::Done => {}
            Sorted::Subdir(child_rel, here_data) => subdirs.push((child_rel, here_data)),
            Sorted::Data(de, child_rel) => data_entry(root, &dir, &de, child_rel, &mut local),
        }
    }
    if !local.cands.is_empty()
        || !local.problems.is_empty()
        || !local.ignored.is_empty()
        || local.hidden > 0
    {
        let mut o = out.lock().unwrap();
        o.cands.append(&mut local.cands);
        o.problems.append(&mut local.problems);
        o.ignored.append(&mut local.ignored);
        o.hidden += local.hidden;
    }
    subdirs
        .into_par_iter()
        .for_each(|(r, d)| walk_dir(root, r, d, rules, out, progress));
}

/// Where one directory entry goes next.
enum Sorted {
    /// Hidden, ignored, outside the data or unreadable (then in `local`).
    Done,
    /// A directory to walk: its path and whether it is inside the data.
    Subdir(String, bool),
    /// A tracked non-directory, with its path.
    Data(std::fs::DirEntry, String),
}

/// Applies the name, hidden and ignore rules to one directory entry.
fn sort_entry(
    de: std::io::Result<std::fs::DirEntry>,
    rel: &str,
    in_data: bool,
    rules: &Rules,
    progress: &Progress,
    local: &mut WalkOut,
) -> Sorted {
    let de = match de {
        Ok(d) => d,
        Err(e) => {
            local.problems.push(problem(
                rel,
                ProblemKind::Unreadable,
                format!("cannot list directory: {e}"),
            ));
            return Sorted::Done;
        }
    };
    let name_os = de.file_name();
    let bytes = name_os.as_bytes();
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
    let child_rel = join_rel(rel, name);
    let ft = match de.file_type() {
        Ok(ft) => ft,
        Err(e) => {
            local.problems.push(problem(
                child_rel,
                ProblemKind::Unreadable,
                format!("cannot stat: {e}"),
            ));
            return Sorted::Done;
        }
    };
    let here_data = in_data || rules.data_dirs.contains(name);
    if rules.ignored_name(name) || (ft.is_dir() && names::is_conflict_backup_name(name)) {
        if here_data {
            local.ignored.push(child_rel);
        }
        return Sorted::Done;
    }
    if ft.is_dir() {
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
    progress.files_seen.fetch_add(1, Ordering::Relaxed);
    if rules.ignored_file(&child_rel, name) {
        local.ignored.push(child_rel);
        return Sorted::Done;
    }
    Sorted::Data(de, child_rel)
}

/// A tracked file or link becomes a candidate; anything else, a problem.
fn data_entry(
    root: &Path,
    dir: &Path,
    de: &std::fs::DirEntry,
    child_rel: String,
    local: &mut WalkOut,
) {
    // fstatat on the open directory: no path walk per file.
    let md = match de.metadata() {
        Ok(m) => m,
        Err(e) => {
            local.problems.push(problem(
                child_rel,
                ProblemKind::Unreadable,
                format!("cannot stat: {e}"),
            ));
            return;
        }
    };
    let ft = md.file_type();
    if let Err(p) = names::validate_path(&child_rel) {
        local
            .problems
            .push(problem(&child_rel, ProblemKind::Name, p.to_string()));
    }
    if ft.is_symlink() {
        match link_entry(root, &dir.join(de.file_name()), child_rel, &md) {
            Ok(e) => local.cands.push(e),
            Err(p) => local.problems.push(p),
        }
    } else if ft.is_file() {
        local.cands.push(LocalEntry {
            path: child_rel.into(),
            kind: LocalKind::File {
                size: md.len(),
                hash: Hash(0),
            },
            stat: Stat::of(&md),
        });
    } else if !ft.is_dir() {
        local.problems.push(problem(
            child_rel,
            ProblemKind::Special,
            "not a regular file, directory or symlink; not synced",
        ));
    }
}

/// The symlink at `path` as an entry, if its target stays inside the project.
fn link_entry(
    root: &Path,
    path: &Path,
    child_rel: String,
    md: &std::fs::Metadata,
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
        stat: Stat::of(md),
    })
}

/// Turns a scan into the L manifest, plus each entry's stat (same order).
/// Attribution and the mtime string are carried over from the cache when
/// the content is unchanged, so `user` changes only when content does (the
/// original re-attributed touched files, defect 5) and a `touch` changes
/// nothing.
pub fn to_manifest(
    mut entries: Vec<LocalEntry>,
    cache: Option<&Manifest>,
    user: &str,
    keep_stats: bool,
) -> (Manifest, Vec<Stat>) {
    let me: Arc<str> = user.into();
    let n = entries.len();
    let mut out: Vec<Entry> = Vec::new();
    let mut stats: Vec<Stat> = Vec::new();
    let cached = cache.map(|c| c.entries()).unwrap_or(&[]);
    // Consume from the back and give the scan's memory back as we go, so the
    // scan and the manifest are never both fully in memory (a large Vec is
    // mmap'd and shrinking it returns pages).
    let mut ci = cached.len();
    let step = (n / 8).max(4096);
    while let Some(e) = entries.pop() {
        if entries.len().is_multiple_of(step) && entries.capacity() > entries.len() + step {
            entries.shrink_to_fit();
        }
        // Grow the output in the same steps (exactly, not by doubling).
        if out.len() == out.capacity() {
            out.reserve_exact(step.min(n - out.len()).max(1));
            if keep_stats {
                stats.reserve_exact(step.min(n - stats.len()).max(1));
            }
        }
        // Both sides are sorted: walk the cache alongside instead of searching.
        while ci > 0 && cached[ci - 1].path.as_bytes() > e.path.as_bytes() {
            ci -= 1;
        }
        let c = ci
            .checked_sub(1)
            .map(|i| &cached[i])
            .filter(|c| c.path == e.path);
        let entry = match e.kind {
            LocalKind::File { size, hash } => match c {
                Some(c) if matches!(&c.kind, EntryKind::File { size: cs, hash: Some(ch), .. } if *cs == size && *ch == hash) => {
                    Entry {
                        path: e.path,
                        user: c.user.clone(),
                        kind: c.kind.clone(),
                    }
                }
                _ => Entry {
                    path: e.path,
                    user: me.clone(),
                    kind: EntryKind::File {
                        size,
                        mtime: Mtime::from_unix(
                            e.stat.mtime_ns.div_euclid(1_000_000_000),
                            e.stat.mtime_ns.rem_euclid(1_000_000_000) as u32,
                        ),
                        hash: Some(hash),
                    },
                },
            },
            LocalKind::Link { target } => {
                let user = match c {
                    Some(c) if matches!(&c.kind, EntryKind::Link { target: t } if *t == target) => {
                        c.user.clone()
                    }
                    _ => me.clone(),
                };
                Entry {
                    path: e.path,
                    user,
                    kind: EntryKind::Link { target },
                }
            }
        };
        out.push(entry);
        if keep_stats {
            stats.push(e.stat);
        }
    }
    out.reverse();
    stats.reverse();
    (Manifest::from_sorted_entries(out), stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn rules() -> Rules {
        Rules {
            data_dirs: ProjectConfig::default_data_dirs(),
            ignore: IgnoreRules::defaults(),
        }
    }

    #[test]
    fn inclusion_and_ignore() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for p in [
            "input/a.csv",
            "input/__pycache__/x.py",
            "input/b.tmp",
            "input/.hidden",
            "README.md",
            "task1/output/o.txt",
            "src/x.py",
            "input/d~20250713T165322+0000~",
        ] {
            fs::create_dir_all(r.join(p).parent().unwrap()).unwrap();
            fs::write(r.join(p), p).unwrap();
        }
        std::os::unix::fs::symlink("../input/a.csv", r.join("task1/output/l.csv")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.join("input/abs")).unwrap();
        let res = scan(r, &rules(), StatCache::default(), &Progress::default());
        let paths: Vec<&str> = res.entries.iter().map(|e| &*e.path).collect();
        assert_eq!(
            paths,
            ["input/a.csv", "task1/output/l.csv", "task1/output/o.txt"]
        );
        assert!(matches!(res.entries[1].kind, LocalKind::Link { .. }));
        assert_eq!(res.problems.len(), 1, "{:?}", res.problems);
        assert_eq!(res.problems[0].kind, ProblemKind::Link);
        assert!(res.ignored.contains(&"input/__pycache__".to_string()));
        assert!(res.ignored.iter().any(|p| p.ends_with("b.tmp")));
        assert!(res.ignored.iter().any(|p| p.contains("~2025")));
        let LocalKind::File { hash, .. } = res.entries[0].kind else {
            panic!()
        };
        assert_eq!(hash, Hash::of_bytes(b"input/a.csv"));
    }

    #[test]
    fn stat_cache_skips_and_racy_edit_is_seen() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("input")).unwrap();
        fs::write(r.join("input/a"), b"aaaa").unwrap();
        let p = Progress::default();
        let first = scan(r, &rules(), StatCache::default(), &p);
        assert_eq!(first.hashed_files, 1);
        let cache =
            StatCache::decode(StatCache::encode_entries(first.started_ns, &first.entries)).unwrap();
        // Same size, same second: a racy edit.
        let mt = fs::metadata(r.join("input/a")).unwrap().modified().unwrap();
        fs::write(r.join("input/a"), b"bbbb").unwrap();
        let f = fs::File::options()
            .write(true)
            .open(r.join("input/a"))
            .unwrap();
        f.set_modified(mt).unwrap();
        drop(f);
        let second = scan(r, &rules(), cache, &p);
        let LocalKind::File { hash, .. } = second.entries[0].kind else {
            panic!()
        };
        assert_eq!(hash, Hash::of_bytes(b"bbbb"));
        // An old cache timestamp makes the entry trusted: no hashing.
        let old =
            StatCache::decode(StatCache::encode_entries(i64::MAX / 2, &second.entries)).unwrap();
        let third = scan(r, &rules(), old, &p);
        assert_eq!(third.hashed_files, 0);
        assert!(!third.cache_dirty);
    }

    #[test]
    fn damaged_cache_is_empty() {
        let mut b = StatCache::encode_entries(5, &[]);
        b[10] ^= 1;
        assert!(StatCache::decode(b).is_none());
    }

    #[test]
    fn a_streamed_stat_cache_is_the_encoded_one_and_refuses_a_wrong_count() {
        let recs: Vec<(String, Stat, Hash)> = (0..50_000u64)
            .map(|i| {
                let st = Stat {
                    size: i,
                    mtime_ns: i as i64 * 7,
                    ctime_ns: i as i64 * 11,
                    ino: i + 1,
                };
                (format!("input/d{:05}/f.txt", i), st, Hash(i * 31))
            })
            .collect();
        let it = || recs.iter().map(|(p, s, h)| (p.as_str(), *s, *h));
        let encoded = StatCache::encode(42, it());
        let mut streamed = Vec::new();
        StatCache::write_to(&mut streamed, 42, recs.len() as u64, it()).unwrap();
        assert_eq!(streamed, encoded);
        assert!(StatCache::decode(streamed).is_some());
        let mut short = Vec::new();
        assert!(StatCache::write_to(&mut short, 42, recs.len() as u64 + 1, it()).is_err());
    }
}
