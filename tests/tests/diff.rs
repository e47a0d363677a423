//! `tracer diff` on reports from two separate runs of the demo service (one
//! second, then two seconds of requests): stack ids and addresses differ
//! between runs, so matching must go by frames; the growth is exact.

use serde_json::Value;
use tracer_tests::*;

fn demo_report(seconds: &str) -> std::path::PathBuf {
    require_root();
    let program = fixture("demo_c");
    let (report, _, _) = trace_run(&[program.to_str().unwrap(), seconds], &[]);
    // Unique per call: tests run in parallel and two may trace the same duration.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = temp_path(&format!("demo-{seconds}s-{call}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    path
}

fn diff(args: &[&str]) -> Finished {
    TracerCmd::new("diff").args(args).output()
}

fn stdout_of(output: Finished) -> String {
    assert!(
        output.status.success(),
        "tracer diff failed: {}",
        output.stderr
    );
    output.stdout
}

#[test]
fn diff_of_two_runs_shows_exact_growth_in_text_folded_and_svg() {
    let before = demo_report("1");
    let after = demo_report("2");
    let (b, a) = (before.to_str().unwrap(), after.to_str().unwrap());

    // 100 requests, then 200: 256 bytes each in cache_session, 1 KiB every
    // 10th in format_error.
    let text = stdout_of(diff(&[b, a, "--top", "0"]));
    let first = text
        .find("+25600 bytes (25.0 KiB), +100 allocations (25600 -> 51200 bytes")
        .unwrap_or_else(|| panic!("cache_session growth not in:\n{text}"));
    let second = text
        .find("+10240 bytes (10.0 KiB), +10 allocations (10240 -> 20480 bytes")
        .unwrap_or_else(|| panic!("format_error growth not in:\n{text}"));
    assert!(first < second, "sorted by growth:\n{text}");
    let cache = text.find("cache_session at ").unwrap();
    assert!(
        first < cache && cache < second,
        "frames under their growth:\n{text}"
    );

    let folded = stdout_of(diff(&[b, a, "--format", "folded"]));
    let line = |leaf: &str| {
        folded
            .lines()
            .find(|l| l.contains(&format!(";{leaf} ")))
            .unwrap_or_else(|| panic!("no {leaf} line in:\n{folded}"))
            .to_string()
    };
    assert!(line("cache_session").ends_with(";handle_request;cache_session 25600 51200"));
    assert!(line("format_error").ends_with(";format_error 10240 20480"));
    let allocations = stdout_of(diff(&[
        b,
        a,
        "--format",
        "folded",
        "--weight",
        "allocations",
    ]));
    assert!(
        allocations.contains(";cache_session 100 200"),
        "{allocations}"
    );

    let svg_path = temp_path("demo-diff.svg");
    stdout_of(diff(&[
        b,
        a,
        "--format",
        "svg",
        "-o",
        svg_path.to_str().unwrap(),
    ]));
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let titles = svg_titles(&svg);
    // inferno's differential titles carry the change as a percentage.
    assert!(
        titles
            .iter()
            .any(|t| t.starts_with("cache_session (51,200 bytes") && t.contains('+')),
        "{titles:?}"
    );
}

#[test]
fn json_lines_count_as_their_last_report() {
    let after = demo_report("1");
    let report = read_json(&after);
    let mut earlier = report.clone();
    earlier["stacks"] = Value::Array(Vec::new());
    let lines = temp_path("lines.jsonl");
    std::fs::write(&lines, format!("{earlier}\n{report}\n")).unwrap();
    let empty = temp_path("empty.json");
    std::fs::write(&empty, earlier.to_string()).unwrap();
    let text = stdout_of(diff(&[empty.to_str().unwrap(), lines.to_str().unwrap()]));
    assert!(
        text.contains("+25600 bytes (25.0 KiB), +100 allocations (0 -> 25600 bytes"),
        "{text}"
    );
}

#[test]
fn malformed_input_is_one_line_naming_the_file() {
    let good = temp_path("good.json");
    std::fs::write(
        &good,
        r#"{"pid":1,"command":"x","duration_s":1.0,"min_age_s":0.0,
            "allocator":{"object":"libc","functions":[]},"totals":{"bytes":0,"allocations":0},
            "stacks":[],"stack_count":0,
            "dropped":{"untracked_allocations":0,"lost_stacks":0,"stack_stats_full":0,
                       "in_flight_full":0,"missed_frees":0},
            "events":{"allocations":0,"frees":0,"untracked_frees":0,"failed_allocations":0}}"#,
    )
    .unwrap();
    let bad = temp_path("bad.json");
    std::fs::write(&bad, "{\"pid\": 1, \"stacks\": \"oops\"}\n").unwrap();
    let missing = temp_path("missing.json");
    for (before, after, named) in [(&good, &bad, &bad), (&missing, &good, &missing)] {
        let output = diff(&[before.to_str().unwrap(), after.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(1));
        let stderr = output.stderr;
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("tracer: error: "), "{stderr}");
        assert!(stderr.contains(named.to_str().unwrap()), "{stderr}");
    }
    // Identical reports: nothing changed, still a success.
    let same = stdout_of(diff(&[good.to_str().unwrap(), good.to_str().unwrap()]));
    assert!(same.contains("0 stacks grew, 0 shrank"), "{same}");
}
