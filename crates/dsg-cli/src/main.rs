//! `dsg`: the command line. Thin by design: parse, call the engine, print.

mod config_cmd;
mod docs_cmd;
mod help;
mod history_cmd;
mod human;
mod maint_cmd;
mod mount_cmd;
mod output;
mod prune_cmd;
mod restrict;
mod snap_cmd;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, FromArgMatches, Parser, Subcommand, ValueEnum};
use dsg_core::config::{self, ProjectConfig, RepoType, UserConfig, PROJECT_CONFIG};
use dsg_core::scan::LocalKind;
use dsg_sync::init::InitArgs;
use dsg_sync::{EngineError, Project};
use serde_json::json;

use output::{Out, TermReporter};

#[derive(Parser)]
#[command(
    name = "dsg",
    version = docs_cmd::VERSION,
    about = "dsg - data sync gizmo: versioned, atomic sync of a project's data folders",
    long_about = "dsg keeps the data of a research project (input/, output/, frozen/) versioned in one \
central repository. Every sync publishes a numbered snapshot atomically.",
    after_help = help::environment_help()
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Global {
    /// Run as if dsg was started in DIR (repeatable: each one relative to the previous, like git -C)
    #[arg(short = 'C', value_name = "DIR", global = true, help_heading = help::GLOBAL_HEADING)]
    chdir: Vec<PathBuf>,
    /// Print exactly one JSON document on stdout (messages go to stderr)
    #[arg(long, global = true, help_heading = help::GLOBAL_HEADING)]
    json: bool,
    /// Print only errors
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        help_heading = help::GLOBAL_HEADING
    )]
    quiet: bool,
    /// Print more detail
    #[arg(short, long, global = true, help_heading = help::GLOBAL_HEADING)]
    verbose: bool,
    /// Print debug logs to stderr
    #[arg(long, global = true, help_heading = help::GLOBAL_HEADING)]
    debug: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the first snapshot and the repository
    Init(InitCmd),
    /// Read and change settings: your dsg.yml and the project's .dsgconfig.yml
    Config(config_cmd::ConfigCmd),
    /// Show what sync would do (local vs last sync vs repository)
    Status {
        /// Compare the local tree with the last sync only; do not contact the repository
        #[arg(long)]
        offline: bool,
    },
    /// Publish local changes and fetch the repository's, as one atomic snapshot
    Sync {
        /// Message for the new snapshot
        #[arg(short, long)]
        message: Option<String>,
        /// Show the plan; write nothing
        #[arg(long)]
        dry_run: bool,
        /// Rename files whose names break the filename rules
        #[arg(long)]
        normalize: bool,
        /// Settle the conflicts as conflicts.txt says (written by the sync they blocked)
        #[arg(long = "continue")]
        resume: bool,
        /// When the repository's history no longer holds this project's last sync, rebase on its head (what it would overwrite or delete here becomes a conflict)
        #[arg(long)]
        adopt_repository_history: bool,
        /// Stop if the sync would delete more than PERCENT of the tracked files on either side, or a whole data folder (default: max_delete in dsg.yml, else 50; 100: no limit)
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100))]
        max_delete: Option<u8>,
    },
    /// Fetch the repository's head into a project that has only .dsgconfig.yml
    Clone {
        /// Show the plan; write nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// List the files dsg tracks
    ListFiles {
        /// Only list paths under this directory (relative to the current directory)
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Check the configuration and that the repository is reachable
    ValidateConfig {
        /// Skip the repository check
        #[arg(long)]
        no_backend: bool,
    },
    /// Snapshots, newest first
    Log(history_cmd::LogCmd),
    /// The snapshots that added, changed or deleted a file
    Blame(history_cmd::BlameCmd),
    /// What changed between two snapshots, or since the last sync
    Diff(history_cmd::DiffCmd),
    /// Write a file as it was in a snapshot (verified against its recorded hash)
    Snapfetch(snap_cmd::SnapfetchCmd),
    /// Show a snapshot's whole tree read-only at a folder (runs until unmounted)
    Snapmount(mount_cmd::SnapmountCmd),
    /// Check a local file against the last sync
    ValidateFile(history_cmd::ValidateFileCmd),
    /// Recompute a snapshot's hashes (--deep: re-hash its stored bytes on the repository host)
    ValidateSnapshot(snap_cmd::ValidateDeepCmd),
    /// Recompute every snapshot's hashes and links
    ValidateChain,
    /// Repository side of the protocol (run by dsg itself, locally or over SSH)
    #[command(hide = true)]
    Agent(AgentCmd),
    /// Remove caches, leftovers of dead commands and conflict backups (dry run by default)
    Clean(maint_cmd::CleanCmd),
    /// The repositories at your default host and path (or --host/--repo-path)
    ListRepos(maint_cmd::ListReposCmd),
    /// Remove the data only old snapshots hold (never the head's)
    Prune(prune_cmd::PruneCmd),
    /// Shell completions for bash, zsh or fish, on stdout
    Completions(docs_cmd::CompletionsCmd),
    /// Writes the man pages (dsg.1, dsg-<command>.1) into a directory (for packaging)
    #[command(hide = true)]
    Man(docs_cmd::ManCmd),
}

#[derive(Args)]
struct AgentCmd {
    #[arg(long, required_unless_present = "restrict_to")]
    repo: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = RepoTypeArg::Xfs)]
    r#type: RepoTypeArg,
    #[arg(long)]
    pool: Option<String>,
    /// Serve only repositories in or below DIR (repeatable). Without
    /// --repo, the repository comes from SSH_ORIGINAL_COMMAND, for a forced
    /// command in authorized_keys: command="dsg agent --restrict-to DIR"
    #[arg(long, value_name = "DIR")]
    restrict_to: Vec<PathBuf>,
}

