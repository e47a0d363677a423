//! Block records that userspace takes out of the maps: in-flight calls of
//! threads that died inside the allocator, and the blocks of a program an
//! exec replaced. Each is taken out of its stack's totals as the programs'
//! free would.

use tracer_common::{AllocKey, InFlight};

use super::{
    error::Result,
    maps::{self, StatsTable},
    programs::Loaded,
};

/// Settles the in-flight records of threads that no longer exist (a thread
/// that died inside malloc leaves one; its tid could be reused), in the
/// thread slots and in the hash (`tracer-ebpf/src/calls.rs`). The records
/// are read before the thread list, so a thread born in between is never
/// taken for dead; and one is settled only if it is still the record read
/// then, so a new thread that got a dead one's tid since keeps its call
/// (but for the short window `CallSlots::settle` describes). A
/// realloc's record holds the old block's record, taken out of `ALLOCS` at
/// entry: it is put back, as the block was not known to be freed.
/// `process_gone`: the whole process has ended (see `CallSlots::settle`).
pub fn forget_dead_threads(
    loaded: &mut Loaded,
    pid: u32,
    sample_rate: Option<u64>,
    live_tids: &mut dyn FnMut() -> Vec<u32>,
    process_gone: bool,
) -> Result<usize> {
    let slots = maps::CallSlots::open(loaded)?;
    // Records already emptied in place (a dead thread's, settled before)
    // are left alone.
    let in_slots: Vec<_> = slots
        .of_process(pid)
        .into_iter()
        .filter(|(_, call)| call.entry_sp != 0 || process_gone)
        .collect();
    let mut in_flight = maps::in_flight_mut(loaded)?;
    let hashed: Vec<(u64, InFlight)> = in_flight
        .keys()
        .into_iter()
        .filter(|key| (key >> 32) as u32 == pid)
        .filter_map(|key| Some((key, in_flight.get(&key).ok()??)))
        .collect();
    if in_slots.is_empty() && hashed.is_empty() {
        return Ok(0);
    }
    let live_tids = live_tids();
    let dead = |key: u64| !live_tids.contains(&(key as u32));
    let mut taken = Vec::new();
    for (key, call) in in_slots.into_iter().filter(|(key, _)| dead(*key)) {
        // Settling is what makes it ours.
        if slots.settle(key, &call, process_gone) {
            taken.push(call);
        }
    }
    for (key, call) in hashed.into_iter().filter(|(key, _)| dead(*key)) {
        let now = in_flight.get(&key).ok().flatten();
        if !now.is_some_and(|now| same_call(&now, &call)) {
            continue; // returned meanwhile, or a new thread's call
        }
        // The removal is what makes it ours.
        if in_flight.remove(&key) {
            taken.push(call);
        }
    }
    let dead = taken.len();
    let old_blocks: Vec<_> = taken
        .into_iter()
        .filter(|call| call.has_old != 0)
        .map(|call| (call.ptr_arg, call.old))
        .collect();
    if !old_blocks.is_empty() {
        let table = StatsTable::open(loaded)?;
        let mut unmatched = 0;
        let mut allocs = maps::allocs_mut(loaded)?;
        for (addr, record) in old_blocks {
            // If the address was recorded again, the block was freed after all.
            if !allocs.insert_new(AllocKey::new(pid, addr), record)
                && !table.retire(&record, sample_rate)
            {
                unmatched += 1;
            }
        }
        loaded.unmatched_frees += unmatched;
    }
    Ok(dead)
}

/// The same in-flight call: a thread's next call differs in its stack
/// pointer, arguments or old block.
pub(super) fn same_call(a: &InFlight, b: &InFlight) -> bool {
    (
        a.kind,
        a.flags,
        a.entry_sp,
        a.size,
        a.ptr_arg,
        a.has_old,
        a.old.timestamp_ns,
    ) == (
        b.kind,
        b.flags,
        b.entry_sp,
        b.size,
        b.ptr_arg,
        b.has_old,
        b.old.timestamp_ns,
    )
}

/// Drops the live blocks process `pid` recorded before `before_ns` (its
/// program was replaced by an exec, which unmapped them), taking each out
/// of its stack's totals. Returns how many were dropped.
pub fn drop_process(
    loaded: &mut Loaded,
    pid: u32,
    before_ns: u64,
    sample_rate: Option<u64>,
) -> Result<usize> {
    let mut blocks: Vec<AllocKey> = Vec::new();
    maps::allocs(loaded)?.for_each(|key, record| {
        if key.tgid == pid && record.timestamp_ns < before_ns {
            blocks.push(*key);
        }
    })?;
    let table = StatsTable::open(loaded)?;
    let mut unmatched = 0;
    let mut allocs = maps::allocs_mut(loaded)?;
    let mut dropped = 0;
    for key in blocks {
        // Read, then remove: only a successful removal makes it ours to retire.
        let Ok(Some(record)) = allocs.get(&key) else {
            continue;
        };
        // Freed and handed out again since the listing: the new program's.
        if record.timestamp_ns >= before_ns {
            continue;
        }
        if allocs.remove(&key) {
            if !table.retire(&record, sample_rate) {
                unmatched += 1;
            }
            dropped += 1;
        }
    }
    loaded.unmatched_frees += unmatched;
    Ok(dropped)
}
