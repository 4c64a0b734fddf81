//! Configuration from the environment, checked once at start-up.
//!
//! Every value is read and validated before anything binds or connects, and a
//! missing or invalid value names the variable it came from.

use std::net::SocketAddr;
use std::time::Duration;

use shared::auth::MIN_SECRET_BYTES;

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not set")]
    Missing(&'static str),
    #[error("{var} is invalid: {reason}")]
    Invalid { var: &'static str, reason: String },
}

/// Everything the origin needs to run.
#[derive(Clone)]
pub struct Config {
    /// `DATABASE_URL`: a libpq-style URL or key=value string.
    pub database_url: String,
    /// `DATABASE_READ_URL`, optional: one streaming replica (a hot standby
    /// of `DATABASE_URL`) that serves history, conversation lists, the
    /// directory, active users and search (see [`crate::replica`]). Unset:
    /// every read goes to `DATABASE_URL`, as without replicas.
    pub database_read_url: Option<String>,
    /// `DATABASE_READ_MAX_LAG_MS`, default 2000: the replica serves reads
    /// only while it is at most this far behind; beyond it, reads go to
    /// the primary.
    pub database_read_max_lag: Duration,
    /// `BIND_ADDR`, default `127.0.0.1:8081`. Port 0 picks a free port.
    pub bind_addr: SocketAddr,
    /// `JWT_SECRET`: HMAC key for session tokens (at least 32 bytes).
    pub jwt_secret: Vec<u8>,
    /// `ORIGIN_SERVICE_SECRET`: shared with the edge for `/internal/**`.
    pub service_secret: Vec<u8>,
    /// `ACCESS_TOKEN_TTL_SECS`, default 15 min: the life of an access
    /// token. Short, because the edge checks access tokens without asking
    /// anyone; revocation reaches it when the token cannot be renewed.
    pub access_token_ttl: Duration,
    /// `REFRESH_TOKEN_TTL_SECS`, default 30 days: the life of each refresh
    /// token, so a session ends after this long without use.
    pub refresh_token_ttl: Duration,
    /// `HASH_CONCURRENCY`, default one per available core (at least 2): how
    /// many Argon2 checks may run at once (19 MiB each).
    pub hash_concurrency: usize,
    /// `HASH_WAIT_MS`, default 2000: how long a login waits for a hashing
    /// slot before it gets `503 busy`.
    pub hash_wait: Duration,
    /// `DB_POOL_SIZE`, default 16.
    pub db_pool_size: usize,
    /// `ALLOWED_ORIGINS`: comma-separated browser origins for CORS. Empty
    /// means no cross-origin browser access (the edge is same-origin).
    pub allowed_origins: Vec<String>,
    /// `EDGE_URL`, optional (`http://127.0.0.1:8787`): where to tell the
    /// edge that a conversation's members changed. Unset: no notices.
    pub edge_url: Option<String>,
    /// `REQUEST_TIMEOUT_SECS`, default 15.
    pub request_timeout: Duration,
    /// `LOG_FORMAT`: `json` (default in production) or `pretty`.
    pub log_json: bool,
    /// Web Push (the `VAPID_*` and `PUSH_*` variables).
    pub push: PushConfig,
    /// Attachments (the `MEDIA_*` variables).
    pub media: MediaConfig,
}

/// Attachment limits and the background work on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaConfig {
    /// `MEDIA_MAX_IMAGE_BYTES`, default 10 MiB: the largest image upload.
    pub max_image_bytes: i64,
    /// `MEDIA_MAX_VIDEO_BYTES`, default 100 MiB.
    pub max_video_bytes: i64,
    /// `MEDIA_MAX_AUDIO_BYTES`, default 10 MiB (voice messages).
    pub max_audio_bytes: i64,
    /// `MEDIA_MAX_FILE_BYTES`, default 20 MiB (PDF).
    pub max_file_bytes: i64,
    /// `MEDIA_DAILY_QUOTA_BYTES`, default 500 MiB: what one user may
    /// upload in any rolling 24 hours, reservations included (an upload
    /// that failed still counts, so retries cannot get around it).
    pub daily_quota_bytes: i64,
    /// `MEDIA_UNSENT_TTL_SECS`, default 86400: an upload never attached to
    /// a message is reaped after this long.
    pub unsent_ttl: Duration,
    /// `MEDIA_CLEANUP_INTERVAL_SECS`, default 600: how often the cleanup
    /// looks for unsent uploads.
    pub cleanup_interval: Duration,
    /// `MEDIA_PROCESS_CONCURRENCY`, default 2: attachments decoded at once
    /// (each decode is one core, and a 100-megapixel image holds ~400 MB).
    pub process_concurrency: usize,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            max_image_bytes: 10 * MIB,
            max_video_bytes: 100 * MIB,
            max_audio_bytes: 10 * MIB,
            max_file_bytes: 20 * MIB,
            daily_quota_bytes: 500 * MIB,
            unsent_ttl: Duration::from_secs(86_400),
            cleanup_interval: Duration::from_secs(600),
            process_concurrency: 2,
        }
    }
}

