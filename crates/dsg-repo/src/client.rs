//! The client's handle on a repository: speaks the agent protocol over any
//! byte stream. Locally the agent runs on a thread over OS pipes; over SSH
//! (a later transport) it runs in `dsg agent` on the server. Same bytes.

use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use dsg_core::config::ProjectConfig;

use crate::backend::Backend;
use crate::protocol::{
    read_data_to_vec, read_json, remote_error, write_data, write_frame, write_json, DataStream,
    ErrorKind, FilesRequest, RehashReport, RemoteError, Request, Response, StagedFile, CHUNK,
    PROTOCOL_VERSION,
};

/// Display is the message, then `hint: …` on its own line when there is
/// one; `message()` and `hint()` give the two apart for `--json`.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    Remote {
        host: String,
        repo: String,
        err: RemoteError,
    },
    Connection {
        host: String,
        #[source]
        source: io::Error,
    },
    Protocol {
        host: String,
        msg: String,
        hint: Option<String>,
    },
    /// The transport cannot reach the repository (ssh missing or refusing).
    Unsupported {
        message: String,
        hint: Option<String>,
    },
    Local {
        path: PathBuf,
        msg: String,
    },
}

impl RepoError {
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            RepoError::Remote { err, .. } => Some(err.kind),
            _ => None,
        }
    }

    /// A transport error without a hint.
    pub fn unsupported(message: impl Into<String>) -> RepoError {
        RepoError::Unsupported {
            message: message.into(),
            hint: None,
        }
    }

    /// A protocol error without a hint.
    pub fn protocol(host: &str, msg: impl Into<String>) -> RepoError {
        RepoError::Protocol {
            host: host.to_string(),
            msg: msg.into(),
            hint: None,
        }
    }

    /// The message without its hint.
    pub fn message(&self) -> String {
        match self {
            RepoError::Remote { host, repo, err } => {
                format!("repository {repo} on {host}: {}", err.message)
            }
            RepoError::Connection { host, source } => {
                format!("lost the connection to the repository agent on {host}: {source}")
            }
            RepoError::Protocol { host, msg, .. } => {
                format!("protocol error talking to {host}: {msg}")
            }
            RepoError::Unsupported { message, .. } => message.clone(),
            RepoError::Local { path, msg } => format!("{}: {msg}", path.display()),
        }
    }

    /// What the user can do about it, when dsg knows.
    pub fn hint(&self) -> Option<&str> {
        match self {
            RepoError::Remote { err, .. } => err.hint.as_deref(),
            RepoError::Connection { .. } => {
                Some("the next dsg command recovers any interrupted transaction")
            }
            RepoError::Protocol { hint, .. } | RepoError::Unsupported { hint, .. } => {
                hint.as_deref()
            }
            RepoError::Local { .. } => None,
        }
    }
}

impl std::fmt::Display for RepoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())?;
        match self.hint() {
            Some(h) => write!(f, "\nhint: {h}"),
            None => Ok(()),
        }
    }
}

pub enum Meta {
    Missing,
    Unchanged,
    Data(Vec<u8>),
}

/// `read_meta_with`'s answer: the value `f` made of the bytes.
pub enum MetaWith<T> {
    Missing,
    Unchanged,
    Data(T),
}

/// One downloaded item, handed to the caller as it arrives.
pub enum Incoming<'a> {
    File {
        path: String,
        size: u64,
        data: &'a mut dyn Read,
    },
    Link {
        path: String,
        target: String,
    },
}

pub struct RepoClient {
    r: BufReader<Box<dyn Read + Send>>,
    w: BufWriter<Box<dyn Write + Send>>,
    host: String,
    repo: String,
    agent: Option<JoinHandle<io::Result<()>>>,
    /// The `ssh` process of a remote agent.
    child: Option<crate::ssh::SshChild>,
    pub repo_exists: bool,
    /// Client-side mismatches among pipelined uploads (file changed while read).
    send_error: Option<RepoError>,
    /// The agent runs in this process: it can copy our files itself.
    local: bool,
    /// After `resume`: staged length of each file the agent already has.
    staged: std::collections::HashMap<String, u64>,
    buf: Vec<u8>,
    /// A `prepare_commit` was sent and its answer not read yet.
    unread_prepare: bool,
}

