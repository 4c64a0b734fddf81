//! The processing worker and the cleanup: the media work that needs the
//! edge (the bytes are in its bucket) and more CPU than a Worker has.
//!
//! # Processing
//!
//! A commit makes an image, video or audio attachment due
//! (`next_attempt_at`). [`run`] leases due rows (`FOR UPDATE SKIP LOCKED`,
//! then `lease_until` and `next_attempt_at` moved [`LEASE`] ahead under a
//! claim token, committed at once, so a crashed worker's rows come due
//! again), and for each:
//!
//! 1. fetches the original from the edge (`GET
//!    {EDGE_URL}/api/v1/internal/media/{id}/original`; 404 → `failed`);
//! 2. an image is decoded and re-encoded on a blocking thread
//!    ([`super::image`]), the full copy and the thumbnail are `PUT` back
//!    (`…/full`, `…/thumb`); video and audio get their size and duration
//!    from the container ([`super::container`]), audio falling back to the
//!    recorder's hint;
//! 3. records the result (`ready` or `failed`) with `notified = false`;
//! 4. tells the room (`POST {EDGE_URL}/api/v1/internal/rooms/{conv}/attachments`,
//!    the [`AttachmentMeta`]), then sets `notified`.
//!
//! The result is stored before the notice, so a failed notice is retried on
//! its own, never the decoding. A network failure or an edge 5xx retries
//! after a backoff, up to [`MAX_ATTEMPTS`] (then the attachment is `failed`,
//! or the notice given up: every later read carries the state anyway). A
//! file that does not decode is `failed` at once: the same bytes fail the
//! same way.
//!
//! # Cleanup
//!
//! [`cleanup`] offers the room the uploads unsent for `MEDIA_UNSENT_TTL_SECS`
//! (`POST …/rooms/{conv}/attachments/reap`); the room deletes their objects
//! and answers which it let go, and exactly those rows are deleted. An id
//! the room reports attached stays: its message is on its way through the
//! outbox, and the ingest will link it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt as _;
use shared::media::{AttachmentMeta, AttachmentStatus, MediaKind, Variant};
use shared::protocol::internal::{ReapAttachments, Reaped, SERVICE_SECRET_HEADER};
use uuid::Uuid;

use super::{ATTACHMENT_COLUMNS, Media, container, meta_from_row};
use crate::metrics::Timed;

/// How long a lease lasts: past it, another worker may take the row.
pub const LEASE: Duration = Duration::from_secs(60);
/// Attempts (processing, then the notice, each) before giving up.
pub const MAX_ATTEMPTS: i32 = 6;
/// The first retry's delay, doubled per attempt, at most [`MAX_BACKOFF`].
const BACKOFF_BASE: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Longest sleep between looks at the queue.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Longest fetch of an original or upload of a copy (a 100 MiB video at
/// 2 MB/s; well inside the lease with the decoding).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(45);
/// Longest notice or reap call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Unsent uploads offered per cleanup round.
pub const REAP_BATCH: i64 = 500;
/// The longest a voice message's hint may claim.
const MAX_HINT_MS: i64 = 3_600_000;

/// Leases up to `$1` due rows for `$2` seconds under claim `$3`; followed
/// by `RETURNING` the columns the worker reads.
const CLAIM: &str = "UPDATE attachments a
     SET lease_until = now() + make_interval(secs => $2::float8),
         next_attempt_at = now() + make_interval(secs => $2::float8),
         claim = $3
     FROM (SELECT id FROM attachments
           WHERE next_attempt_at <= now()
           ORDER BY next_attempt_at
           LIMIT $1
           FOR UPDATE SKIP LOCKED) due
     WHERE a.id = due.id";

/// Seconds until the next row is due (NULL: nothing queued).
const NEXT_DUE: &str =
    "SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - now())::float8 FROM attachments
     WHERE next_attempt_at IS NOT NULL";

/// A leased row.
#[derive(Debug, Clone)]
struct Leased {
    meta: AttachmentMeta,
    /// Still to be processed (else only the notice is due).
    processing: bool,
    duration_hint_ms: Option<i64>,
    attempts: i32,
}

/// What processing found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: AttachmentStatus,
    pub mime: Option<String>,
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub duration_ms: Option<i64>,
    pub has_thumbnail: bool,
}

