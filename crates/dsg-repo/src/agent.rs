//! The repository-side agent: reads requests, drives a backend, answers.
//! `dsg agent` runs this on stdin/stdout (over SSH); locally the same loop
//! runs on a thread over pipes. One code path for every transport.

use std::io::{self, BufReader, BufWriter, Read, Write};

use crate::backend::{AgentError, Backend, CommitData, Stored};
use crate::protocol::{
    copy_as_data, read_data_to_vec, read_json, write_data, write_json, DataStream, ErrorKind,
    Request, Response, PROTOCOL_VERSION,
};

fn reply_err<W: Write>(w: &mut W, e: &AgentError) -> io::Result<()> {
    write_json(w, &Response::Err(e.to_remote()))
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

/// Returns `Ok(true)` after `Bye`, `Ok(false)` when the input ended.
fn serve_loop<R: Read, W: Write>(
    backend: &mut dyn Backend,
    mut r: &mut R,
    mut w: &mut W,
    sticky: &mut Option<AgentError>,
    buf: &mut Vec<u8>,
    local_sources: bool,
) -> io::Result<bool> {
    loop {
        let req: Request = match read_json(&mut r) {
            Ok(q) => q,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        };
        match req {
            Request::Hello { protocol, .. } => {
                if protocol != PROTOCOL_VERSION {
                    reply_err(
                        &mut w,
                        &AgentError::new(
                            ErrorKind::Protocol,
                            format!(
                                "protocol mismatch: the client speaks {protocol}, this agent (dsg {}) speaks {PROTOCOL_VERSION}",
                                env!("CARGO_PKG_VERSION")
                            ),
                        )
                        .hint("install the same dsg version on both machines"),
                    )?;
                } else {
                    write_json(
                        &mut w,
                        &Response::Hello {
                            protocol: PROTOCOL_VERSION,
                            version: env!("CARGO_PKG_VERSION").into(),
                            repo_exists: backend.exists(),
                            backend: backend.describe(),
                        },
                    )?;
                }
            }
            Request::ReadMeta { name, unless_hash } => match backend.open_meta(&name) {
                Ok(None) => write_json(&mut w, &Response::Missing)?,
                Ok(Some(mut f)) => {
                    // Hash by streaming first: an unchanged manifest (the
                    // common case of `status`) is never held in memory.
                    let same = match unless_hash {
                        Some(h) => match dsg_core::hash::hash_reader(&mut f) {
                            Ok((got, _)) => got.0 == h,
                            Err(e) => {
                                reply_err(
                                    &mut w,
                                    &AgentError::io(format!("reading .dsg/{name}"), e),
                                )?;
                                continue;
                            }
                        },
                        None => false,
                    };
                    if same {
                        write_json(&mut w, &Response::Unchanged)?;
                    } else {
                        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                        std::io::Seek::rewind(&mut f)?;
                        write_json(&mut w, &Response::Data { size })?;
                        copy_as_data(&mut f, &mut w, buf)?;
                    }
                }
                Err(e) => reply_err(&mut w, &e)?,
            },
            Request::Begin {
                tx_id,
                base,
                user,
                resume,
                replace,
                base_hash,
            } => {
                *sticky = None;
                let hash = base_hash.as_deref();
                // `Some(staged)`: answer a resume with what is staged.
                let outcome = if replace && base.is_none() {
                    // A replacing init starts over after a lost connection.
                    backend
                        .begin_replace(&tx_id, &user, hash)
                        .map(|()| resume.then(Vec::new))
                } else if resume {
                    backend
                        .resume(&tx_id, base.as_deref(), hash, &user)
                        .map(Some)
                } else {
                    backend
                        .begin(&tx_id, base.as_deref(), hash, &user)
                        .map(|()| None)
                };
                match outcome {
                    Ok(None) => write_json(&mut w, &Response::Ok)?,
                    Ok(Some(staged)) => {
                        write_json(
                            &mut w,
                            &Response::Resumed {
                                files: staged.len() as u64,
                            },
                        )?;
                        let list = serde_json::to_vec(&staged).map_err(io::Error::other)?;
                        write_data(&mut w, &list)?;
                    }
                    Err(e) => {
                        // A failed begin may hold the lock: release it (not
                        // after a protocol misuse, which may come with a
                        // transaction already open).
                        if e.kind != ErrorKind::Protocol {
                            let _ = backend.rollback();
                        }
                        reply_err(&mut w, &e)?
                    }
                }
            }
            Request::PutFile {
                path,
                size,
                hash,
                mtime_ns,
                offset,
            } => {
                let mut dr = DataStream::new(&mut r);
                if sticky.is_none() {
                    if let Err(e) = backend.stage_file(&path, size, hash, mtime_ns, offset, &mut dr)
                    {
                        *sticky = Some(e);
                    }
                }
                dr.drain()?;
            }
            Request::PutFileLocal {
                path,
                size,
                hash,
                mtime_ns,
                src,
            } => {
                if sticky.is_none() {
                    let r = if local_sources {
                        backend.stage_file_from(
                            &path,
                            size,
                            hash,
                            mtime_ns,
                            std::path::Path::new(&src),
                        )
                    } else {
                        Err(AgentError::new(
                            ErrorKind::Protocol,
                            "put_file_local is only for a local client",
                        ))
                    };
                    if let Err(e) = r {
                        *sticky = Some(e);
                    }
                }
            }
            Request::PutLink { path, target } => {
                if sticky.is_none() {
                    if let Err(e) = backend.stage_link(&path, &target) {
                        *sticky = Some(e);
                    }
                }
            }
            Request::Flush => match sticky.take() {
                None => write_json(&mut w, &Response::Ok)?,
                Some(e) => {
                    let _ = backend.rollback();
                    reply_err(&mut w, &e)?
                }
            },
            Request::Commit { snapshot_id } => {
                let manifest = read_data_to_vec(&mut r)?;
                let sync_messages = read_data_to_vec(&mut r)?;
                if let Some(e) = sticky.take() {
                    let _ = backend.rollback();
                    reply_err(&mut w, &e)?;
                } else {
                    let data = CommitData {
                        snapshot_id: snapshot_id.clone(),
                        manifest,
                        sync_messages,
                    };
                    match backend.commit(&data) {
                        Ok(()) => write_json(&mut w, &Response::Committed { snapshot_id })?,
                        Err(e) => reply_err(&mut w, &e)?,
                    }
                }
            }
            Request::Recover { wait } => match backend.recover(wait) {
                Ok(()) => write_json(&mut w, &Response::Ok)?,
                Err(e) => reply_err(&mut w, &e)?,
            },
            Request::ListArchives => match backend.list_archives() {
                Ok(names) => write_json(&mut w, &Response::Names { names })?,
                Err(e) => reply_err(&mut w, &e)?,
            },
            Request::Rollback => {
                *sticky = None;
                match backend.rollback() {
                    Ok(()) => write_json(&mut w, &Response::Ok)?,
                    Err(e) => reply_err(&mut w, &e)?,
                }
            }
            Request::GetFiles { paths } => {
                if let Err(e) = backend.read_lock() {
                    reply_err(&mut w, &e)?;
                    continue;
                }
                for p in paths {
                    match backend.open(&p) {
                        Ok(Stored::File { mut file, size }) => {
                            write_json(
                                &mut w,
                                &Response::File {
                                    path: p,
                                    kind: "file".into(),
                                    size,
                                    target: None,
                                },
                            )?;
                            copy_as_data(&mut file, &mut w, buf)?;
                        }
                        Ok(Stored::Link { target }) => {
                            write_json(
                                &mut w,
                                &Response::File {
                                    path: p,
                                    kind: "link".into(),
                                    size: 0,
                                    target: Some(target),
                                },
                            )?;
                        }
                        Err(e) => reply_err(&mut w, &e)?,
                    }
                }
                backend.read_unlock();
                write_json(&mut w, &Response::Ok)?;
            }
            Request::Bye => {
                write_json(&mut w, &Response::Ok)?;
                w.flush()?;
                return Ok(true);
            }
        }
        // Answer promptly when the client is waiting; while it is still
        // sending puts there is nothing to flush.
        w.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{read_json, write_json, Response};

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
