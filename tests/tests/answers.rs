//! Answers, not numbers: each stack's trend and where memory went, on
//! fixtures whose behaviour is known (`behaviours.c`). Each test follows
//! the JSON lines of `tracer run --interval 1s` as they come and stops as
//! soon as the answer is in, or fails when a report passes its time limit.

use serde_json::Value;
use tracer_tests::*;

/// Runs `behaviours_c MODE` under the tracer, one JSON report a second,
/// and hands each report to `done` until it says so. Panics with the
/// reports seen if the run goes past `limit_s` seconds of tracing first.
fn follow(
    mode: &str,
    limit_s: f64,
    extra: &[&str],
    mut done: impl FnMut(&Value) -> bool,
) -> Vec<Value> {
    require_root();
    let mut tracer = TracerCmd::new("run")
        .args(["--format", "json", "--interval", "1s", "--top", "0"])
        .args(extra)
        .command(fixture("behaviours_c"))
        .args([mode, &(limit_s + 20.0).to_string()])
        .spawn();
    let mut reports = Vec::new();
    loop {
        let chunk = tracer.wait_for_stdout("\"duration_s\"");
        let line = chunk.lines().last().unwrap();
        let report: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON ({e}): {line}"));
        let finished = done(&report);
        let duration = report["duration_s"].as_f64().unwrap();
        reports.push(report);
        if finished {
            break;
        }
        assert!(
            duration <= limit_s,
            "{mode}: no answer after {duration} s; trends and memory seen:\n{}",
            summary(&reports)
        );
    }
    // Ends the fixture itself (it would run out its time otherwise); the
    // tracer ends with it.
    let pid = reports.last().unwrap()["pid"].as_i64().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    tracer.finish();
    reports
}

/// The stack of a report that allocated in `site`.
fn stack<'a>(report: &'a Value, site: &str) -> Option<&'a Value> {
    report["stacks"]
        .as_array()?
        .iter()
        .find(|s| frame_functions(s).iter().any(|f| f == site))
}

