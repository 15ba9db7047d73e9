//! `sync` and `clone`: carry out the 15-state table as one transaction.
//!
//! The commit protocol (docs/design.md has the full argument):
//! 1. plan from L/C/R; conflicts or unsafe paths block before anything is
//!    written;
//! 2. client journal `begin`; when a new snapshot is needed, the agent
//!    locks the repository and checks its head is still the planned base;
//! 3. uploads are streamed (pipelined) and verified by the agent; downloads
//!    are streamed into `.dsg/staging/<tx>/files/` and verified here;
//! 4. the new metadata is staged locally; journal `prepared` (fsynced);
//! 5. commit point: the agent's `committed` journal record (snapshot syncs),
//!    or our own `committed` record (download-only syncs and clone);
//! 6. the client moves what it replaces or deletes into
//!    `.dsg/staging/<tx>/backup/`, installs the downloads and the metadata
//!    (`last-sync.json` last), journals `done`, removes staging.
//!
//! Recovery (`recover_sync`) rolls back before the commit point and forward
//! after it; every apply step checks what is already done.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dsg_core::atomic::{write_atomic, AtomicFile};
use dsg_core::hash::Hash;
use dsg_core::manifest::{
    archive_name, binary, compress_archive_stream, dedup_changes, entries_hash_of, snapshot_number,
    write_json, Entry, EntryKind, Merged, Metadata, SyncMessages,
};
use dsg_core::scan::{Stat, StatCache};
use dsg_core::state::Action;
use dsg_repo::failpoint::{failpoint, injected_error};
use dsg_repo::protocol::{ErrorKind, RemoteError};
use dsg_repo::{Incoming, Meta, MetaWith, RepoClient, RepoError};
use dsg_txn::{iter_ops, Journal, Known, Op, OpList, OpRef};
use serde::Serialize;
use xxhash_rust::xxh3::Xxh3;

use crate::conflicts::{self, Choice, Conflict};
use crate::local_tx::{
    apply_local, cleanup_local, jerr, journal_path, make_parent, prepare_local, recover_sync,
    rollback_local, staging_dir, sync_fs, ClientBegin, LocalRecord,
};
use crate::names::{block_on_problems, settle_names, RenameOut};
use crate::retry::{Replans, Retries};
use crate::status::{compare, fetch_remote, CompareOpts, Comparison, RemoteText, Row};
use crate::upload::{upload, Item, Target};
use crate::{check_interrupt, EngineError, Project, Reporter, Result};

#[derive(Default, Clone)]
pub struct SyncOpts {
    pub dry_run: bool,
    pub normalize: bool,
    pub message: Option<String>,
    /// `--continue`: settle the conflicts as `conflicts.txt` says.
    pub resume_conflicts: bool,
    /// `--adopt-repository-history`: when the repository's history no
    /// longer holds our last sync, rebase on its head; what that would
    /// overwrite or delete here becomes a conflict instead of a refusal.
    pub adopt_history: bool,
    /// `--max-delete PERCENT`; `None`: the user's `max_delete`, else 50.
    pub max_delete: Option<u8>,
    /// The report's lists of a clone (`plan.files`, `plan.downloads`) may
    /// be left empty, only counted: a clone then never holds a list of
    /// every file (~90 bytes a file).
    pub counts_only: bool,
}

/// What a sync will do, decided from L/C/R alone before anything is
/// written: `--dry-run` prints it, the transaction carries it out.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Plan {
    /// Every path that is not in sync, in the shape of `status --json`.
    pub files: Vec<Row>,
    pub uploads: Vec<Arc<str>>,
    pub downloads: Vec<Arc<str>>,
    pub local_deletions: Vec<Arc<str>>,
    pub remote_deletions: Vec<Arc<str>>,
    pub uploaded: u64,
    pub uploaded_bytes: u64,
    pub downloaded: u64,
    pub downloaded_bytes: u64,
    pub deleted_local: u64,
    pub deleted_remote: u64,
    pub cache_updated: u64,
    /// Uploads or remote deletions: the repository gets a new snapshot.
    pub needs_snapshot: bool,
    /// The project's files or its last sync change.
    pub needs_local: bool,
    /// The conflicts this sync settles (`--continue`), with the choice
    /// taken for each.
    pub resolved: Vec<(Arc<str>, Choice)>,
    /// Local files a resolution replaces or deletes: kept beside
    /// themselves as `<name>~<time>~` first (`backup_on_conflict`).
    pub backups: Vec<Arc<str>>,
    /// Conflicts settled with C: the last-synced version, read from the
    /// repository's history, is published and installed here.
    pub restores: Vec<Arc<str>>,
    /// A clone into an empty folder: every entry of R is downloaded, and
    /// neither `files` nor `downloads` lists them (they are counted); the
    /// transaction reads them from R.
    #[serde(skip)]
    pub(crate) every_remote: bool,
}

impl Plan {
    pub fn up_to_date(&self) -> bool {
        !self.needs_snapshot && !self.needs_local
    }
}

#[derive(Debug, Default, Serialize)]
pub struct SyncReport {
    pub dry_run: bool,
    pub up_to_date: bool,
    pub snapshot_id: Option<String>,
    /// Flattened so that `result` keeps the counters it always had.
    #[serde(flatten)]
    pub plan: Plan,
    pub renames: Vec<RenameOut>,
    pub attempts: u32,
    /// The repository's history this sync took over (or, in a dry run,
    /// would take over) because it no longer holds our last sync.
    pub adopted_history: Option<Fork>,
    /// `--continue` found no conflict left and removed `conflicts.txt`.
    pub stale_conflicts_file_removed: bool,
}

pub fn sync(project: &Project, opts: SyncOpts, reporter: &dyn Reporter) -> Result<SyncReport> {
    if !project.dsg().is_dir() {
        return Err(EngineError::State {
            message: format!(
                "{} has no .dsg/: it was never synced here",
                project.root.display()
            ),
            hint: "run 'dsg clone' to fetch the repository's data first".into(),
        });
    }
    let mut attempts = 0;
    // Reconnections for the whole command (upload resumes included).
    let retries = Retries::new(3);
    let replans = Replans::new();
    loop {
        attempts += 1;
        match sync_once(project, &opts, reporter, false, &retries) {
            // Another client committed between our plan and our begin: plan
            // again against the new head (G2), after a jittered wait so that
            // clients which collided do not collide again in step.
            Err(EngineError::Repo(e)) if e.kind() == Some(ErrorKind::Moved) => {
                replans.wait_after(e, attempts)?;
                continue;
            }
            // A dropped connection outside the uploads (which resume on
            // their own) before the commit point changed nothing that
            // counts: the whole sync is idempotent, so plan and run it again.
            Err(EngineError::Repo(lost @ RepoError::Connection { .. })) => {
                retries.wait_after(
                    lost,
                    "before the commit",
                    "planning the sync again",
                    reporter,
                )?;
                continue;
            }
            Ok(mut r) => {
                r.attempts = attempts;
                return Ok(r);
            }
            Err(e) => return Err(e),
        }
    }
}

/// `clone`: fetch the repository's head into a project that has only its
/// `.dsgconfig.yml`. Never writes to the repository.
pub fn clone(project: &Project, opts: SyncOpts, reporter: &dyn Reporter) -> Result<SyncReport> {
    if project.dsg().exists() {
        return Err(EngineError::State {
            message: format!(
                "{} already exists: this project is already cloned",
                project.dsg().display()
            ),
            hint: "use 'dsg sync' to update it".into(),
        });
    }
    sync_once(project, &opts, reporter, true, &Retries::new(0))
}

