//! The JSON on the wire.
//!
//! WebSocket frames and SSE `data:` lines carry the same objects, in the
//! seed's shapes, so a client written for the seed keeps working. Fields were
//! only ever added, never renamed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A frame from a client. Field values are raw here; the room validates them
/// so that each failure gets its own error code (and 1009 for oversize
/// content) instead of one generic "malformed".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Message {
        conversation_id: i64,
        /// May be empty (or absent) when the message carries attachments.
        #[serde(default)]
        content: String,
        /// The sender's idempotency key. Optional for seed compatibility; a
        /// frame without one cannot be deduplicated on resend.
        #[serde(default)]
        client_msg_id: Option<String>,
        /// Attachments the sender uploaded to this conversation
        /// (`POST …/attachments`) and has not sent yet; at most
        /// [`crate::media::MAX_ATTACHMENTS_PER_MESSAGE`].
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        attachment_ids: Vec<Uuid>,
        /// The message this one answers (its `id`), in this conversation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<Uuid>,
        /// Users the message mentions; the room keeps only members.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        mentions: Vec<i64>,
    },
    /// The sender rewrites their message (within the edit window).
    Edit {
        conversation_id: i64,
        message_id: Uuid,
        content: String,
        #[serde(default)]
        client_msg_id: Option<String>,
    },
    /// Erases a message: its sender, or a group's creator or an admin.
    Delete {
        conversation_id: i64,
        message_id: Uuid,
        #[serde(default)]
        client_msg_id: Option<String>,
    },
    /// Adds (`on`, the default) or takes back one emoji on a message.
    React {
        conversation_id: i64,
        message_id: Uuid,
        emoji: String,
        #[serde(default = "yes")]
        on: bool,
        #[serde(default)]
        client_msg_id: Option<String>,
    },
    Typing {
        conversation_id: i64,
    },
    Read {
        conversation_id: i64,
        seq: i64,
    },
    /// Application-level keepalive for clients that cannot send WS pings
    /// (browsers). Answered with [`ServerFrame::Pong`].
    Ping,
    /// Renews the connection with a fresh session token before the one it
    /// was opened with expires. Answered with [`ServerFrame::AuthOk`], or an
    /// `error`; a connection whose token runs out without renewal gets an
    /// `error` with code `token_expired` and is closed (1008).
    Auth {
        token: String,
    },
    /// The answer to the server's [`ServerFrame::Ping`]: proves the client
    /// has read every frame sent before that ping.
    Pong {
        n: u64,
    },
    /// Only on the always-on connection: "I hold every message up to this
    /// seq in these conversations" (conversation id → seq, 0 for none). The
    /// user's object replays what follows each (or `resync`), keeps the
    /// live stream of those conversations flowing after it without a gap or
    /// a duplicate, and answers `resumed`. See `docs/PROTOCOL.md`.
    Resume {
        #[serde(deserialize_with = "conversation_keys")]
        since: std::collections::BTreeMap<i64, i64>,
    },
}

fn yes() -> bool {
    true
}

/// A JSON object keyed by conversation id (JSON keys are strings).
fn conversation_keys<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<i64, i64>, D::Error> {
    let raw = std::collections::BTreeMap::<String, i64>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            k.parse::<i64>()
                .map(|k| (k, v))
                .map_err(|_| serde::de::Error::custom("a key is not a conversation id"))
        })
        .collect()
}

/// Delivery status of a message, derived from the other members'
/// watermarks (see [`crate::receipts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Sent,
    Delivered,
    Read,
}

/// A message as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MessageView {
    /// Stable from edge to origin (UUIDv7, minted by the room).
    pub id: Uuid,
    /// Position in the conversation's total order: 1, 2, 3… with no gaps.
    pub seq: i64,
    pub conversation_id: i64,
    pub sender_id: i64,
    pub content: String,
    pub status: MessageStatus,
    pub created_at: DateTime<Utc>,
    pub client_msg_id: String,
    /// In the order the sender listed them. Absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<crate::media::AttachmentView>,
    /// When the sender last edited it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<DateTime<Utc>>,
    /// When it was deleted: the content is `""` and attachments,
    /// reactions, mentions and the quote are gone (a tombstone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<DateTime<Utc>>,
    /// Summed per emoji, in the order each was first used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<ReactionView>,
    /// The message this one answers, as it reads now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyPreview>,
    /// Users the message mentions (members when it was sent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<i64>,
}

/// One emoji's reactions on a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReactionView {
    pub emoji: String,
    pub count: i64,
    /// Whether the reader is among them.
    #[serde(default)]
    pub me: bool,
    /// Who reacted, oldest first.
    #[serde(default)]
    pub user_ids: Vec<i64>,
}

