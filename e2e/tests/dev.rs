//! `cargo xtask dev` as a developer uses it: it starts everything, keeps
//! the rooms' Durable Object state across its own restarts, and leaves
//! nothing running however it is stopped (SIGHUP from a closed terminal,
//! or SIGKILL, which it cannot catch: a watchdog does the stopping then).
//!
//! Runs the already built `target/debug/xtask` with builds skipped (this
//! test runs under `cargo test`, which holds the build lock), on free
//! ports, with its own database and state directory.

#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use e2e::stack::{TempDir, free_port, workspace_root};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

struct Dev {
    edge_port: u16,
    origin_port: u16,
    state: TempDir,
    database_url: String,
}

impl Dev {
    /// Starts `xtask dev` and waits for its banner.
    fn start(&self) -> anyhow::Result<Child> {
        let root = workspace_root();
        let mut child = Command::new(root.join("target/debug/xtask"))
            .arg("dev")
            .current_dir(&root)
            .env("DATABASE_URL", &self.database_url)
            .env("VIBE_EDGE_PORT", self.edge_port.to_string())
            .env("VIBE_ORIGIN_PORT", self.origin_port.to_string())
            .env("VIBE_DEV_STATE", self.state.path())
            .env("VIBE_DEV_SKIP_BUILD", "1")
            .env("WRANGLER_SEND_METRICS", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("run target/debug/xtask dev")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("Vibe Chat is running") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(240)).is_err() {
            let _ = child.kill();
            bail!("xtask dev did not come up within 240 s");
        }
        Ok(child)
    }

    fn edge(&self) -> String {
        format!("http://127.0.0.1:{}", self.edge_port)
    }

