//! Conflict resolution on every repository kind: a blocked sync writes
//! `conflicts.txt` (the original's layout, one block per file with the
//! choices its state offers), `sync --continue` settles each file as
//! chosen inside one sync (a new snapshot; local and repository
//! byte-identical; local files a choice replaces kept as
//! `<name>~<time>~`), and every malformed or incomplete resolution changes
//! nothing.

mod world;

use std::collections::BTreeMap;
use std::fs;

use world::*;

/// A's view after B synced: four conflicts, one of each kind the table
/// has, and one unrelated change on each side.
///
/// | file        | A (local)       | last sync | repository (B) | state |
/// |-------------|-----------------|-----------|----------------|-------|
/// | shared.txt  | A's edit        | v0        | B's edit       | 111   |
/// | gone.txt    | deleted         | g0        | B's edit       | 011   |
/// | kept.txt    | A's edit        | k0        | deleted        | 110   |
/// | both.txt    | A's new file    | –         | B's new file   | 101   |
fn four_conflicts(z: &World) {
    z.write("A", &p(IN, "shared.txt"), "v0");
    z.write("A", &p(IN, "gone.txt"), "g0");
    z.write("A", &p(IN, "kept.txt"), "k0");
    z.write("A", &p(OUT, "calm.txt"), "c0");
    z.init("A");
    z.clone_client("A", "B");
    z.write("B", &p(IN, "shared.txt"), "B's edit");
    z.write("B", &p(IN, "gone.txt"), "B's edit of gone");
    z.remove("B", &p(IN, "kept.txt"));
    z.write("B", &p(IN, "both.txt"), "B's both");
    z.write("B", &p(OUT, "from_b.txt"), "unrelated B");
    z.ok("B", &["sync", "-m", "B"]);
    z.write("A", &p(IN, "shared.txt"), "A's edit");
    z.remove("A", &p(IN, "gone.txt"));
    z.write("A", &p(IN, "kept.txt"), "A's edit of kept");
    z.write("A", &p(IN, "both.txt"), "A's both");
    z.write("A", &p(OUT, "from_a.txt"), "unrelated A");
}

/// `conflicts.txt` parsed the simple way a test can trust: file -> the
/// option letters offered, in order.
fn offered(text: &str) -> BTreeMap<String, Vec<char>> {
    let mut out: BTreeMap<String, Vec<char>> = BTreeMap::new();
    let mut cur = None;
    for l in text.lines() {
        if let Some(f) = l.strip_prefix("# File: ") {
            cur = Some(f.to_string());
            out.insert(f.to_string(), Vec::new());
        } else if let (Some(f), Some(rest)) = (&cur, l.strip_prefix('_')) {
            out.get_mut(f).unwrap().push(rest.chars().next().unwrap());
        }
    }
    out
}