/// A connection started ahead of its use: see [`RepoClient::start`].
pub struct Connecting(Pending);

enum Pending {
    Ssh(Result<crate::ssh::Spawned, RepoError>),
    InProcess(Box<ProjectConfig>),
}

impl Connecting {
    /// The connection, once the agent has answered the greeting.
    pub fn ready(self) -> Result<RepoClient, RepoError> {
        match self.0 {
            Pending::Ssh(spawned) => spawned?.ready(),
            Pending::InProcess(cfg) => RepoClient::connect(&cfg),
        }
    }
}

impl RepoClient {
    /// Starts connecting to the repository `cfg` names; `ready` finishes.
    /// Over ssh the handshake then overlaps with what the caller does in
    /// between (an init's scan); an error surfaces at `ready`. A repository
    /// reached in this process connects at `ready`: there is no latency to
    /// hide, and its agent would hold memory meanwhile.
    pub fn start(cfg: &ProjectConfig) -> Connecting {
        let repo = &cfg.repository;
        if repo.s3.is_none() && !repo.is_local() {
            return Connecting(Pending::Ssh(crate::ssh::spawn(cfg)));
        }
        Connecting(Pending::InProcess(Box::new(cfg.clone())))
    }

    /// Connects to the repository a project config names.
    pub fn connect(cfg: &ProjectConfig) -> Result<RepoClient, RepoError> {
        let repo = &cfg.repository;
        if let Some(s3) = &repo.s3 {
            // This machine talks to the object store itself: the agent runs
            // in-process over the store's backend.
            let backend =
                crate::s3::S3Repo::open(s3, &cfg.name).map_err(|e| RepoError::Remote {
                    host: s3.endpoint.clone(),
                    repo: cfg.repo_dir().display().to_string(),
                    err: e.to_remote(),
                })?;
            return RepoClient::in_process(Box::new(backend), &repo.host);
        }
        if !repo.is_local() {
            return crate::ssh::connect(cfg);
        }
        let backend: Box<dyn Backend> =
            crate::open(repo.kind, &cfg.repo_dir(), repo.pool.as_deref()).map_err(|e| {
                RepoError::Remote {
                    host: repo.host.clone(),
                    repo: cfg.repo_dir().display().to_string(),
                    err: e.to_remote(),
                }
            })?;
        RepoClient::in_process(backend, &repo.host)
    }

    /// Runs the agent on a thread of this process, over pipes.
    pub fn in_process(mut backend: Box<dyn Backend>, host: &str) -> Result<RepoClient, RepoError> {
        let conn = |e| RepoError::Connection {
            host: host.into(),
            source: e,
        };
        let (req_r, req_w) = io::pipe().map_err(conn)?;
        let (resp_r, resp_w) = io::pipe().map_err(conn)?;
        let repo = backend.root().display().to_string();
        let agent = std::thread::Builder::new()
            .name("dsg-agent".into())
            .spawn(move || crate::agent::serve_with(backend.as_mut(), req_r, resp_w, true))
            .map_err(conn)?;
        let mut c = RepoClient {
            r: BufReader::with_capacity(1 << 20, Box::new(resp_r)),
            w: BufWriter::with_capacity(1 << 20, Box::new(req_w)),
            host: host.into(),
            repo,
            agent: Some(agent),
            child: None,
            repo_exists: false,
            send_error: None,
            local: true,
            staged: Default::default(),
            buf: Vec::new(),
            unread_prepare: false,
        };
        c.hello()?;
        Ok(c)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn repo(&self) -> &str {
        &self.repo
    }

    fn conn(&self, e: io::Error) -> RepoError {
        let e = if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(e.kind(), "the connection closed unexpectedly")
        } else {
            e
        };
        RepoError::Connection {
            host: self.host.clone(),
            source: e,
        }
    }

