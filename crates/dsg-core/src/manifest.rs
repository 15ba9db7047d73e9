//! Manifests (`.dsg/last-sync.json`), byte-compatible with the original dsg.
//!
//! Format: spec-data-model §1. We read manifests in the original's stored key
//! order so its `entries_hash` can be verified, then keep entries sorted by
//! path (byte order) in memory and on disk: a sorted manifest hashes the same
//! on every machine (defect 1 of the original).
//!
//! Loading is strict: a manifest that does not parse, has an entry that does
//! not validate, or names a path outside the project is an error that names
//! the file. Treating a damaged manifest as empty is how tools delete data.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use xxhash_rust::xxh3::Xxh3;

use crate::hash::Hash;
use crate::paths::{check_link_target, check_relpath};
use crate::timefmt;

/// The version we write as `manifest_version` for manifests we create. We keep
/// the original's value space (a package version string).
pub const MANIFEST_VERSION: &str = "0.5.0";

/// Display is the message, then `hint: …` on its own line; `message()` and
/// `hint()` give the two apart for `--json`.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    Corrupt {
        path: PathBuf,
        msg: String,
    },
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\nhint: {}", self.message(), self.hint())
    }
}

impl ManifestError {
    /// The message without its hint.
    pub fn message(&self) -> String {
        match self {
            ManifestError::Io { path, source } => {
                format!("cannot read manifest {}: {source}", path.display())
            }
            ManifestError::Corrupt { path, msg } => {
                format!("manifest {} is corrupt: {msg}", path.display())
            }
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            ManifestError::Io { .. } => "check the file exists and is readable",
            ManifestError::Corrupt { .. } => {
                "restore it from the repository or a backup; dsg never treats a damaged manifest as empty"
            }
        }
    }

