//! The command line as clap parses it, and the small parsers it needs.
//! `config` turns it into what the rest of the tracer takes.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    frontends::{check, diff, live_view::SortKey, report},
    kernel::sessions::SessionMode,
    output::folded::Weight,
    target::unwind::UnwindMode,
};

#[derive(Parser, Debug)]
#[command(
    name = "tracer",
    version,
    about = "Find memory leaks in a running Linux process: unfreed heap allocations per call stack, traced with eBPF.",
    long_about = "Find memory leaks in a running Linux process.\n\n\
        tracer attaches eBPF uprobes to the allocator one process really calls (glibc, musl, \
        jemalloc, tcmalloc, mimalloc, static binaries: malloc, calloc, realloc, \
        posix_memalign, aligned_alloc/memalign, valloc, pvalloc, free and their kin) and \
        tracepoints to its mmap/munmap/mremap calls, keeps every live allocation in kernel \
        maps, and reports the call stacks that hold the most unfreed memory. Nothing is \
        injected into the process and it need not be restarted.\n\n\
        Needs root (or CAP_BPF and CAP_PERFMON)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach to running processes and report their outstanding allocations.
    Report {
        #[command(flatten)]
        targets: Attach,
        #[command(flatten)]
        options: ReportOptions,
    },
    /// Write a flamegraph SVG of outstanding memory (a shortcut for
    /// `--format svg`), for running processes (--pid, --comm) or a command
    /// (-- CMD).
    Flamegraph {
        #[command(flatten)]
        targets: AttachOrStart,
        #[command(flatten)]
        options: ReportOptions,
    },
    /// Live full-screen view of the stacks holding the most unfreed memory,
    /// refreshed every second, for running processes (--pid, --comm) or a
    /// command (-- CMD). Needs a terminal; `report` is the scriptable form.
    Top {
        #[command(flatten)]
        targets: AttachOrStart,
        #[command(flatten)]
        options: TopOptions,
    },
    /// Run a command traced and fail when it leaks: exits with the
    /// command's code if it failed, else 23 if what it leaves allocated at
    /// exit (after suppressions) exceeds the limits, else 0. For test suites.
    Check {
        #[command(flatten)]
        options: CheckOptions,
        /// The command and its arguments (after `--`).
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Keep tracing running processes and serve Prometheus metrics at
    /// /metrics, the JSON report at /report and a flamegraph at
    /// /flamegraph.svg. Stops when every traced process has exited.
    Serve {
        #[command(flatten)]
        targets: Attach,
        #[command(flatten)]
        options: ServeOptions,
    },
    /// Start a command traced from its first allocation and report what it
    /// has not freed when it exits. Exits with the command's exit code.
    Run {
        #[command(flatten)]
        options: ReportOptions,
        /// The command and its arguments (after `--`).
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Compare two JSON reports (`--format json`) and show which stacks grew,
    /// most grown bytes first. Take both with `--top 0`: a stack a report
    /// does not list counts as 0 there.
    #[command(
        long_about = None,
        after_help = "Stacks are matched by their frames (function and module, or the address \
            where a frame has no name), not by stack id, so reports from two runs compare. \
            A JSON Lines file (--interval) counts as its last report. Needs no privileges."
    )]
    Diff {
        /// The earlier report.
        before: PathBuf,
        /// The later report.
        after: PathBuf,
        /// Output format: text lists changed stacks by growth; folded is
        /// `stack before after` lines; svg is a differential flamegraph (red
        /// grew, blue shrank).
        #[arg(long, value_enum, default_value_t = diff::Format::Text)]
        format: diff::Format,
        /// Changed stacks to list in text (0: all).
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// What flamegraph widths (folded, svg) measure.
        #[arg(long, value_enum, default_value_t = Weight::Bytes)]
        weight: Weight,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Say what this machine's kernel offers the tracer (eBPF, uprobes,
    /// tracepoints, helpers, map operations, lockdown...), which paths the
    /// tracer takes because of it, and whether it can run here: exits 0 if
    /// it can, 1 if not. Loads the programs once to be sure (as root).
    Doctor {
        /// text: one screen; json: one object (capabilities by name, each
        /// with `available` true, false or null for unknown, and `detail`).
        #[arg(long, value_enum, default_value_t = DoctorFormat::Text)]
        format: DoctorFormat,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoctorFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct ReportOptions {
    /// Stop after this long (e.g. 30s, 2m); default: until Ctrl-C or the target exits.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print a report this often. Text reports default to every 5s; JSON
    /// prints one line per interval (JSON Lines) only when this is given.
    #[arg(long, value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Stacks to list, most outstanding bytes first (0: all).
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Only count allocations at least this old (e.g. 2s, 500ms).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub min_age: Duration,
    /// Output format. folded, svg (a flamegraph), pprof and speedscope
    /// cover every stack and are written once, at the end.
    #[arg(long, value_enum, default_value_t = report::Format::Text)]
    pub format: report::Format,
    /// What flamegraph widths (folded, svg, speedscope) measure; pprof carries both.
    #[arg(long, value_enum, default_value_t = Weight::Bytes)]
    pub weight: Weight,
    /// Write reports to this file instead of standard output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub trace: TraceOptions,
}

/// Running processes to trace: by pid, by name, or both.
#[derive(Args, Debug, Clone, Default)]
#[group(required = true, multiple = true)]
pub struct Attach {
    /// Process to trace; repeat for several (each stack is reported with
    /// its process).
    #[arg(long = "pid", short = 'p', value_name = "PID")]
    pub pids: Vec<u32>,
    /// Trace every running process named NAME (its comm, as `ps -o comm`
    /// shows: at most 15 characters); repeatable.
    #[arg(long, value_name = "NAME")]
    pub comm: Vec<String>,
}

/// Running processes to trace, or a command to start traced.
#[derive(Args, Debug, Clone, Default)]
pub struct AttachOrStart {
    /// Process to trace; repeat for several. Without --pid or --comm, the
    /// command after `--` is started.
    #[arg(long = "pid", short = 'p', value_name = "PID")]
    pub pids: Vec<u32>,
    /// Trace every running process named NAME (its comm); repeatable.
    #[arg(long, value_name = "NAME")]
    pub comm: Vec<String>,
    /// The command and its arguments (after `--`), when no --pid or --comm
    /// is given.
    #[arg(
        last = true,
        value_name = "CMD",
        required_unless_present_any = ["pids", "comm"],
        conflicts_with_all = ["pids", "comm"]
    )]
    pub command: Vec<OsString>,
}

