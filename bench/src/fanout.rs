//! `cargo xtask bench fanout`: one room under `wrangler dev`, real
//! WebSocket and SSE clients, everything counted where it happened.
//!
//! 1. **Fan-out**: 50 WebSocket and 10 Server-Sent Events members in one
//!    room, 20 msg/s sent by the WebSocket members in turn.
//! 2. **Throughput and the knee**: 10 WebSocket members, rising rates.
//! 3. **The outbox**: for every scenario above, each acknowledged message
//!    checked in PostgreSQL, the time from its ack to its row, and the
//!    origin requests the room made per second.
//! 4. **The single socket**: one room of 50 members at 20 msg/s, 40 on the
//!    room's WebSocket and 10 on the seed's single socket only (their User
//!    object, which the room forwards to): each delivery's latency by the
//!    kind of socket that carried it.
//!
//! `BENCH_SCENARIOS` (comma-separated of `fanout`, `throughput`, `single`;
//! all by default) picks which run.
//!
//! What "counted" means here:
//! - **Open loop**: message k is due at start + k / rate, and its latency
//!   runs from then, not from when the sender got round to it, so a stalled
//!   sender shows its own queueing.
//! - **Deliveries** are counted at each receiver (the sender's own copy
//!   included); *lost* is acked × members minus what arrived, *duplicated*
//!   is every copy after a member's first.
//! - **Refused** sends (`{"type":"error","code":…}` to the sender) are
//!   counted by code, and a refused message is neither lost nor delivered.
//! - **Acked msgs/s** is the acks the senders received during the sending
//!   window per second of it: what the room took, not the sender's pace.
//! - **PostgreSQL**: after the room goes quiet, every acked message must
//!   have exactly one row with the seq and id its ack named; during the
//!   run, a poller every 50 ms times ack → row.
//! - **Repeats**: every scenario runs `BENCH_RUNS` times (default 3, runs
//!   interleaved) and each column prints its range over the runs, never the
//!   best run; each run prints the load average and the busiest processes
//!   just before it.
//!
//! Each rate runs `BENCH_SECONDS` (default 60): long enough that the
//! outbox's buffers cannot hide a rate the room does not sustain.
//! `BENCH_RATES` (comma-separated) overrides the throughput rates.
//!
//! Members connect to the workerd runtime itself, as clients reach the
//! Worker in production: `wrangler dev` puts a Node.js proxy in front of
//! it that relays every frame (on this 2-core machine it competes with
//! the room for CPU). `BENCH_VIA_PROXY=1` goes through the proxy instead.
//!
//! The stack is the e2e harness's: a fresh database, the origin in this
//! process (a release build under `cargo xtask bench`) and a real
//! `wrangler dev` on free ports. Rate limits are raised for the bench (the
//! product's per-user bucket would rightly stop one user sending 200/s).

mod persisted;
mod scenario;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use e2e::{Stack, StackOptions};

use crate::report::{busy, loadavg, loadavg_1m, ms, range, table, target};
pub use scenario::{RunResult, Scenario, scenario};

/// The throughput rates, msgs/s: around the knee the targets ask for
/// (≥ 3,000) and up to the outbox's goal (≥ 5,000).
const DEFAULT_RATES: &[f64] = &[500.0, 1_000.0, 1_500.0, 2_000.0, 3_000.0, 4_000.0, 5_000.0];
const FANOUT_WS: usize = 50;
const FANOUT_SSE: usize = 10;
const FANOUT_RATE: f64 = 20.0;
const THROUGHPUT_MEMBERS: usize = 10;
/// The single-socket comparison: room-socket members (who send) and
/// single-socket members, 50 in all.
const SINGLE_ROOM_WS: usize = 40;
const SINGLE_SOCKETS: usize = 10;
/// Time per scenario beyond its sending window, measured in smoke runs
/// (users and sockets, the machine sample, the drain and the checks); for
/// the duration estimate only.
const OVERHEAD_SECS: f64 = 6.0;
const NEIGHBOURS_NOTE: &str = "Load avg before: /proc/loadavg's 1-minute figure just before the run (it still holds the previous scenario's load). Others' CPU: CPU time used during the sending window by everything but the bench process, its wrangler and workerd, and the PostgreSQL backends of its database, in % of one core: what else was running (PostgreSQL's shared background writers count here too).";

