//! The test environment: CI, the binary under test, unique names, where
//! repositories go, the isolated user configuration, `dsg init` arguments.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// `CI=true` (or `1`): missing test services are failures, not skips.
pub fn is_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// The `dsg` binary built for these tests.
pub fn dsg_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("dsg")
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A number not handed out before in this test process.
pub fn next_count() -> u64 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// A unique name for a directory of this test process.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{}-{nanos}", std::process::id(), next_count())
}

/// `$DSG_TEST_XFS/<unique(prefix)>` (created) when the test script set up
/// the XFS mount, else `None`.
pub fn xfs_repo_parent(prefix: &str) -> Option<PathBuf> {
    match std::env::var("DSG_TEST_XFS") {
        Ok(x) if !x.is_empty() => {
            let p = Path::new(&x).join(unique(prefix));
            fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
            Some(p)
        }
        _ => None,
    }
}

/// A fresh temp directory named `<tmp_prefix>…`, with the guard that
/// removes it.
pub fn temp_repo_parent(tmp_prefix: &str) -> (PathBuf, Option<tempfile::TempDir>) {
    let t = tempfile::Builder::new()
        .prefix(tmp_prefix)
        .tempdir()
        .unwrap();
    (t.path().to_path_buf(), Some(t))
}

/// Sets up the isolated user environment under `root`: the user config
/// `root/cfg/dsg.yml` (Alice) and an empty `root/home/.config`. The
/// mass-deletion guard is off (`max_delete: 100`): these worlds' small
/// trees delete most of their files on purpose; `guard.rs` turns it on.
pub fn make_user_dirs(root: &Path) {
    let cfg = root.join("cfg");
    fs::create_dir_all(&cfg).unwrap();
    fs::write(
        cfg.join("dsg.yml"),
        "user_name: Alice\nuser_id: alice@example.org\nmax_delete: 100\n",
    )
    .unwrap();
    fs::create_dir_all(root.join("home/.config")).unwrap();
}

/// Points `c` at the user environment made by [`make_user_dirs`]:
/// `DSG_CONFIG_HOME`, `HOME` and `XDG_CONFIG_HOME`.
pub fn user_env<'c>(c: &'c mut Command, root: &Path) -> &'c mut Command {
    c.env("DSG_CONFIG_HOME", root.join("cfg"))
        .env("HOME", root.join("home"))
        .env("XDG_CONFIG_HOME", root.join("home/.config"))
}

/// `dsg init --no-interactive --host H --repo-path P --repo-name N
/// --repo-type T`.
pub fn init_args_for(host: &str, repo_path: &Path, name: &str, repo_type: &str) -> Vec<String> {
    [
        "init",
        "--no-interactive",
        "--host",
        host,
        "--repo-path",
        repo_path.to_str().unwrap(),
        "--repo-name",
        name,
        "--repo-type",
        repo_type,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Creates the client directory `to` holding a copy of `from`'s
/// `.dsgconfig.yml` (ready for `dsg clone`).
pub fn copy_project_config(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    fs::copy(from.join(".dsgconfig.yml"), to.join(".dsgconfig.yml")).unwrap();
}
