//! Interactive flamegraph SVG of outstanding memory, drawn by inferno.

use anyhow::{Context as _, Result};
use inferno::flamegraph::{self, color::BasicPalette, Options, Palette};

use super::folded::{self, Weight};
use crate::report::Report;

pub fn render(report: &Report, weight: Weight) -> Result<Vec<u8>> {
    let lines = folded::lines(report, weight);
    let mut options = Options::default();
    options.title = format!(
        "Unfreed memory: pid {} ({}), {:.1}s after attach",
        report.pid, report.command, report.duration_s
    );
    options.subtitle = Some(format!(
        "{} bytes in {} allocations outstanding; width = {}",
        report.totals.bytes,
        report.totals.allocations,
        weight.unit()
    ));
    options.count_name = weight.unit().to_string();
    options.colors = Palette::Basic(BasicPalette::Mem);
    draw(
        &mut options,
        &lines,
        "[no outstanding memory] 1",
        "no outstanding memory",
    )
}

/// Draws folded `lines` (`stack weight`, or `stack before after` for a
/// differential graph) with inferno. inferno refuses a graph where nothing
/// has width (it writes an "ERROR: No valid input" SVG), so then one frame,
/// `placeholder` (a line of the same format with width 1), is drawn
/// instead, with `why` as the subtitle: an empty graph still says what was
/// traced.
pub(super) fn draw(
    options: &mut Options,
    lines: &[String],
    placeholder: &str,
    why: &str,
) -> Result<Vec<u8>> {
    let mut svg = Vec::new();
    let no_width = lines.iter().all(|l| l.ends_with(" 0"));
    let drawn = if no_width {
        options.subtitle = Some(why.to_string());
        flamegraph::from_lines(options, [placeholder], &mut svg)
    } else {
        flamegraph::from_lines(options, lines.iter().map(String::as_str), &mut svg)
    };
    drawn.context("drawing the flamegraph")?;
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::folded::tests::sample_report;

    #[test]
    fn svg_names_the_leaking_function_and_the_process() {
        let svg = String::from_utf8(render(&sample_report(), Weight::Bytes).unwrap()).unwrap();
        assert!(svg.starts_with("<?xml"), "{}", &svg[..80]);
        assert!(svg.contains("leak"));
        assert!(svg.contains("pid 7 (app)"));
        assert!(
            svg.contains("1,200 bytes") || svg.contains("1200 bytes"),
            "counts in bytes"
        );
    }

    #[test]
    fn empty_report_still_makes_an_svg() {
        let mut report = sample_report();
        report.stacks.clear();
        let svg = String::from_utf8(render(&report, Weight::Bytes).unwrap()).unwrap();
        assert!(svg.contains("no outstanding memory"), "{svg}");
        assert!(svg.contains("pid 7 (app)"), "{svg}");
        assert!(!svg.contains("ERROR"), "inferno's error picture: {svg}");
    }
}
