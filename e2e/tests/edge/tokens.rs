//! Every rule of the token check, with a token that breaks it, on every
//! path a token can take: REST through the edge, the room's WebSocket, its
//! SSE stream and its POSTs, the ticket mint, the user's WebSocket and SSE
//! connection, and the in-band renewal on an open socket. The table in
//! docs/ARCHITECTURE.md ("Token claims and their rules") points here.
//!
//! Also: a connection outlives its token only if the client renews it.

use std::time::Duration;

use anyhow::{Context, ensure};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use e2e::{Stack, User};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use shared::Role;
use shared::auth::{AUDIENCE_API, AUDIENCE_WS_TICKET, Claims, ISSUER};

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Claims of a valid session token for `user`, to break one rule at a time.
fn claims(user: &User) -> Claims {
    Claims::new(user.id, &user.name, Role::Member, AUDIENCE_API, now(), 600)
}

fn sign(value: &impl serde::Serialize, secret: &[u8], alg: Algorithm) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(
        &Header::new(alg),
        value,
        &EncodingKey::from_secret(secret),
    )?)
}

/// The bad tokens: (what is wrong, token, the code every path answers).
fn bad_tokens(s: &Stack, user: &User) -> anyhow::Result<Vec<(&'static str, String, &'static str)>> {
    let secret = s.secrets.jwt.as_bytes();
    let good = claims(user);
    let mut cases = Vec::new();
    cases.push((
        "signed with another secret",
        sign(
            &good,
            b"another-secret-another-secret-another",
            Algorithm::HS256,
        )?,
        "invalid_token",
    ));
    cases.push((
        "signed with HS512 (algorithm confusion)",
        sign(&good, secret, Algorithm::HS512)?,
        "invalid_token",
    ));
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&good)?)
    );
    cases.push(("alg none, unsigned", none, "invalid_token"));
    let mut c = good.clone();
    c.exp = now() - 61;
    c.iat = now() - 700;
    c.nbf = Some(c.iat);
    cases.push((
        "expired beyond the leeway",
        sign(&c, secret, Algorithm::HS256)?,
        "token_expired",
    ));
    let mut c = good.clone();
    c.nbf = Some(now() + 120);
    cases.push((
        "not valid before two minutes from now",
        sign(&c, secret, Algorithm::HS256)?,
        "token_not_yet_valid",
    ));
    let mut c = good.clone();
    c.iat = now() + 120;
    c.nbf = None;
    cases.push((
        "issued two minutes in the future",
        sign(&c, secret, Algorithm::HS256)?,
        "invalid_token",
    ));
    let mut c = good.clone();
    c.iss = "someone-else".to_owned();
    cases.push((
        "another issuer",
        sign(&c, secret, Algorithm::HS256)?,
        "invalid_token",
    ));
    let mut c = good.clone();
    c.aud = AUDIENCE_WS_TICKET.to_owned();
    cases.push((
        "a ticket's audience",
        sign(&c, secret, Algorithm::HS256)?,
        "invalid_token",
    ));
    let mut v = serde_json::to_value(&good)?;
    v["sub"] = json!("not-a-number");
    cases.push((
        "a non-numeric subject",
        sign(&v, secret, Algorithm::HS256)?,
        "invalid_token",
    ));
    for missing in ["exp", "sub", "iss", "aud"] {
        let mut v = serde_json::to_value(&good)?;
        v.as_object_mut().context("claims object")?.remove(missing);
        cases.push((
            match missing {
                "exp" => "no exp",
                "sub" => "no sub",
                "iss" => "no iss",
                _ => "no aud",
            },
            sign(&v, secret, Algorithm::HS256)?,
            "invalid_token",
        ));
    }
    let _ = ISSUER;
    Ok(cases)
}

/// `(status, code)` of a plain HTTP request with a bearer token.
async fn http_code(
    s: &Stack,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, String)> {
    let mut req = s
        .http()
        .request(method, format!("{}{path}", s.edge))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    Ok((status, body["code"].as_str().unwrap_or_default().to_owned()))
}

/// The code of the `error` frame before a 1008 close.
async fn ws_code(s: &Stack, path: &str, query: &str) -> anyhow::Result<String> {
    let mut ws = s.ws_with_path(path, query).await?;
    let (frames, closed) = ws.closed().await?;
    ensure!(closed.code == 1008, "{path}: closed with {closed:?}");
    Ok(frames
        .iter()
        .find(|f| f["type"] == "error")
        .and_then(|f| f["code"].as_str())
        .unwrap_or_default()
        .to_owned())
}

