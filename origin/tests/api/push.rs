//! Web Push: the REST routes, the queue the ingest fills, and the worker
//! that sends it to a push service (a small one here, on a free loopback
//! port, that decrypts what it gets as a browser would).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::Role;

use crate::helpers::{
    TestApp, TestUser, assert_error, message, spawn_app, spawn_app_with, vapid_key,
};

/// The RFC 8291 example's browser key and auth secret: a valid
/// subscription's keys.
const P256DH: &str =
    "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

fn subscription(endpoint: &str) -> Value {
    json!({"endpoint": endpoint, "keys": {"p256dh": P256DH, "auth": AUTH}})
}

fn fcm(id: &str) -> String {
    format!("https://fcm.googleapis.com/fcm/send/{id}")
}

/// A user logged in (a token with a session), for the routes that care.
async fn logged_in(app: &TestApp, name: &str) -> (TestUser, Value) {
    let mut user = app.user(name, Role::Member).await;
    let login = app.session(&user).await;
    user.token = login["token"].as_str().expect("token").to_owned();
    (user, login)
}

async fn subscription_row(
    app: &TestApp,
    endpoint: &str,
) -> Option<(i64, Option<uuid::Uuid>, Vec<u8>)> {
    let client = app.pool.get().await.expect("db");
    client
        .query_opt(
            "SELECT user_id, session_id, auth FROM push_subscriptions WHERE endpoint = $1",
            &[&endpoint],
        )
        .await
        .expect("row")
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

#[tokio::test]
async fn the_vapid_public_key_is_served_when_configured_and_push_is_503_without_one() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let (status, body) = app.get(&alex, "/api/v1/push/vapid-public-key").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let secret =
        p256::SecretKey::from_slice(&URL_SAFE_NO_PAD.decode(vapid_key()).unwrap()).unwrap();
    let expected = URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(false).as_bytes());
    assert_eq!(body, json!({"key": expected}));
    assert_eq!(URL_SAFE_NO_PAD.decode(&expected).unwrap().len(), 65);
    // Authenticated like every route.
    let res = app
        .http
        .get(app.url("/api/v1/push/vapid-public-key"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    let off = spawn_app_with(&[("VAPID_PRIVATE_KEY", "")]).await;
    let alex = off.user("Alex", Role::Member).await;
    let sam = off.user("Sam", Role::Member).await;
    let res = off
        .http
        .get(off.url("/api/v1/push/vapid-public-key"))
        .bearer_auth(&alex.token)
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("retry-after").is_none());
    let (status, body) = crate::helpers::status_and_json(res).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "push_disabled",
    );
    let (status, body) = off
        .post(&alex, "/api/v1/push/subscriptions", subscription(&fcm("a")))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "push_disabled",
    );
    let (status, body) = off
        .delete(&alex, "/api/v1/push/subscriptions/1", json!(null))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "push_disabled",
    );
    // The preferences still work.
    let (status, _) = off.get(&alex, "/api/v1/push/settings").await;
    assert_eq!(status, StatusCode::OK);
    let id = off.direct(&alex, &sam).await;
    let path = format!("/api/v1/chat/conversations/{id}/notifications");
    let (status, _) = off.put(&alex, &path, json!({"level": "none"})).await;
    assert_eq!(status, StatusCode::OK);
    // Nothing is queued.
    off.ingest(id, &sam, 1, 3).await;
    assert_eq!(off.count("SELECT count(*) FROM push_jobs").await, 0);
}

