//! A Durable Object's live connections: hibernatable WebSockets and
//! Server-Sent Event streams, behind one `send`. The Room and the User
//! both use it, so both transports behave the same everywhere.
//!
//! What one connection may cost is bounded:
//! - **caps** ([`shared::admission`]): per user and per object, paid for by
//!   the newcomer's own oldest connection, never someone else's;
//! - **what it holds unread**: an SSE stream has a bounded queue (workerd
//!   pulls from it only as fast as the client reads), and a full queue ends
//!   the stream; a WebSocket counts what it was sent and must answer a
//!   probe ([`shared::backlog`]) or be closed.
//!
//! Connections ended here (a slow reader, a dead stream, an eviction) are
//! reported through [`Connections::take_gone`], so the state machine
//! forgets them too.
//!
//! SSE needs care because workerd does not tell the object when an SSE
//! client goes away. Streams are bounded three ways: a heartbeat to a
//! stream whose reader is gone fails (or finds the channel closed) and
//! ends it; every stream ends after [`SSE_MAX_LIFETIME_MS`] (the client
//! resumes with `Last-Event-ID`); and the caps.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use futures_channel::mpsc::{Sender, channel};
use serde::{Deserialize, Serialize};
use shared::admission::{Admission, Caps, Live, admit};
use shared::backlog::{Backlog, Limits, Verdict};
use shared::protocol::ServerFrame;
use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen::{JsCast, JsValue};
use worker::js_sys::{Object, WeakMap};
use worker::{Headers, Request, Response, Result, SqlStorage, State, WebSocket, WebSocketPair};

use crate::error::{EdgeError, EdgeResult};

/// Reconnect delay suggested to EventSource clients.
pub const SSE_RETRY_MS: u64 = 2_000;
/// An SSE stream ends after this long; its client resumes.
pub const SSE_MAX_LIFETIME_MS: u64 = 5 * 60_000;
/// Events queued for one SSE stream before it counts as not reading.
const SSE_QUEUE: usize = 256;

/// What each connection carries; for a WebSocket, across hibernation (it
/// is the socket's attachment).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SocketTag {
    pub conn: u64,
    pub user: i64,
    /// When the token that opened or last renewed it stops being valid.
    #[serde(default)]
    pub valid_until: Option<u64>,
    #[serde(default)]
    pub opened_at: u64,
}

#[derive(Debug)]
struct Socket {
    ws: WebSocket,
    tag: SocketTag,
    backlog: Backlog,
}

#[derive(Debug)]
struct SseStream {
    tx: Sender<Result<Vec<u8>>>,
    tag: SocketTag,
}

/// Caps for both kinds of connection of one object.
#[derive(Debug, Clone, Copy)]
pub struct ConnCaps {
    pub sockets: Caps,
    pub streams: Caps,
}

#[wasm_bindgen]
extern "C" {
    /// A WebSocket as JavaScript sees it. Its `send` takes a string that is
    /// already a JavaScript string, so a broadcast converts its text once
    /// rather than once per recipient.
    type JsSocket;
    #[wasm_bindgen(method, catch, js_name = send)]
    fn send_js(this: &JsSocket, data: &JsValue) -> std::result::Result<(), JsValue>;
}

fn js_socket(ws: &WebSocket) -> &JsSocket {
    let raw: &worker::web_sys::WebSocket = ws.as_ref();
    raw.unchecked_ref()
}

/// Live connections by id, each with its user.
#[derive(Debug, Default)]
pub struct Connections {
    sockets: RefCell<HashMap<u64, Socket>>,
    /// Socket object → connection id, so a frame finds its connection
    /// without deserialising the socket's attachment (a structured clone and
    /// a serde pass on every frame). A miss (a socket this instance has
    /// not seen yet) falls back to the attachment.
    ids: RefCell<Option<WeakMap>>,
    streams: RefCell<HashMap<u64, SseStream>>,
    next_heartbeat: Cell<Option<u64>>,
    /// Connections ended here, not yet reported to the state machine.
    gone: RefCell<Vec<u64>>,
    /// The object's figures for `/metrics`; every connection that opens or
    /// ends here is counted and logged here, whichever path ended it.
    pub figures: crate::telemetry::Figures,
}

