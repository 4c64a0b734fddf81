//! Attachments at the edge: uploads streamed into R2, signed downloads out
//! of it, and the origin's access to the bucket.
//!
//! An upload never sits whole in memory. The Worker reads the first bytes
//! to learn the type (`shared::media::sniff`), reserves the upload at the
//! origin (membership, the kind's size limit and the daily quota are
//! decided there, before a byte is stored), then pipes the rest of the
//! body into the bucket through a fixed-length stream, walking an image's
//! structure on the way (`shared::media::Inspector`, no pixel decoding).
//! A truncated or broken image is deleted and refused (422). Then the
//! origin commits the row and queues the processing (thumbnail, EXIF
//! stripped by re-encoding), and the room learns the upload so that its
//! uploader may send it.
//!
//! R2 needs the length of a streamed body up front, so an upload must
//! declare `Content-Length` (every browser does for a `File` or `Blob`); a
//! declared length over the kind's limit is refused (413) before any byte
//! is read.

use std::cell::RefCell;
use std::rc::Rc;

use futures_util::StreamExt;
use shared::media::{
    AttachmentMeta, Inspector, MediaError, MediaKind, SNIFF_BYTES, Variant, parse_range,
    sanitize_name, sniff,
};
use shared::protocol::internal::{CommitAttachment, ReserveAttachment};
use uuid::Uuid;
use worker::{
    Bucket, Env, FixedLengthStream, Headers, HttpMetadata, Method, Range, Request, RequestInit,
    Response, Url,
};

use crate::auth;
use crate::config::EdgeConfig;
use crate::error::{EdgeError, EdgeResult};
use crate::headers::{CONVERSATION_HEADER, USER_HEADER};
use crate::origin::OriginClient;
use crate::room_store::now_secs;

/// The R2 binding.
pub const BUCKET: &str = "MEDIA";

/// Largest body the edge considers at all; the origin's per-kind limits
/// are smaller (Cloudflare's own request limit is 100 MB on most plans).
const MAX_UPLOAD_BYTES: u64 = 512 * 1024 * 1024;

