//! The command line as the rest of the tracer takes it: typed, checked
//! once, with no clap types (as ripgrep's `HiArgs` over its `LowArgs`).
//! `Cli::task` builds it; `app` hands each part to the trace and the front
//! end that use it.

use std::{ffi::OsString, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Result;

use super::args::{self, Cli, Command};
use crate::{
    frontends::{check, diff, live_view::SortKey, report, serve::push::Endpoint},
    kernel::sessions::SessionMode,
    output::folded::Weight,
    target::unwind::UnwindMode,
};

/// What the command line asks for.
pub enum Task {
    /// `report` and `run`: reports on a schedule and at the end.
    Report {
        targets: Targets,
        config: ReportConfig,
    },
    /// A report written as an SVG to `svg`, which is then named on stderr.
    Flamegraph {
        targets: Targets,
        config: ReportConfig,
        svg: PathBuf,
    },
    Top {
        targets: Targets,
        config: TopConfig,
    },
    Check {
        command: Vec<OsString>,
        config: CheckConfig,
    },
    Serve {
        processes: RunningProcesses,
        config: ServeConfig,
    },
    Diff(DiffConfig),
    /// `tracer doctor`: JSON or text.
    Doctor {
        json: bool,
    },
}

/// Running processes to trace: by pid, by name (their comm), or both.
#[derive(Debug, Clone, Default)]
pub struct RunningProcesses {
    pub pids: Vec<u32>,
    pub comm: Vec<String>,
}

/// What to trace: running processes, or a command to start.
#[derive(Debug, Clone)]
pub enum Targets {
    Running(RunningProcesses),
    /// The command and its arguments.
    Command(Vec<OsString>),
}

/// How every tracing command traces: map sizes, probes, unwinding, output
/// to stderr. Named as the flags are.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    pub max_allocations: u32,
    pub max_stacks: u32,
    pub sample_rate: Option<u64>,
    pub symbols_prefix: Vec<String>,
    /// `--wrapper`, `--no-wrapper`.
    pub wrappers: Vec<regex::Regex>,
    pub no_wrappers: Vec<regex::Regex>,
    pub follow_forks: bool,
    pub verbose: bool,
    pub unwind: UnwindMode,
    /// None: sized from what the processes map at start.
    pub unwind_rows: Option<u32>,
    pub noop_probes: bool,
    pub entry_probes: bool,
    pub no_stacks: bool,
    pub uprobe_sessions: SessionMode,
    pub timings: bool,
}

#[derive(Debug, Clone)]
pub struct ReportConfig {
    /// Stop after this long; None: until a signal or the target's exit.
    pub duration: Option<Duration>,
    /// `--interval`, as given.
    pub interval: Option<Duration>,
    pub top: usize,
    pub min_age: Duration,
    pub format: report::Format,
    pub weight: Weight,
    /// None: standard output.
    pub output: Option<PathBuf>,
    pub trace: TraceConfig,
}

#[derive(Debug, Clone)]
pub struct TopConfig {
    pub interval: Duration,
    pub sort: SortKey,
    pub group_by_function: bool,
    pub save_dir: PathBuf,
    /// Where a started command writes; None: nowhere.
    pub command_output: Option<PathBuf>,
    pub trace: TraceConfig,
}

#[derive(Debug, Clone)]
pub struct CheckConfig {
    pub limits: check::verdict::Limits,
    pub min_age: Duration,
    pub suppressions: Vec<PathBuf>,
    /// The C/C++ runtimes' own blocks are suppressed (no
    /// `--no-default-suppressions`).
    pub default_suppressions: bool,
    /// None: the text report on stderr.
    pub report: Option<PathBuf>,
    pub format: check::Format,
    pub trace: TraceConfig,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub top: usize,
    pub interval: Duration,
    pub push: Option<Endpoint>,
    pub push_interval: Duration,
    pub trace: TraceConfig,
}

#[derive(Debug, Clone)]
pub struct DiffConfig {
    pub before: PathBuf,
    pub after: PathBuf,
    pub format: diff::Format,
    pub top: usize,
    pub weight: Weight,
    pub output: Option<PathBuf>,
}

