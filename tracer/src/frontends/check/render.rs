//! A CheckReport as a one-line summary, text, JSON, or JUnit XML (each
//! leaking stack a failed test case, so CI systems list them).

use std::fmt::Write as _;

use super::verdict::{CheckReport, Limits, Suppressed};
use crate::{
    output::{self, text::bytes},
    report::StackReport,
};

/// "tracer check: FAIL: 1200 bytes in 5 allocations leaked (limit 0 bytes); exit 23"
pub fn summary(check: &CheckReport) -> String {
    let verdict = if check.passed { "PASS" } else { "FAIL" };
    let mut line = format!(
        "tracer check: {verdict}: {} in {} allocation{} leaked ({})",
        bytes(check.leaked.bytes),
        check.leaked.allocations,
        if check.leaked.allocations == 1 {
            ""
        } else {
            "s"
        },
        limits(&check.limits)
    );
    let suppressed: u64 = check.suppressed.iter().map(|s| s.bytes).sum();
    if suppressed > 0 {
        let _ = write!(line, ", {} suppressed", bytes(suppressed));
    }
    if let Some(code) = check.command_exit_code.filter(|c| *c != 0) {
        let _ = write!(line, "; the command failed with exit code {code}");
    }
    if check.report.dropped.any() {
        line.push_str("; some events were dropped, totals are lower bounds");
    }
    let _ = write!(line, "; exit code {}", check.exit_code);
    line
}

fn limits(limits: &Limits) -> String {
    let parts: Vec<String> = [
        limits.bytes.map(|b| format!("limit {b} bytes")),
        limits.allocations.map(|a| format!("limit {a} allocations")),
    ]
    .into_iter()
    .flatten()
    .collect();
    parts.join(", ")
}

pub fn text(check: &CheckReport) -> String {
    let mut out = summary(check);
    out.push('\n');
    for s in &check.suppressed {
        let _ = writeln!(
            out,
            "  suppressed by `{}` ({}{}): {} in {} allocation{} from {} stack{}",
            s.pattern,
            s.origin,
            s.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default(),
            bytes(s.bytes),
            s.allocations,
            if s.allocations == 1 { "" } else { "s" },
            s.stacks,
            if s.stacks == 1 { "" } else { "s" },
        );
    }
    if check.processes.len() > 1 {
        for p in &check.processes {
            let verdict = match (p.state.as_str(), p.passed) {
                ("exec", _) => "replaced by exec",
                (_, true) => "ok",
                (_, false) => "LEAKS",
            };
            let _ = writeln!(
                out,
                "  PID {} {verdict}: {} in {} allocation{} ({})",
                p.pid,
                bytes(p.leaked.bytes),
                p.leaked.allocations,
                if p.leaked.allocations == 1 { "" } else { "s" },
                p.command
            );
        }
    }
    if !check.report.stacks.is_empty() {
        out.push('\n');
        out.push_str(&output::text::render(&check.report, true));
    }
    out
}

pub fn json(check: &CheckReport) -> String {
    let mut s = serde_json::to_string_pretty(check).expect("a check report always serializes");
    s.push('\n');
    s
}

