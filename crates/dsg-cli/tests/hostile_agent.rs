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
