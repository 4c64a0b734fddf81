//! Sessions: log in, refresh, log out, change the password.
//!
//! Login opens a session and answers a short-lived access token (JWT, `sid`
//! = the session) plus an opaque refresh token; refresh exchanges a refresh
//! token for a new pair (see [`crate::sessions`] for rotation and reuse).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::Role;
use shared::auth::{AuthError, Claims};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::ApiJson;
use crate::auth::{AuthUser, ClientAddr, now_unix};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::metrics::Timed;
use crate::sessions::{self, NewRefreshToken, Revocation};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(logout_all))
        .routes(routes!(change_password))
}

/// Longest password we check, in characters (so at most 4 KiB): Argon2
/// accepts anything, and an attacker would happily make us hash megabytes.
/// Characters rather than bytes, so the OpenAPI `maxLength` states the rule
/// exactly.
pub const MAX_PASSWORD_CHARS: usize = 1024;
/// Longest login email, in characters (RFC 5321 bounds a path at 256
/// octets with its angle brackets; characters keep the schema exact).
pub const MAX_EMAIL_CHARS: usize = 254;
/// Shortest new password, in characters.
pub const MIN_NEW_PASSWORD_CHARS: usize = 10;
/// Longest new password, in characters.
pub const MAX_NEW_PASSWORD_CHARS: usize = 256;

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    /// Case-insensitive; surrounding white space is ignored. 1–254
    /// characters, no control characters.
    #[schema(
        min_length = 1,
        max_length = 254,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub email: String,
    /// 1–1,024 characters.
    #[schema(min_length = 1, max_length = 1024)]
    pub password: String,
}

