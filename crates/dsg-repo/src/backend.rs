//! The backend trait the agent drives, and the errors backends return.
//!
//! Small, synchronous and object-safe on purpose: the agent holds a
//! `Box<dyn Backend>`, and a new storage kind (ZFS, an object store) is one
//! more implementation, not a change to the protocol or the client.

use std::io::Read;
use std::path::PathBuf;

use crate::protocol::{ErrorKind, RemoteError, StagedFile};

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
    pub hint: Option<String>,
}

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        AgentError {
            kind,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, h: impl Into<String>) -> Self {
        self.hint = Some(h.into());
        self
    }

    pub fn io(what: impl std::fmt::Display, e: std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::AlreadyExists => ErrorKind::Exists,
            _ => ErrorKind::Io,
        };
        let hint = match e.raw_os_error() {
            Some(libc::ENOSPC) => Some(
                "the repository filesystem is full; free space and run the command again"
                    .to_string(),
            ),
            Some(libc::EACCES) | Some(libc::EPERM) => {
                Some("check that your user may write the repository directory".to_string())
            }
            _ => None,
        };
        AgentError {
            kind,
            message: format!("{what}: {e}"),
            hint,
        }
    }

    pub fn to_remote(&self) -> RemoteError {
        RemoteError {
            kind: self.kind,
            message: self.message.clone(),
            hint: self.hint.clone(),
        }
    }
}

/// What a repository path holds.
pub enum Stored {
    File { file: std::fs::File, size: u64 },
    Link { target: String },
}

pub trait Backend: Send {
    /// e.g. `xfs /srv/repos/proj`.
    fn describe(&self) -> String;

    /// True when the repository exists (has a manifest).
    fn exists(&self) -> bool;

    /// Opens `.dsg/<name>` for reading; `Ok(None)` when it does not exist.
    fn open_meta(&self, name: &str) -> Result<Option<std::fs::File>, AgentError>;

    /// Locks the repository, finishes any interrupted transaction, checks the
    /// head is `base` (`None`: the repository must not exist) and prepares
    /// staging for `tx_id`. `user` is shown to others waiting for the lock.
    /// `base_hash`, when given, must be the head's snapshot hash too.
    fn begin(
        &mut self,
        tx_id: &str,
        base: Option<&str>,
        base_hash: Option<&str>,
        user: &str,
    ) -> Result<(), AgentError>;

    /// `begin` of an init that replaces the repository if it exists (the
    /// user confirmed `init --force`): the new repository is built aside
    /// and takes the old one's place in one atomic step at commit; until
    /// then the old one is untouched. The default cannot replace.
    /// `expect_hash`: the head the user saw when confirming; the backend
    /// refuses if the repository holds another one now.
    fn begin_replace(
        &mut self,
        tx_id: &str,
        user: &str,
        expect_hash: Option<&str>,
    ) -> Result<(), AgentError> {
        let _ = (tx_id, user, expect_hash);
        Err(AgentError::new(
            ErrorKind::Protocol,
            format!("{} cannot replace a repository", self.describe()),
        ))
    }

    /// `begin` for a client that lost its connection during `tx_id`'s
    /// uploads: keeps what was staged if the transaction can continue (same
    /// id and base, nothing committed since) and returns it; otherwise
    /// begins afresh and returns nothing. The default cannot resume.
    fn resume(
        &mut self,
        tx_id: &str,
        base: Option<&str>,
        base_hash: Option<&str>,
        user: &str,
    ) -> Result<Vec<StagedFile>, AgentError> {
        self.begin(tx_id, base, base_hash, user)
            .map(|()| Vec::new())
    }

    /// Stages one file from `data`, which holds its bytes from `offset` on
    /// (`offset > 0` continues a prefix listed by `resume`). The backend
    /// verifies the whole file's size and hash before accepting it.
    fn stage_file(
        &mut self,
        path: &str,
        size: u64,
        hash: u64,
        mtime_ns: i64,
        offset: u64,
        data: &mut dyn Read,
    ) -> Result<(), AgentError>;

    fn stage_link(&mut self, path: &str, target: &str) -> Result<(), AgentError>;

    /// Stages a file from a path on this machine (a local client). The
    /// default streams it through `stage_file`; backends may copy faster.
    fn stage_file_from(
        &mut self,
        path: &str,
        size: u64,
        hash: u64,
        mtime_ns: i64,
        src: &std::path::Path,
    ) -> Result<(), AgentError> {
        let mut f =
            dsg_core::hash::open_nofollow(src).map_err(|e| AgentError::io(src.display(), e))?;
        self.stage_file(path, size, hash, mtime_ns, 0, &mut f)
    }

