//! Running commands and reading what they printed: output text and JSON,
//! exit-status assertions, a deadline for commands that may hang.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

// ------------------------------------------------------------------ output

/// Exit status, stdout and stderr, for assertion messages.
pub fn show(o: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts exit status 0; the message is `<what> failed:` and the output.
#[track_caller]
pub fn assert_ok(o: &Output, what: &str) {
    assert_eq!(o.status.code(), Some(0), "{what} failed:\n{}", show(o));
}

/// Asserts exit status `code`.
#[track_caller]
pub fn assert_exit(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: expected exit {code}\n{}",
        show(o)
    );
}

// ------------------------------------------------------------------ JSON

/// Stdout as one JSON document.
pub fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{}", show(o)))
}

/// `(path, state, action)` rows of the array `key` of a `status --json` /
/// `sync --json` document.
pub fn rows_of(v: &Value, key: &str) -> Vec<(String, String, String)> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} array in {v}"))
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap().to_string(),
                r["state"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The JSON file `p`.
pub fn read_json(p: &Path) -> Value {
    let b = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

/// `metadata.snapshot_id` of a manifest.
pub fn snapshot_id(v: &Value) -> String {
    v["metadata"]["snapshot_id"]
        .as_str()
        .expect("snapshot_id")
        .to_string()
}

// ------------------------------------------------------------------ deadlines

/// Waits for `child` (stdout/stderr piped) at most `limit`; kills it
/// then (a wedged zfs-fuse hangs every access to its mounts). The output
/// and whether it timed out.
pub fn wait_within(mut child: Child, limit: Duration) -> (Output, bool) {
    fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let t0 = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stderr = err.join().unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(format!("\n(killed by the test after {limit:?})\n").as_bytes());
    }
    let o = Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr,
    };
    (o, timed_out)
}

/// Runs `c` (output piped, no stdin) at most `limit`.
pub fn output_within(mut c: Command, limit: Duration) -> (Output, bool) {
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    wait_within(c.spawn().expect("spawn"), limit)
}

/// Runs a command with a deadline (kills it and panics when it hangs).
#[track_caller]
pub fn run_bounded(c: Command, limit: Duration) -> Output {
    let (out, killed) = output_within(c, limit);
    assert!(
        !killed,
        "dsg did not finish within {limit:?} (killed):\n{}",
        show(&out)
    );
    out
}
