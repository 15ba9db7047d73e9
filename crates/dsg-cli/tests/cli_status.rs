//! `dsg status`: the 15-state table end to end (L from the working tree, C and
//! R written directly as manifests in the original's format), read-only-ness
//! checked on disk, change detection, offline mode and refusal of damaged or
//! unsafe manifests.

mod common;
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::json;

// ---------------------------------------------------------------- the table

/// One side's view of a path: a file with a version token, or a link.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum V {
    F(&'static str),
    L(&'static str),
}

struct Case {
    path: &'static str,
    /// On disk when `dsg init` runs (then edited into `l`).
    pre: Option<V>,
    l: Option<V>,
    c: Option<V>,
    r: Option<V>,
}

fn content(path: &str, token: &str) -> Vec<u8> {
    format!("{path} version {token}\n").into_bytes()
}

const A: Option<V> = Some(V::F("A"));
const B: Option<V> = Some(V::F("B"));
const C: Option<V> = Some(V::F("C"));
/// A local edit that also changes the size.
const EDIT: Option<V> = Some(V::F("edited"));

fn cases() -> Vec<Case> {
    let c = |path, pre, l, c, r| Case { path, pre, l, c, r };
    vec![
        c("input/s01_same.csv", A, A, A, A),
        c("input/s02_remote_changed.csv", A, A, A, B),
        c("input/s03_same_change_both.csv", A, A, B, A),
        c("input/s04_local_edit.csv", A, EDIT, A, A),
        c(
            "output/s04_link_retargeted.csv",
            Some(V::L("../input/s01_same.csv")),
            Some(V::L("../input/s02_remote_changed.csv")),
            Some(V::L("../input/s01_same.csv")),
            Some(V::L("../input/s01_same.csv")),
        ),
        c(
            "output/s04_file_became_link.csv",
            A,
            Some(V::L("../input/s01_same.csv")),
            A,
            A,
        ),
        c("input/s05_all_differ.csv", A, A, B, C),
        c("input/s06_deleted_locally.csv", A, None, A, A),
        c("input/s07_deleted_local_changed_remote.csv", A, None, A, B),
        c("input/s08_no_cache_same.csv", A, A, None, A),
        c("input/s09_no_cache_differ.csv", A, A, None, B),
        c(
            "output/s09_file_vs_link.csv",
            A,
            A,
            None,
            Some(V::L("../input/s01_same.csv")),
        ),
        c("input/s10_deleted_remotely.csv", A, A, A, None),
        c("input/s11_local_edit_remote_delete.csv", A, EDIT, B, None),
        c("input/s12_only_remote.csv", None, None, None, A),
        c("input/s13_only_cache.csv", A, None, A, None),
        c("input/s14_new_local.csv", None, A, None, None),
    ]
}

/// The table of DESIGN §4, written independently of the product.
fn classify(l: Option<V>, c: Option<V>, r: Option<V>) -> &'static str {
    match (l, c, r) {
        (Some(l), Some(c), Some(r)) => {
            if l == c && c == r {
                "sLCR__all_eq"
            } else if l == c {
                "sLCR__L_eq_C_ne_R"
            } else if l == r {
                "sLCR__L_eq_R_ne_C"
            } else if c == r {
                "sLCR__C_eq_R_ne_L"
            } else {
                "sLCR__all_ne"
            }
        }
        (None, Some(c), Some(r)) => {
            if c == r {
                "sxLCR__C_eq_R"
            } else {
                "sxLCR__C_ne_R"
            }
        }
        (Some(l), None, Some(r)) => {
            if l == r {
                "sLxCR__L_eq_R"
            } else {
                "sLxCR__L_ne_R"
            }
        }
        (Some(l), Some(c), None) => {
            if l == c {
                "sLCxR__L_eq_C"
            } else {
                "sLCxR__L_ne_C"
            }
        }
        (None, None, Some(_)) => "sxLCxR__only_R",
        (None, Some(_), None) => "sxLCRx__only_C",
        (Some(_), None, None) => "sLxCxR__only_L",
        (None, None, None) => "sxLxCxR__none",
    }
}

