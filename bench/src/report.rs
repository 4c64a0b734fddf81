//! Table printing, latency summaries, ranges over runs, and what else the
//! machine was doing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Says which build ran: the origin runs in the bench process, so a debug
/// build's figures are not comparable. `bench` names the xtask command;
/// `in_process` what runs here beside the origin.
pub fn build(bench: &str, in_process: &str) {
    if cfg!(debug_assertions) {
        println!(
            "WARNING: a debug build; the origin in this process is unoptimised and the figures are not comparable (use cargo xtask bench {bench})"
        );
    } else {
        println!("build: release ({in_process} run in this process, optimised)");
    }
}

/// A histogram of microseconds, up to one minute, 3 significant digits.
pub fn micros_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// Milliseconds with two decimals, from microseconds.
pub fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// Prints a Markdown table (it reads fine in a terminal too).
pub fn table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    println!("\n### {title}\n");
    println!("| {} |", header.join(" | "));
    println!(
        "|{}|",
        header.iter().map(|_| " --- ").collect::<Vec<_>>().join("|")
    );
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
}

/// Prints the target a table is measured against, right under it, so a
/// figure is never read without what it was supposed to reach (the
/// targets are in `docs/BENCHMARKS.md`, "Targets").
pub fn target(text: &str) {
    println!("\n- **Target** (docs/BENCHMARKS.md, Targets): {text}");
}

/// A column's values over the runs, as `min–max` (one value when every run
/// agrees at this precision). Never the best run alone: a noisy machine
/// shows as a wide range instead of being hidden.
pub fn range(values: &[f64], decimals: usize) -> String {
    if values.is_empty() {
        return "–".to_owned();
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lo = format!("{min:.decimals$}");
    let hi = format!("{max:.decimals$}");
    if lo == hi { lo } else { format!("{lo}–{hi}") }
}

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` has them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The 1-minute load average as a number (0 when unknown).
pub fn loadavg_1m() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// What the machine was doing over `window`: the share of all cores in use,
/// and the processes (grouped by name) that used at least 5 % of one core.
/// Read from `/proc`, so it names the neighbours a figure shared the
/// machine with (a build, another benchmark, PostgreSQL's checkpointer).
pub async fn busy(window: Duration) -> String {
    let Some(before) = CpuSample::take() else {
        return "unknown (no /proc)".to_owned();
    };
    tokio::time::sleep(window).await;
    let Some(after) = CpuSample::take() else {
        return "unknown (no /proc)".to_owned();
    };
    let used = after.busy_share(&before) * 100.0;
    let top = after.top(&before, &HashSet::new());
    if top.is_empty() {
        format!("cores {used:.0} % busy")
    } else {
        format!("cores {used:.0} % busy; {top}")
    }
}

/// CPU time used between two samples by everything outside a set of
/// processes: what else was running while a figure was measured.
#[derive(Debug, Clone)]
pub struct Neighbours {
    /// Percent of one core, on average over the window.
    pub cpu: f64,
    /// The busiest of them by name, e.g. "rustc 140 %, cargo 10 %" (only
    /// processes still alive at the end can be named; `cpu` counts all).
    pub top: String,
}

impl Neighbours {
    /// Everything but `ours` (and their descendants, taken from `after`).
    /// The total comes from `/proc/stat`, so processes that came and went
    /// during the window (a build's compiler runs) still count.
    pub fn between(before: &CpuSample, after: &CpuSample, ours: &HashSet<u32>) -> Self {
        let ours = after.with_descendants(ours);
        let total = after.total.saturating_sub(before.total);
        let idle = after.idle.saturating_sub(before.idle);
        let per_core = total as f64 / after.cores.max(1) as f64;
        let mine: u64 = ours
            .iter()
            .filter_map(|pid| {
                let (_, _, t) = after.procs.get(pid)?;
                let t0 = before.procs.get(pid).map_or(0, |(_, _, t0)| *t0);
                Some(t.saturating_sub(t0))
            })
            .sum();
        let others = total.saturating_sub(idle).saturating_sub(mine);
        let cpu = if per_core > 0.0 {
            others as f64 / per_core * 100.0
        } else {
            0.0
        };
        Self {
            cpu,
            top: after.top(before, &ours),
        }
    }
}

/// One reading of `/proc`: the machine's CPU time and every process's.
#[derive(Debug, Clone)]
pub struct CpuSample {
    total: u64,
    idle: u64,
    cores: usize,
    /// pid → (command name, parent pid, user + system jiffies).
    procs: HashMap<u32, (String, u32, u64)>,
}

impl CpuSample {
    pub fn take() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let mut total = 0;
        let mut idle = 0;
        let mut cores = 0;
        for line in stat.lines() {
            if let Some(rest) = line.strip_prefix("cpu ") {
                let v: Vec<u64> = rest
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal; guest
                // time is already inside user.
                total = v.iter().take(8).sum();
                idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            } else if line.starts_with("cpu") {
                cores += 1;
            }
        }
        let mut procs = HashMap::new();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(s) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // The name is in parentheses and may itself hold spaces.
            let (Some(open), Some(close)) = (s.find('('), s.rfind(')')) else {
                continue;
            };
            let name = s[open + 1..close].to_owned();
            let fields: Vec<&str> = s[close + 1..].split_whitespace().collect();
            // After the name, stat(5)'s fields from 3 on: state, ppid, …,
            // utime (14), stime (15).
            let num = |i: usize| {
                fields
                    .get(i)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let ppid = u32::try_from(num(1)).unwrap_or(0);
            procs.insert(pid, (name, ppid, num(11) + num(12)));
        }
        Some(Self {
            total,
            idle,
            cores,
            procs,
        })
    }

    /// The share of all cores in use since `before`, 0..=1.
    fn busy_share(&self, before: &Self) -> f64 {
        let total = self.total.saturating_sub(before.total);
        let idle = self.idle.saturating_sub(before.idle);
        if total == 0 {
            return 0.0;
        }
        1.0 - idle as f64 / total as f64
    }

    /// `roots` and every process below them.
    fn with_descendants(&self, roots: &HashSet<u32>) -> HashSet<u32> {
        let mut set = roots.clone();
        loop {
            let before = set.len();
            for (pid, (_, ppid, _)) in &self.procs {
                if set.contains(ppid) {
                    set.insert(*pid);
                }
            }
            if set.len() == before {
                return set;
            }
        }
    }

    /// The busiest processes since `before` outside `except`, grouped by
    /// name, at least 5 % of one core each.
    fn top(&self, before: &Self, except: &HashSet<u32>) -> String {
        let total = self.total.saturating_sub(before.total);
        let per_core = total as f64 / self.cores.max(1) as f64;
        if per_core <= 0.0 {
            return String::new();
        }
        let mut by_name: HashMap<&str, f64> = HashMap::new();
        for (pid, (name, _, t)) in &self.procs {
            if except.contains(pid) {
                continue;
            }
            let start = before.procs.get(pid).map_or(0, |(_, _, t0)| *t0);
            *by_name.entry(name.as_str()).or_default() +=
                t.saturating_sub(start) as f64 / per_core * 100.0;
        }
        let mut top: Vec<(&str, f64)> = by_name.into_iter().filter(|(_, s)| *s >= 5.0).collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        top.truncate(5);
        top.iter()
            .map(|(n, s)| format!("{n} {s:.0} %"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
