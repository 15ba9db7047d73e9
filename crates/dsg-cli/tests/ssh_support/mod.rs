//! Shared helpers for the `ssh_*` integration tests: the real `dsg` binary
//! talking to a real sshd on loopback (started by `scripts/setup-services`,
//! which exports `DSG_TEST_SSH_CONFIG` and `DSG_TEST_SSH_HOST`), a world of
//! clients plus one repository parameterised by transport, tree listings to
//! compare effects on disk, a bounded fault proxy (std::net only) and a
//! driver for the agent's framed protocol.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

// ------------------------------------------------------------------ env

pub fn is_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

pub fn dsg_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("dsg")
}

/// The test sshd, as `scripts/setup-services` describes it.
#[derive(Clone, Debug)]
pub struct Ssh {
    /// The ssh client config (`ssh -F <config> <host>`).
    pub config: PathBuf,
    /// The Host alias in it (`dsgtest`).
    pub host: String,
}

impl Ssh {
    /// The directory holding the keys and known_hosts.
    pub fn dir(&self) -> PathBuf {
        self.config.parent().unwrap().to_path_buf()
    }

    /// `DSG_SSH_COMMAND` for the good connection.
    pub fn command(&self) -> String {
        format!("ssh -F {}", self.config.display())
    }

    /// `DSG_SSH_COMMAND` with extra ssh options.
    pub fn command_with(&self, opts: &str) -> String {
        format!("ssh -F {} {opts}", self.config.display())
    }

    /// The port sshd listens on (from the config's `Port` line).
    pub fn port(&self) -> u16 {
        let text = fs::read_to_string(&self.config).unwrap();
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("Port "))
            .map(|p| p.trim().parse().expect("Port number"))
            .next()
            .unwrap_or(22)
    }
}

/// The test sshd, or `None` (with a message) when it is not set up. Under
/// `CI=true` a missing sshd is a failure, not a skip.
pub fn ssh_or_skip() -> Option<Ssh> {
    let me = std::thread::current();
    let test = me.name().unwrap_or("an ssh test");
    let config = std::env::var_os("DSG_TEST_SSH_CONFIG").filter(|v| !v.is_empty());
    let Some(config) = config else {
        if is_ci() {
            panic!(
                "{test}: CI=true but DSG_TEST_SSH_CONFIG is not set: the test sshd is missing. \
                 Run `bash scripts/setup-services` and `source /var/tmp/dsg-test/env` \
                 (scripts/test does both); under CI a missing service is a failure."
            );
        }
        eprintln!(
            "SKIPPED {test}: DSG_TEST_SSH_CONFIG is not set (run scripts/setup-services and \
             source /var/tmp/dsg-test/env)"
        );
        return None;
    };
    let config = PathBuf::from(config);
    assert!(
        config.is_file(),
        "DSG_TEST_SSH_CONFIG={} does not exist: run scripts/setup-services",
        config.display()
    );
    let host = std::env::var("DSG_TEST_SSH_HOST").unwrap_or_else(|_| "dsgtest".into());
    Some(Ssh { config, host })
}

/// `let ssh = need_ssh!();` — skips (returns) the test when no sshd is set
/// up outside CI; fails under CI.
#[macro_export]
macro_rules! need_ssh {
    () => {
        match ssh_support::ssh_or_skip() {
            Some(s) => s,
            None => return,
        }
    };
}

// ------------------------------------------------------------------ world

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `--host localhost`: the agent runs in the client process.
    Local,
    /// `--host dsgtest`: `dsg agent` runs behind the test sshd.
    Ssh,
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

/// One test world: a user config, HOME and XDG_CONFIG_HOME in a temp dir,
/// any number of clients (`tmp/<name>`), and one repository `P/N` where P is
/// `$DSG_TEST_XFS/<unique>` when set (the "server" is this machine).
pub struct World {
    pub tmp: tempfile::TempDir,
    pub repo_parent: PathBuf,
    pub repo_name: String,
    pub transport: Transport,
    pub ssh: Option<Ssh>,
    parent_guard: Option<tempfile::TempDir>,
}

impl Drop for World {
    fn drop(&mut self) {
        if self.parent_guard.is_none() {
            let _ = fs::remove_dir_all(&self.repo_parent);
        }
    }
}