#[tokio::test]
async fn a_subscription_is_idempotent_per_endpoint_and_re_bound_to_whoever_registers_it() {
    let app = spawn_app().await;
    let (alex, alex_login) = logged_in(&app, "Alex").await;
    let (sam, sam_login) = logged_in(&app, "Sam").await;
    let endpoint = fcm("device-1");

    let (status, first) = app
        .post(&alex, "/api/v1/push/subscriptions", subscription(&endpoint))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert!(first["id"].as_i64().unwrap() >= 1);
    assert_eq!(first["endpoint"], endpoint.as_str());
    chrono::DateTime::parse_from_rfc3339(first["created_at"].as_str().unwrap()).unwrap();
    let alex_session: uuid::Uuid = alex_login["session_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        subscription_row(&app, &endpoint).await,
        Some((
            alex.id,
            Some(alex_session),
            URL_SAFE_NO_PAD.decode(AUTH).unwrap()
        ))
    );

    let (status, again) = app
        .post(&alex, "/api/v1/push/subscriptions", subscription(&endpoint))
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again, first);

    // Sam logs in on the same browser: the endpoint is now Sam's, with the
    // new keys, and no second row exists.
    let new_auth = URL_SAFE_NO_PAD.encode([7u8; 16]);
    let (status, rebound) = app
        .post(
            &sam,
            "/api/v1/push/subscriptions",
            json!({"endpoint": endpoint, "keys": {"p256dh": P256DH, "auth": format!("{new_auth}==")}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rebound}");
    assert_eq!(rebound["id"], first["id"]);
    let sam_session: uuid::Uuid = sam_login["session_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        subscription_row(&app, &endpoint).await,
        Some((sam.id, Some(sam_session), vec![7u8; 16]))
    );
    assert_eq!(
        app.count("SELECT count(*) FROM push_subscriptions").await,
        1
    );
}

#[tokio::test]
async fn keys_that_are_not_a_p256_point_and_a_16_byte_secret_are_422() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let point = URL_SAFE_NO_PAD.decode(P256DH).unwrap();
    let mut off_curve = point.clone();
    off_curve[64] ^= 1;
    let mut compressed = point.clone();
    compressed[0] = 0x02;
    let bad_keys = [
        json!({"p256dh": &P256DH[..86], "auth": AUTH}),
        json!({"p256dh": URL_SAFE_NO_PAD.encode(&off_curve), "auth": AUTH}),
        json!({"p256dh": URL_SAFE_NO_PAD.encode(&compressed), "auth": AUTH}),
        json!({"p256dh": URL_SAFE_NO_PAD.encode([0u8; 65]), "auth": AUTH}),
        json!({"p256dh": P256DH.replace('_', "/"), "auth": AUTH}),
        json!({"p256dh": P256DH, "auth": URL_SAFE_NO_PAD.encode([1u8; 15])}),
        json!({"p256dh": P256DH, "auth": URL_SAFE_NO_PAD.encode([1u8; 17])}),
        json!({"p256dh": P256DH}),
        json!({"p256dh": P256DH, "auth": 16}),
    ];
    for keys in bad_keys {
        let (status, body) = app
            .post(
                &alex,
                "/api/v1/push/subscriptions",
                json!({"endpoint": fcm("x"), "keys": keys}),
            )
            .await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        );
    }
    assert_eq!(
        app.count("SELECT count(*) FROM push_subscriptions").await,
        0
    );
}

#[tokio::test]
async fn an_endpoint_must_be_https_on_an_allowed_push_service_unless_loopback_is_allowed() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    for bad in [
        "http://fcm.googleapis.com/fcm/send/x".to_owned(),
        "https://fcm.googleapis.com:8443/fcm/send/x".to_owned(),
        "https://user@fcm.googleapis.com/fcm/send/x".to_owned(),
        "https://push.evil.example/x".to_owned(),
        "https://fcm.googleapis.com.evil.example/x".to_owned(),
        "https://notify.windows.com/x".to_owned(),
        "http://127.0.0.1:9000/push/x".to_owned(),
        "http://localhost:9000/push/x".to_owned(),
        "https://169.254.169.254/latest/meta-data".to_owned(),
        "not a url".to_owned(),
        format!("https://fcm.googleapis.com/{}", "a".repeat(2040)),
    ] {
        let (status, body) = app
            .post(&alex, "/api/v1/push/subscriptions", subscription(&bad))
            .await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "endpoint_not_allowed",
        );
        assert!(
            !body.to_string().contains("evil"),
            "the URL is not echoed: {body}"
        );
    }
    // `*.notify.windows.com` matches a subdomain at any depth.
    for ok in [
        "https://wns2-by3p.notify.windows.com/w/?token=abc",
        "https://db5.wns.notify.windows.com/w/?token=def",
        "https://web.push.apple.com/QGx",
        "https://updates.push.services.mozilla.com/wpush/v2/g",
    ] {
        let (status, body) = app
            .post(&alex, "/api/v1/push/subscriptions", subscription(ok))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{ok}: {body}");
    }

    let local = spawn_app_with(&[
        ("PUSH_ALLOW_LOOPBACK", "true"),
        ("PUSH_ALLOWED_HOSTS", "*.push.example"),
    ])
    .await;
    let alex = local.user("Alex", Role::Member).await;
    for ok in [
        "http://127.0.0.1:9000/push/a",
        "https://localhost:9443/push/b",
        "http://[::1]:9000/push/c",
        "https://eu.push.example/d",
    ] {
        let (status, body) = local
            .post(&alex, "/api/v1/push/subscriptions", subscription(ok))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{ok}: {body}");
    }
    for bad in [
        "https://push.example/x",
        "https://fcm.googleapis.com/fcm/send/x",
        "http://10.0.0.1:9000/push/x",
        "http://eu.push.example/x",
    ] {
        let (status, body) = local
            .post(&alex, "/api/v1/push/subscriptions", subscription(bad))
            .await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "endpoint_not_allowed",
        );
    }
}

