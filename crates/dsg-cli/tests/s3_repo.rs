//! An S3 repository driven through the real `dsg` binary against the
//! loopback SeaweedFS cluster (scripts/setup-services; settings in
//! /var/tmp/dsg-test/s3.env), some through the fault proxy: what only an
//! object store does — errors of the store named clearly with nothing
//! changed, a server without preconditions refused at init, throttling and
//! cut connections retried, a server error mid-sync leaving the repository
//! as it was, a large file in parts, a volume server killed mid-sync.
//! The shared suites (states, crash, conflicts, ...) run on S3 through
//! `world`.

mod s3_support;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dsg_s3::Store;
use s3_support::cluster::{cluster_or_skip, Cluster};
use s3_support::fault_proxy::{FaultProxy, Filter, Rule};
use support::*;

/// The cluster, a project prefix of this test's own, a scratch folder.
struct S3 {
    cluster: Cluster,
    prefix: String,
    tmp: tempfile::TempDir,
}

fn s3_or_skip() -> Option<S3> {
    let cluster = cluster_or_skip()?;
    let tmp = tempfile::tempdir().unwrap();
    make_user_dirs(tmp.path());
    Some(S3 {
        cluster,
        prefix: format!("s3repo/{}", unique("t")),
        tmp,
    })
}

impl S3 {
    fn var(&self, k: &str) -> String {
        self.cluster.var(k)
    }

    fn endpoint(&self) -> String {
        self.cluster.endpoint.clone()
    }

    fn dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// `dsg` in `dir` with the cluster's credentials and the test's user;
    /// `env` set after (it may override them).
    fn cmd(&self, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new(dsg_bin());
        user_env(&mut c, self.tmp.path());
        c.envs(self.cluster.vars())
            .env("DSG_LOCK_TIMEOUT", "20")
            .envs(env.iter().copied())
            .current_dir(dir)
            .args(args);
        c
    }

    fn dsg(&self, dir: &Path, args: &[&str]) -> Output {
        run_bounded(
            self.cmd(dir, args, &[]),
            std::time::Duration::from_secs(300),
        )
    }

    fn init_args(&self, endpoint: &str, bucket: &str, name: &str) -> Vec<String> {
        [
            "init",
            "--no-interactive",
            "--repo-type",
            "s3",
            "--endpoint",
            endpoint,
            "--bucket",
            bucket,
            "--prefix",
            &self.prefix,
            "--repo-name",
            name,
        ]
        .map(String::from)
        .to_vec()
    }

    fn init(&self, dir: &Path, endpoint: &str, name: &str) -> Output {
        let args = self.init_args(endpoint, &self.cluster.bucket, name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.dsg(dir, &args)
    }

    /// The repository `name`'s objects, read past dsg and the proxy.
    fn store(&self, name: &str) -> Store {
        self.cluster.store(&format!("{}/{name}", self.prefix))
    }

    /// Object names of repository `name` (lock excluded: it stays, free).
    fn objects(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .store(name)
            .list("")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k != "lock")
            .collect();
        v.sort();
        v
    }

    fn head(&self, name: &str) -> Option<serde_json::Value> {
        self.store(name)
            .get("HEAD")
            .unwrap()
            .map(|(b, _)| serde_json::from_slice(&b).unwrap())
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let root = self.cluster.store(&self.prefix);
        if let Ok(all) = root.list("") {
            for (k, _) in all {
                let _ = root.delete(&k);
            }
        }
    }
}

fn project(s3: &S3, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let d = s3.dir(name);
    for (p, b) in files {
        write_file(&d, p, b);
    }
    d
}

fn head_id(s3: &S3, name: &str) -> Option<String> {
    s3.head(name)
        .and_then(|h| h["head"]["id"].as_str().map(String::from))
}

