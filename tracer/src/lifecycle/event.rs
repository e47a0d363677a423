//! What happens to a traced process, as every source reports it: the
//! launcher's ptrace stops, the kernel's sched events, pidfds.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetEvent {
    /// A started command is stopped on its way out, its memory still mapped:
    /// read what is needed, then call `let_exit`.
    Exiting,
    /// The session's processes are gone (a started command: with the exit
    /// code a shell would report, 128 + signal when killed; when known).
    Exited(Option<i32>),
    /// Something happened to one traced process while the session goes on;
    /// apply it with `LiveTrace::apply`, then `TargetWatch::applied`.
    Changed(ProcessChange),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessChange {
    pub pid: u32,
    pub kind: ChangeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A new process, forked by `parent`. A started command's child waits,
    /// stopped, until `applied`.
    Forked { parent: u32 },
    /// Replaced its program at `at_ns` (CLOCK_MONOTONIC). A started
    /// command's process waits for `applied`.
    Execed { at_ns: u64 },
    /// About to exit, memory still mapped; waits for `applied`.
    Exiting,
    /// Gone.
    Ended(Option<i32>),
}
