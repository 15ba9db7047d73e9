//! `dsg completions` and the hidden `dsg man`: shell completions and man
//! pages generated from the clap definitions in main.rs (the one source of
//! truth for both), and the `--version` string.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory};
use clap_complete::Shell;
use dsg_sync::EngineError;

/// `dsg --version`: the package version and the commit it was built from
/// (`0.5.0 (4931af9 2026-12-06)`; `unknown` outside a git checkout), set by
/// build.rs.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("DSG_BUILD_COMMIT"),
    ")"
);

#[derive(Args)]
#[command(after_long_help = "\
Install (for your user; the Debian package installs them system-wide):
  bash: dsg completions bash > ~/.local/share/bash-completion/completions/dsg
  zsh:  dsg completions zsh > ~/.zfunc/_dsg   (with fpath+=(~/.zfunc) before compinit in ~/.zshrc)
  fish: dsg completions fish > ~/.config/fish/completions/dsg.fish")]
pub struct CompletionsCmd {
    /// The shell to write completions for
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Args)]
pub struct ManCmd {
    /// Directory to write dsg.1 and dsg-<command>.1 into (created if missing)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Writes the completion script for `a.shell` to stdout.
pub fn completions(a: CompletionsCmd) -> Result<(), EngineError> {
    let mut cmd = crate::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "dsg", &mut script);
    write_stdout(&script)
}

/// Writes one man page for dsg and one per non-hidden subcommand (and
/// sub-subcommand) into `a.out`, and prints their paths.
pub fn man(a: ManCmd) -> Result<(), EngineError> {
    std::fs::create_dir_all(&a.out).map_err(|e| EngineError::io(&a.out, e))?;
    let cmd = crate::Cli::command().disable_help_subcommand(true);
    let source = format!("dsg {}", env!("CARGO_PKG_VERSION"));
    let mut pages = Vec::new();
    write_pages(cmd, &a.out, &source, &mut pages)?;
    let list = pages
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect::<Vec<_>>();
    write_stdout(list.concat().as_bytes())
}

/// As clap_mangen::generate_to (a built command, so that a subcommand's
/// page is dsg-<command>.1 and lists the global options), with the version
/// in the footer.
fn write_pages(
    mut cmd: clap::Command,
    out: &Path,
    source: &str,
    pages: &mut Vec<PathBuf>,
) -> Result<(), EngineError> {
    cmd.build();
    let page = clap_mangen::Man::new(cmd.clone())
        .source(source)
        .manual("dsg manual")
        .generate_to(out)
        .map_err(|e| EngineError::io(out, e))?;
    pages.push(page);
    for sub in cmd.get_subcommands() {
        if !sub.is_hide_set() && sub.get_name() != "help" {
            write_pages(sub.clone(), out, source, pages)?;
        }
    }
    Ok(())
}

fn write_stdout(bytes: &[u8]) -> Result<(), EngineError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| EngineError::io("<stdout>", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_subcommands_get_their_own_pages() {
        let cmd = clap::Command::new("dsg")
            .arg(clap::Arg::new("json").long("json").global(true).num_args(0))
            .subcommand(
                clap::Command::new("config")
                    .subcommand(clap::Command::new("get"))
                    .subcommand(clap::Command::new("secret").hide(true)),
            )
            .disable_help_subcommand(true);
        let dir = tempfile::tempdir().unwrap();
        let mut pages = Vec::new();
        write_pages(cmd, dir.path(), "dsg 0", &mut pages).unwrap();
        let names: Vec<_> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["dsg.1", "dsg-config.1", "dsg-config-get.1"]);
        let get = std::fs::read_to_string(dir.path().join("dsg-config-get.1")).unwrap();
        assert!(get.contains("\\-\\-json"), "{get}");
    }
}