/// The quoted message of a reply, read when the reply is shown (never a
/// stored copy: a deleted original shows as deleted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReplyPreview {
    pub id: Uuid,
    pub seq: i64,
    pub sender_id: i64,
    /// At most [`PREVIEW_CHARS`] characters; empty when deleted or when
    /// the room no longer holds the original (history has it).
    #[serde(default)]
    pub content: String,
    #[serde(default)]
    pub deleted: bool,
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Message {
        message: MessageView,
    },
    Typing {
        conversation_id: i64,
        user_id: i64,
    },
    Presence {
        user_id: i64,
        is_online: bool,
        last_seen: Option<DateTime<Utc>>,
    },
    /// Sent once on a new always-on connection: which of the user's
    /// contacts are online right now.
    /// Later changes arrive as `presence` frames.
    PresenceSnapshot {
        online: Vec<i64>,
    },
    /// The sender's message is durable. Sent for a resend too, with the
    /// original `seq` and `id`.
    Ack {
        client_msg_id: String,
        seq: i64,
        id: Uuid,
        conversation_id: i64,
    },
    Receipt {
        conversation_id: i64,
        user_id: i64,
        delivered_seq: i64,
        read_seq: i64,
    },
    /// The requested resume point is older than the room's replay window:
    /// reload from REST (`after_seq=from_seq - 1`) and reconnect.
    Resync {
        conversation_id: i64,
        from_seq: i64,
    },
    /// Something about the conversation changed (a room's notice, on the
    /// user's always-on connection).
    ConversationUpdated {
        conversation_id: i64,
        seq: i64,
        last_message: Option<MessagePreview>,
        unread_count: i64,
        /// Unread messages that mention the user.
        #[serde(default)]
        unread_mentions: i64,
    },
    /// A message was edited (event `seq`; the message is `message_seq`).
    MessageEdited {
        conversation_id: i64,
        seq: i64,
        message_id: Uuid,
        message_seq: i64,
        user_id: i64,
        content: String,
        edited_at: DateTime<Utc>,
    },
    /// A message was erased; show a tombstone in its place.
    MessageDeleted {
        conversation_id: i64,
        seq: i64,
        message_id: Uuid,
        message_seq: i64,
        user_id: i64,
        deleted_at: DateTime<Utc>,
    },
    /// `user_id` added (`on`) or took back `emoji`; `count` is its total.
    Reaction {
        conversation_id: i64,
        seq: i64,
        message_id: Uuid,
        message_seq: i64,
        user_id: i64,
        emoji: String,
        on: bool,
        count: i64,
    },
    Error {
        code: String,
        message: String,
    },
    Pong,
    /// The connection's token was renewed (`{"type":"auth"}`).
    AuthOk,
    /// Sent when a lot has been sent to a connection without proof that the
    /// client reads it. Answer `{"type":"pong","n":n}`; a client that leaves
    /// too much unconfirmed is closed (it reconnects and resumes).
    Ping {
        n: u64,
    },
    /// The answer to `resume`: these conversations are live on this
    /// connection from where the client said it was (refused ones got an
    /// `error` frame each before this).
    Resumed {
        conversations: Vec<i64>,
    },
    /// On the user's always-on connection: the group's name or members
    /// changed (through the edge's `PATCH /api/v1/chat/conversations/{id}`
    /// or `POST|DELETE …/participants`), and the user is a member of it
    /// now (a member just added gets it too). Refetch the conversation
    /// (`GET /api/v1/chat/conversations/{id}`).
    ConversationChanged {
        conversation_id: i64,
    },
    /// On the user's always-on connection: the user is no longer a member
    /// of this conversation (removed, or left on another device). Drop it
    /// from the list; its room refuses them from now on.
    ConversationRemoved {
        conversation_id: i64,
    },
    /// An attachment of a message in this conversation changed: its
    /// thumbnail, dimensions or duration are ready, or processing failed.
    /// Replace the attachment with this id wherever it is shown; messages
    /// replayed or fetched later already carry the new state.
    AttachmentUpdated {
        attachment: crate::media::AttachmentView,
    },
}

impl ServerFrame {
    /// `(conversation, seq)` of a frame in a conversation's order: a
    /// message or a change to one. Clients keep the highest they hold.
    pub fn sequenced(&self) -> Option<(i64, i64)> {
        match self {
            ServerFrame::Message { message } => Some((message.conversation_id, message.seq)),
            ServerFrame::MessageEdited {
                conversation_id,
                seq,
                ..
            }
            | ServerFrame::MessageDeleted {
                conversation_id,
                seq,
                ..
            }
            | ServerFrame::Reaction {
                conversation_id,
                seq,
                ..
            } => Some((*conversation_id, *seq)),
            _ => None,
        }
    }
}

