//! The history commands: log, blame, diff, validate-file,
//! validate-snapshot, validate-chain. The engine is `dsg_sync::history`;
//! this file parses and prints.

use clap::Args;
use dsg_sync::history::{self, History, Side, Verdict};
use dsg_sync::{EngineError, Project};
use serde_json::json;

use crate::human::{self, count};
use crate::output::{Out, TermReporter};

#[derive(Args)]
pub struct LogCmd {
    /// Show at most N snapshots (0: all)
    #[arg(short = 'n', long = "limit", default_value_t = 10)]
    limit: usize,
}

#[derive(Args)]
pub struct BlameCmd {
    /// The file, relative to the current directory (or the project root)
    file: String,
}

#[derive(Args)]
pub struct DiffCmd {
    /// From this snapshot (sN or head); default: the last sync
    from: Option<String>,
    /// To this snapshot; default: the working tree
    to: Option<String>,
    /// Only these files or directories
    #[arg(last = true)]
    paths: Vec<String>,
}

#[derive(Args)]
pub struct ValidateFileCmd {
    /// The file, relative to the current directory (or the project root)
    file: String,
}

#[derive(Args)]
pub struct ValidateSnapshotCmd {
    /// The snapshot to check (sN or head); default: the last sync
    #[arg(long)]
    pub snapshot: Option<String>,
}

/// The project, after finishing what an interrupted command left here;
/// history reads only, so a failed local recovery is a warning.
fn open(out: &Out) -> Result<Project, EngineError> {
    let p = crate::open_project()?;
    if let Err(e) = dsg_sync::local_tx::recover_sync(&p, None) {
        out.warn(&e.to_string());
    }
    Ok(p)
}

fn notes(out: &Out, h: &History) {
    for n in &h.notes {
        out.note(n);
    }
}

pub fn log(a: LogCmd, out: &Out) -> Result<(), EngineError> {
    let project = open(out)?;
    let mut h = History::open(&project)?;
    let entries = h.log((a.limit > 0).then_some(a.limit))?;
    notes(out, &h);
    h.close();
    if out.json {
        out.json_doc(&json!({"status": "ok", "command": "log", "snapshots": entries}));
        return Ok(());
    }
    for e in &entries {
        out.line(&format!(
            "{:<6} {}  {:<24} {:>13} {:>10}  {}{}",
            e.snapshot_id,
            e.created_at,
            e.created_by.as_deref().unwrap_or("unknown"),
            count(e.entry_count, "file"),
            match e.total_bytes {
                Some(b) => human::bytes(b),
                None => "? B".into(),
            },
            e.message.as_deref().unwrap_or(""),
            if e.pruned { "  [pruned]" } else { "" }
        ));
    }
    Ok(())
}

pub fn blame(a: BlameCmd, out: &Out) -> Result<(), EngineError> {
    let project = open(out)?;
    let path = history::project_path(&project, &crate::cwd()?, &a.file)?;
    let mut h = History::open(&project)?;
    let events = h.blame(&path);
    notes(out, &h);
    h.close();
    let events = events?;
    if out.json {
        out.json_doc(&json!({"status": "ok", "command": "blame", "path": path, "events": events}));
        return Ok(());
    }
    for e in &events {
        out.line(&format!(
            "{:<6} {:<6}  {}  {:<24} {}  {}",
            e.snapshot_id,
            e.event,
            e.created_at,
            e.created_by.as_deref().unwrap_or("unknown"),
            e.hash.as_deref().unwrap_or("-               "),
            e.message.as_deref().unwrap_or("")
        ));
    }
    Ok(())
}

pub fn diff(a: DiffCmd, out: &Out) -> Result<(), EngineError> {
    let project = open(out)?;
    let cwd = crate::cwd()?;
    let paths = a
        .paths
        .iter()
        .map(|p| history::project_path(&project, &cwd, p))
        .collect::<Result<Vec<_>, _>>()?;
    let from = Side::Snapshot(a.from.unwrap_or_else(|| "head".into()));
    let to = match a.to {
        Some(t) => Side::Snapshot(t),
        None => Side::WorkingTree,
    };
    let mut h = History::open(&project)?;
    let report = h.diff(from, to, &paths, &TermReporter::new(out));
    notes(out, &h);
    h.close();
    let report = report?;
    if out.json {
        out.json_doc(&json!({
            "status": "ok", "command": "diff",
            "from": report.from, "to": report.to, "files": report.files,
        }));
        return Ok(());
    }
    let size = |s: Option<u64>| s.map(human::bytes).unwrap_or_else(|| "link".into());
    let (mut added, mut deleted, mut modified) = (0, 0, 0);
    for f in &report.files {
        let (mark, sizes) = match f.change {
            "added" => {
                added += 1;
                ("A", format!("+{}", size(f.size_after)))
            }
            "deleted" => {
                deleted += 1;
                ("D", format!("-{}", size(f.size_before)))
            }
            _ => {
                modified += 1;
                (
                    "M",
                    format!("{} -> {}", size(f.size_before), size(f.size_after)),
                )
            }
        };
        out.line(&format!(" {mark} {}  ({sizes})", f.path));
    }
    out.summary(&format!(
        "{} -> {}: {} changed, {added} added, {modified} modified, {deleted} deleted",
        report.from,
        report.to,
        count(report.files.len() as u64, "file")
    ));
    Ok(())
}

