//! Sections 4 and 5 of BENCHMARKS.md: the loop under each allocator, and
//! redis-server (jemalloc) under its own benchmark client.

use std::fmt::Write as _;

use anyhow::Result;

use super::{met, write_commands};
use crate::bench::{
    allocators::{AllocatorResults, MODES},
    options::Sizes,
    redis::{self, RedisResults},
    stats::median,
};

pub(super) fn section(
    results: &AllocatorResults,
    sizes: &Sizes,
    summary: &mut Vec<String>,
) -> Result<String> {
    let mut text = String::new();
    writeln!(text, "## 5. malloc/free loop under each allocator\n")?;
    writeln!(
        text,
        "The loop of section 1 ({} iterations x {} rounds per process, {} processes per \
         variant, interleaved), its `malloc` and `free` from another allocator: musl is the \
         loop built with `musl-gcc`; jemalloc, tcmalloc and mimalloc are Debian 12's, \
         preloaded (`LD_PRELOAD`). Each probe sits on the first instruction of its function \
         that the kernel emulates (`tracer/src/target/placement.rs`; `-v` lists them). \
         Median ns per iteration; added = median minus the same allocator's untraced \
         median.\n",
        sizes.loop_iterations, sizes.loop_rounds, sizes.reps
    )?;
    writeln!(
        text,
        "| allocator | untraced | no-op floor (added) | exact (added) | sampled 512 KiB (added) |"
    )?;
    writeln!(text, "| --- | ---: | ---: | ---: | ---: |")?;
    // [allocator] -> added ns per mode (index into MODES).
    let mut added: Vec<Vec<f64>> = Vec::new();
    for (a, name) in results.allocators.iter().enumerate() {
        let medians: Vec<f64> = results.rounds[a].iter().map(|r| median(r)).collect();
        let plus: Vec<f64> = medians.iter().map(|m| m - medians[0]).collect();
        write!(text, "| {name} | {:.0} |", medians[0])?;
        for m in 1..MODES.len() {
            write!(text, " {:.0} ({:+.0}) |", medians[m], plus[m])?;
        }
        writeln!(text)?;
        added.push(plus);
    }
    writeln!(text)?;
    let glibc = results.allocators.iter().position(|n| *n == "glibc");
    if let Some(g) = glibc {
        writeln!(
            text,
            "Target: every allocator's added cost per pair within 1.25x glibc's, exact and \
             sampled.\n"
        )?;
        writeln!(text, "| allocator | exact / glibc's | sampled / glibc's |")?;
        writeln!(text, "| --- | ---: | ---: |")?;
        let (mut worst_exact, mut worst_sampled) = (0f64, 0f64);
        for (a, name) in results.allocators.iter().enumerate() {
            let exact = added[a][2] / added[g][2];
            let sampled = added[a][3] / added[g][3];
            worst_exact = worst_exact.max(exact);
            worst_sampled = worst_sampled.max(sampled);
            writeln!(text, "| {name} | {exact:.2}x | {sampled:.2}x |")?;
        }
        writeln!(text)?;
        summary.push(format!(
            "Allocators (loop): added cost per malloc/free pair at most {worst_exact:.2}x \
             glibc's exact and {worst_sampled:.2}x sampled, over {} (target 1.25x: {}).",
            results.allocators.join(", "),
            met(worst_exact <= 1.25 && worst_sampled <= 1.25)
        ));
    }
    write_commands(
        &mut text,
        "Commands (jemalloc shown; the others preload their library the same way, glibc \
         none, musl runs `malloc_loop_musl`):",
        &results.commands,
    )?;
    Ok(text)
}

pub(super) fn redis_section(results: &RedisResults, summary: &mut Vec<String>) -> Result<String> {
    let mut text = String::new();
    writeln!(
        text,
        "## 6. redis-server (jemalloc) under redis-benchmark\n"
    )?;
    writeln!(
        text,
        "Debian 12's `redis-server` (linked against `libjemalloc2`: the tracer probes \
         jemalloc) driven by `redis-benchmark` on loopback: 20 connections, {} requests per \
         test, tests SET, GET, LPUSH, LPOP; requests/s is the mean over the tests; \
         \"of untraced\" against the same allocator's untraced run. The same server with \
         glibc's malloc (`LD_PRELOAD` of libc.so.6) for comparison. Server, client and \
         tracer share the same cores; variants interleaved.\n",
        results.requests
    )?;
    writeln!(text, "| variant | requests/s (median) | of untraced |")?;
    writeln!(text, "| --- | ---: | ---: |")?;
    let medians: Vec<f64> = results.rps.iter().map(|r| median(r)).collect();
    for (i, (name, _, _)) in redis::MODES.iter().enumerate() {
        // Each allocator against its own untraced run.
        writeln!(
            text,
            "| {name} | {:.0} | {:.0}% |",
            medians[i],
            medians[i] / medians[redis::baseline(i)] * 100.0
        )?;
    }
    writeln!(text)?;
    let of = |i: usize| medians[i] / medians[redis::baseline(i)] * 100.0;
    let (exact, exact_fp, sampled) = (of(redis::EXACT), of(redis::EXACT_FP), of(redis::SAMPLED));
    let (floor, floor_sampled) = (of(redis::NOOP), of(redis::NOOP_SAMPLED));
    let (glibc_exact, glibc_sampled) = (of(redis::GLIBC_EXACT), of(redis::GLIBC_SAMPLED));
    let glibc_floor = of(redis::GLIBC_NOOP);
    // Microseconds per request above untraced: what the traps cost (the
    // no-op floor) and what the programs add on top of them.
    let us = |i: usize| 1e6 / medians[i] - 1e6 / medians[redis::baseline(i)];
    writeln!(
        text,
        "Per request, against untraced: the traps alone (no-op programs) add {:.2} µs exact and \
         {:.2} µs sampled; the tracer's programs add {:.2} µs on top of them exact with \
         `--unwind fp`, {:.2} µs exact with CFI stacks (the default), {:.2} µs sampled. The \
         no-op floor is the ceiling of any uprobe-based tool at these addresses: {floor:.0}% \
         of untraced exact, {floor_sampled:.0}% sampled.\n",
        us(redis::NOOP),
        us(redis::NOOP_SAMPLED),
        us(redis::EXACT_FP) - us(redis::NOOP),
        us(redis::EXACT) - us(redis::NOOP),
        us(redis::SAMPLED) - us(redis::NOOP_SAMPLED),
    )?;
    summary.push(format!(
        "redis-server (jemalloc): kept {exact:.0}% of its untraced requests/s traced exactly \
         ({exact_fp:.0}% with `--unwind fp`; target 50%: {}) and {sampled:.0}% sampled every \
         512 KiB (target 70%: {}); the traps alone, with no-op programs, keep {floor:.0}% \
         exact and {floor_sampled:.0}% sampled. With glibc's malloc preloaded instead: \
         {glibc_exact:.0}% and {glibc_sampled:.0}% (floor {glibc_floor:.0}%).",
        met(exact >= 50.0),
        met(sampled >= 70.0)
    ));
    write_commands(&mut text, "Commands:", &results.commands)?;
    Ok(text)
}
