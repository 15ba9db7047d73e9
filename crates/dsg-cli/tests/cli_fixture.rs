//! The repository and clients written by the ORIGINAL Python dsg
//! (`tests/fixtures/original-dsg`, see its README.md and FACTS.json) must open
//! with our `dsg`: legacy `transport: ssh` configs, unsorted manifests whose
//! `entries_hash` is over the stored order, files whose mtimes the copy does
//! not preserve (equality is by hash when both sides have one).
//!
//! Expected results, reasoned from FACTS.json:
//! * alice: C = R (both s4, same bytes) and every tracked file hashes to its
//!   entry (her two former symlinks are regular files in s4 too) → nothing to do.
//! * bob: C is bob's own s2, R is alice's s4 — different metadata, mtimes and
//!   attribution, but per path the same content hash as his files → nothing to do
//!   (the original also said "Everything up to date").
//! * alice-after-step2 (alice's s3, live symlinks): north.csv changed remotely,
//!   and R turned both links into regular files → three downloads, L=C≠R.

mod common;
mod support;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

const GENERATED_REPOS: &str = "/tmp/dsgfix/f1/repos";

fn facts() -> Value {
    serde_json::from_slice(&fs::read(fixture_dir().join("FACTS.json")).unwrap()).unwrap()
}

struct Fx {
    env: TestEnv,
    client: PathBuf,
    repo: PathBuf,
}

/// Re-creates what git cannot store: symlinks (kept as text files holding
/// the target) and empty directories, as FACTS.json lists them.
fn restore(facts: &Value, location: &str, dir: &Path) {
    let loc = &facts["locations"][location];
    for f in loc["files"].as_array().unwrap() {
        if f["type"] == "symlink" {
            let rel = f["path"].as_str().unwrap();
            let target = f["target"].as_str().unwrap();
            let p = dir.join(rel);
            let md = fs::symlink_metadata(&p).unwrap();
            if md.file_type().is_file() {
                assert_eq!(
                    fs::read_to_string(&p).unwrap(),
                    target,
                    "{rel}: a symlink stored as text"
                );
                fs::remove_file(&p).unwrap();
                std::os::unix::fs::symlink(target, &p).unwrap();
            }
        }
    }
    for d in loc["empty_dirs"].as_array().unwrap() {
        fs::create_dir_all(dir.join(d.as_str().unwrap())).unwrap();
    }
}

fn rewrite_config(p: &Path, repos: &Path) {
    let text = fs::read_to_string(p).unwrap();
    assert!(text.contains(GENERATED_REPOS), "{}: {text}", p.display());
    assert!(text.contains("transport: ssh"), "legacy format expected");
    fs::write(p, text.replace(GENERATED_REPOS, repos.to_str().unwrap())).unwrap();
}

/// Copies `repo/` to `<repos>/proj` and `<client>/` to `<base>/<client>`,
/// points their configs at the copy and uses `users/<user>/dsg.yml`.
fn setup(client: &str, user: &str) -> Fx {
    let env = TestEnv::new();
    let fx = fixture_dir();
    let facts = facts();
    let repo = env.repo("proj");
    copy_tree(&fx.join("repo"), &repo);
    restore(&facts, "repo", &repo);
    let dir = env.base.join(client);
    copy_tree(&fx.join(client), &dir);
    restore(&facts, client, &dir);
    rewrite_config(&repo.join(".dsgconfig.yml"), &env.repos);
    rewrite_config(&dir.join(".dsgconfig.yml"), &env.repos);
    fs::copy(
        fx.join("users").join(user).join("dsg.yml"),
        env.user_dir.join("dsg.yml"),
    )
    .unwrap();
    Fx {
        env,
        client: dir,
        repo,
    }
}

type Tree = std::collections::BTreeMap<String, Node>;

/// What status must not change: the client's data, config and manifests
/// (`.dsg/` bookkeeping such as the stat cache, or recovery removing the
/// original's empty `.dsg/staging/`, is allowed), and the repository except
/// its lock file (the strict check is in cli_status.rs).
fn snapshot(fx: &Fx) -> (Tree, Tree) {
    let c = tree(&fx.client)
        .into_iter()
        .filter(|(k, _)| {
            !(k == ".dsg" || k.starts_with(".dsg/"))
                || k == ".dsg/last-sync.json"
                || k == ".dsg/sync-messages.json"
                || k.starts_with(".dsg/archive")
        })
        .collect();
    (c, repo_tree_sans_locks(&fx.env.repos))
}

