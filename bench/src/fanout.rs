//! `cargo xtask bench fanout`: one room under `wrangler dev`, real
//! WebSocket clients.
//!
//! 1. **Fan-out**: N WebSocket members and M Server-Sent Events members in
//!    one room; messages are sent at a fixed rate (open loop) from the
//!    WebSocket members in turn. Latency is from the send
//!    to the moment the *last* member (the sender's own echo included)
//!    received the message. Every delivery is accounted for: lost and
//!    duplicated deliveries are counted, never assumed.
//! 2. **Throughput and knee**: 10 members, rising rates, 10 s each. The
//!    knee is the first rate where the room falls behind (achieved rate
//!    under 95 % of the target), loses anything, or p99 passes 5× the p99
//!    of the gentlest rate.
//!
//! The stack is the e2e harness's: PostgreSQL, the origin and a real
//! `wrangler dev` on free ports. Rate limits are raised for the bench (the
//! product's per-user bucket would rightly stop one user sending 200/s).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use e2e::{Stack, StackOptions, User};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::report::{micros_histogram, ms, table};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One scenario's result.
#[derive(Debug)]
pub struct RunResult {
    pub members: usize,
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub sent: usize,
    pub latency: Histogram<u64>,
    pub lost: usize,
    pub duplicated: usize,
    /// `error` frames the room sent (rate limit, backpressure…), by code.
    pub errors: HashMap<String, usize>,
}

pub async fn run() -> anyhow::Result<()> {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let stack = Stack::start(StackOptions {
        vars: vec![
            ("ROOM_RATE_BURST".to_owned(), "1000000".to_owned()),
            ("ROOM_RATE_PER_SEC".to_owned(), "1000000".to_owned()),
        ],
        verbose: false,
        ..StackOptions::default()
    })
    .await?;
    println!("stack up: edge {}", stack.edge);

    // ---- fan-out at the design point ---------------------------------------
    let members = 50;
    let sse = 10;
    let rate = 20.0;
    println!("fan-out: {members} WS + {sse} SSE members, {rate} msg/s for {seconds} s…");
    let result = scenario(
        &stack,
        members,
        sse,
        rate,
        Duration::from_secs(seconds),
        "fan",
    )
    .await?;
    table(
        &format!(
            "Fan-out: one room, {members} WebSocket + {sse} SSE members, {rate} msg/s for {seconds} s"
        ),
        &[
            "members",
            "msgs sent",
            "deliveries",
            "p50 ms",
            "p99 ms",
            "max ms",
            "lost",
            "duplicated",
            "errors",
        ],
        &[row_fanout(&result)],
    );

    // ---- throughput and knee ------------------------------------------------
    let mut rows = Vec::new();
    let mut baseline_p99 = None;
    let mut knee = None;
    for target in [250.0, 500.0, 1_000.0, 1_500.0, 2_000.0, 3_000.0] {
        println!("throughput: 10 members at {target} msg/s…");
        let r = scenario(
            &stack,
            10,
            0,
            target,
            Duration::from_secs(10),
            &format!("tp{target}"),
        )
        .await?;
        let p99 = r.latency.value_at_quantile(0.99);
        let base = *baseline_p99.get_or_insert(p99.max(1));
        let behind = r.achieved_rate < 0.95 * target;
        if knee.is_none() && (behind || r.lost > 0 || p99 > 5 * base) {
            knee = Some(target);
        }
        rows.push(vec![
            format!("{target:.0}"),
            format!("{:.0}", r.achieved_rate),
            ms(r.latency.value_at_quantile(0.5)),
            ms(p99),
            ms(r.latency.max()),
            r.lost.to_string(),
            r.duplicated.to_string(),
            errors_cell(&r.errors),
        ]);
    }
    table(
        "Throughput: one room, 10 WebSocket members, 10 s per rate",
        &[
            "target msg/s",
            "achieved msg/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "lost",
            "duplicated",
            "errors",
        ],
        &rows,
    );
    match knee {
        Some(k) => println!("\nknee: {k:.0} msg/s (first rate where latency or loss jumps)"),
        None => println!("\nknee: not reached up to 3000 msg/s"),
    }
    Ok(())
}

fn errors_cell(errors: &HashMap<String, usize>) -> String {
    if errors.is_empty() {
        return "0".to_owned();
    }
    let mut parts: Vec<String> = errors.iter().map(|(c, n)| format!("{c}: {n}")).collect();
    parts.sort();
    parts.join(", ")
}

fn row_fanout(r: &RunResult) -> Vec<String> {
    vec![
        r.members.to_string(),
        r.sent.to_string(),
        (r.sent * r.members).to_string(),
        ms(r.latency.value_at_quantile(0.5)),
        ms(r.latency.value_at_quantile(0.99)),
        ms(r.latency.max()),
        r.lost.to_string(),
        r.duplicated.to_string(),
        errors_cell(&r.errors),
    ]
}

