//! The Lobby Durable Object: the ChatBox's always-on connection. One per
//! tenant key (`LOBBY_TENANT`, `global` by default). A thin driver around
//! `shared::lobby::Lobby`.
//!
//! It carries presence (online from the first connection, offline after
//! the last one closes and a grace period passes, set by an alarm) and the
//! `conversation_updated` notifications that rooms send it. Presence
//! changes are kept in SQLite (`reported`) until the origin confirms them,
//! so `GET /api/v1/chat/active-users` catches up even after an outage.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use serde::Deserialize;
use shared::bucket::{Bucket, Rate};
use shared::lobby::{
    ConversationNotice, Lobby as LobbyState, LobbyConfig, LobbyOutput, LobbyTarget,
};
use shared::protocol::internal::{PresenceBatch, PresenceUpdate};
use shared::protocol::{ClientFrame, ServerFrame};
use shared::room::ConnId;
use shared::room::cost;
use worker::{
    DurableObject, Env, Request, Response, Result, SqlStorage, State, WebSocket,
    WebSocketIncomingMessage, durable_object,
};

use crate::auth::now_ms;
use crate::config::EdgeConfig;
use crate::conns::{
    Alarm, Connections, SocketTag, answer, answer_close, burn_ticket, probe_answer,
};
use crate::error::{EdgeError, EdgeResult};
use crate::headers::{USER_HEADER, VALID_UNTIL_HEADER};
use crate::origin::OriginClient;

/// Unconfirmed presence reports are retried this often.
const PRESENCE_RETRY_MS: u64 = 5_000;

#[durable_object]
pub struct Lobby {
    state: State,
    env: Env,
    sql: SqlStorage,
    lobby: RefCell<Option<LobbyState>>,
    conns: Connections,
    alarm: Alarm,
    /// When unconfirmed presence reports are next sent (the alarm sends
    /// them, so no request waits for the origin).
    retry_reports_at: Cell<Option<u64>>,
    /// Per-user flood limits for the frames clients send here.
    buckets: RefCell<HashMap<i64, Bucket>>,
    /// Bumped by every presence change, so a report that was in flight
    /// while another change came does not mark that one sent.
    reports_generation: Cell<u64>,
}

impl std::fmt::Debug for Lobby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lobby")
            .field("sockets", &self.conns.socket_count())
            .field("streams", &self.conns.stream_count())
            .finish_non_exhaustive()
    }
}

