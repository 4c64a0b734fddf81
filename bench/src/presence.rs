//! `cargo xtask bench presence`: presence at scale on the per-user layer
//! (issue 11), under `wrangler dev`.
//!
//! For each size in `BENCH_USERS` (default 1,000 and 10,000), a fresh
//! stack, and:
//!
//! 1. **Population**: that many users, each with 20 contacts (a ring of
//!    direct conversations, written straight into PostgreSQL), and a
//!    session token each, minted with the stack's secret.
//! 2. **Everyone online**: every user opens their always-on connection
//!    (`GET /api/v1/chat/ws`, one `User` object each), 32 at a time, each
//!    until its `presence_snapshot` arrives; the bench waits until every
//!    connection has its snapshot and the presence traffic has gone quiet,
//!    then checks that every user's view shows all 20 contacts online.
//! 3. **Idle cost**: workerd's CPU time over `BENCH_IDLE_SECONDS` (default
//!    60, one period of the objects' watchdog alarm) with everyone
//!    connected and nothing happening, and workerd's resident memory over
//!    its level before the users connected.
//! 4. **Presence changes**, open loop at `BENCH_RATE` changes/s (default
//!    5) for `BENCH_SECONDS` (default 60): half are a connected user going
//!    offline (the bench closes their socket; their contacts hear it after
//!    the grace period, `PRESENCE_GRACE_MS`, set to 1,000 ms here), half a
//!    user who went offline 5 s earlier coming back (the bench connects
//!    them). Each change is timed from its scheduled moment to the arrival
//!    of the `presence` frame at **each** contact whose socket was open at
//!    that moment, and to the **last** of them; frames expected, received
//!    and lost are counted at the receivers (see `analysis`). Coming online
//!    has no grace period in it and is the primary figure; going offline
//!    includes the grace period, which is not subtracted.
//! 5. **Cost per change**: workerd's CPU time (utime + stime of the workerd
//!    processes under this bench's `wrangler dev`, from `/proc`) during the
//!    measured window, per change: gross, and net of the idle rate measured
//!    in step 3.
//!
//! Every size runs `BENCH_RUNS` times (default 3, sizes interleaved, a fresh
//! stack each time) and each column prints its range over the runs, never
//! the best run; each run prints the load average and the busiest processes
//! just before it.
//!
//! `BENCH_WATCHDOG_MS` sets the Worker's `PRESENCE_WATCHDOG_MS` for the
//! run (unset: the product's 60 s). Each watchdog alarm wakes a hibernated
//! object, which reloads and re-fetches its contacts; setting it past the
//! run's length takes that idle cost out, to see the cost of a change
//! alone. A run where users cannot come online (more than 5 % wait over
//! 30 s for their snapshot) stops with the reason.
//!
//! Users connect to the workerd runtime itself, past `wrangler dev`'s
//! Node.js proxy, which spends six descriptors per WebSocket and would cap
//! this machine at about 3,300 connections (`BENCH_VIA_PROXY=1` goes
//! through it). The bench raises its soft descriptor limit to the hard one
//! before it starts the stack, so wrangler and workerd inherit it.

mod analysis;
mod clients;
mod population;
mod procs;
mod schedule;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use e2e::{Stack, StackOptions};
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::report::{CpuSample, Neighbours, busy, loadavg, loadavg_1m, range, table, target};
use analysis::KindResult;
use clients::{ConnRecord, Handle, Shared};

/// Contacts per user.
const CONTACTS: usize = 20;
const DEFAULT_USERS: &[usize] = &[1_000, 10_000];
/// Changes per second. Not 20: each change costs the local runtime some
/// 40–60 ms of workerd CPU (docs/BENCHMARKS.md, "Presence at scale"), and
/// all objects share one isolate thread, so 20/s keeps it about 90 % busy
/// and the latencies measure its queue.
const DEFAULT_RATE: f64 = 5.0;
/// The grace period the bench gives the Worker (the product's default is
/// 10 s; shorter here so offline changes complete within the run).
const GRACE_MS: u64 = 1_000;
/// How long a user who went offline stays away before coming back, and
/// how long a user who came back stays before they may go offline again.
const STAY: Duration = Duration::from_secs(5);
/// Users coming online at once while everyone connects.
const CONNECT_BATCH: usize = 32;
/// How long one of them waits for its snapshot before the next one starts
/// anyway (the settling below still waits for every snapshot).
const SNAPSHOT_WAIT: Duration = Duration::from_secs(30);
/// Presence traffic quiet for this long means the system has settled.
const QUIET: Duration = Duration::from_secs(3);
/// How long the bench waits for presence frames to stop after the last
/// first snapshot.
const QUIET_LIMIT: Duration = Duration::from_secs(60);
/// The span over which workerd's CPU is compared while settling.
const CPU_SETTLE: Duration = Duration::from_secs(5);
/// The longest the bench waits for everyone to settle after connecting.
const SETTLE_LIMIT: Duration = Duration::from_secs(300);
/// The longest the bench waits, after the last change, for frames.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
const NEIGHBOURS_NOTE: &str = "Load avg before: /proc/loadavg's 1-minute figure just before the run. Others' CPU: CPU time used during the measured window by everything but the bench process (load generator and origin), its wrangler and workerd, and its database's PostgreSQL backends, in % of one core.";

