//! Read replicas against a real streaming replica (see [`crate::standby`]):
//! which reads it serves, read-your-writes, and the fallback to the
//! primary when it lags or is down. Replay is paused to make the replica's
//! view visibly older than the primary's; every assertion is on data seen
//! and on counts of reads, never on how long anything took.

use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::Role;

use crate::helpers::{TestApp, TestUser, config_with, start_app};
use crate::standby::{Pair, wait_for};

/// A bound no test reaches: the replica serves however long replay pauses.
const HOUR_MS: &str = "3600000";

/// An origin on a fresh database of `pair`, reading from its replica with
/// lag bound `max_lag_ms`.
async fn spawn_replicated(pair: &Pair, max_lag_ms: &str) -> TestApp {
    let db_name = pair.fresh_database().await;
    let primary = pair.primary_url(&db_name);
    let replica = pair.replica_url(&db_name);
    let config = config_with(
        &db_name,
        &[
            ("DATABASE_URL", &primary),
            ("DATABASE_READ_URL", &replica),
            ("DATABASE_READ_MAX_LAG_MS", max_lag_ms),
        ],
    );
    start_app(config, db_name).await
}

/// Waits until the replica has everything written so far and the app has
/// probed it since: up, and not lagging.
async fn settled(pair: &Pair, app: &TestApp) {
    pair.caught_up().await;
    let seen = status(app).probes;
    wait_for("a probe that finds the replica caught up", || async {
        let now = status(app);
        now.probes > seen && now.up && now.lag == Some(std::time::Duration::ZERO)
    })
    .await;
}

fn status(app: &TestApp) -> origin::replica::Status {
    app.state.reads.status().expect("a replica is configured")
}

/// Reads served so far by (primary, replica).
fn served(app: &TestApp) -> (u64, u64) {
    let s = app.state.reads.served();
    (s.primary, s.replica)
}

/// GET that must succeed.
async fn ok(app: &TestApp, user: &TestUser, path: &str) -> Value {
    let (status, body) = app.get(user, path).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    body
}