/// What login and refresh answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LoginResponse {
    /// Access token (HS256 JWT, 15 minutes by default). Send as
    /// `Authorization: Bearer <token>`.
    pub token: String,
    pub token_type: String,
    /// When `token` expires; refresh before.
    pub expires_at: DateTime<Utc>,
    pub user: UserView,
    /// Opaque, single-use: exchange it at `POST /api/v1/auth/refresh` for a
    /// new pair. Using it twice revokes the session.
    pub refresh_token: String,
    pub refresh_expires_at: DateTime<Utc>,
    /// The session (also the access token's `sid`).
    pub session_id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub id: i64,
    pub email: String,
    pub full_name: String,
    pub role: Role,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RefreshRequest {
    /// The `refresh_token` of the last login or refresh (43 characters of
    /// base64url). Anything else is `401 invalid_refresh_token`.
    #[schema(min_length = 43, max_length = 43, pattern = "^[A-Za-z0-9_-]{43}$")]
    pub refresh_token: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PasswordChange {
    /// At most 1,024 characters; a wrong one is `401 bad_credentials`.
    #[schema(max_length = 1024)]
    pub current_password: String,
    /// 10 to 256 characters, not the current one.
    #[schema(min_length = 10, max_length = 256)]
    pub new_password: String,
}

/// The response for `user` in session `session_id`.
fn tokens(
    state: &AppState,
    user: UserView,
    session_id: Uuid,
    refresh: NewRefreshToken,
) -> ApiResult<LoginResponse> {
    let now = now_unix();
    let ttl = i64::try_from(state.access_ttl.as_secs()).unwrap_or(i64::MAX);
    let claims = Claims::access(user.id, &user.full_name, user.role, session_id, now, ttl);
    let token = shared::auth::issue(&claims, &state.keys.jwt_secret)?;
    let expires_at = DateTime::from_timestamp(claims.exp, 0).unwrap_or_else(Utc::now);
    Ok(LoginResponse {
        token,
        token_type: "Bearer".to_owned(),
        expires_at,
        user,
        refresh_token: refresh.token,
        refresh_expires_at: refresh.expires_at,
        session_id,
    })
}

fn user_view(row: &tokio_postgres::Row) -> ApiResult<UserView> {
    Ok(UserView {
        id: row.get("id"),
        email: row.get("email"),
        full_name: row.get("full_name"),
        role: Role::parse(row.get("role")).map_err(|e| ApiError::Internal(e.into()))?,
    })
}

/// The login guard before a password check: 429 while `email` is locked
/// for `addr`, else the email's delay (zero unless it is being guessed).
async fn guard(state: &AppState, email: &str, addr: std::net::IpAddr) -> ApiResult<()> {
    if let Some(retry_after_secs) = state.login_guard.locked(email, addr) {
        return Err(ApiError::TooManyAttempts { retry_after_secs });
    }
    let delay = state.login_guard.delay(email);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    Ok(())
}

/// The login email, trimmed and lower-cased (as stored), or a 422 for one
/// that could never be stored: blank, over 254 characters, or with a
/// control character anywhere (PostgreSQL `text` refuses NUL, which used to
/// surface as a 500).
fn login_email(raw: &str) -> ApiResult<String> {
    if raw.chars().nth(MAX_EMAIL_CHARS).is_some() {
        return Err(ApiError::Unprocessable {
            code: "too_long",
            message: format!("email is longer than {MAX_EMAIL_CHARS} characters"),
        });
    }
    if raw.chars().any(char::is_control) {
        return Err(ApiError::Unprocessable {
            code: "invalid_field",
            message: "email must not contain control characters".to_owned(),
        });
    }
    let email = raw.trim().to_lowercase();
    if email.is_empty() {
        return Err(ApiError::invalid("email and password are required"));
    }
    Ok(email)
}

/// 422 for a password over [`MAX_PASSWORD_CHARS`], before anything hashes
/// it.
fn check_password_size(password: &str, field: &str) -> ApiResult<()> {
    if password.chars().nth(MAX_PASSWORD_CHARS).is_some() {
        return Err(ApiError::Unprocessable {
            code: "password_too_long",
            message: format!("{field} is longer than {MAX_PASSWORD_CHARS} characters"),
        });
    }
    Ok(())
}

/// POST /api/v1/auth/login
#[utoipa::path(
    post,
    path = "/api/v1/auth/login",
    tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in: a new session", body = LoginResponse),
        (status = 401, description = "Bad credentials (same answer for unknown users)", body = ErrorBody),
        (status = 422, description = "An invalid field: `too_long` (email over 254 characters), `invalid_field` (a control character, a missing field), `password_too_long` (over 1,024 characters), `validation_failed` (blank)", body = ErrorBody),
        (status = 429, description = "Too many failed logins for this email from this address (`too_many_attempts`); see Retry-After", body = ErrorBody),
        (status = 503, description = "Too many password checks in flight (`busy`), or the database is unreachable (`unavailable`); see Retry-After", body = ErrorBody),
    )
)]
async fn login(
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<Json<LoginResponse>> {
    let email = login_email(&req.email)?;
    if req.password.is_empty() {
        return Err(ApiError::invalid("email and password are required"));
    }
    check_password_size(&req.password, "password")?;
    guard(&state, &email, addr).await?;
    let row = state
        .pool
        .get()
        .await?
        .query_opt(
            "SELECT id, email, full_name, role, password_hash FROM users WHERE email = $1",
            &[&email],
        )
        .timed("login_user")
        .await?;
    // Verify against a dummy hash when the user is unknown, so both cases
    // cost one Argon2 verification and answer the same. No connection is
    // held while hashing: a queue of logins must not starve the pool.
    let hash = row
        .as_ref()
        .map_or_else(|| state.keys.dummy_hash.clone(), |r| r.get(4));
    let matches = state.hasher.verify(req.password, hash).await?;
    let row = match row {
        Some(row) if matches => row,
        _ => {
            // Counted for unknown emails too, so the lockout does not
            // reveal which accounts exist.
            state.login_guard.failed(&email, addr);
            return Err(ApiError::BadCredentials);
        }
    };
    state.login_guard.succeeded(&email, addr);
    let user = user_view(&row)?;
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok());
    let mut client = state.pool.get().await?;
    let (session_id, refresh) =
        sessions::create(&mut client, user.id, user_agent, state.refresh_ttl).await?;
    Ok(Json(tokens(&state, user, session_id, refresh)?))
}

