//! The message lifecycle at the origin (issue 15): edits, deletes and
//! reactions arrive through the ingest as change events (`change`), in the
//! conversation's seq order but in batches that may commit out of order;
//! history, the conversation list and the internal routes show each message
//! as it is now; replies are quoted when read; mentions count as unread.

use chrono::{DateTime, SubsecRound, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::Role;
use uuid::Uuid;

use crate::helpers::{TestApp, TestUser, message, message_id, spawn_app};

/// Now, at PostgreSQL's precision (microseconds), so times read back compare
/// equal.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A change event at `seq` by `actor` to the message at `target_seq`, as the
/// edge flushes it: `change` is the change's own fields (`kind` and the
/// rest).
fn change(conversation: i64, actor: i64, seq: i64, target_seq: i64, mut change: Value) -> Value {
    change["target_id"] = json!(message_id(conversation, target_seq));
    json!({
        "id": message_id(conversation, seq),
        "conversation_id": conversation,
        "seq": seq,
        "sender_id": actor,
        "content": "",
        "created_at": now(),
        "client_msg_id": format!("c-{conversation}-{seq}"),
        "change": change,
    })
}

fn edit(conversation: i64, actor: i64, seq: i64, target_seq: i64, content: &str) -> Value {
    change(
        conversation,
        actor,
        seq,
        target_seq,
        json!({"kind": "edit", "content": content}),
    )
}

fn delete(conversation: i64, actor: i64, seq: i64, target_seq: i64) -> Value {
    change(
        conversation,
        actor,
        seq,
        target_seq,
        json!({"kind": "delete"}),
    )
}

fn react(conversation: i64, actor: i64, seq: i64, target_seq: i64, emoji: &str, on: bool) -> Value {
    change(
        conversation,
        actor,
        seq,
        target_seq,
        json!({"kind": "react", "emoji": emoji, "on": on}),
    )
}

/// Posts `entries` as one ingest batch; the answer (200 asserted).
async fn ingest(app: &TestApp, entries: &[Value]) -> Value {
    let (status, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({ "messages": entries }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Posts `entries` and asserts every one is stored.
async fn store(app: &TestApp, entries: &[Value]) -> Value {
    let body = ingest(app, entries).await;
    assert_eq!(body["rejected"], json!([]), "{body}");
    assert_eq!(
        body["stored"].as_array().map(Vec::len),
        Some(entries.len()),
        "{body}"
    );
    body
}

/// The conversation's history as `user` reads it, oldest first.
async fn history(app: &TestApp, user: &TestUser, conversation: i64) -> Vec<Value> {
    let (status, body) = app
        .get(
            user,
            &format!("/api/v1/chat/conversations/{conversation}/messages"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["messages"].as_array().cloned().unwrap_or_default()
}

/// The message at `seq` in `user`'s history.
async fn shown(app: &TestApp, user: &TestUser, conversation: i64, seq: i64) -> Value {
    history(app, user, conversation)
        .await
        .into_iter()
        .find(|m| m["seq"] == seq)
        .unwrap_or_else(|| panic!("no message {seq}"))
}

/// `user`'s entry for `conversation` in the conversation list.
async fn listed(app: &TestApp, user: &TestUser, conversation: i64) -> Value {
    let (status, body) = app.get(user, "/api/v1/chat/conversations").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["conversations"]
        .as_array()
        .and_then(|l| l.iter().find(|c| c["id"] == conversation).cloned())
        .unwrap_or_else(|| panic!("{conversation} not listed: {body}"))
}

fn time(v: &Value) -> DateTime<Utc> {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"))
}

async fn text(app: &TestApp, sql: &str) -> Option<String> {
    let client = app.pool.get().await.expect("db");
    client.query_one(sql, &[]).await.expect("query").get(0)
}

#[tokio::test]
async fn an_edit_is_applied_and_shown_with_edited_at_without_moving_the_conversation() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    store(&app, &[message(id, alex.id, 1)]).await;
    let before = listed(&app, &sam, id).await;

    let fix = edit(id, alex.id, 2, 1, "fixed typo");
    store(&app, std::slice::from_ref(&fix)).await;

    let m = shown(&app, &sam, id, 1).await;
    assert_eq!(m["content"], "fixed typo");
    assert_eq!(time(&m["edited_at"]), time(&fix["created_at"]));
    assert!(m.get("deleted_at").is_none(), "{m}");
    // One message in history: the event is not one.
    assert_eq!(history(&app, &sam, id).await.len(), 1);
    let after = listed(&app, &sam, id).await;
    // The room restarts after the event's seq; the list keeps its order
    // (an edit is no new activity) and previews the new text; an event is
    // not unread.
    assert_eq!(after["last_seq"], 2);
    assert_eq!(after["updated_at"], before["updated_at"]);
    assert_eq!(after["last_message"]["content"], "fixed typo");
    assert_eq!(after["unread_count"], 1);
    assert_eq!(
        app.count(&format!(
            "SELECT edit_seq FROM messages WHERE id = '{}'",
            message_id(id, 1)
        ))
        .await,
        2
    );
}

#[tokio::test]
async fn changes_committed_before_their_message_apply_when_it_arrives() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;

    // The batch with the edit (seq 3) and a later one (seq 5, the newest
    // edit) commit before the batch with the message (seq 1); the older
    // edit's batch (seq 4) after it. And a delete (seq 6) of message 2
    // commits before message 2, along with an edit of it (seq 7, older
    // than nothing: the message is deleted, its text must not survive).
    store(&app, &[edit(id, alex.id, 3, 1, "second")]).await;
    store(
        &app,
        &[
            edit(id, alex.id, 5, 1, "third"),
            delete(id, alex.id, 6, 2),
            edit(id, alex.id, 7, 2, "never shown"),
        ],
    )
    .await;
    assert_eq!(app.count("SELECT count(*) FROM messages").await, 0);
    store(&app, &[message(id, alex.id, 1), message(id, sam.id, 2)]).await;
    store(&app, &[edit(id, alex.id, 4, 1, "stale")]).await;

    let page = history(&app, &sam, id).await;
    assert_eq!(page.len(), 2);
    assert_eq!(page[0]["content"], "third");
    assert!(page[0]["edited_at"].is_string());
    // Message 2 was Sam's and Alex deleted it: in a direct conversation
    // only its sender may, so the early delete does not apply, and neither
    // does Alex's edit of it.
    assert_eq!(page[1]["content"], "message 2");
    assert!(page[1].get("deleted_at").is_none(), "{}", page[1]);
    assert_eq!(
        app.count("SELECT last_seq FROM conversations WHERE kind = 'direct'")
            .await,
        7
    );

    // The same early delete by its sender erases the message on arrival,
    // and the text of an edit stored before it.
    let group = app.group(&alex, "Crew", &[&sam]).await;
    store(
        &app,
        &[
            edit(group, sam.id, 2, 1, "secret edit"),
            delete(group, sam.id, 3, 1),
        ],
    )
    .await;
    store(&app, &[message(group, sam.id, 1)]).await;
    let m = shown(&app, &alex, group, 1).await;
    assert_eq!(m["content"], "");
    assert!(m["deleted_at"].is_string(), "{m}");
    assert_eq!(
        text(
            &app,
            &format!(
                "SELECT string_agg(coalesce(content, '<erased>'), ',') FROM message_events
                 WHERE conversation_id = {group}"
            )
        )
        .await
        .as_deref(),
        Some("<erased>,<erased>")
    );
}

#[tokio::test]
async fn an_edit_older_by_seq_than_the_applied_one_does_not_win() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    store(&app, &[message(id, alex.id, 1)]).await;
    let newest = edit(id, alex.id, 3, 1, "newest");
    store(&app, std::slice::from_ref(&newest)).await;
    store(&app, &[edit(id, alex.id, 2, 1, "older")]).await;
    let m = shown(&app, &sam, id, 1).await;
    assert_eq!(m["content"], "newest");
    assert_eq!(time(&m["edited_at"]), time(&newest["created_at"]));
    // Two edits in one batch: the later seq wins whatever the order listed.
    store(
        &app,
        &[
            edit(id, alex.id, 5, 1, "fifth"),
            edit(id, alex.id, 4, 1, "fourth"),
        ],
    )
    .await;
    assert_eq!(shown(&app, &sam, id, 1).await["content"], "fifth");
}

/// Reserves an upload of `uploader`'s in `conversation`; its id.
async fn upload(app: &TestApp, conversation: i64, uploader: &TestUser) -> Value {
    let (status, reserved) = app
        .internal_post(
            "/internal/v1/attachments",
            &json!({"conversation_id": conversation, "uploader_id": uploader.id,
                    "kind": "image", "mime": "image/jpeg", "size": 1000}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{reserved}");
    reserved["id"].clone()
}

#[tokio::test]
async fn a_delete_erases_the_content_its_edits_reactions_mentions_and_attachments() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    let photo = upload(&app, id, &alex).await;
    let mut first = message(id, alex.id, 1);
    first["content"] = json!("my address is 1 Main St");
    first["attachment_ids"] = json!([photo]);
    first["mentions"] = json!([sam.id]);
    let mut reply = message(id, alex.id, 2);
    reply["reply_to"] = json!(message_id(id, 1));
    store(&app, &[first, reply]).await;
    store(
        &app,
        &[
            edit(id, alex.id, 3, 1, "my address is 2 Main St"),
            react(id, sam.id, 4, 1, "👍", true),
        ],
    )
    .await;
    let m = shown(&app, &sam, id, 1).await;
    assert_eq!(m["attachments"].as_array().map(Vec::len), Some(1));
    assert_eq!(m["reactions"][0]["count"], 1);
    assert_eq!(m["mentions"], json!([sam.id]));

    // A delete (seq 6) and, in the same batch, a reaction just before it.
    store(
        &app,
        &[
            react(id, alex.id, 5, 1, "🔥", true),
            delete(id, alex.id, 6, 1),
        ],
    )
    .await;

    let m = shown(&app, &sam, id, 1).await;
    assert_eq!(m["content"], "");
    assert!(m["deleted_at"].is_string(), "{m}");
    for gone in [
        "attachments",
        "reactions",
        "mentions",
        "reply_to",
        "edited_at",
    ] {
        assert!(m.get(gone).is_none(), "{gone}: {m}");
    }
    // Erased in PostgreSQL, not only hidden.
    let client = app.pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT content, mentions, reply_to IS NULL, edited_at IS NULL FROM messages
             WHERE id = $1",
            &[&message_id(id, 1)],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "");
    assert_eq!(row.get::<_, Vec<i64>>(1), Vec::<i64>::new());
    assert!(row.get::<_, bool>(2) && row.get::<_, bool>(3));
    assert_eq!(
        app.count("SELECT count(*) FROM message_events WHERE content IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM message_events WHERE kind = 'react'")
            .await,
        0
    );
    assert_eq!(app.count("SELECT count(*) FROM attachments").await, 0);
    // The quote of it reads as deleted; the list previews a tombstone only
    // when it is the latest message.
    let quote = &shown(&app, &sam, id, 2).await["reply_to"];
    assert_eq!(
        *quote,
        json!({"id": message_id(id, 1), "seq": 1, "sender_id": alex.id, "content": "", "deleted": true})
    );
    store(&app, &[delete(id, alex.id, 7, 2)]).await;
    let entry = listed(&app, &sam, id).await;
    assert_eq!(entry["last_message"]["content"], "Message deleted");
    assert_eq!(entry["last_message"]["seq"], 2);

    // A reaction or an edit that commits after the delete (an earlier seq
    // in a late batch) keeps nothing.
    store(
        &app,
        &[
            react(id, sam.id, 8, 1, "❤️", true),
            edit(id, alex.id, 9, 1, "late text"),
        ],
    )
    .await;
    assert_eq!(
        app.count(
            "SELECT count(*) FROM message_events WHERE kind = 'react' OR content IS NOT NULL"
        )
        .await,
        0
    );
    assert_eq!(shown(&app, &sam, id, 1).await["content"], "");
}

#[tokio::test]
async fn reactions_are_summed_per_emoji_in_order_with_me_and_toggle_off() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let kim = app.user("Kim", Role::Member).await;
    let group = app.group(&alex, "Crew", &[&sam, &kim]).await;
    store(
        &app,
        &[message(group, alex.id, 1), message(group, alex.id, 2)],
    )
    .await;
    store(
        &app,
        &[
            react(group, alex.id, 3, 1, "👍", true),
            react(group, sam.id, 4, 1, "👍", true),
            react(group, sam.id, 5, 1, "❤️", true),
            react(group, kim.id, 6, 1, "👍", true),
            react(group, sam.id, 7, 1, "👍", false),
            react(group, kim.id, 8, 2, "🔥", true),
            react(group, kim.id, 9, 2, "🔥", false),
        ],
    )
    .await;
    let m = shown(&app, &alex, group, 1).await;
    assert_eq!(
        m["reactions"],
        json!([
            {"emoji": "👍", "count": 2, "me": true, "user_ids": [alex.id, kim.id]},
            {"emoji": "❤️", "count": 1, "me": false, "user_ids": [sam.id]},
        ])
    );
    let m = shown(&app, &sam, group, 1).await;
    assert_eq!(m["reactions"][0]["me"], false);
    assert_eq!(m["reactions"][1]["me"], true);
    // Taken back by everyone: no reactions at all.
    assert!(shown(&app, &kim, group, 2).await.get("reactions").is_none());
    // The conversation's detail carries them too.
    let (status, detail) = app
        .get(&kim, &format!("/api/v1/chat/conversations/{group}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        detail["messages"][0]["reactions"][0]["user_ids"],
        json!([alex.id, kim.id])
    );
}

#[tokio::test]
async fn a_replayed_batch_of_changes_is_stored_again_and_doubles_nothing() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    let batch = vec![
        message(id, alex.id, 1),
        message(id, alex.id, 2),
        edit(id, alex.id, 3, 1, "edited"),
        react(id, sam.id, 4, 1, "👍", true),
        delete(id, alex.id, 5, 2),
    ];
    let first = store(&app, &batch).await;
    let snapshot = || async {
        (
            app.count("SELECT count(*) FROM message_events").await,
            app.count("SELECT count(*) FROM messages").await,
            app.count(&format!(
                "SELECT last_seq FROM conversations WHERE id = {id}"
            ))
            .await,
        )
    };
    let before = snapshot().await;
    let page = history(&app, &sam, id).await;
    for _ in 0..2 {
        let again = store(&app, &batch).await;
        assert_eq!(again, first);
        assert_eq!(snapshot().await, before);
        assert_eq!(history(&app, &sam, id).await, page);
    }
    assert_eq!(before, (3, 2, 5));
    assert_eq!(page[0]["reactions"][0]["count"], 1);

    // A different entry at a taken seq is a conflict, whichever table
    // holds the seq; so is a different change with a used key.
    let mut at_message_seq = edit(id, alex.id, 1, 1, "x");
    at_message_seq["id"] = json!(Uuid::now_v7());
    at_message_seq["client_msg_id"] = json!("fresh-1");
    let mut at_event_seq = message(id, alex.id, 3);
    at_event_seq["id"] = json!(Uuid::now_v7());
    at_event_seq["client_msg_id"] = json!("fresh-2");
    let mut same_key = react(id, sam.id, 6, 1, "🔥", true);
    same_key["client_msg_id"] = json!(format!("c-{id}-4"));
    let body = ingest(&app, &[at_message_seq, at_event_seq, same_key]).await;
    assert_eq!(body["stored"], json!([]));
    let codes: Vec<&str> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["conflict", "conflict", "conflict"]);
    assert_eq!(snapshot().await, before);
}

#[tokio::test]
async fn a_reply_quotes_its_original_as_it_is_now() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    let other = app.group(&alex, "Other", &[&sam]).await;
    let photo = upload(&app, id, &sam).await;
    let mut long = message(id, sam.id, 1);
    long["content"] = json!("ü".repeat(130));
    let mut pic = message(id, sam.id, 2);
    pic["content"] = json!("");
    pic["attachment_ids"] = json!([photo]);
    let answer = |seq: i64, to: Uuid| {
        let mut m = message(id, alex.id, seq);
        m["reply_to"] = json!(to);
        m
    };
    store(&app, &[message(other, sam.id, 1)]).await;
    store(
        &app,
        &[
            long,
            pic,
            answer(3, message_id(id, 1)),
            answer(4, message_id(id, 2)),
            // Its original is in a batch not committed yet.
            answer(5, message_id(id, 9)),
            // A message of another conversation is never quoted.
            answer(6, message_id(other, 1)),
        ],
    )
    .await;
    let page = history(&app, &sam, id).await;
    let quote = &page[2]["reply_to"];
    assert_eq!(quote["id"], json!(message_id(id, 1)));
    assert_eq!(quote["seq"], 1);
    assert_eq!(quote["sender_id"], sam.id);
    assert_eq!(quote["deleted"], false);
    assert_eq!(
        quote["content"].as_str().unwrap(),
        format!("{}…", "ü".repeat(120))
    );
    assert_eq!(page[3]["reply_to"]["content"], "📷 Photo");
    assert!(page[4].get("reply_to").is_none(), "{}", page[4]);
    assert!(page[5].get("reply_to").is_none(), "{}", page[5]);

    // Edited, the quote reads the new text; deleted, it says so and
    // nothing more.
    store(&app, &[edit(id, sam.id, 7, 1, "short now")]).await;
    assert_eq!(
        shown(&app, &alex, id, 3).await["reply_to"]["content"],
        "short now"
    );
    store(&app, &[delete(id, sam.id, 8, 1)]).await;
    let quote = &shown(&app, &alex, id, 3).await["reply_to"];
    assert_eq!(quote["deleted"], true);
    assert_eq!(quote["content"], "");
    // The late original arrives: now it is quoted.
    store(&app, &[message(id, sam.id, 9)]).await;
    assert_eq!(
        shown(&app, &alex, id, 5).await["reply_to"]["content"],
        "message 9"
    );
}

