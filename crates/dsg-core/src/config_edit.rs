//! Reading and changing single settings of the user's `dsg.yml` and the
//! project's `.dsgconfig.yml` (`dsg config`).
//!
//! A change is a line edit of the file: its other keys, comments and layout
//! stay. The edited text is then proved to mean exactly the old file plus
//! the change (parsed and compared) and checked with the real loaders
//! before it replaces the file atomically; anything else is refused and the
//! file is left as it was. Into `.dsgconfig.yml` go only keys the original
//! dsg accepts there.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::{
    self, normalize_email, parse_user_text, read_user_file, yaml_quote, ConfigError,
    DiscoveryDefaults, ProjectConfig, UserConfig, PROJECT_CONFIG,
};
use crate::yaml;

/// Which file a setting lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    User,
    Project,
}

/// The kind of value a key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Email,
    Bool,
    Percent,
    RepoType,
    List,
}

/// The keys `dsg config` knows: name, file, kind, one line of help.
/// `remote_dsg.<host>` stands for one entry per host.
pub const KEYS: &[(&str, Scope, Kind, &str)] = &[
    (
        "user_name",
        Scope::User,
        Kind::Text,
        "your name, recorded with every snapshot",
    ),
    ("user_id", Scope::User, Kind::Email, "your e-mail address"),
    (
        "backup_on_conflict",
        Scope::User,
        Kind::Bool,
        "keep your copy when a conflict takes the repository's (default true)",
    ),
    (
        "max_delete",
        Scope::User,
        Kind::Percent,
        "the mass-deletion guard's limit in percent (default 50; 100: off)",
    ),
    (
        "default_host",
        Scope::User,
        Kind::Text,
        "list-repos: the repository host (default localhost)",
    ),
    (
        "default_project_path",
        Scope::User,
        Kind::Text,
        "list-repos: the directory holding the repositories",
    ),
    (
        "remote_dsg.<host>",
        Scope::User,
        Kind::Text,
        "the path of dsg on an ssh host",
    ),
    (
        "name",
        Scope::Project,
        Kind::Text,
        "the repository (project) name",
    ),
    (
        "data_dirs",
        Scope::Project,
        Kind::List,
        "the directory names that are tracked",
    ),
    (
        "ignore.names",
        Scope::Project,
        Kind::List,
        "file or directory names never synced",
    ),
    (
        "ignore.suffixes",
        Scope::Project,
        Kind::List,
        "file-name suffixes never synced",
    ),
    (
        "ignore.paths",
        Scope::Project,
        Kind::List,
        "paths (files or directories) never synced",
    ),
    (
        "repository.type",
        Scope::Project,
        Kind::RepoType,
        "xfs, zfs or s3",
    ),
    (
        "repository.host",
        Scope::Project,
        Kind::Text,
        "localhost, or an ssh host",
    ),
    (
        "repository.mountpoint",
        Scope::Project,
        Kind::Text,
        "the directory holding the repository",
    ),
    (
        "repository.pool",
        Scope::Project,
        Kind::Text,
        "the ZFS pool (zfs only)",
    ),
    (
        "repository.endpoint",
        Scope::Project,
        Kind::Text,
        "the object store's URL, http(s)://host[:port] (s3 only)",
    ),
    (
        "repository.bucket",
        Scope::Project,
        Kind::Text,
        "the bucket (s3 only)",
    ),
    (
        "repository.prefix",
        Scope::Project,
        Kind::Text,
        "the key prefix repositories live under (s3 only; default none)",
    ),
    (
        "repository.region",
        Scope::Project,
        Kind::Text,
        "the store's region (s3 only; default AWS_REGION, else us-east-1)",
    ),
];

/// The known key `key` names (`remote_dsg.myhost` is `remote_dsg.<host>`).
pub fn key_info(key: &str) -> Option<(Scope, Kind)> {
    let pattern = match key.split_once('.') {
        Some(("remote_dsg", host)) if !host.is_empty() => "remote_dsg.<host>",
        _ => key,
    };
    KEYS.iter()
        .find(|(k, ..)| *k == pattern)
        .map(|(_, s, kind, _)| (*s, *kind))
}

fn usage(msg: String, hint: String) -> ConfigError {
    ConfigError::BadValue { msg, hint }
}

