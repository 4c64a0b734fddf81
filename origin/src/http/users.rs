//! Contacts, presence and the user directory.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::Role;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiPath, ApiQuery};
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::metrics::Timed;
use crate::replica::Target;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(active_users))
        .routes(routes!(presence))
        .routes(routes!(directory))
        .routes(routes!(user_card))
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

impl ActiveUser {
    /// A row of `id, full_name, role, is_online, last_seen`, the columns
    /// every listing of users here selects.
    fn from_row(r: &tokio_postgres::Row) -> ApiResult<Self> {
        Ok(Self {
            id: r.get(0),
            full_name: r.get(1),
            role: Role::parse(r.get(2)).map_err(|e| ApiError::Internal(e.into()))?,
            is_online: r.get(3),
            last_seen: r.get(4),
        })
    }
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
/// The caller's contacts (everyone they share a conversation with), online
/// first, then the most recently seen. Presence is for contacts: anyone
/// else is found through the directory (`GET /api/v1/users`). The cost is
/// the caller's conversations and their members, not the deployment.
#[utoipa::path(
    get,
    path = "/api/v1/chat/active-users",
    tag = "users",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's contacts, online first", body = ActiveUsers),
        (status = 401, description = "No or bad token", body = ErrorBody),
    )
)]
async fn active_users(
    user: AuthUser,
    State(state): State<AppState>,
) -> ApiResult<Json<ActiveUsers>> {
    let client = state.reads.get_for(user.id).await?;
    let users = match read_contacts(&client, user.id).await {
        Err(e) if state.reads.retry_on_primary(&client, &e) => {
            read_contacts(&*state.reads.primary().await?, user.id).await
        }
        read => read,
    };
    Ok(Json(users?))
}

