//! Sessions and rotating refresh tokens, in PostgreSQL.
//!
//! A session is one login on one device. It owns a family of refresh
//! tokens: opaque 256-bit random strings (base64url, 43 characters) of which
//! only the SHA-256 is stored. Each refresh token is used once: the refresh
//! marks it used and mints its successor in the same transaction. Using a
//! token that was already used means two parties hold the family (a thief
//! and the owner), so the whole session is revoked and neither can renew.
//!
//! **Concurrent refreshes with one token**: the `UPDATE … WHERE used_at IS
//! NULL` takes the row lock, so exactly one wins; the loser waits for the
//! winner's commit, finds the token used, and is treated as a reuse (the
//! session is revoked, the winner's new token with it). We do not allow a
//! grace window: only hashes are stored, so the loser cannot be handed the
//! winner's successor, and minting a second successor would fork the family
//! and give a thief who races the owner a live branch. Clients must keep
//! one refresh in flight per session (across tabs, too).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::metrics::Timed;

/// Length of a refresh token as the client holds it: 32 bytes in unpadded
/// base64url.
pub const REFRESH_TOKEN_CHARS: usize = 43;
/// Longest `User-Agent` kept with a session.
const USER_AGENT_CHARS: usize = 256;

/// A freshly minted refresh token. The plain token exists only in this
/// value and in the response; `Debug` hides it.
pub struct NewRefreshToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for NewRefreshToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewRefreshToken")
            .field("token", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Why a session may not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    Logout,
    LogoutAll,
    PasswordChanged,
    RefreshTokenReused,
}

impl Revocation {
    fn as_str(self) -> &'static str {
        match self {
            Revocation::Logout => "logout",
            Revocation::LogoutAll => "logout_all",
            Revocation::PasswordChanged => "password_changed",
            Revocation::RefreshTokenReused => "refresh_token_reused",
        }
    }
}

/// A new random refresh token (256 bits from the OS).
fn random_token() -> ApiResult<String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("random refresh token: {e}")))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// True when `token` has the shape of a refresh token we mint, so garbage
/// never reaches the database.
fn well_formed(token: &str) -> bool {
    token.len() == REFRESH_TOKEN_CHARS
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Stores a refresh token for `session_id`, valid for `ttl`.
async fn insert_token(
    client: &impl GenericClient,
    session_id: Uuid,
    ttl: Duration,
) -> ApiResult<NewRefreshToken> {
    let token = random_token()?;
    let ttl = chrono::Duration::from_std(ttl).map_err(|e| ApiError::Internal(e.into()))?;
    let expires_at = Utc::now() + ttl;
    client
        .execute(
            "INSERT INTO refresh_tokens (token_hash, session_id, expires_at) VALUES ($1, $2, $3)",
            &[&hash(&token), &session_id, &expires_at],
        )
        .timed("session_insert_refresh_token")
        .await?;
    Ok(NewRefreshToken { token, expires_at })
}

/// Opens a session for `user_id` and mints its first refresh token.
pub async fn create(
    client: &mut deadpool_postgres::Client,
    user_id: i64,
    user_agent: Option<&str>,
    ttl: Duration,
) -> ApiResult<(Uuid, NewRefreshToken)> {
    let id = Uuid::now_v7();
    let user_agent: Option<String> =
        user_agent.map(|ua| ua.chars().take(USER_AGENT_CHARS).collect());
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO sessions (id, user_id, user_agent) VALUES ($1, $2, $3)",
        &[&id, &user_id, &user_agent],
    )
    .timed("session_create")
    .await?;
    let token = insert_token(&tx, id, ttl).await?;
    tx.commit().await?;
    Ok((id, token))
}

/// The session and user behind a successful rotation.
#[derive(Debug)]
pub struct Rotated {
    pub session_id: Uuid,
    pub user_id: i64,
    pub refresh: NewRefreshToken,
}

/// Exchanges `presented` for a new refresh token of the same session.
///
/// Refusals, all 401: `invalid_refresh_token` (unknown or malformed),
/// `session_revoked`, `refresh_token_expired`, and `refresh_token_reused`
/// (which revokes the session first).
pub async fn rotate(
    client: &mut deadpool_postgres::Client,
    presented: &str,
    ttl: Duration,
) -> ApiResult<Rotated> {
    if !well_formed(presented) {
        return Err(ApiError::RefreshTokenInvalid);
    }
    let token_hash = hash(presented);
    let tx = client.transaction().await?;
    // The row lock makes this the one winner among concurrent uses.
    let won = tx
        .query_opt(
            "UPDATE refresh_tokens t SET used_at = now()
             FROM sessions s
             WHERE t.token_hash = $1 AND t.used_at IS NULL AND t.expires_at > now()
               AND s.id = t.session_id AND s.revoked_at IS NULL
             RETURNING t.session_id, s.user_id",
            &[&token_hash],
        )
        .timed("session_refresh")
        .await?;
    if let Some(row) = won {
        let session_id: Uuid = row.get(0);
        let user_id: i64 = row.get(1);
        let refresh = insert_token(&tx, session_id, ttl).await?;
        tx.execute(
            "UPDATE sessions SET last_used_at = now() WHERE id = $1",
            &[&session_id],
        )
        .timed("session_touch")
        .await?;
        tx.commit().await?;
        return Ok(Rotated {
            session_id,
            user_id,
            refresh,
        });
    }
    // Not exchanged: find out why. Read after the winner's commit (READ
    // COMMITTED), so a concurrent loser sees the token as used.
    let why = tx
        .query_opt(
            "SELECT s.id, s.user_id, s.revoked_at IS NOT NULL, t.expires_at <= now(),
                    t.used_at IS NOT NULL
             FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id
             WHERE t.token_hash = $1",
            &[&token_hash],
        )
        .timed("session_refresh_refused_why")
        .await?;
    let Some(row) = why else {
        return Err(ApiError::RefreshTokenInvalid);
    };
    let (session_id, user_id): (Uuid, i64) = (row.get(0), row.get(1));
    let (revoked, expired, used): (bool, bool, bool) = (row.get(2), row.get(3), row.get(4));
    if revoked {
        return Err(ApiError::SessionRevoked);
    }
    if expired {
        return Err(ApiError::RefreshTokenExpired);
    }
    if used {
        revoke(&tx, session_id, Revocation::RefreshTokenReused).await?;
        tx.commit().await?;
        // No token in the log: the session and user are enough to follow up.
        tracing::warn!(%session_id, user_id, "refresh token reused; session revoked");
        return Err(ApiError::RefreshTokenReused);
    }
    // Unreachable by the UPDATE's conditions; refuse rather than guess.
    Err(ApiError::RefreshTokenInvalid)
}

