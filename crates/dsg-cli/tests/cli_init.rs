//! `dsg init`: what it writes (checked on disk), what it refuses, and crash
//! safety at every init failpoint.

mod common;
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use common::*;
use serde_json::Value;

/// Pseudo-random bytes (several XXH3 blocks; not compressible into sameness).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A project with tracked data, untracked files, hidden files and links.
/// Returns the expected repository content (`content_map` format).
fn rich_project(dir: &Path) -> BTreeMap<String, String> {
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("input/a.csv", b"id,v\n1,2\n".to_vec()),
        ("input/sub/b.csv", b"x\n".to_vec()),
        ("input/empty.txt", Vec::new()),
        ("input/big.bin", noise(300_000, 7)),
        (
            "input/caf\u{e9} data.csv",
            "\u{30c7}\u{30fc}\u{30bf}\n".as_bytes().to_vec(),
        ),
        ("output/tables/t1.csv", b"t1\n".to_vec()),
        ("frozen/2023/f.txt", b"frozen\n".to_vec()),
        ("task1/input/nested.csv", b"nested\n".to_vec()),
    ];
    let mut want = BTreeMap::new();
    for (p, c) in &files {
        write(dir, p, c);
        want.insert(p.to_string(), hex(xxh3_64(c)));
    }
    link(dir, "output/l.csv", "../input/a.csv");
    want.insert("output/l.csv".into(), "-> ../input/a.csv".into());
    link(dir, "output/subdir", "../input/sub");
    want.insert("output/subdir".into(), "-> ../input/sub".into());
    link(dir, "output/dangling.csv", "missing.csv");
    want.insert("output/dangling.csv".into(), "-> missing.csv".into());
    // Not tracked: outside data dirs, hidden, or not an exact component match.
    write(dir, "README.md", "# readme\n");
    write(dir, "src/x.py", "print(1)\n");
    write(dir, "inputs/not.csv", "no\n");
    write(dir, "input/.hidden", "h\n");
    write(dir, "input/.cache/c.csv", "h\n");
    write(dir, ".hidden/input/h.csv", "h\n");
    want
}

fn data_of(repo: &Path) -> BTreeMap<String, String> {
    content_map(repo)
        .into_iter()
        .filter(|(k, _)| !k.starts_with(".dsg/"))
        .collect()
}

fn is_la_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 25
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && (s.ends_with("-08:00") || s.ends_with("-07:00"))
}

