//! The edge's figures at the origin's `/metrics`, and one message followed
//! by its request id from the edge into the origin's log.
//!
//! The suite shares one stack, so counters are compared before and after
//! (other tests' rooms report too), and gauges are read as "at least".

use std::time::Duration;

use anyhow::{Context, ensure};
use e2e::Stack;
use e2e::ops::sample;
use serde_json::json;

/// Scrapes until `done` holds for the text (reports are batched, so they
/// arrive within a report interval), and returns that text. Each round also
/// calls the Worker: an isolate's own figures (the POST's ack, its
/// refusals) leave with a later request once due.
async fn scrape_until(
    s: &Stack,
    within: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = s.scrape_origin().await?;
        if done(&text) {
            return Ok(text);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{what} did not show within {within:?}"
        );
        let _ = s
            .http()
            .get(format!("{}/api/v1/edge/health", s.edge))
            .send()
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const MESSAGES_WS: &str = "chat_messages_total{transport=\"ws\"}";
const MESSAGES_SSE: &str = "chat_messages_total{transport=\"sse_post\"}";
const MESSAGES_USER: &str = "chat_messages_total{transport=\"user_socket\"}";
const ACKS: &str = "chat_message_ack_seconds_count";
const PERSISTED: &str = "chat_message_persist_seconds_count";
const ROOM_WS: &str = "chat_websocket_connections{kind=\"room\",transport=\"ws\"}";
const ROOM_SSE: &str = "chat_websocket_connections{kind=\"room\",transport=\"sse\"}";
const USER_WS: &str = "chat_websocket_connections{kind=\"user\",transport=\"ws\"}";
const ROOM_WS_ENDED: &str = "chat_websocket_disconnects_total{kind=\"room\",transport=\"ws\"}";
const ROOM_SSE_ENDED: &str = "chat_websocket_disconnects_total{kind=\"room\",transport=\"sse\"}";
const OUTBOX_AGE: &str = "chat_outbox_oldest_unflushed_seconds";
const FLUSH_FAILURES: &str = "chat_outbox_flush_failures_total";

pub async fn metrics_count_connections_messages_and_latency_on_every_transport(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let before = s.scrape_origin().await?;
    let (alex, sam, conv) = s.pair().await?;
    let (mut room, mut stream, mut own) = s.every_transport(&alex, &sam, conv).await?;

    // The connections show while they are open.
    scrape_until(s, Duration::from_secs(30), "the open connections", |t| {
        sample(t, ROOM_WS) >= 1.0 && sample(t, ROOM_SSE) >= 1.0 && sample(t, USER_WS) >= 1.0
    })
    .await?;

    // One message by each transport.
    room.say(conv, "over the room socket", "m-ws").await?;
    room.expect("ack").await?;
    stream.expect("message").await?;
    let res = s
        .http()
        .post(format!(
            "{}/api/v1/chat/conversations/{conv}/messages",
            s.edge
        ))
        .bearer_auth(&sam.token)
        .json(&json!({"content": "over sse and post", "client_msg_id": "m-sse"}))
        .send()
        .await?;
    ensure!(res.status() == 201, "POST message: {}", res.status());
    room.expect("message").await?;
    own.send(json!({"type": "message", "conversation_id": conv,
                    "content": "over the user socket", "client_msg_id": "m-user"}))
        .await?;
    own.expect("ack").await?;
    // A resend is no new message: it must not be counted.
    room.say(conv, "over the room socket", "m-ws").await?;
    room.expect("ack").await?;
    s.wait_stored(conv, 3, Duration::from_secs(15)).await?;

    let delta = |t: &str, series: &str| sample(t, series) - sample(&before, series);
    let after = scrape_until(s, Duration::from_secs(30), "the three messages", |t| {
        delta(t, MESSAGES_WS) >= 1.0
            && delta(t, MESSAGES_SSE) >= 1.0
            && delta(t, MESSAGES_USER) >= 1.0
            && delta(t, ACKS) >= 3.0
            && delta(t, PERSISTED) >= 3.0
    })
    .await?;
    // Exactly one each: the resend was not counted, nothing twice.
    for series in [MESSAGES_WS, MESSAGES_SSE, MESSAGES_USER] {
        ensure!(
            (delta(&after, series) - 1.0).abs() < f64::EPSILON,
            "{series}: {} new, not 1",
            delta(&after, series)
        );
    }
    ensure!(
        (delta(&after, ACKS) - 3.0).abs() < f64::EPSILON,
        "ack latencies: {} new, not 3",
        delta(&after, ACKS)
    );
    // Every bucket count is cumulative up to +Inf, which equals the count.
    ensure!(
        (sample(&after, "chat_message_ack_seconds_bucket{le=\"+Inf\"}") - sample(&after, ACKS))
            .abs()
            < f64::EPSILON,
        "the histogram's +Inf bucket is its count"
    );
    ensure!(
        sample(&after, "chat_edge_reporters{kind=\"room\"}") >= 1.0
            && sample(&after, "chat_edge_reporters{kind=\"user\"}") >= 1.0,
        "rooms and users report"
    );

    // Typed errors at the edge are counted by code: one the Room answers
    // on its socket, one the Worker answers before any object (its
    // isolate's counts leave with a later request once due).
    room.say(conv, "", "m-empty").await?;
    let refused = room.expect("error").await?;
    ensure!(refused["code"] == "empty_field", "{refused}");
    let bad_token = s
        .http()
        .post(format!("{}/api/v1/chat/ws-ticket", s.edge))
        .bearer_auth("not-a-token")
        .send()
        .await?;
    ensure!(
        bad_token.status() == 401,
        "a bad token: {}",
        bad_token.status()
    );
    const EMPTY: &str = "chat_errors_total{code=\"empty_field\",layer=\"edge\"}";
    const INVALID: &str = "chat_errors_total{code=\"invalid_token\",layer=\"edge\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let t = s.scrape_origin().await?;
        if sample(&t, EMPTY) > sample(&before, EMPTY)
            && sample(&t, INVALID) > sample(&before, INVALID)
        {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "edge errors by code not counted: {} {}",
            sample(&t, EMPTY),
            sample(&t, INVALID)
        );
        // Any request to the Worker carries its isolate's report when due.
        let _ = s
            .http()
            .get(format!("{}/api/v1/edge/health", s.edge))
            .send()
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Connections that end are counted, however they end.
    room.close().await?;
    drop(stream);
    own.close().await?;
    scrape_until(s, Duration::from_secs(30), "the ended connections", |t| {
        delta(t, ROOM_WS_ENDED) >= 1.0 && delta(t, ROOM_SSE_ENDED) >= 1.0
    })
    .await?;
    Ok(())
}

pub async fn the_outbox_gauge_rises_while_the_origin_is_down_and_returns_to_zero(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, _sam, conv) = s.pair().await?;
    let mut room = s.ws(&alex, conv, None).await?;
    room.say(conv, "before", "o-1").await?;
    room.expect("ack").await?;
    s.wait_stored(conv, 1, Duration::from_secs(15)).await?;

    s.stop_origin();
    room.say(conv, "while the origin is away", "o-2").await?;
    room.expect("ack").await?;
    tokio::time::sleep(Duration::from_secs(20)).await;
    s.start_origin()?;

    // The first report after the origin is back says how old the outbox
    // has grown (it is built as the retried batch leaves)...
    let risen = scrape_until(s, Duration::from_secs(30), "the outbox's age", |t| {
        sample(t, OUTBOX_AGE) >= 15.0
    })
    .await?;
    ensure!(
        sample(&risen, FLUSH_FAILURES) >= 1.0,
        "the failed flushes are counted: {}",
        sample(&risen, FLUSH_FAILURES)
    );
    // ...and once the batch is in, the next one says the outbox is empty.
    s.wait_stored(conv, 2, Duration::from_secs(30)).await?;
    scrape_until(s, Duration::from_secs(30), "an empty outbox", |t| {
        sample(t, OUTBOX_AGE) == 0.0
    })
    .await?;
    room.close().await?;
    Ok(())
}

