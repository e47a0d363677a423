//! Dispatch: the command line's task (`cli`), the trace it needs
//! (`trace::setup`), the front end that shows it (`frontends`).

use std::{process::ExitCode, time::Duration};

use anyhow::Result;

use crate::{
    cli::{Cli, Targets, Task, TraceConfig},
    frontends::{check, diff, doctor, open_output, report, serve, top},
    lifecycle::{launch::ChildOutput, watch::TargetWatch},
    trace::{setup, LiveTrace},
};

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let task = cli.task()?;
    // Before any map: 5.10 charges them to RLIMIT_MEMLOCK.
    crate::memlock::raise();
    // Before anything slow: a Ctrl-C during setup must reach the loop.
    crate::signals::install()?;
    match task {
        Task::Report { targets, config } => {
            let out = open_output(config.output.as_deref())?;
            let (trace, watch) = trace(targets, &config.trace, config.min_age, || {
                Ok(ChildOutput::Inherit)
            })?;
            report::run(trace, watch, config, out).await
        }
        Task::Flamegraph {
            targets,
            config,
            svg,
        } => {
            let out = open_output(Some(&svg))?;
            let (trace, watch) = trace(targets, &config.trace, config.min_age, || {
                Ok(ChildOutput::Inherit)
            })?;
            let code = report::run(trace, watch, config, out).await?;
            eprintln!("tracer: wrote {}", svg.display());
            Ok(code)
        }
        Task::Check { command, config } => {
            // Bad suppressions or an unwritable report fail before the command runs.
            let rules = check::load_rules(&config)?;
            let out = match &config.report {
                Some(path) => Some(open_output(Some(path))?),
                None => None,
            };
            let (trace, watch) =
                setup::start(command, &config.trace, config.min_age, ChildOutput::Inherit)?;
            check::run(trace, watch, config, rules, out).await
        }
        Task::Top { targets, config } => {
            // Refuse before attaching anything: a redirected top is a mistake.
            top::terminal::require_terminal()?;
            let (trace, watch) = trace(targets, &config.trace, Duration::ZERO, || {
                top::command_output(config.command_output.as_deref())
            })?;
            top::run(trace, watch, config).await
        }
        Task::Serve { processes, config } => {
            // A taken port fails before attaching.
            let listener = serve::bind(config.listen).await?;
            let (trace, watch) = setup::attach(&processes, &config.trace, Duration::ZERO)?;
            serve::run(trace, watch, config, listener).await
        }
        Task::Diff(config) => diff::run(&config),
        Task::Doctor { json } => doctor::run(json),
    }
}

/// Attaches to running processes or starts the command; `output` says where
/// a started command writes.
fn trace(
    targets: Targets,
    config: &TraceConfig,
    min_age: Duration,
    output: impl FnOnce() -> Result<ChildOutput>,
) -> Result<(LiveTrace, TargetWatch)> {
    match targets {
        Targets::Running(processes) => setup::attach(&processes, config, min_age),
        Targets::Command(command) => setup::start(command, config, min_age, output()?),
    }
}
