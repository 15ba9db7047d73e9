//! Resuming uploads at the backend: what a connection cut leaves staged,
//! what a resumed transaction keeps, and that a resumed file is verified
//! whole (the staged prefix included). Real files in a temporary directory;
//! the end-to-end cut over ssh is in dsg-cli's `ssh_resume` tests.

use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use dsg_core::config::RepoType;
use dsg_core::hash::Hash;
use dsg_core::manifest::{Entry, EntryKind, Manifest, Mtime, SyncMessages};
use dsg_repo::backend::{Backend, CommitData};
use dsg_repo::protocol::{ErrorKind, StagedFile};

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn h(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

/// A reader that yields `limit` bytes of `data` and then fails like a cut
/// connection.
struct CutAfter<'a> {
    data: &'a [u8],
    limit: usize,
}

impl Read for CutAfter<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.limit == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed inside a data frame",
            ));
        }
        let n = out.len().min(self.limit).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.limit -= n;
        Ok(n)
    }
}

fn manifest(id: &str, files: &[(&str, &[u8])], parent: Option<&Manifest>) -> Manifest {
    let user: Arc<str> = Arc::from("t@example.org");
    let entries = files
        .iter()
        .map(|(p, b)| Entry {
            path: (*p).into(),
            user: user.clone(),
            kind: EntryKind::File {
                size: b.len() as u64,
                mtime: Mtime::from_unix(1_700_000_000, 0),
                hash: Some(Hash(h(b))),
            },
        })
        .collect();
    let mut m = Manifest::from_entries(entries);
    let parent_md = parent.and_then(|p| p.metadata.clone());
    m.seal(id, "t@example.org", "test", "sync", parent_md.as_ref());
    m
}

fn commit(b: &mut dyn Backend, m: &Manifest) -> Result<(), dsg_repo::backend::AgentError> {
    let md = m.metadata.clone().unwrap();
    let mut msgs = SyncMessages::default();
    msgs.add(&md);
    b.commit(&CommitData {
        snapshot_id: md.snapshot_id.clone(),
        manifest: m.to_json_bytes().into(),
        removed: None,
        sync_messages: msgs.to_json_bytes(),
    })
}

fn stage(b: &mut dyn Backend, path: &str, data: &[u8], offset: u64) -> Result<(), ErrorKind> {
    let mut rest = &data[offset as usize..];
    b.stage_file(path, data.len() as u64, h(data), 0, offset, &mut rest)
        .map_err(|e| e.kind)
}

/// A repository at `s1` holding `input/a`.
fn repo_at_s1(dir: &Path) -> (std::path::PathBuf, Manifest) {
    let root = dir.join("repos/r");
    std::fs::create_dir_all(dir.join("repos")).unwrap();
    let a = bytes(1, 1000);
    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    b.begin("tx-init", None, None, "t").unwrap();
    stage(&mut *b, "input/a", &a, 0).unwrap();
    let m = manifest("s1", &[("input/a", &a)], None);
    commit(&mut *b, &m).unwrap();
    (root, m)
}

/// Starts a sync transaction that stages `input/big` until the "connection"
/// is cut `cut` bytes in, with `input/small` fully staged before it.
fn cut_upload(root: &Path, big: &[u8], small: &[u8], cut: usize) {
    let mut b = dsg_repo::open(RepoType::Xfs, root, None).unwrap();
    b.begin("tx-1", Some("s1"), None, "t").unwrap();
    stage(&mut *b, "input/small", small, 0).unwrap();
    let mut r = CutAfter {
        data: big,
        limit: cut,
    };
    let e = b
        .stage_file("input/big", big.len() as u64, h(big), 0, 0, &mut r)
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io, "{e}");
    // What the agent does when its input ends without `bye`.
    b.detach();
}

/// Where a sync stages `path`: flat, named by a hash of the path.
fn staged_at(root: &Path, tx: &str, path: &str) -> std::path::PathBuf {
    root.join(".dsg/staging")
        .join(tx)
        .join(".dsg-files")
        .join(dsg_txn::apply::flat_name(path))
}

fn sorted(mut v: Vec<StagedFile>) -> Vec<StagedFile> {
    v.sort_by(|a, b| a.path.cmp(&b.path));
    v
}

