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
    crate::human::bytes(bytes)
}

fn items(n: usize) -> String {
    crate::human::count(n as u64, "item")
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
                "  - {}  ({} {}, {})",
                i.path,
                i.target.as_str(),
                i.kind,
                mb(i.bytes)
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
            out.line(&format!("Would clean {}:", items(n)));
            list(&plan.items);
            out.line(&format!("Total: {}", mb(plan.bytes)));
            out.line("Run with --no-dry-run to remove them.");
        }
        return Ok(());
    }
    if !a.force {
        if !std::io::stdin().is_terminal() {
            return Err(EngineError::State {
                message: format!(
                    "not removing {} ({}) without confirmation: there is no terminal to ask on; nothing was removed",
                    items(n),
                    mb(plan.bytes)
                ),
                hint: "pass --force to remove them without asking (see the list with `dsg clean`)"
                    .into(),
            });
        }
        if !out.json {
            out.line(&format!("Would clean {}:", items(n)));
            list(&plan.items);
        }
        let answer = crate::prompt(
            &format!("Delete {} ({})? [y/N]", items(n), mb(plan.bytes)),
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
        out.line(&format!("Cleaned {}:", items(done.removed.len())));
        list(&done.removed);
        out.line(&format!("Freed {}{}", mb(done.bytes_freed), out.took()));
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

#[derive(Args)]
pub struct ListReposCmd {
    /// The host (localhost or an ssh host); default: default_host of your dsg.yml, else localhost
    #[arg(long)]
    host: Option<String>,
    /// The directory holding the repositories; default: default_project_path of your dsg.yml
    #[arg(long)]
    repo_path: Option<std::path::PathBuf>,
    /// List the repositories in an object store instead (with --bucket)
    #[arg(long, conflicts_with_all = ["host", "repo_path"], requires = "bucket")]
    endpoint: Option<String>,
    /// The bucket (with --endpoint)
    #[arg(long, requires = "endpoint")]
    bucket: Option<String>,
    /// The key prefix the repositories are under (with --endpoint)
    #[arg(long, requires = "endpoint")]
    prefix: Option<String>,
    /// The store's region (with --endpoint; default AWS_REGION, else us-east-1)
    #[arg(long, requires = "endpoint")]
    region: Option<String>,
}

pub fn cmd_list_repos(a: ListReposCmd, out: &Out) -> Result<(), EngineError> {
    if let (Some(endpoint), Some(bucket)) = (a.endpoint, a.bucket) {
        let loc = dsg_core::config::S3Location {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            bucket,
            prefix: a.prefix.unwrap_or_default().trim_matches('/').to_string(),
            region: a.region,
        };
        let repos = dsg_sync::repos::list_s3(&loc)?;
        if out.json {
            out.json_doc(&json!({"status": "ok", "command": "list-repos", "result": {
                "endpoint": loc.endpoint, "bucket": loc.bucket, "prefix": loc.prefix,
                "repositories": repos}}));
            return Ok(());
        }
        let at = format!("s3://{}/{} at {}", loc.bucket, loc.prefix, loc.endpoint);
        return print_repos(out, &at, &repos);
    }
    let Some(loc) = dsg_sync::repos::location(a.host, a.repo_path)? else {
        if out.json {
            out.json_doc(&json!({"status": "ok", "command": "list-repos", "result": {
                "host": null, "path": null, "repositories": []}}));
        } else {
            out.line("No repositories configured for discovery.");
            out.line("Set default_project_path (and default_host) in your dsg.yml, or pass --repo-path (and --host).");
        }
        return Ok(());
    };
    let repos = dsg_sync::repos::list(&loc)?;
    let path = loc.path.display().to_string();
    if out.json {
        out.json_doc(&json!({"status": "ok", "command": "list-repos", "result": {
            "host": loc.host, "path": path, "repositories": repos}}));
        return Ok(());
    }
    print_repos(out, &format!("{}:{path}", loc.host), &repos)
}

/// The table of `list-repos`.
fn print_repos(out: &Out, at: &str, repos: &[dsg_repo::list::RepoInfo]) -> Result<(), EngineError> {
    out.line(&format!("dsg Repositories at {at}"));
    if repos.is_empty() {
        out.line("No repositories found.");
        return Ok(());
    }
    let dash = || "-".to_string();
    let rows: Vec<[String; 6]> = repos
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.kind.clone(),
                r.snapshot_id
                    .clone()
                    .unwrap_or_else(|| match r.status.as_str() {
                        "error" => "Error".into(),
                        _ => "None".into(),
                    }),
                r.timestamp.as_deref().map(short_time).unwrap_or_else(dash),
                r.size.map(|b| b.to_string()).unwrap_or_else(dash),
                r.file_count.map(|n| n.to_string()).unwrap_or_else(dash),
            ]
        })
        .collect();
    let head = [
        "Repository",
        "Type",
        "HEAD",
        "Timestamp",
        "Size (bytes)",
        "Files",
    ];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let fmt = |cells: [&str; 6]| {
        cells
            .iter()
            .zip(width)
            .enumerate()
            .map(|(i, (c, w))| {
                if i >= 4 {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    out.line(&fmt(head));
    for r in &rows {
        out.line(&fmt([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]));
    }
    for r in repos.iter().filter(|r| r.error.is_some()) {
        out.line(&format!(
            "  {}: {}",
            r.name,
            r.error.as_deref().unwrap_or_default()
        ));
    }
    let count = |s: &str| repos.iter().filter(|r| r.status == s).count();
    let mut parts = vec![format!("Found {} repositories", repos.len())];
    for (n, label) in [
        (count("active"), "active"),
        (count("uninitialized"), "uninitialized"),
        (count("error"), "with errors"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {label}"));
        }
    }
    out.line(&parts.join(" - "));
    Ok(())
}

/// `YYYY-MM-DD HH:MM` of a manifest's `created_at` (kept as is when it
/// has another shape).
fn short_time(t: &str) -> String {
    match (t.get(..10), t.get(10..11), t.get(11..16)) {
        (Some(d), Some("T"), Some(hm)) => format!("{d} {hm}"),
        _ => t.to_string(),
    }
}