/// One plan and, unless it is a dry run or there is nothing to do, the
/// transaction that carries it out.
fn sync_once(
    project: &Project,
    opts: &SyncOpts,
    reporter: &dyn Reporter,
    is_clone: bool,
    retries: &Retries,
) -> Result<SyncReport> {
    let mut client = RepoClient::connect(&project.config)?;
    client.recover()?;
    if !is_clone {
        recover_sync(project, Some(&mut client))?;
    }
    let resolutions = if opts.resume_conflicts {
        Some(conflicts::read(&project.root)?)
    } else {
        None
    };
    let adopt_history = opts.adopt_history || resolutions.as_ref().is_some_and(|r| r.adopt);
    let Settled {
        cmp,
        repo_messages,
        renames,
        adopt,
        at_risk,
    } = compare_settled(
        project,
        opts,
        adopt_history,
        &mut client,
        is_clone,
        reporter,
    )?;
    let at_risk_empty = at_risk.is_empty();
    let settled = resolutions.is_none() && at_risk_empty && adopt.is_none();
    let every_remote = lists_no_row(&cmp, opts, is_clone, settled);
    let rows = if every_remote {
        Vec::new()
    } else {
        rows_at_risk(&cmp, &at_risk)
    };
    let found = conflicts::conflicts(&cmp, &rows, adopt.as_ref());
    let (choices, stale_conflicts_file_removed) = conflict_choices(
        project,
        opts,
        resolutions.as_ref(),
        &found,
        adopt.as_ref(),
        is_clone,
    )?;
    let mut plan = if every_remote {
        plan_every_remote(&cmp)
    } else {
        plan(&cmp, rows, choices, is_clone)?
    };
    if !project.user.backup_on_conflict {
        plan.backups.clear();
    }
    crate::guard::check(
        &plan,
        cmp.local(),
        cmp.remote(),
        &project.config.data_dirs,
        opts.max_delete
            .or(project.user.max_delete)
            .unwrap_or(crate::guard::DEFAULT_MAX_DELETE),
    )?;
    if adopt.is_some() {
        // Even with no file to change, the last sync becomes the
        // repository's head: left on the stale chain, every later change
        // from the repository would look like an overwrite at risk.
        plan.needs_local = true;
    }
    if is_clone {
        warn_left_alone(&plan, reporter);
    }
    let mut report = SyncReport {
        dry_run: opts.dry_run,
        up_to_date: plan.up_to_date(),
        renames,
        adopted_history: adopt,
        stale_conflicts_file_removed,
        ..Default::default()
    };
    if opts.dry_run {
        report.plan = plan;
        return Ok(report);
    }
    if plan.up_to_date() {
        learn_prunes(project, &mut client);
        let _ = client.close();
        cmp.save_stat_cache(project);
        report.plan = plan;
        return Ok(report);
    }
    crate::phase("planned");
    // A clone has a row and a download for every file: its rows are not
    // held through the transaction, and its download list is handed to
    // the local operations (which take its paths); both are made again
    // from L/C/R for the report (no choice or risk changed an action).
    // With nothing to download nothing is handed over, and the rows stay.
    let report_later = is_clone && choices.is_none() && at_risk_empty && !plan.downloads.is_empty();
    let handed = if report_later {
        plan.files = Vec::new();
        std::mem::take(&mut plan.downloads)
    } else {
        Vec::new()
    };
    let next = new_metadata(project, opts, &cmp, &plan, repo_messages, &mut client)?;
    crate::phase("new metadata computed");
    let tx = Tx {
        project,
        id: format!("tx-{}", uuid::Uuid::new_v4().simple()),
        is_clone,
    };
    let staged = prepare(&tx, client, &cmp, &plan, handed, &next, retries, reporter)?;
    let snapshot_id = next.snapshot_id.clone();
    let cmp = if staged.caches_staged {
        // Nothing left needs the manifests: the commit (the agent's, in
        // this process for a local repository) and the apply run without
        // them (~150 bytes a file given back first).
        drop(next);
        drop(cmp);
        crate::phase("manifests released");
        conclude(&tx, staged, &plan, None)?;
        None
    } else {
        conclude(&tx, staged, &plan, Some((&cmp, &next)))?;
        drop(next);
        Some(cmp)
    };
    if resolutions.is_some() {
        remove_conflicts_file(project);
    }
    report.snapshot_id = snapshot_id;
    // A clone that handed its downloads over, or never listed them, has
    // its rows made again when they are wanted (it installs files, so its
    // caches were not staged and L/C/R are here).
    let relist = (report_later || plan.every_remote) && !opts.counts_only;
    if let (true, Some(cmp)) = (relist, &cmp) {
        plan.files = cmp.rows();
        plan.downloads = plan
            .files
            .iter()
            .filter(|r| r.action == Action::Download)
            .map(|r| r.path.clone())
            .collect();
    }
    report.plan = plan;
    Ok(report)
}

/// The choices a `--continue` sync applies, and whether a stale
/// conflicts.txt was removed; unresolved conflicts without `--continue`
/// block here (a clone's block in `plan`).
fn conflict_choices<'r>(
    project: &Project,
    opts: &SyncOpts,
    resolutions: Option<&'r conflicts::Resolutions>,
    found: &[conflicts::Conflict],
    adopt: Option<&Fork>,
    is_clone: bool,
) -> Result<(Option<&'r BTreeMap<String, Choice>>, bool)> {
    let mut stale_conflicts_file_removed = false;
    let choices = match resolutions {
        Some(_) if found.is_empty() => {
            // Settled meanwhile (by hand, or by another client): the file
            // is stale, and a normal sync goes ahead.
            if !opts.dry_run {
                remove_conflicts_file(project);
                stale_conflicts_file_removed = true;
            }
            None
        }
        Some(res) => {
            conflicts::check_complete(res, found, &project.root)?;
            Some(&res.choices)
        }
        // A clone has no last sync to continue from: its conflicts (files
        // here that differ from the repository's) block in `plan`, with
        // no conflicts.txt it could not use.
        None if !found.is_empty() && !is_clone => {
            return Err(blocked_by_conflicts(
                project,
                found,
                adopt,
                opts.dry_run,
                false,
            ))
        }
        None => {
            // A conflicts.txt of ours left from a sync whose conflicts were
            // since settled by hand would only mislead.
            if !opts.dry_run && conflicts::is_ours(&project.root) {
                remove_conflicts_file(project);
                stale_conflicts_file_removed = true;
            }
            None
        }
    };
    Ok((choices, stale_conflicts_file_removed))
}

/// L/C/R compared with every name settled and the history checked.
struct Settled {
    cmp: Comparison,
    /// The repository's sync-messages, if they were read.
    repo_messages: Option<SyncMessages>,
    renames: Vec<RenameOut>,
    adopt: Option<Fork>,
    /// Adopting the repository's history, the paths that sync would
    /// otherwise overwrite or delete here: conflicts now.
    at_risk: Vec<String>,
}

/// Compares L/C/R with every name settled (renamed with `--normalize`)
/// and the history checked.
fn compare_settled(
    project: &Project,
    opts: &SyncOpts,
    adopt_history: bool,
    client: &mut RepoClient,
    is_clone: bool,
    reporter: &dyn Reporter,
) -> Result<Settled> {
    let copts = CompareOpts {
        save_stat_cache: false,
        keep_remote_bytes: true,
        no_cache: is_clone,
        dry_run: opts.dry_run,
    };
    let mut cmp = compare(project, Some(&mut *client), copts, reporter)?;
    // Before anything is renamed: a sync this check refuses changes nothing.
    let renames_pending = opts.normalize && !cmp.scan.problems.is_empty();
    let history = if is_clone {
        History::default()
    } else {
        check_history(&cmp, client, renames_pending, adopt_history)?
    };
    let mut repo_messages = history.messages;
    let renames = settle_names(
        project,
        &cmp.scan.problems,
        cmp.local().iter().map(|e| e.path.to_string()),
        opts.normalize,
        opts.dry_run,
        "sync",
    )?;
    if !renames.is_empty() && !opts.dry_run {
        // Names changed on disk: compare again (the head may have moved
        // meanwhile: its index is read again too).
        cmp = compare(project, Some(&mut *client), copts, reporter)?;
        block_on_problems(&cmp.scan.problems, "sync")?;
        repo_messages = None;
    }
    Ok(Settled {
        cmp,
        repo_messages,
        renames,
        adopt: history.adopt,
        at_risk: history.at_risk,
    })
}

/// `cmp`'s rows, with the paths a forked history put at risk turned into
/// conflicts.
fn rows_at_risk(cmp: &Comparison, at_risk: &[String]) -> Vec<Row> {
    let mut rows = cmp.rows();
    if !at_risk.is_empty() {
        let set: std::collections::HashSet<&str> = at_risk.iter().map(|s| s.as_str()).collect();
        for r in rows.iter_mut().filter(|r| set.contains(&*r.path)) {
            r.action = Action::Conflict;
        }
    }
    rows
}

fn remove_conflicts_file(project: &Project) {
    let p = conflicts::path(&project.root);
    if let Err(e) = std::fs::remove_file(&p) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", p.display());
        }
    }
}

/// Writes `conflicts.txt` (not in a dry run) and says what blocks.
fn blocked_by_conflicts(
    project: &Project,
    found: &[Conflict],
    fork: Option<&Fork>,
    dry_run: bool,
    status: bool,
) -> EngineError {
    let file = conflicts::path(&project.root);
    let mut written = false;
    let kept = !dry_run && !status && conflicts::holds_choices(&project.root);
    if kept {
        // The user's choices are worth more than a fresh file: keep
        // them; --continue says what no longer fits.
        tracing::info!("{} holds choices: not rewritten", file.display());
    } else if !dry_run && !status {
        let text = conflicts::render(
            found,
            &project.user.user_id,
            project.user.backup_on_conflict,
            fork,
        );
        match write_atomic(&file, text.as_bytes()) {
            Ok(()) => written = true,
            Err(e) => tracing::warn!("cannot write {}: {e}", file.display()),
        }
    }
    let shown: Vec<String> = found
        .iter()
        .take(20)
        .map(|c| {
            let ch: Vec<String> = c.choices.iter().map(|x| x.letter().to_string()).collect();
            format!("  {}  ({}; choices {})", c.path, c.reason, ch.join(", "))
        })
        .collect();
    EngineError::Blocked {
        message: format!(
            "sync blocked by {}; nothing was changed:\n{}{}{}",
            plural(found.len(), "conflict"),
            shown.join("\n"),
            if found.len() > 20 {
                format!("\n  … and {} more", found.len() - 20)
            } else {
                String::new()
            },
            if kept {
                format!(
                    "\n({} already holds your choices and was kept: run 'dsg sync --continue', or delete it for a fresh one)",
                    file.display()
                )
            } else if written || status || dry_run {
                String::new()
            } else {
                format!("\n({} could not be written)", file.display())
            }
        ),
        // The same words from status and sync: status says what sync does.
        hint: "'dsg sync' writes conflicts.txt at the project root with the choices for each file (L: keep the local version, R: take the repository's, C: restore the last synced one); keep one option line per file, then run 'dsg sync --continue'".into(),
        paths: found.iter().map(|c| c.path.clone()).collect(),
    }
}

