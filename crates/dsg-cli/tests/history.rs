//! History and integrity: `log`, `blame`, `diff`, `validate-file`,
//! `validate-snapshot`, `validate-chain`, on every repository kind.
//!
//! Every JSON answer is checked field by field against the files on disk
//! (the index, the head manifest, the archives decompressed here with
//! lz4_flex, and the bytes the test wrote), never against another answer of
//! the command. A client that lacks archives fetches them from the
//! repository and keeps them byte for byte; a tampered archive and a broken
//! link are each found (exit 1, naming the snapshot and the file); the
//! original's fixture validates without its quirks counted as tampering.

mod world;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use world::*;

const A: &str = "task/input/a.csv";
const B: &str = "task/input/b.csv";
const C: &str = "task/output/c.txt";

fn decompress(p: &Path) -> Vec<u8> {
    let raw = fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut lz4_flex::frame::FrameDecoder::new(&raw[..]), &mut out)
        .unwrap();
    out
}

fn compress(json: &[u8]) -> Vec<u8> {
    let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
    std::io::Write::write_all(&mut enc, json).unwrap();
    enc.finish().unwrap()
}

/// Snapshot `id`'s manifest as it is on disk under `root`: the head's
/// file, or its archive.
fn manifest_on_disk(root: &Path, id: &str) -> Value {
    let head = read_json(&root.join(".dsg/last-sync.json"));
    if snapshot_id(&head) == id {
        return head;
    }
    serde_json::from_slice(&decompress(
        &root.join(format!(".dsg/archive/{id}-sync.json.lz4")),
    ))
    .unwrap()
}

fn total_bytes(m: &Value) -> u64 {
    m["entries"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|e| e["filesize"].as_u64())
        .sum()
}

/// The history every kind builds: s1 (init) .. s4, with a file added,
/// modified, deleted and re-added. Returns the content hash of `A` after
/// each snapshot, computed from the files the test wrote.
fn build(w: &World) -> Vec<String> {
    let mut hashes = Vec::new();
    w.write("A", A, "a v1\n");
    w.write("A", C, "c v1\n");
    w.init("A");
    hashes.push(xxh3_hex(&w.client("A").join(A)));
    w.write("A", A, "a v2, longer\n");
    w.write("A", B, "b v1\n");
    w.ok("A", &["sync", "-m", "second: a v2, b"]);
    hashes.push(xxh3_hex(&w.client("A").join(A)));
    w.remove("A", A);
    w.ok("A", &["sync", "-m", "third: no a"]);
    hashes.push(String::new());
    w.write("A", A, "a is back\n");
    w.write("A", C, "c v2\n");
    w.ok("A", &["sync", "-m", "fourth: a again"]);
    hashes.push(xxh3_hex(&w.client("A").join(A)));
    hashes
}

