//! The S3 fault proxy (`s3_support::fault_proxy`) against the real loopback
//! SeaweedFS gateway, driven by `curl --aws-sigv4`: it is transparent in
//! pass mode (signatures made for the proxy's host:port are accepted,
//! keep-alive, HEAD, chunked and `Expect: 100-continue` uploads), and each
//! rule does to the client and to the store exactly what it says. Effects
//! on the store are checked through the gateway directly, not the proxy.

mod s3_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use s3_support::cluster::cluster_or_skip;
use s3_support::fault_proxy::{FaultProxy, Filter, Rule, Seen};

const KIB: usize = 1024;

/// The cluster's settings from its env file, a unique key prefix, a
/// scratch dir; deletes the keys it handed out when dropped.
struct S3 {
    endpoint: String,
    bucket: String,
    user: String,
    region: String,
    prefix: String,
    /// Every `export K=V` of the env file (rclone's remote `dsgtest:`).
    vars: Vec<(String, String)>,
    dir: tempfile::TempDir,
    keys: std::cell::RefCell<Vec<String>>,
}

/// What one curl run gave: its exit code, the HTTP status (0 if none)
/// and the body it wrote.
#[derive(Debug)]
struct Got {
    exit: i32,
    status: u16,
    body: Vec<u8>,
}

fn s3_or_skip() -> Option<S3> {
    let c = cluster_or_skip()?;
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    Some(S3 {
        user: format!(
            "{}:{}",
            c.var("AWS_ACCESS_KEY_ID"),
            c.var("AWS_SECRET_ACCESS_KEY")
        ),
        vars: c.exports(),
        endpoint: c.endpoint,
        bucket: c.bucket,
        region: c.region,
        prefix: format!("proxytest/{}-{n}/", std::process::id()),
        dir: tempfile::tempdir().unwrap(),
        keys: Default::default(),
    })
}

macro_rules! s3_or_return {
    () => {
        match s3_or_skip() {
            Some(s) => s,
            None => return,
        }
    };
}

impl S3 {
    /// A key under this test's prefix, deleted at the end.
    fn key(&self, name: &str) -> String {
        let key = format!("{}{name}", self.prefix);
        self.keys.borrow_mut().push(key.clone());
        key
    }

    fn url(&self, endpoint: &str, key: &str) -> String {
        format!("{endpoint}/{}/{key}", self.bucket)
    }

