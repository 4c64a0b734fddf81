//! The edge's one error type. Every failure leaves as a JSON
//! `{code, message}` with the status the variant names; nothing leaks the
//! origin's internals or a token.

use serde::Serialize;
use shared::auth::AuthError;
use shared::media::MediaError;
use shared::room::RoomError;
use worker::Response;

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// 401: no token, a bad one, or an expired one.
    #[error("{0}")]
    Unauthorized(AuthError),
    /// 403: not a member, or an upgrade from a disallowed `Origin`.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 404
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 400 / 413 / 422 / 426 with a code.
    #[error("{message}")]
    Client {
        status: u16,
        code: &'static str,
        message: String,
    },
    /// The room refused (its own status: 400, 403, 413, 422, 429, 503).
    #[error("{0}")]
    Room(RoomError),
    /// An upload or a download refused (413, 415, 422, 403).
    #[error("{0}")]
    Media(MediaError),
    /// The origin refused an internal call on the caller's behalf with a
    /// typed error (an upload's reservation: 403, 404, 413): passed on.
    #[error("{message}")]
    Relayed {
        status: u16,
        code: &'static str,
        message: String,
    },
    /// 503: the origin did not answer; chat at the edge goes on.
    #[error("the origin is unavailable")]
    OriginUnavailable(String),
    /// 500: a bug. Logged, never shown.
    #[error("internal error")]
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: String,
}

impl EdgeError {
    pub fn status(&self) -> u16 {
        match self {
            EdgeError::Unauthorized(_) => 401,
            EdgeError::Forbidden(_) => 403,
            EdgeError::NotFound(_) => 404,
            EdgeError::Client { status, .. } => *status,
            EdgeError::Room(e) => e.http_status(),
            EdgeError::Media(e) => e.http_status(),
            EdgeError::Relayed { status, .. } => *status,
            EdgeError::OriginUnavailable(_) => 503,
            EdgeError::Internal(_) => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            EdgeError::Unauthorized(e) => e.code(),
            EdgeError::Forbidden(_) => "forbidden",
            EdgeError::NotFound(_) => "not_found",
            EdgeError::Client { code, .. } => code,
            EdgeError::Room(e) => e.code(),
            EdgeError::Media(e) => e.code(),
            EdgeError::Relayed { code, .. } => code,
            EdgeError::OriginUnavailable(_) => "origin_unavailable",
            EdgeError::Internal(_) => "internal",
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        EdgeError::Client {
            status: 400,
            code,
            message: message.into(),
        }
    }

    /// The JSON response for this error.
    pub fn to_response(&self) -> worker::Result<Response> {
        match self {
            EdgeError::Internal(detail) => crate::log!(Error, "internal error", "error" => detail),
            EdgeError::OriginUnavailable(detail) => {
                crate::log!(Warn, "origin unavailable", "error" => detail);
            }
            _ => {}
        }
        let body = ErrorBody {
            code: self.code(),
            message: self.to_string(),
        };
        let mut response = Response::from_json(&body)?.with_status(self.status());
        let retry_after = match self {
            EdgeError::Room(RoomError::RateLimited { retry_after_ms }) => {
                Some(retry_after_ms.div_ceil(1000).max(1))
            }
            EdgeError::OriginUnavailable(_)
            | EdgeError::Room(RoomError::Backpressure | RoomError::Storage) => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .set("retry-after", &secs.to_string())?;
        }
        Ok(response)
    }
}

impl From<worker::Error> for EdgeError {
    fn from(e: worker::Error) -> Self {
        EdgeError::Internal(e.to_string())
    }
}

impl From<AuthError> for EdgeError {
    fn from(e: AuthError) -> Self {
        EdgeError::Unauthorized(e)
    }
}

impl From<RoomError> for EdgeError {
    fn from(e: RoomError) -> Self {
        match e {
            RoomError::NotMember => {
                EdgeError::Forbidden("you are not a member of this conversation")
            }
            other => EdgeError::Room(other),
        }
    }
}

pub type EdgeResult<T> = Result<T, EdgeError>;