/// `RepoType` for clap, so that a bad value is a usage error listing the
/// choices; kept here to spare dsg-core a clap dependency. The names must stay
/// `RepoType::as_str`'s: the SSH transport passes that to `dsg agent --type`.
#[derive(Clone, Copy, ValueEnum)]
enum RepoTypeArg {
    // No doc comments: clap would turn `--help`'s one-line
    // "[possible values: xfs, zfs]" into a list.
    Xfs,
    Zfs,
    S3,
}

impl From<RepoTypeArg> for RepoType {
    fn from(a: RepoTypeArg) -> RepoType {
        match a {
            RepoTypeArg::Xfs => RepoType::Xfs,
            RepoTypeArg::Zfs => RepoType::Zfs,
            RepoTypeArg::S3 => RepoType::S3,
        }
    }
}

#[derive(Args)]
struct InitCmd {
    /// Repository host: localhost for this machine, else an SSH host
    #[arg(long)]
    host: Option<String>,
    /// Directory on the host that holds repositories (the repository is <repo-path>/<repo-name>)
    #[arg(long)]
    repo_path: Option<PathBuf>,
    /// Repository (project) name
    #[arg(long)]
    repo_name: Option<String>,
    /// Repository type, xfs (any POSIX filesystem), zfs or s3 (an
    /// S3-compatible object store); xfs when not given
    #[arg(long, value_enum)]
    repo_type: Option<RepoTypeArg>,
    /// ZFS pool (zfs only)
    #[arg(long)]
    pool: Option<String>,
    /// Object store URL, e.g. https://s3.example.org (s3 only; credentials
    /// come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws/credentials)
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// Bucket (s3 only; it must exist)
    #[arg(long)]
    bucket: Option<String>,
    /// Key prefix in the bucket (s3 only; the repository is <prefix>/<repo-name>/)
    #[arg(long)]
    prefix: Option<String>,
    /// Region to sign for (s3 only; default AWS_REGION, else us-east-1)
    #[arg(long)]
    region: Option<String>,
    /// Path of dsg on the repository host (default: dsg on its PATH);
    /// saved for the host in your dsg.yml (remote_dsg), not in the project
    /// file
    #[arg(long)]
    remote_dsg: Option<String>,
    /// Never prompt; fail when a value is missing
    #[arg(long)]
    no_interactive: bool,
    /// Overwrite an existing .dsgconfig.yml; replace an existing repository
    /// of this name (destroying its snapshots) after confirmation
    #[arg(long)]
    force: bool,
    /// Confirm, without a prompt, that --force replaces the repository
    /// NAME (its --repo-name)
    #[arg(long, value_name = "NAME", requires = "force")]
    confirm_replace: Option<String>,
    /// Rename files whose names break the filename rules
    #[arg(long)]
    normalize: bool,
    /// Show what would happen; write nothing
    #[arg(long)]
    dry_run: bool,
    /// Message for snapshot s1
    #[arg(short, long)]
    message: Option<String>,
}

fn main() -> ExitCode {
    // A fixed mmap threshold: glibc otherwise raises it after the first
    // large free, and the big manifest vectors then come from the heap and
    // are never returned while we build the next one.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    let cli = match help::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let g = cli.global.clone();
    output::init_logging(g.debug, g.verbose);
    let out = Out::new(g.json, g.quiet, g.verbose);
    // -C before anything else looks at the current directory.
    if let Err(e) = change_dirs(&g.chdir) {
        let code = e.exit_code();
        out.error(&e, code);
        return ExitCode::from(code as u8);
    }
    let writes = matches!(
        cli.cmd,
        Cmd::Init(_) | Cmd::Sync { .. } | Cmd::Clone { .. } | Cmd::Snapfetch(_)
    );
    let _ = ctrlc::set_handler(move || {
        if writes {
            // The engine checks this flag, rolls back and exits 130.
            dsg_sync::INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    });
    let result = run(cli.cmd, &out);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            out.error(&e, code);
            ExitCode::from(code as u8)
        }
    }
}

