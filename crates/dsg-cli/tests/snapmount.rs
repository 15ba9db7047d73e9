//! `dsg snapmount` on every kind of repository (xfs and ssh: a read-only
//! FUSE filesystem reading through the repository connection; zfs on this
//! machine: a read-only clone of `@sN`): an old snapshot's files read
//! through the mount byte for byte as the test wrote them then, its
//! listing equal to the snapshot's manifest, writes refused (EROFS),
//! `--unmount` from another process leaving the folder empty and no
//! clone, a `kill -9`ed snapmount cleaned by the next command, and a
//! snapshot that does not exist refused clearly.
//!
//! Under CI=true a machine without /dev/fuse or fusermount fails these
//! tests rather than skipping them.

mod world;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use world::*;

/// What each snapshot holds: path -> bytes (files) or `->target` (links).
type Tree = BTreeMap<String, Vec<u8>>;

fn link_entry(target: &str) -> Vec<u8> {
    format!("->{target}").into_bytes()
}

/// s1: a, sub/b, big, link -> a.txt; s2: a changed, sub/b deleted, c
/// added; s3: a changed again. Returns the trees as written.
fn history(w: &World) -> Vec<Tree> {
    let mut t = Tree::new();
    let put = |t: &mut Tree, rel: String, b: Vec<u8>| {
        w.write("A", &rel, &b);
        t.insert(rel, b);
    };
    put(&mut t, p(IN, "a.txt"), b"a1".to_vec());
    put(&mut t, p(IN, "sub/b.txt"), b"b1, deleted in s2".to_vec());
    put(&mut t, p(OUT, "big.bin"), bytes(11, 700_000));
    std::os::unix::fs::symlink("a.txt", w.client("A").join(IN).join("link")).unwrap();
    t.insert(p(IN, "link"), link_entry("a.txt"));
    w.init("A");
    let s1 = t.clone();
    put(&mut t, p(IN, "a.txt"), b"a2, overwritten in s2".to_vec());
    w.remove("A", &p(IN, "sub/b.txt"));
    t.remove(&p(IN, "sub/b.txt"));
    put(&mut t, p(IN, "c.txt"), b"c2".to_vec());
    w.ok("A", &["sync", "-m", "two"]);
    let s2 = t.clone();
    put(&mut t, p(IN, "a.txt"), b"a3, the third".to_vec());
    w.ok("A", &["sync", "-m", "three"]);
    assert_eq!(snapshot_id(&w.head()), "s3");
    vec![s1, s2, t]
}

/// FUSE must be usable for the xfs and ssh kinds: skipped without it,
/// except under CI.
fn fuse_or_skip(kind: Kind) -> bool {
    if kind == Kind::Zfs {
        return true;
    }
    let dev = Path::new("/dev/fuse").exists();
    let fm = ["fusermount3", "fusermount"].iter().any(|n| {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|d| d.join(n).is_file())
    });
    if dev && fm {
        return true;
    }
    let ci = matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"));
    assert!(
        !ci,
        "CI: snapmount needs /dev/fuse ({dev}) and fusermount3/fusermount ({fm}); run scripts/setup-services"
    );
    eprintln!("skipped: no /dev/fuse or fusermount");
    false
}

