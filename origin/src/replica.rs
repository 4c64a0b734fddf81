//! Read replicas: which database serves a read.
//!
//! With `DATABASE_READ_URL` set, the reads that dominate the load (history,
//! conversation lists, the directory and active users, search) go to one
//! streaming replica through [`Reads::get_for`]; everything else, and every
//! write, uses the primary pool as before. Without it, [`Reads`] hands out
//! primary connections and nothing else here runs.
//!
//! A read goes to the replica only when all of these hold ([`Tracker::choose`]):
//!
//! - **The replica is known to be fine.** A background task ([`watch`])
//!   probes both servers every [`PROBE_EVERY`] on connections of its own
//!   (not the pools, so a saturated pool cannot starve the probe and send
//!   more load to the primary). A probe that failed, timed out, found a
//!   server that is not in recovery (a promoted replica no longer follows
//!   the primary), or is older than [`STALE_AFTER`], sends reads to the
//!   primary. So does a replica connection that cannot be had when a read
//!   asks for it, until the next good probe.
//! - **Its lag is within `DATABASE_READ_MAX_LAG_MS`.** Lag is measured with
//!   LSNs first: when the replica has replayed up to the primary's WAL
//!   write position sampled just before, nothing is pending and the lag is
//!   zero, however old `pg_last_xact_replay_timestamp()` is (an idle
//!   primary commits nothing, so that timestamp ages while the replica is
//!   fully caught up). Only with WAL pending is the lag the age of the last
//!   replayed commit, which is then an upper bound.
//! - **The caller has no write the replica may lack (read-your-writes).**
//!   Each probe records the instant it started and the primary's WAL insert
//!   position at that instant. Once the replica has replayed past that
//!   position, every commit acknowledged before that instant is visible
//!   there: that instant is the replica's *horizon*. Each write this
//!   instance makes for a user (any authenticated non-GET REST request, by
//!   [`track_writes`]; each message, change and receipt ingested for its
//!   sender or reader) records the instant it finished, after its commit.
//!   The user reads from the primary until the horizon passes that instant.
//!   No timing assumption is involved: a paused or stalled replica keeps
//!   its writers on the primary for as long as it takes. (The insert
//!   position rather than the write position covers commits made with
//!   `synchronous_commit = off`, acknowledged before their WAL is written.)
//!
//! Other users may see a change later, by up to the lag bound (plus a probe
//! interval), which is the point of a replica. A refusal read from the
//! replica (`403`/`404`: maybe the caller was added to the conversation a
//! moment ago) and a replica that fails mid-read are retried on the primary
//! ([`Reads::retry_on_primary`]), so staleness never shows as an error.
//!
//! All of this is per origin instance: see "Read replicas" in
//! docs/ARCHITECTURE.md for what holds with several.

use std::collections::{HashMap, VecDeque};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::error::ApiError;

/// How often the replica's position and lag are measured.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// A probe that takes longer counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A measurement older than this is not trusted (the probe task is stuck
/// or gone); reads go to the primary until a new one arrives.
pub const STALE_AFTER: Duration = Duration::from_secs(3);
/// How long a read waits for a replica connection before it takes the
/// primary instead: an unreachable replica must not cost each read the
/// primary pool's five seconds.
const REPLICA_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Users tracked as recent writers; past this, everyone counts as one
/// until the replica catches up (memory stays bounded if it stalls).
const MAX_WRITERS: usize = 100_000;
/// Probe samples kept while the replica is behind them; the oldest go
/// first, which only delays the horizon.
const MAX_SAMPLES: usize = 4_096;

/// Where a read ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica,
}

impl Target {
    /// The `target` label of `chat_db_reads_total` (two values only).
    fn label(self) -> &'static str {
        match self {
            Target::Primary => "primary",
            Target::Replica => "replica",
        }
    }
}

