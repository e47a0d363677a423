//! What the matrix currently expects to fail, with why. TEMPORARY: each
//! entry is removed as soon as its fix lands. A whole kernel listed that
//! passes fails the matrix (so a stale entry cannot hide a regression); a
//! listed test that passes is reported, not failed (a race may pass).

/// (kernel version prefix, `file::test` or `*` for every test, reason).
pub const EXPECTED_FAILING: &[(&str, &str, &str)] = &[];

fn matches(abi: &str, prefix: &str) -> bool {
    abi == prefix || abi.starts_with(&format!("{prefix}."))
}

/// Why every test on `abi` (`5.10.0-32`) is expected to fail, if so.
pub fn kernel(abi: &str) -> Option<&'static str> {
    EXPECTED_FAILING
        .iter()
        .find(|(prefix, test, _)| *test == "*" && matches(abi, prefix))
        .map(|(_, _, reason)| *reason)
}

/// Why `test` on `abi` is expected to fail, if so.
pub fn test(abi: &str, test: &str) -> Option<&'static str> {
    EXPECTED_FAILING
        .iter()
        .find(|(prefix, t, _)| *t == test && matches(abi, prefix))
        .map(|(_, _, reason)| *reason)
}
