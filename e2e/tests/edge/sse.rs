//! The fallback transport: Server-Sent Events plus POST, served by the
//! same Room Durable Object as the WebSockets, with the same guarantees.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use e2e::{SseItem, Stack, User, message_seqs, sse_messages};
use serde_json::{Value, json};

const QUIET: Duration = Duration::from_millis(700);

fn bearer(user: &User) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {}", user.token))]
}

async fn post(
    s: &Stack,
    user: &User,
    conv: i64,
    action: &str,
    body: Value,
) -> anyhow::Result<(u16, Value, Option<String>)> {
    let res = s
        .http()
        .post(format!(
            "{}/api/v1/chat/conversations/{conv}/{action}",
            s.edge
        ))
        .bearer_auth(&user.token)
        .json(&body)
        .send()
        .await?;
    let status = res.status().as_u16();
    let retry_after = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = res.text().await?;
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)?
    };
    Ok((status, value, retry_after))
}

pub async fn ws_and_sse_members_see_the_same_messages_typing_and_receipts(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    let mut b = s
        .sse(conv, "", &bearer(&sam))
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;

    // WS → SSE: the message, with id: = seq.
    a.say(conv, "from the socket", "x-1").await?;
    let (id, event) = b.expect("message").await?;
    ensure!(id.as_deref() == Some("1"), "{id:?}");
    ensure!(
        event["message"]["content"] == "from the socket" && event["message"]["seq"] == 1,
        "{event}"
    );
    // SSE → WS: POST a message; both see seq 2, the same object.
    let (status, body, _) = post(
        s,
        &sam,
        conv,
        "messages",
        json!({"content": "from the stream", "client_msg_id": "x-2"}),
    )
    .await?;
    ensure!(
        status == 201 && body["seq"] == 2 && body["sender_id"] == sam.id,
        "{status} {body}"
    );
    let on_ws = loop {
        let m = a.expect("message").await?;
        if m["message"]["seq"] == 2 {
            break m;
        }
    };
    ensure!(on_ws["message"]["id"] == body["id"], "{on_ws}");
    let (id, own) = b.expect("message").await?;
    ensure!(
        id.as_deref() == Some("2") && own["message"]["id"] == body["id"],
        "{own}"
    );
    // Typing both ways; never echoed to the typer.
    a.send(json!({"type": "typing", "conversation_id": conv}))
        .await?;
    let (_, typing) = b.expect("typing").await?;
    ensure!(typing["user_id"] == alex.id, "{typing}");
    let (status, _, _) = post(s, &sam, conv, "typing", json!({})).await?;
    ensure!(status == 204, "{status}");
    let typing = a.expect("typing").await?;
    ensure!(typing["user_id"] == sam.id, "{typing}");
    // Read over POST: the WS member gets the receipt.
    let (status, _, _) = post(s, &sam, conv, "read", json!({"seq": 1})).await?;
    ensure!(status == 204, "{status}");
    let receipt = loop {
        let r = a.expect("receipt").await?;
        if r["user_id"] == sam.id && r["read_seq"] == 1 {
            break r;
        }
    };
    ensure!(receipt["conversation_id"] == conv, "{receipt}");
    let items = b.drain(QUIET).await;
    ensure!(
        !items.iter().any(|i| matches!(i, SseItem::Event { data, .. } if data["type"] == "typing" && data["user_id"] == sam.id)),
        "typing echoed to the typer: {items:?}"
    );
    Ok(())
}

pub async fn the_sse_stream_starts_with_a_retry_hint_and_sends_heartbeats(
    s: &mut Stack,
) -> anyhow::Result<()> {
    // The suite sets ROOM_SSE_HEARTBEAT_MS=1000 (15 s in production).
    let (_alex, sam, conv) = s.pair().await?;
    let mut b = s
        .sse(conv, &format!("token={}", sam.token), &[])
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let items = b.collect_for(Duration::from_millis(2_500)).await;
    ensure!(items.first() == Some(&SseItem::Retry(2_000)), "{items:?}");
    ensure!(
        items
            .iter()
            .any(|i| matches!(i, SseItem::Comment(c) if c == "heartbeat")),
        "no heartbeat: {items:?}"
    );
    Ok(())
}

