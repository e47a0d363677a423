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
    let mut svg = Vec::new();
    if lines.is_empty() {
        // inferno refuses empty input; an empty graph still says what was traced.
        let placeholder = ["[no outstanding memory] 0"];
        options.subtitle = Some("no outstanding memory".to_string());
        let _ = flamegraph::from_lines(&mut options, placeholder, &mut svg);
        if !svg.is_empty() {
            return Ok(svg);
        }
    }
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut svg)
        .context("drawing the flamegraph")?;
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
        let svg = render(&report, Weight::Bytes).unwrap();
        assert!(!svg.is_empty());
    }
}
