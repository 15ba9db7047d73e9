//! `status`: L (scan) vs C (cache) vs R (repository) through the one table.

use std::path::Path;

use serde::Serialize;

use dsg_core::manifest::Manifest;
use dsg_core::scan::{
    to_local, KnownFile, LocalBuilder, LocalManifest, LocalView, Problem, ScanResult, Stat,
    StatCache,
};
use dsg_core::state::{classify_iter, Action, State};
use dsg_repo::backend::Blob;
use dsg_repo::{Meta, RepoClient};

use crate::{EngineError, Project, Reporter, Result};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    /// Shared with the plan's lists (a clone has a row for every file).
    pub path: std::sync::Arc<str>,
    pub state: State,
    pub action: Action,
}

pub struct Comparison {
    /// The scan's problems, ignored paths and counters (its entries became `local`).
    pub scan: ScanResult,
    /// L, a view over `cache` (read through `local()`).
    local: LocalManifest,
    /// The stat of each `local` entry, in the same order.
    pub local_stats: Vec<Stat>,
    pub cache: Manifest,
    /// `None` when R is the cache (offline, or the repository head is the
    /// same file as the cache): no second copy is kept.
    remote: Option<Manifest>,
    /// The repository manifest's text, when asked for (sync archives it),
    /// never held whole: the cache file when R is the cache, else its
    /// archive (LZ4, several times smaller).
    pub remote_text: Option<RemoteText>,
    pub has_cache: bool,
    /// The cache manifest's stat and hash, for the next stat cache.
    known_manifest: Option<KnownFile>,
}

impl Comparison {
    pub fn remote(&self) -> &Manifest {
        self.remote.as_ref().unwrap_or(&self.cache)
    }

    /// L, the local manifest: the scan, with the cache's entry for every
    /// file unchanged since the last sync.
    pub fn local(&self) -> LocalView<'_> {
        self.local.view(&self.cache)
    }

    /// Every path not in state 1 or 15, in path order.
    pub fn rows(&self) -> Vec<Row> {
        classify_iter(
            self.local().iter(),
            self.cache.entries(),
            self.remote().entries(),
        )
        .filter(|c| !matches!(c.state, State::AllEq | State::None))
        .map(|c| Row {
            path: std::sync::Arc::from(c.path),
            state: c.state,
            action: c.state.action(),
        })
        .collect()
    }

    /// Nothing is here (no local file, no last sync) and R has files: a
    /// clone into an empty folder, whose every row is a download of an
    /// entry of R. Checked without listing the rows.
    pub fn only_downloads_into_nothing(&self) -> bool {
        self.local().is_empty()
            && self.cache.is_empty()
            && !self.remote().is_empty()
            && classify_iter(
                self.local().iter(),
                self.cache.entries(),
                self.remote().entries(),
            )
            .filter(|c| !matches!(c.state, State::AllEq | State::None))
            .all(|c| c.state.action() == Action::Download)
    }

    /// The stat of a local path.
    pub fn local_stat(&self, path: &str) -> Option<Stat> {
        self.local()
            .position(path)
            .and_then(|i| self.local_stats.get(i).copied())
    }

    /// Saves the stat cache when the scan found it out of date.
    pub fn save_stat_cache(&self, project: &Project) {
        if self.scan.cache_dirty && project.dsg().is_dir() {
            let records = || {
                self.local()
                    .iter()
                    .zip(&self.local_stats)
                    .filter_map(|(e, st)| e.hash().map(|h| (&*e.path, *st, h)))
            };
            let count = records().count() as u64;
            let path = project.stat_cache_path();
            project.write_cache_streamed(&path, "stat cache", |f| {
                StatCache::write_with_dirs(
                    f,
                    self.scan.started_ns,
                    count,
                    records(),
                    &self.scan.dirs,
                    self.known_manifest,
                )
            });
        }
    }

    pub fn problems(&self) -> &[Problem] {
        &self.scan.problems
    }
}

