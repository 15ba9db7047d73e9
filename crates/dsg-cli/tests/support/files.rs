//! Writing into a tree: files, links, removals, and deterministic bytes.

use std::fs;
use std::path::{Path, PathBuf};

use super::env::copy_project_config;

/// Writes `root/rel` (parents created); a symlink there is replaced by the
/// file, not written through.
pub fn write_file(root: &Path, rel: &str, bytes: &[u8]) {
    let p = root.join(rel);
    if let Ok(md) = fs::symlink_metadata(&p) {
        if md.file_type().is_symlink() {
            fs::remove_file(&p).unwrap();
        }
    }
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, bytes).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

/// Makes `root/rel` a symlink to `target` (parents created), replacing
/// whatever was there.
pub fn make_link(root: &Path, rel: &str, target: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    if fs::symlink_metadata(&p).is_ok() {
        remove_path(root, rel);
    }
    std::os::unix::fs::symlink(target, &p).unwrap();
}

/// Removes `root/rel`: a directory with its contents, else the file or link.
pub fn remove_path(root: &Path, rel: &str) {
    let p = root.join(rel);
    let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    if md.is_dir() {
        fs::remove_dir_all(&p).unwrap();
    } else {
        fs::remove_file(&p).unwrap();
    }
}

/// A test world's clients: directories `client(name)` holding projects,
/// written to through the helpers above.
pub trait Clients {
    /// The directory of client `name`.
    fn client(&self, name: &str) -> PathBuf;

    fn write(&self, client: &str, rel: &str, bytes: impl AsRef<[u8]>) {
        write_file(&self.client(client), rel, bytes.as_ref());
    }

    fn link(&self, client: &str, rel: &str, target: &str) {
        make_link(&self.client(client), rel, target);
    }

    fn remove(&self, client: &str, rel: &str) {
        remove_path(&self.client(client), rel);
    }

    fn read(&self, client: &str, rel: &str) -> Vec<u8> {
        fs::read(self.client(client).join(rel)).unwrap()
    }

    /// Prepares client `to` with a copy of `from`'s `.dsgconfig.yml`.
    fn prepare_clone(&self, from: &str, to: &str) {
        copy_project_config(&self.client(from), &self.client(to));
    }
}

// ------------------------------------------------------------------ bytes
//
// Two generators, kept apart on purpose: the sync/zfs tests' data comes
// from `bytes` (splitmix64), the ssh tests' from `random_bytes`
// (xorshift64*), and each suite's sizes and cut points were chosen with its
// own data.

/// A small seeded PRNG (splitmix64) so random trials can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Deterministic pseudo-random bytes (splitmix64, see [`Rng`]).
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Deterministic pseudo-random bytes (xorshift64*), not compressible.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}
