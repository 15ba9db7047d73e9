//! The base every integration-test support module builds on: helpers that
//! `common` (cli_* tests), `sync_support`, `ssh_support` and `zfs_support`
//! all need, each written once here.
//!
//! The test crates come in three families:
//! - the repository suites (crash, faults, replace, states,
//!   sync_concurrency, two_clients, zfs_basic, zfs_ssh) declare only
//!   `mod world;`: `world/mod.rs` includes this module, `sync_support`,
//!   `zfs_support` and `ssh_support` by path;
//! - the `ssh_*` suites declare `mod support;` and `mod ssh_support;` (see
//!   there why they keep their own world);
//! - the `cli_*` tests declare `mod support;` and `mod common;`.
//!
//! The support modules re-export (or `use`) what they take from here, so
//! test files import only `world::*`, `ssh_support::*` or `common::*`.
//!
//! - [`env`]: CI detection, the `dsg` binary, unique names, repository
//!   parent directories, the isolated user config, `dsg init` arguments.
//! - [`proc`]: command output (show/stdout/stderr, JSON), exit-status
//!   assertions, running a command with a deadline.
//! - [`files`]: writing files and links into a tree, deterministic bytes.
//! - [`tree`]: tree listings (walk, data trees, state listings) and diffs.
#![allow(dead_code)]

pub mod env;
pub mod files;
pub mod proc;
pub mod tree;

// Each test crate uses only some of these (the cli tests none of `files`
// and `tree`).
#[allow(unused_imports)]
pub use {env::*, files::*, proc::*, tree::*};
