//! Draws a `TopState`: header with a chart, the table, the detail pane, a
//! footer, and the help overlay. A function of the state only, so it is
//! tested on ratatui's TestBackend.

use ratatui::{
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState},
    Frame,
};

use super::state::TopState;
use crate::{
    frontends::live_view::{LiveView, SortKey},
    report::{
        memory::{self, Verdict},
        trend::{Trend, TrendKind},
    },
};

pub const KEYS: &[(&str, &str)] = &[
    (
        "b c r t a",
        "sort by bytes, count, growth rate, trend (growing first), age of oldest block",
    ),
    ("g", "group rows by allocating function / show each stack"),
    (
        "/",
        "filter by function or module substring (Enter applies, Esc clears)",
    ),
    ("space", "pause the display (tracing goes on)"),
    ("↑ ↓ PgUp PgDn", "select a row"),
    ("Enter", "open/close the selected row's whole stack"),
    ("f", "write a flamegraph SVG of the current snapshot"),
    (
        "s",
        "write a JSON snapshot (the `report --format json` document)",
    ),
    ("?", "this help"),
    ("q, Ctrl-C", "quit"),
];

pub fn draw(frame: &mut Frame, state: &TopState) {
    let detail_height = if state.detail_open {
        Constraint::Percentage(40)
    } else {
        Constraint::Length(0)
    };
    let [header, table, detail, footer] = Layout::vertical([
        Constraint::Length(6),
        Constraint::Min(3),
        detail_height,
        Constraint::Length(1),
    ])
    .areas(frame.area());
    draw_header(frame, header, &state.view);
    draw_table(frame, table, state);
    if state.detail_open {
        draw_detail(frame, detail, state);
    }
    draw_footer(frame, footer, state);
    if state.help_open {
        draw_help(frame, state);
    }
}

fn draw_header(frame: &mut Frame, area: Rect, view: &LiveView) {
    let [text, chart] =
        Layout::horizontal([Constraint::Min(40), Constraint::Percentage(25)]).areas(area);
    let snapshot = &view.shown;
    let mut title = vec![
        Span::styled("tracer top", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            "  PID {} ({})  attached {}",
            view.pid,
            view.command,
            duration(view.seconds_attached())
        )),
    ];
    if let Some(rate) = view.sample_rate {
        title.push(Span::styled(
            format!("  ESTIMATED: sampled about once every {}", bytes(rate)),
            Style::new().fg(Color::Yellow),
        ));
    }
    if view.paused {
        title.push(Span::styled(
            "  PAUSED",
            Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        ));
    }
    let rss = match (view.process.rss_now, view.process.rss_at_attach) {
        (Some(now), Some(then)) => format!(
            "RSS {} ({} since attach)",
            bytes(now),
            signed_bytes(now as i64 - then as i64)
        ),
        (Some(now), None) => format!("RSS {}", bytes(now)),
        _ => "RSS -".to_string(),
    };
    let stacks = snapshot.stacks.iter().filter(|s| s.count > 0).count();
    let held = format!(
        "   outstanding {} in {}, {}",
        bytes(snapshot.total_bytes()),
        counted(snapshot.total_count(), "allocation"),
        counted(stacks as u64, "stack")
    );
    // Sampling: the counters see sampled blocks only.
    let sampled = if view.sample_rate.is_some() {
        "sampled "
    } else {
        ""
    };
    let rates = match view.event_rates() {
        Some((allocs, frees)) => format!(
            "{sampled}allocs {}/s  frees {}/s",
            thousands(allocs.round() as u64),
            thousands(frees.round() as u64)
        ),
        None => format!("{sampled}allocs -/s  frees -/s"),
    };
    let dropped = view.dropped();
    let dropped_span = if dropped.any() {
        Span::styled(
            format!(
                "   dropped: {} untracked allocs, {} lost stacks, {} stack stats full, {} in-flight full, {} missed frees, {} unmatched frees, {} lost frees",
                dropped.untracked_allocations,
                dropped.lost_stacks,
                dropped.stack_stats_full,
                dropped.in_flight_full,
                dropped.missed_frees,
                dropped.unmatched_frees,
                dropped.lost_frees
            ),
            Style::new().fg(Color::Red),
        )
    } else {
        Span::raw("   dropped: none")
    };
    let mut arrangement = format!(
        "sort: {}   rows: {}",
        sort_name(view.sort),
        if view.group_by_function {
            "functions"
        } else {
            "stacks"
        }
    );
    if !view.filter.is_empty() {
        arrangement.push_str(&format!("   filter: {}", view.filter));
    }
    // Stack quality: how many allocations' stacks reached their outermost
    // frame; a low share means cut stacks (code without CFI or frame
    // pointers), so labels may name too little.
    let whole = match snapshot.counters.whole_stack_share() {
        Some(share) => {
            let style = if share < 0.9 {
                Style::new().fg(Color::Yellow)
            } else {
                Style::new()
            };
            Span::styled(format!("   stacks whole {:.0}%", share * 100.0), style)
        }
        None => Span::raw("   stacks whole -"),
    };
    let mut lines = vec![
        Line::from(title),
        Line::from(vec![Span::raw(rss), Span::raw(held), whole]),
        memory_line(view),
        Line::from(vec![Span::raw(rates), dropped_span]),
        Line::from(arrangement),
    ];
    if let Some(ended) = &view.ended {
        lines.push(Line::styled(
            format!("{ended}: showing the last snapshot, q quits"),
            Style::new().fg(Color::Black).bg(Color::Yellow),
        ));
    }
    frame.render_widget(Paragraph::new(lines), text);

    let points: Vec<u64> = view.chart.iter().copied().collect();
    let width = chart.width.saturating_sub(2) as usize;
    let shown = &points[points.len().saturating_sub(width)..];
    let peak = shown.iter().copied().max().unwrap_or(0);
    frame.render_widget(
        Sparkline::default()
            .block(
                Block::new()
                    .borders(Borders::ALL)
                    .title(format!("outstanding, peak {}", bytes(peak))),
            )
            .data(shown)
            .style(Style::new().fg(Color::Cyan)),
        chart,
    );
}

