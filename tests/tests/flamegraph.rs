//! Flamegraph formats checked with readers the project did not write:
//! inferno parses the folded output, roxmltree parses the SVG.

use tracer_tests::*;

/// `tracer SUBCOMMAND [options] --output OUT -- leaky_c`.
fn trace(subcommand: &str, options: &[&str], out: &std::path::Path) {
    require_root();
    let status = TracerCmd::new(subcommand)
        .args(options)
        .output_file(out)
        .command(fixture("leaky_c"))
        .output()
        .status;
    assert!(status.success());
}

#[test]
fn folded_output_is_exact_and_inferno_reads_it() {
    let path = temp_path("leaky.folded");
    trace("run", &["--format", "folded"], &path);
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains(";leak_malloc "))
        .unwrap_or_else(|| panic!("no leak_malloc line in:\n{text}"));
    assert!(
        line.ends_with(";main;leak_malloc 1000"),
        "root first, leaf last, bytes: {line}"
    );
    assert!(!text.contains("churn"));
    let mut svg = Vec::new();
    let mut options = inferno::flamegraph::Options::default();
    inferno::flamegraph::from_lines(&mut options, text.lines(), &mut svg)
        .expect("inferno accepts it");
    assert!(String::from_utf8_lossy(&svg).contains("leak_malloc"));

    let by_blocks = temp_path("leaky-blocks.folded");
    trace(
        "run",
        &["--format", "folded", "--weight", "allocations"],
        &by_blocks,
    );
    let text = std::fs::read_to_string(&by_blocks).unwrap();
    assert!(
        text.lines().any(|l| l.ends_with(";main;leak_malloc 10")),
        "{text}"
    );
}

#[test]
fn flamegraph_svg_is_xml_naming_the_leak() {
    let path = temp_path("leaky.svg");
    trace("flamegraph", &[], &path);
    let svg = std::fs::read_to_string(&path).unwrap();
    let titles = svg_titles(&svg);
    assert!(
        titles
            .iter()
            .any(|t| t.starts_with("leak_malloc (1,000 bytes")),
        "no leak_malloc frame with its bytes among {titles:?}"
    );
    assert!(
        svg.contains("Unfreed memory: pid"),
        "title names the process"
    );
}
