//! Part 4: the malloc/free loop (bench/fixtures/malloc_loop.c) under each
//! allocator the tracer supports: glibc, musl (the loop built with
//! musl-gcc), and jemalloc, tcmalloc (minimal and full) and mimalloc
//! preloaded. Untraced, no-op programs at the tracer's places (the floor),
//! exact, and sampled every 512 KiB.

use std::{path::Path, process::Stdio};

use anyhow::{bail, Result};

use super::{
    command_line::shown, fixtures::Fixtures, malloc_loop::ns_per_iter, options::Sizes,
    process::reap_detachers,
};
use crate::cmd;

const LIBDIR: &str = "/usr/lib/x86_64-linux-gnu";

/// The allocators: a name and the library preloaded (None: the loop's own
/// C library). musl is the loop built against musl instead.
pub const ALLOCATORS: [(&str, Option<&str>); 6] = [
    ("glibc", None),
    ("musl", None),
    ("jemalloc", Some("libjemalloc.so.2")),
    ("tcmalloc (minimal)", Some("libtcmalloc_minimal.so.4")),
    ("tcmalloc (full)", Some("libtcmalloc.so.4")),
    ("mimalloc", Some("libmimalloc.so.2")),
];

/// The variants, by position: untraced first; the report reads them so.
pub const MODES: [(&str, Option<&[&str]>); 4] = [
    ("untraced", None),
    ("no-op programs (floor)", Some(&["--noop-probes"])),
    ("exact", Some(&[])),
    ("sampled every 512 KiB", Some(&["--sample-rate", "512k"])),
];

pub struct AllocatorResults {
    /// The allocators measured (a missing library or musl-gcc leaves one
    /// out), by name.
    pub allocators: Vec<&'static str>,
    /// [allocator][mode]: ns per iteration of every timed round.
    pub rounds: Vec<Vec<Vec<f64>>>,
    /// One command per mode, for the first allocator preloaded, as an example.
    pub commands: Vec<String>,
}

/// Runs every allocator under every variant `sizes.reps` times, interleaved.
pub fn measure(tracer: &Path, fixtures: &Fixtures, sizes: &Sizes) -> Result<AllocatorResults> {
    let loop_args = vec![
        sizes.loop_iterations.to_string(),
        sizes.loop_rounds.to_string(),
    ];
    let available: Vec<(&'static str, &Path, Option<String>)> = ALLOCATORS
        .iter()
        .filter_map(|(name, preload)| {
            let program = if *name == "musl" {
                fixtures.malloc_loop_musl.as_deref()?
            } else {
                fixtures.malloc_loop.as_path()
            };
            let preload = preload.map(|lib| format!("{LIBDIR}/{lib}"));
            if preload.as_ref().is_some_and(|p| !Path::new(p).exists()) {
                println!("bench: allocators: {name} left out: {} missing", preload?);
                return None;
            }
            Some((*name, program, preload))
        })
        .collect();
    let mut rounds = vec![vec![Vec::new(); MODES.len()]; available.len()];
    let mut commands = Vec::new();
    for rep in 0..sizes.reps {
        for (a, (name, program, preload)) in available.iter().enumerate() {
            for (m, (mode, extra)) in MODES.iter().enumerate() {
                println!(
                    "bench: allocators {}/{}: {name}, {mode}",
                    rep + 1,
                    sizes.reps
                );
                let (values, command) =
                    run(tracer, program, preload.as_deref(), *extra, &loop_args)?;
                rounds[a][m].extend(values);
                if rep == 0 && *name == "jemalloc" {
                    commands.push(format!("{mode}: `{command}`"));
                }
            }
        }
    }
    Ok(AllocatorResults {
        allocators: available.iter().map(|(n, _, _)| *n).collect(),
        rounds,
        commands,
    })
}

/// The loop once, untraced (`extra` None) or under `tracer run` with the
/// `extra` options; `preload` is set for both the tracer and the loop
/// (the tracer passes its environment on).
fn run(
    tracer: &Path,
    program: &Path,
    preload: Option<&str>,
    extra: Option<&[&str]>,
    loop_args: &[String],
) -> Result<(Vec<f64>, String)> {
    let (exe, args): (&Path, Vec<String>) = match extra {
        None => (program, loop_args.to_vec()),
        Some(extra) => {
            let mut args: Vec<String> = vec!["run".into(), "-o".into(), "/dev/null".into()];
            args.extend(extra.iter().map(|s| s.to_string()));
            args.push("--".into());
            args.push(program.display().to_string());
            args.extend(loop_args.iter().cloned());
            (tracer, args)
        }
    };
    let mut command = cmd(exe);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(lib) = preload {
        command.env("LD_PRELOAD", lib);
    }
    let out = command.output()?;
    reap_detachers();
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            exe.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let shown = shown(exe, &args);
    let shown = match preload {
        Some(lib) => format!("LD_PRELOAD={lib} {shown}"),
        None => shown,
    };
    Ok((ns_per_iter(&String::from_utf8_lossy(&out.stdout)), shown))
}
