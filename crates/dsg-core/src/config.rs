//! Configuration: the project's `.dsgconfig.yml` and the user's `dsg.yml`
//! (spec-data-model §5). Both formats of the original are read: the
//! `repository:` format and the legacy `transport: ssh` format. Errors name
//! the file, the key and what to do.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::yaml;

pub const PROJECT_CONFIG: &str = ".dsgconfig.yml";
pub const USER_CONFIG: &str = "dsg.yml";

/// Display is the message, then the hint on its own line (`hint: …`), as
/// the CLI prints it; `message()` and `hint()` give the two apart for
/// `--json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    NoProject {
        start: PathBuf,
    },
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    Invalid {
        file: PathBuf,
        msg: String,
        hint: String,
    },
    NoUserConfig {
        looked: String,
    },
    /// A value or key given on the command line (`dsg config set`) that is
    /// refused before any file is read.
    BadValue {
        msg: String,
        hint: String,
    },
}

impl ConfigError {
    /// The message without its hint.
    pub fn message(&self) -> String {
        match self {
            ConfigError::NoProject { start } => format!(
                "no {PROJECT_CONFIG} found in {} or any parent directory",
                start.display()
            ),
            ConfigError::Io { file, source } => {
                format!("cannot read {}: {source}", file.display())
            }
            ConfigError::Invalid { file, msg, .. } => format!("{}: {msg}", file.display()),
            ConfigError::NoUserConfig { looked } => {
                format!("no {USER_CONFIG} found (looked in: {looked})")
            }
            ConfigError::BadValue { msg, .. } => msg.clone(),
        }
    }

    /// What the user can do about it; a read failure names the file and its
    /// cause, which says enough.
    pub fn hint(&self) -> Option<&str> {
        match self {
            ConfigError::NoProject { .. } => {
                Some("run dsg inside a project, or create one with 'dsg init'")
            }
            ConfigError::Io { .. } => None,
            ConfigError::Invalid { hint, .. } => Some(hint),
            ConfigError::BadValue { hint, .. } => Some(hint.as_str()).filter(|h| !h.is_empty()),
            ConfigError::NoUserConfig { .. } => Some(
                "create ~/.config/dsg/dsg.yml with\n  user_name: Your Name\n  user_id: you@example.org\nor point DSG_CONFIG_HOME at a directory holding dsg.yml",
            ),
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())?;
        match self.hint() {
            Some(h) => write!(f, "\nhint: {h}"),
            None => Ok(()),
        }
    }
}

fn invalid(file: &Path, msg: impl Into<String>, hint: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        msg: msg.into(),
        hint: hint.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoType {
    /// Any POSIX filesystem (the name is the original's).
    Xfs,
    Zfs,
    /// An S3-compatible object store (`Repository::s3` says where).
    S3,
}

impl RepoType {
    pub fn as_str(self) -> &'static str {
        match self {
            RepoType::Xfs => "xfs",
            RepoType::Zfs => "zfs",
            RepoType::S3 => "s3",
        }
    }

    pub fn parse(s: &str) -> Option<RepoType> {
        match s {
            "xfs" => Some(RepoType::Xfs),
            "zfs" => Some(RepoType::Zfs),
            "s3" => Some(RepoType::S3),
            _ => None,
        }
    }
}

/// Where the repository lives: `<mountpoint>/<name>` on `host`.
#[derive(Debug, Clone, PartialEq)]
pub struct Repository {
    pub kind: RepoType,
    pub host: String,
    pub mountpoint: PathBuf,
    pub pool: Option<String>,
    /// The dsg binary to run on an SSH host, when this run was told one;
    /// see [`Repository::remote_dsg_command`] for the other places it comes
    /// from.
    pub remote_dsg: Option<RemoteDsg>,
    /// Where an S3 repository lives (type s3 only; its host is then
    /// `localhost`: this machine talks to the store itself).
    pub s3: Option<S3Location>,
}

/// An object-store repository's place: the objects of project `name` are
/// under `<prefix>/<name>/` in `bucket`. Credentials are never here: they
/// come from the environment or `~/.aws/credentials`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// `http(s)://host[:port]`.
    pub endpoint: String,
    pub bucket: String,
    /// May be empty.
    pub prefix: String,
    /// `None`: `AWS_REGION`, else `us-east-1`.
    pub region: Option<String>,
}

impl S3Location {
    /// The key prefix of project `name`'s repository.
    pub fn key_prefix(&self, name: &str) -> String {
        let p = self.prefix.trim_matches('/');
        if p.is_empty() {
            name.to_string()
        } else {
            format!("{p}/{name}")
        }
    }

    pub fn region(&self) -> String {
        self.region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty()))
            .unwrap_or_else(|| "us-east-1".into())
    }
}

/// A path of the server's dsg that came with the repository.
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteDsg {
    /// `--remote-dsg` of this command: the user's latest word, above all
    /// else.
    Given(String),
    /// `repository.remote_dsg` of a `.dsgconfig.yml` written by an earlier
    /// dsg. The original refuses such a file, so we no longer write the key,
    /// but files that have it must keep working: it is the last resort
    /// before `dsg` on the server's PATH.
    Legacy(String),
}

/// The environment variable naming the server's dsg for every host.
pub const REMOTE_DSG_ENV: &str = "DSG_REMOTE_DSG";

/// The server's dsg to run, and where that choice came from (for messages).
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteDsgChoice {
    pub path: String,
    pub from: String,
}

/// The precedence of the server's dsg, from the already-read sources:
/// `--remote-dsg`, then `DSG_REMOTE_DSG`, then the user config's
/// `remote_dsg` entry for `host`, then the project file's legacy key, then
/// `dsg` on the server's PATH. The environment beats the user config
/// because it is the more specific, per-session setting.
pub fn choose_remote_dsg(
    host: &str,
    repo: Option<&RemoteDsg>,
    env: Option<&str>,
    user: Option<(&BTreeMap<String, String>, &Path)>,
) -> RemoteDsgChoice {
    let pick = |path: &str, from: String| RemoteDsgChoice {
        path: path.to_string(),
        from,
    };
    if let Some(RemoteDsg::Given(p)) = repo {
        return pick(p, "--remote-dsg".into());
    }
    if let Some(p) = env.filter(|s| !s.is_empty()) {
        return pick(p, REMOTE_DSG_ENV.into());
    }
    if let Some((map, file)) = user {
        if let Some(p) = map.get(host) {
            return pick(p, format!("remote_dsg.{host} in {}", file.display()));
        }
    }
    if let Some(RemoteDsg::Legacy(p)) = repo {
        return pick(p, format!("repository.remote_dsg in {PROJECT_CONFIG}"));
    }
    pick("dsg", "the default: dsg on the server's PATH".into())
}

impl Repository {
    /// The one "is this machine" rule (the original had two, defect 17).
    pub fn is_local(&self) -> bool {
        is_local_host(&self.host)
    }

    /// Same place (type, host, directory, pool); which dsg runs there does
    /// not make it another repository.
    pub fn same_location(&self, other: &Repository) -> bool {
        self.kind == other.kind
            && self.host == other.host
            && self.mountpoint == other.mountpoint
            && self.pool == other.pool
            && self.s3 == other.s3
    }

    /// The server's dsg for this repository's host, reading the environment
    /// and the user config files (see [`choose_remote_dsg`]).
    pub fn remote_dsg_command(&self) -> Result<RemoteDsgChoice, ConfigError> {
        let env = std::env::var(REMOTE_DSG_ENV).ok();
        let user = user_remote_dsg(&user_config_paths())?;
        Ok(choose_remote_dsg(
            &self.host,
            self.remote_dsg.as_ref(),
            env.as_deref(),
            user.as_ref().map(|(m, f)| (m, f.as_path())),
        ))
    }
}