impl Outcome {
    fn failed() -> Self {
        Self {
            status: AttachmentStatus::Failed,
            mime: None,
            width: None,
            height: None,
            duration_ms: None,
            has_thumbnail: false,
        }
    }
}

/// A failure worth another attempt (the edge unreachable or erring).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Transient(String);

/// Calls to the edge's internal media routes.
#[derive(Clone)]
pub struct EdgeMedia {
    base: String,
    secret: String,
    client: reqwest::Client,
}

// The secret must never reach a log line.
impl std::fmt::Debug for EdgeMedia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeMedia")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl EdgeMedia {
    pub fn new(base: &str, service_secret: &[u8]) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            secret: String::from_utf8_lossy(service_secret).into_owned(),
            client: reqwest::Client::builder()
                .timeout(TRANSFER_TIMEOUT)
                .build()
                .unwrap_or_default(),
        }
    }

    fn media_url(&self, id: Uuid, variant: Variant) -> String {
        format!(
            "{}/api/v1/internal/media/{id}/{}",
            self.base,
            variant.as_str()
        )
    }

    /// The original's bytes; `Ok(None)` when the edge has no such object.
    async fn fetch_original(&self, id: Uuid, max: i64) -> Result<Option<Vec<u8>>, Transient> {
        let res = self
            .client
            .get(self.media_url(id, Variant::Original))
            .header(SERVICE_SECRET_HEADER, &self.secret)
            .send()
            .await
            .map_err(|e| Transient(format!("fetch the original: {e}")))?;
        match res.status().as_u16() {
            404 => return Ok(None),
            s if !(200..300).contains(&s) => {
                return Err(Transient(format!("the edge answered {s} for the original")));
            }
            _ => {}
        }
        // Never more than the reserved size (and a little): the edge
        // enforced it on upload, this keeps a bad answer from filling
        // memory.
        let cap = usize::try_from(max)
            .unwrap_or(usize::MAX)
            .saturating_add(64 * 1024);
        let mut res = res;
        let mut body = Vec::new();
        while let Some(chunk) = res
            .chunk()
            .await
            .map_err(|e| Transient(format!("read the original: {e}")))?
        {
            if body.len() + chunk.len() > cap {
                return Ok(Some(body));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Some(body))
    }

    async fn put(
        &self,
        id: Uuid,
        variant: Variant,
        mime: &str,
        bytes: Vec<u8>,
    ) -> Result<(), Transient> {
        let res = self
            .client
            .put(self.media_url(id, variant))
            .header(SERVICE_SECRET_HEADER, &self.secret)
            .header(reqwest::header::CONTENT_TYPE, mime)
            .body(bytes)
            .send()
            .await
            .map_err(|e| Transient(format!("store the {} copy: {e}", variant.as_str())))?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(Transient(format!(
                "the edge answered {} storing the {} copy",
                res.status().as_u16(),
                variant.as_str()
            )))
        }
    }

    /// Tells the room that `meta` changed.
    async fn notify(&self, meta: &AttachmentMeta) -> Result<(), Transient> {
        let url = format!(
            "{}/api/v1/internal/rooms/{}/attachments",
            self.base, meta.conversation_id
        );
        let res = self
            .client
            .post(url)
            .timeout(CALL_TIMEOUT)
            .header(SERVICE_SECRET_HEADER, &self.secret)
            .json(meta)
            .send()
            .await
            .map_err(|e| Transient(format!("notify the room: {e}")))?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(Transient(format!(
                "the room answered {} to the notice",
                res.status().as_u16()
            )))
        }
    }

    /// Offers `ids` to conversation `conversation_id`'s room for reaping;
    /// the ids it let go.
    async fn reap(&self, conversation_id: i64, ids: Vec<Uuid>) -> Result<Vec<Uuid>, Transient> {
        let url = format!(
            "{}/api/v1/internal/rooms/{conversation_id}/attachments/reap",
            self.base
        );
        let res = self
            .client
            .post(url)
            .timeout(CALL_TIMEOUT)
            .header(SERVICE_SECRET_HEADER, &self.secret)
            .json(&ReapAttachments { ids })
            .send()
            .await
            .map_err(|e| Transient(format!("reap: {e}")))?;
        if !res.status().is_success() {
            return Err(Transient(format!(
                "the room answered {} to the reap",
                res.status().as_u16()
            )));
        }
        let reaped: Reaped = res
            .json()
            .await
            .map_err(|e| Transient(format!("the reap answer: {e}")))?;
        Ok(reaped.reaped)
    }
}

