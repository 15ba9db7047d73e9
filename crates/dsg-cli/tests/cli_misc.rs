//! Global options, exit codes, JSON output, list-files, ignore rules,
//! configuration errors and validate-config.

mod common;
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::json;

fn project_config(env: &TestEnv, name: &str, extra: &str) -> String {
    format!(
        "name: {name}\nrepository:\n  type: xfs\n  host: localhost\n  mountpoint: {}\n{extra}",
        env.repos.display()
    )
}

fn initialized(env: &TestEnv) -> PathBuf {
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    write(&dir, "input/sub/b.csv", "bb\n");
    link(&dir, "output/l.csv", "../input/a.csv");
    env.init_ok(&dir, "N");
    dir
}

#[test]
fn version_and_help() {
    let env = TestEnv::new();
    let o = env.run(&env.base, &["--version"]);
    assert_code(&o, 0, "--version");
    let out = stdout(&o);
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
    assert!(out.starts_with("dsg "), "{out}");
    let o = env.run(&env.base, &["--help"]);
    assert_code(&o, 0, "--help");
    for cmd in ["init", "status", "list-files", "validate-config"] {
        assert!(
            stdout(&o).contains(cmd),
            "--help lacks {cmd}\n{}",
            stdout(&o)
        );
    }
    assert!(
        !stdout(&o).contains("agent"),
        "the agent subcommand is hidden"
    );
    let o = env.run(&env.base, &["status", "--help"]);
    assert_code(&o, 0, "status --help");
    assert!(stdout(&o).contains("--offline"));
}

#[test]
fn usage_errors_exit_2_and_write_nothing() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    let before = (tree(&env.base), tree(&env.repos));
    for args in [
        &["frobnicate"][..],
        &["status", "--no-such-flag"],
        &[],
        &["init", "--no-interactive", "--host", "localhost"],
        &[
            "init",
            "--no-interactive",
            "--repo-name",
            "N",
            "--repo-path",
            "relative/path",
        ],
    ] {
        let o = env.cmd(&dir).args(args).write_stdin("").output().unwrap();
        assert_code(&o, 2, &format!("{args:?}"));
        assert!(!stderr(&o).is_empty(), "{args:?}: no message");
    }
    assert_same_tree(&before.0, &tree(&env.base), "project after usage errors");
    assert_same_tree(
        &before.1,
        &tree(&env.repos),
        "repository path after usage errors",
    );
}

#[test]
fn quiet_status_prints_nothing_when_clean() {
    let env = TestEnv::new();
    let dir = initialized(&env);
    for args in [
        &["-q", "status"][..],
        &["status", "-q"],
        &["--quiet", "status"],
    ] {
        let o = env.run(&dir, args);
        assert_code(&o, 0, &format!("{args:?}"));
        assert_eq!(stdout(&o), "", "{args:?}");
        assert_eq!(stderr(&o), "", "{args:?}");
    }
    // -q still reports errors.
    fs::rename(env.repo("N"), env.repos.join("gone")).unwrap();
    let o = env.run(&dir, &["-q", "status"]);
    assert_code(&o, 1, "-q status, repository gone");
    assert!(stderr(&o).contains("error"), "{}", describe(&o));
}

#[test]
fn json_outputs_are_exactly_one_document() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    let o = env.run(
        &dir,
        &{
            let mut a = vec!["--json".to_string()];
            a.extend(env.init_args("N"));
            a
        }
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>(),
    );
    assert_code(&o, 0, "--json init");
    assert_eq!(one_json(&o.stdout)["status"], "ok");
    write(&dir, "input/b.csv", "b\n");
    for args in [
        &["--json", "status"][..],
        &["status", "--json"],
        &["--json", "status", "--offline"],
        &["--json", "-v", "status"],
        &["--json", "list-files"],
        &["--json", "list-files", "--path", "input"],
        &["--json", "validate-config"],
    ] {
        let o = env.run(&dir, args);
        assert_code(&o, 0, &format!("{args:?}"));
        let v = one_json(&o.stdout);
        assert_eq!(v["status"], "ok", "{args:?}: {v:#}");
    }
    // Errors too: one document on stdout, the message on stderr.
    let outside = env.project("not-a-project");
    let o = env.run(&outside, &["--json", "status"]);
    assert_code(&o, 1, "--json status outside a project");
    assert_ne!(one_json(&o.stdout)["status"], "ok");
    assert!(stderr(&o).contains("hint:"), "{}", describe(&o));
}

#[test]
fn outside_a_project_is_an_error_with_a_hint() {
    let env = TestEnv::new();
    let outside = env.project("nothing-here");
    for args in [&["status"][..], &["list-files"], &["validate-config"]] {
        let o = env.run(&outside, args);
        assert_code(&o, 1, &format!("{args:?} outside a project"));
        let all = stdout(&o) + &stderr(&o);
        assert!(all.contains(".dsgconfig.yml"), "{}", describe(&o));
        assert!(stderr(&o).contains("hint:"), "{}", describe(&o));
    }
    assert_eq!(ls(&outside), Vec::<String>::new());
}

