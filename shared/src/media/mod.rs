//! Attachments: what the edge, the origin and the tests agree on.
//!
//! - [`sniff`]: the type comes from the first bytes, never from the client's
//!   `Content-Type` (which only chooses between two readings of the same
//!   container, such as audio or video WebM).
//! - [`Inspector`]: a streaming structural check of an image as it passes
//!   through the edge, cheap enough for a Worker's CPU budget: it finds the
//!   dimensions and refuses a truncated file (422) without decoding pixels.
//!   Decoding, re-encoding and thumbnails happen at the origin, off the
//!   request path.
//! - [`Signer`]: short-lived HMAC-signed download paths, so an `<img>` tag
//!   (which cannot send a bearer token) can fetch an attachment.
//! - [`AttachmentMeta`] / [`AttachmentView`]: an attachment as stored and as
//!   clients see it.
//!
//! Nothing here does I/O or reads a clock: callers pass `now` in.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use crate::protocol::{MessageView, ServerFrame};

/// What an attachment is, for the ChatBox's rendering and the size limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum MediaKind {
    Image,
    Video,
    Audio,
    /// A document shown as a file card (PDF).
    File,
}

impl MediaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Image => "image",
            MediaKind::Video => "video",
            MediaKind::Audio => "audio",
            MediaKind::File => "file",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "image" => Some(MediaKind::Image),
            "video" => Some(MediaKind::Video),
            "audio" => Some(MediaKind::Audio),
            "file" => Some(MediaKind::File),
            _ => None,
        }
    }
}

/// Where an attachment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum AttachmentStatus {
    /// Stored; the origin has not finished with it. An image's full-size
    /// download answers 409 `processing` until then (only the re-encoded
    /// copy, without EXIF, is ever served).
    Processing,
    /// Everything this kind gets (thumbnail, dimensions, duration) is there.
    Ready,
    /// The origin could not decode it. Nothing of it is served but the
    /// original of a non-image.
    Failed,
}

/// The stored copies of an attachment in the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// What was uploaded. Served for video, audio and files; never for an
    /// image (it may carry EXIF location data).
    Original,
    /// An image re-encoded by the origin (EXIF gone, orientation applied).
    Full,
    /// A small JPEG or PNG for lists and the gallery.
    Thumb,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Original => "original",
            Variant::Full => "full",
            Variant::Thumb => "thumb",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "original" => Some(Variant::Original),
            "full" => Some(Variant::Full),
            "thumb" => Some(Variant::Thumb),
            _ => None,
        }
    }

    /// The object key in the bucket. Every copy of one attachment shares the
    /// prefix [`object_prefix`], so cleanup removes them together.
    pub fn key(self, id: Uuid) -> String {
        format!("{}{}", object_prefix(id), self.as_str())
    }
}

/// The bucket prefix of every copy of attachment `id`.
pub fn object_prefix(id: Uuid) -> String {
    format!("att/{id}/")
}

/// An attachment as the room, the outbox and PostgreSQL hold it: no URLs
/// (they are minted per read, and expire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AttachmentMeta {
    pub id: Uuid,
    pub conversation_id: i64,
    pub uploader_id: i64,
    pub kind: MediaKind,
    /// The type served for [`AttachmentMeta::url`]'s copy.
    pub mime: String,
    /// Bytes of the uploaded original.
    pub size: i64,
    /// The file name the uploader gave (sanitized), for file cards and
    /// downloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
    pub status: AttachmentStatus,
    /// A thumbnail exists (images, once processed).
    #[serde(default)]
    pub has_thumbnail: bool,
}

impl AttachmentMeta {
    /// The copy a member downloads: the re-encoded one for an image.
    pub fn main_variant(&self) -> Variant {
        match self.kind {
            MediaKind::Image => Variant::Full,
            _ => Variant::Original,
        }
    }
}

/// An attachment as clients see it: the metadata with signed download
/// paths (relative to the edge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AttachmentView {
    #[serde(flatten)]
    pub meta: AttachmentMeta,
    /// Signed path of the full copy; absent while an image is processing
    /// or when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail_url: Option<String>,
}

