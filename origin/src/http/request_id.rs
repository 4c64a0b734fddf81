//! Request ids: every request the origin serves has one, in its tracing
//! span (so every log line of the request carries it) and echoed in the
//! response's `x-request-id`.
//!
//! The edge sends the id it gave the client's request, so one id follows a
//! request from the edge's logs into the origin's. An id that is missing,
//! or not a short plain token, is replaced by a fresh one: it goes into
//! log lines and a response header, so it must not carry anything else
//! (newlines, quotes, a whole payload).

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

/// The header, on the request and on the response.
pub const HEADER: &str = shared::redact::REQUEST_ID_HEADER;

/// The longest id accepted from a caller.
pub const MAX_LEN: usize = shared::redact::MAX_REQUEST_ID_LEN;

/// The request's id, in its extensions for whatever else wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// Whether a caller's id is kept (the edge's rule: see
/// [`shared::redact::is_sane_request_id`]).
pub fn is_sane(id: &str) -> bool {
    shared::redact::is_sane_request_id(id)
}

/// A new id: a random UUID, 32 hex digits.
pub fn mint() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Middleware: keeps a sane `x-request-id` or mints one, puts it on the
/// request (header and [`RequestId`]) before the trace layer makes the
/// request's span, and on the response.
pub async fn middleware(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_sane(v))
        .map_or_else(mint, str::to_owned);
    // A sane id is always a valid header value.
    let value = HeaderValue::from_str(&id).ok();
    if let Some(v) = &value {
        req.headers_mut().insert(HEADER, v.clone());
    }
    req.extensions_mut().insert(RequestId(id));
    let mut response = next.run(req).await;
    if let Some(v) = value {
        response.headers_mut().insert(HEADER, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_plain_tokens_are_kept_as_request_ids() {
        for ok in ["a", "req-1", "A.b_c-9", &"x".repeat(MAX_LEN), &mint()] {
            assert!(is_sane(ok), "{ok:?}");
        }
        for bad in [
            "",
            &"x".repeat(MAX_LEN + 1),
            "has space",
            "new\nline",
            "quote\"",
            "colon:1",
            "slash/1",
            "é",
            "tab\t",
        ] {
            assert!(!is_sane(bad), "{bad:?}");
        }
    }

    #[test]
    fn minted_ids_are_fresh_32_hex_digits() {
        let (a, b) = (mint(), mint());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