/// clap's own errors (bad values, unknown options) are usage errors too:
/// under `--json` they also get the one JSON document on stdout.
fn usage_error(e: clap::Error) -> ExitCode {
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    if !json || !e.use_stderr() {
        // --help and --version print to stdout and exit 0.
        e.exit();
    }
    let _ = e.print();
    let text = e.render().to_string();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    let rest = lines.collect::<Vec<_>>().join("\n");
    let rest = rest.trim();
    let code = e.exit_code();
    Out::new(true, false, false).json_doc(&json!({
        "status": "error",
        "error": first.strip_prefix("error: ").unwrap_or(first),
        "hint": (!rest.is_empty()).then_some(rest),
        "paths": [],
        "exit_code": code,
    }));
    ExitCode::from(code as u8)
}

/// git's `-C`: each DIR relative to the one before (an empty one is
/// ignored, as git does).
fn change_dirs(dirs: &[PathBuf]) -> Result<(), EngineError> {
    for d in dirs.iter().filter(|d| !d.as_os_str().is_empty()) {
        std::env::set_current_dir(d).map_err(|e| {
            let abs = std::path::absolute(d).unwrap_or_else(|_| d.clone());
            EngineError::Usage(format!(
                "-C {}: cannot change to {}: {e}",
                d.display(),
                abs.display()
            ))
        })?;
    }
    Ok(())
}

fn cwd() -> Result<PathBuf, EngineError> {
    std::env::current_dir().map_err(|e| EngineError::io(".", e))
}

fn run(cmd: Cmd, out: &Out) -> Result<(), EngineError> {
    match cmd {
        Cmd::Init(a) => cmd_init(a, out),
        Cmd::Config(a) => config_cmd::cmd_config(a, out),
        Cmd::Status { offline } => cmd_status(offline, out),
        Cmd::Sync {
            message,
            dry_run,
            normalize,
            resume,
            adopt_repository_history,
            max_delete,
        } => cmd_sync(
            dsg_sync::sync::SyncOpts {
                dry_run,
                normalize,
                message,
                resume_conflicts: resume,
                adopt_history: adopt_repository_history,
                max_delete,
                counts_only: false,
            },
            out,
        ),
        Cmd::Clone { dry_run } => cmd_clone(dry_run, out),
        Cmd::ListFiles { path } => cmd_list_files(path, out),
        Cmd::ValidateConfig { no_backend } => cmd_validate_config(no_backend, out),
        Cmd::Log(a) => history_cmd::log(a, out),
        Cmd::Blame(a) => history_cmd::blame(a, out),
        Cmd::Diff(a) => history_cmd::diff(a, out),
        Cmd::Snapfetch(a) => snap_cmd::cmd_snapfetch(a, out),
        Cmd::Snapmount(a) => mount_cmd::cmd_snapmount(a, out),
        Cmd::Prune(a) => prune_cmd::cmd_prune(a, out),
        Cmd::ValidateFile(a) => history_cmd::validate_file(a, out),
        Cmd::ValidateSnapshot(a) if a.deep => snap_cmd::cmd_validate_deep(a, out),
        Cmd::ValidateSnapshot(a) => history_cmd::validate_snapshot(
            history_cmd::ValidateSnapshotCmd {
                snapshot: a.snapshot,
            },
            out,
        ),
        Cmd::ValidateChain => history_cmd::validate_chain(out),
        Cmd::Agent(a) => cmd_agent(a),
        Cmd::Clean(a) => maint_cmd::cmd_clean(a, out),
        Cmd::ListRepos(a) => maint_cmd::cmd_list_repos(a, out),
        Cmd::Completions(a) => docs_cmd::completions(a),
        Cmd::Man(a) => docs_cmd::man(a),
    }
}

/// Opens the project and finishes anything an interrupted command left.
fn open_project() -> Result<Project, EngineError> {
    let project = Project::find(&cwd()?)?;
    let cfg = project.config.clone();
    dsg_sync::recover::recover_init(&project.root, || dsg_repo::RepoClient::connect(&cfg).ok())?;
    Ok(project)
}

/// Opens the project, connects to its repository, and recovers both sides.
fn open_connected() -> Result<(Project, dsg_repo::RepoClient), EngineError> {
    let project = open_project()?;
    let mut client = dsg_repo::RepoClient::connect(&project.config)?;
    client.recover()?;
    dsg_sync::local_tx::recover_sync(&project, Some(&mut client))?;
    Ok((project, client))
}