impl DurableObject for Lobby {
    fn new(state: State, env: Env) -> Self {
        let sql = state.storage().sql();
        Self {
            state,
            env,
            sql,
            lobby: RefCell::new(None),
            conns: Connections::default(),
            alarm: Alarm::default(),
            retry_reports_at: Cell::new(None),
            buckets: RefCell::new(HashMap::new()),
            reports_generation: Cell::new(0),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        let upgrade = req.headers().get("upgrade")?.is_some();
        answer(upgrade, self.route(req).await)
    }

    async fn alarm(&self) -> Result<Response> {
        self.alarm.fired();
        if let Err(e) = self.on_alarm().await {
            worker::console_error!("lobby alarm: {e}");
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
        // The lobby is push-only; a client keeps it alive with pings,
        // renews its token and answers backlog probes.
        let text = match message {
            WebSocketIncomingMessage::String(t) => t,
            WebSocketIncomingMessage::Binary(_) => String::new(),
        };
        if let Some(n) = probe_answer(&text) {
            self.conns.probe_answered(tag.conn, n);
            return Ok(());
        }
        let (reply, close) = match self.answer_frame(&tag, &text) {
            Answer::Reply(reply, close) => (Some(reply), close),
            // The seed's single socket: the frame goes to its room.
            Answer::Room(frame) => (
                crate::single_socket::into_room(&self.env, tag.user, &frame).await,
                None,
            ),
        };
        if let Some(Ok(text)) = reply.map(|r| serde_json::to_string(&r)) {
            let _ = ws.send_with_str(&text);
        }
        if let Some(reason) = close {
            self.conns.close(tag.conn, 1008, reason);
            self.disconnected(tag.conn).await;
        } else {
            self.after_events().await;
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
        self.socket_gone(&ws).await;
        answer_close(&ws, code, reason);
        Ok(())
    }

    async fn websocket_error(&self, ws: WebSocket, _error: worker::Error) -> Result<()> {
        self.socket_gone(&ws).await;
        Ok(())
    }
}

impl Lobby {
    fn config(&self) -> EdgeResult<EdgeConfig> {
        EdgeConfig::from_env(&self.env)
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
            Ok(ClientFrame::Message { .. }) => cost::MESSAGE,
            Ok(ClientFrame::Typing { .. }) => cost::TYPING,
            Ok(ClientFrame::Read { .. }) => cost::READ,
            Ok(ClientFrame::Auth { .. }) => cost::AUTH,
            Err(_) => cost::GARBAGE,
        };
        let taken = self
            .buckets
            .borrow_mut()
            .entry(tag.user)
            .or_insert_with(|| Bucket::full(rate, now))
            .take(now, cost, rate);
        if let Err(retry_after_ms) = taken {
            let strikes = self
                .buckets
                .borrow()
                .get(&tag.user)
                .map_or(0, |b| b.strikes);
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
        self.ensure_loaded().await?;
        match req.path().as_str() {
            "/ws" => {
                let user = user_of(&req)?;
                let valid_until = valid_until_of(&req)?;
                burn_ticket(&self.sql, &req, now_ms())?;
                let config = self.config()?;
                let now = now_ms();
                let (conn, client) = self.conns.accept_socket(
                    &self.state,
                    user,
                    valid_until,
                    now,
                    &config.lobby_caps(),
                )?;
                self.forget_gone(now)?;
                self.with_lobby(|l| l.handle_connect(now, ConnId(conn), user))?;
                self.drain();
                // Presence reaches the origin from the alarm: the upgrade
                // never waits for it.
                self.after_events().await;
                Ok(Response::from_websocket(client)?)
            }
            "/events" => {
                let user = user_of(&req)?;
                let valid_until = valid_until_of(&req)?;
                burn_ticket(&self.sql, &req, now_ms())?;
                let config = self.config()?;
                let now = now_ms();
                let (conn, response) = self.conns.open_stream(
                    user,
                    now,
                    valid_until,
                    &config.lobby_caps(),
                    config.sse_heartbeat_ms,
                )?;
                self.forget_gone(now)?;
                self.with_lobby(|l| l.handle_connect(now, ConnId(conn), user))?;
                self.drain();
                self.after_events().await;
                Ok(response)
            }
            "/notify" => {
                let notice: ConversationNotice = req
                    .json()
                    .await
                    .map_err(|e| EdgeError::bad_request("invalid_json", e.to_string()))?;
                self.with_lobby(|l| l.handle_notice(&notice))?;
                self.drain();
                Ok(Response::empty()?.with_status(204))
            }
            _ => Err(EdgeError::NotFound("lobby route")),
        }
    }

    /// Builds the state machine, reattaching sockets that survived
    /// hibernation and re-arming grace periods lost with the old instance.
    async fn ensure_loaded(&self) -> EdgeResult<()> {
        if self.lobby.borrow().is_some() {
            return Ok(());
        }
        self.sql.exec(
            "CREATE TABLE IF NOT EXISTS reported (
                 user_id INTEGER PRIMARY KEY,
                 is_online INTEGER NOT NULL,
                 last_seen_ms INTEGER NOT NULL,
                 synced INTEGER NOT NULL DEFAULT 0
             )",
            None,
        )?;
        #[derive(Deserialize)]
        struct Row {
            user_id: i64,
        }
        let online: Vec<Row> = self
            .sql
            .exec("SELECT user_id FROM reported WHERE is_online = 1", None)?
            .to_array()?;
        let config = self.config()?;
        let mut lobby = LobbyState::new(LobbyConfig {
            grace_ms: config.lobby_grace_ms,
        });
        let now = now_ms();
        self.conns.reattach(&self.state);
        for tag in self.conns.live() {
            lobby.handle_reattach(now, ConnId(tag.conn), tag.user);
        }
        let online: Vec<i64> = online.into_iter().map(|r| r.user_id).collect();
        lobby.handle_restore(now, &online);
        if self.lobby.borrow().is_none() {
            *self.lobby.borrow_mut() = Some(lobby);
        }
        self.alarm.load(&self.state).await;
        Ok(())
    }

    fn with_lobby<R>(&self, f: impl FnOnce(&mut LobbyState) -> R) -> EdgeResult<R> {
        let mut guard = self.lobby.borrow_mut();
        match guard.as_mut() {
            Some(l) => Ok(f(l)),
            None => Err(EdgeError::Internal(
                "lobby used before it was loaded".to_owned(),
            )),
        }
    }

    /// Executes the lobby's outputs in order.
    fn drain(&self) {
        loop {
            let next = {
                let mut guard = self.lobby.borrow_mut();
                guard.as_mut().and_then(LobbyState::poll_output)
            };
            let Some(output) = next else { break };
            let result = match output {
                LobbyOutput::Send { to, frame } => self.conns.send(&frame, |conn, user| match to {
                    LobbyTarget::Conn(c) => c.0 == conn,
                    LobbyTarget::All => true,
                    LobbyTarget::User(u) => user == u,
                }),
                LobbyOutput::ReportPresence(update) => self.record_presence(&update),
            };
            if let Err(e) = result {
                worker::console_error!("lobby output failed: {e}");
            }
        }
    }

    /// Tells the state machine about connections the transport ended.
    fn forget_gone(&self, now: u64) -> EdgeResult<()> {
        let gone = self.conns.take_gone();
        if gone.is_empty() {
            return Ok(());
        }
        self.with_lobby(|l| {
            for conn in gone {
                l.handle_disconnect(now, ConnId(conn));
            }
        })
    }

    fn record_presence(&self, update: &PresenceUpdate) -> EdgeResult<()> {
        // Sent by the next alarm (now), never inline.
        self.retry_reports_at.set(Some(now_ms()));
        self.reports_generation
            .set(self.reports_generation.get().wrapping_add(1));
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

    /// Sends unconfirmed presence changes to the origin; on failure they
    /// stay and are retried by the alarm.
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
                worker::console_error!("read presence: {e}");
                return;
            }
        };
        let generation = self.reports_generation.get();
        if rows.is_empty() {
            self.retry_reports_at.set(None);
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
                OriginClient::new(&config)
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
                if self.reports_generation.get() == generation {
                    self.retry_reports_at.set(None);
                }
            }
            Err(e) => {
                worker::console_warn!("presence report failed, will retry: {e}");
                self.retry_reports_at
                    .set(Some(now_ms() + PRESENCE_RETRY_MS));
            }
        }
    }

    async fn socket_gone(&self, ws: &WebSocket) {
        let Some(tag) = self.conns.forget_socket(ws) else {
            return;
        };
        self.disconnected(tag.conn).await;
    }

    async fn disconnected(&self, conn: u64) {
        if self.ensure_loaded().await.is_err() {
            return;
        }
        let now = now_ms();
        let _ = self.with_lobby(|l| l.handle_disconnect(now, ConnId(conn)));
        self.drain();
        self.after_events().await;
    }

    async fn on_alarm(&self) -> EdgeResult<()> {
        self.ensure_loaded().await?;
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
            self.with_lobby(|l| l.handle_disconnect(now, ConnId(conn)))?;
        }
        self.forget_gone(now)?;
        self.with_lobby(|l| l.handle_timeout(now))?;
        self.drain();
        if self.retry_reports_at.get().is_some_and(|t| now >= t) {
            self.sync_presence().await;
        }
        Ok(())
    }

    /// Sets the alarm for the next deadline (grace periods, SSE
    /// heartbeats, token expiries, presence reports).
    async fn after_events(&self) {
        let grace = {
            let guard = self.lobby.borrow();
            guard.as_ref().and_then(LobbyState::poll_timeout)
        };
        let deadlines = [
            grace,
            self.conns.next_heartbeat(),
            self.retry_reports_at.get(),
            self.conns.next_expiry(),
        ];
        self.alarm.request(&self.state, &deadlines).await;
    }
}

