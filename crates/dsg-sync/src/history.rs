//! History: `log`, `blame`, `diff` and the `validate-*` checks.
//!
//! The history of a project is the chain that ends at its last sync
//! (`.dsg/last-sync.json`) and follows `snapshot_previous` back to the
//! first snapshot. The index (`.dsg/sync-messages.json`) gives every
//! snapshot's metadata without opening a manifest, so `log` reads only it
//! (and a small cache of sizes, which the index does not record); the
//! archives (`.dsg/archive/sN-sync.json.lz4`) give the entries. A client
//! that lacks an archive (an old clone, the original's clients) fetches it
//! from the repository the first time a command needs it and keeps it, but
//! only after checking it is the snapshot its own chain names: the original
//! forked histories, so the repository's `s1` may be another `s1`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dsg_core::atomic::write_atomic;
use dsg_core::hash::Hash;
use dsg_core::manifest::{
    archive_name, snapshot_hash, snapshot_number, Entry, EntryKind, Manifest, Metadata, Mtime,
    SyncMessages,
};
use dsg_core::scan::LocalKind;
use dsg_repo::{Meta, RepoClient};
use rayon::prelude::*;
use serde::Serialize;

use crate::{EngineError, Project, Reporter, Result};

/// Where a snapshot's manifest came from, for messages that must name it.
#[derive(Clone, Debug)]
enum Origin {
    Head(PathBuf),
    Local(PathBuf),
    /// Fetched from the repository (and kept locally only if it belongs
    /// to this chain).
    Remote(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Head(p) | Origin::Local(p) => write!(f, "{}", p.display()),
            Origin::Remote(n) => write!(f, "repository:.dsg/archive/{n}"),
        }
    }
}

/// A snapshot's manifest as bytes (the JSON, decompressed), and where from.
struct Raw {
    json: Vec<u8>,
    origin: Origin,
}

/// One line of `dsg log`.
#[derive(Clone, Debug, Serialize)]
pub struct LogEntry {
    pub snapshot_id: String,
    pub created_at: String,
    pub created_by: Option<String>,
    pub message: Option<String>,
    pub entry_count: u64,
    /// `None` when the snapshot's manifest is not available anywhere.
    pub total_bytes: Option<u64>,
    pub snapshot_hash: Option<String>,
    /// `dsg prune` removed its data (its manifest stays): from this
    /// client's copy of the repository's record, `.dsg/pruned.json`.
    pub pruned: bool,
}