fn print_renames(out: &Out, renames: &[dsg_sync::init::RenameOut], dry_run: bool) {
    let verb = if dry_run { "would rename" } else { "renamed" };
    for r in renames {
        out.line(&format!("{verb} {} -> {}", r.from, r.to));
    }
}

fn print_plan(out: &Out, report: &dsg_sync::sync::SyncReport, verb: &str) {
    if let Some(f) = &report.adopted_history {
        out.note(&f.note(!report.dry_run, !report.plan.resolved.is_empty()));
    }
    if report.stale_conflicts_file_removed {
        out.note("no conflict is left: conflicts.txt was stale and is removed; syncing normally");
    }
    if out.json {
        out.json_doc(
            &json!({"status": "ok", "command": verb, "result": report, "files": report.plan.files}),
        );
        return;
    }
    print_renames(out, &report.renames, report.dry_run);
    if report.dry_run {
        out.line("Dry run: nothing was written. Plan:");
        for r in &report.plan.files {
            out.line(&format!(
                "  {:<13} {}  ({})",
                serde_json::to_value(r.action)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                r.path,
                r.state.label()
            ));
        }
    }
    if report.up_to_date {
        out.line("Everything up to date");
        return;
    }
    if !report.dry_run {
        out.line(&format!(
            "{}{}",
            output::sync_summary(&report.plan, report.snapshot_id.as_deref()),
            out.took()
        ));
    }
}

fn cmd_sync(opts: dsg_sync::sync::SyncOpts, out: &Out) -> Result<(), EngineError> {
    let project = open_project()?;
    if project.root != cwd()? {
        // Sync changes the whole tree; running it from a subdirectory would
        // surprise. Say where the project is.
        tracing::info!("project root is {}", project.root.display());
    }
    let reporter = TermReporter::new(out);
    let report = dsg_sync::sync::sync(&project, opts, &reporter)?;
    print_plan(out, &report, "sync");
    Ok(())
}

fn cmd_clone(dry_run: bool, out: &Out) -> Result<(), EngineError> {
    let dir = cwd()?;
    if !dir.join(PROJECT_CONFIG).is_file() {
        return Err(EngineError::State {
            message: format!("no {PROJECT_CONFIG} in {}", dir.display()),
            hint: "run clone in a directory holding the project's .dsgconfig.yml (usually from its git repository)".into(),
        });
    }
    first_run(true, out)?;
    let project = Project::open(&dir)?;
    let reporter = TermReporter::new(out);
    let report = dsg_sync::sync::clone(
        &project,
        dsg_sync::sync::SyncOpts {
            dry_run,
            // Only --json prints the lists of files.
            counts_only: !out.json,
            ..Default::default()
        },
        &reporter,
    )?;
    print_plan(out, &report, "clone");
    Ok(())
}

/// `init --force` over an existing repository destroys its history: the
/// user confirms by naming it, at a prompt or with `--confirm-replace`.
fn confirm_replace(
    ex: &dsg_sync::init::Existing,
    name: &str,
    given: Option<String>,
    interactive: bool,
) -> Result<bool, EngineError> {
    let what = format!(
        "{} already exists (head {}, {} files); replacing it destroys all its snapshots",
        ex.location,
        ex.head.as_deref().unwrap_or("unknown"),
        ex.files
    );
    let answer = match given {
        Some(g) => g,
        None if interactive => prompt(
            &format!("{what}.\nType its name ({name}) to replace it"),
            None,
        )?,
        None => {
            return Err(EngineError::State {
                message: format!("{what}; nothing was changed"),
                hint: format!(
                    "to replace it, run in a terminal and confirm, or pass --confirm-replace {name}"
                ),
            })
        }
    };
    if answer.trim() != name {
        return Err(EngineError::State {
            message: format!(
                "{what}; the confirmation {answer:?} does not name it, so nothing was changed"
            ),
            hint: format!("confirm with its name: {name}"),
        });
    }
    Ok(true)
}

pub(crate) fn prompt(label: &str, default: Option<&str>) -> Result<String, EngineError> {
    use std::io::Write;
    let mut stderr = std::io::stderr();
    match default {
        Some(d) => write!(stderr, "{label} [{d}]: "),
        None => write!(stderr, "{label}: "),
    }
    .and_then(|_| stderr.flush())
    .map_err(|e| EngineError::io("stderr", e))?;
    let mut line = String::new();
    let n = std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| EngineError::io("stdin", e))?;
    if n == 0 {
        return Err(EngineError::Usage(format!(
            "no value for {label} (end of input)"
        )));
    }
    let v = line.trim().to_string();
    Ok(if v.is_empty() {
        default.unwrap_or("").to_string()
    } else {
        v
    })
}