/// The delay before attempt `attempts + 1`.
pub fn backoff(attempts: i32) -> Duration {
    let doublings = u32::try_from(attempts.clamp(0, 16)).unwrap_or(0);
    BACKOFF_BASE
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(MAX_BACKOFF)
}

/// Processes until the task is aborted. Does nothing without an edge.
pub async fn run(pool: Pool, media: Arc<Media>) {
    let Some(edge) = media.edge.clone() else {
        tracing::info!("EDGE_URL is not set: attachments are not processed");
        return;
    };
    let queue = crate::queue::Queue {
        name: "media",
        next_due_sql: NEXT_DUE,
        next_due_query: "media_next_due",
        idle: IDLE_POLL,
        full: media.config.process_concurrency,
    };
    crate::queue::drive(&pool, queue, &media.wake, None, || {
        round(&pool, &media, &edge)
    })
    .await;
}

/// Leases due rows and works them, `process_concurrency` at once; the
/// number leased.
async fn round(pool: &Pool, media: &Media, edge: &EdgeMedia) -> anyhow::Result<usize> {
    let token = Uuid::now_v7();
    let client = pool.get().await?;
    let limit = i64::try_from(media.config.process_concurrency).unwrap_or(1);
    let rows = client
        .query(
            &format!("{CLAIM} RETURNING {ATTACHMENT_COLUMNS}, a.duration_hint_ms, a.attempts"),
            &[&limit, &LEASE.as_secs_f64(), &token],
        )
        .timed("media_claim")
        .await?;
    drop(client);
    if rows.is_empty() {
        return Ok(0);
    }
    let mut leased = Vec::with_capacity(rows.len());
    for r in &rows {
        let meta = meta_from_row(r, 0).map_err(|e| anyhow::anyhow!("{e}"))?;
        let state: &str = r.get(10);
        leased.push(Leased {
            processing: state == "processing",
            meta,
            duration_hint_ms: r.get(12),
            attempts: r.get(13),
        });
    }
    futures::stream::iter(&leased)
        .for_each_concurrent(media.config.process_concurrency, |row| async move {
            if let Err(e) = work(pool, edge, token, row).await {
                // The lease runs out and the row is taken again.
                tracing::warn!(error = %crate::error::Chain(e.as_ref()), id = %row.meta.id, "media job not finished; it will be retried");
            }
        })
        .await;
    Ok(rows.len())
}

/// One leased row: process it if it still needs it, then tell the room.
async fn work(pool: &Pool, edge: &EdgeMedia, token: Uuid, row: &Leased) -> anyhow::Result<()> {
    let id = row.meta.id;
    let mut attempts = row.attempts;
    let meta = if row.processing {
        let outcome = match process(edge, row).await {
            Ok(outcome) => outcome,
            Err(Transient(why)) if attempts + 1 < MAX_ATTEMPTS => {
                tracing::warn!(%id, attempt = attempts + 1, why, "media processing failed; will retry");
                retry(pool, token, id, attempts).await?;
                return Ok(());
            }
            Err(Transient(why)) => {
                tracing::warn!(%id, why, "media processing failed for good");
                Outcome::failed()
            }
        };
        metrics::counter!("media_processed_total", "kind" => row.meta.kind.as_str(),
            "status" => if outcome.status == AttachmentStatus::Ready { "ready" } else { "failed" })
        .increment(1);
        attempts = 0;
        match record(pool, token, id, &outcome).await? {
            Some(meta) => meta,
            // The lease was lost to another worker, which finishes it.
            None => return Ok(()),
        }
    } else {
        row.meta.clone()
    };
    match edge.notify(&meta).await {
        Ok(()) => {
            pool.get()
                .await?
                .execute(
                    "UPDATE attachments SET notified = true, attempts = 0, next_attempt_at = NULL,
                         lease_until = NULL, claim = NULL
                     WHERE id = $1 AND claim = $2",
                    &[&id, &token],
                )
                .timed("media_notified")
                .await?;
        }
        Err(Transient(why)) if attempts + 1 < MAX_ATTEMPTS => {
            tracing::warn!(%id, attempt = attempts + 1, why, "attachment notice failed; will retry");
            retry(pool, token, id, attempts).await?;
        }
        Err(Transient(why)) => {
            // Every later read and replay carries the state; only the live
            // update is lost.
            tracing::warn!(%id, why, "attachment notice given up");
            pool.get()
                .await?
                .execute(
                    "UPDATE attachments SET next_attempt_at = NULL, lease_until = NULL, claim = NULL
                     WHERE id = $1 AND claim = $2",
                    &[&id, &token],
                )
                .timed("media_notice_given_up").await?;
        }
    }
    Ok(())
}

