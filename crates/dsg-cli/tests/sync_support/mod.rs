//! The posix side of the shared test world (`world::World` of `Kind::Xfs`
//! and `Kind::Ssh` holds an `Env`) and the state listings of its G1 checks:
//! isolated user config,
//! repositories on the real XFS mount when the test script provides it,
//! clients driven through the real `dsg` binary, and listings of both trees
//! to check the atomicity invariants (DESIGN §2 G1) after crashes.
//!
//! Included only by `world/mod.rs` (test crates declare `mod world;`).
//! Builds on `support` and re-exports it: tree listings, output helpers,
//! file writers and byte generators come from there.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub use super::support::*;

/// Where repositories go: `$DSG_TEST_XFS/<unique>` when the test script set
/// it up, else a temp dir. Under CI the XFS mount is required.
pub fn repo_parent_dir(prefix: &str) -> (PathBuf, Option<tempfile::TempDir>) {
    if let Some(p) = xfs_repo_parent(prefix) {
        return (p, None);
    }
    if is_ci() {
        panic!("CI=true but DSG_TEST_XFS is unset: run scripts/setup-services and source its env");
    }
    temp_repo_parent(&format!("dsg-repo-{prefix}-"))
}

/// One test world: a user config, any number of clients (`tmp/<name>`) and
/// one repository `P/N`.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub repo_parent: PathBuf,
    pub repo_name: String,
    repo_guard: Option<tempfile::TempDir>,
    remove_parent: bool,
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.remove_parent && self.repo_guard.is_none() {
            let _ = make_writable(&self.repo_parent);
            let _ = fs::remove_dir_all(&self.repo_parent);
        }
    }
}

fn make_writable(p: &Path) -> std::io::Result<()> {
    for (path, md) in walk_all(p) {
        if md.is_dir() {
            let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o755));
        }
    }
    Ok(())
}

/// `client`, and through it `write`, `link`, `remove`, `read` and
/// `prepare_clone`.
impl Clients for Env {
    fn client(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

impl Env {
    pub fn new(prefix: &str) -> Env {
        let (parent, guard) = repo_parent_dir(prefix);
        Env::with_parent(parent, guard, true)
    }

    /// A world whose repository parent directory is `parent` (e.g. a small
    /// tmpfs); it is left in place when the world is dropped.
    pub fn on(parent: &Path) -> Env {
        Env::with_parent(parent.to_path_buf(), None, false)
    }

    fn with_parent(parent: PathBuf, guard: Option<tempfile::TempDir>, remove: bool) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("dsg-sync-")
            .tempdir()
            .unwrap();
        make_user_dirs(tmp.path());
        Env {
            tmp,
            repo_parent: parent,
            repo_name: "repo".into(),
            repo_guard: guard,
            remove_parent: remove,
        }
    }

    pub fn repo(&self) -> PathBuf {
        self.repo_parent.join(&self.repo_name)
    }

    /// A `std::process::Command` for `dsg` in client `name`, with the
    /// isolated user environment and no inherited dsg knobs.
    pub fn command(&self, name: &str, args: &[&str]) -> Command {
        self.command_as(&[], name, args)
    }

    /// Like `command`, run through `prefix` (e.g. `setpriv --reuid=nobody
    /// …`): `prefix[0] prefix[1..] dsg args`.
    pub fn command_as(&self, prefix: &[String], name: &str, args: &[&str]) -> Command {
        let dir = self.client(name);
        fs::create_dir_all(&dir).unwrap();
        let mut c = match prefix.split_first() {
            None => Command::new(dsg_bin()),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(dsg_bin());
                c
            }
        };
        c.args(args).current_dir(&dir);
        user_env(&mut c, self.tmp.path())
            .env_remove("DSG_FAILPOINT")
            .env_remove("DSG_LOCK_TIMEOUT")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null());
        c
    }

    pub fn run(&self, name: &str, args: &[&str]) -> Output {
        self.command(name, args).output().unwrap()
    }

    pub fn capture(&self, client: &str) -> World {
        World::capture(&self.client(client), &self.repo())
    }
}

// ----------------------------------------------------------------- manifests

/// A manifest entry as far as content goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ent {
    File { size: u64, hash: String },
    Link(String),
}

pub fn parse_manifest(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("manifest is JSON")
}

pub fn manifest_entries(v: &Value) -> BTreeMap<String, Ent> {
    let mut out = BTreeMap::new();
    for (k, e) in v["entries"].as_object().expect("entries object") {
        let ent = match e["type"].as_str() {
            Some("file") => Ent::File {
                size: e["filesize"].as_u64().expect("filesize"),
                hash: e["hash"].as_str().expect("hash").to_string(),
            },
            Some("link") => Ent::Link(e["reference"].as_str().expect("reference").to_string()),
            t => panic!("entry {k}: unknown type {t:?}"),
        };
        assert_eq!(e["path"].as_str(), Some(k.as_str()), "entry key vs path");
        out.insert(k.clone(), ent);
    }
    out
}

