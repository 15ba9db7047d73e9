//! Building blocks of the commit-check tests: entries, sealed manifests,
//! a commit of manifest bytes as a client would send them, a staged file.

#![allow(dead_code)] // each test binary uses its own share

use std::path::Path;

use dsg_core::hash::Hash;
use dsg_core::manifest::{Entry, EntryKind, Manifest, Mtime, SyncMessages};
use dsg_repo::backend::{AgentError, Backend, CommitData};

pub fn file(path: &str, data: &[u8]) -> Entry {
    Entry {
        path: path.into(),
        user: "t@example.org".into(),
        kind: EntryKind::File {
            size: data.len() as u64,
            mtime: Mtime::from_unix(1_700_000_000, 0),
            hash: Some(Hash::of_bytes(data)),
        },
    }
}

pub fn link(path: &str, target: &str) -> Entry {
    Entry {
        path: path.into(),
        user: "t@example.org".into(),
        kind: EntryKind::Link {
            target: target.into(),
        },
    }
}

pub fn sealed(id: &str, entries: Vec<Entry>, parent: Option<&Manifest>) -> Manifest {
    let mut m = Manifest::from_entries(entries);
    let md = parent.and_then(|p| p.metadata.clone());
    m.seal(id, "t@example.org", "test", "sync", md.as_ref());
    m
}

pub fn commit_json(b: &mut dyn Backend, id: &str, json: Vec<u8>) -> Result<(), AgentError> {
    let m = Manifest::from_json_bytes(&json, Path::new("t")).ok();
    let mut msgs = SyncMessages::default();
    match m.as_ref().and_then(|m| m.metadata.as_ref()) {
        Some(md) => msgs.add(md),
        None => msgs.add(&dsg_core::manifest::Metadata {
            snapshot_id: id.into(),
            ..Default::default()
        }),
    }
    b.commit(&CommitData {
        snapshot_id: id.into(),
        manifest: json.into(),
        removed: None,
        sync_messages: msgs.to_json_bytes(),
    })
}

pub fn stage(b: &mut dyn Backend, path: &str, data: &[u8]) {
    let mut r = data;
    b.stage_file(
        path,
        data.len() as u64,
        Hash::of_bytes(data).0,
        0,
        0,
        &mut r,
    )
    .unwrap();
}

/// The repository's data files (not `.dsg/`) with their bytes, sorted.
pub fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for de in std::fs::read_dir(&d).unwrap().flatten() {
            let p = de.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            if rel.starts_with(".dsg") {
                continue;
            }
            if de.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// What `repo_at_s1` holds.
pub const FILES: [(&str, &[u8]); 4] = [
    ("a.txt", b"a\n"),
    ("d/x", b"x\n"),
    ("d/y", b"y\n"),
    ("d.txt", b"dt\n"),
];

/// A repository at `s1` holding `FILES`.
pub fn repo_at_s1(dir: &Path) -> (std::path::PathBuf, Manifest) {
    let root = dir.join("repos/r");
    std::fs::create_dir_all(dir.join("repos")).unwrap();
    let mut b = dsg_repo::open(dsg_core::config::RepoType::Xfs, &root, None).unwrap();
    b.begin("tx-init", None, None, "t").unwrap();
    for (p, d) in FILES {
        stage(&mut *b, p, d);
    }
    let m = sealed("s1", FILES.iter().map(|(p, d)| file(p, d)).collect(), None);
    commit_json(&mut *b, "s1", m.to_json_bytes()).unwrap();
    (root, m)
}
