//! Active users and presence, as the Lobby reports them.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::Role;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiPath;
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(active_users))
        .routes(routes!(presence))
}

/// Users listed by `active-users`.
const ACTIVE_USERS_LIMIT: i64 = 200;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ActiveUser {
    pub id: i64,
    pub full_name: String,
    pub role: Role,
    pub is_online: bool,
    pub last_seen: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ActiveUsers {
    pub users: Vec<ActiveUser>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Presence {
    pub user_id: i64,
    pub is_online: bool,
    /// When the user was last connected; `null` if never.
    pub last_seen: Option<DateTime<Utc>>,
}

/// GET /api/v1/chat/active-users
///
/// Everyone the caller can start a chat with: online users first, then the
/// most recently seen.
#[utoipa::path(
    get,
    path = "/api/v1/chat/active-users",
    tag = "users",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Users, online first", body = ActiveUsers),
        (status = 401, description = "No or bad token", body = ErrorBody),
    )
)]
async fn active_users(
    user: AuthUser,
    State(state): State<AppState>,
) -> ApiResult<Json<ActiveUsers>> {
    let client = state.pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT u.id, u.full_name, u.role, COALESCE(p.is_online, false), p.last_seen
             FROM users u LEFT JOIN user_presence p ON p.user_id = u.id
             WHERE u.id <> $1
             ORDER BY COALESCE(p.is_online, false) DESC, p.last_seen DESC NULLS LAST, u.full_name
             LIMIT $2",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&user.id, &ACTIVE_USERS_LIMIT])
        .await?;
    let users = rows
        .iter()
        .map(|r| {
            Ok(ActiveUser {
                id: r.get(0),
                full_name: r.get(1),
                role: Role::parse(r.get(2)).map_err(|e| ApiError::Internal(e.into()))?,
                is_online: r.get(3),
                last_seen: r.get(4),
            })
        })
        .collect::<ApiResult<_>>()?;
    Ok(Json(ActiveUsers { users }))
}

/// GET /api/v1/chat/presence/{user_id}
#[utoipa::path(
    get,
    path = "/api/v1/chat/presence/{user_id}",
    tag = "users",
    security(("bearer" = [])),
    params(("user_id" = i64, Path, description = "User id")),
    responses(
        (status = 200, description = "The user's presence", body = Presence),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
    )
)]
async fn presence(
    _user: AuthUser,
    State(state): State<AppState>,
    ApiPath(user_id): ApiPath<i64>,
) -> ApiResult<Json<Presence>> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT u.id, COALESCE(p.is_online, false), p.last_seen
             FROM users u LEFT JOIN user_presence p ON p.user_id = u.id WHERE u.id = $1",
            &[&user_id],
        )
        .await?
        .ok_or(ApiError::NotFound("user"))?;
    Ok(Json(Presence {
        user_id: row.get(0),
        is_online: row.get(1),
        last_seen: row.get(2),
    }))
}