pub(crate) fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// The plan for `cmp`, a pure function of it. Conflicts block here, before
/// anything is written. A clone never writes the repository, so it plans
/// no uploads and no remote deletions.
pub fn plan(
    cmp: &Comparison,
    mut files: Vec<Row>,
    choices: Option<&BTreeMap<String, Choice>>,
    is_clone: bool,
) -> Result<Plan> {
    if choices.is_none() {
        block_on_conflicts(&files)?;
    }
    let remote = cmp.remote();
    let mut p = Plan::default();
    for r in &mut files {
        let path = r.path.clone();
        let action = match (r.action, choices.and_then(|c| c.get(&*r.path))) {
            (Action::Conflict, Some(&ch)) => {
                let (l, rem) = (cmp.local().get(&r.path), remote.get(&r.path));
                p.resolved.push((path.clone(), ch));
                if ch != Choice::Local && l.is_some() {
                    p.backups.push(path.clone());
                }
                match ch {
                    Choice::Local if l.is_some() => Action::Upload,
                    Choice::Local => Action::DeleteRemote,
                    Choice::Remote if rem.is_some() => Action::Download,
                    Choice::Remote => Action::DeleteLocal,
                    Choice::Cache => Action::Restore,
                }
            }
            (a, _) => a,
        };
        r.action = action;
        match action {
            Action::Upload if !is_clone => {
                p.uploaded_bytes += entry_size(cmp.local().get(&r.path).expect("L has it"));
                p.uploads.push(path);
            }
            Action::DeleteRemote if !is_clone => p.remote_deletions.push(path),
            Action::Download => {
                p.downloaded_bytes += entry_size(remote.get(&r.path).expect("R has it"));
                p.downloads.push(path);
            }
            Action::DeleteLocal => p.local_deletions.push(path),
            Action::UpdateCache => p.cache_updated += 1,
            Action::Restore => p.restores.push(path),
            Action::Upload | Action::DeleteRemote | Action::None | Action::Conflict => {}
        }
    }
    p.uploaded = p.uploads.len() as u64;
    p.deleted_remote = p.remote_deletions.len() as u64;
    p.downloaded = p.downloads.len() as u64;
    p.deleted_local = p.local_deletions.len() as u64;
    p.needs_snapshot =
        !p.uploads.is_empty() || !p.remote_deletions.is_empty() || !p.restores.is_empty();
    p.needs_local = !p.downloads.is_empty()
        || !p.local_deletions.is_empty()
        || !p.restores.is_empty()
        || p.cache_updated > 0
        || is_clone;
    p.files = files;
    Ok(p)
}

/// A clone into an empty folder, with nothing to resolve, adopt or guard
/// (`settled`), lists no row: it downloads all of R (`Plan::every_remote`).
fn lists_no_row(cmp: &Comparison, opts: &SyncOpts, is_clone: bool, settled: bool) -> bool {
    is_clone && !opts.dry_run && settled && cmp.only_downloads_into_nothing()
}

/// The plan of a clone into an empty folder (`Plan::every_remote`): what
/// `plan` makes of its rows, every one a download, without them.
fn plan_every_remote(cmp: &Comparison) -> Plan {
    let remote = cmp.remote();
    Plan {
        downloaded: remote.len() as u64,
        downloaded_bytes: remote.entries().iter().map(entry_size).sum(),
        needs_local: true,
        every_remote: true,
        ..Plan::default()
    }
}

fn block_on_conflicts(rows: &[Row]) -> Result<()> {
    let conflicts: Vec<&Row> = rows
        .iter()
        .filter(|r| r.action == Action::Conflict)
        .collect();
    if conflicts.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = conflicts
        .iter()
        .take(20)
        .map(|r| format!("  {}  ({})", r.path, r.state.label()))
        .collect();
    Err(EngineError::Blocked {
        message: format!(
            "sync blocked by {}; nothing was changed:\n{}{}",
            plural(conflicts.len(), "conflict"),
            shown.join("\n"),
            if conflicts.len() > 20 { format!("\n  … and {} more", conflicts.len() - 20) } else { String::new() }
        ),
        hint: "decide each path (keep the local or the repository version by copying or deleting it), then sync again".into(),
        paths: conflicts.iter().map(|r| r.path.to_string()).collect(),
    })
}

/// Local files that the repository does not have stay untouched and
/// unsynced by a clone; say so.
fn warn_left_alone(plan: &Plan, reporter: &dyn Reporter) {
    for r in plan.files.iter().filter(|r| r.action == Action::Upload) {
        reporter.warn(&format!(
            "{}: exists only locally; clone leaves it alone (not uploaded)",
            r.path
        ));
    }
}

/// The repository's metadata as the sync leaves it: its head manifest and
/// sync-messages (identical on both sides), and the snapshot it is based on.
struct NextMeta<'a> {
    base: Metadata,
    /// The new snapshot's manifest: R with the changes merged in as it is
    /// read (no entry copied, no list of them made), and its metadata; `None` when there is no new
    /// snapshot (the head stays as it is). Written to the staging folder
    /// and sent to the agent from there, never held as text.
    manifest: Option<(Merged<'a>, Metadata)>,
    /// What the new manifest changes in R, by path (`None`: dropped), when
    /// few enough to send the agent instead of the whole manifest.
    delta: Option<Vec<(&'a str, Option<&'a Entry>)>>,
    /// The XXH3 of the staged `last-sync.json`, once staged.
    manifest_hash: std::cell::Cell<Option<u64>>,
    messages_bytes: Vec<u8>,
    snapshot_id: Option<String>,
    snapshot_hash: Option<String>,
}

fn new_metadata<'a>(
    project: &Project,
    opts: &SyncOpts,
    cmp: &'a Comparison,
    plan: &'a Plan,
    repo_messages: Option<SyncMessages>,
    client: &mut RepoClient,
) -> Result<NextMeta<'a>> {
    let remote = cmp.remote();
    if cmp.remote_text.is_none() {
        return Err(EngineError::State {
            message: "internal: repository manifest text missing".into(),
            hint: "report this".into(),
        });
    }
    let base = remote.metadata.clone().ok_or_else(|| EngineError::State {
        message: "the repository manifest has no metadata (no snapshot id)".into(),
        hint: "the repository was not written by dsg; ask its maintainer".into(),
    })?;
    let mut messages = match repo_messages {
        Some(m) => m,
        None => read_repo_messages(client)?,
    };
    if !messages.snapshots.contains_key(&base.snapshot_id) {
        messages.add(&base);
    }
    let mut next = NextMeta {
        manifest: None,
        delta: None,
        manifest_hash: Default::default(),
        messages_bytes: Vec::new(),
        snapshot_id: None,
        snapshot_hash: None,
        base,
    };
    if plan.needs_snapshot {
        // R with the changes merged in, sorted, borrowing every entry.
        let changes: Vec<(&str, Option<&Entry>)> = plan
            .remote_deletions
            .iter()
            .map(|p| (&**p, None))
            .chain(
                plan.uploads
                    .iter()
                    .map(|p| (&**p, Some(cmp.local().get(p).expect("L has it")))),
            )
            .chain(
                plan.restores
                    .iter()
                    .map(|p| (&**p, Some(cmp.cache.get(p).expect("C has it")))),
            )
            .collect();
        let changes = dedup_changes(changes);
        // A delta's entries are held whole by the agent: only a small one.
        let small = changes.len() <= (remote.len() / 16).max(1024);
        let entries = Merged::new(remote.entries(), changes.clone());
        next.delta = small.then_some(changes);
        let number = snapshot_number(&next.base.snapshot_id)
            .or_else(|| messages.head_number())
            .unwrap_or(0)
            + 1;
        let id = format!("s{number}");
        let md = Metadata::sealed(
            entries_hash_of(entries.iter()),
            entries.len(),
            &id,
            &project.user.user_id,
            opts.message.as_deref().unwrap_or("Sync operation"),
            "sync",
            Some(&next.base),
        );
        messages.add(&md);
        next.snapshot_hash = md.snapshot_hash.clone();
        next.snapshot_id = Some(id);
        next.manifest = Some((entries, md));
    }
    next.messages_bytes = messages.to_json_bytes();
    Ok(next)
}

/// The transaction's identity, the same for all its steps.
struct Tx<'a> {
    project: &'a Project,
    id: String,
    is_clone: bool,
}

impl Tx<'_> {
    fn root(&self) -> &Path {
        &self.project.root
    }
}

/// A transaction staged on both sides, up to the commit point.
struct Staged {
    journal: Journal,
    client: RepoClient,
    ops: LocalOps,
    /// What the commit sends, when there is a new snapshot.
    commit: Option<CommitMsg>,
    /// The new stat cache and binary manifest cache were written into the
    /// staging folder (no file is installed here, so nothing of them waits
    /// for the apply): the manifests are no longer needed.
    caches_staged: bool,
}

/// The commit's message, owned: the manifests it came from may be dropped
/// before it is sent.
struct CommitMsg {
    id: String,
    /// A delta commit: the added and changed entries as a manifest with
    /// the new metadata, and the dropped paths as a JSON array.
    delta: Option<(Vec<u8>, Vec<u8>)>,
    messages: Vec<u8>,
    snapshot_hash: Option<String>,
}

