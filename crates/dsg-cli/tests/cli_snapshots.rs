//! Snapshot tests of what users read: the help of every command and the
//! human output of the common outcomes (clean, changes, a sync's summary,
//! conflicts, blocked syncs, busy, errors with hints). Any change to that
//! text shows up as a reviewed diff of `tests/snapshots/*.snap`.
//!
//! Regenerate after an intended change of the output, then review:
//!
//! ```text
//! INSTA_UPDATE=always cargo test -p dsg-cli --test cli_snapshots
//! git diff crates/dsg-cli/tests/snapshots
//! ```
//!
//! (No `cargo insta` needed.) Under CI (`CI=true`) insta never writes: a
//! changed or missing snapshot fails. The commands come from `dsg --help`,
//! so a new command fails here until its help has a snapshot, and a
//! removed one fails until its snapshot is deleted.
//!
//! What changes between runs is redacted: temporary paths, times, hashes,
//! durations, pids.

mod common;
mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Output;

use common::*;

/// `s` as a regex that matches it literally.
fn literal(s: &str) -> String {
    let mut r = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            r.push('\\');
        }
        r.push(c);
    }
    r
}

fn settings(env: Option<&TestEnv>) -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_prepend_module_to_snapshot(false);
    s.set_omit_expression(true);
    if let Some(env) = env {
        for (p, name) in [
            (&env.repos, "[REPOS]"),
            (&env.base, "[WORK]"),
            (&env.user_dir, "[USER]"),
            (&env.home, "[HOME]"),
        ] {
            s.add_filter(&literal(&p.display().to_string()), name);
        }
    }
    // Conflict backups (`name~<time>~`), then times, hashes, durations, pids.
    s.add_filter(r"~[0-9][0-9T:.+Z-]*~", "~[TIME]~");
    s.add_filter(
        r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?",
        "[TIME]",
    );
    s.add_filter(r"\b[0-9a-f]{16}\b", "[HASH]");
    s.add_filter(r"\b\d+ h \d+ min\b", "[DURATION]");
    s.add_filter(r"\b\d+ min \d+ s\b", "[DURATION]");
    s.add_filter(r"\b\d+\.\d s\b", "[DURATION]");
    s.add_filter(r"\b(pid|process) \d+", "$1 [PID]");
    s
}

/// The command line, its exit code, stdout and stderr, as one text.
fn shown(args: &[&str], o: &Output) -> String {
    let mut t = format!(
        "$ dsg {}\n[exit {}]\n",
        args.join(" "),
        o.status.code().unwrap_or(-1)
    );
    for (name, bytes) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
        let text = String::from_utf8_lossy(bytes);
        if !text.is_empty() {
            t.push_str(&format!("--- {name}\n{text}"));
            if !text.ends_with('\n') {
                t.push('\n');
            }
        }
    }
    t
}

/// Runs `dsg args` in `dir` and returns it as [`shown`].
fn run(env: &TestEnv, dir: &Path, args: &[&str]) -> String {
    shown(args, &env.run(dir, args))
}

fn check(env: Option<&TestEnv>, name: &str, text: &str) {
    settings(env).bind(|| insta::assert_snapshot!(name, text));
}

/// The subcommands `dsg --help` lists: the first word of each indented
/// line of its sections other than options, arguments and environment.
fn commands() -> Vec<String> {
    let env = TestEnv::new();
    let o = env.run(&env.base, &["--help"]);
    assert_code(&o, 0, "dsg --help");
    let text = String::from_utf8(o.stdout).unwrap();
    let mut in_commands = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if !line.starts_with(' ') && line.trim_end().ends_with(':') {
            let h = line.to_ascii_lowercase();
            in_commands = !(h.contains("option")
                || h.contains("argument")
                || h.contains("environment")
                || h.starts_with("usage"));
            continue;
        }
        if !in_commands {
            continue;
        }
        let Some(rest) = line.strip_prefix("  ") else {
            continue;
        };
        let word = rest.split_whitespace().next().unwrap_or("");
        if !word.is_empty()
            && word != "help"
            && word
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && rest.len() > word.len()
        {
            out.push(word.to_string());
        }
    }
    assert!(out.len() >= 10, "found only {out:?} in dsg --help:\n{text}");
    out
}

#[test]
fn help_of_every_command() {
    let env = TestEnv::new();
    check(None, "help", &run(&env, &env.base, &["--help"]));
    let cmds = commands();
    for c in &cmds {
        check(
            None,
            &format!("help_{c}"),
            &run(&env, &env.base, &[c, "--help"]),
        );
    }
    // A command that went away leaves no stale snapshot behind.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    let want: BTreeSet<String> = cmds.iter().map(|c| format!("help_{c}.snap")).collect();
    let stale: Vec<String> = fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("help_") && n.ends_with(".snap"))
                .filter(|n| !want.contains(n))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        stale.is_empty(),
        "help snapshots of commands dsg --help no longer lists: {stale:?}; delete them"
    );
}

/// A project with a few files, initialized.
fn project(env: &TestEnv, name: &str) -> (std::path::PathBuf, String) {
    let a = env.project("a");
    write(&a, "input/a.csv", "alpha\n");
    write(&a, "input/b.csv", "bravo\n");
    write(&a, "input/big.bin", vec![7u8; 5000]);
    write(&a, "output/r.txt", "result\n");
    let o = env.init(&a, name, &[]);
    assert_code(&o, 0, "init");
    let args = env.init_args(name);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    (a, shown(&args, &o))
}

