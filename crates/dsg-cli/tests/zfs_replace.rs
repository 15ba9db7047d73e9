//! `init --force` over an existing ZFS repository: the dataset is replaced
//! only after the user confirms by naming it; the new data is built in a
//! new dataset and swapped in with the journaled, state-guarded steps of a
//! sync's commit. A crash at every step, recovered by the next command,
//! leaves `POOL/N` either exactly the old repository (its snapshots
//! `@s1 @s2`, its data) or exactly the new one (`@s1` only, the new data),
//! never missing, never a clone, and no transaction dataset, snapshot,
//! mountpoint or journal behind. Skipped without `DSG_TEST_ZFS_POOL`
//! (fails under CI=true).

mod support;
mod sync_support;
mod zfs_support;

use std::panic::{catch_unwind, AssertUnwindSafe};

use sync_support::*;
use zfs_support::*;

fn replace_args(z: &ZEnv, confirm: Option<&str>) -> Vec<String> {
    let mut a = z.init_args();
    a.push("--force".into());
    if let Some(c) = confirm {
        a.push("--confirm-replace".into());
        a.push(c.into());
    }
    a
}

fn run_args(
    z: &ZEnv,
    client: &str,
    args: &[String],
    envs: &[(&str, &str)],
) -> std::process::Output {
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    z.run_env(client, &a, envs)
}

/// Client A made the repository (s1, s2); client C holds other data.
fn setup(z: &ZEnv) {
    z.write("A", &p(IN, "a.csv"), "a0\n");
    z.write("A", &p(IN, "old.bin"), bytes(1, 40_000));
    z.init("A");
    z.write("A", &p(IN, "a.csv"), "a1\n");
    z.write("A", &p(OUT, "r.txt"), "result\n");
    z.ok("A", &["sync", "-m", "second"]);
    z.write("C", &p(IN, "c.csv"), "c\n");
    z.write("C", &p(IN, "sub/new.bin"), bytes(2, 60_000));
}

#[track_caller]
fn assert_old(z: &ZEnv, old: &Tree, ctx: &str) {
    assert_eq!(
        z.assert_repo_dataset(ctx),
        2,
        "{ctx}: head of the old repository"
    );
    assert_same(
        &format!("{ctx}: repository data (OLD)"),
        old,
        &tracked(&data_tree(&z.repo())),
    );
    z.assert_no_zfs_leftovers(ctx);
}

#[track_caller]
fn assert_new(z: &ZEnv, c_data: &Tree, ctx: &str) {
    assert_eq!(
        z.assert_repo_dataset(ctx),
        1,
        "{ctx}: head of the new repository"
    );
    assert_same(
        &format!("{ctx}: repository data (NEW)"),
        c_data,
        &tracked(&data_tree(&z.repo())),
    );
    z.assert_no_zfs_leftovers(ctx);
}

