//! Shared helpers for the `dsg` command-line tests.
//!
//! Every test gets a [`TestEnv`]: its own HOME, XDG_CONFIG_HOME and user
//! config (via `DSG_CONFIG_HOME`), a scratch directory for projects and a
//! directory for repositories. Repositories live on the real XFS test
//! filesystem when `DSG_TEST_XFS` is set (see `scripts/setup-services`); under
//! `CI=true` a missing XFS is a failure, elsewhere a plain tempdir is used.
//!
//! The checks here are independent of the product: an XXH3-64 implementation
//! of our own, a manifest writer/verifier in the original's JSON format, and
//! full tree listings (type, size, mtime, inode, content hash, link target).
//!
//! Builds on `support` (declare `mod support;` in the test crate too) for
//! what it shares with the other test support modules; its own tree
//! listing ([`Node`], [`tree`]) records metadata (mode, inode, mtimes) and
//! XXH3 hashes, unlike `support::tree`'s content listings.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;
use serde_json::{json, Map, Value};
use tempfile::TempDir;

use super::support::{init_args_for, is_ci};
pub use super::support::{stderr, stdout};

pub const USER_NAME: &str = "Test User";
pub const USER_ID: &str = "x@example.org";
/// An mtime string in the original's format, for entries the tests invent.
pub const FIXED_MTIME: &str = "2025-01-15T12:00:00-08:00";

// ---------------------------------------------------------------- env

/// The filesystem type of the mount holding `p` (from /proc/self/mounts).
fn fs_type(p: &Path) -> Option<String> {
    let p = fs::canonicalize(p).ok()?;
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let mut it = line.split(' ');
        let (_dev, mnt, ty) = (it.next()?, it.next()?, it.next()?);
        let mnt = mnt.replace("\\040", " ");
        let longer = match &best {
            None => true,
            Some((l, _)) => mnt.len() >= *l,
        };
        if p.starts_with(&mnt) && longer {
            best = Some((mnt.len(), ty.to_string()));
        }
    }
    best.map(|b| b.1)
}

/// A fresh directory to hold repositories: under `$DSG_TEST_XFS` when set
/// (and it must really be XFS), else a tempdir; under CI a missing XFS is a
/// failure, not a skip. Removed when dropped.
pub fn repos_parent() -> TempDir {
    match std::env::var_os("DSG_TEST_XFS").filter(|v| !v.is_empty()) {
        Some(x) => {
            let x = PathBuf::from(x);
            let ty = fs_type(&x);
            assert_eq!(
                ty.as_deref(),
                Some("xfs"),
                "DSG_TEST_XFS={} is not on an XFS filesystem (found {ty:?}); run scripts/setup-services",
                x.display()
            );
            tempfile::Builder::new()
                .prefix("dsg-cli-test-")
                .tempdir_in(&x)
                .unwrap_or_else(|e| panic!("DSG_TEST_XFS={} is set but unusable: {e}", x.display()))
        }
        None => {
            if is_ci() {
                panic!(
                    "CI=true but DSG_TEST_XFS is not set: the real XFS test filesystem is missing. \
                     Run `bash scripts/setup-services` and `source /var/tmp/dsg-test/env` \
                     (scripts/test does both); under CI a missing service is a failure."
                );
            }
            tempfile::Builder::new()
                .prefix("dsg-cli-repos-")
                .tempdir()
                .expect("tempdir")
        }
    }
}

