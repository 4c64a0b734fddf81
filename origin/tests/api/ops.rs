use reqwest::StatusCode;
use shared::Role;

use crate::helpers::spawn_app;

#[tokio::test]
async fn healthz_reports_ok_while_the_database_answers() {
    let app = spawn_app().await;
    let res = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["database"], "ok");
}

#[tokio::test]
async fn metrics_expose_requests_ingest_and_the_pool() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    app.ingest(id, &alex, 1, 3).await;
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "http_requests_total{",
        "route=\"/api/v1/chat/conversations\"",
        "http_request_duration_seconds_bucket{",
        "messages_ingested_total",
        "db_pool_size",
        "db_pool_available",
        "password_hash_slots_available",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

#[tokio::test]
async fn the_openapi_document_covers_every_public_route() {
    let app = spawn_app().await;
    let doc: serde_json::Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("/api/v1/auth/login", "post"),
        ("/api/v1/chat/conversations", "get"),
        ("/api/v1/chat/conversations", "post"),
        ("/api/v1/chat/conversations/{id}", "get"),
        ("/api/v1/chat/conversations/{id}/messages", "get"),
        ("/api/v1/chat/conversations/{id}/participants", "post"),
        ("/api/v1/chat/conversations/{id}/participants", "delete"),
        ("/api/v1/chat/active-users", "get"),
        ("/api/v1/chat/presence/{user_id}", "get"),
        ("/healthz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
    ];
    for (path, method) in expected {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not documented"
        );
    }
    assert!(
        !paths.keys().any(|p| p.starts_with("/internal")),
        "internal routes stay out of the public document"
    );
    assert!(doc["components"]["schemas"]["MessageView"].is_object());
}

#[tokio::test]
async fn an_unknown_route_gets_a_json_404() {
    let app = spawn_app().await;
    let res = app.http.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
}