#[test]
fn init_sync_clone_and_a_receiving_sync_move_the_bytes_and_the_head() {
    let Some(s3) = s3_or_skip() else { return };
    let big = random_bytes(7, (40 << 20) + 12345);
    let a = project(
        &s3,
        "a",
        &[
            ("input/x.txt", b"x"),
            ("input/d/y.bin", &big),
            ("input/same.txt", b"x"),
        ],
    );
    make_link(&a, "input/l", "x.txt");
    assert_ok(&s3.init(&a, &s3.endpoint(), "p"), "init");
    assert_eq!(head_id(&s3, "p").as_deref(), Some("s1"));
    let objects = s3.objects("p");
    // x.txt and same.txt share one content object; the big file went up
    // in parts and is one object.
    let data: Vec<_> = objects.iter().filter(|k| k.starts_with("data/")).collect();
    assert_eq!(data.len(), 2, "{objects:?}");
    assert!(
        !objects.iter().any(|k| k.starts_with("txs/")),
        "{objects:?}"
    );

    let b = s3.dir("b");
    copy_project_config(&a, &b);
    assert_ok(&s3.dsg(&b, &["clone"]), "clone");
    assert_eq!(std::fs::read(b.join("input/d/y.bin")).unwrap(), big);
    assert_eq!(
        std::fs::read_link(b.join("input/l")).unwrap(),
        Path::new("x.txt")
    );

    write_file(&b, "input/x.txt", b"changed in b");
    remove_path(&b, "input/same.txt");
    assert_ok(&s3.dsg(&b, &["sync", "-m", "from b"]), "sync in b");
    assert_eq!(head_id(&s3, "p").as_deref(), Some("s2"));
    assert_ok(&s3.dsg(&a, &["sync"]), "receiving sync in a");
    assert_eq!(
        std::fs::read(a.join("input/x.txt")).unwrap(),
        b"changed in b"
    );
    assert!(!a.join("input/same.txt").exists());
    let log = s3.dsg(&a, &["log"]);
    assert_ok(&log, "log");
    assert!(stdout(&log).contains("from b"), "{}", show(&log));
    // Every snapshot stays readable: s1's bytes of x.txt are still stored,
    // fetched and verified; a deep validation re-hashes s1's objects.
    let h = s3.head("p").unwrap();
    assert_eq!(h["snapshots"].as_array().unwrap().len(), 2);
    let x_key = format!("data/{:016x}-1", xxhash_rust::xxh3::xxh3_64(b"x"));
    assert!(s3.objects("p").contains(&x_key));
    let out = s3.tmp.path().join("x.s1");
    let o = s3.dsg(
        &a,
        &[
            "snapfetch",
            "--snapshot",
            "s1",
            "input/x.txt",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert_ok(&o, "snapfetch of s1");
    assert_eq!(std::fs::read(&out).unwrap(), b"x");
    assert_ok(
        &s3.dsg(&a, &["validate-snapshot", "--deep", "--snapshot", "s1"]),
        "deep validation of s1",
    );
    // Damage s1's only copy of x.txt's bytes behind dsg's back: the deep
    // validation and the fetch both refuse it.
    s3.store("p")
        .put(&x_key, b"y", &dsg_s3::Cond::None)
        .unwrap();
    let o = s3.dsg(&a, &["validate-snapshot", "--deep", "--snapshot", "s1"]);
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        stdout(&o).contains("x.txt") || stderr(&o).contains("x.txt"),
        "{}",
        show(&o)
    );
    std::fs::remove_file(&out).unwrap();
    let o = s3.dsg(
        &a,
        &[
            "snapfetch",
            "--snapshot",
            "s1",
            "input/x.txt",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success(), "{}", show(&o));
    assert!(!out.exists(), "a damaged version is not written");
}

#[test]
fn store_errors_are_named_and_change_nothing() {
    let Some(s3) = s3_or_skip() else { return };
    let a = project(&s3, "a", &[("input/f", b"1")]);
    // Unreachable endpoint: a port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = s3.init(&a, &format!("http://127.0.0.1:{port}"), "p");
    assert_exit(&o, 1, "init against a dead endpoint");
    assert!(
        stderr(&o).contains(&format!("127.0.0.1:{port}")),
        "{}",
        show(&o)
    );
    assert!(!a.join(".dsg").exists());

    // A missing bucket.
    let nob = format!("no-such-bucket-{}", std::process::id());
    let args = s3.init_args(&s3.endpoint(), &nob, "p");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = s3.cmd(&a, &args, &[]);
    let o = run_bounded(c, std::time::Duration::from_secs(60));
    assert_exit(&o, 1, "init into a missing bucket");
    assert!(
        stderr(&o).contains(&nob) && stderr(&o).contains("does not exist"),
        "{}",
        show(&o)
    );

    // Wrong credentials, after a good init: the sync fails, names the
    // problem, and the repository keeps its head.
    assert_ok(&s3.init(&a, &s3.endpoint(), "p"), "init");
    write_file(&a, "input/f", b"2");
    let c = s3.cmd(
        &a,
        &["sync"],
        &[
            ("AWS_ACCESS_KEY_ID", "WRONG"),
            ("AWS_SECRET_ACCESS_KEY", "wrong"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
        ],
    );
    let o = run_bounded(c, std::time::Duration::from_secs(60));
    assert_exit(&o, 1, "sync with wrong credentials");
    assert!(stderr(&o).contains("credentials"), "{}", show(&o));
    assert_eq!(head_id(&s3, "p").as_deref(), Some("s1"));

    // No credentials at all.
    let mut c = s3.cmd(
        &a,
        &["status"],
        &[("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")],
    );
    c.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    let o = run_bounded(c, std::time::Duration::from_secs(60));
    assert_exit(&o, 1, "status without credentials");
    assert!(stderr(&o).contains("AWS_ACCESS_KEY_ID"), "{}", show(&o));
    assert!(!std::fs::read_to_string(a.join(".dsgconfig.yml"))
        .unwrap()
        .contains(&s3.var("AWS_SECRET_ACCESS_KEY")));
}

#[test]
fn a_server_that_ignores_preconditions_is_refused_at_init() {
    let Some(s3) = s3_or_skip() else { return };
    let up = s3.endpoint();
    let proxy = FaultProxy::start(up.trim_start_matches("http://"));
    proxy.set(Rule::IgnorePreconditions);
    let a = project(&s3, "a", &[("input/f", b"1")]);
    let o = s3.init(&a, &proxy.endpoint(), "p");
    assert_exit(&o, 1, "init on a server without preconditions");
    assert!(stderr(&o).contains("conditional writes"), "{}", show(&o));
    assert!(!a.join(".dsg").exists());
    assert_eq!(s3.head("p"), None, "nothing was committed");
    proxy.set(Rule::Pass);
    assert_ok(&s3.init(&a, &proxy.endpoint(), "p"), "init once it behaves");
}

#[test]
fn throttling_and_cut_connections_are_retried() {
    let Some(s3) = s3_or_skip() else { return };
    let proxy = FaultProxy::start(s3.endpoint().trim_start_matches("http://"));
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("input/f{i:02}"), random_bytes(i, 1000 + i as usize)))
        .collect();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (p.as_str(), &b[..])).collect();
    let a = project(&s3, "a", &refs);
    proxy.set(Rule::SlowDown {
        n: 6,
        filter: Filter::method("PUT"),
    });
    assert_ok(
        &s3.init(&a, &proxy.endpoint(), "p"),
        "init through SlowDown",
    );
    let slowed = proxy
        .requests()
        .iter()
        .filter(|r| r.fault == Some("SlowDown"))
        .count();
    assert_eq!(slowed, 6, "the proxy throttled six PUTs");
    assert_eq!(head_id(&s3, "p").as_deref(), Some("s1"));

    for (i, (p, _)) in files.iter().enumerate().take(10) {
        write_file(&a, p, &random_bytes(100 + i as u64, 3000));
    }
    proxy.set(Rule::CutRequest {
        n: 3,
        after_bytes: 500,
        filter: Filter::path("/data/"),
    });
    assert_ok(&s3.dsg(&a, &["sync"]), "sync through cut uploads");
    assert_eq!(head_id(&s3, "p").as_deref(), Some("s2"));
    let b = s3.dir("b");
    copy_project_config(&a, &b);
    assert_ok(&s3.dsg(&b, &["clone"]), "clone");
    for (p, _) in &files {
        assert_eq!(
            std::fs::read(a.join(p)).unwrap(),
            std::fs::read(b.join(p)).unwrap(),
            "{p}"
        );
    }
}

