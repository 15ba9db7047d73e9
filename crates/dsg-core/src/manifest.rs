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

impl Mtime {
    /// The text of a `Fixed` mtime in years 0–9999 with an offset under
    /// 100 hours (every mtime a scan makes), digits by hand: every entry's
    /// mtime is written and hashed on each sync, and format machinery cost
    /// more than the rest of the entry.
    fn fixed_text(&self) -> Option<[u8; 25]> {
        let Mtime::Fixed {
            utc_secs,
            offset_min,
        } = self
        else {
            return None;
        };
        let local = utc_secs.checked_add(*offset_min as i64 * 60)?;
        let (y, mo, d) = civil_from_days(local.div_euclid(86400));
        let t = local.rem_euclid(86400);
        let o = offset_min.unsigned_abs() as i64;
        if !(0..=9999).contains(&y) || o >= 100 * 60 {
            return None;
        }
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
        if *offset_min < 0 {
            b[19] = b'-';
        }
        Some(b)
    }

    /// The mtime as a JSON string, as `json_str(out, &self.to_string())`
    /// writes it, without the allocation.
    fn write_json(&self, out: &mut Vec<u8>) {
        match self.fixed_text() {
            Some(b) => {
                out.push(b'"');
                out.extend_from_slice(&b);
                out.push(b'"');
            }
            None => json_str(out, &self.to_string()),
        }
    }
}

impl std::fmt::Display for Mtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(b) = self.fixed_text() {
            return f.write_str(std::str::from_utf8(&b).expect("ascii"));
        }
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
                out.extend_from_slice(b",\"filesize\":");
                out.extend_from_slice(itoa::Buffer::new().format(*size).as_bytes());
                out.extend_from_slice(b",\"mtime\":");
                mtime.write_json(out);
                out.extend_from_slice(b",\"hash\":\"");
                if let Some(h) = hash {
                    out.extend_from_slice(&h.hex());
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
                out.extend_from_slice(b",\n      \"filesize\": ");
                out.extend_from_slice(itoa::Buffer::new().format(*size).as_bytes());
                out.extend_from_slice(b",\n      \"mtime\": ");
                mtime.write_json(out);
                out.extend_from_slice(b",\n      \"hash\": \"");
                if let Some(h) = hash {
                    out.extend_from_slice(&h.hex());
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
    // Nearly every path and user needs no escape: copied between quotes
    // (serde_json escapes exactly these bytes, and nothing else).
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
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
    let mut h = EntriesHasher::default();
    for e in entries {
        h.push(e);
    }
    h.finish()
}

/// `entries_hash_of` one entry at a time (a manifest built as a stream).
#[derive(Default)]
pub struct EntriesHasher {
    h: Xxh3,
    buf: Vec<u8>,
}

impl EntriesHasher {
    pub fn push(&mut self, e: &Entry) {
        self.buf.clear();
        e.write_compact(&mut self.buf);
        self.h.update(&self.buf);
    }

    pub fn finish(&self) -> String {
        Hash(self.h.digest()).to_hex()
    }
}

/// Writes a manifest as the original does (orjson indent 2, no trailing
/// newline), entries in the order given, without holding the whole text.
pub fn write_json<'a, W: Write>(
    w: &mut W,
    entries: impl IntoIterator<Item = &'a Entry>,
    metadata: Option<&Metadata>,
) -> std::io::Result<()> {
    let mut out = JsonWriter::new(w);
    for e in entries {
        out.push(e)?;
    }
    out.finish(metadata).map(drop)
}

/// `write_json` one entry at a time: the same bytes.
pub struct JsonWriter<W: Write> {
    w: W,
    buf: Vec<u8>,
    first: bool,
}

impl<W: Write> JsonWriter<W> {
    pub fn new(w: W) -> Self {
        let mut buf = Vec::with_capacity(1 << 16 | 512);
        buf.extend_from_slice(b"{\n  \"entries\": {");
        JsonWriter {
            w,
            buf,
            first: true,
        }
    }

    pub fn push(&mut self, e: &Entry) -> std::io::Result<()> {
        let buf = &mut self.buf;
        buf.extend_from_slice(if self.first { b"\n    " } else { b",\n    " });
        self.first = false;
        json_str(buf, &e.path);
        buf.extend_from_slice(b": ");
        e.write_pretty(buf);
        if buf.len() >= 1 << 16 {
            self.w.write_all(buf)?;
            buf.clear();
        }
        Ok(())
    }

    /// Writes the rest; returns the writer (not flushed).
    pub fn finish(mut self, metadata: Option<&Metadata>) -> std::io::Result<W> {
        let buf = &mut self.buf;
        if self.first {
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
        self.w.write_all(buf)?;
        Ok(self.w)
    }
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
    changes: Vec<(&'a str, Option<&'a Entry>)>,
) -> Vec<&'a Entry> {
    Merged::new(base, changes).iter().collect()
}

/// [`merge_changes`] as a view, read in path order as often as needed: no
/// merged list of references is made (8 bytes a file, held through a sync).
#[derive(Clone, Debug)]
pub struct Merged<'a> {
    base: &'a [Entry],
    /// Sorted by path, one per path (`dedup_changes`).
    changes: Vec<(&'a str, Option<&'a Entry>)>,
    len: usize,
}

