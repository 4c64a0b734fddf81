//! The whole stack on free ports: a fresh PostgreSQL database, the origin
//! (in this process, on its own runtime thread so it can be stopped and
//! restarted), and a real `wrangler dev` (workerd) child process.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use origin::{Application, Config};
use tokio::sync::oneshot;

/// Secrets for this run only (random, never the developer's).
#[derive(Debug, Clone)]
pub struct Secrets {
    pub jwt: String,
    pub service: String,
}

impl Secrets {
    fn random() -> Self {
        Self {
            jwt: format!(
                "jwt-{}-{}",
                uuid::Uuid::now_v7().simple(),
                uuid::Uuid::now_v7().simple()
            ),
            service: format!(
                "svc-{}-{}",
                uuid::Uuid::now_v7().simple(),
                uuid::Uuid::now_v7().simple()
            ),
        }
    }
}

/// Options for [`Stack::start`].
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    /// Extra `--var NAME:VALUE` for the Worker (room tunables).
    pub vars: Vec<(String, String)>,
    /// Extra configuration for the origin (e.g. `ACCESS_TOKEN_TTL_SECS`).
    pub origin_vars: Vec<(String, String)>,
    /// Show wrangler's output (for debugging).
    pub verbose: bool,
    /// `wrangler dev --log-level` (default `warn`); the Worker's
    /// `console.log` lines need `log`.
    pub wrangler_log_level: Option<String>,
}

