//! Shell completions, man pages and `--version`, checked against the
//! binary's own `--help` (never a copy of the command list).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

fn dsg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsg"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run dsg")
}

fn ok_stdout(args: &[&str]) -> String {
    let o = dsg(args);
    assert!(
        o.status.success(),
        "dsg {args:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8 output")
}

/// The subcommands `dsg --help` lists: lines indented by two spaces whose
/// first word is a lowercase name followed by two spaces (or nothing), in
/// whatever sections the help groups them; clap's own `help` left out.
fn subcommands() -> BTreeSet<String> {
    let help = ok_stdout(&["--help"]);
    let names: BTreeSet<String> = help
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| {
            let name = l.split("  ").next().unwrap_or_default().trim_end();
            let ok = name.starts_with(|c: char| c.is_ascii_lowercase())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            ok.then(|| name.to_string())
        })
        .filter(|n| n != "help")
        .collect();
    for expected in ["init", "sync", "status", "completions"] {
        assert!(
            names.contains(expected),
            "{expected} not in {names:?}\n{help}"
        );
    }
    assert!(
        !names.contains("agent") && !names.contains("man"),
        "{names:?}"
    );
    names
}

/// The long options `dsg <cmd> --help` lists (`--json`, `--offline`, …).
fn long_options(cmd: &str) -> BTreeSet<String> {
    ok_stdout(&[cmd, "--help"])
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| {
            l.split([' ', ',', '=', '['])
                .filter(|w| w.starts_with("--") && w.len() > 2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn completions_name_every_subcommand() {
    let subs = subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let script = ok_stdout(&["completions", shell]);
        assert!(script.len() > 100, "{shell}: {script:?}");
        for sub in &subs {
            assert!(
                script.contains(sub.as_str()),
                "{shell} completions lack {sub}"
            );
        }
    }
    let o = dsg(&["completions", "tcsh"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_writes_one_page_per_subcommand_naming_its_options() {
    let subs = subcommands();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let listed = ok_stdout(&["man", "--out", out.to_str().unwrap()]);
    let mut expected: BTreeSet<String> = subs.iter().map(|s| format!("dsg-{s}.1")).collect();
    expected.insert("dsg.1".to_string());
    let written: BTreeSet<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let printed: BTreeSet<String> = listed
        .lines()
        .map(|l| {
            Path::new(l)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(printed, written, "man pages printed");
    assert!(
        written.is_superset(&expected),
        "{written:?} lacks some of {expected:?}"
    );
    for extra in written.difference(&expected) {
        // A command's own subcommands get pages too: dsg-<command>-<sub>.1.
        assert!(
            subs.iter().any(|s| extra.starts_with(&format!("dsg-{s}-"))),
            "unexpected page {extra}"
        );
    }

    let page = |name: &str| {
        // roff escapes '-' as "\-".
        std::fs::read_to_string(out.join(name))
            .unwrap()
            .replace("\\-", "-")
    };
    let top = page("dsg.1");
    assert!(top.contains(".TH dsg 1"), "{top}");
    for sub in &subs {
        assert!(top.contains(&format!("dsg-{sub}(1)")), "dsg.1 lacks {sub}");
        let text = page(&format!("dsg-{sub}.1"));
        assert!(text.contains(&format!(".TH dsg-{sub} 1")), "{sub}: {text}");
        let options = long_options(sub);
        assert!(options.contains("--json"), "{sub}: {options:?}");
        for opt in &options {
            assert!(
                text.contains(opt.as_str()),
                "man page of {sub} lacks {opt}:\n{text}"
            );
        }
    }
}

#[test]
fn version_names_the_commit() {
    let v = ok_stdout(&["--version"]);
    let v = v.trim();
    assert!(
        v.starts_with(&format!("dsg {} (", env!("CARGO_PKG_VERSION"))) && v.ends_with(')'),
        "{v}"
    );
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match head {
        Ok(o) if o.status.success() => {
            let head = String::from_utf8(o.stdout).unwrap();
            let head = head.trim();
            assert!(
                v.contains(&format!("({head} ")) || v.contains(&format!("({head}-dirty ")),
                "--version {v:?} does not name HEAD {head}"
            );
        }
        _ => {
            eprintln!("not a git checkout: only the version is checked");
        }
    }
}
