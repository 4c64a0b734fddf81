//! What reached PostgreSQL, and what it cost the origin: the outbox's side
//! of a scenario.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;
use uuid::Uuid;

use super::scenario::{Ack, Tally};

pub const INGEST_ROUTE: &str = "/internal/v1/messages/batch";
pub const RECEIPTS_ROUTE: &str = "/internal/v1/receipts";

/// How often the poller looks for new rows: the resolution of the
/// ack-to-PostgreSQL latency.
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// How far below the highest seq seen the poller looks again for rows that
/// were written out of order (batches in flight at once may commit in any
/// order; the room holds at most 5,000 unflushed messages). Bounded, so
/// that a seq that never arrives costs each poll at most this many rows.
/// Rows later than that still count in the final verification; they only
/// miss their ack-to-row time.
const REORDER_WINDOW: i64 = 5_000;

/// Every acked message checked in PostgreSQL by its key, seq and id.
#[derive(Debug, Default, Clone, Copy)]
pub struct PgCheck {
    /// Acked messages with a row (the right one or not).
    pub persisted: usize,
    /// Acked messages with no row.
    pub missing: usize,
    /// Rows beyond the first for an acked message.
    pub duplicated: usize,
    /// Acked messages whose row has another seq or id than the ack named.
    pub mismatched: usize,
    /// Rows of this scenario for messages that were never acked.
    pub unacked_rows: usize,
}

impl PgCheck {
    pub fn exactly_once(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.mismatched == 0
    }
}

/// Polls PostgreSQL every [`POLL_EVERY`] for rows of `conversation` it has
/// not seen, until the run is `done`. Returns, per message index, when its
/// row was first visible (µs since the tally's epoch, + 1; 0: never seen).
///
/// The time recorded is when the query was issued: its snapshot is taken
/// after that, and the previous poll did not see the row, so the row
/// became visible within one poll interval before it.
pub(super) async fn poll(
    pool: deadpool_postgres::Pool,
    conversation: i64,
    tally: Arc<Tally>,
    mut done: watch::Receiver<bool>,
) -> anyhow::Result<Vec<u64>> {
    let client = pool.get().await.context("a connection for the poller")?;
    let stmt = client
        .prepare(
            "SELECT client_msg_id, seq FROM messages
             WHERE conversation_id = $1 AND seq > $2",
        )
        .await?;
    let mut first_seen = vec![0u64; tally.total];
    // Seqs seen, to know the prefix below which nothing is missing any
    // more (seqs are gapless from 1).
    let mut seq_seen = vec![false; tally.total + 1];
    let mut prefix = 0i64;
    let mut max_seq = 0i64;
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.wait_for(|d| *d) => break,
        }
        let at = tally.now_us();
        let floor = prefix.max(max_seq - REORDER_WINDOW);
        let rows = client.query(&stmt, &[&conversation, &floor]).await?;
        for row in rows {
            let key: String = row.get(0);
            let seq: i64 = row.get(1);
            if let Some(k) = tally.index(&key) {
                if first_seen[k] == 0 {
                    first_seen[k] = at;
                    tally.persisted_seen.fetch_add(1, Ordering::Relaxed);
                }
            }
            max_seq = max_seq.max(seq);
            if let Some(slot) = usize::try_from(seq).ok().and_then(|s| seq_seen.get_mut(s)) {
                *slot = true;
            }
        }
        while usize::try_from(prefix + 1)
            .ok()
            .and_then(|s| seq_seen.get(s))
            .is_some_and(|seen| *seen)
        {
            prefix += 1;
        }
    }
    Ok(first_seen)
}

/// Checks every acked message against PostgreSQL: exactly one row, with the
/// key, seq and id its ack named.
pub(super) async fn verify(
    pool: &deadpool_postgres::Pool,
    conversation: i64,
    tally: &Tally,
    acks: &[Ack],
) -> anyhow::Result<PgCheck> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT client_msg_id, seq, id FROM messages WHERE conversation_id = $1",
            &[&conversation],
        )
        .await
        .context("read the scenario's messages back")?;
    let mut stored: HashMap<usize, Vec<(i64, Uuid)>> = HashMap::new();
    for row in rows {
        let key: String = row.get(0);
        if let Some(k) = tally.index(&key) {
            stored.entry(k).or_default().push((row.get(1), row.get(2)));
        }
    }
    let mut check = PgCheck::default();
    for ack in acks {
        match stored.remove(&ack.k) {
            None => check.missing += 1,
            Some(found) => {
                check.persisted += 1;
                check.duplicated += found.len() - 1;
                if found.len() == 1 && found[0] != (ack.seq, ack.id) {
                    check.mismatched += 1;
                }
            }
        }
    }
    // What is left was never acked.
    check.unacked_rows = stored.values().map(Vec::len).sum();
    Ok(check)
}

/// The PostgreSQL backends serving this stack's database (the origin's
/// and the bench's own connections): part of the system under test, not
/// neighbours.
pub async fn backends(pool: &deadpool_postgres::Pool) -> anyhow::Result<HashSet<u32>> {
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
/// method and status), per route, read from its `/metrics`.
#[derive(Debug)]
pub struct OriginCounters {
    pub at: Instant,
    by_route: HashMap<String, f64>,
}

impl OriginCounters {
    pub async fn read(http: &reqwest::Client, url: &str) -> anyhow::Result<Self> {
        let text = http
            .get(url)
            .send()
            .await
            .context("read the origin's /metrics")?
            .error_for_status()?
            .text()
            .await?;
        let at = Instant::now();
        let mut by_route: HashMap<String, f64> = HashMap::new();
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
            let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            *by_route.entry(route.to_owned()).or_default() += value;
        }
        Ok(Self { at, by_route })
    }

    /// Requests to `route` since `before`.
    pub fn delta(&self, before: &Self, route: &str) -> f64 {
        let now = self.by_route.get(route).copied().unwrap_or(0.0);
        let then = before.by_route.get(route).copied().unwrap_or(0.0);
        now - then
    }
}