impl AttachmentView {
    /// The view without URLs (they are added by [`Signer::sign_frame`] at
    /// the moment a frame leaves).
    pub fn unsigned(meta: AttachmentMeta) -> Self {
        Self {
            meta,
            url: None,
            thumbnail_url: None,
        }
    }
}

/// Why an upload or a download was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    #[error("this type of file is not accepted (images, video, voice and PDF are)")]
    Unsupported,
    #[error("the file is damaged or truncated: {0}")]
    Corrupt(&'static str),
    #[error("the file is larger than {max} bytes")]
    TooLarge { max: i64 },
    #[error("the download link has expired")]
    Expired,
    #[error("the download link is not valid")]
    BadSignature,
}

impl MediaError {
    pub fn code(&self) -> &'static str {
        match self {
            MediaError::Unsupported => "unsupported_media_type",
            MediaError::Corrupt(_) => "corrupt_media",
            MediaError::TooLarge { .. } => "too_large",
            MediaError::Expired => "link_expired",
            MediaError::BadSignature => "bad_signature",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            MediaError::Unsupported => 415,
            MediaError::Corrupt(_) => 422,
            MediaError::TooLarge { .. } => 413,
            MediaError::Expired | MediaError::BadSignature => 403,
        }
    }
}

// ---- sniffing ---------------------------------------------------------------

/// Bytes [`sniff`] looks at.
pub const SNIFF_BYTES: usize = 16;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sniffed {
    pub kind: MediaKind,
    pub mime: &'static str,
}

/// Decides an upload's type from its first [`SNIFF_BYTES`] (fewer only if
/// the file is that short). `declared` (the client's `Content-Type`) only
/// chooses between the audio and the video reading of a WebM or MP4
/// container: both are served as that container's type, so a lie gains
/// nothing.
pub fn sniff(head: &[u8], declared: Option<&str>) -> Result<Sniffed, MediaError> {
    let audio = declared.is_some_and(|d| d.trim().to_ascii_lowercase().starts_with("audio/"));
    let s = |kind, mime| Ok(Sniffed { kind, mime });
    if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return s(MediaKind::Image, "image/jpeg");
    }
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        return s(MediaKind::Image, "image/png");
    }
    if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        return s(MediaKind::Image, "image/gif");
    }
    if head.len() >= 12 && &head[0..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        return s(MediaKind::Image, "image/webp");
    }
    if head.starts_with(b"%PDF-") {
        return s(MediaKind::File, "application/pdf");
    }
    if head.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) {
        // EBML: WebM (Matroska's DocType sits a few bytes further; a
        // Matroska file plays in the same elements, so it is taken as is).
        return if audio {
            s(MediaKind::Audio, "audio/webm")
        } else {
            s(MediaKind::Video, "video/webm")
        };
    }
    if head.len() >= 12 && &head[4..8] == b"ftyp" {
        let brand = &head[8..12];
        // Audio-only brands are audio whatever the client says.
        if audio || brand == b"M4A " || brand == b"M4B " {
            return s(MediaKind::Audio, "audio/mp4");
        }
        // HEIF/AVIF photos share the box format; browsers cannot show HEIC
        // and the origin cannot decode either, so they are refused rather
        // than stored as a "video" nobody can play.
        if matches!(
            brand,
            b"heic" | b"heix" | b"mif1" | b"msf1" | b"avif" | b"hevc"
        ) {
            return Err(MediaError::Unsupported);
        }
        return s(MediaKind::Video, "video/mp4");
    }
    Err(MediaError::Unsupported)
}

// ---- streaming structural check -------------------------------------------

/// Dimensions an [`Inspector`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inspected {
    pub width: Option<i32>,
    pub height: Option<i32>,
}

