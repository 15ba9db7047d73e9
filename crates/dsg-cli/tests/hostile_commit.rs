//! The repository agent must not trust what a client commits: a hostile
//! client (`hostile/`) opens a sync on a real repository, stages what an
//! honest client never would and sends a manifest or sync-messages no
//! honest client builds. Each commit must be refused before the commit
//! point, nothing may be written outside the repository, the repository
//! must stay as it was, and honest commands must still work afterwards.

mod common;
mod hostile;
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use dsg_core::hash::Hash;
use dsg_core::manifest::{Entry, EntryKind, Manifest, Mtime, SyncMessages};
use dsg_repo::protocol::ErrorKind;
use hostile::*;

/// A project `p` with `input/a.txt`, initialised into the repository `r`
/// by the real CLI (head `s1`).
struct World {
    env: common::TestEnv,
    project: PathBuf,
    repo: PathBuf,
}

fn world() -> World {
    let env = common::TestEnv::new();
    let project = env.project("p");
    common::write(&project, "input/a.txt", "alpha\n");
    common::write(&project, "input/d/x", "in a directory\n");
    env.init_ok(&project, "r");
    let repo = env.repo("r");
    assert!(repo.join(".dsg/last-sync.json").is_file());
    World { env, project, repo }
}

/// What a hostile sync sends: files to stage, the manifest's snapshot id
/// and entries, and the sync-messages bytes (`None`: honest ones).
struct Attack {
    stage: Vec<(&'static str, &'static [u8])>,
    /// Entries added to the head's for the new manifest.
    add: Vec<(String, &'static [u8])>,
    id: String,
    messages: Option<Vec<u8>>,
}

fn file_entry(path: &str, bytes: &[u8]) -> Entry {
    Entry {
        path: path.into(),
        user: "mallory@example.org".into(),
        kind: EntryKind::File {
            size: bytes.len() as u64,
            mtime: Mtime::from_unix(1_700_000_000, 0),
            hash: Some(Hash::of_bytes(bytes)),
        },
    }
}

/// Runs `attack` as a sync on the head of `repo` through a real `dsg
/// agent`, twice: committing in two steps (`Commit { prepare }`, then
/// `CommitPrepared`), as dsg does, and in one. Returns an answer that
/// accepted it, if either did, else the one-step answer (both refusals
/// must be of the same kind).
fn hostile_sync(repo: &Path, attack: &Attack) -> Response {
    let two_steps = hostile_sync_once(repo, attack, true);
    if !matches!(two_steps, Response::Err(_)) {
        return two_steps;
    }
    let one_step = hostile_sync_once(repo, attack, false);
    if let (Response::Err(a), Response::Err(b)) = (&two_steps, &one_step) {
        assert_eq!(a.kind, b.kind, "two steps: {a:?}, one step: {b:?}");
    }
    one_step
}

fn hostile_sync_once(repo: &Path, attack: &Attack, prepare: bool) -> Response {
    let (mut a, mut answer, _) = send_attack(repo, attack, prepare);
    if prepare && matches!(answer, Response::Ok) {
        a.send(&Request::CommitPrepared);
        answer = a.recv_json("commit prepared", 60);
    }
    a.send(&Request::Bye);
    let _ = a.recv_json("bye", 10);
    answer
}

/// Begins a sync on the head of `repo`, stages and commits `attack`
/// (`prepare`: only up to the commit point); returns the agent, its
/// answer to `Commit`, and the manifest and sync-messages it sent.
fn send_attack(repo: &Path, attack: &Attack, prepare: bool) -> (Agent, Response, Sent) {
    let head = Manifest::load(&repo.join(".dsg/last-sync.json")).expect("head");
    let head_md = head.metadata.clone().expect("head metadata");
    let mut a = Agent::spawn(&support::dsg_bin(), repo, &[]);
    assert!(matches!(a.hello(), Response::Hello { .. }));
    a.send(&Request::Begin {
        tx_id: "hostile1".into(),
        base: Some(head_md.snapshot_id.clone()),
        user: "mallory".into(),
        resume: false,
        replace: false,
        base_hash: head_md.snapshot_hash.clone(),
    });
    let begun = a.recv_json("begin", 30);
    assert!(matches!(begun, Response::Ok), "begin: {begun:?}");
    for (path, bytes) in &attack.stage {
        put(&mut a, path, bytes, 1_700_000_000_000_000_000);
    }
    a.send(&Request::Flush);
    let flushed = a.recv_json("flush", 30);
    assert!(matches!(flushed, Response::Ok), "flush: {flushed:?}");
    let mut entries = head.entries().to_vec();
    entries.extend(attack.add.iter().map(|(p, b)| file_entry(p, b)));
    let mut m = Manifest::from_entries(entries);
    m.seal(&attack.id, "mallory", "hostile", "sync", Some(&head_md));
    let messages = attack.messages.clone().unwrap_or_else(|| {
        let mut sm = SyncMessages::load_optional(&repo.join(".dsg/sync-messages.json"))
            .expect("sync-messages")
            .unwrap_or_default();
        sm.add(m.metadata.as_ref().unwrap());
        sm.to_json_bytes()
    });
    a.send(&Request::Commit {
        snapshot_id: attack.id.clone(),
        delta: false,
        prepare,
    });
    let manifest = m.to_json_bytes();
    a.data(&manifest);
    a.data(&messages);
    let answer = a.recv_json("commit", 60);
    (a, answer, Sent { manifest, messages })
}

/// Uploads `bytes` to `path`, announced with their true size and hash.
fn put(a: &mut Agent, path: &str, bytes: &[u8], mtime_ns: i64) {
    a.send(&Request::PutFile {
        path: path.into(),
        size: bytes.len() as u64,
        hash: Hash::of_bytes(bytes).0,
        mtime_ns,
        offset: 0,
    });
    a.data(bytes);
}

/// What `send_attack` committed.
struct Sent {
    manifest: Vec<u8>,
    messages: Vec<u8>,
}

/// A commit prepared in two steps changes the repository only at
/// `CommitPrepared`: undone by `Rollback`, by the connection's end, and
/// not committed by a `CommitPrepared` that follows nothing prepared.
#[test]
fn a_prepared_commit_commits_only_when_told() {
    let w = world();
    let honest = || Attack {
        stage: vec![("input/b.txt", b"bravo\n")],
        add: vec![("input/b.txt".into(), b"bravo\n")],
        id: "s2".into(),
        messages: None,
    };
    let before = repo_content(&w);
    let head = || fs::read(w.repo.join(".dsg/last-sync.json")).unwrap();
    let head_before = head();

    // Prepared, then rolled back: as before, staging and all.
    let (mut a, answer, _) = send_attack(&w.repo, &honest(), true);
    assert!(matches!(answer, Response::Ok), "prepare: {answer:?}");
    assert_eq!(head(), head_before, "a prepared commit changed the head");
    assert!(!w.repo.join("input/b.txt").exists());
    a.send(&Request::Rollback);
    let r = a.recv_json("rollback", 30);
    assert!(matches!(r, Response::Ok), "rollback: {r:?}");
    assert_eq!(repo_content(&w), before, "the rollback left something");
    a.send(&Request::CommitPrepared);
    let r = a.recv_json("commit prepared", 30);
    assert!(
        matches!(&r, Response::Err(e) if e.kind == ErrorKind::Protocol),
        "a CommitPrepared after the rollback: {r:?}"
    );
    a.send(&Request::Bye);
    let _ = a.recv_json("bye", 10);
    assert_eq!(repo_content(&w), before);

    // Prepared, then the client goes away: the head stays.
    let (mut a, answer, _) = send_attack(&w.repo, &honest(), true);
    assert!(matches!(answer, Response::Ok), "prepare: {answer:?}");
    a.close_input();
    assert!(a.wait(30).success());
    assert_eq!(
        head(),
        head_before,
        "a prepared commit landed without CommitPrepared"
    );
    assert!(!w.repo.join("input/b.txt").exists());

    // Prepared, then the checked file uploaded again with other bytes:
    // the preparation is undone, so neither a `CommitPrepared` nor a
    // commit in one step of the checked manifest installs them.
    let evil = b"not what was checked\n";
    for one_step in [false, true] {
        let (mut a, answer, sent) = send_attack(&w.repo, &honest(), true);
        assert!(matches!(answer, Response::Ok), "prepare: {answer:?}");
        put(&mut a, "input/b.txt", evil, 0);
        if one_step {
            a.send(&Request::Commit {
                snapshot_id: "s2".into(),
                delta: false,
                prepare: false,
            });
            a.data(&sent.manifest);
            a.data(&sent.messages);
        } else {
            a.send(&Request::CommitPrepared);
        }
        let r = a.recv_json("commit after an upload", 60);
        assert!(matches!(r, Response::Err(_)), "one step {one_step}: {r:?}");
        a.send(&Request::Bye);
        let _ = a.recv_json("bye", 10);
        assert_eq!(head(), head_before, "one step {one_step}: committed");
        assert!(!w.repo.join("input/b.txt").exists());
    }

    // Prepared and committed: the new head, with its file.
    let (mut a, answer, _) = send_attack(&w.repo, &honest(), true);
    assert!(matches!(answer, Response::Ok), "prepare: {answer:?}");
    a.send(&Request::CommitPrepared);
    let r = a.recv_json("commit prepared", 60);
    assert!(matches!(r, Response::Committed { .. }), "commit: {r:?}");
    a.send(&Request::Bye);
    let _ = a.recv_json("bye", 10);
    let new = Manifest::load(&w.repo.join(".dsg/last-sync.json")).unwrap();
    assert!(new.get("input/b.txt").is_some());
    assert_eq!(new.metadata.unwrap().snapshot_id, "s2");
    assert_eq!(fs::read(w.repo.join("input/b.txt")).unwrap(), b"bravo\n");
    // The honest client catches up and syncs on top.
    let o = w.env.run(&w.project, &["sync"]);
    common::assert_code(&o, 0, "sync after the two-step commit");
    assert_eq!(fs::read(w.project.join("input/b.txt")).unwrap(), b"bravo\n");
    honest_sync_works(&w, "three\n");
}

/// Every path under `root`, skipping `skip` (the repository, checked by
/// content) and lock files.
fn paths(root: &Path, skip: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(root) else {
        return;
    };
    for de in rd.flatten() {
        let p = de.path();
        if p == skip || p.to_string_lossy().ends_with(".lock") {
            continue;
        }
        out.push(p.clone());
        if de.file_type().is_ok_and(|t| t.is_dir()) {
            paths(&p, skip, out);
        }
    }
}

/// Everything the test owns outside the repository: its scratch root and
/// its repositories' parent.
fn outside(w: &World) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for root in [w.env.base.parent().unwrap(), w.env.repos.parent().unwrap()] {
        paths(root, &w.repo, &mut out);
    }
    out.sort();
    out
}

