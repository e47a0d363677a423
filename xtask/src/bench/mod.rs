//! `cargo xtask bench`: measures what tracing costs and writes BENCHMARKS.md.
//!
//! 1. A malloc/free loop (bench/fixtures/malloc_loop.c), timed inside the
//!    program: untraced; under the tracer; under the tracer with no-op
//!    programs at the very same addresses (the floor any uprobe tool pays);
//!    under the tracer without stack capture; under a bpftrace script that
//!    keeps a per-address map and per-stack sums (the peer).
//! 2. A small HTTP server (bench/fixtures/http_server.c) driven by wrk on
//!    loopback: requests/s untraced and traced.
//! 3. The tracer's own cost with 1,000,000 live blocks over 10,000 stacks
//!    (bench/fixtures/many_live.c) at a 1 s refresh: CPU and memory; the
//!    time from start to attached; the time to symbolize 10,000 stacks.
//!
//! Every comparison runs its variants interleaved (A B C, A B C, ...) and
//! reports medians, so that a burst of load from elsewhere hits all of them
//! alike. The machine's load average is recorded before and after.
//!
//! Options: --quick (fewer and shorter runs, for trying the harness),
//! --reps N, --output PATH (default BENCHMARKS.md in the workspace root),
//! --only loop,http,tracer (a subset).

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{build, cmd, output, root, setup, target_dir};

/// Debian packages only the benchmark needs (not CI).
const BENCH_PACKAGES: &[&str] = &["gcc", "bpftrace", "wrk"];

/// The loop's size: each process runs one warm-up and ROUNDS timed rounds
/// of `iterations` malloc/free pairs.
struct Sizes {
    reps: usize,
    loop_iterations: u64,
    loop_rounds: u64,
    http_seconds: u64,
    live_blocks: u64,
    live_window_s: u64,
}

impl Sizes {
    fn full() -> Self {
        Sizes {
            reps: 5,
            loop_iterations: 100_000,
            loop_rounds: 3,
            http_seconds: 5,
            live_blocks: 1_000_000,
            live_window_s: 10,
        }
    }

    fn quick() -> Self {
        Sizes {
            reps: 2,
            loop_iterations: 20_000,
            loop_rounds: 2,
            http_seconds: 2,
            live_blocks: 200_000,
            live_window_s: 4,
        }
    }
}

struct Options {
    sizes: Sizes,
    output: PathBuf,
    only: Vec<String>,
    quick: bool,
}

fn parse_options(args: &[OsString]) -> Result<Options> {
    let mut quick = false;
    let mut reps = None;
    let mut output = root().join("BENCHMARKS.md");
    let mut only = Vec::new();
    let mut args = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--reps" => {
                reps = Some(
                    args.next()
                        .context("--reps needs a number")?
                        .parse::<usize>()
                        .context("--reps needs a number")?,
                )
            }
            "--output" | "-o" => {
                output = PathBuf::from(args.next().context("--output needs a path")?)
            }
            "--only" => {
                only = args
                    .next()
                    .context("--only needs a list: loop,http,tracer")?
                    .split(',')
                    .map(str::to_string)
                    .collect()
            }
            other => bail!(
                "unknown bench option '{other}' (options: --quick, --reps N, --output PATH, --only loop,http,tracer)"
            ),
        }
    }
    let mut sizes = if quick { Sizes::quick() } else { Sizes::full() };
    if let Some(reps) = reps {
        sizes.reps = reps.max(1);
    }
    Ok(Options {
        sizes,
        output,
        only,
        quick,
    })
}

