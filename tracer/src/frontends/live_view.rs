//! What `top` and `serve` both show of a live trace: the newest snapshot,
//! its stacks symbolized (each once), growth per stack, the rows to list
//! and the process's RSS. `read` takes a snapshot for it, `update` takes it
//! in; `top` adds keys and a screen, `serve` HTTP.

use std::collections::{HashMap, VecDeque};

use anyhow::Result;

use crate::{
    model::{Counters, Growth, History, Snapshot},
    report::{
        label::Labeler,
        memory::MemoryReport,
        trend::{self, Trend},
        Dropped,
    },
    symbolize::Frame,
    trace::LiveTrace,
};

/// Growth is measured over this much history.
pub const GROWTH_WINDOW_NS: u64 = 10_000_000_000;
/// Points kept for the outstanding-bytes chart.
const CHART_POINTS: usize = 600;

/// Orders of the rows, largest first.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// Outstanding bytes.
    Bytes,
    /// Outstanding allocations.
    Count,
    /// Growth of settled bytes per second over the last 10 s.
    Growth,
    /// Age of the oldest outstanding allocation.
    Age,
    /// Trend: growing first (most confident fastest first), then plateau,
    /// new, steady, shrinking.
    Trend,
}

/// A symbolized stack, kept for the whole run (a stack id's frames never change).
#[derive(Clone, Debug, Default)]
pub struct StackInfo {
    /// Innermost first; the first frame is the allocating function.
    pub frames: Vec<Frame>,
    pub truncated: bool,
}

/// One table row: a stack, or every stack of one allocating function.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Largest first; the first is the one the detail pane shows.
    pub stack_ids: Vec<u64>,
    /// The process of the first stack.
    pub pid: u32,
    pub bytes: u64,
    pub count: u64,
    /// Bytes per second; None until two snapshots are known.
    pub growth: Option<f64>,
    pub oldest_age_s: Option<f64>,
    pub total_count: u64,
    /// Is it leaking (see `report::trend`).
    pub trend: Option<Trend>,
    /// The allocating function.
    pub function: String,
    /// Its file:line, if known.
    pub location: Option<String>,
}

/// Process-level numbers for the header, read from /proc by `read`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessStats {
    pub rss_at_attach: Option<u64>,
    pub rss_now: Option<u64>,
}

pub struct LiveView {
    pub pid: u32,
    pub command: String,
    pub attached_ns: u64,
    pub process: ProcessStats,
    /// Where memory went since attach, as of the last `read`.
    pub memory: Option<MemoryReport>,
    /// `--sample-rate`: the figures are estimates, and the event rates count
    /// sampled blocks only.
    pub sample_rate: Option<u64>,
    /// The snapshot shown (the newest, unless paused).
    pub shown: Snapshot,
    /// Growth rates as of `shown`.
    shown_growth: HashMap<u64, f64>,
    growth: Growth,
    /// Trends as of `shown`.
    shown_trends: HashMap<u64, Trend>,
    history: History,
    /// (taken ns, counters) of the last two snapshots, for rates.
    counter_history: VecDeque<(u64, Counters)>,
    /// Outstanding bytes at each update, oldest first.
    pub chart: VecDeque<u64>,
    stacks: HashMap<u64, StackInfo>,
    rows: Vec<Row>,
    /// Picks the frame rows are labelled with (past allocation wrappers).
    pub labels: Labeler,

    pub sort: SortKey,
    pub group_by_function: bool,
    pub filter: String,
    pub paused: bool,
    /// Set when the target is gone: the view freezes on the last snapshot.
    pub ended: Option<String>,
}

impl LiveView {
    pub fn new(pid: u32, command: String, attached_ns: u64, sort: SortKey, group: bool) -> Self {
        LiveView {
            pid,
            command,
            attached_ns,
            process: ProcessStats::default(),
            memory: None,
            sample_rate: None,
            shown: Snapshot {
                taken_ns: attached_ns,
                ..Default::default()
            },
            shown_growth: HashMap::new(),
            growth: Growth::new(GROWTH_WINDOW_NS),
            shown_trends: HashMap::new(),
            history: History::since(attached_ns),
            counter_history: VecDeque::new(),
            chart: VecDeque::new(),
            stacks: HashMap::new(),
            rows: Vec::new(),
            labels: Labeler::default(),
            sort,
            group_by_function: group,
            filter: String::new(),
            paused: false,
            ended: None,
        }
    }

