//! Downloads from an S3 repository: many files at once, and a large
//! object in parallel ranges.
//!
//! Small files are fetched by a pool of threads ahead of the one being
//! sent, each into an unlinked scratch file (the store's latency, not its
//! bandwidth, bounds a clone of many small files). A large object is not
//! fetched ahead: at its turn it is streamed to the consumer through a
//! pipe, `STREAMS` ranged GETs in flight and written in order, so its
//! bytes are neither staged on disk nor read twice, and one GET stream
//! (the pace of one connection through the gateway) does not bound it.
//! Memory: at most `STREAMS + 1` ranges of one object at a time.
//!
//! Every range's place and length are checked (`Store::get_range`), as is
//! the object's size against the one its name records; a range cut short
//! is asked again for the bytes still missing only, not the whole object.
//! The client verifies every file's size and XXH3 against the manifest as
//! it arrives, however the agent fetched it (dsg-sync's `download`): a
//! stream that fails midway ends short, fails that check and is never
//! installed; the store's error is logged as a warning.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use dsg_s3::{S3Error, Store};

use super::upload::Budget;
use super::{corrupt, err, WORKERS};
use crate::backend::{AgentError, Stored};

/// Objects larger than this are fetched in ranges.
pub(super) const RANGED_OVER: u64 = 32 << 20;
/// The size of one range.
const RANGE: u64 = 8 << 20;
/// Ranges of one object in flight at once.
const STREAMS: usize = 4;
/// Ranges in flight in the whole process: the agent opens several files
/// at once (`open_each`), and each large one would add `STREAMS`.
static IN_FLIGHT: Budget = Budget::new(16);
/// Tries of one range whose body is cut (a failure before the answer's
/// head is retried by the store client itself).
const RANGE_TRIES: u32 = 6;

/// The bytes of content object `key` (of `size` bytes, as its name says)
/// in an unlinked file, positioned at its start; `None` when there is no
/// such object.
pub(super) fn object_file(store: &Store, key: &str, size: u64) -> Result<Option<File>, AgentError> {
    let mut f = tempfile::tempfile().map_err(|e| AgentError::io("a scratch file", e))?;
    if size > RANGED_OVER {
        if !ranged(store, key, size, &f)? {
            return Ok(None);
        }
    } else if store.get_to(key, &mut f).map_err(err)?.is_none() {
        return Ok(None);
    }
    f.rewind()
        .map_err(|e| AgentError::io("a scratch file", e))?;
    Ok(Some(f))
}

/// What a path of the snapshot being read is.
pub(super) enum Located {
    Link(String),
    Object { key: String, size: u64 },
}

/// A path's answer fetched ahead, or a large object left for its turn.
enum Ahead {
    Ready(Result<Stored, AgentError>),
    Large { key: String, size: u64 },
}

/// Opens each of `paths` (`locate` says what it is) and hands it to
/// `each` in order: small files fetched by `WORKERS` threads at most
/// `WINDOW` ahead of the one being sent, a large object streamed at its
/// turn.
pub(super) fn open_each(
    store: &Arc<Store>,
    paths: Vec<String>,
    locate: &(dyn Fn(&str) -> Result<Located, AgentError> + Sync),
    each: &mut dyn FnMut(String, Result<Stored, AgentError>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    const WINDOW: usize = 64;
    let next = AtomicUsize::new(0);
    let sent = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let paths = &paths;
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Ahead)>();
        for _ in 0..WORKERS.min(paths.len()) {
            let (tx, next, sent, stop) = (tx.clone(), &next, &sent, &stop);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= paths.len() {
                    return;
                }
                while i >= sent.load(Ordering::SeqCst) + WINDOW {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                if stop.load(Ordering::SeqCst)
                    || tx.send((i, ahead(store, locate, &paths[i]))).is_err()
                {
                    return;
                }
            });
        }
        drop(tx);
        let mut ready = BTreeMap::new();
        let mut want = 0;
        let result = (|| {
            while want < paths.len() {
                let Ok((i, r)) = rx.recv() else { break };
                ready.insert(i, r);
                while let Some(r) = ready.remove(&want) {
                    let r = match r {
                        Ahead::Ready(r) => r,
                        Ahead::Large { key, size } => {
                            stream(store, &key, size).map(|file| Stored::File { file, size })
                        }
                    };
                    each(paths[want].clone(), r)?;
                    want += 1;
                    sent.store(want, Ordering::SeqCst);
                }
            }
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        result
    })
}