/// First run: without any user configuration, on a terminal, offer to
/// write it (name and e-mail, checked as loading checks them); elsewhere
/// the loader's error stands, with its hint.
fn first_run(allowed: bool, out: &Out) -> Result<(), EngineError> {
    let paths = config::user_config_paths();
    match UserConfig::load_from(&paths) {
        Err(e @ config::ConfigError::NoUserConfig { .. }) => {
            if !(allowed && std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
                return Err(e.into());
            }
        }
        _ => return Ok(()),
    }
    let file = dsg_core::config_edit::user_target(&paths)?;
    eprintln!(
        "dsg has no user configuration yet: it records your name and e-mail with every snapshot."
    );
    eprintln!(
        "They will be saved in {} (change them later with 'dsg config set').",
        file.display()
    );
    let name = loop {
        let n = prompt("Your name", None)?;
        if !n.trim().is_empty() {
            break n;
        }
        eprintln!("a name is required");
    };
    let id = loop {
        let id = prompt("Your e-mail", None)?;
        match config::normalize_email(&id) {
            Ok(_) => break id,
            Err(why) => eprintln!("{id:?}: {why}; an e-mail address such as you@example.org"),
        }
    };
    use dsg_core::config_edit::{plan_user, Change};
    let edit = plan_user(
        &paths,
        &[
            ("user_name".into(), Change::Set(vec![name])),
            ("user_id".into(), Change::Set(vec![id])),
        ],
    )?;
    edit.write()?;
    out.note(&format!(
        "saved your name and e-mail in {}",
        edit.file.display()
    ));
    Ok(())
}

fn cmd_init(a: InitCmd, out: &Out) -> Result<(), EngineError> {
    first_run(!a.no_interactive, out)?;
    let interactive = !a.no_interactive && std::io::stdin().is_terminal();
    let need = |v: Option<String>,
                label: &str,
                flag: &str,
                default: Option<&str>|
     -> Result<String, EngineError> {
        match v {
            Some(v) => Ok(v),
            None if interactive => prompt(label, default),
            None => match default {
                Some(d) => Ok(d.to_string()),
                None => Err(EngineError::Usage(format!(
                    "{label} is required: pass {flag} (or run in a terminal to be asked)"
                ))),
            },
        }
    };
    let repo_name = need(a.repo_name, "Repository name", "--repo-name", None)?;
    // The type first: it decides what else is asked (an s3 repository has
    // no host or path).
    let repo_type = match a.repo_type {
        Some(t) => t.into(),
        None if a.endpoint.is_some() || a.bucket.is_some() => RepoType::S3,
        None => {
            let s = need(
                None,
                "Repository type (xfs, zfs or s3)",
                "--repo-type",
                Some("xfs"),
            )?;
            RepoType::parse(&s).ok_or_else(|| {
                EngineError::Usage(format!("--repo-type {s:?}: use xfs, zfs or s3"))
            })?
        }
    };
    let (host, repo_path) = if repo_type == RepoType::S3 {
        if a.host.is_some() || a.repo_path.is_some() {
            return Err(EngineError::Usage(
                "--host and --repo-path do not go with --repo-type s3 (it takes --endpoint, --bucket, --prefix)".into(),
            ));
        }
        ("localhost".to_string(), "/".to_string())
    } else {
        let host = need(
            a.host,
            "Repository host (localhost, or an ssh host)",
            "--host",
            Some("localhost"),
        )?;
        let repo_path = need(
            a.repo_path.map(|p| p.display().to_string()),
            "Repository path on the host",
            "--repo-path",
            None,
        )?;
        (host, repo_path)
    };
    let s3 = if repo_type == RepoType::S3 {
        let endpoint = need(a.endpoint, "Object store URL", "--endpoint", None)?;
        let bucket = need(a.bucket, "Bucket", "--bucket", None)?;
        Some(dsg_core::config::S3Location {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            bucket,
            prefix: a.prefix.unwrap_or_default().trim_matches('/').to_string(),
            region: a.region,
        })
    } else {
        if a.endpoint.is_some() || a.bucket.is_some() || a.prefix.is_some() {
            return Err(EngineError::Usage(
                "--endpoint, --bucket and --prefix go with --repo-type s3".into(),
            ));
        }
        None
    };
    let pool = if repo_type == RepoType::Zfs {
        Some(need(a.pool, "ZFS pool", "--pool", None)?)
    } else {
        a.pool
    };
    let dir = cwd()?;
    // An earlier init that was interrupted is finished or undone first.
    if dir.join(PROJECT_CONFIG).is_file() {
        if let Ok(cfg) = ProjectConfig::load(&dir.join(PROJECT_CONFIG)) {
            dsg_sync::recover::recover_init(&dir, || dsg_repo::RepoClient::connect(&cfg).ok())?;
        }
    }
    let reporter = TermReporter::new(out);
    let mut args = InitArgs {
        host,
        repo_path: PathBuf::from(repo_path),
        repo_name,
        repo_type,
        pool,
        s3,
        remote_dsg: a.remote_dsg,
        force: a.force,
        replace: false,
        confirmed_hash: None,
        normalize: a.normalize,
        dry_run: a.dry_run,
        message: a.message,
    };
    if a.force && !a.dry_run && !dir.join(".dsg").exists() {
        if let Some(ex) = dsg_sync::init::existing_repository(&args)? {
            args.replace = confirm_replace(&ex, &args.repo_name, a.confirm_replace, interactive)?;
            args.confirmed_hash = ex.head_file_hash.clone();
        }
    }
    let (host, remote_dsg) = (args.host.clone(), args.remote_dsg.clone());
    let report = dsg_sync::init::init(&cwd()?, args, &reporter)?;
    if out.json {
        out.json_doc(&json!({"status": "ok", "command": "init", "result": report}));
        return Ok(());
    }
    print_renames(out, &report.renames, report.dry_run);
    if report.dry_run {
        out.line(&format!(
            "Dry run: would create {} with snapshot s1 of {} and {} ({}); nothing was written",
            report.repository,
            human::count(report.files, "file"),
            human::count(report.links, "link"),
            human::bytes(report.bytes)
        ));
    } else {
        out.line(&format!(
            "Initialized {} with snapshot s1: {}, {}, {}{}",
            report.repository,
            human::count(report.files, "file"),
            human::count(report.links, "link"),
            human::bytes(report.bytes),
            out.took()
        ));
    }
    if let (Some(file), Some(path)) = (&report.remote_dsg_config, &remote_dsg) {
        let verb = match (report.dry_run, report.remote_dsg_changed) {
            (_, false) => "is already in",
            (true, true) => "would be saved in",
            (false, true) => "saved in",
        };
        out.line(&format!(
            "The server's dsg ({path}) for host {host} {verb} your user config {} (not in {PROJECT_CONFIG}, which the original dsg must be able to read)",
            file.display()
        ));
    }
    Ok(())
}

