//! The zfs backend through the real `dsg` binary on a real (zfs-fuse)
//! pool: init makes the dataset `POOL/N` mounted at `P/N` with `@s1`; each
//! sync adds exactly one snapshot named by its logical id; the repository
//! equals its manifest; every snapshot holds its state (read through
//! `dsg_repo::zfs::Zfs::open_snapshot`, the history path no command uses
//! yet). Skipped without `DSG_TEST_ZFS_POOL` (fails under CI=true).
//!
//! These tests look at the pool (`zfs list`, mounts, snapshot clones): they
//! run on zfs worlds only (`World::new(Kind::Zfs, ..)`, `w.zfs()` for the
//! ZFS side).

mod world;

use std::collections::BTreeMap;
use std::fs;

use world::*;

/// A small project: nested dirs, an empty file, a binary file, symlinks
/// (relative, into a subdirectory, dangling-free), an untracked file.
fn project(z: &World, c: &str) {
    z.write(c, &p(IN, "a.csv"), "a,b\n1,2\n");
    z.write(c, &p(IN, "empty.txt"), "");
    z.write(c, &p(IN, "sub/deeper/b.bin"), bytes(7, 100_000));
    z.write(c, &p(OUT, "result.txt"), "result\n");
    z.write(c, "task/src/code.R", "not tracked");
    z.link(c, &p(IN, "link_a"), "a.csv");
    z.link(c, &p(OUT, "link_up"), "../input/sub/deeper/b.bin");
}

#[test]
fn init_creates_the_dataset_with_s1() {
    let Some(w) = World::new(Kind::Zfs, "zinit") else {
        return;
    };
    let z = w.zfs();
    project(&w, "A");
    let before = tracked(&data_tree(&z.client("A")));
    let o = w.init("A");
    assert!(stdout(&o).contains("s1"), "{}", show(&o));
    let ds = z.dataset();
    assert_eq!(
        z.datasets(),
        vec![ds.clone()],
        "only the repository dataset"
    );
    assert_eq!(z.assert_repo_dataset("after init"), 1);
    let listed = zfs_ok(&["list", "-H", "-o", "name", "-t", "snapshot", "-r", &ds]);
    assert_eq!(listed.lines().collect::<Vec<_>>(), vec![format!("{ds}@s1")]);
    // The mounted dataset is the repository directory.
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == z.repo().to_str()),
        "{} is not a mount point",
        z.repo().display()
    );
    // Files byte-identical, symlinks as symlinks, nothing untracked.
    let repo = tracked(&data_tree(&z.repo()));
    assert_same("repository vs project", &before, &repo);
    assert!(fs::symlink_metadata(z.repo().join(p(IN, "link_a")))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!z.repo().join("task/src/code.R").exists());
    // The cache is the repository head; both sides clean.
    assert_eq!(
        fs::read(z.client("A").join(".dsg/last-sync.json")).unwrap(),
        fs::read(z.repo().join(".dsg/last-sync.json")).unwrap()
    );
    w.assert_clean("A");
    z.assert_no_zfs_leftovers("after init");
    assert_no_leftovers(&z.client("A"));
    // @s1 holds the same files.
    let (t, head) = z.snapshot_tree("s1");
    assert_same("@s1 vs project", &before, &t);
    assert_eq!(snapshot_id(&head), "s1");
    // A second init of the same name is refused and changes nothing.
    w.prepare_clone("A", "B");
    fs::remove_file(z.client("B").join(".dsgconfig.yml")).unwrap();
    z.write("B", &p(IN, "other.txt"), "other");
    let args = w.init_args();
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = w.run("B", &a);
    assert_ne!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(z.assert_repo_dataset("after a refused init"), 1);
    assert_same(
        "repository after a refused init",
        &before,
        &tracked(&data_tree(&z.repo())),
    );
    z.assert_no_zfs_leftovers("after a refused init");
}

/// One step of the sync run: what client A changes.
fn change(z: &World, step: usize) {
    match step {
        // edit, add (new dir), delete
        0 => {
            z.write("A", &p(IN, "a.csv"), "a,b\n1,2\n3,4\n");
            z.write("A", &p(IN, "new/n1.txt"), "n1");
            z.remove("A", &p(IN, "empty.txt"));
        }
        // file -> symlink, symlink -> file, retarget a symlink
        1 => {
            z.remove("A", &p(OUT, "result.txt"));
            z.link("A", &p(OUT, "result.txt"), "../input/a.csv");
            z.remove("A", &p(IN, "link_a"));
            z.write("A", &p(IN, "link_a"), "now a file");
            z.link("A", &p(OUT, "link_up"), "../input/new/n1.txt");
        }
        // delete a whole directory, a same-size edit of a large file
        2 => {
            z.remove("A", &p(IN, "new"));
            let mut b = bytes(7, 100_000);
            b[50_000] ^= 0xff;
            z.write("A", &p(IN, "sub/deeper/b.bin"), b);
            z.link("A", &p(OUT, "link_up"), "../input/a.csv");
        }
        // a new frozen dir; a file where a directory (of one file) was
        3 => {
            z.write("A", "task/frozen/f.txt", "frozen");
            z.remove("A", &p(IN, "sub/deeper"));
            z.write("A", &p(IN, "sub/deeper"), "a file now");
        }
        // many small files in one go
        _ => {
            for i in 0..40 {
                z.write("A", &p(OUT, &format!("many/f{i:02}.txt")), format!("{i}"));
            }
        }
    }
}

