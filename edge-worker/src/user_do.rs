//! The `User` Durable Object: one per user (`user:{id}`), the ChatBox's
//! always-on connection on every tab and device. It replaced the
//! tenant-wide Lobby. A thin driver around `shared::user::User`.
//!
//! It carries the user's presence (online from the first connection,
//! offline after the last one closes and a grace period passes, set by an
//! alarm) to their **contacts'** objects and to the origin, shows the
//! contacts' presence on the user's connections, relays the
//! `conversation_updated` notices rooms send, tells the connections when a
//! group changed (`conversation_changed`, `conversation_removed`: the
//! Worker's `/changed` after a rename or a member change), and passes the seed's
//! single-socket frames (`message`, `typing`, `read`) into their rooms.
//!
//! While the user is online the object is subscribed to the Rooms of their
//! conversations (table `subscribed`, emptied when they go offline): each
//! Room forwards its live `message`, `typing` and `receipt` frames here
//! (`/relay`, in the room's order), and the object relays them to every
//! connection. A `resume` frame subscribes with the client's last seq per
//! conversation and gets the gap replayed in the same Room event, so
//! nothing falls between replay and live stream (`shared::user` holds the
//! live frames while a replay is in flight and drops what a connection
//! already has). A Room that forwards to an offline user gets 410 and
//! drops the subscription.
//! The user's own presence is kept in SQLite (`reported`) until the origin
//! confirms it, so REST catches up even after an outage.
//!
//! Nothing here grows with the deployment: an object holds one user's
//! connections and contacts (see the cost model in ARCHITECTURE.md).

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};

use futures_util::StreamExt;
use futures_util::future::join_all;
use serde::Deserialize;
use shared::bucket::{Bucket, Rate};
use shared::protocol::internal::{
    ConversationChange, ConversationNotice, PresenceBatch, PresenceUpdate,
};
use shared::protocol::{ClientFrame, ServerFrame};
use shared::room::{ConnId, cost};
use shared::user::{Contact, MAX_RESUME, User as UserState, UserConfig, UserOutput, UserTarget};
use worker::{
    DurableObject, Env, Headers, Method, Request, RequestInit, Response, Result, SqlStorage, State,
    WebSocket, WebSocketIncomingMessage, durable_object,
};

use crate::auth::now_ms;
use crate::config::EdgeConfig;
use crate::conns::{
    Alarm, Connections, SocketTag, answer, answer_close, burn_ticket, probe_answer,
};
use crate::error::{EdgeError, EdgeResult};
use crate::headers::{USER_HEADER, VALID_UNTIL_HEADER};
use crate::origin::OriginClient;

/// Unconfirmed presence reports, and a contact list the origin could not
/// give, are retried this often.
const RETRY_MS: u64 = 5_000;
/// Answers one connection may have waiting; beyond, it is a flood.
const MAX_QUEUED_FRAMES: usize = 256;
/// Room subscriptions in flight at once when a user comes online.
const SUBSCRIBE_CONCURRENCY: usize = 16;

#[durable_object]
pub struct User {
    state: State,
    env: Env,
    sql: SqlStorage,
    user: RefCell<Option<UserState>>,
    config: OnceCell<EdgeConfig>,
    conns: Connections,
    alarm: Alarm,
    /// When the unconfirmed presence report is next sent (the alarm sends
    /// it, so no request waits for the origin).
    retry_report_at: Cell<Option<u64>>,
    /// When the contact list is fetched (again) from the origin.
    retry_contacts_at: Cell<Option<u64>>,
    /// Whether the contact list was ever fetched by this instance. An
    /// object woken only to hear a contact's presence never needs it.
    contacts_loaded: Cell<bool>,
    /// The user's flood limit for the frames their clients send here.
    bucket: RefCell<Option<Bucket>>,
    /// Bumped by every presence change, so a report that was in flight
    /// while another change came does not mark that one sent.
    report_generation: Cell<u64>,
    /// Room subscriptions in flight, by conversation.
    subscribing: RefCell<HashMap<i64, u32>>,
    /// Answers waiting for their turn, per connection. workerd delivers a
    /// socket's next frame while a handler waits on another object, so
    /// without this queue two frames of one connection could reach their
    /// room out of order, or a flood's close could overtake the ack of a
    /// message stored just before it.
    queued: RefCell<HashMap<u64, VecDeque<Answer>>>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("sockets", &self.conns.socket_count())
            .field("streams", &self.conns.stream_count())
            .finish_non_exhaustive()
    }
}

