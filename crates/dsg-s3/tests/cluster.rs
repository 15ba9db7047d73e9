//! The client against the test cluster (SeaweedFS on loopback, started by
//! scripts/setup-services; its endpoint and keys in
//! /var/tmp/dsg-test/s3.env). Skipped without it, unless CI=true.

use dsg_s3::{Cond, Credentials, Location, S3Error, Store};

fn env_file() -> Option<Vec<(String, String)>> {
    let path = std::env::var("DSG_TEST_S3_ENV").unwrap_or("/var/tmp/dsg-test/s3.env".into());
    let text = std::fs::read_to_string(&path).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect(),
    )
}

fn store(prefix: &str) -> Option<Store> {
    let Some(vars) = env_file() else {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("CI=true but the S3 test cluster is not set up (run scripts/setup-services)");
        }
        eprintln!("SKIPPED: no S3 test cluster (run scripts/setup-services)");
        return None;
    };
    let get = |k: &str| {
        vars.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k} missing from s3.env"))
    };
    let loc = Location {
        endpoint: get("AWS_ENDPOINT_URL"),
        bucket: get("DSG_TEST_BUCKET"),
        prefix: format!("s3client/{}-{prefix}", std::process::id()),
        region: get("AWS_REGION"),
    };
    let creds = Credentials {
        key: get("AWS_ACCESS_KEY_ID"),
        secret: get("AWS_SECRET_ACCESS_KEY"),
        token: None,
    };
    Some(Store::new(loc, &creds).unwrap())
}

fn cleanup(s: &Store) {
    for (name, _) in s.list("").unwrap() {
        s.delete(&name).unwrap();
    }
}

#[test]
fn conditional_writes_decide_one_winner_and_keep_its_bytes() {
    let Some(s) = store("cond") else { return };
    s.check_bucket().unwrap();
    let e1 = s.put("HEAD", b"one", &Cond::Absent).unwrap();
    assert!(matches!(
        s.put("HEAD", b"two", &Cond::Absent),
        Err(S3Error::Precondition { .. })
    ));
    assert!(matches!(
        s.put("HEAD", b"two", &Cond::Etag("\"nope\"".into())),
        Err(S3Error::Precondition { .. })
    ));
    assert_eq!(s.get("HEAD").unwrap().unwrap().0, b"one");
    let e2 = s.put("HEAD", b"three", &Cond::Etag(e1.clone())).unwrap();
    assert_ne!(e1, e2);
    assert!(matches!(
        s.put("HEAD", b"four", &Cond::Etag(e1)),
        Err(S3Error::Precondition { .. })
    ));
    let (body, etag) = s.get("HEAD").unwrap().unwrap();
    assert_eq!((body.as_slice(), etag), (&b"three"[..], e2.clone()));
    assert_eq!(s.head("HEAD").unwrap().unwrap().etag, e2);
    assert_eq!(s.head("missing").unwrap(), None);
    assert_eq!(s.get("missing").unwrap(), None);
    s.probe_conditional("probe").unwrap();
    assert_eq!(s.head("probe").unwrap(), None, "the probe cleans up");
    cleanup(&s);
}

