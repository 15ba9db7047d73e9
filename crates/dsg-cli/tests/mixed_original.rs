//! Our client beside the ORIGINAL Python dsg (`tests/fixtures/mixed-original`,
//! see its README.md and FACTS.json): the original's clone and sync mint
//! their own snapshot chain, so rosa's last sync (her s2) is no longer in the
//! repository's history (state C = `A/rosa` against `B/repo`).
//!
//! * `status` and `sync` agree: whatever the history check makes `sync`
//!   refuse (exit 3), `status` reports as `blocked`, with the same reason,
//!   paths and hint.
//! * A fork that loses nothing is adopted: when no local file would be
//!   deleted or overwritten on the strength of the stale last sync, `sync`
//!   takes the repository's head as its base and says so.
//!
//! At state C itself both downloads overwrite files equal to rosa's last
//! sync (L = C ≠ R), and nothing in the repository says oskar's versions
//! were made on top of hers (his chain starts at his own clone, and rosa's
//! report.md bytes are nowhere in the repository): C stays blocked.

mod common;
mod support;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/mixed-original")
        .canonicalize()
        .expect("tests/fixtures/mixed-original at the workspace root")
}

fn facts() -> Value {
    serde_json::from_slice(&fs::read(fixture().join("FACTS.json")).unwrap()).unwrap()
}

const AT_RISK: [&str; 2] = ["output/latest.csv", "output/report.md"];
const HISTORY_GONE: &str = "is no longer in the repository's history";

struct Fx {
    env: TestEnv,
    rosa: PathBuf,
    repo: PathBuf,
}

/// State C: `B/repo` as `<repos>/proj`, `A/rosa` pointed at it, rosa's
/// user config. Symlinks, which the fixture keeps as text files holding
/// their target, are made links again (FACTS.json lists them).
fn state_c() -> Fx {
    let env = TestEnv::new();
    let fx = fixture();
    let repo = env.repo("proj");
    copy_tree(&fx.join("B/repo"), &repo);
    let rosa = env.base.join("rosa");
    copy_tree(&fx.join("A/rosa"), &rosa);
    for f in facts()["locations"]["A/rosa"]["data_files"]
        .as_array()
        .unwrap()
    {
        if f["type"] == "symlink" {
            let p = rosa.join(f["path"].as_str().unwrap());
            let target = f["target"].as_str().unwrap();
            if !fs::symlink_metadata(&p).unwrap().file_type().is_symlink() {
                assert_eq!(fs::read_to_string(&p).unwrap(), target);
                fs::remove_file(&p).unwrap();
                std::os::unix::fs::symlink(target, &p).unwrap();
            }
        }
    }
    let cfg = rosa.join(".dsgconfig.yml");
    let text = fs::read_to_string(&cfg).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("  mountpoint: "))
        .expect("repository.mountpoint")
        .to_string();
    fs::write(
        &cfg,
        text.replace(
            &line,
            &format!("  mountpoint: \"{}\"", env.repos.to_str().unwrap()),
        ),
    )
    .unwrap();
    fs::copy(fx.join("users/rosa/dsg.yml"), env.user_dir.join("dsg.yml")).unwrap();
    Fx { env, rosa, repo }
}

fn head(manifest: &Path) -> Value {
    Mf::load(manifest).metadata
}

/// rosa makes her two files equal to the repository's versions (a regular
/// file where she had a link): nothing the sync does then loses anything.
fn take_the_repository_versions(fx: &Fx) {
    for p in AT_RISK {
        let _ = fs::remove_file(fx.rosa.join(p));
        fs::copy(fx.repo.join(p), fx.rosa.join(p)).unwrap();
    }
}

