//! The per-user layer: presence and notifications on the always-on
//! connection, each user's own `User` object. Presence goes only to
//! contacts (people who share a conversation), so each test makes its
//! users contacts first, and checks that a stranger hears nothing.

use std::time::Duration;

use anyhow::{Context, ensure};
use e2e::{Stack, Ws};
use serde_json::{Value, json};

/// The suite runs with a 1.5 s grace period (10 s in production).
const GRACE: Duration = Duration::from_millis(1_500);

fn presence_of(user: i64, online: bool) -> impl Fn(&Value) -> bool {
    move |f| f["type"] == "presence" && f["user_id"] == user && f["is_online"] == online
}

async fn no_presence_of(ws: &mut Ws, user: i64, within: Duration) -> anyhow::Result<()> {
    let frames = ws.drain(within).await?;
    ensure!(
        !frames
            .iter()
            .any(|f| f["type"] == "presence" && f["user_id"] == user),
        "unexpected presence for {user}: {frames:?}"
    );
    Ok(())
}

/// Polls REST until `user`'s presence is `online` (it trails the User
/// object by one origin call).
async fn rest_says(
    s: &Stack,
    viewer: &e2e::User,
    user: i64,
    online: bool,
) -> anyhow::Result<Option<String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (is_online, last_seen) = s.presence(viewer, user).await?;
        if is_online == online {
            return Ok(last_seen);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "REST still says online={is_online} for {user}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn b_sees_a_come_online_and_rest_agrees(s: &mut Stack) -> anyhow::Result<()> {
    let a = s.user("A").await?;
    let b = s.user("B").await?;
    let stranger = s.user("Stranger").await?;
    s.direct(&a, &b).await?;
    let mut ws = s.always_on(&stranger).await?;
    ws.expect("presence_snapshot").await?;
    let mut wb = s.always_on(&b).await?;
    let snapshot = wb.expect("presence_snapshot").await?;
    ensure!(
        snapshot["online"]
            .as_array()
            .is_some_and(|o| !o.contains(&json!(b.id))),
        "{snapshot}"
    );
    let _wa = s.always_on(&a).await?;
    let seen = wb.expect_where("A online", presence_of(a.id, true)).await?;
    ensure!(seen["last_seen"].is_string(), "{seen}");
    rest_says(s, &b, a.id, true).await?;
    // Someone who shares no conversation with A hears nothing of it.
    no_presence_of(&mut ws, a.id, Duration::from_millis(800)).await?;
    // A newcomer among A's contacts learns A is online from the snapshot.
    let c = s.user("C").await?;
    s.direct(&a, &c).await?;
    let mut wc = s.always_on(&c).await?;
    let snapshot = wc.expect("presence_snapshot").await?;
    ensure!(
        snapshot["online"]
            .as_array()
            .is_some_and(|o| o.contains(&json!(a.id))),
        "{snapshot}"
    );
    Ok(())
}

pub async fn a_with_two_tabs_stays_online_when_one_tab_closes(s: &mut Stack) -> anyhow::Result<()> {
    let (a, b, _) = s.pair().await?;
    let mut wb = s.always_on(&b).await?;
    let tab1 = s.always_on(&a).await?;
    let _tab2 = s.always_on(&a).await?;
    wb.expect_where("A online", presence_of(a.id, true)).await?;
    tab1.close().await?;
    no_presence_of(&mut wb, a.id, GRACE * 2).await?;
    rest_says(s, &b, a.id, true).await?;
    Ok(())
}

pub async fn when_all_tabs_close_a_goes_offline_after_the_grace_period(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (a, b, _) = s.pair().await?;
    let mut wb = s.always_on(&b).await?;
    let tab1 = s.always_on(&a).await?;
    let tab2 = s.always_on(&a).await?;
    wb.expect_where("A online", presence_of(a.id, true)).await?;
    let closed_at = chrono::Utc::now();
    tab1.close().await?;
    tab2.close().await?;
    let offline = wb
        .expect_where("A offline", presence_of(a.id, false))
        .await?;
    let waited = chrono::Utc::now() - closed_at;
    ensure!(
        waited >= chrono::Duration::milliseconds(GRACE.as_millis() as i64 - 100),
        "offline after only {waited:?}"
    );
    let last_seen: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(offline["last_seen"].clone()).context("last_seen")?;
    ensure!(
        (last_seen - closed_at).num_seconds().abs() <= 2,
        "last_seen {last_seen} vs {closed_at}"
    );
    let rest = rest_says(s, &b, a.id, false)
        .await?
        .context("REST last_seen")?;
    let rest: chrono::DateTime<chrono::Utc> = rest.parse()?;
    ensure!(
        (rest - last_seen).num_milliseconds().abs() <= 1,
        "REST {rest} vs {last_seen}"
    );
    Ok(())
}

