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

use std::cell::{Cell, RefCell};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::{Either, select};
use futures_util::stream::FuturesUnordered;

use serde::Deserialize;
use shared::media::{AttachmentMeta, AttachmentView, Signer};
use shared::protocol::internal::{IngestBatch, ReapAttachments, Reaped};
use shared::protocol::{MessageView, ServerFrame};
use shared::receipts::{Watermark, status_of};
use shared::room::{
    BatchId, ConnId, Draft, FlushBatch, FlushOutcome, Record, Room as RoomState, RoomError, Sent,
    drain,
};
use worker::{
    DurableObject, Env, Request, Response, Result, SqlStorage, State, WebSocket,
    WebSocketIncomingMessage, durable_object,
};

use crate::auth::now_ms;
use crate::config::EdgeConfig;
use crate::conns::{
    Alarm, Connections, answer, answer_close, burn_ticket, probe_answer, random_u64,
};
use crate::error::{EdgeError, EdgeResult};
use crate::origin::OriginClient;
use crate::room_store::{self, RoomSql};

use crate::headers::{CONVERSATION_HEADER, TRANSPORT_HEADER, USER_HEADER, VALID_UNTIL_HEADER};
use crate::telemetry::{
    Current, REQUEST_ID_HEADER, TRANSPORT_SSE_POST, TRANSPORT_USER_SOCKET, TRANSPORT_WS,
};
use shared::metrics::ReporterKind;

/// A connect from a user the cache does not know refetches the members at
/// most this often.
const MEMBERS_REFRESH_MS: u64 = 5_000;
/// How long a conversation the origin does not know is remembered as
/// unknown, so probing ids costs one origin call per id and window.
const UNKNOWN_TTL_MS: u64 = 30_000;

#[derive(Debug)]
struct Loaded {
    room: RoomState,
    config: EdgeConfig,
    members_fetched_at: u64,
    /// The origin's version of the member list this room holds; every
    /// ingest answer carries the current one, so a change made by any path
    /// (even one that never told the edge) is noticed at the next flush.
    members_version: i64,
}

#[durable_object]
pub struct Room {
    state: State,
    env: Env,
    sql: SqlStorage,
    loaded: RefCell<Option<Loaded>>,
    /// Live WebSockets and SSE streams.
    conns: Connections,
    /// Notices for members' User objects, sent after the outputs that
    /// produced them.
    notices: RefCell<Vec<shared::protocol::internal::ConversationNotice>>,
    /// A delete queued attachment objects for erasure (or a new instance
    /// may have inherited some): purge after the event.
    purge_due: Cell<bool>,
    /// Live frames for subscribed members' User objects, in order per
    /// member.
    forwarder: crate::forward::Forwarder,
    alarm: Alarm,
    /// Until when the origin's "no such conversation" is trusted.
    unknown_until: Cell<u64>,
    /// The request or socket frame being handled, for the messages it
    /// makes (their request id, transport and ack latency).
    current: RefCell<Option<Current>>,
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
            purge_due: Cell::new(true),
            forwarder: crate::forward::Forwarder::default(),
            alarm: Alarm::default(),
            unknown_until: Cell::new(0),
            current: RefCell::new(None),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        let upgrade = req.headers().get("upgrade")?.is_some();
        answer(&self.conns.figures, upgrade, self.route(req).await)
    }

    async fn alarm(&self) -> Result<Response> {
        self.alarm.fired();
        if let Err(e) = self.on_alarm().await {
            crate::log!(Error, "room alarm failed", "conversation" => self.conns.figures.conversation(), "error" => e.to_string());
        }
        self.alarm.done();
        // Reschedule whatever is still due (including after an error).
        self.schedule().await;
        Response::ok("")
    }

    async fn websocket_message(
        &self,
        ws: WebSocket,
        message: WebSocketIncomingMessage,
    ) -> Result<()> {
        let Some(tag) = self.conns.tag_of(&ws) else {
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
        // Answers to backlog probes belong to the transport layer.
        if let Some(n) = probe_answer(&text) {
            self.conns.probe_answered(tag.conn, n);
            return Ok(());
        }
        let conn = ConnId(tag.conn);
        // Every frame is a request of its own: a message it makes carries
        // a fresh id to the origin's logs.
        self.begin(None, TRANSPORT_WS, now);
        let handled = self.with_loaded(|l| {
            let ctx = self.store(&l.config);
            l.room.handle_text(now, conn, &text, &ctx);
            l.room.valid_until(conn)
        });
        match handled {
            Ok(valid_until) => {
                if let Err(e) = self.drain() {
                    self.conns.figures.error(e.code());
                    let _ = send_frame(&ws, &error_frame(&e));
                } else if valid_until != tag.valid_until {
                    self.conns.set_valid_until(tag.conn, valid_until);
                }
            }
            Err(e) => {
                crate::log!(Error, "websocket frame failed", "conversation" => self.conns.figures.conversation(), "error" => e.to_string())
            }
        }
        self.current.borrow_mut().take();
        self.schedule().await;
        self.purge_objects().await;
        Ok(())
    }

    async fn websocket_close(
        &self,
        ws: WebSocket,
        code: usize,
        reason: String,
        _clean: bool,
    ) -> Result<()> {
        self.forget_socket(&ws, u16::try_from(code).ok());
        answer_close(&ws, code, reason);
        self.schedule().await;
        Ok(())
    }

    async fn websocket_error(&self, ws: WebSocket, _error: worker::Error) -> Result<()> {
        self.forget_socket(&ws, None);
        self.schedule().await;
        Ok(())
    }
}