pub fn is_local_host(host: &str) -> bool {
    matches!(
        host.to_ascii_lowercase().as_str(),
        "localhost" | "127.0.0.1" | "::1" | "0.0.0.0" | "localhost.localdomain"
    )
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct IgnoreRules {
    /// Relpaths; a directory path ignores everything under it.
    pub paths: BTreeSet<String>,
    /// Names of files or directories; a directory name ignores its subtree.
    pub names: BTreeSet<String>,
    /// File-name suffixes such as `.tmp` (case-sensitive, as in the original).
    pub suffixes: BTreeSet<String>,
}

impl IgnoreRules {
    pub fn defaults() -> IgnoreRules {
        IgnoreRules {
            paths: BTreeSet::new(),
            names: [
                ".DS_Store",
                "__pycache__",
                ".Rdata",
                ".rdata",
                ".RData",
                ".Rproj.user",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            suffixes: [".tmp", ".pyc"].into_iter().map(String::from).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProjectConfig {
    pub name: String,
    pub repository: Repository,
    pub data_dirs: BTreeSet<String>,
    pub ignore: IgnoreRules,
    /// The file used the legacy `transport:` layout.
    pub legacy_format: bool,
}

impl ProjectConfig {
    /// The repository directory: `<mountpoint>/<name>`; for an object
    /// store, `s3://<bucket>/<prefix>/<name>` (a name for messages).
    pub fn repo_dir(&self) -> PathBuf {
        match &self.repository.s3 {
            Some(s3) => PathBuf::from(format!("s3://{}/{}", s3.bucket, s3.key_prefix(&self.name))),
            None => self.repository.mountpoint.join(&self.name),
        }
    }

    pub fn default_data_dirs() -> BTreeSet<String> {
        ["input", "output", "frozen"]
            .into_iter()
            .map(String::from)
            .collect()
    }

    pub fn load(file: &Path) -> Result<ProjectConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Io {
            file: file.to_path_buf(),
            source: e,
        })?;
        ProjectConfig::parse(&text, file)
    }

    pub fn parse(text: &str, file: &Path) -> Result<ProjectConfig, ConfigError> {
        let (mut v, ambiguous) = yaml::load(text).map_err(|e| yaml_error(file, e))?;
        reject_ambiguous(file, &ambiguous)?;
        reject_control_chars(file, "", &v)?;
        let obj = v.as_object_mut().ok_or_else(|| {
            invalid(
                file,
                "the file is not a mapping of keys",
                "see README for the format",
            )
        })?;

        // Legacy layout: data_dirs/ignore under `project:`, name under `ssh:`.
        if let Some(Value::Object(project)) = obj.remove("project") {
            for k in ["data_dirs", "ignore"] {
                if let Some(x) = project.get(k) {
                    obj.insert(k.into(), x.clone());
                }
            }
        }
        let (repository, legacy_format) = repository_section(file, obj)?;
        let name = parse_name(file, obj)?;
        let data_dirs = match obj.get("data_dirs") {
            None | Some(Value::Null) => ProjectConfig::default_data_dirs(),
            Some(v) => string_set(file, "data_dirs", v)?,
        };
        for d in &data_dirs {
            check_data_dir(file, d)?;
        }
        let ignore = parse_ignore(file, obj.get("ignore"))?;
        Ok(ProjectConfig {
            name,
            repository,
            data_dirs,
            ignore,
            legacy_format,
        })
    }

    /// The `repository:` layout we write. Only keys the original dsg
    /// accepts (spec-data-model §5.2): its models forbid unknown keys inside
    /// `repository`, so one extra key makes it refuse the whole file. Ignore
    /// rules are written only where they differ from the defaults, as the
    /// original leaves defaults out.
    pub fn to_yaml(&self) -> String {
        let r = &self.repository;
        let mut s = match &r.s3 {
            // Not a layout the original reads (it has no object stores).
            Some(s3) => {
                let mut s = format!(
                    "name: {}\nrepository:\n  type: s3\n  endpoint: {}\n  bucket: {}\n",
                    yaml_quote(&self.name),
                    yaml_quote(&s3.endpoint),
                    yaml_quote(&s3.bucket)
                );
                if !s3.prefix.is_empty() {
                    s.push_str(&format!("  prefix: {}\n", yaml_quote(&s3.prefix)));
                }
                if let Some(region) = &s3.region {
                    s.push_str(&format!("  region: {}\n", yaml_quote(region)));
                }
                s
            }
            None => format!(
                "name: {}\nrepository:\n  type: {}\n  host: {}\n  mountpoint: {}\n",
                yaml_quote(&self.name),
                r.kind.as_str(),
                yaml_quote(&r.host),
                yaml_quote(&r.mountpoint.to_string_lossy())
            ),
        };
        if let Some(p) = &r.pool {
            s.push_str(&format!("  pool: {}\n", yaml_quote(p)));
        }
        s.push_str(&format!("data_dirs: {}\n", yaml_list(&self.data_dirs)));
        let d = IgnoreRules::defaults();
        let ig = &self.ignore;
        let lists = [
            ("paths", &ig.paths, &d.paths),
            ("names", &ig.names, &d.names),
            ("suffixes", &ig.suffixes, &d.suffixes),
        ];
        let changed: Vec<_> = lists.iter().filter(|(_, v, d)| v != d).collect();
        if !changed.is_empty() {
            s.push_str("ignore:\n");
            for (k, v, _) in changed {
                s.push_str(&format!("  {k}: {}\n", yaml_list(v)));
            }
        }
        s
    }
}

fn yaml_list(items: &BTreeSet<String>) -> String {
    let v: Vec<String> = items.iter().map(|d| yaml_quote(d)).collect();
    format!("[{}]", v.join(", "))
}

/// Quotes always: a bare `no` or `1.0` would change type in some YAML tools.
pub(crate) fn yaml_quote(s: &str) -> String {
    serde_json::to_string(s).expect("json string")
}

fn normalize_ignore_path(p: &str) -> String {
    p.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

fn yaml_error(file: &Path, e: yaml::YamlError) -> ConfigError {
    match e {
        yaml::YamlError::Duplicate { ref key, .. } => {
            let hint = format!(
                "keep only one '{key}'; YAML tools differ in which one they use (the original dsg took the last)"
            );
            invalid(file, e.to_string(), hint)
        }
        e => invalid(file, format!("not valid YAML: {e}"), "fix the syntax"),
    }
}

/// The repository, from the `repository:` section or the legacy layout
/// (exactly one of them), and whether it was the legacy one.
fn repository_section(
    file: &Path,
    obj: &mut serde_json::Map<String, Value>,
) -> Result<(Repository, bool), ConfigError> {
    let has_repo = obj.contains_key("repository");
    let has_transport = obj.contains_key("transport");
    match (has_repo, has_transport) {
        (true, true) => Err(invalid(
            file,
            "both 'repository' (new format) and 'transport' (legacy format) are set",
            "keep only the 'repository:' section",
        )),
        (false, false) => Err(invalid(
            file,
            "no 'repository' section",
            "add:\n  repository:\n    type: xfs\n    host: localhost\n    mountpoint: /path/to/repos",
        )),
        (true, false) => Ok((parse_repository(file, obj.get("repository").unwrap())?, false)),
        (false, true) => Ok((parse_legacy(file, obj)?, true)),
    }
}

/// The repository name: a plain directory name.
fn parse_name(file: &Path, obj: &serde_json::Map<String, Value>) -> Result<String, ConfigError> {
    let name = match obj.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) | None => {
            return Err(invalid(
                file,
                "key 'name' is missing or empty",
                "add 'name: <repository name>'",
            ))
        }
        Some(other) => {
            return Err(invalid(
                file,
                format!("key 'name' must be a string, got {other}"),
                "quote the value: name: \"...\"",
            ))
        }
    };
    if name.contains('/') || name == "." || name == ".." {
        return Err(invalid(
            file,
            format!("key 'name': {name:?} is not a valid directory name"),
            "use a plain name",
        ));
    }
    Ok(name)
}

/// The defaults, with the `ignore:` section's sets in place of theirs.
fn parse_ignore(file: &Path, ignore: Option<&Value>) -> Result<IgnoreRules, ConfigError> {
    let mut rules = IgnoreRules::defaults();
    match ignore {
        None | Some(Value::Null) => {}
        Some(Value::Object(ig)) => {
            for (k, v) in ig {
                let set = string_set(file, &format!("ignore.{k}"), v)?;
                match k.as_str() {
                    "paths" => {
                        rules.paths = set
                            .into_iter()
                            .map(|p| normalize_ignore_path(&p))
                            .filter(|p| !p.is_empty())
                            .collect()
                    }
                    "names" => rules.names = set,
                    "suffixes" => rules.suffixes = set,
                    other => {
                        return Err(invalid(
                            file,
                            format!("unknown key 'ignore.{other}'"),
                            "ignore takes 'paths', 'names' and 'suffixes'",
                        ))
                    }
                }
            }
        }
        Some(other) => {
            return Err(invalid(
                file,
                format!("key 'ignore' must be a mapping, got {other}"),
                "see README",
            ))
        }
    }
    Ok(rules)
}

/// Every string in the project config ends up as a file name, a path, a host
/// or a command argument, where a NUL truncates and other control
/// characters garble messages or change meaning.
fn reject_control_chars(file: &Path, key: &str, v: &Value) -> Result<(), ConfigError> {
    let bad = |s: &str| s.chars().any(char::is_control);
    match v {
        Value::String(s) if bad(s) => Err(invalid(
            file,
            format!("key '{key}': {s:?} contains a control character"),
            "remove it; names and paths in the config must be printable text",
        )),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, x)| reject_control_chars(file, &format!("{key}[{i}]"), x)),
        Value::Object(m) => m.iter().try_for_each(|(k, x)| {
            let child = if key.is_empty() {
                k.clone()
            } else {
                format!("{key}.{k}")
            };
            if bad(k) {
                return Err(invalid(
                    file,
                    format!("key {child:?} contains a control character"),
                    "remove it",
                ));
            }
            reject_control_chars(file, &child, x)
        }),
        _ => Ok(()),
    }
}