pub async fn a_reload_within_the_grace_period_does_not_flap(s: &mut Stack) -> anyhow::Result<()> {
    let (a, b, _) = s.pair().await?;
    let mut wb = s.always_on(&b).await?;
    let tab = s.always_on(&a).await?;
    wb.expect_where("A online", presence_of(a.id, true)).await?;
    tab.close().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _reloaded = s.always_on(&a).await?;
    no_presence_of(&mut wb, a.id, GRACE * 2).await?;
    rest_says(s, &b, a.id, true).await?;
    Ok(())
}

pub async fn a_message_notifies_the_other_participant_and_reading_clears_the_count(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let a = s.user("A").await?;
    let b = s.user("B").await?;
    let conv = s.direct(&a, &b).await?;
    let mut lb = s.always_on(&b).await?;
    let mut room = s.ws(&a, conv, None).await?;
    for i in 1..=3 {
        room.say(conv, &format!("hello {i}"), &format!("n-{i}"))
            .await?;
        room.expect("ack").await?;
    }
    let updated = lb
        .expect_where("unread 3", |f| {
            f["type"] == "conversation_updated"
                && f["conversation_id"] == conv
                && f["unread_count"] == 3
        })
        .await?;
    ensure!(updated["seq"] == 3, "{updated}");
    ensure!(updated["last_message"]["content"] == "hello 3", "{updated}");
    ensure!(updated["last_message"]["sender_id"] == a.id, "{updated}");
    // B reads (over the POST fallback here): B's connection shows 0.
    let res = s
        .http()
        .post(format!("{}/api/v1/chat/conversations/{conv}/read", s.edge))
        .bearer_auth(&b.token)
        .json(&json!({"seq": 3}))
        .send()
        .await?;
    ensure!(res.status().as_u16() == 204, "{}", res.status());
    lb.expect_where("unread 0", |f| {
        f["type"] == "conversation_updated"
            && f["conversation_id"] == conv
            && f["unread_count"] == 0
    })
    .await?;
    Ok(())
}

pub async fn non_participants_receive_nothing(s: &mut Stack) -> anyhow::Result<()> {
    let a = s.user("A").await?;
    let b = s.user("B").await?;
    let eve = s.user("Eve").await?;
    let mut le = s.always_on(&eve).await?;
    let conv = s.direct(&a, &b).await?;
    let mut room = s.ws(&a, conv, None).await?;
    room.say(conv, "private", "np-1").await?;
    room.expect("ack").await?;
    let frames = le.drain(Duration::from_millis(1_500)).await?;
    ensure!(
        !frames
            .iter()
            .any(|f| f["conversation_id"] == conv || f.to_string().contains("private")),
        "Eve learned something: {frames:?}"
    );
    Ok(())
}

pub async fn a_new_conversation_appears_for_its_participants_at_once(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let a = s.user("A").await?;
    let b = s.user("B").await?;
    let eve = s.user("Eve").await?;
    let mut lb = s.always_on(&b).await?;
    let mut le = s.always_on(&eve).await?;
    let conv = s.group(&a, &[&b]).await?;
    let created = lb
        .expect_where("the new conversation", |f| {
            f["type"] == "conversation_updated" && f["conversation_id"] == conv
        })
        .await?;
    ensure!(
        created["unread_count"] == 0 && created["seq"] == 0,
        "{created}"
    );
    let frames = le.drain(Duration::from_millis(800)).await?;
    ensure!(
        !frames.iter().any(|f| f["conversation_id"] == conv),
        "{frames:?}"
    );
    Ok(())
}

pub async fn the_seed_token_path_and_sse_reach_the_users_object_too(
    s: &mut Stack,
) -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (a, b, _) = s.pair().await?;
    let url = format!(
        "{}/api/v1/chat/ws/{}",
        s.edge.replacen("http", "ws", 1),
        b.token
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url.into_client_request()?).await?;
    use futures::StreamExt;
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await?
        .context("closed")??;
    ensure!(first.to_text()?.contains("presence_snapshot"), "{first}");
    // SSE: A's presence reaches B's event stream.
    let res = s
        .http()
        .get(format!("{}/api/v1/chat/events", s.edge))
        .bearer_auth(&b.token)
        .send()
        .await?;
    ensure!(res.status().as_u16() == 200, "{}", res.status());
    let mut stream = res.bytes_stream();
    let _wa = s.always_on(&a).await?;
    let needle = format!("\"user_id\":{}", a.id);
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(text.contains("\"type\":\"presence\"") && text.contains(&needle)) {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .context("no presence on the SSE stream")?
            .context("stream ended")??;
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    // A bad token is refused on every path of the always-on connection.
    let (status, body) = s
        .call(
            None,
            reqwest::Method::GET,
            "/api/v1/chat/events?token=nope",
            None,
        )
        .await?;
    ensure!(
        status == 401 && body["code"] == "invalid_token",
        "{status} {body}"
    );
    let mut bad = s.ws_with_path("/api/v1/chat/ws", "token=nope").await?;
    let (_, closed) = bad.closed().await?;
    ensure!(closed.code == 1008, "{closed:?}");
    Ok(())
}

