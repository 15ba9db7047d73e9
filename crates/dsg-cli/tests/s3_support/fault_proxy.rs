//! A fault-injecting HTTP/1.1 proxy on loopback for the S3 tests (std only):
//! throttling (503 SlowDown), server errors, refused service and dropped
//! connections in the middle of a request or response body, injected in
//! front of the real SeaweedFS gateway.
//!
//! It is transparent: each request head is forwarded byte for byte, the
//! `Host` header included, over one upstream connection per client
//! connection (keep-alive: many requests on one connection; reopened when
//! the server closed it while idle). SigV4 signs the `Host` header, so a
//! client must address (and sign for) the proxy's `endpoint()`; the
//! gateway checks the signature against the `Host` it receives, which is
//! the proxy's `127.0.0.1:PORT`, and accepts it.
//!
//! Bodies are framed by `Content-Length` or `Transfer-Encoding: chunked`
//! (responses also by the close of the connection; `HEAD`, 1xx, 204 and
//! 304 responses have none). `Expect: 100-continue` is passed on: the
//! server's `100 Continue` goes back to the client before the body is
//! forwarded. Body byte counts (`after_bytes`) are bytes on the wire,
//! chunk framing included.
//!
//! Each rule counts the requests it acts on; once its `n` is used up, the
//! proxy passes everything. `requests()` lists every request seen, with
//! the status the client got and the fault applied, for assertions.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A stuck peer must not hang a test forever.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_HEAD: usize = 64 * 1024;

/// Which requests a rule acts on; `Filter::default()` matches all.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// The exact method, e.g. "PUT".
    pub method: Option<&'static str>,
    /// A substring of the request target (path and query, e.g. `?uploadId=`).
    pub path_contains: Option<String>,
}

impl Filter {
    pub fn any() -> Filter {
        Filter::default()
    }

    pub fn method(method: &'static str) -> Filter {
        Filter {
            method: Some(method),
            path_contains: None,
        }
    }

    pub fn path(part: &str) -> Filter {
        Filter {
            method: None,
            path_contains: Some(part.to_string()),
        }
    }

    fn matches(&self, method: &str, target: &str) -> bool {
        self.method.is_none_or(|m| m == method)
            && (self.path_contains.as_deref()).is_none_or(|p| target.contains(p))
    }
}

/// What the proxy does; `set` replaces the current rule (and its count).
#[derive(Clone, Debug)]
pub enum Rule {
    /// Forward everything.
    Pass,
    /// The next `n` matching requests get `503 SlowDown` from the proxy
    /// (an S3 XML error body); the server never sees them.
    SlowDown { n: usize, filter: Filter },
    /// The next `n` matching requests get `500 InternalError` likewise.
    ServerError { n: usize, filter: Filter },
    /// The next `n` matching requests reach the server with at most
    /// `after_bytes` of their body, then both connections are cut. When
    /// the whole body fits (or there is none), the proxy first waits for
    /// the server's response head, so the request took effect, and drops
    /// it: the client sees the connection close without an answer.
    CutRequest {
        n: usize,
        after_bytes: u64,
        filter: Filter,
    },
    /// The next `n` matching requests get the server's response head and
    /// at most `after_bytes` of its body, then both connections are cut.
    /// The client always sees a truncated response: a body not longer
    /// than `after_bytes` loses its last byte (chunked: its last chunk),
    /// and a response without a body is cut before its head.
    CutResponse {
        n: usize,
        after_bytes: u64,
        filter: Filter,
    },
    /// Every request gets `503 ServiceUnavailable` until the rule changes.
    Down,
    /// The next `pass` matching requests are forwarded; every matching
    /// request after them gets `503 ServiceUnavailable` until the rule
    /// changes (the rest pass): a store that goes away mid-upload, e.g.
    /// after two parts of a large file (`Filter::path("partNumber=")`).
    DownAfter { pass: usize, filter: Filter },
    /// Until the rule changes, requests reach the server without their
    /// `If-Match` / `If-None-Match` headers: a server that ignores
    /// preconditions (dsg sends them unsigned, so the signature holds).
    IgnorePreconditions,
}

