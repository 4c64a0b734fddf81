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
