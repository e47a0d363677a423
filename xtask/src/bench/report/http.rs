//! Section 2 of BENCHMARKS.md: the HTTP server under load.

use std::fmt::Write as _;

use anyhow::Result;

use super::write_commands;
use crate::bench::{
    http::{HttpResults, MODES},
    options::Sizes,
    stats::{median, min_max},
};

pub(super) fn section(
    results: &HttpResults,
    sizes: &Sizes,
    summary: &mut Vec<String>,
) -> Result<String> {
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
    write_table(&mut text, results)?;
    write_changes(&mut text, summary, results)?;
    write_commands(&mut text, "Commands:", &results.commands)?;
    Ok(text)
}

fn write_table(text: &mut String, results: &HttpResults) -> Result<()> {
    writeln!(text, "| variant | requests/s (median) | min .. max |")?;
    writeln!(text, "| --- | ---: | ---: |")?;
    for (i, (name, _)) in MODES.iter().enumerate() {
        let (lo, hi) = min_max(&results.rps[i]);
        let m = median(&results.rps[i]);
        writeln!(text, "| {name} | {m:.0} | {lo:.0} .. {hi:.0} |")?;
    }
    Ok(())
}

/// Throughput of the traced variants against untraced.
fn write_changes(
    text: &mut String,
    summary: &mut Vec<String>,
    results: &HttpResults,
) -> Result<()> {
    // In the order of MODES.
    let [untraced, traced, sampled, classic] = [0, 1, 2, 3].map(|i| median(&results.rps[i]));
    let change = (traced / untraced - 1.0) * 100.0;
    let sampled_change = (sampled / untraced - 1.0) * 100.0;
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
    Ok(())
}
