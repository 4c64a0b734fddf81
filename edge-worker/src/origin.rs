//! Calls to the origin: the internal API (behind the service secret) and
//! the public-API proxy. Every call has a deadline, so a hung origin costs
//! a bounded wait and shows up as 503, never as a stuck room.

use std::time::Duration;

use futures_util::future::{Either, select};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shared::media::AttachmentMeta;
use shared::protocol::internal::{
    CLIENT_IP_HEADER, CommitAttachment, ConversationMembers, IngestBatch, IngestResult,
    PresenceBatch, ReserveAttachment, Reserved, SERVICE_SECRET_HEADER, StoredMessage, UserContacts,
};
use worker::wasm_bindgen::JsValue;
use worker::{AbortController, Delay, Fetch, Headers, Method, Request, RequestInit, Response};

use crate::config::EdgeConfig;
use crate::error::{EdgeError, EdgeResult};

/// Deadline for internal calls.
const INTERNAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for proxied public calls.
const PROXY_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest public request body the edge forwards.
pub const MAX_PROXY_BODY: usize = shared::domain::MAX_FRAME_BYTES;
/// Request headers passed through to the origin.
const FORWARDED_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "accept",
    "accept-language",
    "if-none-match",
    "user-agent",
];

/// Sends `req`, aborting it after `timeout`.
async fn send(req: Request, timeout: Duration) -> EdgeResult<Response> {
    let controller = AbortController::default();
    let signal = controller.signal();
    let fetch = Fetch::Request(req);
    let call = Box::pin(fetch.send_with_signal(&signal));
    let deadline = Box::pin(Delay::from(timeout));
    match select(call, deadline).await {
        Either::Left((Ok(res), _)) => Ok(res),
        Either::Left((Err(e), _)) => Err(EdgeError::OriginUnavailable(e.to_string())),
        Either::Right(((), _)) => {
            controller.abort();
            Err(EdgeError::OriginUnavailable(format!(
                "no answer within {timeout:?}"
            )))
        }
    }
}

/// The origin's internal API.
#[derive(Debug)]
pub struct OriginClient<'a> {
    config: &'a EdgeConfig,
}

impl<'a> OriginClient<'a> {
    pub fn new(config: &'a EdgeConfig) -> Self {
        Self { config }
    }

    async fn call(&self, method: Method, path: &str, body: Option<String>) -> EdgeResult<Response> {
        let headers = Headers::new();
        headers.set(SERVICE_SECRET_HEADER, &self.config.service_secret)?;
        headers.set("content-type", "application/json")?;
        let request_id = self
            .config
            .request_id
            .clone()
            .unwrap_or_else(crate::telemetry::new_request_id);
        headers.set(crate::telemetry::REQUEST_ID_HEADER, &request_id)?;
        let mut init = RequestInit::new();
        init.with_method(method).with_headers(headers);
        if let Some(body) = body {
            init.with_body(Some(JsValue::from_str(&body)));
        }
        let url = format!("{}{path}", self.config.origin_url);
        send(Request::new_with_init(&url, &init)?, INTERNAL_TIMEOUT).await
    }

    async fn json<T: DeserializeOwned>(mut res: Response, what: &str) -> EdgeResult<T> {
        match res.status_code() {
            200..=299 => res
                .json()
                .await
                .map_err(|e| EdgeError::OriginUnavailable(format!("{what}: bad body: {e}"))),
            404 => Err(EdgeError::NotFound("conversation")),
            status => Err(EdgeError::OriginUnavailable(format!(
                "{what}: status {status}"
            ))),
        }
    }

    async fn post<B: Serialize>(&self, path: &str, body: &B) -> EdgeResult<Response> {
        let body = serde_json::to_string(body).map_err(|e| EdgeError::Internal(e.to_string()))?;
        self.call(Method::Post, path, Some(body)).await
    }

    /// The members of a conversation and its last stored seq.
    pub async fn members(&self, conversation_id: i64) -> EdgeResult<ConversationMembers> {
        let res = self
            .call(
                Method::Get,
                &format!("/internal/v1/conversations/{conversation_id}/members"),
                None,
            )
            .await?;
        Self::json(res, "members").await
    }

    /// One stored message, by seq (the original of a very old resend).
    pub async fn message(&self, conversation_id: i64, seq: i64) -> EdgeResult<StoredMessage> {
        let res = self
            .call(
                Method::Get,
                &format!("/internal/v1/conversations/{conversation_id}/messages/{seq}"),
                None,
            )
            .await?;
        Self::json(res, "message").await
    }

    /// Idempotent batch ingest.
    pub async fn ingest(&self, batch: &IngestBatch) -> EdgeResult<IngestResult> {
        let res = self.post("/internal/v1/messages/batch", batch).await?;
        Self::json(res, "ingest").await
    }

    /// A user's contacts with their presence, and the user's own.
    pub async fn contacts(&self, user_id: i64) -> EdgeResult<UserContacts> {
        let res = self
            .call(
                Method::Get,
                &format!("/internal/v1/users/{user_id}/contacts"),
                None,
            )
            .await?;
        Self::json(res, "contacts").await
    }

