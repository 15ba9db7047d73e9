//! Shared helpers for the `sync_*` integration tests: isolated user config,
//! repositories on the real XFS mount when the test script provides it,
//! clients driven through the real `dsg` binary, and listings of both trees
//! to check the atomicity invariants (DESIGN §2 G1) after crashes.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

pub fn dsg_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("dsg")
}

pub fn is_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique name for a directory of this test process.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Where repositories go: `$DSG_TEST_XFS/<unique>` when the test script set
/// it up, else a temp dir. Under CI the XFS mount is required.
pub fn repo_parent_dir(prefix: &str) -> (PathBuf, Option<tempfile::TempDir>) {
    match std::env::var("DSG_TEST_XFS") {
        Ok(x) if !x.is_empty() => {
            let p = Path::new(&x).join(unique(prefix));
            fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
            (p, None)
        }
        _ => {
            if is_ci() {
                panic!("CI=true but DSG_TEST_XFS is unset: run scripts/setup-services and source its env");
            }
            let t = tempfile::Builder::new()
                .prefix(&format!("dsg-repo-{prefix}-"))
                .tempdir()
                .unwrap();
            (t.path().to_path_buf(), Some(t))
        }
    }
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
        let cfg = tmp.path().join("cfg");
        fs::create_dir_all(&cfg).unwrap();
        fs::write(
            cfg.join("dsg.yml"),
            "user_name: Alice\nuser_id: alice@example.org\n",
        )
        .unwrap();
        fs::create_dir_all(tmp.path().join("home/.config")).unwrap();
        Env {
            tmp,
            repo_parent: parent,
            repo_name: "repo".into(),
            repo_guard: guard,
            remove_parent: remove,
        }
    }

    pub fn client(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
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
        c.args(args)
            .current_dir(&dir)
            .env("DSG_CONFIG_HOME", self.tmp.path().join("cfg"))
            .env("HOME", self.tmp.path().join("home"))
            .env("XDG_CONFIG_HOME", self.tmp.path().join("home/.config"))
            .env_remove("DSG_FAILPOINT")
            .env_remove("DSG_LOCK_TIMEOUT")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null());
        c
    }

    pub fn run(&self, name: &str, args: &[&str]) -> Output {
        self.command(name, args).output().unwrap()
    }

    pub fn run_env(&self, name: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut c = self.command(name, args);
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// Runs and asserts exit status 0.
    pub fn ok(&self, name: &str, args: &[&str]) -> Output {
        let o = self.run(name, args);
        assert_eq!(
            o.status.code(),
            Some(0),
            "dsg {args:?} in {name} failed:\n{}",
            show(&o)
        );
        o
    }

    /// `dsg init` in client `name` (which must hold the data already).
    pub fn init(&self, name: &str) -> Output {
        let parent = self.repo_parent.to_str().unwrap().to_string();
        self.ok(
            name,
            &[
                "init",
                "--no-interactive",
                "--host",
                "localhost",
                "--repo-path",
                &parent,
                "--repo-name",
                &self.repo_name,
                "--repo-type",
                "xfs",
            ],
        )
    }

    /// Prepares client `to` with a copy of `from`'s `.dsgconfig.yml`.
    pub fn prepare_clone(&self, from: &str, to: &str) {
        let dir = self.client(to);
        fs::create_dir_all(&dir).unwrap();
        fs::copy(
            self.client(from).join(".dsgconfig.yml"),
            dir.join(".dsgconfig.yml"),
        )
        .unwrap();
    }

    /// Prepares and runs `dsg clone` in client `to`.
    pub fn clone_client(&self, from: &str, to: &str) -> Output {
        self.prepare_clone(from, to);
        self.ok(to, &["clone"])
    }

    pub fn write(&self, client: &str, rel: &str, bytes: impl AsRef<[u8]>) {
        write_file(&self.client(client), rel, bytes.as_ref());
    }

    pub fn link(&self, client: &str, rel: &str, target: &str) {
        make_link(&self.client(client), rel, target);
    }

    pub fn remove(&self, client: &str, rel: &str) {
        remove_path(&self.client(client), rel);
    }

    pub fn read(&self, client: &str, rel: &str) -> Vec<u8> {
        fs::read(self.client(client).join(rel)).unwrap()
    }

    /// `status --json` rows as (path, state, action).
    pub fn status_rows(&self, name: &str) -> Vec<(String, String, String)> {
        let o = self.ok(name, &["status", "--json"]);
        rows_of(&json_of(&o), "files")
    }

    pub fn assert_clean(&self, name: &str) {
        let rows = self.status_rows(name);
        assert!(rows.is_empty(), "status in {name} not clean: {rows:?}");
    }

    pub fn capture(&self, client: &str) -> World {
        World::capture(&self.client(client), &self.repo())
    }
}

