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

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use dsg_core::atomic::write_atomic;
use dsg_core::hash::Hash;
use dsg_core::manifest::{
    archive_name, compress_archive, snapshot_number, Entry, EntryKind, Manifest, SyncMessages,
};
use dsg_core::scan::{Stat, StatCache};
use dsg_core::state::Action;
use dsg_repo::failpoint::failpoint;
use dsg_repo::journal::Journal;
use dsg_repo::protocol::ErrorKind;
use dsg_repo::{Incoming, Meta, RepoClient, RepoError};
use serde::Serialize;
use xxhash_rust::xxh3::Xxh3;

use crate::local_tx::{
    apply_local, cleanup_local, jerr, journal_path, make_parent, recover_sync, rollback_local,
    staging_dir, sync_fs, LocalOp, LocalRecord,
};
use crate::names::{block_on_problems, settle_names, RenameOut};
use crate::retry::Retries;
use crate::status::{compare, fetch_remote, CompareOpts, Comparison, Row};
use crate::upload::{upload, Item, Target};
use crate::{check_interrupt, EngineError, Project, Reporter, Result};

#[derive(Default, Clone)]
pub struct SyncOpts {
    pub dry_run: bool,
    pub normalize: bool,
    pub message: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct SyncReport {
    pub dry_run: bool,
    pub up_to_date: bool,
    pub snapshot_id: Option<String>,
    pub uploaded: u64,
    pub uploaded_bytes: u64,
    pub downloaded: u64,
    pub downloaded_bytes: u64,
    pub deleted_local: u64,
    pub deleted_remote: u64,
    pub cache_updated: u64,
    /// The plan, in the shape of `status --json`.
    pub files: Vec<Row>,
    pub renames: Vec<RenameOut>,
    pub attempts: u32,
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
    loop {
        attempts += 1;
        match sync_once(project, &opts, reporter, false, &retries) {
            // Another client committed between our plan and our begin: plan
            // again against the new head (G2). Bounded, in case of a storm.
            Err(EngineError::Repo(e)) if e.kind() == Some(ErrorKind::Moved) && attempts < 4 => {
                tracing::info!("the repository moved; planning again");
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
    let copts = CompareOpts {
        save_stat_cache: false,
        keep_remote_bytes: true,
        no_cache: is_clone,
        dry_run: opts.dry_run,
    };
    let mut cmp = compare(project, Some(&mut client), copts, reporter)?;
    // Before anything is renamed: a sync this check refuses changes nothing.
    let renames_pending = opts.normalize && !cmp.scan.problems.is_empty();
    let mut repo_messages = if is_clone {
        None
    } else {
        check_same_history(&cmp, &mut client, renames_pending)?
    };
    let renames = settle_names(
        project,
        &cmp.scan.problems,
        cmp.local.entries().iter().map(|e| e.path.to_string()),
        opts.normalize,
        opts.dry_run,
        "sync",
    )?;
    if !renames.is_empty() && !opts.dry_run {
        // Names changed on disk: compare again (the head may have moved
        // meanwhile: its index is read again too).
        cmp = compare(project, Some(&mut client), copts, reporter)?;
        block_on_problems(&cmp.scan.problems, "sync")?;
        repo_messages = None;
    }
    let rows = cmp.rows();
    let mut report = SyncReport {
        dry_run: opts.dry_run,
        files: rows.clone(),
        renames,
        ..Default::default()
    };
    let conflicts: Vec<String> = rows
        .iter()
        .filter(|r| r.action == Action::Conflict)
        .map(|r| r.path.clone())
        .collect();
    if !conflicts.is_empty() {
        let shown: Vec<String> = rows
            .iter()
            .filter(|r| r.action == Action::Conflict)
            .take(20)
            .map(|r| format!("  {}  ({})", r.path, r.state.label()))
            .collect();
        return Err(EngineError::Blocked {
            message: format!(
                "sync blocked by {} conflict(s); nothing was changed:\n{}{}\nhint: decide each path (keep the local or the repository version by copying or deleting it), then sync again",
                conflicts.len(),
                shown.join("\n"),
                if conflicts.len() > 20 { format!("\n  … and {} more", conflicts.len() - 20) } else { String::new() }
            ),
            paths: conflicts,
        });
    }
    let remote = cmp.remote();
    let mut uploads: Vec<&Entry> = Vec::new();
    let mut deletes_remote: Vec<&str> = Vec::new();
    let mut downloads: Vec<&Entry> = Vec::new();
    let mut deletes_local: Vec<&str> = Vec::new();
    for r in &rows {
        match r.action {
            Action::Upload => uploads.push(cmp.local.get(&r.path).expect("L has it")),
            Action::DeleteRemote => deletes_remote.push(&r.path),
            Action::Download => downloads.push(remote.get(&r.path).expect("R has it")),
            Action::DeleteLocal => deletes_local.push(&r.path),
            Action::UpdateCache => report.cache_updated += 1,
            Action::None | Action::Conflict => {}
        }
    }
    if is_clone && (!uploads.is_empty() || !deletes_remote.is_empty()) {
        // Local files that the repository does not have stay untouched and
        // unsynced; clone never writes the repository.
        for e in &uploads {
            reporter.warn(&format!(
                "{}: exists only locally; clone leaves it alone (not uploaded)",
                e.path
            ));
        }
        uploads.clear();
        deletes_remote.clear();
    }
    let needs_snapshot = !uploads.is_empty() || !deletes_remote.is_empty();
    let needs_local =
        !downloads.is_empty() || !deletes_local.is_empty() || report.cache_updated > 0 || is_clone;
    report.uploaded = uploads.len() as u64;
    report.deleted_remote = deletes_remote.len() as u64;
    report.downloaded = downloads.len() as u64;
    report.deleted_local = deletes_local.len() as u64;
    report.uploaded_bytes = uploads.iter().map(|e| entry_size(e)).sum();
    report.downloaded_bytes = downloads.iter().map(|e| entry_size(e)).sum();
    if opts.dry_run {
        report.up_to_date = !needs_snapshot && !needs_local;
        return Ok(report);
    }
    if !needs_snapshot && !needs_local {
        report.up_to_date = true;
        let _ = client.close();
        cmp.save_stat_cache(project);
        return Ok(report);
    }

    let root = &project.root;
    let tx = format!("tx-{}", uuid::Uuid::new_v4().simple());
    let remote_bytes = cmp.remote_bytes.clone().ok_or_else(|| EngineError::State {
        message: "internal: repository manifest bytes missing".into(),
        hint: "report this".into(),
    })?;
    let remote_md = remote.metadata.clone().ok_or_else(|| EngineError::State {
        message: "the repository manifest has no metadata (no snapshot id)".into(),
        hint: "the repository was not written by dsg; ask its maintainer".into(),
    })?;

    // New manifest N and new sync-messages (identical on both sides).
    let mut new_manifest_bytes = remote_bytes.clone();
    let mut new_manifest: Option<Manifest> = None;
    let mut new_hash = None;
    let mut new_id = None;
    let mut messages = match repo_messages {
        Some(m) => m,
        None => read_repo_messages(&mut client)?,
    };
    if !messages.snapshots.contains_key(&remote_md.snapshot_id) {
        messages.add(&remote_md);
    }
    if needs_snapshot {
        let mut entries: Vec<Entry> = remote.entries().to_vec();
        let drop: std::collections::HashSet<&str> = deletes_remote
            .iter()
            .copied()
            .chain(uploads.iter().map(|e| &*e.path))
            .collect();
        entries.retain(|e| !drop.contains(&*e.path));
        entries.extend(uploads.iter().map(|e| (*e).clone()));
        let mut n = Manifest::from_entries(entries);
        let next = snapshot_number(&remote_md.snapshot_id)
            .or_else(|| messages.head_number())
            .unwrap_or(0)
            + 1;
        let id = format!("s{next}");
        n.seal(
            &id,
            &project.user.user_id,
            opts.message.as_deref().unwrap_or("Sync operation"),
            "sync",
            Some(&remote_md),
        );
        let md = n.metadata.clone().expect("sealed");
        messages.add(&md);
        new_hash = md.snapshot_hash.clone();
        new_id = Some(id);
        new_manifest_bytes = n.to_json_bytes();
        new_manifest = Some(n);
    }
    let messages_bytes = messages.to_json_bytes();

    // --- the transaction ---
    if is_clone {
        std::fs::create_dir(project.dsg()).map_err(|e| EngineError::io(project.dsg(), e))?;
    }
    let journal = Journal::create(&journal_path(root)).map_err(jerr(root))?;
    journal
        .append(&LocalRecord::Begin {
            tx: tx.clone(),
            clone: is_clone,
        })
        .map_err(jerr(root))?;
    failpoint("client.journal.begin");
    let staging = staging_dir(root, &tx);
    let result = (|| -> Result<Vec<LocalOp>> {
        std::fs::create_dir_all(staging.join("meta/archive"))
            .map_err(|e| EngineError::io(&staging, e))?;
        if needs_snapshot {
            let items: Vec<Item> = uploads
                .iter()
                .map(|e| match &e.kind {
                    EntryKind::File { size, hash, .. } => Item::File {
                        path: &e.path,
                        size: *size,
                        hash: hash.expect("scanned").0,
                        mtime_ns: cmp.local_stat(&e.path).expect("scanned").mtime_ns,
                    },
                    EntryKind::Link { target } => Item::Link {
                        path: &e.path,
                        target,
                    },
                })
                .collect();
            upload(
                project,
                &mut client,
                &tx,
                Target::Sync {
                    base: &remote_md.snapshot_id,
                    base_hash: remote_md.snapshot_hash.as_deref(),
                },
                &items,
                retries,
                reporter,
            )?;
            failpoint("client.uploaded");
        }
        download(
            &mut client,
            &staging,
            &downloads,
            report.downloaded_bytes,
            reporter,
        )?;
        failpoint("client.downloaded");
        check_interrupt()?;
        // Stage metadata: the new cache, the index, archives we lack.
        let meta = staging.join("meta");
        let w =
            |p: PathBuf, b: &[u8]| write_atomic(&p, b).map_err(|e| EngineError::io(p, e.source));
        w(meta.join("last-sync.json"), &new_manifest_bytes)?;
        w(meta.join("sync-messages.json"), &messages_bytes)?;
        let local_archive = project.dsg().join("archive");
        if needs_snapshot {
            let name = archive_name(&remote_md.snapshot_id);
            if !local_archive.join(&name).exists() {
                w(
                    meta.join("archive").join(&name),
                    &compress_archive(&remote_bytes),
                )?;
            }
        }
        for name in client.list_archives()? {
            if local_archive.join(&name).exists() || meta.join("archive").join(&name).exists() {
                continue;
            }
            if name.contains('/') || name.starts_with('.') {
                continue;
            }
            if let Meta::Data(b) = client.read_meta(&format!("archive/{name}"), None)? {
                w(meta.join("archive").join(&name), &b)?;
            }
        }
        let mut ops: Vec<LocalOp> = Vec::new();
        let mut removes: Vec<&str> = deletes_local.clone();
        removes.extend(downloads.iter().map(|e| &*e.path));
        removes.sort_by(|a, b| b.cmp(a));
        removes.dedup();
        ops.extend(removes.into_iter().map(|p| LocalOp::Remove {
            path: p.into(),
            expect: cmp.local_stat(p).map(|st| (st.size, st.mtime_ns, st.ino)),
        }));
        let mut installs: Vec<&str> = downloads.iter().map(|e| &*e.path).collect();
        installs.sort();
        ops.extend(
            installs
                .into_iter()
                .map(|p| LocalOp::Install { path: p.into() }),
        );
        sync_fs(root)?;
        journal
            .append(&LocalRecord::Prepared {
                tx: tx.clone(),
                new_hash: new_hash.clone(),
                ops: ops.clone(),
            })
            .map_err(jerr(root))?;
        failpoint("client.journal.prepared");
        check_interrupt()?;
        Ok(ops)
    })();
    let ops = match result {
        Ok(ops) => ops,
        Err(e) => {
            // Before the commit point: nothing of ours is visible anywhere.
            let _ = client.rollback();
            rollback_local(root, &tx, is_clone);
            return Err(e);
        }
    };
    if needs_snapshot {
        let id = new_id.clone().expect("snapshot id");
        if let Err(e) = client.commit(&id, &new_manifest_bytes, &messages_bytes) {
            if e.kind() == Some(ErrorKind::Incomplete) {
                // Committed on the repository side; recovery finishes both
                // sides (our journal says prepared, the head will match).
                return Err(e.into());
            }
            // Did the repository commit anyway (the reply was lost)? Ask,
            // on a new connection if this one is gone.
            // `settle` waits until our old agent (if still running) has
            // finished, so the head read next is the final outcome.
            let unknown = |e: &dyn std::fmt::Display| {
                EngineError::State {
                message: format!("the commit's outcome is unknown: {e}"),
                hint: "run any dsg command when the repository is reachable; it finishes or undoes this sync".into(),
            }
            };
            let committed = match RepoClient::connect(&project.config) {
                Ok(mut c) => {
                    if c.settle().is_err() {
                        return Err(unknown(&e));
                    }
                    match fetch_remote(&mut c, None) {
                        Ok(Some((m, _))) => {
                            m.metadata.as_ref().and_then(|m| m.snapshot_hash.clone()) == new_hash
                        }
                        Ok(None) => false,
                        Err(_) => return Err(unknown(&e)),
                    }
                }
                // Unknown: keep the journal; the next command decides.
                Err(_) => return Err(unknown(&e)),
            };
            if !committed {
                rollback_local(root, &tx, is_clone);
                return Err(e.into());
            }
        }
        failpoint("client.repo_committed");
    }
    journal
        .append(&LocalRecord::Committed { tx: tx.clone() })
        .map_err(jerr(root))?;
    failpoint("client.journal.committed");
    // Past the commit point: Ctrl-C no longer aborts; we finish.
    apply_local(root, &tx, &ops)?;
    update_stat_cache(project, &cmp, &downloads, &deletes_local);
    // The next command finds the new cache already in binary form (a JSON
    // parse of every entry saved); tagged by the JSON's hash, so a stale
    // copy is never used.
    project.write_manifest_cache(
        new_manifest.as_ref().unwrap_or(cmp.remote()),
        xxhash_rust::xxh3::xxh3_64(&new_manifest_bytes),
    );
    journal
        .append(&LocalRecord::Done { tx: tx.clone() })
        .map_err(jerr(root))?;
    failpoint("client.journal.done");
    cleanup_local(root);
    let _ = client.close();
    report.snapshot_id = new_id;
    Ok(report)
}

/// Refuses to sync a project whose last sync the repository no longer
/// holds — replaced (`init --force`), rewritten, or forked by the original
/// dsg — when the plan would delete or overwrite local files on the
/// strength of that stale last sync: they may be the last copies of what
/// the repository held. Without such actions there is nothing to lose, and
/// the sync goes ahead (the original's forked indexes are common).
/// Returns the repository's sync-messages when it had to read them.
fn check_same_history(
    cmp: &Comparison,
    client: &mut RepoClient,
    renames_pending: bool,
) -> Result<Option<SyncMessages>> {
    let (Some(ours), Some(head)) = (cmp.cache.metadata.as_ref(), cmp.remote().metadata.as_ref())
    else {
        return Ok(None);
    };
    if ours.snapshot_id == head.snapshot_id && ours.snapshot_hash == head.snapshot_hash {
        return Ok(None);
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
        return Ok(Some(messages));
    }
    let at_risk: Vec<String> = cmp
        .rows()
        .into_iter()
        // Deleting a file, or overwriting one that equals the stale last
        // sync; a download of a file that is only in the repository (or
        // only missing here) loses nothing.
        .filter(|r| {
            r.action == Action::DeleteLocal
                || (r.action == Action::Download && r.state == dsg_core::state::State::LeqCneR)
        })
        .map(|r| r.path)
        .collect();
    if at_risk.is_empty() && renames_pending {
        // Renamed files would be judged against that stale last sync too:
        // not worth the risk; the renames can wait.
        return Err(EngineError::Blocked {
            message: format!(
                "the repository's history no longer holds this project's last sync ({}; its head is now {}): it was replaced, rewritten or forked since, so --normalize will not rename files against it; nothing was changed\nhint: sync without --normalize first, or 'dsg clone' the repository into a new directory and compare",
                ours.snapshot_id, head.snapshot_id
            ),
            paths: Vec::new(),
        });
    }
    if at_risk.is_empty() {
        tracing::info!(
            "the repository's history does not hold this project's last sync ({}); nothing local is at risk",
            ours.snapshot_id
        );
        return Ok(Some(messages));
    }
    Err(EngineError::Blocked {
        message: format!(
            "the repository's history no longer holds this project's last sync ({} {}; its head is now {} {}): it was replaced, rewritten or forked since. Syncing would delete or overwrite {} local file(s) (e.g. {}) on the strength of that stale last sync; nothing was changed\nhint: your files here may be the only copies: 'dsg clone' the repository into a new directory and compare; to follow the repository as it is now, keep what you need, move this project's .dsg away and run 'dsg clone' here",
            ours.snapshot_id,
            ours.snapshot_hash.as_deref().unwrap_or("?"),
            head.snapshot_id,
            head.snapshot_hash.as_deref().unwrap_or("?"),
            at_risk.len(),
            at_risk.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
        ),
        paths: at_risk,
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
fn download(
    client: &mut RepoClient,
    staging: &Path,
    downloads: &[&Entry],
    bytes: u64,
    reporter: &dyn Reporter,
) -> Result<()> {
    let files = staging.join("files");
    let mut want: HashMap<&str, &Entry> = HashMap::new();
    let mut fetch = Vec::new();
    for e in downloads {
        match &e.kind {
            EntryKind::Link { target } => {
                // A link is its target text; the manifest has it (checked to
                // stay inside the project when the manifest was loaded).
                let p = files.join(&*e.path);
                make_parent(&files, &e.path)?;
                std::os::unix::fs::symlink(&**target, &p).map_err(|er| EngineError::io(&p, er))?;
            }
            EntryKind::File { .. } => {
                want.insert(&e.path, e);
                fetch.push(e.path.to_string());
            }
        }
    }
    if fetch.is_empty() {
        return Ok(());
    }
    reporter.transfer_start("downloading", fetch.len() as u64, bytes);
    let (mut nf, mut nb) = (0u64, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    let res = client.get_files(fetch, |inc| {
        let Incoming::File { path, size: _, data } = inc else {
            return Err(std::io::Error::other("the repository holds a link where its manifest has a file"));
        };
        let e = want.get(path.as_str()).ok_or_else(|| std::io::Error::other("unexpected file"))?;
        let EntryKind::File { size, mtime, hash } = &e.kind else { unreachable!() };
        make_parent(&files, &path).map_err(std::io::Error::other)?;
        let dst = files.join(&path);
        let mut f = std::fs::File::create(&dst)?;
        let mut h = Xxh3::new();
        let mut n = 0u64;
        loop {
            let k = data.read(&mut buf)?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            f.write_all(&buf[..k])?;
            n += k as u64;
        }
        let got = Hash(h.digest());
        if n != *size || hash.is_some_and(|want| want != got) {
            return Err(std::io::Error::other(format!(
                "downloaded {n} bytes hashing to {got}, the repository manifest says {size} bytes hashing to {}",
                hash.map(|h| h.to_hex()).unwrap_or_default()
            )));
        }
        // The manifest's mtime, so the file compares equal by the
        // original's size+mtime rule too.
        if let Some(s) = mtime.unix_secs() {
            let _ = f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.max(0) as u64));
        }
        nf += 1;
        nb += n;
        reporter.transfer_progress(nf, nb);
        Ok(())
    });
    reporter.transfer_done();
    res.map_err(|e| match e {
        RepoError::Local { path, msg } => EngineError::State {
            message: format!("download of {} failed: {msg}", path.display()),
            hint: "nothing was changed; run the command again (if it persists, the repository may be damaged: run 'dsg validate-config')".into(),
        },
        other => other.into(),
    })
}

/// The stat cache after a sync: the scan's entries, minus deletions, plus
/// the downloaded files as they now are on disk.
fn update_stat_cache(
    project: &Project,
    cmp: &crate::status::Comparison,
    downloads: &[&Entry],
    deleted: &[&str],
) {
    let mut map: std::collections::BTreeMap<&str, (Stat, Hash)> = cmp
        .local
        .entries()
        .iter()
        .zip(&cmp.local_stats)
        .filter_map(|(e, st)| e.hash().map(|h| (&*e.path, (*st, h))))
        .collect();
    for p in deleted {
        map.remove(*p);
    }
    for e in downloads {
        map.remove(&*e.path);
        if let EntryKind::File { hash: Some(h), .. } = &e.kind {
            if let Ok(md) = std::fs::symlink_metadata(project.root.join(&*e.path)) {
                map.insert(&e.path, (Stat::of(&md), *h));
            }
        }
    }
    project.write_stat_cache(&StatCache::encode(
        cmp.scan.started_ns,
        map.into_iter().map(|(p, (st, h))| (p, st, h)),
    ));
}