#[test]
fn a_large_file_survives_cut_and_throttled_parts() {
    let Some(s3) = s3_or_skip() else { return };
    let proxy = FaultProxy::start(s3.endpoint().trim_start_matches("http://"));
    let big = random_bytes(31, (50 << 20) + 777);
    let a = project(&s3, "a", &[("input/big.bin", &big)]);
    // The second part's upload is cut after 1 MiB, twice; then two parts
    // are throttled.
    proxy.set(Rule::CutRequest {
        n: 2,
        after_bytes: 1 << 20,
        filter: Filter::path("partNumber=2"),
    });
    assert_ok(
        &s3.init(&a, &proxy.endpoint(), "p"),
        "init through cut parts",
    );
    let cut = proxy
        .requests()
        .iter()
        .filter(|r| r.fault == Some("CutRequest"))
        .count();
    assert_eq!(cut, 2, "two uploads of part 2 were cut");
    let changed = random_bytes(32, (50 << 20) + 778);
    write_file(&a, "input/big.bin", &changed);
    proxy.set(Rule::SlowDown {
        n: 2,
        filter: Filter::path("partNumber="),
    });
    assert_ok(&s3.dsg(&a, &["sync"]), "sync through throttled parts");
    // Parts are invisible until completed: no unfinished upload is left.
    assert!(s3.store("p").multipart_list("").unwrap().is_empty());
    let b = s3.dir("b");
    copy_project_config(&a, &b);
    assert_ok(&s3.dsg(&b, &["clone"]), "clone");
    assert_eq!(std::fs::read(b.join("input/big.bin")).unwrap(), changed);
}

