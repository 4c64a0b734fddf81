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
    apt_install_with(packages, &[])
}

/// [`apt_install`] with extra `apt-get install` options.
fn apt_install_with(packages: &[&str], options: &[&str]) -> anyhow::Result<()> {
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
    args.extend_from_slice(options);
    args.extend_from_slice(packages);
    run(&args)
}

/// Pinned tool versions. `wasm-bindgen-cli` must equal the `wasm-bindgen`
/// in Cargo.lock (worker 0.8.7 locks 0.2.130).
pub const WORKER_BUILD_VERSION: &str = "0.8.7";
pub const WASM_BINDGEN_VERSION: &str = "0.2.130";

/// `cargo install <krate> --version <version>` unless `<bin> --version`
/// already reports it. Installs are minutes each, so this matters.
fn ensure_cargo_tool(krate: &str, bin: &str, version: &str) -> anyhow::Result<()> {
    let installed = Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(version));
    if installed {
        return Ok(());
    }
    println!("==> installing {krate} {version} (once per machine; a few minutes)");
    // Without --locked: it failed once with it on these machines.
    let status = crate::cargo(&["install", krate, "--version", version])
        .status()
        .with_context(|| format!("cargo install {krate}"))?;
    if !status.success() {
        bail!("cargo install {krate} --version {version} failed");
    }
    Ok(())
}

/// worker-build and the matching wasm-bindgen CLI (worker-build would
/// otherwise download them from GitHub, which is unreachable here).
pub fn ensure_worker_tools() -> anyhow::Result<()> {
    ensure_wasm_target()?;
    ensure_cargo_tool("worker-build", "worker-build", WORKER_BUILD_VERSION)?;
    ensure_cargo_tool("wasm-bindgen-cli", "wasm-bindgen", WASM_BINDGEN_VERSION)
}

/// Node.js and npm, from Debian when missing.
pub fn ensure_node() -> anyhow::Result<()> {
    if quiet({
        let mut c = Command::new("npm");
        c.arg("--version");
        c
    }) {
        return Ok(());
    }
    apt_install(&["nodejs", "npm"])
}

/// The npm packages in package.json (wrangler and the test clients),
/// installed when node_modules is missing or older than the lockfile.
pub fn ensure_npm_packages(root: &std::path::Path) -> anyhow::Result<()> {
    ensure_node()?;
    let marker = root.join("node_modules").join(".package-lock.json");
    let lock = root.join("package-lock.json");
    let fresh = match (marker.metadata(), lock.metadata()) {
        (Ok(m), Ok(l)) => match (m.modified(), l.modified()) {
            (Ok(m), Ok(l)) => m >= l,
            _ => false,
        },
        (Ok(_), Err(_)) => true,
        _ => false,
    };
    if fresh {
        return Ok(());
    }
    println!("==> installing npm packages");
    let mut cmd = Command::new("npm");
    if lock.exists() {
        cmd.args(["ci", "--no-audit", "--no-fund"]);
    } else {
        cmd.args(["install", "--no-audit", "--no-fund"]);
    }
    let status = cmd.current_dir(root).status().context("run npm")?;
    if !status.success() {
        bail!("npm install failed");
    }
    Ok(())
}

/// Debian packages the tests drive: Chromium for the browser tests
/// (playwright cannot download a browser here) and the `sqlite3` shell,
/// with which the edge suite reads the Durable Objects' database files.
pub fn ensure_chromium() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("chromium", "/usr/bin/chromium"),
        ("sqlite3", "/usr/bin/sqlite3"),
    ]
    .into_iter()
    .filter(|(_, path)| !std::path::Path::new(path).exists())
    .map(|(package, _)| package)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

/// promtool, which checks and unit-tests the alert rules (ops/prometheus).
/// Debian ships it only in the `prometheus` package, whose server is of no
/// use here: without recommends (no node exporter), and the service the
/// package may start is stopped and disabled again.
pub fn ensure_promtool() -> anyhow::Result<()> {
    if std::path::Path::new("/usr/bin/promtool").exists() {
        return Ok(());
    }
    apt_install_with(&["prometheus"], &["--no-install-recommends"])?;
    stop_prometheus_service();
    if !std::path::Path::new("/usr/bin/promtool").exists() {
        bail!("the prometheus package did not install /usr/bin/promtool");
    }
    Ok(())
}

/// Stops the Prometheus server that installing the package may have
/// started, through its service manager (never by process name: another
/// Prometheus on this machine is not ours to stop). Failures are ignored:
/// where no service started (containers), there is nothing to stop.
fn stop_prometheus_service() {
    let sudo = !is_root();
    let command = |program: &str, args: &[&str]| {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args);
        cmd
    };
    if std::path::Path::new("/run/systemd/system").exists() {
        quiet(command(
            "systemctl",
            &["disable", "--now", "prometheus.service"],
        ));
    } else if std::path::Path::new("/etc/init.d/prometheus").exists() {
        quiet(command("/etc/init.d/prometheus", &["stop"]));
        quiet(command("update-rc.d", &["prometheus", "disable"]));
    }
}
