//! `dsg list-repos`: the repositories in one directory of a host (the user
//! config's `default_host` and `default_project_path`, or given), through
//! the agent's `ListRepos` — on a thread of this process for localhost,
//! over SSH otherwise. The agent is started on that directory as if it were
//! a repository, so `--restrict-to` checks it like any other.

use std::path::{Component, Path, PathBuf};

use dsg_core::config::{
    is_local_host, DiscoveryDefaults, IgnoreRules, ProjectConfig, RepoType, Repository,
};
use dsg_repo::list::RepoInfo;
use dsg_repo::RepoClient;

use crate::{EngineError, Result};

/// Where to look: a host and a directory on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Location {
    pub host: String,
    pub path: PathBuf,
}

/// The location from `host`/`path` when given, else the user config's
/// defaults; `None` when no directory is configured (nothing to list).
pub fn location(host: Option<String>, path: Option<PathBuf>) -> Result<Option<Location>> {
    let d = match (&host, &path) {
        (Some(_), Some(_)) => DiscoveryDefaults::default(),
        _ => DiscoveryDefaults::load()?,
    };
    let host = host
        .or(d.default_host)
        .unwrap_or_else(|| "localhost".to_string());
    let Some(path) = path.or(d.default_project_path) else {
        return Ok(None);
    };
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(EngineError::Usage(format!(
            "--repo-path {}: give an absolute path without '..'",
            path.display()
        )));
    }
    if host.starts_with('-') || host.is_empty() {
        return Err(EngineError::Usage(format!(
            "--host {host:?} is not a host name"
        )));
    }
    Ok(Some(Location { host, path }))
}

/// A connection to the agent for `dir` (served like a repository
/// directory: its own `.dsg/` is never touched by a listing).
fn connect(loc: &Location) -> Result<RepoClient> {
    let dir = &loc.path;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            EngineError::Usage(format!(
                "{} cannot be listed: name a directory below /",
                dir.display()
            ))
        })?
        .to_string();
    let cfg = ProjectConfig {
        name,
        repository: Repository {
            kind: RepoType::Xfs,
            host: loc.host.clone(),
            mountpoint: dir.parent().unwrap_or(Path::new("/")).to_path_buf(),
            pool: None,
            remote_dsg: None,
            s3: None,
        },
        data_dirs: ProjectConfig::default_data_dirs(),
        ignore: IgnoreRules::default(),
        legacy_format: false,
    };
    Ok(RepoClient::connect(&cfg)?)
}

/// The repositories at `loc`, sorted by name.
pub fn list(loc: &Location) -> Result<Vec<RepoInfo>> {
    if is_local_host(&loc.host) && !loc.path.is_dir() {
        return Err(EngineError::State {
            message: format!("{} is not a directory", loc.path.display()),
            hint: "check default_project_path in your dsg.yml, or pass --repo-path".into(),
        });
    }
    let mut client = connect(loc)?;
    let repos = client.list_repos()?;
    let _ = client.close();
    Ok(repos)
}

/// The repositories under an object store's bucket and prefix, sorted by
/// name (read in this process: an object store has no agent).
pub fn list_s3(loc: &dsg_core::config::S3Location) -> Result<Vec<RepoInfo>> {
    dsg_repo::s3::list_repos(loc).map_err(|e| {
        EngineError::from(dsg_repo::client::RepoError::Remote {
            host: loc.endpoint.clone(),
            repo: format!("s3://{}/{}", loc.bucket, loc.prefix),
            err: e.to_remote(),
        })
    })
}
