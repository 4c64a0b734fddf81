//! Rights from current membership, membership history at the ingest,
//! members_version, and the members-changed notice to the edge.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::Role;
use tokio::sync::mpsc;

use crate::helpers::{
    SERVICE_SECRET, TestApp, assert_error, message, message_id, spawn_app, spawn_app_with,
};

fn participants(path: i64) -> String {
    format!("/api/v1/chat/conversations/{path}/participants")
}

async fn members_version(app: &TestApp, conversation: i64) -> i64 {
    let (status, body) = app
        .internal_get(&format!(
            "/internal/v1/conversations/{conversation}/members"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["members_version"].as_i64().expect("members_version")
}

#[tokio::test]
async fn a_creator_who_left_can_no_longer_manage_read_or_rejoin_the_group() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let admin = app.user("Admin", Role::Admin).await;
    let group = app.group(&coach, "Crew", &[&alex, &sam]).await;
    let path = participants(group);
    let (s, b) = app
        .delete(&coach, &path, json!({"user_ids": [coach.id]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");

    for (s, b) in [
        app.post(&coach, &path, json!({"user_ids": [coach.id]}))
            .await,
        app.post(&coach, &path, json!({"user_ids": [admin.id]}))
            .await,
        app.delete(&coach, &path, json!({"user_ids": [sam.id]}))
            .await,
        app.get(&coach, &format!("/api/v1/chat/conversations/{group}"))
            .await,
        app.get(
            &coach,
            &format!("/api/v1/chat/conversations/{group}/messages"),
        )
        .await,
    ] {
        assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");
    }
    let (_, list) = app.get(&coach, "/api/v1/chat/conversations").await;
    assert_eq!(list["conversations"], json!([]));
    // Nor may a plain member bring the creator back.
    let (s, b) = app
        .post(&alex, &path, json!({"user_ids": [coach.id]}))
        .await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM conversation_participants WHERE conversation_id = {group}"
        ))
        .await,
        2
    );

    // An admin may; back in, the creator reads and manages again.
    let (s, b) = app
        .post(&admin, &path, json!({"user_ids": [coach.id]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, _) = app
        .get(&coach, &format!("/api/v1/chat/conversations/{group}"))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = app
        .delete(&coach, &path, json!({"user_ids": [sam.id]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

#[tokio::test]
async fn an_admin_moderates_any_group_but_reads_it_only_as_a_member() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let admin = app.user("Admin", Role::Admin).await;
    let group = app.group(&coach, "Crew", &[&alex]).await;
    let path = participants(group);
    let (s, b) = app.post(&admin, &path, json!({"user_ids": [sam.id]})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = app
        .delete(&admin, &path, json!({"user_ids": [alex.id]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    for route in ["", "/messages"] {
        let (s, b) = app
            .get(
                &admin,
                &format!("/api/v1/chat/conversations/{group}{route}"),
            )
            .await;
        assert_error(s, &b, StatusCode::FORBIDDEN, "forbidden");
    }
}

#[tokio::test]
async fn every_member_change_bumps_the_version_once_and_no_change_bumps_nothing() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let eve = app.user("Eve", Role::Member).await;
    let direct = app.direct(&alex, &sam).await;
    assert_eq!(members_version(&app, direct).await, 1);
    let group = app.group(&coach, "Crew", &[&alex]).await;
    assert_eq!(members_version(&app, group).await, 1);
    let path = participants(group);
    let steps = [
        ("add two", true, vec![sam.id, eve.id], 2),
        ("add one already in", true, vec![sam.id], 2),
        ("remove one", false, vec![eve.id], 3),
        ("remove one already gone", false, vec![eve.id], 3),
        ("leave", false, vec![alex.id], 4),
    ];
    for (step, add, ids, expected) in steps {
        let who = if step == "leave" { &alex } else { &coach };
        let (s, b) = if add {
            app.post(who, &path, json!({ "user_ids": ids })).await
        } else {
            app.delete(who, &path, json!({ "user_ids": ids })).await
        };
        assert_eq!(s, StatusCode::OK, "{step}: {b}");
        assert_eq!(members_version(&app, group).await, expected, "{step}");
    }
    // Direct SQL (a tool, the seed) goes through the same trigger.
    app.pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO conversation_participants (conversation_id, user_id) VALUES ($1, $2)",
            &[&group, &eve.id],
        )
        .await
        .unwrap();
    assert_eq!(members_version(&app, group).await, 5);
}

/// Moves every membership period of `conversation` one hour into the past,
/// so messages can be dated inside it.
async fn backdate_memberships(app: &TestApp, conversation: i64) {
    app.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE conversation_memberships SET joined_at = joined_at - interval '1 hour'
             WHERE conversation_id = $1",
            &[&conversation],
        )
        .await
        .unwrap();
}

fn sent_at(mut m: Value, at: chrono::DateTime<chrono::Utc>) -> Value {
    m["created_at"] = json!(at);
    m
}

#[tokio::test]
async fn the_ingest_stores_what_members_sent_and_refuses_what_non_members_sent() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let eve = app.user("Eve", Role::Member).await;
    let group = app.group(&coach, "Crew", &[&alex, &sam]).await;
    backdate_memberships(&app, group).await;
    let (s, b) = app
        .delete(&coach, &participants(group), json!({"user_ids": [sam.id]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let left_at: chrono::DateTime<chrono::Utc> = app
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT left_at FROM conversation_memberships WHERE conversation_id = $1 AND user_id = $2",
            &[&group, &sam.id],
        )
        .await
        .unwrap()
        .get(0);
    // Eve joins now: what she "sent" ten minutes ago was not sent by a member.
    let (s, _) = app
        .post(&coach, &participants(group), json!({"user_ids": [eve.id]}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let secs = chrono::Duration::seconds;
    let stranger = app.user("Stranger", Role::Member).await;
    let batch = json!({"messages": [
        // Sent while Sam was a member, flushed after the removal: stored.
        sent_at(message(group, sam.id, 1), left_at - secs(600)),
        // Inside the skew after the removal: stored.
        sent_at(message(group, sam.id, 2), left_at + secs(2)),
        sent_at(message(group, alex.id, 3), left_at + secs(1)),
        // Sent after the removal: refused.
        sent_at(message(group, sam.id, 4), left_at + secs(30)),
        // Before Eve joined: refused; after: stored.
        sent_at(message(group, eve.id, 5), left_at - secs(600)),
        sent_at(message(group, eve.id, 6), chrono::Utc::now()),
        // Never a member: refused.
        sent_at(message(group, stranger.id, 7), chrono::Utc::now()),
    ]});
    let (s, body) = app
        .internal_post("/internal/v1/messages/batch", &batch)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let mut stored: Vec<uuid::Uuid> = serde_json::from_value(body["stored"].clone()).unwrap();
    stored.sort();
    let mut expected: Vec<uuid::Uuid> = [1, 2, 3, 6].map(|seq| message_id(group, seq)).to_vec();
    expected.sort();
    assert_eq!(stored, expected, "{body}");
    let mut refused: Vec<(uuid::Uuid, String)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                serde_json::from_value(r["id"].clone()).unwrap(),
                r["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    refused.sort();
    let mut expected: Vec<(uuid::Uuid, String)> = [4, 5, 7]
        .map(|seq| (message_id(group, seq), "not_member".to_owned()))
        .to_vec();
    expected.sort();
    assert_eq!(refused, expected);
    // The rest of the batch is not failed by them, and the answer carries
    // the member list's version.
    assert_eq!(
        body["members_versions"],
        json!([{"conversation_id": group, "members_version": members_version(&app, group).await}])
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM messages WHERE conversation_id = {group}"
        ))
        .await,
        4
    );
}

#[tokio::test]
async fn receipts_from_non_members_are_ignored() {
    let app = spawn_app().await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let eve = app.user("Eve", Role::Member).await;
    let group = app.group(&coach, "Crew", &[&alex]).await;
    app.ingest(group, &coach, 1, 5).await;
    let (s, _) = app
        .delete(&coach, &participants(group), json!({"user_ids": [alex.id]}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = app
        .internal_post(
            "/internal/v1/receipts",
            &json!({"receipts": [
                {"conversation_id": group, "user_id": alex.id, "delivered_seq": 5, "read_seq": 5},
                {"conversation_id": group, "user_id": eve.id, "delivered_seq": 5, "read_seq": 5},
                {"conversation_id": group, "user_id": coach.id, "delivered_seq": 5, "read_seq": 4}
            ]}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (_, members) = app
        .internal_get(&format!("/internal/v1/conversations/{group}/members"))
        .await;
    assert_eq!(
        members["members"],
        json!([{"user_id": coach.id, "delivered_seq": 5, "read_seq": 4}])
    );
}

/// A stand-in for the edge that records every request it gets.
async fn fake_edge() -> (
    String,
    mpsc::UnboundedReceiver<(String, String, Option<String>)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let record = move |req: axum::extract::Request| {
        let tx = tx.clone();
        async move {
            let secret = req
                .headers()
                .get(shared::protocol::internal::SERVICE_SECRET_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let _ = tx.send((
                req.method().to_string(),
                req.uri().path().to_owned(),
                secret,
            ));
            StatusCode::NO_CONTENT
        }
    };
    let router = axum::Router::new().fallback(record);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, rx)
}

#[tokio::test]
async fn member_changes_notify_the_edge_with_the_service_secret_once_they_commit() {
    let (edge, mut calls) = fake_edge().await;
    let app = spawn_app_with(&[("EDGE_URL", &edge)]).await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let group = app.group(&coach, "Crew", &[&alex]).await;
    let expected_path = format!("/api/v1/internal/rooms/{group}/members-changed");

    let (s, _) = app
        .post(&coach, &participants(group), json!({"user_ids": [sam.id]}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let call = tokio::time::timeout(Duration::from_secs(5), calls.recv())
        .await
        .expect("a notice")
        .unwrap();
    assert_eq!(
        call,
        (
            "POST".to_owned(),
            expected_path.clone(),
            Some(SERVICE_SECRET.to_owned())
        )
    );
    let (s, _) = app
        .delete(&alex, &participants(group), json!({"user_ids": [alex.id]}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let call = tokio::time::timeout(Duration::from_secs(5), calls.recv())
        .await
        .expect("a notice")
        .unwrap();
    assert_eq!(call.1, expected_path);

    // A change that changes nothing, and a refused one, send nothing.
    app.post(&coach, &participants(group), json!({"user_ids": [sam.id]}))
        .await;
    app.post(&alex, &participants(group), json!({"user_ids": [alex.id]}))
        .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), calls.recv())
            .await
            .is_err(),
        "no notice without a change"
    );
}

#[tokio::test]
async fn an_unreachable_edge_never_fails_or_slows_a_member_change() {
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let app = spawn_app_with(&[("EDGE_URL", &dead)]).await;
    let coach = app.user("Coach", Role::Trainer).await;
    let alex = app.user("Alex", Role::Member).await;
    let group = app.group(&coach, "Crew", &[]).await;
    let started = std::time::Instant::now();
    let (s, b) = app
        .post(&coach, &participants(group), json!({"user_ids": [alex.id]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}
