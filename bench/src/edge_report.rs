//! `cargo xtask bench edge-report`: what the edge's figures cost the origin.
//!
//! 1. **Reports**: `POST /internal/v1/edge-report` as Rooms send them (a
//!    typical report: messages on one transport, a few ack samples, open
//!    connections), from `BENCH_CLIENTS` concurrent clients over
//!    `BENCH_REPORTERS` distinct rooms, each room's numbers in order, for
//!    `BENCH_SECONDS`. Counted at the origin: after each run the scrape
//!    must show every room as a reporter and exactly the messages the
//!    reports carried (each number applied once). Latency is from the send
//!    to the answer at the client.
//! 2. **Scrapes**: `GET /metrics` with those reporters live, sequentially,
//!    the whole text read.
//!
//! The origin runs in this process on a fresh database; the clients share
//! the machine's two cores with it.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use shared::metrics::{Counts, EdgeReport, Gauges, Histogram, ReporterKind};
use shared::protocol::internal::SERVICE_SECRET_HEADER;

use e2e::ops::sample;

use crate::origin_bench::{SERVICE_SECRET, fresh_database, start_origin};
use crate::report::{build, loadavg, micros_histogram, range, table};

const DB: &str = "vibe_bench_edge_report";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A room's report: `messages` new on `ws`, as many ack samples, and
/// `ws` open sockets.
fn room_report(room: u64, life: u64, seq: u64, messages: u64, ws: u64) -> EdgeReport {
    let mut counts = Counts::default();
    counts.messages.insert("ws".to_owned(), messages);
    let mut ack = Histogram::default();
    for i in 0..messages {
        #[allow(clippy::cast_precision_loss)]
        ack.record(0.000_2 * (i % 7) as f64);
    }
    counts.ack = ack;
    EdgeReport {
        kind: ReporterKind::Room,
        reporter: format!("room:{room}"),
        life,
        seq,
        ttl_ms: 150_000,
        sent_at_ms: 0,
        gauges: Gauges {
            ws,
            sse: 0,
            oldest_unflushed_at_ms: None,
        },
        counts,
    }
}

struct Run {
    reports_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    scrape_p50_ms: f64,
    scrape_p99_ms: f64,
    scrape_bytes: usize,
}

pub async fn run() -> anyhow::Result<()> {
    build("edge-report", "the origin is");
    let reporters = env_or("BENCH_REPORTERS", 10_000);
    let clients = env_or("BENCH_CLIENTS", 8).max(1);
    let seconds = env_or("BENCH_SECONDS", 10);
    let runs = env_or("BENCH_RUNS", 3).max(1);
    println!(
        "reporters {reporters}, clients {clients}, {seconds} s per run, {runs} runs, load {}",
        loadavg()
    );
    let (_admin, url) = fresh_database(DB).await?;
    let mut results = Vec::new();
    for run in 0..runs {
        // A fresh origin per run: its sums start at zero, so the check
        // below compares one run's reports with one run's counters.
        let (base, _pool) = start_origin(&url, |_| None).await?;
        results.push(one_run(&base, reporters, clients, seconds, run).await?);
    }
    let rows = vec![vec![
        reporters.to_string(),
        clients.to_string(),
        range(
            &results
                .iter()
                .map(|r| r.reports_per_sec)
                .collect::<Vec<_>>(),
            0,
        ),
        range(&results.iter().map(|r| r.p50_ms).collect::<Vec<_>>(), 2),
        range(&results.iter().map(|r| r.p99_ms).collect::<Vec<_>>(), 2),
        range(&results.iter().map(|r| r.max_ms).collect::<Vec<_>>(), 2),
        range(
            &results.iter().map(|r| r.scrape_p50_ms).collect::<Vec<_>>(),
            2,
        ),
        range(
            &results.iter().map(|r| r.scrape_p99_ms).collect::<Vec<_>>(),
            2,
        ),
        range(
            &results
                .iter()
                .map(|r| r.scrape_bytes as f64)
                .collect::<Vec<_>>(),
            0,
        ),
    ]];
    table(
        &format!("Edge reports at the origin ({runs} runs, ranges over runs)"),
        &[
            "rooms reporting",
            "clients",
            "reports/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "scrape p50 ms",
            "scrape p99 ms",
            "scrape bytes",
        ],
        &rows,
    );
    println!(
        "\nEvery run: each room a reporter, and the messages counter equal to what the reports carried (each report applied once)."
    );
    Ok(())
}

async fn one_run(
    base: &str,
    reporters: u64,
    clients: u64,
    seconds: u64,
    run: u64,
) -> anyhow::Result<Run> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::try_from(clients).unwrap_or(8))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let http = http.clone();
        let url = format!("{base}/internal/v1/edge-report");
        tasks.push(tokio::spawn(async move {
            let mut hist = micros_histogram()?;
            let mut sent_messages = 0u64;
            let mut seqs: Vec<u64> = Vec::new();
            // This client's rooms: c, c + clients, … (disjoint).
            let mine: Vec<u64> = (c..reporters).step_by(usize::try_from(clients)?).collect();
            seqs.resize(mine.len(), 0);
            let mut i = 0usize;
            // Every room reports at least once, then until the deadline.
            while i < mine.len() || Instant::now() < deadline {
                let slot = i % mine.len().max(1);
                let room = mine[slot];
                seqs[slot] += 1;
                let messages = 1 + (room + seqs[slot]) % 5;
                let report = room_report(room, 1_000 + run, seqs[slot], messages, 1 + room % 3);
                let start = Instant::now();
                let res = http
                    .post(&url)
                    .header(SERVICE_SECRET_HEADER, SERVICE_SECRET)
                    .json(&report)
                    .send()
                    .await?;
                ensure!(res.status() == 204, "report refused: {}", res.status());
                hist.record(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX))?;
                sent_messages += messages;
                i += 1;
            }
            Ok::<_, anyhow::Error>((hist, sent_messages))
        }));
    }
    let started = Instant::now();
    let mut hist = micros_histogram()?;
    let mut sent = 0u64;
    for t in tasks {
        let (h, n) = t.await.context("a client")??;
        hist.add(&h)?;
        sent += n;
    }
    let elapsed = started.elapsed().as_secs_f64();

    // Counted at the origin: every room live, every message once.
    let metrics_url = format!("{base}/metrics");
    let text = http.get(&metrics_url).send().await?.text().await?;
    let live = sample(&text, "chat_edge_reporters{kind=\"room\"}");
    let counted = sample(&text, "chat_messages_total{transport=\"ws\"}");
    #[allow(clippy::cast_precision_loss)]
    {
        ensure!(
            (live - reporters as f64).abs() < 0.5,
            "{live} rooms live at the origin, {reporters} reported"
        );
        ensure!(
            (counted - sent as f64).abs() < 0.5,
            "the origin counted {counted} messages, the reports carried {sent}"
        );
    }

    let mut scrapes = micros_histogram()?;
    let mut bytes = 0;
    for _ in 0..50 {
        let start = Instant::now();
        let text = http.get(&metrics_url).send().await?.text().await?;
        scrapes.record(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX))?;
        bytes = text.len();
    }
    #[allow(clippy::cast_precision_loss)]
    let run = Run {
        reports_per_sec: hist.len() as f64 / elapsed,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: hist.max() as f64 / 1000.0,
        scrape_p50_ms: scrapes.value_at_quantile(0.5) as f64 / 1000.0,
        scrape_p99_ms: scrapes.value_at_quantile(0.99) as f64 / 1000.0,
        scrape_bytes: bytes,
    };
    Ok(run)
}
