//! The edge's figures on their way to the origin's `/metrics`.
//!
//! Durable Objects cannot be scraped, so each Room and User object counts
//! what happens in it (a [`Collector`]) and reports to the origin over the
//! internal API: piggybacked on the outbox flush when one goes anyway,
//! otherwise on its own on a bounded cadence. The origin adds the counts to
//! its counters and keeps each reporter's gauges until it goes quiet.
//!
//! Exactly-once counting over an unreliable call: counts are frozen into a
//! numbered report that is resent unchanged until the origin answers, and
//! the origin applies each `(reporter, life, seq)` once. New counts wait in
//! `pending` for the next number meanwhile. Gauges are not frozen: every
//! send carries the values of the moment, so a report resent after an
//! outage says how old the outbox is now, not when the first try left.
//!
//! Reporters are named by their object (`room:<conversation id>`,
//! `user:<user id>`): a key at the origin, never a label. A hibernated or
//! evicted object comes back as a new `life` of the same reporter, whose
//! gauges replace the old life's instead of adding to them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Upper bounds (seconds) of the latency buckets, the same at the edge and
/// the origin: fine below 10 ms, where the targets are.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The transports a message can arrive by (`chat_messages_total`).
pub const TRANSPORTS: &[&str] = &["ws", "sse_post", "user_socket"];

/// Which kind of object reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReporterKind {
    Room,
    User,
    /// A Worker isolate: counts only (refusals before any object).
    Worker,
}

impl ReporterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Room => "room",
            Self::User => "user",
            Self::Worker => "worker",
        }
    }
}

/// A latency histogram as bucket counts ([`LATENCY_BUCKETS`], plus one for
/// `+Inf`), so it can be added up across reporters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Non-cumulative: `buckets[i]` counts samples in `(bound[i-1], bound[i]]`.
    #[serde(default)]
    pub buckets: Vec<u64>,
    #[serde(default)]
    pub sum: f64,
    #[serde(default)]
    pub count: u64,
}

impl Histogram {
    pub fn record(&mut self, seconds: f64) {
        let seconds = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        };
        if self.buckets.len() != LATENCY_BUCKETS.len() + 1 {
            self.buckets.resize(LATENCY_BUCKETS.len() + 1, 0);
        }
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    /// Adds `other` in. A malformed one (wrong bucket count) adds only to
    /// `sum` and `count`, never shifting counts into the wrong bucket.
    pub fn add(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        if self.buckets.len() != LATENCY_BUCKETS.len() + 1 {
            self.buckets.resize(LATENCY_BUCKETS.len() + 1, 0);
        }
        if other.buckets.len() == self.buckets.len() {
            for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
                *a += b;
            }
        } else {
            // Counted as +Inf: visible, and wrong only in where it sits.
            if let Some(last) = self.buckets.last_mut() {
                *last += other.count;
            }
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Cumulative counts per bound, as Prometheus' `le` buckets.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        let mut out = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
        for (i, bound) in LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .enumerate()
        {
            total += self.buckets.get(i).copied().unwrap_or(0);
            out.push((bound, total));
        }
        out
    }
}

/// What happened since the last report (deltas).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// New messages accepted, by transport ([`TRANSPORTS`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub messages: BTreeMap<String, u64>,
    /// Typed errors returned to clients, by code.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, u64>,
    /// Connections that ended, by transport (`ws`, `sse`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub disconnects: BTreeMap<String, u64>,
    /// Outbox batches that failed to reach the origin.
    #[serde(default)]
    pub flush_failures: u64,
    /// Frame received to ack sent.
    #[serde(default)]
    pub ack: Histogram,
}

impl Counts {
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.errors.is_empty()
            && self.disconnects.is_empty()
            && self.flush_failures == 0
            && self.ack.is_empty()
    }
}

/// The reporter's state now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gauges {
    /// Open WebSockets.
    #[serde(default)]
    pub ws: u64,
    /// Open Server-Sent Event streams.
    #[serde(default)]
    pub sse: u64,
    /// When the oldest message the origin has not confirmed was acked (ms
    /// since the epoch); absent when the outbox is empty. A time, not an
    /// age, so the origin can age it between reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unflushed_at_ms: Option<u64>,
}

impl Gauges {
    fn is_zero(&self) -> bool {
        *self == Gauges::default()
    }
}

