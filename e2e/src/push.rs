//! A local push service: what a browser's push service and the browser
//! behind it do with a Web Push request, on a free 127.0.0.1 port.
//!
//! [`PushService::subscribe`] plays the browser's `pushManager.subscribe`:
//! a fresh P-256 key pair and 16-byte auth secret, and an endpoint
//! `http://127.0.0.1:<port>/push/<id>`. A `POST` to that endpoint is
//! checked as RFC 8030, RFC 8292 (VAPID) and RFC 8291 (message encryption)
//! require, then decrypted with the subscription's private key and auth
//! secret (the crate `web-push-native`), as the browser would:
//!
//! - `Authorization: vapid t=<JWT>, k=<key>`: `k` an uncompressed P-256
//!   point in unpadded base64url; the JWT's header names `ES256`, its
//!   signature (JWS form, r‖s) is valid for `k`; `aud` is exactly this
//!   service's origin (`http://127.0.0.1:<port>`, the port included, as an
//!   origin is serialised); `exp` is in the future and at most 24 hours
//!   ahead; `sub` is a `mailto:` or `https:` contact. A subscription made
//!   with an application server key accepts no other `k` (RFC 8292 §4.2).
//! - `Content-Encoding: aes128gcm`, a `TTL` (non-negative integer), an
//!   `Urgency` if any among the four values, a `Topic` if any of at most 32
//!   base64url characters (RFC 8030 §5).
//! - The body at most 4,096 bytes, its header's key id the sender's
//!   65-byte public key, and it decrypts to JSON (the service worker's
//!   contract).
//!
//! A request that breaks any rule is answered 400 (401 without
//! credentials, 403 with bad ones or another key, as RFC 8292 §4.2
//! suggests) and recorded as a violation; tests assert there are none.
//! A valid one is recorded with its decrypted payload and headers and
//! answered 201, or with what the test programmed for that subscription
//! ([`PushService::set_status`], [`PushService::answer_next`], with a
//! `Retry-After` [`PushService::answer_next_retry_after`]). A subscription
//! can also be *held* ([`PushService::hold`]): its requests are recorded
//! on arrival and answered only once [`PushService::release`] is called,
//! a request in flight for as long as a test needs.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Verifier;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// The most a push service must accept (RFC 8030 §7.2, RFC 8291 §4).
const MAX_BODY: usize = 4096;
/// The longest a VAPID token may be valid for (RFC 8292 §2).
const MAX_VALIDITY_SECS: u64 = 24 * 60 * 60;

/// What the browser hands the application: the endpoint and its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The id in the endpoint's path.
    pub id: String,
    /// `http://127.0.0.1:<port>/push/<id>`.
    pub endpoint: String,
    /// The subscription's public key: an uncompressed P-256 point
    /// (65 bytes), base64url.
    pub p256dh: String,
    /// The 16-byte authentication secret, base64url.
    pub auth: String,
}

impl Subscription {
    /// The body of `POST /api/v1/push/subscriptions`, as
    /// `PushSubscription.toJSON()` gives it.
    pub fn json(&self) -> Value {
        json!({
            "endpoint": self.endpoint,
            "keys": {"p256dh": self.p256dh, "auth": self.auth},
        })
    }
}

/// One valid push request, decrypted.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The subscription it was for.
    pub subscription: String,
    /// The decrypted payload.
    pub payload: Value,
    pub topic: Option<String>,
    pub urgency: Option<String>,
    pub ttl: u64,
    /// The VAPID public key (`k`) that signed it.
    pub vapid_key: String,
    /// The JWT's `sub`.
    pub contact: String,
    /// What the service answered.
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

impl Delivery {
    /// Whether the service accepted it (it reached the "browser").
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A request the service refused as malformed.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The endpoint id the request was addressed to.
    pub subscription: String,
    pub status: u16,
    pub reason: String,
}

