//! The repository agent must not trust its client: a hostile client
//! (`hostile/`) speaks the framed protocol to the real `dsg agent` and
//! sends what an honest client never would. Each test checks the answer
//! and the repository on disk afterwards.

mod hostile;
mod support;

use hostile::*;
use support::*;

/// The harness itself: an agent answers `Hello` and ends on `Bye`.
#[test]
fn agent_answers_hello_and_bye() {
    let d = tempfile::tempdir().unwrap();
    let mut a = Agent::spawn(&dsg_bin(), &d.path().join("r"), &[]);
    match a.hello() {
        Response::Hello {
            protocol,
            repo_exists,
            ..
        } => {
            assert_eq!(protocol, PROTOCOL_VERSION);
            assert!(!repo_exists);
        }
        other => panic!("{other:?}"),
    }
    a.send(&Request::Bye);
    assert!(matches!(a.recv_json("bye", 10), Response::Ok));
    a.close_input();
    assert!(a.wait(10).success());
}

/// A repository made by the real `dsg init` of a project holding one
/// file; returns the repository directory and the project directory.
fn init_repo(root: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    make_user_dirs(root);
    let project = root.join("p");
    write_file(&project, "input/a.txt", b"hello");
    let parent = root.join("repos");
    std::fs::create_dir_all(&parent).unwrap();
    let mut c = std::process::Command::new(dsg_bin());
    user_env(&mut c, root)
        .current_dir(&project)
        .args(init_args_for("localhost", &parent, "r", "xfs"));
    let o = run_bounded(c, std::time::Duration::from_secs(60));
    assert_ok(&o, "dsg init");
    (parent.join("r"), project)
}

fn err_of(what: &str, r: Response) -> dsg_repo::protocol::RemoteError {
    match r {
        Response::Err(e) => e,
        other => panic!("{what}: expected an error, got {other:?}"),
    }
}

/// The agent's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Sends a `Commit` (a delta one when `delta`) whose manifest stream, or
/// with `delta` whose stream of dropped paths, is 96 MiB, to an agent
/// limited to 1 MiB. Returns the error and by how much the agent's peak
/// memory grew; checks nothing was committed and the agent stays in step.
fn oversized_commit_stream(delta: bool) -> (dsg_repo::protocol::RemoteError, u64) {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("r");
    let limit = 1 << 20;
    let mut a = Agent::spawn(
        &dsg_bin(),
        &repo,
        &[("DSG_AGENT_MAX_META", &limit.to_string())],
    );
    a.hello();
    a.send(&Request::Begin {
        tx_id: "tx-1".into(),
        base: None,
        user: "hostile".into(),
        resume: false,
        replace: false,
        base_hash: None,
    });
    assert!(matches!(a.recv_json("begin", 10), Response::Ok));
    let before = peak_rss(a.pid());
    a.send(&Request::Commit {
        snapshot_id: "s1".into(),
        delta,
        prepare: false,
    });
    if delta {
        a.data(b"{}");
    }
    // 96 MiB, one frame at a time (the test holds 1 MiB).
    let mut frame = Vec::new();
    write_frame(&mut frame, b'D', &vec![b' '; 1 << 20]).unwrap();
    for _ in 0..96 {
        a.raw(&frame);
    }
    a.data(b"");
    a.data(b"{}");
    let reply = a.recv_json("commit", 60);
    let grown = peak_rss(a.pid()).saturating_sub(before);
    let e = err_of("oversized stream", reply);
    assert!(
        e.message.contains(&limit.to_string()),
        "names the limit: {e:?}"
    );
    assert!(
        !repo.join(".dsg/last-sync.json").exists(),
        "nothing committed"
    );
    // Still in step: the next request gets its own answer.
    assert!(matches!(a.hello(), Response::Hello { .. }));
    (e, grown)
}

