//! `dsg prune`: removes the data only old snapshots hold
//! (`dsg_sync::prune`; the repository decides, `dsg_repo::prune`).

use clap::Args;
use dsg_sync::prune::{self, PruneOpts};
use dsg_sync::EngineError;
use serde_json::json;

use crate::human::{self, count};
use crate::output::Out;

#[derive(Args)]
pub struct PruneCmd {
    /// Keep the N newest snapshots, the head included (at least 1: the head is never pruned)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    keep_last: u64,
    /// Also keep the snapshots made within this time (e.g. 30d, 12h, 2w, 1d12h)
    #[arg(long, value_name = "DURATION")]
    keep_within: Option<String>,
    /// Say what would be removed; change nothing
    #[arg(long)]
    dry_run: bool,
}

pub fn cmd_prune(a: PruneCmd, out: &Out) -> Result<(), EngineError> {
    let keep_within_secs = a
        .keep_within
        .as_deref()
        .map(prune::parse_duration)
        .transpose()?;
    let (project, mut client) = crate::open_connected()?;
    let r = prune::prune(
        &project,
        &mut client,
        &PruneOpts {
            keep_last: a.keep_last,
            keep_within_secs,
            dry_run: a.dry_run,
        },
    )?;
    let _ = client.close();
    if out.json {
        out.json_doc(&json!({"status": "ok", "command": "prune", "result": r}));
        return Ok(());
    }
    let verb = if r.dry_run { "Would prune" } else { "Pruned" };
    if r.pruned.is_empty() && r.objects == 0 && r.zfs_snapshots.is_empty() {
        out.summary(&format!(
            "Nothing to prune: keeping {} (head {})",
            r.kept.join(" "),
            r.head
        ));
    } else {
        if !r.pruned.is_empty() {
            out.line(&format!("{verb} {}", r.pruned.join(" ")));
        }
        out.summary(&format!(
            "{verb}: {}, {} ({}){}; kept {} (head {}){}",
            count(r.pruned.len() as u64, "snapshot"),
            count(r.objects, "object"),
            human::bytes(r.bytes),
            if r.zfs_snapshots.is_empty() {
                String::new()
            } else {
                format!(", zfs snapshots {}", r.zfs_snapshots.join(" "))
            },
            r.kept.join(" "),
            r.head,
            out.took()
        ));
    }
    if !r.in_use.is_empty() {
        out.note(&format!(
            "kept {} although old: a clone depends on {} (a snapshot being read or mounted); run prune again later",
            r.in_use.join(" "),
            if r.in_use.len() == 1 { "it" } else { "them" }
        ));
    }
    if r.dry_run {
        out.line("Dry run: nothing was changed.");
    }
    Ok(())
}
