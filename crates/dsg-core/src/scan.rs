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
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

use crate::config::{IgnoreRules, ProjectConfig};
use crate::hash::{hash_file, Hash};
use crate::manifest::{Entry, EntryKind, Manifest, Mtime};
use crate::names;

mod local;
mod stat_cache;
mod walk;

use local::Slot;
pub use local::{LocalManifest, LocalView};
pub use stat_cache::{
    listing_entries, ChildKind, DirListing, DirRec, KnownFile, StatCache, StatRec,
};

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
    /// Every directory walked and its listing, sorted by path: the stat
    /// cache's directory records.
    pub dirs: Vec<DirListing>,
    /// How many of `dirs` were not listed again (their listing came from
    /// the stat cache).
    pub dirs_reused: u64,
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

/// Private fields: `screen` must be made from the very sets it screens.
pub struct Rules {
    data_dirs: BTreeSet<String>,
    ignore: IgnoreRules,
    screen: Screen,
}

/// What the ignore names' lengths and the suffixes' last bytes can be, so
/// that most names are passed without a set lookup: these checks run for
/// every file of every scan, and string comparisons were the largest share
/// of a warm status's user time (with the stat-cache join below, the screen
/// took 0.176 -> 0.168 s at 100 000 files).
#[derive(Default)]
struct Screen {
    /// Bit `n` for a name of `n` bytes (bit 63: 63 bytes or more).
    name_lens: u64,
    /// Bit `b` for a suffix ending in byte `b`.
    suffix_last: [u64; 4],
}

impl Screen {
    fn of(ignore: &IgnoreRules) -> Screen {
        let mut s = Screen::default();
        for n in &ignore.names {
            s.name_lens |= Self::len_bit(n);
        }
        for b in ignore.suffixes.iter().filter_map(|x| x.as_bytes().last()) {
            s.suffix_last[usize::from(b >> 6)] |= 1 << (b & 63);
        }
        s
    }

    fn len_bit(name: &str) -> u64 {
        1 << name.len().min(63)
    }

    fn may_be_name(&self, name: &str) -> bool {
        self.name_lens & Self::len_bit(name) != 0
    }

    fn may_end_in_suffix(&self, name: &str) -> bool {
        name.as_bytes()
            .last()
            .is_some_and(|&b| self.suffix_last[usize::from(b >> 6)] & (1 << (b & 63)) != 0)
    }
}

impl Rules {
    pub fn new(data_dirs: BTreeSet<String>, ignore: IgnoreRules) -> Rules {
        let screen = Screen::of(&ignore);
        Rules {
            data_dirs,
            ignore,
            screen,
        }
    }

    pub fn from_config(c: &ProjectConfig) -> Rules {
        Rules::new(c.data_dirs.clone(), c.ignore.clone())
    }

    fn all(&self) -> bool {
        self.data_dirs.contains("*")
    }

    fn ignored_name(&self, name: &str) -> bool {
        self.screen.may_be_name(name) && self.ignore.names.contains(name)
    }

