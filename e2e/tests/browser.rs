//! The ChatBox in a real browser: starts the stack (PostgreSQL, the origin,
//! `wrangler dev` serving the ChatBox), seeds the demo users, and runs the
//! playwright-core suites in `e2e/browser/` against it with Debian's
//! Chromium.

#![allow(clippy::print_stdout)]

use std::process::{Command, ExitCode};

use e2e::stack::workspace_root;
use e2e::{Stack, StackOptions};

/// The suites in `e2e/browser/`, in order: the ChatBox, then attachments
/// (photos, voice messages, the gallery; Chromium with a fake microphone),
/// then a message's life (replies, reactions, edits, deletes, mentions,
/// search).
const SUITES: &[&str] = &["chatbox", "media", "lifecycle"];

#[tokio::main]
async fn main() -> ExitCode {
    let stack = match Stack::start(StackOptions {
        // Short-lived access tokens, so the suite sees the ChatBox refresh
        // them silently and renew its open sockets (production: 15 min).
        origin_vars: vec![
            ("ACCESS_TOKEN_TTL_SECS".to_owned(), "60".to_owned()),
            // A throwaway VAPID key for this suite (published on purpose:
            // no push leaves the machine), so the ChatBox can subscribe.
            (
                "VAPID_PRIVATE_KEY".to_owned(),
                "WO6neA0UinJdUFJ2aL5ehl4Y2KGBFGPz9tSHv3_ejuU".to_owned(),
            ),
        ],
        verbose: std::env::var_os("E2E_VERBOSE").is_some(),
        ..StackOptions::default()
    })
    .await
    {
        Ok(s) => s,
        Err(e) => {
            println!("could not start the stack: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = origin::seed::seed_demo(&stack.pool).await {
        println!("could not seed the demo users: {e:#}");
        return ExitCode::FAILURE;
    }
    // Each suite is one .mjs file with its own browser; BROWSER_SUITES
    // (e.g. "media") runs some of them only.
    let chosen = std::env::var("BROWSER_SUITES").unwrap_or_default();
    let root = workspace_root();
    let mut failed = Vec::new();
    for suite in SUITES {
        if !chosen.is_empty() && !chosen.split(',').any(|s| s.trim() == *suite) {
            continue;
        }
        println!("browser suite: {suite}");
        let status = Command::new("node")
            .arg(root.join(format!("e2e/browser/{suite}.test.mjs")))
            .current_dir(&root)
            .env("EDGE_URL", &stack.edge)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                println!("browser suite {suite} failed ({s})");
                failed.push(*suite);
            }
            Err(e) => {
                println!("could not run node: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failed browser suites: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}
