//! What `dsg --help` shows beyond clap's defaults: the commands in groups
//! (clap derive has none), the global options under their own heading in
//! every command's help, and the environment variables dsg reads.

use clap::CommandFactory;

use crate::Cli;

/// The heading of the global options (`-C`, `--json`, `-q`, `-v`, `--debug`)
/// in every command's help.
pub const GLOBAL_HEADING: &str = "Global options";

/// Every visible command and its help section, in the order shown. A command
/// missing here fails the `every_command_is_in_a_group` test (and
/// `dsg --help` would list it under "Other commands").
pub const GROUPS: &[(&str, &[&str])] = &[
    ("Setup", &["init", "clone", "config", "list-repos"]),
    ("Sync", &["status", "sync", "list-files"]),
    (
        "History",
        &["log", "diff", "blame", "snapfetch", "snapmount"],
    ),
    (
        "Validation",
        &[
            "validate-config",
            "validate-file",
            "validate-snapshot",
            "validate-chain",
        ],
    ),
    ("Maintenance", &["clean", "prune", "completions", "help"]),
];

/// The environment variables a user may set, one line each. (DSG_FAILPOINT
/// is for the test suite and stays out.)
pub const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "DSG_CONFIG_HOME",
        "Directory holding your dsg.yml (read last: it wins over the others)",
    ),
    (
        "XDG_CONFIG_HOME",
        "$XDG_CONFIG_HOME/dsg/dsg.yml is read after ~/.config/dsg/dsg.yml",
    ),
    (
        "DSG_LOCK_TIMEOUT",
        "Seconds to wait for a repository another command holds (default 30), then exit 4",
    ),
    (
        "DSG_SSH_COMMAND",
        "The ssh command for SSH repositories (default: ssh), e.g. \"ssh -F ~/.ssh/dsg_config\"",
    ),
    (
        "DSG_REMOTE_DSG",
        "Path of dsg on every SSH host (over remote_dsg in dsg.yml)",
    ),
    (
        "DSG_LOG",
        "Log filter for stderr, e.g. debug or dsg_sync=trace (over -v and --debug)",
    ),
    (
        "DSG_ZFS_TIMEOUT",
        "Seconds a zfs command may take on the repository host (default 120)",
    ),
    (
        "DSG_AGENT_MAX_META",
        "Repository host: the most bytes of a snapshot's manifest and messages it accepts",
    ),
];

/// The "Environment:" section after the top-level help.
pub fn environment_help() -> String {
    let w = ENVIRONMENT.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut s = String::from("Environment:\n");
    for (k, v) in ENVIRONMENT {
        s.push_str(&format!("  {k:<w$}  {v}\n"));
    }
    s.trim_end().to_string()
}

/// The group of a command, from [`GROUPS`].
pub fn group_of(name: &str) -> Option<&'static str> {
    GROUPS
        .iter()
        .find(|(_, cmds)| cmds.contains(&name))
        .map(|(g, _)| *g)
}

/// dsg's command line: clap's, with the top-level help's "Commands:" list
/// replaced by one section per group.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    cmd.build();
    // The short layout (one line per option), with the long description.
    let long_about = cmd.get_long_about().cloned();
    let mut short = cmd.clone();
    if let Some(a) = long_about {
        short = short.about(a).long_about(None);
    }
    // -h and --help show the same text here.
    let plain = short
        .render_help()
        .to_string()
        .replace("Print help (see more with '--help')", "Print help");
    let grouped = grouped_commands(&cmd);
    let help = match plain.find("Commands:\n") {
        Some(start) => {
            let end = plain[start..]
                .find("\n\n")
                .map(|e| start + e + 2)
                .unwrap_or(plain.len());
            format!("{}{}{}", &plain[..start], grouped, &plain[end..])
        }
        None => plain,
    };
    cmd.override_help(help)
}

/// One section per group, each command with its one-line description.
fn grouped_commands(cmd: &clap::Command) -> String {
    let visible: Vec<(String, String)> = cmd
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| {
            let about = c.get_about().map(|a| a.to_string()).unwrap_or_default();
            (c.get_name().to_string(), about)
        })
        .collect();
    let w = visible.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let mut sections: Vec<(&str, Vec<&(String, String)>)> =
        GROUPS.iter().map(|(g, _)| (*g, Vec::new())).collect();
    let mut other = Vec::new();
    for (g, names) in GROUPS {
        for n in *names {
            if let Some(c) = visible.iter().find(|(name, _)| name == n) {
                if let Some(s) = sections.iter_mut().find(|(sg, _)| sg == g) {
                    s.1.push(c);
                }
            }
        }
    }
    for c in &visible {
        if group_of(&c.0).is_none() {
            other.push(c);
        }
    }
    sections.push(("Other commands", other));
    let mut s = String::new();
    for (g, cmds) in sections.iter().filter(|(_, c)| !c.is_empty()) {
        s.push_str(&format!("{g}:\n"));
        for (n, about) in cmds {
            s.push_str(format!("  {n:<w$}  {about}").trim_end());
            s.push('\n');
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_is_in_a_group() {
        let mut cmd = Cli::command();
        cmd.build();
        for c in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
            assert!(
                group_of(c.get_name()).is_some(),
                "command {} is in no help group: add it to help::GROUPS",
                c.get_name()
            );
        }
        // And the table names no command that does not exist.
        for (g, names) in GROUPS {
            for n in *names {
                assert!(
                    cmd.find_subcommand(n).is_some(),
                    "{g} lists {n}, which is not a command"
                );
            }
        }
    }

    #[test]
    fn the_top_level_help_has_the_groups_and_the_environment() {
        let help = command().render_help().to_string();
        for (g, _) in GROUPS {
            assert!(help.contains(&format!("\n{g}:\n")), "{help}");
        }
        assert!(!help.contains("Commands:"), "{help}");
        assert!(!help.contains("Other commands"), "{help}");
        assert!(help.contains("Global options:"), "{help}");
        for (k, _) in ENVIRONMENT {
            assert!(help.contains(k), "{help}");
        }
    }
}
