//! JWT claims and the single verification rule shared by the origin (which
//! issues access tokens), the edge (which mints tickets and checks every
//! token before any Durable Object is touched) and the tests.
//!
//! The rule, claim by claim (the table in `docs/ARCHITECTURE.md`, "Token
//! claims and their rules", lists each with its error code and its tests):
//!
//! - the header's `alg` must be HS256: the algorithm in a token is never
//!   trusted (`none`, HS512 and RS256 are refused alike);
//! - the HMAC signature must verify with the shared secret;
//! - `exp`, `iss`, `aud` and `sub` are required, `iss`/`aud` must match and
//!   `sub` must be a decimal user id;
//! - `exp` is checked against the caller's clock with [`LEEWAY_SECS`] of
//!   slack (token_expired);
//! - `nbf`, when present, with the same slack (token_not_yet_valid);
//! - `iat` must not lie in the future beyond the same slack (a broken clock
//!   or a forgery).
//!
//! `jsonwebtoken`'s own time checks stay off because they read
//! `SystemTime::now()`, which panics on wasm32; the time is an argument here.
//!
//! Two kinds of token exist. An **access token** ([`Claims::access`],
//! audience [`AUDIENCE_API`]) is short-lived and carries `sid`, the session
//! (refresh-token family) it was minted from, so revoking the session stops
//! its renewal. A **ticket** ([`Claims::ticket`], audience
//! [`AUDIENCE_WS_TICKET`]) only opens one realtime connection: it carries a
//! `jti` (single use) and a `scope` (what it opens). Whoever consumes a ticket
//! enforces `jti` and `scope`; [`verify`] only checks that they parse.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::Role;

/// `iss` of every token this system mints.
pub const ISSUER: &str = "vibe-chat";
/// `aud` of the access token that `POST /api/v1/auth/login` and
/// `POST /api/v1/auth/refresh` return.
pub const AUDIENCE_API: &str = "vibe-chat-api";
/// `aud` of the short-lived WebSocket/EventSource ticket. A ticket is not an
/// access token: it only opens a realtime connection.
pub const AUDIENCE_WS_TICKET: &str = "vibe-chat-ws-ticket";
/// Clock skew we tolerate between the minting and the checking host.
pub const MAX_LEEWAY_SECS: i64 = 60;
/// Leeway actually applied, to `exp`, `nbf` and `iat` alike. Below the
/// ceiling, because a stolen token's extra life is the price of every second
/// here.
pub const LEEWAY_SECS: i64 = 30;
/// Life of a WebSocket ticket.
pub const WS_TICKET_TTL_SECS: i64 = 60;
/// Default life of an access token (the origin's `ACCESS_TOKEN_TTL_SECS`).
pub const ACCESS_TOKEN_TTL_SECS: i64 = 15 * 60;
/// Shortest HMAC secret we accept (256 bits, as RFC 7518 §3.2 asks for HS256).
pub const MIN_SECRET_BYTES: usize = 32;

/// `scope` of a ticket that opens conversation `id`'s Room.
pub fn conversation_scope(conversation_id: i64) -> String {
    format!("conversation:{conversation_id}")
}

/// `scope` of a ticket that opens the user's own (always-on) connection.
pub const USER_SCOPE: &str = "user";

/// The claims of an access token or a ticket.
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
    /// Not before, seconds since the Unix epoch. Everything we mint sets it
    /// to `iat`; tokens minted before it existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// The session (refresh-token family) the token belongs to. Access
    /// tokens always carry it; a ticket carries the session it was minted
    /// from, when the minting token had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<Uuid>,
    /// Tickets only: a unique id, so a ticket can be used once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<Uuid>,
    /// Tickets only: what the ticket opens, `conversation:{id}` or `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Tickets only: the `exp` of the access token the ticket was minted
    /// with. The connection the ticket opens lives until then unless the
    /// client renews it (`{"type":"auth"}`); the ticket itself is only good
    /// for opening it within [`WS_TICKET_TTL_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_exp: Option<i64>,
}

impl Claims {
    /// Claims for `user_id` with the given audience, valid for `ttl_secs`,
    /// with no session, ticket id or scope. For tools and tests that need a
    /// plain token; the services mint with [`Claims::access`] and
    /// [`Claims::ticket`].
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
            nbf: Some(now_unix),
            sid: None,
            jti: None,
            scope: None,
            session_exp: None,
        }
    }

    /// An access token's claims: audience [`AUDIENCE_API`], session `sid`.
    pub fn access(
        user_id: i64,
        name: impl Into<String>,
        role: Role,
        sid: Uuid,
        now_unix: i64,
        ttl_secs: i64,
    ) -> Self {
        Self {
            sid: Some(sid),
            ..Self::new(user_id, name, role, AUDIENCE_API, now_unix, ttl_secs)
        }
    }

    /// A ticket's claims: audience [`AUDIENCE_WS_TICKET`], single-use `jti`,
    /// `scope` (see [`conversation_scope`] and [`USER_SCOPE`]), and the
    /// session it was minted from.
    #[allow(clippy::too_many_arguments)]
    pub fn ticket(
        user_id: i64,
        name: impl Into<String>,
        role: Role,
        sid: Option<Uuid>,
        scope: &str,
        jti: Uuid,
        now_unix: i64,
        ttl_secs: i64,
    ) -> Self {
        Self {
            sid,
            jti: Some(jti),
            scope: Some(scope.to_owned()),
            ..Self::new(user_id, name, role, AUDIENCE_WS_TICKET, now_unix, ttl_secs)
        }
    }

    /// The user id in `sub`. Verified tokens always have a numeric `sub`.
    pub fn user_id(&self) -> Result<i64, AuthError> {
        self.sub.parse().map_err(|_| AuthError::Invalid)
    }
}

