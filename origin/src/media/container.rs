//! Dimensions and durations from video and audio containers, without a
//! decoder (the origin has no ffmpeg): the headers of MP4 (ISO BMFF) and
//! WebM (Matroska/EBML). Best effort: a value the file does not state, or
//! that a damaged file hides, stays `None`; nothing here fails.

/// What a container says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub duration_ms: Option<i64>,
}

/// Reads `data` as MP4 or WebM, by its first bytes.
pub fn probe(data: &[u8]) -> Facts {
    if data.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) {
        webm(data)
    } else if data.get(4..8) == Some(b"ftyp".as_slice()) {
        mp4(data)
    } else {
        Facts::default()
    }
}

// ---- MP4 --------------------------------------------------------------------

fn be16(d: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(d.get(at..at + 2)?.try_into().ok()?))
}

fn be32(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(d.get(at..at + 4)?.try_into().ok()?))
}

fn be64(d: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(d.get(at..at + 8)?.try_into().ok()?))
}

/// The boxes directly inside `d`: (type, payload). A box whose size runs
/// past the end is cut there (a truncated file still gives its headers).
fn boxes(d: &[u8]) -> Vec<([u8; 4], &[u8])> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 8 <= d.len() {
        let Some(size) = be32(d, at) else { break };
        let kind: [u8; 4] = match d[at + 4..at + 8].try_into() {
            Ok(k) => k,
            Err(_) => break,
        };
        let (header, size) = match size {
            0 => (8, d.len() - at),
            1 => match be64(d, at + 8).and_then(|s| usize::try_from(s).ok()) {
                Some(s) => (16, s),
                None => break,
            },
            s => (8, s as usize),
        };
        if size < header {
            break;
        }
        let end = at.saturating_add(size).min(d.len());
        out.push((kind, &d[(at + header).min(end)..end]));
        at = end;
    }
    out
}

fn child<'a>(d: &'a [u8], kind: &[u8; 4]) -> Option<&'a [u8]> {
    boxes(d)
        .into_iter()
        .find(|(k, _)| k == kind)
        .map(|(_, p)| p)
}

/// MP4: the duration from `moov/mvhd`, the size from the `tkhd` of the
/// first track with one (16.16 fixed point), swapped when its matrix
/// turns the picture a quarter (phones record portrait video that way).
pub fn mp4(data: &[u8]) -> Facts {
    let mut facts = Facts::default();
    let Some(moov) = child(data, b"moov") else {
        return facts;
    };
    if let Some(mvhd) = child(moov, b"mvhd") {
        let version = mvhd.first().copied().unwrap_or(0);
        let (timescale, duration) = if version == 1 {
            (be32(mvhd, 20), be64(mvhd, 24))
        } else {
            (be32(mvhd, 12), be32(mvhd, 16).map(u64::from))
        };
        if let (Some(scale), Some(duration)) = (timescale, duration) {
            // All ones: "unknown" (a fragmented or live file).
            let unknown = duration == u64::MAX || duration == u64::from(u32::MAX);
            if scale > 0 && !unknown {
                let ms = u128::from(duration) * 1000 / u128::from(scale);
                facts.duration_ms = i64::try_from(ms).ok();
            }
        }
    }
    for (kind, trak) in boxes(moov) {
        if &kind != b"trak" {
            continue;
        }
        let Some(tkhd) = child(trak, b"tkhd") else {
            continue;
        };
        // Version 1 has 64-bit times and duration: 12 bytes more before
        // the common tail.
        let tail = if tkhd.first() == Some(&1) {
            32 + 12
        } else {
            32
        };
        let matrix = tail + 8;
        let dims = tail + 8 + 36;
        let (Some(w), Some(h)) = (be32(tkhd, dims), be32(tkhd, dims + 4)) else {
            continue;
        };
        let (w, h) = (w >> 16, h >> 16);
        if w == 0 || h == 0 {
            continue;
        }
        // The matrix is {a, b, u, c, d, v, x, y, w}: a quarter turn has
        // a = d = 0.
        let quarter = be32(tkhd, matrix) == Some(0) && be32(tkhd, matrix + 16) == Some(0);
        let (w, h) = if quarter { (h, w) } else { (w, h) };
        facts.width = i32::try_from(w).ok();
        facts.height = i32::try_from(h).ok();
        break;
    }
    facts
}