/// Carries out `plan` up to the commit point: begin, stage, and (when no
/// file is installed here) the caches written into staging. `handed`: the
/// plan's downloads when it handed them over (a clone), else empty.
#[allow(clippy::too_many_arguments)]
fn prepare(
    tx: &Tx<'_>,
    mut client: RepoClient,
    cmp: &Comparison,
    plan: &Plan,
    handed: Vec<Arc<str>>,
    next: &NextMeta<'_>,
    retries: &Retries,
    reporter: &dyn Reporter,
) -> Result<Staged> {
    let root = tx.root();
    let journal = begin(tx)?;
    crate::phase("journal begun");
    // Before the commit point, like everything that can fail: a backup
    // that cannot be made stops the sync with nothing changed. A crash
    // after this leaves at most the backups (hard links to unchanged
    // files, never scanned).
    let backups = if tx.project.user.backup_on_conflict && !plan.backups.is_empty() {
        match conflicts::make_backups(root, &plan.backups, cmp.local()) {
            Ok(b) => b,
            Err(e) => {
                rollback_local(root, &tx.id, tx.is_clone);
                return Err(e);
            }
        }
    } else {
        Vec::new()
    };
    // The stat cache written after the apply holds the stat of each file
    // it installed: only with none can both caches be made now.
    let caches_staged = plan.downloads.is_empty()
        && plan.restores.is_empty()
        && handed.is_empty()
        && !plan.every_remote;
    let commit = plan.needs_snapshot.then(|| commit_msg(next));
    let staged = stage(
        tx,
        &journal,
        &mut client,
        (cmp, plan, next),
        handed,
        commit.as_ref(),
        retries,
        reporter,
    )
    .and_then(|ops| {
        crate::phase("staged");
        if caches_staged {
            let staging = staging_dir(root, &tx.id);
            let path = staging.join(STAGED_STAT_CACHE);
            write_stat_cache(tx.project, &path, cmp, plan, Vec::new());
            write_manifest_cache(tx.project, &staging.join(STAGED_MANIFEST_CACHE), cmp, next);
            crate::phase("caches staged");
        }
        // The repository checked and staged its side meanwhile.
        if commit.is_some() {
            client.prepared()?;
            failpoint("client.repo_prepared");
            crate::phase("repository prepared");
        }
        Ok(ops)
    });
    let ops = match staged {
        Ok(ops) => ops,
        Err(e) => {
            // Before the commit point: nothing of ours is visible anywhere.
            let _ = client.rollback();
            rollback_local(root, &tx.id, tx.is_clone);
            for b in &backups {
                let _ = std::fs::remove_file(b);
            }
            return Err(e);
        }
    };
    Ok(Staged {
        journal,
        client,
        ops,
        commit,
        caches_staged,
    })
}

/// The caches' names in the staging folder (not in `meta/`, which the
/// apply installs): moved into `.dsg/` by `finish`.
const STAGED_STAT_CACHE: &str = "stat-cache";
const STAGED_MANIFEST_CACHE: &str = "stat-cache.manifest";