/// Why a read went to the primary although a replica is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No probe has finished yet.
    Unknown,
    /// The last probe is older than [`STALE_AFTER`].
    Stale,
    /// The last probe, or a read, could not reach the replica (or the
    /// primary, without which the lag is unknown).
    Down,
    /// The replica is not in recovery: promoted, or not a replica at all.
    NotStandby,
    /// Behind by more than the bound, or by an unknown amount.
    Lagging,
    /// The caller wrote something the replica may not have yet.
    OwnWrite,
}

/// Where a read should go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Replica,
    Primary(Reason),
}

/// The primary's WAL positions (bytes) at the start of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryPosition {
    /// `pg_current_wal_lsn()`: written out, so sent to the replica soon.
    pub write: i64,
    /// `pg_current_wal_insert_lsn()`: at or past every acknowledged commit.
    pub insert: i64,
}

/// What a probe saw on the replica.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// `pg_last_wal_replay_lsn()`, in bytes.
    pub replay: Option<i64>,
    /// The replica's clock minus `pg_last_xact_replay_timestamp()`.
    pub replay_age: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ProbeState {
    Down,
    NotStandby,
    /// `lag` is `None` when WAL is pending and no commit was replayed yet.
    Up {
        lag: Option<Duration>,
    },
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    at: Instant,
    state: ProbeState,
}

/// The decision's state and its pure logic: no I/O and no clock of its
/// own (every instant is passed in), so it is tested directly.
#[derive(Debug)]
pub struct Tracker {
    max_lag: Duration,
    last: Option<Probe>,
    /// (start, primary insert position) of the probes the replica has not
    /// replayed up to yet, oldest first.
    samples: VecDeque<(Instant, i64)>,
    /// Every commit acknowledged before this instant is on the replica.
    horizon: Option<Instant>,
    last_replay: Option<i64>,
    /// When each recent writer's latest write finished.
    writers: HashMap<i64, Instant>,
    /// Every user counts as having written at this instant (the writer map
    /// overflowed, or the replica went back in the WAL).
    everyone: Option<Instant>,
    /// Probes that reached both servers so far.
    probes: u64,
}

impl Tracker {
    pub fn new(max_lag: Duration) -> Self {
        Self {
            max_lag,
            last: None,
            samples: VecDeque::new(),
            horizon: None,
            last_replay: None,
            writers: HashMap::new(),
            everyone: None,
            probes: 0,
        }
    }

    /// `user` finished a write at `now` (after its commit).
    pub fn wrote(&mut self, user: i64, now: Instant) {
        if self.writers.len() >= MAX_WRITERS && !self.writers.contains_key(&user) {
            // Everyone in the map wrote at or before `now`, so one instant
            // for everybody covers them all.
            self.everyone = Some(self.everyone.map_or(now, |e| e.max(now)));
            self.writers.clear();
            return;
        }
        let at = self.writers.entry(user).or_insert(now);
        *at = (*at).max(now);
    }

    /// A probe that started at `at` found `primary` there and `replica`;
    /// returns the lag it measured (`None`: unknown, or not a replica).
    pub fn observe(
        &mut self,
        at: Instant,
        primary: PrimaryPosition,
        replica: Observation,
    ) -> Option<Duration> {
        self.probes += 1;
        let replay = match replica.replay {
            Some(replay) if replica.in_recovery => replay,
            _ => {
                self.last = Some(Probe {
                    at,
                    state: ProbeState::NotStandby,
                });
                return None;
            }
        };
        if self.last_replay.is_some_and(|before| replay < before) {
            // Another server behind the same address (a rebuilt replica):
            // what the horizon promised may not hold there. Everyone who
            // wrote before now reads from the primary until it catches up.
            self.samples.clear();
            self.horizon = None;
            self.everyone = Some(at);
        }
        self.last_replay = Some(replay);
        self.samples.push_back((at, primary.insert));
        if self.samples.len() > MAX_SAMPLES {
            self.samples.pop_front();
        }
        // Positions only grow with time, so the samples the replica has
        // passed are a prefix.
        while let Some(&(when, position)) = self.samples.front() {
            if position > replay {
                break;
            }
            self.horizon = Some(self.horizon.map_or(when, |h| h.max(when)));
            self.samples.pop_front();
        }
        if let Some(horizon) = self.horizon {
            self.writers.retain(|_, wrote| *wrote >= horizon);
            if self.everyone.is_some_and(|e| e < horizon) {
                self.everyone = None;
            }
        }
        // Nothing pending: caught up, however old the last replayed commit.
        let lag = if replay >= primary.write {
            Some(Duration::ZERO)
        } else {
            replica.replay_age
        };
        self.last = Some(Probe {
            at,
            state: ProbeState::Up { lag },
        });
        lag
    }

