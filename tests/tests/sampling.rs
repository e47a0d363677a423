//! `--sample-rate`: sampled reports estimate the exact ones. The same
//! fixture is traced exactly and sampled; the estimates must be close to
//! the exact figures (which must match what the fixture announced), the
//! freed churn must not appear, and the report must say it is estimated.
//! Sampled both ways the allocation functions can be probed: a uprobe
//! session (kernel 6.13+, the default when sampling) and a uprobe with a
//! uretprobe.

use tracer_tests::*;

const SITES: &[&str] = &["small_leaks", "nested_leaks", "big_leaks", "churn"];

#[test]
fn sampled_estimates_are_close_to_exact_counts() {
    require_root();
    let program = fixture("sampled_c");
    let program = program.to_str().unwrap();

    let (exact, stdout, _) = trace_run(&[program], &[]);
    assert!(stdout.contains("DONE"), "fixture did not finish: {stdout}");
    let expected = expectations(&stdout);
    let exact_sites = report_by_site(&exact, SITES);
    for (site, want) in &expected {
        assert_eq!(exact_sites.get(site), Some(want), "exact mode, {site}");
    }
    assert!(
        exact["allocator"].get("estimated").is_none(),
        "{}",
        exact["allocator"]
    );
    assert!(
        exact["events"].get("unsampled_frees").is_none(),
        "{}",
        exact["events"]
    );

    for sessions in ["auto", "never"] {
        let (sampled, stdout, _) = trace_run(
            &[program],
            &["--sample-rate", "8k", "--uprobe-sessions", sessions],
        );
        assert!(stdout.contains("DONE"));
        check_sampled(&sampled, &expected, sessions);
    }
}

fn check_sampled(
    sampled: &serde_json::Value,
    expected: &std::collections::BTreeMap<String, (u64, u64)>,
    sessions: &str,
) {
    assert_eq!(sampled["allocator"]["estimated"], true);
    assert_eq!(sampled["allocator"]["sample_rate_bytes"], 8192);
    let found = report_by_site(sampled, SITES);
    // small_leaks: p = 1 - exp(-64/8192) ~ 0.78%, ~780 blocks sampled of
    // 100,000: one standard deviation is ~3.6%; 15% is over 4.
    // nested_leaks: the same, from realloc(NULL, 64), which calls malloc
    // inside; an inner call that moved the countdown without being sampled
    // would hand its points to later blocks (about 2x here).
    // big_leaks: p > 0.9996, all but certainly exact.
    for (site, tolerance) in [
        ("small_leaks", 0.15),
        ("nested_leaks", 0.15),
        ("big_leaks", 0.01),
    ] {
        let (want_bytes, want_blocks) = expected[site];
        let (bytes, blocks) = *found.get(site).unwrap_or(&(0, 0));
        let bytes_error = bytes as f64 / want_bytes as f64 - 1.0;
        let blocks_error = blocks as f64 / want_blocks as f64 - 1.0;
        assert!(
            bytes_error.abs() <= tolerance && blocks_error.abs() <= tolerance,
            "sessions {sessions}: {site}: estimated {bytes} bytes in {blocks} blocks, exact {want_bytes} in {want_blocks}"
        );
    }
    assert!(
        !found.contains_key("churn"),
        "sessions {sessions}: freed churn reported: {found:?}"
    );
    // The churn's unsampled blocks are freed without a record: reported as
    // unsampled frees, not as untracked ones.
    let events = &sampled["events"];
    assert_eq!(events["untracked_frees"], 0, "{events}");
    assert!(
        events["unsampled_frees"].as_u64().unwrap() > 10_000,
        "{events}"
    );
}

/// The kernel's (major, minor) version.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// On a kernel with uprobe sessions (6.13+) sampling uses them, and `-v`
/// says so; without `--sample-rate` (or with `--uprobe-sessions never`) it
/// is a uprobe and a uretprobe.
#[test]
fn sampling_uses_uprobe_sessions_where_the_kernel_has_them() {
    require_root();
    let program = fixture("sampled_c");
    let verbose = |extra: &[&str]| {
        let output = TracerCmd::new("run")
            .args(["-v", "-o", "/dev/null"])
            .args(extra)
            .command(&program)
            .output();
        assert!(output.status.success());
        output.stderr
    };
    let sampled = verbose(&["--sample-rate", "64k"]);
    if kernel_version() >= (6, 13) {
        assert!(
            sampled.contains("tracer: allocation returns: uprobe session"),
            "{sampled}"
        );
        assert!(
            sampled.contains("uprobe session alloc_session at ") && sampled.contains("(malloc, "),
            "{sampled}"
        );
        assert!(!sampled.contains("uretprobe alloc_return"), "{sampled}");
    } else {
        assert!(
            sampled.contains("allocation returns: uretprobe (uprobe sessions unavailable"),
            "{sampled}"
        );
    }
    for extra in [
        &[][..],
        &["--sample-rate", "64k", "--uprobe-sessions", "never"][..],
    ] {
        let classic = verbose(extra);
        assert!(
            classic.contains("tracer: allocation returns: uretprobe\n"),
            "{classic}"
        );
        assert!(classic.contains("uretprobe alloc_return at "), "{classic}");
    }
}

#[test]
fn text_reports_say_they_are_estimates() {
    require_root();
    let program = fixture("sampled_c");
    let output = TracerCmd::new("run")
        .args(["--sample-rate", "64k"])
        .command(&program)
        .output();
    assert!(output.status.success());
    let text = output.stdout;
    assert!(text.contains("estimated"), "{text}");
}