impl AttachOrStart {
    /// The processes to attach to, or None: start the command.
    pub fn attach(&self) -> Option<Attach> {
        (!self.pids.is_empty() || !self.comm.is_empty()).then(|| Attach {
            pids: self.pids.clone(),
            comm: self.comm.clone(),
        })
    }
}

/// What every command that traces shares: map sizes and verbosity.
#[derive(Args, Debug, Clone)]
pub struct TraceOptions {
    /// Live allocations the kernel side can track at once (kernel memory:
    /// about 80 bytes each).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_allocations: u32,
    /// Distinct call stacks the kernel side can hold (about 1 KiB each, allocated as used).
    #[arg(long, default_value_t = 65536)]
    pub max_stacks: u32,
    /// Sample allocations, about one every BYTES bytes allocated (e.g. 512k),
    /// instead of tracking every one: much cheaper for allocation-heavy
    /// programs; reported bytes and counts become unbiased estimates.
    #[arg(long, value_name = "BYTES", value_parser = crate::sampling::parse_rate)]
    pub sample_rate: Option<u64>,
    /// Also probe an allocator whose functions carry this prefix
    /// (PREFIXmalloc, PREFIXfree, ...), in the first object that defines
    /// them; repeatable. je_, _rjem_, mi_ and tc_ are looked for anyway.
    #[arg(long = "symbols-prefix", value_name = "PREFIX")]
    pub symbols_prefix: Vec<String>,
    /// Treat functions matching this regex as allocation wrappers, like
    /// xmalloc: one-line labels (top's ALLOCATED IN, report headings,
    /// metrics and JUnit names) name the first frame past them; repeatable.
    /// Adds to a built-in list (xmalloc, g_malloc, zmalloc, palloc,
    /// operator new, Rust's alloc::, strdup...) and to functions seen called
    /// from many places. Full stacks are unchanged.
    #[arg(long = "wrapper", value_name = "REGEX", value_parser = crate::report::label::parse_pattern)]
    pub wrapper: Vec<regex::Regex>,
    /// Never treat functions matching this regex as wrappers; repeatable.
    #[arg(long = "no-wrapper", value_name = "REGEX", value_parser = crate::report::label::parse_pattern)]
    pub no_wrapper: Vec<regex::Regex>,
    /// Also trace the processes the traced ones fork, and what they exec,
    /// each reported on its own (a started command's children are stopped
    /// until their probes are in place; a running process's children are
    /// attached a few milliseconds after the fork).
    #[arg(long)]
    pub follow_forks: bool,
    /// Print what is probed, and where, to standard error.
    #[arg(long, short)]
    pub verbose: bool,
    /// How allocation stacks are walked: cfi (the default: the .eh_frame
    /// unwind tables of every mapped object, right for code built without
    /// frame pointers; costs kernel memory for the tables, which -v shows)
    /// or fp (frame pointers only: cheaper, but code built without them
    /// hides its caller).
    #[arg(long, value_enum, default_value_t = UnwindMode::Cfi)]
    pub unwind: UnwindMode,
    /// With --unwind cfi: unwind rows the kernel side can hold for all
    /// mapped objects together (8 bytes each, allocated at start; objects
    /// that do not fit are walked with frame pointers). Default: what the
    /// traced processes map at start, and a quarter more (at least 128 Ki
    /// rows) for what they load later.
    #[arg(long)]
    pub unwind_rows: Option<u32>,
    /// Benchmarking: attach programs that do nothing, at the same addresses.
    #[arg(long, hide = true, conflicts_with = "no_stacks")]
    pub noop_probes: bool,
    /// Benchmarking: put every probe at its function's entry (no moving to
    /// the first instruction the kernel emulates).
    #[arg(long, hide = true)]
    pub entry_probes: bool,
    /// Benchmarking: track blocks without capturing their stacks.
    #[arg(long, hide = true)]
    pub no_stacks: bool,
    /// Benchmarking: when the allocation functions are probed with one
    /// uprobe session program (kernel 6.13+) instead of a uprobe and a
    /// uretprobe each: auto (with --sample-rate), always, never.
    #[arg(long, hide = true, value_enum, default_value_t = SessionMode::Auto)]
    pub uprobe_sessions: SessionMode,
    /// Benchmarking: print how long attaching, snapshots, symbolization and
    /// rendering take, to standard error.
    #[arg(long, hide = true)]
    pub timings: bool,
}

