//! Each thread's allocator call in flight (`InFlight`): made at the entry,
//! read by the thread's nested calls and its frees, settled at the return.
//! Only the thread's own programs touch it (one at a time), and userspace
//! for threads that died (`tracer/src/kernel/blocks.rs`: it frees a dead
//! thread's slot only once the whole process is gone; before, it only
//! empties the record in place, since a new thread given the same tid
//! would free the slot too).
//!
//! Where: in the thread's slot of `CALL_SLOTS` (tid modulo its size), an
//! array, so finding it is an address computation; a hash map costs a
//! lookup, an insert and a delete per call, a sizeable part of an exact
//! trace's cost on a server such as redis (BENCHMARKS.md, section 6). A
//! thread claims its slot by raising the slot's `busy` count and keeping it
//! only if the count it then reads is 1 (as `stack::tracer_claim_scratch`
//! does: a plain atomic add, the only atomic 5.10 takes; its verifier
//! refuses a compare-and-swap even in dead code). When another thread holds
//! the slot (tids equal modulo the size, both inside the allocator, or a
//! thread that died inside it, whose slot stays taken until its process
//! ends) the record goes to the `IN_FLIGHT` hash instead, whose records
//! `HASHED` counts so that a thread looks there only when some record may
//! be.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{bindings::BPF_F_MMAPABLE, macros::map, maps::Array};
use tracer_common::{CallSlot, InFlight, CALL_SLOTS as SLOTS};

use crate::maps::IN_FLIGHT;

/// Non-zero: slots are claimed (0 only for tests of the hash path,
/// `TRACER_TEST_CALL_SLOTS=0`). Set by userspace at load time.
#[unsafe(no_mangle)]
static CALL_SLOTS_ON: u8 = 1;

/// The slot of thread `tid` is `tid & CALL_SLOT_MASK`: `CALL_SLOTS - 1`,
/// but for tests, which make threads share slots (`TRACER_TEST_CALL_SLOTS`).
#[unsafe(no_mangle)]
static CALL_SLOT_MASK: u32 = SLOTS - 1;

#[inline(always)]
fn slots_on() -> bool {
    unsafe { core::ptr::read_volatile(&CALL_SLOTS_ON) != 0 }
}

/// Per thread: its call in flight, when `owner` is its pid_tgid. Mmapable:
/// userspace settles dead threads' records in place (`CallSlots::settle`).
#[map]
pub static CALL_SLOTS: Array<CallSlot> = Array::with_max_entries(SLOTS, BPF_F_MMAPABLE);

/// An upper bound of the records in `IN_FLIGHT`: raised before an insert,
/// lowered after a program's removal (userspace's removals leave it high,
/// which only costs lookups). 0: no thread needs to look there.
#[map]
static HASHED: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
fn slot(pid_tgid: u64) -> Option<*mut CallSlot> {
    let mask = unsafe { core::ptr::read_volatile(&CALL_SLOT_MASK) };
    CALL_SLOTS.get_ptr_mut(pid_tgid as u32 & mask)
}

/// The thread's slot, if the thread holds it.
#[inline(always)]
fn own_slot(pid_tgid: u64) -> Option<*mut CallSlot> {
    if !slots_on() {
        return None;
    }
    let slot = slot(pid_tgid)?;
    (unsafe { core::ptr::read_volatile(&raw const (*slot).owner) } == pid_tgid).then_some(slot)
}

#[inline(always)]
fn add(n: *mut u64, delta: u64) {
    // A single locked instruction; its result unused (no fetch on 5.10).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, delta) };
}

#[inline(always)]
fn hashed_add(delta: u64) {
    if let Some(n) = HASHED.get_ptr_mut(0) {
        add(n, delta);
    }
}

#[inline(always)]
fn maybe_hashed() -> bool {
    HASHED
        .get_ptr(0)
        .is_some_and(|n| unsafe { core::ptr::read_volatile(n) } != 0)
}

/// The thread's call in flight, if it has one. A record emptied in place
/// (stack pointer 0: a hash removal the kernel refused, see `forget`, or a
/// dead thread's record userspace settled, found by a new thread given its
/// tid) is stale: it is dropped here and not returned.
#[inline(always)]
pub fn get(pid_tgid: u64) -> Option<*mut InFlight> {
    let found = find(pid_tgid)?;
    if unsafe { core::ptr::read_volatile(&raw const (*found).entry_sp) } == 0 {
        forget(pid_tgid);
        return None;
    }
    Some(found)
}

#[inline(always)]
fn find(pid_tgid: u64) -> Option<*mut InFlight> {
    if let Some(slot) = own_slot(pid_tgid) {
        return Some(unsafe { &raw mut (*slot).call });
    }
    if !maybe_hashed() {
        return None;
    }
    IN_FLIGHT.get_ptr_mut(pid_tgid)
}

/// Makes `call` the thread's call in flight (it has none). False when there
/// is no room.
#[inline(always)]
pub fn remember(pid_tgid: u64, call: &InFlight) -> bool {
    if slots_on() {
        if let Some(slot) = slot(pid_tgid) {
            let busy = unsafe { &raw mut (*slot).busy };
            add(busy, 1);
            // 1: ours. More: another thread holds it or is claiming it too
            // (then neither may keep it): back off.
            if unsafe { core::ptr::read_volatile(busy) } == 1 {
                unsafe {
                    (*slot).call = *call;
                    core::ptr::write_volatile(&raw mut (*slot).owner, pid_tgid);
                }
                return true;
            }
            add(busy, 1u64.wrapping_neg());
        }
    }
    // Counted before the insert: a record is never there uncounted.
    hashed_add(1);
    if crate::alloc::retried(|| IN_FLIGHT.insert(pid_tgid, call, 0)).is_err() {
        hashed_add(1u64.wrapping_neg());
        return false;
    }
    true
}

/// Settles the thread's call in flight; true when it is gone. Kernels
/// whose map locks can give up (6.15+) may refuse a hash removal: the
/// record left behind is then emptied in place, so that nothing settles its
/// old block twice (a second retire would take the stack below what it
/// holds) and the thread's next lookup (`get`) drops it.
#[inline(always)]
pub fn forget(pid_tgid: u64) -> bool {
    if let Some(slot) = own_slot(pid_tgid) {
        // The owner word first: nobody can claim the slot before `busy`
        // drops, and by then it names nobody.
        unsafe { core::ptr::write_volatile(&raw mut (*slot).owner, 0) };
        add(unsafe { &raw mut (*slot).busy }, 1u64.wrapping_neg());
        return true;
    }
    if crate::alloc::retried(|| IN_FLIGHT.remove(pid_tgid)).is_ok() {
        hashed_add(1u64.wrapping_neg());
        return true;
    }
    if let Some(stored) = IN_FLIGHT.get_ptr_mut(pid_tgid) {
        unsafe {
            (*stored).has_old = 0;
            (*stored).entry_sp = 0;
        }
    }
    false
}
