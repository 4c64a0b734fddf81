//! The Worker: the one public entry. It authenticates before any Durable
//! Object is touched, then routes.
//!
//! | route | goes to |
//! | --- | --- |
//! | `POST /api/v1/chat/ws-ticket` | minted here (60 s ticket for WS/EventSource) |
//! | `GET /api/v1/chat/conversations/{id}/ws` | Room `{id}` (WebSocket) |
//! | `GET /api/v1/chat/conversations/{id}/events` | Room `{id}` (Server-Sent Events) |
//! | `POST /api/v1/chat/conversations/{id}/messages\|typing\|read` | Room `{id}` (the SSE fallback's sends) |
//! | `POST,DELETE /api/v1/chat/conversations/{id}/participants` | origin, then Room `{id}` refreshes its members and the members' User objects send `conversation_changed` (the removed ones `conversation_removed`) |
//! | `PATCH /api/v1/chat/conversations/{id}` | origin (rename), then the members' User objects send `conversation_changed` |
//! | `GET /api/v1/chat/ws`, `GET /api/v1/chat/ws/{token}` | the caller's User object (WebSocket) |
//! | `GET /api/v1/chat/events` | the caller's User object (Server-Sent Events) |
//! | `POST /api/v1/chat/conversations` | origin; a new conversation is announced to its participants' User objects |
//! | `POST /api/v1/internal/rooms/{id}/members-changed` | from the origin (service secret): Room `{id}` refreshes its members |
//! | `POST /api/v1/chat/conversations/{id}/attachments` | streamed into R2 (`media`): reserved at the origin first, committed after, registered with Room `{id}` |
//! | `GET /api/v1/media/{id}/{variant}?exp=&sig=` | served from R2 by signature (`media`) |
//! | `GET,PUT /api/v1/internal/media/{id}/{variant}` | from the origin (service secret): reads an original, stores a processed copy |
//! | `POST /api/v1/internal/rooms/{id}/attachments[/reap]` | from the origin (service secret): Room `{id}` hears a processed attachment / reaps unsent ones |
//! | `GET /api/v1/edge/health` | answered here |
//! | `GET /api/v1/edge/demo` | answered here: the demo logins when the `DEMO_LOGINS` var is set (`cargo xtask dev`), else 404 |
//! | any other `/api/**` | proxied to the origin |

use serde::Serialize;
use shared::auth::{Claims, USER_SCOPE, WS_TICKET_TTL_SECS, conversation_scope};
use shared::protocol::ClientFrame;
use shared::protocol::internal::{ConversationChange, SERVICE_SECRET_HEADER};
use worker::{Env, Headers, Method, Request, RequestInit, Response, Url};

use crate::auth::{self, now_unix};
use crate::config::EdgeConfig;
use crate::conns::refuse_ws;
use crate::error::{EdgeError, EdgeResult};
use crate::headers::{CONVERSATION_HEADER, TICKET_HEADER, USER_HEADER, VALID_UNTIL_HEADER};
use crate::telemetry::REQUEST_ID_HEADER;
use crate::{media, origin};