// ---- WebM / Matroska ----------------------------------------------------------

const SEGMENT: u32 = 0x1853_8067;
const INFO: u32 = 0x1549_A966;
const TIMECODE_SCALE: u32 = 0x2A_D7B1;
const DURATION: u32 = 0x4489;
const TRACKS: u32 = 0x1654_AE6B;
const TRACK_ENTRY: u32 = 0xAE;
const VIDEO: u32 = 0xE0;
const PIXEL_WIDTH: u32 = 0xB0;
const PIXEL_HEIGHT: u32 = 0xBA;
const CLUSTER: u32 = 0x1F43_B675;
const CLUSTER_TIMECODE: u32 = 0xE7;
const SIMPLE_BLOCK: u32 = 0xA3;
const BLOCK_GROUP: u32 = 0xA0;
const BLOCK: u32 = 0xA1;
const BLOCK_DURATION: u32 = 0x9B;

/// The elements walked into rather than over: their children are read in
/// place, so a master of unknown size (MediaRecorder writes the Segment
/// and every Cluster that way) needs no end.
const MASTERS: [u32; 7] = [
    SEGMENT,
    INFO,
    TRACKS,
    TRACK_ENTRY,
    VIDEO,
    CLUSTER,
    BLOCK_GROUP,
];

/// An EBML variable-length integer at `at`: (value with the length marker
/// kept for ids, or removed for sizes, its length). `None` for sizes whose
/// bits are all ones ("unknown").
fn vint(d: &[u8], at: usize, keep_marker: bool) -> Option<(Option<u64>, usize)> {
    let first = *d.get(at)?;
    let len = first.leading_zeros() as usize + 1;
    if len > 8 {
        return None;
    }
    let bytes = d.get(at..at + len)?;
    let mut value = if keep_marker {
        u64::from(first)
    } else {
        u64::from(first) & (0xFF >> len)
    };
    for b in &bytes[1..] {
        value = (value << 8) | u64::from(*b);
    }
    let all_ones = (1u64 << (7 * len)) - 1;
    if !keep_marker && value == all_ones {
        return Some((None, len));
    }
    Some((Some(value), len))
}

fn uint(d: &[u8]) -> Option<u64> {
    if d.is_empty() || d.len() > 8 {
        return None;
    }
    Some(d.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b)))
}

fn float(d: &[u8]) -> Option<f64> {
    match d.len() {
        4 => Some(f64::from(f32::from_be_bytes(d.try_into().ok()?))),
        8 => Some(f64::from_be_bytes(d.try_into().ok()?)),
        _ => None,
    }
}

