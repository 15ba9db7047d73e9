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
mod prune;
mod upload;

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

/// The open transaction.
struct S3Tx {
    id: String,
    lease: Lease,
    /// HEAD as read at begin (after any fencing), and its ETag: the commit's
    /// precondition.
    head: Option<(HeadDoc, String)>,
    check: OpenTx,
    work: tempfile::TempDir,
    up: Uploader,
    /// Snapshot objects this transaction wrote (removed if it does not
    /// commit).
    written: Vec<String>,
    /// Unfinished multipart uploads found at begin, by content key: offered
    /// to `stage_large`; those it does not resume are aborted before the
    /// commit point.
    offered: HashMap<String, Vec<String>>,
}

impl S3Tx {
    fn base_path(&self) -> PathBuf {
        self.work.path().join("base.json")
    }
    fn meta(&self) -> PathBuf {
        self.work.path().join("meta")
    }
}

impl S3Repo {
    fn begin_tx(
        &mut self,
        tx_id: &str,
        base: Option<&str>,
        base_hash: Option<&str>,
        user: &str,
    ) -> Result<S3Tx, AgentError> {
        if tx_id.is_empty() || !tx_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(AgentError::new(
                ErrorKind::Protocol,
                format!("bad transaction id {tx_id:?}"),
            ));
        }
        let lease = self
            .acquire(tx_id, user, true)?
            .expect("waited for the lease");
        let mut offered: HashMap<String, Vec<String>> = HashMap::new();
        for (key, id) in self.clean_leftovers(tx_id, &lease)? {
            offered.entry(key).or_default().push(id);
        }
        let head = self.read_head()?;
        let work = tempfile::Builder::new()
            .prefix("dsg-s3-")
            .tempdir()
            .map_err(|e| AgentError::io("a scratch folder", e))?;
        std::fs::create_dir_all(work.path().join("meta"))
            .map_err(|e| AgentError::io("a scratch folder", e))?;
        let current = head.as_ref().and_then(|(d, _)| d.head.clone());
        let base_summary = match (base, &current) {
            (None, Some(r)) => {
                return Err(AgentError::new(
                    ErrorKind::Exists,
                    format!(
                        "{} already holds a repository (head {})",
                        self.store.location().describe(),
                        r.id
                    ),
                )
                .hint("clone it with 'dsg clone', or choose another name"))
            }
            (None, None) => None,
            (Some(b), None) => {
                return Err(AgentError::new(
                    ErrorKind::NotFound,
                    format!(
                        "{} is not a dsg repository (no head), this sync was planned against {b}",
                        self.store.location().describe()
                    ),
                ))
            }
            (Some(b), Some(r)) => {
                if r.id != b {
                    return Err(AgentError::new(
                        ErrorKind::Moved,
                        format!(
                            "the repository moved: its head is {}, this sync was planned against {b}",
                            r.id
                        ),
                    )
                    .hint("run the command again; dsg will plan against the new head"));
                }
                let mut f = self.manifest_file(r)?;
                let path = work.path().join("base.json");
                let mut out = File::create(&path).map_err(|e| AgentError::io(path.display(), e))?;
                std::io::copy(&mut f, &mut out).map_err(|e| AgentError::io(path.display(), e))?;
                let f = File::open(&path).map_err(|e| AgentError::io(path.display(), e))?;
                let summary = crate::site::head_base_of(f, &path)?;
                if !crate::site::is_base(summary.as_ref(), b, base_hash) {
                    return Err(AgentError::new(
                        ErrorKind::Moved,
                        format!("the repository was replaced: its head {b} is not the {b} this sync was planned against"),
                    )
                    .hint("run the command again; dsg will plan against the new head"));
                }
                summary
            }
        };
        let check = OpenTx::unlocked(
            tx_id,
            work.path().to_path_buf(),
            base.is_none(),
            base_summary,
        );
        Ok(S3Tx {
            id: tx_id.into(),
            lease,
            head,
            check,
            up: Uploader::new(&self.store, tx_id),
            work,
            written: Vec::new(),
            offered,
        })
    }

    /// A large file: parts uploaded as they are read (a few in flight),
    /// completed only once the whole file hashed as the manifest says.
    /// An unfinished upload of the same key (same content) that an earlier
    /// sync left is resumed: a part it holds with exactly the bytes read
    /// here (size and MD5) is not sent again. Every byte is still read and
    /// hashed here, and the completion names the verified parts' ETags, so
    /// the object is these bytes whatever the upload held.
    fn stage_large(
        &mut self,
        key: &str,
        size: u64,
        hash: u64,
        data: &mut dyn Read,
    ) -> Result<(), AgentError> {
        let store = self.store.clone();
        let tx = self.tx()?;
        tx.up.flush()?;
        let exists = store.head(key).map_err(err)?.is_some();
        let (upload, stored) = if exists {
            (None, Vec::new())
        } else {
            tx.up.journal(&[key])?;
            match adopt(&store, key, &mut tx.offered)? {
                Some((id, parts)) => (Some(id), parts),
                None => (Some(store.multipart_create(key).map_err(err)?), Vec::new()),
            }
        };
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut total = 0u64;
        let etags = Mutex::new(Vec::<(u16, String)>::new());
        let reused = std::sync::atomic::AtomicUsize::new(0);
        let (send, recv) = std::sync::mpsc::sync_channel::<(u16, Vec<u8>)>(2);
        let recv = Mutex::new(recv);
        let failed = Mutex::new(None::<AgentError>);
        let read = std::thread::scope(|s| -> Result<(), AgentError> {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let (recv, etags, failed, reused) = (&recv, &etags, &failed, &reused);
                    let (store, upload, stored) = (&store, &upload, &stored);
                    s.spawn(move || loop {
                        let Ok((n, body)) = recv.lock().expect("parts").recv() else {
                            return failed.lock().expect("part error").take();
                        };
                        let Some(id) = upload else { continue };
                        // After a failure the rest is only read and hashed.
                        if failed.lock().expect("part error").is_some() {
                            continue;
                        }
                        if let Some(p) = stored.iter().find(|p| p.number == n && p.holds(&body)) {
                            reused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            etags.lock().expect("etags").push((n, p.etag.clone()));
                            continue;
                        }
                        match store.multipart_part(key, id, n, &body) {
                            Ok(e) => etags.lock().expect("etags").push((n, e)),
                            Err(e) => {
                                failed.lock().expect("part error").get_or_insert(err(e));
                            }
                        }
                    })
                })
                .collect();
            let mut n = 0u16;
            let outcome = loop {
                let mut buf = Vec::with_capacity(PART);
                let got = (&mut *data)
                    .take(PART as u64)
                    .read_to_end(&mut buf)
                    .map_err(|e| AgentError::io(format!("receiving {key}"), e));
                match got {
                    Err(e) => break Err(e),
                    Ok(0) if n > 0 => break Ok(()),
                    Ok(k) => {
                        h.update(&buf);
                        total += k as u64;
                        n += 1;
                        if send.send((n, buf)).is_err() || k < PART {
                            break Ok(());
                        }
                    }
                }
            };
            drop(send);
            let mut first = None;
            for w in workers {
                if let Ok(Some(e)) = w.join() {
                    first.get_or_insert(e);
                }
            }
            outcome?;
            first.map_or(Ok(()), Err)
        });
        let verified = read.and_then(|()| {
            if total != size || h.digest() != hash {
                return Err(AgentError::new(
                    ErrorKind::Verify,
                    format!("{key}: received {total} bytes hashing to {:016x}, not the {size} bytes hashing to {hash:016x} the client announced", h.digest()),
                ));
            }
            Ok(())
        });
        let mut parts = etags.into_inner().expect("etags");
        parts.sort();
        let reused = reused.into_inner();
        if reused > 0 {
            tracing::info!(
                "{key}: resumed an unfinished upload: {reused} of {} parts were stored already",
                parts.len()
            );
        }
        let Some(id) = &upload else { return verified };
        if let Err(e) = verified {
            self.keep_or_abort(key, id, parts.len(), &e);
            return Err(e);
        }
        failpoint("s3.stage.parts");
        // Created from here on, for a rollback, even when the answer to the
        // completion is lost.
        self.tx()?
            .up
            .created
            .lock()
            .expect("created")
            .push(key.into());
        let etags: Vec<String> = parts.into_iter().map(|(_, e)| e).collect();
        store.multipart_complete(key, id, &etags).map_err(err)
    }

    /// A large file's upload failed: kept for the next sync to resume when
    /// the store or the connection failed with parts stored; aborted when
    /// the bytes were wrong (or none is stored), by the lease holder only.
    fn keep_or_abort(&self, key: &str, id: &str, stored: usize, e: &AgentError) {
        if e.kind != ErrorKind::Verify && stored > 0 {
            tracing::info!(
                "{key}: keeping the unfinished upload ({stored} parts stored): the next sync resumes it"
            );
            return;
        }
        if self.tx.as_ref().is_some_and(|t| t.lease.confirm()) {
            let _ = self.store.multipart_abort(key, id);
        }
    }

    /// Aborts the unfinished uploads found at begin that no file of this
    /// transaction resumed: invisible, but nothing may be left once a
    /// writer went through.
    fn abort_unadopted(&self, tx: &mut S3Tx) -> Result<(), AgentError> {
        if tx.offered.is_empty() {
            return Ok(());
        }
        if !tx.lease.confirm() {
            return Err(AgentError::new(
                ErrorKind::Busy,
                "this sync lost the repository's lease (it was paused for longer than the lease and another writer took over); nothing was committed",
            )
            .hint("run the command again"));
        }
        for (key, ids) in tx.offered.drain() {
            for id in ids {
                if let Err(e) = self.store.multipart_abort(&key, &id) {
                    tracing::warn!(
                        "aborting an old unfinished upload of {key}: {e} (the next writer does)"
                    );
                }
            }
        }
        Ok(())
    }

    /// Undoes an open transaction: what it created goes, the lease is
    /// released.
    fn undo(&mut self, mut tx: S3Tx) {
        let _ = tx.up.finish();
        // Only while the lease is still ours: after a takeover, a later
        // writer may rely on a content key this one created; the journal
        // stays for the lease holder's cleaning, which checks references.
        if !tx.lease.confirm() {
            tracing::warn!(
                "rolling back: the lease was taken over; leaving the cleaning to its holder"
            );
            return;
        }
        for key in tx.up.created().iter().chain(&tx.written) {
            if let Err(e) = self.store.delete(key) {
                tracing::warn!("rolling back {key}: {e} (the next writer removes it)");
                return;
            }
        }
        // Journals last: they tell the next writer what to remove if this
        // undo was cut short.
        if let Ok(list) = self.store.list(&format!("txs/{}/", tx.id)) {
            for (k, _) in list {
                let _ = self.store.delete(&k);
            }
        }
    }

    fn commit_tx(&mut self, tx: &mut S3Tx, c: &CommitData) -> Result<(), AgentError> {
        tx.up.finish()?;
        let verified = verify_commit_at(&tx.check, c, &tx.base_path(), &tx.meta())?;
        drop(verified);
        self.abort_unadopted(tx)?;
        // The new manifest's bytes: the upload, or for a delta the head the
        // check merged and wrote.
        let mut reader: Box<dyn Read + '_> = match &c.removed {
            None => c.manifest.reader(),
            Some(_) => {
                let p = tx.meta().join("last-sync.json");
                Box::new(std::io::BufReader::new(
                    File::open(&p).map_err(|e| AgentError::io(p.display(), e))?,
                ))
            }
        };
        let mut lz4 = Vec::new();
        let hash = dsg_core::manifest::compress_archive_stream(&mut reader, &mut lz4)
            .map_err(|e| AgentError::io("compressing the manifest", e))?;
        drop(reader);
        let snap = SnapRef {
            id: c.snapshot_id.clone(),
            tx: tx.id.clone(),
            hash: hash.0,
        };
        failpoint("s3.commit.snapshot");
        for (key, body) in [
            (snap.manifest_key(), &lz4[..]),
            (snap.messages_key(), &c.sync_messages[..]),
        ] {
            tx.written.push(key.clone());
            self.store.put(&key, body, &Cond::Absent).map_err(err)?;
        }
        failpoint("s3.commit.head");
        if tx.lease.lost() {
            return Err(AgentError::new(
                ErrorKind::Busy,
                "this sync lost the repository's lease (it was paused for longer than the lease and another writer took over); nothing was committed",
            )
            .hint("run the command again"));
        }
        let (cond, mut doc) = match &tx.head {
            Some((d, etag)) => (Cond::Etag(etag.clone()), d.clone()),
            None => (
                Cond::Absent,
                HeadDoc {
                    format: HEAD_FORMAT.into(),
                    ..HeadDoc::default()
                },
            ),
        };
        doc.head = Some(snap.clone());
        doc.snapshots.push(snap.clone());
        let body = serde_json::to_vec(&doc).expect("json");
        match self.store.put("HEAD", &body, &cond) {
            Ok(_) => {}
            Err(S3Error::Ambiguous { .. }) => {
                // The first try may have landed: HEAD says.
                let now = self.read_head()?.and_then(|(d, _)| d.head);
                if now.as_ref() != Some(&snap) {
                    return Err(moved());
                }
            }
            Err(S3Error::Precondition { .. }) => return Err(moved()),
            Err(e) => return Err(err(e)),
        }
        // Committed: what follows only tidies.
        tx.written.clear();
        tx.up.created.lock().expect("created").clear();
        failpoint("s3.commit.committed");
        if let Ok(list) = self.store.list(&format!("txs/{}/", tx.id)) {
            for (k, _) in list {
                let _ = self.store.delete(&k);
            }
        }
        Ok(())
    }
}

