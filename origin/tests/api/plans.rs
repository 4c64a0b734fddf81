//! The ingest's plans stay on its indexes whatever PostgreSQL's statistics
//! say (`origin/src/ingest.rs` explains how).
//!
//! The fixture is the case that once broke it: statistics taken while the
//! tables were tiny, then a busy room of 60,000 messages from one sender, a
//! trainer in 3,000 conversations, and no `ANALYZE` since. Every plan is
//! checked both as a custom plan (the parameters known) and as a generic
//! plan (the one a prepared statement keeps).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool};
use futures::StreamExt;
use futures::future::BoxFuture;
use origin::ingest::{self, PLANNER_GUARD, STATEMENTS};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::protocol::internal::{Change, IngestBatch, ReceiptUpdate, StoredChange, StoredMessage};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls};
use uuid::Uuid;

use crate::helpers::{TestApp, spawn_app, url_for};

/// The only indexes the ingest may read each table through, and the key
/// columns its condition must bind: a lookup, never a range of the table.
const KEY_INDEXES: &[(&str, &str, &[&str])] = &[
    ("messages", "messages_pkey", &["id"]),
    // Whether a message holds an event's seq (one probe per event).
    (
        "messages",
        "messages_conversation_seq_unique",
        &["conversation_id", "seq"],
    ),
    // Change events: by id, whether one holds a message's seq, and a
    // message's events (the catch-up, the erasure of a deleted one).
    ("message_events", "message_events_pkey", &["id"]),
    (
        "message_events",
        "message_events_seq_unique",
        &["seq", "conversation_id"],
    ),
    (
        "message_events",
        "message_events_target_idx",
        &["target_id"],
    ),
    ("conversations", "conversations_pkey", &["id"]),
    ("users", "users_pkey", &["id"]),
    (
        "conversation_participants",
        "conversation_participants_pkey",
        &["conversation_id", "user_id"],
    ),
    (
        "conversation_memberships",
        "conversation_memberships_member_idx",
        &["conversation_id", "user_id"],
    ),
    (
        "push_notified",
        "push_notified_pkey",
        &["user_id", "conversation_id"],
    ),
    // A message's attachments, by id; a deleted message's, by message.
    ("attachments", "attachments_pkey", &["id"]),
    ("attachments", "attachments_message_idx", &["message_id"]),
    // Whether a recipient can be pushed at all (one lookup per member).
    (
        "push_subscriptions",
        "push_subscriptions_user_id_idx",
        &["user_id"],
    ),
];

/// Messages in the busy room.
const ROOM_MESSAGES: i64 = 60_000;
/// Conversations besides the busy room, each with the trainer and 4 others.
const OTHER_CONVERSATIONS: i64 = 3_000;

/// What the fixture created.
struct Fixture {
    trainer: i64,
    member: i64,
    /// A user who is in no conversation with the trainer's room.
    outsider: i64,
    room: i64,
    /// The first of the other conversations (ids are consecutive).
    first_other: i64,
}

async fn connect(app: &TestApp) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&url_for(&app.db_name), NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

/// The tiny start: a trainer, a member, a room with three messages.
async fn tiny_start(db: &tokio_postgres::Client) -> Fixture {
    db.batch_execute(
        "INSERT INTO users (email, full_name, role, password_hash) VALUES
             ('trainer@plans.test', 'Trainer', 'trainer', 'x'),
             ('member@plans.test', 'Member', 'member', 'x'),
             ('outsider@plans.test', 'Outsider', 'member', 'x');
         INSERT INTO conversations (kind, name, created_by)
             SELECT 'group', 'Busy room', id FROM users WHERE email = 'trainer@plans.test';
         INSERT INTO conversation_participants (conversation_id, user_id, joined_at)
             SELECT c.id, u.id, now() - interval '1 day' FROM conversations c, users u
             WHERE u.email IN ('trainer@plans.test', 'member@plans.test');
         INSERT INTO messages (id, conversation_id, seq, sender_id, content, created_at, client_msg_id)
             SELECT gen_random_uuid(), c.id, g, u.id, 'message ' || g, now() - interval '1 hour', 'k' || g
             FROM generate_series(1, 3) g, conversations c, users u
             WHERE u.email = 'trainer@plans.test';
         -- The member can be pushed (a member without a subscription gets
         -- no job).
         INSERT INTO push_subscriptions (user_id, endpoint, p256dh, auth)
             SELECT id, 'https://fcm.googleapis.com/fcm/send/' || id,
                    decode(repeat('04', 65), 'hex'), decode(repeat('00', 16), 'hex')
             FROM users WHERE email = 'member@plans.test';",
    )
    .await
    .expect("tiny start");
    let id = |email: &'static str| async move {
        db.query_one("SELECT id FROM users WHERE email = $1", &[&email])
            .await
            .expect("user")
            .get::<_, i64>(0)
    };
    let trainer = id("trainer@plans.test").await;
    let member = id("member@plans.test").await;
    let outsider = id("outsider@plans.test").await;
    let room: i64 = db
        .query_one("SELECT id FROM conversations", &[])
        .await
        .expect("room")
        .get(0);
    Fixture {
        trainer,
        member,
        outsider,
        room,
        first_other: room + 1,
    }
}

