//! REST through the edge: proxied to the origin with the caller's token.

use anyhow::ensure;
use e2e::Stack;
use serde_json::{Value, json};

pub async fn rest_is_proxied_to_the_origin_with_the_callers_token(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let alex = s.user("Alex").await?;
    let sam = s.user("Sam").await?;
    let eve = s.user("Eve").await?;
    let conv = s.direct(&alex, &sam).await?;
    let (status, body) = s
        .call(
            Some(&alex),
            reqwest::Method::GET,
            "/api/v1/chat/conversations",
            None,
        )
        .await?;
    ensure!(status == 200, "{status} {body}");
    ensure!(body["conversations"][0]["id"] == conv, "{body}");
    let (status, body) = s
        .call(
            None,
            reqwest::Method::GET,
            "/api/v1/chat/conversations",
            None,
        )
        .await?;
    ensure!(
        status == 401 && body["code"] == "missing_token",
        "{status} {body}"
    );
    let (status, body) = s
        .call(
            Some(&eve),
            reqwest::Method::GET,
            &format!("/api/v1/chat/conversations/{conv}"),
            None,
        )
        .await?;
    ensure!(
        status == 403 && body["code"] == "forbidden",
        "{status} {body}"
    );
    // Query strings and bodies pass through; bad input keeps its status.
    let (status, body) = s
        .call(
            Some(&alex),
            reqwest::Method::GET,
            &format!("/api/v1/chat/conversations/{conv}/messages?limit=500"),
            None,
        )
        .await?;
    ensure!(status == 422, "{status} {body}");
    let (status, body) = s
        .call(
            Some(&alex),
            reqwest::Method::POST,
            "/api/v1/chat/conversations",
            Some(json!({"type": "direct", "participant_id": alex.id})),
        )
        .await?;
    ensure!(status == 422, "{status} {body}");
    Ok(())
}

pub async fn unknown_routes_and_bad_ids_get_json_errors(s: &mut Stack) -> anyhow::Result<()> {
    let alex = s.user("Alex").await?;
    let (status, body) = s
        .call(Some(&alex), reqwest::Method::GET, "/nothing-here", None)
        .await?;
    ensure!(
        status == 404 && body["code"] == "not_found",
        "{status} {body}"
    );
    let (status, body) = s
        .call(
            Some(&alex),
            reqwest::Method::GET,
            "/api/v1/chat/conversations/abc/ws",
            None,
        )
        .await?;
    ensure!(
        status == 400 && body["code"] == "invalid_path",
        "{status} {body}"
    );
    let (status, body) = s
        .call(
            Some(&alex),
            reqwest::Method::GET,
            "/api/v1/chat/conversations/1/ws",
            None,
        )
        .await?;
    ensure!(
        status == 426 && body["code"] == "upgrade_required",
        "{status} {body}"
    );
    Ok(())
}

/// A user who can log in (the suite's other users only have tokens).
async fn with_password(s: &Stack, name: &str, password: &str) -> anyhow::Result<String> {
    let email = format!(
        "{}-{}@e2e.vibe",
        name.to_lowercase(),
        uuid::Uuid::now_v7().simple()
    );
    let hash = origin::auth::hash_password(password)?;
    let client = s.pool.get().await?;
    client
        .execute(
            "INSERT INTO users (email, full_name, role, password_hash) VALUES ($1, $2, 'member', $3)",
            &[&email, &name, &hash],
        )
        .await?;
    Ok(email)
}

async fn post(
    s: &Stack,
    path: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let mut req = s.http().post(format!("{}{path}", s.edge)).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let text = res.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    ))
}

