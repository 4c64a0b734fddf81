//! `cargo xtask <command>`: thin argument parsing over [`xtask`]'s library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match xtask::run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain, without a backtrace: these are expected failures.
            eprintln!("\nerror: {e:#}");
            ExitCode::FAILURE
        }
    }
}
