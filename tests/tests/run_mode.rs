//! `tracer run`: a command traced from its first allocation. Each fixture
//! announces its leaks; the report must match them exactly, per site, and
//! nothing from the fixture's churn may appear.

use serde_json::Value;
use tracer_tests::*;

fn check_fixture(name: &str, churn_functions: &[&str]) -> Value {
    let (report, _) = trace_exact(name, &[], &[], churn_functions);
    // The totals cover every stack, and the listed stacks add up to them.
    let listed: u64 = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(report["totals"]["bytes"].as_u64().unwrap(), listed);
    report
}

#[test]
fn c_fixture_leaks_are_exact() {
    let report = check_fixture("leaky_c", &["churn", "cross_alloc", "cross_free"]);
    // The leak site is the innermost frame, with file and line.
    let stack = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frames"][0]["function"] == "leak_malloc")
        .expect("a stack whose first frame is leak_malloc");
    let frame = &stack["frames"][0];
    assert!(
        frame["file"].as_str().unwrap().ends_with("leaky.c"),
        "{frame}"
    );
    assert!(frame["line"].as_u64().unwrap() > 0);
    assert!(frame["module"].as_str().unwrap().ends_with("leaky_c"));
    assert!(frame["address"].as_str().unwrap().starts_with("0x"));
    assert_eq!(stack["total_allocations"], 10);
    assert!(stack["oldest_age_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        report["allocator"]["object"]
            .as_str()
            .map(|p| p.contains("libc.so")),
        Some(true)
    );
}

#[test]
fn cpp_fixture_leaks_are_exact() {
    check_fixture("leaky_cpp", &["churn"]);
}

#[test]
fn rust_fixture_leaks_are_exact() {
    check_fixture("leaky_rs", &["churn"]);
}

#[test]
fn min_age_leaves_out_young_blocks() {
    require_root();
    let program = fixture("aging_c");
    let (report, stdout, _) = trace_run(&[program.to_str().unwrap()], &["--min-age", "1s"]);
    let sites = ["leak_old", "leak_young"];
    let found = report_by_site(&report, &sites);
    assert_eq!(expectations(&stdout)["leak_old"], (1000, 10));
    assert_eq!(found.get("leak_old"), Some(&(1000, 10)));
    assert_eq!(
        found.get("leak_young"),
        None,
        "young blocks must be left out"
    );
    let old = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| site_of(&frame_functions(s), &sites) == Some("leak_old"))
        .unwrap();
    assert!(old["oldest_age_s"].as_f64().unwrap() >= 1.4, "{old}");
    assert_eq!(report["min_age_s"], 1.0);
}

#[test]
fn exit_code_of_the_command_is_passed_through() {
    require_root();
    let status = TracerCmd::run_json(temp_path("exit3.json"))
        .command("sh")
        .args(["-c", "exit 3"])
        .output()
        .status;
    assert_eq!(status.code(), Some(3));
}

#[test]
fn json_lines_with_an_explicit_interval() {
    require_root();
    let path = temp_path("lines.jsonl");
    let program = fixture("aging_c");
    let status = TracerCmd::run_json(&path)
        .args(["--interval", "300ms"])
        .command(&program)
        .output()
        .status;
    assert!(status.success());
    let reports = read_json_lines(&path);
    assert!(
        reports.len() >= 3,
        "one line per interval plus the final one: {}",
        reports.len()
    );
    let last = reports.last().unwrap();
    let found = report_by_site(last, &["leak_old", "leak_young"]);
    assert_eq!(found.get("leak_young"), Some(&(500, 10)));
}

#[test]
fn command_runs_as_the_sudo_user() {
    require_root();
    let output = TracerCmd::run_json(temp_path("sudo.json"))
        .command("id")
        .arg("-u")
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .configure(|command| {
            command.env_remove("SUDO_USER");
        })
        .output();
    assert!(output.status.success(), "{}", output.stderr);
    assert_eq!(output.stdout.trim(), "65534");
}

#[test]
fn full_maps_are_counted_and_shown_not_mixed_in() {
    require_root();
    let program = fixture("leaky_c");
    // Room for 16 live blocks only: the rest must be counted as dropped.
    let (report, _, _) = trace_run(&[program.to_str().unwrap()], &["--max-allocations", "16"]);
    let dropped = report["dropped"]["untracked_allocations"].as_u64().unwrap();
    assert!(dropped > 0, "{report:#}");
    let total = report["totals"]["allocations"].as_u64().unwrap();
    assert!(total <= 16, "never more than the map holds: {total}");
    // Room for 4 stacks: allocations from other stacks are not attributed
    // to a wrong stack; they are counted as lost.
    let (report, _, _) = trace_run(&[program.to_str().unwrap()], &["--max-stacks", "4"]);
    let d = &report["dropped"];
    assert!(
        d["lost_stacks"].as_u64().unwrap() + d["stack_stats_full"].as_u64().unwrap() > 0,
        "{report:#}"
    );
    for stack in report["stacks"].as_array().unwrap() {
        let functions = frame_functions(stack);
        if functions.iter().any(|f| f == "leak_malloc") {
            assert_eq!(stack["bytes"], 1000, "a stack keeps only its own blocks");
        }
    }
}
