//! The edge runtime killed with SIGKILL while clients are sending, and
//! started again on the same on-disk state: the paths production hits when
//! a machine dies or an isolate is evicted mid-write.
//!
//! Clients behave as the ChatBox does: they reconnect with `since` (or
//! `Last-Event-ID`) and resend every message not yet acknowledged, with the
//! same `client_msg_id`. At the end PostgreSQL must hold every message
//! exactly once with contiguous seqs, every acknowledged message with the
//! id its ack named, every client must have seen each message once, and
//! presence must converge (nobody online forever).
//!
//! `RESTART_ROUNDS` (default 2) and `RESTART_SEND_MS` (default 2,000 ms of
//! sending between kills) make a longer run for the figures in the docs.

#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use e2e::runner::{TestFn, start_and_run};
use e2e::{Event, Stack, User};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[tokio::main]
async fn main() -> ExitCode {
    // The Worker's settings for this suite.
    let vars: &[(&str, &str)] = &[
        // Senders here are machines, not people.
        ("ROOM_RATE_PER_SEC", "1000"),
        ("ROOM_RATE_BURST", "1000"),
        ("ROOM_BACKOFF_MAX_MS", "1000"),
        ("PRESENCE_GRACE_MS", "1500"),
        ("PRESENCE_WATCHDOG_MS", "2000"),
        // As in a deployment: no demo logins.
        ("DEMO_LOGINS", ""),
    ];
    let tests: &[(&str, TestFn)] = &[
        ("without_demo_logins_the_demo_route_is_a_typed_404", |s| {
            Box::pin(without_demo_logins_the_demo_route_is_a_typed_404(s))
        }),
        (
            "killing_the_runtime_while_clients_send_loses_nothing_and_duplicates_nothing",
            |s| {
                Box::pin(
                    killing_the_runtime_while_clients_send_loses_nothing_and_duplicates_nothing(s),
                )
            },
        ),
        (
            "after_a_kill_presence_converges_and_nobody_stays_online",
            |s| Box::pin(after_a_kill_presence_converges_and_nobody_stays_online(s)),
        ),
        (
            "after_a_kill_a_user_nobody_pokes_goes_offline_by_their_own_alarm",
            |s| Box::pin(after_a_kill_a_user_nobody_pokes_goes_offline_by_their_own_alarm(s)),
        ),
        (
            "after_a_kill_the_single_socket_resumes_without_a_gap_and_is_live_again",
            |s| Box::pin(after_a_kill_the_single_socket_resumes_without_a_gap_and_is_live_again(s)),
        ),
        (
            "an_upload_outlives_a_kill_of_the_runtime_and_is_sent_and_processed_after_it",
            |s| {
                Box::pin(
                    an_upload_outlives_a_kill_of_the_runtime_and_is_sent_and_processed_after_it(s),
                )
            },
        ),
        (
            "changes_outlive_a_kill_and_reach_postgres_when_the_origin_returns",
            |s| Box::pin(changes_outlive_a_kill_and_reach_postgres_when_the_origin_returns(s)),
        ),
        (
            "a_reader_that_never_reads_is_cut_off_and_the_others_get_everything",
            |s| Box::pin(a_reader_that_never_reads_is_cut_off_and_the_others_get_everything(s)),
        ),
    ];
    start_and_run(vars, tests, Duration::from_secs(900)).await
}