#[test]
fn racing_conditional_writers_have_exactly_one_winner() {
    let Some(s) = store("race") else { return };
    for round in 0..20 {
        let key = format!("k{round}");
        let wins: Vec<bool> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|i| {
                    let (s, key) = (&s, &key);
                    sc.spawn(move || {
                        s.put(key, format!("w{i}").as_bytes(), &Cond::Absent)
                            .is_ok()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            wins.iter().filter(|w| **w).count(),
            1,
            "round {round}: {wins:?}"
        );
        let winner = wins.iter().position(|w| *w).unwrap();
        assert_eq!(
            s.get(&key).unwrap().unwrap().0,
            format!("w{winner}").as_bytes()
        );
    }
    cleanup(&s);
}

#[test]
fn lists_page_through_and_multipart_assembles_in_order() {
    let Some(s) = store("list") else { return };
    for i in 0..1100 {
        s.put(&format!("data/{i:05}"), b"x", &Cond::None).unwrap();
    }
    let names = s.list("data/").unwrap();
    assert_eq!(names.len(), 1100);
    assert_eq!(names[0], ("data/00000".to_string(), 1));
    assert!(names.windows(2).all(|w| w[0].0 < w[1].0));

    let part = |n: u8| vec![n; 5 << 20];
    let id = s.multipart_create("big").unwrap();
    assert_eq!(
        s.multipart_list("").unwrap(),
        vec![("big".to_string(), id.clone())]
    );
    let etags: Vec<String> = (1..=3)
        .map(|n| s.multipart_part("big", &id, n, &part(n as u8)).unwrap())
        .collect();
    assert_eq!(s.head("big").unwrap(), None, "invisible until completed");
    s.multipart_complete("big", &id, &etags).unwrap();
    let (body, _) = s.get("big").unwrap().unwrap();
    assert_eq!(body, [part(1), part(2), part(3)].concat());
    assert!(s.multipart_list("").unwrap().is_empty());

    let gone = s.multipart_create("gone").unwrap();
    s.multipart_part("gone", &gone, 1, b"abc").unwrap();
    s.multipart_abort("gone", &gone).unwrap();
    assert!(s.multipart_list("").unwrap().is_empty());
    assert_eq!(s.head("gone").unwrap(), None);
    cleanup(&s);
}

/// What a resumed upload relies on: the parts an unfinished upload holds,
/// listed (paged) with sizes and ETags, each ETag the MD5 of its bytes; a
/// completion takes the parts whose ETags it names (a part sent twice
/// under one number: the one named) and refuses an ETag no part has; an
/// aborted upload is gone.
#[test]
fn an_unfinished_uploads_parts_are_listed_with_their_md5() {
    let Some(s) = store("parts") else { return };
    const LEN: usize = 5 << 20;
    let body = |n: u16, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u64 * 31 + n as u64 * 7) as u8)
            .collect()
    };
    let id = s.multipart_create("big").unwrap();
    let mut etags = Vec::new();
    for n in 1..=3u16 {
        etags.push(s.multipart_part("big", &id, n, &body(n, LEN)).unwrap());
    }
    let parts = s.multipart_parts("big", &id).unwrap().unwrap();
    assert_eq!(parts.len(), 3, "{parts:?}");
    for (p, n) in parts.iter().zip(1..=3u16) {
        assert_eq!((p.number, p.size), (n, LEN as u64));
        assert_eq!(
            p.etag.trim_matches('"'),
            etags[n as usize - 1].trim_matches('"')
        );
        assert!(p.holds(&body(n, LEN)), "part {n}: {p:?}");
        assert!(!p.holds(&body(n + 10, LEN)), "other bytes, same size");
        assert!(!p.holds(&body(n, LEN - 1)), "a shorter body");
    }
    // Part 2 sent again with other bytes: listed (SeaweedFS may list the
    // first one too, until completion).
    let other = vec![9u8; LEN];
    let e_other = s.multipart_part("big", &id, 2, &other).unwrap();
    let parts = s.multipart_parts("big", &id).unwrap().unwrap();
    assert!(
        parts.iter().any(|p| p.number == 2 && p.holds(&other)),
        "{parts:?}"
    );
    let wrong = "\"0123456789abcdef0123456789abcdef\"".to_string();
    let e = s
        .multipart_complete("big", &id, &[etags[0].clone(), wrong, etags[2].clone()])
        .unwrap_err();
    assert!(e.to_string().contains("InvalidPart"), "{e}");
    s.multipart_complete("big", &id, &[etags[0].clone(), e_other, etags[2].clone()])
        .unwrap();
    let (got, _) = s.get("big").unwrap().unwrap();
    assert!(got == [body(1, LEN), other, body(3, LEN)].concat());
    assert_eq!(s.multipart_parts("big", &id).unwrap(), None, "completed");
    // More parts than one page (1000) of the listing.
    let many = s.multipart_create("many").unwrap();
    std::thread::scope(|sc| {
        for t in 0..8u16 {
            let (s, many) = (&s, &many);
            sc.spawn(move || {
                for n in (1..=1010u16).filter(|n| n % 8 == t) {
                    s.multipart_part("many", many, n, &n.to_le_bytes()).unwrap();
                }
            });
        }
    });
    let parts = s.multipart_parts("many", &many).unwrap().unwrap();
    let numbers: Vec<u16> = parts.iter().map(|p| p.number).collect();
    assert_eq!(numbers, (1..=1010).collect::<Vec<u16>>());
    assert!(parts.iter().all(|p| p.holds(&p.number.to_le_bytes())));
    s.multipart_abort("many", &many).unwrap();
    assert_eq!(s.multipart_parts("many", &many).unwrap(), None, "aborted");
    cleanup(&s);
}

