//! History reads (`GetVersions`, `Rehash`) from a hostile client: the real
//! `dsg agent` refuses snapshot ids that are not exactly `s<N>` and paths
//! that leave the tree or enter `.dsg/`, stays in step after each refusal
//! (every `GetVersions` still ends with `Ok`), and serves honest requests
//! on the same connection. Also: an agent of this protocol refuses a client
//! of the previous one.

mod hostile;
mod support;

use hostile::*;
use support::*;

/// A repository made by the real `dsg init` (one file, `input/a.txt` =
/// `hello`) and a second snapshot (`input/a.txt` = `world`).
fn two_snapshots(root: &std::path::Path) -> std::path::PathBuf {
    make_user_dirs(root);
    let project = root.join("p");
    write_file(&project, "input/a.txt", b"hello");
    let parent = root.join("repos");
    std::fs::create_dir_all(&parent).unwrap();
    let run = |args: Vec<String>| {
        let mut c = std::process::Command::new(dsg_bin());
        user_env(&mut c, root).current_dir(&project).args(&args);
        let o = run_bounded(c, std::time::Duration::from_secs(60));
        assert_ok(&o, &format!("dsg {args:?}"));
    };
    run(init_args_for("localhost", &parent, "r", "xfs"));
    write_file(&project, "input/a.txt", b"world");
    run(vec!["sync".into()]);
    parent.join("r")
}

fn err_kind(what: &str, r: Response) -> ErrorKind {
    match r {
        Response::Err(e) => e.kind,
        other => panic!("{what}: expected an error, got {other:?}"),
    }
}

/// A `GetVersions` answer: per path, the file's bytes or the error kind.
fn versions(a: &mut Agent, snapshot: &str, paths: &[&str]) -> Vec<Result<Vec<u8>, ErrorKind>> {
    a.send(&Request::GetVersions {
        snapshot: snapshot.into(),
        paths: paths.iter().map(|p| p.to_string()).collect(),
    });
    let mut out = Vec::new();
    loop {
        match a.recv_json("get_versions", 20) {
            Response::Ok => return out,
            Response::File { kind, .. } if kind == "file" => match a.recv("data", 20) {
                Reply::Data(d) => out.push(Ok(d)),
                other => panic!("expected data, got {other:?}"),
            },
            Response::Err(e) => out.push(Err(e.kind)),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn history_requests_refuse_bad_ids_and_paths_and_stay_in_step() {
    let d = tempfile::tempdir().unwrap();
    let repo = two_snapshots(d.path());
    let before = full_listing(&repo);
    let mut a = Agent::spawn(&dsg_bin(), &repo, &[]);
    a.hello();
    // Bad snapshot ids: one error for the request, then `Ok`.
    for id in [
        "",
        "s0",
        "s01",
        "S1",
        "s1/../s2",
        "../s1",
        "s1 ",
        "head",
        "s-1",
        "s99999999999999999999",
    ] {
        let got = versions(&mut a, id, &["input/a.txt"]);
        assert_eq!(got, vec![Err(ErrorKind::Unsafe)], "snapshot id {id:?}");
    }
    // A snapshot that does not exist.
    assert_eq!(
        versions(&mut a, "s7", &["input/a.txt"]),
        vec![Err(ErrorKind::NotFound)]
    );
    // Paths: each refused alone; the honest ones among them are served.
    let got = versions(
        &mut a,
        "s1",
        &[
            "../r/input/a.txt",
            "input/../../r/input/a.txt",
            "/etc/passwd",
            ".dsg/last-sync.json",
            "input/./a.txt",
            "",
            "input/a.txt",
            "input/nope.txt",
        ],
    );
    let kinds: Vec<_> = got.iter().map(|r| r.as_ref().err().copied()).collect();
    assert_eq!(
        kinds[..6],
        [Some(ErrorKind::Unsafe); 6],
        "unsafe paths refused: {got:?}"
    );
    assert_eq!(got[6], Ok(b"hello".to_vec()), "s1's version, from objects");
    assert_eq!(got[7], Err(ErrorKind::NotFound));
    assert_eq!(
        versions(&mut a, "s2", &["input/a.txt"]),
        vec![Ok(b"world".to_vec())]
    );
    // Rehash: bad ids refused, a real one answered.
    for id in ["s0", "../s1", "s1/../../x", "head"] {
        a.send(&Request::Rehash {
            snapshot: id.into(),
        });
        assert_eq!(
            err_kind(id, a.recv_json("rehash", 20)),
            ErrorKind::Unsafe,
            "{id:?}"
        );
    }
    a.send(&Request::Rehash {
        snapshot: "s1".into(),
    });
    match a.recv_json("rehash s1", 20) {
        Response::Rehashed(r) => {
            assert_eq!(r.snapshot_id, "s1");
            assert_eq!(r.files, 1);
            assert_eq!(r.problem_count, 0, "{r:?}");
        }
        other => panic!("{other:?}"),
    }
    a.send(&Request::Bye);
    assert!(matches!(a.recv_json("bye", 10), Response::Ok));
    a.close_input();
    assert!(a.wait(10).success());
    // Reading changed nothing in the repository.
    assert_eq!(full_listing(&repo), before);
}

/// A planted symlink in the tree is not followed out of it by a history
/// read of the head.
#[test]
fn history_reads_do_not_follow_a_symlinked_parent() {
    let d = tempfile::tempdir().unwrap();
    let repo = two_snapshots(d.path());
    std::fs::create_dir_all(d.path().join("outside/input")).unwrap();
    std::fs::write(d.path().join("outside/input/a.txt"), b"secret").unwrap();
    let input = repo.join("input");
    std::fs::rename(&input, repo.join("input.real")).unwrap();
    std::os::unix::fs::symlink(d.path().join("outside/input"), &input).unwrap();
    let mut a = Agent::spawn(&dsg_bin(), &repo, &[]);
    a.hello();
    let got = versions(&mut a, "s2", &["input/a.txt"]);
    assert_eq!(got, vec![Err(ErrorKind::Unsafe)]);
}

/// The handshake refuses the previous protocol (5, without `Prune`),
/// naming both versions.
#[test]
fn the_previous_protocol_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut a = Agent::spawn(&dsg_bin(), &d.path().join("r"), &[]);
    a.send(&Request::Hello {
        protocol: PROTOCOL_VERSION - 1,
        client_version: "old".into(),
    });
    match a.recv_json("hello", 10) {
        Response::Err(e) => {
            assert_eq!(e.kind, ErrorKind::Protocol);
            assert!(
                e.message
                    .contains(&format!("speaks {}", PROTOCOL_VERSION - 1))
                    && e.message.contains(&format!("speaks {PROTOCOL_VERSION}")),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(PROTOCOL_VERSION, 8);
}
