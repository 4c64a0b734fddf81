//! The Room's SQLite: the durable half of `shared::room`.
//!
//! [`RoomSql`] answers the room's reads ([`RoomStorage`], and the key
//! lookups of [`Context`]) and executes its outputs ([`Driver`]). Writes
//! in one Durable Object event are committed together, and workerd's output
//! gate holds every frame sent in that event until they are durable; a
//! write that throws stops the drain (see `shared::room::drain`).
//!
//! Tables:
//! - `messages`: the replay window and the outbox (`flushed = 0` until the
//!   origin confirms). Confirmed rows beyond [`RETAIN_MESSAGES`] are pruned.
//! - `msg_keys`: every `(sender, client_msg_id)` ever stored, never pruned:
//!   idempotency has no horizon.
//! - `members`: watermarks, with `synced` once the origin has those values.
//! - `meta`: the conversation id, the origin's last seq at creation, the
//!   schema version.
//! - `subscribers`: members whose `User` object gets the room's live frames
//!   (`crate::forward`); a row goes when the object says its user is offline.
//! - `attachments`: uploads registered by the Worker after they reached the
//!   bucket, with the seq of the message that carries each once sent. A
//!   message's row holds its attachments' metadata as JSON, so replay and
//!   the outbox need no join. Sent rows stay (deleting an old message
//!   erases its objects by them);
//!   unsent ones leave when the origin's cleanup reaps them.
//! - `messages.extra`: a message's reply, mentions and state (edits,
//!   deletion, reactions), or a change's target and what it did, as JSON.
//! - `msg_state`: the current state of every message ever changed, by id,
//!   never pruned: a change to a message older than the log still knows
//!   its reactions and whether it was deleted. `msg_keys.is_change` tells
//!   a change's key from a message's, so only messages can be targets.
//! - `moderators`: who may delete anyone's message (from the origin).
//! - `purge`: attachment objects a delete has to remove from the bucket;
//!   a row goes once its objects are gone, so a failed delete is retried.

use serde::Deserialize;
use shared::auth::{AUDIENCE_API, AuthError, LEEWAY_SECS};
use shared::media::{AttachmentMeta, Signer};
use shared::protocol::ReplyPreview;
use shared::protocol::ServerFrame;
use shared::protocol::internal::ConversationNotice;
use shared::receipts::Watermark;
use shared::room::lifecycle::{Change, ChangeRecord, MessageState, Target};
use shared::room::{
    Claim, Confirmed, ConnId, Context, Driver, KnownKey, Millis, PendingAttachment, Recipients,
    Record, RoomStorage, StorageFailed, StoredWatermark, Verified,
};
use std::cell::RefCell;
use uuid::Uuid;
use worker::{SqlStorage, SqlStorageValue};

use crate::conns::Connections;
use crate::error::{EdgeError, EdgeResult};

/// Confirmed messages kept in SQLite, so a resend of an older message
/// still gets the whole original back over HTTP, and a wake rebuilds the
/// replay window without the origin.
pub const RETAIN_MESSAGES: i64 = 5_000;
/// The schema this code writes; older rooms are migrated on load.
const SCHEMA_VERSION: i64 = 5;

/// The Room's SQLite, and what the room needs beside it for one event.
pub struct RoomSql<'a> {
    pub sql: &'a SqlStorage,
    pub conns: &'a Connections,
    pub notices: &'a RefCell<Vec<ConversationNotice>>,
    /// Set when a delete queued objects in `purge`.
    pub purge_due: &'a std::cell::Cell<bool>,
    pub forwarder: &'a crate::forward::Forwarder,
    pub jwt_secret: &'a [u8],
    /// Signs attachment links in frames as they leave.
    pub signer: &'a Signer,
    /// The request being handled (see `telemetry::Current`).
    pub current: &'a RefCell<Option<crate::telemetry::Current>>,
}

impl std::fmt::Debug for RoomSql<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomSql").finish_non_exhaustive()
    }
}

/// Whether this object has ever been set up as a room (a read: nothing is
/// written for a probe of a conversation that does not exist).
pub fn exists(sql: &SqlStorage) -> EdgeResult<bool> {
    #[derive(Deserialize)]
    struct Row {
        n: i64,
    }
    let rows: Vec<Row> = sql
        .exec(
            "SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
            None,
        )?
        .to_array()?;
    if rows.first().is_none_or(|r| r.n == 0) {
        return Ok(false);
    }
    Ok(meta_get(sql, "members_loaded")?.is_some())
}