pub async fn last_event_id_and_since_resume_exactly_after_that_seq(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    for i in 1..=6 {
        a.say(conv, &format!("m{i}"), &format!("l-{i}")).await?;
        a.expect("ack").await?;
    }
    // Last-Event-ID wins over a stale ?since= in the URL.
    let mut headers = bearer(&sam);
    headers.push(("last-event-id", "4".to_owned()));
    let mut b = s
        .sse(conv, "since=1", &headers)
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let got = sse_messages(&b.drain(QUIET).await);
    ensure!(
        got == vec![(Some("5".to_owned()), 5), (Some("6".to_owned()), 6)],
        "{got:?}"
    );
    let mut c = s
        .sse(conv, "since=2", &bearer(&sam))
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let got: Vec<i64> = sse_messages(&c.drain(QUIET).await)
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    ensure!(got == vec![3, 4, 5, 6], "{got:?}");
    // Older than the window (20 in this suite): resync.
    for i in 7..=30 {
        a.say(conv, &format!("m{i}"), &format!("l-{i}")).await?;
        a.expect("ack").await?;
    }
    s.wait_stored(conv, 30, Duration::from_secs(15)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut d = s
        .sse(conv, "since=3", &bearer(&sam))
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let (_, resync) = d.expect("resync").await?;
    ensure!(resync["from_seq"] == 4, "{resync}");
    let (status, body) = s
        .call(
            Some(&sam),
            reqwest::Method::GET,
            &format!("/api/v1/chat/conversations/{conv}/events?since=abc"),
            None,
        )
        .await?;
    ensure!(
        status == 400 && body["code"] == "invalid_query",
        "{status} {body}"
    );
    Ok(())
}

pub async fn switching_from_websocket_to_sse_mid_conversation_misses_nothing(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    let mut b = s.ws(&sam, conv, None).await?;
    for i in 1..=3 {
        a.say(conv, &format!("m{i}"), &format!("sw-{i}")).await?;
        a.expect("ack").await?;
    }
    let seen = message_seqs(&b.drain(QUIET).await?);
    ensure!(seen == vec![1, 2, 3], "{seen:?}");
    let last = *seen.last().context("last seq")?;
    b.close().await?;
    for i in 4..=6 {
        a.say(conv, &format!("m{i}"), &format!("sw-{i}")).await?;
        a.expect("ack").await?;
    }
    let mut sse = s
        .sse(conv, &format!("since={last}"), &bearer(&sam))
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    a.say(conv, "m7", "sw-7").await?;
    let got: Vec<i64> = sse_messages(&sse.drain(QUIET).await)
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    ensure!(got == vec![4, 5, 6, 7], "{got:?}");
    Ok(())
}

pub async fn posting_the_same_client_msg_id_twice_returns_201_then_200_with_the_same_message(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, _sam, conv) = s.pair().await?;
    let body = json!({"content": "once", "client_msg_id": "p-1"});
    let (status, first, _) = post(s, &alex, conv, "messages", body.clone()).await?;
    ensure!(status == 201, "{status} {first}");
    let (status, again, _) = post(s, &alex, conv, "messages", body).await?;
    ensure!(status == 200, "{status} {again}");
    ensure!(
        first["id"] == again["id"] && first["seq"] == again["seq"] && again["content"] == "once",
        "{first} vs {again}"
    );
    // The same key over WebSocket is the same message too.
    let mut a = s.ws(&alex, conv, None).await?;
    a.say(conv, "once", "p-1").await?;
    let ack = a.expect("ack").await?;
    ensure!(ack["id"] == first["id"], "{ack}");
    let stored = s.wait_stored(conv, 1, Duration::from_secs(15)).await?;
    ensure!(stored == vec![(1, "p-1".to_owned())], "{stored:?}");
    Ok(())
}

