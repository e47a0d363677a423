//! The command line: `args` is what clap parses, `config` what the rest of
//! the tracer takes, built from it once (`Cli::task`). Nothing outside
//! `cli` and `app` sees a clap type.

pub mod args;
pub mod config;

pub use args::Cli;
pub use config::{
    CheckConfig, DiffConfig, ReportConfig, RunningProcesses, ServeConfig, Targets, Task, TopConfig,
    TraceConfig,
};