/// Creates the tables, or migrates an older room's.
pub fn create_schema(sql: &SqlStorage) -> EdgeResult<()> {
    sql.exec(
        "CREATE TABLE IF NOT EXISTS messages (
             seq INTEGER PRIMARY KEY,
             id TEXT NOT NULL,
             sender_id INTEGER NOT NULL,
             content TEXT NOT NULL,
             created_at_ms INTEGER NOT NULL,
             client_msg_id TEXT NOT NULL,
             flushed INTEGER NOT NULL DEFAULT 0,
             attachments TEXT,
             extra TEXT
         );
         CREATE TABLE IF NOT EXISTS msg_keys (
             sender_id INTEGER NOT NULL,
             client_msg_id TEXT NOT NULL,
             seq INTEGER NOT NULL,
             id TEXT NOT NULL,
             created_at_ms INTEGER NOT NULL,
             PRIMARY KEY (sender_id, client_msg_id)
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS members (
             user_id INTEGER PRIMARY KEY,
             delivered_seq INTEGER NOT NULL,
             read_seq INTEGER NOT NULL,
             synced INTEGER NOT NULL DEFAULT 0
         );
         CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS subscribers (user_id INTEGER PRIMARY KEY);
         CREATE TABLE IF NOT EXISTS attachments (
             id TEXT PRIMARY KEY,
             meta TEXT NOT NULL,
             registered_at_ms INTEGER NOT NULL,
             seq INTEGER
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS msg_state (id TEXT PRIMARY KEY, state TEXT NOT NULL)
             WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS moderators (user_id INTEGER PRIMARY KEY);
         CREATE TABLE IF NOT EXISTS purge (id TEXT PRIMARY KEY) WITHOUT ROWID;",
        None,
    )?;
    let version = meta_get(sql, "schema_version")?.unwrap_or(1);
    if version < 2 && meta_get(sql, "members_loaded")?.is_some() {
        // Version 1 kept keys only with their (pruned) messages and had no
        // synced flag: copy the keys over, and treat every watermark as
        // unknown to the origin (it takes the maximum, so resending is
        // harmless).
        // A query naming the column fails exactly when it is missing.
        let has_synced = sql.exec("SELECT synced FROM members LIMIT 0", None).is_ok();
        if !has_synced {
            sql.exec(
                "ALTER TABLE members ADD COLUMN synced INTEGER NOT NULL DEFAULT 0",
                None,
            )?;
        }
        sql.exec(
            "INSERT OR IGNORE INTO msg_keys (sender_id, client_msg_id, seq, id, created_at_ms)
             SELECT sender_id, client_msg_id, seq, id, created_at_ms FROM messages",
            None,
        )?;
    }
    if version < 3 {
        // Version 2 indexed messages by key (msg_keys' primary key already
        // makes keys unique) and by flushed (the room now names the
        // confirmed prefix itself): two B-trees written per message and
        // per confirmation for nothing.
        sql.exec(
            "DROP INDEX IF EXISTS messages_key; DROP INDEX IF EXISTS messages_unflushed;",
            None,
        )?;
    }
    if version < 4 {
        // Version 3 had no attachments on messages.
        let has_column = sql
            .exec("SELECT attachments FROM messages LIMIT 0", None)
            .is_ok();
        if !has_column {
            sql.exec("ALTER TABLE messages ADD COLUMN attachments TEXT", None)?;
        }
    }
    if version < 5 {
        // Version 4 knew only messages: no extra column, and keys did not
        // say whether they were a change's (none was).
        if sql
            .exec("SELECT extra FROM messages LIMIT 0", None)
            .is_err()
        {
            sql.exec("ALTER TABLE messages ADD COLUMN extra TEXT", None)?;
        }
        if sql
            .exec("SELECT is_change FROM msg_keys LIMIT 0", None)
            .is_err()
        {
            sql.exec(
                "ALTER TABLE msg_keys ADD COLUMN is_change INTEGER NOT NULL DEFAULT 0",
                None,
            )?;
        }
    }
    // A change names its target by id; a delete finds its attachments
    // by the target's seq.
    sql.exec(
        "CREATE INDEX IF NOT EXISTS msg_keys_id ON msg_keys (id);
         CREATE INDEX IF NOT EXISTS attachments_seq ON attachments (seq);",
        None,
    )?;
    if version != SCHEMA_VERSION {
        meta_set(sql, "schema_version", SCHEMA_VERSION)?;
    }
    Ok(())
}

pub fn meta_get(sql: &SqlStorage, key: &str) -> EdgeResult<Option<i64>> {
    #[derive(Deserialize)]
    struct Row {
        value: i64,
    }
    let rows: Vec<Row> = sql
        .exec("SELECT value FROM meta WHERE key = ?", vec![key.into()])?
        .to_array()?;
    Ok(rows.first().map(|r| r.value))
}

pub fn meta_set(sql: &SqlStorage, key: &str, value: i64) -> EdgeResult<()> {
    sql.exec(
        "INSERT INTO meta (key, value) VALUES (?, ?)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        vec![key.into(), value.into()],
    )?;
    Ok(())
}

#[derive(Deserialize)]
struct MessageRow {
    seq: i64,
    id: String,
    sender_id: i64,
    content: String,
    created_at_ms: i64,
    client_msg_id: String,
    flushed: i64,
    #[serde(default)]
    attachments: Option<String>,
    #[serde(default)]
    extra: Option<String>,
}

/// What a row holds beyond the seed's columns (`messages.extra`).
#[derive(Debug, Default, serde::Serialize, Deserialize)]
struct Extra {
    /// The quoted message, without its text (never copied: see erasure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply_to: Option<ReplyPreview>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    mentions: Vec<i64>,
    #[serde(default, skip_serializing_if = "is_default")]
    state: MessageState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    change: Option<ChangeRecord>,
}

fn is_default(s: &MessageState) -> bool {
    *s == MessageState::default()
}

impl Extra {
    fn of(r: &Record) -> Self {
        Self {
            reply_to: r.reply_to.clone().map(|q| ReplyPreview {
                content: String::new(),
                ..q
            }),
            mentions: r.mentions.clone(),
            state: r.state.clone(),
            change: r.change.clone(),
        }
    }

    /// The column's value: NULL for a plain message.
    fn column(r: &Record) -> EdgeResult<SqlStorageValue> {
        let extra = Self::of(r);
        if extra.reply_to.is_none()
            && extra.mentions.is_empty()
            && is_default(&extra.state)
            && extra.change.is_none()
        {
            return Ok(SqlStorageValue::Null);
        }
        Ok(serde_json::to_string(&extra)
            .map_err(|e| EdgeError::Internal(e.to_string()))?
            .into())
    }
}

fn json_of<T: serde::Serialize>(value: &T) -> EdgeResult<String> {
    serde_json::to_string(value).map_err(|e| EdgeError::Internal(e.to_string()))
}

impl MessageRow {
    fn into_record(self) -> Record {
        // Written by this code from typed values: a row that does not parse
        // is a bug, logged, and the message keeps its text.
        let attachments = match self.attachments.as_deref() {
            None | Some("") => Vec::new(),
            Some(json) => serde_json::from_str(json).unwrap_or_else(|e| {
                crate::log!(Error, "room storage: attachments unreadable", "seq" => self.seq, "error" => e.to_string());
                Vec::new()
            }),
        };
        let extra: Extra = match self.extra.as_deref() {
            None | Some("") => Extra::default(),
            Some(json) => serde_json::from_str(json).unwrap_or_else(|e| {
                crate::log!(Error, "room storage: extra unreadable", "seq" => self.seq, "error" => e.to_string());
                Extra::default()
            }),
        };
        Record {
            attachments,
            reply_to: extra.reply_to,
            mentions: extra.mentions,
            state: extra.state,
            change: extra.change,
            // Memory only: the log's hot write path stays as it was, and
            // a message flushed after a restart is the rare one that
            // cannot be followed by its request id.
            request_id: None,
            id: self.id.parse().unwrap_or_default(),
            seq: self.seq,
            sender_id: self.sender_id,
            content: self.content,
            created_at_ms: self.created_at_ms,
            client_msg_id: self.client_msg_id,
            flushed: self.flushed != 0,
        }
    }
}

/// A message from the log by seq, if it is still there.
pub fn message_at(sql: &SqlStorage, seq: i64) -> EdgeResult<Option<Record>> {
    let rows: Vec<MessageRow> = sql
        .exec(
            "SELECT seq, id, sender_id, content, created_at_ms, client_msg_id, flushed, attachments,
                    extra
             FROM messages WHERE seq = ?",
            vec![seq.into()],
        )?
        .to_array()?;
    Ok(rows.into_iter().next().map(MessageRow::into_record))
}

/// Logs a failed read and turns it into the room's typed refusal.
fn failed(what: &str, e: &impl std::fmt::Display) -> StorageFailed {
    crate::log!(Error, "room storage failed", "what" => what, "error" => e.to_string());
    StorageFailed
}

impl RoomSql<'_> {
    fn exec(&self, query: &str, params: Vec<SqlStorageValue>) -> EdgeResult<()> {
        self.sql.exec(query, params)?;
        Ok(())
    }
}

