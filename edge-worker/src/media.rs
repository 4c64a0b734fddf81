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
use worker::js_sys::{Reflect, Uint8Array};
use worker::wasm_bindgen::{JsCast, JsValue};
use worker::wasm_bindgen_futures::JsFuture;
use worker::web_sys::{
    ReadableStream, ReadableStreamDefaultReader, TransformStream, WritableStream,
};
use worker::{
    Bucket, Env, FixedLengthStream, Headers, HttpMetadata, Range, Request, Response, Url,
};

use crate::auth;
use crate::config::EdgeConfig;
use crate::error::{EdgeError, EdgeResult};
use crate::origin::OriginClient;
use crate::room_store::now_secs;

/// The largest side a video's size hint may give.
const MAX_VIDEO_SIDE: i32 = 16_384;

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

/// `POST /api/v1/chat/conversations/{id}/attachments?name=&duration_ms=&width=&height=`
pub async fn upload(
    req: Request,
    env: &Env,
    config: &EdgeConfig,
    conversation_id: i64,
    url: &Url,
) -> EdgeResult<Response> {
    let mut body = Body::of(&req);
    let result = accept(&req, &mut body, env, config, conversation_id, url).await;
    if result.is_err() {
        if let Some(rest) = body {
            rest.discard(DRAIN_LIMIT).await;
        }
    }
    result
}

