//! G1 (atomic sync): crash a sync or a clone at every step it passes
//! (`DSG_FAILPOINT=list` enumerates them, `DSG_FAILPOINT=<name>` SIGKILLs
//! the process there), let the next command recover, and check that both
//! sides are exactly as before or exactly as after, with no leftovers, and
//! that syncing again then reaches the state after. Plus kill -9 at random
//! moments of a large sync.

mod support;
mod sync_support;

use std::time::{Duration, Instant};

use sync_support::*;

const IN: &str = "task/input";
const OUT: &str = "task/output";

fn p(dir: &str, name: &str) -> String {
    format!("{dir}/{name}")
}

/// A scenario: how to build the world, then which command to crash.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    setup: fn(&Env),
    client: &'static str,
    args: &'static [&'static str],
    clone: bool,
    /// Compare directories too (false: files and links only).
    dirs: bool,
}

/// Captures the world of `case`'s client, directories dropped unless the
/// case compares them.
fn cap(env: &Env, case: &Case) -> World {
    let mut w = env.capture(case.client);
    if !case.dirs {
        for side in [&mut w.local, &mut w.repo] {
            side.tree.retain(|_, n| *n != Node::Dir);
        }
    }
    w
}

fn base_a(env: &Env) {
    env.write("A", &p(IN, "keep.txt"), "keep");
    env.write("A", &p(IN, "mod_local.txt"), "ml0");
    env.write("A", &p(IN, "del_local.txt"), "dl0");
    env.write("A", &p(IN, "mod_remote.txt"), "mr0");
    env.write("A", &p(IN, "del_remote.txt"), "dr0");
    env.write("A", &p(IN, "f2l"), "file then link");
    env.write("A", &p(OUT, "deep/gone/x.txt"), "x0");
    env.write("A", &p(OUT, "stay.txt"), "stay");
    env.link("A", &p(IN, "link_old"), "keep.txt");
    env.init("A");
}

fn remote_changes_b(env: &Env) {
    env.clone_client("A", "B");
    env.write("B", &p(IN, "mod_remote.txt"), "mr1 (changed by B)");
    env.remove("B", &p(IN, "del_remote.txt"));
    env.remove("B", &p(OUT, "deep"));
    env.write("B", &p(IN, "new_remote.txt"), "nr");
    env.write("B", &p(IN, "sub/new_remote2.txt"), "nr2");
    env.link("B", &p(IN, "link_remote"), "keep.txt");
    env.ok("B", &["sync", "-m", "B"]);
}

/// Uploads, downloads, a local and a remote delete, symlinks both ways.
fn setup_representative(env: &Env) {
    base_a(env);
    remote_changes_b(env);
    env.write("A", &p(IN, "mod_local.txt"), "ml1 (changed by A)");
    env.remove("A", &p(IN, "del_local.txt"));
    env.write("A", &p(IN, "new_local/a.txt"), "na");
    env.write("A", &p(IN, "new_local/b.bin"), bytes(3, 100_000));
    env.link("A", &p(IN, "link_new"), "mod_local.txt");
    env.link("A", &p(IN, "link_old"), "new_local/a.txt");
    env.remove("A", &p(IN, "f2l"));
    env.link("A", &p(IN, "f2l"), "keep.txt");
}

/// Only downloads and local deletions: the commit point is the client's.
fn setup_download_only(env: &Env) {
    base_a(env);
    remote_changes_b(env);
}

/// A repository with history, and a fresh client C to clone into.
fn setup_clone(env: &Env) {
    base_a(env);
    remote_changes_b(env);
    env.prepare_clone("A", "C");
}

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

/// The uninterrupted run: its failpoints and the NEW world.
fn reference(case: &Case) -> (Vec<String>, World) {
    let env = Env::new("crash-ref");
    (case.setup)(&env);
    let old = cap(&env, case);
    let o = env.run_env(case.client, case.args, &[("DSG_FAILPOINT", "list")]);
    assert_eq!(o.status.code(), Some(0), "{}: {}", case.name, show(&o));
    let fps = failpoints_of(&o);
    let new = cap(&env, case);
    assert!(
        new.mismatch_old(&old).is_some(),
        "{}: the reference run changed nothing",
        case.name
    );
    assert!(new.mismatch_new(&new).is_none());
    let repo = env.repo();
    let head = read_json(&repo.join(".dsg/last-sync.json"));
    assert_tree_matches_manifest(&repo, &head, "reference repository");
    assert_tree_matches_manifest(&env.client(case.client), &head, "reference client");
    assert_no_leftovers(&env.client(case.client));
    assert_no_repo_leftovers(&env.repo_parent, &repo);
    env.assert_clean(case.client);
    (fps, new)
}