impl RoomStorage for RoomSql<'_> {
    fn members(&self) -> Result<Vec<StoredWatermark>, StorageFailed> {
        #[derive(Deserialize)]
        struct Row {
            user_id: i64,
            delivered_seq: i64,
            read_seq: i64,
            synced: i64,
        }
        let rows: Vec<Row> = self
            .sql
            .exec(
                "SELECT user_id, delivered_seq, read_seq, synced FROM members",
                None,
            )
            .and_then(|c| c.to_array())
            .map_err(|e| failed("members", &e))?;
        Ok(rows
            .into_iter()
            .map(|r| StoredWatermark {
                watermark: Watermark {
                    user_id: r.user_id,
                    delivered_seq: r.delivered_seq,
                    read_seq: r.read_seq,
                },
                synced: r.synced != 0,
            })
            .collect())
    }

    fn last_seq(&self) -> Result<i64, StorageFailed> {
        #[derive(Deserialize)]
        struct Row {
            max_seq: Option<i64>,
        }
        let logged = self
            .sql
            .exec("SELECT max(seq) AS max_seq FROM messages", None)
            .and_then(|c| c.to_array::<Row>())
            .map_err(|e| failed("last seq", &e))?
            .first()
            .and_then(|r| r.max_seq)
            .unwrap_or(0);
        let base = meta_get(self.sql, "base_seq")
            .map_err(|e| failed("base seq", &e))?
            .unwrap_or(0);
        Ok(logged.max(base))
    }

    /// A scan of the retained log and the outbox (no index is kept for
    /// it: it runs once per load, and an index would cost a write per
    /// message).
    fn oldest_unflushed(&self) -> Result<Option<i64>, StorageFailed> {
        #[derive(Deserialize)]
        struct Row {
            seq: Option<i64>,
        }
        Ok(self
            .sql
            .exec(
                "SELECT min(seq) AS seq FROM messages WHERE flushed = 0",
                None,
            )
            .and_then(|c| c.to_array::<Row>())
            .map_err(|e| failed("oldest unflushed", &e))?
            .first()
            .and_then(|r| r.seq))
    }

    fn messages_from(&self, from: i64) -> Result<Vec<Record>, StorageFailed> {
        let rows: Vec<MessageRow> = self
            .sql
            .exec(
                "SELECT seq, id, sender_id, content, created_at_ms, client_msg_id, flushed,
                        attachments, extra
                 FROM messages WHERE seq >= ? ORDER BY seq",
                vec![from.into()],
            )
            .and_then(|c| c.to_array())
            .map_err(|e| failed("messages", &e))?;
        Ok(rows.into_iter().map(MessageRow::into_record).collect())
    }

    fn forget_keys_after(&self, last_seq: i64) -> Result<(), StorageFailed> {
        self.sql
            .exec("DELETE FROM msg_keys WHERE seq > ?", vec![last_seq.into()])
            .map_err(|e| failed("forget unstored keys", &e))?;
        Ok(())
    }
}

