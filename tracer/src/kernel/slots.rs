//! The per-stack aggregates (`STACK_STATS`, an array of slots that the
//! programs update with atomic adds) and the reclamation of slots whose
//! stacks hold nothing, so that a long run over many distinct short-lived
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
    os::fd::{AsFd, AsRawFd},
    ptr,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData, Queue},
    Ebpf,
};
use tracer_common::{AllocRecord, StackStats, StackTrace, SLOT_UNKNOWN};

/// Map update flag: only if the key does not exist yet.
const BPF_NOEXIST: u64 = 1;

/// `STACK_STATS`, mapped into our memory (the map is `BPF_F_MMAPABLE`).
pub struct StatsTable {
    base: *mut StackStats,
    slots: usize,
    len: usize,
}

impl StatsTable {
    pub fn open(ebpf: &Ebpf) -> Result<Self> {
        let Some(Map::Array(data)) = ebpf.map("STACK_STATS") else {
            return Err(anyhow!("eBPF object has no array STACK_STATS"));
        };
        let slots = data.info()?.max_entries() as usize;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (slots * size_of::<StackStats>()).next_multiple_of(page);
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).context("mapping STACK_STATS");
        }
        Ok(StatsTable {
            base: base.cast(),
            slots,
            len,
        })
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// One slot. The programs change the counters concurrently; each field
    /// is read once, atomically (aligned u64).
    pub fn get(&self, slot: usize) -> StackStats {
        assert!(slot < self.slots);
        unsafe {
            let s = self.base.add(slot);
            StackStats {
                stack_id: ptr::read_volatile(&raw const (*s).stack_id),
                tgid: ptr::read_volatile(&raw const (*s).tgid),
                _pad: 0,
                outstanding_bytes: ptr::read_volatile(&raw const (*s).outstanding_bytes),
                outstanding_count: ptr::read_volatile(&raw const (*s).outstanding_count),
                total_count: ptr::read_volatile(&raw const (*s).total_count),
                total_bytes: ptr::read_volatile(&raw const (*s).total_bytes),
            }
        }
    }

    /// Takes a freed block out of its slot, as the programs' `retire` does
    /// (`sample_rate`: what a sampled block stood for).
    pub fn retire(&self, record: &AllocRecord, sample_rate: Option<u64>) {
        let slot = record.slot as usize;
        if slot >= self.slots {
            return;
        }
        let (bytes, blocks) = crate::sampling::kernel_weights(
            record.size,
            record.timestamp_ns,
            sample_rate.unwrap_or(0),
        );
        // Same atomic add the programs use on the same memory.
        unsafe {
            let s = self.base.add(slot);
            AtomicU64::from_ptr(&raw mut (*s).outstanding_bytes).fetch_sub(bytes, Relaxed);
            AtomicU64::from_ptr(&raw mut (*s).outstanding_count).fetch_sub(blocks, Relaxed);
        }
    }

    /// Makes `slot` the unknown stack of process `tgid` (a reserved slot,
    /// never handed out by the queue), keeping what it counted so far.
    pub fn claim_unknown(&self, slot: usize, tgid: u32) {
        assert!(slot < self.slots && slot != SLOT_UNKNOWN as usize);
        unsafe {
            let s = self.base.add(slot);
            ptr::write_volatile(&raw mut (*s).tgid, tgid);
            ptr::write_volatile(&raw mut (*s).stack_id, tracer_common::unknown_stack(tgid));
        }
    }

    /// Zeroes a slot nobody can reach any more, before it is handed out again.
    fn clear(&self, slot: usize) {
        assert!(slot < self.slots && slot != SLOT_UNKNOWN as usize);
        unsafe { ptr::write_volatile(self.base.add(slot), StackStats::default()) };
    }
}

impl Drop for StatsTable {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Slots past the stacks' (`1..=stacks`) reserved for the unknown stacks of
/// traced processes, one each, while they last.
pub const UNKNOWN_SLOTS: u32 = 1024;

/// Puts slots 1..=`stacks` in the free queue (at load).
pub fn fill_free_slots(ebpf: &mut Ebpf, stacks: u32) -> Result<()> {
    let mut queue: Queue<&mut MapData, u32> =
        Queue::try_from(ebpf.map_mut("FREE_SLOTS").context("FREE_SLOTS map")?)?;
    for slot in 1..=stacks {
        queue.push(slot, 0).context("filling FREE_SLOTS")?;
    }
    Ok(())
}

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
    pub fn run(&mut self, ebpf: &mut Ebpf) -> Result<usize> {
        if self.disabled {
            return Ok(0);
        }
        let table = StatsTable::open(ebpf)?;
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

        let mut stacks: BpfHashMap<&mut MapData, u64, StackTrace> =
            BpfHashMap::try_from(ebpf.map_mut("STACKS").context("STACKS map")?)?;
        for c in &mut candidates {
            // Unpublish the slot (an orphan slot has no entry of its own).
            if let Ok(trace) = stacks.get(&c.stack_id, 0) {
                if trace.slot == c.slot as u64 && stacks.remove(&c.stack_id).is_ok() {
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
                    let _ = stacks.insert(c.stack_id, trace, BPF_NOEXIST);
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
                match stacks.insert(c.stack_id, trace, BPF_NOEXIST) {
                    Ok(()) => put_back += 1,
                    Err(_) => second += 1,
                }
            }
        }
        log::debug!(
            "reclaim: {} candidates, {} recycled, {put_back} used meanwhile and put back, \
             {second} used meanwhile and kept as a second slot",
            candidates.len(),
            recycle.len()
        );
        let mut queue: Queue<&mut MapData, u32> =
            Queue::try_from(ebpf.map_mut("FREE_SLOTS").context("FREE_SLOTS map")?)?;
        for &slot in &recycle {
            table.clear(slot);
            self.quiet.remove(&slot);
            queue.push(slot as u32, 0).context("returning a slot")?;
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