impl World {
    /// `ssh` must be given for `Transport::Ssh`.
    pub fn new(prefix: &str, transport: Transport, ssh: Option<&Ssh>) -> World {
        assert!(transport == Transport::Local || ssh.is_some());
        let (repo_parent, parent_guard) = match std::env::var("DSG_TEST_XFS") {
            Ok(x) if !x.is_empty() => {
                let p = Path::new(&x).join(unique(prefix));
                fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
                (p, None)
            }
            _ => {
                let t = tempfile::Builder::new()
                    .prefix(&format!("dsg-ssh-repo-{prefix}-"))
                    .tempdir()
                    .unwrap();
                (t.path().to_path_buf(), Some(t))
            }
        };
        let tmp = tempfile::Builder::new()
            .prefix(&format!("dsg-ssh-{prefix}-"))
            .tempdir()
            .unwrap();
        fs::create_dir_all(tmp.path().join("cfg")).unwrap();
        fs::write(
            tmp.path().join("cfg/dsg.yml"),
            "user_name: Alice\nuser_id: alice@example.org\n",
        )
        .unwrap();
        fs::create_dir_all(tmp.path().join("home/.config")).unwrap();
        World {
            tmp,
            repo_parent,
            repo_name: "repo".into(),
            transport,
            ssh: ssh.cloned(),
            parent_guard,
        }
    }

    pub fn host(&self) -> String {
        match self.transport {
            Transport::Local => "localhost".into(),
            Transport::Ssh => self.ssh.as_ref().unwrap().host.clone(),
        }
    }