impl Context for RoomSql<'_> {
    fn claim_key(
        &self,
        sender_id: i64,
        client_msg_id: &str,
        candidate: KnownKey,
    ) -> Result<Claim, StorageFailed> {
        // One statement on the hot path: the insert either writes the key
        // or meets the primary key and writes nothing.
        let claimed = self
            .sql
            .exec(
                "INSERT INTO msg_keys (sender_id, client_msg_id, seq, id, created_at_ms)
                 VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                vec![
                    sender_id.into(),
                    client_msg_id.into(),
                    candidate.seq.into(),
                    candidate.id.to_string().into(),
                    candidate.created_at_ms.into(),
                ],
            )
            .map_err(|e| failed("key claim", &e))?
            .rows_written();
        if claimed > 0 {
            return Ok(Claim::Claimed);
        }
        let known = self.known_key(sender_id, client_msg_id)?.ok_or_else(|| {
            crate::log!(Error, "room storage: a key neither claimed nor found");
            StorageFailed
        })?;
        Ok(Claim::Known(known))
    }

    fn known_key(
        &self,
        sender_id: i64,
        client_msg_id: &str,
    ) -> Result<Option<KnownKey>, StorageFailed> {
        #[derive(Deserialize)]
        struct Row {
            seq: i64,
            id: String,
            created_at_ms: i64,
        }
        let rows: Vec<Row> = self
            .sql
            .exec(
                "SELECT seq, id, created_at_ms FROM msg_keys
                 WHERE sender_id = ? AND client_msg_id = ?",
                vec![sender_id.into(), client_msg_id.into()],
            )
            .and_then(|c| c.to_array())
            .map_err(|e| failed("key lookup", &e))?;
        Ok(rows.into_iter().next().map(|row| KnownKey {
            seq: row.seq,
            id: row.id.parse().unwrap_or_default(),
            created_at_ms: row.created_at_ms,
        }))
    }

    fn request_id(&self) -> Option<String> {
        let mut current = self.current.borrow_mut();
        let current = current.as_mut()?;
        Some(
            current
                .request_id
                .get_or_insert_with(|| self.conns.figures.frame_id())
                .clone(),
        )
    }

    fn verify_token(&self, token: &str, now: Millis) -> Result<Verified, AuthError> {
        verify_session(token, self.jwt_secret, now)
    }

    fn target(&self, id: Uuid) -> Result<Option<Target>, StorageFailed> {
        self.find_target(id).map_err(|e| failed("target", &e))
    }

    fn attachment(&self, id: Uuid) -> Result<Option<PendingAttachment>, StorageFailed> {
        #[derive(Deserialize)]
        struct Row {
            meta: String,
            registered_at_ms: i64,
            seq: Option<i64>,
        }
        let rows: Vec<Row> = self
            .sql
            .exec(
                "SELECT meta, registered_at_ms, seq FROM attachments WHERE id = ?",
                vec![id.to_string().into()],
            )
            .and_then(|c| c.to_array())
            .map_err(|e| failed("attachment", &e))?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        let meta = serde_json::from_str(&row.meta).map_err(|e| failed("attachment meta", &e))?;
        Ok(Some(PendingAttachment {
            meta,
            registered_at_ms: row.registered_at_ms,
            seq: row.seq,
        }))
    }
}

