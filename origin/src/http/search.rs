//! `GET /api/v1/chat/search`: messages in the caller's current
//! conversations. The query and its plan are in [`crate::search`].

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::error::SqlState;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::ApiQuery;
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::metrics::Timed;
use crate::search::{
    BUILD_QUERY, CALLER_CONVERSATIONS, CONVERSATION_ACCESS, Cursor, DEFAULT_PAGE, MAX_PAGE,
    MAX_QUERY_CHARS, RANK_WINDOW, SEARCH_GUARD, Terms, search_hits, terms,
};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(search))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// What to look for, read like a web search box: `"exact phrase"`,
    /// `-word` to exclude, `or`; the last word also matches as a prefix
    /// (from 3 characters). 1 to 200 characters, not only spaces.
    #[param(min_length = 1, max_length = 200)]
    pub q: String,
    /// Only this conversation (the caller must be a participant).
    #[param(minimum = 1)]
    pub conversation_id: Option<i64>,
    /// `next_cursor` from the previous page of the same search.
    #[param(max_length = 64)]
    pub cursor: Option<String>,
    /// Page size, 1 to 50 (default 20).
    #[param(minimum = 1, maximum = 50)]
    pub limit: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SearchHit {
    pub message_id: Uuid,
    pub conversation_id: i64,
    /// A group's name; for a direct conversation, the other person's name.
    pub conversation_name: String,
    pub seq: i64,
    pub sender_id: i64,
    pub sender_name: String,
    pub created_at: DateTime<Utc>,
    /// Plain text around the matches, each matched word between `«` and
    /// `»` (never HTML). The message's own `«` and `»` are removed, so
    /// every pair is a match.
    pub snippet: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SearchPage {
    /// Best match first, newest first among equals.
    pub hits: Vec<SearchHit>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

fn invalid_query(message: impl Into<String>) -> ApiError {
    ApiError::Unprocessable {
        code: "invalid_query",
        message: message.into(),
    }
}

/// A database error of the search: its statement timeout is an outage
/// (`503`, retry), not a bug.
fn db_error(e: tokio_postgres::Error) -> ApiError {
    if e.code() == Some(&SqlState::QUERY_CANCELED) {
        return ApiError::Unavailable(e.into());
    }
    e.into()
}

/// GET /api/v1/chat/search
///
/// Full-text search over the messages of the conversations the caller is a
/// participant of now (a member who left a group no longer finds its
/// messages), or of one of them. Deleted messages never match; an edited
/// one matches its current text. Best match first (`ts_rank_cd`), newest
/// first among equals; only the newest 1,000 matches are ranked and paged.
#[utoipa::path(
    get,
    path = "/api/v1/chat/search",
    tag = "search",
    security(("bearer" = [])),
    params(SearchQuery),
    responses(
        (status = 200, description = "A page of hits, best first", body = SearchPage),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 403, description = "`conversation_id` names a conversation the caller is not in (`forbidden`)", body = ErrorBody),
        (status = 404, description = "`conversation_id` names no conversation (`not_found`)", body = ErrorBody),
        (status = 422, description = "`q` empty, blank or over 200 characters, a cursor this route did not make, `limit` or `conversation_id` out of range (`invalid_query`)", body = ErrorBody),
    )
)]
async fn search(
    user: AuthUser,
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<SearchQuery>,
) -> ApiResult<Json<SearchPage>> {
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(invalid_query(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    if params.q.trim().is_empty() {
        return Err(invalid_query("q must not be empty"));
    }
    if params.q.chars().count() > MAX_QUERY_CHARS {
        return Err(invalid_query(format!(
            "q must be at most {MAX_QUERY_CHARS} characters"
        )));
    }
    if params.conversation_id.is_some_and(|id| id < 1) {
        return Err(invalid_query("conversation_id must be at least 1"));
    }
    let cursor = match params.cursor.as_deref() {
        None => None,
        Some(text) => Some(
            Cursor::decode(text)
                .ok_or_else(|| invalid_query("cursor is not one this search returned"))?,
        ),
    };
    let terms = terms(&params.q);

    let mut client = state.reads.get_for(user.id).await?;
    let found = read_hits(
        &mut client,
        user.id,
        params.conversation_id,
        &terms,
        cursor,
        limit,
    )
    .await;
    let page = match found {
        Err(e) if state.reads.retry_on_primary(&client, &e) => {
            let mut primary = state.reads.primary().await?;
            read_hits(
                &mut primary,
                user.id,
                params.conversation_id,
                &terms,
                cursor,
                limit,
            )
            .await
        }
        read => read,
    };
    Ok(Json(page?))
}

/// A page of hits on `client`, the replica's or the primary's (a read-only
/// transaction either way, for the `SET LOCAL`s of [`SEARCH_GUARD`]).
async fn read_hits(
    client: &mut deadpool_postgres::Client,
    user_id: i64,
    conversation_id: Option<i64>,
    terms: &Terms,
    cursor: Option<Cursor>,
    limit: i64,
) -> ApiResult<SearchPage> {
    let tx = client.transaction().await?;
    tx.batch_execute(SEARCH_GUARD).await?;

    // The conversations searched, and how many seqs they hold in all.
    let (conversations, seqs): (Vec<i64>, i64) = match conversation_id {
        Some(id) => {
            let stmt = tx.prepare_cached(CONVERSATION_ACCESS).await?;
            let row = tx
                .query_opt(&stmt, &[&id, &user_id])
                .timed("search_conversation_access")
                .await?
                .ok_or(ApiError::NotFound("conversation"))?;
            if !row.get::<_, bool>(0) {
                return Err(ApiError::Forbidden(
                    "you are not a participant of this conversation",
                ));
            }
            (vec![id], row.get(1))
        }
        None => {
            let stmt = tx.prepare_cached(CALLER_CONVERSATIONS).await?;
            let row = tx
                .query_one(&stmt, &[&user_id])
                .timed("search_caller_conversations")
                .await?;
            (row.get(0), row.get(1))
        }
    };
    let empty = SearchPage {
        hits: Vec::new(),
        next_cursor: None,
    };
    if conversations.is_empty() {
        return Ok(empty);
    }

    let stmt = tx.prepare_cached(BUILD_QUERY).await?;
    let row = tx
        .query_one(&stmt, &[&terms.web, &terms.prefix])
        .timed("search_build_query")
        .await
        .map_err(db_error)?;
    let (tsquery, operands, indexable): (String, i32, bool) = (row.get(0), row.get(1), row.get(2));
    // Nothing to look for, or only words to exclude: no hits (see
    // crate::search).
    if operands == 0 || !indexable {
        return Ok(empty);
    }

    let stmt = tx.prepare_cached(search_hits(seqs)).await?;
    let rows = tx
        .query(
            &stmt,
            &[
                &tsquery,
                &conversations,
                &RANK_WINDOW,
                &(limit + 1),
                &user_id,
                &cursor.map(|c| c.rank),
                &cursor.map(|c| c.created_at),
                &cursor.map(|c| c.id),
            ],
        )
        .timed(crate::search::search_hits_query(seqs))
        .await
        .map_err(db_error)?;
    tx.commit().await?;

    let more = rows.len() as i64 > limit;
    let rows = &rows[..rows.len().min(limit as usize)];
    let next_cursor = match (more, rows.last()) {
        (true, Some(last)) => Some(
            Cursor {
                id: last.get(0),
                created_at: last.get(4),
                rank: last.get(5),
            }
            .encode(),
        ),
        _ => None,
    };
    let hits = rows
        .iter()
        .map(|r| SearchHit {
            message_id: r.get(0),
            conversation_id: r.get(1),
            seq: r.get(2),
            sender_id: r.get(3),
            created_at: r.get(4),
            conversation_name: r.get(6),
            sender_name: r.get(7),
            snippet: r.get(8),
        })
        .collect();
    Ok(SearchPage { hits, next_cursor })
}