impl DurableObject for User {
    fn new(state: State, env: Env) -> Self {
        let sql = state.storage().sql();
        Self {
            state,
            env,
            sql,
            user: RefCell::new(None),
            config: OnceCell::new(),
            conns: Connections::default(),
            alarm: Alarm::default(),
            retry_report_at: Cell::new(None),
            retry_contacts_at: Cell::new(None),
            contacts_loaded: Cell::new(false),
            bucket: RefCell::new(None),
            report_generation: Cell::new(0),
            subscribing: RefCell::new(HashMap::new()),
            queued: RefCell::new(HashMap::new()),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        let upgrade = req.headers().get("upgrade")?.is_some();
        answer(&self.conns.figures, upgrade, self.route(req).await)
    }

    async fn alarm(&self) -> Result<Response> {
        self.alarm.fired();
        if let Err(e) = self.on_alarm().await {
            crate::log!(Error, "user alarm", "error" => e.to_string());
        }
        self.alarm.done();
        self.after_events().await;
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
        // A frame may be the first event of a new instance (after
        // hibernation): the sockets must be reattached before anything here
        // touches them, or a renewal (`auth`) would update no socket and
        // the stale expiry in the attachment would close it later.
        if let Err(e) = self.ensure_loaded(tag.user).await {
            crate::log!(Error, "user websocket message", "error" => e.to_string());
        }
        let text = match message {
            WebSocketIncomingMessage::String(t) => t,
            WebSocketIncomingMessage::Binary(_) => String::new(),
        };
        if let Some(n) = probe_answer(&text) {
            self.conns.probe_answered(tag.conn, n);
            return Ok(());
        }
        // The bucket is charged on arrival; the answers run in arrival
        // order, one at a time per connection (see `queued`).
        let answer = self.answer_frame(&tag, &text);
        let first = {
            let mut queued = self.queued.borrow_mut();
            match queued.get_mut(&tag.conn) {
                Some(queue) if queue.len() >= MAX_QUEUED_FRAMES => None,
                Some(queue) => {
                    queue.push_back(answer);
                    Some(false)
                }
                None => {
                    queued.insert(tag.conn, VecDeque::from([answer]));
                    Some(true)
                }
            }
        };
        match first {
            None => {
                self.conns.close(tag.conn, 1008, "flood");
                self.disconnected(tag.user, tag.conn).await;
                return Ok(());
            }
            Some(false) => return Ok(()), // the handler already running takes it
            Some(true) => {}
        }
        loop {
            let next = {
                let mut queued = self.queued.borrow_mut();
                let next = queued.get_mut(&tag.conn).and_then(VecDeque::pop_front);
                if next.is_none() {
                    queued.remove(&tag.conn);
                }
                next
            };
            let Some(answer) = next else { break };
            if self.execute(&ws, &tag, answer).await {
                self.queued.borrow_mut().remove(&tag.conn);
                break;
            }
        }
        Ok(())
    }

    async fn websocket_close(
        &self,
        ws: WebSocket,
        code: usize,
        reason: String,
        _clean: bool,
    ) -> Result<()> {
        self.socket_gone(&ws, u16::try_from(code).ok()).await;
        answer_close(&ws, code, reason);
        Ok(())
    }

    async fn websocket_error(&self, ws: WebSocket, _error: worker::Error) -> Result<()> {
        self.socket_gone(&ws, None).await;
        Ok(())
    }
}

impl User {
    /// Carries out one answer to a client frame; true when it closed the
    /// connection.
    async fn execute(&self, ws: &WebSocket, tag: &SocketTag, answer: Answer) -> bool {
        let (reply, close) = match answer {
            Answer::Reply(reply, close) => (Some(reply), close),
            Answer::Resume(since) => (Some(self.resume(tag.user, tag.conn, since).await), None),
            // The seed's single socket: the frame goes to its room.
            Answer::Room(frame) => (
                crate::single_socket::into_room(&self.env, tag.user, &frame, &self.conns.figures)
                    .await,
                None,
            ),
        };
        if let Some(Ok(text)) = reply.map(|r| serde_json::to_string(&r)) {
            let _ = ws.send_with_str(&text);
        }
        if let Some(reason) = close {
            self.conns.close(tag.conn, 1008, reason);
            self.disconnected(tag.user, tag.conn).await;
            true
        } else {
            self.after_events().await;
            false
        }
    }

    /// The Worker's settings, read from the environment once per instance
    /// (every frame and every event needs them).
    fn config(&self) -> EdgeResult<&EdgeConfig> {
        if let Some(config) = self.config.get() {
            return Ok(config);
        }
        let config = EdgeConfig::from_env(&self.env)?;
        Ok(self.config.get_or_init(|| config))
    }