impl RoomSql<'_> {
    /// A message by id from the log or the key table, with its state.
    fn find_target(&self, id: Uuid) -> EdgeResult<Option<Target>> {
        #[derive(Deserialize)]
        struct Row {
            seq: i64,
            sender_id: i64,
            created_at_ms: i64,
            state: Option<String>,
        }
        let rows: Vec<Row> = self
            .sql
            .exec(
                "SELECT k.seq AS seq, k.sender_id AS sender_id, k.created_at_ms AS created_at_ms,
                        s.state AS state
                 FROM msg_keys k LEFT JOIN msg_state s ON s.id = k.id
                 WHERE k.id = ? AND k.is_change = 0",
                vec![id.to_string().into()],
            )?
            .to_array()?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        let logged = message_at(self.sql, row.seq)?.filter(|r| r.id == id);
        let state = match row.state.as_deref() {
            Some(json) => serde_json::from_str(json)
                .map_err(|e| EdgeError::Internal(format!("state of {id}: {e}")))?,
            None => logged.as_ref().map(|r| r.state.clone()).unwrap_or_default(),
        };
        Ok(Some(Target {
            id,
            seq: row.seq,
            sender_id: row.sender_id,
            created_at_ms: row.created_at_ms,
            preview: logged
                .as_ref()
                .filter(|_| !state.is_deleted())
                .map(Record::preview),
            state,
        }))
    }
}

/// Records an upload the Worker stored in the bucket, so a message may
/// carry it. Registering again (a retried request) changes nothing.
pub fn register_attachment(sql: &SqlStorage, meta: &AttachmentMeta, now: Millis) -> EdgeResult<()> {
    let json = serde_json::to_string(meta).map_err(|e| EdgeError::Internal(e.to_string()))?;
    sql.exec(
        "INSERT INTO attachments (id, meta, registered_at_ms, seq) VALUES (?, ?, ?, NULL)
         ON CONFLICT (id) DO NOTHING",
        vec![
            meta.id.to_string().into(),
            json.into(),
            i64::try_from(now).unwrap_or(i64::MAX).into(),
        ],
    )?;
    Ok(())
}

/// The origin's new metadata for an attachment: in its row and in the
/// stored message that carries it, so replay shows the new state. Returns
/// whether a message carries it.
pub fn update_attachment(sql: &SqlStorage, meta: &AttachmentMeta) -> EdgeResult<bool> {
    let json = serde_json::to_string(meta).map_err(|e| EdgeError::Internal(e.to_string()))?;
    let id = meta.id.to_string();
    sql.exec(
        "UPDATE attachments SET meta = ? WHERE id = ?",
        vec![json.into(), id.clone().into()],
    )?;
    #[derive(Deserialize)]
    struct Sent {
        seq: Option<i64>,
    }
    let sent = sql
        .exec(
            "SELECT seq FROM attachments WHERE id = ?",
            vec![id.clone().into()],
        )?
        .to_array::<Sent>()?
        .first()
        .is_some_and(|r| r.seq.is_some());
    #[derive(Deserialize)]
    struct Row {
        seq: i64,
        attachments: Option<String>,
    }
    let rows: Vec<Row> = sql
        .exec(
            "SELECT m.seq AS seq, m.attachments AS attachments
             FROM attachments a JOIN messages m ON m.seq = a.seq WHERE a.id = ?",
            vec![id.into()],
        )?
        .to_array()?;
    for row in rows {
        let mut list: Vec<AttachmentMeta> = row
            .attachments
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        for a in list.iter_mut().filter(|a| a.id == meta.id) {
            *a = meta.clone();
        }
        let json = serde_json::to_string(&list).map_err(|e| EdgeError::Internal(e.to_string()))?;
        sql.exec(
            "UPDATE messages SET attachments = ? WHERE seq = ?",
            vec![json.into(), row.seq.into()],
        )?;
    }
    Ok(sent)
}

