//! Path safety across the agent protocol (DESIGN §2 G4): the agent refuses
//! paths outside the repository that a client sends (driven directly over
//! the framed protocol, no ssh needed), and the client refuses unsafe paths
//! in what the agent returns (a repository manifest edited on the server,
//! read over ssh).

mod common;
mod ssh_support;
mod support;

use std::fs;
use std::path::Path;

use serde_json::{json, Value};
use ssh_support::*;

/// A repository `s1` made by the real client (local transport) holding
/// `task/input/a.txt`, plus a secret file beside the repository.
fn local_repo(prefix: &str) -> World {
    let w = World::new(prefix, Transport::Local, None);
    w.write("a", "task/input/a.txt", "inside\n");
    w.init("a");
    fs::write(w.repo_parent.join("secret.txt"), "SECRET-BYTES\n").unwrap();
    w
}

fn put_file(a: &mut AgentProc, path: &str, content: &[u8]) {
    a.send(json!({
        "op": "put_file",
        "path": path,
        "size": content.len(),
        "hash": common::xxh3_64(content),
        "mtime_ns": 0,
    }));
    a.send_data(content);
}

fn flush_reply(a: &mut AgentProc) -> Value {
    a.send(json!({"op": "flush"}));
    a.flush();
    a.recv()
}

fn begin(a: &mut AgentProc, tx: &str, base: Option<&str>) {
    a.send(json!({"op": "begin", "tx_id": tx, "base": base, "user": "u"}));
    a.flush();
    let r = a.recv();
    assert_eq!(r["reply"], "ok", "begin {tx}: {r}");
}

#[track_caller]
fn expect_unsafe(r: &Value, what: &str) {
    expect_err(r, what);
    assert_eq!(r["kind"], "unsafe", "{what}: {r}");
}

/// Names under `dir` (recursive), for "nothing was written here" checks.
fn names(dir: &Path) -> Vec<String> {
    walk_all(dir)
        .into_iter()
        .map(|(p, _)| p.strip_prefix(dir).unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn agent_refuses_unsafe_paths_in_uploads() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = tmp.path().join("srv");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&srv).unwrap();
    fs::create_dir_all(&outside).unwrap();
    let abs = outside.join("x");
    let mut a = AgentProc::spawn(&srv.join("repo"));
    let r = a.hello();
    assert_eq!(r["reply"], "hello", "{r}");
    assert_eq!(r["repo_exists"], false, "{r}");

    // A fresh repository (init transaction): a link and a file outside it.
    begin(&mut a, "tx-1", None);
    a.send(json!({"op": "put_link", "path": "../escape", "target": "x"}));
    expect_unsafe(&flush_reply(&mut a), "put_link ../escape");

    begin(&mut a, "tx-2", None);
    put_file(&mut a, abs.to_str().unwrap(), b"hello");
    expect_unsafe(&flush_reply(&mut a), "put_file with an absolute path");

    begin(&mut a, "tx-3", None);
    put_file(&mut a, "task/input/../../../escape2", b"hello");
    expect_unsafe(&flush_reply(&mut a), "put_file with .. components");

    begin(&mut a, "tx-4", None);
    a.send(json!({"op": "put_link", "path": "task/input/l", "target": "../../../escape3"}));
    expect_unsafe(&flush_reply(&mut a), "a link whose target leaves the repo");

    begin(&mut a, "tx-5", None);
    a.send(json!({"op": "put_link", "path": "task/input/l", "target": abs.to_str().unwrap()}));
    expect_unsafe(&flush_reply(&mut a), "a link with an absolute target");

    begin(&mut a, "tx-6", None);
    put_file(&mut a, ".dsg/last-sync.json", b"{}");
    expect_unsafe(&flush_reply(&mut a), "put_file into .dsg/");

    // The agent still answers after the refusals.
    a.send(json!({"op": "bye"}));
    a.flush();
    assert_eq!(a.recv()["reply"], "ok");
    a.finish();

    assert!(
        names(&outside).is_empty(),
        "written outside: {:?}",
        names(&outside)
    );
    for n in ["escape", "escape2", "escape3"] {
        assert!(!tmp.path().join(n).exists() && !srv.join(n).exists(), "{n}");
    }
    let left: Vec<String> = names(&srv)
        .into_iter()
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "left on the server: {left:?}");
}

