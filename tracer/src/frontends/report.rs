//! `report`, `run` and `flamegraph`: report on a schedule, and once more at
//! the end: when the duration ends, a signal arrives or the target exits.

use std::{io::Write, pin::Pin, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use tokio::time::{interval_at, Instant, Interval, MissedTickBehavior, Sleep};

use crate::{
    cli::ReportConfig,
    driver::{self, End, Flow, FrontEnd, LastLook, OnSignal},
    lifecycle::watch::{exit_code, TargetWatch},
    output,
    trace::LiveTrace,
};

const DEFAULT_TEXT_INTERVAL: Duration = Duration::from_secs(5);

/// What a report is written as.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    /// Collapsed stacks `root;...;leaf weight` (flamegraph.pl, inferno, speedscope).
    Folded,
    /// Interactive flamegraph SVG.
    Svg,
    /// Gzipped pprof profile (go tool pprof, Pyroscope, Parca): outstanding
    /// and since-attach allocations.
    Pprof,
    /// speedscope's JSON format (speedscope.app), with files and lines.
    Speedscope,
}

impl Format {
    /// Formats that describe the whole run once, at the end, with every stack.
    pub fn is_whole_run(self) -> bool {
        matches!(
            self,
            Format::Folded | Format::Svg | Format::Pprof | Format::Speedscope
        )
    }
}

/// Traces until the end; returns the exit code for the tracer.
pub async fn run(
    trace: LiveTrace,
    target: TargetWatch,
    config: ReportConfig,
    out: Box<dyn Write>,
) -> Result<ExitCode> {
    driver::run(Reporter::new(config, out), trace, target).await
}

struct Reporter {
    config: ReportConfig,
    out: Box<dyn Write>,
    /// None: no report before the final one.
    interval: Option<Duration>,
    reports: Interval,
    deadline: Pin<Box<Sleep>>,
}

enum Tick {
    Report,
    /// `--duration` is over.
    Deadline,
}

impl Reporter {
    fn new(config: ReportConfig, out: Box<dyn Write>) -> Self {
        let interval = match (config.interval, config.format) {
            (_, f) if f.is_whole_run() => None,
            (Some(i), _) => Some(i.max(Duration::from_millis(100))),
            (None, Format::Text) => Some(DEFAULT_TEXT_INTERVAL),
            (None, _) => None,
        };
        let started = Instant::now();
        let mut reports = interval_at(
            started + interval.unwrap_or(Duration::MAX / 4),
            interval.unwrap_or(Duration::MAX / 4),
        );
        reports.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let deadline = Box::pin(tokio::time::sleep(
            config
                .duration
                .unwrap_or(Duration::from_secs(u32::MAX as u64)),
        ));
        Reporter {
            config,
            out,
            interval,
            reports,
            deadline,
        }
    }

    /// Takes a snapshot and writes one report.
    fn emit(&mut self, trace: &mut LiveTrace, final_report: bool) -> Result<()> {
        let format = self.config.format;
        let json_lines = format == Format::Json && self.config.interval.is_some();
        if !final_report && (format.is_whole_run() || (format == Format::Json && !json_lines)) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let snapshot = if final_report {
            trace.snapshot_exact()?
        } else {
            trace.snapshot(true)?
        };
        let snapshot_done = std::time::Instant::now();
        let top = if format.is_whole_run() {
            0
        } else {
            self.config.top
        };
        let report = match format {
            // pprof's alloc_* values include stacks whose blocks were all freed.
            Format::Pprof => trace.report_every_stack(&snapshot),
            _ => trace.report(&snapshot, top),
        };
        let report_done = std::time::Instant::now();
        let weight = self.config.weight;
        let process = &trace.primary().process;
        let bytes = match format {
            Format::Text => output::text::render(&report, final_report).into_bytes(),
            Format::Json if json_lines => output::json::line(&report).into_bytes(),
            Format::Json => output::json::document(&report).into_bytes(),
            Format::Folded => output::folded::render(&report, weight).into_bytes(),
            Format::Svg => output::flamegraph::render(&report, weight)?,
            Format::Pprof => output::pprof::render(&report, &|module| {
                crate::target::elf::build_id(&process.host_path(module))
            })?,
            Format::Speedscope => output::speedscope::render(&report, weight).into_bytes(),
        };
        if self.config.trace.timings {
            let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
            eprintln!(
                "tracer: timing: snapshot {:.1} ms ({} stacks), report {:.1} ms ({} stacks symbolized), render {:.1} ms",
                ms(started, snapshot_done),
                snapshot.stacks.len(),
                ms(snapshot_done, report_done),
                report.stacks.len(),
                ms(report_done, std::time::Instant::now()),
            );
        }
        self.out.write_all(&bytes).context("writing the report")?;
        self.out.flush().context("writing the report")?;
        Ok(())
    }
}

impl FrontEnd for Reporter {
    type Event = Tick;
    // `run` waits for its command after Ctrl-C: the report sees its cleanup
    // and the tracer exits with its code.
    const ON_SIGNAL: OnSignal = OnSignal::PassOnOnce;

    async fn next(&mut self) -> Tick {
        tokio::select! {
            _ = self.reports.tick(), if self.interval.is_some() => Tick::Report,
            _ = self.deadline.as_mut() => Tick::Deadline,
        }
    }

    fn event(&mut self, trace: &mut LiveTrace, tick: Tick) -> Result<Flow> {
        match tick {
            Tick::Report => {
                self.emit(trace, false)?;
                Ok(Flow::Continue)
            }
            // The final report is `end`'s.
            Tick::Deadline => Ok(Flow::Stop),
        }
    }

    fn last_look(&mut self, trace: &mut LiveTrace, _process: LastLook<'_>) -> Result<Flow> {
        self.emit(trace, true)?;
        Ok(Flow::Stop)
    }

    // The maps are gone: the mappings noted so far and the BPF maps are all
    // there is.
    fn exited(&mut self, trace: &mut LiveTrace, _code: Option<i32>) -> Result<Flow> {
        self.emit(trace, true)?;
        Ok(Flow::Stop)
    }

    fn end(mut self, trace: &mut LiveTrace, end: End) -> Result<ExitCode> {
        let code = match end {
            // Written at the last look or the exit.
            End::Exited(code) => exit_code(code),
            End::Stopped => {
                self.emit(trace, true)?;
                ExitCode::SUCCESS
            }
            End::Signal {
                signal,
                after_passing_on,
            } => {
                self.emit(trace, true)?;
                // Attached: the user ends the session, a success.
                if after_passing_on {
                    signal.exit_code()
                } else {
                    ExitCode::SUCCESS
                }
            }
        };
        self.out.flush()?;
        Ok(code)
    }
}
