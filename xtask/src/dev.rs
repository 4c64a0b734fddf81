//! `cargo xtask dev`: the whole stack on this machine, until stopped.
//!
//! However it is stopped, nothing it started outlives it: Ctrl-C, SIGTERM
//! and SIGHUP (a closed terminal) stop the children in order, and a
//! watchdog process stops them if this process is killed outright
//! (SIGKILL, a crash). Durable Object state lives in `.wrangler/state`
//! (or `VIBE_DEV_STATE`), so a restart finds the same rooms.
//!
//! Environment (all optional): `DATABASE_URL`; `VIBE_EDGE_PORT` (8787) and
//! `VIBE_ORIGIN_PORT` (8081); `VIBE_DEV_STATE`; `VIBE_DEV_SKIP_BUILD=1` to
//! use what is already built (the tests of this command run it under
//! `cargo test`, which holds the build lock).

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
const ORIGIN_PORT: u16 = 8081;
/// Where the edge listens.
const EDGE_PORT: u16 = 8787;
const DEV_DATABASE: &str = "vibe_dev";
/// The demo logins the ChatBox may offer on a dev server (the Worker
/// answers them at `GET /api/v1/edge/demo` when this var is set, and 404
/// without it, as in production): the users `origin seed-demo` creates
/// (`origin/src/seed.rs`), with their password. The e2e `dev` test checks
/// it against the seed.
const DEMO_LOGINS: &str =
    r#"{"password":"demo-password","accounts":["coach@vibe.fit","alex@vibe.fit","sam@vibe.fit"]}"#;

fn port(var: &str, default: u16) -> anyhow::Result<u16> {
    match std::env::var(var) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{var} is not a port: {v:?}")),
        Err(_) => Ok(default),
    }
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    let origin_addr = format!("127.0.0.1:{}", port("VIBE_ORIGIN_PORT", ORIGIN_PORT)?);
    let edge_port = port("VIBE_EDGE_PORT", EDGE_PORT)?;
    let edge_addr = format!("127.0.0.1:{edge_port}");
    let state_dir = std::env::var("VIBE_DEV_STATE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join(".wrangler/state"));
    let skip_build = std::env::var_os("VIBE_DEV_SKIP_BUILD").is_some();
    let admin_url = pg::ensure(root)?;
    let database_url = match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => {
            pg::ensure_database(&admin_url, DEV_DATABASE)?;
            pg::url_with_database(&admin_url, DEV_DATABASE)
        }
    };
    let secrets = dev_vars(root)?;
    if !skip_build {
        step(
            "build the origin",
            crate::cargo(&["build", "-p", "vibe-origin"]),
        )?;
        // Built here so errors show up front; wrangler's own [build] step
        // is then a quick no-op.
        crate::build_edge(root)?;
    }
    let origin_bin = root.join("target").join("debug").join("origin");
    let origin_env = |cmd: &mut Command| {
        cmd.env("DATABASE_URL", &database_url)
            .env("BIND_ADDR", &origin_addr)
            .env("LOG_FORMAT", "pretty")
            // Web Push to a push service on this machine too (tests, a
            // local mock); the real services stay allowed.
            .env("PUSH_ALLOW_LOOPBACK", "true")
            // The origin calls the edge back: membership changes, and the
            // attachments it processes (thumbnails) and cleans up.
            .env("EDGE_URL", format!("http://{edge_addr}"))
            .envs(secrets.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    };
    let mut seed = Command::new(&origin_bin);
    seed.arg("seed-demo");
    origin_env(&mut seed);
    step("migrate and seed the demo users", seed)?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Ctrl-C, SIGTERM and SIGHUP (the "termination" feature).
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("install the signal handler")?;
    }
    let mut serve = Command::new(&origin_bin);
    serve.arg("serve").process_group(0);
    origin_env(&mut serve);
    let mut children: Vec<(&str, Child)> =
        vec![("origin", serve.spawn().context("start the origin")?)];
    watchdog(&children[0].1);
    if let Err(e) = wait_healthy(&origin_addr, "/healthz", Duration::from_secs(60), &stop) {
        shutdown(&mut children);
        return Err(e);
    }
    let mut wrangler = Command::new(root.join("node_modules/.bin/wrangler"));
    // With builds skipped, wrangler.toml's [build] (`cargo xtask
    // build-edge`) would wait on a build lock held by whoever asked us to
    // skip: run a copy without it. wrangler reads `.dev.vars` beside the
    // config it is given.
    let config_dir = skip_build.then(|| {
        root.join("target")
            .join(format!("wrangler-dev-{}", std::process::id()))
    });
    if let Some(dir) = &config_dir {
        let config = crate::config_without_build(root, dir)?;
        std::fs::copy(root.join(".dev.vars"), dir.join(".dev.vars"))
            .context("copy .dev.vars beside the config")?;
        wrangler.arg("--config").arg(config);
    }
    wrangler
        .args(["dev", "--ip", "127.0.0.1", "--port", &edge_port.to_string()])
        .arg("--persist-to")
        .arg(&state_dir)
        .arg("--var")
        .arg(format!("ORIGIN_URL:http://{origin_addr}"))
        .arg("--var")
        .arg(format!(
            "ALLOWED_ORIGINS:http://{edge_addr},http://localhost:{edge_port}"
        ))
        .arg("--var")
        .arg(format!("DEMO_LOGINS:{DEMO_LOGINS}"))
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
        Ok(child) => {
            watchdog(&child);
            children.push(("wrangler dev", child));
        }
        Err(e) => {
            shutdown(&mut children);
            return Err(e).context("start wrangler dev");
        }
    }
    if let Err(e) = wait_healthy(
        &edge_addr,
        "/api/v1/edge/health",
        Duration::from_secs(180),
        &stop,
    ) {
        shutdown(&mut children);
        return Err(e);
    }
    banner(&edge_addr, &origin_addr, &state_dir);
    let result = supervise(&mut children, &stop);
    shutdown(&mut children);
    if let Some(dir) = config_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn banner(edge: &str, origin: &str, state: &Path) {
    println!(
        "\n  Vibe Chat is running.\n\n  \
         edge (open this): http://{edge}\n  \
         WebSocket:        ws://{edge}/api/v1/chat/conversations/{{id}}/ws?token=…\n  \
         origin (REST):    http://{origin}\n  \
         OpenAPI:          http://{edge}/api/openapi.json\n  \
         room state:       {} (kept across restarts)\n\n  \
         Demo logins (password: demo-password)\n    \
         coach@vibe.fit  trainer\n    \
         alex@vibe.fit   member\n    \
         sam@vibe.fit    member\n\n  \
         Ctrl-C stops everything.\n",
        state.display()
    );
}

