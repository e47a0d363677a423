//! Section 1 of BENCHMARKS.md: the malloc/free loop, and the comparisons
//! between its variants.

use std::fmt::Write as _;

use anyhow::Result;

use super::{met, write_commands};
use crate::bench::{
    malloc_loop::LoopResults,
    options::Sizes,
    stats::{median, min_max},
};

/// Each variant's cost per malloc/free pair: its median minus the untraced
/// (first) variant's.
struct Added<'a> {
    results: &'a LoopResults,
    medians: Vec<f64>,
}

impl Added<'_> {
    fn of(&self, name: &str) -> Option<f64> {
        self.results
            .position(name)
            .map(|i| self.medians[i] - self.medians[0])
    }
}

pub(super) fn section(
    results: &LoopResults,
    sizes: &Sizes,
    summary: &mut Vec<String>,
) -> Result<String> {
    let mut text = String::new();
    write_intro(&mut text, sizes)?;
    let added = Added {
        results,
        medians: write_table(&mut text, results)?,
    };
    writeln!(text)?;
    // The uprobe sessions subsection, after the commands.
    let mut sessions = String::new();
    if let (Some(tracer), Some(floor)) = (added.of("tracer"), added.of("no-op programs (floor)")) {
        write_comparisons(&mut text, &mut sessions, summary, &added, tracer, floor)?;
    }
    writeln!(text)?;
    write_commands(&mut text, "Commands (one process each):", &results.commands)?;
    if !sessions.is_empty() {
        writeln!(text, "{sessions}\n")?;
    }
    Ok(text)
}

fn write_intro(text: &mut String, sizes: &Sizes) -> Result<()> {
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
    Ok(())
}

