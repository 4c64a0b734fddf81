//! Best-effort notices from the origin to the edge.
//!
//! When a conversation's members change through the origin, the room at the
//! edge must learn it at once (a removed member's sockets close, an added
//! one may connect). With `EDGE_URL` set, the origin POSTs
//! `{EDGE_URL}/api/v1/internal/rooms/{id}/members-changed` with the service
//! secret after the change commits. The call is spawned, bounded by
//! [`NOTIFY_TIMEOUT`], and only logged when it fails: the user's request
//! never waits for or fails with it. A lost notice is caught up by
//! `members_version`, which every ingest answer carries.

use std::time::Duration;

use shared::protocol::internal::SERVICE_SECRET_HEADER;

/// Longest a notice may take.
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends notices to the edge, or nothing when no `EDGE_URL` is configured.
#[derive(Clone)]
pub struct EdgeNotifier {
    base: Option<String>,
    secret: String,
    client: reqwest::Client,
}

// The secret must never reach a log line.
impl std::fmt::Debug for EdgeNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeNotifier")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl EdgeNotifier {
    /// `base` without a trailing slash (`http://127.0.0.1:8787`).
    pub fn new(base: Option<String>, service_secret: &[u8]) -> Self {
        let client = reqwest::Client::builder()
            .timeout(NOTIFY_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            base: base.map(|b| b.trim_end_matches('/').to_owned()),
            secret: String::from_utf8_lossy(service_secret).into_owned(),
            client,
        }
    }

    /// Tells the edge that conversation `id`'s members changed. Returns at
    /// once; the call runs on its own task.
    pub fn members_changed(&self, conversation_id: i64) {
        let Some(base) = &self.base else {
            return;
        };
        let url = format!("{base}/api/v1/internal/rooms/{conversation_id}/members-changed");
        let request = self
            .client
            .post(url)
            .header(SERVICE_SECRET_HEADER, &self.secret)
            .header(reqwest::header::CONTENT_LENGTH, "0");
        tokio::spawn(async move {
            match request.send().await {
                Ok(res) if res.status().is_success() => {
                    tracing::debug!(conversation_id, "edge told members changed");
                }
                Ok(res) => {
                    metrics::counter!("edge_notify_failures_total").increment(1);
                    tracing::warn!(
                        conversation_id,
                        status = res.status().as_u16(),
                        "edge refused the members-changed notice"
                    );
                }
                Err(e) => {
                    metrics::counter!("edge_notify_failures_total").increment(1);
                    // reqwest's error names the URL, which holds no secret.
                    tracing::warn!(
                        conversation_id,
                        error = %crate::error::Chain(&e),
                        "members-changed notice failed"
                    );
                }
            }
        });
    }
}