/// A `Retry-After` for a programmed answer (RFC 9110 §10.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// `Retry-After: <n>`, delay-seconds.
    Seconds(u64),
    /// `Retry-After: <HTTP-date>`, this long after the answer is sent
    /// (IMF-fixdate: whole seconds, so up to a second less).
    DateIn(Duration),
}

impl RetryAfter {
    /// The header's value, now.
    fn value(self) -> String {
        match self {
            RetryAfter::Seconds(n) => n.to_string(),
            RetryAfter::DateIn(d) => {
                let at = chrono::Utc::now()
                    + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::zero());
                at.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
            }
        }
    }
}

/// Per subscription: the browser's keys and the programmed answers.
struct Entry {
    secret: p256::SecretKey,
    auth: [u8; 16],
    /// `applicationServerKey` the subscription was made with, if any.
    server_key: Option<Vec<u8>>,
    /// Answers for the next requests, in order.
    script: VecDeque<(u16, Option<RetryAfter>)>,
    /// The answer once the script is empty.
    status: u16,
    /// How long to wait before answering.
    delay: Duration,
    /// Requests wait for [`PushService::release`] before being answered.
    held: bool,
}

#[derive(Default)]
struct Inner {
    subscriptions: BTreeMap<String, Entry>,
    /// Every valid request, in arrival order, whatever was answered.
    requests: Vec<Delivery>,
    violations: Vec<Violation>,
}

struct Shared {
    /// `http://127.0.0.1:<port>`: what `aud` must be.
    origin: String,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The running service; stopped on drop.
pub struct PushService {
    shared: Arc<Shared>,
    port: u16,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for PushService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushService")
            .field("origin", &self.shared.origin)
            .finish_non_exhaustive()
    }
}

