//! Making sure a PostgreSQL server is there.
//!
//! In order: `DATABASE_URL` when set; else the local server on
//! 127.0.0.1:5432 when it accepts `postgres` without a password (the CI and
//! development machines); else a private cluster that we initialise under
//! `target/pg` and start on port 55432 (installing Debian's `postgresql`
//! package first if there is none).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::tools::{apt_install, is_root};

const LOCAL_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const PRIVATE_PORT: u16 = 55432;

/// Returns an admin URL (a superuser on the `postgres` database).
pub fn ensure(root: &Path) -> anyhow::Result<String> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        connect(&url).with_context(|| "DATABASE_URL is set but PostgreSQL does not answer")?;
        return Ok(url);
    }
    if connect(LOCAL_URL).is_ok() {
        return Ok(LOCAL_URL.to_owned());
    }
    // A Debian cluster that is installed but stopped (as after a reboot).
    if is_root() && Path::new("/etc/postgresql").is_dir() {
        if let Some(version) = newest_entry(Path::new("/etc/postgresql")) {
            let _ = Command::new("pg_ctlcluster")
                .args(["--skip-systemctl-redirect", &version, "main", "start"])
                .status();
            if connect(LOCAL_URL).is_ok() {
                return Ok(LOCAL_URL.to_owned());
            }
        }
    }
    private_cluster(root)
}

fn connect(url: &str) -> anyhow::Result<postgres::Client> {
    let mut config: postgres::Config = url.parse().context("parse the PostgreSQL URL")?;
    config.connect_timeout(Duration::from_secs(3));
    let mut client = config
        .connect(postgres::NoTls)
        .context("connect to PostgreSQL")?;
    client
        .simple_query("SELECT 1")
        .context("query PostgreSQL")?;
    Ok(client)
}

fn newest_entry(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort_by_key(|n| n.parse::<u32>().unwrap_or(0));
    names.pop()
}

/// What the private cluster and the origin's read replica tests run (the
/// latter make a primary and a streaming replica of their own): Debian's
/// `postgresql-client` alone has pg_basebackup but not initdb.
const SERVER_TOOLS: &[&str] = &["initdb", "pg_ctl", "pg_basebackup"];

/// PostgreSQL's server binaries (initdb, pg_ctl, pg_basebackup),
/// installing them if absent.
pub fn server_bin_dir() -> anyhow::Result<PathBuf> {
    let base = Path::new("/usr/lib/postgresql");
    let complete = || {
        newest_entry(base)
            .map(|v| base.join(v).join("bin"))
            .filter(|bin| SERVER_TOOLS.iter().all(|tool| bin.join(tool).exists()))
    };
    if let Some(bin) = complete() {
        return Ok(bin);
    }
    apt_install(&["postgresql"])?;
    complete().with_context(|| {
        format!(
            "postgresql installed, but no {} under /usr/lib/postgresql",
            SERVER_TOOLS.join(", ")
        )
    })
}

/// A cluster of our own under `target/pg`, trust auth on loopback only.
fn private_cluster(root: &Path) -> anyhow::Result<String> {
    let url = format!("postgres://postgres@127.0.0.1:{PRIVATE_PORT}/postgres");
    if connect(&url).is_ok() {
        return Ok(url);
    }
    let bin = server_bin_dir()?;
    let data = root.join("target").join("pg");
    let data_s = data.to_string_lossy().into_owned();
    // PostgreSQL refuses to run as root; run it as the `postgres` user then.
    let as_server_user = |program: &Path| -> Command {
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    };
    if !data.join("PG_VERSION").exists() {
        println!("==> initialising a private PostgreSQL cluster in {data_s}");
        std::fs::create_dir_all(&data).context("create target/pg")?;
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres", &data_s])
                .status()
                .context("chown target/pg")?;
            if !status.success() {
                bail!("chown target/pg to postgres failed");
            }
        }
        let status = as_server_user(&bin.join("initdb"))
            .args(["-D", &data_s, "-U", "postgres", "-A", "trust", "--no-sync"])
            .stdout(std::process::Stdio::null())
            .status()
            .context("run initdb")?;
        if !status.success() {
            bail!("initdb failed");
        }
    }
    println!("==> starting the private PostgreSQL on port {PRIVATE_PORT}");
    let options = format!("-p {PRIVATE_PORT} -c listen_addresses=127.0.0.1 -k {data_s}");
    let status = as_server_user(&bin.join("pg_ctl"))
        .args([
            "-D",
            &data_s,
            "-l",
            &format!("{data_s}/server.log"),
            "-w",
            "-o",
            &options,
            "start",
        ])
        .status()
        .context("run pg_ctl")?;
    if !status.success() {
        bail!("pg_ctl start failed; see {data_s}/server.log");
    }
    connect(&url).context("the private PostgreSQL does not answer")?;
    Ok(url)
}

/// `admin_url` with its database replaced by `db` (the rule of
/// `origin::db::url_with_database`; xtask depends on no service crate, so
/// that it builds in seconds on a fresh machine).
pub fn url_with_database(admin_url: &str, db: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (admin_url, String::new()),
    };
    let host_start = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[host_start..]
        .find('/')
        .map_or(base.len(), |j| host_start + j);
    format!("{}/{db}{query}", &base[..host_end])
}

/// Creates database `name` unless it exists.
pub fn ensure_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut client = connect(admin_url)?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .context("look up the database")?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .with_context(|| format!("create database {name}"))?;
    }
    Ok(())
}

/// Drops the per-test databases a previous run left behind.
pub fn drop_test_databases(admin_url: &str) -> anyhow::Result<()> {
    let mut client = connect(admin_url)?;
    let rows = client
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'vibe\\_test\\_%'",
            &[],
        )
        .context("list test databases")?;
    for row in rows {
        let name: String = row.get(0);
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .with_context(|| format!("drop {name}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_swapped_in_a_url() {
        assert_eq!(
            url_with_database("postgres://postgres@127.0.0.1:5432/postgres", "vibe_dev"),
            "postgres://postgres@127.0.0.1:5432/vibe_dev"
        );
        assert_eq!(
            url_with_database("postgres://u:p@h:1/db?sslmode=disable", "x"),
            "postgres://u:p@h:1/x?sslmode=disable"
        );
        assert_eq!(url_with_database("postgres://h:1", "x"), "postgres://h:1/x");
    }
}