/// One event of `dsg blame`.
#[derive(Clone, Debug, Serialize)]
pub struct BlameEvent {
    pub snapshot_id: String,
    pub event: &'static str,
    pub created_at: String,
    pub created_by: Option<String>,
    pub message: Option<String>,
    /// The file's content hash after the event (none for a deletion, a
    /// link, or an original entry that never recorded one).
    pub hash: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiffFile {
    pub path: String,
    pub change: &'static str,
    pub size_before: Option<u64>,
    pub size_after: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiffReport {
    pub from: String,
    pub to: String,
    pub files: Vec<DiffFile>,
}

/// One side of a diff.
#[derive(Clone, Debug)]
pub enum Side {
    Snapshot(String),
    WorkingTree,
}

/// The name `diff --json` gives the working tree.
pub const WORKING_TREE: &str = "working-tree";

/// The verdict on one snapshot of a chain check.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Its manifest verifies and its link to the previous snapshot
    /// recomputes.
    Verified,
    /// No manifest anywhere; only its index record could be checked.
    IndexOnly,
    Failed,
}

#[derive(Clone, Debug, Serialize)]
pub struct SnapshotCheck {
    pub snapshot_id: String,
    pub verdict: Verdict,
    /// What was checked, or what failed.
    pub details: Vec<String>,
    /// The file that failed (a manifest or archive), when one did.
    pub path: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ChainReport {
    pub checks: Vec<SnapshotCheck>,
    /// Facts that are not failures (the original's quirks).
    pub notes: Vec<String>,
}

impl ChainReport {
    pub fn failures(&self) -> impl Iterator<Item = &SnapshotCheck> {
        self.checks.iter().filter(|c| c.verdict == Verdict::Failed)
    }
}

/// The result of `validate-file`.
#[derive(Clone, Debug, Serialize)]
pub struct FileCheck {
    pub path: String,
    pub snapshot_id: String,
    pub expected: String,
    pub actual: String,
    pub ok: bool,
}

/// Versions before ours (0.5.0) are the original's: it rewrote indexes
/// and forked chains, so where its records disagree that is a quirk.
fn is_original(md: &Metadata) -> bool {
    let mut it = md
        .manifest_version
        .split('.')
        .map(|p| p.parse::<u64>().ok());
    matches!((it.next(), it.next()), (Some(Some(0)), Some(Some(minor))) if minor < 5)
}

fn unknown_snapshot(id: &str, chain: &[Metadata]) -> EngineError {
    let known = match (chain.last(), chain.first()) {
        (Some(a), Some(b)) => format!(" ({} to {})", a.snapshot_id, b.snapshot_id),
        _ => String::new(),
    };
    EngineError::State {
        message: format!("no snapshot {id} in this project's history{known}"),
        hint: "'dsg log' lists the snapshots; name one as sN, or 'head' for the last sync".into(),
    }
}

pub struct History<'p> {
    project: &'p Project,
    /// The last sync's metadata.
    head: Metadata,
    index: SyncMessages,
    /// Newest first, built on first use.
    chain: Option<Vec<Metadata>>,
    client: Option<RepoClient>,
    remote_names: Option<Vec<String>>,
    /// Archives fetched but not kept (not this chain's snapshot).
    fetched: HashMap<String, Vec<u8>>,
    pub notes: Vec<String>,
}

impl<'p> History<'p> {
    /// Opens the project's history: the head's metadata and the index.
    pub fn open(project: &'p Project) -> Result<History<'p>> {
        if !project.cache_path().is_file() {
            return Err(EngineError::State {
                message: format!(
                    "{} has no history here: {} is missing",
                    project.root.display(),
                    project.cache_path().display()
                ),
                hint: "run 'dsg clone' (or 'dsg init') first".into(),
            });
        }
        let head = head_metadata(&project.cache_path())?;
        let index = project.load_sync_messages()?.unwrap_or_default();
        Ok(History {
            project,
            head,
            index,
            chain: None,
            client: None,
            remote_names: None,
            fetched: HashMap::new(),
            notes: Vec::new(),
        })
    }

    pub fn head(&self) -> &Metadata {
        &self.head
    }

    fn archive_path(&self, id: &str) -> PathBuf {
        self.project.dsg().join("archive").join(archive_name(id))
    }

    fn index_record(&self, id: &str) -> Option<Metadata> {
        self.index
            .snapshots
            .get(id)
            .and_then(|v| Metadata::from_value(v).ok())
    }

    /// The chain, newest first: the head, then each `snapshot_previous`,
    /// from the index when it has the record, else from the archive.
    pub fn chain(&mut self) -> Result<Vec<Metadata>> {
        if let Some(c) = &self.chain {
            return Ok(c.clone());
        }
        let mut chain = vec![self.head.clone()];
        let mut seen = std::collections::HashSet::new();
        seen.insert(self.head.snapshot_id.clone());
        while let Some(prev) = chain.last().and_then(|m| m.snapshot_previous.clone()) {
            if !seen.insert(prev.clone()) {
                self.notes.push(format!(
                    "the chain loops back to {prev}; history stops there"
                ));
                break;
            }
            let md = match self.index_record(&prev) {
                Some(md) if md.snapshot_id == prev => md,
                _ => match self.raw(&prev, None)? {
                    Some(raw) => match Manifest::from_json_bytes(&raw.json, Path::new(""))
                        .ok()
                        .and_then(|m| m.metadata)
                    {
                        Some(md) => md,
                        None => {
                            self.notes.push(format!(
                                "history before {} is unknown: the manifest of {prev} cannot be read",
                                chain.last().unwrap().snapshot_id
                            ));
                            break;
                        }
                    },
                    None => {
                        self.notes.push(format!(
                            "history before {} is unknown: no index record and no archive of {prev}, here or in the repository",
                            chain.last().unwrap().snapshot_id
                        ));
                        break;
                    }
                },
            };
            chain.push(md);
        }
        self.chain = Some(chain.clone());
        Ok(chain)
    }

    /// The chain's metadata for `id` (`sN`, `N` or `head`).
    pub fn resolve(&mut self, id: &str) -> Result<Metadata> {
        let chain = self.chain()?;
        let want = if id == "head" || id == "HEAD" {
            self.head.snapshot_id.clone()
        } else if id.bytes().all(|b| b.is_ascii_digit()) && !id.is_empty() {
            format!("s{id}")
        } else {
            id.to_string()
        };
        chain
            .iter()
            .find(|m| m.snapshot_id == want)
            .cloned()
            .ok_or_else(|| unknown_snapshot(id, &chain))
    }

    fn connect(&mut self) -> Result<&mut RepoClient> {
        if self.client.is_none() {
            self.client = Some(RepoClient::connect(&self.project.config)?);
        }
        Ok(self.client.as_mut().expect("connected"))
    }

    /// A snapshot's manifest bytes: the head's file, the local archive, or
    /// the repository's archive (kept locally when it is the snapshot
    /// `expect` names by its hash, or when nothing is expected). `None`:
    /// nowhere to be found.
    fn raw(&mut self, id: &str, expect: Option<&Metadata>) -> Result<Option<Raw>> {
        if id == self.head.snapshot_id
            && !matches!(expect, Some(e) if e.snapshot_hash != self.head.snapshot_hash)
        {
            let p = self.project.cache_path();
            let json = std::fs::read(&p).map_err(|e| EngineError::io(&p, e))?;
            return Ok(Some(Raw {
                json,
                origin: Origin::Head(p),
            }));
        }
        let local = self.archive_path(id);
        match std::fs::read(&local) {
            Ok(bytes) => {
                let json = decompress(&bytes, &local)?;
                return Ok(Some(Raw {
                    json,
                    origin: Origin::Local(local),
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(EngineError::io(&local, e)),
        }
        let name = archive_name(id);
        if let Some(json) = self.fetched.get(&name) {
            return Ok(Some(Raw {
                json: json.clone(),
                origin: Origin::Remote(name),
            }));
        }
        if self.remote_names.is_none() {
            let names = self.connect()?.list_archives()?;
            self.remote_names = Some(names);
        }
        if !self.remote_names.as_ref().unwrap().contains(&name) {
            return Ok(None);
        }
        let bytes = match self
            .connect()?
            .read_meta(&format!("archive/{name}"), None)?
        {
            Meta::Data(b) => b,
            Meta::Missing | Meta::Unchanged => return Ok(None),
        };
        let origin = Origin::Remote(name.clone());
        let json = decompress(&bytes, Path::new(&origin.to_string()))?;
        // Keep it only if it is the snapshot this chain names and sound:
        // a forked or damaged archive must not become "ours".
        let belongs = Manifest::from_json_bytes(&json, Path::new(""))
            .ok()
            .filter(|m| m.verify_integrity().is_ok())
            .and_then(|m| m.metadata)
            .is_some_and(|md| {
                md.snapshot_id == id
                    && !matches!(expect, Some(e) if e.snapshot_hash != md.snapshot_hash)
            });
        if belongs {
            let dir = self.project.dsg().join("archive");
            std::fs::create_dir_all(&dir).map_err(|e| EngineError::io(&dir, e))?;
            write_atomic(&local, &bytes).map_err(|e| EngineError::io(e.path, e.source))?;
            return Ok(Some(Raw {
                json,
                origin: Origin::Local(local),
            }));
        }
        self.fetched.insert(name.clone(), json.clone());
        Ok(Some(Raw { json, origin }))
    }

    /// Fetches every archive of the chain this client lacks, once, so
    /// that the readers after it can run in parallel on local files.
    fn fetch_missing(&mut self, chain: &[Metadata]) -> Result<()> {
        for md in chain {
            if md.snapshot_id != self.head.snapshot_id
                && !self.archive_path(&md.snapshot_id).exists()
            {
                self.raw(&md.snapshot_id, Some(md))?;
            }
        }
        Ok(())
    }

    /// A snapshot's whole manifest, integrity-checked.
    fn manifest(&mut self, md: &Metadata) -> Result<Manifest> {
        let raw = self.raw(&md.snapshot_id, Some(md))?.ok_or_else(|| EngineError::State {
            message: format!(
                "the manifest of {} is not available: no archive here or in the repository",
                md.snapshot_id
            ),
            hint: "the original dsg did not archive every snapshot; only the index record of it exists"
                .into(),
        })?;
        let origin = PathBuf::from(raw.origin.to_string());
        let m = Manifest::from_json_bytes(&raw.json, &origin)?;
        m.verify_integrity().map_err(|msg| EngineError::State {
            message: format!(
                "{} ({}) fails its integrity check: {msg}",
                md.snapshot_id,
                origin.display()
            ),
            hint: "run 'dsg validate-chain' to see which snapshots are damaged".into(),
        })?;
        Ok(m)
    }

    /// `dsg log`: newest first, at most `limit`.
    pub fn log(&mut self, limit: Option<usize>) -> Result<Vec<LogEntry>> {
        let mut chain = self.chain()?;
        if let Some(n) = limit {
            chain.truncate(n);
        }
        let cache_path = self.project.dsg().join("history-sizes.json");
        let mut sizes = read_sizes(&cache_path);
        let missing: Vec<Metadata> = chain
            .iter()
            .filter(|m| !sizes.contains_key(&m.entries_hash))
            .cloned()
            .collect();
        if !missing.is_empty() {
            self.fetch_missing(&missing)?;
            let (project, head) = (self.project, &self.head);
            let found: Vec<(String, Option<u64>)> = missing
                .par_iter()
                .map(|md| {
                    let total = raw_local(project, head, md).ok().flatten().and_then(|raw| {
                        let m = Manifest::from_json_bytes(&raw.json, Path::new("")).ok()?;
                        m.verify_integrity().ok()?;
                        let mm = m.metadata.as_ref()?;
                        (mm.entries_hash == md.entries_hash).then(|| total_bytes(&m))
                    });
                    (md.entries_hash.clone(), total)
                })
                .collect();
            let mut changed = false;
            for (eh, total) in found {
                if let Some(t) = total {
                    sizes.insert(eh, t);
                    changed = true;
                }
            }
            if changed && self.project.dsg().is_dir() {
                let bytes = serde_json::to_vec(&sizes).expect("json");
                if let Err(e) = write_atomic(&cache_path, &bytes) {
                    tracing::warn!("could not save {}: {e}", cache_path.display());
                }
            }
        }
        let pruned = crate::prune::local_record(&self.project.dsg());
        Ok(chain
            .into_iter()
            .map(|md| LogEntry {
                pruned: pruned
                    .get(&md.snapshot_id, md.snapshot_hash.as_deref())
                    .is_some(),
                total_bytes: sizes.get(&md.entries_hash).copied(),
                snapshot_id: md.snapshot_id,
                created_at: md.created_at,
                created_by: md.created_by,
                message: md.snapshot_message,
                entry_count: md.entry_count,
                snapshot_hash: md.snapshot_hash,
            })
            .collect())
    }

    /// `dsg blame`: the path's events, oldest first. Errors when no
    /// snapshot of the chain ever held the path.
    pub fn blame(&mut self, path: &str) -> Result<Vec<BlameEvent>> {
        let mut chain = self.chain()?;
        chain.reverse();
        self.fetch_missing(&chain)?;
        let (project, head) = (self.project, &self.head);
        let found: Vec<Result<Option<Option<Entry>>>> = chain
            .par_iter()
            .map(|md| {
                let Some(raw) = raw_local(project, head, md)? else {
                    return Ok(None);
                };
                if let Some(e) = find_entry(&raw.json, path) {
                    return Ok(Some(e));
                }
                let m = Manifest::from_json_bytes(&raw.json, Path::new(&raw.origin.to_string()))?;
                Ok(Some(m.get(path).cloned()))
            })
            .collect();
        let mut events = Vec::new();
        let mut prev: Option<Entry> = None;
        let mut unavailable = Vec::new();
        for (md, f) in chain.iter().zip(found) {
            let Some(now) = f? else {
                unavailable.push(md.snapshot_id.clone());
                continue;
            };
            let event = match (&prev, &now) {
                (None, Some(_)) => Some("add"),
                (Some(_), None) => Some("delete"),
                (Some(a), Some(b)) if !a.same_content(b) => Some("modify"),
                _ => None,
            };
            if let Some(event) = event {
                events.push(BlameEvent {
                    snapshot_id: md.snapshot_id.clone(),
                    event,
                    created_at: md.created_at.clone(),
                    created_by: md.created_by.clone(),
                    message: md.snapshot_message.clone(),
                    hash: now.as_ref().and_then(|e| e.hash()).map(|h| h.to_hex()),
                });
            }
            prev = now;
        }
        if !unavailable.is_empty() {
            self.notes.push(format!(
                "no manifest of {} here or in the repository (the original dsg did not archive them); events there are not shown",
                unavailable.join(", ")
            ));
        }
        if events.is_empty() {
            return Err(EngineError::State {
                message: format!(
                    "{path} was never tracked: it is in none of the {} snapshots {}..{}",
                    chain.len() - unavailable.len(),
                    chain.first().map(|m| m.snapshot_id.as_str()).unwrap_or("?"),
                    chain.last().map(|m| m.snapshot_id.as_str()).unwrap_or("?"),
                ),
                hint: "name the file relative to the project root (or the current directory), as 'dsg list-files' prints it".into(),
            });
        }
        Ok(events)
    }

    /// `dsg diff`: what changed from `a` to `b`, limited to `paths` (each a
    /// file or a directory prefix) when any are given.
    pub fn diff(
        &mut self,
        a: Side,
        b: Side,
        paths: &[String],
        reporter: &dyn Reporter,
    ) -> Result<DiffReport> {
        let (from, before) = self.side(a, reporter)?;
        let (to, after) = self.side(b, reporter)?;
        let wanted = |p: &str| {
            paths.is_empty()
                || paths.iter().any(|w| {
                    w.is_empty()
                        || p == w
                        || p.strip_prefix(w.as_str())
                            .is_some_and(|r| r.starts_with('/'))
                })
        };
        let mut files = Vec::new();
        let all: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
        for p in all {
            if !wanted(p) {
                continue;
            }
            let (x, y) = (before.get(p), after.get(p));
            let change = match (x, y) {
                (None, Some(_)) => "added",
                (Some(_), None) => "deleted",
                (Some(x), Some(y)) if !x.same_content(y) => "modified",
                _ => continue,
            };
            files.push(DiffFile {
                path: p.clone(),
                change,
                size_before: x.and_then(size_of),
                size_after: y.and_then(size_of),
            });
        }
        Ok(DiffReport { from, to, files })
    }

    fn side(
        &mut self,
        s: Side,
        reporter: &dyn Reporter,
    ) -> Result<(String, BTreeMap<String, Entry>)> {
        match s {
            Side::Snapshot(id) => {
                let md = self.resolve(&id)?;
                let m = self.manifest(&md)?;
                Ok((
                    md.snapshot_id,
                    m.into_entries()
                        .into_iter()
                        .map(|e| (e.path.to_string(), e))
                        .collect(),
                ))
            }
            Side::WorkingTree => {
                let scan = self.project.scan(reporter);
                self.project.save_stat_cache(&scan);
                let user: Arc<str> = Arc::from("");
                let map = scan
                    .entries
                    .into_iter()
                    .map(|e| {
                        let kind = match e.kind {
                            LocalKind::File { size, hash } => {
                                let ns = e.stat.mtime_ns;
                                EntryKind::File {
                                    size,
                                    mtime: Mtime::from_unix(
                                        ns.div_euclid(1_000_000_000),
                                        ns.rem_euclid(1_000_000_000) as u32,
                                    ),
                                    hash: Some(hash),
                                }
                            }
                            LocalKind::Link { target } => EntryKind::Link { target },
                        };
                        (
                            e.path.to_string(),
                            Entry {
                                path: e.path,
                                user: user.clone(),
                                kind,
                            },
                        )
                    })
                    .collect();
                Ok((WORKING_TREE.to_string(), map))
            }
        }
    }

    /// `dsg validate-snapshot`: the manifest's own integrity, its agreement
    /// with the index, and its chain hash recomputed from its predecessor.
    pub fn validate_snapshot(&mut self, id: &str) -> Result<SnapshotCheck> {
        let md = self.resolve(id)?;
        let chain = self.chain()?;
        let pos = chain
            .iter()
            .position(|m| m.snapshot_id == md.snapshot_id)
            .unwrap();
        let prev = chain.get(pos + 1).cloned();
        let prev_hash = match &prev {
            Some(p) => match self.raw(&p.snapshot_id, Some(p))? {
                Some(raw) => Manifest::from_json_bytes(&raw.json, Path::new(""))
                    .ok()
                    .and_then(|m| m.metadata)
                    .and_then(|m| m.snapshot_hash)
                    .or(p.snapshot_hash.clone()),
                None => p.snapshot_hash.clone(),
            },
            None => None,
        };
        Ok(self.check_one(
            &md,
            prev.as_ref().map(|p| p.snapshot_id.as_str()),
            prev_hash.as_deref(),
        ))
    }

    /// Checks one snapshot whose predecessor is `prev_id` with chain hash
    /// `prev_hash` (as that predecessor's own manifest, or record, says).
    fn check_one(
        &mut self,
        md: &Metadata,
        prev_id: Option<&str>,
        prev_hash: Option<&str>,
    ) -> SnapshotCheck {
        let id = md.snapshot_id.clone();
        let mut details = Vec::new();
        let fail = |details: Vec<String>, path: Option<String>| SnapshotCheck {
            snapshot_id: id.clone(),
            verdict: Verdict::Failed,
            details,
            path,
        };
        let raw = match self.raw(&md.snapshot_id, Some(md)) {
            Ok(r) => r,
            Err(e) => return fail(vec![format!("cannot read its manifest: {e}")], None),
        };
        let (mdv, path) = match raw {
            None => {
                // No manifest: what can be checked is that the record's own
                // chain hash recomputes from its fields and predecessor.
                let again = snapshot_hash(
                    &md.entries_hash,
                    md.snapshot_message.as_deref(),
                    md.project_config.as_ref(),
                    prev_hash,
                );
                if md.snapshot_hash.as_deref() != Some(again.as_str()) {
                    return fail(
                        vec![format!(
                            "its index record's snapshot_hash {} does not recompute ({again}) from its fields and {}",
                            md.snapshot_hash.as_deref().unwrap_or("null"),
                            prev_id.unwrap_or("no predecessor")
                        )],
                        Some(self.project.sync_messages_path().display().to_string()),
                    );
                }
                return SnapshotCheck {
                    snapshot_id: id.clone(),
                    verdict: Verdict::IndexOnly,
                    details: vec![format!(
                        "no archive here or in the repository (the original dsg never wrote it); its index record's chain hash recomputes from {}",
                        prev_id.unwrap_or("the start")
                    )],
                    path: None,
                };
            }
            Some(raw) => {
                let path = raw.origin.to_string();
                let m = match Manifest::from_json_bytes(&raw.json, Path::new(&path)) {
                    Ok(m) => m,
                    Err(e) => return fail(vec![e.message()], Some(path)),
                };
                if let Err(msg) = m.verify_integrity() {
                    return fail(vec![msg], Some(path));
                }
                details.push(format!("entries_hash verifies ({} entries)", m.len()));
                (m.metadata.expect("verified manifests have metadata"), path)
            }
        };
        if mdv.snapshot_id != md.snapshot_id {
            return fail(
                vec![format!("the manifest names itself {}", mdv.snapshot_id)],
                Some(path),
            );
        }
        // The record we walked by (index) and the manifest must agree;
        // the original rewrote its indexes, so there it is only a note.
        for (what, a, b) in [
            (
                "entries_hash",
                Some(md.entries_hash.clone()),
                Some(mdv.entries_hash.clone()),
            ),
            (
                "snapshot_hash",
                md.snapshot_hash.clone(),
                mdv.snapshot_hash.clone(),
            ),
            (
                "snapshot_previous",
                md.snapshot_previous.clone(),
                mdv.snapshot_previous.clone(),
            ),
        ] {
            if a != b {
                let msg = format!(
                    "the index records {what} {} but the manifest has {}",
                    a.as_deref().unwrap_or("null"),
                    b.as_deref().unwrap_or("null")
                );
                if is_original(md) && is_original(&mdv) {
                    self.notes
                        .push(format!("{id}: {msg} (written by the original dsg)"));
                } else {
                    return fail(vec![msg], Some(path));
                }
            }
        }
        if mdv.snapshot_previous.as_deref() != prev_id {
            return fail(
                vec![format!(
                    "snapshot_previous is {}, but the chain's predecessor is {}",
                    mdv.snapshot_previous.as_deref().unwrap_or("null"),
                    prev_id.unwrap_or("none")
                )],
                Some(path),
            );
        }
        let again = snapshot_hash(
            &mdv.entries_hash,
            mdv.snapshot_message.as_deref(),
            mdv.project_config.as_ref(),
            prev_hash,
        );
        if mdv.snapshot_hash.as_deref() != Some(again.as_str()) {
            return fail(
                vec![format!(
                    "snapshot_hash {} does not recompute: {again} from its entries, message and {}'s hash {}",
                    mdv.snapshot_hash.as_deref().unwrap_or("null"),
                    prev_id.unwrap_or("no predecessor"),
                    prev_hash.unwrap_or("(none)")
                )],
                Some(path),
            );
        }
        details.push(match prev_id {
            Some(p) => format!("snapshot_hash recomputes from {p}"),
            None => "snapshot_hash recomputes (first snapshot)".into(),
        });
        SnapshotCheck {
            snapshot_id: id,
            verdict: Verdict::Verified,
            details,
            path: Some(path),
        }
    }

    /// `dsg validate-chain`: every snapshot from the head back to the
    /// first, each link's hash recomputed from its predecessor's.
    pub fn validate_chain(&mut self) -> Result<ChainReport> {
        let chain = self.chain()?;
        let mut report = ChainReport::default();
        if self.index_record(&self.head.snapshot_id).is_none() {
            report.notes.push(format!(
                "the index has no record of the head {} (the original dsg writes it one sync late)",
                self.head.snapshot_id
            ));
        }
        for (i, md) in chain.iter().enumerate() {
            let prev = chain.get(i + 1);
            // The predecessor's hash as its own manifest says, else as its
            // record says: a link is only as good as what it is checked
            // against, and the details say which.
            let prev_hash = match prev {
                Some(p) => match self.raw(&p.snapshot_id, Some(p))? {
                    Some(raw) => Manifest::from_json_bytes(&raw.json, Path::new(""))
                        .ok()
                        .and_then(|m| m.metadata)
                        .and_then(|m| m.snapshot_hash),
                    None => p.snapshot_hash.clone(),
                },
                None => None,
            };
            let mut c = self.check_one(
                md,
                prev.map(|p| p.snapshot_id.as_str()),
                prev_hash.as_deref(),
            );
            if let (Some(n), Some(p)) = (
                snapshot_number(&md.snapshot_id),
                prev.and_then(|p| snapshot_number(&p.snapshot_id)),
            ) {
                if n != p + 1 {
                    report.notes.push(format!(
                        "{} follows {} (numbers are not contiguous)",
                        md.snapshot_id,
                        prev.unwrap().snapshot_id
                    ));
                }
            }
            if prev.is_none() && md.snapshot_previous.is_some() {
                c.details.push(format!(
                    "its predecessor {} is not known here",
                    md.snapshot_previous.as_deref().unwrap()
                ));
            }
            report.checks.push(c);
        }
        report.notes.append(&mut self.notes);
        Ok(report)
    }

    pub fn close(self) {
        if let Some(c) = self.client {
            let _ = c.close();
        }
    }
}

/// Reads a snapshot's bytes without fetching (after `fetch_missing`).
fn raw_local(project: &Project, head: &Metadata, md: &Metadata) -> Result<Option<Raw>> {
    if md.snapshot_id == head.snapshot_id && md.snapshot_hash == head.snapshot_hash {
        let p = project.cache_path();
        let json = std::fs::read(&p).map_err(|e| EngineError::io(&p, e))?;
        return Ok(Some(Raw {
            json,
            origin: Origin::Head(p),
        }));
    }
    let local = project
        .dsg()
        .join("archive")
        .join(archive_name(&md.snapshot_id));
    match std::fs::read(&local) {
        Ok(bytes) => Ok(Some(Raw {
            json: decompress(&bytes, &local)?,
            origin: Origin::Local(local),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::io(&local, e)),
    }
}

/// `validate-file`: the local file against its entry in the last sync.
pub fn validate_file(project: &Project, path: &str) -> Result<FileCheck> {
    let m = Manifest::load(&project.cache_path())?;
    let id = m
        .metadata
        .as_ref()
        .map(|m| m.snapshot_id.clone())
        .unwrap_or_default();
    let e = m.get(path).ok_or_else(|| EngineError::State {
        message: format!("{path} is not in the last sync ({id})"),
        hint: "name a tracked file relative to the project root (or the current directory); 'dsg blame FILE' shows when a file was tracked".into(),
    })?;
    let abs = project.root.join(path);
    let (expected, actual) = match &e.kind {
        EntryKind::Link { target } => {
            let now = match std::fs::read_link(&abs) {
                Ok(t) => t.to_string_lossy().to_string(),
                Err(e) => format!("unreadable link ({e})"),
            };
            (format!("link -> {target}"), format!("link -> {now}"))
        }
        EntryKind::File { size, hash, .. } => {
            let got =
                match dsg_core::hash::open_nofollow(&abs).and_then(dsg_core::hash::hash_reader) {
                    Ok((h, n)) => match hash {
                        Some(_) => h.to_hex(),
                        // The original did not always record a hash: the
                        // size is all there is to compare.
                        None => format!("{n} bytes"),
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => "missing".into(),
                    Err(e) => format!("unreadable ({e})"),
                };
            (
                match hash {
                    Some(h) => h.to_hex(),
                    None => format!("{size} bytes"),
                },
                got,
            )
        }
    };
    Ok(FileCheck {
        path: path.into(),
        snapshot_id: id,
        ok: expected == actual,
        expected,
        actual,
    })
}

/// A path argument as the manifests store it: relative to the project
/// root, resolved from the current directory without touching the disk
/// (the file may be gone).
pub fn project_path(project: &Project, cwd: &Path, arg: &str) -> Result<String> {
    let p = Path::new(arg);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    };
    let mut parts: Vec<String> = Vec::new();
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                parts.pop();
            }
            std::path::Component::Normal(s) => parts.push(s.to_string_lossy().to_string()),
            _ => {}
        }
    }
    let root: Vec<String> = project
        .root
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(s) => Some(s.to_string_lossy().to_string()),
            _ => None,
        })
        .collect();
    if parts.len() < root.len() || parts[..root.len()] != root[..] {
        return Err(EngineError::Usage(format!(
            "{arg} is outside the project {}",
            project.root.display()
        )));
    }
    Ok(parts[root.len()..].join("/"))
}

fn size_of(e: &Entry) -> Option<u64> {
    match e.kind {
        EntryKind::File { size, .. } => Some(size),
        EntryKind::Link { .. } => None,
    }
}

fn total_bytes(m: &Manifest) -> u64 {
    m.entries().iter().filter_map(size_of).sum()
}

fn read_sizes(p: &Path) -> BTreeMap<String, u64> {
    std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn decompress(bytes: &[u8], origin: &Path) -> Result<Vec<u8>> {
    let mut d = lz4_flex::frame::FrameDecoder::new(bytes);
    let mut out = Vec::with_capacity(bytes.len() * 4);
    std::io::Read::read_to_end(&mut d, &mut out).map_err(|e| {
        EngineError::Manifest(dsg_core::manifest::ManifestError::Corrupt {
            path: origin.to_path_buf(),
            msg: format!("bad LZ4 frame: {e}"),
        })
    })?;
    Ok(out)
}

/// The head's metadata without parsing its entries: `log` must not pay
/// for a million-entry manifest. Our writer and the original's both put
/// `metadata` last at two spaces of indent, and a raw newline never occurs
/// inside a JSON string, so the last such line is the top-level key.
fn head_metadata(p: &Path) -> Result<Metadata> {
    let bytes = std::fs::read(p).map_err(|e| EngineError::io(p, e))?;
    let corrupt = |msg: String| {
        EngineError::Manifest(dsg_core::manifest::ManifestError::Corrupt {
            path: p.to_path_buf(),
            msg,
        })
    };
    let fast = memchr::memmem::rfind(&bytes, b"\n  \"metadata\": ").and_then(|at| {
        let rest = &bytes[at + 15..];
        let end = rest.iter().rposition(|&b| b == b'}')?;
        serde_json::from_slice::<serde_json::Value>(&rest[..end]).ok()
    });
    let md = match fast {
        Some(v) if !v.is_null() => Metadata::from_value(&v).map_err(corrupt)?,
        _ => Manifest::from_json_bytes(&bytes, p)?
            .metadata
            .ok_or_else(|| corrupt("the last sync has no metadata".into()))?,
    };
    Ok(md)
}

/// One entry straight from a manifest's bytes, without parsing the rest:
/// blame looks up one path in every snapshot. `None` when the bytes are not
/// in the layout both writers use (the caller parses them whole);
/// `Some(None)` when the path is not there.
fn find_entry(json: &[u8], path: &str) -> Option<Option<Entry>> {
    if !json.starts_with(b"{\n  \"entries\": {")
        || path.chars().any(|c| c < ' ' || c == '"' || c == '\\')
    {
        return None;
    }
    let end = memchr::memmem::rfind(json, b"\n  \"metadata\": ")?;
    let mut key = b"\n    ".to_vec();
    key.extend_from_slice(serde_json::to_string(path).ok()?.as_bytes());
    key.extend_from_slice(b": {");
    let Some(at) = memchr::memmem::find(&json[..end], &key) else {
        return Some(None);
    };
    let start = at + key.len() - 1;
    let v: serde_json::Value = serde_json::Deserializer::from_slice(&json[start..end])
        .into_iter()
        .next()?
        .ok()?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str());
    let user: Arc<str> = Arc::from(s("user").unwrap_or(""));
    let kind = match s("type")? {
        "file" => EntryKind::File {
            size: match v.get("filesize")? {
                serde_json::Value::Number(n) => {
                    n.as_u64().or_else(|| n.as_f64().map(|f| f as u64))?
                }
                serde_json::Value::String(t) => t.trim().parse().ok()?,
                _ => return None,
            },
            mtime: Mtime::parse(s("mtime")?),
            hash: match s("hash")? {
                "" => None,
                h => Some(Hash::parse(h)?),
            },
        },
        "link" => EntryKind::Link {
            target: s("reference")?.into(),
        },
        _ => return None,
    };
    if s("path")? != path {
        return None;
    }
    Some(Some(Entry {
        path: path.into(),
        user,
        kind,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, content: &[u8]) -> Entry {
        Entry {
            path: path.into(),
            user: Arc::from("u@x"),
            kind: EntryKind::File {
                size: content.len() as u64,
                mtime: Mtime::from_unix(1_700_000_000, 0),
                hash: Some(Hash::of_bytes(content)),
            },
        }
    }

    /// The byte search finds exactly what a full parse finds, for present,
    /// absent, prefix-sharing, non-ASCII and link paths.
    #[test]
    fn find_entry_agrees_with_the_parser() {
        let mut m = Manifest::from_entries(vec![
            entry("input/a.csv", b"a"),
            entry("input/a.csv.bak", b"b"),
            entry("input/データ.csv", b"c"),
            Entry {
                path: "output/l".into(),
                user: Arc::from("u@x"),
                kind: EntryKind::Link {
                    target: "../input/a.csv".into(),
                },
            },
        ]);
        m.seal("s1", "u@x", "m", "sync", None);
        let json = m.to_json_bytes();
        for p in [
            "input/a.csv",
            "input/a.csv.bak",
            "input/データ.csv",
            "output/l",
            "input/a",
            "nope",
            "snapshot_id",
        ] {
            assert_eq!(find_entry(&json, p), Some(m.get(p).cloned()), "{p}");
        }
        // A layout it does not know is left to the parser.
        let compact =
            serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(&json).unwrap())
                .unwrap();
        assert_eq!(find_entry(&compact, "input/a.csv"), None);
    }

    #[test]
    fn original_versions_are_recognised() {
        let md = |v: &str| Metadata {
            manifest_version: v.into(),
            ..Default::default()
        };
        assert!(is_original(&md("0.4.4")));
        assert!(is_original(&md("0.1.0")));
        assert!(!is_original(&md("0.5.0")));
        assert!(!is_original(&md("1.0.0")));
    }
}
