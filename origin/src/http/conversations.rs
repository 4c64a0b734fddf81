//! Conversations: create (direct find-or-create, groups), list, read,
//! rename a group, and group membership.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use shared::protocol::{MessagePreview, MessageView, preview_text};
use shared::{ConversationName, DomainError, Role};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiJson, ApiPath};
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::metrics::Timed;
use crate::state::AppState;
use crate::store::{self, MESSAGE_COLUMNS};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_conversations, create_conversation))
        .routes(routes!(get_conversation, rename_conversation))
        .routes(routes!(add_participants, remove_participants))
}

/// Most members a group may have. A room relays every message to every
/// connected member, so this bounds a room's fan-out.
pub const MAX_GROUP_MEMBERS: usize = 1_000;
/// Messages returned with a conversation.
const LATEST_MESSAGES: i64 = 50;
/// Conversations returned by the list.
const LIST_LIMIT: i64 = 200;
/// Unread counts stop here: past it a client shows "999+", and counting
/// further would cost a scan of the whole backlog.
pub const UNREAD_CAP: i64 = 999;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConversationKind {
    Direct,
    Group,
}

impl ConversationKind {
    fn from_db(kind: &str) -> ApiResult<Self> {
        match kind {
            "direct" => Ok(Self::Direct),
            "group" => Ok(Self::Group),
            other => Err(ApiError::Internal(anyhow::anyhow!(
                "unknown conversation kind {other:?}"
            ))),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CreateConversation {
    /// Finds the direct conversation with `participant_id`, or creates it.
    Direct {
        /// Another user's id (yourself or an unknown user is a 422).
        #[schema(minimum = 1)]
        participant_id: i64,
    },
    /// Creates a group; the caller is always a member.
    Group {
        /// 1–100 characters (white space around it is trimmed off); no
        /// control characters inside.
        #[schema(
            min_length = 1,
            max_length = 100,
            pattern = r"^\s*[^\s\u0000-\u001f\u007f-\u009f]([^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f])?\s*$"
        )]
        name: String,
        /// The other members (duplicates and the caller are ignored); with
        /// the caller at most 1,000. Unknown users are a 422.
        #[schema(max_items = 999)]
        participant_ids: Vec<i64>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ParticipantView {
    pub user_id: i64,
    pub full_name: String,
    pub role: Role,
    pub joined_at: DateTime<Utc>,
    pub delivered_seq: i64,
    pub read_seq: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConversationView {
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: ConversationKind,
    /// The group's name; `null` for direct conversations.
    pub name: Option<String>,
    pub created_by: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_seq: i64,
    pub participants: Vec<ParticipantView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConversationDetail {
    #[serde(flatten)]
    pub conversation: ConversationView,
    /// The latest messages, oldest first.
    pub messages: Vec<MessageView>,
    /// True when older messages exist (page with `before_seq`).
    pub has_more: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PeerView {
    pub user_id: i64,
    pub full_name: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConversationSummary {
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: ConversationKind,
    pub name: Option<String>,
    /// What to show: the group's name, or the other person's name.
    pub title: String,
    /// The other person in a direct conversation.
    pub peer: Option<PeerView>,
    pub participant_count: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_seq: i64,
    pub read_seq: i64,
    /// Messages from others after `read_seq`, capped at 999.
    pub unread_count: i64,
    /// Of those, the ones that mention the caller and are not deleted,
    /// capped at 999.
    pub unread_mentions: i64,
    pub last_message: Option<MessagePreview>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConversationList {
    pub conversations: Vec<ConversationSummary>,
}

/// `PATCH /api/v1/chat/conversations/{id}`: the group's new name.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RenameConversation {
    /// 1–100 characters (white space around it is trimmed off); no
    /// control characters inside. The same rule as a new group's name.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^\s*[^\s\u0000-\u001f\u007f-\u009f]([^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f])?\s*$"
    )]
    pub name: String,
}

/// A group's name as sent: bounded as sent (the schema's maxLength, not
/// only what is left after trimming), then trimmed and checked.
fn group_name(raw: &str) -> ApiResult<ConversationName> {
    if raw
        .chars()
        .nth(shared::domain::MAX_CONVERSATION_NAME_CHARS)
        .is_some()
    {
        return Err(DomainError::TooLong {
            field: "name",
            max: shared::domain::MAX_CONVERSATION_NAME_CHARS,
        }
        .into());
    }
    Ok(ConversationName::parse(raw)?)
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ParticipantsChange {
    /// 1–1,000 user ids (duplicates are ignored).
    #[schema(min_items = 1, max_items = 1000)]
    pub user_ids: Vec<i64>,
}

/// GET /api/v1/chat/conversations
#[utoipa::path(
    get,
    path = "/api/v1/chat/conversations",
    tag = "conversations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's conversations, newest activity first", body = ConversationList),
        (status = 401, description = "No or bad token", body = ErrorBody),
    )
)]
async fn list_conversations(
    user: AuthUser,
    State(state): State<AppState>,
) -> ApiResult<Json<ConversationList>> {
    let client = state.reads.get_for(user.id).await?;
    let list = match read_list(&client, user.id).await {
        Err(e) if state.reads.retry_on_primary(&client, &e) => {
            read_list(&*state.reads.primary().await?, user.id).await
        }
        read => read,
    };
    Ok(Json(list?))
}

/// `user_id`'s conversations on `client`, the replica's or the primary's.
async fn read_list(
    client: &deadpool_postgres::Client,
    user_id: i64,
) -> ApiResult<ConversationList> {
    let stmt = client
        .prepare_cached(
            "SELECT c.id, c.kind, c.name, c.created_at, c.updated_at, c.last_seq, p.read_seq,
                    lm.id, lm.seq, lm.sender_id, lm.content, lm.created_at,
                    (SELECT count(*) FROM (
                        SELECT 1 FROM messages m
                        WHERE m.conversation_id = c.id AND m.seq > p.read_seq AND m.sender_id <> $1
                        LIMIT $3) unread) AS unread_count,
                    (SELECT count(*) FROM conversation_participants cp
                     WHERE cp.conversation_id = c.id) AS participant_count,
                    peer.id, peer.full_name, peer.role,
                    lm.deleted,
                    -- Only messages that mention anyone are read here
                    -- (messages_mentions_idx); a deleted one mentions
                    -- nobody. The room counts the same way
                    -- (count_mentions_after), so the list and
                    -- conversation_updated agree.
                    (SELECT count(*) FROM (
                        SELECT 1 FROM messages m
                        WHERE m.conversation_id = c.id AND m.seq > p.read_seq
                          AND m.mentions <> '{}' AND m.mentions @> ARRAY[$1::int8]
                          AND m.deleted_at IS NULL
                        LIMIT $3) mentioned) AS unread_mentions
             FROM conversation_participants p
             JOIN conversations c ON c.id = p.conversation_id
             LEFT JOIN LATERAL (
                 SELECT id, seq, sender_id, left(content, 200) AS content, created_at,
                        deleted_at IS NOT NULL AS deleted
                 FROM messages m WHERE m.conversation_id = c.id
                 ORDER BY m.seq DESC LIMIT 1) lm ON true
             LEFT JOIN users peer ON c.kind = 'direct'
                 AND peer.id = CASE WHEN c.direct_user_lo = $1 THEN c.direct_user_hi
                                    ELSE c.direct_user_lo END
             WHERE p.user_id = $1
             ORDER BY c.updated_at DESC, c.id DESC
             LIMIT $2",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&user_id, &LIST_LIMIT, &UNREAD_CAP])
        .timed("list_conversations")
        .await?;
    let mut conversations = Vec::with_capacity(rows.len());
    // Last messages with no text: they are previewed by what they carry
    // ("📷 Photo"), read in one query for the whole list.
    let textless: Vec<uuid::Uuid> = rows
        .iter()
        .filter(|r| {
            r.get::<_, Option<&str>>(10)
                .is_some_and(|c| c.trim().is_empty())
                && r.get::<_, Option<bool>>(17) == Some(false)
        })
        .filter_map(|r| r.get::<_, Option<uuid::Uuid>>(7))
        .collect();
    let mut carried = crate::media::attachments_of(client, &textless).await?;
    for r in rows {
        let kind = ConversationKind::from_db(r.get(1))?;
        let name: Option<String> = r.get(2);
        let last_message = r.get::<_, Option<uuid::Uuid>>(7).map(|id| MessagePreview {
            id,
            seq: r.get(8),
            sender_id: r.get(9),
            // A deleted message reads as a tombstone in the room's words,
            // so a list read here and one kept from conversation_updated
            // agree; an edited one by its new text.
            content: match carried.remove(&id) {
                _ if r.get::<_, Option<bool>>(17) == Some(true) => {
                    shared::room::DELETED_PREVIEW.to_owned()
                }
                Some(attachments) => shared::room::attachment_summary(&attachments),
                None => preview_text(r.get(10)),
            },
            created_at: r.get(11),
        });
        let peer = match r.get::<_, Option<i64>>(14) {
            Some(user_id) => Some(PeerView {
                user_id,
                full_name: r.get(15),
                role: Role::parse(r.get(16)).map_err(|e| ApiError::Internal(e.into()))?,
            }),
            None => None,
        };
        let title = name
            .clone()
            .or_else(|| peer.as_ref().map(|p| p.full_name.clone()))
            .unwrap_or_else(|| "Conversation".to_owned());
        conversations.push(ConversationSummary {
            id: r.get(0),
            kind,
            name,
            title,
            peer,
            participant_count: r.get(13),
            created_at: r.get(3),
            updated_at: r.get(4),
            last_seq: r.get(5),
            read_seq: r.get(6),
            unread_count: r.get(12),
            unread_mentions: r.get(18),
            last_message,
        });
    }
    Ok(ConversationList { conversations })
}

/// POST /api/v1/chat/conversations
#[utoipa::path(
    post,
    path = "/api/v1/chat/conversations",
    tag = "conversations",
    security(("bearer" = [])),
    request_body = CreateConversation,
    responses(
        (status = 201, description = "Created", body = ConversationView),
        (status = 200, description = "The direct conversation already existed", body = ConversationView),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 422, description = "Invalid field or unknown user", body = ErrorBody),
    )
)]
async fn create_conversation(
    user: AuthUser,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateConversation>,
) -> ApiResult<(StatusCode, Json<ConversationView>)> {
    let mut client = state.pool.get().await?;
    let (id, created) = match req {
        CreateConversation::Direct { participant_id } => {
            if participant_id == user.id {
                return Err(ApiError::invalid(
                    "a direct conversation needs another participant",
                ));
            }
            if !store::unknown_users(&client, &[participant_id])
                .await?
                .is_empty()
            {
                return Err(ApiError::invalid(format!("unknown user {participant_id}")));
            }
            find_or_create_direct(&mut client, user.id, participant_id).await?
        }
        CreateConversation::Group {
            name,
            participant_ids,
        } => {
            let name = group_name(&name)?;
            if participant_ids.len() >= MAX_GROUP_MEMBERS {
                return Err(ApiError::invalid(format!(
                    "participant_ids holds at most {} ids",
                    MAX_GROUP_MEMBERS - 1
                )));
            }
            let mut members = participant_ids;
            members.push(user.id);
            members.sort_unstable();
            members.dedup();
            if members.len() > MAX_GROUP_MEMBERS {
                return Err(ApiError::invalid(format!(
                    "a group has at most {MAX_GROUP_MEMBERS} members"
                )));
            }
            let unknown = store::unknown_users(&client, &members).await?;
            if !unknown.is_empty() {
                return Err(ApiError::invalid(format!("unknown users {unknown:?}")));
            }
            let tx = client.transaction().await?;
            let row = tx
                .query_one(
                    "INSERT INTO conversations (kind, name, created_by) VALUES ('group', $1, $2)
                     RETURNING id",
                    &[&name.as_str(), &user.id],
                )
                .timed("create_group")
                .await?;
            let id: i64 = row.get(0);
            tx.execute(
                "INSERT INTO conversation_participants (conversation_id, user_id)
                 SELECT $1, unnest($2::int8[])",
                &[&id, &members],
            )
            .timed("create_group_members")
            .await?;
            tx.commit().await?;
            (id, true)
        }
    };
    let view = load_view(&client, id).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)))
}

