//! Credentials from the usual places, never from `.dsgconfig.yml`:
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`),
//! else the profile `AWS_PROFILE` (default `default`) of the shared
//! credentials file (`AWS_SHARED_CREDENTIALS_FILE`, default
//! `~/.aws/credentials`).

use std::path::PathBuf;

use crate::S3Error;

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub key: String,
    pub secret: String,
    pub token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, not even in a debug log.
        f.debug_struct("Credentials")
            .field("key", &self.key)
            .finish()
    }
}

/// The credentials to use, or an error saying where they were looked for.
pub fn credentials() -> Result<Credentials, S3Error> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(key), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Ok(Credentials {
            key,
            secret,
            token: env("AWS_SESSION_TOKEN"),
        });
    }
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let file = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")));
    let missing = || {
        S3Error::NoCredentials {
        looked: format!(
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are not set, and {} has no profile [{profile}] with aws_access_key_id and aws_secret_access_key",
            file.as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_else(|| "~/.aws/credentials".into())
        ),
    }
    };
    let Some(path) = &file else {
        return Err(missing());
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return Err(missing());
    };
    from_profile(&text, &profile).ok_or_else(missing)
}

/// The profile's keys in an INI-style credentials file.
fn from_profile(text: &str, profile: &str) -> Option<Credentials> {
    let (mut key, mut secret, mut token) = (None, None, None);
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == profile;
            continue;
        }
        if !inside {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().to_string();
        match k.trim() {
            "aws_access_key_id" => key = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    Some(Credentials {
        key: key?,
        secret: secret?,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_is_read_from_its_section_only() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key = B\n\n\
                    [other]\n# comment\naws_access_key_id=C\naws_secret_access_key=D\naws_session_token=T\n";
        let d = from_profile(text, "default").unwrap();
        assert_eq!(
            (d.key.as_str(), d.secret.as_str(), d.token),
            ("A", "B", None)
        );
        let o = from_profile(text, "other").unwrap();
        assert_eq!((o.key.as_str(), o.secret.as_str()), ("C", "D"));
        assert_eq!(o.token.as_deref(), Some("T"));
        assert!(from_profile(text, "missing").is_none());
        assert!(from_profile("[default]\naws_access_key_id = A\n", "default").is_none());
    }

    #[test]
    fn the_secret_is_never_printed() {
        let c = Credentials {
            key: "AKIA".into(),
            secret: "hunter2".into(),
            token: None,
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
