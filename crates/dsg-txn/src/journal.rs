//! The transaction journal: an append-only file of checksummed, fsynced
//! records. A record is `len: u32 LE, xxh3(json): u64 LE, json`. A torn or
//! damaged record at the end was never acknowledged as durable, so reading
//! stops there; recovery then acts on the records before it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::apply::{Op, OpList, WireList};

/// One journal record. Both sides of a sync and the ZFS store write the
/// same four phases; what differs is what a `begin` needs to remember
/// (`B`: the base snapshot, whether it is a clone, the ZFS clone's name).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "rec", rename_all = "snake_case")]
pub enum Record<B> {
    Begin {
        tx: String,
        #[serde(flatten)]
        begin: B,
    },
    /// Everything is staged and checked. `new_hash`: the snapshot the
    /// repository will hold once it commits (`None`: no repository commit).
    Prepared {
        tx: String,
        #[serde(default)]
        new_hash: Option<String>,
        ops: Vec<Op>,
    },
    /// The commit point: after this record the transaction is applied.
    /// `ops` when they were not prepared first; `snap` for a ZFS commit.
    Committed {
        tx: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ops: Vec<Op>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snap: Option<String>,
    },
    Done {
        tx: String,
    },
}

/// A writer that counts and hashes what passes through it.
struct Digest<W: Write> {
    w: W,
    h: xxhash_rust::xxh3::Xxh3,
    n: u64,
}

impl<W: Write> Digest<W> {
    fn new(w: W) -> Self {
        Digest {
            w,
            h: xxhash_rust::xxh3::Xxh3::new(),
            n: 0,
        }
    }

    /// The body's length as the header records it, and its hash.
    fn finish(&self) -> io::Result<(u32, u64)> {
        let len =
            u32::try_from(self.n).map_err(|_| io::Error::other("journal record over 4 GiB"))?;
        Ok((len, self.h.digest()))
    }
}

impl<W: Write> Write for Digest<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.w.write(buf)?;
        self.h.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// `Record::Prepared` borrowing its fields; serializes to the same text.
#[derive(Serialize)]
#[serde(tag = "rec", rename = "prepared", bound = "")]
struct PreparedRef<'a, O: OpList + ?Sized> {
    tx: &'a str,
    new_hash: Option<&'a str>,
    ops: WireList<'a, O>,
}

/// A journal's valid records, read back for recovery.
#[derive(Debug, Clone, PartialEq)]
pub struct Log<B> {
    pub records: Vec<Record<B>>,
}

impl<B: for<'de> Deserialize<'de>> Log<B> {
    /// `None` when there is no journal.
    pub fn read(path: &Path) -> io::Result<Option<Log<B>>> {
        Ok(Journal::read(path)?.map(|records| Log { records }))
    }
}

impl<B> Log<B> {
    /// The transaction and what its `begin` recorded; `None` for a journal
    /// that does not start with one (nothing to act on).
    pub fn begin(&self) -> Option<(&str, &B)> {
        match self.records.first() {
            Some(Record::Begin { tx, begin }) => Some((tx, begin)),
            _ => None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.records
            .iter()
            .any(|r| matches!(r, Record::Done { .. }))
    }

    pub fn is_committed(&self) -> bool {
        self.records
            .iter()
            .any(|r| matches!(r, Record::Committed { .. }))
    }

    /// The prepared operations and the snapshot hash the repository will
    /// hold, if the transaction got that far.
    pub fn prepared(&self) -> Option<(Option<&str>, &[Op])> {
        self.records.iter().find_map(|r| match r {
            Record::Prepared { new_hash, ops, .. } => Some((new_hash.as_deref(), ops.as_slice())),
            _ => None,
        })
    }

    /// The transaction the records commit but do not finish (no `done`):
    /// the one recovery rolls forward, and the one readers must not read
    /// past. With the operations to apply (the committed or the prepared
    /// ones) and the ZFS snapshot, if any.
    pub fn unfinished_commit(&self) -> Option<(&str, &[Op], Option<&str>)> {
        if self.is_done() {
            return None;
        }
        let ops = self.prepared().map(|(_, ops)| ops).unwrap_or_default();
        self.records.iter().find_map(|r| match r {
            Record::Committed { tx, ops: c, snap } => Some((
                tx.as_str(),
                if c.is_empty() { ops } else { c.as_slice() },
                snap.as_deref(),
            )),
            _ => None,
        })
    }
}

pub struct Journal {
    file: File,
}

impl Journal {
    /// Creates an empty journal, replacing any old one, durably.
    pub fn create(path: &Path) -> io::Result<Journal> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        file.sync_all()?;
        if let Some(d) = path.parent() {
            dsg_core::atomic::sync_dir(d)?;
        }
        Ok(Journal { file })
    }

