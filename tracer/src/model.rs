//! The tracer's data, free of BPF, terminals and files: a `Snapshot` of the
//! per-stack aggregates at one instant, and the selections every view makes
//! of it. Every view and format is a function of a Snapshot.

use std::collections::{HashMap, HashSet, VecDeque};

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
    pub unmatched_frees: u64,
    pub lost_frees: u64,
    /// Allocations whose stack reached its outermost frame.
    pub whole_stacks: u64,
}

impl Counters {
    /// The share of allocations whose stacks reached an outermost frame
    /// (None before the first allocation): how far stacks can be trusted.
    pub fn whole_stack_share(&self) -> Option<f64> {
        (self.allocs > 0).then(|| (self.whole_stacks as f64 / self.allocs as f64).min(1.0))
    }
}

/// Outstanding memory of one call stack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackSample {
    pub stack_id: u64,
    /// The process the stack belongs to (0: unknown).
    pub pid: u32,
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
    /// Bytes in outstanding blocks at least `SETTLE_NS` old, when known.
    /// Growth is measured on these, so buffers freed within a second of
    /// their allocation, however many, do not look like growth.
    pub settled_bytes: Option<u64>,
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

/// Age from which a block counts as settled (see `StackSample::settled_bytes`).
pub const SETTLE_NS: u64 = 1_000_000_000;

/// What the per-address scan of live allocations yields for one stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgeScan {
    /// Blocks allocated at or before the age cutoff.
    pub bytes: u64,
    pub count: u64,
    /// Oldest block of any age.
    pub oldest_ns: u64,
    /// Bytes allocated at or before the settle cutoff, whatever the age cutoff.
    pub settled_bytes: u64,
}

/// Folds live allocations `(stack_id, size, timestamp)` into per-stack
/// totals: bytes and count of blocks allocated at or before `cutoff_ns`,
/// bytes of those at or before `settle_cutoff_ns`, and the oldest block.
pub fn scan_ages(
    allocations: impl IntoIterator<Item = (u64, u64, u64)>,
    cutoff_ns: u64,
    settle_cutoff_ns: u64,
) -> HashMap<u64, AgeScan> {
    let mut scanner = AgeScanner::new(cutoff_ns, settle_cutoff_ns);
    for (stack_id, size, timestamp) in allocations {
        scanner.add(stack_id, size, timestamp);
    }
    scanner.finish()
}

/// `scan_ages` one allocation at a time, so a scan of a million blocks
/// needs no list of them.
#[derive(Debug)]
pub struct AgeScanner {
    cutoff_ns: u64,
    settle_cutoff_ns: u64,
    by_stack: HashMap<u64, AgeScan>,
}

impl AgeScanner {
    pub fn new(cutoff_ns: u64, settle_cutoff_ns: u64) -> Self {
        AgeScanner {
            cutoff_ns,
            settle_cutoff_ns,
            by_stack: HashMap::new(),
        }
    }

    #[inline]
    pub fn add(&mut self, stack_id: u64, size: u64, timestamp: u64) {
        self.add_weighted(stack_id, size, 1, timestamp)
    }

    /// A block that stands for `blocks` blocks of `bytes` bytes in all
    /// (sampling).
    #[inline]
    pub fn add_weighted(&mut self, stack_id: u64, bytes: u64, blocks: u64, timestamp: u64) {
        let (size, count) = (bytes, blocks);
        let entry = self.by_stack.entry(stack_id).or_insert(AgeScan {
            oldest_ns: u64::MAX,
            ..AgeScan::default()
        });
        entry.oldest_ns = entry.oldest_ns.min(timestamp);
        if timestamp <= self.settle_cutoff_ns {
            entry.settled_bytes += size;
        }
        if timestamp <= self.cutoff_ns {
            entry.bytes += size;
            entry.count += count;
        }
    }

    pub fn finish(self) -> HashMap<u64, AgeScan> {
        self.by_stack
    }
}

/// Growth of each stack's memory: a sliding window of (time, settled bytes)
/// per stack, fed one snapshot at a time. A stack first seen after the
/// first snapshot starts from zero at the snapshot before.
#[derive(Debug, Default)]
pub struct Growth {
    window_ns: u64,
    series: HashMap<u64, VecDeque<(u64, u64)>>,
    last_taken_ns: Option<u64>,
}

impl Growth {
    pub fn new(window_ns: u64) -> Self {
        Growth {
            window_ns,
            ..Default::default()
        }
    }