/// POST /api/v1/auth/refresh
///
/// Exchanges a refresh token for a new access token and a new refresh
/// token. The presented token stops working. Presenting a token that was
/// already exchanged revokes the whole session (`refresh_token_reused`):
/// two concurrent refreshes with one token leave exactly one winner, and
/// the loser counts as a reuse, so clients keep one refresh in flight.
#[utoipa::path(
    post,
    path = "/api/v1/auth/refresh",
    tag = "auth",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "A new access token and refresh token for the same session", body = LoginResponse),
        (status = 401, description = "`invalid_refresh_token`, `refresh_token_expired`, `refresh_token_reused` (the session is now revoked) or `session_revoked`", body = ErrorBody),
        (status = 422, description = "Invalid field", body = ErrorBody),
    )
)]
async fn refresh(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> ApiResult<Json<LoginResponse>> {
    let mut client = state.pool.get().await?;
    let rotated = sessions::rotate(&mut client, &req.refresh_token, state.refresh_ttl).await?;
    let row = client
        .query_one(
            "SELECT id, email, full_name, role FROM users WHERE id = $1",
            &[&rotated.user_id],
        )
        .timed("refresh_user")
        .await?;
    let user = user_view(&row)?;
    Ok(Json(tokens(
        &state,
        user,
        rotated.session_id,
        rotated.refresh,
    )?))
}

/// POST /api/v1/auth/logout
///
/// Revokes the caller's session (the access token's `sid`): its refresh
/// token stops working, and REST refuses its access tokens at once.
#[utoipa::path(
    post,
    path = "/api/v1/auth/logout",
    tag = "auth",
    security(("bearer" = [])),
    responses(
        (status = 204, description = "The session is revoked"),
        (status = 401, description = "No or bad token, or the session is already revoked", body = ErrorBody),
    )
)]
async fn logout(user: AuthUser, State(state): State<AppState>) -> ApiResult<StatusCode> {
    // A token without a session (minted by a tool) has nothing to revoke.
    if let Some(sid) = user.sid {
        let client = state.pool.get().await?;
        sessions::revoke(&client, sid, Revocation::Logout).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// POST /api/v1/auth/logout-all
///
/// Revokes every session of the caller, on every device.
#[utoipa::path(
    post,
    path = "/api/v1/auth/logout-all",
    tag = "auth",
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Every session of the user is revoked"),
        (status = 401, description = "No or bad token", body = ErrorBody),
    )
)]
async fn logout_all(user: AuthUser, State(state): State<AppState>) -> ApiResult<StatusCode> {
    let client = state.pool.get().await?;
    sessions::revoke_all(&client, user.id, None, Revocation::LogoutAll).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The new-password policy: 10–256 characters, not the current password.
fn check_new_password(current: &str, new: &str) -> ApiResult<()> {
    // Characters, not bytes: 256 of them are at most 1,024 bytes.
    let chars = new.chars().count();
    if chars > MAX_NEW_PASSWORD_CHARS {
        return Err(ApiError::Unprocessable {
            code: "password_too_long",
            message: format!(
                "the new password may have at most {MAX_NEW_PASSWORD_CHARS} characters"
            ),
        });
    }
    if chars < MIN_NEW_PASSWORD_CHARS {
        return Err(ApiError::Unprocessable {
            code: "password_too_short",
            message: format!("the new password needs at least {MIN_NEW_PASSWORD_CHARS} characters"),
        });
    }
    if new == current {
        return Err(ApiError::Unprocessable {
            code: "password_unchanged",
            message: "the new password must differ from the current one".to_owned(),
        });
    }
    Ok(())
}

/// POST /api/v1/auth/password
///
/// Changes the caller's password and revokes every other session of the
/// user; the caller's own session stays. A wrong current password counts
/// as a failed login for the account.
#[utoipa::path(
    post,
    path = "/api/v1/auth/password",
    tag = "auth",
    security(("bearer" = [])),
    request_body = PasswordChange,
    responses(
        (status = 204, description = "Changed; every other session is revoked"),
        (status = 401, description = "No or bad token (`invalid_token`…), or a wrong current password (`bad_credentials`)", body = ErrorBody),
        (status = 422, description = "`password_too_short`, `password_too_long`, `password_unchanged`, or an invalid field", body = ErrorBody),
        (status = 429, description = "Too many failed attempts for this account from this address (`too_many_attempts`); see Retry-After", body = ErrorBody),
        (status = 503, description = "Too many password checks in flight (`busy`), or the database is unreachable (`unavailable`); see Retry-After", body = ErrorBody),
    )
)]
async fn change_password(
    user: AuthUser,
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    ApiJson(req): ApiJson<PasswordChange>,
) -> ApiResult<StatusCode> {
    check_password_size(&req.current_password, "current_password")?;
    check_new_password(&req.current_password, &req.new_password)?;
    let row = state
        .pool
        .get()
        .await?
        .query_opt(
            "SELECT email, password_hash FROM users WHERE id = $1",
            &[&user.id],
        )
        .timed("password_user")
        .await?
        .ok_or(ApiError::Unauthorized(AuthError::Invalid))?;
    let (email, hash): (String, String) = (row.get(0), row.get(1));
    guard(&state, &email, addr).await?;
    if !state.hasher.verify(req.current_password, hash).await? {
        state.login_guard.failed(&email, addr);
        return Err(ApiError::BadCredentials);
    }
    state.login_guard.succeeded(&email, addr);
    let new_hash = state.hasher.hash(req.new_password).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "UPDATE users SET password_hash = $2 WHERE id = $1",
        &[&user.id, &new_hash],
    )
    .timed("password_update")
    .await?;
    let revoked = sessions::revoke_all(&tx, user.id, user.sid, Revocation::PasswordChanged).await?;
    tx.commit().await?;
    tracing::info!(user_id = user.id, revoked, "password changed");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_emails_are_normalised_and_bounded_before_anything_else_sees_them() {
        assert_eq!(
            login_email("  Alex@Vibe.FIT ").ok().as_deref(),
            Some("alex@vibe.fit")
        );
        let code = |raw: &str| login_email(raw).err().map(|e| e.code());
        assert_eq!(code("   "), Some("validation_failed"));
        assert_eq!(code("a\0@x.fit"), Some("invalid_field"));
        assert_eq!(code("a\u{7}@x.fit"), Some("invalid_field"));
        assert_eq!(code("\ta@x.fit"), Some("invalid_field"));
        // Characters, not bytes: 254 two-byte characters pass.
        let at_limit = format!("{}@x.fit", "é".repeat(MAX_EMAIL_CHARS - 6));
        assert_eq!(code(&at_limit), None);
        assert_eq!(code(&format!("a{at_limit}")), Some("too_long"));
        assert_eq!(code(&"a".repeat(60_000)), Some("too_long"));
    }

    #[test]
    fn the_new_password_policy_counts_characters_not_bytes() {
        let code =
            |current: &str, new: &str| check_new_password(current, new).err().map(|e| e.code());
        assert_eq!(code("old-password", "short"), Some("password_too_short"));
        // Ten characters of two bytes each: long enough.
        assert_eq!(code("old-password", &"é".repeat(10)), None);
        assert_eq!(
            code("old-password", &"é".repeat(9)),
            Some("password_too_short")
        );
        assert_eq!(code("old-password", &"a".repeat(256)), None);
        assert_eq!(
            code("old-password", &"a".repeat(257)),
            Some("password_too_long")
        );
        // 256 four-byte characters: still 256 characters.
        assert_eq!(code("old-password", &"😀".repeat(256)), None);
        assert_eq!(
            code("old-password", &"😀".repeat(257)),
            Some("password_too_long")
        );
        assert_eq!(
            code("old-password-1", "old-password-1"),
            Some("password_unchanged")
        );
    }
}