/// One report (`POST /internal/v1/edge-report`, or `IngestBatch.report`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeReport {
    pub kind: ReporterKind,
    /// The object (`room:<id>`, `user:<id>`): the origin's key, never a label.
    pub reporter: String,
    /// Random per life of the object: seqs restart with it.
    pub life: u64,
    /// Numbers the frozen counts; the origin applies each once.
    pub seq: u64,
    /// How long the origin keeps the gauges without news.
    pub ttl_ms: u64,
    /// When this send was built (ms since the epoch).
    pub sent_at_ms: u64,
    pub gauges: Gauges,
    pub counts: Counts,
}

/// How often a reporter reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    /// Counts wait at most this long (shorter than the runtime's idle time
    /// before hibernation, ~10 s, so they leave before memory is dropped).
    pub counts_ms: u64,
    /// Unchanged non-zero gauges are refreshed this often; the origin keeps
    /// them for [`Cadence::ttl_ms`].
    pub refresh_ms: u64,
}

impl Default for Cadence {
    fn default() -> Self {
        Self {
            counts_ms: 5_000,
            refresh_ms: 60_000,
        }
    }
}

impl Cadence {
    /// Two and a half refreshes: one lost report does not drop a reporter.
    pub fn ttl_ms(&self) -> u64 {
        self.refresh_ms.saturating_mul(5) / 2
    }
}

/// The figures of one object, and what it has told the origin.
#[derive(Debug)]
pub struct Collector {
    kind: ReporterKind,
    reporter: String,
    life: u64,
    cadence: Cadence,
    pending: Counts,
    /// Counts sent under a number the origin has not confirmed.
    frozen: Option<(u64, Counts)>,
    next_seq: u64,
    /// When a report last left, and the gauges it carried (`None` after a
    /// failed send: the origin may not have them).
    last_sent_ms: Option<u64>,
    last_gauges: Option<Gauges>,
}

impl Collector {
    pub fn new(kind: ReporterKind, reporter: String, life: u64, cadence: Cadence) -> Self {
        Self {
            kind,
            reporter,
            life,
            cadence,
            pending: Counts::default(),
            frozen: None,
            next_seq: 1,
            last_sent_ms: None,
            last_gauges: None,
        }
    }

    pub fn reporter(&self) -> &str {
        &self.reporter
    }

    pub fn life(&self) -> u64 {
        self.life
    }

    pub fn cadence(&self) -> Cadence {
        self.cadence
    }

    /// Names the reporter once the object knows who it is (counts made
    /// before are kept).
    pub fn rename(&mut self, kind: ReporterKind, reporter: String, cadence: Cadence) {
        self.kind = kind;
        self.reporter = reporter;
        self.cadence = cadence;
    }

    pub fn message(&mut self, transport: &'static str) {
        bump(&mut self.pending.messages, transport);
    }

    pub fn error(&mut self, code: &str) {
        bump(&mut self.pending.errors, code);
    }

    pub fn disconnect(&mut self, transport: &'static str) {
        bump(&mut self.pending.disconnects, transport);
    }

    pub fn flush_failure(&mut self) {
        self.pending.flush_failures += 1;
    }

    pub fn ack(&mut self, seconds: f64) {
        self.pending.ack.record(seconds);
    }

    /// When a report is due given the gauges now (`None`: nothing to say).
    /// Counts wait at most `counts_ms`; changed gauges go as soon as the
    /// last report is `counts_ms` old; unchanged non-zero gauges every
    /// `refresh_ms`.
    pub fn due(&self, gauges: &Gauges) -> Option<u64> {
        let Some(last) = self.last_sent_ms else {
            // Never reported: anything at all is news.
            let news = !self.pending.is_empty() || self.frozen.is_some() || !gauges.is_zero();
            return news.then_some(0);
        };
        let mut due: Option<u64> = None;
        let counts = !self.pending.is_empty() || self.frozen.is_some();
        if counts || Some(*gauges) != self.last_gauges {
            due = Some(last + self.cadence.counts_ms);
        }
        if !gauges.is_zero() {
            let refresh = last + self.cadence.refresh_ms;
            due = Some(due.map_or(refresh, |d| d.min(refresh)));
        }
        due
    }

