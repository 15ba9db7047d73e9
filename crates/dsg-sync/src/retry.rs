//! Waiting between attempts: reconnections after a dropped connection
//! (`Retries`) and re-plans after another client moved the repository
//! share one jittered backoff, so clients that collided spread out.

use std::cell::Cell;
use std::time::{Duration, Instant};

use dsg_repo::protocol::{ErrorKind, RemoteError};
use dsg_repo::RepoError;

use crate::{check_interrupt, Reporter, Result};

/// Exponential backoff with jitter: 0.5 s, 1 s, 2 s … ± 50 %.
pub fn backoff(attempt: u32) -> Duration {
    jittered(Duration::from_millis(500), attempt, Duration::MAX)
}

/// `first` doubled per attempt up to `cap`, then ± 50 %.
fn jittered(first: Duration, attempt: u32, cap: Duration) -> Duration {
    let base = (first.as_secs_f64() * 2f64.powi(attempt.saturating_sub(1).min(60) as i32))
        .min(cap.as_secs_f64());
    let jitter = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
    Duration::from_secs_f64(base * (0.5 + jitter))
}

/// How many times one command may reconnect after a dropped connection,
/// shared by all its steps so that nested retries stay bounded.
pub struct Retries {
    used: Cell<u32>,
    max: u32,
}

impl Retries {
    pub fn new(max: u32) -> Retries {
        Retries {
            used: Cell::new(0),
            max,
        }
    }

    /// Spends one retry and returns how long to wait first, or `None`
    /// when the budget is spent.
    pub fn next_wait(&self) -> Option<std::time::Duration> {
        let n = self.used.get();
        if n >= self.max {
            return None;
        }
        self.used.set(n + 1);
        Some(backoff(n + 1))
    }

    /// After a lost connection `lost`: says so and waits out the backoff,
    /// or returns `lost` when the budget is spent.
    pub fn wait_after(
        &self,
        lost: RepoError,
        during: &str,
        then: &str,
        reporter: &dyn Reporter,
    ) -> Result<()> {
        let RepoError::Connection { host, source } = &lost else {
            return Err(lost.into());
        };
        let Some(wait) = self.next_wait() else {
            return Err(lost.into());
        };
        reporter.warn(&format!(
            "lost the connection to {host} {during} ({source}); retrying in {:.1} s, {then}",
            wait.as_secs_f64()
        ));
        std::thread::sleep(wait);
        Ok(())
    }
}

/// How long a command waits for the repository before it calls it busy:
/// `DSG_LOCK_TIMEOUT` seconds (default 30), read as the repository side
/// reads it, so one setting bounds both the lock wait and the re-plans.
pub fn lock_timeout() -> Duration {
    std::env::var("DSG_LOCK_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or(Duration::from_secs(30))
}

/// Re-plans of a sync whose planned base another client replaced before
/// it could begin. Under contention that happens many times in a row, so
/// a bounded count of immediate re-plans fails syncs that would get
/// through: keep re-planning, spread out by jittered exponential waits,
/// for as long as the repository lock would be waited for.
pub struct Replans {
    started: Instant,
    limit: Duration,
    done: Cell<u32>,
}

impl Replans {
    /// The first re-plan comes soon: the head that beat us is new, and a
    /// plan against it usually gets through.
    const FIRST: Duration = Duration::from_millis(50);
    const CAP: Duration = Duration::from_secs(2);

    pub fn new() -> Replans {
        Replans {
            started: Instant::now(),
            limit: lock_timeout(),
            done: Cell::new(0),
        }
    }

    /// After `moved` (the repository's head is not the planned base): waits
    /// before the next plan, or, when the time is up, returns a busy error
    /// (exit 4) naming how often the repository moved.
    pub fn wait_after(&self, moved: RepoError, attempts: u32) -> Result<()> {
        let n = self.done.get() + 1;
        self.done.set(n);
        let elapsed = self.started.elapsed();
        if elapsed >= self.limit {
            return Err(kept_moving(moved, attempts, elapsed).into());
        }
        // The last wait is cut to the deadline, where one more plan is
        // tried: giving up as soon as a long jittered wait would overshoot
        // stopped some runs at half the timeout.
        let wait = jittered(Self::FIRST, n, Self::CAP).min(self.limit - elapsed);
        tracing::info!(
            "the repository moved; planning again in {:.2} s",
            wait.as_secs_f64()
        );
        std::thread::sleep(wait);
        // A Ctrl-C during the wait: nothing was begun, stop here.
        check_interrupt()
    }
}

impl Default for Replans {
    fn default() -> Self {
        Replans::new()
    }
}

fn kept_moving(moved: RepoError, attempts: u32, elapsed: Duration) -> RepoError {
    let RepoError::Remote { host, repo, err } = moved else {
        return moved;
    };
    RepoError::Remote {
        host,
        repo,
        err: RemoteError {
            kind: ErrorKind::Busy,
            message: format!(
                "the repository kept moving: other clients committed before this sync could begin, {} in {:.1} s (last: {}); nothing was changed",
                if attempts == 1 { "once".to_string() } else { format!("{attempts} times") },
                elapsed.as_secs_f64(),
                err.message
            ),
            hint: Some(
                "the repository is busy with other clients' syncs; run the command again in a moment (DSG_LOCK_TIMEOUT sets how long dsg keeps trying, in seconds)".into(),
            ),
        },
    }
}
