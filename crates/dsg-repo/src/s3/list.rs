//! `dsg list-repos` for an object store: the repositories under a bucket's
//! prefix, each `<prefix>/<name>/` holding a `HEAD`. Reads only; each
//! repository's head manifest is read (checked against `HEAD`) for its
//! snapshot, time, file count and size.

use dsg_core::config::S3Location;
use dsg_s3::{Location, Store};

use super::{err, S3Repo};
use crate::backend::AgentError;
use crate::list::{info_of, RepoInfo, MAX_REPOS};

/// The repositories under `loc`'s prefix, sorted by name. A folder without
/// `HEAD` is not one; a repository whose `HEAD` or manifest cannot be read
/// is listed with status `error`.
pub fn list_repos(loc: &S3Location) -> Result<Vec<RepoInfo>, AgentError> {
    let creds = dsg_s3::credentials().map_err(err)?;
    let top = Store::new(
        Location {
            endpoint: loc.endpoint.clone(),
            bucket: loc.bucket.clone(),
            prefix: loc.prefix.trim_matches('/').to_string(),
            region: loc.region(),
        },
        &creds,
    )
    .map_err(err)?;
    let names = top.list_dirs("").map_err(err)?;
    let mut out = Vec::new();
    for name in names {
        let repo = S3Repo::open(loc, &name)?;
        let head = match repo.read_head() {
            Ok(None) => continue,
            Ok(Some((doc, _))) => match doc.head {
                None => Ok(None),
                Some(r) => repo.load_manifest(&r).map(Some).map_err(|e| e.message),
            },
            Err(e) => Err(e.message),
        };
        out.push(info_of(&name, "s3", head));
        if out.len() >= MAX_REPOS {
            break;
        }
    }
    Ok(out)
}
