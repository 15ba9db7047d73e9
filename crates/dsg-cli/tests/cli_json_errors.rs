//! `--json` failures: stdout holds exactly one JSON document with `error`,
//! `hint` (string or null), `paths` and the exit code, so scripts need not
//! parse stderr; stderr keeps the human text.

mod common;
mod support;

use std::fs;
use std::process::Output;

use common::*;
use serde_json::Value;

/// The document of a failed `--json` run, with the fields every error has.
fn error_doc(o: &Output, code: i32, what: &str) -> Value {
    assert_code(o, code, what);
    let v = one_json(&o.stdout);
    assert_eq!(v["status"], "error", "{what}: {v:#}");
    assert_eq!(v["exit_code"], code, "{what}: {v:#}");
    let error = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: error: {v:#}"));
    assert!(!error.is_empty(), "{what}: {v:#}");
    assert!(
        !error.contains("hint:"),
        "{what}: the hint is its own field: {v:#}"
    );
    assert!(
        v["hint"].is_string() || v["hint"].is_null(),
        "{what}: hint: {v:#}"
    );
    assert!(
        v["paths"]
            .as_array()
            .is_some_and(|a| a.iter().all(Value::is_string)),
        "{what}: paths: {v:#}"
    );
    assert!(stderr(o).contains("error: "), "{what}: {}", describe(o));
    v
}

fn paths(v: &Value) -> Vec<&str> {
    v["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect()
}

#[test]
fn status_outside_a_project() {
    let env = TestEnv::new();
    let outside = env.project("nothing-here");
    let o = env.run(&outside, &["--json", "status"]);
    let v = error_doc(&o, 1, "status outside a project");
    assert!(
        v["error"].as_str().unwrap().contains(".dsgconfig.yml"),
        "{v:#}"
    );
    assert!(
        v["hint"].as_str().is_some_and(|h| h.contains("dsg init")),
        "{v:#}"
    );
    assert_eq!(paths(&v), Vec::<&str>::new());
    // Humans still get the hint on stderr.
    assert!(stderr(&o).contains("hint: "), "{}", describe(&o));
}

#[test]
fn init_blocked_by_an_unsafe_symlink_names_it() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/ok.csv", "ok\n");
    link(&dir, "input/abs.csv", "/etc/passwd");
    let mut args = vec!["--json".to_string()];
    args.extend(env.init_args("N"));
    let o = env.cmd(&dir).args(&args).output().unwrap();
    let v = error_doc(&o, 3, "init with an absolute symlink");
    assert_eq!(paths(&v), ["input/abs.csv"], "{v:#}");
    assert!(v["hint"].as_str().is_some_and(|h| !h.is_empty()), "{v:#}");
    assert!(!env.repo("N").exists());
}

#[test]
fn sync_blocked_by_a_conflict_names_it() {
    let env = TestEnv::new();
    let a = env.project("a");
    write(&a, "input/x.csv", "one\n");
    write(&a, "input/y.csv", "same\n");
    env.init_ok(&a, "conflict");
    let b = env.project("b");
    fs::copy(a.join(".dsgconfig.yml"), b.join(".dsgconfig.yml")).unwrap();
    assert_code(&env.run(&b, &["clone"]), 0, "clone");

    write(&a, "input/x.csv", "two from a\n");
    assert_code(&env.run(&a, &["sync", "-m", "a edits x"]), 0, "sync a");
    write(&b, "input/x.csv", "two from b\n");

    let o = env.run(&b, &["sync", "--json", "-m", "b edits x"]);
    let v = error_doc(&o, 3, "sync with a conflict");
    assert_eq!(paths(&v), ["input/x.csv"], "{v:#}");
    assert!(
        v["hint"]
            .as_str()
            .is_some_and(|h| h.contains("dsg sync --continue")),
        "{v:#}"
    );
    assert_hint_printed(&o, &v);
    assert_eq!(
        fs::read_to_string(b.join("input/x.csv")).unwrap(),
        "two from b\n"
    );
}

/// The hint is a non-empty field of its own, and humans still read it on
/// stderr as its own line after the error.
fn assert_hint_printed(o: &Output, v: &Value) {
    let hint = v["hint"].as_str().unwrap_or_default();
    assert!(!hint.is_empty(), "{v:#}");
    let first = hint.lines().next().unwrap();
    assert!(
        stderr(o).contains(&format!("\nhint: {first}")),
        "{}",
        describe(o)
    );
}

#[test]
fn invalid_project_config_gives_its_hint_apart() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, ".dsgconfig.yml", "name: a\nname: b\n");
    let o = env.run(&dir, &["--json", "status"]);
    let v = error_doc(&o, 1, "status with a duplicate key");
    assert!(
        v["error"].as_str().unwrap().contains(".dsgconfig.yml"),
        "{v:#}"
    );
    assert!(
        v["hint"]
            .as_str()
            .is_some_and(|h| h.contains("keep only one")),
        "{v:#}"
    );
    assert_hint_printed(&o, &v);
}

#[test]
fn corrupt_last_sync_gives_its_hint_apart() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    env.init_ok(&dir, "corrupt");
    fs::write(dir.join(".dsg/last-sync.json"), "{ not json").unwrap();
    let o = env.run(&dir, &["--json", "status"]);
    let v = error_doc(&o, 1, "status with a corrupt last-sync.json");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("last-sync.json") && error.contains("corrupt"),
        "{v:#}"
    );
    assert!(
        v["hint"].as_str().is_some_and(|h| h.contains("restore it")),
        "{v:#}"
    );
    assert_hint_printed(&o, &v);
}

#[test]
fn bad_repo_type_is_a_usage_error() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    let mut args = env.init_args("N");
    let i = args.iter().position(|a| a == "--repo-type").unwrap();
    args[i + 1] = "btrfs".into();

    let o = env.cmd(&dir).args(&args).output().unwrap();
    assert_code(&o, 2, "--repo-type btrfs");
    assert!(o.stdout.is_empty(), "{}", describe(&o));
    assert!(stderr(&o).contains("btrfs"), "{}", describe(&o));
    assert!(stderr(&o).contains("xfs, zfs"), "{}", describe(&o));

    args.push("--json".into());
    let o = env.cmd(&dir).args(&args).output().unwrap();
    let v = error_doc(&o, 2, "--json --repo-type btrfs");
    assert!(v["error"].as_str().unwrap().contains("btrfs"), "{v:#}");
    assert_eq!(paths(&v), Vec::<&str>::new());
    assert!(!dir.join(".dsgconfig.yml").exists());
    assert!(!env.repo("N").exists());
}

#[test]
fn init_help_lists_the_repository_types() {
    let env = TestEnv::new();
    let o = env.run(&env.base, &["init", "--help"]);
    assert_code(&o, 0, "init --help");
    assert!(
        stdout(&o).contains("[possible values: xfs, zfs, s3]"),
        "{}",
        describe(&o)
    );
    // --help is not an error, --json or not.
    let o = env.run(&env.base, &["--json", "init", "--help"]);
    assert_code(&o, 0, "--json init --help");
    assert!(stdout(&o).contains("--repo-type"), "{}", describe(&o));
}