    /// The replica (or the primary, for the probe) could not be reached at
    /// `now`: reads go to the primary until a probe succeeds.
    pub fn failed(&mut self, now: Instant) {
        self.last = Some(Probe {
            at: now,
            state: ProbeState::Down,
        });
    }

    /// Where a read by `user` at `now` should go.
    pub fn choose(&self, user: i64, now: Instant) -> Choice {
        let Some(probe) = self.last else {
            return Choice::Primary(Reason::Unknown);
        };
        let lag = match probe.state {
            ProbeState::Down => return Choice::Primary(Reason::Down),
            ProbeState::NotStandby => return Choice::Primary(Reason::NotStandby),
            ProbeState::Up { lag } => lag,
        };
        if now.saturating_duration_since(probe.at) > STALE_AFTER {
            return Choice::Primary(Reason::Stale);
        }
        if lag.is_none_or(|lag| lag > self.max_lag) {
            return Choice::Primary(Reason::Lagging);
        }
        let wrote = match (self.writers.get(&user).copied(), self.everyone) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if let Some(wrote) = wrote {
            if self.horizon.is_none_or(|horizon| wrote >= horizon) {
                return Choice::Primary(Reason::OwnWrite);
            }
        }
        Choice::Replica
    }

    /// The last probe's view, for tests and logs.
    pub fn status(&self) -> Status {
        let (up, lag) = match self.last.map(|p| p.state) {
            Some(ProbeState::Up { lag }) => (true, lag),
            _ => (false, None),
        };
        Status {
            up,
            lag,
            writers: self.writers.len(),
            probes: self.probes,
        }
    }
}

/// What the last probe concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// The replica answered, in recovery.
    pub up: bool,
    /// How far behind it was (`None` when down or unknown).
    pub lag: Option<Duration>,
    /// Users currently held on the primary by their own writes.
    pub writers: usize,
    /// Probes that reached both servers so far.
    pub probes: u64,
}

/// Reads served so far by this instance, per target (only counted with a
/// replica configured, like `chat_db_reads_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Served {
    pub primary: u64,
    pub replica: u64,
}

/// Hands out connections for reads: the replica's when it is fit for the
/// caller, else the primary's. Cheap to clone.
#[derive(Clone)]
pub struct Reads {
    primary: Pool,
    replica: Option<Arc<Replica>>,
}

struct Replica {
    pool: Pool,
    /// The probe's own connections are made from these.
    primary_config: tokio_postgres::Config,
    replica_config: tokio_postgres::Config,
    tracker: Mutex<Tracker>,
    served_primary: AtomicU64,
    served_replica: AtomicU64,
}

impl std::fmt::Debug for Reads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reads")
            .field("replica", &self.replica.is_some())
            .finish_non_exhaustive()
    }
}

impl Replica {
    fn tracker(&self) -> MutexGuard<'_, Tracker> {
        // The tracker stays consistent even if a holder panicked: each
        // method leaves it valid before anything can panic.
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, target: Target) {
        let counter = match target {
            Target::Primary => &self.served_primary,
            Target::Replica => &self.served_replica,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("chat_db_reads_total", "target" => target.label()).increment(1);
    }
}

