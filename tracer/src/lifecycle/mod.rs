//! What happens to the traced processes: a command started under ptrace,
//! its entry point, the kernel's fork and exec events, pidfds.
//!
//! Imports go one way (A <- B: B uses A): event, ptrace <- entry, tree,
//! sched_events <- launch (entry, tree) <- watch (launch, sched_events).

pub mod entry;
pub mod event;
pub mod launch;
mod ptrace;
pub mod sched_events;
mod tree;
pub mod watch;
