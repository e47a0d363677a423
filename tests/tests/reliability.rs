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

/// The command's output and exit status are the same with and without the
/// tracer.
#[test]
fn the_command_behaves_the_same_under_the_tracer() {
    require_root();
    let program = fixture("leaky_c");
    let alone = std::process::Command::new(&program).output().unwrap();
    let (_, traced_stdout, traced) = trace_run(&[program.to_str().unwrap()], &[]);
    assert_eq!(traced_stdout, String::from_utf8_lossy(&alone.stdout));
    assert_eq!(traced.status.code(), alone.status.code());
    let status = std::process::Command::new(tracer())
        .args(["run", "--format", "json", "--output"])
        .arg(temp_path("exit7.json"))
        .args(["--", "sh", "-c", "echo out; echo err >&2; exit 7"])
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&status.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&status.stderr), "err\n");
}

/// A tracer killed with SIGKILL mid-run takes its probes with it (they are
/// file descriptors) and the command runs on to the end, unchanged.
#[test]
fn the_command_survives_a_killed_tracer() {
    use std::io::Read;
    require_root();
    let program = fixture("aging_c"); // leaks, pauses 1.5 s, leaks, exits
    let alone = std::process::Command::new(&program).output().unwrap();
    let mut tracer = std::process::Command::new(tracer())
        .args(["run", "--format", "json", "--output"])
        .arg(temp_path("killed.json"))
        .arg("--")
        .arg(&program)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The command is in its pause by now.
    std::thread::sleep(std::time::Duration::from_millis(700));
    tracer.kill().unwrap();
    assert!(!tracer.wait().unwrap().success());
    // The command holds the pipe's write end until it exits.
    let mut out = String::new();
    tracer
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, String::from_utf8_lossy(&alone.stdout));
}

/// After the main thread calls pthread_exit, the other threads' calls are
/// still seen (the probes are bound to one thread; the tracer re-binds them
/// to a live one).
#[test]
fn threads_are_traced_after_the_main_thread_exits() {
    require_root();
    let program = fixture("main_exits_c");
    let (report, stdout, _) = trace_run(&[program.to_str().unwrap()], &[]);
    assert!(stdout.contains("DONE"), "fixture did not finish: {stdout}");
    let found = report_by_site(&report, &["leak_in_worker", "churn_in_worker"]);
    assert_eq!(found.get("leak_in_worker"), Some(&(550, 10)), "{report:#}");
    assert_eq!(found.get("churn_in_worker"), None, "{report:#}");
}