pub async fn a_flood_of_pings_on_the_users_connection_is_throttled_then_closed(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let alex = s.user("Alex").await?;
    let mut ws = s.always_on(&alex).await?;
    ws.expect("presence_snapshot").await?;
    // Pings cost a quarter of a token: the burst of 30 passes 120 of them.
    for _ in 0..400 {
        if ws.send(serde_json::json!({"type": "ping"})).await.is_err() {
            break;
        }
    }
    let (frames, closed) = ws.closed().await?;
    ensure!(closed.code == 1008, "{closed:?}");
    let pongs = frames.iter().filter(|f| f["type"] == "pong").count();
    let limited = frames
        .iter()
        .filter(|f| f["code"] == "rate_limited")
        .count();
    ensure!(
        (100..=250).contains(&pongs),
        "{pongs} of 400 pings answered"
    );
    ensure!(limited >= 1, "refusals come before the close");
    Ok(())
}

/// A client written to the seed's protocol: one socket on
/// `/api/v1/chat/ws/{token}` sends messages, typing and reads for any of
/// its conversations; the room decides them exactly as on its own socket.
pub async fn a_seed_client_sends_messages_typing_and_reads_on_its_single_socket(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (a, b, conv) = s.pair().await?;
    let stranger = s.user("Stranger").await?;
    let mut seed = s
        .ws_with_path(&format!("/api/v1/chat/ws/{}", a.token), "")
        .await?;
    seed.expect("presence_snapshot").await?;
    // B reads the conversation on the room's own socket.
    let mut room = s.ws(&b, conv, None).await?;
    seed.send(json!({"type": "message", "conversation_id": conv,
                     "content": "hello from the seed", "client_msg_id": "seed-1"}))
        .await?;
    let ack = seed.expect("ack").await?;
    ensure!(
        ack["client_msg_id"] == "seed-1" && ack["seq"] == 1 && ack["conversation_id"] == conv,
        "{ack}"
    );
    let got = room.expect("message").await?;
    ensure!(
        got["message"]["content"] == "hello from the seed"
            && got["message"]["seq"] == 1
            && got["message"]["id"] == ack["id"],
        "{got}"
    );
    // A resend is answered with the original, nothing stored twice.
    seed.send(json!({"type": "message", "conversation_id": conv,
                     "content": "hello from the seed", "client_msg_id": "seed-1"}))
        .await?;
    let again = seed.expect("ack").await?;
    ensure!(again["seq"] == 1 && again["id"] == ack["id"], "{again}");
    // Order holds across frames of one socket.
    for i in 2..=4 {
        seed.send(json!({"type": "message", "conversation_id": conv,
                         "content": format!("m{i}"), "client_msg_id": format!("seed-{i}")}))
            .await?;
    }
    for i in 2..=4 {
        let ack = seed.expect("ack").await?;
        ensure!(ack["seq"] == i, "ack {i}: {ack}");
    }
    // Typing reaches the other member; a read moves A's watermark, which
    // B's room socket sees as a receipt.
    seed.send(json!({"type": "typing", "conversation_id": conv}))
        .await?;
    let typing = room.expect("typing").await?;
    ensure!(typing["user_id"] == a.id, "{typing}");
    room.say(conv, "from b", "b-1").await?;
    room.expect("ack").await?;
    seed.send(json!({"type": "read", "conversation_id": conv, "seq": 5}))
        .await?;
    room.expect_where("A's read receipt", |f| {
        f["type"] == "receipt" && f["user_id"] == a.id && f["read_seq"] == 5
    })
    .await?;
    // Refusals are the room's own, typed.
    let mut other = s
        .ws_with_path(&format!("/api/v1/chat/ws/{}", stranger.token), "")
        .await?;
    other.expect("presence_snapshot").await?;
    other
        .send(json!({"type": "message", "conversation_id": conv,
                     "content": "let me in", "client_msg_id": "x-1"}))
        .await?;
    let refused = other.expect("error").await?;
    ensure!(refused["code"] == "forbidden", "{refused}");
    seed.send(json!({"type": "message", "conversation_id": conv,
                     "content": "", "client_msg_id": "seed-empty"}))
        .await?;
    let invalid = seed.expect("error").await?;
    ensure!(invalid["code"] == "empty_field", "{invalid}");
    seed.send(json!({"type": "message", "conversation_id": 987_654_321,
                     "content": "nobody home", "client_msg_id": "seed-x"}))
        .await?;
    let missing = seed.expect("error").await?;
    ensure!(missing["code"] == "not_found", "{missing}");
    // Nothing refused was stored: PostgreSQL gets exactly the five.
    let stored = s.wait_stored(conv, 5, Duration::from_secs(10)).await?;
    ensure!(stored.len() == 5, "{stored:?}");
    Ok(())
}