/// `members` WebSocket users and `sse_members` SSE users in a fresh
/// group; `rate` msg/s for `duration`, sent by the WebSocket members.
pub async fn scenario(
    stack: &Stack,
    members: usize,
    sse_members: usize,
    rate: f64,
    duration: Duration,
    tag: &str,
) -> anyhow::Result<RunResult> {
    let mut users: Vec<User> = Vec::with_capacity(members + sse_members);
    for i in 0..members + sse_members {
        users.push(stack.user(&format!("Bench{i}")).await?);
    }
    let owner = users[0].clone();
    let others: Vec<&User> = users[1..].iter().collect();
    let conv = stack.group(&owner, &others).await?;

    // Each WebSocket member's writer: the sender loop and the member's own
    // reader (answering the room's backlog probes) share it.
    let mut sinks: Vec<mpsc::UnboundedSender<Message>> = Vec::with_capacity(members);
    let mut writers = Vec::with_capacity(members);
    let mut readers = Vec::with_capacity(members + sse_members);
    let http = reqwest::Client::new();
    // SSE streams never end by themselves (heartbeats); readers stop when
    // the run is over.
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    for user in &users[members..] {
        let res = http
            .get(format!(
                "{}/api/v1/chat/conversations/{conv}/events",
                stack.edge
            ))
            .bearer_auth(&user.token)
            .send()
            .await
            .context("open an SSE member")?;
        anyhow::ensure!(res.status().is_success(), "SSE member: {}", res.status());
        readers.push(tokio::spawn(read_sse(res, done_rx.clone())));
    }
    for user in &users[..members] {
        let url = format!(
            "{}/api/v1/chat/conversations/{conv}/ws?token={}",
            stack.edge.replacen("http", "ws", 1),
            user.token
        );
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .context("connect a member")?;
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        writers.push(tokio::spawn(write_all(sink, rx)));
        readers.push(tokio::spawn(read_all(stream, tx.clone())));
        sinks.push(tx);
    }
    // Let every member settle before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let total = (rate * duration.as_secs_f64()).round() as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut sent_at: Vec<Instant> = Vec::with_capacity(total);
    let mut send_failures: HashMap<String, usize> = HashMap::new();
    let start = Instant::now();
    for k in 0..total {
        let due = start + interval.mul_f64(k as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        let frame = serde_json::json!({
            "type": "message",
            "conversation_id": conv,
            "content": format!("bench {k}"),
            "client_msg_id": format!("{tag}-{k}"),
        })
        .to_string();
        sent_at.push(Instant::now());
        // A member whose socket was closed (the room cut it off) counts
        // as an error, and its share of the messages as lost.
        if sinks[k % members].send(Message::text(frame)).is_err() {
            *send_failures.entry("socket closed".to_owned()).or_default() += 1;
        }
    }
    let elapsed = start.elapsed();
    // Stragglers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Closing the channels closes the sockets (once the readers, which
    // hold a sender for their pongs, are done too).
    drop(sinks);
    let _ = done_tx.send(true);
    let members = members + sse_members;
    let mut latest: Vec<Option<Instant>> = vec![None; total];
    let mut received = 0usize;
    let mut duplicated = 0usize;
    let mut errors = send_failures;
    for reader in readers {
        let seen = reader.await.context("reader task")?;
        for (code, n) in seen.errors {
            *errors.entry(code).or_default() += n;
        }
        for (k, (at, copies)) in seen.messages {
            if k >= total {
                continue;
            }
            received += 1;
            duplicated += copies - 1;
            latest[k] = Some(latest[k].map_or(at, |l| l.max(at)));
        }
    }
    let mut latency = micros_histogram()?;
    for (k, at) in latest.iter().enumerate() {
        if let Some(at) = at {
            let us = at.saturating_duration_since(sent_at[k]).as_micros() as u64;
            latency.record(us.max(1))?;
        }
    }
    Ok(RunResult {
        members,
        target_rate: rate,
        achieved_rate: total as f64 / elapsed.as_secs_f64(),
        sent: total,
        latency,
        lost: total * members - received,
        duplicated,
        errors,
    })
}

/// What one member's socket saw.
#[derive(Debug, Default)]
struct Seen {
    /// Message index → (first arrival, copies).
    messages: HashMap<usize, (Instant, usize)>,
    errors: HashMap<String, usize>,
}

/// Reads an SSE member's stream until the run is `done`.
async fn read_sse(res: reqwest::Response, mut done: tokio::sync::watch::Receiver<bool>) -> Seen {
    let mut seen = Seen::default();
    let mut stream = res.bytes_stream();
    let mut buf = String::new();
    loop {
        let chunk = tokio::select! {
            next = stream.next() => match next {
                Some(Ok(c)) => c,
                _ => break,
            },
            _ = done.wait_for(|d| *d) => break,
        };
        let at = Instant::now();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find('\n') {
            let line: String = buf.drain(..=pos).collect();
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                record(&mut seen, data, at);
            }
        }
    }
    seen
}

/// The `n` of a `{"type":"ping","n":…}` probe.
fn probe(text: &str) -> Option<u64> {
    if !text.contains("\"ping\"") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    (v["type"] == "ping").then(|| v["n"].as_u64()).flatten()
}

/// Accounts one frame's JSON.
fn record(seen: &mut Seen, text: &str, at: Instant) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    if v["type"] == "error" {
        let code = v["code"].as_str().unwrap_or("unknown").to_owned();
        *seen.errors.entry(code).or_default() += 1;
        return;
    }
    if v["type"] != "message" {
        return;
    }
    let Some(k) = v["message"]["client_msg_id"]
        .as_str()
        .and_then(|key| key.rsplit('-').next())
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return;
    };
    seen.messages
        .entry(k)
        .and_modify(|e| e.1 += 1)
        .or_insert((at, 1));
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

/// Reads until the socket closes (or goes quiet for 30 s), answering the
/// room's backlog probes as every well-behaved client does.
async fn read_all(mut stream: SplitStream<Socket>, pongs: mpsc::UnboundedSender<Message>) -> Seen {
    let mut seen = Seen::default();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(3), stream.next()).await;
        let msg = match next {
            Ok(Some(Ok(m))) => m,
            _ => break,
        };
        let Message::Text(text) = msg else {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            continue;
        };
        if let Some(n) = probe(&text) {
            let _ = pongs.send(Message::text(format!(r#"{{"type":"pong","n":{n}}}"#)));
            continue;
        }
        record(&mut seen, &text, Instant::now());
    }
    seen
}
