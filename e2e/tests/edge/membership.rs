//! Who may use a room, whatever path changed it, and what probing and
//! resending cost.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use e2e::Stack;
use serde_json::json;

const QUIET: Duration = Duration::from_millis(600);

pub async fn a_member_removed_at_the_origin_is_cut_off_at_the_edge_on_every_path(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let coach = s.user("Coach").await?;
    let alex = s.user("Alex").await?;
    let sam = s.user("Sam").await?;
    let group = s.group(&coach, &[&alex, &sam]).await?;
    let mut c = s.ws(&coach, group, None).await?;
    let mut x = s.ws(&sam, group, None).await?;
    let mut stream = s
        .sse(group, &format!("token={}", sam.token), &[])
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // Removed through the origin's own REST route: the edge is not on the
    // request's path, and hears of it only from the origin.
    let res = s
        .http()
        .delete(format!(
            "http://127.0.0.1:{}/api/v1/chat/conversations/{group}/participants",
            s.origin_port
        ))
        .bearer_auth(&coach.token)
        .json(&json!({"user_ids": [sam.id]}))
        .send()
        .await?;
    ensure!(res.status().as_u16() == 200, "{}", res.status());
    let (frames, closed) = x.closed().await?;
    ensure!(closed.code == 1008, "{closed:?}");
    ensure!(
        frames.iter().any(|f| f["code"] == "forbidden"),
        "the removed member is told why: {frames:?}"
    );
    stream.ended(Duration::from_secs(10)).await?;
    // No way back in, and nothing they post is stored.
    let mut again = s.ws(&sam, group, None).await?;
    let (_, closed) = again.closed().await?;
    ensure!(closed.code == 1008, "{closed:?}");
    let (status, body) = s
        .call(
            Some(&sam),
            reqwest::Method::POST,
            &format!("/api/v1/chat/conversations/{group}/messages"),
            Some(json!({"content": "still here?", "client_msg_id": "gone-1"})),
        )
        .await?;
    ensure!(status == 403, "{status} {body}");
    // The others go on, and the removed member receives none of it.
    c.say(group, "after the removal", "g-1").await?;
    c.expect("ack").await?;
    let stored = s.wait_stored(group, 1, Duration::from_secs(15)).await?;
    ensure!(stored.iter().all(|(_, key)| key != "gone-1"), "{stored:?}");
    Ok(())
}

