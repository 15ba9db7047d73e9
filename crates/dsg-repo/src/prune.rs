//! `dsg prune` on the repository host: removes the data that only old
//! snapshots hold, under the repository's exclusive lock.
//!
//! The client sends a policy (`keep_last`, `keep_within`), never a list of
//! things to delete: the agent decides what is kept from its own head,
//! index and archives, always keeps the head, and removes only what no
//! kept snapshot references.
//!
//! - Directory (`xfs`) repository: the objects `.dsg/objects/<hh>/<hash>`
//!   whose hash appears in no kept snapshot's manifest (every kept
//!   manifest must read and verify, or nothing is removed). The tree (the
//!   head) is never touched; an object named otherwise is left alone.
//! - ZFS: the snapshots `@sN` not kept; never the head's, never one a
//!   clone depends on (a history reader's or a snapmount's clone).
//!
//! Crash safety: the plan is journaled (`prune-journal`, the same
//! checksummed records as a sync's) before anything is deleted; then the
//! record of pruned snapshots (`pruned.json`) is written, then the data is
//! deleted, then `done`. Deleting is idempotent, so the next command rolls
//! a half-done prune forward (`recover`), re-checking at that moment that
//! nothing it deletes is referenced by a snapshot that is not pruned, and
//! dropping the plan if the repository's history is no longer the one it
//! was made for (a replaced repository).
//!
//! Archives (manifests) stay: the chain still validates, `log` still lists
//! every snapshot, and reading a pruned snapshot's removed data answers
//! `pruned` rather than a missing file.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Instant;

use dsg_core::atomic::{sync_dir, write_atomic};
use dsg_core::hash::Hash;
use dsg_core::manifest::{read_archive, strict_snapshot_number, Manifest, SyncMessages};
use dsg_txn::failpoint::failpoint;
use dsg_txn::{Journal, Log, Record};
use serde::{Deserialize, Serialize};

use crate::backend::AgentError;
use crate::protocol::{ErrorKind, PruneReport};
use crate::repo::Repository;
use crate::site::{LockMode, Site};
use crate::store::Store;

/// The record of pruned snapshots, readable by clients (`ReadMeta`).
pub const RECORD: &str = "pruned.json";
const JOURNAL: &str = "prune-journal";

/// What `dsg prune` keeps.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The newest snapshots kept, the head included (at least 1).
    pub keep_last: u64,
    /// Also keep snapshots made at most this many seconds ago.
    pub keep_within_secs: Option<u64>,
    pub dry_run: bool,
    pub user: String,
}

/// `pruned.json`: the snapshots whose data `dsg prune` removed. A
/// snapshot counts as pruned only when its id *and* its chain hash match
/// (ids start again at s1 in a replaced repository).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PrunedRecord {
    pub pruned: BTreeMap<String, PrunedSnapshot>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PrunedSnapshot {
    pub snapshot_hash: Option<String>,
    pub pruned_at: String,
    pub pruned_by: String,
}

impl PrunedRecord {
    pub fn from_bytes(bytes: &[u8]) -> Result<PrunedRecord, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("serializable")
    }

    /// When `id` (with chain hash `hash`) was pruned.
    pub fn get(&self, id: &str, hash: Option<&str>) -> Option<&PrunedSnapshot> {
        self.pruned.get(id).filter(|p| {
            p.snapshot_hash.is_none() || hash.is_none() || p.snapshot_hash.as_deref() == hash
        })
    }

    /// The record at `path`; empty when there is none.
    fn load(path: &Path) -> Result<PrunedRecord, AgentError> {
        match fs::read(path) {
            Ok(b) => PrunedRecord::from_bytes(&b).map_err(|e| {
                AgentError::new(ErrorKind::Corrupt, format!("{}: {e}", path.display()))
                    .hint("the record of pruned snapshots was altered; restore it or remove it (the data it names is gone either way)")
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PrunedRecord::default()),
            Err(e) => Err(AgentError::io(format!("cannot read {}", path.display()), e)),
        }
    }
}

/// The plan, as the journal's `begin` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct PruneBegin {
    /// The head (id and chain hash) the plan was made against.
    head: String,
    head_hash: Option<String>,
    /// The snapshots recorded as pruned by this prune.
    snapshots: BTreeMap<String, PrunedSnapshot>,
    /// Objects (hex hashes) to delete.
    objects: Vec<String>,
    /// ZFS snapshots to destroy.
    zfs: Vec<String>,
}

type PruneLog = Log<PruneBegin>;

