//! Faults during sync and init, on every repository kind where the fault
//! can be made. Each must fail cleanly: a clear error, nothing changed
//! anywhere (or, past the commit point, exactly the old or the new state
//! after the next command), no leftovers.
//!
//! - A full disk on either side (a small tmpfs: posix repositories),
//!   permission errors in the repository and users who may only read it
//!   (xfs: they need a repository on this machine's filesystem, switched
//!   users and `chmod`), a file modified while it is uploaded (G3; xfs: the
//!   test watches the repository's staging directory; s3: its multipart
//!   uploads).
//! - A corrupt, tampered, missing or empty repository manifest (G4): every
//!   kind.
//! - A `zfs` command that fails in the middle of a transaction or an init
//!   (zfs: a wrapper named `zfs`, first in the PATH of the dsg process
//!   only, runs the real zfs but exits 1 for one chosen command).
//!
//! | test                                               | xfs | zfs | ssh | s3 |
//! |----------------------------------------------------|-----|-----|-----|----|
//! | repository_disk_full                               |  x  |     |     |    |
//! | client_disk_full                                   |  x  |     |     | x  |
//! | repository_full_for_new_object_folder              |  x  |     |     |    |
//! | repository_objects_not_writable                    |  x  |     |     |    |
//! | client_target_folder_not_writable                  |  x  |  x  |     | x  |
//! | permission_denied_*, read_only_user_*              |  x  |     |     |    |
//! | s3_read_only_identity_*                            |     |     |     | x  |
//! | file_modified_while_uploading                      |  x  |     |     | x  |
//! | {corrupt,tampered,missing,empty}_repository_manifest | x |  x  |  x  | x  |
//! | failing_* (sync), init_with_a_failing_*            |     |  x  |     |    |
//!
//! On s3 a user who may only read is a key the store lets GET and list
//! only (scripts/s3-cluster makes one); the store's own faults (throttling,
//! cut connections, a server error, a lost volume server, refused
//! credentials) are in s3_repo.rs, through a fault-injecting proxy.
//!
//! Formerly sync_faults.rs (xfs) and zfs_faults.rs (zfs).

mod world;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use world::*;

const IN: &str = "task/input";

