//! Reads the kernel-side aggregates out of the BPF maps into a `Snapshot`
//! (`ages`: how old the live blocks are), and the traced mappings
//! (`mappings`: the range table, `mapping_events`: the tracepoints' events).
//! Reads only: what writes maps is in `kernel`.

pub mod ages;
pub mod mapping_events;
pub mod mappings;

use std::collections::HashMap;

use anyhow::Result;
use tracer_common::Counter;

pub use self::ages::{AgeSweep, Ages};
use crate::{
    kernel::{
        maps::{self, StatsTable},
        programs::Loaded,
    },
    model::{monotonic_ns, Counters, Snapshot, StackSample, SETTLE_NS},
};

/// The programs' event counters, summed over CPUs.
pub fn counters(loaded: &Loaded) -> Result<Counters> {
    use Counter::*;
    let order = [
        Allocs,
        Frees,
        UnknownFrees,
        AllocMapFull,
        StackLost,
        StackStatsFull,
        MissedFrees,
        InFlightFull,
        FailedAllocs,
        WholeStacks,
    ];
    let indices = order.map(|c| c as u32);
    let sums = maps::counter_sums(loaded, maps::COUNTERS, &indices)?;
    let [allocs, frees, unknown_frees, alloc_map_full, stack_lost, stack_stats_full, missed_frees, in_flight_full, failed_allocs, whole_stacks] =
        sums[..]
    else {
        unreachable!("one sum per index");
    };
    Ok(Counters {
        allocs,
        frees,
        unknown_frees,
        alloc_map_full,
        stack_lost,
        stack_stats_full,
        missed_frees,
        in_flight_full,
        failed_allocs,
        whole_stacks,
    })
}

/// Takes a snapshot. `min_age_ns` > 0 counts only blocks at least that old,
/// which needs every block read (`ages` is then taken as `Exact`); `ages`
/// says how each stack's oldest block and settled bytes are learnt.
/// `sample_rate`: the run samples (see `sampling`); scans weigh blocks.
pub fn snapshot(
    loaded: &Loaded,
    min_age_ns: u64,
    ages: Ages<'_>,
    sample_rate: Option<u64>,
) -> Result<Snapshot> {
    let taken_ns = monotonic_ns();
    // Every slot, added up per stack: a stack can briefly have two slots
    // (see `kernel::reclaim`), and free slots are all zero.
    let table = StatsTable::open(loaded)?;
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
            Some(sweep.advance(&maps::allocs(loaded)?, taken_ns, sample_rate)?)
        }
        _ => Some(ages::scan_all(
            &maps::allocs(loaded)?,
            taken_ns.saturating_sub(min_age_ns),
            taken_ns.saturating_sub(SETTLE_NS),
            sample_rate,
        )?),
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
        counters: counters(loaded)?,
    })
}

/// The frames of a stack id: return addresses, innermost first, and whether
/// the capture was cut at the depth limit.
pub fn stack_frames(loaded: &Loaded, stack_id: u64) -> Result<Option<(Vec<u64>, bool)>> {
    Ok(maps::stack_frames(&maps::stacks(loaded)?, stack_id)?)
}
