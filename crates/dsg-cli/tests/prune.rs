//! `dsg prune` on every kind of repository (xfs, zfs, ssh, s3): what it removes
//! is exactly what no kept snapshot references — computed here from the
//! manifests on the repository's disk (the head and the archives), never
//! from the command's own answer; every kept snapshot stays readable byte
//! for byte; the chain still validates; `log` marks pruned snapshots;
//! reading a pruned snapshot's removed data says "pruned"; `--dry-run`
//! changes nothing; the head is never pruned (`--keep-last 0` is refused);
//! a prune waits for (or gives up on, exit 4) a writer holding the lock;
//! and a crash at every prune step is finished by the next command.
//!
//! | test                                    | xfs | zfs | ssh | s3 |
//! |-----------------------------------------|-----|-----|-----|----|
//! | prune_keeps_exactly_what_kept_snapshots_reference | x | x | x | x |
//! | dry_run_changes_nothing                 |  x  |  x  |  x  | x  |
//! | head_is_never_pruned                    |  x  |  x  |  x  | x  |
//! | prune_waits_for_the_writers_lock        |  x  |  x  |  x  | x  |
//! | busy_prune_deletes_nothing              |  x  |  x  |     | x  |
//! | crash_at_every_prune_step               |  x  |  x  |     | x  |
//! | zfs_snapshot_with_a_clone_stays         |     |  x  |     |    |
//!
//! On s3 the objects are the `data/` objects (every content, the head's
//! too), the writers' lock is the lease (a test holds it by writing a live
//! holder's `lock`), and a killed prune is finished once its lease expired.
//!
//! Over ssh the remote agent gets neither `DSG_FAILPOINT` nor
//! `DSG_LOCK_TIMEOUT` from the client, so the crash matrix and the
//! give-up-after-timeout case run on the local kinds.

mod world;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::time::{Duration, Instant};

use serde_json::Value;
use world::*;

/// A `full_listing`.
type Listing = BTreeMap<String, (Node, i64, i64)>;

/// Each snapshot's files and their bytes, as the test wrote them.
type Versions = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// s1: a, b, k, big; then per snapshot i: a changes (s5 back to s1's
/// bytes, so an object is shared by a pruned and a kept snapshot), s3
/// changes big, s4 deletes b, s5 adds c.
fn build(w: &World, n: u64) -> Versions {
    let mut cur: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let put = |cur: &mut BTreeMap<String, Vec<u8>>, path: String, b: Vec<u8>| {
        w.write("A", &path, &b);
        cur.insert(path, b);
    };
    put(&mut cur, p(IN, "a.txt"), b"a1".to_vec());
    put(&mut cur, p(IN, "b.txt"), b"b (deleted in s4)".to_vec());
    put(&mut cur, p(IN, "k.txt"), b"kept all along".to_vec());
    put(&mut cur, p(OUT, "big.bin"), bytes(1, 200_000));
    w.init("A");
    let mut v = Versions::new();
    v.insert("s1".into(), cur.clone());
    for i in 2..=n {
        let a = if i == 5 {
            b"a1".to_vec()
        } else {
            format!("a{i}: version {i} of a").into_bytes()
        };
        put(&mut cur, p(IN, "a.txt"), a);
        if i == 3 {
            put(&mut cur, p(OUT, "big.bin"), bytes(3, 250_000));
        }
        if i == 4 {
            w.remove("A", &p(IN, "b.txt"));
            cur.remove(&p(IN, "b.txt"));
        }
        if i == 5 {
            put(&mut cur, p(IN, "c.txt"), b"c5".to_vec());
        }
        w.ok("A", &["sync", "-m", &format!("snapshot {i}")]);
        v.insert(format!("s{i}"), cur.clone());
    }
    assert_eq!(snapshot_id(&w.head()), format!("s{n}"));
    v
}

/// Snapshot `id`'s manifest as the repository holds it on disk: the head,
/// or its archive (LZ4 frame).
fn repo_manifest(w: &World, id: &str) -> Value {
    let head = w.head();
    if snapshot_id(&head) == id {
        return head;
    }
    let raw = fs::read(w.repo().join(format!(".dsg/archive/{id}-sync.json.lz4")))
        .unwrap_or_else(|e| panic!("archive of {id}: {e}"));
    let mut out = Vec::new();
    lz4_flex::frame::FrameDecoder::new(&raw[..])
        .read_to_end(&mut out)
        .unwrap();
    parse_manifest(&out)
}