/// A running origin on its own runtime thread.
struct OriginProcess {
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OriginProcess {
    fn start(config: Config) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("origin".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match Application::build(config).await {
                        Ok(app) => {
                            let _ = ready_tx.send(Ok(()));
                            let stop = async {
                                let _ = shutdown_rx.await;
                            };
                            let _ = app.run(stop).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
                // Dropping the runtime cancels connections still open.
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .context("spawn the origin thread")?;
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .context("origin start-up timed out")??;
        Ok(Self {
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where `wrangler dev`'s output goes, in the stack's work directory.
const EDGE_LOG: &str = "wrangler.log";

/// How to start `wrangler dev` again, on the same port and state.
#[derive(Debug, Clone)]
struct EdgeLaunch {
    config_path: PathBuf,
    state_dir: PathBuf,
    edge_port: u16,
    inspector_port: u16,
    vars: Vec<(String, String)>,
    verbose: bool,
    log_level: String,
}

impl EdgeLaunch {
    fn spawn(&self, root: &Path, workdir: &Path) -> anyhow::Result<Child> {
        let mut cmd = Command::new(root.join("node_modules/.bin/wrangler"));
        cmd.arg("dev")
            .arg("--config")
            .arg(&self.config_path)
            .args(["--ip", "127.0.0.1", "--port", &self.edge_port.to_string()])
            .args(["--inspector-port", &self.inspector_port.to_string()])
            // Durable Object state on disk, kept across restarts of the
            // runtime (the restart tests rely on it).
            .arg("--persist-to")
            .arg(&self.state_dir)
            .args([
                "--show-interactive-dev-session=false",
                "--log-level",
                &self.log_level,
            ]);
        for (k, v) in &self.vars {
            cmd.arg("--var").arg(format!("{k}:{v}"));
        }
        cmd.current_dir(workdir)
            .env("WRANGLER_SEND_METRICS", "false")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        if !self.verbose {
            // Kept, not discarded: a test may read the edge's log lines
            // (`Stack::edge_log`).
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(workdir.join(EDGE_LOG))
                .context("open the edge's log file")?;
            cmd.stdout(log.try_clone()?).stderr(log);
        }
        // Its own process group, so that stopping it also stops workerd.
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        cmd.spawn()
            .context("start wrangler dev (npm packages installed?)")
    }
}

/// PostgreSQL + origin + `wrangler dev`.
pub struct Stack {
    pub edge: String,
    pub origin_port: u16,
    pub secrets: Secrets,
    pub pool: deadpool_postgres::Pool,
    db_url: String,
    origin_vars: Vec<(String, String)>,
    origin: Option<OriginProcess>,
    /// The origin as a child process, while a test has moved it there
    /// ([`Stack::start_origin_process`]).
    origin_child: Option<OriginChild>,
    wrangler: Child,
    launch: EdgeLaunch,
    workdir: TempDir,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("edge", &self.edge)
            .field("origin_port", &self.origin_port)
            .finish_non_exhaustive()
    }
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A port nobody is listening on right now.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(listener.local_addr()?.port())
}

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

impl Stack {
    /// Starts everything. The Worker must already be built
    /// (`cargo xtask build-edge`); this never runs a cargo build, because
    /// `cargo test` holds the build directory lock.
    pub async fn start(options: StackOptions) -> anyhow::Result<Self> {
        let root = workspace_root();
        let bundle = root.join("edge-worker/build/index.js");
        if !bundle.exists() {
            bail!(
                "{} is missing: run `cargo xtask build-edge` first",
                bundle.display()
            );
        }
        let db = format!("vibe_test_{}", uuid::Uuid::now_v7().simple());
        let (admin, conn) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls)
            .await
            .context("connect to PostgreSQL (DATABASE_URL)")?;
        tokio::spawn(conn);
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .context("create the test database")?;
        let db_url = origin::db::url_with_database(&admin_url(), &db);
        let secrets = Secrets::random();
        let origin_port = free_port()?;
        // Chosen now: the origin tells the edge about membership changes.
        let edge_port = free_port()?;
        let mut origin_vars = vec![(
            "EDGE_URL".to_owned(),
            format!("http://127.0.0.1:{edge_port}"),
        )];
        origin_vars.extend(options.origin_vars.iter().cloned());
        let origin =
            OriginProcess::start(origin_config(&db_url, origin_port, &secrets, &origin_vars)?)?;
        let pool = origin::db::pool(&db_url, 4)?;

        let workdir = TempDir::new("vibe-e2e")?;
        // The prebuilt bundle, without the [build] step (see above).
        let config_path = xtask::config_without_build(&root, workdir.path())?;
        let inspector_port = free_port()?;
        let mut vars = vec![
            (
                "ORIGIN_URL".to_owned(),
                format!("http://127.0.0.1:{origin_port}"),
            ),
            ("JWT_SECRET".to_owned(), secrets.jwt.clone()),
            ("ORIGIN_SERVICE_SECRET".to_owned(), secrets.service.clone()),
            (
                "ALLOWED_ORIGINS".to_owned(),
                format!("http://127.0.0.1:{edge_port}"),
            ),
            // As `cargo xtask dev` sets it: the browser suite may use the
            // ChatBox's demo hints.
            ("DEMO_LOGINS".to_owned(), demo_logins()),
        ];
        vars.extend(options.vars.iter().cloned());
        let launch = EdgeLaunch {
            config_path,
            state_dir: workdir.path().join("state"),
            edge_port,
            inspector_port,
            vars,
            verbose: options.verbose,
            log_level: options
                .wrangler_log_level
                .clone()
                .unwrap_or_else(|| "warn".to_owned()),
        };
        let wrangler = launch.spawn(&root, workdir.path())?;
        let mut stack = Self {
            edge: format!("http://127.0.0.1:{edge_port}"),
            origin_port,
            secrets,
            pool,
            db_url,
            origin_vars,
            origin: Some(origin),
            origin_child: None,
            wrangler,
            launch,
            workdir,
        };
        stack.wait_for_edge(Duration::from_secs(120)).await?;
        Ok(stack)
    }

    async fn wait_for_edge(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        let url = format!("{}/api/v1/edge/health", self.edge);
        while Instant::now() < deadline {
            if let Some(status) = self.wrangler.try_wait()? {
                bail!("wrangler dev exited early ({status})");
            }
            if let Ok(res) = client.get(&url).send().await {
                if res.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("wrangler dev did not become ready within {timeout:?}")
    }

    /// Resident memory (KiB) of the workerd processes serving the edge
    /// (wrangler runs them in its process group).
    pub fn workerd_rss_kib(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for pid in self.workerd_pids()? {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            total += status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        Ok(total)
    }

    /// The workerd processes of this dev server: (pid).
    fn workerd_pids(&self) -> anyhow::Result<Vec<u32>> {
        let group = self.wrangler.id();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").context("read /proc")? {
            let Ok(entry) = entry else { continue };
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((head, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let pgrp = rest
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<u32>().ok());
            if head.ends_with("(workerd") && pgrp == Some(group) {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    /// The URL of the workerd runtime itself, behind wrangler dev's local
    /// proxy. Benchmarks with thousands of sockets use it: the proxy spends
    /// six file descriptors per WebSocket (two sockets, four pipes), which
    /// a 20,000-descriptor limit caps at about 3,300 connections. The
    /// Worker code and Durable Objects are the same on both paths.
    pub async fn runtime_url(&self) -> anyhow::Result<String> {
        let edge_port: u16 = self
            .edge
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("edge port")?;
        let tcp = std::fs::read_to_string("/proc/net/tcp").context("read /proc/net/tcp")?;
        let client = reqwest::Client::new();
        for pid in self.workerd_pids()? {
            let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter_map(|e| std::fs::read_link(e.path()).ok())
                        .filter_map(|l| {
                            l.to_string_lossy()
                                .strip_prefix("socket:[")
                                .map(|s| s.trim_end_matches(']').to_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            for line in tcp.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                // local_address, state 0A (LISTEN), inode
                if cols.len() < 10 || cols[3] != "0A" || !inodes.iter().any(|i| i == cols[9]) {
                    continue;
                }
                let Some(port) = cols[1]
                    .rsplit(':')
                    .next()
                    .and_then(|h| u16::from_str_radix(h, 16).ok())
                else {
                    continue;
                };
                if port == edge_port {
                    continue;
                }
                let url = format!("http://127.0.0.1:{port}");
                let healthy = client
                    .get(format!("{url}/api/v1/edge/health"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if healthy {
                    return Ok(url);
                }
            }
        }
        bail!("no workerd runtime port found behind the dev proxy")
    }

    /// Kills the edge runtime the hard way: SIGKILL to wrangler and every
    /// workerd process, with no chance to flush or close anything. Durable
    /// Object state stays on disk for [`Stack::start_edge`].
    /// Where `wrangler dev` keeps the Durable Objects' SQLite and the
    /// bucket, for tests that check what is (not) on disk.
    pub fn edge_state_dir(&self) -> &Path {
        &self.launch.state_dir
    }

    pub fn kill_edge(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.wrangler.id())])
            .status();
        let _ = self.wrangler.wait();
    }

    /// `GET /metrics` on the origin itself, as Prometheus scrapes it (the
    /// edge has no route to it).
    pub async fn scrape_origin(&self) -> anyhow::Result<String> {
        let res = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/metrics", self.origin_port))
            .send()
            .await
            .context("scrape the origin")?;
        if res.status() != 200 {
            bail!("origin /metrics: {}", res.status());
        }
        Ok(res.text().await?)
    }

    /// What `wrangler dev` printed so far: the Worker's log lines among
    /// its own (empty when the stack runs verbose, printing to the
    /// terminal instead).
    pub fn edge_log(&self) -> String {
        std::fs::read_to_string(self.workdir.path().join(EDGE_LOG)).unwrap_or_default()
    }

    /// Starts `wrangler dev` again on the same port and the same state.
    pub async fn start_edge(&mut self) -> anyhow::Result<()> {
        let root = workspace_root();
        // The killed runtime's port may linger briefly.
        let mut last = None;
        for _ in 0..5 {
            self.wrangler = self.launch.spawn(&root, self.workdir.path())?;
            match self.wait_for_edge(Duration::from_secs(120)).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = Some(e);
                    self.kill_edge();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("the edge did not restart")))
    }

    /// Stops the origin (its port then refuses connections).
    pub fn stop_origin(&mut self) {
        if let Some(mut o) = self.origin.take() {
            o.stop();
        }
    }

    /// Starts the origin again on the same port and database.
    pub fn start_origin(&mut self) -> anyhow::Result<()> {
        if self.origin.is_none() {
            let config = origin_config(
                &self.db_url,
                self.origin_port,
                &self.secrets,
                &self.origin_vars,
            )?;
            // The old listener may linger for a moment; retry the bind.
            let mut last = None;
            for _ in 0..20 {
                match OriginProcess::start(config.clone()) {
                    Ok(o) => {
                        self.origin = Some(o);
                        return Ok(());
                    }
                    Err(e) => {
                        last = Some(e);
                        std::thread::sleep(Duration::from_millis(250));
                    }
                }
            }
            return Err(last.unwrap_or_else(|| anyhow::anyhow!("origin did not restart")));
        }
        Ok(())
    }
}

/// The environment variable that makes a test binary serve as the origin
/// (see [`serve_origin_if_asked`]); its value is the configuration, a JSON
/// list of `[name, value]` pairs.
const ORIGIN_CHILD_ENV: &str = "VIBE_E2E_ORIGIN_CHILD";
/// Set for an origin child whose log lines a test reads.
const ORIGIN_CHILD_LOG_ENV: &str = "VIBE_E2E_ORIGIN_CHILD_LOG";

/// The origin in a child process of its own.
struct OriginChild {
    child: Child,
    /// Held open: the child exits when it reads end-of-file, so it never
    /// outlives this process however this process ends.
    _stdin: Option<std::process::ChildStdin>,
}

/// In a test binary started by [`Stack::start_origin_process`]: serves the
/// origin until killed (or until its parent goes away) and returns the exit
/// code. Otherwise `None`, at once. A suite that moves its origin into a
/// process calls this first thing in `main`.
pub async fn serve_origin_if_asked() -> Option<std::process::ExitCode> {
    let raw = std::env::var(ORIGIN_CHILD_ENV).ok()?;
    Some(match serve_origin_child(&raw).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("origin child: {e:#}");
            std::process::ExitCode::FAILURE
        }
    })
}

async fn serve_origin_child(raw: &str) -> anyhow::Result<()> {
    let vars: Vec<(String, String)> =
        serde_json::from_str(raw).context("the origin child's configuration")?;
    let config = Config::from_lookup(|k| {
        vars.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
    })?;
    if std::env::var_os(ORIGIN_CHILD_LOG_ENV).is_some() {
        // As in production: JSON lines, `RUST_LOG` levels.
        origin::telemetry::init(true);
    }
    let app = Application::build(config).await?;
    // The parent holds our stdin open; end-of-file means it is gone.
    std::thread::spawn(|| {
        use std::io::Read;
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
    app.run(std::future::pending()).await?;
    Ok(())
}

impl Stack {
    /// Moves the origin into a child process on the same port and
    /// database, with `extra` configuration over the stack's: unlike the
    /// origin on a thread of this process, a process can be killed with
    /// SIGKILL ([`Stack::kill_origin_process`]), which runs no shutdown
    /// code at all. The child is this test binary run again, so the
    /// suite's `main` must begin with [`serve_origin_if_asked`].
    /// [`Stack::start_origin`] brings the usual origin back afterwards.
    pub async fn start_origin_process(&mut self, extra: &[(String, String)]) -> anyhow::Result<()> {
        self.start_origin_process_logging(extra, None).await
    }

    /// [`Stack::start_origin_process`] with the child's log lines (JSON,
    /// at `RUST_LOG`'s levels) written to `log` as `(path, RUST_LOG)`.
    pub async fn start_origin_process_logging(
        &mut self,
        extra: &[(String, String)],
        log: Option<(&Path, &str)>,
    ) -> anyhow::Result<()> {
        self.stop_origin();
        self.kill_origin_process();
        let mut vars = origin_env(
            &self.db_url,
            self.origin_port,
            &self.secrets,
            &self.origin_vars,
        );
        for (k, v) in extra {
            vars.retain(|(name, _)| name != k);
            vars.push((k.clone(), v.clone()));
        }
        let exe = std::env::current_exe().context("this test binary")?;
        let health = format!("http://127.0.0.1:{}/healthz", self.origin_port);
        let client = reqwest::Client::new();
        // The old listener may linger for a moment: a child that cannot
        // bind exits, and is started again.
        for _ in 0..20 {
            let mut cmd = Command::new(&exe);
            cmd.env(ORIGIN_CHILD_ENV, serde_json::to_string(&vars)?)
                .stdin(Stdio::piped());
            if let Some((path, filter)) = log {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("open {}", path.display()))?;
                cmd.env(ORIGIN_CHILD_LOG_ENV, "1")
                    .env("RUST_LOG", filter)
                    .stdout(file.try_clone()?)
                    .stderr(file);
            } else if !self.launch.verbose {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
            let mut child = cmd.spawn().context("start the origin process")?;
            let stdin = child.stdin.take();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if child.try_wait()?.is_some() {
                    break;
                }
                let up = client
                    .get(&health)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if up {
                    self.origin_child = Some(OriginChild {
                        child,
                        _stdin: stdin,
                    });
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("the origin process did not answer /healthz within 60 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("the origin process could not start")
    }

    /// SIGKILL to the origin's child process, if there is one: it stops
    /// between any two instructions, with whatever it held in memory lost
    /// and its PostgreSQL transactions rolled back.
    pub fn kill_origin_process(&mut self) {
        if let Some(mut o) = self.origin_child.take() {
            // `Child::kill` is SIGKILL on Unix.
            let _ = o.child.kill();
            let _ = o.child.wait();
        }
    }

    /// The origin child's process id, while there is one.
    pub fn origin_process_id(&self) -> Option<u32> {
        self.origin_child.as_ref().map(|o| o.child.id())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // The edge first: it holds connections to the origin, which would
        // otherwise wait for them while shutting down gracefully.
        // SIGTERM to the whole group (wrangler and workerd), then reap.
        let _ = Command::new("kill")
            .args(["-s", "TERM", "--", &format!("-{}", self.wrangler.id())])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut exited = false;
        while Instant::now() < deadline {
            if matches!(self.wrangler.try_wait(), Ok(Some(_))) {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !exited {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", self.wrangler.id())])
                .status();
            let _ = self.wrangler.wait();
        }
        self.kill_origin_process();
        self.stop_origin();
    }
}

/// The `DEMO_LOGINS` var of a dev server: the seeded demo users' emails
/// and their password (`GET /api/v1/edge/demo` answers it).
pub fn demo_logins() -> String {
    let accounts: Vec<&str> = origin::seed::DEMO_USERS
        .iter()
        .map(|(email, _, _)| *email)
        .collect();
    format!(
        r#"{{"password":{},"accounts":{}}}"#,
        serde_json::json!(origin::seed::DEMO_PASSWORD),
        serde_json::json!(accounts)
    )
}

/// The origin's configuration as name and value pairs, as
/// [`origin_config`] sees it (for a child process's environment).
fn origin_env(
    db_url: &str,
    port: u16,
    secrets: &Secrets,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    let mut vars = vec![
        ("DATABASE_URL".to_owned(), db_url.to_owned()),
        ("BIND_ADDR".to_owned(), format!("127.0.0.1:{port}")),
        ("JWT_SECRET".to_owned(), secrets.jwt.clone()),
        ("ORIGIN_SERVICE_SECRET".to_owned(), secrets.service.clone()),
        ("DB_POOL_SIZE".to_owned(), "8".to_owned()),
    ];
    vars.extend(extra.iter().cloned());
    vars
}

fn origin_config(
    db_url: &str,
    port: u16,
    secrets: &Secrets,
    extra: &[(String, String)],
) -> anyhow::Result<Config> {
    let db_url = db_url.to_owned();
    let secrets = secrets.clone();
    let extra = extra.to_vec();
    Ok(Config::from_lookup(move |k| match k {
        "DATABASE_URL" => Some(db_url.clone()),
        "BIND_ADDR" => Some(format!("127.0.0.1:{port}")),
        "JWT_SECRET" => Some(secrets.jwt.clone()),
        "ORIGIN_SERVICE_SECRET" => Some(secrets.service.clone()),
        "DB_POOL_SIZE" => Some("8".to_owned()),
        other => extra
            .iter()
            .find(|(k, _)| k == other)
            .map(|(_, v)| v.clone()),
    })?)
}

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&path).context("create a temp dir")?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
