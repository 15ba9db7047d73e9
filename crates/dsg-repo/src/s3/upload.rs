//! Uploads of small files to an S3 repository: a pool of threads fed in
//! write-ahead batches (each batch's keys journaled before any is written),
//! within a budget of bytes held in memory.

use std::sync::{Arc, Condvar, Mutex};

use dsg_s3::{Cond, S3Error, Store};
use dsg_txn::failpoint::failpoint;

use super::{err, BATCH_BYTES, BATCH_KEYS, WORKERS};
use crate::backend::AgentError;

/// Bodies received but not yet stored (the batch being gathered, queued,
/// in flight) hold at most this many bytes, however large the small files:
/// a count alone would let 16 MiB files fill half a gigabyte.
const BUDGET: usize = 128 << 20;

/// A budget shared by threads: `take(n)` waits until `n` more units fit
/// under the cap, `give(n)` returns them. A request larger than the whole
/// cap is let through once nothing else is taken: it goes alone.
pub(super) struct Budget {
    cap: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

impl Budget {
    pub(super) const fn new(cap: usize) -> Budget {
        Budget {
            cap,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    fn fits(&self, used: usize, n: usize) -> bool {
        used == 0 || used + n <= self.cap
    }

    /// Takes `n` if it fits now.
    pub(super) fn try_take(&self, n: usize) -> bool {
        let mut used = self.used.lock().expect("budget");
        let fits = self.fits(*used, n);
        if fits {
            *used += n;
        }
        fits
    }

    /// Takes `n`, waiting for others to give back enough.
    pub(super) fn take(&self, n: usize) {
        let mut used = self.used.lock().expect("budget");
        while !self.fits(*used, n) {
            used = self.freed.wait(used).expect("budget");
        }
        *used += n;
    }

    pub(super) fn give(&self, n: usize) {
        let mut used = self.used.lock().expect("budget");
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }

    #[cfg(test)]
    fn used(&self) -> usize {
        *self.used.lock().expect("budget")
    }
}

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
    /// Bytes of the bodies not yet stored; workers give back each one's
    /// when it is done with.
    budget: Arc<Budget>,
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
        let budget = Arc::new(Budget::new(BUDGET));
        let workers = (0..WORKERS)
            .map(|_| {
                let (store, recv, failed, created, budget) = (
                    store.clone(),
                    recv.clone(),
                    failed.clone(),
                    created.clone(),
                    budget.clone(),
                );
                std::thread::spawn(move || loop {
                    let job = match recv.lock().expect("upload queue").recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    let bytes = job.body.len();
                    if failed.lock().expect("upload error").is_none() {
                        match upload_one(&store, &job) {
                            Ok(true) => created.lock().expect("created").push(job.key),
                            Ok(false) => {}
                            Err(e) => {
                                failed.lock().expect("upload error").get_or_insert(e);
                            }
                        }
                    }
                    budget.give(bytes);
                })
            })
            .collect();
        Uploader {
            store: store.clone(),
            tx_id: tx_id.into(),
            send: Some(send),
            workers,
            failed,
            budget,
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
        let n = job.body.len();
        if !self.budget.try_take(n) {
            // The batch being gathered holds part of the budget and only
            // the workers give it back: they get it before this waits.
            self.flush()?;
            self.budget.take(n);
        }
        self.pending_bytes += n;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn the_budget_blocks_until_given_back_and_lets_a_huge_request_go_alone() {
        let b = Budget::new(100);
        assert!(b.try_take(60));
        assert!(b.try_take(40));
        assert!(!b.try_take(1), "full");
        b.give(40);
        assert!(!b.try_take(41));
        assert!(b.try_take(40));
        b.give(100);
        assert_eq!(b.used(), 0);
        assert!(b.try_take(500), "larger than the cap: alone");
        assert!(!b.try_take(1), "nothing beside it");
        b.give(500);

        // A taker waits for a give from another thread.
        let b = Arc::new(Budget::new(10));
        b.take(8);
        let got = Arc::new(AtomicUsize::new(0));
        let t = {
            let (b, got) = (b.clone(), got.clone());
            std::thread::spawn(move || {
                b.take(5);
                got.store(1, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(got.load(Ordering::SeqCst), 0, "8 + 5 > 10: it waits");
        b.give(8);
        t.join().unwrap();
        assert_eq!(got.load(Ordering::SeqCst), 1);
        assert_eq!(b.used(), 5);
    }

    #[test]
    fn many_takers_never_hold_more_than_the_cap() {
        let b = Arc::new(Budget::new(64));
        let peak = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (b, peak, held) = (b.clone(), peak.clone(), held.clone());
                std::thread::spawn(move || {
                    for j in 0..200 {
                        let n = 1 + (i * 7 + j * 13) % 40;
                        b.take(n);
                        let now = held.fetch_add(n, Ordering::SeqCst) + n;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        held.fetch_sub(n, Ordering::SeqCst);
                        b.give(n);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak <= 64, "peak {peak}");
        assert!(peak > 40, "several at once: {peak}");
        assert_eq!(b.used(), 0);
    }
}