/// A fresh connection id. 53 bits: attachments pass through JavaScript
/// numbers.
pub fn new_conn_id() -> u64 {
    random_u64() >> 11
}

/// A random u64 from the platform's CSPRNG (crypto.getRandomValues).
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        // No entropy source: the clock is unique enough for connection ids
        // and only seeds the message-id generator.
        return crate::auth::now_ms();
    }
    u64::from_le_bytes(bytes)
}

fn live_of(tags: impl Iterator<Item = SocketTag>) -> Vec<Live> {
    tags.map(|t| Live {
        conn: t.conn,
        user: t.user,
        opened_at: t.opened_at,
    })
    .collect()
}

impl Connections {
    pub fn socket_count(&self) -> usize {
        self.sockets.borrow().len()
    }

    pub fn stream_count(&self) -> usize {
        self.streams.borrow().len()
    }

    /// Every live connection (both kinds), for a state machine rebuilt
    /// from storage to reattach.
    pub fn live(&self) -> Vec<SocketTag> {
        let sockets = self.sockets.borrow();
        let streams = self.streams.borrow();
        sockets
            .values()
            .map(|s| s.tag)
            .chain(streams.values().map(|s| s.tag))
            .collect()
    }

    /// Connections ended here since the last call.
    pub fn take_gone(&self) -> Vec<u64> {
        std::mem::take(&mut *self.gone.borrow_mut())
    }

    /// Makes room for one more connection of `user`: closes their own
    /// oldest over a cap (reported as gone), or refuses when the object is
    /// full and they have nothing here.
    fn admit(&self, user: i64, caps: Caps, sockets: bool) -> EdgeResult<()> {
        let live = if sockets {
            live_of(self.sockets.borrow().values().map(|s| s.tag))
        } else {
            live_of(self.streams.borrow().values().map(|s| s.tag))
        };
        match admit(&live, user, caps) {
            Admission::Refuse => Err(EdgeError::Client {
                status: 503,
                code: "too_many_connections",
                message: "this conversation has as many live connections as it can hold".to_owned(),
            }),
            Admission::Admit { evict } => {
                for conn in evict {
                    self.end(conn, 1008, "replaced by a newer connection of yours");
                }
                Ok(())
            }
        }
    }

    /// Accepts a hibernatable WebSocket for `user`; returns its id and the
    /// client end for the 101 response.
    pub fn accept_socket(
        &self,
        state: &State,
        user: i64,
        valid_until: Option<u64>,
        now: u64,
        caps: &ConnCaps,
    ) -> EdgeResult<(u64, WebSocket)> {
        self.admit(user, caps.sockets, true)?;
        let pair = WebSocketPair::new()?;
        let tag = SocketTag {
            conn: new_conn_id(),
            user,
            valid_until,
            opened_at: now,
        };
        state.accept_websocket_with_tags(&pair.server, &[&format!("u{user}")]);
        pair.server.serialize_attachment(tag)?;
        self.connected(&tag, "ws");
        self.remember(&pair.server, tag.conn);
        self.sockets.borrow_mut().insert(
            tag.conn,
            Socket {
                ws: pair.server,
                tag,
                backlog: Backlog::default(),
            },
        );
        Ok((tag.conn, pair.client))
    }

    /// Rebuilds the socket map after a wake from hibernation.
    pub fn reattach(&self, state: &State) -> Vec<SocketTag> {
        let mut sockets = HashMap::new();
        let mut tags = Vec::new();
        for ws in state.get_websockets() {
            if let Ok(Some(tag)) = ws.deserialize_attachment::<SocketTag>() {
                self.remember(&ws, tag.conn);
                sockets.insert(
                    tag.conn,
                    Socket {
                        ws,
                        tag,
                        backlog: Backlog::default(),
                    },
                );
                tags.push(tag);
            }
        }
        *self.sockets.borrow_mut() = sockets;
        tags
    }

    fn remember(&self, ws: &WebSocket, conn: u64) {
        let raw: &worker::web_sys::WebSocket = ws.as_ref();
        let mut ids = self.ids.borrow_mut();
        // Connection ids have 53 bits: exact as a JavaScript number.
        #[allow(clippy::cast_precision_loss)]
        ids.get_or_insert_with(WeakMap::new).set(
            raw.unchecked_ref::<Object>(),
            &JsValue::from_f64(conn as f64),
        );
    }

