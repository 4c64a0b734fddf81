//! The edge's figures, as Durable Objects and Worker isolates report them
//! (`POST /internal/v1/edge-report`, or an ingest batch's `report`), added
//! up for `/metrics`.
//!
//! Counts are added once per `(reporter, life, seq)` (the rule is
//! [`shared::metrics::apply`]); gauges are kept per reporter and summed (or,
//! for the outbox's age, maxed) over the reporters heard from within their
//! TTL. Reporters are keys here, never labels: the exposition's labels are
//! the bounded `kind`, `transport` and `code` sets.
//!
//! Per origin instance: with several behind a load balancer, each holds the
//! reports it received. Counters add up across instances (each count lands
//! on exactly one); gauges of one reporter may sit on several instances for
//! up to a TTL, so dashboards take `max` of a gauge over instances, not
//! `sum` (docs/OPERATIONS.md).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use shared::metrics::{
    Counts, EdgeReport, Histogram, ReporterKind, ReporterState, TRANSPORTS, apply,
};

/// Reporters remembered at most (a bound on memory if something floods the
/// internal API): past it, the stalest are dropped.
const MAX_REPORTERS: usize = 200_000;

/// Error codes kept as distinct labels at most; the rest count as `other`
/// (codes are static strings at the edge, so this only guards a bug).
const MAX_ERROR_CODES: usize = 200;

#[derive(Debug, Default)]
struct Inner {
    reporters: HashMap<(ReporterKind, String), ReporterState>,
    messages: BTreeMap<String, u64>,
    disconnects: BTreeMap<(ReporterKind, String), u64>,
    flush_failures: u64,
    ack: Histogram,
    reports: u64,
    duplicates: u64,
}

