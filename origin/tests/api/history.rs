use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::Role;

use crate::helpers::{assert_error, spawn_app};

fn seqs(body: &Value) -> Vec<i64> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn history_pages_backwards_and_forwards_with_no_gaps_or_overlaps() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    app.ingest(id, &sam, 1, 250).await;
    let base = format!("/api/v1/chat/conversations/{id}/messages");

    // Backwards from the newest, 60 at a time.
    let mut seen = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let path = match before {
            Some(b) => format!("{base}?limit=60&before_seq={b}"),
            None => format!("{base}?limit=60"),
        };
        let (s, body) = app.get(&alex, &path).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let page = seqs(&body);
        assert!(page.windows(2).all(|w| w[1] == w[0] + 1), "oldest first");
        seen.splice(0..0, page.iter().copied());
        if body["has_more"] == false {
            break;
        }
        before = page.first().copied();
    }
    assert_eq!(seen, (1..=250).collect::<Vec<_>>());

    // Forwards from a point, as a client does after `resync`.
    let (_, body) = app
        .get(&alex, &format!("{base}?after_seq=240&limit=200"))
        .await;
    assert_eq!(seqs(&body), (241..=250).collect::<Vec<_>>());
    assert_eq!(body["has_more"], false);
    let (_, body) = app.get(&alex, &format!("{base}?after_seq=0&limit=5")).await;
    assert_eq!(seqs(&body), vec![1, 2, 3, 4, 5]);
    assert_eq!(body["has_more"], true);

    // A range.
    let (_, body) = app
        .get(&alex, &format!("{base}?after_seq=10&before_seq=14"))
        .await;
    assert_eq!(seqs(&body), vec![11, 12, 13]);
}

#[tokio::test]
async fn bad_paging_parameters_get_422() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    for q in [
        "limit=201",
        "limit=0",
        "limit=-3",
        "limit=lots",
        "before_seq=0",
        "after_seq=-1",
    ] {
        let (s, b) = app
            .get(
                &alex,
                &format!("/api/v1/chat/conversations/{id}/messages?{q}"),
            )
            .await;
        let code = if q == "limit=lots" {
            "invalid_query"
        } else {
            "validation_failed"
        };
        assert_error(s, &b, StatusCode::UNPROCESSABLE_ENTITY, code);
    }
}

#[tokio::test]
async fn message_status_follows_the_other_members_watermarks() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    app.ingest(id, &alex, 1, 3).await;
    let (s, _) = app
        .internal_post(
            "/internal/v1/receipts",
            &json!({"receipts": [{"conversation_id": id, "user_id": sam.id, "delivered_seq": 2, "read_seq": 1}]}),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, body) = app
        .get(&alex, &format!("/api/v1/chat/conversations/{id}/messages"))
        .await;
    let statuses: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["read", "delivered", "sent"]);

    // A stale report does not move the watermarks back.
    app.internal_post(
        "/internal/v1/receipts",
        &json!({"receipts": [{"conversation_id": id, "user_id": sam.id, "delivered_seq": 0, "read_seq": 0}]}),
    )
    .await;
    let (_, body) = app
        .get(&alex, &format!("/api/v1/chat/conversations/{id}"))
        .await;
    let sam_row = body["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["user_id"] == sam.id)
        .cloned()
        .unwrap();
    assert_eq!(sam_row["delivered_seq"], 2);
    assert_eq!(sam_row["read_seq"], 1);
}