impl<'a> Merged<'a> {
    pub fn new(base: &'a [Entry], changes: Vec<(&'a str, Option<&'a Entry>)>) -> Merged<'a> {
        let mut m = Merged {
            base,
            changes: dedup_changes(changes),
            len: 0,
        };
        m.len = m.iter().count();
        m
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries in path order: the base's up to each change's path,
    /// the base's entry of that path left out and the change's put in.
    pub fn iter(&self) -> impl Iterator<Item = &'a Entry> + Clone + '_ {
        let (base, changes) = (self.base, &self.changes[..]);
        let (mut i, mut j) = (0, 0);
        std::iter::from_fn(move || loop {
            let Some(&(path, put)) = changes.get(j) else {
                i += 1;
                return base.get(i - 1);
            };
            if let Some(e) = base.get(i) {
                if e.path.as_bytes() < path.as_bytes() {
                    i += 1;
                    return Some(e);
                }
                if &*e.path == path {
                    i += 1;
                }
            }
            j += 1;
            if put.is_some() {
                return put;
            }
        })
    }
}

/// `merge_changes`'s changes sorted by path, one per path, decided as it
/// decides them: what a delta commit sends.
pub fn dedup_changes<'a, 'p>(
    mut changes: Vec<(&'p str, Option<&'a Entry>)>,
) -> Vec<(&'p str, Option<&'a Entry>)> {
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
    dedup
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
        // Grown by doubling while parsed: up to a third of it spare (a
        // manifest of 100 000 entries held 2 MB it never used).
        entries.shrink_to_fit();
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
        let mut entries = Vec::new();
        let parsed = TopSeed {
            sink: &mut |e| {
                entries.push(e);
                Ok(())
            },
        }
        .deserialize(de)
        .map_err(|e| ManifestError::corrupt(origin, e.to_string()))?;
        let metadata = parsed_metadata(parsed.metadata, origin)?;
        let n = entries.len();
        let mut m = Manifest::from_entries(entries);
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

/// A manifest read entry by entry (`stream_entries`): everything but its
/// entries, which went to the caller one at a time.
#[derive(Clone, Debug)]
pub struct StreamedManifest {
    pub metadata: Option<Metadata>,
    pub entry_count: u64,
    /// `entries_hash` over the entries in the file's order.
    pub stored_entries_hash: String,
    /// The entries came in strictly increasing path order (byte order), as
    /// every manifest dsg writes has them. When false (a file the original
    /// wrote, or a hostile one) the stream's checks that rely on that order
    /// were incomplete: the caller must refuse it or load it whole.
    pub sorted: bool,
}

impl StreamedManifest {
    /// `Manifest::verify_integrity` of the streamed file. The hash is the
    /// one over the file's order, which for a sorted file is also the
    /// sorted order; an unsorted file verifies only in its own order.
    pub fn verify_integrity(&self) -> Result<(), String> {
        let md = self
            .metadata
            .as_ref()
            .ok_or("no metadata to verify against")?;
        if md.entry_count != self.entry_count {
            return Err(format!(
                "entry count mismatch: metadata says {}, file has {}",
                md.entry_count, self.entry_count
            ));
        }
        if self.stored_entries_hash == md.entries_hash {
            Ok(())
        } else {
            Err(format!(
                "entries_hash mismatch: metadata says {}, entries hash to {}",
                md.entries_hash, self.stored_entries_hash
            ))
        }
    }
}

/// Reads a manifest, giving each entry to `visit` in the file's order
/// instead of holding them: a million-entry manifest parsed whole is over
/// 100 MB. `metadata` may come before or after `entries` in the file; it is
/// returned at the end, so whatever needs it is decided then.
///
/// Every entry is validated as `Manifest::from_reader` validates it, and in
/// a sorted file (`sorted`) so is the whole: duplicate paths, an entry under
/// a link, a link leading out of the project through other links. An error
/// from `visit` stops the read and is returned as the file's corruption.
pub fn stream_entries<R: std::io::Read>(
    r: R,
    origin: &Path,
    mut visit: impl FnMut(Entry) -> Result<(), String>,
) -> Result<StreamedManifest, ManifestError> {
    use serde::de::DeserializeSeed;
    let mut prev = String::new();
    let mut first = true;
    let mut sorted = true;
    // Links are few; they are all needed to follow one through another.
    let mut links: std::collections::HashMap<Box<str>, Box<str>> = Default::default();
    let mut sink = |e: Entry| -> Result<(), String> {
        if !first {
            match prev.as_bytes().cmp(e.path.as_bytes()) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => return Err("duplicate paths".into()),
                std::cmp::Ordering::Greater => sorted = false,
            }
        }
        first = false;
        prev.clear();
        prev.push_str(&e.path);
        // In path order a link comes before anything below it.
        if !links.is_empty() {
            let mut p = &*e.path;
            while let Some((parent, _)) = p.rsplit_once('/') {
                if links.contains_key(parent) {
                    return Err(format!("entry {:?} lies under the link {parent:?}", e.path));
                }
                p = parent;
            }
        }
        if let EntryKind::Link { target } = &e.kind {
            links.insert(e.path.clone(), target.clone());
        }
        visit(e)
    };
    // Buffered here for the reason `Manifest::from_reader` gives.
    let r = std::io::BufReader::with_capacity(1 << 16, r);
    let mut de = serde_json::Deserializer::from_reader(r);
    let parsed = TopSeed { sink: &mut sink }
        .deserialize(&mut de)
        .map_err(|e| ManifestError::corrupt(origin, e.to_string()))?;
    de.end()
        .map_err(|e| ManifestError::corrupt(origin, format!("trailing data: {e}")))?;
    let metadata = parsed_metadata(parsed.metadata, origin)?;
    let by_path: std::collections::HashMap<&str, &str> =
        links.iter().map(|(p, t)| (&**p, &**t)).collect();
    for (path, target) in &by_path {
        resolve_through_links(path, target, &by_path, 0).map_err(|why| {
            ManifestError::corrupt(origin, format!("link {path:?} -> {target:?}: {why}"))
        })?;
    }
    Ok(StreamedManifest {
        metadata,
        entry_count: parsed.count,
        stored_entries_hash: Hash(parsed.stored_hash).to_hex(),
        sorted,
    })
}

/// `Manifest::check_shape` for paths given one at a time in increasing
/// byte order (a sorted stream), holding only the ancestors the current
/// path may still have rather than every path.
///
/// Paths not in Unicode NFC are set aside: their normalised names sort
/// elsewhere, so `finish` checks them against all the others in a second
/// read of the manifest (needed only when there are any).
#[derive(Default)]
pub struct ShapeCheck {
    nest: Nesting,
    /// (NFC name, path) of each path not in NFC.
    renamed: Vec<(String, Box<str>)>,
}

impl ShapeCheck {
    pub fn new() -> ShapeCheck {
        ShapeCheck::default()
    }

    /// The next path. An error names the two paths that cannot both be in
    /// one tree; after one, the check is over.
    pub fn push(&mut self, path: &str) -> Result<(), String> {
        if let Some(key) = nfc_name(path) {
            self.renamed.push((key, path.into()));
            return Ok(());
        }
        self.nest.push(path, None)
    }

    /// Ends the check; `reread` opens the same manifest again, called only
    /// when a path was not in NFC.
    pub fn finish<R: std::io::Read>(mut self, reread: impl FnOnce() -> R) -> Result<(), String> {
        if self.renamed.is_empty() {
            return Ok(());
        }
        self.renamed
            .sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        for w in self.renamed.windows(2) {
            if w[0].0 == w[1].0 {
                return Err(same_after_nfc(&w[0].1, &w[1].1));
            }
        }
        // Every name, the normalised ones merged in where they sort.
        let mut nest = Nesting::default();
        let mut renamed = self.renamed.iter().peekable();
        let mut failed = None;
        let read = stream_entries(reread(), Path::new("manifest"), |e| {
            if failed.is_some() || nfc_name(&e.path).is_some() {
                return Ok(());
            }
            let mut step = || -> Result<(), String> {
                while let Some((key, path)) = renamed.next_if(|r| r.0.as_str() <= &*e.path) {
                    if key.as_str() == &*e.path {
                        return Err(same_after_nfc(&e.path, path));
                    }
                    nest.push(key, Some(path))?;
                }
                nest.push(&e.path, None)
            };
            failed = step().err();
            Ok(())
        });
        read.map_err(|e| e.message())?;
        if let Some(e) = failed {
            return Err(e);
        }
        for (key, path) in renamed {
            nest.push(key, Some(path))?;
        }
        Ok(())
    }
}

/// The NFC form of `path` when it differs from `path`.
fn nfc_name(path: &str) -> Option<String> {
    use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};
    if is_nfc_quick(path.chars()) == IsNormalized::Yes {
        return None;
    }
    let key: String = path.nfc().collect();
    (key != path).then_some(key)
}

fn same_after_nfc(a: &str, b: &str) -> String {
    format!("{a:?} and {b:?} are the same name after Unicode normalisation")
}

/// The heart of `ShapeCheck`: names in increasing byte order, none of which
/// may lie below another. Below `a` sorts `a/…`, but between the two come
/// names like `a.txt` and `a-b/c` (bytes below `/`), so an entry stays a
/// possible ancestor until a name sorts past its `a/…` range; those still
/// possible are always prefixes of the last name, kept as lengths.
#[derive(Default)]
struct Nesting {
    last: String,
    /// Length of each possible ancestor within `last`, shortest first, and
    /// its path when that differs from its name (a normalised one).
    stack: Vec<(usize, Option<Box<str>>)>,
}

impl Nesting {
    fn push(&mut self, name: &str, path: Option<&str>) -> Result<(), String> {
        let b = name.as_bytes();
        let common = self
            .last
            .bytes()
            .zip(b)
            .take_while(|(x, y)| x == *y)
            .count();
        // A kept entry's name is a prefix of `name` followed by a byte up
        // to `/`; once one is not, none longer is (they were pushed under
        // it, so they continue it with such a byte too).
        while let Some((len, _)) = self.stack.last() {
            if *len <= common && b.get(*len).is_some_and(|c| *c <= b'/') {
                break;
            }
            self.stack.pop();
        }
        if let Some((len, above)) = self.stack.iter().rev().find(|(len, _)| b[*len] == b'/') {
            let above = above.as_deref().unwrap_or(&name[..*len]);
            return Err(format!(
                "{:?} lies below {above:?}, which is a file or a link, not a directory",
                path.unwrap_or(name)
            ));
        }
        self.stack.push((b.len(), path.map(Box::from)));
        self.last.clear();
        self.last.push_str(name);
        Ok(())
    }
}

fn parsed_metadata(v: Option<Value>, origin: &Path) -> Result<Option<Metadata>, ManifestError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(m) => Metadata::from_value(&m)
            .map(Some)
            .map_err(|msg| ManifestError::corrupt(origin, msg)),
    }
}

