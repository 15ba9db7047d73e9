//! Build script: the git commit behind `dsg --version`.
//!
//! Sets `DSG_BUILD_COMMIT` for the crate to `<short hash>[-dirty] <commit
//! date>` (e.g. `4931af9 2026-12-06`), or `unknown` outside a git checkout
//! (a source tarball) or without git. Only std: `git` is run as a process.
//!
//! Cargo reruns this script when HEAD moves: it watches the checkout's `HEAD`
//! (in a worktree, the worktree's own git dir, which `.git` the file points
//! to), the branch ref HEAD names (loose, in the common git dir, and
//! `packed-refs`) and the index. `-dirty` compares the work tree with HEAD
//! as of the last time the script ran: after a commit, a `git add` or an
//! edit in this crate; an unstaged edit elsewhere is not seen until then.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=Cargo.toml");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let commit = describe(&dir).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=DSG_BUILD_COMMIT={commit}");
}

/// `git -C dir ARGS`, its trimmed stdout when it succeeded and printed something.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        // Never write the index (a refresh would change a watched file and
        // make every build rerun this script).
        .arg("--no-optional-locks")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn describe(dir: &Path) -> Option<String> {
    let hash = git(dir, &["rev-parse", "--short", "HEAD"])?;
    watch(dir);
    let dirty = match git(dir, &["status", "--porcelain", "--untracked-files=no"]) {
        Some(_) => "-dirty",
        None => "",
    };
    let date = git(dir, &["log", "-1", "--format=%cs", "HEAD"]).unwrap_or_default();
    Some(format!("{hash}{dirty} {date}").trim_end().to_string())
}

/// rerun-if-changed for the files that move when HEAD does. Only existing
/// files: cargo reruns the script on every build for a missing one.
fn watch(dir: &Path) {
    let abs = |p: String| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            dir.join(p)
        }
    };
    let Some(git_dir) = git(dir, &["rev-parse", "--git-dir"]).map(abs) else {
        return;
    };
    let common = git(dir, &["rev-parse", "--git-common-dir"])
        .map(abs)
        .unwrap_or_else(|| git_dir.clone());
    let mut files = vec![git_dir.join("HEAD"), git_dir.join("index")];
    if let Some(r) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        files.push(common.join(&r));
        files.push(git_dir.join(&r));
        files.push(common.join("packed-refs"));
    }
    for f in files {
        if f.is_file() {
            println!("cargo:rerun-if-changed={}", f.display());
        }
    }
}
