//! `dsg agent --restrict-to`: which repositories a restricted agent serves,
//! and what it accepts as its command line when sshd runs it as a forced
//! command (`command="dsg agent --restrict-to DIR"` in authorized_keys).
//! Nothing the client sends is trusted: the path is resolved here, on the
//! server, before any backend opens it.

use std::io;
use std::path::{Component, Path, PathBuf};

use dsg_core::config::RepoType;

/// What the client asked the agent to serve.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub repo: PathBuf,
    pub kind: RepoType,
    pub pool: Option<String>,
}

/// Why a restricted agent will not serve a repository.
#[derive(Debug)]
pub struct Refusal {
    pub message: String,
    pub hint: String,
}

/// The client's command from `SSH_ORIGINAL_COMMAND`, accepted only in the
/// exact shape `ssh.rs` sends: `DSG agent --repo X --type T [--pool P]`.
/// Anything else (a shell command, extra options) is refused: the key
/// exists to reach repositories, and a lenient parser would be the place
/// where it starts doing something else.
pub fn parse_original_command(cmd: &str) -> Result<Target, String> {
    let words = shell_words::split(cmd).map_err(|e| format!("not a valid command line ({e})"))?;
    // argv[0] is never run (this process is the agent already); any path
    // is accepted because clients choose it (remote_dsg, DSG_REMOTE_DSG).
    let (argv0, rest) = words
        .split_first()
        .ok_or_else(|| "an empty command".to_string())?;
    if argv0.is_empty() || argv0.starts_with('-') {
        return Err(format!("{argv0:?} is not a dsg program"));
    }
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let (repo, kind, pool) = match rest.as_slice() {
        ["agent", "--repo", repo, "--type", kind] => (repo, kind, None),
        ["agent", "--repo", repo, "--type", kind, "--pool", pool] => (repo, kind, Some(pool)),
        _ => return Err("not `dsg agent --repo DIR --type T [--pool P]`".into()),
    };
    let kind = match *kind {
        "xfs" => RepoType::Xfs,
        "zfs" => RepoType::Zfs,
        other => return Err(format!("unknown repository type {other:?}")),
    };
    if repo.is_empty() {
        return Err("an empty --repo".into());
    }
    Ok(Target {
        repo: PathBuf::from(repo),
        kind,
        pool: pool.map(|p| p.to_string()),
    })
}

/// The repository's real path (symlinks resolved) when it lies in or below
/// one of `allowed`; the agent must then open this path, not the client's.
pub fn check(repo: &Path, allowed: &[PathBuf]) -> Result<PathBuf, Refusal> {
    let list = allowed
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let outside = || Refusal {
        message: format!(
            "the repository {} is outside the allowed paths of this agent ({list})",
            repo.display()
        ),
        hint: format!(
            "this SSH key only reaches repositories under {list}: set repository.repo_path \
             to one of them, or ask the server's administrator to allow the path"
        ),
    };
    if repo.components().any(|c| c == Component::ParentDir) {
        return Err(Refusal {
            message: format!(
                "the repository path {} contains '..', which an agent restricted to {list} refuses",
                repo.display()
            ),
            hint: "give the repository path without '..' (repository.repo_path in .dsgconfig.yml)"
                .into(),
        });
    }
    let real = resolve(repo).map_err(|e| Refusal {
        message: format!("cannot resolve the repository path {}: {e}", repo.display()),
        hint: format!("the repository must be a directory under {list}"),
    })?;
    // An allowed path that does not exist (yet) still bounds by its name.
    let roots = allowed
        .iter()
        .map(|a| resolve(a).unwrap_or_else(|_| a.clone()));
    for root in roots {
        if real.starts_with(&root) {
            return Ok(real);
        }
    }
    Err(outside())
}

/// `p` absolute with every symlink resolved. The repository need not exist
/// yet (`init` creates it), so the deepest existing ancestor is
/// canonicalised and the missing rest appended: a name that does not exist
/// cannot be a symlink. A dangling symlink would be followed when the
/// agent creates the repository, so it is an error, not a missing name.
fn resolve(p: &Path) -> io::Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    // Collecting the components drops `.` and doubled slashes.
    let abs: PathBuf = abs.components().collect();
    let mut existing = abs.as_path();
    let mut missing = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(mut real) => {
                real.extend(missing.iter().rev());
                return Ok(real);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if existing.symlink_metadata().is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} is a symlink to nowhere", existing.display()),
                    ));
                }
                let (Some(name), Some(parent)) = (existing.file_name(), existing.parent()) else {
                    return Err(e);
                };
                missing.push(name);
                existing = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_what_dsg_sends() {
        let t =
            parse_original_command("/opt/dsg/bin/dsg agent --repo '/srv/a b' --type xfs").unwrap();
        assert_eq!(t.repo, PathBuf::from("/srv/a b"));
        assert_eq!(t.kind, RepoType::Xfs);
        let t = parse_original_command("dsg agent --repo /srv/a --type zfs --pool tank").unwrap();
        assert_eq!(t.pool.as_deref(), Some("tank"));
        for bad in [
            "",
            "echo pwned; touch /tmp/x",
            "sh -c 'dsg agent --repo /srv/a --type xfs'",
            "dsg agent --repo /srv/a --type xfs; rm -rf /",
            "dsg agent --repo /srv/a --type xfs --restrict-to /",
            "dsg agent --type xfs --repo /srv/a",
            "dsg agent --repo /srv/a --type ext4",
            "dsg agent --repo '' --type xfs",
            "--repo /srv/a agent --repo /srv/a --type xfs",
            "dsg agent --repo '/srv/a",
        ] {
            assert!(parse_original_command(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn paths_stay_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::os::unix::fs::symlink(&b, a.join("out")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), a.join("dangling")).unwrap();
        let allowed = [a.clone()];
        let real_a = a.canonicalize().unwrap();
        assert_eq!(check(&a.join("r"), &allowed).unwrap(), real_a.join("r"));
        assert_eq!(check(&a, &allowed).unwrap(), real_a);
        assert_eq!(check(&a.join("x/y"), &allowed).unwrap(), real_a.join("x/y"));
        for bad in [
            b.join("r"),
            a.join("../b/r"),
            a.join("out/r"),
            a.join("dangling"),
            a.join("dangling/r"),
            tmp.path().join("ab"),
            PathBuf::from("/"),
        ] {
            assert!(check(&bad, &allowed).is_err(), "allowed {}", bad.display());
        }
    }
}
