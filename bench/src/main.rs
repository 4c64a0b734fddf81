//! `vibe-bench <origin>`: see the library for what each benchmark measures.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let which = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "origin".to_owned());
    bench::run(&which).await
}
