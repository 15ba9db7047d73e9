//! The repository keeps a binary copy of its head (`.dsg/last-sync.bin`)
//! so that a sync need not parse the JSON head twice. The copy may only
//! ever stand for the head file it was made from: these commits, on a real
//! directory repository, check that it is exact, and that a stale, damaged
//! or outdated copy is never taken for the head.

use std::io::Write;
use std::path::{Path, PathBuf};

use dsg_core::config::RepoType;
use dsg_core::manifest::{binary, Manifest};
use dsg_repo::protocol::ErrorKind;

mod support;
use support::*;

/// A repository at `s1` holding `a.txt` and `b.txt`.
fn repo_at_s1(dir: &Path) -> (PathBuf, Manifest) {
    let root = dir.join("repos/r");
    std::fs::create_dir_all(dir.join("repos")).unwrap();
    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    b.begin("tx-init", None, None, "t").unwrap();
    stage(&mut *b, "a.txt", b"a\n");
    stage(&mut *b, "b.txt", b"b\n");
    let m = sealed(
        "s1",
        vec![file("a.txt", b"a\n"), file("b.txt", b"b\n")],
        None,
    );
    commit_json(&mut *b, "s1", m.to_json_bytes()).unwrap();
    (root, m)
}

/// A sync from `base` staging `files` (and links: `b"->target"`) and
/// committing `m`.
fn sync(root: &Path, base: &str, files: &[(&str, &[u8])], m: &Manifest) -> Result<(), ErrorKind> {
    let id = &m.metadata.as_ref().unwrap().snapshot_id;
    let mut b = dsg_repo::open(RepoType::Xfs, root, None).unwrap();
    b.begin(&format!("tx-{id}"), Some(base), None, "t")
        .map_err(|e| e.kind)?;
    for (p, d) in files {
        match d.strip_prefix(b"->") {
            Some(t) => b.stage_link(p, std::str::from_utf8(t).unwrap()).unwrap(),
            None => stage(&mut *b, p, d),
        }
    }
    commit_json(&mut *b, id, m.to_json_bytes()).map_err(|e| e.kind)
}

fn assert_copy_is_head(root: &Path) {
    let head = Manifest::load(&root.join(".dsg/last-sync.json")).unwrap();
    let tag = dsg_core::hash::hash_file(&root.join(".dsg/last-sync.json"))
        .unwrap()
        .0
         .0;
    let f = std::fs::File::open(root.join(".dsg/last-sync.bin")).expect("a copy of the head");
    let mut got = Vec::new();
    let s = binary::read_stream(std::io::BufReader::new(f), tag, |e| {
        got.push(e);
        Ok(())
    })
    .expect("the copy reads back as the head's");
    assert_eq!(got, head.entries());
    assert_eq!(s.metadata, head.metadata);
    assert_eq!(s.stored_entries_hash, head.entries_hash());
}

fn read(root: &Path, p: &str) -> Vec<u8> {
    std::fs::read(root.join(p)).unwrap()
}

#[test]
fn every_commit_leaves_an_exact_copy_of_its_head() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    assert_copy_is_head(&root);
    let s2 = sealed(
        "s2",
        vec![
            file("a.txt", b"A\n"),
            file("b.txt", b"b\n"),
            link("l", "a.txt"),
        ],
        Some(&s1),
    );
    sync(&root, "s1", &[("a.txt", b"A\n"), ("l", b"->a.txt")], &s2).unwrap();
    assert_copy_is_head(&root);
    // Nothing of the copy is left in staging or beside it.
    let names: Vec<_> = std::fs::read_dir(root.join(".dsg"))
        .unwrap()
        .flatten()
        .map(|d| d.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("bin") || n.starts_with(".dsg-tmp"))
        .collect();
    assert_eq!(names, ["last-sync.bin"]);
}

