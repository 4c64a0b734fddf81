//! A tiny test runner for suites that share one expensive [`Stack`].
//!
//! Tests run one after another (the order given), each with a deadline;
//! the output reads like libtest's, and the process fails if any test did.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use crate::stack::Stack;

/// A test: a name that reads as a sentence, and its body.
pub type TestFn =
    for<'a> fn(&'a mut Stack) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

/// Deadline per test.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `tests` against `stack`; an optional filter (the first CLI argument
/// that is not a flag) selects by substring. Returns the process exit code.
pub async fn run(stack: &mut Stack, tests: &[(&str, TestFn)]) -> std::process::ExitCode {
    run_with_timeout(stack, tests, TEST_TIMEOUT).await
}

/// Starts a [`Stack`] with `vars` for the Worker (and `E2E_VERBOSE` for
/// wrangler's output), then runs `tests` against it with `timeout` each.
pub async fn start_and_run(
    vars: &[(&str, &str)],
    tests: &[(&str, TestFn)],
    timeout: Duration,
) -> std::process::ExitCode {
    let options = crate::StackOptions {
        vars: vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        verbose: std::env::var_os("E2E_VERBOSE").is_some(),
        ..crate::StackOptions::default()
    };
    let mut stack = match Stack::start(options).await {
        Ok(s) => s,
        Err(e) => {
            println!("could not start the stack: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    run_with_timeout(&mut stack, tests, timeout).await
}

/// The deadline [`run`] gives each test.
pub const DEFAULT_TIMEOUT: Duration = TEST_TIMEOUT;

/// [`run`] with another deadline per test (suites that restart the stack).
pub async fn run_with_timeout(
    stack: &mut Stack,
    tests: &[(&str, TestFn)],
    timeout: Duration,
) -> std::process::ExitCode {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let selected: Vec<&(&str, TestFn)> = tests
        .iter()
        .filter(|(name, _)| filter.as_deref().is_none_or(|f| name.contains(f)))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let started = Instant::now();
    let mut failed = Vec::new();
    for (name, test) in selected.iter().copied() {
        let t = Instant::now();
        let result = tokio::time::timeout(timeout, test(stack)).await;
        let outcome = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some(format!("timed out after {timeout:?}")),
        };
        match outcome {
            None => println!("test {name} ... ok ({:.1}s)", t.elapsed().as_secs_f64()),
            Some(why) => {
                println!("test {name} ... FAILED\n    {why}");
                failed.push(*name);
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; finished in {:.1}s",
        if failed.is_empty() { "ok" } else { "FAILED" },
        selected.len() - failed.len(),
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        for name in failed {
            println!("    {name}");
        }
        std::process::ExitCode::FAILURE
    }
}
