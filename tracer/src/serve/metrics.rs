//! Prometheus text exposition (format 0.0.4) of what the tracer knows:
//! per-process totals and rates as counters, and the top N stacks by
//! outstanding bytes with a stable id and the allocating function as labels.
//! The stacks past N are summed into one `stack_id="other"` series, so the
//! number of series is bounded whatever the program does and the per-stack
//! series still add up to the process total.

use std::fmt::Write as _;

use crate::top::state::{Row, TopState};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Label values escaped as the format requires.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
            .collect();
        let _ = writeln!(self.out, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// `process` is a short name for the `process` label (the executable's name).
pub fn render(state: &TopState, process: &str, top: usize, target_up: bool) -> String {
    let mut w = Writer { out: String::new() };
    let pid = state.pid.to_string();
    let base = [("pid", pid.as_str()), ("process", process)];
    let snapshot = &state.shown;
    let c = &snapshot.counters;

    w.family(
        "tracer_target_up",
        "gauge",
        "1 while the traced process runs, 0 once it has exited.",
    );
    w.sample("tracer_target_up", &base, if target_up { 1.0 } else { 0.0 });
    w.family(
        "tracer_outstanding_bytes",
        "gauge",
        "Bytes allocated since attach and not freed.",
    );
    w.sample(
        "tracer_outstanding_bytes",
        &base,
        snapshot.total_bytes() as f64,
    );
    w.family(
        "tracer_outstanding_allocations",
        "gauge",
        "Allocations made since attach and not freed.",
    );
    w.sample(
        "tracer_outstanding_allocations",
        &base,
        snapshot.total_count() as f64,
    );
    w.family(
        "tracer_stacks",
        "gauge",
        "Distinct call stacks holding memory.",
    );
    let holding = snapshot.stacks.iter().filter(|s| s.count > 0).count();
    w.sample("tracer_stacks", &base, holding as f64);
    w.family(
        "tracer_allocations_total",
        "counter",
        "Allocator calls that returned memory, since attach.",
    );
    w.sample("tracer_allocations_total", &base, c.allocs as f64);
    w.family(
        "tracer_frees_total",
        "counter",
        "Frees of blocks allocated since attach.",
    );
    w.sample("tracer_frees_total", &base, c.frees as f64);
    w.family(
        "tracer_dropped_total",
        "counter",
        "Events the tracer could not account for, by reason; non-zero means totals are lower bounds.",
    );
    let d = state.dropped();
    for (reason, n) in [
        ("allocation_map_full", d.untracked_allocations),
        ("stack_lost", d.lost_stacks),
        ("stack_stats_full", d.stack_stats_full),
        ("in_flight_full", d.in_flight_full),
        ("missed_free", d.missed_frees),
    ] {
        w.sample(
            "tracer_dropped_total",
            &[base[0], base[1], ("reason", reason)],
            n as f64,
        );
    }
    if let Some(rss) = state.process.rss_now {
        w.family(
            "tracer_process_resident_bytes",
            "gauge",
            "The traced process's resident set size.",
        );
        w.sample("tracer_process_resident_bytes", &base, rss as f64);
    }

    // Rows are sorted by bytes (the serve loop keeps the state that way).
    let rows = state.rows();
    let (shown, rest) = rows.split_at(top.min(rows.len()));
    let series: Vec<(String, &Row)> = shown
        .iter()
        .map(|r| (format!("{:016x}", r.stack_ids[0]), r))
        .collect();
    let other = [
        base[0],
        base[1],
        ("stack_id", "other"),
        ("function", ""),
        ("location", ""),
    ];
    // One family at a time: name, help, a row's value, the rest's value.
    type Value<'a> = &'a dyn Fn(&Row) -> Option<f64>;
    let families: [(&str, &str, Value, Option<f64>); 4] = [
        (
            "tracer_stack_outstanding_bytes",
            "Outstanding bytes of the top stacks by bytes; stack_id=\"other\" sums the rest.",
            &|r| Some(r.bytes as f64),
            Some(rest.iter().map(|r| r.bytes).sum::<u64>() as f64),
        ),
        (
            "tracer_stack_outstanding_allocations",
            "Outstanding allocations of the top stacks.",
            &|r| Some(r.count as f64),
            Some(rest.iter().map(|r| r.count).sum::<u64>() as f64),
        ),
        (
            "tracer_stack_growth_bytes_per_second",
            "Growth of the stack's bytes held past 1 s, over the last 10 s (as in tracer top).",
            &|r| r.growth,
            None,
        ),
        (
            "tracer_stack_oldest_allocation_age_seconds",
            "Age of the stack's oldest outstanding allocation.",
            &|r| r.oldest_age_s,
            None,
        ),
    ];
    for (name, help, value, rest_value) in families {
        w.family(name, "gauge", help);
        for (id, row) in &series {
            let labels = [
                base[0],
                base[1],
                ("stack_id", id.as_str()),
                ("function", row.function.as_str()),
                ("location", row.location.as_deref().unwrap_or("")),
            ];
            if let Some(v) = value(row) {
                w.sample(name, &labels, v);
            }
        }
        if let Some(v) = rest_value {
            w.sample(name, &other, v);
        }
    }
    w.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cli::SortKey, top::state::tests::state};

    #[test]
    fn exposes_totals_top_stacks_and_the_rest() {
        let mut state = state();
        state.key(ratatui::crossterm::event::KeyEvent::from(
            ratatui::crossterm::event::KeyCode::Char('b'),
        ));
        assert_eq!(state.sort, SortKey::Bytes);
        let text = render(&state, "server", 1, true);
        assert!(
            text.contains("tracer_target_up{pid=\"42\",process=\"server\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tracer_outstanding_bytes{pid=\"42\",process=\"server\"} 908000\n"),
            "{text}"
        );
        assert!(
            text.contains("tracer_allocations_total{pid=\"42\",process=\"server\"} 2000\n"),
            "{text}"
        );
        assert!(text.contains(
            "tracer_stack_outstanding_bytes{pid=\"42\",process=\"server\",stack_id=\"0000000000000002\",function=\"churn\",location=\"churn.c:20\"} 900000\n"
        ), "{text}");
        assert!(text.contains(
            "tracer_stack_outstanding_bytes{pid=\"42\",process=\"server\",stack_id=\"other\",function=\"\",location=\"\"} 8000\n"
        ), "{text}");
        assert!(text.contains(
            "tracer_dropped_total{pid=\"42\",process=\"server\",reason=\"stack_lost\"} 0\n"
        ));
        // Every family is declared once, before its samples.
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(types, 11, "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