    /// An empty view of a trace just started: its process, RSS and sampling.
    pub fn of(trace: &LiveTrace, sort: SortKey, group: bool) -> Self {
        let mut view = LiveView::new(
            trace.run.pid,
            trace.run.command.clone(),
            trace.run.attached_ns,
            sort,
            group,
        );
        view.process.rss_at_attach = trace.primary().process.rss_bytes();
        view.labels = trace.run.labels.clone();
        view.sample_rate = trace
            .run
            .allocators
            .first()
            .and_then(|a| a.sample_rate_bytes);
        view
    }

    /// (pid, stack id) of the stacks of a snapshot not symbolized yet.
    pub fn unknown_stacks(&self, snapshot: &Snapshot) -> Vec<(u32, u64)> {
        snapshot
            .stacks
            .iter()
            .filter(|s| s.count > 0 && !self.stacks.contains_key(&s.stack_id))
            .map(|s| (s.pid, s.stack_id))
            .collect()
    }

    pub fn add_stack(&mut self, stack_id: u64, info: StackInfo) {
        self.labels
            .observe(info.frames.iter().map(|f| f.function.as_deref()));
        self.stacks.insert(stack_id, info);
    }

    pub fn stack(&self, stack_id: u64) -> Option<&StackInfo> {
        self.stacks.get(&stack_id)
    }

    /// Takes in a new snapshot. History (growth, rates, chart) always moves
    /// on; the rows only when not paused and the target has not ended.
    pub fn update(&mut self, snapshot: Snapshot) {
        if self.ended.is_some() {
            return;
        }
        self.growth.record(&snapshot);
        let stacks = &self.stacks;
        self.history.record_by_site(&snapshot, |s| {
            match stacks.get(&s.stack_id).and_then(|i| i.frames.first()) {
                Some(frame) => crate::trace::site_key(s.pid, frame.address),
                None => s.stack_id,
            }
        });
        self.counter_history
            .push_back((snapshot.taken_ns, snapshot.counters));
        while self.counter_history.len() > 2 {
            self.counter_history.pop_front();
        }
        self.chart.push_back(snapshot.total_bytes());
        while self.chart.len() > CHART_POINTS {
            self.chart.pop_front();
        }
        if !self.paused {
            self.shown_growth = snapshot
                .stacks
                .iter()
                .filter_map(|s| Some((s.stack_id, self.growth.rate(s.stack_id)?)))
                .collect();
            self.shown_trends = snapshot
                .stacks
                .iter()
                .filter(|s| s.count > 0)
                .map(|s| {
                    let age = snapshot.oldest_age_s(s);
                    (s.stack_id, trend::of_stack(&self.history, s.stack_id, age))
                })
                .collect();
            self.shown = snapshot;
            self.rebuild_rows();
        }
    }

    /// Freezes the view: the target is gone.
    pub fn end(&mut self, why: String) {
        self.ended = Some(why);
    }

    /// Allocations and frees per second between the last two snapshots.
    pub fn event_rates(&self) -> Option<(f64, f64)> {
        let (t0, c0) = self.counter_history.front()?;
        let (t1, c1) = self.counter_history.back()?;
        if t1 <= t0 {
            return None;
        }
        let seconds = (t1 - t0) as f64 / 1e9;
        Some((
            c1.allocs.saturating_sub(c0.allocs) as f64 / seconds,
            c1.frees.saturating_sub(c0.frees) as f64 / seconds,
        ))
    }

    pub fn dropped(&self) -> Dropped {
        Dropped::from_counters(&self.shown.counters)
    }

