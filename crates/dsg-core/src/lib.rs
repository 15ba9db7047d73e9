//! dsg-core: everything dsg knows without talking to a repository.
//!
//! Formats (manifests, archives, sync-messages), hashing, scanning with a stat
//! cache, filename rules, configuration, and the 15-state classifier that both
//! `status` and `sync` use. No network, no ZFS, no repository I/O here.

pub mod atomic;
pub mod config;
pub mod hash;
pub mod manifest;
pub mod names;
pub mod paths;
pub mod scan;
pub mod state;
pub mod timefmt;
pub mod yaml;

/// THROWAWAY: prints current and peak RSS when DSG_MEMTRACE is set.
pub fn mem_mark(label: &str) {
    if std::env::var_os("DSG_MEMTRACE").is_none() {
        return;
    }
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].trim().to_string())
            .unwrap_or_default()
    };
    eprintln!("MEM {label}: rss {} hwm {}", get("VmRSS:"), get("VmHWM:"));
}
