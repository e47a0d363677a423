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
//! 4. The loop of 1 under each allocator (glibc, musl, jemalloc, tcmalloc,
//!    mimalloc): untraced, no-op floor, exact, sampled.
//! 5. redis-server (Debian's, on jemalloc) driven by redis-benchmark:
//!    requests/s untraced, exact, sampled.
//!
//! Options: --quick (fewer and shorter runs, for trying the harness),
//! --reps N, --output PATH (default BENCHMARKS.md in the workspace root),
//! --only loop,http,tracer,allocators,redis (a subset).
//!
//! One file per job: `options` (the command line), `fixtures`, `machine`;
//! the three parts' measurements (`malloc_loop`, `http`, `tracer_cost`),
//! which `report` writes up; `stats`, `process` and `procfs` helpers, and
//! `command_line` for showing the commands run.

mod allocators;
mod command_line;
mod fixtures;
mod http;
mod machine;
mod malloc_loop;
mod options;
mod process;
mod procfs;
mod redis;
mod report;
mod stats;
mod tracer_cost;

use std::{ffi::OsString, fs, time::Instant};

use anyhow::{Context, Result};

use self::{fixtures::Fixtures, machine::Machine, report::Measurements};
use crate::{build, setup, target_dir};

/// Debian packages only the benchmark needs (not CI).
const BENCH_PACKAGES: &[&str] = &[
    "gcc",
    "bpftrace",
    "wrk",
    "musl-tools",
    "libjemalloc2",
    "libtcmalloc-minimal4",
    "libgoogle-perftools4",
    "libmimalloc2.0",
    "redis-server",
    "redis-tools",
];

pub fn run(args: &[OsString]) -> Result<()> {
    let options = options::parse(args)?;
    process::become_subreaper();
    let tracer = build(&[])?;
    setup::apt_install(BENCH_PACKAGES)?;
    let dir = target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let fixtures = Fixtures::compile(&dir)?;
    let sizes = &options.sizes;

    let machine = Machine::now();
    let started = Instant::now();
    let measured = Measurements {
        malloc_loop: options
            .wants("loop")
            .then(|| malloc_loop::measure(&tracer, &fixtures, sizes, &dir))
            .transpose()?,
        http: options
            .wants("http")
            .then(|| http::measure(&tracer, &fixtures, sizes))
            .transpose()?,
        tracer_cost: options
            .wants("tracer")
            .then(|| tracer_cost::measure(&tracer, &fixtures, sizes, &dir))
            .transpose()?,
        allocators: options
            .wants("allocators")
            .then(|| allocators::measure(&tracer, &fixtures, sizes))
            .transpose()?,
        redis: if options.wants("redis") {
            redis::measure(&tracer, sizes)?
        } else {
            None
        },
    };
    let load_after = machine::loadavg();
    let elapsed = started.elapsed();

    let doc = report::document(&options, &machine, &load_after, elapsed, &measured)?;
    fs::write(&options.output, &doc)
        .with_context(|| format!("writing {}", options.output.display()))?;
    println!("{doc}");
    println!("bench: wrote {}", options.output.display());
    Ok(())
}