/// `log --json` against the index and the manifests on disk under `root`.
#[track_caller]
fn check_log(w: &World, client: &str, root: &Path, n: usize) {
    let v = json_of(&w.ok(client, &["log", "--json", "-n", "0"]));
    let snaps = v["snapshots"].as_array().unwrap();
    let index = read_json(&root.join(".dsg/sync-messages.json"));
    let ids: Vec<&str> = snaps
        .iter()
        .map(|s| s["snapshot_id"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (1..=n).rev().map(|i| format!("s{i}")).collect();
    assert_eq!(ids, want, "newest first");
    for s in snaps {
        let id = s["snapshot_id"].as_str().unwrap();
        let rec = &index["snapshots"][id];
        let m = manifest_on_disk(root, id);
        for (field, disk) in [
            ("created_at", &rec["created_at"]),
            ("created_by", &rec["created_by"]),
            ("message", &rec["snapshot_message"]),
            ("snapshot_hash", &rec["snapshot_hash"]),
            ("entry_count", &rec["entry_count"]),
        ] {
            assert_eq!(&s[field], disk, "{id}.{field}");
        }
        assert_eq!(s["snapshot_hash"], m["metadata"]["snapshot_hash"], "{id}");
        assert_eq!(
            s["entry_count"].as_u64().unwrap() as usize,
            m["entries"].as_object().unwrap().len(),
            "{id}: entry_count vs the manifest's entries"
        );
        assert_eq!(
            s["total_bytes"].as_u64(),
            Some(total_bytes(&m)),
            "{id}.total_bytes"
        );
    }
    let limited = json_of(&w.ok(client, &["log", "--json", "-n", "2"]));
    assert_eq!(limited["snapshots"].as_array().unwrap().len(), 2.min(n));
}

fn history_on_every_kind(kind: Kind) {
    let w = world_or_skip!(kind, "hist");
    let hashes = build(&w);
    let a = w.client("A");
    check_log(&w, "A", &a, 4);
    // The messages are the ones given, newest first.
    let v = json_of(&w.ok("A", &["log", "--json", "-n", "0"]));
    assert_eq!(v["snapshots"][0]["message"], "fourth: a again");
    assert_eq!(v["snapshots"][2]["message"], "second: a v2, b");

    // blame: add, modify, delete, add again, each with the hash the file had.
    let v = json_of(&w.ok("A", &["blame", A, "--json"]));
    let ev: Vec<(String, String, Value)> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["snapshot_id"].as_str().unwrap().to_string(),
                e["event"].as_str().unwrap().to_string(),
                e["hash"].clone(),
            )
        })
        .collect();
    assert_eq!(
        ev,
        vec![
            ("s1".into(), "add".into(), Value::from(hashes[0].clone())),
            ("s2".into(), "modify".into(), Value::from(hashes[1].clone())),
            ("s3".into(), "delete".into(), Value::Null),
            ("s4".into(), "add".into(), Value::from(hashes[3].clone())),
        ]
    );
    let index = read_json(&a.join(".dsg/sync-messages.json"));
    for e in v["events"].as_array().unwrap() {
        let rec = &index["snapshots"][e["snapshot_id"].as_str().unwrap()];
        assert_eq!(e["created_at"], rec["created_at"]);
        assert_eq!(e["created_by"], rec["created_by"]);
        assert_eq!(e["message"], rec["snapshot_message"]);
    }
    // From a subdirectory the path is relative to it.
    let mut c = w.command("A", &["blame", "a.csv", "--json"]);
    c.current_dir(a.join("task/input"));
    let o = c.output().unwrap();
    assert_ok(&o, "blame from a subdirectory");
    assert_eq!(json_of(&o)["events"].as_array().unwrap().len(), 4);

    // diff between snapshots, against the manifests on disk.
    let v = json_of(&w.ok("A", &["diff", "s1", "s4", "--json"]));
    assert_eq!(
        (v["from"].as_str(), v["to"].as_str()),
        (Some("s1"), Some("s4"))
    );
    let (m1, m4) = (manifest_on_disk(&a, "s1"), manifest_on_disk(&a, "s4"));
    let files: BTreeMap<String, (String, Value, Value)> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                (
                    f["change"].as_str().unwrap().to_string(),
                    f["size_before"].clone(),
                    f["size_after"].clone(),
                ),
            )
        })
        .collect();
    let size = |m: &Value, p: &str| m["entries"][p]["filesize"].clone();
    let mut want = BTreeMap::new();
    want.insert(
        A.to_string(),
        ("modified".to_string(), size(&m1, A), size(&m4, A)),
    );
    want.insert(B.to_string(), ("added".into(), Value::Null, size(&m4, B)));
    want.insert(
        C.to_string(),
        ("modified".into(), size(&m1, C), size(&m4, C)),
    );
    assert_eq!(files, want);
    assert_eq!(
        size(&m4, A),
        Value::from(fs::metadata(a.join(A)).unwrap().len())
    );
    // A path filter, after `--`.
    let v = json_of(&w.ok("A", &["diff", "s1", "s4", "--json", "--", "task/output"]));
    assert_eq!(v["files"].as_array().unwrap().len(), 1);
    assert_eq!(v["files"][0]["path"], C);

    // diff with no snapshot: the last sync against the working tree.
    let v = json_of(&w.ok("A", &["diff", "--json"]));
    assert_eq!(v["files"], Value::Array(vec![]), "clean after sync");
    w.write("A", B, "b edited locally, longer\n");
    w.remove("A", C);
    w.write("A", "task/input/new.csv", "n\n");
    let v = json_of(&w.ok("A", &["diff", "--json"]));
    assert_eq!(
        (v["from"].as_str(), v["to"].as_str()),
        (Some("s4"), Some("working-tree"))
    );
    let got: Vec<(String, String, Value, Value)> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().into(),
                f["change"].as_str().unwrap().into(),
                f["size_before"].clone(),
                f["size_after"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (B.into(), "modified".into(), size(&m4, B), Value::from(25)),
            (
                "task/input/new.csv".into(),
                "added".into(),
                Value::Null,
                Value::from(2)
            ),
            (C.into(), "deleted".into(), size(&m4, C), Value::Null),
        ]
    );

    // validate-file: the unchanged file passes; the edited one fails
    // naming it; the chain and each snapshot verify.
    w.ok("A", &["validate-file", A]);
    let o = w.run("A", &["validate-file", B, "--json"]);
    assert_exit(&o, 1, "validate-file of an edited file");
    let v = json_of(&o);
    assert_eq!(v["result"]["path"], B);
    assert_eq!(v["result"]["ok"], false);
    assert_eq!(v["result"]["expected"], m4["entries"][B]["hash"]);
    assert_eq!(
        v["result"]["actual"].as_str().unwrap(),
        xxh3_hex(&a.join(B))
    );
    let v = json_of(&w.ok("A", &["validate-chain", "--json"]));
    assert_eq!(v["verified"], serde_json::json!(["s4", "s3", "s2", "s1"]));
    for s in ["s1", "s3", "head"] {
        let v = json_of(&w.ok("A", &["validate-snapshot", "--snapshot", s, "--json"]));
        assert_eq!(v["snapshot"]["verdict"], "verified", "{s}");
    }

    // A fresh clone reads all of it.
    w.clone_client("A", "B");
    let b = w.client("B");
    check_log(&w, "B", &b, 4);
    assert_eq!(
        json_of(&w.ok("B", &["blame", A, "--json"]))["events"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    w.ok("B", &["validate-chain"]);

    // A client without archives (an old clone) fetches them when a history
    // command needs them, and keeps exactly the repository's bytes.
    fs::remove_dir_all(b.join(".dsg/archive")).unwrap();
    let _ = fs::remove_file(b.join(".dsg/history-sizes.json"));
    check_log(&w, "B", &b, 4);
    for i in 1..=3 {
        let name = format!(".dsg/archive/s{i}-sync.json.lz4");
        assert_eq!(
            fs::read(b.join(&name)).unwrap(),
            fs::read(w.repo().join(&name)).unwrap(),
            "{name} fetched byte for byte"
        );
    }
    fs::remove_dir_all(b.join(".dsg/archive")).unwrap();
    let v = json_of(&w.ok("B", &["blame", A, "--json"]));
    assert_eq!(v["events"].as_array().unwrap().len(), 4);
    fs::remove_dir_all(b.join(".dsg/archive")).unwrap();
    let v = json_of(&w.ok("B", &["validate-chain", "--json"]));
    assert_eq!(v["verified"], serde_json::json!(["s4", "s3", "s2", "s1"]));
}

/// A tampered archive (entries changed, hash left) and a broken link (a
/// message changed, so the chain hash no longer recomputes) each exit 1
/// naming the snapshot and the file; so does a tampered archive that a
/// client fetches from the repository, which it then does not keep.
fn tampering_is_found(kind: Kind) {
    let w = world_or_skip!(kind, "hist-tamper");
    build(&w);
    let a = w.client("A");
    let s2 = a.join(".dsg/archive/s2-sync.json.lz4");
    let good = fs::read(&s2).unwrap();
    let json = String::from_utf8(decompress(&s2)).unwrap();

    // One entry's size changed: the entries no longer hash as recorded.
    let old_size = format!("\"filesize\": {}", "a v2, longer\n".len());
    assert!(json.contains(&old_size), "{json}");
    fs::write(
        &s2,
        compress(json.replacen(&old_size, "\"filesize\": 999", 1).as_bytes()),
    )
    .unwrap();
    for args in [
        vec!["validate-chain", "--json"],
        vec!["validate-snapshot", "--snapshot", "s2", "--json"],
    ] {
        let o = w.run("A", &args);
        assert_exit(&o, 1, &format!("{args:?} on a tampered archive"));
        let v = json_of(&o);
        assert_eq!(v["status"], "error");
        let text = v.to_string();
        assert!(text.contains("entries_hash mismatch"), "{text}");
        let fail = find_check(&v, "s2");
        assert_eq!(fail["verdict"], "failed");
        assert_eq!(fail["path"].as_str(), Some(s2.to_str().unwrap()));
        let err = stderr(&o);
        assert!(
            err.contains("s2") && err.contains("s2-sync.json.lz4"),
            "{err}"
        );
    }
    // The other snapshots still verify.
    let v = json_of(&w.run("A", &["validate-chain", "--json"]));
    assert_eq!(v["failed"], serde_json::json!(["s2"]));
    assert_eq!(v["verified"], serde_json::json!(["s4", "s3", "s1"]));

    // A broken link: s3's message changed; its entries still verify, but
    // its chain hash no longer recomputes from s2's.
    fs::write(&s2, &good).unwrap();
    w.ok("A", &["validate-chain"]);
    let s3 = a.join(".dsg/archive/s3-sync.json.lz4");
    let json = String::from_utf8(decompress(&s3)).unwrap();
    assert!(json.contains("third: no a"));
    fs::write(
        &s3,
        compress(json.replace("third: no a", "third: forged").as_bytes()),
    )
    .unwrap();
    let o = w.run("A", &["validate-chain", "--json"]);
    assert_exit(&o, 1, "validate-chain on a broken link");
    let v = json_of(&o);
    assert_eq!(v["failed"], serde_json::json!(["s3"]));
    let fail = find_check(&v, "s3");
    assert_eq!(fail["path"].as_str(), Some(s3.to_str().unwrap()));
    assert!(
        fail["details"].to_string().contains("does not recompute"),
        "{fail}"
    );

    // The repository's archive tampered, and a client that must fetch it:
    // found, named as the repository's, and not kept.
    let r2 = w.repo().join(".dsg/archive/s2-sync.json.lz4");
    let json = String::from_utf8(decompress(&r2)).unwrap();
    w.clone_client("A", "B");
    let b = w.client("B");
    fs::remove_dir_all(b.join(".dsg/archive")).unwrap();
    tamper_repo(
        &w,
        &r2,
        compress(json.replacen(&old_size, "\"filesize\": 999", 1).as_bytes()),
    );
    let o = w.run("B", &["validate-chain", "--json"]);
    assert_exit(&o, 1, "validate-chain fetching a tampered archive");
    let v = json_of(&o);
    assert_eq!(v["failed"], serde_json::json!(["s2"]));
    assert_eq!(
        find_check(&v, "s2")["path"],
        "repository:.dsg/archive/s2-sync.json.lz4"
    );
    assert!(
        !b.join(".dsg/archive/s2-sync.json.lz4").exists(),
        "a bad archive is not kept"
    );
    assert!(
        b.join(".dsg/archive/s1-sync.json.lz4").exists(),
        "good ones are"
    );
}

/// Writes a repository file (on zfs the dataset is writable by the test
/// user like any directory; on s3, `p` in the view names the object to
/// overwrite: an archive is its snapshot's manifest object).
fn tamper_repo(w: &World, p: &Path, bytes: Vec<u8>) {
    if w.kind == Kind::S3 {
        let name = p.file_name().unwrap().to_str().unwrap();
        let id = name.strip_suffix("-sync.json.lz4").expect("an archive");
        w.s3().overwrite_manifest(id, &bytes);
        return;
    }
    fs::write(p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
}

fn find_check<'v>(v: &'v Value, id: &str) -> &'v Value {
    if v["snapshot"]["snapshot_id"] == id {
        return &v["snapshot"];
    }
    v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["snapshot_id"] == id)
        .unwrap_or_else(|| panic!("no check of {id} in {v}"))
}