#[derive(Debug)]
struct Config {
    users: Vec<usize>,
    seconds: u64,
    idle_seconds: u64,
    runs: usize,
    rate: f64,
    /// `BENCH_WATCHDOG_MS`: the Worker's `PRESENCE_WATCHDOG_MS` for the run
    /// (unset: the product's default).
    watchdog_ms: Option<u64>,
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
        let users = match std::env::var("BENCH_USERS") {
            Ok(v) => v
                .split(',')
                .map(|n| n.trim().replace('_', "").parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| anyhow::anyhow!("BENCH_USERS={v:?}: comma-separated user counts"))?,
            Err(_) => DEFAULT_USERS.to_vec(),
        };
        let cfg = Self {
            users,
            seconds: env_or("BENCH_SECONDS", 60)?,
            idle_seconds: env_or("BENCH_IDLE_SECONDS", 60)?,
            runs: env_or("BENCH_RUNS", 3)?,
            rate: env_or("BENCH_RATE", DEFAULT_RATE)?,
            watchdog_ms: match std::env::var("BENCH_WATCHDOG_MS") {
                Ok(v) => Some(v.trim().parse().map_err(|_| {
                    anyhow::anyhow!("BENCH_WATCHDOG_MS={v:?} is not a number of ms")
                })?),
                Err(_) => None,
            },
        };
        anyhow::ensure!(
            cfg.seconds > 0 && cfg.runs > 0 && cfg.idle_seconds > 0 && cfg.rate > 0.0,
            "BENCH_SECONDS, BENCH_IDLE_SECONDS, BENCH_RUNS and BENCH_RATE must be positive"
        );
        anyhow::ensure!(
            !cfg.users.is_empty() && cfg.users.iter().all(|n| *n > CONTACTS + 1),
            "BENCH_USERS: each size must be above {}",
            CONTACTS + 1
        );
        Ok(cfg)
    }

    /// Whether this run has the length and repeats the targets ask for.
    fn reportable(&self) -> bool {
        self.seconds >= 60 && self.runs >= 3
    }
}

/// One run of one size.
#[derive(Debug)]
struct RunResult {
    users: usize,
    conversations: usize,
    /// Writing the users and conversations.
    populate_secs: f64,
    /// Bringing everyone online, `CONNECT_BATCH` at a time.
    connect_secs: f64,
    /// From then until every snapshot arrived, presence went quiet and
    /// workerd's CPU stopped falling.
    settle_secs: f64,
    /// Users whose view showed all their contacts online once settled.
    complete_views: usize,
    /// Presence frames never stopped for `QUIET` while settling.
    never_quiet: bool,
    rss_before_mib: f64,
    rss_mib: f64,
    /// Peak descriptors in use, sampled every second over the run.
    fds_bench: usize,
    fds_workerd: usize,
    /// workerd's descriptor limit (the smallest of its processes').
    fds_limit: Option<usize>,
    idle_secs: f64,
    idle_cpu_secs: f64,
    /// `presence` frames during the idle window (there should be none).
    idle_frames: usize,
    /// `presence_snapshot` frames during the idle window.
    idle_snapshots: usize,
    /// Origin requests by route during the idle window.
    idle_origin: BTreeMap<String, f64>,
    /// Origin requests by route during the measured window.
    window_origin: BTreeMap<String, f64>,
    /// `presence_snapshot` frames during the measured window.
    window_snapshots: usize,
    window_secs: f64,
    window_cpu_secs: f64,
    /// Changes scheduled inside the measured window.
    changes: usize,
    online: KindResult,
    offline: KindResult,
    /// Scheduled comebacks whose connection failed.
    failed_connects: usize,
    /// Scheduled departures whose socket was not open.
    missed_closes: usize,
    /// The driver's worst lateness behind the schedule (ms).
    lag_max_ms: f64,
    cut_off: usize,
    errors: BTreeMap<String, usize>,
    strangers: usize,
    load_1m: f64,
    neighbours: Neighbours,
}

impl RunResult {
    fn rss_per_user_kib(&self) -> f64 {
        (self.rss_mib - self.rss_before_mib) * 1024.0 / self.users as f64
    }

    /// workerd CPU per second and connected user while idle (µs).
    fn idle_us_per_user_sec(&self) -> f64 {
        self.idle_cpu_secs / self.idle_secs / self.users as f64 * 1e6
    }

    fn idle_core_pct(&self) -> f64 {
        self.idle_cpu_secs / self.idle_secs * 100.0
    }

    fn window_core_pct(&self) -> f64 {
        self.window_cpu_secs / self.window_secs * 100.0
    }

    /// Origin requests per second while idle.
    fn idle_origin_per_sec(&self) -> f64 {
        total(&self.idle_origin) / self.idle_secs
    }

    /// Origin requests per change in the window, net of the idle rate.
    fn origin_per_change(&self) -> f64 {
        let idle = self.idle_origin_per_sec() * self.window_secs;
        (total(&self.window_origin) - idle) / self.changes.max(1) as f64
    }

    /// workerd CPU per change in the window (ms), everything included.
    fn gross_ms_per_change(&self) -> f64 {
        self.window_cpu_secs / self.changes.max(1) as f64 * 1e3
    }