fn action(state: &str) -> &'static str {
    match state {
        "sLCR__all_eq" | "sxLxCxR__none" => "none",
        "sLCR__L_eq_C_ne_R" | "sxLCxR__only_R" => "download",
        "sLCR__L_eq_R_ne_C" | "sLxCR__L_eq_R" | "sxLCRx__only_C" => "update_cache",
        "sLCR__C_eq_R_ne_L" | "sLxCxR__only_L" => "upload",
        "sxLCR__C_eq_R" => "delete_remote",
        "sLCxR__L_eq_C" => "delete_local",
        "sLCR__all_ne" | "sxLCR__C_ne_R" | "sLxCR__L_ne_R" | "sLCxR__L_ne_C" => "conflict",
        s => panic!("unknown state {s}"),
    }
}

fn put(dir: &Path, path: &str, v: Option<V>) {
    let p = dir.join(path);
    if fs::symlink_metadata(&p).is_ok() {
        fs::remove_file(&p).unwrap();
    }
    match v {
        None => {}
        Some(V::F(t)) => write(dir, path, content(path, t)),
        Some(V::L(t)) => link(dir, path, t),
    }
}

fn add(m: &mut Mf, path: &str, v: Option<V>) {
    match v {
        None => {}
        Some(V::F(t)) => {
            m.set_file(path, &content(path, t));
        }
        Some(V::L(t)) => {
            m.set_link(path, t);
        }
    }
}

type Rows = BTreeMap<String, (String, String)>;

fn expected(cases: &[Case], offline: bool) -> Rows {
    cases
        .iter()
        .filter_map(|k| {
            let r = if offline { k.c } else { k.r };
            let s = classify(k.l, k.c, r);
            (s != "sLCR__all_eq" && s != "sxLxCxR__none")
                .then(|| (k.path.to_string(), (s.to_string(), action(s).to_string())))
        })
        .collect()
}

/// Inits a project on the `pre` state, edits it into L, and replaces C and R
/// by manifests built from the table (C in reverse path order, as the
/// original's unsorted files are; R sorted, chained on C).
fn build_table(env: &TestEnv) -> (PathBuf, Vec<Case>) {
    let cases = cases();
    let dir = env.project("p");
    for k in &cases {
        put(&dir, k.path, k.pre);
    }
    env.init_ok(&dir, "N");
    for k in &cases {
        if k.pre != k.l {
            put(&dir, k.path, k.l);
        }
    }
    let mut c = Mf::empty();
    for k in cases.iter().rev() {
        add(&mut c, k.path, k.c);
    }
    c.seal("s1", "Initial snapshot", None);
    // s01: same content, another mtime string and user: still equal.
    let mut r = Mf::empty();
    for k in &cases {
        add(&mut r, k.path, k.r);
    }
    r.entries["input/s01_same.csv"]["user"] = json!("someone.else@example.org");
    let prev = c.metadata["snapshot_hash"].as_str().unwrap().to_string();
    r.seal("s2", "Sync operation", Some(("s1", &prev)));
    c.write(&dir.join(".dsg/last-sync.json"));
    r.write(&env.repo("N").join(".dsg/last-sync.json"));
    (dir, cases)
}

#[test]
fn fifteen_state_table_end_to_end() {
    let env = TestEnv::new();
    let (dir, cases) = build_table(&env);
    let want = expected(&cases, false);
    // The cases cover every state 2..14.
    let states: std::collections::BTreeSet<&str> = want.values().map(|(s, _)| s.as_str()).collect();
    assert_eq!(states.len(), 13, "{states:?}");

    let v = env.status_json(&dir, &[]);
    assert_eq!(status_rows(&v), want, "{v:#}");
    assert_eq!(v["problems"], json!([]));
    // Rows come in path order.
    let paths: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);

    // The human listing names every path (cache-only updates with -v).
    let o = env.run(&dir, &["-v", "status"]);
    assert_code(&o, 0, "status -v");
    let out = stdout(&o);
    for p in want.keys() {
        assert!(out.contains(p.as_str()), "{p} missing\n{out}");
    }
    assert!(!out.contains("Everything up to date"), "{out}");
}