/// Statistics of the tiny tables, then the bulk: no `ANALYZE` after it.
async fn grow_with_stale_statistics(db: &tokio_postgres::Client, fx: &Fixture) {
    db.batch_execute("ANALYZE").await.expect("analyze");
    db.execute(
        "INSERT INTO users (email, full_name, role, password_hash)
         SELECT 'bulk' || g || '@plans.test', 'Bulk ' || g, 'member', 'x'
         FROM generate_series(1, $1::int8) g",
        &[&OTHER_CONVERSATIONS],
    )
    .await
    .expect("users");
    // Most of them can be pushed: a table the planner thinks is tiny.
    db.execute(
        "INSERT INTO push_subscriptions (user_id, endpoint, p256dh, auth)
         SELECT id, 'https://fcm.googleapis.com/fcm/send/' || id,
                decode(repeat('04', 65), 'hex'), decode(repeat('00', 16), 'hex')
         FROM users WHERE email LIKE 'bulk%' AND id % 3 <> 0",
        &[],
    )
    .await
    .expect("subscriptions");
    db.execute(
        "INSERT INTO conversations (kind, name, created_by)
         SELECT 'group', 'Group ' || g, $1 FROM generate_series(1, $2::int8) g",
        &[&fx.trainer, &OTHER_CONVERSATIONS],
    )
    .await
    .expect("conversations");
    // The trainer in every conversation, and four bulk users in each.
    db.execute(
        "INSERT INTO conversation_participants (conversation_id, user_id, joined_at)
         SELECT c.id, $1, now() - interval '1 day' FROM conversations c WHERE c.id <> $2
         UNION ALL
         SELECT c.id, b.first + (c.id * 4 + k) % $3::int8, now() - interval '1 day'
         FROM conversations c, generate_series(0, 3) k,
              (SELECT min(id) AS first FROM users WHERE email LIKE 'bulk%') b
         WHERE c.id <> $2",
        &[&fx.trainer, &fx.room, &OTHER_CONVERSATIONS],
    )
    .await
    .expect("participants");
    db.execute(
        "INSERT INTO messages (id, conversation_id, seq, sender_id, content, created_at, client_msg_id)
         SELECT gen_random_uuid(), $1, g, $2, 'message ' || g, now() - interval '1 hour', 'k' || g
         FROM generate_series(4, $3::int8) g",
        &[&fx.room, &fx.trainer, &ROOM_MESSAGES],
    )
    .await
    .expect("messages");
    // The statistics really are stale: they still describe the tiny tables.
    let (analyzed, actual): (f32, i64) = {
        let r = db
            .query_one(
                "SELECT c.reltuples, (SELECT count(*) FROM messages)
                 FROM pg_class c WHERE c.relname = 'messages'",
                &[],
            )
            .await
            .expect("reltuples");
        (r.get(0), r.get(1))
    };
    assert_eq!(actual, ROOM_MESSAGES);
    assert!(analyzed < 10.0, "messages looks analyzed: {analyzed}");
}

/// A batch the edge could send: `replayed` messages the room already stored
/// (read back from PostgreSQL, so identical) and `new` ones after them, from
/// the trainer.
async fn room_batch(
    db: &tokio_postgres::Client,
    fx: &Fixture,
    replayed: i64,
    new: i64,
) -> Vec<StoredMessage> {
    let rows = db
        .query(
            "SELECT id, seq, content, created_at, client_msg_id FROM messages
             WHERE conversation_id = $1 ORDER BY seq DESC LIMIT $2",
            &[&fx.room, &replayed],
        )
        .await
        .expect("stored");
    let last: i64 = rows.first().map_or(0, |r| r.get(1));
    let mut batch: Vec<StoredMessage> = rows
        .iter()
        .map(|r| StoredMessage {
            id: r.get(0),
            conversation_id: fx.room,
            seq: r.get(1),
            sender_id: fx.trainer,
            content: r.get(2),
            created_at: r.get(3),
            client_msg_id: r.get(4),
            attachment_ids: Vec::new(),
            ..Default::default()
        })
        .collect();
    batch.extend((last + 1..=last + new).map(|seq| StoredMessage {
        id: Uuid::now_v7(),
        conversation_id: fx.room,
        seq,
        sender_id: fx.trainer,
        content: format!("message {seq}"),
        created_at: Utc::now(),
        client_msg_id: format!("fresh-{seq}"),
        // Every fifth new message carries an upload (unknown here: linking
        // skips it, and the lookup still runs).
        attachment_ids: if seq % 5 == 0 {
            vec![Uuid::now_v7(), Uuid::now_v7()]
        } else {
            Vec::new()
        },
        ..Default::default()
    }));
    batch
}