    /// The object's figures (see `shared::metrics`).
    pub async fn edge_report(&self, report: &shared::metrics::EdgeReport) -> EdgeResult<()> {
        let res = self.post("/internal/v1/edge-report", report).await?;
        Self::no_content(&res, "edge report")
    }

    /// Presence changes (last write wins by `last_seen` at the origin).
    pub async fn presence(&self, batch: &PresenceBatch) -> EdgeResult<()> {
        let res = self.post("/internal/v1/presence", batch).await?;
        Self::no_content(&res, "presence")
    }

    /// Reserves an upload (membership, size limit, quota).
    pub async fn reserve(&self, r: &ReserveAttachment) -> EdgeResult<Reserved> {
        let res = self.post("/internal/v1/attachments", r).await?;
        Self::typed(res, "reserve").await
    }

    /// The upload is in the bucket: the origin's metadata for it.
    pub async fn commit_attachment(
        &self,
        id: uuid::Uuid,
        c: &CommitAttachment,
    ) -> EdgeResult<AttachmentMeta> {
        let res = self
            .post(&format!("/internal/v1/attachments/{id}/commit"), c)
            .await?;
        Self::typed(res, "commit").await
    }

    /// Drops the reservation of an upload that failed.
    pub async fn abort_attachment(&self, id: uuid::Uuid) -> EdgeResult<()> {
        let res = self
            .call(
                Method::Delete,
                &format!("/internal/v1/attachments/{id}"),
                None,
            )
            .await?;
        Self::no_content(&res, "abort")
    }

    /// A JSON answer, or the origin's own typed refusal passed on (a 4xx
    /// with `{code, message}` about the caller's request).
    async fn typed<T: DeserializeOwned>(mut res: Response, what: &str) -> EdgeResult<T> {
        #[derive(serde::Deserialize)]
        struct Refusal {
            code: String,
            message: String,
        }
        let status = res.status_code();
        if !(400..500).contains(&status) {
            return Self::json(res, what).await;
        }
        let refusal: Refusal = res
            .json()
            .await
            .map_err(|e| EdgeError::OriginUnavailable(format!("{what}: bad refusal: {e}")))?;
        Err(EdgeError::Relayed {
            status,
            code: relayed_code(&refusal.code),
            message: refusal.message,
        })
    }

    fn no_content(res: &Response, what: &str) -> EdgeResult<()> {
        match res.status_code() {
            200..=299 => Ok(()),
            status => Err(EdgeError::OriginUnavailable(format!(
                "{what}: status {status}"
            ))),
        }
    }
}

/// The codes an upload's reservation may be refused with, as the edge's
/// static strings; anything else is passed on as `rejected`.
fn relayed_code(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "forbidden",
        "not_member",
        "not_found",
        "too_large",
        "quota_exceeded",
        "invalid_request",
        "validation_failed",
        "bad_request",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or("rejected")
}

/// Forwards a public request to the origin: same method, path, query,
/// body, and the caller's `Authorization`.
pub async fn proxy(mut req: Request, config: &EdgeConfig) -> EdgeResult<Response> {
    let body = if matches!(req.method(), Method::Get | Method::Head) {
        Vec::new()
    } else {
        req.bytes().await?
    };
    proxy_with_body(&req, &body, config).await
}

/// [`proxy`] for a request whose body the caller has already read (to
/// look at it too).
pub async fn proxy_with_body(
    req: &Request,
    body: &[u8],
    config: &EdgeConfig,
) -> EdgeResult<Response> {
    let url = req.url()?;
    let target = match url.query() {
        Some(q) => format!("{}{}?{q}", config.origin_url, url.path()),
        None => format!("{}{}", config.origin_url, url.path()),
    };
    let headers = Headers::new();
    if let Some(id) = &config.request_id {
        headers.set(crate::telemetry::REQUEST_ID_HEADER, id)?;
    }
    for name in FORWARDED_HEADERS {
        if let Some(value) = req.headers().get(name)? {
            headers.set(name, &value)?;
        }
    }
    if let Some(ip) = req.headers().get("cf-connecting-ip")? {
        headers.set("x-forwarded-for", &ip)?;
        // The origin trusts the caller's address (its login guard counts
        // per email and address) only next to the service secret.
        headers.set(CLIENT_IP_HEADER, &ip)?;
        headers.set(SERVICE_SECRET_HEADER, &config.service_secret)?;
    }
    let method = req.method();
    let mut init = RequestInit::new();
    init.with_method(method.clone()).with_headers(headers);
    if !matches!(method, Method::Get | Method::Head) {
        if body.len() > MAX_PROXY_BODY {
            return Err(EdgeError::Client {
                status: 413,
                code: "too_large",
                message: format!("request body is larger than {MAX_PROXY_BODY} bytes"),
            });
        }
        if !body.is_empty() {
            let array = worker::js_sys::Uint8Array::from(body);
            init.with_body(Some(array.into()));
        }
    }
    send(Request::new_with_init(&target, &init)?, PROXY_TIMEOUT).await
}
