//! Facts about the machine the benchmark ran on, for the report.

use std::{fs, process::Command};

use crate::{cmd, output};

pub struct Machine {
    pub cpu: String,
    pub cores: String,
    pub kernel: String,
    pub libc: String,
    pub date: String,
    pub load_before: String,
}

impl Machine {
    pub fn now() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let trimmed = |c: &mut Command| output(c).unwrap_or_default().trim().to_string();
        let libc = trimmed(cmd("ldd").arg("--version"));
        Machine {
            cpu,
            cores: trimmed(&mut cmd("nproc")),
            kernel: trimmed(cmd("uname").args(["-r", "-m"])),
            libc: libc.lines().next().unwrap_or("unknown").to_string(),
            date: trimmed(cmd("date").args(["-u", "+%Y-%m-%d %H:%M"])),
            load_before: loadavg(),
        }
    }
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg has them.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first of `loadavg`'s three values; 0 if there is none.
pub fn one_minute_load(load: &str) -> f64 {
    load.split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0)
}