/// Walks an image's structure chunk by chunk as it streams through: no
/// buffering beyond a few bytes and no pixel decoding, so it costs a
/// Worker almost nothing per megabyte. It finds the dimensions and proves
/// the file is complete:
/// - JPEG: the marker segments up to the end-of-image marker (bytes after
///   it, such as a phone's motion-photo video, are allowed); dimensions
///   from the first start-of-frame segment.
/// - PNG: every chunk up to `IEND`; dimensions from `IHDR`.
/// - GIF: dimensions from the screen descriptor; the last byte must be the
///   trailer.
/// - WebP: the RIFF length must be there; dimensions from the first chunk.
///
/// The origin's full decode later catches what a structural walk cannot
/// (corrupt compressed data): that attachment becomes `failed`.
#[derive(Debug)]
pub struct Inspector {
    format: Format,
    /// Bytes seen so far.
    total: u64,
    /// The first bytes, for the fixed-position headers (PNG/GIF/WebP).
    head: Vec<u8>,
    last: Option<u8>,
    jpeg: Jpeg,
    /// A start-of-frame segment's first bytes.
    sof: [u8; 5],
    png: Png,
    found: Inspected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Jpeg,
    Png,
    Gif,
    Webp,
    /// Not an image: nothing to check.
    Other,
}

