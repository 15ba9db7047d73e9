//! Shared helpers for the `ssh_*` integration tests: the real `dsg` binary
//! talking to a real sshd on loopback (started by `scripts/setup-services`,
//! which exports `DSG_TEST_SSH_CONFIG` and `DSG_TEST_SSH_HOST`), a world of
//! clients plus one repository parameterised by transport, tree listings to
//! compare effects on disk, a bounded fault proxy (std::net only) and a
//! driver for the agent's framed protocol.
//!
//! Why the `ssh_*` suites keep this world instead of `world::World`
//! (`Kind::Ssh` there is the same XFS repository behind the same sshd, and
//! `Ssh`, `ssh_or_skip` and the fault proxy here are what `world` and
//! `zfs_ssh.rs` use):
//! - every command runs in a clean environment (`env_clear`: only PATH and
//!   the isolated user config), with `DSG_LOCK_TIMEOUT=20` and a 90 s
//!   bound; `world::World` inherits the test's environment and runs xfs
//!   commands unbounded. Moving the suites over would change the
//!   conditions their checks run under.
//! - a missing XFS mount falls back to a temp dir even under CI, where
//!   `world` fails;
//! - its `data_tree` / `state_listing` are other listings under the same
//!   names as `support`'s (which `world` re-exports);
//! - `world/mod.rs` includes this module as its child, so building this
//!   world on `world::World` would make it depend on its parent and move
//!   every `ssh_*` crate (and `ssh_paths`' `common`) into `world`'s module
//!   tree.
//!
//! What a wrapper would save (the fields, Drop, `host`, `init_args`) is
//! small next to what it would have to override.
//!
//! Builds on `support` (declare `mod support;` in the test crate too) and
//! re-exports it, except that here `data_tree` and `state_listing` are the
//! ssh tests' own listings (`support::visible_files` and
//! `support::state_listing_nested`).
#![allow(dead_code)]

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

// Not every ssh test crate uses both.
#[allow(unused_imports)]
pub use super::support::tree::{state_listing_nested as state_listing, visible_files as data_tree};
pub use super::support::*;

// ------------------------------------------------------------------ env

/// The test sshd, as `scripts/setup-services` describes it.
#[derive(Clone, Debug)]
pub struct Ssh {
    /// The ssh client config (`ssh -F <config> <host>`).
    pub config: PathBuf,
    /// The Host alias in it (`dsgtest`).
    pub host: String,
}

impl Ssh {
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

/// `client`, and through it `write`, `link`, `remove`, `read` and
/// `prepare_clone`.
impl Clients for World {
    fn client(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

impl World {
    /// `ssh` must be given for `Transport::Ssh`.
    pub fn new(prefix: &str, transport: Transport, ssh: Option<&Ssh>) -> World {
        assert!(transport == Transport::Local || ssh.is_some());
        // Unlike `sync_support`, a missing XFS mount is not a failure here.
        let (repo_parent, parent_guard) = match xfs_repo_parent(prefix) {
            Some(p) => (p, None),
            None => temp_repo_parent(&format!("dsg-ssh-repo-{prefix}-")),
        };
        let tmp = tempfile::Builder::new()
            .prefix(&format!("dsg-ssh-{prefix}-"))
            .tempdir()
            .unwrap();
        make_user_dirs(tmp.path());
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
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        user_env(&mut c, self.tmp.path())
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
        assert_ok(&o, &format!("[{}] dsg {args:?} in {name}", self.label()));
        o
    }

    /// `dsg init` arguments for this world's transport (over ssh with
    /// `--remote-dsg` = the dsg under test).
    pub fn init_args(&self) -> Vec<String> {
        let mut v = init_args_for(&self.host(), &self.repo_parent, &self.repo_name, "xfs");
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

    #[track_caller]
    pub fn clone_client(&self, from: &str, to: &str) -> Output {
        self.prepare_clone(from, to);
        self.ok(to, &["clone"])
    }

    /// `status --json` of client `name` (must succeed).
    pub fn status_json(&self, name: &str) -> Value {
        json_of(&self.ok(name, &["status", "--json"]))
    }

    /// The repository manifest's snapshot id (read on the server's disk).
    pub fn repo_snapshot(&self) -> String {
        snapshot_id(&read_json(&self.repo().join(".dsg/last-sync.json")))
    }

    /// The client's cache manifest's snapshot id.
    pub fn client_snapshot(&self, name: &str) -> String {
        snapshot_id(&read_json(&self.client(name).join(".dsg/last-sync.json")))
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

/// `(path, state, action)` rows of a `status --json` / `sync --json` doc.
pub fn rows(v: &Value) -> Vec<(String, String, String)> {
    rows_of(v, "files")
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

    /// `hello` with the current protocol; returns the reply.
    pub fn hello(&mut self) -> Value {
        self.send(serde_json::json!({
            "op": "hello",
            "protocol": dsg_repo::protocol::PROTOCOL_VERSION,
            "client_version": "x"
        }));
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