/// The repository's files and links by content, without lock files.
fn repo_content(w: &World) -> BTreeMap<String, String> {
    common::content_map(&w.repo)
        .into_iter()
        .filter(|(k, _)| !k.ends_with("lock") && !k.ends_with(".lock"))
        .collect()
}

fn assert_refused(r: &Response, kinds: &[ErrorKind], needles: &[&str]) {
    let Response::Err(e) = r else {
        panic!("the agent accepted a hostile commit: {r:?}");
    };
    assert!(kinds.contains(&e.kind), "kind {:?}: {e:?}", e.kind);
    for n in needles {
        assert!(e.message.contains(n), "{n:?} not named: {e:?}");
    }
    assert!(e.hint.is_some(), "no hint: {e:?}");
}

/// An honest sync with the real CLI afterwards must work.
fn honest_sync_works(w: &World, content: &str) {
    common::write(&w.project, "input/honest.txt", content);
    let o = w.env.run(&w.project, &["sync", "-m", "honest"]);
    common::assert_code(&o, 0, "an honest sync after the hostile commit");
    let o = w.env.run(&w.project, &["status"]);
    common::assert_code(&o, 0, "status after the honest sync");
}

/// The snapshot id becomes an archive file name at the next commit: an
/// id that is a path would write anywhere the agent's user can.
#[test]
fn snapshot_ids_that_are_paths_or_skip_numbers_are_refused() {
    let w = world();
    let escape_dir = w.env.base.join("escape-here");
    fs::create_dir_all(&escape_dir).unwrap();
    let ids = [
        "../../../escape".to_string(),
        format!("{}/escape", escape_dir.display()),
        "s99".to_string(),
        "s02".to_string(),
        "s1".to_string(),
    ];
    for id in &ids {
        let before_out = outside(&w);
        let before = repo_content(&w);
        let r = hostile_sync(
            &w.repo,
            &Attack {
                stage: vec![("input/b.txt", b"bravo\n")],
                add: vec![("input/b.txt".into(), b"bravo\n")],
                id: id.clone(),
                messages: None,
            },
        );
        assert_refused(&r, &[ErrorKind::Protocol, ErrorKind::Unsafe], &[id, "s2"]);
        assert_eq!(repo_content(&w), before, "{id}: the repository changed");
        assert_eq!(outside(&w), before_out, "{id}: something appeared outside");
    }
    honest_sync_works(&w, "one\n");
    honest_sync_works(&w, "two\n");
    let head = Manifest::load(&w.repo.join(".dsg/last-sync.json")).unwrap();
    assert_eq!(head.metadata.unwrap().snapshot_id, "s3");
    assert!(fs::read_dir(&escape_dir).unwrap().next().is_none());
    let mut all = Vec::new();
    paths(w.env.base.parent().unwrap(), Path::new("/"), &mut all);
    paths(w.env.repos.parent().unwrap(), Path::new("/"), &mut all);
    assert!(
        !all.iter()
            .any(|p| p.to_string_lossy().contains("escape-sync")),
        "an archive was written from a hostile id"
    );
}

