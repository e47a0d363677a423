//! User stack capture: a CFI walk (`unwind`, the default) or a
//! frame-pointer walk (`fpwalk`, `--unwind fp`), hashed here into a 64-bit id so that equal stacks share one `STACKS` entry
//! and one `STACK_STATS` slot. A 64-bit hash makes collisions negligible
//! (unlike `BPF_MAP_TYPE_STACK_TRACE`, whose bucket index collides often).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_current_pid_tgid, EbpfContext};
use tracer_common::{
    unknown_stack, Counter, StackTrace, MAX_FRAMES, SLOT_UNKNOWN, STACK_UNKNOWN, UNKNOWN_STACK_IDS,
};

use crate::maps::{count, FREE_SLOTS, SCRATCH_SLOTS, STACKS, STACK_SCRATCH, STACK_STATS, TARGETS};
use core::intrinsics::{atomic_xadd, AtomicOrdering};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const EEXIST: i64 = -17;

/// A captured stack: its id and the `STACK_STATS` slot to count it in.
#[derive(Clone, Copy)]
pub struct Stack {
    pub id: u64,
    pub slot: u32,
}

const UNKNOWN: Stack = Stack {
    id: STACK_UNKNOWN,
    slot: SLOT_UNKNOWN,
};

/// The unknown stack of process `tgid`: its own slot when userspace reserved
/// one, so that per-process totals stay exact when stacks are lost.
#[inline(always)]
fn unknown(tgid: u32) -> Stack {
    match TARGETS.get_ptr(tgid) {
        Some(target) => Stack {
            id: unknown_stack(tgid),
            slot: unsafe { (*target).unknown_slot },
        },
        None => UNKNOWN,
    }
}

/// The stack id of the first `len` frames of `buf` in process `tgid`:
/// FNV-1a over the process id and the return addresses, never below
/// `UNKNOWN_STACK_IDS`. The process is part of the id because a forked
/// child runs the same code at the same addresses as its parent, and each
/// process is reported on its own. Shared by heap and mapping stacks.
#[inline(always)]
pub fn hash_frames(buf: &StackTrace, len: usize, tgid: u32) -> u64 {
    let mut hash = (FNV_OFFSET ^ len as u64 ^ ((tgid as u64) << 32)).wrapping_mul(FNV_PRIME);
    for i in 0..MAX_FRAMES {
        if i >= len {
            break;
        }
        hash = (hash ^ buf.ips[i]).wrapping_mul(FNV_PRIME);
    }
    if hash < UNKNOWN_STACK_IDS {
        hash |= 1 << 63;
    }
    hash
}

/// Claims one of this CPU's scratch slots (see `maps::Scratch`) and returns
/// its index, or `SCRATCH_SLOTS` when preempted programs hold them all. A
/// global function, verified once: its caller sees one unknown index, not
/// one path per slot through the whole capture.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tracer_claim_scratch() -> u32 {
    for i in 0..SCRATCH_SLOTS {
        let Some(scratch) = STACK_SCRATCH.get_ptr_mut(i) else {
            break;
        };
        let busy = unsafe { &raw mut (*scratch).busy };
        // The adds are single locked instructions: a preemption cannot
        // split them (and their result is unused: no fetch, 5.10 has none).
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(busy, 1);
            if core::ptr::read_volatile(busy) == 1 {
                return i;
            }
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(busy, u64::MAX);
        }
    }
    SCRATCH_SLOTS
}

/// Captures the current user stack and returns its id and slot, or the
/// unknown stack (counted as `StackLost`) when it cannot be captured or
/// stored.
#[inline(always)]
pub fn capture<C: EbpfContext>(ctx: &C) -> Stack {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if crate::bench::no_stacks() {
        return unknown(tgid);
    }
    with_scratch(|buf, index| capture_in(ctx, buf, index, tgid)).unwrap_or_else(|| {
        // Every slot held by a preempted program on this CPU.
        count(Counter::StackLost);
        unknown(tgid)
    })
}

/// Runs `f` with one of this CPU's scratch slots claimed (its buffer and
/// index), then gives the slot back; None when preempted programs hold
/// them all. Heap and mapping stacks are both captured this way.
#[inline(always)]
pub fn with_scratch<R>(f: impl FnOnce(&mut StackTrace, u32) -> R) -> Option<R> {
    let index = tracer_claim_scratch();
    let scratch = STACK_SCRATCH.get_ptr_mut(index)?;
    let result = f(unsafe { &mut (*scratch).trace }, index);
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*scratch).busy, u64::MAX);
    }
    Some(result)
}

