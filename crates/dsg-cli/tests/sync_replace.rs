//! `init --force` over an existing repository (xfs backend): it replaces the
//! repository only after the user confirms by naming it, and the
//! replacement is one atomic exchange — a crash anywhere leaves exactly the
//! old repository or exactly the new one, never a missing or half-built
//! one (G1). Checked on disk: the repository's whole listing (metadata,
//! object store, file mtimes) for OLD, tree = the new project's data and
//! head `s1` for NEW.

mod support;
mod sync_support;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use sync_support::*;

const OLD_NAME: &str = "repo";

fn replace_args(e: &Env, confirm: Option<&str>) -> Vec<String> {
    let mut v: Vec<String> = [
        "init",
        "--no-interactive",
        "--host",
        "localhost",
        "--repo-path",
        e.repo_parent.to_str().unwrap(),
        "--repo-name",
        &e.repo_name,
        "--repo-type",
        "xfs",
        "--force",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(c) = confirm {
        v.push("--confirm-replace".into());
        v.push(c.into());
    }
    v
}

/// Client A made the repository (s1, s2); client C holds unrelated data.
fn setup() -> Env {
    let e = Env::new("replace");
    e.write("A", "task/input/a.csv", "a0\n");
    e.write("A", "task/input/old.bin", bytes(1, 50_000));
    e.init("A");
    e.write("A", "task/input/a.csv", "a1\n");
    e.write("A", "task/output/r.txt", "result\n");
    e.ok("A", &["sync", "-m", "second"]);
    e.write("C", "task/input/c.csv", "c\n");
    e.write("C", "task/input/sub/new.bin", bytes(2, 70_000));
    make_link(&e.client("C"), "task/output/l.csv", "../input/c.csv");
    e
}

fn run_args(e: &Env, client: &str, args: &[String], envs: &[(&str, &str)]) -> std::process::Output {
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    e.run_env(client, &a, envs)
}

#[track_caller]
fn assert_new(e: &Env, c_data: &Tree, ctx: &str) {
    let head = read_json(&e.repo().join(".dsg/last-sync.json"));
    assert_eq!(
        snapshot_id(&head),
        "s1",
        "{ctx}: head of the new repository"
    );
    assert_eq!(message_ids(&e.repo()), vec!["s1".to_string()], "{ctx}");
    assert_same(
        &format!("{ctx}: repository data"),
        c_data,
        &tracked(&data_tree(&e.repo())),
    );
    assert_tree_matches_manifest(&e.repo(), &head, ctx);
    assert!(
        !e.repo().join(".dsg/objects").exists()
            || walk_all(&e.repo().join(".dsg/objects"))
                .iter()
                .all(|(_, m)| m.is_dir()),
        "{ctx}: the old history's objects survived the replacement"
    );
    assert_no_repo_leftovers(&e.repo_parent, &e.repo());
}

#[test]
fn init_force_replaces_only_after_confirmation() {
    let e = setup();
    let old = state_listing(&e.repo());
    let c_data = tracked(&data_tree(&e.client("C")));

    // Without --force: refused, pointing at --force.
    let mut plain = replace_args(&e, None);
    plain.retain(|a| a != "--force");
    let o = run_args(&e, "C", &plain, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(stderr(&o).contains("dsg init --force"), "{}", show(&o));
    assert_same(
        "repository after a plain init",
        &old,
        &state_listing(&e.repo()),
    );
    std::fs::remove_file(e.client("C").join(".dsgconfig.yml")).ok();

    // --force alone, not on a terminal: refused, nothing written anywhere.
    let o = run_args(&e, "C", &replace_args(&e, None), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains(&format!("--confirm-replace {OLD_NAME}")),
        "the error says how to confirm:\n{}",
        show(&o)
    );
    assert!(
        stderr(&o).contains("s2"),
        "it names what would be lost:\n{}",
        show(&o)
    );
    assert_same(
        "repository after an unconfirmed --force",
        &old,
        &state_listing(&e.repo()),
    );
    assert!(!e.client("C").join(".dsg").exists());
    assert!(!e.client("C").join(".dsgconfig.yml").exists());

    // A confirmation that names something else: refused too.
    let o = run_args(&e, "C", &replace_args(&e, Some("other")), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert_same(
        "repository after a wrong confirmation",
        &old,
        &state_listing(&e.repo()),
    );

    // Confirmed: the repository is C's data as a fresh s1.
    let o = run_args(&e, "C", &replace_args(&e, Some(OLD_NAME)), &[]);
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
    assert_eq!(
        snapshot_id(&read_json(&e.repo().join(".dsg/last-sync.json"))),
        "s2"
    );
}

/// A directory of that name that is not a dsg repository is never
/// replaced, and the error says so rather than suggesting --force.
#[test]
fn a_directory_that_is_not_a_repository_is_not_offered_for_replacement() {
    let e = Env::new("replace-foreign");
    std::fs::create_dir_all(e.repo().join("data")).unwrap();
    std::fs::write(e.repo().join("data/keep.txt"), "not dsg's").unwrap();
    e.write("C", "task/input/c.csv", "c\n");
    for args in [replace_args(&e, None), replace_args(&e, Some(OLD_NAME))] {
        let o = run_args(&e, "C", &args, &[]);
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
#[test]
fn init_force_on_a_terminal_asks_for_the_name() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(!is_ci(), "CI=true but `script` (util-linux) is missing");
        eprintln!("SKIPPED: no `script` to make a terminal");
        return;
    }
    let e = setup();
    let old = state_listing(&e.repo());
    let c_data = tracked(&data_tree(&e.client("C")));
    let mut args = replace_args(&e, None);
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
        String::from_utf8_lossy(&o.stdout).contains(&format!("Type its name ({OLD_NAME})")),
        "the prompt names what to type:\n{}",
        show(&o)
    );
    assert_same(
        "repository after a wrong answer",
        &old,
        &state_listing(&e.repo()),
    );

    let o = on_terminal(OLD_NAME);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_new(&e, &c_data, "after a confirmed prompt");
}

/// A client whose last sync was in the replaced repository must not sync
/// against the new one: its files of the old history would count as
/// deleted remotely and be deleted here (perhaps the last copies).
#[test]
fn a_client_of_the_replaced_repository_is_blocked_not_emptied() {
    let e = setup();
    let o = run_args(&e, "C", &replace_args(&e, Some(OLD_NAME)), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let a_before = state_listing(&e.client("A"));
    let repo_before = state_listing(&e.repo());
    let o = e.run("A", &["sync", "-m", "stale"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(
        stderr(&o).contains("no longer holds this project's last sync"),
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
#[test]
fn a_client_of_the_replaced_repository_with_nothing_at_risk_syncs() {
    let e = setup();
    // D publishes A's files as they are, plus one more, as a new repository.
    for rel in [
        "task/input/a.csv",
        "task/input/old.bin",
        "task/output/r.txt",
    ] {
        e.write("D", rel, std::fs::read(e.client("A").join(rel)).unwrap());
    }
    e.write("D", "task/input/extra.csv", "extra\n");
    let o = run_args(&e, "D", &replace_args(&e, Some(OLD_NAME)), &[]);
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
#[test]
fn a_failed_replace_over_an_s1_repository_is_a_failure() {
    let e = Env::new("replace-s1");
    e.write("A", "task/input/a.csv", "only s1\n");
    e.init("A");
    e.write("C", "task/input/c.csv", "c\n");
    let old = state_listing(&e.repo());
    let o = run_args(
        &e,
        "C",
        &replace_args(&e, Some(OLD_NAME)),
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

#[test]
fn crash_at_every_step_of_a_replacing_init() {
    let reference = setup();
    let args = replace_args(&reference, Some(OLD_NAME));
    let o = run_args(&reference, "C", &args, &[("DSG_FAILPOINT", "list")]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let fps = failpoints_of(&o);
    drop(reference);
    let commit = fps
        .iter()
        .position(|f| f == "repo.replace.exchanged")
        .unwrap_or_else(|| panic!("the exchange was not passed: {fps:?}"));

    let mut done = Vec::new();
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    // A world still as before (OLD), its repository listing, C's data.
    type Fresh = (Env, BTreeMap<String, (Node, i64, i64)>, Tree);
    let mut cur: Option<Fresh> = None;
    for (i, fp) in fps.iter().enumerate() {
        let committed = i >= commit;
        let r = catch_unwind(AssertUnwindSafe(|| {
            if cur.is_none() {
                let e = setup();
                let old = state_listing(&e.repo());
                let c_data = tracked(&data_tree(&e.client("C")));
                cur = Some((e, old, c_data));
            }
            let (e, old, c_data) = cur.as_ref().unwrap();
            let ctx = format!("replacing init crashed at {fp}");
            let args = replace_args(e, Some(OLD_NAME));
            let o = run_args(e, "C", &args, &[("DSG_FAILPOINT", fp)]);
            assert!(killed(&o.status), "{ctx}: expected SIGKILL: {}", show(&o));
            // Any next command recovers the repository (here A's), then C's
            // own next command settles C.
            let st = e.run("A", &["status"]);
            assert!(st.status.code().is_some(), "{ctx}: status crashed");
            assert!(
                e.repo().join(".dsg/last-sync.json").is_file(),
                "{ctx}: repository missing"
            );
            let _ = e.run("C", &["status"]);
            if committed {
                assert_new(e, c_data, &ctx);
                assert_no_leftovers(&e.client("C"));
                assert_eq!(
                    std::fs::read(e.client("C").join(".dsg/last-sync.json")).unwrap(),
                    std::fs::read(e.repo().join(".dsg/last-sync.json")).unwrap(),
                    "{ctx}: C's cache vs the new head"
                );
            } else {
                assert_same(
                    &format!("{ctx}: repository (OLD)"),
                    old,
                    &state_listing(&e.repo()),
                );
                assert_no_repo_leftovers(&e.repo_parent, &e.repo());
                assert!(!e.client("C").join(".dsg").exists(), "{ctx}: C has a .dsg");
                assert_no_leftovers(&e.client("C"));
            }
        }));
        let outcome = if committed { "New" } else { "Old" };
        match r {
            Ok(()) => done.push(format!("{fp}={outcome}")),
            Err(err) => {
                done.push(format!("{fp}=FAILED"));
                let text = err
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failed.insert(fp.clone(), text);
                cur = None;
            }
        }
        if committed {
            cur = None;
        }
    }
    eprintln!(
        "replacing init: {} crash points: {}",
        done.len(),
        done.join(" ")
    );
    assert!(failed.is_empty(), "crash points violating G1: {failed:#?}");
}
