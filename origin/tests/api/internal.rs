use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::Role;

use crate::helpers::{assert_error, message, message_id, spawn_app, status_and_json};

#[tokio::test]
async fn internal_routes_without_the_right_service_secret_get_401() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let routes = [
        ("POST", "/internal/v1/messages/batch"),
        ("GET", "/internal/v1/conversations/1/members"),
        ("GET", "/internal/v1/conversations/1/messages/1"),
        ("POST", "/internal/v1/presence"),
        ("POST", "/internal/v1/receipts"),
        ("GET", "/internal/v1/users/1/contacts"),
    ];
    for (method, path) in routes {
        for secret in [None, Some("wrong-secret"), Some("")] {
            let mut req = app
                .http
                .request(method.parse().unwrap(), app.url(path))
                .json(&json!({"messages": [], "updates": [], "receipts": []}));
            if let Some(secret) = secret {
                req = req.header(shared::protocol::internal::SERVICE_SECRET_HEADER, secret);
            }
            let (s, b) = status_and_json(req.send().await.unwrap()).await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {secret:?}: {b}"
            );
        }
        // A user's session token is not the service secret either.
        let (s, _) = status_and_json(
            app.http
                .request(method.parse().unwrap(), app.url(path))
                .bearer_auth(&alex.token)
                .json(&json!({}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn a_replayed_batch_changes_nothing_and_answers_the_same() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    let batch = json!({"messages": (1..=20).map(|s| message(id, alex.id, s)).collect::<Vec<_>>()});
    let (s, first) = app
        .internal_post("/internal/v1/messages/batch", &batch)
        .await;
    assert_eq!(s, StatusCode::OK, "{first}");
    assert_eq!(first["stored"].as_array().unwrap().len(), 20);
    assert_eq!(first["rejected"], json!([]));
    let snapshot = app
        .count("SELECT (count(*) + sum(seq))::int8 FROM messages")
        .await;
    let (s, second) = app
        .internal_post("/internal/v1/messages/batch", &batch)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(first, second);
    assert_eq!(
        app.count("SELECT (count(*) + sum(seq))::int8 FROM messages")
            .await,
        snapshot
    );
    assert_eq!(
        app.count(&format!(
            "SELECT last_seq FROM conversations WHERE id = {id}"
        ))
        .await,
        20
    );
}

#[tokio::test]
async fn parallel_ingest_of_the_same_batch_stores_it_once() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    let other = app.group(&sam, "Other", &[&alex]).await;
    // Two conversations in one batch, to exercise the lock ordering.
    let mut messages: Vec<Value> = (1..=200).map(|s| message(id, alex.id, s)).collect();
    messages.extend((1..=50).map(|s| message(other, sam.id, s)));
    let batch = json!({ "messages": messages });
    let calls = (0..8).map(|_| app.internal_post("/internal/v1/messages/batch", &batch));
    let results = futures::future::join_all(calls).await;
    for (s, body) in &results {
        assert_eq!(*s, StatusCode::OK, "{body}");
        assert_eq!(body["stored"].as_array().unwrap().len(), 250, "{body}");
        assert_eq!(body["rejected"], json!([]));
    }
    assert_eq!(app.count("SELECT count(*) FROM messages").await, 250);
    assert_eq!(
        app.count(&format!(
            "SELECT count(DISTINCT seq) FROM messages WHERE conversation_id = {id}"
        ))
        .await,
        200
    );
}

#[tokio::test]
async fn a_different_message_at_a_taken_seq_or_key_is_rejected_not_overwritten() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    app.ingest(id, &alex, 1, 2).await;

    let mut same_seq = message(id, sam.id, 2);
    same_seq["id"] = json!(uuid::Uuid::now_v7());
    same_seq["client_msg_id"] = json!("fresh-key");
    let mut same_key = message(id, alex.id, 3);
    same_key["client_msg_id"] = json!(format!("c-{id}-1"));
    let good = message(id, alex.id, 4);
    let (s, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({"messages": [same_seq, same_key, good]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["stored"], json!([message_id(id, 4)]));
    let rejected = body["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2);
    assert!(rejected.iter().all(|r| r["code"] == "conflict"));
    let original: String = app
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT content FROM messages WHERE conversation_id = $1 AND seq = 2",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(original, "message 2");
}

#[tokio::test]
async fn invalid_messages_are_rejected_and_the_rest_of_the_batch_is_stored() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    let mut too_long = message(id, alex.id, 1);
    too_long["content"] = json!("x".repeat(4001));
    let mut blank = message(id, alex.id, 2);
    blank["content"] = json!("   ");
    let mut bad_key = message(id, alex.id, 3);
    bad_key["client_msg_id"] = json!("has spaces");
    let mut zero_seq = message(id, alex.id, 4);
    zero_seq["seq"] = json!(0);
    let unknown_conv = message(999_999, alex.id, 1);
    let unknown_sender = message(id, 888_888, 5);
    let good = message(id, alex.id, 6);
    let (s, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({"messages": [too_long, blank, bad_key, zero_seq, unknown_conv, unknown_sender, good]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["stored"], json!([message_id(id, 6)]));
    let mut codes: Vec<&str> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    codes.sort_unstable();
    assert_eq!(
        codes,
        vec![
            "empty_field",
            "invalid_field",
            "invalid_field",
            "too_long",
            "unknown_conversation",
            "unknown_sender"
        ]
    );
    assert_eq!(app.count("SELECT count(*) FROM messages").await, 1);

    // A batch over the limit is refused whole.
    let huge: Vec<Value> = (1..=1001).map(|s| message(id, alex.id, s)).collect();
    let (s, b) = app
        .internal_post("/internal/v1/messages/batch", &json!({ "messages": huge }))
        .await;
    assert_error(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    assert_eq!(app.count("SELECT count(*) FROM messages").await, 1);
}

#[tokio::test]
async fn members_lists_watermarks_and_the_last_stored_seq() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    app.ingest(id, &alex, 1, 7).await;
    app.internal_post(
        "/internal/v1/receipts",
        &json!({"receipts": [
            {"conversation_id": id, "user_id": sam.id, "delivered_seq": 7, "read_seq": 5},
            {"conversation_id": id, "user_id": sam.id, "delivered_seq": 6, "read_seq": 6}
        ]}),
    )
    .await;
    let (s, body) = app
        .internal_get(&format!("/internal/v1/conversations/{id}/members"))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["kind"], "direct");
    assert_eq!(body["last_seq"], 7);
    let sam_row = body["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user_id"] == sam.id)
        .cloned()
        .unwrap();
    assert_eq!(
        sam_row,
        json!({"user_id": sam.id, "delivered_seq": 7, "read_seq": 6})
    );
    let (s, b) = app
        .internal_get("/internal/v1/conversations/424242/members")
        .await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn presence_keeps_the_newest_report_and_skips_unknown_users() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let t0 = chrono::Utc::now();
    let t1 = t0 + chrono::Duration::seconds(5);
    // Offline at t1 arrives first, then a delayed online from t0.
    for (online, at) in [(false, t1), (true, t0)] {
        let (s, b) = app
            .internal_post(
                "/internal/v1/presence",
                &json!({"updates": [
                    {"user_id": sam.id, "is_online": online, "last_seen": at},
                    {"user_id": 999_999, "is_online": true, "last_seen": at}
                ]}),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    }
    let (_, body) = app
        .get(&alex, &format!("/api/v1/chat/presence/{}", sam.id))
        .await;
    assert_eq!(body["is_online"], false);
    let seen: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(body["last_seen"].clone()).unwrap();
    assert_eq!(seen.timestamp_millis(), t1.timestamp_millis());
}

#[tokio::test]
async fn a_stored_message_can_be_read_back_by_seq_and_a_missing_one_is_404() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    let sent = message(id, alex.id, 1);
    let (s, _) = app
        .internal_post("/internal/v1/messages/batch", &json!({"messages": [sent]}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, got) = app
        .internal_get(&format!("/internal/v1/conversations/{id}/messages/1"))
        .await;
    assert_eq!(s, StatusCode::OK, "{got}");
    assert_eq!(got["id"], json!(message_id(id, 1)));
    assert_eq!(got["content"], "message 1");
    assert_eq!(got["client_msg_id"], format!("c-{id}-1"));
    let (s, body) = app
        .internal_get(&format!("/internal/v1/conversations/{id}/messages/2"))
        .await;
    assert_error(s, &body, StatusCode::NOT_FOUND, "not_found");
}

/// `(user_id, delivered_seq, read_seq)` of each member, as the edge reads
/// them.
async fn watermarks(app: &crate::helpers::TestApp, conversation: i64) -> Vec<(i64, i64, i64)> {
    let (s, body) = app
        .internal_get(&format!(
            "/internal/v1/conversations/{conversation}/members"
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user_id"].as_i64().unwrap(),
                m["delivered_seq"].as_i64().unwrap(),
                m["read_seq"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn receipt(conversation: i64, user: i64, delivered: i64, read: i64) -> Value {
    json!({"conversation_id": conversation, "user_id": user, "delivered_seq": delivered, "read_seq": read})
}

#[tokio::test]
async fn receipts_in_an_ingest_batch_move_watermarks_forward_only_and_a_replay_changes_nothing() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    app.ingest(id, &alex, 1, 7).await;

    let batch = json!({
        "messages": (8..=10).map(|s| message(id, alex.id, s)).collect::<Vec<_>>(),
        "receipts": [
            receipt(id, sam.id, 9, 5),
            receipt(id, sam.id, 6, 6),
            receipt(id, alex.id, 10, 10),
        ],
    });
    let (s, first) = app
        .internal_post("/internal/v1/messages/batch", &batch)
        .await;
    assert_eq!(s, StatusCode::OK, "{first}");
    assert_eq!(first["stored"].as_array().unwrap().len(), 3);
    assert_eq!(first["rejected"], json!([]));
    let mut expected = vec![(alex.id, 10, 10), (sam.id, 9, 6)];
    expected.sort_unstable();
    assert_eq!(watermarks(&app, id).await, expected);

    // Older watermarks, through the ingest or the route of older edges,
    // move nothing back.
    let (s, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({"messages": [], "receipts": [receipt(id, sam.id, 2, 1), receipt(id, alex.id, 0, 0)]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = app
        .internal_post(
            "/internal/v1/receipts",
            &json!({"receipts": [receipt(id, sam.id, 3, 3)]}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(watermarks(&app, id).await, expected);

    // The whole batch again: the same answer, the same state.
    let (s, again) = app
        .internal_post("/internal/v1/messages/batch", &batch)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again, first);
    assert_eq!(watermarks(&app, id).await, expected);
    assert_eq!(app.count("SELECT count(*) FROM messages").await, 10);

    // A read implies delivery, as on the receipts route.
    let (s, _) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({"messages": [], "receipts": [receipt(id, sam.id, 0, 10)]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(watermarks(&app, id).await.contains(&(sam.id, 10, 10)));
}

#[tokio::test]
async fn a_batch_of_receipts_alone_applies_them_and_reports_the_conversation_version() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let group = app.group(&coach, "Crew", &[&alex]).await;
    app.ingest(group, &coach, 1, 4).await;
    let version = app
        .count(&format!(
            "SELECT members_version FROM conversations WHERE id = {group}"
        ))
        .await;

    let (s, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({"messages": [], "receipts": [receipt(group, alex.id, 4, 3)]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({
            "stored": [],
            "rejected": [],
            "members_versions": [{"conversation_id": group, "members_version": version}],
        })
    );
    assert!(watermarks(&app, group).await.contains(&(alex.id, 4, 3)));
    assert_eq!(app.count("SELECT count(*) FROM messages").await, 4);
}

#[tokio::test]
async fn receipts_for_non_members_in_an_ingest_batch_change_nothing_and_the_others_apply() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let eve = app.user("Eve", Role::Member).await;
    let group = app.group(&coach, "Crew", &[&alex]).await;
    app.ingest(group, &coach, 1, 5).await;
    let (s, _) = app
        .delete(
            &coach,
            &format!("/api/v1/chat/conversations/{group}/participants"),
            json!({"user_ids": [alex.id]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    let (s, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({"messages": [], "receipts": [
                receipt(group, alex.id, 5, 5),
                receipt(group, eve.id, 5, 5),
                receipt(424_242, coach.id, 5, 5),
                receipt(group, coach.id, 5, 4),
            ]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(watermarks(&app, group).await, vec![(coach.id, 5, 4)]);
    // Nobody became a participant by reporting a watermark.
    assert_eq!(
        app.count("SELECT count(*) FROM conversation_participants")
            .await,
        1
    );
}

#[tokio::test]
async fn a_batch_with_rejected_messages_still_applies_its_receipts() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let eve = app.user("Eve", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    app.ingest(id, &alex, 1, 3).await;

    let mut conflict = message(id, sam.id, 3);
    conflict["id"] = json!(uuid::Uuid::now_v7());
    conflict["client_msg_id"] = json!("another-key");
    let mut blank = message(id, alex.id, 5);
    blank["content"] = json!("  ");
    let from_eve = message(id, eve.id, 6);
    let good = message(id, sam.id, 4);
    let (s, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({
                "messages": [conflict, blank, from_eve, good],
                "receipts": [receipt(id, sam.id, 4, 4), receipt(id, alex.id, 3, 2)],
            }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["stored"], json!([message_id(id, 4)]));
    let mut codes: Vec<&str> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    codes.sort_unstable();
    assert_eq!(codes, vec!["conflict", "empty_field", "not_member"]);
    let mut expected = vec![(alex.id, 3, 2), (sam.id, 4, 4)];
    expected.sort_unstable();
    assert_eq!(watermarks(&app, id).await, expected);

    // Even when no message of the batch can be stored.
    let mut blank = message(id, alex.id, 5);
    blank["content"] = json!("");
    let (s, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({"messages": [blank], "receipts": [receipt(id, alex.id, 4, 4)]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["stored"], json!([]));
    assert_eq!(body["rejected"][0]["code"], "empty_field");
    assert!(watermarks(&app, id).await.contains(&(alex.id, 4, 4)));
}

#[tokio::test]
async fn a_negative_watermark_refuses_the_whole_batch_before_anything_is_written() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    let (s, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({
                "messages": [message(id, alex.id, 1)],
                "receipts": [receipt(id, sam.id, 1, 1), receipt(id, alex.id, 1, -1)],
            }),
        )
        .await;
    assert_error(
        s,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    assert_eq!(app.count("SELECT count(*) FROM messages").await, 0);
    assert!(watermarks(&app, id).await.contains(&(sam.id, 0, 0)));
}

#[tokio::test]
async fn concurrent_batches_with_receipts_for_the_same_members_neither_deadlock_nor_lose_the_highest()
 {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let kim = app.user("Kim", Role::Member).await;
    let direct = app.direct(&alex, &sam).await;
    let group = app.group(&kim, "Crew", &[&alex, &sam]).await;
    // Each batch: messages in both conversations, and receipts of every
    // member listed in a different order with different values.
    let batches: Vec<Value> = (1..=8i64)
        .map(|n| {
            let mut receipts = vec![
                receipt(group, kim.id, n, n),
                receipt(group, sam.id, 9 - n, 9 - n),
                receipt(direct, alex.id, n, n - 1),
                receipt(group, alex.id, n, n),
                receipt(direct, sam.id, 9 - n, 9 - n),
            ];
            if n % 2 == 0 {
                receipts.reverse();
            }
            json!({
                "messages": [message(direct, alex.id, n), message(group, kim.id, n)],
                "receipts": receipts,
            })
        })
        .collect();
    let calls = batches
        .iter()
        .map(|b| app.internal_post("/internal/v1/messages/batch", b));
    for (s, body) in futures::future::join_all(calls).await {
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["rejected"], json!([]));
    }
    assert_eq!(app.count("SELECT count(*) FROM messages").await, 16);
    let mut direct_expected = vec![(alex.id, 8, 7), (sam.id, 8, 8)];
    direct_expected.sort_unstable();
    assert_eq!(watermarks(&app, direct).await, direct_expected);
    let mut group_expected = vec![(alex.id, 8, 8), (sam.id, 8, 8), (kim.id, 8, 8)];
    group_expected.sort_unstable();
    assert_eq!(watermarks(&app, group).await, group_expected);
}

#[tokio::test]
async fn contacts_are_the_people_one_shares_a_conversation_with_and_their_presence() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let kim = app.user("Kim", Role::Member).await;
    let stranger = app.user("Stranger", Role::Member).await;
    app.direct(&alex, &sam).await;
    app.group(&alex, "Squad", &[&sam, &kim]).await;
    app.direct(&kim, &stranger).await;
    let now = chrono::Utc::now();
    let (s, _) = app
        .internal_post(
            "/internal/v1/presence",
            &json!({"updates": [
                {"user_id": sam.id, "is_online": true, "last_seen": now},
                {"user_id": alex.id, "is_online": true, "last_seen": now}
            ]}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, body) = app
        .internal_get(&format!("/internal/v1/users/{}/contacts", alex.id))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], alex.id);
    assert_eq!(body["is_online"], true);
    let contacts: Vec<(i64, bool)> = body["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["user_id"].as_i64().unwrap(),
                c["is_online"].as_bool().unwrap(),
            )
        })
        .collect();
    // Sam once, though shared twice; Kim offline; never the stranger or
    // Alex.
    assert_eq!(contacts, vec![(sam.id, true), (kim.id, false)]);
    let (_, body) = app
        .internal_get(&format!("/internal/v1/users/{}/contacts", stranger.id))
        .await;
    assert_eq!(body["is_online"], false);
    assert_eq!(body["contacts"].as_array().unwrap().len(), 1);
    let (s, b) = app.internal_get("/internal/v1/users/424242/contacts").await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
}
