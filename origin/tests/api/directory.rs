//! `GET /api/v1/users`: the directory a member searches for a trainer, and
//! `GET /api/v1/users/{id}`: one user's card.

use reqwest::StatusCode;
use serde_json::Value;
use shared::Role;

use crate::helpers::{TestApp, TestUser, assert_error, spawn_app};

fn names(body: &Value) -> Vec<String> {
    body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["full_name"].as_str().unwrap().to_owned())
        .collect()
}

async fn page(app: &TestApp, who: &TestUser, query: &str) -> Value {
    let (s, body) = app.get(who, &format!("/api/v1/users?{query}")).await;
    assert_eq!(s, StatusCode::OK, "{query}: {body}");
    body
}

#[tokio::test]
async fn the_directory_finds_by_name_or_email_prefix_and_pages_by_name() {
    let app = spawn_app().await;
    let me = app.user("Alex", Role::Member).await;
    for name in ["Maya Coach", "mark Lift", "Zoe", "Sam", "Maria", "Ma_x%"] {
        app.user(name, Role::Trainer).await;
    }
    // Case-insensitive name prefix, by name; the caller is never listed.
    let body = page(&app, &me, "query=MA").await;
    assert_eq!(names(&body), ["Ma_x%", "Maria", "mark Lift", "Maya Coach"]);
    assert!(body["next_cursor"].is_null());
    assert!(
        body["users"][0].get("email").is_none(),
        "emails never leave"
    );
    assert_eq!(body["users"][0]["is_online"], false);
    // LIKE's metacharacters are literal.
    assert_eq!(names(&page(&app, &me, "query=ma_").await), ["Ma_x%"]);
    assert_eq!(
        names(&page(&app, &me, "query=ma%25").await),
        Vec::<String>::new()
    );
    // An email prefix matches too.
    assert_eq!(names(&page(&app, &me, "query=zoe%40test").await), ["Zoe"]);
    // Everyone, two at a time, each exactly once, in order.
    let mut all = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let q = match cursor {
            Some(c) => format!("limit=2&cursor={c}"),
            None => "limit=2".to_owned(),
        };
        let body = page(&app, &me, &q).await;
        all.extend(names(&body));
        match body["next_cursor"].as_i64() {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(
        all,
        ["Ma_x%", "Maria", "mark Lift", "Maya Coach", "Sam", "Zoe"]
    );
}

#[tokio::test]
async fn the_directory_refuses_bad_paging_and_strangers() {
    let app = spawn_app().await;
    let me = app.user("Alex", Role::Member).await;
    for q in ["limit=0", "limit=51", "cursor=424242", "limit=x"] {
        let (s, b) = app.get(&me, &format!("/api/v1/users?{q}")).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{q}: {b}");
    }
    let (s, b) = app.get(&me, "/api/v1/users?query=a%00b").await;
    assert_error(s, &b, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let long = "a".repeat(101);
    let (s, b) = app.get(&me, &format!("/api/v1/users?query={long}")).await;
    assert_error(s, &b, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let (s, _) = app
        .http
        .get(app.url("/api/v1/users"))
        .send()
        .await
        .map(|r| (r.status(), ()))
        .unwrap();
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn one_users_card_has_the_directorys_shape_for_anyone_signed_in() {
    let app = spawn_app().await;
    let me = app.user("Alex", Role::Member).await;
    let coach = app.user("Maya Coach", Role::Trainer).await;
    // A stranger's card (no conversation shared): the directory is open
    // to every signed-in user, and so is this.
    let (s, card) = app.get(&me, &format!("/api/v1/users/{}", coach.id)).await;
    assert_eq!(s, StatusCode::OK, "{card}");
    assert_eq!(
        card,
        serde_json::json!({
            "id": coach.id,
            "full_name": "Maya Coach",
            "role": "trainer",
            "is_online": false,
            "last_seen": null,
        })
    );
    // The same object the directory lists.
    let listed = page(&app, &me, "query=maya").await;
    assert_eq!(listed["users"][0], card);
    // Presence as the origin knows it.
    app.pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO user_presence (user_id, is_online, last_seen) VALUES ($1, true, now())",
            &[&coach.id],
        )
        .await
        .unwrap();
    let (_, card) = app.get(&me, &format!("/api/v1/users/{}", coach.id)).await;
    assert_eq!(card["is_online"], true, "{card}");
    assert!(card["last_seen"].is_string(), "{card}");
    // One's own card too; an unknown id is a typed 404, a malformed one 400.
    let (s, own) = app.get(&me, &format!("/api/v1/users/{}", me.id)).await;
    assert_eq!(s, StatusCode::OK, "{own}");
    assert_eq!(own["full_name"], "Alex");
    let (s, b) = app.get(&me, "/api/v1/users/424242").await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "not_found");
    let (s, b) = app.get(&me, "/api/v1/users/x").await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_path");
    let s = app
        .http
        .get(app.url(&format!("/api/v1/users/{}", coach.id)))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
