//! A repository in a plain directory, on any POSIX filesystem (`xfs`).
//!
//! Layout of `<mountpoint>/<name>/`:
//! - the project's data files at their relpaths (a plain, browsable mirror);
//! - `.dsg/last-sync.json` (head manifest), `.dsg/sync-messages.json`,
//!   `.dsg/archive/sN-sync.json.lz4`;
//! - `.dsg/objects/<hh>/<hash>`: superseded and deleted file versions, moved
//!   there (not copied) so every snapshot stays retrievable;
//! - `.dsg/staging/<tx>/`: uploads of the open transaction, flat in
//!   `.dsg-files/` (see `site::FLAT_FILES`), and its metadata;
//! - `.dsg/journal`: the transaction journal (`dsg_txn::journal`);
//! - `.dsg/lock`: the `flock` target that serialises writers.
//!
//! Init builds the whole repository in a sibling staging directory and moves
//! it into place with one `renameat2(RENAME_NOREPLACE)` (a replacing init:
//! `RENAME_EXCHANGE` with the old tree): that rename is the commit point, so
//! a failed init leaves no repository at all.
//!
//! Sync: uploads are staged and verified, made durable with one `syncfs`,
//! then a `committed` journal record (fsynced) is the commit point. Applying
//! the renames afterwards is idempotent, so recovery after the commit point
//! rolls forward and before it rolls back (deletes the staging directory).

use std::fs;
use std::path::{Path, PathBuf};

use dsg_core::atomic::sync_dir;
use dsg_txn::failpoint::failpoint;
use dsg_txn::{Journal, Log, Op, Record};
use serde::{Deserialize, Serialize};

use crate::backend::AgentError;
use crate::protocol::ErrorKind;
use crate::site::{
    is_base, list_staged, list_staged_flat, original_busy, remove_dir_all_if_exists,
    remove_temp_files, LockMode,
};
use crate::site::{Lock, Site};
use crate::store::{Resumable, Store, TxRef};

/// What a repository directory's journal remembers of a `begin`: the head
/// the transaction builds on (a resume must find the same one), and
/// whether its files are staged flat (`site::FLAT_FILES`); the journal of
/// an older dsg, which staged them at their paths, has no `flat`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct DirBegin {
    base: String,
    #[serde(default)]
    flat: bool,
}

type DirRecord = Record<DirBegin>;
type DirLog = Log<DirBegin>;

pub struct DirStore;

impl DirStore {
    /// With the repository lock held and nothing committed left to apply:
    /// removes the staging, temporary files and the journal.
    fn clear_locked(site: &Site) -> Result<(), AgentError> {
        let dsg = site.dsg();
        let jpath = Self::journal(site);
        // Everything not committed is rolled back by deleting it.
        remove_dir_all_if_exists(&dsg.join("staging"))?;
        remove_temp_files(&dsg)?;
        if jpath.exists() {
            fs::remove_file(&jpath).map_err(|e| AgentError::io("cannot remove the journal", e))?;
            sync_dir(&dsg).map_err(|e| AgentError::io("fsync .dsg", e))?;
        }
        Ok(())
    }

    fn journal(site: &Site) -> PathBuf {
        site.dsg().join("journal")
    }

    fn init_staging(site: &Site, tx: &str) -> PathBuf {
        site.mountpoint
            .join(format!(".dsg-init.{}.{}", site.name, tx))
    }

    /// Removes the staging directories of inits that never committed
    /// (but `keep`, a resumed one). With the init lock held.
    fn cleanup_init_leftovers(site: &Site, keep: Option<&Path>) -> Result<(), AgentError> {
        let prefix = format!(".dsg-init.{}.", site.name);
        if let Ok(rd) = fs::read_dir(&site.mountpoint) {
            for de in rd.flatten() {
                let n = de.file_name().to_string_lossy().to_string();
                if n.starts_with(&prefix) && !n.ends_with(".lock") && Some(&*de.path()) != keep {
                    remove_dir_all_if_exists(&de.path())?;
                }
            }
        }
        Ok(())
    }

    fn resumable_init(&self, site: &Site, tx: &str) -> Result<Option<Resumable>, AgentError> {
        if !site.mountpoint.is_dir() {
            return Ok(None);
        }
        let lock = site.lock(&self.init_lock(site))?;
        let st = Self::init_staging(site, tx);
        let is_dir = fs::symlink_metadata(&st).is_ok_and(|m| m.is_dir());
        if !is_dir || fs::symlink_metadata(site.dir()).is_ok() {
            return Ok(None);
        }
        Self::cleanup_init_leftovers(site, Some(&st))?;
        Ok(Some(Resumable {
            lock,
            staged: list_staged(&st, ".dsg")?,
            root: st.clone(),
            staging: st,
            head: None,
        }))
    }

