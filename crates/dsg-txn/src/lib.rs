//! dsg-txn: transactions, the same on both sides of a sync. The journal
//! (`journal.rs`: checksummed, fsynced records and the one record type),
//! the apply engine (`apply.rs`: prepare before the commit point, apply
//! after it), and failpoints for crash tests (`failpoint.rs`).

pub mod apply;
pub mod failpoint;
pub mod journal;

pub use apply::{iter_ops, Aside, Known, Layout, Op, OpList, OpRef, TxError};
pub use journal::{Journal, Log, Record};
