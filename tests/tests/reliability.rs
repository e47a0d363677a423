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

/// Job control works under `tracer run`: a command stopped with SIGSTOP
/// stays stopped until SIGCONT (the tracer must not resume it), then
/// finishes with its own exit code and an exact report.
#[test]
fn a_stopped_command_stays_stopped_until_continued() {
    use std::time::{Duration, Instant};
    require_root();
    let report = temp_path("jobcontrol.json");
    let mut tracer = std::process::Command::new(tracer())
        .args(["run", "--format", "json", "--output"])
        .arg(&report)
        .arg("--")
        .arg(fixture("growing_c"))
        .arg("2") // runs 2 s
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The command is the tracer's only child (forked by one of its threads).
    let start = Instant::now();
    let pid: i32 = loop {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", tracer.id())).unwrap();
        let child = tasks.filter_map(Result::ok).find_map(|task| {
            let text = std::fs::read_to_string(task.path().join("children")).ok()?;
            text.split_whitespace().next()?.parse().ok()
        });
        if let Some(pid) = child {
            break pid;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no child");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // Stopped for 3 s: longer than the whole run would take.
    std::thread::sleep(Duration::from_secs(3));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let state = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(
        matches!(state, "T" | "t"),
        "state {state}: the command was resumed"
    );
    assert!(tracer.try_wait().unwrap().is_none(), "tracer ended early");
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let status = tracer.wait().unwrap();
    assert!(status.success(), "{status}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let leak = report_by_site(&report, &["leak_steadily"]);
    assert_eq!(leak["leak_steadily"], (20 * 512, 20), "{report:#}");
}

/// Ctrl-C reaches the whole foreground process group: `tracer run` waits
/// for the command to exit and passes on its status (130 for SIGINT), with
/// a final report, instead of leaving first with 0.
#[test]
fn ctrl_c_in_run_waits_for_the_command_and_passes_its_status_on() {
    use std::os::unix::process::CommandExt;
    require_root();
    let report = temp_path("ctrl-c.json");
    let mut tracer = std::process::Command::new(tracer())
        .args(["run", "--format", "json", "--output"])
        .arg(&report)
        .arg("--")
        .arg(fixture("growing_c"))
        .arg("30")
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    // The command's first line: it runs traced, and the tracer listens for signals.
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(tracer.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("growing:"), "{line}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    // What a terminal does on Ctrl-C: SIGINT to every process of the group.
    unsafe { libc::kill(-(tracer.id() as i32), libc::SIGINT) };
    let status = tracer.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(
        report["totals"]["bytes"].as_u64().unwrap() > 0,
        "{report:#}"
    );
}
