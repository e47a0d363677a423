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

use tracer_common::{StackStats, StackTrace};

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

/// What reclamation reads and writes: the maps (`KernelSlots`), or a fake
/// in the tests below.
trait SlotMaps {
    fn slots(&self) -> usize;
    fn slot(&self, slot: usize) -> StackStats;
    /// Removes `stack_id`'s `STACKS` entry if it names `slot`; returns it.
    fn unpublish(&mut self, stack_id: u64, slot: usize) -> Option<StackTrace>;
    /// Puts an entry back unless the stack has one again; returns whether.
    fn republish(&mut self, stack_id: u64, trace: StackTrace) -> bool;
    /// Waits until no program still reads an unpublished slot.
    fn grace_period(&mut self) -> io::Result<()>;
    /// Zeroes `slot` and hands it to the programs again.
    fn recycle(&mut self, slot: usize) -> Result<()>;
}

/// The real maps: `STACK_STATS` mapped, `STACKS`, `FREE_SLOTS`.
struct KernelSlots<'a> {
    table: StatsTable,
    loaded: &'a mut Loaded,
}

impl SlotMaps for KernelSlots<'_> {
    fn slots(&self) -> usize {
        self.table.slots()
    }

    fn slot(&self, slot: usize) -> StackStats {
        self.table.get(slot)
    }

    fn unpublish(&mut self, stack_id: u64, slot: usize) -> Option<StackTrace> {
        let mut stacks = maps::stacks_mut(self.loaded).ok()?;
        let trace = stacks.get(&stack_id).ok()??;
        (trace.slot == slot as u64 && stacks.remove(&stack_id)).then_some(trace)
    }

    fn republish(&mut self, stack_id: u64, trace: StackTrace) -> bool {
        maps::stacks_mut(self.loaded).is_ok_and(|mut stacks| stacks.insert_new(stack_id, trace))
    }

    fn grace_period(&mut self) -> io::Result<()> {
        grace_period()
    }

    fn recycle(&mut self, slot: usize) -> Result<()> {
        self.table.clear(slot);
        FreeSlots::open(self.loaded)?.push(slot as u32)
    }
}

impl Reclaimer {
    /// `grace_periods`: the kernel offers them (`features`); without, no
    /// slot is ever recycled.
    pub fn new(grace_periods: bool) -> Self {
        Reclaimer {
            disabled: !grace_periods,
            ..Reclaimer::default()
        }
    }

    /// One scan; returns how many slots were recycled.
    pub fn run(&mut self, loaded: &mut Loaded) -> Result<usize> {
        if self.disabled {
            return Ok(0);
        }
        let table = StatsTable::open(loaded)?;
        self.scan(&mut KernelSlots { table, loaded })
    }