/// The unfinished upload of `key` to resume, and the parts it holds: of
/// those `offered` for it, the one holding the most parts (the others stay
/// offered, to be aborted). `None`: none holds a part.
fn adopt(
    store: &Store,
    key: &str,
    offered: &mut HashMap<String, Vec<String>>,
) -> Result<Option<(String, Vec<Part>)>, AgentError> {
    let Some(ids) = offered.remove(key) else {
        return Ok(None);
    };
    let mut best: Option<(String, Vec<Part>)> = None;
    let mut rest = Vec::new();
    for id in ids {
        // Gone meanwhile (aborted or completed by a writer that lost its
        // lease): nothing to resume.
        let Some(parts) = store.multipart_parts(key, &id).map_err(err)? else {
            continue;
        };
        if best.as_ref().is_none_or(|(_, b)| parts.len() > b.len()) {
            rest.extend(best.replace((id, parts)).map(|(i, _)| i));
        } else {
            rest.push(id);
        }
    }
    // An upload without parts saves nothing: aborted with the rest.
    if let Some((id, _)) = best.take_if(|(_, p)| p.is_empty()) {
        rest.push(id);
    }
    if !rest.is_empty() {
        offered.insert(key.to_string(), rest);
    }
    Ok(best)
}

fn moved() -> AgentError {
    AgentError::new(
        ErrorKind::Moved,
        "the repository moved: another writer committed first (or took over this sync's lease); nothing was committed",
    )
    .hint("run the command again; dsg will plan against the new head")
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