fn mounted(dir: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = dir.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Starts `dsg snapmount ARGS --mountpoint DIR` in client A and waits for
/// the mount to appear.
fn start(w: &World, args: &[&str], dir: &Path) -> Child {
    let mut a = vec!["snapmount"];
    a.extend_from_slice(args);
    let d = dir.to_string_lossy().to_string();
    a.extend_from_slice(&["--mountpoint", &d]);
    let mut child = w.spawn("A", &a, &[]);
    let t0 = Instant::now();
    while !mounted(dir) {
        if let Some(s) = child.try_wait().unwrap() {
            let (o, _) = wait_within(child, Duration::from_secs(5));
            panic!("snapmount exited ({s}) before mounting:\n{}", show(&o));
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{} not mounted after 60 s",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// The tree under `dir`: files' bytes, links' targets (directories are
/// implied by their contents). A ZFS clone is the repository's dataset
/// as of the snapshot, so it also holds the repository's `.dsg/` of that
/// time: checked to name the snapshot, then left out.
fn read_tree(dir: &Path) -> Tree {
    let mut t = read_all(dir);
    let meta: Vec<String> = t
        .keys()
        .filter(|k| k.starts_with(".dsg/"))
        .cloned()
        .collect();
    if !meta.is_empty() {
        let m: serde_json::Value = serde_json::from_slice(&t[".dsg/last-sync.json"]).unwrap();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with('s') {
            assert_eq!(snapshot_id(&m), name, "the clone's own manifest");
        }
        for k in meta {
            t.remove(&k);
        }
    }
    t
}

fn read_all(dir: &Path) -> Tree {
    fn walk(root: &Path, d: &Path, t: &mut Tree) {
        for e in fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let ft = e.file_type().unwrap();
            if ft.is_symlink() {
                let target = fs::read_link(&path).unwrap();
                t.insert(rel, link_entry(&target.to_string_lossy()));
            } else if ft.is_dir() {
                walk(root, &path, t);
            } else {
                t.insert(rel, fs::read(&path).unwrap());
            }
        }
    }
    let mut t = Tree::new();
    walk(dir, dir, &mut t);
    t
}

/// The snapshot's manifest paths (`snapfetch` of nothing: read the
/// archive the client keeps, or the head).
fn manifest_paths(w: &World, snap: &str) -> Vec<String> {
    let o = w.ok("A", &["log", "--json", "-n", "0"]);
    let v = json_of(&o);
    assert!(
        v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["snapshot_id"] == snap),
        "{snap} not in the log"
    );
    let dsg = w.client("A").join(".dsg");
    let archive = dsg.join("archive").join(format!("{snap}-sync.json.lz4"));
    let json: serde_json::Value = if archive.is_file() {
        let raw = fs::read(&archive).unwrap();
        let mut d = lz4_flex::frame::FrameDecoder::new(&raw[..]);
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut s).unwrap();
        serde_json::from_slice(&s).unwrap()
    } else {
        serde_json::from_slice(&fs::read(dsg.join("last-sync.json")).unwrap()).unwrap()
    };
    let mut paths: Vec<String> = json["entries"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    paths.sort();
    paths
}

fn mount_clones(w: &World) -> Vec<String> {
    if w.kind != Kind::Zfs {
        return Vec::new();
    }
    w.zfs()
        .datasets()
        .into_iter()
        .filter(|d| d.contains("--mount-"))
        .collect()
}

fn records(w: &World) -> Vec<PathBuf> {
    match fs::read_dir(w.client("A").join(".dsg/mounts")) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn snapmount_shows_an_old_snapshot(kind: Kind) {
    if !fuse_or_skip(kind) {
        return;
    }
    let w = world_or_skip!(kind, "smount");
    let trees = history(&w);
    let mp_parent = tempfile::tempdir().unwrap();
    let dir = mp_parent.path().join("s1");
    // -n 3 counts from the head (s3): s1.
    let child = start(&w, &["-n", "3"], &dir);
    if kind == Kind::Zfs {
        assert_eq!(mount_clones(&w).len(), 1, "one clone while mounted");
    }
    assert_eq!(records(&w).len(), 1, "the mount is recorded in .dsg/mounts");
    // Every file's bytes and every link, as written at s1.
    let got = read_tree(&dir);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        trees[0].keys().collect::<Vec<_>>(),
        "listing"
    );
    for (path, want) in &trees[0] {
        assert!(got[path] == *want, "{path}: bytes differ from s1's");
    }
    // The listing is the snapshot's manifest.
    let mut listed: Vec<String> = got.keys().cloned().collect();
    listed.sort();
    assert_eq!(listed, manifest_paths(&w, "s1"));
    // Read again (from the verified copies) and through the link.
    assert_eq!(fs::read(dir.join(IN).join("link")).unwrap(), b"a1");
    assert!(fs::symlink_metadata(dir.join(IN).join("link"))
        .unwrap()
        .file_type()
        .is_symlink());
    // Read-only: every kind of write fails with EROFS.
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc_erofs()), "{what}: {e}");
    };
    erofs(
        fs::write(dir.join(IN).join("a.txt"), b"x").map(|_| ()),
        "overwrite",
    );
    erofs(
        fs::write(dir.join(IN).join("new.txt"), b"x").map(|_| ()),
        "create",
    );
    erofs(fs::remove_file(dir.join(IN).join("a.txt")), "unlink");
    erofs(fs::create_dir(dir.join("newdir")), "mkdir");
    assert_eq!(fs::read(dir.join(IN).join("a.txt")).unwrap(), b"a1");
    // The project's own status is untouched by the mount.
    w.assert_clean("A");
    // Unmounted from another process: the folder is left empty, no
    // clone, no record, and the snapmount process ends with 0.
    w.ok("A", &["snapmount", "--unmount", &dir.to_string_lossy()]);
    assert!(!mounted(&dir));
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "DIR left empty");
    let (o, timed_out) = wait_within(child, Duration::from_secs(60));
    assert!(!timed_out, "snapmount did not end:\n{}", show(&o));
    assert_ok(&o, "snapmount after --unmount");
    assert!(mount_clones(&w).is_empty(), "{:?}", mount_clones(&w));
    assert!(records(&w).is_empty(), "{:?}", records(&w));

    // --snapshot names one directly: s2 has c and no sub/b.
    let dir2 = mp_parent.path().join("s2");
    let child = start(&w, &["--snapshot", "s2"], &dir2);
    assert_eq!(read_tree(&dir2), trees[1]);
    w.ok("A", &["snapmount", "--unmount", &dir2.to_string_lossy()]);
    let (o, _) = wait_within(child, Duration::from_secs(60));
    assert_ok(&o, "snapmount s2 after --unmount");
    assert!(!mounted(&dir2));
    assert!(mount_clones(&w).is_empty());
}

