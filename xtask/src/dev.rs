//! `cargo xtask dev`: the whole stack on this machine, until Ctrl-C.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{pg, step};

/// Where the origin listens in development (wrangler.toml's ORIGIN_URL).
pub const ORIGIN_ADDR: &str = "127.0.0.1:8081";
/// Where the edge listens.
pub const EDGE_ADDR: &str = "127.0.0.1:8787";
const DEV_DATABASE: &str = "vibe_dev";

pub fn run(root: &Path) -> anyhow::Result<()> {
    let admin_url = pg::ensure(root)?;
    let database_url = match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => {
            pg::ensure_database(&admin_url, DEV_DATABASE)?;
            pg::url_with_database(&admin_url, DEV_DATABASE)
        }
    };
    let secrets = dev_vars(root)?;
    step(
        "build the origin",
        crate::cargo(&["build", "-p", "vibe-origin"]),
    )?;
    // Built here so errors show up front; wrangler's own [build] step is
    // then a quick no-op.
    crate::build_edge(root)?;
    let origin_bin = root.join("target").join("debug").join("origin");
    let origin_env = |cmd: &mut Command| {
        cmd.env("DATABASE_URL", &database_url)
            .env("BIND_ADDR", ORIGIN_ADDR)
            .env("LOG_FORMAT", "pretty")
            .envs(secrets.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    };
    let mut seed = Command::new(&origin_bin);
    seed.arg("seed-demo");
    origin_env(&mut seed);
    step("migrate and seed the demo users", seed)?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("install the Ctrl-C handler")?;
    }
    let mut serve = Command::new(&origin_bin);
    serve.arg("serve").process_group(0);
    origin_env(&mut serve);
    let mut children: Vec<(&str, Child)> =
        vec![("origin", serve.spawn().context("start the origin")?)];
    if let Err(e) = wait_healthy(ORIGIN_ADDR, "/healthz", Duration::from_secs(60), &stop) {
        shutdown(&mut children);
        return Err(e);
    }
    let (ip, port) = EDGE_ADDR.split_once(':').unwrap_or(("127.0.0.1", "8787"));
    let mut wrangler = Command::new(root.join("node_modules/.bin/wrangler"));
    wrangler
        .args(["dev", "--ip", ip, "--port", port])
        // wrangler's own request log prints raw paths, and the seed's
        // `/api/v1/chat/ws/{token}` route carries a token in its path:
        // keep it to warnings (the origin logs requests, redacted).
        .args([
            "--show-interactive-dev-session=false",
            "--log-level",
            "warn",
        ])
        .env("WRANGLER_SEND_METRICS", "false")
        .current_dir(root)
        // Its own group: stopping it must also stop workerd.
        .process_group(0);
    match wrangler.spawn() {
        Ok(child) => children.push(("wrangler dev", child)),
        Err(e) => {
            shutdown(&mut children);
            return Err(e).context("start wrangler dev");
        }
    }
    if let Err(e) = wait_healthy(
        EDGE_ADDR,
        "/api/v1/edge/health",
        Duration::from_secs(180),
        &stop,
    ) {
        shutdown(&mut children);
        return Err(e);
    }
    banner();
    let result = supervise(&mut children, &stop);
    shutdown(&mut children);
    result
}

fn banner() {
    println!(
        "\n  Vibe Chat is running.\n\n  \
         edge (open this): http://{EDGE_ADDR}\n  \
         WebSocket:        ws://{EDGE_ADDR}/api/v1/chat/conversations/{{id}}/ws?token=…\n  \
         origin (REST):    http://{ORIGIN_ADDR}\n  \
         OpenAPI:          http://{ORIGIN_ADDR}/openapi.json\n\n  \
         Demo logins (password: demo-password)\n    \
         coach@vibe.fit  trainer\n    \
         alex@vibe.fit   member\n    \
         sam@vibe.fit    member\n\n  \
         Ctrl-C stops everything.\n"
    );
}

/// Waits until a child exits (an error) or Ctrl-C (a clean stop).
fn supervise(children: &mut [(&str, Child)], stop: &AtomicBool) -> anyhow::Result<()> {
    loop {
        if stop.load(Ordering::SeqCst) {
            println!("\nstopping…");
            return Ok(());
        }
        for (name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait().context("poll a child")? {
                bail!("{name} exited ({status})");
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGTERM to each child's process group, a grace period, then SIGKILL.
/// Children run in their own groups, so Ctrl-C reaches only us and we stop
/// them in order.
fn shutdown(children: &mut [(&str, Child)]) {
    for (_, child) in children.iter_mut() {
        let _ = Command::new("kill")
            .args(["-s", "TERM", "--", &format!("-{}", child.id())])
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for (_, child) in children.iter_mut() {
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", child.id())])
            .status();
        let _ = child.wait();
    }
}

/// Polls `GET path` on `addr` until it answers 200.
pub fn wait_healthy(
    addr: &str,
    path: &str,
    timeout: Duration,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if http_status(addr, path).is_some_and(|s| s == 200) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("http://{addr}{path} did not become healthy within {timeout:?}")
}

fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The local secrets in `.dev.vars` (git-ignored; wrangler reads the same
/// file), generated on first use.
pub fn dev_vars(root: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let path = root.join(".dev.vars");
    let wanted = ["JWT_SECRET", "ORIGIN_SERVICE_SECRET"];
    let mut vars: Vec<(String, String)> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect();
    let mut changed = false;
    for key in wanted {
        if !vars.iter().any(|(k, v)| k == key && !v.is_empty()) {
            vars.retain(|(k, _)| k != key);
            vars.push((key.to_owned(), random_secret()?));
            changed = true;
        }
    }
    if changed {
        let text: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        std::fs::write(&path, text).context("write .dev.vars")?;
    }
    Ok(vars)
}

/// 32 random bytes as hex.
fn random_secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
