//! The stat cache file, `.dsg/stat-cache`: what the last scan saw, so the
//! next one can trust what has not changed.
//!
//! Layout (little-endian), version 2:
//!
//! ```text
//! "DSGSTAT2" made_ns:u64 files:u64 dirs:u64
//! known:u64 size:u64 mtime_ns:u64 ctime_ns:u64 ino:u64 xxh3:u64
//! files × (len:u32 path size:u64 mtime_ns:u64 ctime_ns:u64 ino:u64 hash:u64)
//! dirs  × (len:u32 path size:u64 mtime_ns:u64 ctime_ns:u64 ino:u64
//!          listing_len:u32 listing)
//! xxh3 of everything before:u64
//! ```
//!
//! Both record lists are sorted by path (byte order). A directory's listing
//! is its entries, sorted by name: `kind:u8 len:u16 name` each. A
//! directory whose stat matches its record (and is not racy) is not listed
//! again: its listing comes from here (git's untracked cache does the same).
//! When `known` is 1, the header vouches for the cache manifest
//! (`.dsg/last-sync.json`): while its stat is the one recorded, its XXH3 is
//! the one recorded, and it need not be read (24 MB at 100 000 files).
//! Version 1 (`DSGSTAT1`, no `dirs` count and no directory records) is
//! still read; its directories are then listed and the file rewritten.

use std::io::Read;
use std::path::Path;

use xxhash_rust::xxh3::Xxh3;

use super::Stat;
use crate::hash::{ChecksummedWriter, Hash};

const MAGIC_V1: &[u8; 8] = b"DSGSTAT1";
const MAGIC_V2: &[u8; 8] = b"DSGSTAT2";
const HEADER_V1: usize = 24;
const HEADER_V2: usize = 80;
const FILE_FIXED: usize = 40;
const DIR_FIXED: usize = 32;

/// The kind of a directory entry in a cached listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildKind {
    File = 0,
    Dir = 1,
    Link = 2,
    /// Socket, FIFO, device.
    Other = 3,
}

impl ChildKind {
    fn from_u8(b: u8) -> Option<ChildKind> {
        Some(match b {
            0 => ChildKind::File,
            1 => ChildKind::Dir,
            2 => ChildKind::Link,
            3 => ChildKind::Other,
            _ => return None,
        })
    }
}

/// A file the stat cache vouches for: its stat when it was hashed (its
/// mtime and ctime then already older than the racy window, so any later
/// change moves them) and its XXH3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownFile {
    pub stat: Stat,
    pub hash: u64,
}

/// One directory as a scan saw it: its stat (taken before it was listed)
/// and its listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirListing {
    /// Relative to the project root; `""` is the root.
    pub path: String,
    pub stat: Stat,
    /// `kind:u8 len:u16 name` per entry; see [`listing_entries`].
    pub listing: Vec<u8>,
}

/// Appends one entry to a listing. Names longer than `u16::MAX` bytes do
/// not exist on any filesystem dsg runs on; such a listing is refused.
pub fn push_listing_entry(listing: &mut Vec<u8>, kind: ChildKind, name: &[u8]) -> bool {
    let Ok(len) = u16::try_from(name.len()) else {
        return false;
    };
    listing.push(kind as u8);
    listing.extend_from_slice(&len.to_le_bytes());
    listing.extend_from_slice(name);
    true
}

/// The entries of a listing; `None` ends a malformed one early (decode
/// refuses a cache holding one, so that is only a guard).
pub fn listing_entries(listing: &[u8]) -> impl Iterator<Item = (ChildKind, &[u8])> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let kind = ChildKind::from_u8(*listing.get(pos)?)?;
        let len = u16::from_le_bytes(listing.get(pos + 1..pos + 3)?.try_into().ok()?) as usize;
        let name = listing.get(pos + 3..pos + 3 + len)?;
        pos += 3 + len;
        Some((kind, name))
    })
}

fn listing_is_well_formed(listing: &[u8]) -> bool {
    let mut seen = 0usize;
    for (_, name) in listing_entries(listing) {
        seen += 3 + name.len();
    }
    seen == listing.len()
}

