//! The sync scenarios over both transports through one code path: the same
//! runner drives `--host localhost` (in-process agent) and `--host dsgtest`
//! (`dsg agent` behind a real sshd on loopback), checks the effects on disk
//! (file bytes, symlink targets, manifest snapshot ids) after every step, and
//! the ssh run must produce exactly the record the local run produces.

mod ssh_support;
mod support;

use serde_json::Value;
use ssh_support::*;

/// What a scenario observed, step by step: compared across transports.
#[derive(Debug, Default, PartialEq)]
struct Record {
    steps: Vec<(String, Value)>,
}

impl Record {
    fn note(&mut self, step: &str, v: Value) {
        self.steps.push((step.to_string(), v));
    }
}

fn status_of(w: &World, client: &str) -> Value {
    let v = w.status_json(client);
    assert_eq!(v["status"], "ok", "[{}] {v}", w.label());
    v
}

/// Representative sync scenarios, asserted on disk; returns the record.
fn run_scenarios(w: &World) -> Record {
    let t = w.label();
    let mut rec = Record::default();

    // ---- init: A's data becomes s1 in the repository.
    w.write("a", "task/input/a.csv", "id,x\n1,2\n");
    w.write("a", "task/input/sub/b.bin", random_bytes(1, 100_000));
    w.write("a", "task/input/with space.txt", "spaces\n");
    w.write("a", "task/input/caf\u{e9}.txt", "unicode\n");
    w.write("a", "task/output/empty.txt", "");
    w.write("a", "task/frozen/keep.txt", "frozen\n");
    w.link("a", "task/input/link", "a.csv");
    w.link("a", "task/output/dirlink", "../input/sub");
    w.link("a", "task/output/dangling", "nowhere/at/all");
    w.init("a");
    assert_eq!(w.repo_snapshot(), "s1", "[{t}] after init");
    w.assert_in_sync("a");
    rec.note("init", status_of(w, "a"));

    // ---- clone: B gets byte-identical data and the same symlink targets.
    w.clone_client("a", "b");
    assert_same(
        &format!("[{t}] clone b vs a"),
        &data_tree(&w.client("a")),
        &data_tree(&w.client("b")),
    );
    assert_eq!(
        std::fs::read_link(w.client("b").join("task/output/dirlink")).unwrap(),
        std::path::Path::new("../input/sub"),
        "[{t}] symlink target"
    );
    w.assert_in_sync("b");
    assert_eq!(
        w.repo_snapshot(),
        "s1",
        "[{t}] clone must not write the repo"
    );
    rec.note("clone", status_of(w, "b"));

    // ---- A edits, adds, deletes, retargets a link; uploads.
    w.write("a", "task/input/a.csv", "id,x\n1,2\n3,4\n");
    w.write("a", "task/input/new.txt", "new in a\n");
    w.write("a", "task/input/sub/c.bin", random_bytes(2, 70_000));
    w.remove("a", "task/output/empty.txt");
    w.link("a", "task/input/link", "sub/b.bin");
    let st = status_of(w, "a");
    let r = rows(&st);
    assert!(
        r.iter()
            .any(|x| x.0 == "task/input/a.csv" && x.2 == "upload")
            && r.iter()
                .any(|x| x.0 == "task/output/empty.txt" && x.2 == "delete_remote"),
        "[{t}] status before A's sync: {r:?}"
    );
    rec.note("a-status-before-upload", st);
    let o = w.ok("a", &["sync", "--json", "-m", "a edits"]);
    rec.note("a-sync-upload", shape(&json_of(&o)));
    assert_eq!(w.repo_snapshot(), "s2", "[{t}] A's upload");
    w.assert_in_sync("a");

    // ---- B downloads A's changes, deletions included.
    let st = status_of(w, "b");
    let r = rows(&st);
    assert!(
        r.iter()
            .any(|x| x.0 == "task/input/a.csv" && x.2 == "download")
            && r.iter()
                .any(|x| x.0 == "task/output/empty.txt" && x.2 == "delete_local"),
        "[{t}] status in B before its sync: {r:?}"
    );
    rec.note("b-status-before-download", st);
    w.ok("b", &["sync", "-m", "b pulls"]);
    rec.note("b-snapshot-after-download", Value::from(w.repo_snapshot()));
    assert_eq!(
        w.repo_snapshot(),
        "s2",
        "[{t}] a download-only sync publishes nothing"
    );
    w.assert_in_sync("b");
    assert_same(
        &format!("[{t}] b vs a after download"),
        &data_tree(&w.client("a")),
        &data_tree(&w.client("b")),
    );
    assert!(!w.client("b").join("task/output/empty.txt").exists());

    // ---- the other way: B edits, adds, deletes; A downloads.
    w.write("b", "task/frozen/keep.txt", "frozen v2\n");
    w.write("b", "task/output/result.csv", "r\n9\n");
    w.remove("b", "task/input/with space.txt");
    w.remove("b", "task/output/dangling");
    w.ok("b", &["sync", "-m", "b edits"]);
    let after_b = w.repo_snapshot();
    assert_eq!(after_b, "s3", "[{t}] B's upload");
    w.assert_in_sync("b");
    w.ok("a", &["sync"]);
    w.assert_in_sync("a");
    assert_same(
        &format!("[{t}] a vs b after both ways"),
        &data_tree(&w.client("b")),
        &data_tree(&w.client("a")),
    );
    rec.note("both-ways", Value::from(after_b));

    // ---- a conflict blocks with exit 3 and changes nothing.
    w.write("a", "task/input/a.csv", "a wins\n");
    w.ok("a", &["sync", "-m", "a again"]);
    w.write("b", "task/input/a.csv", "b differs\n");
    w.write("b", "task/input/other.txt", "would upload\n");
    let b_before = state_listing(&w.client("b"));
    let repo_before = state_listing(&w.repo());
    let snap = w.repo_snapshot();
    let o = w.run("b", &["sync", "-m", "conflicting"]);
    assert_exit(&o, 3, &format!("[{t}] sync with a conflict"));
    let mut b_after = state_listing(&w.client("b"));
    assert!(
        b_after.remove("conflicts.txt").is_some(),
        "[{t}] the blocked sync writes conflicts.txt"
    );
    assert_same(
        &format!("[{t}] client b after a blocked sync"),
        &b_before,
        &b_after,
    );
    assert_same(
        &format!("[{t}] repository after a blocked sync"),
        &repo_before,
        &state_listing(&w.repo()),
    );
    assert_eq!(w.repo_snapshot(), snap);
    let st = status_of(w, "b");
    assert!(
        rows(&st)
            .iter()
            .any(|x| x.0 == "task/input/a.csv" && x.2 == "conflict"),
        "[{t}] status shows the conflict: {st}"
    );
    rec.note("conflict-status", st);

    // ---- a no-op sync makes no snapshot and writes nothing to the repo.
    w.ok("a", &["status"]);
    let repo_before = state_listing(&w.repo());
    let snap = w.repo_snapshot();
    let o = w.ok("a", &["sync", "--json", "-m", "nothing"]);
    rec.note("noop-sync", shape(&json_of(&o)));
    assert_eq!(
        w.repo_snapshot(),
        snap,
        "[{t}] a no-op sync made a snapshot"
    );
    assert_same(
        &format!("[{t}] repository after a no-op sync"),
        &repo_before,
        &state_listing(&w.repo()),
    );
    rec.note("final-status", status_of(w, "a"));
    rec
}

#[test]
fn sync_scenarios_local() {
    let w = World::new("scen-local", Transport::Local, None);
    run_scenarios(&w);
}

#[test]
fn sync_scenarios_ssh_match_local() {
    let ssh = need_ssh!();
    let local = World::new("scen-l", Transport::Local, None);
    let remote = World::new("scen-s", Transport::Ssh, Some(&ssh));
    let t0 = std::time::Instant::now();
    let want = run_scenarios(&local);
    let t1 = std::time::Instant::now();
    let got = run_scenarios(&remote);
    eprintln!(
        "scenarios: local {:.2} s, ssh {:.2} s",
        (t1 - t0).as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
    for (a, b) in want.steps.iter().zip(got.steps.iter()) {
        assert_eq!(a, b, "the ssh transport differs from the local one");
    }
    assert_eq!(want, got);
}
