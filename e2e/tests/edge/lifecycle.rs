//! Messages that change after they are sent: edits, deletes, reactions,
//! replies and mentions through the real Worker and Room, and what is left
//! of a deleted message in PostgreSQL and on the edge's disk.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use e2e::media::{contains, eventually, pdf, upload};
use e2e::{Stack, User};
use reqwest::Method;
use serde_json::{Value, json};

const QUIET: Duration = Duration::from_millis(700);
const FLUSHED: Duration = Duration::from_secs(15);

/// Sends `content` as `user` on `ws` and waits for its ack: (seq, id).
async fn sent(
    ws: &mut e2e::Ws,
    conv: i64,
    content: &str,
    key: &str,
) -> anyhow::Result<(i64, String)> {
    ws.say(conv, content, key).await?;
    let ack = ws.expect("ack").await?;
    Ok((
        ack["seq"].as_i64().context("seq")?,
        ack["id"].as_str().context("id")?.to_owned(),
    ))
}

/// The conversation's history as `user` sees it over REST.
async fn history(s: &Stack, user: &User, conv: i64) -> anyhow::Result<Vec<Value>> {
    let (status, body) = s
        .call(
            Some(user),
            Method::GET,
            &format!("/api/v1/chat/conversations/{conv}/messages"),
            None,
        )
        .await?;
    ensure!(status == 200, "history: {status} {body}");
    Ok(body["messages"].as_array().cloned().unwrap_or_default())
}

/// Waits until PostgreSQL's `conversations.last_seq` reaches `seq` (changes
/// advance it too).
async fn flushed_to(s: &Stack, conv: i64, seq: i64) -> anyhow::Result<()> {
    eventually("flushed to PostgreSQL", FLUSHED, || async {
        let db = s.pool.get().await?;
        let last: i64 = db
            .query_one("SELECT last_seq FROM conversations WHERE id = $1", &[&conv])
            .await?
            .get(0);
        Ok((last >= seq).then_some(()))
    })
    .await
}

pub async fn an_edit_and_a_delete_reach_the_other_member_live_and_after_a_reconnect(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    let mut b = s.ws(&sam, conv, None).await?;
    let (seq, id) = sent(&mut a, conv, "see you at 6", "m1").await?;
    b.expect("message").await?;
    // Sam is away while Alex fixes the time.
    b.close().await?;
    a.send(
        json!({"type": "edit", "conversation_id": conv, "message_id": id,
                  "content": "see you at 7", "client_msg_id": "e1"}),
    )
    .await?;
    let ack = a.expect("ack").await?;
    ensure!(ack["seq"] == seq + 1, "the edit takes the next seq: {ack}");
    let mut b = s.ws(&sam, conv, Some(seq)).await?;
    let edited = b.expect("message_edited").await?;
    ensure!(
        edited["message_id"] == id.as_str()
            && edited["content"] == "see you at 7"
            && edited["seq"] == seq + 1
            && edited["message_seq"] == seq
            && edited["user_id"] == alex.id,
        "{edited}"
    );
    // A resend of the edit stores nothing and gets the same ack.
    a.send(
        json!({"type": "edit", "conversation_id": conv, "message_id": id,
                  "content": "see you at 7", "client_msg_id": "e1"}),
    )
    .await?;
    let again = a.expect("ack").await?;
    ensure!(again["seq"] == seq + 1, "{again}");
    // Live: the delete.
    a.send(json!({"type": "delete", "conversation_id": conv, "message_id": id}))
        .await?;
    let deleted = b.expect("message_deleted").await?;
    ensure!(
        deleted["message_id"] == id.as_str() && deleted["seq"] == seq + 2,
        "{deleted}"
    );
    ensure!(
        b.drain(QUIET)
            .await?
            .iter()
            .all(|f| f["type"] != "message_edited"),
        "the resend was not relayed again"
    );
    // From scratch: the message replays as a tombstone, and the earlier
    // edit replays without its words.
    let mut fresh = s.ws(&sam, conv, Some(0)).await?;
    let frames = fresh.drain(QUIET).await?;
    let message = frames
        .iter()
        .find(|f| f["type"] == "message")
        .context("the message")?;
    ensure!(
        message["message"]["content"] == "" && !message["message"]["deleted_at"].is_null(),
        "{message}"
    );
    let text = serde_json::to_string(&frames)?;
    ensure!(!text.contains("see you at"), "erased from replay: {text}");
    // REST history shows the current state.
    flushed_to(s, conv, seq + 2).await?;
    let h = history(s, &sam, conv).await?;
    let m = h
        .iter()
        .find(|m| m["id"] == id.as_str())
        .with_context(|| format!("{id} in history: {h:?}"))?;
    ensure!(m["content"] == "" && !m["deleted_at"].is_null(), "{m}");
    ensure!(h.len() == 1, "changes are not messages in history: {h:?}");
    Ok(())
}