/// After recovery: G1 plus "no leftovers"; then finishing reaches NEW.
fn check_recovered(env: &Env, case: &Case, old: &World, new: &World, ctx: &str) -> Outcome {
    let c = env.client(case.client);
    let repo = env.repo();
    let now = cap(env, case);
    let outcome = classify(&now, old, new, ctx);
    let head = read_json(&repo.join(".dsg/last-sync.json"));
    assert_tree_matches_manifest(&repo, &head, &format!("{ctx}: repository"));
    if outcome == Outcome::New {
        // Before the sync the local tree had unsynced changes; after it, the
        // tracked tree is exactly the cache.
        let m = now.local.manifest_json().expect("cache after sync");
        assert_tree_matches_manifest(&c, &m, &format!("{ctx}: client"));
    }
    assert_no_leftovers(&c);
    assert_no_repo_leftovers(&env.repo_parent, &repo);

    // Finish: re-running reaches NEW (or finds nothing to do).
    let again = if case.clone && outcome == Outcome::Old {
        env.run(case.client, &["clone"])
    } else {
        env.run(case.client, &["sync"])
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
    let fin = cap(env, case);
    if let Some(d) = fin.mismatch_new(new) {
        panic!("{ctx}: after recovery ({outcome:?}) and a re-run, not NEW:\n{d}");
    }
    let rows = env.status_rows(case.client);
    assert!(rows.is_empty(), "{ctx}: status not clean: {rows:?}");
    assert_no_leftovers(&c);
    assert_no_repo_leftovers(&env.repo_parent, &repo);
    outcome
}

/// Crash `case` at `fp`, recover with `recover_fp` (None: plain status;
/// Some: the recovering status is itself crashed there first).
fn crash_trial(case: &Case, fp: &str, recover_fp: Option<&str>, new: &World) -> Outcome {
    let env = Env::new("crash");
    (case.setup)(&env);
    let old = cap(&env, case);
    let repo_before = full_listing(&env.repo());
    let ctx = match recover_fp {
        None => format!("{} crashed at {fp}", case.name),
        Some(r) => format!("{} crashed at {fp}, recovery crashed at {r}", case.name),
    };
    let o = env.run_env(case.client, case.args, &[("DSG_FAILPOINT", fp)]);
    assert!(
        killed(&o.status),
        "{ctx}: expected death by SIGKILL: {}",
        show(&o)
    );
    if let Some(r) = recover_fp {
        let o = env.run_env(case.client, &["status"], &[("DSG_FAILPOINT", r)]);
        assert!(
            killed(&o.status) || o.status.code() == Some(0),
            "{ctx}: {}",
            show(&o)
        );
    }
    let st = env.run(case.client, &["status"]);
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
            &full_listing(&env.repo()),
        );
    }
    check_recovered(&env, case, &old, new, &ctx)
}

