//! The pure normalisation planner (spec §4.2/§4.3, redesigned per §8 item 14).

use std::collections::BTreeSet;

use dsg_core::names::{plan_normalization, validate_path, NormalizePlan, Rename};
use proptest::prelude::*;

fn plan(paths: &[&str]) -> NormalizePlan {
    let owned: Vec<String> = paths.iter().map(|s| s.to_string()).collect();
    plan_normalization(&owned)
}

fn rn(from: &str, to: &str, is_dir: bool) -> Rename {
    Rename {
        from: from.into(),
        to: to.into(),
        is_dir,
    }
}

/// Renames of a single invalid file, checking nothing else was reported.
fn fixed_name(name: &str) -> String {
    let p = plan(&[name]);
    assert!(p.unfixable.is_empty() && p.conflicts.is_empty(), "{p:?}");
    assert_eq!(p.renames.len(), 1, "{p:?}");
    assert_eq!(p.renames[0].from, name);
    p.renames[0].to.clone()
}

#[test]
fn valid_tree_gives_empty_plan() {
    let p = plan(&[
        "input/a.csv",
        "input/sub/b.csv",
        "bad:name.txt",
        "a/.valid/path",
    ]);
    assert!(p.is_empty(), "{p:?}");
    assert!(plan(&[]).is_empty());
}

#[test]
fn every_needed_fix_is_applied() {
    assert_eq!(fixed_name("CON"), "CON_renamed");
    assert_eq!(fixed_name("CON.txt"), "CON_renamed.txt");
    assert_eq!(fixed_name("aux.tar.gz"), "aux_renamed.tar.gz");
    assert_eq!(fixed_name("nul."), "nul_renamed.");
    assert_eq!(fixed_name("notes.txt~"), "notes.txt");
    assert_eq!(fixed_name("~lock.csv"), "lock.csv");
    assert_eq!(fixed_name("a<b>|c.csv"), "a_b__c.csv");
    assert_eq!(fixed_name("x\u{1}y"), "x_y");
    assert_eq!(fixed_name(" padded.csv\u{a0}"), "padded.csv");
    assert_eq!(fixed_name("zero\u{200b}width\u{202e}.csv"), "zerowidth.csv");
    assert_eq!(fixed_name("del\u{7f}.csv"), "del.csv");
    assert_eq!(fixed_name("cafe\u{301}.csv"), "caf\u{e9}.csv");
    // Several problems in one name: all fixed, not just the first.
    assert_eq!(fixed_name(" ~CON.txt~ "), "CON_renamed.txt");
    assert_eq!(fixed_name("aux.tar.gz~"), "aux_renamed.tar.gz");
    assert_eq!(fixed_name("prn\u{200b} "), "prn_renamed");
}

#[test]
fn over_long_names_are_truncated_keeping_the_extension() {
    let long = format!("{}.csv", "a".repeat(300));
    let to = fixed_name(&long);
    assert_eq!(to.len(), 255);
    assert!(to.ends_with(".csv"));

    let multi = format!("{}.txt", "\u{e9}".repeat(200)); // 404 bytes, 2-byte chars
    let to = fixed_name(&multi);
    assert!(to.len() <= 255, "{}", to.len());
    assert!(to.ends_with(".txt"));
    assert!(validate_path(&to).is_ok());
}

#[test]
fn directory_is_renamed_once_as_a_unit() {
    let p = plan(&[
        "input/cafe\u{301}/a.csv",
        "input/cafe\u{301}/b.csv",
        "input/cafe\u{301}/sub/c.csv",
    ]);
    assert_eq!(
        p.renames,
        vec![rn("input/cafe\u{301}", "input/caf\u{e9}", true)]
    );
    assert!(p.unfixable.is_empty() && p.conflicts.is_empty());
}