impl Drop for PushService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PushService {
    /// Binds a free 127.0.0.1 port and serves on the current runtime.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the push service")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            origin: format!("http://127.0.0.1:{port}"),
            inner: Mutex::default(),
        });
        let router = axum::Router::new()
            .route("/push/{id}", post(receive))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self { shared, port, task })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`, the `aud` a VAPID token must carry.
    pub fn origin(&self) -> &str {
        &self.shared.origin
    }

    /// A new subscription that accepts any VAPID key.
    pub fn subscribe(&self) -> Subscription {
        self.subscribe_with(None)
    }

    /// A new subscription restricted to `application_server_key` (the
    /// base64url key from `GET /api/v1/push/vapid-public-key`), as
    /// `pushManager.subscribe({applicationServerKey})` makes one.
    pub fn subscribe_restricted(
        &self,
        application_server_key: &str,
    ) -> anyhow::Result<Subscription> {
        let key = URL_SAFE_NO_PAD
            .decode(application_server_key.trim_end_matches('='))
            .context("application server key: base64url")?;
        p256::PublicKey::from_sec1_bytes(&key).context("application server key: P-256")?;
        Ok(self.subscribe_with(Some(key)))
    }

    fn subscribe_with(&self, server_key: Option<Vec<u8>>) -> Subscription {
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let auth: [u8; 16] = rand::random();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let point = secret.public_key().to_encoded_point(false);
        let subscription = Subscription {
            endpoint: format!("{}/push/{id}", self.shared.origin),
            p256dh: URL_SAFE_NO_PAD.encode(point.as_bytes()),
            auth: URL_SAFE_NO_PAD.encode(auth),
            id: id.clone(),
        };
        self.shared.lock().subscriptions.insert(
            id,
            Entry {
                secret,
                auth,
                server_key,
                script: VecDeque::new(),
                status: 201,
                delay: Duration::ZERO,
                held: false,
            },
        );
        subscription
    }

    /// Every later request to `sub` is answered `status` (e.g. 410 for a
    /// subscription the user revoked; 201 to accept again).
    pub fn set_status(&self, sub: &Subscription, status: u16) {
        if let Some(e) = self.shared.lock().subscriptions.get_mut(&sub.id) {
            e.status = status;
        }
    }

    /// The next requests to `sub` are answered `statuses`, in order
    /// (e.g. `[500, 429]` before the usual answer).
    pub fn answer_next(&self, sub: &Subscription, statuses: &[u16]) {
        if let Some(e) = self.shared.lock().subscriptions.get_mut(&sub.id) {
            e.script.extend(statuses.iter().map(|s| (*s, None)));
        }
    }

    /// The next request to `sub` is answered `status` with `Retry-After`
    /// (e.g. 429 and `RetryAfter::Seconds(3)`), after any answers
    /// programmed before it.
    pub fn answer_next_retry_after(&self, sub: &Subscription, status: u16, after: RetryAfter) {
        if let Some(e) = self.shared.lock().subscriptions.get_mut(&sub.id) {
            e.script.push_back((status, Some(after)));
        }
    }

    /// Requests to `sub` from now on are recorded on arrival (with the
    /// answer they will get) but answered only after [`Self::release`]:
    /// a request held in flight.
    pub fn hold(&self, sub: &Subscription) {
        if let Some(e) = self.shared.lock().subscriptions.get_mut(&sub.id) {
            e.held = true;
        }
    }

    /// Answers the requests [`Self::hold`] kept waiting, and answers the
    /// next ones at once again.
    pub fn release(&self, sub: &Subscription) {
        if let Some(e) = self.shared.lock().subscriptions.get_mut(&sub.id) {
            e.held = false;
        }
    }

    /// Requests to `sub` are answered only after `delay` (a slow service).
    pub fn set_delay(&self, sub: &Subscription, delay: Duration) {
        if let Some(e) = self.shared.lock().subscriptions.get_mut(&sub.id) {
            e.delay = delay;
        }
    }

    /// Every valid request to `sub`, whatever it was answered, in order.
    pub fn requests(&self, sub: &Subscription) -> Vec<Delivery> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|d| d.subscription == sub.id)
            .cloned()
            .collect()
    }

    /// The pushes `sub` received (answered 2xx), in order.
    pub fn deliveries(&self, sub: &Subscription) -> Vec<Delivery> {
        self.requests(sub)
            .into_iter()
            .filter(Delivery::accepted)
            .collect()
    }

    /// Every valid request to any subscription, in order.
    pub fn all_requests(&self) -> Vec<Delivery> {
        self.shared.lock().requests.clone()
    }

    /// Every refused request so far.
    pub fn violations(&self) -> Vec<Violation> {
        self.shared.lock().violations.clone()
    }

    /// Fails if any request broke the protocol.
    pub fn ensure_no_violations(&self) -> anyhow::Result<()> {
        let v = self.violations();
        if !v.is_empty() {
            bail!("the push service saw protocol violations: {v:#?}");
        }
        Ok(())
    }

    /// Waits until `sub` has received at least `n` pushes; returns them.
    pub async fn wait_for(
        &self,
        sub: &Subscription,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Delivery>> {
        self.wait_until(sub, timeout, |d| {
            d.iter().filter(|d| d.accepted()).count() >= n
        })
        .await
        .map(|d| d.into_iter().filter(Delivery::accepted).collect())
        .with_context(|| format!("{n} push(es) to {}", sub.id))
    }

    /// Waits until `pred` holds for the requests to `sub` (all of them,
    /// whatever they were answered); returns them.
    pub async fn wait_until(
        &self,
        sub: &Subscription,
        timeout: Duration,
        pred: impl Fn(&[Delivery]) -> bool,
    ) -> anyhow::Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let requests = self.requests(sub);
            if pred(&requests) {
                return Ok(requests);
            }
            if tokio::time::Instant::now() >= deadline {
                let violations = self.violations();
                bail!(
                    "not within {timeout:?}; requests so far: {:?}; violations: {violations:?}",
                    requests
                        .iter()
                        .map(|d| (d.status, &d.payload))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `POST /push/{id}`.
async fn receive(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, String) {
    let at = Instant::now();
    let checked = {
        let mut inner = shared.lock();
        match inner.subscriptions.get_mut(&id) {
            None => Err((404, format!("no subscription {id}"))),
            Some(entry) => check(&shared.origin, entry, &headers, &body).map(|d| {
                let (status, after) = entry.script.pop_front().unwrap_or((entry.status, None));
                (d, status, after, entry.delay)
            }),
        }
    };
    match checked {
        Ok((mut delivery, status, after, delay)) => {
            delivery.subscription = id.clone();
            delivery.status = status;
            delivery.at = at;
            // Recorded on arrival: a slow answer still delivers, even if
            // the sender gives up waiting for it (as a real service would).
            shared.lock().requests.push(delivery);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            while shared.lock().subscriptions.get(&id).is_some_and(|e| e.held) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut answer = HeaderMap::new();
            if let Some(after) = after {
                if let Ok(value) = after.value().parse() {
                    answer.insert(axum::http::header::RETRY_AFTER, value);
                }
            }
            (code, answer, String::new())
        }
        Err((status, reason)) => {
            shared.lock().violations.push(Violation {
                subscription: id,
                status,
                reason: reason.clone(),
            });
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            (code, HeaderMap::new(), reason)
        }
    }
}

type Refusal = (u16, String);

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, Refusal> {
    match headers.get_all(name).iter().count() {
        0 => Ok(None),
        1 => headers
            .get(name)
            .map(|v| v.to_str().map_err(|_| (400, format!("{name}: not ASCII"))))
            .transpose(),
        n => Err((400, format!("{name} given {n} times"))),
    }
}

/// Every rule of the module's documentation; the decrypted delivery.
fn check(
    origin: &str,
    entry: &Entry,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Delivery, Refusal> {
    let (vapid_key, contact) = check_vapid(origin, entry, header(headers, "authorization")?)?;

    match header(headers, "content-encoding")? {
        Some("aes128gcm") => {}
        other => return Err((400, format!("Content-Encoding {other:?}, not aes128gcm"))),
    }
    let ttl = header(headers, "ttl")?
        .ok_or((400, "no TTL header".to_owned()))?
        .parse::<u64>()
        .map_err(|_| (400, "TTL is not a non-negative integer".to_owned()))?;
    let urgency = header(headers, "urgency")?.map(str::to_owned);
    if let Some(u) = &urgency {
        if !["very-low", "low", "normal", "high"].contains(&u.as_str()) {
            return Err((400, format!("Urgency {u:?}")));
        }
    }
    let topic = header(headers, "topic")?.map(str::to_owned);
    if let Some(t) = &topic {
        let base64url = t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if t.is_empty() || t.len() > 32 || !base64url {
            return Err((400, format!("Topic {t:?}: 1-32 base64url characters")));
        }
    }

    if body.len() > MAX_BODY {
        return Err((413, format!("body of {} bytes", body.len())));
    }
    // RFC 8188 header: salt (16), rs (4), idlen (1), keyid; RFC 8291 §4:
    // the key id is the sender's uncompressed public key.
    if body.len() < 21 || body[20] != 65 {
        return Err((
            400,
            "aes128gcm header: key id is not a 65-byte point".to_owned(),
        ));
    }
    let rs = u32::from_be_bytes([body[16], body[17], body[18], body[19]]) as usize;
    if body.len().saturating_sub(86) > rs {
        return Err((
            400,
            format!("more than one record (rs {rs}, {} bytes)", body.len()),
        ));
    }
    let auth = web_push_native::Auth::from(entry.auth);
    let plain = web_push_native::decrypt(body.to_vec(), &entry.secret, &auth)
        .map_err(|e| (400, format!("does not decrypt: {e}")))?;
    let payload: Value = serde_json::from_slice(&plain).map_err(|e| {
        (
            400,
            format!(
                "payload is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&plain)
            ),
        )
    })?;
    Ok(Delivery {
        subscription: String::new(),
        payload,
        topic,
        urgency,
        ttl,
        vapid_key,
        contact,
        status: 0,
        at: Instant::now(),
    })
}

/// RFC 8292: (k, sub) of a valid `Authorization: vapid t=…, k=…`.
fn check_vapid(
    origin: &str,
    entry: &Entry,
    auth: Option<&str>,
) -> Result<(String, String), Refusal> {
    let auth = auth.ok_or((401, "no Authorization header".to_owned()))?;
    let (scheme, params) = auth
        .split_once(' ')
        .ok_or((401, format!("Authorization {auth:?}")))?;
    if !scheme.eq_ignore_ascii_case("vapid") {
        return Err((401, format!("Authorization scheme {scheme:?}, not vapid")));
    }
    let (mut t, mut k) = (None, None);
    for param in params.split(',') {
        let (name, value) = param
            .trim()
            .split_once('=')
            .ok_or((403, format!("vapid parameter {param:?}")))?;
        let slot = match name.trim().to_ascii_lowercase().as_str() {
            "t" => &mut t,
            "k" => &mut k,
            other => return Err((403, format!("unknown vapid parameter {other:?}"))),
        };
        if slot.replace(value.trim().trim_matches('"')).is_some() {
            return Err((403, format!("vapid parameter {name} twice")));
        }
    }
    let t = t.ok_or((403, "vapid without t".to_owned()))?;
    let k = k.ok_or((403, "vapid without k".to_owned()))?;

    let key = URL_SAFE_NO_PAD
        .decode(k)
        .map_err(|_| (403, format!("k {k:?} is not unpadded base64url")))?;
    if key.len() != 65 || key[0] != 4 {
        return Err((403, "k is not an uncompressed P-256 point".to_owned()));
    }
    let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&key)
        .map_err(|_| (403, "k is not a P-256 point".to_owned()))?;
    if let Some(expected) = &entry.server_key {
        if *expected != key {
            return Err((
                403,
                "k is not the subscription's application server key".to_owned(),
            ));
        }
    }

    let mut parts = t.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((403, "t is not a compact JWS".to_owned()));
    };
    let decode = |part: &str, what: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| (403, format!("JWT {what}: not unpadded base64url")))
    };
    let jose: Value = serde_json::from_slice(&decode(h, "header")?)
        .map_err(|_| (403, "JWT header: not JSON".to_owned()))?;
    if jose["alg"] != "ES256" {
        return Err((403, format!("JWT alg {}, not ES256", jose["alg"])));
    }
    if !jose["typ"].is_null() && jose["typ"] != "JWT" {
        return Err((403, format!("JWT typ {}", jose["typ"])));
    }
    let signature = p256::ecdsa::Signature::from_slice(&decode(s, "signature")?)
        .map_err(|_| (403, "JWT signature: not 64 bytes r‖s".to_owned()))?;
    verifying
        .verify(format!("{h}.{p}").as_bytes(), &signature)
        .map_err(|_| (403, "JWT signature does not verify with k".to_owned()))?;

    let claims: Value = serde_json::from_slice(&decode(p, "claims")?)
        .map_err(|_| (403, "JWT claims: not JSON".to_owned()))?;
    if claims["aud"] != origin {
        return Err((403, format!("aud {}, not {origin:?}", claims["aud"])));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let exp = claims["exp"]
        .as_u64()
        .ok_or((403, format!("exp {}: not a NumericDate", claims["exp"])))?;
    if exp <= now {
        return Err((403, format!("exp {exp} is past (now {now})")));
    }
    if exp > now + MAX_VALIDITY_SECS {
        return Err((
            403,
            format!("exp {exp} is more than 24 h ahead (now {now})"),
        ));
    }
    let contact = claims["sub"]
        .as_str()
        .ok_or((403, "no sub claim".to_owned()))?;
    if !(contact.starts_with("mailto:") || contact.starts_with("https:")) {
        return Err((403, format!("sub {contact:?}: not a mailto: or https: URI")));
    }
    Ok((k.to_owned(), contact.to_owned()))
}

/// A fresh VAPID key pair: (private scalar, public point), both base64url,
/// as `VAPID_PRIVATE_KEY` and `GET /api/v1/push/vapid-public-key` carry
/// them.
pub fn vapid_keys() -> (String, String) {
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let public = secret.public_key().to_encoded_point(false);
    (
        URL_SAFE_NO_PAD.encode(secret.to_bytes()),
        URL_SAFE_NO_PAD.encode(public.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use web_push_native::jwt_simple::prelude::{
        Claims, Duration as JwtDuration, ECDSAP256KeyPairLike, ECDSAP256PublicKeyLike, ES256KeyPair,
    };
    use web_push_native::{Auth, WebPushBuilder};

    fn builder(sub: &Subscription) -> WebPushBuilder {
        let key = URL_SAFE_NO_PAD.decode(&sub.p256dh).unwrap();
        let auth = URL_SAFE_NO_PAD.decode(&sub.auth).unwrap();
        WebPushBuilder::new(
            sub.endpoint.parse().unwrap(),
            p256::PublicKey::from_sec1_bytes(&key).unwrap(),
            Auth::from(<[u8; 16]>::try_from(auth).unwrap()),
        )
    }

    fn vapid_pair() -> (ES256KeyPair, String) {
        let (private, public) = vapid_keys();
        let pair = ES256KeyPair::from_bytes(&URL_SAFE_NO_PAD.decode(private).unwrap()).unwrap();
        (pair, public)
    }

    /// `vapid t=…, k=…` with these claims.
    fn vapid(pair: &ES256KeyPair, aud: &str, valid: JwtDuration, sub: &str) -> String {
        let claims = Claims::create(valid).with_audience(aud).with_subject(sub);
        let token = pair.sign(claims).unwrap();
        let k = URL_SAFE_NO_PAD.encode(pair.public_key().public_key().to_bytes_uncompressed());
        format!("vapid t={token}, k={k}")
    }

    /// Sends `request` (built by web-push-native), its Authorization
    /// replaced by `authorization` if given.
    async fn send(
        request: axum::http::Request<Vec<u8>>,
        authorization: Option<&str>,
        extra: &[(&str, &str)],
    ) -> u16 {
        let (parts, body) = request.into_parts();
        let mut req = reqwest::Client::new().post(parts.uri.to_string());
        for (name, value) in &parts.headers {
            if authorization.is_some() && name == "authorization" {
                continue;
            }
            req = req.header(name.as_str(), value.to_str().unwrap());
        }
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        for (name, value) in extra {
            req = req.header(*name, *value);
        }
        req.body(body).send().await.unwrap().status().as_u16()
    }

    #[tokio::test]
    async fn a_valid_push_is_decrypted_and_recorded_with_its_headers() {
        let service = PushService::start().await.unwrap();
        let sub = service.subscribe();
        let (pair, public) = vapid_pair();
        let request = builder(&sub)
            .build(r#"{"type":"message","count":2}"#)
            .unwrap();
        let auth = vapid(
            &pair,
            service.origin(),
            JwtDuration::from_hours(12),
            "mailto:ops@vibe.test",
        );
        let status = send(
            request,
            Some(&auth),
            &[("topic", "c42"), ("urgency", "normal")],
        )
        .await;
        assert_eq!(status, 201);
        let got = service
            .wait_for(&sub, 1, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got[0].payload, json!({"type": "message", "count": 2}));
        assert_eq!(got[0].topic.as_deref(), Some("c42"));
        assert_eq!(got[0].urgency.as_deref(), Some("normal"));
        assert_eq!(got[0].ttl, 12 * 3600);
        assert_eq!(got[0].vapid_key, public);
        assert_eq!(got[0].contact, "mailto:ops@vibe.test");
        service.ensure_no_violations().unwrap();
    }

    #[tokio::test]
    async fn programmed_answers_come_in_order_then_the_standing_one() {
        let service = PushService::start().await.unwrap();
        let sub = service.subscribe();
        let (pair, _) = vapid_pair();
        let auth = vapid(
            &pair,
            service.origin(),
            JwtDuration::from_hours(1),
            "https://vibe.test",
        );
        service.answer_next(&sub, &[500, 429]);
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(send(builder(&sub).build("{}").unwrap(), Some(&auth), &[]).await);
        }
        service.set_status(&sub, 410);
        statuses.push(send(builder(&sub).build("{}").unwrap(), Some(&auth), &[]).await);
        assert_eq!(statuses, [500, 429, 201, 410]);
        assert_eq!(service.requests(&sub).len(), 4);
        assert_eq!(service.deliveries(&sub).len(), 1);
        service.ensure_no_violations().unwrap();
    }

    #[tokio::test]
    async fn a_retry_after_goes_with_its_answer_and_a_held_request_waits_for_release() {
        let service = PushService::start().await.unwrap();
        let sub = service.subscribe();
        let (pair, _) = vapid_pair();
        let auth = vapid(
            &pair,
            service.origin(),
            JwtDuration::from_hours(1),
            "mailto:a@b.c",
        );
        let raw = |request: axum::http::Request<Vec<u8>>| {
            let (parts, body) = request.into_parts();
            let mut req = reqwest::Client::new().post(parts.uri.to_string());
            for (name, value) in &parts.headers {
                req = req.header(name.as_str(), value.to_str().unwrap());
            }
            req.header("authorization", auth.as_str()).body(body)
        };
        service.answer_next_retry_after(&sub, 429, RetryAfter::Seconds(3));
        service.answer_next_retry_after(&sub, 503, RetryAfter::DateIn(Duration::from_secs(60)));
        let mut answers = Vec::new();
        for _ in 0..3 {
            let res = raw(builder(&sub).build("{}").unwrap())
                .send()
                .await
                .unwrap();
            let after = res
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            answers.push((res.status().as_u16(), after));
        }
        assert_eq!(answers[0], (429, Some("3".to_owned())));
        assert_eq!(answers[1].0, 503);
        let date = answers[1].1.as_deref().expect("a date");
        let at = chrono::DateTime::parse_from_rfc2822(date).expect("an HTTP-date");
        let ahead = at.timestamp() - chrono::Utc::now().timestamp();
        assert!((55..=60).contains(&ahead), "{date}: {ahead} s ahead");
        assert_eq!(answers[2], (201, None));

        // Held: recorded on arrival, answered only once released.
        service.hold(&sub);
        let pending = tokio::spawn(raw(builder(&sub).build("{}").unwrap()).send());
        service
            .wait_until(&sub, Duration::from_secs(5), |r| r.len() == 4)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!pending.is_finished(), "answered while held");
        service.release(&sub);
        let res = pending.await.unwrap().unwrap();
        assert_eq!(res.status().as_u16(), 201);
        service.ensure_no_violations().unwrap();
    }

    #[tokio::test]
    async fn a_bad_signature_a_wrong_aud_or_a_long_exp_is_refused() {
        let service = PushService::start().await.unwrap();
        let sub = service.subscribe();
        let (pair, _) = vapid_pair();
        let (other, _) = vapid_pair();
        let good = vapid(
            &pair,
            service.origin(),
            JwtDuration::from_hours(12),
            "mailto:a@b.c",
        );
        // Signed by another key than the k it names.
        let forged = {
            let theirs = vapid(
                &other,
                service.origin(),
                JwtDuration::from_hours(12),
                "mailto:a@b.c",
            );
            let t = theirs.split(", k=").next().unwrap().to_owned();
            let k = good.split(", k=").nth(1).unwrap();
            format!("{t}, k={k}")
        };
        // The origin without its port is another origin.
        let no_port = vapid(
            &pair,
            "http://127.0.0.1",
            JwtDuration::from_hours(12),
            "mailto:a@b.c",
        );
        let too_long = vapid(
            &pair,
            service.origin(),
            JwtDuration::from_hours(25),
            "mailto:a@b.c",
        );
        let no_contact = vapid(&pair, service.origin(), JwtDuration::from_hours(1), "ops");
        for auth in [&forged, &no_port, &too_long, &no_contact] {
            let status = send(builder(&sub).build("{}").unwrap(), Some(auth), &[]).await;
            assert_eq!(status, 403, "{auth}");
        }
        // web-push-native's own VAPID header leaves the port out of aud.
        let status = send(
            builder(&sub)
                .with_vapid(&pair, "mailto:a@b.c")
                .build("{}")
                .unwrap(),
            None,
            &[],
        )
        .await;
        assert_eq!(status, 403);
        let violations = service.violations();
        assert_eq!(violations.len(), 5, "{violations:?}");
        assert!(violations[0].reason.contains("signature"), "{violations:?}");
        assert!(violations[1].reason.contains("aud"), "{violations:?}");
        assert!(violations[2].reason.contains("24 h"), "{violations:?}");
        assert!(violations[3].reason.contains("sub"), "{violations:?}");
        assert!(violations[4].reason.contains("aud"), "{violations:?}");
        assert!(service.requests(&sub).is_empty());
    }

    #[tokio::test]
    async fn bad_headers_another_key_and_a_foreign_ciphertext_are_refused() {
        let service = PushService::start().await.unwrap();
        let (pair, public) = vapid_pair();
        let (_, other_public) = vapid_pair();
        let sub = service.subscribe_restricted(&public).unwrap();
        let strict = service.subscribe_restricted(&other_public).unwrap();
        let stranger = service.subscribe();
        let auth = vapid(
            &pair,
            service.origin(),
            JwtDuration::from_hours(1),
            "mailto:a@b.c",
        );
        let ok = || builder(&sub).build("{}").unwrap();
        assert_eq!(
            send(ok(), None, &[("authorization", "Bearer x")]).await,
            401
        );
        let mut no_ttl = ok();
        no_ttl.headers_mut().remove("ttl");
        assert_eq!(send(no_ttl, Some(&auth), &[]).await, 400);
        let mut gcm = ok();
        gcm.headers_mut()
            .insert("content-encoding", "aesgcm".parse().unwrap());
        assert_eq!(send(gcm, Some(&auth), &[]).await, 400);
        assert_eq!(send(ok(), Some(&auth), &[("urgency", "urgent")]).await, 400);
        assert_eq!(
            send(ok(), Some(&auth), &[("topic", "conversation:42")]).await,
            400
        );
        // Encrypted for another subscription's keys.
        let mut foreign = builder(&stranger).build("{}").unwrap();
        *foreign.uri_mut() = sub.endpoint.parse().unwrap();
        assert_eq!(send(foreign, Some(&auth), &[]).await, 400);
        // Not JSON.
        assert_eq!(
            send(builder(&sub).build("hi").unwrap(), Some(&auth), &[]).await,
            400
        );
        // A subscription made for another application server key.
        let to_strict = builder(&strict).build("{}").unwrap();
        assert_eq!(send(to_strict, Some(&auth), &[]).await, 403);
        assert_eq!(service.violations().len(), 8, "{:?}", service.violations());
        assert!(service.all_requests().is_empty());
        // And the same request, well formed, is accepted.
        assert_eq!(send(ok(), Some(&auth), &[]).await, 201);
        assert_eq!(service.deliveries(&sub).len(), 1);
    }
}