    fn auth(&self) -> Vec<String> {
        let sigv4 = format!("aws:amz:{}:s3", self.region);
        ["--aws-sigv4", &sigv4, "--user", &self.user]
            .map(String::from)
            .into()
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// curl with signing, a 30 s bound, the body into a file; `args` last.
    fn curl(&self, args: &[&str]) -> Got {
        let out = self.dir.path().join("out");
        let _ = std::fs::remove_file(&out);
        let o = Command::new("curl")
            .args(["-sS", "--max-time", "30", "-o"])
            .arg(&out)
            .args(["-w", "%{http_code}"])
            .args(self.auth())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run curl");
        let status = String::from_utf8_lossy(&o.stdout);
        Got {
            exit: o.status.code().unwrap_or(-1),
            status: status.trim().parse().unwrap_or(0),
            body: std::fs::read(&out).unwrap_or_default(),
        }
    }

    fn put(&self, endpoint: &str, key: &str, file: &Path) -> Got {
        self.curl(&["-T", file.to_str().unwrap(), &self.url(endpoint, key)])
    }

    /// A PUT without `Expect: 100-continue` (`-H Expect:` would be signed
    /// by curl 7.88 but not sent: SignatureDoesNotMatch). curl adds it to
    /// `--data-binary` bodies over 1 MiB only.
    fn put_no_expect(&self, endpoint: &str, key: &str, file: &Path) -> Got {
        let data = format!("@{}", file.display());
        let unsigned = "x-amz-content-sha256: UNSIGNED-PAYLOAD";
        let url = self.url(endpoint, key);
        self.curl(&["-X", "PUT", "-H", unsigned, "--data-binary", &data, &url])
    }

    fn get(&self, endpoint: &str, key: &str) -> Got {
        self.curl(&[&self.url(endpoint, key)])
    }

    /// The object as the gateway itself has it (`None` on 404).
    fn stored(&self, key: &str) -> Option<Vec<u8>> {
        let g = self.get(&self.endpoint, key);
        match g.status {
            200 => Some(g.body),
            404 => None,
            _ => panic!("GET {key} from the gateway: {g:?}"),
        }
    }

    /// Stores `bytes` under `key` through the gateway directly.
    fn seed(&self, key: &str, bytes: &[u8]) {
        let f = self.file("seed", bytes);
        assert_eq!(self.put(&self.endpoint, key, &f).status, 200);
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        for key in self.keys.borrow().iter() {
            let url = self.url(&self.endpoint, key);
            let _ = self.curl(&["-X", "DELETE", &url]);
        }
    }
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn seen(
    method: &str,
    status: Option<u16>,
    fault: Option<&'static str>,
) -> (String, Option<u16>, Option<&'static str>) {
    (method.to_string(), status, fault)
}

fn summary(p: &FaultProxy) -> Vec<(String, Option<u16>, Option<&'static str>)> {
    p.requests()
        .into_iter()
        .map(
            |Seen {
                 method,
                 status,
                 fault,
                 ..
             }| (method, status, fault),
        )
        .collect()
}

#[track_caller]
fn assert_s3_error(g: &Got, status: u16, code: &str) {
    assert_eq!(g.status, status, "{g:?}");
    let body = String::from_utf8_lossy(&g.body);
    assert!(body.contains(&format!("<Code>{code}</Code>")), "{body}");
}

/// curl 7.88 sends `Expect: 100-continue` with every `-T` upload: it saw
/// at most the gateway's `100 Continue`, then the connection closed (while
/// it sent: 55, or read: 52 empty reply, 56 reset).
#[track_caller]
fn assert_no_answer(g: &Got) {
    assert!(
        [52, 55, 56].contains(&g.exit) && [0, 100].contains(&g.status),
        "{g:?}"
    );
}

#[test]
fn pass_mode_is_transparent() {
    let s3 = s3_or_return!();
    let proxy = FaultProxy::start(&s3.endpoint);
    let ep = proxy.endpoint();
    let data = random_bytes(1, 300 * KIB);
    let key = s3.key("plain");
    // Without `Expect` (curl 7.88 sends it with every -T upload).
    let put = s3.put_no_expect(&ep, &key, &s3.file("plain", &data));
    assert_eq!((put.exit, put.status), (0, 200), "{put:?}");
    assert_eq!(s3.stored(&key).as_deref(), Some(&data[..]));
    let got = s3.get(&ep, &key);
    assert_eq!((got.exit, got.status), (0, 200));
    assert!(
        got.body == data,
        "GET through the proxy returned other bytes"
    );
    assert_eq!(proxy.connections(), 2);

    // HEAD then GET on one kept-alive connection: the HEAD answer's
    // Content-Length announces no body, or the GET would hang.
    let url = s3.url(&ep, &key);
    let out = s3.dir.path().join("second");
    let mut args: Vec<String> = ["-sS", "--max-time", "30", "-I", "-o", "/dev/null"]
        .map(String::from)
        .into();
    args.extend(s3.auth());
    args.extend([url.clone(), "--next".into(), "-o".into()]);
    args.push(out.to_str().unwrap().into());
    args.extend(s3.auth());
    args.push(url);
    let st = Command::new("curl").args(&args).status().unwrap();
    assert!(st.success());
    assert!(std::fs::read(&out).unwrap() == data);
    assert_eq!(proxy.connections(), 3, "HEAD and GET shared one connection");

    // A chunked upload (stdin) and one with `Expect: 100-continue`.
    let chunked = random_bytes(2, 200 * KIB);
    let ckey = s3.key("chunked");
    let mut child = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(s3.auth())
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-T", "-"])
        .arg(s3.url(&ep, &ckey))
        .arg("-v")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &chunked).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "200");
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("> Transfer-Encoding: chunked"), "{log}");
    assert_eq!(s3.stored(&ckey).as_deref(), Some(&chunked[..]));

    let big = random_bytes(3, 2 * KIB * KIB);
    let bkey = s3.key("expect");
    let f = s3.file("expect", &big);
    let put = s3.curl(&[
        "-H",
        "Expect: 100-continue",
        "-T",
        f.to_str().unwrap(),
        &s3.url(&ep, &bkey),
    ]);
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(s3.stored(&bkey).as_deref(), Some(&big[..]));
    let methods: Vec<_> = summary(&proxy);
    assert_eq!(
        methods,
        [
            seen("PUT", Some(200), None),
            seen("GET", Some(200), None),
            seen("HEAD", Some(200), None),
            seen("GET", Some(200), None),
            seen("PUT", Some(200), None),
            seen("PUT", Some(200), None),
        ]
    );
}

