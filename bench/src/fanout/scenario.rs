//! One scenario: a fresh group with WebSocket and SSE members, messages at
//! a fixed rate (open loop), and everything that happened counted where it
//! happened: deliveries at the receivers, acks and refusals at the
//! senders, rows in PostgreSQL.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use e2e::{Stack, User};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use super::persisted::{self, OriginCounters, PgCheck};
use crate::report::{CpuSample, Neighbours, micros_histogram};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long the bench waits, after the last scheduled send, for nothing
/// more to happen before it stops waiting for acks and deliveries. Long,
/// because a disk stall of seconds is part of what the bench must show.
pub(super) const DRAIN_QUIET: Duration = Duration::from_secs(15);
/// The same for rows reaching PostgreSQL (the outbox may retry with
/// backoff while the origin is slow).
pub(super) const PERSIST_QUIET: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub ws: usize,
    pub sse: usize,
    /// Members on the seed's single socket only (`/api/v1/chat/ws/{token}`,
    /// their User object), who get the room's frames through it.
    pub single: usize,
    pub rate: f64,
    pub duration: Duration,
    /// Prefix of every `client_msg_id` (unique per scenario and run).
    pub tag: String,
    /// Where members connect: the workerd runtime, or wrangler dev's proxy
    /// in front of it (see `fanout::edge_url`).
    pub edge: String,
}

/// One scenario's counts and timings.
#[derive(Debug)]
pub struct RunResult {
    pub members: usize,
    pub target_rate: f64,
    /// Messages the schedule called for.
    pub scheduled: usize,
    /// Scheduled but not sent: the member's socket was already gone.
    pub unsent: usize,
    /// Distinct messages the room acknowledged (acks counted at senders).
    pub acked: usize,
    /// Acks that arrived during the sending window, per second of it: what
    /// the room acknowledged per second, not the sender's pace.
    pub acked_per_sec: f64,
    /// Refusals (`error` frames at the senders), by code.
    pub refused: BTreeMap<String, usize>,
    /// Sent, but neither acked nor refused by the time the room went quiet.
    pub unanswered: usize,
    /// Distinct (member, acked message) deliveries counted at receivers.
    pub delivered: usize,
    /// acked × members: what `delivered` must reach.
    pub expected: usize,
    pub lost: usize,
    pub duplicated: usize,
    /// Deliveries of messages that were never acked (the ack was lost or
    /// the refusal was wrong): neither lost nor delivered, but suspicious.
    pub delivered_unacked: usize,
    /// Sockets closed and streams ended by the room before the end.
    pub cut_off: usize,
    /// Scheduled send → the last member received it (acked messages).
    pub latency: Histogram<u64>,
    /// Scheduled send → each delivery, by the kind of connection that got
    /// it ("room ws", "sse", "single socket").
    pub delivery: BTreeMap<&'static str, Histogram<u64>>,
    /// Scheduled send → the sender had its ack.
    pub ack_latency: Histogram<u64>,
    /// Ack at the sender → the row first seen in PostgreSQL.
    pub ack_to_row: Histogram<u64>,
    pub pg: PgCheck,
    /// Origin requests per second during the sending window, by route.
    pub ingest_per_sec: f64,
    pub receipts_per_sec: f64,
    /// Whether the room went quiet before everything was answered,
    /// delivered and persisted (then `unanswered`, `lost` or `missing` say
    /// what was still outstanding).
    pub gave_up_waiting: bool,
    /// 1-minute load average just before the run.
    pub load_1m: f64,
    /// CPU used during the sending window by processes outside the stack
    /// under test (this process, its wrangler and workerd, and the
    /// PostgreSQL backends of its database).
    pub neighbours: Neighbours,
}

/// Counters the readers, the PostgreSQL poller and the driver share.
/// Per-message slots are atomics so that the hot path (thousands of
/// frames a second per reader) takes no lock.
#[derive(Debug)]
pub(super) struct Tally {
    epoch: Instant,
    prefix: String,
    pub(super) total: usize,
    /// When message 0 was due (µs since `epoch`, + 1; 0 until the clock
    /// starts) and the schedule's interval: each delivery's latency.
    start_us: AtomicU64,
    interval_us: f64,
    /// Per message: the latest arrival at any member (µs since `epoch`, + 1;
    /// 0: nobody yet).
    last_arrival: Vec<AtomicU64>,
    receivers: Vec<AtomicU32>,
    /// Per message: when its sender had the ack (µs since `epoch`, + 1).
    ack_at: Vec<AtomicU64>,
    deliveries: AtomicUsize,
    duplicates: AtomicUsize,
    acks: AtomicUsize,
    refused: AtomicUsize,
    refusals: Mutex<BTreeMap<String, usize>>,
    cut_off: AtomicUsize,
    /// Distinct acked-or-not messages the poller has seen in PostgreSQL.
    pub(super) persisted_seen: AtomicUsize,
}

