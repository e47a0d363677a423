//! CFI unwinding, the default mode: fixtures built without frame pointers
//! (-O2 -fomit-frame-pointer, Debian's libc and libstdc++, a Rust binary
//! without forced frame pointers) must have each leak reported under the
//! right function with the exact bytes, and their stacks must be whole, in
//! run mode, attach mode and across forks and execs.

use std::collections::BTreeMap;

use serde_json::Value;
use tracer_tests::*;

/// Every stack holding one of `sites` was unwound to the outermost frame.
fn assert_whole(report: &Value, sites: &[&str]) {
    for stack in report["stacks"].as_array().unwrap() {
        let functions = frame_functions(stack);
        if site_of(&functions, sites).is_some() {
            assert_eq!(stack["truncated"], false, "{stack:#}");
            assert!(
                functions.iter().any(|f| f == "main"),
                "stack reaches main: {functions:?}"
            );
        }
    }
}

/// In the default mode (no --unwind option).
fn check(name: &str, churn: &[&str]) -> Value {
    let (report, sites) = trace_exact(name, &[], &[], churn);
    let sites: Vec<&str> = sites.iter().map(String::as_str).collect();
    assert_whole(&report, &sites);
    // The report says how stacks were walked, how many were whole and
    // what the tables take.
    let unwinding = &report["unwinding"];
    assert_eq!(unwinding["mode"], "cfi", "{unwinding:#}");
    let whole = unwinding["whole_stacks"].as_f64().unwrap();
    assert!(whole > 0.95, "{unwinding:#}");
    assert!(unwinding["tables_bytes"].as_u64().unwrap() > 0);
    assert!(unwinding["objects"].as_u64().unwrap() >= 2, "{unwinding:#}");
    report
}

#[test]
fn c_without_frame_pointers() {
    let report = check("nofp_c", &["churn"]);
    // strdup's caller, not strdup, is the site (libc has no frame pointers).
    let stack = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            let f = frame_functions(s);
            f.iter().any(|f| f.contains("strdup"))
        })
        .expect("a strdup stack");
    let functions = frame_functions(stack);
    let at = functions.iter().position(|f| f.contains("strdup")).unwrap();
    assert_eq!(functions[at + 1], "leak_strdup", "{functions:?}");
    // Through the signal frame (__restore_rt) into the interrupted code.
    let stack = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| site_of(&frame_functions(s), &["leak_in_signal"]).is_some())
        .expect("the signal handler's stack");
    let functions = frame_functions(stack);
    assert!(
        functions.iter().any(|f| f == "interrupted"),
        "the interrupted function: {functions:?}"
    );
}

/// Attach mode: a running program built without frame pointers.
#[test]
fn attach_without_frame_pointers() {
    require_root();
    let (report, said) = report_attached_by_cfi(Fixture::start(fixture("attach_c_nofp"), &[]));
    let expected = expectations(&said);
    let found = report_by_site(&report, &["leak_after_attach", "churn_after_attach"]);
    assert_eq!(
        found.get("leak_after_attach"),
        expected.get("leak_after_attach"),
        "{report:#}"
    );
    assert_eq!(found.get("churn_after_attach"), None);
    assert_whole(&report, &["leak_after_attach"]);
}

const FORK_SITES: &[&str] = &[
    "leak_in_parent",
    "leak_in_child",
    "leak_before_exec",
    "leak_after_exec",
    "churn",
];

/// Site -> (bytes, blocks) of the stacks of process `pid` only.
fn sites_of(report: &Value, pid: u64) -> BTreeMap<String, (u64, u64)> {
    let stacks: Vec<Value> = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["pid"].as_u64() == Some(pid))
        .cloned()
        .collect();
    report_by_site(&serde_json::json!({ "stacks": stacks }), FORK_SITES)
}

