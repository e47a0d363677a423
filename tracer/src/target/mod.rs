//! The traced process as the tracer finds it: its /proc files, its ELF
//! objects, which allocator it calls, where to probe, unwind tables.

pub mod allocator;
pub mod detect;
pub mod elf;
pub mod memory;
pub mod memory_map;
pub mod placement;
pub mod process;
pub mod tasks;
pub mod unwind;
pub mod wrappers;
