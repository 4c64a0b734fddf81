//! `cargo xtask bench origin`: the origin against PostgreSQL.
//!
//! 1. **Ingest**: the internal batch API, as the edge's outbox flush calls
//!    it (one conversation per batch, several rooms flushing at once), with
//!    `synchronous_commit=on`. Reported in messages per second, next to the
//!    database's own ceiling: pgbench inserting 100 rows per transaction
//!    into a table with the same columns and indexes as `messages`.
//! 2. **History**: pages of 50 from a conversation of 1,000,000 messages,
//!    at random points, over HTTP with a real token; p50/p99/max.
//!
//! The origin runs in this process on a fresh database (`vibe_bench`); the
//! load generator shares the machine's two cores with it and PostgreSQL.
//!
//! `BENCH_PUSH=0` runs without the Web Push queue; `BENCH_SEARCH=column`
//! without the search index, `BENCH_SEARCH=off` without its column either
//! (the cost of message search on the ingest is the difference).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use origin::{Application, Config};
use rand::Rng;
use serde_json::{Value, json};
use shared::Role;
use shared::auth::{AUDIENCE_API, Claims};
use shared::protocol::internal::SERVICE_SECRET_HEADER;
use tokio_postgres::NoTls;

use crate::report::{micros_histogram, ms, table, target};

pub(crate) const JWT_SECRET: &str = "bench-jwt-secret-bench-jwt-secret-000";
/// A throwaway VAPID key (P-256 scalar, base64url), published on purpose.
const BENCH_VAPID_KEY: &str = "WO6neA0UinJdUFJ2aL5ehl4Y2KGBFGPz9tSHv3_ejuU";
pub(crate) const SERVICE_SECRET: &str = "bench-service-secret-bench-service-00";
const DB: &str = "vibe_bench";
const HISTORY_SIZE: i64 = 1_000_000;

/// Database `name` on the server at `DATABASE_URL`, dropped and created
/// empty: a client on the server's admin database, and the new one's URL.
pub(crate) async fn fresh_database(name: &str) -> anyhow::Result<(tokio_postgres::Client, String)> {
    let admin = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let (admin_client, conn) = tokio_postgres::connect(&admin, NoTls)
        .await
        .context("connect to PostgreSQL (DATABASE_URL)")?;
    tokio::spawn(conn);
    // Two statements: CREATE DATABASE cannot run in a transaction block.
    admin_client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .context("drop the old bench database")?;
    admin_client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .context("create the bench database")?;
    Ok((admin_client, origin::db::url_with_database(&admin, name)))
}