pub struct TestEnv {
    tmp: TempDir,
    repos_tmp: TempDir,
    /// Scratch space for projects.
    pub base: PathBuf,
    pub home: PathBuf,
    pub xdg: PathBuf,
    /// `DSG_CONFIG_HOME`: holds `dsg.yml`.
    pub user_dir: PathBuf,
    /// The `--repo-path` P; repositories are `P/<name>`.
    pub repos: PathBuf,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let tmp = tempfile::Builder::new()
            .prefix("dsg-cli-")
            .tempdir()
            .expect("tempdir");
        let repos_tmp = repos_parent();
        let root = tmp.path().to_path_buf();
        let home = root.join("home");
        let xdg = root.join("xdg");
        let user_dir = root.join("user");
        let base = root.join("work");
        for d in [&home, &xdg, &user_dir, &base] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(
            user_dir.join("dsg.yml"),
            format!("user_name: {USER_NAME}\nuser_id: {USER_ID}\n"),
        )
        .unwrap();
        let repos = repos_tmp.path().join("repos");
        fs::create_dir(&repos).unwrap();
        TestEnv {
            tmp,
            repos_tmp,
            base,
            home,
            xdg,
            user_dir,
            repos,
        }
    }

    /// A new, empty project directory `base/<name>`.
    pub fn project(&self, name: &str) -> PathBuf {
        let p = self.base.join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }

    /// The repository `P/<name>`.
    pub fn repo(&self, name: &str) -> PathBuf {
        self.repos.join(name)
    }

    /// `dsg` in `dir` with a clean environment: only PATH and this test's
    /// HOME, XDG_CONFIG_HOME and DSG_CONFIG_HOME (no DSG_FAILPOINT etc.).
    pub fn cmd(&self, dir: &Path) -> Command {
        let mut c = Command::cargo_bin("dsg").expect("dsg binary");
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", &self.xdg)
            .env("DSG_CONFIG_HOME", &self.user_dir)
            .env("DSG_LOCK_TIMEOUT", "5")
            .current_dir(dir)
            .timeout(std::time::Duration::from_secs(60));
        c
    }

    pub fn run(&self, dir: &Path, args: &[&str]) -> Output {
        self.cmd(dir).args(args).output().expect("run dsg")
    }

    pub fn init_args(&self, name: &str) -> Vec<String> {
        init_args_at(&self.repos, name)
    }

    /// Runs `dsg init` for repository `name` (plus `extra`), returning the output.
    pub fn init(&self, dir: &Path, name: &str, extra: &[&str]) -> Output {
        let mut args = self.init_args(name);
        args.extend(extra.iter().map(|s| s.to_string()));
        self.cmd(dir).args(&args).output().expect("run dsg init")
    }

    /// `dsg init` that must succeed.
    pub fn init_ok(&self, dir: &Path, name: &str) -> Output {
        let o = self.init(dir, name, &[]);
        assert_code(&o, 0, "dsg init");
        o
    }

    /// `dsg status --json` that must succeed; returns the document.
    pub fn status_json(&self, dir: &Path, extra: &[&str]) -> Value {
        let mut args = vec!["status", "--json"];
        args.extend_from_slice(extra);
        let o = self.run(dir, &args);
        assert_code(&o, 0, "dsg status --json");
        let v = one_json(&o.stdout);
        assert_eq!(v["status"], "ok", "{}", describe(&o));
        v
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        TestEnv::new()
    }
}

pub fn init_args_at(repo_path: &Path, name: &str) -> Vec<String> {
    init_args_for("localhost", repo_path, name, "xfs")
}

// ---------------------------------------------------------------- output

pub fn describe(o: &Output) -> String {
    format!(
        "exit {:?} (signal {:?})\n--- stdout:\n{}\n--- stderr:\n{}",
        o.status.code(),
        o.status.signal(),
        stdout(o),
        stderr(o)
    )
}

pub fn assert_code(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: expected exit {code}\n{}",
        describe(o)
    );
}

/// Parses `bytes` as exactly one JSON document (whitespace around it allowed).
pub fn one_json(bytes: &[u8]) -> Value {
    let docs: Vec<Value> = serde_json::Deserializer::from_slice(bytes)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON: {e}\n{}",
                String::from_utf8_lossy(bytes)
            )
        });
    assert_eq!(
        docs.len(),
        1,
        "expected exactly one JSON document on stdout, got {}:\n{}",
        docs.len(),
        String::from_utf8_lossy(bytes)
    );
    docs.into_iter().next().unwrap()
}

/// `path -> (state, action)` from a `status --json` document.
pub fn status_rows(v: &Value) -> BTreeMap<String, (String, String)> {
    let mut m = BTreeMap::new();
    for f in v["files"].as_array().expect("files is an array") {
        let p = f["path"].as_str().expect("path").to_string();
        let s = f["state"].as_str().expect("state").to_string();
        let a = f["action"].as_str().expect("action").to_string();
        assert!(m.insert(p.clone(), (s, a)).is_none(), "{p} listed twice");
    }
    m
}

// ---------------------------------------------------------------- files

pub fn write(root: &Path, rel: &str, content: impl AsRef<[u8]>) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
}

