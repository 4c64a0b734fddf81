//! Passwords, session tokens and the extractors that guard routes.
//!
//! - [`AuthUser`]: a verified access token (`Authorization: Bearer`) whose
//!   session is live. Every chat route takes one, so an unauthenticated
//!   request never reaches a handler body.
//! - [`ServiceCaller`]: the edge, proven by the shared service secret,
//!   compared in constant time.
//! - [`ClientAddr`]: the caller's IP address for the login guard: the one
//!   the edge forwards when the request carries the service secret, else the
//!   TCP peer.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use shared::Role;
use shared::auth::{self, AUDIENCE_API, AuthError};
use shared::protocol::internal::{CLIENT_IP_HEADER, SERVICE_SECRET_HEADER};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::state::AppState;

/// Hashes `password` with Argon2id (the crate's defaults follow OWASP's
/// recommendation). CPU-heavy: call from a blocking thread.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hash password: {e}"))
}

/// True when `password` matches `hash`. A malformed stored hash is a
/// mismatch, never a panic. CPU-heavy: call from a blocking thread.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// The caller of a chat route, from a verified access token.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: i64,
    pub name: String,
    pub role: Role,
    /// The session the token was minted for (`None` only for tokens minted
    /// outside the origin, by tools and tests, which have no session).
    pub sid: Option<uuid::Uuid>,
}

/// Seconds since the Unix epoch, from the system clock.
pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?;
        let value = header.to_str().map_err(|_| AuthError::Invalid)?.trim();
        // The scheme is case-insensitive (RFC 9110 §11.1); "Bearer" with
        // nothing after it is a missing token, not a malformed one.
        let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Invalid.into());
        }
        let token = token.trim();
        let claims = auth::verify(token, &state.keys.jwt_secret, AUDIENCE_API, now_unix())?;
        let id = claims.user_id()?;
        // One primary-key lookup: every REST route reads PostgreSQL anyway,
        // and it makes a logout or password change final on REST at once
        // instead of when the access token runs out. (The edge does not
        // ask; revocation reaches it through refresh.)
        if let Some(sid) = claims.sid {
            let client = state.pool.get().await?;
            if !crate::sessions::is_live(&client, sid, id).await? {
                return Err(ApiError::SessionRevoked);
            }
        }
        // With a read replica: lets the write tracker know whose request
        // this is (see crate::replica::track_writes).
        if let Some(slot) = parts.extensions.get::<crate::replica::WriterSlot>() {
            slot.fill(id);
        }
        Ok(AuthUser {
            id,
            name: claims.name,
            role: claims.role,
            sid: claims.sid,
        })
    }
}

/// True when `headers` carry the service secret. Constant time: ct_eq on
/// slices of different lengths returns false without an early exit on
/// content; the secret's length is not a secret.
fn has_service_secret(headers: &HeaderMap, state: &AppState) -> bool {
    headers
        .get(SERVICE_SECRET_HEADER)
        .is_some_and(|v| bool::from(v.as_bytes().ct_eq(&state.keys.service_secret)))
}

/// The caller's IP address. Behind the edge every TCP peer is the edge, so
/// the edge forwards the caller's address in `x-vibe-client-ip`; that header
/// is believed only next to a valid service secret (a client could send it
/// too). Without either, the TCP peer address counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let forwarded = parts
            .headers
            .get(CLIENT_IP_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<IpAddr>().ok());
        if let Some(ip) = forwarded {
            if has_service_secret(&parts.headers, state) {
                return Ok(ClientAddr(ip));
            }
        }
        // Served without connect info (a router used directly in a tool):
        // everyone shares one address, which only makes the guard stricter.
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        Ok(ClientAddr(peer))
    }
}

/// Proof that the caller holds the service secret (the edge).
#[derive(Debug, Clone, Copy)]
pub struct ServiceCaller;

impl FromRequestParts<AppState> for ServiceCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if !parts.headers.contains_key(SERVICE_SECRET_HEADER) {
            return Err(ApiError::Unauthorized(AuthError::Missing));
        }
        if has_service_secret(&parts.headers, state) {
            Ok(ServiceCaller)
        } else {
            Err(ApiError::Unauthorized(AuthError::Invalid))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hashed_password_verifies_and_a_wrong_one_does_not() {
        let hash = hash_password("demo-password").expect("hash");
        assert!(verify_password("demo-password", &hash));
        assert!(!verify_password("demo-passwore", &hash));
        assert!(!verify_password("demo-password", "not a hash"));
    }
}
