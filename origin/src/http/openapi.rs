//! The OpenAPI document: the origin's routes as `utoipa` generates them,
//! completed with the answers every route can give, plus the edge's own
//! routes.
//!
//! Statuses that come from the extractors and the middleware, not from a
//! handler's body, are added here from what the operation takes, so a route
//! cannot forget them:
//!
//! | the operation… | can answer |
//! | --- | --- |
//! | takes a JSON body | 400 `invalid_json`/`bad_request`, 413 `too_large` (64 KiB), 415 `unsupported_media_type`, 422 `invalid_field` |
//! | has a path parameter | 400 `invalid_path` |
//! | has query parameters | 422 `invalid_query` |
//! | needs a bearer token | 401 |
//! | anything | 500 `internal`, 503 `unavailable` with `Retry-After` (database away, or the request timeout) |
//!
//! The edge's routes (WebSocket, SSE, POST fallback, tickets, health, the
//! dev server's demo logins) are answered by the edge, never by the origin;
//! they are described here so the one document the public host serves
//! (`GET /api/openapi.json`, proxied to the origin) covers the whole API.

use serde_json::{Map, Value, json};

/// The complete document.
pub fn document() -> Value {
    let (_, doc) = super::public_api();
    let mut doc = serde_json::to_value(doc).unwrap_or_else(|_| json!({}));
    add_common_responses(&mut doc);
    add_path_id_minimums(&mut doc);
    add_user_id_item_minimums(&mut doc);
    add_edge_routes(&mut doc);
    doc
}

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

fn with_retry_after(mut response: Value, what: &str) -> Value {
    response["headers"] = json!({
        "Retry-After": {"description": what, "schema": {"type": "integer", "minimum": 1}}
    });
    response
}

/// Adds `status` to `responses` unless the handler documented it itself.
fn add(responses: &mut Map<String, Value>, status: &str, response: Value) {
    responses.entry(status.to_owned()).or_insert(response);
}

fn add_common_responses(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for item in paths.values_mut() {
        for method in METHODS {
            let Some(op) = item.get_mut(method) else {
                continue;
            };
            let has_body = op.get("requestBody").is_some();
            let params = op
                .get("parameters")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let in_path = params.iter().any(|p| p["in"] == "path");
            let in_query = params.iter().any(|p| p["in"] == "query");
            let bearer = op
                .get("security")
                .and_then(Value::as_array)
                .is_some_and(|s| !s.is_empty());
            let responses = op
                .as_object_mut()
                .map(|o| o.entry("responses").or_insert_with(|| json!({})))
                .and_then(Value::as_object_mut);
            let Some(responses) = responses else {
                continue;
            };
            if has_body {
                add(
                    responses,
                    "400",
                    error_response(
                        "The body is not JSON (`invalid_json`) or not an object of the expected shape (`bad_request`)",
                    ),
                );
                add(
                    responses,
                    "413",
                    error_response("The body is over 64 KiB (`too_large`)"),
                );
                add(
                    responses,
                    "415",
                    error_response(
                        "The body is not sent as `application/json` (`unsupported_media_type`)",
                    ),
                );
                add(
                    responses,
                    "422",
                    error_response(
                        "A field is missing, of the wrong type, or breaks its rule (`invalid_field` and others)",
                    ),
                );
            }
            if in_path {
                add(
                    responses,
                    "400",
                    error_response("A path segment is not a number (`invalid_path`)"),
                );
            }
            if in_query {
                add(
                    responses,
                    "422",
                    error_response(
                        "A query parameter is malformed or out of range (`invalid_query`, `validation_failed`)",
                    ),
                );
            }
            if bearer {
                add(
                    responses,
                    "401",
                    error_response(
                        "No token (`missing_token`), a bad one (`invalid_token`, `token_expired`, `token_not_yet_valid`), or a revoked session (`session_revoked`)",
                    ),
                );
            }
            for status in ["429", "503"] {
                if let Some(r) = responses.get_mut(status) {
                    if r.get("headers").is_none() {
                        *r = with_retry_after(r.clone(), "Seconds to wait before retrying");
                    }
                }
            }
            add(
                responses,
                "500",
                error_response(
                    "A bug or an unexpected database error (`internal`); logged, never detailed",
                ),
            );
            add(
                responses,
                "503",
                with_retry_after(
                    error_response(
                        "The database is unreachable or the request timed out (`unavailable`)",
                    ),
                    "Seconds to wait before retrying",
                ),
            );
        }
    }
}

