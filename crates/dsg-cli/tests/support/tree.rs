//! Tree listings, independent of the product: every path under a root with
//! small files' bytes or large files' size and digest, link targets and
//! (for state listings) mtimes; and readable differences between listings.
//!
//! Two pairs of listings differ on purpose (both kept, under their own
//! names): [`data_tree`] / [`visible_files`] and [`state_listing`] /
//! [`state_listing_nested`]; see their docs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A tree entry: small files keep their bytes (readable diffs), large ones a
/// size and an independent 128-bit digest (not the product's hash).
#[derive(Clone, PartialEq, Eq)]
pub enum Node {
    File(Vec<u8>),
    Big(u64, u128),
    Link(String),
    Dir,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::File(b) if b.len() <= 64 => write!(f, "File({:?})", String::from_utf8_lossy(b)),
            Node::File(b) => write!(f, "File({} bytes)", b.len()),
            Node::Big(n, d) => write!(f, "Big({n} bytes, {d:032x})"),
            Node::Link(t) => write!(f, "Link({t:?})"),
            Node::Dir => write!(f, "Dir"),
        }
    }
}

pub type Tree = BTreeMap<String, Node>;

/// Files up to this size are kept as bytes in a [`Node::File`].
const SMALL: u64 = 64 * 1024;

/// A digest that does not come from the product (two independent 64-bit
/// multiply-xorshift lanes over 8-byte words).
pub fn digest(bytes: &[u8]) -> u128 {
    let (mut a, mut b) = (0x9e37_79b9_7f4a_7c15u64, 0xc2b2_ae3d_27d4_eb4fu64);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().unwrap());
        a = (a ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(31);
        b = (b.wrapping_add(w)).wrapping_mul(0xc4ce_b9fe_1a85_ec53) ^ (b >> 29);
    }
    for &x in chunks.remainder() {
        a = (a ^ x as u64)
            .wrapping_mul(0xff51_afd7_ed55_8ccd)
            .rotate_left(31);
        b = (b.wrapping_add(x as u64)).wrapping_mul(0xc4ce_b9fe_1a85_ec53) ^ (b >> 29);
    }
    a ^= bytes.len() as u64;
    ((a as u128) << 64) | b as u128
}

fn node_of(path: &Path, md: &fs::Metadata) -> Node {
    if md.file_type().is_symlink() {
        Node::Link(fs::read_link(path).unwrap().to_string_lossy().into_owned())
    } else if md.is_dir() {
        Node::Dir
    } else {
        let b = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if b.len() as u64 <= SMALL {
            Node::File(b)
        } else {
            Node::Big(b.len() as u64, digest(&b))
        }
    }
}

