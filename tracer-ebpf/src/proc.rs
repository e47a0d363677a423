//! Fork and exec of traced processes, from the `sched_process_fork` and
//! `sched_process_exec` tracepoints, sent to userspace through a ring
//! buffer. For processes the tracer attached to (`--pid`, `--comm`), which
//! it does not ptrace: a fork is followed (`--follow-forks`) by attaching to
//! the child, an exec by dropping the old program's blocks and probing the
//! new one. A started command's forks and execs come through ptrace instead.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{ProcEvent, PROC_EXEC, PROC_FORK};

use crate::maps::{is_target, PROC_EVENTS};

/// Offset of `child_pid` in the fork tracepoint's record; it moved between
/// kernel versions (the comms became `__data_loc`), so userspace reads it
/// from the tracepoint's format file and sets it at load.
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 44;

#[inline(always)]
fn emit(kind: u32, tgid: u32, pid: u32) {
    let event = ProcEvent {
        kind,
        tgid,
        pid,
        _pad: 0,
        at_ns: unsafe { bpf_ktime_get_ns() },
    };
    // A lost event is a process not followed; the ring buffer is sized so
    // that userspace, which drains it at once, does not fall behind.
    let _ = PROC_EVENTS.output::<ProcEvent>(&event, 0);
}

#[tracepoint]
pub fn process_fork(ctx: TracePointContext) -> u32 {
    // Runs in the parent.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let offset = unsafe { core::ptr::read_volatile(&FORK_CHILD_PID_OFFSET) } as usize;
    let Ok(child) = (unsafe { ctx.read_at::<i32>(offset) }) else {
        return 0;
    };
    emit(PROC_FORK, tgid, child as u32);
    0
}

#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    // Runs in the process, on its new program.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if is_target(tgid) {
        crate::unwind::program_replaced(tgid);
        emit(PROC_EXEC, tgid, tgid);
    }
    0
}
