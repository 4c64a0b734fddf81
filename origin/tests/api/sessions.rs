//! Sessions against PostgreSQL: login, refresh rotation, reuse detection,
//! logout, logout-all, password change.

use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::Role;
use shared::auth::AUDIENCE_API;

use crate::helpers::{JWT_SECRET, PASSWORD, TestApp, assert_error, spawn_app};

const LIST: &str = "/api/v1/chat/conversations";

fn token(body: &Value) -> &str {
    body["token"].as_str().expect("token")
}

fn refresh_token(body: &Value) -> &str {
    body["refresh_token"].as_str().expect("refresh_token")
}

/// Refreshes and expects success.
async fn refreshed(app: &TestApp, refresh: &str) -> Value {
    let (status, body) = app.refresh(refresh).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn login_returns_a_short_lived_access_token_naming_its_session_and_a_hashed_refresh_token() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let body = app.session(&alex).await;
    let now = chrono::Utc::now().timestamp();
    let claims =
        shared::auth::verify(token(&body), JWT_SECRET.as_bytes(), AUDIENCE_API, now).unwrap();
    let session_id: uuid::Uuid = serde_json::from_value(body["session_id"].clone()).unwrap();
    assert_eq!(claims.sid, Some(session_id));
    assert_eq!(claims.nbf, Some(claims.iat));
    assert!((claims.exp - now - 900).abs() <= 5, "15 minutes by default");
    let expires_at: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(body["expires_at"].clone()).unwrap();
    assert_eq!(expires_at.timestamp(), claims.exp);
    let refresh_expires: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(body["refresh_expires_at"].clone()).unwrap();
    let days = (refresh_expires.timestamp() - now) as f64 / 86_400.0;
    assert!((days - 30.0).abs() < 0.01, "30 days by default: {days}");
    assert_eq!(refresh_token(&body).len(), 43);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["user"]["id"], alex.id);

    // Only the SHA-256 of the refresh token is stored.
    let client = app.pool.get().await.unwrap();
    let (by_hash, by_text): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE token_hash = sha256(convert_to($1, 'UTF8'))),
                        count(*) FILTER (WHERE encode(token_hash, 'escape') LIKE '%' || $1 || '%')
                 FROM refresh_tokens",
                &[&refresh_token(&body)],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((by_hash, by_text), (1, 0));
    let (status, _) = app.get_as(token(&body), LIST).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_refresh_chain_keeps_one_session_and_hands_out_fresh_working_tokens() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let first = app.session(&alex).await;
    let second = refreshed(&app, refresh_token(&first)).await;
    let third = refreshed(&app, refresh_token(&second)).await;
    for body in [&second, &third] {
        assert_eq!(body["session_id"], first["session_id"]);
        assert_eq!(body["user"]["id"], alex.id);
        let (status, b) = app.get_as(token(body), LIST).await;
        assert_eq!(status, StatusCode::OK, "{b}");
    }
    let refresh_tokens = [&first, &second, &third].map(|b| refresh_token(b).to_owned());
    assert_ne!(refresh_tokens[0], refresh_tokens[1]);
    assert_ne!(refresh_tokens[1], refresh_tokens[2]);
    // Earlier access tokens of the session keep working until they expire.
    let (status, _) = app.get_as(token(&first), LIST).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.count("SELECT count(*) FROM sessions").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM refresh_tokens WHERE used_at IS NULL")
            .await,
        1
    );
}

#[tokio::test]
async fn a_rotated_refresh_token_is_refused_as_reuse_and_revokes_the_whole_family() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let other_device = app.session(&alex).await;
    let first = app.session(&alex).await;
    let second = refreshed(&app, refresh_token(&first)).await;
    let newest = refreshed(&app, refresh_token(&second)).await;

    // The first refresh token comes back: someone else holds the family.
    let (status, body) = app.refresh(refresh_token(&first)).await;
    assert_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        "refresh_token_reused",
    );
    // The newest token of the family stops working too, and so does every
    // access token of the session on REST.
    let (status, body) = app.refresh(refresh_token(&newest)).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "session_revoked");
    for body in [&first, &newest] {
        let (status, b) = app.get_as(token(body), LIST).await;
        assert_error(status, &b, StatusCode::UNAUTHORIZED, "session_revoked");
    }
    // Another session of the same user is untouched.
    refreshed(&app, refresh_token(&other_device)).await;
    let reason: String = app
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT revoked_reason FROM sessions WHERE id = $1::text::uuid",
            &[&first["session_id"].as_str().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reason, "refresh_token_reused");
}