    /// The answer to a client frame, and whether to close the connection:
    /// every frame costs from the user's bucket, a flood closes. Messages,
    /// typing and reads go to their room.
    fn answer_frame(&self, tag: &SocketTag, text: &str) -> Answer {
        let Ok(config) = self.config() else {
            return Answer::Reply(error("internal", "configuration"), None);
        };
        let rate = Rate {
            burst: config.room.rate_burst,
            per_sec: config.room.rate_per_sec,
        };
        let now = now_ms();
        let frame = shared::room::parse_frame(text);
        let cost = match &frame {
            Ok(ClientFrame::Ping | ClientFrame::Pong { .. }) => cost::PING,
            Ok(
                ClientFrame::Message { .. }
                | ClientFrame::Edit { .. }
                | ClientFrame::Delete { .. }
                | ClientFrame::React { .. },
            ) => cost::MESSAGE,
            Ok(ClientFrame::Typing { .. }) => cost::TYPING,
            Ok(ClientFrame::Read { .. }) => cost::READ,
            Ok(ClientFrame::Auth { .. }) => cost::AUTH,
            Ok(ClientFrame::Resume { .. }) => cost::MESSAGE,
            Err(_) => cost::GARBAGE,
        };
        let (taken, strikes) = {
            let mut bucket = self.bucket.borrow_mut();
            let b = bucket.get_or_insert_with(|| Bucket::full(rate, now));
            (b.take(now, cost, rate), b.strikes)
        };
        if let Err(retry_after_ms) = taken {
            let e = shared::room::RoomError::RateLimited { retry_after_ms };
            let close = (strikes >= config.room.flood_strikes).then_some("flood");
            return Answer::Reply(error(e.code(), &e.to_string()), close);
        }
        if let Some(frame) = frame
            .as_ref()
            .ok()
            .filter(|f| crate::single_socket::room_of(f).is_some())
        {
            return Answer::Room(frame.clone());
        }
        let (reply, close) = match frame {
            Ok(ClientFrame::Resume { since }) if since.len() <= MAX_RESUME => {
                return Answer::Resume(since);
            }
            Ok(ClientFrame::Resume { .. }) => (
                error(
                    "invalid_field",
                    &format!("resume names at most {MAX_RESUME} conversations"),
                ),
                None,
            ),
            Ok(ClientFrame::Ping) => (ServerFrame::Pong, None),
            Ok(ClientFrame::Auth { token }) => {
                match crate::room_store::verify_session(&token, &config.jwt_secret, now) {
                    Ok(v) if v.user_id == tag.user => {
                        self.conns.set_valid_until(tag.conn, Some(v.valid_until));
                        (ServerFrame::AuthOk, None)
                    }
                    Ok(_) => (
                        error("invalid_token", "the token is for another user"),
                        Some("token for another user"),
                    ),
                    Err(e) => (error(e.code(), &e.to_string()), None),
                }
            }
            // Answers to probes never get here, and room frames went above.
            Ok(_) => (
                error("unknown_type", "this frame has no meaning here"),
                None,
            ),
            Err(e) => (error(e.code(), &e.to_string()), None),
        };
        Answer::Reply(reply, close)
    }

    async fn route(&self, mut req: Request) -> EdgeResult<Response> {
        let user = user_of(&req)?;
        // A group change is news only for connections: an object with none
        // (an offline user, or one that never connected) is not loaded,
        // and keeps no storage for it.
        if req.path() == "/changed" && !self.has_connections() {
            return Ok(Response::empty()?.with_status(204));
        }
        self.ensure_loaded(user).await?;
        match req.path().as_str() {
            "/ws" => {
                let valid_until = valid_until_of(&req)?;
                burn_ticket(&self.sql, &req, now_ms())?;
                let config = self.config()?;
                let now = now_ms();
                let (conn, client) = self.conns.accept_socket(
                    &self.state,
                    user,
                    valid_until,
                    now,
                    &config.user_caps(),
                )?;
                self.forget_gone(now)?;
                self.connected(now, conn)?;
                // Presence reaches the origin from the alarm: the upgrade
                // never waits for it.
                self.after_events().await;
                Ok(Response::from_websocket(client)?)
            }
            "/events" => {
                let valid_until = valid_until_of(&req)?;
                burn_ticket(&self.sql, &req, now_ms())?;
                let config = self.config()?;
                let now = now_ms();
                let (conn, response) = self.conns.open_stream(
                    user,
                    now,
                    valid_until,
                    &config.user_caps(),
                    config.sse_heartbeat_ms,
                )?;
                self.forget_gone(now)?;
                self.connected(now, conn)?;
                // An SSE client cannot send `resume`: it names its resume
                // point in the URL, and the stream starts with the gaps.
                if let Some(since) = resume_of(&req)? {
                    let resumed = self.resume(user, conn, since).await;
                    if let Ok(text) = serde_json::to_string(&resumed) {
                        self.conns.send_to(conn, &text);
                    }
                }
                self.after_events().await;
                Ok(response)
            }
            "/presence" => {
                // A contact's object says how the contact is.
                let update: PresenceUpdate = req
                    .json()
                    .await
                    .map_err(|e| EdgeError::bad_request("invalid_json", e.to_string()))?;
                let now = now_ms();
                if self.with_user(|u| u.handle_contact_presence(now, &update))? {
                    self.save_contact(&update);
                }
                self.drain();
                // Loading may have started a grace period (after a crash).
                self.after_events().await;
                Ok(Response::empty()?.with_status(204))
            }
            "/relay" => {
                // A Room's live frame. Offline (after the grace period)
                // the Room is told so and stops sending.
                if !self.with_user(|u| u.is_online())? {
                    return Ok(Response::empty()?.with_status(410));
                }
                let text = req.text().await?;
                let frame: ServerFrame = serde_json::from_str(&text)
                    .map_err(|e| EdgeError::bad_request("invalid_json", e.to_string()))?;
                self.with_user(|u| u.relay(frame))?;
                self.drain();
                Ok(Response::empty()?.with_status(204))
            }
            "/notify" => {
                let notice: ConversationNotice = req
                    .json()
                    .await
                    .map_err(|e| EdgeError::bad_request("invalid_json", e.to_string()))?;
                let Some(&(_, unread)) = notice.recipients.iter().find(|(u, _)| *u == user) else {
                    return Ok(Response::empty()?.with_status(204));
                };
                let mentions = notice
                    .mentions
                    .iter()
                    .find(|(u, _)| *u == user)
                    .map_or(0, |&(_, n)| n);
                // A conversation this object has not heard of may bring new
                // contacts (a new chat, or a group that added the user):
                // the alarm fetches them, if anyone is here to see them.
                let new = self.with_user(|u| u.unread(notice.conversation_id).is_none())?;
                if new && self.conns.socket_count() + self.conns.stream_count() > 0 {
                    self.retry_contacts_at.set(Some(now_ms()));
                }
                self.with_user(|u| {
                    u.handle_notice(
                        notice.conversation_id,
                        notice.seq,
                        notice.last_message.clone(),
                        unread,
                        mentions,
                    );
                })?;
                self.drain();
                // A room with news this object is not subscribed to while
                // the user is online: subscribing is lazy, on the room's
                // first notice, from the seq of the notice before it, so
                // the user gets every message since the room last told
                // them anything, then live ones. A room that stays quiet
                // costs nothing.
                if self.with_user(|u| u.is_online())?
                    && !self.subscribed_to(notice.conversation_id)?
                {
                    let _ = self
                        .subscribe(
                            user,
                            notice.conversation_id,
                            Some(notice.prev_seq),
                            UserTarget::All,
                        )
                        .await;
                }
                self.after_events().await;
                Ok(Response::empty()?.with_status(204))
            }
            "/changed" => {
                // A group this user is (or was) in changed through the
                // Worker: a rename, or members added or removed.
                let change: ConversationChange = req
                    .json()
                    .await
                    .map_err(|e| EdgeError::bad_request("invalid_json", e.to_string()))?;
                self.with_user(|u| {
                    u.handle_conversation_change(change.conversation_id, change.removed);
                })?;
                self.drain();
                // New or departed members are new or departed contacts:
                // the alarm fetches the list again (its presence shows on
                // the connections that are here to see it).
                if change.members && self.conns.socket_count() + self.conns.stream_count() > 0 {
                    self.retry_contacts_at.set(Some(now_ms()));
                }
                // A removed user's subscription to the room may stay: a
                // room forwards to current members only, so it relays
                // nothing more to them (and again at once if they are
                // added back).
                self.after_events().await;
                Ok(Response::empty()?.with_status(204))
            }
            _ => Err(EdgeError::NotFound("user route")),
        }
    }