#[test]
fn state_c_status_shows_the_refusal_that_sync_gives() {
    let fx = state_c();
    let before = (tree(&fx.rosa), repo_tree_sans_locks(&fx.env.repos));

    let v = fx.env.status_json(&fx.rosa, &[]);
    let rows = status_rows(&v);
    for p in AT_RISK {
        assert_eq!(
            rows[p],
            ("sLCR__L_eq_C_ne_R".to_string(), "download".to_string()),
            "{v:#}"
        );
    }
    let blocked = &v["blocked"];
    assert!(
        blocked["reason"].as_str().unwrap().contains(HISTORY_GONE),
        "{v:#}"
    );
    assert_eq!(blocked["paths"], json!(AT_RISK), "{v:#}");
    assert!(
        blocked["hint"]
            .as_str()
            .unwrap()
            .contains("dsg sync --adopt-repository-history"),
        "{v:#}"
    );
    // The lost snapshot named with its time, and the repository's head.
    let ours = head(&fx.rosa.join(".dsg/last-sync.json"));
    let reason = blocked["reason"].as_str().unwrap();
    for key in ["snapshot_id", "created_at"] {
        assert!(
            reason.contains(ours[key].as_str().unwrap()),
            "{key}: {reason}"
        );
    }
    assert_eq!(v["adopts_history"], Value::Null, "{v:#}");

    // Status reports; it does not fail.
    let o = fx.env.run(&fx.rosa, &["status"]);
    assert_code(&o, 0, "status");
    let out = stdout(&o);
    assert!(out.contains("Sync is blocked (exit 3"), "{}", describe(&o));
    assert!(out.contains(HISTORY_GONE), "{}", describe(&o));
    for p in AT_RISK {
        assert!(out.contains(&format!("    {p}\n")), "{}", describe(&o));
    }
    assert!(
        out.contains(&format!("hint: {}", blocked["hint"].as_str().unwrap())),
        "{}",
        describe(&o)
    );

    // The same refusal from sync itself.
    let o = fx.env.run(&fx.rosa, &["sync", "--json"]);
    assert_code(&o, 3, "sync at state C");
    let e = one_json(&o.stdout);
    assert_eq!(e["error"], blocked["reason"], "{e:#}");
    assert_eq!(e["paths"], blocked["paths"], "{e:#}");
    assert_eq!(e["hint"], blocked["hint"], "{e:#}");

    let after = (tree(&fx.rosa), repo_tree_sans_locks(&fx.env.repos));
    // The stat cache (and so `.dsg/`'s mtime) is status's to refresh.
    let project = |t: &std::collections::BTreeMap<String, Node>| {
        without_dir_mtimes(t)
            .into_iter()
            .filter(|(k, _)| !k.starts_with(".dsg/stat-cache"))
            .collect()
    };
    assert_same_tree(&project(&before.0), &project(&after.0), "rosa's project");
    assert_same_tree(&before.1, &after.1, "the repository");
}