/// WebM: the size from the first video track, the duration from
/// Info/Duration × TimecodeScale, or, when the file has none (Chrome's
/// MediaRecorder never writes it), the latest block time in the clusters.
pub fn webm(data: &[u8]) -> Facts {
    let mut facts = Facts::default();
    let mut scale_ns: u64 = 1_000_000;
    let mut duration: Option<f64> = None;
    let mut in_video = false;
    let mut cluster_time: Option<u64> = None;
    // The end of the latest block, in timecode units.
    let mut last_block: Option<i64> = None;
    let mut block_time: Option<i64> = None;
    let mut at = 0usize;
    while at < data.len() {
        let Some((Some(id), id_len)) = vint(data, at, true) else {
            break;
        };
        let Some((size, size_len)) = vint(data, at + id_len, false) else {
            break;
        };
        let body = at + id_len + size_len;
        let id = id as u32;
        if MASTERS.contains(&id) {
            if id == VIDEO {
                in_video = facts.width.is_none();
            } else if id == TRACK_ENTRY || id == CLUSTER {
                in_video = false;
            }
            at = body;
            continue;
        }
        // Any other element of unknown size cannot be skipped.
        let Some(size) = size.and_then(|s| usize::try_from(s).ok()) else {
            break;
        };
        let end = body.saturating_add(size);
        let value = data.get(body..end.min(data.len())).unwrap_or_default();
        match id {
            TIMECODE_SCALE => {
                if let Some(s) = uint(value).filter(|s| *s > 0) {
                    scale_ns = s;
                }
            }
            DURATION => duration = float(value).filter(|d| d.is_finite() && *d >= 0.0),
            PIXEL_WIDTH if in_video => {
                facts.width = uint(value)
                    .and_then(|v| i32::try_from(v).ok())
                    .filter(|v| *v > 0);
            }
            PIXEL_HEIGHT if in_video => {
                facts.height = uint(value)
                    .and_then(|v| i32::try_from(v).ok())
                    .filter(|v| *v > 0);
            }
            CLUSTER_TIMECODE => cluster_time = uint(value),
            SIMPLE_BLOCK | BLOCK => {
                if let (Some(cluster), Some(rel)) = (cluster_time, block_timecode(value)) {
                    let t = i64::try_from(cluster)
                        .unwrap_or(i64::MAX)
                        .saturating_add(rel);
                    block_time = Some(t);
                    last_block = Some(last_block.map_or(t, |l| l.max(t)));
                }
            }
            BLOCK_DURATION => {
                if let (Some(t), Some(d)) = (block_time, uint(value)) {
                    let end = t.saturating_add(i64::try_from(d).unwrap_or(0));
                    last_block = Some(last_block.map_or(end, |l| l.max(end)));
                }
            }
            _ => {}
        }
        at = end;
    }
    let to_ms = |units: f64| units * scale_ns as f64 / 1_000_000.0;
    facts.duration_ms = match duration {
        Some(d) => Some(to_ms(d).round() as i64),
        None => last_block
            .filter(|t| *t >= 0)
            .map(|t| to_ms(t as f64).round() as i64),
    };
    if facts.width.is_none() || facts.height.is_none() {
        facts.width = None;
        facts.height = None;
    }
    facts
}

