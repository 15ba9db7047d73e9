//! The transaction journal: an append-only file of checksummed, fsynced
//! records. A record is `len: u32 LE, xxh3(json): u64 LE, json`. A torn or
//! damaged record at the end was never acknowledged as durable, so reading
//! stops there; recovery then acts on the records before it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "rec", rename_all = "snake_case")]
pub enum Record {
    Begin {
        tx: String,
        base: String,
    },
    /// The commit point: after this record, the transaction is applied.
    Committed {
        tx: String,
        ops: Vec<Op>,
    },
    Done {
        tx: String,
    },
}

/// The transaction the records commit but do not finish (no `done`): the
/// one recovery rolls forward, and the one readers must not read past.
pub fn unfinished_commit(records: &[Record]) -> Option<(&str, &[Op])> {
    if records.iter().any(|r| matches!(r, Record::Done { .. })) {
        return None;
    }
    records.iter().find_map(|r| match r {
        Record::Committed { tx, ops } => Some((tx.as_str(), ops.as_slice())),
        _ => None,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Move the current file at `path` (if any) into the object store.
    Retire { path: String, hash: Option<u64> },
    /// Move the staged `path` into place.
    Install { path: String },
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
        let body = serde_json::to_vec(rec).map_err(io::Error::other)?;
        let mut buf = Vec::with_capacity(body.len() + 12);
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
        buf.extend_from_slice(&body);
        (&self.file).write_all(&buf)?;
        self.file.sync_data()
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

    #[test]
    fn torn_tail_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j");
        let j = Journal::create(&p).unwrap();
        j.append(&Record::Begin {
            tx: "t".into(),
            base: "s1".into(),
        })
        .unwrap();
        j.append(&Record::Done { tx: "t".into() }).unwrap();
        let full = std::fs::read(&p).unwrap();
        for cut in 0..full.len() {
            std::fs::write(&p, &full[..cut]).unwrap();
            let recs: Vec<Record> = Journal::read(&p).unwrap().unwrap();
            assert!(recs.len() <= 1 || cut == full.len());
        }
        let mut bad = full.clone();
        let n = bad.len();
        bad[n - 2] ^= 0xff;
        std::fs::write(&p, &bad).unwrap();
        let recs: Vec<Record> = Journal::read(&p).unwrap().unwrap();
        assert_eq!(
            recs,
            vec![Record::Begin {
                tx: "t".into(),
                base: "s1".into()
            }]
        );
    }
}