pub fn show(o: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{}", show(o)))
}

pub fn rows_of(v: &Value, key: &str) -> Vec<(String, String, String)> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} array in {v}"))
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap().to_string(),
                r["state"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub fn write_file(root: &Path, rel: &str, bytes: &[u8]) {
    let p = root.join(rel);
    if let Ok(md) = fs::symlink_metadata(&p) {
        if md.file_type().is_symlink() {
            fs::remove_file(&p).unwrap();
        }
    }
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, bytes).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

pub fn make_link(root: &Path, rel: &str, target: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    if fs::symlink_metadata(&p).is_ok() {
        remove_path(root, rel);
    }
    std::os::unix::fs::symlink(target, &p).unwrap();
}

pub fn remove_path(root: &Path, rel: &str) {
    let p = root.join(rel);
    let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    if md.is_dir() {
        fs::remove_dir_all(&p).unwrap();
    } else {
        fs::remove_file(&p).unwrap();
    }
}

// ------------------------------------------------------------------ listings

/// A tree entry: small files keep their bytes (readable diffs), large ones a
/// size and an independent 128-bit digest.
#[derive(Clone, PartialEq, Eq)]
pub enum Node {
    File(Vec<u8>),
    Big(u64, u128),
    Link(String),
    Dir,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::File(b) if b.len() <= 64 => write!(f, "File({:?})", String::from_utf8_lossy(b)),
            Node::File(b) => write!(f, "File({} bytes)", b.len()),
            Node::Big(n, d) => write!(f, "Big({n} bytes, {d:032x})"),
            Node::Link(t) => write!(f, "Link({t:?})"),
            Node::Dir => write!(f, "Dir"),
        }
    }
}

pub type Tree = BTreeMap<String, Node>;

const SMALL: u64 = 64 * 1024;

/// A digest that does not come from the product (two independent 64-bit
/// multiply-xorshift lanes over 8-byte words).
pub fn digest(bytes: &[u8]) -> u128 {
    let (mut a, mut b) = (0x9e37_79b9_7f4a_7c15u64, 0xc2b2_ae3d_27d4_eb4fu64);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().unwrap());
        a = (a ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(31);
        b = (b.wrapping_add(w)).wrapping_mul(0xc4ce_b9fe_1a85_ec53) ^ (b >> 29);
    }
    for &x in chunks.remainder() {
        a = (a ^ x as u64)
            .wrapping_mul(0xff51_afd7_ed55_8ccd)
            .rotate_left(31);
        b = (b.wrapping_add(x as u64)).wrapping_mul(0xc4ce_b9fe_1a85_ec53) ^ (b >> 29);
    }
    a ^= bytes.len() as u64;
    ((a as u128) << 64) | b as u128
}

fn node_of(path: &Path, md: &fs::Metadata) -> Node {
    if md.file_type().is_symlink() {
        Node::Link(fs::read_link(path).unwrap().to_string_lossy().into_owned())
    } else if md.is_dir() {
        Node::Dir
    } else {
        let b = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if b.len() as u64 <= SMALL {
            Node::File(b)
        } else {
            Node::Big(b.len() as u64, digest(&b))
        }
    }
}