/// Where the text of R (the repository's head manifest) is, for a sync that
/// archives it or keeps it as the new cache.
pub enum RemoteText {
    /// R is the same file as the cache, `.dsg/last-sync.json`, whose bytes
    /// hash to this (checked again when they are read).
    CacheFile(u64),
    /// R's bytes compressed as their archive (spooled to an unlinked file:
    /// ~55 bytes a file, held through a whole clone otherwise), and the
    /// XXH3 of the bytes.
    Archived { lz4: Blob, hash: u64 },
}

/// Reads R from the repository. A missing or corrupt repository manifest is
/// an error, never an empty manifest (G4).
pub fn fetch_remote(
    client: &mut RepoClient,
    unless: Option<u64>,
) -> Result<Option<(Manifest, Vec<u8>)>> {
    let origin = format!("{}:{}/.dsg/last-sync.json", client.host(), client.repo());
    match client.read_meta("last-sync.json", unless)? {
        Meta::Unchanged => Ok(None),
        Meta::Missing => Err(EngineError::State {
            message: format!("the repository manifest {origin} does not exist"),
            hint: "check the repository path in .dsgconfig.yml; a new repository is made with 'dsg init'".into(),
        }),
        Meta::Data(b) => {
            let m = Manifest::from_json_bytes(&b, std::path::Path::new(&origin))?;
            m.verify_integrity().map_err(|msg| EngineError::State {
                message: format!("the repository manifest {origin} fails its integrity check: {msg}"),
                hint: "the repository was altered outside dsg; ask its maintainer to restore it".into(),
            })?;
            Ok(Some((m, b)))
        }
    }
}

/// `fetch_remote` that keeps R's text as its archive: parsed, hashed and
/// compressed as it arrives, never held whole.
pub fn fetch_remote_archived(
    client: &mut RepoClient,
    unless: Option<u64>,
    spool_dir: &Path,
) -> Result<Option<(Manifest, RemoteText)>> {
    use dsg_repo::MetaWith;
    let origin = format!("{}:{}/.dsg/last-sync.json", client.host(), client.repo());
    let path = std::path::PathBuf::from(&origin);
    let spool = tempfile::tempfile_in(spool_dir).map_err(|e| EngineError::io(spool_dir, e))?;
    let got = client.read_meta_with("last-sync.json", unless, |r| {
        let mut tee = Tee {
            r,
            h: xxhash_rust::xxh3::Xxh3::new(),
            enc: lz4_flex::frame::FrameEncoder::new(std::io::BufWriter::with_capacity(
                1 << 16,
                &spool,
            )),
        };
        let m = Manifest::from_reader(std::io::BufReader::with_capacity(1 << 16, &mut tee), &path)?;
        let h = tee.h.digest();
        tee.enc
            .finish()
            .map_err(std::io::Error::other)
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .map_err(|e| EngineError::io(spool_dir, e))?;
        Ok::<_, EngineError>((m, h))
    })?;
    match got {
        MetaWith::Unchanged => Ok(None),
        MetaWith::Missing => Err(EngineError::State {
            message: format!("the repository manifest {origin} does not exist"),
            hint: "check the repository path in .dsgconfig.yml; a new repository is made with 'dsg init'".into(),
        }),
        MetaWith::Data(parsed) => {
            let (m, hash) = parsed?;
            let lz4 = Blob::File(spool);
            m.verify_integrity().map_err(|msg| EngineError::State {
                message: format!("the repository manifest {origin} fails its integrity check: {msg}"),
                hint: "the repository was altered outside dsg; ask its maintainer to restore it".into(),
            })?;
            Ok(Some((m, RemoteText::Archived { lz4, hash })))
        }
    }
}

/// A reader that hashes and compresses what is read through it.
struct Tee<'a, W: std::io::Write> {
    r: &'a mut dyn std::io::Read,
    h: xxhash_rust::xxh3::Xxh3,
    enc: lz4_flex::frame::FrameEncoder<W>,
}

