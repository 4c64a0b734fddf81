use super::*;

/// A structurally complete baseline JPEG: SOI, an EXIF APP1 segment, a
/// start-of-frame with the given size, a scan with stuffed and restart
/// bytes, EOI.
fn jpeg(width: u16, height: u16) -> Vec<u8> {
    let mut v = vec![0xFF, 0xD8];
    // APP1 "Exif\0\0" + a few bytes that look like markers but are payload.
    v.extend_from_slice(&[0xFF, 0xE1, 0x00, 0x0C]);
    v.extend_from_slice(b"Exif\0\0");
    v.extend_from_slice(&[0xFF, 0xD9, 0xFF, 0xD8]);
    // SOF0: length 11, precision 8, height, width, 1 component.
    v.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x0B, 0x08]);
    v.extend_from_slice(&height.to_be_bytes());
    v.extend_from_slice(&width.to_be_bytes());
    v.extend_from_slice(&[0x01, 0x01, 0x11, 0x00]);
    // SOS: length 8, 1 component, then entropy data with a stuffed 0xFF
    // and a restart marker.
    v.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3F, 0x00]);
    v.extend_from_slice(&[0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56]);
    v.extend_from_slice(&[0xFF, 0xD9]);
    v
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    let chunk = |v: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]| {
        v.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        v.extend_from_slice(kind);
        v.extend_from_slice(data);
        v.extend_from_slice(&[0, 0, 0, 0]); // CRC: not checked here
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
    chunk(&mut v, b"IHDR", &ihdr);
    chunk(&mut v, b"IDAT", &[1, 2, 3, 4, 5]);
    chunk(&mut v, b"IEND", &[]);
    v
}

fn inspect(mime: &str, bytes: &[u8], chunk: usize) -> Result<Inspected, MediaError> {
    let mut i = Inspector::new(mime);
    for c in bytes.chunks(chunk) {
        i.feed(c);
    }
    i.finish()
}

#[test]
fn the_type_comes_from_the_bytes() {
    let kind = |head: &[u8], declared| sniff(head, declared).map(|s| (s.kind, s.mime));
    assert_eq!(
        kind(&jpeg(4, 3), Some("application/pdf")),
        Ok((MediaKind::Image, "image/jpeg"))
    );
    assert_eq!(kind(&png(1, 1), None), Ok((MediaKind::Image, "image/png")));
    assert_eq!(
        kind(b"GIF89a\x01\x00\x01\x00", None),
        Ok((MediaKind::Image, "image/gif"))
    );
    assert_eq!(
        kind(b"RIFF\x10\0\0\0WEBPVP8 ", None),
        Ok((MediaKind::Image, "image/webp"))
    );
    assert_eq!(
        kind(b"%PDF-1.7\n", Some("image/png")),
        Ok((MediaKind::File, "application/pdf"))
    );
    let webm = [0x1A, 0x45, 0xDF, 0xA3, 0x9F, 0x42, 0x86, 0x81];
    assert_eq!(
        kind(&webm, Some("audio/webm;codecs=opus")),
        Ok((MediaKind::Audio, "audio/webm"))
    );
    assert_eq!(kind(&webm, None), Ok((MediaKind::Video, "video/webm")));
    assert_eq!(
        kind(b"\0\0\0\x20ftypisom\0\0\x02\0", Some("video/mp4")),
        Ok((MediaKind::Video, "video/mp4"))
    );
    assert_eq!(
        kind(b"\0\0\0\x20ftypM4A \0\0\x02\0", Some("video/mp4")),
        Ok((MediaKind::Audio, "audio/mp4"))
    );
}

#[test]
fn a_renamed_executable_or_an_unknown_type_is_refused() {
    // A Windows executable, an ELF binary, HTML, a script, HEIC, nothing.
    for head in [
        b"MZ\x90\0\x03\0\0\0\x04\0\0\0\xff\xff\0\0".as_slice(),
        b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0",
        b"<html><script>alert(1)</script>",
        b"#!/bin/sh\nrm -rf /",
        b"\0\0\0\x18ftypheic\0\0\0\0",
        b"",
    ] {
        assert_eq!(
            sniff(head, Some("image/jpeg")),
            Err(MediaError::Unsupported)
        );
    }
    assert_eq!(MediaError::Unsupported.http_status(), 415);
}

#[test]
fn a_complete_jpeg_gives_its_size_in_any_chunking() {
    let bytes = jpeg(4032, 3024);
    for chunk in [1, 2, 3, 7, 64, bytes.len()] {
        assert_eq!(
            inspect("image/jpeg", &bytes, chunk),
            Ok(Inspected {
                width: Some(4032),
                height: Some(3024)
            }),
            "chunk {chunk}"
        );
    }
}

#[test]
fn bytes_after_the_end_of_a_jpeg_are_allowed() {
    // A phone's motion photo appends a video after EOI.
    let mut bytes = jpeg(10, 20);
    bytes.extend_from_slice(b"\0\0\0\x18ftypmp42 and more");
    assert!(inspect("image/jpeg", &bytes, 5).is_ok());
}