/// The error for a key `dsg config` does not know (or that does not belong
/// in the file asked for).
pub fn unknown_key(key: &str, scope: Option<Scope>) -> String {
    if key == "repository.remote_dsg" {
        return format!(
            "{key} is not written into {PROJECT_CONFIG}: the original dsg refuses unknown keys under \
             'repository'; the server's dsg belongs in your user config: \
             dsg config set --user remote_dsg.<host> PATH"
        );
    }
    let keys: Vec<&str> = KEYS
        .iter()
        .filter(|(_, s, ..)| scope.is_none_or(|sc| sc == *s))
        .map(|(k, ..)| *k)
        .collect();
    format!("unknown key {key:?}; the keys are: {}", keys.join(", "))
}

/// Where a value comes from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Entry {
    pub key: String,
    pub value: Value,
    pub scope: Scope,
    /// The file that sets it; `None`: dsg's default.
    pub file: Option<PathBuf>,
}

/// The user settings in effect, each with the file it comes from (the
/// last file with the key: files merge key by key). Values are checked as
/// the loaders check them; missing `user_name`/`user_id` are not an error
/// here (they are listed as missing by their absence).
pub fn user_entries(paths: &[PathBuf]) -> Result<Vec<Entry>, ConfigError> {
    let mut merged = Map::new();
    let mut from: Map<String, Value> = Map::new();
    let mut last = None;
    for (i, p) in paths.iter().enumerate() {
        if let Some(obj) = read_user_file(p, i == 0)? {
            for k in obj.keys() {
                from.insert(k.clone(), Value::String(p.display().to_string()));
            }
            merged.extend(obj);
            last = Some(p.clone());
        }
    }
    let Some(last) = last else {
        return Ok(Vec::new());
    };
    check_user_merged(&merged, &last)?;
    let mut out = Vec::new();
    for (k, v) in &merged {
        let file = from.get(k).and_then(Value::as_str).map(PathBuf::from);
        match (k.as_str(), v) {
            ("remote_dsg", Value::Object(m)) => {
                for (h, p) in m {
                    out.push(Entry {
                        key: format!("remote_dsg.{h}"),
                        value: p.clone(),
                        scope: Scope::User,
                        file: file.clone(),
                    });
                }
            }
            _ => out.push(Entry {
                key: k.clone(),
                value: v.clone(),
                scope: Scope::User,
                file,
            }),
        }
    }
    if !merged.contains_key("backup_on_conflict") {
        out.push(Entry {
            key: "backup_on_conflict".into(),
            value: Value::Bool(true),
            scope: Scope::User,
            file: None,
        });
    }
    Ok(out)
}

/// The loaders' checks of merged user keys, with stand-ins for the two
/// personal fields when they are missing (a file may be written one key at
/// a time).
fn check_user_merged(merged: &Map<String, Value>, last: &Path) -> Result<(), ConfigError> {
    let mut m = merged.clone();
    for (k, stand_in) in [("user_name", "x"), ("user_id", "x@example.org")] {
        if matches!(m.get(k), None | Some(Value::Null)) {
            m.insert(k.into(), Value::String(stand_in.into()));
        }
    }
    UserConfig::from_merged(&m, last, vec![last.to_path_buf()])?;
    DiscoveryDefaults::from_merged(&m, last)?;
    Ok(())
}

/// The project settings in effect (defaults included), from `file`.
pub fn project_entries(file: &Path) -> Result<Vec<Entry>, ConfigError> {
    let cfg = ProjectConfig::load(file)?;
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Io {
        file: file.to_path_buf(),
        source: e,
    })?;
    let raw = yaml::load(&text).map(|v| v.0).unwrap_or(Value::Null);
    let has = |k: &str| -> bool {
        let mut v = &raw;
        for part in k.split('.') {
            match v.get(part) {
                Some(x) => v = x,
                None => return false,
            }
        }
        true
    };
    let legacy = cfg.legacy_format;
    let mut out = Vec::new();
    for (k, s, ..) in KEYS {
        if *s != Scope::Project {
            continue;
        }
        let Some(value) = project_value(&cfg, k) else {
            continue;
        };
        let set_here = has(k)
            || (legacy && k.starts_with("repository."))
            || (k.starts_with("ignore.") || *k == "data_dirs") && has(&format!("project.{k}"));
        out.push(Entry {
            key: k.to_string(),
            value,
            scope: Scope::Project,
            file: (set_here || *k == "name").then(|| file.to_path_buf()),
        });
    }
    if let Some(config::RemoteDsg::Legacy(p)) = &cfg.repository.remote_dsg {
        out.push(Entry {
            key: "repository.remote_dsg".into(),
            value: Value::String(p.clone()),
            scope: Scope::Project,
            file: Some(file.to_path_buf()),
        });
    }
    Ok(out)
}