/// `--follow-forks`: each process (a forked child, one that exec'ed) has
/// its own table from its first allocation on, sharing the objects' rows.
#[test]
fn forks_and_execs_without_frame_pointers() {
    require_root();
    let (report, stdout, _) = trace_run(
        &[fixture("forks_c_nofp").to_str().unwrap()],
        &["--follow-forks"],
    );
    assert!(stdout.contains("DONE"));
    let parent = report["pid"].as_u64().unwrap();
    let children: std::collections::BTreeSet<u64> = report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["parent"].as_u64() == Some(parent))
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    let children: Vec<u64> = children.into_iter().collect();
    assert_eq!(children.len(), 2, "{report:#}");
    let expect = [
        (parent, "leak_in_parent", (400, 4)),
        (children[0], "leak_in_child", (2000, 2)),
        (children[1], "leak_after_exec", (1500, 3)),
    ];
    for (pid, site, want) in expect {
        let sites = sites_of(&report, pid);
        assert_eq!(sites.get(site), Some(&want), "{site}: {report:#}");
        assert_eq!(sites.len(), 1, "{sites:?}");
    }
    // Whole stacks for the parent and the forked child (their tables are in
    // place before they run on). Not for the exec'ed program: the tables of
    // the libraries its loader maps after the exec are published on the mmap
    // event, asynchronously, and on a busy machine its first allocations can
    // come before them (README, "Limits"); its bytes are exact above either
    // way.
    assert_whole(&report, &["leak_in_parent", "leak_in_child"]);
}

#[test]
fn cpp_without_frame_pointers_through_libstdcxx_new() {
    let report = check("nofp_cpp", &["churn"]);
    let stack = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| site_of(&frame_functions(s), &["make_widget"]).is_some())
        .unwrap();
    let functions = frame_functions(stack);
    assert!(functions[0].starts_with("operator new"), "{functions:?}");
    assert!(
        stack["frames"][0]["module"]
            .as_str()
            .unwrap()
            .contains("libstdc++"),
        "the stock operator new: {stack:#}"
    );
    assert!(functions[1].starts_with("make_widget"), "{functions:?}");
    // What libstdc++'s constructor allocates before the entry point (its
    // exception pool) was walked with its table, through the loader.
    let constructor = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| frame_functions(s).iter().any(|f| f == "_dl_init"))
        .unwrap_or_else(|| panic!("a constructor's stack: {report:#}"));
    assert_eq!(constructor["truncated"], false, "{constructor:#}");
}

#[test]
fn rust_without_forced_frame_pointers() {
    check("leaky_rs_nofp", &["churn"]);
}

/// The same C fixture with frame pointers loses the sites: this is what the
/// CFI walker is for (and shows the fixture really has no frame pointers).
#[test]
fn frame_pointers_lose_these_sites() {
    require_root();
    let program = fixture("nofp_c");
    let (report, stdout, _) = trace_run(&[program.to_str().unwrap()], &["--unwind", "fp"]);
    let expected = expectations(&stdout);
    let sites: Vec<&str> = expected.keys().map(String::as_str).collect();
    let found = report_by_site(&report, &sites);
    assert_ne!(found.get("leak_strdup"), expected.get("leak_strdup"));
}

/// An object loaded with dlopen after the probes were attached gets its
/// unwind table (from the mmap tracepoint, or the housekeeping tick): its
/// leak is reported under the right function and the stack reaches main.
#[test]
fn a_library_loaded_later_with_dlopen() {
    require_root();
    let host = fixture("dlopen_c");
    let plugin = fixture("libplugin.so");
    let (report, stdout, _) = trace_run(&[host.to_str().unwrap(), plugin.to_str().unwrap()], &[]);
    assert!(stdout.contains("DONE"), "fixture did not finish: {stdout}");
    let expected = expectations(&stdout);
    let found = report_by_site(&report, &["plugin_alloc"]);
    assert_eq!(
        found.get("plugin_alloc"),
        expected.get("plugin_alloc"),
        "{report:#}"
    );
    let stack = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            frame_functions(s)
                .first()
                .is_some_and(|f| f == "plugin_alloc")
        })
        .expect("the plugin's stack");
    let functions = frame_functions(stack);
    assert_eq!(
        &functions[..3],
        ["plugin_alloc", "plugin_leak", "main"],
        "{stack:#}"
    );
    assert_eq!(stack["truncated"], false, "{stack:#}");
}