/// The record of pruned snapshots of this repository.
pub(crate) fn record(site: &Site, store: &dyn Store) -> Result<PrunedRecord, AgentError> {
    PrunedRecord::load(&store.side_file(site, RECORD))
}

/// `ReadMeta("pruned.json")`.
pub(crate) fn open_record(site: &Site, store: &dyn Store) -> Result<Option<File>, AgentError> {
    let p = store.side_file(site, RECORD);
    match File::open(&p) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io(format!("cannot read {}", p.display()), e)),
    }
}

/// A snapshot the repository knows of: its index record's time and hash.
#[derive(Debug, Clone, Default)]
pub(crate) struct Known {
    pub created_at: Option<String>,
    pub hash: Option<String>,
}

/// The snapshots the index (`sync-messages.json`) records, by number.
pub(crate) fn known_from_messages(m: &SyncMessages) -> BTreeMap<u64, Known> {
    let mut out = BTreeMap::new();
    for (id, v) in &m.snapshots {
        if let Some(n) = strict_snapshot_number(id) {
            let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
            out.insert(
                n,
                Known {
                    created_at: text("created_at"),
                    hash: text("snapshot_hash"),
                },
            );
        }
    }
    out
}

/// The snapshots `policy` keeps of `known`: the head, anything numbered
/// above it (not ours to judge), the `keep_last` newest up to the head, and
/// those made within `keep_within_secs` of `now` (or at an unknown time).
pub(crate) fn kept_by(
    policy: &Policy,
    known: &BTreeMap<u64, Known>,
    head_n: u64,
    now: i64,
) -> BTreeSet<u64> {
    let mut kept: BTreeSet<u64> = BTreeSet::new();
    kept.insert(head_n);
    kept.extend(known.keys().filter(|n| **n > head_n));
    kept.extend(
        known
            .keys()
            .rev()
            .filter(|n| **n <= head_n)
            .take(policy.keep_last as usize),
    );
    if let Some(secs) = policy.keep_within_secs {
        for (n, k) in known {
            let t = k.created_at.as_deref().and_then(dsg_core::timefmt::parse);
            let recent = t.is_none_or(|t| now - t.timestamp() <= secs as i64);
            if recent {
                kept.insert(*n);
            }
        }
    }
    kept
}

/// Refuses a policy that would prune the head.
pub(crate) fn check_policy(policy: &Policy) -> Result<(), AgentError> {
    if policy.keep_last == 0 {
        return Err(AgentError::new(
            ErrorKind::Protocol,
            "refusing to prune with keep_last 0: the head is always kept",
        )
        .hint("--keep-last counts the head: --keep-last 1 keeps only the head"));
    }
    Ok(())
}

/// Seconds since the epoch.
pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn head_of(site: &Site) -> Result<(Manifest, u64, String, Option<String>), AgentError> {
    let head = site.head()?.ok_or_else(|| {
        AgentError::new(
            ErrorKind::NotFound,
            format!(
                "{} is not a dsg repository (no .dsg/last-sync.json)",
                site.dir().display()
            ),
        )
    })?;
    let md = head.metadata.clone().unwrap_or_default();
    let n = strict_snapshot_number(&md.snapshot_id).ok_or_else(|| {
        AgentError::new(
            ErrorKind::Corrupt,
            format!(
                "the repository's head has snapshot id {:?}, which is not of the form s<N>",
                md.snapshot_id
            ),
        )
    })?;
    Ok((head, n, md.snapshot_id, md.snapshot_hash))
}

/// Every snapshot number the repository knows of (index, archives, ZFS
/// snapshots, the head), with what the index says of it.
fn known_snapshots(
    site: &Site,
    store: &dyn Store,
    head_n: u64,
) -> Result<BTreeMap<u64, Known>, AgentError> {
    let mpath = site.dsg().join("sync-messages.json");
    let messages = SyncMessages::load_optional(&mpath)
        .map_err(|e| AgentError::new(ErrorKind::Corrupt, e.to_string()))?;
    let mut out = messages
        .as_ref()
        .map(known_from_messages)
        .unwrap_or_default();
    if let Ok(rd) = fs::read_dir(site.dsg().join("archive")) {
        for de in rd.flatten() {
            let name = de.file_name().to_string_lossy().to_string();
            let id = name
                .strip_suffix("-sync.json.lz4")
                .or_else(|| name.strip_suffix("-sync.json.gz"));
            if let Some(n) = id.and_then(strict_snapshot_number) {
                out.entry(n).or_default();
            }
        }
    }
    if let Some(z) = store.zfs() {
        for s in z.snapshots(&z.dataset())? {
            if let Some(n) = strict_snapshot_number(&s) {
                out.entry(n).or_default();
            }
        }
    }
    out.entry(head_n).or_default();
    Ok(out)
}

