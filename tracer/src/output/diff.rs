//! Renderings of a `Diff`: text, differential folded stacks
//! (`stack before after`, what flamegraph.pl and inferno read as a
//! differential flamegraph) and that flamegraph as SVG.

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::Result;
use inferno::flamegraph::Options;

use super::{
    folded::{self, Weight},
    text,
};
use crate::{
    report::diff::{Amount, Diff, Side},
    report::StackReport,
};

pub fn render_text(diff: &Diff, top: usize) -> String {
    let mut out = String::new();
    let side = |name: &str, s: &Side| {
        format!(
            "{name} pid {} ({}), {:.1}s after attach: {} in {} allocations outstanding\n",
            s.pid,
            s.command,
            s.duration_s,
            text::bytes(s.totals.bytes),
            s.totals.allocations
        )
    };
    out.push_str(&side("before:", &diff.before));
    out.push_str(&side("after: ", &diff.after));
    let grew = diff.changed.iter().filter(|s| s.byte_growth() > 0).count();
    let _ = writeln!(
        out,
        "change: {}, {} allocations; {grew} stack{} grew, {} shrank, {} unchanged",
        signed_bytes(i128::from(diff.after.totals.bytes) - i128::from(diff.before.totals.bytes)),
        signed(
            i128::from(diff.after.totals.allocations) - i128::from(diff.before.totals.allocations)
        ),
        if grew == 1 { "" } else { "s" },
        diff.changed.len() - grew,
        diff.unchanged
    );
    let shown = if top == 0 {
        diff.changed.len()
    } else {
        top.min(diff.changed.len())
    };
    if shown < diff.changed.len() {
        let _ = writeln!(
            out,
            "top {shown} of {} changed stacks by growth:",
            diff.changed.len()
        );
    }
    for s in &diff.changed[..shown] {
        let _ = writeln!(
            out,
            "\n  {}, {} allocations ({} -> {} bytes, {} -> {} allocations)",
            signed_bytes(s.byte_growth()),
            signed(s.allocation_growth()),
            s.before.bytes,
            s.after.bytes,
            s.before.allocations,
            s.after.allocations
        );
        if s.frames.is_empty() {
            let _ = writeln!(out, "      {}", folded::UNKNOWN_STACK);
        }
        for frame in &s.frames {
            let _ = writeln!(out, "      {}", text::frame_line(frame));
        }
    }
    out.push('\n');
    out
}

fn signed(n: i128) -> String {
    if n > 0 {
        format!("+{n}")
    } else {
        n.to_string()
    }
}

fn signed_bytes(n: i128) -> String {
    let sign = if n > 0 {
        "+"
    } else if n < 0 {
        "-"
    } else {
        ""
    };
    format!("{sign}{}", text::bytes(n.unsigned_abs() as u64))
}

fn weight_of(weight: Weight, amount: Amount) -> u64 {
    match weight {
        Weight::Bytes => amount.bytes,
        Weight::Allocations => amount.allocations,
    }
}

/// `root;...;leaf before after`, merged by frame names, sorted.
pub fn folded_lines(diff: &Diff, weight: Weight) -> Vec<String> {
    let mut merged: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for s in &diff.changed {
        let path = folded::stack_path(&StackReport {
            stack_id: String::new(),
            pid: 0,
            bytes: 0,
            allocations: 0,
            total_allocations: 0,
            total_bytes: 0,
            oldest_age_s: None,
            truncated: false,
            trend: None,
            label_frame: 0,
            frames: s.frames.clone(),
        });
        let entry = merged.entry(path).or_default();
        entry.0 += weight_of(weight, s.before);
        entry.1 += weight_of(weight, s.after);
    }
    merged
        .into_iter()
        .filter(|(_, (before, after))| before != after)
        .map(|(path, (before, after))| format!("{path} {before} {after}"))
        .collect()
}

pub fn render_folded(diff: &Diff, weight: Weight) -> String {
    let mut out = folded_lines(diff, weight).join("\n");
    out.push('\n');
    out
}

/// A differential flamegraph: widths are the later report's, red frames
/// grew and blue ones shrank. Stacks that did not change are left out, so
/// the picture is of the change.
pub fn render_svg(diff: &Diff, weight: Weight) -> Result<Vec<u8>> {
    let lines = folded_lines(diff, weight);
    let mut options = Options::default();
    options.title = format!(
        "Growth of unfreed memory: pid {} ({}), {:.1}s -> {:.1}s after attach",
        diff.after.pid, diff.after.command, diff.before.duration_s, diff.after.duration_s
    );
    options.subtitle = Some(format!(
        "outstanding {} -> {} bytes; width = {} in the later report, red grew, blue shrank",
        diff.before.totals.bytes,
        diff.after.totals.bytes,
        weight.unit()
    ));
    options.count_name = weight.unit().to_string();
    // Nothing has width when nothing changed or stacks only shrank.
    super::flamegraph::draw(&mut options, &lines, "[no growth] 0 1", "no stack grew")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::diff::{compare, tests::before_and_after};

    #[test]
    fn text_lists_growth_first_with_frames() {
        let (before, after) = before_and_after();
        let text = render_text(&compare(&before, &after), 2);
        assert!(
            text.contains(
                "change: +1536 bytes, +18 allocations; 2 stacks grew, 2 shrank, 1 unchanged"
            ),
            "{text}"
        );
        assert!(
            text.contains("top 2 of 4 changed stacks by growth:"),
            "{text}"
        );
        let cache = text
            .find("+1600 bytes, +16 allocations (1000 -> 2600 bytes")
            .unwrap();
        let new_path = text.find("+300 bytes").unwrap();
        assert!(cache < new_path, "{text}");
        assert!(text.contains("      cache [app]"), "{text}");
        assert!(!text.contains("config"), "only the top 2: {text}");
    }

    #[test]
    fn folded_has_before_and_after_columns() {
        let (before, after) = before_and_after();
        let diff = compare(&before, &after);
        assert_eq!(
            folded_lines(&diff, Weight::Bytes),
            [
                "[app+0x7] 64 0",
                "config 500 200",
                "main;cache 1000 2600",
                "new_path 0 300"
            ]
        );
        assert!(folded_lines(&diff, Weight::Allocations).contains(&"main;cache 10 26".to_string()));
    }

    #[test]
    fn svg_is_differential_and_never_fails_on_no_growth() {
        let (before, after) = before_and_after();
        let svg = String::from_utf8(render_svg(&compare(&before, &after), Weight::Bytes).unwrap())
            .unwrap();
        assert!(svg.contains("cache") && svg.contains("Growth of unfreed memory"));
        let same = render_svg(&compare(&before, &before), Weight::Bytes).unwrap();
        assert!(String::from_utf8(same).unwrap().contains("no growth"));
    }
}