pub async fn only_the_sender_edits_and_only_a_moderator_deletes_anothers_message(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let alex = s.user("Alex").await?;
    let sam = s.user("Sam").await?;
    let kim = s.user("Kim").await?;
    let conv = s.group(&alex, &[&sam, &kim]).await?;
    let mut sam_ws = s.ws(&sam, conv, None).await?;
    let (_, id) = sent(&mut sam_ws, conv, "my split: push pull legs", "s1").await?;
    let mut kim_ws = s.ws(&kim, conv, None).await?;
    kim_ws
        .send(json!({"type": "edit", "conversation_id": conv, "message_id": id, "content": "mine now"}))
        .await?;
    let refused = kim_ws.expect("error").await?;
    ensure!(refused["code"] == "forbidden", "{refused}");
    // The connection survives a refused change.
    kim_ws
        .send(json!({"type": "delete", "conversation_id": conv, "message_id": id}))
        .await?;
    let refused = kim_ws.expect("error").await?;
    ensure!(refused["code"] == "forbidden", "{refused}");
    let path = format!("/api/v1/chat/conversations/{conv}/messages/{id}");
    let (status, body) = s
        .call(
            Some(&kim),
            Method::PATCH,
            &path,
            Some(json!({"content": "x"})),
        )
        .await?;
    ensure!(
        status == 403 && body["code"] == "forbidden",
        "{status} {body}"
    );
    let (status, body) = s.call(Some(&kim), Method::DELETE, &path, None).await?;
    ensure!(
        status == 403 && body["code"] == "forbidden",
        "{status} {body}"
    );
    // The sender edits over HTTP; the group's creator deletes.
    let (status, body) = s
        .call(
            Some(&sam),
            Method::PATCH,
            &path,
            Some(json!({"content": "my split: upper lower"})),
        )
        .await?;
    ensure!(
        status == 200 && body["type"] == "message_edited",
        "{status} {body}"
    );
    let live = kim_ws.expect("message_edited").await?;
    ensure!(live["content"] == "my split: upper lower", "{live}");
    let (status, body) = s.call(Some(&alex), Method::DELETE, &path, None).await?;
    ensure!(
        status == 200 && body["type"] == "message_deleted",
        "{status} {body}"
    );
    ensure!(body["user_id"] == alex.id, "{body}");
    let (status, body) = s
        .call(
            Some(&sam),
            Method::PATCH,
            &path,
            Some(json!({"content": "back"})),
        )
        .await?;
    ensure!(
        status == 409 && body["code"] == "message_deleted",
        "{status} {body}"
    );
    let (status, body) = s
        .call(
            Some(&sam),
            Method::PATCH,
            &format!(
                "/api/v1/chat/conversations/{conv}/messages/00000000-0000-7000-8000-000000000000"
            ),
            Some(json!({"content": "x"})),
        )
        .await?;
    ensure!(
        status == 404 && body["code"] == "message_not_found",
        "{status} {body}"
    );
    Ok(())
}

/// The edge's internal media route for an attachment's `variant`, as the
/// origin calls it (a `PUT` carries a small JPEG-typed body): its status.
async fn media_status(s: &Stack, method: Method, id: &str, variant: &str) -> anyhow::Result<u16> {
    let mut req = s
        .http()
        .request(
            method.clone(),
            format!("{}/api/v1/internal/media/{id}/{variant}", s.edge),
        )
        .header(
            shared::protocol::internal::SERVICE_SECRET_HEADER,
            &s.secrets.service,
        );
    if method == Method::PUT {
        req = req
            .header("content-type", "image/jpeg")
            .body(vec![0xFF_u8; 2_000]);
    }
    Ok(req.send().await?.status().as_u16())
}

