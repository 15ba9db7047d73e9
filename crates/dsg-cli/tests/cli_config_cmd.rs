//! `dsg config`, `-C DIR`, the first-run prompt, the help layout and the
//! hints of a blocked sync.

mod common;
mod support;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::*;

fn project_config(env: &TestEnv, name: &str) -> String {
    format!(
        "name: {name}\n# where the data lives\nrepository:\n  type: xfs\n  host: localhost\n  mountpoint: {}\n",
        env.repos.display()
    )
}

fn user_file(env: &TestEnv) -> std::path::PathBuf {
    env.user_dir.join("dsg.yml")
}

#[test]
fn config_get_set_unset_list_on_user_and_project_files() {
    let env = TestEnv::new();
    let dir = env.project("p");
    fs::write(dir.join(".dsgconfig.yml"), project_config(&env, "p")).unwrap();
    fs::write(
        user_file(&env),
        format!("# me\nuser_name: {USER_NAME}\nuser_id: {USER_ID}\n"),
    )
    .unwrap();

    let o = env.run(&dir, &["config", "get", "user_name"]);
    assert_code(&o, 0, "get user_name");
    assert_eq!(stdout(&o), format!("{USER_NAME}\n"));

    let o = env.run(
        &dir,
        &["config", "set", "--user", "user_id", "ada@example.org"],
    );
    assert_code(&o, 0, "set user_id");
    let o = env.run(&dir, &["config", "set", "max_delete", "20"]);
    assert_code(&o, 0, "set max_delete");
    let text = fs::read_to_string(user_file(&env)).unwrap();
    assert!(text.starts_with("# me\n"), "{text}");
    assert!(text.contains("max_delete: 20"), "{text}");
    let o = env.run(&dir, &["config", "get", "user_id"]);
    assert_eq!(stdout(&o), "ada@example.org\n");

    // Project keys: a list append, in the file that has the comment.
    let o = env.run(
        &dir,
        &[
            "config",
            "set",
            "--project",
            "--add",
            "ignore.paths",
            "input/private",
        ],
    );
    assert_code(&o, 0, "add ignore.paths");
    let o = env.run(&dir, &["config", "set", "data_dirs", "input", "output"]);
    assert_code(&o, 0, "set data_dirs");
    let text = fs::read_to_string(dir.join(".dsgconfig.yml")).unwrap();
    assert!(text.contains("# where the data lives\n"), "{text}");
    let o = env.run(&dir, &["config", "get", "ignore.paths"]);
    assert_eq!(stdout(&o), "input/private\n");
    let o = env.run(&dir, &["validate-config", "--no-backend"]);
    assert_code(&o, 0, "the edited files load");

    // list: every value and where it comes from.
    let o = env.run(&dir, &["--json", "config", "list"]);
    assert_code(&o, 0, "list --json");
    let v = one_json(&o.stdout);
    let settings = v["settings"].as_array().unwrap();
    let find = |k: &str| settings.iter().find(|e| e["key"] == k).cloned().unwrap();
    let uf = user_file(&env).display().to_string();
    let pf = dir.join(".dsgconfig.yml").display().to_string();
    assert_eq!(find("user_id")["file"], uf.as_str());
    assert_eq!(find("max_delete")["value"], 20);
    assert_eq!(find("ignore.paths")["file"], pf.as_str());
    assert_eq!(find("ignore.names")["file"], serde_json::Value::Null);
    assert_eq!(
        find("data_dirs")["value"],
        serde_json::json!(["input", "output"])
    );
    let o = env.run(&dir, &["config", "list"]);
    let out = stdout(&o);
    assert!(
        out.contains(&format!("({uf})")) && out.contains("(default)"),
        "{out}"
    );

    // unset: the default applies again.
    let o = env.run(&dir, &["config", "unset", "max_delete"]);
    assert_code(&o, 0, "unset max_delete");
    assert!(!fs::read_to_string(user_file(&env))
        .unwrap()
        .contains("max_delete"));
    let o = env.run(&dir, &["config", "get", "max_delete"]);
    assert_code(&o, 1, "get an unset key");
    let o = env.run(&dir, &["config", "unset", "ignore.paths"]);
    assert_code(&o, 0, "unset ignore.paths");
    assert!(!fs::read_to_string(dir.join(".dsgconfig.yml"))
        .unwrap()
        .contains("ignore"));
}

