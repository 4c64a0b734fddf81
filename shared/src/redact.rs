//! Keeps credentials out of log lines.
//!
//! Browsers cannot set headers on a WebSocket or an EventSource, so tokens
//! travel in URLs: `?token=…`, `?ticket=…` and the seed's
//! `/api/v1/chat/ws/{token}`. Every URL that reaches a log goes through
//! [`redact_url`] first.

use std::borrow::Cow;

const REDACTED: &str = "[redacted]";
/// Query parameters whose values are credentials.
const SECRET_PARAMS: &[&str] = &["token", "ticket", "access_token"];
/// Path prefix whose next segment is a token (the seed's always-on route).
const TOKEN_PATH_PREFIX: &str = "/api/v1/chat/ws/";

/// Returns `url` (a path with optional query, or an absolute URL) with
/// credential values replaced by `[redacted]`.
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let (before_query, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    let path_start = path_offset(before_query);
    let path = &before_query[path_start..];
    let path_has_token = path
        .strip_prefix(TOKEN_PATH_PREFIX)
        .is_some_and(|rest| !rest.is_empty());
    let query_has_secret = query.is_some_and(|q| {
        q.split('&')
            .any(|pair| SECRET_PARAMS.contains(&pair.split('=').next().unwrap_or("")))
    });
    if !path_has_token && !query_has_secret {
        return Cow::Borrowed(url);
    }
    let mut out = String::with_capacity(url.len());
    out.push_str(&before_query[..path_start]);
    if path_has_token {
        out.push_str(TOKEN_PATH_PREFIX);
        out.push_str(REDACTED);
    } else {
        out.push_str(path);
    }
    if let Some(q) = query {
        out.push('?');
        for (i, pair) in q.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((k, _)) if SECRET_PARAMS.contains(&k) => {
                    out.push_str(k);
                    out.push('=');
                    out.push_str(REDACTED);
                }
                _ => out.push_str(pair),
            }
        }
    }
    Cow::Owned(out)
}

/// Byte offset where the path begins (after `scheme://host` if present).
fn path_offset(s: &str) -> usize {
    match s.find("://") {
        Some(i) => s[i + 3..].find('/').map_or(s.len(), |j| i + 3 + j),
        None => 0,
    }
}

/// The header that names a request from the client through the edge into
/// the origin's log lines.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The longest request id accepted from a caller.
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// Whether a caller's request id is kept (1 to 64 characters of
/// `[A-Za-z0-9._-]`): it goes into log lines and headers at the edge and
/// the origin, so it must not carry anything else (newlines, quotes, a
/// payload). Anything else is replaced by a fresh id.
pub fn is_sane_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_tokens_are_redacted_and_other_params_kept() {
        assert_eq!(
            redact_url("/api/v1/chat/conversations/1/ws?since=4&token=eyJ.abc.def"),
            "/api/v1/chat/conversations/1/ws?since=4&token=[redacted]"
        );
        assert_eq!(
            redact_url("http://127.0.0.1:8787/x?ticket=t1&a=b"),
            "http://127.0.0.1:8787/x?ticket=[redacted]&a=b"
        );
    }

    #[test]
    fn the_seed_token_path_is_redacted() {
        assert_eq!(
            redact_url("/api/v1/chat/ws/eyJhbGciOi.x.y?since=1"),
            "/api/v1/chat/ws/[redacted]?since=1"
        );
        assert_eq!(
            redact_url("https://edge.example/api/v1/chat/ws/secret"),
            "https://edge.example/api/v1/chat/ws/[redacted]"
        );
    }

    #[test]
    fn urls_without_credentials_are_untouched() {
        let url = "/api/v1/chat/conversations?limit=5";
        assert!(matches!(redact_url(url), Cow::Borrowed(_)));
        assert!(matches!(redact_url("/api/v1/chat/ws"), Cow::Borrowed(_)));
        assert!(matches!(redact_url("/x?tokens=1"), Cow::Borrowed(_)));
    }
}
