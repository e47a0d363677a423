//! Issue 9, reliability: long runs, races and odd control flow must not
//! lose or double-count bytes.

use tracer_tests::*;

/// 600 distinct short-lived stacks with room for 256: stacks whose blocks
/// are all freed are reclaimed, so none is lost, and the leaks (one of them
/// among the distinct stacks) are still exact.
#[test]
fn stacks_that_hold_nothing_are_reclaimed() {
    require_root();
    let program = fixture("many_stacks_c");
    let (report, stdout, _) = trace_run(&[program.to_str().unwrap()], &["--max-stacks", "256"]);
    assert!(stdout.contains("DONE"), "fixture did not finish: {stdout}");
    let expected = expectations(&stdout);
    let found = report_by_site(&report, &["leak_deep", "leak_end", "leaf"]);
    assert_eq!(
        found.get("leak_deep"),
        expected.get("leak_deep"),
        "{report:#}"
    );
    assert_eq!(
        found.get("leak_end"),
        expected.get("leak_end"),
        "{report:#}"
    );
    assert_eq!(found.get("leaf"), None, "freed churn reported: {report:#}");
    let dropped = &report["dropped"];
    assert_eq!(dropped["lost_stacks"], 0, "{report:#}");
    assert_eq!(dropped["stack_stats_full"], 0, "{report:#}");
}

/// One thread moves blocks with realloc while another allocates blocks of
/// the old size from the same free lists, so realloc's old address is
/// handed out again around realloc's return. realloc now takes the old
/// block's record at entry, while the caller still owns the block, so the
/// other thread's new record at that address can never be mistaken for it:
/// nothing is missed or left over, and the leak is exact.
#[test]
fn realloc_racing_a_malloc_of_the_same_address_stays_exact() {
    require_root();
    let program = fixture("realloc_race_c");
    let tunables = (
        "GLIBC_TUNABLES",
        "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=1",
    );
    let (report, stdout, _) = trace_run_with_env(&[program.to_str().unwrap()], &[], &[tunables]);
    assert!(stdout.contains("DONE"), "fixture did not finish: {stdout}");
    let found = report_by_site(&report, &["leak_after", "mover", "taker"]);
    assert_eq!(found.get("leak_after"), Some(&(320, 5)), "{report:#}");
    assert_eq!(found.get("mover"), None, "{report:#}");
    assert_eq!(found.get("taker"), None, "{report:#}");
    assert_eq!(report["dropped"]["missed_frees"], 0, "{report:#}");
}

/// A thread that leaves malloc through siglongjmp from a signal handler
/// leaves an in-flight record behind; later allocations from a deeper stack
/// (below that record) must not be taken for inner calls of the dead one.
#[test]
fn a_call_left_by_longjmp_does_not_silence_the_thread() {
    require_root();
    let program = fixture("longjmp_c");
    let (report, stdout, _) = trace_run(&[program.to_str().unwrap()], &[]);
    assert!(stdout.contains("DONE"), "fixture did not finish: {stdout}");
    assert!(stdout.contains("JUMPED"), "{stdout}");
    let found = report_by_site(&report, &["leak_deeper"]);
    assert_eq!(found.get("leak_deeper"), Some(&(770, 10)), "{report:#}");
}