fn cmd_status(offline: bool, out: &Out) -> Result<(), EngineError> {
    let (project, mut client) = if offline {
        let p = open_project()?;
        if let Err(e) = dsg_sync::local_tx::recover_sync(&p, None) {
            out.warn(&e.to_string());
        }
        (p, None)
    } else {
        let (p, c) = open_connected()?;
        (p, Some(c))
    };
    let reporter = TermReporter::new(out);
    let opts = dsg_sync::status::CompareOpts {
        save_stat_cache: true,
        ..Default::default()
    };
    let cmp = dsg_sync::status::compare(&project, client.as_mut(), opts, &reporter)?;
    let rows = cmp.rows();
    // Offline, R is the cache: there is no history to check.
    let outlook = match client.as_mut() {
        Some(c) => dsg_sync::sync::outlook(&project, &cmp, &rows, c)?,
        None => Default::default(),
    };
    if let Some(c) = client {
        let _ = c.close();
    }
    if out.json {
        let problems: Vec<_> = cmp
            .problems()
            .iter()
            .map(|p| json!({"path": p.path, "message": p.message}))
            .collect();
        out.json_doc(&json!({
            "status": "ok",
            "command": "status",
            "offline": offline,
            "has_cache": cmp.has_cache,
            "files": with_choices(&rows, &outlook.conflicts),
            "problems": problems,
            "blocked": outlook.blocked,
            "adopts_history": outlook.adopts_history,
            "conflicts": outlook.conflicts,
        }));
        return Ok(());
    }
    output::print_status(out, &rows, cmp.problems(), offline, cmp.has_cache);
    output::print_outlook(out, &outlook);
    // The process ends here: freeing three manifests entry by entry (a
    // few percent of a warm status) would only give memory back to it.
    std::mem::forget(cmp);
    Ok(())
}

/// The status rows as JSON, each conflict with its reason and the choices
/// `conflicts.txt` offers for it.
fn with_choices(
    rows: &[dsg_sync::status::Row],
    conflicts: &[dsg_sync::conflicts::Conflict],
) -> serde_json::Value {
    let by_path: std::collections::HashMap<&str, &dsg_sync::conflicts::Conflict> =
        conflicts.iter().map(|c| (c.path.as_str(), c)).collect();
    rows.iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            if let (Some(c), Some(m)) = (by_path.get(&*r.path), v.as_object_mut()) {
                m.insert("reason".into(), json!(c.reason));
                m.insert("choices".into(), json!(c.choices));
            }
            v
        })
        .collect()
}

