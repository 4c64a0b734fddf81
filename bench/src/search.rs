//! `cargo xtask bench search`: message search (issue 15) over HTTP against
//! the real origin, on 1,000,000 messages in 2,000 conversations, searched
//! by a trainer who is in 200 of them.
//!
//! **The data.** Generated in PostgreSQL in one `INSERT … SELECT` (the
//! search index is dropped for the load and built again after it, from its
//! own definition, then `VACUUM ANALYZE`, as autovacuum would leave a
//! table this size). 3,001 users; 2,000 conversations: the trainer's 150
//! direct chats and 50 groups of 8, then 1,200 direct chats and 600 groups
//! of 8 among the others. 500 messages per conversation, 2 s apart
//! (23 days), each sent by one of its members, with time-ordered ids like
//! the edge's UUIDv7. Each message is 3 to 19 words: 90 % drawn from
//! `search/words.txt` (483 chat and fitness words, most common first) with
//! Zipf frequencies (word k with probability ∝ 1/k, so "great" and
//! "workout" are in about 4 % of messages and stop words fill a third of
//! the text), 10 % from a tail of 100,000 made-up words (names, typos,
//! slang; word r ∝ 1/r), so that rare words exist at every frequency.
//!
//! **The searches.** `GET /api/v1/chat/search` with a real token, one
//! client, back to back after a warm-up, each case cycling through its own
//! list of queries: a rare word (2–10 matches among the trainer's
//! conversations), a common word (the list's most frequent, 2,000–4,600
//! matches there), the last word as a prefix, a quoted phrase, two words,
//! and a common and a rare word within one conversation (`conversation_id`);
//! then the common word from 4 clients at once. `BENCH_RUNS` (default 3)
//! runs of `BENCH_SEARCH_REQUESTS` (default 400) requests per case; the
//! table gives each figure's range over the runs. Every answer is checked
//! (`200`, and hits where there must be some).
//!
//! `BENCH_EXPLAIN=1` also prints `EXPLAIN (ANALYZE, BUFFERS)` of one query
//! per case, run as the origin runs it (`origin::search::SEARCH_GUARD`, and
//! the statement `origin::search::search_hits` picks).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::Value;
use shared::Role;
use shared::auth::{AUDIENCE_API, Claims};

use crate::origin_bench::{JWT_SECRET, fresh_database, start_origin};
use crate::report::{loadavg, micros_histogram, range, table, target};

const DB: &str = "vibe_bench_search";
const MESSAGES: i64 = 1_000_000;
const CONVERSATIONS: i64 = 2_000;
/// The words of the generated messages, most frequent first.
const WORDS: &str = include_str!("search/words.txt");

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

/// Users, then conversations as `bench_conv(i, kind, members)`: member
/// indexes into the users (0 is the trainer).
const SHAPE: &str = "
    INSERT INTO users (email, full_name, role, password_hash)
    SELECT 'search' || g || '@bench.vibe',
           (ARRAY['Alex','Sam','Jordan','Taylor','Morgan','Casey','Riley','Jamie','Avery','Quinn'])[1 + g % 10]
             || ' ' || (ARRAY['Smith','Garcia','Chen','Müller','Okafor','Silva','Kowalski','Haddad','Novak','Sato'])[1 + (g / 10) % 10]
             || ' ' || g,
           CASE WHEN g = 0 THEN 'trainer' ELSE 'member' END, 'x'
    FROM generate_series(0, 3000) g;
    CREATE TABLE bench_conv AS
    SELECT i,
           CASE WHEN i < 150 OR (i >= 200 AND i < 1400) THEN 'direct' ELSE 'group' END AS kind,
           CASE
             WHEN i < 150 THEN ARRAY[0, 1 + i]
             WHEN i < 200 THEN ARRAY[0] || ARRAY(SELECT 1 + (i * 7 + k * 13) % 3000 FROM generate_series(0, 6) k)
             WHEN i < 1400 THEN ARRAY[151 + (i - 200) * 2, 152 + (i - 200) * 2]
             ELSE ARRAY(SELECT 1 + (i * 13 + k * 101) % 3000 FROM generate_series(0, 7) k)
           END AS members
    FROM generate_series(0, 1999) i;";

/// The conversations and their members. `$1`: the first user's id.
const CONVERSATIONS_SQL: &str = "
    INSERT INTO conversations (kind, name, created_by, direct_user_lo, direct_user_hi)
    SELECT kind,
           CASE WHEN kind = 'group' THEN (ARRAY['Morning HIIT','Marathon prep','Strength club','Yoga circle','Nutrition'])[1 + i % 5] || ' ' || i END,
           $1::int8 + members[1],
           CASE WHEN kind = 'direct' THEN $1::int8 + least(members[1], members[2]) END,
           CASE WHEN kind = 'direct' THEN $1::int8 + greatest(members[1], members[2]) END
    FROM bench_conv ORDER BY i";

