//! What the top view shows and how keys change it: no terminal, no maps.
//! The loop feeds it snapshots and symbolized stacks; `render` draws it.

use std::collections::{HashMap, VecDeque};

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::{
    cli::SortKey,
    model::{Counters, Growth, Snapshot},
    report::Dropped,
    symbolize::Frame,
};

/// Growth is measured over this much history.
pub const GROWTH_WINDOW_NS: u64 = 10_000_000_000;
/// Points kept for the outstanding-bytes chart.
const CHART_POINTS: usize = 600;

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
    /// The allocating function.
    pub function: String,
    /// Its file:line, if known.
    pub location: Option<String>,
}

/// What the loop must do after a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Redraw,
    Quit,
    SaveFlamegraph,
    SaveSnapshot,
}

/// Process-level numbers for the header, read from /proc by the loop.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessStats {
    pub rss_at_attach: Option<u64>,
    pub rss_now: Option<u64>,
}

pub struct TopState {
    pub pid: u32,
    pub command: String,
    pub attached_ns: u64,
    pub process: ProcessStats,
    /// `--sample-rate`: the figures are estimates, and the event rates count
    /// sampled blocks only.
    pub sample_rate: Option<u64>,
    /// The snapshot on screen (the newest, unless paused).
    pub shown: Snapshot,
    /// Growth rates as of `shown`.
    shown_growth: HashMap<u64, f64>,
    growth: Growth,
    /// (taken ns, counters) of the last two snapshots, for rates.
    counter_history: VecDeque<(u64, Counters)>,
    /// Outstanding bytes at each refresh, oldest first.
    pub chart: VecDeque<u64>,
    stacks: HashMap<u64, StackInfo>,
    rows: Vec<Row>,

    pub sort: SortKey,
    pub group_by_function: bool,
    pub filter: String,
    /// Some while the filter is being typed.
    pub editing_filter: Option<String>,
    pub selected: usize,
    pub detail_open: bool,
    pub help_open: bool,
    pub paused: bool,
    /// A line for the footer: files written, errors.
    pub message: Option<String>,
    /// Set when the target is gone: the view freezes on the last snapshot.
    pub ended: Option<String>,
}

impl TopState {
    pub fn new(pid: u32, command: String, attached_ns: u64, sort: SortKey, group: bool) -> Self {
        TopState {
            pid,
            command,
            attached_ns,
            process: ProcessStats::default(),
            sample_rate: None,
            shown: Snapshot {
                taken_ns: attached_ns,
                ..Default::default()
            },
            shown_growth: HashMap::new(),
            growth: Growth::new(GROWTH_WINDOW_NS),
            counter_history: VecDeque::new(),
            chart: VecDeque::new(),
            stacks: HashMap::new(),
            rows: Vec::new(),
            sort,
            group_by_function: group,
            filter: String::new(),
            editing_filter: None,
            selected: 0,
            detail_open: false,
            help_open: false,
            paused: false,
            message: None,
            ended: None,
        }
    }

    /// Stacks of a snapshot whose frames are not known yet, for the loop to
    /// symbolize (once each) before `update`.
    /// (pid, stack id) of the stacks not symbolized yet.
    pub fn unknown_stacks(&self, snapshot: &Snapshot) -> Vec<(u32, u64)> {
        snapshot
            .stacks
            .iter()
            .filter(|s| s.count > 0 && !self.stacks.contains_key(&s.stack_id))
            .map(|s| (s.pid, s.stack_id))
            .collect()
    }

    pub fn add_stack(&mut self, stack_id: u64, info: StackInfo) {
        self.stacks.insert(stack_id, info);
    }

    pub fn stack(&self, stack_id: u64) -> Option<&StackInfo> {
        self.stacks.get(&stack_id)
    }