/// A deployment does not set `DEMO_LOGINS` (wrangler.toml never does):
/// the route answers the edge's usual typed 404, and no password shows.
async fn without_demo_logins_the_demo_route_is_a_typed_404(s: &mut Stack) -> anyhow::Result<()> {
    let (status, body) = s
        .call(None, reqwest::Method::GET, "/api/v1/edge/demo", None)
        .await?;
    ensure!(
        status == 404 && body["code"] == "not_found",
        "{status} {body}"
    );
    ensure!(body.get("password").is_none(), "{body}");
    Ok(())
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one client did and saw.
#[derive(Debug, Default)]
struct Log {
    /// Keys in the order they were first sent, with their content.
    sent: Vec<String>,
    /// key → (seq, id) from its first ack.
    acked: HashMap<String, (i64, String)>,
    /// Every message seq delivered to this client, in arrival order.
    received: Vec<i64>,
    /// Acks that named a different (seq, id) than the first ack of a key.
    conflicting_acks: Vec<String>,
    connects: usize,
    /// Messages sent again after a reconnect because no ack had come.
    resent: usize,
}

impl Log {
    fn since(&self) -> i64 {
        // The client holds a contiguous prefix (replay is in order). A
        // first connection says 0 too: the others may already be sending
        // while it connects, and without `since` it would get only what
        // comes after it joined.
        self.received.iter().copied().max().unwrap_or(0)
    }

    fn unacked(&self) -> Vec<String> {
        self.sent
            .iter()
            .filter(|k| !self.acked.contains_key(*k))
            .cloned()
            .collect()
    }
}

/// A client that keeps a WebSocket open to the room whatever happens,
/// sends a message every `every` while `sending` is set, and resends what
/// was not acknowledged after each reconnect.
/// Who a client is and how fast it sends.
struct ClientSpec {
    edge: String,
    user: User,
    conversation: i64,
    name: &'static str,
    every: Duration,
}

async fn client(
    spec: ClientSpec,
    sending: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
) {
    let ClientSpec {
        edge: stack_edge,
        user,
        conversation,
        name,
        every,
    } = spec;
    let mut next_key = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let since = log.lock().await.since();
        let mut url = format!(
            "{}/api/v1/chat/conversations/{conversation}/ws?token={}",
            stack_edge.replacen("http", "ws", 1),
            user.token
        );
        url.push_str(&format!("&since={since}"));
        let Ok((ws, _)) = tokio_tungstenite::connect_async(url).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let (mut tx, mut rx) = ws.split();
        use futures::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        let frame = |key: &str| {
            Message::text(
                json!({"type": "message", "conversation_id": conversation,
                       "content": format!("{name} says {key}"), "client_msg_id": key})
                .to_string(),
            )
        };
        let resend = {
            let mut l = log.lock().await;
            l.connects += 1;
            let unacked = l.unacked();
            l.resent += unacked.len();
            unacked
        };
        let mut alive = true;
        for key in resend {
            if tx.send(frame(&key)).await.is_err() {
                alive = false;
                break;
            }
        }
        let mut tick = tokio::time::interval(every);
        while alive && !stop.load(Ordering::SeqCst) {
            tokio::select! {
                _ = tick.tick() => {
                    if sending.load(Ordering::SeqCst) {
                        next_key += 1;
                        let key = format!("{name}-{next_key}");
                        log.lock().await.sent.push(key.clone());
                        if tx.send(frame(&key)).await.is_err() {
                            alive = false;
                        }
                    }
                }
                msg = rx.next() => {
                    let Some(Ok(Message::Text(text))) = msg else {
                        if matches!(msg, Some(Ok(_))) { continue; }
                        alive = false;
                        continue;
                    };
                    let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                    let mut l = log.lock().await;
                    match v["type"].as_str() {
                        Some("message") => {
                            if let Some(seq) = v["message"]["seq"].as_i64() {
                                l.received.push(seq);
                            }
                        }
                        Some("ack") => {
                            let key = v["client_msg_id"].as_str().unwrap_or_default().to_owned();
                            let got = (
                                v["seq"].as_i64().unwrap_or(-1),
                                v["id"].as_str().unwrap_or_default().to_owned(),
                            );
                            match l.acked.get(&key) {
                                Some(first) if *first != got => l.conflicting_acks.push(key),
                                Some(_) => {}
                                None => {
                                    l.acked.insert(key, got);
                                }
                            }
                        }
                        Some("ping") => {
                            let n = v["n"].as_u64().unwrap_or(0);
                            drop(l);
                            let pong = json!({"type": "pong", "n": n}).to_string();
                            if tx.send(Message::text(pong)).await.is_err() {
                                alive = false;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

pub async fn killing_the_runtime_while_clients_send_loses_nothing_and_duplicates_nothing(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let rounds = env_number("RESTART_ROUNDS", 2);
    let send_ms = env_number("RESTART_SEND_MS", 2_000);
    let (alex, sam, conv) = s.pair().await?;
    let sending = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));
    let logs: Vec<Arc<Mutex<Log>>> = (0..3)
        .map(|_| Arc::new(Mutex::new(Log::default())))
        .collect();
    // Alex on two devices and Sam: three senders, ~120 messages/s together.
    let clients = [
        (alex.clone(), "alex-phone"),
        (alex.clone(), "alex-laptop"),
        (sam.clone(), "sam"),
    ];
    let mut tasks = Vec::new();
    for ((user, name), log) in clients.into_iter().zip(&logs) {
        tasks.push(tokio::spawn(client(
            ClientSpec {
                edge: s.edge.clone(),
                user,
                conversation: conv,
                name,
                every: Duration::from_millis(25),
            },
            sending.clone(),
            stop.clone(),
            log.clone(),
        )));
    }
    let started = Instant::now();
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(send_ms)).await;
        s.kill_edge();
        println!(
            "    round {}: runtime killed at {:.1}s",
            round + 1,
            started.elapsed().as_secs_f64()
        );
        // Clients keep trying (and queueing) while the edge is down.
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.start_edge().await?;
        println!(
            "    round {}: runtime back at {:.1}s",
            round + 1,
            started.elapsed().as_secs_f64()
        );
    }
    tokio::time::sleep(Duration::from_millis(send_ms)).await;
    sending.store(false, Ordering::SeqCst);

    // Settle: every key acknowledged (clients resend on each reconnect).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut pending = 0;
        for log in &logs {
            pending += log.lock().await.unacked().len();
        }
        if pending == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{pending} messages never acknowledged");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut all_keys: BTreeSet<String> = BTreeSet::new();
    let mut acked: BTreeMap<String, (i64, String)> = BTreeMap::new();
    for log in &logs {
        let l = log.lock().await;
        ensure!(
            l.conflicting_acks.is_empty(),
            "a resend got a different original: {:?}",
            l.conflicting_acks
        );
        all_keys.extend(l.sent.iter().cloned());
        acked.extend(l.acked.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let n = all_keys.len();
    // Every client catches up to the last seq.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut behind = 0;
        for log in &logs {
            if log.lock().await.received.len() < n {
                behind += 1;
            }
        }
        if behind == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }

    // PostgreSQL: everything, once, in order, with the ids the acks named.
    let client = s.pool.get().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = client
            .query(
                "SELECT seq, id::text, client_msg_id FROM messages
                 WHERE conversation_id = $1 ORDER BY seq",
                &[&conv],
            )
            .await?;
        if rows.len() >= n || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let stored: Vec<(i64, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let seqs: Vec<i64> = stored.iter().map(|r| r.0).collect();
    ensure!(
        seqs == (1..=n as i64).collect::<Vec<_>>(),
        "PostgreSQL holds {} messages for {n} sent, seqs not 1..={n}",
        seqs.len()
    );
    let stored_keys: BTreeSet<String> = stored.iter().map(|r| r.2.clone()).collect();
    ensure!(
        stored_keys == all_keys,
        "PostgreSQL's keys differ from the keys sent"
    );
    for (seq, id, key) in &stored {
        let ack = acked
            .get(key)
            .context("every stored message was acknowledged")?;
        ensure!(
            ack == &(*seq, id.clone()),
            "{key}: acked as {ack:?}, stored as ({seq}, {id})"
        );
    }
    // Every client saw each message once, in order, and all of them.
    for (i, log) in logs.iter().enumerate() {
        let l = log.lock().await;
        let mut seen = BTreeSet::new();
        for seq in &l.received {
            ensure!(seen.insert(*seq), "client {i} got seq {seq} twice");
        }
        let missing: Vec<i64> = (1..=n as i64).filter(|s| !seen.contains(s)).collect();
        ensure!(
            missing.is_empty(),
            "client {i} saw {} of {n} messages; missing seqs {missing:?} ({} connections; last seqs received {:?})",
            seen.len(),
            l.connects,
            &l.received[l.received.len().saturating_sub(5)..]
        );
        println!(
            "    client {i}: {} sent, {} resent after a reconnect, {} received, {} connections",
            l.sent.len(),
            l.resent,
            l.received.len(),
            l.connects
        );
    }
    println!(
        "    {n} messages, {rounds} kills in {:.1}s: all in PostgreSQL once, seq 1..={n}, 0 duplicates, 0 lost",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub async fn after_a_kill_presence_converges_and_nobody_stays_online(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, _conv) = s.pair().await?;
    let mut a = s.always_on(&alex).await?;
    let mut b = s.always_on(&sam).await?;
    a.expect("presence_snapshot").await?;
    b.expect("presence_snapshot").await?;
    wait_presence(s, &alex, sam.id, true).await?;
    wait_presence(s, &sam, alex.id, true).await?;
    s.kill_edge();
    drop(a);
    drop(b);
    s.start_edge().await?;
    // Alex comes back; Sam never does. Sam's object still believes Sam
    // online (its report survived the kill); woken by Alex's object (or by
    // its own watchdog alarm), it finds no connection, runs a fresh grace
    // period, and tells Alex when it runs out.
    let mut a = s.always_on(&alex).await?;
    a.expect("presence_snapshot").await?;
    a.expect_where("Sam going offline", |f| {
        f["type"] == "presence" && f["user_id"] == sam.id && f["is_online"] == false
    })
    .await?;
    wait_presence(s, &alex, sam.id, false).await?;
    wait_presence(s, &sam, alex.id, true).await?;
    if let Some(Event::Closed(c)) = a.next_within(Duration::from_millis(100)).await? {
        bail!("the new always-on socket closed: {c:?}");
    }
    Ok(())
}

/// Sam is online with no contact online; the runtime dies. Nobody ever
/// connects again or tells Sam's object anything: its own watchdog alarm
/// (2 s here, 60 s in production) wakes the new instance, which finds no
/// connection, runs the grace period and reports Sam offline.
pub async fn after_a_kill_a_user_nobody_pokes_goes_offline_by_their_own_alarm(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let sam = s.user("Loner").await?;
    let viewer = s.user("Viewer").await?;
    let mut b = s.always_on(&sam).await?;
    b.expect("presence_snapshot").await?;
    wait_presence(s, &viewer, sam.id, true).await?;
    s.kill_edge();
    drop(b);
    s.start_edge().await?;
    wait_presence(s, &viewer, sam.id, false).await?;
    Ok(())
}

/// Polls REST until `viewer` sees `user`'s presence as `online`.
async fn wait_presence(s: &Stack, viewer: &User, user: i64, online: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (is_online, _) = s.presence(viewer, user).await?;
        if is_online == online {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "user {user} still {} after 30 s",
                if is_online { "online" } else { "offline" }
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Big messages from Alex, fast (this binary's rate limit is for machines).
async fn flood(s: &Stack, alex: &User, conv: i64, n: usize) -> anyhow::Result<()> {
    let mut a = s.ws(alex, conv, None).await?;
    let filler = "x".repeat(3_500);
    for i in 0..n {
        a.say(conv, &format!("{i} {filler}"), &format!("big-{i}"))
            .await?;
        if i % 50 == 49 {
            a.expect_where("an ack", |f| {
                f["type"] == "ack" && f["client_msg_id"] == format!("big-{i}")
            })
            .await?;
        }
    }
    Ok(())
}

/// The Room's subscriptions and the User objects' records of them live in
/// SQLite: after the runtime dies, a message sent before the member comes
/// back reaches them through `resume`, and live frames flow again without
/// anyone subscribing by hand.
pub async fn after_a_kill_the_single_socket_resumes_without_a_gap_and_is_live_again(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.seed_socket(&alex).await?;
    let mut b = s.seed_socket(&sam).await?;
    for ws in [&mut a, &mut b] {
        ws.send(json!({"type": "resume", "since": {conv.to_string(): 0}}))
            .await?;
        ensure!(ws.expect("resumed").await?["conversations"] == json!([conv]));
    }
    for i in 1..=2 {
        a.say(conv, &format!("m{i}"), &format!("k{i}")).await?;
        ensure!(a.expect("ack").await?["seq"] == i);
    }
    ensure!(b.messages_up_to(conv, 2).await? == [1, 2]);
    s.kill_edge();
    drop(a);
    drop(b);
    s.start_edge().await?;
    // Alex is back first and sends while Sam is still away.
    let mut a = s.seed_socket(&alex).await?;
    a.say(conv, "m3", "k3").await?;
    ensure!(a.expect("ack").await?["seq"] == 3);
    let mut b = s.seed_socket(&sam).await?;
    b.send(json!({"type": "resume", "since": {conv.to_string(): 2}}))
        .await?;
    ensure!(b.messages_up_to(conv, 3).await? == [3], "the gap, once");
    ensure!(b.expect("resumed").await?["conversations"] == json!([conv]));
    a.say(conv, "m4", "k4").await?;
    ensure!(a.expect("ack").await?["seq"] == 4);
    ensure!(b.messages_up_to(conv, 4).await? == [4], "live again");
    let late: Vec<Value> = b
        .drain(Duration::from_millis(600))
        .await?
        .into_iter()
        .filter(|f| f["type"] == "message")
        .collect();
    ensure!(late.is_empty(), "nothing twice: {late:?}");
    Ok(())
}

pub async fn a_reader_that_never_reads_is_cut_off_and_the_others_get_everything(
    s: &mut Stack,
) -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::Message;
    let (alex, sam, conv) = s.pair().await?;
    // Straight at the runtime: wrangler's dev proxy in between would
    // buffer for the slow readers and hide them from the room.
    let runtime = s.runtime_url().await?;
    let rss_before = s.workerd_rss_kib()?;
    let ws_url = format!(
        "{}/api/v1/chat/conversations/{conv}/ws?token={}",
        runtime.replacen("http", "ws", 1),
        sam.token
    );
    let (mut stalled_ws, _) = tokio_tungstenite::connect_async(ws_url).await?;
    let stalled_sse = s
        .http()
        .get(format!(
            "{runtime}/api/v1/chat/conversations/{conv}/events?token={}",
            sam.token
        ))
        .send()
        .await?;
    ensure!(
        stalled_sse.status().as_u16() == 200,
        "{}",
        stalled_sse.status()
    );
    // A healthy reader (it answers the probes) beside them.
    let mut healthy = s.ws(&sam, conv, None).await?;
    let n = 2_000; // ~7.4 MB to each reader, past the 4 MiB bound
    let sender = flood(s, &alex, conv, n);
    let reader = async {
        let mut seqs = BTreeSet::new();
        while seqs.len() < n {
            let f = healthy.expect("message").await?;
            seqs.insert(f["message"]["seq"].as_i64().unwrap_or(-1));
        }
        anyhow::Ok(seqs)
    };
    let (sent, seqs) = tokio::join!(sender, reader);
    sent?;
    let seqs = seqs?;
    ensure!(
        seqs == (1..=n as i64).collect::<BTreeSet<_>>(),
        "the healthy reader has every message"
    );
    let rss_after = s.workerd_rss_kib()?;
    // The stalled socket: what was queued, then the close the room sent
    // when it stopped trusting the reader.
    let mut frames = 0usize;
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(20), stalled_ws.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => frames += 1,
            Ok(Some(Ok(Message::Close(c)))) => break c,
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => bail!("the stalled socket failed instead of closing: {e}"),
            Ok(None) => bail!("the stalled socket ended without a close frame"),
            Err(_) => bail!("the stalled socket was never closed ({frames} frames queued)"),
        }
    };
    let closed = closed.context("a close frame with a code")?;
    ensure!(
        u16::from(closed.code) == 1008 && closed.reason.contains("slow"),
        "{closed:?}"
    );
    ensure!(
        frames < n,
        "it was cut off before everything was sent ({frames} of {n})"
    );
    // The stalled stream: whatever was buffered, then its end.
    let mut body = stalled_sse.bytes_stream();
    let mut bytes = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), body.next()).await {
            Ok(Some(Ok(chunk))) => bytes += chunk.len(),
            Ok(Some(Err(_))) | Ok(None) => break,
            Err(_) => bail!("the stalled SSE stream never ended ({bytes} bytes read)"),
        }
    }
    println!(
        "    stalled socket: closed after {frames} of {n} frames; stalled stream: ended after {} KiB; \
         workerd RSS {} MiB before, {} MiB after",
        bytes / 1024,
        rss_before / 1024,
        rss_after / 1024
    );
    Ok(())
}

/// An upload is in R2 and registered with its room; the runtime dies
/// before it is sent (and while the origin may be fetching it to make the
/// thumbnail). After the restart its uploader can still send it (the
/// registration is in the room's SQLite), the origin's processing gets
/// through (it retries the edge), and the other member gets a photo that
/// downloads.
async fn an_upload_outlives_a_kill_of_the_runtime_and_is_sent_and_processed_after_it(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let alex = s.user("Alex").await?;
    let sam = s.user("Sam").await?;
    let conv = s.direct(&alex, &sam).await?;
    let photo = e2e::media::photo_with_location(800, 600)?;
    let (status, up) = e2e::media::upload(s, &alex, conv, photo, "image/jpeg", "").await?;
    ensure!(status == 201, "{status} {up}");
    let id = up["id"].as_str().context("id")?.to_owned();
    s.kill_edge();
    s.start_edge().await?;

    let mut a = s.ws(&alex, conv, None).await?;
    a.send(
        json!({"type": "message", "conversation_id": conv, "content": "after the crash",
                  "client_msg_id": "after-kill", "attachment_ids": [id]}),
    )
    .await?;
    let ack = a.expect("ack").await?;
    ensure!(ack["client_msg_id"] == "after-kill", "{ack}");

    // The origin's retries reach the edge again (2 s, 4 s, … apart).
    let deadline = Instant::now() + Duration::from_secs(90);
    let url = loop {
        let (status, page) = s
            .call(
                Some(&sam),
                reqwest::Method::GET,
                &format!("/api/v1/chat/conversations/{conv}/messages"),
                None,
            )
            .await?;
        ensure!(status == 200, "{status} {page}");
        let att = &page["messages"][0]["attachments"][0];
        if att["status"] == "ready" {
            break att["url"].as_str().context("url")?.to_owned();
        }
        ensure!(att["status"] != "failed", "processing failed: {att}");
        ensure!(Instant::now() < deadline, "never processed: {page}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let res = s.http().get(format!("{}{url}", s.edge)).send().await?;
    ensure!(res.status() == 200, "{}", res.status());
    let bytes = res.bytes().await?;
    ensure!(!e2e::media::contains(&bytes, e2e::media::GPS_MARKER));
    a.close().await?;
    Ok(())
}

/// Changes made while the origin is down live in the room's outbox; a kill
/// of the runtime then rebuilds the room from its SQLite with every
/// message in its current state (edited, reacted to, quoted), a change
/// after the restart still knows the old state, and once the origin is
/// back PostgreSQL holds the end state once.
async fn changes_outlive_a_kill_and_reach_postgres_when_the_origin_returns(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let alex = s.user("Alex").await?;
    let sam = s.user("Sam").await?;
    let conv = s.direct(&alex, &sam).await?;
    let mut a = s.ws(&alex, conv, None).await?;
    a.say(conv, "leg day", "c1").await?;
    let ack = a.expect("ack").await?;
    let id = ack["id"].as_str().context("id")?.to_owned();
    s.wait_stored(conv, 1, Duration::from_secs(15)).await?;

    s.stop_origin();
    a.send(
        json!({"type": "edit", "conversation_id": conv, "message_id": id,
                  "content": "leg day: squats", "client_msg_id": "c1-edit"}),
    )
    .await?;
    a.expect("ack").await?;
    let react = format!("/api/v1/chat/conversations/{conv}/messages/{id}/reactions/%F0%9F%94%A5");
    let (status, body) = s
        .call(Some(&sam), reqwest::Method::PUT, &react, None)
        .await?;
    ensure!(status == 200 && body["count"] == 1, "{status} {body}");
    a.send(
        json!({"type": "message", "conversation_id": conv, "content": "5x5",
                  "client_msg_id": "c2", "reply_to": id}),
    )
    .await?;
    a.expect("ack").await?;
    a.close().await?;

    s.kill_edge();
    s.start_edge().await?;
    let mut b = s.ws(&sam, conv, Some(0)).await?;
    let frames = b.drain(Duration::from_millis(800)).await?;
    let messages: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| &f["message"])
        .collect();
    ensure!(messages.len() == 2, "{frames:?}");
    ensure!(
        messages[0]["content"] == "leg day: squats"
            && !messages[0]["edited_at"].is_null()
            && messages[0]["reactions"][0]["me"] == true,
        "the room rebuilt the current state: {}",
        messages[0]
    );
    ensure!(
        messages[1]["reply_to"]["content"] == "leg day: squats",
        "{}",
        messages[1]
    );
    // The same reaction again changes nothing: the rebuilt room knows it.
    let (status, body) = s
        .call(Some(&sam), reqwest::Method::PUT, &react, None)
        .await?;
    ensure!(status == 200 && body["type"] == "ack", "{status} {body}");

    s.start_origin()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, page) = s
            .call(
                Some(&sam),
                reqwest::Method::GET,
                &format!("/api/v1/chat/conversations/{conv}/messages"),
                None,
            )
            .await?;
        let done = status == 200
            && page["messages"].as_array().is_some_and(|m| m.len() == 2)
            && page["messages"][0]["content"] == "leg day: squats"
            && page["messages"][0]["reactions"][0]["count"] == 1
            && page["messages"][1]["reply_to"]["id"] == id.as_str();
        if done {
            break;
        }
        ensure!(Instant::now() < deadline, "never flushed: {status} {page}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let db = s.pool.get().await?;
    let events: i64 = db
        .query_one(
            "SELECT count(*) FROM message_events WHERE conversation_id = $1",
            &[&conv],
        )
        .await?
        .get(0);
    ensure!(events == 2, "each change stored once: {events}");
    b.close().await?;
    Ok(())
}