#[test]
fn config_refusals_leave_the_files_byte_identical() {
    let env = TestEnv::new();
    let dir = env.project("p");
    let pf = dir.join(".dsgconfig.yml");
    fs::write(&pf, project_config(&env, "p")).unwrap();
    let before = (fs::read(&pf).unwrap(), fs::read(user_file(&env)).unwrap());
    for (args, code, says) in [
        (
            &["config", "set", "user_id", "nobody@localhost"][..],
            2,
            "user_id",
        ),
        (&["config", "set", "max_delete", "101"], 2, "percentage"),
        (
            &["config", "set", "backup_on_conflict", "maybe"],
            2,
            "true or false",
        ),
        (
            &["config", "set", "default_host", "--", "-oProxyCommand=x"],
            1,
            "default_host",
        ),
        (
            &["config", "set", "remote_dsg.h", "--", "-x"],
            1,
            "remote_dsg.h",
        ),
        (
            &["config", "set", "repository.remote_dsg", "/opt/dsg"],
            2,
            "--user remote_dsg.",
        ),
        (
            &["config", "set", "--project", "user_name", "X"],
            2,
            "unknown key",
        ),
        (
            &["config", "set", "repository.type", "nfs"],
            2,
            "xfs, zfs or s3",
        ),
        (
            &["config", "set", "repository.pool", "tank"],
            1,
            "repository.pool",
        ),
        (&["config", "set", "data_dirs", "../x"], 1, "data_dirs"),
        (&["config", "set", "name", "a/b"], 1, "'name'"),
        (&["config", "unset", "name"], 1, "'name'"),
        (
            &["config", "set", "--add", "user_name", "x"],
            2,
            "lists only",
        ),
        (&["config", "set", "colour", "red"], 2, "unknown key"),
    ] {
        let o = env.run(&dir, args);
        assert_code(&o, code, &format!("{args:?}"));
        assert!(stderr(&o).contains(says), "{args:?}: {}", describe(&o));
        assert_eq!(
            (fs::read(&pf).unwrap(), fs::read(user_file(&env)).unwrap()),
            before,
            "{args:?} changed a file"
        );
    }
    // No temp file is left beside them.
    for d in [&dir, &env.user_dir] {
        assert!(
            ls(d).iter().all(|n| !n.starts_with(".dsg-tmp")),
            "{:?}",
            ls(d)
        );
    }
}

#[test]
fn dash_c_runs_as_if_started_in_dir() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    env.init_ok(&dir, "P");
    write(&dir, "input/b.csv", "b\n");
    let elsewhere = env.project("elsewhere");
    let o = env.run(
        &elsewhere,
        &["-C", dir.to_str().unwrap(), "--json", "status"],
    );
    assert_code(&o, 0, "-C DIR status");
    let v = one_json(&o.stdout);
    assert!(status_rows(&v).contains_key("input/b.csv"), "{v}");
    // Repeated -C composes like git's: the second is relative to the first.
    let o = env.run(&env.base, &["-C", "p", "-C", "input", "list-files"]);
    assert_code(&o, 0, "-C p -C input list-files");
    assert!(stdout(&o).contains("input/a.csv"), "{}", describe(&o));
    let o = env.run(
        &elsewhere,
        &["-C", dir.to_str().unwrap(), "sync", "-m", "b"],
    );
    assert_code(&o, 0, "-C DIR sync");
    let o = env.run(&elsewhere, &["-C", dir.to_str().unwrap(), "status"]);
    assert!(
        stdout(&o).contains("Everything up to date"),
        "{}",
        describe(&o)
    );
    // A missing DIR: a usage error naming it, nothing run.
    let o = env.run(&elsewhere, &["-C", "no/such/dir", "status"]);
    assert_code(&o, 2, "-C missing");
    assert!(stderr(&o).contains("no/such/dir"), "{}", describe(&o));
    let o = env.run(&elsewhere, &["--json", "-C", "nope", "status"]);
    assert_code(&o, 2, "--json -C missing");
    assert_eq!(one_json(&o.stdout)["exit_code"], 2);
}

fn no_user_config(env: &TestEnv) {
    fs::remove_file(user_file(env)).unwrap();
}

fn init_cmdline(env: &TestEnv) -> Vec<String> {
    let mut a = env.init_args("N");
    a.retain(|x| x != "--no-interactive");
    a
}