/// The scanner compares `data_dirs` with single path components, so
/// anything that is not one plain name (or `*`) would silently track
/// nothing.
fn check_data_dir(file: &Path, d: &str) -> Result<(), ConfigError> {
    let why = if d.trim().is_empty() {
        "is empty"
    } else if d.contains('/') {
        "is a path, not a directory name"
    } else if d == "." || d == ".." {
        "is not a directory name"
    } else {
        return Ok(());
    };
    Err(invalid(
        file,
        format!("key 'data_dirs': {d:?} {why}"),
        "data_dirs lists directory names such as input or output; a directory of that name is tracked wherever it is in the project ('*' tracks everything)",
    ))
}

fn reject_ambiguous(file: &Path, amb: &[yaml::Ambiguous]) -> Result<(), ConfigError> {
    if let Some(a) = amb.first() {
        return Err(invalid(
            file,
            format!(
                "line {}: key '{}' has the bare value '{}', which YAML 1.1 tools (including the original dsg) read as a boolean and YAML 1.2 as a string",
                a.line, a.key, a.text
            ),
            format!("quote it: {}: \"{}\"", a.key.rsplit('.').next().unwrap_or(&a.key), a.text),
        ));
    }
    Ok(())
}

fn string_set(file: &Path, key: &str, v: &Value) -> Result<BTreeSet<String>, ConfigError> {
    let arr = v.as_array().ok_or_else(|| {
        invalid(
            file,
            format!("key '{key}' must be a list, got {v}"),
            format!("write {key}: [a, b]"),
        )
    })?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| match x {
            Value::String(s) => Ok(s.clone()),
            other => Err(invalid(
                file,
                format!("key '{key}[{i}]' must be a string, got {other}"),
                "quote the value",
            )),
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    #[serde(rename = "type")]
    kind: String,
    host: Option<String>,
    mountpoint: Option<String>,
    pool: Option<String>,
    endpoint: Option<String>,
    bucket: Option<String>,
    prefix: Option<String>,
    region: Option<String>,
    /// Written by earlier versions of dsg; read so their files still work.
    remote_dsg: Option<String>,
}

fn parse_repository(file: &Path, v: &Value) -> Result<Repository, ConfigError> {
    let raw: RawRepository = serde_path_to_error::deserialize(v).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { format!(".{key}") };
        invalid(
            file,
            format!("key 'repository{key}': {}", e.inner()),
            "repository takes type (xfs|zfs|s3), host, mountpoint and pool (zfs only), or for s3 endpoint, bucket, prefix and region; quote string values",
        )
    })?;
    let kind = RepoType::parse(&raw.kind).ok_or_else(|| {
        invalid(
            file,
            format!(
                "key 'repository.type': unsupported repository type {:?}",
                raw.kind
            ),
            "use 'xfs' (any POSIX filesystem), 'zfs' or 's3'",
        )
    })?;
    if kind == RepoType::S3 {
        return parse_s3(file, raw);
    }
    for (key, given) in [
        ("endpoint", raw.endpoint.is_some()),
        ("bucket", raw.bucket.is_some()),
        ("prefix", raw.prefix.is_some()),
        ("region", raw.region.is_some()),
    ] {
        if given {
            return Err(invalid(
                file,
                format!("key 'repository.{key}' is only allowed for type s3"),
                "remove it",
            ));
        }
    }
    let (Some(host), Some(mountpoint)) = (raw.host, raw.mountpoint) else {
        return Err(invalid(
            file,
            "keys 'repository.host' and 'repository.mountpoint' are required",
            "add host (localhost or an ssh host) and mountpoint (an absolute path)",
        ));
    };
    match (kind, &raw.pool) {
        (RepoType::Zfs, None) => {
            return Err(invalid(
                file,
                "key 'repository.pool' is required for type zfs",
                "add 'pool: <zfs pool>'",
            ))
        }
        (RepoType::Xfs, Some(_)) => {
            return Err(invalid(
                file,
                "key 'repository.pool' is only allowed for type zfs",
                "remove it",
            ))
        }
        _ => {}
    }
    if host.trim().is_empty() {
        return Err(invalid(
            file,
            "key 'repository.host' is empty",
            "use localhost or an ssh host name",
        ));
    }
    if !mountpoint.starts_with('/') {
        return Err(invalid(
            file,
            format!("key 'repository.mountpoint': {mountpoint:?} is not an absolute path"),
            "give the absolute path of the directory that holds the repository",
        ));
    }
    Ok(Repository {
        kind,
        host,
        mountpoint: PathBuf::from(mountpoint),
        pool: raw.pool,
        remote_dsg: raw.remote_dsg.map(RemoteDsg::Legacy),
        s3: None,
    })
}

/// `type: s3`: endpoint and bucket, optionally prefix and region.
fn parse_s3(file: &Path, raw: RawRepository) -> Result<Repository, ConfigError> {
    for (key, given) in [
        ("host", raw.host.is_some()),
        ("mountpoint", raw.mountpoint.is_some()),
        ("pool", raw.pool.is_some()),
        ("remote_dsg", raw.remote_dsg.is_some()),
    ] {
        if given {
            return Err(invalid(
                file,
                format!("key 'repository.{key}' is not allowed for type s3"),
                "an s3 repository takes endpoint, bucket, prefix and region",
            ));
        }
    }
    let endpoint = raw.endpoint.unwrap_or_default();
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(invalid(
            file,
            format!("key 'repository.endpoint': {endpoint:?} is not an http:// or https:// URL"),
            "give the object store's URL, e.g. https://s3.example.org or http://127.0.0.1:8333",
        ));
    }
    let bucket = raw.bucket.unwrap_or_default();
    // AWS allows lowercase letters, digits, '.' and '-'; other stores also
    // take capitals and '_'. Anything else (spaces, slashes) cannot be one.
    let bucket_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if bucket.is_empty() || bucket.len() > 255 || !bucket.chars().all(bucket_char) {
        return Err(invalid(
            file,
            format!("key 'repository.bucket': {bucket:?} is not a bucket name"),
            "give the bucket's name: letters, digits, '.', '-' (no slashes; the prefix goes in 'prefix')",
        ));
    }
    let prefix = raw.prefix.unwrap_or_default().trim_matches('/').to_string();
    if prefix.split('/').any(|c| c == "." || c == "..") {
        return Err(invalid(
            file,
            format!("key 'repository.prefix': {prefix:?} has . or .. components"),
            "use a plain key prefix such as 'projects/lab1'",
        ));
    }
    Ok(Repository {
        kind: RepoType::S3,
        host: "localhost".into(),
        mountpoint: PathBuf::from("/"),
        pool: None,
        remote_dsg: None,
        s3: Some(S3Location {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            bucket,
            prefix,
            region: raw.region.filter(|r| !r.is_empty()),
        }),
    })
}

