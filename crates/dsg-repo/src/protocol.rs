//! The agent protocol: framed messages over a byte stream (a child's pipes
//! locally, one SSH channel remotely — the same bytes either way).
//!
//! A frame is `tag: u8, len: u32 (LE), payload`. Tag `J` carries one JSON
//! control message, `D` a chunk of file data (at most `CHUNK` bytes), `E` ends
//! a data stream. Requests are pipelined: the client may send many before
//! reading, and the agent answers them in order. Uploads are acknowledged at
//! barriers (`Flush`, `Commit`), never per file, so neither side can fill the
//! other's pipe while it is itself blocked writing.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// 2: resumable uploads (`Begin.resume`, `PutFile.offset`, `Resumed`).
/// 3: `Begin.base_hash` and `Begin.replace`, which an agent of 2 would
/// silently ignore.
/// 4: every `GetFiles` answer ends with `Ok`; a failed stream ends in `Err`.
/// 5: history reads, `GetVersions` and `Rehash`, which an agent of 4 would
/// take for a malformed message and end the connection on.
/// 6: `ListRepos` (the repositories in the agent's directory),
/// `MountSnapshot` (a read-only clone of a ZFS snapshot, held for the
/// connection, for `snapmount` on the repository host) and `Prune` (with
/// its `Pruned` reply and the `pruned` error kind).
/// 7: `Commit.delta`: the manifest stream holds only the new manifest's
/// added and changed entries (and its metadata), followed by a stream of
/// the base's paths it drops; the agent merges them into its head.
/// 8: `Commit.prepare` and `CommitPrepared`: a sync's commit in two steps,
/// so the client stages its own side while the agent checks and stages
/// the repository's (an agent of 7 would ignore `prepare` and commit at
/// once, before the client's side is ready).
pub const PROTOCOL_VERSION: u32 = 8;
pub const CHUNK: usize = 1 << 20;
const MAX_JSON: usize = 64 << 20;

/// The largest manifest the agent accepts with a `Commit`. The commit
/// needs it whole in memory (it is parsed and checked there), so a client
/// must not choose how much: a manifest entry is 250–350 bytes of JSON, so
/// this holds a snapshot of well over a million files.
pub const MAX_MANIFEST_BYTES: u64 = 512 << 20;
/// The largest sync-messages file the agent accepts with a `Commit`: it
/// grows by one entry of a few hundred bytes per sync.
pub const MAX_MESSAGES_BYTES: u64 = 64 << 20;
/// Lowers or raises both limits above on the repository host, in bytes
/// (for tests, or a repository that outgrew them).
pub const MAX_META_ENV: &str = "DSG_AGENT_MAX_META";

