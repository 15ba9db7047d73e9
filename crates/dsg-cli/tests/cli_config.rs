//! `.dsgconfig.yml` contents that parse as YAML but must not be accepted:
//! duplicate keys (the YAML loader would silently keep the last one) and
//! names or paths that cannot be what the user meant.

mod common;
mod support;

use std::fs;
use std::path::Path;

use common::*;

fn config(env: &TestEnv, name: &str, extra: &str) -> String {
    format!(
        "name: {name}\nrepository:\n  type: xfs\n  host: localhost\n  mountpoint: {}\n{extra}",
        env.repos.display()
    )
}

/// Runs `validate-config --no-backend` on `text` and returns its output,
/// after checking it failed with exit code 1 and named the file.
fn refused(env: &TestEnv, dir: &Path, text: &str) -> String {
    let cfg = dir.join(".dsgconfig.yml");
    fs::write(&cfg, text).unwrap();
    let o = env.run(dir, &["validate-config", "--no-backend"]);
    assert_code(&o, 1, &format!("validate-config on\n{text}"));
    let all = stderr(&o) + &stdout(&o);
    assert!(all.contains(cfg.to_str().unwrap()), "{}", describe(&o));
    assert!(all.contains("hint:"), "{}", describe(&o));
    all
}

#[test]
fn validate_config_refuses_duplicate_keys_naming_key_and_lines() {
    let env = TestEnv::new();
    let dir = env.project("p");
    let all = refused(&env, &dir, &config(&env, "a", "name: b\n"));
    assert!(
        all.contains("line 6: duplicate key 'name' (first at line 1)"),
        "{all}"
    );
    let all = refused(
        &env,
        &dir,
        &config(
            &env,
            "a",
            "data_dirs: [input]\nignore:\n  names: [x]\n  names: [y]\n",
        ),
    );
    assert!(
        all.contains("line 9: duplicate key 'ignore.names' (first at line 8)"),
        "{all}"
    );
    // Without the duplicate the same file is fine.
    fs::write(
        dir.join(".dsgconfig.yml"),
        config(&env, "a", "ignore:\n  names: [x]\n"),
    )
    .unwrap();
    let o = env.run(&dir, &["validate-config", "--no-backend"]);
    assert_code(&o, 0, "validate-config --no-backend, valid config");
}

#[test]
fn validate_config_refuses_bad_data_dirs_and_control_characters() {
    let env = TestEnv::new();
    let dir = env.project("p");
    for bad in ["../..", "/etc", "a/../b", ""] {
        let all = refused(
            &env,
            &dir,
            &config(&env, "a", &format!("data_dirs: [input, \"{bad}\"]\n")),
        );
        assert!(
            all.contains("data_dirs") && all.contains(&format!("{bad:?}")),
            "{bad:?}: {all}"
        );
    }
    let all = refused(&env, &dir, &config(&env, "\"a\\0b\"", ""));
    assert!(all.contains("'name'") && all.contains("\"a\\0b\""), "{all}");
}
