//! dsg-repo: the repository side. The agent (`agent.rs`) serves the framed
//! protocol (`protocol.rs`) over any byte stream and drives a backend
//! (`backend.rs`: one small object-safe trait). The repository backend
//! (`repo.rs`) stages and verifies uploads the same way for every kind and
//! leaves what differs to a store (`store.rs`): a plain directory
//! (`dir.rs`) or a ZFS dataset (`zfs.rs`), chosen in one place, `open`.
//! `client.rs` is the client's end of the same protocol.

pub mod agent;
pub mod backend;
pub mod client;
pub mod dir;
pub mod history;
pub mod list;
pub mod protocol;
pub mod prune;
pub mod repo;
pub mod s3;
mod site;
pub mod ssh;
mod store;
mod writeback;
pub mod zfs;

use std::path::Path;

use dsg_core::config::RepoType;

/// Failpoints live with the transactions; re-exported for the agent's users.
pub use dsg_txn::failpoint;

pub use client::{Connecting, Incoming, Meta, MetaWith, RepoClient, RepoError};
pub use site::repo_name_of;

/// The repository at `repo_dir` of the given type, as the agent's backend:
/// the one place where the kind of store is chosen. ZFS needs its pool.
pub fn open(
    kind: RepoType,
    repo_dir: &Path,
    pool: Option<&str>,
) -> Result<Box<dyn backend::Backend>, backend::AgentError> {
    let store: Box<dyn store::Store> = match kind {
        RepoType::Xfs => Box::new(dir::DirStore),
        RepoType::Zfs => {
            let pool = pool.filter(|p| !p.is_empty()).ok_or_else(|| {
                backend::AgentError::new(
                    protocol::ErrorKind::Protocol,
                    "a zfs repository needs its pool",
                )
                .hint("set repository.pool in .dsgconfig.yml (dsg init --pool POOL)")
            })?;
            Box::new(zfs::Zfs::new(pool, repo_dir)?)
        }
        RepoType::S3 => {
            return Err(backend::AgentError::new(
                protocol::ErrorKind::Protocol,
                "an s3 repository is opened from its project config (s3::S3Repo::open)",
            ))
        }
    };
    Ok(Box::new(repo::Repository::new(repo_dir, store)?))
}