#[test]
fn a_server_failing_mid_sync_leaves_the_head_and_the_next_sync_cleans_up() {
    let Some(s3) = s3_or_skip() else { return };
    let proxy = FaultProxy::start(s3.endpoint().trim_start_matches("http://"));
    let a = project(&s3, "a", &[("input/f", b"1")]);
    assert_ok(&s3.init(&a, &proxy.endpoint(), "p"), "init");
    let before = s3.objects("p");
    for i in 0..30 {
        write_file(&a, &format!("input/n{i}"), &random_bytes(500 + i, 2000));
    }
    // Every data upload fails (more than the client's retries).
    proxy.set(Rule::ServerError {
        n: 10_000,
        filter: Filter::path("/data/"),
    });
    let o = s3.dsg(&a, &["sync"]);
    assert_exit(&o, 1, "sync against a failing server");
    assert!(stderr(&o).contains("500"), "{}", show(&o));
    assert_eq!(head_id(&s3, "p").as_deref(), Some("s1"));
    // The failed sync removed what it had written (its journal included).
    assert_eq!(s3.objects("p"), before);
    proxy.set(Rule::Pass);
    assert_ok(&s3.dsg(&a, &["sync"]), "sync once the server is well");
    assert_eq!(head_id(&s3, "p").as_deref(), Some("s2"));
    let after = s3.objects("p");
    assert!(!after.iter().any(|k| k.starts_with("txs/")), "{after:?}");
}

#[test]
fn a_volume_server_killed_mid_sync_loses_nothing() {
    let Some(s3) = s3_or_skip() else { return };
    let pidfiles = s3.var("DSG_TEST_S3_VOLUME_PIDFILES");
    let cluster = s3.var("DSG_TEST_S3_CLUSTER");
    let victim = pidfiles.split_whitespace().next().unwrap().to_string();
    let files: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| (format!("input/big{i}"), random_bytes(900 + i, 20 << 20)))
        .chain((0..200).map(|i| (format!("input/s/f{i}"), random_bytes(2000 + i, 700))))
        .collect();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (p.as_str(), &b[..])).collect();
    let a = project(&s3, "a", &refs);
    let endpoint = s3.endpoint();
    let args = s3.init_args(&endpoint, &s3.cluster.bucket, "p");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = s3.cmd(&a, &args, &[]);
    let mut child = c
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill as soon as the first contents are stored: mid-upload.
    let t0 = std::time::Instant::now();
    while s3.store("p").list("data/").unwrap().is_empty() {
        assert!(t0.elapsed().as_secs() < 60, "no upload began");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Mid-sync: most of the 200 MiB are still going up.
    assert!(
        child.try_wait().unwrap().is_none(),
        "init ended before the kill"
    );
    let pid = std::fs::read_to_string(&victim).unwrap();
    let killed = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (o, timed_out) = wait_within(child, std::time::Duration::from_secs(300));
    // Heal the cluster for the tests after this one, whatever happened.
    let healed = Command::new(&cluster).arg("start").output().unwrap();
    assert!(!timed_out, "init hung after a volume server died");
    assert!(healed.status.success(), "{}", show(&healed));
    eprintln!("init with a volume server killed: {}", show(&o));
    if o.status.success() {
        assert_eq!(head_id(&s3, "p").as_deref(), Some("s1"));
    } else {
        // A clean failure: nothing committed.
        assert_eq!(
            s3.head("p")
                .and_then(|h| h["head"].as_str().map(String::from)),
            None
        );
        assert_ok(&s3.init(&a, &endpoint, "p"), "init again after the failure");
    }
    let b = s3.dir("b");
    copy_project_config(&a, &b);
    assert_ok(&s3.dsg(&b, &["clone"]), "clone");
    for (p, bytes) in &files {
        assert_eq!(&std::fs::read(b.join(p)).unwrap(), bytes, "{p}");
    }
}

/// A large file whose upload is resumed: 80 MiB and a bit, six parts.
const BIG: usize = (80 << 20) + 4321;
const BIG_PARTS: usize = 6;

fn data_key_of(bytes: &[u8]) -> String {
    format!(
        "data/{:016x}-{}",
        xxhash_rust::xxh3::xxh3_64(bytes),
        bytes.len()
    )
}

/// Part uploads the store accepted through the proxy, among its requests
/// from `from` on.
fn parts_sent(proxy: &FaultProxy, from: usize) -> usize {
    proxy.requests()[from..]
        .iter()
        .filter(|r| r.method == "PUT" && r.target.contains("partNumber=") && r.status == Some(200))
        .count()
}

/// The unfinished uploads of repository `name`, each with the numbers of
/// the parts it holds.
fn unfinished(s3: &S3, name: &str) -> Vec<(String, String, Vec<u16>)> {
    let store = s3.store(name);
    store
        .multipart_list("")
        .unwrap()
        .into_iter()
        .map(|(k, id)| {
            let mut parts: Vec<u16> = store
                .multipart_parts(&k, &id)
                .unwrap()
                .unwrap_or_default()
                .iter()
                .map(|p| p.number)
                .collect();
            parts.dedup();
            (k, id, parts)
        })
        .collect()
}

fn lock_is_free(s3: &S3, name: &str) -> bool {
    let (b, _) = s3.store(name).get("lock").unwrap().expect("a lock");
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    v["free"] == true
}

