//! The zfs side of the shared test world (`world::World` of `Kind::Zfs`
//! holds a `ZEnv`; tests reach it with `w.zfs()`): a repository that is the
//! ZFS dataset `POOL/<name>` mounted at `<parent>/<name>` on the test pool
//! (`DSG_TEST_ZFS_POOL`; parents under `DSG_TEST_ZFS_ROOT`, both exported by
//! scripts/setup-services), driven through the real `dsg` binary, with the
//! ZFS side (datasets, snapshots, mounts, journal) checked through the real
//! `zfs` command. Every dataset a test creates is destroyed when its
//! `ZEnv` drops; names carry `-p<PID>-` so that setup-services can sweep
//! what a killed test run left.
//!
//! Included only by `world/mod.rs` (beside `support` and `sync_support`):
//! it builds on `sync_support::Env` and the tree listings and command
//! helpers of `support`, which `sync_support` re-exports. Test crates
//! declare `mod world;`, not this module.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::sync_support::*;
// `ZEnv` derefs to `Env`: its clients' helpers (`z.client(..)`,
// `z.write(..)`, …) come with this trait, also for tests that import only
// some of `sync_support`.
pub use super::support::Clients;

pub const IN: &str = "task/input";
pub const OUT: &str = "task/output";

pub fn p(dir: &str, name: &str) -> String {
    format!("{dir}/{name}")
}

/// `(pool, root for repository parents)`, or `None` (after printing why)
/// when the test pool is not set up; under CI a missing pool fails.
pub fn zfs_config() -> Option<(String, PathBuf)> {
    match std::env::var("DSG_TEST_ZFS_POOL") {
        Ok(pool) if !pool.is_empty() => {
            let root = zfs_root();
            fs::create_dir_all(&root).unwrap_or_else(|e| panic!("{}: {e}", root.display()));
            Some((pool, root))
        }
        _ => {
            if is_ci() {
                panic!(
                    "CI=true but DSG_TEST_ZFS_POOL is unset: run scripts/setup-services \
                     and source its env (/var/tmp/dsg-test/env)"
                );
            }
            eprintln!(
                "SKIPPED: DSG_TEST_ZFS_POOL is unset (run scripts/setup-services and \
                 source /var/tmp/dsg-test/env to test the zfs backend)"
            );
            None
        }
    }
}

/// `DSG_TEST_ZFS_ROOT`, or its default.
pub fn zfs_root() -> PathBuf {
    std::env::var("DSG_TEST_ZFS_ROOT")
        .ok()
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/dsg-test/zfs/repos"))
}

/// How long one `dsg` command may take before the test gives up on it.
pub const DSG_LIMIT: Duration = Duration::from_secs(180);
/// How long one `zfs` command may take.
pub const ZFS_LIMIT: Duration = Duration::from_secs(60);

/// Panics (with a hint) if a command had to be killed.
#[track_caller]
pub fn no_hang(what: &str, (o, timed_out): (Output, bool)) -> Output {
    assert!(
        !timed_out,
        "{what} did not finish within its limit: is zfs-fuse wedged? \
         (`stat -f` on its mounts hangs; scripts/setup-services checks it)\n{}",
        show(&o)
    );
    o
}