    /// A report to send now. Counts already frozen go again under their
    /// number; otherwise the pending ones are frozen under a new one.
    pub fn report(&mut self, now_ms: u64, gauges: Gauges) -> EdgeReport {
        let (seq, counts) = match &self.frozen {
            Some((seq, counts)) => (*seq, counts.clone()),
            None => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let counts = std::mem::take(&mut self.pending);
                self.frozen = Some((seq, counts.clone()));
                (seq, counts)
            }
        };
        self.last_sent_ms = Some(now_ms);
        self.last_gauges = Some(gauges);
        EdgeReport {
            kind: self.kind,
            reporter: self.reporter.clone(),
            life: self.life,
            seq,
            ttl_ms: self.cadence.ttl_ms(),
            sent_at_ms: now_ms,
            gauges,
            counts,
        }
    }

    /// The origin applied report `seq`: its counts are done.
    pub fn acknowledged(&mut self, seq: u64) {
        if self.frozen.as_ref().is_some_and(|(s, _)| *s == seq) {
            self.frozen = None;
        }
    }

    /// The last send failed: the origin may hold stale gauges (an outbox
    /// it thinks is empty), so the next request that leaves should carry
    /// the news whatever the cadence says.
    pub fn stale(&self) -> bool {
        self.last_sent_ms.is_some() && self.last_gauges.is_none()
    }

    /// A send failed: gauges count as unsent, so the next report is not
    /// held back as "unchanged".
    pub fn unsent(&mut self) {
        self.last_gauges = None;
    }
}

/// Adds one under `key`, allocating the key only the first time (this runs
/// once per message).
fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    }
}

/// What the origin remembers of one reporter.
#[derive(Debug, Clone, PartialEq)]
pub struct ReporterState {
    pub life: u64,
    pub last_seq: u64,
    pub gauges: Gauges,
    /// The origin's clock when the gauges arrived, and how long they hold.
    pub received_ms: u64,
    pub ttl_ms: u64,
}

/// What a report changes at the origin: the counts to add (`None` when this
/// `(life, seq)` was applied before), and whether its gauges replace the
/// reporter's.
#[derive(Debug, PartialEq)]
pub struct Applied<'a> {
    pub counts: Option<&'a Counts>,
    pub gauges: bool,
}