async fn retry(pool: &Pool, token: Uuid, id: Uuid, attempts: i32) -> anyhow::Result<()> {
    pool.get()
        .await?
        .execute(
            "UPDATE attachments SET attempts = attempts + 1,
                 next_attempt_at = now() + make_interval(secs => $3::float8),
                 lease_until = NULL, claim = NULL
             WHERE id = $1 AND claim = $2",
            &[&id, &token, &backoff(attempts).as_secs_f64()],
        )
        .timed("media_retry")
        .await?;
    Ok(())
}

/// Stores a processing result, the notice due now; the meta as stored, or
/// `None` when the lease is no longer this worker's.
async fn record(
    pool: &Pool,
    token: Uuid,
    id: Uuid,
    outcome: &Outcome,
) -> anyhow::Result<Option<AttachmentMeta>> {
    let state = match outcome.status {
        AttachmentStatus::Ready => "ready",
        AttachmentStatus::Failed | AttachmentStatus::Processing => "failed",
    };
    let row = pool
        .get()
        .await?
        .query_opt(
            &format!(
                "UPDATE attachments a SET state = $3, mime = COALESCE($4, a.mime),
                     width = COALESCE($5, a.width), height = COALESCE($6, a.height),
                     duration_ms = COALESCE($7, a.duration_ms), has_thumbnail = $8,
                     notified = false, attempts = 0, next_attempt_at = now()
                 WHERE a.id = $1 AND a.claim = $2 AND a.state = 'processing'
                 RETURNING {ATTACHMENT_COLUMNS}"
            ),
            &[
                &id,
                &token,
                &state,
                &outcome.mime,
                &outcome.width,
                &outcome.height,
                &outcome.duration_ms,
                &outcome.has_thumbnail,
            ],
        )
        .timed("media_processed")
        .await?;
    match row {
        Some(r) => Ok(Some(
            meta_from_row(&r, 0).map_err(|e| anyhow::anyhow!("{e}"))?,
        )),
        None => Ok(None),
    }
}

/// Fetches and processes one attachment.
async fn process(edge: &EdgeMedia, row: &Leased) -> Result<Outcome, Transient> {
    let meta = &row.meta;
    let Some(original) = edge.fetch_original(meta.id, meta.size).await? else {
        tracing::warn!(id = %meta.id, "the edge has no original; attachment failed");
        return Ok(Outcome::failed());
    };
    match meta.kind {
        MediaKind::Image => {
            let started = std::time::Instant::now();
            let done = tokio::task::spawn_blocking(move || super::image::process(&original))
                .await
                .map_err(|e| Transient(format!("the image task: {e}")))?;
            metrics::histogram!("media_image_seconds").record(started.elapsed().as_secs_f64());
            let done = match done {
                Ok(done) => done,
                Err(why) => {
                    tracing::info!(id = %meta.id, error = %why, "image not decodable; attachment failed");
                    return Ok(Outcome::failed());
                }
            };
            let mime = done.full.mime;
            edge.put(meta.id, Variant::Thumb, done.thumb.mime, done.thumb.bytes)
                .await?;
            edge.put(meta.id, Variant::Full, mime, done.full.bytes)
                .await?;
            Ok(Outcome {
                status: AttachmentStatus::Ready,
                mime: Some(mime.to_owned()),
                width: i32::try_from(done.width).ok(),
                height: i32::try_from(done.height).ok(),
                duration_ms: None,
                has_thumbnail: true,
            })
        }
        MediaKind::Video | MediaKind::Audio => {
            let facts = container::probe(&original);
            Ok(av_outcome(meta.kind, facts, row.duration_hint_ms))
        }
        // Files are ready at commit; nothing to do if one got here.
        MediaKind::File => Ok(Outcome {
            status: AttachmentStatus::Ready,
            mime: None,
            width: None,
            height: None,
            duration_ms: None,
            has_thumbnail: false,
        }),
    }
}

