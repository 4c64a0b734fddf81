//! Starts a real origin on a free port against its own fresh PostgreSQL
//! database, and talks to it over HTTP.

use std::sync::OnceLock;

use origin::{Application, Config};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::Role;
use shared::auth::{AUDIENCE_API, Claims};
use tokio_postgres::NoTls;

pub const JWT_SECRET: &str = "test-jwt-secret-test-jwt-secret-0001";
pub const SERVICE_SECRET: &str = "test-service-secret-test-service-0001";
pub const PASSWORD: &str = "correct horse battery staple";

/// The server every test database is created on.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `admin_url` with its database swapped for `db`.
pub fn url_for(db: &str) -> String {
    origin::db::url_with_database(&admin_url(), db)
}

/// Creates an empty database with a unique name.
pub async fn fresh_database() -> String {
    let name = format!("vibe_test_{}", uuid::Uuid::now_v7().simple());
    let (client, conn) = tokio_postgres::connect(&admin_url(), NoTls)
        .await
        .expect("connect to the test PostgreSQL (set DATABASE_URL)");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    name
}

/// A VAPID private key (base64url P-256 scalar) for the test apps, made
/// once per run: every test app has push on unless a test turns it off
/// (`VAPID_PRIVATE_KEY` set to "").
pub fn vapid_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| {
        loop {
            let mut bytes = [0u8; 32];
            getrandom::getrandom(&mut bytes).expect("random");
            // Almost every 32 bytes are a scalar below the curve order.
            if p256::SecretKey::from_slice(&bytes).is_ok() {
                break base64url(&bytes);
            }
        }
    })
}

pub fn config_for(db: &str) -> Config {
    config_with(db, &[])
}

/// The test configuration with `overrides` (variable, value) on top.
pub fn config_with(db: &str, overrides: &[(&str, &str)]) -> Config {
    let url = url_for(db);
    let overrides: Vec<(String, String)> = overrides
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::from_lookup(move |k| {
        if let Some((_, v)) = overrides.iter().find(|(var, _)| var == k) {
            return Some(v.clone());
        }
        match k {
            "DATABASE_URL" => Some(url.clone()),
            "BIND_ADDR" => Some("127.0.0.1:0".to_owned()),
            "JWT_SECRET" => Some(JWT_SECRET.to_owned()),
            "ORIGIN_SERVICE_SECRET" => Some(SERVICE_SECRET.to_owned()),
            "DB_POOL_SIZE" => Some("8".to_owned()),
            "VAPID_PRIVATE_KEY" => Some(vapid_key().to_owned()),
            _ => None,
        }
    })
    .expect("test config")
}

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    #[allow(dead_code)]
    pub db_name: String,
    pub pool: deadpool_postgres::Pool,
    /// The running app's shared state (its hasher, login guard…).
    #[allow(dead_code)]
    pub state: origin::state::AppState,
}

/// A started origin on a fresh database.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// A started origin on a fresh database, with configuration `overrides`.
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    let db_name = fresh_database().await;
    start_app(config_with(&db_name, overrides), db_name).await
}

/// Starts an origin with `config` on database `db_name` (made already).
pub async fn start_app(config: Config, db_name: String) -> TestApp {
    let app = Application::build(config).await.expect("build app");
    let base = format!("http://127.0.0.1:{}", app.port());
    let state = app.state().clone();
    let pool = state.pool.clone();
    tokio::spawn(app.run(std::future::pending()));
    TestApp {
        base,
        http: reqwest::Client::new(),
        db_name,
        pool,
        state,
    }
}

/// One Argon2 hash of [`PASSWORD`], shared by every test user (hashing is
/// deliberately slow).
fn password_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| origin::auth::hash_password(PASSWORD).expect("hash"))
}

