//! Prometheus text exposition (format 0.0.4) of what the tracer knows:
//! per-process totals and rates as counters, and the top N stacks by
//! outstanding bytes with a stable id and the allocating function as labels.
//! The stacks past N are summed into one `stack_id="other"` series, so the
//! number of series is bounded whatever the program does and the per-stack
//! series still add up to the process total.

use std::fmt::Write as _;

use crate::{
    frontends::live_view::{LiveView, Row},
    report::{memory::Verdict, trend::TrendKind},
};

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

/// A traced process, as its series are labelled.
#[derive(Clone, Debug, PartialEq)]
pub struct Exported {
    pub pid: u32,
    /// Short name for the `process` label (the executable's name).
    pub name: String,
    pub up: bool,
    pub resident_bytes: Option<u64>,
}

/// `processes`: every process traced, the first one first. Per-process
/// gauges get a series per process; the event counters cover the whole
/// session and carry the first process's labels.
pub fn render(view: &LiveView, processes: &[Exported], top: usize) -> String {
    let mut w = Writer { out: String::new() };
    let labels = Labels::new(view.pid, processes);
    process_gauges(&mut w, view, &labels);
    session_counters(&mut w, view, &labels);
    resident_bytes(&mut w, &labels);
    stack_gauges(&mut w, view, &labels, top);
    trend_gauges(&mut w, view, &labels);
    memory_gauges(&mut w, view, &labels);
    w.out
}

/// The `pid` and `process` labels: the session's (the first process's)
/// and each process's.
struct Labels<'a> {
    processes: &'a [Exported],
    first_pid: String,
    pids: Vec<String>,
}

impl<'a> Labels<'a> {
    fn new(first_pid: u32, processes: &'a [Exported]) -> Self {
        Labels {
            processes,
            first_pid: first_pid.to_string(),
            pids: processes.iter().map(|p| p.pid.to_string()).collect(),
        }
    }

    fn session(&self) -> [(&str, &str); 2] {
        let name = self
            .processes
            .first()
            .map(|p| p.name.as_str())
            .unwrap_or("");
        [("pid", self.first_pid.as_str()), ("process", name)]
    }

    fn process(&self, i: usize) -> [(&str, &str); 2] {
        [
            ("pid", self.pids[i].as_str()),
            ("process", self.processes[i].name.as_str()),
        ]
    }

    /// A stack's: its process's when there are several, else the session's.
    fn stack(&self, pid: u32) -> [(&str, &str); 2] {
        if self.processes.len() < 2 {
            return self.session();
        }
        let i = self.processes.iter().position(|p| p.pid == pid);
        self.process(i.unwrap_or(0))
    }
}

/// Up, outstanding bytes and allocations, and stacks holding memory, per process.
fn process_gauges(w: &mut Writer, view: &LiveView, labels: &Labels) {
    let processes = labels.processes;
    // A process's stacks (all of them when it is the only one).
    let mine = |pid: u32| {
        view.shown
            .stacks
            .iter()
            .filter(move |s| s.pid == pid || processes.len() == 1)
    };
    type Value<'a> = &'a dyn Fn(&Exported) -> f64;
    let families: [(&str, &str, Value); 4] = [
        (
            "tracer_target_up",
            "1 while the traced process runs, 0 once it has exited.",
            &|p| if p.up { 1.0 } else { 0.0 },
        ),
        (
            "tracer_outstanding_bytes",
            "Bytes allocated since attach and not freed.",
            &|p| mine(p.pid).map(|s| s.bytes).sum::<u64>() as f64,
        ),
        (
            "tracer_outstanding_allocations",
            "Allocations made since attach and not freed.",
            &|p| mine(p.pid).map(|s| s.count).sum::<u64>() as f64,
        ),
        (
            "tracer_stacks",
            "Distinct call stacks holding memory.",
            &|p| mine(p.pid).filter(|s| s.count > 0).count() as f64,
        ),
    ];
    for (name, help, value) in families {
        w.family(name, "gauge", help);
        for (i, p) in processes.iter().enumerate() {
            w.sample(name, &labels.process(i), value(p));
        }
    }
}

/// Allocations, frees and dropped events of the whole session.
fn session_counters(w: &mut Writer, view: &LiveView, labels: &Labels) {
    let base = labels.session();
    let c = &view.shown.counters;
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
    let d = view.dropped();
    for (reason, n) in [
        ("allocation_map_full", d.untracked_allocations),
        ("stack_lost", d.lost_stacks),
        ("stack_stats_full", d.stack_stats_full),
        ("in_flight_full", d.in_flight_full),
        ("missed_free", d.missed_frees),
        ("unmatched_free", d.unmatched_frees),
        ("lost_free", d.lost_frees),
    ] {
        w.sample(
            "tracer_dropped_total",
            &[base[0], base[1], ("reason", reason)],
            n as f64,
        );
    }
}

/// RSS of the processes that have one (running ones); no family if none has.
fn resident_bytes(w: &mut Writer, labels: &Labels) {
    let processes = labels.processes;
    if processes.iter().all(|p| p.resident_bytes.is_none()) {
        return;
    }
    w.family(
        "tracer_process_resident_bytes",
        "gauge",
        "The traced process's resident set size.",
    );
    for (i, p) in processes.iter().enumerate() {
        if let Some(rss) = p.resident_bytes {
            w.sample(
                "tracer_process_resident_bytes",
                &labels.process(i),
                rss as f64,
            );
        }
    }
}

