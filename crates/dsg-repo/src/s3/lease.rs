//! The writers' lease on an S3 repository: a `lock` object taken and
//! renewed by conditional PUTs (see docs/design.md §11).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dsg_s3::{Cond, S3Error, Store};
use serde::{Deserialize, Serialize};

use super::{corrupt, err};
use crate::backend::AgentError;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct LockDoc {
    pub tx: String,
    pub user: String,
    pub pid: u32,
    /// Unix seconds.
    pub expires: u64,
    /// Released.
    pub free: bool,
}

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What `Lease::try_take` found.
pub(super) enum Taken {
    /// Ours; with the dead holder's lock when it was taken over.
    Yes(Lease, Option<LockDoc>),
    Held(LockDoc),
}

/// The writers' lease, renewed by a thread while held; released (marked
/// free) when dropped, unless it was lost meanwhile.
pub(super) struct Lease {
    store: Arc<Store>,
    doc: LockDoc,
    secs: u64,
    etag: Arc<Mutex<String>>,
    lost: Arc<AtomicBool>,
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl Lease {
    pub(super) fn try_take(
        store: &Arc<Store>,
        tx: &str,
        user: &str,
        secs: u64,
    ) -> Result<Taken, AgentError> {
        let doc = LockDoc {
            tx: tx.into(),
            user: user.into(),
            pid: std::process::id(),
            expires: now_secs() + secs,
            free: false,
        };
        let body = serde_json::to_vec(&doc).expect("json");
        match store.put("lock", &body, &Cond::Absent) {
            Ok(etag) => return Ok(Taken::Yes(Lease::start(store, doc, etag, secs), None)),
            Err(S3Error::Precondition { .. }) | Err(S3Error::Ambiguous { .. }) => {}
            Err(e) => return Err(err(e)),
        }
        let Some((bytes, etag)) = store.get("lock").map_err(err)? else {
            // Released between the two requests: try again.
            return Ok(Taken::Held(LockDoc { expires: 0, ..doc }));
        };
        let held: LockDoc = serde_json::from_slice(&bytes).map_err(|e| {
            corrupt("the lock object", e).hint(format!(
                "if no dsg is writing {}, delete its 'lock' object",
                store.location().describe()
            ))
        })?;
        if !held.free && held.expires >= now_secs() {
            return Ok(Taken::Held(held));
        }
        match store.put("lock", &body, &Cond::Etag(etag)) {
            Ok(etag) => {
                let dead = (!held.free).then_some(held);
                Ok(Taken::Yes(Lease::start(store, doc, etag, secs), dead))
            }
            Err(S3Error::Precondition { .. }) | Err(S3Error::Ambiguous { .. }) => {
                Ok(Taken::Held(held))
            }
            Err(e) => Err(err(e)),
        }
    }

    fn start(store: &Arc<Store>, doc: LockDoc, etag: String, secs: u64) -> Lease {
        let etag = Arc::new(Mutex::new(etag));
        let lost = Arc::new(AtomicBool::new(false));
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let renewer = {
            let (store, etag, lost, stop) =
                (store.clone(), etag.clone(), lost.clone(), stop.clone());
            let mut doc = doc.clone();
            std::thread::spawn(move || {
                let every = Duration::from_secs_f64(secs as f64 / 3.0);
                loop {
                    let (m, cv) = &*stop;
                    let guard = m.lock().expect("lease stop");
                    let (guard, _) = cv.wait_timeout(guard, every).expect("lease stop");
                    if *guard {
                        return;
                    }
                    drop(guard);
                    doc.expires = now_secs() + secs;
                    let body = serde_json::to_vec(&doc).expect("json");
                    // Held across the PUT, as `confirm` does: else a
                    // confirm between reading the ETag and this PUT would
                    // make it fail its precondition, a lease lost to itself.
                    let mut cur = etag.lock().expect("lease etag");
                    match store.put("lock", &body, &Cond::Etag(cur.clone())) {
                        Ok(e) => *cur = e,
                        Err(S3Error::Precondition { .. }) | Err(S3Error::Ambiguous { .. }) => {
                            tracing::warn!("lost the repository lease (taken over)");
                            lost.store(true, Ordering::SeqCst);
                            return;
                        }
                        // Tried again at the next tick; the lease lasts
                        // three of them.
                        Err(e) => tracing::warn!("renewing the repository lease: {e}"),
                    }
                }
            })
        };
        Lease {
            store: store.clone(),
            doc,
            secs,
            etag,
            lost,
            stop,
            renewer: Some(renewer),
        }
    }

    pub(super) fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Renews the lease now: whether it is still ours (deletions check
    /// this first; a writer paused past its lease must not delete).
    pub(super) fn confirm(&self) -> bool {
        if self.lost() {
            return false;
        }
        let mut doc = self.doc.clone();
        doc.expires = now_secs() + self.secs;
        let body = serde_json::to_vec(&doc).expect("json");
        let mut etag = self.etag.lock().expect("lease etag");
        match self.store.put("lock", &body, &Cond::Etag(etag.clone())) {
            Ok(e) => {
                *etag = e;
                true
            }
            Err(_) => {
                self.lost.store(true, Ordering::SeqCst);
                false
            }
        }
    }

    fn stop_renewing(&mut self) {
        {
            let (m, cv) = &*self.stop;
            *m.lock().expect("lease stop") = true;
            cv.notify_all();
        }
        if let Some(h) = self.renewer.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop_renewing();
        if self.lost() {
            return;
        }
        let doc = LockDoc {
            free: true,
            expires: 0,
            ..self.doc.clone()
        };
        let body = serde_json::to_vec(&doc).expect("json");
        let cur = self.etag.lock().expect("lease etag").clone();
        // Best effort: a lease not released expires.
        if let Err(e) = self.store.put("lock", &body, &Cond::Etag(cur)) {
            tracing::warn!("releasing the repository lease: {e}");
        }
    }
}