/// The file hashes snapshot `id`'s manifest references.
fn hashes_of(w: &World, id: &str) -> BTreeSet<String> {
    manifest_entries(&repo_manifest(w, id))
        .into_values()
        .filter_map(|e| match e {
            Ent::File { hash, .. } => Some(hash),
            Ent::Link(_) => None,
        })
        .collect()
}

/// The objects in the repository's `.dsg/objects/` (directory kinds; s3:
/// the hashes of its `data/` objects).
fn objects(w: &World) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if w.kind == Kind::S3 {
        for k in w.s3().keys() {
            if let Some(name) = k.strip_prefix("data/") {
                out.insert(name.split('-').next().unwrap().to_string());
            }
        }
        return out;
    }
    let dir = w.repo().join(".dsg/objects");
    for (p, md) in walk_all(&dir) {
        if md.is_file() {
            out.insert(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    out
}

/// The repository's ZFS snapshots, sorted by number (zfs worlds).
fn zfs_snaps(w: &World) -> Vec<String> {
    let mut s = w.snapshots();
    s.sort_by_key(|x| snap_num(x));
    s
}

/// Everything a prune may change: the repository (and on zfs the
/// directory beside it and the dataset's snapshots) and client A.
fn listing(w: &World) -> (Listing, Vec<String>, Listing) {
    let repo_side = match w.kind {
        Kind::Zfs => full_listing(&w.repo_parent),
        Kind::S3 => w.repo_full_listing(),
        _ => full_listing(&w.repo()),
    };
    (repo_side, zfs_snaps(w), full_listing(&w.client("A")))
}

/// Every file of snapshot `id` snapfetches byte for byte.
#[track_caller]
fn assert_readable(w: &World, v: &Versions, id: &str) {
    for (path, want) in &v[id] {
        let o = w.ok(
            "A",
            &[
                "snapfetch",
                path,
                "--snapshot",
                id,
                "-o",
                "fetched",
                "--force",
            ],
        );
        let got = fs::read(w.client("A").join("fetched")).unwrap();
        assert!(
            got == *want,
            "[{}] {path} of {id}: fetched {} bytes, wrote {}\n{}",
            w.kind.label(),
            got.len(),
            want.len(),
            show(&o)
        );
    }
    let _ = fs::remove_file(w.client("A").join("fetched"));
}

/// What `--keep-last k` must leave of a history of `n`: the kept ids, and
/// (directory kinds) the objects that must remain, from the manifests.
fn expected(w: &World, n: u64, k: u64) -> (Vec<String>, BTreeSet<String>) {
    let kept: Vec<String> = (n + 1 - k..=n).map(|i| format!("s{i}")).collect();
    let referenced: BTreeSet<String> = kept.iter().flat_map(|id| hashes_of(w, id)).collect();
    let remain: BTreeSet<String> = objects(w).intersection(&referenced).cloned().collect();
    (kept, remain)
}

/// The state after `prune --keep-last k` on a history of `n` is exactly
/// the expected one (objects or zfs snapshots), nothing of a prune left.
#[track_caller]
fn assert_pruned(w: &World, kept: &[String], remain: &BTreeSet<String>, ctx: &str) {
    if w.kind == Kind::Zfs {
        assert_eq!(zfs_snaps(w), kept.to_vec(), "{ctx}: zfs snapshots");
        let left = w
            .repo_parent
            .join(format!(".dsg-zfs.{}.prune-journal", w.repo_name));
        assert!(!left.exists(), "{ctx}: prune journal left");
    } else if w.kind == Kind::S3 {
        assert_eq!(&objects(w), remain, "{ctx}: objects");
        w.s3().assert_no_leftovers(ctx);
        w.s3().assert_head_sound(ctx);
    } else {
        assert_eq!(&objects(w), remain, "{ctx}: objects");
        assert!(
            !w.repo().join(".dsg/prune-journal").exists(),
            "{ctx}: prune journal left"
        );
    }
}

fn log_json(w: &World) -> Vec<(String, bool)> {
    log_json_of(w, "A")
}

fn log_json_of(w: &World, client: &str) -> Vec<(String, bool)> {
    let o = w.ok(client, &["log", "-n", "0", "--json"]);
    json_of(&o)["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["snapshot_id"].as_str().unwrap().to_string(),
                s["pruned"].as_bool().expect("pruned: bool"),
            )
        })
        .collect()
}