impl Reads {
    /// Every read from `primary` (no `DATABASE_READ_URL`).
    pub fn primary_only(primary: Pool) -> Self {
        Self {
            primary,
            replica: None,
        }
    }

    /// Reads from the replica at `read_url` when it is fit, else from
    /// `primary` (whose URL the probe connects to). Connects to nothing
    /// yet: a replica that is down at start-up only means primary reads.
    pub fn with_replica(
        primary: Pool,
        primary_url: &str,
        read_url: &str,
        max_lag: Duration,
        pool_size: usize,
    ) -> anyhow::Result<Self> {
        let mut primary_config: tokio_postgres::Config =
            primary_url.parse().context("parse DATABASE_URL")?;
        let mut replica_config: tokio_postgres::Config =
            read_url.parse().context("parse DATABASE_READ_URL")?;
        for config in [&mut primary_config, &mut replica_config] {
            config.connect_timeout(PROBE_TIMEOUT);
            config.application_name("vibe-origin replica probe");
        }
        let mut pool_config = replica_config.clone();
        pool_config.connect_timeout(REPLICA_CONNECT_TIMEOUT);
        pool_config.application_name("vibe-origin");
        let manager = Manager::from_config(
            pool_config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(REPLICA_CONNECT_TIMEOUT))
            .create_timeout(Some(REPLICA_CONNECT_TIMEOUT))
            .recycle_timeout(Some(REPLICA_CONNECT_TIMEOUT))
            .build()
            .context("build the replica pool")?;
        Ok(Self {
            primary,
            replica: Some(Arc::new(Replica {
                pool,
                primary_config,
                replica_config,
                tracker: Mutex::new(Tracker::new(max_lag)),
                served_primary: AtomicU64::new(0),
                served_replica: AtomicU64::new(0),
            })),
        })
    }

    /// True when a replica is configured.
    pub fn has_replica(&self) -> bool {
        self.replica.is_some()
    }

    /// A connection for a read on behalf of `user_id`: the replica's when
    /// [`Tracker::choose`] allows it and one can be had at once, else the
    /// primary's.
    pub async fn get_for(&self, user_id: i64) -> Result<ReadClient, PoolError> {
        let Some(replica) = &self.replica else {
            // Counted here too, so the read rate is on the dashboard
            // whether or not a replica takes part.
            metrics::counter!("chat_db_reads_total", "target" => Target::Primary.label())
                .increment(1);
            return Ok(ReadClient {
                client: self.primary.get().await?,
                target: Target::Primary,
            });
        };
        let choice = replica.tracker().choose(user_id, Instant::now());
        if choice == Choice::Replica {
            match replica.pool.get().await {
                Ok(client) => {
                    replica.count(Target::Replica);
                    return Ok(ReadClient {
                        client,
                        target: Target::Replica,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "read replica unreachable; reading from the primary");
                    replica.tracker().failed(Instant::now());
                }
            }
        }
        self.primary().await
    }

    /// A primary connection for a read (counted as one).
    pub async fn primary(&self) -> Result<ReadClient, PoolError> {
        let client = self.primary.get().await?;
        if let Some(replica) = &self.replica {
            replica.count(Target::Primary);
        }
        Ok(ReadClient {
            client,
            target: Target::Primary,
        })
    }

    /// `user_id`'s write just finished (committed): their reads go to the
    /// primary until the replica has it.
    pub fn wrote(&self, user_id: i64) {
        self.wrote_all([user_id]);
    }

    /// [`Reads::wrote`] for each of `users`.
    pub fn wrote_all(&self, users: impl IntoIterator<Item = i64>) {
        if let Some(replica) = &self.replica {
            let now = Instant::now();
            let mut tracker = replica.tracker();
            for user in users {
                tracker.wrote(user, now);
            }
        }
    }

    /// Whether a read that failed with `error` on `client` should be done
    /// again on the primary: a refusal may only mean the replica has not
    /// seen the change that allows it yet, and a replica that fails
    /// mid-read is as good as unreachable (it is then avoided until the
    /// next good probe).
    pub fn retry_on_primary(&self, client: &ReadClient, error: &ApiError) -> bool {
        if client.target != Target::Replica {
            return false;
        }
        let source = match error {
            ApiError::Forbidden(_) | ApiError::NotFound(_) => return true,
            ApiError::Unavailable(source) | ApiError::Internal(source) => source,
            _ => return false,
        };
        match source
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::code)
        {
            // A statement timeout: the primary would take as long.
            Some(code) if *code == SqlState::QUERY_CANCELED => false,
            // The replica answered with an error, such as a query cancelled
            // by a conflict with recovery: it is still up.
            Some(_) => true,
            // No answer: the connection broke.
            None => {
                if let Some(replica) = &self.replica {
                    tracing::warn!(error = %error, "read failed on the replica; retrying on the primary");
                    replica.tracker().failed(Instant::now());
                }
                true
            }
        }
    }

