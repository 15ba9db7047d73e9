//! Review probes of the streamed commit check: a large base (more entries
//! than the helper thread's channel holds) with uploads that stop the walk
//! early; links; none may hang or be accepted wrongly.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use dsg_core::config::RepoType;
use dsg_core::hash::Hash;
use dsg_core::manifest::{write_json, Entry, Manifest};

mod support;
use support::*;

const N: usize = 9000;

fn big_repo(dir: &Path) -> (PathBuf, Manifest) {
    let root = dir.join("repos/r");
    std::fs::create_dir_all(dir.join("repos")).unwrap();
    let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
    b.begin("tx-init", None, None, "t").unwrap();
    let mut entries = Vec::new();
    for i in 0..N {
        let p = format!("d{:02}/f{:05}", i % 7, i);
        stage(&mut *b, &p, p.as_bytes());
        entries.push(file(&p, p.as_bytes()));
    }
    b.stage_link("l", "d00").unwrap();
    entries.push(link("l", "d00"));
    let m = sealed("s1", entries, None);
    commit_json(&mut *b, "s1", m.to_json_bytes()).unwrap();
    (root, m)
}

/// Runs `f` on a thread, failing if it takes over a minute (a hang).
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the commit check hung")
}

fn sync(
    root: PathBuf,
    staged: Vec<(String, Vec<u8>)>,
    links: Vec<(String, String)>,
    json: Vec<u8>,
) -> Result<(), String> {
    within(move || {
        let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
        b.begin("tx-1", Some("s1"), None, "t").unwrap();
        for (p, d) in &staged {
            let mut r = &d[..];
            b.stage_file(p, d.len() as u64, Hash::of_bytes(d).0, 0, 0, &mut r)
                .map_err(|e| format!("STAGE {e}"))?;
        }
        for (p, t) in &links {
            b.stage_link(p, t).unwrap();
        }
        commit_json(&mut *b, "s2", json).map_err(|e| e.to_string())
    })
}

#[test]
fn early_stops_of_the_walk_do_not_hang_with_a_big_base() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = big_repo(d.path());
    // Out of order at the second entry: the walk stops, the reader is
    // blocked on its full channel.
    let m = sealed("s2", s1.entries().to_vec(), Some(&s1));
    let mut rev: Vec<Entry> = m.entries().to_vec();
    rev.swap(0, 1);
    let md = dsg_core::manifest::Metadata {
        entries_hash: dsg_core::manifest::entries_hash_of(&rev),
        ..m.metadata.clone().unwrap()
    };
    let mut json = Vec::new();
    write_json(&mut json, &rev, Some(&md)).unwrap();
    let e = sync(root.clone(), vec![], vec![], json).unwrap_err();
    assert!(e.contains("path order"), "{e}");
    // Cut short (a parse error after a few entries).
    let mut json = m.to_json_bytes();
    json.truncate(3000);
    let e = sync(root.clone(), vec![], vec![], json).unwrap_err();
    assert!(e.contains("uploaded manifest"), "{e}");
    // A valid commit dropping most of the base.
    let keep: Vec<Entry> = s1.entries()[..10].to_vec();
    let m = sealed("s2", keep, Some(&s1));
    sync(root.clone(), vec![], vec![], m.to_json_bytes()).unwrap();
    let head = Manifest::load(&root.join(".dsg/last-sync.json")).unwrap();
    assert_eq!(head.len(), 10);
}

#[test]
fn an_entry_staged_under_an_unchanged_link_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (root, s1) = big_repo(d.path());
    let before = std::fs::read(root.join(".dsg/last-sync.json")).unwrap();
    let mut entries: Vec<Entry> = s1.entries().to_vec();
    entries.push(file("l/x", b"x"));
    let m = sealed("s2", entries, Some(&s1));
    let r = sync(
        root.clone(),
        vec![("l/x".into(), b"x".to_vec())],
        vec![],
        m.to_json_bytes(),
    );
    assert!(r.is_err(), "accepted an entry under a link");
    // A link staged where the base has a folder the manifest keeps.
    let mut entries: Vec<Entry> = s1.entries().to_vec();
    entries.push(link("d01", "d00"));
    let m = sealed("s2", entries, Some(&s1));
    let r = sync(
        root.clone(),
        vec![],
        vec![("d01".into(), "d00".into())],
        m.to_json_bytes(),
    );
    assert!(r.is_err(), "accepted a link over a kept folder");
    assert_eq!(
        std::fs::read(root.join(".dsg/last-sync.json")).unwrap(),
        before
    );
}