fn libc_erofs() -> i32 {
    30 // EROFS on Linux
}

fn killed_snapmount_is_cleaned_by_the_next_command(kind: Kind) {
    if !fuse_or_skip(kind) {
        return;
    }
    let w = world_or_skip!(kind, "smkill");
    let trees = history(&w);
    let mp_parent = tempfile::tempdir().unwrap();
    let dir = mp_parent.path().join("mnt");
    let mut child = start(&w, &["--snapshot", "s2"], &dir);
    // Open a file first, so a verified copy sits in the cache.
    assert_eq!(
        fs::read(dir.join(IN).join("c.txt")).unwrap(),
        trees[1][&p(IN, "c.txt")]
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(mounted(&dir), "a killed snapmount leaves its mount");
    assert_eq!(records(&w).len(), 1);
    // The next command cleans it.
    w.ok("A", &["status"]);
    assert!(!mounted(&dir), "still mounted after the next command");
    assert!(mount_clones(&w).is_empty(), "{:?}", mount_clones(&w));
    assert!(records(&w).is_empty(), "{:?}", records(&w));
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    // And the folder can be mounted on again.
    let child = start(&w, &["-n", "1"], &dir);
    assert_eq!(read_tree(&dir), trees[2]);
    w.ok("A", &["snapmount", "--unmount", &dir.to_string_lossy()]);
    let (o, _) = wait_within(child, Duration::from_secs(60));
    assert_ok(&o, "snapmount after --unmount");
    assert!(!mounted(&dir));
}

fn missing_snapshot_is_a_clear_error(kind: Kind) {
    if !fuse_or_skip(kind) {
        return;
    }
    let w = world_or_skip!(kind, "smmiss");
    history(&w);
    let mp_parent = tempfile::tempdir().unwrap();
    let dir = mp_parent.path().join("x");
    let d = dir.to_string_lossy().to_string();
    for args in [["--snapshot", "s9"], ["-n", "4"]] {
        let mut a = vec!["snapmount"];
        a.extend_from_slice(&args);
        a.extend_from_slice(&["--mountpoint", &d]);
        let o = w.run("A", &a);
        assert_exit(&o, 1, &format!("snapmount {args:?}"));
        let e = stderr(&o);
        assert!(
            e.contains("s9") || e.contains("-n 4"),
            "the error names the snapshot: {e}"
        );
        assert!(e.contains("s3"), "the error names the head: {e}");
        assert!(!mounted(&dir));
        assert!(records(&w).is_empty());
        assert!(mount_clones(&w).is_empty());
    }
    // A non-empty folder is refused before anything is mounted.
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("f"), b"x").unwrap();
    let o = w.run("A", &["snapmount", "-n", "1", "--mountpoint", &d]);
    assert_exit(&o, 1, "snapmount on a non-empty folder");
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
    assert!(!mounted(&dir));
    // --unmount of a folder nothing is mounted on.
    let o = w.run("A", &["snapmount", "--unmount", &d]);
    assert_exit(&o, 1, "--unmount of nothing");
    assert!(stderr(&o).contains("no snapmount"), "{}", stderr(&o));
}

per_kind!(
    snapmount_shows_an_old_snapshot: xfs, zfs, ssh, s3;
    killed_snapmount_is_cleaned_by_the_next_command: xfs, zfs, ssh, s3;
    missing_snapshot_is_a_clear_error: xfs, zfs, ssh, s3;
);
