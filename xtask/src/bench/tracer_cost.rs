//! Part 3: the tracer's own cost, on bench/fixtures/many_live.c: CPU and
//! memory with many live blocks at a 1 s refresh; the time to symbolize
//! 10,000 stacks; the time from start to attached.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, ChildStdout, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    command_line::shown,
    fixtures::Fixtures,
    options::Sizes,
    process::{read_until, reap_detachers, wait_or_kill},
    procfs::{bpf_map_kib, child_of, clock_ticks, cpu_ticks, status_kib},
    stats::median,
};
use crate::cmd;

pub struct TracerCost {
    pub resources: Resources,
    pub symbolization: Symbolization,
    pub attach: Attach,
}

/// (a) CPU and memory with `blocks` live blocks at a 1 s refresh.
pub struct Resources {
    pub blocks: u64,
    /// Seconds measured, starting `settle_s` after the blocks are in place.
    pub window_s: u64,
    pub settle_s: u64,
    /// The tracer's CPU time over the window, in % of one core.
    pub cpu_pct: f64,
    /// The tracer's largest RSS seen in the window.
    pub rss_max_kib: u64,
    /// The tracer's RSS high-water mark over its whole run.
    pub hwm_kib: u64,
    /// Kernel memory of the tracer's BPF maps.
    pub maps_kib: u64,
    /// The traced program's RSS, for scale.
    pub target_rss_kib: u64,
    /// One refresh's snapshot (median), and the final report's.
    pub refresh_ms: f64,
    pub final_ms: f64,
    /// From starting the tracer to every block allocated.
    pub fill_s: f64,
    pub command: String,
}

/// (b) Symbolizing every stack of a final report.
pub struct Symbolization {
    pub report_ms: f64,
    pub stacks: u64,
    pub command: String,
}

/// (c) From spawning `tracer report --pid` to its "attached" line.
pub struct Attach {
    /// The median of `runs`.
    pub median_ms: f64,
    pub runs: usize,
    /// The tracer's own "attach ..." timing line of the median run.
    pub median_breakdown: String,
    pub command: String,
}

pub fn measure(
    tracer: &Path,
    fixtures: &Fixtures,
    sizes: &Sizes,
    dir: &Path,
) -> Result<TracerCost> {
    Ok(TracerCost {
        resources: measure_resources(tracer, fixtures, sizes, dir)?,
        symbolization: measure_symbolization(tracer, fixtures)?,
        attach: measure_attach(tracer, fixtures, sizes.reps)?,
    })
}

fn measure_resources(
    tracer: &Path,
    fixtures: &Fixtures,
    sizes: &Sizes,
    dir: &Path,
) -> Result<Resources> {
    let blocks = sizes.live_blocks;
    let window = sizes.live_window_s;
    let settle = 3;
    let lifetime = settle + window + 3;
    println!("bench: tracer cost with {blocks} live blocks over 10,000 stacks");
    let stderr_path = dir.join("many_live.stderr");
    let args: Vec<String> = vec![
        "run".into(),
        "--interval".into(),
        "1s".into(),
        "--timings".into(),
        "-o".into(),
        dir.join("many_live.report").display().to_string(),
        "--".into(),
        fixtures.many_live.display().to_string(),
        blocks.to_string(),
        lifetime.to_string(),
    ];
    let started = Instant::now();
    let mut child = cmd(tracer)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&stderr_path)?)
        .spawn()?;
    let tracer_pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    read_until(&mut stdout, Duration::from_secs(600), |l| {
        l.starts_with("ready")
    })?;
    let fill_s = started.elapsed().as_secs_f64();
    let target_pid = child_of(tracer_pid);
    thread::sleep(Duration::from_secs(settle));
    let (cpu_pct, rss_max_kib) = watch_usage(tracer_pid, Duration::from_secs(window))?;
    let hwm_kib = status_kib(tracer_pid, "VmHWM").unwrap_or(0);
    let maps_kib = bpf_map_kib(tracer_pid);
    let target_rss_kib = target_pid.and_then(|p| status_kib(p, "VmRSS")).unwrap_or(0);
    finish_tracer(&mut child, stdout)?;
    let (refresh_ms, final_ms) =
        snapshot_times(&fs::read_to_string(&stderr_path).unwrap_or_default());
    Ok(Resources {
        blocks,
        window_s: window,
        settle_s: settle,
        cpu_pct,
        rss_max_kib,
        hwm_kib,
        maps_kib,
        target_rss_kib,
        refresh_ms,
        final_ms,
        fill_s,
        command: shown(tracer, &args),
    })
}

