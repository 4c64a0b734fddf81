//! WebSocket paths through the Worker into Room Durable Objects.

use std::time::Duration;

use anyhow::{Context, ensure};
use e2e::{Event, Stack, message_seqs};
use serde_json::json;

const QUIET: Duration = Duration::from_millis(700);

pub async fn two_members_chat_and_each_sees_every_message_in_order(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    let mut b = s.ws(&sam, conv, None).await?;
    let n = 12;
    for i in 1..=n {
        let (ws, who) = if i % 2 == 0 {
            (&mut b, "sam")
        } else {
            (&mut a, "alex")
        };
        ws.say(conv, &format!("{who} says {i}"), &format!("k-{i}"))
            .await?;
        // Wait for the ack so that the order of sends is the order of seq.
        let ack = ws.expect("ack").await?;
        ensure!(ack["seq"] == i, "ack {i}: {ack}");
    }
    for (name, ws) in [("alex", &mut a), ("sam", &mut b)] {
        let frames = ws.drain(QUIET).await?;
        let seqs = message_seqs(&frames);
        ensure!(seqs == (1..=n).collect::<Vec<_>>(), "{name} saw {seqs:?}");
        let first = frames
            .iter()
            .find(|f| f["type"] == "message")
            .context("a message")?;
        ensure!(first["message"]["content"] == "alex says 1", "{first}");
        ensure!(first["message"]["sender_id"] == alex.id);
        ensure!(first["message"]["conversation_id"] == conv);
        ensure!(
            first["message"]["status"] == "delivered",
            "both were connected: {first}"
        );
    }
    Ok(())
}

pub async fn typing_reaches_the_other_member_only(s: &mut Stack) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    let mut b = s.ws(&sam, conv, None).await?;
    a.send(json!({"type": "typing", "conversation_id": conv}))
        .await?;
    let typing = b.expect("typing").await?;
    ensure!(
        typing == json!({"type": "typing", "conversation_id": conv, "user_id": alex.id}),
        "{typing}"
    );
    // Throttled: a second signal within 2 s is not relayed.
    a.send(json!({"type": "typing", "conversation_id": conv}))
        .await?;
    let later = b.drain(QUIET).await?;
    ensure!(
        later.iter().all(|f| f["type"] != "typing"),
        "throttled: {later:?}"
    );
    let own = a.drain(QUIET).await?;
    ensure!(
        own.iter().all(|f| f["type"] != "typing"),
        "not echoed to the typer: {own:?}"
    );
    Ok(())
}

pub async fn an_upgrade_from_a_non_member_is_refused(s: &mut Stack) -> anyhow::Result<()> {
    let alex = s.user("Alex").await?;
    let sam = s.user("Sam").await?;
    let eve = s.user("Eve").await?;
    let conv = s.direct(&alex, &sam).await?;
    let mut ws = s.ws(&eve, conv, None).await?;
    let (frames, closed) = ws.closed().await?;
    ensure!(closed.code == 1008, "{closed:?}");
    ensure!(
        frames
            .iter()
            .any(|f| f["type"] == "error" && f["code"] == "forbidden"),
        "{frames:?}"
    );
    // And a conversation that does not exist.
    let mut ws = s.ws(&eve, 987_654, None).await?;
    let (frames, closed) = ws.closed().await?;
    ensure!(
        closed.code == 1008 || frames.iter().any(|f| f["code"] == "not_found"),
        "{frames:?} {closed:?}"
    );
    Ok(())
}

