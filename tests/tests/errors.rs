//! Bad input gets one clear line on stderr and a non-zero exit, never a panic.

use std::{os::unix::process::CommandExt, process::Command};

use tracer_tests::*;

fn fails_with(tracer: TracerCmd, message: &str) {
    command_fails_with(tracer.into_command(), message);
}

/// `command` (which runs the tracer somehow) exits 1 with one line on
/// stderr that contains `message`.
fn command_fails_with(mut command: Command, message: &str) {
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{command:?}: {stderr}");
    assert!(
        stderr.contains(message),
        "{command:?}: expected {message:?} in {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr:?}");
}

#[test]
fn pid_that_does_not_exist() {
    fails_with(
        TracerCmd::new("report").pid(999999999),
        "no process with PID 999999999",
    );
}

#[test]
fn pid_of_a_kernel_thread() {
    fails_with(TracerCmd::new("report").pid(2), "kernel thread");
}

#[test]
fn pid_of_an_exited_process() {
    // A zombie: exited, not yet reaped (waitid with WNOWAIT waits for the
    // exit and leaves the child to be reaped).
    let mut child = Command::new("true").spawn().unwrap();
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let waited = unsafe {
        libc::waitid(
            libc::P_PID,
            child.id(),
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        )
    };
    assert_eq!(waited, 0, "waitid: {}", std::io::Error::last_os_error());
    fails_with(TracerCmd::new("report").pid(child.id()), "has exited");
    child.wait().unwrap();
}

/// A process of another user (nobody), killed and reaped when dropped.
struct OtherUsersProcess(std::process::Child);

impl OtherUsersProcess {
    fn start() -> Self {
        require_root();
        let child = Command::new("sleep")
            .arg("60")
            .uid(65534)
            .gid(65534)
            .spawn()
            .unwrap();
        OtherUsersProcess(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for OtherUsersProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sh -c SCRIPT` in a private mount namespace, where SCRIPT ends by
/// running the tracer as root without CAP_SYS_PTRACE (and, with
/// `other_group`, not in group 0, which `hidepid` exempts by default).
fn without_ptrace(setup: &str, other_group: bool, tracer: TracerCmd) -> Command {
    let mut command = Command::new("unshare");
    command.args(["-m", "sh", "-c"]).arg(format!(
        "{setup} exec setpriv {} --bounding-set=-sys_ptrace {}",
        if other_group {
            "--regid 4242 --clear-groups"
        } else {
            ""
        },
        tracer.shell_line()
    ));
    command
}

/// Unreadable /proc files: root without CAP_SYS_PTRACE may not read
/// another user's /proc/PID/root (nor exe, mem...; maps may be). One
/// line names the file, the reason and what is missing.
#[test]
fn another_users_process_without_cap_sys_ptrace() {
    let target = OtherUsersProcess::start();
    let pid = target.pid();
    command_fails_with(
        without_ptrace("", false, TracerCmd::new("report").pid(pid)),
        &format!(
            "cannot read /proc/{pid}/root: permission denied (another user's process needs CAP_SYS_PTRACE"
        ),
    );
    // The probes are never attached: the same for the other front ends.
    command_fails_with(
        without_ptrace(
            "",
            false,
            TracerCmd::new("serve")
                .pid(pid)
                .args(["--listen", "127.0.0.1:0"]),
        ),
        &format!("cannot read /proc/{pid}/root: permission denied"),
    );
}

/// /proc mounted with hidepid=noaccess: another user's /proc/PID is listed
/// but nothing in it can be read, from its first file on.
#[test]
fn proc_mounted_hidepid_noaccess() {
    let target = OtherUsersProcess::start();
    let pid = target.pid();
    command_fails_with(
        without_ptrace(
            "mount -t proc -o hidepid=noaccess proc /proc &&",
            true,
            TracerCmd::new("report").pid(pid),
        ),
        &format!("cannot read /proc/{pid}/comm: permission denied (another user's process needs CAP_SYS_PTRACE"),
    );
}

/// /proc mounted with hidepid=invisible: another user's process is not
/// there at all; the message says it may be hidden, and why.
#[test]
fn proc_mounted_hidepid_invisible() {
    let target = OtherUsersProcess::start();
    let pid = target.pid();
    command_fails_with(
        without_ptrace(
            "mount -t proc -o hidepid=invisible proc /proc &&",
            true,
            TracerCmd::new("report").pid(pid),
        ),
        &format!(
            "no process with PID {pid} (or it is hidden: /proc is mounted with hidepid=invisible, and another user's process needs CAP_SYS_PTRACE"
        ),
    );
}

#[test]
fn command_that_does_not_exist() {
    fails_with(
        TracerCmd::new("run").command("no-such-command-xyz"),
        "command not found",
    );
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
    fails_with(TracerCmd::new("run").command(&exe), "no allocator found");
}

#[test]
fn output_path_that_cannot_be_written() {
    require_root();
    fails_with(
        TracerCmd::new("run")
            .output_file("/nonexistent-dir/x.json")
            .command("true"),
        "cannot write /nonexistent-dir/x.json",
    );
}

#[test]
fn not_root() {
    require_root();
    let output = TracerCmd::new("report")
        .pid(1)
        .configure(|command| {
            command.uid(65534).gid(65534);
        })
        .output();
    let stderr = output.stderr;
    assert!(!output.status.success());
    assert!(stderr.contains("needs root"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr:?}");
}

#[test]
fn bad_duration_is_a_usage_error() {
    let output = TracerCmd::new("report")
        .pid(1)
        .args(["--duration", "soon"])
        .output();
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stderr.contains("not a duration"));
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
            "{setup}; exec {}",
            TracerCmd::new("run")
                .args(["--format", "json", "--top", "0"])
                .command(fixture(fixture_name))
                .shell_line()
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