#[derive(Debug)]
struct Config {
    seconds: u64,
    runs: usize,
    rates: Vec<f64>,
    /// Which scenario groups run.
    fanout: bool,
    throughput: bool,
    single: bool,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

impl Config {
    fn from_env() -> anyhow::Result<Self> {
        let seconds: u64 = env_or("BENCH_SECONDS", 60)?;
        let runs: usize = env_or("BENCH_RUNS", 3)?;
        anyhow::ensure!(
            seconds > 0 && runs > 0,
            "BENCH_SECONDS and BENCH_RUNS must be positive"
        );
        let rates = match std::env::var("BENCH_RATES") {
            Ok(v) => v
                .split(',')
                .map(|r| r.trim().parse::<f64>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| anyhow::anyhow!("BENCH_RATES={v:?}: comma-separated msgs/s"))?,
            Err(_) => DEFAULT_RATES.to_vec(),
        };
        anyhow::ensure!(
            rates.iter().all(|r| *r > 0.0),
            "BENCH_RATES must be positive"
        );
        let picked = std::env::var("BENCH_SCENARIOS")
            .unwrap_or_else(|_| "fanout,throughput,single".to_owned());
        let picked: Vec<&str> = picked.split(',').map(str::trim).collect();
        for p in &picked {
            anyhow::ensure!(
                ["fanout", "throughput", "single"].contains(p),
                "BENCH_SCENARIOS: {p:?} is not fanout, throughput or single"
            );
        }
        Ok(Self {
            seconds,
            runs,
            rates: if picked.contains(&"throughput") {
                rates
            } else {
                Vec::new()
            },
            fanout: picked.contains(&"fanout"),
            throughput: picked.contains(&"throughput"),
            single: picked.contains(&"single"),
        })
    }

    fn duration(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }

