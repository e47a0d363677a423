//! Reads the kernel-side aggregates out of the BPF maps into a `Snapshot`.
//! The only module besides `probes` that touches aya.

pub mod mapping_events;
pub mod mappings;

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    Ebpf, Pod,
};

use tracer_common::{AllocKey, AllocRecord, Counter, InFlight, StackTrace};

use crate::{
    kernel::batch,
    kernel::slots::StatsTable,
    model::{AgeScan, AgeScanner, Counters, Snapshot, StackSample, SETTLE_NS},
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

/// How a snapshot learns the ages of live blocks (each stack's oldest block
/// and settled bytes), which takes reading every block of `ALLOCS`.
pub enum Ages<'a> {
    /// Not at all.
    Skip,
    /// Every block, now: exact, but a million blocks take a quarter of a
    /// second of CPU (the kernel's walk of the map dominates).
    Exact,
    /// A bounded slice of the map per snapshot, continuing a sweep: ages
    /// come from the last complete sweep, merged with the slices read since.
    /// Exact whenever the whole map fits in one slice.
    Sweep(&'a mut AgeSweep),
}

/// CPU time a snapshot may spend reading blocks for `Ages::Sweep`: about
/// 1% of a core at one refresh a second, however many blocks are live. The
/// slice read per snapshot is sized from the time per block measured on the
/// previous ones (a million blocks take ~0.3 s to read whole), so a large
/// map takes several refreshes to sweep.
pub const SWEEP_BUDGET_NS: u64 = 10_000_000;
/// The first slice, before any time per block is known.
pub const SWEEP_SLICE: usize = 32768;
const SWEEP_SLICE_MIN: usize = 16384;
const SWEEP_SLICE_MAX: usize = 1 << 20;

/// CPU time of the calling thread (the batch syscalls' kernel time included).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The state of a sweep of `ALLOCS` spread over snapshots.
#[derive(Debug, Default)]
pub struct AgeSweep {
    cursor: batch::Cursor,
    /// Ages from the sweep in progress.
    partial: HashMap<u64, AgeScan>,
    /// Ages from the last complete sweep.
    complete: Option<HashMap<u64, AgeScan>>,
    /// Key-by-key reading (no batch support) cannot resume: always whole.
    whole_only: bool,
    /// Blocks to read next time (0: `SWEEP_SLICE`).
    slice: usize,
}

impl AgeSweep {
    /// Reads the next slice; returns the best ages known: the last complete
    /// sweep with the slices of this one laid over it, stack by stack.
    fn advance(
        &mut self,
        ebpf: &Ebpf,
        taken_ns: u64,
        sample_rate: Option<u64>,
    ) -> Result<HashMap<u64, AgeScan>> {
        let slice = if self.slice == 0 {
            SWEEP_SLICE
        } else {
            self.slice
        };
        let settle_cutoff = taken_ns.saturating_sub(SETTLE_NS);
        if !self.whole_only {
            let map = map(ebpf, "ALLOCS")?;
            if let Some(fd) = batch::hash_map_fd(map) {
                let mut scanner = AgeScanner::new(taken_ns, settle_cutoff);
                let mut blocks = 0usize;
                let cpu_before = thread_cpu_ns();
                let read = self
                    .cursor
                    .read::<AllocKey, AllocRecord>(fd, slice, |_, r| {
                        blocks += 1;
                        add_block(&mut scanner, r, sample_rate)
                    });
                let cpu_ns = thread_cpu_ns().saturating_sub(cpu_before);
                if blocks >= 1024 && cpu_ns > 0 {
                    let per_block = (cpu_ns as f64 / blocks as f64).max(1.0);
                    self.slice = ((SWEEP_BUDGET_NS as f64 / per_block) as usize)
                        .clamp(SWEEP_SLICE_MIN, SWEEP_SLICE_MAX);
                }
                match read {
                    Ok(finished) => {
                        merge_ages(&mut self.partial, scanner.finish());
                        if finished {
                            self.complete = Some(std::mem::take(&mut self.partial));
                        }
                        let mut ages = self.complete.clone().unwrap_or_default();
                        // A stack seen in this sweep: its newer figures win
                        // (stacks not reached yet keep the last sweep's).
                        for (stack, age) in &self.partial {
                            ages.insert(*stack, *age);
                        }
                        return Ok(ages);
                    }
                    Err(batch::BatchError::Unsupported(_)) => self.whole_only = true,
                    Err(e) => return Err(e).context("reading ALLOCS"),
                }
            } else {
                self.whole_only = true;
            }
        }
        let mut scanner = AgeScanner::new(taken_ns, settle_cutoff);
        for_each_entry::<AllocKey, AllocRecord>(ebpf, "ALLOCS", |_, r| {
            add_block(&mut scanner, r, sample_rate)
        })?;
        Ok(scanner.finish())
    }
}

/// One block into a scan: itself, or when sampling what it stands for.
fn add_block(scanner: &mut AgeScanner, r: &AllocRecord, sample_rate: Option<u64>) {
    match sample_rate {
        None => scanner.add(r.stack_id, r.size, r.timestamp_ns),
        Some(rate) => {
            let (bytes, blocks) = crate::sampling::weights(r.size, rate);
            scanner.add_weighted(
                r.stack_id,
                bytes.round() as u64,
                blocks.round() as u64,
                r.timestamp_ns,
            )
        }
    }
}

fn merge_ages(into: &mut HashMap<u64, AgeScan>, from: HashMap<u64, AgeScan>) {
    for (stack, age) in from {
        let entry = into.entry(stack).or_insert(AgeScan {
            oldest_ns: u64::MAX,
            ..AgeScan::default()
        });
        entry.bytes += age.bytes;
        entry.count += age.count;
        entry.settled_bytes += age.settled_bytes;
        entry.oldest_ns = entry.oldest_ns.min(age.oldest_ns);
    }
}

/// Takes a snapshot. `min_age_ns` > 0 counts only blocks at least that old,
/// which needs every block read (`ages` is then taken as `Exact`); `ages`
/// says how each stack's oldest block and settled bytes are learnt.
/// `sample_rate`: the run samples (see `sampling`); scans weigh blocks.
pub fn snapshot(
    ebpf: &Ebpf,
    min_age_ns: u64,
    ages: Ages<'_>,
    sample_rate: Option<u64>,
) -> Result<Snapshot> {
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
            pid: s.tgid,
            ..StackSample::default()
        });
        sample.bytes = sample.bytes.wrapping_add(s.outstanding_bytes);
        sample.count = sample.count.wrapping_add(s.outstanding_count);
        sample.total_count += s.total_count;
        sample.total_bytes += s.total_bytes;
    }
    let mut stacks: Vec<StackSample> = by_stack.into_values().collect();
    let ages = match ages {
        Ages::Skip if min_age_ns == 0 => None,
        Ages::Sweep(sweep) if min_age_ns == 0 => {
            Some(sweep.advance(ebpf, taken_ns, sample_rate)?)
        }
        _ => {
            let cutoff = taken_ns.saturating_sub(min_age_ns);
            let settle_cutoff = taken_ns.saturating_sub(SETTLE_NS);
            let mut scanner = AgeScanner::new(cutoff, settle_cutoff);
            for_each_entry::<AllocKey, AllocRecord>(ebpf, "ALLOCS", |_, r| {
                add_block(&mut scanner, r, sample_rate)
            })?;
            Some(scanner.finish())
        }
    };
    if let Some(ages) = ages {
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

/// Calls `each(stack id, size, timestamp)` for every live allocation.
pub fn for_each_live_allocation(ebpf: &Ebpf, mut each: impl FnMut(u64, u64, u64)) -> Result<()> {
    for_each_entry::<AllocKey, AllocRecord>(ebpf, "ALLOCS", |_, r| {
        each(r.stack_id, r.size, r.timestamp_ns)
    })
}

/// Every entry of a hash map: in batches of thousands per syscall where the
/// kernel can (`batch`), else key by key (two syscalls per entry).
fn for_each_entry<K: Pod, V: Pod>(
    ebpf: &Ebpf,
    name: &str,
    mut each: impl FnMut(&K, &V),
) -> Result<()> {
    let map = map(ebpf, name)?;
    if let Some(fd) = batch::hash_map_fd(map) {
        match batch::for_each::<K, V>(fd, &mut each) {
            Ok(()) => return Ok(()),
            Err(batch::BatchError::Unsupported(e)) => {
                log::debug!("{name}: batch lookup unsupported ({e}); reading key by key")
            }
            Err(e) => return Err(e).with_context(|| format!("reading {name}")),
        }
    }
    let entries: BpfHashMap<&MapData, K, V> = BpfHashMap::try_from(map)?;
    for entry in entries.iter() {
        match entry {
            Ok((k, v)) => each(&k, &v),
            // An entry removed between listing and reading it.
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {name}")),
        }
    }
    Ok(())
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
    sample_rate: Option<u64>,
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
        let mut allocs: BpfHashMap<&mut MapData, AllocKey, AllocRecord> =
            BpfHashMap::try_from(ebpf.map_mut("ALLOCS").context("ALLOCS map")?)?;
        for (addr, record) in taken {
            // BPF_NOEXIST: if the address was recorded again, the block was
            // freed after all.
            if allocs.insert(AllocKey::new(pid, addr), record, 1).is_err() {
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
    ebpf: &mut Ebpf,
    pid: u32,
    before_ns: u64,
    sample_rate: Option<u64>,
) -> Result<usize> {
    let mut blocks: Vec<AllocKey> = Vec::new();
    for_each_entry::<AllocKey, AllocRecord>(ebpf, "ALLOCS", |key, record| {
        if key.tgid == pid && record.timestamp_ns < before_ns {
            blocks.push(*key);
        }
    })?;
    let table = StatsTable::open(ebpf)?;
    let mut allocs: BpfHashMap<&mut MapData, AllocKey, AllocRecord> =
        BpfHashMap::try_from(ebpf.map_mut("ALLOCS").context("ALLOCS map")?)?;
    let mut dropped = 0;
    for key in blocks {
        // Read, then remove: only a successful removal makes it ours to retire.
        let Ok(record) = allocs.get(&key, 0) else {
            continue;
        };
        // Freed and handed out again since the listing: the new program's.
        if record.timestamp_ns >= before_ns {
            continue;
        }
        if allocs.remove(&key).is_ok() {
            table.retire(&record, sample_rate);
            dropped += 1;
        }
    }
    Ok(dropped)
}