#[test]
fn init_writes_repository_and_manifests() {
    let env = TestEnv::new();
    let dir = env.project("p");
    let want = rich_project(&dir);
    let o = env.init(&dir, "N", &["-m", "First data"]);
    assert_code(&o, 0, "init");
    let repo = env.repo("N");

    // Repository: exactly the tracked data, byte-identical; links as links.
    assert_eq!(data_of(&repo), want, "repository content");
    assert!(fs::symlink_metadata(repo.join("output/subdir"))
        .unwrap()
        .file_type()
        .is_symlink());
    // The project's own files are untouched.
    let proj = content_map(&dir);
    for (k, v) in &want {
        assert_eq!(proj.get(k), Some(v), "{k} in the project");
    }

    // Manifests: local and repository copies are the same bytes.
    let local = fs::read(dir.join(".dsg/last-sync.json")).unwrap();
    let remote = fs::read(repo.join(".dsg/last-sync.json")).unwrap();
    assert_eq!(local, remote, "local and repository last-sync.json differ");
    assert!(
        !local.ends_with(b"\n"),
        "the original writes no trailing newline"
    );
    let m = Mf::parse(&local);
    let keys = m.keys();
    let mut sorted = keys.clone();
    sorted.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(keys, sorted, "entries must be written sorted by path");
    assert_eq!(
        keys,
        want.keys().cloned().collect::<Vec<_>>(),
        "tracked paths"
    );
    for (k, e) in &m.entries {
        assert_eq!(e["path"], k.as_str());
        assert_eq!(e["user"], USER_ID, "{k}");
        if let Some(t) = want[k].strip_prefix("-> ") {
            assert_eq!(e["type"], "link", "{k}");
            assert_eq!(e["reference"], t, "{k}");
            let fields: Vec<&String> = e.as_object().unwrap().keys().collect();
            assert_eq!(fields, ["type", "path", "user", "reference"], "{k}");
        } else {
            assert_eq!(e["type"], "file", "{k}");
            assert_eq!(e["hash"], want[k].as_str(), "{k}");
            let size = fs::metadata(dir.join(k)).unwrap().len();
            assert_eq!(e["filesize"], size, "{k}");
            assert!(is_la_time(e["mtime"].as_str().unwrap()), "{k}: {e}");
            let fields: Vec<&String> = e.as_object().unwrap().keys().collect();
            assert_eq!(
                fields,
                ["type", "path", "user", "filesize", "mtime", "hash"],
                "{k}"
            );
        }
    }
    let md = &m.metadata;
    assert_eq!(md["snapshot_id"], "s1");
    assert_eq!(md["snapshot_message"], "First data");
    assert_eq!(md["snapshot_previous"], Value::Null);
    assert_eq!(md["created_by"], USER_ID);
    assert_eq!(md["entry_count"], m.entries.len());
    assert_eq!(md["entries_hash"], m.entries_hash().as_str());
    assert_eq!(
        md["snapshot_hash"],
        chain_hash(&m.entries_hash(), "First data", None).as_str()
    );
    let md_keys: Vec<&String> = md.as_object().unwrap().keys().collect();
    assert_eq!(
        md_keys,
        [
            "manifest_version",
            "snapshot_id",
            "created_at",
            "entry_count",
            "entries_hash",
            "created_by",
            "snapshot_message",
            "snapshot_previous",
            "snapshot_hash",
            "snapshot_notes",
            "project_config"
        ]
    );

    // sync-messages.json on both sides: s1 with the manifest's metadata.
    for side in [&dir, &repo] {
        let sm: Value =
            serde_json::from_slice(&fs::read(side.join(".dsg/sync-messages.json")).unwrap())
                .unwrap();
        let snaps = sm["snapshots"].as_object().expect("snapshots");
        assert_eq!(
            snaps.keys().collect::<Vec<_>>(),
            ["s1"],
            "{}",
            side.display()
        );
        assert_eq!(&snaps["s1"], md, "{}", side.display());
        assert!(side.join(".dsg/archive").is_dir(), "{}", side.display());
    }
    assert!(dir.join(".dsg/stat-cache").is_file());
    assert!(dir.join(".dsgconfig.yml").is_file());
    assert!(init_leftovers(&dir).is_empty());
    assert!(repo_init_leftovers(&env.repos, "N").is_empty());

    // And the result is in sync.
    let v = env.status_json(&dir, &[]);
    assert_eq!(v["files"], serde_json::json!([]), "{v:#}");
    assert_eq!(v["problems"], serde_json::json!([]), "{v:#}");
}

/// An init leaves the manifest's binary cache as a sync does: the very
/// bytes a status makes itself from the JSON (so the first status after
/// an init loads it instead of parsing the JSON).
#[test]
fn init_leaves_the_binary_cache_a_status_would_make() {
    let env = TestEnv::new();
    let dir = env.project("p");
    rich_project(&dir);
    assert_code(&env.init(&dir, "N", &[]), 0, "init");
    let cache = dir.join(".dsg/stat-cache.manifest");
    let by_init = fs::read(&cache).expect("init wrote the binary cache");
    fs::remove_file(&cache).unwrap();
    let v = env.status_json(&dir, &[]);
    assert_eq!(v["files"], serde_json::json!([]), "{v:#}");
    assert_eq!(
        fs::read(&cache).expect("status wrote it again"),
        by_init,
        "init's binary cache differs from the one status makes"
    );
}

#[test]
fn init_default_message_and_config_round_trip() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    env.init_ok(&dir, "N");
    let m = Mf::load(&dir.join(".dsg/last-sync.json"));
    assert_eq!(m.metadata["snapshot_message"], "Initial snapshot");
    assert_eq!(
        m.metadata["snapshot_hash"],
        chain_hash(&m.entries_hash(), "Initial snapshot", None).as_str()
    );
    // The written config names the repository (validate-config reaches it).
    let o = env.run(&dir, &["validate-config"]);
    assert_code(&o, 0, "validate-config");
}

#[test]
fn init_dry_run_writes_nothing() {
    let env = TestEnv::new();
    let dir = env.project("p");
    rich_project(&dir);
    let before = (tree(&env.base), tree(&env.repos));
    let o = env.init(&dir, "N", &["--dry-run"]);
    assert_code(&o, 0, "init --dry-run");
    let o2 = env.init(&dir, "N", &["--dry-run", "--json"]);
    assert_code(&o2, 0, "init --dry-run --json");
    one_json(&o2.stdout);
    assert_same_tree(&before.0, &tree(&env.base), "project after --dry-run");
    assert_same_tree(
        &before.1,
        &tree(&env.repos),
        "repository path after --dry-run",
    );
}

