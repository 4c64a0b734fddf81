//! The workerd processes under this bench's `wrangler dev`, read from
//! `/proc`: their CPU time (utime + stime) and open descriptors; and the
//! bench's own descriptor limit.

use std::collections::{HashMap, HashSet};

/// Clock ticks per second for `/proc/<pid>/stat` (USER_HZ: 100 on every
/// Linux this runs on; `getconf CLK_TCK` says otherwise when it differs).
fn ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// pid → (name, parent, utime + stime ticks), for every process.
fn processes() -> HashMap<u32, (String, u32, u64)> {
    let mut procs = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return procs;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(s) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (s.find('('), s.rfind(')')) else {
            continue;
        };
        let name = s[open + 1..close].to_owned();
        let fields: Vec<&str> = s[close + 1..].split_whitespace().collect();
        // After the name: state (3), ppid (4), … utime (14), stime (15).
        let num = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        procs.insert(pid, (name, num(1) as u32, num(11) + num(12)));
    }
    procs
}

/// The workerd processes below this process (wrangler dev is our child,
/// workerd its).
pub fn workerd_pids() -> Vec<u32> {
    let procs = processes();
    let mut ours: HashSet<u32> = HashSet::from([std::process::id()]);
    loop {
        let before = ours.len();
        for (pid, (_, ppid, _)) in &procs {
            if ours.contains(ppid) {
                ours.insert(*pid);
            }
        }
        if ours.len() == before {
            break;
        }
    }
    let mut pids: Vec<u32> = ours
        .into_iter()
        .filter(|pid| procs.get(pid).is_some_and(|(name, _, _)| name == "workerd"))
        .collect();
    pids.sort_unstable();
    pids
}

/// CPU seconds (user + system) the given processes have used so far.
#[derive(Debug, Clone, Copy)]
pub struct CpuReading {
    pub secs: f64,
}

/// The CPU time of `pids` so far; processes that are gone count 0 (the
/// caller compares readings of the same set).
pub fn cpu(pids: &[u32]) -> CpuReading {
    let hz = ticks_per_sec();
    let procs = processes();
    let ticks: u64 = pids
        .iter()
        .filter_map(|p| procs.get(p).map(|(_, _, t)| *t))
        .sum();
    CpuReading {
        secs: ticks as f64 / hz,
    }
}

/// Open descriptors of a process (0 when unreadable).
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A process's soft descriptor limit, from `/proc/<pid>/limits`.
pub fn nofile_limit(pid: u32) -> Option<usize> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// Raises this process's soft descriptor limit to its hard limit (its
/// children, wrangler and workerd, inherit it) and returns (soft, hard).
/// Raising the hard limit needs CAP_SYS_RESOURCE, which a sandbox may not
/// grant even to root.
pub fn raise_nofile() -> anyhow::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok((soft, hard))
}