/// The upload itself; takes `body` out of its option once the stream goes
/// into the bucket.
async fn accept(
    req: &Request,
    body: &mut Option<Body>,
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
    // A video's size as the uploader's browser read it, so members can hold
    // its box before the origin has read the container (which wins).
    let size_hint = |key: &str| -> EdgeResult<Option<i32>> {
        match query(url, key) {
            None => Ok(None),
            Some(raw) => raw
                .parse::<i32>()
                .ok()
                .filter(|v| (1..=MAX_VIDEO_SIDE).contains(v))
                .map(Some)
                .ok_or_else(|| {
                    EdgeError::bad_request(
                        "invalid_query",
                        format!("{key} must be a whole number from 1 to {MAX_VIDEO_SIDE}"),
                    )
                }),
        }
    };
    let hinted = (size_hint("width")?, size_hint("height")?);

    // The first bytes decide the type; nothing is reserved for a file the
    // product does not take.
    let source = body.as_ref().ok_or(EdgeError::Client {
        status: 411,
        code: "length_required",
        message: "send the file as the body with its Content-Length".to_owned(),
    })?;
    let mut head: Vec<u8> = Vec::new();
    let mut head_chunks: Vec<Uint8Array> = Vec::new();
    while head.len() < SNIFF_BYTES {
        match source.next().await {
            Ok(Some(chunk)) => {
                head.extend_from_slice(&chunk.to_vec());
                head_chunks.push(chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(upload_broken(&e)),
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

    let bucket = env.bucket(BUCKET)?;
    let metadata = HttpMetadata {
        content_type: Some(sniffed.mime.to_owned()),
        content_disposition: Some(disposition(sniffed.kind, name.as_deref())),
        ..HttpMetadata::default()
    };
    let rest = body
        .take()
        .ok_or_else(|| EdgeError::Internal("the body went".to_owned()))?;
    let key = Variant::Original.key(id);
    let inspector = Rc::new(RefCell::new(Inspector::new(sniffed.mime)));
    let stored = if sniffed.kind == MediaKind::Image {
        // An image passes the inspector on its way into the bucket: its
        // chunks cross into the Worker's memory (images are small).
        let seen = Rc::clone(&inspector);
        let stream = futures_util::stream::iter(head_chunks.into_iter().map(|c| Ok(c.to_vec())))
            .chain(rest.into_stream())
            .map(move |chunk| {
                if let Ok(bytes) = &chunk {
                    seen.borrow_mut().feed(bytes);
                }
                chunk
            });
        bucket
            .put(&key, FixedLengthStream::wrap(stream, length))
            .http_metadata(metadata)
            .execute()
            .await
            .map(|_| ())
    } else {
        // Anything else is piped by the runtime itself, byte for byte,
        // never copied through the Worker (up to 100 MiB of video).
        let pipe = worker::worker_sys::FixedLengthStream::new_big_int(
            worker::js_sys::BigInt::from(length),
        )
        .map_err(worker::Error::from)?;
        let pipe: &TransformStream = pipe.unchecked_ref();
        let put = bucket
            .put(&key, worker::Data::ReadableStream(pipe.readable()))
            .http_metadata(metadata)
            .execute();
        let (stored, fed) =
            futures_util::future::join(put, rest.pipe(head_chunks, &pipe.writable())).await;
        stored.map(|_| ()).and(fed)
    };
    if let Err(e) = stored {
        // The client went away or sent less than it declared.
        let _ = bucket.delete(&key).await;
        let _ = origin.abort_attachment(id).await;
        return Err(upload_broken(&e));
    }
    let verdict = inspector.replace(Inspector::new("")).finish();
    let video_hint = match (sniffed.kind, hinted) {
        (MediaKind::Video, (Some(w), Some(h))) => (Some(w), Some(h)),
        _ => (None, None),
    };
    let found = match verdict {
        Ok(found) => found,
        Err(e) => {
            let _ = bucket.delete(&key).await;
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
                width: found.width.or(video_hint.0),
                height: found.height.or(video_hint.1),
            },
        )
        .await?;
    register_with_room(env, caller.user_id, &meta).await?;
    let view = config.signer.view(meta, now_secs());
    Ok(Response::from_json(&view)?.with_status(201))
}

/// A request body as the runtime gives it: a JS stream read with its own
/// reader, so that bytes cross into the Worker's wasm memory only where the
/// edge looks at them (the first bytes, an image's structure). Copying
/// every chunk in and out of wasm cost a core per ~22 MB/s (BENCHMARKS.md,
/// Media).
struct Body {
    stream: ReadableStream,
    reader: ReadableStreamDefaultReader,
}

impl Body {
    fn of(req: &Request) -> Option<Self> {
        let stream = req.inner().body()?;
        let reader: ReadableStreamDefaultReader = stream.get_reader().unchecked_into();
        Some(Self { stream, reader })
    }

    /// The next chunk, still in JS memory; `None` at the end.
    async fn next(&self) -> worker::Result<Option<Uint8Array>> {
        let result = JsFuture::from(self.reader.read())
            .await
            .map_err(worker::Error::from)?;
        let done = Reflect::get(&result, &JsValue::from_str("done"))
            .map_err(worker::Error::from)?
            .as_bool()
            .unwrap_or(true);
        if done {
            return Ok(None);
        }
        let value =
            Reflect::get(&result, &JsValue::from_str("value")).map_err(worker::Error::from)?;
        Ok(Some(value.unchecked_into()))
    }

    /// Reads and drops up to `limit` bytes (see [`DRAIN_LIMIT`]).
    async fn discard(&self, limit: usize) {
        let mut read = 0;
        while read < limit {
            match self.next().await {
                Ok(Some(chunk)) => read += chunk.length() as usize,
                _ => break,
            }
        }
    }

    /// The rest as a Rust stream of byte vectors (copied into wasm).
    fn into_stream(self) -> impl futures_util::Stream<Item = worker::Result<Vec<u8>>> {
        futures_util::stream::unfold(Some(self), |state| async move {
            let body = state?;
            match body.next().await {
                Ok(Some(chunk)) => Some((Ok(chunk.to_vec()), Some(body))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    /// Writes `head` (the chunks already read) into `to`, then lets the
    /// runtime pipe the rest: no chunk after the head enters the Worker.
    async fn pipe(self, head: Vec<Uint8Array>, to: &WritableStream) -> worker::Result<()> {
        let writer = to.get_writer().map_err(worker::Error::from)?;
        for chunk in &head {
            JsFuture::from(writer.write_with_chunk(chunk))
                .await
                .map_err(worker::Error::from)?;
        }
        writer.release_lock();
        self.reader.release_lock();
        JsFuture::from(self.stream.pipe_to(to))
            .await
            .map_err(worker::Error::from)?;
        Ok(())
    }
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
    let res = crate::room_do::post(
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
    req: Request,
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
    // Streamed by the runtime into a fixed-length pipe, never through
    // the Worker's memory.
    let Some(body) = Body::of(&req) else {
        return Err(EdgeError::bad_request("empty_upload", "no body"));
    };
    let pipe =
        worker::worker_sys::FixedLengthStream::new_big_int(worker::js_sys::BigInt::from(length))
            .map_err(worker::Error::from)?;
    let pipe: &TransformStream = pipe.unchecked_ref();
    let metadata = HttpMetadata {
        content_type: Some(content_type),
        content_disposition: Some("inline".to_owned()),
        ..HttpMetadata::default()
    };
    let bucket = env.bucket(BUCKET)?;
    let put = bucket
        .put(
            variant.key(id),
            worker::Data::ReadableStream(pipe.readable()),
        )
        .http_metadata(metadata)
        .execute();
    let (stored, fed) =
        futures_util::future::join(put, body.pipe(Vec::new(), &pipe.writable())).await;
    stored?;
    fed?;
    // A copy may not outlive its original: a message deleted while its
    // photo was being processed had its objects erased (`delete_all`
    // takes the original first), and this copy, written after, would be
    // left with no row anywhere. Checked after the write, so the copy is
    // gone whichever finished first.
    if bucket.head(Variant::Original.key(id)).await?.is_none() {
        bucket.delete(variant.key(id)).await?;
        return Err(EdgeError::NotFound("attachment (erased)"));
    }
    Ok(Response::empty()?.with_status(204))
}

/// Deletes every copy of an attachment, the original first (see
/// [`internal_put`]: a processed copy checks for it after its write).
pub async fn delete_all(bucket: &Bucket, id: Uuid) -> EdgeResult<()> {
    bucket.delete(Variant::Original.key(id)).await?;
    let copies: Vec<String> = [Variant::Full, Variant::Thumb]
        .into_iter()
        .map(|v| v.key(id))
        .collect();
    bucket.delete_multiple(copies).await?;
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
    crate::room_do::post(env, conversation_id, None, path, body).await
}
