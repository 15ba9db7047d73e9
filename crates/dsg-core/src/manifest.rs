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

use std::fmt::Write as _;
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

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {source}\nhint: check the file exists and is readable")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {path} is corrupt: {msg}\nhint: restore it from the repository or a backup; dsg never treats a damaged manifest as empty")]
    Corrupt { path: PathBuf, msg: String },
}

impl ManifestError {
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
    Fixed { utc_secs: i64, offset_min: i16 },
    Raw(Box<str>),
}

impl Mtime {
    pub fn from_unix(secs: i64, nanos: u32) -> Mtime {
        Mtime::parse(&timefmt::mtime_string(secs, nanos))
    }

    pub fn parse(s: &str) -> Mtime {
        if let Ok(dt) = chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%:z") {
            let m = Mtime::Fixed {
                utc_secs: dt.timestamp(),
                offset_min: (dt.offset().local_minus_utc() / 60) as i16,
            };
            if m.to_string() == s {
                return m;
            }
        }
        Mtime::Raw(s.into())
    }

    pub fn unix_secs(&self) -> Option<i64> {
        match self {
            Mtime::Fixed { utc_secs, .. } => Some(*utc_secs),
            Mtime::Raw(s) => timefmt::parse(s).map(|d| d.timestamp()),
        }
    }
}

