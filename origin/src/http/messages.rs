//! Message history: keyset pages by seq.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use shared::protocol::MessageView;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiPath, ApiQuery};
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::metrics::Timed;
use crate::state::AppState;
use crate::store::{self, MESSAGE_COLUMNS};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_messages))
}

/// Largest page.
pub const MAX_PAGE: i64 = 200;
const DEFAULT_PAGE: i64 = 50;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Only messages with a smaller seq (page backwards).
    #[param(minimum = 1)]
    pub before_seq: Option<i64>,
    /// Only messages with a greater seq (page forwards, or catch up after a
    /// `resync`).
    #[param(minimum = 0)]
    pub after_seq: Option<i64>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessagePage {
    /// Oldest first.
    pub messages: Vec<MessageView>,
    /// True when more messages lie beyond this page in the paging direction.
    pub has_more: bool,
}

/// GET /api/v1/chat/conversations/{id}/messages
///
/// With `before_seq` only (or nothing), the page is the newest messages
/// before it; with `after_seq`, the oldest messages after it. Both bound a
/// range, read forwards. Each page is one index range scan on
/// `(conversation_id, seq)`, whatever the conversation's size.
#[utoipa::path(
    get,
    path = "/api/v1/chat/conversations/{id}/messages",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Conversation id"), PageQuery),
    responses(
        (status = 200, description = "A page of messages, oldest first", body = MessagePage),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 403, description = "Not a participant", body = ErrorBody),
        (status = 404, description = "No such conversation", body = ErrorBody),
        (status = 422, description = "Bad paging parameters", body = ErrorBody),
    )
)]
async fn list_messages(
    user: AuthUser,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<MessagePage>> {
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    if q.before_seq.is_some_and(|s| s < 1) || q.after_seq.is_some_and(|s| s < 0) {
        return Err(ApiError::invalid(
            "before_seq must be at least 1 and after_seq at least 0",
        ));
    }
    let client = state.reads.get_for(user.id).await?;
    let page = match read_page(&client, &state, id, &q, limit, user.id).await {
        Err(e) if state.reads.retry_on_primary(&client, &e) => {
            let primary = state.reads.primary().await?;
            read_page(&primary, &state, id, &q, limit, user.id).await
        }
        read => read,
    };
    Ok(Json(page?))
}

/// The page on `client`, the replica's or the primary's.
async fn read_page(
    client: &deadpool_postgres::Client,
    state: &AppState,
    id: i64,
    q: &PageQuery,
    limit: i64,
    viewer: i64,
) -> ApiResult<MessagePage> {
    let access = store::conversation_access(client, id, viewer).await?;
    // Fetch one extra row to learn whether there is more.
    let fetch = limit + 1;
    let (sql, forwards) = match (q.before_seq, q.after_seq) {
        (before, None) => (
            format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages
                 WHERE conversation_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
            ),
            (before.unwrap_or(i64::MAX), false),
        ),
        (None, Some(after)) => (
            format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages
                 WHERE conversation_id = $1 AND seq > $2 ORDER BY seq ASC LIMIT $3"
            ),
            (after, true),
        ),
        (Some(before), Some(after)) => {
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages
                     WHERE conversation_id = $1 AND seq > $2 AND seq < $4
                     ORDER BY seq ASC LIMIT $3"
                ))
                .await?;
            let rows = client
                .query(&stmt, &[&id, &after, &fetch, &before])
                .timed("history_between")
                .await?;
            return page(client, state, &rows, limit, true, &access, viewer).await;
        }
    };
    let stmt = client.prepare_cached(&sql).await?;
    let rows = client
        .query(&stmt, &[&id, &forwards.0, &fetch])
        .timed(if forwards.1 {
            "history_after"
        } else {
            "history_before"
        })
        .await?;
    page(client, state, &rows, limit, forwards.1, &access, viewer).await
}

async fn page(
    client: &deadpool_postgres::Client,
    state: &AppState,
    rows: &[tokio_postgres::Row],
    limit: i64,
    forwards: bool,
    access: &store::Access,
    viewer: i64,
) -> ApiResult<MessagePage> {
    let has_more = rows.len() as i64 > limit;
    let rows = &rows[..rows.len().min(limit as usize)];
    let mut messages: Vec<MessageView> =
        store::message_views(client, rows, &access.members, &state.media, Some(viewer)).await?;
    if !forwards {
        messages.reverse();
    }
    Ok(MessagePage { messages, has_more })
}