/// Answers one request; `config` is read once per request by the caller
/// (which also needs it afterwards).
pub async fn handle(req: Request, env: &Env, mut config: EdgeConfig) -> EdgeResult<Response> {
    // One id for the whole request, from the caller or minted here; it
    // goes to every Durable Object and origin call it makes, and back.
    let request_id = crate::telemetry::request_id_from(req.headers().get(REQUEST_ID_HEADER)?);
    config.request_id = Some(request_id.clone());
    // The ChatBox embedded on another page of the platform calls the API
    // cross-origin; allowed origins get CORS, everyone else the browser's
    // default refusal.
    let cors_origin = req
        .headers()
        .get("origin")?
        .filter(|o| config.allowed_origins.iter().any(|a| a == o || a == "*"));
    if req.method() == Method::Options {
        let mut res = Response::empty()?.with_status(204);
        if let Some(origin) = &cors_origin {
            let h = res.headers_mut();
            h.set("access-control-allow-origin", origin)?;
            h.set(
                "access-control-allow-methods",
                "GET, POST, PUT, PATCH, DELETE, OPTIONS",
            )?;
            h.set(
                "access-control-allow-headers",
                "authorization, content-type, last-event-id",
            )?;
            h.set("access-control-max-age", "600")?;
            h.set("vary", "origin")?;
        }
        return Ok(res);
    }
    let method = req.method();
    let path = req.path();
    let res = match route(req, env, &config).await {
        Ok(res) => res,
        Err(e) => {
            crate::telemetry::isolate::error(e.code());
            if e.status() >= 500 {
                crate::log!(Error, "request failed",
                    "method" => format!("{method:?}"),
                    "path" => shared::redact::redact_url(&path),
                    "status" => e.status(),
                    "code" => e.code(),
                    "error" => e.to_string(),
                    "request_id" => request_id);
            } else {
                crate::log!(Debug, "request refused",
                    "method" => format!("{method:?}"),
                    "path" => shared::redact::redact_url(&path),
                    "status" => e.status(),
                    "code" => e.code(),
                    "request_id" => request_id);
            }
            e.to_response()?
        }
    };
    let mut extra = vec![(REQUEST_ID_HEADER, request_id)];
    if let Some(origin) = cors_origin {
        extra.push(("access-control-allow-origin", origin));
        extra.push(("vary", "origin".to_owned()));
    }
    Ok(with_headers(res, &extra))
}

/// `res` with `extra` headers set. A response relayed from the origin or a
/// Durable Object has immutable headers: it gets a copy of them instead
/// (setting them in place would fail, silently losing the CORS header and
/// the request id).
fn with_headers(mut res: Response, extra: &[(&str, String)]) -> Response {
    let in_place = extra
        .iter()
        .all(|(k, v)| res.headers_mut().set(k, v).is_ok());
    if in_place {
        return res;
    }
    let headers = Headers::new();
    for (k, v) in res.headers().entries() {
        let _ = headers.append(&k, &v);
    }
    for (k, v) in extra {
        let _ = headers.set(k, v);
    }
    res.with_headers(headers)
}

