//! Prometheus metrics.
//!
//! The `metrics` facade has one global recorder per process. It is installed
//! once and shared by every `Application` in the process (tests start many).
//!
//! Every label is bounded: a route template (never a raw path), a method
//! from a fixed list, a query's static name, an error's code. User,
//! conversation and message ids never become labels.
//!
//! - `chat_db_query_seconds{query}`: each SQL statement, by a static name
//!   ([`Timed::timed`] at the call).
//! - `chat_errors_total{code,layer="origin"}`: every typed error answered
//!   ([`record_error`]), and every entry the ingest refuses, by its code.
//! - `chat_message_persist_seconds`: for each message the ingest inserts
//!   (never a replay), its commit minus its `created_at` (the edge's ack).
//! - `chat_active_conversations`, `chat_online_users` and the
//!   `chat_conversation_messages` distribution: read from PostgreSQL at
//!   scrape time through a cache ([`DbFigures`]), so scrapes stay cheap.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets, in seconds: the edge's too, so their histograms line up.
const LATENCY_BUCKETS: &[f64] = shared::metrics::LATENCY_BUCKETS;

/// Buckets of `chat_message_persist_seconds`, in seconds. It spans the
/// edge's outbox (a flush every few hundred ms, retries with backoff while
/// the origin is away), so it reaches further than a request's latency.
const PERSIST_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];

/// Upper bounds of the `chat_conversation_messages` buckets.
pub const CONVERSATION_MESSAGE_BUCKETS: &[i64] = &[
    0, 1, 10, 50, 100, 500, 1_000, 5_000, 10_000, 50_000, 100_000, 1_000_000,
];

/// The process-wide Prometheus handle, installing the recorder on first use.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = PrometheusBuilder::new()
                // An exact name wins over a suffix (the exporter tries full
                // matchers first).
                .set_buckets_for_metric(
                    Matcher::Full("chat_message_persist_seconds".into()),
                    PERSIST_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                });
            let builder = match buckets {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "latency buckets refused; using summaries");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            describe();
            handle
        })
        .clone()
}

/// The `# HELP` lines of the origin's own metrics.
fn describe() {
    metrics::describe_histogram!(
        "chat_db_query_seconds",
        metrics::Unit::Seconds,
        "Time of each SQL statement the origin runs, by its static name."
    );
    metrics::describe_counter!(
        "chat_errors_total",
        "Typed errors answered, and ingest entries refused, by code and layer."
    );
    metrics::describe_histogram!(
        "chat_message_persist_seconds",
        metrics::Unit::Seconds,
        "Per message newly stored by the ingest: its commit minus its created_at (the edge's ack)."
    );
}

/// Times a future that runs one SQL statement, as
/// `chat_db_query_seconds{query}`. `query` is a static name per statement
/// (a label, so never built from input):
///
/// ```ignore
/// let rows = client.query(&stmt, &[&id]).timed("history_page").await?;
/// ```
///
/// The time is recorded whether the statement succeeds or fails; a failure
/// shows in `chat_errors_total` as the error it becomes.
pub trait Timed: Future + Sized {
    fn timed(self, query: &'static str) -> impl Future<Output = Self::Output> {
        async move {
            let start = Instant::now();
            let out = self.await;
            metrics::histogram!("chat_db_query_seconds", "query" => query)
                .record(start.elapsed().as_secs_f64());
            out
        }
    }
}

impl<F: Future> Timed for F {}

/// Counts one typed error answered by the origin, by its stable code.
pub fn record_error(code: &str) {
    metrics::counter!("chat_errors_total", "code" => code.to_owned(), "layer" => "origin")
        .increment(1);
}