#[test]
fn parents_first_and_children_use_the_new_parent_path() {
    let p = plan(&[
        "CON/x~/y.txt",
        "CON/x~/z.txt",
        "CON/ok.txt",
        "CON/bad\u{200b}.txt",
        "z~",
    ]);
    assert_eq!(
        p.renames,
        vec![
            rn("CON", "CON_renamed", true),
            rn("CON_renamed/bad\u{200b}.txt", "CON_renamed/bad.txt", false),
            rn("CON_renamed/x~", "CON_renamed/x", true),
            rn("z~", "z", false),
        ]
    );
    // Whatever the order within a level, no rename may come before its parent's.
    for (i, r) in p.renames.iter().enumerate() {
        for later in &p.renames[i + 1..] {
            assert!(
                !r.from.starts_with(&format!("{}/", later.to)),
                "{r:?} before its parent {later:?}"
            );
        }
    }
}

#[test]
fn collision_between_two_sources() {
    let p = plan(&["d/a~", "d/~a", "d/other.csv"]);
    assert!(p.renames.is_empty(), "{p:?}");
    let sources: BTreeSet<&str> = p.conflicts.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(sources, BTreeSet::from(["d/a~", "d/~a"]));
    let msg = &p.conflicts.iter().find(|(s, _)| s == "d/a~").unwrap().1;
    assert!(msg.contains("'a'") && msg.contains("'d/~a'"), "{msg}");
}

#[test]
fn collision_with_an_existing_file() {
    let p = plan(&["d/a.csv~", "d/a.csv", "d/b~"]);
    assert_eq!(p.renames, vec![rn("d/b~", "d/b", false)]);
    assert_eq!(p.conflicts.len(), 1);
    assert_eq!(p.conflicts[0].0, "d/a.csv~");
    assert!(
        p.conflicts[0].1.contains("already exists"),
        "{:?}",
        p.conflicts
    );
}

#[test]
fn collision_with_an_existing_directory_prefix() {
    // `x` exists only as the directory of `x/g`.
    let p = plan(&["x~/f", "x/g"]);
    assert!(p.renames.is_empty(), "{p:?}");
    assert_eq!(p.conflicts.len(), 1);
    assert_eq!(p.conflicts[0].0, "x~");
    assert!(p.conflicts[0].1.contains("nothing below it was planned"));
}

#[test]
fn nfd_and_nfc_twins_conflict() {
    let p = plan(&["cafe\u{301}.csv", "caf\u{e9}.csv"]);
    assert!(p.renames.is_empty());
    assert_eq!(p.conflicts.len(), 1);
    assert_eq!(p.conflicts[0].0, "cafe\u{301}.csv");
}

#[test]
fn conflicting_directory_blocks_its_subtree() {
    // The dir cannot be renamed, so its invalid child is not planned either:
    // a destination below an invalid dir could never validate.
    let p = plan(&["a~/b~", "a/x"]);
    assert!(p.renames.is_empty(), "{p:?}");
    assert_eq!(p.conflicts.len(), 1);
    assert_eq!(p.conflicts[0].0, "a~");
}

#[test]
fn unfixable_names_are_reported_with_the_reason() {
    let p = plan(&["ok/~~~", "ok/\u{200b}", "\u{e9}:", "/abs/CON", "d/.\\x"]);
    assert!(p.renames.is_empty(), "{p:?}");
    let got: BTreeSet<&str> = p.unfixable.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        got,
        BTreeSet::from(["ok/~~~", "ok/\u{200b}", "\u{e9}:", "/abs/CON", "d/.\\x"])
    );
    let reason = |k: &str| p.unfixable.iter().find(|(s, _)| s == k).unwrap().1.clone();
    assert!(reason("ok/~~~").contains("Temporary/backup file '~~~'"));
    assert!(reason("\u{e9}:").contains("root or drive-only"));
    assert!(reason("/abs/CON").contains("not a plain relative path"));
}

#[test]
fn unfixable_directory_is_reported_once() {
    let p = plan(&["~/a.csv", "~/b~", "~/c.csv"]);
    assert!(p.renames.is_empty(), "{p:?}");
    assert_eq!(p.unfixable.len(), 1, "{p:?}");
    assert_eq!(p.unfixable[0].0, "~");
    assert!(p.unfixable[0].1.contains("nothing below it was planned"));
}

