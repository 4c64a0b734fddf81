//! Benchmarks. Each prints a table; `docs/BENCHMARKS.md` keeps the figures
//! with the command that produced them.
//!
//! No test times anything: timing lives here, where a noisy 2-core machine
//! can only make a number worse, never fail a build.

#![allow(clippy::print_stdout)]

pub mod edge_report;
pub mod fanout;
pub mod media;
pub mod origin_bench;
pub mod presence;
pub mod report;
pub mod room_machine;
pub mod search;

pub async fn run(which: &str) -> anyhow::Result<()> {
    match which {
        "origin" => origin_bench::run().await,
        "fanout" => fanout::run().await,
        "room" => room_machine::run(),
        "presence" => presence::run().await,
        "media" => media::run().await,
        "search" => search::run().await,
        "edge-report" => edge_report::run().await,
        other => {
            anyhow::bail!(
                "unknown benchmark {other:?}; available: origin, fanout, room, presence, media, search"
            )
        }
    }
}
