//! Kernels the matrix currently expects to fail, with why. TEMPORARY: each
//! entry is removed as soon as the fix lands, and the matrix fails when a
//! listed kernel passes, so a stale entry cannot hide a regression.

/// (kernel version prefix, reason).
pub const EXPECTED_FAILING: &[(&str, &str)] = &[(
    "5.10",
    "issue 16: the eBPF programs do not load (BPF_PROG_LOAD: number of funcs in func_info doesn't match number of subprogs)",
)];

/// The reason `abi` (`5.10.0-32`) is expected to fail, if it is.
pub fn reason(abi: &str) -> Option<&'static str> {
    EXPECTED_FAILING
        .iter()
        .find(|(prefix, _)| abi == *prefix || abi.starts_with(&format!("{prefix}.")))
        .map(|(_, reason)| *reason)
}
