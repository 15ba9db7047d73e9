//! The repository-side agent: reads requests, drives a backend, answers.
//! `dsg agent` runs this on stdin/stdout (over SSH); locally the same loop
//! runs on a thread over pipes. One code path for every transport.

use std::io::{self, BufReader, BufWriter, Read, Write};

use crate::backend::{AgentError, Backend, CommitData, LocalFile, Stored};
use crate::protocol::{
    copy_as_data, read_data_bounded, read_data_bounded_to, read_json, write_data, write_json,
    Bounded, DataStream, ErrorKind, Request, Response, MAX_MANIFEST_BYTES, MAX_MESSAGES_BYTES,
    MAX_META_ENV, PROTOCOL_VERSION,
};

fn reply_err<W: Write>(w: &mut W, e: &AgentError) -> io::Result<()> {
    write_json(w, &Response::Err(e.to_remote()))
}

/// Sends `answer`: the response, or the error.
fn reply<W: Write>(w: &mut W, answer: Result<Response, AgentError>) -> io::Result<()> {
    match answer {
        Ok(r) => write_json(w, &r),
        Err(e) => reply_err(w, &e),
    }
}

/// Serves one connection until `Bye` or end of input. A connection that
/// ends with a transaction open rolls it back (the backend's drop does too).
pub fn serve(backend: &mut dyn Backend, input: impl Read, output: impl Write) -> io::Result<()> {
    serve_with(backend, input, output, false)
}

/// `local_sources`: the client is this process, so `PutFileLocal` may name
/// its files. Never true for an agent serving a remote client.
pub fn serve_with(
    backend: &mut dyn Backend,
    input: impl Read,
    output: impl Write,
    local_sources: bool,
) -> io::Result<()> {
    let mut r = BufReader::with_capacity(1 << 20, input);
    let mut w = BufWriter::with_capacity(1 << 16, output);
    // The first error among pipelined puts; reported at the next barrier.
    let mut sticky: Option<AgentError> = None;
    let mut buf = Vec::new();
    let result = serve_loop(
        backend,
        &mut r,
        &mut w,
        &mut sticky,
        &mut buf,
        local_sources,
    );
    match result {
        // `Bye`: the client is done; anything still open is abandoned.
        Ok(true) => {
            let _ = backend.rollback();
            Ok(())
        }
        // The connection ended without `Bye` (a cut link, a killed client):
        // keep the staged uploads for a resume; recovery removes them if
        // none comes.
        Ok(false) => {
            backend.detach();
            Ok(())
        }
        Err(e) => {
            backend.detach();
            Err(e)
        }
    }
}

/// Local uploads staged together at most: each holds an open file until
/// the batch is accepted.
const LOCAL_BATCH: usize = 128;

/// A local client's upload goes to `local` (`None` back); any other
/// request is handed back.
fn gather_local(req: Request, local_sources: bool, local: &mut Vec<LocalFile>) -> Option<Request> {
    match req {
        Request::PutFileLocal {
            path,
            size,
            hash,
            mtime_ns,
            src,
        } if local_sources => {
            local.push(LocalFile {
                path,
                size,
                hash,
                mtime_ns,
                src: src.into(),
            });
            None
        }
        other => Some(other),
    }
}

/// Stages the gathered local uploads; the first failure is kept for the
/// next barrier, as for uploads staged one by one. After a failure they
/// are skipped, as every upload is until that barrier.
fn stage_local(
    backend: &mut dyn Backend,
    files: &mut Vec<LocalFile>,
    sticky: &mut Option<AgentError>,
) {
    if files.is_empty() {
        return;
    }
    if sticky.is_none() {
        if let Err(e) = backend.stage_files_from(files) {
            *sticky = Some(e);
        }
    }
    files.clear();
}