/// A path that is a file and a directory at once cannot be applied: such
/// a manifest must never become the head.
#[test]
fn a_manifest_with_an_entry_below_a_file_is_refused() {
    let w = world();
    let before_out = outside(&w);
    let before = repo_content(&w);
    let r = hostile_sync(
        &w.repo,
        &Attack {
            stage: vec![("input/a.txt/x", b"below a file\n")],
            add: vec![("input/a.txt/x".into(), b"below a file\n")],
            id: "s2".into(),
            messages: None,
        },
    );
    assert_refused(
        &r,
        &[ErrorKind::Protocol, ErrorKind::Corrupt],
        &["input/a.txt", "input/a.txt/x"],
    );
    assert_eq!(repo_content(&w), before, "the repository changed");
    assert_eq!(outside(&w), before_out, "something appeared outside");
    let o = w.env.run(&w.project, &["status"]);
    common::assert_code(&o, 0, "status after the refused commit");
    honest_sync_works(&w, "after\n");
}

/// The same, the other way round: a new file where the base has a
/// directory whose entries the manifest keeps.
#[test]
fn a_manifest_with_a_file_above_an_entry_is_refused() {
    let w = world();
    let before_out = outside(&w);
    let before = repo_content(&w);
    let r = hostile_sync(
        &w.repo,
        &Attack {
            stage: vec![("input/d", b"a file over a directory\n")],
            add: vec![("input/d".into(), b"a file over a directory\n")],
            id: "s2".into(),
            messages: None,
        },
    );
    assert_refused(
        &r,
        &[ErrorKind::Protocol, ErrorKind::Corrupt],
        &["input/d", "input/d/x"],
    );
    assert_eq!(repo_content(&w), before, "the repository changed");
    assert_eq!(outside(&w), before_out, "something appeared outside");
    let o = w.env.run(&w.project, &["status"]);
    common::assert_code(&o, 0, "status after the refused commit");
    honest_sync_works(&w, "after\n");
}

