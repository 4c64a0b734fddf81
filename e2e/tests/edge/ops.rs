//! Operations: after a short chat over every transport, the origin's
//! `/metrics` has a sample of every metric the Grafana dashboard and the
//! alert rules read (so none of them watches a series that does not
//! exist), and the edge never serves that text, under any spelling of the
//! path.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, ensure};
use e2e::{Stack, User};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the edge's reports may take to reach the origin: they are
/// batched, not sent per event.
const REPORT_WITHIN: Duration = Duration::from_secs(60);

/// A raw HTTP/1.1 GET of `path` exactly as written: an HTTP client library
/// would normalise `..` and percent-escapes away before sending them.
async fn raw_get(edge: &str, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    let host = edge.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connect to the edge at {host}"))?;
    let auth = token.map_or_else(String::new, |t| format!("authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n{auth}connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    // Read one response, not to EOF: workerd holds the connection open for
    // a while even after `connection: close`.
    let raw = tokio::time::timeout(Duration::from_secs(10), read_response(&mut stream))
        .await
        .with_context(|| format!("no answer for {path}"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line for {path}: {text:.200}"))?;
    Ok((status, text))
}

/// Reads one HTTP/1.1 response: its head, then a body of its
/// `content-length`, or chunks up to the last one, or up to the end.
async fn read_response(stream: &mut tokio::net::TcpStream) -> anyhow::Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        raw.extend_from_slice(&chunk[..n]);
        if n == 0 {
            return Ok(raw);
        }
        let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) else {
            continue;
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let complete = match length {
            Some(len) => raw.len() >= head_end + len,
            None if head.contains("transfer-encoding: chunked") => raw.ends_with(b"\r\n0\r\n\r\n"),
            None => false,
        };
        if complete {
            return Ok(raw);
        }
    }
}

/// A message over the SSE fallback's POST, as the ChatBox sends it.
async fn post_message(
    s: &Stack,
    user: &User,
    conv: i64,
    content: &str,
    key: &str,
) -> anyhow::Result<()> {
    let res = s
        .http()
        .post(format!(
            "{}/api/v1/chat/conversations/{conv}/messages",
            s.edge
        ))
        .bearer_auth(&user.token)
        .json(&json!({"content": content, "client_msg_id": key}))
        .send()
        .await?;
    ensure!(res.status() == 201, "POST message: {}", res.status());
    Ok(())
}

pub async fn the_origin_exposes_every_metric_the_dashboard_and_alerts_use_and_the_edge_hides_it(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let root = e2e::stack::workspace_root();
    let wanted = e2e::ops::names_in_ops_files(&root)?;
    ensure!(!wanted.is_empty(), "no metric names in the ops files");

    // A short chat on every path the edge counts: a room WebSocket, SSE
    // plus POST, and the per-user socket.
    let (alex, sam, conv) = s.pair().await?;
    let (mut room, mut stream, mut own) = s.every_transport(&alex, &sam, conv).await?;
    let mut sams_own = s.always_on(&sam).await?;

    room.say(conv, "over the room socket", "ops-ws-1").await?;
    room.expect("ack").await?;
    stream.expect("message").await?;
    post_message(s, &sam, conv, "over sse and post", "ops-sse-1").await?;
    room.expect("message").await?;
    own.send(json!({"type": "message", "conversation_id": conv,
                    "content": "over the user socket", "client_msg_id": "ops-user-1"}))
        .await?;
    own.expect("ack").await?;
    stream.expect("message").await?;
    // A typed refusal, so that an error is counted at the edge...
    room.say(conv, "", "ops-empty").await?;
    let refused = room.expect("error").await?;
    ensure!(refused["code"] == "empty_field", "{refused}");
    // ...and one at the origin.
    let (status, _) = s
        .call(
            Some(&alex),
            reqwest::Method::GET,
            "/api/v1/chat/conversations/987654321",
            None,
        )
        .await?;
    ensure!(
        (400..500).contains(&status),
        "a stranger's conversation: {status}"
    );
    // Reads, so that read receipts and the list's queries run too.
    room.send(json!({"type": "read", "conversation_id": conv, "seq": 3}))
        .await?;
    let (status, _) = s
        .call(
            Some(&sam),
            reqwest::Method::GET,
            "/api/v1/chat/conversations",
            None,
        )
        .await?;
    ensure!(status == 200, "conversation list: {status}");
    s.wait_stored(conv, 3, Duration::from_secs(10)).await?;
    // Connections that end, so that disconnects are counted.
    room.close().await?;
    drop(stream);
    sams_own.drain(Duration::from_millis(200)).await?;
    sams_own.close().await?;

    // The metrics are for the operator's network only: the public edge
    // answers 404 to every way of spelling the path, with a token or
    // without, and never with the text.
    let scraped = s.scrape_origin().await?;
    ensure!(scraped.contains("# TYPE"), "the scrape is the metrics text");
    for path in [
        "/metrics",
        "/metrics/",
        "//metrics",
        "/METRICS",
        "/metrics?format=prometheus",
        "/api/metrics",
        "/api/v1/metrics",
        "/api/../metrics",
        "/api/v1/../../metrics",
        "/api/v1/chat/../../../metrics",
        "/api/%2e%2e/metrics",
        "/api/..%2fmetrics",
        "/api/v1/..%2f..%2fmetrics",
        "/api/%2e%2e%2fmetrics",
    ] {
        for token in [None, Some(alex.token.as_str())] {
            let (status, text) = raw_get(&s.edge, path, token).await?;
            let leaked =
                text.contains("# TYPE") || wanted.iter().any(|name| text.contains(name.as_str()));
            ensure!(
                !leaked,
                "the edge served metrics at {path} (token: {}): {text:.300}",
                token.is_some()
            );
            ensure!(
                status == 404,
                "{path} through the edge (token: {}): {status}, not 404: {text:.300}",
                token.is_some()
            );
        }
    }

    // The edge reports on its own schedule: wait for it, then name what
    // is still missing.
    let deadline = tokio::time::Instant::now() + REPORT_WITHIN;
    let missing: BTreeSet<String> = loop {
        let text = s.scrape_origin().await?;
        let exposed = e2e::ops::exposed_names(&text);
        let missing: BTreeSet<String> = wanted
            .difference(&exposed)
            .filter(|name| !e2e::ops::REPLICA_ONLY.contains(&name.as_str()))
            .cloned()
            .collect();
        if missing.is_empty() || tokio::time::Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    ensure!(
        missing.is_empty(),
        "the origin's /metrics has no samples of {missing:?} (used by ops/grafana/vibe-chat.json or ops/prometheus/alerts.yml)"
    );
    own.close().await?;
    Ok(())
}