/// Finds or creates the direct conversation between `a` and `b`. Safe under
/// concurrency: the unique pair constraint lets exactly one insert win; the
/// loser's `ON CONFLICT DO NOTHING` waits for the winner to commit and then
/// reads its row.
async fn find_or_create_direct(
    client: &mut deadpool_postgres::Client,
    a: i64,
    b: i64,
) -> ApiResult<(i64, bool)> {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let tx = client.transaction().await?;
    let inserted = tx
        .query_opt(
            "INSERT INTO conversations (kind, created_by, direct_user_lo, direct_user_hi)
             VALUES ('direct', $1, $2, $3)
             ON CONFLICT (direct_user_lo, direct_user_hi) DO NOTHING
             RETURNING id",
            &[&a, &lo, &hi],
        )
        .timed("create_direct")
        .await?;
    let result = match inserted {
        Some(row) => {
            let id: i64 = row.get(0);
            tx.execute(
                "INSERT INTO conversation_participants (conversation_id, user_id)
                 VALUES ($1, $2), ($1, $3)",
                &[&id, &lo, &hi],
            )
            .timed("create_direct_members")
            .await?;
            (id, true)
        }
        None => {
            let row = tx
                .query_one(
                    "SELECT id FROM conversations WHERE direct_user_lo = $1 AND direct_user_hi = $2",
                    &[&lo, &hi],
                )
                .timed("find_direct").await?;
            (row.get(0), false)
        }
    };
    tx.commit().await?;
    Ok(result)
}