    /// Reads served so far by this instance.
    pub fn served(&self) -> Served {
        self.replica
            .as_ref()
            .map_or_else(Served::default, |r| Served {
                primary: r.served_primary.load(Ordering::Relaxed),
                replica: r.served_replica.load(Ordering::Relaxed),
            })
    }

    /// The last probe's view; `None` without a replica.
    pub fn status(&self) -> Option<Status> {
        self.replica.as_ref().map(|r| r.tracker().status())
    }
}

/// A pooled connection and where it leads.
pub struct ReadClient {
    client: deadpool_postgres::Client,
    target: Target,
}

impl ReadClient {
    pub fn target(&self) -> Target {
        self.target
    }
}

impl std::fmt::Debug for ReadClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadClient")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Deref for ReadClient {
    type Target = deadpool_postgres::Client;

    fn deref(&self) -> &Self::Target {
        &self.client
    }
}

impl DerefMut for ReadClient {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.client
    }
}

/// Filled by [`crate::auth::AuthUser`] with the caller's id, so that
/// [`track_writes`] learns after the handler ran whose request it was.
#[derive(Debug, Clone, Default)]
pub struct WriterSlot(Arc<OnceLock<i64>>);

impl WriterSlot {
    pub fn fill(&self, user_id: i64) {
        // A second extraction in one request names the same user.
        let _ = self.0.set(user_id);
    }
}

/// Middleware (installed only with a replica): every authenticated request
/// that is not GET, HEAD or OPTIONS counts as a write by its caller, noted
/// once its response is ready, which is after the handler's commit. Every
/// REST write route, present and future, is covered without each handler
/// having to remember; the cost of counting a request that wrote nothing
/// is a few primary reads.
pub async fn track_writes(State(reads): State<Reads>, mut req: Request, next: Next) -> Response {
    if req.method().is_safe() {
        return next.run(req).await;
    }
    let slot = WriterSlot::default();
    req.extensions_mut().insert(slot.clone());
    let response = next.run(req).await;
    if let Some(&user) = slot.0.get() {
        reads.wrote(user);
    }
    response
}