/// A repository `p` at s1 through `proxy`, a large file added to the
/// project, and a sync that stores two of its parts before the store goes
/// away: it fails (exit 1), HEAD and the objects stay as they were, the
/// lease is released, and the upload is kept with its two parts.
fn cut_after_two_parts(s3: &S3, proxy: &FaultProxy) -> (PathBuf, Vec<u8>) {
    let a = project(s3, "a", &[("input/small", b"s")]);
    assert_ok(&s3.init(&a, &proxy.endpoint(), "p"), "init");
    let before = s3.objects("p");
    let big = random_bytes(77, BIG);
    write_file(&a, "input/big.bin", &big);
    proxy.set(Rule::DownAfter {
        pass: 2,
        filter: Filter::path("partNumber="),
    });
    let c = s3.cmd(&a, &["sync"], &[("DSG_S3_ATTEMPTS", "2")]);
    let o = run_bounded(c, std::time::Duration::from_secs(300));
    assert_exit(&o, 1, "sync with the store gone after two parts");
    assert_eq!(head_id(s3, "p").as_deref(), Some("s1"));
    assert_eq!(s3.objects("p"), before, "nothing visible changed");
    assert!(lock_is_free(s3, "p"), "the failed sync released its lease");
    let ups = unfinished(s3, "p");
    assert_eq!(ups.len(), 1, "{ups:?}");
    assert_eq!(ups[0].0, data_key_of(&big));
    assert_eq!(ups[0].2.len(), 2, "two parts stored: {ups:?}");
    proxy.set(Rule::Pass);
    (a, big)
}

/// Clones repository `p` (past the proxy) and compares the big file.
fn assert_clone_has(s3: &S3, a: &Path, big: &[u8]) {
    let b = s3.dir("b");
    copy_project_config(a, &b);
    assert_ok(&s3.dsg(&b, &["clone"]), "clone");
    assert!(std::fs::read(b.join("input/big.bin")).unwrap() == big);
}

#[test]
fn a_large_upload_cut_off_resumes_where_it_stopped() {
    let Some(s3) = s3_or_skip() else { return };
    let proxy = FaultProxy::start(s3.endpoint().trim_start_matches("http://"));
    let (a, big) = cut_after_two_parts(&s3, &proxy);
    let kept = unfinished(&s3, "p");
    // A read neither takes the lease for it nor aborts it.
    let o = s3.dsg(&a, &["status"]);
    assert_ok(&o, "status");
    assert_eq!(unfinished(&s3, "p"), kept, "a read left the upload");
    let mark = proxy.requests().len();
    assert_ok(&s3.dsg(&a, &["sync"]), "sync once the store is back");
    assert_eq!(head_id(&s3, "p").as_deref(), Some("s2"));
    let sent = parts_sent(&proxy, mark);
    eprintln!("resumed: {sent} of {BIG_PARTS} parts sent");
    assert_eq!(
        sent,
        BIG_PARTS - 2,
        "the two stored parts were not sent again"
    );
    assert!(proxy.requests()[mark..]
        .iter()
        .any(|r| r.method == "GET" && r.target.contains("uploadId=")));
    assert!(unfinished(&s3, "p").is_empty(), "no unfinished upload left");
    assert!(!s3.objects("p").iter().any(|k| k.starts_with("txs/")));
    assert_clone_has(&s3, &a, &big);
}

/// A resumed upload keeps only the parts that hold exactly the bytes read
/// now: parts put into the upload behind dsg's back (other bytes of the
/// right size; a wrong size) are sent again, and the object is right.
#[test]
fn a_resumed_upload_sends_again_a_part_that_differs() {
    let Some(s3) = s3_or_skip() else { return };
    let proxy = FaultProxy::start(s3.endpoint().trim_start_matches("http://"));
    let (a, big) = cut_after_two_parts(&s3, &proxy);
    let (key, id, stored) = unfinished(&s3, "p").remove(0);
    let missing: Vec<u16> = (1..=BIG_PARTS as u16)
        .filter(|n| !stored.contains(n))
        .collect();
    let store = s3.store("p");
    let part = 16 << 20;
    // A middle part with other bytes of the right size, and the last one
    // one byte short.
    let middle = missing[0];
    assert!((middle as usize) < BIG_PARTS);
    store
        .multipart_part(&key, &id, middle, &random_bytes(5, part))
        .unwrap();
    let last = BIG_PARTS as u16;
    if !stored.contains(&last) {
        let tail = &big[(last as usize - 1) * part..];
        store
            .multipart_part(&key, &id, last, &tail[..tail.len() - 1])
            .unwrap();
    }
    let held = unfinished(&s3, "p")[0].2.len();
    assert!(held >= 3, "the upload holds the planted parts");
    let mark = proxy.requests().len();
    assert_ok(&s3.dsg(&a, &["sync"]), "sync once the store is back");
    assert_eq!(head_id(&s3, "p").as_deref(), Some("s2"));
    // Only the two parts the failed sync stored were kept.
    assert_eq!(parts_sent(&proxy, mark), BIG_PARTS - 2);
    assert!(unfinished(&s3, "p").is_empty());
    let (stored_bytes, _) = store.get(&key).unwrap().expect("the object");
    assert!(stored_bytes == big, "the object holds the file's bytes");
    assert_clone_has(&s3, &a, &big);
}