impl Tally {
    fn new(total: usize, tag: &str, interval_us: f64) -> Self {
        let slots = |_| AtomicU64::new(0);
        Self {
            epoch: Instant::now(),
            prefix: format!("{tag}-"),
            total,
            start_us: AtomicU64::new(0),
            interval_us,
            last_arrival: (0..total).map(slots).collect(),
            receivers: (0..total).map(|_| AtomicU32::new(0)).collect(),
            ack_at: (0..total).map(slots).collect(),
            deliveries: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
            acks: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            refusals: Mutex::new(BTreeMap::new()),
            cut_off: AtomicUsize::new(0),
            persisted_seen: AtomicUsize::new(0),
        }
    }

    /// Now, in µs since the epoch, + 1 (so 0 can mean "never").
    pub(super) fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64 + 1
    }

    fn us_of(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64 + 1
    }

    /// The message index of a `client_msg_id` of this scenario.
    pub(super) fn index(&self, key: &str) -> Option<usize> {
        key.strip_prefix(&self.prefix)?
            .parse::<usize>()
            .ok()
            .filter(|k| *k < self.total)
    }

    fn delivered(&self, k: usize, at_us: u64, got: &mut [bool], latency: &mut Histogram<u64>) {
        if got[k] {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        got[k] = true;
        let start = self.start_us.load(Ordering::Relaxed);
        if start > 0 {
            let due = start + (self.interval_us * k as f64) as u64;
            let _ = latency.record(at_us.saturating_sub(due).max(1));
        }
        self.last_arrival[k].fetch_max(at_us, Ordering::Relaxed);
        self.receivers[k].fetch_add(1, Ordering::Relaxed);
        self.deliveries.fetch_add(1, Ordering::Relaxed);
    }

    fn refusal(&self, code: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.refusals.lock() {
            *m.entry(code.to_owned()).or_default() += 1;
        }
    }

    /// (acked, refused, deliveries, persisted): progress, to tell a room
    /// still working from one that went quiet.
    fn progress(&self) -> [usize; 4] {
        [
            self.acks.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.deliveries.load(Ordering::Relaxed),
            self.persisted_seen.load(Ordering::Relaxed),
        ]
    }
}

/// An ack as the sender got it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ack {
    pub k: usize,
    pub seq: i64,
    pub id: Uuid,
}

