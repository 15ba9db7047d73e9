//! Reading old snapshots through the repository: `snapfetch` (one file's
//! bytes as of a snapshot, verified and written atomically) and the deep
//! validation of a snapshot (`validate-snapshot --deep`: every file
//! re-hashed on the repository host by the agent, nothing downloaded).
//!
//! A snapshot is found by name, not by walking the chain: its manifest is
//! the repository's head, or one archive (`.dsg/archive/sN-sync.json.lz4`,
//! this client's copy when it has one, else the repository's), so a
//! fetch takes the same time whatever the snapshot's age.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use dsg_core::atomic::AtomicFile;
use dsg_core::hash::Hash;
use dsg_core::manifest::{
    archive_from_bytes, archive_name, read_archive, strict_snapshot_number, EntryKind, Manifest,
};
use dsg_repo::protocol::RehashProblem;
use dsg_repo::{Incoming, Meta, RepoClient, RepoError};
use xxhash_rust::xxh3::Xxh3;

use crate::{check_interrupt, EngineError, Project, Reporter, Result};

/// Which snapshot: the repository's head, one by id, or the K-th newest
/// (`-n 1` is the head, `-n 2` the one before it, as `snapmount -n`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Which {
    Head,
    Id(String),
    Newest(u64),
}

impl Which {
    /// `--snapshot` text: `head` or `s<N>`.
    pub fn parse(s: &str) -> Result<Which> {
        if s == "head" {
            return Ok(Which::Head);
        }
        match strict_snapshot_number(s) {
            Some(_) => Ok(Which::Id(s.to_string())),
            None => Err(EngineError::Usage(format!(
                "--snapshot {s:?}: name a snapshot as s<N> (e.g. s3) or head"
            ))),
        }
    }
}

/// A snapshot found: its id and manifest (checked).
pub struct Snapshot {
    pub id: String,
    pub manifest: Manifest,
    /// The repository's head id.
    pub head_id: String,
}

/// Finds snapshot `which` of the repository: the head's manifest (this
/// client's cache when it is the same file), else the archive of that
/// snapshot (this client's copy, else the repository's).
pub fn resolve(project: &Project, client: &mut RepoClient, which: &Which) -> Result<Snapshot> {
    let cached = project.cache_hash()?;
    let head = match crate::status::fetch_remote(client, cached)? {
        Some((m, _)) => m,
        None => project.load_cache_tagged(cached.expect("unchanged from the cache"), false)?,
    };
    let head_id = head
        .metadata
        .as_ref()
        .map(|m| m.snapshot_id.clone())
        .unwrap_or_default();
    let head_n = strict_snapshot_number(&head_id).ok_or_else(|| EngineError::State {
        message: format!("the repository's head has snapshot id {head_id:?}, not s<N>"),
        hint: "the repository's head manifest was not written by dsg".into(),
    })?;
    let n = match which {
        Which::Head => head_n,
        Which::Id(id) => strict_snapshot_number(id).expect("checked by Which::parse"),
        Which::Newest(0) => {
            return Err(EngineError::Usage(
                "-n counts from 1 (the head); -n 2 is the snapshot before it".into(),
            ))
        }
        Which::Newest(k) if *k > head_n => {
            return Err(EngineError::State {
                message: format!("-n {k}: the repository has {head_n} snapshots (s1 to {head_id})"),
                hint: "dsg log lists the snapshots".into(),
            })
        }
        Which::Newest(k) => head_n - (k - 1),
    };
    let id = format!("s{n}");
    if n > head_n {
        return Err(EngineError::State {
            message: format!("snapshot {id} does not exist: the repository's head is {head_id}"),
            hint: "dsg log lists the snapshots".into(),
        });
    }
    if n == head_n {
        return Ok(Snapshot {
            id,
            manifest: head,
            head_id,
        });
    }
    let name = archive_name(&id);
    let local = project.dsg().join("archive").join(&name);
    let manifest = if local.is_file() {
        read_archive(&local)?
    } else {
        let origin = format!("{}:{}/.dsg/archive/{name}", client.host(), client.repo());
        match client.read_meta(&format!("archive/{name}"), None)? {
            Meta::Data(b) => archive_from_bytes(&b, Path::new(&origin))?,
            _ => {
                return Err(EngineError::State {
                    message: format!(
                        "snapshot {id} is not in the repository's history (no archive {origin})"
                    ),
                    hint: "dsg log lists the snapshots; a pruned snapshot cannot be read".into(),
                })
            }
        }
    };
    let found = manifest.metadata.as_ref().map(|m| m.snapshot_id.as_str());
    if found != Some(id.as_str()) {
        return Err(EngineError::State {
            message: format!(
                "the archive of {id} holds snapshot {:?}",
                found.unwrap_or("")
            ),
            hint: "the archive was altered; dsg validate-chain checks the whole history".into(),
        });
    }
    manifest
        .verify_integrity()
        .map_err(|msg| EngineError::State {
            message: format!("the manifest of {id} fails its integrity check: {msg}"),
            hint: "the archive was altered; dsg validate-chain checks the whole history".into(),
        })?;
    Ok(Snapshot {
        id,
        manifest,
        head_id,
    })
}