/// Receipts of the trainer in many conversations, the member in the room,
/// and the outsider (not a member), sorted as the ingest sends them.
fn receipts(fx: &Fixture, conversations: i64, seq: i64) -> Vec<(i64, i64, i64, i64)> {
    let mut out = vec![
        (fx.room, fx.trainer, seq, seq),
        (fx.room, fx.member, seq, seq - 1),
        (fx.room, fx.outsider, seq, seq),
    ];
    out.extend((0..conversations).map(|i| (fx.first_other + i, fx.trainer, 1, 1)));
    out.sort_unstable();
    out
}

type Params = Vec<Box<dyn ToSql + Sync>>;

/// Parameters like the ingest's own for each statement: 1,000 messages
/// (half replayed), hundreds of conversations and receipts.
async fn representative_params(db: &tokio_postgres::Client, fx: &Fixture, name: &str) -> Params {
    let batch = room_batch(db, fx, 500, 500).await;
    let ids: Vec<Uuid> = batch.iter().map(|m| m.id).collect();
    let convs: Vec<i64> = batch.iter().map(|m| m.conversation_id).collect();
    let senders: Vec<i64> = batch.iter().map(|m| m.sender_id).collect();
    let sent: Vec<DateTime<Utc>> = batch.iter().map(|m| m.created_at).collect();
    let some_conversations: Vec<i64> = (fx.room..fx.room + 300).collect();
    match name {
        "lock_conversations" => vec![Box::new(some_conversations)],
        "known_users" => vec![Box::new(vec![fx.trainer, fx.member, fx.outsider])],
        "not_members" => vec![
            Box::new(ids),
            Box::new(convs),
            Box::new(senders),
            Box::new(sent),
            Box::new(ingest::MEMBERSHIP_SKEW_SECS),
        ],
        "upsert_messages" => vec![
            Box::new(ids),
            Box::new(convs),
            Box::new(batch.iter().map(|m| m.seq).collect::<Vec<i64>>()),
            Box::new(senders),
            Box::new(batch.iter().map(|m| m.content.clone()).collect::<Vec<_>>()),
            Box::new(sent),
            Box::new(
                batch
                    .iter()
                    .map(|m| m.client_msg_id.clone())
                    .collect::<Vec<_>>(),
            ),
            // Every third answers the one before; every fifth mentions.
            Box::new(
                batch
                    .iter()
                    .enumerate()
                    .map(|(i, _)| (i % 3 == 2).then(|| batch[i - 1].id))
                    .collect::<Vec<Option<Uuid>>>(),
            ),
            Box::new(
                batch
                    .iter()
                    .enumerate()
                    .map(|(i, _)| {
                        if i % 5 == 0 {
                            format!("{{{}}}", fx.member)
                        } else {
                            "{}".to_owned()
                        }
                    })
                    .collect::<Vec<String>>(),
            ),
            // None deleted before it was flushed.
            Box::new(vec![None::<chrono::DateTime<Utc>>; batch.len()]),
        ],
        "event_targets" => vec![Box::new(ids)],
        "upsert_events" => {
            // 500 changes to the batch's messages: edits, deletes, reactions.
            let n = 500usize;
            let kinds: Vec<&str> = (0..n).map(|i| ["edit", "delete", "react"][i % 3]).collect();
            let events: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
            vec![
                Box::new(events),
                Box::new(vec![fx.room; n]),
                Box::new((0..n as i64).map(|i| 1_000_000 + i).collect::<Vec<i64>>()),
                Box::new(vec![fx.trainer; n]),
                Box::new((0..n).map(|i| format!("e{i}")).collect::<Vec<String>>()),
                Box::new(ids[..n].to_vec()),
                Box::new(
                    kinds
                        .iter()
                        .map(|k| (*k).to_owned())
                        .collect::<Vec<String>>(),
                ),
                Box::new(
                    kinds
                        .iter()
                        .map(|k| (*k == "edit").then(|| "edited".to_owned()))
                        .collect::<Vec<Option<String>>>(),
                ),
                Box::new(
                    kinds
                        .iter()
                        .map(|k| (*k == "react").then(|| "👍".to_owned()))
                        .collect::<Vec<Option<String>>>(),
                ),
                Box::new(
                    kinds
                        .iter()
                        .map(|k| (*k == "react").then_some(true))
                        .collect::<Vec<Option<bool>>>(),
                ),
                Box::new(vec![Utc::now(); n]),
            ]
        }
        "catch_up" => vec![Box::new(ids), Box::new(convs)],
        "apply_edits" => {
            let n = ids.len();
            vec![
                Box::new(ids),
                Box::new(convs),
                Box::new(senders),
                Box::new(vec!["edited".to_owned(); n]),
                Box::new(sent),
                Box::new((0..n as i64).map(|i| 1_000_000 + i).collect::<Vec<i64>>()),
            ]
        }
        "apply_deletes" => vec![Box::new(ids), Box::new(sent)],
        "advance_conversations" => {
            let seqs: Vec<i64> = some_conversations.iter().map(|_| 7).collect();
            let ats: Vec<DateTime<Utc>> = some_conversations.iter().map(|_| Utc::now()).collect();
            vec![Box::new(some_conversations), Box::new(seqs), Box::new(ats)]
        }
        "apply_receipts" => {
            let r = receipts(fx, 300, 10);
            vec![
                Box::new(r.iter().map(|r| r.0).collect::<Vec<_>>()),
                Box::new(r.iter().map(|r| r.1).collect::<Vec<_>>()),
                Box::new(r.iter().map(|r| r.2).collect::<Vec<_>>()),
                Box::new(r.iter().map(|r| r.3).collect::<Vec<_>>()),
            ]
        }
        "schedule_clears" => {
            let r = receipts(fx, 300, 10);
            vec![
                Box::new(r.iter().map(|r| r.0).collect::<Vec<_>>()),
                Box::new(r.iter().map(|r| r.1).collect::<Vec<_>>()),
                Box::new(r.iter().map(|r| r.3).collect::<Vec<_>>()),
            ]
        }
        "enqueue_push" => {
            // The room's batch, and a message from the trainer in each of
            // 300 other conversations (five members each).
            let mut convs = convs;
            let mut seqs: Vec<i64> = batch.iter().map(|m| m.seq).collect();
            let mut senders = senders;
            for c in some_conversations.iter().skip(1) {
                convs.push(*c);
                seqs.push(1);
                senders.push(fx.trainer);
            }
            vec![
                Box::new(convs),
                Box::new(seqs),
                Box::new(senders),
                Box::new(3.0f64),
                Box::new(30.0f64),
            ]
        }
        "link_attachments" => {
            let links: Vec<&StoredMessage> = batch.iter().cycle().take(1_000).collect();
            let mut ids: Vec<Uuid> = links.iter().map(|_| Uuid::now_v7()).collect();
            ids.sort_unstable();
            vec![
                Box::new(ids),
                Box::new(links.iter().map(|m| m.id).collect::<Vec<_>>()),
                Box::new(links.iter().map(|m| m.conversation_id).collect::<Vec<_>>()),
                Box::new(links.iter().map(|m| m.sender_id).collect::<Vec<_>>()),
                Box::new(links.iter().map(|m| m.seq).collect::<Vec<_>>()),
                Box::new((0..1_000).map(|i| (i % 10) as i16).collect::<Vec<i16>>()),
            ]
        }
        other => panic!("no representative parameters for the statement {other}: add them"),
    }
}