/// The origin's cleanup offers unsent uploads: every one not carried by a
/// message is forgotten (a later message naming it is refused) and
/// returned, including ids this room never registered.
pub fn reap_attachments(sql: &SqlStorage, ids: &[Uuid]) -> EdgeResult<Vec<Uuid>> {
    let mut reaped = Vec::with_capacity(ids.len());
    for id in ids {
        #[derive(Deserialize)]
        struct Row {
            seq: Option<i64>,
        }
        let rows: Vec<Row> = sql
            .exec(
                "SELECT seq FROM attachments WHERE id = ?",
                vec![id.to_string().into()],
            )?
            .to_array()?;
        if rows.first().is_some_and(|r| r.seq.is_some()) {
            continue;
        }
        sql.exec(
            "DELETE FROM attachments WHERE id = ?",
            vec![id.to_string().into()],
        )?;
        reaped.push(*id);
    }
    Ok(reaped)
}

/// Verifies a session token presented on a live connection: the same rule
/// as at the Worker. Valid until its `exp` plus the leeway.
pub fn verify_session(token: &str, secret: &[u8], now: Millis) -> Result<Verified, AuthError> {
    let now_secs = i64::try_from(now / 1000).unwrap_or(i64::MAX);
    let claims = shared::auth::verify(token, secret, AUDIENCE_API, now_secs)?;
    Ok(Verified {
        user_id: claims.user_id()?,
        valid_until: valid_until(claims.exp),
    })
}

/// The instant (ms) after which a token with this `exp` is refused.
pub fn valid_until(exp: i64) -> Millis {
    u64::try_from(exp.saturating_add(LEEWAY_SECS))
        .unwrap_or(0)
        .saturating_mul(1000)
}

impl RoomSql<'_> {
    /// A new message is in the log: counted by how it came, its ack
    /// latency recorded (the ack follows in this event), and logged
    /// without its words.
    fn accepted(&self, r: &Record) {
        let now = crate::auth::now_ms();
        let current = self.current.borrow();
        let (transport, started) = current
            .as_ref()
            .map_or((crate::telemetry::TRANSPORT_WS, now), |c| {
                (c.transport, c.started_ms)
            });
        let figures = &self.conns.figures;
        figures.message(transport);
        // A socket frame's ack is timed here. Workers' clocks stand still
        // while code runs and move only across I/O, so this sees the waits
        // (loading, members), not the CPU. A request from the Worker or a
        // User object is timed by its caller, where the clock sees the
        // hop and the durable write too.
        if transport == crate::telemetry::TRANSPORT_WS {
            figures.ack_since(started);
        }
        crate::log!(Debug, "message accepted",
            "conversation" => figures.conversation(),
            "seq" => r.seq,
            "message_id" => r.id.to_string(),
            "user" => r.sender_id,
            "bytes" => r.content.len(),
            "attachments" => r.attachments.len(),
            "transport" => transport,
            "request_id" => r.request_id.clone());
    }
}