/// Where `snapfetch` writes.
#[derive(Clone, Debug)]
pub enum Dest {
    Stdout,
    File(PathBuf),
}

pub struct FetchOpts {
    /// The project-relative path, as manifests record it.
    pub file: String,
    pub which: Which,
    pub dest: Dest,
    /// Replace an existing output file.
    pub force: bool,
    pub dry_run: bool,
}

#[derive(Debug, Serialize)]
pub struct FetchReport {
    pub snapshot_id: String,
    pub head_id: String,
    pub file: String,
    /// The file written, or `-` for stdout.
    pub output: String,
    pub size: u64,
    pub hash: String,
    pub dry_run: bool,
    /// An existing output was replaced (`--force`).
    pub replaced: bool,
}

/// The bytes of `opts.file` as of the chosen snapshot, verified against
/// the hash its manifest records, written atomically (never over an
/// existing file without `force`). A mismatch writes nothing.
pub fn snapfetch(
    project: &Project,
    client: &mut RepoClient,
    opts: &FetchOpts,
    reporter: &dyn Reporter,
) -> Result<FetchReport> {
    let snap = resolve(project, client, &opts.which)?;
    let e = snap
        .manifest
        .get(&opts.file)
        .ok_or_else(|| EngineError::State {
            message: format!("{} is not in snapshot {}", opts.file, snap.id),
            hint: "give the path as the manifest records it (relative to the project root); dsg blame FILE shows the snapshots that hold it".into(),
        })?;
    let (size, hash) = match &e.kind {
        EntryKind::File { size, hash, .. } => (*size, *hash),
        EntryKind::Link { target } => {
            return Err(EngineError::State {
                message: format!(
                    "{} is a symbolic link to {target:?} in snapshot {}, not a file",
                    opts.file, snap.id
                ),
                hint: "fetch the file it points to".into(),
            })
        }
    };
    let hash = hash.ok_or_else(|| EngineError::State {
        message: format!(
            "{} in snapshot {} has no recorded hash (written by the original dsg), so its bytes cannot be verified",
            opts.file, snap.id
        ),
        hint: "nothing was fetched".into(),
    })?;
    let output = match &opts.dest {
        Dest::Stdout => "-".to_string(),
        Dest::File(p) => p.display().to_string(),
    };
    let existing = match &opts.dest {
        Dest::File(p) => std::fs::symlink_metadata(p).ok(),
        Dest::Stdout => None,
    };
    if let Some(md) = &existing {
        if md.is_dir() || !opts.force {
            return Err(EngineError::State {
                message: format!(
                    "{output} exists{}; nothing was written",
                    if md.is_dir() {
                        " and is a directory"
                    } else {
                        ""
                    }
                ),
                hint: "choose another output with -o, or pass --force to replace it".into(),
            });
        }
    }
    let report = FetchReport {
        snapshot_id: snap.id.clone(),
        head_id: snap.head_id.clone(),
        file: opts.file.clone(),
        output,
        size,
        hash: hash.to_hex(),
        dry_run: opts.dry_run,
        replaced: existing.is_some(),
    };
    if opts.dry_run {
        return Ok(report);
    }
    // Stdout gets the bytes only once verified: they are spooled in the
    // project's .dsg/ (a killed command's temp file is removed there).
    let target = match &opts.dest {
        Dest::File(p) => p.clone(),
        Dest::Stdout if project.dsg().is_dir() => project.dsg().join("snapfetch"),
        Dest::Stdout => std::env::temp_dir().join("dsg-snapfetch"),
    };
    let mut out = AtomicFile::create(&target).map_err(|e| EngineError::io(&e.path, e.source))?;
    let tmp_err = |e: std::io::Error| EngineError::io(&target, e);
    reporter.transfer_start("fetching", 1, size);
    let mut got: Option<(u64, Hash)> = None;
    let mut buf = vec![0u8; 1 << 20];
    let fetched = client.get_versions(&snap.id, &[opts.file.as_str()], |inc| {
        let Incoming::File { data, .. } = inc else {
            return Err(std::io::Error::other(
                "the repository holds a link where the manifest records a file",
            ));
        };
        let (n, h) = copy_hashing(data, out.file(), &mut buf, reporter)?;
        got = Some((n, h));
        Ok(())
    });
    reporter.transfer_done();
    check_interrupt()?;
    fetched.map_err(|e| match e {
        RepoError::Local { msg, .. } if msg.contains("interrupted") => EngineError::Interrupted,
        other => other.into(),
    })?;
    let (n, h) = got.ok_or_else(|| EngineError::State {
        message: format!("the repository sent nothing for {}", opts.file),
        hint: "nothing was written; run the command again".into(),
    })?;
    if n != size || h != hash {
        return Err(EngineError::State {
            message: format!(
                "{} of snapshot {} failed verification: the repository sent {n} bytes hashing to {}, the manifest records {size} bytes hashing to {}; nothing was written",
                opts.file,
                snap.id,
                h.to_hex(),
                hash.to_hex()
            ),
            hint: format!(
                "the repository's copy is damaged; 'dsg validate-snapshot --deep --snapshot {}' checks the whole snapshot",
                snap.id
            ),
        });
    }
    if let (Dest::File(_), EntryKind::File { mtime, .. }) = (&opts.dest, &e.kind) {
        if let Some(s) = mtime.unix_secs() {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.max(0) as u64);
            let _ = out.file().set_modified(t);
        }
    }
    match &opts.dest {
        Dest::File(_) => out.commit(opts.force).map_err(|e| {
            if e.source.kind() == std::io::ErrorKind::AlreadyExists {
                EngineError::State {
                    message: format!("{} appeared meanwhile; nothing was written", report.output),
                    hint: "choose another output with -o, or pass --force to replace it".into(),
                }
            } else {
                EngineError::io(&e.path, e.source)
            }
        })?,
        Dest::Stdout => {
            let f = out.file();
            std::io::Seek::rewind(f).map_err(tmp_err)?;
            let mut so = std::io::stdout().lock();
            std::io::copy(f, &mut so)
                .and_then(|_| so.flush())
                .map_err(|e| EngineError::io("stdout", e))?;
        }
    }
    Ok(report)
}

