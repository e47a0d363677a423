//! What happens to the traced processes: a command started under ptrace,
//! its entry point, the kernel's fork and exec events, pidfds.

pub mod entry;
pub mod event;
pub mod launch;
mod ptrace;
pub mod sched_events;
mod tree;
pub mod watch;
