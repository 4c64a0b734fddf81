//! Re-encoding photos: the only copy of an image that is ever served.
//!
//! An uploaded photo is decoded (with limits), turned upright by its EXIF
//! orientation, and encoded again from its pixels alone, so none of its
//! metadata survives: no GPS position, no camera serial, no EXIF at all.
//! The full copy keeps its size up to [`MAX_FULL_SIDE`] on the long side;
//! the thumbnail fits [`THUMB_SIDE`]². Both are JPEG, or PNG when the image
//! really is transparent. An animated GIF becomes its first frame (a still
//! PNG or JPEG): there is no animated encoder here, and the original is
//! never served for an image, because it may carry location data.
//!
//! Pure and synchronous (CPU-bound): run it on a blocking thread.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits, metadata::Orientation};

/// Longest side of the full copy.
pub const MAX_FULL_SIDE: u32 = 4096;
/// The thumbnail fits in a square of this side.
pub const THUMB_SIDE: u32 = 320;
/// Largest image decoded, in pixels (100 megapixels).
pub const MAX_PIXELS: u64 = 100_000_000;
/// Most memory the decoder may allocate (100 MP of RGBA is 400 MB).
pub const MAX_ALLOC: u64 = 512 * 1024 * 1024;
const FULL_JPEG_QUALITY: u8 = 85;
const THUMB_JPEG_QUALITY: u8 = 75;

/// One encoded copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub mime: &'static str,
}

/// What processing made of a photo.
#[derive(Debug, Clone)]
pub struct Processed {
    pub full: Encoded,
    pub thumb: Encoded,
    /// Of the full copy, upright.
    pub width: u32,
    pub height: u32,
}

/// Why a photo could not be processed. Not worth a retry: the same bytes
/// fail the same way.
#[derive(Debug, thiserror::Error)]
pub enum ImageFailure {
    #[error("not an image this server decodes: {0}")]
    Format(String),
    #[error("the image is {width}x{height}, over {MAX_PIXELS} pixels")]
    TooManyPixels { width: u32, height: u32 },
    #[error("the image could not be decoded: {0}")]
    Decode(String),
    #[error("the image could not be encoded: {0}")]
    Encode(String),
}

/// Decodes `data`, applies its orientation and re-encodes it (see the
/// module documentation).
pub fn process(data: &[u8]) -> Result<Processed, ImageFailure> {
    let mut reader = ImageReader::new(Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| ImageFailure::Format(e.to_string()))?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| ImageFailure::Format(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(ImageFailure::TooManyPixels { width, height });
    }
    // A damaged EXIF block is no reason to refuse the photo: it is dropped
    // anyway, and the photo stays as stored.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img =
        DynamicImage::from_decoder(decoder).map_err(|e| ImageFailure::Decode(e.to_string()))?;
    img.apply_orientation(orientation);

    let full = if img.width() > MAX_FULL_SIDE || img.height() > MAX_FULL_SIDE {
        img.resize(
            MAX_FULL_SIDE,
            MAX_FULL_SIDE,
            image::imageops::FilterType::CatmullRom,
        )
    } else {
        img
    };
    let alpha = is_transparent(&full);
    let thumb = if full.width() > THUMB_SIDE || full.height() > THUMB_SIDE {
        full.thumbnail(THUMB_SIDE, THUMB_SIDE)
    } else {
        full.clone()
    };
    Ok(Processed {
        width: full.width(),
        height: full.height(),
        full: encode(&full, alpha, FULL_JPEG_QUALITY)?,
        thumb: encode(&thumb, alpha, THUMB_JPEG_QUALITY)?,
    })
}

/// Whether any pixel is less than opaque (an alpha channel that is all
/// 255, common in screenshots, does not make a PNG worth its size).
fn is_transparent(img: &DynamicImage) -> bool {
    match img {
        DynamicImage::ImageLumaA8(i) => i.pixels().any(|p| p.0[1] < u8::MAX),
        DynamicImage::ImageRgba8(i) => i.pixels().any(|p| p.0[3] < u8::MAX),
        other if other.color().has_alpha() => other.to_rgba8().pixels().any(|p| p.0[3] < u8::MAX),
        _ => false,
    }
}