/// Where the growth went, in a sentence; red when it is outside the
/// tracer's view.
fn memory_line(view: &LiveView) -> Line<'static> {
    let Some(report) = &view.memory else {
        return Line::raw("memory: -");
    };
    let style = match report.verdict {
        Some(Verdict::Outside) => Style::new().fg(Color::Red),
        Some(Verdict::Heap | Verdict::Mappings) => Style::new().fg(Color::Yellow),
        _ => Style::new(),
    };
    let mut text = format!("memory: {}", memory::sentence(report));
    if let Some(coverage) = &report.coverage {
        text.push_str(". ");
        text.push_str(&memory::coverage_sentence(coverage));
    }
    Line::styled(text, style)
}

fn draw_table(frame: &mut Frame, area: Rect, state: &TopState) {
    let header = Row::new(
        [
            "BYTES",
            "ALLOCS",
            "GROWTH/s",
            "TREND",
            "OLDEST",
            "TOTAL ALLOCS",
            "ALLOCATED IN",
        ]
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let sorted = matches!(
                (i, state.view.sort),
                (0, SortKey::Bytes)
                    | (1, SortKey::Count)
                    | (2, SortKey::Growth)
                    | (3, SortKey::Trend)
                    | (4, SortKey::Age)
            );
            let style = if sorted {
                Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED)
            } else {
                Style::new().add_modifier(Modifier::BOLD)
            };
            Cell::from(name).style(style)
        }),
    );
    let rows = state.view.rows().iter().map(|row| {
        let mut place = row.function.clone();
        if let Some(location) = &row.location {
            place.push_str("  ");
            place.push_str(location);
        }
        if row.stack_ids.len() > 1 {
            place.push_str(&format!("  ({} stacks)", row.stack_ids.len()));
        }
        Row::new([
            Cell::from(bytes(row.bytes)),
            Cell::from(thousands(row.count)),
            Cell::from(row.growth.map_or("-".to_string(), |g| {
                format!("{}/s", signed_bytes(g.round() as i64))
            })),
            Cell::from(row.trend.map_or("-".to_string(), trend)),
            Cell::from(row.oldest_age_s.map_or("-".to_string(), duration)),
            Cell::from(thousands(row.total_count)),
            Cell::from(place),
        ])
    });
    let widths = [
        Constraint::Length(11),
        Constraint::Length(10),
        Constraint::Length(12),
        Constraint::Length(13),
        Constraint::Length(8),
        Constraint::Length(13),
        Constraint::Min(20),
    ];
    let title = match &state.editing_filter {
        Some(text) => format!(" filter: {text}▏"),
        None => format!(" {} ", counted(state.view.rows().len() as u64, "row")),
    };
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::new().borders(Borders::TOP).title(title))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut table_state = TableState::default().with_selected(Some(state.selected));
    frame.render_stateful_widget(table, area, &mut table_state);
}

