//! History reads on the repository host: a file's bytes as of any
//! snapshot (`GetVersions`) and a snapshot re-hashed in place (`Rehash`).
//!
//! A snapshot's manifest is the head (`.dsg/last-sync.json`) or its archive
//! (`.dsg/archive/sN-sync.json.lz4`): one file, found by name, whatever the
//! snapshot's age. Its bytes: on a directory repository the head's files
//! are the tree and every superseded or deleted version was moved to
//! `.dsg/objects/<hh>/<hash>`, so a version is the tree's file when the
//! head holds the same content at that path, else its object; on ZFS the
//! snapshot's own tree (`@sN`, `Zfs::open_snapshot`), or the live tree for
//! the head.
//!
//! Nothing here trusts the client: the snapshot id must be exactly `s<N>`
//! (the archive name and the ZFS snapshot name are rebuilt from the
//! number), paths are checked like every other request's, no symlinked
//! parent is followed, and everything is read under the shared lock.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dsg_core::hash::Hash;
use dsg_core::manifest::{archive_name, read_archive, strict_snapshot_number, EntryKind, Manifest};
use dsg_core::paths::check_relpath;

use crate::backend::{AgentError, Backend, Stored, Version};
use crate::protocol::{
    write_json, ErrorKind, RehashProblem, RehashReport, Response, MAX_REHASH_PROBLEMS,
};
use crate::site::Site;
use crate::store::{SnapshotTree, Store};

/// `s<N>` exactly, rebuilt from its number; anything else is refused.
pub fn checked_snapshot_id(snapshot: &str) -> Result<String, AgentError> {
    match strict_snapshot_number(snapshot) {
        Some(n) if format!("s{n}") == snapshot => Ok(format!("s{n}")),
        _ => Err(AgentError::new(
            ErrorKind::Unsafe,
            format!("refusing snapshot id {snapshot:?}: not of the form s<N>"),
        )
        .hint("name a snapshot as dsg log shows it, e.g. s3")),
    }
}

/// Opens a repository path in the tree at `root`: never through a
/// symlinked parent, never following a final symlink (a link is answered
/// as its target text).
pub(crate) fn open_in_tree(root: &Path, path: &str) -> Result<Stored, AgentError> {
    check_relpath(path).map_err(|e| AgentError::new(ErrorKind::Unsafe, e.to_string()))?;
    let p = root.join(path);
    if let Some(parent) = Path::new(path).parent() {
        let mut cur = root.to_path_buf();
        for c in parent.components() {
            cur.push(c);
            if fs::symlink_metadata(&cur)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false)
            {
                return Err(AgentError::new(
                    ErrorKind::Unsafe,
                    format!("{path}: a parent is a symlink"),
                ));
            }
        }
    }
    let md = fs::symlink_metadata(&p)
        .map_err(|e| AgentError::io(format!("{path} in the repository"), e))?;
    if md.file_type().is_symlink() {
        let t = fs::read_link(&p).map_err(|e| AgentError::io(path, e))?;
        return Ok(Stored::Link {
            target: t.to_string_lossy().into(),
        });
    }
    if !md.is_file() {
        return Err(AgentError::new(
            ErrorKind::Corrupt,
            format!("{path} in the repository is not a file"),
        ));
    }
    let file = open_regular(&p).map_err(|e| AgentError::io(path, e))?;
    Ok(Stored::File {
        file,
        size: md.size(),
    })
}

fn open_regular(p: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
}

