//! `tracer check`, the CI leak gate: exit codes, limits, suppressions, and
//! the JUnit report read by an XML parser.

use tracer_tests::*;

/// `tracer check [args] -- argv`, run to the end.
fn check(args: &[&str], argv: &[&str]) -> Finished {
    require_root();
    TracerCmd::new("check")
        .args(args)
        .command(argv[0])
        .args(&argv[1..])
        .output()
}

fn leaky() -> String {
    fixture("leaky_c").display().to_string()
}

#[test]
fn a_leaking_command_fails_with_23_and_the_exact_bytes() {
    let path = temp_path("check-leaky.json");
    let out = check(
        &["--report", path.to_str().unwrap(), "--format", "json"],
        &[&leaky()],
    );
    assert_eq!(out.status.code(), Some(23), "{}", out.stderr);
    let expected = expectations(&out.stdout);
    let bytes: u64 = expected.values().map(|(b, _)| b).sum();
    let blocks: u64 = expected.values().map(|(_, n)| n).sum();
    let report = read_json(&path);
    assert_eq!(report["passed"], false);
    assert_eq!(report["exit_code"], 23);
    assert_eq!(report["command_exit_code"], 0);
    assert_eq!(report["leaked"]["bytes"], bytes);
    assert_eq!(report["leaked"]["allocations"], blocks);
    let summary = out.stderr;
    assert_eq!(summary.lines().count(), 1, "{summary}");
    assert!(summary.starts_with("tracer check: FAIL: "), "{summary}");
}

#[test]
fn a_clean_command_passes_and_runtime_buffers_are_suppressed() {
    let clean = fixture("clean_c").display().to_string();
    let out = check(&[], &[&clean]);
    let text = out.stderr;
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("tracer check: PASS: 0 bytes in 0 allocations leaked"),
        "{text}"
    );
    assert!(
        text.contains("suppressed by `_IO_file_doallocate` (default: stdio stream buffers)"),
        "{text}"
    );
    // The stdio buffer is a leak only when the defaults are off.
    let out = check(&["--no-default-suppressions"], &[&clean]);
    assert_eq!(out.status.code(), Some(23), "{}", out.stderr);
    // The command's own failure wins.
    let out = check(&[], &[&clean, "fail"]);
    assert_eq!(out.status.code(), Some(3), "{}", out.stderr);
}

#[test]
fn suppression_files_and_limits() {
    let rules = temp_path("check.supp");
    std::fs::write(&rules, "# known\nleak:leak_malloc\nleak:^leak_cal*$\n").unwrap();
    let path = temp_path("check-supp.json");
    let out = check(
        &[
            "--suppressions",
            rules.to_str().unwrap(),
            "--report",
            path.to_str().unwrap(),
            "--format",
            "json",
        ],
        &[&leaky()],
    );
    let expected = expectations(&out.stdout);
    let all: u64 = expected.values().map(|(b, _)| b).sum();
    let hidden = expected["leak_malloc"].0 + expected["leak_calloc"].0;
    let report = read_json(&path);
    assert_eq!(report["leaked"]["bytes"], all - hidden, "{report:#}");
    let by_rule: Vec<(String, u64)> = report["suppressed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["origin"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string(),
                s["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        by_rule.contains(&("check.supp:2".to_string(), expected["leak_malloc"].0)),
        "{by_rule:?}"
    );
    assert!(
        by_rule.contains(&("check.supp:3".to_string(), expected["leak_calloc"].0)),
        "{by_rule:?}"
    );
    // Exactly at the limit passes; one byte less fails.
    let at = (all - hidden).to_string();
    let below = (all - hidden - 1).to_string();
    let supp = rules.to_str().unwrap();
    assert_eq!(
        check(
            &["--suppressions", supp, "--max-leak-bytes", &at],
            &[&leaky()]
        )
        .status
        .code(),
        Some(0)
    );
    assert_eq!(
        check(
            &["--suppressions", supp, "--max-leak-bytes", &below],
            &[&leaky()]
        )
        .status
        .code(),
        Some(23)
    );
}

#[test]
fn junit_report_parses_with_one_failure_per_leaking_stack() {
    let path = temp_path("check.xml");
    let out = check(
        &["--report", path.to_str().unwrap(), "--format", "junit"],
        &[&leaky()],
    );
    assert_eq!(out.status.code(), Some(23));
    let xml = std::fs::read_to_string(&path).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
    let cases: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testcase") && n.attribute("classname") == Some("tracer.leaks"))
        .collect();
    let skipped = doc
        .descendants()
        .filter(|n| n.has_tag_name("skipped"))
        .count();
    assert_eq!(
        skipped, 1,
        "the thread TLS vector is suppressed by default: {xml}"
    );
    let failed: Vec<_> = cases
        .iter()
        .filter(|c| c.children().any(|n| n.has_tag_name("failure")))
        .collect();
    assert!(!failed.is_empty());
    assert_eq!(failed.len(), cases.len(), "{xml}");
    let suite = doc
        .descendants()
        .find(|n| n.has_tag_name("testsuite"))
        .unwrap();
    assert_eq!(
        suite.attribute("failures").unwrap(),
        failed.len().to_string()
    );
    assert!(
        failed.iter().any(|c| c
            .attribute("name")
            .unwrap()
            .starts_with("leak_malloc (leaky.c:")),
        "{xml}"
    );
}

#[test]
fn a_bad_suppressions_file_stops_before_the_command_runs() {
    let rules = temp_path("bad.supp");
    std::fs::write(&rules, "leak:ok\nrace:nope\n").unwrap();
    let out = check(&["--suppressions", rules.to_str().unwrap()], &[&leaky()]);
    assert_eq!(out.status.code(), Some(1));
    let text = out.stderr;
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains("bad.supp:2: 'race:' is not a leak suppression"),
        "{text}"
    );
    assert!(out.stdout.is_empty(), "the command must not have run");
}

