//! One Web Push request: the payload encrypted for a subscription
//! (RFC 8291, `aes128gcm` of RFC 8188), signed for by VAPID (RFC 8292),
//! sent with `TTL`, `Urgency` and `Topic` (RFC 8030), and what the push
//! service's answer means.
//!
//! The encryption is the crate `web-push-native` (RustCrypto underneath),
//! checked here against RFC 8291's worked example. The VAPID JWT is signed
//! here with its `jwt-simple` rather than through its `with_vapid`, whose
//! `aud` leaves out the endpoint's port: RFC 8292 §2 wants the push
//! resource's *origin*, and an origin with a non-default port includes it
//! (`http://127.0.0.1:9000`).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use reqwest::{StatusCode, Url, header};
use web_push_native::jwt_simple::prelude::{Claims, ECDSAP256KeyPairLike as _, ES256KeyPair};

use crate::config::VapidKey;

/// How long a VAPID token is valid: RFC 8292 allows at most 24 hours.
pub const VAPID_VALIDITY: Duration = Duration::from_secs(12 * 3600);
/// Longest a push service may take to answer one request.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest plaintext that fits one 4,096-byte `aes128gcm` record for a
/// push service (RFC 8291 §4): 4,096 − 86 (header with a 65-byte key id)
/// − 16 (tag) − 1 (padding delimiter).
pub const MAX_PLAINTEXT: usize = 3993;

/// The application server's identity towards push services.
pub struct Vapid {
    key: ES256KeyPair,
    /// The uncompressed public point, base64url: what browsers subscribe
    /// with (`applicationServerKey`) and the `k` of every request.
    public_key: String,
    subject: String,
}

// The key pair must never reach a log line.
impl std::fmt::Debug for Vapid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vapid")
            .field("public_key", &self.public_key)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl Vapid {
    pub fn new(key: &VapidKey, subject: &str) -> anyhow::Result<Self> {
        let secret = p256::SecretKey::from_slice(key.bytes())
            .map_err(|_| anyhow::anyhow!("VAPID_PRIVATE_KEY is not a P-256 private key"))?;
        let point = secret.public_key().to_encoded_point(false);
        let key = ES256KeyPair::from_bytes(key.bytes())
            .map_err(|_| anyhow::anyhow!("VAPID_PRIVATE_KEY is not a P-256 private key"))?;
        Ok(Self {
            key,
            public_key: URL_SAFE_NO_PAD.encode(point.as_bytes()),
            subject: subject.to_owned(),
        })
    }

    /// The public key, base64url of the 65-byte uncompressed point.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// `Authorization: vapid t=<JWT>, k=<public key>` for a push resource
    /// whose origin is `audience` (`scheme://host[:port]`).
    pub fn authorization(&self, audience: &str) -> anyhow::Result<String> {
        let claims = Claims::create(VAPID_VALIDITY.into())
            .with_audience(audience)
            .with_subject(&self.subject);
        let token = self
            .key
            .sign(claims)
            .map_err(|e| anyhow::anyhow!("sign the VAPID token: {e}"))?;
        Ok(format!("vapid t={token}, k={}", self.public_key))
    }
}

/// A subscription's keys, checked.
#[derive(Debug, Clone)]
pub struct Keys {
    pub p256dh: p256::PublicKey,
    pub auth: web_push_native::Auth,
}

impl Keys {
    /// The keys from their stored bytes: a 65-byte uncompressed P-256
    /// point and a 16-byte secret.
    pub fn from_bytes(p256dh: &[u8], auth: &[u8]) -> Result<Self, &'static str> {
        if p256dh.len() != 65 || p256dh[0] != 0x04 {
            return Err("p256dh must be an uncompressed P-256 point (65 bytes)");
        }
        let p256dh =
            p256::PublicKey::from_sec1_bytes(p256dh).map_err(|_| "p256dh is not a P-256 point")?;
        let auth: [u8; 16] = auth.try_into().map_err(|_| "auth must be 16 bytes")?;
        Ok(Self {
            p256dh,
            auth: web_push_native::Auth::from(auth),
        })
    }
}

/// Encrypts `plaintext` for `keys` (RFC 8291): one `aes128gcm` record with
/// a fresh sender key and salt.
pub fn encrypt(plaintext: &[u8], keys: &Keys) -> anyhow::Result<Vec<u8>> {
    web_push_native::encrypt(plaintext.to_vec(), &keys.p256dh, &keys.auth)
        .map_err(|e| anyhow::anyhow!("encrypt the push payload: {e}"))
}

/// How urgent a push is (RFC 8030 §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    Low,
    Normal,
}

impl Urgency {
    pub fn as_str(self) -> &'static str {
        match self {
            Urgency::Low => "low",
            Urgency::Normal => "normal",
        }
    }
}