#[test]
fn several_syncs_make_one_snapshot_each() {
    let Some(w) = World::new(Kind::Zfs, "zsyncs") else {
        return;
    };
    let z = w.zfs();
    project(&w, "A");
    w.init("A");
    let mut expect: BTreeMap<String, Tree> = BTreeMap::new();
    expect.insert("s1".into(), tracked(&data_tree(&z.client("A"))));
    let steps = 5;
    for step in 0..steps {
        change(&w, step);
        let want = tracked(&data_tree(&z.client("A")));
        let o = w.ok("A", &["sync", "-m", &format!("step {step}")]);
        let id = format!("s{}", step + 2);
        assert!(stdout(&o).contains(&id), "{}", show(&o));
        let ctx = format!("after sync {id}");
        assert_eq!(z.assert_repo_dataset(&ctx), step as u64 + 2);
        assert_same(&ctx, &want, &tracked(&data_tree(&z.repo())));
        assert_eq!(assert_chain(&z.repo()), step as u64 + 2, "{ctx}: messages");
        assert_eq!(
            fs::read(z.client("A").join(".dsg/last-sync.json")).unwrap(),
            fs::read(z.repo().join(".dsg/last-sync.json")).unwrap(),
            "{ctx}: cache vs head"
        );
        z.assert_no_zfs_leftovers(&ctx);
        assert_no_leftovers(&z.client("A"));
        w.assert_clean("A");
        expect.insert(id, want);
    }
    // A sync with nothing to do makes no snapshot.
    let o = w.ok("A", &["sync"]);
    assert!(stdout(&o).contains("Everything up to date"), "{}", show(&o));
    let n = steps as u64 + 1;
    assert_eq!(z.snapshots(), chain(n));
    let ds = z.dataset();
    let listed = zfs_ok(&["list", "-H", "-o", "name", "-t", "snapshot", "-r", &ds]);
    let mut listed: Vec<String> = listed.lines().map(String::from).collect();
    listed.sort_by_key(|s| snap_num(s.rsplit('@').next().unwrap()));
    assert_eq!(
        listed,
        chain(n)
            .iter()
            .map(|s| format!("{ds}@{s}"))
            .collect::<Vec<_>>()
    );
    // Every snapshot still holds exactly its state (G5 on ZFS), and its
    // archived manifests are the earlier heads.
    for (id, want) in &expect {
        let (t, head) = z.snapshot_tree(id);
        assert_same(&format!("@{id}"), want, &t);
        assert_eq!(&snapshot_id(&head), id, "@{id}: its last-sync.json");
        assert_tree_matches_manifest(
            &z.repo(),
            &read_json(&z.repo().join(".dsg/last-sync.json")),
            "head",
        );
    }
    let archives: Vec<String> = fs::read_dir(z.repo().join(".dsg/archive"))
        .unwrap()
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .collect();
    for i in 1..n {
        assert!(
            archives.iter().any(|a| a.starts_with(&format!("s{i}-"))),
            "archive of s{i} missing: {archives:?}"
        );
    }
    z.assert_no_zfs_leftovers("after reading every snapshot");
}

#[test]
fn snapshot_views_are_read_only_and_leave_nothing() {
    let Some(w) = World::new(Kind::Zfs, "zview") else {
        return;
    };
    let z = w.zfs();
    project(&w, "A");
    w.init("A");
    z.write("A", &p(IN, "a.csv"), "changed");
    w.ok("A", &["sync"]);
    let zf = dsg_repo::zfs::Zfs::new(&z.pool, &z.repo()).unwrap();
    {
        let v1 = zf.open_snapshot("s1").expect("open s1");
        let v2 = zf.open_snapshot("s2").expect("open s2");
        assert_ne!(v1.path, v2.path, "two views at once");
        assert_eq!(
            fs::read(v1.path.join(p(IN, "a.csv"))).unwrap(),
            b"a,b\n1,2\n"
        );
        assert_eq!(fs::read(v2.path.join(p(IN, "a.csv"))).unwrap(), b"changed");
        assert!(
            fs::write(v1.path.join(p(IN, "a.csv")), "x").is_err(),
            "a snapshot view must be read-only"
        );
        assert!(fs::write(v1.path.join("new.txt"), "x").is_err());
    }
    z.assert_no_zfs_leftovers("after dropping the views");
    assert!(zf.open_snapshot("s9").is_err(), "a missing snapshot");
    z.assert_no_zfs_leftovers("after a failed open");
    // The views changed nothing.
    assert_eq!(z.assert_repo_dataset("after views"), 2);
    w.assert_clean("A");
}