/// One request the proxy handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    /// The request target: path and query.
    pub target: String,
    /// The status the client received (a head at least); `None` when the
    /// connection was cut before any, or broke.
    pub status: Option<u16>,
    /// The rule that acted on it: "SlowDown", "InternalError", "Down",
    /// "CutRequest", "CutResponse"; `None` when passed through.
    pub fault: Option<&'static str>,
    /// The request's `Range` header (`bytes=a-b`), if any.
    pub range: Option<String>,
}

struct Shared {
    upstream: SocketAddr,
    rule: Mutex<Rule>,
    seen: Mutex<Vec<Seen>>,
    /// Open connections (client, upstream), shut down when the proxy drops.
    open: Mutex<HashMap<u64, [TcpStream; 2]>>,
    connections: AtomicU64,
    /// Requests read but not yet in `seen`: their client may already have
    /// the whole answer (and the test moved on) before they are recorded.
    in_flight: AtomicU64,
    stop: AtomicBool,
}

/// The proxy; it stops (closing every connection) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:<free port> and forwards to `upstream`
    /// ("127.0.0.1:8333" or "http://127.0.0.1:8333").
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream = upstream.trim_start_matches("http://").trim_end_matches('/');
        let upstream: SocketAddr = upstream.parse().expect("upstream as IP:PORT");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            upstream,
            rule: Mutex::new(Rule::Pass),
            seen: Mutex::new(Vec::new()),
            open: Mutex::new(HashMap::new()),
            connections: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || accept_loop(listener, s));
        FaultProxy {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    /// "http://127.0.0.1:PORT": what clients address and sign for.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, rule: Rule) {
        *self.shared.rule.lock().unwrap() = rule;
    }

    /// Every request handled so far, in order of completion: waits (up to
    /// 10 s) for those being answered to be recorded.
    pub fn requests(&self) -> Vec<Seen> {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while self.shared.in_flight.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.shared.seen.lock().unwrap().clone()
    }

    /// Client connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for [a, b] in self.shared.open.lock().unwrap().values() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((down, _)) => {
                let id = shared.connections.fetch_add(1, Ordering::SeqCst);
                let s = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(id, down, &s);
                    s.open.lock().unwrap().remove(&id);
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// One client connection: requests and responses in turn until either
/// side closes or a fault cuts it; both sockets are shut down at the end.
fn serve(id: u64, down: TcpStream, shared: &Shared) -> io::Result<()> {
    down.set_nonblocking(false)?;
    down.set_read_timeout(Some(IO_TIMEOUT))?;
    down.set_nodelay(true)?;
    let up = connect(shared, id, &down);
    let Ok(up) = up else {
        let _ = down.shutdown(Shutdown::Both);
        return up.map(drop);
    };
    let mut c = Conn {
        id,
        dr: BufReader::new(down.try_clone()?),
        ur: BufReader::new(up.try_clone()?),
        down,
        up,
    };
    let result = (|| {
        while let Some(req) = read_head(&mut c.dr)? {
            shared.in_flight.fetch_add(1, Ordering::SeqCst);
            let mut seen = Seen {
                method: req.word(0).to_string(),
                target: req.word(1).to_string(),
                status: None,
                fault: None,
                range: req.get("range").map(str::to_string),
            };
            let keep = exchange(&req, &mut c, shared, &mut seen);
            shared.seen.lock().unwrap().push(seen);
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            if !keep? || shared.stop.load(Ordering::SeqCst) {
                break;
            }
        }
        Ok(())
    })();
    let _ = c.down.shutdown(Shutdown::Both);
    let _ = c.up.shutdown(Shutdown::Both);
    result
}

/// A new upstream connection, registered to be shut down with the proxy.
fn connect(shared: &Shared, id: u64, down: &TcpStream) -> io::Result<TcpStream> {
    let up = TcpStream::connect(shared.upstream)?;
    up.set_read_timeout(Some(IO_TIMEOUT))?;
    up.set_nodelay(true)?;
    let guard = [down.try_clone()?, up.try_clone()?];
    shared.open.lock().unwrap().insert(id, guard);
    Ok(up)
}

