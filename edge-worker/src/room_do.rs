//! The Room Durable Object: one per conversation. A thin driver around
//! `shared::room::Room`.
//!
//! It owns the I/O the state machine does not: hibernatable WebSockets
//! (per-socket state in the attachment), Server-Sent Event streams and the
//! POST fallback, the SQLite log that is both the outbox to the origin and
//! the replay window, the member cache, and the alarm that flushes the
//! outbox and keeps SSE streams honest.
//!
//! A WebSocket and an SSE stream are the same thing to the room: a
//! connection that receives frames. SSE frames carry the same JSON as WS
//! frames; a `message` event also carries `id: <seq>`, so `Last-Event-ID`
//! resumes exactly after it.
//!
//! Durability: outputs run in order, and `Output::Store` is a synchronous
//! SQLite write that precedes the `ack` and the broadcast of the same
//! message. workerd's output gate holds every outgoing frame until the
//! write is durable, so an ack never announces a message that could be lost.
//!
//! Never hold a `RefCell` borrow across an `.await`: other events run on
//! this object while one awaits.

use std::cell::RefCell;

use serde::Deserialize;
use shared::protocol::ServerFrame;
use shared::protocol::internal::{IngestBatch, ReceiptBatch};
use shared::receipts::Watermark;
use shared::room::{
    ConnId, FlushBatch, FlushOutcome, Output, Record, Restore, Room as RoomState, Target,
};
use worker::{
    DurableObject, Env, Request, Response, Result, SqlStorage, State, WebSocket,
    WebSocketIncomingMessage, durable_object,
};

use crate::auth::now_ms;
use crate::config::EdgeConfig;
use crate::conns::{Alarm, Connections, answer, answer_close, random_u64};
use crate::error::{EdgeError, EdgeResult};
use crate::origin::OriginClient;

/// Headers the Worker sets on requests it forwards to a room. A client
/// never reaches a Durable Object directly, so these are trusted.
pub const USER_HEADER: &str = "x-vibe-user-id";
pub const CONVERSATION_HEADER: &str = "x-vibe-conversation-id";

/// Flushed messages kept in SQLite beyond the replay window, so that a
/// resend of an old message still finds its original (and the POST
/// fallback can return it in full).
const RETAIN_MESSAGES: i64 = 5_000;
/// A connect from a user the cache does not know refetches the members at
/// most this often.
const MEMBERS_REFRESH_MS: u64 = 5_000;
#[derive(Debug)]
struct Loaded {
    room: RoomState,
    members_fetched_at: u64,
}

#[durable_object]
pub struct Room {
    state: State,
    env: Env,
    sql: SqlStorage,
    loaded: RefCell<Option<Loaded>>,
    /// Live WebSockets and SSE streams.
    conns: Connections,
    /// Notices for the Lobby, sent after the outputs that produced them.
    notices: RefCell<Vec<shared::lobby::ConversationNotice>>,
    alarm: Alarm,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room")
            .field("sockets", &self.conns.socket_count())
            .field("streams", &self.conns.stream_count())
            .finish_non_exhaustive()
    }
}

