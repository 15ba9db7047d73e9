//! Applying a normalisation plan on a real directory tree.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use dsg_core::names::{
    apply_normalization, plan_normalization, NormalizeFailure, NormalizePlan, Rename,
};

/// Relpaths of every file and symlink under `root`, not following symlinks
/// (what the scanner feeds the planner).
fn scan(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(root, &e.path(), out);
            } else {
                let rel = e.path().strip_prefix(root).unwrap().to_owned();
                out.push(rel.to_str().unwrap().to_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, content).unwrap();
}

fn rn(from: &str, to: &str, is_dir: bool) -> Rename {
    Rename {
        from: from.into(),
        to: to.into(),
        is_dir,
    }
}

#[cfg(unix)]
#[test]
fn plan_and_apply_on_disk() {
    use std::os::unix::fs::symlink;

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let nfd = "cafe\u{301}";
    let nfc = "caf\u{e9}";
    write(root, &format!("input/{nfd}/a.csv"), "alpha");
    write(root, &format!("input/{nfd}/b.csv"), "beta");
    write(root, "input/CON/x.txt", "ex");
    write(root, "input/notes.txt~", "notes");
    write(root, "input/good.txt", "good");
    symlink("good.txt", root.join("input/link~")).unwrap();
    // A link to a directory: must be renamed as a link, not followed.
    symlink("CON", root.join("input/dirlink~")).unwrap();

    let before = scan(root);
    let plan = plan_normalization(&before);
    // Planning is pure: nothing changed on disk.
    assert_eq!(scan(root), before);
    assert!(
        plan.unfixable.is_empty() && plan.conflicts.is_empty(),
        "{plan:?}"
    );
    let expected = vec![
        rn("input/CON", "input/CON_renamed", true),
        rn(&format!("input/{nfd}"), &format!("input/{nfc}"), true),
        rn("input/dirlink~", "input/dirlink", false),
        rn("input/link~", "input/link", false),
        rn("input/notes.txt~", "input/notes.txt", false),
    ];
    assert_eq!(plan.renames, expected);

    let done = apply_normalization(root, &plan).unwrap();
    assert_eq!(done, expected);

    let input = root.join("input");
    assert_eq!(
        names_in(&input),
        BTreeSet::from(
            [
                "CON_renamed",
                nfc,
                "dirlink",
                "link",
                "notes.txt",
                "good.txt"
            ]
            .map(String::from)
        )
    );
    // The NFD directory moved as a unit: both files inside, none left behind.
    assert_eq!(
        names_in(&input.join(nfc)),
        BTreeSet::from(["a.csv".to_string(), "b.csv".to_string()])
    );
    assert_eq!(
        fs::read_to_string(input.join(nfc).join("a.csv")).unwrap(),
        "alpha"
    );
    assert_eq!(
        fs::read_to_string(input.join(nfc).join("b.csv")).unwrap(),
        "beta"
    );
    assert_eq!(
        fs::read_to_string(input.join("CON_renamed/x.txt")).unwrap(),
        "ex"
    );
    assert_eq!(
        fs::read_to_string(input.join("notes.txt")).unwrap(),
        "notes"
    );

    // Links are still links with their original targets.
    for (name, target) in [("link", "good.txt"), ("dirlink", "CON")] {
        let p = input.join(name);
        assert!(fs::symlink_metadata(&p).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_link(&p).unwrap(), Path::new(target));
    }
    assert_eq!(fs::read_to_string(input.join("link")).unwrap(), "good");

    // The tree is now clean.
    assert!(plan_normalization(&scan(root)).is_empty());
}

#[test]
fn stops_at_first_failure_and_names_both_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(root, "a~", "A");
    write(root, "b~", "B");
    write(root, "b", "existing");
    write(root, "c~", "C");
    // A stale plan: `b` appeared after planning.
    let plan = NormalizePlan {
        renames: vec![
            rn("a~", "a", false),
            rn("b~", "b", false),
            rn("c~", "c", false),
        ],
        ..Default::default()
    };
    let err = apply_normalization(root, &plan).unwrap_err();
    assert_eq!((err.from.as_str(), err.to.as_str()), ("b~", "b"));
    assert!(matches!(err.reason, NormalizeFailure::DestinationExists));
    let msg = err.to_string();
    assert!(msg.contains("'b~'") && msg.contains("'b'"), "{msg}");
    assert_eq!(err.done, vec![rn("a~", "a", false)]);
    // Nothing was overwritten and nothing after the failure was attempted.
    assert_eq!(fs::read_to_string(root.join("b")).unwrap(), "existing");
    assert_eq!(fs::read_to_string(root.join("b~")).unwrap(), "B");
    assert!(root.join("c~").exists() && !root.join("c").exists());
    assert_eq!(fs::read_to_string(root.join("a")).unwrap(), "A");
}

#[test]
fn missing_source_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = NormalizePlan {
        renames: vec![rn("gone~", "gone", false)],
        ..Default::default()
    };
    let err = apply_normalization(tmp.path(), &plan).unwrap_err();
    assert!(matches!(err.reason, NormalizeFailure::Source(_)), "{err}");
    assert!(err.done.is_empty());
}

#[test]
fn creates_missing_parent_directory() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "f~", "F");
    let plan = NormalizePlan {
        renames: vec![rn("f~", "new/dir/f", false)],
        ..Default::default()
    };
    apply_normalization(tmp.path(), &plan).unwrap();
    assert_eq!(
        fs::read_to_string(tmp.path().join("new/dir/f")).unwrap(),
        "F"
    );
}

#[test]
fn refuses_paths_outside_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    write(&root, "x~", "X");
    for (from, to) in [
        ("x~", "../x"),
        ("x~", "/tmp/x"),
        ("../root/x~", "x"),
        ("x~", ""),
    ] {
        let plan = NormalizePlan {
            renames: vec![rn(from, to, false)],
            ..Default::default()
        };
        let err = apply_normalization(&root, &plan).unwrap_err();
        assert!(
            matches!(err.reason, NormalizeFailure::NotRelative),
            "{from} -> {to}: {err}"
        );
    }
    assert!(root.join("x~").exists());
    assert!(!tmp.path().join("x").exists());
}

#[cfg(unix)]
#[test]
fn hard_link_destination_is_not_mistaken_for_an_alias() {
    // Same inode but unrelated names: a real, distinct destination. (rename(2)
    // between two links of one file would silently do nothing.)
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "a~", "A");
    fs::hard_link(tmp.path().join("a~"), tmp.path().join("b")).unwrap();
    let plan = NormalizePlan {
        renames: vec![rn("a~", "b", false)],
        ..Default::default()
    };
    let err = apply_normalization(tmp.path(), &plan).unwrap_err();
    assert!(
        matches!(err.reason, NormalizeFailure::DestinationExists),
        "{err}"
    );
    assert!(tmp.path().join("a~").exists());
}
