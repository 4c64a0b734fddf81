//! JWT claims and the single verification rule shared by the origin (which
//! issues tokens) and the edge (which checks them before any Durable Object
//! is touched).
//!
//! The rule: HS256 only (the algorithm in the header is never trusted), `exp`,
//! `iss`, `aud` and `sub` required, `iss`/`aud` must match, and expiry is
//! checked against the caller's clock with at most [`MAX_LEEWAY_SECS`] of
//! slack. `jsonwebtoken`'s own expiry check is off because it reads
//! `SystemTime::now()`, which panics on wasm32; we check `exp` ourselves.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::domain::Role;

/// `iss` of every token this system mints.
pub const ISSUER: &str = "vibe-chat";
/// `aud` of the session token that `POST /api/v1/auth/login` returns.
pub const AUDIENCE_API: &str = "vibe-chat-api";
/// `aud` of the short-lived WebSocket/EventSource ticket. A ticket is not a
/// session token: it only opens a realtime connection.
pub const AUDIENCE_WS_TICKET: &str = "vibe-chat-ws-ticket";
/// Clock skew we tolerate between the minting and the checking host.
pub const MAX_LEEWAY_SECS: i64 = 60;
/// Leeway actually applied. Below the ceiling, because a stolen token's extra
/// life is the price of every second here.
pub const LEEWAY_SECS: i64 = 30;
/// Life of a WebSocket ticket.
pub const WS_TICKET_TTL_SECS: i64 = 60;
/// Shortest HMAC secret we accept (256 bits, as RFC 7518 §3.2 asks for HS256).
pub const MIN_SECRET_BYTES: usize = 32;

/// The claims of a session token or a ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id, as a decimal string (RFC 7519 makes `sub` a string).
    pub sub: String,
    pub name: String,
    pub role: Role,
    pub iss: String,
    pub aud: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: i64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: i64,
}

impl Claims {
    /// Claims for `user_id` with the given audience, valid for `ttl_secs`.
    pub fn new(
        user_id: i64,
        name: impl Into<String>,
        role: Role,
        audience: &str,
        now_unix: i64,
        ttl_secs: i64,
    ) -> Self {
        Self {
            sub: user_id.to_string(),
            name: name.into(),
            role,
            iss: ISSUER.to_owned(),
            aud: audience.to_owned(),
            exp: now_unix.saturating_add(ttl_secs),
            iat: now_unix,
        }
    }

    /// The user id in `sub`. Verified tokens always have a numeric `sub`.
    pub fn user_id(&self) -> Result<i64, AuthError> {
        self.sub.parse().map_err(|_| AuthError::Invalid)
    }
}

/// Why a token was refused. Every variant is a 401 (WS close 1008); the
/// distinction is for logs, and for telling a client to refresh its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token")]
    Invalid,
}

impl AuthError {
    pub fn code(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Expired => "token_expired",
            AuthError::Invalid => "invalid_token",
        }
    }
}

/// Signs `claims` with HS256.
pub fn issue(claims: &Claims, secret: &[u8]) -> Result<String, AuthError> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|_| AuthError::Invalid)
}

/// Verifies `token` for `audience` at `now_unix` and returns its claims.
pub fn verify(
    token: &str,
    secret: &[u8],
    audience: &str,
    now_unix: i64,
) -> Result<Claims, AuthError> {
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.set_issuer(&[ISSUER]);
    validation.set_audience(&[audience]);
    let data =
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation)
            .map_err(|_| AuthError::Invalid)?;
    let claims = data.claims;
    if claims.exp.saturating_add(LEEWAY_SECS) < now_unix {
        return Err(AuthError::Expired);
    }
    // A token issued in the future is a sign of a broken clock or forgery.
    if claims.iat.saturating_sub(LEEWAY_SECS) > now_unix {
        return Err(AuthError::Invalid);
    }
    claims.user_id()?;
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_800_000_000;

    fn token(aud: &str, iat: i64, ttl: i64) -> String {
        let claims = Claims::new(7, "Alex", Role::Member, aud, iat, ttl);
        issue(&claims, SECRET).expect("sign")
    }

    #[test]
    fn a_fresh_token_verifies_and_carries_its_user() {
        let claims =
            verify(&token(AUDIENCE_API, NOW, 3600), SECRET, AUDIENCE_API, NOW).expect("valid");
        assert_eq!(claims.user_id(), Ok(7));
        assert_eq!(claims.role, Role::Member);
    }

    #[test]
    fn an_expired_token_is_refused_after_the_leeway() {
        let t = token(AUDIENCE_API, NOW - 100, 60);
        // exp = NOW - 40: within 30 s of leeway it is still late.
        assert_eq!(
            verify(&t, SECRET, AUDIENCE_API, NOW),
            Err(AuthError::Expired)
        );
        let t = token(AUDIENCE_API, NOW - 80, 60);
        // exp = NOW - 20: inside the leeway.
        assert!(verify(&t, SECRET, AUDIENCE_API, NOW).is_ok());
    }

    #[test]
    fn a_ticket_is_not_a_session_token_and_vice_versa() {
        let ticket = token(AUDIENCE_WS_TICKET, NOW, WS_TICKET_TTL_SECS);
        assert_eq!(
            verify(&ticket, SECRET, AUDIENCE_API, NOW),
            Err(AuthError::Invalid)
        );
        let session = token(AUDIENCE_API, NOW, 3600);
        assert_eq!(
            verify(&session, SECRET, AUDIENCE_WS_TICKET, NOW),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn a_token_signed_with_another_secret_is_refused() {
        let t = token(AUDIENCE_API, NOW, 3600);
        assert_eq!(
            verify(&t, b"another-secret-another-secret-xx", AUDIENCE_API, NOW),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn the_none_algorithm_is_refused() {
        // header {"alg":"none","typ":"JWT"} with valid-looking claims
        let claims = Claims::new(7, "Alex", Role::Member, AUDIENCE_API, NOW, 3600);
        let body = serde_json::to_vec(&claims).expect("json");
        let b64 = base64url;
        let forged = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), b64(&body));
        assert_eq!(
            verify(&forged, SECRET, AUDIENCE_API, NOW),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn a_wrong_issuer_is_refused() {
        let mut claims = Claims::new(7, "Alex", Role::Member, AUDIENCE_API, NOW, 3600);
        claims.iss = "someone-else".into();
        let t = issue(&claims, SECRET).expect("sign");
        assert_eq!(
            verify(&t, SECRET, AUDIENCE_API, NOW),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn an_empty_token_is_missing_and_garbage_is_invalid() {
        assert_eq!(
            verify("", SECRET, AUDIENCE_API, NOW),
            Err(AuthError::Missing)
        );
        assert_eq!(
            verify("not.a.jwt", SECRET, AUDIENCE_API, NOW),
            Err(AuthError::Invalid)
        );
    }

    /// Minimal unpadded base64url, enough to forge a test token.
    fn base64url(input: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            let chars = chunk.len() + 1;
            for i in 0..chars {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
