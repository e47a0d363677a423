//! Memory leak tracer: eBPF probes on a process's allocator keep every live
//! allocation and per-stack totals in kernel maps; this crate loads them,
//! reads the totals and reports the stacks that hold unfreed memory.
//!
//! The data path, one direction:
//! `probes` (load, attach) -> BPF maps -> `collect` -> `model::Snapshot` ->
//! `symbolize` -> `report` -> `output` (text, JSON, folded, SVG, pprof,
//! speedscope). `diff` compares two JSON reports for `tracer diff`.
//! `target`, `procmaps`, `elf` and `allocator` find what to probe;
//! `launch` starts a command for `tracer run`; `live` holds a traced process;
//! `watch` tells when it ends; `session` runs the report loop, `top` the
//! live view, `check` the CI leak gate and `serve` the metrics exporter; `app` wires the command line to all of it.

pub mod allocator;
pub mod app;
pub mod batch;
pub mod check;
pub mod cli;
pub mod collect;
pub mod detect;
pub mod diff;
pub mod elf;
pub mod launch;
pub mod launch_entry;
pub mod live;
pub mod mapping_trace;
pub mod mappings;
pub mod model;
pub mod output;
pub mod placement;
pub mod privileges;
pub mod probes;
pub mod proc_events;
pub mod procmaps;
pub mod report;
pub mod sampling;
pub mod serve;
pub mod session;
pub mod signals;
pub mod slots;
pub mod symbolize;
pub mod target;
pub mod top;
pub mod unwind;
pub mod uprobe_session;
pub mod watch;
