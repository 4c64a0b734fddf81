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
        ("/api/v1/auth/refresh", "post"),
        ("/api/v1/auth/logout", "post"),
        ("/api/v1/auth/logout-all", "post"),
        ("/api/v1/auth/password", "post"),
        ("/api/openapi.json", "get"),
        ("/api/v1/chat/conversations", "get"),
        ("/api/v1/chat/conversations", "post"),
        ("/api/v1/chat/conversations/{id}", "get"),
        ("/api/v1/chat/conversations/{id}", "patch"),
        ("/api/v1/chat/conversations/{id}/messages", "get"),
        ("/api/v1/chat/conversations/{id}/participants", "post"),
        ("/api/v1/chat/conversations/{id}/participants", "delete"),
        ("/api/v1/chat/active-users", "get"),
        ("/api/v1/chat/presence/{user_id}", "get"),
        ("/api/v1/users", "get"),
        ("/api/v1/users/{id}", "get"),
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

/// The statuses a route documents, as a sorted list.
fn statuses(doc: &serde_json::Value, path: &str, method: &str) -> Vec<String> {
    let mut s: Vec<String> = doc["paths"][path][method]["responses"]
        .as_object()
        .unwrap_or_else(|| panic!("{method} {path} is not documented"))
        .keys()
        .cloned()
        .collect();
    s.sort();
    s
}

fn has_all(doc: &serde_json::Value, path: &str, method: &str, expected: &[&str]) {
    let got = statuses(doc, path, method);
    for status in expected {
        assert!(
            got.iter().any(|s| s == status),
            "{method} {path} does not list {status}: {got:?}"
        );
    }
}