/// Runs one scenario on `stack` and counts what happened.
pub async fn scenario(stack: &Stack, s: &Scenario, load_1m: f64) -> anyhow::Result<RunResult> {
    anyhow::ensure!(s.ws > 0, "a scenario needs WebSocket members to send");
    let members = s.ws + s.sse + s.single;
    let mut users: Vec<User> = Vec::with_capacity(members);
    for i in 0..members {
        users.push(stack.user(&format!("Bench{i}")).await?);
    }
    let owner = users[0].clone();
    let others: Vec<&User> = users[1..].iter().collect();
    let conv = stack.group(&owner, &others).await?;
    let total = (s.rate * s.duration.as_secs_f64()).round() as usize;
    let interval_us = 1e6 / s.rate;
    let tally = Arc::new(Tally::new(total, &s.tag, interval_us));

    // Readers run until the driver says the run is over (never on a quiet
    // line alone: a stall of seconds must show as latency, not as loss).
    let (done_tx, done_rx) = watch::channel(false);
    let http = reqwest::Client::new();
    let mut sse_readers = Vec::with_capacity(s.sse);
    for user in &users[s.ws..s.ws + s.sse] {
        let res = http
            .get(format!(
                "{}/api/v1/chat/conversations/{conv}/events",
                s.edge
            ))
            .bearer_auth(&user.token)
            .send()
            .await
            .context("open an SSE member")?;
        anyhow::ensure!(res.status().is_success(), "SSE member: {}", res.status());
        sse_readers.push(tokio::spawn(read_sse(
            res,
            tally.clone(),
            done_rx.clone(),
            micros_histogram()?,
        )));
    }
    // Each WebSocket member's writer: the sender loop and the member's own
    // reader (answering the room's backlog probes) share it.
    let mut sinks: Vec<mpsc::UnboundedSender<Message>> = Vec::with_capacity(s.ws);
    let mut writers = Vec::with_capacity(s.ws);
    let mut ws_readers = Vec::with_capacity(s.ws);
    for user in &users[..s.ws] {
        let url = format!(
            "{}/api/v1/chat/conversations/{conv}/ws?token={}",
            s.edge.replacen("http", "ws", 1),
            user.token
        );
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .context("connect a member")?;
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        writers.push(tokio::spawn(write_all(sink, rx)));
        ws_readers.push(tokio::spawn(read_ws(
            stream,
            tx.clone(),
            tally.clone(),
            done_rx.clone(),
            micros_histogram()?,
        )));
        sinks.push(tx);
    }
    // Single-socket members: their object subscribes to the room
    // (`resume` from 0, answered `resumed`) before the clock starts.
    let mut single_readers = Vec::with_capacity(s.single);
    let mut single_writers = Vec::with_capacity(s.single);
    let mut single_sinks = Vec::with_capacity(s.single);
    for user in &users[s.ws + s.sse..] {
        let url = format!(
            "{}/api/v1/chat/ws/{}",
            s.edge.replacen("http", "ws", 1),
            user.token
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .context("connect a single-socket member")?;
        ws.send(Message::text(format!(
            r#"{{"type":"resume","since":{{"{conv}":0}}}}"#
        )))
        .await?;
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(m) = ws.next().await {
                if let Message::Text(t) = m? {
                    if t.contains(r#""type":"resumed""#) {
                        anyhow::ensure!(t.contains(&conv.to_string()), "not resumed: {t}");
                        return Ok(());
                    }
                }
            }
            anyhow::bail!("closed before resumed")
        })
        .await
        .context("a single-socket member's resume")??;
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        single_writers.push(tokio::spawn(write_all(sink, rx)));
        single_readers.push(tokio::spawn(read_ws(
            stream,
            tx.clone(),
            tally.clone(),
            done_rx.clone(),
            micros_histogram()?,
        )));
        single_sinks.push(tx);
    }
    // Let every member settle before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let metrics_url = format!("http://127.0.0.1:{}/metrics", stack.origin_port);
    let counters_before = OriginCounters::read(&http, &metrics_url).await?;
    let poller = tokio::spawn(persisted::poll(
        stack.pool.clone(),
        conv,
        tally.clone(),
        done_rx.clone(),
    ));

    // Open loop: message k is due at start + k / rate whatever happened to
    // the ones before; latency counts from then, so a sender that falls
    // behind shows its own queueing.
    let cpu_before = CpuSample::take();
    let start = Instant::now();
    let start_us = tally.us_of(start);
    tally.start_us.store(start_us, Ordering::Relaxed);
    let mut unsent = 0usize;
    for k in 0..total {
        let due = start + Duration::from_micros((interval_us * k as f64) as u64);
        tokio::time::sleep_until(due.into()).await;
        let frame = format!(
            r#"{{"type":"message","conversation_id":{conv},"content":"bench {k}","client_msg_id":"{}{k}"}}"#,
            tally.prefix
        );
        // A member whose socket is gone (the room cut it off) cannot send:
        // its messages are counted as unsent, not as lost.
        if sinks[k % s.ws].send(Message::text(frame)).is_err() {
            unsent += 1;
        }
    }
    let window_end = start + s.duration;
    tokio::time::sleep_until(window_end.into()).await;
    let counters_after = OriginCounters::read(&http, &metrics_url).await?;
    let cpu_after = CpuSample::take();
    let neighbours = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) => {
            let mut ours = persisted::backends(&stack.pool).await?;
            ours.insert(std::process::id());
            Neighbours::between(&before, &after, &ours)
        }
        _ => Neighbours {
            cpu: f64::NAN,
            top: "unknown (no /proc)".to_owned(),
        },
    };
    let window = counters_after.at.duration_since(counters_before.at);
    let window_end_us = tally.us_of(window_end);

    // Wait for every sent message to be answered and every acked one to
    // reach every member and PostgreSQL, for as long as something still
    // happens.
    let sent = total - unsent;
    let mut last = tally.progress();
    let mut last_change = Instant::now();
    let mut gave_up = false;
    loop {
        let now = tally.progress();
        let [acked, refused, deliveries, persisted] = now;
        if acked + refused >= sent && deliveries >= acked * members && persisted >= acked {
            break;
        }
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        let quiet = if acked + refused >= sent && deliveries >= acked * members {
            PERSIST_QUIET
        } else {
            DRAIN_QUIET
        };
        if last_change.elapsed() > quiet {
            gave_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let _ = done_tx.send(true);
    // Closing the channels closes the sockets once the readers, which hold
    // a sender for their pongs, are done too.
    drop(sinks);
    drop(single_sinks);
    let first_seen = poller.await.context("PostgreSQL poller task")??;
    let mut acks: Vec<Ack> = Vec::new();
    let mut delivery: BTreeMap<&'static str, Histogram<u64>> = BTreeMap::new();
    let mut merge = |kind: &'static str, h: Histogram<u64>| -> anyhow::Result<()> {
        match delivery.get_mut(kind) {
            Some(all) => all.add(&h)?,
            None => {
                delivery.insert(kind, h);
            }
        }
        Ok(())
    };
    for r in ws_readers {
        let (a, h) = r.await.context("reader task")?;
        acks.extend(a);
        merge("room ws", h)?;
    }
    for r in sse_readers {
        merge("sse", r.await.context("SSE reader task")?)?;
    }
    for r in single_readers {
        let (_, h) = r.await.context("single-socket reader task")?;
        merge("single socket", h)?;
    }
    for w in writers.into_iter().chain(single_writers) {
        let _ = w.await;
    }
    let pg = persisted::verify(&stack.pool, conv, &tally, &acks).await?;

    // ---- what happened ------------------------------------------------------
    let mut latency = micros_histogram()?;
    let mut ack_latency = micros_histogram()?;
    let mut ack_to_row = micros_histogram()?;
    let mut acked = 0usize;
    let mut acked_in_window = 0usize;
    let mut delivered = 0usize;
    let mut lost = 0usize;
    let mut delivered_unacked = 0usize;
    for k in 0..total {
        let due_us = start_us + (interval_us * k as f64) as u64;
        let receivers = tally.receivers[k].load(Ordering::Relaxed) as usize;
        let ack_us = tally.ack_at[k].load(Ordering::Relaxed);
        if ack_us == 0 {
            delivered_unacked += receivers;
            continue;
        }
        acked += 1;
        if ack_us <= window_end_us {
            acked_in_window += 1;
        }
        ack_latency.record(ack_us.saturating_sub(due_us).max(1))?;
        delivered += receivers.min(members);
        lost += members.saturating_sub(receivers);
        let last_us = tally.last_arrival[k].load(Ordering::Relaxed);
        if last_us > 0 {
            latency.record(last_us.saturating_sub(due_us).max(1))?;
        }
        // The poll time is when the row was first visible, to within the
        // poll interval; a row may become visible before its ack arrives.
        if let Some(&seen) = first_seen.get(k).filter(|s| **s > 0) {
            ack_to_row.record(seen.saturating_sub(ack_us).max(1))?;
        }
    }
    let refused = tally.refusals.lock().map(|m| m.clone()).unwrap_or_default();
    let refused_total: usize = refused.values().sum();
    let secs = window.as_secs_f64().max(1e-3);
    Ok(RunResult {
        members,
        target_rate: s.rate,
        scheduled: total,
        unsent,
        acked,
        acked_per_sec: acked_in_window as f64 / s.duration.as_secs_f64(),
        unanswered: sent.saturating_sub(acked + refused_total),
        refused,
        delivered,
        expected: acked * members,
        lost,
        duplicated: tally.duplicates.load(Ordering::Relaxed),
        delivered_unacked,
        cut_off: tally.cut_off.load(Ordering::Relaxed),
        latency,
        delivery,
        ack_latency,
        ack_to_row,
        pg,
        ingest_per_sec: counters_after.delta(&counters_before, persisted::INGEST_ROUTE) / secs,
        receipts_per_sec: counters_after.delta(&counters_before, persisted::RECEIPTS_ROUTE) / secs,
        gave_up_waiting: gave_up,
        load_1m,
        neighbours,
    })
}

