//! Attachments end to end: uploads streamed through the edge into
//! `wrangler dev`'s local R2, processed by the origin (thumbnail, EXIF
//! gone), carried by messages, and served back by signed links.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use e2e::Stack;
use e2e::media::{
    GPS_MARKER, attachment_row, contains, eventually, pdf, photo_with_location, upload, uploads_by,
    voice,
};
use reqwest::Method;
use serde_json::{Value, json};
use shared::media::{Signer, Variant};

/// The suite's origin settings (see `main.rs`): small limits, so that the
/// refusals are cheap to reach, and a cleanup that looks every second.
pub fn origin_vars() -> Vec<(String, String)> {
    [
        ("MEDIA_MAX_IMAGE_BYTES", "1048576"),
        ("MEDIA_DAILY_QUOTA_BYTES", "4194304"),
        ("MEDIA_UNSENT_TTL_SECS", "60"),
        ("MEDIA_CLEANUP_INTERVAL_SECS", "1"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

async fn get(s: &Stack, path: &str, range: Option<&str>) -> anyhow::Result<reqwest::Response> {
    let mut req = s.http().get(format!("{}{path}", s.edge));
    if let Some(r) = range {
        req = req.header("range", r);
    }
    Ok(req.send().await?)
}

/// The attachment `id` in its final state, from whichever of `ws`'s
/// frames says so first: the message that carries it, or an
/// `attachment_updated` after it.
async fn ready_on(ws: &mut e2e::client::Ws, id: &str) -> anyhow::Result<Value> {
    let mut seen_message = false;
    loop {
        let f = ws
            .expect_where("the message or its attachment_updated", |f| {
                (f["type"] == "message"
                    && f["message"]["attachments"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x["id"] == id)))
                    || (f["type"] == "attachment_updated" && f["attachment"]["id"] == id)
            })
            .await?;
        let a = if f["type"] == "message" {
            seen_message = true;
            f["message"]["attachments"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["id"] == id).cloned())
                .context("attachment")?
        } else {
            f["attachment"].clone()
        };
        if a["status"] == "ready" && seen_message {
            return Ok(a);
        }
        if a["status"] == "failed" {
            bail!("processing failed: {a}");
        }
        if !seen_message {
            bail!("an attachment_updated reached a member before any message carried it: {f}");
        }
    }
}

pub async fn a_photo_reaches_the_other_member_with_a_thumbnail_and_without_its_location(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut sam_ws = s.ws(&sam, conv, None).await?;
    let mut sam_everywhere = s.always_on(&sam).await?;
    let mut sam_sse = s
        .sse(conv, &format!("token={}", sam.token), &[])
        .await?
        .map_err(|(status, body)| anyhow::anyhow!("SSE: {status} {body}"))?;
    let mut alex_ws = s.ws(&alex, conv, None).await?;
    let photo = photo_with_location(640, 480)?;
    ensure!(contains(&photo, GPS_MARKER));
    let (status, up) = upload(s, &alex, conv, photo, "image/jpeg", "?name=IMG_0001.jpg").await?;
    ensure!(status == 201, "{status} {up}");
    ensure!(up["kind"] == "image" && up["mime"] == "image/jpeg", "{up}");
    ensure!(up["width"] == 640 && up["height"] == 480, "{up}");
    ensure!(up["size"].as_i64().is_some_and(|n| n > 1000), "{up}");
    // Until the origin re-encodes it, only the uploader's own copy exists.
    if up["status"] == "processing" {
        ensure!(up.get("url").is_none(), "served before processing: {up}");
    }
    let id = up["id"].as_str().context("id")?.to_owned();

    alex_ws
        .send(
            json!({"type": "message", "conversation_id": conv, "content": "form check",
                     "client_msg_id": "photo-1", "attachment_ids": [id]}),
        )
        .await?;
    let ack = alex_ws.expect("ack").await?;
    ensure!(ack["client_msg_id"] == "photo-1", "{ack}");
    let att = ready_on(&mut sam_ws, &id).await?;
    ensure!(att["has_thumbnail"] == true, "{att}");
    // The always-on connection (every device) hears the same.
    let elsewhere = ready_on(&mut sam_everywhere, &id).await?;
    ensure!(elsewhere["thumbnail_url"].is_string(), "{elsewhere}");
    // And the SSE fallback: the message, then (unless it was ready by
    // then) its attachment_updated.
    let (_, carried) = sam_sse.expect("message").await?;
    let mut on_sse = carried["message"]["attachments"][0].clone();
    ensure!(on_sse["id"] == id.as_str(), "{carried}");
    if on_sse["status"] != "ready" {
        let (_, updated) = sam_sse.expect("attachment_updated").await?;
        on_sse = updated["attachment"].clone();
    }
    ensure!(
        on_sse["status"] == "ready" && on_sse["thumbnail_url"].is_string(),
        "{on_sse}"
    );
    let url = att["url"].as_str().context("url")?;
    let thumb = att["thumbnail_url"].as_str().context("thumbnail_url")?;

    let res = get(s, url, None).await?;
    ensure!(res.status() == 200, "{}", res.status());
    let h = res.headers().clone();
    ensure!(h["content-type"] == "image/jpeg", "{h:?}");
    ensure!(h["x-content-type-options"] == "nosniff", "{h:?}");
    ensure!(h["cache-control"].to_str()?.starts_with("private"), "{h:?}");
    let served = res.bytes().await?.to_vec();
    ensure!(!contains(&served, GPS_MARKER), "the location was served");
    ensure!(!contains(&served, b"Exif"), "EXIF was served");
    let decoded = image::load_from_memory(&served).context("the served photo decodes")?;
    ensure!((decoded.width(), decoded.height()) == (640, 480));

    let res = get(s, thumb, None).await?;
    ensure!(res.status() == 200, "{}", res.status());
    let small = image::load_from_memory(&res.bytes().await?).context("thumbnail decodes")?;
    ensure!(
        small.width() <= 320 && small.height() <= 320,
        "{}x{}",
        small.width(),
        small.height()
    );

    // History and the gallery carry it too, with links that work.
    let (status, page) = s
        .call(
            Some(&sam),
            Method::GET,
            &format!("/api/v1/chat/conversations/{conv}/messages"),
            None,
        )
        .await?;
    ensure!(status == 200, "{status} {page}");
    let listed = page["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["client_msg_id"] == "photo-1"))
        .context("the message in history")?;
    let hist_url = listed["attachments"][0]["url"].as_str().context("url")?;
    ensure!(get(s, hist_url, None).await?.status() == 200);
    let (status, gallery) = s
        .call(
            Some(&sam),
            Method::GET,
            &format!("/api/v1/chat/conversations/{conv}/attachments?kind=image"),
            None,
        )
        .await?;
    ensure!(status == 200, "{status} {gallery}");
    ensure!(gallery["attachments"][0]["id"] == id.as_str(), "{gallery}");
    Ok(())
}

pub async fn downloads_need_a_live_signature_and_serve_ranges(s: &mut Stack) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let eve = s.user("Eve").await?;
    let sound = voice(5_000);
    let (status, up) = upload(
        s,
        &alex,
        conv,
        sound.clone(),
        "audio/webm;codecs=opus",
        "?duration_ms=3200",
    )
    .await?;
    ensure!(status == 201, "{status} {up}");
    ensure!(up["kind"] == "audio" && up["mime"] == "audio/webm", "{up}");
    let url = up["url"].as_str().context("audio is served at once")?;

    let res = get(s, url, Some("bytes=0-99")).await?;
    ensure!(res.status() == 206, "{}", res.status());
    ensure!(
        res.headers()["content-range"] == format!("bytes 0-99/{}", sound.len()).as_str(),
        "{:?}",
        res.headers()
    );
    ensure!(res.bytes().await?.as_ref() == &sound[..100]);
    let res = get(s, url, Some("bytes=-10")).await?;
    ensure!(res.status() == 206);
    ensure!(res.bytes().await?.as_ref() == &sound[sound.len() - 10..]);
    let res = get(s, url, Some(&format!("bytes={}-", sound.len()))).await?;
    ensure!(res.status() == 416, "{}", res.status());
    let res = get(s, url, None).await?;
    ensure!(res.status() == 200 && res.headers()["accept-ranges"] == "bytes");
    ensure!(res.bytes().await?.as_ref() == sound.as_slice());

    // An altered link, another attachment's signature, an expired link.
    let id: uuid::Uuid = up["id"].as_str().context("id")?.parse()?;
    let tampered = url.replace("sig=", "sig=0");
    let res = get(s, &tampered, None).await?;
    ensure!(res.status() == 403, "{}", res.status());
    let other = url.replace(&id.to_string(), &uuid::Uuid::now_v7().to_string());
    ensure!(get(s, &other, None).await?.status() == 403);
    let signer = Signer::new(s.secrets.service.as_bytes());
    let now = chrono::Utc::now().timestamp();
    let expired = signer.path(id, Variant::Original, now - 2 * 3600);
    let res = get(s, &expired, None).await?;
    ensure!(res.status() == 403, "{}", res.status());
    let body: Value = res.json().await?;
    ensure!(body["code"] == "link_expired", "{body}");
    // A link minted with the deployment's key works: the edge and the
    // origin agree on it.
    let fresh = signer.path(id, Variant::Original, now);
    ensure!(get(s, &fresh, None).await?.status() == 200);

    // A non-member gets no link: the gallery and the attachment refuse.
    let (status, _) = s
        .call(
            Some(&eve),
            Method::GET,
            &format!("/api/v1/chat/conversations/{conv}/attachments"),
            None,
        )
        .await?;
    ensure!(status == 403, "{status}");
    let (status, _) = s
        .call(
            Some(&eve),
            Method::GET,
            &format!("/api/v1/chat/conversations/{conv}/attachments/{id}"),
            None,
        )
        .await?;
    ensure!(status == 403, "{status}");
    // Before it is sent, the upload is its uploader's alone.
    let (status, _) = s
        .call(
            Some(&sam),
            Method::GET,
            &format!("/api/v1/chat/conversations/{conv}/attachments/{id}"),
            None,
        )
        .await?;
    ensure!(status == 403 || status == 404, "{status}");

    // A video takes the size its uploader's browser read, until the origin
    // reads the container; a nonsense size is refused.
    let mut clip = b"\0\0\0\x20ftypisom\0\0\x02\0".to_vec();
    clip.resize(20_000, 0);
    let (status, up) = upload(
        s,
        &alex,
        conv,
        clip.clone(),
        "video/mp4",
        "?width=1280&height=720",
    )
    .await?;
    ensure!(status == 201 && up["kind"] == "video", "{status} {up}");
    ensure!(up["width"] == 1280 && up["height"] == 720, "{up}");
    let (status, body) = upload(s, &alex, conv, clip, "video/mp4", "?width=0&height=720").await?;
    ensure!(
        status == 400 && body["code"] == "invalid_query",
        "{status} {body}"
    );

    // A PDF downloads as a file under its (cleaned) name.
    let (status, up) = upload(
        s,
        &alex,
        conv,
        pdf(3_000),
        "application/pdf",
        "?name=Week%201%20plan.pdf",
    )
    .await?;
    ensure!(status == 201 && up["kind"] == "file", "{status} {up}");
    let res = get(s, up["url"].as_str().context("url")?, None).await?;
    ensure!(res.status() == 200);
    ensure!(
        res.headers()["content-disposition"] == "attachment; filename=\"Week 1 plan.pdf\"",
        "{:?}",
        res.headers()
    );
    ensure!(res.headers()["content-type"] == "application/pdf");
    Ok(())
}

pub async fn uploads_are_refused_by_type_size_integrity_and_quota(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, _sam, conv) = s.pair().await?;
    let eve = s.user("Eve").await?;
    let mut exe = b"MZ\x90\0\x03\0\0\0\x04\0\0\0\xff\xff\0\0".to_vec();
    exe.resize(4_000, 0);
    let (status, body) = upload(s, &alex, conv, exe, "image/jpeg", "?name=cat.jpg").await?;
    ensure!(
        status == 415 && body["code"] == "unsupported_media_type",
        "{status} {body}"
    );

    let photo = photo_with_location(200, 150)?;
    let truncated = photo[..photo.len() / 2].to_vec();
    let (status, body) = upload(s, &alex, conv, truncated, "image/jpeg", "").await?;
    ensure!(
        status == 422 && body["code"] == "corrupt_media",
        "{status} {body}"
    );

    // Over the suite's 1 MiB image limit: refused from the declared length,
    // before the stream is stored.
    let mut big = photo.clone();
    big.resize(1_600_000, 0);
    let (status, body) = upload(s, &alex, conv, big, "image/jpeg", "").await?;
    ensure!(
        status == 413 && body["code"] == "too_large",
        "{status} {body}"
    );

    // A body without a length cannot be streamed into R2.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(pdf(2_000))];
    let res = s
        .http()
        .post(format!(
            "{}/api/v1/chat/conversations/{conv}/attachments",
            s.edge
        ))
        .bearer_auth(&alex.token)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await?;
    ensure!(res.status() == 411, "{}", res.status());

    let (status, body) = upload(s, &eve, conv, pdf(2_000), "application/pdf", "").await?;
    ensure!(status == 403, "{status} {body}");

    // The suite's quota is 4 MiB a day: 2.5 MiB fits once.
    let (status, body) = upload(s, &alex, conv, pdf(2_500_000), "application/pdf", "").await?;
    ensure!(status == 201, "{status} {body}");
    let (status, body) = upload(s, &alex, conv, pdf(2_500_000), "application/pdf", "").await?;
    ensure!(
        status == 413 && body["code"] == "quota_exceeded",
        "{status} {body}"
    );

    // Every refusal left nothing behind: one row, the accepted PDF.
    let n = uploads_by(s, &alex).await?;
    ensure!(n == 1, "{n} rows");
    Ok(())
}