/// Whether `cond` names `column` as a whole word.
fn mentions(cond: &str, column: &str) -> bool {
    cond.match_indices(column).any(|(at, _)| {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        !cond[..at].ends_with(word) && !cond[at + column.len()..].starts_with(word)
    })
}

/// Everything in `plan` (an `EXPLAIN (FORMAT JSON)` node) that reads a
/// table other than by a key lookup on one of [`KEY_INDEXES`], and every
/// table the plan reads.
fn check_plan(plan: &Value, violations: &mut Vec<String>, read: &mut BTreeSet<String>) {
    let node = plan["Node Type"].as_str().unwrap_or("?");
    let relation = plan["Relation Name"].as_str();
    match node {
        "Index Scan" | "Index Only Scan" | "Bitmap Index Scan" => {
            let index = plan["Index Name"].as_str().unwrap_or("?");
            let cond = plan["Index Cond"].as_str().unwrap_or("");
            match KEY_INDEXES.iter().find(|(_, i, _)| *i == index) {
                Some((table, _, keys)) => {
                    read.insert((*table).to_owned());
                    let unbound: Vec<&&str> = keys.iter().filter(|k| !mentions(cond, k)).collect();
                    if !unbound.is_empty() {
                        violations.push(format!(
                            "{node} on {index} does not bind {unbound:?} (condition: {cond:?})"
                        ));
                    }
                }
                None => violations.push(format!(
                    "{node} on {index} ({}), not a key index",
                    relation.unwrap_or("?")
                )),
            }
        }
        // Reads what its Bitmap Index Scan children found.
        "Bitmap Heap Scan" | "ModifyTable" => {}
        _ => {
            if let Some(relation) = relation {
                violations.push(format!("{node} on {relation}"));
            }
        }
    }
    for child in plan["Plans"].as_array().into_iter().flatten() {
        check_plan(child, violations, read);
    }
}

