//! G4 during apply: a local file that changes while a sync is applying is
//! never lost. Made deterministic with a failpoint: the sync dies just after
//! its commit point, the user edits a file the sync is about to replace,
//! and the next command (which finishes the sync) must keep the edit.

mod common;
mod support;

use std::fs;

use common::*;

#[test]
fn a_file_edited_after_the_commit_point_is_kept_as_a_conflict_backup() {
    let env = TestEnv::new();
    let a = env.project("a");
    write(&a, "input/x.csv", "one\n");
    write(&a, "input/y.csv", "keep\n");
    env.init_ok(&a, "guard");
    let b = env.project("b");
    fs::copy(a.join(".dsgconfig.yml"), b.join(".dsgconfig.yml")).unwrap();
    assert_code(&env.run(&b, &["clone"]), 0, "clone");

    // Client a publishes a new version of x.
    write(&a, "input/x.csv", "two from a\n");
    assert_code(&env.run(&a, &["sync", "-m", "a edits x"]), 0, "sync a");

    // Client b starts to download it and dies right after its commit point.
    let o = env
        .cmd(&b)
        .env("DSG_FAILPOINT", "client.journal.committed")
        .args(["sync"])
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(
        fs::read_to_string(b.join("input/x.csv")).unwrap(),
        "one\n",
        "not applied yet"
    );

    // Meanwhile the user edits the file that is about to be replaced.
    write(&b, "input/x.csv", "b's unsaved work\n");

    // Any command finishes the sync.
    assert_code(&env.run(&b, &["status"]), 0, "status (recovery)");
    assert_eq!(
        fs::read_to_string(b.join("input/x.csv")).unwrap(),
        "two from a\n"
    );
    let kept: Vec<String> = fs::read_dir(b.join("input"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("x.csv~"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        fs::read_to_string(b.join("input").join(&kept[0])).unwrap(),
        "b's unsaved work\n"
    );
    // The backup is not tracked, and nothing is left to do.
    let v = env.status_json(&b, &[]);
    assert_eq!(v["files"].as_array().unwrap().len(), 0, "{v}");
    assert!(!b.join(".dsg/journal").exists());
    assert!(
        !b.join(".dsg/staging").exists()
            || fs::read_dir(b.join(".dsg/staging")).unwrap().count() == 0
    );
}

#[test]
fn a_file_that_is_unchanged_is_replaced_without_a_backup() {
    let env = TestEnv::new();
    let a = env.project("a");
    write(&a, "input/x.csv", "one\n");
    env.init_ok(&a, "guard2");
    let b = env.project("b");
    fs::copy(a.join(".dsgconfig.yml"), b.join(".dsgconfig.yml")).unwrap();
    assert_code(&env.run(&b, &["clone"]), 0, "clone");
    write(&a, "input/x.csv", "two\n");
    assert_code(&env.run(&a, &["sync"]), 0, "sync a");
    let o = env
        .cmd(&b)
        .env("DSG_FAILPOINT", "client.apply.1")
        .args(["sync"])
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0));
    assert_code(&env.run(&b, &["status"]), 0, "status (recovery)");
    assert_eq!(fs::read_to_string(b.join("input/x.csv")).unwrap(), "two\n");
    let names: Vec<String> = fs::read_dir(b.join("input"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["x.csv".to_string()]);
}
