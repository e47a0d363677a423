//! speedscope's own JSON file format
//! (https://www.speedscope.app/file-format-schema.json): one "sampled"
//! profile whose samples are stacks (root first) weighted by outstanding
//! bytes or blocks. Unlike folded stacks it keeps each frame's file and line.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::folded::{frame_label, Weight, UNKNOWN_STACK};
use crate::report::{Report, ReportFrame};

pub const SCHEMA: &str = "https://www.speedscope.app/file-format-schema.json";

pub fn render(report: &Report, weight: Weight) -> String {
    let mut frames = Frames::default();
    let mut samples = Vec::new();
    let mut weights = Vec::new();
    for stack in &report.stacks {
        let w = weight.of(stack);
        if w == 0 {
            continue;
        }
        let sample: Vec<usize> = if stack.frames.is_empty() {
            vec![frames.index(UNKNOWN_STACK.to_string(), None)]
        } else {
            stack.frames.iter().rev().map(|f| frames.of(f)).collect()
        };
        samples.push(sample);
        weights.push(w);
    }
    let total: u64 = weights.iter().sum();
    let (unit, what) = match weight {
        Weight::Bytes => ("bytes", "bytes"),
        // speedscope has no unit for counts.
        Weight::Allocations => ("none", "allocations"),
    };
    let document = json!({
        "$schema": SCHEMA,
        "name": format!("pid {} ({})", report.pid, report.command),
        "exporter": concat!("tracer ", env!("CARGO_PKG_VERSION")),
        "activeProfileIndex": 0,
        "shared": { "frames": frames.to_json() },
        "profiles": [{
            "type": "sampled",
            "name": format!(
                "Unfreed memory ({what}), {:.1}s after attach",
                report.duration_s
            ),
            "unit": unit,
            "startValue": 0,
            "endValue": total,
            "samples": samples,
            "weights": weights,
        }],
    });
    let mut text = document.to_string();
    text.push('\n');
    text
}

/// The shared frame table: one entry per function (name and file), so that
/// speedscope merges a function's calls. A frame's line is where its stacks
/// call or allocate; it is kept only when all of them agree on it.
#[derive(Default)]
struct Frames {
    list: Vec<(String, Option<String>, LineSeen)>,
    index: HashMap<(String, Option<String>), usize>,
}

#[derive(Clone, Copy, PartialEq)]
enum LineSeen {
    Unseen,
    One(Option<u32>),
    Several,
}

impl Frames {
    fn of(&mut self, frame: &ReportFrame) -> usize {
        let i = self.index(frame_label(frame), frame.file.clone());
        let seen = &mut self.list[i].2;
        *seen = match *seen {
            LineSeen::Unseen => LineSeen::One(frame.line),
            LineSeen::One(line) if line == frame.line => LineSeen::One(line),
            _ => LineSeen::Several,
        };
        i
    }

    fn index(&mut self, name: String, file: Option<String>) -> usize {
        let key = (name, file);
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        let i = self.list.len();
        self.list
            .push((key.0.clone(), key.1.clone(), LineSeen::Unseen));
        self.index.insert(key, i);
        i
    }

    fn to_json(&self) -> Vec<Value> {
        self.list
            .iter()
            .map(|(name, file, line)| {
                let mut entry = json!({ "name": name });
                if let Some(file) = file {
                    entry["file"] = json!(file);
                }
                if let LineSeen::One(Some(line)) = line {
                    entry["line"] = json!(line);
                }
                entry
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::folded::tests::sample_report;

    #[test]
    fn samples_are_root_first_indexes_into_shared_frames() {
        let mut report = sample_report();
        report.stacks[0].frames[0].file = Some("a.c".into());
        report.stacks[0].frames[0].line = Some(3);
        for (stack, line) in [(0, 1), (1, 2)] {
            report.stacks[stack].frames[1].file = Some("m.c".into());
            report.stacks[stack].frames[1].line = Some(line);
        }
        report.stacks.push(crate::report::StackReport {
            frames: Vec::new(),
            ..report.stacks[1].clone()
        });
        let v: Value = serde_json::from_str(&render(&report, Weight::Bytes)).unwrap();
        assert_eq!(v["$schema"], SCHEMA);
        let frames = v["shared"]["frames"].as_array().unwrap();
        let profile = &v["profiles"][0];
        assert_eq!(profile["type"], "sampled");
        assert_eq!(profile["unit"], "bytes");
        assert_eq!(profile["weights"], json!([1000, 200, 100, 200]));
        assert_eq!(profile["endValue"], 1500);
        let names = |i: usize| -> Vec<&str> {
            profile["samples"][i]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    frames[f.as_u64().unwrap() as usize]["name"]
                        .as_str()
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(names(0), ["main", "leak"]);
        assert_eq!(names(2), ["a;b", "[app+0x10]"]);
        assert_eq!(names(3), [UNKNOWN_STACK]);
        let leak = &frames[profile["samples"][0][1].as_u64().unwrap() as usize];
        assert_eq!(leak, &json!({"name": "leak", "file": "a.c", "line": 3}));
        // leak without a file (stack 1) is another function; main is one,
        // called from two lines, so it has none.
        assert_eq!(frames.len(), 6);
        let main = &frames[profile["samples"][0][0].as_u64().unwrap() as usize];
        assert_eq!(main, &json!({"name": "main", "file": "m.c"}));
        assert_eq!(profile["samples"][1][0], profile["samples"][0][0]);
    }

    #[test]
    fn allocations_have_no_unit() {
        let v: Value =
            serde_json::from_str(&render(&sample_report(), Weight::Allocations)).unwrap();
        assert_eq!(v["profiles"][0]["unit"], "none");
        assert_eq!(v["profiles"][0]["endValue"], 6);
    }
}