/// Fails if a `message` frame of `conv` arrives on `ws` within a quiet
/// moment.
async fn no_more_messages(ws: &mut Ws, conv: i64) -> anyhow::Result<()> {
    let late: Vec<Value> = ws
        .drain(Duration::from_millis(600))
        .await?
        .into_iter()
        .filter(|f| f["type"] == "message" && f["message"]["conversation_id"] == conv)
        .collect();
    ensure!(late.is_empty(), "unexpected message frames: {late:?}");
    Ok(())
}

pub async fn two_seed_clients_chat_on_their_single_sockets_and_resume_without_a_gap(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let a = s.user("Ada").await?;
    let b = s.user("Bo").await?;
    let stranger = s.user("Stranger").await?;
    let mut sa = s.seed_socket(&a).await?;
    let mut sb = s.seed_socket(&b).await?;
    // The conversation is made over REST after both are connected: their
    // objects learn of it from the room and catch up from its start.
    let conv = s.direct(&a, &b).await?;
    for i in 1..=3 {
        sa.send(json!({"type": "message", "conversation_id": conv,
                       "content": format!("m{i}"), "client_msg_id": format!("a-{i}")}))
            .await?;
    }
    for i in 1..=3 {
        let ack = sa.expect("ack").await?;
        ensure!(
            ack["seq"] == i && ack["conversation_id"] == conv,
            "ack {i}: {ack}"
        );
    }
    ensure!(sb.messages_up_to(conv, 3).await? == [1, 2, 3], "B's order");
    ensure!(
        sa.messages_up_to(conv, 3).await? == [1, 2, 3],
        "A's own copies"
    );
    no_more_messages(&mut sb, conv).await?;
    // Typing and an answer, each on the other's one socket.
    sa.send(json!({"type": "typing", "conversation_id": conv}))
        .await?;
    sb.expect_where("A typing", |f| {
        f["type"] == "typing" && f["user_id"] == a.id && f["conversation_id"] == conv
    })
    .await?;
    sb.send(json!({"type": "message", "conversation_id": conv,
                   "content": "hi Ada", "client_msg_id": "b-1"}))
        .await?;
    ensure!(sb.expect("ack").await?["seq"] == 4);
    ensure!(sb.messages_up_to(conv, 4).await? == [4], "B's own copy");
    let got = sa
        .expect_where("B's answer", |f| {
            f["type"] == "message" && f["message"]["seq"] == 4
        })
        .await?;
    ensure!(got["message"]["content"] == "hi Ada" && got["message"]["sender_id"] == b.id);
    // A resend is the original: acked again, relayed to nobody.
    sa.send(json!({"type": "message", "conversation_id": conv,
                   "content": "m1", "client_msg_id": "a-1"}))
        .await?;
    ensure!(sa.expect("ack").await?["seq"] == 1);
    no_more_messages(&mut sb, conv).await?;
    // B reads on its socket; A sees the receipt on its own.
    sb.send(json!({"type": "read", "conversation_id": conv, "seq": 4}))
        .await?;
    sa.expect_where("B's receipt", |f| {
        f["type"] == "receipt" && f["user_id"] == b.id && f["read_seq"] == 4
    })
    .await?;

    // B drops (a reload: back within the grace period) while A sends 5–7.
    sb.close().await?;
    for i in 5..=7 {
        sa.say(conv, &format!("m{i}"), &format!("a-{i}")).await?;
        ensure!(sa.expect("ack").await?["seq"] == i);
    }
    let mut sb = s.seed_socket(&b).await?;
    sb.send(json!({"type": "resume", "since": {conv.to_string(): 4}}))
        .await?;
    ensure!(sb.messages_up_to(conv, 7).await? == [5, 6, 7], "B's gap");
    let resumed = sb.expect("resumed").await?;
    ensure!(resumed["conversations"] == json!([conv]), "{resumed}");
    sa.say(conv, "m8", "a-8").await?;
    ensure!(sa.expect("ack").await?["seq"] == 8);
    ensure!(
        sb.messages_up_to(conv, 8).await? == [8],
        "live after the replay"
    );
    no_more_messages(&mut sb, conv).await?;

    // B goes offline (past the grace period): the room is told by B's
    // object at its next frame and stops; B comes back, resumes, and is
    // live again.
    sb.close().await?;
    sa.expect_where("B offline", presence_of(b.id, false))
        .await?;
    sa.say(conv, "m9", "a-9").await?;
    ensure!(sa.expect("ack").await?["seq"] == 9);
    let mut sb = s.seed_socket(&b).await?;
    sb.send(json!({"type": "resume", "since": {conv.to_string(): 8, "987654321": 0}}))
        .await?;
    ensure!(sb.messages_up_to(conv, 9).await? == [9]);
    let refused = sb.expect("error").await?;
    ensure!(refused["code"] == "not_found", "{refused}");
    ensure!(sb.expect("resumed").await?["conversations"] == json!([conv]));
    sa.say(conv, "m10", "a-10").await?;
    ensure!(sa.expect("ack").await?["seq"] == 10);
    ensure!(sb.messages_up_to(conv, 10).await? == [10]);

    // Errors are the room socket's: a stranger, a bad frame, a flood.
    let mut other = s.seed_socket(&stranger).await?;
    other
        .send(json!({"type": "resume", "since": {conv.to_string(): 0}}))
        .await?;
    ensure!(other.expect("error").await?["code"] == "forbidden");
    ensure!(other.expect("resumed").await?["conversations"] == json!([]));
    sa.send_raw("{not json".to_owned()).await?;
    ensure!(sa.expect("error").await?["code"] == "invalid_json");
    sa.send(json!({"type": "ping"})).await?;
    sa.expect("pong").await?;
    for i in 0..120 {
        if sa.say(conv, "spam", &format!("f-{i}")).await.is_err() {
            break;
        }
    }
    let (frames, closed) = sa.closed().await?;
    ensure!(closed.code == 1008, "{closed:?}");
    let flood_acks = frames.iter().filter(|f| f["type"] == "ack").count();
    ensure!(
        frames.iter().any(|f| f["code"] == "rate_limited"),
        "errors before the close"
    );
    // PostgreSQL holds exactly what was acknowledged, once.
    let expected = 10 + flood_acks;
    let stored = s
        .wait_stored(conv, expected, Duration::from_secs(15))
        .await?;
    ensure!(
        stored.len() == expected,
        "{} stored, {expected} acked",
        stored.len()
    );
    Ok(())
}