/// The server closes kept-alive connections idle too long (SeaweedFS's
/// `-idleTimeout`, 120 s): the client's connection to the proxy stays open,
/// so the proxy reconnects instead of failing the client's next request.
fn reconnect_if_closed(c: &mut Conn, shared: &Shared) -> io::Result<()> {
    c.up.set_nonblocking(true)?;
    let closed = match c.up.peek(&mut [0]) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    c.up.set_nonblocking(false)?;
    if closed {
        c.up = connect(shared, c.id, &c.down)?;
        c.ur = BufReader::new(c.up.try_clone()?);
    }
    Ok(())
}

struct Conn {
    id: u64,
    dr: BufReader<TcpStream>,
    ur: BufReader<TcpStream>,
    down: TcpStream,
    up: TcpStream,
}

enum Action {
    Pass,
    Strip,
    Answer(Canned),
    CutRequest(u64),
    CutResponse(u64),
}

/// The proxy's own answer: status, reason, S3 error code, message.
#[derive(Clone, Copy)]
struct Canned(u16, &'static str, &'static str, &'static str);

const SLOW_DOWN: Canned = Canned(503, "Slow Down", "SlowDown", "Reduce your request rate.");
const INTERNAL: Canned = Canned(500, "Internal Server Error", "InternalError", "Try again.");
const UNAVAILABLE: Canned = Canned(503, "Service Unavailable", "ServiceUnavailable", "Down.");

/// Consumes one use of the current rule if it matches this request.
fn decide(shared: &Shared, method: &str, target: &str) -> (Action, Option<&'static str>) {
    let mut rule = shared.rule.lock().unwrap();
    let (action, name, n, filter) = match &mut *rule {
        Rule::Pass => return (Action::Pass, None),
        Rule::Down => return (Action::Answer(UNAVAILABLE), Some("Down")),
        Rule::IgnorePreconditions => return (Action::Strip, Some("IgnorePreconditions")),
        Rule::DownAfter { pass, filter } => {
            if !filter.matches(method, target) {
                return (Action::Pass, None);
            }
            if *pass > 0 {
                *pass -= 1;
                return (Action::Pass, None);
            }
            return (Action::Answer(UNAVAILABLE), Some("Down"));
        }
        Rule::SlowDown { n, filter } => (Action::Answer(SLOW_DOWN), "SlowDown", n, filter),
        Rule::ServerError { n, filter } => (Action::Answer(INTERNAL), "InternalError", n, filter),
        Rule::CutRequest {
            n,
            after_bytes: b,
            filter,
        } => (Action::CutRequest(*b), "CutRequest", n, filter),
        Rule::CutResponse {
            n,
            after_bytes: b,
            filter,
        } => (Action::CutResponse(*b), "CutResponse", n, filter),
    };
    if *n == 0 || !filter.matches(method, target) {
        return (Action::Pass, None);
    }
    *n -= 1;
    (action, Some(name))
}

/// One request and its response; returns whether the connection goes on.
fn exchange(req: &Head, c: &mut Conn, shared: &Shared, seen: &mut Seen) -> io::Result<bool> {
    let (action, fault) = decide(shared, &seen.method, &seen.target);
    seen.fault = fault;
    let body = req.request_body();
    let expect = req.has_token("expect", "100-continue") && !matches!(body, Body::None);
    let cut = match action {
        Action::CutResponse(b) => Some(b),
        _ => None,
    };
    if let Action::Answer(canned) = action {
        seen.status = Some(canned.0);
        return answer(c, &seen.method, &body, expect, canned);
    }
    reconnect_if_closed(c, shared)?;
    let sent: std::borrow::Cow<'_, [u8]> = if matches!(action, Action::Strip) {
        without_preconditions(&req.raw).into()
    } else {
        req.raw[..].into()
    };
    c.up.write_all(&sent)?;
    if expect {
        let interim = read_head(&mut c.ur)?.ok_or_else(eof)?;
        if interim.status() != 100 {
            // A final answer instead of "go on": relay it; the client may
            // or may not send its body now, so the connection ends.
            relay_response(c, interim, cut, seen)?;
            return Ok(false);
        }
        c.down.write_all(&interim.raw)?;
    }
    if let Action::CutRequest(after) = action {
        let cap = Cap {
            left: after,
            short: false,
        };
        if relay_body(&mut c.dr, &mut c.up, &body, Some(cap))? {
            // The whole request is out: let the server finish it first.
            read_head(&mut c.ur)?;
        }
        return Ok(false);
    }
    relay_body(&mut c.dr, &mut c.up, &body, None)?;
    let mut resent = false;
    let resp = loop {
        let head = match read_head(&mut c.ur) {
            Ok(Some(head)) => head,
            // The server closed its kept-alive connection as the request
            // went out (after the check above): a request without a body
            // is sent once more on a new connection, as HTTP clients do.
            Ok(None) | Err(_) if !resent && matches!(body, Body::None) => {
                resent = true;
                c.up = connect(shared, c.id, &c.down)?;
                c.ur = BufReader::new(c.up.try_clone()?);
                c.up.write_all(&sent)?;
                continue;
            }
            Ok(None) => return Err(eof()),
            Err(e) => return Err(e),
        };
        if !(100..200).contains(&head.status()) {
            break head;
        }
        c.down.write_all(&head.raw)?;
    };
    let keep = relay_response(c, resp, cut, seen)?;
    Ok(keep && !req.has_token("connection", "close"))
}