#[test]
fn init_normalize_dry_run_renames_nothing() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/bad?.csv", "b\n");
    write(&dir, "input/cafe\u{301}.csv", "nfd\n");
    let before = (tree(&env.base), tree(&env.repos));
    let o = env.init(&dir, "N", &["--normalize", "--dry-run"]);
    assert_code(&o, 0, "init --normalize --dry-run");
    assert!(stdout(&o).contains("bad?.csv"), "{}", describe(&o));
    assert_same_tree(
        &before.0,
        &tree(&env.base),
        "project after --normalize --dry-run",
    );
    assert_same_tree(
        &before.1,
        &tree(&env.repos),
        "repository path after --normalize --dry-run",
    );
}

#[test]
fn init_normalize_renames_on_disk_and_in_repo() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/bad?.csv", "bad\n");
    write(&dir, "input/cafe\u{301}.csv", "nfd\n");
    write(&dir, "input/ok.csv", "ok\n");
    let o = env.init(&dir, "N", &["--normalize"]);
    assert_code(&o, 0, "init --normalize");
    let want: BTreeMap<String, String> = [
        ("input/bad_.csv", "bad\n"),
        ("input/caf\u{e9}.csv", "nfd\n"),
        ("input/ok.csv", "ok\n"),
    ]
    .iter()
    .map(|(p, c)| (p.to_string(), hex(xxh3_64(c.as_bytes()))))
    .collect();
    let proj: BTreeMap<String, String> = content_map(&dir)
        .into_iter()
        .filter(|(k, _)| k.starts_with("input/"))
        .collect();
    assert_eq!(proj, want, "project after --normalize");
    assert_eq!(
        data_of(&env.repo("N")),
        want,
        "repository after --normalize"
    );
    let m = Mf::load(&dir.join(".dsg/last-sync.json"));
    assert_eq!(m.keys(), want.keys().cloned().collect::<Vec<_>>());
}

#[test]
fn init_refuses_when_dsg_exists() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    write(&dir, ".dsg/keep", "mine\n");
    let before = (tree(&env.base), tree(&env.repos));
    let o = env.init(&dir, "N", &[]);
    assert_code(&o, 1, "init over an existing .dsg");
    assert!(stderr(&o).contains("hint:"), "{}", describe(&o));
    assert_same_tree(&before.0, &tree(&env.base), "project");
    assert_same_tree(&before.1, &tree(&env.repos), "repository path");
}

#[test]
fn init_with_missing_repository_path_writes_nothing() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    let missing = env.repos.join("missing");
    let before = (tree(&env.base), tree(&env.repos));
    let o = env
        .cmd(&dir)
        .args(init_args_at(&missing, "N"))
        .output()
        .unwrap();
    assert_code(&o, 1, "init with a missing --repo-path");
    let err = stderr(&o);
    assert!(err.contains(missing.to_str().unwrap()), "{}", describe(&o));
    assert!(err.contains("hint:"), "{}", describe(&o));
    // Nothing may remain (the init may have written and removed its config).
    assert_same_tree(
        &without_dir_mtimes(&before.0),
        &without_dir_mtimes(&tree(&env.base)),
        "project (no .dsg, no .dsgconfig.yml)",
    );
    assert_same_tree(&before.1, &tree(&env.repos), "repository path");
    assert!(!missing.exists());
}

