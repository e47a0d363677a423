//! Brendan Gregg's collapsed ("folded") stacks: `root;...;leaf weight`, one
//! line per stack. flamegraph.pl, inferno and speedscope read it.

use std::collections::BTreeMap;

use crate::report::{Report, ReportFrame, StackReport};

/// What a flamegraph's widths measure.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weight {
    /// Outstanding bytes.
    Bytes,
    /// Outstanding allocations (blocks).
    Allocations,
}

impl Weight {
    pub fn of(self, stack: &StackReport) -> u64 {
        match self {
            Weight::Bytes => stack.bytes,
            Weight::Allocations => stack.allocations,
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Weight::Bytes => "bytes",
            Weight::Allocations => "allocations",
        }
    }
}

/// A frame's name in every flamegraph format: the function, else the module
/// and address.
pub fn frame_label(frame: &ReportFrame) -> String {
    match (&frame.function, &frame.module) {
        (Some(f), _) => f.clone(),
        (None, Some(m)) => format!("[{}+{}]", m.rsplit('/').next().unwrap_or(m), frame.address),
        (None, None) => format!("[{}]", frame.address),
    }
}

/// A frame's name in a folded line. `;` separates frames and a newline ends
/// the line, so neither may appear inside a name.
pub fn frame_name(frame: &ReportFrame) -> String {
    frame_label(frame).replace([';', '\n', '\r'], ":")
}

/// What a stack whose frames could not be recorded is called.
pub const UNKNOWN_STACK: &str = "[unknown stack]";

/// Root-first frame names of a stack.
pub fn stack_path(stack: &StackReport) -> String {
    if stack.frames.is_empty() {
        return UNKNOWN_STACK.to_string();
    }
    stack
        .frames
        .iter()
        .rev()
        .map(frame_name)
        .collect::<Vec<_>>()
        .join(";")
}

/// Folded lines, stacks with the same frame names merged, sorted.
pub fn lines(report: &Report, weight: Weight) -> Vec<String> {
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for stack in &report.stacks {
        let w = weight.of(stack);
        if w > 0 {
            *merged.entry(stack_path(stack)).or_default() += w;
        }
    }
    merged
        .into_iter()
        .map(|(path, w)| format!("{path} {w}"))
        .collect()
}

pub fn render(report: &Report, weight: Weight) -> String {
    let mut out = lines(report, weight).join("\n");
    out.push('\n');
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::report::*;

    pub fn frame(function: Option<&str>) -> ReportFrame {
        ReportFrame {
            function: function.map(str::to_string),
            file: None,
            line: None,
            module: Some("/usr/bin/app".into()),
            address: "0x10".into(),
            inlined: false,
            wraps_allocator: false,
        }
    }

    pub fn sample_report() -> Report {
        let stack = |bytes, allocations, frames: Vec<ReportFrame>| StackReport {
            stack_id: "1".into(),
            pid: 7,
            bytes,
            allocations,
            total_allocations: allocations,
            total_bytes: bytes,
            oldest_age_s: None,
            truncated: false,
            trend: None,
            label_frame: 0,
            frames,
        };
        Report {
            processes: Vec::new(),
            pid: 7,
            command: "app".into(),
            duration_s: 2.0,
            min_age_s: 0.0,
            allocator: AllocatorInfo::default(),
            allocators: Vec::new(),
            mappings: Default::default(),
            unwinding: Default::default(),
            memory: Default::default(),
            totals: Totals {
                bytes: 1300,
                allocations: 6,
            },
            stacks: vec![
                stack(1000, 4, vec![frame(Some("leak")), frame(Some("main"))]),
                stack(200, 1, vec![frame(Some("leak")), frame(Some("main"))]),
                stack(100, 1, vec![frame(None), frame(Some("a;b"))]),
                stack(0, 0, vec![frame(Some("gone"))]),
            ],
            stack_count: 3,
            dropped: Dropped::default(),
            events: Events::default(),
        }
    }

    #[test]
    fn folds_root_first_merges_and_escapes() {
        let report = sample_report();
        assert_eq!(
            lines(&report, Weight::Bytes),
            ["a:b;[app+0x10] 100", "main;leak 1200"]
        );
        assert_eq!(lines(&report, Weight::Allocations)[1], "main;leak 5");
    }
}