const MIB: i64 = 1024 * 1024;

impl MediaConfig {
    /// The largest upload of `kind`.
    pub fn max_bytes(&self, kind: shared::media::MediaKind) -> i64 {
        use shared::media::MediaKind;
        match kind {
            MediaKind::Image => self.max_image_bytes,
            MediaKind::Video => self.max_video_bytes,
            MediaKind::Audio => self.max_audio_bytes,
            MediaKind::File => self.max_file_bytes,
        }
    }
}

/// The default of `PUSH_ALLOWED_HOSTS`: the push services of Chrome and
/// Edge (FCM), Firefox (Mozilla autopush), Windows (WNS) and Safari
/// (Apple).
pub const DEFAULT_PUSH_ALLOWED_HOSTS: &str = "fcm.googleapis.com,updates.push.services.mozilla.com,\
     *.notify.windows.com,web.push.apple.com,*.push.apple.com";

/// The default of `VAPID_SUBJECT`.
pub const DEFAULT_VAPID_SUBJECT: &str = "mailto:ops@vibe.fit";

/// Web Push settings.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// `VAPID_PRIVATE_KEY`: base64url (no padding) of the 32-byte P-256
    /// private scalar that signs the VAPID JWT (RFC 8292). A secret: never
    /// logged (its `Debug` is redacted). Unset or empty: push is off (the
    /// push routes answer `503 push_disabled`, except the settings and the
    /// per-conversation preferences; nothing is queued or sent).
    /// Changing it invalidates every browser's subscription.
    pub vapid_private_key: Option<VapidKey>,
    /// `VAPID_SUBJECT`, default `mailto:ops@vibe.fit`: how a push service
    /// reaches the operator (`mailto:` or `https:`).
    pub vapid_subject: String,
    /// `PUSH_ALLOWED_HOSTS`: comma-separated hosts a subscription endpoint
    /// may name (`https` only, port 443); `*.example.com` matches every
    /// subdomain of example.com (not example.com itself). Default: the
    /// major browsers' push services ([`DEFAULT_PUSH_ALLOWED_HOSTS`]).
    /// Anything else is refused: the origin must not become a way to make
    /// requests anywhere (SSRF).
    pub allowed_hosts: Vec<String>,
    /// `PUSH_ALLOW_LOOPBACK`, default `false`: also accept `http://` or
    /// `https://` endpoints on 127.0.0.1, localhost or [::1], any port
    /// (local runs and tests).
    pub allow_loopback: bool,
    /// `PUSH_COALESCE_MS`, default 3000: a pending notification waits this
    /// long after its latest message before it is sent, so a burst is one
    /// push.
    pub coalesce: Duration,
    /// `PUSH_TTL_SECS`, default 86400: how long a push service keeps a push
    /// for a device that is offline (the `TTL` header).
    pub ttl: Duration,
    /// `PUSH_MAX_ATTEMPTS`, default 6: sends of one notification that fail
    /// with 429, 5xx or a network error before it is dropped.
    pub max_attempts: u32,
    /// `PUSH_RETRY_BASE_MS`, default 1000: the first retry's delay, doubled
    /// for each further one, at most 5 minutes (a `Retry-After` that asks
    /// for longer is honoured).
    pub retry_base: Duration,
}