/// The stat cache, sorted by path. The directory records are kept as the
/// verified file bytes (the walk looks them up); the file records are read
/// again from the file, in path order alongside the sorted scan, when the
/// walk is done (they are most of the file: held through the walk, they
/// were ~70 bytes a file next to the whole scan).
#[derive(Debug, Default)]
pub struct StatCache {
    pub made_ns: i64,
    count: usize,
    /// Directory records.
    body: Vec<u8>,
    /// Where each directory record starts in `body`, in path order.
    dirs: Vec<usize>,
    known_manifest: Option<KnownFile>,
    files: FileRecords,
}

/// Where the file records are, and the XXH3 of their bytes as verified
/// when the cache was loaded.
#[derive(Debug, Default)]
enum FileRecords {
    #[default]
    None,
    /// For tests: a cache decoded from bytes.
    #[cfg(test)]
    Memory(Vec<u8>),
    Disk {
        file: std::fs::File,
        offset: u64,
        len: u64,
        hash: u64,
    },
}

/// One file record of the stat cache.
pub struct StatRec<'a> {
    pub path: &'a str,
    pub stat: Stat,
    pub hash: Hash,
}

/// One directory record of the stat cache.
pub struct DirRec<'a> {
    pub path: &'a str,
    pub stat: Stat,
    pub listing: &'a [u8],
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

/// `len:u32 path` then the four stat fields; the path, the stat and the
/// offset after them.
fn path_and_stat(b: &[u8], pos: usize) -> Option<(&str, Stat, usize)> {
    let len = u32_at(b, pos)?;
    let o = pos + 4;
    let path = std::str::from_utf8(b.get(o..o + len)?).ok()?;
    let o = o + len;
    let stat = Stat {
        size: u64_at(b, o)?,
        mtime_ns: u64_at(b, o + 8)? as i64,
        ctime_ns: u64_at(b, o + 16)? as i64,
        ino: u64_at(b, o + 24)?,
    };
    Some((path, stat, o + 32))
}

/// Reads file records in order from `r`, a piece at a time; the bytes
/// consumed are hashed (and into `whole` too, when given).
struct RecordReader<R: Read> {
    r: R,
    buf: Vec<u8>,
    pos: usize,
    consumed: u64,
    section: Xxh3,
    whole: Option<Xxh3>,
}

impl<R: Read> RecordReader<R> {
    fn new(r: R, whole: Option<Xxh3>) -> Self {
        RecordReader {
            r,
            buf: Vec::with_capacity(crate::piece::PIECE),
            pos: 0,
            consumed: 0,
            section: Xxh3::new(),
            whole,
        }
    }

    /// Hashes what was consumed and drops it from the buffer.
    fn settle(&mut self) {
        let done = &self.buf[..self.pos];
        self.section.update(done);
        if let Some(w) = &mut self.whole {
            w.update(done);
        }
        self.consumed += self.pos as u64;
        self.buf.drain(..self.pos);
        self.pos = 0;
    }

    /// At least `n` unconsumed bytes in the buffer; false at the end.
    fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        while self.buf.len() - self.pos < n {
            self.settle();
            if crate::piece::read_piece(&mut self.r, &mut self.buf, n)? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The next record; `None` at the end or on a malformed one.
    fn next(&mut self) -> std::io::Result<Option<StatRec<'_>>> {
        if !self.fill(4)? {
            return Ok(None);
        }
        let Some(len) = u32_at(&self.buf, self.pos) else {
            return Ok(None);
        };
        if !self.fill(4 + len + FILE_FIXED)? {
            return Ok(None);
        }
        let Some((path, stat, o)) = path_and_stat(&self.buf, self.pos) else {
            return Ok(None);
        };
        let Some(hash) = u64_at(&self.buf, o) else {
            return Ok(None);
        };
        self.pos = o + 8;
        Ok(Some(StatRec {
            path,
            stat,
            hash: Hash(hash),
        }))
    }

    /// Every byte consumed is hashed; returns the rest of the buffer.
    fn finish(mut self) -> (u64, u64, Option<Xxh3>, Vec<u8>, R) {
        self.settle();
        (
            self.consumed,
            self.section.digest(),
            self.whole,
            self.buf,
            self.r,
        )
    }
}

