//! Checks, before anything is attached, that the tracer may load eBPF
//! programs (an EPERM later is said by `KernelError`).

use anyhow::anyhow;

pub use super::error::NEED_PRIVILEGES;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub fn has_capabilities(caps: u64) -> bool {
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// Fails with one clear line when the tracer cannot possibly load programs.
pub fn check() -> anyhow::Result<()> {
    match crate::target::tasks::own_effective_capabilities() {
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
