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

/// The streams after `Commit` are held in memory for the commit: past
/// their limit the agent refuses them without holding them, commits
/// nothing, and stays in step for the next request.
#[test]
fn oversized_commit_stream_is_refused_without_holding_it() {
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
    });
    // 96 MiB of "manifest", one frame at a time (the test holds 1 MiB).
    let mut frame = Vec::new();
    write_frame(&mut frame, b'D', &vec![b' '; 1 << 20]).unwrap();
    for _ in 0..96 {
        a.raw(&frame);
    }
    a.data(b"");
    a.data(b"{}");
    let reply = a.recv_json("commit", 60);
    let grown = peak_rss(a.pid()).saturating_sub(before);
    assert!(
        grown < 32 << 20,
        "the agent's peak memory grew by {grown} bytes for a refused stream"
    );
    let e = err_of("oversized manifest", reply);
    assert_eq!(e.kind, ErrorKind::Protocol, "{e:?}");
    assert!(
        e.message.contains(&limit.to_string()),
        "names the limit: {e:?}"
    );
    assert!(e.hint.is_some(), "{e:?}");
    assert!(
        !repo.join(".dsg/last-sync.json").exists(),
        "nothing committed"
    );
    // Still in step: the next request gets its own answer.
    assert!(matches!(a.hello(), Response::Hello { .. }));
}