/// Video or audio: what the container says, the hint as the last resort
/// for a voice message's duration (clamped to an hour).
pub fn av_outcome(kind: MediaKind, facts: container::Facts, hint_ms: Option<i64>) -> Outcome {
    let duration_ms = facts.duration_ms.or_else(|| {
        (kind == MediaKind::Audio)
            .then_some(hint_ms)
            .flatten()
            .map(|h| h.clamp(0, MAX_HINT_MS))
    });
    let (width, height) = if kind == MediaKind::Video {
        (facts.width, facts.height)
    } else {
        (None, None)
    };
    Outcome {
        status: AttachmentStatus::Ready,
        mime: None,
        width,
        height,
        duration_ms,
        has_thumbnail: false,
    }
}

/// Reaps unsent uploads every `MEDIA_CLEANUP_INTERVAL_SECS` until aborted.
/// Does nothing without an edge (the objects are there).
pub async fn cleanup(pool: Pool, media: Arc<Media>) {
    let Some(edge) = media.edge.clone() else {
        tracing::info!("EDGE_URL is not set: unsent uploads are not reaped");
        return;
    };
    let mut every = tokio::time::interval(media.config.cleanup_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match reap_round(&pool, &edge, media.config.unsent_ttl).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(reaped = n, "reaped unsent uploads"),
            Err(e) => tracing::warn!(
                error = %crate::error::Chain(e.as_ref()),
                "media cleanup failed; next round retries"
            ),
        }
    }
}

/// One round: up to [`REAP_BATCH`] unsent uploads older than `ttl`,
/// offered per conversation; the number of rows deleted.
pub async fn reap_round(pool: &Pool, edge: &EdgeMedia, ttl: Duration) -> anyhow::Result<u64> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT id, conversation_id FROM attachments
             WHERE message_id IS NULL AND created_at < now() - make_interval(secs => $1::float8)
             ORDER BY created_at LIMIT $2",
            &[&ttl.as_secs_f64(), &REAP_BATCH],
        )
        .timed("media_reap_find")
        .await?;
    let mut by_room: BTreeMap<i64, Vec<Uuid>> = BTreeMap::new();
    for r in &rows {
        by_room.entry(r.get(1)).or_default().push(r.get(0));
    }
    let mut deleted = 0;
    for (conversation_id, ids) in by_room {
        match edge.reap(conversation_id, ids).await {
            Ok(reaped) if !reaped.is_empty() => {
                // Only the rows still unsent: one the ingest linked since
                // is kept (the room would not have let it go anyway).
                deleted += client
                    .execute(
                        "DELETE FROM attachments
                         WHERE id = ANY($1::uuid[]) AND conversation_id = $2 AND message_id IS NULL",
                        &[&reaped, &conversation_id],
                    )
                    .timed("media_reap_delete").await?;
            }
            Ok(_) => {}
            Err(Transient(why)) => {
                tracing::warn!(conversation_id, why, "reap refused; next round retries");
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(16));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn audio_falls_back_to_the_hint_clamped_and_video_never_does() {
        let none = container::Facts::default();
        assert_eq!(
            av_outcome(MediaKind::Audio, none, Some(4_200)).duration_ms,
            Some(4_200)
        );
        assert_eq!(
            av_outcome(MediaKind::Audio, none, Some(99_000_000)).duration_ms,
            Some(MAX_HINT_MS)
        );
        assert_eq!(
            av_outcome(MediaKind::Audio, none, Some(-5)).duration_ms,
            Some(0)
        );
        assert_eq!(
            av_outcome(MediaKind::Video, none, Some(4_200)).duration_ms,
            None
        );
        let found = container::Facts {
            width: Some(640),
            height: Some(360),
            duration_ms: Some(1_000),
        };
        let video = av_outcome(MediaKind::Video, found, None);
        assert_eq!(
            (video.width, video.height, video.duration_ms),
            (Some(640), Some(360), Some(1_000))
        );
        // Audio has no picture size, and the container wins over the hint.
        let audio = av_outcome(MediaKind::Audio, found, Some(9));
        assert_eq!((audio.width, audio.duration_ms), (None, Some(1_000)));
        assert_eq!(audio.status, AttachmentStatus::Ready);
    }
}
