//! The S3 backend's write transaction: begin (lease, cleaning, base
//! check), staging (small files through the upload pool, large ones as
//! multipart uploads, resumed when a dead or failed sync left one), commit
//! (the check, the snapshot objects, `HEAD` by compare-and-swap) and undo.
//! The protocol and why it is safe: docs/design.md §11.

use super::*;

/// The open transaction.
pub(super) struct S3Tx {
    pub(super) id: String,
    pub(super) lease: Lease,
    /// HEAD as read at begin (after any fencing), and its ETag: the commit's
    /// precondition.
    pub(super) head: Option<(HeadDoc, String)>,
    pub(super) check: OpenTx,
    pub(super) work: tempfile::TempDir,
    pub(super) up: Uploader,
    /// Snapshot objects this transaction wrote (removed if it does not
    /// commit).
    pub(super) written: Vec<String>,
    /// Unfinished multipart uploads found at begin, by content key: offered
    /// to `stage_large`; those it does not resume are aborted before the
    /// commit point.
    pub(super) offered: HashMap<String, Vec<String>>,
}

impl S3Tx {
    pub(super) fn base_path(&self) -> PathBuf {
        self.work.path().join("base.json")
    }
    pub(super) fn meta(&self) -> PathBuf {
        self.work.path().join("meta")
    }
}

impl S3Repo {
    pub(super) fn begin_tx(
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
    pub(super) fn stage_large(
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
    pub(super) fn undo(&mut self, mut tx: S3Tx) {
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

    pub(super) fn commit_tx(&mut self, tx: &mut S3Tx, c: &CommitData) -> Result<(), AgentError> {
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

pub(super) fn moved() -> AgentError {
    AgentError::new(
        ErrorKind::Moved,
        "the repository moved: another writer committed first (or took over this sync's lease); nothing was committed",
    )
    .hint("run the command again; dsg will plan against the new head")
}
