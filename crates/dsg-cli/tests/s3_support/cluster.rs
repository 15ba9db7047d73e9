//! The loopback S3 test cluster's settings (`/var/tmp/dsg-test/s3.env`,
//! or `DSG_TEST_S3_ENV`, written by scripts/s3-cluster), shared by the
//! world's `Kind::S3` and the S3 suites: a client of the store and the
//! environment of a `dsg` process using it. Missing: skipped, or under
//! `CI=true` a failure.
#![allow(dead_code)]

use std::fs;

use dsg_s3::{Credentials, Location, Store};

fn is_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// The lease of the worlds' writers (`DSG_S3_LEASE_SECS`): short, so that
/// the next command after a crash does not wait a minute; long enough that
/// a live writer on a loaded machine keeps renewing it.
pub const LEASE_SECS: u64 = 3;

/// The cluster's settings (`export K=V` lines of its env file).
#[derive(Clone, Debug)]
pub struct Cluster {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    key: String,
    secret: String,
    /// The env file's text, for the other variables (`var`).
    text: String,
}

/// The cluster, or `None` (after printing why) when its env file is
/// missing; under `CI=true` that fails.
pub fn cluster_or_skip() -> Option<Cluster> {
    let test = std::thread::current()
        .name()
        .unwrap_or("an s3 test")
        .to_string();
    let file = std::env::var("DSG_TEST_S3_ENV").unwrap_or("/var/tmp/dsg-test/s3.env".into());
    let Ok(text) = fs::read_to_string(&file) else {
        assert!(
            !is_ci(),
            "{test}: CI=true but {file} is missing: the S3 test cluster is not set up. Run \
             `bash scripts/setup-services` (it starts scripts/s3-cluster); under CI a missing \
             service is a failure."
        );
        eprintln!("SKIPPED {test}: {file} is missing (run scripts/setup-services)");
        return None;
    };
    let var = |name: &str| {
        let prefix = format!("export {name}=");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{file} has no {name}"))
            .to_string()
    };
    Some(Cluster {
        endpoint: var("AWS_ENDPOINT_URL"),
        bucket: var("DSG_TEST_BUCKET"),
        region: var("AWS_REGION"),
        key: var("AWS_ACCESS_KEY_ID"),
        secret: var("AWS_SECRET_ACCESS_KEY"),
        text: text.clone(),
    })
}

impl Cluster {
    /// Every `export NAME=value` of the env file, as written (rclone's
    /// remote `dsgtest:` needs them all).
    pub fn exports(&self) -> Vec<(String, String)> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Another `export NAME=value` of the env file.
    pub fn var(&self, name: &str) -> String {
        let prefix = format!("export {name}=");
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("the S3 env file has no {name}"))
            .trim_matches('"')
            .to_string()
    }

    /// A client of the store for keys under `prefix`.
    pub fn store(&self, prefix: &str) -> Store {
        let creds = Credentials {
            key: self.key.clone(),
            secret: self.secret.clone(),
            token: None,
        };
        let loc = Location {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            prefix: prefix.into(),
            region: self.region.clone(),
        };
        Store::new(loc, &creds).expect("a store client")
    }

    /// The environment of a `dsg` process using this cluster.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("DSG_S3_LEASE_SECS", LEASE_SECS.to_string()),
        ]
    }
}
