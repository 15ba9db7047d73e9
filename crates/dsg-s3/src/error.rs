//! Errors, each naming the endpoint or key and with a hint.

use crate::Location;

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("{message}")]
    Config { message: String },
    #[error("no S3 credentials: {looked}")]
    NoCredentials { looked: String },
    #[error("cannot reach {endpoint} ({what}): {message}")]
    Unreachable {
        endpoint: String,
        what: String,
        message: String,
    },
    #[error("{endpoint} refused {what} to these credentials ({code}): {message}")]
    Denied {
        endpoint: String,
        what: String,
        code: String,
        message: String,
    },
    #[error("bucket {bucket} does not exist on {endpoint}")]
    NoBucket { bucket: String, endpoint: String },
    #[error("{key}: the write's precondition failed (another writer got there first)")]
    Precondition { key: String },
    #[error("{key}: a conditional write was retried after a dropped connection and its retry failed the precondition; whether the first try landed is unknown")]
    Ambiguous { key: String },
    #[error("{endpoint} is throttling requests ({what}, still {status} SlowDown after retries)")]
    Throttled {
        endpoint: String,
        what: String,
        status: u16,
    },
    #[error("{endpoint} answered {status} {code} for {what}: {message}")]
    Server {
        endpoint: String,
        what: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{what}: {message}")]
    Protocol { what: String, message: String },
    #[error("{endpoint} does not honour conditional writes: {what}")]
    Unsafe { endpoint: String, what: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl S3Error {
    pub(crate) fn from_status(
        loc: &Location,
        what: &str,
        status: u16,
        code: String,
        message: String,
    ) -> S3Error {
        let endpoint = loc.endpoint.clone();
        let what = what.to_string();
        match (status, code.as_str()) {
            (403, _) | (_, "InvalidAccessKeyId") | (_, "SignatureDoesNotMatch") => {
                S3Error::Denied {
                    endpoint,
                    what,
                    code,
                    message,
                }
            }
            (404, "NoSuchBucket") => S3Error::NoBucket {
                bucket: loc.bucket.clone(),
                endpoint,
            },
            (503, _) | (_, "SlowDown") => S3Error::Throttled {
                endpoint,
                what,
                status,
            },
            _ => S3Error::Server {
                endpoint,
                what,
                status,
                code,
                message,
            },
        }
    }

    pub(crate) fn transport(loc: &Location, what: &str, e: ureq::Error) -> S3Error {
        S3Error::Unreachable {
            endpoint: loc.endpoint.clone(),
            what: what.to_string(),
            message: e.to_string(),
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> String {
        match self {
            S3Error::Config { .. } => "check the repository's endpoint in .dsgconfig.yml (http://host:port or https://host)".into(),
            S3Error::NoCredentials { .. } => "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials (AWS_PROFILE picks one); dsg never stores keys in .dsgconfig.yml".into(),
            S3Error::Unreachable { .. } => "check the endpoint URL and that the server is up and reachable from here; nothing was changed".into(),
            // The key is known but may not do this: typically a read-only key.
            S3Error::Denied { code, .. } if code == "AccessDenied" => "these credentials may not do this: a key that may only read the bucket can clone, status and fetch, not sync; ask for write access (or check AWS_ACCESS_KEY_ID / the AWS_PROFILE in use)".into(),
            S3Error::Denied { .. } => "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the AWS_PROFILE in use) and that the key may read and write the bucket".into(),
            S3Error::NoBucket { .. } => "create the bucket first (dsg does not create buckets), or fix the bucket name".into(),
            S3Error::Precondition { .. } | S3Error::Ambiguous { .. } => "another dsg wrote the repository meanwhile; run the command again".into(),
            S3Error::Throttled { .. } => "the object store is overloaded or rate-limiting this client; wait a little and run the command again".into(),
            S3Error::Server { .. } | S3Error::Io { .. } | S3Error::Protocol { .. } => "the object store failed the request; nothing was committed, run the command again (ask its operator if it persists)".into(),
            S3Error::Unsafe { .. } => "dsg needs If-None-Match / If-Match on PutObject to commit safely beside other writers; use a server that has them (SeaweedFS, AWS S3, recent MinIO)".into(),
        }
    }
}
