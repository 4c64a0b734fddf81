//! Operations (issue 16): what `/metrics` says after real traffic, and
//! request ids. The metrics recorder is process-wide and shared by every
//! test, so counters are checked as "at least" and labels as present; the
//! figures read from PostgreSQL are per application, so exact.

use reqwest::StatusCode;
use serde_json::json;
use shared::Role;

use crate::helpers::{TestApp, spawn_app};

async fn scrape(app: &TestApp) -> String {
    let res = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.text().await.unwrap()
}

/// The value of the first sample whose line starts with `series` (a name,
/// or a name with the start of its labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn has_series(text: &str, name: &str, labels: &[&str]) -> bool {
    text.lines().any(|l| {
        l.starts_with(&format!("{name}{{")) && labels.iter().all(|label| l.contains(label))
    })
}

#[tokio::test]
async fn metrics_name_queries_count_errors_and_read_activity_from_the_database() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    // The recorder's own text: a scrape would fill this application's
    // figure cache before the traffic below.
    let before = sample(
        &app.state.metrics.render(),
        "chat_message_persist_seconds_count",
    )
    .unwrap_or(0.0);

    let stored = app.ingest(id, &alex, 1, 3).await;
    assert_eq!(
        stored["stored"].as_array().map(Vec::len),
        Some(3),
        "{stored}"
    );
    // A replay stores nothing new, so adds no persist sample.
    app.ingest(id, &alex, 1, 3).await;
    let (status, _) = app.get(&alex, "/api/v1/chat/conversations").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app
        .get(&alex, &format!("/api/v1/chat/conversations/{id}/messages"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app
        .internal_post(
            "/internal/v1/presence",
            &json!({"updates": [{"user_id": sam.id, "is_online": true, "last_seen": chrono::Utc::now()}]}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // A typed error: malformed JSON.
    let res = app
        .http
        .post(app.url("/api/v1/chat/conversations"))
        .bearer_auth(&alex.token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    // An unknown route.
    let res = app
        .http
        .get(app.url("/no/such/route/42"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);

    let text = scrape(&app).await;
    for query in [
        "create_direct",
        "list_conversations",
        "history_before",
        "conversation_members",
        "ingest_lock_conversations",
        "ingest_upsert_messages",
        "ingest_advance_conversations",
        "ingest_commit",
        "presence_update",
    ] {
        let series = format!("chat_db_query_seconds_count{{query=\"{query}\"}}");
        assert!(
            sample(&text, &series).is_some_and(|n| n >= 1.0),
            "no {series} in:\n{text}"
        );
    }
    assert!(
        has_series(
            &text,
            "chat_db_query_seconds_bucket",
            &["query=\"ingest_commit\"", "le="]
        ),
        "no buckets for chat_db_query_seconds"
    );
    assert!(
        has_series(
            &text,
            "chat_errors_total",
            &["code=\"invalid_json\"", "layer=\"origin\""]
        ),
        "no chat_errors_total for invalid_json in:\n{text}"
    );
    assert!(
        has_series(
            &text,
            "chat_errors_total",
            &["code=\"not_found\"", "layer=\"origin\""]
        ),
        "no chat_errors_total for the 404"
    );
    // Three new messages; the replay adds none (other tests may add more
    // meanwhile, the recorder is shared).
    let persisted = sample(&text, "chat_message_persist_seconds_count").unwrap_or(0.0);
    assert!(persisted - before >= 3.0, "{before} then {persisted}");
    assert!(has_series(
        &text,
        "chat_message_persist_seconds_bucket",
        &["le=\"900\""]
    ));
    // This application's own figures: exact.
    assert_eq!(
        sample(&text, "chat_active_conversations "),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "chat_online_users "), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "chat_conversation_messages_bucket{le=\"1\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "chat_conversation_messages_bucket{le=\"10\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "chat_conversation_messages_count "),
        Some(1.0)
    );
    assert_eq!(sample(&text, "chat_conversation_messages_sum "), Some(3.0));
    // Routes by template; a 404 as `unmatched`, never its raw path.
    assert!(has_series(
        &text,
        "http_requests_total",
        &["route=\"/api/v1/chat/conversations/{id}/messages\""]
    ));
    assert!(has_series(
        &text,
        "http_requests_total",
        &["route=\"unmatched\"", "status=\"404\""]
    ));
    // The figures' own statements, timed as the first scrape read them.
    let again = scrape(&app).await;
    for query in ["metrics_activity", "metrics_conversation_sizes"] {
        let series = format!("chat_db_query_seconds_count{{query=\"{query}\"}}");
        assert!(sample(&again, &series).is_some(), "no {series}");
    }
    assert!(
        !text.contains("/no/such/route"),
        "a raw path leaked into a label"
    );
    assert!(
        !text.contains(&format!("/conversations/{id}/")),
        "an id leaked into a label"
    );
}

#[tokio::test]
async fn the_figures_are_cached_so_scrapes_do_not_reach_the_database() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let first = scrape(&app).await;
    assert_eq!(sample(&first, "chat_active_conversations "), Some(0.0));
    let id = app.direct(&alex, &sam).await;
    app.ingest(id, &alex, 1, 1).await;
    // Within the cache's life the figures stand as they were read.
    let second = scrape(&app).await;
    assert_eq!(sample(&second, "chat_active_conversations "), Some(0.0));
    assert_eq!(
        sample(&second, "chat_conversation_messages_count "),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_sane_request_id_is_echoed_and_any_other_is_replaced() {
    let app = spawn_app().await;
    let get = |id: Option<&str>, path: &'static str| {
        let mut req = app.http.get(app.url(path));
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        async move {
            let res = req.send().await.unwrap();
            res.headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .expect("every response has an x-request-id")
        }
    };
    assert_eq!(
        get(Some("edge-req.42_a"), "/healthz").await,
        "edge-req.42_a"
    );
    // Errors too (the fallback's 404).
    assert_eq!(get(Some("abc"), "/nope").await, "abc");
    let minted = |id: &str| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let absent = get(None, "/healthz").await;
    assert!(minted(&absent), "{absent}");
    assert_ne!(
        absent,
        get(None, "/healthz").await,
        "each request its own id"
    );
    for bad in ["has space", "quote\"", &"x".repeat(65), ""] {
        let id = get(Some(bad), "/healthz").await;
        assert!(minted(&id), "{bad:?} answered with {id:?}");
    }
}