    /// Stages files from paths on this machine, in order, as
    /// `stage_file_from` does each; the first failure ends it (the files
    /// after it are not staged). Backends may copy several at once.
    fn stage_files_from(&mut self, files: &[LocalFile]) -> Result<(), AgentError> {
        for f in files {
            self.stage_file_from(&f.path, f.size, f.hash, f.mtime_ns, &f.src)?;
        }
        Ok(())
    }

    /// Publishes the staged transaction atomically: after this returns Ok the
    /// new snapshot is the repository's head, and a crash at any point before
    /// leaves the old head.
    fn commit(&mut self, commit: &CommitData) -> Result<(), AgentError>;

    /// Does what `commit` of the same data does before its commit point
    /// (checks, metadata staged and durable), so that the `commit` that
    /// follows has only the commit point and the apply left. A failure
    /// leaves the transaction open, for `rollback`. The default does
    /// nothing: `commit` then does it all.
    fn prepare_commit(&mut self, _commit: &CommitData) -> Result<(), AgentError> {
        Ok(())
    }

    /// An unlinked file in the open transaction's staging to spool a
    /// commit's manifest into (`None`: keep it in memory).
    fn spool_file(&mut self) -> Option<std::fs::File> {
        None
    }

    /// Discards the staged transaction (a no-op without one).
    fn rollback(&mut self) -> Result<(), AgentError>;

    /// The connection died with a transaction open: release the lock but
    /// leave what was staged for a `resume`. Whatever is left is rolled
    /// back by the next command's recovery unless a resume claims it
    /// first. The default rolls back.
    fn detach(&mut self) {
        let _ = self.rollback();
    }

    /// Opens a repository path for download.
    fn open(&self, path: &str) -> Result<Stored, AgentError>;

    /// Opens each of `paths` in order and hands it to `each` (inside
    /// `read_lock`). The default opens them one at a time; a backend whose
    /// reads wait on a network (an object store) fetches several at once.
    fn open_each(
        &self,
        paths: Vec<String>,
        each: &mut dyn FnMut(String, Result<Stored, AgentError>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        for p in paths {
            let stored = self.open(&p);
            each(p, stored)?;
        }
        Ok(())
    }

    /// Holds a shared lock for a read of several files, so no commit runs
    /// underneath it (a no-op inside this connection's own transaction).
    fn read_lock(&mut self) -> Result<(), AgentError>;
    fn read_unlock(&mut self);

    /// Finishes or undoes an interrupted transaction unless a live writer
    /// holds the repository. `wait`: first wait (bounded) until no writer
    /// holds it, so that what is read afterwards is settled.
    fn recover(&mut self, wait: bool) -> Result<(), AgentError>;

    /// File names in `.dsg/archive/`.
    fn list_archives(&self) -> Result<Vec<String>, AgentError>;

    /// Opens snapshot `snapshot` (`s<N>`, validated by the backend) for
    /// reading: its manifest and its files' bytes as it recorded them.
    /// The caller holds `read_lock`. The default keeps no history.
    fn open_version(&mut self, snapshot: &str) -> Result<Box<dyn Version>, AgentError> {
        Err(AgentError::new(
            ErrorKind::NotFound,
            format!(
                "{} keeps no history to read {snapshot} from",
                self.describe()
            ),
        ))
    }

    /// The repository directory (for messages and tests).
    fn root(&self) -> PathBuf;

    /// Mounts snapshot `snapshot` (a checked `s<N>`) read-only at
    /// `mountpoint` on this machine: the dataset made, and a guard that
    /// unmounts and destroys it when dropped. Only ZFS can.
    fn mount_snapshot(
        &mut self,
        snapshot: &str,
        _mountpoint: &std::path::Path,
    ) -> Result<(String, Box<dyn Send>), AgentError> {
        Err(AgentError::new(
            ErrorKind::Protocol,
            format!(
                "{} cannot mount {snapshot}: only a ZFS repository can",
                self.describe()
            ),
        ))
    }

    /// `dsg prune`: removes the data that only snapshots outside `policy`
    /// hold (see `crate::prune`). The default keeps everything.
    fn prune(
        &mut self,
        policy: &crate::prune::Policy,
    ) -> Result<crate::protocol::PruneReport, AgentError> {
        let _ = policy;
        Err(AgentError::new(
            ErrorKind::Protocol,
            format!("{} cannot prune", self.describe()),
        ))
    }
}

/// One snapshot of a repository, open for reading (a ZFS snapshot stays
/// mounted while this lives).
pub trait Version: Send {
    /// The snapshot's manifest as the repository holds it.
    fn manifest(&self) -> &dsg_core::manifest::Manifest;
    /// The bytes (or link) stored for `path` in this snapshot; the path is
    /// checked like every other path a client sends.
    fn open(&self, path: &str) -> Result<Stored, AgentError>;
    /// `Some(when)` for a snapshot `dsg prune` removed (its data may be
    /// partly or wholly gone; its manifest stays).
    fn pruned(&self) -> Option<&str> {
        None
    }
}

/// A file a client in this process asks to have staged from its path.
pub struct LocalFile {
    pub path: String,
    pub size: u64,
    pub hash: u64,
    pub mtime_ns: i64,
    pub src: PathBuf,
}

pub struct CommitData {
    pub snapshot_id: String,
    /// The new manifest; in a delta commit (`removed` given) only its added
    /// and changed entries, in path order, with the new manifest's metadata.
    pub manifest: Blob,
    /// A delta commit: the base's paths the new manifest drops, a JSON
    /// array of strings in path order.
    pub removed: Option<Vec<u8>>,
    pub sync_messages: Vec<u8>,
}

/// Bytes a commit brings: in memory, or spooled to a file (a manifest:
/// hundreds of MB at a million entries, never held whole by the agent).
pub enum Blob {
    Bytes(Vec<u8>),
    /// An unlinked file holding exactly the bytes, read from offset 0.
    File(std::fs::File),
}

impl From<Vec<u8>> for Blob {
    fn from(b: Vec<u8>) -> Blob {
        Blob::Bytes(b)
    }
}

impl Blob {
    /// The bytes from the start (each call starts again).
    pub fn reader(&self) -> Box<dyn Read + '_> {
        match self {
            Blob::Bytes(b) => Box::new(&b[..]),
            Blob::File(f) => Box::new(std::io::BufReader::with_capacity(
                1 << 16,
                FileAt { f, pos: 0 },
            )),
        }
    }