pub fn run(args: &[OsString]) -> Result<()> {
    let options = parse_options(args)?;
    become_subreaper();
    let tracer = build(&[])?;
    setup::apt_install(BENCH_PACKAGES)?;
    let dir = target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let fixtures = Fixtures::compile(&dir)?;
    let wants = |part: &str| options.only.is_empty() || options.only.iter().any(|o| o == part);

    let machine = Machine::now();
    let started = Instant::now();
    let mut doc = String::new();
    let mut summary: Vec<String> = Vec::new();

    let loop_section = if wants("loop") {
        Some(bench_loop(
            &tracer,
            &fixtures,
            &options.sizes,
            &dir,
            &mut summary,
        )?)
    } else {
        None
    };
    let http_section = if wants("http") {
        Some(bench_http(
            &tracer,
            &fixtures,
            &options.sizes,
            &dir,
            &mut summary,
        )?)
    } else {
        None
    };
    let tracer_section = if wants("tracer") {
        Some(bench_tracer(
            &tracer,
            &fixtures,
            &options.sizes,
            &dir,
            &mut summary,
        )?)
    } else {
        None
    };
    let load_after = loadavg();
    let elapsed = started.elapsed();

    writeln!(doc, "# Benchmarks\n")?;
    writeln!(
        doc,
        "Written by `cargo xtask bench{}` (bench harness: `xtask/src/bench.rs`, fixtures: \
         `bench/`). Re-run it on a quiet machine to refresh every number here.\n",
        if options.quick { " --quick" } else { "" }
    )?;
    writeln!(doc, "## Machine\n")?;
    writeln!(doc, "| what | value |\n| --- | --- |")?;
    writeln!(doc, "| CPU | {} |", machine.cpu)?;
    writeln!(doc, "| cores | {} |", machine.cores)?;
    writeln!(doc, "| kernel | {} |", machine.kernel)?;
    writeln!(doc, "| C library | {} |", machine.libc)?;
    writeln!(doc, "| date (UTC) | {} |", machine.date)?;
    writeln!(
        doc,
        "| load average (1, 5, 15 min) before / after | {} / {} |",
        machine.load_before, load_after
    )?;
    writeln!(
        doc,
        "| benchmark duration | {:.0} s |",
        elapsed.as_secs_f64()
    )?;
    writeln!(doc)?;
    let busy = machine.load_before_1min() >= 0.5 || load_after_1min(&load_after) >= 1.5;
    if busy {
        writeln!(
            doc,
            "**The machine was busy** (load average {} before this run on {} cores; the \
             benchmark itself adds about 1 to 2): other work was running, so absolute \
             numbers are noisy. Variants ran interleaved, so comparisons between them \
             are fairer than the absolute figures.\n",
            machine.load_before, machine.cores
        )?;
    } else {
        writeln!(
            doc,
            "The machine looked quiet before the run (load average {}).\n",
            machine.load_before
        )?;
    }
    if !summary.is_empty() {
        writeln!(doc, "## Summary\n")?;
        for line in &summary {
            writeln!(doc, "- {line}")?;
        }
        writeln!(doc)?;
    }
    for section in [loop_section, http_section, tracer_section]
        .into_iter()
        .flatten()
    {
        doc.push_str(&section);
    }
    fs::write(&options.output, &doc)
        .with_context(|| format!("writing {}", options.output.display()))?;
    println!("{doc}");
    println!("bench: wrote {}", options.output.display());
    Ok(())
}

// ---------------------------------------------------------------------------
// Machine facts

struct Machine {
    cpu: String,
    cores: String,
    kernel: String,
    libc: String,
    date: String,
    load_before: String,
}

impl Machine {
    fn now() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let trimmed = |c: &mut Command| output(c).unwrap_or_default().trim().to_string();
        let libc = trimmed(cmd("ldd").arg("--version"));
        Machine {
            cpu,
            cores: trimmed(&mut cmd("nproc")),
            kernel: trimmed(cmd("uname").args(["-r", "-m"])),
            libc: libc.lines().next().unwrap_or("unknown").to_string(),
            date: trimmed(cmd("date").args(["-u", "+%Y-%m-%d %H:%M"])),
            load_before: loadavg(),
        }
    }

    fn load_before_1min(&self) -> f64 {
        load_after_1min(&self.load_before)
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn load_after_1min(load: &str) -> f64 {
    load.split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// Fixtures

struct Fixtures {
    malloc_loop: PathBuf,
    http_server: PathBuf,
    many_live: PathBuf,
    bpftrace_script: PathBuf,
}

/// How the fixtures are built: optimized, with frame pointers (the tracer
/// walks stacks by frame pointer) and debug info (for symbolization).
const CFLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-fno-omit-frame-pointer",
    "-fno-optimize-sibling-calls",
    "-pthread",
    "-Wall",
];

impl Fixtures {
    fn compile(dir: &Path) -> Result<Self> {
        let source = root().join("bench/fixtures");
        let compile = |name: &str| -> Result<PathBuf> {
            let out = dir.join(name);
            crate::run(
                cmd("gcc")
                    .args(CFLAGS)
                    .arg("-o")
                    .arg(&out)
                    .arg(source.join(format!("{name}.c"))),
            )?;
            Ok(out)
        };
        // The peer script names the C library by path; use this machine's.
        let libc = libc_path()?;
        let script = fs::read_to_string(root().join("bench/peers/memleak.bt"))?
            .replace("/lib/x86_64-linux-gnu/libc.so.6", &libc);
        let bpftrace_script = dir.join("memleak.bt");
        fs::write(&bpftrace_script, script)?;
        Ok(Fixtures {
            malloc_loop: compile("malloc_loop")?,
            http_server: compile("http_server")?,
            many_live: compile("many_live")?,
            bpftrace_script,
        })
    }
}

/// The C library the fixtures load, from the dynamic loader's list.
fn libc_path() -> Result<String> {
    let list = output(cmd("ldd").arg("/bin/true")).context("ldd /bin/true failed")?;
    list.lines()
        .find_map(|l| {
            let (name, rest) = l.trim().split_once(" => ")?;
            name.starts_with("libc.so")
                .then(|| rest.split(" (").next().unwrap_or(rest).trim().to_string())
        })
        .context("no libc.so in `ldd /bin/true`")
}

// ---------------------------------------------------------------------------
// Small process helpers

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

/// Shell-like rendering of a command, for the report.
fn shown(program: &Path, args: &[String]) -> String {
    let name = program
        .strip_prefix(root())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| program.display().to_string());
    let mut text = name;
    for a in args {
        text.push(' ');
        let a = a.replace(&(root().display().to_string() + "/"), "");
        if a.contains(' ') {
            text.push_str(&format!("'{a}'"));
        } else {
            text.push_str(&a);
        }
    }
    text
}