/// `(status, code)` of an SSE request with `?token=`.
async fn sse_code(s: &Stack, path: &str, token: &str) -> anyhow::Result<(u16, String)> {
    let res = s
        .http()
        .get(format!("{}{path}?token={token}", s.edge))
        .send()
        .await?;
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    Ok((status, body["code"].as_str().unwrap_or_default().to_owned()))
}

pub async fn every_claim_rule_refuses_its_bad_token_on_every_path(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, _sam, conv) = s.pair().await?;
    let mut open = s.ws(&alex, conv, None).await?;
    for (what, token, code) in bad_tokens(s, &alex)? {
        let get = reqwest::Method::GET;
        let post = reqwest::Method::POST;
        let rest = http_code(s, get, "/api/v1/chat/conversations", &token, None).await?;
        ensure!(rest == (401, code.to_owned()), "{what}: REST {rest:?}");
        let mint = http_code(s, post.clone(), "/api/v1/chat/ws-ticket", &token, None).await?;
        ensure!(mint == (401, code.to_owned()), "{what}: ws-ticket {mint:?}");
        for action in ["messages", "typing", "read"] {
            let path = format!("/api/v1/chat/conversations/{conv}/{action}");
            let body = json!({"content": "x", "seq": 0});
            let got = http_code(s, post.clone(), &path, &token, Some(body)).await?;
            ensure!(
                got == (401, code.to_owned()),
                "{what}: POST {action} {got:?}"
            );
        }
        let query = format!("token={token}");
        let room_ws = ws_code(s, &format!("/api/v1/chat/conversations/{conv}/ws"), &query).await?;
        ensure!(room_ws == code, "{what}: room WebSocket {room_ws}");
        let room_sse = sse_code(
            s,
            &format!("/api/v1/chat/conversations/{conv}/events"),
            &token,
        )
        .await?;
        ensure!(
            room_sse == (401, code.to_owned()),
            "{what}: room SSE {room_sse:?}"
        );
        let user_ws = ws_code(s, "/api/v1/chat/ws", &query).await?;
        ensure!(user_ws == code, "{what}: user WebSocket {user_ws}");
        let seed_ws = ws_code(s, &format!("/api/v1/chat/ws/{token}"), "").await?;
        ensure!(seed_ws == code, "{what}: the seed's token path {seed_ws}");
        let user_sse = sse_code(s, "/api/v1/chat/events", &token).await?;
        ensure!(
            user_sse == (401, code.to_owned()),
            "{what}: user SSE {user_sse:?}"
        );
        // Renewing an open socket with it: refused, and the socket lives.
        open.send(json!({"type": "auth", "token": token})).await?;
        let err = open.expect("error").await?;
        ensure!(err["code"] == code, "{what}: in-band renewal {err}");
    }
    open.say(conv, "still here", "tokens-1").await?;
    open.expect("ack").await?;
    Ok(())
}

pub async fn a_connection_whose_token_expires_is_told_and_closed_unless_renewed(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    // Refused in 3 s: exp already 27 s past, inside the 30 s leeway.
    let short = |user: &User| s.token_expiring_in(user.id, &user.name, 3);
    let mut lapsing = s.ws_with(conv, &format!("token={}", short(&alex)?)).await?;
    let mut lobby = s
        .ws_with_path("/api/v1/chat/ws", &format!("token={}", short(&sam)?))
        .await?;
    let mut stream = s
        .sse(conv, &format!("token={}", short(&sam)?), &[])
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut renewed = s.ws_with(conv, &format!("token={}", short(&alex)?)).await?;
    renewed
        .send(json!({"type": "auth", "token": alex.token}))
        .await?;
    renewed.expect("auth_ok").await?;
    for (name, ws) in [("room", &mut lapsing), ("user", &mut lobby)] {
        let (frames, closed) = ws.closed().await?;
        ensure!(closed.code == 1008, "{name}: {closed:?}");
        ensure!(
            frames
                .iter()
                .any(|f| f["type"] == "error" && f["code"] == "token_expired"),
            "{name}: {frames:?}"
        );
    }
    let (_, data) = stream.expect("error").await?;
    ensure!(data["code"] == "token_expired", "{data}");
    stream.ended(Duration::from_secs(10)).await?;
    // The renewed one is alive well past the first token.
    renewed.say(conv, "renewed", "renew-1").await?;
    renewed.expect("ack").await?;
    // Another user's token on it is a policy violation.
    renewed
        .send(json!({"type": "auth", "token": sam.token}))
        .await?;
    let (frames, closed) = renewed.closed().await?;
    ensure!(
        closed.code == 1008 && frames.iter().any(|f| f["code"] == "invalid_token"),
        "{frames:?} {closed:?}"
    );
    Ok(())
}
