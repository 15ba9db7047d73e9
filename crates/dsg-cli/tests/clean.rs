//! `dsg clean`: a dry run (the default) lists what it would remove and
//! removes nothing; `--no-dry-run --force` removes exactly the targets;
//! without --force and without a terminal nothing is removed; tracked data,
//! `.dsg/last-sync.json`, the snapshot index and the archives are never
//! touched; a journal (a sync in progress or interrupted) refuses it.
//! Local only (clean never contacts the repository): the xfs world.

mod world;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::Value;
use world::*;

/// Everything under `root` with file/link contents and their mtimes; a
/// folder's own mtime is left out (removing an entry changes it).
fn listing(root: &Path) -> BTreeMap<String, (Node, i64, i64)> {
    full_listing(root)
        .into_iter()
        .map(|(k, (n, s, ns))| match n {
            Node::Dir => (k, (Node::Dir, 0, 0)),
            n => (k, (n, s, ns)),
        })
        .collect()
}

/// A pid that is certainly not running.
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

struct Setup {
    w: World,
    /// What clean must remove, by target.
    targets: BTreeMap<&'static str, BTreeSet<String>>,
    /// Look like targets but must stay.
    decoys: Vec<String>,
}

const UNTRACKED_NEAR_MISSES: [&str; 2] = [
    "task/input/a.txt~2025010T120000+0100~",
    "task/input/a.txt~20250101T120000*0100~",
];
const B1: &str = "task/input/a.txt~20250101T120000+0100~";
const B2: &str = "task/input/sub/b.txt~20241231T235959-0700~";
const B3: &str = "task/output/c.txt~20250714T101112+0000~";

/// A synced project A with every kind of target and decoys around them.
fn setup(prefix: &str) -> Setup {
    let w = World::new(Kind::Xfs, prefix).expect("xfs world");
    w.write("A", &p(IN, "a.txt"), "tracked a");
    w.write("A", &p(IN, "sub/b.txt"), "tracked b");
    w.write("A", &p(OUT, "c.txt"), "tracked c");
    w.init("A");
    w.write("A", &p(OUT, "d.txt"), "tracked d");
    // Decoys, there before the second sync: the near misses become
    // tracked data; the others are never tracked.
    let live = std::process::id();
    let live_temp = format!(".dsg/.dsg-tmp.{live}.xyz.stat-cache");
    let decoys = vec![
        // a backup name outside the data folders
        "task/notes/n.txt~20250101T120000+0100~".to_string(),
        // a folder with a backup's name, and the file in it
        "task/input/dir~20250101T120000+0100~/inner.txt".to_string(),
        // near misses
        "task/input/a.txt~20250101T120000+0100".to_string(),
        // a live writer's temp file
        live_temp,
        // in a hidden folder
        "task/input/.hidden/e.txt~20250101T120000+0100~".to_string(),
    ];
    for d in &decoys {
        w.write("A", d, "decoy");
    }
    w.ok("A", &["sync", "-m", "second"]);
    w.ok("A", &["log"]);
    let root = w.client("A");
    // Near misses that dsg refuses to track (a trailing ~), left untracked.
    let mut decoys = decoys;
    for d in UNTRACKED_NEAR_MISSES {
        w.write("A", d, "decoy");
        decoys.push(d.to_string());
    }
    // backups: a file, a link, one more file
    w.write("A", B1, "backup of a");
    w.link("A", B2, "b.txt");
    w.write("A", B3, "backup of c, longer");
    // temp
    let dead = dead_pid();
    w.write("A", ".dsg/staging/tx-old/files/task/input/x", "staged");
    w.write("A", ".dsg/tmp/junk", "the original's temp");
    let dead_meta = format!(".dsg/.dsg-tmp.{dead}.abc.stat-cache");
    w.write("A", &dead_meta, "half a stat cache");
    let dead_data = format!("{IN}/.dsg-tmp.{dead}.q.data.csv");
    w.write("A", &dead_data, "half a snapfetch");
    // cache
    w.write("A", ".dsg/history-sizes.json", "{}");
    let mut cache: BTreeSet<String> = ["stat-cache", "stat-cache.manifest", "history-sizes.json"]
        .iter()
        .map(|n| format!(".dsg/{n}"))
        .filter(|p| root.join(p).exists())
        .collect();
    assert!(
        cache.contains(".dsg/stat-cache") && cache.contains(".dsg/history-sizes.json"),
        "setup: caches {cache:?}"
    );
    cache.insert(".dsg/history-sizes.json".into());
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    let targets = BTreeMap::from([
        ("backups", set(&[B1, B2, B3])),
        (
            "temp",
            set(&[".dsg/staging", ".dsg/tmp", &dead_meta, &dead_data]),
        ),
        ("cache", cache),
    ]);
    Setup { w, targets, decoys }
}

