//! Working beside the original (Python) dsg: its commit takes no lock and
//! swaps a copy of the whole repository, made at its begin as
//! `<mountpoint>/.staging-<tx>/`, in over the repository. A snapshot of
//! ours committed while that directory exists would vanish, so a sync waits
//! for it (DSG_LOCK_TIMEOUT) and then exits 4 naming it, at begin and
//! again just before its commit point; reads go on.
//!
//! Posix repositories only: the original builds such a copy only for them.

mod world;

use std::fs;
use std::time::{Duration, Instant};

use world::*;

fn p(name: &str) -> String {
    format!("{IN}/{name}")
}

/// Where the original would stage a transaction on this world's repository.
fn original_staging(env: &World) -> std::path::PathBuf {
    env.repo_parent.join(".staging-tx-1a2b3c4d")
}

/// The original's copy of the repository, as its begin makes it.
fn make_original_staging(env: &World) -> std::path::PathBuf {
    let st = original_staging(env);
    fs::create_dir(&st).unwrap();
    fs::create_dir(st.join(".dsg")).unwrap();
    fs::copy(
        env.repo().join(".dsg/last-sync.json"),
        st.join(".dsg/last-sync.json"),
    )
    .unwrap();
    st
}

#[track_caller]
fn assert_busy_naming(o: &std::process::Output, st: &std::path::Path) {
    assert_eq!(o.status.code(), Some(4), "{}", show(o));
    let err = stderr(o);
    assert!(
        err.contains("busy") && err.contains("original dsg"),
        "says busy, because of the original dsg: {err}"
    );
    assert!(
        err.contains(&st.display().to_string()),
        "names {}: {err}",
        st.display()
    );
    assert!(err.contains("hint:") && err.contains("rm -r"), "{err}");
}

fn a_staging_of_the_original_makes_a_sync_wait_then_exit_4(kind: Kind) {
    let env = world_or_skip!(kind, "origstage");
    env.write("A", &p("base.txt"), "base");
    env.init("A");
    env.write("A", &p("new.txt"), "new");
    env.write("A", &p("base.txt"), "base, edited");
    let st = make_original_staging(&env);
    let before = env.capture("A");

    let t = Instant::now();
    let o = env.run_env("A", &["sync"], &[("DSG_LOCK_TIMEOUT", "1")]);
    let waited = t.elapsed();
    assert_busy_naming(&o, &st);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "waited {waited:?} for a 1 s timeout"
    );
    if let Some(d) = env.capture("A").mismatch_old(&before) {
        panic!("a refused sync changed something:\n{d}");
    }
    assert!(st.is_dir(), "the original's staging is not ours to remove");

    // Reading does not wait for the original.
    let o = env.run_env("A", &["status"], &[("DSG_LOCK_TIMEOUT", "1")]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    fs::remove_dir_all(&st).unwrap();
    env.ok("A", &["sync"]);
    assert_eq!(assert_chain(&env.repo()), 2);
    assert!(env.repo().join(p("new.txt")).is_file());
    assert_eq!(
        fs::read_to_string(env.repo().join(p("base.txt"))).unwrap(),
        "base, edited"
    );
    env.assert_clean("A");
}

/// The original begins while our upload runs: our commit is refused before
/// its commit point, and nothing changes.
fn a_staging_that_appears_during_the_upload_stops_the_commit(kind: Kind) {
    let env = world_or_skip!(kind, "origstage2");
    env.write("A", &p("base.txt"), "base");
    env.init("A");
    env.write("A", &p("new.txt"), "new");
    env.write("A", &p("base.txt"), "base, edited");
    let before = env.capture("A");

    let child = env.spawn(
        "A",
        &["sync"],
        &[
            ("DSG_FAILPOINT", "client.uploaded:pause=3000"),
            ("DSG_LOCK_TIMEOUT", "1"),
        ],
    );
    // The journal exists from our begin to the end of our commit: the
    // original begins inside that window, while we pause after uploading.
    let journal = env.repo().join(".dsg/journal");
    let t0 = Instant::now();
    while !journal.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the sync never began"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = make_original_staging(&env);
    let o = no_hang("the sync", wait_within(child, DSG_LIMIT));
    assert_busy_naming(&o, &st);
    assert!(
        stderr(&o).contains("while this sync uploaded"),
        "{}",
        show(&o)
    );
    if let Some(d) = env.capture("A").mismatch_old(&before) {
        panic!("a sync refused at its commit changed something:\n{d}");
    }
    assert_no_leftovers(&env.repo());

    fs::remove_dir_all(&st).unwrap();
    env.ok("A", &["sync"]);
    assert_eq!(assert_chain(&env.repo()), 2);
    env.assert_clean("A");
}

