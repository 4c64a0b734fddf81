//! Who is calling. The JWT is checked here, at the edge, before any Durable
//! Object is touched, with the rule in `shared::auth`.

use shared::auth::{AUDIENCE_API, AUDIENCE_WS_TICKET, AuthError, Claims};
use worker::{Date, Request, Url};

/// Seconds since the Unix epoch (wasm has no `SystemTime::now`).
pub fn now_unix() -> i64 {
    i64::try_from(Date::now().as_millis() / 1000).unwrap_or(i64::MAX)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    Date::now().as_millis()
}

/// The caller, verified.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: i64,
    pub claims: Claims,
}

fn bearer(req: &Request) -> Option<String> {
    let header = req.headers().get("authorization").ok().flatten()?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))?;
    Some(token.trim().to_owned())
}

fn query(url: &Url, key: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// A session token from `Authorization: Bearer`.
pub fn from_bearer(req: &Request, secret: &[u8]) -> Result<Caller, AuthError> {
    let token = bearer(req).ok_or(AuthError::Missing)?;
    verify(&token, secret, AUDIENCE_API)
}

/// For realtime connections, which browsers open without headers: a
/// `?ticket=` (60 s, its own audience), a `?token=` session token, or a
/// bearer header from non-browser clients. `path_token` is the seed's
/// `/api/v1/chat/ws/{token}` form.
pub fn for_realtime(
    req: &Request,
    url: &Url,
    secret: &[u8],
    path_token: Option<&str>,
) -> Result<Caller, AuthError> {
    if let Some(ticket) = query(url, "ticket") {
        return verify(&ticket, secret, AUDIENCE_WS_TICKET);
    }
    if let Some(token) = query(url, "token").or_else(|| path_token.map(str::to_owned)) {
        return verify(&token, secret, AUDIENCE_API);
    }
    from_bearer(req, secret)
}

fn verify(token: &str, secret: &[u8], audience: &str) -> Result<Caller, AuthError> {
    let claims = shared::auth::verify(token, secret, audience, now_unix())?;
    Ok(Caller {
        user_id: claims.user_id()?,
        claims,
    })
}
