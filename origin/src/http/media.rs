//! Attachments over HTTP: the edge's reservation, commit and abort
//! (internal, behind the service secret), and the participants' gallery
//! and single-attachment reads (public, documented).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::media::{AttachmentMeta, AttachmentView, MediaKind, sanitize_name};
use shared::protocol::internal::{CommitAttachment, ReserveAttachment, Reserved};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{ApiJson, ApiPath, ApiQuery};
use crate::auth::{AuthUser, ServiceCaller};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::media::{self, ATTACHMENT_COLUMN_COUNT, ATTACHMENT_COLUMNS, meta_from_row};
use crate::metrics::Timed;
use crate::state::AppState;
use crate::store;

/// The internal routes (edge → origin).
pub fn internal_router() -> Router<AppState> {
    Router::new()
        .route("/internal/v1/attachments", post(reserve))
        .route("/internal/v1/attachments/{id}/commit", post(commit))
        .route("/internal/v1/attachments/{id}", delete(abort))
}

/// The public routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(gallery))
        .routes(routes!(get_attachment))
}

/// Longest `mime` a reservation may name.
const MAX_MIME_CHARS: usize = 100;

/// POST /internal/v1/attachments
///
/// Reserves an upload before its first byte reaches the bucket: the
/// uploader must be a participant now (403; 404 for no such conversation),
/// the declared size within the kind's limit (413 `too_large`) and the
/// uploader's last 24 hours plus this within the daily quota (413
/// `quota_exceeded`). Every reservation of the last 24 hours counts, from
/// before its first byte (so parallel uploads cannot overshoot), sent or
/// not, until the edge aborts it (an upload that failed stored nothing).
async fn reserve(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ReserveAttachment>,
) -> ApiResult<(StatusCode, Json<Reserved>)> {
    let config = &state.media.config;
    if let Some(refused) = media::check_size(config, req.kind, req.size) {
        return Err(refused);
    }
    let mime = req.mime.trim();
    if mime.is_empty()
        || mime.chars().count() > MAX_MIME_CHARS
        || !mime.chars().all(|c| c.is_ascii_graphic())
    {
        return Err(ApiError::invalid(
            "mime must be a media type such as image/jpeg",
        ));
    }
    if req.duration_ms.is_some_and(|d| d < 0) {
        return Err(ApiError::invalid("duration_ms must not be negative"));
    }
    let name = req.name.as_deref().and_then(sanitize_name);
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    store::conversation_access(&tx, req.conversation_id, req.uploader_id).await?;
    // One reservation per uploader at a time from here to the commit, so
    // two concurrent uploads cannot both squeeze under the quota.
    tx.execute(
        "SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE",
        &[&req.uploader_id],
    )
    .timed("media_lock_uploader")
    .await?;
    let used: i64 = tx
        .query_one(
            "SELECT COALESCE(sum(size), 0)::int8 FROM attachments
             WHERE uploader_id = $1 AND created_at > now() - interval '24 hours'",
            &[&req.uploader_id],
        )
        .timed("media_quota_used")
        .await?
        .get(0);
    if let Some(refused) = media::check_quota(config, used, req.size) {
        return Err(refused);
    }
    let id = Uuid::now_v7();
    tx.execute(
        "INSERT INTO attachments
             (id, conversation_id, uploader_id, kind, mime, size, name, duration_hint_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &id,
            &req.conversation_id,
            &req.uploader_id,
            &req.kind.as_str(),
            &mime,
            &req.size,
            &name,
            &req.duration_ms,
        ],
    )
    .timed("media_reserve")
    .await?;
    tx.commit().await?;
    metrics::counter!("media_reserved_total", "kind" => req.kind.as_str()).increment(1);
    Ok((StatusCode::CREATED, Json(Reserved { id })))
}

