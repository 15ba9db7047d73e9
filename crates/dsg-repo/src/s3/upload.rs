//! Uploads of small files to an S3 repository: a pool of threads fed in
//! write-ahead batches (each batch's keys journaled before any is written).

use std::sync::{Arc, Mutex};

use dsg_s3::{Cond, S3Error, Store};
use dsg_txn::failpoint::failpoint;

use super::{err, BATCH_BYTES, BATCH_KEYS, WORKERS};
use crate::backend::AgentError;

/// One small file on its way up.
pub(super) struct Job {
    pub key: String,
    pub body: Vec<u8>,
}

/// The pool uploading small files, fed in write-ahead batches.
pub(super) struct Uploader {
    store: Arc<Store>,
    tx_id: String,
    send: Option<std::sync::mpsc::SyncSender<Job>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    failed: Arc<Mutex<Option<AgentError>>>,
    /// Keys this transaction created (undone by a rollback).
    pub created: Arc<Mutex<Vec<String>>>,
    pending: Vec<Job>,
    pending_bytes: usize,
    batches: u32,
}

impl Uploader {
    pub(super) fn new(store: &Arc<Store>, tx_id: &str) -> Uploader {
        let (send, recv) = std::sync::mpsc::sync_channel::<Job>(WORKERS);
        let recv = Arc::new(Mutex::new(recv));
        let failed = Arc::new(Mutex::new(None));
        let created = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..WORKERS)
            .map(|_| {
                let (store, recv, failed, created) =
                    (store.clone(), recv.clone(), failed.clone(), created.clone());
                std::thread::spawn(move || loop {
                    let job = match recv.lock().expect("upload queue").recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    if failed.lock().expect("upload error").is_some() {
                        continue;
                    }
                    match upload_one(&store, &job) {
                        Ok(true) => created.lock().expect("created").push(job.key),
                        Ok(false) => {}
                        Err(e) => {
                            failed.lock().expect("upload error").get_or_insert(e);
                        }
                    }
                })
            })
            .collect();
        Uploader {
            store: store.clone(),
            tx_id: tx_id.into(),
            send: Some(send),
            workers,
            failed,
            created,
            pending: Vec::new(),
            pending_bytes: 0,
            batches: 0,
        }
    }

    pub(super) fn error(&self) -> Option<AgentError> {
        self.failed
            .lock()
            .expect("upload error")
            .as_ref()
            .map(|e| AgentError {
                kind: e.kind,
                message: e.message.clone(),
                hint: e.hint.clone(),
            })
    }

    /// Records `keys` as this transaction's possible uploads before any of
    /// them is written.
    pub(super) fn journal(&mut self, keys: &[&str]) -> Result<(), AgentError> {
        self.batches += 1;
        let name = format!("txs/{}/{:06}.json", self.tx_id, self.batches);
        let body = serde_json::to_vec(keys).expect("json");
        self.store.put(&name, &body, &Cond::None).map_err(err)?;
        Ok(())
    }

    pub(super) fn push(&mut self, job: Job) -> Result<(), AgentError> {
        if let Some(e) = self.error() {
            return Err(e);
        }
        self.pending_bytes += job.body.len();
        self.pending.push(job);
        if self.pending.len() >= BATCH_KEYS || self.pending_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    pub(super) fn flush(&mut self) -> Result<(), AgentError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = self.pending.iter().map(|j| j.key.clone()).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.journal(&keys)?;
        failpoint("s3.stage.journaled");
        let send = self.send.as_ref().expect("open");
        for job in self.pending.drain(..) {
            if send.send(job).is_err() {
                break;
            }
        }
        self.pending_bytes = 0;
        Ok(())
    }

    /// Waits for every upload; the first failure.
    pub(super) fn finish(&mut self) -> Result<(), AgentError> {
        self.flush()?;
        self.send = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        match self.error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub(super) fn created(&self) -> Vec<String> {
        self.created.lock().expect("created").clone()
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.pending.clear();
        self.send = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Uploads one verified small file unless its content is there already;
/// whether this call created it.
fn upload_one(store: &Store, job: &Job) -> Result<bool, AgentError> {
    // No HEAD first: a small body costs less than a second round trip,
    // and `If-None-Match: *` says whether it was there.
    match store.put(&job.key, &job.body, &Cond::Absent) {
        Ok(_) => Ok(true),
        // Same key, same content: someone stored it first.
        Err(S3Error::Precondition { .. }) | Err(S3Error::Ambiguous { .. }) => Ok(false),
        Err(e) => Err(err(e)),
    }
}
