//! The state every handler shares.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;

/// Cloned into every request; everything inside is cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The primary: every write, and every read not listed in
    /// [`crate::replica`].
    pub pool: Pool,
    /// Connections for the reads a replica may serve (the primary's when
    /// there is no `DATABASE_READ_URL`).
    pub reads: crate::replica::Reads,
    pub keys: Arc<Keys>,
    pub metrics: PrometheusHandle,
    /// What the edge's objects report (see [`crate::edge_report`]).
    pub edge_figures: Arc<crate::edge_report::EdgeFigures>,
    /// What `/metrics` reads from PostgreSQL, cached (see [`crate::metrics::DbFigures`]).
    pub figures: Arc<crate::metrics::DbFigures>,
    /// Life of an access token.
    pub access_ttl: Duration,
    /// Life of a refresh token.
    pub refresh_ttl: Duration,
    pub login_guard: Arc<LoginGuard>,
    /// Every Argon2 hash and check runs through it (bounded concurrency).
    pub hasher: Arc<crate::hashing::Hasher>,
    /// Members-changed notices to the edge (no-op without `EDGE_URL`).
    pub edge: crate::edge::EdgeNotifier,
    /// Web Push (off without `VAPID_PRIVATE_KEY`).
    pub push: Arc<crate::push::Push>,
    /// Attachments: limits, URL signing, the processing worker's wake-up.
    pub media: Arc<crate::media::Media>,
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

pub use crate::login_guard::LoginGuard;