/// A request head without its `If-Match` / `If-None-Match` lines.
fn without_preconditions(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    for line in raw.split_inclusive(|b| *b == b'\n') {
        let lower = String::from_utf8_lossy(line).to_ascii_lowercase();
        if lower.starts_with("if-match:") || lower.starts_with("if-none-match:") {
            continue;
        }
        out.extend_from_slice(line);
    }
    out
}

/// The proxy's own error answer. A request body is read and dropped first,
/// unless the client waits for `100 Continue`: then the connection ends.
fn answer(c: &mut Conn, method: &str, body: &Body, expect: bool, a: Canned) -> io::Result<bool> {
    let Canned(status, reason, code, message) = a;
    let close = if expect { "Connection: close\r\n" } else { "" };
    if !expect {
        relay_body(&mut c.dr, &mut io::sink(), body, None)?;
    }
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message><RequestId>dsg-fault-proxy</RequestId></Error>"
    );
    let len = xml.len();
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n\
         Content-Length: {len}\r\n{close}\r\n"
    );
    c.down.write_all(head.as_bytes())?;
    if method != "HEAD" {
        c.down.write_all(xml.as_bytes())?;
    }
    if expect {
        // Close gracefully: unread body bytes would turn the close into a
        // reset, which can destroy the answer before the client reads it.
        c.down.shutdown(Shutdown::Write)?;
        c.down.set_read_timeout(Some(Duration::from_secs(2)))?;
        let _ = io::copy(&mut c.dr, &mut io::sink());
    }
    Ok(!expect)
}

/// Relays a response head and body, cut per `CutResponse` if `cut` is set;
/// returns whether the connection can carry another request.
fn relay_response(c: &mut Conn, resp: Head, cut: Option<u64>, seen: &mut Seen) -> io::Result<bool> {
    let body = resp.response_body(&seen.method);
    if cut.is_some() && matches!(body, Body::None | Body::Length(0)) {
        return Ok(false);
    }
    c.down.write_all(&resp.raw)?;
    seen.status = Some(resp.status());
    let cap = cut.map(|left| Cap { left, short: true });
    relay_body(&mut c.ur, &mut c.down, &body, cap)?;
    let close = matches!(body, Body::UntilClose) || resp.has_token("connection", "close");
    Ok(cut.is_none() && !close)
}