/// The manifest of a snapshot that is not the head: its archive, checked
/// (it names that snapshot, its entries hash verifies).
fn archived_manifest(site: &Site, id: &str) -> Result<Manifest, AgentError> {
    let dir = site.dsg().join("archive");
    let lz4 = dir.join(format!("{id}-sync.json.lz4"));
    let gz = dir.join(format!("{id}-sync.json.gz"));
    let path = if lz4.is_file() || !gz.is_file() {
        lz4
    } else {
        gz
    };
    let refuse = |why: String| {
        AgentError::new(
            ErrorKind::Corrupt,
            format!("cannot prune: the manifest of {id}, which is kept, {why}"),
        )
        .hint("nothing was deleted; dsg validate-chain shows what is wrong with the history")
    };
    let m = read_archive(&path).map_err(|e| refuse(format!("cannot be read: {e}")))?;
    if m.metadata.as_ref().map(|m| m.snapshot_id.as_str()) != Some(id) {
        return Err(refuse(format!(
            "({}) names another snapshot",
            path.display()
        )));
    }
    m.verify_integrity()
        .map_err(|e| refuse(format!("fails its check: {e}")))?;
    Ok(m)
}

/// The hashes every snapshot in `kept` references (the head's from `head`).
fn referenced(
    site: &Site,
    head: &Manifest,
    head_n: u64,
    kept: &BTreeSet<u64>,
) -> Result<HashSet<u64>, AgentError> {
    let mut refs = HashSet::new();
    let mut add = |m: &Manifest| {
        for e in m.entries() {
            if let dsg_core::manifest::EntryKind::File { hash: Some(h), .. } = &e.kind {
                refs.insert(h.0);
            }
        }
    };
    add(head);
    for &n in kept {
        if n != head_n {
            add(&archived_manifest(site, &format!("s{n}"))?);
        }
    }
    Ok(refs)
}