/// `user_id`'s contacts on `client`, the replica's or the primary's.
async fn read_contacts(client: &deadpool_postgres::Client, user_id: i64) -> ApiResult<ActiveUsers> {
    let stmt = client
        .prepare_cached(
            "SELECT u.id, u.full_name, u.role, COALESCE(p.is_online, false), p.last_seen
             FROM users u LEFT JOIN user_presence p ON p.user_id = u.id
             WHERE u.id IN (
                 SELECT other.user_id
                 FROM conversation_participants mine
                 JOIN conversation_participants other
                   ON other.conversation_id = mine.conversation_id
                 WHERE mine.user_id = $1 AND other.user_id <> $1)
             ORDER BY COALESCE(p.is_online, false) DESC, p.last_seen DESC NULLS LAST, u.full_name
             LIMIT $2",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&user_id, &ACTIVE_USERS_LIMIT])
        .timed("active_users")
        .await?;
    let users = rows
        .iter()
        .map(ActiveUser::from_row)
        .collect::<ApiResult<_>>()?;
    Ok(ActiveUsers { users })
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
        .timed("presence")
        .await?
        .ok_or(ApiError::NotFound("user"))?;
    Ok(Json(Presence {
        user_id: row.get(0),
        is_online: row.get(1),
        last_seen: row.get(2),
    }))
}

/// GET /api/v1/users/{id}
///
/// One user as the directory lists them, with presence: how a client
/// learns about one new person (a new member, the sender of a first
/// message) without fetching a whole list. Open to every signed-in user,
/// like the directory.
#[utoipa::path(
    get,
    path = "/api/v1/users/{id}",
    tag = "users",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "User id")),
    responses(
        (status = 200, description = "The user", body = ActiveUser),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 404, description = "No such user (`not_found`)", body = ErrorBody),
    )
)]
async fn user_card(
    user: AuthUser,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<ActiveUser>> {
    let client = state.reads.get_for(user.id).await?;
    let card = match read_card(&client, id).await {
        // A 404 from the replica may be a user created a moment ago.
        Err(e) if state.reads.retry_on_primary(&client, &e) => {
            read_card(&*state.reads.primary().await?, id).await
        }
        read => read,
    };
    Ok(Json(card?))
}

/// User `id`'s card on `client`, the replica's or the primary's.
async fn read_card(client: &deadpool_postgres::Client, id: i64) -> ApiResult<ActiveUser> {
    let stmt = client
        .prepare_cached(
            "SELECT u.id, u.full_name, u.role, COALESCE(p.is_online, false), p.last_seen
             FROM users u LEFT JOIN user_presence p ON p.user_id = u.id
             WHERE u.id = $1",
        )
        .await?;
    let row = client
        .query_opt(&stmt, &[&id])
        .timed("user_card")
        .await?
        .ok_or(ApiError::NotFound("user"))?;
    ActiveUser::from_row(&row)
}

/// Largest directory page.
const DIRECTORY_MAX_PAGE: i64 = 50;
const DIRECTORY_DEFAULT_PAGE: i64 = 20;
/// Longest search prefix, in characters.
const DIRECTORY_MAX_QUERY: usize = 100;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DirectoryQuery {
    /// A prefix of the name or of the email, case-insensitive; empty or
    /// absent lists everyone.
    #[param(max_length = 100)]
    pub query: Option<String>,
    /// `next_cursor` from the previous page.
    #[param(minimum = 1)]
    pub cursor: Option<i64>,
    /// Page size, 1 to 50 (default 20).
    #[param(minimum = 1, maximum = 50)]
    pub limit: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DirectoryPage {
    /// By name, then id.
    pub users: Vec<ActiveUser>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<i64>,
}

/// The smallest string after every string that starts with `prefix`, in
/// the "C" collation (byte order, which for UTF-8 is code point order):
/// the prefix with its last character replaced by the next one. `None`
/// when there is no such bound (empty, or nothing but U+10FFFF).
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (u32::from(last) + 1..=0x10_FFFF).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// GET /api/v1/users
///
/// How a member finds a trainer they have not talked to yet: everyone
/// whose name or email starts with `query`, by name (byte order of the
/// lower-cased name, the order the index keeps), paged by a keyset
/// cursor (each page is one index range, whatever the directory's size),
/// with presence. Emails are matched, never returned.
#[utoipa::path(
    get,
    path = "/api/v1/users",
    tag = "users",
    security(("bearer" = [])),
    params(DirectoryQuery),
    responses(
        (status = 200, description = "A page of users, by name", body = DirectoryPage),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 422, description = "Bad query, cursor or limit", body = ErrorBody),
    )
)]
async fn directory(
    user: AuthUser,
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<DirectoryQuery>,
) -> ApiResult<Json<DirectoryPage>> {
    let limit = q.limit.unwrap_or(DIRECTORY_DEFAULT_PAGE);
    if !(1..=DIRECTORY_MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit must be between 1 and {DIRECTORY_MAX_PAGE}"
        )));
    }
    let raw = q.query.unwrap_or_default();
    if raw.chars().count() > DIRECTORY_MAX_QUERY {
        return Err(ApiError::invalid(format!(
            "query must be at most {DIRECTORY_MAX_QUERY} characters"
        )));
    }
    if raw.contains('\0') {
        // PostgreSQL text cannot hold it, and no name or email does.
        return Err(ApiError::invalid("query must not contain NUL"));
    }
    let query = raw.trim().to_lowercase();
    let client = state.reads.get_for(user.id).await?;
    let page = match read_directory(&client, user.id, &query, q.cursor, limit).await {
        // The one 422 left after the checks above is a cursor naming no
        // user, which on the replica may be a user created a moment ago.
        Err(e)
            if state.reads.retry_on_primary(&client, &e)
                || (client.target() == Target::Replica
                    && matches!(e, ApiError::Unprocessable { .. })) =>
        {
            let primary = state.reads.primary().await?;
            read_directory(&primary, user.id, &query, q.cursor, limit).await
        }
        read => read,
    };
    Ok(Json(page?))
}

