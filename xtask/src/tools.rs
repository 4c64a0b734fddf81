//! Installing what the build needs, once per machine.
//!
//! Each `ensure_*` checks first and installs only what is missing, so a warm
//! machine pays nothing and a fresh one gets everything.

use std::process::Command;

use anyhow::{Context, bail};

use crate::quiet;

/// rustfmt and clippy, which minimal toolchains leave out.
pub fn ensure_rust_components() -> anyhow::Result<()> {
    for (component, probe) in [("rustfmt", "fmt"), ("clippy", "clippy")] {
        if !quiet(crate::cargo(&[probe, "--version"])) {
            println!("==> installing the {component} component");
            let status = Command::new("rustup")
                .args(["component", "add", component])
                .status()
                .context("run rustup")?;
            if !status.success() {
                bail!("rustup component add {component} failed");
            }
        }
    }
    Ok(())
}

/// The wasm32 target, for the `shared` crate check (and the Worker).
pub fn ensure_wasm_target() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("run rustup")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == "wasm32-unknown-unknown")
    {
        return Ok(());
    }
    println!("==> installing the wasm32-unknown-unknown target");
    let status = Command::new("rustup")
        .args(["target", "add", "wasm32-unknown-unknown"])
        .status()
        .context("run rustup")?;
    if !status.success() {
        bail!("rustup target add wasm32-unknown-unknown failed");
    }
    Ok(())
}

/// True when we run as root (installs through apt need it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Installs Debian packages (as root, or through sudo).
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let sudo = !is_root();
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        } else {
            Command::new("apt-get")
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        let status = cmd.status().context("run apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed", args.join(" "));
        }
        Ok(())
    };
    println!("==> installing {} with apt-get", packages.join(", "));
    run(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q"];
    args.extend_from_slice(packages);
    run(&args)
}