fn parse_legacy(
    file: &Path,
    obj: &mut serde_json::Map<String, Value>,
) -> Result<Repository, ConfigError> {
    let transport = obj
        .get("transport")
        .and_then(|t| t.as_str())
        .unwrap_or("")
        .to_string();
    if transport != "ssh" {
        return Err(invalid(
            file,
            format!("key 'transport': {transport:?} is not supported"),
            "only the legacy 'transport: ssh' layout can be read; prefer the 'repository:' format",
        ));
    }
    let ssh = match obj.get("ssh") {
        Some(Value::Object(s)) => s.clone(),
        _ => {
            return Err(invalid(
                file,
                "key 'ssh' is required when transport=ssh",
                "add ssh: {host, path, type}",
            ))
        }
    };
    let get = |k: &str| -> Result<String, ConfigError> {
        match ssh.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(invalid(
                file,
                format!("key 'ssh.{k}' must be a string, got {other}"),
                "quote it",
            )),
            None => Err(invalid(file, format!("key 'ssh.{k}' is missing"), "add it")),
        }
    };
    let host = get("host")?;
    let path = get("path")?;
    let kind_s = get("type")?;
    let kind = RepoType::parse(&kind_s).ok_or_else(|| {
        invalid(
            file,
            format!("key 'ssh.type': unsupported {kind_s:?}"),
            "use xfs or zfs (s3 needs the 'repository:' section)",
        )
    })?;
    if kind == RepoType::S3 {
        return Err(invalid(
            file,
            "key 'ssh.type': an s3 repository cannot be given in the legacy layout",
            "use the 'repository:' section with type s3, endpoint and bucket",
        ));
    }
    if !obj.contains_key("name") {
        if let Some(Value::String(n)) = ssh.get("name") {
            obj.insert("name".into(), Value::String(n.clone()));
        }
    }
    Ok(Repository {
        kind,
        host,
        mountpoint: PathBuf::from(path),
        // The original invented the pool "dsgdata" for legacy zfs configs; we
        // keep that so such configs still open.
        pool: (kind == RepoType::Zfs).then(|| "dsgdata".to_string()),
        remote_dsg: None,
        s3: None,
    })
}

/// Finds the project root: the nearest directory at or above `start` that
/// holds `.dsgconfig.yml`.
pub fn find_project_root(start: &Path) -> Result<PathBuf, ConfigError> {
    let start = std::path::absolute(start).unwrap_or_else(|_| start.to_path_buf());
    let mut dir: Option<&Path> = Some(&start);
    while let Some(d) = dir {
        if d.join(PROJECT_CONFIG).is_file() {
            return Ok(d.to_path_buf());
        }
        dir = d.parent();
    }
    Err(ConfigError::NoProject { start })
}

#[derive(Debug, Clone, PartialEq)]
pub struct UserConfig {
    pub user_name: String,
    pub user_id: String,
    pub default_host: Option<String>,
    pub default_project_path: Option<String>,
    pub backup_on_conflict: bool,
    /// `max_delete`: the mass-deletion guard's limit in percent (100: off);
    /// `sync --max-delete` overrides it.
    pub max_delete: Option<u8>,
    /// `remote_dsg`: ssh host → path of dsg on it.
    pub remote_dsg: BTreeMap<String, String>,
    /// Files that were read, lowest priority first.
    pub sources: Vec<PathBuf>,
}

/// The user-config search path, lowest priority first. XDG defaults are
/// followed properly (the original probed a relative path, defect 15).
pub fn user_config_paths() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from("/etc/dsg").join(USER_CONFIG)];
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if let Some(h) = &home {
        v.push(h.join(".config/dsg").join(USER_CONFIG));
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        let p = PathBuf::from(x).join("dsg").join(USER_CONFIG);
        if !v.contains(&p) {
            v.push(p);
        }
    }
    if let Some(d) = std::env::var_os("DSG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        v.push(PathBuf::from(d).join(USER_CONFIG));
    }
    v
}

impl UserConfig {
    /// Loads and merges (shallowly: a later file replaces whole top-level keys)
    /// every user config found. A file that exists but does not parse is an
    /// error, not a silent skip.
    pub fn load() -> Result<UserConfig, ConfigError> {
        UserConfig::load_from(&user_config_paths())
    }

    pub fn load_from(paths: &[PathBuf]) -> Result<UserConfig, ConfigError> {
        let mut merged = serde_json::Map::new();
        let mut sources = Vec::new();
        for (i, p) in paths.iter().enumerate() {
            if let Some(obj) = read_user_file(p, i == 0)? {
                merged.extend(obj);
                sources.push(p.clone());
            }
        }
        let Some(last) = sources.last().cloned() else {
            return Err(ConfigError::NoUserConfig {
                looked: paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        UserConfig::from_merged(&merged, &last, sources)
    }

    /// The settings from the merged keys; errors name `last`, the file
    /// read last.
    pub(crate) fn from_merged(
        merged: &serde_json::Map<String, Value>,
        last: &Path,
        sources: Vec<PathBuf>,
    ) -> Result<UserConfig, ConfigError> {
        let req = |k: &str| -> Result<String, ConfigError> {
            match merged.get(k) {
                Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
                Some(Value::String(_)) | None | Some(Value::Null) => Err(invalid(
                    last,
                    format!("key '{k}' is missing"),
                    format!("add '{k}: ...' to one of your dsg.yml files"),
                )),
                Some(other) => Err(invalid(
                    last,
                    format!("key '{k}' must be a string, got {other}"),
                    "quote it",
                )),
            }
        };
        let opt = |k: &str| merged.get(k).and_then(|v| v.as_str()).map(String::from);
        let user_name = req("user_name")?;
        let user_id = normalize_email(&req("user_id")?).map_err(|why| {
            invalid(
                last,
                format!("key 'user_id': {why}"),
                "user_id must be an e-mail address such as you@example.org",
            )
        })?;
        let backup_on_conflict = match merged.get("backup_on_conflict") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(invalid(
                    last,
                    format!("key 'backup_on_conflict' must be true or false, got {other}"),
                    "use true or false",
                ))
            }
        };
        let max_delete = match merged.get("max_delete") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v <= 100) => {
                n.as_u64().map(|v| v as u8)
            }
            Some(other) => {
                return Err(invalid(
                    last,
                    format!(
                        "key 'max_delete' must be a whole percentage from 0 to 100, got {other}"
                    ),
                    "e.g. max_delete: 50 (the default; 100 turns the mass-deletion guard off)",
                ))
            }
        };
        let remote_dsg = match merged.get("remote_dsg") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(v) => parse_remote_dsg_map(last, v)?,
        };
        Ok(UserConfig {
            user_name,
            user_id,
            default_host: opt("default_host"),
            default_project_path: opt("default_project_path"),
            backup_on_conflict,
            max_delete,
            remote_dsg,
            sources,
        })
    }
}

/// What `list-repos` reads of the user config: `default_host` and
/// `default_project_path` only (personal fields are not required), each
/// checked when present.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DiscoveryDefaults {
    pub default_host: Option<String>,
    pub default_project_path: Option<PathBuf>,
}

