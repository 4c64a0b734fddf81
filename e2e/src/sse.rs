//! A small Server-Sent Events client over reqwest, parsing the stream the
//! way the HTML spec says (fields `id`, `data`, `retry`, comments).

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::client::FRAME_TIMEOUT;
use crate::stack::Stack;

/// One dispatched event (or a comment line, which the spec ignores but a
/// test wants to see: heartbeats are comments).
#[derive(Debug, Clone, PartialEq)]
pub enum SseItem {
    Event {
        id: Option<String>,
        data: Value,
    },
    Comment(String),
    Retry(u64),
    /// The server ended the stream.
    End,
}

/// A live SSE subscription.
#[derive(Debug)]
pub struct Sse {
    pub status: u16,
    rx: mpsc::UnboundedReceiver<SseItem>,
    backlog: VecDeque<SseItem>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sse {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stack {
    /// One conversation open on every transport the edge counts apart:
    /// `on_socket`'s room WebSocket, `on_sse`'s SSE stream (its POSTs are
    /// the fallback's sends), and `on_socket`'s seed single socket (the
    /// per-user path), in that order.
    pub async fn every_transport(
        &self,
        on_socket: &crate::User,
        on_sse: &crate::User,
        conversation: i64,
    ) -> anyhow::Result<(crate::Ws, Sse, crate::Ws)> {
        let room = self.ws(on_socket, conversation, None).await?;
        let stream = self
            .sse(
                conversation,
                "",
                &[("authorization", format!("Bearer {}", on_sse.token))],
            )
            .await?
            .map_err(|e| anyhow::anyhow!("SSE refused: {e:?}"))?;
        let own = self.seed_socket(on_socket).await?;
        Ok((room, stream, own))
    }

    /// Opens `GET …/{conversation}/events` with `query` and optional
    /// headers (`Authorization`, `Last-Event-ID`). A non-200 answer is
    /// returned as an error carrying the status and body.
    pub async fn sse(
        &self,
        conversation: i64,
        query: &str,
        headers: &[(&str, String)],
    ) -> anyhow::Result<Result<Sse, (u16, Value)>> {
        self.sse_at(
            &format!("/api/v1/chat/conversations/{conversation}/events?{query}"),
            headers,
        )
        .await
    }

    /// Opens any event stream of the edge (`path` with its query), as
    /// [`Stack::sse`] does.
    pub async fn sse_at(
        &self,
        path: &str,
        headers: &[(&str, String)],
    ) -> anyhow::Result<Result<Sse, (u16, Value)>> {
        let mut req = self.http().get(format!("{}{path}", self.edge));
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let res = req.send().await.context("open the SSE stream")?;
        let status = res.status().as_u16();
        if status != 200 {
            let body = res.json().await.unwrap_or(Value::Null);
            return Ok(Err((status, body)));
        }
        let content_type = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if !content_type.starts_with("text/event-stream") {
            bail!("content-type is {content_type:?}");
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = res.bytes_stream();
            let mut buf = String::new();
            let mut id: Option<String> = None;
            let mut data: Vec<String> = Vec::new();
            while let Some(Ok(chunk)) = stream.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(pos) = buf.find('\n') {
                    let line = buf[..pos].trim_end_matches('\r').to_owned();
                    buf.drain(..=pos);
                    if line.is_empty() {
                        if !data.is_empty() {
                            let joined = data.join("\n");
                            let value =
                                serde_json::from_str(&joined).unwrap_or(Value::String(joined));
                            let _ = tx.send(SseItem::Event {
                                id: id.take(),
                                data: value,
                            });
                            data.clear();
                        }
                        continue;
                    }
                    if let Some(comment) = line.strip_prefix(':') {
                        let _ = tx.send(SseItem::Comment(comment.trim().to_owned()));
                        continue;
                    }
                    let (field, value) = match line.split_once(':') {
                        Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                        None => (line.as_str(), ""),
                    };
                    match field {
                        "id" => id = Some(value.to_owned()),
                        "data" => data.push(value.to_owned()),
                        "retry" => {
                            if let Ok(ms) = value.parse() {
                                let _ = tx.send(SseItem::Retry(ms));
                            }
                        }
                        _ => {}
                    }
                }
            }
            let _ = tx.send(SseItem::End);
        });
        Ok(Ok(Sse {
            status,
            rx,
            backlog: VecDeque::new(),
            task,
        }))
    }
}

impl Sse {
    async fn next_within(&mut self, timeout: Duration) -> Option<SseItem> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next event whose JSON `type` is `kind`; others stay in the
    /// backlog.
    pub async fn expect(&mut self, kind: &str) -> anyhow::Result<(Option<String>, Value)> {
        let matches =
            |item: &SseItem| matches!(item, SseItem::Event { data, .. } if data["type"] == kind);
        if let Some(pos) = self.backlog.iter().position(matches) {
            if let Some(SseItem::Event { id, data }) = self.backlog.remove(pos) {
                return Ok((id, data));
            }
        }
        loop {
            match self.next_within(FRAME_TIMEOUT).await {
                Some(SseItem::Event { id, data }) if data["type"] == kind => return Ok((id, data)),
                Some(SseItem::End) => bail!("stream ended while waiting for {kind}"),
                Some(other) => self.backlog.push_back(other),
                None => bail!("no {kind} event within {FRAME_TIMEOUT:?}"),
            }
        }
    }

    /// The backlog and everything until the stream is quiet for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<SseItem> {
        let mut items: Vec<SseItem> = self.backlog.drain(..).collect();
        while let Some(item) = self.next_within(quiet).await {
            let end = item == SseItem::End;
            items.push(item);
            if end {
                break;
            }
        }
        items
    }

    /// The backlog and everything that arrives within `window` (for
    /// streams that are never quiet, like heartbeats).
    pub async fn collect_for(&mut self, window: Duration) -> Vec<SseItem> {
        let mut items: Vec<SseItem> = self.backlog.drain(..).collect();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(item)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            items.push(item);
        }
        items
    }

    /// Waits for the server to end the stream.
    pub async fn ended(&mut self, timeout: Duration) -> anyhow::Result<Vec<SseItem>> {
        let mut items: Vec<SseItem> = self.backlog.drain(..).collect();
        loop {
            match self.next_within(timeout).await {
                Some(SseItem::End) => return Ok(items),
                Some(item) => items.push(item),
                None => bail!("the stream did not end within {timeout:?}"),
            }
        }
    }
}

/// The seqs of message events, with their SSE ids.
pub fn sse_messages(items: &[SseItem]) -> Vec<(Option<String>, i64)> {
    items
        .iter()
        .filter_map(|i| match i {
            SseItem::Event { id, data } if data["type"] == "message" => {
                data["message"]["seq"].as_i64().map(|s| (id.clone(), s))
            }
            _ => None,
        })
        .collect()
}
