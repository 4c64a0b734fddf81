//! Web Push end to end: the origin sends, a local push service
//! ([`e2e::PushService`]) checks every request as a browser's push service
//! would (VAPID, aes128gcm, headers) and decrypts it with the
//! subscription's keys, as the browser would.
//!
//! Messages reach PostgreSQL through the Room's outbox, then wait out the
//! origin's coalescing window (`PUSH_COALESCE_MS`, 500 ms in this suite),
//! so arrivals get generous waits. An absence is never shown by sleeping:
//! each test waits for a later push to someone else (or the same person)
//! that was queued after the push that must not come, and only then looks.
//! Every test ends asserting the push service saw no protocol violation.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use e2e::push::{Delivery, PushService, RetryAfter, Subscription};
use e2e::{Stack, User};
use origin::push::webpush::SEND_TIMEOUT;
use origin::push::worker::LEASE;
use serde_json::{Value, json};

/// The suite's origin settings for push (see `main`).
pub const COALESCE_MS: u64 = 500;
pub const RETRY_BASE_MS: u64 = 200;
pub const MAX_ATTEMPTS: usize = 3;
pub const SUBJECT: &str = "mailto:push-e2e@vibe.test";

/// The coalescing window while the origin is killed with pushes queued:
/// long enough for the sends, the outbox flush and the kill, on a loaded
/// machine.
const RESTART_WINDOW_MS: u64 = 8_000;

/// How long a test waits for a push it expects: the outbox flush, the
/// coalescing window and the sender's poll, on a loaded machine.
const ARRIVAL: Duration = Duration::from_secs(30);

