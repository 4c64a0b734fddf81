//! `cargo xtask bench media`: attachments under `wrangler dev` (issue 14).
//!
//! 1. **Upload throughput**: video-typed bodies (`\0\0\0\x20ftypisom` then
//!    filler: sniffed as `video/mp4`, no pixel decoding anywhere) of 8 and
//!    32 MiB, posted back to back by 1 and by 4 clients at once, each its
//!    own user and conversation, `BENCH_MEDIA_MIB` (default 256) MiB per
//!    configuration. Counted at the clients: bytes acknowledged with 201,
//!    refusals by status, transport errors, and the wall time from the
//!    first request to the last answer; **MB/s = acknowledged bytes (10⁶)
//!    / wall**. Then the origin's processing of those uploads (it fetches
//!    each video's original back from the edge to read the container) is
//!    let finish before anything else runs, and checked: every 201 must be
//!    one `ready` row in PostgreSQL, and two objects per configuration are
//!    downloaded back through their signed `url` with the right length
//!    and first bytes.
//! 2. **The loopback ceiling** for the same bytes, clients and counts,
//!    measured next to each configuration: `PUT`s by the same HTTP client
//!    to a tokio TCP sink in this process that parses the request head,
//!    reads the body and discards it, then answers 201. What one local
//!    HTTP hop can carry on this machine, with no storage behind it.
//! 3. **Upload → thumbnail ready**: real JPEGs (4000×3000 and 1600×1200,
//!    encoded once up front with the `image` crate, photo-like content),
//!    uploaded and at once sent in a message by one member while another
//!    member listens on the room's WebSocket. Open loop: upload k is due
//!    at start + k × `BENCH_PHOTO_INTERVAL_MS` (default 1000), and its
//!    latency runs from then to the arrival at the listener of the first
//!    frame that shows it `ready` with a thumbnail (the `message` frame if
//!    it already does, else the `attachment_updated`). `BENCH_PHOTOS`
//!    (default 30) per size per run. A refused upload, a `failed`
//!    attachment or one never ready within 60 s counts as a failure.
//! 4. **The origin's own work per image**: `origin::media::image::process`
//!    (decode, orientation, the full copy and the thumbnail re-encoded) on
//!    the same JPEGs in this process, its thread's CPU time, on the idle
//!    stack after the runs.
//!
//! Every configuration runs `BENCH_RUNS` times (default 3, interleaved);
//! the tables print each column's range over the runs and then every run.
//!
//! Clients reach the workerd runtime directly, past `wrangler dev`'s
//! Node.js proxy (as `fanout` does; `BENCH_VIA_PROXY=1` goes through it).
//! R2 under `wrangler dev` is workerd's local emulation on this machine's
//! disk: the throughput is this machine's loopback, disk and workerd, not
//! Cloudflare's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use e2e::{Stack, StackOptions, User};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::fanout::{drop_database, edge_url};
use crate::report::{CpuSample, Neighbours, busy, loadavg, micros_histogram, ms, range, table};

const MIB: usize = 1024 * 1024;
/// Upload bodies, MiB.
const BODY_SIZES_MIB: &[usize] = &[8, 32];
/// Concurrent upload clients.
const CLIENTS: &[usize] = &[1, 4];
/// Photos: (label, width, height).
const PHOTOS: &[(&str, u32, u32)] = &[("12 MP", 4000, 3000), ("2 MP", 1600, 1200)];
/// Downloads checked per throughput configuration.
const SAMPLES: usize = 2;
/// How long a photo may take to become ready before it counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the origin may take to finish processing a configuration's
/// uploads before the check gives up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(180);
/// Repeats of the origin's own processing per photo.
const PROCESS_REPEATS: usize = 5;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

#[derive(Debug)]
struct Config {
    runs: usize,
    /// MiB uploaded per throughput configuration (split over its clients).
    mib: usize,
    photos: usize,
    interval: Duration,
}

impl Config {
    fn from_env() -> anyhow::Result<Self> {
        let cfg = Self {
            runs: env_or("BENCH_RUNS", 3)?,
            mib: env_or("BENCH_MEDIA_MIB", 256)?,
            photos: env_or("BENCH_PHOTOS", 30)?,
            interval: Duration::from_millis(env_or("BENCH_PHOTO_INTERVAL_MS", 1000)?),
        };
        anyhow::ensure!(
            cfg.runs > 0 && cfg.mib > 0 && cfg.photos > 0 && !cfg.interval.is_zero(),
            "BENCH_RUNS, BENCH_MEDIA_MIB, BENCH_PHOTOS and BENCH_PHOTO_INTERVAL_MS must be positive"
        );
        Ok(cfg)
    }