    fn corrupt(path: &Path, msg: impl Into<String>) -> Self {
        ManifestError::Corrupt {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// A file's mtime as the manifest stores it. The original writes
/// `YYYY-MM-DDTHH:MM:SS±HH:MM`; we keep that compactly and reproduce it
/// exactly. Anything else is kept verbatim so hashes still verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mtime {
    Fixed {
        utc_secs: i64,
        offset_min: i16,
    },
    /// Boxed twice to keep `Mtime` at 16 bytes: it is in every entry.
    Raw(Box<String>),
}

impl Mtime {
    /// The mtime string of a file with this unix time, as the original
    /// computed it: LA time, whole seconds (rounded to µs first).
    pub fn from_unix(secs: i64, nanos: u32) -> Mtime {
        let micros = (nanos as u64 + 500) / 1000;
        let secs = if micros >= 1_000_000 { secs + 1 } else { secs };
        Mtime::Fixed {
            utc_secs: secs,
            offset_min: crate::timefmt::la_offset_minutes(secs),
        }
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS±HH:MM` by hand (this runs for every entry
    /// of every manifest); anything else is kept verbatim.
    pub fn parse(s: &str) -> Mtime {
        Mtime::parse_fixed(s).unwrap_or_else(|| Mtime::Raw(Box::new(s.to_string())))
    }

    fn parse_fixed(s: &str) -> Option<Mtime> {
        let b = s.as_bytes();
        if b.len() != 25
            || b[4] != b'-'
            || b[7] != b'-'
            || b[10] != b'T'
            || b[13] != b':'
            || b[16] != b':'
            || b[22] != b':'
            || !(b[19] == b'+' || b[19] == b'-')
        {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<i64> {
            let mut v = 0i64;
            for &c in &b[r] {
                if !c.is_ascii_digit() {
                    return None;
                }
                v = v * 10 + (c - b'0') as i64;
            }
            Some(v)
        };
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
        let (oh, om) = (num(20..22)?, num(23..25)?);
        if !(1..=12).contains(&mo)
            || d < 1
            || d > days_in_month(y, mo)
            || h > 23
            || mi > 59
            || se > 59
            || oh > 23
            || om > 59
        {
            return None;
        }
        let off = (oh * 60 + om) * if b[19] == b'-' { -1 } else { 1 };
        let local = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se;
        Some(Mtime::Fixed {
            utc_secs: local - off * 60,
            offset_min: off as i16,
        })
    }

    pub fn unix_secs(&self) -> Option<i64> {
        match self {
            Mtime::Fixed { utc_secs, .. } => Some(*utc_secs),
            Mtime::Raw(s) => timefmt::parse(s).map(|d| d.timestamp()),
        }
    }

    /// Equal as the original compared them: as strings.
    pub fn same_text(&self, other: &Mtime) -> bool {
        match (self, other) {
            (Mtime::Fixed { .. }, Mtime::Fixed { .. }) => self == other,
            _ => self.to_string() == other.to_string(),
        }
    }
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl std::fmt::Display for Mtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mtime::Fixed {
                utc_secs,
                offset_min,
            } => {
                let local = utc_secs + *offset_min as i64 * 60;
                let (y, mo, d) = civil_from_days(local.div_euclid(86400));
                let t = local.rem_euclid(86400);
                let sign = if *offset_min < 0 { '-' } else { '+' };
                let o = offset_min.unsigned_abs() as i64;
                if (0..=9999).contains(&y) && o < 100 * 60 {
                    // Every entry's mtime is written (and hashed) on each
                    // sync: digits by hand, not through format machinery.
                    let mut b = *b"0000-00-00T00:00:00+00:00";
                    let mut put = |at: usize, v: i64, width: usize| {
                        let mut v = v;
                        for i in (0..width).rev() {
                            b[at + i] = b'0' + (v % 10) as u8;
                            v /= 10;
                        }
                    };
                    put(0, y, 4);
                    put(5, mo, 2);
                    put(8, d, 2);
                    put(11, t / 3600, 2);
                    put(14, t % 3600 / 60, 2);
                    put(17, t % 60, 2);
                    put(20, o / 60, 2);
                    put(23, o % 60, 2);
                    b[19] = sign as u8;
                    return f.write_str(std::str::from_utf8(&b).expect("ascii"));
                }
                write!(
                    f,
                    "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}{sign}{:02}:{:02}",
                    t / 3600,
                    t % 3600 / 60,
                    t % 60,
                    o / 60,
                    o % 60
                )
            }
            Mtime::Raw(s) => f.write_str(s),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File {
        size: u64,
        mtime: Mtime,
        /// `None` = the original's `"hash": ""` (never computed).
        hash: Option<Hash>,
    },
    Link {
        target: Box<str>,
    },
}

/// One manifest entry. `user` is shared: a project has few users and many files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: Box<str>,
    pub user: Arc<str>,
    pub kind: EntryKind,
}

impl Entry {
    pub fn is_link(&self) -> bool {
        matches!(self.kind, EntryKind::Link { .. })
    }

    pub fn hash(&self) -> Option<Hash> {
        match &self.kind {
            EntryKind::File { hash, .. } => *hash,
            EntryKind::Link { .. } => None,
        }
    }

    /// Same content? Files by hash when both have one, else by size and the
    /// mtime string (the original's fallback, §1.12); links by target text; a
    /// file never equals a link. `user` never takes part.
    pub fn same_content(&self, other: &Entry) -> bool {
        match (&self.kind, &other.kind) {
            (
                EntryKind::File {
                    size: s1,
                    mtime: m1,
                    hash: h1,
                },
                EntryKind::File {
                    size: s2,
                    mtime: m2,
                    hash: h2,
                },
            ) => match (h1, h2) {
                (Some(a), Some(b)) => a == b,
                _ => s1 == s2 && m1.same_text(m2),
            },
            (EntryKind::Link { target: a }, EntryKind::Link { target: b }) => a == b,
            _ => false,
        }
    }

    /// The compact JSON the original hashes: fields in its order, no spaces.
    pub fn write_compact(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"type\":");
        match &self.kind {
            EntryKind::File { size, mtime, hash } => {
                out.extend_from_slice(b"\"file\",\"path\":");
                json_str(out, &self.path);
                out.extend_from_slice(b",\"user\":");
                json_str(out, &self.user);
                let _ = write!(out, ",\"filesize\":{size},\"mtime\":");
                json_str(out, &mtime.to_string());
                out.extend_from_slice(b",\"hash\":\"");
                if let Some(h) = hash {
                    let _ = write!(out, "{h}");
                }
                out.extend_from_slice(b"\"}");
            }
            EntryKind::Link { target } => {
                out.extend_from_slice(b"\"link\",\"path\":");
                json_str(out, &self.path);
                out.extend_from_slice(b",\"user\":");
                json_str(out, &self.user);
                out.extend_from_slice(b",\"reference\":");
                json_str(out, target);
                out.push(b'}');
            }
        }
    }

    fn write_pretty(&self, out: &mut Vec<u8>) {
        // Indentation of entries inside "entries" is 6 spaces for fields.
        out.extend_from_slice(b"{\n      \"type\": ");
        match &self.kind {
            EntryKind::File { size, mtime, hash } => {
                out.extend_from_slice(b"\"file\",\n      \"path\": ");
                json_str(out, &self.path);
                out.extend_from_slice(b",\n      \"user\": ");
                json_str(out, &self.user);
                let _ = write!(out, ",\n      \"filesize\": {size},\n      \"mtime\": ");
                json_str(out, &mtime.to_string());
                out.extend_from_slice(b",\n      \"hash\": \"");
                if let Some(h) = hash {
                    let _ = write!(out, "{h}");
                }
                out.extend_from_slice(b"\"\n    }");
            }
            EntryKind::Link { target } => {
                out.extend_from_slice(b"\"link\",\n      \"path\": ");
                json_str(out, &self.path);
                out.extend_from_slice(b",\n      \"user\": ");
                json_str(out, &self.user);
                out.extend_from_slice(b",\n      \"reference\": ");
                json_str(out, target);
                out.extend_from_slice(b"\n    }");
            }
        }
    }
}

/// JSON string escaping as orjson and serde_json do it (non-ASCII raw).
fn json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// Snapshot metadata (§1.6). Every field is written, absent ones as `null`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Metadata {
    pub manifest_version: String,
    pub snapshot_id: String,
    pub created_at: String,
    pub entry_count: u64,
    pub entries_hash: String,
    pub created_by: Option<String>,
    pub snapshot_message: Option<String>,
    pub snapshot_previous: Option<String>,
    pub snapshot_hash: Option<String>,
    pub snapshot_notes: Option<String>,
    pub project_config: Option<Value>,
}

impl Metadata {
    pub fn to_value(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert(
            "manifest_version".into(),
            self.manifest_version.clone().into(),
        );
        m.insert("snapshot_id".into(), self.snapshot_id.clone().into());
        m.insert("created_at".into(), self.created_at.clone().into());
        m.insert("entry_count".into(), self.entry_count.into());
        m.insert("entries_hash".into(), self.entries_hash.clone().into());
        let opt = |v: &Option<String>| v.clone().map(Value::String).unwrap_or(Value::Null);
        m.insert("created_by".into(), opt(&self.created_by));
        m.insert("snapshot_message".into(), opt(&self.snapshot_message));
        m.insert("snapshot_previous".into(), opt(&self.snapshot_previous));
        m.insert("snapshot_hash".into(), opt(&self.snapshot_hash));
        m.insert("snapshot_notes".into(), opt(&self.snapshot_notes));
        m.insert(
            "project_config".into(),
            self.project_config.clone().unwrap_or(Value::Null),
        );
        Value::Object(m)
    }

    /// The metadata of snapshot `id` with these entries, following `prev`
    /// (the snapshot it replaces, or none for the first).
    pub fn sealed(
        entries_hash: String,
        entry_count: usize,
        id: &str,
        created_by: &str,
        message: &str,
        notes: &str,
        prev: Option<&Metadata>,
    ) -> Metadata {
        let prev_hash = prev.and_then(|p| p.snapshot_hash.clone());
        let hash = snapshot_hash(&entries_hash, Some(message), None, prev_hash.as_deref());
        Metadata {
            manifest_version: MANIFEST_VERSION.into(),
            snapshot_id: id.into(),
            created_at: timefmt::now_la(),
            entry_count: entry_count as u64,
            entries_hash,
            created_by: Some(created_by.into()),
            snapshot_message: Some(message.into()),
            snapshot_previous: prev.map(|p| p.snapshot_id.clone()),
            snapshot_hash: Some(hash),
            snapshot_notes: Some(notes.into()),
            project_config: None,
        }
    }

    pub fn from_value(v: &Value) -> Result<Metadata, String> {
        let o = v.as_object().ok_or("metadata is not an object")?;
        let req_str = |k: &str| -> Result<String, String> {
            match o.get(k) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!("metadata.{k} must be a string, got {other}")),
                None => Err(format!("metadata.{k} is missing")),
            }
        };
        let opt_str = |k: &str| -> Result<Option<String>, String> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(format!(
                    "metadata.{k} must be a string or null, got {other}"
                )),
            }
        };
        let entry_count = match o.get("entry_count") {
            Some(v) => {
                lax_u64(v).ok_or_else(|| format!("metadata.entry_count is not a count: {v}"))?
            }
            None => return Err("metadata.entry_count is missing".into()),
        };
        Ok(Metadata {
            manifest_version: opt_str("manifest_version")?
                .unwrap_or_else(|| MANIFEST_VERSION.into()),
            snapshot_id: req_str("snapshot_id")?,
            created_at: req_str("created_at")?,
            entry_count,
            entries_hash: req_str("entries_hash")?,
            created_by: opt_str("created_by")?,
            snapshot_message: opt_str("snapshot_message")?,
            snapshot_previous: opt_str("snapshot_previous")?,
            snapshot_hash: opt_str("snapshot_hash")?,
            snapshot_notes: opt_str("snapshot_notes")?,
            project_config: match o.get("project_config") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.clone()),
            },
        })
    }

    /// The snapshot number `N` of `sN`, if the id has that form.
    pub fn snapshot_number(&self) -> Option<u64> {
        snapshot_number(&self.snapshot_id)
    }
}

/// `N` of an id exactly of the form `sN` (N a positive decimal without
/// leading zeros): the only ids a repository accepts, since an id becomes
/// a file name (`archive/<id>-sync.json.lz4`) and a ZFS snapshot name.
pub fn strict_snapshot_number(id: &str) -> Option<u64> {
    let digits = id.strip_prefix('s')?;
    if digits.is_empty() || digits.len() > 19 || digits.starts_with('0') {
        return None;
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn snapshot_number(id: &str) -> Option<u64> {
    id.strip_prefix('s')
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse().ok())
}

fn lax_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Resolves a link's target component by component, following the other
/// link entries it passes through; errors when it leaves the project.
fn resolve_through_links(
    link: &str,
    target: &str,
    links: &std::collections::HashMap<&str, &str>,
    depth: usize,
) -> Result<String, &'static str> {
    if depth > 40 {
        return Err("too many levels of links");
    }
    if target.starts_with('/') {
        return Err("absolute target");
    }
    let mut parts: Vec<String> = link.split('/').map(String::from).collect();
    parts.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop().ok_or("leaves the project")?;
            }
            c => {
                parts.push(c.to_string());
                let here = parts.join("/");
                if let Some(t) = links.get(here.as_str()) {
                    let resolved = resolve_through_links(&here, t, links, depth + 1)?;
                    parts = if resolved.is_empty() {
                        Vec::new()
                    } else {
                        resolved.split('/').map(String::from).collect()
                    };
                }
            }
        }
    }
    Ok(parts.join("/"))
}

/// The chain hash of one snapshot (§1.8, the original's algorithm).
pub fn snapshot_hash(
    entries_hash: &str,
    message: Option<&str>,
    project_config: Option<&Value>,
    prev_hash: Option<&str>,
) -> String {
    let mut h = Xxh3::new();
    h.update(entries_hash.as_bytes());
    h.update(message.unwrap_or("").as_bytes());
    if let Some(Value::Object(o)) = project_config {
        if !o.is_empty() {
            let sorted = sort_keys(&Value::Object(o.clone()));
            h.update(&serde_json::to_vec(&sorted).expect("json"));
        }
    }
    if let Some(p) = prev_hash {
        h.update(p.as_bytes());
    }
    Hash(h.digest()).to_hex()
}

fn sort_keys(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            let mut m = serde_json::Map::new();
            for k in keys {
                m.insert(k.clone(), sort_keys(&o[k]));
            }
            Value::Object(m)
        }
        Value::Array(a) => Value::Array(a.iter().map(sort_keys).collect()),
        other => other.clone(),
    }
}

/// `entries_hash` over `entries` in the order given.
pub fn entries_hash_of<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> String {
    let mut h = Xxh3::new();
    let mut buf = Vec::with_capacity(256);
    for e in entries {
        buf.clear();
        e.write_compact(&mut buf);
        h.update(&buf);
    }
    Hash(h.digest()).to_hex()
}

/// Writes a manifest as the original does (orjson indent 2, no trailing
/// newline), entries in the order given, without holding the whole text.
pub fn write_json<'a, W: Write>(
    w: &mut W,
    entries: impl IntoIterator<Item = &'a Entry>,
    metadata: Option<&Metadata>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    buf.extend_from_slice(b"{\n  \"entries\": {");
    let mut first = true;
    for e in entries {
        buf.extend_from_slice(if first { b"\n    " } else { b",\n    " });
        first = false;
        json_str(&mut buf, &e.path);
        buf.extend_from_slice(b": ");
        e.write_pretty(&mut buf);
        if buf.len() >= 1 << 16 {
            w.write_all(&buf)?;
            buf.clear();
        }
    }
    if first {
        buf.extend_from_slice(b"}");
    } else {
        buf.extend_from_slice(b"\n  }");
    }
    buf.extend_from_slice(b",\n  \"metadata\": ");
    match metadata {
        Some(md) => {
            let s = serde_json::to_string_pretty(&md.to_value()).expect("json");
            // Nest the object one level deeper.
            buf.extend_from_slice(s.replace('\n', "\n  ").as_bytes());
        }
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b"\n}");
    w.write_all(&buf)
}

/// A sync's new manifest: `base` (sorted by path) with `changes` applied,
/// as references into the manifests that hold the entries, so no entry is
/// copied. `changes` are `(path, Some(entry))` to add or replace and
/// `(path, None)` to remove, in any order; for a path given several times
/// an entry wins over a removal, and of several entries the last (as the
/// construction this replaced: retain, append, `Manifest::from_entries`).
/// Sorted by path like every manifest we write.
pub fn merge_changes<'a>(
    base: &'a [Entry],
    mut changes: Vec<(&str, Option<&'a Entry>)>,
) -> Vec<&'a Entry> {
    changes.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    // Stable sort: of equal paths the last given comes last.
    let mut dedup: Vec<(&str, Option<&'a Entry>)> = Vec::with_capacity(changes.len());
    for c in changes {
        match dedup.last_mut() {
            Some(last) if last.0 == c.0 => {
                if c.1.is_some() || last.1.is_none() {
                    *last = c;
                }
            }
            _ => dedup.push(c),
        }
    }
    let mut out = Vec::with_capacity(base.len() + dedup.len());
    let mut b = base.iter().peekable();
    for (path, put) in dedup {
        while let Some(e) = b.next_if(|e| e.path.as_bytes() < path.as_bytes()) {
            out.push(e);
        }
        b.next_if(|e| &*e.path == path);
        if let Some(e) = put {
            out.push(e);
        }
    }
    out.extend(b);
    out
}

/// A manifest. Entries are kept sorted by path (byte order), which is also the
/// order we write. `stored_entries_hash` is the hash over the order the file
/// had when we read it, which is what an original-written file must match.
#[derive(Clone, Debug, Default)]
pub struct Manifest {
    entries: Vec<Entry>,
    pub metadata: Option<Metadata>,
    stored_entries_hash: Option<String>,
}

impl PartialEq for Manifest {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries && self.metadata == other.metadata
    }
}

impl Manifest {
    pub fn new() -> Manifest {
        Manifest::default()
    }

    /// Builds a manifest from entries in any order; duplicate paths keep the last.
    pub fn from_entries(mut entries: Vec<Entry>) -> Manifest {
        entries.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        entries.dedup_by(|later, earlier| {
            if later.path == earlier.path {
                std::mem::swap(later, earlier);
                true
            } else {
                false
            }
        });
        Manifest {
            entries,
            metadata: None,
            stored_entries_hash: None,
        }
    }

    /// Entries already sorted by path with no duplicates (a scan's output).
    pub fn from_sorted_entries(entries: Vec<Entry>) -> Manifest {
        debug_assert!(entries
            .windows(2)
            .all(|w| w[0].path.as_bytes() < w[1].path.as_bytes()));
        Manifest {
            entries,
            metadata: None,
            stored_entries_hash: None,
        }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn into_entries(self) -> Vec<Entry> {
        self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.path.as_bytes().cmp(path.as_bytes()))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// `entries_hash` over entries sorted by path (what we write).
    pub fn entries_hash(&self) -> String {
        entries_hash_of(&self.entries)
    }

    /// Checks count and entries hash against the metadata. The hash may match
    /// the stored order (original files) or the sorted order (ours).
    pub fn verify_integrity(&self) -> Result<(), String> {
        let md = self
            .metadata
            .as_ref()
            .ok_or("no metadata to verify against")?;
        if md.entry_count as usize != self.entries.len() {
            return Err(format!(
                "entry count mismatch: metadata says {}, file has {}",
                md.entry_count,
                self.entries.len()
            ));
        }
        let stored = self.stored_entries_hash.clone();
        if stored.as_deref() == Some(md.entries_hash.as_str())
            || self.entries_hash() == md.entries_hash
        {
            Ok(())
        } else {
            Err(format!(
                "entries_hash mismatch: metadata says {}, entries hash to {}",
                md.entries_hash,
                stored.unwrap_or_else(|| self.entries_hash())
            ))
        }
    }

    /// Makes this manifest snapshot `id` following `prev` (the metadata of the
    /// snapshot it replaces, or none for the first).
    pub fn seal(
        &mut self,
        id: &str,
        created_by: &str,
        message: &str,
        notes: &str,
        prev: Option<&Metadata>,
    ) {
        let entries_hash = self.entries_hash();
        self.metadata = Some(Metadata::sealed(
            entries_hash.clone(),
            self.entries.len(),
            id,
            created_by,
            message,
            notes,
            prev,
        ));
        // We write entries in this (sorted) order, so the hash over the
        // order of the file is this one: what parsing it back would find.
        self.stored_entries_hash = Some(entries_hash);
    }

    /// Serializes as the original does (orjson indent 2, no trailing newline),
    /// entries sorted by path.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.entries.len() * 220);
        write_json(&mut out, &self.entries, self.metadata.as_ref()).expect("writing to a Vec");
        out
    }

    /// Parses manifest bytes. `origin` names the file in errors.
    pub fn from_json_bytes(bytes: &[u8], origin: &Path) -> Result<Manifest, ManifestError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let m = Manifest::deserialize_from(&mut de, origin)?;
        de.end()
            .map_err(|e| ManifestError::corrupt(origin, format!("trailing data: {e}")))?;
        Ok(m)
    }

    /// Parses a manifest from a reader without holding the whole file: a
    /// million-entry manifest is hundreds of MB of JSON.
    pub fn from_reader<R: std::io::Read>(r: R, origin: &Path) -> Result<Manifest, ManifestError> {
        // serde_json reads one byte at a time; only a `BufReader` it sees
        // directly serves those from its buffer (through a `Box<dyn Read>`
        // each byte was a virtual call: the agent parsed uploads at a third
        // of the speed).
        let r = std::io::BufReader::with_capacity(1 << 16, r);
        let mut de = serde_json::Deserializer::from_reader(r);
        let m = Manifest::deserialize_from(&mut de, origin)?;
        de.end()
            .map_err(|e| ManifestError::corrupt(origin, format!("trailing data: {e}")))?;
        Ok(m)
    }

    fn deserialize_from<'de, D>(de: D, origin: &Path) -> Result<Manifest, ManifestError>
    where
        D: serde::Deserializer<'de, Error = serde_json::Error>,
    {
        use serde::de::DeserializeSeed;
        let parsed = TopSeed
            .deserialize(de)
            .map_err(|e| ManifestError::corrupt(origin, e.to_string()))?;
        let metadata = match parsed.metadata {
            None | Some(Value::Null) => None,
            Some(m) => {
                Some(Metadata::from_value(&m).map_err(|msg| ManifestError::corrupt(origin, msg))?)
            }
        };
        let n = parsed.entries.len();
        let mut m = Manifest::from_entries(parsed.entries);
        if m.entries.len() != n {
            return Err(ManifestError::corrupt(origin, "duplicate paths"));
        }
        m.check_tree()
            .map_err(|msg| ManifestError::corrupt(origin, msg))?;
        m.metadata = metadata;
        m.stored_entries_hash = Some(Hash(parsed.stored_hash).to_hex());
        Ok(m)
    }

    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let f = std::fs::File::open(path).map_err(|e| ManifestError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Manifest::from_reader(std::io::BufReader::with_capacity(1 << 20, f), path)
    }

    /// Loads a manifest that may legitimately be absent; any other failure is an error.
    pub fn load_optional(path: &Path) -> Result<Option<Manifest>, ManifestError> {
        // Streamed: the text of a large manifest is never held whole.
        match std::fs::File::open(path) {
            Ok(f) => {
                Manifest::from_reader(std::io::BufReader::with_capacity(1 << 16, f), path).map(Some)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ManifestError::Io {
                path: path.to_path_buf(),
                source: e,
            }),
        }
    }

    /// Checks what single entries cannot show: no entry lies under a link
    /// entry (a link is a leaf), and no link leads out of the project
    /// through other links (`up -> ../..` plus `up2 -> up/..`).
    pub fn check_tree(&self) -> Result<(), String> {
        let links: std::collections::HashMap<&str, &str> = self
            .entries
            .iter()
            .filter_map(|e| match &e.kind {
                EntryKind::Link { target } => Some((&*e.path, &**target)),
                _ => None,
            })
            .collect();
        if links.is_empty() {
            return Ok(());
        }
        for e in &self.entries {
            let mut p = &*e.path;
            while let Some((parent, _)) = p.rsplit_once('/') {
                if links.contains_key(parent) {
                    return Err(format!("entry {:?} lies under the link {parent:?}", e.path));
                }
                p = parent;
            }
        }
        for (path, target) in &links {
            resolve_through_links(path, target, &links, 0)
                .map_err(|why| format!("link {path:?} -> {target:?}: {why}"))?;
        }
        Ok(())
    }

    /// Checks that the entries can be one tree on disk: no entry lies below
    /// another (every entry is a file or a link, so it cannot also be a
    /// directory), and no two paths are one name after Unicode NFC
    /// normalisation (one file on macOS, two here). The error names both
    /// paths.
    pub fn check_shape(&self) -> Result<(), String> {
        use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};
        let nfc = |p: &str| -> String {
            match is_nfc_quick(p.chars()) {
                IsNormalized::Yes => p.to_string(),
                _ => p.nfc().collect(),
            }
        };
        // The common case, every path already NFC: the paths are unique
        // and sorted, so a lookup of each parent finds a file above it
        // without a map of every path (tens of MB at a million entries).
        if self
            .entries
            .iter()
            .all(|e| is_nfc_quick(e.path.chars()) == IsNormalized::Yes)
        {
            for e in &self.entries {
                let mut p = &*e.path;
                while let Some((parent, _)) = p.rsplit_once('/') {
                    if let Some(above) = self.get(parent) {
                        return Err(format!(
                            "{:?} lies below {:?}, which is a file or a link, not a directory",
                            e.path, above.path
                        ));
                    }
                    p = parent;
                }
            }
            return Ok(());
        }
        let mut by_nfc: std::collections::HashMap<String, &str> =
            std::collections::HashMap::with_capacity(self.entries.len());
        for e in &self.entries {
            if let Some(other) = by_nfc.insert(nfc(&e.path), &e.path) {
                return Err(format!(
                    "{other:?} and {:?} are the same name after Unicode normalisation",
                    e.path
                ));
            }
        }
        for (key, path) in &by_nfc {
            let mut p = key.as_str();
            while let Some((parent, _)) = p.rsplit_once('/') {
                if let Some(above) = by_nfc.get(parent) {
                    return Err(format!(
                        "{path:?} lies below {above:?}, which is a file or a link, not a directory"
                    ));
                }
                p = parent;
            }
        }
        Ok(())
    }

    /// Paths of links whose target (resolved lexically) is not an entry.
    pub fn dangling_links(&self) -> Vec<&str> {
        self.entries
            .iter()
            .filter_map(|e| match &e.kind {
                EntryKind::Link { target } => {
                    let resolved = crate::paths::resolve_link(&e.path, target);
                    match resolved {
                        Some(r) if self.get(&r).is_some() => None,
                        _ => Some(&*e.path),
                    }
                }
                _ => None,
            })
            .collect()
    }
}

struct Parsed {
    entries: Vec<Entry>,
    metadata: Option<Value>,
    stored_hash: u64,
}

struct TopSeed;

impl<'de> serde::de::DeserializeSeed<'de> for TopSeed {
    type Value = Parsed;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Parsed, D::Error> {
        d.deserialize_map(TopVisitor)
    }
}

struct TopVisitor;

impl<'de> serde::de::Visitor<'de> for TopVisitor {
    type Value = Parsed;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a manifest object with \"entries\" and \"metadata\"")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Parsed, A::Error> {
        let mut out = Parsed {
            entries: Vec::new(),
            metadata: None,
            stored_hash: Xxh3::new().digest(),
        };
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "entries" => {
                    let (entries, h) = map.next_value_seed(EntriesSeed)?;
                    out.entries = entries;
                    out.stored_hash = h;
                }
                "metadata" => out.metadata = Some(map.next_value::<Value>()?),
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

struct EntriesSeed;

impl<'de> serde::de::DeserializeSeed<'de> for EntriesSeed {
    type Value = (Vec<Entry>, u64);
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(EntriesVisitor)
    }
}

struct EntriesVisitor;

impl<'de> serde::de::Visitor<'de> for EntriesVisitor {
    type Value = (Vec<Entry>, u64);
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("\"entries\" as an object keyed by path")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let mut users: Vec<Arc<str>> = Vec::new();
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        let mut h = Xxh3::new();
        let mut buf = Vec::with_capacity(256);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let raw: RawEntry = map.next_value()?;
            let e = raw
                .into_entry(&key, &mut users)
                .map_err(|m| A::Error::custom(format!("entry {key:?}: {m}")))?;
            buf.clear();
            e.write_compact(&mut buf);
            h.update(&buf);
            entries.push(e);
        }
        Ok((entries, h.digest()))
    }
}

/// One entry as stored; lax where the original was lax (a size may be a
/// string or a float), strict about everything that decides safety.
#[derive(serde::Deserialize)]
struct RawEntry<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    /// Redundant with the key, which is what we use; but the original reads
    /// this field, and the file is copied verbatim into clients' caches.
    #[serde(default, borrow)]
    path: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    user: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, deserialize_with = "lax_size")]
    filesize: Option<u64>,
    #[serde(default, borrow)]
    mtime: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    hash: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    reference: Option<std::borrow::Cow<'a, str>>,
}

fn lax_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a file size")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v)
                .map(Some)
                .map_err(|_| E::custom("negative filesize"))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            if v.fract() == 0.0 && v >= 0.0 {
                Ok(Some(v as u64))
            } else {
                Err(E::custom(format!("filesize {v} is not a size")))
            }
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            v.trim()
                .parse()
                .map(Some)
                .map_err(|_| E::custom(format!("filesize {v:?} is not a size")))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

impl RawEntry<'_> {
    fn into_entry(self, key: &str, users: &mut Vec<Arc<str>>) -> Result<Entry, String> {
        check_relpath(key).map_err(|e| e.to_string())?;
        if let Some(p) = self.path.as_deref().filter(|p| *p != key) {
            return Err(format!(
                "path field {p:?} differs from its key; the manifest was altered or damaged"
            ));
        }
        let u = self.user.as_deref().unwrap_or("");
        let user = match users.iter().find(|a| &***a == u) {
            Some(a) => a.clone(),
            None => {
                let a: Arc<str> = u.into();
                users.push(a.clone());
                a
            }
        };
        let kind = match &*self.kind {
            "file" => {
                let size = self.filesize.ok_or("filesize is missing")?;
                let mtime = Mtime::parse(self.mtime.as_deref().ok_or("mtime is missing")?);
                let hash = match self.hash.as_deref() {
                    None | Some("") => None,
                    Some(s) => Some(
                        Hash::parse(s).ok_or_else(|| format!("hash {s:?} is not 16 hex digits"))?,
                    ),
                };
                EntryKind::File { size, mtime, hash }
            }
            "link" => {
                let target = self.reference.as_deref().ok_or("reference is missing")?;
                check_link_target(key, target).map_err(|e| e.to_string())?;
                EntryKind::Link {
                    target: target.into(),
                }
            }
            t => return Err(format!("unknown entry type {t:?}")),
        };
        Ok(Entry {
            path: key.into(),
            user,
            kind,
        })
    }
}

/// Reads an archived manifest: LZ4 frame (what we and the original write) or gzip.
pub fn read_archive(path: &Path) -> Result<Manifest, ManifestError> {
    let raw = std::fs::read(path).map_err(|e| ManifestError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    archive_from_bytes(&raw, path)
}

/// An archived manifest from its file's bytes; `origin` names it (and its
/// extension says how it is compressed).
pub fn archive_from_bytes(raw: &[u8], origin: &Path) -> Result<Manifest, ManifestError> {
    let path = origin;
    let name = path.to_string_lossy();
    let json = if name.ends_with(".lz4") {
        let mut d = lz4_flex::frame::FrameDecoder::new(raw);
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut out)
            .map_err(|e| ManifestError::corrupt(path, format!("bad LZ4 frame: {e}")))?;
        out
    } else if name.ends_with(".gz") {
        let mut d = flate2::read::GzDecoder::new(raw);
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut out)
            .map_err(|e| ManifestError::corrupt(path, format!("bad gzip: {e}")))?;
        out
    } else {
        return Err(ManifestError::corrupt(
            path,
            "unsupported compression format (expected .lz4 or .gz)",
        ));
    };
    Manifest::from_json_bytes(&json, path)
}

/// LZ4-frame bytes of a manifest, as `.dsg/archive/sN-sync.json.lz4` holds them.
pub fn archive_bytes(m: &Manifest) -> Vec<u8> {
    compress_archive(&m.to_json_bytes())
}

/// LZ4-frame compression of a manifest file's bytes, kept verbatim so an
/// original-written manifest still verifies in its stored order.
pub fn compress_archive(json: &[u8]) -> Vec<u8> {
    let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
    enc.write_all(json).expect("vec write");
    enc.finish().expect("lz4 finish")
}

/// `compress_archive` from a reader into a writer without holding the
/// text: returns the XXH3 of the bytes read (so the caller can check they
/// are the ones it meant to archive).
pub fn compress_archive_stream(
    mut from: impl std::io::Read,
    to: impl Write,
) -> std::io::Result<Hash> {
    let mut enc = lz4_flex::frame::FrameEncoder::new(to);
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        enc.write_all(&buf[..n])?;
    }
    enc.finish().map_err(std::io::Error::other)?.flush()?;
    Ok(Hash(h.digest()))
}

pub fn archive_name(snapshot_id: &str) -> String {
    format!("{snapshot_id}-sync.json.lz4")
}

/// `.dsg/sync-messages.json`: the snapshot index (§2.2).
#[derive(Clone, Debug, PartialEq)]
pub struct SyncMessages {
    pub metadata_version: String,
    pub snapshots: indexmap::IndexMap<String, Value>,
    /// Kept verbatim from legacy files so nothing is lost (defect 12).
    pub legacy: Option<(String, Value)>,
}

impl Default for SyncMessages {
    fn default() -> Self {
        SyncMessages {
            metadata_version: MANIFEST_VERSION.into(),
            snapshots: Default::default(),
            legacy: None,
        }
    }
}

impl SyncMessages {
    pub fn from_json_bytes(bytes: &[u8], origin: &Path) -> Result<SyncMessages, ManifestError> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| ManifestError::corrupt(origin, format!("not valid JSON: {e}")))?;
        let o = v
            .as_object()
            .ok_or_else(|| ManifestError::corrupt(origin, "top level is not a JSON object"))?;
        let metadata_version = o
            .get("metadata_version")
            .and_then(|v| v.as_str())
            .unwrap_or(MANIFEST_VERSION)
            .to_string();
        let mut sm = SyncMessages {
            metadata_version,
            snapshots: Default::default(),
            legacy: None,
        };
        match o.get("snapshots") {
            Some(Value::Object(map)) => {
                for (k, v) in map {
                    if !v.is_object() {
                        return Err(ManifestError::corrupt(
                            origin,
                            format!("snapshot {k} is not an object"),
                        ));
                    }
                    sm.snapshots.insert(k.clone(), v.clone());
                }
            }
            Some(_) => {
                return Err(ManifestError::corrupt(
                    origin,
                    "\"snapshots\" is not an object",
                ))
            }
            None => {
                for key in ["sync_messages", "messages", "legacy_messages"] {
                    if let Some(v) = o.get(key) {
                        sm.legacy = Some((key.to_string(), v.clone()));
                    }
                }
            }
        }
        Ok(sm)
    }

    pub fn load_optional(path: &Path) -> Result<Option<SyncMessages>, ManifestError> {
        match std::fs::read(path) {
            Ok(b) => SyncMessages::from_json_bytes(&b, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ManifestError::Io {
                path: path.to_path_buf(),
                source: e,
            }),
        }
    }

    pub fn add(&mut self, md: &Metadata) {
        self.snapshots.insert(md.snapshot_id.clone(), md.to_value());
    }

    /// Highest `sN` present.
    pub fn head_number(&self) -> Option<u64> {
        self.snapshots
            .keys()
            .filter_map(|k| snapshot_number(k))
            .max()
    }

    pub fn to_json_bytes(&self) -> Vec<u8> {
        let mut m = serde_json::Map::new();
        m.insert(
            "metadata_version".into(),
            self.metadata_version.clone().into(),
        );
        let snaps: serde_json::Map<String, Value> = self
            .snapshots
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        m.insert("snapshots".into(), Value::Object(snaps));
        if let Some((k, v)) = &self.legacy {
            m.insert(
                format!("legacy_{}", k.trim_start_matches("legacy_")),
                v.clone(),
            );
        }
        let mut s = serde_json::to_string_pretty(&Value::Object(m)).expect("json");
        // orjson writes `{}` for empty objects; serde_json does too.
        s.truncate(s.trim_end().len());
        s.into_bytes()
    }
}

/// A binary copy of a manifest, tagged with the XXH3 of the JSON file it was
/// made from. Parsing and verifying a million-entry JSON manifest costs far
/// more than a `status` may; the binary copy loads in a fraction of that and
/// is used only while the JSON file still hashes to the tag. Damage or a
/// stale tag just means the JSON is parsed again.
pub mod binary {
    use super::*;

    const MAGIC: &[u8; 8] = b"DSGMAN01";

    struct W(Vec<u8>);
    impl W {
        fn u8(&mut self, v: u8) {
            self.0.push(v);
        }
        fn u32(&mut self, v: u32) {
            self.0.extend_from_slice(&v.to_le_bytes());
        }
        fn u64(&mut self, v: u64) {
            self.0.extend_from_slice(&v.to_le_bytes());
        }
        fn bytes(&mut self, b: &[u8]) {
            self.u32(b.len() as u32);
            self.0.extend_from_slice(b);
        }
    }

    /// Reads and hashes at once, so the file is never held whole.
    struct R<T: std::io::Read> {
        r: T,
        h: Xxh3,
        buf: Vec<u8>,
    }
    impl<T: std::io::Read> R<T> {
        fn take(&mut self, n: usize) -> Option<&[u8]> {
            if n > (1 << 30) {
                return None;
            }
            self.buf.resize(n, 0);
            self.r.read_exact(&mut self.buf).ok()?;
            self.h.update(&self.buf);
            Some(&self.buf)
        }
        fn u8(&mut self) -> Option<u8> {
            Some(self.take(1)?[0])
        }
        fn u32(&mut self) -> Option<u32> {
            Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
        }
        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
        }
        fn str(&mut self) -> Option<&str> {
            let n = self.u32()? as usize;
            std::str::from_utf8(self.take(n)?).ok()
        }
    }

    pub fn encode(m: &Manifest, tag: u64) -> Vec<u8> {
        let entries: Vec<&Entry> = m.entries.iter().collect();
        encode_parts(
            &entries,
            m.metadata.as_ref(),
            m.stored_entries_hash.as_deref(),
            tag,
        )
    }

    /// `encode` of a manifest made of borrowed entries (sorted by path),
    /// written in this order: its stored entries hash is the metadata's.
    pub fn encode_borrowed(entries: &[&Entry], md: &Metadata, tag: u64) -> Vec<u8> {
        encode_parts(entries, Some(md), Some(&md.entries_hash), tag)
    }

    fn encode_parts(
        entries: &[&Entry],
        metadata: Option<&Metadata>,
        stored_entries_hash: Option<&str>,
        tag: u64,
    ) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(64 + entries.len() * 64));
        w.0.extend_from_slice(MAGIC);
        w.u64(tag);
        match metadata {
            Some(md) => w.bytes(&serde_json::to_vec(&md.to_value()).expect("json")),
            None => w.u32(u32::MAX),
        }
        match stored_entries_hash {
            Some(h) => w.bytes(h.as_bytes()),
            None => w.u32(u32::MAX),
        }
        let mut users: Vec<&Arc<str>> = Vec::new();
        let mut idx = Vec::with_capacity(entries.len());
        for e in entries {
            let i = match users
                .iter()
                .position(|u| Arc::ptr_eq(u, &e.user) || **u == e.user)
            {
                Some(i) => i,
                None => {
                    users.push(&e.user);
                    users.len() - 1
                }
            };
            idx.push(i as u32);
        }
        w.u32(users.len() as u32);
        for u in &users {
            w.bytes(u.as_bytes());
        }
        w.u64(entries.len() as u64);
        for (e, ui) in entries.iter().zip(idx) {
            w.bytes(e.path.as_bytes());
            w.u32(ui);
            match &e.kind {
                EntryKind::File { size, mtime, hash } => {
                    w.u8(0);
                    w.u64(*size);
                    match mtime {
                        Mtime::Fixed {
                            utc_secs,
                            offset_min,
                        } => {
                            w.u8(0);
                            w.u64(*utc_secs as u64);
                            w.u32(*offset_min as i32 as u32);
                        }
                        Mtime::Raw(s) => {
                            w.u8(1);
                            w.bytes(s.as_bytes());
                        }
                    }
                    match hash {
                        Some(h) => {
                            w.u8(1);
                            w.u64(h.0);
                        }
                        None => w.u8(0),
                    }
                }
                EntryKind::Link { target } => {
                    w.u8(1);
                    w.bytes(target.as_bytes());
                }
            }
        }
        let sum = Hash::of_bytes(&w.0).0;
        w.u64(sum);
        w.0
    }

    /// Decodes if intact and made from a JSON file hashing to `tag`.
    pub fn decode(b: &[u8], tag: u64) -> Option<Manifest> {
        decode_from(b, tag)
    }

    /// Decodes from a reader (a file), checking the trailing checksum.
    pub fn decode_from(reader: impl std::io::Read, tag: u64) -> Option<Manifest> {
        let mut r = R {
            r: reader,
            h: Xxh3::new(),
            buf: Vec::new(),
        };
        if r.take(8)? != MAGIC {
            return None;
        }
        if r.u64()? != tag {
            return None;
        }
        let n = r.u32()?;
        let metadata = if n == u32::MAX {
            None
        } else {
            let v: Value = serde_json::from_slice(r.take(n as usize)?).ok()?;
            Some(Metadata::from_value(&v).ok()?)
        };
        let n = r.u32()?;
        let stored_entries_hash = if n == u32::MAX {
            None
        } else {
            Some(std::str::from_utf8(r.take(n as usize)?).ok()?.to_string())
        };
        let nu = r.u32()? as usize;
        let mut users: Vec<Arc<str>> = Vec::with_capacity(nu.min(1 << 16));
        for _ in 0..nu {
            users.push(r.str()?.into());
        }
        let ne = r.u64()? as usize;
        let mut entries = Vec::with_capacity(ne.min(1 << 24));
        for _ in 0..ne {
            let path: Box<str> = r.str()?.into();
            let user = users.get(r.u32()? as usize)?.clone();
            let kind = match r.u8()? {
                0 => {
                    let size = r.u64()?;
                    let mtime = match r.u8()? {
                        0 => Mtime::Fixed {
                            utc_secs: r.u64()? as i64,
                            offset_min: r.u32()? as i32 as i16,
                        },
                        _ => Mtime::Raw(Box::new(r.str()?.to_string())),
                    };
                    let hash = match r.u8()? {
                        1 => Some(Hash(r.u64()?)),
                        _ => None,
                    };
                    EntryKind::File { size, mtime, hash }
                }
                _ => EntryKind::Link {
                    target: r.str()?.into(),
                },
            };
            entries.push(Entry { path, user, kind });
        }
        if !entries
            .windows(2)
            .all(|w| w[0].path.as_bytes() < w[1].path.as_bytes())
        {
            return None;
        }
        let digest = r.h.digest();
        let mut sum = [0u8; 8];
        r.r.read_exact(&mut sum).ok()?;
        let mut extra = [0u8; 1];
        if u64::from_le_bytes(sum) != digest || r.r.read(&mut extra).ok()? != 0 {
            return None;
        }
        Some(Manifest {
            entries,
            metadata,
            stored_entries_hash,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trip_and_damage() {
            let text = r#"{"entries": {"b": {"type":"link","path":"b","user":"u","reference":"a"},
                "a": {"type":"file","path":"a","user":"v","filesize":3,"mtime":"2025-01-15T12:00:00-08:00","hash":"0123456789abcdef"},
                "c": {"type":"file","path":"c","filesize":3,"mtime":"odd","hash":""}}}"#;
            let m = Manifest::from_json_bytes(text.as_bytes(), Path::new("x")).unwrap();
            let b = encode(&m, 42);
            let back = decode(&b, 42).unwrap();
            assert_eq!(back, m);
            assert_eq!(back.stored_entries_hash, m.stored_entries_hash);
            assert!(decode(&b, 43).is_none());
            for i in [0, 9, b.len() / 2, b.len() - 1] {
                let mut bad = b.clone();
                bad[i] ^= 0x40;
                assert!(decode(&bad, 42).is_none(), "flip at {i}");
            }
        }

        /// A sync writes the binary copy of the manifest it built in
        /// memory; the next command must get exactly what parsing the
        /// JSON written from it would give.
        #[test]
        fn binary_of_a_built_manifest_equals_its_json_parsed() {
            let user: std::sync::Arc<str> = std::sync::Arc::from("u@example.org");
            let mut x: u64 = 7;
            let entries: Vec<Entry> = (0..500)
                .map(|i| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let kind = if i % 17 == 0 {
                        EntryKind::Link {
                            target: format!("../t{i}").into(),
                        }
                    } else {
                        EntryKind::File {
                            size: x % 100_000,
                            mtime: Mtime::from_unix(
                                (x >> 20) as i64 % 2_000_000_000,
                                (x % 1_000_000_000) as u32,
                            ),
                            hash: Some(Hash(x)),
                        }
                    };
                    Entry {
                        path: format!("input/d{}/f{i}.csv", i % 7).into(),
                        user: user.clone(),
                        kind,
                    }
                })
                .collect();
            let mut m = Manifest::from_entries(entries);
            m.seal("s2", "u@example.org", "msg", "sync", None);
            let json = m.to_json_bytes();
            let parsed = Manifest::from_json_bytes(&json, Path::new("x")).unwrap();
            let tag = xxhash_rust::xxh3::xxh3_64(&json);
            let back = decode(&encode(&m, tag), tag).unwrap();
            assert_eq!(back, parsed);
            assert_eq!(back.stored_entries_hash, parsed.stored_entries_hash);
            assert_eq!(back.to_json_bytes(), json);
        }
    }
}

#[cfg(test)]
mod mtime_format_tests {
    use super::*;
    use std::fmt::Write as _;

    /// The general formatting the fast path must equal.
    fn general(utc_secs: i64, offset_min: i16) -> String {
        let local = utc_secs + offset_min as i64 * 60;
        let (y, mo, d) = civil_from_days(local.div_euclid(86400));
        let t = local.rem_euclid(86400);
        let sign = if offset_min < 0 { '-' } else { '+' };
        let o = offset_min.unsigned_abs();
        let mut s = String::new();
        write!(
            s,
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}{sign}{:02}:{:02}",
            t / 3600,
            t % 3600 / 60,
            t % 60,
            o / 60,
            o % 60
        )
        .unwrap();
        s
    }

    #[test]
    fn fast_mtime_formatting_equals_the_general_one() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut cases: Vec<(i64, i16)> = vec![
            (0, 0),
            (0, -480),
            (-1, 0),
            (253_402_300_799, 0),  // 9999-12-31T23:59:59
            (253_402_300_800, 0),  // year 10000: general path
            (-62_167_219_200, 0),  // 0000-01-01
            (-62_167_219_201, 0),  // year -1: general path
            (1_700_000_000, 5999), // offset 99:59
            (1_700_000_000, i16::MIN),
        ];
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = (x % 12_000_000_000) as i64 - 3_000_000_000;
            let off = ((x >> 40) % 1561) as i16 - 720;
            cases.push((secs, off));
        }
        for (secs, off) in cases {
            let m = Mtime::Fixed {
                utc_secs: secs,
                offset_min: off,
            };
            assert_eq!(m.to_string(), general(secs, off), "{secs} {off}");
        }
    }
}

#[cfg(test)]
mod shape_tests {
    use super::*;

    fn m(paths: &[&str]) -> Manifest {
        Manifest::from_entries(
            paths
                .iter()
                .map(|p| Entry {
                    path: (*p).into(),
                    user: "u".into(),
                    kind: EntryKind::File {
                        size: 0,
                        mtime: Mtime::from_unix(0, 0),
                        hash: None,
                    },
                })
                .collect(),
        )
    }

    #[test]
    fn a_tree_passes() {
        m(&["a/b", "a/c/d", "ab", "a.txt", "a0/x"])
            .check_shape()
            .unwrap();
    }

    #[test]
    fn an_entry_below_an_entry_is_refused() {
        let e = m(&["in/a.txt", "in/a.txt/x/y"]).check_shape().unwrap_err();
        assert!(
            e.contains("\"in/a.txt\"") && e.contains("\"in/a.txt/x/y\""),
            "{e}"
        );
    }

    #[test]
    fn names_equal_after_nfc_are_refused() {
        let e = m(&["caf\u{e9}", "cafe\u{301}"]).check_shape().unwrap_err();
        assert!(e.contains("normalisation"), "{e}");
        let e = m(&["caf\u{e9}", "cafe\u{301}/x"])
            .check_shape()
            .unwrap_err();
        assert!(e.contains("below"), "{e}");
    }

    #[test]
    fn only_canonical_snapshot_ids_are_strict() {
        assert_eq!(strict_snapshot_number("s1"), Some(1));
        assert_eq!(strict_snapshot_number("s120"), Some(120));
        for bad in [
            "s0",
            "s01",
            "s",
            "1",
            "s1/..",
            "../s1",
            "/s1",
            "s+1",
            "s99999999999999999999",
        ] {
            assert_eq!(strict_snapshot_number(bad), None, "{bad}");
        }
    }
}

#[cfg(test)]
mod merge_tests {
    use super::*;
    use proptest::prelude::*;

    fn file(path: &str, n: u64) -> Entry {
        Entry {
            path: path.into(),
            user: Arc::from("u@example.org"),
            kind: EntryKind::File {
                size: n,
                mtime: Mtime::from_unix(1_700_000_000 + n as i64, 0),
                hash: Some(Hash(n)),
            },
        }
    }

    /// The construction `merge_changes` replaced: clone the base, drop
    /// every changed path, append the new entries, sort (last wins).
    fn clone_and_retain(base: &Manifest, changes: &[(&str, Option<&Entry>)]) -> Manifest {
        let drop: std::collections::HashSet<&str> = changes.iter().map(|c| c.0).collect();
        let mut entries: Vec<Entry> = base.entries().to_vec();
        entries.retain(|e| !drop.contains(&*e.path));
        entries.extend(changes.iter().filter_map(|c| c.1.cloned()));
        Manifest::from_entries(entries)
    }

    #[test]
    fn merge_adds_replaces_and_removes() {
        let base = Manifest::from_entries(vec![file("a", 1), file("b", 2), file("d", 4)]);
        let (c, b2, a9) = (file("c", 3), file("b", 20), file("a", 9));
        let merged = merge_changes(
            base.entries(),
            vec![
                ("d", None),
                ("c", Some(&c)),
                ("b", Some(&b2)),
                ("a", Some(&a9)),
                ("a", None),
                ("zz", None),
            ],
        );
        let got: Vec<(&str, u64)> = merged
            .iter()
            .map(|e| (&*e.path, e.hash().unwrap().0))
            .collect();
        assert_eq!(got, vec![("a", 9), ("b", 20), ("c", 3)]);
        assert!(merge_changes(&[], vec![]).is_empty());
    }

    #[test]
    fn borrowed_manifest_writes_and_hashes_like_an_owned_one() {
        let base = Manifest::from_entries(vec![file("a", 1), file("b/c", 2), file("d", 4)]);
        let e = file("b/a", 7);
        let refs = merge_changes(base.entries(), vec![("b/a", Some(&e)), ("d", None)]);
        let mut owned = Manifest::from_entries(refs.iter().map(|e| (*e).clone()).collect());
        owned.seal("s2", "u", "m", "sync", None);
        let md = owned.metadata.clone().unwrap();
        assert_eq!(entries_hash_of(refs.iter().copied()), md.entries_hash);
        let mut json = Vec::new();
        write_json(&mut json, refs.iter().copied(), Some(&md)).unwrap();
        assert_eq!(json, owned.to_json_bytes());
        let tag = 42;
        assert_eq!(
            binary::encode_borrowed(&refs, &md, tag),
            binary::encode(&owned, tag)
        );
        let back = Manifest::from_json_bytes(&json, Path::new("t")).unwrap();
        back.verify_integrity().unwrap();
    }

    #[test]
    fn streamed_archive_equals_the_in_memory_one() {
        let m = Manifest::from_entries((0..500).map(|i| file(&format!("p{i}"), i)).collect());
        let json = m.to_json_bytes();
        let mut out = Vec::new();
        let h = compress_archive_stream(&json[..], &mut out).unwrap();
        assert_eq!(h, Hash::of_bytes(&json));
        // Block boundaries may differ from the one-shot compression; the
        // archive must hold the manifest's bytes verbatim.
        let back = archive_from_bytes(&out, Path::new("t.lz4")).unwrap();
        assert_eq!(back, m);
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut lz4_flex::frame::FrameDecoder::new(&out[..]), &mut raw)
            .unwrap();
        assert_eq!(raw, json);
    }

    proptest! {
        #[test]
        fn merge_equals_clone_and_retain(
            base in proptest::collection::btree_set("[a-e]{1,3}", 0..40),
            changes in proptest::collection::vec(("[a-e]{1,3}", proptest::option::of(0u64..1000)), 0..40),
        ) {
            let base = Manifest::from_entries(
                base.iter().enumerate().map(|(i, p)| file(p, i as u64)).collect(),
            );
            let puts: Vec<Option<Entry>> =
                changes.iter().map(|(p, n)| n.map(|n| file(p, n))).collect();
            let changes: Vec<(&str, Option<&Entry>)> = changes
                .iter()
                .zip(&puts)
                .map(|((p, _), e)| (p.as_str(), e.as_ref()))
                .collect();
            let merged = merge_changes(base.entries(), changes.clone());
            let old = clone_and_retain(&base, &changes);
            let merged: Vec<Entry> = merged.into_iter().cloned().collect();
            prop_assert_eq!(merged, old.entries().to_vec());
        }
    }
}