pub async fn a_messages_request_id_reaches_the_origins_log_line_for_its_ingest(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let log = s.edge_state_dir().join("origin-log.jsonl");
    s.start_origin_process_logging(&[], Some((&log, "info,origin::ingest=debug")))
        .await?;
    let result = follow_one_message(s, &log).await;
    s.kill_origin_process();
    s.start_origin()?;
    result
}

async fn follow_one_message(s: &Stack, log: &std::path::Path) -> anyhow::Result<()> {
    let (alex, _sam, conv) = s.pair().await?;
    let request_id = format!("follow-{}", uuid::Uuid::now_v7().simple());
    let secret_words = format!("words-{}", uuid::Uuid::now_v7().simple());
    let res = s
        .http()
        .post(format!(
            "{}/api/v1/chat/conversations/{conv}/messages",
            s.edge
        ))
        .bearer_auth(&alex.token)
        .header("x-request-id", &request_id)
        .json(&json!({"content": secret_words, "client_msg_id": "follow-1"}))
        .send()
        .await?;
    ensure!(res.status() == 201, "POST message: {}", res.status());
    ensure!(
        res.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            == Some(request_id.as_str()),
        "the edge echoes the request id"
    );
    let message: serde_json::Value = res.json().await?;
    let seq = message["seq"].as_i64().context("seq")?;
    s.wait_stored(conv, 1, Duration::from_secs(15)).await?;

    // The ingest's line for this message names the request that sent it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let line = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| {
                let fields = &l["fields"];
                fields["request_id"] == request_id.as_str() && fields["seq"] == seq
            });
        if let Some(line) = found {
            break line;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no origin log line with request_id {request_id} and seq {seq}:\n{text:.4000}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(
        line["fields"]["conversation_id"] == conv,
        "the line names the conversation: {line}"
    );
    // Neither the words nor the token are in any line.
    let text = std::fs::read_to_string(log)?;
    ensure!(
        !text.contains(&secret_words),
        "message content in the origin's log"
    );
    ensure!(!text.contains(&alex.token), "a token in the origin's log");

    // The edge's line for the same message, by the same id: the message
    // can be followed from the edge's request to PostgreSQL.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let edge_line = loop {
        let edge = s.edge_log();
        let found = edge
            .lines()
            .filter_map(|l| l.find('{').map(|i| &l[i..]))
            .filter_map(|l| {
                serde_json::from_str::<serde_json::Value>(l.trim_end_matches(|c: char| c != '}'))
                    .ok()
            })
            .find(|l| l["msg"] == "message accepted" && l["request_id"] == request_id.as_str());
        if let Some(line) = found {
            break line;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no edge log line accepting the message of request {request_id}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(
        edge_line["seq"] == seq && edge_line["conversation"] == conv,
        "the edge's line names the message: {edge_line}"
    );
    let edge = s.edge_log();
    ensure!(
        !edge.contains(&secret_words),
        "message content in the edge's log"
    );
    ensure!(!edge.contains(&alex.token), "a token in the edge's log");
    Ok(())
}
