//! `tracer doctor` on this machine: what it says agrees with what the
//! kernel shows through its files, read here independently, and with what
//! a run of the tracer does.

use std::{os::unix::process::CommandExt, path::Path};

use serde_json::Value;
use tracer_tests::*;

fn doctor_json(configure: impl FnOnce(&mut std::process::Command)) -> (Option<i32>, Value) {
    let output = TracerCmd::new("doctor")
        .args(["--format", "json"])
        .configure(configure)
        .output();
    let json = serde_json::from_str(&output.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}{}", output.stdout, output.stderr));
    (output.status.code(), json)
}

fn available(doc: &Value, key: &str) -> Value {
    let capability = &doc["capabilities"][key];
    assert!(
        capability["detail"].is_string(),
        "{key} has a detail: {doc:#}"
    );
    capability["available"].clone()
}

#[test]
fn doctor_as_root_says_the_tracer_runs_and_agrees_with_the_kernels_files() {
    require_root();
    let (code, doc) = doctor_json(|_| {});
    assert_eq!(code, Some(0), "{doc:#}");
    assert_eq!(doc["can_run"], true);
    assert_eq!(doc["blockers"], Value::Array(vec![]));
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(doc["kernel"]["release"], release.trim());

    // Every capability is listed with yes, no or unknown and a detail.
    for key in [
        "privileges",
        "bpf_syscall",
        "mmapable_maps",
        "ring_buffer",
        "uprobes",
        "tracefs",
        "syscall_tracepoints",
        "sched_tracepoints",
        "btf",
        "bpf_loop",
        "batch_ops",
        "uprobe_multi",
        "uprobe_sessions",
        "attach_cookies",
        "uretprobe_syscall",
        "atomic_fetch",
        "task_pt_regs",
        "membarrier",
        "lockdown",
        "perf_event_paranoid",
    ] {
        let value = available(&doc, key);
        assert!(value.is_boolean() || value.is_null(), "{key}: {doc:#}");
    }
    assert_eq!(available(&doc, "privileges"), true);
    assert_eq!(available(&doc, "bpf_syscall"), true);
    // Facts read here, not by the tracer.
    assert_eq!(
        available(&doc, "btf"),
        Path::new("/sys/kernel/btf/vmlinux").exists()
    );
    assert_eq!(
        available(&doc, "uprobes"),
        Path::new("/sys/bus/event_source/devices/uprobe/type").exists()
            || Path::new("/sys/kernel/tracing/uprobe_events").exists()
    );
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        assert_eq!(available(&doc, "tracefs"), true);
        assert_eq!(
            available(&doc, "syscall_tracepoints"),
            Path::new("/sys/kernel/tracing/events/syscalls/sys_enter_mmap").exists()
        );
        assert_eq!(
            available(&doc, "sched_tracepoints"),
            Path::new("/sys/kernel/tracing/events/sched/sched_process_fork").exists()
        );
    }
    let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid").unwrap();
    let detail = doc["capabilities"]["perf_event_paranoid"]["detail"]
        .as_str()
        .unwrap();
    assert!(
        detail.contains(&format!("level {}", paranoid.trim())),
        "{detail}"
    );
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").ok();
    let confidential = lockdown.is_some_and(|l| l.contains("[confidentiality]"));
    assert_eq!(available(&doc, "lockdown"), !confidential);

    // The programs loaded, and the paths follow from the capabilities.
    assert_eq!(doc["programs"]["load_fp"]["ok"], true, "{doc:#}");
    assert_eq!(doc["programs"]["load_cfi"]["ok"], true, "{doc:#}");
    let paths = &doc["paths"];
    let batch = available(&doc, "batch_ops") != false;
    assert_eq!(
        paths["map_reads"],
        if batch { "batch" } else { "key_by_key" }
    );
    // One walk on every kernel: it needs no bpf_loop.
    assert_eq!(paths["cfi_walk"], "global_function");
    let cookies = available(&doc, "attach_cookies") == true;
    assert_eq!(
        paths["moved_probes"],
        if cookies {
            "attach_cookie"
        } else {
            "page_offset_map"
        }
    );
    let sessions = available(&doc, "uprobe_sessions") == true && cookies;
    assert_eq!(
        paths["sampled_allocation_probes"],
        if sessions {
            "uprobe_session"
        } else {
            "uprobe_uretprobe"
        }
    );
    assert_eq!(
        paths["stack_slot_reclamation"],
        available(&doc, "membarrier") == true
    );
    assert_eq!(
        paths["mmap_tracking"],
        available(&doc, "syscall_tracepoints") != false
    );
    assert_eq!(
        paths["mmap_callers"],
        available(&doc, "task_pt_regs") == true
    );
}