/// Revokes one session (no-op when it already is), and deletes the push
/// subscriptions it registered: a logged-out browser hears nothing more
/// of the account.
pub async fn revoke(
    client: &impl GenericClient,
    session_id: Uuid,
    reason: Revocation,
) -> ApiResult<()> {
    client
        .execute(
            "WITH revoked AS (
                 UPDATE sessions SET revoked_at = now(), revoked_reason = $2
                 WHERE id = $1 AND revoked_at IS NULL
                 RETURNING id)
             DELETE FROM push_subscriptions WHERE session_id = $1",
            &[&session_id, &reason.as_str()],
        )
        .timed("session_revoke")
        .await?;
    Ok(())
}

/// Revokes every session of `user_id` except `keep`, and deletes the push
/// subscriptions they registered. Returns how many sessions.
pub async fn revoke_all(
    client: &impl GenericClient,
    user_id: i64,
    keep: Option<Uuid>,
    reason: Revocation,
) -> ApiResult<u64> {
    let row = client
        .query_one(
            "WITH revoked AS (
                 UPDATE sessions SET revoked_at = now(), revoked_reason = $3
                 WHERE user_id = $1 AND revoked_at IS NULL AND id IS DISTINCT FROM $2
                 RETURNING id),
             unsubscribed AS (
                 DELETE FROM push_subscriptions s USING revoked r WHERE s.session_id = r.id)
             SELECT count(*) FROM revoked",
            &[&user_id, &keep, &reason.as_str()],
        )
        .timed("session_revoke_all")
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// True when session `id` of `user_id` exists and is not revoked.
pub async fn is_live(client: &impl GenericClient, id: Uuid, user_id: i64) -> ApiResult<bool> {
    let stmt = client
        .prepare_cached(
            "SELECT 1 FROM sessions WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .await?;
    Ok(client
        .query_opt(&stmt, &[&id, &user_id])
        .timed("session_is_live")
        .await?
        .is_some())
}

/// Deletes expired refresh tokens, and sessions that can no longer be
/// renewed (revoked, or unused for longer than a refresh token lives) once
/// their access tokens have certainly expired. Returns (tokens, sessions).
pub async fn sweep(
    client: &impl GenericClient,
    refresh_ttl: Duration,
    access_ttl: Duration,
) -> ApiResult<(u64, u64)> {
    let tokens = client
        .execute("DELETE FROM refresh_tokens WHERE expires_at < now()", &[])
        .timed("session_sweep_tokens")
        .await?;
    let refresh_secs = i64::try_from(refresh_ttl.as_secs()).unwrap_or(i64::MAX);
    // An access token names its session for its whole life (plus leeway);
    // until then the row must stay, so REST can tell it was revoked.
    let grace_secs = i64::try_from(access_ttl.as_secs())
        .unwrap_or(i64::MAX)
        .saturating_add(shared::auth::MAX_LEEWAY_SECS);
    let sessions = client
        .execute(
            "DELETE FROM sessions
             WHERE (revoked_at IS NOT NULL AND revoked_at < now() - make_interval(secs => $2))
                OR last_used_at < now() - make_interval(secs => $1 + $2)",
            &[&(refresh_secs as f64), &(grace_secs as f64)],
        )
        .timed("session_sweep_sessions")
        .await?;
    Ok((tokens, sessions))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_refresh_tokens_are_256_random_bits_in_base64url() {
        let a = random_token().expect("random");
        let b = random_token().expect("random");
        assert_ne!(a, b);
        assert!(well_formed(&a), "{a}");
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).expect("base64url").len(), 32);
    }

    #[test]
    fn only_the_minted_shape_is_well_formed() {
        assert!(!well_formed(""));
        assert!(!well_formed(&"a".repeat(42)));
        assert!(!well_formed(&"a".repeat(44)));
        assert!(!well_formed(&format!("{}=", "a".repeat(42))));
        assert!(!well_formed(&format!("{}\0", "a".repeat(42))));
        assert!(well_formed(&format!("{}-_", "a".repeat(41))));
    }

    #[test]
    fn a_new_refresh_tokens_debug_hides_the_token() {
        let t = NewRefreshToken {
            token: "secret-token".to_owned(),
            expires_at: Utc::now(),
        };
        assert!(!format!("{t:?}").contains("secret-token"));
    }
}
