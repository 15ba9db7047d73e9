//! Maintenance and discovery: `clean` (`dsg_sync::clean`) and `list-repos`
//! (`dsg_sync::repos`).

use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use dsg_sync::clean::{self, Target};
use dsg_sync::{EngineError, Project};
use serde_json::json;

use crate::output::Out;

#[derive(Clone, Copy, ValueEnum)]
pub enum CleanTarget {
    Cache,
    Temp,
    Backups,
    All,
}

#[derive(Args)]
pub struct CleanCmd {
    /// What to remove: cache (derived caches), temp (leftovers of dead
    /// commands), backups (conflict backups in the data folders), all
    #[arg(long, value_enum, default_value_t = CleanTarget::All)]
    target: CleanTarget,
    /// List what would be removed, with sizes; remove nothing (the default)
    #[arg(long, overrides_with = "no_dry_run")]
    dry_run: bool,
    /// Remove (asks first on a terminal, unless --force)
    #[arg(long, overrides_with = "dry_run")]
    no_dry_run: bool,
    /// With --no-dry-run: do not ask
    #[arg(long)]
    force: bool,
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_000_000.0)
}

pub fn cmd_clean(a: CleanCmd, out: &Out) -> Result<(), EngineError> {
    let cwd = std::env::current_dir().map_err(|e| EngineError::io(".", e))?;
    let project = Project::find(&cwd)?;
    let targets: Vec<Target> = match a.target {
        CleanTarget::Cache => vec![Target::Cache],
        CleanTarget::Temp => vec![Target::Temp],
        CleanTarget::Backups => vec![Target::Backups],
        CleanTarget::All => Target::ALL.to_vec(),
    };
    let target_name = match a.target {
        CleanTarget::All => "all",
        _ => targets[0].as_str(),
    };
    let dry_run = !a.no_dry_run;
    let plan = clean::plan(&project, &targets)?;
    let doc = |status: &str, items: &[clean::Item], bytes: u64, errors: &[clean::Failure]| {
        json!({
            "status": "ok",
            "command": "clean",
            "result": {
                "operation": "clean",
                "status": status,
                "target": target_name,
                "dry_run": dry_run,
                "items": items,
                "bytes": bytes,
                "errors": errors,
            }
        })
    };
    let list = |items: &[clean::Item]| {
        for i in items {
            out.line(&format!(
                "  - {}  ({} {}, {} bytes)",
                i.path,
                i.target.as_str(),
                i.kind,
                i.bytes
            ));
        }
    };
    if plan.items.is_empty() {
        if out.json {
            out.json_doc(&doc(
                if dry_run { "dry_run" } else { "success" },
                &[],
                0,
                &[],
            ));
        } else {
            out.line("Nothing to clean");
        }
        return Ok(());
    }
    let n = plan.items.len();
    if dry_run {
        if out.json {
            out.json_doc(&doc("dry_run", &plan.items, plan.bytes, &[]));
        } else {
            out.line("DRY RUN MODE - No changes will be made");
            out.line(&format!("Would clean {n} items:"));
            list(&plan.items);
            out.line(&format!("Total: {} bytes ({})", plan.bytes, mb(plan.bytes)));
            out.line("Run with --no-dry-run to remove them.");
        }
        return Ok(());
    }
    if !a.force {
        if !std::io::stdin().is_terminal() {
            return Err(EngineError::State {
                message: format!(
                    "not removing {n} items ({}) without confirmation: there is no terminal to ask on; nothing was removed",
                    mb(plan.bytes)
                ),
                hint: "pass --force to remove them without asking (see the list with `dsg clean`)"
                    .into(),
            });
        }
        if !out.json {
            out.line(&format!("Would clean {n} items:"));
            list(&plan.items);
        }
        let answer = crate::prompt(
            &format!("Delete {n} items ({})? [y/N]", mb(plan.bytes)),
            None,
        )?;
        if !matches!(answer.to_ascii_lowercase().as_str(), "y" | "yes") {
            if out.json {
                out.json_doc(&doc("cancelled", &[], 0, &[]));
            } else {
                out.line("Clean operation cancelled");
            }
            return Ok(());
        }
    }
    let done = clean::execute(&project, &plan)?;
    let status = if done.errors.is_empty() {
        "success"
    } else {
        "partial_success"
    };
    if out.json {
        out.json_doc(&doc(status, &done.removed, done.bytes_freed, &done.errors));
    } else {
        out.line(&format!("Cleaned {} items:", done.removed.len()));
        list(&done.removed);
        out.line(&format!(
            "Freed {} bytes ({})",
            done.bytes_freed,
            mb(done.bytes_freed)
        ));
    }
    if done.errors.is_empty() {
        return Ok(());
    }
    let text = done
        .errors
        .iter()
        .map(|f| format!("  {}: {}", f.path, f.error))
        .collect::<Vec<_>>()
        .join("\n");
    let message = format!(
        "cleaned {} items with {} errors:\n{text}",
        done.removed.len(),
        done.errors.len()
    );
    if out.json {
        return Err(EngineError::Reported {
            message,
            hint: "check the permissions of the paths named".into(),
            code: 1,
        });
    }
    Err(EngineError::State {
        message,
        hint: "check the permissions of the paths named".into(),
    })
}
