//! `init --force` over an existing repository, on every kind: it replaces
//! the repository only after the user confirms by naming it, and the
//! replacement is atomic — a crash anywhere, recovered by the next command,
//! leaves exactly the old repository or exactly the new one, never a
//! missing or half-built one (G1). OLD: on xfs the repository's whole
//! listing (metadata, object store, file mtimes); on zfs `POOL/N` with its
//! snapshots `@s1 @s2` and its data. NEW: head `s1`, the new project's
//! data, no old objects, no transaction left (zfs: no `POOL/N--*` dataset,
//! snapshot, mountpoint or journal).
//!
//! | test                                                       | xfs | zfs | ssh |
//! |------------------------------------------------------------|-----|-----|-----|
//! | init_force_replaces_only_after_confirmation                |  x  |  x  |     |
//! | crash_at_every_step_of_a_replacing_init                    |  x  |  x  |     |
//! | a_client_of_the_replaced_repository_is_blocked_not_emptied |  x  |  x  |  x  |
//! | a_client_of_the_replaced_repository_with_nothing_at_risk_syncs | x | x |  x  |
//! | a_directory_that_is_not_a_repository_is_not_offered_for_replacement | x | | |
//! | init_force_on_a_terminal_asks_for_the_name                 |  x  |     |     |
//! | a_failed_replace_over_an_s1_repository_is_a_failure        |  x  |     |     |
//! | a_replace_removes_history_read_clones_of_the_old_dataset   |     |  x  |     |
//! | a_replace_that_commits_but_cannot_finish_is_completed_by_the_next_command | | x | |
//!
//! The crash matrix needs the repository's failpoints, which do not fire
//! over ssh; the xfs-only tests use posix failpoints or a directory in the
//! repository's place; the zfs-only ones, history clones and a failing
//! `zfs` command. Formerly sync_replace.rs (xfs) and zfs_replace.rs (zfs).

mod world;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use world::*;

/// Client A made the repository (s1, s2); client C holds unrelated data.
fn setup(e: &World) {
    e.write("A", "task/input/a.csv", "a0\n");
    e.write("A", "task/input/old.bin", bytes(1, 50_000));
    e.init("A");
    e.write("A", "task/input/a.csv", "a1\n");
    e.write("A", "task/output/r.txt", "result\n");
    e.ok("A", &["sync", "-m", "second"]);
    e.write("C", "task/input/c.csv", "c\n");
    e.write("C", "task/input/sub/new.bin", bytes(2, 70_000));
    make_link(&e.client("C"), "task/output/l.csv", "../input/c.csv");
}

/// The old repository as the checks of OLD need it: its whole listing and
/// its tracked data.
struct Old {
    listing: BTreeMap<String, (Node, i64, i64)>,
    data: Tree,
}

fn old_of(e: &World) -> Old {
    Old {
        listing: state_listing(&e.repo()),
        data: tracked(&data_tree(&e.repo())),
    }
}

/// Exactly the old repository: xfs/ssh, its whole listing; zfs, `POOL/N`
/// with head `s2` and snapshots `@s1 @s2`, its data, no transaction left.
#[track_caller]
fn assert_old(e: &World, old: &Old, ctx: &str) {
    match e.kind {
        Kind::Zfs => {
            assert_eq!(
                e.assert_repo_sound(ctx),
                2,
                "{ctx}: head of the old repository"
            );
            assert_same(
                &format!("{ctx}: repository data (OLD)"),
                &old.data,
                &tracked(&data_tree(&e.repo())),
            );
        }
        Kind::Xfs | Kind::Ssh => {
            assert_same(
                &format!("{ctx}: repository (OLD)"),
                &old.listing,
                &state_listing(&e.repo()),
            );
            assert_no_repo_leftovers(&e.repo_parent, &e.repo());
        }
        Kind::S3 => unreachable!("init --force does not replace an s3 repository"),
    }
}

/// Exactly the new repository: head `s1` only, C's data, no old objects,
/// sound (no transaction left).
#[track_caller]
fn assert_new(e: &World, c_data: &Tree, ctx: &str) {
    assert_eq!(
        e.assert_repo_sound(ctx),
        1,
        "{ctx}: head of the new repository"
    );
    assert_eq!(message_ids(&e.repo()), vec!["s1".to_string()], "{ctx}");
    assert_same(
        &format!("{ctx}: repository data"),
        c_data,
        &tracked(&data_tree(&e.repo())),
    );
    assert!(
        !e.repo().join(".dsg/objects").exists()
            || walk_all(&e.repo().join(".dsg/objects"))
                .iter()
                .all(|(_, m)| m.is_dir()),
        "{ctx}: the old history's objects survived the replacement"
    );
}