    fn resumable_sync(
        &self,
        site: &Site,
        tx: &str,
        base: &str,
        base_hash: Option<&str>,
    ) -> Result<Option<Resumable>, AgentError> {
        if !site.exists() {
            return Ok(None);
        }
        let lock = site.lock(&self.repo_lock(site))?;
        let dsg = site.dsg();
        let staging = dsg.join("staging").join(tx);
        let log = DirLog::read(&Self::journal(site)).ok().flatten();
        let ours = matches!(
            log.as_ref().map(|l| l.records.as_slice()),
            Some([Record::Begin { tx: t, begin }]) if t == tx && begin.base == base && begin.flat
        );
        let head = site.head_base().ok().flatten();
        let is_dir = fs::symlink_metadata(&staging).is_ok_and(|m| m.is_dir());
        if !ours || !is_dir || !is_base(head.as_ref(), base, base_hash) {
            return Ok(None);
        }
        // Only this transaction's staging survives.
        if let Ok(rd) = fs::read_dir(dsg.join("staging")) {
            for de in rd.flatten() {
                if de.file_name() != std::ffi::OsStr::new(tx) {
                    remove_dir_all_if_exists(&de.path())?;
                }
            }
        }
        remove_temp_files(&dsg)?;
        Ok(Some(Resumable {
            lock,
            staged: list_staged_flat(&staging)?,
            root: site.dir(),
            staging,
            head,
        }))
    }
}

impl Store for DirStore {
    fn describe(&self, site: &Site) -> String {
        format!("xfs {}", site.dir().display())
    }

    fn repo_lock(&self, site: &Site) -> PathBuf {
        site.dsg().join("lock")
    }

    fn init_lock(&self, site: &Site) -> PathBuf {
        site.mountpoint
            .join(format!(".dsg-init.{}.lock", site.name))
    }

    fn keeps_objects(&self) -> bool {
        true
    }

    fn swaps(&self) -> bool {
        false
    }

    fn original_transaction(&self, site: &Site) -> Option<PathBuf> {
        // The original stages at `<mountpoint>/.staging-<tx>` whatever the
        // repository's name: any one of them may be for this repository.
        let rd = fs::read_dir(&site.mountpoint).ok()?;
        rd.flatten()
            .find(|d| {
                d.file_name().to_string_lossy().starts_with(".staging-")
                    && fs::symlink_metadata(d.path()).is_ok_and(|m| m.is_dir())
            })
            .map(|d| d.path())
    }

    fn recover_locked(&self, site: &Site) -> Result<(), AgentError> {
        let jpath = Self::journal(site);
        if let Some(log) =
            DirLog::read(&jpath).map_err(|e| AgentError::io("cannot read the journal", e))?
        {
            if let Some((tx, ops, _)) = log.unfinished_commit() {
                tracing::info!("rolling forward committed transaction {tx}");
                // An older dsg's transaction has its files at their paths.
                let flat = log.begin().is_some_and(|(_, b)| b.flat);
                site.apply(&site.dir(), tx, ops, true, flat)?;
            }
        }
        Self::clear_locked(site)
    }

    fn recover(&self, site: &Site) -> Result<(), AgentError> {
        let dsg = site.dsg();
        // Only when something was left behind: recovery needs the exclusive
        // lock, and reading (status, clone) must neither write nor need
        // write access.
        let pending = dsg.join("journal").exists()
            || dsg.join("staging").exists()
            || fs::read_dir(&dsg)
                .map(|rd| {
                    rd.flatten()
                        .any(|d| dsg_core::atomic::is_temp_name(&d.file_name().to_string_lossy()))
                })
                .unwrap_or(false);
        let jpath = Self::journal(site);
        let unfinished = || {
            DirLog::read(&jpath)
                .ok()
                .flatten()
                .is_some_and(|l| l.unfinished_commit().is_some())
        };
        if pending && site.may_recover(&dsg, &self.repo_lock(site), &unfinished)? {
            // A live writer holds the lock: its transaction is not ours to touch.
            if let Some(_lock) =
                site.take_flock(&self.repo_lock(site), LockMode::Exclusive, false)?
            {
                self.recover_locked(site)?;
            }
        }
        let prefix = format!(".dsg-init.{}.", site.name);
        let init_leftovers = fs::read_dir(&site.mountpoint)
            .map(|rd| {
                rd.flatten().any(|d| {
                    let n = d.file_name().to_string_lossy().to_string();
                    n.starts_with(&prefix) && !n.ends_with(".lock")
                })
            })
            .unwrap_or(false);
        let init_lock = self.init_lock(site);
        if init_leftovers && site.may_recover(&site.mountpoint, &init_lock, &|| false)? {
            if let Some(_lock) = site.take_flock(&init_lock, LockMode::Exclusive, false)? {
                Self::cleanup_init_leftovers(site, None)?;
            }
        }
        Ok(())
    }

    fn begin_init(&self, site: &Site, tx: &str) -> Result<PathBuf, AgentError> {
        Self::cleanup_init_leftovers(site, None)?;
        let st = Self::init_staging(site, tx);
        fs::create_dir(&st).map_err(|e| AgentError::io(st.display(), e))?;
        Ok(st)
    }