/// The value in effect of a project key.
fn project_value(cfg: &ProjectConfig, key: &str) -> Option<Value> {
    let list = |s: &std::collections::BTreeSet<String>| {
        Value::Array(s.iter().cloned().map(Value::String).collect())
    };
    let r = &cfg.repository;
    Some(match key {
        "name" => Value::String(cfg.name.clone()),
        "data_dirs" => list(&cfg.data_dirs),
        "ignore.names" => list(&cfg.ignore.names),
        "ignore.suffixes" => list(&cfg.ignore.suffixes),
        "ignore.paths" => list(&cfg.ignore.paths),
        "repository.type" => Value::String(r.kind.as_str().into()),
        "repository.host" => Value::String(r.host.clone()),
        "repository.mountpoint" => Value::String(r.mountpoint.display().to_string()),
        "repository.pool" => Value::String(r.pool.clone()?),
        "repository.endpoint" => Value::String(r.s3.as_ref()?.endpoint.clone()),
        "repository.bucket" => Value::String(r.s3.as_ref()?.bucket.clone()),
        "repository.prefix" => Value::String(r.s3.as_ref()?.prefix.clone()),
        "repository.region" => Value::String(r.s3.as_ref()?.region.clone()?),
        _ => return None,
    })
}

/// What to do to a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Set it to these values (one, except for lists).
    Set(Vec<String>),
    /// Add these to a list (the list in effect, defaults included).
    Add(Vec<String>),
    /// Remove these from a list.
    Remove(Vec<String>),
    Unset,
}

/// A checked change of one file, applied with [`Edit::write`] (also the
/// user config's `remote_dsg` change that `init --remote-dsg` prepares).
#[derive(Debug, Clone, PartialEq)]
pub struct Edit {
    /// The file as the user knows it.
    pub file: PathBuf,
    /// `None`: the file already says so.
    pub(crate) text: Option<String>,
    /// Where the bytes go (a symlink's target, so it stays a symlink).
    pub(crate) real: PathBuf,
    pub(crate) mode: Option<u32>,
}

/// A config file about to be edited: where its bytes really are (a
/// symlink's target), its text (empty when it does not exist yet and need
/// not) and its permission bits, which the edit keeps.
pub(crate) fn read_for_edit(
    file: &Path,
    must_exist: bool,
) -> Result<(PathBuf, String, Option<u32>), ConfigError> {
    let real = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    match std::fs::read_to_string(&real) {
        Ok(t) => {
            #[cfg(unix)]
            let mode = {
                use std::os::unix::fs::PermissionsExt;
                std::fs::metadata(&real)
                    .ok()
                    .map(|m| m.permissions().mode() & 0o7777)
            };
            #[cfg(not(unix))]
            let mode = None;
            Ok((real, t, mode))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
            Ok((real, String::new(), None))
        }
        Err(e) => Err(ConfigError::Io {
            file: file.to_path_buf(),
            source: e,
        }),
    }
}

impl Edit {
    pub fn changes(&self) -> bool {
        self.text.is_some()
    }

    /// Replaces the file atomically (temp file, fsync, rename), keeping its
    /// permissions (a user who made theirs private, it may hold
    /// passphrases, keeps it private); creates its directory if missing.
    pub fn write(&self) -> Result<(), ConfigError> {
        let Some(text) = &self.text else {
            return Ok(());
        };
        let io = |source| ConfigError::Io {
            file: self.file.clone(),
            source,
        };
        if let Some(dir) = self.real.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        crate::atomic::write_atomic(&self.real, text.as_bytes()).map_err(|e| io(e.source))?;
        #[cfg(unix)]
        if let Some(mode) = self.mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.real, std::fs::Permissions::from_mode(mode))
                .map_err(io)?;
        }
        Ok(())
    }
}

/// The user config file `dsg config set --user` writes: the
/// highest-priority one (the one that wins the merge), never under /etc.
pub fn user_target(paths: &[PathBuf]) -> Result<PathBuf, ConfigError> {
    paths
        .iter()
        .rev()
        .find(|p| !p.starts_with("/etc"))
        .cloned()
        .ok_or_else(|| ConfigError::NoUserConfig {
            looked: "HOME, XDG_CONFIG_HOME and DSG_CONFIG_HOME are all unset".into(),
        })
}