/// `Request::GetFiles` and `Request::GetVersions` as a client sends them,
/// borrowing the paths: a clone asks for every file in one request, and
/// owned copies of all the paths would cost it ~60 bytes a file.
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum FilesRequest<'a> {
    GetFiles {
        paths: &'a [&'a str],
    },
    GetVersions {
        snapshot: &'a str,
        paths: &'a [&'a str],
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Hello {
        protocol: u32,
        client_version: String,
    },
    /// Reads `.dsg/<name>` (a manifest, sync-messages or an archive). When
    /// `unless_hash` equals the XXH3 of the file, the agent answers
    /// `Unchanged` instead of sending it.
    ReadMeta {
        name: String,
        unless_hash: Option<u64>,
    },
    /// Starts a transaction. `base` is the snapshot id the client planned
    /// against (`None` = the repository must not exist yet: init).
    ///
    /// `resume`: the client lost its connection during this transaction's
    /// uploads and reconnected. If the agent still has the transaction's
    /// staging (same id, same base, nothing else happened since), it keeps
    /// it and answers `Resumed` with what is staged; otherwise it begins
    /// afresh and answers `Resumed` with nothing.
    Begin {
        tx_id: String,
        base: Option<String>,
        user: String,
        #[serde(default)]
        resume: bool,
        /// With `base: None`: replace the repository if it exists (a
        /// confirmed `init --force`); it stays untouched until the commit.
        #[serde(default)]
        replace: bool,
        /// A sync: the snapshot hash of `base` (snapshot ids start again
        /// at s1 in a replaced repository: the id alone is not enough). A
        /// replacing init: the XXH3 (hex) of the head manifest file the
        /// user confirmed replacing.
        #[serde(default)]
        base_hash: Option<String>,
    },
    /// Followed by data frames and an end frame carrying the file's bytes
    /// from `offset` on. `offset > 0` continues a staged prefix of that
    /// length (from `Resumed`); the agent hashes prefix and rest together,
    /// so the whole file is verified either way.
    PutFile {
        path: String,
        size: u64,
        hash: u64,
        mtime_ns: i64,
        #[serde(default)]
        offset: u64,
    },
    PutLink {
        path: String,
        target: String,
    },
    /// Same machine only (the in-process agent): the agent copies `src`
    /// itself (copy_file_range, a reflink where the filesystem can) and
    /// verifies the copy. An agent reached over SSH refuses it.
    PutFileLocal {
        path: String,
        size: u64,
        hash: u64,
        mtime_ns: i64,
        src: String,
    },
    /// Reports the first error of the puts since the last barrier.
    Flush,
    /// Publishes the transaction: the new manifest and sync-messages follow
    /// as two data streams. The agent works out the deletions itself (base
    /// entries absent from the new manifest) and archives the old head's
    /// bytes as they are.
    Commit {
        snapshot_id: String,
        /// A delta commit (see `PROTOCOL_VERSION` 7): three streams, not two.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        delta: bool,
        /// Only check and stage the commit, up to its commit point, and
        /// answer `Ok`: `CommitPrepared` then commits it; any other request
        /// (or the connection's end) undoes the transaction first.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        prepare: bool,
    },
    /// Commits what the last `Commit { prepare: true }` prepared: answered
    /// `Committed`, like a `Commit`.
    CommitPrepared,
    /// Finishes or undoes an interrupted transaction if the repository is
    /// not locked by a live writer; a no-op otherwise. `wait`: first wait
    /// for a live writer to finish (used when a commit's reply was lost, so
    /// that the head read next is the transaction's final outcome).
    Recover {
        #[serde(default)]
        wait: bool,
    },
    /// Names of the files in `.dsg/archive/`.
    ListArchives,
    Rollback,
    /// Streams the named files back, in order: a `File` (with its data
    /// stream) or an `Err` per path, then `Ok`. When none can be read (the
    /// repository is busy), one `Err`, then `Ok`.
    GetFiles {
        paths: Vec<String>,
    },
    /// `GetFiles` as of snapshot `snapshot` (`s<N>`): the same stream
    /// shape, the files' bytes as that snapshot recorded them (on a
    /// directory repository from the tree or `.dsg/objects/`, on ZFS from
    /// `@sN`). The client verifies them against its copy of that manifest.
    GetVersions {
        snapshot: String,
        paths: Vec<String>,
    },
    /// Re-hashes every file of snapshot `snapshot` on the repository host
    /// against that snapshot's manifest there: `Progress` replies while it
    /// works, then `Rehashed` (or `Err`).
    Rehash {
        snapshot: String,
    },
    Bye,
    /// The repositories directly in the directory the agent serves (its
    /// `--repo`): answered with `Repos`. Only their head manifests are read.
    ListRepos,
    /// Mounts snapshot `snapshot` (`s<N>`) read-only at `mountpoint` (an
    /// empty folder on the repository host) as a ZFS clone the agent names
    /// itself, held until the connection ends; answered `Mounted` or
    /// `Err`. Only from a client in the agent's own process (the path is
    /// on this machine); refused over SSH.
    MountSnapshot {
        snapshot: String,
        mountpoint: String,
    },
    /// Removes the data only old snapshots hold (`dsg prune`). The client
    /// sends the policy, never a list of what to delete: the agent decides
    /// under the repository's exclusive lock, always keeps the head and
    /// never deletes what a kept snapshot references. Answered `Pruned`.
    Prune {
        /// How many of the newest snapshots to keep (the head counts; ≥ 1).
        keep_last: u64,
        /// Also keep snapshots made at most this many seconds ago.
        #[serde(default)]
        keep_within_secs: Option<u64>,
        dry_run: bool,
        /// Shown to others waiting for the lock, recorded with the prune.
        user: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    Hello {
        protocol: u32,
        version: String,
        repo_exists: bool,
        backend: String,
    },
    Ok,
    /// A data stream follows (a file or a metadata file).
    Data {
        size: u64,
    },
    Missing,
    Unchanged,
    /// One file of a `GetFiles` stream: its data frames follow.
    File {
        path: String,
        kind: String,
        size: u64,
        target: Option<String>,
    },
    Committed {
        snapshot_id: String,
    },
    /// The answer to a resuming `Begin`: a data stream follows holding a
    /// JSON array of `StagedFile`, the regular files already in staging and
    /// how many bytes of each arrived (a stream: the list can be long).
    Resumed {
        files: u64,
    },
    Names {
        names: Vec<String>,
    },
    /// While a `Rehash` works: how much it has hashed so far.
    Progress {
        files: u64,
        bytes: u64,
    },
    /// The end of a `Rehash`: what was checked, and what did not match.
    Rehashed(RehashReport),
    Err(RemoteError),
    /// The answer to `ListRepos`.
    Repos {
        repos: Vec<crate::list::RepoInfo>,
    },
    /// `MountSnapshot` done: the clone's dataset.
    Mounted {
        dataset: String,
    },
    /// The answer to `Prune`.
    Pruned(PruneReport),
}