/// Copies `data` into `out`, hashing; stops (an error) on Ctrl-C.
fn copy_hashing(
    data: &mut dyn Read,
    out: &mut std::fs::File,
    buf: &mut [u8],
    reporter: &dyn Reporter,
) -> std::io::Result<(u64, Hash)> {
    let mut h = Xxh3::new();
    let mut n = 0u64;
    loop {
        if check_interrupt().is_err() {
            return Err(std::io::Error::other("interrupted"));
        }
        let k = data.read(buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        out.write_all(&buf[..k])?;
        n += k as u64;
        reporter.transfer_progress(0, n);
    }
    Ok((n, Hash(h.digest())))
}

#[derive(Debug, Serialize)]
pub struct DeepReport {
    pub snapshot_id: String,
    pub head_id: String,
    pub files: u64,
    pub bytes: u64,
    pub entries_hash: String,
    pub problems: Vec<RehashProblem>,
    pub problem_count: u64,
    pub ok: bool,
}

/// `validate-snapshot --deep`: the agent re-hashes every file of the
/// snapshot where it is stored and compares with that snapshot's manifest
/// there; the manifest it used must also be the one this client resolved
/// (its own copy when it has one).
pub fn deep_validate(
    project: &Project,
    client: &mut RepoClient,
    which: &Which,
    reporter: &dyn Reporter,
) -> Result<DeepReport> {
    let snap = resolve(project, client, which)?;
    let (files, bytes) = snap
        .manifest
        .entries()
        .iter()
        .fold((0u64, 0u64), |(f, b), e| match e.kind {
            EntryKind::File { size, .. } => (f + 1, b + size),
            _ => (f, b),
        });
    reporter.transfer_start("re-hashing on the repository host", files, bytes);
    let r = client.rehash(&snap.id, |f, b| reporter.transfer_progress(f, b));
    reporter.transfer_done();
    let r = r?;
    let mut problems = r.problems;
    let mut count = r.problem_count;
    let ours = snap
        .manifest
        .metadata
        .as_ref()
        .map(|m| m.entries_hash.clone())
        .unwrap_or_default();
    if r.entries_hash != ours {
        count += 1;
        problems.insert(
            0,
            RehashProblem {
                path: String::new(),
                problem: format!(
                    "the repository's manifest of {} (entries_hash {}) is not the one this client holds ({ours})",
                    snap.id, r.entries_hash
                ),
            },
        );
    }
    Ok(DeepReport {
        snapshot_id: snap.id,
        head_id: snap.head_id,
        files: r.files,
        bytes: r.bytes,
        entries_hash: r.entries_hash,
        ok: count == 0,
        problems,
        problem_count: count,
    })
}
