//! Reading a file a piece at a time into a buffer whose fields are parsed
//! in place (the binary manifest copy, the stat cache): one `read` per
//! 64 KiB, not one per field.

use std::io::Read;

/// How much a refill asks for at least.
pub(crate) const PIECE: usize = 1 << 16;

/// Appends what one `read` of `r` gives (at least `n` bytes' room, at
/// least a piece) to `buf`; returns how many bytes came, 0 at the end.
/// On an error `buf` is as it was.
pub(crate) fn read_piece<R: Read>(
    r: &mut R,
    buf: &mut Vec<u8>,
    n: usize,
) -> std::io::Result<usize> {
    let have = buf.len();
    buf.resize(have + n.max(PIECE), 0);
    let got = loop {
        match r.read(&mut buf[have..]) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r,
        }
    };
    buf.truncate(have + got.as_ref().map_or(0, |g| *g));
    got
}