    pub fn label(&self) -> &'static str {
        match self.transport {
            Transport::Local => "local",
            Transport::Ssh => "ssh",
        }
    }

    pub fn client(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn repo(&self) -> PathBuf {
        self.repo_parent.join(&self.repo_name)
    }

    /// `dsg args` in client `name` with a clean environment: PATH, the
    /// isolated HOME / XDG_CONFIG_HOME / DSG_CONFIG_HOME and, over ssh,
    /// `DSG_SSH_COMMAND=ssh -F <config>` (replace it with `ssh_command`).
    pub fn command(&self, name: &str, args: &[&str], ssh_command: Option<&str>) -> Command {
        let dir = self.client(name);
        fs::create_dir_all(&dir).unwrap();
        let mut c = Command::new(dsg_bin());
        c.args(args)
            .current_dir(&dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DSG_CONFIG_HOME", self.tmp.path().join("cfg"))
            .env("HOME", self.tmp.path().join("home"))
            .env("XDG_CONFIG_HOME", self.tmp.path().join("home/.config"))
            .env("DSG_LOCK_TIMEOUT", "20")
            .stdin(Stdio::null());
        let sc = ssh_command
            .map(String::from)
            .or_else(|| self.ssh.as_ref().map(|s| s.command()));
        if let Some(sc) = sc {
            c.env("DSG_SSH_COMMAND", sc);
        }
        c
    }

    pub fn run(&self, name: &str, args: &[&str]) -> Output {
        run_bounded(self.command(name, args, None), Duration::from_secs(90))
    }

    /// Runs with another `DSG_SSH_COMMAND`.
    pub fn run_via(&self, name: &str, args: &[&str], ssh_command: &str) -> Output {
        run_bounded(
            self.command(name, args, Some(ssh_command)),
            Duration::from_secs(90),
        )
    }

    /// Runs and asserts exit status 0.
    #[track_caller]
    pub fn ok(&self, name: &str, args: &[&str]) -> Output {
        let o = self.run(name, args);
        assert_eq!(
            o.status.code(),
            Some(0),
            "[{}] dsg {args:?} in {name} failed:\n{}",
            self.label(),
            show(&o)
        );
        o
    }

    /// `dsg init` arguments for this world's transport (over ssh with
    /// `--remote-dsg` = the dsg under test).
    pub fn init_args(&self) -> Vec<String> {
        let mut v: Vec<String> = [
            "init",
            "--no-interactive",
            "--host",
            &self.host(),
            "--repo-path",
            self.repo_parent.to_str().unwrap(),
            "--repo-name",
            &self.repo_name,
            "--repo-type",
            "xfs",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.transport == Transport::Ssh {
            v.push("--remote-dsg".into());
            v.push(dsg_bin().to_str().unwrap().into());
        }
        v
    }

    #[track_caller]
    pub fn init(&self, name: &str) -> Output {
        let args = self.init_args();
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        self.ok(name, &args)
    }

    /// Copies `from`'s `.dsgconfig.yml` into a new client `to`.
    pub fn prepare_clone(&self, from: &str, to: &str) {
        fs::create_dir_all(self.client(to)).unwrap();
        fs::copy(
            self.client(from).join(".dsgconfig.yml"),
            self.client(to).join(".dsgconfig.yml"),
        )
        .unwrap();
    }

    #[track_caller]
    pub fn clone_client(&self, from: &str, to: &str) -> Output {
        self.prepare_clone(from, to);
        self.ok(to, &["clone"])
    }

    pub fn write(&self, client: &str, rel: &str, bytes: impl AsRef<[u8]>) {
        write_file(&self.client(client), rel, bytes.as_ref());
    }

    pub fn link(&self, client: &str, rel: &str, target: &str) {
        let p = self.client(client).join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        if fs::symlink_metadata(&p).is_ok() {
            fs::remove_file(&p).unwrap();
        }
        std::os::unix::fs::symlink(target, &p).unwrap();
    }

    pub fn remove(&self, client: &str, rel: &str) {
        let p = self.client(client).join(rel);
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }

    /// `status --json` of client `name` (must succeed).
    pub fn status_json(&self, name: &str) -> Value {
        json_of(&self.ok(name, &["status", "--json"]))
    }

    /// The repository manifest's snapshot id (read on the server's disk).
    pub fn repo_snapshot(&self) -> String {
        snapshot_id(&self.repo().join(".dsg/last-sync.json"))
    }

    /// The client's cache manifest's snapshot id.
    pub fn client_snapshot(&self, name: &str) -> String {
        snapshot_id(&self.client(name).join(".dsg/last-sync.json"))
    }

    /// Asserts the tracked data of client `name` equals the repository's
    /// data (bytes of every file, every symlink target) and that the cache
    /// and the repository manifest name the same snapshot.
    #[track_caller]
    pub fn assert_in_sync(&self, name: &str) {
        let local = data_tree(&self.client(name));
        let repo = data_tree(&self.repo());
        assert_same(
            &format!("[{}] client {name} vs repository data", self.label()),
            &local,
            &repo,
        );
        assert_eq!(
            self.client_snapshot(name),
            self.repo_snapshot(),
            "[{}] client {name}'s cache and the repository name different snapshots",
            self.label()
        );
    }
}

/// Runs a command with a deadline (kills it and panics when it hangs).
pub fn run_bounded(mut c: Command, limit: Duration) -> Output {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().expect("spawn dsg");
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            if d2.load(Ordering::SeqCst) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !d2.load(Ordering::SeqCst) {
            // Our own child, by its pid.
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            return true;
        }
        false
    });
    let out = child.wait_with_output().expect("wait dsg");
    done.store(true, Ordering::SeqCst);
    let killed = watchdog.join().unwrap();
    assert!(
        !killed,
        "dsg did not finish within {limit:?} (killed):\n{}",
        show(&out)
    );
    out
}

pub fn show(o: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{}", show(o)))
}

#[track_caller]
pub fn assert_exit(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: expected exit {code}\n{}",
        show(o)
    );
}