/// From the commit point on: the repository's commit, then the local
/// apply. `late` is the manifests, when the caches were not staged.
fn conclude(
    tx: &Tx<'_>,
    staged: Staged,
    plan: &Plan,
    late: Option<(&Comparison, &NextMeta<'_>)>,
) -> Result<()> {
    let Staged {
        journal,
        mut client,
        ops,
        commit,
        ..
    } = staged;
    if let Some(msg) = &commit {
        commit_snapshot(tx, &mut client, msg)?;
        failpoint("client.repo_committed");
        crate::phase("repository committed");
    }
    finish(tx, &journal, ops, plan, late)?;
    crate::phase("local side applied");
    learn_prunes(tx.project, &mut client);
    let _ = client.close();
    Ok(())
}

/// What `commit_snapshot` sends for `next`.
fn commit_msg(next: &NextMeta<'_>) -> CommitMsg {
    let delta = match (&next.delta, &next.manifest) {
        (Some(changes), Some((_, md))) => {
            let mut upserts = Vec::new();
            write_json(&mut upserts, changes.iter().filter_map(|c| c.1), Some(md))
                .expect("a Vec takes every write");
            let removed: Vec<&str> = changes
                .iter()
                .filter(|c| c.1.is_none())
                .map(|c| c.0)
                .collect();
            Some((upserts, serde_json::to_vec(&removed).expect("json")))
        }
        _ => None,
    };
    CommitMsg {
        id: next.snapshot_id.clone().expect("snapshot id"),
        delta,
        messages: next.messages_bytes.clone(),
        snapshot_hash: next.snapshot_hash.clone(),
    }
}

/// Keeps this client's copy of the repository's prune record current, so
/// that `log` here marks what another client pruned. Informative only: a
/// failure is logged, never the sync's.
fn learn_prunes(project: &Project, client: &mut RepoClient) {
    if let Err(e) = crate::prune::refresh_record(project, client) {
        tracing::warn!("could not refresh the record of pruned snapshots: {e}");
    }
}

fn begin(tx: &Tx<'_>) -> Result<Journal> {
    let root = tx.root();
    if tx.is_clone {
        let dsg = tx.project.dsg();
        std::fs::create_dir(&dsg).map_err(|e| EngineError::io(&dsg, e))?;
    }
    let journal = Journal::create(&journal_path(root)).map_err(jerr(root))?;
    journal
        .append(&LocalRecord::Begin {
            tx: tx.id.clone(),
            begin: ClientBegin { clone: tx.is_clone },
        })
        .map_err(jerr(root))?;
    failpoint("client.journal.begin");
    Ok(journal)
}

/// Everything before the commit point: uploads, downloads and metadata
/// staged, the local operations journaled as `prepared`, and `commit`
/// sent for the repository to prepare while this side stages (its answer
/// is read by the caller). The caller rolls back on error.
#[allow(clippy::too_many_arguments)]
fn stage(
    tx: &Tx<'_>,
    journal: &Journal,
    client: &mut RepoClient,
    (cmp, plan, next): (&Comparison, &Plan, &NextMeta<'_>),
    handed: Vec<Arc<str>>,
    commit: Option<&CommitMsg>,
    retries: &Retries,
    reporter: &dyn Reporter,
) -> Result<LocalOps> {
    let root = tx.root();
    let staging = staging_dir(root, &tx.id);
    std::fs::create_dir_all(staging.join("meta/archive"))
        .map_err(|e| EngineError::io(&staging, e))?;
    if !plan.restores.is_empty() {
        // First: the restored versions are uploaded from where they land.
        let restores: Vec<&Entry> = plan
            .restores
            .iter()
            .map(|p| cmp.cache.get(p).expect("C has it"))
            .collect();
        let from = cmp.cache.metadata.as_ref().map(|m| m.snapshot_id.clone());
        let Some(from) = from else {
            return Err(EngineError::State {
                message: "the last sync has no snapshot id, so its versions cannot be read back (choice C); nothing was changed".into(),
                hint: "choose L or R in conflicts.txt".into(),
            });
        };
        let bytes = restores.iter().map(|e| entry_size(e)).sum();
        download(
            client,
            &staging,
            restores.iter().copied(),
            bytes,
            Some(&from),
            reporter,
        )?;
    }
    if plan.needs_snapshot {
        upload_changes(tx, client, cmp, plan, next, retries, reporter)?;
        failpoint("client.uploaded");
        crate::phase("uploaded");
    }
    let remote = cmp.remote();
    let downloads = if handed.is_empty() {
        &plan.downloads[..]
    } else {
        &handed[..]
    };
    if plan.every_remote {
        let all = remote.entries().iter();
        download(client, &staging, all, plan.downloaded_bytes, None, reporter)?;
    } else {
        download(
            client,
            &staging,
            downloads.iter().map(|p| remote.get(p).expect("R has it")),
            plan.downloaded_bytes,
            None,
            reporter,
        )?;
    }
    failpoint("client.downloaded");
    crate::phase("downloaded");
    check_interrupt()?;
    // A delta is sent now, so the repository checks it while this side
    // writes its manifest; a whole manifest is sent from where it is staged.
    fetch_archives(tx, client, &staging.join("meta"), next, plan)?;
    let delta = commit.filter(|m| m.delta.is_some());
    if let Some(msg) = delta {
        send_commit(tx, client, msg)?;
    }
    stage_meta(tx, &staging.join("meta"), cmp, plan, next)?;
    crate::phase("new manifest staged");
    if let Some(msg) = commit.filter(|_| delta.is_none()) {
        send_commit(tx, client, msg)?;
    }
    let ops = if plan.every_remote {
        LocalOps::EveryRemote
    } else {
        LocalOps::Listed(local_ops(cmp, downloads, plan))
    };
    drop(handed);
    ops.with(Some(cmp), |list| {
        // Folders for the downloads, write permission, space: checked
        // now, so that nothing local can stop the apply after the
        // commit point.
        prepare_local(root, &tx.id, list)?;
        sync_fs(root)?;
        crate::phase("local side prepared and durable");
        journal
            .append_prepared(&tx.id, next.snapshot_hash.as_deref(), list)
            .map_err(jerr(root))
    })??;
    failpoint("client.journal.prepared");
    check_interrupt()?;
    Ok(ops)
}

fn upload_changes(
    tx: &Tx<'_>,
    client: &mut RepoClient,
    cmp: &Comparison,
    plan: &Plan,
    next: &NextMeta<'_>,
    retries: &Retries,
    reporter: &dyn Reporter,
) -> Result<()> {
    let mut items: Vec<Item> = plan
        .uploads
        .iter()
        .map(|p| {
            let e = cmp.local().get(p).expect("L has it");
            match &e.kind {
                EntryKind::File { size, hash, .. } => Item::File {
                    path: &e.path,
                    size: *size,
                    hash: hash.expect("scanned").0,
                    mtime_ns: cmp.local_stat(&e.path).expect("scanned").mtime_ns,
                    src: None,
                },
                EntryKind::Link { target } => Item::Link {
                    path: &e.path,
                    target,
                },
            }
        })
        .collect();
    // Restored versions, from the staging folder they were fetched into
    // (and verified) just before.
    let files = staging_dir(tx.root(), &tx.id).join("files");
    let sources: Vec<PathBuf> = plan.restores.iter().map(|p| files.join(&**p)).collect();
    for (p, src) in plan.restores.iter().zip(&sources) {
        let e = cmp.cache.get(p).expect("C has it");
        items.push(match &e.kind {
            EntryKind::File { size, hash, mtime } => Item::File {
                path: &e.path,
                size: *size,
                hash: hash.map(|h| h.0).ok_or_else(|| EngineError::State {
                    message: format!("{p}: the last sync recorded no hash for it (the original dsg's manifest), so its restored version cannot be verified; nothing was changed"),
                    hint: "choose L or R for it in conflicts.txt".into(),
                })?,
                mtime_ns: mtime.unix_secs().unwrap_or(0) * 1_000_000_000,
                src: Some(src),
            },
            EntryKind::Link { target } => Item::Link {
                path: &e.path,
                target,
            },
        });
    }
    if injected_error("client.begin.moved") {
        // For tests: a repository that moves before every begin.
        return Err(moved_for_test(client, &next.base.snapshot_id).into());
    }
    upload(
        tx.project,
        client,
        &tx.id,
        Target::Sync {
            base: &next.base.snapshot_id,
            base_hash: next.base.snapshot_hash.as_deref(),
        },
        items.iter().copied(),
        retries,
        reporter,
    )
}

fn moved_for_test(client: &RepoClient, base: &str) -> RepoError {
    RepoError::Remote {
        host: client.host().into(),
        repo: client.repo().into(),
        err: RemoteError {
            kind: ErrorKind::Moved,
            message: format!(
                "the repository moved (injected): this sync was planned against {base}"
            ),
            hint: None,
        },
    }
}

/// Stages the metadata: the new cache, the index, archives we lack. The
/// manifests are streamed to their files, never held as text.
fn stage_meta(
    tx: &Tx<'_>,
    meta: &Path,
    cmp: &Comparison,
    plan: &Plan,
    next: &NextMeta<'_>,
) -> Result<()> {
    let w = |p: PathBuf, b: &[u8]| write_atomic(&p, b).map_err(|e| EngineError::io(p, e.source));
    let text = cmp.remote_text.as_ref().expect("checked by new_metadata");
    let cache = tx.project.cache_path();
    // The cache file must still be the one compared (another command of
    // this project may not rewrite it meanwhile; if it did, stop).
    let changed = || EngineError::State {
        message: format!("{} changed while dsg was reading it", cache.display()),
        hint: "another dsg command is running here; run this one again when it is done".into(),
    };
    let new_cache = meta.join("last-sync.json");
    let hash = match &next.manifest {
        Some((entries, md)) => stream_to(&new_cache, |f| write_json(f, entries.iter(), Some(md)))?,
        None => match text {
            RemoteText::CacheFile(h) => {
                let src = std::fs::File::open(&cache).map_err(|e| EngineError::io(&cache, e))?;
                let got = stream_to(&new_cache, |f| {
                    std::io::copy(&mut std::io::BufReader::new(src), f).map(|_| ())
                })?;
                if got != *h {
                    return Err(changed());
                }
                got
            }
            RemoteText::Archived { lz4, hash } => {
                let got = stream_to(&new_cache, |f| {
                    let mut d = lz4_flex::frame::FrameDecoder::new(lz4.reader());
                    std::io::copy(&mut d, f).map(|_| ())
                })?;
                if got != *hash {
                    return Err(EngineError::State {
                        message:
                            "internal: the repository manifest's archive does not decompress to it"
                                .into(),
                        hint: "report this".into(),
                    });
                }
                got
            }
        },
    };
    next.manifest_hash.set(Some(hash));
    w(meta.join("sync-messages.json"), &next.messages_bytes)?;
    let local_archive = tx.project.dsg().join("archive");
    if plan.needs_snapshot {
        let name = archive_name(&next.base.snapshot_id);
        if !local_archive.join(&name).exists() {
            let path = meta.join("archive").join(&name);
            match text {
                RemoteText::CacheFile(h) => {
                    let mut out =
                        AtomicFile::create(&path).map_err(|e| EngineError::io(&path, e.source))?;
                    let src =
                        std::fs::File::open(&cache).map_err(|e| EngineError::io(&cache, e))?;
                    let got = compress_archive_stream(
                        std::io::BufReader::with_capacity(1 << 16, src),
                        std::io::BufWriter::with_capacity(1 << 16, out.file()),
                    )
                    .map_err(|e| EngineError::io(&path, e))?;
                    if got.0 != *h {
                        return Err(changed());
                    }
                    out.commit(true)
                        .map_err(|e| EngineError::io(&path, e.source))?;
                }
                RemoteText::Archived { lz4, .. } => lz4
                    .write_atomic(&path)
                    .map_err(|e| EngineError::io(&path, e.source))?,
            }
        }
    }
    Ok(())
}

/// Copies into `meta/archive/` the repository's archived manifests this
/// client lacks, but the base's: `stage_meta` archives that one itself.
fn fetch_archives(
    tx: &Tx<'_>,
    client: &mut RepoClient,
    meta: &Path,
    next: &NextMeta<'_>,
    plan: &Plan,
) -> Result<()> {
    let local_archive = tx.project.dsg().join("archive");
    let base = plan
        .needs_snapshot
        .then(|| archive_name(&next.base.snapshot_id));
    for name in client.list_archives()? {
        if local_archive.join(&name).exists() || base.as_ref() == Some(&name) {
            continue;
        }
        if name.contains('/') || name.starts_with('.') {
            continue;
        }
        let p = meta.join("archive").join(&name);
        // Streamed to its place, not held (a clone fetches every archive:
        // megabytes each at 100 000 files). Kept only once the agent
        // ended the stream well.
        let got = client.read_meta_with(&format!("archive/{name}"), None, |r| {
            let mut out = AtomicFile::create(&p).map_err(|e| EngineError::io(&p, e.source))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 16, out.file());
            std::io::copy(r, &mut w)
                .and_then(|_| w.flush())
                .map_err(|e| EngineError::io(&p, e))?;
            drop(w);
            Ok::<_, EngineError>(out)
        })?;
        if let MetaWith::Data(out) = got {
            out?.commit(true)
                .map_err(|e| EngineError::io(&p, e.source))?;
        }
    }
    Ok(())
}

/// Writes a file atomically through `write` (buffered), returning the
/// XXH3 of what was written.
fn stream_to(
    path: &Path,
    write: impl FnOnce(
        &mut HashingWriter<std::io::BufWriter<&mut std::fs::File>>,
    ) -> std::io::Result<()>,
) -> Result<u64> {
    let mut out = AtomicFile::create(path).map_err(|e| EngineError::io(path, e.source))?;
    let mut f = HashingWriter {
        w: std::io::BufWriter::with_capacity(1 << 16, out.file()),
        h: Xxh3::new(),
    };
    write(&mut f).map_err(|e| EngineError::io(path, e))?;
    let h = f.h.digest();
    f.w.flush().map_err(|e| EngineError::io(path, e))?;
    drop(f);
    out.commit(true)
        .map_err(|e| EngineError::io(path, e.source))?;
    Ok(h)
}

/// A writer that hashes what passes through it.
pub(crate) struct HashingWriter<W: Write> {
    pub(crate) w: W,
    pub(crate) h: Xxh3,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(buf)?;
        self.h.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// The local operations of a transaction, listed, or made from R as they
/// are read (`Plan::every_remote`: a clone holds no operation per file).
enum LocalOps {
    Listed(Vec<Op>),
    EveryRemote,
}

impl LocalOps {
    /// Runs `f` on the operations; `cmp` is needed by `EveryRemote` (whose
    /// caches are never staged, so its manifests are kept to the end).
    fn with<T>(&self, cmp: Option<&Comparison>, f: impl FnOnce(&dyn OpList) -> T) -> Result<T> {
        match (self, cmp) {
            (LocalOps::Listed(ops), _) => Ok(f(ops)),
            (LocalOps::EveryRemote, Some(cmp)) => Ok(f(&EveryRemote(cmp.remote().entries()))),
            (LocalOps::EveryRemote, None) => Err(EngineError::State {
                message: "internal: a clone's operations outlived its repository manifest".into(),
                hint: "report this; run 'dsg status' to finish the clone".into(),
            }),
        }
    }
}

/// A retire of every entry of R (deepest first), then an install of each
/// (in path order): what `local_ops` lists for a clone into an empty
/// folder, made from R's entries as they are read (no path copied, no
/// operation held: 48 bytes a file and a path each before).
struct EveryRemote<'a>(&'a [Entry]);

impl OpList for EveryRemote<'_> {
    fn len(&self) -> usize {
        2 * self.0.len()
    }

    fn get(&self, i: usize) -> OpRef<'_> {
        let n = self.0.len();
        match i.checked_sub(n) {
            // Nothing is here: a retire knows nothing of what it moves
            // aside (anything found is kept beside its path).
            None => OpRef::Retire {
                path: &self.0[n - 1 - i].path,
                known: Known::default(),
            },
            Some(k) => OpRef::Install {
                path: &self.0[k].path,
            },
        }
    }
}

/// What the client does to its files after the commit point: remove what
/// is deleted or replaced (deepest first), then install the downloads.
/// The local operations: their paths are the plan's own allocations (a
/// clone has a retire and an install for every file, and a row).
fn local_ops(cmp: &Comparison, downloads: &[Arc<str>], plan: &Plan) -> Vec<Op> {
    let retire = |p: &Arc<str>| {
        let expect = cmp.local_stat(p).map(|st| (st.size, st.mtime_ns, st.ino));
        Op::retire(p.clone(), None, expect)
    };
    let install = |p: &Arc<str>| Op::Install { path: p.clone() };
    if plan.local_deletions.is_empty()
        && plan.restores.is_empty()
        && downloads.windows(2).all(|w| w[0] < w[1])
    {
        // Downloads only, in path order (a clone's): the same operations
        // without two sorted lists of every path.
        return retire_then_install(downloads, retire);
    }
    let mut removes: Vec<&Arc<str>> = plan
        .local_deletions
        .iter()
        .chain(downloads)
        .chain(&plan.restores)
        .collect();
    removes.sort_by(|a, b| b.cmp(a));
    removes.dedup();
    let mut ops: Vec<Op> = removes.into_iter().map(retire).collect();
    let mut installs: Vec<&Arc<str>> = downloads.iter().chain(&plan.restores).collect();
    installs.sort();
    ops.extend(installs.into_iter().map(install));
    ops
}

