//! Passwords, session tokens and the extractors that guard routes.
//!
//! - [`AuthUser`]: a verified access token (`Authorization: Bearer`) whose
//!   session is live. Every chat route takes one, so an unauthenticated
//!   request never reaches a handler body.
//! - [`ServiceCaller`]: the edge, proven by the shared service secret,
//!   compared in constant time.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use shared::Role;
use shared::auth::{self, AUDIENCE_API, AuthError};
use shared::protocol::internal::SERVICE_SECRET_HEADER;
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
        Ok(AuthUser {
            id,
            name: claims.name,
            role: claims.role,
            sid: claims.sid,
        })
    }
}

/// Proof that the caller holds the service secret (the edge).
#[derive(Debug, Clone, Copy)]
pub struct ServiceCaller;

impl FromRequestParts<AppState> for ServiceCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(SERVICE_SECRET_HEADER)
            .map(|v| v.as_bytes())
            .ok_or(ApiError::Unauthorized(AuthError::Missing))?;
        // ct_eq on slices of different lengths returns false without an
        // early exit on content; the secret's length is not a secret.
        if bool::from(presented.ct_eq(&state.keys.service_secret)) {
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
