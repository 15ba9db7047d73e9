//! G1 (atomic sync) on every repository kind: crash a sync, a clone or an
//! init at every step it passes (`DSG_FAILPOINT=list` enumerates them,
//! `DSG_FAILPOINT=<name>` SIGKILLs the process there), let the next command
//! (`dsg status`) recover, and check that the client and the repository
//! are exactly as before (OLD) or exactly as after (NEW): trees, manifests,
//! sync-messages, archives and, on zfs, the dataset's snapshot list; the
//! repository sound (zfs: `POOL/N` exists, is not a clone, is mounted at
//! `P/N`, no `POOL/N--*`, `.dsg-tx.*` or journal left); no leftovers; and
//! that syncing again then reaches NEW. Plus kill -9 at random moments of a
//! large sync.
//!
//! Each test body is written once, for a `Kind`; `per_kind!` at the end
//! says on which kinds it runs. A zfs world costs several `zfs` commands
//! (zfs-fuse is slow), so the long matrices that only exercise the client's
//! and the posix repository's code run on xfs alone:
//!
//! | test                                                  | xfs | zfs | ssh | s3 |
//! |-------------------------------------------------------|-----|-----|-----|----|
//! | crash_at_every_repository_step_of_a_sync              |  x  |  x  |     | x  |
//! | crash_at_every_client_step_of_a_sync                  |  x  |  x  |  x  | x  |
//! | crash_at_every_step_of_a_representative_sync          |  x  |     |     | x  |
//! | crash_at_every_step_of_a_conflict_resolution          |  x  |     |  x  | x  |
//! | crash_while_applying_a_representative_sync            |  x  |     |     |    |
//! | crash_while_applying_locally_files_and_links          |  x  |     |     |    |
//! | crash_at_every_step_of_a_download_only_sync           |  x  |     |     |    |
//! | crash_while_applying_a_download_only_sync_files_and_links | x |  |     |    |
//! | crash_while_applying_a_download_only_sync             |  x  |     |     |    |
//! | crash_at_every_step_of_a_clone                        |  x  |     |     |    |
//! | crash_during_rollback_recovery                        |  x  |     |     |    |
//! | crash_during_roll_forward_recovery                    |  x  |     |     |    |
//! | kill9_at_random_moments                               |  x  |     |     | x  |
//! | crash_at_every_step_of_an_init                        |  x  |  x  |     | x  |
//! | crash_at_the_init_commit_point                        |  x  |  x  |     | x  |
//!
//! Over ssh only the client's failpoints fire (the remote agent does not
//! get `DSG_FAILPOINT`), so the repository-side matrices do not run there.
//! On s3 the repository's steps are `s3.*` (staging journaled, snapshot
//! objects, the HEAD commit point, committed); a killed writer's lease is
//! let expire before the next command (`World::settle_after_crash`), the
//! read after a crash (`dsg status`) is checked for OLD/NEW and a sound
//! HEAD, and the re-run (a writer) for no leftovers at all; the matrices
//! of client-only steps (apply, download, clone) are the client's code,
//! the same on every kind, and run on xfs.
//! Formerly sync_crash.rs (xfs) and zfs_crash.rs (zfs).

mod world;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use world::*;

/// A scenario: how to build the world, then which command to crash.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    setup: fn(&World),
    client: &'static str,
    args: &'static [&'static str],
    clone: bool,
    /// Compare directories too (false: files and links only).
    dirs: bool,
}

/// Captures the state of `case`'s client, directories dropped unless the
/// case compares them.
fn cap(w: &World, case: &Case) -> State {
    let mut s = w.capture(case.client);
    // conflicts.txt and conflict backups are the user's, beside L/C/R:
    // `finish` checks what becomes of them.
    s.pair.local.tree.retain(|k, _| {
        k != "conflicts.txt"
            && !dsg_core::names::is_conflict_backup_name(k.rsplit('/').next().unwrap_or(k))
    });
    if !case.dirs {
        for side in [&mut s.pair.local, &mut s.pair.repo] {
            side.tree.retain(|_, n| *n != Node::Dir);
        }
    }
    s
}

// ---------------------------------------------------------------- setups

fn base_a(w: &World) {
    w.write("A", &p(IN, "keep.txt"), "keep");
    w.write("A", &p(IN, "mod_local.txt"), "ml0");
    w.write("A", &p(IN, "del_local.txt"), "dl0");
    w.write("A", &p(IN, "mod_remote.txt"), "mr0");
    w.write("A", &p(IN, "del_remote.txt"), "dr0");
    w.write("A", &p(IN, "f2l"), "file then link");
    w.write("A", &p(OUT, "deep/gone/x.txt"), "x0");
    w.write("A", &p(OUT, "stay.txt"), "stay");
    w.link("A", &p(IN, "link_old"), "keep.txt");
    w.init("A");
}

