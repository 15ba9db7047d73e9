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