/// The short form of a message for conversation lists and notifications.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MessagePreview {
    pub id: Uuid,
    pub seq: i64,
    pub sender_id: i64,
    /// At most [`PREVIEW_CHARS`] characters of the content.
    pub content: String,
    pub created_at: DateTime<Utc>,
}

/// Length of a [`MessagePreview`]'s content.
pub const PREVIEW_CHARS: usize = 120;

/// Cuts `content` to a preview, on a character boundary.
pub fn preview_text(content: &str) -> String {
    match content.char_indices().nth(PREVIEW_CHARS) {
        Some((idx, _)) => format!("{}…", &content[..idx]),
        None => content.to_owned(),
    }
}

/// The edge ⇄ origin internal API. Every call carries
/// [`SERVICE_SECRET_HEADER`].
pub mod internal {
    use super::*;

    /// Header that carries the shared service secret.
    pub const SERVICE_SECRET_HEADER: &str = "x-vibe-service-secret";
    /// Header in which the edge forwards the caller's IP address on proxied
    /// requests. The origin believes it only next to a valid
    /// [`SERVICE_SECRET_HEADER`]; otherwise it uses the TCP peer address.
    pub const CLIENT_IP_HEADER: &str = "x-vibe-client-ip";
    /// Largest batch the origin ingests in one call.
    pub const MAX_INGEST_BATCH: usize = 1_000;