async fn route(req: Request, env: &Env, config: &EdgeConfig) -> EdgeResult<Response> {
    let config = config.clone();
    let url = req.url()?;
    let segments: Vec<&str> = url
        .path_segments()
        .map(|s| s.filter(|p| !p.is_empty()).collect())
        .unwrap_or_default();
    let method = req.method();
    match (method, segments.as_slice()) {
        (Method::Get, ["api", "v1", "edge", "health"]) => json(&Health { status: "ok" }),
        (Method::Get, ["api", "v1", "edge", "demo"]) => demo_logins(env),
        (Method::Post, ["api", "v1", "chat", "ws-ticket"]) => ws_ticket(req, &config).await,
        (Method::Post, ["api", "v1", "internal", "rooms", id, "members-changed"]) => {
            require_service(&req, &config)?;
            let id = conversation_id(id)?;
            notify_members_changed(env, id).await?;
            Ok(Response::empty()?.with_status(204))
        }
        (Method::Post, ["api", "v1", "chat", "conversations", id, "attachments"]) => {
            let id = conversation_id(id)?;
            media::upload(req, env, &config, id, &url).await
        }
        (Method::Get, ["api", "v1", "media", id, variant]) => {
            media::download(&req, env, &config, id, variant, &url).await
        }
        (Method::Get, ["api", "v1", "internal", "media", id, variant]) => {
            require_service(&req, &config)?;
            media::internal_get(env, id, variant).await
        }
        (Method::Put, ["api", "v1", "internal", "media", id, variant]) => {
            require_service(&req, &config)?;
            media::internal_put(req, env, id, variant).await
        }
        (Method::Post, ["api", "v1", "internal", "rooms", id, "attachments"]) => {
            require_service(&req, &config)?;
            let id = conversation_id(id)?;
            media::to_room(req, env, id, "/attachment-updated").await
        }
        (Method::Post, ["api", "v1", "internal", "rooms", id, "attachments", "reap"]) => {
            require_service(&req, &config)?;
            let id = conversation_id(id)?;
            media::to_room(req, env, id, "/attachments-reap").await
        }
        (Method::Get, ["api", "v1", "chat", "ws"]) => {
            user_connect(&req, env, &config, &url, None, "/ws").await
        }
        (Method::Get, ["api", "v1", "chat", "ws", token]) => {
            user_connect(&req, env, &config, &url, Some(token), "/ws").await
        }
        (Method::Get, ["api", "v1", "chat", "events"]) => {
            user_connect(&req, env, &config, &url, None, "/events").await
        }
        (Method::Post, ["api", "v1", "chat", "conversations"]) => {
            create_conversation(req, env, &config).await
        }
        (Method::Get, ["api", "v1", "chat", "conversations", id, "ws"]) => {
            let id = conversation_id(id)?;
            room_ws(req, env, &config, &url, id).await
        }
        (Method::Get, ["api", "v1", "chat", "conversations", id, "events"]) => {
            let id = conversation_id(id)?;
            room_events(&req, env, &config, &url, id).await
        }
        (
            Method::Post,
            [
                "api",
                "v1",
                "chat",
                "conversations",
                id,
                action @ ("messages" | "typing" | "read"),
            ],
        ) => {
            let id = conversation_id(id)?;
            room_post(req, env, &config, id, action).await
        }
        (
            method @ (Method::Post | Method::Delete),
            ["api", "v1", "chat", "conversations", id, "participants"],
        ) => {
            let id = conversation_id(id)?;
            let change = if method == Method::Post {
                GroupChange::Add
            } else {
                GroupChange::Remove
            };
            change_group(req, env, &config, id, change).await
        }
        (
            method @ (Method::Patch | Method::Delete),
            [
                "api",
                "v1",
                "chat",
                "conversations",
                id,
                "messages",
                message_id,
            ],
        ) => {
            let id = conversation_id(id)?;
            let message_id = message_uuid(message_id)?;
            let kind = if method == Method::Patch {
                ChangeKind::Edit
            } else {
                ChangeKind::Delete
            };
            change_message(req, env, &config, &url, id, message_id, kind).await
        }
        (
            method @ (Method::Put | Method::Delete),
            [
                "api",
                "v1",
                "chat",
                "conversations",
                id,
                "messages",
                message_id,
                "reactions",
                emoji,
            ],
        ) => {
            let id = conversation_id(id)?;
            let message_id = message_uuid(message_id)?;
            let emoji = percent_decode(emoji)?;
            let kind = ChangeKind::React {
                emoji,
                on: method == Method::Put,
            };
            change_message(req, env, &config, &url, id, message_id, kind).await
        }
        (Method::Patch, ["api", "v1", "chat", "conversations", id]) => {
            let id = conversation_id(id)?;
            change_group(req, env, &config, id, GroupChange::Rename).await
        }
        (_, ["api", ..]) => origin::proxy(req, &config).await,
        _ => Err(EdgeError::NotFound("route")),
    }
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

#[derive(Serialize)]
struct Ticket {
    ticket: String,
    expires_at: i64,
}

fn json<T: Serialize>(value: &T) -> EdgeResult<Response> {
    Ok(Response::from_json(value)?)
}

fn conversation_id(raw: &str) -> EdgeResult<i64> {
    raw.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
        EdgeError::bad_request("invalid_path", "conversation id must be a positive integer")
    })
}