pub async fn bad_and_expired_tokens_are_refused_and_tickets_work(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, _sam, conv) = s.pair().await?;
    let expired = s.token_for(alex.id, "Alex", -120)?;
    for (query, code) in [
        ("token=not-a-jwt".to_owned(), "invalid_token"),
        (format!("token={expired}"), "token_expired"),
        (String::new(), "missing_token"),
        // A session token is not a ticket.
        (format!("ticket={}", alex.token), "invalid_token"),
    ] {
        let mut ws = s.ws_with(conv, &query).await?;
        let (frames, closed) = ws.closed().await?;
        ensure!(closed.code == 1008, "{query}: {closed:?}");
        ensure!(
            frames
                .iter()
                .any(|f| f["type"] == "error" && f["code"] == code),
            "{query}: {frames:?}"
        );
    }
    // A ticket for this conversation opens its socket, once.
    let ticket = s.ticket(&alex, Some(conv)).await?;
    let mut ws = s.ws_with(conv, &format!("ticket={ticket}")).await?;
    ws.say(conv, "via ticket", "t-1").await?;
    ws.expect("ack").await?;
    let mut again = s.ws_with(conv, &format!("ticket={ticket}")).await?;
    let (frames, closed) = again.closed().await?;
    ensure!(
        closed.code == 1008 && frames.iter().any(|f| f["code"] == "ticket_used"),
        "a ticket is single-use: {frames:?} {closed:?}"
    );
    // A ticket opens only what it was minted for: not another room, not
    // the user's own connection, and a user ticket opens no room.
    let other = s.direct(&alex, &s.user("Kim").await?).await?;
    let for_conv = s.ticket(&alex, Some(conv)).await?;
    let for_user = s.ticket(&alex, None).await?;
    for (target, ticket) in [(other, &for_conv), (conv, &for_user)] {
        let mut ws = s.ws_with(target, &format!("ticket={ticket}")).await?;
        let (frames, closed) = ws.closed().await?;
        ensure!(
            closed.code == 1008 && frames.iter().any(|f| f["code"] == "invalid_token"),
            "ticket for the wrong target: {frames:?} {closed:?}"
        );
    }
    let mut lobby = s
        .ws_with_path("/api/v1/chat/ws", &format!("ticket={for_conv}"))
        .await?;
    let (frames, closed) = lobby.closed().await?;
    ensure!(
        closed.code == 1008 && frames.iter().any(|f| f["code"] == "invalid_token"),
        "a room ticket on the user's connection: {frames:?} {closed:?}"
    );
    let mut lobby = s
        .ws_with_path("/api/v1/chat/ws", &format!("ticket={for_user}"))
        .await?;
    lobby.expect("presence_snapshot").await?;
    let (status, body) = s
        .call(None, reqwest::Method::POST, "/api/v1/chat/ws-ticket", None)
        .await?;
    ensure!(
        status == 401 && body["code"] == "missing_token",
        "{status} {body}"
    );
    Ok(())
}

pub async fn an_upgrade_from_a_foreign_origin_is_refused(s: &mut Stack) -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (alex, _sam, conv) = s.pair().await?;
    let url = format!(
        "{}/api/v1/chat/conversations/{conv}/ws?token={}",
        s.edge.replacen("http", "ws", 1),
        alex.token
    );
    let mut req = url.clone().into_client_request()?;
    req.headers_mut()
        .insert("origin", "https://evil.example".parse()?);
    let err = tokio_tungstenite::connect_async(req)
        .await
        .err()
        .context("must be refused")?;
    ensure!(err.to_string().contains("403"), "{err}");
    let mut req = url.into_client_request()?;
    req.headers_mut().insert("origin", s.edge.parse()?);
    ensure!(
        tokio_tungstenite::connect_async(req).await.is_ok(),
        "the edge's own origin is allowed"
    );
    Ok(())
}

pub async fn a_resend_with_the_same_client_msg_id_stores_one_message(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, _sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    a.say(conv, "only once", "dup-1").await?;
    let first = a.expect("ack").await?;
    a.say(conv, "only once", "dup-1").await?;
    let second = a.expect("ack").await?;
    ensure!(
        first["seq"] == second["seq"] && first["id"] == second["id"],
        "{first} vs {second}"
    );
    // Even from a new connection.
    a.close().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    a.say(conv, "only once", "dup-1").await?;
    let third = a.expect("ack").await?;
    ensure!(third["id"] == first["id"], "{third}");
    a.say(conv, "next", "dup-2").await?;
    let next = a.expect("ack").await?;
    ensure!(next["seq"] == 2, "{next}");
    let stored = s.wait_stored(conv, 2, Duration::from_secs(15)).await?;
    ensure!(
        stored == vec![(1, "dup-1".to_owned()), (2, "dup-2".to_owned())],
        "{stored:?}"
    );
    Ok(())
}