/// Why a token was refused. Every variant is a 401 (WS close 1008); the
/// distinction is for logs, and for telling a client to refresh its token
/// (`token_expired`) or to fix its clock (`token_not_yet_valid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("invalid token")]
    Invalid,
}

impl AuthError {
    pub fn code(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
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
    // Only HS256 is in the list, so the header cannot pick the algorithm.
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
    if claims
        .nbf
        .is_some_and(|nbf| nbf.saturating_sub(LEEWAY_SECS) > now_unix)
    {
        return Err(AuthError::NotYetValid);
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
    use serde_json::{Value, json};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_800_000_000;

    fn sid() -> Uuid {
        Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef)
    }

    fn access(iat: i64, ttl: i64) -> Claims {
        Claims::access(7, "Alex", Role::Member, sid(), iat, ttl)
    }

    fn signed(claims: &Claims) -> String {
        issue(claims, SECRET).expect("sign")
    }

    fn check(token: &str) -> Result<Claims, AuthError> {
        verify(token, SECRET, AUDIENCE_API, NOW)
    }

    /// A token with any header and any payload, signed with HMAC-SHA256 and
    /// the real secret: the strongest forgery short of stealing a token.
    fn forge(header: &Value, payload: &Value) -> String {
        let message = format!(
            "{}.{}",
            base64url(header.to_string().as_bytes()),
            base64url(payload.to_string().as_bytes())
        );
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET),
            Algorithm::HS256,
        )
        .expect("sign");
        format!("{message}.{signature}")
    }

    fn hs256() -> Value {
        json!({"alg": "HS256", "typ": "JWT"})
    }

    /// The payload of a valid access token, as JSON to take apart.
    fn payload() -> Value {
        serde_json::to_value(access(NOW, 900)).expect("json")
    }

    #[test]
    fn an_access_token_verifies_and_carries_its_user_and_session() {
        let claims = check(&signed(&access(NOW, 900))).expect("valid");
        assert_eq!(claims.user_id(), Ok(7));
        assert_eq!(claims.role, Role::Member);
        assert_eq!(claims.aud, AUDIENCE_API);
        assert_eq!(claims.sid, Some(sid()));
        assert_eq!((claims.jti, claims.scope), (None, None));
    }

    #[test]
    fn a_ticket_carries_its_session_scope_and_single_use_id() {
        let jti = Uuid::from_u128(42);
        let scope = conversation_scope(9);
        let claims = Claims::ticket(
            7,
            "Alex",
            Role::Member,
            Some(sid()),
            &scope,
            jti,
            NOW,
            WS_TICKET_TTL_SECS,
        );
        let verified =
            verify(&signed(&claims), SECRET, AUDIENCE_WS_TICKET, NOW).expect("valid ticket");
        assert_eq!(verified.scope.as_deref(), Some("conversation:9"));
        assert_eq!(verified.jti, Some(jti));
        assert_eq!(verified.sid, Some(sid()));
        assert_eq!(verified.exp, NOW + WS_TICKET_TTL_SECS);
    }

    #[test]
    fn every_minted_token_is_valid_from_its_issue_time() {
        let a = access(NOW, 900);
        assert_eq!(a.nbf, Some(a.iat));
        let t = Claims::ticket(7, "A", Role::Member, None, USER_SCOPE, Uuid::nil(), NOW, 60);
        assert_eq!(t.nbf, Some(NOW));
        let n = Claims::new(7, "A", Role::Member, AUDIENCE_API, NOW, 60);
        assert_eq!(n.nbf, Some(NOW));
    }

    #[test]
    fn a_token_without_the_optional_claims_still_verifies_and_they_read_as_none() {
        let mut p = payload();
        for claim in ["nbf", "sid", "jti", "scope"] {
            p.as_object_mut().expect("object").remove(claim);
        }
        let claims = check(&forge(&hs256(), &p)).expect("valid");
        assert_eq!(
            (claims.nbf, claims.sid, claims.jti, claims.scope),
            (None, None, None, None)
        );
        // And None is not written out as null.
        let text = serde_json::to_string(&Claims::new(7, "A", Role::Member, AUDIENCE_API, NOW, 60))
            .expect("json");
        assert!(!text.contains("sid") && !text.contains("jti") && !text.contains("scope"));
    }

    #[test]
    fn the_none_algorithm_is_refused() {
        let p = payload();
        let forged = format!(
            "{}.{}.",
            base64url(br#"{"alg":"none","typ":"JWT"}"#),
            base64url(p.to_string().as_bytes())
        );
        assert_eq!(check(&forged), Err(AuthError::Invalid));
    }

    #[test]
    fn a_token_signed_with_hs512_is_refused_even_with_the_right_secret() {
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &access(NOW, 900),
            &EncodingKey::from_secret(SECRET),
        )
        .expect("sign");
        assert_eq!(check(&t), Err(AuthError::Invalid));
    }

    #[test]
    fn an_rs256_header_over_an_hmac_signature_is_refused() {
        // Algorithm confusion: the header claims RS256, the signature is an
        // HMAC made with the key a verifier might pass as "public key".
        let t = forge(&json!({"alg": "RS256", "typ": "JWT"}), &payload());
        assert_eq!(check(&t), Err(AuthError::Invalid));
        // The same forge with the honest header passes: the header is what
        // is refused.
        assert!(check(&forge(&hs256(), &payload())).is_ok());
    }

    #[test]
    fn a_token_signed_with_another_secret_or_tampered_with_is_refused() {
        let t = issue(&access(NOW, 900), b"another-secret-another-secret-xx").expect("sign");
        assert_eq!(check(&t), Err(AuthError::Invalid));

        // Promote the payload to admin, keep the original signature.
        let honest = signed(&access(NOW, 900));
        let parts: Vec<&str> = honest.split('.').collect();
        let mut p = payload();
        p["role"] = json!("admin");
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            base64url(p.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(check(&tampered), Err(AuthError::Invalid));
    }

    #[test]
    fn an_expired_token_is_refused_after_the_leeway_and_accepted_within_it() {
        // exp = NOW - 40: later than the 30 s leeway forgives.
        assert_eq!(
            check(&signed(&access(NOW - 100, 60))),
            Err(AuthError::Expired)
        );
        // exp = NOW - 20: inside the leeway.
        assert!(check(&signed(&access(NOW - 80, 60))).is_ok());
    }

    #[test]
    fn a_token_not_yet_valid_is_refused_after_the_leeway_and_accepted_within_it() {
        let mut early = access(NOW, 900);
        early.nbf = Some(NOW + LEEWAY_SECS + 10);
        assert_eq!(check(&signed(&early)), Err(AuthError::NotYetValid));
        assert_eq!(AuthError::NotYetValid.code(), "token_not_yet_valid");
        let mut skewed = access(NOW, 900);
        skewed.nbf = Some(NOW + LEEWAY_SECS - 10);
        assert!(check(&signed(&skewed)).is_ok());
    }

    #[test]
    fn a_token_issued_in_the_future_is_refused_after_the_leeway() {
        let mut future = access(NOW + LEEWAY_SECS + 10, 900);
        future.nbf = None;
        assert_eq!(check(&signed(&future)), Err(AuthError::Invalid));
        let mut skewed = access(NOW + LEEWAY_SECS - 10, 900);
        skewed.nbf = None;
        assert!(check(&signed(&skewed)).is_ok());
    }

    #[test]
    fn a_wrong_issuer_is_refused() {
        let mut claims = access(NOW, 900);
        claims.iss = "someone-else".into();
        assert_eq!(check(&signed(&claims)), Err(AuthError::Invalid));
    }

    #[test]
    fn a_ticket_is_not_an_access_token_and_vice_versa() {
        let ticket = Claims::ticket(
            7,
            "Alex",
            Role::Member,
            Some(sid()),
            USER_SCOPE,
            Uuid::nil(),
            NOW,
            WS_TICKET_TTL_SECS,
        );
        assert_eq!(check(&signed(&ticket)), Err(AuthError::Invalid));
        let session = signed(&access(NOW, 900));
        assert_eq!(
            verify(&session, SECRET, AUDIENCE_WS_TICKET, NOW),
            Err(AuthError::Invalid)
        );
        let mut foreign = access(NOW, 900);
        foreign.aud = "another-service".into();
        assert_eq!(check(&signed(&foreign)), Err(AuthError::Invalid));
    }

    #[test]
    fn a_missing_or_non_numeric_subject_is_refused() {
        let mut p = payload();
        p.as_object_mut().expect("object").remove("sub");
        assert_eq!(check(&forge(&hs256(), &p)), Err(AuthError::Invalid));
        let mut claims = access(NOW, 900);
        claims.sub = "alex".into();
        assert_eq!(check(&signed(&claims)), Err(AuthError::Invalid));
    }

    #[test]
    fn a_token_without_exp_iss_aud_or_iat_is_refused() {
        for claim in ["exp", "iss", "aud", "iat"] {
            let mut p = payload();
            p.as_object_mut().expect("object").remove(claim);
            assert_eq!(
                check(&forge(&hs256(), &p)),
                Err(AuthError::Invalid),
                "without {claim}"
            );
        }
    }

    #[test]
    fn an_empty_token_is_missing_and_garbage_is_invalid() {
        assert_eq!(check(""), Err(AuthError::Missing));
        for garbage in ["not.a.jwt", "garbage", "a.b", "..", "Bearer x.y.z"] {
            assert_eq!(check(garbage), Err(AuthError::Invalid), "{garbage}");
        }
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
