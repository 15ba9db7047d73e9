//! Format compatibility: the test vectors of spec-data-model §1.15, and the
//! manifests, archives and sync-messages the original dsg wrote
//! (tests/fixtures/original-dsg, facts in its FACTS.json).

use std::path::{Path, PathBuf};

use dsg_core::hash::Hash;
use dsg_core::manifest::{
    archive_bytes, read_archive, snapshot_hash, Entry, EntryKind, Manifest, Mtime, SyncMessages,
};
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/original-dsg")
}

fn facts() -> Value {
    serde_json::from_slice(&std::fs::read(fixture().join("FACTS.json")).unwrap()).unwrap()
}

fn example_entries() -> (Entry, Entry) {
    let f = Entry {
        path: "input/a.csv".into(),
        user: "alice@example.com".into(),
        kind: EntryKind::File {
            size: 12,
            mtime: Mtime::parse("2025-06-01T10:00:00-07:00"),
            hash: Hash::parse("0123456789abcdef"),
        },
    };
    let l = Entry {
        path: "output/b.csv".into(),
        user: "alice@example.com".into(),
        kind: EntryKind::Link {
            target: "../input/a.csv".into(),
        },
    };
    (f, l)
}

const EXAMPLE_JSON: &str = r#"{
  "entries": {
    "input/a.csv": {
      "type": "file",
      "path": "input/a.csv",
      "user": "alice@example.com",
      "filesize": 12,
      "mtime": "2025-06-01T10:00:00-07:00",
      "hash": "0123456789abcdef"
    },
    "output/b.csv": {
      "type": "link",
      "path": "output/b.csv",
      "user": "alice@example.com",
      "reference": "../input/a.csv"
    }
  },
  "metadata": {
    "manifest_version": "0.4.4",
    "snapshot_id": "s1",
    "created_at": "2025-06-01T10:00:00-07:00",
    "entry_count": 2,
    "entries_hash": "d9526a68f1c59424",
    "created_by": "alice@example.com",
    "snapshot_message": null,
    "snapshot_previous": null,
    "snapshot_hash": null,
    "snapshot_notes": null,
    "project_config": null
  }
}"#;

#[test]
fn compact_entry_bytes() {
    let (f, l) = example_entries();
    let mut b = Vec::new();
    f.write_compact(&mut b);
    assert_eq!(
        String::from_utf8(b).unwrap(),
        r#"{"type":"file","path":"input/a.csv","user":"alice@example.com","filesize":12,"mtime":"2025-06-01T10:00:00-07:00","hash":"0123456789abcdef"}"#
    );
    let mut b = Vec::new();
    l.write_compact(&mut b);
    assert_eq!(
        String::from_utf8(b).unwrap(),
        r#"{"type":"link","path":"output/b.csv","user":"alice@example.com","reference":"../input/a.csv"}"#
    );
}

#[test]
fn entries_hash_vectors() {
    let (f, l) = example_entries();
    assert_eq!(Manifest::new().entries_hash(), "2d06800538d394c2");
    let m = Manifest::from_entries(vec![l, f]);
    assert_eq!(m.entries_hash(), "d9526a68f1c59424");
    // Reversed stored order: the stored-order hash is what an original file
    // carries, and it must verify.
    let reversed = EXAMPLE_JSON
        .replace("d9526a68f1c59424", "743b4607d0eb145a")
        .replace("\"input/a.csv\": {", "\"zz\": {");
    let v: Value = serde_json::from_str(&reversed).unwrap();
    let mut entries = serde_json::Map::new();
    entries.insert("output/b.csv".into(), v["entries"]["output/b.csv"].clone());
    entries.insert("input/a.csv".into(), v["entries"]["zz"].clone());
    let doc = serde_json::json!({"entries": entries, "metadata": v["metadata"]});
    let m = Manifest::from_json_bytes(&serde_json::to_vec(&doc).unwrap(), Path::new("x")).unwrap();
    m.verify_integrity().unwrap();
    assert_eq!(
        m.entries()[0].path.as_ref(),
        "input/a.csv",
        "kept sorted in memory"
    );
}