/// Two names equal after Unicode NFC normalisation are one file on some
/// filesystems (macOS): a manifest holding both cannot be checked out.
#[test]
fn a_manifest_with_names_equal_after_nfc_is_refused() {
    let w = world();
    let before = repo_content(&w);
    let nfc = "input/caf\u{e9}.txt";
    let nfd = "input/cafe\u{301}.txt";
    let r = hostile_sync(
        &w.repo,
        &Attack {
            stage: vec![(nfc, b"one\n"), (nfd, b"two\n")],
            add: vec![(nfc.into(), b"one\n"), (nfd.into(), b"two\n")],
            id: "s2".into(),
            messages: None,
        },
    );
    // Named as Rust quotes them (a combining accent is escaped).
    let (q1, q2) = (format!("{nfc:?}"), format!("{nfd:?}"));
    assert_refused(&r, &[ErrorKind::Protocol, ErrorKind::Corrupt], &[&q1, &q2]);
    assert_eq!(repo_content(&w), before, "the repository changed");
    honest_sync_works(&w, "after\n");
}

/// Sync-messages are read by every later sync: garbage must not be
/// committed.
#[test]
fn garbage_sync_messages_are_refused() {
    let w = world();
    let before_out = outside(&w);
    let before = repo_content(&w);
    for garbage in [
        b"\xff not json".to_vec(),
        b"[1, 2, 3]".to_vec(),
        b"{\"snapshots\": {}}".to_vec(),
    ] {
        let r = hostile_sync(
            &w.repo,
            &Attack {
                stage: vec![("input/b.txt", b"bravo\n")],
                add: vec![("input/b.txt".into(), b"bravo\n")],
                id: "s2".into(),
                messages: Some(garbage.clone()),
            },
        );
        assert_refused(
            &r,
            &[ErrorKind::Protocol, ErrorKind::Corrupt],
            &["sync-messages"],
        );
        assert_eq!(repo_content(&w), before, "the repository changed");
    }
    assert_eq!(outside(&w), before_out, "something appeared outside");
    honest_sync_works(&w, "after\n");
}

