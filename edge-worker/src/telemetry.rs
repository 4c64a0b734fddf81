//! What the edge says about itself: structured log lines, request ids, and
//! the figures each Durable Object (and each Worker isolate) reports to the
//! origin's `/metrics` (the rules are in [`shared::metrics`]).
//!
//! Log lines are one JSON object each (`level`, `msg`, then fields), so the
//! runtime's log stream (`wrangler tail`, Logpush) can be queried. They name
//! users, conversations and request ids, never a token, a ticket or a
//! message's words.

use std::cell::{Cell, RefCell};

use serde_json::{Map, Value};
use shared::metrics::{Cadence, Collector, EdgeReport, Gauges, ReporterKind};

use crate::config::EdgeConfig;
use crate::origin::OriginClient;

/// The header that names a request from the edge to the origin.
pub const REQUEST_ID_HEADER: &str = shared::redact::REQUEST_ID_HEADER;

/// How a message arrived (`chat_messages_total{transport}`).
pub const TRANSPORT_WS: &str = "ws";
pub const TRANSPORT_SSE_POST: &str = "sse_post";
pub const TRANSPORT_USER_SOCKET: &str = "user_socket";

/// The request (or socket frame) a Durable Object is handling.
#[derive(Debug, Clone)]
pub struct Current {
    /// The Worker's id for a request; for a socket frame, made only when
    /// the frame makes a message or a change ([`Figures::frame_id`]).
    pub request_id: Option<String>,
    pub transport: &'static str,
    /// When it arrived (ms since the epoch), for the ack latency.
    pub started_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "debug" | "trace" => Some(Self::Debug),
            "info" => Some(Self::Info),
            "warn" | "warning" => Some(Self::Warn),
            "error" => Some(Self::Error),
            _ => None,
        }
    }
}

thread_local! {
    /// `LOG_LEVEL`; an isolate runs one thread, and every request reads
    /// its config, so this follows the deployment's setting.
    static MIN_LEVEL: Cell<Level> = const { Cell::new(Level::Info) };
}

pub fn set_level(level: Level) {
    MIN_LEVEL.with(|l| l.set(level));
}

pub fn enabled(level: Level) -> bool {
    MIN_LEVEL.with(|l| level >= l.get())
}

