//! Waiting between attempts: reconnections after a dropped connection
//! (`Retries`) and re-plans after another client moved the repository
//! share one jittered backoff, so clients that collided spread out.

use std::cell::Cell;

use dsg_repo::RepoError;

use crate::{Reporter, Result};

/// Exponential backoff with jitter: 0.5 s, 1 s, 2 s … ± 50 %.
pub fn backoff(attempt: u32) -> std::time::Duration {
    let base = 0.5 * 2f64.powi(attempt.saturating_sub(1) as i32);
    let jitter = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
    std::time::Duration::from_secs_f64(base * (0.5 + jitter))
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
