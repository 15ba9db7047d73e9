//! Bulk transfers over ssh: many small files pipelined in one sync each way,
//! and a large file streamed both ways. Times are printed, never asserted.

mod ssh_support;
mod support;

use std::time::Instant;

use ssh_support::*;

#[test]
fn many_small_files_upload_and_download_in_one_sync_each() {
    let ssh = need_ssh!();
    let w = World::new("many", Transport::Ssh, Some(&ssh));
    w.write("a", "task/input/seed.txt", "seed\n");
    w.init("a");
    w.clone_client("a", "b");

    const N: usize = 3000;
    for i in 0..N {
        // 0..~2 KB, distinct contents, spread over 30 directories.
        let body = format!("file {i}\n").repeat(i % 200 + 1);
        w.write("a", &format!("task/input/d{:02}/f{i:05}.txt", i % 30), body);
    }
    // Through a pass-through proxy, to count ssh connections: one per
    // command (DESIGN §3), however many files.
    let proxy = FaultProxy::start(ssh.port(), FaultPlan::pass_through());
    let via = proxy.ssh_command(&ssh);
    let t = Instant::now();
    let o = w.run_via("a", &["sync", "--json", "-m", "3000 files"], &via);
    let up = t.elapsed();
    assert_exit(&o, 0, "sync of 3000 files");
    assert_eq!(proxy.accepted(), 1, "ssh connections for one upload sync");
    let doc = json_of(&o);
    let uploads = rows(&doc).iter().filter(|r| r.2 == "upload").count();
    assert_eq!(uploads, N, "one sync uploads all {N} files: {doc}");
    assert_eq!(
        w.repo_snapshot(),
        "s2",
        "exactly one snapshot for the upload"
    );
    w.assert_in_sync("a");

    let t = Instant::now();
    let o = w.run_via("b", &["sync", "--json"], &via);
    let down = t.elapsed();
    assert_exit(&o, 0, "sync downloading 3000 files");
    assert_eq!(proxy.accepted(), 2, "ssh connections for one download sync");
    drop(proxy);
    let downloads = rows(&json_of(&o))
        .iter()
        .filter(|r| r.2 == "download")
        .count();
    assert_eq!(downloads, N, "one sync downloads all {N} files");
    w.assert_in_sync("b");
    assert_same(
        "b vs a after 3000 files",
        &data_tree(&w.client("a")),
        &data_tree(&w.client("b")),
    );
    eprintln!(
        "{N} small files over ssh: upload {:.2} s, download {:.2} s",
        up.as_secs_f64(),
        down.as_secs_f64()
    );
}

#[test]
fn large_file_streams_both_ways() {
    let ssh = need_ssh!();
    let w = World::new("large", Transport::Ssh, Some(&ssh));
    w.write("a", "task/input/small.txt", "small\n");
    w.init("a");
    w.clone_client("a", "b");

    const SIZE: u64 = 200 << 20;
    let rel = "task/input/big.bin";
    write_big_file(&w.client("a").join(rel), 42, SIZE);
    let t = Instant::now();
    w.ok("a", &["sync", "-m", "big"]);
    let up = t.elapsed();
    assert!(
        same_bytes(&w.client("a").join(rel), &w.repo().join(rel)),
        "uploaded bytes differ"
    );
    let t = Instant::now();
    w.ok("b", &["sync"]);
    let down = t.elapsed();
    assert!(
        same_bytes(&w.client("a").join(rel), &w.client("b").join(rel)),
        "downloaded bytes differ"
    );
    w.assert_in_sync("b");

    // Back the other way: B rewrites it (same size, other bytes).
    write_big_file(&w.client("b").join(rel), 43, SIZE);
    let t = Instant::now();
    w.ok("b", &["sync", "-m", "big v2"]);
    let up2 = t.elapsed();
    w.ok("a", &["sync"]);
    assert!(
        same_bytes(&w.client("b").join(rel), &w.client("a").join(rel)),
        "bytes differ after the second round"
    );
    assert!(same_bytes(&w.client("b").join(rel), &w.repo().join(rel)));
    w.assert_in_sync("a");
    assert_eq!(w.repo_snapshot(), "s3");
    eprintln!(
        "200 MiB over ssh: upload {:.2} s, download {:.2} s, re-upload {:.2} s",
        up.as_secs_f64(),
        down.as_secs_f64(),
        up2.as_secs_f64()
    );
}

/// Data goes over AES-GCM when the CPU has AES instructions and the user
/// chose no ciphers; a choice of the user's is kept. Read from ssh's own
/// report of what it negotiated (`-v`, passed through by `DSG_LOG=debug`).
#[test]
fn ssh_prefers_aes_gcm_unless_the_user_chose() {
    let ssh = need_ssh!();
    let w = World::new("cipher", Transport::Ssh, Some(&ssh));
    w.write("a", "task/input/seed.txt", "seed\n");
    w.init("a");
    let negotiated = |ssh_command: &str| {
        let mut c = w.command("a", &["status"], Some(ssh_command));
        c.env("DSG_LOG", "debug");
        let o = c.output().unwrap();
        assert_exit(&o, 0, "status over ssh -v");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        err.lines()
            .find_map(|l| {
                l.split("kex: client->server cipher: ")
                    .nth(1)
                    .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
            })
            .unwrap_or_else(|| panic!("no negotiated cipher in:\n{err}"))
    };
    // What the code asks for: AES and carry-less multiply (GCM's GHASH).
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flag = |f: &str| cpuinfo.split_whitespace().any(|w| w == f);
    let has_aes = flag("aes") && flag("pclmulqdq");
    let default = negotiated(&ssh.command_with("-v"));
    if has_aes {
        assert_eq!(default, "aes128-gcm@openssh.com");
    } else {
        assert_eq!(default, "chacha20-poly1305@openssh.com");
    }
    let chosen = negotiated(&ssh.command_with("-v -c aes256-ctr"));
    assert_eq!(chosen, "aes256-ctr", "the user's -c is kept");
}