    /// Every process started for this instance (they all inherit its
    /// unique state directory in their environment): the origin, wrangler,
    /// workerd and the watchdogs.
    fn processes(&self) -> Vec<u32> {
        let marker = format!("VIBE_DEV_STATE={}", self.state.path().display());
        let me = std::process::id();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|pid| *pid != me)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .map(|raw| raw.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Waits until nothing listens on either port any more.
    fn wait_all_stopped(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let listening: Vec<u16> = [self.edge_port, self.origin_port]
                .into_iter()
                .filter(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
                .collect();
            let leftovers = self.processes();
            if listening.is_empty() && leftovers.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "still running after {within:?}: ports {listening:?}, processes {leftovers:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn signal(child: &Child, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-s", sig, &child.id().to_string()])
        .status()?;
    ensure!(status.success(), "kill -s {sig} failed");
    Ok(())
}

fn wait_exit(child: &mut Child, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("xtask dev did not exit within {within:?}")
}

async fn login(edge: &str, email: &str) -> anyhow::Result<(String, i64)> {
    let body: Value = reqwest::Client::new()
        .post(format!("{edge}/api/v1/auth/login"))
        .json(&json!({"email": email, "password": "demo-password"}))
        .send()
        .await?
        .json()
        .await?;
    Ok((
        body["token"].as_str().context("token")?.to_owned(),
        body["user"]["id"].as_i64().context("user id")?,
    ))
}

async fn scenario(dev: &Dev) -> anyhow::Result<()> {
    let mut child = dev.start()?;
    let edge = dev.edge();
    // The demo logins the dev server offers are the seeded ones (xtask
    // keeps its own copy of them).
    let demo: Value = reqwest::Client::new()
        .get(format!("{edge}/api/v1/edge/demo"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let accounts: Vec<&str> = origin::seed::DEMO_USERS
        .iter()
        .map(|(email, _, _)| *email)
        .collect();
    ensure!(
        demo == json!({"password": origin::seed::DEMO_PASSWORD, "accounts": accounts}),
        "xtask's DEMO_LOGINS is not the seed's: {demo}"
    );
    let (alex, _) = login(&edge, "alex@vibe.fit").await?;
    let (_, sam) = login(&edge, "sam@vibe.fit").await?;
    let created: Value = reqwest::Client::new()
        .post(format!("{edge}/api/v1/chat/conversations"))
        .bearer_auth(&alex)
        .json(&json!({"type": "direct", "participant_id": sam}))
        .send()
        .await?
        .json()
        .await?;
    let conv = created["id"].as_i64().context("conversation id")?;
    let ws_url = |since: &str| {
        format!(
            "ws://127.0.0.1:{}/api/v1/chat/conversations/{conv}/ws?token={alex}{since}",
            dev.edge_port
        )
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url("")).await?;
    let frame = json!({"type": "message", "conversation_id": conv,
                       "content": "kept across restarts", "client_msg_id": "dev-1"});
    ws.send(Message::text(frame.to_string())).await?;
    let seq = loop {
        let Some(Ok(Message::Text(t))) = ws.next().await else {
            bail!("the socket closed before the ack");
        };
        let v: Value = serde_json::from_str(&t)?;
        if v["type"] == "ack" {
            break v["seq"].as_i64().context("seq")?;
        }
    };

    // A photo is processed (the origin reaches the edge back): its
    // thumbnail shows up in history.
    let photo = e2e::media::photo_with_location(320, 240)?;
    let up: Value = reqwest::Client::new()
        .post(format!(
            "{edge}/api/v1/chat/conversations/{conv}/attachments"
        ))
        .bearer_auth(&alex)
        .header("content-type", "image/jpeg")
        .body(photo)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let frame = json!({"type": "message", "conversation_id": conv, "content": "",
                       "client_msg_id": "dev-photo", "attachment_ids": [up["id"]]});
    ws.send(Message::text(frame.to_string())).await?;
    e2e::media::eventually(
        "the photo processed under xtask dev",
        Duration::from_secs(60),
        || async {
            let page: Value = reqwest::Client::new()
                .get(format!("{edge}/api/v1/chat/conversations/{conv}/messages"))
                .bearer_auth(&alex)
                .send()
                .await?
                .json()
                .await?;
            let ready = page["messages"].as_array().is_some_and(|m| {
                m.iter().any(|m| {
                    m["attachments"][0]["status"] == "ready"
                        && m["attachments"][0]["thumbnail_url"].is_string()
                })
            });
            Ok(ready.then_some(()))
        },
    )
    .await?;
    println!("    a photo was processed (the origin reaches the edge)");
    drop(ws);

    // A closed terminal: SIGHUP stops everything.
    signal(&child, "HUP")?;
    wait_exit(&mut child, Duration::from_secs(30))?;
    dev.wait_all_stopped(Duration::from_secs(15))?;
    println!("    SIGHUP: xtask dev and everything it started stopped");

    // Started again, the room is still there: a resume from the start is
    // answered from the room's own storage (a lost room would answer
    // `resync` and send the client to REST).
    let mut child = dev.start()?;
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url("&since=0")).await?;
    let first = loop {
        let Some(Ok(Message::Text(t))) = ws.next().await else {
            bail!("the socket closed before the replay");
        };
        let v: Value = serde_json::from_str(&t)?;
        if v["type"] == "message" || v["type"] == "resync" {
            break v;
        }
    };
    ensure!(
        first["type"] == "message" && first["message"]["seq"] == seq,
        "the room lost its state across a restart: {first}"
    );
    drop(ws);
    println!("    restart: the room replayed seq {seq} from its own state");

    // SIGKILL cannot be caught: the watchdogs stop the children.
    signal(&child, "KILL")?;
    wait_exit(&mut child, Duration::from_secs(5))?;
    dev.wait_all_stopped(Duration::from_secs(20))?;
    println!("    SIGKILL: the watchdogs stopped the origin and wrangler dev");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let started = Instant::now();
    let result = async {
        let admin = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let db = format!("vibe_test_dev_{}", uuid::Uuid::now_v7().simple());
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await?;
        let dev = Dev {
            edge_port: free_port()?,
            origin_port: free_port()?,
            state: TempDir::new("vibe-dev-state")?,
            database_url: origin::db::url_with_database(&admin, &db),
        };
        let outcome = scenario(&dev).await;
        // Whatever happened, leave nothing behind.
        for pid in dev.processes() {
            let _ = Command::new("kill")
                .args(["-s", "KILL", &pid.to_string()])
                .status();
        }
        let _ = client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await;
        outcome
    }
    .await;
    let name = "xtask_dev_keeps_room_state_across_restarts_and_leaves_nothing_running";
    match result {
        Ok(()) => {
            println!(
                "test {name} ... ok ({:.1}s)\n\ntest result: ok. 1 passed",
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("test {name} ... FAILED\n    {e:#}\n\ntest result: FAILED");
            ExitCode::FAILURE
        }
    }
}