/// Runs the `sqlite3` shell on `db`.
fn sqlite3(db: &Path, command: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new("sqlite3")
        .arg(db)
        .arg(command)
        .output()
        .context("run sqlite3 (cargo xtask test installs it)")?;
    ensure!(
        out.status.success(),
        "sqlite3 {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> anyhow::Result<Vec<String>> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if contains(&std::fs::read(&path)?, needle) {
                hits.push(path.display().to_string());
            }
        }
    }
    Ok(hits)
}

pub async fn a_deleted_message_is_erased_from_postgres_the_rooms_storage_and_the_bucket(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    // Words that appear nowhere else, before and after an edit.
    let before = format!("knee-pain-{}", uuid::Uuid::now_v7().simple());
    let after = format!("ankle-pain-{}", uuid::Uuid::now_v7().simple());
    let (status, att) = upload(
        s,
        &alex,
        conv,
        pdf(4_000),
        "application/pdf",
        "?name=scan.pdf",
    )
    .await?;
    ensure!(status == 201, "{status} {att}");
    let att_id = att["id"].as_str().context("attachment id")?.to_owned();
    a.send(
        json!({"type": "message", "conversation_id": conv, "content": before,
                  "client_msg_id": "d1", "attachment_ids": [att_id]}),
    )
    .await?;
    let ack = a.expect("ack").await?;
    let id = ack["id"].as_str().context("id")?.to_owned();
    let seq = ack["seq"].as_i64().context("seq")?;
    a.send(json!({"type": "edit", "conversation_id": conv, "message_id": id, "content": after}))
        .await?;
    a.expect("ack").await?;
    flushed_to(s, conv, seq + 1).await?;
    let db = s.pool.get().await?;
    let in_pg = |needle: String| {
        let db = &db;
        async move {
            let n: i64 = db
                .query_one(
                    "SELECT (SELECT count(*) FROM messages WHERE content LIKE '%' || $1 || '%')
                          + (SELECT count(*) FROM message_events WHERE content LIKE '%' || $1 || '%')",
                    &[&needle],
                )
                .await?
                .get(0);
            anyhow::Ok(n)
        }
    };
    ensure!(
        in_pg(after.clone()).await? >= 1,
        "the edit reached PostgreSQL"
    );
    ensure!(
        !files_containing(s.edge_state_dir(), after.as_bytes())?.is_empty(),
        "the room's storage holds the edit before the delete (the scan works)"
    );
    let original = media_status(s, Method::GET, &att_id, "original").await?;
    ensure!(original == 200, "the object is in the bucket: {original}");

    a.send(json!({"type": "delete", "conversation_id": conv, "message_id": id}))
        .await?;
    a.expect("ack").await?;
    flushed_to(s, conv, seq + 2).await?;
    for needle in [&before, &after] {
        ensure!(
            in_pg(needle.clone()).await? == 0,
            "{needle} left in PostgreSQL"
        );
    }
    let row = db
        .query_one(
            "SELECT content, deleted_at IS NOT NULL FROM messages WHERE id = $1::text::uuid",
            &[&id],
        )
        .await?;
    ensure!(
        row.get::<_, String>(0).is_empty() && row.get::<_, bool>(1),
        "tombstone in PostgreSQL"
    );
    ensure!(
        e2e::media::attachment_row(s, att_id.parse()?)
            .await?
            .is_none(),
        "the attachment's row is gone"
    );
    eventually("the object is erased from the bucket", FLUSHED, || async {
        let status = media_status(s, Method::GET, &att_id, "original").await?;
        Ok((status == 404).then_some(()))
    })
    .await?;
    // A processed copy the origin writes after the delete (it was busy
    // with the file) does not outlive the erased original.
    let late = media_status(s, Method::PUT, &att_id, "thumb").await?;
    ensure!(
        late == 404,
        "a copy of an erased attachment is refused: {late}"
    );
    let left = media_status(s, Method::GET, &att_id, "thumb").await?;
    ensure!(left == 404, "and not left in the bucket: {left}");
    // Nothing of either text is left in the room's database: no row of any
    // table, and once the write-ahead log is checkpointed into the file
    // (SQLite does so on its own every 1,000 pages), not a byte of it
    // (freed space is zeroed). Until that checkpoint the log still holds
    // the pages as they were: ARCHITECTURE.md (Erasure) says so.
    let mut rooms: Vec<String> = files_containing(s.edge_state_dir(), before.as_bytes())?
        .into_iter()
        .map(|h| h.trim_end_matches("-wal").to_owned())
        .collect();
    rooms.dedup();
    for db in rooms {
        let copy = e2e::stack::TempDir::new("vibe-room-copy")?;
        let file = copy.path().join("room.sqlite");
        std::fs::copy(&db, &file)?;
        if Path::new(&format!("{db}-wal")).exists() {
            std::fs::copy(format!("{db}-wal"), copy.path().join("room.sqlite-wal"))?;
        }
        let dump = sqlite3(&file, ".dump")?;
        ensure!(dump.contains("CREATE TABLE messages"), "{dump}");
        sqlite3(&file, "PRAGMA wal_checkpoint(TRUNCATE);")?;
        let bytes = std::fs::read(&file)?;
        for needle in [&before, &after] {
            ensure!(!dump.contains(needle.as_str()), "{needle} in a row: {dump}");
            ensure!(
                !contains(&bytes, needle.as_bytes()),
                "{needle} in the database file after a checkpoint"
            );
        }
    }
    drop(sam);
    Ok(())
}

