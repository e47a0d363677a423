//! Memory leak tracer: eBPF probes on a process's allocator keep every live
//! allocation and per-stack totals in kernel maps; this crate loads them,
//! reads the totals and reports the stacks that hold unfreed memory.
//!
//! The data path, one direction (each folder is one step):
//! `target` (the process: /proc, ELF, allocator, probe placement, unwind
//! tables) -> `kernel` (programs, maps, links) -> `collect` (maps ->
//! `model::Snapshot`) -> `symbolize` -> `report` -> `output` (text, JSON,
//! folded, SVG, pprof, speedscope) and `frontends` (report, top, check,
//! serve). `lifecycle` says what happens to the traced processes (started,
//! forked, exec'ed, exited), `trace` applies it; `driver` is the one loop
//! the front ends run in; `app` wires the command line (`cli`) to all of it.

pub mod app;
pub mod cli;
pub mod collect;
pub mod driver;
pub mod frontends;
pub mod kernel;
pub mod lifecycle;
pub mod memlock;
pub mod model;
pub mod output;
pub mod report;
pub mod sampling;
pub mod signals;
pub mod symbolize;
pub mod target;
pub mod trace;