pub async fn an_sse_client_resumes_every_conversation_from_the_url(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (a, b, conv) = s.pair().await?;
    let mut room = s.ws(&a, conv, None).await?;
    for i in 1..=3 {
        room.say(conv, &format!("m{i}"), &format!("k{i}")).await?;
        ensure!(room.expect("ack").await?["seq"] == i);
    }
    let auth = [("authorization", format!("Bearer {}", b.token))];
    let mut events = s
        .sse_at(
            &format!("/api/v1/chat/events?resume={conv}:1,987654321:0"),
            &auth,
        )
        .await?
        .map_err(|(status, body)| anyhow::anyhow!("{status}: {body}"))?;
    let mut seqs = Vec::new();
    for _ in 0..2 {
        let (_, f) = events.expect("message").await?;
        seqs.push(f["message"]["seq"].as_i64().unwrap_or(-1));
    }
    ensure!(seqs == [2, 3], "the gap in order: {seqs:?}");
    let (_, refused) = events.expect("error").await?;
    ensure!(refused["code"] == "not_found", "{refused}");
    let (_, resumed) = events.expect("resumed").await?;
    ensure!(resumed["conversations"] == json!([conv]), "{resumed}");
    room.say(conv, "m4", "k4").await?;
    let (_, live) = events.expect("message").await?;
    ensure!(live["message"]["seq"] == 4, "{live}");
    // A resume point that is not one is refused before anything opens.
    let bad = s
        .sse_at("/api/v1/chat/events?resume=7", &auth)
        .await?
        .err()
        .context("a bad resume opened a stream")?;
    ensure!(bad.0 == 400 && bad.1["code"] == "invalid_query", "{bad:?}");
    Ok(())
}