#[tokio::test]
async fn unread_mentions_count_live_mentions_after_the_read_seq() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let kim = app.user("Kim", Role::Member).await;
    let group = app.group(&alex, "Crew", &[&sam, &kim]).await;
    let mention = |seq: i64, who: &[i64]| {
        let mut m = message(group, alex.id, seq);
        m["mentions"] = json!(who);
        m
    };
    store(
        &app,
        &[
            mention(1, &[sam.id]),
            mention(2, &[kim.id, sam.id, sam.id]),
            mention(3, &[kim.id]),
            mention(4, &[sam.id]),
            message(group, alex.id, 5),
        ],
    )
    .await;
    assert_eq!(listed(&app, &sam, group).await["unread_mentions"], 3);
    assert_eq!(listed(&app, &kim, group).await["unread_mentions"], 2);
    assert_eq!(listed(&app, &alex, group).await["unread_mentions"], 0);
    // Mentions are kept once each, in order, and shown.
    assert_eq!(
        shown(&app, &sam, group, 2).await["mentions"],
        json!([kim.id, sam.id])
    );
    // A deleted message mentions nobody; reading moves the count.
    store(&app, &[delete(group, alex.id, 6, 4)]).await;
    assert_eq!(listed(&app, &sam, group).await["unread_mentions"], 2);
    let (status, _) = app
        .internal_post(
            "/internal/v1/receipts",
            &json!({"receipts": [{"conversation_id": group, "user_id": sam.id, "delivered_seq": 1, "read_seq": 1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let entry = listed(&app, &sam, group).await;
    assert_eq!(entry["unread_mentions"], 1);
    assert_eq!(entry["unread_count"], 4);
}

#[tokio::test]
async fn who_may_change_a_message_is_checked_again() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let admin = app.user("Ada", Role::Admin).await;
    let direct = app.direct(&alex, &sam).await;
    let group = app.group(&coach, "Crew", &[&alex, &sam, &admin]).await;
    store(&app, &[message(direct, alex.id, 1)]).await;
    store(
        &app,
        &[
            message(group, alex.id, 1),
            message(group, alex.id, 2),
            message(group, alex.id, 3),
        ],
    )
    .await;

    // Sam may not edit or delete Alex's message in their direct
    // conversation, nor edit it in a group; neither is stored.
    let body = ingest(
        &app,
        &[
            edit(direct, sam.id, 2, 1, "not yours"),
            delete(direct, sam.id, 3, 1),
            edit(group, sam.id, 4, 1, "not yours"),
            delete(group, sam.id, 5, 1),
            // Not even the group's creator edits someone else's message.
            edit(group, coach.id, 6, 1, "not yours"),
        ],
    )
    .await;
    assert_eq!(body["stored"], json!([]), "{body}");
    let rejected = body["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 5);
    assert!(rejected.iter().all(|r| r["code"] == "forbidden"), "{body}");
    assert_eq!(app.count("SELECT count(*) FROM message_events").await, 0);
    assert_eq!(shown(&app, &alex, direct, 1).await["content"], "message 1");

    // A group's creator and an admin may delete anyone's message there.
    store(
        &app,
        &[delete(group, coach.id, 7, 2), delete(group, admin.id, 8, 3)],
    )
    .await;
    let page = history(&app, &alex, group).await;
    assert!(page[1]["deleted_at"].is_string() && page[2]["deleted_at"].is_string());
    assert!(page[0].get("deleted_at").is_none());

    // A change to a message of another conversation is refused, and an
    // actor who was not a member when it was made is refused as a sender
    // would be.
    let outsider = app.user("Out", Role::Member).await;
    let mut elsewhere = edit(group, alex.id, 9, 1, "x");
    elsewhere["change"]["target_id"] = json!(message_id(direct, 1));
    let body = ingest(
        &app,
        &[elsewhere, react(group, outsider.id, 10, 1, "👍", true)],
    )
    .await;
    let codes: Vec<&str> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["not_member", "message_not_found"], "{body}");
}

#[tokio::test]
async fn the_members_answer_names_the_moderators_of_a_group() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let admin = app.user("Ada", Role::Admin).await;
    let absent_admin = app.user("Abe", Role::Admin).await;
    let group = app.group(&coach, "Crew", &[&alex, &admin]).await;
    let direct = app.direct(&admin, &alex).await;
    let moderators = |id: i64| {
        let app = &app;
        async move {
            let (status, body) = app
                .internal_get(&format!("/internal/v1/conversations/{id}/members"))
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["moderators"].clone()
        }
    };
    // The creator and the admins who are members (Abe is not).
    assert_eq!(moderators(group).await, json!([coach.id, admin.id]));
    let _ = absent_admin;
    // Nobody moderates a direct conversation, admins included.
    assert_eq!(moderators(direct).await, json!([]));
    // A creator who left is not one any more.
    let (status, body) = app
        .delete(
            &coach,
            &format!("/api/v1/chat/conversations/{group}/participants"),
            json!({"user_ids": [coach.id]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(moderators(group).await, json!([admin.id]));
}

#[tokio::test]
async fn the_internal_route_by_seq_answers_messages_as_they_are_and_changes() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    let mut first = message(id, alex.id, 1);
    first["mentions"] = json!([sam.id]);
    let mut second = message(id, sam.id, 2);
    second["reply_to"] = json!(message_id(id, 1));
    store(&app, &[first, second]).await;
    store(
        &app,
        &[
            edit(id, sam.id, 3, 2, "edited"),
            react(id, alex.id, 4, 2, "👍", true),
            delete(id, alex.id, 5, 1),
        ],
    )
    .await;
    let get = |seq: i64| {
        let app = &app;
        async move {
            let (status, body) = app
                .internal_get(&format!("/internal/v1/conversations/{id}/messages/{seq}"))
                .await;
            (status, body)
        }
    };
    let (status, m) = get(1).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(m["content"], "");
    assert!(m.get("mentions").is_none(), "{m}");
    let (_, m) = get(2).await;
    assert_eq!(m["content"], "edited");
    assert_eq!(m["reply_to"], json!(message_id(id, 1)));
    let (_, e) = get(3).await;
    assert_eq!(
        e["change"],
        json!({"target_id": message_id(id, 2), "kind": "edit", "content": "edited"})
    );
    assert_eq!(e["sender_id"], sam.id);
    let (_, e) = get(4).await;
    assert_eq!(e["change"]["kind"], "react");
    assert_eq!(e["change"]["on"], true);
    let (_, e) = get(5).await;
    assert_eq!(e["change"]["kind"], "delete");
    let (status, _) = get(6).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A message the room erased before its first flush arrives as a tombstone
/// (`deleted_at`, empty content), an edit it emptied for the same reason
/// arrives with empty text, and a resend of a message the room edited
/// after a first flush whose answer was lost is the same message: all
/// stored, none rejected.
#[tokio::test]
async fn what_the_room_changed_before_its_flush_is_stored_as_it_now_is() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let conv = app.direct(&alex, &sam).await;
    let mut tombstone = message(conv, alex.id, 1);
    tombstone["content"] = json!("");
    tombstone["deleted_at"] = json!(now());
    store(
        &app,
        &[
            tombstone,
            edit(conv, alex.id, 2, 1, ""),
            delete(conv, alex.id, 3, 1),
        ],
    )
    .await;
    let m = shown(&app, &sam, conv, 1).await;
    assert_eq!(m["content"], "");
    assert!(!m["deleted_at"].is_null(), "{m}");
    // A tombstone with text is refused.
    let mut bad = message(conv, alex.id, 4);
    bad["deleted_at"] = json!(now());
    let body = ingest(&app, &[bad]).await;
    assert_eq!(body["rejected"][0]["code"], "invalid_field", "{body}");

    store(&app, &[message(conv, alex.id, 5)]).await;
    let mut edited = message(conv, alex.id, 5);
    edited["content"] = json!("message 5, edited in the room");
    store(
        &app,
        &[
            edited,
            edit(conv, alex.id, 6, 5, "message 5, edited in the room"),
        ],
    )
    .await;
    let m = shown(&app, &sam, conv, 5).await;
    assert_eq!(m["content"], "message 5, edited in the room");
    assert!(!m["edited_at"].is_null(), "{m}");
}

/// Batches in flight when the room erased a message: an edit (with its
/// text) and a reaction commit first, then the message, resent as the
/// tombstone it now is. Nothing of the message may stay, though its own
/// delete finds it deleted already.
#[tokio::test]
async fn a_tombstone_arriving_after_its_changes_erases_them() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let conv = app.direct(&alex, &sam).await;
    store(
        &app,
        &[
            edit(conv, alex.id, 2, 1, "my new address"),
            react(conv, sam.id, 3, 1, "👍", true),
        ],
    )
    .await;
    let mut tombstone = message(conv, alex.id, 1);
    tombstone["content"] = json!("");
    tombstone["deleted_at"] = json!(now());
    store(&app, &[tombstone, delete(conv, alex.id, 4, 1)]).await;
    assert_eq!(
        app.count(
            "SELECT count(*) FROM message_events WHERE content IS NOT NULL OR kind = 'react'"
        )
        .await,
        0
    );
    let m = shown(&app, &sam, conv, 1).await;
    assert_eq!(m["content"], "");
    assert!(
        m.get("reactions").is_none() && m.get("edited_at").is_none(),
        "{m}"
    );
}
