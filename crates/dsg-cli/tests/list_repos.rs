//! `dsg list-repos`: the repositories in the configured directory
//! (`default_host`, `default_project_path` of dsg.yml) or the given one,
//! compared field by field with the head manifests on disk — on a local
//! directory (xfs), a ZFS pool's datasets, and over SSH. And the agent's
//! restriction: a forced `dsg agent --restrict-to DIR` lists DIR and
//! refuses any other directory (by path or through a symlink).
//!
//! Kinds: `lists_what_is_on_disk` on xfs, zfs, ssh; the restriction tests
//! on a local directory behind a stand-in for ssh that runs the agent as
//! sshd runs a forced command (`SSH_ORIGINAL_COMMAND`).

mod world;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::{json, Value};
use world::*;

/// What list-repos must report for the repository at `dir`, from its head
/// manifest on disk.
fn expected_from_disk(dir: &Path, kind: &str) -> Value {
    let m = read_json(&dir.join(".dsg/last-sync.json"));
    let entries = m["entries"].as_object().expect("entries");
    let size: u64 = entries
        .values()
        .filter(|e| e["type"] == "file")
        .map(|e| e["filesize"].as_u64().unwrap())
        .sum();
    assert_eq!(
        m["metadata"]["entry_count"].as_u64(),
        Some(entries.len() as u64),
        "entry_count of {}",
        dir.display()
    );
    json!({
        "name": dir.file_name().unwrap().to_str().unwrap(),
        "type": kind,
        "status": "active",
        "snapshot_id": m["metadata"]["snapshot_id"],
        "timestamp": m["metadata"]["created_at"],
        "file_count": entries.len(),
        "size": size,
        "error": null,
    })
}

fn by_name(v: &Value) -> BTreeMap<String, Value> {
    v["result"]["repositories"]
        .as_array()
        .unwrap_or_else(|| panic!("no repositories in {v}"))
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

/// `init_args` with another repository name.
fn init_args_named(w: &World, name: &str) -> Vec<String> {
    let mut a = w.init_args();
    let i = a.iter().position(|x| x == "--repo-name").unwrap();
    a[i + 1] = name.to_string();
    a
}

fn set_defaults(w: &World, host: &str, path: &Path) {
    let cfg = w.tmp.path().join("cfg/dsg.yml");
    let mut text = fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "default_host: {host}\ndefault_project_path: {}\n",
        path.display()
    ));
    fs::write(&cfg, text).unwrap();
}

fn lists_what_is_on_disk(kind: Kind) {
    let w = world_or_skip!(kind, "lsrepos");
    w.write("A", &p(IN, "a.txt"), "alpha");
    w.write("A", &p(IN, "sub/b.bin"), vec![7u8; 12345]);
    w.link("A", &p(IN, "to_a"), "a.txt");
    w.init("A");
    w.write("A", &p(OUT, "c.txt"), "gamma, the second snapshot");
    w.ok("A", &["sync", "-m", "second"]);
    let parent = w.repo_parent.clone();
    let type_name = if kind == Kind::Zfs { "zfs" } else { "xfs" };
    let mut want = BTreeMap::new();
    want.insert(
        w.repo_name.clone(),
        expected_from_disk(&w.repo(), type_name),
    );
    if kind != Kind::Zfs {
        // A second repository in the same directory (zfs: one dataset per
        // world).
        w.write("B", &p(IN, "only.txt"), "another project");
        let args = init_args_named(&w, "second");
        w.ok("B", &args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        want.insert(
            "second".into(),
            expected_from_disk(&parent.join("second"), "xfs"),
        );
    }
    // Not repositories, or not listed: a plain folder, a hidden one, a
    // symlink to the repository; an uninitialised one is listed as such.
    fs::create_dir_all(parent.join("plain/input")).unwrap();
    fs::create_dir_all(parent.join(".hidden/.dsg")).unwrap();
    std::os::unix::fs::symlink(w.repo(), parent.join("alias")).unwrap();
    fs::create_dir_all(parent.join("uninit/.dsg")).unwrap();
    want.insert(
        "uninit".into(),
        json!({"name": "uninit", "type": "xfs", "status": "uninitialized", "snapshot_id": null,
               "timestamp": null, "file_count": null, "size": null, "error": null}),
    );

    // From the defaults in dsg.yml.
    set_defaults(&w, &w.host(), &parent);
    let o = w.ok("A", &["list-repos", "--json"]);
    let v = json_of(&o);
    assert_eq!(v["result"]["host"], json!(w.host()), "{v}");
    assert_eq!(v["result"]["path"], json!(parent.to_str().unwrap()), "{v}");
    let got = by_name(&v);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, exp) in &want {
        assert_eq!(&got[name], exp, "[{}] repository {name}", kind.label());
    }
    // The table names each repository with its head and file count.
    let text = stdout(&w.ok("A", &["list-repos"]));
    for (name, exp) in &want {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
        if let Some(s) = exp["snapshot_id"].as_str() {
            assert!(line.contains(s), "{line}");
            assert!(line.ends_with(&exp["file_count"].to_string()), "{line}");
        }
    }
    // --repo-path overrides the default: an empty directory lists nothing.
    let empty = w.tmp.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    if kind != Kind::Ssh {
        let v = json_of(&w.ok(
            "A",
            &[
                "list-repos",
                "--json",
                "--repo-path",
                empty.to_str().unwrap(),
            ],
        ));
        assert_eq!(v["result"]["repositories"], json!([]), "{v}");
    }
}