#[test]
fn fifteen_state_table_offline_uses_the_cache_as_remote() {
    let env = TestEnv::new();
    let (dir, cases) = build_table(&env);
    let v = env.status_json(&dir, &["--offline"]);
    assert_eq!(status_rows(&v), expected(&cases, true), "{v:#}");
    assert_eq!(v["offline"], true);
}

#[test]
fn status_from_a_subdirectory() {
    let env = TestEnv::new();
    let (dir, cases) = build_table(&env);
    let sub = dir.join("input");
    let v = env.status_json(&sub, &[]);
    assert_eq!(status_rows(&v), expected(&cases, false), "{v:#}");
    let deep = dir.join("output");
    let v = env.status_json(&deep, &[]);
    assert_eq!(status_rows(&v), expected(&cases, false), "{v:#}");
}

// ---------------------------------------------------------------- read-only

/// Project listing without what status may write: the stat cache
/// (`.dsg/stat-cache` and its sibling files `.dsg/stat-cache.*`), and so the
/// `.dsg` directory's own mtime.
fn project_tree(dir: &Path) -> BTreeMap<String, Node> {
    tree(dir)
        .into_iter()
        .filter(|(k, _)| k != ".dsg" && !is_stat_cache(k))
        .collect()
}

fn is_stat_cache(rel: &str) -> bool {
    rel == ".dsg/stat-cache"
        || rel.ends_with("/.dsg/stat-cache")
        || rel.starts_with(".dsg/stat-cache.")
        || rel.contains("/.dsg/stat-cache.")
}

#[test]
fn status_writes_nothing_but_the_stat_cache() {
    let env = TestEnv::new();
    let (dir, _) = build_table(&env);
    write(&dir, "input/s14_new_local.csv", "changed again, longer\n");
    let before = (project_tree(&dir), repo_tree_sans_locks(&env.repos));
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["-v", "status"],
        &["status", "--offline"],
        &["-q", "status"],
    ] {
        let o = env.run(&dir, args);
        assert_code(&o, 0, &args.join(" "));
        assert_same_tree(
            &before.0,
            &project_tree(&dir),
            &format!("project after {args:?}"),
        );
        assert_same_tree(
            &before.1,
            &repo_tree_sans_locks(&env.repos),
            &format!("repository after {args:?}"),
        );
    }
}

#[test]
fn status_writes_nothing_in_the_repository() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    env.init_ok(&dir, "N");
    let before = tree(&env.repos);
    for round in 0..2 {
        assert_code(&env.run(&dir, &["status"]), 0, "status");
        assert_same_tree(
            &before,
            &tree(&env.repos),
            &format!("repository after status #{round}"),
        );
    }
}

// ---------------------------------------------------------------- detection

fn simple_project(env: &TestEnv) -> PathBuf {
    let dir = env.project("p");
    write(&dir, "input/a.csv", "aaaa\n");
    write(&dir, "input/b.csv", "bbbb\n");
    write(&dir, "input/c.csv", "cccc\n");
    write(&dir, "output/o.csv", "oooo\n");
    env.init_ok(&dir, "N");
    dir
}