#[tokio::test]
async fn the_openapi_document_states_the_statuses_and_constraints_the_api_really_has() {
    let app = spawn_app().await;
    let get = |path: &'static str| {
        let app = &app;
        async move {
            app.http
                .get(app.url(path))
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let doc = get("/api/openapi.json").await;
    assert_eq!(
        doc,
        get("/openapi.json").await,
        "one document at both paths"
    );
    let schemas = &doc["components"]["schemas"];

    // Login: every status, Retry-After where it applies, bounded fields.
    has_all(
        &doc,
        "/api/v1/auth/login",
        "post",
        &[
            "200", "400", "401", "413", "415", "422", "429", "500", "503",
        ],
    );
    for status in ["429", "503"] {
        assert!(
            doc["paths"]["/api/v1/auth/login"]["post"]["responses"][status]["headers"]
                ["Retry-After"]
                .is_object(),
            "{status} names Retry-After"
        );
    }
    let login = &schemas["LoginRequest"]["properties"];
    assert_eq!(login["email"]["maxLength"], 254);
    assert_eq!(login["email"]["minLength"], 1);
    assert!(login["email"]["pattern"].is_string());
    assert_eq!(login["password"]["maxLength"], 1024);
    let refresh = &schemas["RefreshRequest"]["properties"]["refresh_token"];
    assert_eq!(
        (refresh["minLength"].clone(), refresh["maxLength"].clone()),
        (43.into(), 43.into())
    );
    let password = &schemas["PasswordChange"]["properties"]["new_password"];
    assert_eq!(
        (password["minLength"].clone(), password["maxLength"].clone()),
        (10.into(), 256.into())
    );
    has_all(
        &doc,
        "/api/v1/auth/password",
        "post",
        &["204", "401", "422", "429", "503"],
    );

    // History: path and query bounds, and every status.
    let history = "/api/v1/chat/conversations/{id}/messages";
    has_all(
        &doc,
        history,
        "get",
        &["200", "400", "401", "403", "404", "422", "503"],
    );
    let params = doc["paths"][history]["get"]["parameters"]
        .as_array()
        .unwrap();
    let param = |name: &str| params.iter().find(|p| p["name"] == name).unwrap()["schema"].clone();
    assert_eq!(param("id")["minimum"], 1);
    assert_eq!(
        (
            param("limit")["minimum"].clone(),
            param("limit")["maximum"].clone()
        ),
        (1.into(), 200.into())
    );
    assert_eq!(param("before_seq")["minimum"], 1);
    assert_eq!(param("after_seq")["minimum"], 0);

    // Member changes: bounded list, body statuses.
    has_all(
        &doc,
        "/api/v1/chat/conversations/{id}/participants",
        "post",
        &[
            "200", "400", "401", "403", "404", "413", "415", "422", "503",
        ],
    );
    let change = &schemas["ParticipantsChange"]["properties"]["user_ids"];
    assert_eq!(
        (change["minItems"].clone(), change["maxItems"].clone()),
        (1.into(), 1000.into())
    );

    // A rename: the name's rule as a new group's, every status.
    has_all(
        &doc,
        "/api/v1/chat/conversations/{id}",
        "patch",
        &[
            "200", "400", "401", "403", "404", "413", "415", "422", "500", "503",
        ],
    );
    let rename = &schemas["RenameConversation"]["properties"]["name"];
    assert_eq!(
        (rename["minLength"].clone(), rename["maxLength"].clone()),
        (1.into(), 100.into())
    );
    assert_eq!(
        rename["pattern"],
        schemas["CreateConversation"]["oneOf"][1]["properties"]["name"]["pattern"]
    );
    // One user's card.
    has_all(
        &doc,
        "/api/v1/users/{id}",
        "get",
        &["200", "400", "401", "404", "500", "503"],
    );
    assert_eq!(
        doc["paths"]["/api/v1/users/{id}"]["get"]["parameters"][0]["schema"]["minimum"],
        1
    );

    // The edge's own routes.
    has_all(
        &doc,
        "/api/v1/chat/conversations/{id}/ws",
        "get",
        &["101", "403", "426"],
    );
    has_all(
        &doc,
        "/api/v1/chat/conversations/{id}/events",
        "get",
        &["200", "400", "401", "403", "404"],
    );
    has_all(
        &doc,
        "/api/v1/chat/conversations/{id}/messages",
        "post",
        &[
            "200", "201", "400", "401", "403", "404", "413", "422", "429", "503",
        ],
    );
    let send = &doc["paths"]["/api/v1/chat/conversations/{id}/messages"]["post"]["requestBody"]["content"]
        ["application/json"]["schema"]["properties"];
    assert_eq!(send["content"]["maxLength"], 4000);
    assert_eq!(send["client_msg_id"]["pattern"], "^[A-Za-z0-9._:-]{1,64}$");
    has_all(
        &doc,
        "/api/v1/chat/conversations/{id}/typing",
        "post",
        &["204", "401", "403", "404", "429"],
    );
    has_all(
        &doc,
        "/api/v1/chat/conversations/{id}/read",
        "post",
        &["204", "400", "401", "403", "404", "413", "422", "429"],
    );
    has_all(
        &doc,
        "/api/v1/chat/ws-ticket",
        "post",
        &["200", "401", "403", "404"],
    );
    for path in [
        "/api/v1/chat/ws",
        "/api/v1/chat/ws/{token}",
        "/api/v1/chat/events",
        "/api/v1/edge/health",
    ] {
        assert!(doc["paths"][path]["get"].is_object(), "{path}");
    }
    has_all(&doc, "/api/v1/edge/demo", "get", &["200", "404"]);
    // The history GET and the edge's POST share a path without clobbering.
    assert!(doc["paths"][history]["get"]["responses"]["200"].is_object());
}

#[tokio::test]
async fn requests_just_outside_a_documented_bound_get_the_documented_status() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    for (query, status) in [
        ("limit=200", StatusCode::OK),
        ("limit=201", StatusCode::UNPROCESSABLE_ENTITY),
        ("limit=0", StatusCode::UNPROCESSABLE_ENTITY),
        ("after_seq=0", StatusCode::OK),
        ("after_seq=-1", StatusCode::UNPROCESSABLE_ENTITY),
        ("before_seq=0", StatusCode::UNPROCESSABLE_ENTITY),
        ("limit=x", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let (s, b) = app
            .get(
                &alex,
                &format!("/api/v1/chat/conversations/{id}/messages?{query}"),
            )
            .await;
        assert_eq!(s, status, "{query}: {b}");
    }
    // Bodies: the bounds hold on the list and the name as sent.
    let group = app.group(&alex, "Crew", &[&sam]).await;
    let path = format!("/api/v1/chat/conversations/{group}/participants");
    for body in [
        serde_json::json!({"user_ids": [0]}),
        serde_json::json!({"user_ids": vec![sam.id; 1001]}),
    ] {
        let (s, b) = app.delete(&alex, &path, body).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    }
    let (s, _) = app
        .delete(
            &alex,
            &path,
            serde_json::json!({"user_ids": vec![sam.id; 1000]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let padded = format!(" {} ", "n".repeat(99));
    let (s, b) = app
        .post(
            &alex,
            "/api/v1/chat/conversations",
            serde_json::json!({"type": "group", "name": padded, "participant_ids": []}),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::UNPROCESSABLE_ENTITY,
        "101 characters as sent: {b}"
    );
    let (s, _) = app
        .get(&alex, "/api/v1/chat/conversations/0/messages")
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A wrong method on a known path is a JSON 405.
    let res = app
        .http
        .put(app.url("/api/v1/auth/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "method_not_allowed");
    // An oversize body is a JSON 413.
    let res = app
        .http
        .post(app.url("/api/v1/auth/login"))
        .header("content-type", "application/json")
        .body(format!("{{\"email\":\"{}\"}}", "a".repeat(70_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "too_large");
}