/// The probe task: measures the replica every [`PROBE_EVERY`] until
/// aborted. Returns at once without a replica.
pub async fn watch(reads: Reads) {
    let Some(replica) = reads.replica else {
        return;
    };
    let mut connections = ProbeConnections::default();
    let mut every = tokio::time::interval(PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_up = None;
    loop {
        every.tick().await;
        let at = Instant::now();
        let probed = tokio::time::timeout(PROBE_TIMEOUT, probe(&replica, &mut connections)).await;
        let probed = match probed {
            Ok(Ok(probed)) => Ok(probed),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                // A half-open connection would hang every later probe too.
                connections = ProbeConnections::default();
                Err(anyhow::anyhow!("the probe took over {PROBE_TIMEOUT:?}"))
            }
        };
        let up = match probed {
            Ok((primary, observation)) => {
                let lag = replica.tracker().observe(at, primary, observation);
                // +Inf whenever the lag cannot be measured (here, and when
                // the probe fails below), so that a lag alert also fires
                // for a replica that is gone.
                metrics::gauge!("chat_db_replica_lag_seconds")
                    .set(lag.map_or(f64::INFINITY, |l| l.as_secs_f64()));
                if !observation.in_recovery && was_up != Some(false) {
                    tracing::warn!(
                        "DATABASE_READ_URL is not in recovery (promoted, or not a replica); \
                         reading from the primary"
                    );
                }
                observation.in_recovery
            }
            Err(e) => {
                replica.tracker().failed(at);
                metrics::gauge!("chat_db_replica_lag_seconds").set(f64::INFINITY);
                if was_up != Some(false) {
                    tracing::warn!(error = %e, "read replica probe failed; reading from the primary");
                }
                false
            }
        };
        if up && was_up == Some(false) {
            tracing::info!("read replica back");
        }
        metrics::gauge!("chat_db_replica_up").set(if up { 1.0 } else { 0.0 });
        was_up = Some(up);
    }
}

#[derive(Default)]
struct ProbeConnections {
    primary: Option<tokio_postgres::Client>,
    replica: Option<tokio_postgres::Client>,
}

/// The probe's connection in `slot`, (re)connected when needed.
async fn connected<'a>(
    slot: &'a mut Option<tokio_postgres::Client>,
    config: &tokio_postgres::Config,
) -> anyhow::Result<&'a tokio_postgres::Client> {
    if slot.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
        *slot = None;
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            // Ends when the server goes away; the next probe reconnects.
            let _ = connection.await;
        });
        *slot = Some(client);
    }
    slot.as_ref().context("probe connection")
}

