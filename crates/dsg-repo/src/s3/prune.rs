//! `dsg prune` on an S3 repository: the `data/` objects that only pruned
//! snapshots reference are deleted; manifests stay (the chain validates,
//! `log` lists every snapshot), and `pruned.json` records which snapshots
//! lost their data (the same record, and the same policy, as the other
//! kinds: `crate::prune`).
//!
//! Under the writers' lease, in this order:
//! 1. the keys to delete are journaled (`txs/<prune-tx>/0.json`, the same
//!    write-ahead journal an upload batch writes);
//! 2. `pruned.json` is written: the commit point;
//! 3. the keys are deleted, the lease confirmed first;
//! 4. the journal goes.
//!
//! A prune that dies is finished by the next writer's cleaning
//! (`clean_leftovers`), which deletes a dead transaction's journaled keys
//! that no snapshot *outside the pruned record* references: before step 2
//! that is none of them (the prune did not happen), after it exactly what
//! the prune meant to delete. S3 repositories are never replaced in place,
//! so a snapshot id in the record always means the same snapshot.

use std::collections::{BTreeMap, HashSet};

use dsg_core::manifest::{strict_snapshot_number, EntryKind, SyncMessages};
use dsg_s3::Cond;
use dsg_txn::failpoint::failpoint;

use super::lease::Lease;
use super::{corrupt, data_key, err, HeadDoc, S3Repo, SnapRef};
use crate::backend::AgentError;
use crate::protocol::{ErrorKind, PruneReport};
use crate::prune::{
    check_policy, kept_by, known_from_messages, now_secs, Policy, PrunedRecord, PrunedSnapshot,
};

/// The record's key, beside `HEAD`.
pub(super) const RECORD: &str = "pruned.json";

impl S3Repo {
    /// The record of pruned snapshots, and its ETag (`None`: no record).
    pub(super) fn pruned_record(&self) -> Result<(PrunedRecord, Option<String>), AgentError> {
        match self.store.get(RECORD).map_err(err)? {
            None => Ok((PrunedRecord::default(), None)),
            Some((bytes, etag)) => Ok((
                PrunedRecord::from_bytes(&bytes).map_err(|e| corrupt(RECORD, e))?,
                Some(etag),
            )),
        }
    }