#[test]
fn a_part_etag_not_a_plain_md5_proves_nothing() {
    let md5_of_abc = "900150983cd24fb0d6963f7d28e17f72";
    let part = |etag: &str, size| dsg_s3::Part {
        number: 1,
        size,
        etag: etag.into(),
    };
    assert!(part(&format!("\"{md5_of_abc}\""), 3).holds(b"abc"));
    assert!(part(md5_of_abc, 3).holds(b"abc"));
    assert!(!part(md5_of_abc, 4).holds(b"abc"), "size");
    assert!(!part(&format!("\"{md5_of_abc}-1\""), 3).holds(b"abc"));
    assert!(!part("\"900150983cd24fb0d6963f7d28e17f7\"", 3).holds(b"abc"));
    assert!(!part("\"zz0150983cd24fb0d6963f7d28e17f72\"", 3).holds(b"abc"));
}

#[test]
fn bad_credentials_missing_buckets_and_dead_endpoints_are_named() {
    let Some(s) = store("errors") else { return };
    let loc = s.location().clone();
    let wrong = Credentials {
        key: "WRONGKEY".into(),
        secret: "wrong".into(),
        token: None,
    };
    let e = Store::new(loc.clone(), &wrong)
        .unwrap()
        .check_bucket()
        .unwrap_err();
    assert!(matches!(e, S3Error::Denied { .. }), "{e:?}");
    let e = Store::new(loc.clone(), &wrong)
        .unwrap()
        .put("x", b"x", &Cond::None)
        .unwrap_err();
    assert!(matches!(e, S3Error::Denied { .. }), "{e:?}");

    let creds = Credentials {
        key: env_file()
            .unwrap()
            .iter()
            .find(|(k, _)| k == "AWS_ACCESS_KEY_ID")
            .unwrap()
            .1
            .clone(),
        secret: env_file()
            .unwrap()
            .iter()
            .find(|(k, _)| k == "AWS_SECRET_ACCESS_KEY")
            .unwrap()
            .1
            .clone(),
        token: None,
    };
    let mut nob = loc.clone();
    nob.bucket = format!("no-such-bucket-{}", std::process::id());
    let e = Store::new(nob, &creds).unwrap().check_bucket().unwrap_err();
    assert!(matches!(e, S3Error::NoBucket { .. }), "{e:?}");

    let mut dead = loc;
    // A port nothing listens on (bound and dropped).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    dead.endpoint = format!("http://127.0.0.1:{port}");
    std::env::set_var("DSG_S3_ATTEMPTS", "2");
    let e = Store::new(dead, &creds)
        .unwrap()
        .check_bucket()
        .unwrap_err();
    assert!(matches!(e, S3Error::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains(&port.to_string()), "{e}");
}

#[test]
fn ranged_gets_return_exactly_the_range_and_the_objects_size() {
    let Some(s) = store("range") else { return };
    // A multipart object (ranges across its parts) and a plain one.
    let part = |n: u8| {
        (0..5u32 << 20)
            .map(|i| (i % 251) as u8 ^ n)
            .collect::<Vec<u8>>()
    };
    let whole = [part(1), part(2)].concat();
    let id = s.multipart_create("big").unwrap();
    let etags: Vec<String> = (1..=2)
        .map(|n| s.multipart_part("big", &id, n, &part(n as u8)).unwrap())
        .collect();
    s.multipart_complete("big", &id, &etags).unwrap();
    let size = whole.len() as u64;
    for (start, len) in [
        (0, 1),
        (0, size),
        ((5 << 20) - 3, 10),
        (size - 7, 7),
        (12345, 1 << 20),
    ] {
        let mut out = Vec::new();
        let total = s.get_range("big", start, len, &mut out).unwrap();
        assert_eq!(total, Some(size), "{start}+{len}");
        assert_eq!(
            out,
            whole[start as usize..(start + len) as usize],
            "{start}+{len}"
        );
    }
    s.put("small", b"0123456789", &Cond::None).unwrap();
    let mut out = Vec::new();
    assert_eq!(s.get_range("small", 3, 4, &mut out).unwrap(), Some(10));
    assert_eq!(out, b"3456");
    // Past the end, or running over it: refused, not a short answer.
    let mut out = Vec::new();
    assert!(matches!(
        s.get_range("small", 10, 5, &mut out),
        Err(S3Error::Protocol { .. })
    ));
    assert!(s.get_range("small", 8, 5, &mut Vec::new()).is_err());
    assert_eq!(s.get_range("missing", 0, 5, &mut Vec::new()).unwrap(), None);
    cleanup(&s);
}