/// The conversation with its participants.
async fn load_view(client: &impl GenericClient, id: i64) -> ApiResult<ConversationView> {
    let conv = client
        .query_opt(
            "SELECT id, kind, name, created_by, created_at, updated_at, last_seq
             FROM conversations WHERE id = $1",
            &[&id],
        )
        .timed("conversation_view")
        .await?
        .ok_or(ApiError::NotFound("conversation"))?;
    let rows = client
        .query(
            "SELECT u.id, u.full_name, u.role, p.joined_at, p.delivered_seq, p.read_seq
             FROM conversation_participants p JOIN users u ON u.id = p.user_id
             WHERE p.conversation_id = $1 ORDER BY p.joined_at, u.id",
            &[&id],
        )
        .timed("conversation_participants")
        .await?;
    let participants = rows
        .iter()
        .map(|r| {
            Ok(ParticipantView {
                user_id: r.get(0),
                full_name: r.get(1),
                role: Role::parse(r.get(2)).map_err(|e| ApiError::Internal(e.into()))?,
                joined_at: r.get(3),
                delivered_seq: r.get(4),
                read_seq: r.get(5),
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(ConversationView {
        id: conv.get(0),
        kind: ConversationKind::from_db(conv.get(1))?,
        name: conv.get(2),
        created_by: conv.get(3),
        created_at: conv.get(4),
        updated_at: conv.get(5),
        last_seq: conv.get(6),
        participants,
    })
}

/// GET /api/v1/chat/conversations/{id}
#[utoipa::path(
    get,
    path = "/api/v1/chat/conversations/{id}",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Conversation id")),
    responses(
        (status = 200, description = "Participants and the latest 50 messages", body = ConversationDetail),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 403, description = "Not a participant", body = ErrorBody),
        (status = 404, description = "No such conversation", body = ErrorBody),
    )
)]
async fn get_conversation(
    user: AuthUser,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<ConversationDetail>> {
    let client = state.pool.get().await?;
    let access = store::conversation_access(&client, id, user.id).await?;
    let conversation = load_view(&client, id).await?;
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1
             ORDER BY seq DESC LIMIT $2"
        ))
        .await?;
    let rows = client
        .query(&stmt, &[&id, &(LATEST_MESSAGES + 1)])
        .timed("conversation_latest_messages")
        .await?;
    let has_more = rows.len() as i64 > LATEST_MESSAGES;
    let rows = &rows[..rows.len().min(LATEST_MESSAGES as usize)];
    let mut messages: Vec<MessageView> =
        store::message_views(&client, rows, &access.members, &state.media, Some(user.id)).await?;
    messages.reverse();
    Ok(Json(ConversationDetail {
        conversation,
        messages,
        has_more,
    }))
}

