//! `tracer diff`: what grew between two JSON reports. Stack ids are stable
//! only within one run, so stacks are matched by their symbolized frames:
//! function and module, or the address where there is no function name.

use std::{collections::HashMap, path::Path};

use anyhow::{anyhow, Context as _, Result};

use crate::report::{Report, ReportFrame, Totals};

/// Outstanding memory of a stack in one report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Amount {
    pub bytes: u64,
    pub allocations: u64,
}

/// One stack (by frames) in both reports; an amount is zero where the stack
/// is not listed.
#[derive(Clone, Debug, PartialEq)]
pub struct StackDiff {
    /// Innermost first, as in the reports (taken from the later one when
    /// both have the stack).
    pub frames: Vec<ReportFrame>,
    pub before: Amount,
    pub after: Amount,
}

impl StackDiff {
    pub fn byte_growth(&self) -> i128 {
        i128::from(self.after.bytes) - i128::from(self.before.bytes)
    }

    pub fn allocation_growth(&self) -> i128 {
        i128::from(self.after.allocations) - i128::from(self.before.allocations)
    }
}

/// What a diff says about each of its two reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Side {
    pub pid: u32,
    pub command: String,
    pub duration_s: f64,
    pub totals: Totals,
    /// Stacks listed in the report, and stacks that held memory: fewer listed
    /// means it was taken with a `--top` other than 0.
    pub listed: usize,
    pub stack_count: usize,
}

impl Side {
    fn of(report: &Report) -> Self {
        Side {
            pid: report.pid,
            command: report.command.clone(),
            duration_s: report.duration_s,
            totals: report.totals,
            listed: report.stacks.len(),
            stack_count: report.stack_count,
        }
    }

    pub fn is_partial(&self) -> bool {
        self.listed < self.stack_count
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Diff {
    pub before: Side,
    pub after: Side,
    /// Stacks whose outstanding memory changed, most grown bytes first.
    pub changed: Vec<StackDiff>,
    pub unchanged: usize,
}

/// A JSON report document, or JSON Lines (interval reports): the last line.
pub fn parse_report(text: &str) -> Result<Report, serde_json::Error> {
    match serde_json::from_str(text) {
        Ok(report) => Ok(report),
        Err(whole) => match text.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(last) if text.trim().lines().count() > 1 => serde_json::from_str(last),
            _ => Err(whole),
        },
    }
}

/// Reads a report file; the error names the file.
pub fn load(path: &Path) -> Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_report(&text).map_err(|e| {
        anyhow!(
            "{} is not a tracer JSON report (--format json): {e}",
            path.display()
        )
    })
}

type FrameKey = (String, String);

/// How a frame is recognised in another run.
fn frame_key(frame: &ReportFrame) -> FrameKey {
    let module = frame
        .module
        .as_deref()
        .map(|m| m.rsplit('/').next().unwrap_or(m).to_string())
        .unwrap_or_default();
    let what = frame
        .function
        .clone()
        .unwrap_or_else(|| frame.address.clone());
    (what, module)
}

pub fn compare(before: &Report, after: &Report) -> Diff {
    let mut by_key: HashMap<Vec<FrameKey>, StackDiff> = HashMap::new();
    for (report, is_after) in [(before, false), (after, true)] {
        for stack in &report.stacks {
            let key: Vec<FrameKey> = stack.frames.iter().map(frame_key).collect();
            let entry = by_key.entry(key).or_insert_with(|| StackDiff {
                frames: stack.frames.clone(),
                before: Amount::default(),
                after: Amount::default(),
            });
            let amount = if is_after {
                if entry.after == Amount::default() {
                    // The later report's frames (its biggest stack, if several match).
                    entry.frames = stack.frames.clone();
                }
                &mut entry.after
            } else {
                &mut entry.before
            };
            // Stacks that differ only in what the key leaves out (addresses,
            // lines) are one stack here.
            amount.bytes += stack.bytes;
            amount.allocations += stack.allocations;
        }
    }
    let total = by_key.len();
    let mut changed: Vec<(Vec<FrameKey>, StackDiff)> = by_key
        .into_iter()
        .filter(|(_, s)| s.before != s.after)
        .collect();
    changed.sort_by(|(ka, a), (kb, b)| {
        b.byte_growth()
            .cmp(&a.byte_growth())
            .then(b.allocation_growth().cmp(&a.allocation_growth()))
            .then(ka.cmp(kb))
    });
    Diff {
        before: Side::of(before),
        after: Side::of(after),
        unchanged: total - changed.len(),
        changed: changed.into_iter().map(|(_, s)| s).collect(),
    }
}