    fn remote(&self, err: RemoteError) -> RepoError {
        RepoError::Remote {
            host: self.host.clone(),
            repo: self.repo.clone(),
            err,
        }
    }

    fn send(&mut self, q: &Request) -> Result<(), RepoError> {
        // Replies come in order: a prepared commit's answer, not waited
        // for, is read first (a `Rollback` undoes what it prepared).
        if std::mem::take(&mut self.unread_prepare) {
            let _ = self.recv();
        }
        write_json(&mut self.w, q).map_err(|e| self.conn(e))
    }

    fn recv(&mut self) -> Result<Response, RepoError> {
        self.w.flush().map_err(|e| self.conn(e))?;
        let resp: Response = read_json(&mut self.r).map_err(|e| self.conn(e))?;
        match resp {
            Response::Err(e) => Err(self.remote(e)),
            other => Ok(other),
        }
    }

    fn expect_ok(&mut self) -> Result<(), RepoError> {
        match self.recv()? {
            Response::Ok => Ok(()),
            other => Err(RepoError::protocol(
                &self.host,
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    fn hello(&mut self) -> Result<(), RepoError> {
        self.send(&Request::Hello {
            protocol: PROTOCOL_VERSION,
            client_version: env!("CARGO_PKG_VERSION").into(),
        })?;
        match self.recv()? {
            Response::Hello {
                protocol,
                version,
                repo_exists,
                ..
            } => {
                if protocol != PROTOCOL_VERSION {
                    return Err(RepoError::Protocol {
                        host: self.host.clone(),
                        msg: format!(
                            "the agent (dsg {version}) speaks protocol {protocol}, this dsg ({}) speaks {PROTOCOL_VERSION}",
                            env!("CARGO_PKG_VERSION")
                        ),
                        hint: Some("install the same dsg version on both machines".into()),
                    });
                }
                self.repo_exists = repo_exists;
                Ok(())
            }
            other => Err(RepoError::protocol(
                &self.host,
                format!("unexpected handshake reply {other:?}"),
            )),
        }
    }

    /// Reads `.dsg/<name>` from the repository.
    pub fn read_meta(&mut self, name: &str, unless_hash: Option<u64>) -> Result<Meta, RepoError> {
        let got = self.read_meta_with(name, unless_hash, |r| {
            let mut bytes = Vec::new();
            r.read_to_end(&mut bytes).map(|_| bytes)
        })?;
        Ok(match got {
            MetaWith::Missing => Meta::Missing,
            MetaWith::Unchanged => Meta::Unchanged,
            MetaWith::Data(Ok(bytes)) => Meta::Data(bytes),
            // The stream itself was whole (read_meta_with checked): a read
            // that failed anyway failed on the connection.
            MetaWith::Data(Err(e)) => return Err(self.conn(e)),
        })
    }

    /// `read_meta` that hands the bytes to `f` as they arrive instead of
    /// collecting them (a manifest is parsed without holding its text).
    /// The stream is read to its end whatever `f` does; a stream the
    /// agent ended with an error is that error, whatever `f` returned.
    pub fn read_meta_with<T>(
        &mut self,
        name: &str,
        unless_hash: Option<u64>,
        f: impl FnOnce(&mut dyn Read) -> T,
    ) -> Result<MetaWith<T>, RepoError> {
        self.send(&Request::ReadMeta {
            name: name.into(),
            unless_hash,
        })?;
        match self.recv()? {
            Response::Missing => Ok(MetaWith::Missing),
            Response::Unchanged => Ok(MetaWith::Unchanged),
            Response::Data { .. } => {
                let mut ds = crate::protocol::DataStream::new(&mut self.r);
                let out = f(&mut ds);
                let drained = ds.drain();
                let failed = ds.failed().cloned();
                if let Some(remote) = failed {
                    return Err(self.remote(remote));
                }
                match drained {
                    Ok(()) => Ok(MetaWith::Data(out)),
                    Err(e) => Err(match remote_error(&e) {
                        Some(remote) => self.remote(remote.clone()),
                        None => self.conn(e),
                    }),
                }
            }
            other => Err(RepoError::protocol(
                &self.host,
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    /// Begins a transaction on top of `base` (`None`: an init), whose
    /// snapshot hash is `base_hash`.
    pub fn begin(
        &mut self,
        tx_id: &str,
        base: Option<&str>,
        base_hash: Option<&str>,
        user: &str,
    ) -> Result<(), RepoError> {
        self.send_begin(tx_id, base, base_hash, user, false, false)?;
        self.expect_ok()
    }

    /// `begin` of an init that replaces the repository if it exists; only
    /// after the user confirmed it (`init --force`), having seen the head
    /// whose hash is `confirmed_hash`.
    pub fn begin_replacing(
        &mut self,
        tx_id: &str,
        user: &str,
        confirmed_hash: Option<&str>,
    ) -> Result<(), RepoError> {
        self.send_begin(tx_id, None, confirmed_hash, user, false, true)?;
        self.expect_ok()
    }

    fn send_begin(
        &mut self,
        tx_id: &str,
        base: Option<&str>,
        base_hash: Option<&str>,
        user: &str,
        resume: bool,
        replace: bool,
    ) -> Result<(), RepoError> {
        self.send_error = None;
        self.send(&Request::Begin {
            tx_id: tx_id.into(),
            base: base.map(String::from),
            user: user.into(),
            resume,
            replace,
            base_hash: base_hash.map(String::from),
        })
    }

    /// `begin` on a new connection after the old one dropped during this
    /// transaction's uploads. Returns how many files (and bytes) the agent
    /// still had staged; later `put_file` calls send only what is missing.
    pub fn resume(
        &mut self,
        tx_id: &str,
        base: Option<&str>,
        base_hash: Option<&str>,
        user: &str,
        replace: bool,
    ) -> Result<(u64, u64), RepoError> {
        self.send_begin(tx_id, base, base_hash, user, true, replace)?;
        match self.recv()? {
            Response::Resumed { .. } => {}
            other => {
                return Err(RepoError::protocol(
                    &self.host,
                    format!("unexpected reply {other:?}"),
                ))
            }
        }
        let bytes = read_data_to_vec(&mut self.r).map_err(|e| self.conn(e))?;
        let staged: Vec<StagedFile> = serde_json::from_slice(&bytes).map_err(|e| {
            RepoError::protocol(&self.host, format!("bad list of staged files: {e}"))
        })?;
        let total = staged.iter().map(|f| f.len).sum();
        let n = staged.len() as u64;
        self.staged = staged.into_iter().map(|f| (f.path, f.len)).collect();
        Ok((n, total))
    }

    /// Sends a local file. The agent hashes what arrives and rejects it
    /// unless it matches `size` and `hash` (so a file that changed since it
    /// was scanned fails the next `flush`, naming the path). After a
    /// `resume`, only the bytes the agent lacks are sent.
    pub fn put_file(
        &mut self,
        path: &str,
        local: &Path,
        size: u64,
        hash: u64,
        mtime_ns: i64,
    ) -> Result<(), RepoError> {
        if self.local {
            // Same machine: let the agent copy (and verify) the file, no
            // bytes through the pipe.
            let src = std::path::absolute(local).unwrap_or_else(|_| local.to_path_buf());
            return self.send(&Request::PutFileLocal {
                path: path.into(),
                size,
                hash,
                mtime_ns,
                src: src.to_string_lossy().into_owned(),
            });
        }
        let offset = match self.staged.remove(path) {
            Some(len) if len <= size => len,
            _ => 0,
        };
        self.send(&Request::PutFile {
            path: path.into(),
            size,
            hash,
            mtime_ns,
            offset,
        })?;
        let opened = dsg_core::hash::open_nofollow(local).and_then(|mut f| {
            if offset > 0 {
                f.seek(io::SeekFrom::Start(offset))?;
            }
            Ok(f)
        });
        let mut f = match opened {
            Ok(f) => f,
            Err(e) => {
                // Finish the frame stream so the connection stays usable.
                write_frame(&mut self.w, b'E', &[]).map_err(|e| self.conn(e))?;
                self.send_error.get_or_insert(RepoError::Local {
                    path: local.to_path_buf(),
                    msg: format!("cannot read: {e}"),
                });
                return Ok(());
            }
        };
        self.buf.resize(CHUNK, 0);
        let mut n = offset;
        loop {
            let k = match f.read(&mut self.buf) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.send_error.get_or_insert(RepoError::Local {
                        path: local.to_path_buf(),
                        msg: format!("read failed: {e}"),
                    });
                    break;
                }
            };
            write_frame(&mut self.w, b'D', &self.buf[..k]).map_err(|e| RepoError::Connection {
                host: self.host.clone(),
                source: e,
            })?;
            n += k as u64;
        }
        write_frame(&mut self.w, b'E', &[]).map_err(|e| self.conn(e))?;
        if n != size {
            self.send_error.get_or_insert(RepoError::Local {
                path: local.to_path_buf(),
                msg: "the file changed while it was being uploaded; nothing was committed, run the command again".into(),
            });
        }
        Ok(())
    }

    pub fn put_link(&mut self, path: &str, target: &str) -> Result<(), RepoError> {
        self.send(&Request::PutLink {
            path: path.into(),
            target: target.into(),
        })
    }

    /// Barrier: reports the first failure among the puts sent so far.
    /// True when the agent copies files itself (same machine): a
    /// `put_file` then only queues the request, and the bytes are copied
    /// by the time of the next reply.
    pub fn copies_locally(&self) -> bool {
        self.local
    }

    pub fn flush(&mut self) -> Result<(), RepoError> {
        self.send(&Request::Flush)?;
        let r = self.expect_ok();
        if let Some(e) = self.send_error.take() {
            return Err(e);
        }
        r
    }

    /// Commits the new manifest read from `manifest`; with `removed` (a
    /// JSON array of the base's paths it drops), `manifest` holds only the
    /// added and changed entries and the metadata (a delta commit).
    pub fn commit(
        &mut self,
        snapshot_id: &str,
        manifest: &mut dyn std::io::Read,
        removed: Option<&[u8]>,
        sync_messages: &[u8],
    ) -> Result<(), RepoError> {
        self.send_commit(snapshot_id, manifest, removed, sync_messages, false)?;
        self.expect_committed()
    }

    /// `commit` in two steps: sends the commit for the agent to check and
    /// stage up to its commit point, and returns without waiting, so that
    /// this side can stage its own meanwhile. `prepared` then reads the
    /// answer and `commit_prepared` commits; any other request first
    /// reads (and drops) the answer, and `rollback` undoes it.
    pub fn prepare_commit(
        &mut self,
        snapshot_id: &str,
        manifest: &mut dyn std::io::Read,
        removed: Option<&[u8]>,
        sync_messages: &[u8],
    ) -> Result<(), RepoError> {
        self.send_commit(snapshot_id, manifest, removed, sync_messages, true)?;
        // The agent starts on it now, not when we next wait.
        self.w.flush().map_err(|e| self.conn(e))?;
        self.unread_prepare = true;
        Ok(())
    }

    /// The answer to `prepare_commit`: `Ok` when the agent has the commit
    /// ready; an error when it refused it (its transaction is undone).
    pub fn prepared(&mut self) -> Result<(), RepoError> {
        if !std::mem::take(&mut self.unread_prepare) {
            return Err(RepoError::protocol(
                &self.host,
                "no commit is being prepared",
            ));
        }
        self.expect_ok()
    }

    /// Commits what `prepare_commit` prepared (after `prepared`).
    pub fn commit_prepared(&mut self) -> Result<(), RepoError> {
        self.send(&Request::CommitPrepared)?;
        self.expect_committed()
    }

    fn expect_committed(&mut self) -> Result<(), RepoError> {
        match self.recv()? {
            Response::Committed { .. } => Ok(()),
            other => Err(RepoError::protocol(
                &self.host,
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    fn send_commit(
        &mut self,
        snapshot_id: &str,
        manifest: &mut dyn std::io::Read,
        removed: Option<&[u8]>,
        sync_messages: &[u8],
        prepare: bool,
    ) -> Result<(), RepoError> {
        if let Some(e) = self.send_error.take() {
            return Err(e);
        }
        self.send(&Request::Commit {
            snapshot_id: snapshot_id.into(),
            delta: removed.is_some(),
            prepare,
        })?;
        // The manifest is streamed from where it was staged, never held
        // whole. If reading it fails midway the stream still ends (what
        // was sent cannot be a complete manifest: the agent refuses it)
        // and the read's error is returned.
        let mut read_err = None;
        // 64 KiB frames (CHUNK is the most a frame may carry): a delta is
        // a few hundred KB, and this buffer is held at the commit's peak.
        let mut buf = vec![0u8; 1 << 16];
        let w = &mut self.w;
        let io = (|| {
            loop {
                let n = match manifest.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        read_err = Some(e);
                        break;
                    }
                };
                crate::protocol::write_frame(w, b'D', &buf[..n])?;
            }
            crate::protocol::write_frame(w, b'E', &[])?;
            if let Some(r) = removed {
                write_data(w, r)?;
            }
            write_data(w, sync_messages)
        })();
        io.map_err(|e| self.conn(e))?;
        if let Some(e) = read_err {
            let _ = self.recv();
            return Err(RepoError::Local {
                path: "staged manifest".into(),
                msg: format!(
                    "reading it failed: {e}; the repository refuses the incomplete manifest"
                ),
            });
        }
        Ok(())
    }

    /// Asks the agent to finish or undo an interrupted transaction.
    pub fn recover(&mut self) -> Result<(), RepoError> {
        self.send(&Request::Recover { wait: false })?;
        self.expect_ok()
    }

    /// `recover` after first waiting for a live writer to finish: for a
    /// client whose commit reply was lost, so the head it reads next is
    /// that commit's final outcome.
    pub fn settle(&mut self) -> Result<(), RepoError> {
        self.send(&Request::Recover { wait: true })?;
        self.expect_ok()
    }

    pub fn list_archives(&mut self) -> Result<Vec<String>, RepoError> {
        self.send(&Request::ListArchives)?;
        match self.recv()? {
            Response::Names { names } => Ok(names),
            other => Err(RepoError::protocol(
                &self.host,
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    /// The repositories in the directory this agent serves (`ListRepos`).
    pub fn list_repos(&mut self) -> Result<Vec<crate::list::RepoInfo>, RepoError> {
        self.send(&Request::ListRepos)?;
        match self.recv()? {
            Response::Repos { repos } => Ok(repos),
            other => Err(RepoError::protocol(
                &self.host,
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    pub fn rollback(&mut self) -> Result<(), RepoError> {
        self.send(&Request::Rollback)?;
        self.expect_ok()
    }

    /// Downloads `paths`, calling `sink` for each as it streams in. A few
    /// requests for all of them (`request_batches`): no round trip per
    /// file, and no request larger than the agent reads.
    pub fn get_files(
        &mut self,
        paths: &[&str],
        mut sink: impl FnMut(Incoming<'_>) -> io::Result<()>,
    ) -> Result<(), RepoError> {
        for paths in request_batches(paths) {
            self.stream_files(&FilesRequest::GetFiles { paths }, &mut sink)?;
        }
        Ok(())
    }

    /// `get_files` as of snapshot `snapshot` (`s<N>`): the bytes that
    /// snapshot recorded. The caller verifies them against its manifest.
    pub fn get_versions(
        &mut self,
        snapshot: &str,
        paths: &[&str],
        mut sink: impl FnMut(Incoming<'_>) -> io::Result<()>,
    ) -> Result<(), RepoError> {
        for paths in request_batches(paths) {
            self.stream_files(&FilesRequest::GetVersions { snapshot, paths }, &mut sink)?;
        }
        Ok(())
    }

    /// Has the agent (in this process: the repository is on this machine)
    /// mount snapshot `snapshot` read-only at `mountpoint` as a ZFS clone,
    /// held until this connection ends; returns the clone's dataset.
    pub fn mount_snapshot(
        &mut self,
        snapshot: &str,
        mountpoint: &str,
    ) -> Result<String, RepoError> {
        self.send(&Request::MountSnapshot {
            snapshot: snapshot.into(),
            mountpoint: mountpoint.into(),
        })?;
        match self.recv()? {
            Response::Mounted { dataset } => Ok(dataset),
            other => Err(RepoError::protocol(
                &self.host,
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    /// Has the agent re-hash snapshot `snapshot` on the repository host;
    /// `progress(files, bytes)` is called as it works.
    pub fn rehash(
        &mut self,
        snapshot: &str,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<RehashReport, RepoError> {
        self.send(&Request::Rehash {
            snapshot: snapshot.into(),
        })?;
        loop {
            match self.recv()? {
                Response::Progress { files, bytes } => progress(files, bytes),
                Response::Rehashed(r) => return Ok(r),
                other => {
                    return Err(RepoError::protocol(
                        &self.host,
                        format!("unexpected reply {other:?}"),
                    ))
                }
            }
        }
    }

    /// `dsg prune` on the repository: the agent decides what goes under
    /// its lock, from `policy` (see `dsg_repo::prune`).
    pub fn prune(
        &mut self,
        policy: &crate::prune::Policy,
    ) -> Result<crate::protocol::PruneReport, RepoError> {
        self.send(&Request::Prune {
            keep_last: policy.keep_last,
            keep_within_secs: policy.keep_within_secs,
            dry_run: policy.dry_run,
            user: policy.user.clone(),
        })?;
        match self.recv()? {
            Response::Pruned(r) => Ok(r),
            other => Err(RepoError::protocol(
                &self.host,
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    /// Sends `req` and hands each file of the stream that answers it to
    /// `sink`, until its `Ok`.
    fn stream_files(
        &mut self,
        req: &FilesRequest<'_>,
        mut sink: impl FnMut(Incoming<'_>) -> io::Result<()>,
    ) -> Result<(), RepoError> {
        write_json(&mut self.w, req).map_err(|e| self.conn(e))?;
        self.w.flush().map_err(|e| self.conn(e))?;
        let mut first_err: Option<RepoError> = None;
        // Until `Ok`, not one reply per path: a busy repository answers
        // one error for all of them.
        loop {
            let resp: Response = read_json(&mut self.r).map_err(|e| self.conn(e))?;
            match resp {
                Response::Ok => break,
                Response::File {
                    path,
                    kind,
                    size,
                    target,
                } => {
                    if kind == "link" {
                        if let Err(e) = sink(Incoming::Link {
                            path: path.clone(),
                            target: target.unwrap_or_default(),
                        }) {
                            first_err.get_or_insert(RepoError::Local {
                                path: path.into(),
                                msg: e.to_string(),
                            });
                        }
                    } else {
                        let mut dr = DataStream::new(&mut self.r);
                        let res = sink(Incoming::File {
                            path: path.clone(),
                            size,
                            data: &mut dr,
                        });
                        // Always consume the rest of this file's frames.
                        let drained = dr.drain();
                        if let Some(e) = dr.failed().cloned() {
                            first_err.get_or_insert(self.remote(e));
                        }
                        if let Err(e) = res {
                            first_err.get_or_insert(RepoError::Local {
                                path: path.into(),
                                msg: e.to_string(),
                            });
                        }
                        drained.map_err(|e| RepoError::Connection {
                            host: self.host.clone(),
                            source: e,
                        })?;
                    }
                }
                Response::Err(e) => {
                    first_err.get_or_insert(self.remote(e));
                }
                other => {
                    return Err(RepoError::protocol(
                        &self.host,
                        format!("unexpected reply {other:?}"),
                    ))
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Ends the session politely; the agent rolls back anything still open.
    pub fn close(mut self) -> Result<(), RepoError> {
        let _ = self.send(&Request::Bye);
        let _ = self.recv();
        self.finish();
        Ok(())
    }

    /// A client over an already started remote agent's pipes.
    pub(crate) fn over_child(
        child: crate::ssh::SshChild,
        r: Box<dyn Read + Send>,
        w: Box<dyn Write + Send>,
        host: &str,
        repo: &str,
    ) -> Result<RepoClient, RepoError> {
        let mut c = RepoClient {
            r: BufReader::with_capacity(1 << 20, r),
            w: BufWriter::with_capacity(1 << 20, w),
            host: host.into(),
            repo: repo.into(),
            agent: None,
            child: Some(child),
            repo_exists: false,
            send_error: None,
            local: false,
            staged: Default::default(),
            buf: Vec::new(),
            unread_prepare: false,
        };
        match c.hello() {
            Ok(()) => Ok(c),
            // A handshake that dies is explained by ssh's stderr and exit code.
            Err(RepoError::Connection { source, .. }) => {
                let child = c.child.take().expect("child");
                Err(child.explain(source))
            }
            Err(e) => Err(e),
        }
    }

    fn finish(&mut self) {
        if let Some(mut child) = self.child.take() {
            let (_, w) = match io::pipe() {
                Ok(p) => p,
                Err(_) => return,
            };
            drop(std::mem::replace(&mut self.w, BufWriter::new(Box::new(w))));
            child.wait();
        }
        if let Some(h) = self.agent.take() {
            // Closing our end of the request pipe ends the agent loop.
            let (_, w) = match io::pipe() {
                Ok(p) => p,
                Err(_) => return,
            };
            let old = std::mem::replace(&mut self.w, BufWriter::new(Box::new(w)));
            drop(old);
            let _ = h.join();
        }
    }
}

impl Drop for RepoClient {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Path bytes in one download request: its JSON (each path quoted, in the
/// worst case every byte escaped as `\u00XX`) stays far below the 64 MiB
/// a message may have. A clone of a million files with long paths asked
/// for all of them in one request, which the agent refused as too large.
const BATCH_PATH_BYTES: usize = 1 << 20;

/// `paths` cut into consecutive runs of at most `BATCH_PATH_BYTES`.
fn request_batches<'a, 'b>(paths: &'b [&'a str]) -> impl Iterator<Item = &'b [&'a str]> {
    let mut rest = paths;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let n = rest
            .iter()
            .position(|p| {
                bytes += p.len() + 3;
                bytes > BATCH_PATH_BYTES
            })
            .unwrap_or(rest.len())
            .max(1);
        let (batch, more) = rest.split_at(n);
        rest = more;
        Some(batch)
    })
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    #[test]
    fn batches_cover_every_path_in_order_within_the_limit() {
        let long = "p/".repeat(60);
        let owned: Vec<String> = (0..200_000).map(|i| format!("{long}{i}")).collect();
        let paths: Vec<&str> = owned.iter().map(|s| s.as_str()).collect();
        let batches: Vec<&[&str]> = request_batches(&paths).collect();
        assert!(
            batches.len() > 1,
            "{} path bytes in one request",
            owned.len() * 126
        );
        for b in &batches {
            let bytes: usize = b.iter().map(|p| p.len() + 3).sum();
            assert!(bytes <= BATCH_PATH_BYTES);
        }
        let joined: Vec<&str> = batches.concat();
        assert_eq!(joined, paths);
        assert_eq!(request_batches(&[]).count(), 0);
        // One path longer than a batch still goes, alone.
        let huge = "x".repeat(BATCH_PATH_BYTES + 1);
        assert_eq!(request_batches(&[huge.as_str(), "a"]).count(), 2);
    }
}