/// Returns `Ok(true)` after `Bye`, `Ok(false)` when the input ended.
fn serve_loop<R: Read, W: Write>(
    backend: &mut dyn Backend,
    mut r: &mut R,
    mut w: &mut W,
    sticky: &mut Option<AgentError>,
    buf: &mut Vec<u8>,
    local_sources: bool,
) -> io::Result<bool> {
    // Snapshot mounts (ZFS clones) held for this connection: dropped, so
    // unmounted and destroyed, when it ends.
    let mut held: Vec<Box<dyn Send>> = Vec::new();
    // A local client's uploads, gathered until its next barrier (or any
    // other request) and then staged together: the backend may copy
    // several at once.
    let mut local: Vec<LocalFile> = Vec::new();
    // A commit checked and staged up to its commit point, waiting for the
    // client's `CommitPrepared` (dropped with the transaction otherwise).
    let mut prepared: Option<CommitData> = None;
    loop {
        let req: Request = match read_json(&mut r) {
            Ok(q) => q,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        };
        if prepared.is_some() && !matches!(req, Request::CommitPrepared) {
            // Anything else after a prepared commit (an upload over a
            // checked file, another commit) could change what was checked:
            // the transaction is undone first, never committed unchecked.
            prepared = None;
            *sticky = None;
            let _ = backend.rollback();
        }
        let Some(req) = gather_local(req, local_sources, &mut local) else {
            if local.len() >= LOCAL_BATCH {
                stage_local(backend, &mut local, sticky);
            }
            continue;
        };
        stage_local(backend, &mut local, sticky);
        match req {
            Request::Hello { protocol, .. } => hello(backend, &mut w, protocol)?,
            Request::ReadMeta { name, unless_hash } => {
                read_meta(backend, &mut w, buf, &name, unless_hash)?
            }
            Request::Begin {
                tx_id,
                base,
                user,
                resume,
                replace,
                base_hash,
            } => {
                *sticky = None;
                let how = BeginHow { resume, replace };
                begin(
                    backend,
                    &mut w,
                    &tx_id,
                    base.as_deref(),
                    base_hash.as_deref(),
                    &user,
                    how,
                )?
            }
            put @ (Request::PutFile { .. }
            | Request::PutFileLocal { .. }
            | Request::PutLink { .. }) => {
                // Uploads are not answered one by one: the first failure
                // is kept and reported at the next barrier.
                if let Err(e) = stage(backend, &mut r, put, sticky.is_some())? {
                    *sticky = Some(e);
                }
            }
            Request::Flush => match sticky.take() {
                None => write_json(&mut w, &Response::Ok)?,
                Some(e) => {
                    let _ = backend.rollback();
                    reply_err(&mut w, &e)?
                }
            },
            q @ (Request::Commit { .. } | Request::CommitPrepared) => {
                serve_commit(backend, &mut r, &mut w, sticky, &mut prepared, q)?
            }
            Request::Recover { wait } => {
                reply(&mut w, backend.recover(wait).map(|()| Response::Ok))?
            }
            Request::ListArchives => reply(
                &mut w,
                backend
                    .list_archives()
                    .map(|names| Response::Names { names }),
            )?,
            Request::Rollback => {
                *sticky = None;
                reply(&mut w, backend.rollback().map(|()| Response::Ok))?
            }
            Request::GetFiles { paths } => get_files(backend, &mut w, buf, paths)?,
            Request::GetVersions { snapshot, paths } => {
                crate::history::serve_versions(backend, &mut w, buf, &snapshot, paths)?
            }
            Request::Rehash { snapshot } => {
                crate::history::serve_rehash(backend, &mut w, buf, &snapshot)?
            }
            Request::Bye => {
                drop(std::mem::take(&mut held));
                write_json(&mut w, &Response::Ok)?;
                w.flush()?;
                return Ok(true);
            }
            Request::ListRepos => reply(
                &mut w,
                crate::list::list_dir(&backend.root()).map(|repos| Response::Repos { repos }),
            )?,
            Request::MountSnapshot {
                snapshot,
                mountpoint,
            } => match mount_snapshot(backend, local_sources, &snapshot, &mountpoint) {
                Ok((dataset, guard)) => {
                    held.push(guard);
                    write_json(&mut w, &Response::Mounted { dataset })?
                }
                Err(e) => reply_err(&mut w, &e)?,
            },
            Request::Prune {
                keep_last,
                keep_within_secs,
                dry_run,
                user,
            } => {
                let policy = crate::prune::Policy {
                    keep_last,
                    keep_within_secs,
                    dry_run,
                    user,
                };
                reply(&mut w, backend.prune(&policy).map(Response::Pruned))?
            }
        }
        // Answer promptly when the client is waiting; while it is still
        // sending puts there is nothing to flush.
        w.flush()?;
    }
}

