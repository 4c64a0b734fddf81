use reqwest::StatusCode;
use serde_json::json;
use shared::Role;
use shared::auth::{AUDIENCE_API, AUDIENCE_WS_TICKET, Claims};

use crate::helpers::{
    JWT_SECRET, PASSWORD, SERVICE_SECRET, assert_error, base64url, forge, forge_with, spawn_app,
    spawn_app_with, status_and_json,
};

#[tokio::test]
async fn logging_in_returns_a_token_the_chat_api_accepts() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let res = app
        .http
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"email": alex.email.to_uppercase(), "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(res).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["id"], alex.id);
    assert_eq!(body["user"]["role"], "member");
    assert_eq!(body["token_type"], "Bearer");
    let token = body["token"].as_str().unwrap();
    let claims = shared::auth::verify(
        token,
        JWT_SECRET.as_bytes(),
        AUDIENCE_API,
        chrono::Utc::now().timestamp(),
    )
    .unwrap();
    assert_eq!(claims.user_id(), Ok(alex.id));
    assert_eq!(claims.iss, shared::auth::ISSUER);

    let res = app
        .http
        .get(app.url("/api/v1/chat/conversations"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_email_get_the_same_401() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let mut answers = Vec::new();
    for (email, password) in [
        (alex.email.as_str(), "wrong password"),
        ("nobody@test.vibe", PASSWORD),
    ] {
        let res = app
            .http
            .post(app.url("/api/v1/auth/login"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .unwrap();
        let (status, body) = status_and_json(res).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "bad_credentials");
        answers.push(body);
    }
    assert_eq!(answers[0], answers[1]);
}

#[tokio::test]
async fn malformed_login_json_gets_400_and_missing_fields_get_422() {
    let app = spawn_app().await;
    let res = app
        .http
        .post(app.url("/api/v1/auth/login"))
        .header("content-type", "application/json")
        .body("{\"email\": ")
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(res).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_json");

    let res = app
        .http
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"email": "alex@vibe.fit"}))
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(res).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );

    let res = app
        .http
        .post(app.url("/api/v1/auth/login"))
        .body("email=a")
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(res).await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
}

/// One row per claim rule of `shared::auth::verify` (the "REST" column of
/// the claims table in docs/ARCHITECTURE.md): each token breaks exactly one
/// rule, and the chat API refuses it with 401 and the rule's code.
#[tokio::test]
async fn every_claim_rule_refuses_its_broken_token_on_rest_with_401_and_its_code() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let now = chrono::Utc::now().timestamp();
    let leeway = shared::auth::LEEWAY_SECS;
    let claims = |f: &dyn Fn(&mut Claims)| {
        let mut c = Claims::new(alex.id, "Alex", Role::Member, AUDIENCE_API, now, 900);
        f(&mut c);
        c
    };
    let sign = |c: &Claims| shared::auth::issue(c, JWT_SECRET.as_bytes()).unwrap();
    let payload = serde_json::to_value(claims(&|_| {})).unwrap();
    let without = |claim: &str| {
        let mut p = payload.clone();
        p.as_object_mut().unwrap().remove(claim);
        forge(&json!({"alg": "HS256", "typ": "JWT"}), &p)
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                base64url(br#"{"alg":"none","typ":"JWT"}"#),
                base64url(payload.to_string().as_bytes())
            ),
            "invalid_token",
        ),
        (
            "alg HS512",
            forge_with(&json!({"alg": "HS512", "typ": "JWT"}), &payload, true),
            "invalid_token",
        ),
        (
            "alg RS256 over an HMAC",
            forge(&json!({"alg": "RS256", "typ": "JWT"}), &payload),
            "invalid_token",
        ),
        (
            "another secret",
            shared::auth::issue(
                &claims(&|_| {}),
                b"someone-elses-secret-someone-elses-secret",
            )
            .unwrap(),
            "invalid_token",
        ),
        (
            "expired beyond the leeway",
            sign(&claims(&|c| c.exp = now - leeway - 10)),
            "token_expired",
        ),
        (
            "not yet valid beyond the leeway",
            sign(&claims(&|c| c.nbf = Some(now + leeway + 10))),
            "token_not_yet_valid",
        ),
        (
            "issued in the future",
            sign(&claims(&|c| {
                c.iat = now + leeway + 10;
                c.nbf = None;
            })),
            "invalid_token",
        ),
        (
            "wrong issuer",
            sign(&claims(&|c| c.iss = "someone-else".into())),
            "invalid_token",
        ),
        (
            "a ticket's audience",
            sign(&claims(&|c| c.aud = AUDIENCE_WS_TICKET.into())),
            "invalid_token",
        ),
        ("no sub", without("sub"), "invalid_token"),
        (
            "non-numeric sub",
            sign(&claims(&|c| c.sub = "alex".into())),
            "invalid_token",
        ),
        ("no exp", without("exp"), "invalid_token"),
        ("garbage", "garbage".to_owned(), "invalid_token"),
    ];
    for (rule, token, code) in cases {
        let res = app
            .http
            .get(app.url("/api/v1/chat/conversations"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let (status, body) = status_and_json(res).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{rule}: {body}");
        assert_eq!(body["code"], code, "{rule}: {body}");
    }
    // The tolerated side of each time rule passes.
    for (rule, c) in [
        (
            "expired within the leeway",
            claims(&|c| c.exp = now - leeway + 10),
        ),
        (
            "not yet valid within the leeway",
            claims(&|c| c.nbf = Some(now + leeway - 10)),
        ),
    ] {
        let res = app
            .http
            .get(app.url("/api/v1/chat/conversations"))
            .bearer_auth(sign(&c))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{rule}");
    }
    // An empty bearer is a missing token.
    let res = app
        .http
        .get(app.url("/api/v1/chat/conversations"))
        .header("authorization", "Bearer ")
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(res).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "missing_token");
}