impl<W: std::io::Write> std::io::Read for Tee<'_, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        self.h.update(&buf[..n]);
        std::io::Write::write_all(&mut self.enc, &buf[..n])?;
        Ok(n)
    }
}

/// The XXH3 of the cache manifest file C, `None` when the project has no
/// `.dsg/`. Read from the stat cache when C's stat is the one it recorded
/// (C is 24 MB at 100 000 files); else C is hashed, and what can be
/// recorded for next time comes back too: only a stat older than the racy
/// window, so that any later change to C moves it.
fn cache_hash_known(
    project: &Project,
    stat_cache: &StatCache,
) -> Result<(Option<u64>, Option<KnownFile>)> {
    let path = project.cache_path();
    let stat_of = || std::fs::symlink_metadata(&path).ok().map(|m| Stat::of(&m));
    let before = stat_of();
    if let (Some(st), Some(k)) = (before, stat_cache.known_manifest()) {
        if st == k.stat {
            return Ok((Some(k.hash), Some(k)));
        }
    }
    let now = dsg_core::scan::now_ns();
    let hash = project.cache_hash()?;
    let known = match (hash, before) {
        (Some(hash), Some(stat))
            if stat_of() == before
                && stat.mtime_ns.max(stat.ctime_ns) < now - dsg_core::scan::RACY_WINDOW_NS =>
        {
            Some(KnownFile { stat, hash })
        }
        _ => None,
    };
    Ok((hash, known))
}

/// The working tree's scan, its directory listings dropped unless the stat
/// cache is to be rewritten (only then are they needed: ~11 bytes a file).
fn scan_tree(project: &Project, stat_cache: StatCache, reporter: &dyn Reporter) -> ScanResult {
    let mut scan = project.scan_with(stat_cache, reporter);
    if !scan.cache_dirty {
        scan.dirs = Vec::new();
    }
    scan
}

/// What `compare` should do besides comparing.
#[derive(Clone, Copy, Default)]
pub struct CompareOpts {
    /// Write the stat cache (status does; dry runs must not).
    pub save_stat_cache: bool,
    /// Keep the repository manifest's bytes.
    pub keep_remote_bytes: bool,
    /// Compare against an empty cache (clone).
    pub no_cache: bool,
    /// Write nothing at all (not even caches).
    pub dry_run: bool,
}

/// R as the repository gives it; `None` when it is the cache (C hashes to
/// `cache_hash`), with where its text is when asked for.
type Asked = (Option<Manifest>, Option<RemoteText>);

/// Asks the repository for R, unless it is the cache hashing to
/// `cache_hash`.
fn ask_remote(
    project: &Project,
    c: &mut RepoClient,
    cache_hash: Option<u64>,
    opts: CompareOpts,
) -> Result<Asked> {
    Ok(if opts.keep_remote_bytes {
        match fetch_remote_archived(c, cache_hash, &project.spool_dir())? {
            None => (None, cache_hash.map(RemoteText::CacheFile)),
            Some((r, text)) => (Some(r), Some(text)),
        }
    } else {
        match fetch_remote(c, cache_hash)? {
            None => (None, None),
            Some((r, _)) => (Some(r), None),
        }
    })
}

