//! History reads on every kind of repository (xfs, zfs, ssh): `dsg
//! snapfetch` gives a file's bytes as of any snapshot — overwritten and
//! deleted versions, the head, `-n`, from a fresh clone — verified and
//! written atomically, never over an existing file without `--force`; and
//! `dsg validate-snapshot --deep` re-hashes a snapshot's stored bytes on
//! the repository host. A tampered repository file is caught by both
//! (exit 1, nothing written, the snapshot and path named).

mod world;

use std::fs;
use std::path::Path;

use world::*;

/// s1: a=a1 b=b1 k; s2: a=a2; s3: a=a3…, b deleted; s4: c added.
fn history(w: &World) {
    w.write("A", &p(IN, "a.txt"), "a1");
    w.write("A", &p(IN, "b.txt"), "b1 (deleted in s3)");
    w.write("A", &p(IN, "k.txt"), "kept all along");
    w.write("A", &p(OUT, "big.bin"), bytes(7, 300_000));
    w.init("A");
    w.write("A", &p(IN, "a.txt"), "a2 overwritten");
    w.ok("A", &["sync", "-m", "two"]);
    w.write("A", &p(IN, "a.txt"), "a3, the third and longest version");
    w.remove("A", &p(IN, "b.txt"));
    w.ok("A", &["sync", "-m", "three"]);
    w.write("A", &p(IN, "c.txt"), "c4");
    w.ok("A", &["sync", "-m", "four"]);
    assert_eq!(snapshot_id(&w.head()), "s4");
}

/// `snapfetch FILE ARGS… -o OUT` in client `c`: the output written.
#[track_caller]
fn fetch(w: &World, c: &str, file: &str, args: &[&str], out: &str) -> Vec<u8> {
    let mut a = vec!["snapfetch", file];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", out]);
    w.ok(c, &a);
    let got = fs::read(w.client(c).join(out)).unwrap();
    fs::remove_file(w.client(c).join(out)).unwrap();
    got
}

#[track_caller]
fn fails(w: &World, c: &str, args: &[&str], code: i32) -> String {
    let o = w.run(c, args);
    assert_exit(&o, code, &format!("[{}] dsg {args:?}", w.kind.label()));
    stderr(&o)
}