pub fn snapshot_id(manifest: &Path) -> String {
    let v: Value = serde_json::from_slice(
        &fs::read(manifest).unwrap_or_else(|e| panic!("{}: {e}", manifest.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", manifest.display()));
    v["metadata"]["snapshot_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: no snapshot_id", manifest.display()))
        .to_string()
}

/// `(path, state, action)` rows of a `status --json` / `sync --json` doc.
pub fn rows(v: &Value) -> Vec<(String, String, String)> {
    v["files"]
        .as_array()
        .unwrap_or_else(|| panic!("no files array in {v}"))
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

/// The shape of a JSON document: keys and value types, not values.
pub fn shape(v: &Value) -> Value {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "bool".into(),
        Value::Number(_) => "number".into(),
        Value::String(_) => "string".into(),
        Value::Array(a) => Value::Array(a.iter().map(shape).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
    }
}

// ------------------------------------------------------------------ files

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

/// Deterministic pseudo-random bytes (xorshift64*), not compressible.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `len` bytes in 4 MiB pieces: random data with runs of zeros (a
/// realistic, partly compressible large file), without holding it all.
pub fn write_big_file(path: &Path, seed: u64, len: u64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = io::BufWriter::new(fs::File::create(path).unwrap());
    let piece = 4 << 20;
    let mut written = 0u64;
    let mut i = 0u64;
    while written < len {
        let n = piece.min((len - written) as usize);
        if i % 5 == 3 {
            f.write_all(&vec![0u8; n]).unwrap();
        } else {
            f.write_all(&random_bytes(seed ^ i, n)).unwrap();
        }
        written += n as u64;
        i += 1;
    }
    f.into_inner().unwrap().sync_all().unwrap();
}

/// Byte-for-byte equality of two files, streamed.
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    let (Ok(fa), Ok(fb)) = (fs::File::open(a), fs::File::open(b)) else {
        return false;
    };
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let mut ra = io::BufReader::with_capacity(1 << 20, fa);
    let mut rb = io::BufReader::with_capacity(1 << 20, fb);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut ra, &mut ba);
        let m = read_full(&mut rb, &mut bb);
        if n != m || ba[..n] != bb[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

// ------------------------------------------------------------------ listings

/// A tree entry: small files keep their bytes, large ones a size and an
/// independent 128-bit digest (not the product's hash).
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

/// Two independent 64-bit multiply-xorshift lanes over 8-byte words.
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
    } else if md.len() <= 64 * 1024 {
        Node::File(fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())))
    } else {
        let b = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Node::Big(b.len() as u64, digest(&b))
    }
}

/// Every path under `root` with its metadata (not following symlinks).
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

/// The data a manifest describes: files and links under `root`, except
/// hidden paths (`.dsg/`, `.dsgconfig.yml`, …) and directories.
pub fn data_tree(root: &Path) -> Tree {
    walk_all(root)
        .into_iter()
        .filter(|(p, md)| {
            let r = rel(root, p);
            !md.is_dir() && !r.split('/').any(|c| c.starts_with('.'))
        })
        .map(|(p, md)| (rel(root, &p), node_of(&p, &md)))
        .collect()
}

/// Everything under `root`, `.dsg/` included, with file mtimes, for
/// "nothing changed" checks. Ignored: directory mtimes, lock files' holder
/// text and mtime, the local stat caches (they only let a scan skip work)
/// and empty `.dsg/staging` / `.dsg/tmp` directories.
pub fn state_listing(root: &Path) -> BTreeMap<String, (Node, i64, i64)> {
    let mut t = BTreeMap::new();
    for (p, md) in walk_all(root) {
        let r = rel(root, &p);
        if r.starts_with(".dsg/stat-cache") || r.contains("/.dsg/stat-cache") {
            continue;
        }
        let is_lock = r.ends_with("/lock") || r == "lock" || r.ends_with(".lock");
        let node = if is_lock {
            Node::File(Vec::new())
        } else {
            node_of(&p, &md)
        };
        let (s, ns) = if is_lock || md.is_dir() {
            (0, 0)
        } else {
            (md.mtime(), md.mtime_nsec())
        };
        t.insert(r, (node, s, ns));
    }
    for d in [".dsg/staging", ".dsg/tmp"] {
        let prefix = format!("{d}/");
        if !t.keys().any(|k| k.starts_with(&prefix)) {
            t.remove(d);
        }
    }
    t
}

/// Staging / journal leftovers under `<root>/.dsg`.
pub fn leftovers(root: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let dsg = root.join(".dsg");
    for name in ["staging", "tmp"] {
        if let Ok(rd) = fs::read_dir(dsg.join(name)) {
            for e in rd.flatten() {
                v.push(format!(".dsg/{name}/{}", e.file_name().to_string_lossy()));
            }
        }
    }
    for name in ["journal", "journal.tmp"] {
        if fs::symlink_metadata(dsg.join(name)).is_ok() {
            v.push(format!(".dsg/{name}"));
        }
    }
    v
}

/// Human-readable differences between two maps (at most 30 lines).
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

// ------------------------------------------------------------------ fault proxy

/// What the fault proxy does to the connections it forwards.
#[derive(Clone, Debug)]
pub struct FaultPlan {
    /// The first `faulty` connections are cut; later ones pass through.
    pub faulty: usize,
    /// Cut a faulty connection once this many bytes (both directions
    /// together) went through it.
    pub cut_after: u64,
    /// Before cutting, stop forwarding for this long (a stalled link).
    pub stall: Duration,
    /// Accept at most this many connections, then refuse.
    pub max_connections: usize,
    /// The proxy stops by itself after this long, closing everything.
    pub lifetime: Duration,
}

