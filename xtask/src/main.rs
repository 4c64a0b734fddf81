//! `cargo xtask <command>`: thin argument parsing over [`xtask`]'s library.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    xtask::run(&args)
}