/// A VAPID private key: a valid P-256 scalar. Its `Debug` shows nothing.
#[derive(Clone)]
pub struct VapidKey([u8; 32]);

impl VapidKey {
    /// The key from its base64url form (unpadded; trailing `=` tolerated),
    /// checked to be a P-256 private scalar (in `1..n`).
    pub fn from_base64url(text: &str) -> Result<Self, String> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim().trim_end_matches('='))
            .map_err(|_| "not base64url".to_owned())?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("{} bytes, not 32", b.len()))?;
        p256::SecretKey::from_slice(&bytes).map_err(|_| "not a P-256 private key".to_owned())?;
        Ok(Self(bytes))
    }

    /// The 32-byte scalar.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for VapidKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VapidKey([redacted])")
    }
}

// Secrets must never reach a log line, so Debug is written by hand.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &"[redacted]")
            .field(
                "database_read_url",
                &self.database_read_url.as_ref().map(|_| "[redacted]"),
            )
            .field("database_read_max_lag", &self.database_read_max_lag)
            .field("bind_addr", &self.bind_addr)
            .field("jwt_secret", &"[redacted]")
            .field("service_secret", &"[redacted]")
            .field("access_token_ttl", &self.access_token_ttl)
            .field("refresh_token_ttl", &self.refresh_token_ttl)
            .field("hash_concurrency", &self.hash_concurrency)
            .field("hash_wait", &self.hash_wait)
            .field("db_pool_size", &self.db_pool_size)
            .field("allowed_origins", &self.allowed_origins)
            .field("edge_url", &self.edge_url)
            .field("request_timeout", &self.request_timeout)
            .field("log_json", &self.log_json)
            // VapidKey's own Debug is redacted.
            .field("push", &self.push)
            .field("media", &self.media)
            .finish()
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads configuration through `get`, so tests need not touch the
    /// process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let required = |var: &'static str| {
            get(var)
                .filter(|v| !v.trim().is_empty())
                .ok_or(ConfigError::Missing(var))
        };
        let secret = |var: &'static str| -> Result<Vec<u8>, ConfigError> {
            let v = required(var)?;
            if v.len() < MIN_SECRET_BYTES {
                return Err(ConfigError::Invalid {
                    var,
                    reason: format!("must be at least {MIN_SECRET_BYTES} bytes"),
                });
            }
            Ok(v.into_bytes())
        };
        let number =
            |var: &'static str, default: u64, min: u64, max: u64| -> Result<u64, ConfigError> {
                match get(var) {
                    None => Ok(default),
                    Some(raw) => {
                        let n: u64 = raw.trim().parse().map_err(|_| ConfigError::Invalid {
                            var,
                            reason: format!("{raw:?} is not a whole number"),
                        })?;
                        if !(min..=max).contains(&n) {
                            return Err(ConfigError::Invalid {
                                var,
                                reason: format!("must be between {min} and {max}"),
                            });
                        }
                        Ok(n)
                    }
                }
            };

        let database_url = required("DATABASE_URL")?;
        database_url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| ConfigError::Invalid {
                var: "DATABASE_URL",
                reason: e.to_string(),
            })?;
        // Optional; when set it must parse like DATABASE_URL, so a typo
        // fails at start-up rather than as a replica that is never used.
        let database_read_url = match get("DATABASE_READ_URL").map(|v| v.trim().to_owned()) {
            None => None,
            Some(v) if v.is_empty() => None,
            Some(v) => {
                v.parse::<tokio_postgres::Config>()
                    .map_err(|e| ConfigError::Invalid {
                        var: "DATABASE_READ_URL",
                        reason: e.to_string(),
                    })?;
                Some(v)
            }
        };
        let bind_raw = get("BIND_ADDR").unwrap_or_else(|| "127.0.0.1:8081".to_owned());
        let bind_addr = bind_raw.parse().map_err(|_| ConfigError::Invalid {
            var: "BIND_ADDR",
            reason: format!("{bind_raw:?} is not host:port"),
        })?;
        let jwt_secret = secret("JWT_SECRET")?;
        let service_secret = secret("ORIGIN_SERVICE_SECRET")?;
        if jwt_secret == service_secret {
            return Err(ConfigError::Invalid {
                var: "ORIGIN_SERVICE_SECRET",
                reason: "must differ from JWT_SECRET".to_owned(),
            });
        }
        let allowed_origins = get("ALLOWED_ORIGINS")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        // The 12-hour session token is gone: refusing the old name makes a
        // deployment that still sets it notice, instead of silently getting
        // 15-minute tokens it did not ask for (or 12-hour access tokens).
        if get("JWT_TTL_SECS").is_some() {
            return Err(ConfigError::Invalid {
                var: "JWT_TTL_SECS",
                reason: "replaced by ACCESS_TOKEN_TTL_SECS (default 900) and \
                         REFRESH_TOKEN_TTL_SECS (default 2592000); unset it"
                    .to_owned(),
            });
        }
        let access_token_ttl = number("ACCESS_TOKEN_TTL_SECS", 15 * 60, 60, 24 * 3600)?;
        let refresh_token_ttl = number(
            "REFRESH_TOKEN_TTL_SECS",
            30 * 24 * 3600,
            3600,
            365 * 24 * 3600,
        )?;
        if refresh_token_ttl <= access_token_ttl {
            return Err(ConfigError::Invalid {
                var: "REFRESH_TOKEN_TTL_SECS",
                reason: "must be longer than ACCESS_TOKEN_TTL_SECS".to_owned(),
            });
        }
        let edge_url = match get("EDGE_URL").map(|v| v.trim().to_owned()) {
            None => None,
            Some(v) if v.is_empty() => None,
            Some(v) => {
                let rest = v
                    .strip_prefix("http://")
                    .or_else(|| v.strip_prefix("https://"));
                if rest.is_none_or(|host| host.is_empty() || host.contains(['?', '#'])) {
                    return Err(ConfigError::Invalid {
                        var: "EDGE_URL",
                        reason: format!("{v:?} is not an http:// or https:// base URL"),
                    });
                }
                Some(v.trim_end_matches('/').to_owned())
            }
        };
        let log_json = match get("LOG_FORMAT").as_deref() {
            None | Some("json") => true,
            Some("pretty") => false,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    var: "LOG_FORMAT",
                    reason: format!("{other:?} is neither json nor pretty"),
                });
            }
        };
        let push = push_config(&get, &number)?;
        let media = media_config(&number)?;
        Ok(Self {
            database_url,
            database_read_url,
            database_read_max_lag: Duration::from_millis(number(
                "DATABASE_READ_MAX_LAG_MS",
                2000,
                0,
                3_600_000,
            )?),
            bind_addr,
            jwt_secret,
            service_secret,
            access_token_ttl: Duration::from_secs(access_token_ttl),
            refresh_token_ttl: Duration::from_secs(refresh_token_ttl),
            hash_concurrency: number(
                "HASH_CONCURRENCY",
                crate::hashing::Hasher::default_permits() as u64,
                1,
                256,
            )? as usize,
            hash_wait: Duration::from_millis(number("HASH_WAIT_MS", 2000, 0, 30_000)?),
            db_pool_size: number("DB_POOL_SIZE", 16, 1, 512)? as usize,
            allowed_origins,
            edge_url,
            request_timeout: Duration::from_secs(number("REQUEST_TIMEOUT_SECS", 15, 1, 600)?),
            log_json,
            push,
            media,
        })
    }
}

