//! A local client's uploads staged as one batch (`stage_files_from`): the
//! copies run on every core, yet each file is verified, accepted in the
//! order sent, and the first failure ends the batch with the path named.
//! Real files in a temporary directory; the agent's batching of
//! `PutFileLocal` requests is driven end to end by dsg-cli's tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dsg_core::config::RepoType;
use dsg_core::hash::Hash;
use dsg_core::manifest::{Entry, EntryKind, Manifest, Mtime, SyncMessages};
use dsg_repo::backend::{Backend, CommitData, LocalFile};
use dsg_repo::protocol::ErrorKind;

const MTIME_S: i64 = 1_700_000_000;

fn content(i: usize) -> Vec<u8> {
    format!("file {i}\n").repeat(1 + i % 7).into_bytes()
}

fn h(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

/// `n` source files under `dir/src`, and the batch that stages them as
/// `input/fNNN`.
fn sources(dir: &Path, n: usize) -> Vec<LocalFile> {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    (0..n)
        .map(|i| {
            let b = content(i);
            let p: PathBuf = src.join(format!("f{i:03}"));
            std::fs::write(&p, &b).unwrap();
            LocalFile {
                path: format!("input/d{}/f{i:03}", i % 3),
                size: b.len() as u64,
                hash: h(&b),
                mtime_ns: (MTIME_S + i as i64) * 1_000_000_000,
                src: p,
            }
        })
        .collect()
}

fn commit(b: &mut dyn Backend, files: &[LocalFile]) {
    let user: Arc<str> = Arc::from("t@example.org");
    let entries = files
        .iter()
        .map(|f| Entry {
            path: f.path.as_str().into(),
            user: user.clone(),
            kind: EntryKind::File {
                size: f.size,
                mtime: Mtime::from_unix(f.mtime_ns / 1_000_000_000, 0),
                hash: Some(Hash(f.hash)),
            },
        })
        .collect();
    let mut m = Manifest::from_entries(entries);
    m.seal("s1", "t@example.org", "test", "init", None);
    let md = m.metadata.clone().unwrap();
    let mut msgs = SyncMessages::default();
    msgs.add(&md);
    b.commit(&CommitData {
        snapshot_id: "s1".into(),
        manifest: m.to_json_bytes().into(),
        removed: None,
        sync_messages: msgs.to_json_bytes(),
    })
    .unwrap();
}

#[test]
fn a_batch_is_verified_and_committed_whole_with_each_files_mtime() {
    let d = tempfile::tempdir().unwrap();
    let files = sources(d.path(), 300);
    let root = d.path().join("repos/r");
    std::fs::create_dir_all(d.path().join("repos")).unwrap();
    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    b.begin("tx-init", None, None, "t").unwrap();
    for batch in files.chunks(128) {
        b.stage_files_from(batch).unwrap();
    }
    commit(&mut *b, &files);
    drop(b);
    for (i, f) in files.iter().enumerate() {
        let at = root.join(&f.path);
        assert_eq!(std::fs::read(&at).unwrap(), content(i), "{}", f.path);
        let mtime = std::fs::metadata(&at).unwrap().modified().unwrap();
        let secs = mtime
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert_eq!(secs, MTIME_S + i as i64, "mtime of {}", f.path);
    }
}

#[test]
fn the_first_file_that_does_not_verify_ends_the_batch_and_is_named() {
    let d = tempfile::tempdir().unwrap();
    let mut files = sources(d.path(), 40);
    // Promised bytes that are not what the file holds (it changed after
    // the client hashed it).
    files[17].hash ^= 1;
    files[30].hash ^= 1;
    let root = d.path().join("repos/r");
    std::fs::create_dir_all(d.path().join("repos")).unwrap();
    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    b.begin("tx-init", None, None, "t").unwrap();
    let e = b.stage_files_from(&files).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Verify, "{e}");
    assert!(
        e.message.contains(&files[17].path),
        "the first bad file is named: {e}"
    );
    b.rollback().unwrap();
    drop(b);
    // Nothing of the init is left: no repository, no staging beside it.
    let left: Vec<_> = std::fs::read_dir(d.path().join("repos"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