impl Driver for RoomSql<'_> {
    type Error = EdgeError;

    fn store(&mut self, r: &Record) -> EdgeResult<()> {
        // Its key was claimed in msg_keys just before (`claim_key`).
        let attachments = if r.attachments.is_empty() {
            SqlStorageValue::Null
        } else {
            serde_json::to_string(&r.attachments)
                .map_err(|e| EdgeError::Internal(e.to_string()))?
                .into()
        };
        self.exec(
            "INSERT INTO messages (seq, id, sender_id, content, created_at_ms, client_msg_id,
                                   flushed, attachments, extra)
             VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
            vec![
                r.seq.into(),
                r.id.to_string().into(),
                r.sender_id.into(),
                r.content.clone().into(),
                r.created_at_ms.into(),
                r.client_msg_id.clone().into(),
                attachments,
                Extra::column(r)?,
            ],
        )?;
        if r.change.is_none() {
            self.accepted(r);
        }
        // In the same event as the message, so a crash keeps both or
        // neither.
        for a in &r.attachments {
            self.exec(
                "UPDATE attachments SET seq = ? WHERE id = ?",
                vec![r.seq.into(), a.id.to_string().into()],
            )?;
        }
        Ok(())
    }

    fn store_change(&mut self, event: &Record, state: &MessageState) -> EdgeResult<()> {
        let Some(change) = &event.change else {
            return Err(EdgeError::Internal(
                "a change without its change".to_owned(),
            ));
        };
        // The event row, then its key marked as a change's (claimed just
        // before, like a message's).
        self.store(event)?;
        self.exec(
            "UPDATE msg_keys SET is_change = 1 WHERE sender_id = ? AND client_msg_id = ?",
            vec![event.sender_id.into(), event.client_msg_id.clone().into()],
        )?;
        let target = change.target_id.to_string();
        let state_json = json_of(state)?;
        self.exec(
            "INSERT INTO msg_state (id, state) VALUES (?, ?)
             ON CONFLICT (id) DO UPDATE SET state = excluded.state",
            vec![target.clone().into(), state_json.clone().into()],
        )?;
        let seq = change.target_seq;
        match &change.change {
            Change::Edit { content } => {
                // The old words are overwritten in place first, so they do
                // not linger in the page's free space (a later delete must
                // be able to erase them; see `overwrite`).
                self.exec(
                    &format!(
                        "UPDATE messages SET content = {} WHERE seq = ? AND id = ?",
                        overwrite("content")
                    ),
                    vec![seq.into(), target.clone().into()],
                )?;
                self.exec(
                    "UPDATE messages SET content = ?,
                         extra = json_set(coalesce(extra, '{}'), '$.state', json(?))
                     WHERE seq = ? AND id = ?",
                    vec![
                        content.clone().into(),
                        state_json.into(),
                        seq.into(),
                        target.into(),
                    ],
                )
            }
            Change::React { .. } => self.exec(
                "UPDATE messages SET extra = json_set(coalesce(extra, '{}'), '$.state', json(?))
                 WHERE seq = ? AND id = ?",
                vec![state_json.into(), seq.into(), target.into()],
            ),
            Change::Delete => {
                // Erasure, in the same event as the delete: the objects are
                // queued for the bucket (`purge`), the attachment rows go,
                // the row keeps only what a tombstone shows, and earlier
                // edits lose their text.
                self.exec(
                    "INSERT OR IGNORE INTO purge (id) SELECT id FROM attachments WHERE seq = ?",
                    vec![seq.into()],
                )?;
                self.exec(
                    &format!(
                        "UPDATE attachments SET meta = {} WHERE seq = ?",
                        overwrite("meta")
                    ),
                    vec![seq.into()],
                )?;
                self.exec("DELETE FROM attachments WHERE seq = ?", vec![seq.into()])?;
                self.purge_due.set(true);
                self.exec(
                    &format!(
                        "UPDATE messages SET content = {}, attachments = {}, extra = {}
                         WHERE seq = ? AND id = ?",
                        overwrite("content"),
                        overwrite("attachments"),
                        overwrite("extra")
                    ),
                    vec![seq.into(), target.clone().into()],
                )?;
                self.exec(
                    "UPDATE messages SET content = '', attachments = NULL,
                         extra = json_object('state', json(?))
                     WHERE seq = ? AND id = ?",
                    vec![state_json.into(), seq.into(), target.clone().into()],
                )?;
                let edits = "extra IS NOT NULL
                     AND json_extract(extra, '$.change.target_id') = ?
                     AND json_extract(extra, '$.change.kind') = 'edit'";
                self.exec(
                    &format!(
                        "UPDATE messages SET extra = json_set(extra, '$.change.content',
                             {}) WHERE {edits}",
                        overwrite("json_extract(extra, '$.change.content')")
                    ),
                    vec![target.clone().into()],
                )?;
                self.exec(
                    &format!(
                        "UPDATE messages SET extra = json_set(extra, '$.change.content', '')
                         WHERE {edits}"
                    ),
                    vec![target.into()],
                )
            }
        }
    }

    fn store_watermark(&mut self, w: &Watermark) -> EdgeResult<()> {
        self.exec(
            "INSERT INTO members (user_id, delivered_seq, read_seq, synced) VALUES (?, ?, ?, 0)
             ON CONFLICT (user_id) DO UPDATE SET
                 delivered_seq = max(delivered_seq, excluded.delivered_seq),
                 read_seq = max(read_seq, excluded.read_seq),
                 synced = 0",
            vec![w.user_id.into(), w.delivered_seq.into(), w.read_seq.into()],
        )
    }

    fn replace_members(&mut self, members: &[StoredWatermark]) -> EdgeResult<()> {
        self.exec("DELETE FROM members", vec![])?;
        for m in members {
            let w = m.watermark;
            self.exec(
                "INSERT INTO members (user_id, delivered_seq, read_seq, synced) VALUES (?, ?, ?, ?)",
                vec![
                    w.user_id.into(),
                    w.delivered_seq.into(),
                    w.read_seq.into(),
                    i64::from(m.synced).into(),
                ],
            )?;
        }
        Ok(())
    }

    fn mark_flushed(&mut self, confirmed: &Confirmed) -> EdgeResult<()> {
        // Exactly the confirmed seqs: one statement per run of them.
        for run in &confirmed.runs {
            self.exec(
                "UPDATE messages SET flushed = 1 WHERE seq BETWEEN ? AND ?",
                vec![(*run.start()).into(), (*run.end()).into()],
            )?;
        }
        // Outside the retention, a confirmed message lives on only in
        // PostgreSQL (its key stays in msg_keys), and only below the
        // room's confirmed prefix: a range of the primary key, no scan.
        let keep_from = confirmed
            .prefix_end
            .min(confirmed.last_seq.saturating_sub(RETAIN_MESSAGES) + 1);
        // Sent uploads' rows stay: a delete of an old message needs its
        // attachments' ids to erase their objects.
        self.exec("DELETE FROM messages WHERE seq < ?", vec![keep_from.into()])
    }

    fn mark_receipts_synced(&mut self, watermarks: &[Watermark]) -> EdgeResult<()> {
        for w in watermarks {
            self.exec(
                "UPDATE members SET synced = 1
                 WHERE user_id = ? AND delivered_seq = ? AND read_seq = ?",
                vec![w.user_id.into(), w.delivered_seq.into(), w.read_seq.into()],
            )?;
        }
        Ok(())
    }

    fn send(&mut self, to: &Recipients<'_>, frame: &ServerFrame) {
        let signed = self.signer.sign_frame(frame, now_secs());
        let frame = signed.as_ref().unwrap_or(frame);
        // The room names the recipients among its own connections.
        let sent = self
            .conns
            .send(frame, |conn, _user| to.includes(ConnId(conn)));
        if let Err(e) = sent {
            crate::log!(Error, "room send failed", "error" => e.to_string());
        }
    }

    fn close(&mut self, conn: ConnId, code: u16, reason: &str) {
        self.conns.close(conn.0, code, reason);
    }

    fn notify(&mut self, notice: ConversationNotice) {
        self.notices.borrow_mut().push(notice);
    }

    fn forward(&mut self, users: &[i64], frame: &ServerFrame) {
        let signed = self.signer.sign_frame(frame, now_secs());
        self.forwarder.push(users, signed.as_ref().unwrap_or(frame));
    }
}