pub fn validate_file(a: ValidateFileCmd, out: &Out) -> Result<(), EngineError> {
    let project = open(out)?;
    let path = history::project_path(&project, &crate::cwd()?, &a.file)?;
    let c = history::validate_file(&project, &path)?;
    if out.json {
        out.json_doc(&json!({
            "status": if c.ok { "ok" } else { "error" },
            "command": "validate-file",
            "result": c,
        }));
    } else if c.ok {
        out.line(&format!(
            "✓ {}: matches {} ({})",
            c.path, c.snapshot_id, c.expected
        ));
    } else {
        out.line(&format!(
            "✗ {}: {} records {}, the file is {}",
            c.path, c.snapshot_id, c.expected, c.actual
        ));
    }
    if c.ok {
        Ok(())
    } else {
        Err(EngineError::Reported {
            message: format!(
                "{} differs from the last sync ({}): expected {}, found {}",
                c.path, c.snapshot_id, c.expected, c.actual
            ),
            hint: "'dsg status' shows it as a local change; sync publishes it, or restore it from the repository".into(),
            code: 1,
        })
    }
}

fn print_check(out: &Out, c: &history::SnapshotCheck) {
    let mark = match c.verdict {
        Verdict::Verified => "✓",
        Verdict::IndexOnly => "~",
        Verdict::Failed => "✗",
    };
    let path = c
        .path
        .as_deref()
        .filter(|_| c.verdict == Verdict::Failed)
        .map(|p| format!(" [{p}]"))
        .unwrap_or_default();
    out.line(&format!(
        "{mark} {}: {}{path}",
        c.snapshot_id,
        c.details.join("; ")
    ));
}

fn failed(what: &str, fails: &[&history::SnapshotCheck]) -> EngineError {
    EngineError::Reported {
        message: format!(
            "{what} failed: {}",
            fails
                .iter()
                .map(|c| format!(
                    "{} ({}){}",
                    c.snapshot_id,
                    c.details.join("; "),
                    c.path.as_deref().map(|p| format!(" in {p}")).unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        hint: "restore the damaged file from another client or a backup; the repository's copy is .dsg/archive/ (or .dsg/last-sync.json for the head)".into(),
        code: 1,
    }
}

pub fn validate_snapshot(a: ValidateSnapshotCmd, out: &Out) -> Result<(), EngineError> {
    let project = open(out)?;
    let mut h = History::open(&project)?;
    let id = a.snapshot.unwrap_or_else(|| "head".into());
    let c = h.validate_snapshot(&id);
    notes(out, &h);
    h.close();
    let c = c?;
    let ok = c.verdict != Verdict::Failed;
    if out.json {
        out.json_doc(&json!({
            "status": if ok { "ok" } else { "error" },
            "command": "validate-snapshot",
            "snapshot": c,
        }));
    } else {
        print_check(out, &c);
    }
    if ok {
        Ok(())
    } else {
        Err(failed("validate-snapshot", &[&c]))
    }
}

pub fn validate_chain(out: &Out) -> Result<(), EngineError> {
    let project = open(out)?;
    let mut h = History::open(&project)?;
    let r = h.validate_chain();
    h.close();
    let r = r?;
    let ids = |v: Verdict| {
        r.checks
            .iter()
            .filter(|c| c.verdict == v)
            .map(|c| c.snapshot_id.clone())
            .collect::<Vec<_>>()
    };
    let fails: Vec<_> = r.failures().collect();
    if out.json {
        out.json_doc(&json!({
            "status": if fails.is_empty() { "ok" } else { "error" },
            "command": "validate-chain",
            "verified": ids(Verdict::Verified),
            "index_only": ids(Verdict::IndexOnly),
            "failed": ids(Verdict::Failed),
            "snapshots": r.checks,
            "notes": r.notes,
        }));
    } else {
        for c in &r.checks {
            print_check(out, c);
        }
        for n in &r.notes {
            out.line(&format!("note: {n}"));
        }
        let (v, i) = (ids(Verdict::Verified), ids(Verdict::IndexOnly));
        out.summary(&format!(
            "{}: {} verified{}{}{}",
            count(r.checks.len() as u64, "snapshot"),
            v.len(),
            if i.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} checked from the index only ({})",
                    i.len(),
                    i.join(", ")
                )
            },
            if fails.is_empty() {
                String::new()
            } else {
                format!(", {} FAILED", fails.len())
            },
            out.took()
        ));
    }
    if fails.is_empty() {
        Ok(())
    } else {
        Err(failed("validate-chain", &fails))
    }
}
