//! The mmap family: anonymous mappings the program makes itself are
//! reported per stack, in their own section, with exact bytes through
//! partial munmaps and mremaps; the mappings glibc makes to serve large
//! malloc blocks count once, as heap.

use std::collections::BTreeMap;

use serde_json::Value;
use tracer_tests::*;

/// `EXPECT_MAP <function> <bytes> <mappings>` lines.
fn map_expectations(stdout: &str) -> BTreeMap<String, (u64, u64)> {
    stdout
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("EXPECT_MAP ")?.split_whitespace();
            Some((
                words.next()?.to_string(),
                (words.next()?.parse().ok()?, words.next()?.parse().ok()?),
            ))
        })
        .collect()
}

fn mappings_by_site(report: &Value, sites: &[&str]) -> BTreeMap<String, (u64, u64)> {
    let section = serde_json::json!({ "stacks": report["mappings"]["stacks"].clone() });
    report_by_site(&section, sites)
}

/// Whether mapping stacks start at the function that called mmap on this
/// kernel (doctor's `paths.mmap_callers`: bpf_task_pt_regs), under `env`.
fn callers_recovered(env: &[(&str, &str)]) -> bool {
    let mut doctor = TracerCmd::new("doctor").args(["--format", "json"]);
    for (key, value) in env {
        doctor = doctor.env(key, value);
    }
    let output = doctor.output();
    let doc: Value = serde_json::from_str(&output.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}{}", output.stdout, output.stderr));
    doc["paths"]["mmap_callers"] == true
}