/// Every path under `root` (relative, sorted) with its metadata; does not
/// follow symlinks.
pub fn walk_all(root: &Path) -> Vec<(PathBuf, fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for de in rd.flatten() {
            let p = de.path();
            let Ok(md) = fs::symlink_metadata(&p) else {
                continue;
            };
            if md.is_dir() {
                stack.push(p.clone());
            }
            out.push((p, md));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap().to_string_lossy().into_owned()
}

/// The data tree: everything under `root` except `.dsg/` (files, links,
/// directories; `.dsgconfig.yml` included).
pub fn data_tree(root: &Path) -> Tree {
    let mut t = Tree::new();
    for (p, md) in walk_all(root) {
        let r = rel(root, &p);
        if r == ".dsg" || r.starts_with(".dsg/") {
            continue;
        }
        t.insert(r, node_of(&p, &md));
    }
    t
}

/// Files and links only, of tracked paths (a component named input, output
/// or frozen; no hidden component): what a manifest describes.
pub fn tracked(t: &Tree) -> Tree {
    t.iter()
        .filter(|(p, n)| !matches!(n, Node::Dir) && is_tracked(p))
        .map(|(p, n)| (p.clone(), n.clone()))
        .collect()
}

pub fn is_tracked(p: &str) -> bool {
    let comps: Vec<&str> = p.split('/').collect();
    comps.iter().all(|c| !c.starts_with('.'))
        && comps[..comps.len() - 1]
            .iter()
            .any(|c| matches!(*c, "input" | "output" | "frozen"))
}

/// Everything under `root`, `.dsg/` included, with mtimes: for "writes
/// nothing at all" checks.
pub fn full_listing(root: &Path) -> BTreeMap<String, (Node, i64, i64)> {
    let mut t = BTreeMap::new();
    if let Ok(md) = fs::symlink_metadata(root) {
        t.insert(".".into(), (Node::Dir, md.mtime(), md.mtime_nsec()));
    }
    for (p, md) in walk_all(root) {
        let r = rel(root, &p);
        // Taking a lock may touch its lock file; lock files are allowed
        // (their existence and content still count).
        let is_lock = r == ".dsg/lock" || r.ends_with(".lock");
        let (s, ns) = if is_lock {
            (0, 0)
        } else {
            (md.mtime(), md.mtime_nsec())
        };
        t.insert(r, (node_of(&p, &md), s, ns));
    }
    t
}

/// `full_listing` for "nothing changed" after a failed command: it ignores
/// directory mtimes, the local stat caches (`.dsg/stat-cache*`, which only
/// let a scan skip work), an empty `.dsg/staging/` and the holder text in
/// lock files; everything else,
/// file mtimes included, must be as before.
pub fn state_listing(root: &Path) -> BTreeMap<String, (Node, i64, i64)> {
    let mut t = full_listing(root);
    t.retain(|k, _| !k.starts_with(".dsg/stat-cache"));
    let staging_empty = !t.keys().any(|k| k.starts_with(".dsg/staging/"));
    if staging_empty {
        t.remove(".dsg/staging");
    }
    for (k, v) in t.iter_mut() {
        if k == ".dsg/lock" || k.ends_with(".lock") {
            // Informative holder text; the flock itself is the lock.
            v.0 = Node::File(Vec::new());
        }
        if v.0 == Node::Dir {
            v.1 = 0;
            v.2 = 0;
        }
    }
    t
}

/// Human-readable differences between two maps (at most `max` lines).
pub fn diff<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    a: &BTreeMap<K, V>,
    b: &BTreeMap<K, V>,
) -> String {
    let mut s = String::new();
    let mut n = 0;
    for (k, v) in a {
        match b.get(k) {
            None => {
                let _ = writeln!(s, "  - {k:?}: {v:?}");
                n += 1;
            }
            Some(w) if w != v => {
                let _ = writeln!(s, "  ~ {k:?}: {v:?} -> {w:?}");
                n += 1;
            }
            _ => {}
        }
        if n > 30 {
            s.push_str("  …\n");
            return s;
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            let _ = writeln!(s, "  + {k:?}: {v:?}");
            n += 1;
            if n > 30 {
                s.push_str("  …\n");
                return s;
            }
        }
    }
    s
}

#[track_caller]
pub fn assert_same<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    what: &str,
    a: &BTreeMap<K, V>,
    b: &BTreeMap<K, V>,
) {
    if a != b {
        panic!("{what} differs:\n{}", diff(a, b));
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

pub fn snapshot_id(v: &Value) -> String {
    v["metadata"]["snapshot_id"]
        .as_str()
        .expect("snapshot_id")
        .to_string()
}

pub fn read_json(p: &Path) -> Value {
    let b = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
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
        let r = rel(root, &p);
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

/// G1: the world is exactly OLD or exactly NEW; panics with both diffs.
#[track_caller]
pub fn classify(now: &World, old: &World, new: &World, ctx: &str) -> Outcome {
    let o = now.mismatch_old(old);
    let Some(o) = o else { return Outcome::Old };
    let n = now.mismatch_new(new);
    let Some(n) = n else { return Outcome::New };
    panic!("{ctx}: the world is neither OLD nor NEW\n--- vs OLD:\n{o}--- vs NEW:\n{n}");
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

/// A small seeded PRNG (splitmix64) so random trials can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
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

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Uid of this process (via `id -u`; no libc dependency).
pub fn euid() -> u32 {
    let o = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}