    /// The same, less what the window would have cost idle.
    fn net_ms_per_change(&self) -> f64 {
        let idle = self.idle_cpu_secs / self.idle_secs * self.window_secs;
        (self.window_cpu_secs - idle) / self.changes.max(1) as f64 * 1e3
    }
}

pub async fn run() -> anyhow::Result<()> {
    let cfg = Config::from_env()?;
    let began = Instant::now();
    crate::report::build("presence", "the origin and the clients");
    println!(
        "edge: edge-worker/build as built by `cargo xtask build-edge` (worker-build --release) under wrangler dev"
    );
    let (soft, hard) = procs::raise_nofile()?;
    let biggest = cfg.users.iter().copied().max().unwrap_or(0);
    println!(
        "open files limit: {soft} (hard {hard}); the bench and workerd each need one descriptor per connected user ({biggest} at most) and more besides"
    );
    println!(
        "BENCH_USERS={:?} BENCH_SECONDS={} BENCH_IDLE_SECONDS={} BENCH_RUNS={} BENCH_RATE={} changes/s · {CONTACTS} contacts per user · PRESENCE_GRACE_MS={GRACE_MS} · offline for {} s between changes",
        cfg.users,
        cfg.seconds,
        cfg.idle_seconds,
        cfg.runs,
        cfg.rate,
        STAY.as_secs()
    );
    if let Some(ms) = cfg.watchdog_ms {
        println!("PRESENCE_WATCHDOG_MS={ms} (BENCH_WATCHDOG_MS; the product's default is 60000)");
    }
    if !cfg.reportable() {
        println!(
            "NOTE: fewer than 3 runs of 60 s: a smoke run, not figures for docs/BENCHMARKS.md"
        );
    }
    let mut results: Vec<Vec<RunResult>> = cfg.users.iter().map(|_| Vec::new()).collect();
    for run in 1..=cfg.runs {
        for (i, &n) in cfg.users.iter().enumerate() {
            let r = one(&cfg, n, run)
                .await
                .with_context(|| format!("run {run}, {n} users"))?;
            results[i].push(r);
        }
    }
    print_latency(&cfg, &results);
    print_cost(&cfg, &results);
    print_verdict(&cfg, &results);
    println!(
        "\n{} runs in {:.1} min",
        cfg.runs * cfg.users.len(),
        began.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

/// The base URL (`ws://…`) users connect to, announced.
async fn ws_base(stack: &Stack) -> anyhow::Result<String> {
    let http = if std::env::var_os("BENCH_VIA_PROXY").is_some_and(|v| v != "0") {
        println!(
            "  users connect through wrangler dev's proxy: {}",
            stack.edge
        );
        stack.edge.clone()
    } else {
        let runtime = stack.runtime_url().await?;
        println!(
            "  users connect to the workerd runtime directly: {runtime} (past wrangler dev's proxy at {}; BENCH_VIA_PROXY=1 to go through it)",
            stack.edge
        );
        runtime
    };
    Ok(http.replacen("http", "ws", 1))
}

/// The PostgreSQL backends of the stack's database.
async fn backends(pool: &deadpool_postgres::Pool) -> anyhow::Result<HashSet<u32>> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| u32::try_from(r.get::<_, i32>(0)).ok())
        .collect())
}

/// The origin's request counters (`http_requests_total`, summed over
/// method and status) by route, from its `/metrics`.
#[derive(Debug, Clone, Default)]
struct OriginRequests(BTreeMap<String, f64>);

impl OriginRequests {
    async fn read(port: u16) -> Self {
        let Ok(text) = async {
            reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                .await?
                .error_for_status()?
                .text()
                .await
        }
        .await
        else {
            return Self::default();
        };
        let mut by_route = BTreeMap::new();
        for line in text.lines() {
            let Some(labels) = line.strip_prefix("http_requests_total{") else {
                continue;
            };
            let Some((_, after)) = labels.split_once("route=\"") else {
                continue;
            };
            let Some((route, _)) = after.split_once('"') else {
                continue;
            };
            // The bench's own reads of the counters are not the system's.
            if route == "/metrics" {
                continue;
            }
            let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            *by_route.entry(route.to_owned()).or_default() += value;
        }
        Self(by_route)
    }

    /// Requests by route since `before` (routes with none left out).
    fn since(&self, before: &Self) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .map(|(route, n)| {
                (
                    route.clone(),
                    n - before.0.get(route).copied().unwrap_or(0.0),
                )
            })
            .filter(|(_, n)| *n > 0.0)
            .collect()
    }
}

fn total(by_route: &BTreeMap<String, f64>) -> f64 {
    by_route.values().sum()
}