/// s1 → s2 changes `a.txt`; s3 keeps it. Measured against s1, s3's
/// unchanged `a.txt` is neither staged nor the base's: a commit check that
/// took the s1 copy for the s2 head would refuse s3.
fn s2_and_s3(root: &Path, s1: &Manifest) -> (Manifest, Manifest) {
    let s2 = sealed(
        "s2",
        vec![file("a.txt", b"A\n"), file("b.txt", b"b\n")],
        Some(s1),
    );
    sync(root, "s1", &[("a.txt", b"A\n")], &s2).unwrap();
    let s3 = sealed(
        "s3",
        vec![file("a.txt", b"A\n"), file("b.txt", b"B\n")],
        Some(&s2),
    );
    (s2, s3)
}

#[test]
fn a_copy_of_another_head_is_not_used() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let old_copy = read(&root, ".dsg/last-sync.bin");
    let (_, s3) = s2_and_s3(&root, &s1);
    // What a crash between the two renames, or the original dsg writing
    // the head, leaves: a copy of another head.
    std::fs::write(root.join(".dsg/last-sync.bin"), old_copy).unwrap();
    sync(&root, "s2", &[("b.txt", b"B\n")], &s3).unwrap();
    assert_eq!(read(&root, "a.txt"), b"A\n");
    assert_eq!(read(&root, "b.txt"), b"B\n");
    assert_copy_is_head(&root);
}

#[test]
fn a_damaged_or_missing_copy_is_not_used() {
    for damage in [
        |p: &Path| std::fs::remove_file(p).unwrap(),
        |p: &Path| {
            let mut b = std::fs::read(p).unwrap();
            let i = b.len() / 2;
            b[i] ^= 0x01;
            std::fs::write(p, b).unwrap()
        },
        |p: &Path| {
            let b = std::fs::read(p).unwrap();
            std::fs::write(p, &b[..b.len() - 3]).unwrap()
        },
    ] {
        let d = tempfile::tempdir().unwrap();
        let (root, s1) = repo_at_s1(d.path());
        let (_, s3) = s2_and_s3(&root, &s1);
        damage(&root.join(".dsg/last-sync.bin"));
        sync(&root, "s2", &[("b.txt", b"B\n")], &s3).unwrap();
        assert_eq!(read(&root, "b.txt"), b"B\n");
        assert_copy_is_head(&root);
    }
}

/// A head replaced between `begin` (which read the copy) and the commit,
/// as the original dsg, which does not take our lock, could: the commit
/// must see the head it would build on is gone, not trust the copy.
#[test]
fn a_head_replaced_after_begin_is_noticed_at_commit() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let (s2, _) = s2_and_s3(&root, &s1);
    // Past the clock ticks within which `begin` would not trust the
    // head's stat (`STAMP_SETTLED_NS`): the write must be
    // told by the stat alone.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    b.begin("tx-s3", Some("s2"), None, "t").unwrap();
    stage(&mut *b, "b.txt", b"B\n");
    // Another s2 (same id, other content) written over the head, in
    // place, as long as it was, its mtime put back: the commit check does
    // not hash the head again when it stats as `begin` hashed it, and
    // only the ctime tells this write.
    let other = sealed(
        "s2",
        vec![file("a.txt", b"A\n"), file("b.txt", b"c\n")],
        Some(&s1),
    );
    let head = root.join(".dsg/last-sync.json");
    let head_before = read(&root, ".dsg/last-sync.json");
    assert_eq!(other.to_json_bytes().len(), head_before.len());
    let mtime = std::fs::metadata(&head).unwrap().modified().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&head)
        .unwrap()
        .write_all(&other.to_json_bytes())
        .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&head)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(std::fs::metadata(&head).unwrap().modified().unwrap(), mtime);
    let s3 = sealed(
        "s3",
        vec![file("a.txt", b"A\n"), file("b.txt", b"B\n")],
        Some(&s2),
    );
    let e =
        commit_json(&mut *b, "s3", s3.to_json_bytes()).expect_err("committed on a replaced head");
    assert_eq!(e.kind, ErrorKind::Moved, "{e}");
    drop(b);
    assert_ne!(read(&root, ".dsg/last-sync.json"), head_before);
    assert_eq!(read(&root, ".dsg/last-sync.json"), other.to_json_bytes());
    assert_eq!(read(&root, "b.txt"), b"b\n");
}
