//! Human-readable report, in the spirit of bcc's memleak output.

use std::fmt::Write as _;

use crate::report::{
    memory,
    trend::{Trend, TrendKind},
    Report, ReportFrame,
};

pub fn render(report: &Report, final_report: bool) -> String {
    let mut out = String::new();
    let when = if final_report { "final" } else { "interval" };
    let _ = writeln!(
        out,
        "[{:.1}s] {} report: pid {} ({}): {} in {} outstanding allocation{} from {} stack{}{}",
        report.duration_s,
        when,
        report.pid,
        report.command,
        bytes(report.totals.bytes),
        report.totals.allocations,
        plural(report.totals.allocations),
        report.stack_count,
        plural(report.stack_count as u64),
        if report.min_age_s > 0.0 {
            format!(" (older than {}s)", report.min_age_s)
        } else {
            String::new()
        },
    );
    if let Some(rate) = report.allocator.sample_rate_bytes {
        let _ = writeln!(
            out,
            "estimated: allocations sampled about once every {rate} bytes; bytes and counts are estimates"
        );
    }
    if report.memory.verdict.is_some() {
        let _ = writeln!(out, "memory: {}", memory::sentence(&report.memory));
    }
    if let Some(coverage) = &report.memory.coverage {
        let _ = writeln!(out, "coverage: {}", memory::coverage_sentence(coverage));
    }
    let several = report.processes.len() > 1;
    for p in report.processes.iter().filter(|_| several) {
        let state = match (p.state.as_str(), p.exit_code) {
            ("exited", Some(code)) => format!("exited {code}"),
            (state, _) => state.to_string(),
        };
        let _ = writeln!(
            out,
            "  pid {} ({state}{}): {} in {} allocation{}{}: {}",
            p.pid,
            p.parent
                .map(|pp| format!(", child of {pp}"))
                .unwrap_or_default(),
            bytes(p.totals.bytes),
            p.totals.allocations,
            plural(p.totals.allocations),
            p.memory
                .verdict
                .map(|v| format!(", memory growth: {}", v.name()))
                .unwrap_or_default(),
            p.command
        );
    }
    if report.stacks.len() < report.stack_count {
        let _ = writeln!(
            out,
            "top {} stacks by outstanding bytes:",
            report.stacks.len()
        );
    }
    for stack in &report.stacks {
        let age = stack
            .oldest_age_s
            .map(|a| format!(", oldest {a:.1}s"))
            .unwrap_or_default();
        let process = if several {
            format!("pid {}: ", stack.pid)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "\n  {process}{}{} in {} allocation{} (allocated since attach: {}{}){}",
            stack.label().map(label).unwrap_or_default(),
            bytes(stack.bytes),
            stack.allocations,
            plural(stack.allocations),
            stack.total_allocations,
            age,
            stack.trend.map(trend).unwrap_or_default(),
        );
        if stack.frames.is_empty() {
            let _ = writeln!(out, "      [unknown stack]");
        }
        for frame in &stack.frames {
            let _ = writeln!(out, "      {}", frame_line(frame));
        }
        if stack.truncated {
            let _ = writeln!(out, "      [stack truncated]");
        }
    }
    mappings(&mut out, report);
    let d = &report.dropped;
    if d.any() {
        let _ = writeln!(
            out,
            "\n  dropped: {} untracked allocations (allocation map full), {} without stack, {} without per-stack totals, {} calls not followed, {} missed frees, {} unmatched frees, {} lost frees",
            d.untracked_allocations, d.lost_stacks, d.stack_stats_full, d.in_flight_full, d.missed_frees, d.unmatched_frees, d.lost_frees
        );
    }
    out.push('\n');
    out
}

/// "parse_line (parse.c:12): ": the frame the stack is labelled with.
fn label(frame: &ReportFrame) -> String {
    let function = frame.function.as_deref().unwrap_or(&frame.address);
    match (&frame.file, frame.line) {
        (Some(file), Some(line)) => {
            format!(
                "{function} ({}:{line}): ",
                file.rsplit('/').next().unwrap_or(file)
            )
        }
        _ => format!("{function}: "),
    }
}