#[test]
fn a_resumed_transaction_keeps_its_staging_and_commits_the_whole_files() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let big = bytes(2, 3 << 20);
    let small = bytes(3, 5000);
    cut_upload(&root, &big, &small, 1_234_567);

    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    let staged = sorted(b.resume("tx-1", Some("s1"), None, "t").unwrap());
    assert_eq!(
        staged,
        vec![
            StagedFile {
                path: "input/big".into(),
                len: 1_234_567
            },
            StagedFile {
                path: "input/small".into(),
                len: small.len() as u64
            },
        ]
    );
    // The client sends only what is missing: nothing of `small`, the rest
    // of `big`.
    stage(&mut *b, "input/small", &small, small.len() as u64).unwrap();
    stage(&mut *b, "input/big", &big, 1_234_567).unwrap();
    let a = std::fs::read(root.join("input/a")).unwrap();
    let m = manifest(
        "s2",
        &[
            ("input/a", &a),
            ("input/big", &big),
            ("input/small", &small),
        ],
        Some(&s1),
    );
    commit(&mut *b, &m).unwrap();
    drop(b);
    assert!(std::fs::read(root.join("input/big")).unwrap() == big);
    assert_eq!(std::fs::read(root.join("input/small")).unwrap(), small);
    assert!(!root.join(".dsg/staging").exists());
    assert!(!root.join(".dsg/journal").exists());
}

#[test]
fn a_staged_prefix_damaged_on_the_server_fails_verification() {
    let d = tempfile::tempdir().unwrap();
    let (root, _) = repo_at_s1(d.path());
    let big = bytes(4, 2 << 20);
    let small = bytes(5, 10);
    cut_upload(&root, &big, &small, 1_000_000);
    // Flip one byte of the staged prefix.
    let p = staged_at(&root, "tx-1", "input/big");
    let mut staged = std::fs::read(&p).unwrap();
    staged[999] ^= 0xff;
    std::fs::write(&p, &staged).unwrap();

    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    b.resume("tx-1", Some("s1"), None, "t").unwrap();
    assert_eq!(
        stage(&mut *b, "input/big", &big, 1_000_000),
        Err(ErrorKind::Verify)
    );
    // An offset beyond what is staged is refused, not zero-filled.
    assert_eq!(
        stage(&mut *b, "input/small", &bytes(6, 100), 50),
        Err(ErrorKind::Protocol)
    );
    b.rollback().unwrap();
    assert!(!root.join(".dsg/staging").exists());
}

#[test]
fn recovery_by_another_command_wins_over_a_later_resume() {
    let d = tempfile::tempdir().unwrap();
    let (root, _) = repo_at_s1(d.path());
    let big = bytes(7, 1 << 20);
    cut_upload(&root, &big, b"x", 500_000);
    assert!(root.join(".dsg/staging/tx-1").is_dir());

    // Another client's command recovers the abandoned transaction.
    let mut other = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    other.recover(false).unwrap();
    drop(other);
    assert!(!root.join(".dsg/staging").exists());
    assert!(!root.join(".dsg/journal").exists());

    // The resume finds nothing and begins afresh.
    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    assert_eq!(b.resume("tx-1", Some("s1"), None, "t").unwrap(), vec![]);
    stage(&mut *b, "input/big", &big, 0).unwrap();
    b.rollback().unwrap();
}

#[test]
fn a_resume_against_a_moved_head_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (root, _) = repo_at_s1(d.path());
    cut_upload(&root, &bytes(8, 100_000), b"x", 10_000);
    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    let e = b.resume("tx-1", Some("s0"), None, "t").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Moved, "{e}");
    // The refused resume still cleaned up the abandoned staging.
    let mut c = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    c.recover(false).unwrap();
    assert!(!root.join(".dsg/staging").exists());
}