#[derive(Args, Debug, Clone)]
pub struct TopOptions {
    /// Refresh the view this often.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub interval: Duration,
    /// Initial sort order (keys b, c, r, a change it).
    #[arg(long, value_enum, default_value_t = SortKey::Growth)]
    pub sort: SortKey,
    /// Start with one row per allocating function instead of per stack (key g).
    #[arg(long)]
    pub group_by_function: bool,
    /// Where the `f` (flamegraph) and `s` (JSON snapshot) keys write their files.
    #[arg(long, default_value = ".")]
    pub save_dir: PathBuf,
    /// With `-- CMD`: where the command's output goes (the view owns the
    /// terminal); default: discarded.
    #[arg(long, value_name = "FILE")]
    pub command_output: Option<PathBuf>,
    #[command(flatten)]
    pub trace: TraceOptions,
}

#[derive(Args, Debug, Clone)]
pub struct CheckOptions {
    /// Fail when more bytes than this leak. Without either limit, any leak
    /// fails; with only one, only that one counts.
    #[arg(long, value_name = "BYTES")]
    pub max_leak_bytes: Option<u64>,
    /// Fail when more allocations than this leak.
    #[arg(long, value_name = "N")]
    pub max_leak_allocations: Option<u64>,
    /// Only count blocks at least this old at exit.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub min_age: Duration,
    /// LeakSanitizer-style suppressions file (`leak:PATTERN` per line,
    /// matched against function, file and module names); repeatable.
    #[arg(long, value_name = "FILE")]
    pub suppressions: Vec<PathBuf>,
    /// Do not suppress what the C/C++ runtimes keep on purpose (stdio
    /// buffers, locale data, libstdc++'s emergency pool...).
    #[arg(long)]
    pub no_default_suppressions: bool,
    /// Write the check report to this file (a one-line verdict still goes
    /// to stderr); default: the text report on stderr.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Format of --report.
    #[arg(long, value_enum, default_value_t = check::Format::Text)]
    pub format: check::Format,
    #[command(flatten)]
    pub trace: TraceOptions,
}

#[derive(Args, Debug, Clone)]
pub struct ServeOptions {
    /// Address to serve on. Loopback by default; any other address must be
    /// given here explicitly.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub listen: std::net::SocketAddr,
    /// Stacks exported as their own series (by outstanding bytes); the rest
    /// are summed into one `stack_id="other"` series.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Read the kernel maps this often.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub interval: Duration,
    /// Also POST a pprof profile to this Pyroscope-compatible server's
    /// /ingest every --push-interval (http://host:port; plain HTTP).
    #[arg(long, value_name = "URL")]
    pub push: Option<String>,
    /// How often --push sends a profile.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub push_interval: Duration,
    #[command(flatten)]
    pub trace: TraceOptions,
}

/// "30s", "500ms", "2m", "1h", "1.5s", or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration (examples: 30s, 500ms, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" | "sec" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit '{other}' in '{text}' (use ms, s, m or h)"
            ))
        }
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(format!("'{text}' is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        for bad in ["", "s", "abc", "5 parsecs", "-1s", "1e99h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["tracer", "run", "--top", "3", "--", "ls", "-l"]).unwrap();
        match cli.command {
            Command::Run { options, command } => {
                assert_eq!(options.top, 3);
                assert_eq!(command, ["ls", "-l"]);
            }
            _ => panic!("expected run"),
        }
        assert!(
            Cli::try_parse_from(["tracer", "report"]).is_err(),
            "--pid is required"
        );
        let cli = Cli::try_parse_from(["tracer", "report", "--pid", "1", "-p", "2", "--comm", "x"])
            .unwrap();
        match cli.command {
            Command::Report { targets, .. } => {
                assert_eq!(targets.pids, [1, 2]);
                assert_eq!(targets.comm, ["x"]);
            }
            _ => panic!("expected report"),
        }
        assert!(Cli::try_parse_from(["tracer", "report", "--comm", "x"]).is_ok());
        assert!(Cli::try_parse_from(["tracer", "top", "--pid", "1", "--", "ls"]).is_err());
        assert!(Cli::try_parse_from(["tracer", "flamegraph"]).is_err());
    }
}
