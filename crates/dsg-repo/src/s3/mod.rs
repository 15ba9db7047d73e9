//! A repository in an S3-compatible object store: one more `Backend`.
//!
//! Layout under the repository's key prefix (docs/design.md, "S3"):
//!
//! - `HEAD`: a small JSON document naming the head snapshot and every
//!   snapshot, with an `epoch`. Replacing it with a conditional PUT
//!   (`If-Match` its ETag; `If-None-Match: *` at init) is the commit point:
//!   one writer wins, the rest are told the repository moved.
//! - `snapshots/<sN>-<tx>.json.lz4` and `.messages.json`: each snapshot's
//!   manifest (LZ4, the archive format) and sync-messages, written before
//!   the commit point under names no other transaction uses.
//! - `data/<xxh3>-<size>`: file contents, content-addressed, immutable,
//!   uploaded once (deduplicated across paths and snapshots), verified
//!   against the manifest's hash before they are written.
//! - `lock`: the writers' lease (owner, transaction, expiry), renewed while
//!   a transaction runs; taken over when it expired, after fencing the dead
//!   holder (the taker bumps `HEAD`'s epoch, so a paused holder's commit
//!   fails its `If-Match`).
//! - `txs/<tx>/<n>.json`: before a batch of contents is uploaded, the keys
//!   it may create (write-ahead), so the next writer can remove what a dead
//!   transaction left.
//!
//! Readers take no lock: a snapshot's objects never change, and `HEAD`
//! names only complete snapshots.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsg_core::config::S3Location;
use dsg_core::manifest::{archive_name, EntryKind, Manifest};
use dsg_core::paths::{check_link_target, check_relpath};
use dsg_s3::{Cond, Location, Part, S3Error, Store};
use dsg_txn::failpoint::failpoint;
use serde::{Deserialize, Serialize};

use crate::backend::{AgentError, Backend, CommitData, Stored, Version};
use crate::protocol::ErrorKind;
use crate::repo::{verify_commit_at, OpenTx, StagedKind};

mod download;
mod lease;
mod list;
mod prune;
mod tx;
use tx::S3Tx;
mod upload;

pub use list::list_repos;

use download::Located;
use lease::{now_secs, Lease, LockDoc, Taken};
use upload::{Job, Uploader};

