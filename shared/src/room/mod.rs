//! The room: one conversation's live state, as a sans-IO state machine.
//!
//! Modelled on quinn-proto: no sockets, no clock, no storage. A driver (the
//! Room Durable Object, the simulator in the tests, the benchmark) feeds
//! events in through `handle_*(now, …)` and drains what the room wants done
//! through [`Room::poll_output`] (with [`drain`]), [`Room::poll_timeout`]
//! and [`Room::poll_flush`].
//!
//! What the room decides, each part in its own module with its own tests:
//! - [`window`]: the total order (each accepted message gets the next
//!   `seq`), the replay window, resume or `resync`, and which messages the
//!   origin lacks;
//! - [`outbox`]: when to send the origin what it lacks: coalesced under
//!   light load, pipelined under heavy load, backing off after failures;
//! - [`idempotency`]: a resend with a known `(sender, client_msg_id)`
//!   returns the original message and stores nothing, however old the key;
//! - [`members`]: membership, read/delivered watermarks, which of them the
//!   origin lacks, and the `receipt` frames (coalesced per user);
//! - [`conns`]: the live connections and when their tokens run out;
//! - [`typing`]: at most one relay per user per 2 s, forgotten after 5 s,
//!   cleared by that user's next message;
//! - [`rate`]: a per-user token bucket every frame draws on;
//! - [`notices`]: coalesced "conversation updated" notices for the
//!   per-user layer.
//!
//! # The contract with a driver
//!
//! - **Restore first.** Build the room with [`Room::load`] from durable
//!   storage (or [`Room::new`] + [`Room::set_members`] in tests), then
//!   reattach the connections that survived ([`Room::handle_reattach`]),
//!   before any other event.
//! - **Drain after every call.** After every `handle_*`, `submit`,
//!   `set_members`, `poll_flush` or flush answer, execute the queued outputs
//!   with [`drain`], in order, before the next event. An [`Output::Store`]
//!   always precedes the `ack` and the broadcast of the same message, so a
//!   driver that writes before it sends never acknowledges a message that is
//!   not durable; a batch from [`Room::poll_flush`] may leave only once the
//!   watermarks it carries are written.
//! - **A failed write ends this `Room`.** [`drain`] stops at it and drops
//!   the rest: memory is now ahead of storage, so the driver discards this
//!   value and loads a new one. The client whose event failed gets a
//!   `storage_unavailable` error and may resend (idempotently).
//! - **One monotonic clock.** `now` never goes back between calls (the
//!   driver's wall clock, or the simulator's virtual one).
//! - **One timer.** Keep it at [`Room::poll_timeout`]; when it fires, call
//!   [`Room::handle_timeout`] and then [`Room::poll_flush`] until it says
//!   no. Every batch is answered with [`Room::handle_flush_result`] or
//!   [`Room::handle_flush_failure`]; several may be in flight and their
//!   answers may come in any order (or never, after a restart).
//! - **Send only to whom the room names.** [`drain`] resolves each frame's
//!   [`Target`] against the room's own connections ([`Recipients`]); the
//!   driver's registry of sockets is not consulted.
//! - Reads the room needs synchronously (an idempotency key older than its
//!   memory, a token verification) go through the [`Context`] the driver
//!   passes in.

mod conns;
mod driver;
mod idempotency;
pub mod lifecycle;
mod members;
mod notices;
mod outbox;
mod rate;
mod storage;
mod typing;
mod window;

#[cfg(test)]
mod change_tests;

pub use driver::{Driver, Recipients, WriteFailed, drain};
pub use outbox::OutboxConfig;
pub use rate::cost;
pub use storage::{
    Claim, Context, KnownKey, PendingAttachment, Restore, RestoreError, RoomStorage, StorageFailed,
    StoredWatermark, Verified,
};
pub use window::BatchId;

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use crate::conn::{ConnId, Millis};

use crate::auth::AuthError;
use crate::bucket::Rate;
use crate::domain::{ClientMsgId, DomainError, MAX_FRAME_BYTES, MessageContent};
use crate::media::{AttachmentMeta, AttachmentView, MAX_ATTACHMENTS_PER_MESSAGE, MediaKind};
use crate::protocol::internal::{ConversationNotice, ReceiptUpdate, StoredChange, StoredMessage};
use crate::protocol::{
    ClientFrame, MessagePreview, MessageView, ReplyPreview, ServerFrame, preview_text,
};
use crate::receipts::{Watermark, status_of};

use conns::Conns;
use idempotency::KeyCache;
use lifecycle::{Change, ChangeRecord, MAX_MENTIONS, MessageState, Target as MessageRef};
use members::Members;
use notices::Notices;
use outbox::Outbox;
use rate::Limiter;
use typing::Typing;
use window::{Replay, Window};

/// WebSocket close codes the room asks for.
pub mod close {
    /// Policy violation: flood, removed from the conversation, bad token.
    pub const POLICY: u16 = 1008;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
}

/// Tunables. The defaults are the product's; tests and benchmarks change
/// them.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// Messages kept for replay on resume. Older resume points get `resync`.
    pub replay_window: usize,
    /// `(sender, client_msg_id)` keys cached in memory for idempotency.
    /// Older keys are answered from storage: idempotency has no horizon.
    pub dedup_horizon: usize,
    /// Unconfirmed messages held while the origin is unreachable. Past this,
    /// sends are refused (`backpressure`) instead of growing without bound.
    pub max_unflushed: usize,
    pub typing_interval_ms: u64,
    pub typing_ttl_ms: u64,
    /// Least time between two `receipt` broadcasts for one user.
    pub receipt_interval_ms: u64,
    /// Least time between two notices to the members' User objects (a busy room's
    /// messages are coalesced into one `conversation_updated` per member).
    pub notify_interval_ms: u64,
    /// Token bucket per user: burst size and refill rate (messages/s).
    pub rate_burst: u32,
    pub rate_per_sec: u32,
    /// Refused sends in a row (while the bucket is empty) before the
    /// connection is closed with 1008.
    pub flood_strikes: u32,
    /// How long the first waiting message waits for others to join its
    /// batch (light load: at most one request per this interval).
    pub flush_delay_ms: u64,
    /// Most messages in one batch (the origin takes up to 1,000).
    pub flush_batch: usize,
    /// Batches in flight at once (heavy load).
    pub flush_max_in_flight: usize,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// How long after sending its sender may edit a message.
    pub edit_window_ms: i64,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            replay_window: 1_000,
            dedup_horizon: 5_000,
            max_unflushed: 5_000,
            typing_interval_ms: 2_000,
            typing_ttl_ms: 5_000,
            receipt_interval_ms: 1_000,
            notify_interval_ms: 250,
            rate_burst: 30,
            rate_per_sec: 10,
            flood_strikes: 20,
            flush_delay_ms: 100,
            flush_batch: 1_000,
            flush_max_in_flight: 4,
            backoff_initial_ms: 500,
            backoff_max_ms: 10_000,
            edit_window_ms: 24 * 3_600_000,
        }
    }
}

impl RoomConfig {
    fn outbox(&self) -> OutboxConfig {
        OutboxConfig {
            flush_delay_ms: self.flush_delay_ms,
            flush_batch: self.flush_batch,
            max_in_flight: self.flush_max_in_flight,
            backoff_initial_ms: self.backoff_initial_ms,
            backoff_max_ms: self.backoff_max_ms,
        }
    }
}

/// How long after its upload an attachment may still be sent. The
/// origin's cleanup reaps unsent uploads after a day; the room refuses
/// them an hour earlier, and the reap itself asks the room (which refuses
/// from then on), so a message can never carry a deleted object.
pub const ATTACHMENT_SEND_WINDOW_MS: i64 = 23 * 3_600_000;

/// A message a member sends: text, attachments, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Draft {
    pub content: String,
    pub client_msg_id: Option<String>,
    pub attachment_ids: Vec<Uuid>,
    /// The message it answers.
    pub reply_to: Option<Uuid>,
    /// Users it mentions (only members are kept).
    pub mentions: Vec<i64>,
}

/// A message, or a change to one (`change`), as the room stores it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub id: Uuid,
    pub seq: i64,
    pub sender_id: i64,
    pub content: String,
    pub created_at_ms: i64,
    pub client_msg_id: String,
    /// Confirmed stored by the origin.
    pub flushed: bool,
    /// In the order the sender listed them.
    pub attachments: Vec<AttachmentMeta>,
    /// The message it answers; `content` is what the room read when it
    /// was sent, in memory only (storage keeps the id, seq and sender).
    pub reply_to: Option<ReplyPreview>,
    pub mentions: Vec<i64>,
    /// Edits, deletion and reactions so far (a message's).
    pub state: MessageState,
    /// Present on a change: this record is an event, not a message.
    pub change: Option<ChangeRecord>,
    /// The request that made it (see [`Context::request_id`]).
    pub request_id: Option<String>,
}

impl Record {
    pub fn created_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.created_at_ms).unwrap_or_default()
    }

    pub fn to_stored(&self, conversation_id: i64) -> StoredMessage {
        StoredMessage {
            id: self.id,
            conversation_id,
            seq: self.seq,
            sender_id: self.sender_id,
            content: self.content.clone(),
            created_at: self.created_at(),
            client_msg_id: self.client_msg_id.clone(),
            attachment_ids: self.attachments.iter().map(|a| a.id).collect(),
            reply_to: self.reply_to.as_ref().map(|r| r.id),
            mentions: self.mentions.clone(),
            change: self.change.as_ref().map(|c| StoredChange {
                target_id: c.target_id,
                change: c.change.clone(),
            }),
            deleted_at: self
                .state
                .deleted_at_ms
                .and_then(DateTime::from_timestamp_millis),
            request_id: self.request_id.clone(),
        }
    }

    /// A message, not a change to one.
    pub fn is_message(&self) -> bool {
        self.change.is_none()
    }

    /// What a change or a reply needs to know of this message.
    pub fn as_target(&self) -> MessageRef {
        MessageRef {
            id: self.id,
            seq: self.seq,
            sender_id: self.sender_id,
            created_at_ms: self.created_at_ms,
            state: self.state.clone(),
            preview: Some(self.preview()),
        }
    }

    /// The short text for lists and notices: the content, or what the
    /// message carries when it has none.
    pub fn preview(&self) -> String {
        if self.state.is_deleted() {
            return DELETED_PREVIEW.to_owned();
        }
        if !self.content.trim().is_empty() || self.attachments.is_empty() {
            return preview_text(&self.content);
        }
        attachment_summary(&self.attachments)
    }
}

/// How a deleted message reads in a list or a notice.
pub const DELETED_PREVIEW: &str = "Message deleted";

/// "Photo", "Voice message", "3 attachments": a message without text in a
/// list or a notification.
pub fn attachment_summary(attachments: &[AttachmentMeta]) -> String {
    let items: Vec<(MediaKind, Option<&str>)> = attachments
        .iter()
        .map(|a| (a.kind, a.name.as_deref()))
        .collect();
    summarize_attachments(&items)
}

/// [`attachment_summary`] from kinds and names alone (what a query reads).
pub fn summarize_attachments(items: &[(MediaKind, Option<&str>)]) -> String {
    match items {
        [] => String::new(),
        [(kind, name)] => match kind {
            MediaKind::Image => "📷 Photo".to_owned(),
            MediaKind::Video => "🎬 Video".to_owned(),
            MediaKind::Audio => "🎤 Voice message".to_owned(),
            MediaKind::File => format!("📄 {}", name.unwrap_or("File")),
        },
        many => format!("📎 {} attachments", many.len()),
    }
}

/// Who a frame goes to, among the room's own connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// This connection (also one the room just closed: its last words).
    Conn(ConnId),
    /// Every connection in the room.
    All,
    /// Every connection of every user but this one.
    OthersOf(i64),
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Write this message and its idempotency key durably before executing
    /// any later output.
    Store(Record),
    /// Write this change (a [`Record`] with `change`) and apply it to its
    /// target's stored row, which now has `state`; for a delete, erase the
    /// target's content, attachments (rows and objects), mentions, quote,
    /// and the content of earlier edits to it. Before any later output.
    StoreChange {
        event: Record,
        state: MessageState,
    },
    Send {
        to: Target,
        frame: ServerFrame,
    },
    Close {
        conn: ConnId,
        code: u16,
        reason: String,
    },
    /// Persist a member's watermarks, as not yet confirmed by the origin
    /// (read receipts survive restarts, and the origin is told after one).
    StoreWatermark(Watermark),
    /// The member list changed (from the origin): replace the stored one.
    ReplaceMembers(Vec<StoredWatermark>),
    /// The origin confirmed these messages; mark them so, and drop what
    /// the log no longer needs.
    MarkFlushed(Confirmed),
    /// The origin holds exactly these watermarks.
    MarkReceiptsSynced(Vec<Watermark>),
    /// Tell the per-user layer (best effort: the REST list is the truth).
    Notify(ConversationNotice),
    /// A live frame (`message`, `typing`, `receipt`) for these members'
    /// `User` objects, which relay it to their always-on connections. One
    /// request per member per event, in the room's order, no window.
    Forward {
        users: Vec<i64>,
        frame: ServerFrame,
    },
}