/// Plans `changes` to the user's own config (see [`user_target`]), checked
/// against the whole merged user config.
pub fn plan_user(paths: &[PathBuf], changes: &[(String, Change)]) -> Result<Edit, ConfigError> {
    let file = user_target(paths)?;
    for (key, _) in changes {
        match key_info(key) {
            Some((Scope::User, _)) => {}
            _ => return Err(usage(unknown_key(key, Some(Scope::User)), String::new())),
        }
    }
    let current = |key: &str| -> Result<Option<Value>, ConfigError> {
        Ok(user_entries(paths)?
            .into_iter()
            .find(|e| e.key == key && e.file.is_some())
            .map(|e| e.value))
    };
    let check = |text: &str| -> Result<(), ConfigError> {
        let mut merged = Map::new();
        let mut last = file.clone();
        for (i, p) in paths.iter().enumerate() {
            let obj = if *p == file {
                Some(parse_user_text(p, text, i == 0)?)
            } else {
                read_user_file(p, i == 0)?
            };
            if let Some(obj) = obj {
                merged.extend(obj);
                last = p.clone();
            }
        }
        check_user_merged(&merged, &last)
    };
    plan(&file, changes, &current, &check, false)
}

/// Plans `changes` to the project file `file`, checked with the project
/// loader; only keys the original dsg accepts are written.
pub fn plan_project(file: &Path, changes: &[(String, Change)]) -> Result<Edit, ConfigError> {
    for (key, _) in changes {
        match key_info(key) {
            Some((Scope::Project, _)) => {}
            _ => return Err(usage(unknown_key(key, Some(Scope::Project)), String::new())),
        }
    }
    let old = ProjectConfig::load(file)?;
    let current = |key: &str| Ok(project_value(&old, key));
    let check = |text: &str| -> Result<(), ConfigError> {
        let new = ProjectConfig::parse(text, file)?;
        // What was asked is what the loader now reads (the legacy layout's
        // `project:` section would override a top-level key, for one).
        for (key, change) in changes {
            if matches!(change, Change::Unset) {
                continue;
            }
            let want = wanted(key_info(key).map(|k| k.1), change, project_value(&old, key))?;
            if project_value(&new, key) != Some(want) {
                return Err(ConfigError::Invalid {
                    file: file.to_path_buf(),
                    msg: format!("setting {key} here would not take effect"),
                    hint: "another part of the file (a legacy 'project:' or 'transport:' section) \
                           overrides it; edit the file by hand"
                        .into(),
                });
            }
        }
        Ok(())
    };
    plan(file, changes, &current, &check, true)
}