pub fn link(root: &Path, rel: &str, target: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    symlink(target, &p).unwrap();
}

/// Copies a tree (files, dirs, symlinks as symlinks); makes copies writable.
pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        let dst = to.join(e.file_name());
        if ft.is_symlink() {
            symlink(fs::read_link(e.path()).unwrap(), &dst).unwrap();
        } else if ft.is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            fs::copy(e.path(), &dst).unwrap();
            let mut perm = fs::metadata(&dst).unwrap().permissions();
            perm.set_mode(perm.mode() | 0o200);
            fs::set_permissions(&dst, perm).unwrap();
        }
    }
}

/// Names of the entries of `dir` (sorted); empty if it does not exist.
pub fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir {
        mtime_ns: i128,
        mode: u32,
    },
    File {
        size: u64,
        mtime_ns: i128,
        ino: u64,
        mode: u32,
        hash: String,
    },
    Link {
        target: String,
        mtime_ns: i128,
    },
    Other,
}

fn mtime_ns(md: &fs::Metadata) -> i128 {
    md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128
}

/// Every path under `root` (root itself as ""), never following symlinks.
pub fn tree(root: &Path) -> BTreeMap<String, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
        let rel = dir
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let md = fs::symlink_metadata(dir).unwrap();
        out.insert(
            rel,
            Node::Dir {
                mtime_ns: mtime_ns(&md),
                mode: md.mode(),
            },
        );
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let ft = md.file_type();
            if ft.is_dir() {
                walk(root, &p, out);
            } else if ft.is_symlink() {
                out.insert(
                    rel,
                    Node::Link {
                        target: fs::read_link(&p).unwrap().to_string_lossy().into_owned(),
                        mtime_ns: mtime_ns(&md),
                    },
                );
            } else if ft.is_file() {
                out.insert(
                    rel,
                    Node::File {
                        size: md.len(),
                        mtime_ns: mtime_ns(&md),
                        ino: md.ino(),
                        mode: md.mode(),
                        hash: hex(xxh3_64(&fs::read(&p).unwrap())),
                    },
                );
            } else {
                out.insert(rel, Node::Other);
            }
        }
    }
    let mut out = BTreeMap::new();
    if fs::symlink_metadata(root).is_ok() {
        walk(root, root, &mut out);
    }
    out
}

/// Asserts two tree listings are equal, naming every difference.
pub fn assert_same_tree(
    before: &BTreeMap<String, Node>,
    after: &BTreeMap<String, Node>,
    what: &str,
) {
    let mut diffs = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => diffs.push(format!("removed: {k:?}")),
            Some(w) if w != v => diffs.push(format!("changed: {k:?}: {v:?} -> {w:?}")),
            _ => {}
        }
    }
    for k in after.keys() {
        if !before.contains_key(k) {
            diffs.push(format!("created: {k:?} = {:?}", after[k]));
        }
    }
    assert!(diffs.is_empty(), "{what}:\n  {}", diffs.join("\n  "));
}