/// Paths (and sizes) a clean `--json` reported.
fn reported(v: &Value) -> BTreeMap<String, (String, u64)> {
    v["result"]["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {v}"))
        .iter()
        .map(|i| {
            (
                i["path"].as_str().unwrap().to_string(),
                (
                    i["target"].as_str().unwrap().to_string(),
                    i["bytes"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// Bytes under `p` as a test counts them (files' and links' own sizes).
fn bytes_under(p: &Path) -> u64 {
    let md = fs::symlink_metadata(p).unwrap();
    if !md.is_dir() {
        return md.size();
    }
    walk_all(p)
        .iter()
        .filter(|(_, m)| !m.is_dir())
        .map(|(_, m)| m.size())
        .sum()
}

/// `before` without `removed` and everything below them.
fn without(
    before: &BTreeMap<String, (Node, i64, i64)>,
    removed: &BTreeSet<String>,
) -> BTreeMap<String, (Node, i64, i64)> {
    before
        .iter()
        .filter(|(k, _)| {
            !removed
                .iter()
                .any(|r| *k == r || k.starts_with(&format!("{r}/")))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn expected(s: &Setup, targets: &[&str]) -> BTreeMap<String, (String, u64)> {
    let root = s.w.client("A");
    targets
        .iter()
        .flat_map(|t| {
            s.targets[t]
                .iter()
                .map(|p| (p.clone(), (t.to_string(), bytes_under(&root.join(p)))))
        })
        .collect()
}

#[test]
fn dry_run_lists_everything_and_removes_nothing() {
    let s = setup("clean-dry");
    let root = s.w.client("A");
    let before = full_listing(&root);
    let o = s.w.ok("A", &["clean", "--json"]);
    assert_eq!(full_listing(&root), before, "a dry run changed the project");
    let v = json_of(&o);
    assert_eq!(v["result"]["dry_run"], true, "{v}");
    let want = expected(&s, &["backups", "temp", "cache"]);
    assert_eq!(reported(&v), want, "dry-run listing");
    let total: u64 = want.values().map(|(_, b)| b).sum();
    assert_eq!(v["result"]["bytes"].as_u64(), Some(total), "{v}");
    // The human listing names every path too.
    let o = s.w.ok("A", &["clean", "--dry-run"]);
    let text = stdout(&o);
    let listed: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("  - "))
        .map(|l| l.split("  (").next().unwrap().to_string())
        .collect();
    assert_eq!(
        listed,
        want.keys().cloned().collect::<BTreeSet<_>>(),
        "human listing:\n{text}"
    );
    // --force alone is still a dry run.
    s.w.ok("A", &["clean", "--force"]);
    assert_eq!(
        full_listing(&root),
        before,
        "clean --force (dry run) changed the project"
    );
}

#[test]
fn without_terminal_and_force_nothing_is_removed() {
    let s = setup("clean-noterm");
    let root = s.w.client("A");
    let before = full_listing(&root);
    // stdin is /dev/null in the test world: no terminal to ask on.
    let o = s.w.run("A", &["clean", "--no-dry-run"]);
    assert_exit(&o, 1, "clean --no-dry-run without a terminal");
    assert!(stderr(&o).contains("--force"), "{}", show(&o));
    assert_eq!(
        full_listing(&root),
        before,
        "refused clean changed the project"
    );
}

#[test]
fn force_removes_exactly_the_targets() {
    let s = setup("clean-force");
    let root = s.w.client("A");
    let before = listing(&root);
    let manifest = fs::read(root.join(".dsg/last-sync.json")).unwrap();
    let messages = fs::read(root.join(".dsg/sync-messages.json")).unwrap();
    let want = expected(&s, &["backups", "temp", "cache"]);
    let o = s.w.ok("A", &["clean", "--no-dry-run", "--force", "--json"]);
    let v = json_of(&o);
    assert_eq!(v["result"]["status"], "success", "{v}");
    assert_eq!(reported(&v), want, "removed");
    let removed: BTreeSet<String> = want.keys().cloned().collect();
    assert_same(
        "the project after clean --force",
        &without(&before, &removed),
        &listing(&root),
    );
    for d in &s.decoys {
        assert!(root.join(d).exists(), "decoy {d} was removed");
    }
    assert_eq!(
        fs::read(root.join(".dsg/last-sync.json")).unwrap(),
        manifest
    );
    assert_eq!(
        fs::read(root.join(".dsg/sync-messages.json")).unwrap(),
        messages
    );
    assert!(root.join(".dsg/archive").is_dir());
    // Tracked data is intact and the caches rebuild.
    for d in UNTRACKED_NEAR_MISSES {
        s.w.remove("A", d);
    }
    s.w.assert_clean("A");
    // Nothing left to clean but what status just rebuilt.
    let v = json_of(&s.w.ok("A", &["clean", "--json", "--target", "backups"]));
    assert_eq!(reported(&v), BTreeMap::new(), "{v}");
}

#[test]
fn each_target_removes_only_its_own() {
    let s = setup("clean-targets");
    let root = s.w.client("A");
    for t in ["backups", "cache", "temp"] {
        let before = listing(&root);
        let want = expected(&s, &[t]);
        let o = s.w.ok(
            "A",
            &["clean", "--target", t, "--no-dry-run", "--force", "--json"],
        );
        assert_eq!(reported(&json_of(&o)), want, "--target {t}");
        let removed: BTreeSet<String> = want.keys().cloned().collect();
        assert_same(
            &format!("the project after --target {t}"),
            &without(&before, &removed),
            &listing(&root),
        );
    }
    let o = s.w.run("A", &["clean", "--target", "snapshots"]);
    assert_exit(&o, 2, "unknown target");
}

#[test]
fn a_journal_refuses_and_nothing_is_removed() {
    let s = setup("clean-journal");
    let root = s.w.client("A");
    fs::write(root.join(".dsg/journal"), b"").unwrap();
    let before = full_listing(&root);
    for args in [
        &["clean", "--no-dry-run", "--force"][..],
        &["clean", "--target", "backups", "--no-dry-run", "--force"],
        &["clean"],
    ] {
        let o = s.w.run("A", args);
        assert_exit(&o, 1, &format!("{args:?} with a journal"));
        assert!(stderr(&o).contains("journal"), "{}", show(&o));
        assert_eq!(full_listing(&root), before, "{args:?} changed the project");
    }
}