    fn scan(&mut self, maps: &mut impl SlotMaps) -> Result<usize> {
        let mut candidates = self.candidates(maps);
        if candidates.is_empty() {
            return Ok(0);
        }
        // Allocations from a candidate after this point and before its
        // unpublishing are seen after the grace period: it is put back.
        race_window();
        for c in &mut candidates {
            // Unpublish the slot (an orphan slot has no entry of its own).
            c.removed = maps.unpublish(c.stack_id, c.slot);
        }
        // Allocations from a candidate's stack now find no slot and claim a
        // new one; with the window above, the old slot becomes a second one.
        race_window();
        if let Err(e) = maps.grace_period() {
            for c in &candidates {
                if let Some(trace) = c.removed {
                    maps.republish(c.stack_id, trace);
                }
            }
            log::debug!("stack reclamation disabled: no RCU grace period available: {e}");
            self.disabled = true;
            return Ok(0);
        }
        let mut recycle = Vec::new();
        let (mut put_back, mut second) = (0, 0);
        for c in &candidates {
            let s = maps.slot(c.slot);
            if s.outstanding_count == 0 && s.total_count == c.total_count {
                recycle.push(c.slot);
            } else if let Some(trace) = c.removed {
                // Allocated from while we looked: keep it. If the stack got a
                // new slot meanwhile, this one stays a second slot of it.
                if maps.republish(c.stack_id, trace) {
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
        for &slot in &recycle {
            self.quiet.remove(&slot);
            maps.recycle(slot)?;
        }
        Ok(recycle.len())
    }

    /// The slots empty now and at the last scan, unchanged since, of stacks
    /// with no slot that holds memory; remembers which are empty now.
    fn candidates(&mut self, maps: &impl SlotMaps) -> Vec<Candidate> {
        let mut quiet = HashMap::new();
        let mut busy: HashSet<u64> = HashSet::new();
        let mut candidates = Vec::new();
        for slot in 1..maps.slots() {
            let s = maps.slot(slot);
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
        candidates
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// What a program does during the grace period: count in slots, publish
    /// stacks.
    type Meanwhile = Box<dyn FnMut(&mut Vec<StackStats>, &mut HashMap<u64, StackTrace>)>;

    /// Slots and stack entries in memory; `during_grace` runs inside the
    /// grace period, as a program would between unpublishing and recycling.
    #[derive(Default)]
    struct FakeSlots {
        slots: Vec<StackStats>,
        stacks: HashMap<u64, StackTrace>,
        recycled: Vec<usize>,
        no_grace: bool,
        during_grace: Option<Meanwhile>,
    }

    impl SlotMaps for FakeSlots {
        fn slots(&self) -> usize {
            self.slots.len()
        }
        fn slot(&self, slot: usize) -> StackStats {
            self.slots[slot]
        }
        fn unpublish(&mut self, stack_id: u64, slot: usize) -> Option<StackTrace> {
            let trace = *self.stacks.get(&stack_id)?;
            (trace.slot == slot as u64).then(|| self.stacks.remove(&stack_id).unwrap())
        }
        fn republish(&mut self, stack_id: u64, trace: StackTrace) -> bool {
            if self.stacks.contains_key(&stack_id) {
                return false;
            }
            self.stacks.insert(stack_id, trace);
            true
        }
        fn grace_period(&mut self) -> io::Result<()> {
            if self.no_grace {
                return Err(io::Error::other("no membarrier"));
            }
            if let Some(during) = &mut self.during_grace {
                during(&mut self.slots, &mut self.stacks);
            }
            Ok(())
        }
        fn recycle(&mut self, slot: usize) -> Result<()> {
            self.slots[slot] = StackStats::default();
            self.recycled.push(slot);
            Ok(())
        }
    }

    /// Slot `slot` of stack `stack` with `outstanding` blocks of `total`.
    fn used(fake: &mut FakeSlots, slot: usize, stack: u64, outstanding: u64, total: u64) {
        fake.slots[slot] = StackStats {
            stack_id: stack,
            tgid: 1,
            outstanding_count: outstanding,
            outstanding_bytes: outstanding * 8,
            total_count: total,
            total_bytes: total * 8,
            ..StackStats::default()
        };
        let trace = StackTrace {
            slot: slot as u64,
            ..StackTrace::default()
        };
        fake.stacks.insert(stack, trace);
    }

    fn fake(slots: usize) -> FakeSlots {
        FakeSlots {
            slots: vec![StackStats::default(); slots],
            ..FakeSlots::default()
        }
    }

    const STACK_A: u64 = 1 << 40;
    const STACK_B: u64 = 2 << 40;

    #[test]
    fn a_slot_empty_for_two_scans_is_recycled_and_a_busy_one_kept() {
        let mut maps = fake(4);
        used(&mut maps, 1, STACK_A, 0, 5);
        used(&mut maps, 2, STACK_B, 3, 9);
        let mut reclaimer = Reclaimer::default();
        assert_eq!(
            reclaimer.scan(&mut maps).unwrap(),
            0,
            "empty once is not enough"
        );
        assert_eq!(reclaimer.scan(&mut maps).unwrap(), 1);
        assert_eq!(maps.recycled, vec![1]);
        assert_eq!((maps.slots[1].stack_id, maps.slots[1].total_count), (0, 0));
        assert!(!maps.stacks.contains_key(&STACK_A));
        assert!(maps.stacks.contains_key(&STACK_B));
    }

    #[test]
    fn a_slot_that_saw_an_allocation_between_scans_is_kept() {
        let mut maps = fake(3);
        used(&mut maps, 1, STACK_A, 0, 5);
        let mut reclaimer = Reclaimer::default();
        reclaimer.scan(&mut maps).unwrap();
        // Allocated and freed again: empty, but its totals moved.
        used(&mut maps, 1, STACK_A, 0, 6);
        assert_eq!(reclaimer.scan(&mut maps).unwrap(), 0);
        assert_eq!(reclaimer.scan(&mut maps).unwrap(), 1);
    }

    #[test]
    fn a_slot_used_during_the_grace_period_is_put_back() {
        let mut maps = fake(3);
        used(&mut maps, 1, STACK_A, 0, 5);
        let mut reclaimer = Reclaimer::default();
        reclaimer.scan(&mut maps).unwrap();
        // A program that read the slot before it was unpublished counts a
        // block in it.
        maps.during_grace = Some(Box::new(|slots, _| {
            slots[1].outstanding_count += 1;
            slots[1].total_count += 1;
        }));
        assert_eq!(reclaimer.scan(&mut maps).unwrap(), 0);
        assert!(maps.recycled.is_empty());
        assert_eq!(maps.stacks[&STACK_A].slot, 1, "published again");
        assert_eq!(maps.slots[1].outstanding_count, 1);
    }

    #[test]
    fn a_stack_that_took_a_new_slot_meanwhile_keeps_the_old_one_as_second() {
        let mut maps = fake(4);
        used(&mut maps, 1, STACK_A, 0, 5);
        let mut reclaimer = Reclaimer::default();
        reclaimer.scan(&mut maps).unwrap();
        // Meanwhile the stack found no entry and claimed slot 2, while a
        // late program still counted in slot 1.
        maps.during_grace = Some(Box::new(|slots, stacks| {
            slots[1].outstanding_count += 1;
            slots[1].total_count += 1;
            slots[2].stack_id = STACK_A;
            slots[2].outstanding_count = 1;
            slots[2].total_count = 1;
            let trace = StackTrace {
                slot: 2,
                ..StackTrace::default()
            };
            stacks.insert(STACK_A, trace);
        }));
        assert_eq!(reclaimer.scan(&mut maps).unwrap(), 0);
        assert_eq!(
            maps.stacks[&STACK_A].slot, 2,
            "the new slot stays published"
        );
        assert_eq!(
            maps.slots[1].stack_id, STACK_A,
            "the old one is not recycled"
        );
        assert!(maps.recycled.is_empty());
    }

    #[test]
    fn a_stack_with_another_slot_holding_memory_keeps_its_frames() {
        let mut maps = fake(4);
        used(&mut maps, 1, STACK_A, 0, 5);
        used(&mut maps, 2, STACK_A, 2, 2);
        let mut reclaimer = Reclaimer::default();
        reclaimer.scan(&mut maps).unwrap();
        assert_eq!(reclaimer.scan(&mut maps).unwrap(), 0);
        assert!(maps.stacks.contains_key(&STACK_A));
    }

    #[test]
    fn unknown_stack_slots_are_never_reclaimed() {
        let mut maps = fake(3);
        maps.slots[2].stack_id = tracer_common::unknown_stack(42);
        let mut reclaimer = Reclaimer::default();
        reclaimer.scan(&mut maps).unwrap();
        assert_eq!(reclaimer.scan(&mut maps).unwrap(), 0);
        assert_eq!(maps.slots[2].stack_id, tracer_common::unknown_stack(42));
    }

    #[test]
    fn without_a_grace_period_everything_is_put_back_and_reclamation_stops() {
        let mut maps = fake(3);
        used(&mut maps, 1, STACK_A, 0, 5);
        maps.no_grace = true;
        let mut reclaimer = Reclaimer::default();
        reclaimer.scan(&mut maps).unwrap();
        assert_eq!(reclaimer.scan(&mut maps).unwrap(), 0);
        assert_eq!(maps.stacks[&STACK_A].slot, 1);
        assert!(reclaimer.disabled);
        assert!(maps.recycled.is_empty());
    }
}