/// POST /internal/v1/attachments/{id}/commit
///
/// The object is in the bucket. An image, video or audio goes to the
/// processing worker (`processing`); a file is `ready`. Idempotent: a
/// commit of an attachment already committed answers its current state.
async fn commit(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<CommitAttachment>,
) -> ApiResult<Json<AttachmentMeta>> {
    if req.width.is_some_and(|w| w <= 0) || req.height.is_some_and(|h| h <= 0) {
        return Err(ApiError::invalid("width and height must be positive"));
    }
    let client = state.pool.get().await?;
    let committed = client
        .query_opt(
            &format!(
                "UPDATE attachments a
                 SET width = COALESCE($2, a.width), height = COALESCE($3, a.height),
                     state = CASE WHEN a.kind = 'file' THEN 'ready' ELSE 'processing' END,
                     next_attempt_at = CASE WHEN a.kind = 'file' THEN NULL ELSE now() END,
                     notified = a.kind = 'file', attempts = 0
                 WHERE a.id = $1 AND a.state = 'uploading'
                 RETURNING {ATTACHMENT_COLUMNS}"
            ),
            &[&id, &req.width, &req.height],
        )
        .timed("media_commit")
        .await?;
    let row = match committed {
        Some(row) => {
            state.media.wake.notify_one();
            row
        }
        None => client
            .query_opt(
                &format!("SELECT {ATTACHMENT_COLUMNS} FROM attachments a WHERE a.id = $1"),
                &[&id],
            )
            .timed("media_by_id")
            .await?
            .ok_or(ApiError::NotFound("attachment"))?,
    };
    Ok(Json(meta_from_row(&row, 0)?))
}

/// DELETE /internal/v1/attachments/{id}
///
/// Drops a reservation whose upload failed (still `uploading`): 204, also
/// when it is already gone, so the edge may retry. 409 once committed:
/// from then on only the cleanup (through the room) removes it.
async fn abort(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            "WITH gone AS (DELETE FROM attachments WHERE id = $1 AND state = 'uploading' RETURNING 1)
             SELECT (SELECT count(*) FROM gone), (SELECT state FROM attachments WHERE id = $1)",
            &[&id],
        )
        .timed("media_abort").await?;
    let (deleted, state_now): (i64, Option<String>) =
        row.map(|r| (r.get(0), r.get(1))).unwrap_or((0, None));
    match (deleted, state_now) {
        // The snapshot still shows the row the statement deleted.
        (1, _) | (_, None) => Ok(StatusCode::NO_CONTENT),
        (_, Some(s)) => Err(ApiError::Conflict(format!(
            "the attachment is {s}, not an upload in progress"
        ))),
    }
}

/// Largest gallery page.
pub const MAX_GALLERY_PAGE: i64 = 100;
const DEFAULT_GALLERY_PAGE: i64 = 30;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GalleryQuery {
    /// Only attachments of this kind.
    #[param(inline, value_type = Option<MediaKind>)]
    pub kind: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1 to 100 (default 30).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
}

/// One attachment in the gallery, with the message that carries it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GalleryItem {
    #[serde(flatten)]
    pub attachment: AttachmentView,
    pub message_id: Uuid,
    pub seq: i64,
    pub sender_id: i64,
    /// When the message was sent.
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GalleryPage {
    /// Newest message first; a message's attachments in its order.
    pub attachments: Vec<GalleryItem>,
    /// Pass as `cursor` for the next page; `null` at the end.
    pub next_cursor: Option<String>,
}

fn bad_query(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest {
        code: "invalid_query",
        message: message.into(),
    }
}

/// The opaque cursor: the last item's (seq, position), base64url.
fn encode_cursor(seq: i64, position: i16) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{seq}.{position}"))
}

fn decode_cursor(raw: &str) -> Option<(i64, i16)> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw.trim_end_matches('='))
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (seq, position) = text.split_once('.')?;
    let seq: i64 = seq.parse().ok()?;
    let position: i16 = position.parse().ok()?;
    (seq >= 1 && position >= 0).then_some((seq, position))
}