#[test]
fn doctor_text_is_one_screen_with_a_verdict() {
    require_root();
    let output = TracerCmd::new("doctor").output();
    assert_eq!(output.status.code(), Some(0), "{}", output.stderr);
    let text = output.stdout;
    assert!(text.lines().count() <= 50, "one screen: {text}");
    assert!(text.contains("The tracer can run here."), "{text}");
    assert!(text.contains("map reads: "), "{text}");
    assert!(text.contains("CFI walk: "), "{text}");
    assert!(output.stderr.is_empty(), "{}", output.stderr);
}

/// Without privileges: exit 1, and the one thing missing is said with its fix.
#[test]
fn doctor_without_privileges_says_what_is_missing() {
    require_root();
    let (code, doc) = doctor_json(|command| {
        command.uid(65534).gid(65534);
    });
    assert_eq!(code, Some(1), "{doc:#}");
    assert_eq!(doc["can_run"], false);
    assert_eq!(available(&doc, "privileges"), false);
    let blockers = doc["blockers"].as_array().unwrap();
    assert_eq!(blockers.len(), 1, "{doc:#}");
    assert!(
        blockers[0].as_str().unwrap().contains("needs root"),
        "{doc:#}"
    );
    assert_eq!(doc["programs"]["load_fp"]["ok"], Value::Null, "not tried");
}

/// `-v` says which path was taken for each feature, as doctor does.
#[test]
fn verbose_run_names_the_paths_taken() {
    let (_, doc) = doctor_json(|_| {});
    let output = TracerCmd::new("run")
        .arg("-v")
        .args(["--format", "json"])
        .command(fixture("leaky_c"))
        .output();
    assert!(output.status.success(), "{}", output.stderr);
    for line in doc["paths"]["described"].as_array().unwrap() {
        let line = format!("tracer: {}", line.as_str().unwrap());
        assert!(output.stderr.contains(&line), "{line} in {}", output.stderr);
    }
}

/// Runs leaky_c under `tracer run -v` as on a kernel without `without`
/// (TRACER_TEST_WITHOUT, testing only); checks the report is exact and
/// nothing dropped; returns stderr.
fn exact_without(without: &str, extra: &[&str]) -> String {
    require_root();
    let program = fixture("leaky_c");
    let mut args = vec!["-v"];
    args.extend_from_slice(extra);
    let (report, stdout, finished) = trace_run_with_env(
        &[program.to_str().unwrap()],
        &args,
        &[("TRACER_TEST_WITHOUT", without)],
    );
    let expected = expectations(&stdout);
    assert!(!expected.is_empty(), "{stdout}");
    let mut sites: Vec<&str> = expected.keys().map(String::as_str).collect();
    sites.extend(["churn", "cross_alloc", "cross_free"]);
    let found = report_by_site(&report, &sites);
    for (site, want) in &expected {
        assert_eq!(found.get(site), Some(want), "{site}; {report:#}");
    }
    for churn in ["churn", "cross_alloc", "cross_free"] {
        assert!(!found.contains_key(churn), "{churn}: {report:#}");
    }
    for (key, value) in report["dropped"].as_object().unwrap() {
        assert_eq!(value.as_u64(), Some(0), "dropped.{key}");
    }
    finished.stderr
}

/// Without batch map operations (before 5.6, or hidden here) every map is
/// read key by key, `-v` says so, and the report is as exact.
#[test]
fn without_batch_operations_maps_are_read_key_by_key_and_exact() {
    let stderr = exact_without("batch_ops", &[]);
    assert!(
        stderr.contains("tracer: map reads: key by key (no batch map operations)"),
        "{stderr}"
    );
}

