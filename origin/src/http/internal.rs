//! The internal API for the edge, behind the shared service secret.
//!
//! Every route here takes a [`ServiceCaller`], so a request without the
//! secret is refused before its body is read.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use shared::protocol::internal::{
    ConversationMembers, ConversationVersion, IngestBatch, IngestRejection, IngestResult,
    MAX_INGEST_BATCH, MemberWatermark, PresenceBatch, ReceiptBatch, StoredMessage,
};
use shared::{ClientMsgId, MessageContent};
use uuid::Uuid;

use super::{ApiJson, ApiPath};
use crate::auth::ServiceCaller;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/internal/v1/messages/batch", post(ingest))
        .route("/internal/v1/conversations/{id}/members", get(members))
        .route(
            "/internal/v1/conversations/{id}/messages/{seq}",
            get(message_by_seq),
        )
        .route("/internal/v1/presence", post(presence))
        .route("/internal/v1/receipts", post(receipts))
}

/// Clock skew tolerated between a message's `created_at` (the edge's clock)
/// and the membership periods (PostgreSQL's clock), in seconds. A message
/// from `created_at` within this margin of the sender's join or departure
/// counts as sent while a member. It also covers the moment between a
/// removal's commit and the room hearing of it (the members-changed notice
/// takes milliseconds; its timeout is 2 s).
pub const MEMBERSHIP_SKEW_SECS: f64 = 5.0;

