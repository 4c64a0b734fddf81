//! Attachments at the origin: the record of every object in the edge's
//! bucket, the limits, and the work that cannot run in a Worker.
//!
//! - Reservations and commits come from the edge over the internal API
//!   ([`crate::http::media`]): the edge reserves before it streams a byte
//!   into R2 (membership, per-kind size limit and daily quota are checked
//!   here), and commits once the object is stored.
//! - [`worker`] decodes what was committed, off the request path: images
//!   are re-encoded (EXIF gone, orientation applied, [`image`]) with a
//!   thumbnail; video and audio get their dimensions and duration from the
//!   container ([`container`]). Then the room hears of the result.
//! - The ingest links attachments to their message in the transaction that
//!   stores it ([`crate::ingest`]), and every read of a message carries its
//!   attachments with freshly signed download paths ([`attachments_of`]).
//! - [`worker::cleanup`] reaps uploads never sent, through the room.

pub mod container;
pub mod image;
pub mod worker;

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::GenericClient;
use shared::media::{AttachmentMeta, AttachmentStatus, AttachmentView, MediaKind, Signer};
use tokio::sync::Notify;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::config::MediaConfig;
use crate::error::{ApiError, ApiResult};
use crate::metrics::Timed;

/// What the media routes and tasks share.
#[derive(Debug)]
pub struct Media {
    pub config: MediaConfig,
    /// Mints the download paths every read carries.
    pub signer: Signer,
    /// Wakes the processing worker when an attachment is committed.
    pub wake: Notify,
    /// The edge's internal media routes (`EDGE_URL`); without it nothing is
    /// processed or reaped.
    pub edge: Option<worker::EdgeMedia>,
}

impl Media {
    pub fn new(config: MediaConfig, edge_url: Option<&str>, service_secret: &[u8]) -> Arc<Self> {
        Arc::new(Self {
            config,
            signer: Signer::new(service_secret),
            wake: Notify::new(),
            edge: edge_url.map(|base| worker::EdgeMedia::new(base, service_secret)),
        })
    }

    /// `meta` as a client sees it, its paths signed now.
    pub fn view(&self, meta: AttachmentMeta) -> AttachmentView {
        self.signer.view(meta, crate::auth::now_unix())
    }
}

/// Columns every attachment query selects (table alias `a`), in the order
/// [`meta_from_row`] reads them from `offset`.
pub const ATTACHMENT_COLUMNS: &str = "a.id, a.conversation_id, a.uploader_id, a.kind, a.mime, \
     a.size, a.name, a.width, a.height, a.duration_ms, a.state, a.has_thumbnail";

/// How many columns [`ATTACHMENT_COLUMNS`] has.
pub const ATTACHMENT_COLUMN_COUNT: usize = 12;

/// The stored state as clients see it: an upload not yet committed is
/// still being processed as far as anyone can tell.
pub fn status_of(state: &str) -> AttachmentStatus {
    match state {
        "ready" => AttachmentStatus::Ready,
        "failed" => AttachmentStatus::Failed,
        _ => AttachmentStatus::Processing,
    }
}

/// An attachment row (selected with [`ATTACHMENT_COLUMNS`] from column
/// `offset`).
pub fn meta_from_row(row: &Row, offset: usize) -> ApiResult<AttachmentMeta> {
    let kind: &str = row.get(offset + 3);
    let kind = MediaKind::parse(kind).ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!("unknown attachment kind {kind:?} stored"))
    })?;
    Ok(AttachmentMeta {
        id: row.get(offset),
        conversation_id: row.get(offset + 1),
        uploader_id: row.get(offset + 2),
        kind,
        mime: row.get(offset + 4),
        size: row.get(offset + 5),
        name: row.get(offset + 6),
        width: row.get(offset + 7),
        height: row.get(offset + 8),
        duration_ms: row.get(offset + 9),
        status: status_of(row.get(offset + 10)),
        has_thumbnail: row.get(offset + 11),
    })
}