#[test]
fn init_refuses_an_existing_repository_name() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    write(&env.repo("N"), "precious.txt", "do not touch\n");
    write(&env.repo("N"), "input/a.csv", "old\n");
    let before = (tree(&env.base), tree(&env.repos));
    let o = env.init(&dir, "N", &[]);
    assert_code(&o, 1, "init onto an existing repository dir");
    assert!(
        stderr(&o).contains(env.repo("N").to_str().unwrap()),
        "{}",
        describe(&o)
    );
    assert_same_tree(
        &without_dir_mtimes(&before.0),
        &without_dir_mtimes(&tree(&env.base)),
        "project (no .dsg, no .dsgconfig.yml)",
    );
    let after = tree(&env.repos);
    let strip = |t: &BTreeMap<String, Node>| -> BTreeMap<String, Node> {
        t.iter()
            .filter(|(k, _)| k.as_str() == "N" || k.starts_with("N/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert_same_tree(
        &strip(&before.1),
        &strip(&after),
        "the existing repository dir",
    );
    assert!(
        repo_init_leftovers(&env.repos, "N").is_empty(),
        "{:?}",
        ls(&env.repos)
    );
}

#[test]
fn init_blocks_invalid_file_names() {
    for bad in [
        "input/bad?.csv",
        "input/CON.txt",
        "input/trailing.csv ",
        "input/dir /x.csv",
        "input/a<b.csv",
    ] {
        let env = TestEnv::new();
        let dir = env.project("p");
        write(&dir, "input/ok.csv", "ok\n");
        write(&dir, bad, "bad\n");
        let before = (tree(&env.base), tree(&env.repos));
        let o = env.init(&dir, "N", &[]);
        assert_code(&o, 3, bad);
        assert!(
            stderr(&o).contains(bad),
            "{bad:?} not named\n{}",
            describe(&o)
        );
        assert!(stderr(&o).contains("hint:"), "{}", describe(&o));
        assert_same_tree(&before.0, &tree(&env.base), bad);
        assert_same_tree(&before.1, &tree(&env.repos), bad);
    }
}

#[test]
fn init_blocks_unsafe_symlinks() {
    for (path, target) in [
        ("input/abs.csv", "/etc/passwd"),
        ("input/up.csv", "../../outside.csv"),
        ("input/sub/deep.csv", "../../../etc/passwd"),
        ("output/x/y.csv", "../../input/../../z"),
    ] {
        let env = TestEnv::new();
        let dir = env.project("p");
        write(&dir, "input/ok.csv", "ok\n");
        link(&dir, path, target);
        let before = (tree(&env.base), tree(&env.repos));
        let o = env.init(&dir, "N", &[]);
        assert_code(&o, 3, &format!("{path} -> {target}"));
        assert!(
            stderr(&o).contains(path),
            "{path} not named\n{}",
            describe(&o)
        );
        assert_same_tree(&before.0, &tree(&env.base), path);
        assert_same_tree(&before.1, &tree(&env.repos), path);
    }
}

#[test]
fn init_accepts_links_that_stay_inside() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    write(&dir, "README.md", "r\n");
    link(&dir, "input/sub/up.csv", "../a.csv");
    link(&dir, "input/sub/root.md", "../../README.md");
    env.init_ok(&dir, "N");
    let repo = env.repo("N");
    assert_eq!(
        fs::read_link(repo.join("input/sub/root.md")).unwrap(),
        Path::new("../../README.md")
    );
}

// ---------------------------------------------------------------- crashes

const INIT_FAILPOINTS: [&str; 4] = [
    "client.init.staged",
    "repo.init.before_rename",
    "repo.init.after_rename",
    "client.init.committed",
];

fn small_project(env: &TestEnv) -> std::path::PathBuf {
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    write(&dir, "input/sub/b.csv", "bb\n");
    link(&dir, "output/l.csv", "../input/a.csv");
    dir
}

/// Runs init with `DSG_FAILPOINT=fp` and checks it died by SIGKILL.
fn crash_init(env: &TestEnv, dir: &Path, fp: &str) {
    let o = env
        .cmd(dir)
        .env("DSG_FAILPOINT", fp)
        .args(env.init_args("N"))
        .output()
        .unwrap();
    assert_eq!(
        o.status.signal(),
        Some(9),
        "{fp}: not killed\n{}",
        describe(&o)
    );
}

#[test]
fn init_failpoints_are_passed_in_order() {
    let env = TestEnv::new();
    let dir = small_project(&env);
    let o = env
        .cmd(&dir)
        .env("DSG_FAILPOINT", "list")
        .args(env.init_args("N"))
        .output()
        .unwrap();
    assert_code(&o, 0, "init with DSG_FAILPOINT=list");
    let seen: Vec<String> = stderr(&o)
        .lines()
        .filter_map(|l| l.strip_prefix("failpoint: "))
        .map(String::from)
        .filter(|n| n.contains("init"))
        .collect();
    assert_eq!(seen, INIT_FAILPOINTS, "{}", describe(&o));
}