#[test]
fn first_run_without_a_terminal_keeps_the_error() {
    let env = TestEnv::new();
    no_user_config(&env);
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    let args = env.init_args("N");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = env.run(&dir, &args);
    assert_code(&o, 1, "init without user config, no terminal");
    let e = stderr(&o);
    assert!(e.contains("no dsg.yml found") && e.contains("hint:"), "{e}");
    assert!(!user_file(&env).exists());
    assert!(!dir.join(".dsgconfig.yml").exists());
}

/// Runs `dsg ARGS` under `script`, so that its stdin and stderr are a
/// terminal, feeding it `input`.
fn run_on_tty(env: &TestEnv, dir: &Path, args: &[String], input: &str) -> Output {
    let bin = assert_cmd::cargo::cargo_bin("dsg");
    let mut line = shell_words_join(&[bin.to_str().unwrap().to_string()]);
    line.push(' ');
    line.push_str(&shell_words_join(args));
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"])
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &env.home)
        .env("XDG_CONFIG_HOME", &env.xdg)
        .env("DSG_CONFIG_HOME", &env.user_dir)
        .env("DSG_LOCK_TIMEOUT", "5");
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux) runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn shell_words_join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn first_run_on_a_terminal_writes_the_user_config_and_goes_on() {
    let env = TestEnv::new();
    no_user_config(&env);
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    let args = init_cmdline(&env);
    // A bad e-mail is asked again; --repo-type is given, nothing else asked.
    let o = run_on_tty(
        &env,
        &dir,
        &args,
        "Ada Lovelace\nada@localhost\nada@example.org\n",
    );
    assert_code(&o, 0, "init on a terminal, first run");
    let all = stdout(&o) + &stderr(&o);
    assert!(all.contains("Your e-mail"), "{all}");
    assert!(
        all.contains("the domain"),
        "the bad e-mail is refused: {all}"
    );
    let text = fs::read_to_string(user_file(&env)).unwrap();
    assert!(
        text.contains("user_name: \"Ada Lovelace\"")
            && text.contains("user_id: \"ada@example.org\""),
        "{text}"
    );
    assert!(env.repo("N").join(".dsg").is_dir(), "init went on: {all}");
    // The user config is now there: a second project asks nothing.
    let dir2 = env.project("q");
    write(&dir2, "input/a.csv", "a\n");
    let mut args2 = env.init_args("M");
    args2.retain(|x| x != "--no-interactive");
    let o = run_on_tty(&env, &dir2, &args2, "");
    assert_code(&o, 0, "second init");
    assert!(!(stdout(&o) + &stderr(&o)).contains("Your name"));
}

/// Asked on a terminal, the repository type comes first: s3 then asks for
/// the store's URL and bucket, never a host or a path; a store that cannot
/// be reached fails the init with nothing written.
#[test]
fn init_on_a_terminal_asks_the_type_first_and_s3_asks_endpoint_and_bucket() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    let args: Vec<String> = ["init", "--repo-name", "N"].map(String::from).to_vec();
    let o = run_on_tty(&env, &dir, &args, "s3\nhttp://127.0.0.1:9\nbkt\n");
    assert_code(&o, 1, "init of an unreachable s3 store");
    let all = stdout(&o) + &stderr(&o);
    let asked = |p: &str| {
        all.find(p)
            .unwrap_or_else(|| panic!("{p:?} not asked: {all}"))
    };
    assert!(asked("Repository type") < asked("Object store URL"));
    assert!(asked("Object store URL") < asked("Bucket"));
    assert!(
        !all.contains("Repository host") && !all.contains("Repository path"),
        "{all}"
    );
    assert!(
        all.contains("127.0.0.1:9") || all.contains("no S3 credentials"),
        "the error is about the store: {all}"
    );
    assert!(!dir.join(".dsgconfig.yml").exists() && !dir.join(".dsg").exists());
    // Flags of the other kinds are refused with s3.
    let o = env.run(
        &dir,
        &[
            "init",
            "--no-interactive",
            "--repo-name",
            "N",
            "--repo-type",
            "s3",
            "--endpoint",
            "http://127.0.0.1:9",
            "--bucket",
            "b",
            "--host",
            "h",
        ],
    );
    assert_code(&o, 2, "s3 with --host");
    assert!(
        stderr(&o).contains("--host and --repo-path do not go with"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.join(".dsgconfig.yml").exists());
}