/// What a `Prune` did (or, in a dry run, would do).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PruneReport {
    pub head: String,
    /// The snapshots kept, oldest first (the head always).
    pub kept: Vec<String>,
    /// The snapshots this prune removes the data of, oldest first.
    pub pruned: Vec<String>,
    /// Snapshots an earlier prune removed already.
    pub already_pruned: Vec<String>,
    /// ZFS snapshots not kept that stay because a clone depends on them
    /// (a snapshot being read or mounted).
    pub in_use: Vec<String>,
    /// Objects (`.dsg/objects/`) removed and their bytes.
    pub objects: u64,
    pub bytes: u64,
    /// ZFS snapshots destroyed.
    pub zfs_snapshots: Vec<String>,
    pub dry_run: bool,
}

impl PruneReport {
    /// A report keeping `kept` (with `head`) that has removed nothing yet.
    pub fn keeping(head: String, kept: &std::collections::BTreeSet<u64>, dry_run: bool) -> Self {
        PruneReport {
            head,
            kept: kept.iter().map(|n| format!("s{n}")).collect(),
            pruned: Vec::new(),
            already_pruned: Vec::new(),
            in_use: Vec::new(),
            objects: 0,
            bytes: 0,
            zfs_snapshots: Vec::new(),
            dry_run,
        }
    }
}

/// What a `Rehash` found: the manifest it checked against (its recorded
/// hashes) and every path whose bytes differ from it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RehashReport {
    pub snapshot_id: String,
    pub entries_hash: String,
    pub snapshot_hash: String,
    pub files: u64,
    pub bytes: u64,
    /// At most `MAX_REHASH_PROBLEMS` of them; `problem_count` has all.
    pub problems: Vec<RehashProblem>,
    pub problem_count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RehashProblem {
    /// Empty: the manifest itself.
    pub path: String,
    pub problem: String,
}