/// `Read` over a range of a file by positional reads (the file's offset is
/// shared by no one).
struct RangeReader<'a> {
    file: &'a std::fs::File,
    at: u64,
    end: u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let want = buf.len().min((self.end - self.at) as usize);
        let n = self.file.read_at(&mut buf[..want], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// What [`read_verified`] found: the header, where the file records are
/// and their hash, and the directory records.
struct Parts {
    made_ns: i64,
    count: usize,
    known_manifest: Option<KnownFile>,
    files_offset: u64,
    files_len: u64,
    files_hash: u64,
    body: Vec<u8>,
    dirs: Vec<usize>,
}

/// Reads a whole stat cache from `r`, checking everything (checksum,
/// record order, listings) but keeping only the directory records.
/// The header's record of the cache manifest (`None` inside: none
/// recorded); `None` when the header is malformed.
fn known_of(head: &[u8]) -> Option<Option<KnownFile>> {
    let v2 = head.get(..8)? == MAGIC_V2;
    Some(match (v2, if v2 { u64_at(head, 32)? } else { 0 }) {
        (false, _) | (true, 0) => None,
        (true, 1) => Some(KnownFile {
            stat: Stat {
                size: u64_at(head, 40)?,
                mtime_ns: u64_at(head, 48)? as i64,
                ctime_ns: u64_at(head, 56)? as i64,
                ino: u64_at(head, 64)?,
            },
            hash: u64_at(head, 72)?,
        }),
        _ => return None,
    })
}

fn read_verified(mut r: impl Read) -> Option<Parts> {
    let mut head = [0u8; HEADER_V2];
    r.read_exact(&mut head[..8]).ok()?;
    let v2 = match &head[..8] {
        m if m == MAGIC_V1 => false,
        m if m == MAGIC_V2 => true,
        _ => return None,
    };
    let header = if v2 { HEADER_V2 } else { HEADER_V1 };
    r.read_exact(&mut head[8..header]).ok()?;
    let head = &head[..header];
    let made_ns = u64_at(head, 8)? as i64;
    let count = usize::try_from(u64_at(head, 16)?).ok()?;
    let dir_count = if v2 {
        usize::try_from(u64_at(head, 24)?).ok()?
    } else {
        0
    };
    let known_manifest = known_of(head)?;
    let mut whole = Xxh3::new();
    whole.update(head);
    let mut rr = RecordReader::new(r, Some(whole));
    let mut prev: Vec<u8> = Vec::new();
    for i in 0..count {
        let rec = rr.next().ok()??;
        if i > 0 && prev.as_slice() >= rec.path.as_bytes() {
            return None;
        }
        prev.clear();
        prev.extend_from_slice(rec.path.as_bytes());
    }
    let (files_len, files_hash, whole, mut body, mut r) = rr.finish();
    let mut whole = whole?;
    r.read_to_end(&mut body).ok()?;
    let sum_at = body.len().checked_sub(8)?;
    whole.update(&body[..sum_at]);
    if whole.digest().to_le_bytes() != body[sum_at..] {
        return None;
    }
    body.truncate(sum_at);
    body.shrink_to_fit();
    let dirs = dir_record_starts(&body, 0, dir_count)?;
    Some(Parts {
        made_ns,
        count,
        known_manifest,
        files_offset: header as u64,
        files_len,
        files_hash,
        body,
        dirs,
    })
}

fn dir_rec_at(b: &[u8], pos: usize) -> Option<(DirRec<'_>, usize)> {
    let (path, stat, o) = path_and_stat(b, pos)?;
    let len = u32_at(b, o)?;
    let listing = b.get(o + 4..o + 4 + len)?;
    Some((
        DirRec {
            path,
            stat,
            listing,
        },
        o + 4 + len,
    ))
}

impl StatCache {
    /// Loads the cache; a missing or damaged cache is just an empty one (it
    /// only ever lets us skip work, so dropping it is always safe). The
    /// file stays open: its file records are read again by
    /// [`Self::each_record`].
    pub fn load(path: &Path) -> StatCache {
        let Ok(file) = std::fs::File::open(path) else {
            return StatCache::default();
        };
        let r = std::io::BufReader::with_capacity(1 << 16, &file);
        match read_verified(r) {
            Some(p) => {
                let files = FileRecords::Disk {
                    file,
                    offset: p.files_offset,
                    len: p.files_len,
                    hash: p.files_hash,
                };
                StatCache::of_parts(p, files)
            }
            None => {
                tracing::warn!("stat cache {} is damaged; rehashing", path.display());
                StatCache::default()
            }
        }
    }

    /// The cache manifest's record in the header of the stat cache at
    /// `path`, read alone and NOT verified: a guess, to be checked against
    /// [`Self::known_manifest`] once the cache is loaded (a status asks
    /// the repository with it while the cache loads).
    pub fn peek_known_manifest(path: &Path) -> Option<KnownFile> {
        let mut head = [0u8; HEADER_V2];
        std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
        known_of(&head)?
    }

    fn of_parts(p: Parts, files: FileRecords) -> StatCache {
        StatCache {
            made_ns: p.made_ns,
            count: p.count,
            body: p.body,
            dirs: p.dirs,
            known_manifest: p.known_manifest,
            files,
        }
    }

    /// File records.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The cache manifest's stat and hash, when recorded.
    pub fn known_manifest(&self) -> Option<KnownFile> {
        self.known_manifest
    }

    /// Directory records.
    pub fn dir_count(&self) -> usize {
        self.dirs.len()
    }

    /// Gives every file record to `f`, in path order. False when the
    /// records could not be read again as they were verified (the file
    /// was damaged since): what `f` made of them is then to be thrown away.
    pub fn each_record(&self, mut f: impl FnMut(StatRec<'_>)) -> bool {
        let (r, len, hash): (Box<dyn Read + '_>, u64, u64) = match &self.files {
            FileRecords::None => return self.count == 0,
            #[cfg(test)]
            FileRecords::Memory(b) => {
                let hash = Hash::of_bytes(b).0;
                (Box::new(&b[..]), b.len() as u64, hash)
            }
            FileRecords::Disk {
                file,
                offset,
                len,
                hash,
            } => (
                Box::new(std::io::BufReader::with_capacity(
                    1 << 16,
                    RangeReader {
                        file,
                        at: *offset,
                        end: offset + len,
                    },
                )),
                *len,
                *hash,
            ),
        };
        let mut rr = RecordReader::new(r, None);
        for _ in 0..self.count {
            match rr.next() {
                Ok(Some(rec)) => f(rec),
                _ => return false,
            }
        }
        let (consumed, got, _, rest, _) = rr.finish();
        consumed == len && got == hash && rest.is_empty()
    }

    /// The record of the directory at `path` (`""` for the root).
    pub fn dir(&self, path: &str) -> Option<DirRec<'_>> {
        let rec = |&at: &usize| dir_rec_at(&self.body, at).map(|(r, _)| r);
        let i = self
            .dirs
            .binary_search_by(|at| {
                rec(at)
                    .map(|r| r.path.as_bytes())
                    .unwrap_or_default()
                    .cmp(path.as_bytes())
            })
            .ok()?;
        rec(&self.dirs[i])
    }

    /// A cache from its bytes, checked as [`Self::load`] checks a file.
    #[cfg(test)]
    pub(crate) fn decode(b: Vec<u8>) -> Option<StatCache> {
        let p = read_verified(&b[..])?;
        let at = p.files_offset as usize;
        let files = FileRecords::Memory(b[at..at + p.files_len as usize].to_vec());
        Some(StatCache::of_parts(p, files))
    }

    pub fn encode_entries(made_ns: i64, entries: &[super::LocalEntry]) -> Vec<u8> {
        StatCache::encode(made_ns, StatCache::records_of(entries), &[])
    }

    /// The records of a scan's files (links have none).
    pub fn records_of(
        entries: &[super::LocalEntry],
    ) -> impl Iterator<Item = (&str, Stat, Hash)> + Clone {
        entries.iter().filter_map(|e| match e.kind {
            super::LocalKind::File { hash, .. } => Some((&*e.path, e.stat, hash)),
            super::LocalKind::Link { .. } => None,
        })
    }

    /// Encodes `(path, stat, hash)` records, which must come sorted by path,
    /// and the directory listings (sorted by path too).
    pub fn encode<'a>(
        made_ns: i64,
        recs: impl Iterator<Item = (&'a str, Stat, Hash)>,
        dirs: &[DirListing],
    ) -> Vec<u8> {
        // Never spilled: the count, known only at the end, is patched in
        // the buffer before the checksum is taken.
        let mut w = ChecksummedWriter::new(Vec::new());
        put_header(w.buf(), made_ns, 0, dirs.len() as u64, None);
        let mut n = 0u64;
        for r in recs {
            put_record(w.buf(), r);
            n += 1;
        }
        for d in dirs {
            put_dir(w.buf(), d);
        }
        w.buf()[16..24].copy_from_slice(&n.to_le_bytes());
        let mut out = w.finish().expect("a Vec takes every write");
        out.shrink_to_fit();
        out
    }

    /// Streams exactly `count` file records (sorted by path) to `out`,
    /// without directory records (the next scan lists every directory).
    pub fn write_to<'a>(
        out: impl std::io::Write,
        made_ns: i64,
        count: u64,
        recs: impl Iterator<Item = (&'a str, Stat, Hash)>,
    ) -> std::io::Result<()> {
        StatCache::write_with_dirs(out, made_ns, count, recs, &[], None)
    }

    /// Streams exactly `count` file records (sorted by path), the
    /// directory listings (sorted by path) and what is known of the cache
    /// manifest to `out`, holding one piece of the file at a time: what
    /// `encode` would have built.
    pub fn write_with_dirs<'a>(
        out: impl std::io::Write,
        made_ns: i64,
        count: u64,
        recs: impl Iterator<Item = (&'a str, Stat, Hash)>,
        dirs: &[DirListing],
        known_manifest: Option<KnownFile>,
    ) -> std::io::Result<()> {
        let mut w = ChecksummedWriter::new(out);
        put_header(w.buf(), made_ns, count, dirs.len() as u64, known_manifest);
        let mut n = 0u64;
        for r in recs {
            put_record(w.buf(), r);
            n += 1;
            w.spill()?;
        }
        if n != count {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("stat cache: {n} records written, {count} announced"),
            ));
        }
        for d in dirs {
            put_dir(w.buf(), d);
            w.spill()?;
        }
        w.finish().map(drop)
    }
}