fn remote_changes_b(w: &World) {
    w.clone_client("A", "B");
    w.write("B", &p(IN, "mod_remote.txt"), "mr1 (changed by B)");
    w.remove("B", &p(IN, "del_remote.txt"));
    w.remove("B", &p(OUT, "deep"));
    w.write("B", &p(IN, "new_remote.txt"), "nr");
    w.write("B", &p(IN, "sub/new_remote2.txt"), "nr2");
    w.link("B", &p(IN, "link_remote"), "keep.txt");
    w.ok("B", &["sync", "-m", "B"]);
}

/// Uploads, downloads, a local and a remote delete, symlinks both ways.
fn setup_representative(w: &World) {
    base_a(w);
    remote_changes_b(w);
    w.write("A", &p(IN, "mod_local.txt"), "ml1 (changed by A)");
    w.remove("A", &p(IN, "del_local.txt"));
    w.write("A", &p(IN, "new_local/a.txt"), "na");
    w.write("A", &p(IN, "new_local/b.bin"), bytes(3, 100_000));
    w.link("A", &p(IN, "link_new"), "mod_local.txt");
    w.link("A", &p(IN, "link_old"), "new_local/a.txt");
    w.remove("A", &p(IN, "f2l"));
    w.link("A", &p(IN, "f2l"), "keep.txt");
}

/// Only downloads and local deletions: the commit point is the client's.
fn setup_download_only(w: &World) {
    base_a(w);
    remote_changes_b(w);
}

/// A repository with history, and a fresh client C to clone into.
fn setup_clone(w: &World) {
    base_a(w);
    remote_changes_b(w);
    w.prepare_clone("A", "C");
}

fn upload_base(w: &World) {
    w.write("A", &p(IN, "keep.txt"), "keep");
    w.write("A", &p(IN, "mod.txt"), "m0");
    w.write("A", &p(IN, "del.txt"), "d0");
    w.write("A", &p(IN, "f2l"), "file then link");
    w.write("A", &p(OUT, "deep/gone/x.txt"), "x0");
    w.write("A", &p(IN, "del_remote.txt"), "dr0");
    w.link("A", &p(IN, "l2f"), "keep.txt");
    w.init("A");
}

fn local_changes(w: &World) {
    w.write("A", &p(IN, "mod.txt"), "m1 (changed by A)");
    w.remove("A", &p(IN, "del.txt"));
    w.remove("A", &p(OUT, "deep"));
    w.write("A", &p(IN, "new/a.txt"), "new");
    w.write("A", &p(IN, "new/b.bin"), bytes(5, 80_000));
    w.remove("A", &p(IN, "f2l"));
    w.link("A", &p(IN, "f2l"), "keep.txt");
    w.remove("A", &p(IN, "l2f"));
    w.write("A", &p(IN, "l2f"), "link then file");
}

/// Uploads of every kind (edit, add, delete, file <-> symlink): the
/// repository side does all its steps.
fn setup_upload(w: &World) {
    upload_base(w);
    local_changes(w);
}

/// The same plus downloads and a remote deletion from client B: the
/// client side does all its steps.
fn setup_both_ways(w: &World) {
    upload_base(w);
    w.clone_client("A", "B");
    w.write("B", &p(IN, "from_b.txt"), "from B");
    w.remove("B", &p(IN, "del_remote.txt"));
    w.ok("B", &["sync", "-m", "B"]);
    local_changes(w);
}