pub async fn a_message_carries_only_its_senders_unsent_uploads(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, sam, conv) = s.pair().await?;
    let mut alex_ws = s.ws(&alex, conv, None).await?;
    let mut sam_ws = s.ws(&sam, conv, None).await?;
    let (status, up) = upload(s, &alex, conv, pdf(4_000), "application/pdf", "").await?;
    ensure!(status == 201, "{status} {up}");
    let id = up["id"].as_str().context("id")?.to_owned();

    sam_ws
        .send(
            json!({"type": "message", "conversation_id": conv, "content": "mine now",
                     "client_msg_id": "steal", "attachment_ids": [id]}),
        )
        .await?;
    let err = sam_ws.expect("error").await?;
    ensure!(err["code"] == "invalid_attachment", "{err}");

    // Text is optional next to an attachment.
    alex_ws
        .send(
            json!({"type": "message", "conversation_id": conv, "content": "",
                     "client_msg_id": "plan", "attachment_ids": [id]}),
        )
        .await?;
    let ack = alex_ws.expect("ack").await?;
    let message_id = ack["id"].as_str().context("id")?.to_owned();
    let got = sam_ws.expect("message").await?;
    ensure!(
        got["message"]["attachments"][0]["id"] == id.as_str(),
        "{got}"
    );
    ensure!(got["message"]["attachments"][0]["url"].is_string(), "{got}");

    // The same key again is the same message; a new message cannot take it.
    alex_ws
        .send(
            json!({"type": "message", "conversation_id": conv, "content": "",
                     "client_msg_id": "plan", "attachment_ids": [id]}),
        )
        .await?;
    let again = alex_ws.expect("ack").await?;
    ensure!(again["id"] == message_id.as_str(), "{again}");
    alex_ws
        .send(
            json!({"type": "message", "conversation_id": conv, "content": "twice",
                     "client_msg_id": "plan-2", "attachment_ids": [id]}),
        )
        .await?;
    let err = alex_ws.expect("error").await?;
    ensure!(err["code"] == "invalid_attachment", "{err}");

    // Over POST too (the SSE fallback).
    let (status, up2) = upload(s, &alex, conv, pdf(3_000), "application/pdf", "").await?;
    ensure!(status == 201, "{status} {up2}");
    let (status, posted) = s
        .call(
            Some(&alex),
            Method::POST,
            &format!("/api/v1/chat/conversations/{conv}/messages"),
            Some(json!({"content": "by post", "client_msg_id": "post-1",
                        "attachment_ids": [up2["id"]]})),
        )
        .await?;
    ensure!(status == 201, "{status} {posted}");
    ensure!(posted["attachments"][0]["url"].is_string(), "{posted}");

    // PostgreSQL links both to their messages.
    s.wait_stored(conv, 2, Duration::from_secs(10)).await?;
    let id: uuid::Uuid = id.parse()?;
    let message_id: uuid::Uuid = message_id.parse()?;
    eventually(
        "the attachment linked to its message",
        Duration::from_secs(10),
        || async {
            let linked = attachment_row(s, id).await?.flatten();
            Ok((linked == Some(message_id)).then_some(()))
        },
    )
    .await?;
    Ok(())
}