/// PATCH /api/v1/chat/conversations/{id}
///
/// Renames a group. The same rights as changing its members: its creator
/// while a member, or an admin. Bumps `updated_at`. Through the edge,
/// every member's connections then get `conversation_changed`.
#[utoipa::path(
    patch,
    path = "/api/v1/chat/conversations/{id}",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Conversation id")),
    request_body = RenameConversation,
    responses(
        (status = 200, description = "Renamed; the conversation as it is now", body = ConversationView),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 403, description = "Not the group's creator (while a member) or an admin (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such conversation (`not_found`)", body = ErrorBody),
        (status = 422, description = "A direct conversation (`validation_failed`), or a blank, too long or control-character name (`empty_field`, `too_long`, `invalid_field`)", body = ErrorBody),
    )
)]
async fn rename_conversation(
    user: AuthUser,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<RenameConversation>,
) -> ApiResult<Json<ConversationView>> {
    let name = group_name(&req.name)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    // Lock the conversation so the rights check and the write see one
    // state (a concurrent removal of the creator cannot slip between).
    tx.execute(
        "SELECT 1 FROM conversations WHERE id = $1 FOR NO KEY UPDATE",
        &[&id],
    )
    .timed("conversation_lock")
    .await?;
    check_manage(&tx, id, &user, Change::Name).await?;
    tx.execute(
        "UPDATE conversations SET name = $2, updated_at = now() WHERE id = $1",
        &[&id, &name.as_str()],
    )
    .timed("rename_group")
    .await?;
    tx.commit().await?;
    Ok(Json(load_view(&client, id).await?))
}