    /// What a socket carries: from memory when this instance knows it, else
    /// from its attachment (after a wake from hibernation).
    pub fn tag_of(&self, ws: &WebSocket) -> Option<SocketTag> {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let known = self.ids.borrow().as_ref().and_then(|ids| {
            let raw: &worker::web_sys::WebSocket = ws.as_ref();
            ids.get(raw.unchecked_ref::<Object>())
                .as_f64()
                .map(|c| c as u64)
        });
        if let Some(conn) = known {
            if let Some(s) = self.sockets.borrow().get(&conn) {
                return Some(s.tag);
            }
        }
        let tag = ws.deserialize_attachment::<SocketTag>().ok().flatten()?;
        if self.sockets.borrow().contains_key(&tag.conn) {
            self.remember(ws, tag.conn);
        }
        Some(tag)
    }

    /// Records a connection's renewed token, in the socket's attachment so
    /// it survives hibernation. The connection must be in this registry:
    /// after a wake, reattach first (`reattach`), or the renewal is lost and
    /// the attachment's old expiry closes the socket later.
    pub fn set_valid_until(&self, conn: u64, valid_until: Option<u64>) {
        let mut found = false;
        if let Some(s) = self.sockets.borrow_mut().get_mut(&conn) {
            found = true;
            if s.tag.valid_until != valid_until {
                s.tag.valid_until = valid_until;
                if let Err(e) = s.ws.serialize_attachment(s.tag) {
                    crate::log!(Error, "socket attachment not saved", "error" => e.to_string());
                }
            }
        }
        if let Some(s) = self.streams.borrow_mut().get_mut(&conn) {
            found = true;
            s.tag.valid_until = valid_until;
        }
        if !found {
            crate::log!(Error, "renewal for a connection that is not registered", "conn" => conn);
        }
    }

    /// The client proved it read everything before probe `n`.
    pub fn probe_answered(&self, conn: u64, n: u64) {
        if let Some(s) = self.sockets.borrow_mut().get_mut(&conn) {
            s.backlog.answered(n);
        }
    }

    /// Sends a text frame to one connection (outside any state machine).
    pub fn send_to(&self, conn: u64, text: &str) {
        if let Some(s) = self.sockets.borrow().get(&conn) {
            let _ = s.ws.send_with_str(text);
        }
        if let Some(s) = self.streams.borrow_mut().get_mut(&conn) {
            let _ = s.tx.try_send(Ok(format!("data: {text}\n\n").into_bytes()));
        }
    }

    /// Every live connection's tag, without copying them out.
    fn each_tag(&self, mut f: impl FnMut(&SocketTag)) {
        self.sockets.borrow().values().for_each(|s| f(&s.tag));
        self.streams.borrow().values().for_each(|s| f(&s.tag));
    }

    /// Connections whose token ran out by `now`.
    pub fn expired(&self, now: u64) -> Vec<u64> {
        let mut out = Vec::new();
        self.each_tag(|t| {
            if t.valid_until.is_some_and(|at| at <= now) {
                out.push(t.conn);
            }
        });
        out
    }

