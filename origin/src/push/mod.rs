//! Web Push notifications (RFC 8030, 8291, 8292) for members who are not
//! looking.
//!
//! - [`endpoint`]: which subscription endpoints the origin sends to (the
//!   SSRF guard).
//! - [`webpush`]: one encrypted, VAPID-signed push request and what the
//!   push service's answer means.
//! - [`payload`]: what the service worker receives.
//! - [`worker`]: the delivery queue in PostgreSQL and the task that sends
//!   it. The ingest fills the queue in the transaction that stores the
//!   messages ([`crate::ingest`]); nothing on the message path waits for a
//!   push service.
//!
//! With no `VAPID_PRIVATE_KEY`, push is off: nothing is queued or sent and
//! the push routes answer `503 push_disabled` (the preferences still
//! work).

pub mod endpoint;
pub mod payload;
pub mod webpush;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::config::PushConfig;
use crate::error::{ApiError, ApiResult};
use endpoint::EndpointRule;
use webpush::Vapid;

/// Most subscriptions one user keeps: registering another drops their
/// oldest, so one account cannot make every message fan out to thousands
/// of requests.
pub const MAX_SUBSCRIPTIONS_PER_USER: i64 = 20;

/// A pending notification is sent at most this many coalescing delays after
/// its first message, even while messages keep coming (a conversation that
/// never pauses for `PUSH_COALESCE_MS` must still notify).
pub const MAX_COALESCE_FACTOR: u32 = 10;

/// What the ingest needs to queue notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueue {
    /// A job is due this long after its latest message.
    pub coalesce: Duration,
    /// ...and at most this long after its first.
    pub max_wait: Duration,
}

impl Enqueue {
    /// The limits for a coalescing delay.
    pub fn new(coalesce: Duration) -> Self {
        Self {
            coalesce,
            max_wait: coalesce * MAX_COALESCE_FACTOR,
        }
    }
}

/// Push as configured: shared by the routes, the ingest and the worker.
#[derive(Debug)]
pub struct Push {
    /// `None` when push is off.
    vapid: Option<Vapid>,
    pub rule: EndpointRule,
    pub config: PushConfig,
    pub client: reqwest::Client,
    /// Wakes the worker early (a batch was ingested, a receipt arrived).
    wake: Notify,
}

impl Push {
    /// From the configuration; fails only on a key that cannot sign.
    pub fn new(config: &PushConfig) -> anyhow::Result<Arc<Self>> {
        let vapid = config
            .vapid_private_key
            .as_ref()
            .map(|key| Vapid::new(key, &config.vapid_subject))
            .transpose()?;
        Ok(Arc::new(Self {
            vapid,
            rule: EndpointRule {
                allowed_hosts: config.allowed_hosts.clone(),
                allow_loopback: config.allow_loopback,
            },
            config: config.clone(),
            client: webpush::client(),
            wake: Notify::new(),
        }))
    }

    /// Whether push is on (a VAPID key is configured).
    pub fn enabled(&self) -> bool {
        self.vapid.is_some()
    }

    /// The VAPID identity, or `503 push_disabled`.
    pub fn vapid(&self) -> ApiResult<&Vapid> {
        self.vapid.as_ref().ok_or(ApiError::PushDisabled)
    }

    /// What the ingest queues with, or `None` when push is off.
    pub fn enqueue(&self) -> Option<Enqueue> {
        self.enabled().then(|| Enqueue::new(self.config.coalesce))
    }

    /// Tells the worker to look at the queue now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}