    /// Takes in a new snapshot. History (growth, rates, chart) always moves
    /// on; the table only when not paused and the target has not ended.
    pub fn update(&mut self, snapshot: Snapshot) {
        if self.ended.is_some() {
            return;
        }
        self.growth.record(&snapshot);
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

    pub fn selected_row(&self) -> Option<&Row> {
        self.rows.get(self.selected)
    }

    fn rebuild_rows(&mut self) {
        let filter = self.filter.to_lowercase();
        let mut rows: Vec<Row> = Vec::new();
        let mut by_function: HashMap<String, usize> = HashMap::new();
        for sample in self.shown.top(0) {
            let info = self.stacks.get(&sample.stack_id);
            let frames = info.map(|i| i.frames.as_slice()).unwrap_or(&[]);
            if !filter.is_empty() && !matches_filter(frames, &filter) {
                continue;
            }
            let (function, location) = allocating_function(frames);
            let row = Row {
                stack_ids: vec![sample.stack_id],
                pid: sample.pid,
                bytes: sample.bytes,
                count: sample.count,
                growth: self.shown_growth.get(&sample.stack_id).copied(),
                oldest_age_s: self.shown.oldest_age_s(sample),
                total_count: sample.total_count,
                function,
                location,
            };
            if !self.group_by_function {
                rows.push(row);
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
        sort_rows(&mut rows, self.sort);
        self.rows = rows;
        self.selected = self.selected.min(self.rows.len().saturating_sub(1));
    }

    /// Applies a key; says what the loop must do next.
    pub fn key(&mut self, key: KeyEvent) -> Action {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if let Some(text) = self.editing_filter.as_mut() {
            match key.code {
                KeyCode::Enter => {
                    self.filter = self.editing_filter.take().unwrap_or_default();
                    self.selected = 0;
                    self.rebuild_rows();
                }
                KeyCode::Esc => self.editing_filter = None,
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) => text.push(c),
                _ => return Action::Nothing,
            }
            return Action::Redraw;
        }
        if self.help_open {
            self.help_open = false;
            return Action::Redraw;
        }
        let sort = |state: &mut TopState, key: SortKey| {
            state.sort = key;
            state.rebuild_rows();
            Action::Redraw
        };
        match key.code {
            KeyCode::Char('q') => Action::Quit,
            KeyCode::Char('b') => sort(self, SortKey::Bytes),
            KeyCode::Char('c') => sort(self, SortKey::Count),
            KeyCode::Char('r') => sort(self, SortKey::Growth),
            KeyCode::Char('a') => sort(self, SortKey::Age),
            KeyCode::Char('g') => {
                self.group_by_function = !self.group_by_function;
                self.selected = 0;
                self.rebuild_rows();
                Action::Redraw
            }
            KeyCode::Char('/') => {
                self.editing_filter = Some(self.filter.clone());
                Action::Redraw
            }
            KeyCode::Char(' ') => {
                self.paused = !self.paused;
                Action::Redraw
            }
            KeyCode::Char('?') => {
                self.help_open = true;
                Action::Redraw
            }
            KeyCode::Char('f') => Action::SaveFlamegraph,
            KeyCode::Char('s') => Action::SaveSnapshot,
            KeyCode::Enter => {
                self.detail_open = !self.detail_open;
                Action::Redraw
            }
            KeyCode::Esc => {
                self.detail_open = false;
                if !self.filter.is_empty() {
                    self.filter.clear();
                    self.rebuild_rows();
                }
                Action::Redraw
            }
            KeyCode::Up => self.move_selection(-1),
            KeyCode::Down => self.move_selection(1),
            KeyCode::PageUp => self.move_selection(-10),
            KeyCode::PageDown => self.move_selection(10),
            KeyCode::Home => self.move_selection(isize::MIN / 2),
            KeyCode::End => self.move_selection(isize::MAX / 2),
            _ => Action::Nothing,
        }
    }

    fn move_selection(&mut self, by: isize) -> Action {
        let last = self.rows.len().saturating_sub(1) as isize;
        self.selected = (self.selected as isize).saturating_add(by).clamp(0, last) as usize;
        Action::Redraw
    }
}

/// The allocating function's name and file:line: the innermost frame.
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
        }
    }

    fn sample(id: u64, bytes: u64, count: u64, settled: u64) -> StackSample {
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

    /// A state with three stacks, two of them in `handle`, after two
    /// snapshots one second apart: stack 1 leaks (settled bytes grow), stack
    /// 2 holds the most bytes but they are all young, stack 3 is static.
    pub fn state() -> TopState {
        let mut state = TopState::new(42, "server --port 8080".into(), 0, SortKey::Growth, false);
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
            state.add_stack(
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
            state.update(snapshot);
        }
        state
    }

    fn press(state: &mut TopState, code: KeyCode) -> Action {
        state.key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    fn functions(state: &TopState) -> Vec<&str> {
        state.rows().iter().map(|r| r.function.as_str()).collect()
    }

    #[test]
    fn default_sort_puts_the_growing_stack_first() {
        let state = state();
        // Equal growth (none): more bytes first.
        assert_eq!(functions(&state), ["leak_steadily", "churn", "load_config"]);
        assert_eq!(state.rows()[0].growth, Some(2000.0));
        assert_eq!(state.event_rates(), Some((1000.0, 900.0)));
    }

    #[test]
    fn sort_keys_reorder() {
        let mut state = state();
        press(&mut state, KeyCode::Char('b'));
        assert_eq!(functions(&state)[0], "churn");
        press(&mut state, KeyCode::Char('c'));
        assert_eq!(functions(&state)[0], "churn");
        press(&mut state, KeyCode::Char('a'));
        assert_eq!(functions(&state)[2], "leak_steadily", "youngest last");
    }

    #[test]
    fn filter_matches_any_frame_and_escape_clears_it() {
        let mut state = state();
        press(&mut state, KeyCode::Char('/'));
        for c in "HANDLE".chars() {
            press(&mut state, KeyCode::Char(c));
        }
        assert_eq!(state.rows().len(), 3, "not applied while typing");
        press(&mut state, KeyCode::Enter);
        assert_eq!(functions(&state), ["leak_steadily", "churn"]);
        press(&mut state, KeyCode::Esc);
        assert_eq!(state.rows().len(), 3);
    }

    #[test]
    fn grouping_merges_stacks_of_one_function() {
        let mut state = TopState::new(1, "x".into(), 0, SortKey::Bytes, true);
        for id in [1, 2] {
            state.add_stack(
                id,
                StackInfo {
                    frames: vec![
                        frame("alloc_node", "n.c", 1),
                        frame(&format!("caller{id}"), "n.c", 9),
                    ],
                    truncated: false,
                },
            );
        }
        state.update(Snapshot {
            taken_ns: 1,
            stacks: vec![sample(1, 100, 1, 0), sample(2, 300, 3, 0)],
            ..Default::default()
        });
        assert_eq!(state.rows().len(), 1);
        let row = &state.rows()[0];
        assert_eq!((row.bytes, row.count), (400, 4));
        assert_eq!(row.stack_ids, [2, 1], "largest stack first");
        press(&mut state, KeyCode::Char('g'));
        assert_eq!(state.rows().len(), 2);
    }

    #[test]
    fn pause_freezes_the_table_but_not_the_history() {
        let mut state = state();
        press(&mut state, KeyCode::Char(' '));
        let before = state.rows().to_vec();
        let mut next = state.shown.clone();
        next.taken_ns += 1_000_000_000;
        next.stacks[0].settled_bytes = Some(1_000_000);
        next.stacks[0].bytes = 1_000_000;
        state.update(next);
        assert_eq!(state.rows(), before.as_slice());
        assert_eq!(state.chart.len(), 3);
        press(&mut state, KeyCode::Char(' '));
        assert!(!state.paused);
    }

    #[test]
    fn keys_that_need_the_loop() {
        let mut state = state();
        assert_eq!(
            press(&mut state, KeyCode::Char('f')),
            Action::SaveFlamegraph
        );
        assert_eq!(press(&mut state, KeyCode::Char('s')), Action::SaveSnapshot);
        assert_eq!(press(&mut state, KeyCode::Char('q')), Action::Quit);
        assert_eq!(
            state.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Quit
        );
        press(&mut state, KeyCode::Down);
        press(&mut state, KeyCode::Down);
        press(&mut state, KeyCode::Down);
        assert_eq!(state.selected, 2, "stops at the last row");
    }

    #[test]
    fn an_ended_target_freezes_the_view() {
        let mut state = state();
        state.end("process exited (code 0)".into());
        let rows = state.rows().to_vec();
        state.update(Snapshot::default());
        assert_eq!(state.rows(), rows.as_slice());
    }
}
