//! Sessions.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::Role;
use shared::auth::{AUDIENCE_API, Claims};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiJson;
use crate::auth::{now_unix, verify_password};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(login))
}

/// Longest password we hash: Argon2 accepts anything, and an attacker would
/// happily make us hash megabytes.
const MAX_PASSWORD_BYTES: usize = 1024;

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LoginResponse {
    /// Session token (HS256 JWT). Send as `Authorization: Bearer <token>`.
    pub token: String,
    pub token_type: String,
    pub expires_at: DateTime<Utc>,
    pub user: UserView,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub id: i64,
    pub email: String,
    pub full_name: String,
    pub role: Role,
}

/// POST /api/v1/auth/login
#[utoipa::path(
    post,
    path = "/api/v1/auth/login",
    tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in", body = LoginResponse),
        (status = 401, description = "Bad credentials (same answer for unknown users)", body = ErrorBody),
        (status = 429, description = "Too many failed logins for this email; see Retry-After", body = ErrorBody),
        (status = 422, description = "Invalid field", body = ErrorBody),
    )
)]
async fn login(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<Json<LoginResponse>> {
    let email = req.email.trim().to_lowercase();
    if email.is_empty() || req.password.is_empty() {
        return Err(ApiError::invalid("email and password are required"));
    }
    if req.password.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::invalid("password is too long"));
    }
    if let Some(retry_after_secs) = state.login_guard.locked(&email) {
        return Err(ApiError::TooManyAttempts { retry_after_secs });
    }
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT id, email, full_name, role, password_hash FROM users WHERE email = $1",
            &[&email],
        )
        .await?;
    // Verify against a dummy hash when the user is unknown, so both cases
    // cost one Argon2 verification and answer the same.
    let hash = row
        .as_ref()
        .map_or_else(|| state.keys.dummy_hash.clone(), |r| r.get(4));
    let password = req.password;
    let matches = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let row = match row {
        Some(row) if matches => row,
        _ => {
            // Counted for unknown emails too, so the lockout does not
            // reveal which accounts exist.
            state.login_guard.failed(&email);
            return Err(ApiError::BadCredentials);
        }
    };
    state.login_guard.succeeded(&email);
    let user = UserView {
        id: row.get(0),
        email: row.get(1),
        full_name: row.get(2),
        role: Role::parse(row.get(3)).map_err(|e| ApiError::Internal(e.into()))?,
    };
    let now = now_unix();
    let ttl = i64::try_from(state.jwt_ttl.as_secs()).unwrap_or(i64::MAX);
    let claims = Claims::new(user.id, &user.full_name, user.role, AUDIENCE_API, now, ttl);
    let token = shared::auth::issue(&claims, &state.keys.jwt_secret)?;
    let expires_at = DateTime::from_timestamp(claims.exp, 0).unwrap_or_else(Utc::now);
    Ok(Json(LoginResponse {
        token,
        token_type: "Bearer".to_owned(),
        expires_at,
        user,
    }))
}