/// Keeps `choice` (a letter) for each file: the underscore removed, the
/// comment kept, the other option lines deleted — the instructions,
/// followed literally.
fn choose(text: &str, choices: &[(&str, char)]) -> String {
    let mut out = String::new();
    let mut cur = String::new();
    for l in text.lines() {
        if let Some(f) = l.strip_prefix("# File: ") {
            cur = f.to_string();
        }
        if let Some(rest) = l.strip_prefix('_') {
            let want = choices.iter().find(|(f, _)| p(IN, f) == cur).map(|c| c.1);
            if want == rest.chars().next() {
                out.push_str(rest);
                out.push('\n');
            }
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

fn head_id(z: &World) -> String {
    z.head()["metadata"]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A plain sync blocks on the conflicts (exit 3); what it wrote to
/// conflicts.txt.
fn blocked_conflicts(z: &World) -> String {
    assert_eq!(z.run("A", &["sync"]).status.code(), Some(3));
    fs::read_to_string(conflicts_txt(z, "A")).unwrap()
}

/// Writes `text` back to conflicts.txt with `choices` made.
fn write_choices(z: &World, text: &str, choices: &[(&str, char)]) {
    fs::write(conflicts_txt(z, "A"), choose(text, choices)).unwrap();
}

fn conflicts_txt(z: &World, c: &str) -> std::path::PathBuf {
    z.client(c).join("conflicts.txt")
}

/// Backups beside `rel` in client `c`: (name, bytes).
fn backups_of(z: &World, c: &str, rel: &str) -> Vec<(String, Vec<u8>)> {
    let path = z.client(c).join(rel);
    let dir = path.parent().unwrap();
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(&format!("{name}~")) && n.ends_with('~'))
        .map(|n| {
            let b = fs::read(dir.join(&n)).unwrap();
            (n, b)
        })
        .collect();
    v.sort();
    v
}

fn continue_settles_each_file_as_chosen(kind: Kind) {
    let z = world_or_skip!(kind, "cfl");
    four_conflicts(&z);
    let repo_before = z.repo_listing();
    let a_data_before = data_tree(&z.client("A"));
    let snaps = z.snapshots();
    assert_eq!(head_id(&z), "s2");

    let o = z.run("A", &["sync"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    let text = fs::read_to_string(conflicts_txt(&z, "A")).expect("conflicts.txt written");
    assert!(text.starts_with("# DSG Conflict Resolution\n# Generated: "));
    assert!(text.contains("\n# Backup on conflict: enabled\n"), "{text}");
    assert!(text.contains("run 'dsg sync --continue'"), "{text}");
    let got = offered(&text);
    let mut want: BTreeMap<String, Vec<char>> = BTreeMap::new();
    want.insert(p(IN, "gone.txt"), vec!['R', 'C']);
    want.insert(p(IN, "kept.txt"), vec!['L', 'C']);
    assert_eq!(got.len(), 4, "{text}");
    for (f, w) in &want {
        assert_eq!(&got[f], w, "{f}: {text}");
    }
    let mut s = got[&p(IN, "shared.txt")].clone();
    s.sort();
    assert_eq!(s, vec!['C', 'L', 'R'], "{text}");
    let mut b = got[&p(IN, "both.txt")].clone();
    b.sort();
    assert_eq!(b, vec!['L', 'R'], "{text}");
    // Blocks sorted by path.
    let order: Vec<&String> = got.keys().collect();
    let in_text: Vec<usize> = order
        .iter()
        .map(|f| text.find(f.as_str()).unwrap())
        .collect();
    assert!(in_text.windows(2).all(|w| w[0] < w[1]), "{text}");

    // status --json: each conflict row with its reason and the choices
    // conflicts.txt offers.
    let v = json_of(&z.ok("A", &["status", "--json"]));
    let rows: Vec<&serde_json::Value> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "conflict")
        .collect();
    assert_eq!(rows.len(), 4, "{v:#}");
    for r in rows {
        let f = r["path"].as_str().unwrap();
        let choices: Vec<char> = r["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().chars().next().unwrap())
            .collect();
        assert_eq!(choices, got[f], "{f}: {v:#}");
        assert!(text.contains(&format!(
            "# File: {f}\n# Conflict: {}\n",
            r["reason"].as_str().unwrap()
        )));
    }

    // Blocked: nothing but conflicts.txt changed anywhere.
    assert_same("repository", &repo_before, &z.repo_listing());
    let mut a_after = data_tree(&z.client("A"));
    a_after.remove("conflicts.txt");
    assert_same("A's data", &a_data_before, &a_after);
    assert_eq!(z.snapshots(), snaps);

    // Untouched file: two option lines under one header.
    let o = z.run("A", &["sync", "--continue"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("line "),
        "{}",
        show(&o)
    );
    assert_same("repository", &repo_before, &z.repo_listing());
    assert_eq!(z.snapshots(), snaps);

    // One file left without a choice: refused, naming it.
    let partial = choose(
        &text,
        &[("shared.txt", 'L'), ("gone.txt", 'R'), ("kept.txt", 'L')],
    );
    fs::write(conflicts_txt(&z, "A"), &partial).unwrap();
    let o = z.run("A", &["sync", "--continue", "--json"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    let e = json_of(&o);
    assert_eq!(e["paths"], serde_json::json!([p(IN, "both.txt")]), "{e:#}");
    assert_same("repository", &repo_before, &z.repo_listing());

    // A choice the conflict does not offer (C for a file with no last sync).
    let bad = choose(
        &text,
        &[
            ("shared.txt", 'L'),
            ("gone.txt", 'R'),
            ("kept.txt", 'L'),
            ("both.txt", 'R'),
        ],
    )
    .lines()
    .scan(String::new(), |file, l| {
        if let Some(f) = l.strip_prefix("# File: ") {
            *file = f.to_string();
        }
        let both = *file == p(IN, "both.txt");
        Some(if both && l.starts_with('R') {
            "C  # Use Cached version (restore)\n".to_string()
        } else {
            format!("{l}\n")
        })
    })
    .collect::<String>();
    assert!(bad.contains("\nC  # Use Cached"), "{bad}");
    fs::write(conflicts_txt(&z, "A"), &bad).unwrap();
    let o = z.run("A", &["sync", "--continue"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert_same("repository", &repo_before, &z.repo_listing());

    // The real choices: shared L, gone R, kept L, both R.
    write_choices(
        &z,
        &text,
        &[
            ("shared.txt", 'L'),
            ("gone.txt", 'R'),
            ("kept.txt", 'L'),
            ("both.txt", 'R'),
        ],
    );
    let o = z.run("A", &["sync", "--continue", "-m", "settled"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!conflicts_txt(&z, "A").exists(), "conflicts.txt removed");
    assert_eq!(head_id(&z), "s3", "one new snapshot on B's s2");
    let read_repo = |f: &str| fs::read(z.repo().join(p(IN, f))).ok();
    assert_eq!(read_repo("shared.txt").as_deref(), Some(&b"A's edit"[..]));
    assert_eq!(
        read_repo("kept.txt").as_deref(),
        Some(&b"A's edit of kept"[..])
    );
    assert_eq!(
        read_repo("gone.txt").as_deref(),
        Some(&b"B's edit of gone"[..])
    );
    assert_eq!(read_repo("both.txt").as_deref(), Some(&b"B's both"[..]));
    assert_eq!(z.read("A", &p(IN, "gone.txt")), b"B's edit of gone");
    assert_eq!(z.read("A", &p(IN, "both.txt")), b"B's both");
    // The unrelated changes went through in the same sync.
    assert_eq!(z.read("A", &p(OUT, "from_b.txt")), b"unrelated B");
    assert!(z.repo().join(p(OUT, "from_a.txt")).is_file());
    // Only the file R replaced here was backed up, with its bytes.
    let bk = backups_of(&z, "A", &p(IN, "both.txt"));
    assert_eq!(bk.len(), 1, "{bk:?}");
    assert_eq!(bk[0].1, b"A's both");
    assert!(
        dsg_core::names::is_conflict_backup_name(&bk[0].0),
        "{}",
        bk[0].0
    );
    for f in ["shared.txt", "kept.txt", "gone.txt"] {
        assert!(backups_of(&z, "A", &p(IN, f)).is_empty(), "{f}");
    }
    // Backups are never tracked: status is clean, the repository lacks them.
    z.assert_clean("A");
    assert!(!z.repo().join(p(IN, &bk[0].0)).exists());
    assert_no_leftovers(&z.client("A"));
    z.ok("B", &["sync"]);
    z.assert_clean("B");
    let mut a = tracked(&data_tree(&z.client("A")));
    a.retain(|k, _| !dsg_core::names::is_conflict_backup_name(k));
    assert_same("A vs B", &a, &tracked(&data_tree(&z.client("B"))));
    z.assert_repo_sound("after --continue");
    // The backup stays through later syncs.
    z.ok("A", &["sync"]);
    assert_eq!(backups_of(&z, "A", &p(IN, "both.txt")).len(), 1);
}

/// `--continue` with nothing to continue, and with choices for files that
/// are no longer in conflict: refused, nothing changed; a stale file with
/// no conflict left is removed and the sync goes on.
fn continue_refuses_what_it_cannot_settle(kind: Kind) {
    let z = world_or_skip!(kind, "cfr");
    four_conflicts(&z);
    let o = z.run("A", &["sync", "--continue"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("conflicts.txt not found"),
        "{}",
        show(&o)
    );
    assert!(!conflicts_txt(&z, "A").exists());

    let text = blocked_conflicts(&z);
    // Settled by hand meanwhile: A takes B's versions of two files.
    z.write("A", &p(IN, "shared.txt"), "B's edit");
    z.write("A", &p(IN, "both.txt"), "B's both");
    let all = choose(
        &text,
        &[
            ("shared.txt", 'L'),
            ("gone.txt", 'R'),
            ("kept.txt", 'L'),
            ("both.txt", 'R'),
        ],
    );
    fs::write(conflicts_txt(&z, "A"), &all).unwrap();
    let repo_before = z.repo_listing();
    let o = z.run("A", &["sync", "--continue", "--json"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    let e = json_of(&o);
    let mut extra: Vec<String> = e["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    extra.sort();
    assert_eq!(extra, vec![p(IN, "both.txt"), p(IN, "shared.txt")], "{e:#}");
    assert_same("repository", &repo_before, &z.repo_listing());
    assert!(conflicts_txt(&z, "A").exists(), "kept for the user to fix");

    // Everything settled by hand: --continue says so, removes the stale
    // file and syncs normally.
    z.write("A", &p(IN, "gone.txt"), "B's edit of gone");
    z.remove("A", &p(IN, "kept.txt"));
    let o = z.run("A", &["sync", "--continue"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("conflicts.txt was stale"),
        "{}",
        show(&o)
    );
    assert!(!conflicts_txt(&z, "A").exists());
    z.assert_clean("A");
    assert!(!z.repo().join(p(IN, "kept.txt")).exists());
}

/// With `backup_on_conflict: false` a replaced file is not kept.
fn no_backup_when_switched_off(kind: Kind) {
    let z = world_or_skip!(kind, "cfb");
    four_conflicts(&z);
    let cfg = z.client("A").parent().unwrap().join("cfg/dsg.yml");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(&cfg, format!("{text}\nbackup_on_conflict: false\n")).unwrap();
    let text = blocked_conflicts(&z);
    assert!(
        text.contains("\n# Backup on conflict: disabled\n"),
        "{text}"
    );
    write_choices(
        &z,
        &text,
        &[
            ("shared.txt", 'R'),
            ("gone.txt", 'R'),
            ("kept.txt", 'L'),
            ("both.txt", 'R'),
        ],
    );
    z.ok("A", &["sync", "--continue"]);
    assert_eq!(z.read("A", &p(IN, "shared.txt")), b"B's edit");
    for f in ["shared.txt", "both.txt"] {
        assert!(backups_of(&z, "A", &p(IN, f)).is_empty(), "{f}");
    }
    z.assert_clean("A");
}

/// C restores the last-synced version on both sides, read back from the
/// repository's history: over a local edit (111), of a file deleted here
/// (011) and of one deleted in the repository (110).
fn choice_c_restores_the_last_synced_version(kind: Kind) {
    let z = world_or_skip!(kind, "cfc");
    four_conflicts(&z);
    let text = blocked_conflicts(&z);
    write_choices(
        &z,
        &text,
        &[
            ("shared.txt", 'C'),
            ("gone.txt", 'C'),
            ("kept.txt", 'C'),
            ("both.txt", 'L'),
        ],
    );
    let o = z.run("A", &["sync", "--continue", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let v = json_of(&o);
    let mut restores: Vec<String> = v["result"]["restores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    restores.sort();
    assert_eq!(
        restores,
        vec![p(IN, "gone.txt"), p(IN, "kept.txt"), p(IN, "shared.txt")],
        "{v:#}"
    );
    for (f, want) in [("shared.txt", "v0"), ("gone.txt", "g0"), ("kept.txt", "k0")] {
        assert_eq!(z.read("A", &p(IN, f)), want.as_bytes(), "{f} here");
        assert_eq!(
            fs::read(z.repo().join(p(IN, f))).unwrap(),
            want.as_bytes(),
            "{f} in the repository"
        );
    }
    assert_eq!(
        fs::read(z.repo().join(p(IN, "both.txt"))).unwrap(),
        b"A's both"
    );
    // Local files the restore replaced were kept; gone.txt had none.
    assert_eq!(backups_of(&z, "A", &p(IN, "shared.txt"))[0].1, b"A's edit");
    assert_eq!(
        backups_of(&z, "A", &p(IN, "kept.txt"))[0].1,
        b"A's edit of kept"
    );
    assert!(backups_of(&z, "A", &p(IN, "gone.txt")).is_empty());
    assert!(backups_of(&z, "A", &p(IN, "both.txt")).is_empty());
    z.assert_clean("A");
    z.ok("B", &["sync"]);
    z.assert_clean("B");
    assert_eq!(z.read("B", &p(IN, "kept.txt")), b"k0");
    z.assert_repo_sound("after restoring");
}

/// A choice is never applied to content the user did not see: a file
/// edited here, or changed again in the repository, after conflicts.txt
/// was written is refused by name; a plain sync then keeps the edited
/// choices instead of overwriting them.
fn continue_refuses_a_file_changed_since(kind: Kind) {
    let z = world_or_skip!(kind, "cfx");
    four_conflicts(&z);
    let text = blocked_conflicts(&z);
    let good = choose(
        &text,
        &[
            ("shared.txt", 'R'),
            ("gone.txt", 'R'),
            ("kept.txt", 'L'),
            ("both.txt", 'R'),
        ],
    );
    fs::write(conflicts_txt(&z, "A"), &good).unwrap();
    // A edits shared.txt again; B changes both.txt again.
    z.write("A", &p(IN, "shared.txt"), "A's second edit");
    z.write("B", &p(IN, "both.txt"), "B's both, again");
    z.ok("B", &["sync", "-m", "B again"]);
    let repo_before = z.repo_listing();
    let o = z.run("A", &["sync", "--continue", "--json"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    let e = json_of(&o);
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("changed since conflicts.txt was written"),
        "{e:#}"
    );
    assert_eq!(
        e["paths"],
        serde_json::json!([p(IN, "both.txt"), p(IN, "shared.txt")]),
        "{e:#}"
    );
    assert_same("repository", &repo_before, &z.repo_listing());
    assert_eq!(z.read("A", &p(IN, "shared.txt")), b"A's second edit");
    // A plain sync keeps the user's choices.
    let o = z.run("A", &["sync"]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(
        stderr(&o).contains("already holds your choices"),
        "{}",
        show(&o)
    );
    assert_eq!(fs::read_to_string(conflicts_txt(&z, "A")).unwrap(), good);
    // Deleted, it is written afresh for what is there now.
    fs::remove_file(conflicts_txt(&z, "A")).unwrap();
    assert_eq!(z.run("A", &["sync"]).status.code(), Some(3));
    let fresh = fs::read_to_string(conflicts_txt(&z, "A")).unwrap();
    let good = choose(
        &fresh,
        &[
            ("shared.txt", 'L'),
            ("gone.txt", 'R'),
            ("kept.txt", 'L'),
            ("both.txt", 'R'),
        ],
    );
    fs::write(conflicts_txt(&z, "A"), &good).unwrap();
    z.ok("A", &["sync", "--continue"]);
    assert_eq!(
        fs::read(z.repo().join(p(IN, "shared.txt"))).unwrap(),
        b"A's second edit"
    );
    assert_eq!(z.read("A", &p(IN, "both.txt")), b"B's both, again");
    z.assert_clean("A");
}

per_kind!(
    continue_refuses_a_file_changed_since: xfs, ssh, s3;
    choice_c_restores_the_last_synced_version: xfs, zfs, ssh, s3;
    continue_settles_each_file_as_chosen: xfs, zfs, ssh, s3;
    continue_refuses_what_it_cannot_settle: xfs, zfs, ssh, s3;
    no_backup_when_switched_off: xfs;
);
