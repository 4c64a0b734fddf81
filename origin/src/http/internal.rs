//! The internal API for the edge, behind the shared service secret.
//!
//! Every route here takes a [`ServiceCaller`], so a request without the
//! secret is refused before its body is read.

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use shared::protocol::internal::{
    Change, ContactPresence, ConversationMembers, IngestBatch, IngestResult, MemberWatermark,
    PresenceBatch, ReceiptBatch, StoredChange, StoredMessage, UserContacts,
};

use super::{ApiJson, ApiPath};
use crate::auth::ServiceCaller;
use crate::error::{ApiError, ApiResult};
use crate::metrics::Timed;
use crate::state::AppState;
use crate::{ingest, store};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/internal/v1/messages/batch", post(ingest))
        .route("/internal/v1/conversations/{id}/members", get(members))
        .route(
            "/internal/v1/conversations/{id}/messages/{seq}",
            get(message_by_seq),
        )
        .route("/internal/v1/presence", post(presence))
        .route("/internal/v1/users/{id}/contacts", get(contacts))
        .route("/internal/v1/receipts", post(receipts))
        .route("/internal/v1/edge-report", post(edge_report))
}

/// POST /internal/v1/edge-report
///
/// A Durable Object's or Worker isolate's figures (see
/// [`crate::edge_report`]). 204; a resend of a report already applied
/// changes only its gauges.
async fn edge_report(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiJson(report): ApiJson<shared::metrics::EdgeReport>,
) -> StatusCode {
    state.edge_figures.apply(&report);
    StatusCode::NO_CONTENT
}

/// POST /internal/v1/messages/batch
///
/// Messages and watermarks, in one transaction (see [`crate::ingest`]).
/// Idempotent upsert: replaying a batch changes nothing and answers the
/// same. The answer lists what PostgreSQL holds, so the edge drops an outbox
/// entry only once it is really stored; a 200 also means every receipt in
/// the batch was applied.
async fn ingest(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiJson(mut batch): ApiJson<IngestBatch>,
) -> ApiResult<Json<IngestResult>> {
    // The room's figures first, whatever the batch's fate: an ingest that
    // keeps failing must still show as an aging outbox.
    if let Some(report) = batch.report.take() {
        state.edge_figures.apply(&report);
    }
    // Senders (and actors of changes) and readers wrote: with a replica,
    // their own reads go to the primary until it has this batch. Noted even
    // if the call fails, as a broken connection may hide a commit.
    let writers: Vec<i64> = if state.reads.has_replica() {
        let senders = batch.messages.iter().map(|m| m.sender_id);
        senders
            .chain(batch.receipts.iter().map(|r| r.user_id))
            .collect()
    } else {
        Vec::new()
    };
    let result = ingest::ingest(&state.pool, batch, state.push.enqueue()).await;
    state.reads.wrote_all(writers);
    let result = result?;
    if state.push.enabled() {
        state.push.wake();
    }
    Ok(Json(result))
}