pub async fn bad_posts_get_400_413_422_and_a_flood_gets_429_with_retry_after(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, _sam, conv) = s.pair().await?;
    let url = format!("{}/api/v1/chat/conversations/{conv}/messages", s.edge);
    let raw = |body: String| {
        s.http()
            .post(&url)
            .bearer_auth(&alex.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(String, u16, &str)> = vec![
        ("{nope".to_owned(), 400, "invalid_json"),
        // Content may be left out next to attachments; alone, it is empty.
        (
            json!({"client_msg_id": "k"}).to_string(),
            422,
            "empty_field",
        ),
        (
            json!({"content": "x".repeat(4_001), "client_msg_id": "k"}).to_string(),
            413,
            "too_long",
        ),
        (
            json!({"content": "  ", "client_msg_id": "k"}).to_string(),
            422,
            "empty_field",
        ),
        (
            json!({"content": "ok", "client_msg_id": "bad key"}).to_string(),
            422,
            "invalid_field",
        ),
        (
            json!({"content": "x".repeat(70_000)}).to_string(),
            413,
            "frame_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let res = raw(body).await?;
        let got = res.status().as_u16();
        let json: Value = res.json().await?;
        ensure!(
            got == status && json["code"] == code,
            "expected {status} {code}, got {got} {json}"
        );
        ensure!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, body, _) = post(s, &alex, conv, "read", json!({"seq": "x"})).await?;
    ensure!(status == 422, "{status} {body}");
    ensure!(
        s.stored(conv).await?.is_empty(),
        "nothing stored for bad input"
    );
    // A flood: the burst passes, then 429 with Retry-After.
    let mut limited = None;
    for i in 0..60 {
        let (status, body, retry) = post(
            s,
            &alex,
            conv,
            "messages",
            json!({"content": "spam", "client_msg_id": format!("fl-{i}")}),
        )
        .await?;
        if status == 429 {
            limited = Some((body, retry));
            break;
        }
        ensure!(status == 201, "{status} {body}");
    }
    let (body, retry) = limited.context("no 429 in 60 rapid posts")?;
    ensure!(body["code"] == "rate_limited", "{body}");
    ensure!(
        retry.is_some_and(|r| r.parse::<u64>().is_ok_and(|n| n >= 1)),
        "Retry-After"
    );
    Ok(())
}

pub async fn non_members_get_403_and_bad_tokens_401_on_every_sse_path(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let alex = s.user("Alex").await?;
    let sam = s.user("Sam").await?;
    let eve = s.user("Eve").await?;
    let conv = s.direct(&alex, &sam).await?;
    match s.sse(conv, "", &bearer(&eve)).await? {
        Err((403, body)) if body["code"] == "forbidden" => {}
        other => bail!("non-member stream: {other:?}"),
    }
    for action in ["messages", "typing", "read"] {
        let (status, body, _) =
            post(s, &eve, conv, action, json!({"content": "x", "seq": 1})).await?;
        ensure!(
            status == 403 && body["code"] == "forbidden",
            "{action}: {status} {body}"
        );
    }
    let expired = s.token_for(alex.id, "Alex", -120)?;
    match s.sse(conv, &format!("token={expired}"), &[]).await? {
        Err((401, body)) if body["code"] == "token_expired" => {}
        other => bail!("expired token stream: {other:?}"),
    }
    match s.sse(conv, "", &[]).await? {
        Err((401, body)) if body["code"] == "missing_token" => {}
        other => bail!("no token: {other:?}"),
    }
    let res = s
        .http()
        .post(format!(
            "{}/api/v1/chat/conversations/{conv}/messages",
            s.edge
        ))
        .bearer_auth("garbage")
        .json(&json!({"content": "x"}))
        .send()
        .await?;
    ensure!(res.status().as_u16() == 401, "{}", res.status());
    // A ticket for the conversation works for EventSource, once.
    let ticket = s.ticket(&alex, Some(conv)).await?;
    ensure!(
        s.sse(conv, &format!("ticket={ticket}"), &[]).await?.is_ok(),
        "ticket stream"
    );
    match s.sse(conv, &format!("ticket={ticket}"), &[]).await? {
        Err((401, body)) if body["code"] == "ticket_used" => {}
        other => bail!("a used ticket: {other:?}"),
    }
    Ok(())
}

pub async fn a_member_over_the_cap_loses_their_own_oldest_stream_never_anyone_elses(
    s: &mut Stack,
) -> anyhow::Result<()> {
    // The suite caps rooms at 3 SSE streams (200 in production).
    let alex = s.user("Alex").await?;
    let sam = s.user("Sam").await?;
    let kim = s.user("Kim").await?;
    let conv = s.group(&alex, &[&sam, &kim]).await?;
    let mut sams = open_stream(s, conv, &sam).await?;
    let mut alexes = Vec::new();
    for _ in 0..4 {
        alexes.push(open_stream(s, conv, &alex).await?);
    }
    // The room is full (3): Alex's newer streams pushed out Alex's older
    // ones, never Sam's.
    for old in alexes.iter_mut().take(2) {
        old.ended(Duration::from_secs(10)).await?;
    }
    // Kim holds nothing here to give up: refused, and nobody is evicted.
    match s.sse(conv, "", &bearer(&kim)).await? {
        Err((503, body)) if body["code"] == "too_many_connections" => {}
        other => bail!("a newcomer to a full room: {other:?}"),
    }
    let mut a = s.ws(&alex, conv, None).await?;
    a.say(conv, "still flowing", "cap-1").await?;
    let (id, _) = sams.expect("message").await?;
    ensure!(id.as_deref() == Some("1"), "{id:?}");
    for o in alexes.iter_mut().skip(2) {
        let (id, _) = o.expect("message").await?;
        ensure!(id.as_deref() == Some("1"), "{id:?}");
    }
    Ok(())
}

async fn open_stream(s: &Stack, conv: i64, user: &e2e::User) -> anyhow::Result<e2e::Sse> {
    s.sse(conv, "", &bearer(user))
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> anyhow::Result<Value> {
    tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .context("the reference client went quiet")?
        .context("the reference client exited")
}

pub async fn a_standard_eventsource_client_parses_the_stream_and_resumes_by_itself(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    let script = e2e::stack::workspace_root().join("e2e/js/eventsource-client.mjs");
    let url = format!(
        "{}/api/v1/chat/conversations/{conv}/events?token={}",
        s.edge, sam.token
    );
    let mut child = Command::new("node")
        .arg(&script)
        .arg(&url)
        .current_dir(e2e::stack::workspace_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("run the reference EventSource client (node)")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let mut seen: Vec<(String, i64)> = Vec::new();
    let mut opens = 0;
    // Wait for it to connect, then send two messages.
    loop {
        let v = next(&mut rx).await?;
        if v["open"] == true {
            opens += 1;
            break;
        }
    }
    for i in 1..=2 {
        a.say(conv, &format!("m{i}"), &format!("es-{i}")).await?;
        a.expect("ack").await?;
    }
    while seen.len() < 2 {
        let v = next(&mut rx).await?;
        if let Some(seq) = v["data"]["message"]["seq"].as_i64() {
            seen.push((
                v["lastEventId"].as_str().unwrap_or_default().to_owned(),
                seq,
            ));
        }
    }
    // Push it out (the cap is 3; Sam's own newer streams take its place):
    // it reconnects on its own with Last-Event-ID, and a message sent
    // meanwhile arrives exactly once.
    let mut pushers = Vec::new();
    for _ in 0..3 {
        pushers.push(
            s.sse(conv, "", &bearer(&sam))
                .await?
                .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        );
    }
    a.say(conv, "m3", "es-3").await?;
    a.expect("ack").await?;
    drop(pushers);
    while seen.len() < 3 {
        let v = next(&mut rx).await?;
        if v["open"] == true {
            opens += 1;
        }
        if let Some(seq) = v["data"]["message"]["seq"].as_i64() {
            seen.push((
                v["lastEventId"].as_str().unwrap_or_default().to_owned(),
                seq,
            ));
        }
    }
    // Nothing more (no duplicate of 1 or 2 after the resume).
    let extra = tokio::time::timeout(Duration::from_millis(1_500), rx.recv()).await;
    let _ = child.kill();
    ensure!(
        opens >= 2,
        "the client reconnected by itself ({opens} opens)"
    );
    ensure!(
        seen == vec![
            ("1".to_owned(), 1),
            ("2".to_owned(), 2),
            ("3".to_owned(), 3)
        ],
        "{seen:?}"
    );
    if let Ok(Some(v)) = extra {
        ensure!(
            v["data"]["message"].is_null(),
            "a duplicate after resuming: {v}"
        );
    }
    Ok(())
}
