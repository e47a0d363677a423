//! Several processes: `--pid` repeated, `--comm`, `--follow-forks` (a
//! started command's children through ptrace, a running process's through
//! the sched tracepoints) and exec. Each process's leaks are exact and
//! reported under its own pid.

use std::collections::BTreeMap;

use serde_json::Value;
use tracer_tests::*;

const FORK_SITES: &[&str] = &[
    "leak_in_parent",
    "leak_in_child",
    "leak_before_exec",
    "leak_after_exec",
    "churn",
];

/// Site -> (bytes, blocks) of the stacks of process `pid` only.
fn sites_of(report: &Value, pid: u64, sites: &[&str]) -> BTreeMap<String, (u64, u64)> {
    let stacks: Vec<Value> = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["pid"].as_u64() == Some(pid))
        .cloned()
        .collect();
    report_by_site(&serde_json::json!({ "stacks": stacks }), sites)
}

/// The report's entries for process `pid` (one per program it ran).
fn processes_with_pid(report: &Value, pid: u64) -> Vec<Value> {
    report["processes"]
        .as_array()
        .expect("processes array")
        .iter()
        .filter(|p| p["pid"].as_u64() == Some(pid))
        .cloned()
        .collect()
}

/// Starts `tracer report ... --format json --top 0 -v` and waits until it
/// says it attached to `count` processes.
fn report_on(args: &[&str], count: usize) -> Tracer {
    let mut tracer = TracerCmd::new("report")
        .args(["--format", "json", "--top", "0", "-v"])
        .args(args)
        .spawn();
    for _ in 0..count {
        tracer.wait_for("attached to PID");
    }
    tracer
}

/// Two running processes traced at once, then both exit: one report, each
/// process's leak exact under its own pid.
fn two_at_once(program: &std::path::Path, selector: impl Fn(&Fixture, &Fixture) -> Vec<String>) {
    require_root();
    let mut a = Fixture::start(program, &[]);
    let mut b = Fixture::start(program, &[]);
    let args = selector(&a, &b);
    let tracer = report_on(&args.iter().map(String::as_str).collect::<Vec<_>>(), 2);
    a.go();
    b.go();
    let (pid_a, pid_b) = (a.pid() as u64, b.pid() as u64);
    a.finish();
    b.finish();
    let report = tracer.finish().json();
    for pid in [pid_a, pid_b] {
        let sites = sites_of(&report, pid, &["leak_after_attach", "leak_before_attach"]);
        assert_eq!(
            sites.get("leak_after_attach"),
            Some(&(3840, 30)),
            "PID {pid}: {report:#}"
        );
        assert_eq!(sites.get("leak_before_attach"), None);
        let entries = processes_with_pid(&report, pid);
        assert_eq!(entries.len(), 1, "{report:#}");
        assert_eq!(entries[0]["totals"]["bytes"], 3840, "{report:#}");
        assert_eq!(entries[0]["totals"]["allocations"], 30);
        assert_eq!(entries[0]["state"], "exited");
    }
    assert_eq!(report["totals"]["bytes"], 2 * 3840, "{report:#}");
    assert_eq!(report["processes"].as_array().unwrap().len(), 2);
}

#[test]
fn two_processes_by_pid_are_exact_each() {
    two_at_once(&fixture("attach_c"), |a, b| {
        vec![
            "--pid".into(),
            a.pid().to_string(),
            "--pid".into(),
            b.pid().to_string(),
        ]
    });
}

#[test]
fn comm_traces_every_process_of_that_name() {
    // A copy under a name no other test uses, so --comm finds only these two.
    let name = format!("comm{}", std::process::id() % 100_000);
    let program = temp_path(&name);
    std::fs::copy(fixture("attach_c"), &program).unwrap();
    two_at_once(&program, |_, _| vec!["--comm".into(), name.clone()]);
}

#[test]
fn comm_without_such_process_is_one_line() {
    require_root();
    let output = TracerCmd::new("report")
        .args(["--comm", "no-such-comm-xy"])
        .output();
    assert_eq!(output.status.code(), Some(1));
    let stderr = output.stderr;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no running process is named"), "{stderr}");
}

