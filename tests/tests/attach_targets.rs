//! `tracer report --pid` on targets whose allocator or files are not where
//! a naive look would find them: a library linked before libc (the loader's
//! order, not the address order of /proc/PID/maps, decides), and a process
//! in its own mount namespace and root directory, whose files exist only
//! there.

use std::process::Command;

use serde_json::Value;
use tracer_tests::*;

/// Starts `command` (which ends by exec'ing the attach fixture, keeping its
/// PID), attaches for 2 s once it is READY, lets it leak, and returns the
/// report taken while it still runs and what it announced.
fn attach_to(command: &mut Command) -> (Value, String) {
    require_root();
    let mut target = Fixture::spawn(command, "READY");
    let mut tracer = TracerCmd::new("report")
        .pid(target.pid())
        .args(["--format", "json", "--top", "0", "--duration", "2s", "-v"])
        .spawn();
    tracer.wait_for("attached to PID");
    let announced = target.go();
    let report = tracer.finish().json();
    assert!(target.finish().success());
    (report, announced)
}

/// The leak after attach is exact and nothing from before attach shows.
/// (The churn is attach_mode.rs's business; these tests are about where
/// the probes go.)
fn assert_exact(report: &Value, announced: &str) {
    let expected = expectations(announced);
    assert_eq!(expected["leak_after_attach"], (3840, 30));
    let found = report_by_site(report, &["leak_after_attach", "leak_before_attach"]);
    assert_eq!(
        found.get("leak_after_attach"),
        Some(&(3840, 30)),
        "{report:#}"
    );
    assert_eq!(found.get("leak_before_attach"), None);
}

#[test]
fn a_linked_allocator_is_found_in_load_order() {
    // attach_c_jemalloc needs libjemalloc.so.2 and libc.so.6; the loader
    // binds malloc to jemalloc, which /proc/PID/maps lists after libc.
    let (report, announced) = attach_to(&mut Command::new(fixture("attach_c_jemalloc")));
    assert_exact(&report, &announced);
    let object = report["allocator"]["object"].as_str().unwrap();
    assert!(object.ends_with("libjemalloc.so.2"), "{object}");
}

/// Copies `program` and the libraries it loads into `root` at the same
/// paths, as a container image would have them.
fn container_script(program: &std::path::Path) -> String {
    let ldd = Command::new("ldd").arg(program).output().unwrap();
    let mut files: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(str::to_string)
        .collect();
    files.sort();
    files.dedup();
    assert!(files.iter().any(|f| f.contains("libc.so")), "{files:?}");
    let mut script = String::from(
        "set -e\n\
         mount -t tmpfs tracer-test /mnt\n\
         R=/mnt/tracer-root\n\
         mkdir -p $R\n",
    );
    for file in &files {
        script.push_str(&format!(
            "mkdir -p $R$(dirname {file}) && cp -L {file} $R{file}\n"
        ));
    }
    script.push_str(&format!(
        "cp {} $R/app\nexec chroot $R /app\n",
        program.display()
    ));
    script
}

#[test]
fn a_process_in_its_own_mount_namespace_is_probed_in_its_own_files() {
    // Private mounts, a tmpfs on /mnt that only the target sees, and a root
    // directory there with copies of the fixture and its libraries: its
    // libc is another file than the host's (probing the host's would see
    // nothing), and /app exists nowhere on the host.
    assert!(!std::path::Path::new("/mnt/tracer-root").exists());
    let script = container_script(&fixture("attach_c"));
    let (report, announced) = attach_to(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(script),
    );
    assert_exact(&report, &announced);
    // Paths are the container's own.
    let object = report["allocator"]["object"].as_str().unwrap();
    assert!(object.ends_with("/libc.so.6"), "{object}");
    let stack = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frames"][0]["function"] == "leak_after_attach")
        .expect("leak_after_attach symbolized from the container's /app");
    let frame = &stack["frames"][0];
    // The kernel names files from the namespace's root: the chroot is a
    // directory of it.
    assert!(
        frame["module"].as_str().unwrap().ends_with("/app"),
        "{frame}"
    );
    assert!(
        frame["file"].as_str().unwrap().ends_with("attach.c"),
        "{frame}"
    );
    assert!(frame["line"].as_u64().unwrap() > 0);
}