/// mapped_c traced under `env`: exact bytes per site and in total, and
/// glibc's own mappings for large blocks counted once, as heap.
fn mappings_exact(env: &[(&str, &str)]) {
    let callers = callers_recovered(env);
    let program = fixture("mapped_c");
    let (report, stdout, _) = trace_run_with_env(&[program.to_str().unwrap()], &[], env);
    assert!(stdout.contains("DONE"), "fixture did not finish: {stdout}");
    let mappings = &report["mappings"];
    assert_eq!(mappings["traced"], true, "{mappings:#}");

    let expected = map_expectations(&stdout);
    assert_eq!(expected.len(), 4, "{stdout}");
    let mut sites: Vec<&str> = expected.keys().map(String::as_str).collect();
    sites.extend(["churn_maps", "big_malloc", "churn_big"]);
    let found = mappings_by_site(&report, &sites);
    for (site, want) in &expected {
        // Without the user registers (before 5.15) the function that
        // called mmap/mremap is lost: map_remap calls mremap itself, the
        // others reach mmap through a helper function and stay named.
        if !callers && site == "map_remap" {
            continue;
        }
        assert_eq!(
            found.get(site),
            Some(want),
            "mapping site {site}: {mappings:#}"
        );
    }
    for site in ["churn_maps", "big_malloc", "churn_big"] {
        assert_eq!(found.get(site), None, "{site} must not show as a mapping");
    }
    // Nothing but the fixture's own leaks: the loader's mappings are not
    // the program's, and the sum is exact.
    let want_bytes: u64 = expected.values().map(|(b, _)| b).sum();
    assert_eq!(mappings["bytes"], want_bytes, "{mappings:#}");
    assert_eq!(mappings["mappings"], 4);
    assert_eq!(mappings["lost_events"], 0);
    assert_eq!(mappings["lost_stacks"], 0);
    if callers {
        // The function that called mmap comes first, not libc's wrapper.
        let private = mappings["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| frame_functions(s).iter().any(|f| f == "map_remap"))
            .unwrap();
        assert_eq!(private["frames"][0]["function"], "map_remap", "{private}");
    }

    // Heap: the 3 MiB and 2 MiB blocks glibc mapped for malloc, once.
    let heap = report_by_site(&report, &["big_malloc", "churn_big"]);
    assert_eq!(
        heap.get("big_malloc"),
        Some(&expectations(&stdout)["big_malloc"])
    );
    assert_eq!(heap.get("big_malloc"), Some(&((5 << 20), 2)));
    assert_eq!(heap.get("churn_big"), None);
    // sbrk(64 KiB) by hand, on top of whatever malloc's main heap took.
    assert!(
        mappings["brk_growth_bytes"].as_i64().unwrap() >= 64 * 1024,
        "{mappings:#}"
    );
}

#[test]
fn mappings_are_exact_per_site_and_large_blocks_count_once() {
    require_root();
    skip_without_path!("mmap_tracking", "mmap tracking");
    mappings_exact(&[]);
}

/// As on a kernel without bpf_task_pt_regs (5.10-5.14): mappings are still
/// traced, exactly, with the kernel's frame-pointer walk alone.
#[test]
fn without_task_pt_regs_mappings_are_exact_by_frame_pointers_alone() {
    require_root();
    skip_without_path!("mmap_tracking", "mmap tracking");
    let env = [("TRACER_TEST_WITHOUT", "task_pt_regs")];
    assert!(!callers_recovered(&env));
    mappings_exact(&env);
}

#[test]
fn min_age_applies_to_mappings() {
    require_root();
    skip_without_path!("mmap_tracking", "mmap tracking");
    let program = fixture("mapped_c");
    let (report, _, _) = trace_run(&[program.to_str().unwrap()], &["--min-age", "1h"]);
    assert_eq!(report["mappings"]["bytes"], 0, "{:#}", report["mappings"]);
    assert_eq!(report["mappings"]["traced"], true);
}

/// The chain of each of mapped_deep_c's mapping sites, innermost first.
const DEEP_CHAINS: &[&[&str]] = &[
    &[
        "deep_map_inner",
        "deep_map_middle",
        "deep_map_outer",
        "main",
    ],
    &[
        "deep_remap_inner",
        "deep_remap_middle",
        "deep_remap_outer",
        "main",
    ],
];

/// Each site of mapped_deep_c (built -O2 -fomit-frame-pointer) holds its
/// exact bytes under a stack that names its whole chain, from the
/// function that called mmap/mremap to main, in order.
fn assert_deep_stacks(report: &Value, said: &str) {
    let mappings = &report["mappings"];
    assert_eq!(mappings["traced"], true, "{mappings:#}");
    assert_eq!(mappings["lost_stacks"], 0, "{mappings:#}");
    let expected = map_expectations(said);
    assert_eq!(expected.len(), DEEP_CHAINS.len(), "{said}");
    for chain in DEEP_CHAINS {
        let site = chain[0];
        let stacks: Vec<&Value> = mappings["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| frame_functions(s).first().map(String::as_str) == Some(site))
            .collect();
        assert_eq!(stacks.len(), 1, "one stack starts at {site}: {mappings:#}");
        let stack = stacks[0];
        let functions = frame_functions(stack);
        assert_eq!(
            &functions[..chain.len()],
            *chain,
            "{site}'s stack: {functions:?}"
        );
        assert_eq!(
            (
                stack["bytes"].as_u64().unwrap(),
                stack["allocations"].as_u64().unwrap()
            ),
            expected[site],
            "{site}: {stack:#}"
        );
    }
}

/// Skips (printing why) where mapping stacks cannot be walked by CFI: no
/// bpf_task_pt_regs (before 5.15), so no user registers at the syscall.
fn skip_without_callers() -> bool {
    if !callers_recovered(&[]) {
        println!(
            "SKIPPED on this kernel: no bpf_task_pt_regs: mapping stacks are the kernel's frame-pointer walk"
        );
        return true;
    }
    false
}

/// The default mode walks a mapping's stack by CFI from the registers at
/// the syscall: on code without frame pointers every function of the chain
/// is named (a frame-pointer walk keeps one or two).
#[test]
fn mapping_stacks_are_whole_without_frame_pointers() {
    require_root();
    skip_without_path!("mmap_tracking", "mmap tracking");
    if skip_without_callers() {
        return;
    }
    let program = fixture("mapped_deep_c");
    let (report, stdout, _) = trace_run(&[program.to_str().unwrap()], &[]);
    assert!(stdout.contains("DONE"), "fixture did not finish: {stdout}");
    assert_eq!(report["unwinding"]["mode"], "cfi");
    assert_deep_stacks(&report, &stdout);

    // With --unwind fp the same sites keep their first frame (the caller
    // found above the stack pointer) but lose the rest of the chain.
    let (report, _, _) = trace_run(&[program.to_str().unwrap()], &["--unwind", "fp"]);
    let stack = report["mappings"]["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| frame_functions(s).first().map(String::as_str) == Some("deep_map_inner"))
        .unwrap_or_else(|| panic!("{:#}", report["mappings"]));
    assert!(
        !frame_functions(stack).iter().any(|f| f == "deep_map_outer"),
        "frame pointers cannot walk this: {stack:#}"
    );
}

/// The same in attach mode: the tables of a running process are in place
/// before its next mmap.
#[test]
fn mapping_stacks_are_whole_without_frame_pointers_in_attach_mode() {
    require_root();
    skip_without_path!("mmap_tracking", "mmap tracking");
    if skip_without_callers() {
        return;
    }
    let (report, said) =
        report_attached_by_cfi(Fixture::start(fixture("mapped_deep_c"), &["attach"]));
    assert_deep_stacks(&report, &said);
}