/// The streams after `Commit` are held in memory for the commit: past
/// their limit the agent refuses them without holding them, commits
/// nothing, and stays in step for the next request.
#[test]
fn oversized_commit_stream_is_refused_without_holding_it() {
    let (e, grown) = oversized_commit_stream(false);
    assert!(
        grown < 32 << 20,
        "the agent's peak memory grew by {grown} bytes for a refused stream"
    );
    assert_eq!(e.kind, ErrorKind::Protocol, "{e:?}");
    assert!(e.hint.is_some(), "{e:?}");
}

/// A delta commit's list of dropped paths is held in memory too: past the
/// limit it is refused the same way, without holding it.
#[test]
fn oversized_delta_path_list_is_refused_without_holding_it() {
    let (e, grown) = oversized_commit_stream(true);
    assert!(
        grown < 32 << 20,
        "the agent's peak memory grew by {grown} bytes for a refused stream"
    );
    assert_eq!(e.kind, ErrorKind::Protocol, "{e:?}");
    assert!(e.message.contains("dropped paths"), "{e:?}");
}

/// Holds the repository's lock as a writer would, until dropped.
fn hold_lock(repo: &std::path::Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(repo.join(".dsg/lock"))
        .unwrap();
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

/// `GetFiles` while a writer holds the lock: the busy answer arrives
/// after the lock timeout, and the connection goes on.
#[test]
fn get_files_while_locked_answers_busy() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = init_repo(d.path());
    let _lock = hold_lock(&repo);
    let mut a = Agent::spawn(&dsg_bin(), &repo, &[("DSG_LOCK_TIMEOUT", "1")]);
    a.hello();
    a.send(&Request::GetFiles {
        paths: vec!["input/a.txt".into(), "input/b.txt".into()],
    });
    let e = err_of("get_files", a.recv_json("get_files while locked", 10));
    assert_eq!(e.kind, ErrorKind::Busy, "{e:?}");
    assert!(e.hint.is_some(), "{e:?}");
    // One error for all the paths, then the answer's end.
    assert!(matches!(a.recv_json("end of get_files", 10), Response::Ok));
    a.send(&Request::ListArchives);
    assert!(matches!(
        a.recv_json("list after busy", 10),
        Response::Names { .. }
    ));
}

/// End to end: a clone during another client's commit exits 4 (busy)
/// after the lock timeout instead of hanging.
#[test]
fn clone_while_locked_exits_busy() {
    let d = tempfile::tempdir().unwrap();
    let (repo, project) = init_repo(d.path());
    let b = d.path().join("b");
    copy_project_config(&project, &b);
    let _lock = hold_lock(&repo);
    let mut c = std::process::Command::new(dsg_bin());
    user_env(&mut c, d.path())
        .current_dir(&b)
        .env("DSG_LOCK_TIMEOUT", "1")
        .arg("clone");
    let o = run_bounded(c, std::time::Duration::from_secs(10));
    assert_exit(&o, 4, "clone while locked");
}

/// `ReadMeta` of something that is not a regular file costs one error,
/// with or without `unless_hash`, not the connection.
#[test]
fn read_meta_of_a_directory_is_one_error() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = init_repo(d.path());
    // A folder where an archive file would be: refused by its type (the
    // name is one a client may read); `archive/` itself: by its name.
    std::fs::create_dir_all(repo.join(".dsg/archive/s9-sync.json.lz4")).unwrap();
    let mut a = Agent::spawn(&dsg_bin(), &repo, &[]);
    a.hello();
    for (name, unless_hash) in [
        ("archive/", None),
        ("archive/", Some(0)),
        ("archive/s9-sync.json.lz4", None),
        ("archive/s9-sync.json.lz4", Some(0)),
    ] {
        a.send(&Request::ReadMeta {
            name: name.into(),
            unless_hash,
        });
        let e = err_of(name, a.recv_json(name, 10));
        assert!(e.hint.is_some(), "{e:?}");
        assert!(matches!(a.hello(), Response::Hello { .. }));
        a.send(&Request::ListArchives);
        assert!(matches!(
            a.recv_json("list after read_meta", 10),
            Response::Names { .. }
        ));
    }
}
