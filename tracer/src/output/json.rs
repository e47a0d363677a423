//! JSON: one document, or one report per line (JSON Lines) for interval
//! reports.

use crate::report::Report;

pub fn document(report: &Report) -> String {
    let mut s = serde_json::to_string_pretty(report).expect("a report always serializes");
    s.push('\n');
    s
}

pub fn line(report: &Report) -> String {
    let mut s = serde_json::to_string(report).expect("a report always serializes");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::*;

    #[test]
    fn has_the_documented_fields_and_round_trips() {
        let report = Report {
            processes: Vec::new(),
            pid: 1,
            command: "x".into(),
            duration_s: 1.5,
            min_age_s: 0.0,
            allocator: AllocatorInfo::default(),
            allocators: Vec::new(),
            mappings: Default::default(),
            unwinding: Default::default(),
            memory: Default::default(),
            totals: Totals {
                bytes: 10,
                allocations: 1,
            },
            stacks: vec![StackReport {
                stack_id: "1".into(),
                pid: 1,
                bytes: 10,
                allocations: 1,
                total_allocations: 3,
                total_bytes: 30,
                oldest_age_s: Some(0.5),
                truncated: false,
                trend: None,
                label_frame: 0,
                frames: vec![ReportFrame {
                    function: Some("leak".into()),
                    file: Some("a.c".into()),
                    line: Some(3),
                    module: Some("/bin/a".into()),
                    address: "0x10".into(),
                    inlined: false,
                    wraps_allocator: false,
                }],
            }],
            stack_count: 1,
            dropped: Dropped::default(),
            events: Events::default(),
        };
        let text = document(&report);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in [
            "pid",
            "command",
            "duration_s",
            "totals",
            "stacks",
            "dropped",
        ] {
            assert!(value.get(key).is_some(), "{key}");
        }
        let frame = &value["stacks"][0]["frames"][0];
        for key in ["function", "file", "line", "module", "address"] {
            assert!(frame.get(key).is_some(), "{key}");
        }
        assert_eq!(value["stacks"][0]["oldest_age_s"], 0.5);
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, report);
        assert!(!line(&report).trim_end().contains('\n'));
    }
}
