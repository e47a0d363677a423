//! Soak: a long run at a high allocation rate over many distinct stacks.
//! The tracer's own memory must stay flat and its numbers exact. CI runs it
//! for 20 s; `SOAK_SECONDS=3600 cargo xtask test soak` is the hour-long run.

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use tracer_tests::*;

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[test]
fn tracer_memory_stays_flat_and_numbers_exact() {
    require_root();
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let lines_path = temp_path("soak.jsonl");
    let mut tracer = TracerCmd::run_json(&lines_path)
        .args(["--interval", "1s"])
        .command(fixture("soak_c"))
        .arg(seconds.to_string())
        .spawn();
    // RSS samples once a second while it runs, timed from its first report
    // (on a busy machine, attaching can take seconds: its warm-up must not
    // fall into the window measured below).
    let start = Instant::now();
    let mut first_report: Option<f64> = None;
    let mut samples: Vec<(f64, u64)> = Vec::new();
    while tracer.is_running() {
        let now = start.elapsed().as_secs_f64();
        if first_report.is_none() && std::fs::metadata(&lines_path).is_ok_and(|m| m.len() > 0) {
            first_report = Some(now);
        }
        if let (Some(kib), Some(first)) = (rss_kib(tracer.pid()), first_report) {
            samples.push((now - first, kib));
        }
        sleep(Duration::from_secs(1));
    }
    let output = tracer.finish();
    assert!(output.status.success(), "{}", output.status);
    let stdout = output.stdout;
    assert!(stdout.contains("DONE"), "{stdout}");

    // Exact at the end, nothing dropped.
    let reports = read_json_lines(&lines_path);
    assert!(
        reports.len() as u64 >= seconds / 2,
        "{} reports",
        reports.len()
    );
    let last = reports.last().unwrap();
    let expected = expectations(&stdout);
    let found = report_by_site(last, &["leak_slowly"]);
    assert_eq!(
        found.get("leak_slowly"),
        expected.get("leak_slowly"),
        "{last:#}"
    );
    for (key, value) in last["dropped"].as_object().unwrap() {
        assert_eq!(value.as_u64(), Some(0), "dropped.{key}");
    }
    // Counts only grow, and the leak never shrinks between reports.
    let mut previous = (0, 0);
    for report in &reports {
        let allocations = report["events"]["allocations"].as_u64().unwrap();
        let leaked = report_by_site(report, &["leak_slowly"])
            .get("leak_slowly")
            .map_or(0, |(bytes, _)| *bytes);
        assert!(
            allocations >= previous.0 && leaked >= previous.1,
            "{report:#}"
        );
        previous = (allocations, leaked);
    }

    // The tracer's RSS is flat once warmed up (symbol caches filled): over
    // the second half of the run since its first report its floor grows by
    // less than 2 MiB.
    let half: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= seconds as f64 / 2.0)
        .map(|(_, kib)| *kib)
        .collect();
    assert!(half.len() >= 4, "{samples:?}");
    // Compared by minimums: a buffer the tracer takes and gives back
    // (a large read mapped and unmapped) shows as a spike, not growth.
    let (early, late) = half.split_at(half.len() / 2);
    let growth = late
        .iter()
        .min()
        .unwrap()
        .saturating_sub(*early.iter().min().unwrap());
    assert!(growth < 2048, "tracer RSS grew {growth} KiB: {samples:?}");
    eprintln!(
        "soak: {} s, {} allocations traced, tracer RSS {:?} KiB (min..max)",
        seconds,
        previous.0,
        (
            samples.iter().map(|s| s.1).min(),
            samples.iter().map(|s| s.1).max()
        )
    );
}