fn query(url: &Url, key: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Most of a refused upload's body the edge still reads (and discards)
/// before answering. The refusal is decided before then and nothing is
/// stored; reading on keeps the answer readable for clients and proxies
/// that cannot take a response while they are still sending (browsers
/// mid-upload, `wrangler dev`'s local proxy, which otherwise answers 503).
const DRAIN_LIMIT: usize = 32 * 1024 * 1024;

/// `POST /api/v1/chat/conversations/{id}/attachments?name=&duration_ms=`
pub async fn upload(
    mut req: Request,
    env: &Env,
    config: &EdgeConfig,
    conversation_id: i64,
    url: &Url,
) -> EdgeResult<Response> {
    let mut body = req.stream().ok();
    let result = accept(&req, &mut body, env, config, conversation_id, url).await;
    if result.is_err() {
        if let Some(mut rest) = body {
            let mut read = 0;
            while read < DRAIN_LIMIT {
                match rest.next().await {
                    Some(Ok(chunk)) => read += chunk.len(),
                    _ => break,
                }
            }
        }
    }
    result
}

/// The upload itself; takes `body` out of its option once the stream goes
/// into the bucket.
async fn accept(
    req: &Request,
    body: &mut Option<worker::ByteStream>,
    env: &Env,
    config: &EdgeConfig,
    conversation_id: i64,
    url: &Url,
) -> EdgeResult<Response> {
    let caller = auth::from_bearer(req, &config.jwt_secret)?;
    let length = req
        .headers()
        .get("content-length")?
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or(EdgeError::Client {
            status: 411,
            code: "length_required",
            message: "send the file as the body with its Content-Length".to_owned(),
        })?;
    if length == 0 {
        return Err(EdgeError::bad_request("empty_upload", "the file is empty"));
    }
    if length > MAX_UPLOAD_BYTES {
        return Err(EdgeError::Media(MediaError::TooLarge {
            max: i64::try_from(MAX_UPLOAD_BYTES).unwrap_or(i64::MAX),
        }));
    }
    let declared = req.headers().get("content-type")?;
    let name = query(url, "name").and_then(|n| sanitize_name(&n));
    let duration_ms = match query(url, "duration_ms") {
        None => None,
        Some(raw) => Some(raw.parse::<i64>().ok().filter(|d| *d >= 0).ok_or_else(|| {
            EdgeError::bad_request("invalid_query", "duration_ms must be a whole number")
        })?),
    };

    // The first bytes decide the type; nothing is reserved for a file the
    // product does not take.
    let stream = body.as_mut().ok_or(EdgeError::Client {
        status: 411,
        code: "length_required",
        message: "send the file as the body with its Content-Length".to_owned(),
    })?;
    let mut head: Vec<u8> = Vec::new();
    while head.len() < SNIFF_BYTES {
        match stream.next().await {
            Some(Ok(chunk)) => head.extend_from_slice(&chunk),
            Some(Err(e)) => return Err(upload_broken(&e)),
            None => break,
        }
    }
    let sniffed = sniff(&head[..head.len().min(SNIFF_BYTES)], declared.as_deref())
        .map_err(EdgeError::Media)?;

    let origin = OriginClient::new(config);
    let reserved = origin
        .reserve(&ReserveAttachment {
            conversation_id,
            uploader_id: caller.user_id,
            kind: sniffed.kind,
            mime: sniffed.mime.to_owned(),
            size: i64::try_from(length).unwrap_or(i64::MAX),
            name: name.clone(),
            duration_ms,
        })
        .await?;
    let id = reserved.id;

    // The rest streams through: the inspector sees every chunk on its way
    // into the bucket.
    let inspector = Rc::new(RefCell::new(Inspector::new(sniffed.mime)));
    let seen = Rc::clone(&inspector);
    let rest = body
        .take()
        .ok_or_else(|| EdgeError::Internal("the body went".to_owned()))?;
    let stream = futures_util::stream::iter([Ok(head)])
        .chain(rest)
        .map(move |chunk| {
            if let Ok(bytes) = &chunk {
                seen.borrow_mut().feed(bytes);
            }
            chunk
        });
    let bucket = env.bucket(BUCKET)?;
    let metadata = HttpMetadata {
        content_type: Some(sniffed.mime.to_owned()),
        content_disposition: Some(disposition(sniffed.kind, name.as_deref())),
        ..HttpMetadata::default()
    };
    let stored = bucket
        .put(
            Variant::Original.key(id),
            FixedLengthStream::wrap(stream, length),
        )
        .http_metadata(metadata)
        .execute()
        .await;
    if let Err(e) = stored {
        // The client went away or sent less than it declared.
        let _ = bucket.delete(Variant::Original.key(id)).await;
        let _ = origin.abort_attachment(id).await;
        return Err(upload_broken(&e));
    }
    let verdict = inspector.replace(Inspector::new("")).finish();
    let found = match verdict {
        Ok(found) => found,
        Err(e) => {
            let _ = bucket.delete(Variant::Original.key(id)).await;
            let _ = origin.abort_attachment(id).await;
            return Err(EdgeError::Media(e));
        }
    };
    // A failure from here leaves a row and an object the room does not
    // know: the origin's cleanup reaps both after a day.
    let meta = origin
        .commit_attachment(
            id,
            &CommitAttachment {
                width: found.width,
                height: found.height,
            },
        )
        .await?;
    register_with_room(env, caller.user_id, &meta).await?;
    let view = config.signer.view(meta, now_secs());
    Ok(Response::from_json(&view)?.with_status(201))
}

fn upload_broken(e: &worker::Error) -> EdgeError {
    EdgeError::bad_request(
        "upload_incomplete",
        format!("the upload did not arrive whole: {e}"),
    )
}

/// Files download as files; media play inline (the sniffed type and
/// `nosniff` keep a browser from reading them as anything else).
fn disposition(kind: MediaKind, name: Option<&str>) -> String {
    match (kind, name) {
        (MediaKind::File, Some(name)) => format!("attachment; filename=\"{name}\""),
        (MediaKind::File, None) => "attachment".to_owned(),
        _ => "inline".to_owned(),
    }
}

async fn register_with_room(env: &Env, user_id: i64, meta: &AttachmentMeta) -> EdgeResult<()> {
    let body = serde_json::to_string(meta).map_err(|e| EdgeError::Internal(e.to_string()))?;
    let res = room_call(
        env,
        meta.conversation_id,
        Some(user_id),
        "/attachment-register",
        body,
    )
    .await?;
    match res.status_code() {
        200..=299 => Ok(()),
        status => Err(EdgeError::Internal(format!(
            "room refused an attachment registration: {status}"
        ))),
    }
}

/// A POST to Room `conversation_id` from the Worker itself.
pub async fn room_call(
    env: &Env,
    conversation_id: i64,
    user_id: Option<i64>,
    path: &str,
    body: String,
) -> EdgeResult<Response> {
    let headers = Headers::new();
    headers.set(CONVERSATION_HEADER, &conversation_id.to_string())?;
    if let Some(user) = user_id {
        headers.set(USER_HEADER, &user.to_string())?;
    }
    headers.set("content-type", "application/json")?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post)
        .with_headers(headers)
        .with_body(Some(body.into()));
    let req = Request::new_with_init(&format!("https://room{path}"), &init)?;
    let stub = env
        .durable_object("ROOM")?
        .get_by_name(&conversation_id.to_string())?;
    Ok(stub.fetch_with_request(req).await?)
}