    /// Whether this run has the length and repeats the targets ask for.
    fn reportable(&self) -> bool {
        self.seconds >= 60 && self.runs >= 3
    }
}

pub async fn run() -> anyhow::Result<()> {
    let cfg = Config::from_env()?;
    let began = Instant::now();
    // The origin runs in this process: its build is this binary's.
    crate::report::build("fanout", "the origin and the clients");
    println!(
        "edge: edge-worker/build as built by `cargo xtask build-edge` (worker-build --release) under wrangler dev"
    );
    let per_run = usize::from(cfg.fanout) + usize::from(cfg.single) + cfg.rates.len();
    let scenarios = cfg.runs * per_run;
    let estimate =
        cfg.runs as f64 * (cfg.seconds as f64 * per_run as f64) + scenarios as f64 * OVERHEAD_SECS;
    println!(
        "BENCH_SECONDS={} BENCH_RUNS={} rates {:?} msgs/s: {scenarios} scenarios, about {:.0} min (longer where the room falls behind and drains)",
        cfg.seconds,
        cfg.runs,
        cfg.rates,
        estimate / 60.0
    );
    if !cfg.reportable() {
        println!(
            "NOTE: fewer than 3 runs of 60 s: a smoke run, not figures for docs/BENCHMARKS.md"
        );
    }
    let stack = Stack::start(StackOptions {
        vars: vec![
            ("ROOM_RATE_BURST".to_owned(), "1000000".to_owned()),
            ("ROOM_RATE_PER_SEC".to_owned(), "1000000".to_owned()),
        ],
        verbose: std::env::var_os("BENCH_VERBOSE").is_some(),
        ..StackOptions::default()
    })
    .await?;
    {
        let db = stack.pool.get().await?;
        let version: String = db.query_one("SHOW server_version", &[]).await?.get(0);
        let sync: String = db.query_one("SHOW synchronous_commit", &[]).await?.get(0);
        println!(
            "stack up: edge {}, PostgreSQL {version} (synchronous_commit = {sync})",
            stack.edge
        );
    }

    let edge = edge_url(&stack).await?;
    let mut fan: Vec<RunResult> = Vec::with_capacity(cfg.runs);
    let mut single: Vec<RunResult> = Vec::with_capacity(cfg.runs);
    let mut tp: Vec<Vec<RunResult>> = cfg.rates.iter().map(|_| Vec::new()).collect();
    for run in 1..=cfg.runs {
        if cfg.fanout {
            let s = Scenario {
                ws: FANOUT_WS,
                sse: FANOUT_SSE,
                single: 0,
                rate: FANOUT_RATE,
                duration: cfg.duration(),
                tag: format!("r{run}fan"),
                edge: edge.clone(),
            };
            fan.push(one(&stack, &s, run, &cfg, "fan-out").await?);
        }
        if cfg.single {
            let s = Scenario {
                ws: SINGLE_ROOM_WS,
                sse: 0,
                single: SINGLE_SOCKETS,
                rate: FANOUT_RATE,
                duration: cfg.duration(),
                tag: format!("r{run}single"),
                edge: edge.clone(),
            };
            single.push(one(&stack, &s, run, &cfg, "single socket").await?);
        }
        for (i, &rate) in cfg.rates.iter().enumerate() {
            let s = Scenario {
                ws: THROUGHPUT_MEMBERS,
                sse: 0,
                single: 0,
                rate,
                duration: cfg.duration(),
                tag: format!("r{run}tp{rate:.0}"),
                edge: edge.clone(),
            };
            tp[i].push(one(&stack, &s, run, &cfg, "throughput").await?);
        }
    }

    // The stack's database, dropped with it below: the bench leaves nothing
    // behind, whoever else uses the server.
    let database: String = stack
        .pool
        .get()
        .await?
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    drop(stack);
    if let Err(e) = drop_database(&database).await {
        println!("could not drop the bench's database {database}: {e:#}");
    }

    if cfg.fanout {
        print_fanout(&cfg, &fan);
    }
    if cfg.single {
        print_single(&cfg, &single);
    }
    if cfg.throughput {
        print_throughput(&cfg, &tp);
    }
    if cfg.fanout && cfg.throughput {
        print_outbox(&cfg, &fan, &tp);
    }
    println!(
        "\n{} scenario runs in {:.1} min",
        scenarios,
        began.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

/// The URL members connect to, announced.
pub(crate) async fn edge_url(stack: &Stack) -> anyhow::Result<String> {
    if std::env::var_os("BENCH_VIA_PROXY").is_some_and(|v| v != "0") {
        println!(
            "members connect through wrangler dev's proxy: {}",
            stack.edge
        );
        return Ok(stack.edge.clone());
    }
    let runtime = stack.runtime_url().await?;
    println!(
        "members connect to the workerd runtime directly: {runtime} (past wrangler dev's proxy at {}; BENCH_VIA_PROXY=1 to go through it)",
        stack.edge
    );
    Ok(runtime)
}

pub(crate) async fn drop_database(name: &str) -> anyhow::Result<()> {
    let admin = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await?;
    Ok(())
}

/// One scenario run, announced with what else the machine was doing.
async fn one(
    stack: &Stack,
    s: &Scenario,
    run: usize,
    cfg: &Config,
    what: &str,
) -> anyhow::Result<RunResult> {
    let load = loadavg();
    let load_1m = loadavg_1m();
    let neighbours = busy(Duration::from_secs(1)).await;
    println!(
        "\nrun {run}/{} · {what}: {} WS + {} SSE + {} single-socket members, {} msgs/s for {} s · load average {load} · {neighbours}",
        cfg.runs,
        s.ws,
        s.sse,
        s.single,
        s.rate,
        s.duration.as_secs()
    );
    let r = scenario(stack, s, load_1m)
        .await
        .with_context(|| format!("run {run}, {what} at {} msgs/s", s.rate))?;
    println!(
        "  scheduled {} · acked {} ({:.0}/s) · refused {} · unanswered {} · deliveries {}/{} · lost {} · duplicated {} · p50 {} p99 {} max {} ms",
        r.scheduled,
        r.acked,
        r.acked_per_sec,
        refused_cell(&[&r]),
        r.unanswered,
        r.delivered,
        r.expected,
        r.lost,
        r.duplicated,
        ms(r.latency.value_at_quantile(0.5)),
        ms(r.latency.value_at_quantile(0.99)),
        ms(r.latency.max()),
    );
    println!(
        "  PostgreSQL: {} of {} acked persisted, {} missing, {} duplicated, {} seq/id mismatch · ack→row p50 {} p99 {} ms ({} timed) · origin {:.1} ingest + {:.1} receipt req/s",
        r.pg.persisted,
        r.acked,
        r.pg.missing,
        r.pg.duplicated,
        r.pg.mismatched,
        ms(r.ack_to_row.value_at_quantile(0.5)),
        ms(r.ack_to_row.value_at_quantile(0.99)),
        r.ack_to_row.len(),
        r.ingest_per_sec,
        r.receipts_per_sec,
    );
    println!(
        "  other processes during the run: {:.0} % of one core{}",
        r.neighbours.cpu,
        if r.neighbours.top.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.neighbours.top)
        }
    );
    let odd = anomalies(&r);
    if !odd.is_empty() {
        println!("  ATTENTION: {}", odd.join("; "));
    }
    Ok(r)
}

/// Things that should never happen, spelled out.
fn anomalies(r: &RunResult) -> Vec<String> {
    let mut out = Vec::new();
    if r.unsent > 0 {
        out.push(format!(
            "{} messages not sent (their member's socket was gone)",
            r.unsent
        ));
    }
    if r.cut_off > 0 {
        out.push(format!(
            "{} members cut off by the room before the end",
            r.cut_off
        ));
    }
    if r.delivered_unacked > 0 {
        out.push(format!(
            "{} deliveries of messages never acked",
            r.delivered_unacked
        ));
    }
    if r.pg.unacked_rows > 0 {
        out.push(format!(
            "{} rows in PostgreSQL for messages never acked",
            r.pg.unacked_rows
        ));
    }
    if r.gave_up_waiting {
        out.push(format!(
            "the room went quiet with work outstanding (waited {} s for acks and deliveries, {} s for PostgreSQL)",
            scenario::DRAIN_QUIET.as_secs(),
            scenario::PERSIST_QUIET.as_secs()
        ));
    }
    out
}

/// Per column: its values over the runs.
fn col(results: &[&RunResult], f: impl Fn(&RunResult) -> f64, decimals: usize) -> String {
    let v: Vec<f64> = results.iter().map(|r| f(r)).collect();
    range(&v, decimals)
}

fn quantile_ms(h: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

fn refused_total(r: &RunResult) -> usize {
    r.refused.values().sum()
}

/// Refusals by code, each as a range over the runs ("0" when none).
fn refused_cell(results: &[&RunResult]) -> String {
    let codes: BTreeSet<&String> = results.iter().flat_map(|r| r.refused.keys()).collect();
    if codes.is_empty() {
        return "0".to_owned();
    }
    codes
        .iter()
        .map(|code| {
            let v: Vec<f64> = results
                .iter()
                .map(|r| r.refused.get(*code).copied().unwrap_or(0) as f64)
                .collect();
            format!("{code}: {}", range(&v, 0))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn runs_note(cfg: &Config) -> String {
    let runs = if cfg.runs == 1 {
        "1 run".to_owned()
    } else {
        format!("{} runs, min–max", cfg.runs)
    };
    format!("{} s each, {runs}", cfg.seconds)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn print_fanout(cfg: &Config, fan: &[RunResult]) {
    let all: Vec<&RunResult> = fan.iter().collect();
    table(
        &format!(
            "Fan-out: one room, {FANOUT_WS} WebSocket + {FANOUT_SSE} SSE members, {FANOUT_RATE} msgs/s ({})",
            runs_note(cfg)
        ),
        &[
            "members",
            "scheduled",
            "acked",
            "refused",
            "unanswered",
            "deliveries counted",
            "expected (acked × members)",
            "lost",
            "duplicated",
            "p50 ms",
            "p99 ms",
            "max ms",
            "load avg before",
            "others' CPU % during",
        ],
        &[vec![
            col(&all, |r| r.members as f64, 0),
            col(&all, |r| r.scheduled as f64, 0),
            col(&all, |r| r.acked as f64, 0),
            refused_cell(&all),
            col(&all, |r| r.unanswered as f64, 0),
            col(&all, |r| r.delivered as f64, 0),
            col(&all, |r| r.expected as f64, 0),
            col(&all, |r| r.lost as f64, 0),
            col(&all, |r| r.duplicated as f64, 0),
            col(&all, |r| quantile_ms(&r.latency, 0.5), 2),
            col(&all, |r| quantile_ms(&r.latency, 0.99), 2),
            col(&all, |r| r.latency.max() as f64 / 1000.0, 2),
            col(&all, |r| r.load_1m, 2),
            col(&all, |r| r.neighbours.cpu, 0),
        ]],
    );
    println!(
        "\nLatency: from the scheduled send to the last member's receipt (the sender's own copy included)."
    );
    println!("{NEIGHBOURS_NOTE}");
    target(
        "one room, 50 WS + 10 SSE members, 20 msg/s for 60 s: from the scheduled send to the last receiver p50 ≤ 10 ms, p99 ≤ 50 ms; 0 lost, 0 duplicated, every acked message in PostgreSQL exactly once",
    );
    let p50 = fan
        .iter()
        .map(|r| quantile_ms(&r.latency, 0.5))
        .fold(0.0, f64::max);
    let p99 = fan
        .iter()
        .map(|r| quantile_ms(&r.latency, 0.99))
        .fold(0.0, f64::max);
    let lost: usize = fan.iter().map(|r| r.lost + r.unanswered).sum();
    let dup: usize = fan.iter().map(|r| r.duplicated).sum();
    let refused: usize = fan.iter().map(refused_total).sum();
    let pg_ok = fan.iter().all(|r| r.pg.exactly_once());
    let ok = p50 <= 10.0 && p99 <= 50.0 && lost == 0 && dup == 0 && pg_ok && refused == 0;
    println!(
        "- **Measured** (worst of {} runs): p50 {p50:.2} ms, p99 {p99:.2} ms, {lost} lost or unanswered, {dup} duplicated, {refused} refused, PostgreSQL exactly once: {}. {}{}",
        fan.len(),
        if pg_ok { "yes" } else { "NO" },
        verdict(ok),
        if cfg.reportable() { "" } else { " (smoke run)" }
    );
}

/// The knee of one run, as the targets define it: the first rate whose p99
/// passes 100 ms or that has anything refused (or lost, or left
/// unanswered, or acked under 95 % of the rate).
fn knee(rates: &[f64], tp: &[Vec<RunResult>], run: usize) -> Option<f64> {
    rates.iter().zip(tp).find_map(|(rate, results)| {
        let r = results.get(run)?;
        let bad = quantile_ms(&r.latency, 0.99) > 100.0
            || refused_total(r) > 0
            || r.lost > 0
            || r.duplicated > 0
            || r.unanswered > 0
            || r.acked_per_sec < 0.95 * rate;
        bad.then_some(*rate)
    })
}

fn print_single(cfg: &Config, runs: &[RunResult]) {
    let all: Vec<&RunResult> = runs.iter().collect();
    let q = |r: &RunResult, kind: &str, q: f64| {
        r.delivery.get(kind).map_or(f64::NAN, |h| quantile_ms(h, q))
    };
    table(
        &format!(
            "Single socket vs room socket: one room, {SINGLE_ROOM_WS} room WebSocket + {SINGLE_SOCKETS} single-socket members, {FANOUT_RATE} msgs/s ({})",
            runs_note(cfg)
        ),
        &[
            "acked",
            "lost",
            "duplicated",
            "room socket p50 ms",
            "room socket p99 ms",
            "single socket p50 ms",
            "single socket p99 ms",
            "p99 single / room",
            "load avg before",
        ],
        &[vec![
            col(&all, |r| r.acked as f64, 0),
            col(&all, |r| r.lost as f64, 0),
            col(&all, |r| r.duplicated as f64, 0),
            col(&all, |r| q(r, "room ws", 0.5), 2),
            col(&all, |r| q(r, "room ws", 0.99), 2),
            col(&all, |r| q(r, "single socket", 0.5), 2),
            col(&all, |r| q(r, "single socket", 0.99), 2),
            col(
                &all,
                |r| q(r, "single socket", 0.99) / q(r, "room ws", 0.99),
                2,
            ),
            col(&all, |r| r.load_1m, 2),
        ]],
    );
    println!(
        "\nLatency: from the scheduled send to each delivery, by the kind of socket that carried it (the sender's own copy included, on the room socket)."
    );
    target(
        "a member on the seed's single socket gets messages with p99 ≤ 2× a room-socket member's (one more hop, no coalescing window), nothing lost or duplicated",
    );
    let worst = runs
        .iter()
        .map(|r| q(r, "single socket", 0.99) / q(r, "room ws", 0.99))
        .fold(0.0, f64::max);
    let lost: usize = runs.iter().map(|r| r.lost + r.unanswered).sum();
    let dup: usize = runs.iter().map(|r| r.duplicated).sum();
    let pg_ok = runs.iter().all(|r| r.pg.exactly_once());
    println!(
        "- **Measured** (worst of {} runs): single-socket p99 / room-socket p99 = {worst:.2}, {lost} lost or unanswered, {dup} duplicated, PostgreSQL exactly once: {}. {}{}",
        runs.len(),
        if pg_ok { "yes" } else { "NO" },
        verdict(worst <= 2.0 && lost == 0 && dup == 0 && pg_ok),
        if cfg.reportable() { "" } else { " (smoke run)" }
    );
}

fn print_throughput(cfg: &Config, tp: &[Vec<RunResult>]) {
    let rows: Vec<Vec<String>> = cfg
        .rates
        .iter()
        .zip(tp)
        .map(|(rate, results)| {
            let all: Vec<&RunResult> = results.iter().collect();
            vec![
                format!("{rate:.0}"),
                col(&all, |r| r.acked_per_sec, 0),
                refused_cell(&all),
                col(&all, |r| r.unanswered as f64, 0),
                col(&all, |r| r.delivered as f64, 0),
                col(&all, |r| r.lost as f64, 0),
                col(&all, |r| r.duplicated as f64, 0),
                col(&all, |r| quantile_ms(&r.latency, 0.5), 2),
                col(&all, |r| quantile_ms(&r.latency, 0.99), 2),
                col(&all, |r| r.latency.max() as f64 / 1000.0, 2),
                col(&all, |r| quantile_ms(&r.ack_latency, 0.99), 2),
                col(&all, |r| r.load_1m, 2),
                col(&all, |r| r.neighbours.cpu, 0),
            ]
        })
        .collect();
    table(
        &format!(
            "Throughput: one room, {THROUGHPUT_MEMBERS} WebSocket members, open loop ({})",
            runs_note(cfg)
        ),
        &[
            "target msgs/s",
            "acked msgs/s",
            "refused",
            "unanswered",
            "deliveries counted",
            "lost",
            "duplicated",
            "p50 ms",
            "p99 ms",
            "max ms",
            "ack p99 ms",
            "load avg before",
            "others' CPU % during",
        ],
        &rows,
    );
    println!(
        "\nAcked msgs/s: acks received by the senders during the sending window, per second. Latency: scheduled send → last member; ack: scheduled send → the sender's ack."
    );
    println!("{NEIGHBOURS_NOTE}");
    target(
        "the knee (p99 over 100 ms, or anything refused in a 60 s run) at ≥ 3,000 msgs/s with 10 members; p50 at 1,000 msgs/s within 1.5 ms",
    );
    let knees: Vec<Option<f64>> = (0..cfg.runs).map(|run| knee(&cfg.rates, tp, run)).collect();
    let top = cfg.rates.iter().copied().fold(0.0, f64::max);
    let shown: Vec<String> = knees
        .iter()
        .map(|k| k.map_or(format!("not reached up to {top:.0}"), |k| format!("{k:.0}")))
        .collect();
    // Met when 3,000 msgs/s itself ran clean, with every rate below it:
    // the knee lies above 3,000 (a run without a knee sustained every rate
    // tried, which counts only if those reached 3,000).
    let knee_ok = knees
        .iter()
        .all(|k| k.map_or(top >= 3_000.0, |k| k > 3_000.0));
    let p50_1000 = cfg
        .rates
        .iter()
        .position(|r| (*r - 1_000.0).abs() < f64::EPSILON)
        .map(|i| {
            tp[i]
                .iter()
                .map(|r| quantile_ms(&r.latency, 0.5))
                .fold(0.0, f64::max)
        });
    println!(
        "- **Measured**: knee per run (msgs/s): {}: {}. p50 at 1,000 msgs/s (worst run): {}{}",
        shown.join(", "),
        verdict(knee_ok),
        p50_1000.map_or("not measured (1000 not in BENCH_RATES)".to_owned(), |p| {
            format!("{p:.2} ms: {}", verdict(p <= 1.5))
        }),
        if cfg.reportable() { "" } else { " (smoke run)" }
    );
}

fn print_outbox(cfg: &Config, fan: &[RunResult], tp: &[Vec<RunResult>]) {
    let mut rows = Vec::new();
    let mut row = |label: String, results: &[RunResult]| {
        let all: Vec<&RunResult> = results.iter().collect();
        rows.push(vec![
            label,
            col(&all, |r| r.acked_per_sec, 0),
            col(&all, |r| r.acked as f64, 0),
            col(&all, |r| r.pg.persisted as f64, 0),
            col(&all, |r| r.pg.missing as f64, 0),
            col(&all, |r| r.pg.duplicated as f64, 0),
            col(&all, |r| r.pg.mismatched as f64, 0),
            col(&all, |r| quantile_ms(&r.ack_to_row, 0.5), 0),
            col(&all, |r| quantile_ms(&r.ack_to_row, 0.99), 0),
            col(&all, |r| r.ingest_per_sec, 1),
            col(&all, |r| r.receipts_per_sec, 1),
        ]);
    };
    row(
        format!(
            "fan-out, {FANOUT_RATE} msgs/s, {} members",
            FANOUT_WS + FANOUT_SSE
        ),
        fan,
    );
    for (rate, results) in cfg.rates.iter().zip(tp) {
        row(
            format!("{rate:.0} msgs/s, {THROUGHPUT_MEMBERS} members"),
            results,
        );
    }
    table(
        &format!(
            "Outbox: acked messages in PostgreSQL, ack → row, origin requests per second for the one room ({})",
            runs_note(cfg)
        ),
        &[
            "scenario",
            "acked msgs/s",
            "acked",
            "in PostgreSQL",
            "missing",
            "duplicated",
            "seq/id mismatch",
            "ack→PG p50 ms",
            "ack→PG p99 ms",
            "ingest req/s",
            "receipt req/s",
        ],
        &rows,
    );
    println!(
        "\nChecked after the room went quiet: every acked message by conversation, client_msg_id, seq and id. Ack→PG: the sender's ack to the first poll (every {} ms) that saw the row, so within one poll interval above the truth. Requests: the origin's http_requests_total for {} and {} over the sending window (one room active at a time).",
        persisted::POLL_EVERY.as_millis(),
        persisted::INGEST_ROUTE,
        persisted::RECEIPTS_ROUTE
    );
    target(
        "one room sustains ≥ 5,000 msgs/s acked and persisted; ack-to-PostgreSQL p99 ≤ 250 ms at 1,000 msgs/s; at 20 msgs/s at most 10 origin requests per second per room",
    );
    let at = |rate: f64| {
        cfg.rates
            .iter()
            .position(|r| (*r - rate).abs() < f64::EPSILON)
            .map(|i| &tp[i])
    };
    let sustained = at(5_000.0).map_or("not measured (5000 not in BENCH_RATES)".to_owned(), |rs| {
        let worst = rs
            .iter()
            .map(|r| r.acked_per_sec)
            .fold(f64::INFINITY, f64::min);
        let refused: usize = rs.iter().map(refused_total).sum();
        let ok = worst >= 0.99 * 5_000.0 && refused == 0 && rs.iter().all(|r| r.pg.exactly_once());
        format!(
            "{worst:.0} msgs/s acked (worst run), {refused} refused, persisted exactly once: {}",
            verdict(ok)
        )
    });
    let ack_row = at(1_000.0).map_or("not measured (1000 not in BENCH_RATES)".to_owned(), |rs| {
        let p99 = rs
            .iter()
            .map(|r| quantile_ms(&r.ack_to_row, 0.99))
            .fold(0.0, f64::max);
        format!("{p99:.0} ms: {}", verdict(p99 <= 250.0))
    });
    let requests = fan
        .iter()
        .map(|r| r.ingest_per_sec + r.receipts_per_sec)
        .fold(0.0, f64::max);
    let all_once = fan
        .iter()
        .chain(tp.iter().flatten())
        .all(|r| r.pg.exactly_once());
    println!(
        "- **Measured**: at 5,000 msgs/s: {sustained}. Ack→PG p99 at 1,000 msgs/s (worst run): {ack_row}. Origin requests at 20 msgs/s (worst run): {requests:.1}/s: {}. Every acked message in PostgreSQL exactly once, every scenario: {}{}",
        verdict(requests <= 10.0),
        if all_once { "yes" } else { "NO" },
        if cfg.reportable() { "" } else { " (smoke run)" }
    );
}