/// A process that outlives us only to stop `child`'s process group if we
/// die without doing it ourselves (SIGKILL, a crash): it polls our pid and,
/// once we are gone, sends SIGTERM to the group, then SIGKILL. In its own
/// process group, so the signals meant for us do not reach it first.
fn watchdog(child: &Child) {
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; \
         kill -TERM -{group} 2>/dev/null; sleep 3; kill -KILL -{group} 2>/dev/null",
        me = std::process::id(),
        group = child.id()
    );
    let spawned = Command::new("sh")
        .args(["-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn();
    if let Err(e) = spawned {
        eprintln!("warning: no watchdog for pid {}: {e}", child.id());
    }
}

/// Waits until a child exits (an error) or a signal (a clean stop).
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

/// Makes a new secret.
type Generator = fn() -> anyhow::Result<String>;

/// The local secrets in `.dev.vars` (git-ignored; wrangler reads the same
/// file), each generated on first use and kept: the JWT and service
/// secrets, and the origin's VAPID key for Web Push (the browsers'
/// subscriptions are bound to it, so it must not change from run to run).
/// Never printed.
pub fn dev_vars(root: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let path = root.join(".dev.vars");
    let wanted: [(&str, Generator); 3] = [
        ("JWT_SECRET", random_secret),
        ("ORIGIN_SERVICE_SECRET", random_secret),
        ("VAPID_PRIVATE_KEY", vapid_private_key),
    ];
    let mut vars: Vec<(String, String)> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect();
    let mut changed = false;
    for (key, generate) in wanted {
        if !vars.iter().any(|(k, v)| k == key && !v.is_empty()) {
            vars.retain(|(k, _)| k != key);
            vars.push((key.to_owned(), generate()?));
            changed = true;
        }
    }
    if changed {
        let text: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        std::fs::write(&path, text).context("write .dev.vars")?;
    }
    Ok(vars)
}

/// 32 random bytes.
fn random_bytes() -> anyhow::Result<[u8; 32]> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("read /dev/urandom")?;
    Ok(bytes)
}

/// 32 random bytes as hex.
fn random_secret() -> anyhow::Result<String> {
    Ok(random_bytes()?.iter().map(|b| format!("{b:02x}")).collect())
}

/// A P-256 private key as the origin's `VAPID_PRIVATE_KEY` takes it:
/// base64url (unpadded) of the 32-byte scalar.
fn vapid_private_key() -> anyhow::Result<String> {
    use base64::Engine as _;
    loop {
        let bytes = random_bytes()?;
        // 32 random bytes are at or above the curve order (or zero) with
        // odds of about 2^-32: draw again then.
        if p256::SecretKey::from_slice(&bytes).is_ok() {
            return Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_local_secrets_gain_a_vapid_key_once_and_keep_every_value() {
        let root = std::env::temp_dir().join(format!("xtask-dev-vars-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        // A machine set up before Web Push: its secrets stay as they are.
        std::fs::write(
            root.join(".dev.vars"),
            "JWT_SECRET=aaaa\nORIGIN_SERVICE_SECRET=bbbb\n",
        )
        .unwrap();
        let first = dev_vars(&root).unwrap();
        let get = |vars: &[(String, String)], key: &str| {
            vars.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get(&first, "JWT_SECRET"), "aaaa");
        assert_eq!(get(&first, "ORIGIN_SERVICE_SECRET"), "bbbb");
        let key = get(&first, "VAPID_PRIVATE_KEY");
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&key)
            .unwrap();
        assert!(p256::SecretKey::from_slice(&bytes).is_ok());
        // Generated once: the next run reads the same key.
        assert_eq!(dev_vars(&root).unwrap(), first);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