/// A real server from Debian's packages, built without frame pointers
/// (redis-server, with jemalloc and its `zmalloc` wrappers): in the default
/// mode its allocation stacks are named through its command path.
#[test]
fn a_debian_server_without_frame_pointers() {
    require_root();
    let (port, server, tracer) = traced_redis();
    // Its main allocation paths: strings, lists, hashes, sets.
    let mut commands = String::new();
    for i in 0..300 {
        commands.push_str(&format!(
            "SET key:{i} value-{i}-of-some-length\nLPUSH list:{} item-{i}\nHSET hash:{} field-{i} {i}\nSADD set:{} member-{i}\n",
            i % 7,
            i % 5,
            i % 3
        ));
    }
    let mut cli = std::process::Command::new("redis-cli")
        .args(["-p", &port])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-cli");
    use std::io::Write as _;
    cli.stdin
        .take()
        .unwrap()
        .write_all(commands.as_bytes())
        .unwrap();
    assert!(cli.wait().unwrap().success());
    tracer.signal(libc::SIGINT);
    let report = tracer.finish().json();
    drop(server);

    let stacks = report["stacks"].as_array().unwrap();
    assert!(stacks.len() >= 5, "{report:#}");
    for stack in stacks.iter().filter(|s| s["stack_id"] != "unknown") {
        let named = stack["frames"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["function"].is_string())
            .count();
        assert!(named >= 5, "five named frames: {stack:#}");
        assert_eq!(stack["truncated"], false, "{stack:#}");
    }
    // Through the command path, not just the wrapper.
    assert!(
        stacks
            .iter()
            .any(|s| frame_functions(s).iter().any(|f| f == "processCommand")),
        "{report:#}"
    );
    let whole = report["unwinding"]["whole_stacks"].as_f64().unwrap();
    assert!(whole > 0.95, "{:#}", report["unwinding"]);
}

/// Debian's redis-server on a free port, with `tracer report` (JSON, the
/// top ten stacks, -v) attached to it.
fn traced_redis() -> (String, Fixture, Tracer) {
    let port = free_port();
    let server = start_redis(&port);
    let mut tracer = TracerCmd::new("report")
        .pid(server.pid())
        .args(["--format", "json", "--top", "10", "-v"])
        .spawn();
    tracer.wait_for("attached to PID");
    (port, server, tracer)
}

/// redis-server as `cargo xtask bench` runs it, logging at the level that
/// says when it is ready.
fn start_redis(port: &str) -> Fixture {
    Fixture::spawn(
        std::process::Command::new("redis-server")
            .args(tracer_tests::redis::server_args(port))
            .args(["--loglevel", "notice"]),
        "Ready to accept connections",
    )
}

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string()
}

/// The target on that server, driven by redis-benchmark as `cargo
/// xtask bench` drives it: no two of the top ten rows in `top` read the
/// same unless their labelled functions were called from the same
/// function. The labels are past the wrappers; where two are the same
/// function (createEmbeddedStringObject from two callers), `top` adds the
/// caller (`live_view::tell_apart`), which must then be named.
#[test]
fn top_ten_labels_of_a_debian_server_differ_unless_their_callers_are_the_same() {
    require_root();
    let (port, server, tracer) = traced_redis();
    let out = std::process::Command::new("redis-benchmark")
        .args(tracer_tests::redis::benchmark_args(&port, 20_000))
        .output()
        .expect("redis-benchmark");
    assert!(out.status.success(), "{out:?}");
    tracer.signal(libc::SIGINT);
    let report = tracer.finish().json();
    drop(server);

    let stacks: Vec<&serde_json::Value> = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["stack_id"] != "unknown")
        .collect();
    assert!(stacks.len() >= 5, "{report:#}");
    // (label, the function that called it) of each row.
    let rows: Vec<(String, String)> = stacks
        .iter()
        .map(|s| {
            let functions = frame_functions(s);
            let at = s["label_frame"].as_u64().unwrap_or(0) as usize;
            let name = |i: usize| functions.get(i).cloned().unwrap_or_default();
            (name(at), name(at + 1))
        })
        .collect();
    for (i, (label, caller)) in rows.iter().enumerate() {
        assert!(!label.is_empty(), "an unnamed label: {:#}", stacks[i]);
        assert!(
            !label.starts_with("zmalloc") && !label.starts_with("zcalloc"),
            "labelled with the wrapper: {rows:?}"
        );
        // `top` shows "label ← caller" for rows whose labels are the same
        // and whose callers are not: that needs the callers named.
        for (other, other_caller) in &rows[i + 1..] {
            if label == other && caller != other_caller {
                assert!(
                    !caller.is_empty() && !other_caller.is_empty(),
                    "{label}: callers not named, rows look the same: {rows:?}"
                );
            }
        }
    }
}
