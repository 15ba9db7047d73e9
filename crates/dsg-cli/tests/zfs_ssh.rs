//! A ZFS repository reached over SSH: the agent runs behind the test sshd
//! (`dsg agent --type zfs --pool P`) and drives the same clone-as-transaction
//! commit; a connection cut partway through an upload resumes inside the
//! transaction's clone (or, for init, its new dataset). Checked on the ZFS
//! side (dataset, snapshots, no transaction leftovers) and on disk. Needs
//! both the test sshd and the test pool (skipped without them, failures
//! under CI=true).

mod world;

use world::ssh_support::{FaultPlan, FaultProxy};
use world::*;

const MIB: u64 = 1 << 20;
const BIG: u64 = 32 * MIB;
const CUT: u64 = 24_000_000;

#[test]
fn zfs_repository_over_ssh_init_sync_clone() {
    let Some(w) = World::zfs_over_ssh("zssh") else {
        return;
    };
    let z = w.zfs();
    z.write("A", &p(IN, "a.csv"), "a\n");
    z.write("A", &p(IN, "sub/b.bin"), bytes(1, 30_000));
    w.init("A");
    assert_eq!(z.assert_repo_dataset("after init over ssh"), 1);
    z.write("A", &p(IN, "a.csv"), "a2\n");
    z.write("A", &p(OUT, "r.txt"), "r\n");
    w.ok("A", &["sync", "-m", "over ssh"]);
    assert_eq!(z.assert_repo_dataset("after sync over ssh"), 2);
    z.assert_no_zfs_leftovers("after sync over ssh");
    z.prepare_clone("A", "B");
    w.ok("B", &["clone"]);
    assert_same(
        "B after clone over ssh",
        &tracked(&data_tree(&z.client("A"))),
        &tracked(&data_tree(&z.client("B"))),
    );
    assert_same(
        "repository",
        &tracked(&data_tree(&z.client("A"))),
        &tracked(&data_tree(&z.repo())),
    );
}

#[track_caller]
fn assert_resumed(proxy: &FaultProxy, o: &std::process::Output) {
    assert!(proxy.cut() >= 1, "the proxy never cut: {}", show(o));
    assert_eq!(o.status.code(), Some(0), "{}", show(o));
    assert!(stderr(o).contains("resuming"), "{}", show(o));
    let later = proxy.bytes().saturating_sub(CUT);
    eprintln!("{later} bytes after the cut for a {BIG}-byte file");
    assert!(
        later < BIG - 4 * MIB,
        "{later} bytes after the cut: the upload restarted instead of resuming\n{}",
        show(o)
    );
}

#[test]
fn zfs_sync_over_ssh_resumes_after_a_cut() {
    let Some(w) = World::zfs_over_ssh("zsshres") else {
        return;
    };
    let z = w.zfs();
    z.write("A", &p(IN, "a.csv"), "a\n");
    w.init("A");
    write_file(&z.client("A"), &p(IN, "big.bin"), &bytes(7, BIG as usize));
    let local = tracked(&data_tree(&z.client("A")));
    let proxy = FaultProxy::start(w.ssh().port(), FaultPlan::cut_first(CUT));
    let o = w.run_env(
        "A",
        &["sync", "-m", "big"],
        &[("DSG_SSH_COMMAND", &proxy.ssh_command(w.ssh()))],
    );
    assert_resumed(&proxy, &o);
    drop(proxy);
    assert_eq!(z.assert_repo_dataset("after a resumed zfs sync"), 2);
    z.assert_no_zfs_leftovers("after a resumed zfs sync");
    assert_same("repository", &local, &tracked(&data_tree(&z.repo())));
    assert_no_leftovers(&z.client("A"));
}

#[test]
fn zfs_init_over_ssh_resumes_after_a_cut() {
    let Some(w) = World::zfs_over_ssh("zsshini") else {
        return;
    };
    let z = w.zfs();
    write_file(&z.client("A"), &p(IN, "big.bin"), &bytes(8, BIG as usize));
    z.write("A", &p(IN, "small.csv"), "s\n");
    let local = tracked(&data_tree(&z.client("A")));
    let proxy = FaultProxy::start(w.ssh().port(), FaultPlan::cut_first(CUT));
    let a = w.init_args();
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let o = w.run_env("A", &a, &[("DSG_SSH_COMMAND", &proxy.ssh_command(w.ssh()))]);
    assert_resumed(&proxy, &o);
    drop(proxy);
    assert_eq!(z.assert_repo_dataset("after a resumed zfs init"), 1);
    z.assert_no_zfs_leftovers("after a resumed zfs init");
    assert_same("repository", &local, &tracked(&data_tree(&z.repo())));
}

/// Every connection cut early: the sync fails; the clone it left for a
/// resume is destroyed by the next command.
#[test]
fn zfs_abandoned_upload_over_ssh_is_recovered() {
    let Some(w) = World::zfs_over_ssh("zsshab") else {
        return;
    };
    let z = w.zfs();
    z.write("A", &p(IN, "a.csv"), "a\n");
    w.init("A");
    write_file(&z.client("A"), &p(IN, "big.bin"), &bytes(9, BIG as usize));
    let mut plan = FaultPlan::cut_all(2_000_000);
    plan.max_connections = 8;
    let proxy = FaultProxy::start(w.ssh().port(), plan);
    let o = w.run_env(
        "A",
        &["sync", "-m", "doomed"],
        &[("DSG_SSH_COMMAND", &proxy.ssh_command(w.ssh()))],
    );
    drop(proxy);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        z.datasets()
            .iter()
            .any(|d| d.starts_with(&format!("{}--tx-", z.dataset()))),
        "the cut upload left no clone to resume: the test tests nothing ({:?})",
        z.datasets()
    );
    w.ok("A", &["status"]);
    z.assert_no_zfs_leftovers("after the next command");
    assert_eq!(z.assert_repo_dataset("after the next command"), 1);
    w.ok("A", &["sync", "-m", "again"]);
    assert_eq!(z.assert_repo_dataset("after the rerun"), 2);
}