#[tokio::test]
async fn a_subscription_is_deleted_by_its_owner_and_is_404_to_anyone_else() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let (_, body) = app
        .post(&alex, "/api/v1/push/subscriptions", subscription(&fcm("a")))
        .await;
    let path = format!("/api/v1/push/subscriptions/{}", body["id"]);
    let (status, body) = app.delete(&sam, &path, json!(null)).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = app.delete(&alex, &path, json!(null)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(
        app.count("SELECT count(*) FROM push_subscriptions").await,
        0
    );
    let (status, body) = app.delete(&alex, &path, json!(null)).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn logout_deletes_the_subscriptions_of_that_session_and_logout_all_of_every_session() {
    let app = spawn_app().await;
    let (alex, _) = logged_in(&app, "Alex").await;
    let laptop = alex.clone();
    let phone_login = app.session(&alex).await;
    let phone = TestUser {
        token: phone_login["token"].as_str().unwrap().to_owned(),
        ..alex.clone()
    };
    let tablet_login = app.session(&alex).await;
    let tablet = TestUser {
        token: tablet_login["token"].as_str().unwrap().to_owned(),
        ..alex.clone()
    };
    for (user, id) in [(&laptop, "laptop"), (&phone, "phone"), (&tablet, "tablet")] {
        let (status, _) = app
            .post(user, "/api/v1/push/subscriptions", subscription(&fcm(id)))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (status, _) = app
        .post_as(&laptop.token, "/api/v1/auth/logout", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(subscription_row(&app, &fcm("laptop")).await.is_none());
    assert!(subscription_row(&app, &fcm("phone")).await.is_some());
    assert!(subscription_row(&app, &fcm("tablet")).await.is_some());

    // Logging out everywhere (from the phone) leaves no subscription.
    let (status, _) = app
        .post_as(&phone.token, "/api/v1/auth/logout-all", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.count("SELECT count(*) FROM push_subscriptions").await,
        0
    );
}

#[tokio::test]
async fn settings_round_trip_and_bad_times_zones_or_an_empty_window_are_422() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let path = "/api/v1/push/settings";
    let (status, body) = app.get(&alex, path).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"show_content": false, "quiet_hours": null}));

    let night = json!({"show_content": true,
                       "quiet_hours": {"start": "22:00", "end": "07:00", "time_zone": "Europe/Berlin"}});
    let (status, body) = app.put(&alex, path, night.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, night);
    assert_eq!(app.get(&alex, path).await.1, night);

    let off = json!({"show_content": false, "quiet_hours": null});
    let (status, body) = app.put(&alex, path, off.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, off);
    assert_eq!(app.get(&alex, path).await.1, off);

    for quiet in [
        json!({"start": "24:00", "end": "07:00", "time_zone": "UTC"}),
        json!({"start": "7:00", "end": "09:00", "time_zone": "UTC"}),
        json!({"start": "07:00", "end": "07:60", "time_zone": "UTC"}),
        json!({"start": "08:00", "end": "08:00", "time_zone": "UTC"}),
        json!({"start": "08:00", "end": "09:00", "time_zone": "Mars/Olympus_Mons"}),
        json!({"start": "08:00", "end": "09:00", "time_zone": "Europe/Berlin'; --"}),
        json!({"start": "08:00", "end": "09:00", "time_zone": ""}),
        json!({"start": "08:00", "end": "09:00"}),
    ] {
        let (status, body) = app
            .put(
                &alex,
                path,
                json!({"show_content": true, "quiet_hours": quiet}),
            )
            .await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        );
    }
    // Nothing of the refused ones was stored.
    assert_eq!(app.get(&alex, path).await.1, off);
}

#[tokio::test]
async fn conversation_preferences_round_trip_for_participants_only() {
    let app = spawn_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let kim = app.user("Kim", Role::Member).await;
    let id = app.direct(&alex, &sam).await;
    let path = format!("/api/v1/chat/conversations/{id}/notifications");

    let (status, body) = app.get(&alex, &path).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"level": "all", "muted_until": null}));

    let muted = json!({"level": "mentions", "muted_until": "2030-01-02T03:04:05Z"});
    let (status, body) = app.put(&alex, &path, muted.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, muted);
    assert_eq!(app.get(&alex, &path).await.1, muted);
    // Sam's are Sam's own.
    assert_eq!(
        app.get(&sam, &path).await.1,
        json!({"level": "all", "muted_until": null})
    );
    let (status, body) = app.put(&alex, &path, json!({"level": "none"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"level": "none", "muted_until": null}));

    let (status, body) = app.get(&kim, &path).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = app.put(&kim, &path, json!({"level": "all"})).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = app
        .get(&alex, "/api/v1/chat/conversations/999999/notifications")
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    for bad in [
        json!({"level": "loud"}),
        json!({"muted_until": null}),
        json!({"level": "all", "muted_until": "tomorrow"}),
    ] {
        let (status, body) = app.put(&alex, &path, bad).await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        );
    }
}