impl std::fmt::Display for Mtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mtime::Fixed {
                utc_secs,
                offset_min,
            } => {
                let off = chrono::FixedOffset::east_opt(*offset_min as i32 * 60)
                    .ok_or(std::fmt::Error)?;
                let dt = chrono::DateTime::from_timestamp(*utc_secs, 0)
                    .ok_or(std::fmt::Error)?
                    .with_timezone(&off);
                write!(f, "{}", dt.format("%Y-%m-%dT%H:%M:%S%:z"))
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
                _ => s1 == s2 && m1.to_string() == m2.to_string(),
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
        let mut h = Xxh3::new();
        let mut buf = Vec::with_capacity(256);
        for e in &self.entries {
            buf.clear();
            e.write_compact(&mut buf);
            h.update(&buf);
        }
        Hash(h.digest()).to_hex()
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
        let prev_hash = prev.and_then(|p| p.snapshot_hash.clone());
        let hash = snapshot_hash(&entries_hash, Some(message), None, prev_hash.as_deref());
        self.metadata = Some(Metadata {
            manifest_version: MANIFEST_VERSION.into(),
            snapshot_id: id.into(),
            created_at: timefmt::now_la(),
            entry_count: self.entries.len() as u64,
            entries_hash,
            created_by: Some(created_by.into()),
            snapshot_message: Some(message.into()),
            snapshot_previous: prev.map(|p| p.snapshot_id.clone()),
            snapshot_hash: Some(hash),
            snapshot_notes: Some(notes.into()),
            project_config: None,
        });
        self.stored_entries_hash = None;
    }

    /// Serializes as the original does (orjson indent 2, no trailing newline),
    /// entries sorted by path.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.entries.len() * 220);
        out.extend_from_slice(b"{\n  \"entries\": {");
        for (i, e) in self.entries.iter().enumerate() {
            out.extend_from_slice(if i == 0 { b"\n    " } else { b",\n    " });
            json_str(&mut out, &e.path);
            out.extend_from_slice(b": ");
            e.write_pretty(&mut out);
        }
        if self.entries.is_empty() {
            out.extend_from_slice(b"}");
        } else {
            out.extend_from_slice(b"\n  }");
        }
        out.extend_from_slice(b",\n  \"metadata\": ");
        match &self.metadata {
            Some(md) => {
                let s = serde_json::to_string_pretty(&md.to_value()).expect("json");
                // Nest the object one level deeper.
                out.extend_from_slice(s.replace('\n', "\n  ").as_bytes());
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"\n}");
        out
    }

    /// Parses manifest bytes. `origin` names the file in errors.
    pub fn from_json_bytes(bytes: &[u8], origin: &Path) -> Result<Manifest, ManifestError> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| ManifestError::corrupt(origin, format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| ManifestError::corrupt(origin, "top level is not a JSON object"))?;
        let mut users: Vec<Arc<str>> = Vec::new();
        let mut intern = |u: &str| -> Arc<str> {
            if let Some(a) = users.iter().find(|a| &***a == u) {
                return a.clone();
            }
            let a: Arc<str> = u.into();
            users.push(a.clone());
            a
        };
        let mut entries = Vec::new();
        let mut stored_hash = Xxh3::new();
        let mut buf = Vec::with_capacity(256);
        match obj.get("entries") {
            None => {}
            Some(Value::Object(map)) => {
                entries.reserve(map.len());
                for (key, val) in map {
                    let e = parse_entry(key, val, &mut intern).map_err(|m| {
                        ManifestError::corrupt(origin, format!("entry {key:?}: {m}"))
                    })?;
                    buf.clear();
                    e.write_compact(&mut buf);
                    stored_hash.update(&buf);
                    entries.push(e);
                }
            }
            Some(other) => {
                return Err(ManifestError::corrupt(
                    origin,
                    format!(
                        "\"entries\" must be an object keyed by path, got {}",
                        type_name(other)
                    ),
                ))
            }
        }
        let metadata = match obj.get("metadata") {
            None | Some(Value::Null) => None,
            Some(m) => {
                Some(Metadata::from_value(m).map_err(|msg| ManifestError::corrupt(origin, msg))?)
            }
        };
        let n = entries.len();
        let mut m = Manifest::from_entries(entries);
        if m.entries.len() != n {
            return Err(ManifestError::corrupt(origin, "duplicate paths"));
        }
        m.metadata = metadata;
        m.stored_entries_hash = Some(Hash(stored_hash.digest()).to_hex());
        Ok(m)
    }

    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let bytes = std::fs::read(path).map_err(|e| ManifestError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Manifest::from_json_bytes(&bytes, path)
    }

    /// Loads a manifest that may legitimately be absent; any other failure is an error.
    pub fn load_optional(path: &Path) -> Result<Option<Manifest>, ManifestError> {
        match std::fs::read(path) {
            Ok(bytes) => Manifest::from_json_bytes(&bytes, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ManifestError::Io {
                path: path.to_path_buf(),
                source: e,
            }),
        }
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

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

fn parse_entry(
    key: &str,
    v: &Value,
    intern: &mut impl FnMut(&str) -> Arc<str>,
) -> Result<Entry, String> {
    check_relpath(key).map_err(|e| e.to_string())?;
    let o = v.as_object().ok_or("not an object")?;
    let user = match o.get("user") {
        None | Some(Value::Null) => intern(""),
        Some(Value::String(s)) => intern(s),
        Some(other) => return Err(format!("user must be a string, got {}", type_name(other))),
    };
    let get_str = |k: &str| -> Result<&str, String> {
        match o.get(k) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(format!("{k} must be a string, got {}", type_name(other))),
            None => Err(format!("{k} is missing")),
        }
    };
    let kind = match get_str("type")? {
        "file" => {
            let size = o
                .get("filesize")
                .and_then(lax_u64)
                .ok_or("filesize is missing or not a size")?;
            let mtime = Mtime::parse(get_str("mtime")?);
            let hash = match o.get("hash") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.is_empty() => None,
                Some(Value::String(s)) => {
                    Some(Hash::parse(s).ok_or_else(|| format!("hash {s:?} is not 16 hex digits"))?)
                }
                Some(other) => {
                    return Err(format!("hash must be a string, got {}", type_name(other)))
                }
            };
            EntryKind::File { size, mtime, hash }
        }
        "link" => {
            let target = get_str("reference")?;
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

/// Reads an archived manifest: LZ4 frame (what we and the original write) or gzip.
pub fn read_archive(path: &Path) -> Result<Manifest, ManifestError> {
    let raw = std::fs::read(path).map_err(|e| ManifestError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let name = path.to_string_lossy();
    let json = if name.ends_with(".lz4") {
        let mut d = lz4_flex::frame::FrameDecoder::new(&raw[..]);
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut out)
            .map_err(|e| ManifestError::corrupt(path, format!("bad LZ4 frame: {e}")))?;
        out
    } else if name.ends_with(".gz") {
        let mut d = flate2::read::GzDecoder::new(&raw[..]);
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

/// Human-readable description of a manifest for error messages.
pub fn describe(m: &Manifest) -> String {
    let mut s = String::new();
    match &m.metadata {
        Some(md) => {
            let _ = write!(s, "{} ({} entries)", md.snapshot_id, m.len());
        }
        None => {
            let _ = write!(s, "no snapshot ({} entries)", m.len());
        }
    }
    s
}