fn crash_matrix(case: &Case, must_include: &[&str], select: fn(&str) -> bool) {
    let t0 = Instant::now();
    let (fps, new) = reference(case);
    for m in must_include {
        assert!(
            fps.iter().any(|f| f == m),
            "{}: failpoint {m} not passed; passed: {fps:?}",
            case.name
        );
    }
    let mut report = Vec::new();
    let mut failed = Vec::new();
    for fp in fps.iter().filter(|f| select(f)) {
        // Run every step even when one fails, to report all of them.
        match std::panic::catch_unwind(|| crash_trial(case, fp, None, &new)) {
            Ok(outcome) => report.push(format!("{fp}={outcome:?}")),
            Err(e) => {
                report.push(format!("{fp}=FAILED"));
                failed.push((fp.clone(), panic_text(&e)));
            }
        }
    }
    eprintln!(
        "{}: {} crash points in {:.1}s: {}",
        case.name,
        report.len(),
        t0.elapsed().as_secs_f64(),
        report.join(" ")
    );
    if !failed.is_empty() {
        let mut s = format!(
            "{}: {} crash point(s) violate G1:\n",
            case.name,
            failed.len()
        );
        for (fp, msg) in &failed {
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
        None => lines.take(16).collect(),
    };
    format!("{first}\n    {}", rest.join("\n    "))
}

fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

const REPRESENTATIVE_STEPS: &[&str] = &[
    "client.journal.begin",
    "repo.journal.begin",
    "repo.stage_file",
    "client.uploaded",
    "client.downloaded",
    "client.journal.prepared",
    "repo.before_commit",
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

/// The steps that apply a committed transaction (`repo.apply.N`,
/// `client.apply.N`, `*.apply.meta`): a crash there is rolled forward.
fn apply_step(fp: &str) -> bool {
    fp.contains(".apply.")
}

#[test]
fn crash_at_every_step_of_a_representative_sync() {
    crash_matrix(&REPRESENTATIVE, REPRESENTATIVE_STEPS, |f| !apply_step(f));
}

#[test]
fn crash_while_applying_a_representative_sync() {
    crash_matrix(&REPRESENTATIVE, REPRESENTATIVE_STEPS, apply_step);
}

/// The client's apply steps of the representative sync (the repository has
/// committed and applied), files and links only.
#[test]
fn crash_while_applying_locally_files_and_links() {
    let case = Case {
        dirs: false,
        ..REPRESENTATIVE
    };
    crash_matrix(&case, REPRESENTATIVE_STEPS, |f| {
        f.starts_with("client.apply.")
    });
}

#[test]
fn crash_at_every_step_of_a_download_only_sync() {
    crash_matrix(&DOWNLOAD_ONLY, DOWNLOAD_ONLY_STEPS, |f| !apply_step(f));
}

#[test]
fn crash_while_applying_a_download_only_sync_files_and_links() {
    let case = Case {
        dirs: false,
        ..DOWNLOAD_ONLY
    };
    crash_matrix(&case, DOWNLOAD_ONLY_STEPS, apply_step);
}

/// Strict: directories emptied by the sync's deletions are gone too.
#[test]
fn crash_while_applying_a_download_only_sync() {
    crash_matrix(&DOWNLOAD_ONLY, DOWNLOAD_ONLY_STEPS, apply_step);
}

#[test]
fn crash_at_every_step_of_a_clone() {
    crash_matrix(&CLONE, CLONE_STEPS, |_| true);
}

/// A crash during the recovery of a crash: the recovery steps are
/// idempotent, so any number of interruptions still ends in OLD or NEW.
fn crash_during_recovery(firsts: &[&str], want: Outcome) {
    let case = &REPRESENTATIVE;
    let (_, new) = reference(case);
    let mut n = 0;
    for first in firsts {
        // The steps recovery passes after this crash.
        let env = Env::new("crash-rec");
        (case.setup)(&env);
        let o = env.run_env(case.client, case.args, &[("DSG_FAILPOINT", first)]);
        assert!(killed(&o.status), "{}", show(&o));
        let o = env.run_env(case.client, &["status"], &[("DSG_FAILPOINT", "list")]);
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        drop(env);
        let mut rec = failpoints_of(&o);
        rec.push("none".into());
        for r in &rec {
            let outcome = crash_trial(case, first, Some(r), &new);
            n += 1;
            assert_eq!(outcome, want, "{first} then {r}");
        }
    }
    eprintln!("crash during recovery: {n} double crashes");
}

#[test]
fn crash_during_rollback_recovery() {
    crash_during_recovery(
        &["client.journal.prepared", "repo.before_commit"],
        Outcome::Old,
    );
}

#[test]
fn crash_during_roll_forward_recovery() {
    crash_during_recovery(
        &[
            "repo.journal.committed",
            "repo.apply.1",
            "client.journal.committed",
            "client.apply.1",
        ],
        Outcome::New,
    );
}

/// kill -9 at random moments of a sync of ~2000 small files and a few
/// 20 MB ones (plus downloads and deletions).
#[test]
fn kill9_at_random_moments() {
    let trials: u64 = std::env::var("DSG_TEST_KILL_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let mut rng = Rng(seed("kill9_at_random_moments"));

    fn setup(env: &Env) {
        env.write("A", &p(IN, "base.txt"), "base");
        env.write("A", &p(IN, "del_local.txt"), "dl");
        env.write("A", &p(IN, "del_remote.txt"), "dr");
        env.write("A", &p(IN, "mod_remote.txt"), "m0");
        env.init("A");
        env.clone_client("A", "B");
        env.write("B", &p(IN, "mod_remote.txt"), "m1");
        env.remove("B", &p(IN, "del_remote.txt"));
        env.write("B", &p(IN, "from_b/x.txt"), "x");
        env.link("B", &p(IN, "from_b/l"), "x.txt");
        env.ok("B", &["sync"]);
        let a = env.client("A");
        for d in 0..20 {
            for f in 0..100 {
                let rel = format!("{IN}/many/d{d:02}/f{f:03}.txt");
                write_file(&a, &rel, format!("small file {d} {f}\n").as_bytes());
            }
        }
        for k in 0..3u64 {
            write_file(&a, &format!("{OUT}/big{k}.bin"), &bytes(100 + k, 20 << 20));
        }
        env.remove("A", &p(IN, "del_local.txt"));
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
    let env = Env::new("kill-ref");
    setup(&env);
    let t = Instant::now();
    env.ok("A", &["sync"]);
    let dur = t.elapsed();
    let new = cap(&env, &case);
    drop(env);
    eprintln!("kill9: uninterrupted sync takes {:.2}s", dur.as_secs_f64());

    let t0 = Instant::now();
    let mut outcomes = Vec::new();
    let mut failed = Vec::new();
    for trial in 0..trials {
        let delay = Duration::from_secs_f64(dur.as_secs_f64() * 1.1 * rng.unit());
        let r = std::panic::catch_unwind(|| kill_trial(&case, &new, trial, delay));
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

fn kill_trial(case: &Case, new: &World, trial: u64, delay: Duration) -> Outcome {
    {
        let env = Env::new("kill");
        (case.setup)(&env);
        let old = cap(&env, case);
        let mut child = env
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
        let st = env.run("A", &["status"]);
        assert_eq!(st.status.code(), Some(0), "{ctx}: {}", show(&st));
        check_recovered(&env, case, &old, new, &ctx)
    }
}