/// A history read whose process was killed leaves its temporary clone;
/// the next command destroys it, but not the clone of a reader that is
/// still alive.
#[test]
fn the_next_command_removes_read_clones_of_killed_readers() {
    let Some(w) = World::new(Kind::Zfs, "zreadkill") else {
        return;
    };
    let z = w.zfs();
    project(&w, "A");
    w.init("A");
    z.write("A", &p(IN, "a.csv"), "changed");
    w.ok("A", &["sync"]);
    // A dead pid: a child that has exited and been reaped.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let mk = |pid: u32, tag: &str| {
        let id = format!("read-p{pid}-{tag}");
        let ds = format!("{}--{id}", z.dataset());
        let mp = z.repo_parent.join(format!(".dsg-tx.{}.{id}", z.repo_name));
        zfs_ok(&[
            "clone",
            "-o",
            "readonly=on",
            "-o",
            &format!("mountpoint={}", mp.display()),
            &format!("{}@s1", z.dataset()),
            &ds,
        ]);
        ds
    };
    let killed_reader = mk(dead, "deadbeef");
    let live_reader = mk(std::process::id(), "cafef00d");
    assert!(z.datasets().contains(&killed_reader));
    w.ok("A", &["status"]);
    let left = z.datasets();
    assert!(
        !left.contains(&killed_reader),
        "the clone of a killed reader survived the next command: {left:?}"
    );
    assert!(
        left.contains(&live_reader),
        "the clone of a live reader was destroyed: {left:?}"
    );
    // zfs-fuse releases a fresh mount asynchronously: retry "busy".
    let o = zfs_retry(&["destroy", &live_reader]);
    assert!(o.status.success(), "destroy {live_reader}: {}", stderr(&o));
    let _ = fs::remove_dir(z.repo_parent.join(format!(
        ".dsg-tx.{}.read-p{}-cafef00d",
        z.repo_name,
        std::process::id()
    )));
    z.assert_no_zfs_leftovers("after removing the live reader's clone");
    assert_eq!(z.assert_repo_dataset("after read clones"), 2);
}

#[test]
fn repository_stays_mounted_after_every_sync() {
    let Some(w) = World::new(Kind::Zfs, "zmount") else {
        return;
    };
    let z = w.zfs();
    project(&w, "A");
    w.init("A");
    let ds = z.dataset();
    let mut unmounted = Vec::new();
    for i in 0..6 {
        z.write("A", &p(IN, &format!("m{i}.txt")), format!("{i}"));
        // Through Env: the product alone, checked after each sync.
        let o = w.env().run("A", &["sync"]);
        assert_eq!(o.status.code(), Some(0), "sync {i}: {}", show(&o));
        if z.prop(&ds, "mounted") != "yes" {
            unmounted.push(format!("s{}", i + 2));
            zfs_retry(&["mount", &ds]);
        }
    }
    assert!(
        unmounted.is_empty(),
        "{ds} was left unmounted after the syncs that made {unmounted:?}"
    );
}

#[test]
fn init_with_repo_path_inside_the_pools_mount() {
    // Repository path = a directory on the pool's root filesystem, as on a
    // server whose pool is mounted at the repository path.
    let Some(w) = World::zfs_in_pool_mount("znest") else {
        return;
    };
    let z = w.zfs();
    project(&w, "A");
    let args = w.init_args();
    let repo = z.repo();
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = w.env().run("A", &a);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(repo.join(".dsg/last-sync.json").is_file());
    assert_eq!(z.snapshots(), chain(1));
    for i in 0..3 {
        z.write("A", &p(IN, &format!("n{i}.txt")), "n");
        let o = w.env().run("A", &["sync"]);
        assert_eq!(o.status.code(), Some(0), "sync {i}: {}", show(&o));
        assert_eq!(z.snapshots(), chain(i + 2));
        assert!(repo.join(".dsg/last-sync.json").is_file(), "sync {i}");
    }
}

#[test]
fn file_replaced_by_a_directory() {
    let Some(w) = World::new(Kind::Zfs, "zf2d") else {
        return;
    };
    let z = w.zfs();
    project(&w, "A");
    w.init("A");
    z.remove("A", &p(IN, "a.csv"));
    z.write("A", &p(IN, "a.csv/inside.txt"), "a directory now");
    let want = tracked(&data_tree(&z.client("A")));
    let o = w.run("A", &["sync"]);
    z.assert_no_zfs_leftovers("after the sync");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(z.assert_repo_dataset("after the sync"), 2);
    assert_same("repository", &want, &tracked(&data_tree(&z.repo())));
}
