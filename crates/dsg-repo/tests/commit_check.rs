//! The commit check walks the uploaded manifest alongside the base and
//! what was staged, without holding either manifest: these commits, on a
//! real directory repository, must be accepted or refused exactly as when
//! both were parsed whole.

use std::path::Path;

use dsg_core::config::RepoType;
use dsg_core::manifest::{write_json, Entry, Manifest};
use dsg_repo::backend::AgentError;
use dsg_repo::protocol::ErrorKind;

mod support;
use support::*;

/// Opens a sync on `s1`, stages `stage`, commits `json`.
fn sync(root: &Path, stage_: &[(&str, &[u8])], json: Vec<u8>) -> Result<(), AgentError> {
    let mut b = dsg_repo::open(RepoType::Xfs, root, None).unwrap();
    b.begin("tx-1", Some("s1"), None, "t").unwrap();
    for (p, d) in stage_ {
        stage(&mut *b, p, d);
    }
    commit_json(&mut *b, "s2", json)
}

fn refused(r: Result<(), AgentError>, kind: ErrorKind, needle: &str) {
    let e = r.expect_err("a bad commit was accepted");
    assert_eq!(e.kind, kind, "{e}");
    assert!(e.message.contains(needle), "{needle:?} not in: {e}");
}

#[test]
fn a_sync_that_adds_replaces_and_deletes_lands_exactly() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let entries = vec![
        file("a.txt", b"A\n"),
        file("d/y", b"y\n"),
        file("d.txt", b"dt\n"),
        file("d0/new", b"new\n"),
    ];
    let m = sealed("s2", entries, Some(&s1));
    sync(
        &root,
        &[("a.txt", b"A\n"), ("d0/new", b"new\n")],
        m.to_json_bytes(),
    )
    .unwrap();
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
}

#[test]
fn metadata_first_uploads_are_read_like_metadata_last_ones() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let mut entries: Vec<Entry> = s1.entries().to_vec();
    entries.push(file("z", b"z\n"));
    let m = sealed("s2", entries, Some(&s1));
    let md = serde_json::to_string(&m.metadata.as_ref().unwrap().to_value()).unwrap();
    let mut body = Vec::new();
    write_json(&mut body, m.entries(), None).unwrap();
    let body = String::from_utf8(body).unwrap();
    let entries_part =
        &body[body.find("\"entries\"").unwrap()..body.rfind(",\n  \"metadata\"").unwrap()];
    let json = format!("{{\"metadata\": {md}, {entries_part}}}");
    sync(&root, &[("z", b"z\n")], json.into_bytes()).unwrap();
    assert_eq!(std::fs::read(root.join("z")).unwrap(), b"z\n");
}

#[test]
fn unsorted_or_duplicate_uploads_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let before = tree(&root);
    let m = sealed("s2", s1.entries().to_vec(), Some(&s1));
    let md = m.metadata.clone().unwrap();
    let mut rev: Vec<Entry> = m.entries().to_vec();
    rev.reverse();
    // Sealed over the file's (reversed) order: it verifies as it stands.
    let rev_md = dsg_core::manifest::Metadata {
        entries_hash: dsg_core::manifest::entries_hash_of(&rev),
        ..md.clone()
    };
    let mut json = Vec::new();
    write_json(&mut json, &rev, Some(&rev_md)).unwrap();
    refused(
        sync(&root, &[], json),
        ErrorKind::Corrupt,
        "not in path order",
    );
    let mut dup: Vec<Entry> = m.entries().to_vec();
    dup.insert(1, dup[1].clone());
    let mut json = Vec::new();
    write_json(&mut json, &dup, Some(&md)).unwrap();
    refused(
        sync(&root, &[], json),
        ErrorKind::Corrupt,
        "duplicate paths",
    );
    assert_eq!(tree(&root), before);
}

#[test]
fn integrity_and_shape_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let before = tree(&root);
    let mut m = sealed("s2", s1.entries().to_vec(), Some(&s1));
    m.metadata.as_mut().unwrap().entries_hash = "0123456789abcdef".into();
    refused(
        sync(&root, &[], m.to_json_bytes()),
        ErrorKind::Corrupt,
        "entries_hash mismatch",
    );
    // A file where the base has a directory the manifest keeps.
    let mut entries: Vec<Entry> = s1.entries().to_vec();
    entries.push(file("d", b"file\n"));
    let m = sealed("s2", entries, Some(&s1));
    refused(
        sync(&root, &[("d", b"file\n")], m.to_json_bytes()),
        ErrorKind::Corrupt,
        "\"d/x\" lies below \"d\"",
    );
    // A name NFC makes equal to one the base has.
    let mut entries: Vec<Entry> = s1.entries().to_vec();
    entries.push(file("caf\u{e9}", b"1\n"));
    entries.push(file("cafe\u{301}", b"2\n"));
    let m = sealed("s2", entries, Some(&s1));
    refused(
        sync(
            &root,
            &[("caf\u{e9}", b"1\n"), ("cafe\u{301}", b"2\n")],
            m.to_json_bytes(),
        ),
        ErrorKind::Corrupt,
        "normalisation",
    );
    assert_eq!(tree(&root), before);
}

#[test]
fn entries_must_be_staged_or_unchanged_and_staged_paths_listed() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let before = tree(&root);
    // Changed in the manifest, not uploaded.
    let mut entries: Vec<Entry> = s1.entries().to_vec();
    entries[0] = file("a.txt", b"changed\n");
    let m = sealed("s2", entries, Some(&s1));
    refused(
        sync(&root, &[], m.to_json_bytes()),
        ErrorKind::Protocol,
        "a.txt: in the new manifest but neither uploaded nor unchanged",
    );
    // Uploaded other bytes than the manifest says.
    refused(
        sync(&root, &[("a.txt", b"other\n")], m.to_json_bytes()),
        ErrorKind::Verify,
        "a.txt: the uploaded content does not match",
    );
    // Uploaded, but not in the manifest (before, between and after its paths).
    let m = sealed("s2", s1.entries().to_vec(), Some(&s1));
    for stray in ["0", "d/xx", "zz"] {
        refused(
            sync(&root, &[(stray, b"s\n")], m.to_json_bytes()),
            ErrorKind::Protocol,
            &format!("{stray}: uploaded but not in the new manifest"),
        );
    }
    assert_eq!(tree(&root), before);
}

#[test]
fn a_head_not_in_path_order_is_still_a_base() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    // As the original may write it: its own order, hashed in that order.
    let mut rev: Vec<Entry> = s1.entries().to_vec();
    rev.reverse();
    let md = dsg_core::manifest::Metadata {
        entries_hash: dsg_core::manifest::entries_hash_of(&rev),
        ..s1.metadata.clone().unwrap()
    };
    let mut json = Vec::new();
    write_json(&mut json, &rev, Some(&md)).unwrap();
    std::fs::write(root.join(".dsg/last-sync.json"), json).unwrap();
    let head = Manifest::load(&root.join(".dsg/last-sync.json")).unwrap();
    let entries = vec![file("a.txt", b"A\n"), file("d/x", b"x\n")];
    let m = sealed("s2", entries, Some(&head));
    sync(&root, &[("a.txt", b"A\n")], m.to_json_bytes()).unwrap();
    let got: Vec<String> = tree(&root).into_iter().map(|(p, _)| p).collect();
    assert_eq!(got, vec!["a.txt", "d/x"]);
}
