//! Part 1: the malloc/free loop (bench/fixtures/malloc_loop.c), timed inside
//! the program, under each variant: untraced, the tracer with various
//! options, and the bpftrace peer.

use std::{
    fs,
    io::{BufReader, Read, Write},
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    command_line::shown,
    fixtures::Fixtures,
    options::Sizes,
    process::{read_until, reap_detachers, signal, wait_or_kill},
};
use crate::{cmd, target_dir};

#[derive(Clone)]
pub enum LoopMode {
    Untraced,
    /// The tracer with these extra options.
    Tracer(&'static str, &'static [&'static str]),
    /// The same, the loop running 24 calls deeper (stacks of 30 frames).
    Deep(&'static str, &'static [&'static str]),
    Bpftrace,
}

impl LoopMode {
    pub fn name(&self) -> &'static str {
        match self {
            LoopMode::Untraced => "untraced",
            LoopMode::Tracer(name, _) | LoopMode::Deep(name, _) => name,
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
        LoopMode::Tracer("tracer, --unwind fp", &["--unwind", "fp"]),
        LoopMode::Deep("tracer, 30 frames", &[]),
        LoopMode::Deep("tracer, --unwind fp, 30 frames", &["--unwind", "fp"]),
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

/// The loop's measurements, variant by variant.
pub struct LoopResults {
    /// The variants; the first is the untraced baseline.
    pub modes: Vec<LoopMode>,
    /// Per variant, in the same order: ns per iteration of every timed round
    /// of every process.
    pub rounds: Vec<Vec<f64>>,
    /// Per variant: "name: `command`".
    pub commands: Vec<String>,
}

impl LoopResults {
    /// The index of the variant called `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.modes.iter().position(|m| m.name() == name)
    }
}

/// Runs every variant `sizes.reps` times, interleaved.
pub fn measure(
    tracer: &Path,
    fixtures: &Fixtures,
    sizes: &Sizes,
    dir: &Path,
) -> Result<LoopResults> {
    let modes = loop_modes();
    let loop_args = vec![
        sizes.loop_iterations.to_string(),
        sizes.loop_rounds.to_string(),
    ];
    let mut rounds = vec![Vec::new(); modes.len()];
    let mut commands: Vec<String> = Vec::new();
    for rep in 0..sizes.reps {
        for (i, mode) in modes.iter().enumerate() {
            println!("bench: loop {}/{}: {}", rep + 1, sizes.reps, mode.name());
            let (values, command) = run_loop(tracer, fixtures, mode, &loop_args, dir)?;
            if rep == 0 {
                commands.push(format!("{}: `{command}`", mode.name()));
            }
            rounds[i].extend(values);
        }
    }
    Ok(LoopResults {
        modes,
        rounds,
        commands,
    })
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
    match mode {
        LoopMode::Untraced => run_untraced(fixtures, loop_args),
        LoopMode::Tracer(_, extra) => run_traced(tracer, fixtures, extra, loop_args, None),
        LoopMode::Deep(_, extra) => run_traced(tracer, fixtures, extra, loop_args, Some(DEEP)),
        LoopMode::Bpftrace => run_under_bpftrace(fixtures, loop_args, dir),
    }
}

fn run_untraced(fixtures: &Fixtures, loop_args: &[String]) -> Result<(Vec<f64>, String)> {
    let out = cmd(&fixtures.malloc_loop)
        .args(loop_args)
        .stderr(Stdio::inherit())
        .output()?;
    Ok((
        ns_per_iter(&String::from_utf8_lossy(&out.stdout)),
        shown(&fixtures.malloc_loop, loop_args),
    ))
}

/// Extra calls of the deep loop variants: stacks of about 30 frames.
const DEEP: &str = "24";

/// `tracer run` of the loop with the `extra` options (`depth`: LOOP_DEPTH).
fn run_traced(
    tracer: &Path,
    fixtures: &Fixtures,
    extra: &[&str],
    loop_args: &[String],
    depth: Option<&str>,
) -> Result<(Vec<f64>, String)> {
    let mut args: Vec<String> = vec!["run".into(), "-o".into(), "/dev/null".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--".into());
    args.push(fixtures.malloc_loop.display().to_string());
    args.extend(loop_args.iter().cloned());
    let mut command = cmd(tracer);
    if let Some(depth) = depth {
        command.env("LOOP_DEPTH", depth);
    }
    let out = command
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
    let shown = shown(tracer, &args);
    let shown = match depth {
        Some(depth) => format!("LOOP_DEPTH={depth} {shown}"),
        None => shown,
    };
    Ok((ns_per_iter(&String::from_utf8_lossy(&out.stdout)), shown))
}

/// The loop started waiting, bpftrace attached to it, then the loop let go.
fn run_under_bpftrace(
    fixtures: &Fixtures,
    loop_args: &[String],
    dir: &Path,
) -> Result<(Vec<f64>, String)> {
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
    let bt_args = vec![
        "-p".to_string(),
        pid.to_string(),
        fixtures.bpftrace_script.display().to_string(),
        pid.to_string(),
    ];
    let mut bt = start_bpftrace(&bt_args, &dir.join("bpftrace.out"), &mut child)?;
    child.stdin.take().unwrap().write_all(b"go\n")?;
    let rest = finish_loop(&mut child, stdout)?;
    signal(bt.id(), "-INT");
    wait_or_kill(&mut bt, Duration::from_secs(30))?;
    let command = bpftrace_command_line(fixtures, &fixture_args, &bt_args, pid);
    Ok((ns_per_iter(&rest), command))
}

/// Starts bpftrace and waits (up to a minute) for its "attached" line in
/// `bt_out`; kills `target` if it fails.
fn start_bpftrace(bt_args: &[String], bt_out: &Path, target: &mut Child) -> Result<Child> {
    let mut bt = Command::new("bpftrace")
        .args(bt_args)
        .stdout(fs::File::create(bt_out)?)
        .stderr(Stdio::null())
        .spawn()
        .context("starting bpftrace")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = fs::read_to_string(bt_out).unwrap_or_default();
        if text.lines().any(|l| l == "attached") {
            return Ok(bt);
        }
        if let Some(status) = bt.try_wait()? {
            let _ = target.kill();
            bail!("bpftrace exited ({status}) before attaching");
        }
        if Instant::now() > deadline {
            let _ = bt.kill();
            let _ = target.kill();
            bail!("bpftrace did not attach within 60 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The rest of the loop's output, once it has exited.
fn finish_loop(child: &mut Child, mut stdout: BufReader<ChildStdout>) -> Result<String> {
    let mut rest = String::new();
    stdout.read_to_string(&mut rest)?;
    child.wait()?;
    Ok(rest)
}

/// The loop and bpftrace as one shell line, the PID a variable.
fn bpftrace_command_line(
    fixtures: &Fixtures,
    fixture_args: &[String],
    bt_args: &[String],
    pid: u32,
) -> String {
    format!(
        "{} & bpftrace {}",
        shown(&fixtures.malloc_loop, fixture_args),
        bt_args
            .iter()
            .map(|a| if a == &pid.to_string() {
                "$PID".to_string()
            } else {
                a.replace(&(target_dir().display().to_string() + "/"), "target/")
            })
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// Values of "ns_per_iter X" lines.
pub(super) fn ns_per_iter(output: &str) -> Vec<f64> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("ns_per_iter "))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}
