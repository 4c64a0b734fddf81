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

use serde::Deserialize;
use shared::lobby::{
    ConversationNotice, Lobby as LobbyState, LobbyConfig, LobbyOutput, LobbyTarget,
};
use shared::protocol::ServerFrame;
use shared::protocol::internal::{PresenceBatch, PresenceUpdate};
use shared::room::ConnId;
use worker::{
    DurableObject, Env, Request, Response, Result, SqlStorage, State, WebSocket,
    WebSocketIncomingMessage, durable_object,
};

use crate::auth::now_ms;
use crate::config::EdgeConfig;
use crate::conns::{Alarm, Connections, answer, answer_close};
use crate::error::{EdgeError, EdgeResult};
use crate::origin::OriginClient;
use crate::room_do::USER_HEADER;

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
    /// When unconfirmed presence reports are next retried.
    retry_reports_at: Cell<Option<u64>>,
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
        self.after_events().await;
        Response::ok("")
    }

    async fn websocket_message(
        &self,
        ws: WebSocket,
        message: WebSocketIncomingMessage,
    ) -> Result<()> {
        // The lobby is push-only; a client may keep it alive with pings.
        let text = match message {
            WebSocketIncomingMessage::String(t) => t,
            WebSocketIncomingMessage::Binary(_) => String::new(),
        };
        let reply = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) if v["type"] == "ping" => ServerFrame::Pong,
            _ => ServerFrame::Error {
                code: "unknown_type".to_owned(),
                message: "the lobby accepts only {\"type\":\"ping\"}".to_owned(),
            },
        };
        if let Ok(text) = serde_json::to_string(&reply) {
            let _ = ws.send_with_str(&text);
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

    async fn route(&self, mut req: Request) -> EdgeResult<Response> {
        self.ensure_loaded().await?;
        match req.path().as_str() {
            "/ws" => {
                let user = user_of(&req)?;
                let (conn, client) = self.conns.accept_socket(&self.state, user)?;
                let now = now_ms();
                self.with_lobby(|l| l.handle_connect(now, ConnId(conn), user))?;
                self.drain();
                self.after_events().await;
                Ok(Response::from_websocket(client)?)
            }
            "/events" => {
                let user = user_of(&req)?;
                let config = self.config()?;
                let now = now_ms();
                let (conn, response, evicted) = self.conns.open_stream(
                    user,
                    now,
                    config.lobby_max_sse,
                    config.sse_heartbeat_ms,
                )?;
                self.with_lobby(|l| {
                    for id in evicted {
                        l.handle_disconnect(now, ConnId(id));
                    }
                    l.handle_connect(now, ConnId(conn), user);
                })?;
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
        for tag in self.conns.reattach(&self.state) {
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

    fn record_presence(&self, update: &PresenceUpdate) -> EdgeResult<()> {
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
                self.retry_reports_at.set(None);
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
        if self.ensure_loaded().await.is_err() {
            return;
        }
        let now = now_ms();
        let _ = self.with_lobby(|l| l.handle_disconnect(now, ConnId(tag.conn)));
        self.drain();
        self.after_events().await;
    }

    async fn on_alarm(&self) -> EdgeResult<()> {
        self.ensure_loaded().await?;
        let now = now_ms();
        if self.conns.next_heartbeat().is_some_and(|t| now >= t) {
            let config = self.config()?;
            let ended = self.conns.maintain_streams(now, config.sse_heartbeat_ms);
            self.with_lobby(|l| {
                for id in ended {
                    l.handle_disconnect(now, ConnId(id));
                }
            })?;
        }
        self.with_lobby(|l| l.handle_timeout(now))?;
        self.drain();
        Ok(())
    }

    /// Reports presence to the origin, then sets the alarm for the next
    /// deadline (grace periods, SSE heartbeats, report retries).
    async fn after_events(&self) {
        let due_retry = self.retry_reports_at.get().is_none_or(|t| now_ms() >= t);
        if due_retry {
            self.sync_presence().await;
        }
        let grace = {
            let guard = self.lobby.borrow();
            guard.as_ref().and_then(LobbyState::poll_timeout)
        };
        let deadlines = [
            grace,
            self.conns.next_heartbeat(),
            self.retry_reports_at.get(),
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

fn user_of(req: &Request) -> EdgeResult<i64> {
    req.headers()
        .get(USER_HEADER)?
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| EdgeError::Internal(format!("missing {USER_HEADER}")))
}