/// How many problems a `Rehashed` lists (a whole damaged tree would
/// otherwise make one huge control frame).
pub const MAX_REHASH_PROBLEMS: usize = 1000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StagedFile {
    pub path: String,
    pub len: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RemoteError {
    pub kind: ErrorKind,
    pub message: String,
    pub hint: Option<String>,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A data stream the sender could not finish ends with an `Err` control
/// message instead of its end frame; readers hand it out as the source of
/// an `io::Error` (see [`remote_error`]).
impl std::error::Error for RemoteError {}

/// The sender's error that ended a data stream early, if that is what `e`
/// is: the connection is still in step after it, unlike after any other
/// error reading a stream.
pub fn remote_error(e: &io::Error) -> Option<&RemoteError> {
    e.get_ref().and_then(|x| x.downcast_ref::<RemoteError>())
}

/// The `Err` frame that ends a stream early, read into an `io::Error`;
/// any other control message is out of step.
fn stream_error(body: &[u8]) -> io::Error {
    match serde_json::from_slice::<Response>(body) {
        Ok(Response::Err(e)) => io::Error::other(e),
        _ => io::Error::new(
            io::ErrorKind::InvalidData,
            "control message inside a data stream",
        ),
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Io,
    NotFound,
    Exists,
    Busy,
    /// The repository head is not the snapshot the client planned against.
    Moved,
    /// The commit point passed but finishing failed: the next command's
    /// recovery completes it. Not a rollback.
    Incomplete,
    Corrupt,
    Verify,
    Protocol,
    Unsafe,
    /// The data asked for belonged to a snapshot that `dsg prune` removed.
    Pruned,
    /// The credentials in use may not do this (an object store refused a
    /// key it knows: a key that may only read, asked to write).
    Denied,
}

pub enum Frame {
    Json(Vec<u8>),
    Data(Vec<u8>),
    End,
}

pub fn write_json<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    write_frame(w, b'J', &body)
}

pub fn write_frame<W: Write>(w: &mut W, tag: u8, body: &[u8]) -> io::Result<()> {
    let mut hdr = [0u8; 5];
    hdr[0] = tag;
    hdr[1..].copy_from_slice(&(body.len() as u32).to_le_bytes());
    w.write_all(&hdr)?;
    w.write_all(body)
}

/// Writes `bytes` as data frames followed by an end frame.
pub fn write_data<W: Write>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    for c in bytes.chunks(CHUNK) {
        write_frame(w, b'D', c)?;
    }
    write_frame(w, b'E', &[])
}

/// Streams a reader as data frames; returns the number of bytes sent. A
/// read that fails once the stream has begun ends it with an `Err` naming
/// `what` (the receiver is waiting for frames: it must hear why they stop)
/// and the connection goes on.
pub fn copy_as_data<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    buf: &mut Vec<u8>,
    what: &str,
) -> io::Result<u64> {
    // Frames start at 64 KiB and grow to CHUNK once a read fills one: a
    // small file (sync-messages, read at every sync) touches no whole MiB.
    // For the in-process agent that MiB stayed resident through the sync.
    buf.resize(buf.len().clamp(1 << 16, CHUNK), 0);
    let mut total = 0u64;
    loop {
        let n = match r.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let err = RemoteError {
                    kind: ErrorKind::Io,
                    message: format!("reading {what} failed after {total} bytes: {e}"),
                    hint: Some(
                        "nothing was changed by this read; run the command again, and check the repository host's disk if it fails again".into(),
                    ),
                };
                write_json(w, &Response::Err(err))?;
                return Ok(total);
            }
        };
        write_frame(w, b'D', &buf[..n])?;
        total += n as u64;
        if n == buf.len() && n < CHUNK {
            buf.resize(CHUNK, 0);
        }
    }
    write_frame(w, b'E', &[])?;
    Ok(total)
}

pub fn read_frame<R: Read>(r: &mut R) -> io::Result<Frame> {
    let mut hdr = [0u8; 5];
    r.read_exact(&mut hdr)?;
    let len = u32::from_le_bytes(hdr[1..].try_into().unwrap()) as usize;
    let limit = if hdr[0] == b'J' { MAX_JSON } else { CHUNK };
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame too large ({len} bytes)"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    match hdr[0] {
        b'J' => Ok(Frame::Json(body)),
        b'D' => Ok(Frame::Data(body)),
        b'E' => Ok(Frame::End),
        t => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown frame tag {t:#x}"),
        )),
    }
}

pub fn read_json<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> io::Result<T> {
    match read_frame(r)? {
        Frame::Json(b) => serde_json::from_slice(&b)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad message: {e}"))),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "expected a control message, got data",
        )),
    }
}

/// Reads a data stream into memory (for metadata files, which are bounded).
pub fn read_data_to_vec<R: Read>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        match read_frame(r)? {
            Frame::Data(d) => out.extend_from_slice(&d),
            Frame::End => return Ok(out),
            Frame::Json(b) => return Err(stream_error(&b)),
        }
    }
}

/// Reads a data stream into memory, at most `limit` bytes of it. A longer
/// stream is read to its end but not kept, so the connection stays in step
/// without the memory: `Ok(Err(n))` says it held `n` bytes (or more).
pub fn read_data_bounded<R: Read>(r: &mut R, limit: u64) -> io::Result<Result<Vec<u8>, u64>> {
    let mut ds = DataStream::new(r);
    let mut out = Vec::new();
    (&mut ds)
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)?;
    let kept = out.len() as u64;
    if kept <= limit {
        return Ok(Ok(out));
    }
    drop(out);
    let rest = io::copy(&mut ds, &mut io::sink())?;
    Ok(Err(kept.saturating_add(rest)))
}

/// What `read_data_bounded_to` did with a data stream.
pub enum Bounded {
    /// Written whole: this many bytes.
    Kept(u64),
    /// Longer than the limit (this many bytes): read to its end, not kept.
    TooLarge(u64),
    /// Writing failed: the rest was read and dropped.
    WriteFailed(io::Error),
}

