//! What the top view shows and how keys change it: no terminal, no maps.
//! The loop feeds its `LiveView` snapshots; `render` draws it.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::{
    frontends::live_view::{LiveView, Row, SortKey},
    model::Snapshot,
};

/// What the loop must do after a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Redraw,
    Quit,
    SaveFlamegraph,
    SaveSnapshot,
}

pub struct TopState {
    /// The data on screen; sort, grouping, filter and pause are the keys'.
    pub view: LiveView,
    /// Some while the filter is being typed.
    pub editing_filter: Option<String>,
    pub selected: usize,
    pub detail_open: bool,
    pub help_open: bool,
    /// A line for the footer: files written, errors.
    pub message: Option<String>,
}

impl TopState {
    pub fn new(view: LiveView) -> Self {
        TopState {
            view,
            editing_filter: None,
            selected: 0,
            detail_open: false,
            help_open: false,
            message: None,
        }
    }

    /// Takes in a new snapshot (see `LiveView::update`).
    pub fn update(&mut self, snapshot: Snapshot) {
        self.view.update(snapshot);
        self.keep_selection();
    }

    pub fn selected_row(&self) -> Option<&Row> {
        self.view.rows().get(self.selected)
    }

    fn rebuild_rows(&mut self) {
        self.view.rebuild_rows();
        self.keep_selection();
    }

    /// The selection stays on a row when there are fewer.
    fn keep_selection(&mut self) {
        self.selected = self.selected.min(self.view.rows().len().saturating_sub(1));
    }

    /// Applies a key; says what the loop must do next.
    pub fn key(&mut self, key: KeyEvent) -> Action {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if let Some(text) = self.editing_filter.as_mut() {
            match key.code {
                KeyCode::Enter => {
                    self.view.filter = self.editing_filter.take().unwrap_or_default();
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
            state.view.sort_by(key);
            state.keep_selection();
            Action::Redraw
        };
        match key.code {
            KeyCode::Char('q') => Action::Quit,
            KeyCode::Char('b') => sort(self, SortKey::Bytes),
            KeyCode::Char('c') => sort(self, SortKey::Count),
            KeyCode::Char('r') => sort(self, SortKey::Growth),
            KeyCode::Char('a') => sort(self, SortKey::Age),
            KeyCode::Char('t') => sort(self, SortKey::Trend),
            KeyCode::Char('g') => {
                self.view.group_by_function = !self.view.group_by_function;
                self.selected = 0;
                self.rebuild_rows();
                Action::Redraw
            }
            KeyCode::Char('/') => {
                self.editing_filter = Some(self.view.filter.clone());
                Action::Redraw
            }
            KeyCode::Char(' ') => {
                self.view.paused = !self.view.paused;
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
                if !self.view.filter.is_empty() {
                    self.view.filter.clear();
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
        let last = self.view.rows().len().saturating_sub(1) as isize;
        self.selected = (self.selected as isize).saturating_add(by).clamp(0, last) as usize;
        Action::Redraw
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::frontends::live_view::{
        tests::{frame, sample, view},
        StackInfo,
    };

    /// The live view's fixture (three stacks, two snapshots), in the top view.
    pub fn state() -> TopState {
        TopState::new(view())
    }

    fn press(state: &mut TopState, code: KeyCode) -> Action {
        state.key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    fn functions(state: &TopState) -> Vec<&str> {
        state
            .view
            .rows()
            .iter()
            .map(|r| r.function.as_str())
            .collect()
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
        assert_eq!(state.view.rows().len(), 3, "not applied while typing");
        press(&mut state, KeyCode::Enter);
        assert_eq!(functions(&state), ["leak_steadily", "churn"]);
        press(&mut state, KeyCode::Esc);
        assert_eq!(state.view.rows().len(), 3);
    }

    #[test]
    fn grouping_merges_stacks_of_one_function() {
        let mut state = TopState::new(LiveView::new(1, "x".into(), 0, SortKey::Bytes, true));
        for id in [1, 2] {
            state.view.add_stack(
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
        assert_eq!(state.view.rows().len(), 1);
        let row = &state.view.rows()[0];
        assert_eq!((row.bytes, row.count), (400, 4));
        assert_eq!(row.stack_ids, [2, 1], "largest stack first");
        press(&mut state, KeyCode::Char('g'));
        assert_eq!(state.view.rows().len(), 2);
    }

    #[test]
    fn pause_freezes_the_table_but_not_the_history() {
        let mut state = state();
        press(&mut state, KeyCode::Char(' '));
        let before = state.view.rows().to_vec();
        let mut next = state.view.shown.clone();
        next.taken_ns += 1_000_000_000;
        next.stacks[0].settled_bytes = Some(1_000_000);
        next.stacks[0].bytes = 1_000_000;
        state.update(next);
        assert_eq!(state.view.rows(), before.as_slice());
        assert_eq!(state.view.chart.len(), 3);
        press(&mut state, KeyCode::Char(' '));
        assert!(!state.view.paused);
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
}
