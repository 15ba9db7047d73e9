//! Resuming an upload after the ssh connection drops: the fault proxy cuts
//! the first connection partway through a large file; dsg reconnects and
//! sends only what the agent lacks. The proxy counts every byte it
//! forwards, so "resumed, not restarted" is measured, not taken from dsg's
//! output: the connections after the cut must carry clearly less than the
//! file. The result is checked on disk on both sides.

mod ssh_support;
mod support;

use std::path::Path;

use ssh_support::*;

const MIB: u64 = 1 << 20;
const BIG: u64 = 32 * MIB;
/// Where the first connection is cut (bytes through the proxy, both ways).
const CUT: u64 = 24_000_000;

/// `.dsg-init.*` staging directories an init left beside the repository.
fn init_leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(".dsg-init.") && !n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default()
}

/// Bytes the proxy forwarded after the first (cut) connection.
fn after_cut(proxy: &FaultProxy) -> u64 {
    proxy.bytes().saturating_sub(CUT)
}

#[track_caller]
fn assert_resumed(proxy: &FaultProxy, o: &std::process::Output) {
    assert!(
        proxy.cut() >= 1,
        "the proxy never cut ({} bytes): the test tested nothing\n{}",
        proxy.bytes(),
        show(o)
    );
    assert_exit(o, 0, "a command whose connection was cut once");
    assert!(
        stderr(o).contains("resuming"),
        "the retry is reported as a resume:\n{}",
        show(o)
    );
    let later = after_cut(proxy);
    eprintln!(
        "first connection cut at {CUT} bytes; {} connection(s) in all; {later} bytes after the cut for a {BIG}-byte file",
        proxy.accepted()
    );
    // A restart would send the whole file again (plus ssh's overhead).
    assert!(
        later < BIG - 4 * MIB,
        "after the cut {later} bytes went through for a {BIG}-byte file: the upload restarted instead of resuming\n{}",
        show(o)
    );
}

#[test]
fn sync_resumes_a_large_upload_after_the_connection_drops() {
    let ssh = need_ssh!();
    let w = World::new("resume-sync", Transport::Ssh, Some(&ssh));
    w.write("a", "task/input/base.txt", "base\n");
    w.init("a");
    let big = w.client("a").join("task/input/big.bin");
    write_big_file(&big, 11, BIG);
    // Staged before the cut (paths upload in order), so the resume stages
    // this link again over the one already there.
    w.link("a", "task/input/a-link.csv", "base.txt");
    for i in 0..20u64 {
        w.write(
            "a",
            &format!("task/input/small/{i}.csv"),
            random_bytes(200 + i, 3000),
        );
    }
    let local = data_tree(&w.client("a"));

    let proxy = FaultProxy::start(ssh.port(), FaultPlan::cut_first(CUT));
    let o = w.run_via("a", &["sync", "-m", "resumed"], &proxy.ssh_command(&ssh));
    assert_resumed(&proxy, &o);
    drop(proxy);

    assert_same(
        "repository after a resumed sync",
        &local,
        &data_tree(&w.repo()),
    );
    assert_eq!(
        std::fs::read_link(w.repo().join("task/input/a-link.csv")).unwrap(),
        std::path::Path::new("base.txt")
    );
    assert!(same_bytes(&big, &w.repo().join("task/input/big.bin")));
    assert_eq!(w.repo_snapshot(), "s2");
    w.assert_in_sync("a");
    let l = leftovers(&w.repo());
    assert!(l.is_empty(), "the repository has leftovers: {l:?}");
    let l = leftovers(&w.client("a"));
    assert!(l.is_empty(), "the client has leftovers: {l:?}");
}