/// What one answer from the origin confirmed, for the driver's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    /// Exactly the newly confirmed seqs, as runs of consecutive seqs (one
    /// storage update per run).
    pub runs: Vec<RangeInclusive<i64>>,
    /// Every seq below this one is confirmed. Answers arrive out of order,
    /// so only rows below it may leave the log: a hole below an
    /// unconfirmed row would be a log the room cannot load. Carrying the
    /// bound here spares the driver an index over the unconfirmed rows.
    pub prefix_end: i64,
    /// The room's last seq, for the driver's retention.
    pub last_seq: i64,
}

/// Why the room refused something. Each maps to a WS `error` code, an HTTP
/// status and, for some, a WS close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("you are not a member of this conversation")]
    NotMember,
    #[error("frame is for conversation {0}, this is another")]
    WrongConversation(i64),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("{0}")]
    Invalid(DomainError),
    #[error("frame is larger than {MAX_FRAME_BYTES} bytes")]
    FrameTooLarge,
    #[error("too many messages; retry in {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
    #[error("the conversation is catching up with storage; retry shortly")]
    Backpressure,
    #[error("the conversation's storage failed; retry shortly")]
    Storage,
    #[error("{0}")]
    Auth(AuthError),
    /// An `attachment_ids` entry the room cannot attach.
    #[error("{0}")]
    Attachment(String),
    #[error("the token is for another user")]
    AuthWrongUser,
    #[error("no such message in this conversation")]
    MessageNotFound,
    #[error("the message was deleted")]
    MessageDeleted,
    #[error("a message can be edited only within the edit window after sending")]
    EditWindowPassed,
    #[error("{0}")]
    NotAllowed(&'static str),
    #[error("a reaction is exactly one emoji")]
    InvalidEmoji,
    #[error(
        "a message carries at most {} distinct reactions",
        lifecycle::MAX_REACTIONS_PER_MESSAGE
    )]
    TooManyReactions,
}

impl RoomError {
    pub fn code(&self) -> &'static str {
        match self {
            RoomError::NotMember => "forbidden",
            RoomError::WrongConversation(_) => "wrong_conversation",
            RoomError::Malformed(_) => "invalid_json",
            RoomError::UnknownType(_) => "unknown_type",
            RoomError::Invalid(e) => e.code(),
            RoomError::FrameTooLarge => "frame_too_large",
            RoomError::RateLimited { .. } => "rate_limited",
            RoomError::Backpressure => "backpressure",
            RoomError::Storage => "storage_unavailable",
            RoomError::Auth(e) => e.code(),
            RoomError::AuthWrongUser => "invalid_token",
            RoomError::Attachment(_) => "invalid_attachment",
            RoomError::MessageNotFound => "message_not_found",
            RoomError::MessageDeleted => "message_deleted",
            RoomError::EditWindowPassed => "edit_window_passed",
            RoomError::NotAllowed(_) => "forbidden",
            RoomError::InvalidEmoji => "invalid_emoji",
            RoomError::TooManyReactions => "too_many_reactions",
        }
    }

    /// The HTTP status for the POST fallback.
    pub fn http_status(&self) -> u16 {
        match self {
            RoomError::NotMember | RoomError::NotAllowed(_) => 403,
            RoomError::MessageNotFound => 404,
            RoomError::MessageDeleted => 409,
            RoomError::EditWindowPassed | RoomError::InvalidEmoji | RoomError::TooManyReactions => {
                422
            }
            RoomError::Malformed(_) => 400,
            RoomError::FrameTooLarge | RoomError::Invalid(DomainError::TooLong { .. }) => 413,
            RoomError::WrongConversation(_)
            | RoomError::UnknownType(_)
            | RoomError::Invalid(_)
            | RoomError::Attachment(_) => 422,
            RoomError::RateLimited { .. } => 429,
            RoomError::Backpressure | RoomError::Storage => 503,
            RoomError::Auth(_) | RoomError::AuthWrongUser => 401,
        }
    }

    fn frame(&self) -> ServerFrame {
        ServerFrame::Error {
            code: self.code().to_owned(),
            message: self.to_string(),
        }
    }
}

/// The result of an accepted send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// Stored now, with the next seq.
    New(MessageView),
    /// A resend of a message the room still holds: the original.
    Duplicate(MessageView),
    /// A resend of a message older than the room's memory: its original
    /// `seq` and `id`. The driver reads the rest from its log if it needs
    /// it (the HTTP fallback answers with the whole message).
    DuplicateOlder(KnownKey),
}

impl Sent {
    pub fn seq(&self) -> i64 {
        match self {
            Sent::New(m) | Sent::Duplicate(m) => m.seq,
            Sent::DuplicateOlder(k) => k.seq,
        }
    }

    pub fn is_duplicate(&self) -> bool {
        !matches!(self, Sent::New(_))
    }
}

/// The answer to a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeOutcome {
    /// For the actor's connection: the event's seq and id; for a resend,
    /// the original's; for a change that changed nothing, the message's.
    pub ack: ServerFrame,
    /// The event frame everyone got (`message_edited`, …); `None` when
    /// nothing changed, or for a resend the room no longer holds.
    pub event: Option<ServerFrame>,
}

/// A batch for the origin: messages it lacks and watermarks it may lack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushBatch {
    /// Answer with this number.
    pub id: BatchId,
    pub messages: Vec<StoredMessage>,
    pub receipts: Vec<ReceiptUpdate>,
}

/// What came back from a flush.
#[derive(Debug, Clone, Default)]
pub struct FlushOutcome {
    /// Ids the origin holds.
    pub stored: Vec<Uuid>,
    /// Ids the origin will never take (a conflict, a non-member). They
    /// leave the outbox too; retrying cannot help.
    pub rejected: Vec<Uuid>,
    /// The receipts in the batch were written.
    pub receipts_ok: bool,
}

/// One conversation's live state. See the module docs for the contract.
#[derive(Debug)]
pub struct Room {
    conversation_id: i64,
    config: RoomConfig,
    members: Members,
    conns: Conns,
    window: Window,
    outbox: Outbox,
    /// Watermarks each in-flight batch carried, by batch.
    receipts_in_flight: Vec<(BatchId, Vec<Watermark>)>,
    keys: KeyCache,
    limiter: Limiter,
    typing: Typing,
    notices: Notices,
    /// Members whose `User` object wants this room's live frames (they are
    /// online on an always-on connection). Kept by the driver across
    /// restarts; a member removed from the conversation stays listed but
    /// gets nothing (see [`Room::forward_to`]).
    subscribers: BTreeSet<i64>,
    /// Members who may delete anyone's message (a group's creator,
    /// admins), from the origin.
    moderators: BTreeSet<i64>,
    /// The seq the last notice named (none yet in this instance).
    last_notice_seq: Option<i64>,
    outputs: std::collections::VecDeque<Output>,
    rng: SplitMix64,
}

impl Room {
    /// An empty room. `seed` feeds the id generator (the driver passes real
    /// randomness; tests pass a constant).
    pub fn new(conversation_id: i64, config: RoomConfig, seed: u64) -> Self {
        let mut rng = SplitMix64(seed);
        // 32 random bits up front: batch numbers of two lives never meet.
        let first_batch = (rng.next() >> 32) << 20;
        Self {
            conversation_id,
            members: Members::new(config.receipt_interval_ms),
            conns: Conns::default(),
            window: Window::new(config.replay_window),
            outbox: Outbox::new(config.outbox(), first_batch),
            receipts_in_flight: Vec::new(),
            keys: KeyCache::new(config.dedup_horizon),
            limiter: Limiter::new(Rate {
                burst: config.rate_burst,
                per_sec: config.rate_per_sec,
            }),
            typing: Typing::new(config.typing_interval_ms, config.typing_ttl_ms),
            notices: Notices::new(config.notify_interval_ms),
            subscribers: BTreeSet::new(),
            moderators: BTreeSet::new(),
            last_notice_seq: None,
            outputs: std::collections::VecDeque::new(),
            rng,
            config,
        }
    }

    /// Rebuilds a room from durable storage: after a wake from hibernation,
    /// an eviction, a crash, or a failed write. Connections that survived are
    /// reattached afterwards with [`Room::handle_reattach`].
    pub fn load(
        conversation_id: i64,
        config: RoomConfig,
        seed: u64,
        now: Millis,
        storage: &impl RoomStorage,
    ) -> Result<Self, RestoreError> {
        let restore = Restore::load(storage, &config)?;
        let mut room = Self::new(conversation_id, config, seed);
        room.restore(now, restore);
        Ok(room)
    }

    fn restore(&mut self, now: Millis, state: Restore) {
        for record in state.messages {
            self.keys.remember(
                record.sender_id,
                record.client_msg_id.clone(),
                KnownKey {
                    seq: record.seq,
                    id: record.id,
                    created_at_ms: record.created_at_ms,
                },
            );
            self.window.push(record);
        }
        self.window.advance_last_seq(state.last_seq);
        self.members.restore(state.members);
        if self.window.waiting() > 0 || self.members.any_dirty() {
            // Whatever the last life did not confirm goes at once.
            self.outbox
                .waiting(now.saturating_sub(self.config.flush_delay_ms));
        }
    }

    pub fn conversation_id(&self) -> i64 {
        self.conversation_id
    }

    pub fn last_seq(&self) -> i64 {
        self.window.last_seq()
    }

    pub fn is_member(&self, user_id: i64) -> bool {
        self.members.contains(user_id)
    }

    pub fn members(&self) -> impl Iterator<Item = &Watermark> {
        self.members.iter()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The user behind a connection.
    pub fn user_of(&self, conn: ConnId) -> Option<i64> {
        self.conns.user_of(conn)
    }

    /// Messages waiting for the origin (in a batch or not).
    pub fn unflushed(&self) -> usize {
        self.window.unflushed()
    }

    /// Batches sent and not answered yet.
    pub fn flushes_in_flight(&self) -> usize {
        self.outbox.in_flight()
    }

    /// Seq of the oldest message replayable from memory.
    pub fn window_start(&self) -> i64 {
        self.window.start()
    }

    /// A message by seq, if still in the window.
    pub fn message(&self, seq: i64) -> Option<MessageView> {
        let watermarks = self.members.snapshot();
        self.window
            .get(seq)
            .filter(|r| r.is_message())
            .map(|r| self.view(r, &watermarks, None))
    }

    // ---- membership -------------------------------------------------------

    /// Replaces the member list (from the origin). Watermarks only move
    /// forward. Removed members' connections get an error and are closed.
    pub fn set_members(&mut self, now: Millis, members: &[Watermark], origin_last_seq: i64) {
        let changed = self.members.replace(members);
        for user in &changed.removed {
            self.typing.stopped(*user);
            self.limiter.forget(*user);
            for conn in self.conns.of_user(*user) {
                self.reject(conn, &RoomError::NotMember);
                self.close(conn, close::POLICY, "removed from the conversation");
            }
        }
        self.outputs
            .push_back(Output::ReplaceMembers(changed.stored));
        if !self.receipts_waiting().is_empty() {
            self.outbox.waiting(now);
        }
        self.window.advance_last_seq(origin_last_seq);
    }

    /// Who may delete anyone's message here (from the origin's member
    /// list; the driver keeps it across restarts).
    pub fn set_moderators(&mut self, moderators: impl IntoIterator<Item = i64>) {
        self.moderators = moderators.into_iter().collect();
    }

    pub fn moderators(&self) -> impl Iterator<Item = i64> + '_ {
        self.moderators.iter().copied()
    }

    // ---- connections ------------------------------------------------------

    /// A member connects. With `since`, every later message is replayed
    /// (or `resync` is sent when `since` is older than the window).
    pub fn handle_connect(
        &mut self,
        now: Millis,
        conn: ConnId,
        user_id: i64,
        since: Option<i64>,
    ) -> Result<(), RoomError> {
        if !self.is_member(user_id) {
            return Err(RoomError::NotMember);
        }
        self.conns.add(conn, user_id, None);
        if let Some(since) = since {
            self.replay(now, conn, user_id, since.max(0));
        }
        for user in self.typing.typing_now(now, user_id) {
            self.send(Target::Conn(conn), self.typing_frame(user));
        }
        Ok(())
    }

    /// Re-registers a connection that survived hibernation or a rebuild
    /// (no replay: it already has everything). A connection whose user is no
    /// longer a member is closed.
    pub fn handle_reattach(&mut self, conn: ConnId, user_id: i64, valid_until: Option<Millis>) {
        if self.is_member(user_id) {
            self.conns.add(conn, user_id, valid_until);
        } else {
            self.reject(conn, &RoomError::NotMember);
            self.close(conn, close::POLICY, "removed from the conversation");
        }
    }

    /// When the token behind `conn` stops being valid: past it, unless the
    /// client renews with `{"type":"auth"}`, the connection gets a
    /// `token_expired` error and is closed.
    pub fn set_valid_until(&mut self, conn: ConnId, valid_until: Option<Millis>) {
        self.conns.set_valid_until(conn, valid_until);
    }

