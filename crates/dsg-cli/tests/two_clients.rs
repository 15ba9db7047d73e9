//! Two clients sharing one repository, on xfs, zfs and s3: changes flow both
//! ways (edit, add, delete, file <-> symlink), and a conflict blocks with
//! exit 3 and changes nothing on either side nor in the repository (on zfs:
//! nor in the pool). Concurrent syncs: `sync_concurrency.rs`.

mod world;

use std::fs;

use world::*;

fn base(z: &World) {
    z.write("A", &p(IN, "shared.txt"), "v0");
    z.write("A", &p(IN, "del_by_a.txt"), "a will delete");
    z.write("A", &p(IN, "del_by_b.txt"), "b will delete");
    z.write("A", &p(IN, "f2l_by_a"), "a makes this a link");
    z.write("A", &p(OUT, "res/r.txt"), "r0");
    z.link("A", &p(IN, "l2f_by_b"), "shared.txt");
    z.init("A");
    z.clone_client("A", "B");
}

/// Both clients and the repository hold the same tracked tree, the caches
/// are the head, the repository is sound (zfs: the dataset too).
#[track_caller]
fn assert_converged(z: &World, ctx: &str) -> u64 {
    let n = z.assert_repo_sound(ctx);
    let repo = tracked(&data_tree(&z.repo()));
    let head = fs::read(z.repo().join(".dsg/last-sync.json")).unwrap();
    for c in ["A", "B"] {
        assert_same(
            &format!("{ctx}: {c} vs repository"),
            &repo,
            &tracked(&data_tree(&z.client(c))),
        );
        assert_eq!(
            fs::read(z.client(c).join(".dsg/last-sync.json")).unwrap(),
            head,
            "{ctx}: {c}'s cache vs head"
        );
        z.assert_clean(c);
        assert_no_leftovers(&z.client(c));
    }
    n
}

fn changes_flow_both_ways(kind: Kind) {
    let z = world_or_skip!(kind, "both");
    base(&z);
    assert_eq!(assert_converged(&z, "after clone"), 1);

    // A: edit, add, delete, file -> symlink.
    z.write("A", &p(IN, "shared.txt"), "v1 by A");
    z.write("A", &p(IN, "from_a/new.txt"), "new by A");
    z.remove("A", &p(IN, "del_by_a.txt"));
    z.remove("A", &p(IN, "f2l_by_a"));
    z.link("A", &p(IN, "f2l_by_a"), "shared.txt");
    z.ok("A", &["sync", "-m", "A"]);
    let rows = z.status_rows("B");
    assert!(
        rows.iter()
            .all(|r| r.2 == "download" || r.2 == "delete_local"),
        "B sees only A's changes: {rows:?}"
    );
    z.ok("B", &["sync"]);
    assert_eq!(assert_converged(&z, "after A -> B"), 2);
    assert_eq!(z.read("B", &p(IN, "shared.txt")), b"v1 by A");
    assert!(!z.client("B").join(p(IN, "del_by_a.txt")).exists());
    assert_eq!(
        fs::read_link(z.client("B").join(p(IN, "f2l_by_a"))).unwrap(),
        std::path::Path::new("shared.txt")
    );

    // B: edit, add, delete (the last file of a dir), symlink -> file.
    z.write("B", &p(IN, "shared.txt"), "v2 by B");
    z.write("B", &p(IN, "from_b/x.bin"), bytes(11, 70_000));
    z.remove("B", &p(IN, "del_by_b.txt"));
    z.remove("B", &p(OUT, "res"));
    z.remove("B", &p(IN, "l2f_by_b"));
    z.write("B", &p(IN, "l2f_by_b"), "a file now");
    z.ok("B", &["sync", "-m", "B"]);
    z.ok("A", &["sync"]);
    assert_eq!(assert_converged(&z, "after B -> A"), 3);
    assert_eq!(z.read("A", &p(IN, "l2f_by_b")), b"a file now");
    assert!(!z.client("A").join(p(OUT, "res")).exists());
    assert_eq!(assert_chain(&z.repo()), 3);

    // Both change different files, sync in turn: one snapshot each.
    z.write("A", &p(IN, "from_a/new.txt"), "A again");
    z.write("B", &p(IN, "from_b/y.txt"), "B again");
    z.ok("A", &["sync"]);
    z.ok("B", &["sync"]);
    z.ok("A", &["sync"]);
    assert_eq!(assert_converged(&z, "after both"), 5);
}

fn conflicts_block_with_exit_3_and_change_nothing(kind: Kind) {
    let z = world_or_skip!(kind, "conf");
    base(&z);
    // Same file edited on both sides; one side deletes what the other edits.
    z.write("B", &p(IN, "shared.txt"), "B's edit");
    z.write("B", &p(IN, "del_by_a.txt"), "B edits what A deletes");
    z.write("B", &p(IN, "b_only.txt"), "unrelated");
    z.ok("B", &["sync"]);
    z.write("A", &p(IN, "shared.txt"), "A's edit");
    z.remove("A", &p(IN, "del_by_a.txt"));
    z.write("A", &p(IN, "a_only.txt"), "unrelated too");

    let repo_before = z.repo_listing();
    let a_before = state_listing(&z.client("A"));
    let snaps_before = z.snapshots();
    let all_before = (kind == Kind::Zfs).then(|| z.zfs().all_snapshots());
    let o = z.run("A", &["sync"]);
    assert_eq!(o.status.code(), Some(3), "a conflict blocks: {}", show(&o));
    let rows = z.status_rows("A");
    for path in ["shared.txt", "del_by_a.txt"] {
        assert!(
            rows.iter().any(|r| r.0 == p(IN, path) && r.2 == "conflict"),
            "{path} is a conflict: {rows:?}"
        );
    }
    assert_same("repository", &repo_before, &z.repo_listing());
    let mut a_after = state_listing(&z.client("A"));
    assert!(
        a_after.remove("conflicts.txt").is_some(),
        "the blocked sync wrote conflicts.txt"
    );
    a_after.remove(".");
    let mut a_before = a_before;
    a_before.remove(".");
    assert_same("client A", &a_before, &a_after);
    assert_eq!(z.snapshots(), snaps_before, "no snapshot");
    if let Some(all_before) = all_before {
        assert_eq!(z.zfs().all_snapshots(), all_before);
    }
    z.assert_repo_sound("after the blocked sync");

    // Resolve (take B's version, keep the deletion undone) and sync.
    z.write("A", &p(IN, "shared.txt"), "B's edit");
    z.write("A", &p(IN, "del_by_a.txt"), "B edits what A deletes");
    z.ok("A", &["sync"]);
    assert!(
        !z.client("A").join("conflicts.txt").exists(),
        "a sync with no conflict left removes the stale conflicts.txt"
    );
    z.ok("B", &["sync"]);
    assert_eq!(assert_converged(&z, "after resolving"), 3);
}

per_kind!(
    changes_flow_both_ways: xfs, zfs, s3;
    conflicts_block_with_exit_3_and_change_nothing: xfs, zfs, s3;
);