    /// Whether the user has a connection here, without loading anything:
    /// a loaded object knows its connections; one that is not loaded has
    /// no SSE stream (a stream keeps its instance in memory), only
    /// WebSockets that hibernated with it, which the runtime holds.
    fn has_connections(&self) -> bool {
        if self.user.borrow().is_some() {
            self.conns.socket_count() + self.conns.stream_count() > 0
        } else {
            !self.state.get_websockets().is_empty()
        }
    }

    /// Builds the state machine: reattaches sockets that survived
    /// hibernation and re-arms a grace period lost with the old instance.
    /// The contacts come from the origin right after a connection, from the
    /// alarm: no request here ever waits for the origin, and a user whose
    /// contacts are not known yet sees their presence arrive a moment later
    /// (`set_contacts` shows them and tells them this user is here).
    async fn ensure_loaded(&self, user: i64) -> EdgeResult<()> {
        if self.user.borrow().is_some() {
            return Ok(());
        }
        self.sql.exec(
            "CREATE TABLE IF NOT EXISTS reported (
                 user_id INTEGER PRIMARY KEY,
                 is_online INTEGER NOT NULL,
                 last_seen_ms INTEGER NOT NULL,
                 synced INTEGER NOT NULL DEFAULT 0
             );
             CREATE TABLE IF NOT EXISTS owner (user_id INTEGER PRIMARY KEY);
             CREATE TABLE IF NOT EXISTS subscribed (conversation_id INTEGER PRIMARY KEY);
             CREATE TABLE IF NOT EXISTS contacts (
                 user_id INTEGER PRIMARY KEY,
                 is_online INTEGER NOT NULL,
                 last_seen_ms INTEGER
             );
             CREATE TABLE IF NOT EXISTS contacts_saved (one INTEGER PRIMARY KEY);",
            None,
        )?;
        // Whose object this is, for an alarm that wakes a new instance.
        self.sql.exec(
            "INSERT OR IGNORE INTO owner (user_id) VALUES (?)",
            vec![user.into()],
        )?;
        #[derive(Deserialize)]
        struct Row {
            is_online: i64,
        }
        let reported: Vec<Row> = self
            .sql
            .exec(
                "SELECT is_online FROM reported WHERE user_id = ?",
                vec![user.into()],
            )?
            .to_array()?;
        let config = self.config()?;
        self.conns
            .figures
            .identify(shared::metrics::ReporterKind::User, user, config.metrics);
        let mut state = UserState::new(
            user,
            UserConfig {
                grace_ms: config.presence_grace_ms,
            },
        );
        let now = now_ms();
        self.conns.reattach(&self.state);
        for tag in self.conns.live() {
            state.handle_reattach(ConnId(tag.conn));
        }
        state.handle_restore(now, reported.first().is_some_and(|r| r.is_online != 0));
        // The contacts as last saved: a wake from hibernation (every
        // watchdog alarm, every poke after ten idle seconds) costs no
        // origin call and tells nobody anything, since nothing changed.
        let saved = self.saved_contacts()?;
        if let Some(contacts) = &saved {
            state.restore_contacts(contacts);
        }
        if self.user.borrow().is_some() {
            return Ok(());
        }
        let online = state.is_online();
        *self.user.borrow_mut() = Some(state);
        if saved.is_some() {
            self.contacts_loaded.set(true);
        } else if online {
            // Never saved (an object from before contacts were kept):
            // fetched right after, which tells the contacts how this user
            // is.
            self.retry_contacts_at.set(Some(now));
        }
        self.alarm.load(&self.state).await;
        Ok(())
    }