/// Everything the edge told this origin instance.
#[derive(Debug, Default)]
pub struct EdgeFigures {
    inner: Mutex<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl EdgeFigures {
    /// Takes one report.
    pub fn apply(&self, report: &EdgeReport) {
        self.apply_at(report, now_ms());
    }

    fn apply_at(&self, report: &EdgeReport, now: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.reports += 1;
        let key = (report.kind, report.reporter.clone());
        let (applied, fresh) = apply(inner.reporters.get_mut(&key), report, now);
        if let Some(state) = fresh {
            if inner.reporters.len() >= MAX_REPORTERS {
                evict_stalest(&mut inner.reporters, now);
            }
            inner.reporters.insert(key, state);
        }
        match applied.counts {
            Some(counts) => add(&mut inner, report.kind, counts),
            None => inner.duplicates += 1,
        }
    }

    /// The Prometheus text of the edge's figures (except `chat_errors_total`,
    /// which the origin shares and the recorder renders).
    pub fn render(&self) -> String {
        self.render_at(now_ms())
    }

    fn render_at(&self, now: u64) -> String {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Reporters gone quiet past their TTL leave the gauges.
        inner
            .reporters
            .retain(|_, r| now.saturating_sub(r.received_ms) <= r.ttl_ms);
        let mut conns: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for kind in [ReporterKind::Room, ReporterKind::User] {
            for transport in ["ws", "sse"] {
                conns.insert((kind.as_str(), transport), 0);
            }
        }
        let mut reporters: BTreeMap<&str, u64> =
            [ReporterKind::Room, ReporterKind::User, ReporterKind::Worker]
                .iter()
                .map(|k| (k.as_str(), 0))
                .collect();
        let mut oldest_ms: u64 = 0;
        for ((kind, _), r) in &inner.reporters {
            *reporters.entry(kind.as_str()).or_default() += 1;
            if *kind == ReporterKind::Worker {
                continue;
            }
            *conns.entry((kind.as_str(), "ws")).or_default() += r.gauges.ws;
            *conns.entry((kind.as_str(), "sse")).or_default() += r.gauges.sse;
            if let Some(at) = r.gauges.oldest_unflushed_at_ms {
                // A time, not an age: it keeps aging between reports.
                oldest_ms = oldest_ms.max(now.saturating_sub(at));
            }
        }
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP chat_websocket_connections Open realtime connections at the edge, by object kind and transport.\n# TYPE chat_websocket_connections gauge"
        );
        for ((kind, transport), n) in &conns {
            let _ = writeln!(
                out,
                "chat_websocket_connections{{kind=\"{kind}\",transport=\"{transport}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP chat_websocket_disconnects_total Realtime connections that ended, by object kind and transport.\n# TYPE chat_websocket_disconnects_total counter"
        );
        for kind in [ReporterKind::Room, ReporterKind::User] {
            for transport in ["ws", "sse"] {
                let n = inner
                    .disconnects
                    .get(&(kind, transport.to_owned()))
                    .copied()
                    .unwrap_or(0);
                let _ = writeln!(
                    out,
                    "chat_websocket_disconnects_total{{kind=\"{}\",transport=\"{transport}\"}} {n}",
                    kind.as_str()
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP chat_messages_total Messages accepted at the edge, by transport.\n# TYPE chat_messages_total counter"
        );
        for transport in TRANSPORTS {
            let n = inner.messages.get(*transport).copied().unwrap_or(0);
            let _ = writeln!(out, "chat_messages_total{{transport=\"{transport}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP chat_message_ack_seconds From a message's frame or request at the edge to its ack.\n# TYPE chat_message_ack_seconds histogram"
        );
        for (bound, n) in inner.ack.cumulative() {
            let le = if bound.is_infinite() {
                "+Inf".to_owned()
            } else {
                bound.to_string()
            };
            let _ = writeln!(out, "chat_message_ack_seconds_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(out, "chat_message_ack_seconds_sum {}", inner.ack.sum);
        let _ = writeln!(out, "chat_message_ack_seconds_count {}", inner.ack.count);
        #[allow(clippy::cast_precision_loss)]
        let oldest = oldest_ms as f64 / 1000.0;
        let _ = writeln!(
            out,
            "# HELP chat_outbox_oldest_unflushed_seconds Age of the oldest message a room holds that PostgreSQL has not confirmed (max over rooms).\n# TYPE chat_outbox_oldest_unflushed_seconds gauge\nchat_outbox_oldest_unflushed_seconds {oldest}"
        );
        let _ = writeln!(
            out,
            "# HELP chat_outbox_flush_failures_total Outbox batches that failed to reach the origin.\n# TYPE chat_outbox_flush_failures_total counter\nchat_outbox_flush_failures_total {}",
            inner.flush_failures
        );
        let _ = writeln!(
            out,
            "# HELP chat_edge_reporters Edge objects and isolates heard from within their TTL.\n# TYPE chat_edge_reporters gauge"
        );
        for (kind, n) in &reporters {
            let _ = writeln!(out, "chat_edge_reporters{{kind=\"{kind}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP chat_edge_reports_total Edge reports received, and those whose counts were already applied (resends).\n# TYPE chat_edge_reports_total counter\nchat_edge_reports_total{{result=\"applied\"}} {}\nchat_edge_reports_total{{result=\"duplicate\"}} {}",
            inner.reports - inner.duplicates,
            inner.duplicates
        );
        out
    }
}

fn add(inner: &mut Inner, kind: ReporterKind, counts: &Counts) {
    for (transport, n) in &counts.messages {
        // Only the known transports are labels.
        if TRANSPORTS.contains(&transport.as_str()) {
            *inner.messages.entry(transport.clone()).or_default() += n;
        }
    }
    for (transport, n) in &counts.disconnects {
        if matches!(transport.as_str(), "ws" | "sse") {
            *inner
                .disconnects
                .entry((kind, transport.clone()))
                .or_default() += n;
        }
    }
    inner.flush_failures += counts.flush_failures;
    inner.ack.add(&counts.ack);
    for (code, n) in &counts.errors {
        crate::metrics::record_edge_errors(error_label(code), *n);
    }
}

/// A code as a label: the edge's codes are short snake_case words; anything
/// else (or past the bound) is `other`.
fn error_label(code: &str) -> String {
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let sane = !code.is_empty()
        && code.len() <= 40
        && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    if !sane {
        return "other".to_owned();
    }
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if seen.iter().any(|c| c == code) {
        return code.to_owned();
    }
    if seen.len() >= MAX_ERROR_CODES {
        return "other".to_owned();
    }
    seen.push(code.to_owned());
    code.to_owned()
}

fn evict_stalest(reporters: &mut HashMap<(ReporterKind, String), ReporterState>, now: u64) {
    reporters.retain(|_, r| now.saturating_sub(r.received_ms) <= r.ttl_ms);
    if reporters.len() >= MAX_REPORTERS {
        let mut ages: Vec<u64> = reporters.values().map(|r| r.received_ms).collect();
        ages.sort_unstable();
        let cut = ages[ages.len() / 10];
        reporters.retain(|_, r| r.received_ms > cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::metrics::Gauges;

    fn report(kind: ReporterKind, name: &str, seq: u64, gauges: Gauges) -> EdgeReport {
        let mut counts = Counts::default();
        counts.messages.insert("ws".into(), 2);
        counts.messages.insert("bogus".into(), 5);
        counts.flush_failures = 1;
        counts.ack.record(0.003);
        EdgeReport {
            kind,
            reporter: name.into(),
            life: 1,
            seq,
            ttl_ms: 10_000,
            sent_at_ms: 0,
            gauges,
            counts,
        }
    }

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
    }

    #[test]
    fn reports_add_up_once_and_gauges_expire() {
        let f = EdgeFigures::default();
        let g = Gauges {
            ws: 2,
            sse: 1,
            oldest_unflushed_at_ms: Some(1_000),
        };
        f.apply_at(&report(ReporterKind::Room, "room:1", 1, g), 1_000);
        // A resend of the same number: its counts are not added again.
        f.apply_at(&report(ReporterKind::Room, "room:1", 1, g), 1_500);
        f.apply_at(
            &report(
                ReporterKind::User,
                "user:9",
                1,
                Gauges {
                    ws: 3,
                    ..Gauges::default()
                },
            ),
            2_000,
        );
        let text = f.render_at(6_000);
        assert_eq!(value(&text, "chat_messages_total{transport=\"ws\"}"), 4.0);
        assert!(!text.contains("bogus"), "unknown transports are no label");
        assert_eq!(
            value(
                &text,
                "chat_websocket_connections{kind=\"room\",transport=\"ws\"}"
            ),
            2.0
        );
        assert_eq!(
            value(
                &text,
                "chat_websocket_connections{kind=\"user\",transport=\"ws\"}"
            ),
            3.0
        );
        assert_eq!(value(&text, "chat_outbox_oldest_unflushed_seconds"), 5.0);
        assert_eq!(value(&text, "chat_outbox_flush_failures_total"), 2.0);
        assert_eq!(value(&text, "chat_message_ack_seconds_count"), 2.0);
        assert_eq!(
            value(&text, "chat_message_ack_seconds_bucket{le=\"0.005\"}"),
            2.0
        );
        assert_eq!(
            value(&text, "chat_edge_reports_total{result=\"duplicate\"}"),
            1.0
        );
        // Past the TTL the gauges go; the counters stay.
        let later = f.render_at(20_000);
        assert_eq!(
            value(
                &later,
                "chat_websocket_connections{kind=\"room\",transport=\"ws\"}"
            ),
            0.0
        );
        assert_eq!(value(&later, "chat_outbox_oldest_unflushed_seconds"), 0.0);
        assert_eq!(value(&later, "chat_messages_total{transport=\"ws\"}"), 4.0);
    }

    #[test]
    fn error_codes_are_bounded_labels() {
        assert_eq!(error_label("rate_limited"), "rate_limited");
        assert_eq!(error_label("Bad Code"), "other");
        assert_eq!(error_label(&"x".repeat(41)), "other");
    }
}