fn prune_keeps_exactly_what_kept_snapshots_reference(kind: Kind) {
    let w = world_or_skip!(kind, "prune");
    let v = build(&w, 6);
    let (kept, remain) = expected(&w, 6, 2);
    let before = objects(&w);
    if kind != Kind::Zfs {
        // Not vacuous: some objects go, and one shared with a kept snapshot
        // (a1, retired in s2, back in s5) stays.
        assert!(
            before.len() > remain.len(),
            "nothing would be pruned: {before:?}"
        );
        let a1 = dsg_core::hash::Hash::of_bytes(b"a1").to_hex();
        assert!(remain.contains(&a1), "a1 must stay (s5 references it)");
    } else {
        assert_eq!(zfs_snaps(&w).len(), 6);
    }
    let o = w.ok("A", &["prune", "--keep-last", "2", "--json"]);
    let r = &json_of(&o)["result"];
    assert_eq!(r["dry_run"], false);
    assert_pruned(&w, &kept, &remain, "after prune");
    // The head's tree is untouched.
    if kind != Kind::Zfs {
        assert_tree_matches_manifest(&w.repo(), &w.head(), "repository after prune");
    }
    for id in &kept {
        assert_readable(&w, &v, id);
    }
    w.ok("A", &["validate-chain"]);
    // log marks exactly the pruned ones, in JSON and in text.
    let log = log_json(&w);
    assert_eq!(log.len(), 6);
    for (id, pruned) in &log {
        assert_eq!(*pruned, !kept.contains(id), "log: {id}");
    }
    let text = stdout(&w.ok("A", &["log", "-n", "0"]));
    for l in text.lines() {
        let id = l.split_whitespace().next().unwrap_or("");
        assert_eq!(
            l.contains("[pruned]"),
            !kept.contains(&id.to_string()),
            "log line {l:?}"
        );
    }
    // A pruned snapshot's removed data: "pruned", not damage.
    let a = p(IN, "a.txt");
    let o = w.run("A", &["snapfetch", &a, "--snapshot", "s2", "-o", "x"]);
    assert_exit(&o, 1, "snapfetch of pruned data");
    assert!(stderr(&o).contains("pruned"), "{}", show(&o));
    assert!(!w.client("A").join("x").exists());
    let o = w.run("A", &["validate-snapshot", "--deep", "--snapshot", "s3"]);
    assert_exit(&o, 1, "deep validation of a pruned snapshot");
    assert!(stderr(&o).contains("pruned"), "{}", show(&o));
    assert!(!stderr(&o).contains("differ"), "{}", show(&o));
    // Its manifest still validates.
    w.ok("A", &["validate-snapshot", "--snapshot", "s3"]);
    // A second prune has nothing to do; syncing goes on.
    let o = w.ok("A", &["prune", "--keep-last", "2", "--json"]);
    let r = &json_of(&o)["result"];
    assert_eq!(r["pruned"], serde_json::json!([]));
    assert_eq!(r["objects"], 0);
    assert_eq!(r["already_pruned"].as_array().unwrap().len(), 4);
    w.write("A", &p(IN, "a.txt"), "a7");
    w.ok("A", &["sync"]);
    w.ok("A", &["validate-chain"]);
    assert_readable(&w, &v, "s6");
    // Another client learns of the prune when it next syncs (a fresh
    // clone here): its log marks the same snapshots.
    w.clone_client("A", "B");
    let log_b = log_json_of(&w, "B");
    assert_eq!(log_b.len(), 7, "{log_b:?}");
    for (id, pruned) in &log_b {
        assert_eq!(*pruned, !kept.contains(id) && id != "s7", "B's log: {id}");
    }
}

fn dry_run_changes_nothing(kind: Kind) {
    let w = world_or_skip!(kind, "prunedry");
    build(&w, 4);
    let (kept, remain) = expected(&w, 4, 2);
    let before = listing(&w);
    let o = w.ok("A", &["prune", "--keep-last", "2", "--dry-run", "--json"]);
    let r = &json_of(&o)["result"];
    assert_eq!(r["dry_run"], true);
    assert_eq!(r["pruned"], serde_json::json!(["s1", "s2"]));
    assert_eq!(r["kept"], serde_json::json!(kept));
    let after = listing(&w);
    assert!(
        before == after,
        "[{}] a dry run changed something",
        kind.label()
    );
    // The real one does what the dry run said.
    let o = w.ok("A", &["prune", "--keep-last", "2", "--json"]);
    let r2 = &json_of(&o)["result"];
    assert_eq!(r2["pruned"], r["pruned"]);
    assert_eq!(r2["objects"], r["objects"]);
    assert_eq!(r2["zfs_snapshots"], r["zfs_snapshots"]);
    assert_pruned(&w, &kept, &remain, "after the real prune");
}

