//! `tracer check`: run a command traced and fail (exit code 23, as
//! LeakSanitizer) when what it leaves allocated at exit, after
//! suppressions, exceeds the limits. For test suites and CI.
//!
//! `suppress` reads LeakSanitizer-style suppression files, `verdict` decides,
//! `render` writes text, JSON or JUnit.

pub mod render;
pub mod suppress;
pub mod verdict;

use std::{convert::Infallible, io::Write, process::ExitCode};

use anyhow::{Context as _, Result};

use self::suppress::Rule;
use crate::{
    cli::CheckConfig,
    driver::{self, End, Flow, FrontEnd, LastLook, OnSignal},
    lifecycle::watch::TargetWatch,
    report::Report,
    trace::LiveTrace,
};

/// What the check report (`--report`) is written as.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    /// JUnit XML: each leaking stack a failed test case.
    Junit,
}

/// The rules in force: the defaults unless turned off, then each file's.
/// Read before the command starts, so a bad file costs nothing.
pub fn load_rules(config: &CheckConfig) -> Result<Vec<Rule>> {
    let mut rules = if config.default_suppressions {
        suppress::defaults()
    } else {
        Vec::new()
    };
    for path in &config.suppressions {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read suppressions {}", path.display()))?;
        rules.extend(
            suppress::parse(&text, &path.display().to_string()).map_err(anyhow::Error::msg)?,
        );
    }
    Ok(rules)
}

pub async fn run(
    trace: LiveTrace,
    target: TargetWatch,
    config: CheckConfig,
    rules: Vec<Rule>,
    out: Option<Box<dyn Write>>,
) -> Result<ExitCode> {
    let check = Check {
        config,
        rules,
        out,
        final_report: None,
    };
    driver::run(check, trace, target).await
}

struct Check {
    config: CheckConfig,
    rules: Vec<Rule>,
    out: Option<Box<dyn Write>>,
    /// Taken at the command's last look, while its memory is mapped.
    final_report: Option<Report>,
}

impl FrontEnd for Check {
    type Event = Infallible;
    // Ctrl-C reaches the command too (same process group), SIGTERM is
    // passed on; the check ends when the command does, with its code.
    const ON_SIGNAL: OnSignal = OnSignal::PassOn;

    async fn next(&mut self) -> Infallible {
        std::future::pending().await
    }

    fn event(&mut self, _trace: &mut LiveTrace, event: Infallible) -> Result<Flow> {
        match event {}
    }

    fn last_look(&mut self, trace: &mut LiveTrace, _process: LastLook<'_>) -> Result<Flow> {
        self.final_report = Some(final_snapshot(trace)?);
        Ok(Flow::Continue)
    }

    fn exited(&mut self, _trace: &mut LiveTrace, _code: Option<i32>) -> Result<Flow> {
        Ok(Flow::Stop)
    }

    fn end(mut self, trace: &mut LiveTrace, end: End) -> Result<ExitCode> {
        // Only the command's exit ends a check.
        let command_exit = match end {
            End::Exited(code) => code,
            End::Stopped | End::Signal { .. } => None,
        };
        let report = match self.final_report.take() {
            Some(report) => report,
            None => final_snapshot(trace)?,
        };
        let check = verdict::evaluate(report, &self.rules, self.config.limits, command_exit);
        match self.out.as_mut() {
            Some(out) => {
                let text = match self.config.format {
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
}

fn final_snapshot(trace: &mut LiveTrace) -> Result<Report> {
    let snapshot = trace.snapshot(true)?;
    Ok(trace.report(&snapshot, 0))
}