/// `POST /api/v1/chat/ws-ticket` (`{"conversation_id": 7}` for a room,
/// no body for the user's own connection): a 60-second, single-use ticket
/// for opening that one WebSocket or EventSource, so the session token
/// stays out of URLs. Minted at the edge, so reconnects work while the
/// origin is down; membership is checked where the ticket is used.
async fn ws_ticket(mut req: Request, config: &EdgeConfig) -> EdgeResult<Response> {
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        conversation_id: Option<i64>,
    }
    let caller = auth::from_bearer(&req, &config.jwt_secret)?;
    let body = req.bytes().await?;
    if body.len() > shared::domain::MAX_FRAME_BYTES {
        return Err(EdgeError::Room(shared::room::RoomError::FrameTooLarge));
    }
    let scope = if body.iter().all(u8::is_ascii_whitespace) {
        USER_SCOPE.to_owned()
    } else {
        let body: Body = serde_json::from_slice(&body).map_err(|e| {
            EdgeError::bad_request(
                "invalid_json",
                format!("the body is not a ticket request: {e}"),
            )
        })?;
        match body.conversation_id {
            Some(id) => conversation_scope(conversation_id(&id.to_string())?),
            None => USER_SCOPE.to_owned(),
        }
    };
    let now = now_unix();
    let mut claims = Claims::ticket(
        caller.user_id,
        caller.claims.name,
        caller.claims.role,
        caller.claims.sid,
        &scope,
        random_uuid(),
        now,
        WS_TICKET_TTL_SECS,
    );
    claims.session_exp = Some(caller.claims.exp);
    let ticket = shared::auth::issue(&claims, &config.jwt_secret)?;
    json(&Ticket {
        ticket,
        expires_at: claims.exp,
    })
}

/// 426 unless the request asks for a WebSocket upgrade.
fn require_upgrade(req: &Request) -> EdgeResult<()> {
    let upgrade = req.headers().get("upgrade")?.unwrap_or_default();
    if upgrade.eq_ignore_ascii_case("websocket") {
        Ok(())
    } else {
        Err(EdgeError::Client {
            status: 426,
            code: "upgrade_required",
            message: "this route takes a WebSocket upgrade".to_owned(),
        })
    }
}

/// A random (v4) UUID from the platform's CSPRNG.
fn random_uuid() -> uuid::Uuid {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&crate::conns::random_u64().to_le_bytes());
    bytes[8..].copy_from_slice(&crate::conns::random_u64().to_le_bytes());
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// 401 unless the request carries the service secret (the origin calling
/// the edge), compared in constant time.
fn require_service(req: &Request, config: &EdgeConfig) -> EdgeResult<()> {
    let presented = req
        .headers()
        .get(SERVICE_SECRET_HEADER)?
        .unwrap_or_default();
    let expected = config.service_secret.as_bytes();
    let same = presented.len() == expected.len()
        && presented
            .bytes()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(EdgeError::Unauthorized(shared::auth::AuthError::Invalid))
    }
}

/// Headers every request to a Durable Object on behalf of `caller` carries:
/// who they are, until when their credential holds, and the ticket to burn.
fn caller_headers(caller: &auth::Caller, config: &EdgeConfig) -> EdgeResult<Headers> {
    let headers = Headers::new();
    if let Some(id) = &config.request_id {
        headers.set(REQUEST_ID_HEADER, id)?;
    }
    headers.set(USER_HEADER, &caller.user_id.to_string())?;
    headers.set(
        VALID_UNTIL_HEADER,
        &caller.connection_valid_until().to_string(),
    )?;
    if let Some(jti) = caller.ticket_id() {
        headers.set(TICKET_HEADER, &format!("{jti}:{}", caller.claims.exp))?;
    }
    Ok(headers)
}