fn head_is_never_pruned(kind: Kind) {
    let w = world_or_skip!(kind, "prunehead");
    let v = build(&w, 3);
    let before = listing(&w);
    let o = w.run("A", &["prune", "--keep-last", "0"]);
    assert_exit(&o, 2, "--keep-last 0");
    assert!(before == listing(&w), "a refused prune changed something");
    let (kept, remain) = expected(&w, 3, 1);
    assert_eq!(kept, vec!["s3".to_string()]);
    w.ok("A", &["prune", "--keep-last", "1"]);
    assert_pruned(&w, &kept, &remain, "keep-last 1");
    assert_readable(&w, &v, "s3");
    if kind != Kind::Zfs {
        assert_tree_matches_manifest(&w.repo(), &w.head(), "repository");
        if kind == Kind::S3 {
            // Every content is an object, the head's too: exactly those stay.
            assert_eq!(remain, hashes_of(&w, "s3"), "the head's objects");
        } else {
            assert!(remain.is_empty(), "the head needs no object: {remain:?}");
        }
    }
    w.ok("A", &["validate-chain"]);
    w.assert_clean("A");
}

/// The repository's writers' lock file.
fn lock_path(w: &World) -> std::path::PathBuf {
    if w.kind == Kind::Zfs {
        w.repo_parent.join(format!(".dsg-zfs.{}.lock", w.repo_name))
    } else {
        w.repo().join(".dsg/lock")
    }
}

/// Holds the repository's exclusive lock (as a sync does) for `secs`; s3:
/// its lease, as a live writer's for `secs` more (the child just sleeps).
fn hold_lock(w: &World, secs: u64) -> std::process::Child {
    if w.kind == Kind::S3 {
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + secs;
        let doc = serde_json::json!({
            "tx": "tx-held-by-the-test", "user": "holder@test", "pid": 1,
            "expires": expires, "free": false,
        });
        let body = serde_json::to_vec(&doc).unwrap();
        w.s3()
            .store
            .put("lock", &body, &dsg_s3::Cond::None)
            .unwrap();
        return std::process::Command::new("sleep")
            .arg(secs.to_string())
            .spawn()
            .unwrap();
    }
    let mark = w.tmp.path().join(format!("locked-{}", next_count()));
    let child = std::process::Command::new("flock")
        .arg("-x")
        .arg(lock_path(w))
        .arg("-c")
        .arg(format!("touch {}; sleep {secs}", mark.display()))
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !mark.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "flock did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn prune_waits_for_the_writers_lock(kind: Kind) {
    let w = world_or_skip!(kind, "prunewait");
    build(&w, 3);
    let (kept, remain) = expected(&w, 3, 2);
    let mut holder = hold_lock(&w, 3);
    let start = Instant::now();
    w.ok("A", &["prune", "--keep-last", "2"]);
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "prune did not wait for the lock ({:?})",
        start.elapsed()
    );
    holder.wait().unwrap();
    assert_pruned(&w, &kept, &remain, "after waiting");
}

fn busy_prune_deletes_nothing(kind: Kind) {
    let w = world_or_skip!(kind, "prunebusy");
    build(&w, 3);
    let before = listing(&w);
    let mut holder = hold_lock(&w, 6);
    let o = w.run_env(
        "A",
        &["prune", "--keep-last", "1"],
        &[("DSG_LOCK_TIMEOUT", "1")],
    );
    assert_exit(&o, 4, "prune while a writer holds the lock");
    assert!(stderr(&o).contains("busy"), "{}", show(&o));
    let _ = holder.kill();
    let _ = holder.wait();
    let mut after = listing(&w);
    // The lock file's holder text is the holder's business.
    after.0.retain(|k, _| !k.ends_with("lock"));
    let mut b = before;
    b.0.retain(|k, _| !k.ends_with("lock"));
    assert!(b == after, "a busy prune changed something");
}