    /// When the next connection's token runs out.
    pub fn next_expiry(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        self.each_tag(|t| {
            if let Some(at) = t.valid_until {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        });
        next
    }

    /// Forgets a socket that closed (`code` from the client) or failed.
    pub fn forget_socket(&self, ws: &WebSocket, code: Option<u16>) -> Option<SocketTag> {
        let tag = self.tag_of(ws)?;
        if self.sockets.borrow_mut().remove(&tag.conn).is_some() {
            let reason = if code.is_some() {
                "closed by the client"
            } else {
                "socket error"
            };
            self.disconnected(&tag, "ws", code, reason);
        }
        Some(tag)
    }

    fn connected(&self, tag: &SocketTag, transport: &'static str) {
        crate::log!(Info, "connected",
            "user" => tag.user,
            "conversation" => self.figures.conversation(),
            "object" => self.figures.name(),
            "transport" => transport,
            "conn" => tag.conn);
    }

    /// Counts and logs a connection that ended, however it ended.
    fn disconnected(
        &self,
        tag: &SocketTag,
        transport: &'static str,
        code: Option<u16>,
        reason: &str,
    ) {
        self.figures.disconnect(transport);
        crate::log!(Info, "disconnected",
            "user" => tag.user,
            "conversation" => self.figures.conversation(),
            "object" => self.figures.name(),
            "transport" => transport,
            "conn" => tag.conn,
            "duration_ms" => crate::auth::now_ms().saturating_sub(tag.opened_at),
            "code" => code,
            "reason" => reason);
    }

    /// The gauges of this object's connections.
    pub fn gauges(&self) -> shared::metrics::Gauges {
        shared::metrics::Gauges {
            ws: self.socket_count() as u64,
            sse: self.stream_count() as u64,
            oldest_unflushed_at_ms: None,
        }
    }

    /// Opens an SSE stream for `user`. Returns its id and the response.
    pub fn open_stream(
        &self,
        user: i64,
        now: u64,
        valid_until: Option<u64>,
        caps: &ConnCaps,
        heartbeat_ms: u64,
    ) -> EdgeResult<(u64, Response)> {
        self.admit(user, caps.streams, false)?;
        let (mut tx, rx) = channel::<Result<Vec<u8>>>(SSE_QUEUE);
        let _ = tx.try_send(Ok(
            format!("retry: {SSE_RETRY_MS}\n: connected\n\n").into_bytes()
        ));
        let tag = SocketTag {
            conn: new_conn_id(),
            user,
            valid_until,
            opened_at: now,
        };
        self.streams
            .borrow_mut()
            .insert(tag.conn, SseStream { tx, tag });
        self.connected(&tag, "sse");
        if self.next_heartbeat.get().is_none() {
            self.next_heartbeat.set(Some(now + heartbeat_ms));
        }
        let headers = Headers::new();
        headers.set("content-type", "text/event-stream; charset=utf-8")?;
        headers.set("cache-control", "no-cache, no-transform")?;
        headers.set("x-accel-buffering", "no")?;
        Ok((tag.conn, Response::from_stream(rx)?.with_headers(headers)))
    }

    /// Sends `frame` to every connection `wanted(conn, user)` accepts. A
    /// connection that has too much unread is ended (see the module docs).
    pub fn send(&self, frame: &ServerFrame, wanted: impl Fn(u64, i64) -> bool) -> EdgeResult<()> {
        let text = serde_json::to_string(frame).map_err(|e| EdgeError::Internal(e.to_string()))?;
        if let ServerFrame::Error { code, .. } = frame {
            self.figures.error(code);
        }
        let limits = Limits::default();
        let mut slow = Vec::new();
        let mut js_text: Option<JsValue> = None;
        for (conn, s) in self.sockets.borrow_mut().iter_mut() {
            if !wanted(*conn, s.tag.user) {
                continue;
            }
            let js = js_text.get_or_insert_with(|| JsValue::from_str(&text));
            // A failed send means the socket is going away; its close
            // event cleans up.
            let _ = js_socket(&s.ws).send_js(js);
            match s.backlog.sent(text.len() as u64, limits) {
                Verdict::Fine => {}
                Verdict::Probe(n) => {
                    if let Ok(ping) = serde_json::to_string(&ServerFrame::Ping { n }) {
                        let _ = s.ws.send_with_str(&ping);
                    }
                }
                Verdict::TooSlow => slow.push(*conn),
            }
        }
        let mut full = Vec::new();
        {
            let mut streams = self.streams.borrow_mut();
            if !streams.is_empty() {
                let event = sse_event(frame, &text).into_bytes();
                for (conn, stream) in streams.iter_mut() {
                    if wanted(*conn, stream.tag.user)
                        && stream.tx.try_send(Ok(event.clone())).is_err()
                    {
                        // Full (not reading) or closed (gone): either way
                        // this stream is over; its client resumes.
                        full.push(*conn);
                    }
                }
            }
        }
        for conn in slow {
            self.end(conn, 1008, "too slow: the client is not reading");
        }
        for conn in full {
            self.end(conn, 1008, "too slow");
        }
        Ok(())
    }

    /// Closes a connection the state machine asked to close: a WebSocket
    /// with `code`; an SSE stream has no close code, so ending it is the
    /// close.
    pub fn close(&self, conn: u64, code: u16, reason: &str) {
        let socket = self.sockets.borrow_mut().remove(&conn);
        if let Some(s) = socket {
            let _ = s.ws.close(Some(code), Some(reason));
            self.disconnected(&s.tag, "ws", Some(code), reason);
        }
        let stream = self.streams.borrow_mut().remove(&conn);
        if let Some(s) = stream {
            self.disconnected(&s.tag, "sse", Some(code), reason);
        }
    }

    /// Ends a connection on this layer's own initiative and reports it.
    fn end(&self, conn: u64, code: u16, reason: &str) {
        let known =
            self.sockets.borrow().contains_key(&conn) || self.streams.borrow().contains_key(&conn);
        if known {
            self.close(conn, code, reason);
            self.gone.borrow_mut().push(conn);
        }
    }

    /// When the SSE streams are next due a heartbeat.
    pub fn next_heartbeat(&self) -> Option<u64> {
        self.next_heartbeat.get()
    }

    /// Heartbeats the SSE streams and ends those that are gone, full or
    /// too old (reported through [`Self::take_gone`]). Call when
    /// [`Self::next_heartbeat`] is due.
    pub fn maintain_streams(&self, now: u64, heartbeat_ms: u64) {
        let mut ended = Vec::new();
        self.streams.borrow_mut().retain(|_, s| {
            let alive = !s.tx.is_closed()
                && now.saturating_sub(s.tag.opened_at) < SSE_MAX_LIFETIME_MS
                && s.tx.try_send(Ok(b": heartbeat\n\n".to_vec())).is_ok();
            if !alive {
                ended.push(s.tag);
            }
            alive
        });
        for tag in &ended {
            self.disconnected(tag, "sse", None, "stream ended (gone, full or too old)");
        }
        self.gone.borrow_mut().extend(ended.iter().map(|t| t.conn));
        self.next_heartbeat
            .set(if self.streams.borrow().is_empty() {
                None
            } else {
                Some(now + heartbeat_ms)
            });
    }
}

/// Burns the ticket a connection was opened with (the Worker forwards its
/// `jti` and `exp`): a ticket opens one connection, once. The object that
/// the ticket's scope names is the only place it can be used, so its
/// SQLite is the whole memory needed; entries go when the ticket expires.
pub fn burn_ticket(sql: &SqlStorage, req: &Request, now_ms: u64) -> EdgeResult<()> {
    #[derive(Deserialize)]
    struct Row {
        n: i64,
    }
    let Some(raw) = req.headers().get(crate::headers::TICKET_HEADER)? else {
        return Ok(());
    };
    let (jti, exp) = raw
        .split_once(':')
        .and_then(|(j, e)| Some((j.to_owned(), e.parse::<i64>().ok()?)))
        .ok_or_else(|| EdgeError::Internal("malformed ticket header".to_owned()))?;
    let now_secs = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    sql.exec(
        "CREATE TABLE IF NOT EXISTS used_tickets (jti TEXT PRIMARY KEY, exp INTEGER NOT NULL)",
        None,
    )?;
    sql.exec(
        "DELETE FROM used_tickets WHERE exp < ?",
        vec![(now_secs - shared::auth::MAX_LEEWAY_SECS).into()],
    )?;
    let used: Vec<Row> = sql
        .exec(
            "SELECT count(*) AS n FROM used_tickets WHERE jti = ?",
            vec![jti.clone().into()],
        )?
        .to_array()?;
    if used.first().is_some_and(|r| r.n > 0) {
        return Err(EdgeError::Client {
            status: 401,
            code: "ticket_used",
            message: "this ticket was already used; ask for a new one".to_owned(),
        });
    }
    sql.exec(
        "INSERT INTO used_tickets (jti, exp) VALUES (?, ?)",
        vec![jti.into(), exp.into()],
    )?;
    Ok(())
}

/// `{"type":"pong","n":…}`: a client's answer to a backlog probe, which
/// the transport layer handles. A cheap test comes first, so every other
/// frame goes straight on to the state machine.
pub fn probe_answer(text: &str) -> Option<u64> {
    if text.len() > 64 || !text.contains("\"pong\"") {
        return None;
    }
    match serde_json::from_str::<shared::protocol::ClientFrame>(text) {
        Ok(shared::protocol::ClientFrame::Pong { n }) => Some(n),
        _ => None,
    }
}

/// The SSE encoding of a frame: the same JSON as the WebSocket frame, with
/// `id: <seq>` on messages and changes to them so `Last-Event-ID` resumes
/// after them. JSON has no raw newlines, so one `data:` line holds it.
fn sse_event(frame: &ServerFrame, json: &str) -> String {
    match frame.sequenced() {
        Some((_, seq)) => format!("id: {seq}\ndata: {json}\n\n"),
        None => format!("data: {json}\n\n"),
    }
}

/// Completes the upgrade only to explain the refusal: browsers cannot read
/// the status of a failed upgrade, but they do see an `error` frame and the
/// close code 1008.
pub fn refuse_ws(code: &str, message: &str) -> EdgeResult<Response> {
    let pair = WebSocketPair::new()?;
    pair.server.accept()?;
    let frame = ServerFrame::Error {
        code: code.to_owned(),
        message: message.to_owned(),
    };
    let text = serde_json::to_string(&frame).map_err(|e| EdgeError::Internal(e.to_string()))?;
    pair.server.send_with_str(&text)?;
    pair.server.close(Some(1008), Some(message))?;
    Ok(Response::from_websocket(pair.client)?)
}

/// Replies to a client's close (the hibernation API leaves it to us).
/// 1005/1006/1015 are reserved and may not be sent.
pub fn answer_close(ws: &WebSocket, code: usize, reason: String) {
    let code = match u16::try_from(code) {
        Ok(1005 | 1006 | 1015) | Err(_) => 1000,
        Ok(c) => c,
    };
    let _ = ws.close(Some(code), Some(reason));
}

/// A Durable Object's answer to the Worker: an error on an upgrade request
/// becomes an `error` frame and a 1008 close (see [`refuse_ws`]), any
/// other error its JSON response.
pub fn answer(
    figures: &crate::telemetry::Figures,
    upgrade: bool,
    result: EdgeResult<Response>,
) -> Result<Response> {
    if let Err(e) = &result {
        figures.error(e.code());
        if e.status() >= 500 {
            crate::log!(Error, "request failed", "object" => figures.name(), "code" => e.code(), "error" => e.to_string());
        }
    }
    match result {
        Ok(res) => Ok(res),
        Err(e) if upgrade => match refuse_ws(e.code(), &e.to_string()) {
            Ok(res) => Ok(res),
            Err(e) => e.to_response(),
        },
        Err(e) => e.to_response(),
    }
}

/// The one alarm a Durable Object has, set to the earliest deadline asked
/// for; it is not reset for a later one (storage writes are not free).
#[derive(Debug, Default)]
pub struct Alarm {
    at: Cell<Option<u64>>,
    /// The alarm handler is running: requests wait for its end (each
    /// `set_alarm` is a durable write, and the handler reschedules anyway).
    running: Cell<bool>,
}

impl Alarm {
    /// Call when the alarm fires.
    pub fn fired(&self) {
        self.at.set(None);
        self.running.set(true);
    }

    /// Call when the alarm handler is done, before rescheduling.
    pub fn done(&self) {
        self.running.set(false);
    }

    /// Adopts the alarm a previous instance left.
    pub async fn load(&self, state: &State) {
        let stored = state.storage().get_alarm().await.ok().flatten();
        self.at.set(stored.and_then(|t| u64::try_from(t).ok()));
    }

    /// Asks for the alarm at the earliest of `deadlines`.
    pub async fn request(&self, state: &State, deadlines: &[Option<u64>]) {
        let Some(at) = deadlines.iter().flatten().copied().min() else {
            return;
        };
        if self.running.get() || self.at.get().is_some_and(|current| current <= at) {
            return;
        }
        self.at.set(Some(at));
        let when = chrono::DateTime::from_timestamp_millis(i64::try_from(at).unwrap_or(i64::MAX))
            .unwrap_or_default();
        if let Err(e) = state.storage().set_alarm(when).await {
            self.at.set(None);
            crate::log!(Error, "alarm not set", "error" => e.to_string());
        }
    }
}