/// Without uprobe sessions (before 6.13, or hidden here) `--sample-rate`
/// probes with a uprobe and a uretprobe per function; the kernel is not
/// asked to load a session program; -v says why.
#[test]
fn without_uprobe_sessions_sampling_uses_uretprobes() {
    require_root();
    let output = TracerCmd::new("run")
        .args(["-v", "-o", "/dev/null", "--sample-rate", "64k"])
        .env("TRACER_TEST_WITHOUT", "uprobe_sessions")
        .command(fixture("sampled_c"))
        .output();
    assert!(output.status.success(), "{}", output.stderr);
    let stderr = output.stderr;
    assert!(
        stderr.contains(
            "tracer: allocation returns: uretprobe (uprobe sessions unavailable: the kernel has no uprobe sessions"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("uretprobe alloc_return"), "{stderr}");
    assert!(!stderr.contains("uprobe session alloc_session"), "{stderr}");
}

/// Without attach cookies (before 5.15, or hidden here) a probe past a
/// moved argument gets `moved_enter_keyed`, which finds where the argument
/// went by the probe's page offset (glibc's `reallocarray` multiplies
/// first); `moved_enter` is neither loaded nor attached, `-v` says so, and
/// the report is as exact. (mimalloc's moves: allocators.rs.)
#[test]
fn without_attach_cookies_moved_probes_find_their_arguments_by_page_offset_and_exact() {
    let stderr = exact_without("attach_cookies", &[]);
    assert!(
        stderr.contains(
            "tracer: probe placement: past moved arguments where their page offsets differ (no attach cookies"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("moved_enter_keyed"), "{stderr}");
    assert!(!stderr.contains("moved_enter "), "{stderr}");
}

/// Without membarrier grace periods stack slots are never recycled (`-v`
/// says so); counting is unchanged.
#[test]
fn without_membarrier_slots_are_not_reclaimed_and_counts_stay_exact() {
    let stderr = exact_without("membarrier", &[]);
    assert!(
        stderr.contains("tracer: stack slot reclamation: off"),
        "{stderr}"
    );
}

/// Without bpf_task_pt_regs (before 5.15, or hidden here) the mmap
/// programs load with the call turned off: mmap is traced, its stacks by
/// the kernel's frame-pointer walk alone, `-v` says so, and the heap is as
/// exact (tests/tests/mappings.rs checks the mappings).
#[test]
fn without_task_pt_regs_mmap_is_traced_without_its_caller_and_the_heap_stays_exact() {
    let stderr = exact_without("task_pt_regs", &[]);
    assert!(
        stderr.contains("tracer: mmap tracking: syscall tracepoints; stacks by the kernel's frame-pointer walk alone")
            && stderr.contains("(no bpf_task_pt_regs helper, Linux 5.15+)"),
        "{stderr}"
    );
    assert!(!stderr.contains("not tracing mmap"), "{stderr}");
    let (code, doc) = doctor_json(|command| {
        command.env("TRACER_TEST_WITHOUT", "task_pt_regs");
    });
    assert_eq!(code, Some(0), "{doc:#}");
    assert_eq!(doc["paths"]["mmap_callers"], false, "{doc:#}");
}

/// Doctor reports a hidden feature as missing and the path that follows.
#[test]
fn doctor_follows_what_the_kernel_lacks() {
    require_root();
    let (code, doc) = doctor_json(|command| {
        command.env("TRACER_TEST_WITHOUT", "batch_ops,bpf_loop");
    });
    assert_eq!(code, Some(0), "{doc:#}");
    assert_eq!(available(&doc, "batch_ops"), false);
    assert_eq!(doc["paths"]["map_reads"], "key_by_key");
    assert_eq!(doc["paths"]["cfi_walk"], "global_function");
    assert_eq!(
        doc["programs"]["load_cfi"]["ok"], true,
        "no bpf_loop needed: {doc:#}"
    );
}

/// What the tracer cannot do without stops it before anything is attached:
/// one line saying what is missing and what would fix it, exit 1, and the
/// command is not started.
#[test]
fn a_kernel_without_uprobes_or_bpf_is_one_line_and_exit_1() {
    require_root();
    for (without, says) in [
        ("uprobes", "the kernel has no uprobes"),
        ("bpf_syscall", "the kernel refuses eBPF"),
        ("ring_buffer", "the kernel has no BPF ring buffer"),
    ] {
        let marker = temp_path(&format!("started-{without}"));
        let output = TracerCmd::new("run")
            .env("TRACER_TEST_WITHOUT", without)
            .command("touch")
            .arg(&marker)
            .output();
        assert_eq!(
            output.status.code(),
            Some(1),
            "{without}: {}",
            output.stderr
        );
        assert!(output.stderr.contains(says), "{without}: {}", output.stderr);
        assert_eq!(output.stderr.trim().lines().count(), 1, "{}", output.stderr);
        assert!(!marker.exists(), "{without}: the command ran");
        let (code, doc) = doctor_json(|command| {
            command.env("TRACER_TEST_WITHOUT", without);
        });
        assert_eq!(code, Some(1), "{doc:#}");
        assert_eq!(doc["can_run"], false);
    }
}