/// Checks the `dir_count` directory records from `start` to the end of
/// `body` (each parses, well-formed listing, paths strictly increasing);
/// returns where each starts.
fn dir_record_starts(body: &[u8], start: usize, dir_count: usize) -> Option<Vec<usize>> {
    let mut starts = Vec::with_capacity(dir_count.min(body.len() / DIR_FIXED + 1));
    let mut pos = start;
    let mut prev: Option<&str> = None;
    for _ in 0..dir_count {
        let (r, next) = dir_rec_at(body, pos)?;
        if prev.is_some_and(|p| p.as_bytes() >= r.path.as_bytes())
            || !listing_is_well_formed(r.listing)
        {
            return None;
        }
        prev = Some(r.path);
        starts.push(pos);
        pos = next;
    }
    (pos == body.len()).then_some(starts)
}

fn put_header(out: &mut Vec<u8>, made_ns: i64, count: u64, dirs: u64, known: Option<KnownFile>) {
    out.extend_from_slice(MAGIC_V2);
    let k = known.unwrap_or(KnownFile {
        stat: Stat::default(),
        hash: 0,
    });
    for v in [
        made_ns as u64,
        count,
        dirs,
        known.is_some() as u64,
        k.stat.size,
        k.stat.mtime_ns as u64,
        k.stat.ctime_ns as u64,
        k.stat.ino,
        k.hash,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn put_path_and_stat(out: &mut Vec<u8>, path: &str, stat: Stat) {
    out.extend_from_slice(&(path.len() as u32).to_le_bytes());
    out.extend_from_slice(path.as_bytes());
    for v in [
        stat.size,
        stat.mtime_ns as u64,
        stat.ctime_ns as u64,
        stat.ino,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn put_record(out: &mut Vec<u8>, (path, stat, hash): (&str, Stat, Hash)) {
    out.reserve(4 + path.len() + FILE_FIXED);
    put_path_and_stat(out, path, stat);
    out.extend_from_slice(&hash.0.to_le_bytes());
}

fn put_dir(out: &mut Vec<u8>, d: &DirListing) {
    put_path_and_stat(out, &d.path, d.stat);
    out.extend_from_slice(&(d.listing.len() as u32).to_le_bytes());
    out.extend_from_slice(&d.listing);
}