    fn ignored_file(&self, rel: &str, name: &str) -> bool {
        (self.screen.may_end_in_suffix(name)
            && self
                .ignore
                .suffixes
                .iter()
                .any(|s| !s.is_empty() && name.ends_with(s.as_str())))
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

/// A file's hash and byte count, and its stat after reading.
type HashOutcome = std::io::Result<(Hash, u64, Stat)>;

/// How far back from the cache's timestamp an mtime counts as racy. One
/// second covers filesystems with coarse timestamps and small clock steps.
pub const RACY_WINDOW_NS: i64 = 1_000_000_000;

pub fn now_ns() -> i64 {
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
    let walk::WalkOut {
        cands: mut entries,
        mut problems,
        ignored,
        hidden,
        dirs,
        dirs_reused,
        ..
    } = walk::walk(root, rules, &cache, progress);
    let (need, files_dirty) = reuse_cached_hashes(&mut entries, &cache);
    // A directory listed again (new, changed or racy), or one gone.
    let dirs_dirty = dirs_reused != dirs.len() || dirs_reused != cache.dir_count();
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
        cache_dirty: files_dirty || dirs_dirty,
        started_ns,
        dirs,
        dirs_reused: dirs_reused as u64,
    }
}

/// Gives files whose stat the cache trusts their cached hash. Returns the
/// indexes of the files still to hash, and whether the cache must be
/// rewritten.
fn reuse_cached_hashes(entries: &mut [LocalEntry], cache: &StatCache) -> (Vec<usize>, bool) {
    let mut need: Vec<usize> = Vec::new();
    let mut dirty = cache.is_empty() && !entries.is_empty();
    // Both are sorted by path: walk the scan alongside the cache's records
    // (read from the file again, one piece at a time).
    let mut i = 0;
    let mut check = |e: &mut LocalEntry, i: usize, rec: Option<&StatRec<'_>>| {
        let LocalKind::File { hash, .. } = &mut e.kind else {
            return;
        };
        match rec {
            Some(r) if r.stat == e.stat && e.stat.mtime_ns < cache.made_ns - RACY_WINDOW_NS => {
                *hash = r.hash;
            }
            // Racy (unchanged stat but too recent to trust), changed or
            // new: hash, and rewrite the cache so the entry is trusted
            // next time.
            _ => {
                need.push(i);
                dirty = true;
            }
        }
    };
    let read = cache.each_record(|r| {
        // One comparison a step (`<` then `==` was two).
        while let Some(e) = entries.get_mut(i) {
            match e.path.as_bytes().cmp(r.path.as_bytes()) {
                std::cmp::Ordering::Less => check(e, i, None),
                std::cmp::Ordering::Equal => {
                    check(e, i, Some(&r));
                    i += 1;
                    break;
                }
                std::cmp::Ordering::Greater => break,
            }
            i += 1;
        }
    });
    for (k, e) in entries.iter_mut().enumerate().skip(i) {
        check(e, k, None);
    }
    if !read {
        tracing::warn!("the stat cache changed while it was read; rehashing");
        need = (0..entries.len())
            .filter(|&k| matches!(entries[k].kind, LocalKind::File { .. }))
            .collect();
        dirty = true;
    }
    let files = entries
        .iter()
        .filter(|e| matches!(e.kind, LocalKind::File { .. }))
        .count();
    if files != cache.len() {
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

/// Turns a scan into the L manifest, plus each entry's stat (same order).
/// Attribution and the mtime string are carried over from the cache when
/// the content is unchanged, so `user` changes only when content does (the
/// original re-attributed touched files, defect 5) and a `touch` changes
/// nothing. Every entry is held whole: see [`to_local`] for L as a view
/// over the cache.
pub fn to_manifest(
    entries: Vec<LocalEntry>,
    cache: Option<&Manifest>,
    user: &str,
    keep_stats: bool,
) -> (Manifest, Vec<Stat>) {
    let cached = cache.map(|c| c.entries()).unwrap_or(&[]);
    let n = entries.len();
    let step = growth_step(n);
    let mut out: Vec<Entry> = Vec::new();
    let stats = consume_scan(entries, cached, user, keep_stats, |slot, _| {
        // Grow in the scan's steps (exactly, not by doubling).
        if out.len() == out.capacity() {
            out.reserve_exact(step.min(n - out.len()).max(1));
        }
        out.push(match slot {
            Slot::Same(_, c) => c.clone(),
            Slot::Own(e) => e,
        });
    });
    out.reverse();
    (Manifest::from_sorted_entries(out), stats)
}

/// [`to_manifest`] as a view over `cache`: an unchanged file's entry is
/// `cache`'s own (4 bytes in L instead of a copy of ~120).
pub fn to_local(
    entries: Vec<LocalEntry>,
    cache: &Manifest,
    user: &str,
    keep_stats: bool,
) -> (LocalManifest, Vec<Stat>) {
    let mut b = LocalBuilder::new(entries, user, keep_stats);
    for (i, c) in cache.entries().iter().enumerate() {
        b.cached(i, c);
    }
    b.finish(cache.len())
}

/// [`to_local`] with the cache given one entry at a time, in path order, as
/// it is read: the scan is consumed alongside and its memory given back as
/// it goes, so the scan and the cache are never both whole in memory.
pub struct LocalBuilder {
    /// The scan's entries not yet consumed, the next one last.
    rest: Vec<LocalEntry>,
    n: usize,
    local: LocalManifest,
    stats: Vec<Stat>,
    keep_stats: bool,
    me: Arc<str>,
    /// Cache entries given so far.
    seen: usize,
}

impl LocalBuilder {
    /// Over a scan (sorted by path) by `user`; `keep_stats` keeps each
    /// entry's stat (in L's order).
    pub fn new(mut entries: Vec<LocalEntry>, user: &str, keep_stats: bool) -> LocalBuilder {
        entries.reverse();
        let n = entries.len();
        LocalBuilder {
            rest: entries,
            n,
            local: LocalManifest::with_capacity(n),
            // Touched only as it fills (a large Vec is mmap'd).
            stats: if keep_stats {
                Vec::with_capacity(n)
            } else {
                Vec::new()
            },
            keep_stats,
            me: user.into(),
            seen: 0,
        }
    }

    /// Whether any cache entry was given: a builder fed a cache that then
    /// proved damaged has consumed part of the scan and cannot be reused.
    pub fn started(&self) -> bool {
        self.seen > 0
    }

    /// The scan back, sorted, when no cache entry was given yet.
    pub fn into_scan(self) -> Option<Vec<LocalEntry>> {
        if self.started() {
            return None;
        }
        let mut entries = self.rest;
        entries.reverse();
        Some(entries)
    }

    /// The cache's entry at index `i`; entries come in increasing path
    /// order, `i` counting from 0.
    pub fn cached(&mut self, i: usize, c: &Entry) {
        debug_assert_eq!(i, self.seen);
        self.seen += 1;
        while let Some(e) = self.pop_if(|p| p.as_bytes() < c.path.as_bytes()) {
            self.push(e, None);
        }
        if let Some(e) = self.pop_if(|p| p == &*c.path) {
            self.push(e, Some((i, c)));
        }
    }

    /// L and the stats, once every cache entry was given (`cache_len` of them).
    pub fn finish(mut self, cache_len: usize) -> (LocalManifest, Vec<Stat>) {
        assert_eq!(self.seen, cache_len, "every cache entry was given");
        while let Some(e) = self.pop_if(|_| true) {
            self.push(e, None);
        }
        self.local.finish(cache_len);
        (self.local, self.stats)
    }

    /// The next scanned entry, when its path passes `take`; the scan's
    /// memory is given back in steps as it empties.
    fn pop_if(&mut self, take: impl FnOnce(&str) -> bool) -> Option<LocalEntry> {
        if !take(&self.rest.last()?.path) {
            return None;
        }
        let e = self.rest.pop()?;
        let step = shrink_step(self.n);
        if self.rest.len().is_multiple_of(step) && self.rest.capacity() > self.rest.len() + step {
            self.rest.shrink_to_fit();
        }
        Some(e)
    }

    fn push(&mut self, e: LocalEntry, c: Option<(usize, &Entry)>) {
        if self.keep_stats {
            self.stats.push(e.stat);
        }
        let left = self.rest.len();
        self.local.push(local_slot(e, c, &self.me), left);
    }
}

fn growth_step(n: usize) -> usize {
    (n / 8).max(4096)
}

/// How often a scan being consumed gives its memory back: what it has not
/// given back yet is held on top of L and C whole at the end (an eighth of
/// the scan was ~9 bytes a file at a status's peak; a 64th is ~1, and a
/// shrink of a mmap'd Vec is a cheap remap).
fn shrink_step(n: usize) -> usize {
    (n / 64).max(4096)
}

/// Gives each scanned entry, last first, to `push` as `cached`'s entry
/// when that is the same, else as a new entry (with how many are still to
/// come); returns the stats in path order (none unless `keep_stats`).
fn consume_scan<'c>(
    mut entries: Vec<LocalEntry>,
    cached: &'c [Entry],
    user: &str,
    keep_stats: bool,
    mut push: impl FnMut(Slot<'c>, usize),
) -> Vec<Stat> {
    let me: Arc<str> = user.into();
    let n = entries.len();
    let mut stats: Vec<Stat> = Vec::new();
    // Consume from the back and give the scan's memory back as we go, so the
    // scan and the manifest are never both fully in memory (a large Vec is
    // mmap'd and shrinking it returns pages).
    let mut ci = cached.len();
    let step = growth_step(n);
    while let Some(e) = entries.pop() {
        if entries.len().is_multiple_of(step) && entries.capacity() > entries.len() + step {
            entries.shrink_to_fit();
        }
        if keep_stats && stats.len() == stats.capacity() {
            stats.reserve_exact(step.min(n - stats.len()).max(1));
        }
        // Both sides are sorted: walk the cache alongside instead of searching.
        while ci > 0 && cached[ci - 1].path.as_bytes() > e.path.as_bytes() {
            ci -= 1;
        }
        let c = ci
            .checked_sub(1)
            .map(|i| (i, &cached[i]))
            .filter(|(_, c)| c.path == e.path);
        if keep_stats {
            stats.push(e.stat);
        }
        push(local_slot(e, c, &me), entries.len());
    }
    stats.reverse();
    stats
}

/// The L entry of one scanned path, given its cache entry `c` (and its
/// index): the cache's when the content is the same.
fn local_slot<'c>(e: LocalEntry, c: Option<(usize, &'c Entry)>, me: &Arc<str>) -> Slot<'c> {
    match e.kind {
        LocalKind::File { size, hash } => match c {
            Some((i, c)) if matches!(&c.kind, EntryKind::File { size: cs, hash: Some(ch), .. } if *cs == size && *ch == hash) => {
                Slot::Same(i, c)
            }
            _ => Slot::Own(Entry {
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
            }),
        },
        LocalKind::Link { target } => match c {
            Some((i, c)) if matches!(&c.kind, EntryKind::Link { target: t } if *t == target) => {
                Slot::Same(i, c)
            }
            _ => Slot::Own(Entry {
                path: e.path,
                user: me.clone(),
                kind: EntryKind::Link { target },
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn rules() -> Rules {
        Rules::new(ProjectConfig::default_data_dirs(), IgnoreRules::defaults())
    }

    proptest::proptest! {
        /// The screen only skips lookups that would find nothing: with
        /// names and suffixes that share lengths and last bytes with the
        /// ones tried, multi-byte characters, names of 63 bytes and more
        /// and an empty suffix, the answers are the unscreened sets'.
        #[test]
        fn the_screen_changes_no_answer(
            names in proptest::collection::btree_set("[ab\u{e9}~.]{0,4}|x{60,70}", 0..6),
            suffixes in proptest::collection::btree_set("[ab\u{e9}~.]{0,3}", 0..4),
            tried in proptest::collection::vec("[ab\u{e9}~.]{0,6}|x{60,70}", 1..40),
        ) {
            let ignore = IgnoreRules { paths: BTreeSet::new(), names, suffixes };
            let r = Rules::new(BTreeSet::new(), ignore.clone());
            for n in &tried {
                let by_name = ignore.names.contains(n.as_str());
                proptest::prop_assert_eq!(r.ignored_name(n), by_name, "{:?}", n);
                let by_suffix = ignore
                    .suffixes
                    .iter()
                    .any(|s| !s.is_empty() && n.ends_with(s.as_str()));
                let rel = format!("input/{n}");
                let by_other = names::is_conflict_backup_name(n) || r.ignored_path(&rel);
                proptest::prop_assert_eq!(r.ignored_file(&rel, n), by_suffix || by_other, "{:?}", n);
            }
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

    /// The stat cache a status would write after `res`.
    fn cache_of(made_ns: i64, res: &ScanResult) -> StatCache {
        let recs = StatCache::records_of(&res.entries);
        StatCache::decode(StatCache::encode(made_ns, recs, &res.dirs)).unwrap()
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
        let old = cache_of(i64::MAX / 2, &second);
        let third = scan(r, &rules(), old, &p);
        assert_eq!(third.hashed_files, 0);
        assert!(!third.cache_dirty);
    }

    fn paths_and_hashes(res: &ScanResult) -> Vec<(String, Hash)> {
        res.entries
            .iter()
            .map(|e| match e.kind {
                LocalKind::File { hash, .. } => (e.path.to_string(), hash),
                LocalKind::Link { .. } => (e.path.to_string(), Hash(0)),
            })
            .collect()
    }

    /// A tree whose directories are all older than the racy window, and a
    /// status's stat cache of it (made now, as a status makes it).
    fn settled_tree(r: &Path, files: &[(&str, &str)]) -> StatCache {
        for (p, c) in files {
            fs::create_dir_all(r.join(p).parent().unwrap()).unwrap();
            fs::write(r.join(p), c).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let first = scan(r, &rules(), StatCache::default(), &Progress::default());
        assert_eq!(first.dirs_reused, 0);
        assert!(first.cache_dirty);
        let cache = cache_of(first.started_ns, &first);
        // The same tree again: no directory is listed, nothing is hashed,
        // the cache need not be rewritten.
        let again = scan(r, &rules(), cache, &Progress::default());
        assert_eq!(again.dirs_reused as usize, again.dirs.len());
        assert_eq!(again.hashed_files, 0);
        assert!(!again.cache_dirty);
        assert_eq!(paths_and_hashes(&again), paths_and_hashes(&first));
        cache_of(first.started_ns, &again)
    }

    #[test]
    fn an_unchanged_directory_is_not_listed_and_every_change_in_one_is_seen() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let cache = settled_tree(
            r,
            &[
                ("input/add/a", "a"),
                ("input/del/a", "a"),
                ("input/del/b", "b"),
                ("input/ren/a", "a"),
                ("input/edit/a", "aaaa"),
                ("input/repl/x/a", "a"),
                ("input/same/a", "a"),
                ("input/same/deep/b", "b"),
            ],
        );
        fs::write(r.join("input/add/new"), "n").unwrap();
        fs::remove_file(r.join("input/del/b")).unwrap();
        fs::rename(r.join("input/ren/a"), r.join("input/ren/b")).unwrap();
        // Same size, mtime put back: ctime and the inode still differ.
        let e = r.join("input/edit/a");
        let mt = fs::metadata(&e).unwrap().modified().unwrap();
        fs::write(&e, "bbbb").unwrap();
        fs::File::options()
            .write(true)
            .open(&e)
            .unwrap()
            .set_modified(mt)
            .unwrap();
        // A directory replaced by another of the same name, other content.
        fs::remove_dir_all(r.join("input/repl/x")).unwrap();
        fs::create_dir(r.join("input/repl/x")).unwrap();
        fs::write(r.join("input/repl/x/c"), "c").unwrap();
        let res = scan(r, &rules(), cache, &Progress::default());
        let h = |s: &str| Hash::of_bytes(s.as_bytes());
        let want: Vec<(String, Hash)> = [
            ("input/add/a", h("a")),
            ("input/add/new", h("n")),
            ("input/del/a", h("a")),
            ("input/edit/a", h("bbbb")),
            ("input/ren/b", h("a")),
            ("input/repl/x/c", h("c")),
            ("input/same/a", h("a")),
            ("input/same/deep/b", h("b")),
        ]
        .into_iter()
        .map(|(p, h)| (p.to_string(), h))
        .collect();
        assert_eq!(paths_and_hashes(&res), want);
        assert!(res.cache_dirty);
        // Listed again: add, del, ren, repl (its child was replaced) and
        // the new repl/x. Not: the root, input, edit (a file's content is
        // not its directory's), same, same/deep.
        assert_eq!(res.dirs.len(), 10);
        assert_eq!(res.dirs_reused, 5);
    }

    #[test]
    fn a_racy_directory_is_listed_again() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("input")).unwrap();
        fs::write(r.join("input/a"), "a").unwrap();
        let first = scan(r, &rules(), StatCache::default(), &Progress::default());
        // A file added in the same clock tick as the listing may leave the
        // directory's stat as it was: forge exactly that, a record with
        // the directory's current stat and the listing from before.
        fs::write(r.join("input/b"), "b").unwrap();
        let mut stale = first.dirs.clone();
        let input = stale.iter_mut().find(|d| d.path == "input").unwrap();
        let md = fs::symlink_metadata(r.join("input")).unwrap();
        input.stat = Stat::of(&md);
        let forged = |made_ns| {
            let recs = StatCache::records_of(&first.entries);
            StatCache::decode(StatCache::encode(made_ns, recs, &stale)).unwrap()
        };
        // Made just now: the directory is racy and listed again.
        let res = scan(r, &rules(), forged(first.started_ns), &Progress::default());
        let paths: Vec<&str> = res.entries.iter().map(|e| &*e.path).collect();
        assert_eq!(paths, ["input/a", "input/b"]);
        // The rule is what finds it: made long after, the stale listing
        // would be trusted.
        let res = scan(r, &rules(), forged(i64::MAX / 2), &Progress::default());
        let paths: Vec<&str> = res.entries.iter().map(|e| &*e.path).collect();
        assert_eq!(paths, ["input/a"]);
    }

    /// The names of a listing, in its order.
    fn listing_names(l: &[u8]) -> Vec<String> {
        listing_entries(l)
            .map(|(_, n)| String::from_utf8_lossy(n).into_owned())
            .collect()
    }

    #[test]
    fn listings_are_kept_sorted_and_an_unsorted_cached_one_is_sorted_and_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let names = ["m", "b", "z", "a", "q", "c0", "c", "c.d"];
        let files: Vec<(String, &str)> = names.iter().map(|n| (format!("input/{n}"), *n)).collect();
        let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (p.as_str(), *c)).collect();
        let cache = settled_tree(r, &files);
        let first = scan(r, &rules(), cache, &Progress::default());
        let input = first.dirs.iter().find(|d| d.path == "input").unwrap();
        let mut sorted = names.map(String::from).to_vec();
        sorted.sort();
        assert_eq!(listing_names(&input.listing), sorted);
        // A cache written before listings were sorted: `input`'s listing
        // in reverse order, its stat unchanged.
        let mut old = first.dirs.clone();
        let rec = old.iter_mut().find(|d| d.path == "input").unwrap();
        let mut reversed = Vec::new();
        let entries: Vec<_> = listing_entries(&rec.listing).collect();
        for (kind, name) in entries.into_iter().rev() {
            stat_cache::push_listing_entry(&mut reversed, kind, name);
        }
        rec.listing = reversed;
        let recs = StatCache::records_of(&first.entries);
        let made = first.started_ns + 3 * RACY_WINDOW_NS;
        let cache = StatCache::decode(StatCache::encode(made, recs, &old)).unwrap();
        let res = scan(r, &rules(), cache, &Progress::default());
        // Same files in path order, nothing hashed; `input` counts as
        // listed again, so the cache is rewritten with its sorted listing.
        assert_eq!(paths_and_hashes(&res), paths_and_hashes(&first));
        assert_eq!(res.hashed_files, 0);
        assert_eq!(res.dirs_reused as usize, res.dirs.len() - 1);
        assert!(res.cache_dirty);
        let input = res.dirs.iter().find(|d| d.path == "input").unwrap();
        assert_eq!(listing_names(&input.listing), sorted);
    }

    #[test]
    fn a_version_1_stat_cache_is_read_and_its_directories_listed() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("input")).unwrap();
        fs::write(r.join("input/a"), "a").unwrap();
        let first = scan(r, &rules(), StatCache::default(), &Progress::default());
        // Version 1: a 24-byte header, file records, the checksum.
        let v2 = StatCache::encode(i64::MAX / 2, StatCache::records_of(&first.entries), &[]);
        let mut v1 = b"DSGSTAT1".to_vec();
        v1.extend_from_slice(&v2[8..24]);
        v1.extend_from_slice(&v2[80..v2.len() - 8]);
        let sum = Hash::of_bytes(&v1).0.to_le_bytes();
        v1.extend_from_slice(&sum);
        let old = StatCache::decode(v1).expect("a version 1 cache is read");
        assert_eq!((old.len(), old.dir_count()), (1, 0));
        let res = scan(r, &rules(), old, &Progress::default());
        assert_eq!(res.hashed_files, 0, "its file records are used");
        assert_eq!(res.dirs_reused, 0);
        assert!(res.cache_dirty, "rewritten with its directories");
        // An unknown version is not misread.
        let mut v9 = StatCache::encode(5, std::iter::empty(), &[]);
        v9[7] = b'9';
        let n = v9.len() - 8;
        let sum = Hash::of_bytes(&v9[..n]).0.to_le_bytes();
        v9[n..].copy_from_slice(&sum);
        assert!(StatCache::decode(v9).is_none());
    }

    #[test]
    fn a_cache_with_a_bad_directory_record_is_refused() {
        let dirs = vec![
            DirListing {
                path: "b".into(),
                stat: Stat::default(),
                listing: vec![0, 1, 0, b'x'],
            },
            DirListing {
                path: "a".into(),
                stat: Stat::default(),
                listing: vec![],
            },
        ];
        // Out of order.
        assert!(StatCache::decode(StatCache::encode(5, std::iter::empty(), &dirs)).is_none());
        // A listing entry running past its end.
        let bad = vec![DirListing {
            path: "a".into(),
            stat: Stat::default(),
            listing: vec![0, 9, 0, b'x'],
        }];
        assert!(StatCache::decode(StatCache::encode(5, std::iter::empty(), &bad)).is_none());
        let good = StatCache::decode(StatCache::encode(5, std::iter::empty(), &dirs[..1])).unwrap();
        let rec = good.dir("b").unwrap();
        let entries: Vec<_> = listing_entries(rec.listing).collect();
        assert_eq!(entries, [(ChildKind::File, &b"x"[..])]);
        assert!(good.dir("a").is_none());
    }

    #[test]
    fn entries_come_in_byte_order_whatever_the_names() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let mut want = Vec::new();
        let dirs = [
            "input",
            "input/b",
            "input/b/c",
            "input/b0",
            "input/b-",
            "input/ba",
        ];
        for dir in dirs {
            fs::create_dir_all(r.join(dir)).unwrap();
        }
        for dir in dirs {
            for f in [
                "b", "b.txt", "b-", "b+", "b0", "b_", "ba", "a", "c", "B", "é",
            ] {
                let p = format!("{dir}/{f}");
                if !r.join(&p).is_dir() {
                    fs::write(r.join(&p), &p).unwrap();
                    want.push(p);
                }
            }
        }
        assert!(want.len() > 50);
        want.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let res = scan(r, &rules(), StatCache::default(), &Progress::default());
        let got: Vec<&str> = res.entries.iter().map(|e| &*e.path).collect();
        assert_eq!(got, want);
    }

    fn file(path: &str, size: u64, hash: u64, mtime_ns: i64) -> LocalEntry {
        LocalEntry {
            path: path.into(),
            kind: LocalKind::File {
                size,
                hash: Hash(hash),
            },
            stat: Stat {
                size,
                mtime_ns,
                ctime_ns: mtime_ns + 1,
                ino: hash,
            },
        }
    }

    fn link(path: &str, target: &str) -> LocalEntry {
        LocalEntry {
            path: path.into(),
            kind: LocalKind::Link {
                target: target.into(),
            },
            stat: Stat::default(),
        }
    }

    /// A scan of unchanged, touched, edited, new and relinked files against
    /// a cache by another user that also holds a file deleted since.
    fn scan_and_cache() -> (Vec<LocalEntry>, Manifest) {
        let old = vec![
            file("a/same", 3, 1, 1_000_000_000),
            file("a/touched", 3, 2, 2_000_000_000),
            file("b/deleted", 4, 3, 3_000_000_000),
            file("b/edited", 5, 4, 4_000_000_000),
            link("c/link", "../a/same"),
            link("c/relinked", "../a/same"),
        ];
        let (mut cache, _) = to_manifest(old, None, "them@example.org", false);
        cache.metadata = None;
        let now = vec![
            file("a/new", 1, 9, 9_000_000_000),
            file("a/same", 3, 1, 1_000_000_000),
            file("a/touched", 3, 2, 7_000_000_000),
            file("b/edited", 5, 40, 8_000_000_000),
            link("c/link", "../a/same"),
            link("c/relinked", "../a/touched"),
        ];
        (now, cache)
    }

    #[test]
    fn the_local_view_is_the_local_manifest_and_holds_only_what_changed() {
        let (scan, cache) = scan_and_cache();
        let (want, want_stats) = to_manifest(scan.clone(), Some(&cache), "me@example.org", true);
        let (local, stats) = to_local(scan.clone(), &cache, "me@example.org", true);
        let view = local.view(&cache);
        assert_eq!(local.to_manifest(&cache), want);
        assert_eq!(
            view.iter().collect::<Vec<_>>(),
            want.entries().iter().collect::<Vec<_>>()
        );
        assert_eq!(stats, want_stats);
        assert_eq!(stats.len(), scan.len());
        for (i, e) in want.entries().iter().enumerate() {
            assert_eq!(view.position(&e.path), Some(i));
            assert_eq!(view.get(&e.path), Some(e));
            assert_eq!(view.at(i), e);
        }
        for missing in ["", "a", "a/sam", "b/deleted", "z"] {
            assert_eq!(view.get(missing), None, "{missing}");
        }
        // Unchanged content (a touch too) is the cache's entry itself,
        // attribution and mtime string included; the rest are L's own.
        let borrowed: Vec<&str> = view
            .iter()
            .filter(|e| cache.entries().iter().any(|c| std::ptr::eq(*e, c)))
            .map(|e| &*e.path)
            .collect();
        assert_eq!(borrowed, ["a/same", "a/touched", "c/link"]);
        assert_eq!(&*view.get("a/touched").unwrap().user, "them@example.org");
        assert_eq!(&*view.get("b/edited").unwrap().user, "me@example.org");
        // Without stats, and against an empty cache: all L's own.
        let (local, stats) = to_local(scan.clone(), &Manifest::new(), "me@example.org", false);
        assert!(stats.is_empty());
        let (plain, _) = to_manifest(scan, None, "me@example.org", false);
        assert_eq!(local.to_manifest(&Manifest::new()), plain);
    }

    #[test]
    fn a_large_local_view_matches_whatever_share_changed() {
        let scan = |edit: usize| -> Vec<LocalEntry> {
            let mut v: Vec<LocalEntry> = (0..20_000u64)
                .map(|i| {
                    let h = if edit > 0 && (i as usize).is_multiple_of(edit) {
                        i + 1
                    } else {
                        i
                    };
                    file(&format!("d{:03}/f{i:05}", i % 997), 1, h, 5)
                })
                .collect();
            v.sort_by(|a, b| a.path.cmp(&b.path));
            v
        };
        let (cache, _) = to_manifest(scan(0), None, "them@example.org", false);
        for edit in [0, 1, 2, 7, 1000] {
            let (want, _) = to_manifest(scan(edit), Some(&cache), "me@example.org", false);
            let (local, _) = to_local(scan(edit), &cache, "me@example.org", false);
            assert_eq!(local.to_manifest(&cache), want, "every {edit}th changed");
        }
    }

    #[test]
    fn l_built_as_the_binary_copy_is_read_is_to_local_and_a_damaged_copy_is_noticed() {
        let (scan, mut cache) = scan_and_cache();
        cache.metadata = None;
        let (want, want_stats) = to_local(scan.clone(), &cache, "me@example.org", true);
        let bytes = crate::manifest::binary::encode(&cache, 7);
        let mut b = LocalBuilder::new(scan.clone(), "me@example.org", true);
        let got = crate::manifest::binary::decode_each(&bytes[..], 7, |i, e| b.cached(i, e))
            .expect("an intact copy");
        assert_eq!(got, cache);
        let (local, stats) = b.finish(got.len());
        assert_eq!(local.to_manifest(&got), want.to_manifest(&cache));
        assert_eq!(stats, want_stats);
        // Another tag: refused before any entry, the scan comes back whole.
        let mut b = LocalBuilder::new(scan.clone(), "me@example.org", true);
        assert!(
            crate::manifest::binary::decode_each(&bytes[..], 8, |i, e| b.cached(i, e)).is_none()
        );
        assert_eq!(b.into_scan(), Some(scan.clone()));
        // Damaged near its end: entries were given, and the copy refused.
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 12] ^= 1;
        let mut b = LocalBuilder::new(scan, "me@example.org", true);
        assert!(crate::manifest::binary::decode_each(&bad[..], 7, |i, e| b.cached(i, e)).is_none());
        assert!(b.started());
        assert!(b.into_scan().is_none());
    }

    #[test]
    fn a_stat_cache_file_changed_after_loading_rehashes_every_file() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for (p, c) in [
            ("input/a", "aaaa"),
            ("input/b", "bbbb"),
            ("input/c", "cccc"),
        ] {
            fs::create_dir_all(r.join(p).parent().unwrap()).unwrap();
            fs::write(r.join(p), c).unwrap();
        }
        let first = scan(r, &rules(), StatCache::default(), &Progress::default());
        let file = r.join("stat-cache");
        // Made long after: every record is trusted.
        fs::write(
            &file,
            StatCache::encode(
                i64::MAX / 2,
                StatCache::records_of(&first.entries),
                &first.dirs,
            ),
        )
        .unwrap();
        let cache = StatCache::load(&file);
        assert_eq!(cache.len(), 3);
        let again = scan(r, &rules(), cache, &Progress::default());
        assert_eq!(again.hashed_files, 0, "the records are read from the file");
        assert_eq!(paths_and_hashes(&again), paths_and_hashes(&first));
        // The hash of input/b's record, changed in place once loaded.
        let cache = StatCache::load(&file);
        let mut bytes = fs::read(&file).unwrap();
        let at = bytes.windows(7).position(|w| w == b"input/b").unwrap() + 7 + 32;
        bytes[at] ^= 1;
        fs::write(&file, &bytes).unwrap();
        let res = scan(r, &rules(), cache, &Progress::default());
        assert_eq!(
            res.hashed_files, 3,
            "nothing read from the changed file is trusted"
        );
        assert!(res.cache_dirty);
        assert_eq!(paths_and_hashes(&res), paths_and_hashes(&first));
        // Loaded as it is now, it is refused whole (its checksum).
        let cache = StatCache::load(&file);
        assert!(cache.is_empty());
    }

    #[test]
    #[should_panic(expected = "built against")]
    fn a_local_view_over_another_cache_is_refused() {
        let (scan, cache) = scan_and_cache();
        let (local, _) = to_local(scan, &cache, "me@example.org", false);
        local.view(&Manifest::new());
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
        let encoded = StatCache::encode(42, it(), &[]);
        let mut streamed = Vec::new();
        StatCache::write_to(&mut streamed, 42, recs.len() as u64, it()).unwrap();
        assert_eq!(streamed, encoded);
        assert!(StatCache::decode(streamed).is_some());
        let mut short = Vec::new();
        assert!(StatCache::write_to(&mut short, 42, recs.len() as u64 + 1, it()).is_err());
    }
}
