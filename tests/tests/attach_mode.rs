//! `tracer report --pid`: attaching to a process that is already running.
//! Blocks allocated before attach must never appear, even when they are
//! freed after it; blocks leaked after attach must be exact.

use std::{
    io::{BufReader, Read, Write},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::*;

struct Attached {
    fixture: Child,
    fixture_out: BufReader<std::process::ChildStdout>,
    tracer: Child,
}

impl Attached {
    /// Tells the fixture the tracer is attached; returns what it printed up
    /// to DONE (its EXPECT lines).
    fn go(&mut self) -> String {
        self.fixture
            .stdin
            .as_mut()
            .unwrap()
            .write_all(b"go\n")
            .unwrap();
        read_until(&mut self.fixture_out, "DONE")
    }
}

fn attach(format: &str, extra: &[&str]) -> Attached {
    require_root();
    let mut fixture = Command::new(fixture("attach_c"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut fixture_out = BufReader::new(fixture.stdout.take().unwrap());
    read_until(&mut fixture_out, "READY");
    let mut tracer = Command::new(tracer())
        .args([
            "report",
            "--pid",
            &fixture.id().to_string(),
            "--format",
            format,
            "--top",
            "0",
            "-v",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut tracer_err = BufReader::new(tracer.stderr.take().unwrap());
    read_until(&mut tracer_err, "attached to PID");
    // Keep draining stderr so the tracer never blocks on it.
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = tracer_err.read_to_string(&mut rest);
    });
    Attached {
        fixture,
        fixture_out,
        tracer,
    }
}

fn finish(tracer: Child) -> Value {
    let output = tracer.wait_with_output().unwrap();
    assert!(output.status.success(), "tracer: {}", output.status);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "bad JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[test]
fn leaks_after_attach_are_exact_and_earlier_blocks_never_appear() {
    let mut run = attach("json", &[]);
    let said = run.go();
    // Closing stdin lets the fixture exit; the tracer then reports and exits 0.
    drop(run.fixture.stdin.take());
    let started = Instant::now();
    let report = finish(run.tracer);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "final report after exit took {:?}",
        started.elapsed()
    );
    run.fixture.wait().unwrap();

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
    let mut run = attach("json", &["--duration", "2s"]);
    run.go();
    let report = finish(run.tracer);
    assert!(report["duration_s"].as_f64().unwrap() >= 1.9);
    let found = report_by_site(&report, &["leak_after_attach"]);
    assert_eq!(found.get("leak_after_attach"), Some(&(3840, 30)));
    // The target is untouched and still running.
    assert!(run.fixture.try_wait().unwrap().is_none());
    drop(run.fixture.stdin.take());
    assert!(run.fixture.wait().unwrap().success());
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
    let mut run = attach("text", &[]);
    run.go();
    unsafe { libc::kill(run.tracer.id() as i32, signal) };
    let output = run.tracer.wait_with_output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("final report"), "{text}");
    assert!(text.contains("3840 bytes in 30 allocations"), "{text}");
    assert!(text.contains("leak_after_attach at "), "{text}");
    drop(run.fixture.stdin.take());
    run.fixture.wait().unwrap();
}
