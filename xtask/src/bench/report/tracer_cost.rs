//! Section 3 of BENCHMARKS.md: the tracer's own cost.

use std::fmt::Write as _;

use anyhow::Result;

use super::met;
use crate::bench::tracer_cost::{Attach, Resources, Symbolization, TracerCost};

pub(super) fn section(cost: &TracerCost, summary: &mut Vec<String>) -> Result<String> {
    let mut text = String::new();
    writeln!(text, "## 3. The tracer's own cost\n")?;
    write_resources(&mut text, summary, &cost.resources)?;
    write_symbolization(&mut text, summary, &cost.symbolization)?;
    write_attach(&mut text, summary, &cost.attach)?;
    Ok(text)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn write_resources(text: &mut String, summary: &mut Vec<String>, r: &Resources) -> Result<()> {
    let Resources {
        blocks,
        window_s,
        settle_s,
        cpu_pct,
        refresh_ms,
        final_ms,
        fill_s,
        ..
    } = r;
    writeln!(
        text,
        "`bench/fixtures/many_live.c` allocates {blocks} blocks of 32..95 bytes over 10,000 \
         distinct stacks (four levels of ten functions) and keeps them, then idles with 100 \
         malloc/free pairs a second. The tracer runs it with a report every second (text, \
         top 10). Measured over {window_s} s, {settle_s} s after the blocks are in place.\n"
    )?;
    writeln!(text, "| what | value |\n| --- | ---: |")?;
    writeln!(
        text,
        "| tracer CPU (user + system) | {cpu_pct:.1}% of one core |"
    )?;
    writeln!(
        text,
        "| tracer RSS, peak seen in the window | {:.1} MiB |",
        mib(r.rss_max_kib)
    )?;
    writeln!(
        text,
        "| tracer RSS high-water mark (whole run) | {:.1} MiB |",
        mib(r.hwm_kib)
    )?;
    writeln!(
        text,
        "| kernel memory of its BPF maps (memlock) | {:.1} MiB |",
        mib(r.maps_kib)
    )?;
    writeln!(
        text,
        "| target's RSS (for scale) | {:.1} MiB |",
        mib(r.target_rss_kib)
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
    writeln!(text, "Command: `{}`\n", r.command)?;
    summary.push(format!(
        "Tracer with {blocks} live blocks over 10,000 stacks, 1 s refresh: {cpu_pct:.1}% CPU \
         (target ≤ 3%: {}), RSS high-water {:.1} MiB (target ≤ 64 MiB: {}).",
        met(*cpu_pct <= 3.0),
        mib(r.hwm_kib),
        met(r.hwm_kib <= 64 * 1024)
    ));
    Ok(())
}

fn write_symbolization(
    text: &mut String,
    summary: &mut Vec<String>,
    s: &Symbolization,
) -> Result<()> {
    let Symbolization {
        report_ms,
        stacks,
        command,
    } = s;
    writeln!(
        text,
        "Symbolizing every stack of a final report: **{report_ms:.0} ms** for {stacks} stacks \
         (blazesym, DWARF line info, cold caches). Command: `{command}`\n"
    )?;
    summary.push(format!(
        "Symbolizing {stacks} stacks takes {report_ms:.0} ms."
    ));
    Ok(())
}

fn write_attach(text: &mut String, summary: &mut Vec<String>, a: &Attach) -> Result<()> {
    let Attach {
        median_ms,
        runs,
        median_breakdown,
        command,
    } = a;
    writeln!(
        text,
        "Start to attached (`tracer report --pid` on a running process, from spawning the \
         tracer to its \"attached\" line; median of {runs}): **{median_ms:.0} ms**. The tracer's own \
         breakdown of the median run: {median_breakdown}. Command: `{command}`\n"
    )?;
    summary.push(format!("Start to attached: {median_ms:.0} ms."));
    Ok(())
}