/// `Commit` (in one step, or up to its commit point: then kept in
/// `prepared`) and `CommitPrepared`.
fn serve_commit<R: Read, W: Write>(
    backend: &mut dyn Backend,
    r: &mut R,
    w: &mut W,
    sticky: &mut Option<AgentError>,
    prepared: &mut Option<CommitData>,
    req: Request,
) -> io::Result<()> {
    match req {
        Request::Commit {
            snapshot_id,
            delta,
            prepare,
        } => match receive_commit(backend, r, w, sticky, snapshot_id, delta)? {
            Some(data) if prepare => *prepared = prepare_commit(backend, w, sticky.take(), data)?,
            Some(data) => commit(backend, w, sticky.take(), data)?,
            None => {}
        },
        Request::CommitPrepared => match prepared.take() {
            Some(data) => commit(backend, w, sticky.take(), data)?,
            None => reply_err(
                w,
                &AgentError::new(ErrorKind::Protocol, "no prepared commit to commit"),
            )?,
        },
        _ => unreachable!("serve_commit is called with commits only"),
    }
    Ok(())
}

/// A `Commit`'s streams: its manifest (spooled to a file when the backend
/// has a place for one: the agent never holds the manifest's text) and
/// sync-messages, each bounded. `None`: refused, the transaction rolled
/// back and the error sent.
fn receive_commit<R: Read, W: Write>(
    backend: &mut dyn Backend,
    r: &mut R,
    w: &mut W,
    sticky: &mut Option<AgentError>,
    snapshot_id: String,
    delta: bool,
) -> io::Result<Option<CommitData>> {
    let (max_manifest, max_messages) = meta_limits();
    let manifest = match backend.spool_file() {
        Some(mut f) => match read_data_bounded_to(r, max_manifest, &mut f)? {
            Bounded::Kept(_) => Ok(Ok(crate::backend::Blob::File(f))),
            Bounded::TooLarge(n) => Ok(Err(n)),
            Bounded::WriteFailed(e) => Err(e),
        },
        None => Ok(read_data_bounded(r, max_manifest)?.map(Into::into)),
    };
    // The dropped paths of a delta, held in memory: bounded like the
    // sync-messages (a client sends a delta only for a small change).
    let removed = match delta {
        true => Some(read_data_bounded(r, max_messages)?),
        false => None,
    };
    let sync_messages = read_data_bounded(r, max_messages)?;
    let manifest = match manifest {
        Ok(m) => m,
        Err(e) => {
            *sticky = None;
            let _ = backend.rollback();
            reply_err(
                w,
                &AgentError::io("spooling the uploaded manifest", e)
                    .hint("nothing was changed; check the repository's free space"),
            )?;
            return Ok(None);
        }
    };
    let removed = match removed {
        None => Ok(None),
        Some(Ok(r)) => Ok(Some(r)),
        Some(Err(n)) => Err(n),
    };
    match (manifest, removed, sync_messages) {
        (Ok(manifest), Ok(removed), Ok(sync_messages)) => {
            return Ok(Some(CommitData {
                snapshot_id,
                manifest,
                removed,
                sync_messages,
            }));
        }
        (manifest, removed, _) => {
            *sticky = None;
            let _ = backend.rollback();
            let (what, limit) = match (manifest, removed) {
                (Err(_), _) => ("manifest", max_manifest),
                (_, Err(_)) => ("list of dropped paths", max_messages),
                _ => ("sync-messages", max_messages),
            };
            reply_err(w, &too_large(what, limit))?
        }
    }
    Ok(None)
}