pub async fn reactions_and_replies_over_http_reach_an_sse_member(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut sse = s
        .sse(
            conv,
            "",
            &[("authorization", format!("Bearer {}", sam.token))],
        )
        .await?
        .map_err(|(status, body)| anyhow::anyhow!("sse: {status} {body}"))?;
    let (status, m) = s
        .call(
            Some(&alex),
            Method::POST,
            &format!("/api/v1/chat/conversations/{conv}/messages"),
            Some(json!({"content": "deadlift PR 180 kg", "client_msg_id": "r1"})),
        )
        .await?;
    ensure!(status == 201, "{status} {m}");
    let id = m["id"].as_str().context("id")?.to_owned();
    sse.expect("message").await?;
    let path = format!("/api/v1/chat/conversations/{conv}/messages/{id}/reactions/%F0%9F%92%AA");
    let (status, body) = s.call(Some(&sam), Method::PUT, &path, None).await?;
    ensure!(
        status == 200 && body["type"] == "reaction" && body["emoji"] == "💪" && body["count"] == 1,
        "{status} {body}"
    );
    let (event_id, live) = sse.expect("reaction").await?;
    ensure!(live["on"] == true && live["user_id"] == sam.id, "{live}");
    ensure!(
        event_id.as_deref() == live["seq"].as_i64().map(|s| s.to_string()).as_deref(),
        "SSE ids follow changes' seqs too: {event_id:?} {live}"
    );
    // Again: nothing changes, an ack.
    let (status, body) = s.call(Some(&sam), Method::PUT, &path, None).await?;
    ensure!(status == 200 && body["type"] == "ack", "{status} {body}");
    // Text is not an emoji.
    let (status, body) = s
        .call(
            Some(&sam),
            Method::PUT,
            &format!("/api/v1/chat/conversations/{conv}/messages/{id}/reactions/ok"),
            None,
        )
        .await?;
    ensure!(
        status == 422 && body["code"] == "invalid_emoji",
        "{status} {body}"
    );
    // A reply quotes the original.
    let (status, reply) = s
        .call(
            Some(&sam),
            Method::POST,
            &format!("/api/v1/chat/conversations/{conv}/messages"),
            Some(json!({"content": "beast", "client_msg_id": "r2", "reply_to": id, "mentions": [alex.id, 424242]})),
        )
        .await?;
    ensure!(status == 201, "{status} {reply}");
    ensure!(
        reply["reply_to"]["id"] == id.as_str()
            && reply["reply_to"]["content"] == "deadlift PR 180 kg"
            && reply["mentions"] == json!([alex.id]),
        "{reply}"
    );
    let (status, body) = s.call(Some(&sam), Method::DELETE, &path, None).await?;
    ensure!(
        status == 200 && body["on"] == false && body["count"] == 0,
        "{status} {body}"
    );
    // History: reactions summed with the caller's own, the quote, mentions.
    let (status, _) = s.call(Some(&sam), Method::PUT, &path, None).await?;
    ensure!(status == 200);
    let reply_seq = reply["seq"].as_i64().context("seq")?;
    flushed_to(s, conv, reply_seq + 2).await?;
    let h = history(s, &sam, conv).await?;
    let first = h
        .iter()
        .find(|m| m["id"] == id.as_str())
        .context("original")?;
    ensure!(
        first["reactions"]
            == json!([{"emoji": "💪", "count": 1, "me": true, "user_ids": [sam.id]}]),
        "{first}"
    );
    let h = history(s, &alex, conv).await?;
    let first = h
        .iter()
        .find(|m| m["id"] == id.as_str())
        .context("original")?;
    ensure!(first["reactions"][0]["me"] == false, "{first}");
    let second = h.iter().find(|m| m["id"] == reply["id"]).context("reply")?;
    ensure!(
        second["reply_to"]["content"] == "deadlift PR 180 kg"
            && second["mentions"] == json!([alex.id]),
        "{second}"
    );
    Ok(())
}