enum Body {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A cut: at most `left` bytes of a body on the wire; `short` makes sure
/// the body is never completed (a response cut always shows).
#[derive(Clone, Copy)]
struct Cap {
    left: u64,
    short: bool,
}

/// Copies a body, capped by `cap` if set; returns whether it went whole.
fn relay_body<W: Write>(
    from: &mut BufReader<TcpStream>,
    to: &mut W,
    body: &Body,
    cap: Option<Cap>,
) -> io::Result<bool> {
    let short = cap.is_some_and(|c| c.short);
    let left = cap.map_or(u64::MAX, |c| c.left);
    let mut out = Capped { to, left };
    match *body {
        Body::None => Ok(true),
        Body::Length(n) if short => {
            out.left = left.min(n.saturating_sub(1));
            copy_exact(from, &mut out, n)
        }
        Body::Length(n) => copy_exact(from, &mut out, n),
        Body::UntilClose => copy_exact(from, &mut out, u64::MAX).or_else(|e| {
            // The server's close ends this body.
            (e.kind() == io::ErrorKind::UnexpectedEof)
                .then_some(true)
                .ok_or(e)
        }),
        Body::Chunked => loop {
            let line = read_line(from)?;
            let size = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| u64::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                .ok_or_else(|| bad("a chunk size line"))?;
            if size == 0 && short {
                return Ok(false);
            }
            if !out.put(&line)? {
                return Ok(false);
            }
            if size == 0 {
                // Trailers, up to and with the empty line.
                loop {
                    let t = read_line(from)?;
                    if !out.put(&t)? {
                        return Ok(false);
                    }
                    if t == b"\r\n" || t == b"\n" {
                        return Ok(true);
                    }
                }
            }
            if !copy_exact(from, &mut out, size + 2)? {
                return Ok(false);
            }
        },
    }
}

/// A writer that forwards at most `left` bytes.
struct Capped<'a, W: Write> {
    to: &'a mut W,
    left: u64,
}

impl<W: Write> Capped<'_, W> {
    /// Writes what the cap allows; false when it fell short.
    fn put(&mut self, buf: &[u8]) -> io::Result<bool> {
        let n = (buf.len() as u64).min(self.left) as usize;
        self.to.write_all(&buf[..n])?;
        self.left -= n as u64;
        Ok(n == buf.len())
    }
}

/// Copies `n` bytes (or until EOF is an error); false when the cap cut it.
fn copy_exact<W: Write>(
    from: &mut BufReader<TcpStream>,
    out: &mut Capped<W>,
    mut n: u64,
) -> io::Result<bool> {
    while n > 0 {
        let buf = from.fill_buf()?;
        if buf.is_empty() {
            return Err(eof());
        }
        let k = (buf.len() as u64).min(n) as usize;
        let whole = out.put(&buf[..k])?;
        from.consume(k);
        n -= k as u64;
        if !whole {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A request or response head, kept byte for byte.
struct Head {
    raw: Vec<u8>,
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn word(&self, i: usize) -> &str {
        self.first.split(' ').nth(i).unwrap_or("")
    }

    fn status(&self) -> u16 {
        self.word(1).parse().unwrap_or(0)
    }

    fn get(&self, name: &str) -> Option<&str> {
        let mut h = self.headers.iter();
        h.find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case(name)
                && v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    }

    fn length(&self) -> Option<u64> {
        self.get("content-length")
            .and_then(|v| v.trim().parse().ok())
    }

    fn request_body(&self) -> Body {
        if self.has_token("transfer-encoding", "chunked") {
            Body::Chunked
        } else {
            self.length().map_or(Body::None, Body::Length)
        }
    }

    fn response_body(&self, method: &str) -> Body {
        let s = self.status();
        if method == "HEAD" || (100..200).contains(&s) || s == 204 || s == 304 {
            Body::None
        } else if self.has_token("transfer-encoding", "chunked") {
            Body::Chunked
        } else {
            self.length().map_or(Body::UntilClose, Body::Length)
        }
    }
}

/// The next head, or `None` at a clean end of the stream before one.
fn read_head(r: &mut BufReader<TcpStream>) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    let mut lines = Vec::new();
    loop {
        let start = raw.len();
        if r.by_ref()
            .take(MAX_HEAD as u64)
            .read_until(b'\n', &mut raw)?
            == 0
        {
            return if raw.is_empty() { Ok(None) } else { Err(eof()) };
        }
        let line = String::from_utf8_lossy(&raw[start..])
            .trim_end()
            .to_string();
        if line.is_empty() && lines.is_empty() {
            raw.clear(); // stray CRLF between messages
        } else if line.is_empty() {
            break;
        } else if raw.len() > MAX_HEAD {
            return Err(bad("a head under 64 KiB"));
        } else {
            lines.push(line);
        }
    }
    let first = lines.remove(0);
    let headers = lines
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Some(Head {
        raw,
        first,
        headers,
    }))
}

fn read_line(r: &mut BufReader<TcpStream>) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    if r.by_ref()
        .take(MAX_HEAD as u64)
        .read_until(b'\n', &mut line)?
        == 0
    {
        return Err(eof());
    }
    Ok(line)
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed mid-message")
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("expected {what}"))
}