per_kind!(lists_what_is_on_disk: xfs, zfs, ssh);

#[test]
fn without_a_configured_path_nothing_is_listed_and_bad_values_are_refused() {
    let w = World::new(Kind::Xfs, "lsrepos-cfg").unwrap();
    let o = w.ok("A", &["list-repos", "--json"]);
    assert_eq!(json_of(&o)["result"]["repositories"], json!([]));
    let cfg = w.tmp.path().join("cfg/dsg.yml");
    let good = fs::read_to_string(&cfg).unwrap();
    for bad in [
        "default_project_path: relative/dir\n",
        "default_project_path: /srv/../etc\n",
        "default_project_path: [1, 2]\n",
        "default_host: '-oProxyCommand=x'\ndefault_project_path: /srv\n",
    ] {
        fs::write(&cfg, format!("{good}{bad}")).unwrap();
        let o = w.run("A", &["list-repos"]);
        assert_exit(&o, 1, bad);
        assert!(stderr(&o).contains("default_"), "{bad}: {}", show(&o));
    }
    // Personal fields are not needed to list.
    fs::write(
        &cfg,
        format!("default_project_path: {}\n", w.repo_parent.display()),
    )
    .unwrap();
    w.ok("A", &["list-repos"]);
}

/// A stand-in for ssh that runs the remote command the way sshd runs a
/// key's forced command: `dsg agent --restrict-to ALLOWED`, with the
/// client's command in SSH_ORIGINAL_COMMAND.
fn forced_ssh(w: &World, allowed: &Path) -> String {
    let script = w.tmp.path().join("forced-ssh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n# args: [options] -T -- HOST COMMAND\nfor last; do :; done\n\
             SSH_ORIGINAL_COMMAND=\"$last\" exec '{}' agent --restrict-to '{}'\n",
            dsg_bin().display(),
            allowed.display()
        ),
    )
    .unwrap();
    format!("sh {}", script.display())
}

#[test]
fn a_restricted_agent_lists_only_its_directories() {
    let w = World::new(Kind::Xfs, "lsrepos-restrict").unwrap();
    w.write("A", &p(IN, "a.txt"), "alpha");
    w.init("A");
    let allowed = w.repo_parent.clone();
    // Another repository outside the allowed directory.
    let outside = World::new(Kind::Xfs, "lsrepos-outside").unwrap();
    outside.write("X", &p(IN, "secret.txt"), "not yours");
    outside.init("X");
    std::os::unix::fs::symlink(&outside.repo_parent, allowed.join("escape")).unwrap();
    // A link to the outside repository itself: not followed by the listing.
    std::os::unix::fs::symlink(outside.repo(), allowed.join("leak")).unwrap();
    let ssh = forced_ssh(&w, &allowed);
    let bin = dsg_bin();
    let run = |path: &Path| {
        let mut c = w.command(
            "A",
            &[
                "list-repos",
                "--json",
                "--host",
                "fakehost",
                "--repo-path",
                path.to_str().unwrap(),
            ],
        );
        c.env("DSG_SSH_COMMAND", &ssh)
            .env("DSG_REMOTE_DSG", &bin)
            .output()
            .unwrap()
    };
    // The allowed directory: its repository, not the symlinked ones.
    let o = run(&allowed);
    assert_ok(&o, "list-repos of the allowed directory");
    let got = by_name(&json_of(&o));
    assert_eq!(
        got,
        BTreeMap::from([(w.repo_name.clone(), expected_from_disk(&w.repo(), "xfs"))]),
    );
    // Outside, directly or through the symlink: refused, nothing listed.
    for path in [outside.repo_parent.clone(), allowed.join("escape")] {
        let o = run(&path);
        assert_exit(&o, 1, &format!("list-repos of {}", path.display()));
        let out = show(&o);
        assert!(!out.contains("\"repositories\""), "{out}");
        assert!(!out.contains("secret"), "{out}");
        assert!(
            out.contains("allowed") || out.contains("restrict") || out.contains("outside"),
            "the refusal should say why: {out}"
        );
    }
}