impl FaultPlan {
    pub fn cut_first(cut_after: u64) -> FaultPlan {
        FaultPlan {
            faulty: 1,
            cut_after,
            stall: Duration::ZERO,
            max_connections: 16,
            lifetime: Duration::from_secs(60),
        }
    }

    /// Forwards everything (to count connections).
    pub fn pass_through() -> FaultPlan {
        FaultPlan {
            faulty: 0,
            ..FaultPlan::cut_first(u64::MAX)
        }
    }

    pub fn cut_all(cut_after: u64) -> FaultPlan {
        FaultPlan {
            faulty: usize::MAX,
            ..FaultPlan::cut_first(cut_after)
        }
    }
}

#[derive(Default)]
struct ProxyStats {
    accepted: AtomicUsize,
    cut: AtomicUsize,
    bytes: AtomicU64,
}

/// A small TCP proxy on loopback: forwards to `127.0.0.1:<upstream>` and
/// cuts connections as its plan says. Bounded in connections and time; it
/// stops by itself (and when dropped).
pub struct FaultProxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    stats: Arc<ProxyStats>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    pub fn start(upstream: u16, plan: FaultPlan) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ProxyStats::default());
        let (stop2, stats2) = (stop.clone(), stats.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + plan.lifetime;
            let mut workers: Vec<JoinHandle<()>> = Vec::new();
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((down, _)) => {
                        let n = stats2.accepted.fetch_add(1, Ordering::SeqCst);
                        if n >= plan.max_connections {
                            let _ = down.shutdown(Shutdown::Both);
                            continue;
                        }
                        let faulty = n < plan.faulty;
                        let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                            let _ = down.shutdown(Shutdown::Both);
                            continue;
                        };
                        workers.push(spawn_connection(
                            down,
                            up,
                            faulty,
                            plan.clone(),
                            deadline,
                            stop2.clone(),
                            stats2.clone(),
                        ));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            stop2.store(true, Ordering::SeqCst);
            for w in workers {
                let _ = w.join();
            }
        });
        FaultProxy {
            port,
            stop,
            stats,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    /// Connections cut so far.
    pub fn cut(&self) -> usize {
        self.stats.cut.load(Ordering::SeqCst)
    }

    pub fn bytes(&self) -> u64 {
        self.stats.bytes.load(Ordering::SeqCst)
    }

    /// `DSG_SSH_COMMAND` that reaches the test sshd through this proxy,
    /// still checking its host key against the entry for the real port.
    pub fn ssh_command(&self, ssh: &Ssh) -> String {
        ssh.command_with(&format!(
            "-o Port={} -o HostKeyAlias=[127.0.0.1]:{}",
            self.port,
            ssh.port()
        ))
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn_connection(
    down: TcpStream,
    up: TcpStream,
    faulty: bool,
    plan: FaultPlan,
    deadline: Instant,
    stop: Arc<AtomicBool>,
    stats: Arc<ProxyStats>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let through = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let pump = |from: TcpStream, to: TcpStream| {
            let (through, cut, stop, stats, plan) = (
                through.clone(),
                cut.clone(),
                stop.clone(),
                stats.clone(),
                plan.clone(),
            );
            std::thread::spawn(move || {
                pump_bytes(
                    from, to, faulty, &plan, deadline, &through, &cut, &stop, &stats,
                )
            })
        };
        let a = pump(down.try_clone().unwrap(), up.try_clone().unwrap());
        let b = pump(up, down);
        let _ = a.join();
        let _ = b.join();
    })
}

#[allow(clippy::too_many_arguments)]
fn pump_bytes(
    mut from: TcpStream,
    mut to: TcpStream,
    faulty: bool,
    plan: &FaultPlan,
    deadline: Instant,
    through: &AtomicU64,
    cut: &AtomicBool,
    stop: &AtomicBool,
    stats: &ProxyStats,
) {
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let close = |a: &TcpStream, b: &TcpStream| {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    };
    loop {
        if cut.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            close(&from, &to);
            return;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => {
                // Half-close: pass the EOF on, keep the other direction.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => {
                close(&from, &to);
                return;
            }
        };
        let mut send = n;
        let mut trip = false;
        if faulty {
            let before = through.fetch_add(n as u64, Ordering::SeqCst);
            if before + n as u64 >= plan.cut_after {
                send = plan.cut_after.saturating_sub(before).min(n as u64) as usize;
                trip = true;
            }
        }
        if send > 0 && to.write_all(&buf[..send]).is_err() {
            close(&from, &to);
            return;
        }
        stats.bytes.fetch_add(send as u64, Ordering::SeqCst);
        if trip {
            if !cut.swap(true, Ordering::SeqCst) {
                stats.cut.fetch_add(1, Ordering::SeqCst);
                // Stall: forward nothing more, then cut.
                let until = Instant::now() + plan.stall;
                while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            close(&from, &to);
            return;
        }
    }
}