fn cmd_list_files(path: Option<PathBuf>, out: &Out) -> Result<(), EngineError> {
    let project = open_project()?;
    let prefix = match path {
        None => None,
        Some(p) => {
            let abs = std::path::absolute(cwd()?.join(&p)).map_err(|e| EngineError::io(&p, e))?;
            if !abs.is_dir() {
                return Err(EngineError::Usage(format!(
                    "{} is not a directory",
                    p.display()
                )));
            }
            let rel = abs.strip_prefix(&project.root).map_err(|_| {
                EngineError::Usage(format!(
                    "{} is outside the project {}",
                    p.display(),
                    project.root.display()
                ))
            })?;
            let rel = rel.to_string_lossy().to_string();
            (!rel.is_empty()).then_some(rel)
        }
    };
    let under = |p: &str| match &prefix {
        None => true,
        Some(pre) => p == pre || p.starts_with(&format!("{pre}/")),
    };
    let scan = project.scan(&TermReporter::new(out));
    project.save_stat_cache(&scan);
    let files: Vec<_> = scan.entries.iter().filter(|e| under(&e.path)).collect();
    let ignored: Vec<_> = scan.ignored.iter().filter(|p| under(p)).collect();
    let problems: Vec<_> = scan.problems.iter().filter(|p| under(&p.path)).collect();
    let total: u64 = files
        .iter()
        .map(|e| match e.kind {
            LocalKind::File { size, .. } => size,
            _ => 0,
        })
        .sum();
    if out.json {
        let list: Vec<_> = files
            .iter()
            .map(|e| match &e.kind {
                LocalKind::File { size, hash } => {
                    json!({"path": e.path, "type": "file", "size": size, "hash": hash.to_hex()})
                }
                LocalKind::Link { target } => {
                    json!({"path": e.path, "type": "link", "target": target})
                }
            })
            .collect();
        out.json_doc(&json!({
            "status": "ok", "command": "list-files", "files": list, "ignored": ignored,
            "problems": problems.iter().map(|p| json!({"path": p.path, "message": p.message})).collect::<Vec<_>>(),
            "total_files": files.len(), "total_bytes": total, "hidden_skipped": scan.hidden,
        }));
        return Ok(());
    }
    for e in &files {
        match &e.kind {
            LocalKind::File { size, .. } => {
                out.line(&format!("{:>10}  {}", human::bytes(*size), e.path))
            }
            LocalKind::Link { target } => {
                out.line(&format!("{:>10}  {} -> {}", "link", e.path, target))
            }
        }
    }
    if out.verbose {
        for p in &ignored {
            out.line(&format!("{:>10}  {}", "ignored", p));
        }
    }
    for p in &problems {
        out.warn(&format!("{}: {}", p.path, p.message));
    }
    out.summary(&format!(
        "{} tracked ({}), {} ignored, {} hidden skipped, {} with problems",
        files.len(),
        human::bytes(total),
        ignored.len(),
        scan.hidden,
        problems.len()
    ));
    Ok(())
}

