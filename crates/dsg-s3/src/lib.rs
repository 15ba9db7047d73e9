//! dsg's S3 client: the few object-store calls a dsg repository needs,
//! signed with rusty-s3 (SigV4, sans-IO) and sent with ureq (blocking).
//!
//! Blocking on purpose: the repository agent is synchronous, and the
//! parallelism an object store wants (many small PUTs in flight) is a
//! bounded pool of threads sharing one `Store` (its HTTP agent pools
//! connections), not an async runtime in a synchronous program.
//!
//! What the repository's safety rests on is the server's conditional
//! writes (`If-None-Match: *`, `If-Match: <etag>`); `probe_conditional`
//! checks that a server honours them before a repository is made on it.

mod creds;
mod error;

use std::io::{Read, Write};
use std::time::Duration;

use rusty_s3::{Bucket, S3Action, UrlStyle};

pub use creds::{credentials, Credentials};
pub use error::S3Error;

/// How long a signed URL stays valid: a request is sent right after it is
/// signed, but a large part may take minutes to upload.
const SIGN_FOR: Duration = Duration::from_secs(3600);

/// Where a repository lives: an endpoint, a bucket and a key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// `http(s)://host:port`, path-style addressing.
    pub endpoint: String,
    pub bucket: String,
    /// Keys start with `<prefix>/` (no leading or trailing slash; may be
    /// empty: the bucket's root).
    pub prefix: String,
    pub region: String,
}

impl Location {
    /// `s3://bucket/prefix at endpoint`, for messages.
    pub fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{} at {}", self.bucket, self.endpoint)
        } else {
            format!("s3://{}/{} at {}", self.bucket, self.prefix, self.endpoint)
        }
    }
}

/// A precondition on a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    None,
    /// Only if no object has the key (`If-None-Match: *`).
    Absent,
    /// Only if the object's ETag is this (`If-Match`).
    Etag(String),
}

/// What `head` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: String,
}

/// A part an unfinished multipart upload holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// 1-based.
    pub number: u16,
    pub size: u64,
    /// As the server gives it (quoted).
    pub etag: String,
}

impl Part {
    /// Whether this stored part holds exactly `body`: same size, and an
    /// ETag that is the plain MD5 of `body` (32 hex digits; an ETag of
    /// another form, e.g. with a `-`, proves nothing and does not match).
    pub fn holds(&self, body: &[u8]) -> bool {
        use md5::Digest;
        let tag = self.etag.trim_matches('"');
        if self.size != body.len() as u64
            || tag.len() != 32
            || !tag.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return false;
        }
        let sum = md5::Md5::digest(body);
        let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
        tag.eq_ignore_ascii_case(&hex)
    }
}

/// A listing: keys with sizes, and the common prefixes of a delimited one.
type Listed = (Vec<(String, u64)>, Vec<String>);

/// One object-store repository location with its credentials and HTTP
/// agent. `Sync`: threads share it.
pub struct Store {
    loc: Location,
    bucket: Bucket,
    creds: rusty_s3::Credentials,
    http: ureq::Agent,
    /// Tries of a request that failed in a way worth retrying (a dropped
    /// connection, 500/502/503/504, SlowDown): with the backoff doubling
    /// from 50 ms to at most 5 s, 10 tries wait ~16 s in all.
    attempts: u32,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("loc", &self.loc).finish()
    }
}

/// A response: status, ETag, and the body reader.
struct Reply {
    status: u16,
    etag: Option<String>,
    size: Option<u64>,
    /// `Content-Range` of a ranged GET's answer.
    range: Option<String>,
    body: ureq::Body,
}