/// A second client of the same repository, cloned.
fn second(env: &TestEnv, a: &Path) -> (std::path::PathBuf, String) {
    let b = env.project("b");
    fs::copy(a.join(".dsgconfig.yml"), b.join(".dsgconfig.yml")).unwrap();
    let t = run(env, &b, &["clone"]);
    (b, t)
}

#[test]
fn init_status_sync_clone() {
    let env = TestEnv::new();
    let (a, init) = project(&env, "snapsync");
    check(Some(&env), "init", &init);
    check(Some(&env), "status_clean", &run(&env, &a, &["status"]));

    write(&a, "input/a.csv", "alpha, edited\n");
    write(&a, "input/c.csv", "charlie\n");
    fs::remove_file(a.join("input/b.csv")).unwrap();
    check(Some(&env), "status_changes", &run(&env, &a, &["status"]));
    check(
        Some(&env),
        "sync_dry_run",
        &run(&env, &a, &["sync", "--dry-run"]),
    );
    check(
        Some(&env),
        "sync_summary",
        &run(&env, &a, &["sync", "-m", "edits"]),
    );
    check(Some(&env), "sync_up_to_date", &run(&env, &a, &["sync"]));

    let (b, clone) = second(&env, &a);
    check(Some(&env), "clone", &clone);
    write(&b, "output/new.txt", "from b\n");
    fs::remove_file(b.join("input/c.csv")).unwrap();
    assert_code(&env.run(&b, &["sync", "-m", "b"]), 0, "sync b");
    check(Some(&env), "sync_summary_both_ways", &{
        write(&a, "input/d.csv", "delta\n");
        run(&env, &a, &["sync", "-m", "both ways"])
    });
    check(Some(&env), "log", &run(&env, &a, &["log"]));
    check(Some(&env), "diff", &run(&env, &a, &["diff", "s1", "s2"]));
    check(Some(&env), "list_files", &run(&env, &a, &["list-files"]));
}

#[test]
fn conflicts_in_status_and_the_blocked_sync() {
    let env = TestEnv::new();
    let (a, _) = project(&env, "snapconflict");
    let (b, _) = second(&env, &a);
    write(&a, "input/a.csv", "alpha from a\n");
    write(&a, "input/b.csv", "bravo from a\n");
    assert_code(&env.run(&a, &["sync", "-m", "a"]), 0, "sync a");
    write(&b, "input/a.csv", "alpha from b, longer\n");
    check(
        Some(&env),
        "status_one_conflict",
        &run(&env, &b, &["status"]),
    );
    write(&b, "input/b.csv", "bravo from b, longer\n");
    check(Some(&env), "status_conflicts", &run(&env, &b, &["status"]));
    check(
        Some(&env),
        "sync_blocked_by_conflicts",
        &run(&env, &b, &["sync"]),
    );
}

#[test]
fn a_sync_blocked_by_an_invalid_name() {
    let env = TestEnv::new();
    let (a, _) = project(&env, "snapname");
    write(&a, "input/what?.csv", "bad name\n");
    check(
        Some(&env),
        "status_invalid_name",
        &run(&env, &a, &["status"]),
    );
    check(
        Some(&env),
        "sync_blocked_by_invalid_name",
        &run(&env, &a, &["sync"]),
    );
}

#[test]
fn a_sync_blocked_by_the_mass_deletion_guard() {
    let env = TestEnv::new();
    let (a, _) = project(&env, "snapguard");
    for f in ["input/a.csv", "input/b.csv", "input/big.bin"] {
        fs::remove_file(a.join(f)).unwrap();
    }
    check(
        Some(&env),
        "sync_blocked_by_guard",
        &run(&env, &a, &["sync"]),
    );
}

#[test]
fn a_sync_blocked_by_a_replaced_history() {
    let env = TestEnv::new();
    let (a, _) = project(&env, "snaphist");
    let c = env.project("c");
    write(&c, "input/other.csv", "other\n");
    let mut args = env.init_args("snaphist");
    args.extend(["--force", "--confirm-replace", "snaphist"].map(String::from));
    let o = env.cmd(&c).args(&args).output().unwrap();
    assert_code(&o, 0, "init --force");
    write(&a, "input/a.csv", "alpha, edited\n");
    check(
        Some(&env),
        "status_history_replaced",
        &run(&env, &a, &["status"]),
    );
    check(
        Some(&env),
        "sync_blocked_by_history",
        &run(&env, &a, &["sync"]),
    );
}

#[test]
fn busy_repository() {
    use std::os::fd::AsRawFd;
    let env = TestEnv::new();
    let (a, _) = project(&env, "snapbusy");
    write(&a, "input/a.csv", "alpha, edited\n");
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(env.repo("snapbusy").join(".dsg/lock"))
        .unwrap();
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let args = ["sync"];
    let o = env
        .cmd(&a)
        .env("DSG_LOCK_TIMEOUT", "1")
        .args(args)
        .output()
        .unwrap();
    assert_code(&o, 4, "sync while locked");
    check(Some(&env), "sync_busy", &shown(&args, &o));
    drop(lock);
}

#[test]
fn errors_with_hints() {
    let env = TestEnv::new();
    let empty = env.project("empty");
    check(
        Some(&env),
        "error_no_project",
        &run(&env, &empty, &["status"]),
    );
    let (a, _) = project(&env, "snaperr");
    check(
        Some(&env),
        "error_unknown_snapshot",
        &run(&env, &a, &["snapfetch", "--snapshot", "s9", "input/a.csv"]),
    );
    check(
        Some(&env),
        "error_unknown_diff_snapshot",
        &run(&env, &a, &["diff", "s9"]),
    );
    check(
        Some(&env),
        "error_usage",
        &run(&env, &a, &["sync", "--max-delete", "101"]),
    );
}