fn summary(reports: &[Value]) -> String {
    reports
        .iter()
        .map(|r| {
            let trends: Vec<String> = r["stacks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| format!("{}={}", frame_functions(s)[0], s["trend"]))
                .collect();
            format!(
                "[{}s] memory {} | {}",
                r["duration_s"],
                r["memory"],
                trends.join(" ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn trend_of(report: &Value, site: &str) -> Option<(String, f64, f64)> {
    let trend = &stack(report, site)?["trend"];
    Some((
        trend["kind"].as_str()?.to_string(),
        trend["bytes_per_second"].as_f64()?,
        trend["confidence"].as_f64()?,
    ))
}

#[test]
fn a_steady_leak_is_growing_with_high_confidence_within_30_s() {
    let mut churn_kinds = Vec::new();
    let reports = follow("leak", 30.0, &[], |report| {
        if let Some((kind, ..)) = trend_of(report, "churn_briefly") {
            churn_kinds.push(kind);
        }
        matches!(trend_of(report, "leak_steadily"),
            Some((kind, _, confidence)) if kind == "growing" && confidence >= 0.8)
    });
    let (_, rate, _) = trend_of(reports.last().unwrap(), "leak_steadily").unwrap();
    // 16 KiB every 100 ms, sleeps stretched on a busy machine: at most 160 KiB/s.
    assert!(
        (80_000.0..=180_000.0).contains(&rate),
        "rate {rate}: {}",
        summary(&reports)
    );
    assert!(
        !churn_kinds.iter().any(|k| k == "growing"),
        "churn called growing: {churn_kinds:?}"
    );
}

#[test]
fn a_cache_that_fills_then_replaces_is_a_plateau_never_growing() {
    let mut kinds = Vec::new();
    let reports = follow("cache", 25.0, &[], |report| {
        let Some((kind, _, confidence)) = trend_of(report, "cache_insert") else {
            return false;
        };
        kinds.push(kind.clone());
        // Long enough after the fill for a chance to be wrong.
        kind == "plateau" && confidence >= 0.6 && report["duration_s"].as_f64().unwrap() >= 15.0
    });
    assert!(
        !kinds.iter().any(|k| k == "growing"),
        "the cache was called growing: {kinds:?}\n{}",
        summary(&reports)
    );
}

#[test]
fn churn_is_never_growing() {
    let mut kinds = Vec::new();
    let reports = follow("churn", 40.0, &[], |report| {
        if let Some((kind, ..)) = trend_of(report, "churn_lived") {
            kinds.push(kind);
        }
        report["duration_s"].as_f64().unwrap() >= 15.0
    });
    assert!(kinds.len() >= 10, "{}", summary(&reports));
    assert!(
        !kinds.iter().any(|k| k == "growing"),
        "churn called growing: {kinds:?}"
    );
    assert!(kinds.last().is_some_and(|k| k != "new"), "{kinds:?}");
}

fn memory_of(report: &Value) -> (String, i64, i64) {
    let memory = &report["memory"];
    (
        memory["verdict"].as_str().unwrap_or("").to_string(),
        memory["rss_change_bytes"].as_i64().unwrap_or(0),
        memory["heap_change_bytes"].as_i64().unwrap_or(0),
    )
}

#[test]
fn growth_through_shared_memory_is_outside() {
    let reports = follow("memfd", 30.0, &[], |report| {
        let (verdict, rss, _) = memory_of(report);
        verdict == "outside" && rss >= 48 << 20
    });
    let last = reports.last().unwrap();
    let memory = &last["memory"];
    assert!(
        memory["heap_change_bytes"].as_i64().unwrap() < 1 << 20,
        "{memory}"
    );
    assert!(
        memory["rss_shared_change_bytes"].as_i64().unwrap() >= 48 << 20,
        "{memory}"
    );
    // The same, per process.
    assert_eq!(
        last["processes"][0]["memory"]["verdict"], "outside",
        "{last}"
    );
}

#[test]
fn growth_through_the_heap_is_heap_and_the_heap_explains_it() {
    let reports = follow("heap", 30.0, &[], |report| {
        let (verdict, rss, _) = memory_of(report);
        verdict == "heap" && rss >= 60 << 20
    });
    let (_, rss, heap) = memory_of(reports.last().unwrap());
    assert!(
        (heap - rss).abs() as f64 <= 0.3 * rss as f64,
        "heap change {heap} against RSS change {rss}: {}",
        reports.last().unwrap()["memory"]
    );
}

#[test]
fn growth_through_anonymous_mappings_is_mappings() {
    let reports = follow("mapped", 30.0, &[], |report| {
        let (verdict, rss, _) = memory_of(report);
        verdict == "mappings" && rss >= 60 << 20
    });
    let memory = &reports.last().unwrap()["memory"];
    assert!(
        memory["mappings_change_bytes"].as_i64().unwrap() >= 64 << 20,
        "{memory}"
    );
}

#[test]
fn growth_no_probe_sees_is_a_coverage_gap_naming_the_object() {
    let reports = follow("arena", 30.0, &[], |report| {
        report["memory"]["coverage"].is_object() && memory_of(report).1 >= 48 << 20
    });
    let memory = &reports.last().unwrap()["memory"];
    assert_eq!(memory["verdict"], "outside", "{memory}");
    let objects = memory["coverage"]["unprobed_objects"].to_string();
    assert!(
        objects.contains("behaviours_c (") && objects.contains("arena_malloc"),
        "{memory}"
    );
    assert!(!objects.contains("libc.so"), "libc is probed: {memory}");
}

#[test]
fn labels_name_the_callers_of_wrappers_and_stacks_stay_whole() {
    require_root();
    let program = fixture("behaviours_c");
    let (report, stdout, _) = trace_run(&[program.to_str().unwrap(), "wrapped"], &[]);
    assert!(stdout.contains("DONE"), "{stdout}");
    let mut labels = Vec::new();
    for stack in report["stacks"].as_array().unwrap() {
        let functions = frame_functions(stack);
        let wrapper = functions[0].as_str();
        if !["xmalloc", "pool_get", "grab_buffer"].contains(&wrapper) {
            continue;
        }
        let at = stack["label_frame"].as_u64().unwrap_or(0) as usize;
        labels.push(functions[at].clone());
        // The full stack is unchanged: the wrapper, then its caller.
        assert_eq!(at, 1, "{functions:?}");
        // Only grab_buffer's code is nothing but allocator calls: xmalloc
        // calls abort, pool_get memset.
        let marked = stack["frames"][0]["wraps_allocator"] == true;
        assert_eq!(marked, wrapper == "grab_buffer", "{stack}");
    }
    labels.sort();
    assert_eq!(
        labels,
        [
            "load_config",
            "make_reply",
            "new_buffer",
            "new_request",
            "new_session",
            "new_timer",
            "parse_body",
            "parse_header"
        ]
    );
    // The text report heads each stack with its label.
    let text = TracerCmd::new("run")
        .command(&program)
        .arg("wrapped")
        .output();
    assert!(
        text.stdout.contains("  parse_body (behaviours.c:"),
        "{}",
        text.stdout
    );
}