/// PNG when `alpha`, else JPEG at `quality`. Only pixels are written.
fn encode(img: &DynamicImage, alpha: bool, quality: u8) -> Result<Encoded, ImageFailure> {
    let mut bytes = Vec::new();
    let failed = |e: image::ImageError| ImageFailure::Encode(e.to_string());
    if alpha {
        let rgba = DynamicImage::ImageRgba8(img.to_rgba8());
        rgba.write_with_encoder(image::codecs::png::PngEncoder::new(&mut bytes))
            .map_err(failed)?;
        Ok(Encoded {
            bytes,
            mime: "image/png",
        })
    } else {
        let rgb = DynamicImage::ImageRgb8(img.to_rgb8());
        rgb.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut bytes, quality,
        ))
        .map_err(failed)?;
        Ok(Encoded {
            bytes,
            mime: "image/jpeg",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage, Rgba, RgbaImage};

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| {
            Rgb([(x * 5) as u8, (y * 7) as u8, ((x + y) * 3) as u8])
        });
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
                &mut out, 90,
            ))
            .expect("encode");
        out
    }

    const GPS_MARKER: &[u8] = b"GPS-51.5007N-0.1246W-secret-home";

    /// An APP1 Exif segment, big-endian TIFF: IFD0 holds Orientation
    /// (`orientation`) and a GPSInfo pointer to a GPS IFD whose
    /// GPSLatitudeRef is "N"; the marker string sits in the data area as
    /// a camera's maker note would.
    fn exif_segment(orientation: u16) -> Vec<u8> {
        let mut tiff = Vec::new();
        tiff.extend_from_slice(b"MM\0\x2a");
        tiff.extend_from_slice(&8u32.to_be_bytes()); // IFD0 at 8
        // IFD0: 2 entries, 12 bytes each, then the next-IFD offset.
        let gps_ifd_at: u32 = 8 + 2 + 2 * 12 + 4;
        tiff.extend_from_slice(&2u16.to_be_bytes());
        // Orientation, SHORT, count 1, value in the first two bytes.
        tiff.extend_from_slice(&0x0112u16.to_be_bytes());
        tiff.extend_from_slice(&3u16.to_be_bytes());
        tiff.extend_from_slice(&1u32.to_be_bytes());
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0]);
        // GPSInfo, LONG, count 1, the GPS IFD's offset.
        tiff.extend_from_slice(&0x8825u16.to_be_bytes());
        tiff.extend_from_slice(&4u16.to_be_bytes());
        tiff.extend_from_slice(&1u32.to_be_bytes());
        tiff.extend_from_slice(&gps_ifd_at.to_be_bytes());
        tiff.extend_from_slice(&0u32.to_be_bytes());
        // GPS IFD: GPSLatitudeRef (ASCII, "N\0") and the marker as
        // GPSAreaInformation (UNDEFINED) stored after the IFD.
        let marker_at: u32 = gps_ifd_at + 2 + 2 * 12 + 4;
        tiff.extend_from_slice(&2u16.to_be_bytes());
        tiff.extend_from_slice(&0x0001u16.to_be_bytes());
        tiff.extend_from_slice(&2u16.to_be_bytes());
        tiff.extend_from_slice(&2u32.to_be_bytes());
        tiff.extend_from_slice(b"N\0\0\0");
        tiff.extend_from_slice(&0x001Cu16.to_be_bytes());
        tiff.extend_from_slice(&7u16.to_be_bytes());
        tiff.extend_from_slice(&(GPS_MARKER.len() as u32).to_be_bytes());
        tiff.extend_from_slice(&marker_at.to_be_bytes());
        tiff.extend_from_slice(&0u32.to_be_bytes());
        tiff.extend_from_slice(GPS_MARKER);

        let mut payload = b"Exif\0\0".to_vec();
        payload.extend_from_slice(&tiff);
        let mut segment = vec![0xFF, 0xE1];
        segment.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        segment.extend_from_slice(&payload);
        segment
    }

    /// `jpeg` with `segment` spliced in right after its SOI marker.
    fn with_segment(jpeg: &[u8], segment: &[u8]) -> Vec<u8> {
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(segment);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn exif_and_gps_are_gone_and_the_orientation_is_applied() {
        let photo = with_segment(&jpeg(40, 20), &exif_segment(6));
        assert!(contains(&photo, b"Exif") && contains(&photo, GPS_MARKER));
        let out = process(&photo).expect("processed");
        // Orientation 6 is "rotate 90° clockwise to view": the 40x20
        // sensor image is 20x40 upright.
        assert_eq!((out.width, out.height), (20, 40));
        for copy in [&out.full, &out.thumb] {
            assert_eq!(copy.mime, "image/jpeg");
            assert!(
                !contains(&copy.bytes, b"Exif"),
                "EXIF left in {}",
                copy.mime
            );
            assert!(!contains(&copy.bytes, GPS_MARKER), "GPS left");
            assert!(!contains(&copy.bytes, b"MM\0\x2a"), "a TIFF header left");
            let back = image::load_from_memory(&copy.bytes).expect("decodes");
            assert_eq!((back.width(), back.height()), (20, 40));
        }
    }

    #[test]
    fn an_upright_photo_keeps_its_shape_and_big_ones_are_capped() {
        let out = process(&jpeg(600, 300)).expect("processed");
        assert_eq!((out.width, out.height), (600, 300));
        let thumb = image::load_from_memory(&out.thumb.bytes).expect("thumb");
        assert_eq!((thumb.width(), thumb.height()), (320, 160));

        let big = jpeg(5000, 100);
        let out = process(&big).expect("processed");
        assert_eq!(out.width, MAX_FULL_SIDE);
        assert!(out.height <= 100 && out.height >= 80, "{}", out.height);
    }

    #[test]
    fn transparency_keeps_a_png_and_an_opaque_alpha_channel_does_not() {
        let encode_png = |img: RgbaImage| {
            let mut out = Vec::new();
            DynamicImage::ImageRgba8(img)
                .write_with_encoder(image::codecs::png::PngEncoder::new(&mut out))
                .expect("png");
            out
        };
        let clear = encode_png(RgbaImage::from_fn(10, 10, |x, _| {
            Rgba([255, 0, 0, if x < 5 { 0 } else { 255 }])
        }));
        let out = process(&clear).expect("processed");
        assert_eq!((out.full.mime, out.thumb.mime), ("image/png", "image/png"));
        let opaque = encode_png(RgbaImage::from_pixel(10, 10, Rgba([1, 2, 3, 255])));
        assert_eq!(process(&opaque).expect("processed").full.mime, "image/jpeg");
    }

    #[test]
    fn a_truncated_or_foreign_file_fails() {
        // zune-jpeg fills in a JPEG cut inside its scan (the edge's
        // structural check refuses those at upload); one cut in its
        // headers cannot be decoded at all.
        let whole = jpeg(64, 64);
        assert!(process(&whole[..40]).is_err());
        assert!(matches!(
            process(b"%PDF-1.7 not an image"),
            Err(ImageFailure::Format(_))
        ));
    }

    /// `cargo test --release -p vibe-origin --lib media::image -- --ignored
    /// --nocapture`: the CPU one 12-megapixel photo costs (the figure in
    /// docs/ARCHITECTURE.md).
    #[test]
    #[ignore = "a timing, not a check; run it in release"]
    #[allow(clippy::print_stdout)]
    fn time_a_12_megapixel_photo() {
        let photo = jpeg(4000, 3000);
        let started = std::time::Instant::now();
        let out = process(&photo).expect("processed");
        println!(
            "12 MP JPEG ({} KiB): processed in {:?} -> full {}x{} {} KiB, thumb {} KiB",
            photo.len() / 1024,
            started.elapsed(),
            out.width,
            out.height,
            out.full.bytes.len() / 1024,
            out.thumb.bytes.len() / 1024
        );
    }
}