    pub fn record(&mut self, snapshot: &Snapshot) {
        let now = snapshot.taken_ns;
        let window_start = now.saturating_sub(self.window_ns);
        let mut seen = HashSet::with_capacity(snapshot.stacks.len());
        for stack in &snapshot.stacks {
            seen.insert(stack.stack_id);
            let value = stack.settled_bytes.unwrap_or(stack.bytes);
            let series = self.series.entry(stack.stack_id).or_insert_with(|| {
                self.last_taken_ns
                    .map(|t| VecDeque::from([(t, 0)]))
                    .unwrap_or_default()
            });
            series.push_back((now, value));
            // Keep one point at or before the window's start as the baseline.
            while series.len() > 2 && series[1].0 <= window_start {
                series.pop_front();
            }
        }
        self.series.retain(|id, _| seen.contains(id));
        self.last_taken_ns = Some(now);
    }

    /// Bytes per second over the window, once there are two points: the
    /// mean of the per-snapshot rates without the highest and the lowest
    /// (from three intervals on), so a one-off step, such as a table
    /// loaded once, does not pass for growth while a steady leak does.
    pub fn rate(&self, stack_id: u64) -> Option<f64> {
        let series = self.series.get(&stack_id)?;
        let mut rates: Vec<f64> = series
            .iter()
            .zip(series.iter().skip(1))
            .filter(|((t0, _), (t1, _))| t1 > t0)
            .map(|(&(t0, v0), &(t1, v1))| (v1 as f64 - v0 as f64) / ((t1 - t0) as f64 / 1e9))
            .collect();
        if rates.is_empty() {
            return None;
        }
        if rates.len() >= 3 {
            rates.sort_by(f64::total_cmp);
            rates.pop();
            rates.remove(0);
        }
        Some(rates.iter().sum::<f64>() / rates.len() as f64)
    }
}

/// Points kept per stack by `History`: when full, every other one goes, so
/// the whole time since attach stays covered at a coarser step.
pub const HISTORY_POINTS: usize = 64;

/// Every stack's settled bytes at each snapshot since attach: what trends
/// are judged on (`report::trend`). Every block the tracer knows was
/// allocated since attach, so a stack starts from zero at the snapshot
/// before it was first seen (at attach for the first); one gone from the
/// map is forgotten.
///
/// The same per allocation site (stacks that share their innermost frame,
/// summed): a cache filled from one call path and refilled from another
/// shrinks in the first stack and grows in the second, flat as a whole.
#[derive(Debug, Default)]
pub struct History {
    series: HashMap<u64, Vec<(u64, u64)>>,
    sites: HashMap<u64, Vec<(u64, u64)>>,
    /// Each stack's site, and how many stacks each site had last time.
    site_of: HashMap<u64, u64>,
    site_stacks: HashMap<u64, usize>,
    last_taken_ns: Option<u64>,
}

impl History {
    /// History from attach (CLOCK_MONOTONIC ns).
    pub fn since(attached_ns: u64) -> Self {
        History {
            last_taken_ns: Some(attached_ns),
            ..Default::default()
        }
    }

    /// Records a snapshot, each stack its own site.
    pub fn record(&mut self, snapshot: &Snapshot) {
        self.record_by_site(snapshot, |s| s.stack_id)
    }

    /// Records a snapshot; `site` names each stack's allocation site.
    pub fn record_by_site(&mut self, snapshot: &Snapshot, site: impl Fn(&StackSample) -> u64) {
        let now = snapshot.taken_ns;
        if self.last_taken_ns.is_some_and(|t| now <= t) {
            return;
        }
        let mut seen = HashSet::with_capacity(snapshot.stacks.len());
        let mut by_site: HashMap<u64, u64> = HashMap::new();
        self.site_stacks.clear();
        for stack in &snapshot.stacks {
            let value = stack.settled_bytes.unwrap_or(stack.bytes);
            if stack.count == 0 && value == 0 && !self.series.contains_key(&stack.stack_id) {
                continue;
            }
            seen.insert(stack.stack_id);
            push(
                &mut self.series,
                stack.stack_id,
                self.last_taken_ns,
                now,
                value,
            );
            let site = site(stack);
            self.site_of.insert(stack.stack_id, site);
            *by_site.entry(site).or_default() += value;
            *self.site_stacks.entry(site).or_default() += 1;
        }
        for (&site, &value) in &by_site {
            push(&mut self.sites, site, self.last_taken_ns, now, value);
        }
        self.series.retain(|id, _| seen.contains(id));
        self.site_of.retain(|id, _| seen.contains(id));
        self.sites.retain(|site, _| by_site.contains_key(site));
        self.last_taken_ns = Some(now);
    }

    /// (monotonic ns, settled bytes) of a stack, oldest first.
    pub fn series(&self, stack_id: u64) -> &[(u64, u64)] {
        self.series.get(&stack_id).map_or(&[], Vec::as_slice)
    }