per_kind!(
    history_on_every_kind: xfs, zfs, ssh, s3;
    tampering_is_found: xfs, zfs, ssh, s3;
);

/// Unknown snapshots and never-tracked paths: exit 1, a message naming
/// them and a hint, as text and as `--json`.
#[test]
fn clear_errors() {
    let w = world_or_skip!(Kind::Xfs, "hist-err");
    build(&w);
    for args in [
        vec!["diff", "s9"],
        vec!["validate-snapshot", "--snapshot", "s9"],
        vec!["diff", "s1", "bogus"],
    ] {
        let o = w.run("A", &args);
        assert_exit(&o, 1, &format!("{args:?}"));
        let err = stderr(&o);
        let bad = args.last().unwrap();
        assert!(err.contains(&format!("no snapshot {bad}")), "{err}");
        assert!(err.contains("hint: 'dsg log' lists the snapshots"), "{err}");
    }
    let o = w.run("A", &["blame", "task/input/never.csv", "--json"]);
    assert_exit(&o, 1, "blame of a path never tracked");
    let v = json_of(&o);
    assert_eq!(v["status"], "error");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("task/input/never.csv was never tracked"),
        "{v}"
    );
    assert!(
        v["hint"]
            .as_str()
            .unwrap()
            .contains("relative to the project root"),
        "{v}"
    );
    let o = w.run("A", &["validate-file", "task/input/never.csv"]);
    assert_exit(&o, 1, "validate-file of an untracked path");
    assert!(
        stderr(&o).contains("not in the last sync (s4)"),
        "{}",
        show(&o)
    );
    // Usage errors stay 2.
    assert_exit(&w.run("A", &["log", "-n", "x"]), 2, "bad -n");
}