/// The manifest of snapshot `snap` (checked), and the head's when that is
/// another snapshot (`None`: `snap` is the head).
fn manifest_of(site: &Site, snap: &str) -> Result<(Manifest, Option<Manifest>), AgentError> {
    let head = site.head()?.ok_or_else(|| {
        AgentError::new(
            ErrorKind::NotFound,
            format!(
                "{} is not a dsg repository (no .dsg/last-sync.json)",
                site.dir().display()
            ),
        )
    })?;
    let head_id = head.metadata.as_ref().map(|m| m.snapshot_id.clone());
    if head_id.as_deref() == Some(snap) {
        return Ok((head, None));
    }
    let archive = site.dsg().join("archive").join(archive_name(snap));
    let gz = site
        .dsg()
        .join("archive")
        .join(format!("{snap}-sync.json.gz"));
    let path = if archive.is_file() || !gz.is_file() {
        archive
    } else {
        gz
    };
    let m = match read_archive(&path) {
        Ok(m) => m,
        Err(dsg_core::manifest::ManifestError::Io { source, .. })
            if source.kind() == io::ErrorKind::NotFound =>
        {
            return Err(AgentError::new(
                ErrorKind::NotFound,
                format!(
                    "snapshot {snap} does not exist here (the head is {}; no archive {})",
                    head_id.as_deref().unwrap_or("unknown"),
                    path.display()
                ),
            )
            .hint("dsg log lists the snapshots"))
        }
        Err(e) => return Err(AgentError::new(ErrorKind::Corrupt, e.to_string())),
    };
    let id = m.metadata.as_ref().map(|m| m.snapshot_id.as_str());
    if id != Some(snap) {
        return Err(AgentError::new(
            ErrorKind::Corrupt,
            format!(
                "the archive {} names snapshot {:?}, not {snap}",
                path.display(),
                id.unwrap_or("")
            ),
        ));
    }
    Ok((m, Some(head)))
}

/// A snapshot of a repository, open for reading.
struct RepoVersion {
    id: String,
    manifest: Manifest,
    /// Where the snapshot's whole tree is (the head's, or a ZFS snapshot's);
    /// `None`: a directory repository's old snapshot (head tree + objects).
    tree: Option<PathBuf>,
    /// For `tree: None`: the repository and its head manifest.
    dir: PathBuf,
    head: Option<Manifest>,
    _keep: Option<SnapshotTree>,
    /// When `dsg prune` removed this snapshot's data.
    pruned: Option<String>,
}

/// Opens snapshot `snapshot` of the repository at `site`.
pub(crate) fn open_version(
    site: &Site,
    store: &dyn Store,
    snapshot: &str,
) -> Result<Box<dyn Version>, AgentError> {
    let id = checked_snapshot_id(snapshot)?;
    let (manifest, head) = manifest_of(site, &id)?;
    let hash = manifest
        .metadata
        .as_ref()
        .and_then(|m| m.snapshot_hash.clone());
    let pruned = match head {
        Some(_) => crate::prune::record(site, store)?
            .get(&id, hash.as_deref())
            .map(|p| p.pruned_at.clone()),
        None => None,
    };
    let mut v = RepoVersion {
        id: id.clone(),
        manifest,
        tree: None,
        dir: site.dir(),
        head: None,
        _keep: None,
        pruned,
    };
    if head.is_none() {
        v.tree = Some(site.dir());
    } else if let Some(t) = match store.snapshot_tree(site, &id) {
        Err(e) if v.pruned.is_some() => return Err(v.pruned_error(None, e)),
        t => t?,
    } {
        v.tree = Some(t.path.clone());
        v._keep = Some(t);
    } else {
        v.head = head;
    }
    Ok(Box::new(v))
}

impl RepoVersion {
    /// The error for data of this (pruned) snapshot that is gone.
    fn pruned_error(&self, path: Option<&str>, cause: AgentError) -> AgentError {
        pruned_error(&self.id, self.pruned.as_deref(), path, cause)
    }
}

/// The error for data of snapshot `id` (pruned at `when`) that is gone.
pub(crate) fn pruned_error(
    id: &str,
    when: Option<&str>,
    path: Option<&str>,
    cause: AgentError,
) -> AgentError {
    let what = match path {
        Some(p) => format!("{p} of snapshot {id}"),
        None => format!("snapshot {id}"),
    };
    AgentError::new(
        ErrorKind::Pruned,
        format!(
            "{what} is no longer stored: the snapshot was pruned ({}) ({})",
            when.unwrap_or(""),
            cause.message
        ),
    )
    .hint("dsg prune removed it; its manifest is kept (dsg validate-snapshot checks it), and dsg log marks pruned snapshots")
}