#[test]
fn an_init_resumes_into_its_own_staging_directory() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("repos")).unwrap();
    let root = d.path().join("repos/r");
    let big = bytes(9, 2 << 20);
    {
        let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
        b.begin("tx-i", None, None, "t").unwrap();
        let mut r = CutAfter {
            data: &big,
            limit: 777_777,
        };
        assert!(b
            .stage_file("input/big", big.len() as u64, h(&big), 0, 0, &mut r)
            .is_err());
        b.detach();
    }
    assert!(!root.exists(), "no repository before the commit");
    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    let staged = b.resume("tx-i", None, None, "t").unwrap();
    assert_eq!(
        staged,
        vec![StagedFile {
            path: "input/big".into(),
            len: 777_777
        }]
    );
    stage(&mut *b, "input/big", &big, 777_777).unwrap();
    commit(&mut *b, &manifest("s1", &[("input/big", &big)], None)).unwrap();
    assert!(std::fs::read(root.join("input/big")).unwrap() == big);
    let leftovers: Vec<_> = std::fs::read_dir(d.path().join("repos"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".dsg-init.r.") && !n.ends_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Snapshot ids start again at s1 in a replaced repository: a client that
/// planned against another repository's s1 must be refused, by hash.
#[test]
fn begin_and_resume_check_the_base_hash_not_just_the_id() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let right = s1.metadata.as_ref().unwrap().snapshot_hash.clone().unwrap();
    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    let e = b
        .begin("tx-2", Some("s1"), Some("0123456789abcdef"), "t")
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Moved, "{e}");
    // The failed begin released the lock: another writer gets it at once.
    b.rollback().unwrap();
    let mut other = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    other.begin("tx-3", Some("s1"), Some(&right), "t").unwrap();
    other.rollback().unwrap();

    cut_upload(&root, &bytes(10, 100_000), b"x", 50_000);
    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    let e = b
        .resume("tx-1", Some("s1"), Some("0123456789abcdef"), "t")
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Moved, "{e}");
}

/// `init --force` is confirmed against the head the user saw; a sync that
/// landed since must not be replaced unseen.
#[test]
fn a_replace_confirmed_against_an_older_head_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (root, _) = repo_at_s1(d.path());
    let before = std::fs::read(root.join(".dsg/last-sync.json")).unwrap();
    // What the user saw: the head manifest file, by its XXH3.
    let seen = format!("{:016x}", h(&before));
    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    let e = b
        .begin_replace("tx-r", "t", Some("0123456789abcdef"))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Moved, "{e}");
    assert_eq!(
        std::fs::read(root.join(".dsg/last-sync.json")).unwrap(),
        before
    );
    let leftovers: Vec<_> = std::fs::read_dir(d.path().join("repos"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".dsg-init.") && !n.ends_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Confirmed against the head it holds: goes ahead.
    b.begin_replace("tx-r2", "t", Some(&seen)).unwrap();
    b.rollback().unwrap();
}

/// The journal's `begin` as a dsg before flat staging wrote it.
#[derive(serde::Serialize)]
struct OldBegin {
    base: String,
}

/// An older dsg's transaction `tx` on `root` at `s1`: `files` staged at
/// their paths (not flat), the metadata of `m` beside them, and its journal
/// up to `committed` (with `ops`) or only its `begin`.
fn old_layout_transaction(
    root: &Path,
    tx: &str,
    files: &[(&str, &[u8])],
    m: &Manifest,
    ops: Option<Vec<dsg_txn::Op>>,
) {
    let staging = root.join(".dsg/staging").join(tx);
    for (p, b) in files {
        let dst = staging.join(p);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::write(dst, b).unwrap();
    }
    let meta = staging.join(".dsg-meta");
    std::fs::create_dir_all(meta.join("archive")).unwrap();
    std::fs::write(meta.join("last-sync.json"), m.to_json_bytes()).unwrap();
    let mut msgs = SyncMessages::default();
    msgs.add(m.metadata.as_ref().unwrap());
    std::fs::write(meta.join("sync-messages.json"), msgs.to_json_bytes()).unwrap();
    let j = dsg_txn::Journal::create(&root.join(".dsg/journal")).unwrap();
    j.append(&dsg_txn::Record::Begin {
        tx: tx.to_string(),
        begin: OldBegin { base: "s1".into() },
    })
    .unwrap();
    if let Some(ops) = ops {
        j.append(&dsg_txn::Record::<OldBegin>::Committed {
            tx: tx.to_string(),
            ops,
            snap: None,
        })
        .unwrap();
    }
}