#[test]
fn slow_down_answers_the_next_n_matching_requests() {
    let s3 = s3_or_return!();
    let proxy = FaultProxy::start(&s3.endpoint);
    let ep = proxy.endpoint();
    let data = random_bytes(4, 10 * KIB);
    let key = s3.key("slow");
    s3.seed(&key, &data);
    proxy.set(Rule::SlowDown {
        n: 2,
        filter: Filter::method("GET"),
    });
    // A PUT does not match and passes; it uses none of the two.
    let other = s3.key("other");
    assert_eq!(s3.put(&ep, &other, &s3.file("o", b"x")).status, 200);
    assert_s3_error(&s3.get(&ep, &key), 503, "SlowDown");
    assert_s3_error(&s3.get(&ep, &key), 503, "SlowDown");
    let third = s3.get(&ep, &key);
    assert_eq!(third.status, 200);
    assert!(third.body == data);
    assert_eq!(
        summary(&proxy),
        [
            seen("PUT", Some(200), None),
            seen("GET", Some(503), Some("SlowDown")),
            seen("GET", Some(503), Some("SlowDown")),
            seen("GET", Some(200), None),
        ]
    );
}

#[test]
fn server_error_never_reaches_the_store() {
    let s3 = s3_or_return!();
    let proxy = FaultProxy::start(&s3.endpoint);
    let ep = proxy.endpoint();
    let (small, big) = (s3.key("small"), s3.key("big"));
    proxy.set(Rule::ServerError {
        n: 2,
        filter: Filter::path(&s3.prefix),
    });
    // Without `Expect` the proxy reads the body, answers and goes on.
    let f = s3.file("small", b"small");
    assert_s3_error(&s3.put_no_expect(&ep, &small, &f), 500, "InternalError");
    // With `Expect: 100-continue` it answers without the body and closes.
    let data = random_bytes(5, 2 * KIB * KIB);
    let fb = s3.file("big", &data);
    let url = s3.url(&ep, &big);
    let g = s3.curl(&[
        "-H",
        "Expect: 100-continue",
        "-T",
        fb.to_str().unwrap(),
        &url,
    ]);
    assert_s3_error(&g, 500, "InternalError");
    assert_eq!(s3.stored(&small), None);
    assert_eq!(s3.stored(&big), None);
    assert_eq!(s3.put(&ep, &small, &f).status, 200, "the third passes");
    assert_eq!(s3.stored(&small).as_deref(), Some(&b"small"[..]));
}

#[test]
fn cut_request_mid_body_leaves_nothing() {
    let s3 = s3_or_return!();
    let proxy = FaultProxy::start(&s3.endpoint);
    let ep = proxy.endpoint();
    let key = s3.key("cut");
    let f = s3.file("cut", &random_bytes(6, KIB * KIB));
    proxy.set(Rule::CutRequest {
        n: 1,
        after_bytes: 1000,
        filter: Filter::method("PUT"),
    });
    let g = s3.put(&ep, &key, &f);
    assert_no_answer(&g);
    assert_eq!(s3.stored(&key), None);
    // Without `Expect` the cut hits curl while it sends.
    proxy.set(Rule::CutRequest {
        n: 1,
        after_bytes: 1000,
        filter: Filter::method("PUT"),
    });
    let f = s3.file("cut2", &random_bytes(8, 900 * KIB));
    let g = s3.put_no_expect(&ep, &key, &f);
    assert!(g.exit != 0 && g.status == 0, "{g:?}");
    assert_eq!(s3.stored(&key), None);
    let cut = seen("PUT", None, Some("CutRequest"));
    assert_eq!(summary(&proxy), [cut.clone(), cut]);
    assert_eq!(s3.put(&ep, &key, &f).status, 200, "the next passes");
}

#[test]
fn cut_request_after_the_whole_body_loses_only_the_answer() {
    let s3 = s3_or_return!();
    let proxy = FaultProxy::start(&s3.endpoint);
    let key = s3.key("applied");
    proxy.set(Rule::CutRequest {
        n: 1,
        after_bytes: u64::MAX,
        filter: Filter::any(),
    });
    let g = s3.put(&proxy.endpoint(), &key, &s3.file("a", b"applied"));
    assert_no_answer(&g);
    assert_eq!(s3.stored(&key).as_deref(), Some(&b"applied"[..]));
}