#[test]
fn chain_vectors() {
    let s1 = snapshot_hash("d9526a68f1c59424", Some("Initial snapshot"), None, None);
    assert_eq!(s1, "e35b1621282b3c59");
    assert_eq!(
        snapshot_hash("d9526a68f1c59424", Some("Sync operation"), None, Some(&s1)),
        "9c6d547771f9ec08"
    );
    let pc = serde_json::json!({"b": 1, "a": {"z": 2, "y": [1, 2]}});
    assert_eq!(
        snapshot_hash(
            "d9526a68f1c59424",
            Some("Initial snapshot"),
            Some(&pc),
            None
        ),
        "b6bd54138943b969"
    );
}

#[test]
fn writes_the_original_bytes() {
    let m = Manifest::from_json_bytes(EXAMPLE_JSON.as_bytes(), Path::new("x")).unwrap();
    m.verify_integrity().unwrap();
    assert_eq!(String::from_utf8(m.to_json_bytes()).unwrap(), EXAMPLE_JSON);
}

#[test]
fn non_ascii_is_raw_utf8() {
    let e = Entry {
        path: "input/café.csv".into(),
        user: "".into(),
        kind: EntryKind::File {
            size: 0,
            mtime: Mtime::parse("2025-01-15T12:00:00-08:00"),
            hash: None,
        },
    };
    let bytes = Manifest::from_entries(vec![e]).to_json_bytes();
    assert!(bytes.windows(6).any(|w| w == b"caf\xc3\xa9."));
    assert!(!bytes.windows(2).any(|w| w == b"\\u"));
}

#[test]
fn strict_loading() {
    let bad = [
        ("not json", "{\"entries\": "),
        ("list entries", "{\"entries\": []}"),
        (
            "escaping path",
            r#"{"entries": {"../x": {"type":"file","path":"../x","filesize":1,"mtime":"2025-01-15T12:00:00-08:00"}}}"#,
        ),
        (
            "absolute path",
            r#"{"entries": {"/etc/passwd": {"type":"file","path":"/etc/passwd","filesize":1,"mtime":"x"}}}"#,
        ),
        (
            "escaping link",
            r#"{"entries": {"a": {"type":"link","path":"a","reference":"../b"}}}"#,
        ),
        (
            "bad hash",
            r#"{"entries": {"a": {"type":"file","path":"a","filesize":1,"mtime":"x","hash":"zz"}}}"#,
        ),
        (
            "unknown type",
            r#"{"entries": {"a": {"type":"dir","path":"a"}}}"#,
        ),
        (
            "bad metadata",
            r#"{"entries": {}, "metadata": {"snapshot_id": 3}}"#,
        ),
        (
            "link chain out",
            r#"{"entries": {"a/b/up": {"type":"link","path":"a/b/up","reference":"../.."}, "a/b/up2": {"type":"link","path":"a/b/up2","reference":"up/.."}}}"#,
        ),
        (
            "entry under a link",
            r#"{"entries": {"a/l": {"type":"link","path":"a/l","reference":"x"}, "a/l/f": {"type":"file","path":"a/l/f","filesize":1,"mtime":"x"}}}"#,
        ),
    ];
    for (what, text) in bad {
        let e = Manifest::from_json_bytes(text.as_bytes(), Path::new("/x/last-sync.json"));
        let msg = e.expect_err(what).to_string();
        assert!(msg.contains("/x/last-sync.json"), "{what}: {msg}");
    }
    // A chain that stays inside is fine.
    let ok = r#"{"entries": {"a/b/up": {"type":"link","path":"a/b/up","reference":".."}, "a/b/up2": {"type":"link","path":"a/b/up2","reference":"up/x"}}}"#;
    Manifest::from_json_bytes(ok.as_bytes(), Path::new("x")).unwrap();
    // Lax numbers of the original are accepted.
    let ok =
        r#"{"entries": {"a": {"type":"file","path":"a","filesize":"12","mtime":"x","hash":""}}}"#;
    let m = Manifest::from_json_bytes(ok.as_bytes(), Path::new("x")).unwrap();
    assert!(matches!(
        m.entries()[0].kind,
        EntryKind::File {
            size: 12,
            hash: None,
            ..
        }
    ));
}