/// A head read off disk whose id is a path (a repository altered, or
/// written by another tool) is refused with a clear error, not used to
/// name the archive it would be moved to.
#[test]
fn a_head_whose_id_is_a_path_is_refused() {
    let w = world();
    let escape_dir = w.env.base.join("escape-here");
    fs::create_dir_all(&escape_dir).unwrap();
    let weird = format!("{}/escape", escape_dir.display());
    let head_path = w.repo.join(".dsg/last-sync.json");
    let mut head = Manifest::load(&head_path).unwrap();
    head.metadata.as_mut().unwrap().snapshot_id = weird.clone();
    fs::write(&head_path, head.to_json_bytes()).unwrap();
    let before_out = outside(&w);
    let before = repo_content(&w);

    let mut a = Agent::spawn(&support::dsg_bin(), &w.repo, &[]);
    assert!(matches!(a.hello(), Response::Hello { .. }));
    a.send(&Request::Begin {
        tx_id: "hostile2".into(),
        base: Some(weird.clone()),
        user: "mallory".into(),
        resume: false,
        replace: false,
        base_hash: None,
    });
    let begun = a.recv_json("begin", 30);
    if matches!(begun, Response::Ok) {
        // Without the check, a commit on it archives the head as
        // `<weird>-sync.json.lz4`: outside the repository.
        let r = hostile_commit_on(&mut a, &w.repo, &head, "s2");
        let written: Vec<_> = fs::read_dir(&escape_dir)
            .unwrap()
            .flatten()
            .map(|d| d.path())
            .collect();
        panic!("a head with id {weird:?} was used as a base; commit: {r:?}; written outside: {written:?}");
    }
    assert_refused(&begun, &[ErrorKind::Corrupt], &[&weird, "s<N>"]);
    assert_eq!(repo_content(&w), before, "the repository changed");
    assert_eq!(outside(&w), before_out, "something appeared outside");
    assert!(fs::read_dir(&escape_dir).unwrap().next().is_none());
    // An honest client is told too, and writes nothing outside either.
    common::write(&w.project, "input/honest.txt", "x\n");
    let o = w.env.run(&w.project, &["sync"]);
    assert_ne!(o.status.code(), Some(0), "a sync on a strange head");
    assert!(fs::read_dir(&escape_dir).unwrap().next().is_none());
}