    /// When the token behind `conn` stops being valid, if it was set.
    pub fn valid_until(&self, conn: ConnId) -> Option<Millis> {
        self.conns.valid_until(conn)
    }

    pub fn handle_disconnect(&mut self, _now: Millis, conn: ConnId) {
        self.conns.remove(conn);
    }

    fn replay(&mut self, now: Millis, conn: ConnId, user_id: i64, since: i64) {
        for frame in self.replay_frames(now, user_id, since) {
            self.send(Target::Conn(conn), frame);
        }
    }

    /// What a client of `user_id` holding everything up to `since` is
    /// missing: the later messages, or `resync` when `since` is older than
    /// the window. What it holds and what it is given count as delivered.
    fn replay_frames(&mut self, now: Millis, user_id: i64, since: i64) -> Vec<ServerFrame> {
        // The client holds everything up to `since`: that much is delivered
        // to this user, whatever the room remembered (a restart forgets
        // delivery that was not yet written).
        self.advance_delivered(now, user_id, since.min(self.last_seq()));
        match self.window.replay(since) {
            Replay::UpToDate => Vec::new(),
            // Everything before the window is confirmed by the origin (the
            // window never drops an unconfirmed message), so REST has it.
            Replay::Resync { from_seq } => vec![ServerFrame::Resync {
                conversation_id: self.conversation_id,
                from_seq,
            }],
            Replay::Messages(range) => {
                let watermarks = self.members.snapshot();
                let frames: Vec<ServerFrame> = self
                    .window
                    .since(*range.start())
                    .map(|r| self.frame_of(r, &watermarks, Some(user_id)))
                    .collect();
                self.advance_delivered(now, user_id, *range.end());
                frames
            }
        }
    }

    // ---- the per-user layer -----------------------------------------------

    /// `user_id`'s `User` object wants this room's live frames from now on
    /// (their user is online). With `since`, the answer is what follows it
    /// (as for a connection's replay), computed in the same event as the
    /// subscription, so the replay and the live frames that follow it
    /// neither overlap nor leave a gap.
    pub fn handle_subscribe(
        &mut self,
        now: Millis,
        user_id: i64,
        since: Option<i64>,
    ) -> Result<Vec<ServerFrame>, RoomError> {
        if !self.is_member(user_id) {
            return Err(RoomError::NotMember);
        }
        self.subscribers.insert(user_id);
        Ok(since.map_or_else(Vec::new, |since| {
            self.replay_frames(now, user_id, since.max(0))
        }))
    }

    /// A subscription the driver kept across a restart.
    pub fn restore_subscriber(&mut self, user_id: i64) {
        self.subscribers.insert(user_id);
    }

    /// `user_id`'s object is offline: it gets nothing more until it
    /// subscribes again.
    pub fn unsubscribe(&mut self, user_id: i64) {
        self.subscribers.remove(&user_id);
    }

    /// Whether `user_id`'s object gets this room's live frames.
    pub fn is_subscribed(&self, user_id: i64) -> bool {
        self.subscribers.contains(&user_id) && self.is_member(user_id)
    }

    /// The subscribed members a frame for `to` goes to. Only members: a
    /// subscription outlives a removal (the driver's copy is not rewritten
    /// for it), so a member added back is live again at once.
    fn forward_to(&self, to: Target) -> Vec<i64> {
        let except = match to {
            Target::Conn(_) => return Vec::new(),
            Target::All => None,
            Target::OthersOf(user) => Some(user),
        };
        self.subscribers
            .iter()
            .copied()
            .filter(|u| Some(*u) != except && self.is_member(*u))
            .collect()
    }

    // ---- inbound frames ---------------------------------------------------

    /// A text frame from a WebSocket. Errors become `error` frames (and a
    /// close where the protocol says so); the connection survives every
    /// error it can recover from. Every frame costs tokens from its user's
    /// bucket (see [`cost`]): a flood of anything is a flood.
    pub fn handle_text(&mut self, now: Millis, conn: ConnId, text: &str, ctx: &impl Context) {
        let Some(user_id) = self.user_of(conn) else {
            return;
        };
        if text.len() > MAX_FRAME_BYTES {
            self.reject(conn, &RoomError::FrameTooLarge);
            self.close(conn, close::TOO_BIG, "frame too large");
            return;
        }
        let result = match parse_frame(text) {
            Err(e) => self.take_token(now, user_id, cost::GARBAGE).and(Err(e)),
            Ok(ClientFrame::Ping) => self.take_token(now, user_id, cost::PING).map(|()| {
                self.send(Target::Conn(conn), ServerFrame::Pong);
            }),
            // The driver answers probes (it counts what each connection
            // holds); one that reaches the room only costs its token.
            Ok(ClientFrame::Pong { .. }) => self.take_token(now, user_id, cost::PING),
            Ok(ClientFrame::Auth { token }) => self
                .take_token(now, user_id, cost::AUTH)
                .and_then(|()| self.handle_auth(now, conn, user_id, &token, ctx)),
            Ok(ClientFrame::Message {
                conversation_id,
                content,
                client_msg_id,
                attachment_ids,
                reply_to,
                mentions,
            }) => self.check_conversation(conversation_id).and_then(|()| {
                let draft = Draft {
                    content,
                    client_msg_id,
                    attachment_ids,
                    reply_to,
                    mentions,
                };
                self.submit_draft(now, user_id, draft, Some(conn), ctx)
                    .map(|_| ())
            }),
            Ok(ClientFrame::Typing { conversation_id }) => self
                .check_conversation(conversation_id)
                .and_then(|()| self.handle_typing(now, user_id)),
            Ok(ClientFrame::Read {
                conversation_id,
                seq,
            }) => self
                .check_conversation(conversation_id)
                .and_then(|()| self.handle_read(now, user_id, seq)),
            // Resuming many conversations is the always-on connection's
            // job; a room's socket resumes with `?since=`.
            Ok(ClientFrame::Resume { .. }) => self
                .take_token(now, user_id, cost::GARBAGE)
                .and(Err(RoomError::UnknownType("resume".to_owned()))),
            Ok(
                frame @ (ClientFrame::Edit { .. }
                | ClientFrame::Delete { .. }
                | ClientFrame::React { .. }),
            ) => self.handle_change_frame(now, user_id, conn, frame, ctx),
        };
        if let Err(e) = result {
            self.reject(conn, &e);
            match e {
                RoomError::RateLimited { .. }
                    if self.limiter.strikes(user_id) >= self.config.flood_strikes =>
                {
                    self.close(conn, close::POLICY, "flood");
                }
                RoomError::AuthWrongUser => {
                    self.close(conn, close::POLICY, "token for another user")
                }
                _ => {}
            }
        }
    }

    /// An `edit`, `delete` or `react` frame from a room socket.
    fn handle_change_frame(
        &mut self,
        now: Millis,
        user_id: i64,
        conn: ConnId,
        frame: ClientFrame,
        ctx: &impl Context,
    ) -> Result<(), RoomError> {
        let (conversation_id, message_id, change, client_msg_id) = change_of(frame)?;
        self.check_conversation(conversation_id)?;
        self.submit_change(
            now,
            user_id,
            message_id,
            change,
            client_msg_id,
            Some(conn),
            ctx,
        )
        .map(|_| ())
    }

    /// `{"type":"auth","token":"…"}`: a fresh token for this connection's
    /// user extends its life. A bad token is an error the connection
    /// survives (until its current token runs out); a token for someone
    /// else closes it.
    fn handle_auth(
        &mut self,
        now: Millis,
        conn: ConnId,
        user_id: i64,
        token: &str,
        ctx: &impl Context,
    ) -> Result<(), RoomError> {
        let verified = ctx.verify_token(token, now).map_err(RoomError::Auth)?;
        if verified.user_id != user_id {
            return Err(RoomError::AuthWrongUser);
        }
        self.set_valid_until(conn, Some(verified.valid_until));
        self.send(Target::Conn(conn), ServerFrame::AuthOk);
        Ok(())
    }

    fn check_conversation(&self, conversation_id: i64) -> Result<(), RoomError> {
        if conversation_id == self.conversation_id {
            Ok(())
        } else {
            Err(RoomError::WrongConversation(conversation_id))
        }
    }

    /// Accepts a message from `user_id` (any transport). A new message is
    /// queued as `Store`, then the `ack` to `ack_to` (the sending
    /// connection, if any), then the broadcast. A resend queues only the
    /// `ack` and returns the original.
    pub fn submit(
        &mut self,
        now: Millis,
        user_id: i64,
        content: String,
        client_msg_id: Option<String>,
        ack_to: Option<ConnId>,
        ctx: &impl Context,
    ) -> Result<Sent, RoomError> {
        let draft = Draft {
            content,
            client_msg_id,
            ..Draft::default()
        };
        self.submit_draft(now, user_id, draft, ack_to, ctx)
    }

    /// [`Room::submit`] for a message that may carry attachments.
    pub fn submit_draft(
        &mut self,
        now: Millis,
        user_id: i64,
        draft: Draft,
        ack_to: Option<ConnId>,
        ctx: &impl Context,
    ) -> Result<Sent, RoomError> {
        let Draft {
            content,
            client_msg_id,
            attachment_ids,
            reply_to,
            mentions,
        } = draft;
        if !self.is_member(user_id) {
            return Err(RoomError::NotMember);
        }
        if attachment_ids.len() > MAX_ATTACHMENTS_PER_MESSAGE {
            return Err(RoomError::Attachment(format!(
                "at most {MAX_ATTACHMENTS_PER_MESSAGE} attachments per message"
            )));
        }
        // Text is optional only next to an attachment.
        let content = if attachment_ids.is_empty() || !content.trim().is_empty() {
            MessageContent::parse(content)
                .map_err(RoomError::Invalid)?
                .into_inner()
        } else {
            String::new()
        };
        let key = match client_msg_id {
            Some(k) => Some(ClientMsgId::parse(k).map_err(RoomError::Invalid)?),
            None => None,
        };
        // A recent resend is answered from memory.
        if let Some(key) = &key {
            if let Some(known) = self.keys.get(user_id, key.as_str()) {
                self.take_token(now, user_id, cost::RESEND)?;
                return Ok(self.duplicate(known, key.as_str(), ack_to));
            }
        }
        self.take_token(now, user_id, cost::MESSAGE)?;
        if self.window.unflushed() >= self.config.max_unflushed {
            return Err(RoomError::Backpressure);
        }
        let checked = self
            .check_attachments(now, user_id, &attachment_ids, ctx)
            .and_then(|attachments| Ok((attachments, self.quote(reply_to, ctx)?)));
        // A resend whose original the cache forgot would be refused here
        // (its attachments are sent, its quote deleted since): storage
        // decides.
        if checked.is_err() {
            if let Some(key) = &key {
                if let Some(known) = self.forgotten_original(user_id, key.as_str(), ctx)? {
                    return Ok(self.duplicate(known, key.as_str(), ack_to));
                }
            }
        }
        let (attachments, reply_to) = checked?;
        let mentions = self.members_among(mentions);

        let seq = self.last_seq() + 1;
        let id = self.next_id(now);
        let client_msg_id = key.map_or_else(|| id.to_string(), ClientMsgId::into_inner);
        let created_at_ms = i64::try_from(now).unwrap_or(i64::MAX);
        let candidate = KnownKey {
            seq,
            id,
            created_at_ms,
        };
        // Idempotency is forever: the key is claimed in storage for this
        // seq unless the room ever stored it, which one statement decides
        // (nothing can refuse the message after this point, and its store
        // comes next).
        match ctx
            .claim_key(user_id, &client_msg_id, candidate)
            .map_err(|StorageFailed| RoomError::Storage)?
        {
            Claim::Claimed => {}
            Claim::Known(known) => {
                self.keys.remember(user_id, client_msg_id.clone(), known);
                return Ok(self.duplicate(known, &client_msg_id, ack_to));
            }
        }
        let record = Record {
            id,
            seq,
            sender_id: user_id,
            content,
            created_at_ms,
            client_msg_id: client_msg_id.clone(),
            flushed: false,
            attachments,
            reply_to,
            mentions,
            state: MessageState::default(),
            change: None,
            request_id: ctx.request_id(),
        };
        self.keys.remember(user_id, client_msg_id, candidate);
        self.outbox.waiting(now);
        // A message ends its sender's typing.
        self.typing.stopped(user_id);
        // The sender has it, and so has everyone with a live connection
        // (the broadcast below reaches them). The message's status reflects
        // that; no receipt frames, which would cost one per member per
        // message.
        let mut online = self.conns.users();
        online.insert(user_id);
        // A subscribed member's object is online and relays it.
        online.extend(self.forward_to(Target::All));
        for user in online {
            self.members.delivered(user, seq);
        }
        let message = self.view(&record, &self.members.snapshot(), None);
        self.outputs.push_back(Output::Store(record.clone()));
        self.window.push(record);
        if let Some(conn) = ack_to {
            self.send(
                Target::Conn(conn),
                ServerFrame::Ack {
                    client_msg_id: message.client_msg_id.clone(),
                    seq,
                    id,
                    conversation_id: self.conversation_id,
                },
            );
        }
        self.send(
            Target::All,
            ServerFrame::Message {
                message: message.clone(),
            },
        );
        let everyone: Vec<i64> = self.members.ids().collect();
        self.want_notify(now, everyone);
        Ok(Sent::New(message))
    }