fn ahead(
    store: &Store,
    locate: &(dyn Fn(&str) -> Result<Located, AgentError> + Sync),
    path: &str,
) -> Ahead {
    match locate(path) {
        Err(e) => Ahead::Ready(Err(e)),
        Ok(Located::Link(target)) => Ahead::Ready(Ok(Stored::Link { target })),
        Ok(Located::Object { key, size }) if size > RANGED_OVER => Ahead::Large { key, size },
        Ok(Located::Object { key, size }) => Ahead::Ready(open_object(store, &key, size, path)),
    }
}

/// Content object `key` (`size` bytes, the contents of `path`) in an
/// unlinked file.
pub(super) fn open_object(
    store: &Store,
    key: &str,
    size: u64,
    path: &str,
) -> Result<Stored, AgentError> {
    match object_file(store, key, size)? {
        Some(file) => Ok(Stored::File { file, size }),
        None => Err(corrupt(key, format!("missing (the contents of {path})"))),
    }
}

/// Content object `key` read through a pipe, fed in order by a thread
/// fetching `STREAMS` ranges at a time. Its size is checked first (and
/// that it exists), so a missing or damaged object is an error here, not
/// a short stream.
fn stream(store: &Arc<Store>, key: &str, size: u64) -> Result<File, AgentError> {
    match store.head(key).map_err(err)? {
        None => return Err(corrupt(key, "missing, though the manifest names it")),
        Some(info) if info.size != size => {
            return Err(corrupt(
                key,
                format!("the object holds {} bytes, its name says {size}", info.size),
            ))
        }
        Some(_) => {}
    }
    let (r, w) = std::io::pipe().map_err(|e| AgentError::io("a pipe", e))?;
    // A larger pipe than the default 64 KiB: fewer switches between the
    // feeding thread and the reader (best effort; the usual limit for an
    // unprivileged user is 1 MiB).
    let _ = rustix::pipe::fcntl_setpipe_size(&w, 1 << 20);
    let (store, key) = (store.clone(), key.to_string());
    std::thread::Builder::new()
        .name("dsg-s3-ranges".into())
        .spawn(move || match feed(&store, &key, size, w) {
            Ok(()) => {}
            Err(Failed::Missing) => tracing::warn!("{key}: removed while being read"),
            Err(Failed::Error(e)) => tracing::warn!("{}", e.message),
        })
        .map_err(|e| AgentError::io("a download thread", e))?;
    Ok(File::from(OwnedFd::from(r)))
}

/// The ranges fetched and not yet written, and where the fetchers are.
struct Window {
    next: u64,
    written: u64,
    done: BTreeMap<u64, Vec<u8>>,
    /// Buffers written out, reused: fresh memory for every range would
    /// cost a page fault per page.
    spare: Vec<Vec<u8>>,
    failed: Option<Failed>,
    stop: bool,
}