#[test]
fn agent_refuses_unsafe_paths_in_reads() {
    let w = local_repo("agent-reads");
    let secret = w.repo_parent.join("secret.txt");
    let mut a = AgentProc::spawn(&w.repo());
    assert_eq!(a.hello()["repo_exists"], true);

    for name in [
        "../../etc/passwd",
        "../../secret.txt",
        "/etc/passwd",
        "archive/../../../secret.txt",
        "lock",
    ] {
        a.send(json!({"op": "read_meta", "name": name, "unless_hash": null}));
        a.flush();
        expect_unsafe(&a.recv(), &format!("read_meta {name}"));
    }

    // get_files answers every path in order, then ok; unsafe ones are errors
    // and no bytes of them are sent.
    a.send(json!({"op": "get_files", "paths": [
        "../x",
        "../secret.txt",
        secret.to_str().unwrap(),
        "task/input/a.txt",
        "task/../../secret.txt",
    ]}));
    a.flush();
    for what in ["../x", "../secret.txt", "absolute path"] {
        expect_unsafe(&a.recv(), &format!("get_files {what}"));
    }
    let r = a.recv();
    assert_eq!(r["reply"], "file", "{r}");
    assert_eq!(r["path"], "task/input/a.txt");
    assert_eq!(a.recv_data(), b"inside\n");
    expect_unsafe(&a.recv(), "get_files task/../../secret.txt");
    assert_eq!(a.recv()["reply"], "ok");
    a.finish();
}

/// A client may send a path that is lexically inside the repository but
/// whose parent in the repository is a symlink (here one that really leads
/// to the directory holding the repository). The commit must not write
/// through it.
#[test]
fn agent_refuses_to_write_through_a_symlink_in_the_repository() {
    let w = World::new("agent-through-link", Transport::Local, None);
    w.write("a", "task/input/a.txt", "inside\n");
    w.init("a");
    // up -> the repository root; up2 -> up/.. (lexically task/input, really
    // the directory above the repository). Made on the server by any means
    // (dsg itself refuses such links since they lead out of the project).
    std::os::unix::fs::symlink("../..", w.repo().join("task/input/up")).unwrap();
    std::os::unix::fs::symlink("up/..", w.repo().join("task/input/up2")).unwrap();
    let before_parent = names(&w.repo_parent);

    let mut a = AgentProc::spawn(&w.repo());
    a.hello();
    let head = fs::read(w.repo().join(".dsg/last-sync.json")).unwrap();
    let base = common::Mf::parse(&head);
    let prev_hash = base.metadata["snapshot_hash"].as_str().unwrap().to_string();
    begin(&mut a, "tx-evil", Some("s1"));
    let content = b"written through a symlink\n";
    put_file(&mut a, "task/input/up2/evil.txt", content);
    let r = flush_reply(&mut a);
    if r["reply"] == "ok" {
        let mut m = base.clone();
        m.set_file("task/input/up2/evil.txt", content);
        m.seal("s2", "evil", Some(("s1", &prev_hash)));
        // Sync-messages that record s2, as an honest client's would: the
        // commit must be refused for the path, not for its metadata.
        let mut messages: serde_json::Value =
            serde_json::from_slice(&fs::read(w.repo().join(".dsg/sync-messages.json")).unwrap())
                .unwrap();
        messages["snapshots"]["s2"] = m.metadata.clone();
        a.send(json!({"op": "commit", "snapshot_id": "s2"}));
        a.send_data(&m.to_bytes());
        a.send_data(&serde_json::to_vec(&messages).unwrap());
        a.flush();
        let r = a.recv();
        let escaped = w.repo_parent.join("evil.txt").exists();
        assert!(
            !escaped,
            "the agent wrote {} outside the repository (commit reply {r})",
            w.repo_parent.join("evil.txt").display()
        );
        expect_unsafe(&r, "commit of a file under a symlinked directory");
    }
    a.finish();
    assert_eq!(names(&w.repo_parent), before_parent);
}

/// A symlink whose target is lexically inside the project but really leads
/// out of it through another symlink (`up -> ../..`, `up2 -> up/..`).
#[test]
fn a_link_leading_out_through_another_link_is_refused() {
    let w = World::new("link-chain", Transport::Local, None);
    w.write("a", "task/input/a.txt", "inside\n");
    w.link("a", "task/input/up", "../..");
    w.link("a", "task/input/up2", "up/..");
    let args = w.init_args();
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = w.run("a", &args);
    assert!(
        matches!(o.status.code(), Some(1) | Some(3)),
        "init with a link out of the project must be refused:\n{}",
        show(&o)
    );
    assert!(stderr(&o).contains("task/input/up2"), "{}", show(&o));
    assert!(!w.repo().exists(), "the repository was created");
}