fn init_force_replaces_only_after_confirmation(kind: Kind) {
    let e = world_or_skip!(kind, "replace");
    setup(&e);
    let old = old_of(&e);
    let c_data = tracked(&data_tree(&e.client("C")));

    // Without --force: refused, pointing at --force.
    let mut plain = e.replace_args(None);
    plain.retain(|a| a != "--force");
    let o = e.run_args("C", &plain, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(stderr(&o).contains("dsg init --force"), "{}", show(&o));
    assert_old(&e, &old, "after a plain init");
    std::fs::remove_file(e.client("C").join(".dsgconfig.yml")).ok();

    // --force alone, not on a terminal: refused, nothing written anywhere.
    let o = e.run_args("C", &e.replace_args(None), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains(&format!("--confirm-replace {}", e.repo_name)),
        "the error says how to confirm:\n{}",
        show(&o)
    );
    assert!(
        stderr(&o).contains("s2"),
        "it names what would be lost:\n{}",
        show(&o)
    );
    if kind == Kind::Zfs {
        assert!(
            stderr(&o).contains(&e.zfs().dataset()),
            "names the dataset: {}",
            show(&o)
        );
    }
    assert_old(&e, &old, "after an unconfirmed --force");
    assert!(!e.client("C").join(".dsg").exists());
    assert!(!e.client("C").join(".dsgconfig.yml").exists());

    // A confirmation that names something else: refused too.
    let o = e.run_args("C", &e.replace_args(Some("other")), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert_old(&e, &old, "after a wrong confirmation");

    // Confirmed: the repository is C's data as a fresh s1.
    let o = e.run_args("C", &e.replace_args(Some(e.repo_name.as_str())), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_new(&e, &c_data, "after a confirmed replace");
    e.assert_clean("C");
    assert_eq!(
        std::fs::read(e.client("C").join(".dsg/last-sync.json")).unwrap(),
        std::fs::read(e.repo().join(".dsg/last-sync.json")).unwrap()
    );
    // The replaced repository works as any other: C syncs a change.
    e.write("C", "task/input/c.csv", "c2\n");
    e.ok("C", &["sync", "-m", "after replace"]);
    assert_eq!(e.assert_repo_sound("sync after replace"), 2);
}

fn crash_at_every_step_of_a_replacing_init(kind: Kind) {
    let reference = world_or_skip!(kind, "replace-ref");
    setup(&reference);
    let args = reference.replace_args(Some(reference.repo_name.as_str()));
    let o = reference.run_args("C", &args, &[("DSG_FAILPOINT", "list")]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let fps = failpoints_of(&o);
    drop(reference);
    let (steps, commit_step) = kind.replace_steps();
    for s in steps {
        assert!(fps.iter().any(|f| f == s), "{s} not passed: {fps:?}");
    }
    let commit = fps.iter().position(|f| f == commit_step).unwrap();

    let mut done = Vec::new();
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    // A world still as before (OLD), its old repository, C's data.
    let mut cur: Option<(World, Old, Tree)> = None;
    for (i, fp) in fps.iter().enumerate() {
        let committed = i >= commit;
        let r = catch_unwind(AssertUnwindSafe(|| {
            if cur.is_none() {
                let e = World::again(kind, "replace");
                setup(&e);
                let old = old_of(&e);
                let c_data = tracked(&data_tree(&e.client("C")));
                cur = Some((e, old, c_data));
            }
            let (e, old, c_data) = cur.as_ref().unwrap();
            let ctx = format!("[{}] replacing init crashed at {fp}", kind.label());
            let args = e.replace_args(Some(e.repo_name.as_str()));
            let o = e.run_args("C", &args, &[("DSG_FAILPOINT", fp)]);
            assert!(killed(&o.status), "{ctx}: expected SIGKILL: {}", show(&o));
            if kind == Kind::Zfs {
                // Never missing, even before recovery.
                let z = e.zfs();
                assert!(
                    z.datasets()
                        .iter()
                        .any(|d| d == &z.dataset() || d.starts_with(&format!("{}--", z.dataset()))),
                    "{ctx}: no dataset at all: {:?}",
                    z.datasets()
                );
            }
            // Any next command recovers the repository (here A's), then C's
            // own next command settles C.
            let st = e.run("A", &["status"]);
            assert!(st.status.code().is_some(), "{ctx}: status crashed");
            e.assert_repo_present(&ctx);
            let _ = e.run("C", &["status"]);
            if committed {
                assert_new(e, c_data, &ctx);
                assert_eq!(
                    std::fs::read(e.client("C").join(".dsg/last-sync.json")).unwrap(),
                    std::fs::read(e.repo().join(".dsg/last-sync.json")).unwrap(),
                    "{ctx}: C's cache vs the new head"
                );
            } else {
                assert_old(e, old, &ctx);
                assert!(!e.client("C").join(".dsg").exists(), "{ctx}: C has a .dsg");
            }
            assert_no_leftovers(&e.client("C"));
        }));
        let outcome = if committed { "New" } else { "Old" };
        match r {
            Ok(()) => done.push(format!("{fp}={outcome}")),
            Err(err) => {
                done.push(format!("{fp}=FAILED"));
                failed.insert(fp.clone(), panic_text(&err));
                cur = None;
            }
        }
        if committed {
            cur = None;
        }
    }
    eprintln!(
        "[{}] replacing init: {} crash points: {}",
        kind.label(),
        done.len(),
        done.join(" ")
    );
    assert!(failed.is_empty(), "crash points violating G1: {failed:#?}");
}

/// A directory of that name that is not a dsg repository is never
/// replaced, and the error says so rather than suggesting --force.
fn a_directory_that_is_not_a_repository_is_not_offered_for_replacement(kind: Kind) {
    let e = world_or_skip!(kind, "replace-foreign");
    std::fs::create_dir_all(e.repo().join("data")).unwrap();
    std::fs::write(e.repo().join("data/keep.txt"), "not dsg's").unwrap();
    e.write("C", "task/input/c.csv", "c\n");
    for args in [
        e.replace_args(None),
        e.replace_args(Some(e.repo_name.as_str())),
    ] {
        let o = e.run_args("C", &args, &[]);
        assert_eq!(o.status.code(), Some(1), "{}", show(&o));
        assert!(stderr(&o).contains("not a dsg repository"), "{}", show(&o));
        assert_eq!(
            std::fs::read(e.repo().join("data/keep.txt")).unwrap(),
            b"not dsg's"
        );
    }
}

/// The prompt path: on a terminal (a pty made by `script`), `--force`
/// asks, and only the repository's name typed back replaces it.
fn init_force_on_a_terminal_asks_for_the_name(kind: Kind) {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(!is_ci(), "CI=true but `script` (util-linux) is missing");
        eprintln!("SKIPPED: no `script` to make a terminal");
        return;
    }
    let e = world_or_skip!(kind, "replace");
    setup(&e);
    let old = state_listing(&e.repo());
    let c_data = tracked(&data_tree(&e.client("C")));
    let mut args = e.replace_args(None);
    args.retain(|a| a != "--no-interactive");
    let quote = |w: &str| format!("'{}'", w.replace('\'', "'\\''"));
    let line: Vec<String> = std::iter::once(dsg_bin().to_string_lossy().to_string())
        .chain(args.iter().cloned())
        .map(|w| quote(&w))
        .collect();
    let on_terminal = |answer: &str| {
        use std::io::Write;
        let base = e.command("C", &[]);
        let mut c = std::process::Command::new("script");
        c.args(["-qec", &line.join(" "), "/dev/null"])
            .current_dir(e.client("C"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        let mut child = c.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{answer}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };

    let o = on_terminal("not-the-name");
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("Type its name ({})", e.repo_name)),
        "the prompt names what to type:\n{}",
        show(&o)
    );
    assert_same(
        "repository after a wrong answer",
        &old,
        &state_listing(&e.repo()),
    );

    let o = on_terminal(&e.repo_name);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_new(&e, &c_data, "after a confirmed prompt");
}

/// A client whose last sync was in the replaced repository must not sync
/// against the new one: its files of the old history would count as
/// deleted remotely and be deleted here (perhaps the last copies).
fn a_client_of_the_replaced_repository_is_blocked_not_emptied(kind: Kind) {
    let e = world_or_skip!(kind, "replace");
    setup(&e);
    let o = e.run_args("C", &e.replace_args(Some(e.repo_name.as_str())), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let a_before = state_listing(&e.client("A"));
    let repo_before = state_listing(&e.repo());
    let o = e.run("A", &["sync", "-m", "stale"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(
        stderr(&o).contains("is no longer in the repository's history"),
        "{}",
        show(&o)
    );
    assert_same(
        "A after the blocked sync",
        &a_before,
        &state_listing(&e.client("A")),
    );
    assert_same(
        "repository after A's blocked sync",
        &repo_before,
        &state_listing(&e.repo()),
    );
}

/// The same stale client, but the new repository holds everything it has
/// (same content) plus a new file: nothing local is at risk, so its sync
/// goes ahead and fetches the new file.
fn a_client_of_the_replaced_repository_with_nothing_at_risk_syncs(kind: Kind) {
    let e = world_or_skip!(kind, "replace");
    setup(&e);
    // D publishes A's files as they are, plus one more, as a new repository.
    for rel in [
        "task/input/a.csv",
        "task/input/old.bin",
        "task/output/r.txt",
    ] {
        e.write("D", rel, std::fs::read(e.client("A").join(rel)).unwrap());
    }
    e.write("D", "task/input/extra.csv", "extra\n");
    let o = e.run_args("D", &e.replace_args(Some(e.repo_name.as_str())), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = e.run("A", &["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(
        std::fs::read(e.client("A").join("task/input/extra.csv")).unwrap(),
        b"extra\n"
    );
    assert_same(
        "A after syncing with the new repository",
        &tracked(&data_tree(&e.repo())),
        &tracked(&data_tree(&e.client("A"))),
    );
}

/// A replacing init that fails (an error, not a crash) before its commit
/// point, over a repository whose head is also `s1`: it must fail, and
/// leave the old repository and no local state (an id alone would say s1
/// "landed").
fn a_failed_replace_over_an_s1_repository_is_a_failure(kind: Kind) {
    let e = world_or_skip!(kind, "replace-s1");
    e.write("A", "task/input/a.csv", "only s1\n");
    e.init("A");
    e.write("C", "task/input/c.csv", "c\n");
    let old = state_listing(&e.repo());
    let o = e.run_args(
        "C",
        &e.replace_args(Some(e.repo_name.as_str())),
        &[("DSG_FAILPOINT", "repo.init.before_rename:error")],
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(stderr(&o).contains("injected failure"), "{}", show(&o));
    assert_same("old s1 repository", &old, &state_listing(&e.repo()));
    assert!(
        !e.client("C").join(".dsg").exists(),
        "C got a .dsg for a failed init"
    );
    assert_no_leftovers(&e.client("C"));
    assert_no_repo_leftovers(&e.repo_parent, &e.repo());
}

/// A history read open on the old repository does not stop its
/// replacement: its clone goes with the history it showed.
fn a_replace_removes_history_read_clones_of_the_old_dataset(kind: Kind) {
    let z = world_or_skip!(kind, "zrplview");
    setup(&z);
    let c_data = tracked(&data_tree(&z.client("C")));
    let zf = dsg_repo::zfs::Zfs::new(&z.zfs().pool, &z.repo()).unwrap();
    let view = zf.open_snapshot("s1").expect("open s1");
    assert!(view.path.join(".dsg/last-sync.json").is_file());
    let name = z.repo_name.clone();
    let o = z.run_args("C", &z.replace_args(Some(&name)), &[]);
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
fn a_replace_that_commits_but_cannot_finish_is_completed_by_the_next_command(kind: Kind) {
    let z = world_or_skip!(kind, "zrplinc");
    setup(&z);
    let c_data = tracked(&data_tree(&z.client("C")));
    let path = z.zfs().failing_zfs_path("destroy -r *--old-*");
    let name = z.repo_name.clone();
    let o = z.run_args(
        "C",
        &z.replace_args(Some(&name)),
        &[("PATH", path.as_str())],
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        z.zfs()
            .wrapper_calls(&path)
            .iter()
            .any(|c| c.starts_with("destroy -r") && c.contains("--old-")),
        "the failing step was never reached: {:?}",
        z.zfs().wrapper_calls(&path)
    );
    assert!(
        z.zfs().datasets().contains(&z.zfs().dataset()),
        "the repository dataset is missing: {:?}",
        z.zfs().datasets()
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

// Not on s3: an s3 repository is not replaced (`init --force`).
per_kind!(
    init_force_replaces_only_after_confirmation: xfs, zfs;
    crash_at_every_step_of_a_replacing_init: xfs, zfs;
    a_client_of_the_replaced_repository_is_blocked_not_emptied: xfs, zfs, ssh;
    a_client_of_the_replaced_repository_with_nothing_at_risk_syncs: xfs, zfs, ssh;
    a_directory_that_is_not_a_repository_is_not_offered_for_replacement: xfs;
    init_force_on_a_terminal_asks_for_the_name: xfs;
    a_failed_replace_over_an_s1_repository_is_a_failure: xfs;
    a_replace_removes_history_read_clones_of_the_old_dataset: zfs;
    a_replace_that_commits_but_cannot_finish_is_completed_by_the_next_command: zfs;
);