impl Cli {
    /// The task, with every value checked that can be before anything runs
    /// (a bad `--push` URL fails here).
    pub fn task(self) -> Result<Task> {
        Ok(match self.command {
            Command::Report { targets, options } => Task::Report {
                targets: Targets::Running(targets.into()),
                config: options.into(),
            },
            Command::Run { options, command } => Task::Report {
                targets: Targets::Command(command),
                config: options.into(),
            },
            Command::Flamegraph { targets, options } => {
                let mut config: ReportConfig = options.into();
                config.format = report::Format::Svg;
                let svg = config
                    .output
                    .get_or_insert_with(|| "flamegraph.svg".into())
                    .clone();
                Task::Flamegraph {
                    targets: targets.into(),
                    config,
                    svg,
                }
            }
            Command::Top { targets, options } => Task::Top {
                targets: targets.into(),
                config: options.into(),
            },
            Command::Check { options, command } => Task::Check {
                command,
                config: options.into(),
            },
            Command::Serve { targets, options } => Task::Serve {
                processes: targets.into(),
                config: options.try_into()?,
            },
            Command::Diff {
                before,
                after,
                format,
                top,
                weight,
                output,
            } => Task::Diff(DiffConfig {
                before,
                after,
                format,
                top,
                weight,
                output,
            }),
            Command::Doctor { format } => Task::Doctor {
                json: format == args::DoctorFormat::Json,
            },
        })
    }
}

impl From<args::Attach> for RunningProcesses {
    fn from(targets: args::Attach) -> Self {
        RunningProcesses {
            pids: targets.pids,
            comm: targets.comm,
        }
    }
}

impl From<args::AttachOrStart> for Targets {
    fn from(targets: args::AttachOrStart) -> Self {
        match targets.attach() {
            Some(running) => Targets::Running(running.into()),
            None => Targets::Command(targets.command),
        }
    }
}

impl From<args::TraceOptions> for TraceConfig {
    fn from(o: args::TraceOptions) -> Self {
        TraceConfig {
            max_allocations: o.max_allocations,
            max_stacks: o.max_stacks,
            sample_rate: o.sample_rate,
            symbols_prefix: o.symbols_prefix,
            wrappers: o.wrapper,
            no_wrappers: o.no_wrapper,
            follow_forks: o.follow_forks,
            verbose: o.verbose,
            unwind: o.unwind,
            unwind_rows: o.unwind_rows,
            noop_probes: o.noop_probes,
            entry_probes: o.entry_probes,
            no_stacks: o.no_stacks,
            uprobe_sessions: o.uprobe_sessions,
            timings: o.timings,
        }
    }
}

impl From<args::ReportOptions> for ReportConfig {
    fn from(o: args::ReportOptions) -> Self {
        ReportConfig {
            duration: o.duration,
            interval: o.interval,
            top: o.top,
            min_age: o.min_age,
            format: o.format,
            weight: o.weight,
            output: o.output,
            trace: o.trace.into(),
        }
    }
}

impl From<args::TopOptions> for TopConfig {
    fn from(o: args::TopOptions) -> Self {
        TopConfig {
            interval: o.interval,
            sort: o.sort,
            group_by_function: o.group_by_function,
            save_dir: o.save_dir,
            command_output: o.command_output,
            trace: o.trace.into(),
        }
    }
}

impl From<args::CheckOptions> for CheckConfig {
    fn from(o: args::CheckOptions) -> Self {
        CheckConfig {
            limits: check::verdict::Limits::new(o.max_leak_bytes, o.max_leak_allocations),
            min_age: o.min_age,
            suppressions: o.suppressions,
            default_suppressions: !o.no_default_suppressions,
            report: o.report,
            format: o.format,
            trace: o.trace.into(),
        }
    }
}

impl TryFrom<args::ServeOptions> for ServeConfig {
    type Error = anyhow::Error;

    fn try_from(o: args::ServeOptions) -> Result<Self> {
        Ok(ServeConfig {
            listen: o.listen,
            top: o.top,
            interval: o.interval,
            push: o.push.as_deref().map(Endpoint::parse).transpose()?,
            push_interval: o.push_interval,
            trace: o.trace.into(),
        })
    }
}
