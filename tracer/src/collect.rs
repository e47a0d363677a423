//! Reads the kernel-side aggregates out of the BPF maps into a `Snapshot`.
//! The only module besides `probes` that touches aya.

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    Ebpf,
};
use std::collections::HashMap;

use tracer_common::{AllocRecord, Counter, InFlight, StackTrace};

use crate::{
    model::{scan_ages, Counters, Snapshot, StackSample, SETTLE_NS},
    slots::StatsTable,
};

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn map<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a aya::maps::Map> {
    ebpf.map(name)
        .with_context(|| format!("eBPF object has no map {name}"))
}

pub fn counters(ebpf: &Ebpf) -> Result<Counters> {
    let array: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map(ebpf, "COUNTERS")?)?;
    let read = |c: Counter| -> Result<u64> { Ok(array.get(&(c as u32), 0)?.iter().sum()) };
    Ok(Counters {
        allocs: read(Counter::Allocs)?,
        frees: read(Counter::Frees)?,
        unknown_frees: read(Counter::UnknownFrees)?,
        alloc_map_full: read(Counter::AllocMapFull)?,
        stack_lost: read(Counter::StackLost)?,
        stack_stats_full: read(Counter::StackStatsFull)?,
        missed_frees: read(Counter::MissedFrees)?,
        in_flight_full: read(Counter::InFlightFull)?,
        failed_allocs: read(Counter::FailedAllocs)?,
    })
}

/// Takes a snapshot. `min_age_ns` > 0 counts only blocks at least that old,
/// which needs the per-address scan; `with_ages` also scans, to know each
/// stack's oldest block and its settled bytes.
pub fn snapshot(ebpf: &Ebpf, min_age_ns: u64, with_ages: bool) -> Result<Snapshot> {
    let taken_ns = monotonic_ns();
    // Every slot, added up per stack: a stack can briefly have two slots
    // (see `slots`), and free slots are all zero.
    let table = StatsTable::open(ebpf)?;
    let mut by_stack: HashMap<u64, StackSample> = HashMap::new();
    for slot in 0..table.slots() {
        let s = table.get(slot);
        if s.total_count == 0 && s.outstanding_count == 0 {
            continue;
        }
        let sample = by_stack.entry(s.stack_id).or_insert(StackSample {
            stack_id: s.stack_id,
            ..StackSample::default()
        });
        sample.bytes = sample.bytes.wrapping_add(s.outstanding_bytes);
        sample.count = sample.count.wrapping_add(s.outstanding_count);
        sample.total_count += s.total_count;
        sample.total_bytes += s.total_bytes;
    }
    let mut stacks: Vec<StackSample> = by_stack.into_values().collect();
    if min_age_ns > 0 || with_ages {
        let cutoff = taken_ns.saturating_sub(min_age_ns);
        let settle_cutoff = taken_ns.saturating_sub(SETTLE_NS);
        let ages = scan_ages(live_allocations(ebpf)?, cutoff, settle_cutoff);
        for stack in &mut stacks {
            let age = ages.get(&stack.stack_id);
            stack.oldest_ns = age.map(|a| a.oldest_ns);
            stack.settled_bytes = Some(age.map_or(0, |a| a.settled_bytes));
            if min_age_ns > 0 {
                stack.bytes = age.map_or(0, |a| a.bytes);
                stack.count = age.map_or(0, |a| a.count);
            }
        }
    }
    Ok(Snapshot {
        taken_ns,
        stacks,
        counters: counters(ebpf)?,
    })
}

/// Every live allocation as (stack id, size, timestamp).
pub fn live_allocations(ebpf: &Ebpf) -> Result<Vec<(u64, u64, u64)>> {
    let allocs: BpfHashMap<&MapData, u64, AllocRecord> =
        BpfHashMap::try_from(map(ebpf, "ALLOCS")?)?;
    let mut out = Vec::new();
    for entry in allocs.iter() {
        match entry {
            Ok((_, r)) => out.push((r.stack_id, r.size, r.timestamp_ns)),
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(e).context("reading ALLOCS"),
        }
    }
    Ok(out)
}

/// The frames of a stack id: return addresses, innermost first, and whether
/// the capture was cut at the depth limit.
pub fn stack_frames(ebpf: &Ebpf, stack_id: u64) -> Result<Option<(Vec<u64>, bool)>> {
    let stacks: BpfHashMap<&MapData, u64, StackTrace> = BpfHashMap::try_from(map(ebpf, "STACKS")?)?;
    match stacks.get(&stack_id, 0) {
        Ok(trace) => {
            let len = (trace.len as usize).min(trace.ips.len());
            Ok(Some((trace.ips[..len].to_vec(), trace.truncated != 0)))
        }
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e).context("reading STACKS"),
    }
}

/// Removes in-flight records of threads that no longer exist (a thread that
/// died inside malloc leaves one; its tid could be reused). The keys are
/// read before the thread list, so a thread born in between is never taken
/// for dead. A realloc's record holds the old block's record, taken out of
/// `ALLOCS` at entry: it is put back, as the block was not known to be freed.
pub fn forget_dead_threads(
    ebpf: &mut Ebpf,
    pid: u32,
    live_tids: impl FnOnce() -> Vec<u32>,
) -> Result<usize> {
    let mut in_flight: BpfHashMap<&mut MapData, u64, InFlight> =
        BpfHashMap::try_from(ebpf.map_mut("IN_FLIGHT").context("IN_FLIGHT map")?)?;
    let keys: Vec<u64> = in_flight
        .keys()
        .filter_map(Result::ok)
        .filter(|key| (key >> 32) as u32 == pid)
        .collect();
    if keys.is_empty() {
        return Ok(0);
    }
    let live_tids = live_tids();
    let mut taken: Vec<(u64, AllocRecord)> = Vec::new();
    let mut dead = 0;
    for key in keys {
        if live_tids.contains(&(key as u32)) {
            continue;
        }
        // Read before removing: the removal is what makes it ours.
        let call = in_flight.get(&key, 0).ok();
        if in_flight.remove(&key).is_ok() {
            dead += 1;
            if let Some(call) = call.filter(|c| c.has_old != 0) {
                taken.push((call.ptr_arg, call.old));
            }
        }
    }
    drop(in_flight);
    if !taken.is_empty() {
        let table = StatsTable::open(ebpf)?;
        let mut allocs: BpfHashMap<&mut MapData, u64, AllocRecord> =
            BpfHashMap::try_from(ebpf.map_mut("ALLOCS").context("ALLOCS map")?)?;
        for (addr, record) in taken {
            // BPF_NOEXIST: if the address was recorded again, the block was
            // freed after all.
            if allocs.insert(addr, record, 1).is_err() {
                table.retire(&record);
            }
        }
    }
    Ok(dead)
}