/// An origin in this process on the database at `url`, with the bench's
/// secrets and pool, and whatever else `extra` sets: its base URL and its
/// pool.
pub(crate) async fn start_origin(
    url: &str,
    extra: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<(String, deadpool_postgres::Pool)> {
    let url = url.to_owned();
    let config = Config::from_lookup(move |k| {
        extra(k).or_else(|| match k {
            "DATABASE_URL" => Some(url.clone()),
            "BIND_ADDR" => Some("127.0.0.1:0".to_owned()),
            "JWT_SECRET" => Some(JWT_SECRET.to_owned()),
            "ORIGIN_SERVICE_SECRET" => Some(SERVICE_SECRET.to_owned()),
            "DB_POOL_SIZE" => Some("16".to_owned()),
            _ => None,
        })
    })?;
    let app = Application::build(config).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    let pool = app.state().pool.clone();
    tokio::spawn(app.run(std::future::pending()));
    Ok((base, pool))
}

pub async fn run() -> anyhow::Result<()> {
    let (admin_client, url) = fresh_database(DB).await?;
    let sync_commit: String = admin_client
        .query_one("SHOW synchronous_commit", &[])
        .await?
        .get(0);
    if sync_commit != "on" {
        bail!("synchronous_commit is {sync_commit}; the benchmark requires on");
    }

    // Web Push on, as in production, with the member subscribed: the ingest
    // then also queues each batch's notification in its transaction.
    // BENCH_PUSH=0 measures without (the cost of the queue is the
    // difference).
    let push = std::env::var("BENCH_PUSH").map_or(true, |v| v != "0");
    println!("Web Push queue: {}", if push { "on" } else { "off" });
    let (base, pool) = start_origin(&url, move |k| match k {
        // A throwaway key: nothing is sent (the bench's users have no
        // subscription), but every batch queues its notifications.
        "VAPID_PRIVATE_KEY" if push => Some(BENCH_VAPID_KEY.to_owned()),
        // Jobs stay queued during the run: what is measured is the queue's
        // cost on the message path, not sends to a push service.
        "PUSH_COALESCE_MS" if push => Some("600000".to_owned()),
        _ => None,
    })
    .await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let db = pool.get().await?;
    // Message search (migration 0008) costs the ingest its tsvector and its
    // GIN index. BENCH_SEARCH=column drops the index (the vector is still
    // computed), BENCH_SEARCH=off the column too (the schema before 0008):
    // the cost is the difference between runs.
    let search = std::env::var("BENCH_SEARCH").unwrap_or_else(|_| "on".to_owned());
    match search.as_str() {
        "on" => {}
        "column" => db.batch_execute("DROP INDEX messages_search_idx").await?,
        "off" => {
            db.batch_execute(
                "DROP INDEX messages_search_idx; ALTER TABLE messages DROP COLUMN search_vector",
            )
            .await?
        }
        other => bail!("BENCH_SEARCH={other:?}: on, column or off"),
    }
    println!("Search vector and index (BENCH_SEARCH): {search}");
    // BENCH_CONTENT=chat: 3–19 words of chat and fitness vocabulary per
    // message (as the search bench generates) instead of the four-word
    // "bench message N in C", so that indexing costs what real text does.
    println!(
        "Ingested text (BENCH_CONTENT): {}",
        if chat_content() { "chat" } else { "short" }
    );
    let users: Vec<i64> = {
        let mut ids = Vec::new();
        for (i, role) in ["trainer", "member"].iter().enumerate() {
            let row = db
                .query_one(
                    "INSERT INTO users (email, full_name, role, password_hash)
                     VALUES ($1, $2, $3, 'x') RETURNING id",
                    &[&format!("bench{i}@vibe.fit"), &format!("Bench {i}"), role],
                )
                .await?;
            ids.push(row.get::<_, i64>(0));
        }
        ids
    };
    if push {
        // The member can be pushed, so every batch queues a notification
        // for them (a member without a subscription costs nothing).
        db.execute(
            "INSERT INTO push_subscriptions (user_id, endpoint, p256dh, auth)
             VALUES ($1, 'http://127.0.0.1:9/bench', decode(repeat('04', 65), 'hex'),
                     decode(repeat('00', 16), 'hex'))",
            &[&users[1]],
        )
        .await?;
    }

    println!("PostgreSQL: {}", server_version(&admin_client).await?);
    println!("synchronous_commit = {sync_commit}");

    // ---- Ingest ----------------------------------------------------------
    let mut rows = Vec::new();
    for (batch, writers) in [(100usize, 8usize), (500, 4), (500, 8), (1000, 8)] {
        let rooms = writers * 4;
        let conversations = create_groups(&db, users[0], &users, rooms).await?;
        let total = 200_000usize;
        let rate = ingest(
            &http,
            &base,
            &conversations,
            users[0],
            batch,
            writers,
            total,
        )
        .await?;
        let stored: i64 = db
            .query_one(
                "SELECT count(*) FROM messages WHERE conversation_id = ANY($1)",
                &[&conversations],
            )
            .await?
            .get(0);
        if stored != total as i64 {
            bail!("ingest stored {stored} of {total} messages");
        }
        rows.push(vec![
            batch.to_string(),
            writers.to_string(),
            total.to_string(),
            format!("{rate:.0}"),
        ]);
    }
    // ---- Ingest by group size ----------------------------------------------
    // With push on, each batch queues one job per subscribed recipient: the
    // cost grows with the group. Every member is subscribed here (the worst
    // case); BENCH_PUSH=0 gives the same groups without the queue.
    let mut by_size = Vec::new();
    for size in [2i64, 100, 1_000] {
        let members: Vec<i64> = db
            .query(
                "INSERT INTO users (email, full_name, role, password_hash)
                 SELECT 'size' || $1::int8 || '-' || g || '@vibe.fit', 'Member ' || g, 'member', 'x'
                 FROM generate_series(1, $1::int8 - 1) g RETURNING id",
                &[&size],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if push {
            db.execute(
                "INSERT INTO push_subscriptions (user_id, endpoint, p256dh, auth)
                 SELECT u, 'http://127.0.0.1:9/bench/' || u, decode(repeat('04', 65), 'hex'),
                        decode(repeat('00', 16), 'hex')
                 FROM unnest($1::int8[]) u",
                &[&members],
            )
            .await?;
        }
        let mut everyone = members.clone();
        everyone.push(users[0]);
        let (batch, writers, total) = (100usize, 4usize, 40_000usize);
        let conversations = create_groups(&db, users[0], &everyone, writers).await?;
        let rate = ingest(
            &http,
            &base,
            &conversations,
            users[0],
            batch,
            writers,
            total,
        )
        .await?;
        let jobs: i64 = db
            .query_one(
                "SELECT count(*) FROM push_jobs WHERE conversation_id = ANY($1)",
                &[&conversations],
            )
            .await?
            .get(0);
        let expected = if push { (size - 1) * writers as i64 } else { 0 };
        if jobs != expected {
            bail!("group of {size}: {jobs} queued notifications, expected {expected}");
        }
        by_size.push(vec![
            size.to_string(),
            batch.to_string(),
            writers.to_string(),
            total.to_string(),
            format!("{rate:.0}"),
            jobs.to_string(),
        ]);
    }
    table(
        &format!(
            "Origin ingest by group size (every member subscribed; Web Push queue {})",
            if push { "on" } else { "off" }
        ),
        &[
            "members",
            "batch size",
            "rooms flushing",
            "messages",
            "msgs/s",
            "jobs queued",
        ],
        &by_size,
    );

    let ceiling = pgbench_ceiling(&url, &db).await;
    table(
        "Origin ingest (POST /internal/v1/messages/batch, synchronous_commit=on)",
        &[
            "batch size",
            "concurrent rooms flushing",
            "messages",
            "msgs/s",
        ],
        &rows,
    );
    match ceiling {
        Ok(rate) => println!(
            "\nPostgreSQL ceiling (pgbench, 100 rows/transaction, same columns and indexes, 8 clients): {rate:.0} rows/s"
        ),
        Err(e) => println!("\npgbench ceiling not measured: {e:#}"),
    }
    target("origin ingest ≥ 20,000 msgs/s sustained with `synchronous_commit=on`");

    // ---- History ---------------------------------------------------------
    let conversation = create_groups(&db, users[0], &users, 1).await?[0];
    println!("\nfilling a conversation with {HISTORY_SIZE} messages…");
    let started = Instant::now();
    db.batch_execute(&format!(
        "INSERT INTO messages (id, conversation_id, seq, sender_id, content, created_at, client_msg_id)
         SELECT gen_random_uuid(), {conversation}, g, {sender}, 'history message ' || g,
                now() - make_interval(secs => {HISTORY_SIZE} - g), 'h-' || g
         FROM generate_series(1, {HISTORY_SIZE}) g;
         UPDATE conversations SET last_seq = {HISTORY_SIZE} WHERE id = {conversation};
         ANALYZE messages;",
        sender = users[1]
    ))
    .await?;
    println!("filled in {:.1} s", started.elapsed().as_secs_f64());
    let now = chrono::Utc::now().timestamp();
    let token = shared::auth::issue(
        &Claims::new(users[0], "Bench 0", Role::Trainer, AUDIENCE_API, now, 3600),
        JWT_SECRET.as_bytes(),
    )?;
    let mut rows = Vec::new();
    for (label, concurrency, requests) in [
        ("random page, 1 client", 1usize, 5_000usize),
        ("random page, 4 clients", 4, 10_000),
        ("latest page, 1 client", 1, 2_000),
    ] {
        let latest = label.starts_with("latest");
        let (hist, elapsed) = history(
            &http,
            &base,
            &token,
            conversation,
            concurrency,
            requests,
            latest,
        )
        .await?;
        rows.push(vec![
            label.to_owned(),
            requests.to_string(),
            ms(hist.value_at_quantile(0.5)),
            ms(hist.value_at_quantile(0.99)),
            ms(hist.max()),
            format!("{:.0}", requests as f64 / elapsed.as_secs_f64()),
        ]);
    }
    table(
        "History page of 50 from a 1,000,000-message conversation (GET …/messages?before_seq=&limit=50, over HTTP)",
        &["case", "requests", "p50 ms", "p99 ms", "max ms", "req/s"],
        &rows,
    );
    target("history: a page of 50 from a conversation of 1M messages, p99 ≤ 5 ms");
    drop(db);
    admin_client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)"))
        .await
        .ok();
    Ok(())
}

async fn server_version(client: &tokio_postgres::Client) -> anyhow::Result<String> {
    Ok(client.query_one("SHOW server_version", &[]).await?.get(0))
}

async fn create_groups(
    db: &deadpool_postgres::Object,
    owner: i64,
    members: &[i64],
    n: usize,
) -> anyhow::Result<Vec<i64>> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let row = db
            .query_one(
                "INSERT INTO conversations (kind, name, created_by) VALUES ('group', $1, $2) RETURNING id",
                &[&format!("bench {i}"), &owner],
            )
            .await?;
        let id: i64 = row.get(0);
        db.execute(
            "INSERT INTO conversation_participants (conversation_id, user_id) SELECT $1, unnest($2::int8[])",
            &[&id, &members],
        )
        .await?;
        ids.push(id);
    }
    Ok(ids)
}