    fn reportable(&self) -> bool {
        self.runs >= 3 && self.mib >= 256 && self.photos >= 30
    }

    /// Files per client for a body size and a number of clients: at least
    /// `mib` in all, at least one each.
    fn files_per_client(&self, body_mib: usize, clients: usize) -> usize {
        let files = self.mib.div_ceil(body_mib);
        files.div_ceil(clients).max(1)
    }
}

/// The origin's settings for the bench: limits and quota out of the way
/// (the product's defaults would rightly stop one user uploading GiBs;
/// the quota's largest setting is 10 GiB, and each configuration has
/// fresh users).
fn origin_vars() -> Vec<(String, String)> {
    [
        ("MEDIA_MAX_VIDEO_BYTES", "268435456"),
        ("MEDIA_MAX_IMAGE_BYTES", "67108864"),
        ("MEDIA_DAILY_QUOTA_BYTES", "10737418240"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

/// A body the edge sniffs as `video/mp4`: an `ftyp` box, then filler.
fn video_body(bytes: usize) -> &'static [u8] {
    let mut v = b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2avc1mp41".to_vec();
    let mut x: u32 = 0x1234_5678;
    while v.len() < bytes {
        // xorshift: bytes that no layer could compress away.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(bytes);
    // Kept for the whole bench; every request borrows it (no copies).
    v.leak()
}

/// A JPEG of `width`×`height` that compresses like a photo: smooth
/// gradients and shapes with a little sensor-like noise.
fn photo(width: u32, height: u32) -> anyhow::Result<Vec<u8>> {
    let mut x: u32 = 0x9E37_79B9;
    let img = image::RgbImage::from_fn(width, height, |px, py| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let noise = (x & 0x0F) as i32 - 8;
        let fx = px as f32 / width as f32;
        let fy = py as f32 / height as f32;
        let wave = ((fx * 23.0).sin() * (fy * 17.0).cos() * 40.0) as i32;
        let ch = |base: f32, k: f32| -> u8 {
            (base * 255.0 * k + wave as f32 + noise as f32).clamp(0.0, 255.0) as u8
        };
        image::Rgb([ch(fx, 0.9), ch(fy, 0.8), ch(1.0 - fx * fy, 0.7)])
    });
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&img)
        .context("encode the photo")?;
    Ok(jpeg)
}

pub async fn run() -> anyhow::Result<()> {
    let cfg = Config::from_env()?;
    let began = Instant::now();
    crate::report::build("media", "the origin, its image processing and the clients");
    println!(
        "edge: edge-worker/build as built by `cargo xtask build-edge` (worker-build --release) under wrangler dev; R2 is workerd's local emulation on this machine's disk"
    );
    println!(
        "BENCH_RUNS={} BENCH_MEDIA_MIB={} BENCH_PHOTOS={} BENCH_PHOTO_INTERVAL_MS={}",
        cfg.runs,
        cfg.mib,
        cfg.photos,
        cfg.interval.as_millis()
    );
    if !cfg.reportable() {
        println!(
            "NOTE: fewer than 3 runs, 256 MiB or 30 photos: a smoke run, not figures for docs/BENCHMARKS.md"
        );
    }

    let photos: Vec<Photo> = tokio::task::spawn_blocking(|| {
        PHOTOS
            .iter()
            .map(|&(label, w, h)| {
                Ok(Photo {
                    label,
                    width: w,
                    height: h,
                    jpeg: photo(w, h)?.leak(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    for p in &photos {
        println!(
            "photo {} ({}×{}): {:.2} MB JPEG q90",
            p.label,
            p.width,
            p.height,
            p.jpeg.len() as f64 / 1e6
        );
    }
    let bodies: Vec<(usize, &'static [u8])> = BODY_SIZES_MIB
        .iter()
        .map(|&m| (m, video_body(m * MIB)))
        .collect();

    let verbose = std::env::var_os("BENCH_VERBOSE").is_some();
    if verbose {
        // The origin's log (its processing retries) with wrangler's output.
        origin::telemetry::init(false);
    }
    let sink = Sink::start().await?;
    let stack = Stack::start(StackOptions {
        origin_vars: origin_vars(),
        verbose,
        ..StackOptions::default()
    })
    .await?;
    let base = edge_url(&stack).await?;
    let database: String = stack
        .pool
        .get()
        .await?
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);

    let outcome = measure(&cfg, &stack, &base, &sink, &bodies, &photos).await;
    drop(stack);
    if let Err(e) = drop_database(&database).await {
        println!("could not drop the bench's database {database}: {e:#}");
    }
    let (tp, thumbs) = outcome?;
    let processing = origin_processing(&photos).await?;

    print_throughput(&cfg, &tp);
    print_thumbs(&cfg, &thumbs, &processing);
    println!(
        "\nmedia bench done in {:.1} min",
        began.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

#[derive(Debug)]
struct Photo {
    label: &'static str,
    width: u32,
    height: u32,
    jpeg: &'static [u8],
}

/// Every configuration, `cfg.runs` times, interleaved.
async fn measure(
    cfg: &Config,
    stack: &Stack,
    base: &str,
    sink: &Sink,
    bodies: &[(usize, &'static [u8])],
    photos: &[Photo],
) -> anyhow::Result<(Vec<Throughput>, Vec<Thumbs>)> {
    let mut tp = Vec::new();
    let mut thumbs = Vec::new();
    for run in 1..=cfg.runs {
        for &(mib, body) in bodies {
            for &clients in CLIENTS {
                let files = cfg.files_per_client(mib, clients);
                let load = loadavg();
                let neighbours = busy(Duration::from_secs(1)).await;
                println!(
                    "\nrun {run}/{} · upload {mib} MiB × {files} per client, {clients} client(s) · load average {load} · {neighbours}",
                    cfg.runs
                );
                let ceiling = sink.throughput(body, clients, files).await?;
                let mut r = upload_throughput(stack, base, body, clients, files)
                    .await
                    .with_context(|| format!("run {run}, {mib} MiB × {clients}"))?;
                r.run = run;
                r.mib = mib;
                r.ceiling_mbps = ceiling;
                r.load = load;
                println!(
                    "  201 {} ({:.0} MB) in {:.2} s: {:.1} MB/s · refused {} · errors {} · loopback sink {:.0} MB/s · PostgreSQL ready {} of {} (other states {}) after {:.1} s, {} retried attempt(s) seen · downloads {}/{} right",
                    r.created,
                    r.bytes as f64 / 1e6,
                    r.wall.as_secs_f64(),
                    r.mbps(),
                    refused_cell(&r.refused),
                    r.errors,
                    r.ceiling_mbps,
                    r.pg_ready,
                    r.created,
                    r.pg_other,
                    r.settle.as_secs_f64(),
                    r.attempts,
                    r.downloads_ok,
                    r.downloads,
                );
                println!(
                    "  downloads back through the edge: {} MB/s · CPU during the uploads: {}",
                    range(&r.download_mbps, 0),
                    r.cpu
                );
                if let Some(e) = &r.first_error {
                    println!("  first error: {e}");
                }
                tp.push(r);
            }
        }
        for p in photos {
            let load = loadavg();
            let neighbours = busy(Duration::from_secs(1)).await;
            println!(
                "\nrun {run}/{} · photo {} × {} every {} ms · load average {load} · {neighbours}",
                cfg.runs,
                p.label,
                cfg.photos,
                cfg.interval.as_millis()
            );
            let mut t = thumbnails(stack, base, p, cfg, run)
                .await
                .with_context(|| format!("run {run}, thumbnails of {}", p.label))?;
            t.load = load;
            println!(
                "  ready {} of {} · failed {} · upload→ready p50 {} p99 {} max {} ms · the POST alone p50 {} ms · ready seen first on the message frame {} times, on attachment_updated {}",
                t.ready,
                t.scheduled,
                t.failures(),
                ms(t.latency.value_at_quantile(0.5)),
                ms(t.latency.value_at_quantile(0.99)),
                ms(t.latency.max()),
                ms(t.post.value_at_quantile(0.5)),
                t.via_message,
                t.via_update,
            );
            if let Some(e) = &t.first_error {
                println!("  first error: {e}");
            }
            thumbs.push(t);
        }
    }
    Ok((tp, thumbs))
}

// ---------------------------------------------------------------------
// Upload throughput

#[derive(Debug, Default)]
struct Throughput {
    run: usize,
    mib: usize,
    clients: usize,
    files_per_client: usize,
    /// Uploads answered 201, and their bytes.
    created: usize,
    bytes: u64,
    /// Other answers, by status.
    refused: BTreeMap<u16, usize>,
    /// No answer (connection, timeout).
    errors: usize,
    first_error: Option<String>,
    wall: Duration,
    ceiling_mbps: f64,
    /// Rows of this configuration's uploaders in PostgreSQL once the
    /// origin is done: `ready`, and anything else.
    pg_ready: i64,
    pg_other: i64,
    /// From the last answer until no row was uploading or processing.
    settle: Duration,
    /// The most failed processing attempts seen on any pending row while
    /// waiting (0: no retry; a success resets the column, so this is polled).
    attempts: i32,
    downloads: usize,
    downloads_ok: usize,
    /// MB/s of each sample download (the same objects read back through
    /// the edge from R2).
    download_mbps: Vec<f64>,
    /// The machine's busiest processes during the upload window.
    cpu: String,
    load: String,
}

impl Throughput {
    fn mbps(&self) -> f64 {
        if self.wall.is_zero() {
            return 0.0;
        }
        self.bytes as f64 / 1e6 / self.wall.as_secs_f64()
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct ClientTally {
    created: usize,
    bytes: u64,
    refused: BTreeMap<u16, usize>,
    errors: usize,
    first_error: Option<String>,
    /// Signed download paths of its 201s.
    urls: Vec<String>,
}

async fn upload_throughput(
    stack: &Stack,
    base: &str,
    body: &'static [u8],
    clients: usize,
    files: usize,
) -> anyhow::Result<Throughput> {
    let mut users = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (alex, _sam, conv) = stack.pair().await?;
        users.push((alex, conv));
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let cpu_before = CpuSample::take();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for (user, conv) in users.clone() {
        let http = http.clone();
        let base = base.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut t = ClientTally::default();
            for k in 0..files {
                let res = http
                    .post(format!(
                        "{base}/api/v1/chat/conversations/{conv}/attachments?name=bench-{k}.mp4"
                    ))
                    .bearer_auth(&user.token)
                    .header("content-type", "video/mp4")
                    .body(reqwest::Body::from(body))
                    .send()
                    .await;
                let res = match res {
                    Ok(res) => res,
                    Err(e) => {
                        t.errors += 1;
                        t.first_error.get_or_insert_with(|| format!("{e:#}"));
                        continue;
                    }
                };
                let status = res.status().as_u16();
                let text = res.text().await.unwrap_or_default();
                if status == 201 {
                    t.created += 1;
                    t.bytes += body.len() as u64;
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    if let Some(url) = v["url"].as_str() {
                        t.urls.push(url.to_owned());
                    }
                } else {
                    *t.refused.entry(status).or_default() += 1;
                    t.first_error
                        .get_or_insert_with(|| format!("{status} {text}"));
                }
            }
            t
        }));
    }
    let mut r = Throughput {
        clients,
        files_per_client: files,
        ..Throughput::default()
    };
    let mut urls = Vec::new();
    for task in tasks {
        let t = task.await?;
        r.created += t.created;
        r.bytes += t.bytes;
        r.errors += t.errors;
        for (s, n) in t.refused {
            *r.refused.entry(s).or_default() += n;
        }
        if r.first_error.is_none() {
            r.first_error = t.first_error;
        }
        urls.extend(t.urls);
    }
    r.wall = started.elapsed();
    if let (Some(before), Some(after)) = (cpu_before, CpuSample::take()) {
        let all = Neighbours::between(&before, &after, &HashSet::new());
        r.cpu = format!("{:.0} % of one core: {}", all.cpu, all.top);
    }

    // The origin fetches every original back to read its container: let it
    // finish (outside the measured window) and check what it recorded.
    let ids: Vec<i64> = users.iter().map(|(u, _)| u.id).collect();
    let settle_start = Instant::now();
    let db = stack.pool.get().await?;
    loop {
        let rows = db
            .query(
                "SELECT state, count(*), max(attempts) FROM attachments
                 WHERE uploader_id = ANY($1) GROUP BY state",
                &[&ids],
            )
            .await?;
        let mut ready = 0;
        let mut pending = 0;
        let mut other = 0;
        for row in rows {
            let state: String = row.get(0);
            let n: i64 = row.get(1);
            let attempts: Option<i32> = row.get(2);
            r.attempts = r.attempts.max(attempts.unwrap_or(0));
            match state.as_str() {
                "ready" => ready += n,
                "uploading" | "processing" => pending += n,
                _ => other += n,
            }
        }
        if pending == 0 || settle_start.elapsed() > SETTLE_TIMEOUT {
            r.pg_ready = ready;
            r.pg_other = other + pending;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.settle = settle_start.elapsed();

    // A sample back through the signed links: the first and the last.
    let picks: Vec<&String> = match urls.len() {
        0 => Vec::new(),
        1 => vec![&urls[0]],
        n => vec![&urls[0], &urls[n - 1]],
    };
    for url in picks.into_iter().take(SAMPLES) {
        r.downloads += 1;
        let started = Instant::now();
        let ok = async {
            let res = http.get(format!("{base}{url}")).send().await?;
            anyhow::ensure!(res.status() == 200, "download {}", res.status());
            let got = res.bytes().await?;
            Ok(got.len() == body.len() && got[..64] == body[..64])
        }
        .await;
        if matches!(ok, Ok(true)) {
            r.download_mbps
                .push(body.len() as f64 / 1e6 / started.elapsed().as_secs_f64());
        }
        match ok {
            Ok(true) => r.downloads_ok += 1,
            Ok(false) => {
                r.first_error
                    .get_or_insert_with(|| "a download came back different".to_owned());
            }
            Err(e) => {
                r.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    Ok(r)
}

fn refused_cell(refused: &BTreeMap<u16, usize>) -> String {
    if refused.is_empty() {
        return "0".to_owned();
    }
    refused
        .iter()
        .map(|(s, n)| format!("{n}×{s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The ceiling: a local HTTP/1.1 server that reads each request's body
/// and throws it away.
#[derive(Debug)]
struct Sink {
    url: String,
    _stop: watch::Sender<bool>,
}

impl Sink {
    async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/sink", listener.local_addr()?);
        let (stop, mut stopped) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.changed() => return,
                    accepted = listener.accept() => {
                        let Ok((conn, _)) = accepted else { continue };
                        tokio::spawn(async move {
                            let _ = sink_conn(conn).await;
                        });
                    }
                }
            }
        });
        Ok(Self { url, _stop: stop })
    }

    /// MB/s of `clients` each `PUT`ting `body` `files` times, back to back.
    async fn throughput(
        &self,
        body: &'static [u8],
        clients: usize,
        files: usize,
    ) -> anyhow::Result<f64> {
        let http = reqwest::Client::new();
        let started = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let http = http.clone();
                let url = self.url.clone();
                tokio::spawn(async move {
                    let mut bytes = 0u64;
                    for _ in 0..files {
                        let res = http
                            .put(&url)
                            .header("content-type", "video/mp4")
                            .body(reqwest::Body::from(body))
                            .send()
                            .await?;
                        anyhow::ensure!(res.status() == 201, "sink answered {}", res.status());
                        res.bytes().await?;
                        bytes += body.len() as u64;
                    }
                    Ok(bytes)
                })
            })
            .collect();
        let mut bytes = 0;
        for t in tasks {
            bytes += t.await??;
        }
        Ok(bytes as f64 / 1e6 / started.elapsed().as_secs_f64())
    }
}

/// One keep-alive connection to the sink.
async fn sink_conn(conn: tokio::net::TcpStream) -> anyhow::Result<()> {
    let (read, mut write) = conn.into_split();
    let mut read = BufReader::with_capacity(256 * 1024, read);
    let mut line = String::new();
    let mut scratch = vec![0u8; 256 * 1024];
    loop {
        let mut length: u64 = 0;
        let mut first = true;
        loop {
            line.clear();
            if read.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let l = line.trim_end();
            if l.is_empty() {
                if first {
                    continue;
                }
                break;
            }
            first = false;
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut left = length;
        while left > 0 {
            let want = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(scratch.len());
            let n = read.read(&mut scratch[..want]).await?;
            if n == 0 {
                return Ok(());
            }
            left -= n as u64;
        }
        write
            .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
            .await?;
    }
}

// ---------------------------------------------------------------------
// Upload → thumbnail ready

#[derive(Debug)]
struct Thumbs {
    run: usize,
    label: &'static str,
    scheduled: usize,
    /// Uploads answered with something other than 201 (or nothing).
    refused: usize,
    /// Attachments that came back `failed`.
    failed: usize,
    /// Neither ready nor failed within [`READY_TIMEOUT`].
    never: usize,
    ready: usize,
    latency: Histogram<u64>,
    /// The upload request alone, from its scheduled time to the 201.
    post: Histogram<u64>,
    via_message: usize,
    via_update: usize,
    first_error: Option<String>,
    load: String,
}

impl Thumbs {
    fn failures(&self) -> usize {
        self.refused + self.failed + self.never
    }
}

/// Which frame first showed an attachment ready.
#[derive(Debug, Clone, Copy)]
enum Seen {
    Message,
    Update,
    Failed,
}

type Arrivals = Arc<Mutex<HashMap<String, (Instant, Seen)>>>;

async fn thumbnails(
    stack: &Stack,
    base: &str,
    photo: &Photo,
    cfg: &Config,
    run: usize,
) -> anyhow::Result<Thumbs> {
    let (alex, sam, conv) = stack.pair().await?;
    let ws_base = base.replacen("http", "ws", 1);
    let connect = |user: &User| {
        format!(
            "{ws_base}/api/v1/chat/conversations/{conv}/ws?token={}",
            user.token
        )
    };
    let (listener, _) = tokio_tungstenite::connect_async(connect(&sam))
        .await
        .context("connect the listener")?;
    let (sender, _) = tokio_tungstenite::connect_async(connect(&alex))
        .await
        .context("connect the sender")?;
    let (mut sender_tx, mut sender_rx) = sender.split();
    let (_listener_tx, mut listener_rx) = listener.split();

    // The listener: when each attachment first showed ready (or failed).
    let arrivals: Arrivals = Arc::default();
    let seen = Arc::clone(&arrivals);
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = listener_rx.next().await {
            let Message::Text(text) = m else { continue };
            let now = Instant::now();
            let Ok(f) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let (atts, via) = match f["type"].as_str() {
                Some("message") => (
                    f["message"]["attachments"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                    Seen::Message,
                ),
                Some("attachment_updated") => (vec![f["attachment"].clone()], Seen::Update),
                _ => continue,
            };
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            for a in atts {
                let Some(id) = a["id"].as_str() else { continue };
                let state = if a["status"] == "ready" && a["has_thumbnail"] == true {
                    via
                } else if a["status"] == "failed" {
                    Seen::Failed
                } else {
                    continue;
                };
                seen.entry(id.to_owned()).or_insert((now, state));
            }
        }
    });
    // The sender's own frames (acks, its copy): read and counted.
    let sender_errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let errors = Arc::clone(&sender_errors);
    let drain = tokio::spawn(async move {
        while let Some(Ok(m)) = sender_rx.next().await {
            if let Message::Text(t) = m {
                if t.contains(r#""type":"error""#) {
                    errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(t.to_string());
                }
            }
        }
    });

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut t = Thumbs {
        run,
        label: photo.label,
        scheduled: cfg.photos,
        refused: 0,
        failed: 0,
        never: 0,
        ready: 0,
        latency: micros_histogram()?,
        post: micros_histogram()?,
        via_message: 0,
        via_update: 0,
        first_error: None,
        load: String::new(),
    };
    let mut due_of: Vec<(String, Instant)> = Vec::with_capacity(cfg.photos);
    let start = Instant::now() + Duration::from_millis(200);
    for k in 0..cfg.photos {
        let due = start + cfg.interval * u32::try_from(k)?;
        tokio::time::sleep_until(due.into()).await;
        let res = http
            .post(format!(
                "{base}/api/v1/chat/conversations/{conv}/attachments?name=IMG_{k:04}.jpg"
            ))
            .bearer_auth(&alex.token)
            .header("content-type", "image/jpeg")
            .body(reqwest::Body::from(photo.jpeg))
            .send()
            .await;
        let (status, text) = match res {
            Ok(res) => (res.status().as_u16(), res.text().await.unwrap_or_default()),
            Err(e) => (0, format!("{e:#}")),
        };
        if status != 201 {
            t.refused += 1;
            t.first_error
                .get_or_insert_with(|| format!("upload {status} {text}"));
            continue;
        }
        t.post
            .record(u64::try_from(due.elapsed().as_micros())?.max(1))?;
        let up: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let Some(id) = up["id"].as_str() else {
            t.refused += 1;
            t.first_error
                .get_or_insert_with(|| format!("a 201 without an id: {text}"));
            continue;
        };
        sender_tx
            .send(Message::text(
                json!({"type": "message", "conversation_id": conv,
                       "content": format!("photo {k}"),
                       "client_msg_id": format!("r{run}-{}-{k}", photo.width),
                       "attachment_ids": [id]})
                .to_string(),
            ))
            .await
            .context("send the message")?;
        due_of.push((id.to_owned(), due));
    }

    // Wait for every sent photo to be ready (or failed), up to the limit.
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let done = {
            let seen = arrivals.lock().unwrap_or_else(|p| p.into_inner());
            due_of.iter().all(|(id, _)| seen.contains_key(id))
        };
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reader.abort();
    drain.abort();
    let _ = sender_tx.close().await;
    let seen = arrivals.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (id, due) in &due_of {
        match seen.get(id) {
            Some((_, Seen::Failed)) => t.failed += 1,
            Some((at, via)) => {
                t.ready += 1;
                t.latency.record(
                    u64::try_from(at.saturating_duration_since(*due).as_micros())?.max(1),
                )?;
                match via {
                    Seen::Message => t.via_message += 1,
                    _ => t.via_update += 1,
                }
            }
            None => t.never += 1,
        }
    }
    if let Some(e) = sender_errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .first()
    {
        t.first_error.get_or_insert_with(|| format!("sender: {e}"));
    }
    Ok(t)
}

/// The origin's work per photo, in this process on the idle stack: the
/// CPU time of the thread that ran `origin::media::image::process`,
/// milliseconds, `PROCESS_REPEATS` times each.
async fn origin_processing(photos: &[Photo]) -> anyhow::Result<Vec<(&'static str, Vec<f64>)>> {
    let mut out = Vec::new();
    for p in photos {
        let jpeg = p.jpeg;
        let times = tokio::task::spawn_blocking(move || {
            let mut times = Vec::with_capacity(PROCESS_REPEATS);
            for _ in 0..PROCESS_REPEATS {
                let before = thread_cpu();
                let done = origin::media::image::process(jpeg);
                let after = thread_cpu();
                anyhow::ensure!(done.is_ok(), "the origin could not process the photo");
                times.push((after - before).as_secs_f64() * 1000.0);
            }
            Ok(times)
        })
        .await??;
        out.push((p.label, times));
    }
    Ok(out)
}

/// This thread's CPU time (user + system).
fn thread_cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_THREAD) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
                    + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

// ---------------------------------------------------------------------
// Tables

fn print_throughput(cfg: &Config, results: &[Throughput]) {
    let mut rows = Vec::new();
    for &mib in BODY_SIZES_MIB {
        for &clients in CLIENTS {
            let rs: Vec<&Throughput> = results
                .iter()
                .filter(|r| r.mib == mib && r.clients == clients)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let v = |f: &dyn Fn(&Throughput) -> f64| rs.iter().map(|r| f(r)).collect::<Vec<_>>();
            let refused: usize = rs.iter().map(|r| r.refused.values().sum::<usize>()).sum();
            let errors: usize = rs.iter().map(|r| r.errors).sum();
            let created: usize = rs.iter().map(|r| r.created).sum();
            let ready: i64 = rs.iter().map(|r| r.pg_ready).sum();
            let dl: usize = rs.iter().map(|r| r.downloads).sum();
            let dl_ok: usize = rs.iter().map(|r| r.downloads_ok).sum();
            rows.push(vec![
                format!("{mib} MiB"),
                clients.to_string(),
                format!("{} × {}", clients, rs[0].files_per_client),
                range(&v(&|r| r.mbps()), 1),
                range(&v(&|r| r.ceiling_mbps), 0),
                range(&v(&|r| r.mbps() / r.ceiling_mbps * 100.0), 1),
                format!("{refused} / {errors}"),
                format!("{ready} of {created}"),
                format!("{dl_ok} of {dl}"),
                range(
                    &rs.iter()
                        .flat_map(|r| r.download_mbps.iter().copied())
                        .collect::<Vec<_>>(),
                    0,
                ),
            ]);
        }
    }
    table(
        &format!(
            "Upload throughput through the edge into R2 (min–max of {} runs)",
            cfg.runs
        ),
        &[
            "body",
            "clients",
            "uploads per run",
            "MB/s through the edge",
            "loopback sink MB/s (ceiling)",
            "% of ceiling",
            "refused / errors (all runs)",
            "ready rows in PostgreSQL / 201s (all runs)",
            "downloads back intact",
            "download MB/s (same objects, through the edge)",
        ],
        &rows,
    );
    let per_run: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.run.to_string(),
                format!("{} MiB", r.mib),
                r.clients.to_string(),
                r.created.to_string(),
                format!("{:.2}", r.wall.as_secs_f64()),
                format!("{:.1}", r.mbps()),
                format!("{:.0}", r.ceiling_mbps),
                refused_cell(&r.refused),
                r.errors.to_string(),
                format!("{} (+{} other)", r.pg_ready, r.pg_other),
                format!("{:.1} ({})", r.settle.as_secs_f64(), r.attempts),
                r.load.clone(),
                r.cpu.clone(),
            ]
        })
        .collect();
    table(
        "Upload throughput, every run",
        &[
            "run",
            "body",
            "clients",
            "201s",
            "wall s",
            "MB/s",
            "sink MB/s",
            "refused",
            "errors",
            "ready rows",
            "origin done after s (retries seen)",
            "load avg before",
            "CPU during the uploads (busiest processes)",
        ],
        &per_run,
    );
    println!(
        "\nMB/s = bytes acknowledged with 201 (10⁶ bytes) / wall time from the first request to the last answer. The origin's processing (a fetch of each original back from the edge) is let finish before the next configuration."
    );
}

fn print_thumbs(cfg: &Config, results: &[Thumbs], processing: &[(&'static str, Vec<f64>)]) {
    let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let mut rows = Vec::new();
    for &(label, w, h) in PHOTOS {
        let rs: Vec<&Thumbs> = results.iter().filter(|t| t.label == label).collect();
        if rs.is_empty() {
            continue;
        }
        let v = |f: &dyn Fn(&Thumbs) -> f64| rs.iter().map(|t| f(t)).collect::<Vec<_>>();
        let fails: usize = rs.iter().map(|t| t.failures()).sum();
        let cpu = processing
            .iter()
            .find(|(l, _)| *l == label)
            .map(|(_, t)| range(t, 0))
            .unwrap_or_default();
        rows.push(vec![
            format!("{label} ({w}×{h})"),
            cfg.photos.to_string(),
            range(&v(&|t| q(&t.latency, 0.5)), 0),
            range(&v(&|t| q(&t.latency, 0.99)), 0),
            range(&v(&|t| t.latency.max() as f64 / 1000.0), 0),
            range(&v(&|t| q(&t.post, 0.5)), 0),
            fails.to_string(),
            cpu,
        ]);
    }
    table(
        &format!(
            "Upload → thumbnail ready at another member, ms (min–max of {} runs)",
            cfg.runs
        ),
        &[
            "photo",
            "uploads per run",
            "p50",
            "p99",
            "max",
            "the upload's 201 alone, p50",
            "failures (all runs)",
            "origin's processing, CPU ms per image",
        ],
        &rows,
    );
    let per_run: Vec<Vec<String>> = results
        .iter()
        .map(|t| {
            vec![
                t.run.to_string(),
                t.label.to_owned(),
                format!("{} of {}", t.ready, t.scheduled),
                format!("{} / {} / {}", t.refused, t.failed, t.never),
                ms(t.latency.value_at_quantile(0.5)),
                ms(t.latency.value_at_quantile(0.99)),
                ms(t.latency.max()),
                ms(t.post.value_at_quantile(0.5)),
                format!("{} / {}", t.via_message, t.via_update),
                t.load.clone(),
            ]
        })
        .collect();
    table(
        "Upload → thumbnail ready, every run",
        &[
            "run",
            "photo",
            "ready",
            "refused / failed / never",
            "p50 ms",
            "p99 ms",
            "max ms",
            "201 p50 ms",
            "first ready on message / attachment_updated",
            "load avg before",
        ],
        &per_run,
    );
    println!(
        "\nLatency runs from the upload's scheduled start (open loop, one every {} ms) to the arrival at the listening member of the first frame showing it ready with a thumbnail. With {} uploads a run (under 100), a run's p99 is its largest sample. Origin's processing: origin::media::image::process on the same JPEG in this process after the runs, its thread's CPU time, {} times each (min–max).",
        cfg.interval.as_millis(),
        cfg.photos,
        PROCESS_REPEATS
    );
}