const HEAD_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Jpeg {
    /// Expecting 0xFF starting a marker.
    Marker,
    /// Saw 0xFF; the next byte names the marker (0xFF is fill).
    Code,
    /// Segment length, first (high) byte; `code` is the marker.
    LenHi {
        code: u8,
    },
    LenLo {
        code: u8,
        hi: u8,
    },
    /// Inside a segment's payload: `left` bytes to skip, `pos` read.
    Payload {
        code: u8,
        left: u32,
        pos: u32,
    },
    /// Compressed scan data: markers inside are 0xFF followed by 0x00
    /// (stuffing) or a restart marker; anything else ends the scan.
    Scan,
    ScanFf,
    /// End of image seen.
    Done,
    Broken(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Png {
    /// Skipping the 8-byte signature: bytes left.
    Signature(u8),
    /// Reading a chunk header (length and type): bytes read so far.
    Header { got: u8, buf: [u8; 8] },
    /// Skipping a chunk's data and CRC.
    Body { left: u64 },
    /// `IEND` seen.
    Done,
}

impl Inspector {
    pub fn new(mime: &str) -> Self {
        let format = match mime {
            "image/jpeg" => Format::Jpeg,
            "image/png" => Format::Png,
            "image/gif" => Format::Gif,
            "image/webp" => Format::Webp,
            _ => Format::Other,
        };
        Self {
            format,
            total: 0,
            head: Vec::with_capacity(HEAD_BYTES),
            last: None,
            jpeg: Jpeg::Marker,
            sof: [0; 5],
            png: Png::Signature(8),
            found: Inspected::default(),
        }
    }

    /// Feeds the next bytes of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        if self.head.len() < HEAD_BYTES {
            let take = (HEAD_BYTES - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        self.total += chunk.len() as u64;
        self.last = chunk.last().copied();
        match self.format {
            Format::Jpeg => {
                for &b in chunk {
                    self.jpeg_byte(b);
                    if matches!(self.jpeg, Jpeg::Done | Jpeg::Broken(_)) {
                        break;
                    }
                }
            }
            Format::Png => self.png_bytes(chunk),
            Format::Gif | Format::Webp | Format::Other => {}
        }
    }

    fn jpeg_byte(&mut self, b: u8) {
        self.jpeg = match self.jpeg {
            Jpeg::Marker => {
                if b == 0xFF {
                    Jpeg::Code
                } else {
                    Jpeg::Broken("a JPEG segment does not start with a marker")
                }
            }
            Jpeg::Code => match b {
                0xFF => Jpeg::Code,
                0xD8 | 0x01 | 0xD0..=0xD7 => Jpeg::Marker,
                0xD9 => Jpeg::Done,
                0x00 => Jpeg::Broken("an invalid JPEG marker"),
                code => Jpeg::LenHi { code },
            },
            Jpeg::LenHi { code } => Jpeg::LenLo { code, hi: b },
            Jpeg::LenLo { code, hi } => {
                let len = u32::from(u16::from_be_bytes([hi, b]));
                if len < 2 {
                    Jpeg::Broken("a JPEG segment with an impossible length")
                } else if len == 2 {
                    self.after_segment(code)
                } else {
                    Jpeg::Payload {
                        code,
                        left: len - 2,
                        pos: 0,
                    }
                }
            }
            Jpeg::Payload { code, left, pos } => {
                // Start of frame (SOF0..SOF15 but DHT, JPG and DAC):
                // precision, then height and width, big-endian.
                let sof = matches!(code, 0xC0..=0xCF) && !matches!(code, 0xC4 | 0xC8 | 0xCC);
                if sof && self.found.width.is_none() {
                    self.sof_byte(pos, b);
                }
                if left == 1 {
                    self.after_segment(code)
                } else {
                    Jpeg::Payload {
                        code,
                        left: left - 1,
                        pos: pos + 1,
                    }
                }
            }
            Jpeg::Scan => {
                if b == 0xFF {
                    Jpeg::ScanFf
                } else {
                    Jpeg::Scan
                }
            }
            Jpeg::ScanFf => match b {
                0x00 | 0xD0..=0xD7 => Jpeg::Scan,
                0xFF => Jpeg::ScanFf,
                0xD9 => Jpeg::Done,
                code => Jpeg::LenHi { code },
            },
            done @ (Jpeg::Done | Jpeg::Broken(_)) => done,
        };
    }

    /// Precision at payload byte 0, then height and width, big-endian.
    fn sof_byte(&mut self, pos: u32, b: u8) {
        if let Some(slot) = usize::try_from(pos).ok().and_then(|p| self.sof.get_mut(p)) {
            *slot = b;
        }
        if pos == 4 {
            let [_, h1, h0, w1, w0] = self.sof;
            self.found = Inspected {
                width: Some(i32::from(u16::from_be_bytes([w1, w0]))),
                height: Some(i32::from(u16::from_be_bytes([h1, h0]))),
            };
        }
    }

    fn after_segment(&self, code: u8) -> Jpeg {
        if code == 0xDA {
            Jpeg::Scan
        } else {
            Jpeg::Marker
        }
    }

    fn png_bytes(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            match &mut self.png {
                Png::Signature(left) => {
                    let take = usize::from(*left).min(chunk.len());
                    *left -= take as u8;
                    chunk = &chunk[take..];
                    if *left == 0 {
                        self.png = Png::Header {
                            got: 0,
                            buf: [0; 8],
                        };
                    }
                }
                Png::Header { got, buf } => {
                    let take = (8 - usize::from(*got)).min(chunk.len());
                    let start = usize::from(*got);
                    buf[start..start + take].copy_from_slice(&chunk[..take]);
                    *got += take as u8;
                    chunk = &chunk[take..];
                    if *got == 8 {
                        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                        let kind = [buf[4], buf[5], buf[6], buf[7]];
                        if &kind == b"IEND" {
                            self.png = Png::Done;
                        } else {
                            self.png = Png::Body {
                                left: u64::from(len) + 4,
                            };
                        }
                    }
                }
                Png::Body { left } => {
                    let take = (*left).min(chunk.len() as u64);
                    *left -= take;
                    chunk = &chunk[take as usize..];
                    if *left == 0 {
                        self.png = Png::Header {
                            got: 0,
                            buf: [0; 8],
                        };
                    }
                }
                Png::Done => return,
            }
        }
    }

    fn be32(&self, at: usize) -> Option<u32> {
        let b = self.head.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn le16(&self, at: usize) -> Option<u16> {
        let b = self.head.get(at..at + 2)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }

    fn le24(&self, at: usize) -> Option<u32> {
        let b = self.head.get(at..at + 3)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], 0]))
    }

    /// The verdict once the stream has ended.
    pub fn finish(self) -> Result<Inspected, MediaError> {
        let dims = |w: u32, h: u32| -> Result<Inspected, MediaError> {
            let (Ok(w), Ok(h)) = (i32::try_from(w), i32::try_from(h)) else {
                return Err(MediaError::Corrupt("impossible dimensions"));
            };
            if w == 0 || h == 0 {
                return Err(MediaError::Corrupt("an image with no pixels"));
            }
            Ok(Inspected {
                width: Some(w),
                height: Some(h),
            })
        };
        match self.format {
            Format::Other => Ok(Inspected::default()),
            Format::Jpeg => match self.jpeg {
                Jpeg::Done => match (self.found.width, self.found.height) {
                    (Some(w), Some(h)) if w > 0 && h > 0 => Ok(Inspected {
                        width: Some(w),
                        height: Some(h),
                    }),
                    _ => Err(MediaError::Corrupt("a JPEG without a frame header")),
                },
                Jpeg::Broken(why) => Err(MediaError::Corrupt(why)),
                _ => Err(MediaError::Corrupt("the JPEG ends before its last marker")),
            },
            Format::Png => {
                if self.png != Png::Done {
                    return Err(MediaError::Corrupt("the PNG ends before its IEND chunk"));
                }
                if self.head.get(12..16) != Some(b"IHDR".as_slice()) {
                    return Err(MediaError::Corrupt("a PNG without IHDR"));
                }
                match (self.be32(16), self.be32(20)) {
                    (Some(w), Some(h)) => dims(w, h),
                    _ => Err(MediaError::Corrupt("a PNG without IHDR")),
                }
            }
            Format::Gif => {
                if self.last != Some(0x3B) || self.total < 14 {
                    return Err(MediaError::Corrupt("the GIF ends before its trailer"));
                }
                match (self.le16(6), self.le16(8)) {
                    (Some(w), Some(h)) => dims(u32::from(w), u32::from(h)),
                    _ => Err(MediaError::Corrupt("a GIF without a screen descriptor")),
                }
            }
            Format::Webp => {
                let riff = self
                    .head
                    .get(4..8)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                match riff {
                    Some(len) if self.total >= u64::from(len) + 8 => {}
                    _ => return Err(MediaError::Corrupt("the WebP ends before its RIFF length")),
                }
                match self.head.get(12..16) {
                    // Lossy: a key frame's 14-bit sizes after the start code.
                    Some(b"VP8 ") => match (self.le16(26), self.le16(28)) {
                        (Some(w), Some(h)) => dims(u32::from(w & 0x3FFF), u32::from(h & 0x3FFF)),
                        _ => Err(MediaError::Corrupt("a WebP without a frame header")),
                    },
                    // Lossless: 14-bit sizes minus one, packed after 0x2F.
                    Some(b"VP8L") => match self.be32(21).map(u32::swap_bytes) {
                        Some(bits) => dims((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1),
                        None => Err(MediaError::Corrupt("a WebP without a frame header")),
                    },
                    // Extended: canvas size minus one, 24-bit.
                    Some(b"VP8X") => match (self.le24(24), self.le24(27)) {
                        (Some(w), Some(h)) => dims(w + 1, h + 1),
                        _ => Err(MediaError::Corrupt("a WebP without a canvas size")),
                    },
                    _ => Err(MediaError::Corrupt("a WebP without a known first chunk")),
                }
            }
        }
    }
}