/// A server frame, as far as the bench cares.
enum Frame {
    Message(usize),
    Ack(Ack),
    Error(String),
    Ping(u64),
    Other,
}

/// Classifies a frame. Message frames (the bulk: one per member per
/// message) take a string fast path, because a full JSON parse of each
/// would spend the cores the room under test needs; anything the fast path
/// does not recognise gets the full parse.
fn classify(tally: &Tally, text: &str) -> Frame {
    if let Some(rest) = text.strip_prefix(r#"{"type":"message","#) {
        // Content cannot hold this pattern: its quotes are escaped.
        if let Some((_, after)) = rest.split_once(r#""client_msg_id":""#) {
            if let Some(end) = after.find('"') {
                return tally
                    .index(&after[..end])
                    .map_or(Frame::Other, Frame::Message);
            }
        }
    }
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return Frame::Other;
    };
    match v["type"].as_str() {
        Some("message") => v["message"]["client_msg_id"]
            .as_str()
            .and_then(|key| tally.index(key))
            .map_or(Frame::Other, Frame::Message),
        Some("ack") => {
            let k = v["client_msg_id"].as_str().and_then(|key| tally.index(key));
            let seq = v["seq"].as_i64();
            let id = v["id"].as_str().and_then(|id| Uuid::parse_str(id).ok());
            match (k, seq, id) {
                (Some(k), Some(seq), Some(id)) => Frame::Ack(Ack { k, seq, id }),
                _ => Frame::Other,
            }
        }
        Some("error") => Frame::Error(v["code"].as_str().unwrap_or("unknown").to_owned()),
        Some("ping") => v["n"].as_u64().map_or(Frame::Other, Frame::Ping),
        _ => Frame::Other,
    }
}

