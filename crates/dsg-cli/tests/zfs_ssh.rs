//! A ZFS repository reached over SSH: the agent runs behind the test sshd
//! (`dsg agent --type zfs --pool P`) and drives the same clone-as-transaction
//! commit; a connection cut partway through an upload resumes inside the
//! transaction's clone (or, for init, its new dataset). Checked on the ZFS
//! side (dataset, snapshots, no transaction leftovers) and on disk. Needs
//! both the test sshd and the test pool (skipped without them, failures
//! under CI=true).

mod ssh_support;
mod support;
mod sync_support;
mod zfs_support;

use ssh_support::{FaultPlan, FaultProxy, Ssh};
use sync_support::{
    assert_no_leftovers, assert_same, data_tree, show, stderr, tracked, write_file,
};
use zfs_support::*;

const MIB: u64 = 1 << 20;
const BIG: u64 = 32 * MIB;
const CUT: u64 = 24_000_000;

struct ZSsh {
    z: ZEnv,
    ssh: Ssh,
}

impl ZSsh {
    fn new(prefix: &str) -> Option<ZSsh> {
        let ssh = ssh_support::ssh_or_skip()?;
        let z = ZEnv::new(prefix)?;
        Some(ZSsh { z, ssh })
    }

    fn init_args(&self) -> Vec<String> {
        let mut a = self.z.init_args();
        let i = a.iter().position(|x| x == "localhost").expect("--host");
        a[i] = self.ssh.host.clone();
        a.push("--remote-dsg".into());
        a.push(ssh_support::dsg_bin().to_string_lossy().into_owned());
        a
    }

    fn run_via(&self, client: &str, args: &[&str], ssh_command: &str) -> std::process::Output {
        self.z
            .run_env(client, args, &[("DSG_SSH_COMMAND", ssh_command)])
    }

    #[track_caller]
    fn ok(&self, client: &str, args: &[&str]) -> std::process::Output {
        let o = self.run_via(client, args, &self.ssh.command());
        assert_eq!(o.status.code(), Some(0), "dsg {args:?}: {}", show(&o));
        o
    }

    fn init(&self, client: &str) {
        let a = self.init_args();
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        self.ok(client, &a);
    }
}

#[test]
fn zfs_repository_over_ssh_init_sync_clone() {
    let Some(w) = ZSsh::new("zssh") else { return };
    let z = &w.z;
    z.write("A", &p(IN, "a.csv"), "a\n");
    z.write("A", &p(IN, "sub/b.bin"), sync_support::bytes(1, 30_000));
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
    let Some(w) = ZSsh::new("zsshres") else {
        return;
    };
    let z = &w.z;
    z.write("A", &p(IN, "a.csv"), "a\n");
    w.init("A");
    sync_support::write_file(
        &z.client("A"),
        &p(IN, "big.bin"),
        &sync_support::bytes(7, BIG as usize),
    );
    let local = tracked(&data_tree(&z.client("A")));
    let proxy = FaultProxy::start(w.ssh.port(), FaultPlan::cut_first(CUT));
    let o = w.run_via("A", &["sync", "-m", "big"], &proxy.ssh_command(&w.ssh));
    assert_resumed(&proxy, &o);
    drop(proxy);
    assert_eq!(z.assert_repo_dataset("after a resumed zfs sync"), 2);
    z.assert_no_zfs_leftovers("after a resumed zfs sync");
    assert_same("repository", &local, &tracked(&data_tree(&z.repo())));
    assert_no_leftovers(&z.client("A"));
}

#[test]
fn zfs_init_over_ssh_resumes_after_a_cut() {
    let Some(w) = ZSsh::new("zsshini") else {
        return;
    };
    let z = &w.z;
    write_file(
        &z.client("A"),
        &p(IN, "big.bin"),
        &sync_support::bytes(8, BIG as usize),
    );
    z.write("A", &p(IN, "small.csv"), "s\n");
    let local = tracked(&data_tree(&z.client("A")));
    let proxy = FaultProxy::start(w.ssh.port(), FaultPlan::cut_first(CUT));
    let a = w.init_args();
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let o = w.run_via("A", &a, &proxy.ssh_command(&w.ssh));
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
    let Some(w) = ZSsh::new("zsshab") else { return };
    let z = &w.z;
    z.write("A", &p(IN, "a.csv"), "a\n");
    w.init("A");
    write_file(
        &z.client("A"),
        &p(IN, "big.bin"),
        &sync_support::bytes(9, BIG as usize),
    );
    let mut plan = FaultPlan::cut_all(2_000_000);
    plan.max_connections = 8;
    let proxy = FaultProxy::start(w.ssh.port(), plan);
    let o = w.run_via("A", &["sync", "-m", "doomed"], &proxy.ssh_command(&w.ssh));
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