    fn begin_sync(&self, site: &Site, tx: &str, base: &str) -> Result<PathBuf, AgentError> {
        let path = Self::journal(site);
        let j = Journal::create(&path).map_err(|e| {
            AgentError::io(format!("cannot create the journal {}", path.display()), e)
        })?;
        j.append(&DirRecord::Begin {
            tx: tx.into(),
            begin: DirBegin {
                base: base.into(),
                flat: true,
            },
        })
        .map_err(|e| {
            let _ = fs::remove_file(&path);
            AgentError::io(format!("cannot write the journal {}", path.display()), e)
        })?;
        failpoint("repo.journal.begin");
        Ok(site.dir())
    }

    fn occupied(&self, site: &Site) -> Result<bool, AgentError> {
        Ok(fs::symlink_metadata(site.dir()).is_ok())
    }

    fn lock_for_replace(&self, site: &Site) -> Result<Vec<Lock>, AgentError> {
        if !site.dsg().is_dir() {
            return Err(AgentError::new(
                ErrorKind::Exists,
                format!(
                    "{} exists and is not a dsg repository",
                    site.dir().display()
                ),
            )
            .hint(
                "dsg replaces only a dsg repository; move it away or choose another --repo-name",
            ));
        }
        // The init lock and the repository's: no init of this name and no
        // sync of the repository runs meanwhile.
        let init = site.lock(&self.init_lock(site))?;
        let repo = site.lock(&self.repo_lock(site))?;
        self.recover_locked(site)?;
        Self::cleanup_init_leftovers(site, None)?;
        Ok(vec![init, repo])
    }

    fn begin_replace(&self, site: &Site, tx: &str) -> Result<PathBuf, AgentError> {
        let st = Self::init_staging(site, tx);
        fs::create_dir(&st).map_err(|e| AgentError::io(st.display(), e))?;
        Ok(st)
    }

    fn resumable(
        &self,
        site: &Site,
        tx: &str,
        base: Option<&str>,
        base_hash: Option<&str>,
    ) -> Result<Option<Resumable>, AgentError> {
        match base {
            None => self.resumable_init(site, tx),
            Some(b) => self.resumable_sync(site, tx, b, base_hash),
        }
    }

    fn commit_init(&self, site: &Site, tx: &TxRef) -> Result<(), AgentError> {
        // One rename is the commit point: a new repository takes its name
        // (never over an existing one); a replacing one swaps with the old
        // tree, which takes the staging name, where the next recovery (or
        // the line below) deletes it.
        let replacing = tx.replace && fs::symlink_metadata(site.dir()).is_ok();
        let (flags, verb) = if replacing {
            (rustix::fs::RenameFlags::EXCHANGE, "replace")
        } else {
            (rustix::fs::RenameFlags::NOREPLACE, "create")
        };
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            tx.staging,
            rustix::fs::CWD,
            site.dir(),
            flags,
        )
        .map_err(|e| AgentError::io(format!("cannot {verb} {}", site.dir().display()), e.into()))?;
        sync_dir(&site.mountpoint).map_err(|e| AgentError::io(site.mountpoint.display(), e))?;
        if replacing {
            failpoint("repo.replace.exchanged");
            remove_dir_all_if_exists(tx.staging)?;
        } else {
            failpoint("repo.init.after_rename");
        }
        Ok(())
    }

    fn commit_sync(
        &self,
        site: &Site,
        tx: &TxRef,
        ops: &[Op],
        _snapshot_id: &str,
    ) -> Result<(), AgentError> {
        // The original dsg copied the repository before this commit and
        // will swap its copy in over it: refuse while that can still be
        // undone. One that begins right after this look still copies a
        // repository in the middle of our apply: it takes no lock, so no
        // check of ours closes that window.
        if let Some(st) = self.original_transaction(site) {
            return Err(original_busy(site, &st, None));
        }
        let j = Journal::open(&Self::journal(site))
            .map_err(|e| AgentError::io("cannot open the journal", e))?;
        j.append(&DirRecord::Committed {
            tx: tx.id.into(),
            ops: ops.to_vec(),
            snap: None,
        })
        .map_err(|e| AgentError::io("cannot write the journal", e))?;
        // The commit point has passed: from here on, errors are finished by
        // recovery (roll forward), never undone.
        failpoint("repo.journal.committed");
        site.apply(&site.dir(), tx.id, ops, true, true)?;
        j.append(&DirRecord::Done { tx: tx.id.into() })
            .map_err(|e| AgentError::io("cannot write the journal", e))?;
        failpoint("repo.journal.done");
        // Applied and done: what is left is staging and the journal, not
        // the journal's operations to read back.
        Self::clear_locked(site)
    }

    fn finish_failed_commit(&self, _site: &Site, _tx: &str) -> Option<Result<(), AgentError>> {
        // Undoing rolls a committed transaction forward (`recover_locked`).
        None
    }

    fn committed_unfinished(&self, site: &Site, tx: &str) -> bool {
        DirLog::read(&Self::journal(site))
            .ok()
            .flatten()
            .is_some_and(|l| l.unfinished_commit().is_some_and(|(t, ..)| t == tx))
    }

    fn undo(&self, site: &Site, tx: &TxRef) -> Result<(), AgentError> {
        if tx.init {
            remove_dir_all_if_exists(tx.staging)
        } else {
            // Before the commit point this rolls back; after it, forward.
            self.recover_locked(site)
        }
    }
}