/// The Lobby stub for this deployment's tenant.
pub fn stub(env: &Env) -> EdgeResult<worker::Stub> {
    let config = EdgeConfig::from_env(env)?;
    Ok(env
        .durable_object("LOBBY")?
        .get_by_name(&config.lobby_tenant)?)
}

/// Delivers notices to the Lobby.
pub async fn notify(env: &Env, notices: &[ConversationNotice]) -> EdgeResult<()> {
    let stub = stub(env)?;
    for notice in notices {
        let body = serde_json::to_string(notice).map_err(|e| EdgeError::Internal(e.to_string()))?;
        let mut init = worker::RequestInit::new();
        init.with_method(worker::Method::Post)
            .with_body(Some(worker::wasm_bindgen::JsValue::from_str(&body)));
        let req = Request::new_with_init("https://lobby/notify", &init)?;
        let res = stub.fetch_with_request(req).await?;
        if res.status_code() >= 300 {
            return Err(EdgeError::Internal(format!(
                "lobby answered {}",
                res.status_code()
            )));
        }
    }
    Ok(())
}

/// What a client frame on the always-on connection gets.
enum Answer {
    /// This frame, then a close with this reason if any.
    Reply(ServerFrame, Option<&'static str>),
    /// The frame is for a room (the seed's single socket).
    Room(ClientFrame),
}

fn error(code: &str, message: &str) -> ServerFrame {
    ServerFrame::Error {
        code: code.to_owned(),
        message: message.to_owned(),
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