/// POST /internal/v1/messages/batch
///
/// Idempotent upsert. Replaying a batch changes nothing and answers the
/// same. The answer lists what PostgreSQL holds, so the edge drops an outbox
/// entry only once it is really stored.
async fn ingest(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiJson(batch): ApiJson<IngestBatch>,
) -> ApiResult<Json<IngestResult>> {
    if batch.messages.len() > MAX_INGEST_BATCH {
        return Err(ApiError::TooLarge(format!(
            "a batch holds at most {MAX_INGEST_BATCH} messages"
        )));
    }
    let mut rejected = Vec::new();
    let mut seen = HashSet::new();
    let mut valid: Vec<StoredMessage> = Vec::with_capacity(batch.messages.len());
    for m in batch.messages {
        if !seen.insert(m.id) {
            continue;
        }
        match validate(&m) {
            Ok(()) => valid.push(m),
            Err((code, message)) => rejected.push(IngestRejection {
                id: m.id,
                code: code.to_owned(),
                message,
            }),
        }
    }
    if valid.is_empty() {
        return Ok(Json(IngestResult {
            stored: Vec::new(),
            rejected,
            members_versions: Vec::new(),
        }));
    }

    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;

    // Lock the conversations in id order: concurrent batches touching the
    // same conversations then queue instead of deadlocking on the last_seq
    // update below.
    let conversation_ids: Vec<i64> = valid
        .iter()
        .map(|m| m.conversation_id)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // The lock also holds off member changes (their trigger updates the
    // conversation row), so the membership check below and the version
    // reported describe one state.
    let lock = tx
        .prepare_cached(
            "SELECT id, members_version FROM conversations WHERE id = ANY($1)
             ORDER BY id FOR NO KEY UPDATE",
        )
        .await?;
    let members_versions: Vec<ConversationVersion> = tx
        .query(&lock, &[&conversation_ids])
        .await?
        .iter()
        .map(|r| ConversationVersion {
            conversation_id: r.get(0),
            members_version: r.get(1),
        })
        .collect();
    let known_conversations: HashSet<i64> =
        members_versions.iter().map(|v| v.conversation_id).collect();
    let sender_ids: Vec<i64> = valid
        .iter()
        .map(|m| m.sender_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let unknown_senders: HashSet<i64> = store::unknown_users(&tx, &sender_ids)
        .await?
        .into_iter()
        .collect();
    valid.retain(|m| {
        let reason = if !known_conversations.contains(&m.conversation_id) {
            Some(("unknown_conversation", "no such conversation"))
        } else if unknown_senders.contains(&m.sender_id) {
            Some(("unknown_sender", "no such user"))
        } else {
            None
        };
        if let Some((code, message)) = reason {
            rejected.push(IngestRejection {
                id: m.id,
                code: code.to_owned(),
                message: message.to_owned(),
            });
        }
        reason.is_none()
    });

    // The sender must have been a member when the message was sent: a
    // message sent while a member and flushed after a removal is stored; one
    // sent after it is not.
    let not_members = not_members_at_sending(&tx, &valid).await?;
    valid.retain(|m| {
        if not_members.contains(&m.id) {
            tracing::warn!(
                id = %m.id,
                conversation_id = m.conversation_id,
                sender_id = m.sender_id,
                "ingest refused a message from a non-member"
            );
            rejected.push(IngestRejection {
                id: m.id,
                code: "not_member".to_owned(),
                message: "the sender was not a member of the conversation when it was sent"
                    .to_owned(),
            });
            false
        } else {
            true
        }
    });

    let ids: Vec<Uuid> = valid.iter().map(|m| m.id).collect();
    let convs: Vec<i64> = valid.iter().map(|m| m.conversation_id).collect();
    let seqs: Vec<i64> = valid.iter().map(|m| m.seq).collect();
    let senders: Vec<i64> = valid.iter().map(|m| m.sender_id).collect();
    let contents: Vec<&str> = valid.iter().map(|m| m.content.as_str()).collect();
    let created: Vec<DateTime<Utc>> = valid.iter().map(|m| m.created_at).collect();
    let keys: Vec<&str> = valid.iter().map(|m| m.client_msg_id.as_str()).collect();

    // One statement: insert what is new, and report both the rows inserted
    // now and the identical rows stored by an earlier call. A row that
    // conflicts with a *different* stored message is in neither list.
    let upsert = tx
        .prepare_cached(
            "WITH input AS (
                 SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::int8[],
                                      $5::text[], $6::timestamptz[], $7::text[])
                     AS t(id, conversation_id, seq, sender_id, content, created_at, client_msg_id)
             ), inserted AS (
                 INSERT INTO messages (id, conversation_id, seq, sender_id, content, created_at, client_msg_id)
                 SELECT id, conversation_id, seq, sender_id, content, created_at, client_msg_id FROM input
                 ON CONFLICT DO NOTHING
                 RETURNING id
             )
             SELECT id, true FROM inserted
             UNION ALL
             SELECT m.id, false FROM messages m JOIN input i ON i.id = m.id
                 AND m.conversation_id = i.conversation_id AND m.seq = i.seq
                 AND m.sender_id = i.sender_id AND m.client_msg_id = i.client_msg_id
                 AND m.content = i.content",
        )
        .await?;
    let rows = tx
        .query(
            &upsert,
            &[&ids, &convs, &seqs, &senders, &contents, &created, &keys],
        )
        .await?;
    let mut stored: HashSet<Uuid> = HashSet::with_capacity(rows.len());
    let mut new_rows = 0u64;
    for r in &rows {
        stored.insert(r.get(0));
        if r.get::<_, bool>(1) {
            new_rows += 1;
        }
    }

    // Advance each conversation's last_seq and activity time.
    let mut latest: BTreeMap<i64, (i64, DateTime<Utc>)> = BTreeMap::new();
    for m in valid.iter().filter(|m| stored.contains(&m.id)) {
        let e = latest
            .entry(m.conversation_id)
            .or_insert((m.seq, m.created_at));
        e.0 = e.0.max(m.seq);
        e.1 = e.1.max(m.created_at);
    }
    if !latest.is_empty() {
        let ids: Vec<i64> = latest.keys().copied().collect();
        let seqs: Vec<i64> = latest.values().map(|v| v.0).collect();
        let ats: Vec<DateTime<Utc>> = latest.values().map(|v| v.1).collect();
        let bump = tx
            .prepare_cached(
                "UPDATE conversations c
                 SET last_seq = GREATEST(c.last_seq, t.seq),
                     updated_at = GREATEST(c.updated_at, t.at)
                 FROM UNNEST($1::int8[], $2::int8[], $3::timestamptz[]) AS t(id, seq, at)
                 WHERE c.id = t.id",
            )
            .await?;
        tx.execute(&bump, &[&ids, &seqs, &ats]).await?;
    }
    tx.commit().await?;

    for m in &valid {
        if !stored.contains(&m.id) {
            tracing::error!(
                id = %m.id,
                conversation_id = m.conversation_id,
                seq = m.seq,
                "ingest conflict: a different message holds this seq or client_msg_id"
            );
            rejected.push(IngestRejection {
                id: m.id,
                code: "conflict".to_owned(),
                message: "a different message already holds this seq or client_msg_id".to_owned(),
            });
        }
    }
    let replayed = stored.len() as u64 - new_rows;
    crate::metrics::record_ingested(new_rows, replayed);
    let mut stored: Vec<Uuid> = stored.into_iter().collect();
    stored.sort_unstable();
    Ok(Json(IngestResult {
        stored,
        rejected,
        members_versions,
    }))
}

