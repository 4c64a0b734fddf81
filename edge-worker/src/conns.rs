//! A Durable Object's live connections: hibernatable WebSockets and
//! Server-Sent Event streams, behind one `send`. The Room and the Lobby
//! both use it, so both transports behave the same everywhere.
//!
//! SSE needs care because workerd does not tell the object when an SSE
//! client goes away. Streams are bounded three ways: a heartbeat to a
//! stream whose reader is gone fails (or finds the channel closed) and
//! ends it; every stream ends after [`SSE_MAX_LIFETIME_MS`] (the client
//! resumes with `Last-Event-ID`); and a cap evicts the oldest.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use futures_channel::mpsc::{UnboundedSender, unbounded};
use serde::{Deserialize, Serialize};
use shared::protocol::ServerFrame;
use worker::{Headers, Response, Result, State, WebSocket, WebSocketPair};

use crate::error::{EdgeError, EdgeResult};

/// Reconnect delay suggested to EventSource clients.
pub const SSE_RETRY_MS: u64 = 2_000;
/// An SSE stream ends after this long; its client resumes.
pub const SSE_MAX_LIFETIME_MS: u64 = 5 * 60_000;

/// What each hibernatable socket carries across hibernation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SocketTag {
    pub conn: u64,
    pub user: i64,
}

#[derive(Debug)]
struct SseStream {
    tx: UnboundedSender<Result<Vec<u8>>>,
    user: i64,
    opened_at: u64,
}

/// Live connections by id, each with its user.
#[derive(Debug, Default)]
pub struct Connections {
    sockets: RefCell<HashMap<u64, (WebSocket, i64)>>,
    streams: RefCell<HashMap<u64, SseStream>>,
    next_heartbeat: Cell<Option<u64>>,
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

impl Connections {
    pub fn socket_count(&self) -> usize {
        self.sockets.borrow().len()
    }

    pub fn stream_count(&self) -> usize {
        self.streams.borrow().len()
    }

    /// Accepts a hibernatable WebSocket for `user`; returns its id and the
    /// client end for the 101 response.
    pub fn accept_socket(&self, state: &State, user: i64) -> EdgeResult<(u64, WebSocket)> {
        let pair = WebSocketPair::new()?;
        let conn = new_conn_id();
        state.accept_websocket_with_tags(&pair.server, &[&format!("u{user}")]);
        pair.server.serialize_attachment(SocketTag { conn, user })?;
        self.sockets.borrow_mut().insert(conn, (pair.server, user));
        Ok((conn, pair.client))
    }

    /// Rebuilds the socket map after a wake from hibernation.
    pub fn reattach(&self, state: &State) -> Vec<SocketTag> {
        let mut sockets = HashMap::new();
        let mut tags = Vec::new();
        for ws in state.get_websockets() {
            if let Ok(Some(tag)) = ws.deserialize_attachment::<SocketTag>() {
                sockets.insert(tag.conn, (ws, tag.user));
                tags.push(tag);
            }
        }
        *self.sockets.borrow_mut() = sockets;
        tags
    }

    /// Forgets a socket that closed or failed.
    pub fn forget_socket(&self, ws: &WebSocket) -> Option<SocketTag> {
        let tag = ws.deserialize_attachment::<SocketTag>().ok().flatten()?;
        self.sockets.borrow_mut().remove(&tag.conn);
        Some(tag)
    }

    /// Opens an SSE stream for `user`. Returns its id, the response to
    /// return, and the streams evicted to stay under `max`.
    pub fn open_stream(
        &self,
        user: i64,
        now: u64,
        max: usize,
        heartbeat_ms: u64,
    ) -> EdgeResult<(u64, Response, Vec<u64>)> {
        let mut evicted = Vec::new();
        {
            let mut streams = self.streams.borrow_mut();
            while streams.len() >= max.max(1) {
                let oldest = streams
                    .iter()
                    .min_by_key(|(_, s)| s.opened_at)
                    .map(|(id, _)| *id);
                let Some(id) = oldest else { break };
                // Dropping the sender ends that response.
                streams.remove(&id);
                evicted.push(id);
            }
        }
        let (tx, rx) = unbounded::<Result<Vec<u8>>>();
        let _ = tx.unbounded_send(Ok(
            format!("retry: {SSE_RETRY_MS}\n: connected\n\n").into_bytes()
        ));
        let conn = new_conn_id();
        self.streams.borrow_mut().insert(
            conn,
            SseStream {
                tx,
                user,
                opened_at: now,
            },
        );
        if self.next_heartbeat.get().is_none() {
            self.next_heartbeat.set(Some(now + heartbeat_ms));
        }
        let headers = Headers::new();
        headers.set("content-type", "text/event-stream; charset=utf-8")?;
        headers.set("cache-control", "no-cache, no-transform")?;
        headers.set("x-accel-buffering", "no")?;
        Ok((
            conn,
            Response::from_stream(rx)?.with_headers(headers),
            evicted,
        ))
    }

