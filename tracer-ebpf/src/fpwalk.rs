//! User stack walk by frame pointers (`--unwind fp`, and for processes or
//! code without CFI tables), done
//! here instead of by the kernel's `bpf_get_stack(BPF_F_USER_STACK)`.
//!
//! Both follow the same chain (`[rbp]` = caller's rbp, `[rbp+8]` = return
//! address). The kernel's walk stops only at its depth limit or at a read
//! that faults, and the outermost frames of a typical program (glibc's
//! `__libc_start_call_main`, built without frame pointers) leave a garbage
//! "frame pointer" at the end of the chain: the kernel reads it, takes a
//! page fault with fault-up disabled, and that fault costs about 600 ns per
//! allocation on the project's virtual machines (measured with
//! kernel.bpf_stats_enabled: 1,220 ns per `alloc_return` against 635 ns with
//! the walk capped before the end). This walk stops instead as soon as the
//! chain stops going up the stack: frames are pushed downwards, so a
//! caller's frame is always above its callee's, and a next frame pointer
//! that is not above the current one (or absurdly far above, or misaligned)
//! ends the stack without reading it.
//!
//! What it may lose against the kernel's walk: frames past a switch to
//! another stack (a signal handler on an alternate stack, a coroutine),
//! where the chain legitimately jumps downwards.

use aya_ebpf::{bindings::pt_regs, helpers::bpf_probe_read_user, EbpfContext};
use tracer_common::{StackTrace, MAX_FRAMES};

/// A caller's frame further above its callee's than this is taken for
/// garbage (a real gap is the callee's locals: alloca of megabytes aside,
/// far less).
const MAX_FRAME_GAP: u64 = 8 << 20;

/// Writes the return addresses of the current user stack into `trace`,
/// innermost first (the first is the interrupted instruction pointer, as
/// with `bpf_get_stack`), and their number into `trace.len`.
///
/// The count goes through map memory, not a return value, on purpose: each
/// way out of the unrolled loop has its own constant length, and code after
/// the walk that kept using it would be verified once per length (most of a
/// second at load time). Read back from the map, it is one unknown number.
#[inline(always)]
pub fn walk<C: EbpfContext>(ctx: &C, trace: &mut StackTrace) {
    let regs = ctx.as_ptr() as *const pt_regs;
    let (ip, mut fp) = unsafe { ((*regs).rip, (*regs).rbp) };
    trace.len = 0;
    trace.outermost = 0;
    if ip == 0 {
        return;
    }
    trace.ips[0] = ip;
    trace.len = 1;
    for i in 1..MAX_FRAMES {
        if fp == 0 || fp & 7 != 0 {
            break;
        }
        // [fp] = the caller's frame pointer, [fp + 8] = the return address.
        let Ok(frame) = (unsafe { bpf_probe_read_user(fp as *const [u64; 2]) }) else {
            break;
        };
        let (next, ret) = (frame[0], frame[1]);
        if ret == 0 {
            trace.outermost = 1;
            break;
        }
        trace.ips[i] = ret;
        trace.len = i as u64 + 1;
        if next <= fp || next - fp > MAX_FRAME_GAP {
            // A chain ending in a zero frame pointer (`_start` clears rbp)
            // is whole; anything else is garbage where the chain broke.
            trace.outermost = (next == 0) as u64;
            break;
        }
        fp = next;
    }
}