/// Files up to this size are read whole, verified and sent in one PUT by
/// the upload pool; larger ones go up in parts of this size.
const PART: usize = 16 << 20;
/// Uploads in flight at once (small files): the store's latency, not its
/// bandwidth, bounds a sync of many small files.
const WORKERS: usize = 16;
/// A write-ahead batch: this many keys, or this many bytes.
const BATCH_KEYS: usize = 256;
const BATCH_BYTES: usize = 32 << 20;
const HEAD_FORMAT: &str = "dsg-s3/1";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct HeadDoc {
    format: String,
    /// Bumped by whoever takes over a dead writer's lease: the dead
    /// writer's `If-Match` then fails.
    epoch: u64,
    head: Option<SnapRef>,
    snapshots: Vec<SnapRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct SnapRef {
    id: String,
    tx: String,
    /// XXH3 of the manifest's JSON bytes.
    hash: u64,
}

impl SnapRef {
    fn manifest_key(&self) -> String {
        format!("snapshots/{}-{}.json.lz4", self.id, self.tx)
    }
    fn messages_key(&self) -> String {
        format!("snapshots/{}-{}.messages.json", self.id, self.tx)
    }
}

fn data_key(hash: u64, size: u64) -> String {
    format!("data/{hash:016x}-{size}")
}

/// An object-store error as the agent reports it.
fn err(e: S3Error) -> AgentError {
    let kind = match &e {
        S3Error::NoBucket { .. } => ErrorKind::NotFound,
        S3Error::Precondition { .. } | S3Error::Ambiguous { .. } => ErrorKind::Moved,
        S3Error::Unsafe { .. } => ErrorKind::Unsafe,
        S3Error::Denied { code, .. } if code == "AccessDenied" => ErrorKind::Denied,
        _ => ErrorKind::Io,
    };
    let hint = e.hint();
    AgentError::new(kind, e.to_string()).hint(hint)
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::new(ErrorKind::Corrupt, format!("{what}: {e}"))
        .hint("the repository's objects were altered outside dsg; restore them from a backup")
}

pub struct S3Repo {
    store: Arc<Store>,
    lease_secs: u64,
    lock_timeout: Duration,
    tx: Option<S3Tx>,
    /// The head manifest `open` reads from, by the head it was read for.
    index: Option<(SnapRef, Manifest)>,
}

impl S3Repo {
    /// The repository of project `name` at `loc`; credentials from the
    /// environment or `~/.aws/credentials`.
    pub fn open(loc: &S3Location, name: &str) -> Result<S3Repo, AgentError> {
        let creds = dsg_s3::credentials().map_err(err)?;
        let store = Store::new(
            Location {
                endpoint: loc.endpoint.clone(),
                bucket: loc.bucket.clone(),
                prefix: loc.key_prefix(name),
                region: loc.region(),
            },
            &creds,
        )
        .map_err(err)?;
        let secs = |k: &str, d: f64| {
            std::env::var(k)
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(d)
        };
        Ok(S3Repo {
            store: Arc::new(store),
            lease_secs: secs("DSG_S3_LEASE_SECS", 60.0).max(1.0) as u64,
            lock_timeout: Duration::from_secs_f64(secs("DSG_LOCK_TIMEOUT", 30.0)),
            tx: None,
            index: None,
        })
    }

    /// `dsg init` on a new location: the bucket must answer and the server
    /// must honour conditional writes, or nothing is written.
    pub fn check_server(&self) -> Result<(), AgentError> {
        self.store.check_bucket().map_err(err)?;
        let probe = format!("probe-{}", uuid::Uuid::new_v4().simple());
        self.store.probe_conditional(&probe).map_err(err)
    }

    fn read_head(&self) -> Result<Option<(HeadDoc, String)>, AgentError> {
        let Some((bytes, etag)) = self.store.get("HEAD").map_err(err)? else {
            return Ok(None);
        };
        let doc: HeadDoc = serde_json::from_slice(&bytes).map_err(|e| corrupt("HEAD", e))?;
        if doc.format != HEAD_FORMAT {
            return Err(corrupt(
                "HEAD",
                format!("format {:?}, this dsg reads {HEAD_FORMAT}", doc.format),
            ));
        }
        Ok(Some((doc, etag)))
    }

    fn tx(&mut self) -> Result<&mut S3Tx, AgentError> {
        self.tx
            .as_mut()
            .ok_or_else(|| AgentError::new(ErrorKind::Protocol, "no open transaction"))
    }

    /// A snapshot's manifest JSON, decompressed into an unlinked file.
    fn manifest_file(&self, r: &SnapRef) -> Result<File, AgentError> {
        let key = r.manifest_key();
        let mut lz4 = tempfile::tempfile().map_err(|e| AgentError::io("a scratch file", e))?;
        self.store
            .get_to(&key, &mut lz4)
            .map_err(err)?
            .ok_or_else(|| corrupt(&key, "missing, though HEAD names it"))?;
        lz4.rewind()
            .map_err(|e| AgentError::io("a scratch file", e))?;
        let mut out = tempfile::tempfile().map_err(|e| AgentError::io("a scratch file", e))?;
        let mut hasher = dsg_core::hash::HashingReader::new(lz4_flex::frame::FrameDecoder::new(
            std::io::BufReader::new(lz4),
        ));
        std::io::copy(&mut hasher, &mut out).map_err(|e| corrupt(&key, e))?;
        if hasher.digest().0 != r.hash {
            return Err(corrupt(&key, "its bytes do not hash to what HEAD records"));
        }
        out.rewind()
            .map_err(|e| AgentError::io("a scratch file", e))?;
        Ok(out)
    }

    fn load_manifest(&self, r: &SnapRef) -> Result<Manifest, AgentError> {
        let f = self.manifest_file(r)?;
        let m = Manifest::from_reader(std::io::BufReader::new(f), Path::new(&r.manifest_key()))
            .map_err(|e| corrupt(&r.manifest_key(), e))?;
        Ok(m)
    }

    /// Downloads `key` into an unlinked file.
    fn object_file(&self, key: &str) -> Result<Option<(File, u64)>, AgentError> {
        let mut f = tempfile::tempfile().map_err(|e| AgentError::io("a scratch file", e))?;
        if self.store.get_to(key, &mut f).map_err(err)?.is_none() {
            return Ok(None);
        }
        let size = f
            .stream_position()
            .map_err(|e| AgentError::io("a scratch file", e))?;
        f.rewind()
            .map_err(|e| AgentError::io("a scratch file", e))?;
        Ok(Some((f, size)))
    }

    /// What `path` of the head snapshot (`read_lock`'s) is.
    fn locate(&self, path: &str) -> Result<Located, AgentError> {
        check_relpath(path).map_err(|e| AgentError::new(ErrorKind::Unsafe, e.to_string()))?;
        let (_, m) = self
            .index
            .as_ref()
            .ok_or_else(|| AgentError::new(ErrorKind::Protocol, "no snapshot open for reading"))?;
        let e = m.get(path).ok_or_else(|| {
            AgentError::new(
                ErrorKind::NotFound,
                format!("{path}: not in the repository"),
            )
        })?;
        match &e.kind {
            EntryKind::Link { target } => Ok(Located::Link(target.to_string())),
            EntryKind::File {
                size,
                hash: Some(h),
                ..
            } => Ok(Located::Object {
                key: data_key(h.0, *size),
                size: *size,
            }),
            EntryKind::File { hash: None, .. } => {
                Err(corrupt(path, "the manifest records no hash for it"))
            }
        }
    }

    fn acquire(&self, tx: &str, user: &str, wait: bool) -> Result<Option<Lease>, AgentError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match Lease::try_take(&self.store, tx, user, self.lease_secs)? {
                Taken::Yes(lease, dead) => {
                    if let Some(dead) = dead {
                        tracing::info!("taking over the lease of dead transaction {}", dead.tx);
                        self.fence()?;
                    }
                    return Ok(Some(lease));
                }
                Taken::Held(by) => {
                    if !wait {
                        return Ok(None);
                    }
                    if start.elapsed() >= self.lock_timeout {
                        return Err(AgentError::new(
                            ErrorKind::Busy,
                            format!(
                                "repository {} is busy: {} is writing it (pid {}, transaction {}, lease for {} s more); waited {:.1} s, nothing was changed",
                                self.store.location().describe(),
                                by.user,
                                by.pid,
                                by.tx,
                                by.expires.saturating_sub(now_secs()),
                                start.elapsed().as_secs_f64()
                            ),
                        )
                        .hint("wait for the other sync to finish and run the command again (DSG_LOCK_TIMEOUT sets the wait in seconds)"));
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// After taking over a dead writer's lease: bump HEAD's epoch so its
    /// commit, should it still come, fails its precondition.
    fn fence(&self) -> Result<(), AgentError> {
        for _ in 0..5 {
            let (doc, cond) = match self.read_head()? {
                Some((doc, etag)) => (doc, Cond::Etag(etag)),
                None => (
                    HeadDoc {
                        format: HEAD_FORMAT.into(),
                        ..HeadDoc::default()
                    },
                    Cond::Absent,
                ),
            };
            let next = HeadDoc {
                epoch: doc.epoch + 1,
                ..doc
            };
            let body = serde_json::to_vec(&next).expect("json");
            match self.store.put("HEAD", &body, &cond) {
                Ok(_) => return Ok(()),
                Err(S3Error::Precondition { .. }) | Err(S3Error::Ambiguous { .. }) => continue,
                Err(e) => return Err(err(e)),
            }
        }
        Err(AgentError::new(
            ErrorKind::Busy,
            "HEAD kept changing while fencing a dead writer",
        )
        .hint("run the command again"))
    }

    /// Whether a writer may have died here: a journal is left, or the
    /// lease is held (live or not). An unfinished multipart upload alone is
    /// no reason: it is invisible, kept on purpose for the next writer to
    /// resume (or abort), and a read must neither destroy it nor take the
    /// lease for it.
    fn needs_recovery(&self) -> Result<bool, AgentError> {
        if !self.store.list("txs/").map_err(err)?.is_empty() {
            return Ok(true);
        }
        let Some((bytes, _)) = self.store.get("lock").map_err(err)? else {
            return Ok(false);
        };
        Ok(serde_json::from_slice::<LockDoc>(&bytes).map_or(true, |l| !l.free))
    }

    /// With the lease held: removes what transactions other than `ours`
    /// left (their journaled uploads that no snapshot references, their
    /// unreferenced snapshot objects). Unfinished multipart uploads of
    /// contents are not aborted but returned, (key, upload id): a writer
    /// resumes the ones it needs and aborts the rest before its commit
    /// point (`S3Tx::offered`); a reader's recovery leaves them.
    fn clean_leftovers(
        &self,
        ours: &str,
        lease: &Lease,
    ) -> Result<Vec<(String, String)>, AgentError> {
        let journals = self.store.list("txs/").map_err(err)?;
        let uploads = self.store.multipart_list("data/").map_err(err)?;
        if journals.is_empty() {
            return Ok(uploads);
        }
        let dead: Vec<&str> = journals
            .iter()
            .filter_map(|(k, _)| k.strip_prefix("txs/")?.split('/').next())
            .filter(|t| *t != ours)
            .collect();
        if dead.is_empty() {
            return Ok(uploads);
        }
        let head = self.read_head()?.map(|(d, _)| d).unwrap_or_default();
        // Which contents some snapshot needs: only read when there is
        // something to remove (a dead transaction), so rarely. A pruned
        // snapshot's contents are not needed: a dead prune's journaled
        // keys go once its record was written (s3/prune.rs).
        let referenced = self.referenced_keys(self.unpruned(&head)?)?;
        if !lease.confirm() {
            return Err(AgentError::new(
                ErrorKind::Busy,
                "lost the repository's lease while cleaning a dead writer's leftovers",
            )
            .hint("run the command again"));
        }
        let named: HashSet<String> = head
            .snapshots
            .iter()
            .flat_map(|r| [r.manifest_key(), r.messages_key()])
            .collect();
        for (key, _) in &journals {
            let tx = key.strip_prefix("txs/").and_then(|k| k.split('/').next());
            if tx.is_none_or(|t| t == ours) {
                continue;
            }
            if let Some((bytes, _)) = self.store.get(key).map_err(err)? {
                let keys: Vec<String> = serde_json::from_slice(&bytes).unwrap_or_default();
                for k in keys.iter().filter(|k| k.starts_with("data/")) {
                    if !referenced.contains(k) {
                        self.store.delete(k).map_err(err)?;
                    }
                }
            }
        }
        for (key, _) in self.store.list("snapshots/").map_err(err)? {
            let of_dead = dead.iter().any(|t| key.contains(&format!("-{t}.")));
            if of_dead && !named.contains(&key) {
                self.store.delete(&key).map_err(err)?;
            }
        }
        // Last: a cleaning cut short leaves the journals for the next one.
        for (key, _) in &journals {
            if dead.iter().any(|t| key.starts_with(&format!("txs/{t}/"))) {
                self.store.delete(key).map_err(err)?;
            }
        }
        Ok(uploads)
    }
}

impl Backend for S3Repo {
    fn describe(&self) -> String {
        format!("s3 {}", self.store.location().describe())
    }

    fn exists(&self) -> bool {
        matches!(
            self.read_head(),
            Ok(Some((HeadDoc { head: Some(_), .. }, _)))
        )
    }

    fn open_meta(&self, name: &str) -> Result<Option<File>, AgentError> {
        let Some((doc, _)) = self.read_head()? else {
            return Ok(None);
        };
        let Some(head) = &doc.head else {
            return Ok(None);
        };
        match name {
            "last-sync.json" => self.manifest_file(head).map(Some),
            prune::RECORD => Ok(self.object_file(prune::RECORD)?.map(|(f, _)| f)),
            "sync-messages.json" => Ok(self.object_file(&head.messages_key())?.map(|(f, _)| f)),
            _ => {
                let Some(file) = name.strip_prefix("archive/") else {
                    return Ok(None);
                };
                let Some(r) = doc
                    .snapshots
                    .iter()
                    .find(|r| r.id != head.id && archive_name(&r.id) == file)
                else {
                    return Ok(None);
                };
                Ok(self.object_file(&r.manifest_key())?.map(|(f, _)| f))
            }
        }
    }

    fn begin(
        &mut self,
        tx_id: &str,
        base: Option<&str>,
        base_hash: Option<&str>,
        user: &str,
    ) -> Result<(), AgentError> {
        if let Some(old) = self.tx.take() {
            self.undo(old);
        }
        if base.is_none() {
            self.check_server()?;
        }
        let tx = self.begin_tx(tx_id, base, base_hash, user)?;
        self.tx = Some(tx);
        Ok(())
    }

    fn stage_file(
        &mut self,
        path: &str,
        size: u64,
        hash: u64,
        _mtime_ns: i64,
        offset: u64,
        data: &mut dyn Read,
    ) -> Result<(), AgentError> {
        check_relpath(path).map_err(|e| AgentError::new(ErrorKind::Unsafe, e.to_string()))?;
        if offset != 0 {
            return Err(AgentError::new(
                ErrorKind::Protocol,
                "an s3 repository does not resume uploads",
            ));
        }
        let key = data_key(hash, size);
        if size > PART as u64 {
            // The large path names the content's key; the user knows the path.
            self.stage_large(&key, size, hash, data).map_err(|mut e| {
                e.message = format!("{path} ({})", e.message);
                e
            })?;
        } else {
            let mut body = Vec::with_capacity(size as usize);
            (&mut *data)
                .take(size + 1)
                .read_to_end(&mut body)
                .map_err(|e| AgentError::io(format!("receiving {path}"), e))?;
            // Drain what a lying client sent beyond its size.
            let _ = std::io::copy(data, &mut std::io::sink());
            let got = dsg_core::hash::Hash::of_bytes(&body).0;
            if body.len() as u64 != size || got != hash {
                return Err(AgentError::new(
                    ErrorKind::Verify,
                    format!("{path}: received {} bytes hashing to {got:016x}, not the {size} bytes hashing to {hash:016x} the client announced", body.len()),
                ));
            }
            self.tx()?.up.push(Job { key, body })?;
        }
        self.tx()?
            .check
            .stage(path.into(), StagedKind::File { size, hash });
        Ok(())
    }

    fn stage_link(&mut self, path: &str, target: &str) -> Result<(), AgentError> {
        check_relpath(path).map_err(|e| AgentError::new(ErrorKind::Unsafe, e.to_string()))?;
        check_link_target(path, target)
            .map_err(|e| AgentError::new(ErrorKind::Unsafe, e.to_string()))?;
        self.tx()?.check.stage(
            path.into(),
            StagedKind::Link {
                target: target.into(),
            },
        );
        Ok(())
    }

    fn commit(&mut self, c: &CommitData) -> Result<(), AgentError> {
        let mut tx = self
            .tx
            .take()
            .ok_or_else(|| AgentError::new(ErrorKind::Protocol, "no open transaction"))?;
        let result = self.commit_tx(&mut tx, c);
        match result {
            Ok(()) => {
                self.index = None;
                Ok(())
            }
            Err(e) => {
                self.undo(tx);
                Err(e)
            }
        }
    }

    fn rollback(&mut self) -> Result<(), AgentError> {
        if let Some(tx) = self.tx.take() {
            self.undo(tx);
        }
        Ok(())
    }

    /// Several downloads in flight, in order (`download::open_each`).
    fn open_each(
        &self,
        paths: Vec<String>,
        each: &mut dyn FnMut(String, Result<Stored, AgentError>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        download::open_each(&self.store, paths, &|p| self.locate(p), each)
    }

    fn open(&self, path: &str) -> Result<Stored, AgentError> {
        match self.locate(path)? {
            Located::Link(target) => Ok(Stored::Link { target }),
            Located::Object { key, size } => download::open_object(&self.store, &key, size, path),
        }
    }

    /// Loads the head manifest `open` serves from: the snapshot is fixed
    /// for the read (objects never change), so no lock is needed.
    fn read_lock(&mut self) -> Result<(), AgentError> {
        let Some((doc, _)) = self.read_head()? else {
            return Ok(());
        };
        if let Some(head) = doc.head {
            if self.index.as_ref().map(|(r, _)| r) != Some(&head) {
                let m = self.load_manifest(&head)?;
                self.index = Some((head, m));
            }
        }
        Ok(())
    }

    fn read_unlock(&mut self) {}

    fn recover(&mut self, _wait: bool) -> Result<(), AgentError> {
        if self.tx.is_some() {
            return Ok(());
        }
        // Nothing a dead writer left: write nothing (a clone or a status
        // with read-only credentials must work, and leave the store as it
        // was).
        if !self.needs_recovery()? {
            return Ok(());
        }
        // A dead writer's lease: take it, clean, release. A live one is
        // left alone (readers need no lock here).
        let tx = format!("recover-{}", uuid::Uuid::new_v4().simple());
        // The cleaning is a writer's chore, never needed to read (HEAD names
        // only complete snapshots): credentials that may not write skip it.
        let lease = match self.acquire(&tx, "recovery", false) {
            Err(e) if e.kind == ErrorKind::Denied => {
                tracing::debug!(
                    "leaving a dead writer's leftovers to a writer: {}",
                    e.message
                );
                return Ok(());
            }
            other => other?,
        };
        if let Some(lease) = lease {
            // Unfinished uploads stay: the next writer resumes them.
            let cleaned = self.clean_leftovers(&tx, &lease);
            drop(lease);
            cleaned?;
        }
        Ok(())
    }

    fn prune(
        &mut self,
        policy: &crate::prune::Policy,
    ) -> Result<crate::protocol::PruneReport, AgentError> {
        self.prune_data(policy)
    }

    fn list_archives(&self) -> Result<Vec<String>, AgentError> {
        let Some((doc, _)) = self.read_head()? else {
            return Ok(Vec::new());
        };
        let head = doc.head.as_ref().map(|h| h.id.as_str());
        Ok(doc
            .snapshots
            .iter()
            .filter(|r| Some(r.id.as_str()) != head)
            .map(|r| archive_name(&r.id))
            .collect())
    }

    fn open_version(&mut self, snapshot: &str) -> Result<Box<dyn Version>, AgentError> {
        let (doc, _) = self.read_head()?.ok_or_else(|| {
            AgentError::new(ErrorKind::NotFound, "the repository has no snapshots")
        })?;
        let r = doc
            .snapshots
            .iter()
            .find(|r| r.id == snapshot)
            .ok_or_else(|| {
                AgentError::new(
                    ErrorKind::NotFound,
                    format!("the repository has no snapshot {snapshot}"),
                )
            })?;
        let manifest = self.load_manifest(r)?;
        let hash = manifest
            .metadata
            .as_ref()
            .and_then(|m| m.snapshot_hash.clone());
        let pruned = (self.pruned_record()?.0)
            .get(snapshot, hash.as_deref())
            .map(|p| p.pruned_at.clone());
        Ok(Box::new(S3Version {
            id: snapshot.to_string(),
            store: self.store.clone(),
            manifest,
            pruned,
        }))
    }

    fn root(&self) -> PathBuf {
        PathBuf::from(self.store.location().describe())
    }
}

impl Drop for S3Repo {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.undo(tx);
        }
    }
}

struct S3Version {
    id: String,
    store: Arc<Store>,
    manifest: Manifest,
    /// When `dsg prune` removed this snapshot's data.
    pruned: Option<String>,
}

impl Version for S3Version {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn pruned(&self) -> Option<&str> {
        self.pruned.as_deref()
    }

    fn open(&self, path: &str) -> Result<Stored, AgentError> {
        check_relpath(path).map_err(|e| AgentError::new(ErrorKind::Unsafe, e.to_string()))?;
        let e = self.manifest.get(path).ok_or_else(|| {
            AgentError::new(ErrorKind::NotFound, format!("{path}: not in this snapshot"))
        })?;
        match &e.kind {
            EntryKind::Link { target } => Ok(Stored::Link {
                target: target.to_string(),
            }),
            EntryKind::File {
                size,
                hash: Some(h),
                ..
            } => {
                let key = data_key(h.0, *size);
                let Some(f) = download::object_file(&self.store, &key, *size)? else {
                    let e = corrupt(&key, format!("missing (the contents of {path})"));
                    return Err(match &self.pruned {
                        Some(when) => {
                            crate::history::pruned_error(&self.id, Some(when), Some(path), e)
                        }
                        None => e,
                    });
                };
                Ok(Stored::File {
                    file: f,
                    size: *size,
                })
            }
            EntryKind::File { hash: None, .. } => {
                Err(corrupt(path, "the manifest records no hash for it"))
            }
        }
    }
}
