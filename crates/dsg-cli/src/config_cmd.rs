//! `dsg config`: read and change the user's and the project's settings.
//! The work (what a key means, where it is written, the checks before a
//! file is replaced) is `dsg_core::config_edit`'s.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use dsg_core::config::{self, ConfigError, PROJECT_CONFIG};
use dsg_core::config_edit::{self as edit, Change, Entry, Scope};
use dsg_sync::EngineError;
use serde_json::{json, Value};

use crate::output::Out;

#[derive(Args)]
pub struct ConfigCmd {
    #[command(subcommand)]
    action: Action,
}

/// Which file: by default the key's own (user keys in your dsg.yml,
/// project keys in .dsgconfig.yml).
#[derive(Args, Clone, Copy)]
struct Which {
    /// Your user config (dsg.yml): the highest-priority one is written
    #[arg(long, conflicts_with = "project")]
    user: bool,
    /// The project's .dsgconfig.yml (found from the current directory up)
    #[arg(long)]
    project: bool,
}

impl Which {
    fn scope(self) -> Option<Scope> {
        match (self.user, self.project) {
            (true, _) => Some(Scope::User),
            (_, true) => Some(Scope::Project),
            _ => None,
        }
    }
}

#[derive(Subcommand)]
enum Action {
    /// Print a setting's value (a list: one item per line)
    Get {
        #[command(flatten)]
        which: Which,
        /// The key, e.g. user_id, ignore.paths, remote_dsg.myserver
        key: String,
    },
    /// Set a setting (checked, and the file re-read, before it is replaced)
    Set {
        #[command(flatten)]
        which: Which,
        /// Add the values to the list (the list in effect, defaults included)
        #[arg(long, conflicts_with = "remove")]
        add: bool,
        /// Remove the values from the list
        #[arg(long)]
        remove: bool,
        /// The key, e.g. user_name, max_delete, ignore.paths
        key: String,
        /// The value; lists (data_dirs, ignore.*) take several
        #[arg(required = true, num_args = 1..)]
        values: Vec<String>,
    },
    /// Remove a setting from its file (the default applies again)
    Unset {
        #[command(flatten)]
        which: Which,
        key: String,
    },
    /// Every setting in effect and the file it comes from
    List {
        #[command(flatten)]
        which: Which,
    },
    /// The keys dsg config knows
    Keys,
}

fn usage(e: ConfigError) -> EngineError {
    match e {
        ConfigError::BadValue { .. } => EngineError::Usage(e.to_string()),
        e => e.into(),
    }
}

/// The key's scope, checked against --user/--project.
fn scope_of(key: &str, which: Which) -> Result<Scope, EngineError> {
    match (edit::key_info(key), which.scope()) {
        (Some((s, _)), None) => Ok(s),
        (Some((s, _)), Some(w)) if s == w => Ok(s),
        (_, w) => Err(EngineError::Usage(edit::unknown_key(key, w))),
    }
}

fn project_file() -> Result<PathBuf, EngineError> {
    let cwd = std::env::current_dir().map_err(|e| EngineError::io(".", e))?;
    Ok(config::find_project_root(&cwd)?.join(PROJECT_CONFIG))
}

