//! dsg-repo: the repository side. The agent (`agent.rs`) serves the framed
//! protocol (`protocol.rs`) over any byte stream and drives a backend
//! (`backend.rs`: one small object-safe trait; `posix.rs`: the `xfs`
//! backend). `client.rs` is the client's end of the same protocol.

pub mod agent;
pub mod backend;
pub mod client;
pub mod posix;
pub mod protocol;
pub mod ssh;
pub mod zfs;

/// Failpoints live with the transactions; re-exported for the agent's users.
pub use dsg_txn::failpoint;

pub use client::{Incoming, Meta, RepoClient, RepoError};