/// A kept upload the next sync does not need (the file changed meanwhile:
/// another content key) is aborted by that sync: nothing is left.
#[test]
fn an_unfinished_upload_no_sync_needs_is_removed_by_the_next_writer() {
    let Some(s3) = s3_or_skip() else { return };
    let proxy = FaultProxy::start(s3.endpoint().trim_start_matches("http://"));
    let (a, _) = cut_after_two_parts(&s3, &proxy);
    let changed = random_bytes(78, BIG);
    write_file(&a, "input/big.bin", &changed);
    let mark = proxy.requests().len();
    assert_ok(&s3.dsg(&a, &["sync"]), "sync of the changed file");
    assert_eq!(parts_sent(&proxy, mark), BIG_PARTS, "nothing to resume");
    assert!(
        unfinished(&s3, "p").is_empty(),
        "the old upload was aborted"
    );
    assert_clone_has(&s3, &a, &changed);
}

/// A sync killed (kill -9) mid-upload leaves its upload, a journal and a
/// held lease; a read after the lease expired cleans the journal and keeps
/// the upload; the next sync resumes it.
#[test]
fn a_large_upload_killed_mid_way_is_resumed_by_the_next_sync() {
    let Some(s3) = s3_or_skip() else { return };
    let proxy = FaultProxy::start(s3.endpoint().trim_start_matches("http://"));
    let a = project(&s3, "a", &[("input/small", b"s")]);
    assert_ok(&s3.init(&a, &proxy.endpoint(), "p"), "init");
    let big = random_bytes(79, BIG);
    write_file(&a, "input/big.bin", &big);
    // Two parts go through; the rest is retried for ~16 s: the sync is
    // mid-upload, for sure, when it is killed.
    proxy.set(Rule::DownAfter {
        pass: 2,
        filter: Filter::path("partNumber="),
    });
    let mut child = s3
        .cmd(&a, &["sync"], &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while unfinished(&s3, "p").first().is_none_or(|u| u.2.len() < 2) {
        assert!(t0.elapsed().as_secs() < 120, "no two parts stored");
        assert!(child.try_wait().unwrap().is_none(), "the sync ended");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    proxy.set(Rule::Pass);
    assert_eq!(head_id(&s3, "p").as_deref(), Some("s1"));
    assert!(!lock_is_free(&s3, "p"), "the killed sync held the lease");
    let kept = unfinished(&s3, "p");
    assert_eq!(kept.len(), 1);
    assert!(s3.objects("p").iter().any(|k| k.starts_with("txs/")));
    // Past the lease: a read recovers (the journal goes), the upload stays.
    std::thread::sleep(std::time::Duration::from_secs(
        s3_support::cluster::LEASE_SECS + 2,
    ));
    assert_ok(&s3.dsg(&a, &["status"]), "status after the kill");
    assert!(
        !s3.objects("p").iter().any(|k| k.starts_with("txs/")),
        "the read recovered: {:?}",
        s3.objects("p")
    );
    assert!(lock_is_free(&s3, "p"));
    assert_eq!(unfinished(&s3, "p"), kept, "the read kept the upload");
    let mark = proxy.requests().len();
    assert_ok(&s3.dsg(&a, &["sync"]), "sync after the kill");
    assert_eq!(head_id(&s3, "p").as_deref(), Some("s2"));
    let sent = parts_sent(&proxy, mark);
    eprintln!("resumed after kill -9: {sent} of {BIG_PARTS} parts sent");
    assert_eq!(sent, BIG_PARTS - 2);
    assert!(unfinished(&s3, "p").is_empty());
    assert_clone_has(&s3, &a, &big);
}

/// The `Range` requests (`(start, len)`) of the GETs of content objects
/// among `seen`, and how many GETs of them had no range.
fn data_gets(seen: &[s3_support::fault_proxy::Seen]) -> (Vec<(u64, u64)>, usize) {
    let gets = seen
        .iter()
        .filter(|r| r.method == "GET" && r.target.contains("/data/"));
    let (mut ranges, mut whole) = (Vec::new(), 0);
    for r in gets {
        match r.range.as_deref().and_then(|h| h.strip_prefix("bytes=")) {
            Some(span) => {
                let (a, b) = span.split_once('-').unwrap();
                let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
                ranges.push((a, b - a + 1));
            }
            None => whole += 1,
        }
    }
    (ranges, whole)
}

/// The range size of large downloads (`dsg_repo`'s s3 `download::RANGE`).
const RANGE: u64 = 8 << 20;

#[test]
fn a_large_file_is_cloned_through_ranged_gets_byte_for_byte() {
    let Some(s3) = s3_or_skip() else { return };
    let proxy = FaultProxy::start(s3.endpoint().trim_start_matches("http://"));
    let size = (100 << 20) + 777;
    let big = random_bytes(41, size);
    let a = project(&s3, "a", &[("input/big.bin", &big), ("input/s", b"small")]);
    assert_ok(&s3.init(&a, &proxy.endpoint(), "p"), "init");
    let before = proxy.requests().len();
    let b = s3.dir("b");
    copy_project_config(&a, &b);
    assert_ok(&s3.dsg(&b, &["clone"]), "clone");
    assert!(std::fs::read(b.join("input/big.bin")).unwrap() == big);
    assert_eq!(std::fs::read(b.join("input/s")).unwrap(), b"small");
    let (mut ranges, whole) = data_gets(&proxy.requests()[before..]);
    ranges.sort();
    // The small file in one GET; the large one in ranges that tile it.
    assert_eq!(whole, 1, "{ranges:?}");
    let want: Vec<(u64, u64)> = (0..size as u64)
        .step_by(RANGE as usize)
        .map(|a| (a, RANGE.min(size as u64 - a)))
        .collect();
    assert_eq!(ranges, want);
}

#[test]
fn a_cut_range_is_asked_again_for_its_rest_not_the_whole_object() {
    let Some(s3) = s3_or_skip() else { return };
    let proxy = FaultProxy::start(s3.endpoint().trim_start_matches("http://"));
    let size = (60 << 20) + 5;
    let big = random_bytes(42, size);
    let a = project(&s3, "a", &[("input/big.bin", &big)]);
    assert_ok(&s3.init(&a, &proxy.endpoint(), "p"), "init");
    for cuts in [1usize, 2] {
        let before = proxy.requests().len();
        proxy.set(Rule::CutResponse {
            n: cuts,
            after_bytes: 1 << 20,
            filter: Filter {
                method: Some("GET"),
                path_contains: Some("/data/".into()),
            },
        });
        let b = s3.dir(&format!("b{cuts}"));
        copy_project_config(&a, &b);
        assert_ok(&s3.dsg(&b, &["clone"]), "clone through cut ranges");
        assert!(std::fs::read(b.join("input/big.bin")).unwrap() == big);
        let seen = &proxy.requests()[before..];
        let cut = seen.iter().filter(|r| r.fault == Some("CutResponse"));
        assert_eq!(cut.count(), cuts);
        let (ranges, whole) = data_gets(seen);
        assert_eq!(whole, 0, "never the whole object: {ranges:?}");
        let tiles = (size as u64).div_ceil(RANGE) as usize;
        assert_eq!(ranges.len(), tiles + cuts, "one retry per cut: {ranges:?}");
        assert!(ranges.iter().all(|(_, len)| *len <= RANGE), "{ranges:?}");
        // Every tile once, and each retry asks for the rest of a tile only:
        // from past the tile's start (what the cut answer delivered is
        // kept) to the tile's end.
        let tiles: Vec<(u64, u64)> = (0..size as u64)
            .step_by(RANGE as usize)
            .map(|a| (a, RANGE.min(size as u64 - a)))
            .collect();
        let (firsts, retries): (Vec<_>, Vec<_>) = ranges.iter().partition(|(a, _)| a % RANGE == 0);
        let mut firsts: Vec<(u64, u64)> = firsts.into_iter().copied().collect();
        firsts.sort();
        assert_eq!(firsts, tiles, "{ranges:?}");
        assert_eq!(retries.len(), cuts, "{ranges:?}");
        for (a, len) in retries {
            let tile = a - a % RANGE;
            assert!(*a > tile, "{ranges:?}");
            assert_eq!(a + len, (tile + RANGE).min(size as u64), "{ranges:?}");
        }
        proxy.set(Rule::Pass);
    }
}

#[test]
fn a_store_failing_every_download_fails_the_clone_and_leaves_no_partial_file() {
    let Some(s3) = s3_or_skip() else { return };
    let proxy = FaultProxy::start(s3.endpoint().trim_start_matches("http://"));
    let big = random_bytes(43, (40 << 20) + 3);
    let a = project(&s3, "a", &[("input/big.bin", &big)]);
    assert_ok(&s3.init(&a, &proxy.endpoint(), "p"), "init");
    proxy.set(Rule::ServerError {
        n: 100_000,
        filter: Filter {
            method: Some("GET"),
            path_contains: Some("/data/".into()),
        },
    });
    let b = s3.dir("b");
    copy_project_config(&a, &b);
    let c = s3.cmd(&b, &["clone"], &[("DSG_S3_ATTEMPTS", "2")]);
    let o = run_bounded(c, std::time::Duration::from_secs(300));
    assert_exit(&o, 1, "clone from a store failing every GET");
    assert!(
        stderr(&o).contains("500"),
        "the store's error: {}",
        show(&o)
    );
    assert!(
        proxy
            .requests()
            .iter()
            .any(|r| r.fault == Some("InternalError")),
        "the downloads were tried"
    );
    assert!(!b.join("input/big.bin").exists());
    // No downloaded bytes anywhere in the tree, staging included.
    let mut stack = vec![b.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else {
                assert!(md.len() < 1 << 20, "{} left behind", e.path().display());
            }
        }
    }
    proxy.set(Rule::Pass);
    assert_ok(&s3.dsg(&b, &["clone"]), "clone once the store is well");
    assert!(std::fs::read(b.join("input/big.bin")).unwrap() == big);
}

/// `list-repos --endpoint --bucket --prefix`: the repositories under the
/// prefix (a folder without `HEAD` is none), each with its head snapshot,
/// file count and size as its manifest records them; one whose `HEAD` is
/// damaged is listed as an error beside the others; nothing is written.
#[test]
fn list_repos_lists_the_repositories_under_a_prefix() {
    let Some(s3) = s3_or_skip() else { return };
    let a = project(&s3, "a", &[("input/x.txt", b"xx"), ("input/y.txt", b"yyy")]);
    assert_ok(&s3.init(&a, &s3.endpoint(), "alpha"), "init alpha");
    write_file(&a, "input/z.txt", b"zzzz");
    assert_ok(&s3.dsg(&a, &["sync"]), "sync alpha");
    let b = project(&s3, "b", &[("input/only.txt", b"1")]);
    assert_ok(&s3.init(&b, &s3.endpoint(), "beta"), "init beta");
    // Neither a repository nor listed.
    s3.store("notarepo")
        .put("stray.txt", b"x", &dsg_s3::Cond::None)
        .unwrap();
    let endpoint = s3.endpoint();
    let bucket = s3.cluster.bucket.clone();
    let list = |json: bool| {
        let mut args = vec![
            "list-repos",
            "--endpoint",
            &endpoint,
            "--bucket",
            &bucket,
            "--prefix",
            &s3.prefix,
        ];
        if json {
            args.push("--json");
        }
        let o = s3.dsg(&s3.dir("lister"), &args);
        assert_ok(&o, "list-repos");
        o
    };
    let before: Vec<_> = ["alpha", "beta", "notarepo"]
        .iter()
        .map(|n| s3.store(n).list("").unwrap())
        .collect();
    let v: serde_json::Value = serde_json::from_slice(&list(true).stdout).unwrap();
    let repos = v["result"]["repositories"].as_array().unwrap();
    let names: Vec<&str> = repos.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "beta"], "{v}");
    let (alpha, beta) = (&repos[0], &repos[1]);
    assert_eq!(alpha["type"], "s3");
    assert_eq!(alpha["status"], "active");
    assert_eq!(alpha["snapshot_id"], "s2");
    assert_eq!(alpha["file_count"], 3);
    assert_eq!(alpha["size"], 2 + 3 + 4);
    assert_eq!(beta["snapshot_id"], "s1");
    assert_eq!(beta["file_count"], 1);
    let text = stdout(&list(false));
    assert!(
        text.contains(&format!("s3://{bucket}/{}", s3.prefix)) && text.contains("alpha"),
        "{text}"
    );
    // A damaged HEAD: an error for that one, the other still listed.
    s3.store("beta")
        .put("HEAD", b"{not json", &dsg_s3::Cond::None)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&list(true).stdout).unwrap();
    let repos = v["result"]["repositories"].as_array().unwrap();
    assert_eq!(repos[0]["status"], "active");
    assert_eq!(repos[1]["status"], "error", "{v}");
    assert!(repos[1]["error"].as_str().unwrap().contains("HEAD"), "{v}");
    let after: Vec<_> = ["alpha", "beta", "notarepo"]
        .iter()
        .map(|n| s3.store(n).list("").unwrap())
        .collect();
    assert_eq!(before[0], after[0], "alpha unchanged");
    assert_eq!(before[2], after[2], "notarepo unchanged");
    assert_eq!(
        before[1].iter().map(|(k, _)| k).collect::<Vec<_>>(),
        after[1].iter().map(|(k, _)| k).collect::<Vec<_>>(),
        "beta: no object added or removed"
    );
    // Flags of the two kinds do not mix.
    let o = s3.dsg(
        &s3.dir("lister"),
        &[
            "list-repos",
            "--endpoint",
            &endpoint,
            "--bucket",
            &bucket,
            "--host",
            "h",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
}