    /// A message as the room stored it, on its way to PostgreSQL.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct StoredMessage {
        pub id: Uuid,
        pub conversation_id: i64,
        pub seq: i64,
        pub sender_id: i64,
        pub content: String,
        pub created_at: DateTime<Utc>,
        pub client_msg_id: String,
        /// The attachments the message carries, in order. The origin links
        /// them to the message in the same transaction.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub attachment_ids: Vec<Uuid>,
        /// The message this one answers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reply_to: Option<Uuid>,
        /// Users it mentions (members, checked by the room).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub mentions: Vec<i64>,
        /// Present when this entry is not a message but a change to one (an
        /// edit, a delete, a reaction): it holds the seq, `id`, `sender_id`
        /// (the actor), `created_at` and `client_msg_id` of the event;
        /// `content` is empty and the origin stores no message row for it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub change: Option<StoredChange>,
        /// Set when the message was deleted before it reached the origin:
        /// it arrives as a tombstone (empty content, no mentions, no
        /// quote), and its delete follows in the log.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub deleted_at: Option<DateTime<Utc>>,
        /// The `x-request-id` of the request (or socket frame) that sent
        /// it, so its ingest can be found in the origin's logs. Never
        /// stored in PostgreSQL.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub request_id: Option<String>,
    }

    /// A change to an earlier message, as the room sequenced it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct StoredChange {
        /// The changed message's `id`.
        pub target_id: Uuid,
        #[serde(flatten)]
        pub change: Change,
    }

    /// What a change does.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    pub enum Change {
        /// The message's content becomes this (the latest edit by seq wins).
        Edit { content: String },
        /// The message is erased, for good.
        Delete,
        /// The actor's `emoji` is on or off (the latest by seq wins).
        React { emoji: String, on: bool },
    }

    /// `POST /internal/v1/attachments`: the edge reserves an upload before a
    /// byte reaches the bucket, so the bucket never holds an object the
    /// database does not know. The origin checks membership, the kind's
    /// size limit and the uploader's daily quota, and answers 201
    /// [`Reserved`] or a typed error (403 `forbidden`, 413 `too_large` /
    /// `quota_exceeded`) the edge passes on.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ReserveAttachment {
        pub conversation_id: i64,
        pub uploader_id: i64,
        pub kind: crate::media::MediaKind,
        pub mime: String,
        /// The upload's declared length (`Content-Length`), which the edge
        /// enforces while streaming.
        pub size: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        /// The recorder's own measure of a voice message, used when the
        /// container does not say (MediaRecorder's WebM has no duration).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub duration_ms: Option<i64>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Reserved {
        pub id: Uuid,
    }

    /// `POST /internal/v1/attachments/{id}/commit`: the object is in the
    /// bucket. The origin answers 200 with the [`crate::media::AttachmentMeta`]
    /// and queues processing. `DELETE /internal/v1/attachments/{id}` drops
    /// a reservation whose upload failed.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CommitAttachment {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub width: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub height: Option<i32>,
    }

    /// Edge `POST /api/v1/internal/rooms/{id}/attachments/reap`: the
    /// origin's cleanup offers uploads it holds as unsent for a day. The
    /// room refuses to attach them from now on, deletes their objects from
    /// the bucket, and answers which ones it let go (those not attached to
    /// a message, including ones it never heard of); the origin deletes
    /// exactly those rows.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ReapAttachments {
        pub ids: Vec<Uuid>,
    }

    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Reaped {
        pub reaped: Vec<Uuid>,
    }

    /// `POST /internal/v1/messages/batch`
    ///
    /// Messages, watermarks, or both, applied in one transaction: a 200
    /// answer means the messages listed as `stored` are in PostgreSQL and
    /// every receipt was applied (watermarks only move forward; receipts of
    /// users who are not members change nothing). `messages` may be empty.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct IngestBatch {
        pub messages: Vec<StoredMessage>,
        /// The room's watermarks, as `POST /internal/v1/receipts` takes
        /// them, so one request per flush carries both. Absent from an edge
        /// that predates it (it posts them to `/internal/v1/receipts`,
        /// which still works). A negative watermark refuses the whole
        /// batch (422), before anything is written.
        #[serde(default)]
        pub receipts: Vec<ReceiptUpdate>,
        /// The room's figures, when a report is due as the batch leaves
        /// (see [`crate::metrics`]). The origin applies it before the
        /// batch, whatever the batch's fate, so a failing ingest is seen.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub report: Option<crate::metrics::EdgeReport>,
    }

    /// What the origin holds after an ingest call. An id is in `stored` when
    /// PostgreSQL has that exact message (now or from an earlier call); the
    /// edge may then drop it from its outbox.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct IngestResult {
        pub stored: Vec<Uuid>,
        /// Messages that can never be stored (a different message already
        /// holds the seq, an unknown conversation, a sender who was not a
        /// member when it was sent: `not_member`…). Retrying will not help.
        pub rejected: Vec<IngestRejection>,
        /// The current `members_version` of every existing conversation in
        /// the batch (named by its messages or its receipts). A room whose
        /// cached version differs refetches its members. Empty from an
        /// origin that predates it.
        #[serde(default)]
        pub members_versions: Vec<ConversationVersion>,
    }

    /// A conversation's member-list version: bumped in the same transaction
    /// as every change to its members, by whatever route made it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ConversationVersion {
        pub conversation_id: i64,
        pub members_version: i64,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct IngestRejection {
        pub id: Uuid,
        pub code: String,
        pub message: String,
    }

    /// `GET /internal/v1/conversations/{id}/members`
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ConversationMembers {
        pub conversation_id: i64,
        pub kind: String,
        /// Highest seq PostgreSQL holds; a room with empty storage starts
        /// after it.
        pub last_seq: i64,
        pub members: Vec<MemberWatermark>,
        /// Version of this member list (see [`ConversationVersion`]); 0 from
        /// an origin that predates it.
        #[serde(default)]
        pub members_version: i64,
        /// Members who may delete anyone's message: a group's creator (while
        /// a member) and members whose role is `admin`. Empty for a direct
        /// conversation and from an origin that predates it.
        #[serde(default)]
        pub moderators: Vec<i64>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MemberWatermark {
        pub user_id: i64,
        pub delivered_seq: i64,
        pub read_seq: i64,
    }

    /// What a room tells the per-user layer: a conversation changed, and
    /// each recipient's unread count. Between Durable Objects only.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ConversationNotice {
        pub conversation_id: i64,
        pub seq: i64,
        /// The `seq` of the room's previous notice: a User object that is
        /// not subscribed to the room subscribes from here, so its user
        /// gets every message since the room last told them anything.
        #[serde(default)]
        pub prev_seq: i64,
        pub last_message: Option<MessagePreview>,
        /// (user, unread count): only these users are told.
        pub recipients: Vec<(i64, i64)>,
        /// (user, unread mentions) for the recipients who have any.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub mentions: Vec<(i64, i64)>,
    }

    /// What the Worker tells a member's `User` object after a change to a
    /// group went through it (a rename, members added or removed). Between
    /// the Worker and Durable Objects only.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ConversationChange {
        pub conversation_id: i64,
        /// The user is no longer a member (`conversation_removed`); else
        /// they are one and the group changed (`conversation_changed`).
        pub removed: bool,
        /// The members changed (not only the name): the user's contacts
        /// may have changed with them.
        pub members: bool,
    }

    /// `POST /internal/v1/presence`
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct PresenceBatch {
        pub updates: Vec<PresenceUpdate>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct PresenceUpdate {
        pub user_id: i64,
        pub is_online: bool,
        pub last_seen: DateTime<Utc>,
    }

    /// `GET /internal/v1/users/{id}/contacts`: what a `User` object loads.
    /// The user's own presence as the origin last heard it, and everyone
    /// they share a conversation with now, with their presence.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct UserContacts {
        pub user_id: i64,
        pub is_online: bool,
        pub contacts: Vec<ContactPresence>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ContactPresence {
        pub user_id: i64,
        pub is_online: bool,
        pub last_seen: Option<DateTime<Utc>>,
    }

    /// `POST /internal/v1/receipts`. Watermarks only move forward.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ReceiptBatch {
        pub receipts: Vec<ReceiptUpdate>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ReceiptUpdate {
        pub conversation_id: i64,
        pub user_id: i64,
        pub delivered_seq: i64,
        pub read_seq: i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_client_frames_parse() {
        let f: ClientFrame = serde_json::from_str(
            r#"{"type":"message","conversation_id":1,"content":"Hello!","client_msg_id":"abc"}"#,
        )
        .expect("parse");
        assert_eq!(
            f,
            ClientFrame::Message {
                conversation_id: 1,
                content: "Hello!".into(),
                client_msg_id: Some("abc".into()),
                attachment_ids: Vec::new(),
                reply_to: None,
                mentions: Vec::new(),
            }
        );
        let f: ClientFrame =
            serde_json::from_str(r#"{"type":"read","conversation_id":1,"seq":42}"#).expect("parse");
        assert_eq!(
            f,
            ClientFrame::Read {
                conversation_id: 1,
                seq: 42
            }
        );
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"dance"}"#).is_err());
    }

    #[test]
    fn server_frames_have_the_seed_shape() {
        let v = serde_json::to_value(ServerFrame::Typing {
            conversation_id: 1,
            user_id: 5,
        })
        .expect("json");
        assert_eq!(
            v,
            serde_json::json!({"type":"typing","conversation_id":1,"user_id":5})
        );
        let v = serde_json::to_value(ServerFrame::Resync {
            conversation_id: 1,
            from_seq: 3,
        })
        .expect("json");
        assert_eq!(
            v,
            serde_json::json!({"type":"resync","conversation_id":1,"from_seq":3})
        );
    }

    #[test]
    fn group_change_frames_name_only_the_conversation() {
        let v = serde_json::to_value(ServerFrame::ConversationChanged { conversation_id: 7 })
            .expect("json");
        assert_eq!(
            v,
            serde_json::json!({"type":"conversation_changed","conversation_id":7})
        );
        let v = serde_json::to_value(ServerFrame::ConversationRemoved { conversation_id: 7 })
            .expect("json");
        assert_eq!(
            v,
            serde_json::json!({"type":"conversation_removed","conversation_id":7})
        );
    }

    #[test]
    fn internal_answers_from_an_older_origin_still_parse() {
        let r: internal::IngestResult =
            serde_json::from_str(r#"{"stored":[],"rejected":[]}"#).expect("parse");
        assert!(r.members_versions.is_empty());
        let m: internal::ConversationMembers = serde_json::from_str(
            r#"{"conversation_id":1,"kind":"group","last_seq":3,"members":[]}"#,
        )
        .expect("parse");
        assert_eq!(m.members_version, 0);
    }

    #[test]
    fn an_ingest_batch_from_an_older_edge_parses_with_no_receipts() {
        let b: internal::IngestBatch = serde_json::from_str(r#"{"messages":[]}"#).expect("parse");
        assert!(b.messages.is_empty());
        assert!(b.receipts.is_empty());
    }

    #[test]
    fn an_ingest_batch_carries_receipts_in_the_receipt_route_shape() {
        let b = internal::IngestBatch {
            messages: Vec::new(),
            receipts: vec![internal::ReceiptUpdate {
                conversation_id: 7,
                user_id: 3,
                delivered_seq: 9,
                read_seq: 8,
            }],
            report: None,
        };
        let v = serde_json::to_value(&b).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"messages": [], "receipts": [
                {"conversation_id": 7, "user_id": 3, "delivered_seq": 9, "read_seq": 8}
            ]})
        );
        let back: internal::IngestBatch = serde_json::from_value(v).expect("parse");
        assert_eq!(back, b);
    }

    #[test]
    fn previews_cut_on_a_character_boundary() {
        let long = "ü".repeat(PREVIEW_CHARS + 5);
        let p = preview_text(&long);
        assert_eq!(p.chars().count(), PREVIEW_CHARS + 1);
        assert!(p.ends_with('…'));
        assert_eq!(preview_text("short"), "short");
    }
}