#[tokio::test]
async fn every_chat_route_without_a_token_gets_401() {
    let app = spawn_app().await;
    let routes = [
        ("GET", "/api/v1/chat/conversations"),
        ("POST", "/api/v1/chat/conversations"),
        ("GET", "/api/v1/chat/conversations/1"),
        ("GET", "/api/v1/chat/conversations/1/messages"),
        ("POST", "/api/v1/chat/conversations/1/participants"),
        ("DELETE", "/api/v1/chat/conversations/1/participants"),
        ("GET", "/api/v1/chat/active-users"),
        ("GET", "/api/v1/chat/presence/1"),
    ];
    for (method, path) in routes {
        let res = app
            .http
            .request(method.parse().unwrap(), app.url(path))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let (status, body) = status_and_json(res).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "missing_token");
    }
}

#[tokio::test]
async fn seeding_the_demo_twice_creates_each_demo_user_once_and_they_can_log_in() {
    let app = spawn_app().await;
    origin::seed::seed_demo(&app.pool).await.unwrap();
    origin::seed::seed_demo(&app.pool).await.unwrap();
    assert_eq!(app.count("SELECT count(*) FROM users").await, 3);
    assert_eq!(
        app.count("SELECT count(*) FROM conversations WHERE kind = 'group'")
            .await,
        1
    );
    for (email, _, role) in origin::seed::DEMO_USERS {
        let res = app
            .http
            .post(app.url("/api/v1/auth/login"))
            .json(&json!({"email": email, "password": origin::seed::DEMO_PASSWORD}))
            .send()
            .await
            .unwrap();
        let (status, body) = status_and_json(res).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["user"]["role"], *role);
    }
}