impl Version for RepoVersion {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn pruned(&self) -> Option<&str> {
        self.pruned.as_deref()
    }

    fn open(&self, path: &str) -> Result<Stored, AgentError> {
        check_relpath(path).map_err(|e| AgentError::new(ErrorKind::Unsafe, e.to_string()))?;
        let e = self.manifest.get(path).ok_or_else(|| {
            AgentError::new(
                ErrorKind::NotFound,
                format!("{path} is not in snapshot {}", self.id),
            )
            .hint("dsg blame FILE shows the snapshots that hold it")
        })?;
        if let Some(tree) = &self.tree {
            return open_in_tree(tree, path);
        }
        // A directory repository: the head's tree holds this version when
        // the head has the same content at the path; otherwise it was
        // retired into the object store under its hash.
        let in_head = self
            .head
            .as_ref()
            .and_then(|h| h.get(path))
            .is_some_and(|h| h.same_content(e));
        if in_head {
            return open_in_tree(&self.dir, path);
        }
        match &e.kind {
            EntryKind::Link { target } => Ok(Stored::Link {
                target: target.to_string(),
            }),
            EntryKind::File { hash: Some(h), .. } => {
                let obj = dsg_txn::apply::object_path(&self.dir.join(".dsg"), *h);
                let md = fs::symlink_metadata(&obj).map_err(|err| {
                    let e = AgentError::io(
                        format!("{path} of {} (object {})", self.id, h.to_hex()),
                        err,
                    );
                    if self.pruned.is_some() && e.kind == ErrorKind::NotFound {
                        self.pruned_error(Some(path), e)
                    } else {
                        e
                    }
                })?;
                if !md.is_file() {
                    return Err(AgentError::new(
                        ErrorKind::Corrupt,
                        format!("object {} is not a file", obj.display()),
                    ));
                }
                let file = open_regular(&obj).map_err(|err| AgentError::io(obj.display(), err))?;
                Ok(Stored::File {
                    file,
                    size: md.size(),
                })
            }
            EntryKind::File { hash: None, .. } => Err(AgentError::new(
                ErrorKind::NotFound,
                format!(
                    "{path} of {}: its manifest records no hash (written by the original dsg), so no stored version can be found for it",
                    self.id
                ),
            )),
        }
    }
}

/// `GetVersions`: the files at `paths` as of `snapshot`, in `GetFiles`'
/// stream shape (a `File` and its data, or an `Err`, per path; then `Ok`).
pub(crate) fn serve_versions<W: Write>(
    backend: &mut dyn Backend,
    w: &mut W,
    buf: &mut Vec<u8>,
    snapshot: &str,
    paths: Vec<String>,
) -> io::Result<()> {
    if let Err(e) = backend.read_lock() {
        write_json(w, &Response::Err(e.to_remote()))?;
        return write_json(w, &Response::Ok);
    }
    let result = match backend.open_version(snapshot) {
        Ok(v) => {
            let mut r = Ok(());
            for p in paths {
                r = crate::agent::send_stored(w, buf, p.clone(), v.open(&p));
                if r.is_err() {
                    break;
                }
            }
            r
        }
        Err(e) => write_json(w, &Response::Err(e.to_remote())),
    };
    backend.read_unlock();
    result?;
    write_json(w, &Response::Ok)
}

