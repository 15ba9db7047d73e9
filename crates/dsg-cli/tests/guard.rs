//! The mass-deletion guard, in both directions: a sync that would delete
//! more than half of the tracked files (`--max-delete`, default 50 %), or
//! every file of a data folder, on either side stops with exit 3 before
//! changing anything, says how many and where, and `--max-delete 100`
//! lets it through. `status` and `--dry-run` show the same refusal.

mod world;

use std::fs;

use world::*;

/// 10 files in task/input, 2 in task/output, synced by A and cloned by
/// B; both users on the default limit (the test worlds turn it off).
fn twelve_files(z: &World) {
    for i in 0..10 {
        z.write("A", &p(IN, &format!("f{i}.txt")), format!("file {i}"));
    }
    z.write("A", &p(OUT, "r1.txt"), "r1");
    z.write("A", &p(OUT, "r2.txt"), "r2");
    z.init("A");
    z.clone_client("A", "B");
    let cfg = z.client("A").parent().unwrap().join("cfg/dsg.yml");
    let text = fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("max_delete: 100\n"), "{text}");
    fs::write(&cfg, text.replace("max_delete: 100\n", "")).unwrap();
}

fn error_of(o: &std::process::Output) -> serde_json::Value {
    json_of(o)
}

fn a_published_folder_deletion_stops_until_allowed(kind: Kind) {
    let z = world_or_skip!(kind, "guardpub");
    twelve_files(&z);
    z.remove("A", OUT);
    let repo_before = state_listing(&z.repo());
    let a_before = state_listing(&z.client("A"));

    // Two of twelve files, but the whole of task/output.
    for args in [&["sync", "--json"][..], &["sync", "--dry-run", "--json"]] {
        let o = z.run("A", args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", show(&o));
        let e = error_of(&o);
        let msg = e["error"].as_str().unwrap();
        assert!(
            msg.contains("delete 2 tracked files of 12") && msg.contains("in the repository"),
            "{e:#}"
        );
        assert_eq!(e["paths"], serde_json::json!([format!("{OUT}/")]), "{e:#}");
        assert!(
            e["hint"].as_str().unwrap().contains("--max-delete 100"),
            "{e:#}"
        );
    }
    let v = json_of(&z.ok("A", &["status", "--json"]));
    assert_eq!(
        v["blocked"]["paths"],
        serde_json::json!([format!("{OUT}/")]),
        "{v:#}"
    );
    assert_same("repository", &repo_before, &state_listing(&z.repo()));
    assert_same("A", &a_before, &state_listing(&z.client("A")));

    z.ok("A", &["sync", "--max-delete", "100"]);
    assert!(!z.repo().join(p(OUT, "r1.txt")).exists());
    assert!(z.repo().join(p(IN, "f0.txt")).exists());
    z.assert_clean("A");
}

fn a_received_mass_deletion_stops_until_allowed(kind: Kind) {
    let z = world_or_skip!(kind, "guardrecv");
    twelve_files(&z);
    // B deletes 7 of the 12 files (58 %), on purpose.
    for i in 0..7 {
        z.remove("B", &p(IN, &format!("f{i}.txt")));
    }
    let o = z.run("B", &["sync"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    z.ok("B", &["sync", "--max-delete", "60"]);
    assert!(!z.repo().join(p(IN, "f0.txt")).exists());

    let a_before = state_listing(&z.client("A"));
    let o = z.run("A", &["sync", "--json"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    let e = error_of(&o);
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.contains("delete 7 tracked files of 12 (58.3 %) here"),
        "{e:#}"
    );
    assert_eq!(e["paths"].as_array().unwrap().len(), 7, "{e:#}");
    assert_same("A", &a_before, &state_listing(&z.client("A")));
    // A limit above the share lets it through; the files go.
    let o = z.run("A", &["sync", "--max-delete", "58"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    z.ok("A", &["sync", "--max-delete", "59"]);
    assert!(!z.client("A").join(p(IN, "f0.txt")).exists());
    assert!(z.client("A").join(p(IN, "f9.txt")).exists());
    z.assert_clean("A");
}

/// Under the limit nothing stops; the user's `max_delete` is the default
/// that `--max-delete` overrides.
fn the_limit_comes_from_the_user_config(kind: Kind) {
    let z = world_or_skip!(kind, "guardcfg");
    twelve_files(&z);
    for i in 0..4 {
        z.remove("A", &p(IN, &format!("f{i}.txt")));
    }
    // 4 of 12 (33 %): under the default.
    let cfg = z.client("A").parent().unwrap().join("cfg/dsg.yml");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(&cfg, format!("{text}max_delete: 30\n")).unwrap();
    let o = z.run("A", &["sync"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "over the user's 30 %: {}",
        show(&o)
    );
    z.ok("A", &["sync", "--max-delete", "50"]);
    assert!(!z.repo().join(p(IN, "f0.txt")).exists());
    fs::write(&cfg, format!("{text}max_delete: 101\n")).unwrap();
    let o = z.run("A", &["status"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(stderr(&o).contains("max_delete"), "{}", show(&o));
}

per_kind!(
    a_published_folder_deletion_stops_until_allowed: xfs, zfs, ssh, s3;
    a_received_mass_deletion_stops_until_allowed: xfs, ssh, s3;
    the_limit_comes_from_the_user_config: xfs;
);