fn snapfetch_reads_every_version(kind: Kind) {
    let w = world_or_skip!(kind, "snapf");
    history(&w);
    let a = p(IN, "a.txt");
    let b = p(IN, "b.txt");
    // Overwritten versions, the head, and -n counted from the head.
    assert_eq!(fetch(&w, "A", &a, &["--snapshot", "s1"], "o1"), b"a1");
    assert_eq!(
        fetch(&w, "A", &a, &["--snapshot", "s2"], "o2"),
        b"a2 overwritten"
    );
    let a3: &[u8] = b"a3, the third and longest version";
    assert_eq!(fetch(&w, "A", &a, &["--snapshot", "s3"], "o3"), a3);
    assert_eq!(fetch(&w, "A", &a, &["--snapshot", "head"], "oh"), a3);
    assert_eq!(fetch(&w, "A", &a, &[], "od"), a3, "default: the head");
    assert_eq!(fetch(&w, "A", &a, &["-n", "1"], "n1"), a3);
    assert_eq!(fetch(&w, "A", &a, &["-n", "3"], "n3"), b"a2 overwritten");
    assert_eq!(fetch(&w, "A", &a, &["-n", "4"], "n4"), b"a1");
    // A deleted file, in the snapshots that held it only.
    assert_eq!(
        fetch(&w, "A", &b, &["--snapshot", "s2"], "b2"),
        b"b1 (deleted in s3)"
    );
    let e = fails(
        &w,
        "A",
        &["snapfetch", &b, "--snapshot", "s3", "-o", "b3"],
        1,
    );
    assert!(e.contains("not in snapshot s3"), "{e}");
    assert!(!w.client("A").join("b3").exists());
    // A large file (several data frames), byte for byte.
    assert_eq!(
        fetch(&w, "A", &p(OUT, "big.bin"), &["--snapshot", "s1"], "big"),
        bytes(7, 300_000)
    );
    // Snapshots that do not exist, and bad ids.
    let e = fails(
        &w,
        "A",
        &["snapfetch", &a, "--snapshot", "s9", "-o", "x"],
        1,
    );
    assert!(e.contains("s9") && e.contains("does not exist"), "{e}");
    fails(&w, "A", &["snapfetch", &a, "-n", "5", "-o", "x"], 1);
    fails(&w, "A", &["snapfetch", &a, "-n", "0", "-o", "x"], 2);
    fails(
        &w,
        "A",
        &["snapfetch", &a, "--snapshot", "s01", "-o", "x"],
        2,
    );
    fails(
        &w,
        "A",
        &["snapfetch", &a, "--snapshot", "../s1", "-o", "x"],
        2,
    );
    fails(&w, "A", &["snapfetch", "../../etc/passwd", "-o", "x"], 2);
    assert!(!w.client("A").join("x").exists());

    // The default output is the file's name in the current directory, and
    // an existing file is never replaced without --force.
    w.ok("A", &["snapfetch", &a, "--snapshot", "s1"]);
    assert_eq!(w.read("A", "a.txt"), b"a1");
    let e = fails(&w, "A", &["snapfetch", &a, "--snapshot", "s2"], 1);
    assert!(e.contains("exists") && e.contains("--force"), "{e}");
    assert_eq!(w.read("A", "a.txt"), b"a1", "unchanged without --force");
    w.write("A", "precious", "mine");
    fails(&w, "A", &["snapfetch", &a, "-n", "2", "-o", "precious"], 1);
    assert_eq!(w.read("A", "precious"), b"mine");
    w.ok(
        "A",
        &["snapfetch", &a, "-n", "2", "-o", "precious", "--force"],
    );
    assert_eq!(w.read("A", "precious"), a3);
    // A directory as output keeps the file's name; - is stdout.
    fs::create_dir(w.client("A").join("dir")).unwrap();
    w.ok("A", &["snapfetch", &a, "--snapshot", "s2", "-o", "dir"]);
    assert_eq!(w.read("A", "dir/a.txt"), b"a2 overwritten");
    let o = w.ok("A", &["snapfetch", &a, "--snapshot", "s1", "-o", "-"]);
    assert_eq!(o.stdout, b"a1");
    // A path relative to a subdirectory of the project.
    let mut c = w.command(
        "A",
        &["snapfetch", "a.txt", "--snapshot", "s1", "-o", "sub.out"],
    );
    c.current_dir(w.client("A").join(IN));
    let o = c.output().unwrap();
    assert_ok(&o, "snapfetch from a subdirectory");
    assert_eq!(w.read("A", &p(IN, "sub.out")), b"a1");
    fs::remove_file(w.client("A").join(p(IN, "sub.out"))).unwrap();
    // --dry-run writes nothing; --json describes the fetch.
    w.ok(
        "A",
        &[
            "snapfetch",
            &a,
            "--snapshot",
            "s1",
            "-o",
            "dry",
            "--dry-run",
        ],
    );
    assert!(!w.client("A").join("dry").exists());
    let o = w.ok(
        "A",
        &["snapfetch", &a, "--snapshot", "s2", "-o", "j", "--json"],
    );
    let r = &json_of(&o)["result"];
    assert_eq!(r["snapshot_id"], "s2");
    assert_eq!(r["head_id"], "s4");
    assert_eq!(r["file"], a.as_str());
    assert_eq!(r["size"], 14);
    assert_eq!(
        r["hash"],
        dsg_core::hash::Hash::of_bytes(b"a2 overwritten").to_hex()
    );
    assert_eq!(r["replaced"], false);
    assert_eq!(w.read("A", "j"), b"a2 overwritten");
    // Nothing of a fetch is left behind, here or in the repository.
    w.assert_clean("A");
    w.assert_repo_sound("after the fetches");
    let temps: Vec<_> = walk_all(&w.client("A"))
        .into_iter()
        .filter(|(p, _)| p.to_string_lossy().contains(".dsg-tmp."))
        .collect();
    assert!(temps.is_empty(), "temp files left: {temps:?}");

    // A fresh clone reads every version, with and without its archives.
    w.clone_client("A", "B");
    assert_eq!(fetch(&w, "B", &a, &["--snapshot", "s1"], "o"), b"a1");
    fs::remove_dir_all(w.client("B").join(".dsg/archive")).unwrap();
    assert_eq!(
        fetch(&w, "B", &b, &["--snapshot", "s2"], "o"),
        b"b1 (deleted in s3)"
    );
    assert_eq!(fetch(&w, "B", &a, &["-n", "3"], "o"), b"a2 overwritten");

    // Every snapshot's stored bytes are sound.
    for (s, files) in [("s1", 4), ("s2", 4), ("s3", 3), ("s4", 4)] {
        let o = w.ok(
            "A",
            &["validate-snapshot", "--deep", "--snapshot", s, "--json"],
        );
        let v = json_of(&o);
        assert_eq!(v["status"], "ok", "{s}");
        assert_eq!(v["result"]["snapshot_id"], s);
        assert_eq!(v["result"]["problem_count"], 0);
        assert_eq!(v["result"]["files"], files, "{v}");
        assert!(v["result"]["bytes"].as_u64().unwrap() > 300_000, "{v}");
    }
    w.ok("B", &["validate-snapshot", "--deep"]);
}

