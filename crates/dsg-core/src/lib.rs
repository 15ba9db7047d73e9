//! dsg-core: everything dsg knows without talking to a repository.
//!
//! Formats (manifests, archives, sync-messages), hashing, scanning with a stat
//! cache, filename rules, configuration, and the 15-state classifier that both
//! `status` and `sync` use. No network, no ZFS, no repository I/O here.

pub mod atomic;
pub mod config;
pub mod config_edit;
pub mod hash;
pub mod manifest;
pub mod names;
pub mod paths;
mod piece;
pub mod scan;
pub mod state;
pub mod timefmt;
pub mod yaml;