/// [`check_plan`] on a whole plan document.
fn plan_problems(doc: &Value) -> (Vec<String>, BTreeSet<String>) {
    let mut violations = Vec::new();
    let mut read = BTreeSet::new();
    let plan = doc.get(0).map_or(&doc["Plan"], |first| &first["Plan"]);
    assert!(plan.is_object(), "not a plan: {doc}");
    check_plan(plan, &mut violations, &mut read);
    (violations, read)
}

/// The table each statement exists to read.
fn reads(name: &str) -> &'static str {
    match name {
        "lock_conversations" | "advance_conversations" => "conversations",
        "known_users" => "users",
        "not_members" => "conversation_memberships",
        "upsert_messages" | "event_targets" | "apply_edits" | "apply_deletes" => "messages",
        "upsert_events" | "catch_up" => "message_events",
        "apply_receipts" | "enqueue_push" => "conversation_participants",
        "schedule_clears" => "push_notified",
        "link_attachments" => "attachments",
        other => panic!("which table does {other} read?"),
    }
}

/// `EXPLAIN (FORMAT JSON)` of every ingest statement under the ingest's
/// guard, as a custom plan with representative parameters and as a generic
/// plan; panics with every plan that leaves the key indexes.
async fn assert_every_statement_plans_key_lookups(
    db: &tokio_postgres::Client,
    fx: &Fixture,
    state: &str,
) {
    let mut problems = Vec::new();
    for (name, sql) in STATEMENTS {
        let params = representative_params(db, fx, name).await;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
        let arity = db.prepare(sql).await.expect("prepare").params().len();
        assert_eq!(arity, refs.len(), "{name}: parameters");

        db.batch_execute(&format!("BEGIN; {PLANNER_GUARD}"))
            .await
            .expect("begin");
        let custom: Value = db
            .query_one(&format!("EXPLAIN (FORMAT JSON) {sql}"), &refs)
            .await
            .expect("explain")
            .get(0);
        db.batch_execute(&format!(
            "SET LOCAL plan_cache_mode = force_generic_plan; PREPARE plan_check AS {sql}"
        ))
        .await
        .expect("prepare");
        let nulls = vec!["NULL"; arity].join(", ");
        let generic: Value = db
            .query_one(
                &format!("EXPLAIN (FORMAT JSON) EXECUTE plan_check({nulls})"),
                &[],
            )
            .await
            .expect("explain generic")
            .get(0);
        db.batch_execute("ROLLBACK; DEALLOCATE plan_check")
            .await
            .expect("rollback");

        for (mode, doc) in [("custom", &custom), ("generic", &generic)] {
            let (violations, read) = plan_problems(doc);
            problems.extend(
                violations
                    .iter()
                    .map(|v| format!("{state}, {name}, {mode} plan: {v}\n{doc:#}")),
            );
            if !read.contains(reads(name)) {
                problems.push(format!(
                    "{state}, {name}, {mode} plan: does not read {} by key\n{doc:#}",
                    reads(name)
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[tokio::test]
async fn every_ingest_statement_plans_key_lookups_before_any_analyze_and_on_stale_statistics() {
    let app = spawn_app().await;
    let db = connect(&app).await;
    let fx = tiny_start(&db).await;
    assert_every_statement_plans_key_lookups(&db, &fx, "never analyzed").await;
    grow_with_stale_statistics(&db, &fx).await;
    assert_every_statement_plans_key_lookups(&db, &fx, "stale statistics").await;

    // The check is not blind: a scan of the table, or a lookup through
    // another index, is reported.
    for sql in [
        "SELECT count(*) FROM messages",
        "SELECT id FROM messages WHERE sender_id = 1",
    ] {
        db.batch_execute(&format!("BEGIN; {PLANNER_GUARD}"))
            .await
            .expect("begin");
        let doc: Value = db
            .query_one(&format!("EXPLAIN (FORMAT JSON) {sql}"), &[])
            .await
            .expect("explain")
            .get(0);
        db.batch_execute("ROLLBACK").await.expect("rollback");
        assert!(!plan_problems(&doc).0.is_empty(), "{sql} passed: {doc:#}");
    }

    // And the route still answers as it did, on these statistics: stored
    // once, replayed identically, the rest of the room untouched.
    let batch = json!({ "messages": room_batch(&db, &fx, 200, 300).await });
    let (status, first) = app
        .internal_post("/internal/v1/messages/batch", &batch)
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["stored"].as_array().map(Vec::len), Some(500));
    assert_eq!(first["rejected"], json!([]));
    assert_eq!(
        first["members_versions"],
        json!([{"conversation_id": fx.room, "members_version": 1}])
    );
    let (status, again) = app
        .internal_post("/internal/v1/messages/batch", &batch)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, first);
    assert_eq!(
        app.count("SELECT count(*) FROM messages").await,
        ROOM_MESSAGES + 300
    );
    assert_eq!(
        app.count(&format!(
            "SELECT last_seq FROM conversations WHERE id = {}",
            fx.room
        ))
        .await,
        ROOM_MESSAGES + 300
    );
}

/// Connects with every plan the server runs (foreign-key checks included)
/// sent back as a notice, and `plan_cache_mode` set to `mode`.
#[derive(Debug)]
struct ExplainEverything {
    mode: &'static str,
    notices: mpsc::UnboundedSender<String>,
}

impl deadpool_postgres::Connect for ExplainEverything {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> BoxFuture<'_, Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error>>
    {
        let pg_config = pg_config.clone();
        let notices = self.notices.clone();
        let mode = self.mode;
        Box::pin(async move {
            let (client, mut conn) = pg_config.connect(NoTls).await?;
            let task = tokio::spawn(async move {
                let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(AsyncMessage::Notice(n)) => {
                            let _ = notices.send(n.message().to_owned());
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            client
                .batch_execute(&format!(
                    "LOAD 'auto_explain';
                     SET auto_explain.log_min_duration = 0;
                     SET auto_explain.log_nested_statements = on;
                     SET auto_explain.log_format = json;
                     SET auto_explain.log_level = notice;
                     SET plan_cache_mode = {mode};"
                ))
                .await?;
            Ok((client, task))
        })
    }
}

/// A pool of one connection whose executed plans arrive on the receiver.
fn explaining_pool(app: &TestApp, mode: &'static str) -> (Pool, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let config: tokio_postgres::Config = url_for(&app.db_name).parse().expect("url");
    let manager = Manager::from_connect(
        config,
        ExplainEverything { mode, notices: tx },
        ManagerConfig::default(),
    );
    let pool = Pool::builder(manager).max_size(1).build().expect("pool");
    (pool, rx)
}

fn receipt_updates(r: &[(i64, i64, i64, i64)]) -> Vec<ReceiptUpdate> {
    r.iter()
        .map(
            |&(conversation_id, user_id, delivered_seq, read_seq)| ReceiptUpdate {
                conversation_id,
                user_id,
                delivered_seq,
                read_seq,
            },
        )
        .collect()
}

#[tokio::test]
async fn a_real_ingest_on_stale_statistics_executes_only_key_lookups_foreign_key_checks_included() {
    let app = spawn_app().await;
    let db = connect(&app).await;
    let fx = tiny_start(&db).await;
    grow_with_stale_statistics(&db, &fx).await;

    for (mode, seq) in [("force_custom_plan", 100), ("force_generic_plan", 200)] {
        let (pool, mut plans) = explaining_pool(&app, mode);
        let mut messages = room_batch(&db, &fx, 400, 500).await;
        let fresh: Vec<Uuid> = messages[400..].iter().map(|m| m.id).collect();
        // A different message at a taken seq, and one from a non-member.
        let mut conflict = messages[0].clone();
        conflict.id = Uuid::now_v7();
        conflict.client_msg_id = format!("other-{mode}");
        let mut outsider = messages[499].clone();
        outsider.id = Uuid::now_v7();
        outsider.seq += 1_000;
        outsider.sender_id = fx.outsider;
        outsider.client_msg_id = format!("outsider-{mode}");
        messages.extend([conflict.clone(), outsider.clone()]);
        // Changes to older messages of the room: an edit, a reaction from
        // the member, a delete (at seqs no message will take).
        let first = if mode == "force_custom_plan" { 10 } else { 20 };
        let targets = db
            .query(
                "SELECT id FROM messages WHERE conversation_id = $1 AND seq BETWEEN $2 AND $2 + 2
                 ORDER BY seq",
                &[&fx.room, &first],
            )
            .await
            .expect("targets");
        let changes = [
            (
                fx.trainer,
                Change::Edit {
                    content: "edited".to_owned(),
                },
            ),
            (
                fx.member,
                Change::React {
                    emoji: "👍".to_owned(),
                    on: true,
                },
            ),
            (fx.trainer, Change::Delete),
        ];
        let events: Vec<StoredMessage> = changes
            .into_iter()
            .zip(&targets)
            .enumerate()
            .map(|(i, ((actor, change), target))| StoredMessage {
                id: Uuid::now_v7(),
                conversation_id: fx.room,
                seq: 10_000_000 + first * 10 + i as i64,
                sender_id: actor,
                created_at: Utc::now(),
                client_msg_id: format!("change-{mode}-{i}"),
                change: Some(StoredChange {
                    target_id: target.get(0),
                    change,
                }),
                ..Default::default()
            })
            .collect();
        messages.extend(events.iter().cloned());
        let batch = IngestBatch {
            messages,
            receipts: receipt_updates(&receipts(&fx, 200, seq)),
            report: None,
        };

        // Twice: the second call runs the plans the connection kept.
        for call in ["first", "replay"] {
            let push = Some(ingest::Enqueue::new(std::time::Duration::from_secs(3)));
            let result = ingest::ingest(&pool, batch.clone(), push)
                .await
                .expect("ingest");
            assert_eq!(result.stored.len(), 903, "{mode} {call}");
            assert!(fresh.iter().all(|id| result.stored.contains(id)));
            assert!(events.iter().all(|e| result.stored.contains(&e.id)));
            let mut rejected: Vec<(Uuid, &str)> = result
                .rejected
                .iter()
                .map(|r| (r.id, r.code.as_str()))
                .collect();
            rejected.sort_unstable();
            let mut expected = vec![(conflict.id, "conflict"), (outsider.id, "not_member")];
            expected.sort_unstable();
            assert_eq!(rejected, expected, "{mode} {call}");
        }
        // The changes were applied once: the edit, the delete's erasure.
        let states = db
            .query(
                "SELECT content, edit_seq > 0, deleted_at IS NOT NULL FROM messages
                 WHERE conversation_id = $1 AND seq BETWEEN $2 AND $2 + 2 ORDER BY seq",
                &[&fx.room, &first],
            )
            .await
            .expect("states");
        let states: Vec<(String, bool, bool)> = states
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            states,
            vec![
                ("edited".to_owned(), true, false),
                (format!("message {}", first + 1), false, false),
                (String::new(), false, true),
            ],
            "{mode}"
        );
        let watermarks = db
            .query(
                "SELECT user_id, delivered_seq, read_seq FROM conversation_participants
                 WHERE conversation_id = $1 ORDER BY user_id",
                &[&fx.room],
            )
            .await
            .expect("watermarks");
        let watermarks: Vec<(i64, i64, i64)> = watermarks
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            watermarks,
            vec![(fx.trainer, seq, seq), (fx.member, seq, seq - 1)],
            "{mode}"
        );
        // The member is notified of the 500 new messages (once, replay or
        // not); the sender and the outsider are not.
        let jobs = db
            .query(
                "SELECT user_id, count FROM push_jobs WHERE conversation_id = $1",
                &[&fx.room],
            )
            .await
            .expect("jobs");
        let jobs: Vec<(i64, i64)> = jobs.iter().map(|r| (r.get(0), r.get(1))).collect();
        let pushed = if mode == "force_custom_plan" {
            500
        } else {
            1000
        };
        assert_eq!(jobs, vec![(fx.member, pushed)], "{mode}");

        drop(pool);
        let mut problems = Vec::new();
        let mut read = BTreeSet::new();
        let mut executed = 0;
        while let Ok(notice) = plans.try_recv() {
            let Some(at) = notice.find('{') else { continue };
            let doc: Value = serde_json::from_str(&notice[at..]).expect("plan json");
            executed += 1;
            let (violations, tables) = plan_problems(&doc);
            read.extend(tables);
            problems.extend(
                violations
                    .iter()
                    .map(|v| format!("{mode}: {v} in {}", doc["Query Text"])),
            );
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        // Not vacuous: the statements and the foreign-key checks ran.
        assert!(executed >= 12, "{mode}: only {executed} plans");
        let all: BTreeSet<String> = KEY_INDEXES
            .iter()
            .map(|(t, _, _)| (*t).to_owned())
            .collect();
        assert_eq!(read, all, "{mode}");
    }
}

/// Every scan in `plan`: (node type, index name or relation).
fn scans(plan: &Value, out: &mut Vec<(String, String)>) {
    let node = plan["Node Type"].as_str().unwrap_or("?");
    if node.ends_with("Scan") {
        let what = plan["Index Name"]
            .as_str()
            .or(plan["Relation Name"].as_str())
            .unwrap_or("?");
        out.push((node.to_owned(), what.to_owned()));
    }
    for child in plan["Plans"].as_array().into_iter().flatten() {
        scans(child, out);
    }
}

/// The search (`origin::search::SEARCH_HITS` under its guard) on this
/// fixture's statistics: never a sequential scan, and the matches found
/// through the GIN index (ANDed with the conversations'), or, searching one
/// conversation, through either of its indexes; `SEARCH_HITS_SCAN` (small
/// conversations) reads the conversation through an index that starts with
/// it and never the GIN index. Panics with every plan that does not.
///
/// Before any `ANALYZE` the tables hold three messages, and the planner
/// may as well read the conversations' messages through another index of
/// `messages` and check the words on each: only the absence of a
/// sequential scan is asserted then. Once the room holds 60,000 messages,
/// stale statistics or not, the GIN index must be the way in.
async fn assert_search_plans_use_the_index(db: &tokio_postgres::Client, fx: &Fixture, state: &str) {
    use origin::search::{RANK_WINDOW, SEARCH_GUARD, SEARCH_HITS, SEARCH_HITS_SCAN};
    let everywhere: Vec<i64> = db
        .query_one(
            "SELECT array_agg(conversation_id) FROM conversation_participants WHERE user_id = $1",
            &[&fx.trainer],
        )
        .await
        .expect("conversations")
        .get(0);
    let gin: &[&str] = &["messages_search_idx"];
    let either: &[&str] = &["messages_search_idx", "messages_conversation_seq_unique"];
    // Both indexes that start with the conversation.
    let own: &[&str] = &[
        "messages_conversation_seq_unique",
        "messages_idempotency_unique",
    ];
    // (what, statement, tsquery, conversations, the indexes that may find
    // the matches; when only one is named, it must)
    type Case<'a> = (&'a str, &'a str, &'a str, Vec<i64>, &'a [&'a str]);
    let cases: [Case; 6] = [
        (
            "a word in every message",
            SEARCH_HITS,
            "'messag'",
            everywhere.clone(),
            gin,
        ),
        (
            "a rare word",
            SEARCH_HITS,
            "'12345'",
            everywhere.clone(),
            gin,
        ),
        ("a prefix", SEARCH_HITS, "'1234':*", everywhere.clone(), gin),
        (
            "a phrase",
            SEARCH_HITS,
            "'messag' <-> '777'",
            everywhere,
            gin,
        ),
        (
            "one conversation",
            SEARCH_HITS,
            "'12345'",
            vec![fx.room],
            either,
        ),
        (
            "a small conversation, read whole",
            SEARCH_HITS_SCAN,
            "'messag'",
            vec![fx.first_other],
            own,
        ),
    ];
    let mut problems = Vec::new();
    for (label, statement, tsquery, conversations, allowed) in cases {
        db.batch_execute(&format!("BEGIN; {SEARCH_GUARD}"))
            .await
            .expect("begin");
        let doc: Value = db
            .query_one(
                &format!("EXPLAIN (FORMAT JSON) {statement}"),
                &[
                    &tsquery,
                    &conversations,
                    &RANK_WINDOW,
                    &21i64,
                    &fx.trainer,
                    &None::<f32>,
                    &None::<DateTime<Utc>>,
                    &None::<Uuid>,
                ],
            )
            .await
            .expect("explain")
            .get(0);
        db.batch_execute("ROLLBACK").await.expect("rollback");
        let mut found = Vec::new();
        scans(&doc[0]["Plan"], &mut found);
        let sequential = found.iter().any(|(n, _)| n == "Seq Scan");
        // The scans that find matches: the messages read other than by id.
        let finding: Vec<&(String, String)> = found
            .iter()
            .filter(|(n, what)| {
                n.contains("Index") && what.starts_with("messages_") && what != "messages_pkey"
            })
            .collect();
        let wrong = finding
            .iter()
            .any(|(_, what)| !allowed.contains(&what.as_str()));
        let missing = !finding.iter().any(|(_, w)| w == allowed[0]);
        let bad = if state == "never analyzed" && statement == SEARCH_HITS {
            // Three messages: any index of messages will do.
            sequential || finding.is_empty()
        } else {
            sequential || finding.is_empty() || wrong || (allowed.len() == 1 && missing)
        };
        if bad {
            problems.push(format!("{state}, {label}: {found:?}\n{doc:#}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[tokio::test]
async fn the_search_reads_messages_through_its_indexes_before_any_analyze_on_stale_and_on_fresh_statistics()
 {
    let app = spawn_app().await;
    let db = connect(&app).await;
    let fx = tiny_start(&db).await;
    assert_search_plans_use_the_index(&db, &fx, "never analyzed").await;
    grow_with_stale_statistics(&db, &fx).await;
    assert_search_plans_use_the_index(&db, &fx, "stale statistics").await;
    db.batch_execute("ANALYZE").await.expect("analyze");
    assert_search_plans_use_the_index(&db, &fx, "analyzed").await;
}
