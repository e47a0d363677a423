//! One tracing session: attach, then report on a schedule until the
//! duration ends, a signal arrives or the target exits.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    },
    path::Path,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    time::{interval_at, Instant, MissedTickBehavior},
};

use crate::{
    cli::{Format, ReportOptions},
    collect,
    launch::{ChildEvent, Launched},
    output,
    probes::Probes,
    report::{self, RunInfo},
    symbolize::Symbolizer,
    target::Process,
};

/// How often mappings are re-read and dead threads forgotten, whatever the
/// report interval: this bounds what a target that exits can take with it.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
const DEFAULT_TEXT_INTERVAL: Duration = Duration::from_secs(5);

/// How the session learns that the target is gone.
pub enum Target {
    /// An existing process, watched through a pidfd.
    Attached,
    /// A child started by `tracer run`.
    Child(Launched),
}

pub struct Session {
    pub probes: Probes,
    pub process: Process,
    pub run: RunInfo,
    pub options: ReportOptions,
    pub symbolizer: Symbolizer,
    out: Box<dyn Write>,
}

impl Session {
    pub fn new(
        probes: Probes,
        process: Process,
        run: RunInfo,
        options: ReportOptions,
        out: Box<dyn Write>,
    ) -> Result<Self> {
        let mut symbolizer = Symbolizer::new(process.clone());
        symbolizer.note_mappings();
        Ok(Session {
            probes,
            process,
            run,
            options,
            symbolizer,
            out,
        })
    }

    /// Runs until the end; returns the exit code for the tracer.
    pub async fn run(mut self, mut target: Target) -> Result<ExitCode> {
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
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let pidfd = match &target {
            Target::Attached => Some(pidfd(self.process.pid)?),
            Target::Child(_) => None,
        };

        let exit_code = loop {
            tokio::select! {
                _ = housekeeping.tick() => self.housekeeping(),
                _ = reports.tick(), if interval.is_some() => self.emit(false)?,
                _ = &mut deadline => {
                    self.emit(true)?;
                    break ExitCode::SUCCESS;
                }
                _ = sigint.recv() => {
                    self.emit(true)?;
                    break ExitCode::SUCCESS;
                }
                _ = sigterm.recv() => {
                    self.emit(true)?;
                    break ExitCode::SUCCESS;
                }
                _ = readable(&pidfd), if pidfd.is_some() => {
                    // Exited: the maps are gone, the mappings noted so far and
                    // the BPF maps are all there is.
                    self.emit(true)?;
                    break ExitCode::SUCCESS;
                }
                event = child_event(&mut target) => match event {
                    Some(ChildEvent::Exiting) => {
                        self.symbolizer.note_mappings();
                        let result = self.emit(true);
                        if let Target::Child(child) = &target {
                            child.let_exit();
                        }
                        result?;
                        break wait_exit_code(&mut target).await;
                    }
                    Some(ChildEvent::Exited(code)) => {
                        self.emit(true)?;
                        break ExitCode::from(code.clamp(0, 255) as u8);
                    }
                    None => {
                        self.emit(true)?;
                        break ExitCode::SUCCESS;
                    }
                }
            }
        };
        self.out.flush()?;
        Ok(exit_code)
    }

    fn housekeeping(&mut self) {
        if !self.process.is_alive() {
            return;
        }
        self.symbolizer.note_mappings();
        let process = &self.process;
        if let Err(e) = collect::forget_dead_threads(&mut self.probes.ebpf, process.pid, || {
            process.thread_ids()
        }) {
            log::debug!("cleaning in-flight records: {e:#}");
        }
        if let Err(e) = self.probes.housekeeping() {
            log::debug!("probe housekeeping: {e:#}");
        }
    }

    /// Takes a snapshot and writes one report.
    fn emit(&mut self, final_report: bool) -> Result<()> {
        let format = self.options.format;
        let json_lines = format == Format::Json && self.options.interval.is_some();
        if !final_report && (format.is_whole_run() || (format == Format::Json && !json_lines)) {
            return Ok(());
        }
        let snapshot = collect::snapshot(&self.probes.ebpf, self.run.min_age_ns, true)?;
        let top = if format.is_whole_run() {
            0
        } else {
            self.options.top
        };
        let ebpf = &self.probes.ebpf;
        let symbolizer = &mut self.symbolizer;
        let report = report::build(
            &self.run,
            &snapshot,
            top,
            |stack_id| match collect::stack_frames(ebpf, stack_id) {
                Ok(Some((ips, truncated))) => (symbolizer.symbolize_stack(&ips), truncated),
                _ => (Vec::new(), false),
            },
        );
        let weight = self.options.weight;
        let bytes = match format {
            Format::Text => output::text::render(&report, final_report).into_bytes(),
            Format::Json if json_lines => output::json::line(&report).into_bytes(),
            Format::Json => output::json::document(&report).into_bytes(),
            Format::Folded => output::folded::render(&report, weight).into_bytes(),
            Format::Svg => output::flamegraph::render(&report, weight)?,
        };
        self.out.write_all(&bytes).context("writing the report")?;
        self.out.flush().context("writing the report")?;
        Ok(())
    }
}

async fn child_event(target: &mut Target) -> Option<ChildEvent> {
    match target {
        Target::Child(child) => child.events.recv().await,
        Target::Attached => std::future::pending().await,
    }
}

async fn wait_exit_code(target: &mut Target) -> ExitCode {
    loop {
        match child_event(target).await {
            Some(ChildEvent::Exited(code)) => return ExitCode::from(code.clamp(0, 255) as u8),
            Some(ChildEvent::Exiting) => continue,
            None => return ExitCode::SUCCESS,
        }
    }
}

fn pidfd(pid: u32) -> Result<AsyncFd<OwnedFd>> {
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("watching PID {pid}"));
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // Safety: the fd is owned by the AsyncFd and closed only when it drops.
    unsafe { AsyncFd::register(fd) }.map_err(|e| anyhow::anyhow!("watching PID {pid}: {e}"))
}

async fn readable(fd: &Option<AsyncFd<OwnedFd>>) {
    match fd {
        Some(fd) => {
            let _ = fd.readable().await;
        }
        None => std::future::pending().await,
    }
}

/// Standard output, or a new file that is never a symlink planted in the path.
pub fn open_output(path: Option<&Path>) -> Result<Box<dyn Write>> {
    match path {
        None => Ok(Box::new(io::stdout())),
        Some(path) => {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(Box::new(io::BufWriter::new(file)))
        }
    }
}