/// The original's commit swapped in a copy made before our sync: our
/// published snapshot is gone from the repository while our files are
/// here. Status and sync say so plainly (the snapshot, when it was made,
/// the files at stake) and offer the rebase, which publishes them again.
fn a_vanished_snapshot_of_ours_is_named_and_can_be_published_again(kind: Kind) {
    let env = world_or_skip!(kind, "origswap");
    env.write("A", &p("base.txt"), "base");
    env.init("A");
    // The original's begin: a copy of the whole repository (under another
    // name: our sync would wait for a `.staging-*`; the original can still
    // begin after our check, and a restored backup does the same).
    let copy = env.repo_parent.join("copy-of-repo");
    let o = std::process::Command::new("cp")
        .arg("-a")
        .arg(env.repo())
        .arg(&copy)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    env.write("A", &p("base.txt"), "base, edited by A");
    env.write("A", &p("new.txt"), "new by A");
    env.ok("A", &["sync", "-m", "A's work"]);
    let ours = read_json(&env.client("A").join(".dsg/last-sync.json"))["metadata"].clone();
    assert_eq!(ours["snapshot_id"], "s2");
    // The original's commit: its copy replaces the repository.
    fs::remove_dir_all(env.repo()).unwrap();
    fs::rename(&copy, env.repo()).unwrap();

    let o = env.ok("A", &["status", "--json"]);
    let v = json_of(&o);
    let blocked = &v["blocked"];
    let reason = blocked["reason"].as_str().unwrap_or_default();
    for want in [
        "this project's last sync, s2",
        ours["snapshot_hash"].as_str().unwrap(),
        ours["created_at"].as_str().unwrap(),
        "is no longer in the repository's history",
        "original dsg",
    ] {
        assert!(reason.contains(want), "{want:?} in {v:#}");
    }
    let mut at_stake: Vec<&str> = blocked["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    at_stake.sort();
    assert_eq!(at_stake, vec![p("base.txt"), p("new.txt")], "{v:#}");
    assert!(
        blocked["hint"]
            .as_str()
            .unwrap()
            .contains("dsg sync --adopt-repository-history"),
        "{v:#}"
    );
    let o = env.run("A", &["sync"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert_eq!(fs::read(env.repo().join(p("base.txt"))).unwrap(), b"base");

    // The rebase: keep A's versions (L, the first choice of each).
    let o = env.run("A", &["sync", "--adopt-repository-history"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    let txt = env.client("A").join("conflicts.txt");
    let text = fs::read_to_string(&txt).unwrap();
    let mut seen_file = false;
    let chosen: String = text
        .lines()
        .filter_map(|l| {
            if l.starts_with("# File: ") {
                seen_file = true;
            }
            match l.strip_prefix('_') {
                Some(rest) if seen_file => {
                    seen_file = false;
                    Some(format!("{rest}\n"))
                }
                Some(_) => None,
                None => Some(format!("{l}\n")),
            }
        })
        .collect();
    assert_eq!(chosen.matches("\nL  # Use Local").count(), 2, "{chosen}");
    fs::write(&txt, chosen).unwrap();
    env.ok("A", &["sync", "--continue"]);
    assert_eq!(
        fs::read(env.repo().join(p("base.txt"))).unwrap(),
        b"base, edited by A"
    );
    assert_eq!(
        fs::read(env.repo().join(p("new.txt"))).unwrap(),
        b"new by A"
    );
    assert_eq!(assert_chain(&env.repo()), 2);
    env.assert_clean("A");
}

per_kind!(
    a_staging_of_the_original_makes_a_sync_wait_then_exit_4: xfs;
    a_staging_that_appears_during_the_upload_stops_the_commit: xfs;
    a_vanished_snapshot_of_ours_is_named_and_can_be_published_again: xfs, ssh;
);