    /// The attachments a new message names: each registered with this room,
    /// uploaded by the sender, not yet sent, and young enough that the
    /// origin's cleanup (a day after upload) cannot take it before the
    /// message is flushed. Checked before the key is claimed, so a refusal
    /// leaves nothing behind.
    fn check_attachments(
        &self,
        now: Millis,
        user_id: i64,
        ids: &[Uuid],
        ctx: &impl Context,
    ) -> Result<Vec<AttachmentMeta>, RoomError> {
        let mut out: Vec<AttachmentMeta> = Vec::with_capacity(ids.len());
        for &id in ids {
            if out.iter().any(|a| a.id == id) {
                return Err(RoomError::Attachment(format!(
                    "attachment {id} is listed twice"
                )));
            }
            let pending = ctx
                .attachment(id)
                .map_err(|StorageFailed| RoomError::Storage)?
                .filter(|p| {
                    p.meta.uploader_id == user_id && p.meta.conversation_id == self.conversation_id
                })
                .ok_or_else(|| {
                    RoomError::Attachment(format!(
                        "attachment {id} is not one you uploaded to this conversation"
                    ))
                })?;
            if pending.seq.is_some() {
                return Err(RoomError::Attachment(format!(
                    "attachment {id} was already sent"
                )));
            }
            let age = i64::try_from(now).unwrap_or(i64::MAX) - pending.registered_at_ms;
            if age > ATTACHMENT_SEND_WINDOW_MS {
                return Err(RoomError::Attachment(format!(
                    "attachment {id} was uploaded too long ago; upload it again"
                )));
            }
            out.push(pending.meta);
        }
        Ok(out)
    }

    /// The origin finished (or failed) processing an attachment: messages
    /// in the window that carry it show the new state from now on, and,
    /// once it is in a message (`sent`, as the driver's storage knows),
    /// every member hears of it. An upload nobody was sent yet stays
    /// private to its uploader; its message will carry the new state.
    /// Returns the seqs of the window's messages that changed.
    pub fn update_attachment(&mut self, meta: AttachmentMeta, sent: bool) -> Vec<i64> {
        let changed = self.window.update_attachment(&meta);
        if sent || !changed.is_empty() {
            self.send(
                Target::All,
                ServerFrame::AttachmentUpdated {
                    attachment: AttachmentView::unsigned(meta),
                },
            );
        }
        changed
    }

