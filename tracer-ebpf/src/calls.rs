//! Each thread's allocator call in flight (`InFlight`): made at the entry,
//! read by the thread's nested calls and its frees, settled at the return.
//! Only the thread's own programs touch it (one at a time), and userspace
//! for threads that died.
//!
//! Where: in the thread's slot of `CALL_SLOTS` (tid modulo its size), an
//! array, so finding it is an address computation; a hash map costs a
//! lookup, an insert and a delete per call, a sizeable part of an exact
//! trace's cost on a server such as redis (BENCHMARKS.md, section 6). A
//! thread claims its slot with a compare-and-swap of the owner word; when
//! another thread holds it (tids equal modulo the size, both inside the
//! allocator, or a dead thread's record not swept yet), or the kernel has
//! no BPF compare-and-swap (before 5.12), the record goes to the
//! `IN_FLIGHT` hash instead, whose records `HASHED` counts so that a thread
//! looks there only when some record may be.

use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering};

use aya_ebpf::{bindings::BPF_F_MMAPABLE, macros::map, maps::Array};
use tracer_common::{CallSlot, InFlight, CALL_SLOTS as SLOTS};

use crate::maps::IN_FLIGHT;

/// Non-zero: the kernel has BPF compare-and-swap (5.12+) and slots are
/// claimed. Set by userspace at load time; the verifier drops the dead
/// branch on older kernels, which would refuse the instruction.
#[unsafe(no_mangle)]
static CALL_SLOTS_ON: u8 = 0;

/// The slot of thread `tid` is `tid & CALL_SLOT_MASK`: `CALL_SLOTS - 1`,
/// but for tests, which make threads share slots (`TRACER_TEST_CALL_SLOTS`).
#[unsafe(no_mangle)]
static CALL_SLOT_MASK: u32 = SLOTS - 1;

#[inline(always)]
fn slots_on() -> bool {
    unsafe { core::ptr::read_volatile(&CALL_SLOTS_ON) != 0 }
}

/// Per thread: its call in flight, when `owner` is its pid_tgid. Mmapable:
/// userspace sweeps dead threads' slots with atomic compare-and-swaps.
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

#[inline(always)]
fn hashed_add(delta: u64) {
    if let Some(n) = HASHED.get_ptr_mut(0) {
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, delta) };
    }
}

#[inline(always)]
fn maybe_hashed() -> bool {
    HASHED
        .get_ptr(0)
        .is_some_and(|n| unsafe { core::ptr::read_volatile(n) } != 0)
}

/// The thread's call in flight, if it has one.
#[inline(always)]
pub fn get(pid_tgid: u64) -> Option<*mut InFlight> {
    if slots_on() {
        let slot = slot(pid_tgid)?;
        if unsafe { core::ptr::read_volatile(&raw const (*slot).owner) } == pid_tgid {
            return Some(unsafe { &raw mut (*slot).call });
        }
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
            let (_, claimed) = unsafe {
                atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                    &raw mut (*slot).owner,
                    0,
                    pid_tgid,
                )
            };
            if claimed {
                unsafe { (*slot).call = *call };
                return true;
            }
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

/// Settles the thread's call in flight; true when it is gone. Kernels whose map locks can give up
/// (6.15+) may refuse a hash removal: the record left behind is then emptied
/// in place, so that nothing settles its old block twice (a second retire
/// would take the stack below what it holds) and the next call finds it
/// stale (`alloc::is_inner_call`) and removes it.
#[inline(always)]
pub fn forget(pid_tgid: u64) -> bool {
    if slots_on() {
        if let Some(slot) = slot(pid_tgid) {
            if unsafe { core::ptr::read_volatile(&raw const (*slot).owner) } == pid_tgid {
                // Only the owner frees its slot: a plain store.
                unsafe { core::ptr::write_volatile(&raw mut (*slot).owner, 0) };
                return true;
            }
        }
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