// ------------------------------------------------------------------ client side, over ssh

/// Replaces the repository manifest (on the server's disk) with `m`.
fn write_head(w: &World, m: &common::Mf) {
    m.write(&w.repo().join(".dsg/last-sync.json"));
}

#[test]
fn client_refuses_unsafe_paths_in_the_repository_manifest() {
    let ssh = need_ssh!();
    let w = World::new("client-unsafe", Transport::Ssh, Some(&ssh));
    w.write("a", "task/input/a.txt", "inside\n");
    w.init("a");
    let head_path = w.repo().join(".dsg/last-sync.json");
    let original = fs::read(&head_path).unwrap();
    w.prepare_clone("a", "fresh");
    let outside = w.tmp.path().to_path_buf();

    for bad in ["../x", "/tmp/dsg-abs-x", "task/../../x", "task/input/./x"] {
        let mut m = common::Mf::parse(&original);
        m.set_raw(
            bad,
            common::file_entry(bad, "u", 3, common::FIXED_MTIME, "0123456789abcdef"),
        );
        m.seal("s1", "Initial snapshot", None);
        write_head(&w, &m);
        let before_a = state_listing(&w.client("a"));
        let before_fresh = state_listing(&w.client("fresh"));
        let before_out = names(&outside);
        for (client, args) in [
            ("a", &["status"][..]),
            ("a", &["sync", "-m", "x"][..]),
            ("fresh", &["clone"][..]),
        ] {
            let o = w.run(client, args);
            assert_exit(
                &o,
                1,
                &format!("{args:?} with {bad:?} in the repository manifest"),
            );
            eprintln!("--- {args:?}: {}", stderr(&o).trim_end());
            assert!(
                stderr(&o).contains(bad),
                "{args:?}: the error names {bad:?}:\n{}",
                show(&o)
            );
        }
        assert_same("client a", &before_a, &state_listing(&w.client("a")));
        assert_same(
            "fresh client",
            &before_fresh,
            &state_listing(&w.client("fresh")),
        );
        assert_eq!(before_out, names(&outside), "written beside the clients");
        assert!(!Path::new("/tmp/dsg-abs-x").exists());
        fs::write(&head_path, &original).unwrap();
    }
    w.ok("a", &["status"]);
}

/// A repository manifest in which a path is both a symlink and a directory
/// holding a file (`task/input/l -> ../output` and `task/input/l/x.txt`):
/// the client must not write the file through the link, whether the
/// server's mirror has the link (`server_has_link`) or a real directory.
fn file_under_a_link(ssh: &Ssh, server_has_link: bool) {
    let w = World::new("client-through-link", Transport::Ssh, Some(ssh));
    w.write("a", "task/input/a.txt", "inside\n");
    w.write("a", "task/output/keep.txt", "keep\n");
    w.init("a");
    let head_path = w.repo().join(".dsg/last-sync.json");
    let original = fs::read(&head_path).unwrap();
    let mut m = common::Mf::parse(&original);
    m.set_link("task/input/l", "../output");
    m.set_file("task/input/l/x.txt", b"through\n");
    m.seal("s1", "Initial snapshot", None);
    write_head(&w, &m);
    if server_has_link {
        std::os::unix::fs::symlink("../output", w.repo().join("task/input/l")).unwrap();
        fs::write(w.repo().join("task/output/x.txt"), "through\n").unwrap();
    } else {
        fs::create_dir_all(w.repo().join("task/input/l")).unwrap();
        fs::write(w.repo().join("task/input/l/x.txt"), "through\n").unwrap();
    }

    w.prepare_clone("a", "fresh");
    for (client, args) in [("a", &["sync", "-m", "x"][..]), ("fresh", &["clone"][..])] {
        let before = state_listing(&w.client(client));
        let o = w.run(client, args);
        assert_exit(&o, 1, &format!("{args:?} with a file under a link"));
        eprintln!("--- {args:?}: {}", stderr(&o).trim_end());
        assert!(
            stderr(&o).contains("task/input/l"),
            "{args:?}: the error names the path:\n{}",
            show(&o)
        );
        assert!(
            !w.client(client).join("task/output/x.txt").exists(),
            "{client}: the file was written through the link"
        );
        assert_same(client, &before, &state_listing(&w.client(client)));
    }
}

#[test]
fn client_refuses_a_file_under_a_symlink_in_the_repository_manifest() {
    let ssh = need_ssh!();
    file_under_a_link(&ssh, true);
    file_under_a_link(&ssh, false);
}