fn p(name: &str) -> String {
    format!("{IN}/{name}")
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// `None` (test skipped, with a message) when mounting is impossible
    /// here and CI is not "true"; under CI a failure to mount panics.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = std::env::temp_dir().join(unique("dsg-tmpfs"));
        fs::create_dir_all(&dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")])
            .arg("tmpfs")
            .arg(&dir)
            .output();
        match o {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            other => {
                let _ = fs::remove_dir(&dir);
                let why = match other {
                    Ok(o) => show(&o),
                    Err(e) => e.to_string(),
                };
                if is_ci() {
                    panic!("CI=true: cannot mount a tmpfs to fill: {why}");
                }
                eprintln!("SKIPPED: cannot mount a tmpfs (needs root): {why}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

fn listings(
    env: &World,
    clients: &[&str],
) -> Vec<std::collections::BTreeMap<String, (Node, i64, i64)>> {
    let mut v: Vec<_> = clients
        .iter()
        .map(|c| state_listing(&env.client(c)))
        .collect();
    v.push(state_listing(&env.repo()));
    v
}

#[track_caller]
fn assert_unchanged(
    env: &World,
    clients: &[&str],
    before: &[std::collections::BTreeMap<String, (Node, i64, i64)>],
) {
    let after = listings(env, clients);
    for (i, c) in clients.iter().enumerate() {
        assert_same(&format!("client {c}"), &before[i], &after[i]);
    }
    assert_same("repository", before.last().unwrap(), after.last().unwrap());
    for c in clients {
        assert_no_leftovers(&env.client(c));
    }
    assert_no_repo_leftovers(&env.repo_parent, &env.repo());
}

/// The repository's filesystem fills up while a sync uploads.
fn repository_disk_full(kind: Kind) {
    let Some(fs8) = Tmpfs::mount("8m") else {
        return;
    };
    let Some(env) = World::on(kind, &fs8.dir) else {
        return;
    };
    env.write("A", &p("a.txt"), "a");
    env.write("A", &p("mod.txt"), "m0");
    env.write("A", &p("del.txt"), "d");
    env.init("A");
    env.write("A", &p("mod.txt"), "m1");
    env.remove("A", &p("del.txt"));
    env.write("A", &p("new.txt"), "n");
    env.write("A", &p("big/huge.bin"), bytes(1, 12 << 20));
    let before = listings(&env, &["A"]);
    let o = env.run("A", &["sync"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = stderr(&o);
    assert!(
        err.contains("space"),
        "the error says the disk is full: {err}"
    );
    assert_unchanged(&env, &["A"], &before);
    // The repository still works, and with room the sync succeeds.
    env.ok("A", &["status"]);
    env.remove("A", &p("big"));
    env.ok("A", &["sync"]);
    assert_same(
        "repository vs A",
        &tracked(&data_tree(&env.client("A"))),
        &tracked(&data_tree(&env.repo())),
    );
    env.assert_clean("A");
    drop(env);
}

/// The client's filesystem fills up while a sync downloads.
fn client_disk_full(kind: Kind) {
    let Some(fs8) = Tmpfs::mount("8m") else {
        return;
    };
    let env = world_or_skip!(kind, "clientfull");
    env.write("A", &p("a.txt"), "a");
    env.init("A");
    // Client B lives on the small filesystem.
    std::os::unix::fs::symlink(&fs8.dir, env.client("B")).unwrap();
    env.clone_client("A", "B");
    env.write("A", &p("big.bin"), bytes(2, 12 << 20));
    env.write("A", &p("a.txt"), "a changed");
    env.ok("A", &["sync"]);
    env.write("B", &p("b.txt"), "b's own change");
    let before = listings(&env, &["A", "B"]);
    let last = fs::read(env.client("B").join(".dsg/last-sync.json")).unwrap();
    let o = env.run("B", &["sync"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = stderr(&o);
    // The real cause, the local disk, and where: not the repository.
    assert!(
        err.contains("local disk is full") && err.contains("space"),
        "the error says the local disk is full: {err}"
    );
    assert!(
        err.contains(&p("big.bin")) && err.contains(".dsg/staging/"),
        "the error names the file being written: {err}"
    );
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(err.contains("hint: free space"), "{err}");
    assert!(
        !err.contains("damaged"),
        "a full local disk is not repository damage: {err}"
    );
    assert_unchanged(&env, &["A", "B"], &before);
    assert_eq!(
        fs::read(env.client("B").join(".dsg/last-sync.json")).unwrap(),
        last
    );
    env.ok("B", &["status"]);
    assert!(
        !env.client("B").join(".dsg/staging").exists(),
        "no staging left after the next command"
    );
    drop(env);
}

/// How to run dsg as an unprivileged user (root ignores permissions).
fn unprivileged() -> Option<Vec<String>> {
    if euid() != 0 {
        return Some(vec![]);
    }
    let has = |c: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if has("setpriv") {
        return Some(
            [
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
            ]
            .map(String::from)
            .to_vec(),
        );
    }
    if has("runuser") {
        return Some(["runuser", "-u", "nobody", "--"].map(String::from).to_vec());
    }
    if is_ci() {
        panic!("CI=true: running as root without setpriv or runuser");
    }
    eprintln!("SKIPPED: root without setpriv/runuser: permissions cannot be tested");
    None
}

fn chown_nobody(paths: &[&Path]) {
    if euid() != 0 {
        return;
    }
    for p in paths {
        let st = Command::new("chown")
            .args(["-R", "nobody:nogroup"])
            .arg(p)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// A world whose files belong to the unprivileged user; returns the
/// command prefix to run dsg as that user.
fn unprivileged_world(env: &World) -> Option<Vec<String>> {
    let pre = unprivileged()?;
    chmod(env.tmp.path(), 0o755);
    chown_nobody(&[env.tmp.path(), &env.repo_parent]);
    Some(pre)
}

/// The prefix that runs dsg as another, unprivileged user who may only
/// read the repository (switching users needs root). Skips outside CI
/// when that is impossible; fails under CI.
fn other_reader(env: &World) -> Option<Vec<String>> {
    let pre = unprivileged()?;
    if pre.is_empty() {
        assert!(
            !is_ci(),
            "CI=true but not root: cannot run as a read-only user"
        );
        eprintln!("SKIPPED: needs root to run as another user");
        return None;
    }
    chmod(env.tmp.path(), 0o755);
    Some(pre)
}

fn run_as(env: &World, pre: &[String], who: &str, args: &[&str]) -> std::process::Output {
    env.command_as(pre, who, args).output().unwrap()
}

/// The repository's `.dsg/` is not writable: the sync fails before its
/// commit point, cleanly.
fn permission_denied_on_repository_metadata(kind: Kind) {
    let env = world_or_skip!(kind, "perm1");
    env.write("A", &p("a.txt"), "a");
    env.init("A");
    let Some(pre) = unprivileged_world(&env) else {
        return;
    };
    env.write("A", &p("new.txt"), "n");
    chown_nobody(&[&env.client("A")]);
    let dsg = env.repo().join(".dsg");
    chmod(&dsg, 0o555);
    let before = listings(&env, &["A"]);
    let o = run_as(&env, &pre, "A", &["sync"]);
    chmod(&dsg, 0o755);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains("Permission denied") && stderr(&o).contains(".dsg"),
        "{}",
        show(&o)
    );
    assert_unchanged(&env, &["A"], &before);
    let o = run_as(&env, &pre, "A", &["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(fs::read(env.repo().join(p("new.txt"))).unwrap(), b"n");
}

/// A data directory inside the repository is read-only: the sync must fail
/// cleanly (exit 1, the path named), leave both sides as they were, and
/// leave the repository usable by everyone.
fn permission_denied_in_repository_data_dir(kind: Kind) {
    let env = world_or_skip!(kind, "perm2");
    env.write("A", &p("a.txt"), "a");
    env.write("A", &p("sub/s.txt"), "s");
    env.init("A");
    env.clone_client("A", "B");
    let Some(pre) = unprivileged_world(&env) else {
        return;
    };
    env.write("A", &p("sub/new.txt"), "n");
    env.write("A", &p("a.txt"), "a2");
    chown_nobody(&[&env.client("A")]);
    let sub = env.repo().join(IN).join("sub");
    chmod(&sub, 0o555);
    let before = listings(&env, &["A", "B"]);
    let o = run_as(&env, &pre, "A", &["sync"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        stderr(&o).contains("Permission denied") && stderr(&o).contains("sub"),
        "{}",
        show(&o)
    );
    // Still read-only: everybody can keep working.
    for who in ["A", "B"] {
        let o = run_as(&env, &pre, who, &["status"]);
        assert_eq!(o.status.code(), Some(0), "{who}: {}", show(&o));
    }
    assert_unchanged(&env, &["A", "B"], &before);
    chmod(&sub, 0o755);
    let o = run_as(&env, &pre, "A", &["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(fs::read(env.repo().join(p("sub/new.txt"))).unwrap(), b"n");
}

/// A user who may only read the repository can still clone it (clone never
/// writes the repository).
fn read_only_user_can_clone(kind: Kind) {
    let env = world_or_skip!(kind, "roclone");
    env.write("A", &p("a.txt"), "a");
    env.init("A");
    env.ok("A", &["status"]);
    let Some(pre) = unprivileged() else {
        return;
    };
    if pre.is_empty() {
        // Not root: make the repository read-only for ourselves.
        for (path, md) in walk_all(&env.repo()) {
            if md.is_dir() {
                chmod(&path, 0o555);
            } else if md.is_file() {
                chmod(&path, 0o444);
            }
        }
        chmod(&env.repo(), 0o555);
    }
    env.prepare_clone("A", "C");
    chown_nobody(&[&env.client("C")]);
    let before = full_listing(&env.repo());
    let o = run_as(&env, &pre, "C", &["clone"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_same("repository", &before, &full_listing(&env.repo()));
    assert_eq!(fs::read(env.client("C").join(p("a.txt"))).unwrap(), b"a");
}

/// An upload abandoned in the repository (its writer was killed) does not
/// stop a user who may only read it: the leftovers do not touch the head,
/// so the reader reads past them, writes nothing, and a writer's next
/// command removes them.
fn read_only_user_reads_past_an_abandoned_upload(kind: Kind) {
    let env = world_or_skip!(kind, "roabandon");
    env.write("A", &p("a.txt"), "a");
    env.init("A");
    let Some(pre) = other_reader(&env) else {
        return;
    };
    env.write("A", &p("new.bin"), bytes(3, 100_000));
    let o = env.run_env("A", &["sync"], &[("DSG_FAILPOINT", "repo.stage_file")]);
    assert!(killed(&o.status), "{}", show(&o));
    let staging = env.repo().join(".dsg/staging");
    assert!(
        staging.is_dir(),
        "the killed sync left no staging: the test tests nothing"
    );
    env.prepare_clone("A", "C");
    chown_nobody(&[&env.client("C")]);
    let before = full_listing(&env.repo());
    let o = run_as(&env, &pre, "C", &["clone"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(fs::read(env.client("C").join(p("a.txt"))).unwrap(), b"a");
    assert!(!env.client("C").join(p("new.bin")).exists());
    assert_same(
        "repository after a read-only clone",
        &before,
        &full_listing(&env.repo()),
    );
    let o = run_as(&env, &pre, "C", &["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    // A writer's next command cleans up.
    env.ok("A", &["status"]);
    assert!(!staging.exists(), "the writer's recovery left the staging");
    assert_no_leftovers(&env.repo());
}

/// A reader who may not write finds another client's commit between its
/// `committed` record and its end: it waits for that writer and reads the
/// finished snapshot, instead of failing "not finished".
fn read_only_user_waits_out_a_commit_in_progress(kind: Kind) {
    let env = world_or_skip!(kind, "rowait");
    env.write("A", &p("a.txt"), "a");
    env.init("A");
    let Some(pre) = other_reader(&env) else {
        return;
    };
    env.prepare_clone("A", "C");
    chown_nobody(&[&env.client("C")]);
    let o = run_as(&env, &pre, "C", &["clone"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    env.write("A", &p("b.txt"), "b");
    let mut writer = env.command("A", &["sync"]);
    writer.env("DSG_FAILPOINT", "repo.journal.committed:pause=4000");
    let writer = writer.stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Inside the pause: the journal says committed, nothing is applied yet.
    let journal = env.repo().join(".dsg/journal");
    let t0 = Instant::now();
    let committed = |b: Vec<u8>| b.windows(17).any(|w| w == br#""rec":"committed""#);
    while !fs::read(&journal).map(committed).unwrap_or(false) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the writer never committed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = run_as(&env, &pre, "C", &["sync"]);
    let w = writer.wait_with_output().unwrap();
    assert_eq!(
        w.status.code(),
        Some(0),
        "writer: {}",
        String::from_utf8_lossy(&w.stderr)
    );
    assert_eq!(o.status.code(), Some(0), "reader: {}", show(&o));
    assert_eq!(fs::read(env.client("C").join(p("b.txt"))).unwrap(), b"b");
}

/// On s3 a user who may only read is an identity whose keys may GET and
/// list but not PUT or DELETE (`DSG_TEST_S3_READER_*`, made by
/// scripts/s3-cluster): `who`'s dsg command run with those keys.
fn s3_reader(env: &World, who: &str, args: &[&str]) -> std::process::Output {
    let c = &env.s3().cluster;
    env.command(who, args)
        .env("AWS_ACCESS_KEY_ID", c.var("DSG_TEST_S3_READER_KEY_ID"))
        .env("AWS_SECRET_ACCESS_KEY", c.var("DSG_TEST_S3_READER_SECRET"))
        .output()
        .unwrap()
}

/// s3: a reader clones, and reads status, without writing an object (not
/// even the lease); its sync of a local change fails before it changes
/// anything, saying it may not write.
fn s3_read_only_identity_can_clone(kind: Kind) {
    let env = world_or_skip!(kind, "s3roclone");
    env.write("A", &p("a.txt"), "a");
    env.write("A", &p("big.bin"), bytes(4, 20 << 20));
    env.init("A");
    env.prepare_clone("A", "C");
    let before = env.repo_full_listing();
    let o = s3_reader(&env, "C", &["clone"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_same("repository", &before, &env.repo_full_listing());
    assert_same(
        "C vs A",
        &tracked(&data_tree(&env.client("A"))),
        &tracked(&data_tree(&env.client("C"))),
    );
    let o = s3_reader(&env, "C", &["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    env.write("C", &p("c.txt"), "c's change");
    let c_before = state_listing(&env.client("C"));
    let o = s3_reader(&env, "C", &["sync"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = stderr(&o);
    assert!(
        err.contains("AccessDenied")
            && err.contains("may only read")
            && err.contains(&env.s3().cluster.bucket),
        "the error says the store refused, and where: {err}"
    );
    assert_same("repository", &before, &env.repo_full_listing());
    assert_same("client C", &c_before, &state_listing(&env.client("C")));
    assert_no_leftovers(&env.client("C"));
    env.s3()
        .assert_no_leftovers("after a reader's refused sync");
}

/// s3: a writer killed mid-upload leaves its journal, its uploads and a
/// held lease; a reader clones past them (they do not touch `HEAD`),
/// writing nothing, and a writer's next command removes them once the
/// lease expired.
fn s3_read_only_identity_reads_past_an_abandoned_upload(kind: Kind) {
    let env = world_or_skip!(kind, "s3roabandon");
    env.write("A", &p("a.txt"), "a");
    env.init("A");
    env.write("A", &p("new.bin"), bytes(3, 100_000));
    let o = env.run_env("A", &["sync"], &[("DSG_FAILPOINT", "s3.stage.journaled")]);
    assert!(killed(&o.status), "{}", show(&o));
    assert!(
        env.s3().keys().iter().any(|k| k.starts_with("txs/")),
        "the killed sync left no journal: the test tests nothing"
    );
    env.prepare_clone("A", "C");
    let before = env.repo_full_listing();
    let o = s3_reader(&env, "C", &["clone"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(fs::read(env.client("C").join(p("a.txt"))).unwrap(), b"a");
    assert!(!env.client("C").join(p("new.bin")).exists());
    assert_same(
        "repository after a read-only clone",
        &before,
        &env.repo_full_listing(),
    );
    let o = s3_reader(&env, "C", &["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    env.settle_after_crash();
    env.ok("A", &["sync"]);
    env.s3().assert_no_leftovers("after the writer's next sync");
    env.s3().assert_head_sound("after the writer's next sync");
}

/// Whether a sync has begun sending a file of more than a few bytes:
/// posix, a staged file past 1 KiB (staged flat, by a hash of the path);
/// s3, an unfinished multipart upload (only large files go up in parts).
fn big_upload_started(env: &World) -> bool {
    if env.kind == Kind::S3 {
        std::thread::sleep(Duration::from_millis(20));
        return !env.s3().store.multipart_list("data/").unwrap().is_empty();
    }
    fs::read_dir(env.repo().join(".dsg/staging"))
        .map(|rd| {
            rd.flatten().any(|tx| {
                fs::read_dir(tx.path().join(".dsg-files")).is_ok_and(|rd| {
                    rd.flatten()
                        .any(|f| f.metadata().is_ok_and(|m| m.len() > 1024))
                })
            })
        })
        .unwrap_or(false)
}

/// G3: a file rewritten while it is being uploaded is detected, never
/// recorded with a hash its bytes do not have.
fn file_modified_while_uploading(kind: Kind) {
    const SIZE: u64 = 200 << 20;
    let mut observed = false;
    for attempt in 0..4 {
        let env = world_or_skip!(kind, "modupload");
        env.write("A", &p("small.txt"), "s");
        env.init("A");
        let big = env.client("A").join(p("big.bin"));
        {
            let mut f = fs::File::create(&big).unwrap();
            f.write_all(b"head of a sparse file").unwrap();
            f.set_len(SIZE).unwrap();
        }
        env.write("A", &p("other.txt"), "o");
        let head_before = fs::read(env.repo().join(".dsg/last-sync.json")).unwrap();
        let repo_before = data_tree(&env.repo());

        let mut child = env
            .command("A", &["sync"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the upload of big.bin has started, then rewrite its
        // end, which has not been sent yet.
        let t0 = Instant::now();
        let mut modified = false;
        while t0.elapsed() < Duration::from_secs(20) {
            let started = big_upload_started(&env);
            if started {
                let mut f = fs::OpenOptions::new().write(true).open(&big).unwrap();
                f.seek(SeekFrom::Start(SIZE - 65536)).unwrap();
                f.write_all(&[0xab; 65536]).unwrap();
                modified = true;
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if !modified {
            // Too late: rewrite it now, the invariants below still hold.
            let mut f = fs::OpenOptions::new().write(true).open(&big).unwrap();
            f.seek(SeekFrom::Start(SIZE - 65536)).unwrap();
            f.write_all(&[0xab; 65536]).unwrap();
        }
        let o = child.wait_with_output().unwrap();
        let repo = env.repo();
        let head = read_json(&repo.join(".dsg/last-sync.json"));
        // Whatever happened: the repository equals its manifest.
        assert_tree_matches_manifest(&repo, &head, "repository");
        assert_no_repo_leftovers(&env.repo_parent, &repo);
        assert_no_leftovers(&env.client("A"));
        if o.status.code() == Some(0) {
            eprintln!("attempt {attempt}: the upload finished before the rewrite");
            // The recorded version is the one the repository holds; the
            // local rewrite is a new local change.
            let rows = env.status_rows("A");
            assert!(
                rows.contains(&(p("big.bin"), "sLCR__C_eq_R_ne_L".into(), "upload".into())),
                "{rows:?}"
            );
        } else {
            observed = true;
            assert_eq!(o.status.code(), Some(1), "{}", show(&o));
            assert!(stderr(&o).contains("big.bin"), "{}", show(&o));
            assert_eq!(
                head_before,
                fs::read(repo.join(".dsg/last-sync.json")).unwrap(),
                "a failed sync changed the repository head"
            );
            assert_same("repository", &repo_before, &data_tree(&repo));
        }
        // Syncing again records the file as it is now.
        env.ok("A", &["sync"]);
        let repo = env.repo(); // s3: the view, rebuilt for the new head
        let head = read_json(&repo.join(".dsg/last-sync.json"));
        assert_tree_matches_manifest(&repo, &head, "repository");
        assert_eq!(
            data_tree(&repo)[&p("big.bin")],
            data_tree(&env.client("A"))[&p("big.bin")]
        );
        env.assert_clean("A");
        if observed {
            eprintln!("attempt {attempt}: the rewrite during upload was detected");
            break;
        }
    }
    if !observed {
        eprintln!("WARNING: never caught the upload in progress; invariants held anyway");
    }
}

/// How a test damages the repository's head manifest.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Truncated JSON (s3: bytes that are not LZ4).
    Corrupt,
    /// Valid JSON whose entries no longer match what records it
    /// (`entries_hash`; s3: the hash `HEAD` records).
    Tampered,
    Missing,
    Empty,
}

/// Damages the head manifest behind dsg's back; returns the name the
/// errors must give it (a path; s3: the object's key).
fn damage_head_manifest(env: &World, how: Damage) -> String {
    if env.kind == Kind::S3 {
        let s3 = env.s3();
        let doc = s3.head_doc().expect("HEAD");
        let head = doc.head.expect("a head snapshot");
        let key = world::s3::manifest_key(&head);
        let tampered = || {
            let mut v: serde_json::Value =
                serde_json::from_slice(&s3.manifest_bytes(&head)).unwrap();
            tamper_entries(&mut v);
            let mut lz4 = lz4_flex::frame::FrameEncoder::new(Vec::new());
            lz4.write_all(&serde_json::to_vec(&v).unwrap()).unwrap();
            lz4.finish().unwrap()
        };
        match how {
            Damage::Corrupt => s3.overwrite_manifest(&head.0, b"{\"entries\": {\"task/in"),
            Damage::Tampered => s3.overwrite_manifest(&head.0, &tampered()),
            Damage::Missing => s3.store.delete(&key).unwrap(),
            Damage::Empty => s3.overwrite_manifest(&head.0, b""),
        }
        s3.invalidate_view();
        return key;
    }
    let m = env.repo().join(".dsg/last-sync.json");
    match how {
        Damage::Corrupt => fs::write(&m, b"{\"entries\": {\"task/in").unwrap(),
        Damage::Tampered => {
            let mut v = read_json(&m);
            tamper_entries(&mut v);
            fs::write(&m, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        }
        Damage::Missing => fs::remove_file(&m).unwrap(),
        Damage::Empty => fs::write(&m, b"").unwrap(),
    }
    m.display().to_string()
}

fn tamper_entries(v: &mut serde_json::Value) {
    let e = v["entries"].as_object_mut().unwrap();
    let k = e.keys().next().unwrap().clone();
    e[&k]["hash"] = "0123456789abcdef".into();
}

/// G4: a damaged, tampered or missing repository manifest is an error that
/// names it, never an empty repository; nothing is changed.
fn bad_manifest(kind: Kind, how: Damage) {
    let env = world_or_skip!(kind, "badmanifest");
    env.write("A", &p("a.txt"), "a");
    env.write("A", &p("b.txt"), "b");
    env.init("A");
    env.clone_client("A", "B");
    env.write("A", &p("new.txt"), "n");
    env.remove("A", &p("b.txt"));
    let named = damage_head_manifest(&env, how);
    let expect: &[&str] = match (how, kind) {
        (Damage::Tampered, Kind::S3) => &["do not hash to what HEAD records"],
        (Damage::Tampered, _) => &["integrity"],
        (Damage::Missing, Kind::S3) => &["missing, though HEAD names it"],
        (Damage::Missing, _) => &["does not exist"],
        _ => &[],
    };
    // The repository as listed without reading its manifest (s3: the
    // objects; the view cannot be built from a damaged head).
    let repo_raw = |env: &World| match env.kind {
        Kind::S3 => (env.s3().listing().into_iter())
            .map(|(k, n)| (k, (n, 0, 0)))
            .collect(),
        _ => state_listing(&env.repo()),
    };
    let clients_before = [
        state_listing(&env.client("A")),
        state_listing(&env.client("B")),
    ];
    let repo_before = repo_raw(&env);
    for (who, args) in [
        ("A", &["sync"][..]),
        ("A", &["sync", "--dry-run"]),
        ("A", &["status"]),
        ("B", &["sync"]),
    ] {
        let o = env.run(who, args);
        assert_eq!(o.status.code(), Some(1), "{who} {args:?}: {}", show(&o));
        let err = stderr(&o);
        assert!(
            err.contains(&named),
            "{who} {args:?}: the error names {named}: {err}"
        );
        for e in expect {
            assert!(err.contains(e), "{who} {args:?}: expected {e:?} in {err}");
        }
        for (i, c) in ["A", "B"].iter().enumerate() {
            assert_same(
                &format!("client {c}"),
                &clients_before[i],
                &state_listing(&env.client(c)),
            );
            assert_no_leftovers(&env.client(c));
        }
        assert_same("repository", &repo_before, &repo_raw(&env));
    }
    // A fresh clone refuses too.
    env.prepare_clone("A", "C");
    let o = env.run("C", &["clone"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(!env.client("C").join(".dsg").exists());
}

fn corrupt_repository_manifest(kind: Kind) {
    bad_manifest(kind, Damage::Corrupt);
}

fn tampered_repository_manifest(kind: Kind) {
    bad_manifest(kind, Damage::Tampered);
}

fn missing_repository_manifest(kind: Kind) {
    bad_manifest(kind, Damage::Missing);
}

fn empty_repository_manifest(kind: Kind) {
    bad_manifest(kind, Damage::Empty);
}

// ---------------------------------------------------------------- zfs commands failing

fn zfs_setup(z: &World) {
    z.write("A", &p("keep.txt"), "keep");
    z.write("A", &p("mod.txt"), "m0");
    z.write("A", &p("del.txt"), "d0");
    z.write("A", &p("f2l"), "file then link");
    z.write("A", &format!("{OUT}/deep/x.txt"), "x0");
    z.init("A");
    z.write("A", &p("mod.txt"), "m1");
    z.remove("A", &p("del.txt"));
    z.remove("A", &format!("{OUT}/deep"));
    z.write("A", &p("new/a.txt"), "new");
    z.remove("A", &p("f2l"));
    z.link("A", &p("f2l"), "keep.txt");
}

/// OLD: exactly as captured before. NEW: the repository and the client
/// both hold the local tree `want` under the next snapshot, cache = head.
#[track_caller]
fn classify(z: &World, old: &State, want: &Tree, ctx: &str) -> Outcome {
    let now = z.capture("A");
    let vs_old = now
        .pair
        .mismatch_old(&old.pair)
        .or_else(|| (now.snaps != old.snaps).then(|| format!("snapshots {:?}\n", now.snaps)));
    let Some(vs_old) = vs_old else {
        return Outcome::Old;
    };
    let k = old.snaps.len() as u64;
    let repo = tracked(&now.pair.repo.tree);
    let local = tracked(&now.pair.local.tree);
    let mut vs_new = String::new();
    if &repo != want {
        vs_new += &format!("repository tree:\n{}", diff(want, &repo));
    }
    if &local != want {
        vs_new += &format!("local tree:\n{}", diff(want, &local));
    }
    if now.pair.local.manifest != now.pair.repo.manifest {
        vs_new += "cache is not the repository head\n";
    }
    if now.pair.repo.snapshot() != Some(format!("s{}", k + 1)) {
        vs_new += &format!("head {:?}\n", now.pair.repo.snapshot());
    }
    if now.snaps != chain(k + 1) {
        vs_new += &format!("snapshots {:?}\n", now.snaps);
    }
    if vs_new.is_empty() {
        return Outcome::New;
    }
    panic!("{ctx}: neither OLD nor NEW\n--- vs OLD:\n{vs_old}--- vs NEW:\n{vs_new}");
}

/// Runs `dsg ARGS` in A with zfs failing for `glob`; checks what follows.
/// `pre_commit`: the failure is before the commit point, so the command
/// must fail and leave OLD at once.
fn fault(kind: Kind, name: &str, glob: &str, pre_commit: bool) -> Option<Outcome> {
    let z = World::new(kind, name)?;
    zfs_setup(&z);
    let old = z.capture("A");
    let want = tracked(&old.pair.local.tree);
    let ctx = format!("zfs failing for `{glob}`");
    let path = z.zfs().failing_zfs_path(glob);
    let o = z.run_env("A", &["sync", "-m", "fault"], &[("PATH", &path)]);
    let calls = z.zfs().wrapper_calls(&path);
    let hit = calls.iter().any(|c| {
        let first = glob.split(' ').next().unwrap();
        c.starts_with(first)
    });
    assert!(hit, "{ctx}: no such zfs call was made: {calls:?}");
    assert!(!killed(&o.status), "{ctx}: {}", show(&o));
    if o.status.code() != Some(0) {
        assert!(
            stderr(&o).contains("injected failure"),
            "{ctx}: the error names the failed zfs command: {}",
            show(&o)
        );
    }
    if pre_commit {
        assert_eq!(o.status.code(), Some(1), "{ctx}: {}", show(&o));
        assert_eq!(classify(&z, &old, &want, &ctx), Outcome::Old);
        z.zfs()
            .assert_no_zfs_leftovers(&format!("{ctx}, right after the failure"));
        assert_no_leftovers(&z.client("A"));
    }
    eprintln!(
        "{ctx}: exit {:?}; datasets right after: {:?}",
        o.status.code(),
        z.zfs().datasets()
    );
    // The next command (real zfs) recovers.
    let st = z.run("A", &["status"]);
    assert!(
        z.zfs().datasets().contains(&z.zfs().dataset()),
        "{ctx}: {} missing after recovery: {:?}",
        z.zfs().dataset(),
        z.zfs().datasets()
    );
    assert_eq!(st.status.code(), Some(0), "{ctx}: status: {}", show(&st));
    let outcome = classify(&z, &old, &want, &format!("{ctx}, after recovery"));
    z.zfs().assert_repo_dataset(&ctx);
    z.zfs()
        .assert_no_zfs_leftovers(&format!("{ctx}, after recovery"));
    assert_no_leftovers(&z.client("A"));
    // Syncing again reaches NEW.
    z.ok("A", &["sync", "-m", "fault"]);
    assert_eq!(
        classify(&z, &old, &want, &format!("{ctx}, after a rerun")),
        Outcome::New
    );
    z.zfs()
        .assert_repo_dataset(&format!("{ctx}, after a rerun"));
    z.zfs()
        .assert_no_zfs_leftovers(&format!("{ctx}, after a rerun"));
    z.assert_clean("A");
    eprintln!("{ctx}: after recovery {outcome:?}");
    Some(outcome)
}

fn failing_clone_rolls_back(kind: Kind) {
    fault(kind, "zfclone", "clone *", true);
}

fn failing_snapshot_rolls_back(kind: Kind) {
    fault(kind, "zfsnap", "snapshot *", true);
}

/// Promote is the first step after the `committed` record; the product
/// destroys the (still unpromoted) clone. OLD or NEW, both consistent.
fn failing_promote_is_consistent(kind: Kind) {
    fault(kind, "zfprom", "promote *", false);
}

fn failing_rename_of_the_old_dataset_is_consistent(kind: Kind) {
    fault(kind, "zfrenold", "rename * *--old-*", false);
}

fn failing_rename_of_the_clone_is_consistent(kind: Kind) {
    fault(kind, "zfrennew", "rename *--tx-* *", false);
}

fn failing_unmount_of_the_old_dataset_is_consistent(kind: Kind) {
    fault(kind, "zfunm", "set mountpoint=none *", false);
}

fn failing_destroy_of_the_old_dataset_is_consistent(kind: Kind) {
    fault(kind, "zfdestroy", "destroy *--old-*", false);
}

// ---------------------------------------------------------------- init

fn init_fault(kind: Kind, name: &str, glob: &str) {
    let Some(z) = World::new(kind, name) else {
        return;
    };
    z.write("A", &p("a.csv"), "a");
    z.link("A", &p("l"), "a.csv");
    let data = tracked(&data_tree(&z.client("A")));
    let ctx = format!("init with zfs failing for `{glob}`");
    let path = z.zfs().failing_zfs_path(glob);
    let mut args = z.init_args();
    args.push("--force".into());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = z.run_env("A", &a, &[("PATH", &path)]);
    assert_eq!(o.status.code(), Some(1), "{ctx}: {}", show(&o));
    assert!(
        stderr(&o).contains("injected failure"),
        "{ctx}: names the failure: {}",
        show(&o)
    );
    // Nothing at all, at once and after the next command.
    for when in ["right after", "after status"] {
        if when == "after status" {
            let st = z.run("A", &["status"]);
            assert!(st.status.code().is_some());
        }
        assert_eq!(z.zfs().datasets(), Vec::<String>::new(), "{ctx}, {when}");
        assert_eq!(
            z.zfs().all_snapshots(),
            Vec::<String>::new(),
            "{ctx}, {when}"
        );
        let left = z.zfs().parent_leftovers();
        assert!(left.is_empty(), "{ctx}, {when}: leftovers {left:?}");
        assert!(!z.repo().exists(), "{ctx}, {when}");
        assert!(!z.client("A").join(".dsg").exists(), "{ctx}, {when}");
        assert_same(&ctx, &data, &tracked(&data_tree(&z.client("A"))));
    }
    // Init then works with the real zfs.
    z.ok("A", &a);
    assert_eq!(z.zfs().assert_repo_dataset(&ctx), 1);
    z.zfs().assert_no_zfs_leftovers(&ctx);
    assert_eq!(
        std::fs::read(z.client("A").join(".dsg/last-sync.json")).unwrap(),
        std::fs::read(z.repo().join(".dsg/last-sync.json")).unwrap()
    );
    z.assert_clean("A");
}

fn init_with_a_failing_create_leaves_nothing(kind: Kind) {
    init_fault(kind, "zficreate", "create *");
}

fn init_with_a_failing_snapshot_leaves_nothing(kind: Kind) {
    init_fault(kind, "zfisnap", "snapshot *");
}

fn init_with_a_failing_rename_leaves_nothing(kind: Kind) {
    init_fault(kind, "zfiren", "rename *");
}

/// A tmpfs with few inodes: its filesystem fills up by inodes, which is
/// what a new folder needs even when bytes are plentiful.
fn inode_tmpfs(inodes: u32) -> Option<Tmpfs> {
    let t = Tmpfs::mount("64m")?;
    let ok = Command::new("mount")
        .args(["-o", &format!("remount,nr_inodes={inodes}"), "tmpfs"])
        .arg(&t.dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "remount {} with nr_inodes", t.dir.display());
    Some(t)
}

/// The repository's filesystem has room for the upload but not for the
/// new object folder the superseded version moves into. For every number
/// of free inodes from none up, the sync is all or nothing: it either
/// fails saying nothing was changed (both sides exactly as before, every
/// command still works) or succeeds — never "committed but applying
/// failed" with the repository out of step with its head.
fn repository_full_for_new_object_folder(kind: Kind) {
    let Some(fs) = inode_tmpfs(400) else {
        return;
    };
    let Some(env) = World::on(kind, &fs.dir) else {
        return;
    };
    env.write("A", &p("a.txt"), "a0");
    env.init("A");
    env.clone_client("A", "B");
    let filler = fs.dir.join("filler");
    fs::create_dir(&filler).unwrap();
    let mut n = 0;
    while fs::write(filler.join(n.to_string()), b"").is_ok() {
        n += 1;
    }
    let mut committed = false;
    for attempt in 0..40 {
        env.write("A", &p("a.txt"), format!("a{}", attempt + 1));
        let before = listings(&env, &["A"]);
        let o = env.run("A", &["sync"]);
        let err = stderr(&o);
        assert!(
            !err.contains("committed but"),
            "free inodes {attempt}: the sync failed after its commit point: {err}"
        );
        if o.status.code() == Some(0) {
            committed = true;
            break;
        }
        assert_eq!(o.status.code(), Some(1), "{}", show(&o));
        assert!(
            err.contains("space") || err.contains("No space"),
            "free inodes {attempt}: {err}"
        );
        assert_unchanged(&env, &["A"], &before);
        for who in ["A", "B"] {
            let o = env.run(who, &["status"]);
            assert_eq!(o.status.code(), Some(0), "{who}: {}", show(&o));
        }
        n -= 1;
        fs::remove_file(filler.join(n.to_string())).unwrap();
    }
    assert!(committed, "the sync never went through");
    env.ok("B", &["sync"]);
    assert_same(
        "repository vs B",
        &tracked(&data_tree(&env.client("B"))),
        &tracked(&data_tree(&env.repo())),
    );
    env.assert_clean("A");
    drop(env);
}

/// The repository's object store is not writable: superseding a file
/// needs a new folder in it. The sync fails before its commit point.
fn repository_objects_not_writable(kind: Kind) {
    let env = world_or_skip!(kind, "objperm");
    env.write("A", &p("a.txt"), "a0");
    env.init("A");
    env.clone_client("A", "B");
    let Some(pre) = unprivileged_world(&env) else {
        return;
    };
    let objects = env.repo().join(".dsg/objects");
    fs::create_dir_all(&objects).unwrap();
    chown_nobody(&[&objects]);
    chmod(&objects, 0o555);
    env.write("A", &p("a.txt"), "a1");
    chown_nobody(&[&env.client("A")]);
    let before = listings(&env, &["A", "B"]);
    let o = run_as(&env, &pre, "A", &["sync"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        err.contains("objects") && err.contains("nothing was changed"),
        "{}",
        show(&o)
    );
    assert_unchanged(&env, &["A", "B"], &before);
    for who in ["A", "B"] {
        let o = run_as(&env, &pre, who, &["status"]);
        assert_eq!(o.status.code(), Some(0), "{who}: {}", show(&o));
    }
    chmod(&objects, 0o755);
    let o = run_as(&env, &pre, "A", &["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(fs::read(env.repo().join(p("a.txt"))).unwrap(), b"a1");
}

/// A local folder a download goes into is not writable: found before the
/// client's commit point, so the sync changes nothing and every later
/// command still works.
fn client_target_folder_not_writable(kind: Kind) {
    let env = world_or_skip!(kind, "clientperm");
    env.write("A", &p("a.txt"), "a0");
    env.write("A", "task/output/sub/s.txt", "s");
    env.init("A");
    env.clone_client("A", "B");
    let Some(pre) = unprivileged_world(&env) else {
        return;
    };
    env.write("A", "task/output/sub/new.txt", "from A");
    env.write("A", &p("a.txt"), "a1");
    env.ok("A", &["sync"]);
    chown_nobody(&[&env.client("B")]);
    let sub = env.client("B").join("task/output/sub");
    chmod(&sub, 0o555);
    let before = listings(&env, &["B"]);
    let o = run_as(&env, &pre, "B", &["sync"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        err.contains("output/sub") && err.contains("nothing was changed"),
        "{}",
        show(&o)
    );
    assert_unchanged(&env, &["B"], &before);
    let o = run_as(&env, &pre, "B", &["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    chmod(&sub, 0o755);
    let o = run_as(&env, &pre, "B", &["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(
        fs::read(env.client("B").join("task/output/sub/new.txt")).unwrap(),
        b"from A"
    );
    assert_eq!(fs::read(env.client("B").join(p("a.txt"))).unwrap(), b"a1");
}

// ---------------------------------------------------------------- kinds

per_kind!(
    repository_disk_full: xfs;
    repository_full_for_new_object_folder: xfs;
    repository_objects_not_writable: xfs;
    client_target_folder_not_writable: xfs, zfs, s3;
    client_disk_full: xfs, s3;
    permission_denied_on_repository_metadata: xfs;
    permission_denied_in_repository_data_dir: xfs;
    read_only_user_can_clone: xfs;
    s3_read_only_identity_can_clone: s3;
    s3_read_only_identity_reads_past_an_abandoned_upload: s3;
    read_only_user_reads_past_an_abandoned_upload: xfs;
    read_only_user_waits_out_a_commit_in_progress: xfs;
    file_modified_while_uploading: xfs, s3;
    corrupt_repository_manifest: xfs, zfs, ssh, s3;
    tampered_repository_manifest: xfs, zfs, ssh, s3;
    missing_repository_manifest: xfs, zfs, ssh, s3;
    empty_repository_manifest: xfs, zfs, ssh, s3;
    failing_clone_rolls_back: zfs;
    failing_snapshot_rolls_back: zfs;
    failing_promote_is_consistent: zfs;
    failing_rename_of_the_old_dataset_is_consistent: zfs;
    failing_rename_of_the_clone_is_consistent: zfs;
    failing_unmount_of_the_old_dataset_is_consistent: zfs;
    failing_destroy_of_the_old_dataset_is_consistent: zfs;
    init_with_a_failing_create_leaves_nothing: zfs;
    init_with_a_failing_snapshot_leaves_nothing: zfs;
    init_with_a_failing_rename_leaves_nothing: zfs;
);