// ---- signed download paths -------------------------------------------------

type HmacSha256 = Hmac<Sha256>;

/// Longest a signed path lives. Paths are minted to expire on a 10-minute
/// grid between 50 and 60 minutes ahead, so the same attachment gets the
/// same URL for ten minutes and the browser's cache works.
pub const URL_TTL_SECS: i64 = 3_600;
const URL_GRID_SECS: i64 = 600;
/// How far the origin's clock may run ahead of the edge's.
const CLOCK_SKEW_SECS: i64 = 60;

/// Mints and checks download paths. The key is derived from the service
/// secret the edge and the origin already share, with a label of its own,
/// so a signature can never stand in for anything else.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    pub fn new(service_secret: &[u8]) -> Self {
        let mut mac = keyed(service_secret);
        mac.update(b"vibe-chat media url v1");
        Self {
            key: mac.finalize().into_bytes().to_vec(),
        }
    }

    fn mac(&self, id: Uuid, variant: Variant, exp: i64) -> HmacSha256 {
        let mut mac = keyed(&self.key);
        mac.update(format!("{id}/{}/{exp}", variant.as_str()).as_bytes());
        mac
    }

    /// When a path minted at `now_secs` expires.
    pub fn expiry(now_secs: i64) -> i64 {
        (now_secs / URL_GRID_SECS) * URL_GRID_SECS + URL_TTL_SECS
    }

    /// `/api/v1/media/{id}/{variant}?exp=…&sig=…`
    pub fn path(&self, id: Uuid, variant: Variant, now_secs: i64) -> String {
        let exp = Self::expiry(now_secs);
        let sig = hex(&self.mac(id, variant, exp).finalize().into_bytes());
        format!(
            "/api/v1/media/{id}/{}?exp={exp}&sig={sig}",
            variant.as_str()
        )
    }

    /// Checks a presented signature (constant time) and its expiry.
    pub fn verify(
        &self,
        id: Uuid,
        variant: Variant,
        exp: i64,
        sig: &str,
        now_secs: i64,
    ) -> Result<(), MediaError> {
        let Some(raw) = unhex(sig) else {
            return Err(MediaError::BadSignature);
        };
        self.mac(id, variant, exp)
            .verify_slice(&raw)
            .map_err(|_| MediaError::BadSignature)?;
        // A validly signed expiry beyond the longest lifetime (give or take
        // the clock skew between the edge and the origin, which mint the
        // same links) was not minted by this code: refused as well.
        if exp <= now_secs || exp > now_secs + URL_TTL_SECS + CLOCK_SKEW_SECS {
            return Err(MediaError::Expired);
        }
        Ok(())
    }

    /// The view of `meta` with its paths signed at `now_secs`.
    pub fn view(&self, meta: AttachmentMeta, now_secs: i64) -> AttachmentView {
        let url = match (meta.kind, meta.status) {
            (MediaKind::Image, AttachmentStatus::Ready) => {
                Some(self.path(meta.id, Variant::Full, now_secs))
            }
            (MediaKind::Image, _) => None,
            _ => Some(self.path(meta.id, Variant::Original, now_secs)),
        };
        let thumbnail_url = meta
            .has_thumbnail
            .then(|| self.path(meta.id, Variant::Thumb, now_secs));
        AttachmentView {
            meta,
            url,
            thumbnail_url,
        }
    }

    /// Signs a message's attachment links.
    pub fn sign_message(&self, message: &mut MessageView, now_secs: i64) {
        for a in &mut message.attachments {
            *a = self.view(a.meta.clone(), now_secs);
        }
    }

    /// Signs every attachment in a frame that carries some; `None` when the
    /// frame has none (the caller sends it as it is).
    pub fn sign_frame(&self, frame: &ServerFrame, now_secs: i64) -> Option<ServerFrame> {
        match frame {
            ServerFrame::Message { message } if !message.attachments.is_empty() => {
                let mut message = message.clone();
                self.sign_message(&mut message, now_secs);
                Some(ServerFrame::Message { message })
            }
            ServerFrame::AttachmentUpdated { attachment } => Some(ServerFrame::AttachmentUpdated {
                attachment: self.view(attachment.meta.clone(), now_secs),
            }),
            _ => None,
        }
    }
}