fn set_mtime(p: &Path, t: SystemTime) {
    fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn clean_after_init() {
    let env = TestEnv::new();
    let dir = simple_project(&env);
    let v = env.status_json(&dir, &[]);
    assert_eq!(v["files"], json!([]), "{v:#}");
    assert_eq!(v["has_cache"], true);
    let o = env.run(&dir, &["status"]);
    assert_code(&o, 0, "status");
    assert!(
        stdout(&o).contains("Everything up to date"),
        "{}",
        describe(&o)
    );
}

#[test]
fn same_size_edit_right_after_init_is_detected() {
    let env = TestEnv::new();
    let dir = simple_project(&env);
    // Within the same second as init: same size, new content.
    let a = dir.join("input/a.csv");
    fs::write(&a, "AAAA\n").unwrap();
    // Worst case: same size and the very same mtime as before.
    let b = dir.join("input/b.csv");
    let mtime = fs::metadata(&b).unwrap().modified().unwrap();
    fs::write(&b, "BBBB\n").unwrap();
    set_mtime(&b, mtime);
    let want: Rows = ["input/a.csv", "input/b.csv"]
        .iter()
        .map(|p| (p.to_string(), ("sLCR__C_eq_R_ne_L".into(), "upload".into())))
        .collect();
    for round in 0..2 {
        let v = env.status_json(&dir, &[]);
        assert_eq!(status_rows(&v), want, "round {round}: {v:#}");
    }
}

#[test]
fn touch_alone_shows_nothing_to_sync() {
    let env = TestEnv::new();
    let dir = simple_project(&env);
    let later = SystemTime::now() + Duration::from_secs(3600);
    set_mtime(&dir.join("input/a.csv"), later);
    set_mtime(
        &dir.join("output/o.csv"),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000),
    );
    for round in 0..2 {
        let v = env.status_json(&dir, &[]);
        assert_eq!(v["files"], json!([]), "round {round}: {v:#}");
    }
}

#[test]
fn offline_works_without_the_repository() {
    let env = TestEnv::new();
    let dir = simple_project(&env);
    fs::rename(env.repo("N"), env.repos.join("away")).unwrap();
    write(&dir, "input/c.csv", "changed locally\n");
    let o = env.run(&dir, &["status", "--offline"]);
    assert_code(&o, 0, "status --offline");
    assert!(
        stdout(&o).to_lowercase().contains("offline"),
        "human output must say it is offline\n{}",
        describe(&o)
    );
    assert!(stdout(&o).contains("input/c.csv"), "{}", describe(&o));
    let v = env.status_json(&dir, &["--offline"]);
    assert_eq!(v["offline"], true);
    assert_eq!(
        status_rows(&v),
        [(
            "input/c.csv".to_string(),
            ("sLCR__C_eq_R_ne_L".to_string(), "upload".to_string())
        )]
        .into_iter()
        .collect::<Rows>()
    );
    assert!(
        !env.repo("N").exists(),
        "offline status must not recreate the repository"
    );
}

#[test]
fn unreachable_repository_is_an_error_naming_it() {
    let env = TestEnv::new();
    let dir = simple_project(&env);
    fs::rename(env.repo("N"), env.repos.join("away")).unwrap();
    let o = env.run(&dir, &["status"]);
    assert_code(&o, 1, "status without the repository");
    let err = stderr(&o);
    assert!(
        err.contains(env.repo("N").to_str().unwrap()),
        "{}",
        describe(&o)
    );
    assert!(err.contains("hint:"), "{}", describe(&o));
    assert!(!stdout(&o).contains("Everything up to date"));
    let o = env.run(&dir, &["--json", "status"]);
    assert_code(&o, 1, "status --json without the repository");
    let v = one_json(&o.stdout);
    assert_ne!(v["status"], "ok", "{v:#}");
    assert!(
        !env.repo("N").exists(),
        "status must not recreate the repository"
    );
}

// ---------------------------------------------------------------- damage

/// Status must fail with exit 1 naming `named`, and leave `file` as it was.
fn assert_refused(env: &TestEnv, dir: &Path, file: &Path, named: &str, what: &str) {
    let before = fs::read(file).ok();
    for args in [
        &["status"][..],
        &["status", "--offline"],
        &["status", "--json"],
    ] {
        if args.contains(&"--offline") && !file.starts_with(dir) {
            continue; // offline status does not read the repository
        }
        let o = env.run(dir, args);
        assert_code(&o, 1, &format!("{what}: {args:?}"));
        assert!(
            stderr(&o).contains(named),
            "{what}: {named} not named\n{}",
            describe(&o)
        );
        assert!(
            stderr(&o).contains("hint:"),
            "{what}: no hint\n{}",
            describe(&o)
        );
    }
    assert_eq!(
        fs::read(file).ok(),
        before,
        "{what}: {} was changed",
        file.display()
    );
}

fn cache_path(dir: &Path) -> PathBuf {
    dir.join(".dsg/last-sync.json")
}