/// Randomised: the streamed check accepts exactly what the old
/// whole-manifest rules accept, and an accepted commit lands exactly.
#[test]
fn streamed_check_equals_the_old_rules() {
    use std::collections::BTreeMap;
    const POOL: [&str; 8] = ["a", "b", "b/c", "b/d", "b.txt", "b-x/y", "c/e/f", "z"];
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let content = |p: &str, v: u64| format!("{p}#{v}").into_bytes();
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..300 {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repos/r");
        std::fs::create_dir_all(d.path().join("repos")).unwrap();
        // A base without shape conflicts: "b" only when no "b/…".
        let mut base: BTreeMap<&str, u64> = BTreeMap::new();
        for p in POOL {
            if rnd(2) == 0 {
                base.insert(p, rnd(2));
            }
        }
        if base.contains_key("b") && (base.contains_key("b/c") || base.contains_key("b/d")) {
            base.remove("b");
        }
        let mut b = dsg_repo::open(RepoType::Xfs, &root, None).unwrap();
        b.begin("tx-init", None, None, "t").unwrap();
        for (p, v) in &base {
            stage(&mut *b, p, &content(p, *v));
        }
        let s1 = sealed(
            "s1",
            base.iter().map(|(p, v)| file(p, &content(p, *v))).collect(),
            None,
        );
        commit_json(&mut *b, "s1", s1.to_json_bytes()).unwrap();
        drop(b);
        let mut staged: BTreeMap<&str, u64> = BTreeMap::new();
        let mut upload: BTreeMap<&str, u64> = BTreeMap::new();
        for p in POOL {
            match rnd(12) {
                0 => {}
                1 => {
                    staged.insert(p, rnd(3));
                }
                2..=4 => {
                    let v = rnd(3);
                    staged.insert(p, v);
                    upload.insert(p, if rnd(12) == 0 { v + 1 } else { v });
                }
                _ => {
                    if let Some(v) = base.get(p) {
                        upload.insert(p, if rnd(15) == 0 { v + 1 } else { *v });
                    } else if rnd(4) == 0 {
                        upload.insert(p, 0);
                    }
                }
            }
        }
        let new = sealed(
            "s2",
            upload
                .iter()
                .map(|(p, v)| file(p, &content(p, *v)))
                .collect(),
            Some(&s1),
        );
        // The old rules.
        let old_ok = new.check_shape().is_ok()
            && upload.iter().all(|(p, v)| match staged.get(p) {
                Some(s) => s == v,
                None => base.get(p) == Some(v),
            })
            && staged.keys().all(|p| upload.contains_key(p));
        let r = sync(
            root.clone(),
            staged
                .iter()
                .map(|(p, v)| (p.to_string(), content(p, *v)))
                .collect(),
            vec![],
            new.to_json_bytes(),
        );
        if r.as_ref().is_err_and(|e| e.starts_with("STAGE")) {
            continue;
        }
        assert_eq!(
            r.is_ok(),
            old_ok,
            "case {case}: base {base:?} staged {staged:?} upload {upload:?}: {r:?}"
        );
        if r.is_ok() {
            accepted += 1;
            for (p, v) in &upload {
                assert_eq!(
                    std::fs::read(root.join(p)).unwrap(),
                    content(p, *v),
                    "case {case} {p}"
                );
            }
            for p in POOL {
                if !upload.contains_key(p) {
                    let m = std::fs::symlink_metadata(root.join(p));
                    assert!(
                        m.map_or(true, |m| m.is_dir()),
                        "case {case}: {p} left behind"
                    );
                }
            }
        } else {
            refused += 1;
        }
    }
    eprintln!("accepted {accepted}, refused {refused}");
    assert!(accepted > 10 && refused > 10);
}