/// What a push service's answer means for the subscription and the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: accepted.
    Delivered,
    /// 404 or 410: the subscription is gone; delete it.
    Gone,
    /// 429, 5xx, a timeout or a network error: try again later (after at
    /// least the `Retry-After` given, if any).
    Retry { after: Option<Duration> },
    /// Any other answer (400, 401, 403, 413, a redirect...): this request
    /// will never succeed as it is; skip the subscription for this job.
    Refused { status: u16 },
}

impl Outcome {
    /// The answer's meaning.
    pub fn of(status: StatusCode, retry_after: Option<Duration>) -> Self {
        match status.as_u16() {
            200..=299 => Outcome::Delivered,
            404 | 410 => Outcome::Gone,
            429 | 500..=599 => Outcome::Retry { after: retry_after },
            other => Outcome::Refused { status: other },
        }
    }

    /// A label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Gone => "gone",
            Outcome::Retry { .. } => "retry",
            Outcome::Refused { .. } => "refused",
        }
    }
}

/// `Retry-After` as a delay: seconds, or an HTTP date.
pub fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let secs = (at.timestamp() - chrono::Utc::now().timestamp()).max(0);
    Some(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

/// One push to send.
#[derive(Debug, Clone, Copy)]
pub struct PushRequest<'a> {
    /// The JSON payload, before encryption.
    pub payload: &'a [u8],
    pub ttl: Duration,
    pub urgency: Urgency,
    /// At most 32 base64url characters: a later push with the same topic
    /// replaces this one while it is undelivered.
    pub topic: &'a str,
}

/// The client for push services: bounded in time, no redirects (a
/// redirect could lead anywhere, past the endpoint rule).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(SEND_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}

