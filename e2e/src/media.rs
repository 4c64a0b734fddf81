//! Files for the media tests: real photos with a location in their EXIF,
//! PDFs, voice-like WebM, and the upload call.

use anyhow::Context;
use serde_json::Value;

use crate::{Stack, User};

/// A marker spliced into the photo's EXIF block: it must never be served.
pub const GPS_MARKER: &[u8] = b"GPSLatitude=51.5007N;VIBE-SECRET-PLACE";

/// A real JPEG (`width`×`height`) with an EXIF APP1 segment that holds a
/// location, as a phone camera writes one.
pub fn photo_with_location(width: u32, height: u32) -> anyhow::Result<Vec<u8>> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    });
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80)
        .encode_image(&img)
        .context("encode")?;
    let mut payload = b"Exif\0\0MM\0\x2a\0\0\0\x08".to_vec();
    payload.extend_from_slice(GPS_MARKER);
    let len = u16::try_from(payload.len() + 2)?;
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&jpeg[2..]);
    Ok(out)
}

/// A PDF-shaped file of `bytes` bytes.
pub fn pdf(bytes: usize) -> Vec<u8> {
    let mut v = b"%PDF-1.7\n".to_vec();
    v.resize(bytes.saturating_sub(6), b' ');
    v.extend_from_slice(b"%%EOF\n");
    v
}

/// A voice message as MediaRecorder would start one: an EBML header, then
/// bytes (the origin reads what it can; the edge only sniffs).
pub fn voice(bytes: usize) -> Vec<u8> {
    let mut v = vec![0x1A, 0x45, 0xDF, 0xA3, 0x9F, 0x42, 0x86, 0x81, 0x01];
    v.extend((0..bytes).map(|i| (i * 7 % 251) as u8));
    v
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `POST …/conversations/{conv}/attachments{query}` as `user`, the body
/// with its length; the status and the JSON answer.
pub async fn upload(
    s: &Stack,
    user: &User,
    conv: i64,
    bytes: Vec<u8>,
    content_type: &str,
    query: &str,
) -> anyhow::Result<(u16, Value)> {
    let res = s
        .http()
        .post(format!(
            "{}/api/v1/chat/conversations/{conv}/attachments{query}",
            s.edge
        ))
        .bearer_auth(&user.token)
        .header("content-type", content_type)
        .body(bytes)
        .send()
        .await?;
    let status = res.status().as_u16();
    let text = res.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// Rows PostgreSQL holds in `attachments` for `user` as uploader.
pub async fn uploads_by(s: &Stack, user: &User) -> anyhow::Result<i64> {
    let db = s.pool.get().await?;
    Ok(db
        .query_one(
            "SELECT count(*) FROM attachments WHERE uploader_id = $1",
            &[&user.id],
        )
        .await?
        .get(0))
}

/// Whether PostgreSQL still holds attachment `id`, and the message it is
/// linked to.
pub async fn attachment_row(
    s: &Stack,
    id: uuid::Uuid,
) -> anyhow::Result<Option<Option<uuid::Uuid>>> {
    let db = s.pool.get().await?;
    let row = db
        .query_opt("SELECT message_id FROM attachments WHERE id = $1", &[&id])
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Polls `check` every 200 ms until it answers `Some`, failing after
/// `timeout` with `what` and the last `None`'s context.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(done) = check().await? {
            return Ok(done);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
