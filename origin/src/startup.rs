//! Building and running the application.
//!
//! [`Application::build`] does everything that can fail at start-up
//! (configuration, migrations, binding) before [`Application::run`] serves,
//! so a bad deployment fails loudly instead of half-starting. Tests build it
//! on port 0 and read [`Application::port`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::state::{AppState, Keys};

#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    state: AppState,
}

impl Application {
    /// Connects, migrates, and binds.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let pool = crate::db::pool(&config.database_url, config.db_pool_size)?;
        crate::db::migrate(&pool)
            .await
            .context("migrate the database")?;
        // A real hash of a random password, for constant-time logins.
        let dummy_hash = tokio::task::spawn_blocking(|| {
            crate::auth::hash_password(&uuid::Uuid::now_v7().to_string())
        })
        .await
        .context("hash the login guard")??;
        let reads = match &config.database_read_url {
            None => crate::replica::Reads::primary_only(pool.clone()),
            Some(read_url) => crate::replica::Reads::with_replica(
                pool.clone(),
                &config.database_url,
                read_url,
                config.database_read_max_lag,
                config.db_pool_size,
            )?,
        };
        let state = AppState {
            pool,
            reads,
            keys: Arc::new(Keys {
                jwt_secret: config.jwt_secret.clone(),
                service_secret: config.service_secret.clone(),
                dummy_hash,
            }),
            metrics: crate::metrics::handle(),
            figures: Arc::default(),
            edge_figures: Arc::default(),
            access_ttl: config.access_token_ttl,
            refresh_ttl: config.refresh_token_ttl,
            login_guard: Arc::default(),
            hasher: Arc::new(crate::hashing::Hasher::new(
                config.hash_concurrency,
                config.hash_wait,
            )),
            edge: crate::edge::EdgeNotifier::new(config.edge_url.clone(), &config.service_secret),
            push: crate::push::Push::new(&config.push).context("set up Web Push")?,
            media: crate::media::Media::new(
                config.media.clone(),
                config.edge_url.as_deref(),
                &config.service_secret,
            ),
        };
        if state.push.enabled() {
            tracing::info!(
                loopback = config.push.allow_loopback,
                "push notifications on"
            );
        }
        let mut router = crate::http::app(state.clone(), &config);
        if state.reads.has_replica() {
            // Outermost, so it sees each request's final response (after
            // the handler's commit).
            router = router.layer(axum::middleware::from_fn_with_state(
                state.reads.clone(),
                crate::replica::track_writes,
            ));
            tracing::info!(
                max_lag_ms = config.database_read_max_lag.as_millis() as u64,
                "read replica configured"
            );
        }
        let listener = TcpListener::bind(config.bind_addr)
            .await
            .with_context(|| format!("bind {}", config.bind_addr))?;
        Ok(Self {
            listener,
            router,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// The shared state (tests and tools use its pool).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests
    /// and the push sends in flight (at most [`PUSH_STOP_WAIT`]).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let sweeper = tokio::spawn(sweep_sessions(self.state.clone()));
        // Ends at once without a replica.
        let replica_probe = tokio::spawn(crate::replica::watch(self.state.reads.clone()));
        // Processing and cleanup are idempotent and leased, so a stop in
        // the middle only leaves rows that come due again.
        let media_worker = tokio::spawn(crate::media::worker::run(
            self.state.pool.clone(),
            self.state.media.clone(),
        ));
        let media_cleanup = tokio::spawn(crate::media::worker::cleanup(
            self.state.pool.clone(),
            self.state.media.clone(),
        ));
        let (stop_push, stopped) = tokio::sync::watch::channel(false);
        let pusher = tokio::spawn(crate::push::worker::run(
            self.state.pool.clone(),
            self.state.push.clone(),
            stopped,
        ));
        // With the peer address: the login guard counts per client address
        // (see `crate::auth::ClientAddr`).
        let app = self
            .router
            .into_make_service_with_connect_info::<SocketAddr>();
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        sweeper.abort();
        replica_probe.abort();
        media_worker.abort();
        media_cleanup.abort();
        // The worker finishes the round it is in (each send is bounded),
        // so a graceful stop sends nothing twice; past the wait, its
        // leases run out and another start sends those jobs.
        let _ = stop_push.send(true);
        let mut pusher = pusher;
        if tokio::time::timeout(PUSH_STOP_WAIT, &mut pusher)
            .await
            .is_err()
        {
            pusher.abort();
            tracing::warn!("push sends still in flight at shutdown; their jobs will be retried");
        }
        served
    }
}

/// How long a stopping origin waits for the push sends in flight.
pub const PUSH_STOP_WAIT: Duration = Duration::from_secs(15);

/// How often expired refresh tokens and dead sessions are deleted.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Deletes expired refresh tokens and dead sessions now and then. Several
/// instances sweeping at once is harmless (the deletes are idempotent).
async fn sweep_sessions(state: AppState) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let swept = async {
            let client = state.pool.get().await?;
            crate::sessions::sweep(&client, state.refresh_ttl, state.access_ttl).await
        };
        match swept.await {
            Ok((tokens, sessions)) => {
                tracing::debug!(
                    tokens,
                    sessions,
                    "swept expired refresh tokens and sessions"
                );
            }
            Err(e) => tracing::warn!(
                error = %crate::error::Chain(&e),
                "session sweep failed; next try in an hour"
            ),
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
