//! `init`: make the first snapshot `s1` of a project and create its
//! repository, atomically on both sides.
//!
//! Order, and why: the local `.dsg/` is prepared in `.dsg.init-<tx>/`, the
//! repository is built in a staging directory beside its final place, and
//! the agent's rename of that directory into place is the commit point.
//! Only then is `.dsg.init-<tx>` renamed to `.dsg`. A failure before the
//! commit point removes both staging directories (and a `.dsgconfig.yml`
//! this init created); a crash after it is rolled forward by the next
//! command (`recover.rs`), which finds the repository holding the staged
//! snapshot.

use std::path::{Path, PathBuf};

use dsg_core::atomic::{sync_dir, write_atomic};
use dsg_core::config::{
    plan_remote_dsg, user_config_paths, ProjectConfig, RemoteDsg, RemoteDsgEdit, RepoType,
    Repository, UserConfig, PROJECT_CONFIG,
};
use dsg_core::manifest::{EntryKind, Manifest, SyncMessages};
use dsg_core::scan::{to_manifest, LocalKind, ScanResult, StatCache};
use dsg_repo::failpoint::failpoint;
use dsg_repo::{Connecting, Meta, RepoClient};

pub use crate::names::RenameOut;
use crate::names::{block_on_problems, settle_names};
use crate::project::DSG_DIR;
use crate::recover::finish_local_init;
use crate::retry::Retries;
use crate::sync::HashingWriter;
use crate::upload::{upload, Item, Target};
use crate::{check_interrupt, EngineError, Project, Reporter, Result};

