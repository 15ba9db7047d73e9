//! Uploading a transaction's files, surviving dropped connections.
//!
//! Uploads are pipelined: the agent acknowledges them only at the `flush`
//! barrier, so when a connection drops the client does not know what
//! arrived. It reconnects and asks the agent to `resume` the same
//! transaction; the agent answers with what it still has staged (whole
//! files and partial ones), and only the missing bytes are sent again. The
//! agent verifies every file whole (staged prefix and new bytes hashed
//! together), so a resumed file is checked exactly like a fresh one. If the
//! agent cannot resume (its staging was recovered by another command, or
//! the repository moved), it begins afresh and everything is sent again.

use dsg_repo::{RepoClient, RepoError};

use crate::retry::Retries;
use crate::{check_interrupt, EngineError, Project, Reporter, Result};

/// With a local repository, the upload asks the agent how far it got after
/// this many queued bytes or files (one round trip each: cheap next to
/// copying 32 MiB or 256 files).
const PACE_BYTES: u64 = 32 << 20;
const PACE_FILES: u64 = 256;

/// One thing to upload.
#[derive(Clone, Copy)]
pub enum Item<'a> {
    File {
        path: &'a str,
        size: u64,
        hash: u64,
        mtime_ns: i64,
        /// Where the bytes are, when not at `path` in the project (a
        /// version restored into staging).
        src: Option<&'a std::path::Path>,
    },
    Link {
        path: &'a str,
        target: &'a str,
    },
}

/// What the uploads are for.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// A new repository; `replace`: replacing an existing one, confirmed
    /// by the user having seen the head whose hash is `confirmed`.
    Init {
        replace: bool,
        confirmed: Option<&'a str>,
    },
    /// A new snapshot on top of head `base`, whose snapshot hash is
    /// `base_hash`.
    Sync {
        base: &'a str,
        base_hash: Option<&'a str>,
    },
}

/// Begins transaction `tx` for `target`, sends `items`
/// and waits for the agent to confirm all of them. `items` is walked
/// again for each attempt, so a caller can derive them from what it holds
/// (an init's every file) instead of listing them. A dropped connection is
/// retried within `retries`, resuming the transaction on a new connection
/// (which replaces `*client`).
pub fn upload<'a>(
    project: &Project,
    client: &mut RepoClient,
    tx: &str,
    target: Target<'_>,
    items: impl Iterator<Item = Item<'a>> + Clone,
    retries: &Retries,
    reporter: &dyn Reporter,
) -> Result<()> {
    let user = &project.user.user_id;
    let (files, bytes) = items.clone().fold((0u64, 0u64), |(n, b), i| match i {
        Item::File { size, .. } => (n + 1, b + size),
        Item::Link { .. } => (n + 1, b),
    });
    let mut resuming = false;
    loop {
        let attempt = (|| -> Result<()> {
            let (base, hash, replace) = match target {
                Target::Init { replace, confirmed } => (None, confirmed, replace),
                Target::Sync { base, base_hash } => (Some(base), base_hash, false),
            };
            if resuming {
                let (n, b) = client.resume(tx, base, hash, user, replace)?;
                tracing::info!(
                    "resuming the upload: the repository kept {}, {b} bytes",
                    crate::sync::plural(n as usize, "staged file")
                );
            } else if replace {
                client.begin_replacing(tx, user, hash)?;
            } else {
                client.begin(tx, base, hash, user)?;
            }
            reporter.transfer_start("uploading", files, bytes);
            // On the same machine a put only queues a request, and the
            // agent copies later: progress reported per put would reach
            // 100 % at once (a bar showing TiB/s) and then wait. There,
            // progress is what the agent has acknowledged, asked for every
            // PACE_BYTES or PACE_FILES.
            let paced = client.copies_locally();
            let (mut nf, mut nb) = (0u64, 0u64);
            let (mut queued_files, mut queued_bytes) = (0u64, 0u64);
            for item in items.clone() {
                check_interrupt()?;
                match item {
                    Item::File {
                        path,
                        size,
                        hash,
                        mtime_ns,
                        src,
                    } => {
                        let at = src.map_or_else(|| project.root.join(path), |s| s.to_path_buf());
                        client.put_file(path, &at, size, hash, mtime_ns)?;
                        nb += size;
                        queued_bytes += size;
                    }
                    Item::Link { path, target } => client.put_link(path, target)?,
                }
                nf += 1;
                queued_files += 1;
                if !paced {
                    reporter.transfer_progress(nf, nb);
                } else if queued_bytes >= PACE_BYTES || queued_files >= PACE_FILES {
                    client.flush()?;
                    (queued_files, queued_bytes) = (0, 0);
                    reporter.transfer_progress(nf, nb);
                }
            }
            client.flush()?;
            reporter.transfer_progress(nf, nb);
            reporter.transfer_done();
            Ok(())
        })();
        match attempt {
            Err(EngineError::Repo(lost @ RepoError::Connection { .. })) => {
                reporter.transfer_done();
                retries.wait_after(
                    lost,
                    "during the upload",
                    "resuming where it stopped",
                    reporter,
                )?;
                *client = reconnect(project, retries)?;
                resuming = true;
            }
            other => return other,
        }
    }
}

/// A new connection to the project's repository; a connection that drops
/// again while it is being made spends another retry.
pub fn reconnect(project: &Project, retries: &Retries) -> Result<RepoClient> {
    loop {
        match RepoClient::connect(&project.config) {
            Ok(c) => return Ok(c),
            Err(RepoError::Connection { host, source }) => match retries.next_wait() {
                Some(wait) => {
                    tracing::info!("reconnecting to {host} failed ({source}); again in {wait:?}");
                    std::thread::sleep(wait);
                }
                None => return Err(RepoError::Connection { host, source }.into()),
            },
            Err(e) => return Err(e.into()),
        }
    }
}