/// Every manifest the original wrote loads, verifies in its stored order,
/// and hashes in sorted order to what FACTS.json recomputed independently.
#[test]
fn original_manifests() {
    let facts = facts();
    for loc in ["repo", "alice", "bob", "alice-after-step2"] {
        let p = fixture().join(loc).join(".dsg/last-sync.json");
        let m = Manifest::load(&p).unwrap();
        m.verify_integrity()
            .unwrap_or_else(|e| panic!("{loc}: {e}"));
        let f = &facts["locations"][loc]["last_sync"];
        let md = m.metadata.as_ref().unwrap();
        assert_eq!(
            md.entries_hash,
            f["entries_hash"].as_str().unwrap(),
            "{loc}"
        );
        assert_eq!(
            m.entries_hash(),
            f["entries_hash_recomputed_in_sorted_order"]
                .as_str()
                .unwrap(),
            "{loc}"
        );
        assert_eq!(m.len() as u64, f["entry_count"].as_u64().unwrap());
        // The chain link recomputes from the previous snapshot's hash.
        if let Some(prev) = f["snapshot_hash_check"]["prev_snapshot_hash_used"].as_str() {
            let h = snapshot_hash(
                &md.entries_hash,
                md.snapshot_message.as_deref(),
                md.project_config.as_ref(),
                Some(prev),
            );
            assert_eq!(Some(h), md.snapshot_hash, "{loc}");
        }
        // Rewritten sorted, it reads back identical; its stored hash no
        // longer matches (the original's order is gone), so archives keep
        // the original bytes rather than a rewrite.
        let back = Manifest::from_json_bytes(&m.to_json_bytes(), Path::new("x")).unwrap();
        assert_eq!(back, m);
        assert!(
            back.verify_integrity().is_err(),
            "{loc}: the original's order was not sorted"
        );
    }
}

#[test]
fn original_archives_and_messages() {
    let mut n = 0;
    for loc in ["alice", "bob", "alice-after-step2"] {
        let dir = fixture().join(loc).join(".dsg/archive");
        for de in std::fs::read_dir(&dir).unwrap() {
            let p = de.unwrap().path();
            let m = read_archive(&p).unwrap();
            m.verify_integrity()
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
            // Our LZ4 frames read back too.
            let tmp = tempfile::tempdir().unwrap();
            let q = tmp.path().join("s9-sync.json.lz4");
            std::fs::write(&q, archive_bytes(&m)).unwrap();
            assert_eq!(read_archive(&q).unwrap(), m);
        }
        let sm_path = fixture().join(loc).join(".dsg/sync-messages.json");
        let sm = SyncMessages::load_optional(&sm_path).unwrap().unwrap();
        assert!(sm.head_number().is_some());
        let again = SyncMessages::from_json_bytes(&sm.to_json_bytes(), Path::new("x")).unwrap();
        assert_eq!(again, sm);
        // Byte-compatible writing: same bytes as the original wrote.
        assert_eq!(
            sm.to_json_bytes(),
            std::fs::read(&sm_path).unwrap(),
            "{loc}"
        );
    }
    assert!(n >= 3);
}

/// The key decides where a file goes, but the `path` field is what the
/// original (and anything reading our cache copy) uses, so they must agree.
#[test]
fn entry_path_field_must_equal_its_key() {
    let bad = [
        (
            "a",
            "../../etc/passwd",
            r#"{"entries": {"a": {"type":"file","path":"../../etc/passwd","filesize":1,"mtime":"x"}}}"#,
        ),
        (
            "input/l",
            "input/other",
            r#"{"entries": {"input/l": {"type":"link","path":"input/other","reference":"x"}}}"#,
        ),
        (
            "b",
            "",
            r#"{"entries": {"b": {"type":"file","path":"","filesize":1,"mtime":"x"}}}"#,
        ),
    ];
    for (key, path, text) in bad {
        let msg = Manifest::from_json_bytes(text.as_bytes(), Path::new("/x/last-sync.json"))
            .expect_err(key)
            .to_string();
        assert!(msg.contains("/x/last-sync.json"), "{msg}");
        assert!(msg.contains(&format!("{key:?}")), "key not named: {msg}");
        assert!(
            msg.contains(&format!("path field {path:?}")),
            "path field not named: {msg}"
        );
    }
    // A `path` field that is not a string is as corrupt as a wrong one.
    let text = r#"{"entries": {"a": {"type":"file","path":7,"filesize":1,"mtime":"x"}}}"#;
    assert!(Manifest::from_json_bytes(text.as_bytes(), Path::new("x")).is_err());
    // Equal, even when spelled with escapes, is fine.
    let ok =
        r#"{"entries": {"a\u00e9": {"type":"file","path":"a\u00e9","filesize":1,"mtime":"x"}}}"#;
    let m = Manifest::from_json_bytes(ok.as_bytes(), Path::new("x")).unwrap();
    assert_eq!(m.entries()[0].path.as_ref(), "a\u{e9}");
}
