//! `dsg status` with the stat cache's directory records: a directory whose
//! stat has not changed is not listed again, so every way of changing a
//! directory's entries must still show, through the real binary, on disk.

mod common;
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;

type Rows = BTreeMap<String, (String, String)>;

/// The stat cache's version and number of directory records.
fn stat_cache_dirs(dir: &Path) -> (Vec<u8>, u64) {
    let b = fs::read(dir.join(".dsg/stat-cache")).unwrap();
    (
        b[..8].to_vec(),
        u64::from_le_bytes(b[24..32].try_into().unwrap()),
    )
}

fn upload(paths: &[&str]) -> Rows {
    paths
        .iter()
        .map(|p| (p.to_string(), ("sLCR__C_eq_R_ne_L".into(), "upload".into())))
        .collect()
}

#[test]
fn changes_in_directories_that_look_unchanged_are_seen() {
    let env = TestEnv::new();
    let dir = env.project("p");
    for p in [
        "input/add/a.csv",
        "input/del/a.csv",
        "input/del/b.csv",
        "input/ren/a.csv",
        "input/edit/a.csv",
        "input/repl/x/a.csv",
        "input/same/a.csv",
    ] {
        write(&dir, p, format!("{p}\n"));
    }
    env.init_ok(&dir, "N");
    // Let every directory leave the racy window, then a status records
    // them all.
    std::thread::sleep(Duration::from_millis(1100));
    let v = env.status_json(&dir, &[]);
    assert_eq!(status_rows(&v), Rows::new(), "{v:#}");
    let (magic, dirs) = stat_cache_dirs(&dir);
    assert_eq!(&magic, b"DSGSTAT2");
    // The root, input and the seven below it at least.
    assert!(dirs >= 9, "{dirs} directory records");

    write(&dir, "input/add/new.csv", "new\n");
    fs::remove_file(dir.join("input/del/b.csv")).unwrap();
    fs::rename(dir.join("input/ren/a.csv"), dir.join("input/ren/b.csv")).unwrap();
    let e = dir.join("input/edit/a.csv");
    let mtime = fs::metadata(&e).unwrap().modified().unwrap();
    fs::write(&e, "input/edit/A.csv\n").unwrap();
    fs::File::options()
        .write(true)
        .open(&e)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    fs::remove_dir_all(dir.join("input/repl/x")).unwrap();
    write(&dir, "input/repl/x/a.csv", "input/repl/x/a.csv\n!\n");

    let mut want = upload(&["input/edit/a.csv", "input/repl/x/a.csv"]);
    for p in ["input/add/new.csv", "input/ren/b.csv"] {
        want.insert(p.into(), ("sLxCxR__only_L".into(), "upload".into()));
    }
    for p in ["input/del/b.csv", "input/ren/a.csv"] {
        want.insert(p.into(), ("sxLCR__C_eq_R".into(), "delete_remote".into()));
    }
    // Twice: the second status reads the cache the first one wrote.
    for round in 0..2 {
        let v = env.status_json(&dir, &[]);
        assert_eq!(status_rows(&v), want, "round {round}: {v:#}");
        let v = env.status_json(&dir, &["--offline"]);
        assert_eq!(status_rows(&v), want, "round {round} offline: {v:#}");
    }
}

#[test]
fn a_version_1_stat_cache_is_read_then_replaced() {
    use std::os::unix::fs::MetadataExt;
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    env.init_ok(&dir, "N");
    // The previous version's file: a 24-byte header, the record with the
    // file's true stat, and a hash that is not the file's. Read as what it
    // is, the record is trusted (made an hour from now, so not racy) and
    // the file shows as changed; were it ignored, the file would be hashed
    // and show nothing; misread, it would be "damaged".
    let md = fs::symlink_metadata(dir.join("input/a.csv")).unwrap();
    let ns = |s: i64, n: i64| (s * 1_000_000_000 + n) as u64;
    let made = ns(md.mtime() + 3600, 0);
    let mut v1 = b"DSGSTAT1".to_vec();
    v1.extend_from_slice(&made.to_le_bytes());
    v1.extend_from_slice(&1u64.to_le_bytes());
    let path = b"input/a.csv";
    v1.extend_from_slice(&(path.len() as u32).to_le_bytes());
    v1.extend_from_slice(path);
    for v in [
        md.len(),
        ns(md.mtime(), md.mtime_nsec()),
        ns(md.ctime(), md.ctime_nsec()),
        md.ino(),
        dsg_core::hash::Hash::of_bytes(b"not a\n").0,
    ] {
        v1.extend_from_slice(&v.to_le_bytes());
    }
    let sum = dsg_core::hash::Hash::of_bytes(&v1).0.to_le_bytes();
    v1.extend_from_slice(&sum);
    fs::write(dir.join(".dsg/stat-cache"), &v1).unwrap();
    let o = env.run(&dir, &["status", "--json", "--offline"]);
    assert_code(&o, 0, "status");
    assert!(!stderr(&o).contains("damaged"), "{}", describe(&o));
    let v = one_json(&o.stdout);
    assert_eq!(status_rows(&v), upload(&["input/a.csv"]), "{v:#}");
    let (magic, dirs) = stat_cache_dirs(&dir);
    assert_eq!(&magic, b"DSGSTAT2", "rewritten in the current version");
    assert!(dirs >= 2);
}

#[test]
fn the_cache_manifest_is_rehashed_when_it_changed_with_its_size_and_mtime_kept() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    write(&dir, "input/b.csv", "b\n");
    env.init_ok(&dir, "N");
    std::thread::sleep(Duration::from_millis(1100));
    let v = env.status_json(&dir, &["--offline"]);
    assert_eq!(status_rows(&v), Rows::new(), "{v:#}");
    // The stat cache now vouches for the cache manifest's hash.
    let c = dir.join(".dsg/last-sync.json");
    let sc = fs::read(dir.join(".dsg/stat-cache")).unwrap();
    let word = |i: usize| u64::from_le_bytes(sc[8 * i..8 * i + 8].try_into().unwrap());
    assert_eq!(word(4), 1, "known");
    let bytes = fs::read(&c).unwrap();
    assert_eq!(word(9), dsg_core::hash::Hash::of_bytes(&bytes).0);

    // Alter a digit of a.csv's hash in place: same size, mtime put back.
    // Only the ctime (and inode, were it replaced) tells; trusting the
    // recorded hash would load the old manifest and report "up to date".
    let text = String::from_utf8(bytes).unwrap();
    let at = text.find("\"input/a.csv\"").unwrap();
    let h = at + text[at..].find("\"hash\": \"").unwrap() + 9;
    let mut altered = text.into_bytes();
    altered[h] = if altered[h] == b'0' { b'1' } else { b'0' };
    let mtime = fs::metadata(&c).unwrap().modified().unwrap();
    let f = fs::File::options().write(true).open(&c).unwrap();
    std::io::Write::write_all(&mut &f, &altered).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    assert_eq!(fs::metadata(&c).unwrap().len() as usize, altered.len());
    let o = env.run(&dir, &["status", "--offline"]);
    assert_ne!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(stderr(&o).contains("integrity"), "{}", describe(&o));
}