/// The operations of downloads only (`downloads` in path order): a retire
/// of each, deepest first, then an install of each in path order. A clone
/// into an empty folder makes the same from R (`EveryRemote`).
fn retire_then_install(downloads: &[Arc<str>], retire: impl Fn(&Arc<str>) -> Op) -> Vec<Op> {
    let mut ops = Vec::with_capacity(2 * downloads.len());
    ops.extend(downloads.iter().rev().map(retire));
    ops.extend(downloads.iter().map(|p| Op::Install { path: p.clone() }));
    ops
}

/// The commit point of a snapshot sync: the agent commits. When its reply
/// is lost, the head read on a new connection tells the outcome.
/// Sends `msg` for the repository to check and stage up to its commit
/// point (`RepoClient::prepare_commit`), without waiting for its answer.
fn send_commit(tx: &Tx<'_>, client: &mut RepoClient, msg: &CommitMsg) -> Result<()> {
    let id = &msg.id;
    match &msg.delta {
        // Only what changed: the agent merges it into its head, checks the
        // result against the metadata's entries hash, and writes it.
        Some((upserts, removed)) => {
            client.prepare_commit(id, &mut &upserts[..], Some(removed), &msg.messages)?
        }
        None => {
            let staged = staging_dir(tx.root(), &tx.id).join("meta/last-sync.json");
            let mut f = std::fs::File::open(&staged).map_err(|e| EngineError::io(&staged, e))?;
            client.prepare_commit(id, &mut f, None, &msg.messages)?
        }
    }
    Ok(())
}

/// The repository's commit point, of what `send_commit` prepared.
fn commit_snapshot(tx: &Tx<'_>, client: &mut RepoClient, msg: &CommitMsg) -> Result<()> {
    let committed = client.commit_prepared();
    let Err(e) = committed else {
        return Ok(());
    };
    if e.kind() == Some(ErrorKind::Incomplete) {
        // Committed on the repository side; recovery finishes both
        // sides (our journal says prepared, the head will match).
        return Err(e.into());
    }
    // The lost commit's own hint would contradict this one.
    let unknown = |e: &RepoError| EngineError::State {
        message: format!("the commit's outcome is unknown: {}", e.message()),
        hint:
            "run any dsg command when the repository is reachable; it finishes or undoes this sync"
                .into(),
    };
    // Did the repository commit anyway (the reply was lost)? Ask, on a new
    // connection if this one is gone. `settle` waits until our old agent
    // (if still running) has finished, so the head read next is the final
    // outcome. If the repository cannot be asked, the journal stays: the
    // next command decides.
    let mut c = RepoClient::connect(&tx.project.config).map_err(|_| unknown(&e))?;
    if c.settle().is_err() {
        return Err(unknown(&e));
    }
    let committed = match fetch_remote(&mut c, None) {
        Ok(Some((m, _))) => {
            m.metadata.as_ref().and_then(|m| m.snapshot_hash.clone()) == msg.snapshot_hash
        }
        Ok(None) => false,
        Err(_) => return Err(unknown(&e)),
    };
    if !committed {
        rollback_local(tx.root(), &tx.id, tx.is_clone);
        return Err(e.into());
    }
    Ok(())
}

/// After the commit point: Ctrl-C no longer aborts; the local side is
/// brought to the committed state and the journal closed.
fn finish(
    tx: &Tx<'_>,
    journal: &Journal,
    ops: LocalOps,
    plan: &Plan,
    late: Option<(&Comparison, &NextMeta<'_>)>,
) -> Result<()> {
    let root = tx.root();
    journal
        .append(&LocalRecord::Committed {
            tx: tx.id.clone(),
            ops: Vec::new(),
            snap: None,
        })
        .map_err(jerr(root))?;
    failpoint("client.journal.committed");
    let installed = ops.with(late.map(|l| l.0), |list| {
        apply_local(root, &tx.id, list)?;
        Ok::<_, EngineError>(late.map(|(cmp, _)| installed_entries(cmp, plan, list)))
    })??;
    // Applied: not kept while the caches below are built (a clone has
    // two operations per file).
    drop(ops);
    crate::phase("local files in place");
    match (late, installed) {
        (Some((cmp, next)), Some(installed)) => {
            let path = tx.project.stat_cache_path();
            write_stat_cache(tx.project, &path, cmp, plan, installed);
            crate::phase("stat cache written");
            let path = tx.project.manifest_cache_path();
            write_manifest_cache(tx.project, &path, cmp, next);
        }
        _ => install_staged_caches(tx),
    }
    journal
        .append(&LocalRecord::Done { tx: tx.id.clone() })
        .map_err(jerr(root))?;
    failpoint("client.journal.done");
    cleanup_local(root);
    Ok(())
}

/// This project's last sync and the repository's head, when the head's
/// history no longer holds the former.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fork {
    pub last_sync_id: String,
    pub last_sync_hash: Option<String>,
    pub head_id: String,
    pub head_hash: Option<String>,
}

impl Fork {
    /// The note a sync or status gives when it adopts (or would adopt) the
    /// repository's history: the project's own chain ends here.
    pub fn note(&self, done: bool, settled: bool) -> String {
        format!(
            "{} the repository's history at {} {}: it no longer holds this project's last sync ({} {}); {}",
            if done { "adopted" } else { "sync will adopt" },
            self.head_id,
            self.head_hash.as_deref().unwrap_or("?"),
            self.last_sync_id,
            self.last_sync_hash.as_deref().unwrap_or("?"),
            match (settled, done) {
                (true, true) => "what it put at risk here was settled as conflicts.txt said",
                (true, false) => "what it puts at risk here is settled as conflicts.txt says",
                (false, true) => "nothing local was at risk",
                (false, false) => "nothing local is at risk",
            }
        )
    }
}

/// What the history check found, when it let the sync through.
#[derive(Debug, Default)]
pub struct History {
    /// The repository's sync-messages, when the check had to read them.
    pub messages: Option<SyncMessages>,
    /// Set when the histories forked and the sync takes the repository's
    /// head as its new base: nothing local is at risk, or the caller asked
    /// to adopt it anyway.
    pub adopt: Option<Fork>,
    /// Adopting anyway, the paths whose overwrite or deletion here rests on
    /// the lost last sync: they must become conflicts.
    pub at_risk: Vec<String>,
}

/// Refuses to sync a project whose last sync the repository no longer
/// holds — replaced (`init --force`), rewritten, or forked by the original
/// dsg — when the plan would delete or overwrite local files on the
/// strength of that stale last sync: they may be the last copies of what
/// the repository held. Without such actions there is nothing to lose, and
/// the sync goes ahead on the repository's history (the original's forked
/// indexes are common). `status` calls it too, so that what it reports is
/// what `sync` will do.
pub fn check_history(
    cmp: &Comparison,
    client: &mut RepoClient,
    renames_pending: bool,
    adopt: bool,
) -> Result<History> {
    let (Some(ours), Some(head)) = (cmp.cache.metadata.as_ref(), cmp.remote().metadata.as_ref())
    else {
        return Ok(History::default());
    };
    if ours.snapshot_id == head.snapshot_id && ours.snapshot_hash == head.snapshot_hash {
        return Ok(History::default());
    }
    let messages = read_repo_messages(client)?;
    let recorded = messages
        .snapshots
        .get(&ours.snapshot_id)
        .and_then(|m| m.get("snapshot_hash"))
        .and_then(|h| h.as_str());
    let went_back = matches!(
        (snapshot_number(&head.snapshot_id), snapshot_number(&ours.snapshot_id)),
        (Some(h), Some(o)) if h < o
    );
    let diverged = went_back
        || matches!((recorded, ours.snapshot_hash.as_deref()), (Some(r), Some(o)) if r != o)
        || (ours.snapshot_id == head.snapshot_id && ours.snapshot_hash != head.snapshot_hash);
    if !diverged {
        return Ok(History {
            messages: Some(messages),
            ..Default::default()
        });
    }
    let at_risk: Vec<String> = cmp
        .rows()
        .into_iter()
        // Deleting a file, or overwriting one that equals the stale last
        // sync: nothing in the repository's history says its version was
        // made on top of ours, so ours may be the last copy. A download of
        // a file that is only in the repository (or only missing here), or
        // a file already equal to the repository's, loses nothing.
        .filter(|r| {
            r.action == Action::DeleteLocal
                || (r.action == Action::Download && r.state == dsg_core::state::State::LeqCneR)
        })
        .map(|r| r.path.to_string())
        .collect();
    if renames_pending {
        // Renamed files would be judged against that stale last sync too:
        // not worth the risk; the renames can wait.
        return Err(EngineError::Blocked {
            message: format!(
                "the repository's history no longer holds this project's last sync ({}; its head is now {}): it was replaced, rewritten or forked since, so --normalize will not rename files against it; nothing was changed",
                ours.snapshot_id, head.snapshot_id
            ),
            hint: "sync without --normalize first (it adopts the repository's history, or says how to rebase on it), then rename".into(),
            paths: Vec::new(),
        });
    }
    let fork = Fork {
        last_sync_id: ours.snapshot_id.clone(),
        last_sync_hash: ours.snapshot_hash.clone(),
        head_id: head.snapshot_id.clone(),
        head_hash: head.snapshot_hash.clone(),
    };
    if at_risk.is_empty() || adopt {
        return Ok(History {
            messages: Some(messages),
            adopt: Some(fork),
            at_risk,
        });
    }
    let mut shown: Vec<String> = at_risk.iter().take(5).cloned().collect();
    if at_risk.len() > 5 {
        shown.push(format!("… and {} more", at_risk.len() - 5));
    }
    Err(EngineError::Blocked {
        message: format!(
            "this project's last sync, {} {} (made {}{}), is no longer in the repository's history: its head is now {} {} (made {}{}). The repository was replaced, rewritten, or forked by another program (the original dsg, which swaps in its own copy of the repository, can drop a snapshot published meanwhile). Syncing would overwrite or delete {} here on the strength of that lost snapshot: {}; nothing was changed",
            ours.snapshot_id,
            ours.snapshot_hash.as_deref().unwrap_or("?"),
            ours.created_at,
            ours.created_by.as_deref().map(|u| format!(" by {u}")).unwrap_or_default(),
            head.snapshot_id,
            head.snapshot_hash.as_deref().unwrap_or("?"),
            head.created_at,
            head.created_by.as_deref().map(|u| format!(" by {u}")).unwrap_or_default(),
            plural(at_risk.len(), "local file"),
            shown.join(", "),
        ),
        hint: "run 'dsg sync --adopt-repository-history' to rebase on the repository's head: your local changes are uploaded, and every file it would overwrite or delete here becomes a conflict in conflicts.txt (a backup is kept of what you replace); 'dsg sync --dry-run --adopt-repository-history' shows the plan".into(),
        paths: at_risk,
    })
}