/// Reads an SSE member's stream until the run is over.
async fn read_sse(
    res: reqwest::Response,
    tally: Arc<Tally>,
    mut done: watch::Receiver<bool>,
    mut latency: Histogram<u64>,
) -> Histogram<u64> {
    let mut got = vec![false; tally.total];
    let mut stream = res.bytes_stream();
    let mut buf = String::new();
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            _ = done.wait_for(|d| *d) => break,
        };
        let Some(Ok(chunk)) = next else {
            // The room ended the stream before the run was over.
            if !*done.borrow() {
                tally.cut_off.fetch_add(1, Ordering::Relaxed);
            }
            break;
        };
        let at = tally.now_us();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find('\n') {
            let line: String = buf.drain(..=pos).collect();
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                if let Frame::Message(k) = classify(&tally, data) {
                    tally.delivered(k, at, &mut got, &mut latency);
                }
            }
        }
    }
    latency
}

/// Sends what the member's channel carries until it closes, then closes
/// the socket.
async fn write_all(mut sink: SplitSink<Socket, Message>, mut rx: mpsc::UnboundedReceiver<Message>) {
    while let Some(m) = rx.recv().await {
        if sink.send(m).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

/// Reads a WebSocket member until the run is over, answering the room's
/// backlog probes as every well-behaved client does (docs/PROTOCOL.md,
/// "Slow readers"), and counting deliveries, acks and refusals. Returns
/// the acks this member got for its own messages, and its deliveries'
/// latencies.
async fn read_ws(
    mut stream: SplitStream<Socket>,
    pongs: mpsc::UnboundedSender<Message>,
    tally: Arc<Tally>,
    mut done: watch::Receiver<bool>,
    mut latency: Histogram<u64>,
) -> (Vec<Ack>, Histogram<u64>) {
    let mut got = vec![false; tally.total];
    let mut acked = vec![false; tally.total];
    let mut acks = Vec::new();
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            _ = done.wait_for(|d| *d) => break,
        };
        let Some(Ok(msg)) = next else {
            // The room closed the socket before the run was over.
            if !*done.borrow() {
                tally.cut_off.fetch_add(1, Ordering::Relaxed);
            }
            break;
        };
        let at = tally.now_us();
        let text = match msg {
            Message::Text(text) => text,
            Message::Close(_) => {
                if !*done.borrow() {
                    tally.cut_off.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
            _ => continue,
        };
        match classify(&tally, &text) {
            Frame::Message(k) => tally.delivered(k, at, &mut got, &mut latency),
            Frame::Ack(ack) => {
                // An ack repeated for the same key (a resend's) is not a
                // second message.
                if !acked[ack.k] {
                    acked[ack.k] = true;
                    tally.ack_at[ack.k].store(at, Ordering::Relaxed);
                    tally.acks.fetch_add(1, Ordering::Relaxed);
                    acks.push(ack);
                }
            }
            Frame::Error(code) => tally.refusal(&code),
            Frame::Ping(n) => {
                let _ = pongs.send(Message::text(format!(r#"{{"type":"pong","n":{n}}}"#)));
            }
            Frame::Other => {}
        }
    }
    (acks, latency)
}
