//! Faults during sync: a full disk on either side, permission errors in the
//! repository, a file modified while it is uploaded (G3), and a corrupt,
//! tampered or missing repository manifest (G4). Each must fail cleanly:
//! a clear error, nothing changed anywhere, no leftovers.

mod support;
mod sync_support;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sync_support::*;

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
    env: &Env,
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
    env: &Env,
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
#[test]
fn repository_disk_full() {
    let Some(fs8) = Tmpfs::mount("8m") else {
        return;
    };
    let env = Env::on(&fs8.dir);
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
#[test]
fn client_disk_full() {
    let Some(fs8) = Tmpfs::mount("8m") else {
        return;
    };
    let env = Env::new("clientfull");
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
fn unprivileged_world(env: &Env) -> Option<Vec<String>> {
    let pre = unprivileged()?;
    chmod(env.tmp.path(), 0o755);
    chown_nobody(&[env.tmp.path(), &env.repo_parent]);
    Some(pre)
}

/// The prefix that runs dsg as another, unprivileged user who may only
/// read the repository (switching users needs root). Skips outside CI
/// when that is impossible; fails under CI.
fn other_reader(env: &Env) -> Option<Vec<String>> {
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

fn run_as(env: &Env, pre: &[String], who: &str, args: &[&str]) -> std::process::Output {
    env.command_as(pre, who, args).output().unwrap()
}

/// The repository's `.dsg/` is not writable: the sync fails before its
/// commit point, cleanly.
#[test]
fn permission_denied_on_repository_metadata() {
    let env = Env::new("perm1");
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
#[test]
fn permission_denied_in_repository_data_dir() {
    let env = Env::new("perm2");
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
#[test]
fn read_only_user_can_clone() {
    let env = Env::new("roclone");
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
#[test]
fn read_only_user_reads_past_an_abandoned_upload() {
    let env = Env::new("roabandon");
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
#[test]
fn read_only_user_waits_out_a_commit_in_progress() {
    let env = Env::new("rowait");
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

/// G3: a file rewritten while it is being uploaded is detected, never
/// recorded with a hash its bytes do not have.
#[test]
fn file_modified_while_uploading() {
    const SIZE: u64 = 200 << 20;
    let mut observed = false;
    for attempt in 0..4 {
        let env = Env::new("modupload");
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
        // Wait until the upload of big.bin has started in the repository's
        // staging area, then rewrite its end, which has not been sent yet.
        let staging = env.repo().join(".dsg/staging");
        let t0 = Instant::now();
        let mut modified = false;
        while t0.elapsed() < Duration::from_secs(20) {
            let started = fs::read_dir(&staging)
                .map(|rd| {
                    rd.flatten()
                        .any(|tx| tx.path().join(IN).join("big.bin").exists())
                })
                .unwrap_or(false);
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

/// G4: a damaged, tampered or missing repository manifest is an error that
/// names it, never an empty repository; nothing is changed.
fn bad_manifest(damage: fn(&Path), expect: &[&str]) {
    let env = Env::new("badmanifest");
    env.write("A", &p("a.txt"), "a");
    env.write("A", &p("b.txt"), "b");
    env.init("A");
    env.clone_client("A", "B");
    env.write("A", &p("new.txt"), "n");
    env.remove("A", &p("b.txt"));
    damage(&env.repo().join(".dsg/last-sync.json"));
    let before = listings(&env, &["A", "B"]);
    for (who, args) in [
        ("A", &["sync"][..]),
        ("A", &["sync", "--dry-run"]),
        ("A", &["status"]),
        ("B", &["sync"]),
    ] {
        let o = env.run(who, args);
        assert_eq!(o.status.code(), Some(1), "{who} {args:?}: {}", show(&o));
        let err = stderr(&o);
        let named = env.repo().join(".dsg/last-sync.json");
        assert!(
            err.contains(&named.display().to_string()),
            "{who} {args:?}: the error names {}: {err}",
            named.display()
        );
        for e in expect {
            assert!(err.contains(e), "{who} {args:?}: expected {e:?} in {err}");
        }
        assert_unchanged(&env, &["A", "B"], &before);
    }
    // A fresh clone refuses too.
    env.prepare_clone("A", "C");
    let o = env.run("C", &["clone"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(!env.client("C").join(".dsg").exists());
}

#[test]
fn corrupt_repository_manifest() {
    bad_manifest(|m| fs::write(m, b"{\"entries\": {\"task/in").unwrap(), &[]);
}

#[test]
fn tampered_repository_manifest() {
    // Valid JSON whose entries no longer match its entries_hash.
    bad_manifest(
        |m| {
            let mut v = read_json(m);
            let e = v["entries"].as_object_mut().unwrap();
            let k = e.keys().next().unwrap().clone();
            e[&k]["hash"] = "0123456789abcdef".into();
            fs::write(m, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        },
        &["integrity"],
    );
}

#[test]
fn missing_repository_manifest() {
    bad_manifest(|m| fs::remove_file(m).unwrap(), &["does not exist"]);
}

#[test]
fn empty_repository_manifest() {
    bad_manifest(|m| fs::write(m, b"").unwrap(), &[]);
}