    /// Sends `frame` to every connection `wanted(conn, user)` accepts.
    pub fn send(&self, frame: &ServerFrame, wanted: impl Fn(u64, i64) -> bool) -> EdgeResult<()> {
        let text = serde_json::to_string(frame).map_err(|e| EdgeError::Internal(e.to_string()))?;
        for (conn, (ws, user)) in self.sockets.borrow().iter() {
            if wanted(*conn, *user) {
                // A failed send means the socket is going away; its close
                // event cleans up.
                let _ = ws.send_with_str(&text);
            }
        }
        let streams = self.streams.borrow();
        if !streams.is_empty() {
            let event = sse_event(frame, &text).into_bytes();
            for (conn, stream) in streams.iter() {
                if wanted(*conn, stream.user) {
                    // A closed stream is swept by the next heartbeat.
                    let _ = stream.tx.unbounded_send(Ok(event.clone()));
                }
            }
        }
        Ok(())
    }

    /// Closes a connection: a WebSocket with `code`; an SSE stream has no
    /// close code, so ending it is the close.
    pub fn close(&self, conn: u64, code: u16, reason: &str) {
        let ws = self.sockets.borrow_mut().remove(&conn);
        if let Some((ws, _)) = ws {
            let _ = ws.close(Some(code), Some(reason));
        }
        self.streams.borrow_mut().remove(&conn);
    }

    /// When the SSE streams are next due a heartbeat.
    pub fn next_heartbeat(&self) -> Option<u64> {
        self.next_heartbeat.get()
    }

    /// Heartbeats the SSE streams and ends those that are gone or too old;
    /// returns the ended ones. Call when [`Self::next_heartbeat`] is due.
    pub fn maintain_streams(&self, now: u64, heartbeat_ms: u64) -> Vec<u64> {
        let mut ended = Vec::new();
        self.streams.borrow_mut().retain(|id, s| {
            let alive = !s.tx.is_closed()
                && now.saturating_sub(s.opened_at) < SSE_MAX_LIFETIME_MS
                && s.tx.unbounded_send(Ok(b": heartbeat\n\n".to_vec())).is_ok();
            if !alive {
                ended.push(*id);
            }
            alive
        });
        self.next_heartbeat
            .set(if self.streams.borrow().is_empty() {
                None
            } else {
                Some(now + heartbeat_ms)
            });
        ended
    }
}

/// The SSE encoding of a frame: the same JSON as the WebSocket frame, with
/// `id: <seq>` on messages so `Last-Event-ID` resumes after them. JSON has
/// no raw newlines, so one `data:` line holds it.
fn sse_event(frame: &ServerFrame, json: &str) -> String {
    match frame {
        ServerFrame::Message { message } => format!("id: {}\ndata: {json}\n\n", message.seq),
        _ => format!("data: {json}\n\n"),
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
pub fn answer(upgrade: bool, result: EdgeResult<Response>) -> Result<Response> {
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
}

impl Alarm {
    /// Call when the alarm fires.
    pub fn fired(&self) {
        self.at.set(None);
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
        if self.at.get().is_some_and(|current| current <= at) {
            return;
        }
        self.at.set(Some(at));
        let when = chrono::DateTime::from_timestamp_millis(i64::try_from(at).unwrap_or(i64::MAX))
            .unwrap_or_default();
        if let Err(e) = state.storage().set_alarm(when).await {
            self.at.set(None);
            worker::console_error!("set alarm: {e}");
        }
    }
}