#[test]
fn corrupt_cache_manifest_is_refused() {
    let env = TestEnv::new();
    let dir = simple_project(&env);
    let path = cache_path(&dir);
    let good = fs::read(&path).unwrap();
    let named = path.to_str().unwrap().to_string();

    fs::write(&path, &good[..good.len() / 2]).unwrap();
    assert_refused(&env, &dir, &path, &named, "truncated cache");

    let mut m = Mf::parse(&good);
    m.entries["input/a.csv"]["hash"] = json!("0123456789abcdef");
    m.write(&path);
    assert_refused(&env, &dir, &path, &named, "cache with a wrong entries_hash");

    let mut m = Mf::parse(&good);
    m.metadata["entry_count"] = json!(99);
    m.write(&path);
    assert_refused(&env, &dir, &path, &named, "cache with a wrong entry_count");

    fs::write(&path, b"").unwrap();
    assert_refused(&env, &dir, &path, &named, "empty cache");
}

#[test]
fn missing_cache_manifest_with_dsg_dir_is_refused() {
    let env = TestEnv::new();
    let dir = simple_project(&env);
    fs::remove_file(cache_path(&dir)).unwrap();
    for args in [&["status"][..], &["status", "--offline"]] {
        let o = env.run(&dir, args);
        assert_code(&o, 1, "status without .dsg/last-sync.json");
        assert!(stderr(&o).contains("last-sync.json"), "{}", describe(&o));
    }
    assert!(!cache_path(&dir).exists(), "status must not invent a cache");
}

#[test]
fn corrupt_repository_manifest_is_refused() {
    let env = TestEnv::new();
    let dir = simple_project(&env);
    let path = env.repo("N").join(".dsg/last-sync.json");
    let good = fs::read(&path).unwrap();
    let named = path.to_str().unwrap().to_string();

    fs::write(&path, &good[..good.len() - 10]).unwrap();
    assert_refused(&env, &dir, &path, &named, "truncated repository manifest");

    let mut m = Mf::parse(&good);
    m.entries["input/b.csv"]["filesize"] = json!(12345);
    m.write(&path);
    assert_refused(
        &env,
        &dir,
        &path,
        &named,
        "repository manifest with a wrong entries_hash",
    );

    fs::write(&path, b"[]").unwrap();
    assert_refused(
        &env,
        &dir,
        &path,
        &named,
        "repository manifest that is a list",
    );

    fs::remove_file(&path).unwrap();
    let o = env.run(&dir, &["status"]);
    assert_code(&o, 1, "repository without last-sync.json");
    assert!(stderr(&o).contains(&named), "{}", describe(&o));
}

#[test]
fn unsafe_paths_in_manifests_are_refused() {
    let bad: [(&str, serde_json::Value); 4] = [
        (
            "../x",
            file_entry("../x", USER_ID, 2, FIXED_MTIME, "e841f27363849a18"),
        ),
        (
            "/etc/passwd",
            file_entry("/etc/passwd", USER_ID, 2, FIXED_MTIME, "e841f27363849a18"),
        ),
        (
            "input/../../x",
            file_entry("input/../../x", USER_ID, 2, FIXED_MTIME, "e841f27363849a18"),
        ),
        (
            "input/evil.csv",
            link_entry("input/evil.csv", USER_ID, "../../../etc/passwd"),
        ),
    ];
    for side in ["cache", "repository"] {
        for (key, entry) in &bad {
            let env = TestEnv::new();
            let dir = simple_project(&env);
            let path = if side == "cache" {
                cache_path(&dir)
            } else {
                env.repo("N").join(".dsg/last-sync.json")
            };
            let mut m = Mf::load(&path);
            m.set_raw(key, entry.clone());
            m.seal("s1", "Initial snapshot", None);
            m.write(&path);
            let before = (tree(&env.base), repo_tree_sans_locks(&env.repos));
            let o = env.run(&dir, &["status"]);
            assert_code(&o, 1, &format!("{side} manifest with {key:?}"));
            assert!(
                stderr(&o).contains(key),
                "{side}: {key} not named\n{}",
                describe(&o)
            );
            let strip = |t: BTreeMap<String, Node>| -> BTreeMap<String, Node> {
                t.into_iter()
                    .filter(|(k, _)| !is_stat_cache(k) && !k.ends_with(".dsg"))
                    .collect()
            };
            assert_same_tree(&strip(before.0), &strip(tree(&env.base)), key);
            assert_same_tree(
                &strip(before.1),
                &strip(repo_tree_sans_locks(&env.repos)),
                key,
            );
        }
    }
}

