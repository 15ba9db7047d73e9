//! What `clone --json` reports: a clone plans without holding a row per
//! file and makes its rows and download list again for the report; they
//! must be what its dry run plans, and what it did on disk.

mod common;
mod support;

use std::fs;

use common::*;
use serde_json::Value;

fn clone_json(env: &TestEnv, a: &std::path::Path, name: &str, extra: &[&str]) -> Value {
    let b = env.project(name);
    fs::copy(a.join(".dsgconfig.yml"), b.join(".dsgconfig.yml")).unwrap();
    write(&b, "input/z.csv", "same\n");
    write(&b, "input/only_here.csv", "mine\n");
    let mut args = vec!["--json", "clone"];
    args.extend(extra);
    let o = env.run(&b, &args);
    assert_code(&o, 0, "clone");
    let v = one_json(&o.stdout);
    if extra.is_empty() {
        assert_eq!(fs::read_to_string(b.join("input/x.csv")).unwrap(), "x\n");
        assert_eq!(
            fs::read_to_string(b.join("input/sub/y.csv")).unwrap(),
            "y\n"
        );
        assert_eq!(
            fs::read_to_string(b.join("input/only_here.csv")).unwrap(),
            "mine\n"
        );
    }
    v
}

#[test]
fn clone_reports_the_rows_and_downloads_it_planned() {
    let env = TestEnv::new();
    let a = env.project("a");
    write(&a, "input/x.csv", "x\n");
    write(&a, "input/sub/y.csv", "y\n");
    write(&a, "input/z.csv", "same\n");
    env.init_ok(&a, "report");

    let planned = clone_json(&env, &a, "dry", &["--dry-run"]);
    let done = clone_json(&env, &a, "real", &[]);
    assert_eq!(done["files"], planned["files"], "{done:#}\n{planned:#}");
    assert_eq!(done["result"]["downloads"], planned["result"]["downloads"]);
    let rows = status_rows(&done);
    assert_eq!(rows["input/x.csv"].1, "download", "{done:#}");
    assert_eq!(rows["input/sub/y.csv"].1, "download", "{done:#}");
    assert_eq!(rows["input/only_here.csv"].1, "upload", "{done:#}");
    assert_eq!(
        done["result"]["downloads"],
        serde_json::json!(["input/sub/y.csv", "input/x.csv"]),
        "{done:#}"
    );
    assert_eq!(done["result"]["downloaded"], 2, "{done:#}");
}