fn draw_detail(frame: &mut Frame, area: Rect, state: &TopState) {
    let Some(row) = state.selected_row() else {
        return;
    };
    let stack_id = row.stack_ids[0];
    let mut title = format!(" stack {stack_id:016x} ");
    if row.stack_ids.len() > 1 {
        title.push_str(&format!("(largest of {}) ", row.stack_ids.len()));
    }
    let mut lines: Vec<Line> = Vec::new();
    match state.view.stack(stack_id) {
        Some(info) if !info.frames.is_empty() => {
            for (i, f) in info.frames.iter().enumerate() {
                let function = f
                    .function
                    .clone()
                    .unwrap_or_else(|| format!("{:#x}", f.address));
                let mut spans = vec![
                    Span::raw(format!("#{i:<3}")),
                    Span::styled(function, Style::new().add_modifier(Modifier::BOLD)),
                ];
                if let Some(file) = &f.file {
                    let line = f.line.map(|l| format!(":{l}")).unwrap_or_default();
                    spans.push(Span::raw(format!("  {file}{line}")));
                }
                if let Some(module) = f.module_name() {
                    spans.push(Span::styled(
                        format!("  [{module}]"),
                        Style::new().fg(Color::DarkGray),
                    ));
                }
                if f.inlined {
                    spans.push(Span::styled(
                        "  (inlined)",
                        Style::new().fg(Color::DarkGray),
                    ));
                }
                lines.push(Line::from(spans));
            }
            if info.truncated {
                lines.push(Line::styled(
                    "… truncated: outer frames were not recorded",
                    Style::new().fg(Color::Yellow),
                ));
            }
        }
        _ => lines.push(Line::raw("(the stack could not be captured)")),
    }
    frame.render_widget(
        Paragraph::new(lines).block(Block::new().borders(Borders::TOP).title(title)),
        area,
    );
}

fn draw_footer(frame: &mut Frame, area: Rect, state: &TopState) {
    let line = match &state.message {
        Some(message) => Line::styled(message.clone(), Style::new().fg(Color::Green)),
        None => Line::styled(
            "q quit  b/c/r/a sort  g group  / filter  space pause  Enter stack  f flamegraph  s snapshot  ? help",
            Style::new().fg(Color::DarkGray),
        ),
    };
    frame.render_widget(Paragraph::new(line), area);
}

fn draw_help(frame: &mut Frame, _state: &TopState) {
    let area = frame.area().centered(
        Constraint::Length(84),
        Constraint::Length(KEYS.len() as u16 + 4),
    );
    let lines: Vec<Line> = KEYS
        .iter()
        .map(|(key, what)| {
            Line::from(vec![
                Span::styled(
                    format!("{key:>14}  "),
                    Style::new().add_modifier(Modifier::BOLD),
                ),
                Span::raw(*what),
            ])
        })
        .collect();
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::new()
                .borders(Borders::ALL)
                .title(" keys (any key closes) "),
        ),
        area,
    );
}