impl Store {
    pub fn new(loc: Location, creds: &Credentials) -> Result<Store, S3Error> {
        let url = loc.endpoint.parse().map_err(|e| S3Error::Config {
            message: format!("endpoint {:?} is not a URL: {e}", loc.endpoint),
        })?;
        let bucket = Bucket::new(url, UrlStyle::Path, loc.bucket.clone(), loc.region.clone())
            .map_err(|e| S3Error::Config {
                message: format!("endpoint {:?}: {e}", loc.endpoint),
            })?;
        let creds = match &creds.token {
            Some(t) => rusty_s3::Credentials::new_with_token(&creds.key, &creds.secret, t.clone()),
            None => rusty_s3::Credentials::new(&creds.key, &creds.secret),
        };
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .max_idle_connections_per_host(32)
            .build()
            .into();
        let attempts = std::env::var("DSG_S3_ATTEMPTS")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or(10);
        Ok(Store {
            loc,
            bucket,
            creds,
            http,
            attempts,
        })
    }

    pub fn location(&self) -> &Location {
        &self.loc
    }

    /// The full key of `name` under the prefix.
    pub fn key(&self, name: &str) -> String {
        if self.loc.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.loc.prefix)
        }
    }

    /// Checks the bucket answers with these credentials (a clear error for
    /// a wrong key, a missing bucket or an unreachable endpoint).
    pub fn check_bucket(&self) -> Result<(), S3Error> {
        let url = self.bucket.head_bucket(Some(&self.creds)).sign(SIGN_FOR);
        let what = format!("bucket {}", self.loc.bucket);
        let r = self.send(&what, || self.http.head(url.as_str()).call())?;
        match r.status {
            200 => Ok(()),
            404 => Err(S3Error::NoBucket {
                bucket: self.loc.bucket.clone(),
                endpoint: self.loc.endpoint.clone(),
            }),
            _ => Err(self.failure(&what, r)),
        }
    }

    /// The object's bytes and ETag; `None` when it does not exist.
    pub fn get(&self, name: &str) -> Result<Option<(Vec<u8>, String)>, S3Error> {
        let mut out = Vec::new();
        Ok(self.get_to(name, &mut out)?.map(|etag| (out, etag)))
    }

    /// Streams the object into `out`; its ETag, or `None` when it does not
    /// exist. A cut connection is retried from the start only before any
    /// byte was written.
    pub fn get_to(&self, name: &str, out: &mut dyn Write) -> Result<Option<String>, S3Error> {
        let key = self.key(name);
        let url = self
            .bucket
            .get_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        let r = self.send(&key, || self.http.get(url.as_str()).call())?;
        match r.status {
            200 => {
                let etag = r.etag.clone().unwrap_or_default();
                let expect = r.size;
                let mut body = r.body.into_reader();
                let n = std::io::copy(&mut body, out).map_err(|e| S3Error::Io {
                    what: format!("reading {key} from {}", self.loc.endpoint),
                    source: e,
                })?;
                if expect.is_some_and(|s| s != n) {
                    return Err(S3Error::Io {
                        what: format!("reading {key} from {}", self.loc.endpoint),
                        source: std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("got {n} of {} bytes", expect.unwrap_or(0)),
                        ),
                    });
                }
                Ok(Some(etag))
            }
            404 => Ok(None),
            _ => Err(self.failure(&key, r)),
        }
    }

    /// Size and ETag, or `None` when there is no such object.
    pub fn head(&self, name: &str) -> Result<Option<ObjectInfo>, S3Error> {
        let key = self.key(name);
        let url = self
            .bucket
            .head_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        let r = self.send(&key, || self.http.head(url.as_str()).call())?;
        match r.status {
            200 => Ok(Some(ObjectInfo {
                size: r.size.unwrap_or(0),
                etag: r.etag.unwrap_or_default(),
            })),
            404 => Ok(None),
            _ => Err(self.failure(&key, r)),
        }
    }

    /// Writes `body` to `name` if `cond` holds; the new ETag.
    /// `Err(Precondition)` when it does not. A conditional write whose
    /// first try may have landed (the connection dropped after sending)
    /// and whose retry then fails its precondition is `Err(Ambiguous)`:
    /// the caller reads the object to tell.
    pub fn put(&self, name: &str, body: &[u8], cond: &Cond) -> Result<String, S3Error> {
        let key = self.key(name);
        // The precondition is sent unsigned (SigV4 query signing covers the
        // host only): servers accept that, and a test proxy can strip it to
        // stand for a server that ignores preconditions.
        let url = self
            .bucket
            .put_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        let (h, v) = cond_header(cond);
        let mut uncertain = false;
        let r = self.send_tracked(&key, &mut uncertain, || {
            let mut req = self.http.put(url.as_str());
            if let Some(h) = h {
                req = req.header(h, &v);
            }
            req.send(body)
        })?;
        match r.status {
            200 => Ok(r.etag.unwrap_or_default()),
            412 if uncertain => Err(S3Error::Ambiguous { key }),
            412 => Err(S3Error::Precondition { key }),
            _ => Err(self.failure(&key, r)),
        }
    }

    pub fn delete(&self, name: &str) -> Result<(), S3Error> {
        let key = self.key(name);
        let url = self
            .bucket
            .delete_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        let r = self.send(&key, || self.http.delete(url.as_str()).call())?;
        match r.status {
            200 | 204 | 404 => Ok(()),
            _ => Err(self.failure(&key, r)),
        }
    }

    /// Every object under `<prefix>/<under>` (names relative to the
    /// repository prefix) with its size, in key order.
    pub fn list(&self, under: &str) -> Result<Vec<(String, u64)>, S3Error> {
        Ok(self.list_with(under, None)?.0)
    }

    /// The "folders" directly under `under` (a prefix ending in '/', or
    /// empty): the names between it and the next '/', sorted.
    pub fn list_dirs(&self, under: &str) -> Result<Vec<String>, S3Error> {
        let strip = self.key(under);
        let dirs = self.list_with(under, Some("/"))?.1;
        Ok(dirs
            .into_iter()
            .filter_map(|d| {
                let name = d.strip_prefix(&strip)?.trim_end_matches('/');
                (!name.is_empty()).then(|| name.to_string())
            })
            .collect())
    }

    /// Keys (relative, with sizes) under `under`, and with a `delimiter`
    /// the common prefixes (full keys) it groups.
    fn list_with(&self, under: &str, delimiter: Option<&str>) -> Result<Listed, S3Error> {
        let full = self.key(under);
        let strip = self.key("");
        let (mut out, mut dirs) = (Vec::new(), Vec::new());
        let mut token: Option<String> = None;
        loop {
            let mut action = self.bucket.list_objects_v2(Some(&self.creds));
            action.with_prefix(full.as_str());
            if let Some(d) = delimiter {
                action.with_delimiter(d);
            }
            if let Some(t) = &token {
                action.with_continuation_token(t.as_str());
            }
            let url = action.sign(SIGN_FOR);
            let what = format!("listing {}/{full}", self.loc.bucket);
            let r = self.send(&what, || self.http.get(url.as_str()).call())?;
            if r.status != 200 {
                return Err(self.failure(&what, r));
            }
            let text = self.text(&what, r)?;
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&text).map_err(|e| {
                S3Error::Protocol {
                    what: format!("listing {full}"),
                    message: e.to_string(),
                }
            })?;
            for c in page.contents {
                let name = c.key.strip_prefix(&strip).unwrap_or(&c.key).to_string();
                out.push((name, c.size.unwrap_or(0)));
            }
            dirs.extend(page.common_prefixes.into_iter().map(|c| c.prefix));
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        dirs.sort();
        Ok((out, dirs))
    }

    /// Starts a multipart upload; its id.
    pub fn multipart_create(&self, name: &str) -> Result<String, S3Error> {
        let key = self.key(name);
        let url = self
            .bucket
            .create_multipart_upload(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        let r = self.send(&key, || self.http.post(url.as_str()).send(&[][..]))?;
        if r.status != 200 {
            return Err(self.failure(&key, r));
        }
        let text = self.text(&key, r)?;
        let parsed =
            rusty_s3::actions::CreateMultipartUpload::parse_response(&text).map_err(|e| {
                S3Error::Protocol {
                    what: format!("starting a multipart upload of {key}"),
                    message: e.to_string(),
                }
            })?;
        Ok(parsed.upload_id().to_string())
    }

    /// Uploads part `number` (1-based); its ETag.
    pub fn multipart_part(
        &self,
        name: &str,
        upload_id: &str,
        number: u16,
        body: &[u8],
    ) -> Result<String, S3Error> {
        let key = self.key(name);
        let url = self
            .bucket
            .upload_part(Some(&self.creds), &key, number, upload_id)
            .sign(SIGN_FOR);
        let r = self.send(&key, || self.http.put(url.as_str()).send(body))?;
        match (r.status, r.etag.clone()) {
            (200, Some(e)) => Ok(e),
            _ => Err(self.failure(&key, r)),
        }
    }

    /// Completes the upload from its parts' ETags, in order.
    pub fn multipart_complete(
        &self,
        name: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), S3Error> {
        let key = self.key(name);
        let action = self.bucket.complete_multipart_upload(
            Some(&self.creds),
            &key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGN_FOR);
        let body = self
            .bucket
            .complete_multipart_upload(
                Some(&self.creds),
                &key,
                upload_id,
                etags.iter().map(String::as_str),
            )
            .body();
        let r = self.send(&key, || self.http.post(url.as_str()).send(body.as_bytes()))?;
        if r.status != 200 {
            return Err(self.failure(&key, r));
        }
        // A 200 may still carry an error document (the AWS API's quirk).
        let text = self.text(&key, r)?;
        if text.contains("<Error>") {
            return Err(S3Error::Protocol {
                what: format!("completing the multipart upload of {key}"),
                message: text.chars().take(300).collect(),
            });
        }
        Ok(())
    }

    pub fn multipart_abort(&self, name: &str, upload_id: &str) -> Result<(), S3Error> {
        let key = self.key(name);
        let url = self
            .bucket
            .abort_multipart_upload(Some(&self.creds), &key, upload_id)
            .sign(SIGN_FOR);
        let r = self.send(&key, || self.http.delete(url.as_str()).call())?;
        match r.status {
            200 | 204 | 404 => Ok(()),
            _ => Err(self.failure(&key, r)),
        }
    }

    /// Unfinished multipart uploads under `<prefix>/<under>`: (name, id).
    pub fn multipart_list(&self, under: &str) -> Result<Vec<(String, String)>, S3Error> {
        let full = self.key(under);
        let strip = self.key("");
        let url = rusty_s3::signing::sign(
            &jiff_now(),
            rusty_s3::Method::Get,
            self.bucket.base_url().clone(),
            self.creds.key(),
            self.creds.secret(),
            self.creds.token(),
            self.bucket.region(),
            SIGN_FOR.as_secs(),
            // Sorted by name, as the signature wants.
            [("prefix", full.as_str()), ("uploads", "1")].into_iter(),
            std::iter::empty(),
        );
        let r = self.send(&full, || self.http.get(url.as_str()).call())?;
        if r.status != 200 {
            return Err(self.failure(&full, r));
        }
        let text = self.text(&full, r)?;
        let mut out = Vec::new();
        for upload in text.split("<Upload>").skip(1) {
            if let (Some(k), Some(id)) = (tag(upload, "Key"), tag(upload, "UploadId")) {
                let k = xml_unescape(k);
                out.push((
                    k.strip_prefix(&strip).unwrap_or(&k).to_string(),
                    xml_unescape(id),
                ));
            }
        }
        Ok(out)
    }

    /// The parts stored so far of an unfinished multipart upload, by
    /// number; `None` when there is no such upload (aborted or completed).
    /// A number sent twice may be listed twice (SeaweedFS keeps both until
    /// the completion, which takes the one whose ETag it names).
    pub fn multipart_parts(
        &self,
        name: &str,
        upload_id: &str,
    ) -> Result<Option<Vec<Part>>, S3Error> {
        let key = self.key(name);
        let mut out = Vec::new();
        let mut marker: Option<u16> = None;
        loop {
            let mut action = self.bucket.list_parts(Some(&self.creds), &key, upload_id);
            if let Some(m) = marker {
                action.set_part_number_marker(m);
            }
            let url = action.sign(SIGN_FOR);
            let r = self.send(&key, || self.http.get(url.as_str()).call())?;
            match r.status {
                200 => {}
                404 => return Ok(None),
                _ => return Err(self.failure(&key, r)),
            }
            let text = self.text(&key, r)?;
            let bad = |message: String| S3Error::Protocol {
                what: format!("listing the parts of the upload of {key}"),
                message,
            };
            for p in text.split("<Part>").skip(1) {
                let field = |t: &str| tag(p, t).map(|v| xml_unescape(v.trim()));
                let (Some(n), Some(size), Some(etag)) =
                    (field("PartNumber"), field("Size"), field("ETag"))
                else {
                    return Err(bad(format!(
                        "a part without number, size or ETag: {p:.200}"
                    )));
                };
                out.push(Part {
                    number: n.parse().map_err(|_| bad(format!("part number {n:?}")))?,
                    size: size
                        .parse()
                        .map_err(|_| bad(format!("part size {size:?}")))?,
                    etag,
                });
            }
            let truncated = tag(&text, "IsTruncated").is_some_and(|t| t.trim() == "true");
            let next = tag(&text, "NextPartNumberMarker").and_then(|t| t.trim().parse().ok());
            match (truncated, next) {
                (false, _) => break,
                // A marker that does not advance would page forever.
                (true, Some(m)) if Some(m) != marker && m > 0 => marker = Some(m),
                (true, _) => return Err(bad("a truncated list without a next marker".into())),
            }
        }
        out.sort_by_key(|p| p.number);
        Ok(Some(out))
    }

    /// Checks that the server honours conditional writes, on a scratch key
    /// under `name` (removed after): a repository's commit relies on them.
    pub fn probe_conditional(&self, name: &str) -> Result<(), S3Error> {
        let refuse = |what: &str| S3Error::Unsafe {
            endpoint: self.loc.endpoint.clone(),
            what: what.to_string(),
        };
        let _ = self.delete(name);
        let first = self.put(name, b"1", &Cond::Absent)?;
        let outcome = (|| {
            match self.put(name, b"2", &Cond::Absent) {
                Err(S3Error::Precondition { .. }) => {}
                Ok(_) => return Err(refuse("If-None-Match: * overwrote an existing object")),
                Err(e) => return Err(e),
            }
            match self.put(name, b"3", &Cond::Etag("\"0123456789abcdef\"".into())) {
                Err(S3Error::Precondition { .. }) => {}
                Ok(_) => return Err(refuse("If-Match with a wrong ETag overwrote the object")),
                Err(e) => return Err(e),
            }
            match self.put(name, b"4", &Cond::Etag(first.clone())) {
                Ok(_) => {}
                Err(S3Error::Precondition { .. }) => {
                    return Err(refuse("If-Match with the object's own ETag was refused"))
                }
                Err(e) => return Err(e),
            }
            match self.get(name)? {
                Some((b, _)) if b == b"4" => Ok(()),
                _ => Err(refuse("a conditional write did not store its body")),
            }
        })();
        let _ = self.delete(name);
        outcome
    }

    /// Streams bytes `start..start + len` of the object into `out` (a
    /// ranged GET); the object's whole size, or `None` when it does not
    /// exist. The answer must be exactly that range: a server that ignores
    /// `Range`, a different range, or a body cut short is an error (`Io`
    /// for a cut: what came before it is in `out`, and the caller can ask
    /// for the rest).
    pub fn get_range(
        &self,
        name: &str,
        start: u64,
        len: u64,
        out: &mut dyn Write,
    ) -> Result<Option<u64>, S3Error> {
        let key = self.key(name);
        let what = format!("bytes {start}..{} of {key}", start + len);
        if len == 0 {
            return Err(S3Error::Protocol {
                what,
                message: "an empty range".into(),
            });
        }
        let url = self
            .bucket
            .get_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        // Unsigned, like the preconditions (query signing covers the host).
        let range = format!("bytes={start}-{}", start + len - 1);
        let r = self.send(&what, || {
            self.http.get(url.as_str()).header("range", &range).call()
        })?;
        match r.status {
            206 => {}
            404 => return Ok(None),
            416 => {
                return Err(S3Error::Protocol {
                    what,
                    message: "the object is shorter than the range (416)".into(),
                })
            }
            200 => {
                return Err(S3Error::Protocol {
                    what,
                    message: "the server ignored the Range header (200)".into(),
                })
            }
            _ => return Err(self.failure(&what, r)),
        }
        let total =
            content_range(r.range.as_deref(), start, len).ok_or_else(|| S3Error::Protocol {
                what: what.clone(),
                message: format!("answered the range {:?}", r.range.as_deref().unwrap_or("")),
            })?;
        let io = |source| S3Error::Io {
            what: format!("reading {what} from {}", self.loc.endpoint),
            source,
        };
        let mut body = r.body.into_reader();
        let n = std::io::copy(&mut (&mut body).take(len), out).map_err(io)?;
        if n != len || r.size.is_some_and(|s| s != len) {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("got {n} of {len} bytes"),
            )));
        }
        Ok(Some(total))
    }

    fn text(&self, what: &str, r: Reply) -> Result<String, S3Error> {
        let mut s = String::new();
        r.body
            .into_reader()
            .read_to_string(&mut s)
            .map_err(|e| S3Error::Io {
                what: format!("reading the answer about {what} from {}", self.loc.endpoint),
                source: e,
            })?;
        Ok(s)
    }

    /// The error a non-success status stands for.
    fn failure(&self, what: &str, r: Reply) -> S3Error {
        let status = r.status;
        let text = self.text(what, r).unwrap_or_default();
        let code = tag(&text, "Code").unwrap_or("").to_string();
        let message = tag(&text, "Message").unwrap_or("").to_string();
        S3Error::from_status(&self.loc, what, status, code, message)
    }

    fn send(
        &self,
        what: &str,
        call: impl Fn() -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Reply, S3Error> {
        let mut uncertain = false;
        self.send_tracked(what, &mut uncertain, call)
    }

    /// Sends with retries: transport failures and 500/502/503/504 are
    /// retried with exponential backoff and jitter. `uncertain` is set when
    /// a failed try may have reached the server.
    fn send_tracked(
        &self,
        what: &str,
        uncertain: &mut bool,
        call: impl Fn() -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Reply, S3Error> {
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=self.attempts {
            let last = attempt == self.attempts;
            match call() {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let header = |h: &str| {
                        resp.headers()
                            .get(h)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let etag = header("etag");
                    let size = header("content-length").and_then(|s| s.parse().ok());
                    let range = header("content-range");
                    let retry = matches!(status, 500 | 502 | 503 | 504);
                    if retry && !last {
                        tracing::debug!("{what}: {status} from {}; retrying", self.loc.endpoint);
                        *uncertain |= status != 503;
                        drop(resp);
                        backoff(&mut delay);
                        continue;
                    }
                    return Ok(Reply {
                        status,
                        etag,
                        size,
                        range,
                        body: resp.into_body(),
                    });
                }
                Err(e) => {
                    let refused = is_refused(&e);
                    // Nothing listening is rarely cured by waiting longer:
                    // a few quick tries, not the throttling schedule.
                    if last || (refused && attempt >= 3) {
                        return Err(S3Error::transport(&self.loc, what, e));
                    }
                    *uncertain |= !refused;
                    tracing::debug!("{what}: {e}; retrying");
                    backoff(&mut delay);
                }
            }
        }
        unreachable!("the last attempt returns")
    }
}

/// The object's size from a `Content-Range: bytes a-b/total` answering a
/// request for `len` bytes at `start`; `None` unless it is that range.
fn content_range(h: Option<&str>, start: u64, len: u64) -> Option<u64> {
    let (span, total) = h?.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
    let total: u64 = total.parse().ok()?;
    (a == start && b == start + len - 1 && b < total).then_some(total)
}

fn cond_header(cond: &Cond) -> (Option<&'static str>, String) {
    match cond {
        Cond::None => (None, String::new()),
        Cond::Absent => (Some("if-none-match"), "*".into()),
        Cond::Etag(e) => (Some("if-match"), e.clone()),
    }
}

fn backoff(delay: &mut Duration) {
    // Jitter from the clock's nanoseconds: enough to keep clients that
    // were throttled together from retrying together.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let jitter = Duration::from_millis(u64::from(nanos % 50));
    std::thread::sleep(*delay + jitter);
    *delay = (*delay * 2).min(Duration::from_secs(5));
}

/// A connection refused never reached the server.
fn is_refused(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
        ureq::Error::ConnectionFailed => true,
        _ => false,
    }
}