/// Where the parser puts each entry, in the file's order; an error stops
/// the parse (and names the entry's place in the file).
type Sink<'s> = &'s mut dyn FnMut(Entry) -> Result<(), String>;

/// A manifest file without its entries, which went to a `Sink`.
struct Parsed {
    metadata: Option<Value>,
    stored_hash: u64,
    count: u64,
}

struct TopSeed<'s> {
    sink: Sink<'s>,
}

impl<'de> serde::de::DeserializeSeed<'de> for TopSeed<'_> {
    type Value = Parsed;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Parsed, D::Error> {
        d.deserialize_map(TopVisitor { sink: self.sink })
    }
}

struct TopVisitor<'s> {
    sink: Sink<'s>,
}

impl<'de> serde::de::Visitor<'de> for TopVisitor<'_> {
    type Value = Parsed;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a manifest object with \"entries\" and \"metadata\"")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Parsed, A::Error> {
        use serde::de::Error;
        let mut out = Parsed {
            metadata: None,
            stored_hash: Xxh3::new().digest(),
            count: 0,
        };
        let (mut seen_entries, mut seen_metadata) = (false, false);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            // Entries go to the sink as they are read: a second "entries"
            // object could not replace the first, so neither key may repeat
            // (no writer repeats them).
            match &*key {
                "entries" => {
                    if std::mem::replace(&mut seen_entries, true) {
                        return Err(A::Error::custom("\"entries\" appears twice"));
                    }
                    let (count, h) = map.next_value_seed(EntriesSeed {
                        sink: &mut *self.sink,
                    })?;
                    out.count = count;
                    out.stored_hash = h;
                }
                "metadata" => {
                    if std::mem::replace(&mut seen_metadata, true) {
                        return Err(A::Error::custom("\"metadata\" appears twice"));
                    }
                    out.metadata = Some(map.next_value::<Value>()?)
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

struct EntriesSeed<'s> {
    sink: Sink<'s>,
}

impl<'de> serde::de::DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = (u64, u64);
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(EntriesVisitor { sink: self.sink })
    }
}