    pub fn seconds_attached(&self) -> f64 {
        self.shown.taken_ns.saturating_sub(self.attached_ns) as f64 / 1e9
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// Orders the rows by `key` from now on.
    pub fn sort_by(&mut self, key: SortKey) {
        self.sort = key;
        self.rebuild_rows();
    }

    /// Lists the shown snapshot again, after a change of sort, grouping or filter.
    pub fn rebuild_rows(&mut self) {
        let filter = self.filter.to_lowercase();
        let mut rows: Vec<Row> = Vec::new();
        // The function that called each row's labelled frame.
        let mut callers: Vec<Option<String>> = Vec::new();
        let mut by_function: HashMap<String, usize> = HashMap::new();
        for sample in self.shown.top(0) {
            let info = self.stacks.get(&sample.stack_id);
            let frames = info.map(|i| i.frames.as_slice()).unwrap_or(&[]);
            if !filter.is_empty() && !matches_filter(frames, &filter) {
                continue;
            }
            let at = self.labels.pick_frames(frames);
            let (function, location) = allocating_function(&frames[at.min(frames.len())..]);
            let caller = frames.get(at + 1).and_then(|f| f.function.clone());
            let row = Row {
                stack_ids: vec![sample.stack_id],
                pid: sample.pid,
                bytes: sample.bytes,
                count: sample.count,
                growth: self.shown_growth.get(&sample.stack_id).copied(),
                oldest_age_s: self.shown.oldest_age_s(sample),
                total_count: sample.total_count,
                trend: self.shown_trends.get(&sample.stack_id).copied(),
                function,
                location,
            };
            if !self.group_by_function {
                rows.push(row);
                callers.push(caller);
                continue;
            }
            match by_function.get(&row.function) {
                None => {
                    by_function.insert(row.function.clone(), rows.len());
                    rows.push(row);
                }
                Some(&i) => merge(&mut rows[i], row),
            }
        }
        if !self.group_by_function {
            tell_apart(&mut rows, &callers);
        }
        sort_rows(&mut rows, self.sort);
        self.rows = rows;
    }
}

/// Takes a snapshot and symbolizes the stacks the view has not seen; notes
/// the RSS. The snapshot is for the view's `update`.
pub fn read(trace: &mut LiveTrace, view: &mut LiveView) -> Result<Snapshot> {
    let snapshot = trace.snapshot(true)?;
    for (pid, stack_id) in view.unknown_stacks(&snapshot) {
        let (frames, truncated) = trace.stack(pid, stack_id);
        view.add_stack(stack_id, StackInfo { frames, truncated });
    }
    if let Some(rss) = trace.primary().process.rss_bytes() {
        view.process.rss_now = Some(rss);
    }
    view.memory = Some(trace.memory(&snapshot));
    Ok(snapshot)
}

/// `read`, then `update`.
pub fn refresh(trace: &mut LiveTrace, view: &mut LiveView) -> Result<()> {
    let snapshot = read(trace, view)?;
    view.update(snapshot);
    Ok(())
}

/// Rows whose labels are the same but whose labelled functions were called
/// from different functions get their caller added: "parse ← load_config".
fn tell_apart(rows: &mut [Row], callers: &[Option<String>]) {
    let mut by_label: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, row) in rows.iter().enumerate() {
        by_label.entry(row.function.clone()).or_default().push(i);
    }
    for same in by_label.values().filter(|same| same.len() > 1) {
        let first = &callers[same[0]];
        if same.iter().all(|&i| &callers[i] == first) {
            continue;
        }
        for &i in same {
            if let Some(caller) = &callers[i] {
                rows[i].function = format!("{} ← {caller}", rows[i].function);
            }
        }
    }
}

/// A stack's label: the name and file:line of its first frame (the first
/// past allocation wrappers, as `rebuild_rows` passes them).
fn allocating_function(frames: &[Frame]) -> (String, Option<String>) {
    let Some(frame) = frames.first() else {
        return ("[unknown stack]".to_string(), None);
    };
    let function = match (&frame.function, frame.module_name()) {
        (Some(f), _) => f.clone(),
        (None, Some(m)) => format!("[{m}+{:#x}]", frame.address),
        (None, None) => format!("[{:#x}]", frame.address),
    };
    let location = frame.file.as_ref().map(|file| {
        let file = file.rsplit('/').next().unwrap_or(file);
        match frame.line {
            Some(line) => format!("{file}:{line}"),
            None => file.to_string(),
        }
    });
    (function, location)
}

/// Case-insensitive substring of any frame's function or module path.
fn matches_filter(frames: &[Frame], lowercase_filter: &str) -> bool {
    frames.iter().any(|f| {
        [f.function.as_deref(), f.module.as_deref()]
            .into_iter()
            .flatten()
            .any(|s| s.to_lowercase().contains(lowercase_filter))
    })
}

fn merge(into: &mut Row, row: Row) {
    into.stack_ids.extend(row.stack_ids);
    into.bytes += row.bytes;
    into.count += row.count;
    into.total_count += row.total_count;
    into.growth = match (into.growth, row.growth) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    };
    into.oldest_age_s = match (into.oldest_age_s, row.oldest_age_s) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    // A group is as worrying as its most worrying stack.
    into.trend = match (into.trend, row.trend) {
        (Some(a), Some(b)) => Some(if b.sort_value() > a.sort_value() {
            b
        } else {
            a
        }),
        (a, b) => a.or(b),
    };
    if into.location.is_none() {
        into.location = row.location;
    }
}

