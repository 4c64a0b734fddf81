//! Password hashing with bounded concurrency.
//!
//! One Argon2id check with the crate's defaults (OWASP's m = 19 MiB, t = 2)
//! allocates 19 MiB and keeps a core busy for tens of milliseconds. Without
//! a bound, 96 concurrent logins raised the origin's memory by ~1.1 GB. So
//! every hash and verification goes through [`Hasher`]: at most `permits`
//! run at once (about one per core); a request that cannot get a permit
//! within the configured wait gets `503 {code: "busy"}` with `Retry-After`.
//!
//! The permit moves into the blocking task, so it is held until the Argon2
//! work has really finished, even when the request that started it was
//! cancelled (a client hanging up does not free memory that is still in
//! use).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::auth::{hash_password, verify_password};
use crate::error::{ApiError, ApiResult};

/// What a refused caller is told to wait, in seconds.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// The bounded Argon2 runner. Shared by every route that hashes.
#[derive(Debug)]
pub struct Hasher {
    permits: Arc<Semaphore>,
    size: usize,
    wait: Duration,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Hasher {
    /// At most `permits` (at least 1) Argon2 runs at once; a caller waits at
    /// most `wait` for its turn.
    pub fn new(permits: usize, wait: Duration) -> Self {
        let size = permits.max(1);
        Self {
            permits: Arc::new(Semaphore::new(size)),
            size,
            wait,
            running: Arc::default(),
            peak: Arc::default(),
        }
    }

    /// The default bound: one permit per available core, at least 2.
    pub fn default_permits() -> usize {
        std::thread::available_parallelism()
            .map_or(2, std::num::NonZeroUsize::get)
            .max(2)
    }

    /// True when `password` matches `hash`.
    pub async fn verify(&self, password: String, hash: String) -> ApiResult<bool> {
        self.run(move || Ok(verify_password(&password, &hash)))
            .await
    }

    /// An Argon2id hash of `password`.
    pub async fn hash(&self, password: String) -> ApiResult<String> {
        self.run(move || hash_password(&password)).await
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> ApiResult<T> {
        let permit = tokio::time::timeout(self.wait, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                metrics::counter!("password_hash_busy_total").increment(1);
                ApiError::Busy {
                    retry_after_secs: BUSY_RETRY_AFTER_SECS,
                }
            })?
            .map_err(|e| ApiError::Internal(e.into()))?;
        let running = self.running.clone();
        let peak = self.peak.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let result = work();
            running.fetch_sub(1, Ordering::SeqCst);
            result
        })
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .map_err(ApiError::Internal)
    }

    /// How many runs may happen at once.
    pub fn permits(&self) -> usize {
        self.size
    }

    /// Permits free right now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// The most runs that were ever in flight at once (tests and metrics).
    pub fn peak_in_flight(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_more_than_the_permits_run_at_once_and_the_rest_wait_or_are_busy() {
        let hasher = Arc::new(Hasher::new(2, Duration::from_millis(50)));
        let slow = |h: Arc<Hasher>| async move {
            h.run(|| {
                std::thread::sleep(Duration::from_millis(200));
                Ok(())
            })
            .await
        };
        let results = futures::future::join_all((0..6).map(|_| slow(hasher.clone()))).await;
        let busy = results
            .iter()
            .filter(|r| matches!(r, Err(ApiError::Busy { .. })))
            .count();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
        assert_eq!(busy, 4);
        assert_eq!(hasher.peak_in_flight(), 2);
        assert_eq!(hasher.available(), 2, "every permit came back");
    }

    #[test]
    fn the_default_bound_is_at_least_two() {
        assert!(Hasher::default_permits() >= 2);
    }
}