/// HMAC-SHA256 under `key`. HMAC takes keys of any length (long ones are
/// hashed), so the error arm is unreachable; it falls back to an all-zero
/// key rather than panic.
fn keyed(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).unwrap_or_else(|_| HmacSha256::new(&Default::default()))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xF)]));
    }
    out
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// A file name fit for a `Content-Disposition` header and a file card:
/// the last path component, printable ASCII letters, digits and `._- `
/// kept (others become `_`), at most 100 characters.
pub fn sanitize_name(raw: &str) -> Option<String> {
    let last = raw.rsplit(['/', '\\']).next().unwrap_or(raw).trim();
    let clean: String = last
        .chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ' ') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let clean = clean.trim_matches(|c| c == '.' || c == ' ').to_owned();
    (!clean.is_empty()).then_some(clean)
}

/// What a `Range` header asks of an object of `size` bytes: `Ok(None)` to
/// serve it whole (no header, or a form this server ignores, as RFC 9110
/// allows: several ranges, other units), `Ok(Some((first, last)))`
/// inclusive, or `Err(())` when nothing of it can be satisfied (416).
#[allow(clippy::result_unit_err)]
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let parsed = if first.is_empty() {
        // The last N bytes.
        let Ok(n) = last.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || size == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let Ok(a) = first.parse::<u64>() else {
            return Ok(None);
        };
        let b = if last.is_empty() {
            size.saturating_sub(1)
        } else {
            match last.parse::<u64>() {
                Ok(b) if b >= a => b.min(size.saturating_sub(1)),
                _ => return Ok(None),
            }
        };
        if a >= size {
            return Err(());
        }
        (a, b)
    };
    Ok(Some(parsed))
}

/// Most attachments on one message.
pub const MAX_ATTACHMENTS_PER_MESSAGE: usize = 10;

#[cfg(test)]
mod tests;