#[tokio::test]
async fn concurrent_refreshes_with_one_token_leave_exactly_one_winner_and_count_the_rest_as_reuse()
{
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let login = app.session(&alex).await;
    let presented = refresh_token(&login).to_owned();
    let results = futures::future::join_all((0..8).map(|_| app.refresh(&presented))).await;
    let winners: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    // The first loser finds the token used and revokes the session; any
    // loser after that finds the session revoked.
    let mut codes: Vec<&str> = results
        .iter()
        .filter(|(s, _)| *s != StatusCode::OK)
        .map(|(s, b)| {
            assert_eq!(*s, StatusCode::UNAUTHORIZED, "{b}");
            b["code"].as_str().unwrap()
        })
        .collect();
    codes.sort_unstable();
    codes.dedup();
    assert!(codes.contains(&"refresh_token_reused"), "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| ["refresh_token_reused", "session_revoked"].contains(c)),
        "{codes:?}"
    );
    // Treating the loser as a reuse revokes the family, the winner included.
    let (status, body) = app.refresh(refresh_token(winners[0])).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "session_revoked");
    assert_eq!(
        app.count("SELECT count(*) FROM refresh_tokens").await,
        2,
        "one successor was minted, no more"
    );
}

#[tokio::test]
async fn unknown_malformed_and_expired_refresh_tokens_get_their_own_401_codes() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    for garbage in [
        "",
        "short",
        &"A".repeat(43),
        &"é".repeat(43),
        &"x".repeat(5000),
    ] {
        let (status, body) = app.refresh(garbage).await;
        assert_error(
            status,
            &body,
            StatusCode::UNAUTHORIZED,
            "invalid_refresh_token",
        );
    }
    let login = app.session(&alex).await;
    app.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE refresh_tokens SET expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    let (status, body) = app.refresh(refresh_token(&login)).await;
    assert_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        "refresh_token_expired",
    );
    let (status, body) = app
        .http
        .post(app.url("/api/v1/auth/refresh"))
        .json(&json!({}))
        .send()
        .await
        .map(|r| (r.status(), r))
        .unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body:?}");
}

#[tokio::test]
async fn logging_out_revokes_this_session_only() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let phone = app.session(&alex).await;
    let laptop = app.session(&alex).await;
    let (status, body) = app
        .post_as(token(&phone), "/api/v1/auth/logout", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = app.refresh(refresh_token(&phone)).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "session_revoked");
    let (status, body) = app.get_as(token(&phone), LIST).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "session_revoked");
    // Logging out again with the same token: the session is gone.
    let (status, body) = app
        .post_as(token(&phone), "/api/v1/auth/logout", None)
        .await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "session_revoked");

    let (status, _) = app.get_as(token(&laptop), LIST).await;
    assert_eq!(status, StatusCode::OK);
    refreshed(&app, refresh_token(&laptop)).await;
}