/// Stages `input/b.txt` and commits `id` on `head` in an open transaction.
fn hostile_commit_on(a: &mut Agent, repo: &Path, head: &Manifest, id: &str) -> Response {
    let bytes = b"bravo\n";
    put(a, "input/b.txt", bytes, 0);
    let mut entries = head.entries().to_vec();
    entries.push(file_entry("input/b.txt", bytes));
    let mut m = Manifest::from_entries(entries);
    m.seal(id, "mallory", "hostile", "sync", head.metadata.as_ref());
    let mut sm = SyncMessages::load_optional(&repo.join(".dsg/sync-messages.json"))
        .unwrap()
        .unwrap_or_default();
    sm.add(m.metadata.as_ref().unwrap());
    a.send(&Request::Commit {
        snapshot_id: id.into(),
        delta: false,
        prepare: false,
    });
    a.data(&m.to_json_bytes());
    a.data(&sm.to_json_bytes());
    a.recv_json("commit", 60)
}

/// An init is checked the same way: its id can only be `s1`, and its
/// sync-messages must parse. Nothing is created when it is refused.
#[test]
fn a_hostile_init_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("r");
    let bytes = b"alpha\n";
    let cases: [(&str, Option<&[u8]>); 3] = [
        ("../escape", None),
        ("s2", None),
        ("s1", Some(b"\xff not json")),
    ];
    for (id, messages) in cases {
        let mut a = Agent::spawn(&support::dsg_bin(), &repo, &[]);
        assert!(matches!(a.hello(), Response::Hello { .. }));
        a.send(&Request::Begin {
            tx_id: "hostile3".into(),
            base: None,
            user: "mallory".into(),
            resume: false,
            replace: false,
            base_hash: None,
        });
        let begun = a.recv_json("begin", 30);
        assert!(matches!(begun, Response::Ok), "begin: {begun:?}");
        put(&mut a, "input/a.txt", bytes, 0);
        let mut m = Manifest::from_entries(vec![file_entry("input/a.txt", bytes)]);
        m.seal(id, "mallory", "hostile", "init", None);
        let messages = messages.map(<[u8]>::to_vec).unwrap_or_else(|| {
            let mut sm = SyncMessages::default();
            sm.add(m.metadata.as_ref().unwrap());
            sm.to_json_bytes()
        });
        a.send(&Request::Commit {
            snapshot_id: id.into(),
            delta: false,
            prepare: false,
        });
        a.data(&m.to_json_bytes());
        a.data(&messages);
        let r = a.recv_json("commit", 60);
        let needle = if messages.starts_with(b"\xff") {
            "sync-messages"
        } else {
            id
        };
        assert_refused(&r, &[ErrorKind::Protocol, ErrorKind::Corrupt], &[needle]);
        drop(a);
        let mut left = Vec::new();
        paths(d.path(), Path::new("/"), &mut left);
        assert!(
            left.iter().all(|p| p.to_string_lossy().contains("lock")),
            "{id}: a refused init left {left:?}"
        );
    }
}