/// 403 for a browser page whose origin may not open realtime connections
/// (cross-site WebSocket hijacking is otherwise one `new WebSocket` away).
fn require_allowed_origin(req: &Request, config: &EdgeConfig) -> EdgeResult<()> {
    let origin = req.headers().get("origin")?;
    if config.origin_allowed(origin.as_deref()) {
        Ok(())
    } else {
        Err(EdgeError::Forbidden(
            "this Origin may not open realtime connections",
        ))
    }
}

/// `GET /api/v1/chat/conversations/{id}/ws`
async fn room_ws(
    req: Request,
    env: &Env,
    config: &EdgeConfig,
    url: &Url,
    id: i64,
) -> EdgeResult<Response> {
    require_upgrade(&req)?;
    require_allowed_origin(&req, config)?;
    let caller =
        match auth::for_realtime(&req, url, &config.jwt_secret, None, &conversation_scope(id)) {
            Ok(c) => c,
            Err(e) => return refuse_ws(e.code(), &e.to_string()),
        };
    let target = match url.query_pairs().find(|(k, _)| k == "since") {
        Some((_, since)) => format!("https://room/ws?since={since}"),
        None => "https://room/ws".to_owned(),
    };
    let headers = caller_headers(&caller, config)?;
    headers.set("upgrade", "websocket")?;
    headers.set(CONVERSATION_HEADER, &id.to_string())?;
    let mut init = RequestInit::new();
    init.with_method(Method::Get).with_headers(headers);
    let forwarded = Request::new_with_init(&target, &init)?;
    let stub = env.durable_object("ROOM")?.get_by_name(&id.to_string())?;
    Ok(stub.fetch_with_request(forwarded).await?)
}

/// `GET /api/v1/chat/conversations/{id}/events`: the stream is served by
/// the room (a stream held open in the stateless Worker would be cancelled
/// as hung); the Worker only authenticates and passes the response through.
async fn room_events(
    req: &Request,
    env: &Env,
    config: &EdgeConfig,
    url: &Url,
    id: i64,
) -> EdgeResult<Response> {
    require_allowed_origin(req, config)?;
    let caller = auth::for_realtime(req, url, &config.jwt_secret, None, &conversation_scope(id))?;
    // EventSource sends Last-Event-ID on its own reconnects; it is newer
    // than the `since` baked into the URL.
    let since = match req.headers().get("last-event-id")? {
        Some(id) if !id.trim().is_empty() => Some(id.trim().to_owned()),
        _ => url
            .query_pairs()
            .find(|(k, _)| k == "since")
            .map(|(_, v)| v.into_owned()),
    };
    let target = match since {
        Some(since) => {
            let since: i64 = since.parse().map_err(|_| {
                EdgeError::bad_request("invalid_query", "since / Last-Event-ID must be a seq")
            })?;
            format!("https://room/events?since={since}")
        }
        None => "https://room/events".to_owned(),
    };
    forward(env, config, id, &caller, Method::Get, &target, None).await
}

/// `POST /api/v1/chat/conversations/{id}/messages|typing|read`.
async fn room_post(
    mut req: Request,
    env: &Env,
    config: &EdgeConfig,
    id: i64,
    action: &str,
) -> EdgeResult<Response> {
    // The clock moves across I/O, so from here to the Room's answer it
    // sees the whole way: the hop, the Room's work and its durable write.
    let arrived = crate::auth::now_ms();
    let caller = auth::from_bearer(&req, &config.jwt_secret)?;
    let body = req.bytes().await?;
    if body.len() > shared::domain::MAX_FRAME_BYTES {
        return Err(EdgeError::Room(shared::room::RoomError::FrameTooLarge));
    }
    let target = format!("https://room/{action}");
    let res = forward(env, config, id, &caller, Method::Post, &target, Some(body)).await?;
    if action == "messages" && res.status_code() == 201 {
        crate::telemetry::isolate::ack_since(arrived);
    }
    Ok(res)
}

/// Which change an HTTP route asks for.
enum ChangeKind {
    Edit,
    Delete,
    React { emoji: String, on: bool },
}