    /// Fetches the contact list again; on failure the alarm retries.
    async fn refresh_contacts(&self, user: i64) {
        let Ok(config) = self.config() else { return };
        match OriginClient::new(config).contacts(user).await {
            Ok(c) => {
                self.retry_contacts_at.set(None);
                self.contacts_loaded.set(true);
                let now = now_ms();
                let _ = self.with_user(|u| u.set_contacts(now, &contacts_of(&c.contacts)));
                self.drain();
                self.save_contacts();
            }
            Err(e) => {
                crate::log!(Warn, "contacts of user", "user" => user, "error" => e.to_string());
                self.retry_contacts_at.set(Some(now_ms() + RETRY_MS));
            }
        }
    }

    /// A new connection. Coming online (or a first connection to an
    /// instance that never fetched the contacts) fetches them from the
    /// alarm: what this object holds may be stale after a time offline.
    fn connected(&self, now: u64, conn: u64) -> EdgeResult<()> {
        let came_online = self.with_user(|u| u.handle_connect(now, ConnId(conn)))?;
        if came_online || !self.contacts_loaded.get() {
            self.retry_contacts_at.set(Some(now));
        }
        self.drain();
        Ok(())
    }

    fn with_user<R>(&self, f: impl FnOnce(&mut UserState) -> R) -> EdgeResult<R> {
        let mut guard = self.user.borrow_mut();
        match guard.as_mut() {
            Some(u) => Ok(f(u)),
            None => Err(EdgeError::Internal(
                "user object used before it was loaded".to_owned(),
            )),
        }
    }