impl DiscoveryDefaults {
    pub fn load() -> Result<DiscoveryDefaults, ConfigError> {
        DiscoveryDefaults::load_from(&user_config_paths())
    }

    pub fn load_from(paths: &[PathBuf]) -> Result<DiscoveryDefaults, ConfigError> {
        let mut merged = serde_json::Map::new();
        let mut last = None;
        for (i, p) in paths.iter().enumerate() {
            if let Some(obj) = read_user_file(p, i == 0)? {
                merged.extend(obj);
                last = Some(p.clone());
            }
        }
        let Some(last) = last else {
            return Err(ConfigError::NoUserConfig {
                looked: paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        DiscoveryDefaults::from_merged(&merged, &last)
    }

    /// The checked values from the merged keys; errors name `last`.
    pub(crate) fn from_merged(
        merged: &serde_json::Map<String, Value>,
        last: &Path,
    ) -> Result<DiscoveryDefaults, ConfigError> {
        let text = |k: &str| -> Result<Option<String>, ConfigError> {
            match merged.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
                Some(other) => Err(invalid(
                    last,
                    format!("key '{k}' must be a non-empty string, got {other}"),
                    format!("write {k}: VALUE, or remove the key"),
                )),
            }
        };
        let default_host = text("default_host")?;
        if let Some(h) = &default_host {
            if h.starts_with('-') || h.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    last,
                    format!("key 'default_host' {h:?} is not a host name"),
                    "use localhost or an ssh host (an alias of ~/.ssh/config works)",
                ));
            }
        }
        let default_project_path = text("default_project_path")?.map(PathBuf::from);
        if let Some(p) = &default_project_path {
            if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(invalid(
                    last,
                    format!(
                        "key 'default_project_path' {:?} must be an absolute path without '..'",
                        p.display().to_string()
                    ),
                    "name the directory that holds the repositories, e.g. /srv/dsg",
                ));
            }
        }
        Ok(DiscoveryDefaults {
            default_host,
            default_project_path,
        })
    }
}

const REMOTE_DSG_HINT: &str = "write remote_dsg as a map from ssh host to the path of dsg on it, e.g.\n  remote_dsg:\n    myserver: /opt/dsg/bin/dsg";

/// Checks one path of the server's dsg: it becomes the first word of the
/// remote command, where an option-like word is refused by the server's
/// forced-command guard and a control character changes meaning.
fn check_remote_dsg_path(file: &Path, key: &str, p: &str) -> Result<(), ConfigError> {
    let why = if p.trim().is_empty() {
        "is empty"
    } else if p.starts_with('-') {
        "starts with '-'"
    } else if p.chars().any(char::is_control) {
        "contains a control character"
    } else {
        return Ok(());
    };
    Err(invalid(
        file,
        format!("key '{key}': {p:?} {why}"),
        "give the path of the dsg program on the server, such as /opt/dsg/bin/dsg",
    ))
}

fn parse_remote_dsg_map(file: &Path, v: &Value) -> Result<BTreeMap<String, String>, ConfigError> {
    let Value::Object(m) = v else {
        return Err(invalid(
            file,
            format!("key 'remote_dsg' must be a mapping of host to path, got {v}"),
            REMOTE_DSG_HINT,
        ));
    };
    let mut out = BTreeMap::new();
    for (host, p) in m {
        let key = format!("remote_dsg.{host}");
        let Value::String(p) = p else {
            return Err(invalid(
                file,
                format!("key '{key}' must be a path, got {p}"),
                REMOTE_DSG_HINT,
            ));
        };
        if host.trim().is_empty() || host.chars().any(char::is_control) {
            return Err(invalid(
                file,
                format!("key {key:?}: {host:?} is not a host name"),
                REMOTE_DSG_HINT,
            ));
        }
        check_remote_dsg_path(file, &key, p)?;
        out.insert(host.clone(), p.clone());
    }
    Ok(out)
}

/// ssh host → path of dsg on it.
pub type RemoteDsgMap = BTreeMap<String, String>;

/// The user config's `remote_dsg` map and the file it came from, without
/// the rest of the user config (whose required keys an ssh connection
/// does not need). Merged like [`UserConfig::load_from`]: the last file
/// with the key gives the whole map.
pub fn user_remote_dsg(paths: &[PathBuf]) -> Result<Option<(RemoteDsgMap, PathBuf)>, ConfigError> {
    let mut found = None;
    for (i, p) in paths.iter().enumerate() {
        if let Some(obj) = read_user_file(p, i == 0)? {
            match obj.get("remote_dsg") {
                None => {}
                Some(Value::Null) => found = None,
                Some(v) => found = Some((parse_remote_dsg_map(p, v)?, p.clone())),
            }
        }
    }
    Ok(found)
}

/// A prepared change of the user config that records the server's dsg for
/// a host: checked before anything else is written, applied with
/// `RemoteDsgEdit::write` (one file edit, as `dsg config` makes them).
pub use crate::config_edit::Edit as RemoteDsgEdit;

/// Plans recording `path` as the server's dsg for `host` in the user's own
/// configuration: the highest-priority file of `paths` (the one that wins
/// the merge), created if missing. Its other keys, comments and layout are
/// kept; only its `remote_dsg` block is replaced, holding the map in effect
/// plus this host (so entries from lower files are not hidden by it).
pub fn plan_remote_dsg(
    paths: &[PathBuf],
    host: &str,
    path: &str,
) -> Result<RemoteDsgEdit, ConfigError> {
    let file = crate::config_edit::user_target(paths)?;
    check_remote_dsg_path(&file, &format!("remote_dsg.{host}"), path)?;
    let mut map = user_remote_dsg(paths)?.map(|(m, _)| m).unwrap_or_default();
    let (real, old, mode) = crate::config_edit::read_for_edit(&file, false)?;
    if map.get(host).map(String::as_str) == Some(path) {
        return Ok(RemoteDsgEdit {
            file,
            text: None,
            real,
            mode: None,
        });
    }
    map.insert(host.to_string(), path.to_string());
    let text = replace_remote_dsg_block(&old, &map);
    // The text edit is line-based; prove it changed nothing but the map.
    let keys = |t: &str| -> Option<serde_json::Map<String, Value>> {
        match yaml::load(t).ok()?.0 {
            Value::Object(m) => Some(m),
            Value::Null => Some(Default::default()),
            _ => None,
        }
    };
    let expected = keys(&old).map(|mut m| {
        m.insert(
            "remote_dsg".into(),
            Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            ),
        );
        m
    });
    if expected.is_none() || keys(&text) != expected {
        let mut block = String::from("remote_dsg:\n");
        for (h, p) in &map {
            block.push_str(&format!("  {}: {}\n", yaml_quote(h), yaml_quote(p)));
        }
        return Err(invalid(
            &file,
            "cannot add the server's dsg path to this file safely (its layout is unusual)",
            format!("edit it by hand so that it has\n{block}or set {REMOTE_DSG_ENV} instead"),
        ));
    }
    Ok(RemoteDsgEdit {
        file,
        text: Some(text),
        real,
        mode,
    })
}

const REMOTE_DSG_COMMENT: &str =
    "# The path of dsg on each ssh host (written by 'dsg init --remote-dsg').";

/// `text` without its top-level `remote_dsg:` block (the key's line and the
/// indented or blank lines after it), and with the block for `map` at the
/// end.
fn replace_remote_dsg_block(text: &str, map: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in text.split_inclusive('\n') {
        let starts_block = line.starts_with("remote_dsg:")
            || line.starts_with("remote_dsg :")
            || line.starts_with("\"remote_dsg\":")
            || line.starts_with("'remote_dsg':");
        if starts_block {
            skipping = true;
            continue;
        }
        if line.trim_end() == REMOTE_DSG_COMMENT {
            continue;
        }
        if skipping && (line.trim().is_empty() || line.starts_with([' ', '\t'])) {
            continue;
        }
        skipping = false;
        out.push_str(line);
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(REMOTE_DSG_COMMENT);
    out.push('\n');
    out.push_str("remote_dsg:\n");
    for (h, p) in map {
        out.push_str(&format!("  {}: {}\n", yaml_quote(h), yaml_quote(p)));
    }
    out
}

/// One user config file's keys; `None` when it does not exist. `first`: the
/// lowest-priority file, where a system config under /etc must not hold
/// personal fields.
pub(crate) fn read_user_file(
    p: &Path,
    first: bool,
) -> Result<Option<serde_json::Map<String, Value>>, ConfigError> {
    let text = match std::fs::read_to_string(p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ConfigError::Io {
                file: p.to_path_buf(),
                source: e,
            })
        }
    };
    parse_user_text(p, &text, first).map(Some)
}