/// Records `chat_message_persist_seconds` for messages committed at
/// `committed`, each acknowledged by the edge at its `created_at`. Clocks
/// differ between edge and origin, so a negative difference counts as 0.
pub fn record_persisted(created: impl Iterator<Item = DateTime<Utc>>, committed: DateTime<Utc>) {
    let histogram = metrics::histogram!("chat_message_persist_seconds");
    for at in created {
        let secs = (committed - at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
        histogram.record(secs.max(0.0));
    }
}

/// The method as a label: the standard ones, anything else `other` (a
/// client may send any token as a method).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: counts requests and records their latency per matched route.
/// Installed with `Router::layer`, so it also sees the fallback's 404s,
/// which have no matched route: `unmatched`.
pub async fn track_requests(req: Request, next: Next) -> Response {
    // The matched route, not the raw path: ids in paths would explode the
    // label cardinality.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let start = Instant::now();
    let response = next.run(req).await;
    let elapsed = start.elapsed().as_secs_f64();
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(elapsed);
    response
}

/// Publishes the pool's state as gauges; called on each scrape.
pub fn record_pool(pool: &Pool) {
    let status = pool.status();
    metrics::gauge!("db_pool_max_size").set(status.max_size as f64);
    metrics::gauge!("db_pool_size").set(status.size as f64);
    metrics::gauge!("db_pool_available").set(status.available as f64);
    metrics::gauge!("db_pool_waiting").set(status.waiting as f64);
}

/// Publishes the password hashing bound as gauges; called on each scrape.
pub fn record_hasher(hasher: &crate::hashing::Hasher) {
    metrics::gauge!("password_hash_slots").set(hasher.permits() as f64);
    metrics::gauge!("password_hash_slots_available").set(hasher.available() as f64);
}

/// Counts messages newly written by ingest (replays are not counted).
pub fn record_ingested(new_rows: u64, replayed: u64) {
    metrics::counter!("messages_ingested_total").increment(new_rows);
    metrics::counter!("messages_ingest_replayed_total").increment(replayed);
}

/// A conversation is active with a message created within this window.
pub const ACTIVE_WINDOW_SECS: f64 = 300.0;

/// How long the activity figures are reused. Within it, any number of
/// scrapes (a storm, several Prometheus replicas) cost PostgreSQL nothing.
const ACTIVITY_TTL: Duration = Duration::from_secs(15);

/// How long the conversation-size distribution is reused: it reads every
/// conversation's `last_seq` (a scan of `conversations`, narrow rows), and
/// it moves slowly.
const SIZES_TTL: Duration = Duration::from_secs(300);

/// The most one refresh of the figures may take, statements and pool wait
/// included; past it the scrape answers with what it has.
const FIGURES_TIMEOUT: Duration = Duration::from_secs(5);

/// Conversations with a message in the window (`$1` seconds), and users
/// online as the edge last reported them (`user_presence`).
///
/// Both are bounded by activity, not by the tables' size (migration 0009):
/// the messages of the window through the BRIN index on
/// `messages.created_at` (rows are appended roughly in `created_at` order,
/// so only the newest block ranges qualify), the online users through the
/// partial index `user_presence_online_idx`.
pub const ACTIVITY_SQL: &str = "SELECT
         (SELECT count(DISTINCT conversation_id) FROM messages
          WHERE created_at > now() - make_interval(secs => $1::float8)),
         (SELECT count(*) FROM user_presence WHERE is_online)";

/// The conversations per size bucket, in one pass over `conversations`:
/// `$1` holds each bucket's upper bound plus one, so `width_bucket` answers
/// the index of the first bound a conversation's `last_seq` does not exceed
/// (`le` semantics); the last index is `+Inf` only. `last_seq` counts every
/// entry the room sequenced (messages, and edits, deletes and reactions).
pub const SIZES_SQL: &str = "SELECT width_bucket(last_seq, $1::int8[]), count(*),
            COALESCE(sum(last_seq), 0)::int8
     FROM conversations GROUP BY 1";

/// The figures `/metrics` reads from PostgreSQL, cached per application.
/// One refresh runs at a time (a scrape that arrives meanwhile waits for
/// it and then reuses it), and a failed refresh is not retried before its
/// period is over, so an outage is not hammered either.
#[derive(Debug, Default)]
pub struct DbFigures {
    state: tokio::sync::Mutex<FiguresState>,
}

#[derive(Debug, Default)]
struct FiguresState {
    activity: Option<Activity>,
    activity_at: Option<Instant>,
    sizes: Option<Sizes>,
    sizes_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Activity {
    active_conversations: i64,
    online_users: i64,
}

/// Conversations per bucket (non-cumulative; the last is `+Inf` only).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sizes {
    per_bucket: Vec<u64>,
    sum: i64,
}

impl DbFigures {
    /// The figures as Prometheus text, refreshed first when stale.
    pub async fn render(&self, pool: &Pool) -> String {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let due = |at: Option<Instant>, ttl| at.is_none_or(|t| now.duration_since(t) >= ttl);
        let activity_due = due(state.activity_at, ACTIVITY_TTL);
        let sizes_due = due(state.sizes_at, SIZES_TTL);
        if activity_due || sizes_due {
            if activity_due {
                state.activity_at = Some(now);
            }
            if sizes_due {
                state.sizes_at = Some(now);
            }
            let read =
                tokio::time::timeout(FIGURES_TIMEOUT, read_figures(pool, activity_due, sizes_due))
                    .await;
            match read {
                Ok(Ok((activity, sizes))) => {
                    state.activity = activity.or(state.activity);
                    state.sizes = sizes.or(state.sizes.take());
                }
                Ok(Err(e)) => {
                    // A gauge of a database that cannot be read is left out
                    // rather than shown stale.
                    state.activity = None;
                    tracing::warn!(error = %crate::error::Chain(&e), "metrics figures not read");
                }
                Err(_) => {
                    state.activity = None;
                    tracing::warn!("metrics figures not read in time");
                }
            }
        }
        render_figures(state.activity, state.sizes.as_ref())
    }
}

async fn read_figures(
    pool: &Pool,
    activity: bool,
    sizes: bool,
) -> crate::error::ApiResult<(Option<Activity>, Option<Sizes>)> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    // Whatever the plans, a scrape never holds a connection long.
    tx.batch_execute("SET LOCAL statement_timeout = '4s'")
        .await?;
    let activity = if activity {
        let row = tx
            .query_one(ACTIVITY_SQL, &[&ACTIVE_WINDOW_SECS])
            .timed("metrics_activity")
            .await?;
        Some(Activity {
            active_conversations: row.get(0),
            online_users: row.get(1),
        })
    } else {
        None
    };
    let sizes = if sizes {
        let thresholds: Vec<i64> = CONVERSATION_MESSAGE_BUCKETS.iter().map(|b| b + 1).collect();
        let rows = tx
            .query(SIZES_SQL, &[&thresholds])
            .timed("metrics_conversation_sizes")
            .await?;
        let mut per_bucket = vec![0u64; CONVERSATION_MESSAGE_BUCKETS.len() + 1];
        let mut sum = 0i64;
        for r in rows {
            let bucket = usize::try_from(r.get::<_, i32>(0)).unwrap_or(0);
            let count = u64::try_from(r.get::<_, i64>(1)).unwrap_or(0);
            if let Some(slot) = per_bucket.get_mut(bucket) {
                *slot += count;
            }
            sum = sum.saturating_add(r.get::<_, i64>(2));
        }
        Some(Sizes { per_bucket, sum })
    } else {
        None
    };
    tx.commit().await?;
    Ok((activity, sizes))
}