#[test]
fn a_truncated_jpeg_is_corrupt() {
    let bytes = jpeg(4032, 3024);
    for cut in [3, 10, 20, 30, bytes.len() - 2, bytes.len() - 1] {
        let r = inspect("image/jpeg", &bytes[..cut], 4);
        assert!(
            matches!(r, Err(MediaError::Corrupt(_))),
            "cut at {cut}: {r:?}"
        );
    }
    assert_eq!(MediaError::Corrupt("x").http_status(), 422);
}

#[test]
fn a_jpeg_with_garbage_between_segments_is_corrupt() {
    let mut bytes = jpeg(4, 4);
    bytes.insert(2, 0x42);
    assert!(matches!(
        inspect("image/jpeg", &bytes, 3),
        Err(MediaError::Corrupt(_))
    ));
}

#[test]
fn a_png_is_walked_to_iend() {
    let bytes = png(640, 480);
    for chunk in [1, 5, 13, bytes.len()] {
        assert_eq!(
            inspect("image/png", &bytes, chunk),
            Ok(Inspected {
                width: Some(640),
                height: Some(480)
            })
        );
    }
    let r = inspect("image/png", &bytes[..bytes.len() - 12], 8);
    assert!(matches!(r, Err(MediaError::Corrupt(_))), "{r:?}");
}

#[test]
fn gif_and_webp_are_checked_for_length() {
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&320u16.to_le_bytes());
    gif.extend_from_slice(&200u16.to_le_bytes());
    gif.extend_from_slice(&[0, 0, 0, 1, 2, 3, 0x3B]);
    assert_eq!(
        inspect("image/gif", &gif, 3),
        Ok(Inspected {
            width: Some(320),
            height: Some(200)
        })
    );
    assert!(inspect("image/gif", &gif[..gif.len() - 1], 3).is_err());

    // VP8X with a 1000x500 canvas; the RIFF length covers 30 bytes.
    let mut webp = b"RIFF".to_vec();
    webp.extend_from_slice(&22u32.to_le_bytes());
    webp.extend_from_slice(b"WEBPVP8X");
    webp.extend_from_slice(&10u32.to_le_bytes());
    webp.extend_from_slice(&[0, 0, 0, 0]);
    webp.extend_from_slice(&999u32.to_le_bytes()[..3]);
    webp.extend_from_slice(&499u32.to_le_bytes()[..3]);
    assert_eq!(webp.len(), 30);
    assert_eq!(
        inspect("image/webp", &webp, 7),
        Ok(Inspected {
            width: Some(1000),
            height: Some(500)
        })
    );
    assert!(inspect("image/webp", &webp[..29], 7).is_err());
}

#[test]
fn non_images_pass_without_a_check() {
    assert_eq!(
        inspect("application/pdf", b"%PDF-1.4 whatever", 4),
        Ok(Inspected::default())
    );
}

const NOW: i64 = 1_800_000_123;

fn parts(path: &str) -> (Uuid, Variant, i64, String) {
    let (p, q) = path.split_once('?').expect("query");
    let segs: Vec<&str> = p.split('/').collect();
    let id: Uuid = segs[4].parse().expect("id");
    let variant = Variant::parse(segs[5]).expect("variant");
    let mut exp = 0;
    let mut sig = String::new();
    for kv in q.split('&') {
        match kv.split_once('=') {
            Some(("exp", v)) => exp = v.parse().expect("exp"),
            Some(("sig", v)) => sig = v.to_owned(),
            _ => {}
        }
    }
    (id, variant, exp, sig)
}

#[test]
fn a_signed_path_verifies_until_it_expires() {
    let signer = Signer::new(b"0123456789abcdef0123456789abcdef");
    let id = Uuid::from_u128(7);
    let path = signer.path(id, Variant::Full, NOW);
    assert!(path.starts_with(&format!("/api/v1/media/{id}/full?exp=")));
    let (pid, variant, exp, sig) = parts(&path);
    assert_eq!((pid, variant), (id, Variant::Full));
    assert!(exp > NOW + 50 * 60 && exp <= NOW + URL_TTL_SECS, "{exp}");
    assert_eq!(signer.verify(id, Variant::Full, exp, &sig, NOW), Ok(()));
    assert_eq!(
        signer.verify(id, Variant::Full, exp, &sig, exp),
        Err(MediaError::Expired)
    );
    // Paths minted within one 10-minute slot are the same URL (cacheable).
    assert_eq!(path, signer.path(id, Variant::Full, NOW + 1));
    // One minted by a clock a little ahead (the origin's, say), just past
    // a slot's edge, still verifies.
    let slot_end = (NOW / 600 + 1) * 600;
    let (_, _, ahead_exp, ahead_sig) = parts(&signer.path(id, Variant::Full, slot_end + 2));
    assert_eq!(
        signer.verify(id, Variant::Full, ahead_exp, &ahead_sig, slot_end - 3),
        Ok(())
    );
}