pub struct InitArgs {
    pub host: String,
    pub repo_path: PathBuf,
    pub repo_name: String,
    pub repo_type: RepoType,
    pub pool: Option<String>,
    /// Where an s3 repository lives (`--repo-type s3`).
    pub s3: Option<dsg_core::config::S3Location>,
    pub remote_dsg: Option<String>,
    pub force: bool,
    /// Replace the repository if it exists. Only with `force`, and only
    /// after the user confirmed it (see `existing_repository`).
    pub replace: bool,
    /// The XXH3 (hex) of the head manifest file the user confirmed
    /// replacing: the repository refuses if it holds another one by then.
    pub confirmed_hash: Option<String>,
    pub normalize: bool,
    pub dry_run: bool,
    pub message: Option<String>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct InitReport {
    pub dry_run: bool,
    pub snapshot_id: String,
    pub snapshot_hash: Option<String>,
    pub files: u64,
    pub links: u64,
    pub bytes: u64,
    pub repository: String,
    pub renames: Vec<RenameOut>,
    /// The user config file that holds (or, in a dry run, would hold) the
    /// `--remote-dsg` path for this host.
    pub remote_dsg_config: Option<PathBuf>,
    /// Whether that file was (or would be) changed for it.
    pub remote_dsg_changed: bool,
}

/// The project config an init with these arguments writes.
fn config_of(args: &InitArgs) -> ProjectConfig {
    ProjectConfig {
        name: args.repo_name.clone(),
        repository: Repository {
            kind: args.repo_type,
            host: args.host.clone(),
            mountpoint: args.repo_path.clone(),
            pool: args.pool.clone(),
            remote_dsg: args.remote_dsg.clone().map(RemoteDsg::Given),
            s3: args.s3.clone(),
        },
        data_dirs: ProjectConfig::default_data_dirs(),
        ignore: dsg_core::config::IgnoreRules::defaults(),
        legacy_format: false,
    }
}

/// The arguments' own checks, before anything is read or written.
fn check_args(args: &InitArgs) -> Result<()> {
    if args.repo_type == RepoType::Zfs && args.pool.is_none() {
        return Err(EngineError::Usage(
            "--pool is required with --repo-type zfs".into(),
        ));
    }
    if (args.repo_type == RepoType::S3) != args.s3.is_some() {
        return Err(EngineError::Usage(
            "--endpoint and --bucket go with --repo-type s3 (and it needs them)".into(),
        ));
    }
    if args.repo_type != RepoType::S3 && !args.repo_path.is_absolute() {
        return Err(EngineError::Usage(format!(
            "--repo-path {} must be an absolute path",
            args.repo_path.display()
        )));
    }
    if args.repo_name.is_empty() || args.repo_name.contains('/') || args.repo_name.starts_with('.')
    {
        return Err(EngineError::Usage(format!(
            "--repo-name {:?} is not a valid name",
            args.repo_name
        )));
    }
    if args.replace && !args.force {
        return Err(EngineError::Usage(
            "replacing an existing repository needs --force".into(),
        ));
    }
    Ok(())
}

/// A repository an init would replace.
#[derive(Debug, serde::Serialize)]
pub struct Existing {
    /// `host:path` (and the dataset, for ZFS).
    pub location: String,
    /// Its head snapshot and how many files it lists.
    pub head: Option<String>,
    /// XXH3 of the head manifest file: what the user confirms replacing.
    pub head_file_hash: Option<String>,
    pub files: usize,
}

/// The repository these arguments name, if it exists: what `init --force`
/// would replace, for the user to confirm first.
pub fn existing_repository(args: &InitArgs) -> Result<Option<Existing>> {
    check_args(args)?;
    let cfg = config_of(args);
    let mut c = RepoClient::connect(&cfg)?;
    if !c.repo_exists {
        let _ = c.close();
        return Ok(None);
    }
    let head_bytes = match c.read_meta("last-sync.json", None)? {
        Meta::Data(b) => Some(b),
        _ => None,
    };
    let head = head_bytes
        .as_ref()
        .and_then(|b| Manifest::from_json_bytes(b, Path::new("last-sync.json")).ok());
    let _ = c.close();
    let mut location = format!("{}:{}", cfg.repository.host, cfg.repo_dir().display());
    if let Some(pool) = &cfg.repository.pool {
        location.push_str(&format!(" (dataset {pool}/{})", cfg.name));
    }
    Ok(Some(Existing {
        location,
        head: head
            .as_ref()
            .and_then(|m| m.metadata.as_ref())
            .map(|m| m.snapshot_id.clone()),
        head_file_hash: head_bytes
            .as_ref()
            .map(|b| format!("{:016x}", xxhash_rust::xxh3::xxh3_64(b))),
        files: head.as_ref().map(|m| m.entries().len()).unwrap_or(0),
    }))
}

/// The project `init` makes in `dir`, and whether it had a config already.
/// Refuses an initialized project, and a config naming another repository
/// unless forced.
fn new_project(dir: &Path, args: &InitArgs) -> Result<(Project, bool)> {
    if dir.join(DSG_DIR).exists() {
        return Err(EngineError::State {
            message: format!(
                "{} already exists: this project is already initialized",
                dir.join(DSG_DIR).display()
            ),
            hint: "use 'dsg status' and 'dsg sync'; to start over, move .dsg away first".into(),
        });
    }
    let cfg_path = dir.join(PROJECT_CONFIG);
    let config = config_of(args);
    check_args(args)?;
    let existing_cfg = cfg_path.exists();
    if existing_cfg && !args.force {
        let old = ProjectConfig::load(&cfg_path)?;
        if !old.repository.same_location(&config.repository) || old.name != config.name {
            return Err(EngineError::State {
                message: format!(
                    "{} already exists and names another repository",
                    cfg_path.display()
                ),
                hint:
                    "use --force to overwrite it, or run 'dsg clone' to use the repository it names"
                        .into(),
            });
        }
    }
    let user = UserConfig::load()?;
    // The project's own data_dirs/ignore settings win when a config exists.
    let config = if existing_cfg && !args.force {
        let mut old = ProjectConfig::load(&cfg_path)?;
        if let Some(p) = &args.remote_dsg {
            old.repository.remote_dsg = Some(RemoteDsg::Given(p.clone()));
        }
        old
    } else {
        config
    };
    let project = Project {
        root: dir.to_path_buf(),
        config,
        user,
    };
    Ok((project, existing_cfg))
}

pub fn init(dir: &Path, args: InitArgs, reporter: &dyn Reporter) -> Result<InitReport> {
    let dir = std::path::absolute(dir).map_err(|e| EngineError::io(dir, e))?;
    let (project, existing_cfg) = new_project(&dir, &args)?;
    let cfg_path = dir.join(PROJECT_CONFIG);
    // `--remote-dsg` goes to the user's configuration, not the project file,
    // which must stay readable by the original dsg (its models refuse the
    // key). Checked now, written just before the commit point, once the
    // connection has proven the path: a path that did not work must not
    // stay behind for the host, and a crash after the commit must leave the
    // path for the command that finishes this init.
    let remote_dsg_edit: Option<RemoteDsgEdit> = match &args.remote_dsg {
        Some(p) if !project.config.repository.is_local() => {
            Some(plan_remote_dsg(&user_config_paths(), &args.host, p)?)
        }
        _ => None,
    };
    // Over ssh, the connection's handshake runs while the tree is scanned.
    let connecting = (!args.dry_run).then(|| RepoClient::start(&project.config));
    let mut scan = project.scan(reporter);
    crate::phase("scanned");
    let renames = settle_names(
        &project,
        &scan.problems,
        scan.entries.iter().map(|e| e.path.to_string()),
        args.normalize,
        args.dry_run,
        "init",
    )?;
    if !renames.is_empty() && !args.dry_run {
        scan = project.scan(reporter);
        block_on_problems(&scan.problems, "init")?;
    }
    let mut report = InitReport {
        dry_run: args.dry_run,
        snapshot_id: "s1".into(),
        repository: format!("{}:{}", args.host, project.config.repo_dir().display()),
        renames,
        remote_dsg_config: remote_dsg_edit.as_ref().map(|e| e.file.clone()),
        remote_dsg_changed: remote_dsg_edit.as_ref().is_some_and(|e| e.changes()),
        ..Default::default()
    };
    for e in &scan.entries {
        match &e.kind {
            LocalKind::File { size, .. } => {
                report.files += 1;
                report.bytes += size;
            }
            LocalKind::Link { .. } => report.links += 1,
        }
    }
    if args.dry_run {
        return Ok(report);
    }

    let created_cfg = !existing_cfg || args.force;
    if created_cfg {
        write_atomic(&cfg_path, project.config.to_yaml().as_bytes())
            .map_err(|e| EngineError::io(&cfg_path, e.source))?;
    }
    let tx = format!("tx-{}", uuid::Uuid::new_v4().simple());
    let staging = dir.join(format!(".dsg.init-{tx}"));
    let committing = std::cell::Cell::new(false);
    let result = init_tx(
        &project,
        connecting.expect("started unless a dry run"),
        scan,
        (&tx, &staging),
        (&args, remote_dsg_edit.as_ref()),
        reporter,
        &committing,
    );
    match result {
        Ok(hash) => {
            report.snapshot_hash = hash;
            Ok(report)
        }
        Err(e) if committing.get() => {
            // The commit was sent and did not plainly succeed: its answer
            // was lost, or it was committed but not finished (`incomplete`),
            // or refused. Only the repository knows: ask it (as every later
            // command would), after any writer finished, and finish or undo;
            // if it cannot be asked, keep the staged .dsg so that the next
            // command decides.
            let cfg = project.config.clone();
            crate::recover::recover_init(&dir, || RepoClient::connect(&cfg).ok())?;
            if dir.join(DSG_DIR).exists() {
                report.snapshot_hash = Manifest::load(&dir.join(DSG_DIR).join("last-sync.json"))
                    .ok()
                    .and_then(|m| m.metadata)
                    .and_then(|m| m.snapshot_hash);
                return Ok(report);
            }
            if staging.exists() {
                // The lost commit's own hint would contradict this one.
                return Err(EngineError::State {
                    message: format!("the init's outcome is unknown: {}", e.message()),
                    hint: "run 'dsg status' here when the repository is reachable; it finishes or undoes this init".into(),
                });
            }
            if created_cfg && !existing_cfg {
                let _ = std::fs::remove_file(&cfg_path);
            }
            Err(e)
        }
        Err(e) => {
            // Before the commit point: undo everything this init wrote.
            let _ = std::fs::remove_dir_all(&staging);
            if created_cfg && !existing_cfg && !dir.join(DSG_DIR).exists() {
                let _ = std::fs::remove_file(&cfg_path);
            }
            Err(e)
        }
    }
}

fn init_tx(
    project: &Project,
    connecting: Connecting,
    mut scan: ScanResult,
    (tx, staging): (&str, &Path),
    (args, remote_dsg_edit): (&InitArgs, Option<&RemoteDsgEdit>),
    reporter: &dyn Reporter,
    committing: &std::cell::Cell<bool>,
) -> Result<Option<String>> {
    let (message, replace) = (args.message.as_deref(), args.replace);
    let user = &project.user.user_id;
    // The scan's entries become the manifest's (their paths moved, not
    // copied), with each file's stat kept beside it for the upload and the
    // stat cache: one entry per file in memory, never two.
    let started_ns = scan.started_ns;
    let (mut manifest, stats) = to_manifest(std::mem::take(&mut scan.entries), None, user, true);
    drop(scan);
    crate::phase("manifest built");
    manifest.seal(
        "s1",
        user,
        message.unwrap_or("Initial snapshot"),
        "init",
        None,
    );
    let md = manifest.metadata.clone().expect("sealed");
    let mut messages = SyncMessages::default();
    messages.add(&md);
    let messages_bytes = messages.to_json_bytes();

    let t0 = std::time::Instant::now();
    let mut client = connecting.ready()?;
    // Derived from the manifest as they are sent, not listed: a list
    // would be another 56 bytes a file.
    let items = manifest
        .entries()
        .iter()
        .zip(&stats)
        .map(|(e, st)| match &e.kind {
            EntryKind::File { size, hash, .. } => Item::File {
                path: &e.path,
                size: *size,
                hash: hash.expect("a scanned file has its hash").0,
                mtime_ns: st.mtime_ns,
                src: None,
            },
            EntryKind::Link { target } => Item::Link {
                path: &e.path,
                target,
            },
        });
    let prepared = (|| -> Result<()> {
        upload(
            project,
            &mut client,
            tx,
            Target::Init {
                replace,
                confirmed: args.confirmed_hash.as_deref(),
            },
            items.clone(),
            &Retries::new(3),
            reporter,
        )?;
        tracing::debug!("uploaded in {:?}", t0.elapsed());
        crate::phase("uploaded");
        check_interrupt()?;

        // Stage the local .dsg/ completely before the commit point.
        stage_local_meta(
            project,
            staging,
            &manifest,
            &stats,
            started_ns,
            &messages_bytes,
        )?;
        if let Some(edit) = remote_dsg_edit {
            edit.write()?;
        }
        failpoint("client.init.staged");
        check_interrupt()
    })();
    if let Err(e) = prepared {
        // Undo the repository side now rather than leave it to the next
        // command's recovery.
        let _ = client.rollback();
        return Err(e);
    }

    // Written to their files: not kept while the agent checks the commit
    // (which streams the manifest from the staged file).
    drop(manifest);
    drop(stats);
    tracing::debug!("staged locally at {:?}", t0.elapsed());
    crate::phase("staged locally");
    committing.set(true);
    let staged = staging.join("last-sync.json");
    let mut f = std::fs::File::open(&staged).map_err(|e| EngineError::io(&staged, e))?;
    client.commit("s1", &mut f, None, &messages_bytes)?;
    tracing::debug!("committed at {:?}", t0.elapsed());
    crate::phase("committed");
    failpoint("client.init.committed");
    finish_local_init(&project.root, staging)?;
    let _ = client.close();
    Ok(md.snapshot_hash)
}

/// Stages an init's local `.dsg/` in `staging` (the manifest, streamed to
/// its file; the sync-messages; the stat cache; the binary manifest cache)
/// and makes it durable.
fn stage_local_meta(
    project: &Project,
    staging: &Path,
    manifest: &Manifest,
    stats: &[dsg_core::scan::Stat],
    started_ns: i64,
    messages_bytes: &[u8],
) -> Result<()> {
    std::fs::create_dir_all(staging.join("archive")).map_err(|e| EngineError::io(staging, e))?;
    let w = |name: &str, bytes: &[u8]| -> Result<()> {
        write_atomic(&staging.join(name), bytes)
            .map_err(|e| EngineError::io(staging.join(name), e.source))
    };
    let json_hash;
    // Streamed to its file and sent from there: the text of a large
    // manifest is never held whole.
    {
        let path = staging.join("last-sync.json");
        let mut out = dsg_core::atomic::AtomicFile::create(&path)
            .map_err(|e| EngineError::io(&path, e.source))?;
        let mut bw = HashingWriter {
            w: std::io::BufWriter::with_capacity(1 << 16, out.file()),
            h: xxhash_rust::xxh3::Xxh3::new(),
        };
        dsg_core::manifest::write_json(&mut bw, manifest.entries(), manifest.metadata.as_ref())
            .and_then(|()| std::io::Write::flush(&mut bw))
            .map_err(|e| EngineError::io(&path, e))?;
        json_hash = bw.h.digest();
        drop(bw);
        out.commit(true)
            .map_err(|e| EngineError::io(&path, e.source))?;
    }
    w("sync-messages.json", messages_bytes)?;
    {
        // Streamed too: at a million files the cache is ~70 MB.
        let path = staging.join("stat-cache");
        let records = manifest
            .entries()
            .iter()
            .zip(stats)
            .filter_map(|(e, st)| e.hash().map(|h| (&*e.path, *st, h)));
        let count = records.clone().count() as u64;
        let mut out = dsg_core::atomic::AtomicFile::create(&path)
            .map_err(|e| EngineError::io(&path, e.source))?;
        StatCache::write_to(out.file(), started_ns, count, records)
            .map_err(|e| EngineError::io(&path, e))?;
        out.commit(true)
            .map_err(|e| EngineError::io(&path, e.source))?;
    }
    // The manifest in binary form too, tagged by its JSON's hash, as a
    // sync leaves it: the first command after the init then loads it
    // instead of parsing the JSON (and making this copy itself, at
    // twice an init's memory). Only a cache: a failure costs nothing.
    let name = project.manifest_cache_path();
    let name = name.file_name().expect("a file name");
    project.write_cache_streamed(&staging.join(name), "manifest cache", |f| {
        dsg_core::manifest::binary::write_manifest(f, manifest, json_hash)
    });
    sync_dir(staging).map_err(|e| EngineError::io(staging, e))?;
    Ok(())
}