/// The `MEDIA_*` variables (see [`MediaConfig`]).
fn media_config(
    number: &impl Fn(&'static str, u64, u64, u64) -> Result<u64, ConfigError>,
) -> Result<MediaConfig, ConfigError> {
    let d = MediaConfig::default();
    // Sizes from 1 KiB to 10 GiB: beyond that R2's single-request upload
    // (5 GiB) and the origin's download of the original stop making sense.
    let bytes = |var: &'static str, default: i64| -> Result<i64, ConfigError> {
        let n = number(var, default.unsigned_abs(), 1024, 10 * 1024 * MIB as u64)?;
        Ok(i64::try_from(n).unwrap_or(i64::MAX))
    };
    Ok(MediaConfig {
        max_image_bytes: bytes("MEDIA_MAX_IMAGE_BYTES", d.max_image_bytes)?,
        max_video_bytes: bytes("MEDIA_MAX_VIDEO_BYTES", d.max_video_bytes)?,
        max_audio_bytes: bytes("MEDIA_MAX_AUDIO_BYTES", d.max_audio_bytes)?,
        max_file_bytes: bytes("MEDIA_MAX_FILE_BYTES", d.max_file_bytes)?,
        daily_quota_bytes: bytes("MEDIA_DAILY_QUOTA_BYTES", d.daily_quota_bytes)?,
        // At least an hour: the room refuses to send an upload older than
        // 23 hours, and reaping sooner than that would race real sends
        // more often (the reap asks the room, so it stays correct).
        unsent_ttl: Duration::from_secs(number(
            "MEDIA_UNSENT_TTL_SECS",
            d.unsent_ttl.as_secs(),
            60,
            30 * 86_400,
        )?),
        cleanup_interval: Duration::from_secs(number(
            "MEDIA_CLEANUP_INTERVAL_SECS",
            d.cleanup_interval.as_secs(),
            1,
            86_400,
        )?),
        process_concurrency: number(
            "MEDIA_PROCESS_CONCURRENCY",
            d.process_concurrency as u64,
            1,
            64,
        )? as usize,
    })
}