fn listed(env: &TestEnv, dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json", "list-files"];
    a.extend_from_slice(args);
    let o = env.run(dir, &a);
    assert_code(&o, 0, &format!("{a:?}"));
    one_json(&o.stdout)
}

fn paths(v: &serde_json::Value) -> Vec<String> {
    v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn list_files_counts_and_path_filter() {
    let env = TestEnv::new();
    let dir = env.project("p");
    fs::write(dir.join(".dsgconfig.yml"), project_config(&env, "proj", "")).unwrap();
    let files: BTreeMap<&str, &str> = [
        ("input/a.csv", "a,b\n1,2\n"),
        ("input/sub/b.csv", "bb\n"),
        ("input/sub/deeper/c.csv", "ccc\n"),
        ("input/subway.csv", "no prefix match\n"),
        ("output/o.txt", "o\n"),
        ("frozen/f.txt", ""),
    ]
    .into_iter()
    .collect();
    for (p, c) in &files {
        write(&dir, p, c);
    }
    link(&dir, "output/l.csv", "../input/a.csv");
    write(&dir, "README.md", "not data\n");
    write(&dir, "input/.hidden", "hidden\n");
    let v = listed(&env, &dir, &[]);
    let mut want: Vec<String> = files.keys().map(|s| s.to_string()).collect();
    want.push("output/l.csv".into());
    want.sort();
    assert_eq!(paths(&v), want);
    assert_eq!(v["total_files"], 7);
    let bytes: usize = files.values().map(|c| c.len()).sum();
    assert_eq!(v["total_bytes"], bytes);
    for f in v["files"].as_array().unwrap() {
        let p = f["path"].as_str().unwrap();
        if p == "output/l.csv" {
            assert_eq!(f["type"], "link");
            assert_eq!(f["target"], "../input/a.csv");
        } else {
            assert_eq!(f["type"], "file", "{p}");
            assert_eq!(f["size"], files[p].len(), "{p}");
            assert_eq!(f["hash"], hex(xxh3_64(files[p].as_bytes())).as_str(), "{p}");
        }
    }
    // --path from the root and relative to the current directory.
    let want_sub = ["input/sub/b.csv", "input/sub/deeper/c.csv"];
    let v = listed(&env, &dir, &["--path", "input/sub"]);
    assert_eq!(paths(&v), want_sub);
    assert_eq!(v["total_files"], 2);
    let v = listed(&env, &dir.join("input"), &["--path", "sub"]);
    assert_eq!(paths(&v), want_sub);
    let v = listed(&env, &dir.join("input/sub"), &["--path", "."]);
    assert_eq!(paths(&v), want_sub);
    // Human summary.
    let o = env.run(&dir, &["list-files"]);
    assert_code(&o, 0, "list-files");
    assert!(stdout(&o).contains("7 tracked"), "{}", stdout(&o));
    // list-files works before init and writes nothing.
    assert!(!dir.join(".dsg").exists());
}

#[test]
fn ignore_rules_names_paths_and_suffixes() {
    let env = TestEnv::new();
    let dir = env.project("p");
    fs::write(
        dir.join(".dsgconfig.yml"),
        project_config(
            &env,
            "proj",
            "ignore:\n  names: [__pycache__]\n  paths: [input/secret]\n  suffixes: [.tmp]\n",
        ),
    )
    .unwrap();
    let ignored = [
        "input/__pycache__/m.pyc",
        "input/__pycache__/sub/x.csv",
        "output/deep/__pycache__/y.csv",
        "input/secret/a.csv",
        "input/secret/deep/b.csv",
        "input/x.tmp",
        "output/y.tmp",
    ];
    let kept = [
        "input/ok.csv",
        "input/secretive.csv",
        "input/secret.csv",
        "input/x.tmpl",
        "output/pycache/z.csv",
        "output/tables/t.csv",
    ];
    for p in ignored.iter().chain(kept.iter()) {
        write(&dir, p, format!("{p}\n"));
    }
    let v = listed(&env, &dir, &[]);
    let mut want: Vec<String> = kept.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(paths(&v), want, "{v:#}");
    // init uses the project's rules: the repository holds only the kept files.
    env.init_ok(&dir, "proj");
    let repo: Vec<String> = content_map(&env.repo("proj"))
        .into_keys()
        .filter(|k| !k.starts_with(".dsg/"))
        .collect();
    assert_eq!(repo, want);
    let m = Mf::load(&dir.join(".dsg/last-sync.json"));
    assert_eq!(m.keys(), want);
    // New ignored files are not changes.
    write(&dir, "input/secret/new.csv", "n\n");
    write(&dir, "input/__pycache__/new.pyc", "n\n");
    write(&dir, "input/new.tmp", "n\n");
    let v = env.status_json(&dir, &[]);
    assert_eq!(v["files"], json!([]), "{v:#}");
}

#[test]
fn config_name_no_is_refused_with_a_hint_to_quote() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    let cfg = dir.join(".dsgconfig.yml");
    fs::write(&cfg, project_config(&env, "no", "")).unwrap();
    for args in [&["status"][..], &["list-files"], &["validate-config"]] {
        let o = env.run(&dir, args);
        assert_code(&o, 1, &format!("{args:?} with name: no"));
        let err = stderr(&o) + &stdout(&o);
        assert!(
            err.contains(cfg.to_str().unwrap()),
            "{args:?}: file not named\n{}",
            describe(&o)
        );
        assert!(
            err.contains("'name'"),
            "{args:?}: key not named\n{}",
            describe(&o)
        );
        assert!(
            err.contains("hint:") && err.contains("quote"),
            "{}",
            describe(&o)
        );
    }
    // Quoted, it is a fine name.
    fs::write(&cfg, project_config(&env, "\"no\"", "")).unwrap();
    let o = env.run(&dir, &["list-files"]);
    assert_code(&o, 0, "list-files with name: \"no\"");
}