/// Largest first; ties by bytes, then function, so the order is stable.
fn sort_rows(rows: &mut [Row], key: SortKey) {
    let value = |row: &Row| -> f64 {
        match key {
            SortKey::Bytes => row.bytes as f64,
            SortKey::Count => row.count as f64,
            SortKey::Growth => row.growth.unwrap_or(f64::NEG_INFINITY),
            SortKey::Age => row.oldest_age_s.unwrap_or(f64::NEG_INFINITY),
            SortKey::Trend => row.trend.map_or(f64::NEG_INFINITY, |t| t.sort_value()),
        }
    };
    rows.sort_by(|a, b| {
        value(b)
            .total_cmp(&value(a))
            .then(b.bytes.cmp(&a.bytes))
            .then_with(|| a.function.cmp(&b.function))
            .then_with(|| a.stack_ids.cmp(&b.stack_ids))
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::StackSample;

    pub fn frame(function: &str, file: &str, line: u32) -> Frame {
        Frame {
            function: Some(function.to_string()),
            file: Some(format!("/src/{file}")),
            line: Some(line),
            module: Some("/usr/bin/server".to_string()),
            address: 0x1000,
            inlined: false,
            wraps_allocator: false,
        }
    }

    pub fn sample(id: u64, bytes: u64, count: u64, settled: u64) -> StackSample {
        StackSample {
            stack_id: id,
            pid: 1,
            bytes,
            count,
            total_count: count * 10,
            total_bytes: bytes * 10,
            oldest_ns: Some(0),
            settled_bytes: Some(settled),
        }
    }

    /// A view with three stacks, two of them in `handle`, after two
    /// snapshots one second apart: stack 1 leaks (settled bytes grow), stack
    /// 2 holds the most bytes but they are all young, stack 3 is static.
    pub fn view() -> LiveView {
        let mut view = LiveView::new(42, "server --port 8080".into(), 0, SortKey::Growth, false);
        let infos = [
            (
                1,
                vec![
                    frame("leak_steadily", "leak.c", 10),
                    frame("handle", "srv.c", 5),
                ],
            ),
            (
                2,
                vec![frame("churn", "churn.c", 20), frame("handle", "srv.c", 6)],
            ),
            (
                3,
                vec![
                    frame("load_config", "cfg.c", 30),
                    frame("main", "main.c", 3),
                ],
            ),
        ];
        for (id, frames) in infos {
            view.add_stack(
                id,
                StackInfo {
                    frames,
                    truncated: false,
                },
            );
        }
        for (t, leak) in [(1u64, 1000u64), (2, 3000)] {
            let mut snapshot = Snapshot {
                taken_ns: t * 1_000_000_000,
                stacks: vec![
                    sample(1, leak, leak / 100, leak),
                    sample(2, 900_000, 90, 0),
                    sample(3, 5000, 1, 5000),
                ],
                counters: Counters {
                    allocs: t * 1000,
                    frees: t * 900,
                    ..Default::default()
                },
            };
            snapshot.stacks[0].oldest_ns = Some(t * 1_000_000_000 - 500_000_000);
            view.update(snapshot);
        }
        view
    }

    fn functions(view: &LiveView) -> Vec<&str> {
        view.rows().iter().map(|r| r.function.as_str()).collect()
    }

    #[test]
    fn default_sort_puts_the_growing_stack_first() {
        let view = view();
        // Equal growth (none): more bytes first.
        assert_eq!(functions(&view), ["leak_steadily", "churn", "load_config"]);
        assert_eq!(view.rows()[0].growth, Some(2000.0));
        assert_eq!(view.event_rates(), Some((1000.0, 900.0)));
    }

    #[test]
    fn rows_are_labelled_past_wrappers_and_told_apart_by_caller() {
        let mut view = LiveView::new(1, "server".into(), 0, SortKey::Bytes, false);
        let stacks = [
            (1, ["zmalloc", "createObject", "setCommand"]),
            (2, ["zmalloc", "createObject", "getCommand"]),
            (3, ["zmalloc", "sdsnew", "main"]),
            (4, ["zmalloc", "dictExpand", "main"]),
        ];
        for (id, names) in stacks {
            let frames = names.iter().map(|n| frame(n, "server.c", 1)).collect();
            view.add_stack(
                id,
                StackInfo {
                    frames,
                    truncated: false,
                },
            );
        }
        view.update(Snapshot {
            taken_ns: 1_000_000_000,
            stacks: (1..=4).map(|id| sample(id, 1000 * id, 1, 0)).collect(),
            ..Default::default()
        });
        let mut labels: Vec<&str> = view.rows().iter().map(|r| r.function.as_str()).collect();
        labels.sort();
        assert_eq!(
            labels,
            [
                "createObject ← getCommand",
                "createObject ← setCommand",
                "dictExpand",
                "sdsnew"
            ]
        );
        // Grouped by function, the two createObject stacks are one row.
        view.group_by_function = true;
        view.rebuild_rows();
        assert_eq!(view.rows().len(), 3);
    }

    #[test]
    fn an_ended_target_freezes_the_view() {
        let mut view = view();
        view.end("process exited (code 0)".into());
        let rows = view.rows().to_vec();
        view.update(Snapshot::default());
        assert_eq!(view.rows(), rows.as_slice());
    }
}