    /// A change to message `message_id` from `user_id` (any transport):
    /// an edit, a delete or a reaction. A new change is queued as
    /// `StoreChange`, then the `ack` to `ack_to`, then the event to
    /// everyone. A resend (by `client_msg_id`) and a change that changes
    /// nothing queue only the `ack`.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_change(
        &mut self,
        now: Millis,
        user_id: i64,
        message_id: Uuid,
        change: Change,
        client_msg_id: Option<String>,
        ack_to: Option<ConnId>,
        ctx: &impl Context,
    ) -> Result<ChangeOutcome, RoomError> {
        if !self.is_member(user_id) {
            return Err(RoomError::NotMember);
        }
        let change = match change {
            Change::Edit { content } => Change::Edit {
                content: MessageContent::parse(content)
                    .map_err(RoomError::Invalid)?
                    .into_inner(),
            },
            Change::React { emoji, on } => {
                if !lifecycle::valid_emoji(&emoji) {
                    return Err(RoomError::InvalidEmoji);
                }
                Change::React { emoji, on }
            }
            Change::Delete => Change::Delete,
        };
        let key = match client_msg_id {
            Some(k) => Some(ClientMsgId::parse(k).map_err(RoomError::Invalid)?),
            None => None,
        };
        if let Some(key) = &key {
            if let Some(known) = self.keys.get(user_id, key.as_str()) {
                self.take_token(now, user_id, cost::RESEND)?;
                return Ok(self.change_duplicate(known, key.as_str(), ack_to));
            }
        }
        self.take_token(now, user_id, cost::MESSAGE)?;
        if self.window.unflushed() >= self.config.max_unflushed {
            return Err(RoomError::Backpressure);
        }
        let now_ms = i64::try_from(now).unwrap_or(i64::MAX);
        let decided = self.find_message(message_id, ctx).and_then(|target| {
            let current = self.window.get(target.seq).map(|r| r.content.as_str());
            lifecycle::decide(
                &target,
                current,
                user_id,
                self.moderators.contains(&user_id),
                &change,
                now_ms,
                self.config.edit_window_ms,
            )
            .map(|state| (target, state))
        });
        // A refusal or a no-op answers before any claim, so a resend whose
        // original the cache forgot would get it instead of its ack (a
        // reaction already on, a message deleted since): storage decides.
        if !matches!(decided, Ok((_, Some(_)))) {
            if let Some(key) = &key {
                if let Some(known) = self.forgotten_original(user_id, key.as_str(), ctx)? {
                    return Ok(self.change_duplicate(known, key.as_str(), ack_to));
                }
            }
        }
        let (target, decided) = decided?;
        let Some(state) = decided else {
            // Nothing to store: the client's intent already holds.
            let ack = ServerFrame::Ack {
                client_msg_id: key.map(ClientMsgId::into_inner).unwrap_or_default(),
                seq: target.seq,
                id: target.id,
                conversation_id: self.conversation_id,
            };
            if let Some(conn) = ack_to {
                self.send(Target::Conn(conn), ack.clone());
            }
            return Ok(ChangeOutcome { ack, event: None });
        };

        let seq = self.last_seq() + 1;
        let id = self.next_id(now);
        let client_msg_id = key.map_or_else(|| id.to_string(), ClientMsgId::into_inner);
        let candidate = KnownKey {
            seq,
            id,
            created_at_ms: now_ms,
        };
        match ctx
            .claim_key(user_id, &client_msg_id, candidate)
            .map_err(|StorageFailed| RoomError::Storage)?
        {
            Claim::Claimed => {}
            Claim::Known(known) => {
                self.keys.remember(user_id, client_msg_id.clone(), known);
                return Ok(self.change_duplicate(known, &client_msg_id, ack_to));
            }
        }
        let count = match &change {
            Change::React { emoji, .. } => state.count(emoji),
            _ => 0,
        };
        let event = Record {
            id,
            seq,
            sender_id: user_id,
            content: String::new(),
            created_at_ms: now_ms,
            client_msg_id: client_msg_id.clone(),
            flushed: false,
            change: Some(ChangeRecord {
                target_id: target.id,
                target_seq: target.seq,
                change,
                count,
            }),
            request_id: ctx.request_id(),
            ..Record::default()
        };
        self.keys
            .remember(user_id, client_msg_id.clone(), candidate);
        self.outbox.waiting(now);
        self.window.apply_change(&event, &state);
        let frame = self.event_frame(&event).unwrap_or(ServerFrame::Pong);
        self.outputs.push_back(Output::StoreChange {
            event: event.clone(),
            state,
        });
        self.window.push(event);
        let ack = ServerFrame::Ack {
            client_msg_id,
            seq,
            id,
            conversation_id: self.conversation_id,
        };
        if let Some(conn) = ack_to {
            self.send(Target::Conn(conn), ack.clone());
        }
        self.send(Target::All, frame.clone());
        // The members' lists show the change (an edited or deleted last
        // message), and an object not yet subscribed subscribes.
        let everyone: Vec<i64> = self.members.ids().collect();
        self.want_notify(now, everyone);
        Ok(ChangeOutcome {
            ack,
            event: Some(frame),
        })
    }

    /// A resend of a change: its ack again, and its event if still held.
    fn change_duplicate(
        &mut self,
        known: KnownKey,
        client_msg_id: &str,
        ack_to: Option<ConnId>,
    ) -> ChangeOutcome {
        let ack = ServerFrame::Ack {
            client_msg_id: client_msg_id.to_owned(),
            seq: known.seq,
            id: known.id,
            conversation_id: self.conversation_id,
        };
        if let Some(conn) = ack_to {
            self.send(Target::Conn(conn), ack.clone());
        }
        let event = self.window.get(known.seq).and_then(|r| self.event_frame(r));
        ChangeOutcome { ack, event }
    }

    /// The original of a resend whose key the cache no longer holds (an
    /// older key, a new instance), from storage: asked only where a
    /// refusal or a no-op would otherwise answer before any claim.
    fn forgotten_original(
        &mut self,
        user_id: i64,
        key: &str,
        ctx: &impl Context,
    ) -> Result<Option<KnownKey>, RoomError> {
        let known = ctx
            .known_key(user_id, key)
            .map_err(|StorageFailed| RoomError::Storage)?;
        if let Some(known) = known {
            self.keys.remember(user_id, key.to_owned(), known);
        }
        Ok(known)
    }

    /// The quote of the message a new one answers, which must be here and
    /// not deleted.
    fn quote(
        &self,
        reply_to: Option<Uuid>,
        ctx: &impl Context,
    ) -> Result<Option<ReplyPreview>, RoomError> {
        let Some(id) = reply_to else {
            return Ok(None);
        };
        let target = self.find_message(id, ctx)?;
        if target.state.is_deleted() {
            return Err(RoomError::MessageDeleted);
        }
        Ok(Some(ReplyPreview {
            id: target.id,
            seq: target.seq,
            sender_id: target.sender_id,
            content: target.preview.unwrap_or_default(),
            deleted: false,
        }))
    }

    /// The message `id` names in this conversation: from the window, else
    /// from storage. Changes are not messages.
    fn find_message(&self, id: Uuid, ctx: &impl Context) -> Result<MessageRef, RoomError> {
        if let Some(r) = self.window.find(id) {
            return if r.is_message() {
                Ok(r.as_target())
            } else {
                Err(RoomError::MessageNotFound)
            };
        }
        ctx.target(id)
            .map_err(|StorageFailed| RoomError::Storage)?
            .ok_or(RoomError::MessageNotFound)
    }

    /// The members among `users`, each once, at most [`MAX_MENTIONS`].
    fn members_among(&self, users: Vec<i64>) -> Vec<i64> {
        let mut out: Vec<i64> = Vec::new();
        for u in users {
            if self.members.contains(u) && !out.contains(&u) && out.len() < MAX_MENTIONS {
                out.push(u);
            }
        }
        out
    }

    /// The frame a change record is relayed and replayed as.
    fn event_frame(&self, r: &Record) -> Option<ServerFrame> {
        let c = r.change.as_ref()?;
        let conversation_id = self.conversation_id;
        Some(match &c.change {
            Change::Edit { content } => ServerFrame::MessageEdited {
                conversation_id,
                seq: r.seq,
                message_id: c.target_id,
                message_seq: c.target_seq,
                user_id: r.sender_id,
                content: content.clone(),
                edited_at: r.created_at(),
            },
            Change::Delete => ServerFrame::MessageDeleted {
                conversation_id,
                seq: r.seq,
                message_id: c.target_id,
                message_seq: c.target_seq,
                user_id: r.sender_id,
                deleted_at: r.created_at(),
            },
            Change::React { emoji, on } => ServerFrame::Reaction {
                conversation_id,
                seq: r.seq,
                message_id: c.target_id,
                message_seq: c.target_seq,
                user_id: r.sender_id,
                emoji: emoji.clone(),
                on: *on,
                count: c.count,
            },
        })
    }

    /// A record as a frame: a message as `viewer` sees it, or a change.
    fn frame_of(&self, r: &Record, watermarks: &[Watermark], viewer: Option<i64>) -> ServerFrame {
        match self.event_frame(r) {
            Some(frame) => frame,
            None => ServerFrame::Message {
                message: self.view(r, watermarks, viewer),
            },
        }
    }

    /// A resend of a stored message: the original, and its ack again.
    fn duplicate(&mut self, known: KnownKey, client_msg_id: &str, ack_to: Option<ConnId>) -> Sent {
        let sent = match self.window.get(known.seq) {
            Some(r) if r.is_message() => {
                Sent::Duplicate(self.view(r, &self.members.snapshot(), None))
            }
            _ => Sent::DuplicateOlder(known),
        };
        if let Some(conn) = ack_to {
            self.send(
                Target::Conn(conn),
                ServerFrame::Ack {
                    client_msg_id: client_msg_id.to_owned(),
                    seq: known.seq,
                    id: known.id,
                    conversation_id: self.conversation_id,
                },
            );
        }
        sent
    }

    /// A typing signal from `user_id`.
    pub fn handle_typing(&mut self, now: Millis, user_id: i64) -> Result<(), RoomError> {
        if !self.is_member(user_id) {
            return Err(RoomError::NotMember);
        }
        self.take_token(now, user_id, cost::TYPING)?;
        if self.typing.typed(now, user_id) {
            self.send(Target::OthersOf(user_id), self.typing_frame(user_id));
        }
        Ok(())
    }

    /// `user_id` has read up to `seq`.
    pub fn handle_read(&mut self, now: Millis, user_id: i64, seq: i64) -> Result<(), RoomError> {
        if !self.is_member(user_id) {
            return Err(RoomError::NotMember);
        }
        if seq < 0 {
            return Err(RoomError::Invalid(DomainError::Invalid {
                field: "seq",
                reason: "must not be negative",
            }));
        }
        self.take_token(now, user_id, cost::READ)?;
        // Nobody reads the future.
        let seq = seq.min(self.last_seq());
        let Some(w) = self.members.read(user_id, seq) else {
            return Ok(());
        };
        self.outputs.push_back(Output::StoreWatermark(w));
        self.outbox.waiting(now);
        self.schedule_receipt(now, user_id);
        // Their other tabs and devices show the conversation read.
        self.want_notify(now, [user_id]);
        Ok(())
    }

    fn advance_delivered(&mut self, now: Millis, user_id: i64, seq: i64) {
        if self.members.delivered(user_id, seq) {
            self.outbox.waiting(now);
            self.schedule_receipt(now, user_id);
        }
    }

    /// Queues a notice for `users`: at once if the last one is older than
    /// the interval, else at the end of it (coalesced).
    fn want_notify(&mut self, now: Millis, users: impl IntoIterator<Item = i64>) {
        if self.notices.want(now, users) {
            self.emit_notice(now);
        }
    }

    fn emit_notice(&mut self, now: Millis) {
        let recipients = self
            .notices
            .take(now)
            .into_iter()
            .filter(|u| self.members.contains(*u))
            .map(|u| (u, self.unread_for(u)))
            .collect::<Vec<_>>();
        let mentions = recipients
            .iter()
            .map(|&(u, _)| (u, self.unread_mentions_for(u)))
            .filter(|&(_, n)| n > 0)
            .collect();
        let last_message = self.window.newest().map(|r| MessagePreview {
            id: r.id,
            seq: r.seq,
            sender_id: r.sender_id,
            content: r.preview(),
            created_at: r.created_at(),
        });
        let seq = self.last_seq();
        // A new instance's first notice goes at once after the event that
        // wants it (see `Notices`), so only its last message is new.
        let prev_seq = self.last_notice_seq.replace(seq).unwrap_or(seq - 1).max(0);
        self.outputs.push_back(Output::Notify(ConversationNotice {
            conversation_id: self.conversation_id,
            seq,
            prev_seq,
            last_message,
            recipients,
            mentions,
        }));
    }

    /// Messages from others after `user`'s read watermark, capped like the
    /// origin's REST count. Beyond the window every message counts (own
    /// ones included): the cap makes the difference moot for long gaps.
    pub fn unread_for(&self, user: i64) -> i64 {
        const CAP: i64 = 999;
        let Some(w) = self.members.get(user) else {
            return 0;
        };
        let start = self.window.start();
        let before_window = (start - 1 - w.read_seq).max(0);
        let from = w.read_seq.max(start - 1);
        let in_window = self.window.count_from_others_after(from, user) as i64;
        (before_window + in_window).min(CAP)
    }

    /// Unread messages in the window that mention `user` (mentions before
    /// the window are not counted here; the REST list counts them all).
    pub fn unread_mentions_for(&self, user: i64) -> i64 {
        let Some(w) = self.members.get(user) else {
            return 0;
        };
        self.window.count_mentions_after(w.read_seq, user) as i64
    }

    fn schedule_receipt(&mut self, now: Millis, user_id: i64) {
        if self.members.receipt_now(now, user_id) {
            self.broadcast_receipt(user_id);
        }
    }

    fn broadcast_receipt(&mut self, user_id: i64) {
        if let Some(w) = self.members.get(user_id).copied() {
            let frame = ServerFrame::Receipt {
                conversation_id: self.conversation_id,
                user_id,
                delivered_seq: w.delivered_seq,
                read_seq: w.read_seq,
            };
            self.send(Target::All, frame);
        }
    }

    // ---- time -------------------------------------------------------------

    /// Fires what is due at `now`: connections whose token ran out,
    /// coalesced receipts, expired typing and the pending notice.
    pub fn handle_timeout(&mut self, now: Millis) {
        while let Some(conn) = self.conns.next_expired(now) {
            self.reject(conn, &RoomError::Auth(AuthError::Expired));
            self.close(conn, close::POLICY, "token expired");
        }
        for user in self.members.due_receipts(now) {
            self.broadcast_receipt(user);
        }
        self.typing.expire(now);
        if self.notices.due_at().is_some_and(|t| now >= t) {
            self.emit_notice(now);
        }
    }

    /// When the driver should next call [`Room::handle_timeout`] and
    /// [`Room::poll_flush`].
    /// When the oldest message the origin has not confirmed was acked (ms
    /// since the epoch), for the outbox-age gauge.
    pub fn oldest_unflushed_at(&self) -> Option<u64> {
        self.window
            .oldest_unconfirmed_at()
            .and_then(|t| u64::try_from(t).ok())
    }

    pub fn poll_timeout(&self) -> Option<Millis> {
        [
            self.members.next_receipt(),
            self.flush_due(),
            self.notices.due_at(),
            self.conns.next_expiry(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Drops every queued output (after a failed write; see [`drain`]).
    fn discard_outputs(&mut self) -> usize {
        let n = self.outputs.len();
        self.outputs.clear();
        n
    }

    // ---- outbox -----------------------------------------------------------

    /// When the next batch may start (`None`: nothing waits, or the
    /// pipeline is full).
    pub fn flush_due(&self) -> Option<Millis> {
        self.outbox
            .due(self.window.waiting(), !self.receipts_waiting().is_empty())
    }

    /// Watermarks the origin may lack that no batch in flight carries (a
    /// value that moved since its batch left waits again).
    fn receipts_waiting(&self) -> Vec<Watermark> {
        let mut dirty = self.members.dirty();
        dirty.retain(|w| {
            !self
                .receipts_in_flight
                .iter()
                .any(|(_, sent)| sent.contains(w))
        });
        dirty
    }

    /// The next batch for the origin, when one is due and the pipeline has
    /// room. Drain before sending it (it queues the watermarks it carries
    /// as writes); answer it with [`Room::handle_flush_result`] or
    /// [`Room::handle_flush_failure`]. Call again until it says `None`.
    pub fn poll_flush(&mut self, now: Millis) -> Option<FlushBatch> {
        let receipts = self.receipts_waiting();
        let id = self
            .outbox
            .start(now, self.window.waiting(), !receipts.is_empty())?;
        let conversation_id = self.conversation_id;
        let batch_size = self.outbox.batch_size();
        let messages: Vec<StoredMessage> = self
            .window
            .take_waiting(id, batch_size)
            .into_iter()
            .map(|r| r.to_stored(conversation_id))
            .collect();
        // The watermarks just taken are in flight now: none left waiting.
        self.outbox.taken(self.window.waiting(), false);
        // What the origin is about to learn must be durable here first, so
        // a restart never leaves this room behind what the origin has.
        for w in &receipts {
            self.outputs.push_back(Output::StoreWatermark(*w));
        }
        let updates = receipts
            .iter()
            .map(|w| ReceiptUpdate {
                conversation_id,
                user_id: w.user_id,
                delivered_seq: w.delivered_seq,
                read_seq: w.read_seq,
            })
            .collect();
        if !receipts.is_empty() {
            self.receipts_in_flight.push((id, receipts));
        }
        Some(FlushBatch {
            id,
            messages,
            receipts: updates,
        })
    }

    /// The origin answered batch `id`. Answers may come in any order, and
    /// one from a batch this room never sent (a previous life) still
    /// confirms what it lists.
    pub fn handle_flush_result(&mut self, now: Millis, id: BatchId, outcome: &FlushOutcome) {
        let done: std::collections::HashSet<Uuid> = outcome
            .stored
            .iter()
            .chain(outcome.rejected.iter())
            .copied()
            .collect();
        // Anything this batch carried that is still unconfirmed waits again.
        let settled = self.window.settle(id, &|r| done.contains(&r.id));
        if !settled.confirmed.is_empty() {
            self.outputs.push_back(Output::MarkFlushed(Confirmed {
                runs: settled.confirmed,
                prefix_end: settled.prefix_end,
                last_seq: self.last_seq(),
            }));
        }
        let carried = self.take_receipts(id);
        if outcome.receipts_ok {
            if let Some(sent) = carried {
                self.members.synced(&sent);
                self.outputs.push_back(Output::MarkReceiptsSynced(sent));
            }
        }
        let complete = settled.released == 0 && outcome.receipts_ok;
        self.outbox.answered(now, id, complete);
        if self.window.waiting() > 0 || !self.receipts_waiting().is_empty() {
            self.outbox.waiting(now);
        }
    }

    /// Batch `id` failed (the origin is down, a timeout): what it carried
    /// waits again, and the outbox backs off. Nothing leaves the outbox.
    pub fn handle_flush_failure(&mut self, now: Millis, id: BatchId) {
        self.window.release(id);
        self.take_receipts(id);
        self.outbox.failed(now, id);
    }

    fn take_receipts(&mut self, id: BatchId) -> Option<Vec<Watermark>> {
        let pos = self.receipts_in_flight.iter().position(|(b, _)| *b == id)?;
        Some(self.receipts_in_flight.swap_remove(pos).1)
    }

    // ---- helpers ------------------------------------------------------------

    fn view(&self, r: &Record, members: &[Watermark], viewer: Option<i64>) -> MessageView {
        // A quote reads as its original reads now, while the window holds
        // it (a deletion since shows as such).
        let reply_to = r.reply_to.as_ref().map(|q| match self.window.get(q.seq) {
            Some(t) if t.id == q.id => ReplyPreview {
                content: if t.state.is_deleted() {
                    String::new()
                } else {
                    t.preview()
                },
                deleted: t.state.is_deleted(),
                ..q.clone()
            },
            _ => q.clone(),
        });
        MessageView {
            id: r.id,
            seq: r.seq,
            conversation_id: self.conversation_id,
            sender_id: r.sender_id,
            content: r.content.clone(),
            status: status_of(r.seq, r.sender_id, members),
            created_at: r.created_at(),
            client_msg_id: r.client_msg_id.clone(),
            attachments: r
                .attachments
                .iter()
                .cloned()
                .map(AttachmentView::unsigned)
                .collect(),
            edited_at: r
                .state
                .edited_at_ms
                .and_then(DateTime::from_timestamp_millis),
            deleted_at: r
                .state
                .deleted_at_ms
                .and_then(DateTime::from_timestamp_millis),
            reactions: r.state.views(viewer),
            reply_to,
            mentions: r.mentions.clone(),
        }
    }

    fn typing_frame(&self, user_id: i64) -> ServerFrame {
        ServerFrame::Typing {
            conversation_id: self.conversation_id,
            user_id,
        }
    }

    fn send(&mut self, to: Target, frame: ServerFrame) {
        let forward = matches!(
            frame,
            ServerFrame::Message { .. }
                | ServerFrame::Typing { .. }
                | ServerFrame::Receipt { .. }
                | ServerFrame::AttachmentUpdated { .. }
                | ServerFrame::MessageEdited { .. }
                | ServerFrame::MessageDeleted { .. }
                | ServerFrame::Reaction { .. }
        );
        let users = if forward {
            self.forward_to(to)
        } else {
            Vec::new()
        };
        if users.is_empty() {
            self.outputs.push_back(Output::Send { to, frame });
        } else {
            self.outputs.push_back(Output::Send {
                to,
                frame: frame.clone(),
            });
            self.outputs.push_back(Output::Forward { users, frame });
        }
    }

    fn reject(&mut self, conn: ConnId, error: &RoomError) {
        self.send(Target::Conn(conn), error.frame());
    }

    fn close(&mut self, conn: ConnId, code: u16, reason: &str) {
        self.conns.remove(conn);
        self.outputs.push_back(Output::Close {
            conn,
            code,
            reason: reason.to_owned(),
        });
    }

    fn take_token(&mut self, now: Millis, user_id: i64, cost: f64) -> Result<(), RoomError> {
        self.limiter
            .take(now, user_id, cost)
            .map_err(|retry_after_ms| RoomError::RateLimited { retry_after_ms })
    }

    fn next_id(&mut self, now: Millis) -> Uuid {
        let a = self.rng.next().to_le_bytes();
        let b = self.rng.next().to_le_bytes();
        let mut bytes = [0u8; 10];
        bytes[..8].copy_from_slice(&a);
        bytes[8..].copy_from_slice(&b[..2]);
        uuid::Builder::from_unix_timestamp_millis(now, &bytes).into_uuid()
    }
}

/// Parses a client frame, telling malformed JSON from an unknown type from
/// a bad field.
pub fn parse_frame(text: &str) -> Result<ClientFrame, RoomError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| RoomError::Malformed(e.to_string()))?;
    let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
        return Err(RoomError::Malformed(
            "a frame is a JSON object with a string \"type\"".to_owned(),
        ));
    };
    if !matches!(
        kind,
        "message"
            | "typing"
            | "read"
            | "ping"
            | "auth"
            | "pong"
            | "resume"
            | "edit"
            | "delete"
            | "react"
    ) {
        return Err(RoomError::UnknownType(kind.to_owned()));
    }
    serde_json::from_value(value).map_err(|e| {
        RoomError::Invalid(DomainError::Invalid {
            field: "frame",
            reason: field_error_reason(&e),
        })
    })
}