/// One measurement: the primary's positions first, then the replica's, so
/// that whatever the primary had acknowledged at `at` is covered.
async fn probe(
    replica: &Replica,
    connections: &mut ProbeConnections,
) -> anyhow::Result<(PrimaryPosition, Observation)> {
    let primary = connected(&mut connections.primary, &replica.primary_config)
        .await
        .context("connect to the primary")?;
    let row = primary
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8,
                    pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::int8",
            &[],
        )
        .await
        .context("read the primary's WAL position")?;
    let position = PrimaryPosition {
        write: row.get(0),
        insert: row.get(1),
    };
    let standby = connected(&mut connections.replica, &replica.replica_config)
        .await
        .context("connect to the replica")?;
    let row = standby
        .query_one(
            "SELECT pg_is_in_recovery(),
                    pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::int8,
                    EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8",
            &[],
        )
        .await
        .context("read the replica's replay position")?;
    let age: Option<f64> = row.get(2);
    let observation = Observation {
        in_recovery: row.get(0),
        replay: row.get(1),
        // The two servers' clocks may disagree a little: never negative.
        replay_age: age
            .map(|secs| Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)),
    };
    Ok((position, observation))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + MS * ms as u32
    }

    fn primary(write: i64, insert: i64) -> PrimaryPosition {
        PrimaryPosition { write, insert }
    }

    fn replay(position: i64, age_ms: Option<u64>) -> Observation {
        Observation {
            in_recovery: true,
            replay: Some(position),
            replay_age: age_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn nothing_goes_to_the_replica_before_the_first_probe() {
        let t0 = Instant::now();
        let tracker = Tracker::new(2000 * MS);
        assert_eq!(tracker.choose(1, t0), Choice::Primary(Reason::Unknown));
        assert!(!tracker.status().up);
    }

    #[test]
    fn a_caught_up_replica_serves_everyone_however_old_its_last_commit() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(2000 * MS);
        // An idle primary: the last replayed commit is an hour old, but the
        // replica has everything the primary wrote.
        let lag = tracker.observe(t0, primary(100, 100), replay(100, Some(3_600_000)));
        assert_eq!(lag, Some(Duration::ZERO));
        assert_eq!(tracker.choose(1, at(t0, 10)), Choice::Replica);
        assert_eq!(tracker.status().lag, Some(Duration::ZERO));
    }

    #[test]
    fn with_wal_pending_the_lag_is_the_age_of_the_last_replayed_commit() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(2000 * MS);
        assert_eq!(
            tracker.observe(t0, primary(200, 200), replay(100, Some(1500))),
            Some(1500 * MS)
        );
        assert_eq!(tracker.choose(1, at(t0, 10)), Choice::Replica);
        tracker.observe(at(t0, 500), primary(300, 300), replay(100, Some(2500)));
        assert_eq!(
            tracker.choose(1, at(t0, 510)),
            Choice::Primary(Reason::Lagging)
        );
        // Pending with no commit replayed at all: unknown, so not trusted.
        tracker.observe(at(t0, 1000), primary(300, 300), replay(100, None));
        assert_eq!(
            tracker.choose(1, at(t0, 1010)),
            Choice::Primary(Reason::Lagging)
        );
        // Caught up again.
        tracker.observe(at(t0, 1500), primary(300, 300), replay(300, None));
        assert_eq!(tracker.choose(1, at(t0, 1510)), Choice::Replica);
    }

    #[test]
    fn a_down_stale_or_promoted_replica_is_not_used() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(2000 * MS);
        tracker.observe(t0, primary(1, 1), replay(1, None));
        assert_eq!(
            tracker.choose(1, t0 + STALE_AFTER + MS),
            Choice::Primary(Reason::Stale)
        );
        tracker.failed(at(t0, 100));
        assert_eq!(
            tracker.choose(1, at(t0, 110)),
            Choice::Primary(Reason::Down)
        );
        let promoted = Observation {
            in_recovery: false,
            replay: None,
            replay_age: None,
        };
        assert_eq!(tracker.observe(at(t0, 200), primary(1, 1), promoted), None);
        assert_eq!(
            tracker.choose(1, at(t0, 210)),
            Choice::Primary(Reason::NotStandby)
        );
        tracker.observe(at(t0, 300), primary(1, 1), replay(1, None));
        assert_eq!(tracker.choose(1, at(t0, 310)), Choice::Replica);
    }

    #[test]
    fn a_writer_reads_from_the_primary_until_the_replica_has_replayed_past_their_write() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(2000 * MS);
        tracker.observe(t0, primary(100, 100), replay(100, None));
        // User 1 writes at 50 ms; the primary is then at 150.
        tracker.wrote(1, at(t0, 50));
        assert_eq!(
            tracker.choose(1, at(t0, 60)),
            Choice::Primary(Reason::OwnWrite)
        );
        assert_eq!(tracker.choose(2, at(t0, 60)), Choice::Replica);
        // A probe at 500 ms samples 150, but the replica is at 120 (paused,
        // say): within the lag bound, so others still read there.
        tracker.observe(at(t0, 500), primary(150, 150), replay(120, Some(100)));
        assert_eq!(
            tracker.choose(1, at(t0, 510)),
            Choice::Primary(Reason::OwnWrite)
        );
        assert_eq!(tracker.choose(2, at(t0, 510)), Choice::Replica);
        assert_eq!(tracker.status().writers, 1);
        // However long it takes: still the primary while it is behind.
        for i in 1..10 {
            tracker.observe(
                at(t0, 500 + i * 500),
                primary(150, 150),
                replay(120, Some(100)),
            );
        }
        assert_eq!(
            tracker.choose(1, at(t0, 5100)),
            Choice::Primary(Reason::OwnWrite)
        );
        // The replica reaches 150, sampled at 500 ms, after the write.
        tracker.observe(at(t0, 5500), primary(150, 150), replay(150, None));
        assert_eq!(tracker.choose(1, at(t0, 5510)), Choice::Replica);
        assert_eq!(tracker.status().writers, 0, "pruned once covered");
    }

    #[test]
    fn a_write_after_the_probe_started_is_not_covered_by_it() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(2000 * MS);
        tracker.observe(t0, primary(100, 100), replay(100, None));
        // The write finishes after the probe's start: the probe's sample
        // may not include it, even though the replica reached the sample.
        tracker.wrote(1, at(t0, 501));
        tracker.observe(at(t0, 500), primary(100, 100), replay(100, None));
        assert_eq!(
            tracker.choose(1, at(t0, 600)),
            Choice::Primary(Reason::OwnWrite)
        );
        tracker.observe(at(t0, 1000), primary(130, 130), replay(130, None));
        assert_eq!(tracker.choose(1, at(t0, 1010)), Choice::Replica);
    }

    #[test]
    fn the_horizon_uses_the_insert_position_and_the_lag_the_write_position() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(2000 * MS);
        tracker.wrote(1, at(t0, 0));
        // Written out to 100 (replayed), but an asynchronous commit is
        // inserted up to 110: not lagging, yet not covering the write.
        let lag = tracker.observe(at(t0, 10), primary(100, 110), replay(100, Some(9000)));
        assert_eq!(lag, Some(Duration::ZERO));
        assert_eq!(
            tracker.choose(1, at(t0, 20)),
            Choice::Primary(Reason::OwnWrite)
        );
        assert_eq!(tracker.choose(2, at(t0, 20)), Choice::Replica);
        tracker.observe(at(t0, 500), primary(110, 110), replay(110, None));
        assert_eq!(tracker.choose(1, at(t0, 510)), Choice::Replica);
    }

    #[test]
    fn too_many_writers_make_everyone_a_writer_until_the_replica_catches_up() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(2000 * MS);
        tracker.observe(t0, primary(10, 10), replay(10, None));
        for user in 0..MAX_WRITERS as i64 {
            tracker.wrote(user, at(t0, 1));
        }
        assert_eq!(tracker.status().writers, MAX_WRITERS);
        tracker.wrote(-1, at(t0, 2));
        assert_eq!(tracker.status().writers, 0, "the map is bounded");
        for user in [-1, 0, 7, 123_456_789] {
            assert_eq!(
                tracker.choose(user, at(t0, 3)),
                Choice::Primary(Reason::OwnWrite),
                "{user}"
            );
        }
        tracker.observe(at(t0, 500), primary(20, 20), replay(20, None));
        tracker.observe(at(t0, 1000), primary(20, 20), replay(20, None));
        assert_eq!(tracker.choose(7, at(t0, 1010)), Choice::Replica);
    }

    #[test]
    fn a_replica_that_goes_back_in_the_wal_resets_read_your_writes() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(2000 * MS);
        tracker.observe(t0, primary(100, 100), replay(100, None));
        tracker.wrote(1, at(t0, 50));
        tracker.observe(at(t0, 500), primary(100, 100), replay(100, None));
        assert_eq!(tracker.choose(1, at(t0, 510)), Choice::Replica);
        // Another server, behind: user 1's write may be missing there, and
        // so may anyone's before now.
        tracker.observe(at(t0, 1000), primary(100, 100), replay(60, Some(10)));
        assert_eq!(
            tracker.choose(1, at(t0, 1010)),
            Choice::Primary(Reason::OwnWrite)
        );
        assert_eq!(
            tracker.choose(2, at(t0, 1010)),
            Choice::Primary(Reason::OwnWrite)
        );
        tracker.observe(at(t0, 1500), primary(100, 100), replay(100, None));
        assert_eq!(tracker.choose(2, at(t0, 1510)), Choice::Replica);
    }
}