fn sort_name(key: SortKey) -> &'static str {
    match key {
        SortKey::Bytes => "bytes",
        SortKey::Count => "allocations",
        SortKey::Growth => "growth (bytes/s held past 1 s, over 10 s)",
        SortKey::Age => "age of oldest",
        SortKey::Trend => "trend (growing first)",
    }
}

/// "growing 93%", "new": the kind and, once there is history, its confidence.
fn trend(trend: Trend) -> String {
    match trend.kind {
        TrendKind::New => "new".to_string(),
        kind => format!("{} {:.0}%", kind.name(), trend.confidence * 100.0),
    }
}

/// "999 B", "1.5 KiB", "12.0 MiB": short, for columns.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// "1 stack", "1,200 stacks"
fn counted(n: u64, noun: &str) -> String {
    format!("{} {noun}{}", thousands(n), if n == 1 { "" } else { "s" })
}

/// "1,234,567"
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn signed_bytes(n: i64) -> String {
    if n < 0 {
        format!("-{}", bytes(n.unsigned_abs()))
    } else {
        format!("+{}", bytes(n as u64))
    }
}

/// "59s", "12m03s", "2h05m"
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=59 if seconds < 10.0 => format!("{seconds:.1}s"),
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use ratatui::{
        backend::TestBackend,
        crossterm::event::{KeyCode, KeyEvent, KeyModifiers},
        Terminal,
    };

    use super::*;
    use crate::frontends::top::state::tests::state;

    fn screen(state: &TopState, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, state)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect()
    }

    #[test]
    fn header_and_rows_show_the_leak_first() {
        let mut state = state();
        state.view.process.rss_at_attach = Some(10 << 20);
        state.view.process.rss_now = Some(12 << 20);
        let lines = screen(&state, 140, 20);
        let text = lines.join("\n");
        assert!(lines[0].contains("PID 42 (server --port 8080)"), "{text}");
        assert!(
            text.contains("RSS 12.0 MiB (+2.0 MiB since attach)"),
            "{text}"
        );
        assert!(text.contains("allocs 1,000/s  frees 900/s"), "{text}");
        assert!(text.contains("dropped: none"), "{text}");
        assert!(!text.contains("ESTIMATED"), "{text}");
        let header_row = lines.iter().position(|l| l.contains("BYTES")).expect(&text);
        let first = &lines[header_row + 1];
        assert!(first.contains("leak_steadily  leak.c:10"), "{text}");
        assert!(first.contains("+2.0 KiB/s"), "{first}");
    }

    #[test]
    fn header_says_sampled_figures_are_estimates() {
        let mut state = state();
        state.view.sample_rate = Some(512 << 10);
        let lines = screen(&state, 160, 20);
        let text = lines.join("\n");
        assert!(
            lines[0].contains("ESTIMATED: sampled about once every 512.0 KiB"),
            "{text}"
        );
        assert!(
            text.contains("sampled allocs 1,000/s  frees 900/s"),
            "{text}"
        );
    }

    #[test]
    fn detail_pane_shows_the_whole_stack() {
        let mut state = state();
        state.key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
        let text = screen(&state, 120, 30).join("\n");
        assert!(
            text.contains("#0  leak_steadily  /src/leak.c:10  [server]"),
            "{text}"
        );
        assert!(text.contains("#1  handle  /src/srv.c:5"), "{text}");
    }

    #[test]
    fn help_and_end_of_target_are_shown() {
        let mut state = state();
        state.key(KeyEvent::new(KeyCode::Char('?'), KeyModifiers::NONE));
        state.view.end("process exited (code 3)".into());
        let text = screen(&state, 120, 30).join("\n");
        assert!(text.contains("group rows by allocating function"), "{text}");
        assert!(
            text.contains("process exited (code 3): showing the last snapshot"),
            "{text}"
        );
    }

    #[test]
    fn number_formats() {
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(12), "12");
        assert_eq!(duration(3.25), "3.2s");
        assert_eq!(duration(75.0), "1m15s");
        assert_eq!(duration(7300.0), "2h01m");
        assert_eq!(signed_bytes(-2048), "-2.0 KiB");
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