#[test]
fn init_resumes_a_large_upload_after_the_connection_drops() {
    let ssh = need_ssh!();
    let w = World::new("resume-init", Transport::Ssh, Some(&ssh));
    let big = w.client("a").join("task/input/big.bin");
    write_big_file(&big, 12, BIG);
    for i in 0..20u64 {
        w.write(
            "a",
            &format!("task/output/{i}.csv"),
            random_bytes(300 + i, 2000),
        );
    }
    let local = data_tree(&w.client("a"));

    let proxy = FaultProxy::start(ssh.port(), FaultPlan::cut_first(CUT));
    let args = w.init_args();
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = w.run_via("a", &args, &proxy.ssh_command(&ssh));
    assert_resumed(&proxy, &o);
    drop(proxy);

    assert_same(
        "repository after a resumed init",
        &local,
        &data_tree(&w.repo()),
    );
    assert!(same_bytes(&big, &w.repo().join("task/input/big.bin")));
    assert_eq!(w.repo_snapshot(), "s1");
    w.assert_in_sync("a");
    let l = init_leftovers(&w.repo_parent);
    assert!(
        l.is_empty(),
        "init staging left beside the repository: {l:?}"
    );
}

/// Every connection is cut at 16 MB: no two connections can carry the
/// 32 MiB file, so the sync completes only if each resume continues where
/// the previous connection stopped.
#[test]
fn resumes_accumulate_across_several_cuts() {
    let ssh = need_ssh!();
    let w = World::new("resume-many", Transport::Ssh, Some(&ssh));
    w.write("a", "task/input/base.txt", "base\n");
    w.init("a");
    let big = w.client("a").join("task/input/big.bin");
    write_big_file(&big, 14, BIG);
    let local = data_tree(&w.client("a"));

    let cut = 16_000_000u64;
    let mut plan = FaultPlan::cut_all(cut);
    plan.max_connections = 8;
    let proxy = FaultProxy::start(ssh.port(), plan);
    let o = w.run_via("a", &["sync", "-m", "piecewise"], &proxy.ssh_command(&ssh));
    let (accepted, cuts, bytes) = (proxy.accepted(), proxy.cut(), proxy.bytes());
    drop(proxy);
    eprintln!("{accepted} connection(s), {cuts} cut, {bytes} bytes in all");
    assert!(
        cuts >= 2 && bytes <= cut * accepted as u64,
        "every connection was to be cut at {cut} bytes: {cuts} cuts, {bytes} bytes, {accepted} connections"
    );
    assert_exit(&o, 0, "a sync whose every connection is cut at 16 MB");
    assert_same(
        "repository after a piecewise upload",
        &local,
        &data_tree(&w.repo()),
    );
    assert!(same_bytes(&big, &w.repo().join("task/input/big.bin")));
    w.assert_in_sync("a");
}

/// An upload that cannot be finished (every connection cut early) leaves
/// its staging on the server for a resume that never comes; the next
/// command of any client removes it, and a rerun publishes everything.
#[test]
fn an_abandoned_upload_is_recovered_by_the_next_command() {
    let ssh = need_ssh!();
    let w = World::new("resume-lost", Transport::Ssh, Some(&ssh));
    w.write("a", "task/input/base.txt", "base\n");
    w.init("a");
    w.clone_client("a", "b");
    let big = w.client("a").join("task/input/big.bin");
    write_big_file(&big, 13, BIG);
    let local = data_tree(&w.client("a"));

    // Every connection is cut early: the sync fails after its retries,
    // leaving (at most) a detached staging directory on the server.
    let mut plan = FaultPlan::cut_all(2_000_000);
    plan.max_connections = 8;
    let proxy = FaultProxy::start(ssh.port(), plan);
    let o = w.run_via("a", &["sync", "-m", "doomed"], &proxy.ssh_command(&ssh));
    drop(proxy);
    assert_exit(&o, 1, "sync with every connection cut");
    assert!(
        !leftovers(&w.repo()).is_empty(),
        "the cut upload left nothing staged: the test tests nothing"
    );

    // Client b's status recovers the repository: nothing is left.
    w.ok("b", &["status"]);
    let l = leftovers(&w.repo());
    assert!(l.is_empty(), "recovery left: {l:?}");
    assert_eq!(w.repo_snapshot(), "s1");

    w.ok("a", &["sync", "-m", "again"]);
    assert_same("repository after the rerun", &local, &data_tree(&w.repo()));
    w.assert_in_sync("a");
}