/// The `VAPID_*` and `PUSH_*` variables (see [`PushConfig`]).
fn push_config(
    get: &impl Fn(&str) -> Option<String>,
    number: &impl Fn(&'static str, u64, u64, u64) -> Result<u64, ConfigError>,
) -> Result<PushConfig, ConfigError> {
    let vapid_private_key = match get("VAPID_PRIVATE_KEY") {
        Some(v) if !v.trim().is_empty() => {
            // The reason never quotes the value: it is a secret.
            Some(
                VapidKey::from_base64url(&v).map_err(|reason| ConfigError::Invalid {
                    var: "VAPID_PRIVATE_KEY",
                    reason,
                })?,
            )
        }
        _ => None,
    };
    let vapid_subject = match get("VAPID_SUBJECT").map(|v| v.trim().to_owned()) {
        None => DEFAULT_VAPID_SUBJECT.to_owned(),
        Some(v) if v.is_empty() => DEFAULT_VAPID_SUBJECT.to_owned(),
        Some(v) => {
            let contact = v
                .strip_prefix("mailto:")
                .or_else(|| v.strip_prefix("https://"));
            if contact.is_none_or(str::is_empty) || v.chars().any(char::is_control) {
                return Err(ConfigError::Invalid {
                    var: "VAPID_SUBJECT",
                    reason: format!("{v:?} is neither a mailto: nor an https:// contact"),
                });
            }
            v
        }
    };
    let hosts_raw =
        get("PUSH_ALLOWED_HOSTS").unwrap_or_else(|| DEFAULT_PUSH_ALLOWED_HOSTS.to_owned());
    let mut allowed_hosts = Vec::new();
    for entry in hosts_raw
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let entry = entry.to_ascii_lowercase();
        let host = entry.strip_prefix("*.").unwrap_or(&entry);
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !host.starts_with('.')
            && !host.ends_with('.')
            && !host.contains("..");
        if !valid {
            return Err(ConfigError::Invalid {
                var: "PUSH_ALLOWED_HOSTS",
                reason: format!("{entry:?} is not a host name or *.domain"),
            });
        }
        allowed_hosts.push(entry);
    }
    let allow_loopback = match get("PUSH_ALLOW_LOOPBACK").map(|v| v.trim().to_ascii_lowercase()) {
        None => false,
        Some(v) => match v.as_str() {
            "" | "false" | "0" => false,
            "true" | "1" => true,
            _ => {
                return Err(ConfigError::Invalid {
                    var: "PUSH_ALLOW_LOOPBACK",
                    reason: format!("{v:?} is neither true nor false"),
                });
            }
        },
    };
    Ok(PushConfig {
        vapid_private_key,
        vapid_subject,
        allowed_hosts,
        allow_loopback,
        coalesce: Duration::from_millis(number("PUSH_COALESCE_MS", 3000, 0, 600_000)?),
        // 28 days: the longest any major push service keeps a message.
        ttl: Duration::from_secs(number("PUSH_TTL_SECS", 86_400, 0, 28 * 86_400)?),
        max_attempts: number("PUSH_MAX_ATTEMPTS", 6, 1, 100)? as u32,
        retry_base: Duration::from_millis(number("PUSH_RETRY_BASE_MS", 1000, 1, 300_000)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const GOOD: &[(&str, &str)] = &[
        ("DATABASE_URL", "postgres://postgres@127.0.0.1/vibe"),
        ("JWT_SECRET", "jwt-secret-jwt-secret-jwt-secret-1"),
        (
            "ORIGIN_SERVICE_SECRET",
            "svc-secret-svc-secret-svc-secret-1",
        ),
    ];

    #[test]
    fn defaults_fill_in_the_optional_values() {
        let c = Config::from_lookup(env(GOOD)).expect("valid");
        assert_eq!(c.bind_addr.port(), 8081);
        assert_eq!(c.db_pool_size, 16);
        assert_eq!(c.access_token_ttl, Duration::from_secs(900));
        assert_eq!(c.refresh_token_ttl, Duration::from_secs(30 * 24 * 3600));
        assert!(c.log_json);
    }

    #[test]
    fn the_read_replica_is_optional_checked_and_redacted() {
        let c = Config::from_lookup(env(GOOD)).expect("valid");
        assert_eq!(c.database_read_url, None);
        assert_eq!(c.database_read_max_lag, Duration::from_millis(2000));
        let mut pairs = GOOD.to_vec();
        pairs.extend([
            (
                "DATABASE_READ_URL",
                "postgres://reader:hunter2@replica:5432/vibe",
            ),
            ("DATABASE_READ_MAX_LAG_MS", "500"),
        ]);
        let c = Config::from_lookup(env(&pairs)).expect("valid");
        assert_eq!(
            c.database_read_url.as_deref(),
            Some("postgres://reader:hunter2@replica:5432/vibe")
        );
        assert_eq!(c.database_read_max_lag, Duration::from_millis(500));
        assert!(!format!("{c:?}").contains("hunter2"));
        let mut pairs = GOOD.to_vec();
        pairs.push(("DATABASE_READ_URL", " "));
        let c = Config::from_lookup(env(&pairs)).expect("blank is unset");
        assert_eq!(c.database_read_url, None);
        for (var, bad) in [
            ("DATABASE_READ_URL", "postgres://h:notaport/x"),
            ("DATABASE_READ_MAX_LAG_MS", "soon"),
            ("DATABASE_READ_MAX_LAG_MS", "3600001"),
        ] {
            let mut pairs = GOOD.to_vec();
            pairs.push((var, bad));
            let err = Config::from_lookup(env(&pairs)).expect_err(bad);
            assert!(err.to_string().starts_with(var), "{err}");
        }
    }

    #[test]
    fn the_old_session_length_variable_is_refused_with_its_replacement_named() {
        let mut pairs = GOOD.to_vec();
        pairs.push(("JWT_TTL_SECS", "43200"));
        let err = Config::from_lookup(env(&pairs)).expect_err("renamed");
        assert!(err.to_string().contains("ACCESS_TOKEN_TTL_SECS"), "{err}");
        let mut pairs = GOOD.to_vec();
        pairs.push(("ACCESS_TOKEN_TTL_SECS", "7200"));
        pairs.push(("REFRESH_TOKEN_TTL_SECS", "3600"));
        let err = Config::from_lookup(env(&pairs)).expect_err("refresh shorter");
        assert!(
            err.to_string().starts_with("REFRESH_TOKEN_TTL_SECS"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_secret_names_its_variable() {
        let err = Config::from_lookup(env(&GOOD[..2])).expect_err("missing");
        assert_eq!(err.to_string(), "ORIGIN_SERVICE_SECRET is not set");
    }

    #[test]
    fn a_short_secret_is_refused() {
        let mut pairs = GOOD.to_vec();
        pairs[1] = ("JWT_SECRET", "short");
        let err = Config::from_lookup(env(&pairs)).expect_err("short");
        assert!(err.to_string().starts_with("JWT_SECRET is invalid"));
    }

    #[test]
    fn a_bad_number_or_address_is_refused() {
        let mut pairs = GOOD.to_vec();
        pairs.push(("DB_POOL_SIZE", "many"));
        assert!(Config::from_lookup(env(&pairs)).is_err());
        let mut pairs = GOOD.to_vec();
        pairs.push(("BIND_ADDR", "localhost"));
        assert!(Config::from_lookup(env(&pairs)).is_err());
    }

    #[test]
    fn the_edge_url_is_optional_and_must_be_an_http_base() {
        assert_eq!(
            Config::from_lookup(env(GOOD)).expect("valid").edge_url,
            None
        );
        let mut pairs = GOOD.to_vec();
        pairs.push(("EDGE_URL", "https://chat.example/"));
        let c = Config::from_lookup(env(&pairs)).expect("valid");
        assert_eq!(c.edge_url.as_deref(), Some("https://chat.example"));
        for bad in ["chat.example", "ftp://x", "http://", "http://x/?a=b"] {
            let mut pairs = GOOD.to_vec();
            pairs.push(("EDGE_URL", bad));
            assert!(Config::from_lookup(env(&pairs)).is_err(), "{bad}");
        }
    }

    #[test]
    fn media_limits_have_defaults_and_are_checked() {
        let c = Config::from_lookup(env(GOOD)).expect("valid");
        assert_eq!(c.media, MediaConfig::default());
        assert_eq!(c.media.max_image_bytes, 10 * 1024 * 1024);
        assert_eq!(c.media.max_video_bytes, 100 * 1024 * 1024);
        assert_eq!(c.media.daily_quota_bytes, 500 * 1024 * 1024);
        assert_eq!(c.media.unsent_ttl, Duration::from_secs(86_400));
        assert_eq!(c.media.process_concurrency, 2);
        let mut pairs = GOOD.to_vec();
        pairs.extend([
            ("MEDIA_MAX_FILE_BYTES", "4096"),
            ("MEDIA_UNSENT_TTL_SECS", "120"),
        ]);
        let c = Config::from_lookup(env(&pairs)).expect("valid");
        assert_eq!(c.media.max_bytes(shared::media::MediaKind::File), 4096);
        assert_eq!(c.media.unsent_ttl, Duration::from_secs(120));
        for (var, bad) in [
            ("MEDIA_MAX_IMAGE_BYTES", "0"),
            ("MEDIA_DAILY_QUOTA_BYTES", "lots"),
            ("MEDIA_PROCESS_CONCURRENCY", "0"),
            ("MEDIA_UNSENT_TTL_SECS", "1"),
        ] {
            let mut pairs = GOOD.to_vec();
            pairs.push((var, bad));
            let err = Config::from_lookup(env(&pairs)).expect_err(bad);
            assert!(err.to_string().starts_with(var), "{err}");
        }
    }

    /// A valid P-256 scalar (RFC 8291's example application server key).
    const VAPID: &str = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw";

    #[test]
    fn debug_output_hides_secrets() {
        let mut pairs = GOOD.to_vec();
        pairs.push(("VAPID_PRIVATE_KEY", VAPID));
        let c = Config::from_lookup(env(&pairs)).expect("valid");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("jwt-secret"));
        assert!(!dbg.contains("svc-secret"));
        assert!(!dbg.contains(VAPID));
        assert!(dbg.contains("VapidKey([redacted])"), "{dbg}");
    }

    #[test]
    fn push_is_off_without_a_vapid_key_and_has_defaults() {
        let c = Config::from_lookup(env(GOOD)).expect("valid");
        assert!(c.push.vapid_private_key.is_none());
        assert_eq!(c.push.vapid_subject, "mailto:ops@vibe.fit");
        assert_eq!(
            c.push.allowed_hosts,
            [
                "fcm.googleapis.com",
                "updates.push.services.mozilla.com",
                "*.notify.windows.com",
                "web.push.apple.com",
                "*.push.apple.com"
            ]
        );
        assert!(!c.push.allow_loopback);
        assert_eq!(c.push.coalesce, Duration::from_millis(3000));
        assert_eq!(c.push.ttl, Duration::from_secs(86_400));
        assert_eq!(c.push.max_attempts, 6);
        assert_eq!(c.push.retry_base, Duration::from_millis(1000));
        let mut pairs = GOOD.to_vec();
        pairs.push(("VAPID_PRIVATE_KEY", ""));
        assert!(
            Config::from_lookup(env(&pairs))
                .expect("valid")
                .push
                .vapid_private_key
                .is_none()
        );
    }

    #[test]
    fn push_variables_are_checked_and_a_bad_key_is_not_quoted() {
        let mut pairs = GOOD.to_vec();
        pairs.extend([
            ("VAPID_PRIVATE_KEY", VAPID),
            ("VAPID_SUBJECT", "https://vibe.fit/contact"),
            ("PUSH_ALLOWED_HOSTS", " Push.Example.com , *.example.net "),
            ("PUSH_ALLOW_LOOPBACK", "true"),
            ("PUSH_COALESCE_MS", "0"),
        ]);
        let c = Config::from_lookup(env(&pairs)).expect("valid");
        assert_eq!(
            c.push.vapid_private_key.map(|k| *k.bytes()),
            VapidKey::from_base64url(VAPID).ok().map(|k| *k.bytes())
        );
        assert_eq!(c.push.allowed_hosts, ["push.example.com", "*.example.net"]);
        assert!(c.push.allow_loopback);
        assert_eq!(c.push.coalesce, Duration::ZERO);

        // 32 bytes of 0xff: above the curve order, so not a private key.
        let too_big = "__________________________________________8";
        for (var, bad) in [
            ("VAPID_PRIVATE_KEY", "not-base64!"),
            ("VAPID_PRIVATE_KEY", "AAAA"),
            ("VAPID_PRIVATE_KEY", too_big),
            (
                "VAPID_PRIVATE_KEY",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            ),
            ("VAPID_SUBJECT", "ops@vibe.fit"),
            ("PUSH_ALLOWED_HOSTS", "https://fcm.googleapis.com"),
            ("PUSH_ALLOWED_HOSTS", "*"),
            ("PUSH_ALLOW_LOOPBACK", "yes please"),
            ("PUSH_MAX_ATTEMPTS", "0"),
        ] {
            let mut pairs = GOOD.to_vec();
            pairs.push((var, bad));
            let err = Config::from_lookup(env(&pairs)).expect_err(bad);
            assert!(err.to_string().starts_with(var), "{err}");
            if var == "VAPID_PRIVATE_KEY" {
                assert!(!err.to_string().contains(bad), "{err}");
            }
        }
    }
}
