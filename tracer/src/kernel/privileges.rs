//! The capabilities that let the tracer load eBPF programs (`features`
//! checks them before anything is attached; an EPERM later is said by
//! `KernelError`).

pub use super::error::NEED_PRIVILEGES;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub fn has_capabilities(caps: u64) -> bool {
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
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