#[test]
fn cut_response_truncates_the_body() {
    let s3 = s3_or_return!();
    let proxy = FaultProxy::start(&s3.endpoint);
    let ep = proxy.endpoint();
    let data = random_bytes(7, 100 * KIB);
    let key = s3.key("resp");
    s3.seed(&key, &data);
    let cut = |after_bytes| {
        proxy.set(Rule::CutResponse {
            n: 1,
            after_bytes,
            filter: Filter::method("GET"),
        })
    };
    cut(1000);
    let g = s3.get(&ep, &key);
    assert_eq!((g.exit, g.status), (18, 200), "curl: partial file");
    assert!(g.body == data[..1000]);
    // A body not longer than after_bytes still loses its last byte.
    cut(u64::MAX);
    let g = s3.get(&ep, &key);
    assert_eq!((g.exit, g.status), (18, 200));
    assert!(g.body == data[..data.len() - 1]);
    let g = s3.get(&ep, &key);
    assert_eq!((g.exit, g.status), (0, 200), "the next passes");
    assert!(g.body == data);
}

#[test]
fn down_refuses_everything_until_set_back() {
    let s3 = s3_or_return!();
    let proxy = FaultProxy::start(&s3.endpoint);
    let ep = proxy.endpoint();
    let key = s3.key("down");
    let f = s3.file("down", b"down");
    proxy.set(Rule::Down);
    for _ in 0..3 {
        assert_s3_error(&s3.put(&ep, &key, &f), 503, "ServiceUnavailable");
        assert_s3_error(&s3.get(&ep, &key), 503, "ServiceUnavailable");
    }
    assert_eq!(s3.stored(&key), None);
    proxy.set(Rule::Pass);
    assert_eq!(s3.put(&ep, &key, &f).status, 200);
    assert_eq!(s3.get(&ep, &key).body, b"down");
}

#[test]
fn down_after_passes_n_matching_requests_then_refuses_them() {
    let s3 = s3_or_return!();
    let proxy = FaultProxy::start(&s3.endpoint);
    let ep = proxy.endpoint();
    let f = s3.file("da", b"da");
    proxy.set(Rule::DownAfter {
        pass: 2,
        filter: Filter::path("/da-"),
    });
    let keys: Vec<String> = (0..4).map(|i| s3.key(&format!("da-{i}"))).collect();
    assert_eq!(s3.put(&ep, &keys[0], &f).status, 200);
    assert_eq!(s3.put(&ep, &keys[1], &f).status, 200);
    for k in &keys[2..] {
        assert_s3_error(&s3.put(&ep, k, &f), 503, "ServiceUnavailable");
        assert_eq!(s3.stored(k), None);
    }
    // What the filter does not match passes.
    let other = s3.key("other");
    assert_eq!(s3.put(&ep, &other, &f).status, 200);
    assert_eq!(s3.stored(&keys[0]).as_deref(), Some(&b"da"[..]));
    // A GET matches too: refused.
    assert_s3_error(&s3.get(&ep, &keys[0]), 503, "ServiceUnavailable");
    proxy.set(Rule::Pass);
    assert_eq!(s3.put(&ep, &keys[3], &f).status, 200);
}

/// A stand-in upstream (no cluster needed) for the response framings the
/// gateway does not use: each request, on any connection, gets the next
/// canned response; one without a length is ended by closing, and so is
/// one that says `Connection: close` (as after an idle timeout).
fn fake_upstream(responses: Vec<&'static str>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(responses.into_iter()));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let (queue, mut conn) = (queue.clone(), conn.unwrap());
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    if line != "\r\n" {
                        line.clear();
                        continue;
                    }
                    line.clear();
                    let Some(resp) = queue.lock().unwrap().next() else {
                        return;
                    };
                    conn.write_all(resp.as_bytes()).unwrap();
                    let framed = resp.contains("chunked") || resp.contains("Content-Length");
                    if !framed || resp.contains("close") {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Plain curl (no signing): exit code and the files it wrote.
fn curl_into(outs: &[PathBuf], urls: &[String]) -> (i32, Vec<Vec<u8>>) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "10"]);
    for (o, u) in outs.iter().zip(urls) {
        c.arg("-o").arg(o).arg(u);
    }
    let code = c.status().unwrap().code().unwrap_or(-1);
    let read = |o: &PathBuf| std::fs::read(o).unwrap_or_default();
    (code, outs.iter().map(read).collect())
}