/// The tracer hands the detaching of its probes to a forked child that
/// outlives it (each uprobe detach waits for RCU grace periods in the
/// kernel, 0.1-0.3 s each). Made a subreaper, the bench inherits those
/// children, and `reap_detachers` waits for them after each run: otherwise
/// their detaching overlaps the next run and, on the same file, slows its
/// attaching by up to a second.
fn become_subreaper() {
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
fn reap_detachers() {
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

fn our_children() -> Vec<u32> {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Waits for a child up to `limit`, then kills it.
fn wait_or_kill(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
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
fn read_until(
    reader: &mut BufReader<std::process::ChildStdout>,
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

/// Values of "ns_per_iter X" lines.
fn ns_per_iter(lines: &[String]) -> Vec<f64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("ns_per_iter "))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------
// 1. The malloc/free loop

#[derive(Clone)]
enum LoopMode {
    Untraced,
    /// The tracer with these extra options.
    Tracer(&'static str, &'static [&'static str]),
    Bpftrace,
}

impl LoopMode {
    fn name(&self) -> &'static str {
        match self {
            LoopMode::Untraced => "untraced",
            LoopMode::Tracer(name, _) => name,
            LoopMode::Bpftrace => "bpftrace peer",
        }
    }
}

fn loop_modes() -> Vec<LoopMode> {
    vec![
        LoopMode::Untraced,
        LoopMode::Tracer("no-op programs (floor)", &["--noop-probes"]),
        LoopMode::Tracer("tracer", &[]),
        LoopMode::Tracer("tracer without stacks", &["--no-stacks"]),
        LoopMode::Tracer("tracer, --unwind cfi", &["--unwind", "cfi"]),
        LoopMode::Tracer(
            "no-op programs, free probed at its entry",
            &["--noop-probes", "--entry-probes"],
        ),
        LoopMode::Tracer("tracer, free probed at its entry", &["--entry-probes"]),
        LoopMode::Tracer("tracer, sampling every 512 KiB", &["--sample-rate", "512k"]),
        LoopMode::Tracer(
            "tracer, sampling every 512 KiB, uprobe+uretprobe",
            &["--sample-rate", "512k", "--uprobe-sessions", "never"],
        ),
        LoopMode::Tracer(
            "no-op session programs, no return (sampled floor)",
            &["--noop-probes", "--sample-rate", "512k"],
        ),
        LoopMode::Tracer(
            "tracer, uprobe sessions in exact mode",
            &["--uprobe-sessions", "always"],
        ),
        LoopMode::Bpftrace,
    ]
}

fn bench_loop(
    tracer: &Path,
    fixtures: &Fixtures,
    sizes: &Sizes,
    dir: &Path,
    summary: &mut Vec<String>,
) -> Result<String> {
    let modes = loop_modes();
    let loop_args = vec![
        sizes.loop_iterations.to_string(),
        sizes.loop_rounds.to_string(),
    ];
    let mut results: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut commands: Vec<String> = Vec::new();
    for rep in 0..sizes.reps {
        for (i, mode) in modes.iter().enumerate() {
            println!("bench: loop {}/{}: {}", rep + 1, sizes.reps, mode.name());
            let (values, command) = run_loop(tracer, fixtures, mode, &loop_args, dir)?;
            if rep == 0 {
                commands.push(format!("{}: `{command}`", mode.name()));
            }
            results.entry(i).or_default().extend(values);
        }
    }
    let mut medians: Vec<f64> = Vec::new();
    let mut text = String::new();
    writeln!(text, "## 1. malloc/free loop\n")?;
    writeln!(
        text,
        "`bench/fixtures/malloc_loop.c`: each iteration mallocs 16..271 bytes (every 64th: \
         4..68 KiB) and frees it, except every 1000th block, which it keeps (a steady leak). \
         Timed inside the program: {} processes per variant, run interleaved, each a warm-up \
         and {} timed rounds of {} iterations; medians over all rounds. \"Added\" is the \
         variant's median minus the untraced median: the cost per malloc/free pair.\n",
        sizes.reps, sizes.loop_rounds, sizes.loop_iterations
    )?;
    writeln!(
        text,
        "| variant | ns per iteration (median) | added per malloc/free pair | min .. max |"
    )?;
    writeln!(text, "| --- | ---: | ---: | ---: |")?;
    for (i, mode) in modes.iter().enumerate() {
        let values = results
            .get_mut(&i)
            .map(Vec::as_mut_slice)
            .unwrap_or(&mut []);
        let (lo, hi) = min_max(values);
        let m = median(values);
        medians.push(m);
        let added = if i == 0 {
            "—".to_string()
        } else {
            format!("{:.0} ns", m - medians[0])
        };
        writeln!(
            text,
            "| {} | {:.0} | {} | {:.0} .. {:.0} |",
            mode.name(),
            m,
            added,
            lo,
            hi
        )?;
    }
    let find = |name: &str| {
        modes
            .iter()
            .position(|m| m.name() == name)
            .map(|i| medians[i] - medians[0])
    };
    // The uprobe sessions subsection, after the commands.
    let mut sessions = String::new();
    writeln!(text)?;
    if let (Some(tracer_added), Some(floor)) = (find("tracer"), find("no-op programs (floor)")) {
        let ratio = tracer_added / floor;
        writeln!(
            text,
            "Tracer / floor: **{ratio:.2}×** ({tracer_added:.0} ns against {floor:.0} ns per pair). \
             The tracer's own programs account for the difference, {:.0} ns.",
            tracer_added - floor
        )?;
        let met = tracer_added <= 3000.0;
        summary.push(format!(
            "Exact mode adds **{tracer_added:.0} ns** per malloc/free pair (target ≤ 3,000 ns: {}); \
             the floor of any uprobe tool at the same addresses is {floor:.0} ns (ratio {ratio:.2}).",
            if met { "met" } else { "**not met**" }
        ));
        if let Some(no_stacks) = find("tracer without stacks") {
            writeln!(
                text,
                "\nStack capture: {:.0} ns per allocation (tracer minus tracer without stacks).",
                tracer_added - no_stacks
            )?;
            summary.push(format!(
                "Stack capture costs {:.0} ns per allocation (the loop's stacks are 5 frames deep).",
                tracer_added - no_stacks
            ));
        }
        if let Some(cfi) = find("tracer, --unwind cfi") {
            writeln!(
                text,
                "\nCFI unwinding (`--unwind cfi`, tables in the kernel instead of frame \
                 pointers): {cfi:.0} ns per pair, {:+.0} ns against frame pointers.",
                cfi - tracer_added
            )?;
            summary.push(format!(
                "`--unwind cfi` adds {cfi:.0} ns per pair ({:+.0} ns against frame pointers).",
                cfi - tracer_added
            ));
        }
        if let (Some(at_entry), Some(floor_at_entry)) = (
            find("tracer, free probed at its entry"),
            find("no-op programs, free probed at its entry"),
        ) {
            writeln!(
                text,
                "\nProbe placement: with `free` probed at its entry (its NULL guard `test rdi,rdi; \
                 je` is single-stepped) instead of past the guard (a `push`, emulated), the tracer \
                 adds {at_entry:.0} ns and the floor is {floor_at_entry:.0} ns: placement saves \
                 {:.0} ns per pair.",
                at_entry - tracer_added
            )?;
            summary.push(format!(
                "Probing `free` past its NULL guard saves {:.0} ns per pair ({at_entry:.0} ns at \
                 its entry).",
                at_entry - tracer_added
            ));
        }
        if let Some(sampled) = find("tracer, sampling every 512 KiB") {
            writeln!(
                text,
                "\nSampling (`--sample-rate 512k`): {sampled:.0} ns per pair; most calls are not \
                 sampled and skip the stack walk and the maps."
            )?;
            summary.push(format!(
                "With `--sample-rate 512k`: {sampled:.0} ns per pair."
            ));
            if let (Some(classic), Some(session_floor), Some(classic_floor)) = (
                find("tracer, sampling every 512 KiB, uprobe+uretprobe"),
                find("no-op session programs, no return (sampled floor)"),
                find("no-op programs (floor)"),
            ) {
                let _ = write!(
                    sessions,
                    "### Uprobe sessions\n\n\
                     A uprobe session (kernel 6.13+: a `BPF_TRACE_UPROBE_SESSION` program on a \
                     `uprobe_multi` link) runs one program at a function's entry and, only if \
                     the entry returned 0, again at its return. Under `--sample-rate` the \
                     tracer probes the allocation functions that way where the kernel allows \
                     (`tracer-ebpf/src/session.rs`): an unsampled call's entry returns 1 and \
                     its return is never trapped. With a uprobe and a uretprobe, every call \
                     pays both traps though only sampled ones use the return value. `free` \
                     stays a plain uprobe in both.\n\n\
                     | same loop, same run | added per malloc/free pair |\n\
                     | --- | ---: |\n\
                     | tracer, `--sample-rate 512k`, uprobe sessions (the default) | {sampled:.0} ns |\n\
                     | tracer, `--sample-rate 512k --uprobe-sessions never` (uprobe+uretprobe) | {classic:.0} ns |\n\
                     | no-op programs, uprobe+uretprobe on malloc (floor of the latter) | {classic_floor:.0} ns |\n\
                     | no-op session program that skips every return (floor of the former) | {session_floor:.0} ns |\n\n\
                     Sessions save **{:.0} ns per pair** under sampling ({:.0}%); the floors \
                     differ by {:.0} ns, the return trap an unsampled call no longer takes.",
                    classic - sampled,
                    (1.0 - sampled / classic) * 100.0,
                    classic_floor - session_floor,
                );
                summary.push(format!(
                    "Uprobe sessions save {:.0} ns per pair under sampling ({sampled:.0} against \
                     {classic:.0} ns with uprobe+uretprobe; their floor {session_floor:.0} ns).",
                    classic - sampled
                ));
            }
            if let Some(exact_sessions) = find("tracer, uprobe sessions in exact mode") {
                let _ = write!(
                    sessions,
                    " In exact mode every return is needed; with sessions anyway \
                     (`--uprobe-sessions always`, hidden) the tracer adds {exact_sessions:.0} ns \
                     per pair, {:+.0} ns against uprobe+uretprobe (which exact mode uses).",
                    exact_sessions - tracer_added
                );
            }
        }
        if let Some(peer) = find("bpftrace peer") {
            writeln!(
                text,
                "\nThe bpftrace peer (`bench/peers/memleak.bt`: uprobes at the entries of malloc \
                 and free, a uretprobe on malloc, per-address and per-stack maps) adds {peer:.0} ns \
                 per pair: {:.1}× the tracer's.",
                peer / tracer_added
            )?;
            summary.push(format!(
                "The bpftrace peer adds {peer:.0} ns per pair ({:.1}× the tracer).",
                peer / tracer_added
            ));
        }
    }
    writeln!(text, "\nCommands (one process each):\n")?;
    for c in commands {
        writeln!(text, "- {c}")?;
    }
    writeln!(text)?;
    if !sessions.is_empty() {
        writeln!(text, "{sessions}\n")?;
    }
    Ok(text)
}

/// Runs the loop once under `mode`; returns its rounds' ns per iteration
/// and the command line.
fn run_loop(
    tracer: &Path,
    fixtures: &Fixtures,
    mode: &LoopMode,
    loop_args: &[String],
    dir: &Path,
) -> Result<(Vec<f64>, String)> {
    let fixture = fixtures.malloc_loop.display().to_string();
    match mode {
        LoopMode::Untraced => {
            let out = cmd(&fixtures.malloc_loop)
                .args(loop_args)
                .stderr(Stdio::inherit())
                .output()?;
            let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect();
            Ok((ns_per_iter(&lines), shown(&fixtures.malloc_loop, loop_args)))
        }
        LoopMode::Tracer(_, extra) => {
            let mut args: Vec<String> = vec!["run".into(), "-o".into(), "/dev/null".into()];
            args.extend(extra.iter().map(|s| s.to_string()));
            args.push("--".into());
            args.push(fixture);
            args.extend(loop_args.iter().cloned());
            let out = cmd(tracer)
                .args(&args)
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .output()?;
            reap_detachers();
            if !out.status.success() {
                bail!(
                    "tracer failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect();
            Ok((ns_per_iter(&lines), shown(tracer, &args)))
        }
        LoopMode::Bpftrace => {
            let mut fixture_args = loop_args.to_vec();
            fixture_args.push("wait".into());
            let mut child = cmd(&fixtures.malloc_loop)
                .args(&fixture_args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let pid = child.id();
            let mut stdout = BufReader::new(child.stdout.take().unwrap());
            read_until(&mut stdout, Duration::from_secs(30), |l| l == "waiting")?;
            let bt_out = dir.join("bpftrace.out");
            let bt_args = vec![
                "-p".to_string(),
                pid.to_string(),
                fixtures.bpftrace_script.display().to_string(),
                pid.to_string(),
            ];
            let mut bt = Command::new("bpftrace")
                .args(&bt_args)
                .stdout(fs::File::create(&bt_out)?)
                .stderr(Stdio::null())
                .spawn()
                .context("starting bpftrace")?;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let text = fs::read_to_string(&bt_out).unwrap_or_default();
                if text.lines().any(|l| l == "attached") {
                    break;
                }
                if let Some(status) = bt.try_wait()? {
                    let _ = child.kill();
                    bail!("bpftrace exited ({status}) before attaching");
                }
                if Instant::now() > deadline {
                    let _ = bt.kill();
                    let _ = child.kill();
                    bail!("bpftrace did not attach within 60 s");
                }
                thread::sleep(Duration::from_millis(50));
            }
            child.stdin.take().unwrap().write_all(b"go\n")?;
            let mut rest = String::new();
            stdout.read_to_string(&mut rest)?;
            child.wait()?;
            signal(bt.id(), "-INT");
            wait_or_kill(&mut bt, Duration::from_secs(30))?;
            let lines: Vec<String> = rest.lines().map(str::to_string).collect();
            let command = format!(
                "{} & bpftrace {}",
                shown(&fixtures.malloc_loop, &fixture_args),
                bt_args
                    .iter()
                    .map(|a| if a == &pid.to_string() {
                        "$PID".to_string()
                    } else {
                        a.replace(&(target_dir().display().to_string() + "/"), "target/")
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            Ok((ns_per_iter(&lines), command))
        }
    }
}

// ---------------------------------------------------------------------------
// 2. HTTP server

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn bench_http(
    tracer: &Path,
    fixtures: &Fixtures,
    sizes: &Sizes,
    _dir: &Path,
    summary: &mut Vec<String>,
) -> Result<String> {
    let modes: [(&str, &[&str]); 4] = [
        ("untraced", &[]),
        ("tracer", &["run", "-o", "/dev/null", "--"]),
        (
            "tracer, sampling every 512 KiB",
            &["run", "--sample-rate", "512k", "-o", "/dev/null", "--"],
        ),
        (
            "tracer, sampling every 512 KiB, uprobe+uretprobe",
            &[
                "run",
                "--sample-rate",
                "512k",
                "--uprobe-sessions",
                "never",
                "-o",
                "/dev/null",
                "--",
            ],
        ),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut commands: Vec<String> = Vec::new();
    let wrk_args = |port: u16| {
        vec![
            "-t1".to_string(),
            "-c4".to_string(),
            format!("-d{}s", sizes.http_seconds),
            format!("http://127.0.0.1:{port}/"),
        ]
    };
    for rep in 0..sizes.reps {
        for (i, (name, prefix)) in modes.iter().enumerate() {
            println!("bench: http {}/{}: {name}", rep + 1, sizes.reps);
            let port = free_port()?;
            let mut server = if prefix.is_empty() {
                cmd(&fixtures.http_server)
                    .arg(port.to_string())
                    .stdout(Stdio::null())
                    .spawn()?
            } else {
                cmd(tracer)
                    .args(*prefix)
                    .arg(&fixtures.http_server)
                    .arg(port.to_string())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                if Instant::now() > deadline || server.try_wait()?.is_some() {
                    let _ = server.kill();
                    bail!("{name}: the HTTP server did not start listening");
                }
                thread::sleep(Duration::from_millis(50));
            }
            let args = wrk_args(port);
            let out = Command::new("wrk")
                .args(&args)
                .output()
                .context("running wrk")?;
            let text = String::from_utf8_lossy(&out.stdout);
            let rps: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("Requests/sec:"))
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no Requests/sec in wrk's output: {text}"))?;
            results[i].push(rps);
            if let Ok(mut quit) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = quit.write_all(b"GET /quit HTTP/1.1\r\n\r\n");
            }
            wait_or_kill(&mut server, Duration::from_secs(30))?;
            reap_detachers();
            if rep == 0 {
                let server_cmd = shown(&fixtures.http_server, &["$PORT".to_string()]);
                let server_cmd = if prefix.is_empty() {
                    server_cmd
                } else {
                    format!(
                        "{} {server_cmd}",
                        shown(
                            tracer,
                            &prefix.iter().map(|s| s.to_string()).collect::<Vec<_>>()
                        )
                    )
                };
                commands.push(format!(
                    "{name}: `{server_cmd}` and `wrk {}`",
                    wrk_args(0).join(" ").replace(":0/", ":$PORT/")
                ));
            }
        }
    }
    let untraced = median(&mut results[0].clone());
    let traced = median(&mut results[1].clone());
    let mut text = String::new();
    writeln!(text, "## 2. HTTP server under load\n")?;
    writeln!(
        text,
        "`bench/fixtures/http_server.c`: one thread per connection, keep-alive; each request \
         is parsed into heap objects (6 malloc/free pairs for wrk's requests), and every \
         1000th request leaks 64 bytes. wrk, 1 thread and 4 connections on loopback, {} s \
         per run, {} runs per variant interleaved; server, wrk and tracer share the same \
         cores.\n",
        sizes.http_seconds, sizes.reps
    )?;
    writeln!(text, "| variant | requests/s (median) | min .. max |")?;
    writeln!(text, "| --- | ---: | ---: |")?;
    for (i, (name, _)) in modes.iter().enumerate() {
        let (lo, hi) = min_max(&results[i]);
        let m = median(&mut results[i].clone());
        writeln!(text, "| {name} | {m:.0} | {lo:.0} .. {hi:.0} |")?;
    }
    let change = (traced / untraced - 1.0) * 100.0;
    let sampled = median(&mut results[2].clone());
    let sampled_change = (sampled / untraced - 1.0) * 100.0;
    let classic = median(&mut results[3].clone());
    let classic_change = (classic / untraced - 1.0) * 100.0;
    writeln!(
        text,
        "\nThroughput against untraced: {change:+.1}% traced, {sampled_change:+.1}% sampled \
         (uprobe sessions; {classic_change:+.1}% sampled with uprobe+uretprobe).\n"
    )?;
    summary.push(format!(
        "HTTP server: {traced:.0} requests/s traced ({change:+.1}%), {sampled:.0} sampled \
         ({sampled_change:+.1}%), against {untraced:.0} untraced."
    ));
    writeln!(text, "Commands:\n")?;
    for c in commands {
        writeln!(text, "- {c}")?;
    }
    writeln!(text)?;
    Ok(text)
}

// ---------------------------------------------------------------------------
// 3. The tracer's own cost

fn clock_ticks() -> f64 {
    output(cmd("getconf").arg("CLK_TCK"))
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15: 11 and 12 after the name.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// A `Vm*` value of /proc/PID/status in KiB.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(key)?
            .trim_start_matches(':')
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

/// Kernel memory charged for the BPF maps a process holds (fdinfo memlock).
fn bpf_map_kib(pid: u32) -> u64 {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let mut total = 0;
    for fd in fds.flatten() {
        let Ok(link) = fs::read_link(fd.path()) else {
            continue;
        };
        if link.to_string_lossy() != "anon_inode:bpf-map" {
            continue;
        }
        let info = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total / 1024
}

/// The tracer's child (the traced command) of a `tracer run`: any of its
/// threads may have started it.
fn child_of(pid: u32) -> Option<u32> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|task| {
        let children = fs::read_to_string(task.path().join("children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    })
}

/// "tracer: timing: snapshot X ms" values from a stderr capture.
fn timing_values(text: &str, key: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| l.split(key).nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

fn bench_tracer(
    tracer: &Path,
    fixtures: &Fixtures,
    sizes: &Sizes,
    dir: &Path,
    summary: &mut Vec<String>,
) -> Result<String> {
    let blocks = sizes.live_blocks;
    let window = sizes.live_window_s;
    let settle = 3;
    let lifetime = settle + window + 3;
    let mut text = String::new();
    writeln!(text, "## 3. The tracer's own cost\n")?;

    // (a) CPU and memory at a 1 s refresh.
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
    let ticks0 = cpu_ticks(tracer_pid).context("reading the tracer's CPU time")?;
    let t0 = Instant::now();
    let mut rss_max = 0;
    while t0.elapsed() < Duration::from_secs(window) {
        rss_max = rss_max.max(status_kib(tracer_pid, "VmRSS").unwrap_or(0));
        thread::sleep(Duration::from_millis(250));
    }
    let ticks1 = cpu_ticks(tracer_pid).context("reading the tracer's CPU time")?;
    let cpu_pct = (ticks1 - ticks0) as f64 / clock_ticks() / t0.elapsed().as_secs_f64() * 100.0;
    let hwm = status_kib(tracer_pid, "VmHWM").unwrap_or(0);
    let maps_kib = bpf_map_kib(tracer_pid);
    let target_rss = target_pid.and_then(|p| status_kib(p, "VmRSS")).unwrap_or(0);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest)?;
    wait_or_kill(&mut child, Duration::from_secs(120))?;
    reap_detachers();
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    let mut snapshot_ms = timing_values(&stderr, "snapshot ");
    // The last report is the final one, which reads every block.
    let final_ms = snapshot_ms.pop().unwrap_or(f64::NAN);
    let refresh_ms = median(&mut snapshot_ms);
    let cpu_met = cpu_pct <= 3.0;
    let rss_met = hwm <= 64 * 1024;
    writeln!(
        text,
        "`bench/fixtures/many_live.c` allocates {blocks} blocks of 32..95 bytes over 10,000 \
         distinct stacks (four levels of ten functions) and keeps them, then idles with 100 \
         malloc/free pairs a second. The tracer runs it with a report every second (text, \
         top 10). Measured over {window} s, {settle} s after the blocks are in place.\n"
    )?;
    writeln!(text, "| what | value |\n| --- | ---: |")?;
    writeln!(
        text,
        "| tracer CPU (user + system) | {cpu_pct:.1}% of one core |"
    )?;
    writeln!(
        text,
        "| tracer RSS, peak seen in the window | {:.1} MiB |",
        rss_max as f64 / 1024.0
    )?;
    writeln!(
        text,
        "| tracer RSS high-water mark (whole run) | {:.1} MiB |",
        hwm as f64 / 1024.0
    )?;
    writeln!(
        text,
        "| kernel memory of its BPF maps (memlock) | {:.1} MiB |",
        maps_kib as f64 / 1024.0
    )?;
    writeln!(
        text,
        "| target's RSS (for scale) | {:.1} MiB |",
        target_rss as f64 / 1024.0
    )?;
    writeln!(
        text,
        "| one refresh's snapshot (median) | {refresh_ms:.1} ms |"
    )?;
    writeln!(
        text,
        "| final report's snapshot (reads every block) | {final_ms:.1} ms |"
    )?;
    writeln!(
        text,
        "| start to {blocks} blocks allocated, traced | {fill_s:.1} s |"
    )?;
    writeln!(text)?;
    writeln!(text, "Command: `{}`\n", shown(tracer, &args))?;
    summary.push(format!(
        "Tracer with {blocks} live blocks over 10,000 stacks, 1 s refresh: {cpu_pct:.1}% CPU \
         (target ≤ 3%: {}), RSS high-water {:.1} MiB (target ≤ 64 MiB: {}).",
        if cpu_met { "met" } else { "**not met**" },
        hwm as f64 / 1024.0,
        if rss_met { "met" } else { "**not met**" }
    ));

    // (b) Symbolizing 10,000 stacks: a final report of every stack.
    println!("bench: symbolizing 10,000 stacks");
    let sym_args: Vec<String> = vec![
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
    let out = cmd(tracer).args(&sym_args).stdout(Stdio::null()).output()?;
    reap_detachers();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report_ms = timing_values(&stderr, "report ").pop().unwrap_or(f64::NAN);
    let symbolized = stderr
        .lines()
        .filter_map(|l| l.split("ms (").nth(2))
        .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .last()
        .unwrap_or(0);
    writeln!(
        text,
        "Symbolizing every stack of a final report: **{report_ms:.0} ms** for {symbolized} stacks \
         (blazesym, DWARF line info, cold caches). Command: `{}`\n",
        shown(tracer, &sym_args)
    )?;
    summary.push(format!(
        "Symbolizing {symbolized} stacks takes {report_ms:.0} ms."
    ));

    // (c) Start to attached, on an idle process.
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
    let attach_args: Vec<String> = vec![
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
    let mut wall = Vec::new();
    let mut phases: Vec<(f64, String)> = Vec::new();
    for _ in 0..sizes.reps {
        let start = Instant::now();
        let mut t = cmd(tracer)
            .args(&attach_args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut err = BufReader::new(t.stderr.take().unwrap());
        let mut line = String::new();
        let mut phase = String::new();
        loop {
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
                let ms = start.elapsed().as_secs_f64() * 1e3;
                wall.push(ms);
                phases.push((ms, std::mem::take(&mut phase)));
                break;
            }
        }
        let mut rest = String::new();
        err.read_to_string(&mut rest)?;
        wait_or_kill(&mut t, Duration::from_secs(30))?;
        reap_detachers();
    }
    let _ = idle.kill();
    let _ = idle.wait();
    let attach_ms = median(&mut wall);
    // The breakdown of the run whose time is the median.
    phases.sort_by(|a, b| a.0.total_cmp(&b.0));
    let median_phase = phases
        .get(phases.len() / 2)
        .map(|(_, p)| p.as_str())
        .unwrap_or("?");
    writeln!(
        text,
        "Start to attached (`tracer report --pid` on a running process, from spawning the \
         tracer to its \"attached\" line; median of {}): **{attach_ms:.0} ms**. The tracer's own \
         breakdown of the median run: {}. Command: `{}`\n",
        sizes.reps,
        median_phase,
        shown(tracer, &attach_args).replace(&pid.to_string(), "$PID")
    )?;
    summary.push(format!("Start to attached: {attach_ms:.0} ms."));
    Ok(text)
}