/// The stat cache, C's hash (and what the next stat cache may record of
/// C), and R. The repository is asked first, before any scan: it is the
/// step most likely to fail, and a failure should not cost one. The
/// cache's hash lets the agent answer "unchanged" instead of sending R.
///
/// That hash is usually the one the stat cache recorded for C's current
/// stat; the repository is then asked with the header's record, read alone
/// and unverified, while the rest of the stat cache loads (the two took
/// ~5 ms each at 100 000 files, one after the other). The answer is kept
/// only when the verified cache holds that same record; else the question
/// is asked again, as it would have been.
fn load_and_ask(
    project: &Project,
    client: Option<&mut RepoClient>,
    opts: CompareOpts,
) -> Result<(StatCache, Option<u64>, Option<KnownFile>, Asked)> {
    let path = project.stat_cache_path();
    let known_of = |sc: &StatCache| {
        if opts.no_cache {
            Ok((None, None))
        } else {
            cache_hash_known(project, sc)
        }
    };
    let Some(c) = client else {
        let sc = StatCache::load(&path);
        let (h, known) = known_of(&sc)?;
        return Ok((sc, h, known, (None, None)));
    };
    let guess = (!opts.no_cache)
        .then(|| StatCache::peek_known_manifest(&path))
        .flatten()
        .filter(|k| {
            std::fs::symlink_metadata(project.cache_path()).is_ok_and(|m| Stat::of(&m) == k.stat)
        });
    if let Some(k) = guess {
        let (sc, asked) = std::thread::scope(|s| {
            let asking = s.spawn(|| ask_remote(project, &mut *c, Some(k.hash), opts));
            let sc = StatCache::load(&path);
            let asked = asking
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (sc, asked)
        });
        if sc.known_manifest() == Some(k) {
            return Ok((sc, Some(k.hash), Some(k), asked?));
        }
        let (h, known) = known_of(&sc)?;
        return Ok((sc, h, known, ask_remote(project, c, h, opts)?));
    }
    let sc = StatCache::load(&path);
    let (h, known) = known_of(&sc)?;
    let asked = ask_remote(project, c, h, opts)?;
    Ok((sc, h, known, asked))
}

/// Builds the three manifests. `client` = None means offline (R := C).
pub fn compare(
    project: &Project,
    client: Option<&mut RepoClient>,
    opts: CompareOpts,
    reporter: &dyn Reporter,
) -> Result<Comparison> {
    let (stat_cache, cache_hash, known_manifest, (remote, remote_text)) =
        load_and_ask(project, client, opts)?;
    let has_cache = cache_hash.is_some();
    crate::phase("repository manifest checked");
    let mut scan = scan_tree(project, stat_cache, reporter);
    crate::phase("scanned");
    let user = &project.user.user_id;
    // Stats are needed to rewrite the stat cache and to sync; a plain status
    // of an unchanged tree needs neither (32 bytes a file saved).
    let keep_stats = |scan: &ScanResult| opts.keep_remote_bytes || scan.cache_dirty;
    // The cache is loaded only now, so it and the stat cache are never in
    // memory together; from its binary copy, the scan is consumed as the
    // copy is read, so the two are never both whole in memory either.
    let (cache, local, local_stats) = match cache_hash {
        None => {
            let cache = Manifest::new();
            let entries = std::mem::take(&mut scan.entries);
            let (local, stats) = to_local(entries, &cache, user, keep_stats(&scan));
            (cache, local, stats)
        }
        Some(h) => {
            let mut b =
                LocalBuilder::new(std::mem::take(&mut scan.entries), user, keep_stats(&scan));
            match project.read_cache_copy(h, |i, e| b.cached(i, e)) {
                Some(cache) => {
                    let (local, stats) = b.finish(cache.len());
                    (cache, local, stats)
                }
                None => {
                    let entries = match b.into_scan() {
                        Some(entries) => entries,
                        None => {
                            // Damaged part way: the scan read alongside is
                            // partly consumed. Rare; scan again.
                            tracing::warn!(
                                "the binary copy of the cache manifest is damaged; scanning again"
                            );
                            scan = scan_tree(
                                project,
                                StatCache::load(&project.stat_cache_path()),
                                reporter,
                            );
                            std::mem::take(&mut scan.entries)
                        }
                    };
                    let save_binary = opts.save_stat_cache || !opts.dry_run;
                    let cache = project.load_cache_json(h, save_binary)?;
                    let (local, stats) = to_local(entries, &cache, user, keep_stats(&scan));
                    (cache, local, stats)
                }
            }
        }
    };
    crate::phase("local manifest built");
    let cmp = Comparison {
        scan,
        local,
        local_stats,
        cache,
        remote,
        remote_text,
        has_cache,
        known_manifest,
    };
    if opts.save_stat_cache {
        cmp.save_stat_cache(project);
    }
    Ok(cmp)
}
