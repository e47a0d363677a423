//! One tracing session: attach, then report on a schedule until the
//! duration ends, a signal arrives or the target exits.

use std::{io::Write, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use tokio::time::{interval_at, Instant, MissedTickBehavior};

use crate::{
    cli::ReportConfig,
    lifecycle::watch::{exit_code, TargetEvent, TargetWatch},
    output,
    trace::LiveTrace,
};

/// How often mappings are re-read and dead threads forgotten, whatever the
/// report interval: this bounds what a target that exits can take with it.
pub const HOUSEKEEPING: Duration = Duration::from_secs(1);
const DEFAULT_TEXT_INTERVAL: Duration = Duration::from_secs(5);

/// What a report is written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    /// Collapsed stacks `root;...;leaf weight`.
    Folded,
    /// Interactive flamegraph SVG.
    Svg,
    /// Gzipped pprof profile.
    Pprof,
    /// speedscope's JSON format.
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

pub struct Session {
    pub trace: LiveTrace,
    pub options: ReportConfig,
    out: Box<dyn Write>,
}

impl Session {
    pub fn new(trace: LiveTrace, options: ReportConfig, out: Box<dyn Write>) -> Self {
        Session {
            trace,
            options,
            out,
        }
    }

    /// Runs until the end; returns the exit code for the tracer.
    pub async fn run(mut self, mut target: TargetWatch) -> Result<ExitCode> {
        let interval = match (self.options.interval, self.options.format) {
            (_, f) if f.is_whole_run() => None,
            (Some(i), _) => Some(i.max(Duration::from_millis(100))),
            (None, Format::Text) => Some(DEFAULT_TEXT_INTERVAL),
            (None, _) => None,
        };
        let started = Instant::now();
        let mut housekeeping = interval_at(started + HOUSEKEEPING, HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut reports = interval_at(
            started + interval.unwrap_or(Duration::MAX / 4),
            interval.unwrap_or(Duration::MAX / 4),
        );
        reports.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let deadline = tokio::time::sleep(
            self.options
                .duration
                .unwrap_or(Duration::from_secs(u32::MAX as u64)),
        );
        tokio::pin!(deadline);
        let crate::signals::Signals {
            interrupt: mut sigint,
            terminate: mut sigterm,
        } = crate::signals::take()?;
        let mut interrupted = false;

        let exit_code = loop {
            tokio::select! {
                _ = housekeeping.tick() => self.trace.housekeeping(),
                _ = reports.tick(), if interval.is_some() => self.emit(false)?,
                _ = &mut deadline => {
                    self.emit(true)?;
                    break ExitCode::SUCCESS;
                }
                // A command we started gets Ctrl-C too (same process group)
                // and a SIGTERM is passed on: wait for it to exit, so the
                // report sees its cleanup and we exit with its code. A second
                // signal stops at once.
                _ = sigint.recv() => {
                    if target.started_pid().is_some() && !interrupted {
                        interrupted = true;
                        continue;
                    }
                    self.emit(true)?;
                    // Attached: the user ends the session, a success.
                    break if interrupted { ExitCode::from(130) } else { ExitCode::SUCCESS };
                }
                _ = sigterm.recv() => {
                    if let (Some(pid), false) = (target.started_pid(), interrupted) {
                        interrupted = true;
                        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                        continue;
                    }
                    self.emit(true)?;
                    break if interrupted { ExitCode::from(143) } else { ExitCode::SUCCESS };
                }
                event = target.next() => match event {
                    TargetEvent::Exiting => {
                        self.trace.main_exiting();
                        let result = self.emit(true);
                        target.let_exit();
                        result?;
                        break exit_code(target.exit_code().await);
                    }
                    // Exited: the maps are gone, the mappings noted so far and
                    // the BPF maps are all there is.
                    TargetEvent::Changed(change) => self.trace.apply(change, &mut target),
                    TargetEvent::Exited(code) => {
                        self.emit(true)?;
                        break exit_code(code);
                    }
                }
            }
        };
        self.out.flush()?;
        Ok(exit_code)
    }

    /// Takes a snapshot and writes one report.
    fn emit(&mut self, final_report: bool) -> Result<()> {
        let format = self.options.format;
        let json_lines = format == Format::Json && self.options.interval.is_some();
        if !final_report && (format.is_whole_run() || (format == Format::Json && !json_lines)) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let snapshot = if final_report {
            self.trace.snapshot_exact()?
        } else {
            self.trace.snapshot(true)?
        };
        let snapshot_done = std::time::Instant::now();
        let top = if format.is_whole_run() {
            0
        } else {
            self.options.top
        };
        let report = match format {
            // pprof's alloc_* values include stacks whose blocks were all freed.
            Format::Pprof => self.trace.report_every_stack(&snapshot),
            _ => self.trace.report(&snapshot, top),
        };
        let report_done = std::time::Instant::now();
        let weight = self.options.weight;
        let process = &self.trace.primary().process;
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
        if self.options.trace.timings {
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