fn message_uuid(raw: &str) -> EdgeResult<uuid::Uuid> {
    raw.parse()
        .map_err(|_| EdgeError::bad_request("invalid_path", "message id must be a UUID"))
}

/// A path segment's percent-encoding undone (an emoji arrives as
/// `%F0%9F%91%8D`); anything that is not UTF-8 afterwards is refused.
fn percent_decode(raw: &str) -> EdgeResult<String> {
    let bad = || EdgeError::bad_request("invalid_path", "the emoji is not percent-encoded UTF-8");
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// `PATCH`/`DELETE …/messages/{message_id}` and `PUT`/`DELETE
/// …/reactions/{emoji}`: the same change as the `edit`, `delete` and
/// `react` frames, decided by the room. 200 with the event frame, or with
/// an `ack` when nothing changed (or a resend the room no longer holds).
async fn change_message(
    mut req: Request,
    env: &Env,
    config: &EdgeConfig,
    url: &Url,
    id: i64,
    message_id: uuid::Uuid,
    kind: ChangeKind,
) -> EdgeResult<Response> {
    #[derive(serde::Deserialize)]
    struct EditBody {
        content: String,
        #[serde(default)]
        client_msg_id: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        ack: shared::protocol::ServerFrame,
        event: Option<shared::protocol::ServerFrame>,
    }
    let caller = auth::from_bearer(&req, &config.jwt_secret)?;
    let query_key = url
        .query_pairs()
        .find(|(k, _)| k == "client_msg_id")
        .map(|(_, v)| v.into_owned());
    let frame = match kind {
        ChangeKind::Edit => {
            let body = req.bytes().await?;
            if body.len() > shared::domain::MAX_FRAME_BYTES {
                return Err(EdgeError::Room(shared::room::RoomError::FrameTooLarge));
            }
            let body: EditBody = serde_json::from_slice(&body).map_err(|e| {
                EdgeError::bad_request("invalid_json", format!("the body is not an edit: {e}"))
            })?;
            ClientFrame::Edit {
                conversation_id: id,
                message_id,
                content: body.content,
                client_msg_id: body.client_msg_id.or(query_key),
            }
        }
        ChangeKind::Delete => ClientFrame::Delete {
            conversation_id: id,
            message_id,
            client_msg_id: query_key,
        },
        ChangeKind::React { emoji, on } => ClientFrame::React {
            conversation_id: id,
            message_id,
            emoji,
            on,
            client_msg_id: query_key,
        },
    };
    let body = serde_json::to_vec(&frame).map_err(|e| EdgeError::Internal(e.to_string()))?;
    let mut res = forward(
        env,
        config,
        id,
        &caller,
        Method::Post,
        "https://room/change",
        Some(body),
    )
    .await?;
    if res.status_code() != 200 {
        return Ok(res);
    }
    let answer: Answer = res.json().await?;
    json(&answer.event.unwrap_or(answer.ack))
}

/// Sends a request to Room `id` on behalf of an authenticated user.
async fn forward(
    env: &Env,
    config: &EdgeConfig,
    id: i64,
    caller: &auth::Caller,
    method: Method,
    target: &str,
    body: Option<Vec<u8>>,
) -> EdgeResult<Response> {
    let headers = caller_headers(caller, config)?;
    headers.set(CONVERSATION_HEADER, &id.to_string())?;
    let mut init = RequestInit::new();
    init.with_method(method).with_headers(headers);
    if let Some(body) = body {
        init.with_body(Some(
            worker::js_sys::Uint8Array::from(body.as_slice()).into(),
        ));
    }
    let req = Request::new_with_init(target, &init)?;
    let stub = env.durable_object("ROOM")?.get_by_name(&id.to_string())?;
    Ok(stub.fetch_with_request(req).await?)
}

/// The ChatBox's always-on connection: `path` is `/ws` (upgrade) or
/// `/events` (SSE) on the caller's own User object.
async fn user_connect(
    req: &Request,
    env: &Env,
    config: &EdgeConfig,
    url: &Url,
    path_token: Option<&str>,
    path: &str,
) -> EdgeResult<Response> {
    let websocket = path == "/ws";
    if websocket {
        require_upgrade(req)?;
    }
    require_allowed_origin(req, config)?;
    let caller = match auth::for_realtime(req, url, &config.jwt_secret, path_token, USER_SCOPE) {
        Ok(c) => c,
        Err(e) if websocket => return refuse_ws(e.code(), &e.to_string()),
        Err(e) => return Err(e.into()),
    };
    let headers = caller_headers(&caller, config)?;
    if websocket {
        headers.set("upgrade", "websocket")?;
    }
    // An SSE stream's resume point, checked here so a bad one is a 400
    // before any object is touched.
    let query = match url.query_pairs().find(|(k, _)| k == "resume") {
        Some((_, resume)) if !websocket => {
            shared::user::parse_resume(&resume)
                .map_err(|e| EdgeError::bad_request("invalid_query", e))?;
            // Only digits, `:`, `,` and `-` get past the parse.
            format!("?resume={resume}")
        }
        _ => String::new(),
    };
    let mut init = RequestInit::new();
    init.with_method(Method::Get).with_headers(headers);
    let forwarded = Request::new_with_init(&format!("https://user{path}{query}"), &init)?;
    Ok(crate::user_do::stub(env, caller.user_id)?
        .fetch_with_request(forwarded)
        .await?)
}

/// `POST /api/v1/chat/conversations`: created at the origin; a new
/// conversation then appears on its participants' connections at once.
async fn create_conversation(req: Request, env: &Env, config: &EdgeConfig) -> EdgeResult<Response> {
    #[derive(serde::Deserialize)]
    struct Created {
        id: i64,
        last_seq: i64,
        participants: Vec<Participant>,
    }
    #[derive(serde::Deserialize)]
    struct Participant {
        user_id: i64,
    }
    let mut response = origin::proxy(req, config).await?;
    if response.status_code() != 201 {
        return Ok(response);
    }
    let status = response.status_code();
    let body = response.text().await?;
    if let Ok(created) = serde_json::from_str::<Created>(&body) {
        let notice = shared::protocol::internal::ConversationNotice {
            mentions: Vec::new(),
            conversation_id: created.id,
            seq: created.last_seq,
            prev_seq: created.last_seq,
            last_message: None,
            recipients: created
                .participants
                .iter()
                .map(|p| (p.user_id, 0))
                .collect(),
        };
        if let Err(e) = crate::user_do::notify(env, &[notice]).await {
            crate::log!(Warn, "notice of a new conversation failed", "error" => e.to_string());
        }
    }
    let headers = Headers::new();
    headers.set("content-type", "application/json")?;
    Ok(Response::ok(body)?
        .with_status(status)
        .with_headers(headers))
}

/// What a proxied change to a group did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupChange {
    Add,
    Remove,
    Rename,
}

