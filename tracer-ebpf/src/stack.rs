//! User stack capture: frame-pointer walk (`unwind`),
//! hashed here into a 64-bit id so that equal stacks share one `STACKS` entry
//! and one `STACK_STATS` entry. A 64-bit hash makes collisions negligible
//! (unlike `BPF_MAP_TYPE_STACK_TRACE`, whose bucket index collides often).

use aya_ebpf::{bindings::BPF_NOEXIST, EbpfContext};
use tracer_common::{Counter, StackTrace, MAX_FRAMES, STACK_UNKNOWN};

use crate::maps::{count, STACKS, STACK_SCRATCH};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Captures the current user stack and returns its id, or `STACK_UNKNOWN`
/// (counted as `StackLost`) when it cannot be captured or stored.
#[inline(always)]
pub fn capture<C: EbpfContext>(ctx: &C) -> u64 {
    if crate::bench::no_stacks() {
        return STACK_UNKNOWN;
    }
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        return STACK_UNKNOWN;
    };
    let buf: &mut StackTrace = unsafe { &mut *buf };
    // Our own walk, not bpf_get_stack: see unwind.rs for why.
    crate::unwind::walk(ctx, buf);
    let len = (unsafe { core::ptr::read_volatile(&buf.len) } as usize).min(MAX_FRAMES);
    if len == 0 {
        count(Counter::StackLost);
        return STACK_UNKNOWN;
    }
    buf.len = len as u64;
    buf.truncated = (len == MAX_FRAMES) as u64;

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
