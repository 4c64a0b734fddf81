//! One simulated user's always-on connection: a WebSocket to the workerd
//! runtime, read by one task that timestamps every `presence` and
//! `presence_snapshot` frame, answers the object's probes, and closes the
//! socket when the schedule says the user goes offline.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a connection attempt may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// After the bench closes a socket, how long it waits for the object's
/// close frame before dropping the connection.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A `presence` frame as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Heard {
    /// Whose presence (user index).
    pub about: u32,
    pub online: bool,
    pub at_us: u64,
}

/// Everything one connection saw, returned when it ends.
#[derive(Debug)]
pub struct ConnRecord {
    pub user: u32,
    /// When the handshake completed (µs since the clock's epoch).
    pub opened_us: u64,
    /// When the bench closed it, or the object did; `None` while it was
    /// still open at the end of the run.
    pub closed_us: Option<u64>,
    pub heard: Vec<Heard>,
    /// `presence_snapshot` frames: when, and who was online in them.
    pub snapshots: Vec<(u64, Vec<u32>)>,
}

/// What every connection shares: the clock, the id → index map, and live
/// counters (for telling a quiet system from a busy one).
#[derive(Debug)]
pub struct Shared {
    epoch: Instant,
    index: HashMap<i64, u32>,
    pub presence_frames: AtomicUsize,
    pub snapshots: AtomicUsize,
    /// Connections that have had their first snapshot.
    pub first_snapshots: AtomicUsize,
    /// Frames about someone who is not one of the simulated users.
    pub strangers: AtomicUsize,
    /// Connections the object (or the runtime) ended, not the bench.
    pub cut_off: AtomicUsize,
    /// `error` frames, by code.
    pub errors: Mutex<BTreeMap<String, usize>>,
}

impl Shared {
    pub fn new(index: HashMap<i64, u32>) -> Self {
        Self {
            epoch: Instant::now(),
            index,
            presence_frames: AtomicUsize::new(0),
            snapshots: AtomicUsize::new(0),
            first_snapshots: AtomicUsize::new(0),
            strangers: AtomicUsize::new(0),
            cut_off: AtomicUsize::new(0),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// Now, in µs since the epoch.
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// `at` in µs since the epoch.
    pub fn us_of(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn error(&self, code: &str) {
        if let Ok(mut m) = self.errors.lock() {
            *m.entry(code.to_owned()).or_default() += 1;
        }
    }
}

/// The bench's hold on an open connection: dropping or firing `close`
/// makes the task close the socket.
#[derive(Debug)]
pub struct Handle {
    close: oneshot::Sender<()>,
}

impl Handle {
    /// Closes the socket (the user goes offline once the grace ends).
    pub fn close(self) {
        let _ = self.close.send(());
    }
}

/// Opens `user`'s always-on connection at `base` (`ws://host:port`).
pub async fn connect(base: &str, token: &str) -> anyhow::Result<Socket> {
    let url = format!("{base}/api/v1/chat/ws?token={token}");
    let (ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .context("the handshake timed out")?
        .context("connect")?;
    Ok(ws)
}

/// A started connection: its handle, its task, and a signal fired by its
/// first `presence_snapshot` (the object has the contacts then).
#[derive(Debug)]
pub struct Started {
    pub handle: Handle,
    pub task: tokio::task::JoinHandle<ConnRecord>,
    pub snapshot: oneshot::Receiver<()>,
}

/// Starts reading a connected socket. The task ends when the bench closes
/// the socket (through the handle), the object closes it, or `stop` is
/// set, and returns what it saw.
pub fn spawn(ws: Socket, user: u32, shared: Arc<Shared>, stop: watch::Receiver<bool>) -> Started {
    let opened_us = shared.now_us();
    let (tx, rx) = oneshot::channel();
    let (snapshot_tx, snapshot) = oneshot::channel();
    let task = tokio::spawn(read(ws, user, opened_us, shared, rx, stop, snapshot_tx));
    Started {
        handle: Handle { close: tx },
        task,
        snapshot,
    }
}

enum Event {
    Close,
    Stop,
    Next(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
}

async fn read(
    mut ws: Socket,
    user: u32,
    opened_us: u64,
    shared: Arc<Shared>,
    mut close: oneshot::Receiver<()>,
    mut stop: watch::Receiver<bool>,
    snapshot: oneshot::Sender<()>,
) -> ConnRecord {
    let mut snapshot = Some(snapshot);
    let mut record = ConnRecord {
        user,
        opened_us,
        closed_us: None,
        heard: Vec::new(),
        snapshots: Vec::new(),
    };
    loop {
        let event = tokio::select! {
            biased;
            // A dropped handle closes too.
            _ = &mut close => Event::Close,
            _ = stop.wait_for(|s| *s) => Event::Stop,
            next = ws.next() => Event::Next(next),
        };
        let next = match event {
            Event::Close => {
                record.closed_us = Some(shared.now_us());
                let _ = ws.close(None).await;
                // Wait briefly for the object's close frame, so the close
                // reaches it as a close and not as a reset.
                let _ = tokio::time::timeout(CLOSE_WAIT, async {
                    while let Some(Ok(m)) = ws.next().await {
                        if matches!(m, Message::Close(_)) {
                            break;
                        }
                    }
                })
                .await;
                break;
            }
            Event::Stop => break,
            Event::Next(next) => next,
        };
        let at_us = shared.now_us();
        let text = match next {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                shared.cut_off.fetch_add(1, Ordering::Relaxed);
                record.closed_us = Some(at_us);
                break;
            }
            Some(Ok(_)) => continue,
        };
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        match frame["type"].as_str() {
            Some("presence") => {
                let about = frame["user_id"]
                    .as_i64()
                    .and_then(|id| shared.index.get(&id).copied());
                let online = frame["is_online"].as_bool();
                match (about, online) {
                    (Some(about), Some(online)) => {
                        record.heard.push(Heard {
                            about,
                            online,
                            at_us,
                        });
                        shared.presence_frames.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        shared.strangers.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Some("presence_snapshot") => {
                let online: Vec<u32> = frame["online"]
                    .as_array()
                    .map(|ids| {
                        ids.iter()
                            .filter_map(Value::as_i64)
                            .filter_map(|id| shared.index.get(&id).copied())
                            .collect()
                    })
                    .unwrap_or_default();
                record.snapshots.push((at_us, online));
                shared.snapshots.fetch_add(1, Ordering::Relaxed);
                if let Some(tx) = snapshot.take() {
                    shared.first_snapshots.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(());
                }
            }
            Some("ping") => {
                // The object's backlog probe: a well-behaved client answers.
                let n = frame["n"].as_u64().unwrap_or(0);
                let pong = format!(r#"{{"type":"pong","n":{n}}}"#);
                let _ = ws.send(Message::text(pong)).await;
            }
            Some("error") => shared.error(frame["code"].as_str().unwrap_or("unknown")),
            _ => {}
        }
    }
    record
}