/// The same listing with directory mtimes zeroed: for checks that a failed
/// command left nothing behind (it may have created and removed a file).
pub fn without_dir_mtimes(t: &BTreeMap<String, Node>) -> BTreeMap<String, Node> {
    t.iter()
        .map(|(k, v)| {
            let v = match v {
                Node::Dir { mode, .. } => Node::Dir {
                    mtime_ns: 0,
                    mode: *mode,
                },
                other => other.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// Repository listing without its lock files (and so the mtime of the
/// `.dsg` directory holding one); the strict check is an ignored bug test in
/// cli_status.rs.
pub fn repo_tree_sans_locks(repos: &Path) -> BTreeMap<String, Node> {
    tree(repos)
        .into_iter()
        .filter(|(k, _)| {
            !k.ends_with(".lock") && !k.ends_with(".dsg/lock") && !k.ends_with("/.dsg")
        })
        .collect()
}

/// Regular files and links of a tree as `relpath -> content hash | "-> target"`.
pub fn content_map(root: &Path) -> BTreeMap<String, String> {
    tree(root)
        .into_iter()
        .filter_map(|(k, v)| match v {
            Node::File { hash, .. } => Some((k, hash)),
            Node::Link { target, .. } => Some((k, format!("-> {target}"))),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------- manifests

/// A manifest in the original's JSON format (spec-data-model §1.9), with
/// entries kept in file order (serde_json is built with `preserve_order`).
#[derive(Clone, Debug)]
pub struct Mf {
    pub entries: Map<String, Value>,
    pub metadata: Value,
}

fn assert_preserve_order() {
    let v: Value = serde_json::from_str(r#"{"b":1,"a":2}"#).unwrap();
    assert_eq!(
        serde_json::to_string(&v).unwrap(),
        r#"{"b":1,"a":2}"#,
        "serde_json must keep key order (feature preserve_order) for manifest hashing"
    );
}

pub fn file_entry(path: &str, user: &str, size: u64, mtime: &str, hash: &str) -> Value {
    json!({"type": "file", "path": path, "user": user, "filesize": size, "mtime": mtime, "hash": hash})
}

pub fn link_entry(path: &str, user: &str, target: &str) -> Value {
    json!({"type": "link", "path": path, "user": user, "reference": target})
}

impl Mf {
    pub fn empty() -> Mf {
        assert_preserve_order();
        Mf {
            entries: Map::new(),
            metadata: Value::Null,
        }
    }

    pub fn parse(bytes: &[u8]) -> Mf {
        assert_preserve_order();
        let v: Value = serde_json::from_slice(bytes).expect("manifest JSON");
        Mf {
            entries: v["entries"].as_object().expect("entries object").clone(),
            metadata: v["metadata"].clone(),
        }
    }

    pub fn load(path: &Path) -> Mf {
        Mf::parse(&fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    /// A file entry for `content` (real size and hash, a fixed mtime).
    pub fn set_file(&mut self, path: &str, content: &[u8]) -> &mut Mf {
        self.entries.insert(
            path.into(),
            file_entry(
                path,
                USER_ID,
                content.len() as u64,
                FIXED_MTIME,
                &hex(xxh3_64(content)),
            ),
        );
        self
    }

    pub fn set_link(&mut self, path: &str, target: &str) -> &mut Mf {
        self.entries
            .insert(path.into(), link_entry(path, USER_ID, target));
        self
    }

    pub fn set_raw(&mut self, key: &str, entry: Value) -> &mut Mf {
        self.entries.insert(key.into(), entry);
        self
    }

    /// §1.7: XXH3-64 over the compact JSON of each entry, in file order.
    pub fn entries_hash(&self) -> String {
        entries_hash_of(&self.entries)
    }

    /// Writes fresh metadata (§1.6) with a correct count, entries_hash and
    /// snapshot_hash chained on `prev_hash`.
    pub fn seal(&mut self, id: &str, message: &str, prev: Option<(&str, &str)>) -> &mut Mf {
        let eh = self.entries_hash();
        let sh = chain_hash(&eh, message, prev.map(|p| p.1));
        self.metadata = json!({
            "manifest_version": "0.4.4",
            "snapshot_id": id,
            "created_at": "2025-06-01T10:00:00-07:00",
            "entry_count": self.entries.len(),
            "entries_hash": eh,
            "created_by": USER_ID,
            "snapshot_message": message,
            "snapshot_previous": prev.map(|p| p.0),
            "snapshot_hash": sh,
            "snapshot_notes": "sync",
            "project_config": null,
        });
        self
    }

    /// orjson OPT_INDENT_2 layout, no trailing newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let doc =
            json!({"entries": Value::Object(self.entries.clone()), "metadata": self.metadata});
        serde_json::to_vec_pretty(&doc).unwrap()
    }

    pub fn write(&self, path: &Path) {
        fs::write(path, self.to_bytes()).unwrap();
    }

    pub fn keys(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }
}

pub fn entries_hash_of(entries: &Map<String, Value>) -> String {
    let mut buf = Vec::new();
    for v in entries.values() {
        buf.extend_from_slice(&serde_json::to_vec(v).unwrap());
    }
    hex(xxh3_64(&buf))
}

/// §1.8 with no project_config: XXH3(entries_hash ‖ message ‖ prev_hash).
pub fn chain_hash(entries_hash: &str, message: &str, prev_hash: Option<&str>) -> String {
    let mut buf = Vec::new();
    buf.extend_from_slice(entries_hash.as_bytes());
    buf.extend_from_slice(message.as_bytes());
    if let Some(p) = prev_hash {
        buf.extend_from_slice(p.as_bytes());
    }
    hex(xxh3_64(&buf))
}

// ---------------------------------------------------------------- XXH3-64

pub fn hex(h: u64) -> String {
    format!("{h:016x}")
}

/// XXH3-64, seed 0, default secret: a plain scalar implementation written
/// for the tests so that they do not trust the product's hashing.
pub fn xxh3_64(input: &[u8]) -> u64 {
    xxh3::hash64(input)
}

mod xxh3 {
    const P32_1: u64 = 0x9E3779B1;
    const P32_2: u64 = 0x85EBCA77;
    const P32_3: u64 = 0xC2B2AE3D;
    const P64_1: u64 = 0x9E3779B185EBCA87;
    const P64_2: u64 = 0xC2B2AE3D27D4EB4F;
    const P64_3: u64 = 0x165667B19E3779F9;
    const P64_4: u64 = 0x85EBCA77C2B2AE63;
    const P64_5: u64 = 0x27D4EB2F165667C5;
    const MX1: u64 = 0x165667919E3779F9;
    const MX2: u64 = 0x9FB21C651E98DF25;

    const SECRET: [u8; 192] = [
        0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad,
        0x1c, 0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3,
        0x67, 0x1f, 0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc,
        0xff, 0x72, 0x21, 0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6,
        0x81, 0x3a, 0x26, 0x4c, 0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65,
        0x8b, 0x1b, 0x53, 0x2e, 0xa3, 0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19,
        0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8, 0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9,
        0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d, 0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31,
        0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, 0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb,
        0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb, 0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0,
        0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e, 0x2b, 0x16, 0xbe, 0x58, 0x7d,
        0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce, 0x45, 0xcb, 0x3a, 0x8f,
        0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
    ];

    fn r32(b: &[u8], i: usize) -> u64 {
        u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as u64
    }

    fn r64(b: &[u8], i: usize) -> u64 {
        u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
    }

    fn fold(a: u64, b: u64) -> u64 {
        let p = (a as u128).wrapping_mul(b as u128);
        (p as u64) ^ ((p >> 64) as u64)
    }

    fn avalanche(mut h: u64) -> u64 {
        h ^= h >> 37;
        h = h.wrapping_mul(MX1);
        h ^ (h >> 32)
    }

    fn xxh64_avalanche(mut h: u64) -> u64 {
        h ^= h >> 33;
        h = h.wrapping_mul(P64_2);
        h ^= h >> 29;
        h = h.wrapping_mul(P64_3);
        h ^ (h >> 32)
    }

    fn rrmxmx(mut h: u64, len: u64) -> u64 {
        h ^= h.rotate_left(49) ^ h.rotate_left(24);
        h = h.wrapping_mul(MX2);
        h ^= (h >> 35).wrapping_add(len);
        h = h.wrapping_mul(MX2);
        h ^ (h >> 28)
    }

    fn mix16(input: &[u8], i: usize, s: usize) -> u64 {
        fold(
            r64(input, i) ^ r64(&SECRET, s),
            r64(input, i + 8) ^ r64(&SECRET, s + 8),
        )
    }

    pub fn hash64(input: &[u8]) -> u64 {
        let len = input.len();
        let l = len as u64;
        match len {
            0 => xxh64_avalanche(r64(&SECRET, 56) ^ r64(&SECRET, 64)),
            1..=3 => {
                let combo = ((input[0] as u32) << 16)
                    | ((input[len >> 1] as u32) << 24)
                    | (input[len - 1] as u32)
                    | ((len as u32) << 8);
                xxh64_avalanche(combo as u64 ^ (r32(&SECRET, 0) ^ r32(&SECRET, 4)))
            }
            4..=8 => {
                let flip = r64(&SECRET, 8) ^ r64(&SECRET, 16);
                let v = r32(input, len - 4).wrapping_add(r32(input, 0) << 32);
                rrmxmx(v ^ flip, l)
            }
            9..=16 => {
                let lo = r64(input, 0) ^ (r64(&SECRET, 24) ^ r64(&SECRET, 32));
                let hi = r64(input, len - 8) ^ (r64(&SECRET, 40) ^ r64(&SECRET, 48));
                avalanche(
                    l.wrapping_add(lo.swap_bytes())
                        .wrapping_add(hi)
                        .wrapping_add(fold(lo, hi)),
                )
            }
            17..=128 => {
                let mut acc = l.wrapping_mul(P64_1);
                if len > 32 {
                    if len > 64 {
                        if len > 96 {
                            acc = acc.wrapping_add(mix16(input, 48, 96));
                            acc = acc.wrapping_add(mix16(input, len - 64, 112));
                        }
                        acc = acc.wrapping_add(mix16(input, 32, 64));
                        acc = acc.wrapping_add(mix16(input, len - 48, 80));
                    }
                    acc = acc.wrapping_add(mix16(input, 16, 32));
                    acc = acc.wrapping_add(mix16(input, len - 32, 48));
                }
                acc = acc.wrapping_add(mix16(input, 0, 0));
                acc = acc.wrapping_add(mix16(input, len - 16, 16));
                avalanche(acc)
            }
            129..=240 => {
                let mut acc = l.wrapping_mul(P64_1);
                for i in 0..8 {
                    acc = acc.wrapping_add(mix16(input, 16 * i, 16 * i));
                }
                acc = avalanche(acc);
                for i in 8..len / 16 {
                    acc = acc.wrapping_add(mix16(input, 16 * i, 16 * (i - 8) + 3));
                }
                acc = acc.wrapping_add(mix16(input, len - 16, 136 - 17));
                avalanche(acc)
            }
            _ => long(input),
        }
    }

    fn accumulate_512(acc: &mut [u64; 8], input: &[u8], i: usize, s: usize) {
        for k in 0..8 {
            let v = r64(input, i + 8 * k);
            let key = v ^ r64(&SECRET, s + 8 * k);
            acc[k ^ 1] = acc[k ^ 1].wrapping_add(v);
            acc[k] = acc[k].wrapping_add((key & 0xFFFF_FFFF).wrapping_mul(key >> 32));
        }
    }

    fn long(input: &[u8]) -> u64 {
        let len = input.len();
        let mut acc = [P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1];
        let stripes_per_block = (SECRET.len() - 64) / 8;
        let block_len = 64 * stripes_per_block;
        let blocks = (len - 1) / block_len;
        for b in 0..blocks {
            for s in 0..stripes_per_block {
                accumulate_512(&mut acc, input, b * block_len + s * 64, s * 8);
            }
            for (k, a) in acc.iter_mut().enumerate() {
                let key = r64(&SECRET, SECRET.len() - 64 + 8 * k);
                *a = ((*a ^ (*a >> 47)) ^ key).wrapping_mul(P32_1);
            }
        }
        let stripes = ((len - 1) - block_len * blocks) / 64;
        for s in 0..stripes {
            accumulate_512(&mut acc, input, blocks * block_len + s * 64, s * 8);
        }
        accumulate_512(&mut acc, input, len - 64, SECRET.len() - 64 - 7);
        let mut r = (len as u64).wrapping_mul(P64_1);
        for k in 0..4 {
            r = r.wrapping_add(fold(
                acc[2 * k] ^ r64(&SECRET, 11 + 16 * k),
                acc[2 * k + 1] ^ r64(&SECRET, 11 + 16 * k + 8),
            ));
        }
        avalanche(r)
    }
}

/// The original-dsg fixture (read only: copy before use).
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/original-dsg")
        .canonicalize()
        .expect("tests/fixtures/original-dsg at the workspace root")
}

/// Contains an ANSI escape or a carriage return (progress bars, colours)?
pub fn has_escape_codes(b: &[u8]) -> bool {
    b.contains(&0x1b) || b.contains(&b'\r')
}

/// `.dsg.init-*` leftovers in a project dir.
pub fn init_leftovers(project: &Path) -> Vec<String> {
    ls(project)
        .into_iter()
        .filter(|n| n.starts_with(".dsg.init-"))
        .collect()
}

/// `.dsg-init.<name>.<tx>` staging dirs beside the repository (the lock file
/// `.dsg-init.<name>.lock` is not staging).
pub fn repo_init_leftovers(repos: &Path, name: &str) -> Vec<String> {
    let prefix = format!(".dsg-init.{name}.");
    ls(repos)
        .into_iter()
        .filter(|n| n.starts_with(&prefix) && !n.ends_with(".lock"))
        .collect()
}