#[test]
fn an_altered_path_is_refused() {
    let signer = Signer::new(b"0123456789abcdef0123456789abcdef");
    let id = Uuid::from_u128(7);
    let (_, _, exp, sig) = parts(&signer.path(id, Variant::Thumb, NOW));
    let bad = Err(MediaError::BadSignature);
    assert_eq!(
        signer.verify(Uuid::from_u128(8), Variant::Thumb, exp, &sig, NOW),
        bad
    );
    assert_eq!(signer.verify(id, Variant::Original, exp, &sig, NOW), bad);
    assert_eq!(signer.verify(id, Variant::Thumb, exp + 600, &sig, NOW), bad);
    let mut flipped = sig.clone().into_bytes();
    flipped[0] = if flipped[0] == b'a' { b'b' } else { b'a' };
    let flipped = String::from_utf8(flipped).expect("ascii");
    assert_eq!(signer.verify(id, Variant::Thumb, exp, &flipped, NOW), bad);
    assert_eq!(signer.verify(id, Variant::Thumb, exp, "zz", NOW), bad);
    // Another deployment's key.
    let other = Signer::new(b"another secret of thirty-two byte");
    assert_eq!(other.verify(id, Variant::Thumb, exp, &sig, NOW), bad);
}

#[test]
fn a_validly_signed_far_expiry_is_refused() {
    let signer = Signer::new(b"0123456789abcdef0123456789abcdef");
    let id = Uuid::from_u128(7);
    // Minted "in the future": its expiry is more than an hour ahead now.
    let (_, _, exp, sig) = parts(&signer.path(id, Variant::Full, NOW + 7_200));
    assert_eq!(
        signer.verify(id, Variant::Full, exp, &sig, NOW),
        Err(MediaError::Expired)
    );
}

fn meta(kind: MediaKind, status: AttachmentStatus, thumb: bool) -> AttachmentMeta {
    AttachmentMeta {
        id: Uuid::from_u128(9),
        conversation_id: 1,
        uploader_id: 2,
        kind,
        mime: "image/jpeg".into(),
        size: 100,
        name: None,
        width: Some(4),
        height: Some(3),
        duration_ms: None,
        status,
        has_thumbnail: thumb,
    }
}

#[test]
fn an_image_is_served_only_once_processed() {
    let signer = Signer::new(b"0123456789abcdef0123456789abcdef");
    let v = signer.view(
        meta(MediaKind::Image, AttachmentStatus::Processing, false),
        NOW,
    );
    assert_eq!((v.url, v.thumbnail_url), (None, None));
    let v = signer.view(meta(MediaKind::Image, AttachmentStatus::Ready, true), NOW);
    assert!(v.url.expect("url").contains("/full?"));
    assert!(v.thumbnail_url.expect("thumb").contains("/thumb?"));
    let v = signer.view(meta(MediaKind::File, AttachmentStatus::Ready, false), NOW);
    assert!(v.url.expect("url").contains("/original?"));
}

#[test]
fn the_view_flattens_the_metadata() {
    let signer = Signer::new(b"0123456789abcdef0123456789abcdef");
    let v = serde_json::to_value(
        signer.view(meta(MediaKind::Image, AttachmentStatus::Ready, true), NOW),
    )
    .expect("json");
    assert_eq!(v["kind"], "image");
    assert_eq!(v["status"], "ready");
    assert_eq!(v["width"], 4);
    assert!(v["url"].is_string() && v["thumbnail_url"].is_string());
    assert!(v.get("duration_ms").is_none());
    let back: AttachmentView = serde_json::from_value(v).expect("parse");
    assert_eq!(back.meta.id, Uuid::from_u128(9));
}

#[test]
fn file_names_are_made_safe() {
    assert_eq!(
        sanitize_name("C:\\Users\\me\\Plan 2026.pdf").as_deref(),
        Some("Plan 2026.pdf")
    );
    assert_eq!(
        sanitize_name("../../etc/pa\"ss\r\nwd").as_deref(),
        Some("pa_ss__wd")
    );
    assert_eq!(sanitize_name("..."), None);
    assert_eq!(sanitize_name(&"a".repeat(300)).map(|n| n.len()), Some(100));
}

#[test]
fn ranges_are_read_as_rfc_9110_says() {
    assert_eq!(parse_range(None, 100), Ok(None));
    assert_eq!(parse_range(Some("bytes=0-9"), 100), Ok(Some((0, 9))));
    assert_eq!(parse_range(Some("bytes=90-"), 100), Ok(Some((90, 99))));
    assert_eq!(parse_range(Some("bytes=-10"), 100), Ok(Some((90, 99))));
    assert_eq!(parse_range(Some("bytes=-500"), 100), Ok(Some((0, 99))));
    assert_eq!(parse_range(Some("bytes=50-500"), 100), Ok(Some((50, 99))));
    assert_eq!(parse_range(Some("bytes=100-"), 100), Err(()));
    assert_eq!(parse_range(Some("bytes=-0"), 100), Err(()));
    // Ignored: several ranges, other units, nonsense, a backwards range.
    assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Ok(None));
    assert_eq!(parse_range(Some("items=0-1"), 100), Ok(None));
    assert_eq!(parse_range(Some("bytes=x-y"), 100), Ok(None));
    assert_eq!(parse_range(Some("bytes=9-3"), 100), Ok(None));
}
