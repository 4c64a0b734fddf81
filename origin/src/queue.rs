//! The loop shared by the origin's background queues (Web Push, media
//! processing): rows in PostgreSQL with a due time, leased a round at a
//! time by whichever instance gets them first.

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{Notify, watch};

use crate::metrics::Timed;

/// One queue's settings for [`drive`].
#[derive(Debug, Clone, Copy)]
pub struct Queue {
    /// Named in the log line of a failed round.
    pub name: &'static str,
    /// Seconds until the next row is due (`NULL` when none is): the worker
    /// sleeps that long, at most `idle`.
    pub next_due_sql: &'static str,
    /// Its name in `chat_db_query_seconds`.
    pub next_due_query: &'static str,
    pub idle: Duration,
    /// A round that handled this many rows may have left more due: the
    /// next one starts at once.
    pub full: usize,
}

/// Runs `round` until `stop` turns true (or its sender goes; never without
/// one): back to back while rounds come back full, otherwise asleep until
/// the next due row or a wake. A failed round backs off 2, 4, … 32 s.
pub async fn drive<F, Fut>(
    pool: &Pool,
    queue: Queue,
    wake: &Notify,
    mut stop: Option<watch::Receiver<bool>>,
    mut round: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<usize>>,
{
    let mut failures: u32 = 0;
    loop {
        if stop.as_ref().is_some_and(|s| *s.borrow()) {
            break;
        }
        let pause = match round().await {
            Ok(done) => {
                failures = 0;
                if done >= queue.full {
                    continue;
                }
                next_due(pool, queue).await
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(
                    error = %crate::error::Chain(e.as_ref()),
                    queue = queue.name,
                    "queue round failed; retrying"
                );
                Duration::from_secs(1 << failures.min(5))
            }
        };
        let stopped = async {
            match stop.as_mut() {
                Some(s) => s.changed().await.is_err(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = wake.notified() => {}
            gone = stopped => {
                if gone {
                    break;
                }
            }
        }
    }
}

/// How long to sleep: until the next due row, at most `queue.idle`.
async fn next_due(pool: &Pool, queue: Queue) -> Duration {
    let secs: Option<f64> = async {
        let client = pool.get().await.ok()?;
        client
            .query_one(queue.next_due_sql, &[])
            .timed(queue.next_due_query)
            .await
            .ok()?
            .get(0)
    }
    .await;
    match secs {
        Some(s) if s.is_finite() => {
            Duration::from_secs_f64(s.clamp(0.01, queue.idle.as_secs_f64()))
        }
        _ => queue.idle,
    }
}