impl Room {
    fn store<'a>(&'a self, config: &'a EdgeConfig) -> RoomSql<'a> {
        RoomSql {
            sql: &self.sql,
            conns: &self.conns,
            notices: &self.notices,
            purge_due: &self.purge_due,
            forwarder: &self.forwarder,
            jwt_secret: &config.jwt_secret,
            signer: &config.signer,
            current: &self.current,
        }
    }

    /// Starts handling a request (a socket frame has no id until it needs
    /// one: see `RoomSql::request_id`).
    fn begin(&self, request_id: Option<String>, transport: &'static str, now: u64) {
        *self.current.borrow_mut() = Some(Current {
            request_id,
            transport,
            started_ms: now,
        });
    }

    /// [`Self::begin`] for a request from the Worker or a User object.
    fn begin_request(&self, req: &Request) -> EdgeResult<()> {
        let request_id = req.headers().get(REQUEST_ID_HEADER)?;
        let transport = match req.headers().get(TRANSPORT_HEADER)?.as_deref() {
            Some("user_socket") => TRANSPORT_USER_SOCKET,
            _ => TRANSPORT_SSE_POST,
        };
        self.begin(
            Some(crate::telemetry::request_id_from(request_id)),
            transport,
            now_ms(),
        );
        Ok(())
    }

    /// The figures of now: connections and the outbox's age.
    fn gauges(&self) -> shared::metrics::Gauges {
        let oldest = self
            .loaded
            .borrow()
            .as_ref()
            .and_then(|l| l.room.oldest_unflushed_at());
        shared::metrics::Gauges {
            oldest_unflushed_at_ms: oldest,
            ..self.conns.gauges()
        }
    }