/// The value a change asks for, given the value in effect.
fn wanted(
    kind: Option<Kind>,
    change: &Change,
    current: Option<Value>,
) -> Result<Value, ConfigError> {
    let kind = kind.unwrap_or(Kind::Text);
    let bad = |msg: String, hint: &str| usage(msg, hint.into());
    let one = |vals: &[String]| -> Result<String, ConfigError> {
        match vals {
            [v] => Ok(v.clone()),
            _ => Err(bad(
                format!("this key takes one value, got {}", vals.len()),
                "quote a value that has spaces",
            )),
        }
    };
    let list_of = |v: Option<Value>| -> Vec<String> {
        v.and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect()
    };
    match (kind, change) {
        (Kind::List, Change::Set(v)) => Ok(Value::Array(
            dedup(v.clone()).into_iter().map(Value::String).collect(),
        )),
        (Kind::List, Change::Add(v)) => {
            let mut l = list_of(current);
            l.extend(v.iter().cloned());
            Ok(Value::Array(
                dedup(l).into_iter().map(Value::String).collect(),
            ))
        }
        (Kind::List, Change::Remove(v)) => {
            let l = list_of(current);
            if let Some(missing) = v.iter().find(|x| !l.contains(x)) {
                return Err(bad(
                    format!("{missing:?} is not in the list"),
                    "see the list with 'dsg config get KEY'",
                ));
            }
            Ok(Value::Array(
                l.into_iter()
                    .filter(|x| !v.contains(x))
                    .map(Value::String)
                    .collect(),
            ))
        }
        (_, Change::Add(_) | Change::Remove(_)) => Err(bad(
            "--add and --remove work on lists only".into(),
            "lists: data_dirs, ignore.names, ignore.suffixes, ignore.paths",
        )),
        (Kind::Bool, Change::Set(v)) => match one(v)?.as_str() {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            other => Err(bad(
                format!("{other:?} is not true or false"),
                "use true or false",
            )),
        },
        (Kind::Percent, Change::Set(v)) => {
            let s = one(v)?;
            match s.parse::<u8>() {
                Ok(n) if n <= 100 => Ok(Value::from(n)),
                _ => Err(bad(
                    format!("{s:?} is not a whole percentage from 0 to 100"),
                    "e.g. 50 (the default; 100 turns the mass-deletion guard off)",
                )),
            }
        }
        (Kind::Email, Change::Set(v)) => {
            let s = one(v)?;
            normalize_email(&s).map_err(|why| {
                bad(
                    format!("user_id {s:?}: {why}"),
                    "user_id must be an e-mail address such as you@example.org",
                )
            })?;
            Ok(Value::String(s.trim().to_string()))
        }
        (Kind::RepoType, Change::Set(v)) => {
            let s = one(v)?;
            match s.as_str() {
                "xfs" | "zfs" | "s3" => Ok(Value::String(s)),
                _ => Err(bad(
                    format!("{s:?} is not a repository type"),
                    "use xfs, zfs or s3",
                )),
            }
        }
        (Kind::Text, Change::Set(v)) => Ok(Value::String(one(v)?)),
        (_, Change::Unset) => Ok(Value::Null),
    }
}

fn dedup(v: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for x in v {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

type Current<'a> = dyn Fn(&str) -> Result<Option<Value>, ConfigError> + 'a;
type Check<'a> = dyn Fn(&str) -> Result<(), ConfigError> + 'a;

/// The edit of `file` for `changes`: line edits, proved to mean the old
/// file plus the changes, then checked with `check` (the real loader).
fn plan(
    file: &Path,
    changes: &[(String, Change)],
    current: &Current,
    check: &Check,
    must_exist: bool,
) -> Result<Edit, ConfigError> {
    let (real, old, mode) = read_for_edit(file, must_exist)?;
    let parsed = |t: &str| -> Result<Map<String, Value>, ConfigError> {
        match yaml::load(t) {
            Ok((Value::Object(m), _)) => Ok(m),
            Ok((Value::Null, _)) => Ok(Map::new()),
            Ok(_) => Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                msg: "the file is not a mapping of keys".into(),
                hint: "fix it by hand first".into(),
            }),
            Err(e) => Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                msg: format!("not valid YAML: {e}"),
                hint: "fix it by hand first".into(),
            }),
        }
    };
    let mut expected = parsed(&old)?;
    let mut text = old.clone();
    for (key, change) in changes {
        let kind = key_info(key).map(|k| k.1);
        let value = match change {
            Change::Unset => None,
            c => Some(wanted(kind, c, current(key)?)?),
        };
        let path: Vec<&str> = match key.split_once('.') {
            Some((a, b)) => vec![a, b],
            None => vec![key.as_str()],
        };
        set_in(&mut expected, &path, value.clone());
        let rendered = value.as_ref().map(render);
        text = edit_text(&text, &path, rendered.as_deref(), &expected).ok_or_else(|| {
            ConfigError::Invalid {
                file: file.to_path_buf(),
                msg: format!("cannot change {key} in this file safely (its layout is unusual)"),
                hint: "edit it by hand".into(),
            }
        })?;
    }
    if text == old {
        return Ok(Edit {
            file: file.to_path_buf(),
            text: None,
            real,
            mode,
        });
    }
    if parsed(&text).ok() != Some(expected) {
        return Err(ConfigError::Invalid {
            file: file.to_path_buf(),
            msg: "cannot change this file safely (its layout is unusual)".into(),
            hint: "edit it by hand".into(),
        });
    }
    check(&text)?;
    Ok(Edit {
        file: file.to_path_buf(),
        text: Some(text),
        real,
        mode,
    })
}