    /// The snapshots of `doc` whose data is kept (not recorded as pruned).
    pub(super) fn unpruned<'a>(&self, doc: &'a HeadDoc) -> Result<Vec<&'a SnapRef>, AgentError> {
        let (rec, _) = self.pruned_record()?;
        Ok(doc
            .snapshots
            .iter()
            .filter(|r| rec.get(&r.id, None).is_none())
            .collect())
    }

    /// The `data/` keys the snapshots `refs` reference (each manifest
    /// verified against `HEAD`).
    pub(super) fn referenced_keys<'a>(
        &self,
        refs: impl IntoIterator<Item = &'a SnapRef>,
    ) -> Result<HashSet<String>, AgentError> {
        let mut keys = HashSet::new();
        for r in refs {
            for e in self.load_manifest(r)?.entries() {
                if let EntryKind::File {
                    size,
                    hash: Some(h),
                    ..
                } = &e.kind
                {
                    keys.insert(data_key(h.0, *size));
                }
            }
        }
        Ok(keys)
    }

    pub(super) fn prune_data(&mut self, policy: &Policy) -> Result<PruneReport, AgentError> {
        if self.tx.is_some() {
            return Err(AgentError::new(
                ErrorKind::Protocol,
                "cannot prune inside an open transaction",
            ));
        }
        check_policy(policy)?;
        // A dry run reads only; a prune holds the writers' lease, as a sync.
        let tx = format!("prune-{}", uuid::Uuid::new_v4().simple());
        let lease = if policy.dry_run {
            None
        } else {
            let lease = self
                .acquire(&tx, &policy.user, true)?
                .expect("waited for the lease");
            self.clean_leftovers(&tx, &lease)?;
            Some(lease)
        };
        let (doc, _) = self.read_head()?.ok_or_else(|| {
            AgentError::new(
                ErrorKind::NotFound,
                format!("{} holds no repository", self.store.location().describe()),
            )
        })?;
        let head = doc.head.clone().ok_or_else(|| {
            AgentError::new(ErrorKind::NotFound, "the repository has no snapshots")
        })?;
        let head_n = strict_snapshot_number(&head.id)
            .ok_or_else(|| corrupt("HEAD", format!("head snapshot id {:?}", head.id)))?;
        let messages = self.messages_of(&head)?;
        let mut known = known_from_messages(&messages);
        for r in &doc.snapshots {
            if let Some(n) = strict_snapshot_number(&r.id) {
                known.entry(n).or_default();
            }
        }
        let kept = kept_by(policy, &known, head_n, now_secs());
        let (mut rec, rec_etag) = self.pruned_record()?;
        let mut report = PruneReport::keeping(head.id.clone(), &kept, policy.dry_run);
        let mut newly: BTreeMap<String, PrunedSnapshot> = BTreeMap::new();
        let pruned_at = dsg_core::timefmt::now_la();
        for (n, k) in known.iter().filter(|(n, _)| !kept.contains(n)) {
            let sid = format!("s{n}");
            if rec.get(&sid, k.hash.as_deref()).is_some() {
                report.already_pruned.push(sid);
            } else {
                report.pruned.push(sid.clone());
                newly.insert(
                    sid,
                    PrunedSnapshot {
                        snapshot_hash: k.hash.clone(),
                        pruned_at: pruned_at.clone(),
                        pruned_by: policy.user.clone(),
                    },
                );
            }
        }
        let keep = self.referenced_keys(
            doc.snapshots
                .iter()
                .filter(|r| strict_snapshot_number(&r.id).is_some_and(|n| kept.contains(&n))),
        )?;
        let mut doomed = Vec::new();
        for (key, size) in self.store.list("data/").map_err(err)? {
            if !keep.contains(&key) {
                report.objects += 1;
                report.bytes += size;
                doomed.push(key);
            }
        }
        let Some(lease) = lease else {
            return Ok(report);
        };
        if newly.is_empty() && doomed.is_empty() {
            return Ok(report);
        }
        self.journal_prune(&tx, &doomed, &lease)?;
        failpoint("s3.prune.journal");
        rec.pruned.extend(newly);
        let cond = match rec_etag {
            Some(e) => Cond::Etag(e),
            None => Cond::Absent,
        };
        self.store
            .put(RECORD, &rec.to_bytes(), &cond)
            .map_err(err)?;
        failpoint("s3.prune.recorded");
        for (i, key) in doomed.iter().enumerate() {
            if i % 256 == 0 && !lease.confirm() {
                return Err(lost_lease());
            }
            self.store.delete(key).map_err(err)?;
            if i == 0 {
                failpoint("s3.prune.object");
            }
        }
        failpoint("s3.prune.objects");
        self.store
            .delete(&format!("txs/{tx}/0.json"))
            .map_err(err)?;
        drop(lease);
        Ok(report)
    }

    fn journal_prune(&self, tx: &str, keys: &[String], lease: &Lease) -> Result<(), AgentError> {
        if !lease.confirm() {
            return Err(lost_lease());
        }
        let body = serde_json::to_vec(keys).expect("json");
        self.store
            .put(&format!("txs/{tx}/0.json"), &body, &Cond::None)
            .map_err(err)?;
        Ok(())
    }

    /// The sync-messages index as of snapshot `r`.
    fn messages_of(&self, r: &SnapRef) -> Result<SyncMessages, AgentError> {
        let (bytes, _) = self
            .store
            .get(&r.messages_key())
            .map_err(err)?
            .ok_or_else(|| corrupt(&r.messages_key(), "missing, though HEAD names it"))?;
        SyncMessages::from_json_bytes(&bytes, std::path::Path::new(&r.messages_key()))
            .map_err(|e| corrupt(&r.messages_key(), e))
    }
}

fn lost_lease() -> AgentError {
    AgentError::new(
        ErrorKind::Busy,
        "lost the repository's lease during a prune; the next writer finishes it",
    )
    .hint("run the command again")
}