/// `run --follow-forks`: children are stopped at birth until probed, so
/// every process's leaks are exact, and blocks of a program replaced by
/// exec are dropped (its memory went with it).
#[test]
fn run_follows_forks_and_execs_exactly() {
    require_root();
    let (report, stdout, _) =
        trace_run(&[fixture("forks_c").to_str().unwrap()], &["--follow-forks"]);
    assert!(stdout.contains("DONE"));
    let processes = report["processes"].as_array().unwrap();
    let parent = report["pid"].as_u64().unwrap();
    let children: Vec<u64> = processes
        .iter()
        .filter(|p| p["parent"].as_u64() == Some(parent))
        .map(|p| p["pid"].as_u64().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(children.len(), 2, "{report:#}");
    let (first, second) = (children[0], children[1]);

    let parent_sites = sites_of(&report, parent, FORK_SITES);
    assert_eq!(
        parent_sites.get("leak_in_parent"),
        Some(&(400, 4)),
        "{report:#}"
    );
    assert_eq!(parent_sites.len(), 1, "{parent_sites:?}");
    let first_sites = sites_of(&report, first, FORK_SITES);
    assert_eq!(
        first_sites.get("leak_in_child"),
        Some(&(2000, 2)),
        "{report:#}"
    );
    assert_eq!(first_sites.len(), 1, "{first_sites:?}");
    let second_sites = sites_of(&report, second, FORK_SITES);
    assert_eq!(
        second_sites.get("leak_after_exec"),
        Some(&(1500, 3)),
        "{report:#}"
    );
    assert_eq!(second_sites.len(), 1, "dropped at exec: {second_sites:?}");

    // The second child is listed twice: its first program (replaced) and
    // the one it exec'ed.
    let second_entries = processes_with_pid(&report, second);
    let states: Vec<&str> = second_entries
        .iter()
        .map(|p| p["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["exec", "exited"], "{report:#}");
    assert!(second_entries[1]["command"]
        .as_str()
        .unwrap()
        .ends_with(" exec"));
    assert_eq!(second_entries[1]["exit_code"], 0);
    assert_eq!(report["totals"]["bytes"], 400 + 2000 + 1500, "{report:#}");
    // The churn in both children was seen, alloc and free alike.
    assert!(
        report["events"]["frees"].as_u64().unwrap() >= 2000,
        "{report:#}"
    );
}

/// Without --follow-forks a started command's children are not traced,
/// but an exec of the command itself is: the new program is probed.
#[test]
fn run_reprobes_a_command_that_execs() {
    require_root();
    let program = fixture("forks_c");
    let script = format!("exec {} exec", program.display());
    let (report, _, _) = trace_run(&["/bin/sh", "-c", &script], &[]);
    let pid = report["pid"].as_u64().unwrap();
    let sites = sites_of(&report, pid, FORK_SITES);
    assert_eq!(sites.get("leak_after_exec"), Some(&(1500, 3)), "{report:#}");
    let states: Vec<String> = processes_with_pid(&report, pid)
        .iter()
        .map(|p| p["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["exec", "exited"], "{report:#}");
    // The shell's own blocks went with it.
    assert_eq!(report["totals"]["bytes"], 1500, "{report:#}");
}

/// `report --pid --follow-forks` on a running process: children are found
/// through the sched tracepoints and attached to (the fixture's children
/// wait until the tracer says it traces them: attaching takes tens of
/// milliseconds, and longer under load); an exec is re-probed (the program
/// exec'ed waits for SIGUSR1 until the tracer says so).
#[test]
fn attach_follows_forks_and_execs() {
    require_root();
    let mut parent = Fixture::start(fixture("forks_c"), &["attach"]);
    let pid = parent.pid() as u64;
    let mut tracer = report_on(&["--follow-forks", "--pid", &pid.to_string()], 1);
    parent.tell("go\n");
    // Both children traced: let them allocate (one of them then execs).
    tracer.wait_for("tracing PID");
    tracer.wait_for("tracing PID");
    parent.tell("go\ngo\n");
    // "tracer: PID N exec'ed ...": the program exec'ed is traced, let it go.
    let said = tracer.wait_for("exec'ed");
    let execed: i32 = said
        .lines()
        .last()
        .and_then(|line| {
            line.split_once("PID ")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no PID in {said:?}"));
    unsafe { libc::kill(execed, libc::SIGUSR1) };
    parent.read_until("DONE");
    parent.finish();
    let done = tracer.finish();
    let (report, said) = (done.json(), done.stderr);
    let parent_sites = sites_of(&report, pid, FORK_SITES);
    assert_eq!(
        parent_sites.get("leak_in_parent"),
        Some(&(400, 4)),
        "{said}\n{report:#}"
    );
    let children: Vec<u64> = report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["parent"].as_u64() == Some(pid))
        .map(|p| p["pid"].as_u64().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(children.len(), 2, "{said}\n{report:#}");
    let all: BTreeMap<String, (u64, u64)> = children
        .iter()
        .flat_map(|&child| sites_of(&report, child, FORK_SITES))
        .collect();
    assert_eq!(
        all.get("leak_in_child"),
        Some(&(2000, 2)),
        "{said}\n{report:#}"
    );
    // The exec'ed program: its totals, exact. (Its frames are not asserted:
    // a running process's new program is read as soon as the exec is
    // heard of, and on a loaded machine that read has been seen to miss
    // its executable's mapping once in a few dozen runs.)
    let exec_entry = report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["command"].as_str().unwrap().ends_with(" exec wait"))
        .unwrap_or_else(|| panic!("{said}\n{report:#}"))
        .clone();
    assert_eq!(exec_entry["totals"]["bytes"], 1500, "{said}\n{report:#}");
    assert_eq!(exec_entry["totals"]["allocations"], 3, "{said}\n{report:#}");
    assert_eq!(
        all.get("leak_before_exec"),
        None,
        "dropped at exec: {all:?}"
    );
}