/// `MountSnapshot`: the mountpoint is a path on this machine, so only a
/// client in this process may ask, never one over SSH.
fn mount_snapshot(
    backend: &mut dyn Backend,
    local_sources: bool,
    snapshot: &str,
    mountpoint: &str,
) -> Result<(String, Box<dyn Send>), AgentError> {
    if !local_sources {
        return Err(AgentError::new(
            ErrorKind::Protocol,
            "mount_snapshot is only for a client on the repository host",
        ));
    }
    crate::history::checked_snapshot_id(snapshot)
        .and_then(|id| backend.mount_snapshot(&id, std::path::Path::new(mountpoint)))
}

/// The most bytes of manifest and of sync-messages a `Commit` may bring:
/// both are held in memory for the commit.
fn meta_limits() -> (u64, u64) {
    match std::env::var(MAX_META_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(n) => (n, n),
        None => (MAX_MANIFEST_BYTES, MAX_MESSAGES_BYTES),
    }
}

fn too_large(what: &str, limit: u64) -> AgentError {
    AgentError::new(
        ErrorKind::Protocol,
        format!("the {what} sent with the commit is larger than this agent's limit of {limit} bytes"),
    )
    .hint(format!(
        "nothing was committed; {MAX_META_ENV} (bytes) in the repository host's environment raises the limit"
    ))
}

fn hello<W: Write>(backend: &mut dyn Backend, w: &mut W, protocol: u32) -> io::Result<()> {
    if protocol != PROTOCOL_VERSION {
        return reply_err(
            w,
            &AgentError::new(
                ErrorKind::Protocol,
                format!(
                    "protocol mismatch: the client speaks {protocol}, this agent (dsg {}) speaks {PROTOCOL_VERSION}",
                    env!("CARGO_PKG_VERSION")
                ),
            )
            .hint("install the same dsg version on both machines"),
        );
    }
    write_json(
        w,
        &Response::Hello {
            protocol: PROTOCOL_VERSION,
            version: env!("CARGO_PKG_VERSION").into(),
            repo_exists: backend.exists(),
            backend: backend.describe(),
        },
    )
}

fn read_meta<W: Write>(
    backend: &mut dyn Backend,
    w: &mut W,
    buf: &mut Vec<u8>,
    name: &str,
    unless_hash: Option<u64>,
) -> io::Result<()> {
    let mut f = match backend.open_meta(name) {
        Ok(None) => return write_json(w, &Response::Missing),
        Ok(Some(f)) => f,
        Err(e) => return reply_err(w, &e),
    };
    // Only a regular file has bytes to send: anything else (a directory
    // named `archive/`) is refused before a `Data` promises them.
    let size = match f.metadata() {
        Ok(md) if md.is_file() => md.len(),
        Ok(_) => {
            return reply_err(
                w,
                &AgentError::new(
                    ErrorKind::Unsafe,
                    format!("refusing to read .dsg/{name}: not a regular file"),
                )
                .hint("name a file: last-sync.json, sync-messages.json or archive/<file>"),
            )
        }
        Err(e) => return reply_err(w, &AgentError::io(format!("reading .dsg/{name}"), e)),
    };
    // Hash by streaming first: an unchanged manifest (the common case of
    // `status`) is never held in memory.
    if let Some(h) = unless_hash {
        match dsg_core::hash::hash_reader(&mut f) {
            Ok((got, _)) if got.0 == h => return write_json(w, &Response::Unchanged),
            Ok(_) => {}
            Err(e) => return reply_err(w, &AgentError::io(format!("reading .dsg/{name}"), e)),
        }
    }
    if let Err(e) = std::io::Seek::rewind(&mut f) {
        return reply_err(w, &AgentError::io(format!("reading .dsg/{name}"), e));
    }
    write_json(w, &Response::Data { size })?;
    copy_as_data(&mut f, w, buf, &format!(".dsg/{name}")).map(|_| ())
}

/// How a `Begin` begins: afresh, continuing a dropped upload, or
/// replacing the repository (a confirmed `init --force`).
struct BeginHow {
    resume: bool,
    replace: bool,
}