/// `read_data_bounded` into a writer (a spool file) instead of memory.
/// Only reading errors (the connection) are `Err`.
pub fn read_data_bounded_to<R: Read, W: Write>(
    r: &mut R,
    limit: u64,
    out: &mut W,
) -> io::Result<Bounded> {
    let mut ds = DataStream::new(r);
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    let mut failed = None;
    loop {
        let n = match ds.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        if failed.is_none() && total <= limit {
            if let Err(e) = out.write_all(&buf[..n]) {
                failed = Some(e);
            }
        }
    }
    Ok(match failed {
        _ if total > limit => Bounded::TooLarge(total),
        Some(e) => Bounded::WriteFailed(e),
        None => match out.flush() {
            Ok(()) => Bounded::Kept(total),
            Err(e) => Bounded::WriteFailed(e),
        },
    })
}

/// A data stream (frames until `End`) read as a `Read`. Frame bodies are
/// read straight into the caller's buffer: a large file crosses this layer
/// without an allocation or an extra copy per chunk.
pub struct DataStream<'a, R: Read> {
    r: &'a mut R,
    /// Bytes of the current data frame not yet read.
    remaining: usize,
    done: bool,
    /// The sender's error that ended the stream early.
    failed: Option<RemoteError>,
}

impl<'a, R: Read> DataStream<'a, R> {
    pub fn new(r: &'a mut R) -> Self {
        DataStream {
            r,
            remaining: 0,
            done: false,
            failed: None,
        }
    }