#[tokio::test]
async fn logout_all_revokes_every_session_of_the_user_and_no_one_elses() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let alex_sessions = [app.session(&alex).await, app.session(&alex).await];
    let sams = app.session(&sam).await;
    let (status, body) = app
        .post_as(token(&alex_sessions[0]), "/api/v1/auth/logout-all", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    for s in &alex_sessions {
        let (status, body) = app.refresh(refresh_token(s)).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "session_revoked");
        let (status, body) = app.get_as(token(s), LIST).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "session_revoked");
    }
    refreshed(&app, refresh_token(&sams)).await;
    // Alex can log in again: a new session.
    let again = app.session(&alex).await;
    let (status, _) = app.get_as(token(&again), LIST).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn changing_the_password_revokes_the_other_sessions_keeps_this_one_and_retires_the_old_password()
 {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let here = app.session(&alex).await;
    let elsewhere = app.session(&alex).await;
    let new_password = "a much better password";
    let (status, body) = app
        .post_as(
            token(&here),
            "/api/v1/auth/password",
            Some(json!({"current_password": PASSWORD, "new_password": new_password})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    let (status, body) = app.refresh(refresh_token(&elsewhere)).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "session_revoked");
    let (status, body) = app.get_as(token(&elsewhere), LIST).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "session_revoked");
    // This session survives, access and refresh.
    let (status, _) = app.get_as(token(&here), LIST).await;
    assert_eq!(status, StatusCode::OK);
    refreshed(&app, refresh_token(&here)).await;

    let (status, body) = app.login(&alex.email, PASSWORD).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "bad_credentials");
    let (status, body) = app.login(&alex.email, new_password).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn the_password_policy_refuses_short_long_unchanged_and_a_wrong_current_password() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let here = app.session(&alex).await;
    let change = |current: String, new: String| {
        let t = token(&here).to_owned();
        let app = &app;
        async move {
            app.post_as(
                &t,
                "/api/v1/auth/password",
                Some(json!({"current_password": current, "new_password": new})),
            )
            .await
        }
    };
    let cases = [
        (PASSWORD.to_owned(), "é".repeat(9), "password_too_short"),
        (PASSWORD.to_owned(), "a".repeat(257), "password_too_long"),
        (
            PASSWORD.to_owned(),
            PASSWORD.to_owned(),
            "password_unchanged",
        ),
        (
            "x".repeat(1025),
            "a fine new password".to_owned(),
            "password_too_long",
        ),
    ];
    for (current, new, code) in cases {
        let (status, body) = change(current, new).await;
        assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, code);
    }
    // Ten two-byte characters pass the policy (characters, not bytes).
    let (status, body) = change(PASSWORD.to_owned(), "é".repeat(10)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let current = "é".repeat(10);

    let (status, body) = change(
        "not my password".to_owned(),
        "another new password".to_owned(),
    )
    .await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "bad_credentials");
    // The session is not harmed by a wrong current password.
    let (status, _) = app.get_as(token(&here), LIST).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app
        .http
        .post(app.url("/api/v1/auth/password"))
        .json(&json!({"current_password": current, "new_password": "another new password"}))
        .send()
        .await
        .map(|r| (r.status(), r))
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token: {body:?}");
}

#[tokio::test]
async fn wrong_current_passwords_count_toward_the_accounts_login_guard() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let here = app.session(&alex).await;
    for _ in 0..origin::state::LoginGuard::MAX_FAILURES {
        let (status, body) = app
            .post_as(
                token(&here),
                "/api/v1/auth/password",
                Some(json!({"current_password": "guess", "new_password": "a fine new password"})),
            )
            .await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "bad_credentials");
    }
    // Now the right current password waits as well, and so does a login.
    let (status, body) = app
        .post_as(
            token(&here),
            "/api/v1/auth/password",
            Some(json!({"current_password": PASSWORD, "new_password": "a fine new password"})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_attempts",
    );
    let (status, body) = app.login(&alex.email, PASSWORD).await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_attempts",
    );
}

#[tokio::test]
async fn the_sweeper_deletes_expired_refresh_tokens_and_dead_sessions_only() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let live = app.session(&alex).await;
    let expired = app.session(&alex).await;
    let revoked_long_ago = app.session(&alex).await;
    let revoked_now = app.session(&alex).await;
    let client = app.pool.get().await.unwrap();
    let id = |b: &Value| {
        b["session_id"]
            .as_str()
            .unwrap()
            .parse::<uuid::Uuid>()
            .unwrap()
    };
    client
        .execute(
            "UPDATE refresh_tokens SET expires_at = now() - interval '1 minute' WHERE session_id = $1",
            &[&id(&expired)],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE sessions SET last_used_at = now() - interval '40 days' WHERE id = $1",
            &[&id(&expired)],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE sessions SET revoked_at = now() - interval '1 day', revoked_reason = 'logout'
             WHERE id = $1",
            &[&id(&revoked_long_ago)],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE sessions SET revoked_at = now(), revoked_reason = 'logout' WHERE id = $1",
            &[&id(&revoked_now)],
        )
        .await
        .unwrap();
    let (tokens, sessions) = origin::sessions::sweep(
        &client,
        std::time::Duration::from_secs(30 * 86_400),
        std::time::Duration::from_secs(900),
    )
    .await
    .unwrap();
    assert_eq!((tokens, sessions), (1, 2));
    let left: Vec<uuid::Uuid> = client
        .query("SELECT id FROM sessions ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // A just-revoked session stays while its access tokens could live, so
    // REST still says session_revoked for them.
    let mut expected = vec![id(&live), id(&revoked_now)];
    expected.sort();
    assert_eq!(left, expected);
    refreshed(&app, refresh_token(&live)).await;
}