/// Every path under `root` (sorted) with its metadata; does not follow
/// symlinks.
pub fn walk_all(root: &Path) -> Vec<(PathBuf, fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for de in rd.flatten() {
            let p = de.path();
            let Ok(md) = fs::symlink_metadata(&p) else {
                continue;
            };
            if md.is_dir() {
                stack.push(p.clone());
            }
            out.push((p, md));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `p` relative to `root`, as a string.
pub fn rel_path(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap().to_string_lossy().into_owned()
}

// ------------------------------------------------------------------ data

/// The data tree: everything under `root` except `.dsg/` (files, links,
/// directories; `.dsgconfig.yml` and other hidden paths included). The
/// sync/zfs tests' listing.
pub fn data_tree(root: &Path) -> Tree {
    let mut t = Tree::new();
    for (p, md) in walk_all(root) {
        let r = rel_path(root, &p);
        if r == ".dsg" || r.starts_with(".dsg/") {
            continue;
        }
        t.insert(r, node_of(&p, &md));
    }
    t
}

/// Only files and links under `root`, and none under a hidden path
/// (`.dsg/`, `.dsgconfig.yml`, …): the data a manifest can describe,
/// whatever the directory names. The ssh tests' `data_tree`.
pub fn visible_files(root: &Path) -> Tree {
    walk_all(root)
        .into_iter()
        .filter(|(p, md)| {
            let r = rel_path(root, p);
            !md.is_dir() && !r.split('/').any(|c| c.starts_with('.'))
        })
        .map(|(p, md)| (rel_path(root, &p), node_of(&p, &md)))
        .collect()
}

/// Files and links only, of tracked paths (a component named input, output
/// or frozen; no hidden component): what a manifest describes.
pub fn tracked(t: &Tree) -> Tree {
    t.iter()
        .filter(|(p, n)| !matches!(n, Node::Dir) && is_tracked(p))
        .map(|(p, n)| (p.clone(), n.clone()))
        .collect()
}

pub fn is_tracked(p: &str) -> bool {
    let comps: Vec<&str> = p.split('/').collect();
    // Conflict backups (`name~YYYYMMDDTHHMMSS±ZZZZ~`) are never tracked.
    !dsg_core::names::is_conflict_backup_name(comps[comps.len() - 1])
        && comps.iter().all(|c| !c.starts_with('.'))
        && comps[..comps.len() - 1]
            .iter()
            .any(|c| matches!(*c, "input" | "output" | "frozen"))
}

// ------------------------------------------------------------------ state

/// Everything under `root`, `.dsg/` included, with mtimes: for "writes
/// nothing at all" checks. The root itself is listed as `"."`.
pub fn full_listing(root: &Path) -> BTreeMap<String, (Node, i64, i64)> {
    let mut t = BTreeMap::new();
    if let Ok(md) = fs::symlink_metadata(root) {
        t.insert(".".into(), (Node::Dir, md.mtime(), md.mtime_nsec()));
    }
    for (p, md) in walk_all(root) {
        let r = rel_path(root, &p);
        // Taking a lock may touch its lock file; lock files are allowed
        // (their existence and content still count).
        let is_lock = r == ".dsg/lock" || r.ends_with(".lock");
        let (s, ns) = if is_lock {
            (0, 0)
        } else {
            (md.mtime(), md.mtime_nsec())
        };
        t.insert(r, (node_of(&p, &md), s, ns));
    }
    t
}

/// `full_listing` for "nothing changed" after a failed command in one
/// project or repository `root`: it ignores directory mtimes, the local
/// stat caches (`.dsg/stat-cache*`, which only let a scan skip work), an
/// empty `.dsg/staging/` and the holder text in lock files; everything
/// else, file mtimes included, must be as before. The sync/zfs tests'
/// listing.
pub fn state_listing(root: &Path) -> BTreeMap<String, (Node, i64, i64)> {
    let mut t = full_listing(root);
    t.retain(|k, _| !k.starts_with(".dsg/stat-cache"));
    let staging_empty = !t.keys().any(|k| k.starts_with(".dsg/staging/"));
    if staging_empty {
        t.remove(".dsg/staging");
    }
    for (k, v) in t.iter_mut() {
        if k == ".dsg/lock" || k.ends_with(".lock") {
            // Informative holder text; the flock itself is the lock.
            v.0 = Node::File(Vec::new());
        }
        if v.0 == Node::Dir {
            v.1 = 0;
            v.2 = 0;
        }
    }
    t
}

/// Like [`state_listing`], for a `root` that may hold projects or
/// repositories below it (the ssh tests' `state_listing`): stat caches
/// (`.dsg/stat-cache*`) and lock files (`lock`, `*.lock`) are recognised at
/// any depth, empty `.dsg/staging` and `.dsg/tmp` are ignored, and the root
/// itself is not listed.
pub fn state_listing_nested(root: &Path) -> BTreeMap<String, (Node, i64, i64)> {
    let mut t = BTreeMap::new();
    for (p, md) in walk_all(root) {
        let r = rel_path(root, &p);
        if r.starts_with(".dsg/stat-cache") || r.contains("/.dsg/stat-cache") {
            continue;
        }
        let is_lock = r.ends_with("/lock") || r == "lock" || r.ends_with(".lock");
        let node = if is_lock {
            Node::File(Vec::new())
        } else {
            node_of(&p, &md)
        };
        let (s, ns) = if is_lock || md.is_dir() {
            (0, 0)
        } else {
            (md.mtime(), md.mtime_nsec())
        };
        t.insert(r, (node, s, ns));
    }
    for d in [".dsg/staging", ".dsg/tmp"] {
        let prefix = format!("{d}/");
        if !t.keys().any(|k| k.starts_with(&prefix)) {
            t.remove(d);
        }
    }
    t
}

// ------------------------------------------------------------------ diffs

/// Human-readable differences between two maps (at most 30 lines).
pub fn diff<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    a: &BTreeMap<K, V>,
    b: &BTreeMap<K, V>,
) -> String {
    let mut s = String::new();
    let mut n = 0;
    for (k, v) in a {
        match b.get(k) {
            None => {
                let _ = writeln!(s, "  - {k:?}: {v:?}");
                n += 1;
            }
            Some(w) if w != v => {
                let _ = writeln!(s, "  ~ {k:?}: {v:?} -> {w:?}");
                n += 1;
            }
            _ => {}
        }
        if n > 30 {
            s.push_str("  …\n");
            return s;
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            let _ = writeln!(s, "  + {k:?}: {v:?}");
            n += 1;
            if n > 30 {
                s.push_str("  …\n");
                return s;
            }
        }
    }
    s
}

/// Asserts two maps are equal, naming the differences.
#[track_caller]
pub fn assert_same<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    what: &str,
    a: &BTreeMap<K, V>,
    b: &BTreeMap<K, V>,
) {
    if a != b {
        panic!("{what} differs:\n{}", diff(a, b));
    }
}