/// `capture` with scratch slot `index` claimed: `buf` is ours alone.
#[inline(always)]
fn capture_in<C: EbpfContext>(ctx: &C, buf: &mut StackTrace, index: u32, tgid: u32) -> Stack {
    // A walk this CPU did from the same registers, over the same words
    // (unwind.rs, "The walk cache"): its stack, if still stored.
    if let Some((hash, outermost)) = crate::unwind::cached(ctx.as_ptr() as *const _, index) {
        if let Some(slot) = known_slot(hash) {
            if outermost {
                count(Counter::WholeStacks);
            }
            return Stack { id: hash, slot };
        }
    }
    // The CFI walker (the default), when it has tables for this process;
    // otherwise our own frame-pointer walk, not bpf_get_stack (fpwalk.rs
    // says why). The length goes through the buffer, read back once.
    let cfi = match crate::unwind::walk(ctx.as_ptr() as *const _, buf, index) {
        Some(frames) => {
            buf.len = frames as u64;
            true
        }
        None => {
            crate::fpwalk::walk(ctx, buf);
            false
        }
    };
    let len = (unsafe { core::ptr::read_volatile(&buf.len) } as usize).min(MAX_FRAMES);
    if len == 0 {
        count(Counter::StackLost);
        return unknown(tgid);
    }
    buf.len = len as u64;
    let outermost = unsafe { core::ptr::read_volatile(&buf.outermost) } != 0;
    // A CFI walk that stopped before the outermost frame was cut (no rule,
    // unreadable memory); a frame-pointer walk cannot tell a cut from an end.
    buf.truncated = (len == MAX_FRAMES || (cfi && !outermost)) as u64;
    if outermost {
        count(Counter::WholeStacks);
    }

    let hash = hash_frames(buf, len, tgid);
    if cfi {
        crate::unwind::remember(index, hash);
    }
    // Two rounds: the second one only runs when another CPU stored the same
    // new stack between our lookup and our insert.
    for _ in 0..2 {
        if let Some(slot) = known_slot(hash) {
            return Stack { id: hash, slot };
        }
        match new_slot(hash, tgid, buf) {
            Ok(slot) => return Stack { id: hash, slot },
            Err(err) if err == EEXIST => continue,
            Err(_) => break,
        }
    }
    count(Counter::StackLost);
    unknown(tgid)
}

/// The slot of a stack that is already stored.
#[inline(always)]
fn known_slot(hash: u64) -> Option<u32> {
    let entry = STACKS.get_ptr(hash)?;
    let slot = unsafe { core::ptr::read_volatile(&(*entry).slot) } as u32;
    // The entry may have been deleted by userspace's reclamation and its
    // memory reused for another stack since the lookup: trust the slot only
    // if that slot says it belongs to this stack. (A slot read just before
    // the deletion stays valid: userspace recycles it only after a grace
    // period, which waits for this program to finish.)
    let stats = STACK_STATS.get_ptr(slot)?;
    (slot != SLOT_UNKNOWN && unsafe { core::ptr::read_volatile(&(*stats).stack_id) } == hash)
        .then_some(slot)
}

/// Claims a free slot for a new stack and publishes both. Err(-EEXIST) when
/// another CPU published the same stack first.
#[inline(always)]
fn new_slot(hash: u64, tgid: u32, buf: &mut StackTrace) -> Result<u32, i64> {
    let slot = match FREE_SLOTS.pop() {
        Ok(Some(slot)) => slot,
        // No free slot: more distinct live stacks than --max-stacks.
        _ => return Err(-1),
    };
    let Some(stats) = STACK_STATS.get_ptr_mut(slot) else {
        return Err(-1);
    };
    // Counters of a free slot are zero (userspace clears them before giving
    // the slot back); the owner is set before the slot becomes reachable.
    unsafe {
        core::ptr::write_volatile(&mut (*stats).tgid, tgid);
        core::ptr::write_volatile(&mut (*stats).stack_id, hash);
    }
    buf.slot = slot as u64;
    let err: i64 = match STACKS.insert(hash, &*buf, BPF_NOEXIST as u64) {
        Ok(()) => return Ok(slot),
        Err(err) => err.into(),
    };
    // Not published, so nobody else can be using the slot: give it back. If
    // the queue refuses it, it stays owned by `hash` with nothing in it, an
    // orphan that userspace reclaims.
    unsafe { core::ptr::write_volatile(&mut (*stats).stack_id, 0) };
    if FREE_SLOTS.push(slot, 0).is_err() {
        unsafe { core::ptr::write_volatile(&mut (*stats).stack_id, hash) };
    }
    Err(err)
}