fn cmd_validate_config(no_backend: bool, out: &Out) -> Result<(), EngineError> {
    let mut checks: Vec<(String, bool, String)> = Vec::new();
    let root = config::find_project_root(&cwd()?);
    let project_cfg = match &root {
        Ok(r) => match ProjectConfig::load(&r.join(PROJECT_CONFIG)) {
            Ok(c) => {
                checks.push((
                    "project config".into(),
                    true,
                    format!(
                        "{} ({}{})",
                        r.join(PROJECT_CONFIG).display(),
                        if c.legacy_format {
                            "legacy transport format, "
                        } else {
                            ""
                        },
                        format_args!(
                            "repository {}:{} type {}",
                            c.repository.host,
                            c.repo_dir().display(),
                            c.repository.kind.as_str()
                        )
                    ),
                ));
                Some(c)
            }
            Err(e) => {
                checks.push(("project config".into(), false, e.to_string()));
                None
            }
        },
        Err(e) => {
            checks.push(("project config".into(), false, e.to_string()));
            None
        }
    };
    match UserConfig::load() {
        Ok(u) => checks.push((
            "user config".into(),
            true,
            format!(
                "{} <{}> from {}",
                u.user_name,
                u.user_id,
                u.sources
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        Err(e) => checks.push(("user config".into(), false, e.to_string())),
    }
    if let (Some(c), false) = (&project_cfg, no_backend) {
        let r = (|| -> Result<String, EngineError> {
            let mut client = dsg_repo::RepoClient::connect(c)?;
            if !client.repo_exists {
                return Err(EngineError::State {
                    message: format!(
                        "{} on {} is not a dsg repository (no .dsg/last-sync.json)",
                        c.repo_dir().display(),
                        c.repository.host
                    ),
                    hint:
                        "check mountpoint and name in .dsgconfig.yml, or create it with 'dsg init'"
                            .into(),
                });
            }
            let remote = dsg_sync::status::fetch_remote(&mut client, None)?
                .map(|r| r.0)
                .unwrap_or_default();
            let _ = client.close();
            Ok(format!(
                "{}:{} reachable, head {}",
                c.repository.host,
                c.repo_dir().display(),
                remote
                    .metadata
                    .as_ref()
                    .map(|m| m.snapshot_id.as_str())
                    .unwrap_or("?")
            ))
        })();
        match r {
            Ok(msg) => checks.push(("repository".into(), true, msg)),
            Err(e) => checks.push(("repository".into(), false, e.to_string())),
        }
    }
    let all_ok = checks.iter().all(|c| c.1);
    if out.json {
        out.json_doc(&json!({
            "status": if all_ok { "ok" } else { "error" },
            "command": "validate-config",
            "checks": checks.iter().map(|(n, ok, m)| json!({"name": n, "passed": ok, "message": m})).collect::<Vec<_>>(),
            "all_passed": all_ok,
        }));
    } else {
        for (n, ok, m) in &checks {
            out.line(&format!("{} {n}: {m}", if *ok { "✓" } else { "✗" }));
        }
    }
    if all_ok {
        Ok(())
    } else {
        Err(EngineError::Reported {
            message: "configuration check failed".into(),
            hint: "fix the items marked ✗ above".into(),
            code: 1,
        })
    }
}

fn cmd_agent(a: AgentCmd) -> Result<(), EngineError> {
    if a.restrict_to.is_empty() {
        let repo = a.repo.expect("clap requires --repo without --restrict-to");
        return serve_agent(repo, a.r#type.into(), a.pool);
    }
    let target = match a.repo {
        Some(repo) => restrict::Target {
            repo,
            kind: a.r#type.into(),
            pool: a.pool,
        },
        None => forced_command_target()?,
    };
    match restrict::check(&target.repo, &a.restrict_to) {
        Ok(real) => serve_agent(real, target.kind, target.pool),
        Err(refusal) => {
            refuse_first_request(&refusal);
            Err(EngineError::State {
                message: refusal.message,
                hint: refusal.hint,
            })
        }
    }
}

/// The client's request when sshd ran us as a forced command: sshd puts
/// what the client asked to run in SSH_ORIGINAL_COMMAND, and that is all
/// the client controls. Refusals are usage errors (exit 2) on stderr only:
/// a client that sent a shell command does not speak the protocol.
fn forced_command_target() -> Result<restrict::Target, EngineError> {
    let hint = "this SSH key only runs the dsg repository agent: connect with dsg (init, sync, \
                clone), which sends `dsg agent --repo DIR --type T`";
    let Some(cmd) = std::env::var_os("SSH_ORIGINAL_COMMAND") else {
        return Err(EngineError::Usage(format!(
            "agent: --restrict-to without --repo takes the repository from SSH_ORIGINAL_COMMAND, \
             which is not set (no command was requested)\nhint: {hint}; or give --repo"
        )));
    };
    let cmd = cmd.to_string_lossy();
    restrict::parse_original_command(&cmd).map_err(|why| {
        EngineError::Usage(format!(
            "agent: refused to run {cmd:?}: {why}\nhint: {hint}"
        ))
    })
}

/// A dsg client reads nothing from stderr until its connection fails, so
/// the refusal is also the answer to its first request (its `hello`),
/// where it becomes the client's error message.
fn refuse_first_request(refusal: &restrict::Refusal) {
    use dsg_repo::protocol::{read_frame, write_json, ErrorKind, RemoteError, Response};
    use std::io::Write;
    let mut stdin = std::io::stdin().lock();
    if read_frame(&mut stdin).is_err() {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    let reply = Response::Err(RemoteError {
        kind: ErrorKind::Unsafe,
        message: refusal.message.clone(),
        hint: Some(refusal.hint.clone()),
    });
    let _ = write_json(&mut stdout, &reply).and_then(|()| stdout.flush());
}

fn serve_agent(repo: PathBuf, kind: RepoType, pool: Option<String>) -> Result<(), EngineError> {
    if kind == RepoType::Zfs && pool.is_none() {
        return Err(EngineError::Usage("agent: --type zfs needs --pool".into()));
    }
    let backend = dsg_repo::open(kind, &repo, pool.as_deref());
    let mut backend = backend.map_err(|e| EngineError::State {
        message: e.message.clone(),
        hint: e
            .hint
            .clone()
            .unwrap_or_else(|| "check --repo, --type and --pool of 'dsg agent'".into()),
    })?;
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    dsg_repo::agent::serve(&mut *backend, Box::new(stdin) as Box<dyn Read>, stdout)
        .map_err(|e| EngineError::io("agent stdio", e))
}