pub async fn sessions_rotate_revoke_and_end_through_the_edge(s: &mut Stack) -> anyhow::Result<()> {
    let email = with_password(s, "Robin", "a-long-password-1").await?;
    let s: &Stack = s;
    let login = |password: &'static str| {
        let email = email.clone();
        async move {
            post(
                s,
                "/api/v1/auth/login",
                None,
                json!({"email": email, "password": password}),
            )
            .await
        }
    };
    let (status, phone) = login("a-long-password-1").await?;
    ensure!(status == 200, "{status} {phone}");
    let (_, laptop) = login("a-long-password-1").await?;
    // Rotation: the new pair works, the old refresh token does not, and
    // using it again revokes the whole session (the newest token too).
    let (status, rotated) = post(
        s,
        "/api/v1/auth/refresh",
        None,
        json!({"refresh_token": phone["refresh_token"]}),
    )
    .await?;
    ensure!(
        status == 200 && rotated["refresh_token"] != phone["refresh_token"],
        "{status} {rotated}"
    );
    let (status, body) = post(
        s,
        "/api/v1/auth/refresh",
        None,
        json!({"refresh_token": phone["refresh_token"]}),
    )
    .await?;
    ensure!(
        status == 401 && body["code"] == "refresh_token_reused",
        "{status} {body}"
    );
    let (status, body) = post(
        s,
        "/api/v1/auth/refresh",
        None,
        json!({"refresh_token": rotated["refresh_token"]}),
    )
    .await?;
    ensure!(status == 401, "the family is revoked: {status} {body}");
    // The laptop's session is untouched; changing the password ends every
    // other session and keeps this one.
    let laptop_token = laptop["token"].as_str().unwrap_or_default().to_owned();
    let (_, other) = login("a-long-password-1").await?;
    let (status, body) = post(
        s,
        "/api/v1/auth/password",
        Some(&laptop_token),
        json!({"current_password": "a-long-password-1", "new_password": "another-long-password-2"}),
    )
    .await?;
    ensure!(status == 204, "{status} {body}");
    let (status, _) = post(
        s,
        "/api/v1/auth/refresh",
        None,
        json!({"refresh_token": other["refresh_token"]}),
    )
    .await?;
    ensure!(status == 401, "another session survived a password change");
    let (status, body) = post(
        s,
        "/api/v1/auth/refresh",
        None,
        json!({"refresh_token": laptop["refresh_token"]}),
    )
    .await?;
    ensure!(
        status == 200,
        "the changing session lives on: {status} {body}"
    );
    let (status, _) = login("a-long-password-1").await?;
    ensure!(status == 401, "the old password still logs in");
    // Logout-all ends the rest.
    let token = body["token"].as_str().unwrap_or_default().to_owned();
    let (status, _) = post(s, "/api/v1/auth/logout-all", Some(&token), json!({})).await?;
    ensure!(status == 204, "{status}");
    let (status, body) = post(
        s,
        "/api/v1/auth/refresh",
        None,
        json!({"refresh_token": body["refresh_token"]}),
    )
    .await?;
    ensure!(status == 401, "{status} {body}");
    Ok(())
}

pub async fn the_openapi_document_is_served_at_the_public_host_with_the_edges_routes(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (status, spec) = s
        .call(None, reqwest::Method::GET, "/api/openapi.json", None)
        .await?;
    ensure!(status == 200, "{status}");
    for path in [
        "/api/v1/chat/conversations/{id}/ws",
        "/api/v1/chat/conversations/{id}/events",
        "/api/v1/chat/conversations/{id}/messages",
        "/api/v1/chat/ws-ticket",
        "/api/v1/auth/refresh",
        "/api/v1/users/{id}",
        "/api/v1/edge/demo",
    ] {
        ensure!(spec["paths"][path].is_object(), "{path} is not described");
    }
    ensure!(
        spec["paths"]["/api/v1/chat/conversations/{id}"]["patch"].is_object(),
        "the rename is not described"
    );
    Ok(())
}

pub async fn a_dev_server_offers_the_seeded_demo_logins(s: &mut Stack) -> anyhow::Result<()> {
    // The stack sets DEMO_LOGINS as `cargo xtask dev` does; no token needed.
    let res = s
        .http()
        .get(format!("{}/api/v1/edge/demo", s.edge))
        .send()
        .await?;
    ensure!(res.status().as_u16() == 200, "{}", res.status());
    ensure!(
        res.headers()
            .get("cache-control")
            .is_some_and(|v| v == "no-store"),
        "{:?}",
        res.headers()
    );
    let body: Value = res.json().await?;
    let accounts: Vec<&str> = origin::seed::DEMO_USERS
        .iter()
        .map(|(email, _, _)| *email)
        .collect();
    ensure!(
        body == json!({"password": origin::seed::DEMO_PASSWORD, "accounts": accounts}),
        "{body}"
    );
    ensure!(
        accounts == ["coach@vibe.fit", "alex@vibe.fit", "sam@vibe.fit"],
        "{accounts:?}"
    );
    Ok(())
}