/// The snapshot ids in `.dsg/sync-messages.json` under `root`.
pub fn message_ids(root: &Path) -> Vec<String> {
    let v = read_json(&root.join(".dsg/sync-messages.json"));
    v["snapshots"]
        .as_object()
        .expect("snapshots")
        .keys()
        .cloned()
        .collect()
}

/// Asserts the sync-messages chain of `root` is s1..sN with no gap or
/// duplicate, each `snapshot_previous` naming its predecessor; returns N.
#[track_caller]
pub fn assert_chain(root: &Path) -> u64 {
    let v = read_json(&root.join(".dsg/sync-messages.json"));
    let snaps = v["snapshots"].as_object().expect("snapshots");
    let mut nums: Vec<u64> = snaps
        .keys()
        .map(|k| {
            k.strip_prefix('s')
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("bad snapshot key {k}"))
        })
        .collect();
    nums.sort();
    let n = nums.len() as u64;
    assert_eq!(nums, (1..=n).collect::<Vec<_>>(), "snapshot ids have gaps");
    for (k, md) in snaps {
        let i: u64 = k[1..].parse().unwrap();
        assert_eq!(md["snapshot_id"].as_str(), Some(k.as_str()));
        let prev = md["snapshot_previous"].as_str().map(String::from);
        let want = (i > 1).then(|| format!("s{}", i - 1));
        assert_eq!(prev, want, "{k}: snapshot_previous in {}", root.display());
    }
    let head = read_json(&root.join(".dsg/last-sync.json"));
    assert_eq!(snapshot_id(&head), format!("s{n}"), "head vs messages");
    n
}

/// The XXH3-64 of a file as the product writes it (via dsg-core, a normal
/// dependency of the CLI crate).
pub fn xxh3_hex(p: &Path) -> String {
    dsg_core::hash::hash_file(p).unwrap().0.to_hex()
}

/// The repository (or a client's tracked tree) equals its own manifest:
/// every entry present with matching size/hash or link target, and nothing
/// tracked that the manifest lacks.
#[track_caller]
pub fn assert_tree_matches_manifest(root: &Path, manifest: &Value, what: &str) {
    let ents = manifest_entries(manifest);
    let tree = tracked(&data_tree(root));
    let on_disk: BTreeSet<&String> = tree.keys().collect();
    let in_manifest: BTreeSet<&String> = ents.keys().collect();
    assert_eq!(
        on_disk, in_manifest,
        "{what}: tracked paths on disk vs manifest entries"
    );
    for (p, e) in &ents {
        let full = root.join(p);
        let md = fs::symlink_metadata(&full).unwrap();
        match e {
            Ent::File { size, hash } => {
                assert!(md.is_file(), "{what}: {p} should be a regular file");
                assert_eq!(md.len(), *size, "{what}: {p} size");
                assert_eq!(&xxh3_hex(&full), hash, "{what}: {p} content hash");
            }
            Ent::Link(t) => {
                assert!(
                    md.file_type().is_symlink(),
                    "{what}: {p} should be a symlink"
                );
                assert_eq!(&fs::read_link(&full).unwrap().to_string_lossy(), t);
            }
        }
    }
}

/// No transaction leftovers under `root` (a project or a repository):
/// no `.dsg/staging/*`, `.dsg/journal`, `.dsg/tmp`, `.dsg-tmp.*` files,
/// `.dsg.init-*` staging; lock files are fine.
#[track_caller]
pub fn assert_no_leftovers(root: &Path) {
    let mut bad = Vec::new();
    for (p, _) in walk_all(root) {
        let r = rel_path(root, &p);
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if r.starts_with(".dsg/staging/")
            || r == ".dsg/journal"
            || r == ".dsg/tmp"
            || name.starts_with(".dsg-tmp.")
            || name.starts_with(".dsg.init-")
            || (name.starts_with(".dsg-init.") && !name.ends_with(".lock"))
        {
            bad.push(r);
        }
    }
    assert!(
        bad.is_empty(),
        "leftovers under {}: {bad:?}",
        root.display()
    );
}

/// Leftovers of the repository parent directory (`P/.dsg-init.*` dirs) and
/// of the repository itself.
#[track_caller]
pub fn assert_no_repo_leftovers(parent: &Path, repo: &Path) {
    for de in fs::read_dir(parent).unwrap().flatten() {
        let n = de.file_name().to_string_lossy().into_owned();
        assert!(
            !n.starts_with(".dsg-init.") || n.ends_with(".lock"),
            "init leftover {n} in {}",
            parent.display()
        );
    }
    if repo.exists() {
        assert_no_leftovers(repo);
    }
}

// --------------------------------------------------------------------- world

/// One side (client or repository) of the G1 triple.
#[derive(Clone, Debug, PartialEq)]
pub struct Side {
    pub tree: Tree,
    pub manifest: Option<Vec<u8>>,
    pub messages: Option<Vec<u8>>,
    pub archives: BTreeSet<String>,
}

