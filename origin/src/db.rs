//! The connection pool and the migrator.
//!
//! Migrations are the SQL files in `migrations/`, compiled into the binary so
//! a deployed origin cannot run against a different set. They are applied in
//! order at start-up, each in its own transaction, and recorded with a
//! checksum in `schema_migrations`. A PostgreSQL advisory lock serialises
//! concurrent start-ups of several origin instances. A failed migration, or a
//! released one whose text changed, stops start-up with an error that names
//! the file.

use std::time::Duration;

use anyhow::{Context, bail};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use sha2::{Digest, Sha256};
use tokio_postgres::NoTls;

/// One migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. A test checks this list against the
/// directory, so a new file cannot be forgotten here.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_initial_schema.sql",
        sql: include_str!("../../migrations/0001_initial_schema.sql"),
    },
    Migration {
        version: 2,
        name: "0002_sessions.sql",
        sql: include_str!("../../migrations/0002_sessions.sql"),
    },
    Migration {
        version: 3,
        name: "0003_membership_history.sql",
        sql: include_str!("../../migrations/0003_membership_history.sql"),
    },
    Migration {
        version: 4,
        name: "0004_user_directory.sql",
        sql: include_str!("../../migrations/0004_user_directory.sql"),
    },
    Migration {
        version: 5,
        name: "0005_push.sql",
        sql: include_str!("../../migrations/0005_push.sql"),
    },
    Migration {
        version: 6,
        name: "0006_media.sql",
        sql: include_str!("../../migrations/0006_media.sql"),
    },
    Migration {
        version: 7,
        name: "0007_message_lifecycle.sql",
        sql: include_str!("../../migrations/0007_message_lifecycle.sql"),
    },
    Migration {
        version: 8,
        name: "0008_search.sql",
        sql: include_str!("../../migrations/0008_search.sql"),
    },
    Migration {
        version: 9,
        name: "0009_metrics.sql",
        sql: include_str!("../../migrations/0009_metrics.sql"),
    },
];

/// Key of the advisory lock held while migrating ("vibe" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x7669_6265;

/// `url` (a `postgres://` URL) with its database replaced by `db`; tests
/// and tools derive per-run databases from one server URL this way.
pub fn url_with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let host_start = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[host_start..]
        .find('/')
        .map_or(base.len(), |j| host_start + j);
    format!("{}/{db}{query}", &base[..host_end])
}

/// Builds the pool. Connections are made lazily, so this does not fail when
/// the database is down; requests then get 503 until it is back.
pub fn pool(database_url: &str, max_size: usize) -> anyhow::Result<Pool> {
    let pg: tokio_postgres::Config = database_url.parse().context("parse DATABASE_URL")?;
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        // Fail fast under an outage instead of queueing requests forever.
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .context("build the database pool")
}

/// Applies every pending migration. Returns the versions applied now.
pub async fn migrate(pool: &Pool) -> anyhow::Result<Vec<i64>> {
    migrate_with(pool, MIGRATIONS).await
}

/// Applies the pending ones of `migrations` (tests pass broken lists to show
/// how start-up fails).
pub async fn migrate_with(pool: &Pool, migrations: &[Migration]) -> anyhow::Result<Vec<i64>> {
    let mut client = pool
        .get()
        .await
        .context("connect to PostgreSQL to migrate")?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("take the migration lock")?;
    // Under the lock: concurrent CREATE TABLE IF NOT EXISTS can race.
    let created = client
        .batch_execute(
            "SET client_min_messages TO warning;
             CREATE TABLE IF NOT EXISTS schema_migrations (
                version    BIGINT PRIMARY KEY,
                name       TEXT NOT NULL,
                checksum   TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             );
             RESET client_min_messages;",
        )
        .await
        .context("create schema_migrations");
    let result = match created {
        Ok(()) => apply_pending(&mut client, migrations).await,
        Err(e) => Err(e),
    };
    // Unlock even when a migration failed; the session would release it on
    // close anyway, but the pooled connection lives on.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let applied = result?;
    unlock.context("release the migration lock")?;
    Ok(applied)
}

async fn apply_pending(
    client: &mut deadpool_postgres::Client,
    migrations: &[Migration],
) -> anyhow::Result<Vec<i64>> {
    let rows = client
        .query("SELECT version, name, checksum FROM schema_migrations", &[])
        .await
        .context("read schema_migrations")?;
    let recorded: Vec<(i64, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    for (version, name, checksum) in &recorded {
        match migrations.iter().find(|m| m.version == *version) {
            None => bail!(
                "the database has migration {version} ({name}) that this binary does not know; \
                 is an older origin running against a newer schema?"
            ),
            Some(m) if checksum_of(m.sql) != *checksum => bail!(
                "migration {} was edited after it was applied (checksum mismatch); \
                 released migrations must never change, add a new one instead",
                m.name
            ),
            Some(_) => {}
        }
    }
    let mut applied = Vec::new();
    for m in migrations {
        if recorded.iter().any(|(v, _, _)| *v == m.version) {
            continue;
        }
        let tx = client.transaction().await.context("begin migration")?;
        tx.batch_execute(m.sql)
            .await
            .with_context(|| format!("migration {} failed", m.name))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &checksum_of(m.sql)],
        )
        .await
        .with_context(|| format!("record migration {}", m.name))?;
        tx.commit()
            .await
            .with_context(|| format!("commit migration {}", m.name))?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
        applied.push(m.version);
    }
    Ok(applied)
}

fn checksum_of(sql: &str) -> String {
    let digest = Sha256::digest(sql.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_is_swapped_in_a_url() {
        assert_eq!(
            url_with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            url_with_database("postgres://u:p@h:1/db?sslmode=disable", "x"),
            "postgres://u:p@h:1/x?sslmode=disable"
        );
        assert_eq!(url_with_database("postgres://h:1", "x"), "postgres://h:1/x");
    }

    #[test]
    fn the_migration_list_matches_the_directory() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .expect("migrations dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, listed);
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "versions run 1, 2, 3…");
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }
}