/// Four conflicts (states 5, 7, 9, 11) and the conflicts.txt that settles
/// them with every kind of choice: C twice (a restore over a local edit,
/// and of a file deleted here), L, R.
fn setup_resolution(w: &World) {
    w.write("A", &p(IN, "shared.txt"), "v0");
    w.write("A", &p(IN, "gone.txt"), "g0");
    w.write("A", &p(IN, "kept.txt"), "k0");
    w.init("A");
    w.clone_client("A", "B");
    w.write("B", &p(IN, "shared.txt"), "B's edit");
    w.write("B", &p(IN, "gone.txt"), "B's edit of gone");
    w.remove("B", &p(IN, "kept.txt"));
    w.write("B", &p(IN, "both.txt"), "B's both");
    w.ok("B", &["sync", "-m", "B"]);
    w.write("A", &p(IN, "shared.txt"), "A's edit");
    w.remove("A", &p(IN, "gone.txt"));
    w.write("A", &p(IN, "kept.txt"), "A's edit of kept");
    w.write("A", &p(IN, "both.txt"), "A's both");
    let o = w.run("A", &["sync"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    let txt = w.client("A").join("conflicts.txt");
    let want = |f: &str| match f.rsplit('/').next().unwrap() {
        "shared.txt" | "gone.txt" => 'C',
        "kept.txt" => 'L',
        _ => 'R',
    };
    let mut file = String::new();
    let mut out = String::new();
    for l in std::fs::read_to_string(&txt).unwrap().lines() {
        if let Some(f) = l.strip_prefix("# File: ") {
            file = f.to_string();
        }
        match l.strip_prefix('_') {
            Some(rest) if rest.starts_with(want(&file)) => out.push_str(rest),
            Some(_) => continue,
            None => out.push_str(l),
        }
        out.push('\n');
    }
    std::fs::write(&txt, out).unwrap();
}

const RESOLUTION: Case = Case {
    name: "conflict resolution (sync --continue)",
    setup: setup_resolution,
    client: "A",
    args: &["sync", "--continue", "-m", "crash test"],
    clone: false,
    dirs: false,
};

const REPRESENTATIVE: Case = Case {
    name: "representative sync",
    setup: setup_representative,
    client: "A",
    args: &["sync", "-m", "crash test"],
    clone: false,
    dirs: true,
};

const DOWNLOAD_ONLY: Case = Case {
    name: "download-only sync",
    setup: setup_download_only,
    client: "A",
    args: &["sync"],
    clone: false,
    dirs: true,
};

const CLONE: Case = Case {
    name: "clone",
    setup: setup_clone,
    client: "C",
    args: &["clone"],
    clone: true,
    dirs: true,
};

const UPLOAD: Case = Case {
    name: "upload",
    setup: setup_upload,
    client: "A",
    args: &["sync", "-m", "crash test"],
    clone: false,
    dirs: true,
};

const BOTH_WAYS: Case = Case {
    name: "sync both ways",
    setup: setup_both_ways,
    client: "A",
    args: &["sync", "-m", "crash test"],
    clone: false,
    dirs: true,
};

// ---------------------------------------------------------------- steps

const REPRESENTATIVE_STEPS: &[&str] = &[
    "client.journal.begin",
    "repo.journal.begin",
    "repo.stage_file",
    "client.uploaded",
    "client.downloaded",
    "client.journal.prepared",
    "repo.before_commit",
    "repo.prepared",
    "client.repo_prepared",
    "repo.journal.committed",
    "repo.apply.0",
    "repo.apply.meta",
    "repo.journal.done",
    "client.repo_committed",
    "client.journal.committed",
    "client.apply.0",
    "client.apply.meta",
    "client.journal.done",
];

const DOWNLOAD_ONLY_STEPS: &[&str] = &[
    "client.journal.begin",
    "client.downloaded",
    "client.journal.prepared",
    "client.journal.committed",
    "client.apply.0",
    "client.apply.meta",
    "client.journal.done",
];

const CLONE_STEPS: &[&str] = &[
    "client.journal.begin",
    "client.journal.committed",
    "client.apply.0",
    "client.journal.done",
];

/// A selection of the failpoints a reference run passed (`all`).
type Select = fn(&str, &[String]) -> bool;

/// The steps that apply a committed transaction (`repo.apply.N`,
/// `client.apply.N`, `*.apply.meta`): a crash there is rolled forward.
fn apply_step(fp: &str, _: &[String]) -> bool {
    fp.contains(".apply.")
}

fn not_apply_step(fp: &str, all: &[String]) -> bool {
    !apply_step(fp, all)
}

fn client_apply_step(fp: &str, _: &[String]) -> bool {
    fp.starts_with("client.apply.")
}

fn any_step(_: &str, _: &[String]) -> bool {
    true
}

/// Repository-side points: every `zfs.*` step, staging, the commit, and of
/// the apply steps the first, the last and the metadata.
fn repo_point(fp: &str, all: &[String]) -> bool {
    let last_apply = all
        .iter()
        .rfind(|f| f.starts_with("repo.apply.") && *f != "repo.apply.meta");
    fp.starts_with("zfs.")
        || fp.starts_with("s3.")
        || (fp.starts_with("repo.") && !fp.starts_with("repo.apply."))
        || matches!(fp, "repo.apply.0" | "repo.apply.meta")
        || Some(&fp.to_string()) == last_apply
}

/// Client-side points (journal, transfers, apply).
fn client_point(fp: &str, _: &[String]) -> bool {
    fp.starts_with("client.")
}

/// Of `steps`, those a reference run of this kind reports: over ssh only
/// the client's; on s3 the posix repository's (`repo.*`) are the s3
/// repository's.
fn reported(kind: Kind, steps: &[&'static str]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = steps
        .iter()
        .copied()
        .filter(|s| match kind {
            Kind::Ssh => s.starts_with("client."),
            Kind::S3 => !s.starts_with("repo."),
            Kind::Xfs | Kind::Zfs => true,
        })
        .collect();
    if kind == Kind::S3 && steps.iter().any(|s| s.starts_with("repo.")) {
        out.extend(kind.repo_sync_steps());
    }
    out
}

// ---------------------------------------------------------------- engine

/// The uninterrupted run: its failpoints and the NEW state; `None` when
/// the kind's service is missing (skipped).
fn reference(kind: Kind, case: &Case) -> Option<(Vec<String>, State)> {
    let w = World::new(kind, "crash-ref")?;
    (case.setup)(&w);
    let old = cap(&w, case);
    let o = w.run_env(case.client, case.args, &[("DSG_FAILPOINT", "list")]);
    assert_eq!(o.status.code(), Some(0), "{}: {}", case.name, show(&o));
    let fps = failpoints_of(&o);
    let new = cap(&w, case);
    assert!(
        new.mismatch_old(&old).is_some(),
        "{}: the reference run changed nothing",
        case.name
    );
    assert!(new.mismatch_new(&new).is_none());
    let n = w.assert_repo_sound("reference");
    if kind == Kind::Zfs {
        let k = old.snaps.len() as u64;
        assert_eq!(old.snaps, chain(k), "reference: snapshots before");
        let k = if case.clone { k } else { k + 1 };
        assert_eq!(new.snaps, chain(k), "reference: snapshots after");
        assert_eq!(n, k, "reference: head");
    }
    assert_tree_matches_manifest(&w.client(case.client), &w.head(), "reference client");
    assert_no_leftovers(&w.client(case.client));
    w.assert_clean(case.client);
    Some((fps, new))
}

/// Crashes `case` at `fp` in `w` (which is OLD), recovers with `dsg status`
/// (crashed first at `recover_fp` when given) and checks G1: OLD or NEW, a
/// sound repository, no leftovers. Does not finish the sync.
fn crash_and_recover(
    w: &World,
    case: &Case,
    fp: &str,
    recover_fp: Option<&str>,
    old: &State,
    new: &State,
) -> Outcome {
    let repo_before = w.repo_full_listing();
    let ctx = match recover_fp {
        None => format!("[{}] {} crashed at {fp}", w.kind.label(), case.name),
        Some(r) => format!(
            "[{}] {} crashed at {fp}, recovery crashed at {r}",
            w.kind.label(),
            case.name
        ),
    };
    let o = w.run_env(case.client, case.args, &[("DSG_FAILPOINT", fp)]);
    assert!(
        killed(&o.status),
        "{ctx}: expected death by SIGKILL: {}",
        show(&o)
    );
    w.settle_after_crash();
    if let Some(r) = recover_fp {
        let o = w.run_env(case.client, &["status"], &[("DSG_FAILPOINT", r)]);
        assert!(
            killed(&o.status) || o.status.code() == Some(0),
            "{ctx}: {}",
            show(&o)
        );
    }
    let st = w.run(case.client, &["status"]);
    // Never missing, never a fresh empty one.
    w.assert_repo_present(&ctx);
    assert_eq!(
        st.status.code(),
        Some(0),
        "{ctx}: the next command must recover and succeed: {}",
        show(&st)
    );
    if case.clone {
        assert_same(
            &format!("{ctx}: repository (clone never writes it)"),
            &repo_before,
            &w.repo_full_listing(),
        );
    }
    let c = w.client(case.client);
    let now = cap(w, case);
    let outcome = now.classify(old, new, &ctx);
    w.assert_repo_sound_after_read(&ctx);
    if outcome == Outcome::New {
        // Before the sync the local tree had unsynced changes; after it, the
        // tracked tree is exactly the cache.
        let m = now.pair.local.manifest_json().expect("cache after sync");
        assert_tree_matches_manifest(&c, &m, &format!("{ctx}: client"));
    }
    assert_no_leftovers(&c);
    outcome
}

/// Re-running after a recovery to `outcome` reaches NEW (or finds nothing
/// to do), cleanly.
fn finish(w: &World, case: &Case, outcome: Outcome, new: &State, ctx: &str) {
    let resolving = case.args.contains(&"--continue");
    let txt = w.client(case.client).join("conflicts.txt");
    if resolving && outcome == Outcome::Old {
        assert!(txt.is_file(), "{ctx}: conflicts.txt kept for the retry");
    }
    let again = if case.clone && outcome == Outcome::Old {
        w.run(case.client, &["clone"])
    } else if resolving && txt.is_file() {
        // Rolled back: the resolution runs again; rolled forward: the
        // stale file is removed and nothing is left to do.
        w.run(case.client, case.args)
    } else {
        w.run(case.client, &["sync"])
    };
    assert_eq!(
        again.status.code(),
        Some(0),
        "{ctx}: re-running after recovery ({outcome:?}): {}",
        show(&again)
    );
    if outcome == Outcome::New && !case.clone {
        assert!(
            stdout(&again).contains("Everything up to date"),
            "{ctx}: {}",
            show(&again)
        );
    }
    if resolving {
        assert!(!txt.exists(), "{ctx}: conflicts.txt left after the re-run");
    }
    let fin = cap(w, case);
    if let Some(d) = fin.mismatch_new(new) {
        panic!("{ctx}: after recovery ({outcome:?}) and a re-run, not NEW:\n{d}");
    }
    let rows = w.status_rows(case.client);
    assert!(rows.is_empty(), "{ctx}: status not clean: {rows:?}");
    assert_no_leftovers(&w.client(case.client));
    w.assert_repo_sound(&format!("{ctx}, after the re-run"));
}

/// One crash in a fresh world, recovered and finished.
fn crash_trial(
    kind: Kind,
    case: &Case,
    fp: &str,
    recover_fp: Option<&str>,
    new: &State,
) -> Outcome {
    let w = World::again(kind, "crash");
    (case.setup)(&w);
    let old = cap(&w, case);
    let outcome = crash_and_recover(&w, case, fp, recover_fp, &old, new);
    let ctx = format!("[{}] {} crashed at {fp}", kind.label(), case.name);
    finish(&w, case, outcome, new, &ctx);
    outcome
}

/// Crashes `case` at each selected step. Each crash gets a fresh world,
/// except that on kinds that reuse worlds one that recovered to exactly OLD
/// is crashed again at the next step (it is exactly as before the sync).
fn crash_matrix(kind: Kind, case: &Case, must_include: &[&'static str], select: Select) {
    let t0 = Instant::now();
    let Some((fps, new)) = reference(kind, case) else {
        return;
    };
    for m in reported(kind, must_include) {
        assert!(
            fps.iter().any(|f| f == m),
            "[{}] {}: failpoint {m} not passed; passed: {fps:?}",
            kind.label(),
            case.name
        );
    }
    let mut report = Vec::new();
    let mut failed = Vec::new();
    let mut cur: Option<(World, State)> = None;
    for fp in fps.iter().filter(|f| select(f, &fps)) {
        // Run every step even when one fails, to report all of them.
        let r = catch_unwind(AssertUnwindSafe(|| {
            if cur.is_none() {
                let w = World::again(kind, "crash");
                (case.setup)(&w);
                let old = cap(&w, case);
                cur = Some((w, old));
            }
            let (w, old) = cur.as_ref().unwrap();
            let outcome = crash_and_recover(w, case, fp, None, old, &new);
            if outcome == Outcome::New || !kind.reuses_old_worlds() {
                let ctx = format!("[{}] {} crashed at {fp}", kind.label(), case.name);
                finish(w, case, outcome, &new, &ctx);
                cur = None;
            }
            outcome
        }));
        match r {
            Ok(outcome) => report.push(format!("{fp}={outcome:?}")),
            Err(e) => {
                cur = None;
                report.push(format!("{fp}=FAILED"));
                failed.push((fp.clone(), panic_text(&e)));
            }
        }
    }
    if let Some((w, _)) = cur.take() {
        let ctx = format!("[{}] {} after the last OLD crash", kind.label(), case.name);
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| {
            finish(&w, case, Outcome::Old, &new, &ctx)
        })) {
            failed.push(("(finishing)".into(), panic_text(&e)));
        }
    }
    let name = format!("[{}] {}", kind.label(), case.name);
    report_matrix(&name, t0, &report, &failed);
}

fn report_matrix(name: &str, t0: Instant, report: &[String], failed: &[(String, String)]) {
    eprintln!(
        "{name}: {} crash points in {:.1}s: {}",
        report.len(),
        t0.elapsed().as_secs_f64(),
        report.join(" ")
    );
    if !failed.is_empty() {
        let mut s = format!("{name}: {} crash point(s) violate G1:\n", failed.len());
        for (fp, msg) in failed {
            let short = brief(msg);
            s.push_str(&format!("  * {fp}:\n    {short}\n"));
        }
        panic!("{s}");
    }
}

/// The first line of a failure and what differs from NEW (the part that
/// tells which bug it is), kept short.
fn brief(msg: &str) -> String {
    let mut lines = msg.lines();
    let first = lines.next().unwrap_or("").to_string();
    let rest: Vec<&str> = match msg.find("--- vs NEW:") {
        Some(i) => msg[i..].lines().take(16).collect(),
        None => lines.take(30).collect(),
    };
    format!("{first}\n    {}", rest.join("\n    "))
}

// ---------------------------------------------------------------- sync tests

fn crash_at_every_repository_step_of_a_sync(kind: Kind) {
    crash_matrix(kind, &UPLOAD, kind.repo_sync_steps(), repo_point);
}

fn crash_at_every_client_step_of_a_sync(kind: Kind) {
    let mut must = kind.repo_sync_steps().to_vec();
    must.extend(
        REPRESENTATIVE_STEPS
            .iter()
            .filter(|s| s.starts_with("client.")),
    );
    crash_matrix(kind, &BOTH_WAYS, &must, client_point);
}

/// `sync --continue` is a sync: a crash at any step recovers to before
/// (conflicts.txt kept, the resolution can run again) or after.
fn crash_at_every_step_of_a_conflict_resolution(kind: Kind) {
    let select = if matches!(kind, Kind::Xfs | Kind::S3) {
        any_step
    } else {
        client_point
    };
    crash_matrix(kind, &RESOLUTION, REPRESENTATIVE_STEPS, select);
}

fn crash_at_every_step_of_a_representative_sync(kind: Kind) {
    crash_matrix(kind, &REPRESENTATIVE, REPRESENTATIVE_STEPS, not_apply_step);
}

fn crash_while_applying_a_representative_sync(kind: Kind) {
    crash_matrix(kind, &REPRESENTATIVE, REPRESENTATIVE_STEPS, apply_step);
}

/// The client's apply steps of the representative sync (the repository has
/// committed and applied), files and links only.
fn crash_while_applying_locally_files_and_links(kind: Kind) {
    let case = Case {
        dirs: false,
        ..REPRESENTATIVE
    };
    crash_matrix(kind, &case, REPRESENTATIVE_STEPS, client_apply_step);
}

fn crash_at_every_step_of_a_download_only_sync(kind: Kind) {
    crash_matrix(kind, &DOWNLOAD_ONLY, DOWNLOAD_ONLY_STEPS, not_apply_step);
}

fn crash_while_applying_a_download_only_sync_files_and_links(kind: Kind) {
    let case = Case {
        dirs: false,
        ..DOWNLOAD_ONLY
    };
    crash_matrix(kind, &case, DOWNLOAD_ONLY_STEPS, apply_step);
}

/// Strict: directories emptied by the sync's deletions are gone too.
fn crash_while_applying_a_download_only_sync(kind: Kind) {
    crash_matrix(kind, &DOWNLOAD_ONLY, DOWNLOAD_ONLY_STEPS, apply_step);
}

fn crash_at_every_step_of_a_clone(kind: Kind) {
    crash_matrix(kind, &CLONE, CLONE_STEPS, any_step);
}

/// A crash during the recovery of a crash: the recovery steps are
/// idempotent, so any number of interruptions still ends in OLD or NEW.
fn crash_during_recovery(kind: Kind, firsts: &[&str], want: Outcome) {
    let case = &REPRESENTATIVE;
    let Some((_, new)) = reference(kind, case) else {
        return;
    };
    let mut n = 0;
    for first in firsts {
        // The steps recovery passes after this crash.
        let w = World::again(kind, "crash-rec");
        (case.setup)(&w);
        let o = w.run_env(case.client, case.args, &[("DSG_FAILPOINT", first)]);
        assert!(killed(&o.status), "{}", show(&o));
        let o = w.run_env(case.client, &["status"], &[("DSG_FAILPOINT", "list")]);
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        drop(w);
        let mut rec = failpoints_of(&o);
        rec.push("none".into());
        for r in &rec {
            let outcome = crash_trial(kind, case, first, Some(r), &new);
            n += 1;
            assert_eq!(outcome, want, "{first} then {r}");
        }
    }
    eprintln!(
        "[{}] crash during recovery: {n} double crashes",
        kind.label()
    );
}

fn crash_during_rollback_recovery(kind: Kind) {
    let before_commit = match kind {
        Kind::Zfs => "zfs.snapshot",
        Kind::Xfs | Kind::Ssh => "repo.before_commit",
        Kind::S3 => "s3.commit.head",
    };
    crash_during_recovery(
        kind,
        &["client.journal.prepared", before_commit],
        Outcome::Old,
    );
}

fn crash_during_roll_forward_recovery(kind: Kind) {
    let after_commit = match kind {
        Kind::Zfs => "zfs.promote",
        Kind::Xfs | Kind::Ssh => "repo.apply.1",
        Kind::S3 => "client.journal.committed",
    };
    crash_during_recovery(
        kind,
        &[
            kind.repo_committed(),
            after_commit,
            "client.journal.committed",
            "client.apply.1",
        ],
        Outcome::New,
    );
}

/// kill -9 at random moments of a sync of ~2000 small files and a few
/// 20 MB ones (plus downloads and deletions).
fn kill9_at_random_moments(kind: Kind) {
    let trials: u64 = std::env::var("DSG_TEST_KILL_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let mut rng = Rng(seed("kill9_at_random_moments"));

    fn setup(w: &World) {
        w.write("A", &p(IN, "base.txt"), "base");
        w.write("A", &p(IN, "del_local.txt"), "dl");
        w.write("A", &p(IN, "del_remote.txt"), "dr");
        w.write("A", &p(IN, "mod_remote.txt"), "m0");
        w.init("A");
        w.clone_client("A", "B");
        w.write("B", &p(IN, "mod_remote.txt"), "m1");
        w.remove("B", &p(IN, "del_remote.txt"));
        w.write("B", &p(IN, "from_b/x.txt"), "x");
        w.link("B", &p(IN, "from_b/l"), "x.txt");
        w.ok("B", &["sync"]);
        let a = w.client("A");
        for d in 0..20 {
            for f in 0..100 {
                let rel = format!("{IN}/many/d{d:02}/f{f:03}.txt");
                write_file(&a, &rel, format!("small file {d} {f}\n").as_bytes());
            }
        }
        for k in 0..3u64 {
            write_file(&a, &format!("{OUT}/big{k}.bin"), &bytes(100 + k, 20 << 20));
        }
        w.remove("A", &p(IN, "del_local.txt"));
    }
    let case = Case {
        name: "large sync",
        setup,
        client: "A",
        args: &["sync"],
        clone: false,
        dirs: true,
    };

    // Reference: NEW, and how long an uninterrupted sync takes.
    let Some(w) = World::new(kind, "kill-ref") else {
        return;
    };
    setup(&w);
    let t = Instant::now();
    w.ok("A", &["sync"]);
    let dur = t.elapsed();
    let new = cap(&w, &case);
    drop(w);
    eprintln!("kill9: uninterrupted sync takes {:.2}s", dur.as_secs_f64());

    let t0 = Instant::now();
    let mut outcomes = Vec::new();
    let mut failed = Vec::new();
    for trial in 0..trials {
        let delay = Duration::from_secs_f64(dur.as_secs_f64() * 1.1 * rng.unit());
        let r = catch_unwind(|| kill_trial(kind, &case, &new, trial, delay));
        match r {
            Ok(outcome) => outcomes.push(format!("{:.3}s={outcome:?}", delay.as_secs_f64())),
            Err(e) => {
                outcomes.push(format!("{:.3}s=FAILED", delay.as_secs_f64()));
                failed.push(panic_text(&e));
            }
        }
        if t0.elapsed() > Duration::from_secs(60) {
            eprintln!("kill9: stopping after {} trials (time budget)", trial + 1);
            break;
        }
    }
    eprintln!(
        "kill9: {} trials in {:.1}s: {}",
        outcomes.len(),
        t0.elapsed().as_secs_f64(),
        outcomes.join(" ")
    );
    if !failed.is_empty() {
        let msgs: Vec<String> = failed.iter().map(|m| brief(m)).collect();
        panic!(
            "kill9: {} of {} trials violate G1:\n  * {}",
            failed.len(),
            outcomes.len(),
            msgs.join("\n  * ")
        );
    }
}

fn kill_trial(kind: Kind, case: &Case, new: &State, trial: u64, delay: Duration) -> Outcome {
    let w = World::again(kind, "kill");
    (case.setup)(&w);
    let old = cap(&w, case);
    let mut child = w
        .command("A", &["sync"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = child.kill();
    let status = child.wait().unwrap();
    let ctx = format!(
        "kill -9 trial {trial} at {:.3}s ({})",
        delay.as_secs_f64(),
        if killed(&status) {
            "killed"
        } else {
            "had finished"
        }
    );
    if !killed(&status) {
        assert_eq!(status.code(), Some(0), "{ctx}");
    }
    w.settle_after_crash();
    let st = w.run("A", &["status"]);
    assert_eq!(st.status.code(), Some(0), "{ctx}: {}", show(&st));
    let now = cap(&w, case);
    let outcome = now.classify(&old, new, &ctx);
    w.assert_repo_sound_after_read(&ctx);
    if outcome == Outcome::New {
        let m = now.pair.local.manifest_json().expect("cache after sync");
        assert_tree_matches_manifest(&w.client("A"), &m, &format!("{ctx}: client"));
    }
    assert_no_leftovers(&w.client("A"));
    finish(&w, case, outcome, new, &ctx);
    outcome
}

// ---------------------------------------------------------------- init

fn setup_init(w: &World) {
    w.write("A", &p(IN, "a.csv"), "a\n");
    w.write("A", &p(IN, "sub/b.bin"), bytes(3, 70_000));
    w.link("A", &p(OUT, "l.csv"), "../input/a.csv");
}

fn init_args(w: &World) -> Vec<String> {
    // A rolled-back init may leave .dsgconfig.yml behind. An s3 repository
    // is never replaced: a plain init (over a dead init's objects).
    if w.kind == Kind::S3 {
        return w.init_args();
    }
    w.replace_args(None)
}

/// The repository exists as after an uninterrupted init.
fn assert_initialized(w: &World, data: &Tree, ctx: &str) {
    assert_eq!(w.assert_repo_sound(ctx), 1, "{ctx}: head");
    if w.kind == Kind::Zfs {
        let z = w.zfs();
        assert_eq!(z.datasets(), vec![z.dataset()], "{ctx}");
    }
    assert_same(
        &format!("{ctx}: repository"),
        data,
        &tracked(&data_tree(&w.repo())),
    );
    w.assert_clean("A");
    assert_eq!(
        std::fs::read(w.client("A").join(".dsg/last-sync.json")).unwrap(),
        std::fs::read(w.repo().join(".dsg/last-sync.json")).unwrap(),
        "{ctx}: cache vs head"
    );
    assert_no_leftovers(&w.client("A"));
}

/// Crashes init at `fp`; checks OLD (nothing) or NEW after `dsg status`.
fn crash_init(w: &World, fp: &str, committed: bool, data: &Tree) {
    let ctx = format!("[{}] init crashed at {fp}", w.kind.label());
    let o = w.run_args("A", &init_args(w), &[("DSG_FAILPOINT", fp)]);
    assert!(killed(&o.status), "{ctx}: expected SIGKILL: {}", show(&o));
    w.settle_after_crash();
    let st = w.run("A", &["status"]);
    assert!(st.status.code().is_some(), "{ctx}: status crashed");
    if committed {
        assert_eq!(st.status.code(), Some(0), "{ctx}: status: {}", show(&st));
        assert_initialized(w, data, &ctx);
    } else {
        // Rolled back: no repository, nothing beside it, no local .dsg.
        w.assert_no_repo(&ctx);
        assert!(!w.client("A").join(".dsg").exists(), "{ctx}: local .dsg");
        assert_same(
            &format!("{ctx}: project data"),
            data,
            &tracked(&data_tree(&w.client("A"))),
        );
    }
}

/// Crashes an init at each selected step (`committed`: at or after the
/// kind's commit point). A world rolled back to nothing is crashed again.
fn init_matrix(kind: Kind, select: fn(&str, &str) -> bool) {
    let Some(w) = World::new(kind, "crash-init-ref") else {
        return;
    };
    setup_init(&w);
    let o = w.run_args("A", &init_args(&w), &[("DSG_FAILPOINT", "list")]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let fps = failpoints_of(&o);
    drop(w);
    let (steps, commit_step) = kind.init_steps();
    for s in steps {
        assert!(fps.iter().any(|f| f == s), "{s} not passed: {fps:?}");
    }
    let commit = fps.iter().position(|f| f == commit_step).unwrap();
    let t0 = Instant::now();
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    let mut cur: Option<(World, Tree)> = None;
    for (i, fp) in fps
        .iter()
        .enumerate()
        .filter(|(_, f)| select(f, commit_step))
    {
        let committed = i >= commit;
        let r = catch_unwind(AssertUnwindSafe(|| {
            if cur.is_none() {
                let w = World::again(kind, "crash-init");
                setup_init(&w);
                let data = tracked(&data_tree(&w.client("A")));
                cur = Some((w, data));
            }
            let (w, data) = cur.as_ref().unwrap();
            crash_init(w, fp, committed, data);
            if committed {
                cur = None;
            }
            if committed { "New" } else { "Old" }.to_string()
        }));
        match r {
            Ok(s) => done.push(format!("{fp}={s}")),
            Err(e) => {
                cur = None;
                done.push(format!("{fp}=FAILED"));
                failed.push((fp.clone(), panic_text(&e)));
            }
        }
    }
    if let Some((w, data)) = cur.take() {
        // After rollbacks, init simply works.
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| {
            let o = w.run_args("A", &init_args(&w), &[]);
            assert_ok(&o, "init after rolled-back crashes");
            assert_initialized(&w, &data, "init after rolled-back crashes");
        })) {
            failed.push(("(init again)".into(), panic_text(&e)));
        }
    }
    report_matrix(&format!("[{}] init", kind.label()), t0, &done, &failed);
}

fn crash_at_every_step_of_an_init(kind: Kind) {
    init_matrix(kind, |f, commit| f != commit);
}

fn crash_at_the_init_commit_point(kind: Kind) {
    init_matrix(kind, |f, commit| f == commit);
}

per_kind!(
    crash_at_every_repository_step_of_a_sync: xfs, zfs, s3;
    crash_at_every_client_step_of_a_sync: xfs, zfs, ssh, s3;
    crash_at_every_step_of_a_representative_sync: xfs, s3;
    crash_at_every_step_of_a_conflict_resolution: xfs, ssh, s3;
    crash_while_applying_a_representative_sync: xfs;
    crash_while_applying_locally_files_and_links: xfs;
    crash_at_every_step_of_a_download_only_sync: xfs;
    crash_while_applying_a_download_only_sync_files_and_links: xfs;
    crash_while_applying_a_download_only_sync: xfs;
    crash_at_every_step_of_a_clone: xfs;
    crash_during_rollback_recovery: xfs;
    crash_during_roll_forward_recovery: xfs;
    kill9_at_random_moments: xfs, s3;
    crash_at_every_step_of_an_init: xfs, zfs, s3;
    crash_at_the_init_commit_point: xfs, zfs, s3;
);
