//! `--sample-rate`: sampled reports estimate the exact ones. The same
//! fixture is traced exactly and sampled; the estimates must be close to
//! the exact figures (which must match what the fixture announced), the
//! freed churn must not appear, and the report must say it is estimated.

use tracer_tests::*;

const SITES: &[&str] = &["small_leaks", "big_leaks", "churn"];

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

    let (sampled, stdout, _) = trace_run(&[program], &["--sample-rate", "8k"]);
    assert!(stdout.contains("DONE"));
    assert_eq!(sampled["allocator"]["estimated"], true);
    assert_eq!(sampled["allocator"]["sample_rate_bytes"], 8192);
    let found = report_by_site(&sampled, SITES);
    // small_leaks: p = 1 - exp(-64/8192) ~ 0.78%, ~780 blocks sampled of
    // 100,000: one standard deviation is ~3.6%; 15% is over 4.
    // big_leaks: p > 0.9996, all but certainly exact.
    for (site, tolerance) in [("small_leaks", 0.15), ("big_leaks", 0.01)] {
        let (want_bytes, want_blocks) = expected[site];
        let (bytes, blocks) = *found.get(site).unwrap_or(&(0, 0));
        let bytes_error = bytes as f64 / want_bytes as f64 - 1.0;
        let blocks_error = blocks as f64 / want_blocks as f64 - 1.0;
        assert!(
            bytes_error.abs() <= tolerance && blocks_error.abs() <= tolerance,
            "{site}: estimated {bytes} bytes in {blocks} blocks, exact {want_bytes} in {want_blocks}"
        );
    }
    assert!(
        !found.contains_key("churn"),
        "freed churn reported: {found:?}"
    );
}

#[test]
fn text_reports_say_they_are_estimates() {
    require_root();
    let program = fixture("sampled_c");
    let output = std::process::Command::new(tracer())
        .args(["run", "--sample-rate", "64k", "--"])
        .arg(&program)
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("estimated"), "{text}");
}