/// Whether the ingested messages are chat text (`BENCH_CONTENT=chat`).
fn chat_content() -> bool {
    std::env::var("BENCH_CONTENT").is_ok_and(|v| v == "chat")
}

/// `writers` tasks, each flushing its own rooms' batches in turn, until
/// `total` messages are stored. Returns messages per second.
async fn ingest(
    http: &reqwest::Client,
    base: &str,
    conversations: &[i64],
    sender: i64,
    batch: usize,
    writers: usize,
    total: usize,
) -> anyhow::Result<f64> {
    let per_writer = total / writers;
    let rooms_per_writer = conversations.len() / writers;
    let url = format!("{base}/internal/v1/messages/batch");
    // Build every body first: the clock measures the origin, not serde.
    let mut plans: Vec<Vec<String>> = Vec::with_capacity(writers);
    let mut rng = rand::thread_rng();
    let chat = chat_content();
    for w in 0..writers {
        let rooms = &conversations[w * rooms_per_writer..(w + 1) * rooms_per_writer];
        let mut next_seq = vec![1i64; rooms.len()];
        let mut bodies = Vec::new();
        let mut sent = 0;
        let mut r = 0;
        while sent < per_writer {
            let n = batch.min(per_writer - sent);
            let conv = rooms[r % rooms.len()];
            let seq0 = next_seq[r % rooms.len()];
            let created = chrono::Utc::now();
            let messages: Vec<Value> = (0..n as i64)
                .map(|i| {
                    json!({
                        "id": uuid::Uuid::now_v7(),
                        "conversation_id": conv,
                        "seq": seq0 + i,
                        "sender_id": sender,
                        "content": if chat {
                            crate::search::chat_text(&mut rng)
                        } else {
                            format!("bench message {} in {conv}", seq0 + i)
                        },
                        "created_at": created,
                        "client_msg_id": format!("b-{conv}-{}", seq0 + i),
                    })
                })
                .collect();
            bodies.push(serde_json::to_string(&json!({ "messages": messages }))?);
            next_seq[r % rooms.len()] += n as i64;
            sent += n;
            r += 1;
        }
        plans.push(bodies);
    }
    let started = Instant::now();
    let tasks = plans.into_iter().map(|bodies| {
        let http = http.clone();
        let url = url.clone();
        tokio::spawn(async move {
            for body in bodies {
                let res = http
                    .post(&url)
                    .header(SERVICE_SECRET_HEADER, SERVICE_SECRET)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                if !res.status().is_success() {
                    bail!("ingest answered {}", res.status());
                }
                let v: Value = res.json().await?;
                if v["rejected"].as_array().is_some_and(|r| !r.is_empty()) {
                    bail!("ingest rejected messages: {}", v["rejected"]);
                }
            }
            Ok(())
        })
    });
    for r in futures::future::join_all(tasks).await {
        r??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// pgbench, 100 rows per transaction into a copy of `messages` (same
/// columns, unique constraints and indexes, without foreign keys).
async fn pgbench_ceiling(url: &str, db: &deadpool_postgres::Object) -> anyhow::Result<f64> {
    // `INCLUDING ALL` copies every index (the primary key, both unique
    // constraints and the sender index), the checks and the defaults; it
    // never copies foreign keys. An index more than `messages` has would
    // lower the ceiling and flatter the ratio, so the copy is checked.
    db.batch_execute(
        "DROP TABLE IF EXISTS bench_ceiling;
         CREATE TABLE bench_ceiling (LIKE messages INCLUDING ALL);",
    )
    .await?;
    let (want, have) = (
        table_shape(db, "messages").await?,
        table_shape(db, "bench_ceiling").await?,
    );
    if want != have {
        bail!(
            "the ceiling's table differs from messages: messages has {want:?}, the copy {have:?}"
        );
    }
    let script = std::env::temp_dir().join("vibe-bench-ceiling.sql");
    std::fs::write(
        &script,
        "\\set c random(1, 1000000000)\n\
         INSERT INTO bench_ceiling (id, conversation_id, seq, sender_id, content, created_at, client_msg_id) \
         SELECT gen_random_uuid(), :c, g, 1, 'bench message ' || g || ' in ' || :c, now(), 'b-' || :c || '-' || g \
         FROM generate_series(1, 100) g;\n",
    )?;
    let out = tokio::process::Command::new("pgbench")
        .args(["-n", "-c", "8", "-j", "2", "-T", "15", "-f"])
        .arg(&script)
        .arg(url)
        .output()
        .await
        .context("run pgbench (apt-get install postgresql-client)")?;
    if !out.status.success() {
        bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let tps: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .context("no tps line in pgbench output")?;
    db.batch_execute("DROP TABLE bench_ceiling").await?;
    Ok(tps * 100.0)
}

/// A table's indexes and its constraints other than foreign keys, without
/// their names, sorted: what makes an insert cost what it costs. A `NOT
/// VALID` check (a future migration may add one to spare a scan) is checked
/// on every insert like a valid one, and `LIKE … INCLUDING ALL` copies it
/// as valid: the mark is dropped.
async fn table_shape(db: &deadpool_postgres::Object, table: &str) -> anyhow::Result<Vec<String>> {
    let rows = db
        .query(
            "SELECT 'index ' || CASE WHEN i.indisunique THEN 'unique ' ELSE '' END
                    || regexp_replace(pg_get_indexdef(i.indexrelid), '^.* USING ', 'USING ')
             FROM pg_index i WHERE i.indrelid = $1::text::regclass
             UNION ALL
             SELECT 'constraint ' || c.contype::text || ' '
                    || regexp_replace(pg_get_constraintdef(c.oid), ' NOT VALID$', '')
             FROM pg_constraint c WHERE c.conrelid = $1::text::regclass AND c.contype <> 'f'",
            &[&table],
        )
        .await
        .with_context(|| format!("read the indexes and constraints of {table}"))?;
    let mut shape: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    shape.sort();
    Ok(shape)
}

/// `requests` history pages from `concurrency` clients. Returns latency
/// (µs) and wall time.
async fn history(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    conversation: i64,
    concurrency: usize,
    requests: usize,
    latest: bool,
) -> anyhow::Result<(hdrhistogram::Histogram<u64>, Duration)> {
    let url = Arc::new(format!(
        "{base}/api/v1/chat/conversations/{conversation}/messages"
    ));
    // Warm-up: connections, prepared statements, caches.
    for _ in 0..200 {
        page(http, &url, token, Some(HISTORY_SIZE / 2)).await?;
    }
    let started = Instant::now();
    let per_client = requests / concurrency;
    let tasks = (0..concurrency).map(|_| {
        let http = http.clone();
        let url = url.clone();
        let token = token.to_owned();
        tokio::spawn(async move {
            let mut hist = micros_histogram()?;
            for _ in 0..per_client {
                let before = if latest {
                    None
                } else {
                    Some(rand::thread_rng().gen_range(51..=HISTORY_SIZE))
                };
                let t = Instant::now();
                let n = page(&http, &url, &token, before).await?;
                hist.record(t.elapsed().as_micros() as u64)?;
                if n != 50 {
                    bail!("a page had {n} messages, not 50");
                }
            }
            Ok::<_, anyhow::Error>(hist)
        })
    });
    let mut total = micros_histogram()?;
    for r in futures::future::join_all(tasks).await {
        total.add(r??)?;
    }
    Ok((total, started.elapsed()))
}

async fn page(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    before: Option<i64>,
) -> anyhow::Result<usize> {
    let mut req = http.get(url).bearer_auth(token).query(&[("limit", "50")]);
    if let Some(b) = before {
        req = req.query(&[("before_seq", b)]);
    }
    let res = req.send().await?;
    if !res.status().is_success() {
        bail!("history answered {}", res.status());
    }
    let v: Value = res.json().await?;
    Ok(v["messages"].as_array().map_or(0, Vec::len))
}