/// `POST|DELETE /api/v1/chat/conversations/{id}/participants` and
/// `PATCH /api/v1/chat/conversations/{id}`: made at the origin; when it
/// succeeds, the room refreshes its members (a removed member's sockets
/// close at once), every member's User object sends
/// `conversation_changed` to all their connections, and every user the
/// DELETE removed gets `conversation_removed`. The origin's answer is
/// relayed as it is; a failure to tell anyone is logged, never the
/// caller's error.
async fn change_group(
    mut req: Request,
    env: &Env,
    config: &EdgeConfig,
    id: i64,
    change: GroupChange,
) -> EdgeResult<Response> {
    #[derive(serde::Deserialize)]
    struct Asked {
        #[serde(default)]
        user_ids: Vec<i64>,
    }
    #[derive(serde::Deserialize)]
    struct View {
        participants: Vec<Participant>,
    }
    #[derive(serde::Deserialize)]
    struct Participant {
        user_id: i64,
    }
    let body = req.bytes().await?;
    let mut response = origin::proxy_with_body(&req, &body, config).await?;
    if !(200..300).contains(&response.status_code()) {
        return Ok(response);
    }
    let members = change != GroupChange::Rename;
    if members {
        // The room must stop trusting its cached member list now.
        if let Err(e) = notify_members_changed(env, id).await {
            crate::log!(Error, "members-changed failed", "conversation" => id, "error" => e.to_string());
        }
    }
    let status = response.status_code();
    let text = response.text().await?;
    match serde_json::from_str::<View>(&text) {
        Ok(view) => {
            let mut told: Vec<(i64, ConversationChange)> = view
                .participants
                .iter()
                .map(|p| {
                    let c = ConversationChange {
                        conversation_id: id,
                        removed: false,
                        members,
                    };
                    (p.user_id, c)
                })
                .collect();
            if change == GroupChange::Remove {
                // The origin accepted the body, so it parses; ids still in
                // the answer were not removed (the DELETE changed nothing
                // for them).
                let asked: Vec<i64> = serde_json::from_slice::<Asked>(&body)
                    .map(|a| a.user_ids)
                    .unwrap_or_default();
                let mut removed: Vec<i64> = asked
                    .into_iter()
                    .filter(|u| !view.participants.iter().any(|p| p.user_id == *u))
                    .collect();
                removed.sort_unstable();
                removed.dedup();
                told.extend(removed.into_iter().map(|u| {
                    let c = ConversationChange {
                        conversation_id: id,
                        removed: true,
                        members,
                    };
                    (u, c)
                }));
            }
            if let Err(e) = crate::user_do::tell_changed(env, &told).await {
                crate::log!(Warn, "conversation changed, telling its members failed", "conversation" => id, "error" => e.to_string());
            }
        }
        Err(e) => {
            crate::log!(Warn, "conversation changed, but its view is not", "conversation" => id, "error" => e.to_string())
        }
    }
    let headers = Headers::new();
    headers.set("content-type", "application/json")?;
    Ok(Response::ok(text)?
        .with_status(status)
        .with_headers(headers))
}

