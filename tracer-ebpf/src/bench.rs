//! Programs and switches for measuring the tracer, not for tracing.
//!
//! `noop_enter`/`noop_return` do nothing: attached at exactly the addresses
//! the real programs use (`tracer ... --noop-probes`), they measure the floor
//! that any uprobe-based tool pays there (the traps), so the benchmark can
//! tell the tracer's own work from the kernel's. `noop_session` is the
//! floor of uprobe sessions: it skips every return, as an unsampled call
//! does.
//!
//! `NO_STACKS`, set by userspace at load time (`--no-stacks`), makes every
//! allocation skip the user stack walk and count under the unknown stack, to
//! measure what stack capture costs.

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

/// Non-zero: skip stack capture. A global in .rodata: the verifier sees the
/// value userspace set and removes the dead branch.
#[unsafe(no_mangle)]
static NO_STACKS: u8 = 0;

#[inline(always)]
pub fn no_stacks() -> bool {
    unsafe { core::ptr::read_volatile(&NO_STACKS) != 0 }
}

#[uprobe]
pub fn noop_enter(_ctx: ProbeContext) -> u32 {
    0
}

#[uretprobe]
pub fn noop_return(_ctx: RetProbeContext) -> u32 {
    0
}

/// A uprobe session program (see `session.rs`, also for why no macro)
/// that asks for no return.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn noop_session(_ctx: *mut core::ffi::c_void) -> u32 {
    1
}