fn help(env: &TestEnv, args: &[&str]) -> String {
    let o = env.run(&env.base, args);
    assert_code(&o, 0, &format!("{args:?}"));
    stdout(&o)
}

/// The visible commands, from the grouped top-level help.
fn commands(top: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_group = false;
    for l in top.lines() {
        if l.ends_with(':') && !l.starts_with(' ') {
            in_group = !["Usage:", "Options:", "Global options:", "Environment:"].contains(&l);
            continue;
        }
        if in_group {
            if let Some(name) = l
                .strip_prefix("  ")
                .and_then(|r| r.split_whitespace().next())
            {
                out.push(name.to_string());
            }
        }
    }
    out
}

#[test]
fn help_groups_commands_and_puts_global_options_under_their_heading() {
    let env = TestEnv::new();
    let top = help(&env, &["--help"]);
    for g in ["Setup:", "Sync:", "History:", "Validation:", "Maintenance:"] {
        assert!(top.contains(&format!("\n{g}\n")), "{top}");
    }
    assert!(
        !top.contains("Commands:") && !top.contains("Other commands"),
        "{top}"
    );
    assert!(!top.contains("Setup: ") && !top.contains("Core:"), "{top}");
    let cmds = commands(&top);
    for c in [
        "init", "clone", "config", "status", "sync", "log", "clean", "prune",
    ] {
        assert!(
            cmds.contains(&c.to_string()),
            "{c} not in a group: {cmds:?}"
        );
    }
    assert!(!cmds.contains(&"agent".to_string()));
    // Every command's help: global options under their own heading, not
    // among the command's options.
    for c in cmds.iter().filter(|c| *c != "help") {
        let h = help(&env, &[c, "--help"]);
        let (own, global) = h
            .split_once("Global options:\n")
            .unwrap_or_else(|| panic!("{c} --help has no Global options heading:\n{h}"));
        for g in ["--json", "--quiet", "--verbose", "--debug", "-C <DIR>"] {
            assert!(
                global.contains(g),
                "{c}: {g} not under Global options:\n{h}"
            );
            assert!(
                !own.contains(g),
                "{c}: {g} among the command's own options:\n{h}"
            );
        }
    }
    // The environment variables dsg reads, one line each.
    let env_section = top.split_once("Environment:\n").unwrap().1;
    for v in [
        "DSG_CONFIG_HOME",
        "DSG_LOCK_TIMEOUT",
        "DSG_SSH_COMMAND",
        "DSG_LOG",
        "DSG_REMOTE_DSG",
        "DSG_ZFS_TIMEOUT",
        "DSG_AGENT_MAX_META",
    ] {
        assert_eq!(
            env_section
                .lines()
                .filter(|l| l.trim_start().starts_with(v))
                .count(),
            1,
            "{v}:\n{top}"
        );
    }
    assert!(!top.contains("DSG_FAILPOINT"));
    // Closed choices show their values.
    assert!(
        help(&env, &["clean", "--help"]).contains("[possible values: cache, temp, backups, all]")
    );
}

#[test]
fn a_blocked_sync_says_how_to_ignore_the_path() {
    let env = TestEnv::new();
    let dir = env.project("p");
    write(&dir, "input/a.csv", "a\n");
    env.init_ok(&dir, "P");
    link(&dir, "input/escape", "../../outside");
    let o = env.run(&dir, &["sync"]);
    assert_code(&o, 3, "sync with an escaping link");
    let e = stderr(&o);
    assert!(
        e.contains("ignore.paths")
            && e.contains("dsg config set --project --add ignore.paths input/escape"),
        "{e}"
    );
    // And the hint works: after it, the sync goes through.
    let o = env.run(
        &dir,
        &[
            "config",
            "set",
            "--project",
            "--add",
            "ignore.paths",
            "input/escape",
        ],
    );
    assert_code(&o, 0, "the hint's command");
    let o = env.run(&dir, &["sync"]);
    assert_code(&o, 0, "sync after ignoring the link");
    // An invalid name: the normalize hint and the ignore hint.
    write(&dir, "input/CON", "x\n");
    let o = env.run(&dir, &["sync"]);
    assert_code(&o, 3, "sync with an invalid name");
    let e = stderr(&o);
    assert!(
        e.contains("--normalize") && e.contains("--add ignore.paths input/CON"),
        "{e}"
    );
}