pub async fn changes_travel_on_the_always_on_socket_both_ways(s: &mut Stack) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut a = s.ws(&alex, conv, None).await?;
    let (seq, id) = sent(&mut a, conv, "rest day", "u1").await?;
    let mut sam_on = s.always_on(&sam).await?;
    sam_on
        .send(json!({"type": "resume", "since": {conv.to_string(): seq}}))
        .await?;
    sam_on.expect("resumed").await?;
    // Sam reacts from the always-on socket: an ack back, the event to Alex.
    sam_on
        .send(
            json!({"type": "react", "conversation_id": conv, "message_id": id,
                     "emoji": "🔥", "client_msg_id": "x1"}),
        )
        .await?;
    let ack = sam_on.expect("ack").await?;
    ensure!(
        ack["seq"] == seq + 1 && ack["client_msg_id"] == "x1",
        "{ack}"
    );
    let r = a.expect("reaction").await?;
    ensure!(r["emoji"] == "🔥" && r["user_id"] == sam.id, "{r}");
    // Alex edits: Sam's always-on socket gets it live, once.
    a.send(json!({"type": "edit", "conversation_id": conv, "message_id": id, "content": "rest day (walk)"}))
        .await?;
    let e = sam_on.expect("message_edited").await?;
    ensure!(
        e["content"] == "rest day (walk)" && e["seq"] == seq + 2,
        "{e}"
    );
    let rest = sam_on.drain(QUIET).await?;
    ensure!(
        rest.iter()
            .filter(|f| f["type"] == "message_edited")
            .count()
            == 0,
        "once: {rest:?}"
    );
    Ok(())
}

async fn search(s: &Stack, who: &User, q: &str) -> anyhow::Result<(u16, Value)> {
    s.call(
        Some(who),
        Method::GET,
        &format!("/api/v1/chat/search?q={q}"),
        None,
    )
    .await
}

pub async fn search_finds_for_participants_only(s: &mut Stack) -> anyhow::Result<()> {
    let alex = s.user("Alex").await?;
    let sam = s.user("Sam").await?;
    let eve = s.user("Eve").await?;
    let conv = s.group(&alex, &[&sam]).await?;
    let word = format!(
        "kettlebell{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let mut a = s.ws(&alex, conv, None).await?;
    let (seq, _) = sent(&mut a, conv, &format!("{word} swings, 3 sets"), "q1").await?;
    flushed_to(s, conv, seq).await?;
    let (status, body) = search(s, &sam, &word).await?;
    ensure!(status == 200, "{status} {body}");
    let hits = body["hits"].as_array().context("hits")?;
    ensure!(
        hits.len() == 1 && hits[0]["conversation_id"] == conv,
        "{body}"
    );
    ensure!(
        hits[0]["snippet"]
            .as_str()
            .is_some_and(|t| t.contains(&format!("«{word}»"))),
        "{body}"
    );
    let (status, body) = search(s, &eve, &word).await?;
    ensure!(
        status == 200 && body["hits"] == json!([]),
        "{status} {body}"
    );
    // Removed from the group, Sam finds nothing of it any more.
    let (status, body) = s
        .call(
            Some(&alex),
            Method::DELETE,
            &format!("/api/v1/chat/conversations/{conv}/participants"),
            Some(json!({"user_ids": [sam.id]})),
        )
        .await?;
    ensure!((200..300).contains(&status), "{status} {body}");
    let (_, body) = search(s, &sam, &word).await?;
    ensure!(body["hits"] == json!([]), "{body}");
    Ok(())
}