#[test]
fn a_fork_with_nothing_at_risk_is_adopted_and_the_sync_goes_on() {
    let fx = state_c();
    take_the_repository_versions(&fx);
    write(&fx.rosa, "input/extra.txt", "from rosa\n");
    let oskar = head(&fx.repo.join(".dsg/last-sync.json"));
    let ours = head(&fx.rosa.join(".dsg/last-sync.json"));
    assert_ne!(oskar["snapshot_hash"], ours["snapshot_hash"]);
    let fork = json!({
        "last_sync_id": ours["snapshot_id"],
        "last_sync_hash": ours["snapshot_hash"],
        "head_id": oskar["snapshot_id"],
        "head_hash": oskar["snapshot_hash"],
    });

    let v = fx.env.status_json(&fx.rosa, &[]);
    assert_eq!(v["blocked"], Value::Null, "{v:#}");
    assert_eq!(v["adopts_history"], fork, "{v:#}");
    let o = fx.env.run(&fx.rosa, &["status"]);
    assert_code(&o, 0, "status");
    let note = format!(
        "sync will adopt the repository's history at s2 {}",
        oskar["snapshot_hash"].as_str().unwrap()
    );
    assert!(stdout(&o).contains(&note), "{}", describe(&o));
    assert!(!stdout(&o).contains("blocked"), "{}", describe(&o));

    let o = fx
        .env
        .run(&fx.rosa, &["sync", "--json", "-m", "rosa on top"]);
    assert_code(&o, 0, "sync");
    let r = one_json(&o.stdout);
    assert_eq!(r["result"]["adopted_history"], fork, "{r:#}");
    assert_eq!(r["result"]["snapshot_id"], "s3", "{r:#}");
    assert!(
        stderr(&o).contains(&format!(
            "note: adopted the repository's history at s2 {}",
            oskar["snapshot_hash"].as_str().unwrap()
        )),
        "{}",
        describe(&o)
    );

    // The new snapshot is built on oskar's head, and rosa's last sync is it.
    let new = head(&fx.repo.join(".dsg/last-sync.json"));
    assert_eq!(new["snapshot_id"], "s3");
    assert_eq!(new["snapshot_previous"], "s2");
    assert_eq!(
        fs::read(fx.repo.join(".dsg/last-sync.json")).unwrap(),
        fs::read(fx.rosa.join(".dsg/last-sync.json")).unwrap()
    );
    assert_eq!(
        fs::read(fx.repo.join("input/extra.txt")).unwrap(),
        b"from rosa\n"
    );
    for p in AT_RISK {
        assert_eq!(
            fs::read(fx.rosa.join(p)).unwrap(),
            fs::read(fx.repo.join(p)).unwrap(),
            "{p}"
        );
    }
    assert_eq!(
        fs::read_to_string(fx.rosa.join("output/report.md")).unwrap(),
        "# Report\n\n2 of 4 said yes (oskar).\n"
    );
    let v = fx.env.status_json(&fx.rosa, &[]);
    assert_eq!(v["files"], json!([]), "{v:#}");
    assert_eq!(v["blocked"], Value::Null, "{v:#}");
    assert_eq!(v["adopts_history"], Value::Null, "{v:#}");
}

/// Nothing to upload or download: the sync still adopts the repository's
/// head, or every later change from the repository to a file rosa has not
/// touched would count as an overwrite at risk.
#[test]
fn a_fork_with_no_file_to_change_is_adopted_too() {
    let fx = state_c();
    take_the_repository_versions(&fx);
    let repo_before = repo_tree_sans_locks(&fx.env.repos);
    let repo_head = fs::read(fx.repo.join(".dsg/last-sync.json")).unwrap();

    let o = fx.env.run(&fx.rosa, &["sync"]);
    assert_code(&o, 0, "sync");
    assert!(
        stderr(&o).contains("note: adopted the repository's history at s2"),
        "{}",
        describe(&o)
    );
    assert_eq!(
        fs::read(fx.rosa.join(".dsg/last-sync.json")).unwrap(),
        repo_head,
        "rosa's last sync is the repository's head"
    );
    // No new snapshot: the repository is as it was.
    assert_same_tree(
        &repo_before,
        &repo_tree_sans_locks(&fx.env.repos),
        "the repository",
    );
    let v = fx.env.status_json(&fx.rosa, &[]);
    assert_eq!(v["files"], json!([]), "{v:#}");
    assert_eq!(v["adopts_history"], Value::Null, "{v:#}");
}

/// Past the history check, a conflict is what sync refuses: status names
/// that refusal, not the fork.
#[test]
fn a_conflict_beyond_the_fork_is_the_refusal_status_shows() {
    let fx = state_c();
    take_the_repository_versions(&fx);
    write(
        &fx.rosa,
        "output/report.md",
        "# Report\n\nrosa's own recount\n",
    );
    let v = fx.env.status_json(&fx.rosa, &[]);
    let blocked = &v["blocked"];
    assert!(
        blocked["reason"]
            .as_str()
            .unwrap()
            .starts_with("sync blocked by 1 conflict;"),
        "{v:#}"
    );
    assert_eq!(blocked["paths"], json!(["output/report.md"]), "{v:#}");
    let o = fx.env.run(&fx.rosa, &["sync", "--json"]);
    assert_code(&o, 3, "sync with a conflict");
    let e = one_json(&o.stdout);
    assert_eq!(e["error"], blocked["reason"], "{e:#}");
    assert_eq!(e["paths"], blocked["paths"], "{e:#}");
    assert_eq!(e["hint"], blocked["hint"], "{e:#}");
}