impl DurableObject for Room {
    fn new(state: State, env: Env) -> Self {
        let sql = state.storage().sql();
        Self {
            state,
            env,
            sql,
            loaded: RefCell::new(None),
            conns: Connections::default(),
            notices: RefCell::new(Vec::new()),
            alarm: Alarm::default(),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        let upgrade = req.headers().get("upgrade")?.is_some();
        answer(upgrade, self.route(req).await)
    }

    async fn alarm(&self) -> Result<Response> {
        self.alarm.fired();
        if let Err(e) = self.on_alarm().await {
            worker::console_error!("room alarm: {e}");
        }
        // Reschedule whatever is still due (including after an error).
        self.schedule().await;
        Response::ok("")
    }

    async fn websocket_message(
        &self,
        ws: WebSocket,
        message: WebSocketIncomingMessage,
    ) -> Result<()> {
        let Ok(Some(tag)) = ws.deserialize_attachment::<crate::conns::SocketTag>() else {
            let _ = ws.close(Some(1011), Some("lost connection state"));
            return Ok(());
        };
        if let Err(e) = self.ensure_loaded(None).await {
            let _ = send_frame(&ws, &error_frame(&e));
            return Ok(());
        }
        let now = now_ms();
        // The protocol is JSON text; binary runs through the same checks so
        // size limits and errors behave identically.
        let text = match message {
            WebSocketIncomingMessage::String(text) => text,
            WebSocketIncomingMessage::Binary(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        };
        if let Err(e) = self.with_room(|r| r.handle_text(now, ConnId(tag.conn), &text)) {
            worker::console_error!("websocket message: {e}");
        }
        self.drain();
        self.schedule().await;
        Ok(())
    }

    async fn websocket_close(
        &self,
        ws: WebSocket,
        code: usize,
        reason: String,
        _clean: bool,
    ) -> Result<()> {
        self.forget_socket(&ws);
        answer_close(&ws, code, reason);
        Ok(())
    }

    async fn websocket_error(&self, ws: WebSocket, _error: worker::Error) -> Result<()> {
        self.forget_socket(&ws);
        Ok(())
    }
}

impl Room {
    fn config(&self) -> EdgeResult<EdgeConfig> {
        EdgeConfig::from_env(&self.env)
    }

    async fn route(&self, req: Request) -> EdgeResult<Response> {
        let conversation_id = header_i64(&req, CONVERSATION_HEADER)?;
        self.ensure_loaded(Some(conversation_id)).await?;
        let path = req.path();
        match path.as_str() {
            "/ws" => self.connect_ws(&req).await,
            "/events" => self.connect_sse(&req).await,
            "/messages" => self.post_message(req).await,
            "/typing" => self.post_typing(&req).await,
            "/read" => self.post_read(req).await,
            "/members-changed" => {
                self.refresh_members().await?;
                Ok(Response::empty()?.with_status(204))
            }
            _ => Err(EdgeError::NotFound("room route")),
        }
    }

    /// Checks membership for a request from the Worker, refreshing a stale
    /// member cache once before refusing.
    async fn member(&self, req: &Request) -> EdgeResult<i64> {
        let user = header_i64(req, USER_HEADER)?;
        if !self.is_member(user) && self.members_stale() {
            self.refresh_members().await?;
        }
        if self.is_member(user) {
            Ok(user)
        } else {
            Err(EdgeError::Forbidden(
                "you are not a member of this conversation",
            ))
        }
    }

    /// `GET /events`: a Server-Sent Events stream, resuming after `since`.
    async fn connect_sse(&self, req: &Request) -> EdgeResult<Response> {
        let user = self.member(req).await?;
        let since = since_param(req)?;
        let config = self.config()?;
        let now = now_ms();
        // Over the cap, the oldest stream goes: it is the likeliest to be
        // dead, and its client resumes with Last-Event-ID anyway.
        let (conn, response, evicted) =
            self.conns
                .open_stream(user, now, config.sse_max_per_room, config.sse_heartbeat_ms)?;
        self.with_loaded(|l| {
            for id in evicted {
                l.room.handle_disconnect(now, ConnId(id));
            }
        })?;
        self.with_room(|r| r.handle_connect(now, ConnId(conn), user, since))??;
        self.drain();
        self.schedule().await;
        Ok(response)
    }

    /// `POST /messages` `{content, client_msg_id}`: 201 with the stored
    /// message, or 200 with the original for a known `client_msg_id`.
    async fn post_message(&self, mut req: Request) -> EdgeResult<Response> {
        #[derive(Deserialize)]
        struct Body {
            content: String,
            #[serde(default)]
            client_msg_id: Option<String>,
        }
        let user = self.member(&req).await?;
        let body: Body = json_body(&mut req).await?;
        let now = now_ms();
        let sent =
            self.with_room(|r| r.submit(now, user, body.content, body.client_msg_id, None))??;
        self.drain();
        self.schedule().await;
        let mut message = sent.message;
        if sent.duplicate && message.created_at.timestamp() == 0 {
            // Older than the in-memory window: the log still has it.
            if let Some(stored) = self.stored_message(message.seq)? {
                message = stored;
            }
        }
        let status = if sent.duplicate { 200 } else { 201 };
        Ok(Response::from_json(&message)?.with_status(status))
    }

    /// `POST /typing`: 204.
    async fn post_typing(&self, req: &Request) -> EdgeResult<Response> {
        let user = self.member(req).await?;
        let now = now_ms();
        self.with_room(|r| r.handle_typing(now, user))??;
        self.drain();
        Ok(Response::empty()?.with_status(204))
    }

    /// `POST /read` `{seq}`: 204.
    async fn post_read(&self, mut req: Request) -> EdgeResult<Response> {
        #[derive(Deserialize)]
        struct Body {
            seq: i64,
        }
        let user = self.member(&req).await?;
        let body: Body = json_body(&mut req).await?;
        let now = now_ms();
        self.with_room(|r| r.handle_read(now, user, body.seq))??;
        self.drain();
        self.schedule().await;
        Ok(Response::empty()?.with_status(204))
    }

    /// A message from the SQLite log, with its current status.
    fn stored_message(&self, seq: i64) -> EdgeResult<Option<shared::protocol::MessageView>> {
        #[derive(Deserialize)]
        struct Row {
            id: String,
            sender_id: i64,
            content: String,
            created_at_ms: i64,
            client_msg_id: String,
        }
        let rows: Vec<Row> = self
            .sql
            .exec(
                "SELECT id, sender_id, content, created_at_ms, client_msg_id FROM messages WHERE seq = ?",
                vec![seq.into()],
            )?
            .to_array()?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        let members: Vec<Watermark> = self.with_room(|r| r.members().copied().collect())?;
        let conversation_id = self.with_room(|r| r.conversation_id())?;
        Ok(Some(shared::protocol::MessageView {
            id: row.id.parse().unwrap_or_default(),
            seq,
            conversation_id,
            sender_id: row.sender_id,
            content: row.content,
            status: shared::receipts::status_of(seq, row.sender_id, &members),
            created_at: chrono::DateTime::from_timestamp_millis(row.created_at_ms)
                .unwrap_or_default(),
            client_msg_id: row.client_msg_id,
        }))
    }

    /// Heartbeats the SSE streams; the ones that ended leave the room.
    fn sse_maintenance(&self, now: u64) -> EdgeResult<()> {
        let config = self.config()?;
        let ended = self.conns.maintain_streams(now, config.sse_heartbeat_ms);
        self.with_loaded(|l| {
            for id in ended {
                l.room.handle_disconnect(now, ConnId(id));
            }
        })
    }

    /// Upgrades a member's request to a hibernatable WebSocket.
    async fn connect_ws(&self, req: &Request) -> EdgeResult<Response> {
        let since = since_param(req)?;
        // A refusal becomes an error frame and a 1008 close (see fetch).
        let user = self.member(req).await?;
        let (conn, client) = self.conns.accept_socket(&self.state, user)?;
        let now = now_ms();
        let joined = self.with_room(|r| r.handle_connect(now, ConnId(conn), user, since))?;
        if let Err(e) = joined {
            self.conns.close(conn, 1008, &e.to_string());
        }
        self.drain();
        self.schedule().await;
        Ok(Response::from_websocket(client)?)
    }

    // ---- loading ---------------------------------------------------------

    /// Builds the state machine from SQLite (and, for a brand-new room, the
    /// origin's member list), and reattaches sockets that survived
    /// hibernation.
    async fn ensure_loaded(&self, conversation_id: Option<i64>) -> EdgeResult<()> {
        if self.loaded.borrow().is_some() {
            return Ok(());
        }
        self.create_schema()?;
        let conversation_id = match conversation_id {
            Some(id) => {
                self.meta_set("conversation_id", id)?;
                id
            }
            None => self
                .meta_get("conversation_id")?
                .ok_or_else(|| EdgeError::Internal("room without a conversation id".to_owned()))?,
        };
        let mut fetched_at = 0;
        if self.meta_get("members_loaded")?.is_none() {
            // A new room: members and the last stored seq come from the
            // origin. Without them there is no safe next seq.
            let config = self.config()?;
            let members = OriginClient::new(&config).members(conversation_id).await?;
            if self.loaded.borrow().is_some() {
                return Ok(()); // another event loaded it while we waited
            }
            self.store_members(&watermarks_of(&members.members))?;
            self.meta_set("base_seq", members.last_seq)?;
            self.meta_set("members_loaded", 1)?;
            fetched_at = now_ms();
        }
        let config = self.config()?;
        let restore = self.load_restore(&config)?;
        let mut room = RoomState::new(conversation_id, config.room.clone(), random_u64());
        room.restore(now_ms(), restore);
        if self.loaded.borrow().is_some() {
            return Ok(());
        }
        for tag in self.conns.reattach(&self.state) {
            room.handle_reattach(ConnId(tag.conn), tag.user);
        }
        *self.loaded.borrow_mut() = Some(Loaded {
            room,
            members_fetched_at: fetched_at,
        });
        // Plain-text "ping" is answered by the runtime without waking us.
        if let Ok(pair) = worker::WebSocketRequestResponsePair::new("ping", "pong") {
            self.state.set_websocket_auto_response(&pair);
        }
        self.alarm.load(&self.state).await;
        if self.with_room(|r| r.unflushed())? > 0 {
            self.schedule().await;
        }
        Ok(())
    }

    fn create_schema(&self) -> EdgeResult<()> {
        self.sql.exec(
            "CREATE TABLE IF NOT EXISTS messages (
                 seq INTEGER PRIMARY KEY,
                 id TEXT NOT NULL,
                 sender_id INTEGER NOT NULL,
                 content TEXT NOT NULL,
                 created_at_ms INTEGER NOT NULL,
                 client_msg_id TEXT NOT NULL,
                 flushed INTEGER NOT NULL DEFAULT 0
             );
             CREATE UNIQUE INDEX IF NOT EXISTS messages_key ON messages (sender_id, client_msg_id);
             CREATE INDEX IF NOT EXISTS messages_unflushed ON messages (flushed, seq);
             CREATE TABLE IF NOT EXISTS members (
                 user_id INTEGER PRIMARY KEY,
                 delivered_seq INTEGER NOT NULL,
                 read_seq INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
            None,
        )?;
        Ok(())
    }

    fn meta_get(&self, key: &str) -> EdgeResult<Option<i64>> {
        #[derive(Deserialize)]
        struct Row {
            value: i64,
        }
        let rows: Vec<Row> = self
            .sql
            .exec("SELECT value FROM meta WHERE key = ?", vec![key.into()])?
            .to_array()?;
        Ok(rows.first().map(|r| r.value))
    }

    fn meta_set(&self, key: &str, value: i64) -> EdgeResult<()> {
        self.sql.exec(
            "INSERT INTO meta (key, value) VALUES (?, ?)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            vec![key.into(), value.into()],
        )?;
        Ok(())
    }

    fn load_restore(&self, config: &EdgeConfig) -> EdgeResult<Restore> {
        #[derive(Deserialize)]
        struct MemberRow {
            user_id: i64,
            delivered_seq: i64,
            read_seq: i64,
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
        }
        #[derive(Deserialize)]
        struct KeyRow {
            seq: i64,
            id: String,
            sender_id: i64,
            client_msg_id: String,
        }
        #[derive(Deserialize)]
        struct MaxRow {
            max_seq: Option<i64>,
        }
        let members: Vec<MemberRow> = self
            .sql
            .exec("SELECT user_id, delivered_seq, read_seq FROM members", None)?
            .to_array()?;
        let max_seq = self
            .sql
            .exec("SELECT max(seq) AS max_seq FROM messages", None)?
            .to_array::<MaxRow>()?
            .first()
            .and_then(|r| r.max_seq)
            .unwrap_or(0);
        let window_start = max_seq - config.room.replay_window as i64;
        let messages: Vec<MessageRow> = self
            .sql
            .exec(
                "SELECT seq, id, sender_id, content, created_at_ms, client_msg_id, flushed
                 FROM messages WHERE seq > ? OR flushed = 0 ORDER BY seq",
                vec![window_start.into()],
            )?
            .to_array()?;
        // The window must be contiguous: start at the oldest unflushed or
        // the window start, whichever is older, and take everything after.
        let first = messages.first().map_or(max_seq + 1, |m| m.seq);
        let messages: Vec<MessageRow> = if messages.len() as i64 == max_seq - first + 1 {
            messages
        } else {
            self.sql
                .exec(
                    "SELECT seq, id, sender_id, content, created_at_ms, client_msg_id, flushed
                     FROM messages WHERE seq >= ? ORDER BY seq",
                    vec![first.into()],
                )?
                .to_array()?
        };
        let keys: Vec<KeyRow> = self
            .sql
            .exec(
                "SELECT seq, id, sender_id, client_msg_id FROM messages
                 WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                vec![first.into(), (config.room.dedup_horizon as i64).into()],
            )?
            .to_array()?;
        let base_seq = self.meta_get("base_seq")?.unwrap_or(0);
        Ok(Restore {
            members: members
                .into_iter()
                .map(|m| Watermark {
                    user_id: m.user_id,
                    delivered_seq: m.delivered_seq,
                    read_seq: m.read_seq,
                })
                .collect(),
            last_seq: base_seq.max(max_seq),
            messages: messages
                .into_iter()
                .map(|m| Record {
                    id: m.id.parse().unwrap_or_default(),
                    seq: m.seq,
                    sender_id: m.sender_id,
                    content: m.content,
                    created_at_ms: m.created_at_ms,
                    client_msg_id: m.client_msg_id,
                    flushed: m.flushed != 0,
                })
                .collect(),
            older_keys: keys
                .into_iter()
                .rev()
                .map(|k| {
                    (
                        k.sender_id,
                        k.client_msg_id,
                        k.seq,
                        k.id.parse().unwrap_or_default(),
                    )
                })
                .collect(),
        })
    }

    // ---- members ---------------------------------------------------------

    fn is_member(&self, user: i64) -> bool {
        self.loaded
            .borrow()
            .as_ref()
            .is_some_and(|l| l.room.is_member(user))
    }

    fn members_stale(&self) -> bool {
        self.loaded
            .borrow()
            .as_ref()
            .is_none_or(|l| now_ms().saturating_sub(l.members_fetched_at) > MEMBERS_REFRESH_MS)
    }

    /// Refetches the member list; removed members' sockets close.
    async fn refresh_members(&self) -> EdgeResult<()> {
        let conversation_id = self.with_room(|r| r.conversation_id())?;
        let config = self.config()?;
        let members = OriginClient::new(&config).members(conversation_id).await?;
        let watermarks = watermarks_of(&members.members);
        let now = now_ms();
        self.with_loaded(|l| {
            l.room.set_members(now, &watermarks, members.last_seq);
            l.members_fetched_at = now;
        })?;
        let merged: Vec<Watermark> = self.with_room(|r| r.members().copied().collect())?;
        self.store_members(&merged)?;
        self.drain();
        Ok(())
    }

    fn store_members(&self, members: &[Watermark]) -> EdgeResult<()> {
        self.sql.exec("DELETE FROM members", None)?;
        for w in members {
            self.store_watermark(w)?;
        }
        Ok(())
    }

    fn store_watermark(&self, w: &Watermark) -> EdgeResult<()> {
        self.sql.exec(
            "INSERT INTO members (user_id, delivered_seq, read_seq) VALUES (?, ?, ?)
             ON CONFLICT (user_id) DO UPDATE SET
                 delivered_seq = max(delivered_seq, excluded.delivered_seq),
                 read_seq = max(read_seq, excluded.read_seq)",
            vec![w.user_id.into(), w.delivered_seq.into(), w.read_seq.into()],
        )?;
        Ok(())
    }

    // ---- driving the state machine --------------------------------------

    /// Runs `f` on the loaded state. Every caller runs after
    /// `ensure_loaded` succeeded; the error only reports a bug.
    fn with_loaded<R>(&self, f: impl FnOnce(&mut Loaded) -> R) -> EdgeResult<R> {
        let mut guard = self.loaded.borrow_mut();
        match guard.as_mut() {
            Some(loaded) => Ok(f(loaded)),
            None => Err(EdgeError::Internal(
                "room used before it was loaded".to_owned(),
            )),
        }
    }

    fn with_room<R>(&self, f: impl FnOnce(&mut RoomState) -> R) -> EdgeResult<R> {
        self.with_loaded(|l| f(&mut l.room))
    }

    /// Executes the room's outputs in order.
    fn drain(&self) {
        loop {
            let next = {
                let mut guard = self.loaded.borrow_mut();
                match guard.as_mut() {
                    Some(l) => l.room.poll_output(),
                    None => None,
                }
            };
            let Some(output) = next else { break };
            if let Err(e) = self.execute(output) {
                worker::console_error!("room output failed: {e}");
            }
        }
    }

    fn execute(&self, output: Output) -> EdgeResult<()> {
        match output {
            Output::Store(r) => {
                self.sql.exec(
                    "INSERT INTO messages (seq, id, sender_id, content, created_at_ms, client_msg_id, flushed)
                     VALUES (?, ?, ?, ?, ?, ?, 0)",
                    vec![
                        r.seq.into(),
                        r.id.to_string().into(),
                        r.sender_id.into(),
                        r.content.into(),
                        r.created_at_ms.into(),
                        r.client_msg_id.into(),
                    ],
                )?;
            }
            Output::Send { to, frame } => {
                self.conns.send(&frame, |conn, user| match to {
                    Target::Conn(c) => c.0 == conn,
                    Target::All => true,
                    Target::OthersOf(u) => user != u,
                })?;
            }
            Output::Close { conn, code, reason } => self.conns.close(conn.0, code, &reason),
            Output::StoreWatermark(w) => self.store_watermark(&w)?,
            Output::Notify(notice) => self.notices.borrow_mut().push(notice),
            Output::MarkFlushed(seqs) => {
                let Some(&top) = seqs.iter().max() else {
                    return Ok(());
                };
                let Some(&bottom) = seqs.iter().min() else {
                    return Ok(());
                };
                self.sql.exec(
                    "UPDATE messages SET flushed = 1 WHERE seq BETWEEN ? AND ?",
                    vec![bottom.into(), top.into()],
                )?;
                // Outside the replay window and the resend horizon, a
                // confirmed message lives on only in PostgreSQL.
                self.sql.exec(
                    "DELETE FROM messages WHERE flushed = 1
                     AND seq <= (SELECT max(seq) FROM messages) - ?",
                    vec![RETAIN_MESSAGES.into()],
                )?;
            }
        }
        Ok(())
    }

    /// Hands queued notices to the Lobby without waiting for it: a
    /// notification is best effort (the conversation list in REST is the
    /// truth), and the room must not slow down for it.
    fn send_notices(&self) {
        let notices: Vec<_> = self.notices.borrow_mut().drain(..).collect();
        if notices.is_empty() {
            return;
        }
        let env = self.env.clone();
        self.state.wait_until(async move {
            if let Err(e) = crate::lobby_do::notify(&env, &notices).await {
                worker::console_warn!("lobby notice: {e}");
            }
        });
    }

    /// Sends queued Lobby notices, then asks for an alarm at the room's
    /// next deadline unless an earlier one is already set.
    async fn schedule(&self) {
        self.send_notices();
        let room_next = {
            let guard = self.loaded.borrow();
            guard.as_ref().and_then(|l| l.room.poll_timeout())
        };
        self.alarm
            .request(&self.state, &[room_next, self.conns.next_heartbeat()])
            .await;
    }

    async fn on_alarm(&self) -> EdgeResult<()> {
        self.ensure_loaded(None).await?;
        let now = now_ms();
        if self.conns.next_heartbeat().is_some_and(|t| now >= t) {
            self.sse_maintenance(now)?;
        }
        self.with_room(|r| r.handle_timeout(now))?;
        self.drain();
        let Some(batch) = self.with_room(|r| r.poll_flush(now))? else {
            return Ok(());
        };
        let result = self.flush(&batch).await;
        let now = now_ms();
        match result {
            Ok(outcome) => self.with_room(|r| r.handle_flush_result(now, &outcome))?,
            Err(e) => {
                worker::console_warn!("outbox flush failed, will retry: {e}");
                self.with_room(|r| r.handle_flush_failure(now))?;
            }
        }
        self.drain();
        Ok(())
    }

    /// Sends one batch to the origin.
    async fn flush(&self, batch: &FlushBatch) -> EdgeResult<FlushOutcome> {
        let config = self.config()?;
        let origin = OriginClient::new(&config);
        let mut outcome = FlushOutcome {
            receipts_ok: true,
            ..FlushOutcome::default()
        };
        if !batch.messages.is_empty() {
            let result = origin
                .ingest(&IngestBatch {
                    messages: batch.messages.clone(),
                })
                .await?;
            for r in &result.rejected {
                worker::console_error!(
                    "origin rejected message {} ({}): {}",
                    r.id,
                    r.code,
                    r.message
                );
            }
            outcome.stored = result.stored;
            outcome.rejected = result.rejected.into_iter().map(|r| r.id).collect();
        }
        if !batch.receipts.is_empty() {
            outcome.receipts_ok = origin
                .receipts(&ReceiptBatch {
                    receipts: batch.receipts.clone(),
                })
                .await
                .is_ok();
        }
        Ok(outcome)
    }

    fn forget_socket(&self, ws: &WebSocket) {
        let Some(tag) = self.conns.forget_socket(ws) else {
            return;
        };
        let now = now_ms();
        let mut guard = self.loaded.borrow_mut();
        if let Some(l) = guard.as_mut() {
            l.room.handle_disconnect(now, ConnId(tag.conn));
        }
    }
}

fn watermarks_of(members: &[shared::protocol::internal::MemberWatermark]) -> Vec<Watermark> {
    members
        .iter()
        .map(|m| Watermark {
            user_id: m.user_id,
            delivered_seq: m.delivered_seq,
            read_seq: m.read_seq,
        })
        .collect()
}

/// `?since=` as the Worker forwards it (from the query or Last-Event-ID).
fn since_param(req: &Request) -> EdgeResult<Option<i64>> {
    match req.url()?.query_pairs().find(|(k, _)| k == "since") {
        Some((_, v)) => v
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(Some)
            .ok_or_else(|| EdgeError::bad_request("invalid_query", "since must be a whole number")),
        None => Ok(None),
    }
}

/// A JSON body: 413 over 64 KiB, 400 when it is not JSON, 422 when a field
/// is missing or mistyped.
async fn json_body<T: serde::de::DeserializeOwned>(req: &mut Request) -> EdgeResult<T> {
    let bytes = req.bytes().await?;
    if bytes.len() > shared::domain::MAX_FRAME_BYTES {
        return Err(EdgeError::Room(shared::room::RoomError::FrameTooLarge));
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        EdgeError::bad_request("invalid_json", format!("the body is not JSON: {e}"))
    })?;
    serde_json::from_value(value).map_err(|e| EdgeError::Client {
        status: 422,
        code: "invalid_field",
        message: format!("the body has a missing or mistyped field: {e}"),
    })
}

fn header_i64(req: &Request, name: &str) -> EdgeResult<i64> {
    req.headers()
        .get(name)?
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| EdgeError::Internal(format!("missing {name}")))
}

fn error_frame(e: &EdgeError) -> ServerFrame {
    ServerFrame::Error {
        code: e.code().to_owned(),
        message: e.to_string(),
    }
}

fn send_frame(ws: &WebSocket, frame: &ServerFrame) -> EdgeResult<()> {
    let text = serde_json::to_string(frame).map_err(|e| EdgeError::Internal(e.to_string()))?;
    ws.send_with_str(&text)?;
    Ok(())
}