/// Writes `key`'s bytes into `out` in order while fetchers get the ranges
/// at most `STREAMS` ahead of the one being written. A consumer that stops
/// reading ends it quietly.
fn feed(store: &Store, key: &str, size: u64, mut out: impl Write) -> Result<(), Failed> {
    let ranges = size.div_ceil(RANGE);
    let window = Mutex::new(Window {
        next: 0,
        written: 0,
        done: BTreeMap::new(),
        spare: Vec::new(),
        failed: None,
        stop: false,
    });
    let changed = Condvar::new();
    let lock = || window.lock().expect("range window");
    std::thread::scope(|s| {
        for _ in 0..STREAMS.min(ranges as usize) {
            s.spawn(|| loop {
                let (i, mut buf) = {
                    let mut w = lock();
                    while !w.stop && w.next < ranges && w.next >= w.written + STREAMS as u64 {
                        w = changed.wait(w).expect("range window");
                    }
                    if w.stop || w.next >= ranges {
                        return;
                    }
                    w.next += 1;
                    (w.next - 1, w.spare.pop().unwrap_or_default())
                };
                let start = i * RANGE;
                let len = RANGE.min(size - start);
                buf.clear();
                buf.reserve(len as usize);
                IN_FLIGHT.take(1);
                let r = fetch_range(store, key, size, start, len, &mut buf);
                IN_FLIGHT.give(1);
                let mut w = lock();
                match r {
                    Ok(()) => {
                        w.done.insert(i, buf);
                    }
                    Err(e) => {
                        w.failed.get_or_insert(e);
                        w.stop = true;
                    }
                }
                changed.notify_all();
            });
        }
        let result = (|| {
            for i in 0..ranges {
                let buf = {
                    let mut w = lock();
                    loop {
                        if let Some(b) = w.done.remove(&i) {
                            break b;
                        }
                        if w.stop {
                            return Err(w.failed.take().unwrap_or(Failed::Missing));
                        }
                        w = changed.wait(w).expect("range window");
                    }
                };
                if out.write_all(&buf).is_err() {
                    // The reader is gone (its consumer failed): nobody
                    // wants the rest.
                    return Ok(());
                }
                let mut w = lock();
                w.written = i + 1;
                w.spare.push(buf);
                drop(w);
                changed.notify_all();
            }
            Ok(())
        })();
        lock().stop = true;
        changed.notify_all();
        result
    })
}

/// Why a range failed: the object is missing, or an error.
enum Failed {
    Missing,
    Error(AgentError),
}

/// Fetches `key` into `file` in ranges, `STREAMS` at a time; false when
/// the object does not exist.
fn ranged(store: &Store, key: &str, size: u64, file: &File) -> Result<bool, AgentError> {
    let ranges = size.div_ceil(RANGE);
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let failed: Mutex<Option<Failed>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..STREAMS.min(ranges as usize) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= ranges || stop.load(Ordering::SeqCst) {
                    return;
                }
                let start = i * RANGE;
                let len = RANGE.min(size - start);
                IN_FLIGHT.take(1);
                let mut at = WriteAt { file, pos: start };
                let r = fetch_range(store, key, size, start, len, &mut at);
                IN_FLIGHT.give(1);
                if let Err(e) = r {
                    stop.store(true, Ordering::SeqCst);
                    failed.lock().expect("range error").get_or_insert(e);
                    return;
                }
            });
        }
    });
    match failed.into_inner().expect("range error") {
        None => Ok(true),
        Some(Failed::Missing) => Ok(false),
        Some(Failed::Error(e)) => Err(e),
    }
}

/// Bytes `start..start + len` of `key` written to `out`; a cut answer is
/// followed by a request for the rest of the range.
fn fetch_range(
    store: &Store,
    key: &str,
    size: u64,
    start: u64,
    len: u64,
    out: &mut dyn Write,
) -> Result<(), Failed> {
    let mut out = Counting { out, n: 0 };
    let mut tries = 1;
    loop {
        let got = out.n;
        let r = store.get_range(key, start + got, len - got, &mut out);
        match r {
            Ok(Some(total)) if total == size => return Ok(()),
            Ok(Some(total)) => {
                return Err(Failed::Error(corrupt(
                    key,
                    format!("the object holds {total} bytes, its name says {size}"),
                )))
            }
            Ok(None) => return Err(Failed::Missing),
            Err(S3Error::Io { .. }) if tries < RANGE_TRIES => {
                tracing::debug!(
                    "{key}: range at {start} cut after {} of {len} bytes; asking for the rest",
                    out.n
                );
                std::thread::sleep(Duration::from_millis(50 << tries.min(6)));
                tries += 1;
            }
            Err(e) => return Err(Failed::Error(err(e))),
        }
    }
}

/// A writer at a moving offset of a file shared by several threads.
struct WriteAt<'a> {
    file: &'a File,
    pos: u64,
}

impl Write for WriteAt<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Counts what goes through: where a cut range resumes.
struct Counting<'a> {
    out: &'a mut dyn Write,
    n: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.out.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