fn crash_at_every_prune_step(kind: Kind) {
    // The steps, from a run that passes them all.
    let names = {
        let w = world_or_skip!(kind, "prunefp");
        build(&w, 4);
        let o = w.run_env(
            "A",
            &["prune", "--keep-last", "2"],
            &[("DSG_FAILPOINT", "list")],
        );
        assert_ok(&o, "prune listing failpoints");
        failpoints_of(&o)
            .into_iter()
            .filter(|n| n.starts_with("repo.prune.") || n.starts_with("s3.prune."))
            .collect::<Vec<_>>()
    };
    let want: &[&str] = if kind == Kind::S3 {
        &[
            "s3.prune.journal",
            "s3.prune.recorded",
            "s3.prune.object",
            "s3.prune.objects",
        ]
    } else if kind == Kind::Zfs {
        &[
            "repo.prune.journal.begin",
            "repo.prune.recorded",
            "repo.prune.destroyed",
            "repo.prune.snapshots",
            "repo.prune.journal.done",
        ]
    } else {
        &[
            "repo.prune.journal.begin",
            "repo.prune.recorded",
            "repo.prune.object",
            "repo.prune.objects",
            "repo.prune.journal.done",
        ]
    };
    assert_eq!(names, want, "prune steps");
    for fp in want {
        let w = World::again(kind, "prunecrash");
        let v = build(&w, 4);
        let (kept, remain) = expected(&w, 4, 2);
        let before = objects(&w);
        let o = w.run_env(
            "A",
            &["prune", "--keep-last", "2"],
            &[("DSG_FAILPOINT", fp)],
        );
        assert!(killed(&o.status), "{fp}: not killed\n{}", show(&o));
        // The journaled plan is the commit point (s3: the record written
        // after it): any next command finishes it (here `status`; s3: once
        // the dead prune's lease expired), and nothing kept is missing.
        w.settle_after_crash();
        w.ok("A", &["status"]);
        if *fp == "s3.prune.journal" {
            assert_eq!(objects(&w), before, "{fp}: before the record, nothing goes");
            w.s3().assert_no_leftovers(fp);
            w.ok("A", &["prune", "--keep-last", "2"]);
        }
        assert_pruned(&w, &kept, &remain, &format!("after a crash at {fp}"));
        for id in &kept {
            assert_readable(&w, &v, id);
        }
        w.ok("A", &["validate-chain"]);
        // The client learns the record from the next prune (nothing left
        // to do), then log marks s1 and s2.
        w.ok("A", &["prune", "--keep-last", "2"]);
        let log = log_json(&w);
        assert_eq!(
            log.iter()
                .filter(|(_, p)| *p)
                .map(|(i, _)| i.as_str())
                .collect::<Vec<_>>(),
            vec!["s2", "s1"],
            "{fp}: log"
        );
    }
}

/// A snapshot a clone depends on (a live history reader's, a snapmount)
/// stays, reported `in_use`, and is not marked pruned; once the clone is
/// gone, the next prune destroys it.
fn zfs_snapshot_with_a_clone_stays(kind: Kind) {
    let w = world_or_skip!(kind, "pruneclone");
    build(&w, 3);
    let z = w.zfs();
    // Named like a reader's clone whose reader (pid 1) is alive, so no
    // recovery removes it.
    let clone = format!("{}--read-p1-prunetest", z.dataset());
    zfs_ok(&[
        "clone",
        "-o",
        "mountpoint=none",
        &format!("{}@s1", z.dataset()),
        &clone,
    ]);
    let o = w.ok("A", &["prune", "--keep-last", "1", "--json"]);
    let r = &json_of(&o)["result"];
    assert_eq!(r["in_use"], serde_json::json!(["s1"]));
    assert_eq!(r["pruned"], serde_json::json!(["s2"]));
    assert_eq!(zfs_snaps(&w), vec!["s1".to_string(), "s3".to_string()]);
    let marked: Vec<String> = log_json(&w)
        .into_iter()
        .filter(|(_, p)| *p)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(marked, vec!["s2".to_string()]);
    zfs_ok(&["destroy", &clone]);
    let o = w.ok("A", &["prune", "--keep-last", "1", "--json"]);
    let r = &json_of(&o)["result"];
    assert_eq!(r["pruned"], serde_json::json!(["s1"]));
    assert_eq!(zfs_snaps(&w), vec!["s3".to_string()]);
    let marked: Vec<String> = log_json(&w)
        .into_iter()
        .filter(|(_, p)| *p)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(marked, vec!["s2".to_string(), "s1".to_string()]);
    w.ok("A", &["validate-chain"]);
}

per_kind!(
    prune_keeps_exactly_what_kept_snapshots_reference: xfs, zfs, ssh, s3;
    dry_run_changes_nothing: xfs, zfs, ssh, s3;
    head_is_never_pruned: xfs, zfs, ssh, s3;
    prune_waits_for_the_writers_lock: xfs, zfs, ssh, s3;
    busy_prune_deletes_nothing: xfs, zfs, s3;
    crash_at_every_prune_step: xfs, zfs, s3;
    zfs_snapshot_with_a_clone_stays: zfs;
);