/// A refusal `sync` would give, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Blocked {
    pub reason: String,
    pub paths: Vec<String>,
    pub hint: String,
}

/// What `sync` (without `--normalize`) would make of `cmp` before writing
/// anything, in its order: the history check, invalid names, conflicts.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Outlook {
    pub blocked: Option<Blocked>,
    pub adopts_history: Option<Fork>,
    /// Each conflict with its reason and the choices `conflicts.txt` will
    /// offer.
    pub conflicts: Vec<Conflict>,
}

/// `status`'s view of the sync to come, from the same checks `sync` runs,
/// so that the two never disagree. Errors other than a refusal (the
/// repository unreachable) are errors here too. `rows` are `cmp.rows()`,
/// which the caller prints anyway: classifying every file again (and
/// building a whole plan) would double the cost of `status`.
pub fn outlook(
    project: &Project,
    cmp: &Comparison,
    rows: &[Row],
    client: &mut RepoClient,
) -> Result<Outlook> {
    let refusal = |e: EngineError| match e {
        EngineError::Blocked {
            message,
            hint,
            paths,
        } => Ok(Outlook {
            blocked: Some(Blocked {
                reason: message,
                paths,
                hint,
            }),
            adopts_history: None,
            conflicts: Vec::new(),
        }),
        other => Err(other),
    };
    let adopt = match check_history(cmp, client, false, false) {
        Ok(h) => h.adopt,
        Err(e) => return refusal(e),
    };
    if let Err(e) = block_on_problems(&cmp.scan.problems, "sync") {
        return refusal(e);
    }
    // The plan's refusals: a conflict, then the mass-deletion guard (at
    // the user's limit: status cannot know a --max-delete to come).
    let found = conflicts::conflicts(cmp, rows, adopt.as_ref());
    if !found.is_empty() {
        let mut o = refusal(blocked_by_conflicts(
            project,
            &found,
            adopt.as_ref(),
            true,
            true,
        ))?;
        o.conflicts = found;
        return Ok(o);
    }
    let of = |a: Action| -> Vec<Arc<str>> {
        rows.iter()
            .filter(|r| r.action == a)
            .map(|r| r.path.clone())
            .collect()
    };
    let deletions = Plan {
        uploads: of(Action::Upload),
        downloads: of(Action::Download),
        remote_deletions: of(Action::DeleteRemote),
        local_deletions: of(Action::DeleteLocal),
        ..Default::default()
    };
    if let Err(e) = crate::guard::check(
        &deletions,
        cmp.local(),
        cmp.remote(),
        &project.config.data_dirs,
        project
            .user
            .max_delete
            .unwrap_or(crate::guard::DEFAULT_MAX_DELETE),
    ) {
        return refusal(e);
    }
    Ok(Outlook {
        blocked: None,
        adopts_history: adopt,
        conflicts: Vec::new(),
    })
}

fn read_repo_messages(client: &mut RepoClient) -> Result<SyncMessages> {
    Ok(match client.read_meta("sync-messages.json", None)? {
        Meta::Data(b) => SyncMessages::from_json_bytes(
            &b,
            Path::new(&format!(
                "{}:{}/.dsg/sync-messages.json",
                client.host(),
                client.repo()
            )),
        )?,
        _ => SyncMessages::default(),
    })
}

fn entry_size(e: &Entry) -> u64 {
    match e.kind {
        EntryKind::File { size, .. } => size,
        _ => 0,
    }
}

/// Streams the downloads into staging, verifying each against R's entry.
/// `from`: a snapshot id to read the versions of (conflict choice C);
/// `None` reads the head.
fn download<'a>(
    client: &mut RepoClient,
    staging: &Path,
    downloads: impl ExactSizeIterator<Item = &'a Entry>,
    bytes: u64,
    from: Option<&str>,
    reporter: &dyn Reporter,
) -> Result<()> {
    let files = staging.join("files");
    // Looked up by path as the files arrive (by binary search: a map of
    // every download would cost a clone ~40 bytes a file more). Sized
    // once: a clone's downloads are every file.
    let mut want: Vec<&Entry> = Vec::with_capacity(downloads.len());
    for e in downloads {
        match &e.kind {
            EntryKind::Link { target } => {
                // A link is its target text; the manifest has it (checked to
                // stay inside the project when the manifest was loaded).
                let p = files.join(&*e.path);
                make_parent(&files, &e.path)?;
                std::os::unix::fs::symlink(&**target, &p).map_err(|er| EngineError::io(&p, er))?;
            }
            EntryKind::File { .. } => want.push(e),
        }
    }
    if want.is_empty() {
        return Ok(());
    }
    // Already in path order (the plan's); a stable sort of sorted input is
    // one pass.
    want.sort_by(|a, b| a.path.cmp(&b.path));
    want.shrink_to_fit();
    reporter.transfer_start("downloading", want.len() as u64, bytes);
    let (mut nf, mut nb) = (0u64, 0u64);
    let mut buf = vec![0u8; 1 << 18];
    // The first local write that failed, kept whole: the agent's error
    // type has only its text, and the hint depends on the cause.
    let mut write_failed: Option<(PathBuf, std::io::Error)> = None;
    let mut sink = |inc: Incoming<'_>| {
        let Incoming::File {
            path,
            size: _,
            data,
        } = inc
        else {
            return Err(std::io::Error::other(
                "the repository holds a link where its manifest has a file",
            ));
        };
        let e = want
            .binary_search_by(|e| (*e.path).cmp(path.as_str()))
            .map(|i| want[i])
            .map_err(|_| std::io::Error::other("unexpected file"))?;
        let EntryKind::File { size, mtime, hash } = &e.kind else {
            unreachable!()
        };
        let dst = files.join(&path);
        let (n, got, f) = receive(&files, &path, &dst, data, &mut buf).map_err(|(at, err)| {
            let copy = std::io::Error::new(err.kind(), err.to_string());
            write_failed.get_or_insert((at, err));
            copy
        })?;
        if n != *size || hash.is_some_and(|want| want != got) {
            return Err(std::io::Error::other(format!(
                "downloaded {n} bytes hashing to {got}, the repository manifest says {size} bytes hashing to {}",
                hash.map(|h| h.to_hex()).unwrap_or_default()
            )));
        }
        // The manifest's mtime, so the file compares equal by the
        // original's size+mtime rule too.
        if let Some(s) = mtime.unix_secs() {
            let _ = f.set_modified(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.max(0) as u64),
            );
        }
        nf += 1;
        nb += n;
        reporter.transfer_progress(nf, nb);
        Ok(())
    };
    // Asked for a slice at a time, borrowing the paths: a list of them
    // all would cost a clone 16 bytes a file.
    let mut fetch: Vec<&str> = Vec::with_capacity(FETCH_SLICE.min(want.len()));
    let mut res = Ok(());
    for slice in want.chunks(FETCH_SLICE) {
        fetch.clear();
        fetch.extend(slice.iter().map(|e| &*e.path));
        res = match from {
            Some(snap) => client.get_versions(snap, &fetch, &mut sink),
            None => client.get_files(&fetch, &mut sink),
        };
        if res.is_err() {
            break;
        }
    }
    reporter.transfer_done();
    res.map_err(|e| match e {
        RepoError::Local { path, msg } => download_error(&path, &msg, write_failed, staging, bytes),
        other => other.into(),
    })
}

/// How many paths `download` asks for in one request: an agent in this
/// process holds a request's paths as it serves them (~60 bytes a path), a
/// few hundred kB this way, whatever the size of the clone.
const FETCH_SLICE: usize = 1 << 13;