/// The count of `route` in the origin's `http_requests_total`.
async fn origin_calls(s: &Stack, route: &str) -> anyhow::Result<f64> {
    let text = s
        .http()
        .get(format!("http://127.0.0.1:{}/metrics", s.origin_port))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("http_requests_total") && l.contains(&format!("route=\"{route}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

pub async fn probing_unknown_conversations_costs_one_origin_call_and_stores_nothing(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let alex = s.user("Alex").await?;
    let route = "/internal/v1/conversations/{id}/members";
    let unknown = 9_000_000 + i64::from(rand_u16());
    let before = origin_calls(s, route).await?;
    for _ in 0..5 {
        let mut ws = s.ws(&alex, unknown, None).await?;
        let (frames, closed) = ws.closed().await?;
        ensure!(closed.code == 1008, "{closed:?}");
        ensure!(
            frames.iter().any(|f| f["code"] == "not_found"),
            "{frames:?}"
        );
        match s
            .sse(unknown, &format!("token={}", alex.token), &[])
            .await?
        {
            Err((404, body)) if body["code"] == "not_found" => {}
            other => bail!("SSE to an unknown conversation: {other:?}"),
        }
    }
    let after = origin_calls(s, route).await?;
    ensure!(
        after - before == 1.0,
        "ten probes of one unknown id asked the origin {} times",
        after - before
    );
    // The room was never set up: a conversation created later under a
    // fresh id works from scratch (and the probe left no state that could
    // shadow it).
    let (_, sam, conv) = s.pair().await?;
    let mut ws = s.ws(&sam, conv, None).await?;
    ws.say(conv, "hello", "probe-1").await?;
    let ack = ws.expect("ack").await?;
    ensure!(ack["seq"] == 1, "{ack}");
    Ok(())
}

fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos % 60_000) as u16
}

pub async fn a_resend_of_a_key_the_room_forgot_returns_the_original_over_ws_and_post(
    s: &mut Stack,
) -> anyhow::Result<()> {
    // The suite's rooms cache 4 keys; the sixth message pushes the first
    // two out of memory.
    let (alex, _sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    let mut first = None;
    for i in 1..=6 {
        a.say(conv, &format!("m{i}"), &format!("old-{i}")).await?;
        let ack = a.expect("ack").await?;
        if i == 1 {
            first = Some(ack);
        }
    }
    let first = first.context("first ack")?;
    a.drain(QUIET).await?;
    a.say(conv, "m1 again", "old-1").await?;
    let again = a.expect("ack").await?;
    ensure!(
        again["seq"] == first["seq"] && again["id"] == first["id"],
        "{again} vs {first}"
    );
    let (status, body) = s
        .call(
            Some(&alex),
            reqwest::Method::POST,
            &format!("/api/v1/chat/conversations/{conv}/messages"),
            Some(json!({"content": "m2 again", "client_msg_id": "old-2"})),
        )
        .await?;
    ensure!(status == 200, "{status} {body}");
    ensure!(
        body["seq"] == 2 && body["content"] == "m2",
        "the original: {body}"
    );
    // Nothing new was stored or broadcast.
    let frames = a.drain(QUIET).await?;
    ensure!(!frames.iter().any(|f| f["type"] == "message"), "{frames:?}");
    let stored = s.wait_stored(conv, 6, Duration::from_secs(15)).await?;
    ensure!(stored.len() == 6, "{stored:?}");
    Ok(())
}

/// The next group-change frame (`conversation_changed` or
/// `conversation_removed`) about `conversation` on `ws`; other frames stay
/// in its backlog.
async fn group_frame(ws: &mut e2e::Ws, conversation: i64) -> anyhow::Result<String> {
    let f = ws
        .expect_where(&format!("a change of {conversation}"), |f| {
            (f["type"] == "conversation_changed" || f["type"] == "conversation_removed")
                && f["conversation_id"] == conversation
        })
        .await?;
    ensure!(
        f.as_object().is_some_and(|o| o.len() == 2),
        "only the type and the id: {f}"
    );
    Ok(f["type"].as_str().unwrap_or_default().to_owned())
}

/// The next `kind` event on an always-on SSE stream: about `conversation`.
async fn group_event(events: &mut e2e::Sse, conversation: i64, kind: &str) -> anyhow::Result<()> {
    let (_, data) = events.expect(kind).await?;
    ensure!(data["conversation_id"] == conversation, "{data}");
    Ok(())
}

pub async fn renaming_and_member_changes_through_the_edge_reach_every_device_of_every_member(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let a = s.user("A").await?;
    let b = s.user("B").await?;
    let c = s.user("C").await?;
    let d = s.user("D").await?;
    let group = s.group(&a, &[&b, &c]).await?;
    let path = format!("/api/v1/chat/conversations/{group}");
    // Every kind of always-on connection: A and B by token, C by ticket
    // and on a second device over SSE, D (not in the group yet) by ticket.
    let mut wa = s.always_on(&a).await?;
    let mut wb = s.always_on(&b).await?;
    let ticket = s.ticket(&c, None).await?;
    let mut wc = s
        .ws_with_path("/api/v1/chat/ws", &format!("ticket={ticket}"))
        .await?;
    let auth = [("authorization", format!("Bearer {}", c.token))];
    let mut ec = s
        .sse_at("/api/v1/chat/events", &auth)
        .await?
        .map_err(|(status, body)| anyhow::anyhow!("{status}: {body}"))?;
    let ticket = s.ticket(&d, None).await?;
    let mut wd = s
        .ws_with_path("/api/v1/chat/ws", &format!("ticket={ticket}"))
        .await?;
    // A message, so that B's and C's objects subscribe to the room.
    let mut room = s.ws(&a, group, None).await?;
    room.say(group, "before", "gc-1").await?;
    room.expect("ack").await?;
    for ws in [&mut wb, &mut wc] {
        ws.expect_where("the first message", |f| {
            f["type"] == "message" && f["message"]["conversation_id"] == group
        })
        .await?;
    }

    // A renames: every member's every device hears of it, A's own too.
    let (status, body) = s
        .call(
            Some(&a),
            reqwest::Method::PATCH,
            &path,
            Some(json!({"name": "Renamed"})),
        )
        .await?;
    ensure!(
        status == 200 && body["name"] == "Renamed",
        "{status} {body}"
    );
    for ws in [&mut wa, &mut wb, &mut wc] {
        ensure!(group_frame(ws, group).await? == "conversation_changed");
    }
    group_event(&mut ec, group, "conversation_changed").await?;
    let (status, body) = s.call(Some(&b), reqwest::Method::GET, &path, None).await?;
    ensure!(
        status == 200 && body["name"] == "Renamed",
        "{status} {body}"
    );

    // A adds D: D is told too (a member now), and so are the others.
    let (status, body) = s
        .call(
            Some(&a),
            reqwest::Method::POST,
            &format!("{path}/participants"),
            Some(json!({"user_ids": [d.id]})),
        )
        .await?;
    ensure!(status == 200, "{status} {body}");
    for ws in [&mut wd, &mut wb, &mut wc] {
        ensure!(group_frame(ws, group).await? == "conversation_changed");
    }
    group_event(&mut ec, group, "conversation_changed").await?;
    // B learns who the newcomer is from their card alone.
    let (status, card) = s
        .call(
            Some(&b),
            reqwest::Method::GET,
            &format!("/api/v1/users/{}", d.id),
            None,
        )
        .await?;
    ensure!(status == 200, "{status} {card}");
    ensure!(
        card["id"] == d.id && card["full_name"] == "D" && card["is_online"].is_boolean(),
        "{card}"
    );

    // A removes C: C is told on both devices that they are out, the
    // others that the group changed.
    let (status, body) = s
        .call(
            Some(&a),
            reqwest::Method::DELETE,
            &format!("{path}/participants"),
            Some(json!({"user_ids": [c.id]})),
        )
        .await?;
    ensure!(status == 200, "{status} {body}");
    ensure!(group_frame(&mut wc, group).await? == "conversation_removed");
    group_event(&mut ec, group, "conversation_removed").await?;
    for ws in [&mut wb, &mut wd] {
        ensure!(group_frame(ws, group).await? == "conversation_changed");
    }
    let (status, _) = s.call(Some(&c), reqwest::Method::GET, &path, None).await?;
    ensure!(status == 403, "{status}");
    // The room forwards nothing more of the group to C's connection,
    // while B gets it.
    room.say(group, "after", "gc-2").await?;
    room.expect("ack").await?;
    wb.expect_where("the message after the removal", |f| {
        f["type"] == "message" && f["message"]["content"] == "after"
    })
    .await?;
    // (The first message is seq 1, this one 2.)
    let late = wc.drain(QUIET).await?;
    ensure!(
        !late.iter().any(|f| {
            (f["type"] == "message"
                && f["message"]["conversation_id"] == group
                && f["message"]["seq"] == 2)
                || (f["type"] == "conversation_updated"
                    && f["conversation_id"] == group
                    && f["seq"] == 2)
        }),
        "the removed member still hears the group: {late:?}"
    );

    // B may not rename it: 403 through the edge, and nobody is told. The
    // next change B hears of is A removing B (frames keep their order on
    // a connection, so a frame for the refused rename would come first).
    let (status, body) = s
        .call(
            Some(&b),
            reqwest::Method::PATCH,
            &path,
            Some(json!({"name": "B's group"})),
        )
        .await?;
    ensure!(
        status == 403 && body["code"] == "forbidden",
        "{status} {body}"
    );
    let (status, body) = s
        .call(
            Some(&a),
            reqwest::Method::DELETE,
            &format!("{path}/participants"),
            Some(json!({"user_ids": [b.id]})),
        )
        .await?;
    ensure!(status == 200, "{status} {body}");
    ensure!(group_frame(&mut wb, group).await? == "conversation_removed");
    ensure!(group_frame(&mut wd, group).await? == "conversation_changed");
    let (_, body) = s.call(Some(&d), reqwest::Method::GET, &path, None).await?;
    ensure!(body["name"] == "Renamed", "{body}");
    Ok(())
}