/// The ids of the messages in `messages` whose sender had no membership
/// period in the conversation covering `created_at` (± the skew).
async fn not_members_at_sending(
    client: &impl deadpool_postgres::GenericClient,
    messages: &[StoredMessage],
) -> ApiResult<HashSet<Uuid>> {
    if messages.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
    let convs: Vec<i64> = messages.iter().map(|m| m.conversation_id).collect();
    let senders: Vec<i64> = messages.iter().map(|m| m.sender_id).collect();
    let sent: Vec<DateTime<Utc>> = messages.iter().map(|m| m.created_at).collect();
    let stmt = client
        .prepare_cached(
            "SELECT t.id
             FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::timestamptz[])
                 AS t(id, conversation_id, sender_id, sent_at)
             WHERE NOT EXISTS (
                 SELECT 1 FROM conversation_memberships m
                 WHERE m.conversation_id = t.conversation_id AND m.user_id = t.sender_id
                   AND m.joined_at <= t.sent_at + make_interval(secs => $5)
                   AND (m.left_at IS NULL OR m.left_at >= t.sent_at - make_interval(secs => $5)))",
        )
        .await?;
    let rows = client
        .query(
            &stmt,
            &[&ids, &convs, &senders, &sent, &MEMBERSHIP_SKEW_SECS],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Applies the shared field rules to one message.
fn validate(m: &StoredMessage) -> Result<(), (&'static str, String)> {
    if m.seq < 1 {
        return Err(("invalid_field", "seq must be at least 1".to_owned()));
    }
    MessageContent::parse(m.content.as_str()).map_err(|e| (e.code(), e.to_string()))?;
    ClientMsgId::parse(m.client_msg_id.as_str()).map_err(|e| (e.code(), e.to_string()))?;
    Ok(())
}

/// GET /internal/v1/conversations/{id}/members
async fn members(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<ConversationMembers>> {
    let client = state.pool.get().await?;
    let access = store::conversation_members(&client, id).await?;
    Ok(Json(ConversationMembers {
        conversation_id: id,
        kind: access.kind,
        last_seq: access.last_seq,
        members_version: access.members_version,
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
/// One stored message, as the edge stored it: the original a room returns
/// for a resend whose message has left its own log (404 if PostgreSQL
/// does not have it).
async fn message_by_seq(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiPath((id, seq)): ApiPath<(i64, i64)>,
) -> ApiResult<Json<StoredMessage>> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT id, sender_id, content, created_at, client_msg_id
             FROM messages WHERE conversation_id = $1 AND seq = $2",
            &[&id, &seq],
        )
        .await?
        .ok_or(ApiError::NotFound("message"))?;
    Ok(Json(StoredMessage {
        id: row.get(0),
        conversation_id: id,
        seq,
        sender_id: row.get(1),
        content: row.get(2),
        created_at: row.get(3),
        client_msg_id: row.get(4),
    }))
}

/// POST /internal/v1/presence
///
/// Last write wins by `last_seen`, so a delayed "online" cannot overwrite a
/// newer "offline". Unknown users are skipped.
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
    let client = state.pool.get().await?;
    client
        .execute(
            "INSERT INTO user_presence (user_id, is_online, last_seen)
             SELECT t.id, t.online, t.seen
             FROM UNNEST($1::int8[], $2::bool[], $3::timestamptz[]) AS t(id, online, seen)
             WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = t.id)
             ON CONFLICT (user_id) DO UPDATE
                 SET is_online = EXCLUDED.is_online, last_seen = EXCLUDED.last_seen
                 WHERE user_presence.last_seen IS NULL
                    OR EXCLUDED.last_seen >= user_presence.last_seen",
            &[&ids, &online, &seen],
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// POST /internal/v1/receipts
///
/// Watermarks only move forward; a stale or replayed report is a no-op.
async fn receipts(
    _: ServiceCaller,
    State(state): State<AppState>,
    ApiJson(batch): ApiJson<ReceiptBatch>,
) -> ApiResult<StatusCode> {
    let mut merged: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
    for r in batch.receipts {
        if r.delivered_seq < 0 || r.read_seq < 0 {
            return Err(ApiError::invalid("watermarks must not be negative"));
        }
        let e = merged
            .entry((r.conversation_id, r.user_id))
            .or_insert((0, 0));
        e.0 = e.0.max(r.delivered_seq);
        e.1 = e.1.max(r.read_seq);
    }
    if merged.is_empty() {
        return Ok(StatusCode::NO_CONTENT);
    }
    let convs: Vec<i64> = merged.keys().map(|k| k.0).collect();
    let users: Vec<i64> = merged.keys().map(|k| k.1).collect();
    let delivered: Vec<i64> = merged.values().map(|v| v.0).collect();
    let read: Vec<i64> = merged.values().map(|v| v.1).collect();
    let client = state.pool.get().await?;
    client
        .execute(
            "UPDATE conversation_participants p
             SET delivered_seq = GREATEST(p.delivered_seq, t.delivered, t.read),
                 read_seq = GREATEST(p.read_seq, t.read)
             FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[])
                 AS t(conversation_id, user_id, delivered, read)
             WHERE p.conversation_id = t.conversation_id AND p.user_id = t.user_id",
            &[&convs, &users, &delivered, &read],
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