#[test]
fn zfs_init_force_replaces_the_dataset_only_after_confirmation() {
    let Some(z) = ZEnv::new("zrepl") else { return };
    setup(&z);
    let old = tracked(&data_tree(&z.repo()));
    let c_data = tracked(&data_tree(&z.client("C")));

    let o = run_args(&z, "C", &replace_args(&z, None), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains(&format!("--confirm-replace {}", z.repo_name)),
        "{}",
        show(&o)
    );
    assert!(
        stderr(&o).contains(&z.dataset()),
        "names the dataset: {}",
        show(&o)
    );
    assert_old(&z, &old, "after an unconfirmed --force");

    let o = run_args(&z, "C", &replace_args(&z, Some("wrong")), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert_old(&z, &old, "after a wrong confirmation");

    let name = z.repo_name.clone();
    let o = run_args(&z, "C", &replace_args(&z, Some(&name)), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_new(&z, &c_data, "after a confirmed replace");
    z.assert_clean("C");
    // The new repository syncs like any other.
    z.write("C", &p(IN, "c.csv"), "c2\n");
    z.ok("C", &["sync", "-m", "after replace"]);
    assert_eq!(z.assert_repo_dataset("sync after replace"), 2);
}

/// A history read open on the old repository does not stop its
/// replacement: its clone goes with the history it showed.
#[test]
fn a_replace_removes_history_read_clones_of_the_old_dataset() {
    let Some(z) = ZEnv::new("zrplview") else {
        return;
    };
    setup(&z);
    let c_data = tracked(&data_tree(&z.client("C")));
    let zf = dsg_repo::zfs::Zfs::new(&z.pool, &z.repo()).unwrap();
    let view = zf.open_snapshot("s1").expect("open s1");
    assert!(view.path.join(".dsg/last-sync.json").is_file());
    let name = z.repo_name.clone();
    let o = run_args(&z, "C", &replace_args(&z, Some(&name)), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    drop(view);
    assert_new(
        &z,
        &c_data,
        "after replacing a dataset with an open history read",
    );
}

/// The swap is committed but its last step fails (`incomplete`): init must
/// not throw its local state away. It says the outcome is pending; the next
/// command finishes the repository and installs the project's `.dsg`.
#[test]
fn a_replace_that_commits_but_cannot_finish_is_completed_by_the_next_command() {
    let Some(z) = ZEnv::new("zrplinc") else {
        return;
    };
    setup(&z);
    let c_data = tracked(&data_tree(&z.client("C")));
    let path = z.failing_zfs_path("destroy -r *--old-*");
    let name = z.repo_name.clone();
    let o = run_args(
        &z,
        "C",
        &replace_args(&z, Some(&name)),
        &[("PATH", path.as_str())],
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        z.wrapper_calls(&path)
            .iter()
            .any(|c| c.starts_with("destroy -r") && c.contains("--old-")),
        "the failing step was never reached: {:?}",
        z.wrapper_calls(&path)
    );
    assert!(
        z.datasets().contains(&z.dataset()),
        "the repository dataset is missing: {:?}",
        z.datasets()
    );
    let st = z.run("C", &["status"]);
    assert_eq!(st.status.code(), Some(0), "{}", show(&st));
    assert_new(&z, &c_data, "after the next command");
    assert_eq!(
        std::fs::read(z.client("C").join(".dsg/last-sync.json")).unwrap(),
        std::fs::read(z.repo().join(".dsg/last-sync.json")).unwrap(),
        "C's cache vs the new head"
    );
    assert_no_leftovers(&z.client("C"));
}

#[test]
fn crash_at_every_step_of_a_zfs_replacing_init() {
    let Some(reference) = ZEnv::new("zrplref") else {
        return;
    };
    setup(&reference);
    let name = reference.repo_name.clone();
    let o = run_args(
        &reference,
        "C",
        &replace_args(&reference, Some(&name)),
        &[("DSG_FAILPOINT", "list")],
    );
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let fps = failpoints_of(&o);
    drop(reference);
    for s in [
        "zfs.replace.journal",
        "zfs.snapshot",
        "zfs.journal.committed",
        "zfs.rename_old",
        "zfs.rename_new",
        "zfs.destroy_old",
    ] {
        assert!(fps.iter().any(|f| f == s), "{s} not passed: {fps:?}");
    }
    let commit = fps
        .iter()
        .position(|f| f == "zfs.journal.committed")
        .unwrap();

    let (mut done, mut failed) = (Vec::new(), Vec::new());
    let mut cur: Option<(ZEnv, Tree, Tree)> = None;
    for (i, fp) in fps.iter().enumerate() {
        let committed = i >= commit;
        let r = catch_unwind(AssertUnwindSafe(|| {
            if cur.is_none() {
                let z = ZEnv::new("zrpl").expect("pool");
                setup(&z);
                let old = tracked(&data_tree(&z.repo()));
                let c_data = tracked(&data_tree(&z.client("C")));
                cur = Some((z, old, c_data));
            }
            let (z, old, c_data) = cur.as_ref().unwrap();
            let ctx = format!("replacing zfs init crashed at {fp}");
            let name = z.repo_name.clone();
            let o = run_args(
                z,
                "C",
                &replace_args(z, Some(&name)),
                &[("DSG_FAILPOINT", fp)],
            );
            assert!(killed(&o.status), "{ctx}: expected SIGKILL: {}", show(&o));
            // Never missing, even before recovery.
            assert!(
                z.datasets()
                    .iter()
                    .any(|d| d == &z.dataset() || d.starts_with(&format!("{}--", z.dataset()))),
                "{ctx}: no dataset at all: {:?}",
                z.datasets()
            );
            let st = z.run("A", &["status"]);
            assert!(st.status.code().is_some(), "{ctx}: status crashed");
            assert!(
                z.datasets().contains(&z.dataset()),
                "{ctx}: {} is missing after recovery: {:?}",
                z.dataset(),
                z.datasets()
            );
            let _ = z.run("C", &["status"]);
            if committed {
                assert_new(z, c_data, &ctx);
                assert_eq!(
                    std::fs::read(z.client("C").join(".dsg/last-sync.json")).unwrap(),
                    std::fs::read(z.repo().join(".dsg/last-sync.json")).unwrap(),
                    "{ctx}: C's cache vs the new head"
                );
            } else {
                assert_old(z, old, &ctx);
                assert!(!z.client("C").join(".dsg").exists(), "{ctx}: C has a .dsg");
            }
            assert_no_leftovers(&z.client("C"));
        }));
        match r {
            Ok(()) => done.push(format!("{fp}={}", if committed { "New" } else { "Old" })),
            Err(e) => {
                done.push(format!("{fp}=FAILED"));
                failed.push((fp.clone(), panic_text(&e)));
                cur = None;
            }
        }
        if committed {
            cur = None;
        }
    }
    eprintln!(
        "replacing zfs init: {} crash points: {}",
        done.len(),
        done.join(" ")
    );
    assert!(failed.is_empty(), "crash points violating G1: {failed:#?}");
}