/// The origin variables the push tests need, with a fresh VAPID key.
pub fn origin_vars(private_key: &str) -> Vec<(String, String)> {
    [
        ("VAPID_PRIVATE_KEY", private_key.to_owned()),
        ("VAPID_SUBJECT", SUBJECT.to_owned()),
        ("PUSH_ALLOW_LOOPBACK", "true".to_owned()),
        ("PUSH_COALESCE_MS", COALESCE_MS.to_string()),
        ("PUSH_RETRY_BASE_MS", RETRY_BASE_MS.to_string()),
        ("PUSH_MAX_ATTEMPTS", MAX_ATTEMPTS.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A push service for one test, and the deployment's VAPID public key.
struct Push {
    service: PushService,
    key: String,
}

impl Push {
    /// Starts a push service and reads the VAPID key as a browser would.
    async fn start(s: &Stack, anyone: &User) -> anyhow::Result<Self> {
        let (status, body) = s
            .call(
                Some(anyone),
                reqwest::Method::GET,
                "/api/v1/push/vapid-public-key",
                None,
            )
            .await?;
        ensure!(status == 200, "vapid-public-key: {status} {body}");
        let key = body["key"].as_str().context("key")?.to_owned();
        Ok(Self {
            service: PushService::start().await?,
            key,
        })
    }

    /// `user` turns notifications on on a new device: a subscription
    /// restricted to the deployment's key, registered at the origin.
    async fn subscribe(&self, s: &Stack, user: &User) -> anyhow::Result<Device> {
        let sub = self.service.subscribe_restricted(&self.key)?;
        let (status, body) = s
            .call(
                Some(user),
                reqwest::Method::POST,
                "/api/v1/push/subscriptions",
                Some(sub.json()),
            )
            .await?;
        ensure!(status == 201, "subscribe: {status} {body}");
        ensure!(body["endpoint"] == sub.endpoint.as_str(), "{body}");
        ensure!(body["created_at"].is_string(), "{body}");
        let id = match &body["id"] {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            other => bail!("subscription id {other}"),
        };
        Ok(Device { sub, id })
    }

    fn requests(&self, d: &Device) -> Vec<Delivery> {
        self.service.requests(&d.sub)
    }

    /// Waits for `d`'s push about `seq` of `conv` (answered 2xx).
    async fn push_for(&self, d: &Device, conv: i64, seq: i64) -> anyhow::Result<Delivery> {
        let got = self
            .service
            .wait_until(&d.sub, ARRIVAL, |r| {
                r.iter().any(|p| p.accepted() && is_message(p, conv, seq))
            })
            .await
            .with_context(|| format!("a push about {conv}#{seq}"))?;
        got.into_iter()
            .find(|p| p.accepted() && is_message(p, conv, seq))
            .context("found")
    }

    fn ensure_clean(&self) -> anyhow::Result<()> {
        self.service.ensure_no_violations()
    }
}

/// One browser's subscription: the push service's side and the origin's id.
struct Device {
    sub: Subscription,
    id: String,
}

fn is_message(p: &Delivery, conv: i64, seq: i64) -> bool {
    p.payload["type"] == "message"
        && p.payload["conversation_id"] == conv
        && p.payload["seq"] == seq
}

/// The message pushes (not `clear`) among `requests`.
fn messages(requests: &[Delivery]) -> Vec<&Delivery> {
    requests
        .iter()
        .filter(|p| p.payload["type"] == "message")
        .collect()
}

/// What the pushes in `requests` were about: (conversation, seq, status).
fn summary(requests: &[Delivery]) -> Vec<(i64, i64, u16)> {
    messages(requests)
        .iter()
        .map(|p| {
            (
                p.payload["conversation_id"].as_i64().unwrap_or(-1),
                p.payload["seq"].as_i64().unwrap_or(-1),
                p.status,
            )
        })
        .collect()
}

/// `sender` posts `content` to `conv` (the POST path: no connection, so
/// the sender's own presence is untouched); returns its seq.
async fn send(s: &Stack, sender: &User, conv: i64, content: &str) -> anyhow::Result<i64> {
    let key = uuid::Uuid::now_v7().simple().to_string();
    let (status, body) = s
        .call(
            Some(sender),
            reqwest::Method::POST,
            &format!("/api/v1/chat/conversations/{conv}/messages"),
            Some(json!({"content": content, "client_msg_id": key})),
        )
        .await?;
    ensure!(status == 201, "send: {status} {body}");
    body["seq"].as_i64().context("seq")
}

/// The push a member without content gets: everything the service
/// worker needs, and nothing of the message.
fn ensure_private_push(
    p: &Delivery,
    conv: i64,
    seq: i64,
    count: i64,
    sender: &User,
    secrets: &[&str],
) -> anyhow::Result<()> {
    let body = &p.payload;
    ensure!(
        body["type"] == "message"
            && body["conversation_id"] == conv
            && body["seq"] == seq
            && body["count"] == count
            && body["sender_id"] == sender.id
            && body["sender_name"] == sender.name.as_str()
            && body["tag"] == format!("conversation-{conv}").as_str()
            && body["url"] == format!("/?conversation={conv}").as_str(),
        "payload {body}"
    );
    ensure!(
        body["title"].as_str().is_some_and(|t| !t.is_empty()),
        "title {body}"
    );
    let expected = if count == 1 {
        format!("New message from {}", sender.name)
    } else {
        format!("{count} new messages from {}", sender.name)
    };
    ensure!(
        body["body"] == expected.as_str(),
        "body {body}, not {expected:?}"
    );
    let text = body.to_string();
    for secret in secrets {
        ensure!(!text.contains(secret), "the content leaked: {text}");
    }
    ensure!(
        p.topic.as_deref() == Some(format!("c{conv}").as_str()),
        "Topic {:?}",
        p.topic
    );
    ensure!(p.urgency.is_some(), "no Urgency");
    ensure!(p.ttl > 0, "TTL {}", p.ttl);
    ensure!(p.contact == SUBJECT, "sub {}", p.contact);
    Ok(())
}

/// A distinctive message text, to look for in payloads.
fn secret(what: &str) -> String {
    format!("{what} {}", uuid::Uuid::now_v7().simple())
}

async fn put(s: &Stack, user: &User, path: &str, body: Value) -> anyhow::Result<Value> {
    let (status, got) = s
        .call(Some(user), reqwest::Method::PUT, path, Some(body))
        .await?;
    ensure!(status == 200, "PUT {path}: {status} {got}");
    Ok(got)
}

async fn get(s: &Stack, user: &User, path: &str) -> anyhow::Result<Value> {
    let (status, got) = s.call(Some(user), reqwest::Method::GET, path, None).await?;
    ensure!(status == 200, "GET {path}: {status} {got}");
    Ok(got)
}

fn notifications(conv: i64) -> String {
    format!("/api/v1/chat/conversations/{conv}/notifications")
}

/// Waits until REST says `user` is online (their User object reported it).
async fn online(s: &Stack, viewer: &User, user: &User) -> anyhow::Result<()> {
    presence_becomes(s, viewer, user, true).await
}

/// Waits until REST says `user` is offline (the grace period is over).
async fn offline(s: &Stack, viewer: &User, user: &User) -> anyhow::Result<()> {
    presence_becomes(s, viewer, user, false).await
}

async fn presence_becomes(
    s: &Stack,
    viewer: &User,
    user: &User,
    online: bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while s.presence(viewer, user.id).await?.0 != online {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{} never showed {}",
            user.name,
            if online { "online" } else { "offline" }
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------

/// 1. A burst to an offline member is one notification: "5 new messages
///    from Sam Patel", with the conversation, the sender and the Topic
///    that collapses it, and none of the text.
pub async fn an_offline_member_gets_one_push_per_burst_with_the_sender_and_no_content(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let sam = s.user("Sam Patel").await?;
    let maya = s.user("Maya").await?;
    let conv = s.direct(&sam, &maya).await?;
    let push = Push::start(s, &maya).await?;
    let phone = push.subscribe(s, &maya).await?;
    // The key served is a P-256 point, and the one that signs.
    ensure!(
        base64_len(&push.key) == Some(65),
        "vapid key {:?}",
        push.key
    );
    let texts: Vec<String> = (1..=5).map(|i| secret(&format!("knee {i}"))).collect();
    let mut last = 0;
    for text in &texts {
        last = send(s, &sam, conv, text).await?;
    }
    ensure!(last == 5, "seq {last}");
    let p = push.push_for(&phone, conv, 5).await?;
    let secrets: Vec<&str> = texts.iter().map(String::as_str).collect();
    ensure_private_push(&p, conv, 5, 5, &sam, &secrets)?;
    ensure!(p.vapid_key == push.key, "signed by {}", p.vapid_key);

    // One push for the burst: a later message is pushed after it, and
    // nothing came between.
    let later = secret("later");
    send(s, &sam, conv, &later).await?;
    push.push_for(&phone, conv, 6).await?;
    let got = summary(&push.requests(&phone));
    ensure!(got == [(conv, 5, 201), (conv, 6, 201)], "pushes {got:?}");

    // Maya reads on some device: a silent push closes the notification
    // on all of them.
    let res = s
        .http()
        .post(format!("{}/api/v1/chat/conversations/{conv}/read", s.edge))
        .bearer_auth(&maya.token)
        .json(&json!({"seq": 6}))
        .send()
        .await?;
    ensure!(res.status().as_u16() == 204, "read: {}", res.status());
    let requests = push
        .service
        .wait_until(&phone.sub, ARRIVAL, |r| {
            r.iter().any(|p| p.payload["type"] == "clear")
        })
        .await?;
    let clear = requests
        .iter()
        .find(|p| p.payload["type"] == "clear")
        .context("clear")?;
    ensure!(
        clear.payload
            == json!({"type": "clear", "conversation_id": conv, "tag": format!("conversation-{conv}")}),
        "{}",
        clear.payload
    );
    ensure!(
        clear.topic.as_deref() == Some(format!("c{conv}").as_str()),
        "Topic {:?}",
        clear.topic
    );
    push.ensure_clean()
}

fn base64_len(s: &str) -> Option<usize> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
        .map(|b| b.len())
}

/// 2. A member with a live connection is not pushed; an offline member
///    of the same group is, twice, and only then do we look.
pub async fn a_member_with_a_live_connection_gets_no_push(s: &mut Stack) -> anyhow::Result<()> {
    let sam = s.user("Sam").await?;
    let bea = s.user("Bea").await?;
    let cal = s.user("Cal").await?;
    let group = s.group(&sam, &[&bea, &cal]).await?;
    let push = Push::start(s, &sam).await?;
    let bea_phone = push.subscribe(s, &bea).await?;
    let cal_phone = push.subscribe(s, &cal).await?;
    let mut tab = s.always_on(&bea).await?;
    tab.expect("presence_snapshot").await?;
    online(s, &sam, &bea).await?;

    let first = send(s, &sam, group, &secret("one")).await?;
    push.push_for(&cal_phone, group, first).await?;
    // Bea's push for the first message, had there been one, was due with
    // Cal's; the second is queued only now.
    let second = send(s, &sam, group, &secret("two")).await?;
    push.push_for(&cal_phone, group, second).await?;
    ensure!(
        push.requests(&bea_phone).is_empty(),
        "online Bea was pushed: {:?}",
        summary(&push.requests(&bea_phone))
    );

    // Bea closes her last tab: once the grace period is over she is
    // offline, and the next message reaches her phone.
    tab.close().await?;
    offline(s, &sam, &bea).await?;
    let third = send(s, &sam, group, &secret("three")).await?;
    let p = push.push_for(&bea_phone, group, third).await?;
    // About that message alone: the two she was online for are not
    // brought up again now that she has left.
    ensure!(
        p.payload["sender_id"] == sam.id && p.payload["count"] == 1,
        "{}",
        p.payload
    );
    ensure!(
        summary(&push.requests(&bea_phone)) == [(group, third, 201)],
        "{:?}",
        summary(&push.requests(&bea_phone))
    );
    push.ensure_clean()
}

/// 2b. A message that arrives after a member closed their last tab but
///    before the grace period ended them is pushed once they are offline:
///    they had no live connection when it was stored, and they have not
///    read it.
pub async fn a_message_during_the_grace_period_is_pushed_once_the_member_is_offline(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let sam = s.user("Sam").await?;
    let bea = s.user("Bea").await?;
    let conv = s.direct(&sam, &bea).await?;
    let push = Push::start(s, &sam).await?;
    let bea_phone = push.subscribe(s, &bea).await?;
    let mut tab = s.always_on(&bea).await?;
    tab.expect("presence_snapshot").await?;
    online(s, &sam, &bea).await?;
    tab.close().await?;
    // Within the suite's 1.5 s grace: the origin still says online.
    let seq = send(s, &sam, conv, &secret("right after you left")).await?;
    offline(s, &sam, &bea).await?;
    let p = push
        .push_for(&bea_phone, conv, seq)
        .await
        .context("the message that came during the grace period was never pushed")?;
    ensure_private_push(&p, conv, seq, 1, &sam, &[])?;
    push.ensure_clean()
}

/// 3. A muted conversation, a conversation set to nothing, and quiet
///    hours around now each silence the push; set back, each is pushed.
pub async fn muted_conversations_level_none_and_quiet_hours_get_no_push(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let sam = s.user("Sam").await?;
    let muted = s.user("Muted").await?;
    let none = s.user("None").await?;
    let quiet = s.user("Quiet").await?;
    let control = s.user("Control").await?;
    let group = s.group(&sam, &[&muted, &none, &quiet, &control]).await?;
    let push = Push::start(s, &sam).await?;
    let devices = [
        push.subscribe(s, &muted).await?,
        push.subscribe(s, &none).await?,
        push.subscribe(s, &quiet).await?,
    ];
    let control_phone = push.subscribe(s, &control).await?;

    // Defaults: everything, not muted, no quiet hours, private.
    let level = get(s, &muted, &notifications(group)).await?;
    ensure!(
        level == json!({"level": "all", "muted_until": null}),
        "{level}"
    );
    let settings = get(s, &quiet, "/api/v1/push/settings").await?;
    ensure!(
        settings["show_content"] == false && settings["quiet_hours"].is_null(),
        "{settings}"
    );

    let until = (chrono::Utc::now() + chrono::Duration::hours(2))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let got = put(
        s,
        &muted,
        &notifications(group),
        json!({"level": "all", "muted_until": until}),
    )
    .await?;
    ensure!(got["muted_until"].is_string(), "{got}");
    put(
        s,
        &none,
        &notifications(group),
        json!({"level": "none", "muted_until": null}),
    )
    .await?;
    // Quiet hours from an hour ago to an hour ahead, in Kolkata
    // (UTC+05:30 all year: the origin must convert, half hours too).
    let kolkata = chrono::Utc::now() + chrono::Duration::minutes(5 * 60 + 30);
    let hhmm = |t: chrono::DateTime<chrono::Utc>| t.format("%H:%M").to_string();
    let window = json!({
        "start": hhmm(kolkata - chrono::Duration::hours(1)),
        "end": hhmm(kolkata + chrono::Duration::hours(1)),
        "time_zone": "Asia/Kolkata",
    });
    let got = put(
        s,
        &quiet,
        "/api/v1/push/settings",
        json!({"show_content": false, "quiet_hours": window}),
    )
    .await?;
    ensure!(got["quiet_hours"] == window, "{got}");

    let first = send(s, &sam, group, &secret("one")).await?;
    push.push_for(&control_phone, group, first).await?;
    let second = send(s, &sam, group, &secret("two")).await?;
    push.push_for(&control_phone, group, second).await?;
    for (user, d) in [&muted, &none, &quiet].iter().zip(&devices) {
        ensure!(
            push.requests(d).is_empty(),
            "{} was pushed: {:?}",
            user.name,
            summary(&push.requests(d))
        );
    }

    // Quiet hours elsewhere in the day do not silence anything, and the
    // others turn notifications back on: each is pushed the next message.
    let elsewhere = json!({
        "start": hhmm(kolkata + chrono::Duration::hours(3)),
        "end": hhmm(kolkata + chrono::Duration::hours(4)),
        "time_zone": "Asia/Kolkata",
    });
    put(
        s,
        &quiet,
        "/api/v1/push/settings",
        json!({"show_content": false, "quiet_hours": elsewhere}),
    )
    .await?;
    for user in [&muted, &none] {
        put(
            s,
            user,
            &notifications(group),
            json!({"level": "all", "muted_until": null}),
        )
        .await?;
    }
    let third = send(s, &sam, group, &secret("three")).await?;
    for d in &devices {
        push.push_for(d, group, third).await?;
        let got = summary(&push.requests(d));
        ensure!(
            got.iter().all(|(_, seq, _)| *seq == third),
            "pushes {got:?}"
        );
    }
    push.ensure_clean()
}

/// 4. The text is in the push only for a user who allowed it.
pub async fn content_is_in_the_push_only_when_the_user_allowed_it(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let sam = s.user("Sam Patel").await?;
    let private = s.user("Private").await?;
    let open = s.user("Open").await?;
    let group = s.group(&sam, &[&private, &open]).await?;
    let push = Push::start(s, &sam).await?;
    let private_phone = push.subscribe(s, &private).await?;
    let open_phone = push.subscribe(s, &open).await?;
    let got = put(
        s,
        &open,
        "/api/v1/push/settings",
        json!({"show_content": true, "quiet_hours": null}),
    )
    .await?;
    ensure!(got["show_content"] == true, "{got}");
    ensure!(
        get(s, &open, "/api/v1/push/settings").await?["show_content"] == true,
        "not kept"
    );

    let text = secret("My left knee hurts after squats");
    let seq = send(s, &sam, group, &text).await?;
    let hidden = push.push_for(&private_phone, group, seq).await?;
    ensure_private_push(&hidden, group, seq, 1, &sam, &[&text])?;
    let shown = push.push_for(&open_phone, group, seq).await?;
    ensure!(
        shown.payload["body"]
            .as_str()
            .is_some_and(|b| b.contains(&text)),
        "the allowed push lacks the text: {}",
        shown.payload
    );
    ensure!(
        shown.payload["sender_id"] == sam.id
            && shown.topic.as_deref() == Some(&*format!("c{group}")),
        "{:?}",
        shown
    );
    push.ensure_clean()
}

/// 5. 410 (and 404) from the push service: the subscription is gone at
///    the origin; the next message makes no request to it.
pub async fn a_410_or_404_from_the_push_service_deletes_the_subscription(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let sam = s.user("Sam").await?;
    let maya = s.user("Maya").await?;
    let conv = s.direct(&sam, &maya).await?;
    let push = Push::start(s, &maya).await?;
    let gone = push.subscribe(s, &maya).await?;
    let unknown = push.subscribe(s, &maya).await?;
    let laptop = push.subscribe(s, &maya).await?;
    push.service.set_status(&gone.sub, 410);
    push.service.set_status(&unknown.sub, 404);

    let first = send(s, &sam, conv, &secret("one")).await?;
    push.push_for(&laptop, conv, first).await?;
    for d in [&gone, &unknown] {
        push.service
            .wait_until(&d.sub, ARRIVAL, |r| !r.is_empty())
            .await?;
    }
    let second = send(s, &sam, conv, &secret("two")).await?;
    push.push_for(&laptop, conv, second).await?;
    ensure!(
        summary(&push.requests(&gone)) == [(conv, first, 410)],
        "{:?}",
        summary(&push.requests(&gone))
    );
    ensure!(
        summary(&push.requests(&unknown)) == [(conv, first, 404)],
        "{:?}",
        summary(&push.requests(&unknown))
    );
    for (d, expected) in [(&gone, 404), (&unknown, 404), (&laptop, 204)] {
        let (status, body) = s
            .call(
                Some(&maya),
                reqwest::Method::DELETE,
                &format!("/api/v1/push/subscriptions/{}", d.id),
                None,
            )
            .await?;
        ensure!(status == expected, "DELETE {}: {status} {body}", d.id);
    }
    push.ensure_clean()
}

/// 6. 500 and 429 are retried with backoff until one is accepted, and
///    that one is delivered once; a service that always fails is given up
///    on after the bounded attempts, and the subscription kept.
pub async fn a_500_or_429_from_the_push_service_is_retried_then_delivered_once(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let sam = s.user("Sam").await?;
    let maya = s.user("Maya").await?;
    let conv = s.direct(&sam, &maya).await?;
    let push = Push::start(s, &maya).await?;
    let flaky = push.subscribe(s, &maya).await?;
    let down = push.subscribe(s, &maya).await?;
    push.service.answer_next(&flaky.sub, &[500, 429]);
    push.service.set_status(&down.sub, 503);

    let first = send(s, &sam, conv, &secret("one")).await?;
    push.push_for(&flaky, conv, first).await?;
    push.service
        .wait_until(&down.sub, ARRIVAL, |r| r.len() >= MAX_ATTEMPTS)
        .await?;
    let retries = push.requests(&flaky);
    ensure!(
        summary(&retries) == [(conv, first, 500), (conv, first, 429), (conv, first, 201)],
        "{:?}",
        summary(&retries)
    );
    // The same notification each time (re-encrypted, but the same payload).
    ensure!(
        retries.windows(2).all(|w| w[0].payload == w[1].payload),
        "{retries:?}"
    );
    // Backoff: no retry right on the heels of a failure.
    for w in retries.windows(2) {
        let gap = w[1].at.duration_since(w[0].at);
        ensure!(
            gap >= Duration::from_millis(RETRY_BASE_MS / 2),
            "retried after {gap:?}"
        );
    }

    // The next message: the failing device is back and gets only it (no
    // attempt past the bound came for the first one), the flaky one gets
    // it once.
    push.service.set_status(&down.sub, 201);
    let second = send(s, &sam, conv, &secret("two")).await?;
    push.push_for(&flaky, conv, second).await?;
    push.push_for(&down, conv, second).await?;
    let mut expected = vec![(conv, first, 503); MAX_ATTEMPTS];
    expected.push((conv, second, 201));
    ensure!(
        summary(&push.requests(&down)) == expected,
        "{:?}",
        summary(&push.requests(&down))
    );
    ensure!(
        summary(&push.requests(&flaky))
            == [
                (conv, first, 500),
                (conv, first, 429),
                (conv, first, 201),
                (conv, second, 201)
            ],
        "{:?}",
        summary(&push.requests(&flaky))
    );
    push.ensure_clean()
}

/// 6b. A 429 with `Retry-After` is retried no sooner than it asked, in
///    delay-seconds (3) and as an HTTP-date (4 s ahead), far past the
///    suite's 200 ms backoff; the retry goes only to the device that
///    refused, and each notification is delivered once.
pub async fn a_429_from_the_push_service_with_retry_after_is_retried_no_sooner_than_asked(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let sam = s.user("Sam").await?;
    let maya = s.user("Maya").await?;
    let conv = s.direct(&sam, &maya).await?;
    let push = Push::start(s, &maya).await?;
    let phone = push.subscribe(s, &maya).await?;
    let laptop = push.subscribe(s, &maya).await?;

    // (Retry-After, the least wait it promises after the 429.)
    let cases = [
        (RetryAfter::Seconds(3), Duration::from_secs(3)),
        // An IMF-fixdate has whole seconds: up to one less than asked.
        (
            RetryAfter::DateIn(Duration::from_secs(4)),
            Duration::from_secs(3),
        ),
    ];
    let mut seqs = Vec::new();
    for (after, least) in cases {
        push.service.answer_next_retry_after(&phone.sub, 429, after);
        let seq = send(s, &sam, conv, &secret("slow down")).await?;
        let delivered = push.push_for(&phone, conv, seq).await?;
        let refused = push
            .requests(&phone)
            .into_iter()
            .find(|p| p.status == 429 && is_message(p, conv, seq))
            .context("the 429")?;
        let waited = delivered.at.duration_since(refused.at);
        println!("    Retry-After {after:?}: retried after {waited:?}");
        ensure!(
            waited >= least,
            "Retry-After {after:?}: retried after {waited:?}, sooner than {least:?}"
        );
        ensure!(
            delivered.payload == refused.payload && delivered.topic == refused.topic,
            "the retry is another notification: {} vs {}",
            delivered.payload,
            refused.payload
        );
        push.push_for(&laptop, conv, seq).await?;
        seqs.push(seq);
    }

    // A later message comes after the retries, and nothing else came in
    // between: each notification delivered once, the laptop (which
    // accepted the first time) never asked again.
    let last = send(s, &sam, conv, &secret("thanks")).await?;
    push.push_for(&phone, conv, last).await?;
    push.push_for(&laptop, conv, last).await?;
    let got = summary(&push.requests(&phone));
    ensure!(
        got == [
            (conv, seqs[0], 429),
            (conv, seqs[0], 201),
            (conv, seqs[1], 429),
            (conv, seqs[1], 201),
            (conv, last, 201)
        ],
        "phone: {got:?}"
    );
    let got = summary(&push.requests(&laptop));
    ensure!(
        got == [
            (conv, seqs[0], 201),
            (conv, seqs[1], 201),
            (conv, last, 201)
        ],
        "laptop: {got:?}"
    );
    push.ensure_clean()
}

/// 7. A stranger's send is refused and pushes nobody; a removed member
///    is pushed nothing of what follows.
pub async fn non_participants_cause_no_push_and_removed_members_get_none(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let sam = s.user("Sam").await?;
    let maya = s.user("Maya").await?;
    let eve = s.user("Eve").await?;
    let conv = s.direct(&sam, &maya).await?;
    let push = Push::start(s, &sam).await?;
    let sam_phone = push.subscribe(s, &sam).await?;
    let maya_phone = push.subscribe(s, &maya).await?;
    let eve_phone = push.subscribe(s, &eve).await?;

    // Eve posts into a conversation that is not hers: refused on every
    // path, nothing stored, nothing pushed.
    let (status, body) = s
        .call(
            Some(&eve),
            reqwest::Method::POST,
            &format!("/api/v1/chat/conversations/{conv}/messages"),
            Some(json!({"content": "hi from eve", "client_msg_id": "eve-1"})),
        )
        .await?;
    ensure!(status == 403, "{status} {body}");
    let mut ws = s.ws(&eve, conv, None).await?;
    let (_, closed) = ws.closed().await?;
    ensure!(closed.code == 1008, "{closed:?}");
    // Her notification settings for it are not hers to read or set.
    let (status, _) = s
        .call(Some(&eve), reqwest::Method::GET, &notifications(conv), None)
        .await?;
    ensure!(status == 403 || status == 404, "{status}");

    // Nor can anyone make the origin post somewhere that is not a push
    // service (SSRF): this suite allows loopback, nothing else.
    let keys = push.service.subscribe();
    for endpoint in [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/push/x",
        "https://push.evil.example/push/x",
        "https://fcm.googleapis.com:8443/fcm/send/x",
        "file:///etc/passwd",
    ] {
        let mut body = keys.json();
        body["endpoint"] = json!(endpoint);
        let (status, got) = s
            .call(
                Some(&eve),
                reqwest::Method::POST,
                "/api/v1/push/subscriptions",
                Some(body),
            )
            .await?;
        ensure!(
            status == 422 && got["code"] == "endpoint_not_allowed",
            "{endpoint}: {status} {got}"
        );
    }

    // Then Sam writes (seq 1) and Maya answers (seq 2): the first push
    // each gets is about the other's message.
    let first = send(s, &sam, conv, &secret("one")).await?;
    ensure!(first == 1, "Eve's message took seq 1: {first}");
    let p = push.push_for(&maya_phone, conv, first).await?;
    ensure_private_push(&p, conv, first, 1, &sam, &["hi from eve"])?;
    let second = send(s, &maya, conv, &secret("two")).await?;
    let p = push.push_for(&sam_phone, conv, second).await?;
    ensure_private_push(&p, conv, second, 1, &maya, &["hi from eve"])?;
    ensure!(summary(&push.requests(&maya_phone)) == [(conv, 1, 201)]);
    ensure!(summary(&push.requests(&sam_phone)) == [(conv, 2, 201)]);
    ensure!(push.requests(&eve_phone).is_empty(), "Eve was pushed");

    // A group: Cal is pushed while a member, then removed, then nothing.
    let bea = s.user("Bea").await?;
    let cal = s.user("Cal").await?;
    let group = s.group(&sam, &[&bea, &cal]).await?;
    let bea_phone = push.subscribe(s, &bea).await?;
    let cal_phone = push.subscribe(s, &cal).await?;
    let g1 = send(s, &sam, group, &secret("g one")).await?;
    push.push_for(&cal_phone, group, g1).await?;
    push.push_for(&bea_phone, group, g1).await?;
    let (status, body) = s
        .call(
            Some(&sam),
            reqwest::Method::DELETE,
            &format!("/api/v1/chat/conversations/{group}/participants"),
            Some(json!({"user_ids": [cal.id]})),
        )
        .await?;
    ensure!(status == 200, "{status} {body}");
    let g2 = send(s, &sam, group, &secret("g two")).await?;
    push.push_for(&bea_phone, group, g2).await?;
    let g3 = send(s, &sam, group, &secret("g three")).await?;
    push.push_for(&bea_phone, group, g3).await?;
    ensure!(
        summary(&push.requests(&cal_phone)) == [(group, g1, 201)],
        "the removed member was pushed: {:?}",
        summary(&push.requests(&cal_phone))
    );
    push.ensure_clean()
}

/// A member who can log in: two sessions (phone and laptop) of one
/// account, each a [`User`] with its own session's token.
async fn logged_in_twice(s: &Stack, name: &str) -> anyhow::Result<(User, User)> {
    let email = format!(
        "{}-{}@e2e.vibe",
        name.to_lowercase().replace(' ', "-"),
        uuid::Uuid::now_v7().simple()
    );
    let password = "a-long-password-for-push";
    let hash = origin::auth::hash_password(password)?;
    s.pool
        .get()
        .await?
        .execute(
            "INSERT INTO users (email, full_name, role, password_hash)
             VALUES ($1, $2, 'member', $3)",
            &[&email, &name, &hash],
        )
        .await?;
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let (status, body) = s
            .call(
                None,
                reqwest::Method::POST,
                "/api/v1/auth/login",
                Some(json!({"email": email, "password": password})),
            )
            .await?;
        ensure!(status == 200, "login: {status} {body}");
        sessions.push(User {
            id: body["user"]["id"].as_i64().context("user id")?,
            name: name.to_owned(),
            token: body["token"].as_str().context("token")?.to_owned(),
        });
    }
    let laptop = sessions.pop().context("laptop")?;
    let phone = sessions.pop().context("phone")?;
    Ok((phone, laptop))
}

/// 9. Logging out removes the subscription that session registered, and
///    only that one: the other device is still pushed.
pub async fn logging_out_removes_that_sessions_push_subscription(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let sam = s.user("Sam").await?;
    let (phone, laptop) = logged_in_twice(s, "Robin").await?;
    let conv = s.direct(&sam, &phone).await?;
    let push = Push::start(s, &sam).await?;
    let on_phone = push.subscribe(s, &phone).await?;
    let on_laptop = push.subscribe(s, &laptop).await?;
    let first = send(s, &sam, conv, &secret("one")).await?;
    push.push_for(&on_phone, conv, first).await?;
    push.push_for(&on_laptop, conv, first).await?;

    let (status, body) = s
        .call(
            Some(&phone),
            reqwest::Method::POST,
            "/api/v1/auth/logout",
            None,
        )
        .await?;
    ensure!(status == 204, "logout: {status} {body}");
    let (status, body) = s
        .call(
            Some(&laptop),
            reqwest::Method::DELETE,
            &format!("/api/v1/push/subscriptions/{}", on_phone.id),
            None,
        )
        .await?;
    ensure!(
        status == 404,
        "the phone's subscription outlived its session: {status} {body}"
    );
    let second = send(s, &sam, conv, &secret("two")).await?;
    push.push_for(&on_laptop, conv, second).await?;
    let third = send(s, &sam, conv, &secret("three")).await?;
    push.push_for(&on_laptop, conv, third).await?;
    ensure!(
        summary(&push.requests(&on_phone)) == [(conv, first, 201)],
        "the logged-out phone was pushed: {:?}",
        summary(&push.requests(&on_phone))
    );
    push.ensure_clean()
}

/// 8. The origin killed (SIGKILL) with notifications queued and not yet
///    due, then started again on the same database: each notification is
///    sent exactly once, and none to a member removed while it waited.
///
/// The kill comes while the jobs wait out a long coalescing window, never
/// while a request is in flight. Exactly once cannot hold across that
/// other crash: if the process dies after the push service accepted a
/// request and before the origin recorded it as sent, the restarted origin
/// cannot know, and sends it again (at least once; the `Topic` makes the
/// push service and the browser replace the first with the second, so the
/// user still sees one notification).
pub async fn an_origin_killed_with_pushes_queued_sends_each_exactly_once(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let vars = [("PUSH_COALESCE_MS".to_owned(), RESTART_WINDOW_MS.to_string())];
    s.start_origin_process(&vars).await?;
    let result = killed_with_pushes_queued(s, &vars).await;
    // Whatever happened, the rest of the suite gets its usual origin.
    s.kill_origin_process();
    s.start_origin()?;
    result
}

async fn killed_with_pushes_queued(s: &mut Stack, vars: &[(String, String)]) -> anyhow::Result<()> {
    let sam = s.user("Sam").await?;
    let push = Push::start(s, &sam).await?;
    // Three members with a direct conversation each, and a group of two.
    let mut directs = Vec::new();
    for name in ["Ana", "Ben", "Cyd"] {
        let user = s.user(name).await?;
        let conv = s.direct(&sam, &user).await?;
        let phone = push.subscribe(s, &user).await?;
        directs.push((user, conv, phone));
    }
    let bea = s.user("Bea").await?;
    let cal = s.user("Cal").await?;
    let group = s.group(&sam, &[&bea, &cal]).await?;
    let bea_phone = push.subscribe(s, &bea).await?;
    let cal_phone = push.subscribe(s, &cal).await?;

    let queued_at = tokio::time::Instant::now();
    // (device, conversation, last seq, count): what must arrive.
    let mut expected: Vec<(&Device, i64, i64, i64)> = Vec::new();
    for (i, (_, conv, phone)) in directs.iter().enumerate() {
        let n = i as i64 + 1;
        let mut last = 0;
        for k in 0..n {
            last = send(s, &sam, *conv, &secret(&format!("d{k}"))).await?;
        }
        expected.push((phone, *conv, last, n));
    }
    let mut last = 0;
    for k in 0..3 {
        last = send(s, &sam, group, &secret(&format!("g{k}"))).await?;
    }
    expected.push((&bea_phone, group, last, 3));
    // In PostgreSQL, so their notifications are queued there.
    for (_, conv, seq, _) in &expected {
        let stored = s
            .wait_stored(*conv, *seq as usize, Duration::from_secs(20))
            .await?;
        ensure!(stored.len() == *seq as usize, "{conv}: {stored:?}");
    }
    // Cal leaves the group while the push about it waits.
    let (status, body) = s
        .call(
            Some(&sam),
            reqwest::Method::DELETE,
            &format!("/api/v1/chat/conversations/{group}/participants"),
            Some(json!({"user_ids": [cal.id]})),
        )
        .await?;
    ensure!(status == 200, "{status} {body}");
    let elapsed = queued_at.elapsed();
    ensure!(
        push.service.all_requests().is_empty()
            && elapsed < Duration::from_millis(RESTART_WINDOW_MS),
        "too slow to kill before the pushes were due ({elapsed:?}): {:?}",
        summary(&push.service.all_requests())
    );
    s.kill_origin_process();
    s.start_origin_process(vars).await?;

    for (d, conv, seq, count) in &expected {
        let p = push.push_for(d, *conv, *seq).await?;
        ensure_private_push(&p, *conv, *seq, *count, &sam, &[])?;
    }
    // A later message in each conversation is pushed after the ones the
    // restart sent, and nothing came in between, nor to Cal.
    let mut later = Vec::new();
    for (d, conv, seq, _) in &expected {
        let next = send(s, &sam, *conv, &secret("after")).await?;
        ensure!(next == seq + 1, "{conv}: seq {next}");
        later.push((*d, *conv, next));
    }
    for (d, conv, seq) in &later {
        push.push_for(d, *conv, *seq).await?;
    }
    for ((d, conv, seq, _), (_, _, next)) in expected.iter().zip(&later) {
        let got = summary(&push.requests(d));
        ensure!(
            got == [(*conv, *seq, 201), (*conv, *next, 201)],
            "{conv}: each notification once, got {got:?}"
        );
    }
    ensure!(
        push.requests(&cal_phone).is_empty(),
        "Cal was pushed after leaving: {:?}",
        summary(&push.requests(&cal_phone))
    );
    push.ensure_clean()
}

/// Whether the origin still has a pending notification for `user` in
/// `conv` (a row in its queue).
async fn job_pending(s: &Stack, user: &User, conv: i64) -> anyhow::Result<bool> {
    let row = s
        .pool
        .get()
        .await?
        .query_one(
            "SELECT count(*) FROM push_jobs WHERE user_id = $1 AND conversation_id = $2",
            &[&user.id, &conv],
        )
        .await?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// Waits until the origin's queue has nothing left for `user` in `conv`:
/// their notification was sent and recorded (or dropped), so nothing more
/// will be sent for it.
async fn job_done(s: &Stack, user: &User, conv: i64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while job_pending(s, user, conv).await? {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{}'s notification about {conv} still queued after {timeout:?}",
            user.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// 8b. The origin killed (SIGKILL) while push requests are in flight:
///    the push service holds two devices' requests open (and has already
///    accepted a third device's, of the same notification) when the
///    process dies. At least once at the HTTP boundary
///    (`origin/src/push/worker.rs`, "Crash safety, honestly"): every
///    notification arrives; those whose jobs were not finished at the kill
///    come again once the dead process's lease ([`LEASE`]) is over, with
///    the same `Topic`, tag and seq (so a device replaces the first with
///    the repeat); and nothing finished before the kill, nor anything
///    after, is sent twice.
pub async fn an_origin_killed_with_push_requests_in_flight_sends_each_at_least_once_and_repeats_replace(
    s: &mut Stack,
) -> anyhow::Result<()> {
    s.start_origin_process(&[]).await?;
    let result = killed_with_pushes_in_flight(s).await;
    // Whatever happened, the rest of the suite gets its usual origin.
    s.kill_origin_process();
    s.start_origin()?;
    result
}

async fn killed_with_pushes_in_flight(s: &mut Stack) -> anyhow::Result<()> {
    let sam = s.user("Sam").await?;
    let push = Push::start(s, &sam).await?;
    // Cyd's notification is sent and finished before the kill.
    let cyd = s.user("Cyd").await?;
    let direct = s.direct(&sam, &cyd).await?;
    let cyd_phone = push.subscribe(s, &cyd).await?;
    let d1 = send(s, &sam, direct, &secret("before")).await?;
    push.push_for(&cyd_phone, direct, d1).await?;
    job_done(s, &cyd, direct, ARRIVAL).await?;

    // A group: one message is one job per member, all due at once, so
    // one round of the worker sends them together.
    let bea = s.user("Bea").await?;
    let cal = s.user("Cal").await?;
    let dee = s.user("Dee").await?;
    let group = s.group(&sam, &[&bea, &cal, &dee]).await?;
    let bea_phone = push.subscribe(s, &bea).await?;
    let bea_laptop = push.subscribe(s, &bea).await?;
    let cal_phone = push.subscribe(s, &cal).await?;
    let dee_phone = push.subscribe(s, &dee).await?;
    push.service.hold(&bea_phone.sub);
    push.service.hold(&cal_phone.sub);
    let seq = send(s, &sam, group, &secret("in flight")).await?;
    // Every device's request has arrived: Bea's phone and Cal's are held
    // open, Bea's laptop and Dee's phone were answered 201.
    let devices: [(&User, &Device); 4] = [
        (&bea, &bea_phone),
        (&bea, &bea_laptop),
        (&cal, &cal_phone),
        (&dee, &dee_phone),
    ];
    for (_, d) in &devices {
        push.service
            .wait_until(&d.sub, ARRIVAL, |r| !r.is_empty())
            .await?;
    }
    let first_held = [&bea_phone, &cal_phone]
        .iter()
        .filter_map(|d| push.requests(d).first().map(|p| p.at))
        .min()
        .context("held requests")?;
    s.kill_origin_process();
    let in_flight_for = first_held.elapsed();
    // The kill must land while the origin still waits for the held
    // answers (its client gives up after SEND_TIMEOUT).
    ensure!(
        in_flight_for < SEND_TIMEOUT,
        "too slow to kill while the requests were in flight ({in_flight_for:?})"
    );
    // The process is dead: the queue is as it left it. A job still there
    // was not finished, and may be sent again.
    let mut unfinished = Vec::new();
    for user in [&bea, &cal, &dee] {
        if job_pending(s, user, group).await? {
            unfinished.push(user.id);
        }
    }
    ensure!(
        unfinished.contains(&bea.id) && unfinished.contains(&cal.id),
        "a job held in flight was finished: {unfinished:?}"
    );
    push.service.release(&bea_phone.sub);
    push.service.release(&cal_phone.sub);
    s.start_origin_process(&[]).await?;

    // The restarted origin finishes every job once the dead process's
    // lease is over; after that, nothing more is sent for it.
    for user in [&bea, &cal, &dee] {
        job_done(s, user, group, LEASE + ARRIVAL).await?;
    }
    let mut repeats = Vec::new();
    for (user, d) in &devices {
        let requests = push.requests(d);
        let got = messages(&requests);
        let may_repeat = unfinished.contains(&user.id);
        ensure!(
            !got.is_empty() && got.len() <= if may_repeat { 2 } else { 1 },
            "{}: {:?}",
            user.name,
            summary(&requests)
        );
        let first = got[0];
        ensure_private_push(first, group, seq, 1, &sam, &[])?;
        for repeat in &got[1..] {
            ensure!(
                repeat.accepted()
                    && repeat.topic == first.topic
                    && repeat.payload["tag"] == first.payload["tag"]
                    && repeat.payload["seq"] == first.payload["seq"]
                    && repeat.payload["conversation_id"] == first.payload["conversation_id"],
                "{}: the repeat would not replace the first: {:?} {} vs {:?} {}",
                user.name,
                repeat.topic,
                repeat.payload,
                first.topic,
                first.payload
            );
            ensure_private_push(repeat, group, seq, 1, &sam, &[])?;
            // Not before the killed process's lease ran out.
            let gap = repeat.at.duration_since(first.at);
            ensure!(
                gap >= LEASE / 2,
                "{}: repeated after {gap:?}, inside the dead process's lease",
                user.name
            );
            repeats.push((user.name.clone(), gap));
        }
    }
    println!("    in flight for {in_flight_for:?} at the kill; unfinished jobs {unfinished:?}");
    println!("    repeats: {repeats:?}");

    // Later messages come after all that, once each, and Cyd's
    // notification from before the kill was never sent again.
    let next = send(s, &sam, group, &secret("after")).await?;
    let d2 = send(s, &sam, direct, &secret("after")).await?;
    for (_, d) in &devices {
        push.push_for(d, group, next).await?;
    }
    push.push_for(&cyd_phone, direct, d2).await?;
    for (user, d) in &devices {
        let got = summary(&push.requests(d));
        let (last, earlier) = got.split_last().context("pushes")?;
        ensure!(
            *last == (group, next, 201) && earlier.iter().all(|p| *p == (group, seq, 201)),
            "{}: {got:?}",
            user.name
        );
    }
    let got = summary(&push.requests(&cyd_phone));
    ensure!(
        got == [(direct, d1, 201), (direct, d2, 201)],
        "Cyd: {got:?}"
    );
    push.ensure_clean()
}
