//! Real clients: REST through the edge, and WebSockets.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use shared::Role;
use shared::auth::{AUDIENCE_API, Claims};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::stack::Stack;

/// How long a test waits for a frame it expects.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// A user created for one test.
#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub token: String,
}

impl Stack {
    /// Creates a user directly in PostgreSQL and mints a session token.
    pub async fn user(&self, name: &str) -> anyhow::Result<User> {
        let email = format!(
            "{}-{}@e2e.vibe",
            name.to_lowercase(),
            uuid::Uuid::now_v7().simple()
        );
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "INSERT INTO users (email, full_name, role, password_hash)
                 VALUES ($1, $2, 'member', 'not-a-login') RETURNING id",
                &[&email, &name],
            )
            .await?;
        let id: i64 = row.get(0);
        Ok(User {
            id,
            name: name.to_owned(),
            token: self.token_for(id, name, 3600)?,
        })
    }

    /// A session token for `id`, valid for `ttl` seconds (negative: expired).
    pub fn token_for(&self, id: i64, name: &str, ttl: i64) -> anyhow::Result<String> {
        let now = chrono::Utc::now().timestamp();
        let iat = if ttl < 0 { now + ttl - 3600 } else { now };
        let claims = Claims::new(
            id,
            name,
            Role::Member,
            AUDIENCE_API,
            iat,
            if ttl < 0 { 3600 } else { ttl },
        );
        Ok(shared::auth::issue(&claims, self.secrets.jwt.as_bytes())?)
    }

    /// A session token for `id` that the edge refuses `secs` seconds from
    /// now: its `exp` is already past, inside the leeway.
    pub fn token_expiring_in(&self, id: i64, name: &str, secs: i64) -> anyhow::Result<String> {
        let now = chrono::Utc::now().timestamp();
        let exp = now + secs - shared::auth::LEEWAY_SECS;
        let claims = Claims::new(id, name, Role::Member, AUDIENCE_API, exp - 600, 600);
        Ok(shared::auth::issue(&claims, self.secrets.jwt.as_bytes())?)
    }

    pub fn http(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    /// `method path` through the edge as `user`; returns status and JSON.
    pub async fn call(
        &self,
        user: Option<&User>,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http().request(method, format!("{}{path}", self.edge));
        if let Some(u) = user {
            req = req.bearer_auth(&u.token);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let text = res.text().await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    /// A direct conversation between `a` and `b`, created through the edge.
    pub async fn direct(&self, a: &User, b: &User) -> anyhow::Result<i64> {
        let (status, body) = self
            .call(
                Some(a),
                reqwest::Method::POST,
                "/api/v1/chat/conversations",
                Some(json!({"type": "direct", "participant_id": b.id})),
            )
            .await?;
        if !(200..300).contains(&status) {
            bail!("create direct: {status} {body}");
        }
        body["id"].as_i64().context("conversation id")
    }

    /// Two fresh users, Alex and Sam, and their direct conversation: the
    /// setting of most tests.
    pub async fn pair(&self) -> anyhow::Result<(User, User, i64)> {
        let alex = self.user("Alex").await?;
        let sam = self.user("Sam").await?;
        let conv = self.direct(&alex, &sam).await?;
        Ok((alex, sam, conv))
    }

    /// A single-use ticket from `POST /api/v1/chat/ws-ticket`, for a
    /// conversation's room or (`None`) the user's own connection.
    pub async fn ticket(&self, user: &User, conversation: Option<i64>) -> anyhow::Result<String> {
        let body = conversation.map(|id| json!({"conversation_id": id}));
        let (status, body) = self
            .call(
                Some(user),
                reqwest::Method::POST,
                "/api/v1/chat/ws-ticket",
                body,
            )
            .await?;
        if status != 200 {
            bail!("ws-ticket: {status} {body}");
        }
        body["ticket"].as_str().map(str::to_owned).context("ticket")
    }

    /// A group owned by `owner`, created through the edge.
    pub async fn group(&self, owner: &User, members: &[&User]) -> anyhow::Result<i64> {
        let ids: Vec<i64> = members.iter().map(|m| m.id).collect();
        let (status, body) = self
            .call(
                Some(owner),
                reqwest::Method::POST,
                "/api/v1/chat/conversations",
                Some(json!({"type": "group", "name": "e2e group", "participant_ids": ids})),
            )
            .await?;
        if status != 201 {
            bail!("create group: {status} {body}");
        }
        body["id"].as_i64().context("conversation id")
    }

    /// Opens the room WebSocket for `conversation` with a query string
    /// (`token=…`, `since=…`).
    pub async fn ws_with(&self, conversation: i64, query: &str) -> anyhow::Result<Ws> {
        self.ws_with_path(
            &format!("/api/v1/chat/conversations/{conversation}/ws"),
            query,
        )
        .await
    }

    /// Opens a WebSocket at any edge path with a query string.
    pub async fn ws_with_path(&self, path: &str, query: &str) -> anyhow::Result<Ws> {
        let url = format!("{}{path}?{query}", self.edge.replacen("http", "ws", 1));
        let (stream, _) = tokio_tungstenite::connect_async(url.into_client_request()?)
            .await
            .context("websocket connect")?;
        Ok(Ws {
            stream,
            backlog: VecDeque::new(),
        })
    }

    /// Opens the room WebSocket as `user`, optionally resuming after `since`.
    pub async fn ws(
        &self,
        user: &User,
        conversation: i64,
        since: Option<i64>,
    ) -> anyhow::Result<Ws> {
        let mut query = format!("token={}", user.token);
        if let Some(s) = since {
            query.push_str(&format!("&since={s}"));
        }
        self.ws_with(conversation, &query).await
    }

    /// Opens `user`'s always-on WebSocket (`/api/v1/chat/ws`, their User
    /// object).
    pub async fn always_on(&self, user: &User) -> anyhow::Result<Ws> {
        self.ws_with_path("/api/v1/chat/ws", &format!("token={}", user.token))
            .await
    }

    /// `user`'s seed single socket (`/api/v1/chat/ws/{token}`), past its
    /// `presence_snapshot`.
    pub async fn seed_socket(&self, user: &User) -> anyhow::Result<Ws> {
        let mut ws = self
            .ws_with_path(&format!("/api/v1/chat/ws/{}", user.token), "")
            .await?;
        ws.expect("presence_snapshot").await?;
        Ok(ws)
    }

    /// `GET /api/v1/chat/presence/{id}` as `viewer`: (is_online, last_seen).
    pub async fn presence(&self, viewer: &User, id: i64) -> anyhow::Result<(bool, Option<String>)> {
        let (status, body) = self
            .call(
                Some(viewer),
                reqwest::Method::GET,
                &format!("/api/v1/chat/presence/{id}"),
                None,
            )
            .await?;
        if status != 200 {
            bail!("presence: {status} {body}");
        }
        Ok((
            body["is_online"].as_bool().unwrap_or(false),
            body["last_seen"].as_str().map(str::to_owned),
        ))
    }

    /// Messages PostgreSQL holds for a conversation: (seq, client_msg_id).
    pub async fn stored(&self, conversation: i64) -> anyhow::Result<Vec<(i64, String)>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT seq, client_msg_id FROM messages WHERE conversation_id = $1 ORDER BY seq",
                &[&conversation],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Waits until PostgreSQL holds `n` messages for `conversation`.
    pub async fn wait_stored(
        &self,
        conversation: i64,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(i64, String)>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rows = self.stored(conversation).await?;
            if rows.len() >= n || tokio::time::Instant::now() > deadline {
                return Ok(rows);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// How a WebSocket ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

/// One WebSocket connection. Frames skipped while waiting for a given
/// kind are kept, in order, for the next `expect`, `drain` or `closed`:
/// nothing the server sent is lost to the test.
#[derive(Debug)]
pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    backlog: VecDeque<Value>,
}

/// What `next` saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Frame(Value),
    Closed(Closed),
}

impl Ws {
    pub async fn send(&mut self, frame: Value) -> anyhow::Result<()> {
        self.stream.send(Message::text(frame.to_string())).await?;
        Ok(())
    }

    pub async fn send_raw(&mut self, text: String) -> anyhow::Result<()> {
        self.stream.send(Message::text(text)).await?;
        Ok(())
    }

    /// Sends a chat message.
    pub async fn say(&mut self, conversation: i64, content: &str, key: &str) -> anyhow::Result<()> {
        self.send(json!({"type": "message", "conversation_id": conversation, "content": content, "client_msg_id": key}))
            .await
    }

    /// The next frame or the close, within `timeout`; `None` on timeout.
    pub async fn next_within(&mut self, timeout: Duration) -> anyhow::Result<Option<Event>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = match tokio::time::timeout(remaining, self.stream.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => {
                    return Ok(Some(Event::Closed(Closed {
                        code: 1006,
                        reason: String::new(),
                    })));
                }
                Ok(Some(Err(e))) => {
                    use tokio_tungstenite::tungstenite::Error;
                    return match e {
                        Error::ConnectionClosed | Error::AlreadyClosed | Error::Protocol(_) => {
                            Ok(Some(Event::Closed(Closed {
                                code: 1006,
                                reason: e.to_string(),
                            })))
                        }
                        other => Err(other.into()),
                    };
                }
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    let frame: Value = serde_json::from_str(&t)?;
                    // A well-behaved client answers backlog probes (and
                    // the tests never need to see them).
                    if frame["type"] == "ping" {
                        let n = frame["n"].as_u64().unwrap_or(0);
                        self.send(json!({"type": "pong", "n": n})).await?;
                        continue;
                    }
                    return Ok(Some(Event::Frame(frame)));
                }
                Message::Close(frame) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Ok(Some(Event::Closed(Closed { code, reason })));
                }
                _ => {}
            }
        }
    }

    /// The next frame for which `pred` holds; others stay in the backlog.
    pub async fn expect_where(
        &mut self,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        if let Some(pos) = self.backlog.iter().position(&pred) {
            if let Some(f) = self.backlog.remove(pos) {
                return Ok(f);
            }
        }
        loop {
            match self.next_within(FRAME_TIMEOUT).await? {
                Some(Event::Frame(f)) if pred(&f) => return Ok(f),
                Some(Event::Frame(f)) => self.backlog.push_back(f),
                Some(Event::Closed(c)) => bail!("closed ({c:?}) while waiting for {what}"),
                None => bail!("no {what} within {FRAME_TIMEOUT:?}"),
            }
        }
    }

    /// The next frame of `kind` (`"message"`, `"ack"`, …); frames of
    /// other kinds stay in the backlog.
    pub async fn expect(&mut self, kind: &str) -> anyhow::Result<Value> {
        self.expect_where(&format!("a {kind} frame"), |f| f["type"] == kind)
            .await
    }

    /// The seqs of the next `message` frames of `conv`, in the order they
    /// arrived, up to and including `last`.
    pub async fn messages_up_to(&mut self, conv: i64, last: i64) -> anyhow::Result<Vec<i64>> {
        let mut seqs = Vec::new();
        while seqs.last().is_none_or(|s| *s < last) {
            let f = self
                .expect_where(&format!("message {last} of {conv}"), |f| {
                    f["type"] == "message" && f["message"]["conversation_id"] == conv
                })
                .await?;
            seqs.push(f["message"]["seq"].as_i64().unwrap_or(-1));
        }
        Ok(seqs)
    }

    /// The backlog, then every frame that arrives until the line has been
    /// quiet for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> anyhow::Result<Vec<Value>> {
        let mut frames: Vec<Value> = self.backlog.drain(..).collect();
        while let Some(event) = self.next_within(quiet).await? {
            match event {
                Event::Frame(f) => frames.push(f),
                Event::Closed(_) => break,
            }
        }
        Ok(frames)
    }

    /// Waits for the close; returns the backlog and every frame before it.
    pub async fn closed(&mut self) -> anyhow::Result<(Vec<Value>, Closed)> {
        let mut frames: Vec<Value> = self.backlog.drain(..).collect();
        loop {
            match self.next_within(FRAME_TIMEOUT).await? {
                Some(Event::Frame(f)) => frames.push(f),
                Some(Event::Closed(c)) => return Ok((frames, c)),
                None => bail!("not closed within {FRAME_TIMEOUT:?}; got {frames:?}"),
            }
        }
    }

    pub async fn close(mut self) -> anyhow::Result<()> {
        let _ = self.stream.close(None).await;
        Ok(())
    }
}

/// The seqs of the `message` frames in `frames`.
pub fn message_seqs(frames: &[Value]) -> Vec<i64> {
    frames
        .iter()
        .filter(|f| f["type"] == "message")
        .filter_map(|f| f["message"]["seq"].as_i64())
        .collect()
}
