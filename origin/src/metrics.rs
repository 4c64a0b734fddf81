//! Prometheus metrics.
//!
//! The `metrics` facade has one global recorder per process. It is installed
//! once and shared by every `Application` in the process (tests start many).

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets, in seconds: fine below 10 ms, where the targets are.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The process-wide Prometheus handle, installing the recorder on first use.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = match builder
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            {
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
            handle
        })
        .clone()
}

/// Middleware: counts requests and records their latency per matched route.
pub async fn track_requests(req: Request, next: Next) -> Response {
    // The matched route, not the raw path: ids in paths would explode the
    // label cardinality.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let start = Instant::now();
    let response = next.run(req).await;
    let elapsed = start.elapsed().as_secs_f64();
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
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