/// Sets (or with `None` removes) `path` in `m`; an emptied parent goes too.
fn set_in(m: &mut Map<String, Value>, path: &[&str], value: Option<Value>) {
    match path {
        [k] => {
            match value {
                Some(v) => m.insert(k.to_string(), v),
                None => m.remove(*k),
            };
        }
        [p, k] => {
            let entry = m
                .entry(p.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            let child = entry.as_object_mut().expect("object");
            match value {
                Some(v) => {
                    child.insert(k.to_string(), v);
                }
                None => {
                    child.remove(*k);
                    if child.is_empty() {
                        m.remove(*p);
                    }
                }
            }
        }
        _ => unreachable!("keys have one or two parts"),
    }
}

/// A value as YAML: strings always quoted, lists in flow style.
fn render(v: &Value) -> String {
    match v {
        Value::String(s) => yaml_quote(s),
        Value::Array(a) => format!("[{}]", a.iter().map(render).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// The key a top-level (`indent` 0) or nested line starts with, if any.
fn line_key(line: &str, indent: usize) -> Option<(String, &str)> {
    let body = line.strip_prefix(&" ".repeat(indent))?;
    if body.starts_with([' ', '\t', '#', '-']) || body.trim().is_empty() {
        return None;
    }
    let (key, rest) = if let Some(q) = body.strip_prefix('"') {
        let end = q.find('"')?;
        (q[..end].to_string(), q[end + 1..].trim_start())
    } else if let Some(q) = body.strip_prefix('\'') {
        let end = q.find('\'')?;
        (q[..end].to_string(), q[end + 1..].trim_start())
    } else {
        let end = body.find(':')?;
        (body[..end].trim_end().to_string(), &body[end..])
    };
    let rest = rest.strip_prefix(':')?;
    if !(rest.is_empty() || rest.starts_with([' ', '\t', '\n', '\r'])) {
        return None;
    }
    Some((key, rest))
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// The end of the block that starts at line `i` (exclusive): the lines
/// after it indented deeper than `indent`, up to the last such non-blank one.
fn block_end(lines: &[String], i: usize, indent: usize) -> usize {
    let mut end = i + 1;
    for (j, l) in lines.iter().enumerate().skip(i + 1) {
        if l.trim().is_empty() {
            continue;
        }
        if indent_of(l) > indent || (l.trim_start().starts_with('#') && indent_of(l) > 0) {
            end = j + 1;
        } else {
            break;
        }
    }
    end
}

/// The rest of a key's line is empty (a block follows) or a comment.
fn opens_block(rest: &str) -> bool {
    let t = rest.trim();
    t.is_empty() || t.starts_with('#')
}

/// `text` with `path` set to the YAML `value` (or removed), by lines.
/// `expected` is the whole file's meaning after the change, used to write a
/// parent that was in flow style again as a block. `None`: not possible.
fn edit_text(
    text: &str,
    path: &[&str],
    value: Option<&str>,
    expected: &Map<String, Value>,
) -> Option<String> {
    let mut lines: Vec<String> = text.split_inclusive('\n').map(String::from).collect();
    if let Some(l) = lines.last_mut() {
        if !l.ends_with('\n') {
            l.push('\n');
        }
    }
    let top = lines
        .iter()
        .position(|l| line_key(l, 0).is_some_and(|(k, _)| k == path[0]));
    let key_line = |indent: usize, k: &str, v: &str| format!("{}{}: {v}\n", " ".repeat(indent), k);
    match (path, top) {
        ([k], Some(i)) => {
            let end = block_end(&lines, i, 0);
            let new: Vec<String> = value.map(|v| key_line(0, k, v)).into_iter().collect();
            lines.splice(i..end, new);
        }
        ([k], None) => {
            let v = value?;
            lines.push(key_line(0, k, v));
        }
        ([p, k], None) => {
            let v = value?;
            lines.push(format!("{p}:\n"));
            lines.push(key_line(2, k, v));
        }
        ([p, k], Some(i)) => {
            let end = block_end(&lines, i, 0);
            let (_, rest) = line_key(&lines[i], 0)?;
            if !opens_block(rest) {
                // A flow mapping or a scalar: write the parent as a block.
                let block = match expected.get(*p) {
                    None => Vec::new(),
                    Some(Value::Object(m)) => {
                        let mut b = vec![format!("{p}:\n")];
                        for (ck, cv) in m {
                            if cv.is_object() {
                                return None;
                            }
                            b.push(key_line(2, &yaml_key(ck), &render(cv)));
                        }
                        b
                    }
                    Some(_) => return None,
                };
                lines.splice(i..end, block);
                return Some(lines.concat());
            }
            let child_indent = lines[i + 1..end]
                .iter()
                .find(|l| !is_blank_or_comment(l))
                .map(|l| indent_of(l))
                .unwrap_or(2);
            if child_indent == 0 {
                return None;
            }
            let child = (i + 1..end)
                .find(|&j| line_key(&lines[j], child_indent).is_some_and(|(ck, _)| ck == *k));
            match (child, value) {
                (Some(j), v) => {
                    let cend = block_end(&lines, j, child_indent).min(end);
                    let new: Vec<String> = v
                        .map(|v| key_line(child_indent, k, v))
                        .into_iter()
                        .collect();
                    lines.splice(j..cend, new);
                    if v.is_none() && !expected.contains_key(*p) {
                        // The parent is empty now: it goes too.
                        let end = block_end(&lines, i, 0);
                        let only_comments =
                            lines[i + 1..end].iter().all(|l| is_blank_or_comment(l));
                        if only_comments {
                            lines.splice(i..end, std::iter::empty());
                        }
                    }
                }
                (None, Some(v)) => lines.insert(end, key_line(child_indent, &yaml_key(k), v)),
                (None, None) => {}
            }
        }
        _ => return None,
    }
    Some(lines.concat())
}

/// A mapping key as YAML: bare when that is safe.
fn yaml_key(k: &str) -> String {
    let plain = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !k.starts_with(['-', '.']);
    if plain {
        k.to_string()
    } else {
        yaml_quote(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPO: &str = "name: p\n# the repository\nrepository:\n  type: xfs  # POSIX\n  host: localhost\n  mountpoint: /r\ndata_dirs: [input]\n";

    fn project(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join(PROJECT_CONFIG);
        std::fs::write(&f, text).unwrap();
        (d, f)
    }

    fn set(k: &str, v: &[&str]) -> (String, Change) {
        (
            k.to_string(),
            Change::Set(v.iter().map(|s| s.to_string()).collect()),
        )
    }

    #[test]
    fn project_edits_keep_comments_and_reload() {
        let (_d, f) = project(REPO);
        plan_project(&f, &[set("repository.host", &["srv"])])
            .unwrap()
            .write()
            .unwrap();
        let add = (
            "ignore.paths".to_string(),
            Change::Add(vec!["input/x y".into()]),
        );
        plan_project(&f, &[add]).unwrap().write().unwrap();
        plan_project(&f, &[set("data_dirs", &["input", "output"])])
            .unwrap()
            .write()
            .unwrap();
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            text.contains("# the repository\n") && text.contains("type: xfs  # POSIX"),
            "{text}"
        );
        let c = ProjectConfig::load(&f).unwrap();
        assert_eq!(c.repository.host, "srv");
        assert!(c.ignore.paths.contains("input/x y"));
        assert_eq!(c.data_dirs.len(), 2);
        // Unset the only ignore key: the section goes.
        plan_project(&f, &[("ignore.paths".into(), Change::Unset)])
            .unwrap()
            .write()
            .unwrap();
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(!text.contains("ignore"), "{text}");
    }

    #[test]
    fn project_refusals_change_nothing() {
        let (_d, f) = project(REPO);
        for (k, v) in [
            ("repository.remote_dsg", "/opt/dsg"),
            ("repository.pool", "tank"),
            ("repository.type", "nfs"),
            ("data_dirs", "../x"),
            ("colour", "red"),
            ("user_name", "A"),
        ] {
            let e = plan_project(&f, &[set(k, &[v])]).unwrap_err().to_string();
            assert!(!e.is_empty(), "{k}");
            if k == "repository.remote_dsg" {
                assert!(e.contains("--user remote_dsg."), "{e}");
            }
        }
        let e = plan_project(&f, &[("name".into(), Change::Unset)]).unwrap_err();
        assert!(e.to_string().contains("'name'"), "{e}");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), REPO);
    }

    #[test]
    fn s3_keys_edit_and_refuse_like_the_others() {
        const S3: &str = "name: p\nrepository:\n  type: s3  # the cluster\n  endpoint: http://127.0.0.1:8333\n  bucket: b\ndata_dirs: [input]\n";
        let (_d, f) = project(S3);
        for (k, v) in [
            ("repository.endpoint", "https://s3.example.org"),
            ("repository.prefix", "team/x"),
            ("repository.region", "eu-west-1"),
            ("repository.bucket", "c"),
        ] {
            plan_project(&f, &[set(k, &[v])]).unwrap().write().unwrap();
        }
        let c = ProjectConfig::load(&f).unwrap();
        let s3 = c.repository.s3.expect("an s3 repository");
        assert_eq!(
            (s3.endpoint.as_str(), s3.bucket.as_str(), s3.prefix.as_str()),
            ("https://s3.example.org", "c", "team/x")
        );
        assert_eq!(s3.region.as_deref(), Some("eu-west-1"));
        let listed = project_entries(&f).unwrap();
        let value = |k: &str| listed.iter().find(|e| e.key == k).map(|e| e.value.clone());
        assert_eq!(value("repository.region"), Some(Value::from("eu-west-1")));
        assert_eq!(value("repository.prefix"), Some(Value::from("team/x")));
        assert_eq!(value("repository.type"), Some(Value::from("s3")));
        plan_project(&f, &[("repository.region".into(), Change::Unset)])
            .unwrap()
            .write()
            .unwrap();
        let c = ProjectConfig::load(&f).unwrap();
        assert_eq!(c.repository.s3.unwrap().region, None);
        // What the loader refuses is refused before the file is replaced.
        let before = std::fs::read_to_string(&f).unwrap();
        for (k, v) in [
            ("repository.endpoint", "ftp://x"),
            ("repository.bucket", "Not A Bucket"),
            ("repository.host", "srv"),
            ("repository.pool", "tank"),
        ] {
            let e = plan_project(&f, &[set(k, &[v])]).unwrap_err().to_string();
            assert!(!e.is_empty(), "{k}");
        }
        let e = plan_project(&f, &[("repository.bucket".into(), Change::Unset)]).unwrap_err();
        assert!(e.to_string().contains("bucket"), "{e}");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), before);
        assert!(before.contains("# the cluster"), "{before}");
    }

    #[test]
    fn flow_style_parents_become_blocks() {
        let (_d, f) = project("name: p\nrepository: {type: xfs, host: h, mountpoint: /r}\n");
        plan_project(&f, &[set("repository.host", &["k"])])
            .unwrap()
            .write()
            .unwrap();
        assert_eq!(ProjectConfig::load(&f).unwrap().repository.host, "k");
    }

    #[test]
    fn user_edits_create_validate_and_keep_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let low = d.path().join("low/dsg.yml");
        let high = d.path().join("high/dsg.yml");
        std::fs::create_dir_all(low.parent().unwrap()).unwrap();
        std::fs::write(&low, "user_name: A\nuser_id: a@example.org\n").unwrap();
        let paths = [low.clone(), high.clone()];
        plan_user(&paths, &[set("max_delete", &["30"])])
            .unwrap()
            .write()
            .unwrap();
        assert_eq!(UserConfig::load_from(&paths).unwrap().max_delete, Some(30));
        std::fs::write(&high, "# mine\nmax_delete: 30\n").unwrap();
        plan_user(&paths, &[set("remote_dsg.srv", &["/opt/dsg"])])
            .unwrap()
            .write()
            .unwrap();
        plan_user(&paths, &[set("user_name", &["B"])])
            .unwrap()
            .write()
            .unwrap();
        let text = std::fs::read_to_string(&high).unwrap();
        assert!(text.starts_with("# mine\n"), "{text}");
        let u = UserConfig::load_from(&paths).unwrap();
        assert_eq!(
            (u.user_name.as_str(), u.remote_dsg["srv"].as_str()),
            ("B", "/opt/dsg")
        );
        for (k, v) in [
            ("user_id", "nobody@localhost"),
            ("max_delete", "101"),
            ("backup_on_conflict", "yes"),
            ("default_host", "-oProxyCommand=x"),
            ("default_project_path", "rel/path"),
            ("remote_dsg.h", "-x"),
            ("name", "p"),
        ] {
            assert!(plan_user(&paths, &[set(k, &[v])]).is_err(), "{k}={v}");
        }
        assert_eq!(std::fs::read_to_string(&high).unwrap(), text);
        let entries = user_entries(&paths).unwrap();
        let e = entries.iter().find(|e| e.key == "user_id").unwrap();
        assert_eq!(e.file.as_deref(), Some(low.as_path()));
        let e = entries.iter().find(|e| e.key == "user_name").unwrap();
        assert_eq!(e.file.as_deref(), Some(high.as_path()));
    }
}