    async fn route(&self, req: Request) -> EdgeResult<Response> {
        let conversation_id = header_i64(&req, CONVERSATION_HEADER)?;
        let path = req.path();
        if path == "/members-changed" {
            // Only a room that exists has members to refresh; a notice for
            // one that was never opened must not create it.
            if room_store::exists(&self.sql)? {
                self.ensure_loaded(Some(conversation_id)).await?;
                self.refresh_members().await?;
            }
            return Ok(Response::empty()?.with_status(204));
        }
        self.ensure_loaded(Some(conversation_id)).await?;
        match path.as_str() {
            "/ws" => self.connect_ws(&req).await,
            "/events" => self.connect_sse(&req).await,
            "/messages" => self.post_message(req).await,
            "/change" => self.post_change(req).await,
            "/typing" => self.post_typing(&req).await,
            "/read" => self.post_read(req).await,
            "/subscribe" => self.subscribe(req).await,
            "/attachment-register" => self.register_attachment(req).await,
            "/attachment-updated" => self.attachment_updated(req).await,
            "/attachments-reap" => self.reap_attachments(req).await,
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
        let valid_until = valid_until_header(req)?;
        burn_ticket(&self.sql, req, now_ms())?;
        let (caps, heartbeat_ms) =
            self.with_loaded(|l| (l.config.room_caps(), l.config.sse_heartbeat_ms))?;
        let now = now_ms();
        let (conn, response) =
            self.conns
                .open_stream(user, now, valid_until, &caps, heartbeat_ms)?;
        self.forget_gone(now)?;
        self.with_room(|r| {
            r.handle_connect(now, ConnId(conn), user, since)
                .map(|()| r.set_valid_until(ConnId(conn), valid_until))
        })??;
        self.drain()?;
        self.schedule().await;
        Ok(response)
    }

    /// `POST /messages` `{content, client_msg_id}`: 201 with the stored
    /// message, or 200 with the original for a known `client_msg_id`.
    async fn post_message(&self, mut req: Request) -> EdgeResult<Response> {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default)]
            content: String,
            #[serde(default)]
            client_msg_id: Option<String>,
            #[serde(default)]
            attachment_ids: Vec<uuid::Uuid>,
            #[serde(default)]
            reply_to: Option<uuid::Uuid>,
            #[serde(default)]
            mentions: Vec<i64>,
        }
        let user = self.member(&req).await?;
        let body: Body = json_body(&mut req).await?;
        let now = now_ms();
        self.begin_request(&req)?;
        let draft = Draft {
            content: body.content,
            client_msg_id: body.client_msg_id,
            attachment_ids: body.attachment_ids,
            reply_to: body.reply_to,
            mentions: body.mentions,
        };
        let (sent, signer) = self.with_loaded(|l| {
            let ctx = self.store(&l.config);
            let sent = l.room.submit_draft(now, user, draft, None, &ctx);
            (sent, l.config.signer.clone())
        })?;
        let drained = self.drain();
        self.current.borrow_mut().take();
        let sent = sent?;
        drained?;
        self.schedule().await;
        let (status, message) = match sent {
            Sent::New(m) => (201, m),
            Sent::Duplicate(m) => (200, m),
            Sent::DuplicateOlder(known) => (200, self.original(known.seq).await?),
        };
        let message = sign_message(&signer, message);
        Ok(Response::from_json(&message)?.with_status(status))
    }

    /// `POST /change` with an `edit`, `delete` or `react` frame (from the
    /// Worker's HTTP routes or the user's always-on socket): 200 with
    /// `{ack, event}` (`event` null when nothing changed, or for a resend
    /// the room no longer holds).
    async fn post_change(&self, mut req: Request) -> EdgeResult<Response> {
        #[derive(serde::Serialize)]
        struct Answer {
            ack: ServerFrame,
            event: Option<ServerFrame>,
        }
        let user = self.member(&req).await?;
        let frame: shared::protocol::ClientFrame = json_body(&mut req).await?;
        let (conversation_id, message_id, change, key) = shared::room::change_of(frame)?;
        let now = now_ms();
        self.begin_request(&req)?;
        let outcome = self.with_loaded(|l| {
            if conversation_id != l.room.conversation_id() {
                return Err(RoomError::WrongConversation(conversation_id));
            }
            let ctx = self.store(&l.config);
            l.room
                .submit_change(now, user, message_id, change, key, None, &ctx)
        });
        let drained = self.drain();
        self.current.borrow_mut().take();
        let outcome = outcome??;
        drained?;
        self.schedule().await;
        self.purge_objects().await;
        Ok(Response::from_json(&Answer {
            ack: outcome.ack,
            event: outcome.event,
        })?)
    }

    /// Erases the objects of deleted messages' attachments from the bucket.
    /// A row leaves `purge` only once its objects are gone, so a failure
    /// is retried by the next change or alarm.
    async fn purge_objects(&self) {
        if !self.purge_due.replace(false) {
            return;
        }
        let pending = match room_store::purge_pending(&self.sql) {
            Ok(p) if !p.is_empty() => p,
            Ok(_) => return,
            Err(e) => {
                crate::log!(Error, "purge failed", "error" => e.to_string());
                return;
            }
        };
        let bucket = match self.env.bucket(crate::media::BUCKET) {
            Ok(b) => b,
            Err(e) => {
                crate::log!(Error, "purge: no bucket", "error" => e.to_string());
                return;
            }
        };
        for id in pending {
            match crate::media::delete_all(&bucket, id).await {
                Ok(()) => {
                    if let Err(e) = room_store::purged(&self.sql, id) {
                        crate::log!(Error, "purge not recorded", "attachment" => id.to_string(), "error" => e.to_string());
                    }
                }
                Err(e) => {
                    crate::log!(Warn, "purge failed, retried later", "attachment" => id.to_string(), "error" => e.to_string());
                    self.purge_due.set(true);
                }
            }
        }
    }

    /// The original of a resent message older than the room's memory: from
    /// the SQLite log while it is there, else from PostgreSQL (a message
    /// leaves the log only once the origin confirmed it).
    async fn original(&self, seq: i64) -> EdgeResult<MessageView> {
        let (conversation_id, members, config) = self.with_loaded(|l| {
            (
                l.room.conversation_id(),
                l.room.members().copied().collect::<Vec<Watermark>>(),
                l.config.clone(),
            )
        })?;
        let record: Record = match room_store::message_at(&self.sql, seq)? {
            Some(r) => r,
            None => OriginClient::new(&config)
                .message(conversation_id, seq)
                .await
                .map(|m| Record {
                    id: m.id,
                    seq: m.seq,
                    sender_id: m.sender_id,
                    content: m.content,
                    created_at_ms: m.created_at.timestamp_millis(),
                    client_msg_id: m.client_msg_id,
                    flushed: true,
                    // PostgreSQL's copy names its attachments by id only;
                    // a resend this old gets the text and the ids' count
                    // is not rebuilt (documented in PROTOCOL.md).
                    attachments: Vec::new(),
                    ..Record::default()
                })?,
        };
        Ok(MessageView {
            id: record.id,
            seq,
            conversation_id,
            sender_id: record.sender_id,
            status: status_of(seq, record.sender_id, &members),
            created_at: record.created_at(),
            content: record.content,
            client_msg_id: record.client_msg_id,
            attachments: record
                .attachments
                .into_iter()
                .map(AttachmentView::unsigned)
                .collect(),
            edited_at: record
                .state
                .edited_at_ms
                .and_then(chrono::DateTime::from_timestamp_millis),
            deleted_at: record
                .state
                .deleted_at_ms
                .and_then(chrono::DateTime::from_timestamp_millis),
            reactions: record.state.views(None),
            reply_to: record.reply_to,
            mentions: record.mentions,
        })
    }

    /// `POST /attachment-register` (from the Worker, after the upload
    /// reached the bucket and the origin recorded it): the uploader may
    /// now send it in this room.
    async fn register_attachment(&self, mut req: Request) -> EdgeResult<Response> {
        let meta: AttachmentMeta = json_body(&mut req).await?;
        room_store::register_attachment(&self.sql, &meta, now_ms())?;
        Ok(Response::empty()?.with_status(204))
    }

    /// `POST /attachment-updated` (from the origin, through the Worker):
    /// processing finished. The stored copies change, and every member
    /// hears `attachment_updated`.
    async fn attachment_updated(&self, mut req: Request) -> EdgeResult<Response> {
        let meta: AttachmentMeta = json_body(&mut req).await?;
        let sent = room_store::update_attachment(&self.sql, &meta)?;
        self.with_room(|r| r.update_attachment(meta, sent))?;
        self.drain()?;
        self.schedule().await;
        Ok(Response::empty()?.with_status(204))
    }

    /// `POST /attachments-reap` (from the origin's cleanup): forgets the
    /// unsent ones and deletes their objects; answers which went.
    async fn reap_attachments(&self, mut req: Request) -> EdgeResult<Response> {
        let body: ReapAttachments = json_body(&mut req).await?;
        let reaped = room_store::reap_attachments(&self.sql, &body.ids)?;
        // The rows are gone first: from here the room refuses these ids,
        // so an object deleted below is never sent. A failed delete is
        // retried by the next round (the origin keeps rows it was not
        // told are reaped).
        let bucket = self.env.bucket(crate::media::BUCKET)?;
        for id in &reaped {
            crate::media::delete_all(&bucket, *id).await?;
        }
        Ok(Response::from_json(&Reaped { reaped })?)
    }

    /// `POST /typing`: 204.
    async fn post_typing(&self, req: &Request) -> EdgeResult<Response> {
        let user = self.member(req).await?;
        let now = now_ms();
        self.with_room(|r| r.handle_typing(now, user))??;
        self.drain()?;
        self.schedule().await;
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
        self.drain()?;
        self.schedule().await;
        Ok(Response::empty()?.with_status(204))
    }

    /// `POST /subscribe` `{since}` from a member's User object: the room's
    /// live frames go to it from now on (`crate::forward`), and the answer
    /// `{frames}` is what follows `since` (nothing without it). Both happen
    /// in this one event, so nothing falls between them.
    async fn subscribe(&self, mut req: Request) -> EdgeResult<Response> {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default)]
            since: Option<i64>,
        }
        #[derive(serde::Serialize)]
        struct Answer {
            frames: Vec<ServerFrame>,
        }
        let user = self.member(&req).await?;
        let body: Body = json_body(&mut req).await?;
        room_store::set_subscribed(&self.sql, user, true)?;
        self.forwarder.subscribed(user);
        let now = now_ms();
        let (frames, signer) = self.with_loaded(|l| {
            (
                l.room.handle_subscribe(now, user, body.since),
                l.config.signer.clone(),
            )
        })?;
        let now_secs = room_store::now_secs();
        let frames: Vec<ServerFrame> = frames?
            .into_iter()
            .map(|f| signer.sign_frame(&f, now_secs).unwrap_or(f))
            .collect();
        self.drain()?;
        self.schedule().await;
        Ok(Response::from_json(&Answer { frames })?)
    }

    /// Upgrades a member's request to a hibernatable WebSocket.
    async fn connect_ws(&self, req: &Request) -> EdgeResult<Response> {
        let since = since_param(req)?;
        let valid_until = valid_until_header(req)?;
        // A refusal becomes an error frame and a 1008 close (see fetch).
        let user = self.member(req).await?;
        burn_ticket(&self.sql, req, now_ms())?;
        let caps = self.with_loaded(|l| l.config.room_caps())?;
        let now = now_ms();
        let (conn, client) =
            self.conns
                .accept_socket(&self.state, user, valid_until, now, &caps)?;
        self.forget_gone(now)?;
        let joined = self.with_room(|r| {
            r.handle_connect(now, ConnId(conn), user, since)
                .map(|()| r.set_valid_until(ConnId(conn), valid_until))
        })?;
        if let Err(e) = joined {
            self.conns.close(conn, 1008, &e.to_string());
        }
        self.drain()?;
        self.schedule().await;
        Ok(Response::from_websocket(client)?)
    }

    // ---- loading ---------------------------------------------------------

    /// Builds the state machine from SQLite and reattaches the connections
    /// that survived. A brand-new room first asks the origin for its
    /// members and last seq, and writes nothing unless the conversation
    /// exists.
    async fn ensure_loaded(&self, conversation_id: Option<i64>) -> EdgeResult<()> {
        if self.loaded.borrow().is_some() {
            return Ok(());
        }
        let config = EdgeConfig::from_env(&self.env)?;
        let mut fetched_at = 0;
        if !room_store::exists(&self.sql)? {
            let id = conversation_id
                .ok_or_else(|| EdgeError::Internal("room without a conversation id".to_owned()))?;
            let now = now_ms();
            if now < self.unknown_until.get() {
                return Err(EdgeError::NotFound("conversation"));
            }
            let members = match OriginClient::new(&config).members(id).await {
                Ok(m) => m,
                Err(EdgeError::NotFound(what)) => {
                    self.unknown_until.set(now + UNKNOWN_TTL_MS);
                    return Err(EdgeError::NotFound(what));
                }
                Err(e) => return Err(e),
            };
            if self.loaded.borrow().is_some() {
                return Ok(()); // another event loaded it while we waited
            }
            // Created only now that the origin vouched for it.
            if !room_store::exists(&self.sql)? {
                room_store::create_schema(&self.sql)?;
                room_store::meta_set(&self.sql, "conversation_id", id)?;
                room_store::meta_set(&self.sql, "base_seq", members.last_seq)?;
                let mut store = self.store(&config);
                shared::room::Driver::replace_members(
                    &mut store,
                    &watermarks_of(&members.members)
                        .into_iter()
                        .map(|watermark| shared::room::StoredWatermark {
                            watermark,
                            synced: true,
                        })
                        .collect::<Vec<_>>(),
                )?;
                room_store::meta_set(&self.sql, "members_version", members.members_version)?;
                room_store::set_moderators(&self.sql, &members.moderators)?;
                room_store::meta_set(&self.sql, "members_loaded", 1)?;
            }
            fetched_at = now_ms();
        } else {
            room_store::create_schema(&self.sql)?;
        }
        if self.loaded.borrow().is_some() {
            return Ok(());
        }
        // Sockets that survived hibernation first: the rebuild below
        // reattaches every live connection to the state machine.
        self.conns.reattach(&self.state);
        self.load(config, fetched_at)?;
        // Reattaching may close the sockets of members removed meanwhile.
        self.drain()?;
        // Plain-text "ping" is answered by the runtime without waking us.
        if let Ok(pair) = worker::WebSocketRequestResponsePair::new("ping", "pong") {
            self.state.set_websocket_auto_response(&pair);
        }
        self.alarm.load(&self.state).await;
        self.schedule().await;
        Ok(())
    }

    /// Builds the state machine from SQLite (synchronously: nothing else
    /// runs in between) and reattaches the live connections.
    fn load(&self, config: EdgeConfig, members_fetched_at: u64) -> EdgeResult<()> {
        let conversation_id = room_store::meta_get(&self.sql, "conversation_id")?
            .ok_or_else(|| EdgeError::Internal("room without a conversation id".to_owned()))?;
        self.conns
            .figures
            .identify(ReporterKind::Room, conversation_id, config.metrics);
        let now = now_ms();
        let mut room = RoomState::load(
            conversation_id,
            config.room.clone(),
            random_u64(),
            now,
            &self.store(&config),
        )
        .map_err(|e| EdgeError::Internal(format!("load room {conversation_id}: {e}")))?;
        for live in self.conns.live() {
            room.handle_reattach(ConnId(live.conn), live.user, live.valid_until);
        }
        for user in room_store::subscribers(&self.sql)? {
            room.restore_subscriber(user);
        }
        room.set_moderators(room_store::moderators(&self.sql)?);
        let members_version = room_store::meta_get(&self.sql, "members_version")?.unwrap_or(0);
        *self.loaded.borrow_mut() = Some(Loaded {
            room,
            config,
            members_fetched_at,
            members_version,
        });
        Ok(())
    }

    /// After a failed write: the state machine's memory is ahead of its
    /// storage, so it is thrown away and rebuilt from SQLite. Connections
    /// stay open.
    fn rebuild(&self) {
        let previous = self.loaded.borrow_mut().take();
        let Some(previous) = previous else { return };
        if let Err(e) = self.load(previous.config, previous.members_fetched_at) {
            // Left unloaded: the next event tries again.
            crate::log!(Error, "room rebuild failed", "error" => e.to_string());
        }
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

    /// Refetches the member list; removed members' connections close.
    async fn refresh_members(&self) -> EdgeResult<()> {
        let (conversation_id, config) =
            self.with_loaded(|l| (l.room.conversation_id(), l.config.clone()))?;
        let members = OriginClient::new(&config).members(conversation_id).await?;
        let watermarks = watermarks_of(&members.members);
        let now = now_ms();
        room_store::set_moderators(&self.sql, &members.moderators)?;
        self.with_loaded(|l| {
            l.room.set_members(now, &watermarks, members.last_seq);
            l.room.set_moderators(members.moderators.iter().copied());
            l.members_fetched_at = now;
            l.members_version = members.members_version;
        })?;
        room_store::meta_set(&self.sql, "members_version", members.members_version)?;
        self.drain()
    }

    // ---- driving the state machine --------------------------------------

    /// Runs `f` on the loaded state. Every caller runs after
    /// `ensure_loaded` succeeded; the error only reports a bug (or a room
    /// whose rebuild failed, which the next event retries).
    fn with_loaded<R>(&self, f: impl FnOnce(&mut Loaded) -> R) -> EdgeResult<R> {
        let mut guard = self.loaded.borrow_mut();
        match guard.as_mut() {
            Some(loaded) => Ok(f(loaded)),
            None => Err(EdgeError::Room(RoomError::Storage)),
        }
    }

    fn with_room<R>(&self, f: impl FnOnce(&mut RoomState) -> R) -> EdgeResult<R> {
        self.with_loaded(|l| f(&mut l.room))
    }

    /// Executes the room's outputs in order (`shared::room::drain`). A
    /// failed write stops it; the room is rebuilt from SQLite and the
    /// caller gets a `storage_unavailable` error to pass to its client,
    /// who may resend.
    fn drain(&self) -> EdgeResult<()> {
        let result = {
            let mut guard = self.loaded.borrow_mut();
            let Some(l) = guard.as_mut() else {
                return Ok(());
            };
            let mut store = RoomSql {
                sql: &self.sql,
                conns: &self.conns,
                notices: &self.notices,
                purge_due: &self.purge_due,
                forwarder: &self.forwarder,
                jwt_secret: &l.config.jwt_secret,
                signer: &l.config.signer,
                current: &self.current,
            };
            drain(&mut l.room, &mut store)
        };
        if let Err(failed) = result {
            crate::log!(Error, "room write failed, rebuilding from storage",
                "conversation" => self.conns.figures.conversation(),
                "dropped_outputs" => failed.dropped,
                "error" => failed.error.to_string());
            self.rebuild();
            return Err(EdgeError::Room(RoomError::Storage));
        }
        // Forwards leave at once: they wait for no alarm and no window.
        self.send_forwards();
        // Connections the transport ended on its own (slow readers) leave
        // the room too.
        self.forget_gone(now_ms())
    }

    /// Tells the state machine about connections the transport ended.
    fn forget_gone(&self, now: u64) -> EdgeResult<()> {
        let gone = self.conns.take_gone();
        if gone.is_empty() {
            return Ok(());
        }
        self.with_room(|r| {
            for conn in gone {
                r.handle_disconnect(now, ConnId(conn));
            }
        })
    }

    /// Hands queued notices to the members' User objects without waiting: a
    /// notification is best effort (the conversation list in REST is the
    /// truth), and the room must not slow down for it.
    fn send_notices(&self) {
        let notices: Vec<_> = self.notices.borrow_mut().drain(..).collect();
        if notices.is_empty() {
            return;
        }
        let env = self.env.clone();
        self.state.wait_until(async move {
            if let Err(e) = crate::user_do::notify(&env, &notices).await {
                crate::log!(Warn, "member notice failed", "error" => e.to_string());
            }
        });
    }

    /// Starts the forwards the last outputs queued, and forgets the
    /// subscriptions of members whose objects said they are offline.
    fn send_forwards(&self) {
        let gone = self.forwarder.take_gone();
        if !gone.is_empty() {
            for user in &gone {
                if let Err(e) = room_store::set_subscribed(&self.sql, *user, false) {
                    crate::log!(Error, "unsubscribe failed", "user" => user, "error" => e.to_string());
                }
            }
            let _ = self.with_room(|r| gone.iter().for_each(|u| r.unsubscribe(*u)));
        }
        let conversation_id = self
            .loaded
            .borrow()
            .as_ref()
            .map(|l| l.room.conversation_id());
        if let Some(id) = conversation_id {
            self.forwarder.start(&self.state, &self.env, id);
        }
    }

    /// Sends queued member notices, then asks for an alarm at the room's
    /// next deadline unless an earlier one is already set.
    async fn schedule(&self) {
        self.send_notices();
        let room_next = {
            let guard = self.loaded.borrow();
            guard.as_ref().and_then(|l| l.room.poll_timeout())
        };
        let report = self.conns.figures.due(&self.gauges());
        self.alarm
            .request(
                &self.state,
                &[room_next, self.conns.next_heartbeat(), report],
            )
            .await;
    }

    /// The alarm: timers, then the outbox. The outbox runs here and never
    /// in a socket's handler: workerd hands a socket its next frame only
    /// when the handler of the previous one has finished, so a handler that
    /// waited for the origin would stall its sender. While batches are in
    /// flight the handler stays, starting the next ones as answers come
    /// back or as they come due, up to the room's pipeline depth; every
    /// other event (messages, acks, broadcasts) runs meanwhile.
    async fn on_alarm(&self) -> EdgeResult<()> {
        self.ensure_loaded(None).await?;
        self.purge_objects().await;
        let mut in_flight = FuturesUnordered::new();
        loop {
            let now = now_ms();
            if self.conns.next_heartbeat().is_some_and(|t| now >= t) {
                let heartbeat = self.with_loaded(|l| l.config.sse_heartbeat_ms)?;
                self.conns.maintain_streams(now, heartbeat);
                self.forget_gone(now)?;
            }
            self.with_room(|r| r.handle_timeout(now))?;
            self.drain()?;
            self.send_notices();
            while let Some(batch) = self.with_room(|r| r.poll_flush(now))? {
                // What the batch tells the origin is written here first; if
                // that write fails the batch stays home (the room was
                // rebuilt).
                self.drain()?;
                in_flight.push(self.send_batch(batch));
            }
            if in_flight.is_empty() {
                // Figures that no batch carried go on their own.
                let config = self.with_loaded(|l| l.config.clone())?;
                self.conns
                    .figures
                    .send_if_due(&config, now_ms(), self.gauges())
                    .await;
                return Ok(());
            }
            // An answer, or the moment the next batch comes due.
            let wait = self
                .loaded
                .borrow()
                .as_ref()
                .and_then(|l| l.room.poll_timeout())
                .map(|due| due.saturating_sub(now_ms()));
            let answer = match wait {
                Some(ms) => {
                    let timer = Box::pin(worker::Delay::from(Duration::from_millis(ms.max(1))));
                    match select(in_flight.next(), timer).await {
                        Either::Left((answer, _)) => answer,
                        Either::Right(((), _)) => None,
                    }
                }
                None => in_flight.next().await,
            };
            if let Some((id, result)) = answer {
                self.answered(id, result).await?;
            }
        }
    }

    /// One batch to the origin, named by its number.
    async fn send_batch(
        &self,
        batch: FlushBatch,
    ) -> (BatchId, EdgeResult<(FlushOutcome, Option<i64>)>) {
        (batch.id, self.flush(&batch).await)
    }

    /// The origin answered batch `id` (or did not).
    async fn answered(
        &self,
        id: BatchId,
        result: EdgeResult<(FlushOutcome, Option<i64>)>,
    ) -> EdgeResult<()> {
        let now = now_ms();
        let mut members_changed = false;
        match result {
            Ok((outcome, version)) => {
                self.with_loaded(|l| {
                    l.room.handle_flush_result(now, id, &outcome);
                    members_changed = version.is_some_and(|v| v != l.members_version);
                })?;
            }
            Err(e) => {
                self.conns.figures.flush_failure();
                crate::log!(Warn, "outbox flush failed, will retry",
                    "conversation" => self.conns.figures.conversation(),
                    "error" => e.to_string());
                self.with_room(|r| r.handle_flush_failure(now, id))?;
            }
        }
        self.drain()?;
        if members_changed {
            // Membership changed by a path that did not tell us (or the
            // notice was lost): removed members' connections close now.
            self.refresh_members().await?;
        }
        Ok(())
    }

    /// Sends one batch to the origin: its messages and the watermarks it
    /// carries, in one request. Also returns the member-list version the
    /// origin reported for this conversation, if any.
    async fn flush(&self, batch: &FlushBatch) -> EdgeResult<(FlushOutcome, Option<i64>)> {
        let (config, conversation_id) =
            self.with_loaded(|l| (l.config.clone(), l.room.conversation_id()))?;
        // The figures ride along when due: the outbox's age as the batch
        // leaves reaches the origin even when the batch then fails.
        let report = self.conns.figures.report_for_flush(now_ms(), self.gauges());
        let result = OriginClient::new(&config)
            .ingest(&IngestBatch {
                messages: batch.messages.clone(),
                receipts: batch.receipts.clone(),
                report: report.clone(),
            })
            .await;
        if let Some(report) = &report {
            self.conns.figures.answered(report, result.is_ok());
        }
        let result = result?;
        for r in &result.rejected {
            crate::log!(Error, "origin rejected a message",
                "conversation" => conversation_id,
                "message_id" => r.id.to_string(),
                "code" => r.code.clone(),
                "reason" => r.message.clone());
        }
        let version = result
            .members_versions
            .iter()
            .find(|v| v.conversation_id == conversation_id)
            .map(|v| v.members_version);
        Ok((
            FlushOutcome {
                stored: result.stored,
                rejected: result.rejected.into_iter().map(|r| r.id).collect(),
                // A 200 means every receipt in the request was applied.
                receipts_ok: true,
            },
            version,
        ))
    }

    fn forget_socket(&self, ws: &WebSocket, code: Option<u16>) {
        let Some(tag) = self.conns.forget_socket(ws, code) else {
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

/// The caller's token validity, as the Worker forwards it.
fn valid_until_header(req: &Request) -> EdgeResult<Option<u64>> {
    Ok(req
        .headers()
        .get(VALID_UNTIL_HEADER)?
        .and_then(|v| v.parse().ok()))
}

/// A message with its attachment links signed now.
fn sign_message(signer: &Signer, mut message: MessageView) -> MessageView {
    signer.sign_message(&mut message, room_store::now_secs());
    message
}

/// A POST to Room `conversation_id` from inside the edge (the Worker, or a
/// User object for its user), on behalf of `user` when there is one.
pub async fn post(
    env: &Env,
    conversation_id: i64,
    user: Option<i64>,
    path: &str,
    body: String,
) -> EdgeResult<Response> {
    post_with(env, conversation_id, user, path, body, &[]).await
}

/// [`post`] with extra headers (a User object's request id and transport).
pub async fn post_with(
    env: &Env,
    conversation_id: i64,
    user: Option<i64>,
    path: &str,
    body: String,
    extra: &[(&str, &str)],
) -> EdgeResult<Response> {
    let headers = worker::Headers::new();
    for (name, value) in extra {
        headers.set(name, value)?;
    }
    headers.set(CONVERSATION_HEADER, &conversation_id.to_string())?;
    if let Some(user) = user {
        headers.set(USER_HEADER, &user.to_string())?;
    }
    headers.set("content-type", "application/json")?;
    let mut init = worker::RequestInit::new();
    init.with_method(worker::Method::Post)
        .with_headers(headers)
        .with_body(Some(body.into()));
    let req = Request::new_with_init(&format!("https://room{path}"), &init)?;
    let stub = env
        .durable_object("ROOM")?
        .get_by_name(&conversation_id.to_string())?;
    Ok(stub.fetch_with_request(req).await?)
}