/// `--follow-forks`: a command whose children leak. Limits hold per
/// process, each process has its verdict, and JUnit names the process of
/// each leaking stack.
#[test]
fn follow_forks_gives_a_verdict_per_process() {
    let forks = fixture("forks_c").display().to_string();
    let path = temp_path("check-forks.json");
    let out = check(
        &[
            "--follow-forks",
            "--report",
            path.to_str().unwrap(),
            "--format",
            "json",
        ],
        &[&forks],
    );
    assert_eq!(out.status.code(), Some(23), "{}", out.stderr);
    let report = read_json(&path);
    let verdicts: Vec<(String, u64, u64, bool)> = report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["state"].as_str().unwrap().to_string(),
                p["leaked"]["bytes"].as_u64().unwrap(),
                p["leaked"]["allocations"].as_u64().unwrap(),
                p["passed"].as_bool().unwrap(),
            )
        })
        .collect();
    // The parent, the first child, the second child before and after its exec.
    assert_eq!(
        verdicts,
        [
            ("exited".to_string(), 400, 4, false),
            ("exited".to_string(), 2000, 2, false),
            ("exec".to_string(), 0, 0, true),
            ("exited".to_string(), 1500, 3, false),
        ],
        "{report:#}"
    );
    assert_eq!(report["leaked"]["bytes"], 3900);

    // 2000 bytes per process is enough for each, though not for all together.
    let out = check(&["--follow-forks", "--max-leak-bytes", "2000"], &[&forks]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    let out = check(&["--follow-forks", "--max-leak-bytes", "1999"], &[&forks]);
    assert_eq!(out.status.code(), Some(23), "{}", out.stderr);
    let text = out.stderr;
    assert!(
        text.contains(" LEAKS: 2000 bytes in 2 allocations"),
        "{text}"
    );

    let xml_path = temp_path("check-forks.xml");
    let out = check(
        &[
            "--follow-forks",
            "--report",
            xml_path.to_str().unwrap(),
            "--format",
            "junit",
        ],
        &[&forks],
    );
    assert_eq!(out.status.code(), Some(23));
    let xml = std::fs::read_to_string(&xml_path).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
    let failed: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .filter(|n| n.children().any(|c| c.has_tag_name("failure")))
        .filter_map(|n| n.attribute("name"))
        .collect();
    assert!(
        failed
            .iter()
            .any(|name| name.contains("leak_in_child") && name.contains("PID ")),
        "{failed:?}"
    );
}
