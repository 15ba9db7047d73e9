//! A delta commit (protocol 7) sends only the new manifest's added and
//! changed entries and the base's paths it drops; the agent merges them
//! into its head. On a real directory repository: the head it writes must
//! be byte for byte the manifest the client holds (the client's "is R my
//! cache?" test compares bytes), and a delta that does not add up to what
//! its metadata says is refused with nothing changed.

use std::path::Path;

use dsg_core::config::RepoType;
use dsg_core::manifest::{write_json, Entry, Manifest, SyncMessages};
use dsg_repo::backend::{AgentError, CommitData};
use dsg_repo::protocol::ErrorKind;

mod support;
use support::*;

/// Opens a sync on `s1`, stages `files`, commits `new` as a delta of
/// `upserts` and `removed` (as given: a test may send them wrong).
fn delta_sync(
    root: &Path,
    files: &[(&str, &[u8])],
    new: &Manifest,
    upserts: &[&Entry],
    removed: &[&str],
) -> Result<(), AgentError> {
    let mut b = dsg_repo::open(RepoType::Xfs, root, None).unwrap();
    b.begin("tx-1", Some("s1"), None, "t").unwrap();
    for (p, d) in files {
        stage(&mut *b, p, d);
    }
    let md = new.metadata.clone().unwrap();
    let mut doc = Vec::new();
    write_json(&mut doc, upserts.iter().copied(), Some(&md)).unwrap();
    let mut msgs = SyncMessages::default();
    msgs.add(&md);
    b.commit(&CommitData {
        snapshot_id: md.snapshot_id.clone(),
        manifest: doc.into(),
        removed: Some(serde_json::to_vec(removed).unwrap()),
        sync_messages: msgs.to_json_bytes(),
    })
}

fn s2(s1: &Manifest) -> Manifest {
    sealed(
        "s2",
        vec![
            file("a.txt", b"A\n"),
            file("d/y", b"y\n"),
            file("d.txt", b"dt\n"),
            file("d0/new", b"new\n"),
        ],
        Some(s1),
    )
}

fn unchanged(root: &Path, s1: &Manifest) {
    assert_eq!(
        std::fs::read(root.join(".dsg/last-sync.json")).unwrap(),
        s1.to_json_bytes()
    );
    let want: Vec<(String, Vec<u8>)> = FILES
        .iter()
        .map(|(p, d)| (p.to_string(), d.to_vec()))
        .collect();
    let mut want = want;
    want.sort();
    assert_eq!(tree(root), want);
}