/// A directory page on `client`, the replica's or the primary's.
async fn read_directory(
    client: &deadpool_postgres::Client,
    viewer: i64,
    query: &str,
    cursor: Option<i64>,
    limit: i64,
) -> ApiResult<DirectoryPage> {
    // The cursor is the last user of the previous page; the page goes on
    // after its (name, id).
    let after: Option<(String, i64)> = match cursor {
        None => None,
        Some(id) => {
            let row = client
                .query_opt("SELECT lower(full_name) FROM users WHERE id = $1", &[&id])
                .timed("directory_cursor")
                .await?
                .ok_or_else(|| ApiError::invalid("cursor is not a page's next_cursor"))?;
            Some((row.get(0), id))
        }
    };
    let (after_name, after_id) = after.unwrap_or_default();
    let fetch = limit + 1;
    // A prefix is a range of each index, [query, prefix_end(query)), not a
    // pattern that a generic plan could not turn into one; each branch
    // reads only its matches (checked with generic plans on 50,000
    // users). Without a query the page is one range of the name index
    // from the cursor on. Presence is a lookup per listed user.
    let rows = match prefix_end(query) {
        None => {
            let stmt = client
                .prepare_cached(
                    r#"SELECT u.id, u.full_name, u.role, COALESCE(p.is_online, false), p.last_seen
                       FROM users u
                       LEFT JOIN LATERAL (SELECT is_online, last_seen FROM user_presence
                                          WHERE user_id = u.id) p ON true
                       WHERE (lower(u.full_name) COLLATE "C", u.id) > ($1 COLLATE "C", $2)
                         AND u.id <> $3
                       ORDER BY lower(u.full_name) COLLATE "C", u.id
                       LIMIT $4"#,
                )
                .await?;
            client
                .query(&stmt, &[&after_name, &after_id, &viewer, &fetch])
                .timed("directory_page")
                .await?
        }
        Some(end) => {
            let stmt = client
                .prepare_cached(
                    r#"WITH hits AS (
                           SELECT id, full_name, role FROM users
                            WHERE lower(full_name) COLLATE "C" >= $1 COLLATE "C"
                              AND lower(full_name) COLLATE "C" < $2 COLLATE "C"
                              AND (lower(full_name) COLLATE "C", id) > ($3 COLLATE "C", $4)
                              AND id <> $5
                           UNION
                           SELECT id, full_name, role FROM users
                            WHERE email COLLATE "C" >= $1 COLLATE "C"
                              AND email COLLATE "C" < $2 COLLATE "C"
                              AND (lower(full_name) COLLATE "C", id) > ($3 COLLATE "C", $4)
                              AND id <> $5
                       )
                       SELECT h.id, h.full_name, h.role, COALESCE(p.is_online, false), p.last_seen
                       FROM hits h
                       LEFT JOIN LATERAL (SELECT is_online, last_seen FROM user_presence
                                          WHERE user_id = h.id) p ON true
                       ORDER BY lower(h.full_name) COLLATE "C", h.id
                       LIMIT $6"#,
                )
                .await?;
            client
                .query(
                    &stmt,
                    &[&query, &end, &after_name, &after_id, &viewer, &fetch],
                )
                .timed("directory_search")
                .await?
        }
    };
    let more = rows.len() as i64 > limit;
    let users: Vec<ActiveUser> = rows
        .iter()
        .take(usize::try_from(limit).unwrap_or(0))
        .map(ActiveUser::from_row)
        .collect::<ApiResult<_>>()?;
    let next_cursor = if more {
        users.last().map(|u| u.id)
    } else {
        None
    };
    Ok(DirectoryPage { users, next_cursor })
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_at_the_next_character() {
        assert_eq!(prefix_end("ma").as_deref(), Some("mb"));
        assert_eq!(prefix_end("ma_").as_deref(), Some("ma`"));
        assert_eq!(prefix_end("zé").as_deref(), Some("zê"));
        // Surrogates are not characters: the next one after U+D7FF.
        assert_eq!(prefix_end("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end(""), None);
    }
}