/// The conversation ids in `user`'s list.
async fn conversation_ids(app: &TestApp, user: &TestUser) -> Vec<i64> {
    ok(app, user, "/api/v1/chat/conversations").await["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_i64().unwrap())
        .collect()
}

/// The name the directory shows for the first match of `query`.
async fn directory_name(app: &TestApp, user: &TestUser, query: &str) -> String {
    ok(app, user, &format!("/api/v1/users?query={query}")).await["users"][0]["full_name"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn rename_on_primary(app: &TestApp, user: &TestUser, name: &str) {
    app.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE users SET full_name = $1 WHERE id = $2",
            &[&name, &user.id],
        )
        .await
        .unwrap();
}

async fn metrics(app: &TestApp) -> String {
    app.http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the gauge `name` in a scrape (whatever labels it has).
fn gauge(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .find_map(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("no {name} in:\n{scrape}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn users_who_did_not_write_read_the_replicas_view() {
    let pair = Pair::acquire().await;
    let app = spawn_replicated(&pair, HOUR_MS).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    app.ingest(id, &alex, 1, 2).await;
    settled(&pair, &app).await;

    // Replay stops; the primary moves on without the replica.
    pair.pause_replay().await;
    rename_on_primary(&app, &alex, "Alexandra").await;
    app.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE messages SET content = 'rewritten upstream' WHERE conversation_id = $1 AND seq = 2",
            &[&id],
        )
        .await
        .unwrap();

    // Sam wrote nothing: every read is the replica's, from before.
    let before = served(&app);
    assert_eq!(directory_name(&app, &sam, "alex").await, "Alex");
    let contacts = ok(&app, &sam, "/api/v1/chat/active-users").await;
    assert_eq!(contacts["users"][0]["full_name"], "Alex", "{contacts}");
    let card = ok(&app, &sam, &format!("/api/v1/users/{}", alex.id)).await;
    assert_eq!(card["full_name"], "Alex");
    let list = ok(&app, &sam, "/api/v1/chat/conversations").await;
    assert_eq!(list["conversations"][0]["peer"]["full_name"], "Alex");
    assert_eq!(
        list["conversations"][0]["last_message"]["content"],
        "message 2"
    );
    let history = ok(
        &app,
        &sam,
        &format!("/api/v1/chat/conversations/{id}/messages"),
    )
    .await;
    assert_eq!(history["messages"][1]["content"], "message 2", "{history}");
    let found = ok(&app, &sam, "/api/v1/chat/search?q=rewritten").await;
    assert_eq!(found["hits"], json!([]), "{found}");
    let after = served(&app);
    assert_eq!(after.0, before.0, "nothing from the primary");
    assert_eq!(after.1, before.1 + 6, "six reads from the replica");

    // The primary has moved on, and the replica is behind it but within
    // the bound.
    let primary_name: String = app
        .pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT full_name FROM users WHERE id = $1", &[&alex.id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(primary_name, "Alexandra");
    let seen = status(&app).probes;
    wait_for("a probe that sees the paused replica", || async {
        let now = status(&app);
        now.probes > seen && now.lag.is_some_and(|lag| !lag.is_zero())
    })
    .await;
    let scrape = metrics(&app).await;
    assert!(
        scrape.contains("chat_db_reads_total{target=\"replica\"}"),
        "{scrape}"
    );
    assert!(
        gauge(&scrape, "chat_db_replica_lag_seconds") > 0.0,
        "{scrape}"
    );
    assert_eq!(gauge(&scrape, "chat_db_replica_up"), 1.0, "{scrape}");

    // Replay resumes: the replica has the new name, and serves it.
    pair.resume_replay().await;
    pair.caught_up().await;
    let before = served(&app);
    assert_eq!(directory_name(&app, &sam, "alex").await, "Alexandra");
    assert_eq!(served(&app).1, before.1 + 1);
}

#[tokio::test]
async fn a_writer_reads_their_own_writes_at_once_while_replay_is_paused() {
    let pair = Pair::acquire().await;
    let app = spawn_replicated(&pair, HOUR_MS).await;
    let alex = app.user("Alex", Role::Trainer).await;
    let sam = app.user("Sam", Role::Member).await;
    let kim = app.user("Kim", Role::Member).await;
    settled(&pair, &app).await;
    pair.pause_replay().await;

    // Alex creates a group: the replica will not have it until replay
    // resumes, yet Alex's list shows it, from the primary.
    let group = app.group(&alex, "Run club", &[&sam, &kim]).await;
    let before = served(&app);
    assert_eq!(conversation_ids(&app, &alex).await, [group]);
    assert_eq!(served(&app).0, before.0 + 1, "Alex's list is the primary's");
    // Kim, who wrote nothing, reads the replica's older view.
    let before = served(&app);
    assert_eq!(conversation_ids(&app, &kim).await, Vec::<i64>::new());
    assert_eq!(served(&app).1, before.1 + 1, "Kim's list is the replica's");

    // Sam sends through the edge (ingest): Sam's history, list and search
    // have the message at once.
    app.ingest(group, &sam, 1, 1).await;
    let before = served(&app);
    let history = ok(
        &app,
        &sam,
        &format!("/api/v1/chat/conversations/{group}/messages"),
    )
    .await;
    assert_eq!(history["messages"][0]["content"], "message 1", "{history}");
    let list = ok(&app, &sam, "/api/v1/chat/conversations").await;
    assert_eq!(list["conversations"][0]["id"], group);
    assert_eq!(list["conversations"][0]["last_message"]["seq"], 1, "{list}");
    let found = ok(&app, &sam, "/api/v1/chat/search?q=message").await;
    assert_eq!(found["hits"][0]["conversation_id"], group, "{found}");
    let after = served(&app);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (3, 0),
        "Sam's reads are the primary's"
    );

    // Kim opens the group (say, from a push): the replica does not know it
    // yet and would answer 404; a refusal is confirmed on the primary.
    let before = served(&app);
    let history = ok(
        &app,
        &kim,
        &format!("/api/v1/chat/conversations/{group}/messages"),
    )
    .await;
    assert_eq!(history["messages"][0]["content"], "message 1");
    let after = served(&app);
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 1));
    // Kim reads it in the room: the read mark (a write, through the
    // edge's receipts) shows in Kim's list at once, from the primary,
    // though the replica has not even seen the group yet.
    let (code, body) = app
        .internal_post(
            "/internal/v1/receipts",
            &json!({"receipts": [{"conversation_id": group, "user_id": kim.id,
                                  "delivered_seq": 1, "read_seq": 1}]}),
        )
        .await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{body}");
    let before = served(&app);
    let list = ok(&app, &kim, "/api/v1/chat/conversations").await;
    assert_eq!(list["conversations"][0]["id"], group, "{list}");
    assert_eq!(list["conversations"][0]["read_seq"], 1, "{list}");
    assert_eq!(list["conversations"][0]["unread_count"], 0, "{list}");
    assert_eq!(served(&app).0, before.0 + 1);
    // A real refusal stays one.
    let outsider = app.user("Outsider", Role::Member).await;
    let (code, body) = app
        .get(
            &outsider,
            &format!("/api/v1/chat/conversations/{group}/messages"),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");

    // Replay resumes. Once a probe finds the replica past their writes,
    // Alex and Sam read from it again, and it has everything.
    pair.resume_replay().await;
    pair.caught_up().await;
    wait_for("the writers to be released", || async {
        status(&app).writers == 0
    })
    .await;
    let before = served(&app);
    assert_eq!(conversation_ids(&app, &alex).await, [group]);
    assert_eq!(conversation_ids(&app, &kim).await, [group]);
    assert_eq!(served(&app).1, before.1 + 2);
}

#[tokio::test]
async fn reads_fall_back_to_the_primary_when_the_replica_lags_or_is_down() {
    let pair = Pair::acquire().await;
    let app = spawn_replicated(&pair, "200").await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    app.direct(&alex, &sam).await;
    settled(&pair, &app).await;
    let before = served(&app);
    assert_eq!(directory_name(&app, &sam, "alex").await, "Alex");
    assert_eq!(served(&app).1, before.1 + 1, "caught up: the replica");

    // Replay pauses with a write pending: once the lag passes the bound,
    // Sam's reads are the primary's, which has the new name.
    pair.pause_replay().await;
    rename_on_primary(&app, &alex, "Alexandra").await;
    wait_for("the lag to pass the bound", || async {
        status(&app)
            .lag
            .is_none_or(|lag| lag > std::time::Duration::from_millis(200))
    })
    .await;
    let before = served(&app);
    assert_eq!(directory_name(&app, &sam, "alex").await, "Alexandra");
    assert_eq!(conversation_ids(&app, &sam).await.len(), 1);
    let after = served(&app);
    assert_eq!((after.0 - before.0, after.1 - before.1), (2, 0));
    let scrape = metrics(&app).await;
    assert!(
        gauge(&scrape, "chat_db_replica_lag_seconds") > 0.2,
        "{scrape}"
    );
    assert!(
        scrape.contains("chat_db_reads_total{target=\"primary\"}"),
        "{scrape}"
    );

    // Caught up again: back to the replica.
    pair.resume_replay().await;
    settled(&pair, &app).await;
    let before = served(&app);
    assert_eq!(directory_name(&app, &sam, "alex").await, "Alexandra");
    assert_eq!(served(&app).1, before.1 + 1);

    // The replica stops: reads still succeed, first by falling back as
    // they fail there, then because the probe finds it down.
    pair.stop_replica().await;
    assert_eq!(directory_name(&app, &sam, "alex").await, "Alexandra");
    wait_for("the probe to find the replica down", || async {
        gauge(&metrics(&app).await, "chat_db_replica_up") == 0.0
    })
    .await;
    assert!(!status(&app).up);
    assert_eq!(
        gauge(&metrics(&app).await, "chat_db_replica_lag_seconds"),
        f64::INFINITY,
        "a replica that cannot be measured is infinitely behind"
    );
    let before = served(&app);
    assert_eq!(directory_name(&app, &sam, "alex").await, "Alexandra");
    assert_eq!(conversation_ids(&app, &sam).await.len(), 1);
    let after = served(&app);
    assert_eq!((after.0 - before.0, after.1 - before.1), (2, 0));

    // Back: once probed, reads return to it.
    pair.start_replica().await;
    settled(&pair, &app).await;
    let before = served(&app);
    assert_eq!(conversation_ids(&app, &sam).await.len(), 1);
    assert_eq!(served(&app).1, before.1 + 1);
}