#[derive(Debug, Clone)]
#[allow(dead_code)]
pub struct TestUser {
    pub id: i64,
    pub email: String,
    pub name: String,
    pub role: Role,
    pub token: String,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Inserts a user directly and mints a session token for them.
    pub async fn user(&self, name: &str, role: Role) -> TestUser {
        let email = format!("{}@test.vibe", name.to_lowercase().replace(' ', "."));
        let client = self.pool.get().await.expect("db");
        let row = client
            .query_one(
                "INSERT INTO users (email, full_name, role, password_hash)
                 VALUES ($1, $2, $3, $4) RETURNING id",
                &[&email, &name, &role.as_str(), &password_hash()],
            )
            .await
            .expect("insert user");
        let id: i64 = row.get(0);
        let now = chrono::Utc::now().timestamp();
        let token = shared::auth::issue(
            &Claims::new(id, name, role, AUDIENCE_API, now, 3600),
            JWT_SECRET.as_bytes(),
        )
        .expect("token");
        TestUser {
            id,
            email,
            name: name.to_owned(),
            role,
            token,
        }
    }

    pub async fn get(&self, user: &TestUser, path: &str) -> (StatusCode, Value) {
        let res = self
            .http
            .get(self.url(path))
            .bearer_auth(&user.token)
            .send()
            .await
            .expect("request");
        status_and_json(res).await
    }

    pub async fn post(&self, user: &TestUser, path: &str, body: Value) -> (StatusCode, Value) {
        self.with_body(reqwest::Method::POST, user, path, body)
            .await
    }

    pub async fn delete(&self, user: &TestUser, path: &str, body: Value) -> (StatusCode, Value) {
        self.with_body(reqwest::Method::DELETE, user, path, body)
            .await
    }

    pub async fn put(&self, user: &TestUser, path: &str, body: Value) -> (StatusCode, Value) {
        self.with_body(reqwest::Method::PUT, user, path, body).await
    }

    pub async fn patch(&self, user: &TestUser, path: &str, body: Value) -> (StatusCode, Value) {
        self.with_body(reqwest::Method::PATCH, user, path, body)
            .await
    }