pub async fn a_reconnect_with_since_gets_exactly_the_missed_messages(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    let mut b = s.ws(&sam, conv, None).await?;
    for i in 1..=3 {
        a.say(conv, &format!("m{i}"), &format!("r-{i}")).await?;
        a.expect("ack").await?;
    }
    let seen = message_seqs(&b.drain(QUIET).await?);
    ensure!(seen == vec![1, 2, 3], "{seen:?}");
    b.close().await?;
    for i in 4..=8 {
        a.say(conv, &format!("m{i}"), &format!("r-{i}")).await?;
        a.expect("ack").await?;
    }
    let mut b = s.ws(&sam, conv, Some(3)).await?;
    let replayed = message_seqs(&b.drain(QUIET).await?);
    ensure!(replayed == vec![4, 5, 6, 7, 8], "{replayed:?}");
    // Live traffic continues after the replay, with no duplicates.
    a.say(conv, "m9", "r-9").await?;
    let live = message_seqs(&b.drain(QUIET).await?);
    ensure!(live == vec![9], "{live:?}");
    // Resuming at the head replays nothing.
    let mut c = s.ws(&sam, conv, Some(9)).await?;
    let none = message_seqs(&c.drain(QUIET).await?);
    ensure!(none.is_empty(), "{none:?}");
    Ok(())
}