/// GET /internal/v1/conversations/{id}/members
///
/// With the moderators, who may delete anyone's message: a group's
/// creator while a participant, and its participants whose role is
/// `admin`; nobody in a direct conversation.
async fn members(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<ConversationMembers>> {
    let client = state.pool.get().await?;
    let access = store::conversation_members(&client, id).await?;
    let moderators: Vec<i64> = if access.kind == "group" {
        let stmt = client
            .prepare_cached(
                "SELECT p.user_id FROM conversation_participants p
                 JOIN users u ON u.id = p.user_id
                 WHERE p.conversation_id = $1 AND (p.user_id = $2 OR u.role = 'admin')
                 ORDER BY p.user_id",
            )
            .await?;
        client
            .query(&stmt, &[&id, &access.created_by])
            .timed("internal_moderators")
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        Vec::new()
    };
    Ok(Json(ConversationMembers {
        conversation_id: id,
        kind: access.kind,
        last_seq: access.last_seq,
        members_version: access.members_version,
        moderators,
        members: access
            .members
            .iter()
            .map(|w| MemberWatermark {
                user_id: w.user_id,
                delivered_seq: w.delivered_seq,
                read_seq: w.read_seq,
            })
            .collect(),
    }))
}

/// GET /internal/v1/conversations/{id}/messages/{seq}
///
/// The entry PostgreSQL holds at a seq, as the ingest takes it: the
/// original a room returns for a resend whose message (or change) has left
/// its own log (404 if PostgreSQL has neither). A message comes in its
/// current state: an edited one with its new text, a deleted one with
/// empty content and nothing it mentioned, quoted or carried. A change
/// comes with its `change` (an edit whose target was deleted since with
/// empty text: it was erased).
async fn message_by_seq(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiPath((id, seq)): ApiPath<(i64, i64)>,
) -> ApiResult<Json<StoredMessage>> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT id, sender_id, content, created_at, client_msg_id, reply_to, mentions,
                    deleted_at
             FROM messages WHERE conversation_id = $1 AND seq = $2",
            &[&id, &seq],
        )
        .timed("internal_message_by_seq")
        .await?;
    let Some(row) = row else {
        return event_by_seq(&client, id, seq).await.map(Json);
    };
    let message_id: uuid::Uuid = row.get(0);
    let attachment_ids: Vec<uuid::Uuid> = client
        .query(
            "SELECT id FROM attachments WHERE message_id = $1 ORDER BY position",
            &[&message_id],
        )
        .timed("internal_message_attachments")
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Json(StoredMessage {
        id: message_id,
        conversation_id: id,
        seq,
        sender_id: row.get(1),
        content: row.get(2),
        created_at: row.get(3),
        client_msg_id: row.get(4),
        attachment_ids,
        reply_to: row.get(5),
        mentions: row.get(6),
        change: None,
        deleted_at: row.get(7),
        request_id: None,
    }))
}

/// The change event at `seq` of conversation `id`, as the ingest takes it.
async fn event_by_seq(
    client: &deadpool_postgres::Client,
    id: i64,
    seq: i64,
) -> ApiResult<StoredMessage> {
    let row = client
        .query_opt(
            "SELECT id, actor_id, created_at, client_msg_id, target_id, kind, content, emoji,
                    \"on\"
             FROM message_events WHERE conversation_id = $1 AND seq = $2",
            &[&id, &seq],
        )
        .timed("internal_event_by_seq")
        .await?
        .ok_or(ApiError::NotFound("message"))?;
    let kind: &str = row.get(5);
    let change = match kind {
        "edit" => Change::Edit {
            content: row.get::<_, Option<String>>(6).unwrap_or_default(),
        },
        "delete" => Change::Delete,
        "react" => Change::React {
            emoji: row.get::<_, Option<String>>(7).unwrap_or_default(),
            on: row.get::<_, Option<bool>>(8).unwrap_or(false),
        },
        other => {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "unknown change kind {other:?} stored"
            )));
        }
    };
    Ok(StoredMessage {
        id: row.get(0),
        conversation_id: id,
        seq,
        sender_id: row.get(1),
        content: String::new(),
        created_at: row.get(2),
        client_msg_id: row.get(3),
        change: Some(StoredChange {
            target_id: row.get(4),
            change,
        }),
        ..Default::default()
    })
}