/// Writes one incoming file to `dst`; returns its length, hash and open
/// file, or the local path whose write failed.
fn receive(
    files: &Path,
    rel: &str,
    dst: &Path,
    data: &mut dyn std::io::Read,
    buf: &mut [u8],
) -> std::result::Result<(u64, Hash, std::fs::File), (PathBuf, std::io::Error)> {
    make_parent(files, rel).map_err(|e| match e {
        EngineError::Io { path, source } => (path, source),
        other => (dst.to_path_buf(), std::io::Error::other(other.to_string())),
    })?;
    let at = |e| (dst.to_path_buf(), e);
    let mut f = std::fs::File::create(dst).map_err(at)?;
    let mut h = Xxh3::new();
    let mut n = 0u64;
    loop {
        // A read error is the connection's, not the local disk's.
        let k = data.read(buf).map_err(|e| (PathBuf::new(), e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        f.write_all(&buf[..k]).map_err(at)?;
        n += k as u64;
    }
    Ok((n, Hash(h.digest()), f))
}

/// The error for a failed download, with a hint that names its real cause:
/// the local disk (full, or not writable), or else what the repository sent
/// (a verification mismatch: possible damage there).
fn download_error(
    rel: &Path,
    msg: &str,
    write_failed: Option<(PathBuf, std::io::Error)>,
    staging: &Path,
    bytes: u64,
) -> EngineError {
    use std::io::ErrorKind as K;
    let Some((at, err)) = write_failed.filter(|(at, _)| !at.as_os_str().is_empty()) else {
        return EngineError::State {
            message: format!("download of {} failed: {msg}", rel.display()),
            hint: "nothing was changed; run the command again (if it persists, the repository may be damaged: run 'dsg validate-config')".into(),
        };
    };
    let errno = err.raw_os_error();
    let full = matches!(errno, Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || matches!(err.kind(), K::StorageFull | K::QuotaExceeded);
    let not_writable = matches!(
        errno,
        Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM)
    ) || matches!(err.kind(), K::PermissionDenied | K::ReadOnlyFilesystem);
    if full {
        EngineError::State {
            message: format!(
                "the local disk is full: writing {} (downloading {}) failed: {err}; nothing was changed",
                at.display(),
                rel.display()
            ),
            hint: format!(
                "free space on the filesystem holding {} (this sync downloads {bytes} bytes, and keeps the files it replaces until it is done), then run the command again",
                // The project, not the staging directory (gone by now).
                staging.ancestors().nth(3).unwrap_or(staging).display()
            ),
        }
    } else if not_writable {
        EngineError::State {
            message: format!(
                "the local folder is not writable: writing {} (downloading {}) failed: {err}; nothing was changed",
                at.display(),
                rel.display()
            ),
            hint: "make the project folder and its .dsg/ writable by you (check their permissions, and that the filesystem is not mounted read-only), then run the command again".into(),
        }
    } else {
        EngineError::State {
            message: format!(
                "writing {} (downloading {}) failed: {err}; nothing was changed",
                at.display(),
                rel.display()
            ),
            hint: "check the local disk holding the project, then run the command again".into(),
        }
    }
}

/// The stat cache after a sync: the scan's entries, minus deletions, plus
/// the downloaded files as they now are on disk. Both sides are in path
/// order, so they are merged as they are encoded, not gathered in a map
/// (a clone's downloads are every file).
/// The next command finds the new cache already in binary form (a JSON
/// parse of every entry saved); tagged by the JSON's hash, so a stale copy
/// is never used.
fn write_manifest_cache(project: &Project, path: &Path, cmp: &Comparison, next: &NextMeta<'_>) {
    if let Some(h) = next.manifest_hash.get() {
        project.write_cache_streamed(path, "manifest cache", |f| match &next.manifest {
            Some((entries, md)) => binary::write_borrowed(f, entries.iter(), entries.len(), md, h),
            None => binary::write_manifest(f, cmp.remote(), h),
        });
    }
}

/// Moves the caches `prepare` staged into `.dsg/`, after the apply (the
/// binary copy is of the new cache manifest, the stat cache names no file
/// as the old one). One missing (its write failed) leaves the old one,
/// which the next command finds stale and does without.
fn install_staged_caches(tx: &Tx<'_>) {
    let staging = staging_dir(tx.root(), &tx.id);
    for (name, dst) in [
        (STAGED_STAT_CACHE, tx.project.stat_cache_path()),
        (STAGED_MANIFEST_CACHE, tx.project.manifest_cache_path()),
    ] {
        let src = staging.join(name);
        if let Err(e) = std::fs::rename(&src, &dst) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("could not save {}: {e}", dst.display());
            }
        }
    }
}

/// The entries the operations installed (sorted by path): a restore's
/// from C, a download's from R. Read from the operations because a clone
/// handed its download list over to them.
fn installed_entries<'a>(cmp: &'a Comparison, plan: &Plan, ops: &dyn OpList) -> Vec<&'a Entry> {
    let restores: std::collections::HashSet<&str> = plan.restores.iter().map(|p| &**p).collect();
    let mut installed: Vec<&Entry> = iter_ops(ops)
        .filter(|o| matches!(o, OpRef::Install { .. }))
        .map(|o| match restores.contains(o.path()) {
            true => cmp.cache.get(o.path()).expect("C has it"),
            false => cmp.remote().get(o.path()).expect("R has it"),
        })
        .collect();
    installed.sort_by(|a, b| a.path.cmp(&b.path));
    installed.dedup_by(|a, b| a.path == b.path);
    installed
}

/// The stat cache after this sync, written at `path`: L's files, less
/// those the apply deletes or replaces, and the files it installs
/// (`installed`, stat'ed now: called after the apply when there are any).
fn write_stat_cache(
    project: &Project,
    path: &Path,
    cmp: &Comparison,
    plan: &Plan,
    installed: Vec<&Entry>,
) {
    let mut deleted: Vec<&str> = plan.local_deletions.iter().map(|p| &**p).collect();
    deleted.sort_unstable();
    let gone = |p: &str| {
        deleted.binary_search(&p).is_ok()
            || installed.binary_search_by(|e| (*e.path).cmp(p)).is_ok()
    };
    let kept = || {
        cmp.local()
            .iter()
            .zip(&cmp.local_stats)
            .filter(|(e, _)| !gone(&e.path))
            .filter_map(|(e, st)| e.hash().map(|h| (&*e.path, *st, h)))
    };
    // Stat'ed as they are written, not gathered first (a clone's are every
    // file: 56 bytes each). The count is written before them, so a file
    // that can no longer be stat'ed (removed meanwhile) keeps its record
    // with a zero stat: no file matches it, so it is hashed again when
    // next seen, as a file missing from the cache would be.
    let fresh = || {
        installed.iter().filter_map(|e| match &e.kind {
            EntryKind::File { hash: Some(h), .. } => Some((&*e.path, *h)),
            _ => None,
        })
    };
    let count = (kept().count() + fresh().count()) as u64;
    // The scan's directory listings too: a folder this sync wrote into has
    // a new stat by now and is listed again; the others are not.
    project.write_cache_streamed(path, "stat cache", |f| {
        StatCache::write_with_dirs(
            f,
            cmp.scan.started_ns,
            count,
            merge_by_path(
                kept(),
                fresh().map(|(p, h)| {
                    let st = std::fs::symlink_metadata(project.root.join(p))
                        .map(|md| Stat::of(&md))
                        .unwrap_or_default();
                    (p, st, h)
                }),
            ),
            &cmp.scan.dirs,
            None,
        )
    });
}

/// Two path-ordered record streams with no path in common, as one.
fn merge_by_path<'a>(
    a: impl Iterator<Item = (&'a str, Stat, Hash)>,
    b: impl Iterator<Item = (&'a str, Stat, Hash)>,
) -> impl Iterator<Item = (&'a str, Stat, Hash)> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if y.0 < x.0 => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clone's operations made from R are those `local_ops` lists for
    /// the same downloads into an empty folder (its downloads-only path,
    /// `retire_then_install`, where no local file gives a retire anything
    /// to expect): a retire of each, deepest first, then an install of each
    /// in path order.
    #[test]
    fn every_remote_makes_the_operations_local_ops_lists() {
        use dsg_core::manifest::{Manifest, Mtime};
        let entry = |p: &str| Entry {
            path: p.into(),
            user: Arc::from("u@x"),
            kind: EntryKind::File {
                size: 1,
                mtime: Mtime::from_unix(1_700_000_000, 0),
                hash: None,
            },
        };
        let r = Manifest::from_entries(["b", "a/y", "a/x", "a-b", "c/d/e"].map(entry).into());
        let paths: Vec<Arc<str>> = r.entries().iter().map(|e| Arc::from(&*e.path)).collect();
        let listed = retire_then_install(&paths, |p| Op::retire(p.clone(), None, None));
        let view = EveryRemote(r.entries());
        assert_eq!(view.len(), 10);
        let made: Vec<OpRef<'_>> = iter_ops(&view).collect();
        assert_eq!(made, iter_ops(&listed[..]).collect::<Vec<_>>());
        assert_eq!(made[0].path(), "c/d/e");
        assert_eq!(made[9].path(), "c/d/e");
    }

    fn hint_for(err: Option<std::io::Error>) -> String {
        let staging = Path::new("/p/.dsg/staging/tx-1");
        let at = staging.join("files/a/b.bin");
        download_error(
            Path::new("a/b.bin"),
            "the text",
            err.map(|e| (at, e)),
            staging,
            10,
        )
        .to_string()
    }

    #[test]
    fn download_errors_name_their_real_cause() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let m = hint_for(Some(std::io::Error::from_raw_os_error(errno)));
            assert!(m.contains("the local disk is full"), "{m}");
            assert!(m.contains("/p/.dsg/staging/tx-1/files/a/b.bin"), "{m}");
            assert!(m.contains("nothing was changed"), "{m}");
            assert!(
                m.contains("hint: free space on the filesystem holding /p "),
                "{m}"
            );
            assert!(!m.contains("damaged"), "{m}");
        }
        for errno in [libc::EACCES, libc::EROFS] {
            let m = hint_for(Some(std::io::Error::from_raw_os_error(errno)));
            assert!(m.contains("the local folder is not writable"), "{m}");
            assert!(m.contains("/p/.dsg/staging/tx-1/files/a/b.bin"), "{m}");
            assert!(!m.contains("damaged"), "{m}");
        }
        let m = hint_for(Some(std::io::Error::from_raw_os_error(libc::EIO)));
        assert!(m.contains("b.bin") && !m.contains("damaged"), "{m}");
        // Only what the repository sent (a verification mismatch) points
        // at the repository.
        let m = hint_for(None);
        assert!(m.contains("may be damaged"), "{m}");
    }
}
