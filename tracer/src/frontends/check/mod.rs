//! `tracer check`: run a command traced and fail (exit code 23, as
//! LeakSanitizer) when what it leaves allocated at exit, after
//! suppressions, exceeds the limits. For test suites and CI.
//!
//! `suppress` reads LeakSanitizer-style suppression files, `verdict` decides,
//! `render` writes text, JSON or JUnit.

pub mod render;
pub mod suppress;
pub mod verdict;

use std::{io::Write, process::ExitCode};

use anyhow::{Context as _, Result};
use tokio::time::{interval_at, Instant, MissedTickBehavior};

use self::suppress::Rule;
use crate::{
    cli::CheckConfig,
    frontends::report::HOUSEKEEPING,
    lifecycle::watch::{TargetEvent, TargetWatch},
    report::Report,
    trace::LiveTrace,
};

/// What the check report (`--report`) is written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    /// JUnit XML: each leaking stack a failed test case.
    Junit,
}

/// The rules in force: the defaults unless turned off, then each file's.
/// Read before the command starts, so a bad file costs nothing.
pub fn load_rules(options: &CheckConfig) -> Result<Vec<Rule>> {
    let mut rules = if options.default_suppressions {
        suppress::defaults()
    } else {
        Vec::new()
    };
    for path in &options.suppressions {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read suppressions {}", path.display()))?;
        rules.extend(
            suppress::parse(&text, &path.display().to_string()).map_err(anyhow::Error::msg)?,
        );
    }
    Ok(rules)
}

pub async fn run(
    mut trace: LiveTrace,
    mut target: TargetWatch,
    options: CheckConfig,
    rules: Vec<Rule>,
    mut out: Option<Box<dyn Write>>,
) -> Result<ExitCode> {
    let mut housekeeping = interval_at(Instant::now() + HOUSEKEEPING, HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let crate::signals::Signals {
        interrupt: mut sigint,
        terminate: mut sigterm,
    } = crate::signals::take()?;
    // Ctrl-C reaches the command too (same process group); the check ends
    // when the command does, with its code.
    let mut final_report: Option<Report> = None;
    let command_exit = loop {
        tokio::select! {
            _ = housekeeping.tick() => trace.housekeeping(),
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {
                if let TargetWatch::Child(child) = &target {
                    unsafe { libc::kill(child.pid as libc::pid_t, libc::SIGTERM) };
                }
            }
            event = target.next() => match event {
                TargetEvent::Exiting => {
                    trace.main_exiting();
                    let report = final_snapshot(&mut trace);
                    target.let_exit();
                    final_report = Some(report?);
                }
                TargetEvent::Changed(change) => trace.apply(change, &mut target),
                TargetEvent::Exited(code) => break code,
            }
        }
    };
    let report = match final_report {
        Some(report) => report,
        None => final_snapshot(&mut trace)?,
    };
    let check = verdict::evaluate(report, &rules, options.limits, command_exit);
    match out.as_mut() {
        Some(out) => {
            let text = match options.format {
                Format::Text => render::text(&check),
                Format::Json => render::json(&check),
                Format::Junit => render::junit(&check),
            };
            out.write_all(text.as_bytes())
                .context("writing the check report")?;
            out.flush().context("writing the check report")?;
            eprintln!("{}", render::summary(&check));
        }
        // Standard output belongs to the command: the verdict goes to stderr.
        None => eprint!("{}", render::text(&check)),
    }
    Ok(ExitCode::from(check.exit_code.clamp(0, 255) as u8))
}

fn final_snapshot(trace: &mut LiveTrace) -> Result<Report> {
    let snapshot = trace.snapshot(true)?;
    Ok(trace.report(&snapshot, 0))
}