/// GET /internal/v1/users/{id}/contacts
///
/// Everyone the user shares a conversation with now (the people their
/// presence goes to, and the only ones whose presence they hear live),
/// each with their presence, and the user's own presence as last reported.
/// The cost is the user's conversations and their members, never the
/// deployment (the participants' index on the user, then their primary
/// key).
async fn contacts(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<UserContacts>> {
    let client = state.pool.get().await?;
    let me = client
        .query_opt(
            "SELECT COALESCE(p.is_online, false)
             FROM users u LEFT JOIN user_presence p ON p.user_id = u.id
             WHERE u.id = $1",
            &[&id],
        )
        .timed("internal_own_presence")
        .await?
        .ok_or(ApiError::NotFound("user"))?;
    let rows = client
        .query(
            "SELECT DISTINCT other.user_id, COALESCE(p.is_online, false), p.last_seen
             FROM conversation_participants mine
             JOIN conversation_participants other
               ON other.conversation_id = mine.conversation_id AND other.user_id <> mine.user_id
             LEFT JOIN user_presence p ON p.user_id = other.user_id
             WHERE mine.user_id = $1
             ORDER BY other.user_id",
            &[&id],
        )
        .timed("internal_contacts")
        .await?;
    Ok(Json(UserContacts {
        user_id: id,
        is_online: me.get(0),
        contacts: rows
            .iter()
            .map(|r| ContactPresence {
                user_id: r.get(0),
                is_online: r.get(1),
                last_seen: r.get(2),
            })
            .collect(),
    }))
}

/// POST /internal/v1/presence
///
/// Last write wins by `last_seen`, so a delayed "online" cannot overwrite a
/// newer "offline". Unknown users are skipped. A user now offline has
/// their parked push notifications made due.
async fn presence(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiJson(batch): ApiJson<PresenceBatch>,
) -> ApiResult<StatusCode> {
    // One row per user (the newest), as ON CONFLICT DO UPDATE requires.
    let mut newest: HashMap<i64, (bool, DateTime<Utc>)> = HashMap::new();
    for u in batch.updates {
        let e = newest
            .entry(u.user_id)
            .or_insert((u.is_online, u.last_seen));
        if u.last_seen >= e.1 {
            *e = (u.is_online, u.last_seen);
        }
    }
    if newest.is_empty() {
        return Ok(StatusCode::NO_CONTENT);
    }
    let ids: Vec<i64> = newest.keys().copied().collect();
    let online: Vec<bool> = ids.iter().map(|id| newest[id].0).collect();
    let seen: Vec<DateTime<Utc>> = ids.iter().map(|id| newest[id].1).collect();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let offline: Vec<i64> = tx
        .query(
            "INSERT INTO user_presence (user_id, is_online, last_seen)
             SELECT t.id, t.online, t.seen
             FROM UNNEST($1::int8[], $2::bool[], $3::timestamptz[]) AS t(id, online, seen)
             WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = t.id)
             ON CONFLICT (user_id) DO UPDATE
                 SET is_online = EXCLUDED.is_online, last_seen = EXCLUDED.last_seen
                 WHERE user_presence.last_seen IS NULL
                    OR EXCLUDED.last_seen >= user_presence.last_seen
             RETURNING user_id, is_online",
            &[&ids, &online, &seen],
        )
        .timed("presence_update")
        .await?
        .iter()
        .filter(|r| !r.get::<_, bool>(1))
        .map(|r| r.get(0))
        .collect();
    // Notifications that waited for these users to go offline are due now
    // (see `crate::push::worker`).
    if !offline.is_empty() {
        tx.execute(crate::push::worker::WAKE_PARKED, &[&offline])
            .timed("presence_wake_parked")
            .await?;
    }
    tx.commit().await?;
    if !offline.is_empty() && state.push.enabled() {
        state.push.wake();
    }
    Ok(StatusCode::NO_CONTENT)
}

/// POST /internal/v1/receipts
///
/// Watermarks only move forward; a stale or replayed report is a no-op.
/// Edges that predate receipts in the ingest batch still post here.
async fn receipts(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiJson(batch): ApiJson<ReceiptBatch>,
) -> ApiResult<StatusCode> {
    let stored = ingest::receipts(&state.pool, &batch.receipts, state.push.enqueue()).await;
    // Read marks change the reader's unread counts (see `ingest` above).
    state
        .reads
        .wrote_all(batch.receipts.iter().map(|r| r.user_id));
    stored?;
    if state.push.enabled() {
        state.push.wake();
    }
    Ok(StatusCode::NO_CONTENT)
}