/// Members since 60 days ago. `$1`: the first user's id; `$2`: the first
/// conversation's.
const PARTICIPANTS_SQL: &str = "
    INSERT INTO conversation_participants (conversation_id, user_id, joined_at)
    SELECT $2::int8 + i, $1::int8 + unnest(members), now() - interval '60 days' FROM bench_conv";

/// The messages. `$1`: the words; `$2`: the syllables of the made-up
/// words; `$3`, `$4`: the first user's and conversation's ids; `$5`: how
/// many.
///
/// A made-up word of tail rank r is three syllables picked by r × 7919 mod
/// 70³ (a bijection, so each rank is its own word). The id is a UUIDv7 of
/// the message's time, like the edge mints.
const MESSAGES_SQL: &str = "
    INSERT INTO messages (id, conversation_id, seq, sender_id, content, created_at, client_msg_id)
    SELECT (lpad(to_hex((extract(epoch FROM t.at) * 1000)::int8), 12, '0') || '7'
            || substr(md5(g::text), 1, 3) || '8' || substr(md5(g::text), 4, 15))::uuid,
           $4::int8 + c.i, g / 2000 + 1,
           $3::int8 + c.members[1 + (g / 2000) % cardinality(c.members)],
           b.body, t.at, 's-' || g
    FROM generate_series(0, $5::int8 - 1) g
    JOIN bench_conv c ON c.i = g % 2000
    CROSS JOIN LATERAL (SELECT now() - make_interval(secs => ($5::int8 - g) * 2) AS at) t
    CROSS JOIN LATERAL (
        SELECT string_agg(
                   CASE WHEN random() < 0.9
                        THEN ($1::text[])[floor(exp(random() * ln(cardinality($1::text[]) + 1)))::int]
                        ELSE ($2::text[])[1 + (x.r * 7919 % 343000) % 70]
                             || ($2::text[])[1 + (x.r * 7919 % 343000) / 70 % 70]
                             || ($2::text[])[1 + (x.r * 7919 % 343000) / 4900]
                   END, ' ') AS body
        FROM (SELECT floor(exp(random() * ln(100001)))::int8 AS r
              FROM generate_series(1, 3 + g % 17)) x) b";