/// Encrypts and sends `request` to `endpoint`. Never logs the endpoint
/// (its path identifies the browser), the keys or the payload.
pub async fn send(
    client: &reqwest::Client,
    vapid: &Vapid,
    endpoint: &Url,
    keys: &Keys,
    request: PushRequest<'_>,
) -> Outcome {
    let body = match encrypt(request.payload, keys) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(error = %crate::error::Chain(e.as_ref()), "push payload not encrypted");
            return Outcome::Refused { status: 0 };
        }
    };
    let authorization = match vapid.authorization(&endpoint.origin().ascii_serialization()) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %crate::error::Chain(e.as_ref()), "VAPID token not signed");
            return Outcome::Refused { status: 0 };
        }
    };
    let sent = client
        .post(endpoint.clone())
        .header(header::AUTHORIZATION, authorization)
        .header(header::CONTENT_ENCODING, "aes128gcm")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("TTL", request.ttl.as_secs().to_string())
        .header("Urgency", request.urgency.as_str())
        .header("Topic", request.topic)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(response) => {
            let after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(retry_after);
            Outcome::of(response.status(), after)
        }
        Err(e) => {
            // Without the URL: it names the subscription.
            tracing::debug!(error = %crate::error::Chain(&e.without_url()), "push request failed");
            Outcome::Retry { after: None }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(text: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(text).expect("base64url")
    }

    /// RFC 8291 Appendix A, copied from the RFC.
    mod rfc8291 {
        pub const PLAINTEXT: &str = "V2hlbiBJIGdyb3cgdXAsIEkgd2FudCB0byBiZSBhIHdhdGVybWVsb24";
        pub const AS_PUBLIC: &str = "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8";
        pub const UA_PRIVATE: &str = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94";
        pub const UA_PUBLIC: &str = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
        pub const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";
        pub const SALT: &str = "DGv6ra1nlYgDCS1FRnbzlw";
        pub const BODY: &str = "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN";
    }

    #[test]
    fn the_rfc_8291_example_decrypts_to_its_plaintext_byte_for_byte() {
        let body = b64(rfc8291::BODY);
        // The message is laid out as the RFC says: salt, rs = 4096, the
        // sender's public key as key id.
        assert_eq!(&body[..16], b64(rfc8291::SALT).as_slice());
        assert_eq!(&body[16..20], &4096u32.to_be_bytes());
        assert_eq!(body[20], 65);
        assert_eq!(&body[21..86], b64(rfc8291::AS_PUBLIC).as_slice());

        let ua_private = p256::SecretKey::from_slice(&b64(rfc8291::UA_PRIVATE)).expect("key");
        assert_eq!(
            ua_private.public_key().to_encoded_point(false).as_bytes(),
            b64(rfc8291::UA_PUBLIC).as_slice()
        );
        let auth: [u8; 16] = b64(rfc8291::AUTH).try_into().expect("16 bytes");
        let auth = web_push_native::Auth::from(auth);
        let plaintext = web_push_native::decrypt(body, &ua_private, &auth).expect("decrypt");
        assert_eq!(plaintext, b64(rfc8291::PLAINTEXT));
        assert_eq!(plaintext, b"When I grow up, I want to be a watermelon");
    }

    #[test]
    fn what_we_encrypt_the_subscriber_decrypts() {
        let ua_private = p256::SecretKey::from_slice(&b64(rfc8291::UA_PRIVATE)).expect("key");
        let keys = Keys::from_bytes(&b64(rfc8291::UA_PUBLIC), &b64(rfc8291::AUTH)).expect("keys");
        let payload = br#"{"type":"message","conversation_id":7,"title":"Sam Patel"}"#;
        let body = encrypt(payload, &keys).expect("encrypt");
        // One record; a fresh sender key each time.
        assert_eq!(body.len(), 86 + payload.len() + 1 + 16);
        assert_ne!(&body[21..86], b64(rfc8291::AS_PUBLIC).as_slice());
        assert_ne!(encrypt(payload, &keys).expect("again"), body);
        let plain = web_push_native::decrypt(body, &ua_private, &keys.auth).expect("decrypt");
        assert_eq!(plain, payload);

        // The largest payload allowed still fits a 4,096-byte record.
        let big = vec![b'x'; MAX_PLAINTEXT];
        assert_eq!(encrypt(&big, &keys).expect("big").len(), 4096);
    }

    #[test]
    fn keys_must_be_a_p256_point_and_16_bytes() {
        let point = b64(rfc8291::UA_PUBLIC);
        let auth = b64(rfc8291::AUTH);
        assert!(Keys::from_bytes(&point, &auth).is_ok());
        assert!(Keys::from_bytes(&point[..64], &auth).is_err());
        assert!(Keys::from_bytes(&point, &auth[..15]).is_err());
        let mut off_curve = point.clone();
        off_curve[64] ^= 1;
        assert!(Keys::from_bytes(&off_curve, &auth).is_err());
        let mut compressed = point;
        compressed[0] = 0x02;
        assert!(Keys::from_bytes(&compressed, &auth).is_err());
    }

    #[test]
    fn the_vapid_header_carries_a_token_for_the_origin_with_its_port() {
        let key =
            VapidKey::from_base64url("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw").expect("key");
        let vapid = Vapid::new(&key, "mailto:ops@vibe.fit").expect("vapid");
        // The public key of RFC 8291's application server key.
        assert_eq!(vapid.public_key(), rfc8291::AS_PUBLIC);
        let header = vapid
            .authorization("http://127.0.0.1:9000")
            .expect("header");
        let (t, k) = header
            .strip_prefix("vapid t=")
            .and_then(|rest| rest.split_once(", k="))
            .expect("shape");
        assert_eq!(k, rfc8291::AS_PUBLIC);
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let head: serde_json::Value = serde_json::from_slice(&b64(parts[0])).expect("header");
        assert_eq!(head["alg"], "ES256");
        let claims: serde_json::Value = serde_json::from_slice(&b64(parts[1])).expect("claims");
        assert_eq!(claims["aud"], "http://127.0.0.1:9000");
        assert_eq!(claims["sub"], "mailto:ops@vibe.fit");
        let exp = claims["exp"].as_i64().expect("exp");
        let ahead = exp - chrono::Utc::now().timestamp();
        assert!(
            (12 * 3600 - 60..=12 * 3600 + 60).contains(&ahead),
            "{ahead}"
        );
        // The signature is r‖s (64 bytes) and verifies with k.
        let signature = b64(parts[2]);
        assert_eq!(signature.len(), 64);
        use p256::ecdsa::signature::Verifier as _;
        let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&b64(k)).expect("k");
        let signature = p256::ecdsa::Signature::from_slice(&signature).expect("signature");
        verifying
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .expect("verifies");
    }

    #[test]
    fn answers_map_to_outcomes() {
        let s = |n| StatusCode::from_u16(n).expect("status");
        assert_eq!(Outcome::of(s(201), None), Outcome::Delivered);
        assert_eq!(Outcome::of(s(404), None), Outcome::Gone);
        assert_eq!(Outcome::of(s(410), None), Outcome::Gone);
        let after = Some(Duration::from_secs(7));
        assert_eq!(Outcome::of(s(429), after), Outcome::Retry { after });
        assert_eq!(Outcome::of(s(503), None), Outcome::Retry { after: None });
        assert_eq!(Outcome::of(s(400), None), Outcome::Refused { status: 400 });
        assert_eq!(Outcome::of(s(413), None), Outcome::Refused { status: 413 });
        assert_eq!(Outcome::of(s(301), None), Outcome::Refused { status: 301 });
        assert_eq!(retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon"), None);
    }
}