/// `GET /api/v1/edge/demo`: the demo logins the ChatBox may offer, from
/// the `DEMO_LOGINS` var (`{"password":…,"accounts":[…]}`). Only a dev
/// server sets it (`cargo xtask dev`, the end-to-end suites); a deployment
/// answers 404, so no page of it ever shows a password.
fn demo_logins(env: &Env) -> EdgeResult<Response> {
    let raw = env
        .var("DEMO_LOGINS")
        .ok()
        .map(|v| v.to_string())
        .filter(|v| !v.trim().is_empty())
        .ok_or(EdgeError::NotFound("demo logins"))?;
    if !demo_logins_valid(&raw) {
        return Err(EdgeError::Internal(
            "DEMO_LOGINS is not {\"password\": string, \"accounts\": [string]}".to_owned(),
        ));
    }
    let headers = Headers::new();
    headers.set("content-type", "application/json")?;
    headers.set("cache-control", "no-store")?;
    Ok(Response::ok(raw)?.with_headers(headers))
}

/// Whether `raw` is `{"password": string, "accounts": [string, …]}`.
fn demo_logins_valid(raw: &str) -> bool {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(raw) else {
        return false;
    };
    value["password"].is_string()
        && value["accounts"]
            .as_array()
            .is_some_and(|a| a.iter().all(serde_json::Value::is_string))
}

async fn notify_members_changed(env: &Env, id: i64) -> EdgeResult<()> {
    let res = crate::room_do::post(env, id, None, "/members-changed", String::new()).await?;
    match res.status_code() {
        200..=299 => Ok(()),
        status => Err(EdgeError::Internal(format!("room answered {status}"))),
    }
}