/// A login as if proxied by the edge for a caller at `ip` (when `secret` is
/// the service secret), or as a client forging the edge's header.
async fn login_from(
    app: &crate::helpers::TestApp,
    email: &str,
    password: &str,
    ip: &str,
    secret: Option<&str>,
) -> reqwest::Response {
    let mut req = app
        .http
        .post(app.url("/api/v1/auth/login"))
        .header(shared::protocol::internal::CLIENT_IP_HEADER, ip)
        .json(&json!({"email": email, "password": password}));
    if let Some(secret) = secret {
        req = req.header(shared::protocol::internal::SERVICE_SECRET_HEADER, secret);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn repeated_failed_logins_lock_that_email_from_that_address_with_429_and_retry_after() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let attacker = "203.0.113.7";
    for _ in 0..origin::state::LoginGuard::MAX_FAILURES {
        let res = login_from(&app, &alex.email, "wrong", attacker, Some(SERVICE_SECRET)).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    // Now even the right password waits there: otherwise guessing goes on.
    let res = login_from(&app, &alex.email, PASSWORD, attacker, Some(SERVICE_SECRET)).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 0 && retry <= 15 * 60);
    let (status, body) = status_and_json(res).await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_attempts",
    );
    // Alex, at home, is not locked out by the attacker.
    let res = login_from(
        &app,
        &alex.email,
        PASSWORD,
        "198.51.100.20",
        Some(SERVICE_SECRET),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    // Another account is unaffected from the attacker's address too.
    let sam = app.user("Sam", Role::Member).await;
    let res = login_from(&app, &sam.email, PASSWORD, attacker, Some(SERVICE_SECRET)).await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_forwarded_client_address_is_believed_only_with_the_service_secret() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    // Without the secret the forwarded header is ignored: every attempt
    // counts against the TCP peer, whatever address it claims.
    for n in 0..origin::state::LoginGuard::MAX_FAILURES {
        let claimed = format!("192.0.2.{n}");
        let secret = if n % 2 == 0 {
            None
        } else {
            Some("not-the-secret")
        };
        let res = login_from(&app, &alex.email, "wrong", &claimed, secret).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    let res = login_from(&app, &alex.email, PASSWORD, "192.0.2.200", None).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let (status, _) = app.login(&alex.email, PASSWORD).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "127.0.0.1 is locked");
}

#[tokio::test]
async fn guessing_from_many_addresses_slows_every_attempt_but_lets_the_right_password_in() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    // Twelve failures, one per address: none of them is locked.
    for n in 0..12 {
        let res = login_from(
            &app,
            &alex.email,
            "wrong",
            &format!("203.0.113.{n}"),
            Some(SERVICE_SECRET),
        )
        .await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    let expected = origin::state::LoginGuard::delay_for(12);
    assert_eq!(expected, std::time::Duration::from_secs(1));
    let started = std::time::Instant::now();
    let res = login_from(
        &app,
        &alex.email,
        PASSWORD,
        "198.51.100.20",
        Some(SERVICE_SECRET),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(started.elapsed() >= expected, "{:?}", started.elapsed());
    // Another email is not slowed.
    let sam = app.user("Sam", Role::Member).await;
    let started = std::time::Instant::now();
    let (status, _) = app.login(&sam.email, PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() < expected, "{:?}", started.elapsed());
}

#[tokio::test]
async fn an_email_with_a_nul_or_over_254_bytes_and_a_password_over_1024_bytes_get_422() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let long_email = format!("{}@test.vibe", "a".repeat(250));
    let cases = [
        (
            "alex\u{0}@test.vibe".to_owned(),
            PASSWORD.to_owned(),
            "invalid_field",
        ),
        (
            format!("{}\u{0}", alex.email),
            PASSWORD.to_owned(),
            "invalid_field",
        ),
        (
            "alex\n@test.vibe".to_owned(),
            PASSWORD.to_owned(),
            "invalid_field",
        ),
        (long_email, PASSWORD.to_owned(), "too_long"),
        (alex.email.clone(), "p".repeat(1025), "password_too_long"),
    ];
    for (email, password, code) in cases {
        let (status, body) = app.login(&email, &password).await;
        assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, code);
    }
    // None of them counted as a failed login.
    assert!(app.state.login_guard.is_empty());
    let (status, _) = app.login(&alex.email, PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn logins_beyond_the_hashing_bound_wait_or_get_503_busy_and_never_a_500() {
    let app = spawn_app_with(&[("HASH_CONCURRENCY", "2"), ("HASH_WAIT_MS", "100")]).await;
    let alex = app.user("Alex", Role::Member).await;
    assert_eq!(app.state.hasher.permits(), 2);
    let attempts = (0..24).map(|_| {
        app.http
            .post(app.url("/api/v1/auth/login"))
            .json(&json!({"email": alex.email, "password": PASSWORD}))
            .send()
    });
    let responses = futures::future::join_all(attempts).await;
    let (mut ok, mut busy) = (0, 0);
    for res in responses {
        let res = res.unwrap();
        let retry_after = res.headers().get("retry-after").cloned();
        let (status, body) = status_and_json(res).await;
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_error(status, &body, StatusCode::SERVICE_UNAVAILABLE, "busy");
                assert_eq!(retry_after.unwrap(), "1");
                busy += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(ok >= 2, "the bound lets work through: {ok} ok, {busy} busy");
    assert!(busy >= 1, "24 checks do not fit in 100 ms on two slots");
    assert!(
        app.state.hasher.peak_in_flight() <= 2,
        "{} Argon2 checks ran at once",
        app.state.hasher.peak_in_flight()
    );
    // Every permit came back.
    assert_eq!(app.state.hasher.available(), 2);
}