fn parse_target(id: &str, variant: &str) -> EdgeResult<(Uuid, Variant)> {
    let id: Uuid = id.parse().map_err(|_| EdgeError::NotFound("attachment"))?;
    let variant = Variant::parse(variant).ok_or(EdgeError::NotFound("attachment"))?;
    Ok((id, variant))
}

/// `GET /api/v1/media/{id}/{variant}?exp=&sig=`: the signature is the
/// credential (an `<img>` cannot send a bearer token). Ranges are served
/// for seeking in audio and video.
pub async fn download(
    req: &Request,
    env: &Env,
    config: &EdgeConfig,
    id: &str,
    variant: &str,
    url: &Url,
) -> EdgeResult<Response> {
    let (id, variant) = parse_target(id, variant)?;
    let exp = query(url, "exp").and_then(|e| e.parse::<i64>().ok());
    let sig = query(url, "sig");
    let (Some(exp), Some(sig)) = (exp, sig) else {
        return Err(EdgeError::Media(MediaError::BadSignature));
    };
    let now = now_secs();
    config
        .signer
        .verify(id, variant, exp, &sig, now)
        .map_err(EdgeError::Media)?;
    let bucket = env.bucket(BUCKET)?;
    let key = variant.key(id);
    let range = req.headers().get("range")?;
    let (object, status, span) = match range.as_deref() {
        None => (bucket.get(&key).execute().await?, 200, None),
        Some(header) => {
            let Some(head) = bucket.head(&key).await? else {
                return Err(EdgeError::NotFound("attachment"));
            };
            let size = head.size();
            match parse_range(Some(header), size) {
                Ok(None) => (bucket.get(&key).execute().await?, 200, None),
                Ok(Some((first, last))) => {
                    let object = bucket
                        .get(&key)
                        .range(Range::OffsetWithLength {
                            offset: first,
                            length: last - first + 1,
                        })
                        .execute()
                        .await?;
                    (object, 206, Some((first, last, size)))
                }
                Err(()) => {
                    let mut res = Response::empty()?.with_status(416);
                    res.headers_mut()
                        .set("content-range", &format!("bytes */{size}"))?;
                    return Ok(res);
                }
            }
        }
    };
    let Some(object) = object else {
        return Err(EdgeError::NotFound("attachment"));
    };
    let headers = stored_headers(&object)?;
    headers.set("x-content-type-options", "nosniff")?;
    // Served bytes are never a document that could script the edge's
    // origin, whatever a browser makes of them.
    headers.set("content-security-policy", "sandbox; default-src 'none'")?;
    headers.set("accept-ranges", "bytes")?;
    headers.set("etag", &object.http_etag())?;
    // Only the holder of the link may have it, for as long as it holds.
    headers.set(
        "cache-control",
        &format!("private, max-age={}", (exp - now).max(0)),
    )?;
    let length = match span {
        Some((first, last, size)) => {
            headers.set("content-range", &format!("bytes {first}-{last}/{size}"))?;
            last - first + 1
        }
        None => object.size(),
    };
    headers.set("content-length", &length.to_string())?;
    let body = object
        .body()
        .ok_or(EdgeError::NotFound("attachment"))?
        .response_body()?;
    Ok(Response::from_body(body)?
        .with_status(status)
        .with_headers(headers))
}