/// A (Simple)Block's timecode relative to its cluster: after the track
/// number (a vint), a signed 16-bit big-endian value.
fn block_timecode(body: &[u8]) -> Option<i64> {
    let (_, len) = vint(body, 0, false)?;
    let rel = be16(body, len)? as i16;
    Some(i64::from(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- MP4 fixtures ----

    fn mp4_box(kind: &[u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut out = ((payload.len() + 8) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(payload);
        out
    }

    fn mvhd_v0(timescale: u32, duration: u32) -> Vec<u8> {
        let mut p = vec![0u8; 4 + 8];
        p.extend_from_slice(&timescale.to_be_bytes());
        p.extend_from_slice(&duration.to_be_bytes());
        p.extend_from_slice(&[0u8; 80]);
        mp4_box(b"mvhd", &p)
    }

    fn mvhd_v1(timescale: u32, duration: u64) -> Vec<u8> {
        let mut p = vec![1u8, 0, 0, 0];
        p.extend_from_slice(&[0u8; 16]);
        p.extend_from_slice(&timescale.to_be_bytes());
        p.extend_from_slice(&duration.to_be_bytes());
        p.extend_from_slice(&[0u8; 80]);
        mp4_box(b"mvhd", &p)
    }

    fn tkhd(version: u8, width: u32, height: u32, quarter_turn: bool) -> Vec<u8> {
        let mut p = vec![version, 0, 0, 7];
        p.extend_from_slice(&vec![0u8; if version == 1 { 32 } else { 20 }]);
        // reserved (8), then layer, alternate group, volume, reserved
        p.extend_from_slice(&[0u8; 8]);
        p.extend_from_slice(&[0u8; 8]);
        let one = 0x0001_0000u32;
        let minus_one = 0xFFFF_0000u32;
        let matrix: [u32; 9] = if quarter_turn {
            [0, one, 0, minus_one, 0, 0, 0, 0, 0x4000_0000]
        } else {
            [one, 0, 0, 0, one, 0, 0, 0, 0x4000_0000]
        };
        for m in matrix {
            p.extend_from_slice(&m.to_be_bytes());
        }
        p.extend_from_slice(&(width << 16).to_be_bytes());
        p.extend_from_slice(&(height << 16).to_be_bytes());
        mp4_box(b"tkhd", &p)
    }

    fn mp4_file(moov_children: &[Vec<u8>]) -> Vec<u8> {
        let mut out = mp4_box(b"ftyp", b"isom\0\0\x02\0isomiso2mp41");
        out.extend(mp4_box(b"mdat", &[0u8; 64]));
        out.extend(mp4_box(b"moov", &moov_children.concat()));
        out
    }

    #[test]
    fn mp4_duration_and_the_first_sized_track() {
        let audio_track = mp4_box(b"trak", &tkhd(0, 0, 0, false));
        let video_track = mp4_box(b"trak", &tkhd(0, 1920, 1080, false));
        let file = mp4_file(&[mvhd_v0(1000, 12_345), audio_track, video_track]);
        assert_eq!(
            probe(&file),
            Facts {
                width: Some(1920),
                height: Some(1080),
                duration_ms: Some(12_345)
            }
        );
    }

    #[test]
    fn mp4_version_1_headers_and_a_portrait_phone_video() {
        let track = mp4_box(b"trak", &tkhd(1, 1920, 1080, true));
        let file = mp4_file(&[mvhd_v1(90_000, 90_000 * 61 + 45_000), track]);
        assert_eq!(
            mp4(&file),
            Facts {
                width: Some(1080),
                height: Some(1920),
                duration_ms: Some(61_500)
            }
        );
    }

    #[test]
    fn mp4_audio_has_a_duration_and_no_size_and_junk_gives_nothing() {
        let track = mp4_box(b"trak", &tkhd(0, 0, 0, false));
        let file = mp4_file(&[mvhd_v0(44_100, 44_100 * 3), track]);
        assert_eq!(
            mp4(&file),
            Facts {
                width: None,
                height: None,
                duration_ms: Some(3000)
            }
        );
        // Truncated inside moov, unknown duration, or no moov at all.
        assert_eq!(mp4(&file[..file.len() - 50]).duration_ms, Some(3000));
        assert_eq!(mp4(&mp4_file(&[mvhd_v0(1000, u32::MAX)])).duration_ms, None);
        assert_eq!(mp4(&mp4_box(b"ftyp", b"isom")), Facts::default());
        assert_eq!(
            probe(b"\x00\x00\x00\x08ftyp\xff\xff\xff\xff"),
            Facts::default()
        );
    }

    // ---- WebM fixtures ----

    /// An element with a 1-byte size when it fits, else 8 bytes.
    fn el(id: u32, body: &[u8]) -> Vec<u8> {
        let id_bytes = id.to_be_bytes();
        let skip = id_bytes.iter().take_while(|b| **b == 0).count();
        let mut out = id_bytes[skip..].to_vec();
        if body.len() < 0x7F {
            out.push(0x80 | body.len() as u8);
        } else {
            out.push(0x01);
            out.extend_from_slice(&(body.len() as u64).to_be_bytes()[1..]);
        }
        out.extend_from_slice(body);
        out
    }

    /// A master element of unknown size (as MediaRecorder writes them).
    fn unknown(id: u32) -> Vec<u8> {
        let id_bytes = id.to_be_bytes();
        let skip = id_bytes.iter().take_while(|b| **b == 0).count();
        let mut out = id_bytes[skip..].to_vec();
        out.extend_from_slice(&[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
        out
    }

    fn ebml_header() -> Vec<u8> {
        el(0x1A45_DFA3, &el(0x4282, b"webm"))
    }

    fn simple_block(track: u8, rel: i16) -> Vec<u8> {
        let mut body = vec![0x80 | track];
        body.extend_from_slice(&rel.to_be_bytes());
        body.push(0x80);
        body.extend_from_slice(&[0xAB; 20]);
        el(SIMPLE_BLOCK, &body)
    }

    #[test]
    fn webm_duration_scale_and_video_size() {
        let info = el(
            INFO,
            &[
                el(TIMECODE_SCALE, &1_000_000u32.to_be_bytes()[1..]),
                el(DURATION, &8_250.0f64.to_be_bytes()),
            ]
            .concat(),
        );
        let audio = el(TRACK_ENTRY, &el(0xD7, &[1]));
        let video = el(
            TRACK_ENTRY,
            &[
                el(0xD7, &[2]),
                el(
                    VIDEO,
                    &[
                        el(PIXEL_WIDTH, &[0x02, 0x80]),
                        el(PIXEL_HEIGHT, &[0x01, 0xE0]),
                    ]
                    .concat(),
                ),
            ]
            .concat(),
        );
        let tracks = el(TRACKS, &[audio, video].concat());
        let segment = el(SEGMENT, &[el(0xEC, &[0; 10]), info, tracks].concat());
        let file = [ebml_header(), segment].concat();
        assert_eq!(
            probe(&file),
            Facts {
                width: Some(640),
                height: Some(480),
                duration_ms: Some(8_250)
            }
        );
    }

    #[test]
    fn a_media_recorder_voice_note_without_duration_is_timed_by_its_clusters() {
        // Unknown-size Segment and Clusters, no Duration, a 4-byte float
        // nowhere: the last block of the last cluster ends it.
        let info = el(INFO, &el(TIMECODE_SCALE, &1_000_000u32.to_be_bytes()[1..]));
        let tracks = el(TRACKS, &el(TRACK_ENTRY, &el(0xD7, &[1])));
        let mut file = [ebml_header(), unknown(SEGMENT), info, tracks].concat();
        for (start, blocks) in [(0u16, [0i16, 20, 40]), (60, [0, 20, 3_000])] {
            file.extend(unknown(CLUSTER));
            file.extend(el(CLUSTER_TIMECODE, &start.to_be_bytes()));
            for b in blocks {
                file.extend(simple_block(1, b));
            }
        }
        // A BlockGroup with a duration past the last simple block.
        let mut block = vec![0x81];
        block.extend_from_slice(&3_010i16.to_be_bytes());
        block.push(0);
        file.extend(el(
            BLOCK_GROUP,
            &[el(BLOCK, &block), el(BLOCK_DURATION, &[0x14])].concat(),
        ));
        assert_eq!(
            probe(&file),
            Facts {
                width: None,
                height: None,
                duration_ms: Some(3_090)
            }
        );
        // A different scale (microsecond ticks) is applied to the blocks.
        let scaled = [
            ebml_header(),
            unknown(SEGMENT),
            el(INFO, &el(TIMECODE_SCALE, &1_000u16.to_be_bytes())),
            unknown(CLUSTER),
            el(CLUSTER_TIMECODE, &[0x27, 0x10]),
            simple_block(1, 5_000),
        ]
        .concat();
        assert_eq!(webm(&scaled).duration_ms, Some(15));
    }

    #[test]
    fn a_damaged_webm_gives_what_it_can() {
        let info = el(INFO, &el(DURATION, &1_500.0f32.to_be_bytes()));
        let file = [ebml_header(), unknown(SEGMENT), info].concat();
        assert_eq!(webm(&file).duration_ms, Some(1_500));
        assert_eq!(webm(&file[..file.len() - 2]).duration_ms, None);
        assert_eq!(webm(&[0x1A, 0x45, 0xDF, 0xA3, 0x00]), Facts::default());
        assert_eq!(webm(&[]), Facts::default());
    }
}
