//! Settling path names before a scan is trusted: invalid names block, or
//! with `--normalize` are renamed. Shared by `init` and `sync`.

use dsg_core::names::{apply_normalization, plan_normalization, NormalizePlan, Rename};
use dsg_core::scan::{Problem, ProblemKind};

use crate::{EngineError, Project, Result};

#[derive(Debug, serde::Serialize)]
pub struct RenameOut {
    pub from: String,
    pub to: String,
}

impl From<&Rename> for RenameOut {
    fn from(r: &Rename) -> Self {
        RenameOut {
            from: r.from.clone(),
            to: r.to.clone(),
        }
    }
}

/// With `normalize`, plans (and unless `dry_run`, applies) renames for
/// invalid names among `paths`; returns them. A caller that gets renames
/// back (not in a dry run) must scan again, then call `block_on_problems`.
/// Without `normalize`, any problem blocks.
pub fn settle_names(
    project: &Project,
    problems: &[Problem],
    paths: impl Iterator<Item = String>,
    normalize: bool,
    dry_run: bool,
    verb: &str,
) -> Result<Vec<RenameOut>> {
    let has_name_problems = problems.iter().any(|p| p.kind == ProblemKind::Name);
    if !(has_name_problems && normalize) {
        block_on_problems(problems, verb)?;
        return Ok(Vec::new());
    }
    let mut all: Vec<String> = paths.collect();
    all.extend(problems.iter().map(|p| p.path.clone()));
    let plan: NormalizePlan = plan_normalization(&all);
    if !plan.conflicts.is_empty() || !plan.unfixable.is_empty() {
        let mut paths: Vec<String> = Vec::new();
        let mut lines = Vec::new();
        for (p, why) in plan.conflicts.iter().chain(plan.unfixable.iter()) {
            lines.push(format!("  {p}: {why}"));
            paths.push(p.clone());
        }
        return Err(EngineError::Blocked {
            message: format!(
                "{verb} blocked: {} cannot be normalized automatically:\n{}",
                crate::sync::plural(paths.len(), "path"),
                lines.join("\n")
            ),
            hint: format!("rename them by hand; {}", ignore_hint(&paths[0])),
            paths,
        });
    }
    let renames: Vec<RenameOut> = plan.renames.iter().map(RenameOut::from).collect();
    if dry_run {
        // Problems the plan does not fix still block, even in a preview.
        let other: Vec<Problem> = problems
            .iter()
            .filter(|p| p.kind != ProblemKind::Name)
            .cloned()
            .collect();
        block_on_problems(&other, verb)?;
        return Ok(renames);
    }
    apply_normalization(&project.root, &plan).map_err(|e| EngineError::State {
        message: format!("normalization stopped: {e}"),
        hint: "fix the path by hand and run the command again".into(),
    })?;
    Ok(renames)
}

/// Invalid names, unsafe links and unreadable files block (exit 3).
pub fn block_on_problems(problems: &[Problem], verb: &str) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    let paths: Vec<String> = problems.iter().map(|p| p.path.clone()).collect();
    let lines: Vec<String> = problems
        .iter()
        .take(20)
        .map(|p| format!("  {}: {}", p.path, p.message))
        .collect();
    let more = if paths.len() > 20 {
        format!("\n  … and {} more", paths.len() - 20)
    } else {
        String::new()
    };
    let fixable = problems.iter().any(|p| p.kind == ProblemKind::Name);
    let fix = if fixable {
        "run with --normalize to rename invalid names (add --dry-run to preview), or fix them by hand"
    } else {
        "fix these paths by hand (links must be relative and stay inside the project)"
    };
    let hint = format!("{fix}; {}", ignore_hint(&paths[0]));
    Err(EngineError::Blocked {
        message: format!(
            "{verb} blocked: {} cannot be synced:\n{}{more}",
            crate::sync::plural(paths.len(), "path"),
            lines.join("\n"),
        ),
        hint,
        paths,
    })
}

/// How to leave a path out of every sync instead of fixing it.
pub fn ignore_hint(path: &str) -> String {
    format!(
        "or leave a path out of the sync with ignore.paths in .dsgconfig.yml, e.g. \
         dsg config set --project --add ignore.paths {}",
        shell_quote(path)
    )
}

/// `s` as one shell word.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-' | '+' | ','));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