#[test]
fn helper_xxh3_matches_spec_vectors_and_fixture_files() {
    assert_eq!(hex(xxh3_64(b"")), "2d06800538d394c2");
    assert_eq!(hex(xxh3_64(b"hello")), "9555e8555c62dcfd");
    // spec-data-model §1.15: entries_hash and the snapshot chain.
    let mut m = Mf::empty();
    m.set_raw(
        "input/a.csv",
        file_entry(
            "input/a.csv",
            "alice@example.com",
            12,
            "2025-06-01T10:00:00-07:00",
            "0123456789abcdef",
        ),
    );
    m.set_raw(
        "output/b.csv",
        link_entry("output/b.csv", "alice@example.com", "../input/a.csv"),
    );
    assert_eq!(m.entries_hash(), "d9526a68f1c59424");
    let s1 = chain_hash("d9526a68f1c59424", "Initial snapshot", None);
    assert_eq!(s1, "e35b1621282b3c59");
    assert_eq!(
        chain_hash("d9526a68f1c59424", "Sync operation", Some(&s1)),
        "9c6d547771f9ec08"
    );
    let mut rev = Mf::empty();
    rev.set_raw("output/b.csv", m.entries["output/b.csv"].clone());
    rev.set_raw("input/a.csv", m.entries["input/a.csv"].clone());
    assert_eq!(rev.entries_hash(), "743b4607d0eb145a");

    // Every regular file FACTS.json lists (sizes 0 .. 300000 bytes).
    let facts = facts();
    let fx = fixture_dir();
    let mut n = 0;
    for loc in ["repo", "alice", "bob", "alice-after-step2"] {
        for f in facts["locations"][loc]["files"].as_array().unwrap() {
            if f["type"] != "file" {
                continue;
            }
            let p = fx.join(loc).join(f["path"].as_str().unwrap());
            assert_eq!(
                hex(xxh3_64(&fs::read(&p).unwrap())),
                f["xxh3_64"].as_str().unwrap(),
                "{}",
                p.display()
            );
            n += 1;
        }
        // Stored-order entries_hash of the original's (unsorted) manifests.
        let m = Mf::load(&fx.join(loc).join(".dsg/last-sync.json"));
        assert_eq!(m.entries_hash(), m.metadata["entries_hash"], "{loc}");
    }
    assert!(n > 100, "only {n} files checked");
}

#[test]
fn alice_status_is_clean() {
    let fx = setup("alice", "alice");
    // The premise: alice's cache and the repository head are the same file.
    assert_eq!(
        fs::read(fx.client.join(".dsg/last-sync.json")).unwrap(),
        fs::read(fx.repo.join(".dsg/last-sync.json")).unwrap()
    );
    let before = snapshot(&fx);
    let v = fx.env.status_json(&fx.client, &[]);
    assert_eq!(v["files"], serde_json::json!([]), "{v:#}");
    assert_eq!(v["problems"], serde_json::json!([]), "{v:#}");
    assert_eq!(v["has_cache"], true);
    let o = fx.env.run(&fx.client, &["status"]);
    assert_code(&o, 0, "status");
    assert!(
        stdout(&o).contains("Everything up to date"),
        "{}",
        describe(&o)
    );
    let after = snapshot(&fx);
    assert_same_tree(&before.0, &after.0, "alice's project after status");
    assert_same_tree(&before.1, &after.1, "the repository after status");
}

#[test]
fn bob_status_is_clean_although_his_cache_is_another_chain() {
    let fx = setup("bob", "bob");
    let c = Mf::load(&fx.client.join(".dsg/last-sync.json"));
    let r = Mf::load(&fx.repo.join(".dsg/last-sync.json"));
    assert_ne!(c.metadata["snapshot_hash"], r.metadata["snapshot_hash"]);
    let before = snapshot(&fx);
    let v = fx.env.status_json(&fx.client, &[]);
    assert_eq!(v["files"], serde_json::json!([]), "{v:#}");
    assert_eq!(v["problems"], serde_json::json!([]), "{v:#}");
    let o = fx.env.run(&fx.client, &["status"]);
    assert_code(&o, 0, "status");
    assert!(
        stdout(&o).contains("Everything up to date"),
        "{}",
        describe(&o)
    );
    let after = snapshot(&fx);
    assert_same_tree(&before.0, &after.0, "bob's project after status");
    assert_same_tree(&before.1, &after.1, "the repository after status");
}

