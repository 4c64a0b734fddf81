//! The project's front door.
//!
//! - `cargo xtask dev`: installs what is missing, makes sure PostgreSQL is
//!   there, migrates and seeds the demo users, and runs the stack until
//!   Ctrl-C.
//! - `cargo xtask test`: installs what is missing and runs every check and
//!   test suite, exactly as CI does.
//! - `cargo xtask bench <origin>`: the benchmarks (release builds).
//!
//! Every step is idempotent and skips work that is already done, because a
//! fresh machine and a warm one must both come out right.

#![allow(clippy::print_stdout)]

mod dev;
mod pg;
mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

const USAGE: &str =
    "usage: cargo xtask <dev | test | bench origin|fanout|room|presence|media|search | build-edge>";

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root).context("enter the workspace root")?;
    match args.first().map(String::as_str) {
        Some("dev") => dev::run(&root),
        Some("build-edge") => build_edge(&root),
        Some("test") => test(&root),
        Some("bench") => bench(&root, args.get(1).map(String::as_str)),
        Some("help" | "--help" | "-h") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `cargo xtask test`: what CI runs.
fn test(root: &Path) -> anyhow::Result<()> {
    tools::ensure_rust_components()?;
    tools::ensure_worker_tools()?;
    tools::ensure_npm_packages(root)?;
    tools::ensure_chromium()?;
    tools::ensure_promtool()?;
    let admin_url = pg::ensure(root)?;
    pg::drop_test_databases(&admin_url)?;
    // The origin's read replica tests make a primary and a streaming
    // replica of their own under target/pg-replica.
    pg::server_bin_dir()?;

    step("format", cargo(&["fmt", "--all", "--check"]))?;
    step(
        "lint",
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // The ChatBox's state module: pure logic, under node's own test runner.
    let mut unit = Command::new("node");
    unit.args(["--test", "e2e/unit/"]).current_dir(root);
    step("ChatBox state unit tests (node --test)", unit)?;
    step(
        "shared builds for wasm32",
        cargo(&[
            "build",
            "-p",
            "vibe-shared",
            "--target",
            "wasm32-unknown-unknown",
        ]),
    )?;
    // The spec must state every status and constraint the API has: a
    // schema-driven fuzzer checks the origin against it (fixed seed, so a
    // failure is reproducible).
    let mut fuzz = Command::new("bash");
    fuzz.arg(root.join("origin/scripts/schemathesis.sh"))
        .args(["--seed", "42"])
        .env("DATABASE_URL", &admin_url);
    step(
        "the origin against its OpenAPI document (Schemathesis)",
        fuzz,
    )?;
    // The end-to-end suites run the built Worker under wrangler dev; build
    // it now, because they must not start a cargo build themselves.
    build_edge(root)?;
    let mut tests = cargo(&["test", "--workspace"]);
    tests
        .env("DATABASE_URL", &admin_url)
        .env("WRANGLER_SEND_METRICS", "false");
    let result = step(
        "tests: unit, simulator, origin against PostgreSQL, ops files (promtool), edge end to end under wrangler dev, ChatBox in Chromium",
        tests,
    );
    // A test binary killed mid-run cannot stop its wrangler; do it here.
    let _ = Command::new("pkill")
        .args(["-f", "wrangler.*--config /tmp/vibe-e2e-"])
        .status();
    result?;
    pg::drop_test_databases(&admin_url)?;
    println!("\nall checks passed");
    Ok(())
}

/// `cargo xtask build-edge`: the Worker's wasm build (wrangler's `[build]`
/// command runs this too). worker-build is pointed at the locally
/// installed wasm-bindgen and wrangler's esbuild, because it cannot
/// download them here; wasm-opt is off in the crate's metadata.
pub fn build_edge(root: &Path) -> anyhow::Result<()> {
    tools::ensure_worker_tools()?;
    tools::ensure_npm_packages(root)?;
    let mut cmd = Command::new("worker-build");
    cmd.arg("--release")
        .current_dir(root.join("edge-worker"))
        .env("WASM_BINDGEN_BIN", "wasm-bindgen")
        .env("ESBUILD_BIN", root.join("node_modules/.bin/esbuild"))
        .env("CARGO_TARGET_DIR", root.join("target"));
    step("build the edge worker (wasm32)", cmd)
}

/// The project's wrangler.toml without its `[build]` step and with
/// absolute paths, written into `dir`: for running the prebuilt Worker
/// where a cargo build must not start (tests, `VIBE_DEV_SKIP_BUILD`).
pub fn config_without_build(root: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(root.join("wrangler.toml")).context("read wrangler.toml")?;
    let mut out = String::new();
    let mut in_build = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            in_build = trimmed == "[build]";
        }
        if in_build {
            continue;
        }
        if trimmed.starts_with("directory =") {
            out.push_str(&format!(
                "directory = \"{}\"\n",
                root.join("chatbox").display()
            ));
        } else if trimmed.starts_with("main =") {
            out.push_str(&format!(
                "main = \"{}\"\n",
                root.join("edge-worker/build/index.js").display()
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::create_dir_all(dir).context("create the config's directory")?;
    let path = dir.join("wrangler.toml");
    std::fs::write(&path, out).context("write the build-less wrangler.toml")?;
    Ok(path)
}

/// `cargo xtask bench <name>`.
fn bench(root: &Path, which: Option<&str>) -> anyhow::Result<()> {
    let which = which.unwrap_or("origin");
    match which {
        "origin" => {
            let admin_url = pg::ensure(root)?;
            let mut cmd = cargo(&["run", "--release", "-p", "vibe-bench", "--", "origin"]);
            cmd.env("DATABASE_URL", &admin_url);
            step("origin benchmark", cmd)
        }
        "fanout" | "presence" => {
            let admin_url = pg::ensure(root)?;
            build_edge(root)?;
            let mut cmd = cargo(&["run", "--release", "-p", "vibe-bench", "--", which]);
            cmd.env("DATABASE_URL", &admin_url)
                .env("WRANGLER_SEND_METRICS", "false");
            let result = step(&format!("{which} benchmark (wrangler dev)"), cmd);
            pg::drop_test_databases(&admin_url)?;
            result
        }
        // The bench drops its own database; not every vibe_test_* (others'
        // e2e runs may be using theirs).
        "media" => {
            let admin_url = pg::ensure(root)?;
            build_edge(root)?;
            let mut cmd = cargo(&["run", "--release", "-p", "vibe-bench", "--", "media"]);
            cmd.env("DATABASE_URL", &admin_url)
                .env("WRANGLER_SEND_METRICS", "false");
            step("media benchmark (wrangler dev)", cmd)
        }
        // The origin in the bench's process against PostgreSQL; no edge.
        "search" => {
            let admin_url = pg::ensure(root)?;
            let mut cmd = cargo(&["run", "--release", "-p", "vibe-bench", "--", "search"]);
            cmd.env("DATABASE_URL", &admin_url);
            step("search benchmark", cmd)
        }
        // The origin in the bench's process; the clients play the edge.
        "edge-report" => {
            let admin_url = pg::ensure(root)?;
            let mut cmd = cargo(&["run", "--release", "-p", "vibe-bench", "--", "edge-report"]);
            cmd.env("DATABASE_URL", &admin_url);
            step("edge report benchmark", cmd)
        }
        "room" => step(
            "room state machine benchmark (native)",
            cargo(&["run", "--release", "-p", "vibe-bench", "--", "room"]),
        ),
        other => {
            bail!(
                "unknown benchmark {other:?}; available: origin, fanout, room, presence, media, search"
            )
        }
    }
}

pub(crate) fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    cmd.args(args);
    cmd
}

/// Runs `cmd`, announcing it, and fails with its name if it fails.
pub(crate) fn step(name: &str, mut cmd: Command) -> anyhow::Result<()> {
    println!("\n==> {name}");
    let status = cmd
        .status()
        .with_context(|| format!("start {name} ({cmd:?})"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns whether it succeeded.
pub(crate) fn quiet(mut cmd: Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
