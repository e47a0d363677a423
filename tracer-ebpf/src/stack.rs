//! User stack capture: a CFI walk (`unwind`, the default) or a
//! frame-pointer walk (`fpwalk`, `--unwind fp`), hashed here into a 64-bit id so that equal stacks share one `STACKS` entry
//! and one `STACK_STATS` slot. A 64-bit hash makes collisions negligible
//! (unlike `BPF_MAP_TYPE_STACK_TRACE`, whose bucket index collides often).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_current_pid_tgid, EbpfContext};
use tracer_common::{
    unknown_stack, Counter, StackTrace, MAX_FRAMES, SLOT_UNKNOWN, STACK_UNKNOWN, UNKNOWN_STACK_IDS,
};

use crate::maps::{count, Scratch, FREE_SLOTS, STACKS, STACK_SCRATCH, STACK_STATS, TARGETS};
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

/// Captures the current user stack and returns its id and slot, or the
/// unknown stack (counted as `StackLost`) when it cannot be captured or
/// stored.
#[inline(always)]
pub fn capture<C: EbpfContext>(ctx: &C) -> Stack {
    let me = bpf_get_current_pid_tgid();
    let tgid = (me >> 32) as u32;
    if crate::bench::no_stacks() {
        return unknown(tgid);
    }
    let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
        return unknown(tgid);
    };
    // Claim the per-CPU buffer (see `maps::Scratch`): a thread is never
    // running two programs at once, so its pid_tgid is a unique claim. The
    // adds are single locked instructions: a preemption cannot split them.
    let busy = unsafe { &raw mut (*scratch).busy };
    let owner = unsafe { &raw mut (*scratch).owner };
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(busy, 1);
        core::ptr::write_volatile(owner, me);
    }
    let stack = capture_in(ctx, scratch, me, tgid);
    unsafe {
        core::ptr::write_volatile(owner, 0);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(busy, u64::MAX);
    }
    stack
}

/// `capture` with the scratch buffer claimed.
#[inline(always)]
fn capture_in<C: EbpfContext>(ctx: &C, scratch: *mut Scratch, me: u64, tgid: u32) -> Stack {
    // `busy` first: once it reads 1, whoever used the buffer since our
    // claim has released it, clearing `owner`. One comparison, not two: BPF
    // has no setcc, and every branch here multiplies the verifier's states
    // (the session program is close to its limit).
    let still_ours = move || unsafe {
        let busy = core::ptr::read_volatile(&raw const (*scratch).busy);
        let owner = core::ptr::read_volatile(&raw const (*scratch).owner);
        ((busy ^ 1) | (owner ^ me)) == 0
    };
    let buf: &mut StackTrace = unsafe { &mut (*scratch).trace };
    // The CFI walker (the default), when it has tables for this process;
    // otherwise our own frame-pointer walk, not bpf_get_stack (fpwalk.rs
    // says why). The length goes through the buffer, read back once.
    let cfi = match crate::unwind::walk(ctx.as_ptr() as *const _, buf) {
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
    // Preempted by another program that used the buffer: the frames and the
    // hash may be a mix of two stacks.
    if !still_ours() {
        count(Counter::StackLost);
        return unknown(tgid);
    }
    // Two rounds: the second one only runs when another CPU stored the same
    // new stack between our lookup and our insert.
    for _ in 0..2 {
        if let Some(slot) = known_slot(hash) {
            return Stack { id: hash, slot };
        }
        match new_slot(hash, tgid, buf, &still_ours) {
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
fn new_slot(
    hash: u64,
    tgid: u32,
    buf: &mut StackTrace,
    still_ours: &impl Fn() -> bool,
) -> Result<u32, i64> {
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
    // Checked again right before the insert, which copies the buffer under
    // the bucket lock with interrupts off. (A preemption in the few
    // instructions between this check and the lock could still store mixed
    // frames; the check after the insert then gives up on the stack, whose
    // slot stays empty and is reclaimed.)
    let err = if !still_ours() {
        -1
    } else {
        match STACKS.insert(hash, &*buf, BPF_NOEXIST as u64) {
            Ok(()) if still_ours() => return Ok(slot),
            Ok(()) => {
                // The other program may have written its own slot into the
                // buffer too: an entry naming another stack's slot would
                // never be used (`known_slot` checks) but would keep this
                // stack from ever getting a slot of its own (every later
                // insert: EEXIST), its blocks all counted as lost. Take it
                // out; our slot, unreachable, is reclaimed as an orphan.
                if let Some(entry) = STACKS.get_ptr(hash) {
                    if unsafe { core::ptr::read_volatile(&(*entry).slot) } != slot as u64 {
                        let _ = STACKS.remove(&hash);
                    }
                }
                return Err(-1);
            }
            Err(err) => err.into(),
        }
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