fn begin<W: Write>(
    backend: &mut dyn Backend,
    w: &mut W,
    tx_id: &str,
    base: Option<&str>,
    hash: Option<&str>,
    user: &str,
    how: BeginHow,
) -> io::Result<()> {
    // `Some(staged)`: answer a resume with what is staged.
    let outcome = if how.replace && base.is_none() {
        // A replacing init starts over after a lost connection.
        backend
            .begin_replace(tx_id, user, hash)
            .map(|()| how.resume.then(Vec::new))
    } else if how.resume {
        backend.resume(tx_id, base, hash, user).map(Some)
    } else {
        backend.begin(tx_id, base, hash, user).map(|()| None)
    };
    match outcome {
        Ok(None) => write_json(w, &Response::Ok),
        Ok(Some(staged)) => {
            write_json(
                w,
                &Response::Resumed {
                    files: staged.len() as u64,
                },
            )?;
            let list = serde_json::to_vec(&staged).map_err(io::Error::other)?;
            write_data(w, &list)
        }
        Err(e) => {
            // Not after a protocol misuse, which may come with a
            // transaction already open: that one stays.
            if e.kind != ErrorKind::Protocol {
                let _ = backend.rollback();
            }
            reply_err(w, &e)
        }
    }
}

/// One upload: a file's bytes (always read off the stream, even after a
/// failure, to stay in step), a local file, or a link. `skip`: an earlier
/// upload failed, so this one is not staged. The outer `Result` is the
/// connection's, the inner the upload's.
fn stage<R: Read>(
    backend: &mut dyn Backend,
    r: &mut R,
    put: Request,
    skip: bool,
) -> io::Result<Result<(), AgentError>> {
    let staged = match put {
        Request::PutFile {
            path,
            size,
            hash,
            mtime_ns,
            offset,
        } => {
            let mut dr = DataStream::new(r);
            let staged = if skip {
                Ok(())
            } else {
                backend.stage_file(&path, size, hash, mtime_ns, offset, &mut dr)
            };
            dr.drain()?;
            staged
        }
        _ if skip => Ok(()),
        // Only a client in this process may name a local file (its uploads
        // never come here: the serve loop stages them in batches).
        Request::PutFileLocal { .. } => Err(AgentError::new(
            ErrorKind::Protocol,
            "put_file_local is only for a local client",
        )),
        Request::PutLink { path, target } => backend.stage_link(&path, &target),
        _ => unreachable!("stage() is called with uploads only"),
    };
    Ok(staged)
}

/// Prepares the commit of `data` (see `Backend::prepare_commit`) and
/// answers `Ok`, unless an upload failed since the last barrier
/// (`sticky`): then, or when the preparation fails, the transaction is
/// rolled back and the failure reported. Returns what `CommitPrepared`
/// commits.
fn prepare_commit<W: Write>(
    backend: &mut dyn Backend,
    w: &mut W,
    sticky: Option<AgentError>,
    data: CommitData,
) -> io::Result<Option<CommitData>> {
    if let Some(e) = sticky {
        let _ = backend.rollback();
        reply_err(w, &e)?;
        return Ok(None);
    }
    match backend.prepare_commit(&data) {
        Ok(()) => {
            write_json(w, &Response::Ok)?;
            Ok(Some(data))
        }
        Err(e) => {
            let _ = backend.rollback();
            reply_err(w, &e)?;
            Ok(None)
        }
    }
}

/// Commits, unless an upload failed since the last barrier (`sticky`):
/// then the transaction is rolled back and that failure reported.
fn commit<W: Write>(
    backend: &mut dyn Backend,
    w: &mut W,
    sticky: Option<AgentError>,
    data: CommitData,
) -> io::Result<()> {
    if let Some(e) = sticky {
        let _ = backend.rollback();
        return reply_err(w, &e);
    }
    match backend.commit(&data) {
        Ok(()) => write_json(
            w,
            &Response::Committed {
                snapshot_id: data.snapshot_id,
            },
        ),
        Err(e) => reply_err(w, &e),
    }
}

