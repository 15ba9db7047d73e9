//! Ctrl-C during a sync rolls back and exits 130: nothing changes on either
//! side. A failpoint pause makes the moment of the signal deterministic.

mod common;
mod support;

use std::fs;
use std::time::Duration;

use common::*;

fn interrupt_at(step: &str) {
    let env = TestEnv::new();
    let a = env.project("a");
    write(&a, "input/x.csv", "one\n");
    env.init_ok(&a, "intr");
    // Client b publishes a file, so a's sync downloads as well as uploads:
    // the interrupt after the download stage has something staged to undo.
    let b = env.project("b");
    fs::copy(a.join(".dsgconfig.yml"), b.join(".dsgconfig.yml")).unwrap();
    assert_code(&env.run(&b, &["clone"]), 0, "clone b");
    write(&b, "input/from_b.csv", "from b\n");
    assert_code(&env.run(&b, &["sync"]), 0, "sync b");
    write(&a, "input/x.csv", "two\n");
    write(&a, "input/new.csv", "new\n");
    // The lock's holder text and directory mtimes may change; data and
    // metadata must not.
    let snapshot = |r: &std::path::Path| {
        let mut t = without_dir_mtimes(&tree(r));
        t.remove(".dsg/lock");
        t
    };
    let repo_before = snapshot(&env.repo("intr"));
    let cache_before = fs::read(a.join(".dsg/last-sync.json")).unwrap();

    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("dsg"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &env.home)
        .env("XDG_CONFIG_HOME", &env.xdg)
        .env("DSG_CONFIG_HOME", &env.user_dir)
        .env("DSG_FAILPOINT", format!("{step}:pause=1500"))
        .current_dir(&a)
        .args(["sync"])
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    // SIGINT, as Ctrl-C in a terminal would send.
    unsafe { libc_kill(child.id() as i32, 2) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        snapshot(&env.repo("intr")),
        repo_before,
        "repository changed"
    );
    assert_eq!(
        fs::read(a.join(".dsg/last-sync.json")).unwrap(),
        cache_before
    );
    assert!(!a.join(".dsg/journal").exists());
    assert!(fs::read_dir(a.join(".dsg/staging"))
        .map(|r| r.count() == 0)
        .unwrap_or(true));
    assert_eq!(
        fs::read_to_string(a.join("input/x.csv")).unwrap(),
        "two\n",
        "local edit kept"
    );
    assert!(
        !a.join("input/from_b.csv").exists(),
        "the download was installed by an interrupted sync"
    );
    // And the sync still works afterwards.
    assert_code(&env.run(&a, &["sync"]), 0, "sync after interrupt");
    assert_eq!(
        fs::read_to_string(env.repo("intr").join("input/x.csv")).unwrap(),
        "two\n"
    );
    assert_eq!(
        fs::read_to_string(a.join("input/from_b.csv")).unwrap(),
        "from b\n"
    );
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn ctrl_c_after_upload_rolls_back() {
    interrupt_at("client.uploaded");
}

#[test]
fn ctrl_c_after_download_staging_rolls_back() {
    interrupt_at("client.downloaded");
}
