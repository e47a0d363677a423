//! BENCHMARKS.md: the machine, a summary, then one section per part run.
//! Each section's writer also adds its main findings to the summary.

mod allocators;
mod http;
mod malloc_loop;
mod tracer_cost;

use std::{fmt::Write as _, time::Duration};

use anyhow::Result;

use super::{
    allocators::AllocatorResults,
    http::HttpResults,
    machine::{one_minute_load, Machine},
    malloc_loop::LoopResults,
    options::Options,
    redis::RedisResults,
    tracer_cost::TracerCost,
};

/// What the parts measured; None for a part left out by --only.
pub struct Measurements {
    pub malloc_loop: Option<LoopResults>,
    pub http: Option<HttpResults>,
    pub tracer_cost: Option<TracerCost>,
    pub allocators: Option<AllocatorResults>,
    pub redis: Option<RedisResults>,
}

/// The whole document.
pub fn document(
    options: &Options,
    machine: &Machine,
    load_after: &str,
    elapsed: Duration,
    measured: &Measurements,
) -> Result<String> {
    let mut summary: Vec<String> = Vec::new();
    let mut sections: Vec<String> = Vec::new();
    if let Some(results) = &measured.malloc_loop {
        sections.push(malloc_loop::section(results, &options.sizes, &mut summary)?);
    }
    if let Some(results) = &measured.http {
        sections.push(http::section(results, &options.sizes, &mut summary)?);
    }
    if let Some(cost) = &measured.tracer_cost {
        sections.push(tracer_cost::section(cost, &mut summary)?);
    }
    if let Some(results) = &measured.allocators {
        sections.push(allocators::section(results, &options.sizes, &mut summary)?);
    }
    if let Some(results) = &measured.redis {
        sections.push(allocators::redis_section(results, &mut summary)?);
    }
    let mut doc = String::new();
    write_header(&mut doc, options.quick)?;
    write_machine(&mut doc, machine, load_after, elapsed)?;
    write_summary(&mut doc, &summary)?;
    for section in sections {
        doc.push_str(&section);
    }
    Ok(doc)
}

fn write_header(doc: &mut String, quick: bool) -> Result<()> {
    writeln!(doc, "# Benchmarks\n")?;
    writeln!(
        doc,
        "Written by `cargo xtask bench{}` (bench harness: `xtask/src/bench/`, fixtures: \
         `bench/`). Re-run it on a quiet machine to refresh every number here.\n",
        if quick { " --quick" } else { "" }
    )?;
    Ok(())
}

/// The machine's table, and whether it was busy.
fn write_machine(
    doc: &mut String,
    machine: &Machine,
    load_after: &str,
    elapsed: Duration,
) -> Result<()> {
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
    let busy = one_minute_load(&machine.load_before) >= 0.5 || one_minute_load(load_after) >= 1.5;
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
    Ok(())
}

fn write_summary(doc: &mut String, summary: &[String]) -> Result<()> {
    if !summary.is_empty() {
        writeln!(doc, "## Summary\n")?;
        for line in summary {
            writeln!(doc, "- {line}")?;
        }
        writeln!(doc)?;
    }
    Ok(())
}

/// A section's list of the commands it ran, one item each, under `heading`.
fn write_commands(text: &mut String, heading: &str, commands: &[String]) -> Result<()> {
    writeln!(text, "{heading}\n")?;
    for c in commands {
        writeln!(text, "- {c}")?;
    }
    writeln!(text)?;
    Ok(())
}

/// "met" or, in bold, "not met", for a target.
fn met(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**not met**"
    }
}