/// A chat message of 3 to 19 words drawn like the generated data's (see
/// the module documentation): for benches that send text through the
/// ingest and want it to cost what real text costs to index.
pub fn chat_text(rng: &mut impl rand::Rng) -> String {
    use std::sync::OnceLock;
    static LIST: OnceLock<Vec<&'static str>> = OnceLock::new();
    let words = LIST.get_or_init(|| {
        WORDS
            .lines()
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .collect()
    });
    const SYLLABLES: &[u8] = b"bdfgklmnprstvz";
    const VOWELS: &[u8] = b"aeiou";
    let n = rng.gen_range(3..20);
    let mut out = String::new();
    for k in 0..n {
        if k > 0 {
            out.push(' ');
        }
        if rng.gen_bool(0.9) {
            let max = (words.len() as f64 + 1.0).ln();
            let i = (rng.gen_range(0.0..max).exp().floor() as usize).clamp(1, words.len());
            out.push_str(words[i - 1]);
        } else {
            let r = (rng.gen_range(0.0..100_001f64.ln()).exp().floor() as u64) * 7919 % 343_000;
            for s in [r % 70, r / 70 % 70, r / 4900] {
                out.push(SYLLABLES[(s / 5) as usize] as char);
                out.push(VOWELS[(s % 5) as usize] as char);
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
struct Fixture {
    base: String,
    token: String,
    conversations: Vec<i64>,
}

/// One kind of search and the queries it cycles through.
#[derive(Debug, Clone)]
struct Case {
    label: &'static str,
    queries: Vec<String>,
    /// Searched within one conversation: each request takes the next.
    within: Option<Vec<i64>>,
    clients: usize,
    /// Whether every answer must have hits.
    must_find: bool,
}

#[derive(Debug, Default)]
struct CaseRuns {
    p50: Vec<f64>,
    p99: Vec<f64>,
    max: Vec<f64>,
    rps: Vec<f64>,
    requests: usize,
    hits: usize,
}

pub async fn run() -> anyhow::Result<()> {
    crate::report::build("search", "the origin and the load generator");
    let runs: usize = env_or("BENCH_RUNS", 3)?;
    let requests: usize = env_or("BENCH_SEARCH_REQUESTS", 400)?;
    let explain = std::env::var("BENCH_EXPLAIN").is_ok_and(|v| v == "1");
    let (admin_client, url) = fresh_database(DB).await?;
    let (base, pool) = start_origin(&url, |_| None).await?;
    let version: String = admin_client
        .query_one("SHOW server_version", &[])
        .await?
        .get(0);
    println!("PostgreSQL {version}; load average {}", loadavg());

    let db = pool.get().await?;
    let fx = load(&db, &base).await?;
    let cases = cases(&db, &fx).await?;

    if explain {
        for case in &cases {
            explain_one(&db, &fx, case).await?;
        }
    }

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .build()?;
    // Warm-up: connections, prepared statements, the caches.
    for case in &cases {
        for i in 0..case.queries.len().min(20) {
            search(&http, &fx, case, i).await?;
        }
    }
    let mut results: Vec<CaseRuns> = cases.iter().map(|_| CaseRuns::default()).collect();
    for r in 0..runs {
        println!("run {} of {runs} (load average {})", r + 1, loadavg());
        for (case, out) in cases.iter().zip(results.iter_mut()) {
            let (hist, hits, elapsed) = measure(&http, &fx, case, requests).await?;
            out.p50.push(hist.value_at_quantile(0.5) as f64 / 1000.0);
            out.p99.push(hist.value_at_quantile(0.99) as f64 / 1000.0);
            out.max.push(hist.max() as f64 / 1000.0);
            out.rps.push(requests as f64 / elapsed.as_secs_f64());
            out.requests += requests;
            out.hits += hits;
        }
    }
    let rows: Vec<Vec<String>> = cases
        .iter()
        .zip(&results)
        .map(|(case, r)| {
            vec![
                case.label.to_owned(),
                case.clients.to_string(),
                r.requests.to_string(),
                format!("{:.1}", r.hits as f64 / r.requests.max(1) as f64),
                range(&r.p50, 2),
                range(&r.p99, 2),
                range(&r.max, 1),
                range(&r.rps, 0),
            ]
        })
        .collect();
    table(
        &format!(
            "Search, GET /api/v1/chat/search?limit=20 over HTTP: a trainer in 200 of 2,000 conversations, {MESSAGES} messages ({runs} runs, ranges over runs)"
        ),
        &[
            "case",
            "clients",
            "requests",
            "hits per answer",
            "p50 ms",
            "p99 ms",
            "max ms",
            "req/s",
        ],
        &rows,
    );
    target("search: p99 ≤ 30 ms on 1M messages for a user in 200 conversations");
    println!("load average at the end: {}", loadavg());
    drop(db);
    admin_client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)"))
        .await
        .ok();
    Ok(())
}

/// Loads the data set (see the module documentation).
async fn load(db: &deadpool_postgres::Object, base: &str) -> anyhow::Result<Fixture> {
    let started = Instant::now();
    let words: Vec<String> = WORDS
        .lines()
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect();
    let syllables: Vec<String> = "bdfgklmnprstvz"
        .chars()
        .flat_map(|c| "aeiou".chars().map(move |v| format!("{c}{v}")))
        .collect();
    let index: String = db
        .query_one(
            "SELECT pg_get_indexdef('messages_search_idx'::regclass)",
            &[],
        )
        .await
        .context("the search index (migration 0008)")?
        .get(0);
    db.batch_execute("DROP INDEX messages_search_idx").await?;
    db.batch_execute(SHAPE).await?;
    let first_user: i64 = db.query_one("SELECT min(id) FROM users", &[]).await?.get(0);
    db.execute(CONVERSATIONS_SQL, &[&first_user]).await?;
    let first_conversation: i64 = db
        .query_one("SELECT min(id) FROM conversations", &[])
        .await?
        .get(0);
    // The conversations were numbered in order: check before relying on it.
    let in_order: i64 = db
        .query_one(
            "SELECT count(*) FROM conversations c JOIN bench_conv b ON c.id = $1::int8 + b.i
             WHERE c.kind = b.kind AND c.created_by = $2::int8 + b.members[1]",
            &[&first_conversation, &first_user],
        )
        .await?
        .get(0);
    if in_order != CONVERSATIONS {
        bail!("conversations not numbered in order ({in_order} of {CONVERSATIONS})");
    }
    db.execute(PARTICIPANTS_SQL, &[&first_user, &first_conversation])
        .await?;
    println!("generating {MESSAGES} messages…");
    db.execute(
        MESSAGES_SQL,
        &[
            &words,
            &syllables,
            &first_user,
            &first_conversation,
            &MESSAGES,
        ],
    )
    .await?;
    db.batch_execute(
        "UPDATE conversations c SET last_seq = m.s, updated_at = m.t
         FROM (SELECT conversation_id, max(seq) AS s, max(created_at) AS t
               FROM messages GROUP BY 1) m
         WHERE m.conversation_id = c.id;
         DROP TABLE bench_conv;",
    )
    .await?;
    let loaded = started.elapsed();
    let indexing = Instant::now();
    db.batch_execute(&format!(
        "SET maintenance_work_mem = '256MB'; {index}; RESET maintenance_work_mem"
    ))
    .await?;
    let indexed = indexing.elapsed();
    // One statement each: VACUUM cannot run in the implicit transaction of
    // a multi-statement string.
    db.batch_execute("VACUUM ANALYZE messages").await?;
    db.batch_execute("ANALYZE").await?;
    let sizes = db
        .query_one(
            "SELECT pg_size_pretty(pg_table_size('messages')),
                    pg_size_pretty(pg_relation_size('messages_search_idx')),
                    pg_size_pretty(pg_indexes_size('messages'))",
            &[],
        )
        .await?;
    let (heap, gin, indexes): (String, String, String) = (sizes.get(0), sizes.get(1), sizes.get(2));
    println!(
        "loaded in {:.1} s, search index built in {:.1} s; messages {heap}, messages_search_idx {gin} (all its indexes {indexes})",
        loaded.as_secs_f64(),
        indexed.as_secs_f64()
    );
    let trainer = first_user;
    let conversations: Vec<i64> = db
        .query_one(
            "SELECT array_agg(conversation_id ORDER BY conversation_id)
             FROM conversation_participants WHERE user_id = $1",
            &[&trainer],
        )
        .await?
        .get(0);
    if conversations.len() != 200 {
        bail!(
            "the trainer is in {} conversations, not 200",
            conversations.len()
        );
    }
    let now = chrono::Utc::now().timestamp();
    let token = shared::auth::issue(
        &Claims::new(
            trainer,
            "Trainer",
            Role::Trainer,
            AUDIENCE_API,
            now,
            24 * 3600,
        ),
        JWT_SECRET.as_bytes(),
    )?;
    Ok(Fixture {
        base: base.to_owned(),
        token,
        conversations,
    })
}

/// The cases, with queries chosen from the data: rare words are read from
/// the trainer's own conversations' vectors.
async fn cases(db: &deadpool_postgres::Object, fx: &Fixture) -> anyhow::Result<Vec<Case>> {
    let list = fx
        .conversations
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let rare: Vec<String> = db
        .query(
            &format!(
                "SELECT word FROM ts_stat('SELECT search_vector FROM messages
                                           WHERE conversation_id IN ({list})')
                 WHERE ndoc BETWEEN 2 AND 10 AND word ~ '^[a-z]+$'
                 ORDER BY md5(word) LIMIT 60"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if rare.len() < 20 {
        bail!("only {} rare words found", rare.len());
    }
    let common = ["great", "workout", "today", "good", "thanks", "session"];
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    // A few of the trainer's conversations, spread over the list.
    let some: Vec<i64> = fx.conversations.iter().step_by(7).copied().collect();
    Ok(vec![
        Case {
            label: "rare word",
            queries: rare.clone(),
            within: None,
            clients: 1,
            must_find: true,
        },
        Case {
            label: "common word (4 % of messages)",
            queries: strings(&common),
            within: None,
            clients: 1,
            must_find: true,
        },
        Case {
            label: "prefix of the last word",
            queries: strings(&[
                "dead", "squ", "stre", "work", "prot", "kettl", "mara", "bre",
            ]),
            within: None,
            clients: 1,
            must_find: true,
        },
        Case {
            label: "phrase",
            queries: strings(&[
                "\"great workout\"",
                "\"good session\"",
                "\"training tomorrow\"",
                "\"thanks coach\"",
            ]),
            within: None,
            clients: 1,
            must_find: true,
        },
        Case {
            label: "two words",
            queries: strings(&[
                "deadlift form",
                "squat depth",
                "protein breakfast",
                "knee pain",
                "marathon pace",
            ]),
            within: None,
            clients: 1,
            must_find: true,
        },
        Case {
            label: "common word, one conversation",
            queries: strings(&common),
            within: Some(some.clone()),
            clients: 1,
            must_find: false,
        },
        Case {
            label: "rare word, one conversation",
            queries: rare,
            within: Some(some),
            clients: 1,
            must_find: false,
        },
        Case {
            label: "common word, 4 clients at once",
            queries: strings(&common),
            within: None,
            clients: 4,
            must_find: true,
        },
    ])
}

/// The `i`th request of `case`: its hits.
async fn search(
    http: &reqwest::Client,
    fx: &Fixture,
    case: &Case,
    i: usize,
) -> anyhow::Result<usize> {
    let q = &case.queries[i % case.queries.len()];
    let mut req = http
        .get(format!("{}/api/v1/chat/search", fx.base))
        .bearer_auth(&fx.token)
        .query(&[("q", q.as_str()), ("limit", "20")]);
    if let Some(within) = &case.within {
        req = req.query(&[("conversation_id", within[i % within.len()])]);
    }
    let res = req.send().await?;
    let status = res.status();
    if !status.is_success() {
        bail!(
            "{q:?} answered {status}: {}",
            res.text().await.unwrap_or_default()
        );
    }
    let body: Value = res.json().await?;
    let hits = body["hits"].as_array().map_or(0, Vec::len);
    if case.must_find && hits == 0 {
        bail!("{:?} ({}) found nothing", q, case.label);
    }
    Ok(hits)
}

/// `requests` searches of `case` from its clients: latency (µs), hits, wall
/// time.
async fn measure(
    http: &reqwest::Client,
    fx: &Fixture,
    case: &Case,
    requests: usize,
) -> anyhow::Result<(Histogram<u64>, usize, Duration)> {
    let fx = Arc::new(fx.clone());
    let case = Arc::new(case.clone());
    let per_client = requests / case.clients;
    let started = Instant::now();
    let tasks = (0..case.clients).map(|c| {
        let http = http.clone();
        let fx = fx.clone();
        let case = case.clone();
        tokio::spawn(async move {
            let mut hist = micros_histogram()?;
            let mut hits = 0;
            for k in 0..per_client {
                let t = Instant::now();
                hits += search(&http, &fx, &case, c * per_client + k).await?;
                hist.record(t.elapsed().as_micros() as u64)?;
            }
            Ok::<_, anyhow::Error>((hist, hits))
        })
    });
    let mut total = micros_histogram()?;
    let mut hits = 0;
    for r in futures::future::join_all(tasks).await {
        let (h, n) = r??;
        total.add(h)?;
        hits += n;
    }
    Ok((total, hits, started.elapsed()))
}

/// Prints `EXPLAIN (ANALYZE, BUFFERS)` of the first query of `case`, built
/// and run as the origin does.
async fn explain_one(
    db: &deadpool_postgres::Object,
    fx: &Fixture,
    case: &Case,
) -> anyhow::Result<()> {
    use origin::search::{BUILD_QUERY, RANK_WINDOW, SEARCH_GUARD, search_hits, terms};
    let q = &case.queries[0];
    let t = terms(q);
    let tsquery: String = db
        .query_one(BUILD_QUERY, &[&t.web, &t.prefix])
        .await?
        .get(0);
    let conversations = match &case.within {
        Some(within) => vec![within[0]],
        None => fx.conversations.clone(),
    };
    let trainer: i64 = db.query_one("SELECT min(id) FROM users", &[]).await?.get(0);
    let seqs: i64 = db
        .query_one(
            "SELECT COALESCE(sum(last_seq), 0)::int8 FROM conversations WHERE id = ANY($1)",
            &[&conversations],
        )
        .await?
        .get(0);
    db.batch_execute(&format!("BEGIN; {SEARCH_GUARD}")).await?;
    let rows = db
        .query(
            &format!(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {}",
                search_hits(seqs)
            ),
            &[
                &tsquery,
                &conversations,
                &RANK_WINDOW,
                &21i64,
                &trainer,
                &None::<f32>,
                &None::<chrono::DateTime<chrono::Utc>>,
                &None::<uuid::Uuid>,
            ],
        )
        .await;
    db.batch_execute("ROLLBACK").await?;
    println!("\n#### {} — q={q:?} → {tsquery}\n", case.label);
    for row in rows? {
        let line: String = row.get(0);
        println!("    {}", elide_arrays(&line));
    }
    Ok(())
}

/// `line` with each array literal `'{…}'` shortened.
fn elide_arrays(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find("'{") {
        out.push_str(&rest[..start]);
        match rest[start..].find("}'") {
            Some(end) => {
                out.push_str("'{…}'");
                rest = &rest[start + end + 2..];
            }
            None => {
                rest = &rest[start..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}
