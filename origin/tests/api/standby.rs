//! A private PostgreSQL primary and its streaming replica, for the read
//! replica tests: two clusters under `target/pg-replica` on free ports.
//!
//! The machine's own server cannot be replicated (its `pg_hba.conf` has no
//! replication lines), so the pair is made here: `initdb` (trust auth; its
//! default `pg_hba.conf` allows replication from 127.0.0.1), then
//! `pg_basebackup -R` for the replica. It is made once and reused by later
//! runs: [`Pair::acquire`] starts whatever is stopped and rebuilds the pair
//! only when it cannot be brought back (a port taken meanwhile, WAL the
//! replica needs gone). PostgreSQL refuses to run as root, so as root the
//! server binaries run as the `postgres` user, which then owns the
//! directory.
//!
//! Tests pause replay and stop the replica, so they must not overlap:
//! [`Pair::acquire`] holds a PostgreSQL advisory lock on the tests' admin
//! server until the pair is dropped. That serialises the tests of this
//! process and of any other test run in the same tree, and a crashed run
//! releases it with its connection.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio_postgres::{Client, NoTls};

/// The advisory lock's key ("vibe", "repl").
const LOCK_KEY: i64 = 0x7669_6265_7265_706c;
/// Generous: a cold machine may take a while to start a cluster.
const WAIT: Duration = Duration::from_secs(60);

/// The running pair, held exclusively until dropped.
pub struct Pair {
    dir: PathBuf,
    bin: PathBuf,
    primary_port: u16,
    replica_port: u16,
    /// Holds the advisory lock; dropping it ends the session.
    _lock: Client,
}

impl Pair {
    /// Waits for the pair to be free, makes sure both servers run with
    /// the replica streaming and replaying (a previous test may have left
    /// it stopped or paused), and drops the databases earlier tests left.
    pub async fn acquire() -> Pair {
        let lock = connect(&crate::helpers::admin_url()).await;
        lock.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
            .await
            .expect("take the replica pair's lock");
        let dir = target_dir().join("pg-replica");
        let bin = server_bin_dir();
        let (primary_port, replica_port) = match reuse(&dir, &bin).await {
            Some(ports) => ports,
            None => create(&dir, &bin).await,
        };
        let pair = Pair {
            dir,
            bin,
            primary_port,
            replica_port,
            _lock: lock,
        };
        pair.resume_replay().await;
        let primary = pair.primary("postgres").await;
        let stale = primary
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE 'vibe\\_test\\_%'",
                &[],
            )
            .await
            .expect("list old test databases");
        for row in stale {
            let name: String = row.get(0);
            primary
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await
                .expect("drop an old test database");
        }
        pair
    }

    pub fn primary_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.primary_port)
    }

    pub fn replica_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.replica_port)
    }

    /// A superuser session on the primary's database `db`.
    pub async fn primary(&self, db: &str) -> Client {
        connect(&self.primary_url(db)).await
    }

    /// A superuser session on the replica.
    pub async fn replica(&self) -> Client {
        connect(&self.replica_url("postgres")).await
    }

    /// An empty database on the primary, once the replica has it too.
    pub async fn fresh_database(&self) -> String {
        let name = format!("vibe_test_{}", uuid::Uuid::now_v7().simple());
        self.primary("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        self.caught_up().await;
        name
    }

    /// Waits until the replica has replayed everything the primary has
    /// written so far.
    pub async fn caught_up(&self) {
        let lsn: String = self
            .primary("postgres")
            .await
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("the primary's position")
            .get(0);
        let replica = self.replica().await;
        wait_for("the replica to catch up", || async {
            replica
                .query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[&lsn],
                )
                .await
                .is_ok_and(|row| row.get(0))
        })
        .await;
    }

    /// Stops applying WAL on the replica (it still receives it); returns
    /// once replay has really stopped.
    pub async fn pause_replay(&self) {
        let replica = self.replica().await;
        replica
            .batch_execute("SELECT pg_wal_replay_pause()")
            .await
            .expect("pause replay");
        wait_for("replay to pause", || async {
            replica
                .query_one("SELECT pg_get_wal_replay_pause_state()::text", &[])
                .await
                .is_ok_and(|row| row.get::<_, String>(0) == "paused")
        })
        .await;
    }

    pub async fn resume_replay(&self) {
        self.replica()
            .await
            .batch_execute("SELECT pg_wal_replay_resume()")
            .await
            .expect("resume replay");
    }

    /// `pg_ctl stop` on the replica (fast: its sessions are cut).
    pub async fn stop_replica(&self) {
        let data = self.dir.join("standby");
        let ok = as_server_user(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-m", "fast", "-w", "stop"])
            .status()
            .await
            .is_ok_and(|s| s.success());
        assert!(ok, "pg_ctl stop of the replica failed");
    }

    /// Starts the replica again and waits until it streams.
    pub async fn start_replica(&self) {
        assert!(
            start(&self.bin, &self.dir, "standby").await,
            "the replica did not start; see {}",
            self.dir.join("standby.log").display()
        );
        assert!(
            streaming(self.replica_port).await,
            "the replica does not stream"
        );
    }
}

/// The workspace's `target` directory.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .join("target")
}