/// Serialises the worlds of all zfs tests (threads, test binaries and
/// concurrent runs): zfs-fuse has deadlocked under concurrent unmounts of
/// several datasets. Held while a `ZEnv` lives.
fn serial_lock() -> fs::File {
    let p = zfs_root().join(".zfs-tests.lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    f.lock()
        .unwrap_or_else(|e| panic!("lock {}: {e}", p.display()));
    f
}

/// A name unique in the pool: `<prefix>-p<PID>-<n>-<t>`.
pub fn zname(prefix: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_micros();
    format!("{prefix}-p{}-{}-{t}", std::process::id(), next_count())
}

/// Runs the real `zfs` (from this process's PATH), killed after
/// `ZFS_LIMIT` (then it failed).
pub fn zfs(args: &[&str]) -> Output {
    let mut c = Command::new("zfs");
    c.args(args);
    output_within(c, ZFS_LIMIT).0
}

/// `zfs ARGS` that must succeed; its stdout.
#[track_caller]
pub fn zfs_ok(args: &[&str]) -> String {
    let o = zfs(args);
    assert!(o.status.success(), "zfs {args:?} failed: {}", show(&o));
    stdout(&o)
}

/// `zfs ARGS`, retried while zfs-fuse says "busy" (it releases a FUSE
/// mount asynchronously); the last output.
pub fn zfs_retry(args: &[&str]) -> Output {
    let t0 = Instant::now();
    loop {
        let o = zfs(args);
        if o.status.success()
            || !stderr(&o).contains("busy")
            || t0.elapsed() > Duration::from_secs(20)
        {
            return o;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The full path of the real `zfs` binary.
pub fn real_zfs() -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    for d in path.split(':').chain(["/usr/sbin", "/sbin"]) {
        let c = Path::new(d).join("zfs");
        if c.is_file() {
            return c;
        }
    }
    panic!("no zfs binary in PATH");
}

/// The numeric order of snapshot ids `s1, s2, … s10`.
pub fn snap_num(s: &str) -> u64 {
    s.strip_prefix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a logical snapshot id: {s:?}"))
}

/// `s1 … sN`.
pub fn chain(n: u64) -> Vec<String> {
    (1..=n).map(|i| format!("s{i}")).collect()
}

/// One test world on ZFS: `Env` (clients, user config) whose repository
/// is the dataset `POOL/<repo_name>` mounted at `<repo_parent>/<repo_name>`.
pub struct ZEnv {
    pub env: Env,
    pub pool: String,
    _serial: fs::File,
}

impl std::ops::Deref for ZEnv {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

impl Drop for ZEnv {
    fn drop(&mut self) {
        // Destroy every dataset of this world (the live one, transaction
        // clones, old copies, read clones), dependents included.
        for _ in 0..3 {
            let left = self.datasets();
            if left.is_empty() {
                break;
            }
            for ds in left {
                let o = zfs_retry(&["destroy", "-R", "-f", &ds]);
                if !o.status.success() && !stderr(&o).contains("does not exist") {
                    eprintln!("cleanup: zfs destroy -R {ds} failed: {}", stderr(&o).trim());
                }
            }
        }
        let left = self.datasets();
        if !left.is_empty() {
            eprintln!("cleanup: datasets left behind: {left:?}");
        }
        if let Ok(rd) = fs::read_dir(&self.env.repo_parent) {
            for de in rd.flatten() {
                let _ = fs::set_permissions(de.path(), fs::Permissions::from_mode(0o755));
            }
        }
        let _ = fs::remove_dir_all(&self.env.repo_parent);
    }
}

impl ZEnv {
    /// A fresh world, or `None` when the test pool is not set up.
    pub fn new(prefix: &str) -> Option<ZEnv> {
        let (pool, root) = zfs_config()?;
        Some(ZEnv::new_in(prefix, &pool, &root))
    }

    /// A world whose repository parent is a new directory under `root`.
    pub fn new_in(prefix: &str, pool: &str, root: &Path) -> ZEnv {
        let serial = serial_lock();
        let pool = pool.to_string();
        let parent = root.join(zname(prefix));
        fs::create_dir_all(&parent).unwrap();
        let mut env = Env::on(&parent);
        env.repo_name = zname(prefix);
        ZEnv {
            env,
            pool,
            _serial: serial,
        }
    }

    /// `POOL/NAME`.
    pub fn dataset(&self) -> String {
        format!("{}/{}", self.pool, self.env.repo_name)
    }

    /// Runs `dsg` with extra environment (killed after `DSG_LIMIT`). After a
    /// successful command the repository dataset, when it has its final
    /// mountpoint, must be mounted there (a failed or killed one may leave a
    /// transaction for the next command to finish).
    pub fn run_env(&self, name: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut c = self.env.command(name, args);
        for (k, v) in envs {
            c.env(k, v);
        }
        let o = no_hang(&format!("dsg {args:?}"), output_within(c, DSG_LIMIT));
        if o.status.success() {
            self.assert_mounted_if_final(&format!("after dsg {args:?}"));
        }
        o
    }

    /// When `POOL/NAME` exists with its final mountpoint `P/NAME`, it is
    /// mounted there (zfs-fuse does not remount a renamed dataset by itself).
    #[track_caller]
    pub fn assert_mounted_if_final(&self, ctx: &str) {
        let ds = self.dataset();
        let o = zfs(&["get", "-H", "-o", "value", "mountpoint,mounted", &ds]);
        if !o.status.success() {
            return;
        }
        let out = stdout(&o);
        let v: Vec<&str> = out.lines().map(str::trim).collect();
        if v.first() == Some(&self.repo().to_str().unwrap()) {
            assert_eq!(v.get(1), Some(&"yes"), "{ctx}: {ds} is not mounted");
        }
    }

    /// Every dataset of this world: `POOL/NAME` and `POOL/NAME--*`.
    pub fn datasets(&self) -> Vec<String> {
        let ds = self.dataset();
        let o = zfs(&[
            "list",
            "-H",
            "-o",
            "name",
            "-t",
            "filesystem",
            "-r",
            &self.pool,
        ]);
        stdout(&o)
            .lines()
            .filter(|l| *l == ds || l.starts_with(&format!("{ds}--")))
            .map(String::from)
            .collect()
    }

    /// Every snapshot of this world's datasets (full names).
    pub fn all_snapshots(&self) -> Vec<String> {
        let ds = self.dataset();
        let o = zfs(&[
            "list", "-H", "-o", "name", "-t", "snapshot", "-r", &self.pool,
        ]);
        stdout(&o)
            .lines()
            .filter(|l| l.starts_with(&format!("{ds}@")) || l.starts_with(&format!("{ds}--")))
            .map(String::from)
            .collect()
    }

    /// The snapshots of `POOL/NAME` in creation order (names after `@`).
    pub fn snapshots(&self) -> Vec<String> {
        let ds = self.dataset();
        let o = zfs(&[
            "list",
            "-H",
            "-o",
            "name",
            "-t",
            "snapshot",
            "-s",
            "createtxg",
            "-r",
            &ds,
        ]);
        if !o.status.success() {
            return Vec::new();
        }
        stdout(&o)
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{ds}@")))
            .map(String::from)
            .collect()
    }

    pub fn prop(&self, ds: &str, prop: &str) -> String {
        zfs_ok(&["get", "-H", "-o", "value", prop, ds])
            .trim()
            .to_string()
    }

    /// Entries of the repository parent other than the repository's own
    /// mountpoint and its lock file: transaction mountpoints
    /// (`.dsg-tx.*`), the journal, anything else.
    pub fn parent_leftovers(&self) -> Vec<String> {
        let lock = format!(".dsg-zfs.{}.lock", self.repo_name);
        let mut v: Vec<String> = fs::read_dir(&self.repo_parent)
            .map(|rd| {
                rd.flatten()
                    .map(|d| d.file_name().to_string_lossy().into_owned())
                    .filter(|n| *n != self.repo_name && *n != lock)
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// No transaction state anywhere: no `POOL/NAME--*` dataset or
    /// snapshot, no `.dsg-tx.*` directory or journal beside the repository,
    /// no staging inside it.
    #[track_caller]
    pub fn assert_no_zfs_leftovers(&self, ctx: &str) {
        let ds = self.dataset();
        let extra: Vec<String> = self
            .datasets()
            .into_iter()
            .filter(|d| *d != ds)
            .chain(
                self.all_snapshots()
                    .into_iter()
                    .filter(|s| !s.starts_with(&format!("{ds}@"))),
            )
            .collect();
        assert!(
            extra.is_empty(),
            "{ctx}: transaction datasets/snapshots left: {extra:?}"
        );
        let left = self.parent_leftovers();
        assert!(
            left.is_empty(),
            "{ctx}: leftovers beside the repository in {}: {left:?}",
            self.repo_parent.display()
        );
        if self.repo().exists() {
            assert_no_leftovers(&self.repo());
        }
    }

    /// The repository is the dataset `POOL/NAME`: it exists, is not a
    /// clone, is mounted at `P/NAME`, its snapshots are exactly `s1 … sN`
    /// for its head `sN`, and the tree equals its manifest. Returns N.
    #[track_caller]
    pub fn assert_repo_dataset(&self, ctx: &str) -> u64 {
        let ds = self.dataset();
        assert!(
            self.datasets().contains(&ds),
            "{ctx}: the repository dataset {ds} does not exist (datasets: {:?})",
            self.datasets()
        );
        assert_eq!(self.prop(&ds, "origin"), "-", "{ctx}: {ds} is a clone");
        assert_eq!(
            self.prop(&ds, "mountpoint"),
            self.repo().to_str().unwrap(),
            "{ctx}: mountpoint of {ds}"
        );
        assert_eq!(self.prop(&ds, "mounted"), "yes", "{ctx}: {ds} mounted");
        let head = read_json(&self.repo().join(".dsg/last-sync.json"));
        let n = snap_num(&snapshot_id(&head));
        assert_eq!(
            self.snapshots(),
            chain(n),
            "{ctx}: snapshots of {ds} (head s{n})"
        );
        assert_tree_matches_manifest(&self.repo(), &head, &format!("{ctx}: repository"));
        n
    }

    /// The files of snapshot `snap`, read through a temporary clone
    /// (`dsg_repo::zfs::Zfs::open_snapshot`, as history reads will): its
    /// tracked tree and its `.dsg/last-sync.json`.
    pub fn snapshot_tree(&self, snap: &str) -> (Tree, serde_json::Value) {
        let z = dsg_repo::zfs::Zfs::new(&self.pool, &self.repo()).expect("Zfs::new");
        let view = z
            .open_snapshot(snap)
            .unwrap_or_else(|e| panic!("open_snapshot({snap}): {e:?}"));
        let tree = tracked(&data_tree(&view.path));
        let head = read_json(&view.path.join(".dsg/last-sync.json"));
        (tree, head)
    }

    /// A directory with a `zfs` wrapper that fails (exit 1, no "busy" in
    /// the message) when its argument list matches the shell glob `glob`
    /// (spaces are literal; `*` matches anything) and runs the real zfs
    /// otherwise; returns the PATH to give to dsg.
    pub fn failing_zfs_path(&self, glob: &str) -> String {
        let dir = self.tmp.path().join(format!("zfs-wrapper-{}", zname("w")));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("calls.log");
        let script = format!(
            "#!/bin/sh\n\
             echo \"$*\" >> '{log}'\n\
             case \"$*\" in\n  {glob})\n    echo \"zfs $*: injected failure (test wrapper)\" >&2\n    exit 1;;\nesac\n\
             exec '{real}' \"$@\"\n",
            log = log.display(),
            real = real_zfs().display(),
            glob = glob.replace(' ', "\\ "),
        );
        let w = dir.join("zfs");
        fs::write(&w, script).unwrap();
        fs::set_permissions(&w, fs::Permissions::from_mode(0o755)).unwrap();
        format!(
            "{}:{}",
            dir.display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    /// The zfs calls a wrapper made by `failing_zfs_path` saw.
    pub fn wrapper_calls(&self, path_value: &str) -> Vec<String> {
        let dir = path_value.split(':').next().unwrap();
        fs::read_to_string(Path::new(dir).join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

/// Text of a caught panic.
pub fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}