/// JUnit XML: one suite, each leaking stack a test case (failed unless the
/// check passed), each suppression a skipped one.
pub fn junit(check: &CheckReport) -> String {
    let stacks: Vec<_> = check
        .report
        .stacks
        .iter()
        .filter(|s| s.allocations > 0)
        .collect();
    let failures = if check.passed { 0 } else { stacks.len().max(1) };
    let tests = stacks.len().max(1) + check.suppressed.len();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let suite = format!("leaks in {}", check.report.command);
    let _ = writeln!(
        x,
        "<testsuites name=\"tracer check\" tests=\"{tests}\" failures=\"{failures}\" skipped=\"{}\">",
        check.suppressed.len()
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{}\" tests=\"{tests}\" failures=\"{failures}\" skipped=\"{}\" time=\"{:.3}\">",
        escape(&suite),
        check.suppressed.len(),
        check.report.duration_s
    );
    if stacks.is_empty() {
        let _ = writeln!(
            x,
            "    <testcase classname=\"tracer.leaks\" name=\"no leaks\"/>"
        );
        if !check.passed {
            // Only possible when the command itself failed.
            let _ = writeln!(x, "    <!-- {} -->", escape(&summary(check)));
        }
    }
    for stack in &stacks {
        leak_case(&mut x, check, stack);
    }
    for s in &check.suppressed {
        suppressed_case(&mut x, s);
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

/// A leaking stack's test case: its frames as the trace.
fn leak_case(x: &mut String, check: &CheckReport, stack: &StackReport) {
    let message = format!(
        "{} in {} allocation{} not freed",
        bytes(stack.bytes),
        stack.allocations,
        if stack.allocations == 1 { "" } else { "s" }
    );
    let trace = stack_trace(stack);
    let _ = writeln!(
        x,
        "    <testcase classname=\"tracer.leaks\" name=\"{}\">",
        escape(&case_name(check, stack))
    );
    if check.passed {
        let _ = writeln!(
            x,
            "      <system-out>{}, within the limits\n{}</system-out>",
            escape(&message),
            escape(&trace)
        );
    } else {
        let _ = writeln!(
            x,
            "      <failure type=\"leak\" message=\"{}\">{}</failure>",
            escape(&message),
            escape(&trace)
        );
    }
    let _ = writeln!(x, "    </testcase>");
}

/// "function (file:line) [stack ID]", and the process when there are several.
fn case_name(check: &CheckReport, stack: &StackReport) -> String {
    // The first frame past allocation wrappers.
    let place = stack
        .label()
        .map(|f| {
            let function = f.function.clone().unwrap_or_else(|| f.address.clone());
            match (&f.file, f.line) {
                (Some(file), Some(line)) => format!(
                    "{function} ({}:{line})",
                    file.rsplit('/').next().unwrap_or(file)
                ),
                _ => function,
            }
        })
        .unwrap_or_else(|| "[unknown stack]".to_string());
    if check.processes.len() <= 1 {
        return format!("{place} [stack {}]", stack.stack_id);
    }
    let command = check
        .processes
        .iter()
        .rev()
        .find(|p| p.pid == stack.pid)
        .map(|p| {
            p.command
                .rsplit('/')
                .next()
                .unwrap_or(&p.command)
                .to_string()
        })
        .unwrap_or_default();
    format!(
        "{place} [stack {}, PID {} {command}]",
        stack.stack_id, stack.pid
    )
}

/// One "    at function (file:line)" line a frame, innermost first.
fn stack_trace(stack: &StackReport) -> String {
    let mut trace = String::new();
    for f in &stack.frames {
        let _ = writeln!(
            trace,
            "    at {}{}",
            f.function.as_deref().unwrap_or(&f.address),
            match (&f.file, f.line) {
                (Some(file), Some(line)) => format!(" ({file}:{line})"),
                _ => String::new(),
            }
        );
    }
    trace
}

/// A suppression's test case, skipped.
fn suppressed_case(x: &mut String, s: &Suppressed) {
    let _ = writeln!(
        x,
        "    <testcase classname=\"tracer.suppressed\" name=\"{}\">\n      <skipped message=\"{}\"/>\n    </testcase>",
        escape(&format!("{} ({})", s.pattern, s.origin)),
        escape(&format!(
            "{} in {} allocations suppressed",
            bytes(s.bytes),
            s.allocations
        ))
    );
}

/// XML text and attribute escaping; drops characters XML 1.0 forbids.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        frontends::check::{suppress, verdict::evaluate},
        output::folded::tests::sample_report,
    };

    #[test]
    fn junit_lists_each_leaking_stack_as_a_failure() {
        let mut report = sample_report();
        report.command = "./t <x> & \"y\"".into();
        let check = evaluate(
            report,
            &suppress::parse("leak:a;b", "s").unwrap(),
            super::super::verdict::Limits::new(None, None),
            Some(0),
        );
        let xml = junit(&check);
        assert!(
            xml.contains("tests=\"3\" failures=\"2\" skipped=\"1\""),
            "{xml}"
        );
        assert!(
            xml.contains("name=\"leaks in ./t &lt;x&gt; &amp; &quot;y&quot;\""),
            "{xml}"
        );
        assert!(
            xml.contains(
                "<failure type=\"leak\" message=\"1000 bytes in 4 allocations not freed\">"
            ),
            "{xml}"
        );
        assert!(
            xml.contains("<skipped message=\"100 bytes in 1 allocations suppressed\"/>"),
            "{xml}"
        );
    }

    #[test]
    fn summary_names_verdict_limits_and_code() {
        let check = evaluate(
            sample_report(),
            &[],
            super::super::verdict::Limits::new(Some(10), None),
            Some(0),
        );
        assert_eq!(
            summary(&check),
            "tracer check: FAIL: 1300 bytes in 6 allocations leaked (limit 10 bytes); exit code 23"
        );
    }
}