/// The rebase: rosa has edits of her own (one file changed, one added)
/// and the repository has oskar's two (the files at risk). Adopting the
/// repository's history uploads hers, turns his into conflicts in
/// conflicts.txt, and `--continue` settles them as chosen: nothing of
/// either side is lost, and what rosa replaces is kept as a backup.
#[test]
fn adopting_the_forked_history_rebases_local_edits_through_conflicts() {
    let fx = state_c();
    write(&fx.rosa, "input/notes.txt", "rosa's new notes\n");
    write(&fx.rosa, "input/extra.txt", "from rosa\n");
    let rosa_report = fs::read(fx.rosa.join("output/report.md")).unwrap();
    let rosa_latest = fs::read_link(fx.rosa.join("output/latest.csv")).unwrap();
    let oskar = head(&fx.repo.join(".dsg/last-sync.json"));
    let repo_before = repo_tree_sans_locks(&fx.env.repos);
    let project_before = without_dir_mtimes(&tree(&fx.rosa));

    // Refused without the flag; the hint names it.
    let o = fx.env.run(&fx.rosa, &["sync"]);
    assert_code(&o, 3, "sync on a forked history");
    assert!(
        stderr(&o).contains("--adopt-repository-history"),
        "{}",
        describe(&o)
    );
    assert!(!fx.rosa.join("conflicts.txt").exists());

    // A dry run shows the conflicts and writes nothing.
    let o = fx.env.run(
        &fx.rosa,
        &["sync", "--adopt-repository-history", "--dry-run"],
    );
    assert_code(&o, 3, "dry run");
    assert!(!fx.rosa.join("conflicts.txt").exists());

    let o = fx
        .env
        .run(&fx.rosa, &["sync", "--adopt-repository-history"]);
    assert_code(&o, 3, "the rebase stops at its conflicts");
    let text = fs::read_to_string(fx.rosa.join("conflicts.txt")).expect("conflicts.txt");
    assert!(
        text.contains(&format!(
            "\n# Adopting the repository's history: s2 {} ",
            oskar["snapshot_hash"].as_str().unwrap()
        )),
        "{text}"
    );
    for p in AT_RISK {
        assert!(
            text.contains(&format!(
                "# File: {p}\n# Conflict: fork: unchanged here since s2, which the repository's history no longer holds"
            )),
            "{p}: {text}"
        );
    }
    assert_eq!(text.matches("\n# File: ").count(), 2, "{text}");
    assert_same_tree(
        &repo_before,
        &repo_tree_sans_locks(&fx.env.repos),
        "the repository after the blocked rebase",
    );
    let mut now = without_dir_mtimes(&tree(&fx.rosa));
    now.remove("conflicts.txt");
    let keep =
        |t: &std::collections::BTreeMap<String, Node>| -> std::collections::BTreeMap<String, Node> {
            t.iter()
                .filter(|(k, _)| !k.starts_with(".dsg/stat-cache"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
    assert_same_tree(&keep(&project_before), &keep(&now), "rosa's project");

    // rosa takes oskar's latest.csv and keeps her report.md.
    // The instructions followed literally: the chosen line's underscore
    // removed, the other option line deleted.
    let mut file = "";
    let chosen: String = text
        .lines()
        .filter_map(|l| {
            if let Some(f) = l.strip_prefix("# File: ") {
                file = f;
            }
            match (file, l) {
                ("output/latest.csv", "_R  # Use Remote version (download)") => {
                    Some("R  # Use Remote version (download)\n".to_string())
                }
                ("output/report.md", "_L  # Use Local version (upload)") => Some("L\n".to_string()),
                (_, l) if l.starts_with('_') => None,
                (_, l) => Some(format!("{l}\n")),
            }
        })
        .collect();
    fs::write(fx.rosa.join("conflicts.txt"), &chosen).unwrap();
    let o = fx
        .env
        .run(&fx.rosa, &["sync", "--continue", "-m", "rosa rebased"]);
    assert_code(&o, 0, "sync --continue");
    assert!(
        stderr(&o).contains("adopted the repository's history at s2"),
        "{}",
        describe(&o)
    );
    assert!(!fx.rosa.join("conflicts.txt").exists());

    let new = head(&fx.repo.join(".dsg/last-sync.json"));
    assert_eq!(new["snapshot_id"], "s3");
    assert_eq!(new["snapshot_previous"], "s2");
    assert_eq!(
        fs::read(fx.repo.join(".dsg/last-sync.json")).unwrap(),
        fs::read(fx.rosa.join(".dsg/last-sync.json")).unwrap()
    );
    // rosa's edits published; her report kept; oskar's latest.csv taken.
    assert_eq!(
        fs::read(fx.repo.join("input/notes.txt")).unwrap(),
        b"rosa's new notes\n"
    );
    assert_eq!(
        fs::read(fx.repo.join("input/extra.txt")).unwrap(),
        b"from rosa\n"
    );
    assert_eq!(
        fs::read(fx.repo.join("output/report.md")).unwrap(),
        rosa_report
    );
    assert_eq!(
        fs::read(fx.rosa.join("output/report.md")).unwrap(),
        rosa_report
    );
    assert_eq!(
        fs::read(fx.rosa.join("output/latest.csv")).unwrap(),
        fs::read(fx.repo.join("output/latest.csv")).unwrap()
    );
    assert!(!fs::symlink_metadata(fx.rosa.join("output/latest.csv"))
        .unwrap()
        .file_type()
        .is_symlink());
    // What rosa replaced is kept beside it: her link.
    let backups: Vec<PathBuf> = fs::read_dir(fx.rosa.join("output"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with("latest.csv~") && dsg_core::names::is_conflict_backup_name(&n)
        })
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(fs::read_link(&backups[0]).unwrap(), rosa_latest);
    // Never tracked, never published.
    let v = fx.env.status_json(&fx.rosa, &[]);
    assert_eq!(v["files"], json!([]), "{v:#}");
    assert_eq!(v["blocked"], Value::Null, "{v:#}");
    assert!(!fx
        .repo
        .join("output")
        .join(backups[0].file_name().unwrap())
        .exists());
}

/// Renames are judged against the last sync, which a forked history no
/// longer holds: `--normalize` is refused there even with the rebase
/// asked for, before anything is renamed.
#[test]
fn normalize_waits_on_a_forked_history_even_when_adopting() {
    let fx = state_c();
    write(&fx.rosa, "input/CON", "a reserved name\n");
    let before = without_dir_mtimes(&tree(&fx.rosa));
    let repo_before = repo_tree_sans_locks(&fx.env.repos);
    for args in [
        &["sync", "--normalize"][..],
        &["sync", "--normalize", "--adopt-repository-history"],
    ] {
        let o = fx.env.run(&fx.rosa, args);
        assert_code(&o, 3, &format!("{args:?}"));
        assert!(
            stderr(&o).contains("--normalize will not rename files against it"),
            "{}",
            describe(&o)
        );
    }
    assert!(fx.rosa.join("input/CON").exists());
    let keep =
        |t: &std::collections::BTreeMap<String, Node>| -> std::collections::BTreeMap<String, Node> {
            t.iter()
                .filter(|(k, _)| !k.starts_with(".dsg/stat-cache"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
    assert_same_tree(
        &keep(&before),
        &keep(&without_dir_mtimes(&tree(&fx.rosa))),
        "rosa's project",
    );
    assert_same_tree(
        &repo_before,
        &repo_tree_sans_locks(&fx.env.repos),
        "the repository",
    );
}
