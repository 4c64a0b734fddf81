//! Queries shared by several routes.

use deadpool_postgres::GenericClient;
use shared::media::AttachmentView;
use shared::protocol::MessageView;
use shared::receipts::{Watermark, status_of};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};

/// What a participant may know about a conversation before reading it.
#[derive(Debug, Clone)]
pub struct Access {
    pub kind: String,
    pub created_by: i64,
    pub last_seq: i64,
    /// Bumped with every change to the member list (a trigger does it).
    pub members_version: i64,
    pub members: Vec<Watermark>,
}

/// The conversation `conversation_id` as `user_id` may see it: 404 when it
/// does not exist, 403 when the user is not a participant.
pub async fn conversation_access(
    client: &impl GenericClient,
    conversation_id: i64,
    user_id: i64,
) -> ApiResult<Access> {
    let access = conversation_members(client, conversation_id).await?;
    if !access.members.iter().any(|m| m.user_id == user_id) {
        return Err(ApiError::Forbidden(
            "you are not a participant of this conversation",
        ));
    }
    Ok(access)
}

/// A conversation and its members' watermarks; 404 when it does not exist.
pub async fn conversation_members(
    client: &impl GenericClient,
    conversation_id: i64,
) -> ApiResult<Access> {
    let stmt = client
        .prepare_cached(
            "SELECT c.kind, c.created_by, c.last_seq, p.user_id, p.delivered_seq, p.read_seq,
                    c.members_version
             FROM conversations c
             LEFT JOIN conversation_participants p ON p.conversation_id = c.id
             WHERE c.id = $1
             ORDER BY p.user_id",
        )
        .await?;
    let rows = client.query(&stmt, &[&conversation_id]).await?;
    let first = rows.first().ok_or(ApiError::NotFound("conversation"))?;
    let members = rows
        .iter()
        .filter_map(|r| {
            r.get::<_, Option<i64>>(3).map(|user_id| Watermark {
                user_id,
                delivered_seq: r.get(4),
                read_seq: r.get(5),
            })
        })
        .collect();
    Ok(Access {
        kind: first.get(0),
        created_by: first.get(1),
        last_seq: first.get(2),
        members_version: first.get(6),
        members,
    })
}

/// Columns every message query selects, in the order [`message_view`] reads.
pub const MESSAGE_COLUMNS: &str =
    "id, seq, conversation_id, sender_id, content, created_at, client_msg_id";

/// Message rows (selected with [`MESSAGE_COLUMNS`]) as views, each with
/// its status and its attachments, signed now: one more query for the
/// whole page, whatever its size.
pub async fn message_views(
    client: &impl GenericClient,
    rows: &[Row],
    members: &[Watermark],
    media: &crate::media::Media,
) -> ApiResult<Vec<MessageView>> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let mut attachments = crate::media::attachments_of(client, &ids).await?;
    let now = crate::auth::now_unix();
    Ok(rows
        .iter()
        .map(|r| {
            let id: Uuid = r.get(0);
            let views = attachments
                .remove(&id)
                .unwrap_or_default()
                .into_iter()
                .map(|meta| media.signer.view(meta, now))
                .collect();
            message_view(r, members, views)
        })
        .collect())
}

/// A message row (selected with [`MESSAGE_COLUMNS`]) with its status.
pub fn message_view(
    row: &Row,
    members: &[Watermark],
    attachments: Vec<AttachmentView>,
) -> MessageView {
    let seq: i64 = row.get(1);
    let sender_id: i64 = row.get(3);
    MessageView {
        id: row.get(0),
        seq,
        conversation_id: row.get(2),
        sender_id,
        content: row.get(4),
        status: status_of(seq, sender_id, members),
        created_at: row.get(5),
        client_msg_id: row.get(6),
        attachments,
        edited_at: None,
        deleted_at: None,
        reactions: Vec::new(),
        reply_to: None,
        mentions: Vec::new(),
    }
}

/// The ids in `ids` that are not users.
pub async fn unknown_users(client: &impl GenericClient, ids: &[i64]) -> ApiResult<Vec<i64>> {
    let rows = client
        .query("SELECT id FROM users WHERE id = ANY($1)", &[&ids])
        .await?;
    let known: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    Ok(ids
        .iter()
        .copied()
        .filter(|id| !known.contains(id))
        .collect())
}
