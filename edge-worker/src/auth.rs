//! Who is calling. The JWT is checked here, at the edge, before any Durable
//! Object is touched, with the rule in `shared::auth`.

use shared::auth::{ACCESS_TOKEN_TTL_SECS, AUDIENCE_API, AUDIENCE_WS_TICKET, AuthError, Claims};
use uuid::Uuid;
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

impl Caller {
    /// When a realtime connection opened with this credential must be
    /// renewed (`{"type":"auth"}`) or closed, in ms since the epoch. A
    /// session token's own expiry; a ticket's connection may live as long as
    /// the access token it was minted with (a ticket only opens the door).
    pub fn connection_valid_until(&self) -> u64 {
        let exp = match &self.claims {
            c if c.aud == AUDIENCE_WS_TICKET => c
                .session_exp
                .unwrap_or_else(|| c.iat.saturating_add(ACCESS_TOKEN_TTL_SECS)),
            c => c.exp,
        };
        crate::room_store::valid_until(exp)
    }

    /// The ticket's single-use id, when the caller came with a ticket.
    pub fn ticket_id(&self) -> Option<Uuid> {
        (self.claims.aud == AUDIENCE_WS_TICKET)
            .then_some(self.claims.jti)
            .flatten()
    }
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
/// `?ticket=` (60 s, its own audience, single-use, valid only for the
/// `scope` it was minted for), a `?token=` session token, or a bearer
/// header from non-browser clients. `path_token` is the seed's
/// `/api/v1/chat/ws/{token}` form.
pub fn for_realtime(
    req: &Request,
    url: &Url,
    secret: &[u8],
    path_token: Option<&str>,
    scope: &str,
) -> Result<Caller, AuthError> {
    if let Some(ticket) = query(url, "ticket") {
        let caller = verify(&ticket, secret, AUDIENCE_WS_TICKET)?;
        // A ticket opens what it was minted for, once (the object it opens
        // remembers the jti).
        if caller.claims.scope.as_deref() != Some(scope) || caller.claims.jti.is_none() {
            return Err(AuthError::Invalid);
        }
        return Ok(caller);
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