#[test]
fn crash_before_the_commit_point_rolls_back() {
    for fp in &INIT_FAILPOINTS[..2] {
        let env = TestEnv::new();
        let dir = small_project(&env);
        let data = content_map(&dir);
        crash_init(&env, &dir, fp);
        // Any command recovers first (status itself then fails: there is no
        // repository, and the .dsgconfig.yml written by the init may remain).
        let o = env.run(&dir, &["status"]);
        assert_ne!(
            o.status.code(),
            None,
            "{fp}: status crashed\n{}",
            describe(&o)
        );
        assert!(
            !env.repo("N").exists(),
            "{fp}: repository exists after rollback"
        );
        assert!(
            !dir.join(".dsg").exists(),
            "{fp}: local .dsg exists after rollback"
        );
        assert_eq!(init_leftovers(&dir), Vec::<String>::new(), "{fp}");
        let now: BTreeMap<String, String> = content_map(&dir)
            .into_iter()
            .filter(|(k, _)| k != ".dsgconfig.yml")
            .collect();
        assert_eq!(now, data, "{fp}: project data changed");
        // And init can simply be run again.
        env.init_ok(&dir, "N");
        let v = env.status_json(&dir, &[]);
        assert_eq!(v["files"], serde_json::json!([]), "{fp}: {v:#}");
        assert_eq!(
            fs::read(dir.join(".dsg/last-sync.json")).unwrap(),
            fs::read(env.repo("N").join(".dsg/last-sync.json")).unwrap()
        );
    }
}

#[test]
fn crash_before_the_commit_point_leaves_no_repository_staging() {
    for fp in &INIT_FAILPOINTS[..2] {
        let env = TestEnv::new();
        let dir = small_project(&env);
        crash_init(&env, &dir, fp);
        let _ = env.run(&dir, &["status"]);
        assert_eq!(
            repo_init_leftovers(&env.repos, "N"),
            Vec::<String>::new(),
            "{fp}: the repository-side init staging survived recovery"
        );
    }
}

#[test]
fn crash_after_the_commit_point_rolls_forward() {
    for fp in &INIT_FAILPOINTS[2..] {
        let env = TestEnv::new();
        let dir = small_project(&env);
        let data = content_map(&dir);
        crash_init(&env, &dir, fp);
        assert!(env.repo("N").join(".dsg/last-sync.json").is_file(), "{fp}");
        let o = env.run(&dir, &["status"]);
        assert_code(&o, 0, &format!("status after a crash at {fp}"));
        assert!(
            stdout(&o).contains("Everything up to date"),
            "{}",
            describe(&o)
        );
        let local = fs::read(dir.join(".dsg/last-sync.json")).unwrap();
        let remote = fs::read(env.repo("N").join(".dsg/last-sync.json")).unwrap();
        assert_eq!(local, remote, "{fp}: local and repository manifests differ");
        assert_eq!(init_leftovers(&dir), Vec::<String>::new(), "{fp}");
        assert_eq!(
            repo_init_leftovers(&env.repos, "N"),
            Vec::<String>::new(),
            "{fp}"
        );
        assert!(dir.join(".dsg/sync-messages.json").is_file(), "{fp}");
        assert_eq!(
            data_of(&env.repo("N")),
            data.into_iter()
                .filter(|(k, _)| k.starts_with("input/") || k.starts_with("output/"))
                .collect(),
            "{fp}"
        );
        let v = env.status_json(&dir, &[]);
        assert_eq!(v["files"], serde_json::json!([]), "{fp}: {v:#}");
    }
}

#[test]
fn init_after_a_crash_past_the_commit_point_recovers_first() {
    let env = TestEnv::new();
    let dir = small_project(&env);
    crash_init(&env, &dir, "repo.init.after_rename");
    let _ = env.init(&dir, "N", &[]);
    assert_eq!(init_leftovers(&dir), Vec::<String>::new());
    assert_eq!(
        fs::read(dir.join(".dsg/last-sync.json")).unwrap(),
        fs::read(env.repo("N").join(".dsg/last-sync.json")).unwrap()
    );
}

#[test]
fn init_after_a_crash_before_the_commit_point_leaves_no_leftovers() {
    let env = TestEnv::new();
    let dir = small_project(&env);
    crash_init(&env, &dir, "client.init.staged");
    env.init_ok(&dir, "N");
    assert_eq!(init_leftovers(&dir), Vec::<String>::new());
    assert_eq!(repo_init_leftovers(&env.repos, "N"), Vec::<String>::new());
}