struct EntriesVisitor<'s> {
    sink: Sink<'s>,
}

impl<'de> serde::de::Visitor<'de> for EntriesVisitor<'_> {
    /// The number of entries and their hash in the file's order.
    type Value = (u64, u64);
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("\"entries\" as an object keyed by path")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let mut users: Vec<Arc<str>> = Vec::new();
        let mut h = Xxh3::new();
        let mut buf = Vec::with_capacity(256);
        let mut count = 0u64;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let raw: RawEntry = map.next_value()?;
            let e = raw
                .into_entry(&key, &mut users)
                .map_err(|m| A::Error::custom(format!("entry {key:?}: {m}")))?;
            buf.clear();
            e.write_compact(&mut buf);
            h.update(&buf);
            count += 1;
            (self.sink)(e).map_err(A::Error::custom)?;
        }
        Ok((count, h.digest()))
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

    struct W<'a>(&'a mut Vec<u8>);
    impl W<'_> {
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

    /// Reads and hashes at once, so the file is never held whole. Fields
    /// are a few bytes each: they are parsed in place from a 64 KiB
    /// buffer, and the bytes are hashed a buffer at a time as they are
    /// consumed (a `read_exact` and an `update` per field cost more than
    /// the parse).
    struct R<T: std::io::Read> {
        r: T,
        h: Xxh3,
        buf: Vec<u8>,
        /// Consumed (and hashed) up to here.
        pos: usize,
        /// Bytes of `buf` already hashed (a prefix of the consumed ones).
        hashed: usize,
    }
    impl<T: std::io::Read> R<T> {
        fn new(r: T) -> Self {
            R {
                r,
                h: Xxh3::new(),
                buf: Vec::with_capacity(crate::piece::PIECE),
                pos: 0,
                hashed: 0,
            }
        }

        /// At least `n` unconsumed bytes in the buffer; false at the end.
        fn fill(&mut self, n: usize) -> bool {
            while self.buf.len() - self.pos < n {
                self.h.update(&self.buf[self.hashed..self.pos]);
                self.buf.drain(..self.pos);
                self.pos = 0;
                self.hashed = 0;
                // A read error ends the stream like its end: what is
                // missing fails the checksum.
                let got = crate::piece::read_piece(&mut self.r, &mut self.buf, n).unwrap_or(0);
                if got == 0 {
                    return false;
                }
            }
            true
        }

        fn take(&mut self, n: usize) -> Option<&[u8]> {
            if n > (1 << 30) || !self.fill(n) {
                return None;
            }
            let at = self.pos;
            self.pos += n;
            Some(&self.buf[at..at + n])
        }

        /// The hash of everything taken so far.
        fn digest(&mut self) -> u64 {
            self.h.update(&self.buf[self.hashed..self.pos]);
            self.hashed = self.pos;
            self.h.digest()
        }

        /// The trailing checksum: the next 8 bytes (not hashed), and
        /// nothing after them.
        fn trailer(&mut self) -> Option<u64> {
            self.digest();
            if !self.fill(8) {
                return None;
            }
            let sum = u64::from_le_bytes(self.buf[self.pos..self.pos + 8].try_into().ok()?);
            self.pos += 8;
            self.hashed = self.pos;
            (!self.fill(1)).then_some(sum)
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
        let mut out = Vec::with_capacity(64 + m.entries.len() * 64);
        write_parts(
            &mut out,
            m.entries.iter(),
            m.entries.len(),
            m.metadata.as_ref(),
            m.stored_entries_hash.as_deref(),
            tag,
        )
        .expect("a Vec takes every write");
        out
    }

    /// `encode` of a manifest made of borrowed entries (sorted by path),
    /// written in this order: its stored entries hash is the metadata's.
    pub fn encode_borrowed(entries: &[&Entry], md: &Metadata, tag: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + entries.len() * 64);
        write_borrowed(&mut out, entries.iter().copied(), entries.len(), md, tag)
            .expect("a Vec takes every write");
        out
    }

    /// `encode_borrowed` streamed to `out` (a file), one piece at a time,
    /// of the `count` entries `entries` gives (it is read twice).
    pub fn write_borrowed<'e>(
        out: impl std::io::Write,
        entries: impl Iterator<Item = &'e Entry> + Clone,
        count: usize,
        md: &Metadata,
        tag: u64,
    ) -> std::io::Result<()> {
        write_parts(out, entries, count, Some(md), Some(&md.entries_hash), tag)
    }

    /// `encode` streamed to `out`.
    pub fn write_manifest(out: impl std::io::Write, m: &Manifest, tag: u64) -> std::io::Result<()> {
        write_parts(
            out,
            m.entries.iter(),
            m.entries.len(),
            m.metadata.as_ref(),
            m.stored_entries_hash.as_deref(),
            tag,
        )
    }

    fn write_parts<'e>(
        out: impl std::io::Write,
        entries: impl Iterator<Item = &'e Entry> + Clone,
        count: usize,
        metadata: Option<&Metadata>,
        stored_entries_hash: Option<&str>,
        tag: u64,
    ) -> std::io::Result<()> {
        let mut cw = crate::hash::ChecksummedWriter::new(out);
        let mut w = W(cw.buf());
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
        // The users first, then each entry with its user's index, looked
        // up again (a project has few users; an index kept per entry would
        // be 4 bytes a file more at a sync's peak).
        let mut users: Vec<&Arc<str>> = Vec::new();
        let user_of = |users: &[&Arc<str>], e: &Entry| {
            users
                .iter()
                .position(|u| Arc::ptr_eq(u, &e.user) || **u == e.user)
        };
        for e in entries.clone() {
            if user_of(&users, e).is_none() {
                users.push(&e.user);
            }
        }
        w.u32(users.len() as u32);
        for u in &users {
            w.bytes(u.as_bytes());
        }
        w.u64(count as u64);
        for e in entries {
            let ui = user_of(&users, e).expect("listed above") as u32;
            let mut w = W(cw.buf());
            w.bytes(e.path.as_bytes());
            w.u32(ui);
            put_kind(&mut w, &e.kind);
            cw.spill()?;
        }
        cw.finish().map(drop)
    }

    fn put_kind(w: &mut W, kind: &EntryKind) {
        match kind {
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

    fn get_kind<T: std::io::Read>(r: &mut R<T>) -> Option<EntryKind> {
        Some(match r.u8()? {
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
        })
    }

    /// Decodes if intact and made from a JSON file hashing to `tag`.
    pub fn decode(b: &[u8], tag: u64) -> Option<Manifest> {
        decode_from(b, tag)
    }

    /// Decodes from a reader (a file), checking the trailing checksum.
    pub fn decode_from(reader: impl std::io::Read, tag: u64) -> Option<Manifest> {
        decode_each(reader, tag, |_, _| {})
    }

    /// `decode_from` that gives each entry to `each` (with its index) as
    /// soon as it is read, in path order, so a caller can consume another
    /// path-ordered sequence alongside. `each` sees entries of a copy that
    /// may still turn out damaged (the checksum is checked at the end):
    /// when this returns `None`, what `each` made of them is to be thrown
    /// away. Nothing is given when the header is wrong (another tag).
    pub fn decode_each(
        reader: impl std::io::Read,
        tag: u64,
        mut each: impl FnMut(usize, &Entry),
    ) -> Option<Manifest> {
        let mut r = R::new(reader);
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
            let kind = get_kind(&mut r)?;
            if entries
                .last()
                .is_some_and(|l: &Entry| l.path.as_bytes() >= path.as_bytes())
            {
                return None;
            }
            entries.push(Entry { path, user, kind });
            each(entries.len() - 1, &entries[entries.len() - 1]);
        }
        let digest = r.digest();
        if r.trailer()? != digest {
            return None;
        }
        Some(Manifest {
            entries,
            metadata,
            stored_entries_hash,
        })
    }

    const STREAM_MAGIC: &[u8; 8] = b"DSGMST01";

    /// The binary copy written in one pass over a sorted stream of entries
    /// (the repository's copy of its head, written while the uploaded
    /// manifest is checked): users are defined where first used, and the
    /// count, metadata and tag come last, when they are known.
    pub struct StreamWriter<O: std::io::Write> {
        cw: crate::hash::ChecksummedWriter<O>,
        users: Vec<Arc<str>>,
        count: u64,
    }

    impl<O: std::io::Write> StreamWriter<O> {
        pub fn new(out: O) -> Self {
            let mut cw = crate::hash::ChecksummedWriter::new(out);
            cw.buf().extend_from_slice(STREAM_MAGIC);
            StreamWriter {
                cw,
                users: Vec::new(),
                count: 0,
            }
        }

        /// The next entry; entries must come in increasing path order
        /// (the reader refuses anything else).
        pub fn push(&mut self, e: &Entry) -> std::io::Result<()> {
            let known = self
                .users
                .iter()
                .position(|u| Arc::ptr_eq(u, &e.user) || **u == *e.user);
            let mut w = W(self.cw.buf());
            w.u8(1);
            w.bytes(e.path.as_bytes());
            match known {
                Some(i) => w.u32(i as u32),
                None => {
                    w.u32(self.users.len() as u32);
                    w.bytes(e.user.as_bytes());
                    self.users.push(e.user.clone());
                }
            }
            put_kind(&mut w, &e.kind);
            self.count += 1;
            self.cw.spill()
        }

        /// Ends the copy of a JSON file hashing to `tag`.
        pub fn finish(
            mut self,
            metadata: Option<&Metadata>,
            stored_entries_hash: &str,
            tag: u64,
        ) -> std::io::Result<O> {
            let mut w = W(self.cw.buf());
            w.u8(0);
            w.u64(self.count);
            match metadata {
                Some(md) => w.bytes(&serde_json::to_vec(&md.to_value()).expect("json")),
                None => w.u32(u32::MAX),
            }
            w.bytes(stored_entries_hash.as_bytes());
            w.u64(tag);
            self.cw.finish()
        }
    }

    /// Why a `StreamWriter` copy could not be read.
    #[derive(Debug, PartialEq, Eq)]
    pub enum StreamError {
        /// Not such a copy at all: nothing was given to `visit`.
        NotACopy,
        /// Damaged, out of order, or made from another JSON file than the
        /// one hashing to the tag; `visit` may have had entries.
        Unusable(String),
        /// `visit` refused an entry.
        Visit(String),
    }

    /// Reads a `StreamWriter` copy, giving each entry to `visit` in order;
    /// the summary comes only once the whole file proved intact and made
    /// from the JSON file hashing to `tag`.
    pub fn read_stream<T: std::io::Read>(
        reader: T,
        tag: u64,
        mut visit: impl FnMut(Entry) -> Result<(), String>,
    ) -> Result<StreamedManifest, StreamError> {
        let bad = |what: &str| StreamError::Unusable(what.to_string());
        let mut r = R::new(reader);
        if r.take(8) != Some(&STREAM_MAGIC[..]) {
            return Err(StreamError::NotACopy);
        }
        let mut users: Vec<Arc<str>> = Vec::new();
        let mut prev: Option<Box<str>> = None;
        let mut count = 0u64;
        loop {
            match r.u8().ok_or_else(|| bad("truncated"))? {
                0 => break,
                1 => {}
                _ => return Err(bad("bad record")),
            }
            let path: Box<str> = r.str().ok_or_else(|| bad("bad path"))?.into();
            if prev
                .as_deref()
                .is_some_and(|p| p.as_bytes() >= path.as_bytes())
            {
                return Err(bad("entries out of order"));
            }
            let ui = r.u32().ok_or_else(|| bad("truncated"))? as usize;
            if ui == users.len() {
                let u: Arc<str> = r.str().ok_or_else(|| bad("bad user"))?.into();
                users.push(u);
            }
            let user = users.get(ui).ok_or_else(|| bad("bad user index"))?.clone();
            let kind = get_kind(&mut r).ok_or_else(|| bad("bad entry"))?;
            prev = Some(path.clone());
            count += 1;
            visit(Entry { path, user, kind }).map_err(StreamError::Visit)?;
        }
        let stored = r.u64().ok_or_else(|| bad("truncated"))?;
        let n = r.u32().ok_or_else(|| bad("truncated"))?;
        let metadata = if n == u32::MAX {
            None
        } else {
            let raw = r.take(n as usize).ok_or_else(|| bad("truncated"))?;
            let v: Value = serde_json::from_slice(raw).map_err(|_| bad("bad metadata"))?;
            Some(Metadata::from_value(&v).map_err(|_| bad("bad metadata"))?)
        };
        let stored_entries_hash = r.str().ok_or_else(|| bad("truncated"))?.to_string();
        let made_from = r.u64().ok_or_else(|| bad("truncated"))?;
        let digest = r.digest();
        if r.trailer() != Some(digest) {
            return Err(bad("checksum mismatch"));
        }
        if stored != count {
            return Err(bad("entry count mismatch"));
        }
        if made_from != tag {
            return Err(bad("made from another manifest"));
        }
        Ok(StreamedManifest {
            metadata,
            entry_count: count,
            stored_entries_hash,
            sorted: true,
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

        fn streamed(m: &Manifest, tag: u64) -> Vec<u8> {
            let mut w = StreamWriter::new(Vec::new());
            for e in m.entries() {
                w.push(e).unwrap();
            }
            let h = m.stored_entries_hash.clone().unwrap_or_default();
            w.finish(m.metadata.as_ref(), &h, tag).unwrap()
        }

        #[test]
        fn stream_copy_round_trip_and_damage() {
            let dir = tempfile::tempdir().unwrap();
            let text = std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../tests/fixtures/original-dsg/repo/.dsg/last-sync.json"),
            )
            .unwrap();
            // A sealed one the original wrote, and one with two users and a
            // link.
            let mut ms = vec![Manifest::from_json_bytes(&text, dir.path()).unwrap()];
            let e = |p: &str, u: &str| Entry {
                path: p.into(),
                user: u.into(),
                kind: EntryKind::File {
                    size: 3,
                    mtime: Mtime::parse("odd"),
                    hash: None,
                },
            };
            ms.push(Manifest::from_entries(vec![
                e("a", "u"),
                e("b/c", "v"),
                Entry {
                    path: "l".into(),
                    user: "u".into(),
                    kind: EntryKind::Link { target: "a".into() },
                },
            ]));
            for m in &ms {
                let b = streamed(m, 7);
                let mut got = Vec::new();
                let s = read_stream(&b[..], 7, |e| {
                    got.push(e);
                    Ok(())
                })
                .unwrap();
                assert_eq!(got, m.entries());
                assert_eq!(s.metadata, m.metadata);
                assert_eq!(s.entry_count, m.len() as u64);
                assert_eq!(
                    Some(s.stored_entries_hash),
                    m.stored_entries_hash.clone().or(Some(String::new()))
                );
                assert!(matches!(
                    read_stream(&b[..], 8, |_| Ok(())),
                    Err(StreamError::Unusable(_))
                ));
                for i in [0, 3, 9, b.len() / 2, b.len() - 9, b.len() - 1] {
                    let mut bad = b.clone();
                    bad[i] ^= 0x40;
                    assert!(read_stream(&bad[..], 7, |_| Ok(())).is_err(), "flip at {i}");
                }
                assert!(read_stream(&b[..b.len() - 1], 7, |_| Ok(())).is_err());
                assert_eq!(
                    read_stream(&encode(m, 7)[..], 7, |_| Ok(())).unwrap_err(),
                    StreamError::NotACopy
                );
            }
            // Written out of order: refused on reading.
            let mut w = StreamWriter::new(Vec::new());
            w.push(&e("b", "u")).unwrap();
            w.push(&e("a", "u")).unwrap();
            let b = w.finish(None, "", 1).unwrap();
            assert!(matches!(
                read_stream(&b[..], 1, |_| Ok(())),
                Err(StreamError::Unusable(_))
            ));
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

#[cfg(test)]
mod stream_tests {
    use super::*;
    use proptest::prelude::*;

    fn file(path: &str) -> Entry {
        Entry {
            path: path.into(),
            user: "u".into(),
            kind: EntryKind::File {
                size: path.len() as u64,
                mtime: Mtime::from_unix(1_700_000_000, 0),
                hash: Some(Hash::of_bytes(path.as_bytes())),
            },
        }
    }

    fn sealed(paths: &[&str]) -> Manifest {
        let mut m = Manifest::from_entries(paths.iter().map(|p| file(p)).collect());
        m.seal("s3", "u", "m", "sync", None);
        m
    }

    fn stream(json: &[u8]) -> Result<(StreamedManifest, Vec<Entry>), String> {
        let mut seen = Vec::new();
        stream_entries(json, Path::new("t"), |e| {
            seen.push(e);
            Ok(())
        })
        .map(|s| (s, seen))
        .map_err(|e| e.message())
    }

    /// The streamed shape check of a sorted manifest's paths.
    fn shape(m: &Manifest) -> Result<(), String> {
        let mut c = ShapeCheck::new();
        for e in m.entries() {
            c.push(&e.path)?;
        }
        let json = m.to_json_bytes();
        c.finish(|| &json[..])
    }

    #[test]
    fn metadata_first_or_last_streams_the_same() {
        let m = sealed(&["a", "b/c", "b/d"]);
        let last = m.to_json_bytes();
        let md = serde_json::to_string(&m.metadata.as_ref().unwrap().to_value()).unwrap();
        let mut entries = Vec::new();
        write_json(&mut entries, m.entries(), None).unwrap();
        let entries = String::from_utf8(entries).unwrap();
        let body = &entries
            [entries.find("\"entries\"").unwrap()..entries.find(",\n  \"metadata\"").unwrap()];
        let first = format!("{{\"metadata\": {md}, {body}}}");
        for json in [&last[..], first.as_bytes()] {
            let (s, seen) = stream(json).unwrap();
            assert_eq!(s.metadata, m.metadata);
            assert_eq!(seen, m.entries());
            assert_eq!(s.entry_count, 3);
            assert!(s.sorted);
            s.verify_integrity().unwrap();
        }
    }

    #[test]
    fn integrity_mismatches_are_found() {
        let mut m = sealed(&["a", "b"]);
        m.metadata.as_mut().unwrap().entries_hash = "0000000000000000".into();
        let e = stream(&m.to_json_bytes())
            .unwrap()
            .0
            .verify_integrity()
            .unwrap_err();
        assert!(e.contains("entries_hash mismatch"), "{e}");
        let mut m = sealed(&["a", "b"]);
        m.metadata.as_mut().unwrap().entry_count = 3;
        let e = stream(&m.to_json_bytes())
            .unwrap()
            .0
            .verify_integrity()
            .unwrap_err();
        assert!(e.contains("entry count mismatch"), "{e}");
        let m = Manifest::from_entries(vec![file("a")]);
        let e = stream(&m.to_json_bytes())
            .unwrap()
            .0
            .verify_integrity()
            .unwrap_err();
        assert!(e.contains("no metadata"), "{e}");
    }

    #[test]
    fn unsorted_files_are_flagged_and_duplicates_refused() {
        let m = sealed(&["a", "b"]);
        let md = m.metadata.as_ref();
        let written = |entries: &[Entry]| {
            let mut out = Vec::new();
            write_json(&mut out, entries, md).unwrap();
            out
        };
        let (s, seen) = stream(&written(&[file("b"), file("a")])).unwrap();
        assert!(!s.sorted);
        assert_eq!(&*seen[0].path, "b");
        // Hashed over a, b: in the file's own order it does not verify.
        assert!(s.verify_integrity().is_err());
        let e = stream(&written(&[file("a"), file("a"), file("b")])).unwrap_err();
        assert!(e.contains("duplicate paths"), "{e}");
        let json = String::from_utf8(m.to_json_bytes()).unwrap();
        let twice = json.replacen("\"metadata\"", "\"entries\": {}, \"metadata\"", 1);
        let e = stream(twice.as_bytes()).unwrap_err();
        assert!(e.contains("appears twice"), "{e}");
    }

    #[test]
    fn entries_under_links_and_links_out_are_refused() {
        let link = |p: &str, t: &str| Entry {
            path: p.into(),
            user: "u".into(),
            kind: EntryKind::Link { target: t.into() },
        };
        let m = Manifest::from_entries(vec![link("l", "a"), file("l/x"), file("a")]);
        let e = stream(&m.to_json_bytes()).unwrap_err();
        assert!(e.contains("under the link"), "{e}");
        let m = Manifest::from_entries(vec![link("d/up", "../.."), file("a")]);
        assert!(stream(&m.to_json_bytes()).is_err());
        let m = Manifest::from_entries(vec![link("d/up", ".."), link("d2", "d/up/..")]);
        let e = stream(&m.to_json_bytes()).unwrap_err();
        assert!(e.contains("leaves the project"), "{e}");
    }

    #[test]
    fn shape_errors_name_both_paths() {
        let e = shape(&sealed(&["in/a.txt", "in/a.txt.bak", "in/a.txt/x/y"])).unwrap_err();
        assert!(
            e.contains("\"in/a.txt/x/y\" lies below \"in/a.txt\""),
            "{e}"
        );
        let e = shape(&sealed(&["a", "a!", "a-b/c", "a.txt", "a/b"])).unwrap_err();
        assert!(e.contains("\"a/b\" lies below \"a\""), "{e}");
        shape(&sealed(&["a/b", "a/c/d", "ab", "a.txt", "a0/x", "a-/b"])).unwrap();
        let e = shape(&sealed(&["caf\u{e9}", "cafe\u{301}"])).unwrap_err();
        assert!(e.contains("normalisation"), "{e}");
        let e = shape(&sealed(&["cafe\u{301}", "caf\u{e9}/x"])).unwrap_err();
        assert!(e.contains("below"), "{e}");
        let e = shape(&sealed(&["caf\u{e9}", "cafe\u{301}/x"])).unwrap_err();
        assert!(e.contains("below"), "{e}");
        shape(&sealed(&["cafe\u{301}/x", "cafe/x", "caf\u{e9}.txt"])).unwrap();
    }

    proptest! {
        /// Same verdict as the check over the whole manifest, names with
        /// the bytes around `/` and a name that NFC changes.
        #[test]
        fn streamed_shape_equals_check_shape(
            paths in proptest::collection::btree_set(
                "(a|b|\\.|-|e\u{301}|\u{e9}){1,3}(/(a|b|\\.|-|e\u{301}|\u{e9}){1,3}){0,2}",
                0..12,
            ),
        ) {
            let paths: Vec<&str> = paths
                .iter()
                .map(|p| p.as_str())
                .filter(|p| check_relpath(p).is_ok())
                .collect();
            let m = sealed(&paths);
            prop_assert_eq!(shape(&m).is_ok(), m.check_shape().is_ok(), "{:?}", paths);
        }
    }
}

#[cfg(test)]
mod writer_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The hand-written fast paths write what serde_json and the
        /// format machinery wrote before them (the bytes are hashed: one
        /// byte off and every manifest's entries_hash changes).
        #[test]
        fn fast_writers_equal_the_format_machinery(
            // At most one byte that may need escaping, so each is tried
            // alone (any second one would send the string the slow way).
            s in "[a/ \u{e9}\u{20ac}\u{1f600}]{0,6}[\"\\\\\u{0}-\u{1f}\u{7f}a]?[a/ \u{e9}]{0,6}",
            secs in -70_000_000_000i64..300_000_000_000,
            off in -6500i16..6500,
            h: u64,
            size: u64,
        ) {
            let mut out = Vec::new();
            json_str(&mut out, &s);
            prop_assert_eq!(&out, &serde_json::to_vec(&s).unwrap());

            let m = Mtime::Fixed { utc_secs: secs, offset_min: off };
            let mut out = Vec::new();
            m.write_json(&mut out);
            prop_assert_eq!(out, serde_json::to_vec(&m.to_string()).unwrap());
            let local = secs + off as i64 * 60;
            let (y, mo, d) = civil_from_days(local.div_euclid(86400));
            let t = local.rem_euclid(86400);
            let o = off.unsigned_abs();
            let slow = format!(
                "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}{}{:02}:{:02}",
                t / 3600, t % 3600 / 60, t % 60, if off < 0 { '-' } else { '+' }, o / 60, o % 60
            );
            prop_assert_eq!(m.to_string(), slow);

            prop_assert_eq!(Hash(h).hex().to_vec(), format!("{:016x}", h).into_bytes());
            let e = Entry {
                path: s.clone().into(),
                user: "u\"ser".into(),
                kind: EntryKind::File { size, mtime: m, hash: Some(Hash(h)) },
            };
            let mut out = Vec::new();
            e.write_compact(&mut out);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(v["filesize"].as_u64(), Some(size));
            prop_assert_eq!(v["path"].as_str(), Some(s.as_str()));
        }
    }
}