/// The parts of an `edit`, `delete` or `react` frame: conversation,
/// message, change, key.
pub fn change_of(frame: ClientFrame) -> Result<(i64, Uuid, Change, Option<String>), RoomError> {
    Ok(match frame {
        ClientFrame::Edit {
            conversation_id,
            message_id,
            content,
            client_msg_id,
        } => (
            conversation_id,
            message_id,
            Change::Edit { content },
            client_msg_id,
        ),
        ClientFrame::Delete {
            conversation_id,
            message_id,
            client_msg_id,
        } => (conversation_id, message_id, Change::Delete, client_msg_id),
        ClientFrame::React {
            conversation_id,
            message_id,
            emoji,
            on,
            client_msg_id,
        } => (
            conversation_id,
            message_id,
            Change::React { emoji, on },
            client_msg_id,
        ),
        _ => return Err(RoomError::UnknownType("not a change".to_owned())),
    })
}

/// A static summary of serde's complaint (its full text may echo input).
fn field_error_reason(e: &serde_json::Error) -> &'static str {
    if e.to_string().contains("missing field") {
        "a required field is missing"
    } else {
        "a field has the wrong type"
    }
}

/// A small, fast PRNG for message ids (splitmix64). Seeded by the driver
/// from real randomness; its output only fills UUIDv7's random bits.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageStatus;
    use crate::protocol::internal::ConversationNotice;

    /// A room with nothing in storage beyond its memory, and no tokens.
    pub(super) struct Bare;

    impl Context for Bare {
        fn claim_key(&self, _: i64, _: &str, _: KnownKey) -> Result<Claim, StorageFailed> {
            Ok(Claim::Claimed)
        }
        fn verify_token(&self, _: &str, _: Millis) -> Result<Verified, AuthError> {
            Err(AuthError::Invalid)
        }
    }

    pub(super) const T0: Millis = 1_800_000_000_000;

    pub(super) fn room_with(config: RoomConfig, users: &[i64]) -> Room {
        let mut room = Room::new(1, config, 7);
        let members: Vec<Watermark> = users
            .iter()
            .map(|&user_id| Watermark {
                user_id,
                delivered_seq: 0,
                read_seq: 0,
            })
            .collect();
        room.set_members(T0, &members, 0);
        outputs(&mut room);
        room
    }

    pub(super) fn outputs(room: &mut Room) -> Vec<Output> {
        std::iter::from_fn(|| room.poll_output()).collect()
    }

    fn msg(content: &str, key: &str) -> String {
        serde_json::json!({"type":"message","conversation_id":1,"content":content,"client_msg_id":key})
            .to_string()
    }

    fn errors_to(outs: &[Output], conn: ConnId) -> Vec<String> {
        outs.iter()
            .filter_map(|o| match o {
                Output::Send {
                    to: Target::Conn(c),
                    frame: ServerFrame::Error { code, .. },
                } if *c == conn => Some(code.clone()),
                _ => None,
            })
            .collect()
    }

    fn closes(outs: &[Output]) -> Vec<(ConnId, u16)> {
        outs.iter()
            .filter_map(|o| match o {
                Output::Close { conn, code, .. } => Some((*conn, *code)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_message_is_stored_then_acked_then_broadcast() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        room.handle_connect(T0, ConnId(1), 1, None).expect("member");
        room.handle_connect(T0, ConnId(2), 2, None).expect("member");
        room.handle_text(T0, ConnId(1), &msg("hi", "k1"), &Bare);
        let outs = outputs(&mut room);
        assert!(matches!(&outs[0], Output::Store(r) if r.seq == 1 && r.content == "hi"));
        assert!(matches!(
            &outs[1],
            Output::Send {
                to: Target::Conn(ConnId(1)),
                frame: ServerFrame::Ack { seq: 1, .. }
            }
        ));
        match &outs[2] {
            Output::Send {
                to: Target::All,
                frame: ServerFrame::Message { message },
            } => {
                assert_eq!(message.seq, 1);
                // The other member is connected, so it is delivered.
                assert_eq!(message.status, MessageStatus::Delivered);
            }
            other => panic!("expected the broadcast, got {other:?}"),
        }
    }

    fn forwards(outs: &[Output]) -> Vec<(Vec<i64>, &'static str)> {
        outs.iter()
            .filter_map(|o| match o {
                Output::Forward { users, frame } => Some((
                    users.clone(),
                    match frame {
                        ServerFrame::Message { .. } => "message",
                        ServerFrame::Typing { .. } => "typing",
                        ServerFrame::Receipt { .. } => "receipt",
                        _ => "other",
                    },
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn subscribed_members_objects_get_live_frames_and_a_replay_from_where_they_are() {
        let mut room = room_with(RoomConfig::default(), &[1, 2, 3]);
        room.handle_connect(T0, ConnId(1), 1, None).expect("member");
        room.handle_text(T0, ConnId(1), &msg("one", "k1"), &Bare);
        assert!(
            forwards(&outputs(&mut room)).is_empty(),
            "nobody subscribed"
        );
        assert_eq!(
            room.handle_subscribe(T0, 99, None),
            Err(RoomError::NotMember)
        );
        // Subscribing from 0 replays what the member's clients lack.
        let replay = room.handle_subscribe(T0, 2, Some(0)).expect("member");
        assert!(matches!(&replay[..], [ServerFrame::Message { message }] if message.seq == 1));
        assert!(
            room.handle_subscribe(T0, 3, None)
                .expect("member")
                .is_empty()
        );
        outputs(&mut room);
        room.handle_text(T0 + 1, ConnId(1), &msg("two", "k2"), &Bare);
        let outs = outputs(&mut room);
        assert_eq!(forwards(&outs), vec![(vec![2, 3], "message")]);
        // A subscribed member's object relays it: delivered.
        assert!(outs.iter().any(|o| matches!(
            o,
            Output::Send { to: Target::All, frame: ServerFrame::Message { message } }
                if message.status == MessageStatus::Delivered
        )));
        // Typing goes to the others' objects only.
        room.handle_typing(T0 + 2, 2).expect("member");
        assert_eq!(forwards(&outputs(&mut room)), vec![(vec![3], "typing")]);
        // A removed member's object gets nothing, and again once added back.
        let members = |ids: &[i64]| -> Vec<Watermark> {
            ids.iter()
                .map(|&user_id| Watermark {
                    user_id,
                    delivered_seq: 0,
                    read_seq: 0,
                })
                .collect()
        };
        room.set_members(T0 + 3, &members(&[1, 2]), 0);
        outputs(&mut room);
        room.handle_text(T0 + 4, ConnId(1), &msg("three", "k3"), &Bare);
        assert_eq!(forwards(&outputs(&mut room)), vec![(vec![2], "message")]);
        room.set_members(T0 + 5, &members(&[1, 2, 3]), 0);
        room.unsubscribe(2);
        outputs(&mut room);
        room.handle_text(T0 + 6, ConnId(1), &msg("four", "k4"), &Bare);
        assert_eq!(forwards(&outputs(&mut room)), vec![(vec![3], "message")]);
        // `resume` is the always-on connection's frame, not a room's.
        let resume = serde_json::json!({"type":"resume","since":{"1":0}}).to_string();
        room.handle_text(T0 + 7, ConnId(1), &resume, &Bare);
        assert_eq!(
            errors_to(&outputs(&mut room), ConnId(1)),
            vec!["unknown_type"]
        );
    }

    #[test]
    fn each_notice_names_the_seq_of_the_one_before_so_a_late_subscriber_misses_nothing() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        room.handle_connect(T0, ConnId(1), 1, None).expect("member");
        let notices = |outs: &[Output]| -> Vec<(i64, i64)> {
            outs.iter()
                .filter_map(|o| match o {
                    Output::Notify(n) => Some((n.prev_seq, n.seq)),
                    _ => None,
                })
                .collect()
        };
        room.handle_text(T0, ConnId(1), &msg("one", "k1"), &Bare);
        assert_eq!(
            notices(&outputs(&mut room)),
            vec![(0, 1)],
            "the first at once"
        );
        room.handle_text(T0 + 1, ConnId(1), &msg("two", "k2"), &Bare);
        room.handle_text(T0 + 2, ConnId(1), &msg("three", "k3"), &Bare);
        assert!(notices(&outputs(&mut room)).is_empty(), "coalesced");
        room.handle_timeout(T0 + 10_000);
        assert_eq!(notices(&outputs(&mut room)), vec![(1, 3)]);
    }

    #[test]
    fn a_non_member_cannot_connect_or_send() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        assert_eq!(
            room.handle_connect(T0, ConnId(9), 99, None),
            Err(RoomError::NotMember)
        );
        assert_eq!(
            room.submit(T0, 99, "x".into(), None, None, &Bare)
                .map(|_| ()),
            Err(RoomError::NotMember)
        );
    }

    #[test]
    fn typing_reaches_others_only_is_throttled_and_a_message_clears_it() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        room.handle_connect(T0, ConnId(1), 1, None).expect("member");
        room.handle_connect(T0, ConnId(2), 2, None).expect("member");
        let typing = serde_json::json!({"type":"typing","conversation_id":1}).to_string();
        let relays = |outs: &[Output]| {
            outs.iter()
                .filter(|o| {
                    matches!(
                        o,
                        Output::Send {
                            to: Target::OthersOf(1),
                            frame: ServerFrame::Typing { user_id: 1, .. }
                        }
                    )
                })
                .count()
        };
        room.handle_text(T0, ConnId(1), &typing, &Bare);
        assert_eq!(relays(&outputs(&mut room)), 1);
        room.handle_text(T0 + 1_000, ConnId(1), &typing, &Bare);
        assert_eq!(relays(&outputs(&mut room)), 0, "throttled within 2 s");
        room.handle_text(T0 + 2_000, ConnId(1), &typing, &Bare);
        assert_eq!(relays(&outputs(&mut room)), 1);
        // A message clears the state: the next typing relays at once.
        room.handle_text(T0 + 2_100, ConnId(1), &msg("done", "k1"), &Bare);
        outputs(&mut room);
        room.handle_text(T0 + 2_200, ConnId(1), &typing, &Bare);
        assert_eq!(relays(&outputs(&mut room)), 1);
        // A newcomer learns who is typing; after 5 s nobody is.
        room.handle_connect(T0 + 2_300, ConnId(3), 2, None)
            .expect("member");
        let outs = outputs(&mut room);
        assert!(outs.iter().any(|o| matches!(
            o,
            Output::Send {
                to: Target::Conn(ConnId(3)),
                frame: ServerFrame::Typing { user_id: 1, .. }
            }
        )));
        room.handle_timeout(T0 + 8_000);
        room.handle_connect(T0 + 8_000, ConnId(4), 2, None)
            .expect("member");
        assert!(outputs(&mut room).is_empty(), "typing expired after 5 s");
    }

    #[test]
    fn a_flood_gets_error_events_then_a_1008_close() {
        let config = RoomConfig {
            rate_burst: 3,
            rate_per_sec: 1,
            flood_strikes: 2,
            ..RoomConfig::default()
        };
        let mut room = room_with(config, &[1, 2]);
        room.handle_connect(T0, ConnId(1), 1, None).expect("member");
        for i in 0..3 {
            room.handle_text(T0, ConnId(1), &msg("x", &format!("k{i}")), &Bare);
        }
        let outs = outputs(&mut room);
        assert_eq!(
            outs.iter()
                .filter(|o| matches!(o, Output::Store(_)))
                .count(),
            3
        );
        room.handle_text(T0, ConnId(1), &msg("x", "k3"), &Bare);
        let outs = outputs(&mut room);
        assert_eq!(errors_to(&outs, ConnId(1)), vec!["rate_limited"]);
        assert!(closes(&outs).is_empty(), "one refusal is recoverable");
        room.handle_text(T0, ConnId(1), &msg("x", "k4"), &Bare);
        let outs = outputs(&mut room);
        assert_eq!(errors_to(&outs, ConnId(1)), vec!["rate_limited"]);
        assert_eq!(closes(&outs), vec![(ConnId(1), close::POLICY)]);
        assert_eq!(room.last_seq(), 3, "refused messages are not stored");
        // The bucket refills.
        room.handle_connect(T0 + 2_000, ConnId(2), 1, None)
            .expect("member");
        room.handle_text(T0 + 2_000, ConnId(2), &msg("x", "k5"), &Bare);
        assert_eq!(room.last_seq(), 4);
    }

    #[test]
    fn bad_frames_get_typed_errors_and_the_connection_survives_except_oversize() {
        let mut room = room_with(RoomConfig::default(), &[1]);
        room.handle_connect(T0, ConnId(1), 1, None).expect("member");
        let cases = [
            ("{nope".to_owned(), "invalid_json"),
            ("[1,2]".to_owned(), "invalid_json"),
            (r#"{"type":"dance"}"#.to_owned(), "unknown_type"),
            // Content may be left out next to attachments; without them
            // a missing content is an empty one.
            (
                r#"{"type":"message","conversation_id":1}"#.to_owned(),
                "empty_field",
            ),
            (
                r#"{"type":"read","conversation_id":2,"seq":1}"#.to_owned(),
                "wrong_conversation",
            ),
            (msg("   ", "k"), "empty_field"),
            (msg(&"x".repeat(4_001), "k"), "too_long"),
            (msg("hi", "bad key"), "invalid_field"),
        ];
        for (text, code) in cases {
            room.handle_text(T0, ConnId(1), &text, &Bare);
            let outs = outputs(&mut room);
            assert_eq!(errors_to(&outs, ConnId(1)), vec![code], "{text}");
            assert!(closes(&outs).is_empty());
        }
        assert_eq!(room.last_seq(), 0);
        room.handle_text(T0, ConnId(1), &"x".repeat(MAX_FRAME_BYTES + 1), &Bare);
        let outs = outputs(&mut room);
        assert_eq!(errors_to(&outs, ConnId(1)), vec!["frame_too_large"]);
        assert_eq!(closes(&outs), vec![(ConnId(1), close::TOO_BIG)]);
    }

    #[test]
    fn removing_a_member_closes_their_connections_only() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        room.handle_connect(T0, ConnId(1), 1, None).expect("member");
        room.handle_connect(T0, ConnId(2), 2, None).expect("member");
        room.handle_connect(T0, ConnId(3), 2, None).expect("member");
        room.set_members(
            T0,
            &[Watermark {
                user_id: 1,
                delivered_seq: 0,
                read_seq: 0,
            }],
            0,
        );
        let mut closed = closes(&outputs(&mut room));
        closed.sort();
        assert_eq!(closed, vec![(ConnId(2), 1008), (ConnId(3), 1008)]);
        assert_eq!(room.connection_count(), 1);
        assert!(!room.is_member(2));
    }

    #[test]
    fn resuming_replays_the_gap_or_asks_for_a_resync() {
        let config = RoomConfig {
            replay_window: 3,
            rate_burst: 100,
            ..RoomConfig::default()
        };
        let mut room = room_with(config, &[1, 2]);
        for i in 1..=6 {
            room.submit(T0, 1, format!("m{i}"), Some(format!("k{i}")), None, &Bare)
                .expect("send");
        }
        outputs(&mut room);
        // Nothing is flushed yet: the window keeps all six.
        room.handle_connect(T0, ConnId(2), 2, Some(1))
            .expect("member");
        let replayed: Vec<i64> = outputs(&mut room)
            .iter()
            .filter_map(|o| match o {
                Output::Send {
                    frame: ServerFrame::Message { message },
                    ..
                } => Some(message.seq),
                _ => None,
            })
            .collect();
        assert_eq!(replayed, vec![2, 3, 4, 5, 6]);
        // Once flushed, only the last three stay.
        let batch = room.poll_flush(T0 + 1_000).expect("due");
        let stored = batch.messages.iter().map(|m| m.id).collect();
        room.handle_flush_result(
            T0 + 1_000,
            batch.id,
            &FlushOutcome {
                stored,
                rejected: vec![],
                receipts_ok: true,
            },
        );
        outputs(&mut room);
        assert_eq!(room.window_start(), 4);
        room.handle_connect(T0, ConnId(3), 2, Some(1))
            .expect("member");
        let outs = outputs(&mut room);
        assert!(outs.iter().any(|o| matches!(
            o,
            Output::Send {
                frame: ServerFrame::Resync { from_seq: 2, .. },
                ..
            }
        )));
        room.handle_connect(T0, ConnId(4), 2, Some(3))
            .expect("member");
        let n = outputs(&mut room)
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    Output::Send {
                        frame: ServerFrame::Message { .. },
                        ..
                    }
                )
            })
            .count();
        assert_eq!(n, 3);
    }

    #[test]
    fn a_resend_returns_the_original_and_stores_nothing() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        let first = room
            .submit(T0, 1, "hi".into(), Some("k".into()), None, &Bare)
            .expect("send");
        outputs(&mut room);
        let again = room
            .submit(T0 + 5, 1, "hi".into(), Some("k".into()), None, &Bare)
            .expect("resend");
        let (Sent::New(first), Sent::Duplicate(again)) = (first, again) else {
            panic!("expected a new message, then its duplicate");
        };
        assert_eq!(again.id, first.id);
        assert_eq!(again.seq, 1);
        assert!(outputs(&mut room).is_empty());
        // Another sender may use the same key.
        let other = room
            .submit(T0, 2, "yo".into(), Some("k".into()), None, &Bare)
            .expect("send");
        assert_eq!(other.seq(), 2);
    }

    /// Storage that remembers one old key, or fails.
    struct OldKey(Option<KnownKey>);

    impl Context for OldKey {
        fn claim_key(&self, sender: i64, key: &str, _: KnownKey) -> Result<Claim, StorageFailed> {
            match self.0 {
                Some(k) if sender == 1 && key == "old" => Ok(Claim::Known(k)),
                Some(_) => Ok(Claim::Claimed),
                None => Err(StorageFailed),
            }
        }
        fn verify_token(&self, _: &str, _: Millis) -> Result<Verified, AuthError> {
            Err(AuthError::Invalid)
        }
    }

    #[test]
    fn a_resend_of_a_key_memory_forgot_is_answered_from_storage() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        room.set_members(T0, &[], 40);
        room.set_members(
            T0,
            &[1, 2].map(|user_id| Watermark {
                user_id,
                delivered_seq: 0,
                read_seq: 0,
            }),
            40,
        );
        room.handle_connect(T0, ConnId(1), 1, None).expect("member");
        outputs(&mut room);
        let original = KnownKey {
            seq: 7,
            id: Uuid::from_u128(7),
            created_at_ms: 1,
        };
        let storage = OldKey(Some(original));
        let frame = msg("again", "old");
        room.handle_text(T0, ConnId(1), &frame, &storage);
        let outs = outputs(&mut room);
        assert!(
            !outs.iter().any(|o| matches!(o, Output::Store(_))),
            "nothing is stored for a known key"
        );
        assert!(outs.iter().any(|o| matches!(
            o,
            Output::Send {
                to: Target::Conn(ConnId(1)),
                frame: ServerFrame::Ack { seq: 7, id, .. }
            } if *id == original.id
        )));
        assert_eq!(room.last_seq(), 40, "no seq is spent on a resend");
        // The POST path gets the key back to read the message from its log.
        let sent = room
            .submit(T0, 1, "again".into(), Some("old".into()), None, &storage)
            .expect("resend");
        assert_eq!(sent, Sent::DuplicateOlder(original));
        // A fresh key is a new message.
        let fresh = room
            .submit(T0, 1, "new".into(), Some("fresh".into()), None, &storage)
            .expect("send");
        assert_eq!(fresh.seq(), 41);
    }

    #[test]
    fn a_key_claim_that_fails_refuses_the_send_and_stores_nothing() {
        let mut room = room_with(RoomConfig::default(), &[1]);
        let refused = room.submit(T0, 1, "x".into(), Some("k".into()), None, &OldKey(None));
        assert_eq!(refused, Err(RoomError::Storage));
        assert_eq!(RoomError::Storage.http_status(), 503);
        assert_eq!(room.last_seq(), 0);
        assert!(outputs(&mut room).is_empty());
    }

    #[test]
    fn every_kind_of_frame_draws_on_the_bucket() {
        let config = RoomConfig {
            rate_burst: 2,
            rate_per_sec: 1,
            flood_strikes: 3,
            ..RoomConfig::default()
        };
        for frame in [
            serde_json::json!({"type":"typing","conversation_id":1}).to_string(),
            serde_json::json!({"type":"read","conversation_id":1,"seq":0}).to_string(),
            serde_json::json!({"type":"ping"}).to_string(),
            "{garbage".to_owned(),
        ] {
            let mut room = room_with(config.clone(), &[1, 2]);
            room.handle_connect(T0, ConnId(1), 1, None).expect("member");
            let mut limited = 0;
            for _ in 0..40 {
                room.handle_text(T0, ConnId(1), &frame, &Bare);
                let outs = outputs(&mut room);
                limited += errors_to(&outs, ConnId(1))
                    .iter()
                    .filter(|c| *c == "rate_limited")
                    .count();
                if !closes(&outs).is_empty() {
                    break;
                }
            }
            assert!(limited >= 3, "{frame}: throttled");
            assert_eq!(room.connection_count(), 0, "{frame}: a flood is closed");
        }
    }

    /// Tokens for user 1 valid until T0 + 60 s; "bob" is user 2's.
    struct Tokens;

    impl Context for Tokens {
        fn claim_key(&self, _: i64, _: &str, _: KnownKey) -> Result<Claim, StorageFailed> {
            Ok(Claim::Claimed)
        }
        fn verify_token(&self, token: &str, now: Millis) -> Result<Verified, AuthError> {
            match token {
                "alex" => Ok(Verified {
                    user_id: 1,
                    valid_until: now + 60_000,
                }),
                "bob" => Ok(Verified {
                    user_id: 2,
                    valid_until: now + 60_000,
                }),
                "old" => Err(AuthError::Expired),
                _ => Err(AuthError::Invalid),
            }
        }
    }

    fn auth(token: &str) -> String {
        serde_json::json!({"type":"auth","token":token}).to_string()
    }

    #[test]
    fn a_connection_whose_token_runs_out_is_told_and_closed() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        room.handle_connect(T0, ConnId(1), 1, None).expect("member");
        room.set_valid_until(ConnId(1), Some(T0 + 1_000));
        room.handle_connect(T0, ConnId(2), 2, None).expect("member");
        assert_eq!(room.poll_timeout(), Some(T0 + 1_000));
        room.handle_timeout(T0 + 999);
        assert!(closes(&outputs(&mut room)).is_empty());
        room.handle_timeout(T0 + 1_000);
        let outs = outputs(&mut room);
        assert_eq!(errors_to(&outs, ConnId(1)), vec!["token_expired"]);
        assert_eq!(closes(&outs), vec![(ConnId(1), close::POLICY)]);
        assert_eq!(room.connection_count(), 1, "the other connection stays");
    }

    #[test]
    fn renewing_the_token_extends_the_connection_and_a_bad_one_does_not() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        room.handle_connect(T0, ConnId(1), 1, None).expect("member");
        room.set_valid_until(ConnId(1), Some(T0 + 1_000));
        room.handle_text(T0 + 500, ConnId(1), &auth("old"), &Tokens);
        let outs = outputs(&mut room);
        assert_eq!(errors_to(&outs, ConnId(1)), vec!["token_expired"]);
        assert!(closes(&outs).is_empty(), "a refused renewal is recoverable");
        room.handle_text(T0 + 600, ConnId(1), &auth("alex"), &Tokens);
        let outs = outputs(&mut room);
        assert!(outs.iter().any(|o| matches!(
            o,
            Output::Send {
                to: Target::Conn(ConnId(1)),
                frame: ServerFrame::AuthOk
            }
        )));
        assert_eq!(room.poll_timeout(), Some(T0 + 60_600));
        room.handle_timeout(T0 + 30_000);
        assert!(closes(&outputs(&mut room)).is_empty(), "renewed");
        // Another user's token on this connection is a policy violation.
        room.handle_text(T0 + 31_000, ConnId(1), &auth("bob"), &Tokens);
        let outs = outputs(&mut room);
        assert_eq!(errors_to(&outs, ConnId(1)), vec!["invalid_token"]);
        assert_eq!(closes(&outs), vec![(ConnId(1), close::POLICY)]);
        assert_eq!(
            room.poll_timeout(),
            None,
            "a closed connection has no deadline"
        );
    }

    #[test]
    fn watermarks_are_stored_before_the_origin_hears_of_them_and_marked_synced_after() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        outputs(&mut room);
        room.handle_connect(T0, ConnId(2), 2, None).expect("member");
        room.submit(T0, 1, "hi".into(), None, None, &Bare)
            .expect("send");
        outputs(&mut room);
        let batch = room.poll_flush(T0 + 1_000).expect("due");
        let stored: Vec<Watermark> = outputs(&mut room)
            .into_iter()
            .filter_map(|o| match o {
                Output::StoreWatermark(w) => Some(w),
                _ => None,
            })
            .collect();
        assert_eq!(
            stored.len(),
            batch.receipts.len(),
            "each receipt in the batch was written first"
        );
        assert!(
            stored
                .iter()
                .any(|w| w.user_id == 2 && w.delivered_seq == 1)
        );
        room.handle_flush_result(
            T0 + 1_100,
            batch.id,
            &FlushOutcome {
                stored: batch.messages.iter().map(|m| m.id).collect(),
                rejected: vec![],
                receipts_ok: true,
            },
        );
        let outs = outputs(&mut room);
        assert!(
            outs.iter()
                .any(|o| matches!(o, Output::MarkReceiptsSynced(ws) if ws.len() == stored.len()))
        );
    }

    /// A driver whose writes fail from the `fail_at`-th one on.
    #[derive(Default)]
    struct Flaky {
        fail_at: usize,
        writes: usize,
        sent: Vec<ServerFrame>,
    }

    impl Driver for Flaky {
        type Error = &'static str;
        fn store(&mut self, _: &Record) -> Result<(), &'static str> {
            self.writes += 1;
            if self.writes >= self.fail_at {
                Err("disk full")
            } else {
                Ok(())
            }
        }
        fn store_change(&mut self, r: &Record, _: &MessageState) -> Result<(), &'static str> {
            self.store(r)
        }
        fn store_watermark(&mut self, _: &Watermark) -> Result<(), &'static str> {
            Ok(())
        }
        fn replace_members(&mut self, _: &[StoredWatermark]) -> Result<(), &'static str> {
            Ok(())
        }
        fn mark_flushed(&mut self, _: &Confirmed) -> Result<(), &'static str> {
            Ok(())
        }
        fn mark_receipts_synced(&mut self, _: &[Watermark]) -> Result<(), &'static str> {
            Ok(())
        }
        fn send(&mut self, _: &Recipients<'_>, frame: &ServerFrame) {
            self.sent.push(frame.clone());
        }
        fn close(&mut self, _: ConnId, _: u16, _: &str) {}
        fn notify(&mut self, _: ConversationNotice) {}
        fn forward(&mut self, _: &[i64], frame: &ServerFrame) {
            self.sent.push(frame.clone());
        }
    }

    #[test]
    fn a_failed_store_stops_the_drain_before_the_ack_and_the_broadcast() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        room.handle_connect(T0, ConnId(1), 1, None).expect("member");
        room.handle_connect(T0, ConnId(2), 2, None).expect("member");
        let mut driver = Flaky {
            fail_at: 2,
            ..Flaky::default()
        };
        drain(&mut room, &mut driver).expect("nothing to write yet");
        room.handle_text(T0, ConnId(1), &msg("one", "k1"), &Bare);
        drain(&mut room, &mut driver).expect("the first write succeeds");
        let before = driver.sent.len();
        assert!(before >= 2, "ack and broadcast of the stored message");
        room.handle_text(T0, ConnId(1), &msg("two", "k2"), &Bare);
        let failed = drain(&mut room, &mut driver).expect_err("the second write fails");
        assert_eq!(failed.error, "disk full");
        assert!(
            failed.dropped >= 2,
            "the ack and the broadcast were dropped"
        );
        assert_eq!(
            driver.sent.len(),
            before,
            "nothing went out after the failure"
        );
        assert!(room.poll_output().is_none());
    }

    #[test]
    fn failed_flushes_back_off_exponentially_and_keep_the_messages() {
        let config = RoomConfig {
            backoff_initial_ms: 500,
            backoff_max_ms: 4_000,
            flush_delay_ms: 100,
            ..RoomConfig::default()
        };
        let mut room = room_with(config, &[1]);
        room.submit(T0, 1, "hi".into(), None, None, &Bare)
            .expect("send");
        assert_eq!(room.poll_timeout(), Some(T0 + 100));
        assert!(room.poll_flush(T0 + 50).is_none(), "not due yet");
        let mut now = T0 + 100;
        let mut waits = Vec::new();
        for _ in 0..5 {
            let batch = room.poll_flush(now).expect("due");
            room.handle_flush_failure(now, batch.id);
            let next = room.poll_timeout().expect("retry scheduled");
            waits.push(next - now);
            now = next;
        }
        assert_eq!(waits, vec![500, 1_000, 2_000, 4_000, 4_000]);
        assert_eq!(room.unflushed(), 1);
        let batch = room.poll_flush(now).expect("due");
        room.handle_flush_result(
            now,
            batch.id,
            &FlushOutcome {
                stored: vec![batch.messages[0].id],
                rejected: vec![],
                receipts_ok: true,
            },
        );
        assert_eq!(room.unflushed(), 0);
        let outs = outputs(&mut room);
        assert!(outs.contains(&Output::MarkFlushed(Confirmed {
            runs: vec![1..=1],
            prefix_end: 2,
            last_seq: 1,
        })));
    }

    #[test]
    fn read_receipts_are_broadcast_and_coalesced_per_user() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        room.handle_connect(T0, ConnId(1), 1, None).expect("member");
        for i in 1..=3 {
            room.submit(T0, 1, format!("m{i}"), None, None, &Bare)
                .expect("send");
        }
        outputs(&mut room);
        let receipts = |outs: &[Output]| -> Vec<(i64, i64)> {
            outs.iter()
                .filter_map(|o| match o {
                    Output::Send {
                        to: Target::All,
                        frame:
                            ServerFrame::Receipt {
                                user_id, read_seq, ..
                            },
                    } => Some((*user_id, *read_seq)),
                    _ => None,
                })
                .collect()
        };
        room.handle_read(T0, 2, 1).expect("member");
        assert_eq!(receipts(&outputs(&mut room)), vec![(2, 1)]);
        room.handle_read(T0 + 100, 2, 2).expect("member");
        room.handle_read(T0 + 200, 2, 99).expect("member");
        let outs = outputs(&mut room);
        assert!(receipts(&outs).is_empty(), "coalesced");
        assert!(
            outs.iter()
                .any(|o| matches!(o, Output::StoreWatermark(w) if w.read_seq == 3)),
            "clamped to last_seq and persisted"
        );
        assert!(room.poll_timeout().is_some_and(|t| t <= T0 + 1_000));
        room.handle_timeout(T0 + 1_000);
        assert_eq!(receipts(&outputs(&mut room)), vec![(2, 3)]);
        let view = room.message(3).expect("in window");
        assert_eq!(view.status, MessageStatus::Read);
    }

    #[test]
    fn notices_carry_each_members_unread_count_and_are_coalesced() {
        let mut room = room_with(RoomConfig::default(), &[1, 2, 3]);
        let notices = |outs: &[Output]| -> Vec<ConversationNotice> {
            outs.iter()
                .filter_map(|o| match o {
                    Output::Notify(n) => Some(n.clone()),
                    _ => None,
                })
                .collect()
        };
        room.submit(T0, 1, "one".into(), None, None, &Bare)
            .expect("send");
        let first = notices(&outputs(&mut room));
        assert_eq!(first.len(), 1, "the first message notifies at once");
        assert_eq!(first[0].recipients, vec![(1, 0), (2, 1), (3, 1)]);
        assert_eq!(
            first[0].last_message.as_ref().map(|m| m.content.as_str()),
            Some("one")
        );
        // Two more within the interval: one notice at its end.
        room.submit(T0 + 50, 1, "two".into(), None, None, &Bare)
            .expect("send");
        room.submit(T0 + 100, 2, "three".into(), None, None, &Bare)
            .expect("send");
        assert!(notices(&outputs(&mut room)).is_empty());
        assert!(room.poll_timeout().is_some_and(|t| t <= T0 + 250));
        room.handle_timeout(T0 + 250);
        let later = notices(&outputs(&mut room));
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].seq, 3);
        assert_eq!(later[0].recipients, vec![(1, 1), (2, 2), (3, 3)]);
        // Reading tells the reader's other tabs: unread back to 0.
        room.handle_read(T0 + 600, 3, 3).expect("member");
        let read = notices(&outputs(&mut room));
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].recipients, vec![(3, 0)]);
    }

    // ---- attachments ------------------------------------------------------

    /// A context whose storage knows some uploads.
    struct Uploads(Vec<PendingAttachment>);

    impl Context for Uploads {
        fn claim_key(&self, _: i64, _: &str, _: KnownKey) -> Result<Claim, StorageFailed> {
            Ok(Claim::Claimed)
        }
        fn verify_token(&self, _: &str, _: Millis) -> Result<Verified, AuthError> {
            Err(AuthError::Invalid)
        }
        fn attachment(&self, id: Uuid) -> Result<Option<PendingAttachment>, StorageFailed> {
            Ok(self.0.iter().find(|p| p.meta.id == id).cloned())
        }
    }

    fn upload(n: u128, uploader: i64, seq: Option<i64>, age_ms: i64) -> PendingAttachment {
        PendingAttachment {
            meta: AttachmentMeta {
                id: Uuid::from_u128(n),
                conversation_id: 1,
                uploader_id: uploader,
                kind: MediaKind::Image,
                mime: "image/jpeg".into(),
                size: 1_000,
                name: None,
                width: Some(4),
                height: Some(3),
                duration_ms: None,
                status: crate::media::AttachmentStatus::Processing,
                has_thumbnail: false,
            },
            registered_at_ms: i64::try_from(T0).expect("ms") - age_ms,
            seq,
        }
    }

    fn draft(content: &str, ids: &[u128]) -> Draft {
        Draft {
            content: content.into(),
            client_msg_id: Some(format!("k{}", ids.len())),
            attachment_ids: ids.iter().map(|&n| Uuid::from_u128(n)).collect(),
            ..Draft::default()
        }
    }

    #[test]
    fn a_message_carries_its_senders_uploads_into_storage_and_the_broadcast() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        let ctx = Uploads(vec![upload(10, 1, None, 0), upload(11, 1, None, 0)]);
        let sent = room
            .submit_draft(T0, 1, draft("", &[11, 10]), None, &ctx)
            .expect("sent");
        let Sent::New(view) = sent else {
            panic!("not new: {sent:?}")
        };
        assert_eq!(view.content, "");
        let ids: Vec<Uuid> = view.attachments.iter().map(|a| a.meta.id).collect();
        assert_eq!(ids, vec![Uuid::from_u128(11), Uuid::from_u128(10)]);
        let outs = outputs(&mut room);
        let stored = outs
            .iter()
            .find_map(|o| match o {
                Output::Store(r) => Some(r.clone()),
                _ => None,
            })
            .expect("stored");
        assert_eq!(stored.attachments.len(), 2);
        assert_eq!(
            stored.to_stored(1).attachment_ids,
            vec![Uuid::from_u128(11), Uuid::from_u128(10)]
        );
        assert_eq!(stored.preview(), "📎 2 attachments");
        assert!(outs.iter().any(|o| matches!(
            o,
            Output::Send { to: Target::All, frame: ServerFrame::Message { message } }
                if message.attachments.len() == 2
        )));
    }

    #[test]
    fn attachments_a_sender_may_not_send_are_refused_before_anything_is_stored() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        let ctx = Uploads(vec![
            upload(10, 2, None, 0),                             // someone else's
            upload(11, 1, Some(4), 0),                          // already sent
            upload(12, 1, None, ATTACHMENT_SEND_WINDOW_MS + 1), // too old
            upload(13, 1, None, 0),                             // fine
        ]);
        for ids in [&[10][..], &[11], &[12], &[99], &[13, 13]] {
            let r = room.submit_draft(T0, 1, draft("x", ids), None, &ctx);
            assert!(matches!(r, Err(RoomError::Attachment(_))), "{ids:?}: {r:?}");
        }
        let too_many: Vec<u128> = (100..111).collect();
        assert!(matches!(
            room.submit_draft(T0, 1, draft("x", &too_many), None, &ctx),
            Err(RoomError::Attachment(_))
        ));
        assert_eq!(RoomError::Attachment(String::new()).http_status(), 422);
        assert!(
            !outputs(&mut room)
                .iter()
                .any(|o| matches!(o, Output::Store(_))),
            "a refusal stores nothing"
        );
        assert_eq!(room.last_seq(), 0);
        // Text stays required without attachments.
        assert!(matches!(
            room.submit_draft(T0, 1, draft(" ", &[]), None, &ctx),
            Err(RoomError::Invalid(_))
        ));
        assert!(
            room.submit_draft(T0, 1, draft("", &[13]), None, &ctx)
                .is_ok()
        );
    }

    #[test]
    fn a_processed_attachment_updates_held_messages_and_reaches_everyone() {
        let mut room = room_with(RoomConfig::default(), &[1, 2]);
        let ctx = Uploads(vec![upload(10, 1, None, 0)]);
        room.submit_draft(T0, 1, draft("look", &[10]), None, &ctx)
            .expect("sent");
        outputs(&mut room);
        let mut ready = upload(10, 1, None, 0).meta;
        ready.status = crate::media::AttachmentStatus::Ready;
        ready.has_thumbnail = true;
        assert_eq!(room.update_attachment(ready.clone(), true), vec![1]);
        let held = room.message(1).expect("held");
        assert_eq!(held.attachments[0].meta, ready);
        assert!(outputs(&mut room).iter().any(|o| matches!(
            o,
            Output::Send { to: Target::All, frame: ServerFrame::AttachmentUpdated { attachment } }
                if attachment.meta == ready
        )));
        // An upload nobody was sent is nobody else's business yet.
        let mut other = upload(11, 1, None, 0).meta;
        other.status = crate::media::AttachmentStatus::Ready;
        assert!(room.update_attachment(other, false).is_empty());
        assert!(outputs(&mut room).is_empty());
    }
}