fn entries(scope: Option<Scope>) -> Result<Vec<Entry>, EngineError> {
    let mut out = Vec::new();
    if scope != Some(Scope::Project) {
        out.extend(edit::user_entries(&config::user_config_paths())?);
    }
    if scope != Some(Scope::User) {
        match project_file() {
            Ok(f) => out.extend(edit::project_entries(&f)?),
            // Outside a project, list shows the user settings only.
            Err(EngineError::Config(ConfigError::NoProject { .. })) if scope.is_none() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(show).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

fn from(e: &Entry) -> String {
    match &e.file {
        Some(f) => f.display().to_string(),
        None => "default".into(),
    }
}

pub fn cmd_config(c: ConfigCmd, out: &Out) -> Result<(), EngineError> {
    match c.action {
        Action::Get { which, key } => {
            let scope = scope_of(&key, which)?;
            let all = entries(Some(scope))?;
            let Some(e) = all.into_iter().find(|e| e.key == key) else {
                return Err(EngineError::Reported {
                    message: format!("{key} is not set"),
                    hint: format!("set it with: dsg config set {key} VALUE"),
                    code: 1,
                });
            };
            if out.json {
                out.json_doc(&json!({"status": "ok", "command": "config get", "result": e}));
            } else {
                match &e.value {
                    Value::Array(a) => a.iter().for_each(|x| println!("{}", show(x))),
                    v => println!("{}", show(v)),
                }
            }
            Ok(())
        }
        Action::List { which } => {
            let all = entries(which.scope())?;
            if out.json {
                out.json_doc(&json!({"status": "ok", "command": "config list", "settings": all}));
                return Ok(());
            }
            let w = all.iter().map(|e| e.key.len()).max().unwrap_or(0);
            for e in &all {
                out.line(&format!(
                    "{:<w$}  {}  ({})",
                    e.key,
                    match &e.value {
                        Value::Array(_) => format!("[{}]", show(&e.value)),
                        v => show(v),
                    },
                    from(e)
                ));
            }
            Ok(())
        }
        Action::Keys => {
            if out.json {
                let keys: Vec<_> = edit::KEYS
                    .iter()
                    .map(|(k, s, _, h)| json!({"key": k, "scope": s, "help": h}))
                    .collect();
                out.json_doc(&json!({"status": "ok", "command": "config keys", "keys": keys}));
                return Ok(());
            }
            let w = edit::KEYS.iter().map(|k| k.0.len()).max().unwrap_or(0);
            for (k, s, _, h) in edit::KEYS {
                let file = match s {
                    Scope::User => "dsg.yml",
                    Scope::Project => PROJECT_CONFIG,
                };
                out.line(&format!("{k:<w$}  {file:<14}  {h}"));
            }
            Ok(())
        }
        Action::Set {
            which,
            add,
            remove,
            key,
            values,
        } => {
            let change = if add {
                Change::Add(values)
            } else if remove {
                Change::Remove(values)
            } else {
                Change::Set(values)
            };
            apply(&key, which, change, out)
        }
        Action::Unset { which, key } => apply(&key, which, Change::Unset, out),
    }
}

fn apply(key: &str, which: Which, change: Change, out: &Out) -> Result<(), EngineError> {
    let scope = scope_of(key, which)?;
    let changes = [(key.to_string(), change.clone())];
    let plan = match scope {
        Scope::User => edit::plan_user(&config::user_config_paths(), &changes),
        Scope::Project => edit::plan_project(&project_file()?, &changes),
    }
    .map_err(usage)?;
    plan.write()?;
    let file = plan.file.display().to_string();
    let value = entries(Some(scope))?
        .into_iter()
        .find(|e| e.key == key)
        .map(|e| e.value);
    if out.json {
        out.json_doc(&json!({
            "status": "ok",
            "command": if change == Change::Unset { "config unset" } else { "config set" },
            "key": key,
            "value": value,
            "file": file,
            "changed": plan.changes(),
        }));
        return Ok(());
    }
    let now = value
        .as_ref()
        .map(|v| match v {
            Value::Array(_) => format!("[{}]", show(v)),
            v => show(v),
        })
        .unwrap_or_else(|| "not set".into());
    match (plan.changes(), &change) {
        (false, Change::Unset) => out.line(&format!("{key} is not set in {file}; nothing changed")),
        (false, _) => out.line(&format!(
            "{key} is already {now} in {file}; nothing changed"
        )),
        (true, Change::Unset) => out.line(&format!("removed {key} from {file} (now: {now})")),
        (true, _) => out.line(&format!("{key} = {now} (in {file})")),
    }
    Ok(())
}