/// The top `top` rows, a series each, and the rest summed into
/// `stack_id="other"`.
fn stack_gauges(w: &mut Writer, view: &LiveView, labels: &Labels, top: usize) {
    // Rows are sorted by bytes (the serve loop keeps its view that way).
    let rows = view.rows();
    let (shown, rest) = rows.split_at(top.min(rows.len()));
    let series: Vec<(String, &Row)> = shown
        .iter()
        .map(|r| (format!("{:016x}", r.stack_ids[0]), r))
        .collect();
    let base = labels.session();
    let other = [
        base[0],
        base[1],
        ("stack_id", "other"),
        ("function", ""),
        ("location", ""),
    ];
    // One family at a time: name, help, a row's value, the rest's value.
    type Value<'a> = &'a dyn Fn(&Row) -> Option<f64>;
    let families: [(&str, &str, Value, Option<f64>); 5] = [
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
        (
            "tracer_stack_leak_suspected",
            "1 when the stack's trend is growing with confidence 0.5 or more (as in tracer top's TREND column), else 0.",
            &|r| r.trend.map(|t| t.is_leak_suspect() as u8 as f64),
            None,
        ),
    ];
    for (name, help, value, rest_value) in families {
        w.family(name, "gauge", help);
        for (id, row) in &series {
            let [pid, process] = labels.stack(row.pid);
            let labels = [
                pid,
                process,
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
}

/// How many stacks have each trend: five series whatever the program does.
fn trend_gauges(w: &mut Writer, view: &LiveView, labels: &Labels) {
    let name = "tracer_stacks_by_trend";
    w.family(
        name,
        "gauge",
        "Stacks holding memory, by trend (growing, plateau, steady, shrinking, new).",
    );
    let base = labels.session();
    for kind in TrendKind::ALL {
        let n = view
            .rows()
            .iter()
            .filter(|r| r.trend.is_some_and(|t| t.kind == kind))
            .count();
        w.sample(name, &[base[0], base[1], ("kind", kind.name())], n as f64);
    }
}

/// Where memory went since attach, over every traced process: the parts of
/// the change, and the verdict as one 1 among four series.
fn memory_gauges(w: &mut Writer, view: &LiveView, labels: &Labels) {
    let Some(memory) = view.memory.as_ref().filter(|m| m.verdict.is_some()) else {
        return;
    };
    let base = labels.session();
    let name = "tracer_memory_change_bytes";
    w.family(
        name,
        "gauge",
        "Change since attach: resident memory (rss, and its anon/shared/file parts), traced heap, traced mappings and break, and what none of them explains (unexplained).",
    );
    for (part, value) in [
        ("rss", memory.rss_change_bytes),
        ("rss_anon", memory.rss_anon_change_bytes),
        ("rss_shared", memory.rss_shared_change_bytes),
        ("rss_file", memory.rss_file_change_bytes),
        ("heap", memory.heap_change_bytes),
        ("mappings", memory.mappings_change_bytes),
        ("unexplained", memory.unexplained_change_bytes),
    ] {
        w.sample(name, &[base[0], base[1], ("part", part)], value as f64);
    }
    let name = "tracer_memory_verdict";
    w.family(
        name,
        "gauge",
        "1 for where the growth since attach went (heap, mappings, outside: not in memory the tracer sees, none: no growth), 0 for the others.",
    );
    for verdict in Verdict::ALL {
        let on = memory.verdict == Some(verdict);
        w.sample(
            name,
            &[base[0], base[1], ("verdict", verdict.name())],
            on as u8 as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontends::live_view::{tests::view, SortKey};

    #[test]
    fn exposes_totals_top_stacks_and_the_rest() {
        let mut view = view();
        view.sort_by(SortKey::Bytes);
        assert_eq!(view.sort, SortKey::Bytes);
        let processes = [Exported {
            pid: 42,
            name: "server".into(),
            up: true,
            resident_bytes: None,
        }];
        let text = render(&view, &processes, 1);
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
        assert_eq!(types, 13, "{text}");
        assert!(
            text.contains("tracer_stacks_by_trend{pid=\"42\",process=\"server\",kind=\"new\"} 3\n"),
            "{text}"
        );
        // Memory: once a verdict is known.
        view.memory = Some(crate::report::memory::judge(
            Some(Default::default()),
            Some(crate::model::ResidentMemory {
                rss: 8 << 20,
                anon: 8 << 20,
                ..Default::default()
            }),
            crate::report::memory::Traced {
                heap_bytes: 7 << 20,
                ..Default::default()
            },
        ));
        let text = render(&view, &processes, 1);
        assert!(
            text.contains(
                "tracer_memory_verdict{pid=\"42\",process=\"server\",verdict=\"heap\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains(
            "tracer_memory_change_bytes{pid=\"42\",process=\"server\",part=\"unexplained\"} 1048576\n"
        ), "{text}");
    }

    #[test]
    fn several_processes_get_their_own_series() {
        let mut view = view();
        // The fixture's stacks belong to pid 1; say one of them is pid 7's.
        let mut shown = view.shown.clone();
        shown.stacks[0].pid = 7;
        let own_bytes = shown.stacks[0].bytes;
        view.update(shown);
        let processes = [
            Exported {
                pid: 1,
                name: "server".into(),
                up: true,
                resident_bytes: Some(4096),
            },
            Exported {
                pid: 7,
                name: "worker".into(),
                up: false,
                resident_bytes: None,
            },
        ];
        let text = render(&view, &processes, 5);
        assert!(
            text.contains("tracer_target_up{pid=\"1\",process=\"server\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tracer_target_up{pid=\"7\",process=\"worker\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "tracer_outstanding_bytes{{pid=\"7\",process=\"worker\"}} {own_bytes}\n"
            )),
            "{text}"
        );
        assert!(text.contains("tracer_process_resident_bytes{pid=\"1\",process=\"server\"} 4096\n"));
        assert!(
            text.lines()
                .any(|l| l
                    .starts_with("tracer_stack_outstanding_bytes{pid=\"7\",process=\"worker\",")),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
