//! Bad input gets one clear line on stderr and a non-zero exit, never a panic.

use std::{os::unix::process::CommandExt, process::Command};

use tracer_tests::*;

fn fails_with(args: &[&str], message: &str) {
    let output = Command::new(tracer()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} should fail");
    assert!(
        stderr.contains(message),
        "{args:?}: expected {message:?} in {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr:?}");
}

#[test]
fn pid_that_does_not_exist() {
    fails_with(
        &["report", "--pid", "999999999"],
        "no process with PID 999999999",
    );
}

#[test]
fn pid_of_a_kernel_thread() {
    fails_with(&["report", "--pid", "2"], "kernel thread");
}

#[test]
fn pid_of_an_exited_process() {
    // A zombie: exited, not yet reaped.
    let child = Command::new("true").spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    fails_with(&["report", "--pid", &child.id().to_string()], "has exited");
}

#[test]
fn command_that_does_not_exist() {
    fails_with(&["run", "--", "no-such-command-xyz"], "command not found");
}

#[test]
fn static_binary_without_symbols() {
    require_root();
    // A tiny static, stripped program: no allocator symbols to probe.
    let dir = temp_path("static");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("s.c");
    std::fs::write(&src, "int main(void){return 0;}\n").unwrap();
    let exe = dir.join("s");
    let built = Command::new("gcc")
        .args(["-static", "-s", "-o"])
        .arg(&exe)
        .arg(&src)
        .status();
    if !built.map(|s| s.success()).unwrap_or(false) {
        eprintln!("no static libc to build with; skipping");
        return;
    }
    fails_with(&["run", "--", exe.to_str().unwrap()], "no allocator found");
}

#[test]
fn output_path_that_cannot_be_written() {
    require_root();
    fails_with(
        &["run", "--output", "/nonexistent-dir/x.json", "--", "true"],
        "cannot write /nonexistent-dir/x.json",
    );
}

#[test]
fn not_root() {
    require_root();
    let output = Command::new(tracer())
        .args(["report", "--pid", "1"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("needs root"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr:?}");
}

#[test]
fn bad_duration_is_a_usage_error() {
    let output = Command::new(tracer())
        .args(["report", "--pid", "1", "--duration", "soon"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a duration"));
}

/// The programs need no kernel BTF (no CO-RE relocations): with
/// /sys/kernel/btf/vmlinux hidden (an empty file bound over it in a private
/// mount namespace) tracing works and stays exact.
#[test]
fn works_without_kernel_btf() {
    let out = run_in_mount_namespace("mount --bind /dev/null /sys/kernel/btf/vmlinux", "leaky_c");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = expectations(&stdout);
    let report = json_after_fixture_output(&stdout);
    let sites: Vec<&str> = expected.keys().map(String::as_str).collect();
    assert_eq!(report_by_site(&report, &sites), expected);
}

fn run_in_mount_namespace(setup: &str, fixture_name: &str) -> std::process::Output {
    require_root();
    Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "{setup}; exec {} run --format json --top 0 -- {}",
            tracer().display(),
            fixture(fixture_name).display()
        ))
        .output()
        .unwrap()
}

fn json_after_fixture_output(stdout: &str) -> serde_json::Value {
    let start = stdout.find("{\n").expect("a JSON report");
    serde_json::from_str(&stdout[start..]).unwrap()
}

/// tracefs not mounted: the tracer mounts it (as root) and mappings are
/// traced as usual.
#[test]
fn tracefs_not_mounted_is_mounted() {
    let out = run_in_mount_namespace(
        "umount /sys/kernel/debug/tracing 2>/dev/null; umount /sys/kernel/tracing",
        "mapped_c",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json_after_fixture_output(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["mappings"]["traced"], true, "{report:#}");
    assert!(
        report["mappings"]["bytes"].as_u64().unwrap() > 0,
        "{report:#}"
    );
}

/// tracefs cannot be mounted (no /sys/kernel/tracing at all): one line says
/// so and what to do, and heap tracing goes on, exact.
#[test]
fn tracefs_unavailable_is_one_line_and_heap_tracing_goes_on() {
    let out = run_in_mount_namespace("mount -t tmpfs none /sys/kernel", "leaky_c");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("not tracing mmap (heap tracing goes on)"),
        "{stderr}"
    );
    assert!(stderr.contains("mount -t tracefs"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = expectations(&stdout);
    let report = json_after_fixture_output(&stdout);
    let sites: Vec<&str> = expected.keys().map(String::as_str).collect();
    assert_eq!(report_by_site(&report, &sites), expected);
    assert_eq!(report["mappings"]["traced"], false, "{report:#}");
}
