//! `cargo xtask bench lobby`: idle Lobby connections under `wrangler dev`.
//!
//! For 1,000 and then 5,000 idle connections to the tenant's one Lobby:
//! - **memory per connection**: the growth of workerd's resident memory
//!   (all workerd processes of the dev server) divided by the connections;
//! - **presence broadcast latency**: a user comes online, and every idle
//!   connection must receive the `presence` frame; we time the send of the
//!   upgrade to the moment the last connection has it.
//!
//! Connections go to the workerd runtime directly, past wrangler dev's
//! local proxy (see `Stack::runtime_url`): the proxy's six file
//! descriptors per WebSocket would cap this machine at ~3,300.
//!
//! The idle connections belong to N/100 users with 100 tabs each, so that
//! opening them does not itself cost O(N²) presence frames; the broadcast
//! under test still goes to every connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use e2e::{Stack, StackOptions};
use futures::StreamExt;
use tokio::sync::Notify;

use crate::report::{micros_histogram, ms, table};

const TABS_PER_USER: usize = 100;
const TRIALS: usize = 10;

pub async fn run() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        verbose: std::env::var_os("BENCH_VERBOSE").is_some(),
        ..StackOptions::default()
    })
    .await?;
    let runtime = stack.runtime_url().await?;
    println!("stack up: edge {}, runtime {runtime}", stack.edge);
    let mut rows = Vec::new();
    let mut idle: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let seen = Arc::new(AtomicUsize::new(0));
    let everyone = Arc::new(Notify::new());
    let target = Arc::new(AtomicUsize::new(0));
    let watched = Arc::new(std::sync::Mutex::new(0i64));
    // Warm the Lobby with one connection, then take the baseline.
    let warm = stack.user("Warm").await?;
    let _warm_ws = stack.lobby(&warm).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = stack.workerd_rss_kib()?;
    println!("baseline workerd RSS: {baseline} KiB");
    for n in [1_000usize, 5_000] {
        let have = idle.len();
        println!("opening {} idle connections (total {n})…", n - have);
        let users = (n - have).div_ceil(TABS_PER_USER);
        for u in 0..users {
            let user = stack.user(&format!("Idle{n}x{u}")).await?;
            let tabs = TABS_PER_USER.min(n - idle.len());
            let mut opened = Vec::with_capacity(tabs);
            for _ in 0..tabs {
                opened.push(connect(&runtime, &user.token));
            }
            for (i, ws) in futures::future::join_all(opened)
                .await
                .into_iter()
                .enumerate()
            {
                let ws = ws.with_context(|| format!("connection {} of {n}", idle.len() + i + 1))?;
                idle.push(tokio::spawn(watch(
                    ws,
                    seen.clone(),
                    target.clone(),
                    everyone.clone(),
                    watched.clone(),
                )));
            }
        }
        ensure!(idle.len() == n, "{} connections open", idle.len());
        println!("{n} open");
        // Let presence traffic from the openings settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = stack.workerd_rss_kib()?;
        let per_conn = (rss.saturating_sub(baseline)) as f64 * 1024.0 / n as f64;

        let mut latency = micros_histogram()?;
        for t in 0..TRIALS {
            let newcomer = stack.user(&format!("New{n}x{t}")).await?;
            *watched.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = newcomer.id;
            seen.store(0, Ordering::SeqCst);
            target.store(n, Ordering::SeqCst);
            let started = Instant::now();
            let waiter = everyone.notified();
            let ws = connect(&runtime, &newcomer.token).await?;
            tokio::time::timeout(Duration::from_secs(30), waiter)
                .await
                .with_context(|| {
                    format!(
                        "only {} of {n} saw the presence",
                        seen.load(Ordering::SeqCst)
                    )
                })?;
            latency.record(started.elapsed().as_micros() as u64)?;
            target.store(usize::MAX, Ordering::SeqCst);
            drop(ws);
            // Past the grace period, so the next trial is a fresh arrival.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        rows.push(vec![
            n.to_string(),
            format!("{:.1}", rss as f64 / 1024.0),
            format!("{:.1}", per_conn / 1024.0),
            ms(latency.value_at_quantile(0.5)),
            ms(latency.value_at_quantile(0.99)),
            ms(latency.max()),
        ]);
    }
    table(
        "Lobby: idle connections (one tenant), presence broadcast to all of them",
        &[
            "idle connections",
            "workerd RSS MiB",
            "KiB per connection",
            "broadcast p50 ms",
            "broadcast p99 ms",
            "max ms",
        ],
        &rows,
    );
    println!(
        "(baseline workerd RSS before the idle connections: {:.1} MiB; {TRIALS} broadcasts per size)",
        baseline as f64 / 1024.0
    );
    // `target` is a local here (the broadcast's expected count).
    crate::report::target(
        "a presence change reaches all online contacts with the same per-user cost at 10,000 simulated users as at 1,000 (issue 11 replaces the Lobby; this bench measures today's one Lobby per tenant)",
    );
    for task in idle {
        task.abort();
    }
    Ok(())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(base: &str, token: &str) -> anyhow::Result<Socket> {
    let url = format!(
        "{}/api/v1/chat/ws?token={token}",
        base.replacen("http", "ws", 1)
    );
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .context("lobby connect")?;
    Ok(ws)
}

/// Counts, for the current trial, the connections that saw the watched
/// user come online; the last one wakes the bench.
async fn watch(
    mut ws: Socket,
    seen: Arc<AtomicUsize>,
    target: Arc<AtomicUsize>,
    everyone: Arc<Notify>,
    watched: Arc<std::sync::Mutex<i64>>,
) {
    while let Some(Ok(msg)) = ws.next().await {
        let Ok(text) = msg.to_text() else { continue };
        if !text.contains("\"presence\"") || !text.contains("\"is_online\":true") {
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            continue;
        };
        let user = watched.lock().map(|w| *w).unwrap_or(0);
        if v["user_id"] == user {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            if n == target.load(Ordering::SeqCst) {
                everyone.notify_one();
            }
        }
    }
}