    /// A request with a JSON body and `user`'s token.
    async fn with_body(
        &self,
        method: reqwest::Method,
        user: &TestUser,
        path: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        let res = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&user.token)
            .json(&body)
            .send()
            .await
            .expect("request");
        status_and_json(res).await
    }

    /// POST to an internal route with the service secret.
    pub async fn internal_post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let res = self
            .http
            .post(self.url(path))
            .header(
                shared::protocol::internal::SERVICE_SECRET_HEADER,
                SERVICE_SECRET,
            )
            .json(body)
            .send()
            .await
            .expect("request");
        status_and_json(res).await
    }

    /// DELETE on an internal route with the service secret.
    #[allow(dead_code)]
    pub async fn internal_delete(&self, path: &str) -> (StatusCode, Value) {
        let res = self
            .http
            .delete(self.url(path))
            .header(
                shared::protocol::internal::SERVICE_SECRET_HEADER,
                SERVICE_SECRET,
            )
            .send()
            .await
            .expect("request");
        status_and_json(res).await
    }

    pub async fn internal_get(&self, path: &str) -> (StatusCode, Value) {
        let res = self
            .http
            .get(self.url(path))
            .header(
                shared::protocol::internal::SERVICE_SECRET_HEADER,
                SERVICE_SECRET,
            )
            .send()
            .await
            .expect("request");
        status_and_json(res).await
    }

    /// Creates a direct conversation between `a` and `b`; returns its id.
    pub async fn direct(&self, a: &TestUser, b: &TestUser) -> i64 {
        let (status, body) = self
            .post(
                a,
                "/api/v1/chat/conversations",
                json!({"type": "direct", "participant_id": b.id}),
            )
            .await;
        assert!(status.is_success(), "{status} {body}");
        body["id"].as_i64().expect("id")
    }

    /// Creates a group owned by `owner` with `members`; returns its id.
    pub async fn group(&self, owner: &TestUser, name: &str, members: &[&TestUser]) -> i64 {
        let ids: Vec<i64> = members.iter().map(|m| m.id).collect();
        let (status, body) = self
            .post(
                owner,
                "/api/v1/chat/conversations",
                json!({"type": "group", "name": name, "participant_ids": ids}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_i64().expect("id")
    }

    /// Ingests `n` messages from `sender` into `conversation`, seq
    /// `first..first+n`, through the internal API as the edge would.
    pub async fn ingest(&self, conversation: i64, sender: &TestUser, first: i64, n: i64) -> Value {
        let messages: Vec<Value> = (first..first + n)
            .map(|seq| message(conversation, sender.id, seq))
            .collect();
        let (status, body) = self
            .internal_post(
                "/internal/v1/messages/batch",
                &json!({ "messages": messages }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// `POST /api/v1/auth/login`.
    pub async fn login(&self, email: &str, password: &str) -> (StatusCode, Value) {
        let res = self
            .http
            .post(self.url("/api/v1/auth/login"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .expect("request");
        status_and_json(res).await
    }

    /// Logs `user` in with [`PASSWORD`]; the login response.
    pub async fn session(&self, user: &TestUser) -> Value {
        let (status, body) = self.login(&user.email, PASSWORD).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// `POST /api/v1/auth/refresh`.
    pub async fn refresh(&self, refresh_token: &str) -> (StatusCode, Value) {
        let res = self
            .http
            .post(self.url("/api/v1/auth/refresh"))
            .json(&json!({ "refresh_token": refresh_token }))
            .send()
            .await
            .expect("request");
        status_and_json(res).await
    }

    /// POST with a raw bearer token and an optional JSON body.
    pub async fn post_as(
        &self,
        token: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.post(self.url(path)).bearer_auth(token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        status_and_json(req.send().await.expect("request")).await
    }

    /// GET with a raw bearer token.
    pub async fn get_as(&self, token: &str, path: &str) -> (StatusCode, Value) {
        let res = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        status_and_json(res).await
    }

    pub async fn count(&self, sql: &str) -> i64 {
        let client = self.pool.get().await.expect("db");
        client.query_one(sql, &[]).await.expect("count").get(0)
    }
}

/// A message as the edge would send it, with an id derived from its place.
pub fn message(conversation: i64, sender: i64, seq: i64) -> Value {
    json!({
        "id": message_id(conversation, seq),
        "conversation_id": conversation,
        "seq": seq,
        "sender_id": sender,
        "content": format!("message {seq}"),
        "created_at": chrono::Utc::now(),
        "client_msg_id": format!("c-{conversation}-{seq}"),
    })
}

/// A deterministic UUID for (conversation, seq), so replays carry the same id.
pub fn message_id(conversation: i64, seq: i64) -> uuid::Uuid {
    uuid::Uuid::from_u64_pair(conversation as u64, seq as u64)
}

pub async fn status_and_json(res: reqwest::Response) -> (StatusCode, Value) {
    let status = res.status();
    let text = res.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, body)
}

/// Asserts an error response: the status and a `{code, message}` body.
pub fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// A token with any header and payload, HMAC-signed with the real secret
/// (SHA-256, or SHA-512 when `sha512`): the strongest forgery short of
/// stealing a token.
pub fn forge_with(header: &Value, payload: &Value, sha512: bool) -> String {
    let message = format!(
        "{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(payload.to_string().as_bytes())
    );
    let alg = if sha512 {
        jsonwebtoken::Algorithm::HS512
    } else {
        jsonwebtoken::Algorithm::HS256
    };
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        alg,
    )
    .expect("sign");
    format!("{message}.{signature}")
}

/// [`forge_with`] HMAC-SHA256.
pub fn forge(header: &Value, payload: &Value) -> String {
    forge_with(header, payload, false)
}

/// Unpadded base64url.
pub fn base64url(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}