    pub fn open(path: &Path) -> io::Result<Journal> {
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Journal { file })
    }

    pub fn append<T: Serialize>(&self, rec: &T) -> io::Result<()> {
        // Measured and hashed first, then serialized again straight into
        // the file: a record listing a clone's operations is megabytes,
        // never held as text. The second pass is checked against the
        // first; a mismatch fails the append like a short write (the
        // record reads as torn).
        let mut first = Digest::new(io::sink());
        serde_json::to_writer(&mut first, rec).map_err(io::Error::other)?;
        let (len, sum) = first.finish()?;
        let mut out = Digest::new(io::BufWriter::with_capacity(1 << 16, &self.file));
        out.w.write_all(&len.to_le_bytes())?;
        out.w.write_all(&sum.to_le_bytes())?;
        serde_json::to_writer(&mut out, rec).map_err(io::Error::other)?;
        out.w.flush()?;
        if out.finish()? != (len, sum) {
            return Err(io::Error::other(
                "a journal record serialized differently twice",
            ));
        }
        self.file.sync_data()
    }

    /// Appends `Record::Prepared` without owning its operations (the
    /// caller still needs them to apply, and a copy would double them):
    /// each is written as it is read from `ops`, in the shape `Op` has.
    pub fn append_prepared<O: OpList + ?Sized>(
        &self,
        tx: &str,
        new_hash: Option<&str>,
        ops: &O,
    ) -> io::Result<()> {
        self.append(&PreparedRef {
            tx,
            new_hash,
            ops: WireList(ops),
        })
    }

    /// Reads the valid prefix of records; `None` when there is no journal.
    pub fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Option<Vec<T>>> {
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut f) => f.read_to_end(&mut bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        let mut o = 0;
        while bytes.len() >= o + 12 {
            let len = u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) as usize;
            let sum = u64::from_le_bytes(bytes[o + 4..o + 12].try_into().unwrap());
            let Some(body) = bytes.get(o + 12..o + 12 + len) else {
                break;
            };
            if xxhash_rust::xxh3::xxh3_64(body) != sum {
                break;
            }
            match serde_json::from_slice(body) {
                Ok(r) => out.push(r),
                Err(_) => break,
            }
            o += 12 + len;
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    struct Base {
        base: String,
    }

    #[test]
    fn torn_tail_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j");
        let j = Journal::create(&p).unwrap();
        j.append(&Record::Begin {
            tx: "t".into(),
            begin: Base { base: "s1".into() },
        })
        .unwrap();
        j.append(&Record::<Base>::Done { tx: "t".into() }).unwrap();
        let full = std::fs::read(&p).unwrap();
        for cut in 0..full.len() {
            std::fs::write(&p, &full[..cut]).unwrap();
            let recs: Vec<Record<Base>> = Journal::read(&p).unwrap().unwrap();
            assert!(recs.len() <= 1 || cut == full.len());
        }
        let mut bad = full.clone();
        let n = bad.len();
        bad[n - 2] ^= 0xff;
        std::fs::write(&p, &bad).unwrap();
        let recs: Vec<Record<Base>> = Journal::read(&p).unwrap().unwrap();
        assert_eq!(
            recs,
            vec![Record::Begin {
                tx: "t".into(),
                begin: Base { base: "s1".into() }
            }]
        );
    }

    /// Recovery reads what `append_prepared` wrote as `Record::Prepared`:
    /// the two must write the same bytes.
    #[test]
    fn borrowed_prepared_is_the_prepared_record() {
        let d = tempfile::tempdir().unwrap();
        let ops = vec![
            Op::retire("a/b", None, Some((1, 2, 3))),
            Op::Install { path: "a/b".into() },
        ];
        for new_hash in [None, Some("h")] {
            let (p1, p2) = (d.path().join("1"), d.path().join("2"));
            Journal::create(&p1)
                .unwrap()
                .append(&Record::<Base>::Prepared {
                    tx: "t".into(),
                    new_hash: new_hash.map(String::from),
                    ops: ops.clone(),
                })
                .unwrap();
            Journal::create(&p2)
                .unwrap()
                .append_prepared("t", new_hash, &ops[..])
                .unwrap();
            assert_eq!(std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
        }
    }

    /// Operations made by a view, not held, are journaled as the same
    /// record, and read back as the operations the view makes.
    #[test]
    fn a_view_of_operations_is_journaled_as_the_list() {
        use crate::apply::{Known, OpRef};
        struct Paths(Vec<&'static str>);
        impl OpList for Paths {
            fn len(&self) -> usize {
                2 * self.0.len()
            }
            fn get(&self, i: usize) -> OpRef<'_> {
                let n = self.0.len();
                match i.checked_sub(n) {
                    None => OpRef::Retire {
                        path: self.0[n - 1 - i],
                        known: Known {
                            hash: None,
                            expect: (i == 0).then_some((1, -2, 3)),
                        },
                    },
                    Some(k) => OpRef::Install { path: self.0[k] },
                }
            }
        }
        let view = Paths(vec!["a", "b/c", "b/d"]);
        let listed = vec![
            Op::retire("b/d", None, Some((1, -2, 3))),
            Op::retire("b/c", None, None),
            Op::retire("a", None, None),
            Op::Install { path: "a".into() },
            Op::Install { path: "b/c".into() },
            Op::Install { path: "b/d".into() },
        ];
        let d = tempfile::tempdir().unwrap();
        let (p1, p2) = (d.path().join("1"), d.path().join("2"));
        Journal::create(&p1)
            .unwrap()
            .append_prepared("t", None, &listed[..])
            .unwrap();
        Journal::create(&p2)
            .unwrap()
            .append_prepared("t", None, &view)
            .unwrap();
        assert_eq!(std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
        let back: Vec<Record<Base>> = Journal::read(&p2).unwrap().unwrap();
        assert_eq!(
            back,
            vec![Record::Prepared {
                tx: "t".into(),
                new_hash: None,
                ops: listed
            }]
        );
    }
}
