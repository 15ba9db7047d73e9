//! Content hashes: XXH3-64, seed 0, printed as 16 lowercase hex digits
//! (the original's format; see spec-data-model §1.4).

use std::fmt;
use std::io::Read;
use std::path::Path;

use xxhash_rust::xxh3::Xxh3;

/// A 64-bit XXH3 content hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub u64);

impl Hash {
    pub fn of_bytes(bytes: &[u8]) -> Hash {
        Hash(xxhash_rust::xxh3::xxh3_64(bytes))
    }

    /// Parses exactly 16 hex digits (either case; we always write lowercase).
    pub fn parse(s: &str) -> Option<Hash> {
        if s.len() != 16 {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(Hash)
    }

    pub fn to_hex(self) -> String {
        format!("{:016x}", self.0)
    }

    /// The 16 lowercase hex digits `Display` writes, without format
    /// machinery (a manifest writes one per entry).
    pub fn hex(self) -> [u8; 16] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut b = [0u8; 16];
        for (i, d) in b.iter_mut().enumerate() {
            *d = DIGITS[((self.0 >> (60 - 4 * i)) & 0xf) as usize];
        }
        b
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({:016x})", self.0)
    }
}

/// Streams a reader through XXH3. The buffer is per thread and reused: a
/// fresh large buffer per file would cost an mmap/munmap pair each time.
pub fn hash_reader<R: Read>(mut r: R) -> std::io::Result<(Hash, u64)> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 256 * 1024]);
    }
    BUF.with(|b| {
        let mut buf = b.borrow_mut();
        let mut h = Xxh3::new();
        let mut total = 0u64;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            h.update(&buf[..n]);
            total += n as u64;
        }
        Ok((Hash(h.digest()), total))
    })
}

/// Hashes a regular file without following a symlink at `path`.
pub fn hash_file(path: &Path) -> std::io::Result<(Hash, u64)> {
    let f = open_nofollow(path)?;
    // Small files are common in research data; one read avoids a second syscall.
    hash_reader(f)
}

#[cfg(unix)]
pub fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_nofollow())
        .open(path)
}

#[cfg(unix)]
const fn libc_o_nofollow() -> i32 {
    libc::O_NOFOLLOW
}

/// A reader that hashes everything read through it, so a file can be parsed
/// and hashed in one pass without holding it.
pub struct HashingReader<R> {
    inner: R,
    h: Xxh3,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            h: Xxh3::new(),
        }
    }

    pub fn digest(&self) -> Hash {
        Hash(self.h.digest())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.h.update(&buf[..n]);
        Ok(n)
    }
}

/// Writes a file in 64 KiB pieces followed by the XXH3 of everything before
/// it (the trailer our binary caches end with), so a cache of a million
/// entries is streamed to its file instead of built whole in memory. The
/// caller appends to `buf()` and calls `spill` now and then; bytes still
/// in the buffer may be patched (a count known only at the end).
pub struct ChecksummedWriter<W: std::io::Write> {
    out: W,
    h: Xxh3,
    buf: Vec<u8>,
}

impl<W: std::io::Write> ChecksummedWriter<W> {
    const PIECE: usize = 1 << 16;

    pub fn new(out: W) -> Self {
        ChecksummedWriter {
            out,
            h: Xxh3::new(),
            buf: Vec::with_capacity(Self::PIECE + 4096),
        }
    }

    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Writes the buffer out once it holds a piece.
    pub fn spill(&mut self) -> std::io::Result<()> {
        if self.buf.len() >= Self::PIECE {
            self.flush_buf()?;
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> std::io::Result<()> {
        self.h.update(&self.buf);
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Writes the rest and the checksum; returns the writer, flushed.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.flush_buf()?;
        self.out.write_all(&self.h.digest().to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors() {
        assert_eq!(Hash::of_bytes(b"").to_hex(), "2d06800538d394c2");
        assert_eq!(Hash::of_bytes(b"hello").to_hex(), "9555e8555c62dcfd");
        let (h, n) = hash_reader(&b"hello"[..]).unwrap();
        assert_eq!((h.to_hex().as_str(), n), ("9555e8555c62dcfd", 5));
        assert_eq!(
            Hash::parse("9555e8555c62dcfd"),
            Some(Hash::of_bytes(b"hello"))
        );
        assert_eq!(Hash::parse("xyz"), None);
    }

    #[test]
    fn checksummed_writer_ends_with_the_hash_of_what_it_wrote() {
        let mut w = ChecksummedWriter::new(Vec::new());
        for i in 0..200_000u32 {
            w.buf().extend_from_slice(&i.to_le_bytes());
            w.spill().unwrap();
        }
        let out = w.finish().unwrap();
        let (body, sum) = out.split_at(out.len() - 8);
        assert_eq!(body.len(), 800_000);
        assert_eq!(sum, Hash::of_bytes(body).0.to_le_bytes());
    }
}
