//! Block records that userspace takes out of the maps: in-flight calls of
//! threads that died inside the allocator, and the blocks of a program an
//! exec replaced. Each is taken out of its stack's totals as the programs'
//! free would.

use tracer_common::AllocKey;

use super::{
    error::Result,
    maps::{self, StatsTable},
    programs::Loaded,
};

/// Removes in-flight records of threads that no longer exist (a thread that
/// died inside malloc leaves one; its tid could be reused). The keys are
/// read before the thread list, so a thread born in between is never taken
/// for dead. A realloc's record holds the old block's record, taken out of
/// `ALLOCS` at entry: it is put back, as the block was not known to be freed.
pub fn forget_dead_threads(
    loaded: &mut Loaded,
    pid: u32,
    sample_rate: Option<u64>,
    live_tids: &mut dyn FnMut() -> Vec<u32>,
) -> Result<usize> {
    let mut in_flight = maps::in_flight_mut(loaded)?;
    let keys: Vec<u64> = in_flight
        .keys()
        .into_iter()
        .filter(|key| (key >> 32) as u32 == pid)
        .collect();
    if keys.is_empty() {
        return Ok(0);
    }
    let live_tids = live_tids();
    let mut taken = Vec::new();
    let mut dead = 0;
    for key in keys {
        if live_tids.contains(&(key as u32)) {
            continue;
        }
        // Read before removing: the removal is what makes it ours.
        let call = in_flight.get(&key).ok().flatten();
        if in_flight.remove(&key) {
            dead += 1;
            if let Some(call) = call.filter(|c| c.has_old != 0) {
                taken.push((call.ptr_arg, call.old));
            }
        }
    }

    if !taken.is_empty() {
        let table = StatsTable::open(loaded)?;
        let mut allocs = maps::allocs_mut(loaded)?;
        for (addr, record) in taken {
            // If the address was recorded again, the block was freed after all.
            if !allocs.insert_new(AllocKey::new(pid, addr), record) {
                table.retire(&record, sample_rate);
            }
        }
    }
    Ok(dead)
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
            table.retire(&record, sample_rate);
            dropped += 1;
        }
    }
    Ok(dropped)
}