// ---------------------------------------------------------------- output

#[test]
fn no_progress_escape_codes_on_a_pipe() {
    let env = TestEnv::new();
    let dir = env.project("p");
    for i in 0..400 {
        write(
            &dir,
            &format!("input/d{}/f{i}.csv", i % 7),
            format!("{i}\n"),
        );
    }
    write(&dir, "input/big.bin", vec![7u8; 4 << 20]);
    let o = env
        .cmd(&dir)
        .env("TERM", "xterm-256color")
        .args(env.init_args("N"))
        .output()
        .unwrap();
    assert_code(&o, 0, "init");
    assert!(
        !has_escape_codes(&o.stdout) && !has_escape_codes(&o.stderr),
        "init: {}",
        describe(&o)
    );
    write(&dir, "input/big.bin", vec![8u8; 4 << 20]);
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["-v", "status"],
        &["list-files"],
    ] {
        let o = env
            .cmd(&dir)
            .env("TERM", "xterm-256color")
            .args(args)
            .output()
            .unwrap();
        assert_code(&o, 0, &args.join(" "));
        assert!(
            !has_escape_codes(&o.stdout) && !has_escape_codes(&o.stderr),
            "{args:?}: {}",
            describe(&o)
        );
    }
}

#[test]
fn status_reports_invalid_names_and_unsafe_links_as_problems() {
    let env = TestEnv::new();
    let dir = simple_project(&env);
    write(&dir, "input/bad?.csv", "b\n");
    link(&dir, "input/abs.csv", "/etc/passwd");
    link(&dir, "input/up.csv", "../../outside.csv");
    let v = env.status_json(&dir, &[]);
    let problems: Vec<&str> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        problems,
        ["input/abs.csv", "input/bad?.csv", "input/up.csv"],
        "{v:#}"
    );
    // Unsafe links are never offered for upload.
    let rows = status_rows(&v);
    assert!(
        !rows.contains_key("input/abs.csv") && !rows.contains_key("input/up.csv"),
        "{v:#}"
    );
    let o = env.run(&dir, &["status"]);
    assert_code(&o, 0, "status");
    assert!(
        !stdout(&o).contains("Everything up to date"),
        "{}",
        describe(&o)
    );
    assert!(stdout(&o).contains("input/abs.csv"), "{}", describe(&o));
}

// ------------------------------------------- caches left by an upload sync

/// The file records of `.dsg/stat-cache` (version 2): path -> (size, ino,
/// hash), and whether the header vouches for the cache manifest.
fn stat_cache_files(dir: &Path) -> (BTreeMap<String, (u64, u64, u64)>, bool) {
    let b = fs::read(dir.join(".dsg/stat-cache")).unwrap();
    assert_eq!(&b[..8], b"DSGSTAT2");
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let (count, known) = (u64_at(16), u64_at(32) == 1);
    let mut pos = 80;
    let mut files = BTreeMap::new();
    for _ in 0..count {
        let len = u32::from_le_bytes(b[pos..pos + 4].try_into().unwrap()) as usize;
        let path = String::from_utf8(b[pos + 4..pos + 4 + len].to_vec()).unwrap();
        pos += 4 + len;
        files.insert(path, (u64_at(pos), u64_at(pos + 24), u64_at(pos + 32)));
        pos += 40;
    }
    (files, known)
}