pub async fn unsent_uploads_are_reaped_and_sent_ones_kept(s: &mut Stack) -> anyhow::Result<()> {
    let (alex, _sam, conv) = s.pair().await?;
    let mut alex_ws = s.ws(&alex, conv, None).await?;
    let (_, kept) = upload(s, &alex, conv, pdf(3_000), "application/pdf", "").await?;
    let (_, dropped) = upload(s, &alex, conv, pdf(3_000), "application/pdf", "").await?;
    alex_ws
        .send(
            json!({"type": "message", "conversation_id": conv, "content": "plan",
                     "client_msg_id": "keep", "attachment_ids": [kept["id"]]}),
        )
        .await?;
    alex_ws.expect("ack").await?;
    let dropped_id: uuid::Uuid = dropped["id"].as_str().context("id")?.parse()?;
    let kept_id: uuid::Uuid = kept["id"].as_str().context("id")?.parse()?;
    // A day passes for both uploads (in the database's clock, which the
    // cleanup reads); it checks every second in this suite.
    let db = s.pool.get().await?;
    db.execute(
        "UPDATE attachments SET created_at = created_at - interval '2 days'
         WHERE id = ANY($1)",
        &[&vec![dropped_id, kept_id]],
    )
    .await?;
    eventually(
        "the unsent upload reaped",
        Duration::from_secs(40),
        || async { Ok(attachment_row(s, dropped_id).await?.is_none().then_some(())) },
    )
    .await?;
    // Its object is gone from R2 (a link minted now finds nothing), and
    // the room refuses it.
    let signer = Signer::new(s.secrets.service.as_bytes());
    let now = chrono::Utc::now().timestamp();
    let res = get(s, &signer.path(dropped_id, Variant::Original, now), None).await?;
    ensure!(res.status() == 404, "{}", res.status());
    alex_ws
        .send(
            json!({"type": "message", "conversation_id": conv, "content": "late",
                     "client_msg_id": "late", "attachment_ids": [dropped_id]}),
        )
        .await?;
    let err = alex_ws.expect("error").await?;
    ensure!(err["code"] == "invalid_attachment", "{err}");
    // The sent one stays, in the bucket and in PostgreSQL.
    let res = get(s, &signer.path(kept_id, Variant::Original, now), None).await?;
    ensure!(res.status() == 200, "{}", res.status());
    ensure!(
        attachment_row(s, kept_id).await?.is_some(),
        "the sent upload went"
    );
    Ok(())
}

pub async fn an_upload_while_the_origin_is_down_is_refused_and_stores_nothing(
    s: &mut Stack,
) -> anyhow::Result<()> {
    let (alex, _sam, conv) = s.pair().await?;
    // The room exists already (the origin vouched for it).
    let mut alex_ws = s.ws(&alex, conv, None).await?;
    s.stop_origin();
    let result = upload(s, &alex, conv, pdf(50_000), "application/pdf", "").await;
    s.start_origin()?;
    let (status, body) = result?;
    ensure!(
        status == 503 && body["code"] == "origin_unavailable",
        "{status} {body}"
    );
    let n = uploads_by(s, &alex).await?;
    ensure!(n == 0, "{n} rows after a refused upload");
    // Text still flows while the origin is away; uploads work once it is back.
    alex_ws.say(conv, "still here", "k-down").await?;
    alex_ws.expect("ack").await?;
    eventually(
        "an upload once the origin is back",
        Duration::from_secs(20),
        || async {
            let (status, _) = upload(s, &alex, conv, pdf(50_000), "application/pdf", "").await?;
            Ok((status == 201).then_some(()))
        },
    )
    .await?;
    Ok(())
}