/// What a caller wants to change in a group (see [`check_manage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Add or remove members other than (only) themselves.
    Members,
    /// Remove only themselves: any member may.
    Leave,
    /// The group's name.
    Name,
}

/// Checks that `user` may make `change` to group `id`. Rights come from
/// *current* membership: the creator manages the group only while a
/// member (one who left cannot remove anyone, rename it or add themselves
/// back), any member may leave, and a platform admin moderates any group,
/// member or not. Call it inside the transaction that makes the change,
/// after locking the conversation, so a concurrent change cannot slip
/// between the check and the write.
async fn check_manage(
    client: &impl GenericClient,
    id: i64,
    user: &AuthUser,
    change: Change,
) -> ApiResult<store::Access> {
    let access = store::conversation_members(client, id).await?;
    let is_member = access.members.iter().any(|m| m.user_id == user.id);
    let may_manage = user.role == Role::Admin || (is_member && access.created_by == user.id);
    if !(may_manage || change == Change::Leave && is_member) {
        return Err(if !is_member {
            ApiError::Forbidden("you are not a participant of this conversation")
        } else if change == Change::Name {
            ApiError::Forbidden("only the group's creator or an admin may rename it")
        } else {
            ApiError::Forbidden("only the group's creator or an admin may change its members")
        });
    }
    if access.kind != "group" {
        return Err(ApiError::invalid(if change == Change::Name {
            "a direct conversation has no name to change"
        } else {
            "a direct conversation's participants cannot change"
        }));
    }
    Ok(access)
}

fn checked_ids(change: ParticipantsChange) -> ApiResult<Vec<i64>> {
    let mut ids = change.user_ids;
    if ids.is_empty() {
        return Err(ApiError::invalid("user_ids must not be empty"));
    }
    if ids.iter().any(|&id| id < 1) {
        return Err(ApiError::invalid("user ids are positive"));
    }
    // The list as sent is bounded (the schema's maxItems), duplicates or not.
    if ids.len() > MAX_GROUP_MEMBERS {
        return Err(ApiError::invalid(format!(
            "user_ids holds at most {MAX_GROUP_MEMBERS} ids"
        )));
    }
    ids.sort_unstable();
    ids.dedup();
    if ids.len() > MAX_GROUP_MEMBERS {
        return Err(ApiError::invalid(format!(
            "a group has at most {MAX_GROUP_MEMBERS} members"
        )));
    }
    Ok(ids)
}

