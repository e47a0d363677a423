//! The end-to-end subset the matrix runs in each kernel: test binaries built
//! on the host (`cargo test --no-run`), run unchanged inside the guest, plus
//! `tracer doctor`. The guest script marks each part on its output so the
//! results can be read back per test.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::{cmd, output};

/// (test file, tests in it; empty = the whole file). A file that does not
/// exist in this checkout is left out.
pub const SUBSET: &[(&str, &[&str])] = &[
    // Run mode, exact; leaky_c allocates from several threads.
    (
        "run_mode",
        &["c_fixture_leaks_are_exact", "cpp_fixture_leaks_are_exact"],
    ),
    (
        "attach_mode",
        &["leaks_after_attach_are_exact_and_earlier_blocks_never_appear"],
    ),
    (
        "reliability",
        &["threads_are_traced_after_the_main_thread_exits"],
    ),
    (
        "mappings",
        &[
            "mappings_are_exact_per_site_and_large_blocks_count_once",
            "mapping_stacks_are_whole_without_frame_pointers",
            "mapping_stacks_are_whole_without_frame_pointers_in_attach_mode",
        ],
    ),
    (
        "sampling",
        &[
            "sampled_estimates_are_close_to_exact_counts",
            "sampling_uses_uprobe_sessions_where_the_kernel_has_them",
        ],
    ),
    (
        "cfi",
        &[
            "c_without_frame_pointers",
            "cpp_without_frame_pointers_through_libstdcxx_new",
        ],
    ),
    (
        "processes",
        &[
            "run_follows_forks_and_execs_exactly",
            "attach_follows_forks_and_execs",
        ],
    ),
    // mimalloc's malloc moves its size before its first emulated
    // instruction: on kernels without attach cookies the probe there finds
    // it by page offset (moved_enter_keyed), exact and not single-stepped.
    ("allocators", &["mimalloc_preloaded"]),
    // `tracer doctor`'s own end-to-end tests, once they exist.
    ("doctor", &[]),
    // Four threads allocating and freeing against the tracer's scans. Last:
    // it oopsed the 7.3 kernel in alloc_return (expected.rs), and whatever a
    // crash leaves behind must not take the other tests with it.
    (
        "reliability",
        &["reclaimed_slots_reused_at_once_by_other_stacks_stay_exact"],
    ),
];

/// The longest one test binary may take in a guest (the subset's longest
/// took 93 s): a test hung by a kernel bug ends, and the rest still run.
const BINARY_TIMEOUT_S: u32 = 300;

/// How much slower than the host the guest runs (software emulation); the
/// tests scale their few time bounds by it (TRACER_TEST_SLOWDOWN).
pub const TCG_SLOWDOWN: u32 = 30;

/// Builds the end-to-end test binaries; returns (file name, executable) for
/// the subset's files.
pub fn build_tests() -> Result<Vec<(String, String)>> {
    let json = output(cmd("cargo").args([
        "test",
        "--release",
        "-p",
        "tracer-tests",
        "--no-run",
        "--message-format=json",
    ]))
    .context("`cargo test --no-run -p tracer-tests` failed")?;
    let mut binaries = Vec::new();
    for line in json.lines() {
        let Some(executable) = field(line, "\"executable\":\"") else {
            continue;
        };
        let Some(file) = Path::new(&executable).file_name() else {
            continue;
        };
        let stem = file.to_string_lossy();
        let name = stem.rsplit_once('-').map_or(&*stem, |(n, _)| n).to_string();
        if SUBSET.iter().any(|(f, _)| *f == name) {
            binaries.push((name, executable));
        }
    }
    if binaries.is_empty() {
        bail!("no end-to-end test binaries of the subset were built");
    }
    Ok(binaries)
}

/// The string value after `key` in a JSON line (cargo's paths need no unescaping).
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(key)? + key.len();
    let end = line[start..].find('"')? + start;
    Some(line[start..end].to_string())
}

