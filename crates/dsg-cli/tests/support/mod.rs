//! The base every integration-test support module builds on: helpers that
//! `common` (cli_* tests), `sync_support`, `ssh_support` and `zfs_support`
//! all need, each written once here.
//!
//! A test crate declares `mod support;` beside its own support module(s);
//! those re-export (or `use`) what they take from here, so test files keep
//! importing only `common::*`, `sync_support::*`, `ssh_support::*` or
//! `zfs_support::*`.
//!
//! The suites that run on every repository kind (crash, faults, replace,
//! states) declare only `mod world;`: `world/mod.rs` includes this module,
//! `sync_support`, `zfs_support` and `ssh_support` by path.
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