/// What makes a diff incomplete, one sentence each.
pub fn warnings(diff: &Diff) -> Vec<String> {
    [("BEFORE", &diff.before), ("AFTER", &diff.after)]
        .into_iter()
        .filter(|(_, side)| side.is_partial())
        .map(|(name, side)| {
            format!(
                "{name} lists {} of {} stacks; stacks it leaves out count as 0 (take reports with --top 0 for a complete diff)",
                side.listed, side.stack_count
            )
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::report::{AllocatorInfo, Dropped, Events, StackReport};

    fn frame(function: Option<&str>, address: &str) -> ReportFrame {
        ReportFrame {
            function: function.map(str::to_string),
            file: None,
            line: None,
            module: Some("/srv/app".into()),
            address: address.into(),
            inlined: false,
            wraps_allocator: false,
        }
    }

    fn stack(id: &str, bytes: u64, allocations: u64, frames: Vec<ReportFrame>) -> StackReport {
        StackReport {
            stack_id: id.into(),
            pid: 9,
            bytes,
            allocations,
            total_allocations: allocations,
            total_bytes: bytes,
            oldest_age_s: None,
            truncated: false,
            trend: None,
            label_frame: 0,
            frames,
        }
    }

    pub fn report(duration_s: f64, stacks: Vec<StackReport>) -> Report {
        Report {
            processes: Vec::new(),
            pid: 9,
            command: "app".into(),
            duration_s,
            min_age_s: 0.0,
            allocator: AllocatorInfo::default(),
            allocators: Vec::new(),
            mappings: Default::default(),
            unwinding: Default::default(),
            memory: Default::default(),
            totals: Totals {
                bytes: stacks.iter().map(|s| s.bytes).sum(),
                allocations: stacks.iter().map(|s| s.allocations).sum(),
            },
            stack_count: stacks.len(),
            stacks,
            dropped: Dropped::default(),
            events: Events::default(),
        }
    }

    /// Two runs of one program: other stack ids and addresses, same names.
    pub fn before_and_after() -> (Report, Report) {
        let cache = |addr: &str| vec![frame(Some("cache"), addr), frame(Some("main"), "0x2")];
        let before = report(
            10.0,
            vec![
                stack("aa", 1000, 10, cache("0x1")),
                stack("bb", 500, 1, vec![frame(Some("config"), "0x5")]),
                stack("cc", 64, 1, vec![frame(None, "0x7")]),
                stack("dd", 30, 3, vec![frame(Some("steady"), "0x8")]),
            ],
        );
        let after = report(
            20.0,
            vec![
                stack("11", 2500, 25, cache("0x91")),
                // Same function, another call site: merges with "11".
                stack("12", 100, 1, cache("0x99")),
                stack("22", 200, 1, vec![frame(Some("config"), "0x95")]),
                stack("33", 300, 3, vec![frame(Some("new_path"), "0x96")]),
                stack("44", 30, 3, vec![frame(Some("steady"), "0x98")]),
            ],
        );
        (before, after)
    }

    #[test]
    fn matches_stacks_by_names_across_runs_and_sorts_by_growth() {
        let (before, after) = before_and_after();
        let diff = compare(&before, &after);
        let summary: Vec<(String, i128)> = diff
            .changed
            .iter()
            .map(|s| {
                let name = s.frames[0]
                    .function
                    .clone()
                    .unwrap_or(s.frames[0].address.clone());
                (name, s.byte_growth())
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("cache".to_string(), 1600),
                ("new_path".to_string(), 300),
                // an unnamed frame matches only by address: gone here
                ("0x7".to_string(), -64),
                ("config".to_string(), -300),
            ]
        );
        assert_eq!(diff.changed[0].before.allocations, 10);
        assert_eq!(diff.changed[0].after.allocations, 26);
        assert_eq!(
            diff.changed[0].frames[0].address, "0x91",
            "frames of the later report"
        );
        assert_eq!(diff.unchanged, 1, "steady");
        assert!(warnings(&diff).is_empty());
    }

    #[test]
    fn partial_reports_are_warned_about() {
        let (mut before, after) = before_and_after();
        before.stack_count = 40;
        let w = warnings(&compare(&before, &after));
        assert_eq!(w.len(), 1);
        assert!(w[0].starts_with("BEFORE lists 4 of 40 stacks"), "{}", w[0]);
    }

    #[test]
    fn reads_documents_and_json_lines_and_rejects_the_rest() {
        let (before, after) = before_and_after();
        let document = crate::output::json::document(&before);
        assert_eq!(parse_report(&document).unwrap(), before);
        let lines = crate::output::json::line(&before) + &crate::output::json::line(&after) + "\n";
        assert_eq!(parse_report(&lines).unwrap(), after);
        for bad in [
            "",
            "{}",
            "[1, 2]",
            "not json",
            "{\"pid\": 1}\n{\"pid\": 2}\n",
        ] {
            assert!(parse_report(bad).is_err(), "{bad:?}");
        }
        let missing = Path::new("/nonexistent/report.json");
        assert!(load(missing)
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/report.json"));
    }
}
