//! Configuration from the Worker's environment: `[vars]` in wrangler.toml,
//! secrets from `wrangler secret put` (locally `.dev.vars`).

use shared::admission::Caps;
use shared::auth::MIN_SECRET_BYTES;
use shared::media::Signer;
use shared::room::RoomConfig;
use worker::Env;

use crate::conns::ConnCaps;
use crate::error::{EdgeError, EdgeResult};

#[derive(Clone)]
pub struct EdgeConfig {
    /// `ORIGIN_URL`: where `/api/**` is proxied and the internal API lives.
    pub origin_url: String,
    /// `ALLOWED_ORIGINS`: browser origins allowed to open realtime
    /// connections (comma-separated; `*` allows any).
    pub allowed_origins: Vec<String>,
    /// `JWT_SECRET` (secret).
    pub jwt_secret: Vec<u8>,
    /// `ORIGIN_SERVICE_SECRET` (secret).
    pub service_secret: String,
    /// Attachment links, keyed from the service secret (the origin mints
    /// the same ones for REST history).
    pub signer: Signer,
    /// Room tunables; `ROOM_*` vars override the defaults.
    pub room: RoomConfig,
    /// `ROOM_MAX_SSE`: SSE streams per room.
    pub sse_max_per_room: usize,
    /// `ROOM_MAX_SOCKETS`: WebSockets per room.
    pub sockets_max_per_room: usize,
    /// `MAX_CONNS_PER_USER`: connections of one kind one user may hold on
    /// one object (tabs and devices); past it their own oldest goes.
    pub max_conns_per_user: usize,
    /// `ROOM_SSE_HEARTBEAT_MS`: comment line to every SSE stream this often.
    pub sse_heartbeat_ms: u64,
    /// `PRESENCE_GRACE_MS`: how long a user stays online after their last
    /// connection closes.
    pub presence_grace_ms: u64,
    /// `PRESENCE_WATCHDOG_MS`: while a user has connections, their object's
    /// alarm is never further away than this, so a runtime that died with
    /// them still lets them go offline (see `user_do`).
    pub presence_watchdog_ms: u64,
    /// `METRICS_COUNTS_MS` / `METRICS_REFRESH_MS`: how often objects report
    /// their figures to the origin (see `shared::metrics`).
    pub metrics: shared::metrics::Cadence,
    /// The Worker request being served (set by the router; `None` inside
    /// Durable Objects, whose calls to the origin get ids of their own).
    pub request_id: Option<String>,
}

impl std::fmt::Debug for EdgeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeConfig")
            .field("origin_url", &self.origin_url)
            .field("allowed_origins", &self.allowed_origins)
            .finish_non_exhaustive()
    }
}

fn string(env: &Env, name: &str) -> Option<String> {
    env.var(name)
        .ok()
        .map(|v| v.to_string())
        .filter(|v| !v.trim().is_empty())
}

fn number<T: std::str::FromStr>(env: &Env, name: &'static str, default: T) -> EdgeResult<T> {
    match string(env, name) {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|_| EdgeError::Internal(format!("{name} is not a number: {raw:?}"))),
    }
}

impl EdgeConfig {
    pub fn from_env(env: &Env) -> EdgeResult<Self> {
        let origin_url = string(env, "ORIGIN_URL")
            .ok_or_else(|| EdgeError::Internal("ORIGIN_URL is not set".to_owned()))?
            .trim_end_matches('/')
            .to_owned();
        let secret = |name: &'static str| -> EdgeResult<String> {
            let value = string(env, name)
                .ok_or_else(|| EdgeError::Internal(format!("{name} is not set")))?;
            if value.len() < MIN_SECRET_BYTES {
                return Err(EdgeError::Internal(format!(
                    "{name} must be at least {MIN_SECRET_BYTES} bytes"
                )));
            }
            Ok(value)
        };
        let allowed_origins = string(env, "ALLOWED_ORIGINS")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().trim_end_matches('/').to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let defaults = RoomConfig::default();
        let room = RoomConfig {
            replay_window: number(env, "ROOM_REPLAY_WINDOW", defaults.replay_window)?,
            dedup_horizon: number(env, "ROOM_DEDUP_HORIZON", defaults.dedup_horizon)?,
            rate_burst: number(env, "ROOM_RATE_BURST", defaults.rate_burst)?,
            rate_per_sec: number(env, "ROOM_RATE_PER_SEC", defaults.rate_per_sec)?,
            flood_strikes: number(env, "ROOM_FLOOD_STRIKES", defaults.flood_strikes)?,
            backoff_max_ms: number(env, "ROOM_BACKOFF_MAX_MS", defaults.backoff_max_ms)?,
            edit_window_ms: number::<i64>(env, "EDIT_WINDOW_SECS", defaults.edit_window_ms / 1000)?
                .saturating_mul(1000),
            ..defaults
        };
        let service_secret = secret("ORIGIN_SERVICE_SECRET")?;
        // `LOG_LEVEL` (debug, info, warn, error): every request reads the
        // config, so the isolate's log level follows it.
        if let Some(level) =
            string(env, "LOG_LEVEL").and_then(|l| crate::telemetry::Level::parse(&l))
        {
            crate::telemetry::set_level(level);
        }
        let metrics = shared::metrics::Cadence::default();
        Ok(Self {
            origin_url,
            allowed_origins,
            jwt_secret: secret("JWT_SECRET")?.into_bytes(),
            signer: Signer::new(service_secret.as_bytes()),
            service_secret,
            room,
            sse_max_per_room: number(env, "ROOM_MAX_SSE", 200)?,
            sockets_max_per_room: number(env, "ROOM_MAX_SOCKETS", 10_000)?,
            max_conns_per_user: number(env, "MAX_CONNS_PER_USER", 10)?,
            sse_heartbeat_ms: number(env, "ROOM_SSE_HEARTBEAT_MS", 15_000)?,
            presence_grace_ms: number(env, "PRESENCE_GRACE_MS", 10_000)?,
            presence_watchdog_ms: number(env, "PRESENCE_WATCHDOG_MS", 60_000)?,
            metrics: shared::metrics::Cadence {
                counts_ms: number(env, "METRICS_COUNTS_MS", metrics.counts_ms)?.max(100),
                refresh_ms: number(env, "METRICS_REFRESH_MS", metrics.refresh_ms)?.max(1_000),
            },
            request_id: None,
        })
    }

    /// Connection caps of a Room.
    pub fn room_caps(&self) -> ConnCaps {
        ConnCaps {
            sockets: Caps {
                per_user: self.max_conns_per_user,
                total: self.sockets_max_per_room,
            },
            streams: Caps {
                per_user: self.max_conns_per_user,
                total: self.sse_max_per_room,
            },
        }
    }

    /// Connection caps of a user's own object: it holds only their
    /// connections, so the per-user cap is the whole cap.
    pub fn user_caps(&self) -> ConnCaps {
        let caps = Caps {
            per_user: self.max_conns_per_user,
            total: self.max_conns_per_user,
        };
        ConnCaps {
            sockets: caps,
            streams: caps,
        }
    }

    /// Whether a browser at `origin` may open a realtime connection.
    /// Requests without an `Origin` header are not from a browser page and
    /// carry their own credentials, so they pass.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(o) => self
                .allowed_origins
                .iter()
                .any(|a| a == "*" || a == o.trim_end_matches('/')),
        }
    }
}