/// The attachments of `message_ids`, per message in the sender's order:
/// one query (the message index) for a whole page of messages.
pub async fn attachments_of(
    client: &impl GenericClient,
    message_ids: &[Uuid],
) -> ApiResult<HashMap<Uuid, Vec<AttachmentMeta>>> {
    let mut out: HashMap<Uuid, Vec<AttachmentMeta>> = HashMap::new();
    if message_ids.is_empty() {
        return Ok(out);
    }
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {ATTACHMENT_COLUMNS}, a.message_id FROM attachments a
             WHERE a.message_id = ANY($1::uuid[])
             ORDER BY a.message_id, a.position"
        ))
        .await?;
    for row in client
        .query(&stmt, &[&message_ids])
        .timed("message_attachments")
        .await?
    {
        let message_id: Uuid = row.get(ATTACHMENT_COLUMN_COUNT);
        out.entry(message_id)
            .or_default()
            .push(meta_from_row(&row, 0)?);
    }
    Ok(out)
}

/// Why a reservation is refused before touching the database, or `None`.
pub fn check_size(config: &MediaConfig, kind: MediaKind, size: i64) -> Option<ApiError> {
    if size <= 0 {
        return Some(ApiError::BadRequest {
            code: "invalid_size",
            message: "size must be a positive number of bytes".to_owned(),
        });
    }
    let max = config.max_bytes(kind);
    (size > max).then(|| {
        ApiError::TooLarge(format!(
            "{} attachments are limited to {} ({max} bytes)",
            kind.as_str(),
            human_bytes(max)
        ))
    })
}

/// Why the quota refuses `size` more bytes after `used` in the last 24
/// hours, or `None`.
pub fn check_quota(config: &MediaConfig, used: i64, size: i64) -> Option<ApiError> {
    let quota = config.daily_quota_bytes;
    (used.saturating_add(size) > quota).then(|| {
        ApiError::QuotaExceeded(format!(
            "daily upload quota of {} ({quota} bytes) reached: {} used in the last 24 hours",
            human_bytes(quota),
            human_bytes(used)
        ))
    })
}

/// "10 MiB", "1.5 KiB", "12 bytes".
pub fn human_bytes(n: i64) -> String {
    const UNITS: [(&str, i64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size {
            let whole = n / size;
            let tenth = (n % size) * 10 / size;
            return if tenth == 0 {
                format!("{whole} {unit}")
            } else {
                format!("{whole}.{tenth} {unit}")
            };
        }
    }
    format!("{n} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked_per_kind_and_named_in_the_message() {
        let c = MediaConfig::default();
        assert!(check_size(&c, MediaKind::Image, 10 * 1024 * 1024).is_none());
        let err = check_size(&c, MediaKind::Image, 10 * 1024 * 1024 + 1).map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("image attachments are limited to 10 MiB (10485760 bytes)")
        );
        assert!(check_size(&c, MediaKind::Video, 50 * 1024 * 1024).is_none());
        assert!(matches!(
            check_size(&c, MediaKind::File, 0),
            Some(ApiError::BadRequest { .. })
        ));
        assert!(matches!(
            check_size(&c, MediaKind::Audio, -5),
            Some(ApiError::BadRequest { .. })
        ));
    }

    #[test]
    fn the_quota_counts_what_was_used_plus_the_new_upload() {
        let c = MediaConfig {
            daily_quota_bytes: 1000,
            ..MediaConfig::default()
        };
        assert!(check_quota(&c, 0, 1000).is_none());
        assert!(check_quota(&c, 600, 400).is_none());
        let err = check_quota(&c, 600, 401);
        assert!(matches!(err, Some(ApiError::QuotaExceeded(_))));
        assert_eq!(err.map(|e| e.code()), Some("quota_exceeded"));
        assert!(check_quota(&c, i64::MAX, 1).is_some());
    }

    #[test]
    fn byte_counts_read_like_people_write_them() {
        assert_eq!(human_bytes(12), "12 bytes");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(500 * 1024 * 1024), "500 MiB");
    }

    #[test]
    fn an_uncommitted_upload_reads_as_processing() {
        assert_eq!(status_of("uploading"), AttachmentStatus::Processing);
        assert_eq!(status_of("processing"), AttachmentStatus::Processing);
        assert_eq!(status_of("ready"), AttachmentStatus::Ready);
        assert_eq!(status_of("failed"), AttachmentStatus::Failed);
    }
}
