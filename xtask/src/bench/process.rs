//! Running the benchmark's child processes: waiting for them, their output
//! and the tracer's detaching children.

use std::{
    fs,
    io::{BufRead, BufReader},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::procfs::our_children;

/// The tracer hands the detaching of its probes to a forked child that
/// outlives it (each uprobe detach waits for RCU grace periods in the
/// kernel, 0.1-0.3 s each). Made a subreaper, the bench inherits those
/// children, and `reap_detachers` waits for them after each run: otherwise
/// their detaching overlaps the next run and, on the same file, slows its
/// attaching by up to a second.
pub fn become_subreaper() {
    // Safety: a plain prctl on this process.
    let ok = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } == 0;
    if !ok {
        println!(
            "bench: warning: not a subreaper; runs may overlap the last one's probe detaching"
        );
    }
}

/// Waits (up to a minute) for this process's children named `tracer`: the
/// detaching children of tracers that have exited.
pub fn reap_detachers() {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let detachers: Vec<u32> = our_children()
            .into_iter()
            .filter(|pid| {
                fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "tracer")
            })
            .collect();
        if detachers.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in detachers {
            let mut status = 0;
            // Safety: reaps our own child, if it has exited.
            unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` (as `kill` spells it, e.g. "-INT") to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Waits for a child up to `limit`, then kills it.
pub fn wait_or_kill(child: &mut Child, limit: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Ok(child.wait()?);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Reads lines of a child's stdout until one satisfies `done`; returns all
/// lines read. Fails after `limit`.
pub fn read_until(
    reader: &mut BufReader<ChildStdout>,
    limit: Duration,
    mut done: impl FnMut(&str) -> bool,
) -> Result<Vec<String>> {
    // Blocking reads: the limit is enforced by the fixtures' own bounded
    // lifetimes; this only reports how long it took.
    let start = Instant::now();
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("output ended before the expected line; got {lines:?}");
        }
        let line = line.trim_end().to_string();
        let finished = done(&line);
        lines.push(line);
        if finished {
            return Ok(lines);
        }
        if start.elapsed() > limit {
            bail!("no expected line within {limit:?}; got {lines:?}");
        }
    }
}