/// "route n, route n" with the `/internal/v1` prefix dropped.
fn routes(by_route: &BTreeMap<String, f64>, per: f64) -> String {
    by_route
        .iter()
        .map(|(r, n)| format!("{} {:.1}", r.trim_start_matches("/internal/v1"), n / per))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every connection's task, and the handles of those open now.
#[derive(Debug, Default)]
struct Conns {
    open: Vec<Option<Handle>>,
    tasks: Vec<JoinHandle<ConnRecord>>,
}

/// One run of one size on a fresh stack.
async fn one(cfg: &Config, n: usize, run: usize) -> anyhow::Result<RunResult> {
    let load = loadavg();
    let load_1m = loadavg_1m();
    let neighbours_before = busy(Duration::from_secs(1)).await;
    println!(
        "\nrun {run}/{} · {n} users × {CONTACTS} contacts, {} changes/s for {} s · load average {load} · {neighbours_before}",
        cfg.runs, cfg.rate, cfg.seconds
    );
    let mut vars = vec![("PRESENCE_GRACE_MS".to_owned(), GRACE_MS.to_string())];
    if let Some(ms) = &cfg.watchdog_ms {
        vars.push(("PRESENCE_WATCHDOG_MS".to_owned(), ms.to_string()));
    }
    let stack = Stack::start(StackOptions {
        vars,
        verbose: std::env::var_os("BENCH_VERBOSE").is_some(),
        ..StackOptions::default()
    })
    .await?;
    let database: String = stack
        .pool
        .get()
        .await?
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    let result = measure(cfg, &stack, n, run, load_1m).await;
    drop(stack);
    if let Err(e) = crate::fanout::drop_database(&database).await {
        println!("  could not drop the bench's database {database}: {e:#}");
    }
    let r = result?;
    print_run(&r);
    Ok(r)
}

async fn measure(
    cfg: &Config,
    stack: &Stack,
    n: usize,
    run: usize,
    load_1m: f64,
) -> anyhow::Result<RunResult> {
    let base = ws_base(stack).await?;
    let pids = procs::workerd_pids();
    anyhow::ensure!(!pids.is_empty(), "no workerd process under this bench");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = stack.workerd_rss_kib()? as f64 / 1024.0;

    let pop = population::create(stack, n, CONTACTS).await?;
    println!(
        "  population: {n} users, {} direct conversations in {:.1} s · workerd pids {pids:?}, RSS {rss_before:.0} MiB",
        pop.conversations, pop.created_in_secs
    );

    // ---- everyone online ----------------------------------------------------
    let shared = Arc::new(Shared::new(pop.index.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    // The descriptors in use, sampled every second: their peak is what a
    // descriptor limit would meet.
    let peaks = {
        let pids = pids.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut peak = (0usize, 0usize);
            loop {
                let bench = procs::fds(std::process::id());
                let workerd: usize = pids.iter().map(|p| procs::fds(*p)).sum();
                peak = (peak.0.max(bench), peak.1.max(workerd));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return peak,
                }
            }
        })
    };
    let conns = Arc::new(Mutex::new(Conns {
        open: (0..n).map(|_| None).collect(),
        tasks: Vec::new(),
    }));
    // Users come online `CONNECT_BATCH` at a time, each until its first
    // snapshot (its object has fetched the contacts from the origin): the
    // pace the system takes, not a stampede that would only measure the
    // origin's queue.
    let began = Instant::now();
    let mut connects = futures::stream::iter(0..n)
        .map(|i| {
            let base = &base;
            let token = &pop.tokens[i];
            let shared = shared.clone();
            let stop = stop_rx.clone();
            let conns = conns.clone();
            async move {
                let ws = clients::connect(base, token).await?;
                let started = clients::spawn(ws, i as u32, shared, stop);
                if let Ok(mut c) = conns.lock() {
                    c.open[i] = Some(started.handle);
                    c.tasks.push(started.task);
                }
                // Whether the snapshot came in time.
                anyhow::Ok(
                    tokio::time::timeout(SNAPSHOT_WAIT, started.snapshot)
                        .await
                        .is_ok(),
                )
            }
            .map(move |r| (i, r))
        })
        .buffer_unordered(CONNECT_BATCH);
    let mut failed: Vec<(usize, anyhow::Error)> = Vec::new();
    let mut slow = 0usize;
    let mut done = 0usize;
    let mut progress = (Instant::now(), procs::cpu(&pids));
    while let Some((i, result)) = connects.next().await {
        match result {
            Ok(true) => {}
            Ok(false) => slow += 1,
            Err(e) => failed.push((i, e)),
        }
        done += 1;
        let report = done.is_multiple_of(1_000) || slow > (n / 20).max(50);
        if report {
            let cpu = procs::cpu(&pids);
            let busy = (cpu.secs - progress.1.secs) / progress.0.elapsed().as_secs_f64() * 100.0;
            progress = (Instant::now(), cpu);
            println!(
                "  {done} of {n} online ({:.0} s) · workerd {busy:.0} % of a core since the last line · fds bench {}, workerd {} · workerd RSS {:.0} MiB · {slow} snapshots later than {} s",
                began.elapsed().as_secs_f64(),
                procs::fds(std::process::id()),
                pids.iter().map(|p| procs::fds(*p)).sum::<usize>(),
                stack.workerd_rss_kib().unwrap_or(0) as f64 / 1024.0,
                SNAPSHOT_WAIT.as_secs()
            );
        }
        if slow > (n / 20).max(50) {
            bail!(
                "the runtime cannot bring users online: {slow} of the {done} users connected so far waited over {} s for their snapshot (see the line above for workerd's CPU)",
                SNAPSHOT_WAIT.as_secs()
            );
        }
    }
    drop(connects);
    let connect_secs = began.elapsed().as_secs_f64();
    if let Some((i, e)) = failed.first() {
        bail!(
            "{} of {n} connections failed (first: user {i}: {e:#}); bench fds {}, workerd fds {}, limit {:?}",
            failed.len(),
            procs::fds(std::process::id()),
            pids.iter().map(|p| procs::fds(*p)).sum::<usize>(),
            procs::raise_nofile().ok()
        );
    }
    // Settled: every connection has its snapshot, then presence frames
    // quiet for `QUIET` (or, if they never are, `QUIET_LIMIT` spent
    // waiting: the background the idle window then measures).
    let settled_from = Instant::now();
    loop {
        let have = shared.first_snapshots.load(Ordering::Relaxed);
        if have >= n {
            break;
        }
        if settled_from.elapsed() > SETTLE_LIMIT {
            bail!(
                "not settled after {SETTLE_LIMIT:?}: {have} of {n} connections had their snapshot"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let quiet_from = Instant::now();
    let mut last = shared.presence_frames.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    while last_change.elapsed() < QUIET && quiet_from.elapsed() < QUIET_LIMIT {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = shared.presence_frames.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    let never_quiet = last_change.elapsed() < QUIET;
    if never_quiet {
        println!(
            "  presence frames never stopped for {} s within {} s after the last snapshot: measuring on that background",
            QUIET.as_secs(),
            QUIET_LIMIT.as_secs()
        );
    }
    // Work no frame shows (room subscriptions, reports to the origin) may
    // still run: settled when workerd's CPU stops falling (or is under
    // 5 % of a core), measured over 5 s at a time.
    let mut rate_before = f64::INFINITY;
    loop {
        let a = procs::cpu(&pids);
        tokio::time::sleep(CPU_SETTLE).await;
        let rate = (procs::cpu(&pids).secs - a.secs) / CPU_SETTLE.as_secs_f64();
        if rate < 0.05 || rate >= 0.8 * rate_before || settled_from.elapsed() > SETTLE_LIMIT {
            break;
        }
        rate_before = rate;
    }
    let settle_secs = settled_from.elapsed().as_secs_f64();
    let settled_us = shared.now_us();
    let rss = stack.workerd_rss_kib()? as f64 / 1024.0;
    println!(
        "  everyone online: connected in {connect_secs:.1} s, settled {settle_secs:.1} s later · {} presence frames · workerd RSS {rss:.0} MiB · fds now: bench {}, workerd {}",
        shared.presence_frames.load(Ordering::Relaxed),
        procs::fds(std::process::id()),
        pids.iter().map(|p| procs::fds(*p)).sum::<usize>()
    );

    // ---- idle ----------------------------------------------------------------
    let idle = Duration::from_secs(cfg.idle_seconds);
    let frames_before = shared.presence_frames.load(Ordering::Relaxed);
    let snapshots_before = shared.snapshots.load(Ordering::Relaxed);
    let origin0 = OriginRequests::read(stack.origin_port).await;
    let cpu0 = procs::cpu(&pids);
    let t0 = Instant::now();
    tokio::time::sleep(idle).await;
    let cpu1 = procs::cpu(&pids);
    let idle_secs = t0.elapsed().as_secs_f64();
    let idle_origin = OriginRequests::read(stack.origin_port)
        .await
        .since(&origin0);
    let idle_cpu_secs = cpu1.secs - cpu0.secs;
    let idle_frames = shared.presence_frames.load(Ordering::Relaxed) - frames_before;
    let idle_snapshots = shared.snapshots.load(Ordering::Relaxed) - snapshots_before;
    let rss_idle = stack.workerd_rss_kib()? as f64 / 1024.0;
    println!(
        "  idle {idle_secs:.0} s: workerd {:.1} % of a core ({:.2} µs/s per user), RSS {rss_idle:.0} MiB at the end · {idle_frames} presence frames, {idle_snapshots} snapshots · origin requests/s: {}",
        idle_cpu_secs / idle_secs * 100.0,
        idle_cpu_secs / idle_secs / n as f64 * 1e6,
        routes(&idle_origin, idle_secs)
    );

    // ---- presence changes ------------------------------------------------------
    let plan = schedule::plan(
        n,
        cfg.rate,
        Duration::from_secs(cfg.seconds),
        STAY,
        (run as u64) << 32 | n as u64,
    )?;
    let changes = plan.measured().count();
    let start = Instant::now() + Duration::from_millis(500);
    let start_us = shared.us_of(start);
    let window_start = start + Duration::from_micros(plan.warmup_us);
    let window_end = window_start + Duration::from_micros(plan.window_us);
    let pool = stack.pool.clone();
    let window_pids = pids.clone();
    let origin_port = stack.origin_port;
    let window_shared = shared.clone();
    let sampler = tokio::spawn(async move {
        let pids = window_pids;
        tokio::time::sleep_until(window_start.into()).await;
        let (cpu_a, sample_a, at_a) = (procs::cpu(&pids), CpuSample::take(), Instant::now());
        let snapshots_a = window_shared.snapshots.load(Ordering::Relaxed);
        let origin_a = OriginRequests::read(origin_port).await;
        tokio::time::sleep_until(window_end.into()).await;
        let (cpu_b, sample_b, at_b) = (procs::cpu(&pids), CpuSample::take(), Instant::now());
        let snapshots = window_shared.snapshots.load(Ordering::Relaxed) - snapshots_a;
        let origin = OriginRequests::read(origin_port).await.since(&origin_a);
        let neighbours = match (sample_a, sample_b) {
            (Some(a), Some(b)) => {
                let mut ours = backends(&pool).await.unwrap_or_default();
                ours.insert(std::process::id());
                Neighbours::between(&a, &b, &ours)
            }
            _ => Neighbours {
                cpu: f64::NAN,
                top: "unknown (no /proc)".to_owned(),
            },
        };
        (
            cpu_b.secs - cpu_a.secs,
            at_b.duration_since(at_a).as_secs_f64(),
            neighbours,
            origin,
            snapshots,
        )
    });
    let failed_connects = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut missed_closes = 0usize;
    let mut lag_max = Duration::ZERO;
    for change in &plan.changes {
        let due = start + Duration::from_micros(change.at_us);
        tokio::time::sleep_until(due.into()).await;
        lag_max = lag_max.max(due.elapsed());
        let user = change.user as usize;
        if change.online {
            let base = base.clone();
            let token = pop.tokens[user].clone();
            let shared = shared.clone();
            let stop = stop_rx.clone();
            let conns = conns.clone();
            let failed = failed_connects.clone();
            tokio::spawn(async move {
                match clients::connect(&base, &token).await {
                    Ok(ws) => {
                        let started = clients::spawn(ws, user as u32, shared, stop);
                        if let Ok(mut c) = conns.lock() {
                            c.open[user] = Some(started.handle);
                            c.tasks.push(started.task);
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        } else {
            let handle = conns.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.open[user].take();
            match handle {
                Some(h) => h.close(),
                None => missed_closes += 1,
            }
        }
    }
    let (window_cpu_secs, window_secs, neighbours, window_origin, window_snapshots) =
        sampler.await.context("CPU sampler")?;

    // Wait for the last changes' frames: the grace period, then quiet.
    tokio::time::sleep(Duration::from_millis(GRACE_MS)).await;
    let drain_from = Instant::now();
    let mut last = shared.presence_frames.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    while last_change.elapsed() < QUIET && drain_from.elapsed() < DRAIN_LIMIT {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = shared.presence_frames.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    let end_us = shared.now_us();
    let _ = stop_tx.send(true);
    let (fds_bench, fds_workerd) = peaks.await.context("descriptor sampler")?;
    let fds_limit = pids.iter().filter_map(|p| procs::nofile_limit(*p)).min();
    let tasks = std::mem::take(&mut conns.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.tasks);
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.push(t.await.context("connection task")?);
    }
    // Closing the sockets now would only make work for a runtime that is
    // about to stop; the stack's drop ends them.
    let (complete_views, _) = analysis::complete_views(&records, &pop.contacts, settled_us);
    let (online, offline) = analysis::analyse(
        &plan,
        start_us,
        end_us,
        STAY.as_micros() as u64,
        &records,
        &pop.contacts,
    )?;
    let errors = shared.errors.lock().map(|m| m.clone()).unwrap_or_default();
    Ok(RunResult {
        users: n,
        conversations: pop.conversations,
        populate_secs: pop.created_in_secs,
        connect_secs,
        settle_secs,
        complete_views,
        never_quiet,
        rss_before_mib: rss_before,
        rss_mib: rss,
        fds_bench,
        fds_workerd,
        fds_limit,
        idle_secs,
        idle_cpu_secs,
        idle_frames,
        idle_snapshots,
        idle_origin,
        window_origin,
        window_snapshots,
        window_secs,
        window_cpu_secs,
        changes,
        online,
        offline,
        failed_connects: failed_connects.load(Ordering::Relaxed),
        missed_closes,
        lag_max_ms: lag_max.as_secs_f64() * 1e3,
        cut_off: shared.cut_off.load(Ordering::Relaxed),
        errors,
        strangers: shared.strangers.load(Ordering::Relaxed),
        load_1m,
        neighbours,
    })
}

fn q_ms(h: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return f64::NAN;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

fn kind_line(name: &str, k: &KindResult) -> String {
    format!(
        "{name}: {} changes · receivers {}/{} informed ({} by snapshot), {} lost, {} left first, {} already shown, {} duplicated · each p50 {:.2} p99 {:.2} ms · last p50 {:.2} p99 {:.2} max {:.2} ms",
        k.changes,
        k.informed,
        k.expected,
        k.by_snapshot,
        k.lost,
        k.left,
        k.already,
        k.duplicated,
        q_ms(&k.each, 0.5),
        q_ms(&k.each, 0.99),
        q_ms(&k.last, 0.5),
        q_ms(&k.last, 0.99),
        k.last.max() as f64 / 1000.0,
    )
}

fn print_run(r: &RunResult) {
    println!(
        "  {} users and {} conversations written in {:.1} s; all online in {:.1} s; descriptors at the peak: bench {}, workerd {} (limit {})",
        r.users,
        r.conversations,
        r.populate_secs,
        r.connect_secs + r.settle_secs,
        r.fds_bench,
        r.fds_workerd,
        r.fds_limit.map_or("unknown".to_owned(), |l| l.to_string())
    );
    println!("  {}", kind_line("came online", &r.online));
    println!(
        "  {}",
        kind_line(
            &format!("went offline (grace {GRACE_MS} ms included)"),
            &r.offline
        )
    );
    println!(
        "  workerd: {:.2} ms CPU per change net of idle ({:.2} gross), {:.1} % of a core during changes, {:.1} % idle · RSS {:.1} KiB per user",
        r.net_ms_per_change(),
        r.gross_ms_per_change(),
        r.window_core_pct(),
        r.idle_core_pct(),
        r.rss_per_user_kib()
    );
    println!(
        "  origin requests per change (gross): {} · while idle, per s: {} · snapshots: {} in the window ({} changes came online), {} while idle",
        routes(&r.window_origin, r.changes.max(1) as f64),
        routes(&r.idle_origin, r.idle_secs),
        r.window_snapshots,
        r.online.changes,
        r.idle_snapshots
    );
    println!(
        "  other processes during the window: {:.0} % of one core{}",
        r.neighbours.cpu,
        if r.neighbours.top.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.neighbours.top)
        }
    );
    if std::env::var_os("BENCH_DEBUG").is_some() {
        for e in r
            .online
            .lost_examples
            .iter()
            .chain(&r.offline.lost_examples)
        {
            println!("  lost: {e}");
        }
    }
    let odd = anomalies(r);
    if !odd.is_empty() {
        println!("  ATTENTION: {}", odd.join("; "));
    }
}

/// Things that should never happen, spelled out.
fn anomalies(r: &RunResult) -> Vec<String> {
    let mut out = Vec::new();
    if r.complete_views < r.users {
        out.push(format!(
            "after everyone connected, {} of {} users did not see all their contacts online",
            r.users - r.complete_views,
            r.users
        ));
    }
    if let Some(limit) = r.fds_limit.filter(|l| r.fds_workerd * 100 >= l * 95) {
        out.push(format!(
            "workerd had {} descriptors open at the peak (sampled each second) against its limit of {limit}: past it, it can neither accept a socket nor open an object's SQLite files, and what it then drops shows as lost and cut off",
            r.fds_workerd
        ));
    }
    if r.never_quiet {
        out.push(format!(
            "presence frames never stopped for {} s after everyone was online",
            QUIET.as_secs()
        ));
    }
    if r.idle_frames > 0 {
        out.push(format!(
            "{} presence frames while nothing changed",
            r.idle_frames
        ));
    }
    if r.failed_connects > 0 {
        out.push(format!("{} comebacks failed to connect", r.failed_connects));
    }
    if r.missed_closes > 0 {
        out.push(format!(
            "{} departures found no open socket",
            r.missed_closes
        ));
    }
    if r.cut_off > 0 {
        out.push(format!("{} connections ended by the server", r.cut_off));
    }
    if !r.errors.is_empty() {
        out.push(format!("error frames: {:?}", r.errors));
    }
    if r.strangers > 0 {
        out.push(format!(
            "{} presence frames about users outside the bench",
            r.strangers
        ));
    }
    if r.lag_max_ms > 100.0 {
        out.push(format!(
            "the schedule's driver fell {:.0} ms behind (latency counts from the schedule)",
            r.lag_max_ms
        ));
    }
    out
}

fn col(results: &[RunResult], f: impl Fn(&RunResult) -> f64, decimals: usize) -> String {
    let v: Vec<f64> = results.iter().map(f).filter(|v| !v.is_nan()).collect();
    range(&v, decimals)
}

fn runs_note(cfg: &Config) -> String {
    let runs = if cfg.runs == 1 {
        "1 run".to_owned()
    } else {
        format!("{} runs, min–max", cfg.runs)
    };
    format!("{} s at {} changes/s, {runs}", cfg.seconds, cfg.rate)
}

/// A column of one kind of change.
fn kcol(
    results: &[RunResult],
    online: bool,
    f: impl Fn(&KindResult) -> f64,
    decimals: usize,
) -> String {
    col(
        results,
        |r| f(if online { &r.online } else { &r.offline }),
        decimals,
    )
}

fn print_latency(cfg: &Config, results: &[Vec<RunResult>]) {
    let mut rows = Vec::new();
    for (n, rs) in cfg.users.iter().zip(results) {
        for online in [true, false] {
            rows.push(vec![
                n.to_string(),
                if online {
                    "came online".to_owned()
                } else {
                    format!("went offline (+{GRACE_MS} ms grace)")
                },
                kcol(rs, online, |k| k.changes as f64, 0),
                kcol(rs, online, |k| k.expected as f64, 0),
                kcol(rs, online, |k| k.informed as f64, 0),
                kcol(rs, online, |k| k.lost as f64, 0),
                kcol(rs, online, |k| k.left as f64, 0),
                kcol(rs, online, |k| k.already as f64, 0),
                kcol(rs, online, |k| k.duplicated as f64, 0),
                kcol(rs, online, |k| q_ms(&k.each, 0.5), 1),
                kcol(rs, online, |k| q_ms(&k.each, 0.99), 1),
                kcol(rs, online, |k| q_ms(&k.last, 0.5), 1),
                kcol(rs, online, |k| q_ms(&k.last, 0.99), 1),
                kcol(rs, online, |k| k.last.max() as f64 / 1000.0, 1),
            ]);
        }
    }
    table(
        &format!(
            "Presence-change latency: every user online with {CONTACTS} contacts ({})",
            runs_note(cfg)
        ),
        &[
            "users",
            "change",
            "changes",
            "receivers expected",
            "informed",
            "lost",
            "left first",
            "already shown",
            "duplicated",
            "each p50 ms",
            "each p99 ms",
            "last p50 ms",
            "last p99 ms",
            "last max ms",
        ],
        &rows,
    );
    println!(
        "\nLatency from the scheduled change (the bench's connect or close) to a contact's `presence` frame; receivers expected: the contacts whose socket was open at that moment; last: the change's last expected contact (changes with a lost receiver are left out of it and counted as lost). Going offline includes the {GRACE_MS} ms grace period (PRESENCE_GRACE_MS), not subtracted. Left first: the receiver's own socket closed, by the schedule, before the frame came. Already shown: the receiver's view showed the new state before the change because an earlier frame about that user never came (that earlier change counted it as lost if it was in the window)."
    );
}

fn print_cost(cfg: &Config, results: &[Vec<RunResult>]) {
    let rows: Vec<Vec<String>> = cfg
        .users
        .iter()
        .zip(results)
        .map(|(n, rs)| {
            vec![
                n.to_string(),
                col(rs, |r| r.connect_secs + r.settle_secs, 0),
                col(rs, |r| r.fds_workerd as f64, 0),
                col(rs, |r| r.rss_mib, 0),
                col(rs, RunResult::rss_per_user_kib, 1),
                col(rs, RunResult::idle_core_pct, 1),
                col(rs, RunResult::idle_us_per_user_sec, 2),
                col(rs, RunResult::window_core_pct, 1),
                col(rs, RunResult::gross_ms_per_change, 2),
                col(rs, RunResult::net_ms_per_change, 2),
                col(rs, RunResult::origin_per_change, 1),
                col(rs, |r| r.idle_origin_per_sec() / r.users as f64 * 1000.0, 2),
                col(rs, |r| r.load_1m, 2),
                col(rs, |r| r.neighbours.cpu, 0),
            ]
        })
        .collect();
    table(
        &format!("Per-user cost in workerd ({})", runs_note(cfg)),
        &[
            "users",
            "all online in s",
            "workerd fds (peak)",
            "workerd RSS MiB",
            "RSS KiB per user",
            "idle: % of a core",
            "idle: µs/s per user",
            "changes: % of a core",
            "CPU ms per change (gross)",
            "CPU ms per change (net of idle)",
            "origin requests per change (net of idle)",
            "idle origin requests/s per 1,000 users",
            "load avg before",
            "others' CPU % during",
        ],
        &rows,
    );
    println!(
        "\nworkerd: utime + stime of the workerd processes under the bench's wrangler dev (/proc). All online: connecting every user, {CONNECT_BATCH} at a time, each until its snapshot, then until every snapshot arrived, presence went quiet ({} s) and workerd's CPU stopped falling (5-s spans). RSS per user: workerd's growth over its level before the users connected. Idle: {} s with everyone connected and nothing changing (it includes each object's watchdog alarm, every PRESENCE_WATCHDOG_MS = {} ms). Net of idle: the window's CPU less the idle rate over the same time, per change.",
        QUIET.as_secs(),
        cfg.idle_seconds,
        cfg.watchdog_ms.unwrap_or(60_000)
    );
    println!("{NEIGHBOURS_NOTE}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn print_verdict(cfg: &Config, results: &[Vec<RunResult>]) {
    target(
        "a presence change reaches all online contacts with the same per-user cost at 10,000 simulated users as at 1,000 (within noise: here, the larger size's median workerd CPU per change within 25 % of the smaller's), nothing lost; the tenant Lobby it replaced grew linearly: one presence broadcast took 38.6 ms p50 at 1,000 and 188 ms p50 at 5,000 connections (docs/BENCHMARKS.md, Lobby)",
    );
    let sizes: Vec<(usize, f64, f64, usize)> = cfg
        .users
        .iter()
        .zip(results)
        .map(|(n, rs)| {
            (
                *n,
                median(rs.iter().map(RunResult::net_ms_per_change).collect()),
                median(rs.iter().map(|r| q_ms(&r.online.last, 0.5)).collect()),
                rs.iter().map(|r| r.online.lost + r.offline.lost).sum(),
            )
        })
        .collect();
    let (Some(small), Some(large)) = (
        sizes.iter().min_by_key(|s| s.0),
        sizes.iter().max_by_key(|s| s.0),
    ) else {
        return;
    };
    let ratio = large.1 / small.1;
    let lost: usize = sizes.iter().map(|s| s.3).sum();
    let ok = ratio <= 1.25 && lost == 0;
    println!(
        "- **Measured** (medians over runs): workerd CPU per change net of idle {:.2} ms at {} users, {:.2} ms at {} users (× {ratio:.2}); came online → last contact p50 {:.1} ms and {:.1} ms; {lost} receivers lost over all runs: {}{}",
        small.1,
        small.0,
        large.1,
        large.0,
        small.2,
        large.2,
        if ok { "met" } else { "NOT met" },
        if cfg.reportable() { "" } else { " (smoke run)" }
    );
}