/// The figures in the Prometheus text format (written here rather than
/// through the recorder: they are a snapshot per application, not a
/// process-wide series, and the distribution is a histogram of *now*,
/// whose buckets may go down).
fn render_figures(activity: Option<Activity>, sizes: Option<&Sizes>) -> String {
    let mut out = String::new();
    if let Some(a) = activity {
        let _ = writeln!(
            out,
            "# HELP chat_active_conversations Conversations with a message in the last {ACTIVE_WINDOW_SECS} seconds.\n\
             # TYPE chat_active_conversations gauge\n\
             chat_active_conversations {}",
            a.active_conversations
        );
        let _ = writeln!(
            out,
            "# HELP chat_online_users Users online, as the edge reports presence.\n\
             # TYPE chat_online_users gauge\n\
             chat_online_users {}",
            a.online_users
        );
    }
    if let Some(s) = sizes {
        let _ = writeln!(
            out,
            "# HELP chat_conversation_messages Entries per conversation (its last seq), over every conversation now.\n\
             # TYPE chat_conversation_messages histogram"
        );
        let mut total = 0u64;
        for (i, count) in s.per_bucket.iter().enumerate() {
            total += count;
            let le = CONVERSATION_MESSAGE_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), i64::to_string);
            let _ = writeln!(
                out,
                "chat_conversation_messages_bucket{{le=\"{le}\"}} {total}"
            );
        }
        let _ = writeln!(out, "chat_conversation_messages_sum {}", s.sum);
        let _ = writeln!(out, "chat_conversation_messages_count {total}");
    }
    out
}

/// Errors the edge reported (`chat_errors_total{layer="edge"}`), in the
/// same family as the origin's own.
pub fn record_edge_errors(code: String, n: u64) {
    metrics::counter!("chat_errors_total", "code" => code, "layer" => "edge").increment(n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_the_standard_set_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        let odd = Method::from_bytes(b"BREW").expect("a method token");
        assert_eq!(method_label(&odd), "other");
    }

    #[test]
    fn the_conversation_sizes_render_as_a_cumulative_histogram() {
        let mut per_bucket = vec![0; CONVERSATION_MESSAGE_BUCKETS.len() + 1];
        per_bucket[0] = 2; // two empty conversations
        per_bucket[2] = 3; // three of 2..=10
        per_bucket[CONVERSATION_MESSAGE_BUCKETS.len()] = 1; // one beyond the last bound
        let text = render_figures(
            Some(Activity {
                active_conversations: 4,
                online_users: 7,
            }),
            Some(&Sizes {
                per_bucket,
                sum: 2_000_020,
            }),
        );
        for line in [
            "chat_active_conversations 4",
            "chat_online_users 7",
            "# TYPE chat_conversation_messages histogram",
            "chat_conversation_messages_bucket{le=\"0\"} 2",
            "chat_conversation_messages_bucket{le=\"1\"} 2",
            "chat_conversation_messages_bucket{le=\"10\"} 5",
            "chat_conversation_messages_bucket{le=\"1000000\"} 5",
            "chat_conversation_messages_bucket{le=\"+Inf\"} 6",
            "chat_conversation_messages_sum 2000020",
            "chat_conversation_messages_count 6",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert_eq!(render_figures(None, None), "");
    }
}