/// Seconds on the wall clock, for the expiry of signed links.
pub fn now_secs() -> i64 {
    i64::try_from(crate::auth::now_ms() / 1000).unwrap_or(i64::MAX)
}

/// Who may delete anyone's message, as last stored.
pub fn moderators(sql: &SqlStorage) -> EdgeResult<Vec<i64>> {
    #[derive(Deserialize)]
    struct Row {
        user_id: i64,
    }
    let rows: Vec<Row> = sql
        .exec("SELECT user_id FROM moderators", None)?
        .to_array()?;
    Ok(rows.into_iter().map(|r| r.user_id).collect())
}

pub fn set_moderators(sql: &SqlStorage, users: &[i64]) -> EdgeResult<()> {
    sql.exec("DELETE FROM moderators", None)?;
    for u in users {
        sql.exec(
            "INSERT OR IGNORE INTO moderators (user_id) VALUES (?)",
            vec![(*u).into()],
        )?;
    }
    Ok(())
}

/// Attachment objects waiting to be erased from the bucket.
pub fn purge_pending(sql: &SqlStorage) -> EdgeResult<Vec<Uuid>> {
    #[derive(Deserialize)]
    struct Row {
        id: String,
    }
    let rows: Vec<Row> = sql
        .exec("SELECT id FROM purge LIMIT 100", None)?
        .to_array()?;
    Ok(rows.into_iter().filter_map(|r| r.id.parse().ok()).collect())
}

pub fn purged(sql: &SqlStorage, id: Uuid) -> EdgeResult<()> {
    sql.exec(
        "DELETE FROM purge WHERE id = ?",
        vec![id.to_string().into()],
    )?;
    Ok(())
}

/// A SQL expression of `column`'s byte length made of `0`s. Workerd refuses
/// `PRAGMA secure_delete`, so SQLite leaves what an update shrinks or a
/// delete frees in the page's free space; an update that keeps a value's
/// size rewrites it in place, so words about to be erased are first
/// overwritten with this, then emptied. It cannot reach copies SQLite made
/// before (a page split, the write-ahead log until its checkpoint):
/// ARCHITECTURE.md (Erasure) bounds those.
fn overwrite(column: &str) -> String {
    format!(
        "substr(hex(zeroblob(length(CAST({column} AS BLOB)))), 1, length(CAST({column} AS BLOB)))"
    )
}

/// The members whose objects subscribed.
pub fn subscribers(sql: &SqlStorage) -> EdgeResult<Vec<i64>> {
    #[derive(Deserialize)]
    struct Row {
        user_id: i64,
    }
    let rows: Vec<Row> = sql
        .exec("SELECT user_id FROM subscribers", None)?
        .to_array()?;
    Ok(rows.into_iter().map(|r| r.user_id).collect())
}

pub fn set_subscribed(sql: &SqlStorage, user: i64, subscribed: bool) -> EdgeResult<()> {
    let query = if subscribed {
        "INSERT OR IGNORE INTO subscribers (user_id) VALUES (?)"
    } else {
        "DELETE FROM subscribers WHERE user_id = ?"
    };
    sql.exec(query, vec![user.into()])?;
    Ok(())
}
