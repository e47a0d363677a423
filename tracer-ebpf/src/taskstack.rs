//! Keeps the uprobe programs on the task's own kernel stack.
//!
//! Since 6.13 the x86-64 and arm64 JITs give a kprobe-type program (uprobes
//! included) whose stack frame is 64 bytes or more a *private stack*: one
//! per CPU, not per task (`bpf_enable_priv_stack()`, `BPF_PRIV_STACK_MIN_SIZE`
//! in kernel/bpf/verifier.c). That assumes the program cannot be preempted,
//! but uprobe programs run with migration disabled and preemption on. On a
//! preemptible kernel (`preempt=full`, lazy, RT) a thread preempted inside
//! `alloc_return` resumes with its spilled pointers overwritten by another
//! thread's run on the same CPU: a kernel Oops (seen on Debian's 7.3).
//!
//! The verifier never gives a private stack to a program that contains a
//! tail call, so each program starts with one into an empty program array:
//! the slot is never filled, the call falls through, and with a constant
//! index the JIT makes it a patched jump that costs nothing measurable. (The
//! proper tool, the `bpf_preempt_disable` kfunc of 6.10+, cannot be called
//! from aya 0.14, which does not relocate kfunc calls.) One array per
//! program: the kernel only lets programs of one type and attach type share
//! a program array, and a program may be loaded as a uprobe, a uprobe_multi
//! or a session.
//!
//! Syscall and sched tracepoint programs run with preemption disabled and
//! need no guard.

/// Tail-calls into an empty one-slot program array named `$map`.
macro_rules! keep_task_stack {
    ($ctx:expr, $map:ident) => {{
        #[aya_ebpf::macros::map]
        static $map: aya_ebpf::maps::ProgramArray =
            aya_ebpf::maps::ProgramArray::with_max_entries(1, 0);
        unsafe { $map.tail_call($ctx, 0) };
    }};
}
pub(crate) use keep_task_stack;
