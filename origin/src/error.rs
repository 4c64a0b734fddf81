//! The origin's one error type. Every handler returns `Result<_, ApiError>`,
//! and each variant knows its HTTP status and a stable `code` for the
//! `{code, message}` body.
//!
//! Database and internal failures become a generic body plus a log line: the
//! client learns that something broke, not how.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shared::DomainError;
use shared::auth::AuthError;

/// The JSON body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable: clients branch on this.
    pub code: String,
    /// For humans; may change.
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not JSON, or not the JSON we expect at all.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// 401: no token, a bad token, or bad credentials.
    #[error("{0}")]
    Unauthorized(AuthError),
    /// 401 on login, with the same answer whether or not the user exists;
    /// also a wrong current password on a password change.
    #[error("invalid email or password")]
    BadCredentials,
    /// 401: the refresh token is unknown or malformed.
    #[error("invalid refresh token")]
    RefreshTokenInvalid,
    /// 401: the refresh token ran out; log in again.
    #[error("refresh token expired")]
    RefreshTokenExpired,
    /// 401: a refresh token that was already exchanged was presented again.
    /// Someone else holds the family, so the session was revoked.
    #[error("refresh token already used; the session was revoked")]
    RefreshTokenReused,
    /// 401: the session was logged out, or revoked by a password change or
    /// a reuse.
    #[error("session revoked; log in again")]
    SessionRevoked,
    /// 403: authenticated, but not allowed (not a participant, not the owner).
    #[error("{0}")]
    Forbidden(&'static str),
    /// 404
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 405: the path exists, the method does not.
    #[error("this route does not take that method")]
    MethodNotAllowed,
    /// 409: the request conflicts with what is stored.
    #[error("{0}")]
    Conflict(String),
    /// 413: a field or body over its size limit.
    #[error("{0}")]
    TooLarge(String),
    /// 413: an upload would take its uploader past the daily quota.
    #[error("{0}")]
    QuotaExceeded(String),
    /// 415: the body is not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429: too many failed logins for this account; retry after the
    /// given seconds.
    #[error("too many failed logins; try again later")]
    TooManyAttempts { retry_after_secs: u64 },
    /// 422: well-formed, but a field breaks its rule.
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    /// 503: too much password hashing in flight; retry after the given
    /// seconds. Argon2 costs ~19 MiB per check, so the work is bounded.
    #[error("the server is busy; try again shortly")]
    Busy { retry_after_secs: u64 },
    /// 503: the database cannot be reached right now.
    #[error("service temporarily unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// 503: Web Push is not configured on this server (no
    /// `VAPID_PRIVATE_KEY`). Not worth a retry: no `Retry-After`.
    #[error("push notifications are not enabled on this server")]
    PushDisabled,
    /// 500: a bug or an unexpected database error. Logged, never shown.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_)
            | ApiError::BadCredentials
            | ApiError::RefreshTokenInvalid
            | ApiError::RefreshTokenExpired
            | ApiError::RefreshTokenReused
            | ApiError::SessionRevoked => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) | ApiError::QuotaExceeded(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyAttempts { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Busy { .. } | ApiError::Unavailable(_) | ApiError::PushDisabled => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } | ApiError::Unprocessable { code, .. } => code,
            ApiError::Unauthorized(e) => e.code(),
            ApiError::BadCredentials => "bad_credentials",
            ApiError::RefreshTokenInvalid => "invalid_refresh_token",
            ApiError::RefreshTokenExpired => "refresh_token_expired",
            ApiError::RefreshTokenReused => "refresh_token_reused",
            ApiError::SessionRevoked => "session_revoked",
            ApiError::Busy { .. } => "busy",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) => "too_large",
            ApiError::QuotaExceeded(_) => "quota_exceeded",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::TooManyAttempts { .. } => "too_many_attempts",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::PushDisabled => "push_disabled",
            ApiError::Internal(_) => "internal",
        }
    }

    /// A 422 for one invalid field.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::Unprocessable {
            code: "validation_failed",
            message: message.into(),
        }
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        ApiError::Unprocessable {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::Unauthorized(e)
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        // A closed connection or a server going away is an outage, not a bug.
        let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
        if e.is_closed() || io {
            return ApiError::Unavailable(e.into());
        }
        ApiError::Internal(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        // Every pool failure (timeout, refused connection) means the
        // database is not reachable right now.
        ApiError::Unavailable(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Internal(source) => {
                tracing::error!(error = %Chain(source.as_ref()), "internal error");
            }
            ApiError::Unavailable(source) => {
                tracing::warn!(error = %Chain(source.as_ref()), "database unavailable");
            }
            _ => {}
        }
        crate::metrics::record_error(self.code());
        let body = ErrorBody {
            code: self.code().to_owned(),
            message: self.to_string(),
        };
        let retry_after = match &self {
            ApiError::TooManyAttempts { retry_after_secs }
            | ApiError::Busy { retry_after_secs } => Some(*retry_after_secs),
            // Push stays off until the server is reconfigured.
            ApiError::PushDisabled => None,
            // Every other 503 (the database is away) is worth a retry soon.
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(secs) = retry_after {
            if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        response
    }
}

/// The result of every handler.
pub type ApiResult<T> = Result<T, ApiError>;

/// An error and its causes for a log line, `outer: cause: root cause`, so
/// the line says why and not only what (`error = %Chain(&e)`).
///
/// PostgreSQL's errors are shown by severity, SQLSTATE, message and
/// constraint, never their `DETAIL` or `HINT`: a detail quotes the values
/// of the row or key at fault ("Failing row contains (…)"), which can be a
/// message's content or an address.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut next = Some(self.0);
        let mut first = true;
        while let Some(e) = next {
            if !first {
                f.write_str(": ")?;
            }
            first = false;
            match e.downcast_ref::<tokio_postgres::error::DbError>() {
                Some(db) => {
                    write!(
                        f,
                        "{} {}: {}",
                        db.severity(),
                        db.code().code(),
                        db.message()
                    )?;
                    if let Some(c) = db.constraint() {
                        write!(f, " (constraint {c})")?;
                    }
                }
                None => write!(f, "{e}")?,
            }
            next = e.source();
        }
        Ok(())
    }
}

impl std::fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_error_carries_its_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = ApiError::Internal(anyhow::Error::new(io).context("connect to PostgreSQL"));
        assert_eq!(
            Chain(&e).to_string(),
            "internal error: connect to PostgreSQL: refused"
        );
    }
}