/// A batch of messages `seqs` from `sender`, and receipts, through the
/// internal API as the edge sends them.
async fn ingest_batch(
    app: &TestApp,
    conversation: i64,
    sender: &TestUser,
    seqs: std::ops::RangeInclusive<i64>,
    receipts: Value,
) {
    let messages: Vec<Value> = seqs.map(|s| message(conversation, sender.id, s)).collect();
    let (status, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({"messages": messages, "receipts": receipts}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rejected"], json!([]), "{body}");
}

/// (user, count, first_seq, last_seq, last_sender_id, several_senders) per
/// job of `conversation`.
async fn jobs(app: &TestApp, conversation: i64) -> Vec<(i64, i64, i64, i64, i64, bool)> {
    let client = app.pool.get().await.expect("db");
    client
        .query(
            "SELECT user_id, count, first_seq, last_seq, last_sender_id, several_senders
             FROM push_jobs WHERE conversation_id = $1 ORDER BY user_id",
            &[&conversation],
        )
        .await
        .expect("jobs")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect()
}

#[tokio::test]
async fn the_ingest_queues_one_job_per_other_subscribed_participant_and_grows_it_per_batch() {
    // Long enough that the worker leaves the jobs alone during the test.
    let app = spawn_app_with(&[("PUSH_COALESCE_MS", "600000")]).await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let kim = app.user("Kim", Role::Member).await;
    let lee = app.user("Lee", Role::Member).await;
    let noor = app.user("Noor", Role::Member).await;
    let group = app
        .group(&alex, "Runners", &[&sam, &kim, &lee, &noor])
        .await;
    // Everyone but Noor can be reached: a member with no subscription gets
    // no job (it would cost the message path a write for nothing).
    for (who, id) in [
        (&alex, "q-alex"),
        (&sam, "q-sam"),
        (&kim, "q-kim"),
        (&lee, "q-lee"),
    ] {
        let (status, body) = app
            .post(who, "/api/v1/push/subscriptions", subscription(&fcm(id)))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    // Lee leaves: a removed member is notified of nothing.
    let (status, _) = app
        .delete(
            &alex,
            &format!("/api/v1/chat/conversations/{group}/participants"),
            json!({"user_ids": [lee.id]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    ingest_batch(&app, group, &alex, 1..=3, json!([])).await;
    assert_eq!(
        jobs(&app, group).await,
        vec![
            (sam.id, 3, 1, 3, alex.id, false),
            (kim.id, 3, 1, 3, alex.id, false),
        ]
    );

    // A second batch from Sam, with Kim's receipt for seq 4: Kim is not
    // notified of what she has read, Alex gets a job of Sam's messages,
    // and Sam's own job does not grow with his own messages.
    ingest_batch(
        &app,
        group,
        &sam,
        4..=5,
        json!([{"conversation_id": group, "user_id": kim.id, "delivered_seq": 4, "read_seq": 4}]),
    )
    .await;
    assert_eq!(
        jobs(&app, group).await,
        vec![
            (alex.id, 2, 4, 5, sam.id, false),
            (sam.id, 3, 1, 3, alex.id, false),
            (kim.id, 4, 1, 5, sam.id, true),
        ]
    );

    // A replay (the edge retrying after a lost answer) queues nothing again.
    ingest_batch(&app, group, &alex, 1..=3, json!([])).await;
    ingest_batch(&app, group, &sam, 4..=5, json!([])).await;
    assert_eq!(jobs(&app, group).await.iter().map(|j| j.1).sum::<i64>(), 9);
    // Nothing for the sender in their own job, nothing for the removed
    // member, nothing for a member with no subscription.
    for nobody in [&lee, &noor] {
        assert_eq!(
            app.count(&format!(
                "SELECT count(*) FROM push_jobs WHERE user_id = {}",
                nobody.id
            ))
            .await,
            0
        );
    }
    // Due after the coalescing delay.
    assert_eq!(
        app.count(
            "SELECT count(*) FROM push_jobs
             WHERE due_at BETWEEN now() + interval '590 seconds' AND now() + interval '610 seconds'"
        )
        .await,
        3
    );
}

/// A push as the local push service received it.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Default)]
struct PushLog {
    received: Vec<Received>,
    /// Answers for the next requests (else 201).
    answers: VecDeque<u16>,
}

/// A push service on a free loopback port.
struct PushService {
    origin: String,
    log: Arc<Mutex<PushLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PushService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A browser's subscription: its endpoint and private key.
struct Browser {
    endpoint: String,
    secret: p256::SecretKey,
    auth: [u8; 16],
}

impl Browser {
    fn json(&self) -> Value {
        json!({"endpoint": self.endpoint, "keys": {
            "p256dh": URL_SAFE_NO_PAD.encode(self.secret.public_key().to_encoded_point(false).as_bytes()),
            "auth": URL_SAFE_NO_PAD.encode(self.auth),
        }})
    }

    /// The payload of `push`, decrypted as the browser does.
    fn open(&self, push: &Received) -> Value {
        let plain = web_push_native::decrypt(
            push.body.to_vec(),
            &self.secret,
            &web_push_native::Auth::from(self.auth),
        )
        .expect("decrypts");
        serde_json::from_slice(&plain).expect("json")
    }
}

async fn receive(
    State(log): State<Arc<Mutex<PushLog>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mut log = log.lock().unwrap();
    log.received.push(Received { id, headers, body });
    let status = log.answers.pop_front().unwrap_or(201);
    StatusCode::from_u16(status).unwrap()
}

impl PushService {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let log = Arc::new(Mutex::new(PushLog::default()));
        let router = axum::Router::new()
            .route("/push/{id}", axum::routing::post(receive))
            .with_state(log.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { origin, log, task }
    }

    fn browser(&self, id: &str) -> Browser {
        Browser {
            endpoint: format!("{}/push/{id}", self.origin),
            secret: p256::SecretKey::random(&mut rand::rngs::OsRng),
            auth: rand::random(),
        }
    }

    fn received(&self, id: &str) -> Vec<Received> {
        let log = self.log.lock().unwrap();
        log.received
            .iter()
            .filter(|r| r.id == id)
            .cloned()
            .collect()
    }

    fn answer_next(&self, statuses: &[u16]) {
        self.log.lock().unwrap().answers.extend(statuses);
    }

    /// Waits until `id` has received `n` requests.
    async fn wait_for(&self, id: &str, n: usize) -> Vec<Received> {
        for _ in 0..200 {
            let got = self.received(id);
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{id}: {} of {n} pushes", self.received(id).len());
    }
}

fn header<'h>(push: &'h Received, name: &str) -> &'h str {
    push.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name}"))
}

/// An app with push to loopback, quick coalescing and retries, and a
/// subscription of `user`.
async fn push_app() -> (TestApp, PushService) {
    let app = spawn_app_with(&[
        ("PUSH_ALLOW_LOOPBACK", "true"),
        ("PUSH_COALESCE_MS", "300"),
        ("PUSH_RETRY_BASE_MS", "200"),
    ])
    .await;
    (app, PushService::start().await)
}

#[tokio::test]
async fn an_offline_member_gets_one_encrypted_signed_push_per_burst_and_a_clear_once_read() {
    let (app, service) = push_app().await;
    let alex = app.user("Alex Rivera", Role::Member).await;
    let sam = app.user("Sam Patel", Role::Member).await;
    let browser = service.browser("sam-phone");
    let (status, _) = app
        .post(&sam, "/api/v1/push/subscriptions", browser.json())
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = app.direct(&alex, &sam).await;

    // A burst of three messages in two batches: one push.
    ingest_batch(&app, id, &alex, 1..=2, json!([])).await;
    ingest_batch(&app, id, &alex, 3..=3, json!([])).await;
    let pushes = service.wait_for("sam-phone", 1).await;
    let push = &pushes[0];
    assert_eq!(
        browser.open(push),
        json!({"type": "message", "conversation_id": id, "seq": 3, "count": 3,
               "title": "Alex Rivera", "body": "3 new messages from Alex Rivera",
               "sender_id": alex.id, "sender_name": "Alex Rivera",
               "tag": format!("conversation-{id}"), "url": format!("/?conversation={id}")})
    );
    assert_eq!(header(push, "content-encoding"), "aes128gcm");
    assert_eq!(header(push, "ttl"), "86400");
    assert_eq!(header(push, "urgency"), "normal");
    assert_eq!(header(push, "topic"), format!("c{id}"));
    // VAPID: the token is for this service's origin (port included),
    // valid at most 24 h, signed by the key the browser subscribed with.
    let vapid = header(push, "authorization");
    let (token, k) = vapid
        .strip_prefix("vapid t=")
        .and_then(|v| v.split_once(", k="))
        .expect("vapid header");
    assert_eq!(
        k,
        app.get(&sam, "/api/v1/push/vapid-public-key").await.1["key"]
    );
    let parts: Vec<&str> = token.split('.').collect();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(claims["aud"], service.origin.as_str());
    assert_eq!(claims["sub"], "mailto:ops@vibe.fit");
    let ahead = claims["exp"].as_i64().unwrap() - chrono::Utc::now().timestamp();
    assert!(ahead > 0 && ahead <= 24 * 3600, "{ahead}");
    {
        use p256::ecdsa::signature::Verifier as _;
        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&URL_SAFE_NO_PAD.decode(k).unwrap())
            .unwrap();
        let signature =
            p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
        key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .expect("signature");
    }
    // The job leaves the queue in the transaction after the send: the push
    // service may see the request a moment before that commits.
    wait_count(&app, "SELECT count(*) FROM push_jobs", 0).await;
    assert_eq!(
        app.count("SELECT count(*) FROM push_subscriptions WHERE last_success_at IS NOT NULL")
            .await,
        1
    );

    // Sam reads on another device (the receipts route, as older edges
    // send them): a clear, low urgency, same topic.
    let (status, _) = app
        .internal_post(
            "/internal/v1/receipts",
            &json!({"receipts": [{"conversation_id": id, "user_id": sam.id, "delivered_seq": 3, "read_seq": 3}]}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let pushes = service.wait_for("sam-phone", 2).await;
    let clear = &pushes[1];
    assert_eq!(
        browser.open(clear),
        json!({"type": "clear", "conversation_id": id, "tag": format!("conversation-{id}")})
    );
    assert_eq!(header(clear, "urgency"), "low");
    assert_eq!(header(clear, "topic"), format!("c{id}"));
    // Recorded in the transaction after the send: wait for it, not a guess.
    wait_count(&app, "SELECT count(*) FROM push_notified", 0).await;

    // With content allowed, the text shows; a 410 then removes the
    // subscription.
    let (status, _) = app
        .put(
            &sam,
            "/api/v1/push/settings",
            json!({"show_content": true, "quiet_hours": null}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    service.answer_next(&[410]);
    ingest_batch(&app, id, &alex, 4..=4, json!([])).await;
    let pushes = service.wait_for("sam-phone", 3).await;
    let payload = browser.open(&pushes[2]);
    assert_eq!(payload["body"], "message 4");
    assert_eq!(payload["count"], 1);
    for _ in 0..50 {
        if app.count("SELECT count(*) FROM push_subscriptions").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.count("SELECT count(*) FROM push_subscriptions").await,
        0
    );
}

#[tokio::test]
async fn a_message_without_text_is_notified_by_what_it_carries() {
    let (app, service) = push_app().await;
    let alex = app.user("Alex Rivera", Role::Member).await;
    let sam = app.user("Sam Patel", Role::Member).await;
    let browser = service.browser("sam-laptop");
    let (status, _) = app
        .post(&sam, "/api/v1/push/subscriptions", browser.json())
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = app
        .put(
            &sam,
            "/api/v1/push/settings",
            json!({"show_content": true, "quiet_hours": null}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let id = app.direct(&alex, &sam).await;
    let (status, reserved) = app
        .internal_post(
            "/internal/v1/attachments",
            &json!({"conversation_id": id, "uploader_id": alex.id, "kind": "image",
                    "mime": "image/jpeg", "size": 1000}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{reserved}");
    let mut photo = message(id, alex.id, 1);
    photo["content"] = json!("");
    photo["attachment_ids"] = json!([reserved["id"]]);
    let (status, body) = app
        .internal_post("/internal/v1/messages/batch", &json!({"messages": [photo]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let pushes = service.wait_for("sam-laptop", 1).await;
    assert_eq!(browser.open(&pushes[0])["body"], "📷 Photo");
}

#[tokio::test]
async fn no_push_reaches_a_muted_or_quiet_user_and_5xx_is_retried() {
    let (app, service) = push_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let browser = service.browser("sam");
    app.post(&sam, "/api/v1/push/subscriptions", browser.json())
        .await;
    let id = app.direct(&alex, &sam).await;
    let prefs = format!("/api/v1/chat/conversations/{id}/notifications");
    let mut seq = 0;
    let mut burst = async |app: &TestApp| {
        seq += 1;
        ingest_batch(app, id, &alex, seq..=seq, json!([])).await;
        // Coalescing (300 ms) and a round of the worker.
        for _ in 0..60 {
            if app.count("SELECT count(*) FROM push_jobs").await == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the job stayed queued");
    };

    // Muted until tomorrow.
    let tomorrow = chrono::Utc::now() + chrono::Duration::days(1);
    app.put(
        &sam,
        &prefs,
        json!({"level": "all", "muted_until": tomorrow}),
    )
    .await;
    burst(&app).await;
    // Level none.
    app.put(&sam, &prefs, json!({"level": "none"})).await;
    burst(&app).await;
    app.put(&sam, &prefs, json!({"level": "all"})).await;
    // Quiet hours around now, crossing midnight in Sam's zone or not.
    let now = chrono::Utc::now().with_timezone(&chrono_tz_offset());
    let start = (now - chrono::Duration::hours(1))
        .format("%H:%M")
        .to_string();
    let end = (now + chrono::Duration::hours(1))
        .format("%H:%M")
        .to_string();
    let (status, body) = app
        .put(
            &sam,
            "/api/v1/push/settings",
            json!({"show_content": false, "quiet_hours": {"start": start, "end": end, "time_zone": "Asia/Kolkata"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    burst(&app).await;
    assert!(service.received("sam").is_empty(), "no push so far");

    // Outside quiet hours (a window that ended an hour ago), the push goes;
    // a 500 and a 429 are retried with backoff, then accepted.
    let (start, end) = (
        (now - chrono::Duration::hours(3))
            .format("%H:%M")
            .to_string(),
        (now - chrono::Duration::hours(1))
            .format("%H:%M")
            .to_string(),
    );
    app.put(
        &sam,
        "/api/v1/push/settings",
        json!({"show_content": false, "quiet_hours": {"start": start, "end": end, "time_zone": "Asia/Kolkata"}}),
    )
    .await;
    service.answer_next(&[500, 429]);
    ingest_batch(&app, id, &alex, 4..=4, json!([])).await;
    let pushes = service.wait_for("sam", 3).await;
    assert_eq!(pushes.len(), 3);
    let payload = browser.open(&pushes[2]);
    assert_eq!(payload["seq"], 4);
    // A notification covers its own messages: the earlier ones, silenced,
    // are still unread but not counted again.
    assert_eq!(payload["count"], 1);
    for _ in 0..40 {
        if app.count("SELECT count(*) FROM push_jobs").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.count("SELECT count(*) FROM push_jobs").await, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(service.received("sam").len(), 3, "nothing more");
}

/// Asia/Kolkata: UTC+5:30 all year (no daylight saving), so the test's
/// window is computed without a time zone database.
fn chrono_tz_offset() -> chrono::FixedOffset {
    chrono::FixedOffset::east_opt(5 * 3600 + 1800).unwrap()
}

/// `user_presence` as the per-user edge layer reports it.
async fn presence(
    app: &TestApp,
    user: &TestUser,
    online: bool,
    last_seen: chrono::DateTime<chrono::Utc>,
) {
    let (status, body) = app
        .internal_post(
            "/internal/v1/presence",
            &json!({"updates": [{"user_id": user.id, "is_online": online, "last_seen": last_seen}]}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
}

async fn wait_count(app: &TestApp, sql: &str, n: i64) {
    for _ in 0..100 {
        if app.count(sql).await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{sql}: {} instead of {n}", app.count(sql).await);
}

#[tokio::test]
async fn an_online_member_is_pushed_only_what_came_after_their_last_connection_closed() {
    let (app, service) = push_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let browser = service.browser("sam");
    app.post(&sam, "/api/v1/push/subscriptions", browser.json())
        .await;
    let id = app.direct(&alex, &sam).await;
    let start = chrono::Utc::now() - chrono::Duration::seconds(60);

    // Sam has a tab open: the job waits, parked, for as long as that lasts.
    presence(&app, &sam, true, start).await;
    ingest_batch(&app, id, &alex, 1..=2, json!([])).await;
    wait_count(&app, "SELECT count(*) FROM push_jobs WHERE parked", 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        app.count("SELECT count(*) FROM push_jobs WHERE parked")
            .await,
        1
    );
    // The last tab closes after those messages: they came while Sam could
    // see them, so going offline ends the job without a push.
    presence(&app, &sam, false, chrono::Utc::now()).await;
    wait_count(&app, "SELECT count(*) FROM push_jobs", 0).await;

    // Online again; the last tab closes, and a message comes during the
    // grace period (before the edge reports Sam offline, with the time
    // the tab closed): it is pushed once Sam is offline, counted alone.
    presence(&app, &sam, true, chrono::Utc::now()).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let closed = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    ingest_batch(&app, id, &alex, 3..=3, json!([])).await;
    wait_count(&app, "SELECT count(*) FROM push_jobs WHERE parked", 1).await;
    assert!(service.received("sam").is_empty());
    presence(&app, &sam, false, closed).await;
    let pushes = service.wait_for("sam", 1).await;
    let payload = browser.open(&pushes[0]);
    assert_eq!(payload["seq"], 3);
    assert_eq!(payload["count"], 1);
    assert_eq!(payload["body"], "New message from Alex");
    wait_count(&app, "SELECT count(*) FROM push_jobs", 0).await;

    // Offline from then on: a new message is pushed after the coalescing.
    ingest_batch(&app, id, &alex, 4..=5, json!([])).await;
    let pushes = service.wait_for("sam", 2).await;
    let payload = browser.open(&pushes[1]);
    assert_eq!(
        (payload["seq"].clone(), payload["count"].clone()),
        (json!(5), json!(2))
    );
}

/// A message as the edge flushes it, mentioning `mentions`.
fn mentioning(conversation: i64, sender: &TestUser, seq: i64, mentions: &[i64]) -> Value {
    let mut m = message(conversation, sender.id, seq);
    m["mentions"] = json!(mentions);
    m
}

/// A delete of the message at `target` by `actor`, at `seq`.
fn deletion(conversation: i64, actor: &TestUser, seq: i64, target: i64) -> Value {
    json!({
        "id": crate::helpers::message_id(conversation, seq),
        "conversation_id": conversation, "seq": seq, "sender_id": actor.id,
        "content": "", "created_at": chrono::Utc::now(),
        "client_msg_id": format!("c-{conversation}-{seq}"),
        "change": {"target_id": crate::helpers::message_id(conversation, target), "kind": "delete"},
    })
}

async fn ingest_entries(app: &TestApp, entries: Vec<Value>) {
    let (status, body) = app
        .internal_post(
            "/internal/v1/messages/batch",
            &json!({ "messages": entries }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rejected"], json!([]), "{body}");
}

#[tokio::test]
async fn the_level_mentions_notifies_only_of_messages_that_mention_the_member() {
    let (app, service) = push_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let kim = app.user("Kim", Role::Member).await;
    let browser = service.browser("sam");
    app.post(&sam, "/api/v1/push/subscriptions", browser.json())
        .await;
    let group = app.group(&alex, "Crew", &[&sam, &kim]).await;
    let (status, body) = app
        .put(
            &sam,
            &format!("/api/v1/chat/conversations/{group}/notifications"),
            json!({"level": "mentions"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Messages that mention nobody, or someone else: nothing.
    ingest_entries(
        &app,
        vec![
            message(group, alex.id, 1),
            mentioning(group, &alex, 2, &[kim.id]),
        ],
    )
    .await;
    wait_count(&app, "SELECT count(*) FROM push_jobs", 0).await;
    // A mention that was deleted before the push went: nothing either.
    ingest_entries(
        &app,
        vec![
            mentioning(group, &alex, 3, &[sam.id]),
            deletion(group, &alex, 4, 3),
        ],
    )
    .await;
    wait_count(&app, "SELECT count(*) FROM push_jobs", 0).await;
    assert!(service.received("sam").is_empty());

    // A message that mentions Sam: a push, covering every unread message
    // of its burst.
    ingest_entries(
        &app,
        vec![
            message(group, alex.id, 5),
            mentioning(group, &alex, 6, &[sam.id, kim.id]),
        ],
    )
    .await;
    let pushes = service.wait_for("sam", 1).await;
    let payload = browser.open(&pushes[0]);
    assert_eq!(payload["seq"], 6);
    assert_eq!(payload["count"], 2);
}

#[tokio::test]
async fn a_message_deleted_before_its_push_is_never_in_it() {
    let (app, service) = push_app().await;
    let alex = app.user("Alex", Role::Member).await;
    let sam = app.user("Sam", Role::Member).await;
    let browser = service.browser("sam");
    app.post(&sam, "/api/v1/push/subscriptions", browser.json())
        .await;
    let (status, _) = app
        .put(
            &sam,
            "/api/v1/push/settings",
            json!({"show_content": true, "quiet_hours": null}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let id = app.direct(&alex, &sam).await;

    // Deleted within the coalescing delay, alone: no push at all.
    let mut secret = message(id, alex.id, 1);
    secret["content"] = json!("the secret plan");
    ingest_entries(&app, vec![secret]).await;
    ingest_entries(&app, vec![deletion(id, &alex, 2, 1)]).await;
    wait_count(&app, "SELECT count(*) FROM push_jobs", 0).await;
    assert!(service.received("sam").is_empty());

    // Deleted as the newest of a burst: the push counts what stands and
    // shows no text of the deleted one.
    let mut secret = message(id, alex.id, 4);
    secret["content"] = json!("another secret");
    ingest_entries(
        &app,
        vec![message(id, alex.id, 3), secret, deletion(id, &alex, 5, 4)],
    )
    .await;
    let pushes = service.wait_for("sam", 1).await;
    let payload = browser.open(&pushes[0]);
    assert_eq!(payload["count"], 1);
    assert!(
        !payload.to_string().contains("secret"),
        "a deleted text was pushed: {payload}"
    );
}