#[test]
fn chunked_and_close_delimited_responses() {
    const CHUNKED: &str = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                           5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n";
    const UNTIL_CLOSE: &str = "HTTP/1.1 200 OK\r\n\r\nbye";
    const LAST: &str = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Then: close\r\n\r\nlast";
    let responses = vec![CHUNKED, CHUNKED, CHUNKED, UNTIL_CLOSE, LAST, LAST];
    let proxy = FaultProxy::start(&fake_upstream(responses));
    let dir = tempfile::tempdir().unwrap();
    let outs: Vec<PathBuf> = (0..2).map(|i| dir.path().join(i.to_string())).collect();
    let url = format!("{}/x", proxy.endpoint());
    let two = [url.clone(), url.clone()];
    let (code, bodies) = curl_into(&outs, &two);
    assert_eq!((code, bodies), (0, vec![b"hello world".to_vec(); 2]));
    assert_eq!(
        proxy.connections(),
        1,
        "two chunked answers, one connection"
    );
    proxy.set(Rule::CutResponse {
        n: 1,
        after_bytes: u64::MAX,
        filter: Filter::any(),
    });
    let (code, bodies) = curl_into(&outs[..1], &two[..1]);
    assert_eq!(
        (code, &bodies[0][..]),
        (18, &b"hello world"[..]),
        "no last chunk"
    );
    let (code, bodies) = curl_into(&outs[..1], &two[..1]);
    assert_eq!((code, &bodies[0][..]), (0, &b"bye"[..]));
    // The server closes after the first answer; the client's connection
    // to the proxy goes on (curl would open a second one otherwise).
    let (code, bodies) = curl_into(&outs, &two);
    assert_eq!((code, bodies), (0, vec![b"last".to_vec(); 2]));
    assert_eq!(proxy.connections(), 4);
    let ok = seen("GET", Some(200), None);
    let cut = seen("GET", Some(200), Some("CutResponse"));
    let want = [ok.clone(), ok.clone(), cut, ok.clone(), ok.clone(), ok];
    assert_eq!(summary(&proxy), want);
}

/// rclone (the Go AWS SDK: multipart upload, its own retries) through the
/// proxy: throttled and cut part uploads are retried and the object is
/// whole.
#[test]
fn an_sdk_client_retries_through_faults() {
    let s3 = s3_or_return!();
    let proxy = FaultProxy::start(&s3.endpoint);
    let data = random_bytes(9, 12 * KIB * KIB);
    let f = s3.file("multipart", &data);
    let upload = |key: &str| {
        Command::new("rclone")
            .env_remove("AWS_CA_BUNDLE")
            .envs(s3.vars.iter().map(|(k, v)| (k, v)))
            .env("RCLONE_CONFIG_DSGTEST_ENDPOINT", proxy.endpoint())
            .args(["copyto", "--retries", "1", "--low-level-retries", "5"])
            .args(["--s3-upload-cutoff", "5M", "--s3-chunk-size", "5M"])
            .arg(&f)
            .arg(format!("dsgtest:{}/{key}", s3.bucket))
            .output()
            .expect("rclone is installed by scripts/setup-services")
    };
    proxy.set(Rule::SlowDown {
        n: 2,
        filter: Filter::path("partNumber="),
    });
    let key = s3.key("multipart");
    let o = upload(&key);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(s3.stored(&key) == Some(data.clone()), "the object is whole");
    let seen = proxy.requests();
    let slowed = seen.iter().filter(|r| r.fault.is_some()).count();
    assert_eq!(slowed, 2, "{seen:#?}");
    // A part cut mid-body (a new key: rclone skips an object it has).
    proxy.set(Rule::CutRequest {
        n: 1,
        after_bytes: 100_000,
        filter: Filter::path("partNumber=2"),
    });
    let key = s3.key("multipart2");
    let o = upload(&key);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(s3.stored(&key) == Some(data), "the object is whole");
    let seen = proxy.requests();
    let cut = seen.iter().filter(|r| r.fault == Some("CutRequest"));
    assert_eq!(cut.count(), 1, "{seen:#?}");
}