/// Ids in paths are positive: the database never hands out 0 or less.
fn add_path_id_minimums(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for item in paths.values_mut() {
        for method in METHODS {
            let Some(params) = item
                .get_mut(method)
                .and_then(|op| op.get_mut("parameters"))
                .and_then(Value::as_array_mut)
            else {
                continue;
            };
            for p in params.iter_mut() {
                if p["in"] == "path" && p["schema"]["type"] == "integer" {
                    p["schema"]["minimum"] = json!(1);
                }
            }
        }
    }
}

/// User ids in request lists are positive too (utoipa cannot put a minimum
/// on the items of a `Vec<i64>` field).
fn add_user_id_item_minimums(doc: &mut Value) {
    let schemas = &mut doc["components"]["schemas"];
    for pointer in [
        "/ParticipantsChange/properties/user_ids/items",
        "/CreateConversation/oneOf/1/properties/participant_ids/items",
    ] {
        if let Some(items) = schemas.pointer_mut(pointer) {
            items["minimum"] = json!(1);
        }
    }
}

fn conversation_id_param() -> Value {
    json!({
        "name": "id", "in": "path", "required": true,
        "description": "Conversation id",
        "schema": {"type": "integer", "format": "int64", "minimum": 1}
    })
}

fn token_query_params() -> Vec<Value> {
    vec![
        json!({"name": "ticket", "in": "query", "required": false,
               "description": "A single-use ticket from `POST /api/v1/chat/ws-ticket` (preferred in browsers).",
               "schema": {"type": "string"}}),
        json!({"name": "token", "in": "query", "required": false,
               "description": "An access token (for clients that cannot send headers). Or send `Authorization: Bearer`.",
               "schema": {"type": "string"}}),
    ]
}

fn since_param() -> Value {
    json!({"name": "since", "in": "query", "required": false,
           "description": "Resume after this seq: everything later is replayed first (or `resync` when it is older than the replay window).",
           "schema": {"type": "integer", "format": "int64", "minimum": 0}})
}

fn edge_op(tag_summary: &str, description: &str, params: Vec<Value>, responses: Value) -> Value {
    let mut op = json!({
        "tags": ["edge"],
        "summary": tag_summary,
        "description": description,
        "security": [{"bearer": []}, {}],
    });
    op["parameters"] = Value::Array(params);
    op["responses"] = responses;
    op
}

fn websocket_responses() -> Value {
    json!({
        "101": {"description": "Switching protocols. A refused token, a non-member or an unknown conversation is still upgraded, then sent an `error` frame (`{\"type\":\"error\",\"code\":…}`) and closed with 1008: a browser cannot read the status of a failed upgrade."},
        "400": error_response("A malformed id or parameter (`invalid_path`)"),
        "403": error_response("The page's `Origin` is not allowed (`forbidden`)"),
        "426": error_response("Not a WebSocket upgrade (`upgrade_required`)"),
        "503": with_retry_after(error_response("The room holds all the connections it can (`too_many_connections`; a user's own oldest connection is closed instead when it is theirs that are too many), or the origin is needed and unreachable (`origin_unavailable`)"), "Seconds to wait"),
    })
}