/// POST /api/v1/chat/conversations/{id}/participants
#[utoipa::path(
    post,
    path = "/api/v1/chat/conversations/{id}/participants",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Conversation id")),
    request_body = ParticipantsChange,
    responses(
        (status = 200, description = "Members added; the conversation as it is now", body = ConversationView),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 403, description = "Not the group's creator (while a member) or an admin", body = ErrorBody),
        (status = 404, description = "No such conversation", body = ErrorBody),
        (status = 422, description = "Not a group, or unknown users", body = ErrorBody),
    )
)]
async fn add_participants(
    user: AuthUser,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(change): ApiJson<ParticipantsChange>,
) -> ApiResult<Json<ConversationView>> {
    let ids = checked_ids(change)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    // Lock the conversation so the rights check, the size check and the
    // insert see one state.
    tx.execute(
        "SELECT 1 FROM conversations WHERE id = $1 FOR NO KEY UPDATE",
        &[&id],
    )
    .timed("conversation_lock")
    .await?;
    check_manage(&tx, id, &user, Change::Members).await?;
    let unknown = store::unknown_users(&tx, &ids).await?;
    if !unknown.is_empty() {
        return Err(ApiError::invalid(format!("unknown users {unknown:?}")));
    }
    // Size after the insert: current members plus the new ones.
    let size_after: i64 = tx
        .query_one(
            "SELECT count(*) FROM (
                 SELECT user_id FROM conversation_participants WHERE conversation_id = $1
                 UNION SELECT unnest($2::int8[])) members",
            &[&id, &ids],
        )
        .timed("group_size_after")
        .await?
        .get(0);
    if size_after > MAX_GROUP_MEMBERS as i64 {
        return Err(ApiError::invalid(format!(
            "a group has at most {MAX_GROUP_MEMBERS} members"
        )));
    }
    // New members start caught up: history is readable, but it is not unread.
    // A trigger records the membership period and bumps members_version.
    let added = tx
        .execute(
            "INSERT INTO conversation_participants (conversation_id, user_id, delivered_seq, read_seq)
             SELECT c.id, u, c.last_seq, c.last_seq FROM conversations c, unnest($2::int8[]) u
             WHERE c.id = $1
             ON CONFLICT (conversation_id, user_id) DO NOTHING",
            &[&id, &ids],
        )
        .timed("add_members").await?;
    tx.execute(
        "UPDATE conversations SET updated_at = now() WHERE id = $1",
        &[&id],
    )
    .timed("touch_conversation")
    .await?;
    tx.commit().await?;
    if added > 0 {
        state.edge.members_changed(id);
    }
    Ok(Json(load_view(&client, id).await?))
}

/// DELETE /api/v1/chat/conversations/{id}/participants
#[utoipa::path(
    delete,
    path = "/api/v1/chat/conversations/{id}/participants",
    tag = "conversations",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "Conversation id")),
    request_body = ParticipantsChange,
    responses(
        (status = 200, description = "Members removed; the conversation as it is now", body = ConversationView),
        (status = 401, description = "No or bad token", body = ErrorBody),
        (status = 403, description = "Not the group's creator (while a member) or an admin; any member may remove themselves", body = ErrorBody),
        (status = 404, description = "No such conversation", body = ErrorBody),
        (status = 422, description = "Not a group", body = ErrorBody),
    )
)]
async fn remove_participants(
    user: AuthUser,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(change): ApiJson<ParticipantsChange>,
) -> ApiResult<Json<ConversationView>> {
    let ids = checked_ids(change)?;
    let change = if ids == [user.id] {
        Change::Leave
    } else {
        Change::Members
    };
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT 1 FROM conversations WHERE id = $1 FOR NO KEY UPDATE",
        &[&id],
    )
    .timed("conversation_lock")
    .await?;
    check_manage(&tx, id, &user, change).await?;
    // A trigger closes the membership periods and bumps members_version.
    let removed = tx
        .execute(
            "DELETE FROM conversation_participants WHERE conversation_id = $1 AND user_id = ANY($2)",
            &[&id, &ids],
        )
        .timed("remove_members").await?;
    tx.commit().await?;
    if removed > 0 {
        state.edge.members_changed(id);
    }
    Ok(Json(load_view(&client, id).await?))
}
