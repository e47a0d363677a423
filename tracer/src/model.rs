//! The tracer's data, free of BPF, terminals and files: a `Snapshot` of the
//! per-stack aggregates at one instant, and the selections every view makes
//! of it. Every view and format is a function of a Snapshot.

use std::collections::HashMap;

/// Event and drop counters, summed over CPUs. See `tracer_common::Counter`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub allocs: u64,
    pub frees: u64,
    pub unknown_frees: u64,
    pub alloc_map_full: u64,
    pub stack_lost: u64,
    pub stack_stats_full: u64,
    pub missed_frees: u64,
    pub in_flight_full: u64,
    pub failed_allocs: u64,
}

/// Outstanding memory of one call stack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackSample {
    pub stack_id: u64,
    /// Bytes allocated here and not freed (older than the minimum age, when
    /// one is set).
    pub bytes: u64,
    /// Blocks allocated here and not freed (same filter).
    pub count: u64,
    /// Blocks allocated here since attach, freed or not.
    pub total_count: u64,
    /// Bytes allocated here since attach, freed or not.
    pub total_bytes: u64,
    /// Allocation time (monotonic ns) of the oldest outstanding block, when
    /// known.
    pub oldest_ns: Option<u64>,
}

/// Per-stack aggregates of one process at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// CLOCK_MONOTONIC ns when the snapshot was taken (same clock as the
    /// programs' timestamps).
    pub taken_ns: u64,
    /// Every stack with outstanding memory, in no particular order.
    pub stacks: Vec<StackSample>,
    pub counters: Counters,
}

impl Snapshot {
    pub fn total_bytes(&self) -> u64 {
        self.stacks.iter().map(|s| s.bytes).sum()
    }

    pub fn total_count(&self) -> u64 {
        self.stacks.iter().map(|s| s.count).sum()
    }

    /// Stacks holding memory, most bytes first (ties: more blocks, then
    /// stack id, so the order is stable). `limit` 0 means all.
    pub fn top(&self, limit: usize) -> Vec<&StackSample> {
        let mut stacks = sorted(self.stacks.iter().filter(|s| s.count > 0));
        if limit > 0 {
            stacks.truncate(limit);
        }
        stacks
    }

    /// Every stack that allocated since attach, freed or not, in `top`'s
    /// order: for formats that show allocations since attach (pprof).
    pub fn every_stack(&self) -> Vec<&StackSample> {
        sorted(
            self.stacks
                .iter()
                .filter(|s| s.count > 0 || s.total_count > 0),
        )
    }

    /// Age in seconds of a stack's oldest outstanding block.
    pub fn oldest_age_s(&self, stack: &StackSample) -> Option<f64> {
        stack
            .oldest_ns
            .map(|t| self.taken_ns.saturating_sub(t) as f64 / 1e9)
    }
}

/// Most bytes first (ties: more blocks, then stack id, so the order is stable).
fn sorted<'a>(stacks: impl Iterator<Item = &'a StackSample>) -> Vec<&'a StackSample> {
    let mut stacks: Vec<&StackSample> = stacks.collect();
    stacks.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then(b.count.cmp(&a.count))
            .then(a.stack_id.cmp(&b.stack_id))
    });
    stacks
}

/// What the per-address scan of live allocations yields for one stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgeScan {
    pub bytes: u64,
    pub count: u64,
    pub oldest_ns: u64,
}

/// Folds live allocations `(stack_id, size, timestamp)` into per-stack
/// totals, keeping only blocks allocated at or before `cutoff_ns`.
pub fn scan_ages(
    allocations: impl IntoIterator<Item = (u64, u64, u64)>,
    cutoff_ns: u64,
) -> HashMap<u64, AgeScan> {
    let mut by_stack: HashMap<u64, AgeScan> = HashMap::new();
    for (stack_id, size, timestamp) in allocations {
        if timestamp > cutoff_ns {
            continue;
        }
        let entry = by_stack.entry(stack_id).or_insert(AgeScan {
            oldest_ns: u64::MAX,
            ..AgeScan::default()
        });
        entry.bytes += size;
        entry.count += 1;
        entry.oldest_ns = entry.oldest_ns.min(timestamp);
    }
    by_stack
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: u64, bytes: u64, count: u64) -> StackSample {
        StackSample {
            stack_id: id,
            bytes,
            count,
            ..Default::default()
        }
    }

    #[test]
    fn top_sorts_by_bytes_then_count_and_drops_empty_stacks() {
        let snap = Snapshot {
            stacks: vec![
                sample(1, 10, 1),
                sample(2, 300, 3),
                sample(3, 0, 0),
                sample(4, 10, 2),
            ],
            ..Default::default()
        };
        let ids: Vec<u64> = snap.top(0).iter().map(|s| s.stack_id).collect();
        assert_eq!(ids, [2, 4, 1]);
        assert_eq!(snap.top(1).len(), 1);
        assert_eq!(snap.total_bytes(), 320);
        assert_eq!(snap.total_count(), 6);
    }

    #[test]
    fn every_stack_includes_freed_ones() {
        let mut freed = sample(5, 0, 0);
        freed.total_count = 4;
        let snap = Snapshot {
            stacks: vec![sample(3, 0, 0), freed, sample(1, 10, 1)],
            ..Default::default()
        };
        let ids: Vec<u64> = snap.every_stack().iter().map(|s| s.stack_id).collect();
        assert_eq!(ids, [1, 5], "freed stacks too, never-used ones not");
    }

    #[test]
    fn age_scan_filters_young_blocks_and_finds_oldest() {
        let scan = scan_ages([(7, 100, 50), (7, 20, 10), (7, 5, 900), (8, 1, 950)], 500);
        assert_eq!(
            scan[&7],
            AgeScan {
                bytes: 120,
                count: 2,
                oldest_ns: 10
            }
        );
        assert!(!scan.contains_key(&8));
    }

    #[test]
    fn oldest_age_is_relative_to_snapshot_time() {
        let snap = Snapshot {
            taken_ns: 3_500_000_000,
            ..Default::default()
        };
        let s = StackSample {
            oldest_ns: Some(1_000_000_000),
            ..Default::default()
        };
        assert_eq!(snap.oldest_age_s(&s), Some(2.5));
    }
}
