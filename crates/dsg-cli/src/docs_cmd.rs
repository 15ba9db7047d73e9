//! `dsg completions` and the hidden `dsg man`: shell completions and man
//! pages generated from the clap definitions in main.rs (the one source of
//! truth for both), and the `--version` string.

use std::io::Write;
use std::path::PathBuf;

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

/// Writes one man page for dsg and one per non-hidden subcommand into
/// `a.out`, and prints their paths.
pub fn man(a: ManCmd) -> Result<(), EngineError> {
    std::fs::create_dir_all(&a.out).map_err(|e| EngineError::io(&a.out, e))?;
    // Built as clap_mangen::generate_to does (so that a subcommand's page
    // is named dsg-<command> and lists the global options), plus a footer
    // with the version.
    let mut cmd = crate::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let source = format!("dsg {}", env!("CARGO_PKG_VERSION"));
    let mut pages = Vec::new();
    let subs = cmd.get_subcommands().filter(|s| !s.is_hide_set());
    for c in std::iter::once(&cmd).chain(subs) {
        let page = clap_mangen::Man::new(c.clone())
            .source(source.clone())
            .manual("dsg manual")
            .generate_to(&a.out)
            .map_err(|e| EngineError::io(&a.out, e))?;
        pages.push(format!("{}\n", page.display()));
    }
    write_stdout(pages.concat().as_bytes())
}

fn write_stdout(bytes: &[u8]) -> Result<(), EngineError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| EngineError::io("<stdout>", e))
}