pub async fn a_reconnect_older_than_the_window_gets_resync_and_rest_fills_the_gap(
    s: &mut Stack,
) -> anyhow::Result<()> {
    // The suite runs rooms with a replay window of 20.
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    for i in 1..=25 {
        a.say(conv, &format!("m{i}"), &format!("w-{i}")).await?;
        a.expect("ack").await?;
    }
    // Once the origin has them all, the room keeps only its window.
    let stored = s.wait_stored(conv, 25, Duration::from_secs(15)).await?;
    ensure!(stored.len() == 25, "{stored:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut b = s.ws(&sam, conv, Some(2)).await?;
    let frame = b.expect("resync").await?;
    ensure!(
        frame == json!({"type": "resync", "conversation_id": conv, "from_seq": 3}),
        "{frame}"
    );
    // The client reloads from REST, then resumes from what it has.
    let (status, page) = s
        .call(
            Some(&sam),
            reqwest::Method::GET,
            &format!("/api/v1/chat/conversations/{conv}/messages?after_seq=2&limit=200"),
            None,
        )
        .await?;
    ensure!(status == 200, "{status} {page}");
    let rest: Vec<i64> = page["messages"]
        .as_array()
        .context("messages")?
        .iter()
        .filter_map(|m| m["seq"].as_i64())
        .collect();
    ensure!(rest == (3..=25).collect::<Vec<_>>(), "{rest:?}");
    let mut c = s.ws(&sam, conv, Some(25)).await?;
    a.say(conv, "after resync", "w-26").await?;
    let live = message_seqs(&c.drain(QUIET).await?);
    ensure!(live == vec![26], "{live:?}");
    Ok(())
}

pub async fn each_message_lands_in_postgresql_exactly_once_with_contiguous_seq(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    let mut b = s.ws(&sam, conv, None).await?;
    // Both send at once, without waiting: the room orders them.
    for i in 0..20 {
        a.say(conv, &format!("a{i}"), &format!("pa-{i}")).await?;
        b.say(conv, &format!("b{i}"), &format!("pb-{i}")).await?;
    }
    let stored = s.wait_stored(conv, 40, Duration::from_secs(20)).await?;
    let seqs: Vec<i64> = stored.iter().map(|(seq, _)| *seq).collect();
    ensure!(seqs == (1..=40).collect::<Vec<_>>(), "{seqs:?}");
    let mut keys: Vec<&str> = stored.iter().map(|(_, k)| k.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    ensure!(keys.len() == 40, "each message once: {keys:?}");
    // Both clients saw the same total order.
    let seen_a = message_seqs(&a.drain(QUIET).await?);
    let seen_b = message_seqs(&b.drain(QUIET).await?);
    ensure!(seen_a == seqs && seen_b == seqs, "{seen_a:?} / {seen_b:?}");
    let client = s.pool.get().await?;
    let last_seq: i64 = client
        .query_one("SELECT last_seq FROM conversations WHERE id = $1", &[&conv])
        .await?
        .get(0);
    ensure!(last_seq == 40, "{last_seq}");
    Ok(())
}

pub async fn read_receipts_reach_both_members_and_the_origin(s: &mut Stack) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    for i in 1..=3 {
        a.say(conv, &format!("m{i}"), &format!("rr-{i}")).await?;
        a.expect("ack").await?;
    }
    // Sam connects later and catches up: delivered.
    let mut b = s.ws(&sam, conv, Some(0)).await?;
    let receipt = a.expect("receipt").await?;
    ensure!(
        receipt["user_id"] == sam.id && receipt["delivered_seq"] == 3,
        "{receipt}"
    );
    b.drain(QUIET).await?;
    b.send(json!({"type": "read", "conversation_id": conv, "seq": 2}))
        .await?;
    let receipt = loop {
        let r = a.expect("receipt").await?;
        if r["read_seq"] == 2 {
            break r;
        }
    };
    ensure!(
        receipt["user_id"] == sam.id && receipt["conversation_id"] == conv,
        "{receipt}"
    );
    // The origin's watermarks and the REST statuses follow.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, page) = s
            .call(
                Some(&alex),
                reqwest::Method::GET,
                &format!("/api/v1/chat/conversations/{conv}/messages"),
                None,
            )
            .await?;
        ensure!(status == 200, "{status}");
        let statuses: Vec<String> = page["messages"]
            .as_array()
            .context("messages")?
            .iter()
            .map(|m| m["status"].as_str().unwrap_or_default().to_owned())
            .collect();
        if statuses == ["read", "read", "delivered"] {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "statuses stayed {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

pub async fn bad_frames_get_typed_errors_and_the_connection_survives(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, _sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    let cases = [
        ("{not json".to_owned(), "invalid_json"),
        (json!({"type": "dance"}).to_string(), "unknown_type"),
        // Content may be left out next to attachments; alone, it is empty.
        (json!({"type": "message", "conversation_id": conv}).to_string(), "empty_field"),
        (json!({"type": "message", "conversation_id": conv + 1000, "content": "x", "client_msg_id": "x1"}).to_string(), "wrong_conversation"),
        (json!({"type": "message", "conversation_id": conv, "content": "x".repeat(4001), "client_msg_id": "x2"}).to_string(), "too_long"),
        (json!({"type": "message", "conversation_id": conv, "content": "  ", "client_msg_id": "x3"}).to_string(), "empty_field"),
    ];
    for (text, code) in cases {
        a.send_raw(text).await?;
        let err = a.expect("error").await?;
        ensure!(err["code"] == code, "expected {code}: {err}");
        ensure!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Still open, still working; nothing was stored for the bad frames.
    a.say(conv, "still here", "ok-1").await?;
    let ack = a.expect("ack").await?;
    ensure!(ack["seq"] == 1, "{ack}");
    a.send(json!({"type": "ping"})).await?;
    a.expect("pong").await?;
    Ok(())
}

pub async fn an_oversize_frame_closes_the_socket_with_1009(s: &mut Stack) -> anyhow::Result<()> {
    let (alex, _sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    let huge = json!({"type": "message", "conversation_id": conv, "content": "x".repeat(70_000), "client_msg_id": "big"});
    a.send(huge).await?;
    let (frames, closed) = a.closed().await?;
    ensure!(closed.code == 1009, "{closed:?}");
    ensure!(
        frames.iter().any(|f| f["code"] == "frame_too_large"),
        "{frames:?}"
    );
    ensure!(s.stored(conv).await?.is_empty());
    Ok(())
}

pub async fn a_flood_is_rate_limited_then_closed_with_1008(s: &mut Stack) -> anyhow::Result<()> {
    let (alex, _sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    for i in 0..120 {
        if a.say(conv, "spam", &format!("f-{i}")).await.is_err() {
            break; // already closed
        }
    }
    let (frames, closed) = a.closed().await?;
    ensure!(closed.code == 1008, "{closed:?}");
    let acks = frames.iter().filter(|f| f["type"] == "ack").count();
    let limited = frames
        .iter()
        .filter(|f| f["code"] == "rate_limited")
        .count();
    ensure!(
        (30..120).contains(&acks),
        "the burst passes, the flood does not: {acks} acks"
    );
    ensure!(limited >= 1, "error events come before the close");
    // Everything acknowledged is stored; nothing else is.
    let stored = s.wait_stored(conv, acks, Duration::from_secs(15)).await?;
    ensure!(
        stored.len() == acks,
        "{} stored, {acks} acked",
        stored.len()
    );
    Ok(())
}

pub async fn removing_a_member_through_the_edge_closes_their_socket(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let coach = s.user("Coach").await?;
    let alex = s.user("Alex").await?;
    let sam = s.user("Sam").await?;
    let group = s.group(&coach, &[&alex, &sam]).await?;
    let mut c = s.ws(&coach, group, None).await?;
    let mut x = s.ws(&sam, group, None).await?;
    let (status, body) = s
        .call(
            Some(&coach),
            reqwest::Method::DELETE,
            &format!("/api/v1/chat/conversations/{group}/participants"),
            Some(json!({"user_ids": [sam.id]})),
        )
        .await?;
    ensure!(status == 200, "{status} {body}");
    let (_, closed) = x.closed().await?;
    ensure!(closed.code == 1008, "{closed:?}");
    // Sam can no longer connect; the others chat on.
    let mut again = s.ws(&sam, group, None).await?;
    let (_, closed) = again.closed().await?;
    ensure!(closed.code == 1008, "{closed:?}");
    c.say(group, "still here", "g-1").await?;
    c.expect("ack").await?;
    // Adding through the edge lets a new member in at once.
    let dana = s.user("Dana").await?;
    let (status, _) = s
        .call(
            Some(&coach),
            reqwest::Method::POST,
            &format!("/api/v1/chat/conversations/{group}/participants"),
            Some(json!({"user_ids": [dana.id]})),
        )
        .await?;
    ensure!(status == 200);
    let mut d = s.ws(&dana, group, Some(0)).await?;
    let seen = message_seqs(&d.drain(QUIET).await?);
    ensure!(seen == vec![1], "{seen:?}");
    Ok(())
}

pub async fn while_the_origin_is_down_chat_goes_on_and_the_outbox_drains_after(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    let mut b = s.ws(&sam, conv, None).await?;
    for i in 1..=5 {
        a.say(conv, &format!("before {i}"), &format!("o-{i}"))
            .await?;
        a.expect("ack").await?;
    }
    s.wait_stored(conv, 5, Duration::from_secs(15)).await?;

    s.stop_origin();
    // REST answers 503 with a JSON body while the origin is away.
    let (status, body) = s
        .call(
            Some(&alex),
            reqwest::Method::GET,
            "/api/v1/chat/conversations",
            None,
        )
        .await?;
    ensure!(
        status == 503 && body["code"] == "origin_unavailable",
        "{status} {body}"
    );
    for i in 6..=15 {
        let (ws, key) = if i % 2 == 0 {
            (&mut b, "s")
        } else {
            (&mut a, "a")
        };
        ws.say(conv, &format!("during {i}"), &format!("o-{key}-{i}"))
            .await?;
        let ack = ws.expect("ack").await?;
        ensure!(ack["seq"] == i, "{ack}");
    }
    // A reconnect during the outage still works (members are cached).
    b.close().await?;
    let mut b = s.ws(&sam, conv, Some(5)).await?;
    let replayed = message_seqs(&b.drain(QUIET).await?);
    ensure!(replayed == (6..=15).collect::<Vec<_>>(), "{replayed:?}");
    ensure!(
        s.stored(conv).await?.len() == 5,
        "nothing new reached PostgreSQL"
    );

    s.start_origin()?;
    let stored = s.wait_stored(conv, 15, Duration::from_secs(30)).await?;
    let seqs: Vec<i64> = stored.iter().map(|(seq, _)| *seq).collect();
    ensure!(
        seqs == (1..=15).collect::<Vec<_>>(),
        "after recovery: {seqs:?}"
    );
    let (status, _) = s
        .call(
            Some(&alex),
            reqwest::Method::GET,
            "/api/v1/chat/conversations",
            None,
        )
        .await?;
    ensure!(status == 200, "REST is back: {status}");
    // Nothing is written twice, even after more flushes.
    a.say(conv, "after", "o-16").await?;
    a.expect("ack").await?;
    let stored = s.wait_stored(conv, 16, Duration::from_secs(15)).await?;
    ensure!(stored.len() == 16, "{stored:?}");
    match b.next_within(Duration::from_millis(10)).await? {
        Some(Event::Closed(c)) => anyhow::bail!("the socket closed during the outage: {c:?}"),
        _ => Ok(()),
    }
}