impl Side {
    pub fn capture(root: &Path) -> Side {
        let dsg = root.join(".dsg");
        let archives = fs::read_dir(dsg.join("archive"))
            .map(|rd| {
                rd.flatten()
                    .map(|d| d.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        let mut tree = data_tree(root);
        // The project config names the repository's location, which differs
        // between otherwise identical worlds; it is never written by sync.
        tree.remove(".dsgconfig.yml");
        Side {
            tree,
            manifest: fs::read(dsg.join("last-sync.json")).ok(),
            messages: fs::read(dsg.join("sync-messages.json")).ok(),
            archives,
        }
    }

    pub fn manifest_json(&self) -> Option<Value> {
        self.manifest.as_deref().map(parse_manifest)
    }

    pub fn snapshot(&self) -> Option<String> {
        self.manifest_json().map(|v| snapshot_id(&v))
    }

    pub fn entries(&self) -> Option<BTreeMap<String, Ent>> {
        self.manifest_json().map(|v| manifest_entries(&v))
    }

    pub fn message_keys(&self) -> Option<BTreeSet<String>> {
        self.messages.as_deref().map(|b| {
            let v: Value = serde_json::from_slice(b).unwrap();
            v["snapshots"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        })
    }
}

/// The (local tree + cache, repository tree + head) pair.
#[derive(Clone, Debug)]
pub struct World {
    pub local: Side,
    pub repo: Side,
}

impl World {
    pub fn capture(client: &Path, repo: &Path) -> World {
        World {
            local: Side::capture(client),
            repo: Side::capture(repo),
        }
    }

    /// Exactly the state before: every byte of both trees and of both
    /// manifests, the index and the archives.
    pub fn mismatch_old(&self, old: &World) -> Option<String> {
        let mut s = String::new();
        for (name, a, b) in [
            ("local", &self.local, &old.local),
            ("repo", &self.repo, &old.repo),
        ] {
            if a.tree != b.tree {
                let _ = write!(s, "{name} tree:\n{}", diff(&b.tree, &a.tree));
            }
            if a.manifest != b.manifest {
                let _ = writeln!(
                    s,
                    "{name} last-sync.json changed ({:?} -> {:?})",
                    b.snapshot(),
                    a.snapshot()
                );
            }
            if a.messages != b.messages {
                let _ = writeln!(s, "{name} sync-messages.json changed");
            }
            if a.archives != b.archives {
                let _ = writeln!(s, "{name} archives {:?} -> {:?}", b.archives, a.archives);
            }
        }
        (!s.is_empty()).then_some(s)
    }

    /// The state after an uninterrupted run (`new`, from a reference world
    /// built the same way): same trees, same manifest contents and snapshot
    /// ids, same index keys and archives; cache = repository head.
    pub fn mismatch_new(&self, new: &World) -> Option<String> {
        let mut s = String::new();
        for (name, a, b) in [
            ("local", &self.local, &new.local),
            ("repo", &self.repo, &new.repo),
        ] {
            if a.tree != b.tree {
                let _ = write!(s, "{name} tree:\n{}", diff(&b.tree, &a.tree));
            }
            if a.snapshot() != b.snapshot() {
                let _ = writeln!(
                    s,
                    "{name} snapshot {:?}, expected {:?}",
                    a.snapshot(),
                    b.snapshot()
                );
            }
            if a.entries() != b.entries() {
                let _ = writeln!(s, "{name} manifest entries differ");
            }
            if a.message_keys() != b.message_keys() {
                let _ = writeln!(
                    s,
                    "{name} sync-messages keys {:?}, expected {:?}",
                    a.message_keys(),
                    b.message_keys()
                );
            }
            if a.archives != b.archives {
                let _ = writeln!(
                    s,
                    "{name} archives {:?}, expected {:?}",
                    a.archives, b.archives
                );
            }
        }
        if self.local.manifest != self.repo.manifest {
            s.push_str("local last-sync.json is not byte-identical to the repository head\n");
        }
        (!s.is_empty()).then_some(s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Old,
    New,
}

// ---------------------------------------------------------------- processes

/// `true` when the process was killed by SIGKILL.
pub fn killed(o: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    o.signal() == Some(9)
}

/// The failpoint names a run passed (`DSG_FAILPOINT=list`), first
/// occurrence of each, in order.
pub fn failpoints_of(o: &Output) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for l in stderr(o).lines() {
        if let Some(n) = l.strip_prefix("failpoint: ") {
            if seen.insert(n.to_string()) {
                out.push(n.to_string());
            }
        }
    }
    out
}

/// The test seed: `DSG_TEST_SEED` or the clock (printed, to replay).
pub fn seed(name: &str) -> u64 {
    let s = std::env::var("DSG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{name}: seed {s} (replay with DSG_TEST_SEED={s})");
    s
}

/// Uid of this process (via `id -u`; no libc dependency).
pub fn euid() -> u32 {
    let o = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}