fn sse_responses() -> Value {
    json!({
        "200": {"description": "`text/event-stream`: `retry:`, then one `data:` line per frame (the same JSON objects as the WebSocket), `id:` = seq for messages, and heartbeat comments.",
                "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        "400": error_response("A malformed id, `since` or `Last-Event-ID` (`invalid_path`, `invalid_query`)"),
        "401": error_response("No, bad, expired or already used token or ticket (`missing_token`, `invalid_token`, `token_expired`, `token_not_yet_valid`, `ticket_used`)"),
        "403": error_response("Not a member, a ticket for another scope, or an `Origin` that is not allowed (`forbidden`)"),
        "404": error_response("No such conversation (`not_found`)"),
        "503": with_retry_after(error_response("The room holds all the streams it can (`too_many_connections`), or the origin is needed and unreachable (`origin_unavailable`)"), "Seconds to wait"),
    })
}

fn auth_refusals() -> Value {
    error_response(
        "No, bad or expired access token (`missing_token`, `invalid_token`, `token_expired`, `token_not_yet_valid`)",
    )
}

/// `POST …/attachments`: answered by the edge, which streams the body into
/// R2 (the origin only reserves and commits it).
fn upload_op() -> Value {
    let mut op = edge_op(
        "Upload an attachment (edge)",
        "The raw file as the body, with its `Content-Length`. The type is read from the bytes (JPEG, PNG, WebP, GIF, MP4, WebM, PDF; `Content-Type: audio/*` reads a WebM or MP4 as a voice message). The answer is the attachment; send it with a message's `attachment_ids`. An image has no `url` until it is processed (re-encoded without EXIF); `attachment_updated` tells the conversation once it is in a message.",
        vec![
            conversation_id_param(),
            json!({"name": "name", "in": "query", "required": false, "schema": {"type": "string", "maxLength": 255}, "description": "The file's name, cleaned, for file cards and downloads"}),
            json!({"name": "duration_ms", "in": "query", "required": false, "schema": {"type": "integer", "format": "int64", "minimum": 0}, "description": "A recorder's own measure of a voice message"}),
            json!({"name": "width", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 16384}, "description": "A video's width as the uploader's browser read it (with `height`)"}),
            json!({"name": "height", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 16384}, "description": "A video's height as the uploader's browser read it (with `width`)"}),
        ],
        json!({
            "201": {"description": "Stored", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AttachmentView"}}}},
            "400": error_response("The body ended before its `Content-Length`, it is empty, or a bad parameter (`upload_incomplete`, `empty_upload`, `invalid_query`, `invalid_path`)"),
            "401": auth_refusals(),
            "403": error_response("Not a participant (`forbidden`)"),
            "404": error_response("No such conversation (`not_found`)"),
            "411": error_response("No `Content-Length` (`length_required`)"),
            "413": error_response("Over the kind's limit or the daily quota (`too_large`, `quota_exceeded`)"),
            "415": error_response("Not a type the product takes (`unsupported_media_type`)"),
            "422": error_response("An image that is broken or truncated (`corrupt_media`)"),
            "503": with_retry_after(error_response("The origin is unreachable (`origin_unavailable`)"), "Seconds to wait"),
        }),
    );
    op["requestBody"] = json!({"required": true, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}});
    op["security"] = json!([{"bearer": []}]);
    op
}

