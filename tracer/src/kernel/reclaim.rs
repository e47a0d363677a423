//! Reclamation of the per-stack aggregates' slots (`STACK_STATS`, an array
//! the programs update with atomic adds) whose stacks hold nothing, so that a long run over many distinct short-lived
//! stacks does not fill the stack table.
//!
//! Why reclamation is safe (see also `tracer_common::StackStats`):
//! - a program reaches a slot only through the stack's `STACKS` entry, and
//!   checks that the slot still names its stack before using it;
//! - a freed block is subtracted from the slot stored in its `ALLOCS`
//!   record, and a block is counted before its record is published, so a
//!   slot whose outstanding count is 0 has no live block;
//! - userspace deletes the `STACKS` entry, then waits for an RCU grace
//!   period (every program that could have read the slot has finished: the
//!   uprobe programs run under `rcu_read_lock()`), then recycles the slot
//!   only if it is still empty and unchanged. A slot that was used in the
//!   meantime is put back in `STACKS` (or, if the stack got a new slot
//!   meanwhile, kept as a second slot of the same stack until it empties;
//!   snapshots add up all slots of a stack).

use std::{
    collections::{HashMap, HashSet},
    io,
};

use tracer_common::StackTrace;

use super::{
    error::Result,
    maps::{self, FreeSlots, StatsTable},
    programs::Loaded,
};

/// Slots past the stacks' (`1..=stacks`) reserved for the unknown stacks of
/// traced processes, one each, while they last.
pub const UNKNOWN_SLOTS: u32 = 1024;

/// Reclaims the slots of stacks that held nothing and saw no allocation
/// for a whole housekeeping interval (so busy stacks keep their slot and
/// their totals).
#[derive(Default)]
pub struct Reclaimer {
    /// Slot -> (stack id, total count) for slots empty at the last scan.
    quiet: HashMap<usize, (u64, u64)>,
    disabled: bool,
}

/// A slot chosen for reclamation.
struct Candidate {
    slot: usize,
    stack_id: u64,
    total_count: u64,
    /// Its `STACKS` entry, when we removed it (to put it back if needed).
    removed: Option<StackTrace>,
}

impl Reclaimer {
    /// One scan; returns how many slots were recycled.
    pub fn run(&mut self, loaded: &mut Loaded) -> Result<usize> {
        if self.disabled {
            return Ok(0);
        }
        let table = StatsTable::open(loaded)?;
        let mut quiet = HashMap::new();
        let mut busy: HashSet<u64> = HashSet::new();
        let mut candidates = Vec::new();
        for slot in 1..table.slots() {
            let s = table.get(slot);
            // Free, or a process's reserved unknown-stack slot.
            if tracer_common::is_unknown_stack(s.stack_id) {
                continue;
            }
            let seen = (s.stack_id, s.total_count);
            if s.outstanding_count == 0 {
                quiet.insert(slot, seen);
            }
            if s.outstanding_count == 0 && self.quiet.get(&slot) == Some(&seen) {
                candidates.push(Candidate {
                    slot,
                    stack_id: s.stack_id,
                    total_count: s.total_count,
                    removed: None,
                });
            } else {
                busy.insert(s.stack_id);
            }
        }
        // A stack's frames must stay while any of its slots holds memory.
        candidates.retain(|c| !busy.contains(&c.stack_id));
        self.quiet = quiet;
        if candidates.is_empty() {
            return Ok(0);
        }
        // Allocations from a candidate after this point and before its
        // unpublishing are seen after the grace period: it is put back.
        race_window();

        let mut stacks = maps::stacks_mut(loaded)?;
        for c in &mut candidates {
            // Unpublish the slot (an orphan slot has no entry of its own).
            if let Ok(Some(trace)) = stacks.get(&c.stack_id) {
                if trace.slot == c.slot as u64 && stacks.remove(&c.stack_id) {
                    c.removed = Some(trace);
                }
            }
        }
        // Allocations from a candidate's stack now find no slot and claim a
        // new one; with the window above, the old slot becomes a second one.
        race_window();
        if let Err(e) = grace_period() {
            for c in &candidates {
                if let Some(trace) = &c.removed {
                    stacks.insert_new(c.stack_id, *trace);
                }
            }
            log::debug!("stack reclamation disabled: no RCU grace period available: {e}");
            self.disabled = true;
            return Ok(0);
        }
        let mut recycle = Vec::new();
        let (mut put_back, mut second) = (0, 0);
        for c in &candidates {
            let s = table.get(c.slot);
            if s.outstanding_count == 0 && s.total_count == c.total_count {
                recycle.push(c.slot);
            } else if let Some(trace) = &c.removed {
                // Allocated from while we looked: keep it. If the stack got a
                // new slot meanwhile, this one stays a second slot of it.
                if stacks.insert_new(c.stack_id, *trace) {
                    put_back += 1;
                } else {
                    second += 1;
                }
            }
        }
        log::debug!(
            "reclaim: {} candidates, {} recycled, {put_back} used meanwhile and put back, \
             {second} used meanwhile and kept as a second slot",
            candidates.len(),
            recycle.len()
        );

        let mut queue = FreeSlots::open(loaded)?;
        for &slot in &recycle {
            table.clear(slot);
            self.quiet.remove(&slot);
            queue.push(slot as u32)?;
        }
        Ok(recycle.len())
    }
}

/// Testing: `TRACER_TEST_RECLAIM_WINDOW_MS` makes each scan that found
/// candidates wait that long after reading the slots, and again after
/// unpublishing them, so that a stress test's allocations land in those
/// windows often (tests/tests/reliability.rs). Unset: no wait.
fn race_window() {
    static WINDOW: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    let window = WINDOW.get_or_init(|| {
        std::env::var("TRACER_TEST_RECLAIM_WINDOW_MS")
            .ok()?
            .parse()
            .ok()
            .map(std::time::Duration::from_millis)
    });
    if let Some(window) = window {
        std::thread::sleep(*window);
    }
}

/// Waits until every BPF program that was running has finished.
///
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` is `synchronize_rcu()`, and the
/// (non-sleepable) uprobe programs run inside `rcu_read_lock()`. The kernel
/// skips the wait when a single CPU is online and refuses it on nohz_full
/// kernels; reclamation is then off.
fn grace_period() -> io::Result<()> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    if unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } < 2 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "one CPU online: membarrier does not wait",
        ));
    }
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