#[test]
fn duplicate_inputs_are_harmless() {
    let p = plan(&["a~", "a~", "/x~", "/x~"]);
    assert_eq!(p.renames, vec![rn("a~", "a", false)]);
    assert_eq!(p.unfixable.len(), 1);
}

/// Apply a plan to a list of paths the way `rename(2)` would, checking each
/// source exists and each destination is free at that moment.
fn simulate(paths: &[String], plan: &NormalizePlan) -> Vec<String> {
    let mut cur: Vec<String> = paths.to_vec();
    let exists = |cur: &[String], p: &str| {
        cur.iter()
            .any(|q| q == p || q.starts_with(&format!("{p}/")))
    };
    for r in &plan.renames {
        assert!(exists(&cur, &r.from), "source {:?} missing", r.from);
        assert!(!exists(&cur, &r.to), "destination {:?} taken", r.to);
        let prefix = format!("{}/", r.from);
        let mut moved_dir = false;
        for q in cur.iter_mut() {
            if *q == r.from {
                *q = r.to.clone();
            } else if let Some(rest) = q.strip_prefix(&prefix) {
                *q = format!("{}/{}", r.to, rest);
                moved_dir = true;
            }
        }
        assert_eq!(moved_dir, r.is_dir, "{r:?}");
    }
    cur
}

fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b.csv".to_string()),
        Just("CON".to_string()),
        Just("con.txt".to_string()),
        Just("CON_renamed".to_string()),
        Just("aux.tar.gz".to_string()),
        Just("a~".to_string()),
        Just("~a".to_string()),
        Just(" a".to_string()),
        Just("a\u{200b}".to_string()),
        Just("cafe\u{301}".to_string()),
        Just("caf\u{e9}".to_string()),
        Just("x<y".to_string()),
        Just("~".to_string()),
        Just("C:".to_string()),
        Just("\u{e9}:".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just(String::new()),
        Just(".\\x".to_string()),
        Just("a\\CON".to_string()),
        Just("x".repeat(300)),
        Just(format!("{}.csv", "\u{e9}".repeat(140))),
        "[a-c~. ]{1,4}",
        any::<String>(),
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec(component(), 1..4).prop_map(|v| v.join("/")),
        1 => any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn plan_is_total_sound_and_complete(paths in prop::collection::vec(path(), 0..12)) {
        let p = plan_normalization(&paths);

        // Every destination is valid.
        for r in &p.renames {
            prop_assert!(validate_path(&r.to).is_ok(), "{:?}: {:?}", r, validate_path(&r.to));
        }

        // Only paths that are themselves plain relpaths take part, and the
        // plan is executable in order.
        let plain: Vec<String> = paths
            .iter()
            .filter(|p| !p.is_empty() && p.split('/').all(|c| !c.is_empty() && c != "." && c != ".."))
            .cloned()
            .collect();
        let after = simulate(&plain, &p);

        // Every path is valid afterwards, or it (or a directory above it) was reported.
        let reported: Vec<&str> = p.unfixable.iter().chain(&p.conflicts).map(|(s, _)| s.as_str()).collect();
        let covered = |orig: &str| reported.iter().any(|r| orig == *r || orig.starts_with(&format!("{r}/")));
        for (orig, now) in plain.iter().zip(&after) {
            prop_assert!(validate_path(now).is_ok() || covered(orig), "{orig:?} -> {now:?} unreported; {p:?}");
        }
        for odd in paths.iter().filter(|q| !plain.contains(q)) {
            prop_assert!(validate_path(odd).is_ok() || covered(odd), "{odd:?} unreported");
        }

        // Planning again after applying finds nothing more to rename.
        let again = plan_normalization(&after);
        prop_assert!(again.renames.is_empty(), "second plan {:?}", again.renames);
    }
}