    /// Executes the state machine's outputs in order.
    fn drain(&self) {
        loop {
            let next = {
                let mut guard = self.user.borrow_mut();
                guard.as_mut().and_then(UserState::poll_output)
            };
            let Some(output) = next else { break };
            let result = match output {
                UserOutput::Send { to, frame } => self.conns.send(&frame, |conn, _| match to {
                    UserTarget::Conn(c) => c.0 == conn,
                    UserTarget::All => true,
                }),
                UserOutput::Announce { update, to, report } => {
                    self.tell_contacts(&update, to);
                    if report {
                        self.record_presence(&update)
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(e) = result {
                crate::log!(Error, "user output failed", "error" => e.to_string());
            }
        }
    }

    /// Sends this user's presence to the contacts' objects, without
    /// waiting: presence is best effort between objects (the origin's copy
    /// is what a contact reads when it comes online).
    fn tell_contacts(&self, update: &PresenceUpdate, to: Vec<i64>) {
        if to.is_empty() {
            return;
        }
        let env = self.env.clone();
        let update = update.clone();
        self.state.wait_until(async move {
            let sends = to.into_iter().map(|contact| {
                let env = env.clone();
                let update = update.clone();
                async move {
                    if let Err(e) = post(&env, contact, "/presence", &update).await {
                        crate::log!(Warn, "presence to user", "contact" => contact, "error" => e.to_string());
                    }
                }
            });
            join_all(sends).await;
        });
    }

    /// Tells the state machine about connections the transport ended.
    fn forget_gone(&self, now: u64) -> EdgeResult<()> {
        let gone = self.conns.take_gone();
        if gone.is_empty() {
            return Ok(());
        }
        self.with_user(|u| {
            for conn in gone {
                u.handle_disconnect(now, ConnId(conn));
            }
        })
    }

    fn record_presence(&self, update: &PresenceUpdate) -> EdgeResult<()> {
        // Sent by the next alarm (now), never inline.
        self.retry_report_at.set(Some(now_ms()));
        self.report_generation
            .set(self.report_generation.get().wrapping_add(1));
        self.sql.exec(
            "INSERT INTO reported (user_id, is_online, last_seen_ms, synced) VALUES (?, ?, ?, 0)
             ON CONFLICT (user_id) DO UPDATE SET
                 is_online = excluded.is_online, last_seen_ms = excluded.last_seen_ms, synced = 0",
            vec![
                update.user_id.into(),
                i64::from(update.is_online).into(),
                update.last_seen.timestamp_millis().into(),
            ],
        )?;
        Ok(())
    }

    /// Sends the unconfirmed presence change to the origin; on failure it
    /// stays and the alarm retries.
    async fn sync_presence(&self) {
        #[derive(Deserialize)]
        struct Row {
            user_id: i64,
            is_online: i64,
            last_seen_ms: i64,
        }
        let rows: Vec<Row> = match self
            .sql
            .exec(
                "SELECT user_id, is_online, last_seen_ms FROM reported WHERE synced = 0",
                None,
            )
            .and_then(|c| c.to_array())
        {
            Ok(rows) => rows,
            Err(e) => {
                crate::log!(Error, "read presence", "error" => e.to_string());
                return;
            }
        };
        let generation = self.report_generation.get();
        if rows.is_empty() {
            self.retry_report_at.set(None);
            return;
        }
        let updates: Vec<PresenceUpdate> = rows
            .iter()
            .map(|r| PresenceUpdate {
                user_id: r.user_id,
                is_online: r.is_online != 0,
                last_seen: chrono::DateTime::from_timestamp_millis(r.last_seen_ms)
                    .unwrap_or_default(),
            })
            .collect();
        let sent = match self.config() {
            Ok(config) => {
                OriginClient::new(config)
                    .presence(&PresenceBatch { updates })
                    .await
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => {
                for r in &rows {
                    // Only what we sent: a newer change stays unsynced.
                    let _ = self.sql.exec(
                        "UPDATE reported SET synced = 1
                         WHERE user_id = ? AND is_online = ? AND last_seen_ms = ?",
                        vec![r.user_id.into(), r.is_online.into(), r.last_seen_ms.into()],
                    );
                }
                // A change recorded while this report was in flight is
                // still due.
                if self.report_generation.get() == generation {
                    self.retry_report_at.set(None);
                }
            }
            Err(e) => {
                crate::log!(Warn, "presence report failed, will retry", "error" => e.to_string());
                self.retry_report_at.set(Some(now_ms() + RETRY_MS));
            }
        }
    }

    async fn socket_gone(&self, ws: &WebSocket, code: Option<u16>) {
        let Some(tag) = self.conns.forget_socket(ws, code) else {
            return;
        };
        self.disconnected(tag.user, tag.conn).await;
    }

    async fn disconnected(&self, user: i64, conn: u64) {
        if self.ensure_loaded(user).await.is_err() {
            return;
        }
        let now = now_ms();
        let _ = self.with_user(|u| u.handle_disconnect(now, ConnId(conn)));
        self.drain();
        self.after_events().await;
    }

    async fn on_alarm(&self) -> EdgeResult<()> {
        // A new instance (after a crash) may run the alarm first: it loads
        // the user it belongs to.
        let user = match self.loaded_user() {
            Some(user) => user,
            None => {
                #[derive(Deserialize)]
                struct Row {
                    user_id: i64,
                }
                let owner: Vec<Row> = self
                    .sql
                    .exec("SELECT user_id FROM owner", None)
                    .and_then(|c| c.to_array())
                    .unwrap_or_default();
                let Some(owner) = owner.first() else {
                    return Ok(());
                };
                self.ensure_loaded(owner.user_id).await?;
                owner.user_id
            }
        };
        let now = now_ms();
        if self.conns.next_heartbeat().is_some_and(|t| now >= t) {
            let config = self.config()?;
            self.conns.maintain_streams(now, config.sse_heartbeat_ms);
        }
        // Connections whose token ran out without renewal.
        for conn in self.conns.expired(now) {
            if let Ok(text) = serde_json::to_string(&error(
                "token_expired",
                "the connection's token expired; reconnect with a fresh one",
            )) {
                self.conns.send_to(conn, &text);
            }
            self.conns.close(conn, 1008, "token expired");
            self.with_user(|u| u.handle_disconnect(now, ConnId(conn)))?;
        }
        self.forget_gone(now)?;
        self.with_user(|u| u.handle_timeout(now))?;
        self.drain();
        if !self.with_user(|u| u.is_online())? {
            // Rooms learn it from their next frame (410).
            self.sql.exec("DELETE FROM subscribed", None)?;
        }
        if self.retry_contacts_at.get().is_some_and(|t| now >= t) {
            self.refresh_contacts(user).await;
        }
        if self.retry_report_at.get().is_some_and(|t| now >= t) {
            self.sync_presence().await;
        }
        let config = self.config()?;
        self.conns
            .figures
            .send_if_due(config, now_ms(), self.conns.gauges())
            .await;
        Ok(())
    }

    /// The contact list this object saved, if it ever did.
    fn saved_contacts(&self) -> EdgeResult<Option<Vec<Contact>>> {
        #[derive(Deserialize)]
        struct Marker {}
        #[derive(Deserialize)]
        struct Row {
            user_id: i64,
            is_online: i64,
            last_seen_ms: Option<i64>,
        }
        let saved: Vec<Marker> = self
            .sql
            .exec("SELECT one FROM contacts_saved", None)?
            .to_array()?;
        if saved.is_empty() {
            return Ok(None);
        }
        let rows: Vec<Row> = self
            .sql
            .exec(
                "SELECT user_id, is_online, last_seen_ms FROM contacts",
                None,
            )?
            .to_array()?;
        Ok(Some(
            rows.into_iter()
                .map(|r| Contact {
                    user_id: r.user_id,
                    is_online: r.is_online != 0,
                    last_seen: r
                        .last_seen_ms
                        .and_then(chrono::DateTime::from_timestamp_millis),
                })
                .collect(),
        ))
    }

    /// Saves the whole contact list (after the origin gave it).
    fn save_contacts(&self) {
        let Ok(contacts) = self.with_user(|u| u.contacts()) else {
            return;
        };
        let saved = (|| -> EdgeResult<()> {
            self.sql.exec("DELETE FROM contacts", None)?;
            for c in &contacts {
                self.sql.exec(
                    "INSERT INTO contacts (user_id, is_online, last_seen_ms) VALUES (?, ?, ?)",
                    vec![
                        c.user_id.into(),
                        i64::from(c.is_online).into(),
                        c.last_seen.map(|t| t.timestamp_millis()).into(),
                    ],
                )?;
            }
            self.sql.exec(
                "INSERT OR IGNORE INTO contacts_saved (one) VALUES (1)",
                None,
            )?;
            Ok(())
        })();
        if let Err(e) = saved {
            crate::log!(Error, "save contacts", "error" => e.to_string());
        }
    }

    /// Saves one contact's presence as their object told it.
    fn save_contact(&self, update: &PresenceUpdate) {
        if let Err(e) = self.sql.exec(
            "UPDATE contacts SET is_online = ?, last_seen_ms = ? WHERE user_id = ?",
            vec![
                i64::from(update.is_online).into(),
                update.last_seen.timestamp_millis().into(),
                update.user_id.into(),
            ],
        ) {
            crate::log!(Error, "save contact", "error" => e.to_string());
        }
    }

    /// Whether this object is subscribed to (or subscribing to) the room.
    fn subscribed_to(&self, conversation_id: i64) -> EdgeResult<bool> {
        if self.subscribing.borrow().contains_key(&conversation_id) {
            return Ok(true);
        }
        #[derive(Deserialize)]
        struct Row {}
        let rows: Vec<Row> = self
            .sql
            .exec(
                "SELECT 1 AS one FROM subscribed WHERE conversation_id = ?",
                vec![conversation_id.into()],
            )?
            .to_array()?;
        Ok(!rows.is_empty())
    }

    /// Subscribes to one room; its replay (from `since`) goes to `to`, and
    /// the live frames that came meanwhile follow it.
    async fn subscribe(
        &self,
        user: i64,
        conversation_id: i64,
        since: Option<i64>,
        to: UserTarget,
    ) -> Result<(), ServerFrame> {
        self.with_user(|u| u.begin_subscribe(conversation_id))
            .map_err(|e| error(e.code(), &e.to_string()))?;
        *self
            .subscribing
            .borrow_mut()
            .entry(conversation_id)
            .or_insert(0) += 1;
        let answer = crate::single_socket::subscribe(&self.env, user, conversation_id, since).await;
        {
            let mut subscribing = self.subscribing.borrow_mut();
            if let Some(n) = subscribing.get_mut(&conversation_id) {
                *n -= 1;
                if *n == 0 {
                    subscribing.remove(&conversation_id);
                }
            }
        }
        let (replay, result) = match answer {
            Ok(frames) => {
                if let Err(e) = self.sql.exec(
                    "INSERT OR IGNORE INTO subscribed (conversation_id) VALUES (?)",
                    vec![conversation_id.into()],
                ) {
                    crate::log!(Error, "record subscription", "error" => e.to_string());
                }
                (frames, Ok(()))
            }
            Err(refused) => (Vec::new(), Err(refused)),
        };
        let _ = self.with_user(|u| u.finish_subscribe(conversation_id, to, replay));
        self.drain();
        result
    }

    /// A `resume` frame (or an SSE stream's `?resume=`): each named
    /// conversation is subscribed with the client's seq, its gap replayed
    /// to this connection only; a refusal is an `error` frame. The answer
    /// is `resumed` with the ones that worked.
    async fn resume(&self, user: i64, conn: u64, since: BTreeMap<i64, i64>) -> ServerFrame {
        let to = UserTarget::Conn(ConnId(conn));
        let results: Vec<(i64, Result<(), ServerFrame>)> = futures_util::stream::iter(since)
            .map(|(c, seq)| async move { (c, self.subscribe(user, c, Some(seq), to).await) })
            .buffer_unordered(SUBSCRIBE_CONCURRENCY)
            .collect()
            .await;
        let mut conversations = Vec::new();
        for (c, result) in results {
            match result {
                Ok(()) => conversations.push(c),
                Err(ServerFrame::Error { code, message }) => {
                    let frame = error(&code, &format!("conversation {c}: {message}"));
                    if let Ok(text) = serde_json::to_string(&frame) {
                        self.conns.send_to(conn, &text);
                    }
                }
                Err(_) => {}
            }
        }
        conversations.sort_unstable();
        ServerFrame::Resumed { conversations }
    }

    fn loaded_user(&self) -> Option<i64> {
        self.user.borrow().as_ref().map(UserState::user_id)
    }

    /// Sets the alarm for the next deadline (the grace period, SSE
    /// heartbeats, token expiries, retries).
    async fn after_events(&self) {
        let grace = {
            let guard = self.user.borrow();
            guard.as_ref().and_then(UserState::poll_timeout)
        };
        // While the user has connections an alarm is never further away
        // than the watchdog (`PRESENCE_WATCHDOG_MS`, 60 s): if the runtime
        // dies with them, the alarm wakes the new instance, which finds no
        // connection and lets the user go offline. Without it, a user nobody
        // else pokes would stay online until their token expired.
        let connected = self.conns.socket_count() + self.conns.stream_count() > 0;
        let watchdog = match self.config() {
            Ok(c) if connected => Some(now_ms() + c.presence_watchdog_ms),
            _ => None,
        };
        let deadlines = [
            grace,
            self.conns.next_heartbeat(),
            self.retry_report_at.get(),
            self.retry_contacts_at.get(),
            self.conns.next_expiry(),
            watchdog,
            self.conns.figures.due(&self.conns.gauges()),
        ];
        self.alarm.request(&self.state, &deadlines).await;
    }
}

/// The object of user `user_id`.
pub fn stub(env: &Env, user_id: i64) -> EdgeResult<worker::Stub> {
    Ok(env
        .durable_object("USER")?
        .get_by_name(&format!("user:{user_id}"))?)
}

/// A JSON POST to user `user_id`'s object.
async fn post(env: &Env, user_id: i64, path: &str, body: &impl serde::Serialize) -> EdgeResult<()> {
    let body = serde_json::to_string(body).map_err(|e| EdgeError::Internal(e.to_string()))?;
    let headers = Headers::new();
    headers.set(USER_HEADER, &user_id.to_string())?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post)
        .with_headers(headers)
        .with_body(Some(worker::wasm_bindgen::JsValue::from_str(&body)));
    let req = Request::new_with_init(&format!("https://user{path}"), &init)?;
    let res = stub(env, user_id)?.fetch_with_request(req).await?;
    if res.status_code() >= 300 {
        return Err(EdgeError::Internal(format!(
            "user object answered {}",
            res.status_code()
        )));
    }
    Ok(())
}

/// Delivers notices to the objects of their recipients, each with only its
/// own count, all at once.
pub async fn notify(env: &Env, notices: &[ConversationNotice]) -> EdgeResult<()> {
    let sends = notices.iter().flat_map(|notice| {
        notice.recipients.iter().map(move |&(user, unread)| {
            let own = ConversationNotice {
                mentions: notice
                    .mentions
                    .iter()
                    .filter(|(u, _)| *u == user)
                    .copied()
                    .collect(),
                conversation_id: notice.conversation_id,
                seq: notice.seq,
                prev_seq: notice.prev_seq,
                last_message: notice.last_message.clone(),
                recipients: vec![(user, unread)],
            };
            async move { post(env, user, "/notify", &own).await }
        })
    });
    let mut first_error = None;
    for result in join_all(sends).await {
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Tells each user's object of a change to a group (`/changed`), all at
/// once. An object with no connection answers at once and loads nothing.
pub async fn tell_changed(env: &Env, changes: &[(i64, ConversationChange)]) -> EdgeResult<()> {
    let sends = changes
        .iter()
        .map(|(user, change)| async move { post(env, *user, "/changed", change).await });
    let mut first_error = None;
    for result in join_all(sends).await {
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn contacts_of(contacts: &[shared::protocol::internal::ContactPresence]) -> Vec<Contact> {
    contacts
        .iter()
        .map(|c| Contact {
            user_id: c.user_id,
            is_online: c.is_online,
            last_seen: c.last_seen,
        })
        .collect()
}

/// What a client frame on the always-on connection gets.
enum Answer {
    /// This frame, then a close with this reason if any.
    Reply(ServerFrame, Option<&'static str>),
    /// The frame is for a room (the seed's single socket).
    Room(ClientFrame),
    /// Resume these conversations from these seqs.
    Resume(BTreeMap<i64, i64>),
}

fn error(code: &str, message: &str) -> ServerFrame {
    ServerFrame::Error {
        code: code.to_owned(),
        message: message.to_owned(),
    }
}

/// `?resume=7:42,9:0` as the Worker forwards it.
fn resume_of(req: &Request) -> EdgeResult<Option<BTreeMap<i64, i64>>> {
    match req.url()?.query_pairs().find(|(k, _)| k == "resume") {
        Some((_, v)) => shared::user::parse_resume(&v)
            .map(Some)
            .map_err(|e| EdgeError::bad_request("invalid_query", e)),
        None => Ok(None),
    }
}

fn valid_until_of(req: &Request) -> EdgeResult<Option<u64>> {
    Ok(req
        .headers()
        .get(VALID_UNTIL_HEADER)?
        .and_then(|v| v.parse().ok()))
}

fn user_of(req: &Request) -> EdgeResult<i64> {
    req.headers()
        .get(USER_HEADER)?
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| EdgeError::Internal(format!("missing {USER_HEADER}")))
}