/// The shell script the guest runs (and the host, for the host kernel).
/// `repeat` runs the tests that many times (hunting a flaky count).
pub fn script(tracer: &Path, binaries: &[(String, String)], slowdown: u32, repeat: u32) -> String {
    let root = crate::root();
    let mut s = format!(
        "# written by cargo xtask test-kernels\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export HOME=/root TRACER_BIN={tracer} TRACER_TEST_SLOWDOWN={slowdown}\n\
         cd {root}\n\
         echo \"MATRIX-KERNEL $(uname -r) up $(cut -d' ' -f1 /proc/uptime) s\"\n\
         status=0\n",
        tracer = tracer.display(),
        root = root.display(),
    );
    s += &format!("for round in $(seq {repeat}); do\n");
    for (name, tests) in SUBSET {
        let Some((_, executable)) = binaries.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let filter = if tests.is_empty() {
            String::new()
        } else {
            format!(" --exact {}", tests.join(" "))
        };
        s += &format!(
            "echo MATRIX-FILE {name}\n\
             start=$(date +%s)\n\
             timeout -k 10 {BINARY_TIMEOUT_S} {executable} --test-threads=1 --show-output{filter} || status=1\n\
             echo \"MATRIX-TIME {name} $(($(date +%s) - start)) s\"\n"
        );
    }
    s += "done\n";
    // The subcommand may not exist yet in this checkout: then it is skipped.
    // Its JSON is read back between markers (doctor.rs); its screen is for the log.
    s += &format!(
        "echo MATRIX-FILE tracer\n\
         if {tracer} --help 2>&1 | grep -qw doctor; then\n\
         \x20   {tracer} doctor\n\
         \x20   echo {begin}\n\
         \x20   {tracer} doctor --format json 2>/tmp/doctor.err; code=$?\n\
         \x20   echo \"{end}$code\"\n\
         \x20   cat /tmp/doctor.err\n\
         \x20   [ $code = 0 ] || status=1\n\
         else\n\
         \x20   echo 'test doctor ... skipped (no doctor subcommand)'\n\
         fi\n\
         exit $status\n",
        tracer = tracer.display(),
        begin = super::doctor::BEGIN,
        end = super::doctor::END,
    );
    s
}

/// A test's outcome in one kernel.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Status {
    Ok,
    Failed,
    Skipped,
}

/// What a test prints (`tests/src/lib.rs`, `skip_without_path!`) when it
/// skips itself on a kernel that lacks what it tests.
const SKIP_LINE: &str = "SKIPPED on this kernel";

/// The per-test results in a guest's output, as `file::test`, in order:
/// libtest's `test NAME ... ok` lines (and the script's own for doctor)
/// after the script's `MATRIX-FILE name` line; a passed test whose output
/// (`--show-output`: `---- NAME stdout ----`) says it skipped itself is
/// skipped.
pub fn results(output: &str) -> Vec<(String, Status)> {
    let mut results: Vec<(String, Status)> = Vec::new();
    let mut file = "";
    let mut printing = String::new();
    for line in output.lines() {
        if let Some(name) = line.strip_prefix("MATRIX-FILE ") {
            file = name.trim();
            continue;
        }
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            printing = format!("{file}::{name}");
            continue;
        }
        if line.starts_with(SKIP_LINE) {
            if let Some((_, status)) = results.iter_mut().find(|(n, _)| *n == printing) {
                if *status == Status::Ok {
                    *status = Status::Skipped;
                }
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("test ") else {
            continue;
        };
        let Some((name, verdict)) = rest.split_once(" ... ") else {
            continue;
        };
        let status = match verdict.split_whitespace().next() {
            Some("ok") => Status::Ok,
            Some("ignored") | Some("skipped") => Status::Skipped,
            // FAILED, or no verdict: the binary was killed (timeout) mid-test.
            _ => Status::Failed,
        };
        let name = format!("{file}::{name}");
        // Run more than once (--repeat): one failure fails it.
        match results.iter_mut().find(|(n, _)| *n == name) {
            Some((_, seen)) if status == Status::Failed => *seen = status,
            Some(_) => {}
            None => results.push((name, status)),
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_per_file_and_one_failure_in_repeats_fails() {
        let output = "MATRIX-FILE run_mode\n\nrunning 2 tests\ntest a ... ok\ntest b ... FAILED\n\
                      test result: FAILED. 1 passed\nMATRIX-FILE run_mode\ntest a ... FAILED\ntest b ... ok\n\
                      MATRIX-FILE tracer\ntest doctor ... skipped (no doctor subcommand)\n\
                      MATRIX-FILE reliability\ntest storm ... MATRIX-TIME reliability 300 s\n\
                      MATRIX-FILE mappings\ntest m ... ok\nsuccesses:\n\n---- m stdout ----\n\
                      SKIPPED on this kernel: mmap tracking: off\n";
        let rows = results(output);
        assert_eq!(
            rows,
            vec![
                ("run_mode::a".to_string(), Status::Failed),
                ("run_mode::b".to_string(), Status::Failed),
                ("tracer::doctor".to_string(), Status::Skipped),
                ("reliability::storm".to_string(), Status::Failed),
                ("mappings::m".to_string(), Status::Skipped),
            ]
        );
    }
}