// ------------------------------------------------------------------ agent protocol

/// A `dsg agent` child process spoken to directly with the framed protocol
/// (tag `J` + u32 LE length + JSON, `D` data, `E` end).
pub struct AgentProc {
    child: Child,
    w: Option<ChildStdin>,
    r: ChildStdout,
}

pub enum Frame {
    Json(Value),
    Data(Vec<u8>),
    End,
}

impl AgentProc {
    pub fn spawn(repo: &Path) -> AgentProc {
        let mut child = Command::new(dsg_bin())
            .args(["agent", "--repo", repo.to_str().unwrap(), "--type", "xfs"])
            .env_remove("DSG_FAILPOINT")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dsg agent");
        let w = child.stdin.take();
        let r = child.stdout.take().unwrap();
        AgentProc { child, w, r }
    }

    fn frame(&mut self, tag: u8, body: &[u8]) {
        let w = self.w.as_mut().expect("stdin open");
        let mut hdr = vec![tag];
        hdr.extend_from_slice(&(body.len() as u32).to_le_bytes());
        w.write_all(&hdr).unwrap();
        w.write_all(body).unwrap();
    }

    /// Sends one control message.
    pub fn send(&mut self, msg: Value) {
        self.frame(b'J', &serde_json::to_vec(&msg).unwrap());
    }

    /// Sends a data stream (data frames then an end frame).
    pub fn send_data(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(1 << 20) {
            self.frame(b'D', c);
        }
        self.frame(b'E', &[]);
    }

    pub fn flush(&mut self) {
        self.w.as_mut().unwrap().flush().unwrap();
    }

    /// Reads one frame (panics on EOF).
    pub fn read_frame(&mut self) -> Frame {
        let mut hdr = [0u8; 5];
        self.r
            .read_exact(&mut hdr)
            .expect("agent closed its output");
        let len = u32::from_le_bytes(hdr[1..].try_into().unwrap()) as usize;
        assert!(len <= 64 << 20, "frame too large: {len}");
        let mut body = vec![0u8; len];
        self.r.read_exact(&mut body).unwrap();
        match hdr[0] {
            b'J' => Frame::Json(serde_json::from_slice(&body).expect("reply is JSON")),
            b'D' => Frame::Data(body),
            b'E' => Frame::End,
            t => panic!("unknown frame tag {t:#x}"),
        }
    }

    /// Reads one control message (panics on data).
    pub fn recv(&mut self) -> Value {
        match self.read_frame() {
            Frame::Json(v) => v,
            Frame::Data(d) => panic!("expected a reply, got {} data bytes", d.len()),
            Frame::End => panic!("expected a reply, got an end frame"),
        }
    }

    /// Reads a data stream to its end.
    pub fn recv_data(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            match self.read_frame() {
                Frame::Data(d) => out.extend_from_slice(&d),
                Frame::End => return out,
                Frame::Json(v) => panic!("expected data, got {v}"),
            }
        }
    }

    /// `hello` with the current protocol (2); returns the reply.
    pub fn hello(&mut self) -> Value {
        self.send(serde_json::json!({"op": "hello", "protocol": 2, "client_version": "x"}));
        self.flush();
        self.recv()
    }

    /// Closes stdin and waits for the agent to exit (bounded).
    pub fn finish(mut self) {
        drop(self.w.take());
        let start = Instant::now();
        loop {
            if let Some(_st) = self.child.try_wait().unwrap() {
                return;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("dsg agent did not exit after its input closed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Asserts that `reply` is an error reply; returns its message.
#[track_caller]
pub fn expect_err(reply: &Value, what: &str) -> String {
    assert_eq!(
        reply["reply"], "err",
        "{what}: expected an error reply, got {reply}"
    );
    reply["message"].as_str().unwrap_or_default().to_string()
}
