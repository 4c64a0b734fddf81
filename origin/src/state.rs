//! The state every handler shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;

/// Cloned into every request; everything inside is cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: Pool,
    pub keys: Arc<Keys>,
    pub metrics: PrometheusHandle,
    /// Life of an access token.
    pub access_ttl: Duration,
    /// Life of a refresh token.
    pub refresh_ttl: Duration,
    pub login_guard: Arc<LoginGuard>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// Secrets and the login timing guard.
pub struct Keys {
    pub jwt_secret: Vec<u8>,
    pub service_secret: Vec<u8>,
    /// A real Argon2 hash of a random password. Login verifies against it
    /// when the email is unknown, so an unknown user costs the same time as
    /// a wrong password and the response does not reveal who has an account.
    pub dummy_hash: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys([redacted])")
    }
}

/// Slows password guessing: after [`LoginGuard::MAX_FAILURES`] failed
/// logins for one email within [`LoginGuard::WINDOW`], that email gets 429
/// until the window ends, whatever the password. Per instance (several
/// origins each count on their own, which still bounds guessing); a
/// successful login clears the count.
#[derive(Debug, Default)]
pub struct LoginGuard {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl LoginGuard {
    pub const MAX_FAILURES: u32 = 10;
    pub const WINDOW: Duration = Duration::from_secs(15 * 60);

    /// `Some(seconds to wait)` when `email` is locked out now.
    pub fn locked(&self, email: &str) -> Option<u64> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let (count, since) = failures.get(email)?;
        let age = since.elapsed();
        (*count >= Self::MAX_FAILURES && age < Self::WINDOW)
            .then(|| (Self::WINDOW - age).as_secs().max(1))
    }

    pub fn failed(&self, email: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Bound the map: forget windows that ended.
        if failures.len() > 100_000 {
            failures.retain(|_, (_, since)| since.elapsed() < Self::WINDOW);
        }
        let entry = failures
            .entry(email.to_owned())
            .or_insert((0, Instant::now()));
        if entry.1.elapsed() >= Self::WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    pub fn succeeded(&self, email: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(email);
    }
}