/// `Rehash`: every entry of `snapshot` read and hashed here, against that
/// snapshot's manifest; `Progress` about once a second, then `Rehashed`.
pub(crate) fn serve_rehash<W: Write>(
    backend: &mut dyn Backend,
    w: &mut W,
    buf: &mut Vec<u8>,
    snapshot: &str,
) -> io::Result<()> {
    if let Err(e) = backend.read_lock() {
        return write_json(w, &Response::Err(e.to_remote()));
    }
    let result = match backend.open_version(snapshot) {
        // Its data is (partly) gone by design: nothing to re-hash, and
        // missing files are not damage.
        Ok(v) if v.pruned().is_some() => write_json(
            w,
            &Response::Err(
                AgentError::new(
                    ErrorKind::Pruned,
                    format!(
                        "snapshot {snapshot} was pruned ({}): its files are no longer all stored, so they cannot be re-hashed",
                        v.pruned().unwrap_or("")
                    ),
                )
                .hint(format!("its manifest is kept and still validates: dsg validate-snapshot --snapshot {snapshot}"))
                .to_remote(),
            ),
        ),
        Ok(v) => rehash(&*v, buf, w).and_then(|r| write_json(w, &Response::Rehashed(r))),
        Err(e) => write_json(w, &Response::Err(e.to_remote())),
    };
    backend.read_unlock();
    result
}

fn rehash<W: Write>(v: &dyn Version, buf: &mut Vec<u8>, w: &mut W) -> io::Result<RehashReport> {
    let m = v.manifest();
    let md = m.metadata.clone().unwrap_or_default();
    let mut report = RehashReport {
        snapshot_id: md.snapshot_id.clone(),
        entries_hash: md.entries_hash.clone(),
        snapshot_hash: md.snapshot_hash.clone().unwrap_or_default(),
        files: 0,
        bytes: 0,
        problems: Vec::new(),
        problem_count: 0,
    };
    let problem = |r: &mut RehashReport, path: &str, what: String| {
        r.problem_count += 1;
        if r.problems.len() < MAX_REHASH_PROBLEMS {
            r.problems.push(RehashProblem {
                path: path.to_string(),
                problem: what,
            });
        }
    };
    if let Err(e) = m.verify_integrity() {
        problem(
            &mut report,
            "",
            format!("the manifest fails its check: {e}"),
        );
    }
    buf.resize(crate::protocol::CHUNK, 0);
    let mut last = Instant::now();
    for e in m.entries() {
        match (&e.kind, v.open(&e.path)) {
            (_, Err(err)) => problem(&mut report, &e.path, err.message),
            (EntryKind::File { size, hash, .. }, Ok(Stored::File { mut file, .. })) => {
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                let mut n = 0u64;
                let read = loop {
                    match file.read(buf) {
                        Ok(0) => break Ok(()),
                        Ok(k) => {
                            h.update(&buf[..k]);
                            n += k as u64;
                        }
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                        Err(err) => break Err(err),
                    }
                };
                report.files += 1;
                report.bytes += n;
                let got = Hash(h.digest());
                if let Err(err) = read {
                    problem(&mut report, &e.path, format!("cannot read: {err}"));
                } else if n != *size || hash.is_some_and(|want| want != got) {
                    problem(
                        &mut report,
                        &e.path,
                        format!(
                            "content differs: {n} bytes hashing to {}, the manifest records {size} bytes hashing to {}",
                            got.to_hex(),
                            hash.map(|h| h.to_hex()).unwrap_or_else(|| "nothing".into())
                        ),
                    );
                }
            }
            (EntryKind::Link { target }, Ok(Stored::Link { target: t })) => {
                if **target != *t {
                    problem(
                        &mut report,
                        &e.path,
                        format!("link points to {t:?}, the manifest records {target:?}"),
                    );
                }
            }
            (EntryKind::File { .. }, Ok(Stored::Link { target })) => problem(
                &mut report,
                &e.path,
                format!("a link to {target:?} where the manifest records a file"),
            ),
            (EntryKind::Link { .. }, Ok(Stored::File { .. })) => problem(
                &mut report,
                &e.path,
                "a file where the manifest records a link".into(),
            ),
        }
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            write_json(
                w,
                &Response::Progress {
                    files: report.files,
                    bytes: report.bytes,
                },
            )?;
            w.flush()?;
        }
    }
    Ok(report)
}