/// Watches a process for `window`: its CPU use in % of one core, and the
/// largest RSS seen (KiB).
fn watch_usage(pid: u32, window: Duration) -> Result<(f64, u64)> {
    let ticks0 = cpu_ticks(pid).context("reading the tracer's CPU time")?;
    let t0 = Instant::now();
    let mut rss_max = 0;
    while t0.elapsed() < window {
        rss_max = rss_max.max(status_kib(pid, "VmRSS").unwrap_or(0));
        thread::sleep(Duration::from_millis(250));
    }
    let ticks1 = cpu_ticks(pid).context("reading the tracer's CPU time")?;
    let cpu_pct = (ticks1 - ticks0) as f64 / clock_ticks() / t0.elapsed().as_secs_f64() * 100.0;
    Ok((cpu_pct, rss_max))
}

/// Lets the traced program run out, then waits for the tracer and its
/// detaching.
fn finish_tracer(child: &mut Child, mut stdout: BufReader<ChildStdout>) -> Result<()> {
    let mut rest = String::new();
    stdout.read_to_string(&mut rest)?;
    wait_or_kill(child, Duration::from_secs(120))?;
    reap_detachers();
    Ok(())
}

/// (median refresh snapshot, final snapshot) in ms, from `--timings` output.
fn snapshot_times(stderr: &str) -> (f64, f64) {
    let mut snapshot_ms = timing_values(stderr, "snapshot ");
    // The last report is the final one, which reads every block.
    let final_ms = snapshot_ms.pop().unwrap_or(f64::NAN);
    (median(&snapshot_ms), final_ms)
}

fn measure_symbolization(tracer: &Path, fixtures: &Fixtures) -> Result<Symbolization> {
    println!("bench: symbolizing 10,000 stacks");
    let args: Vec<String> = vec![
        "run".into(),
        "--format".into(),
        "json".into(),
        "--top".into(),
        "0".into(),
        "--timings".into(),
        "-o".into(),
        "/dev/null".into(),
        "--".into(),
        fixtures.many_live.display().to_string(),
        "10000".into(),
        "0".into(),
    ];
    let out = cmd(tracer).args(&args).stdout(Stdio::null()).output()?;
    reap_detachers();
    let stderr = String::from_utf8_lossy(&out.stderr);
    Ok(Symbolization {
        report_ms: timing_values(&stderr, "report ").pop().unwrap_or(f64::NAN),
        stacks: symbolized_stacks(&stderr),
        command: shown(tracer, &args),
    })
}

/// The number of stacks the last `--timings` line with one reports.
fn symbolized_stacks(stderr: &str) -> u64 {
    stderr
        .lines()
        .filter_map(|l| l.split("ms (").nth(2))
        .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .next_back()
        .unwrap_or(0)
}

/// "tracer: timing: snapshot X ms" values from a stderr capture.
fn timing_values(text: &str, key: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| l.split(key).nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Attaches `reps` times to one idle process.
fn measure_attach(tracer: &Path, fixtures: &Fixtures, reps: usize) -> Result<Attach> {
    println!("bench: time to attach");
    let mut idle = cmd(&fixtures.many_live)
        .args(["0", "600"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut idle_out = BufReader::new(idle.stdout.take().unwrap());
    read_until(&mut idle_out, Duration::from_secs(10), |l| {
        l.starts_with("ready")
    })?;
    let pid = idle.id();
    let args: Vec<String> = vec![
        "report".into(),
        "--pid".into(),
        pid.to_string(),
        "-v".into(),
        "--timings".into(),
        "--duration".into(),
        "0.2s".into(),
        "-o".into(),
        "/dev/null".into(),
    ];
    let mut runs: Vec<(f64, String)> = Vec::new();
    for _ in 0..reps {
        runs.push(time_attach(tracer, &args)?);
    }
    let _ = idle.kill();
    let _ = idle.wait();
    let wall: Vec<f64> = runs.iter().map(|(ms, _)| *ms).collect();
    // The breakdown of the run whose time is the median.
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(Attach {
        median_ms: median(&wall),
        runs: reps,
        median_breakdown: runs
            .get(runs.len() / 2)
            .map(|(_, p)| p.as_str())
            .unwrap_or("?")
            .to_string(),
        command: shown(tracer, &args).replace(&pid.to_string(), "$PID"),
    })
}

/// Runs `tracer report --pid` once: ms from spawning it to its "attached"
/// line, and its own "attach ..." timing line.
fn time_attach(tracer: &Path, args: &[String]) -> Result<(f64, String)> {
    let start = Instant::now();
    let mut t = cmd(tracer)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut err = BufReader::new(t.stderr.take().unwrap());
    let mut line = String::new();
    let mut phase = String::new();
    let ms = loop {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            bail!("tracer report ended without attaching");
        }
        if line.contains("timing: attach") {
            phase = line
                .trim()
                .trim_start_matches("tracer: timing: ")
                .to_string();
        }
        if line.contains("attached to PID") {
            break start.elapsed().as_secs_f64() * 1e3;
        }
    };
    let mut rest = String::new();
    err.read_to_string(&mut rest)?;
    wait_or_kill(&mut t, Duration::from_secs(30))?;
    reap_detachers();
    Ok((ms, phase))
}
