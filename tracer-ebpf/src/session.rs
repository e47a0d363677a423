//! Uprobe sessions (kernel 6.13+): one program runs at an allocation
//! function's entry and, only if the entry returned 0, at its return. With
//! `--sample-rate` most calls are not sampled and their return is never
//! trapped, which a uprobe+uretprobe pair cannot avoid (see BENCHMARKS.md).
//!
//! Userspace loads `alloc_session` itself (aya 0.14 knows no session
//! programs: it needs `expected_attach_type` `BPF_TRACE_UPROBE_SESSION`) and
//! attaches it to every allocation function of an object with one
//! `uprobe_multi` link, each function's calling convention as its cookie
//! (`tracer_common::convention`).
//!
//! Entry or return? The `bpf_session_is_return()` kfunc would say, but aya
//! 0.14 does not relocate kfunc calls. `bpf_get_func_ip()` does as well: in
//! a uprobe_multi program it is the probed function's address both times,
//! while the instruction pointer is that address at the entry and the
//! caller's return address at the return.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_attach_cookie, bpf_get_func_ip},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext as _,
};

use crate::{alloc, taskstack::keep_task_stack};

/// What the entry returns: run the return half, or skip it.
const WANT_RETURN: u32 = 0;
const SKIP_RETURN: u32 = 1;

/// Not `#[uprobe]`: aya's macro returns 0 whatever the function returns,
/// and a session entry's return value is what matters. The section is the
/// macro's, so aya still lists the program.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn alloc_session(ctx: *mut c_void) -> u32 {
    let ctx = ProbeContext::new(ctx);
    keep_task_stack!(&ctx, NO_PRIV_STACK_ALLOC_SESSION);
    let function = unsafe { bpf_get_func_ip(ctx.as_ptr()) };
    if unsafe { (*ctx.regs).rip } != function {
        alloc::on_return(&RetProbeContext::new(ctx.as_ptr()));
        return 0;
    }
    let convention = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    if alloc::enter_convention(&ctx, convention) {
        WANT_RETURN
    } else {
        SKIP_RETURN
    }
}
