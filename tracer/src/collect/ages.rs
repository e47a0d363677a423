//! Ages of live blocks: each stack's oldest block and its settled bytes
//! (blocks old enough that churn does not count), which takes reading the
//! blocks of `ALLOCS` themselves. A sweep reads a bounded slice per
//! snapshot, so a million live blocks do not cost a quarter second each.

use std::collections::HashMap;

use anyhow::Result;
use tracer_common::AllocRecord;

use crate::{
    kernel::{
        maps::{self, Allocs},
        sys::{BatchError, Cursor},
        KernelError,
    },
    model::{AgeScan, AgeScanner, SETTLE_NS},
};

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
    cursor: Cursor,
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
    pub(super) fn advance(
        &mut self,
        allocs: &Allocs<'_>,
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
            let mut scanner = AgeScanner::new(taken_ns, settle_cutoff);
            let mut blocks = 0usize;
            let cpu_before = thread_cpu_ns();
            let read = allocs.read_slice(&mut self.cursor, slice, |_, r| {
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
                Err(BatchError::Unsupported(_)) => self.whole_only = true,
                Err(BatchError::Failed(e)) => return Err(KernelError::map(maps::ALLOCS, e).into()),
            }
        }
        Ok(scan_all(allocs, taken_ns, settle_cutoff, sample_rate)?)
    }
}

/// One block into a scan: itself, or when sampling what it stands for.
pub(super) fn add_block(scanner: &mut AgeScanner, r: &AllocRecord, sample_rate: Option<u64>) {
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

/// Ages from every block of the map, read now: `cutoff_ns` counts only
/// blocks at least that old (`--min-age`).
pub(super) fn scan_all(
    allocs: &Allocs<'_>,
    cutoff_ns: u64,
    settle_cutoff_ns: u64,
    sample_rate: Option<u64>,
) -> crate::kernel::Result<HashMap<u64, AgeScan>> {
    let mut scanner = AgeScanner::new(cutoff_ns, settle_cutoff_ns);
    allocs.for_each(|_, r| add_block(&mut scanner, r, sample_rate))?;
    Ok(scanner.finish())
}
