//! The ChatBox in a real browser: starts the stack (PostgreSQL, the origin,
//! `wrangler dev` serving the ChatBox), seeds the demo users, and runs the
//! playwright-core suite in `e2e/browser/` against it with Debian's
//! Chromium.

#![allow(clippy::print_stdout)]

use std::process::{Command, ExitCode};

use e2e::stack::workspace_root;
use e2e::{Stack, StackOptions};

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
    let root = workspace_root();
    let status = Command::new("node")
        .arg(root.join("e2e/browser/chatbox.test.mjs"))
        .current_dir(&root)
        .env("EDGE_URL", &stack.edge)
        .status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            println!("browser suite failed ({s})");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("could not run node: {e}");
            ExitCode::FAILURE
        }
    }
}