/// The origin's rule for one report against what it knows of the reporter.
pub fn apply<'a>(
    known: Option<&mut ReporterState>,
    report: &'a EdgeReport,
    now_ms: u64,
) -> (Applied<'a>, Option<ReporterState>) {
    let fresh = ReporterState {
        life: report.life,
        last_seq: report.seq,
        gauges: report.gauges,
        received_ms: now_ms,
        ttl_ms: report.ttl_ms,
    };
    match known {
        // A new reporter, or a new life of one (its seqs restart): take it.
        None => (
            Applied {
                counts: Some(&report.counts),
                gauges: true,
            },
            Some(fresh),
        ),
        Some(state) if state.life != report.life => {
            *state = fresh;
            (
                Applied {
                    counts: Some(&report.counts),
                    gauges: true,
                },
                None,
            )
        }
        Some(state) => {
            let counts = (report.seq > state.last_seq).then_some(&report.counts);
            // A resend of the current number still brings news of the
            // gauges; an older number arriving late does not.
            let gauges = report.seq >= state.last_seq;
            if gauges {
                state.last_seq = report.seq;
                state.gauges = report.gauges;
                state.received_ms = now_ms;
                state.ttl_ms = report.ttl_ms;
            }
            (Applied { counts, gauges }, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collector() -> Collector {
        Collector::new(
            ReporterKind::Room,
            "room:1".into(),
            7,
            Cadence {
                counts_ms: 1_000,
                refresh_ms: 10_000,
            },
        )
    }

    #[test]
    fn a_histogram_buckets_and_accumulates() {
        let mut h = Histogram::default();
        h.record(0.0004);
        h.record(0.003);
        h.record(99.0);
        h.record(f64::NAN);
        let c = h.cumulative();
        assert_eq!(c[0], (0.0005, 2), "0.0004 and the NaN (as 0)");
        assert_eq!(c[3], (0.005, 3));
        assert_eq!(c.last().map(|x| x.1), Some(4));
        assert_eq!(h.count, 4);
        let mut total = Histogram::default();
        total.add(&h);
        total.add(&h);
        assert_eq!(total.count, 8);
        assert_eq!(total.cumulative().last().map(|x| x.1), Some(8));
        // A malformed one lands in +Inf, not in a wrong bucket.
        total.add(&Histogram {
            buckets: vec![5],
            sum: 1.0,
            count: 5,
        });
        assert_eq!(total.cumulative()[0].1, 4);
        assert_eq!(total.cumulative().last().map(|x| x.1), Some(13));
    }

    #[test]
    fn an_idle_reporter_with_nothing_to_say_is_never_due() {
        let c = collector();
        assert_eq!(c.due(&Gauges::default()), None);
    }

    #[test]
    fn counts_are_frozen_and_resent_unchanged_until_acknowledged() {
        let mut c = collector();
        c.message("ws");
        c.ack(0.001);
        assert_eq!(c.due(&Gauges::default()), Some(0));
        let first = c.report(100, Gauges::default());
        assert_eq!(first.seq, 1);
        assert_eq!(first.counts.messages.get("ws"), Some(&1));
        // More happens while the first is unanswered: it waits.
        c.message("ws");
        c.flush_failure();
        let again = c.report(
            200,
            Gauges {
                ws: 2,
                ..Gauges::default()
            },
        );
        assert_eq!(again.seq, 1, "the same number");
        assert_eq!(again.counts, first.counts, "the same counts");
        assert_eq!(again.gauges.ws, 2, "but the gauges of now");
        c.acknowledged(1);
        let next = c.report(300, Gauges::default());
        assert_eq!(next.seq, 2);
        assert_eq!(next.counts.messages.get("ws"), Some(&1));
        assert_eq!(next.counts.flush_failures, 1);
        // A late acknowledgement of an old number changes nothing.
        c.acknowledged(1);
        assert_eq!(c.report(400, Gauges::default()).seq, 2);
    }

    #[test]
    fn gauges_are_refreshed_while_not_zero_and_sent_when_they_change() {
        let mut c = collector();
        let g = Gauges {
            ws: 1,
            ..Gauges::default()
        };
        assert_eq!(c.due(&g), Some(0));
        let r = c.report(1_000, g);
        c.acknowledged(r.seq);
        assert_eq!(c.due(&g), Some(11_000), "unchanged: a refresh");
        let g2 = Gauges {
            ws: 2,
            ..Gauges::default()
        };
        assert_eq!(c.due(&g2), Some(2_000), "changed: soon");
        let r = c.report(2_000, Gauges::default());
        c.acknowledged(r.seq);
        assert_eq!(c.due(&Gauges::default()), None, "zero and said: quiet");
        // A failed send makes the gauges news again.
        c.message("ws");
        let r = c.report(3_000, g);
        c.unsent();
        assert_eq!(r.seq, 3);
        assert_eq!(c.due(&g), Some(4_000));
    }

    fn report(life: u64, seq: u64, ws: u64) -> EdgeReport {
        let mut counts = Counts::default();
        counts.messages.insert("ws".into(), 1);
        EdgeReport {
            kind: ReporterKind::Room,
            reporter: "room:1".into(),
            life,
            seq,
            ttl_ms: 1_000,
            sent_at_ms: 0,
            gauges: Gauges {
                ws,
                ..Gauges::default()
            },
            counts,
        }
    }

    #[test]
    fn the_origin_applies_each_number_once_and_a_new_life_replaces_the_old() {
        let r1 = report(1, 1, 3);
        let (a, new) = apply(None, &r1, 10);
        assert!(a.counts.is_some() && a.gauges);
        let mut state = new.expect("a new reporter");
        // The same number again (an answer was lost): gauges only.
        let again = report(1, 1, 4);
        let (a, _) = apply(Some(&mut state), &again, 20);
        assert_eq!(a.counts, None);
        assert!(a.gauges);
        assert_eq!(state.gauges.ws, 4);
        // The next number: counts too.
        let r2 = report(1, 2, 5);
        let (a, _) = apply(Some(&mut state), &r2, 30);
        assert!(a.counts.is_some());
        // An older number arriving late: nothing.
        let late = report(1, 1, 9);
        let (a, _) = apply(Some(&mut state), &late, 40);
        assert_eq!(
            a,
            Applied {
                counts: None,
                gauges: false
            }
        );
        assert_eq!(state.gauges.ws, 5);
        // The object woke as a new life: its seq 1 counts, its gauges replace.
        let woke = report(2, 1, 1);
        let (a, _) = apply(Some(&mut state), &woke, 50);
        assert!(a.counts.is_some() && a.gauges);
        assert_eq!((state.life, state.last_seq, state.gauges.ws), (2, 1, 1));
    }

    #[test]
    fn a_report_round_trips_through_json() {
        let mut c = collector();
        c.message("sse_post");
        c.error("rate_limited");
        c.disconnect("ws");
        c.ack(0.02);
        let r = c.report(
            5,
            Gauges {
                ws: 1,
                sse: 2,
                oldest_unflushed_at_ms: Some(3),
            },
        );
        let json = serde_json::to_string(&r).expect("serialise");
        let back: EdgeReport = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, r);
    }
}