    /// Consumes the rest of the stream (after the reader stopped early).
    /// A stream the sender ended with an error is over, in step: `Ok`.
    pub fn drain(&mut self) -> io::Result<()> {
        match io::copy(self, &mut io::sink()) {
            Err(_) if self.failed.is_some() => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// The error the sender ended the stream with, if it did.
    pub fn failed(&self) -> Option<&RemoteError> {
        self.failed.as_ref()
    }
}

impl<R: Read> Read for DataStream<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.remaining == 0 {
            if let Some(e) = &self.failed {
                return Err(io::Error::other(e.clone()));
            }
            if self.done || out.is_empty() {
                return Ok(0);
            }
            let mut hdr = [0u8; 5];
            self.r.read_exact(&mut hdr)?;
            let len = u32::from_le_bytes(hdr[1..].try_into().unwrap()) as usize;
            match hdr[0] {
                b'D' if len <= CHUNK => self.remaining = len,
                b'D' => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("frame too large ({len} bytes)"),
                    ))
                }
                b'E' if len == 0 => self.done = true,
                b'E' => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("end frame with a {len}-byte body"),
                    ))
                }
                b'J' if len <= MAX_JSON => {
                    let mut body = vec![0u8; len];
                    self.r.read_exact(&mut body)?;
                    let e = stream_error(&body);
                    if let Some(remote) = remote_error(&e) {
                        self.done = true;
                        self.failed = Some(remote.clone());
                    }
                    return Err(e);
                }
                t => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad frame tag {t:#x} in a data stream"),
                    ))
                }
            }
        }
        let want = out.len().min(self.remaining);
        let n = self.r.read(&mut out[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed inside a data frame",
            ));
        }
        self.remaining -= n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent reads what the client's borrowed requests write as the
    /// `Request` they mirror.
    #[test]
    fn borrowed_file_requests_are_the_requests() {
        let paths = ["a/b", "c\"d"];
        let owned: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        let pairs = [
            (
                FilesRequest::GetFiles { paths: &paths },
                Request::GetFiles {
                    paths: owned.clone(),
                },
            ),
            (
                FilesRequest::GetVersions {
                    snapshot: "s3",
                    paths: &paths,
                },
                Request::GetVersions {
                    snapshot: "s3".into(),
                    paths: owned.clone(),
                },
            ),
        ];
        for (borrowed, req) in pairs {
            assert_eq!(
                serde_json::to_vec(&borrowed).unwrap(),
                serde_json::to_vec(&req).unwrap()
            );
        }
    }

    #[test]
    fn data_stream_reads_frames_in_any_read_sizes() {
        let body: Vec<u8> = (0..(3 * CHUNK + 17))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut wire = Vec::new();
        write_data(&mut wire, &body).unwrap();
        write_json(&mut wire, &Request::Flush).unwrap();
        for step in [1usize, 7, 4096, CHUNK, 2 * CHUNK] {
            let mut r = &wire[..];
            let mut got = Vec::new();
            let mut ds = DataStream::new(&mut r);
            let mut buf = vec![0u8; step];
            loop {
                let n = ds.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got.len(), body.len(), "read size {step}");
            assert!(got == body, "read size {step}");
            // The stream stops at its end frame: the next message is intact.
            assert!(matches!(
                read_json::<_, Request>(&mut r).unwrap(),
                Request::Flush
            ));
        }
    }

    #[test]
    fn bounded_read_keeps_up_to_its_limit_and_stays_in_step() {
        let mut wire = Vec::new();
        write_data(&mut wire, &[1u8; 3 * CHUNK]).unwrap();
        write_data(&mut wire, &[2u8; 10]).unwrap();
        write_json(&mut wire, &Request::Flush).unwrap();
        let mut r = &wire[..];
        let too_long = read_data_bounded(&mut r, CHUNK as u64).unwrap();
        assert_eq!(too_long, Err(3 * CHUNK as u64));
        assert_eq!(read_data_bounded(&mut r, 10).unwrap(), Ok(vec![2u8; 10]));
        assert!(matches!(
            read_json::<_, Request>(&mut r).unwrap(),
            Request::Flush
        ));
    }

    #[test]
    fn bounded_read_to_a_writer_spools_refuses_and_stays_in_step() {
        let mut wire = Vec::new();
        write_data(&mut wire, &[1u8; 3 * CHUNK]).unwrap();
        write_data(&mut wire, &[2u8; 10]).unwrap();
        write_data(&mut wire, &[3u8; 5]).unwrap();
        write_json(&mut wire, &Request::Flush).unwrap();
        let mut r = &wire[..];
        let mut spool = Vec::new();
        assert!(matches!(
            read_data_bounded_to(&mut r, CHUNK as u64, &mut spool).unwrap(),
            Bounded::TooLarge(n) if n == 3 * CHUNK as u64
        ));
        let mut spool = Vec::new();
        assert!(matches!(
            read_data_bounded_to(&mut r, 10, &mut spool).unwrap(),
            Bounded::Kept(10)
        ));
        assert_eq!(spool, vec![2u8; 10]);
        // A writer that fails: the stream is still read to its end.
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        assert!(matches!(
            read_data_bounded_to(&mut r, 10, &mut Full).unwrap(),
            Bounded::WriteFailed(_)
        ));
        assert!(matches!(
            read_json::<_, Request>(&mut r).unwrap(),
            Request::Flush
        ));
    }

    #[test]
    fn a_stream_ended_by_an_error_is_an_error_and_stays_in_step() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk on fire"));
                }
                self.0 -= 1;
                out[0] = 1;
                Ok(1)
            }
        }
        let mut wire = Vec::new();
        let mut buf = Vec::new();
        for _ in 0..2 {
            copy_as_data(&mut Failing(3), &mut wire, &mut buf, "f").unwrap();
            write_json(&mut wire, &Request::Flush).unwrap();
        }
        let mut r = &wire[..];
        let e = read_data_to_vec(&mut r).unwrap_err();
        assert!(remote_error(&e).unwrap().message.contains("disk on fire"));
        assert!(matches!(
            read_json::<_, Request>(&mut r).unwrap(),
            Request::Flush
        ));
        let mut ds = DataStream::new(&mut r);
        assert!(io::copy(&mut ds, &mut io::sink()).is_err());
        ds.drain().unwrap();
        assert_eq!(ds.failed().unwrap().kind, ErrorKind::Io);
        assert!(matches!(
            read_json::<_, Request>(&mut r).unwrap(),
            Request::Flush
        ));
    }

    #[test]
    fn data_stream_cut_inside_a_frame_is_an_error_not_an_end() {
        let mut wire = Vec::new();
        write_data(&mut wire, &[7u8; 1000]).unwrap();
        let cut = &wire[..600];
        let mut r = cut;
        let mut ds = DataStream::new(&mut r);
        let mut sink = Vec::new();
        let e = io::copy(&mut ds, &mut sink).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn data_stream_refuses_an_end_frame_with_a_body() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b'E', b"xyz").unwrap();
        let mut r = &wire[..];
        let e = io::copy(&mut DataStream::new(&mut r), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("end frame"), "{e}");
    }

    #[test]
    fn data_stream_refuses_a_control_message_inside() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b'D', b"abc").unwrap();
        write_json(&mut wire, &Request::Flush).unwrap();
        let mut r = &wire[..];
        let mut ds = DataStream::new(&mut r);
        let mut sink = Vec::new();
        let e = io::copy(&mut ds, &mut sink).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
