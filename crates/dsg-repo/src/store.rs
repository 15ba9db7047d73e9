//! The store interface: what differs between the kinds of repository.
//!
//! A `Repository` (repo.rs) serves the agent for every kind the same way:
//! locking, staging and verifying uploads, checking the new manifest
//! against what was staged, preparing the apply before the commit point.
//! A `Store` says how a transaction is made, committed, undone and
//! recovered on its kind: a plain directory (dir.rs: a journal and renames
//! in place) or a ZFS dataset (zfs.rs: a clone, snapshotted and swapped
//! in). The two never refer to each other; `crate::open` chooses one by
//! the repository type.

use std::path::{Path, PathBuf};

use dsg_txn::Op;

use crate::backend::AgentError;
use crate::protocol::{ErrorKind, StagedFile};
use crate::site::{Lock, Site};

/// The open transaction, as a store needs to see it.
pub(crate) struct TxRef<'a> {
    pub id: &'a str,
    /// Where the transaction's data lives (the repository directory, a
    /// ZFS clone's mountpoint, or for an init the new repository).
    pub root: &'a Path,
    /// Where its uploads go.
    pub staging: &'a Path,
    pub init: bool,
    /// An init that replaces an existing repository (confirmed by the user).
    pub replace: bool,
}

/// A transaction a dropped client can continue: what `resume` found.
pub(crate) struct Resumable {
    pub lock: Lock,
    pub root: PathBuf,
    pub staging: PathBuf,
    pub head: Option<crate::site::Base>,
    pub staged: Vec<StagedFile>,
}

pub(crate) trait Store: Send {
    /// e.g. `xfs /srv/repos/proj`.
    fn describe(&self, site: &Site) -> String;
    /// The lock that serialises writers of the repository.
    fn repo_lock(&self, site: &Site) -> PathBuf;
    /// The lock that serialises inits of this repository name.
    fn init_lock(&self, site: &Site) -> PathBuf;
    /// Whether superseded versions go to the object store (a directory)
    /// or are kept by the store itself (ZFS snapshots).
    fn keeps_objects(&self) -> bool;
    /// Whether a commit may leave the repository unmounted for a moment
    /// (readers then wait for the writer and look again).
    fn swaps(&self) -> bool;

    /// A transaction of the original (Python) dsg open on the repository:
    /// it takes no lock and replaces the repository with its own copy when
    /// it commits, so a snapshot we commit meanwhile would vanish. Only
    /// directories are concerned: on ZFS the original clones the dataset
    /// (and cannot build such a transaction from a config at its last
    /// version), which leaves no such trace.
    fn original_transaction(&self, _site: &Site) -> Option<PathBuf> {
        None
    }

    /// With the repository lock held: finishes or undoes an interrupted
    /// transaction and removes its leftovers.
    fn recover_locked(&self, site: &Site) -> Result<(), AgentError>;
    /// Without a transaction open: recovers what a dead command left,
    /// unless a live writer holds the repository or this user may not.
    fn recover(&self, site: &Site) -> Result<(), AgentError>;

    /// With the init lock held: refuses if the repository exists, and
    /// makes the new repository aside; returns its root.
    fn begin_init(&self, site: &Site, tx: &str) -> Result<PathBuf, AgentError>;
    /// With the repository lock held and the head checked: journals the
    /// transaction and returns the root it changes.
    fn begin_sync(&self, site: &Site, tx: &str, base: &str) -> Result<PathBuf, AgentError>;
    /// Whether there is something a replacing init would replace.
    fn occupied(&self, site: &Site) -> Result<bool, AgentError>;
    /// The locks a replacing init holds, taken, with recovery done under
    /// them.
    fn lock_for_replace(&self, site: &Site) -> Result<Vec<Lock>, AgentError>;
    /// With those locks held: makes the new repository aside.
    fn begin_replace(&self, site: &Site, tx: &str) -> Result<PathBuf, AgentError>;
    /// The transaction `tx` if it can continue (same base, nothing
    /// committed since, its staging still there); `None`: begin afresh.
    fn resumable(
        &self,
        site: &Site,
        tx: &str,
        base: Option<&str>,
        base_hash: Option<&str>,
    ) -> Result<Option<Resumable>, AgentError>;

    /// An init's commit point: the new repository takes its name.
    fn commit_init(&self, site: &Site, tx: &TxRef) -> Result<(), AgentError>;
    /// A sync's commit point and its apply; `ops` are prepared.
    fn commit_sync(
        &self,
        site: &Site,
        tx: &TxRef,
        ops: &[Op],
        snapshot_id: &str,
    ) -> Result<(), AgentError>;
    /// After a commit that failed, with the locks still held: `Some` when
    /// the store had passed its commit point (the outcome of finishing
    /// it); `None` when the transaction is to be undone.
    fn finish_failed_commit(&self, site: &Site, tx: &str) -> Option<Result<(), AgentError>>;
    /// Whether `tx` is committed but not yet applied (recovery finishes
    /// it; never report it as failed).
    fn committed_unfinished(&self, site: &Site, tx: &str) -> bool;
    /// Undoes a transaction that did not commit.
    fn undo(&self, site: &Site, tx: &TxRef) -> Result<(), AgentError>;

    /// The whole tree of snapshot `snap` (not the head), when the store
    /// keeps one (ZFS: `@snap`, mounted while the result lives); `None`:
    /// old versions are in the object store (a directory).
    fn snapshot_tree(&self, _site: &Site, _snap: &str) -> Result<Option<SnapshotTree>, AgentError> {
        Ok(None)
    }

    /// `snapmount` on the repository host: snapshot `snap` read-only at
    /// `mountpoint`, its dataset's name and a guard that removes it. Only
    /// ZFS keeps whole snapshot trees.
    fn mount_snapshot(
        &self,
        site: &Site,
        snap: &str,
        _mountpoint: &Path,
    ) -> Result<(String, Box<dyn Send>), AgentError> {
        Err(AgentError::new(
            ErrorKind::Protocol,
            format!(
                "{} cannot mount {snap}: only a ZFS repository can",
                self.describe(site)
            ),
        ))
    }

    /// Where the repository's own file `what` lives outside its snapshots
    /// (`prune.json` and the prune journal): in `.dsg/`, or beside a ZFS
    /// dataset (a sync clones the head snapshot, which would lose a file
    /// written into the live dataset).
    fn side_file(&self, site: &Site, what: &str) -> PathBuf {
        site.dsg().join(what)
    }

    /// The ZFS store, whose snapshots `dsg prune` destroys.
    fn zfs(&self) -> Option<&crate::zfs::Zfs> {
        None
    }
}

/// A snapshot's files at `path`, readable while this lives.
pub(crate) struct SnapshotTree {
    pub path: PathBuf,
    /// Whatever keeps `path` readable (a ZFS clone), released on drop.
    pub _guard: Option<Box<dyn Send>>,
}