/// The type and disposition stored with an object, as response headers.
fn stored_headers(object: &worker::Object) -> EdgeResult<Headers> {
    let meta = object.http_metadata();
    let headers = Headers::new();
    headers.set(
        "content-type",
        meta.content_type
            .as_deref()
            .unwrap_or("application/octet-stream"),
    )?;
    if let Some(d) = meta.content_disposition.as_deref() {
        headers.set("content-disposition", d)?;
    }
    Ok(headers)
}

/// `GET /api/v1/internal/media/{id}/{variant}` (service secret): the
/// origin reads an original to process it.
pub async fn internal_get(env: &Env, id: &str, variant: &str) -> EdgeResult<Response> {
    let (id, variant) = parse_target(id, variant)?;
    let bucket = env.bucket(BUCKET)?;
    let Some(object) = bucket.get(variant.key(id)).execute().await? else {
        return Err(EdgeError::NotFound("attachment"));
    };
    let headers = stored_headers(&object)?;
    headers.set("content-length", &object.size().to_string())?;
    let body = object
        .body()
        .ok_or(EdgeError::NotFound("attachment"))?
        .response_body()?;
    Ok(Response::from_body(body)?.with_headers(headers))
}

/// `PUT /api/v1/internal/media/{id}/{variant}` (service secret): the
/// origin stores a processed copy (`full` or `thumb`). The body streams
/// straight through; it must declare its length.
pub async fn internal_put(
    mut req: Request,
    env: &Env,
    id: &str,
    variant: &str,
) -> EdgeResult<Response> {
    let (id, variant) = parse_target(id, variant)?;
    if variant == Variant::Original {
        return Err(EdgeError::Forbidden(
            "an original is written only by its upload",
        ));
    }
    let content_type = req
        .headers()
        .get("content-type")?
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    let length = req
        .headers()
        .get("content-length")?
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or(EdgeError::Client {
            status: 411,
            code: "length_required",
            message: "a processed copy must declare its Content-Length".to_owned(),
        })?;
    let stream = req.stream()?;
    let metadata = HttpMetadata {
        content_type: Some(content_type),
        content_disposition: Some("inline".to_owned()),
        ..HttpMetadata::default()
    };
    env.bucket(BUCKET)?
        .put(variant.key(id), FixedLengthStream::wrap(stream, length))
        .http_metadata(metadata)
        .execute()
        .await?;
    Ok(Response::empty()?.with_status(204))
}

/// Deletes every copy of an attachment.
pub async fn delete_all(bucket: &Bucket, id: Uuid) -> EdgeResult<()> {
    let keys: Vec<String> = [Variant::Original, Variant::Full, Variant::Thumb]
        .into_iter()
        .map(|v| v.key(id))
        .collect();
    bucket.delete_multiple(keys).await?;
    Ok(())
}

/// `POST /api/v1/internal/rooms/{id}/attachments[/reap]` (service secret):
/// passed to the room as it came.
pub async fn to_room(
    mut req: Request,
    env: &Env,
    conversation_id: i64,
    path: &str,
) -> EdgeResult<Response> {
    let body = req.text().await?;
    room_call(env, conversation_id, None, path, body).await
}