/// Bob's last sync is his own s2, which the repository's index (alice's)
/// records with another hash: a forked chain, as the original left it.
/// Nothing local is at risk, so his sync of a change goes ahead.
#[test]
fn bob_syncs_a_change_although_his_cache_is_another_chain() {
    let fx = setup("bob", "bob");
    write(&fx.client, "input/bob-new.csv", "from bob\n");
    let o = fx.env.run(&fx.client, &["sync", "-m", "bob's change"]);
    assert_code(&o, 0, "bob's sync");
    assert_eq!(
        fs::read(fx.repo.join("input/bob-new.csv")).unwrap(),
        b"from bob\n"
    );
    let v = fx.env.status_json(&fx.client, &[]);
    assert_eq!(v["files"], serde_json::json!([]), "{v:#}");
}

/// Alice's s3 is in the repository's history: her sync downloads the three
/// changes (the history check must not stand in the way).
#[test]
fn alice_after_step2_syncs_the_three_remote_changes() {
    let fx = setup("alice-after-step2", "alice");
    let o = fx.env.run(&fx.client, &["sync"]);
    assert_code(&o, 0, "alice's sync");
    for p in [
        "input/geo/regions/north.csv",
        "output/link.csv",
        "output/tables/latest.csv",
    ] {
        assert_eq!(
            fs::read(fx.client.join(p)).unwrap(),
            fs::read(fx.repo.join(p)).unwrap(),
            "{p}"
        );
    }
    let v = fx.env.status_json(&fx.client, &[]);
    assert_eq!(v["files"], serde_json::json!([]), "{v:#}");
}

#[test]
fn alice_after_step2_sees_three_remote_changes() {
    let fx = setup("alice-after-step2", "alice");
    assert!(fs::symlink_metadata(fx.client.join("output/link.csv"))
        .unwrap()
        .file_type()
        .is_symlink());
    let v = fx.env.status_json(&fx.client, &[]);
    let rows = status_rows(&v);
    let want: std::collections::BTreeMap<String, (String, String)> = [
        "input/geo/regions/north.csv",
        "output/link.csv",
        "output/tables/latest.csv",
    ]
    .iter()
    .map(|p| {
        (
            p.to_string(),
            ("sLCR__L_eq_C_ne_R".to_string(), "download".to_string()),
        )
    })
    .collect();
    assert_eq!(rows, want, "{v:#}");
    assert_eq!(v["problems"], serde_json::json!([]), "{v:#}");
}

#[test]
fn list_files_tracks_what_the_original_tracked() {
    let fx = setup("alice", "alice");
    let o = fx.env.run(&fx.client, &["list-files", "--json"]);
    assert_code(&o, 0, "list-files");
    let v = one_json(&o.stdout);
    let c = Mf::load(&fx.client.join(".dsg/last-sync.json"));
    let mut want = c.keys();
    want.sort();
    let got: Vec<String> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, want);
    // Hashes agree with the original's manifest.
    for f in v["files"].as_array().unwrap() {
        let p = f["path"].as_str().unwrap();
        assert_eq!(f["hash"], c.entries[p]["hash"], "{p}");
    }
}

#[test]
fn validate_config_passes_on_the_original_clients() {
    for (client, user) in [("alice", "alice"), ("bob", "bob")] {
        let fx = setup(client, user);
        let o = fx.env.run(&fx.client, &["validate-config"]);
        assert_code(&o, 0, client);
        let o = fx.env.run(&fx.client, &["--json", "validate-config"]);
        assert_code(&o, 0, client);
        let v = one_json(&o.stdout);
        assert_eq!(v["all_passed"], true, "{v:#}");
        // And it checks the repository: without it, it fails.
        fs::rename(&fx.repo, fx.env.repos.join("moved")).unwrap();
        let o = fx.env.run(&fx.client, &["validate-config"]);
        assert_code(&o, 1, client);
    }
}
