//! A project on disk: its root, configs, `.dsg/` layout and the scan.

use std::path::{Path, PathBuf};

use dsg_core::config::{find_project_root, ProjectConfig, UserConfig, PROJECT_CONFIG};
use dsg_core::manifest::{Manifest, SyncMessages};
use dsg_core::scan::{self, Progress, Rules, ScanResult, StatCache};

use crate::{EngineError, Reporter, Result};

pub const DSG_DIR: &str = ".dsg";

pub struct Project {
    pub root: PathBuf,
    pub config: ProjectConfig,
    pub user: UserConfig,
}

impl Project {
    /// Finds the project at or above `start` and loads both configs.
    pub fn find(start: &Path) -> Result<Project> {
        let root = find_project_root(start)?;
        Project::open(&root)
    }

    pub fn open(root: &Path) -> Result<Project> {
        let config = ProjectConfig::load(&root.join(PROJECT_CONFIG))?;
        let user = UserConfig::load()?;
        Ok(Project {
            root: root.to_path_buf(),
            config,
            user,
        })
    }

    pub fn dsg(&self) -> PathBuf {
        self.root.join(DSG_DIR)
    }

    /// Where unlinked scratch files go: `.dsg/` when there is one (a clone
    /// has none yet: then the project folder), on the project's filesystem
    /// rather than a `/tmp` that may be memory.
    pub fn spool_dir(&self) -> PathBuf {
        let d = self.dsg();
        if d.is_dir() {
            d
        } else {
            self.root.clone()
        }
    }

    pub fn cache_path(&self) -> PathBuf {
        self.dsg().join("last-sync.json")
    }

    pub fn stat_cache_path(&self) -> PathBuf {
        self.dsg().join("stat-cache")
    }

    pub fn sync_messages_path(&self) -> PathBuf {
        self.dsg().join("sync-messages.json")
    }

    /// The XXH3 of the cache manifest file C (streamed, not held).
    /// `Ok(None)` only when the project has no `.dsg/` at all (never synced
    /// here); a `.dsg/` without a readable manifest is an error — it is
    /// never taken as "empty".
    pub fn cache_hash(&self) -> Result<Option<u64>> {
        if !self.dsg().is_dir() {
            return Ok(None);
        }
        let p = self.cache_path();
        let f = std::fs::File::open(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                EngineError::State {
                    message: format!("{} is missing although {} exists", p.display(), self.dsg().display()),
                    hint: "restore it from a backup, or move .dsg away and run 'dsg clone' to start from the repository".into(),
                }
            } else {
                EngineError::io(&p, e)
            }
        })?;
        let (h, _) = dsg_core::hash::hash_reader(f).map_err(|e| EngineError::io(&p, e))?;
        Ok(Some(h.0))
    }

    /// Loads the cache manifest whose file hashes to `h`: from its binary
    /// copy when that is current (it was verified when made), else by
    /// parsing and verifying the JSON.
    pub fn load_cache_tagged(&self, h: u64, save_binary: bool) -> Result<Manifest> {
        match self.read_cache_copy(h, |_, _| {}) {
            Some(m) => Ok(m),
            None => self.load_cache_json(h, save_binary),
        }
    }

    /// The cache manifest from its binary copy, `None` when that is
    /// missing, damaged or of another file than the one hashing to `h`.
    /// Each entry goes to `each` as it is read (see
    /// [`dsg_core::manifest::binary::decode_each`]: on `None`, what `each`
    /// made of them is to be thrown away).
    pub fn read_cache_copy(
        &self,
        h: u64,
        each: impl FnMut(usize, &dsg_core::manifest::Entry),
    ) -> Option<Manifest> {
        let f = std::fs::File::open(self.manifest_cache_path()).ok()?;
        let r = std::io::BufReader::with_capacity(1 << 16, f);
        dsg_core::manifest::binary::decode_each(r, h, each)
    }

    /// The cache manifest from its JSON, which must hash to `h`; verified,
    /// and saved as the binary copy when `save_binary`.
    pub fn load_cache_json(&self, h: u64, save_binary: bool) -> Result<Manifest> {
        let p = self.cache_path();
        let bytes = std::fs::read(&p).map_err(|e| EngineError::io(&p, e))?;
        if dsg_core::hash::Hash::of_bytes(&bytes).0 != h {
            return Err(EngineError::State {
                message: format!("{} changed while dsg was reading it", p.display()),
                hint: "another dsg command is running here; run this one again when it is done"
                    .into(),
            });
        }
        let m = Manifest::from_json_bytes(&bytes, &p)?;
        drop(bytes);
        m.verify_integrity().map_err(|msg| EngineError::State {
            message: format!("{} fails its integrity check: {msg}", p.display()),
            hint: "the cache was altered or damaged; restore it, or move .dsg away and run 'dsg clone'".into(),
        })?;
        if save_binary {
            self.write_manifest_cache(&m, h);
        }
        Ok(m)
    }

    /// Part of the local stat cache: a binary copy of the cache manifest.
    pub fn manifest_cache_path(&self) -> PathBuf {
        self.dsg().join("stat-cache.manifest")
    }

    pub fn write_manifest_cache(&self, m: &Manifest, json_hash: u64) {
        self.write_cache_streamed(&self.manifest_cache_path(), "manifest cache", |f| {
            dsg_core::manifest::binary::write_manifest(f, m, json_hash)
        });
    }

    pub fn load_sync_messages(&self) -> Result<Option<SyncMessages>> {
        Ok(SyncMessages::load_optional(&self.sync_messages_path())?)
    }

    /// Scans the working tree with the stat cache.
    pub fn scan(&self, reporter: &dyn Reporter) -> ScanResult {
        self.scan_with(StatCache::load(&self.stat_cache_path()), reporter)
    }

    /// Scans the working tree with a stat cache already loaded.
    pub fn scan_with(&self, cache: StatCache, reporter: &dyn Reporter) -> ScanResult {
        let progress = Progress::default();
        let rules = Rules::from_config(&self.config);
        if !reporter.wants_progress() {
            return scan::scan(&self.root, &rules, cache, &progress);
        }
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                // Let the reporter poll counters while the scan runs.
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    reporter.scanning(&progress);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            });
            let r = scan::scan(&self.root, &rules, cache, &progress);
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = h.join();
            reporter.scanning(&progress);
            r
        })
    }

    /// Saves the stat cache if the scan changed it. This is the only write
    /// `status` makes, and only when `.dsg/` exists.
    pub fn save_stat_cache(&self, scan: &ScanResult) {
        if scan.cache_dirty && self.dsg().is_dir() {
            let files = StatCache::records_of(&scan.entries);
            let count = files.clone().count() as u64;
            self.write_cache_streamed(&self.stat_cache_path(), "stat cache", |f| {
                StatCache::write_with_dirs(f, scan.started_ns, count, files, &scan.dirs, None)
            });
        }
    }

    /// Streams a cache file (`what` names it in the warning) through
    /// `write` into place, atomically: caches of a million entries are
    /// never built whole in memory. A failure costs only the cache.
    pub fn write_cache_streamed(
        &self,
        path: &std::path::Path,
        what: &str,
        write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
    ) {
        let result = dsg_core::atomic::AtomicFile::create(path)
            .map_err(|e| e.to_string())
            .and_then(|mut f| {
                write(f.file()).map_err(|e| format!("{}: {e}", path.display()))?;
                f.commit(true).map_err(|e| e.to_string())
            });
        if let Err(e) = result {
            tracing::warn!("could not save the {what}: {e}");
        }
    }
}
