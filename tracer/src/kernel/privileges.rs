//! Checks, before anything is attached, that the tracer may load eBPF
//! programs (an EPERM later is said by `KernelError`).

use anyhow::anyhow;

pub use super::error::NEED_PRIVILEGES;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability bits of this process (from /proc/self/status).
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

pub fn has_capabilities(caps: u64) -> bool {
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// Fails with one clear line when the tracer cannot possibly load programs.
pub fn check() -> anyhow::Result<()> {
    match effective_capabilities() {
        Some(caps) if !has_capabilities(caps) => Err(anyhow!(NEED_PRIVILEGES)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_rules() {
        assert!(has_capabilities(1 << CAP_SYS_ADMIN));
        assert!(has_capabilities((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!has_capabilities(1 << CAP_BPF));
        assert!(!has_capabilities(0));
    }
}