/// Writes one line. Use [`crate::log!`].
pub fn emit(level: Level, msg: &str, fields: Vec<(&'static str, Value)>) {
    let mut line = Map::new();
    line.insert("level".into(), level.as_str().into());
    line.insert("msg".into(), msg.into());
    for (k, v) in fields {
        line.insert(k.into(), v);
    }
    let text = Value::Object(line).to_string();
    match level {
        Level::Error => worker::console_error!("{text}"),
        Level::Warn => worker::console_warn!("{text}"),
        Level::Debug | Level::Info => worker::console_log!("{text}"),
    }
}

/// `log!(Info, "message", "field" => value, …)`: a JSON log line, built
/// only when its level is on.
#[macro_export]
macro_rules! log {
    ($level:ident, $msg:expr $(, $k:literal => $v:expr)* $(,)?) => {
        if $crate::telemetry::enabled($crate::telemetry::Level::$level) {
            $crate::telemetry::emit(
                $crate::telemetry::Level::$level,
                &$msg,
                vec![$(($k, ::serde_json::json!($v))),*],
            );
        }
    };
}

/// A fresh request id: 16 hex digits from the CSPRNG.
pub fn new_request_id() -> String {
    format!("{:016x}", crate::conns::random_u64())
}

/// A caller's `x-request-id` when it is a sane token (it goes into log
/// lines and headers), else a fresh one.
pub fn request_id_from(header: Option<String>) -> String {
    header
        .filter(|v| shared::redact::is_sane_request_id(v))
        .unwrap_or_else(new_request_id)
}

/// One object's figures and its reports to the origin.
#[derive(Debug)]
pub struct Figures {
    collector: RefCell<Collector>,
    /// The conversation, for a Room's log lines.
    conversation: Cell<Option<i64>>,
    /// Socket frames given an id by this instance.
    frames: Cell<u64>,
    /// A report is on its way (at most one standalone at a time).
    sending: Cell<bool>,
}

impl Default for Figures {
    /// Unnamed (no reports) until [`Figures::identify`].
    fn default() -> Self {
        Self::new(ReporterKind::Room, Cadence::default())
    }
}

impl Figures {
    pub fn new(kind: ReporterKind, cadence: Cadence) -> Self {
        Self {
            collector: RefCell::new(Collector::new(
                kind,
                String::new(),
                crate::conns::random_u64(),
                cadence,
            )),
            conversation: Cell::new(None),
            frames: Cell::new(0),
            sending: Cell::new(false),
        }
    }

    /// Names the reporter (`room:<id>`, `user:<id>`) once the object knows
    /// who it is, and adopts the configured cadence.
    pub fn identify(&self, kind: ReporterKind, id: impl std::fmt::Display, cadence: Cadence) {
        let name = format!("{}:{id}", kind.as_str());
        let mut c = self.collector.borrow_mut();
        if c.reporter() != name || c.cadence() != cadence {
            if kind == ReporterKind::Room {
                self.conversation.set(id.to_string().parse().ok());
            }
            c.rename(kind, name, cadence);
        }
    }

    /// An id for a socket frame: this instance's random life and a count,
    /// unique without asking the CSPRNG once per frame.
    pub fn frame_id(&self) -> String {
        let n = self.frames.get() + 1;
        self.frames.set(n);
        format!("{:x}-{n:x}", self.life())
    }

    /// Whether [`Figures::identify`] has named it (no reports before).
    pub fn is_named(&self) -> bool {
        !self.collector.borrow().reporter().is_empty()
    }

    /// The reporter's name, for log lines.
    pub fn name(&self) -> String {
        self.collector.borrow().reporter().to_owned()
    }

    pub fn conversation(&self) -> Option<i64> {
        self.conversation.get()
    }

    pub fn message(&self, transport: &'static str) {
        self.collector.borrow_mut().message(transport);
    }

    pub fn error(&self, code: &str) {
        self.collector.borrow_mut().error(code);
    }

    pub fn disconnect(&self, transport: &'static str) {
        self.collector.borrow_mut().disconnect(transport);
    }

    pub fn flush_failure(&self) {
        self.collector.borrow_mut().flush_failure();
    }

    /// A new message acked now, its frame or request having arrived at
    /// `arrived_ms`.
    pub fn ack_since(&self, arrived_ms: u64) {
        #[allow(clippy::cast_precision_loss)]
        let seconds = crate::auth::now_ms().saturating_sub(arrived_ms) as f64 / 1000.0;
        self.collector.borrow_mut().ack(seconds);
    }

    /// When a report is due (for the object's alarm).
    pub fn due(&self, gauges: &Gauges) -> Option<u64> {
        if !self.is_named() {
            return None;
        }
        let c = self.collector.borrow();
        // "At once" is now: an alarm in the past is refused.
        c.due(gauges).map(|at| at.max(crate::auth::now_ms()))
    }

    /// A report to piggyback on a request about to leave, when one is due.
    pub fn report_if_due(&self, now: u64, gauges: Gauges) -> Option<EdgeReport> {
        let due = self.due(&gauges)?;
        (due <= now).then(|| self.collector.borrow_mut().report(now, gauges))
    }

    /// A report to piggyback on an outbox batch: when one is due, and also
    /// whenever the last one failed, so the first batch to get through
    /// after an outage tells how old the outbox grew (the flush it rides
    /// on empties it, and the next report says so a cadence later).
    pub fn report_for_flush(&self, now: u64, gauges: Gauges) -> Option<EdgeReport> {
        let stale = self.is_named() && self.collector.borrow().stale();
        if stale {
            Some(self.collector.borrow_mut().report(now, gauges))
        } else {
            self.report_if_due(now, gauges)
        }
    }

    /// The request that carried `report` answered (`ok`: the origin has it).
    pub fn answered(&self, report: &EdgeReport, ok: bool) {
        let mut c = self.collector.borrow_mut();
        if ok {
            c.acknowledged(report.seq);
        } else {
            c.unsent();
        }
    }

    /// Sends a report on its own when one is due and none is on its way.
    pub async fn send_if_due(&self, config: &EdgeConfig, now: u64, gauges: Gauges) {
        if self.sending.get() {
            return;
        }
        let Some(report) = self.report_if_due(now, gauges) else {
            return;
        };
        self.sending.set(true);
        let result = OriginClient::new(config).edge_report(&report).await;
        self.sending.set(false);
        if let Err(e) = &result {
            crate::log!(Warn, "edge report not delivered", "reporter" => report.reporter, "error" => e.to_string());
        }
        self.answered(&report, result.is_ok());
    }
}

/// The Worker isolate's own figures: refusals the Worker answers before
/// any Durable Object is involved (a bad token, an unknown route). An
/// isolate serves many requests; its counts ride out on a later request's
/// `wait_until` once due.
pub mod isolate {
    use super::{Cadence, EdgeConfig, Figures, Gauges, ReporterKind};

    thread_local! {
        static FIGURES: Figures = Figures::new(ReporterKind::Worker, Cadence::default());
    }

    pub fn error(code: &str) {
        FIGURES.with(|f| f.error(code));
    }

    /// A new message's ack, for a request that arrived at `arrived_ms`.
    pub fn ack_since(arrived_ms: u64) {
        FIGURES.with(|f| f.ack_since(arrived_ms));
    }

    /// The report to send now, if one is due (the caller sends it in
    /// `wait_until`, then calls [`answered`]).
    pub fn report_if_due(config: &EdgeConfig, now: u64) -> Option<shared::metrics::EdgeReport> {
        FIGURES.with(|f| {
            // Named on the isolate's first request, not on every one.
            if !f.is_named() {
                f.identify(ReporterKind::Worker, f.life(), config.metrics);
            }
            f.report_if_due(now, Gauges::default())
        })
    }

    pub fn answered(report: &shared::metrics::EdgeReport, ok: bool) {
        FIGURES.with(|f| f.answered(report, ok));
    }
}

impl Figures {
    fn life(&self) -> u64 {
        self.collector.borrow().life()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_request_id_is_kept_and_anything_else_replaced() {
        assert_eq!(request_id_from(Some("abc-123_x.y".into())), "abc-123_x.y");
        for bad in ["", "has space", "quote\"", &"x".repeat(65)] {
            let id = request_id_from(Some(bad.to_owned()));
            assert_ne!(id, bad);
            assert_eq!(id.len(), 16);
        }
    }

    #[test]
    fn levels_parse_and_order() {
        assert_eq!(Level::parse("DEBUG"), Some(Level::Debug));
        assert_eq!(Level::parse("nope"), None);
        assert!(Level::Error > Level::Info);
    }
}