#[test]
fn a_delta_lands_exactly_and_writes_the_clients_bytes() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let new = s2(&s1);
    let up: Vec<&Entry> = ["a.txt", "d0/new"]
        .iter()
        .map(|p| new.get(p).unwrap())
        .collect();
    delta_sync(
        &root,
        &[("a.txt", b"A\n"), ("d0/new", b"new\n")],
        &new,
        &up,
        &["d/x"],
    )
    .unwrap();
    assert_eq!(
        std::fs::read(root.join(".dsg/last-sync.json")).unwrap(),
        new.to_json_bytes(),
        "the head must be the bytes the client wrote for itself"
    );
    let want: Vec<(String, Vec<u8>)> = [
        ("a.txt", &b"A\n"[..]),
        ("d.txt", b"dt\n"),
        ("d/y", b"y\n"),
        ("d0/new", b"new\n"),
    ]
    .iter()
    .map(|(p, d)| (p.to_string(), d.to_vec()))
    .collect();
    assert_eq!(tree(&root), want);
    assert!(root.join(".dsg/archive/s1-sync.json.lz4").is_file());
    // The old d/x is kept as an object, as in a whole-manifest commit.
    let x = dsg_core::hash::Hash::of_bytes(b"x\n").to_hex();
    assert!(root.join(".dsg/objects").join(&x[..2]).join(&x).is_file());
    // The copy of the head the next sync reads is this head.
    let head = Manifest::load(&root.join(".dsg/last-sync.json")).unwrap();
    let tag = dsg_core::hash::hash_file(&root.join(".dsg/last-sync.json"))
        .unwrap()
        .0
         .0;
    let mut got = Vec::new();
    dsg_core::manifest::binary::read_stream(
        std::fs::File::open(root.join(".dsg/last-sync.bin")).unwrap(),
        tag,
        |e| {
            got.push(e);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(got, head.entries());
}

#[test]
fn a_delta_that_does_not_add_up_is_refused_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let new = s2(&s1);
    let staged: [(&str, &[u8]); 2] = [("a.txt", b"A\n"), ("d0/new", b"new\n")];
    let a = new.get("a.txt").unwrap();
    let n = new.get("d0/new").unwrap();
    let cases: Vec<(Vec<&Entry>, Vec<&str>, ErrorKind, &str)> = vec![
        // A dropped path left out: the merge is not the manifest the
        // metadata describes.
        (vec![a, n], vec![], ErrorKind::Corrupt, "mismatch"),
        // An added entry left out: likewise (and d0/new is staged, unlisted).
        (vec![a], vec!["d/x"], ErrorKind::Corrupt, ""),
        (vec![n, a], vec!["d/x"], ErrorKind::Corrupt, "path order"),
        (
            vec![a, n],
            vec!["d/y", "d/x"],
            ErrorKind::Corrupt,
            "path order",
        ),
        (
            vec![a, n],
            vec!["a.txt", "d/x"],
            ErrorKind::Corrupt,
            "both dropped and given",
        ),
    ];
    for (up, removed, kind, needle) in cases {
        let e = delta_sync(&root, &staged, &new, &up, &removed)
            .expect_err("a delta that does not add up was accepted");
        assert_eq!(e.kind, kind, "{e}");
        assert!(e.message.contains(needle), "{needle:?} not in: {e}");
        unchanged(&root, &s1);
    }
    // An entry that is neither staged nor the base's.
    let forged = file("d.txt", b"forged\n");
    let mut entries: Vec<Entry> = new.entries().to_vec();
    entries.retain(|e| &*e.path != "d.txt");
    entries.push(forged.clone());
    let forged_new = sealed("s2", entries, Some(&s1));
    let e = delta_sync(
        &root,
        &staged,
        &forged_new,
        &[
            forged_new.get("a.txt").unwrap(),
            forged_new.get("d.txt").unwrap(),
            forged_new.get("d0/new").unwrap(),
        ],
        &["d/x"],
    )
    .expect_err("an entry that was not uploaded was accepted");
    assert!(e.message.contains("d.txt"), "{e}");
    unchanged(&root, &s1);
}

#[test]
fn an_init_cannot_be_a_delta() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("repos/r");
    std::fs::create_dir_all(d.path().join("repos")).unwrap();
    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    b.begin("tx-init", None, None, "t").unwrap();
    stage(&mut *b, "a.txt", b"a\n");
    let m = sealed("s1", vec![file("a.txt", b"a\n")], None);
    let mut msgs = SyncMessages::default();
    msgs.add(m.metadata.as_ref().unwrap());
    let e = b
        .commit(&CommitData {
            snapshot_id: "s1".into(),
            manifest: m.to_json_bytes().into(),
            removed: Some(b"[]".to_vec()),
            sync_messages: msgs.to_json_bytes(),
        })
        .expect_err("an init delta was accepted");
    assert_eq!(e.kind, ErrorKind::Protocol, "{e}");
    assert!(!root.join(".dsg/last-sync.json").exists());
}

/// The agent holds a delta's entries: a client may not send it the whole
/// world as one (beyond 1/8 of the base plus 4 096 entries it is refused).
#[test]
fn an_oversized_delta_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let many: Vec<Entry> = (0..4097)
        .map(|i| file(&format!("m/{i:05}"), b"m\n"))
        .collect();
    let mut entries = s1.entries().to_vec();
    entries.extend(many.iter().cloned());
    let new = sealed("s2", entries, Some(&s1));
    let up: Vec<&Entry> = many.iter().collect();
    let e = delta_sync(&root, &[], &new, &up, &[]).expect_err("an oversized delta was accepted");
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains("more than 4096 entries"), "{e}");
    unchanged(&root, &s1);
}
