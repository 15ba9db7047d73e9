//! `snapfetch` and `validate-snapshot --deep`: old snapshots read through
//! the repository (`dsg_sync::snapshots`).

use std::path::{Component, Path, PathBuf};

use clap::Args;
use dsg_sync::snapshots::{self, Dest, FetchOpts, Which};
use dsg_sync::EngineError;
use serde_json::json;

use crate::output::{Out, TermReporter};

#[derive(Args)]
pub struct SnapfetchCmd {
    /// The file, as a path in the project (relative to the current directory)
    file: PathBuf,
    /// The snapshot: s<N>, or head (the repository's newest)
    #[arg(long, conflicts_with = "num")]
    snapshot: Option<String>,
    /// The N-th newest snapshot: 1 is the head (the default), 2 the one before it
    #[arg(short = 'n', long = "num", value_name = "N")]
    num: Option<u64>,
    /// Where to write: a file, a directory (its name is kept), or - for
    /// stdout. Default: the file's name in the current directory
    #[arg(short, long, value_name = "OUT")]
    output: Option<PathBuf>,
    /// Replace the output file if it exists
    #[arg(long)]
    force: bool,
    /// Say what would be fetched; write nothing
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
pub struct ValidateDeepCmd {
    /// The snapshot: s<N> or head; default: the last sync (with --deep: the repository's head)
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Re-hash every file of the snapshot on the repository host
    #[arg(long)]
    pub deep: bool,
}

/// `path` relative to the project root, lexically (the file may not exist
/// here any more): `cwd` joined, `.` and `..` resolved.
fn project_relative(root: &Path, cwd: &Path, path: &Path) -> Result<String, EngineError> {
    let mut abs = PathBuf::new();
    for c in cwd.join(path).components() {
        match c {
            Component::ParentDir => {
                abs.pop();
            }
            Component::CurDir => {}
            other => abs.push(other),
        }
    }
    let rel = abs.strip_prefix(root).map_err(|_| {
        EngineError::Usage(format!(
            "{} is outside the project {}",
            path.display(),
            root.display()
        ))
    })?;
    let rel = rel.to_string_lossy().to_string();
    if rel.is_empty() {
        return Err(EngineError::Usage(format!(
            "{} is the project itself; name a file",
            path.display()
        )));
    }
    Ok(rel)
}

pub fn cmd_snapfetch(a: SnapfetchCmd, out: &Out) -> Result<(), EngineError> {
    let which = match (&a.snapshot, a.num) {
        (Some(s), _) => Which::parse(s)?,
        (None, Some(k)) => Which::Newest(k),
        (None, None) => Which::Head,
    };
    let (project, mut client) = crate::open_connected()?;
    let cwd = crate::cwd()?;
    let file = project_relative(&project.root, &cwd, &a.file)?;
    let base = Path::new(&file)
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_default();
    let dest = match &a.output {
        Some(o) if o.as_os_str() == "-" => {
            if out.json {
                return Err(EngineError::Usage(
                    "-o - writes the file to stdout, where --json writes its document: choose one"
                        .into(),
                ));
            }
            Dest::Stdout
        }
        Some(o) => {
            let o = cwd.join(o);
            if o.is_dir() {
                Dest::File(o.join(&base))
            } else {
                Dest::File(o)
            }
        }
        None => Dest::File(cwd.join(&base)),
    };
    let reporter = TermReporter::new(out);
    let report = snapshots::snapfetch(
        &project,
        &mut client,
        &FetchOpts {
            file,
            which,
            dest: dest.clone(),
            force: a.force,
            dry_run: a.dry_run,
        },
        &reporter,
    )?;
    let _ = client.close();
    if out.json {
        out.json_doc(&json!({"status": "ok", "command": "snapfetch", "result": report}));
        return Ok(());
    }
    let text = format!(
        "{} {} of {} ({}, xxh3 {}) {} {}",
        if report.dry_run {
            "Would fetch"
        } else {
            "Fetched"
        },
        report.file,
        report.snapshot_id,
        crate::human::bytes(report.size),
        report.hash,
        if report.replaced { "replacing" } else { "to" },
        report.output
    );
    match dest {
        // stdout holds the file's bytes: the message goes to stderr.
        Dest::Stdout if !out.quiet => eprintln!("{text}"),
        Dest::Stdout => {}
        Dest::File(_) => out.line(&text),
    }
    Ok(())
}

/// `validate-snapshot --deep`: the repository host re-hashes the
/// snapshot's bytes. Exits 1 naming the snapshot and each bad path.
pub fn cmd_validate_deep(a: ValidateDeepCmd, out: &Out) -> Result<(), EngineError> {
    let which = match &a.snapshot {
        Some(s) => Which::parse(s)?,
        None => Which::Head,
    };
    let (project, mut client) = crate::open_connected()?;
    let reporter = TermReporter::new(out);
    let r = snapshots::deep_validate(&project, &mut client, &which, &reporter)?;
    let _ = client.close();
    if out.json {
        out.json_doc(&json!({
            "status": if r.ok { "ok" } else { "failed" },
            "command": "validate-snapshot",
            "deep": true,
            "result": r,
        }));
    } else {
        for p in &r.problems {
            let at = if p.path.is_empty() {
                "(manifest)"
            } else {
                &p.path
            };
            out.line(&format!("✗ {}: {at}: {}", r.snapshot_id, p.problem));
        }
        if r.problem_count as usize > r.problems.len() {
            out.line(&format!(
                "… and {} more",
                r.problem_count as usize - r.problems.len()
            ));
        }
        if r.ok {
            out.summary(&format!(
                "✓ {}: {} ({}) re-hashed on the repository host match the manifest{}",
                r.snapshot_id,
                crate::human::count(r.files, "file"),
                crate::human::bytes(r.bytes),
                out.took()
            ));
        }
    }
    if r.ok {
        return Ok(());
    }
    let first = r
        .problems
        .iter()
        .map(|p| {
            if p.path.is_empty() {
                format!("its manifest: {}", p.problem)
            } else {
                format!("{}: {}", p.path, p.problem)
            }
        })
        .next()
        .unwrap_or_default();
    Err(EngineError::Reported {
        message: format!(
            "snapshot {} failed deep validation ({}): {first}",
            r.snapshot_id,
            crate::human::count(r.problem_count, "problem")
        ),
        hint: "the repository's stored bytes differ from what the snapshot recorded; restore them from a backup or another client's copy".into(),
        code: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_made_project_relative_lexically() {
        let root = Path::new("/p");
        let rel = |cwd: &str, f: &str| project_relative(root, Path::new(cwd), Path::new(f));
        assert_eq!(rel("/p", "input/a.txt").unwrap(), "input/a.txt");
        assert_eq!(rel("/p/input", "a.txt").unwrap(), "input/a.txt");
        assert_eq!(rel("/p/input", "./../output/b").unwrap(), "output/b");
        assert!(rel("/p", "../q/a").is_err());
        assert!(rel("/p", ".").is_err());
    }
}
