//! `tracer report --pid`: attaching to a process that is already running.
//! Blocks allocated before attach must never appear, even when they are
//! freed after it; blocks leaked after attach must be exact.

use std::time::{Duration, Instant};

use tracer_tests::*;

/// The attach fixture, READY, and `tracer report --pid` attached to it.
fn attach(format: &str, extra: &[&str]) -> (Fixture, Tracer) {
    require_root();
    let fixture = Fixture::start(fixture("attach_c"), &[]);
    let mut tracer = TracerCmd::new("report")
        .pid(fixture.pid())
        .args(["--format", format, "--top", "0", "-v"])
        .args(extra)
        .spawn();
    tracer.wait_for("attached to PID");
    (fixture, tracer)
}

#[test]
fn leaks_after_attach_are_exact_and_earlier_blocks_never_appear() {
    let (mut fixture, tracer) = attach("json", &[]);
    let said = fixture.go();
    // Closing stdin lets the fixture exit; the tracer then reports and exits 0.
    fixture.close_stdin();
    let started = Instant::now();
    let report = tracer.finish().json();
    assert!(
        started.elapsed() < Duration::from_secs(5) * slowdown(),
        "final report after exit took {:?}",
        started.elapsed()
    );
    fixture.finish();

    let expected = expectations(&said);
    assert_eq!(expected["leak_after_attach"], (3840, 30));
    let sites = [
        "leak_after_attach",
        "leak_before_attach",
        "churn_after_attach",
    ];
    let found = report_by_site(&report, &sites);
    assert_eq!(
        found.get("leak_after_attach"),
        Some(&(3840, 30)),
        "{report:#}"
    );
    assert_eq!(found.get("leak_before_attach"), None);
    assert_eq!(found.get("churn_after_attach"), None);
    // Nothing else was allocated after attach.
    assert_eq!(report["totals"]["bytes"], 3840, "{report:#}");
    assert_eq!(report["totals"]["allocations"], 30);
    // The 20 early blocks freed after attach were frees of unknown blocks.
    assert!(report["events"]["untracked_frees"].as_u64().unwrap() >= 20);
}

#[test]
fn duration_ends_the_report_while_the_target_keeps_running() {
    let (mut fixture, tracer) = attach("json", &["--duration", "2s"]);
    fixture.go();
    let report = tracer.finish().json();
    assert!(report["duration_s"].as_f64().unwrap() >= 1.9);
    let found = report_by_site(&report, &["leak_after_attach"]);
    assert_eq!(found.get("leak_after_attach"), Some(&(3840, 30)));
    // The target is untouched and still running.
    assert!(fixture.is_running());
    assert!(fixture.finish().success());
}

#[test]
fn sigint_gives_a_final_report() {
    signal_gives_a_final_report(libc::SIGINT);
}

#[test]
fn sigterm_gives_a_final_report() {
    signal_gives_a_final_report(libc::SIGTERM);
}

fn signal_gives_a_final_report(signal: libc::c_int) {
    let (mut fixture, tracer) = attach("text", &[]);
    fixture.go();
    tracer.signal(signal);
    let output = tracer.finish();
    assert!(output.status.success());
    let text = output.stdout;
    assert!(text.contains("final report"), "{text}");
    assert!(text.contains("3840 bytes in 30 allocations"), "{text}");
    assert!(text.contains("leak_after_attach at "), "{text}");
    fixture.finish();
}