/// Objects not in `refs`, with their sizes. Only names that are a hash
/// in their own folder count; anything else is left alone.
fn unreferenced_objects(
    site: &Site,
    refs: &HashSet<u64>,
) -> Result<Vec<(String, u64)>, AgentError> {
    let mut out = Vec::new();
    let objects = site.dsg().join("objects");
    let rd = match fs::read_dir(&objects) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(AgentError::io(objects.display(), e)),
    };
    for d in rd {
        let d = d.map_err(|e| AgentError::io(objects.display(), e))?;
        let hh = d.file_name().to_string_lossy().to_string();
        if hh.len() != 2 || !d.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let sub = fs::read_dir(d.path()).map_err(|e| AgentError::io(d.path().display(), e))?;
        for o in sub {
            let o = o.map_err(|e| AgentError::io(d.path().display(), e))?;
            let name = o.file_name().to_string_lossy().to_string();
            let Some(h) = Hash::parse(&name) else {
                continue;
            };
            if h.to_hex() != name || !name.starts_with(&hh) {
                continue;
            }
            let md = o
                .metadata()
                .map_err(|e| AgentError::io(o.path().display(), e))?;
            if md.is_file() && !refs.contains(&h.0) {
                out.push((name, md.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The clones that depend on snapshot `snap` (read from every dataset's
/// `origin`: zfs-fuse has no `clones` property).
fn zfs_clones(z: &crate::zfs::Zfs, snap: &str) -> Result<Vec<String>, AgentError> {
    let want = format!("{}@{snap}", z.dataset());
    let out = z.run(&[
        "list",
        "-H",
        "-o",
        "name,origin",
        "-t",
        "filesystem",
        "-r",
        &z.pool,
    ])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, origin)| origin.trim() == want)
        .map(|(name, _)| name.to_string())
        .collect())
}

/// `Prune`: see the module's header.
pub(crate) fn prune(repo: &mut Repository, policy: &Policy) -> Result<PruneReport, AgentError> {
    if repo.tx.is_some() {
        return Err(AgentError::new(
            ErrorKind::Protocol,
            "cannot prune inside an open transaction",
        ));
    }
    check_policy(policy)?;
    let site = &repo.site;
    let store = &*repo.store;
    // A dry run reads under the shared lock (it writes nothing, not even
    // the lock's holder text); a prune takes the writers' lock, as a sync.
    let _lock = if policy.dry_run {
        site.take_flock(&store.repo_lock(site), LockMode::Shared, true)?
    } else {
        let start = Instant::now();
        let lock = loop {
            repo.wait_for_original(start)?;
            let lock = site.lock(&store.repo_lock(site))?;
            if store.original_transaction(site).is_none() {
                break lock;
            }
        };
        store.recover_locked(site)?;
        recover_locked(site, store)?;
        Some(lock)
    };
    let (head, head_n, head_id, head_hash) = head_of(site)?;
    let known = known_snapshots(site, store, head_n)?;
    let rec = record(site, store)?;
    let kept = kept_by(policy, &known, head_n, now_secs());
    let id = |n: u64| format!("s{n}");
    let mut report = PruneReport::keeping(head_id.clone(), &kept, policy.dry_run);
    let pruned_at = dsg_core::timefmt::now_la();
    let mut plan = PruneBegin {
        head: head_id.clone(),
        head_hash: head_hash.clone(),
        snapshots: BTreeMap::new(),
        objects: Vec::new(),
        zfs: Vec::new(),
    };
    let existing: HashSet<String> = match store.zfs() {
        Some(z) => z.snapshots(&z.dataset())?.into_iter().collect(),
        None => HashSet::new(),
    };
    for (n, k) in known.iter().filter(|(n, _)| !kept.contains(n)) {
        let sid = id(*n);
        let recorded = rec.get(&sid, k.hash.as_deref()).is_some();
        if let Some(z) = store.zfs() {
            if existing.contains(&sid) {
                if !zfs_clones(z, &sid)?.is_empty() {
                    report.in_use.push(sid);
                    continue;
                }
                plan.zfs.push(sid.clone());
            }
        }
        if recorded {
            report.already_pruned.push(sid);
        } else {
            report.pruned.push(sid.clone());
            plan.snapshots.insert(
                sid,
                PrunedSnapshot {
                    snapshot_hash: k.hash.clone(),
                    pruned_at: pruned_at.clone(),
                    pruned_by: policy.user.clone(),
                },
            );
        }
    }
    let mut refs = None;
    if store.keeps_objects() {
        let r = referenced(site, &head, head_n, &kept)?;
        for (name, size) in unreferenced_objects(site, &r)? {
            report.objects += 1;
            report.bytes += size;
            plan.objects.push(name);
        }
        refs = Some(r);
    }
    report.zfs_snapshots = plan.zfs.clone();
    let nothing = plan.snapshots.is_empty() && plan.objects.is_empty() && plan.zfs.is_empty();
    if policy.dry_run || nothing {
        return Ok(report);
    }
    // The plan is journaled before anything is deleted: from here on the
    // prune is rolled forward, by this command or the next.
    let jpath = store.side_file(site, JOURNAL);
    let j = Journal::create(&jpath)
        .map_err(|e| AgentError::io(format!("cannot create {}", jpath.display()), e))?;
    let tx = format!("prune-{}", uuid::Uuid::new_v4().simple());
    j.append(&Record::Begin {
        tx: tx.clone(),
        begin: plan.clone(),
    })
    .map_err(|e| {
        let _ = fs::remove_file(&jpath);
        AgentError::io(format!("cannot write {}", jpath.display()), e)
    })?;
    failpoint("repo.prune.journal.begin");
    roll_forward(site, store, &j, &tx, &plan, refs)?;
    Ok(report)
}

/// Carries out a journaled plan (again, after a crash): record, delete,
/// `done`, remove the journal. `refs`: the hashes the kept snapshots
/// reference, when the caller just computed them under the same lock;
/// `None`: computed now, from every snapshot that is not pruned.
fn roll_forward(
    site: &Site,
    store: &dyn Store,
    j: &Journal,
    tx: &str,
    plan: &PruneBegin,
    refs: Option<HashSet<u64>>,
) -> Result<(), AgentError> {
    let jpath = store.side_file(site, JOURNAL);
    let (head, head_n, head_id, head_hash) = head_of(site)?;
    let known = known_snapshots(site, store, head_n)?;
    // The history the plan was made for: the same head, or one after it
    // (the plan's head still recorded with the same hash).
    let same = (head_id == plan.head && head_hash == plan.head_hash)
        || strict_snapshot_number(&plan.head)
            .is_some_and(|n| n < head_n && known.get(&n).is_some_and(|k| k.hash == plan.head_hash));
    if !same {
        tracing::warn!(
            "dropping an interrupted prune made for head {}: the repository's history changed",
            plan.head
        );
        return finish(j, tx, &jpath, site);
    }
    let mut rec = record(site, store)?;
    let before = rec.clone();
    for (k, v) in &plan.snapshots {
        rec.pruned.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let rpath = store.side_file(site, RECORD);
    if rec != before {
        write_atomic(&rpath, &rec.to_bytes())
            .map_err(|e| AgentError::new(ErrorKind::Io, e.to_string()))?;
    }
    failpoint("repo.prune.recorded");
    if !plan.objects.is_empty() {
        let refs = match refs {
            Some(r) => r,
            None => {
                let kept: BTreeSet<u64> = known
                    .iter()
                    .filter(|(n, k)| rec.get(&format!("s{n}"), k.hash.as_deref()).is_none())
                    .map(|(n, _)| *n)
                    .collect();
                referenced(site, &head, head_n, &kept)?
            }
        };
        let dsg = site.dsg();
        let mut first = true;
        for name in &plan.objects {
            let Some(h) = Hash::parse(name) else { continue };
            if refs.contains(&h.0) {
                // A snapshot that is not pruned references it (after a
                // crash, the repository may have moved on): it stays.
                continue;
            }
            let p = dsg_txn::apply::object_path(&dsg, h);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(AgentError::io(format!("cannot remove {}", p.display()), e)),
            }
            if first {
                first = false;
                failpoint("repo.prune.object");
            }
            if let Some(dir) = p.parent() {
                // Empty object folders go too (a sync makes them again).
                let _ = fs::remove_dir(dir);
            }
        }
        failpoint("repo.prune.objects");
    }
    if let Some(z) = store.zfs() {
        let existing: HashSet<String> = z.snapshots(&z.dataset())?.into_iter().collect();
        let mut first = true;
        for s in &plan.zfs {
            let Some(n) = strict_snapshot_number(s) else {
                continue;
            };
            if n >= head_n || !existing.contains(s) || !zfs_clones(z, s)?.is_empty() {
                continue;
            }
            z.run(&["destroy", &format!("{}@{s}", z.dataset())])?;
            if first {
                first = false;
                failpoint("repo.prune.destroyed");
            }
        }
        failpoint("repo.prune.snapshots");
    }
    finish(j, tx, &jpath, site)
}

/// `done`, then the journal goes.
fn finish(j: &Journal, tx: &str, jpath: &Path, site: &Site) -> Result<(), AgentError> {
    j.append(&Record::<PruneBegin>::Done { tx: tx.into() })
        .map_err(|e| AgentError::io(format!("cannot write {}", jpath.display()), e))?;
    failpoint("repo.prune.journal.done");
    fs::remove_file(jpath)
        .map_err(|e| AgentError::io(format!("cannot remove {}", jpath.display()), e))?;
    let dir = jpath
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| site.dsg());
    sync_dir(&dir).map_err(|e| AgentError::io(dir.display(), e))
}

fn journal_path(site: &Site, store: &dyn Store) -> PathBuf {
    store.side_file(site, JOURNAL)
}

/// With the repository's exclusive lock held: finishes a prune that was
/// interrupted (rolls it forward).
pub(crate) fn recover_locked(site: &Site, store: &dyn Store) -> Result<(), AgentError> {
    let jpath = journal_path(site, store);
    let Some(log) = PruneLog::read(&jpath)
        .map_err(|e| AgentError::io(format!("cannot read {}", jpath.display()), e))?
    else {
        return Ok(());
    };
    match log.begin() {
        Some((tx, plan)) if !log.is_done() => {
            tracing::info!("finishing an interrupted prune {tx}");
            let j = Journal::open(&jpath)
                .map_err(|e| AgentError::io(format!("cannot open {}", jpath.display()), e))?;
            roll_forward(site, store, &j, tx, plan, None)
        }
        _ => {
            fs::remove_file(&jpath)
                .map_err(|e| AgentError::io(format!("cannot remove {}", jpath.display()), e))?;
            Ok(())
        }
    }
}

/// Without a lock: finishes an interrupted prune unless a live writer
/// holds the repository or this user may not write it (a half-done prune
/// harms no kept snapshot, so a reader may read past it).
pub(crate) fn recover(site: &Site, store: &dyn Store) -> Result<(), AgentError> {
    let jpath = journal_path(site, store);
    if !jpath.exists() {
        return Ok(());
    }
    let dir = jpath.parent().unwrap_or(Path::new("/"));
    if rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).is_err() {
        return Ok(());
    }
    if let Some(_lock) = site.take_flock(&store.repo_lock(site), LockMode::Exclusive, false)? {
        recover_locked(site, store)?;
    }
    Ok(())
}