/// GET /api/v1/chat/conversations/{id}/attachments
///
/// The conversation's sent attachments (not failed ones), newest message
/// first, with fresh download paths. One range of the gallery index per
/// page.
#[utoipa::path(
    get,
    path = "/api/v1/chat/conversations/{id}/attachments",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Conversation id"), GalleryQuery),
    responses(
        (status = 200, description = "A page of attachments, newest first", body = GalleryPage),
        (status = 400, description = "A malformed id (`invalid_path`), or a bad `kind`, `cursor` or `limit` (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 403, description = "Not a participant (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such conversation (`not_found`)", body = ErrorBody),
    )
)]
async fn gallery(
    user: AuthUser,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<GalleryQuery>,
) -> ApiResult<Json<GalleryPage>> {
    // An empty `kind=` is not "all": the document says what a kind is.
    let kind = match q.kind.as_deref() {
        None => None,
        Some(raw) => Some(
            MediaKind::parse(raw)
                .ok_or_else(|| bad_query("kind must be image, video, audio or file"))?,
        ),
    };
    let limit = match q.limit.as_deref() {
        None | Some("") => DEFAULT_GALLERY_PAGE,
        Some(raw) => raw
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=MAX_GALLERY_PAGE).contains(l))
            .ok_or_else(|| bad_query(format!("limit must be between 1 and {MAX_GALLERY_PAGE}")))?,
    };
    let after = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(decode_cursor(raw).ok_or_else(|| bad_query("cursor is not valid"))?),
    };
    let client = state.pool.get().await?;
    store::conversation_access(&client, id, user.id).await?;
    let (seq, position) = after.unwrap_or((i64::MAX, -1));
    let kind = kind.map(MediaKind::as_str);
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {ATTACHMENT_COLUMNS}, a.message_id, a.message_seq, a.position,
                    m.sender_id, m.created_at
             FROM attachments a JOIN messages m ON m.id = a.message_id
             WHERE a.conversation_id = $1 AND a.message_id IS NOT NULL
               AND a.state <> 'failed'
               AND ($2::text IS NULL OR a.kind = $2::text)
               AND a.message_seq <= $3
               AND (a.message_seq < $3 OR a.position > $4)
             ORDER BY a.message_seq DESC, a.position
             LIMIT $5"
        ))
        .await?;
    let rows = client
        .query(&stmt, &[&id, &kind, &seq, &position, &(limit + 1)])
        .timed("media_gallery_page")
        .await?;
    let more = rows.len() as i64 > limit;
    let now = crate::auth::now_unix();
    let mut attachments = Vec::with_capacity(rows.len().min(limit as usize));
    let mut last = None;
    for r in rows.iter().take(limit as usize) {
        let n = ATTACHMENT_COLUMN_COUNT;
        let meta = meta_from_row(r, 0)?;
        let seq: i64 = r.get(n + 1);
        let position: i16 = r.get(n + 2);
        last = Some((seq, position));
        attachments.push(GalleryItem {
            attachment: state.media.signer.view(meta, now),
            message_id: r.get(n),
            seq,
            sender_id: r.get(n + 3),
            created_at: r.get(n + 4),
        });
    }
    let next_cursor = match (more, last) {
        (true, Some((seq, position))) => Some(encode_cursor(seq, position)),
        _ => None,
    };
    Ok(Json(GalleryPage {
        attachments,
        next_cursor,
    }))
}

/// GET /api/v1/chat/conversations/{id}/attachments/{attachment_id}
///
/// One attachment with fresh download paths (a client re-signs an expired
/// link with it). An upload not yet sent is visible to its uploader only.
#[utoipa::path(
    get,
    path = "/api/v1/chat/conversations/{id}/attachments/{attachment_id}",
    tag = "conversations",
    security(("bearer" = [])),
    params(
        ("id" = i64, Path, description = "Conversation id"),
        ("attachment_id" = Uuid, Path, description = "Attachment id"),
    ),
    responses(
        (status = 200, description = "The attachment, its paths signed now", body = AttachmentView),
        (status = 400, description = "A malformed id (`invalid_path`)", body = ErrorBody),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 403, description = "Not a participant (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such conversation or attachment (`not_found`)", body = ErrorBody),
    )
)]
async fn get_attachment(
    user: AuthUser,
    State(state): State<AppState>,
    ApiPath((id, attachment_id)): ApiPath<(i64, Uuid)>,
) -> ApiResult<Json<AttachmentView>> {
    let client = state.pool.get().await?;
    store::conversation_access(&client, id, user.id).await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT {ATTACHMENT_COLUMNS} FROM attachments a
                 WHERE a.id = $1 AND a.conversation_id = $2
                   AND (a.message_id IS NOT NULL OR a.uploader_id = $3)"
            ),
            &[&attachment_id, &id, &user.id],
        )
        .timed("media_attachment")
        .await?
        .ok_or(ApiError::NotFound("attachment"))?;
    Ok(Json(state.media.view(meta_from_row(&row, 0)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_junk_is_refused() {
        let c = encode_cursor(1234, 3);
        assert_eq!(decode_cursor(&c), Some((1234, 3)));
        for bad in [
            "",
            "!!",
            "MTIz",
            &encode_cursor(0, 1),
            &encode_cursor(5, -1),
        ] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }
}