/// ": growing +5120 bytes (5.0 KiB)/s (confidence 93%)", ": plateau
/// (confidence 80%)"; nothing for a new stack.
fn trend(trend: Trend) -> String {
    match trend.kind {
        TrendKind::New => return String::new(),
        // Flat: a rate would only be noise.
        TrendKind::Plateau | TrendKind::Steady => {
            return format!(
                ": {} (confidence {:.0}%)",
                trend.kind.name(),
                trend.confidence * 100.0
            )
        }
        TrendKind::Growing | TrendKind::Shrinking => {}
    }
    let rate = trend.bytes_per_second.round() as i64;
    let sign = if rate < 0 { "-" } else { "+" };
    format!(
        ": {} {sign}{}/s (confidence {:.0}%)",
        trend.kind.name(),
        bytes(rate.unsigned_abs()),
        trend.confidence * 100.0
    )
}

/// The mmap section: only when something is mapped or the break moved.
fn mappings(out: &mut String, report: &Report) {
    let m = &report.mappings;
    if !m.traced || (m.mappings == 0 && m.brk_growth_bytes == 0) {
        return;
    }
    let _ = writeln!(
        out,
        "
  mappings: {} in {} anonymous mapping{} (mmap) from {} stack{}; program break {}{}",
        bytes(m.bytes),
        m.mappings,
        plural(m.mappings),
        m.stack_count,
        plural(m.stack_count as u64),
        if m.brk_growth_bytes >= 0 { "+" } else { "-" },
        bytes(m.brk_growth_bytes.unsigned_abs()),
    );
    for stack in &m.stacks {
        let _ = writeln!(
            out,
            "
  {} in {} mapping{} (mapped since attach: {})",
            bytes(stack.bytes),
            stack.allocations,
            plural(stack.allocations),
            stack.total_allocations,
        );
        if stack.frames.is_empty() {
            let _ = writeln!(out, "      [unknown stack]");
        }
        for frame in &stack.frames {
            let _ = writeln!(out, "      {}", frame_line(frame));
        }
    }
    if m.lost_events > 0 || m.lost_stacks > 0 {
        let _ = writeln!(
            out,
            "
  mappings dropped: {} events lost, {} stacks not stored",
            m.lost_events, m.lost_stacks
        );
    }
}

pub fn frame_line(frame: &ReportFrame) -> String {
    let mut s = frame
        .function
        .clone()
        .unwrap_or_else(|| frame.address.clone());
    if let (Some(file), Some(line)) = (&frame.file, frame.line) {
        let _ = write!(s, " at {file}:{line}");
    }
    if frame.inlined {
        s.push_str(" (inlined)");
    }
    if let Some(module) = &frame.module {
        let _ = write!(s, " [{}]", module.rsplit('/').next().unwrap_or(module));
    }
    s
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// "1234 bytes" below 10 KiB, otherwise with a binary unit as well.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 10 * 1024 {
        return format!("{n} bytes");
    }
    let mut value = n as f64;
    let mut unit = "";
    for u in UNITS {
        value /= 1024.0;
        unit = u;
        if value < 1024.0 {
            break;
        }
    }
    format!("{n} bytes ({value:.1} {unit})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_formatting() {
        assert_eq!(bytes(1), "1 bytes");
        assert_eq!(bytes(20 * 1024), "20480 bytes (20.0 KiB)");
        assert_eq!(bytes(3 << 20), "3145728 bytes (3.0 MiB)");
    }

    #[test]
    fn frame_lines_show_function_location_and_module() {
        let f = ReportFrame {
            function: Some("leak".into()),
            file: Some("/src/a.c".into()),
            line: Some(7),
            module: Some("/usr/bin/demo".into()),
            address: "0x1".into(),
            inlined: false,
            wraps_allocator: false,
        };
        assert_eq!(frame_line(&f), "leak at /src/a.c:7 [demo]");
        let unknown = ReportFrame {
            function: None,
            file: None,
            line: None,
            module: None,
            address: "0x99".into(),
            inlined: false,
            wraps_allocator: false,
        };
        assert_eq!(frame_line(&unknown), "0x99");
    }
}