    /// The same summed over the stack's site, when the site has other
    /// stacks too.
    pub fn site_series(&self, stack_id: u64) -> Option<&[(u64, u64)]> {
        let site = self.site_of.get(&stack_id)?;
        if self.site_stacks.get(site).copied().unwrap_or(0) < 2 {
            return None;
        }
        self.sites.get(site).map(Vec::as_slice)
    }
}

/// Appends a point to a series, which starts from zero at `before`.
fn push(
    all: &mut HashMap<u64, Vec<(u64, u64)>>,
    key: u64,
    before: Option<u64>,
    now: u64,
    value: u64,
) {
    let series = all
        .entry(key)
        .or_insert_with(|| before.map(|t| vec![(t, 0)]).unwrap_or_default());
    series.push((now, value));
    if series.len() > HISTORY_POINTS {
        thin(series);
    }
}

/// Drops every other point but the first and the last: the whole history
/// stays covered evenly, at twice the step.
fn thin(series: &mut Vec<(u64, u64)>) {
    let last = series.len() - 1;
    let mut index = 0;
    series.retain(|_| {
        index += 1;
        index % 2 == 1 || index - 1 == last
    });
}

/// A process's resident memory, as /proc/PID/status splits it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResidentMemory {
    /// VmRSS: the sum of the three below.
    pub rss: u64,
    /// RssAnon: private anonymous pages (heap, anonymous mappings, stacks).
    pub anon: u64,
    /// RssFile: file-backed pages (code, mapped files).
    pub file: u64,
    /// RssShmem: shared memory (memfd, shm, MAP_SHARED|MAP_ANONYMOUS).
    pub shmem: u64,
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`, which stamps
/// blocks and events.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
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
        let scan = scan_ages(
            [(7, 100, 50), (7, 20, 10), (7, 5, 900), (8, 1, 950)],
            500,
            20,
        );
        assert_eq!(
            scan[&7],
            AgeScan {
                bytes: 120,
                count: 2,
                oldest_ns: 10,
                settled_bytes: 20,
            }
        );
        assert_eq!(scan[&8].count, 0);
        assert_eq!(scan[&8].oldest_ns, 950);
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

    fn at(taken_s: u64, stacks: &[(u64, u64)]) -> Snapshot {
        Snapshot {
            taken_ns: taken_s * 1_000_000_000,
            stacks: stacks
                .iter()
                .map(|&(id, settled)| StackSample {
                    stack_id: id,
                    settled_bytes: Some(settled),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn growth_is_the_slope_over_the_window() {
        let mut growth = Growth::new(10_000_000_000);
        growth.record(&at(0, &[(1, 0)]));
        assert_eq!(growth.rate(1), None, "one point is no rate");
        for t in 1..=20 {
            // Stack 1 leaks 1000 B/s; stack 2 appears at t=5 and churns.
            let mut stacks = vec![(1, t * 1000)];
            if t >= 5 {
                stacks.push((2, if t % 2 == 0 { 50_000 } else { 0 }));
            }
            growth.record(&at(t, &stacks));
        }
        assert_eq!(growth.rate(1), Some(1000.0));
        // Alternating +50,000/s and -50,000/s over the 10 s window.
        assert_eq!(growth.rate(2), Some(0.0));
        // A stack that vanished is forgotten.
        growth.record(&at(21, &[(1, 21_000)]));
        assert_eq!(growth.rate(2), None);
    }

    #[test]
    fn a_new_stack_grows_from_zero() {
        let mut growth = Growth::new(10_000_000_000);
        growth.record(&at(0, &[]));
        growth.record(&at(2, &[(9, 4000)]));
        assert_eq!(growth.rate(9), Some(2000.0));
    }

    #[test]
    fn a_one_off_step_is_not_growth_but_a_steady_leak_is() {
        let mut growth = Growth::new(10_000_000_000);
        for t in 0..=5 {
            let table = if t >= 2 { 2 << 20 } else { 0 };
            growth.record(&at(t, &[(1, table), (2, t * 500)]));
        }
        assert_eq!(growth.rate(1), Some(0.0));
        assert_eq!(growth.rate(2), Some(500.0));
    }

    #[test]
    fn history_covers_the_whole_run_in_bounded_points() {
        let mut history = History::since(0);
        for t in 1..=1000 {
            let mut stacks = vec![(1, t * 10)];
            if t < 500 {
                stacks.push((2, 5));
            }
            history.record(&at(t, &stacks));
        }
        let series = history.series(1);
        assert!(series.len() <= HISTORY_POINTS, "{}", series.len());
        assert_eq!(series[0], (0, 0), "starts from zero at the snapshot before");
        assert_eq!(*series.last().unwrap(), (1_000_000_000_000, 10_000));
        assert!(series.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(series.len() >= HISTORY_POINTS / 2);
        assert!(history.series(2).is_empty(), "gone stacks are forgotten");
    }
}