/// A sync that installs nothing here writes its stat cache and the binary
/// copy of the new cache manifest before the commit (into staging, moved
/// into .dsg/ after the apply, so the manifests are dropped before the
/// repository commits): both must be the new ones, with nothing left in
/// staging.
#[test]
fn an_upload_sync_leaves_the_new_caches() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    write(&dir, "input/b.csv", "b\n");
    write(&dir, "input/gone.csv", "gone\n");
    env.init_ok(&dir, "N");
    write(&dir, "input/a.csv", "a, longer now\n");
    write(&dir, "input/new.csv", "new\n");
    fs::remove_file(dir.join("input/gone.csv")).unwrap();
    let before = fs::read(dir.join(".dsg/stat-cache.manifest")).unwrap();
    assert_code(&env.run(&dir, &["sync", "-m", "up"]), 0, "sync");

    let staging = dir.join(".dsg/staging");
    assert!(
        !staging.exists() || fs::read_dir(&staging).unwrap().next().is_none(),
        "staging left behind"
    );
    let (files, known) = stat_cache_files(&dir);
    assert!(
        !known,
        "the header vouches for a cache manifest the sync replaced"
    );
    let m = Mf::load(&dir.join(".dsg/last-sync.json"));
    assert_eq!(
        files.keys().cloned().collect::<Vec<_>>(),
        m.keys(),
        "the stat cache holds every file of the new manifest"
    );
    for p in ["input/a.csv", "input/b.csv", "input/new.csv"] {
        let md = fs::metadata(dir.join(p)).unwrap();
        let (size, ino, _) = files[p];
        assert_eq!(
            (size, ino),
            (md.len(), std::os::unix::fs::MetadataExt::ino(&md)),
            "{p}"
        );
    }

    // The binary copy is of the new manifest: the very bytes a status
    // makes from the JSON.
    let cache = dir.join(".dsg/stat-cache.manifest");
    let by_sync = fs::read(&cache).unwrap();
    assert_ne!(by_sync, before, "the binary copy is still the old one");
    fs::remove_file(&cache).unwrap();
    let v = env.status_json(&dir, &[]);
    assert_eq!(v["files"], json!([]), "{v:#}");
    assert_eq!(
        fs::read(&cache).unwrap(),
        by_sync,
        "sync's binary copy differs"
    );
}

/// Status asks the repository with the cache manifest's hash that the stat
/// cache's header records, read before the rest of the stat cache is
/// loaded and verified. A header that does not verify must not be
/// believed: here it claims the cache manifest hashes to the repository's
/// new manifest, so believed, the repository would answer "unchanged" and
/// the change there would go unseen.
#[test]
fn a_stat_cache_header_that_does_not_verify_is_not_believed() {
    let env = TestEnv::new();
    let dir = simple_project(&env);
    // Older than the racy window: the next status records C's stat and hash.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(env.status_json(&dir, &[])["files"], json!([]));
    let (_, known) = stat_cache_files(&dir);
    assert!(known, "the stat cache vouches for the cache manifest");

    // The repository moves on: c.csv deleted there.
    let mut r = Mf::load(&cache_path(&dir));
    let prev = r.metadata["snapshot_hash"].as_str().unwrap().to_string();
    r.entries.remove("input/c.csv");
    r.seal("s2", "Sync operation", Some(("s1", &prev)));
    let head = env.repo("N").join(".dsg/last-sync.json");
    r.write(&head);
    let honest = env.status_json(&dir, &[]);
    let rows = status_rows(&honest);
    assert_eq!(rows.len(), 1, "{honest:#}");
    assert!(rows.contains_key("input/c.csv"), "{honest:#}");

    // The header now names the repository's manifest as the cache's (its
    // stat still C's); the file's checksum no longer matches.
    let sc = dir.join(".dsg/stat-cache");
    let mut b = fs::read(&sc).unwrap();
    let repo_hash = xxhash_rust::xxh3::xxh3_64(&fs::read(&head).unwrap());
    b[72..80].copy_from_slice(&repo_hash.to_le_bytes());
    fs::write(&sc, &b).unwrap();
    let v = env.status_json(&dir, &[]);
    assert_eq!(status_rows(&v), rows, "{v:#}");
    assert_ne!(
        fs::read(&sc).unwrap(),
        b,
        "the damaged stat cache is rewritten"
    );
}