#[test]
fn config_name_single_letter_as_the_original_writes_it() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    fs::write(
        dir.join(".dsgconfig.yml"),
        format!(
            "name: N\nssh:\n  host: localhost\n  path: {}\n  type: xfs\ntransport: ssh\n",
            env.repos.display()
        ),
    )
    .unwrap();
    let o = env.run(&dir, &["list-files"]);
    assert_code(&o, 0, "list-files with the original's `name: N`");
}

#[test]
fn config_unknown_repository_key_is_named() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    fs::write(
        dir.join(".dsgconfig.yml"),
        format!(
            "name: proj\nrepository:\n  type: xfs\n  host: localhost\n  mountpoint: {}\n  colour: red\n",
            env.repos.display()
        ),
    )
    .unwrap();
    for args in [&["status"][..], &["validate-config"]] {
        let o = env.run(&dir, args);
        assert_code(&o, 1, &format!("{args:?} with an unknown key"));
        let err = stderr(&o) + &stdout(&o);
        assert!(err.contains("colour"), "{}", describe(&o));
        assert!(err.contains(".dsgconfig.yml"), "{}", describe(&o));
    }
}

#[test]
fn missing_or_bad_user_config_is_an_error_with_a_hint() {
    let env = TestEnv::new();
    let dir = initialized(&env);
    let empty = env.project("empty-config-home");
    let o = env
        .cmd(&dir)
        .env("DSG_CONFIG_HOME", &empty)
        .args(["status"])
        .output()
        .unwrap();
    assert_code(&o, 1, "status without a user config");
    assert!(stderr(&o).contains("dsg.yml"), "{}", describe(&o));
    assert!(stderr(&o).contains("hint:"), "{}", describe(&o));
    // Init without a user config writes nothing.
    let fresh = env.project("fresh");
    write(&fresh, "input/a.csv", "a\n");
    let before = (tree(&fresh), tree(&env.repos));
    let o = env
        .cmd(&fresh)
        .env("DSG_CONFIG_HOME", &empty)
        .args(env.init_args("M"))
        .output()
        .unwrap();
    assert_code(&o, 1, "init without a user config");
    assert!(stderr(&o).contains("hint:"), "{}", describe(&o));
    assert_same_tree(
        &without_dir_mtimes(&before.0),
        &without_dir_mtimes(&tree(&fresh)),
        "project after init without a user config",
    );
    assert_same_tree(&before.1, &tree(&env.repos), "repository path");
    // A user_id that is not an email address.
    fs::write(
        empty.join("dsg.yml"),
        "user_name: X\nuser_id: not-an-email\n",
    )
    .unwrap();
    let o = env
        .cmd(&dir)
        .env("DSG_CONFIG_HOME", &empty)
        .args(["status"])
        .output()
        .unwrap();
    assert_code(&o, 1, "status with a bad user_id");
    assert!(stderr(&o).contains("user_id"), "{}", describe(&o));
}

#[test]
fn validate_config_ok_and_unreachable() {
    let env = TestEnv::new();
    let dir = initialized(&env);
    let o = env.run(&dir, &["validate-config"]);
    assert_code(&o, 0, "validate-config");
    let o = env.run(&dir.join("input/sub"), &["--json", "validate-config"]);
    assert_code(&o, 0, "validate-config from a subdirectory");
    assert_eq!(one_json(&o.stdout)["all_passed"], true);
    fs::rename(env.repo("N"), env.repos.join("elsewhere")).unwrap();
    let o = env.run(&dir, &["validate-config"]);
    assert_code(&o, 1, "validate-config, repository unreachable");
    let all = stdout(&o) + &stderr(&o);
    assert!(
        all.contains(env.repo("N").to_str().unwrap()),
        "{}",
        describe(&o)
    );
    // --no-backend skips the repository.
    let o = env.run(&dir, &["validate-config", "--no-backend"]);
    assert_code(&o, 0, "validate-config --no-backend");
    assert!(!env.repo("N").exists());
}

#[test]
fn validate_config_json_failure_is_one_document() {
    let env = TestEnv::new();
    let dir = initialized(&env);
    fs::rename(env.repo("N"), env.repos.join("elsewhere")).unwrap();
    let o = env.run(&dir, &["--json", "validate-config"]);
    assert_code(&o, 1, "--json validate-config, repository unreachable");
    assert_eq!(one_json(&o.stdout)["all_passed"], false);
}