/// Upgrading dsg between a crash and its recovery: a transaction an older
/// dsg committed with its files staged at their paths is rolled forward
/// from there, not looked for in the flat staging.
#[test]
fn a_committed_transaction_staged_at_paths_by_an_older_dsg_rolls_forward() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let old_a = std::fs::read(root.join("input/a")).unwrap();
    let (new_a, b) = (bytes(20, 300), bytes(21, 40));
    let m = manifest("s2", &[("input/a", &new_a), ("input/new/b", &b)], Some(&s1));
    let ops = vec![
        dsg_txn::Op::retire("input/a", Some(h(&old_a)), None),
        dsg_txn::Op::Install {
            path: "input/a".into(),
        },
        dsg_txn::Op::Install {
            path: "input/new/b".into(),
        },
    ];
    let files: &[(&str, &[u8])] = &[("input/a", &new_a), ("input/new/b", &b)];
    old_layout_transaction(&root, "tx-old", files, &m, Some(ops));

    let mut r = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    r.recover(false).unwrap();
    assert_eq!(std::fs::read(root.join("input/a")).unwrap(), new_a);
    assert_eq!(std::fs::read(root.join("input/new/b")).unwrap(), b);
    let obj = dsg_txn::apply::object_path(&root.join(".dsg"), Hash(h(&old_a)));
    assert_eq!(std::fs::read(obj).unwrap(), old_a, "the old version kept");
    assert_eq!(
        std::fs::read(root.join(".dsg/last-sync.json")).unwrap(),
        m.to_json_bytes()
    );
    assert!(!root.join(".dsg/staging").exists());
    assert!(!root.join(".dsg/journal").exists());
}

/// An older dsg's upload that did not commit is not resumed into the flat
/// staging: it is rolled back, and the resume begins afresh.
#[test]
fn an_uncommitted_upload_staged_at_paths_by_an_older_dsg_is_not_resumed() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let x = bytes(22, 50);
    let m = manifest("s2", &[("input/x", &x)], Some(&s1));
    old_layout_transaction(&root, "tx-1", &[("input/x", &x)], &m, None);

    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    assert_eq!(b.resume("tx-1", Some("s1"), None, "t").unwrap(), vec![]);
    assert!(
        !root.join(".dsg/staging/tx-1/input").exists(),
        "the old staging is removed"
    );
    stage(&mut *b, "input/x", &x, 0).unwrap();
    let a = std::fs::read(root.join("input/a")).unwrap();
    let m = manifest("s2", &[("input/a", &a), ("input/x", &x)], Some(&s1));
    commit(&mut *b, &m).unwrap();
    assert_eq!(std::fs::read(root.join("input/x")).unwrap(), x);
    assert!(!root.join(".dsg/staging").exists());
}

/// The resume index is written without fsync: a line a crash tore names
/// no file, and that file is sent again whole.
#[test]
fn a_torn_index_line_is_not_resumed() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = repo_at_s1(d.path());
    let big = bytes(23, 1 << 20);
    let small = bytes(24, 70);
    cut_upload(&root, &big, &small, 300_000);
    // `big` was staged last: its line is the index's end.
    let index = root.join(".dsg/staging/tx-1/.dsg-index");
    let mut bytes_ = std::fs::read(&index).unwrap();
    bytes_.truncate(bytes_.len() - 3);
    std::fs::write(&index, &bytes_).unwrap();

    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    let staged = b.resume("tx-1", Some("s1"), None, "t").unwrap();
    assert_eq!(
        staged,
        vec![StagedFile {
            path: "input/small".into(),
            len: small.len() as u64
        }]
    );
    stage(&mut *b, "input/small", &small, small.len() as u64).unwrap();
    stage(&mut *b, "input/big", &big, 0).unwrap();
    let a = std::fs::read(root.join("input/a")).unwrap();
    let m = manifest(
        "s2",
        &[
            ("input/a", &a),
            ("input/big", &big),
            ("input/small", &small),
        ],
        Some(&s1),
    );
    commit(&mut *b, &m).unwrap();
    assert!(std::fs::read(root.join("input/big")).unwrap() == big);
    assert_eq!(std::fs::read(root.join("input/small")).unwrap(), small);
}