/// One row per variant; returns the variants' medians.
fn write_table(text: &mut String, results: &LoopResults) -> Result<Vec<f64>> {
    writeln!(
        text,
        "| variant | ns per iteration (median) | added per malloc/free pair | min .. max |"
    )?;
    writeln!(text, "| --- | ---: | ---: | ---: |")?;
    let mut medians: Vec<f64> = Vec::new();
    for (i, mode) in results.modes.iter().enumerate() {
        let values = &results.rounds[i];
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
    Ok(medians)
}

/// The paragraphs comparing the tracer (`tracer` ns per pair) with the
/// floor and with its other variants; the uprobe sessions subsection goes
/// to `sessions`.
fn write_comparisons(
    text: &mut String,
    sessions: &mut String,
    summary: &mut Vec<String>,
    added: &Added,
    tracer: f64,
    floor: f64,
) -> Result<()> {
    write_against_floor(text, summary, tracer, floor)?;
    if let Some(no_stacks) = added.of("tracer without stacks") {
        write_stack_capture(text, summary, tracer, no_stacks)?;
    }
    if let Some(fp) = added.of("tracer, --unwind fp") {
        write_cfi(text, summary, "", tracer, fp)?;
    }
    if let (Some(deep), Some(deep_fp)) = (
        added.of("tracer, 30 frames"),
        added.of("tracer, --unwind fp, 30 frames"),
    ) {
        write_cfi(text, summary, " at 30 frames", deep, deep_fp)?;
    }
    if let (Some(at_entry), Some(floor_at_entry)) = (
        added.of("tracer, free probed at its entry"),
        added.of("no-op programs, free probed at its entry"),
    ) {
        write_placement(text, summary, tracer, at_entry, floor_at_entry)?;
    }
    if let Some(sampled) = added.of("tracer, sampling every 512 KiB") {
        write_sampling(text, summary, sampled)?;
        write_sessions(sessions, summary, added, tracer, sampled)?;
    }
    if let Some(peer) = added.of("bpftrace peer") {
        write_peer(text, summary, tracer, peer)?;
    }
    Ok(())
}

fn write_against_floor(
    text: &mut String,
    summary: &mut Vec<String>,
    tracer_added: f64,
    floor: f64,
) -> Result<()> {
    let ratio = tracer_added / floor;
    writeln!(
        text,
        "Tracer / floor: **{ratio:.2}×** ({tracer_added:.0} ns against {floor:.0} ns per pair). \
         The tracer's own programs account for the difference, {:.0} ns.",
        tracer_added - floor
    )?;
    summary.push(format!(
        "Exact mode adds **{tracer_added:.0} ns** per malloc/free pair (target ≤ 3,000 ns: {}); \
         the floor of any uprobe tool at the same addresses is {floor:.0} ns (ratio {ratio:.2}).",
        met(tracer_added <= 3000.0)
    ));
    Ok(())
}

fn write_stack_capture(
    text: &mut String,
    summary: &mut Vec<String>,
    tracer_added: f64,
    no_stacks: f64,
) -> Result<()> {
    writeln!(
        text,
        "\nStack capture: {:.0} ns per allocation (tracer minus tracer without stacks).",
        tracer_added - no_stacks
    )?;
    summary.push(format!(
        "Stack capture costs {:.0} ns per allocation (the loop's stacks are 5 frames deep).",
        tracer_added - no_stacks
    ));
    Ok(())
}

/// CFI unwinding (the default) against `--unwind fp`, ns added per pair.
fn write_cfi(
    text: &mut String,
    summary: &mut Vec<String>,
    depth: &str,
    cfi: f64,
    fp: f64,
) -> Result<()> {
    let extra = cfi - fp;
    writeln!(
        text,
        "\nCFI unwinding (the default){depth}: {cfi:.0} ns per pair, {extra:+.0} ns against \
         `--unwind fp` ({fp:.0} ns)."
    )?;
    summary.push(format!(
        "CFI unwinding{depth} adds {extra:+.0} ns per pair over `--unwind fp` (target ≤ 300 ns: {}).",
        met(extra <= 300.0)
    ));
    Ok(())
}

fn write_placement(
    text: &mut String,
    summary: &mut Vec<String>,
    tracer_added: f64,
    at_entry: f64,
    floor_at_entry: f64,
) -> Result<()> {
    writeln!(
        text,
        "\nProbe placement: with `free` probed at its entry (the `test rdi,rdi` of its NULL \
         guard is single-stepped) instead of on the guard's `je` (emulated; `--entry-probes` \
         keeps every probe at its entry, and glibc's other functions start with an emulated \
         `push`), the tracer \
         adds {at_entry:.0} ns and the floor is {floor_at_entry:.0} ns: placement saves \
         {:.0} ns per pair.",
        at_entry - tracer_added
    )?;
    summary.push(format!(
        "Probing glibc's `free` on its NULL guard's `je` saves {:.0} ns per pair \
         ({at_entry:.0} ns at its entry).",
        at_entry - tracer_added
    ));
    Ok(())
}

fn write_sampling(text: &mut String, summary: &mut Vec<String>, sampled: f64) -> Result<()> {
    writeln!(
        text,
        "\nSampling (`--sample-rate 512k`): {sampled:.0} ns per pair; most calls are not \
         sampled and skip the stack walk and the maps."
    )?;
    summary.push(format!(
        "With `--sample-rate 512k`: {sampled:.0} ns per pair."
    ));
    Ok(())
}

/// The uprobe sessions subsection: sessions against uprobe+uretprobe under
/// sampling (`sampled` ns per pair), and in exact mode.
fn write_sessions(
    sessions: &mut String,
    summary: &mut Vec<String>,
    added: &Added,
    tracer_added: f64,
    sampled: f64,
) -> Result<()> {
    if let (Some(classic), Some(session_floor), Some(classic_floor)) = (
        added.of("tracer, sampling every 512 KiB, uprobe+uretprobe"),
        added.of("no-op session programs, no return (sampled floor)"),
        added.of("no-op programs (floor)"),
    ) {
        write!(
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
        )?;
        summary.push(format!(
            "Uprobe sessions save {:.0} ns per pair under sampling ({sampled:.0} against \
             {classic:.0} ns with uprobe+uretprobe; their floor {session_floor:.0} ns).",
            classic - sampled
        ));
    }
    if let Some(exact_sessions) = added.of("tracer, uprobe sessions in exact mode") {
        write!(
            sessions,
            " In exact mode every return is needed; with sessions anyway \
             (`--uprobe-sessions always`, hidden) the tracer adds {exact_sessions:.0} ns \
             per pair, {:+.0} ns against uprobe+uretprobe (which exact mode uses).",
            exact_sessions - tracer_added
        )?;
    }
    Ok(())
}

fn write_peer(
    text: &mut String,
    summary: &mut Vec<String>,
    tracer_added: f64,
    peer: f64,
) -> Result<()> {
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
    Ok(())
}
