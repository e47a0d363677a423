//! User stack capture: frame-pointer walk by the kernel (`bpf_get_stack`),
//! hashed here into a 64-bit id so that equal stacks share one `STACKS` entry
//! and one `STACK_STATS` entry. A 64-bit hash makes collisions negligible
//! (unlike `BPF_MAP_TYPE_STACK_TRACE`, whose bucket index collides often).

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::bpf_get_stack,
    EbpfContext,
};
use tracer_common::{Counter, StackTrace, MAX_FRAMES, STACK_UNKNOWN};

use crate::maps::{count, STACKS, STACK_SCRATCH};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Captures the current user stack and returns its id, or `STACK_UNKNOWN`
/// (counted as `StackLost`) when it cannot be captured or stored.
#[inline(always)]
pub fn capture<C: EbpfContext>(ctx: &C) -> u64 {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        return STACK_UNKNOWN;
    };
    let buf: &mut StackTrace = unsafe { &mut *buf };
    let size = (MAX_FRAMES * 8) as u32;
    // `--unwind cfi`: the CFI walker, when it has tables for this process.
    let walked = crate::unwind::walk(ctx.as_ptr() as *const _, buf);
    let written = match walked {
        Some((frames, _)) => (frames * 8) as i64,
        None => unsafe {
            bpf_get_stack(
                ctx.as_ptr(),
                buf.ips.as_mut_ptr() as *mut _,
                size,
                BPF_F_USER_STACK as u64,
            )
        },
    };
    if written <= 0 {
        count(Counter::StackLost);
        return STACK_UNKNOWN;
    }
    let len = (written as usize / 8).min(MAX_FRAMES);
    buf.len = len as u64;
    buf.truncated = (len == MAX_FRAMES || walked.is_some_and(|(_, cut)| cut)) as u64;

    let mut hash = FNV_OFFSET ^ len as u64;
    for i in 0..MAX_FRAMES {
        if i >= len {
            break;
        }
        hash = (hash ^ buf.ips[i]).wrapping_mul(FNV_PRIME);
    }
    if hash == STACK_UNKNOWN {
        hash = 1;
    }
    if STACKS.get_ptr(hash).is_none() {
        if let Err(err) = STACKS.insert(hash, &*buf, BPF_NOEXIST as u64) {
            // -EEXIST: another CPU stored the same stack first; fine.
            if err != -17 {
                count(Counter::StackLost);
                return STACK_UNKNOWN;
            }
        }
    }
    hash
}