fn jiff_now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

/// The text of the first `<name>…</name>` in `s`.
fn tag<'a>(s: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = s.find(&open)? + open.len();
    let end = s[start..].find(&close)? + start;
    Some(&s[start..end])
}

/// The five named entities and numeric references (`&#34;`, `&#x22;`:
/// SeaweedFS quotes ETags so).
fn xml_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(end) = tail.find(';').filter(|e| *e <= 10) else {
            out.push('&');
            rest = &tail[1..];
            continue;
        };
        let name = &tail[1..end];
        let c = match name {
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "amp" => Some('&'),
            _ => name
                .strip_prefix("#x")
                .or_else(|| name.strip_prefix("#X"))
                .map(|h| u32::from_str_radix(h, 16))
                .or_else(|| name.strip_prefix('#').map(str::parse::<u32>))
                .and_then(Result::ok)
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &tail[end + 1..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_found_and_unescaped() {
        let x = "<Error><Code>SlowDown</Code><Message>a &amp; b</Message></Error>";
        assert_eq!(tag(x, "Code"), Some("SlowDown"));
        assert_eq!(xml_unescape(tag(x, "Message").unwrap()), "a & b");
        assert_eq!(
            xml_unescape("&#34;ab&#x22;&amp;lt;&bogus;&"),
            "\"ab\"&lt;&bogus;&"
        );
        assert_eq!(tag(x, "Key"), None);
    }

    #[test]
    fn content_ranges_must_be_the_one_asked_for() {
        let r = |h: &str| content_range(Some(h), 16, 8);
        assert_eq!(r("bytes 16-23/100"), Some(100));
        assert_eq!(r("bytes 16-23/24"), Some(24));
        assert_eq!(r("bytes 16-23/23"), None, "past the end");
        assert_eq!(r("bytes 0-23/100"), None, "another start");
        assert_eq!(r("bytes 16-22/100"), None, "shorter");
        assert_eq!(r("bytes 16-23/*"), None, "unknown size");
        assert_eq!(r("16-23/100"), None);
        assert_eq!(content_range(None, 16, 8), None);
    }

    #[test]
    fn keys_sit_under_the_prefix() {
        let c = Credentials {
            key: "k".into(),
            secret: "s".into(),
            token: None,
        };
        let mut loc = Location {
            endpoint: "http://127.0.0.1:1".into(),
            bucket: "b".into(),
            prefix: "p/q".into(),
            region: "us-east-1".into(),
        };
        assert_eq!(Store::new(loc.clone(), &c).unwrap().key("HEAD"), "p/q/HEAD");
        loc.prefix.clear();
        assert_eq!(Store::new(loc, &c).unwrap().key("HEAD"), "HEAD");
    }
}