/// Streams the files at `paths` under a shared lock, so no commit runs
/// underneath the read.
fn get_files<W: Write>(
    backend: &mut dyn Backend,
    w: &mut W,
    buf: &mut Vec<u8>,
    paths: Vec<String>,
) -> io::Result<()> {
    // Still ended by `Ok`: the client reads replies until it, however
    // many paths it asked for.
    if let Err(e) = backend.read_lock() {
        reply_err(w, &e)?;
        return write_json(w, &Response::Ok);
    }
    let sent = backend.open_each(paths, &mut |p, stored| send_stored(w, buf, p, stored));
    backend.read_unlock();
    sent?;
    write_json(w, &Response::Ok)
}

/// One path of a `GetFiles`-shaped answer: a `File` and its data stream,
/// a link's `File`, or the error.
pub(crate) fn send_stored<W: Write>(
    w: &mut W,
    buf: &mut Vec<u8>,
    p: String,
    stored: Result<Stored, AgentError>,
) -> io::Result<()> {
    match stored {
        Ok(Stored::File { mut file, size }) => {
            write_json(
                w,
                &Response::File {
                    path: p.clone(),
                    kind: "file".into(),
                    size,
                    target: None,
                },
            )?;
            copy_as_data(&mut file, w, buf, &p).map(|_| ())
        }
        Ok(Stored::Link { target }) => write_json(
            w,
            &Response::File {
                path: p,
                kind: "link".into(),
                size: 0,
                target: Some(target),
            },
        ),
        Err(e) => reply_err(w, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{read_json, write_json, Response};

    /// An agent serving a remote client must not mount anything on its
    /// machine for it: `MountSnapshot` is refused before any backend work.
    #[test]
    fn mount_snapshot_is_refused_for_remote_clients() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("mp")).unwrap();
        let mut input = Vec::new();
        write_json(
            &mut input,
            &Request::MountSnapshot {
                snapshot: "s1".into(),
                mountpoint: d.path().join("mp").display().to_string(),
            },
        )
        .unwrap();
        let mut out = Vec::new();
        let mut b = crate::open(
            dsg_core::config::RepoType::Xfs,
            &d.path().join("repos/r"),
            None,
        )
        .unwrap();
        serve(&mut *b, &input[..], &mut out).unwrap();
        let mut r = &out[..];
        match read_json::<_, Response>(&mut r).unwrap() {
            Response::Err(e) => {
                assert_eq!(e.kind, ErrorKind::Protocol);
                assert!(e.message.contains("repository host"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }

    /// An agent serving a remote client must not read local paths for it.
    #[test]
    fn put_file_local_is_refused_for_remote_clients() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("repos")).unwrap();
        std::fs::write(d.path().join("secret"), b"s").unwrap();
        let mut input = Vec::new();
        for q in [
            Request::Begin {
                tx_id: "tx-1".into(),
                base: None,
                user: "u".into(),
                resume: false,
                replace: false,
                base_hash: None,
            },
            Request::PutFileLocal {
                path: "input/s".into(),
                size: 1,
                hash: xxhash_rust::xxh3::xxh3_64(b"s"),
                mtime_ns: 0,
                src: d.path().join("secret").display().to_string(),
            },
            Request::Flush,
        ] {
            write_json(&mut input, &q).unwrap();
        }
        let mut out = Vec::new();
        let mut b = crate::open(
            dsg_core::config::RepoType::Xfs,
            &d.path().join("repos/r"),
            None,
        )
        .unwrap();
        serve(&mut *b, &input[..], &mut out).unwrap();
        let mut r = &out[..];
        assert!(matches!(
            read_json::<_, Response>(&mut r).unwrap(),
            Response::Ok
        ));
        match read_json::<_, Response>(&mut r).unwrap() {
            Response::Err(e) => assert_eq!(e.kind, ErrorKind::Protocol),
            other => panic!("{other:?}"),
        }
        assert!(!d.path().join("repos/r").exists());
    }
}
