//! `dsg prune`: the client's side. The repository decides and deletes
//! (`dsg_repo::prune`, under its exclusive lock); the client sends the
//! policy and keeps a copy of the repository's record of pruned snapshots
//! in `.dsg/pruned.json`, which `dsg log` reads to mark them.

use std::path::Path;

use dsg_repo::protocol::PruneReport;
use dsg_repo::prune::{Policy, PrunedRecord, RECORD};
use dsg_repo::{Meta, RepoClient};

use crate::{EngineError, Project, Result};

pub struct PruneOpts {
    /// The newest snapshots kept, the head included (at least 1).
    pub keep_last: u64,
    /// Also keep snapshots made within this many seconds.
    pub keep_within_secs: Option<u64>,
    pub dry_run: bool,
}

/// `30d`, `12h`, `2w`, `90m`, `45s`, `1y`, or sums such as `1d12h`
/// (a bare number is seconds), in seconds.
pub fn parse_duration(s: &str) -> Result<u64> {
    let bad = || {
        EngineError::Usage(format!(
            "--keep-within {s:?}: give a duration such as 30d, 12h, 2w or 1d12h (s, m, h, d, w, y)"
        ))
    };
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            'y' => 365 * 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(bad)?;
        num.clear();
        any = true;
    }
    if !num.is_empty() {
        total = total
            .checked_add(num.parse::<u64>().map_err(|_| bad())?)
            .ok_or_else(bad)?;
        any = true;
    }
    if !any {
        return Err(bad());
    }
    Ok(total)
}

/// Runs the prune on the repository; after a real one, refreshes this
/// client's copy of the record of pruned snapshots.
pub fn prune(project: &Project, client: &mut RepoClient, opts: &PruneOpts) -> Result<PruneReport> {
    if opts.keep_last == 0 {
        return Err(EngineError::Usage(
            "--keep-last 0 would prune the head; the head is always kept: --keep-last 1 keeps only it".into(),
        ));
    }
    let report = client.prune(&Policy {
        keep_last: opts.keep_last,
        keep_within_secs: opts.keep_within_secs,
        dry_run: opts.dry_run,
        user: project.user.user_id.clone(),
    })?;
    if !opts.dry_run {
        refresh_record(project, client)?;
    }
    Ok(report)
}

/// Copies the repository's `pruned.json` into this client's `.dsg/` when
/// it parses (a damaged one is not kept).
pub fn refresh_record(project: &Project, client: &mut RepoClient) -> Result<()> {
    if let Meta::Data(b) = client.read_meta(RECORD, None)? {
        if PrunedRecord::from_bytes(&b).is_ok() {
            let p = project.dsg().join(RECORD);
            dsg_core::atomic::write_atomic(&p, &b).map_err(|e| EngineError::State {
                message: format!("cannot write {}: {e}", p.display()),
                hint: "the prune itself is done; check that .dsg/ is writable".into(),
            })?;
        }
    }
    Ok(())
}

/// This client's copy of the record (empty when it has none or it does
/// not parse: marks in `log` are informative).
pub fn local_record(dsg: &Path) -> PrunedRecord {
    std::fs::read(dsg.join(RECORD))
        .ok()
        .and_then(|b| PrunedRecord::from_bytes(&b).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_duration("1d12h").unwrap(), 86_400 + 12 * 3600);
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("2w").unwrap(), 14 * 86_400);
        for bad in ["", "d", "3x", "1.5d", "-1d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