/// One user config file's keys from its text (see [`read_user_file`]);
/// errors name `p`.
pub(crate) fn parse_user_text(
    p: &Path,
    text: &str,
    first: bool,
) -> Result<serde_json::Map<String, Value>, ConfigError> {
    let (v, amb) = yaml::load(text).map_err(|e| yaml_error(p, e))?;
    reject_ambiguous(p, &amb)?;
    let obj = match v {
        Value::Object(o) => o,
        Value::Null => Default::default(),
        _ => {
            return Err(invalid(
                p,
                "the file is not a mapping of keys",
                "see README",
            ))
        }
    };
    if first && p.starts_with("/etc") {
        let personal: Vec<&str> = ["user_id", "user_name"]
            .into_iter()
            .filter(|k| obj.contains_key(*k))
            .collect();
        if !personal.is_empty() {
            return Err(invalid(
                p,
                format!(
                    "the system config contains personal fields: {}",
                    personal.join(", ")
                ),
                "move them to ~/.config/dsg/dsg.yml",
            ));
        }
    }
    Ok(obj)
}

/// E-mail syntax check and normalisation (domain lower-cased), following the
/// rules the original's validator enforced that matter here.
pub fn normalize_email(s: &str) -> Result<String, String> {
    let s = s.trim();
    let (local, domain) = s.rsplit_once('@').ok_or("not an e-mail address (no @)")?;
    if local.is_empty() || local.len() > 64 {
        return Err("the part before @ is empty or too long".into());
    }
    if local
        .chars()
        .any(|c| c.is_whitespace() || c == '@' || c.is_control())
        || local.starts_with('.')
        || local.ends_with('.')
        || local.contains("..")
    {
        return Err("the part before @ has invalid characters".into());
    }
    let domain = domain.to_lowercase();
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return Err("the domain needs a dot".into());
    }
    for l in &labels {
        if l.is_empty()
            || l.starts_with('-')
            || l.ends_with('-')
            || !l.chars().all(|c| c.is_alphanumeric() || c == '-')
        {
            return Err(format!("the domain label {l:?} is invalid"));
        }
    }
    let tld = labels[labels.len() - 1];
    if tld.chars().all(|c| c.is_ascii_digit())
        || ["localhost", "test", "invalid", "local"].contains(&tld)
    {
        return Err(format!("{domain:?} is not a deliverable domain"));
    }
    Ok(format!("{local}@{domain}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<ProjectConfig, ConfigError> {
        ProjectConfig::parse(t, Path::new("/p/.dsgconfig.yml"))
    }

    #[test]
    fn repository_format() {
        let c = parse("name: BB\nrepository:\n  type: zfs\n  host: scott\n  pool: dsgdata\n  mountpoint: /var/repos/zsd\ndata_dirs: [input, output]\nignore:\n  names: [x]\n  paths: [./a/b/, c//d]\n").unwrap();
        assert_eq!(c.repo_dir(), PathBuf::from("/var/repos/zsd/BB"));
        assert_eq!(c.repository.kind, RepoType::Zfs);
        assert!(!c.repository.is_local());
        assert_eq!(c.data_dirs.len(), 2);
        assert!(c.ignore.names.contains("x") && !c.ignore.names.contains("__pycache__"));
        assert!(c.ignore.suffixes.contains(".tmp"));
        assert_eq!(
            c.ignore.paths.iter().cloned().collect::<Vec<_>>(),
            ["a/b", "c/d"]
        );
        let back = parse(&c.to_yaml()).unwrap();
        assert_eq!(back.repository, c.repository);
    }

    #[test]
    fn legacy_format() {
        let c = parse(
            "name: proj\nssh:\n  host: localhost\n  path: /tmp/r\n  type: xfs\ntransport: ssh\n",
        )
        .unwrap();
        assert!(c.legacy_format && c.repository.is_local());
        assert_eq!(c.repo_dir(), PathBuf::from("/tmp/r/proj"));
        let c = parse("transport: ssh\nssh: {host: h, path: /r, type: zfs, name: nm}\nproject:\n  data_dirs: [d]\n").unwrap();
        assert_eq!(c.name, "nm");
        assert_eq!(c.repository.pool.as_deref(), Some("dsgdata"));
        assert!(c.data_dirs.contains("d"));
    }

    #[test]
    fn an_s3_repository_parses_writes_back_and_refuses_what_it_cannot_hold() {
        let text = "name: proj\nrepository:\n  type: s3\n  endpoint: \"http://127.0.0.1:8333/\"\n  bucket: lab\n  prefix: /projects/2026/\n  region: eu-west-1\n";
        let c = parse(text).unwrap();
        assert_eq!(c.repository.kind, RepoType::S3);
        assert!(
            c.repository.is_local(),
            "the client talks to the store itself"
        );
        let s3 = c.repository.s3.clone().unwrap();
        assert_eq!(s3.endpoint, "http://127.0.0.1:8333");
        assert_eq!(s3.prefix, "projects/2026");
        assert_eq!(s3.key_prefix("proj"), "projects/2026/proj");
        assert_eq!(s3.region(), "eu-west-1");
        assert_eq!(c.repo_dir(), PathBuf::from("s3://lab/projects/2026/proj"));
        let back = parse(&c.to_yaml()).unwrap();
        assert_eq!(back, c);
        assert!(!c.to_yaml().contains("host"), "{}", c.to_yaml());
        let no_prefix = parse(
            "name: p\nrepository: {type: s3, endpoint: \"https://s3.example.org\", bucket: b}\n",
        )
        .unwrap();
        assert_eq!(
            no_prefix.repository.s3.as_ref().unwrap().key_prefix("p"),
            "p"
        );
        assert_eq!(parse(&no_prefix.to_yaml()).unwrap(), no_prefix);
        for (bad, says) in [
            ("{type: s3, bucket: b}", "endpoint"),
            ("{type: s3, endpoint: \"ftp://x\", bucket: b}", "endpoint"),
            ("{type: s3, endpoint: \"http://x\"}", "bucket"),
            (
                "{type: s3, endpoint: \"http://x\", bucket: \"a/b\"}",
                "bucket",
            ),
            (
                "{type: s3, endpoint: \"http://x\", bucket: b, prefix: \"a/../b\"}",
                "prefix",
            ),
            (
                "{type: s3, endpoint: \"http://x\", bucket: b, host: localhost}",
                "host",
            ),
            (
                "{type: s3, endpoint: \"http://x\", bucket: b, pool: p}",
                "pool",
            ),
            (
                "{type: xfs, host: localhost, mountpoint: /r, bucket: b}",
                "bucket",
            ),
            ("{type: xfs, host: localhost}", "mountpoint"),
        ] {
            let e = parse(&format!("name: p\nrepository: {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = parse("name: p\ntransport: ssh\nssh: {host: h, path: /r, type: s3}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("legacy"), "{e}");
    }

    #[test]
    fn errors_name_key_and_hint() {
        let e = parse("name: no\nrepository: {type: xfs, host: localhost, mountpoint: /r}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("'name'") && e.contains("quote"), "{e}");
        let e =
            parse("name: a\nrepository: {type: xfs, host: localhost, mountpoint: /r, pool: p}\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("repository.pool"), "{e}");
        let e = parse(
            "name: a\nrepository: {type: xfs, host: localhost, mountpoint: /r, colour: red}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("colour") && e.contains("/p/.dsgconfig.yml"),
            "{e}"
        );
        let e = parse("name: a\nrepository: {type: xfs, host: true, mountpoint: /r}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("repository.host"), "{e}");
        let e = parse("name: a\n").unwrap_err().to_string();
        assert!(e.contains("repository"), "{e}");
        let e = parse(
            "name: a\nrepository: {type: xfs, host: localhost, mountpoint: /r}\ntransport: ssh\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("both"), "{e}");
    }

    const REPO: &str = "repository: {type: xfs, host: localhost, mountpoint: /r}\n";

    #[test]
    fn duplicate_keys_are_named_with_their_lines() {
        let e = parse(&format!("name: a\n{REPO}name: b\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/p/.dsgconfig.yml")
                && e.contains("line 3: duplicate key 'name' (first at line 1)")
                && e.contains("hint:"),
            "{e}"
        );
        let e = parse(
            "name: a\nrepository:\n  type: xfs\n  host: h\n  mountpoint: /r\n  host: localhost\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("line 6: duplicate key 'repository.host' (first at line 4)"),
            "{e}"
        );
        let e = parse(&format!(
            "name: a\n{REPO}ignore:\n  names: [x]\n  names: [y]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("line 5: duplicate key 'ignore.names' (first at line 4)"),
            "{e}"
        );
        let e = parse("name: a\nrepository: {type: xfs, type: zfs, host: h, mountpoint: /r}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate key 'repository.type'"), "{e}");
        // The same key in sibling mappings is not a duplicate.
        parse("name: a\nrepository: {type: xfs, host: localhost, mountpoint: /r}\nignore: {names: [x]}\nproject: {names: 1}\n")
            .unwrap();
    }

    #[test]
    fn data_dirs_must_be_plain_directory_names() {
        for bad in [
            "../..", "..", ".", "/etc", "a/../b", "a/b", "", "in\tput", "x\u{0}",
        ] {
            let text = format!("name: a\n{REPO}data_dirs: [input, {}]\n", yaml_quote(bad));
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.contains("data_dirs") && e.contains(&format!("{bad:?}")) && e.contains("hint:"),
                "{bad:?}: {e}"
            );
        }
        let c = parse(&format!("name: a\n{REPO}data_dirs: [\"*\", in put]\n")).unwrap();
        assert!(c.data_dirs.contains("*") && c.data_dirs.contains("in put"));
    }

    #[test]
    fn control_characters_are_refused_where_they_become_names_or_paths() {
        let cases = [
            ("name: \"a\\0b\"\n".to_string() + REPO, "name", "a\u{0}b"),
            ("name: \"a\\nb\"\n".to_string() + REPO, "name", "a\nb"),
            (
                "name: a\nrepository: {type: xfs, host: \"h\\x01\", mountpoint: /r}\n".into(),
                "repository.host",
                "h\u{1}",
            ),
            (
                "name: a\nrepository: {type: xfs, host: h, mountpoint: \"/r\\0\"}\n".into(),
                "repository.mountpoint",
                "/r\u{0}",
            ),
            (
                format!("name: a\n{REPO}ignore: {{paths: [\"a\\0\"]}}\n"),
                "ignore.paths[0]",
                "a\u{0}",
            ),
        ];
        for (text, key, val) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.contains(&format!("'{key}'"))
                    && e.contains(&format!("{val:?}"))
                    && e.contains("hint:"),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn user_config_merge_and_validation() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.yml");
        let b = d.path().join("b.yml");
        std::fs::write(
            &a,
            "user_name: A\nuser_id: a@Example.ORG\ndefault_host: h1\n",
        )
        .unwrap();
        std::fs::write(&b, "user_name: B\n").unwrap();
        let u = UserConfig::load_from(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(
            (u.user_name.as_str(), u.user_id.as_str()),
            ("B", "a@example.org")
        );
        assert_eq!(u.default_host.as_deref(), Some("h1"));
        std::fs::write(&b, "user_id: nobody@localhost\n").unwrap();
        assert!(UserConfig::load_from(&[a.clone(), b.clone()])
            .unwrap_err()
            .to_string()
            .contains("user_id"));
        std::fs::write(&b, "user_id: [broken\n").unwrap();
        assert!(UserConfig::load_from(&[a, b.clone()])
            .unwrap_err()
            .to_string()
            .contains("b.yml"));
        assert!(matches!(
            UserConfig::load_from(&[d.path().join("none")]),
            Err(ConfigError::NoUserConfig { .. })
        ));
    }

    /// The keys the original dsg accepts in `.dsgconfig.yml`
    /// (spec-data-model §5.2, §5.2.1): top level (unknown keys are ignored
    /// there, but we write none), `repository` per type (unknown keys are
    /// rejected: pydantic `extra=forbid`), and `ignore`.
    const ORIGINAL_TOP: &[&str] = &[
        "name",
        "repository",
        "transport",
        "ssh",
        "rclone",
        "ipfs",
        "data_dirs",
        "ignore",
        "migrated",
    ];
    const ORIGINAL_REPOSITORY_ZFS: &[&str] = &["type", "host", "pool", "mountpoint"];
    const ORIGINAL_REPOSITORY_XFS: &[&str] = &["type", "host", "mountpoint"];
    const ORIGINAL_IGNORE: &[&str] = &["paths", "names", "suffixes"];

    /// Every key, at every level, against the original's accepted set.
    fn assert_original_accepts(text: &str) {
        let (v, amb) = yaml::load(text).unwrap();
        assert!(amb.is_empty(), "{text}");
        let top = v.as_object().unwrap();
        for (k, v) in top {
            assert!(ORIGINAL_TOP.contains(&k.as_str()), "top key {k}:\n{text}");
            match k.as_str() {
                "repository" => {
                    let r = v.as_object().unwrap();
                    let allowed = match r["type"].as_str().unwrap() {
                        "zfs" => ORIGINAL_REPOSITORY_ZFS,
                        "xfs" => ORIGINAL_REPOSITORY_XFS,
                        t => panic!("type {t}"),
                    };
                    for rk in r.keys() {
                        assert!(allowed.contains(&rk.as_str()), "repository.{rk}:\n{text}");
                    }
                    for need in allowed {
                        assert!(r.contains_key(*need), "repository.{need} missing:\n{text}");
                    }
                }
                "ignore" => {
                    for (ik, iv) in v.as_object().unwrap() {
                        assert!(ORIGINAL_IGNORE.contains(&ik.as_str()), "ignore.{ik}");
                        assert!(iv.as_array().unwrap().iter().all(Value::is_string));
                    }
                }
                "data_dirs" => assert!(v.as_array().unwrap().iter().all(Value::is_string)),
                "name" => assert!(v.is_string()),
                _ => {}
            }
        }
    }

    #[test]
    fn writer_keys_are_the_originals() {
        let set = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<BTreeSet<_>>();
        let kinds = [(RepoType::Xfs, None), (RepoType::Zfs, Some("dsgdata"))];
        let hosts = ["localhost", "scott", "alice@server.example.org"];
        let remote = [
            None,
            Some(RemoteDsg::Given("/opt/dsg/bin/dsg".into())),
            Some(RemoteDsg::Legacy("/usr/local/bin/dsg".into())),
        ];
        let mut ignores = vec![IgnoreRules::defaults(), IgnoreRules::default()];
        let mut custom = IgnoreRules::defaults();
        custom.paths = set(&["task1/input/secret.txt", "a b/c"]);
        ignores.push(custom.clone());
        custom.names = set(&["no", ".DS_Store"]);
        ignores.push(custom.clone());
        custom.suffixes = set(&[".bak"]);
        ignores.push(custom);
        let dirs = [
            ProjectConfig::default_data_dirs(),
            set(&["*"]),
            set(&["input", "yes", "1.0"]),
        ];
        let mut n = 0;
        for (kind, pool) in &kinds {
            for host in hosts {
                for rd in &remote {
                    for ig in &ignores {
                        for dd in &dirs {
                            let c = ProjectConfig {
                                name: "BB".into(),
                                repository: Repository {
                                    kind: *kind,
                                    host: host.into(),
                                    mountpoint: "/var/repos/zsd".into(),
                                    pool: pool.map(String::from),
                                    remote_dsg: rd.clone(),
                                    s3: None,
                                },
                                data_dirs: dd.clone(),
                                ignore: ig.clone(),
                                legacy_format: false,
                            };
                            let text = c.to_yaml();
                            assert!(!text.contains("remote_dsg"), "{text}");
                            assert_original_accepts(&text);
                            // What we write reads back the same, less the
                            // remote dsg, which lives elsewhere now.
                            let back = parse(&text).unwrap();
                            let mut want = c.clone();
                            want.repository.remote_dsg = None;
                            assert_eq!(back, want, "{text}");
                            n += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(n, 2 * 3 * 3 * 5 * 3);
    }

    #[test]
    fn legacy_remote_dsg_in_the_project_file_still_loads() {
        let c = parse(
            "name: a\nrepository: {type: xfs, host: h, mountpoint: /r, remote_dsg: /opt/dsg}\n",
        )
        .unwrap();
        assert_eq!(
            c.repository.remote_dsg,
            Some(RemoteDsg::Legacy("/opt/dsg".into()))
        );
        assert!(!c.to_yaml().contains("remote_dsg"));
    }

    #[test]
    fn remote_dsg_precedence() {
        let f = PathBuf::from("/u/dsg.yml");
        let map: BTreeMap<String, String> = [("h".to_string(), "/user/dsg".to_string())].into();
        let user = Some((&map, f.as_path()));
        let given = RemoteDsg::Given("/given/dsg".into());
        let legacy = RemoteDsg::Legacy("/legacy/dsg".into());
        let pick = |host, repo, env, user| choose_remote_dsg(host, repo, env, user).path;
        assert_eq!(pick("h", Some(&given), Some("/env"), user), "/given/dsg");
        assert_eq!(pick("h", Some(&legacy), Some("/env"), user), "/env");
        assert_eq!(pick("h", Some(&legacy), Some(""), user), "/user/dsg");
        assert_eq!(pick("h", Some(&legacy), None, user), "/user/dsg");
        assert_eq!(pick("other", Some(&legacy), None, user), "/legacy/dsg");
        assert_eq!(pick("other", None, None, user), "dsg");
        assert_eq!(pick("h", None, None, None), "dsg");
        let c = choose_remote_dsg("h", Some(&legacy), None, user);
        assert!(c.from.contains("remote_dsg.h") && c.from.contains("/u/dsg.yml"));
        let c = choose_remote_dsg("x", Some(&legacy), None, user);
        assert!(c.from.contains("repository.remote_dsg"), "{}", c.from);
    }

    #[test]
    fn user_config_remote_dsg_map() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.yml");
        let b = d.path().join("b.yml");
        std::fs::write(
            &a,
            "user_name: A\nuser_id: a@example.org\nremote_dsg:\n  h1: /a/dsg\n",
        )
        .unwrap();
        std::fs::write(&b, "remote_dsg: {h2: /b/dsg}\n").unwrap();
        let paths = [a.clone(), b.clone()];
        let u = UserConfig::load_from(&paths).unwrap();
        // Shallow merge, like every user-config key: the later file's map.
        assert_eq!(u.remote_dsg.keys().collect::<Vec<_>>(), ["h2"]);
        let (m, from) = user_remote_dsg(&paths).unwrap().unwrap();
        assert_eq!((m["h2"].as_str(), from), ("/b/dsg", b.clone()));
        for (bad, key) in [
            ("remote_dsg: /opt/dsg\n", "'remote_dsg'"),
            ("remote_dsg: {h: [x]}\n", "'remote_dsg.h'"),
            ("remote_dsg: {h: \"-oProxyCommand=x\"}\n", "'remote_dsg.h'"),
            ("remote_dsg: {h: \"\"}\n", "'remote_dsg.h'"),
        ] {
            std::fs::write(&b, bad).unwrap();
            for e in [
                UserConfig::load_from(&paths).unwrap_err(),
                user_remote_dsg(&paths).unwrap_err(),
            ] {
                let e = e.to_string();
                assert!(
                    e.contains("b.yml") && e.contains(key) && e.contains("hint:"),
                    "{bad}: {e}"
                );
            }
        }
    }

    #[test]
    fn remote_dsg_is_saved_in_the_users_own_config() {
        let d = tempfile::tempdir().unwrap();
        let low = d.path().join("low/dsg.yml");
        let high = d.path().join("high/dsg.yml");
        std::fs::create_dir_all(low.parent().unwrap()).unwrap();
        std::fs::write(
            &low,
            "user_name: A\nuser_id: a@example.org\nremote_dsg: {old: /old/dsg}\n",
        )
        .unwrap();
        let paths = [PathBuf::from("/etc/dsg/dsg.yml"), low.clone(), high.clone()];

        // The highest-priority file is created, carrying the map in effect.
        let e = plan_remote_dsg(&paths, "srv", "/opt/dsg").unwrap();
        assert_eq!(e.file, high);
        assert!(e.changes() && !high.exists());
        e.write().unwrap();
        let m = user_remote_dsg(&paths).unwrap().unwrap().0;
        assert_eq!(m["srv"], "/opt/dsg");
        assert_eq!(m["old"], "/old/dsg");
        assert_eq!(UserConfig::load_from(&paths).unwrap().user_name, "A");

        // Saying it again changes nothing.
        assert!(!plan_remote_dsg(&paths, "srv", "/opt/dsg")
            .unwrap()
            .changes());

        // An existing file keeps its other keys and comments; its block is
        // replaced, not repeated.
        std::fs::write(
            &high,
            "# mine\nuser_name: B\nremote_dsg:\n  srv: /x\n  # note\n  other: /y\ndefault_host: srv\n",
        )
        .unwrap();
        plan_remote_dsg(&paths, "srv", "/new/dsg")
            .unwrap()
            .write()
            .unwrap();
        plan_remote_dsg(&paths, "third", "/t/dsg")
            .unwrap()
            .write()
            .unwrap();
        let text = std::fs::read_to_string(&high).unwrap();
        assert!(text.starts_with("# mine\nuser_name: B\n"), "{text}");
        assert_eq!(text.matches("remote_dsg:").count(), 1, "{text}");
        assert_eq!(text.matches(REMOTE_DSG_COMMENT).count(), 1, "{text}");
        let u = UserConfig::load_from(&paths).unwrap();
        assert_eq!(u.default_host.as_deref(), Some("srv"));
        assert_eq!(u.user_name, "B");
        let want: BTreeMap<String, String> = [
            ("srv".to_string(), "/new/dsg".to_string()),
            ("other".into(), "/y".into()),
            ("third".into(), "/t/dsg".into()),
        ]
        .into();
        assert_eq!(u.remote_dsg, want);

        // A layout the line edit cannot handle is refused, not mangled.
        std::fs::write(&high, "{user_name: B,\n remote_dsg: {a: /b}}\n").unwrap();
        let err = plan_remote_dsg(&paths, "srv", "/z")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("high/dsg.yml") && err.contains("hint:") && err.contains("srv"),
            "{err}"
        );

        // A bad path is refused naming the key.
        let err = plan_remote_dsg(&paths, "srv", "-x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("remote_dsg.srv"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn saving_remote_dsg_keeps_a_symlinked_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("dotfiles/dsg.yml");
        std::fs::create_dir_all(real.parent().unwrap()).unwrap();
        std::fs::write(&real, "user_name: A\nuser_id: a@example.org\n").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = d.path().join("dsg.yml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        plan_remote_dsg(std::slice::from_ref(&link), "h", "/d")
            .unwrap()
            .write()
            .unwrap();
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
        let mode = std::fs::metadata(&real).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            UserConfig::load_from(&[link]).unwrap().remote_dsg["h"],
            "/d"
        );
    }
}