/// `GET /api/v1/media/…`: the signature is the credential.
fn download_op() -> Value {
    let mut op = edge_op(
        "Download an attachment by signed link (edge)",
        "The `url`/`thumbnail_url` of an attachment: signed for at most an hour, no token (an `<img>` cannot send one). Served with its stored type, `nosniff`, private caching until the link expires, and ranges.",
        vec![
            json!({"name": "attachment_id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}}),
            json!({"name": "variant", "in": "path", "required": true, "schema": {"type": "string", "enum": ["original", "full", "thumb"]}}),
            json!({"name": "exp", "in": "query", "required": true, "schema": {"type": "integer", "format": "int64"}}),
            json!({"name": "sig", "in": "query", "required": true, "schema": {"type": "string"}}),
            json!({"name": "Range", "in": "header", "required": false, "schema": {"type": "string"}, "description": "`bytes=a-b`, `bytes=a-` or `bytes=-n`"}),
        ],
        json!({
            "200": {"description": "The bytes", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "206": {"description": "The requested range, with `Content-Range`", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "403": error_response("An altered or expired link (`bad_signature`, `link_expired`)"),
            "404": error_response("No such attachment (`not_found`)"),
            "416": {"description": "The range is outside the object (`Content-Range: bytes */size`)"},
        }),
    );
    op["security"] = json!([{}]);
    op
}

fn add_edge_routes(doc: &mut Value) {
    let message_send = json!({
        "type": "object",
        "properties": {
            "content": {"type": "string", "maxLength": 4000,
                        "description": "Up to 4,000 characters, no NUL; not blank unless `attachment_ids` is not empty"},
            "attachment_ids": {"type": "array", "maxItems": 10,
                               "items": {"type": "string", "format": "uuid"},
                               "description": "Uploads of the caller's to this conversation (`POST …/attachments`), not sent before"},
            "client_msg_id": {"type": "string", "minLength": 1, "maxLength": 64,
                              "pattern": "^[A-Za-z0-9._:-]{1,64}$",
                              "description": "Idempotency key: the same key again answers the original message with 200"}
        }
    });
    let read = json!({
        "type": "object",
        "required": ["seq"],
        "properties": {"seq": {"type": "integer", "format": "int64", "minimum": 0,
                               "description": "Read up to this seq (clamped to the last seq)"}}
    });
    let ticket_request = json!({
        "type": "object",
        "properties": {"conversation_id": {"type": "integer", "format": "int64", "minimum": 1,
            "description": "The conversation the ticket opens; without it, the user's own connection (`GET /api/v1/chat/ws`, `/events`)"}}
    });
    let ticket = json!({
        "type": "object",
        "required": ["ticket", "expires_at"],
        "properties": {
            "ticket": {"type": "string", "description": "A single-use JWT for `?ticket=`, bound to its scope"},
            "expires_at": {"type": "integer", "format": "int64", "description": "Seconds since the Unix epoch (60 s from now)"}
        }
    });
    let demo_logins = json!({
        "type": "object",
        "required": ["password", "accounts"],
        "properties": {
            "password": {"type": "string", "description": "The password of every demo account"},
            "accounts": {"type": "array", "items": {"type": "string"}, "description": "The demo accounts' emails"}
        }
    });
    let json_body = |schema: Value, required: bool| json!({"required": required, "content": {"application/json": {"schema": schema}}});
    let mut conv_ws_params = vec![conversation_id_param(), since_param()];
    conv_ws_params.extend(token_query_params());
    let mut conv_sse_params = conv_ws_params.clone();
    conv_sse_params.push(json!({"name": "Last-Event-ID", "in": "header", "required": false,
        "description": "Resume after this seq (what EventSource sends on reconnect); wins over `since`",
        "schema": {"type": "integer", "format": "int64", "minimum": 0}}));
    let user_params = token_query_params();

    let mut send = edge_op(
        "POST /api/v1/chat/conversations/{id}/messages (edge)",
        "Sends a message over HTTP (the SSE fallback's write half). Stored in the room, acknowledged, broadcast, and flushed to PostgreSQL like a WebSocket message.",
        vec![conversation_id_param()],
        json!({
            "201": {"description": "Stored: the new message", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MessageView"}}}},
            "200": {"description": "A resend of a known `client_msg_id`: the original message", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MessageView"}}}},
            "400": error_response("Malformed JSON or id (`invalid_json`, `invalid_path`)"),
            "401": auth_refusals(),
            "403": error_response("Not a member (`forbidden`)"),
            "404": error_response("No such conversation (`not_found`)"),
            "413": error_response("Body over 64 KiB or content over 4,000 characters (`too_large`, `too_long`)"),
            "415": error_response("Not `application/json` (`unsupported_media_type`)"),
            "422": error_response("Blank content without attachments, a bad `client_msg_id` or field, or an attachment that is not the caller's unsent upload here (`empty_field`, `invalid_field`, `invalid_attachment`)"),
            "429": with_retry_after(error_response("Over the per-user rate (`rate_limited`)"), "Seconds to wait"),
            "503": with_retry_after(error_response("The room's outbox is full during an origin outage (`backpressure`), its storage failed (`storage_unavailable`), or the origin is needed and unreachable (`origin_unavailable`)"), "Seconds to wait"),
        }),
    );
    send["requestBody"] = json_body(message_send, true);
    send["security"] = json!([{"bearer": []}]);

    let mut typing = edge_op(
        "POST /api/v1/chat/conversations/{id}/typing (edge)",
        "Tells the other members that the caller is typing (relayed at most once per 2 s per user).",
        vec![conversation_id_param()],
        json!({
            "204": {"description": "Relayed (or coalesced)"},
            "400": error_response("A malformed id (`invalid_path`)"),
            "401": auth_refusals(),
            "403": error_response("Not a member (`forbidden`)"),
            "404": error_response("No such conversation (`not_found`)"),
            "429": with_retry_after(error_response("Over the per-user rate (`rate_limited`)"), "Seconds to wait"),
        }),
    );
    typing["security"] = json!([{"bearer": []}]);

    let mut read_op = edge_op(
        "POST /api/v1/chat/conversations/{id}/read (edge)",
        "Moves the caller's read watermark forward; the members get a `receipt`.",
        vec![conversation_id_param()],
        json!({
            "204": {"description": "Recorded"},
            "400": error_response("Malformed JSON or id (`invalid_json`, `invalid_path`)"),
            "401": auth_refusals(),
            "403": error_response("Not a member (`forbidden`)"),
            "404": error_response("No such conversation (`not_found`)"),
            "413": error_response("Body over 64 KiB (`too_large`)"),
            "422": error_response("`seq` missing or negative (`invalid_field`)"),
            "429": with_retry_after(error_response("Over the per-user rate (`rate_limited`)"), "Seconds to wait"),
        }),
    );
    read_op["requestBody"] = json_body(read, true);
    read_op["security"] = json!([{"bearer": []}]);

    let mut ticket_op = edge_op(
        "POST /api/v1/chat/ws-ticket (edge)",
        "A 60-second, single-use ticket for `?ticket=` on a WebSocket or EventSource, so the access token stays out of URLs. Minted at the edge (works while the origin is down), bound to one conversation or to the user's own connection.",
        vec![],
        json!({
            "200": {"description": "The ticket", "content": {"application/json": {"schema": ticket}}},
            "400": error_response("Malformed JSON (`invalid_json`)"),
            "401": auth_refusals(),
            "403": error_response("Not a member of `conversation_id` (`forbidden`)"),
            "404": error_response("No such conversation (`not_found`)"),
            "503": with_retry_after(error_response("Membership must be checked and the origin is unreachable (`origin_unavailable`)"), "Seconds to wait"),
        }),
    );
    ticket_op["requestBody"] = json_body(ticket_request, false);
    ticket_op["security"] = json!([{"bearer": []}]);

    let edge = json!({
        "/api/v1/chat/conversations/{id}/ws": {"get": edge_op(
            "WebSocket to conversation {id}'s room (edge)",
            "Upgrade to a WebSocket carrying the room's frames (`message`, `ack`, `typing`, `receipt`, `resync`, `error`, …). Renew the access token in band with `{\"type\":\"auth\",\"token\":…}` before it expires; a connection whose token expired without renewal gets `error` `token_expired` and close 1008.",
            conv_ws_params, websocket_responses())},
        "/api/v1/chat/conversations/{id}/events": {"get": edge_op(
            "Server-Sent Events of conversation {id} (edge)",
            "The SSE fallback: the same frames as the WebSocket, resumable with `Last-Event-ID` or `since`. Authenticate with a bearer header (fetch-based clients) or `?ticket=` / `?token=` (EventSource).",
            conv_sse_params, sse_responses())},
        "/api/v1/chat/conversations/{id}/messages": {"post": send},
        "/api/v1/chat/conversations/{id}/typing": {"post": typing},
        "/api/v1/chat/conversations/{id}/read": {"post": read_op},
        "/api/v1/chat/ws-ticket": {"post": ticket_op},
        "/api/v1/chat/ws": {"get": edge_op(
            "The user's always-on WebSocket (edge, the caller's own User object)",
            "Their contacts' presence (`presence_snapshot`, `presence`; contacts are people who share a conversation with the caller), `conversation_updated` notices for the caller's conversations, and `conversation_changed` (a group's name or members changed: refetch it) or `conversation_removed` (the caller is no longer a member), on every device. Takes `message`, `typing` and `read` frames for any of the caller's conversations and answers as the room's own socket would (`ack` or a typed `error`). Carries the live `message`, `typing` and `receipt` frames of all the caller's conversations; `resume` (`{\"type\":\"resume\",\"since\":{\"7\":42}}`) replays each conversation's gap and answers `resumed`.",
            user_params.clone(), websocket_responses())},
        "/api/v1/chat/ws/{token}": {"get": edge_op(
            "The user's always-on WebSocket, token in the path (edge, the caller's own User object; the seed's form)",
            "As `GET /api/v1/chat/ws`, for clients that can only put the token in the path.",
            vec![json!({"name": "token", "in": "path", "required": true, "description": "An access token", "schema": {"type": "string"}})],
            websocket_responses())},
        "/api/v1/chat/events": {"get": edge_op(
            "The user's always-on SSE stream (edge, the caller's own User object)",
            "As `GET /api/v1/chat/ws`, over Server-Sent Events.",
            user_params, json!({
                "200": {"description": "`text/event-stream` of presence and notices", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                "401": error_response("No, bad, expired or used token or ticket"),
                "403": error_response("A ticket for another scope, or an `Origin` that is not allowed (`forbidden`)"),
            }))},
        "/api/v1/chat/conversations/{id}/attachments": {"post": upload_op()},
        "/api/v1/media/{attachment_id}/{variant}": {"get": download_op()},
        "/api/v1/edge/health": {"get": {
            "tags": ["edge"],
            "summary": "The edge's own health (edge)",
            "description": "Answered by the Worker without touching a Durable Object or the origin.",
            "responses": {"200": {"description": "The edge is up", "content": {"application/json": {"schema": {"type": "object"}}}}}
        }},
        "/api/v1/edge/demo": {"get": {
            "tags": ["edge"],
            "summary": "The demo logins of a dev server (edge)",
            "description": "The accounts and password the ChatBox may offer as hints on a development server (`cargo xtask dev` sets the Worker var `DEMO_LOGINS`). A deployment never sets it and answers 404. No authentication.",
            "responses": {
                "200": {"description": "The demo logins", "content": {"application/json": {"schema": demo_logins}}},
                "404": error_response("Not a development server: there are no demo logins (`not_found`)"),
                "500": error_response("`DEMO_LOGINS` is set but is not `{password, accounts}` (`internal`)"),
            }
        }},
    });
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let Some(edge) = edge.as_object() else {
        return;
    };
    for (path, item) in edge {
        let entry = paths.entry(path.clone()).or_insert_with(|| json!({}));
        if let (Some(entry), Some(ops)) = (entry.as_object_mut(), item.as_object()) {
            for (method, op) in ops {
                entry.entry(method.clone()).or_insert_with(|| op.clone());
            }
        }
    }
    if let Some(tags) = doc.get_mut("tags").and_then(Value::as_array_mut) {
        tags.push(json!({"name": "edge", "description": "Answered by the edge (Cloudflare Worker), never by the origin: realtime connections, the SSE fallback's writes, tickets"}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_in_request_lists_are_positive() {
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas.pointer("/ParticipantsChange/properties/user_ids/items/minimum"),
            Some(&json!(1))
        );
        assert_eq!(
            schemas.pointer("/CreateConversation/oneOf/1/properties/participant_ids/items/minimum"),
            Some(&json!(1)),
            "{}",
            schemas["CreateConversation"]
        );
    }

    /// Every `$ref` in `v`.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_schema_reference_resolves_and_messages_carry_their_lifecycle() {
        let doc = document();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let pointer = r.strip_prefix('#').unwrap_or(r);
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
        let schemas = &doc["components"]["schemas"];
        let message = &schemas["MessageView"]["properties"];
        for field in [
            "edited_at",
            "deleted_at",
            "reactions",
            "reply_to",
            "mentions",
        ] {
            assert!(message[field].is_object(), "MessageView.{field}: {message}");
        }
        for schema in ["ReactionView", "ReplyPreview"] {
            assert!(schemas[schema].is_object(), "{schema} is not registered");
        }
        assert!(
            schemas["ConversationSummary"]["properties"]["unread_mentions"].is_object(),
            "{}",
            schemas["ConversationSummary"]
        );
    }

    #[test]
    fn every_operation_lists_500_and_503_with_retry_after() {
        let doc = document();
        let paths = doc["paths"].as_object().expect("paths");
        for (path, item) in paths {
            for method in METHODS {
                let Some(op) = item.get(method) else { continue };
                if op["tags"][0] == "edge" {
                    continue;
                }
                assert!(op["responses"]["500"].is_object(), "{method} {path}");
                assert!(
                    op["responses"]["503"]["headers"]["Retry-After"].is_object(),
                    "{method} {path}"
                );
            }
        }
    }
}
