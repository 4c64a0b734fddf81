//! REST through the edge: proxied to the origin with the caller's token.

use anyhow::ensure;
use e2e::Stack;
use serde_json::json;

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