    /// Writes the bytes to `path` atomically and durably.
    pub fn write_atomic(&self, path: &std::path::Path) -> Result<(), dsg_core::atomic::WriteError> {
        match self {
            Blob::Bytes(b) => dsg_core::atomic::write_atomic(path, b),
            Blob::File(_) => {
                let mut out = dsg_core::atomic::AtomicFile::create(path)?;
                std::io::copy(&mut self.reader(), out.file()).map_err(|source| {
                    dsg_core::atomic::WriteError {
                        path: path.to_path_buf(),
                        source,
                    }
                })?;
                out.commit(true)
            }
        }
    }

    /// Whether the file at `path` holds exactly these bytes.
    pub fn same_as_file(&self, path: &std::path::Path) -> bool {
        let Ok(f) = std::fs::File::open(path) else {
            return false;
        };
        let mut a = std::io::BufReader::with_capacity(1 << 16, f);
        let mut b = self.reader();
        let (mut x, mut y) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
        loop {
            let n = match read_full(&mut a, &mut x) {
                Ok(n) => n,
                Err(_) => return false,
            };
            let m = match read_full(&mut b, &mut y) {
                Ok(m) => m,
                Err(_) => return false,
            };
            if n != m || x[..n] != y[..m] {
                return false;
            }
            if n == 0 {
                return true;
            }
        }
    }
}

/// Reads until `buf` is full or the end.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A file read with `pread` from its start, whatever its cursor.
struct FileAt<'a> {
    f: &'a std::fs::File,
    pos: u64,
}

impl Read for FileAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.f.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod blob_tests {
    use super::*;

    #[test]
    fn a_spooled_blob_reads_writes_and_compares_like_its_bytes() {
        let dir = std::env::temp_dir().join(format!("dsg-blob-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let spool = dir.join("spool");
        std::fs::write(&spool, &bytes).unwrap();
        let mut f = std::fs::File::open(&spool).unwrap();
        // The cursor is not where the reads start: they are positional.
        std::io::Read::read_exact(&mut f, &mut [0u8; 10]).unwrap();
        std::fs::remove_file(&spool).unwrap();
        for blob in [Blob::File(f), Blob::Bytes(bytes.clone())] {
            let mut back = Vec::new();
            blob.reader().read_to_end(&mut back).unwrap();
            assert_eq!(back, bytes);
            let out = dir.join("out");
            blob.write_atomic(&out).unwrap();
            assert_eq!(std::fs::read(&out).unwrap(), bytes);
            assert!(blob.same_as_file(&out));
            let mut other = bytes.clone();
            other[150_000] ^= 1;
            std::fs::write(&out, &other).unwrap();
            assert!(!blob.same_as_file(&out));
            std::fs::write(&out, &bytes[..1000]).unwrap();
            assert!(!blob.same_as_file(&out));
            assert!(!blob.same_as_file(&dir.join("missing")));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