// ------------------------------------------------------ the original's fixture

const GENERATED_REPOS: &str = "/tmp/dsgfix/f1/repos";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/original-dsg")
}

fn copy_dir(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
    std::process::Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(to)
        .status()
        .unwrap();
}

fn rewrite_config(p: &Path, repos: &Path) {
    let text = fs::read_to_string(p).unwrap();
    assert!(text.contains(GENERATED_REPOS));
    fs::write(p, text.replace(GENERATED_REPOS, repos.to_str().unwrap())).unwrap();
}

/// validate-chain on the original's clients and on our clone of its
/// repository: the chain each holds, every link it can check verified
/// (unsorted entries, re-serialized archives and a lagging index are not
/// tampering), and the snapshots whose archives the original never wrote
/// named as checked from the index only. Expected ids from FACTS.json.
#[test]
fn validate_chain_on_the_original_fixture() {
    let w = world_or_skip!(Kind::Xfs, "hist-orig");
    let facts: Value =
        serde_json::from_slice(&fs::read(fixture().join("FACTS.json")).unwrap()).unwrap();
    let repos = w.repo_parent.clone();
    copy_dir(&fixture().join("repo"), &repos.join("proj"));
    rewrite_config(&repos.join("proj/.dsgconfig.yml"), &repos);
    fs::create_dir_all(repos.join("proj/.dsg/archive")).unwrap();
    let users = fixture().join("users");

    let run = |dir: &Path, user: &str, args: &[&str]| {
        let mut c = w.command("A", args);
        c.current_dir(dir).env("DSG_CONFIG_HOME", users.join(user));
        c.output().unwrap()
    };
    for (loc, user) in [
        ("alice", "alice"),
        ("bob", "bob"),
        ("alice-after-step2", "alice"),
    ] {
        let dir = w.tmp.path().join(loc);
        copy_dir(&fixture().join(loc), &dir);
        rewrite_config(&dir.join(".dsgconfig.yml"), &repos);
        let o = run(&dir, user, &["validate-chain", "--json"]);
        assert_ok(&o, &format!("validate-chain in {loc}"));
        let v = json_of(&o);
        let l = &facts["locations"][loc];
        let head = l["last_sync"]["snapshot_id"].as_str().unwrap();
        let n: u64 = head[1..].parse().unwrap();
        let want: Vec<String> = (1..=n).rev().map(|i| format!("s{i}")).collect();
        assert_eq!(v["verified"], serde_json::json!(want), "{loc}: {v}");
        assert_eq!(v["failed"], serde_json::json!([]), "{loc}");
        // log agrees with the index on disk, and counts what the archives hold.
        let o = run(&dir, user, &["log", "--json", "-n", "0"]);
        assert_ok(&o, &format!("log in {loc}"));
        let log = json_of(&o);
        for s in log["snapshots"].as_array().unwrap() {
            let id = s["snapshot_id"].as_str().unwrap();
            let m = manifest_on_disk(&dir, id);
            assert_eq!(
                s["snapshot_hash"], m["metadata"]["snapshot_hash"],
                "{loc} {id}"
            );
            assert_eq!(
                s["total_bytes"].as_u64(),
                Some(total_bytes(&m)),
                "{loc} {id}"
            );
        }
    }

    // Our clone of the original's repository: no archives anywhere, an
    // index one snapshot behind its head.
    let c = w.tmp.path().join("ours");
    fs::create_dir_all(&c).unwrap();
    fs::copy(repos.join("proj/.dsgconfig.yml"), c.join(".dsgconfig.yml")).unwrap();
    assert_ok(
        &run(&c, "bob", &["clone"]),
        "clone of the original's repository",
    );
    let o = run(&c, "bob", &["validate-chain", "--json"]);
    assert_ok(&o, "validate-chain on a clone of the original's repository");
    let v = json_of(&o);
    let head = facts["locations"]["repo"]["last_sync"]["snapshot_id"]
        .as_str()
        .unwrap();
    assert_eq!(v["verified"], serde_json::json!([head]), "{v}");
    assert_eq!(
        v["index_only"],
        serde_json::json!(["s3", "s2", "s1"]),
        "{v}"
    );
    let text = stdout(&run(&c, "bob", &["validate-chain"]));
    assert!(text.contains("the original dsg never wrote it"), "{text}");
    assert!(
        text.contains("1 verified, 3 checked from the index only (s3, s2, s1)"),
        "{text}"
    );
    // log still lists all four, from the index.
    let log = json_of(&run(&c, "bob", &["log", "--json"]));
    assert_eq!(log["snapshots"].as_array().unwrap().len(), 4);

    // The fixture's chain is still checked for real: a forged hash in
    // alice's s2 archive fails, naming it.
    let dir = w.tmp.path().join("alice");
    let s2 = dir.join(".dsg/archive/s2-sync.json.lz4");
    let json = String::from_utf8(decompress(&s2)).unwrap();
    let want = facts["locations"]["alice"]["sync_messages"]["snapshots"]["s2"]["snapshot_hash"]
        .as_str()
        .unwrap();
    assert!(json.contains(want));
    fs::write(
        &s2,
        compress(json.replace(want, "0000000000000000").as_bytes()),
    )
    .unwrap();
    let o = run(&dir, "alice", &["validate-chain", "--json"]);
    assert_exit(&o, 1, "a forged hash in the original's archive");
    let v = json_of(&o);
    assert!(
        v["failed"].as_array().unwrap().contains(&Value::from("s2")),
        "{v}"
    );
}