/// PostgreSQL's server binaries: Debian's newest, else `pg_config`'s.
fn server_bin_dir() -> PathBuf {
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(base)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            let complete = ["initdb", "pg_ctl", "pg_basebackup"]
                .iter()
                .all(|tool| bin.join(tool).exists());
            complete.then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .expect(
            "no PostgreSQL server binaries (initdb, pg_basebackup): install Debian's \
             `postgresql` package (cargo xtask test does)",
        );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `program` run as the server's user: `postgres` when we are root.
fn as_server_user(program: &Path) -> Command {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.stdout(std::process::Stdio::null());
    cmd
}

/// Starts the cluster in `dir/name` unless it runs; true when it runs.
async fn start(bin: &Path, dir: &Path, name: &str) -> bool {
    let data = dir.join(name);
    let running = as_server_user(&bin.join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .arg("status")
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if running {
        return true;
    }
    as_server_user(&bin.join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join(format!("{name}.log")))
        .args(["-w", "-t", "60", "start"])
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Stops the cluster in `dir/name` if it runs (before a rebuild).
async fn stop(bin: &Path, dir: &Path, name: &str) {
    let _ = as_server_user(&bin.join("pg_ctl"))
        .arg("-D")
        .arg(dir.join(name))
        .args(["-m", "immediate", "-w", "stop"])
        .stderr(std::process::Stdio::null())
        .status()
        .await;
}

/// The pair a previous run made, running again; `None` when there is none
/// or it cannot be brought back.
async fn reuse(dir: &Path, bin: &Path) -> Option<(u16, u16)> {
    let ports = std::fs::read_to_string(dir.join("ports")).ok()?;
    let mut ports = ports.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(primary)), Some(Ok(replica))) = (ports.next(), ports.next()) else {
        return None;
    };
    if start(bin, dir, "primary").await
        && start(bin, dir, "standby").await
        && answers(primary).await
        && streaming(replica).await
    {
        return Some((primary, replica));
    }
    eprintln!(
        "the replica pair in {} is broken; rebuilding it",
        dir.display()
    );
    None
}

/// Makes the pair from scratch.
async fn create(dir: &Path, bin: &Path) -> (u16, u16) {
    stop(bin, dir, "standby").await;
    stop(bin, dir, "primary").await;
    if dir.exists() {
        std::fs::remove_dir_all(dir).expect("remove the old replica pair");
    }
    std::fs::create_dir_all(dir).expect("create target/pg-replica");
    if is_root() {
        let ok = std::process::Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chown {} to postgres", dir.display());
        let reachable = as_server_user(Path::new("test"))
            .arg("-w")
            .arg(dir)
            .status()
            .await
            .is_ok_and(|s| s.success());
        assert!(
            reachable,
            "the postgres user cannot write {}: a parent directory is closed to it",
            dir.display()
        );
    }
    let (primary_port, replica_port) = free_ports();
    let primary = dir.join("primary");
    // UTF-8 like any real deployment (a C locale would default to
    // SQL_ASCII); plain C when the machine has no C.UTF-8.
    let mut made = false;
    for locale in ["C.UTF-8", "C"] {
        made = as_server_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&primary)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .arg(format!("--locale={locale}"))
            .status()
            .await
            .is_ok_and(|s| s.success());
        if made {
            break;
        }
        let _ = std::fs::remove_dir_all(&primary);
    }
    assert!(made, "initdb failed");
    // TCP on loopback only; no Unix socket, whose path could be too long.
    // WAL is kept for a replica that was stopped for a while.
    append(
        &primary.join("postgresql.conf"),
        &format!(
            "\n# vibe read replica tests\nport = {primary_port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = ''\nfsync = off\nwal_keep_size = '512MB'\n\
             max_connections = 200\nhot_standby_feedback = on\n"
        ),
    );
    assert!(
        start(bin, dir, "primary").await,
        "the primary did not start; see {}",
        dir.join("primary.log").display()
    );
    let standby = dir.join("standby");
    let ok = as_server_user(&bin.join("pg_basebackup"))
        .args(["-h", "127.0.0.1", "-p", &primary_port.to_string()])
        .args([
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        ])
        .arg("-D")
        .arg(&standby)
        .status()
        .await
        .is_ok_and(|s| s.success());
    assert!(ok, "pg_basebackup failed");
    // The copied configuration names the primary's port; the last line wins.
    append(
        &standby.join("postgresql.conf"),
        &format!("port = {replica_port}\n"),
    );
    assert!(
        start(bin, dir, "standby").await,
        "the replica did not start; see {}",
        dir.join("standby.log").display()
    );
    assert!(streaming(replica_port).await, "the replica does not stream");
    // Written last: its presence means the pair is complete.
    std::fs::write(
        dir.join("ports"),
        format!("{primary_port} {replica_port}\n"),
    )
    .expect("record the ports");
    (primary_port, replica_port)
}

/// Appends `text` to a configuration file the server's user owns.
fn append(file: &Path, text: &str) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(file)
        .expect("open the configuration");
    f.write_all(text.as_bytes())
        .expect("write the configuration");
}

/// Two distinct ports free right now.
fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    (
        a.local_addr().expect("port").port(),
        b.local_addr().expect("port").port(),
    )
}

async fn try_connect(url: &str) -> Option<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.ok()?;
    tokio::spawn(connection);
    Some(client)
}

async fn connect(url: &str) -> Client {
    match try_connect(url).await {
        Some(client) => client,
        None => panic!("connect to {url}"),
    }
}

/// True when the primary on `port` answers.
async fn answers(port: u16) -> bool {
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    match try_connect(&url).await {
        Some(client) => client.simple_query("SELECT 1").await.is_ok(),
        None => false,
    }
}

/// Waits until the server on `port` is in recovery with its WAL receiver
/// streaming; false if that does not happen within [`WAIT`].
async fn streaming(port: u16) -> bool {
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(client) = try_connect(&url).await {
            let row = client
                .query_one(
                    "SELECT pg_is_in_recovery(),
                            (SELECT status FROM pg_stat_wal_receiver) = 'streaming'",
                    &[],
                )
                .await;
            if row.is_ok_and(|r| r.get::<_, bool>(0) && r.get::<_, Option<bool>>(1) == Some(true)) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Polls `done` until it holds; panics naming `what` after [`WAIT`].
pub async fn wait_for<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