/// The object (xfs) holding `content`'s version in the repository.
fn object_of(w: &World, content: &[u8]) -> std::path::PathBuf {
    let h = dsg_core::hash::Hash::of_bytes(content).to_hex();
    w.repo().join(".dsg/objects").join(&h[..2]).join(&h)
}

/// Writes `bytes` over `path` (possibly read-only) in the repository.
fn tamper(path: &Path, bytes: &[u8]) {
    assert!(
        path.is_file(),
        "{} is not there to tamper with",
        path.display()
    );
    let _ = fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644));
    fs::write(path, bytes).unwrap();
}

/// Writes `bytes` over the stored copy of `content`: s3, its `data/`
/// object (one per content, shared by every snapshot that holds it);
/// otherwise `fallback`, a file of the repository.
fn tamper_content(w: &World, content: &[u8], fallback: &Path, bytes: &[u8]) {
    if w.kind != Kind::S3 {
        return tamper(fallback, bytes);
    }
    let h = dsg_core::hash::Hash::of_bytes(content).to_hex();
    let key = world::s3::data_key(content.len() as u64, &h);
    let s3 = w.s3();
    assert!(s3.get(&key).is_some(), "{key} is not there to tamper with");
    s3.store.put(&key, bytes, &dsg_s3::Cond::None).unwrap();
    s3.invalidate_view();
}

fn tampering_is_detected(kind: Kind) {
    let w = world_or_skip!(kind, "snapt");
    history(&w);
    let a = p(IN, "a.txt");
    let k = p(IN, "k.txt");
    for s in ["s1", "s2", "s3", "s4"] {
        w.ok("A", &["validate-snapshot", "--deep", "--snapshot", s]);
    }
    if kind != Kind::Zfs {
        // An old version in the object store.
        tamper_content(&w, b"a1", &object_of(&w, b"a1"), b"a1 but not quite");
        let e = fails(
            &w,
            "A",
            &["snapfetch", &a, "--snapshot", "s1", "-o", "t1"],
            1,
        );
        assert!(e.contains("failed verification") && e.contains("s1"), "{e}");
        assert!(!w.client("A").join("t1").exists(), "nothing written");
        let o = w.run("A", &["validate-snapshot", "--deep", "--snapshot", "s1"]);
        assert_exit(&o, 1, "deep validation of a tampered s1");
        let all = format!("{}{}", stdout(&o), stderr(&o));
        assert!(all.contains("s1") && all.contains(&a), "{all}");
        let o = w.run(
            "A",
            &["validate-snapshot", "--deep", "--snapshot", "s1", "--json"],
        );
        assert_exit(&o, 1, "deep --json");
        let v = json_of(&o);
        assert_eq!(v["status"], "failed");
        assert_eq!(v["result"]["problems"][0]["path"], a.as_str());
        assert_eq!(v["result"]["problem_count"], 1);
        // Other snapshots do not hold that version.
        w.ok("A", &["validate-snapshot", "--deep", "--snapshot", "s2"]);
        // An existing output stays as it was after a failed --force.
        w.write("A", "t1", "before");
        fails(
            &w,
            "A",
            &["snapfetch", &a, "--snapshot", "s1", "-o", "t1", "--force"],
            1,
        );
        assert_eq!(w.read("A", "t1"), b"before");
    }
    // The head's tree (on zfs the live dataset; its snapshots are
    // read-only): every snapshot that holds that version sees it damaged.
    tamper_content(&w, b"kept all along", &w.repo().join(&k), b"kept? no");
    let e = fails(&w, "A", &["snapfetch", &k, "-o", "tk"], 1);
    assert!(e.contains("failed verification") && e.contains("s4"), "{e}");
    assert!(!w.client("A").join("tk").exists());
    let o = w.run("A", &["validate-snapshot", "--deep"]);
    assert_exit(&o, 1, "deep validation of a tampered head");
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(all.contains("s4") && all.contains(&k), "{all}");
    if kind == Kind::Zfs {
        // @s1 keeps its own, intact copy.
        assert_eq!(
            fetch(&w, "A", &k, &["--snapshot", "s1"], "k1"),
            b"kept all along"
        );
        w.ok("A", &["validate-snapshot", "--deep", "--snapshot", "s1"]);
        assert!(
            w.zfs().datasets().iter().all(|d| !d.contains("--read-")),
            "history clones left: {:?}",
            w.zfs().datasets()
        );
    } else {
        // On a directory the tree is every snapshot's copy of k.
        fails(
            &w,
            "A",
            &["validate-snapshot", "--deep", "--snapshot", "s1"],
            1,
        );
    }
}

per_kind!(
    snapfetch_reads_every_version: xfs, zfs, ssh, s3;
    tampering_is_detected: xfs, zfs, ssh, s3;
);
