//! Typed handles on the programs' maps: the only place that names them
//! (the constants below) and one of the three files that use aya (with
//! `programs` and `sys`). What each map holds is documented in
//! tracer-ebpf/src/maps.rs.

use std::{
    borrow::{Borrow, BorrowMut},
    io,
    marker::PhantomData,
    os::fd::{AsFd as _, AsRawFd, BorrowedFd, RawFd},
    ptr,
    sync::atomic::{
        AtomicU64,
        Ordering::{AcqRel, Acquire, Relaxed},
    },
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, Queue, RingBuf},
    Pod,
};
use tracer_common::{
    unwind::{UnwindProc, UnwindRow},
    AllocKey, AllocRecord, CallSlot, InFlight, StackStats, StackTrace, TargetInfo, SLOT_UNKNOWN,
};

use super::{
    error::{KernelError, Result},
    programs::{map_fd, Loaded},
    sys::{self, BatchError, Cursor},
};

// The maps, by their names in tracer-ebpf.
pub const ALLOCS: &str = "ALLOCS";
pub const STACKS: &str = "STACKS";
pub const STACK_STATS: &str = "STACK_STATS";
pub const FREE_SLOTS: &str = "FREE_SLOTS";
pub const TARGETS: &str = "TARGETS";
pub const IN_FLIGHT: &str = "IN_FLIGHT";
pub const CALL_SLOTS: &str = "CALL_SLOTS";
pub const COUNTERS: &str = "COUNTERS";
pub const SAMPLE_DRAWS: &str = "SAMPLE_DRAWS";
pub const SAMPLE_WEIGHTS: &str = "SAMPLE_WEIGHTS";
pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
pub const UNWIND_PROCS: &str = "UNWIND_PROCS";
pub const UNWIND_EPOCH: &str = "UNWIND_EPOCH";
pub const UNWIND_EVENTS: &str = "UNWIND_EVENTS";
pub const MMAP_EVENTS: &str = "MMAP_EVENTS";
pub const MMAP_STACKS: &str = "MMAP_STACKS";
pub const MMAP_COUNTERS: &str = "MMAP_COUNTERS";
pub const BRK: &str = "BRK";
pub const PROC_EVENTS: &str = "PROC_EVENTS";
pub const MOVED_ARGS: &str = "MOVED_ARGS";

/// Map update flag: only if the key does not exist yet.
const BPF_NOEXIST: u64 = 1;

/// A hash map of the object, with its keys and values typed.
pub struct Hash<T, K, V> {
    name: &'static str,
    /// The map's descriptor, for the batch calls (aya 0.14 does not lend a
    /// typed map's); valid while `map` borrows the map.
    fd: RawFd,
    /// Read in batches (`Loaded::batch_reads`), else key by key.
    batch: bool,
    map: BpfHashMap<T, K, V>,
}

/// `ALLOCS` (every live block), to read or to change.
pub type Allocs<'a> = Hash<&'a MapData, AllocKey, AllocRecord>;
pub type AllocsMut<'a> = Hash<&'a mut MapData, AllocKey, AllocRecord>;
/// `STACKS` or `MMAP_STACKS` (the frames of each stack id).
pub type Stacks<'a> = Hash<&'a MapData, u64, StackTrace>;
pub type StacksMut<'a> = Hash<&'a mut MapData, u64, StackTrace>;

impl<'a, K: Pod, V: Pod> Hash<&'a MapData, K, V> {
    pub fn open(loaded: &'a Loaded, name: &'static str) -> Result<Self> {
        let batch = loaded.batch_reads;
        Self::typed(loaded.map(name)?, name, batch)
    }
}

impl<'a, K: Pod, V: Pod> Hash<&'a mut MapData, K, V> {
    pub fn open_mut(loaded: &'a mut Loaded, name: &'static str) -> Result<Self> {
        let batch = loaded.batch_reads;
        Self::typed(loaded.map_mut(name)?, name, batch)
    }
}

impl<T, K: Pod, V: Pod> Hash<T, K, V> {
    /// The object's map `name`, typed (borrowed or borrowed to change).
    fn typed<M: Borrow<Map>>(map: M, name: &'static str, batch: bool) -> Result<Self>
    where
        BpfHashMap<T, K, V>: TryFrom<M, Error = MapError>,
    {
        let fd = map_fd(map.borrow());
        let map = BpfHashMap::try_from(map).map_err(|e| KernelError::map(name, e))?;
        Ok(Hash {
            name,
            fd,
            batch,
            map,
        })
    }
}

impl<T: Borrow<MapData>, K: Pod, V: Pod> Hash<T, K, V> {
    /// The value under `key`, None if there is none.
    pub fn get(&self, key: &K) -> Result<Option<V>> {
        match self.map.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(KernelError::map(self.name, e)),
        }
    }

    /// Every key now (entries come and go meanwhile; errors skipped).
    pub fn keys(&self) -> Vec<K> {
        self.map.keys().filter_map(|k| k.ok()).collect()
    }

    fn fd(&self) -> BorrowedFd<'_> {
        // Safety: `map` borrows the map, which owns the descriptor.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }

    /// Calls `each` for every entry: in batches of thousands per syscall
    /// where the kernel can (`sys::for_each`), else key by key.
    pub fn for_each(&self, mut each: impl FnMut(&K, &V)) -> Result<()> {
        if self.batch {
            match sys::for_each::<K, V>(self.fd(), &mut each) {
                Ok(()) => return Ok(()),
                Err(BatchError::Unsupported(e)) => {
                    log::debug!(
                        "{}: batch lookup unsupported ({e}); reading key by key",
                        self.name
                    )
                }
                Err(BatchError::Failed(e)) => return Err(KernelError::map(self.name, e)),
            }
        }
        for entry in self.map.iter() {
            match entry {
                Ok((k, v)) => each(&k, &v),
                // An entry removed between listing and reading it.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(KernelError::map(self.name, e)),
            }
        }
        Ok(())
    }

    /// Reads about `limit` entries from `cursor` on (see `sys::Cursor`);
    /// true when the end of the map was reached. `Unsupported` without
    /// batch operations: read it whole with `for_each` instead.
    pub fn read_slice(
        &self,
        cursor: &mut Cursor,
        limit: usize,
        each: impl FnMut(&K, &V),
    ) -> std::result::Result<bool, BatchError> {
        if !self.batch {
            return Err(BatchError::Unsupported(io::ErrorKind::Unsupported.into()));
        }
        cursor.read(self.fd(), limit, each)
    }
}

impl<T: BorrowMut<MapData>, K: Pod, V: Pod> Hash<T, K, V> {
    pub fn insert(&mut self, key: K, value: V) -> Result<()> {
        self.map
            .insert(key, value, 0)
            .map_err(|e| KernelError::map(self.name, e))
    }

    /// Inserts unless `key` is there already; returns whether it did.
    pub fn insert_new(&mut self, key: K, value: V) -> bool {
        self.map.insert(key, value, BPF_NOEXIST).is_ok()
    }

    /// Removes `key`; returns whether this call removed it (the removal is
    /// what makes an entry ours when programs race for it).
    pub fn remove(&mut self, key: &K) -> bool {
        self.map.remove(key).is_ok()
    }
}

/// The frames of a stack in `STACKS` or `MMAP_STACKS`: return addresses,
/// innermost first, and whether the capture was cut at the depth limit.
pub fn stack_frames<T: Borrow<MapData>>(
    stacks: &Hash<T, u64, StackTrace>,
    stack_id: u64,
) -> Result<Option<(Vec<u64>, bool)>> {
    Ok(stacks.get(&stack_id)?.map(|trace| {
        let len = (trace.len as usize).min(trace.ips.len());
        (trace.ips[..len].to_vec(), trace.truncated != 0)
    }))
}

pub fn allocs(loaded: &Loaded) -> Result<Allocs<'_>> {
    Hash::open(loaded, ALLOCS)
}

pub fn allocs_mut(loaded: &mut Loaded) -> Result<AllocsMut<'_>> {
    Hash::open_mut(loaded, ALLOCS)
}

pub fn stacks(loaded: &Loaded) -> Result<Stacks<'_>> {
    Hash::open(loaded, STACKS)
}

pub fn stacks_mut(loaded: &mut Loaded) -> Result<StacksMut<'_>> {
    Hash::open_mut(loaded, STACKS)
}

pub fn mmap_stacks(loaded: &Loaded) -> Result<Stacks<'_>> {
    Hash::open(loaded, MMAP_STACKS)
}

pub fn targets_mut(loaded: &mut Loaded) -> Result<Hash<&mut MapData, u32, TargetInfo>> {
    Hash::open_mut(loaded, TARGETS)
}

pub fn in_flight_mut(loaded: &mut Loaded) -> Result<Hash<&mut MapData, u64, InFlight>> {
    Hash::open_mut(loaded, IN_FLIGHT)
}

/// The program break of each traced process, as the brk tracepoint saw it.
pub fn brk(loaded: &Loaded) -> Result<Hash<&MapData, u32, u64>> {
    Hash::open(loaded, BRK)
}

/// Sums over CPUs of the per-CPU counters `indices` of array `name`
/// (`COUNTERS` or `MMAP_COUNTERS`).
pub fn counter_sums(loaded: &Loaded, name: &'static str, indices: &[u32]) -> Result<Vec<u64>> {
    let array: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(loaded.map(name)?).map_err(|e| KernelError::map(name, e))?;
    indices
        .iter()
        .map(|i| {
            array
                .get(i, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .map_err(|e| KernelError::map(name, e))
        })
        .collect()
}

/// Writes `values` into the array map `name` from index 0 (the sampling
/// tables).
pub fn fill_array(loaded: &mut Loaded, name: &'static str, values: &[u64]) -> Result<()> {
    let mut array: Array<&mut MapData, u64> =
        Array::try_from(loaded.map_mut(name)?).map_err(|e| KernelError::map(name, e))?;
    for (i, value) in values.iter().enumerate() {
        array
            .set(i as u32, value, 0)
            .map_err(|e| KernelError::map(name, e))?;
    }
    Ok(())
}

/// Writes `value` at `index` of the array map `name`.
pub fn set_array(loaded: &mut Loaded, name: &'static str, index: u32, value: u64) -> Result<()> {
    let mut array: Array<&mut MapData, u64> =
        Array::try_from(loaded.map_mut(name)?).map_err(|e| KernelError::map(name, e))?;
    array
        .set(index, value, 0)
        .map_err(|e| KernelError::map(name, e))
}

/// `FREE_SLOTS`: the stack slots the programs may hand out.
pub struct FreeSlots<'a>(Queue<&'a mut MapData, u32>);

impl<'a> FreeSlots<'a> {
    pub fn open(loaded: &'a mut Loaded) -> Result<Self> {
        Queue::try_from(loaded.map_mut(FREE_SLOTS)?)
            .map(FreeSlots)
            .map_err(|e| KernelError::map(FREE_SLOTS, e))
    }

    pub fn push(&mut self, slot: u32) -> Result<()> {
        self.0
            .push(slot, 0)
            .map_err(|e| KernelError::map(FREE_SLOTS, e))
    }
}

/// A map of the object mapped into our memory (`BPF_F_MMAPABLE` arrays):
/// read and written without a syscall.
struct Mmapped<T> {
    base: *mut T,
    entries: usize,
    len: usize,
}

// Only `StatsTable` (atomic access) and `UnwindTables` (written by its
// single owner) use it.
unsafe impl<T> Send for Mmapped<T> {}

impl<T> Mmapped<T> {
    fn new(fd: RawFd, entries: usize, name: &'static str) -> Result<Self> {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (entries * size_of::<T>()).next_multiple_of(page);
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(KernelError::map(name, io::Error::last_os_error()));
        }
        Ok(Mmapped {
            base: base.cast(),
            entries,
            len,
        })
    }
}

impl<T> Drop for Mmapped<T> {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn array_data<'a>(map: &'a Map, name: &'static str) -> Result<&'a MapData> {
    match map {
        Map::Array(data) => Ok(data),
        _ => Err(KernelError::map(
            name,
            io::Error::new(io::ErrorKind::InvalidData, "not an array"),
        )),
    }
}

fn max_entries(data: &MapData, name: &'static str) -> Result<usize> {
    Ok(data
        .info()
        .map_err(|e| KernelError::map(name, e))?
        .max_entries() as usize)
}

/// `CALL_SLOTS`, each thread's allocator call in flight
/// (`tracer-ebpf/src/calls.rs`), mapped into our memory.
pub struct CallSlots(Mmapped<CallSlot>);

/// Thread `tid`'s slot is `tid & call_slot_mask()`. Tests make threads
/// share slots with `TRACER_TEST_CALL_SLOTS=N` (a power of two, at most
/// `CALL_SLOTS`): their calls then also take the hash map's path; with 0
/// (None here) every call does.
pub fn call_slot_mask() -> Option<u32> {
    static MASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *MASK.get_or_init(|| {
        let slots = std::env::var("TRACER_TEST_CALL_SLOTS")
            .ok()
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n == 0 || (n.is_power_of_two() && *n <= tracer_common::CALL_SLOTS))
            .unwrap_or(tracer_common::CALL_SLOTS);
        slots.checked_sub(1)
    })
}

impl CallSlots {
    pub fn open(loaded: &Loaded) -> Result<Self> {
        let data = array_data(loaded.map(CALL_SLOTS)?, CALL_SLOTS)?;
        let slots = max_entries(data, CALL_SLOTS)?;
        Mmapped::new(data.fd().as_fd().as_raw_fd(), slots, CALL_SLOTS).map(CallSlots)
    }

    /// The occupied slots of process `tgid`: (owner pid_tgid, its call).
    /// A call is read after its owner and kept only if the owner is still
    /// the same after it, so it is that owner's (a live thread may be
    /// writing a new call meanwhile: it is not dead, and left alone).
    pub fn of_process(&self, tgid: u32) -> Vec<(u64, InFlight)> {
        (0..self.0.entries)
            .filter_map(|i| unsafe {
                let s = self.0.base.add(i);
                let owner = AtomicU64::from_ptr(&raw mut (*s).owner);
                let before = owner.load(Acquire);
                if before == 0 || (before >> 32) as u32 != tgid {
                    return None;
                }
                let call = ptr::read_volatile(&raw const (*s).call);
                (owner.load(Acquire) == before).then_some((before, call))
            })
            .collect()
    }

    /// Settles the slot of dead thread `owner` if it still holds `call`;
    /// true when this did.
    ///
    /// `process_gone`: no thread of the process is left, and none can come
    /// back: the slot is freed as its owner's return would (the owner word,
    /// then the claim). Otherwise a new thread of the process may be given
    /// the dead one's tid, and so its pid_tgid, and free the slot itself
    /// (the programs free a slot by reading the owner word and then writing
    /// it, which 5.10 cannot make one compare-and-swap): a second release
    /// here would take the claim count below the holders and let two
    /// threads hold the slot. So the record is only emptied in place
    /// (stack pointer 0: such a new thread's next lookup drops it and frees
    /// the slot, `calls::get`), and the slot stays taken, its tids' calls
    /// going to the hash map, until the process ends. Only while the slot
    /// still names the dead thread: the bytes of a freed slot's last call
    /// stay behind. (A new thread given the tid in the microseconds between
    /// that check and the writes could still settle the old block too: a
    /// tid reused within one sweep.)
    pub fn settle(&self, owner: u64, call: &InFlight, process_gone: bool) -> bool {
        let Some(mask) = call_slot_mask() else {
            return false;
        };
        let i = (owner as u32 & mask) as usize;
        if i >= self.0.entries {
            return false;
        }
        unsafe {
            let s = self.0.base.add(i);
            let now = ptr::read_volatile(&raw const (*s).call);
            if !super::blocks::same_call(&now, call) {
                return false;
            }
            if !process_gone {
                if AtomicU64::from_ptr(&raw mut (*s).owner).load(Acquire) != owner {
                    return false;
                }
                ptr::write_volatile(&raw mut (*s).call.has_old, 0);
                ptr::write_volatile(&raw mut (*s).call.entry_sp, 0);
                return true;
            }
            if AtomicU64::from_ptr(&raw mut (*s).owner)
                .compare_exchange(owner, 0, AcqRel, Acquire)
                .is_err()
            {
                return false;
            }
            AtomicU64::from_ptr(&raw mut (*s).busy).fetch_sub(1, AcqRel);
            true
        }
    }
}

/// `STACK_STATS`, the per-stack aggregates the programs update with atomic
/// adds, mapped into our memory.
pub struct StatsTable(Mmapped<StackStats>);

impl StatsTable {
    pub fn open(loaded: &Loaded) -> Result<Self> {
        let data = array_data(loaded.map(STACK_STATS)?, STACK_STATS)?;
        let slots = max_entries(data, STACK_STATS)?;
        Mmapped::new(data.fd().as_fd().as_raw_fd(), slots, STACK_STATS).map(StatsTable)
    }

    pub fn slots(&self) -> usize {
        self.0.entries
    }

    /// One slot. The programs change the counters concurrently; each field
    /// is read once, atomically (aligned u64).
    pub fn get(&self, slot: usize) -> StackStats {
        assert!(slot < self.slots());
        unsafe {
            let s = self.0.base.add(slot);
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
    /// (`sample_rate`: what a sampled block stood for). A slot that holds
    /// less than the block is left alone: returns false (an unmatched free).
    pub fn retire(&self, record: &AllocRecord, sample_rate: Option<u64>) -> bool {
        let slot = record.slot as usize;
        if slot >= self.slots() {
            return false;
        }
        let (bytes, blocks) = crate::sampling::kernel_weights(
            record.size,
            record.timestamp_ns,
            sample_rate.unwrap_or(0),
        );
        // Atomic on the memory the programs add to atomically; each counter
        // only taken down if it holds the amount (the blocks first: a count
        // is what the reclaimer trusts).
        let (held_bytes, held_blocks) = unsafe {
            let s = self.0.base.add(slot);
            (
                AtomicU64::from_ptr(&raw mut (*s).outstanding_bytes),
                AtomicU64::from_ptr(&raw mut (*s).outstanding_count),
            )
        };
        if held_blocks
            .fetch_update(Relaxed, Relaxed, |held| held.checked_sub(blocks))
            .is_err()
        {
            return false;
        }
        // Never below zero, even when the bytes disagree with the count.
        let _ = held_bytes.fetch_update(Relaxed, Relaxed, |held| Some(held.saturating_sub(bytes)));
        true
    }

    /// Makes `slot` the unknown stack of process `tgid` (a reserved slot,
    /// never handed out by the queue), keeping what it counted so far.
    pub fn claim_unknown(&self, slot: usize, tgid: u32) {
        assert!(slot < self.slots() && slot != SLOT_UNKNOWN as usize);
        unsafe {
            let s = self.0.base.add(slot);
            ptr::write_volatile(&raw mut (*s).tgid, tgid);
            ptr::write_volatile(&raw mut (*s).stack_id, tracer_common::unknown_stack(tgid));
        }
    }

    /// Zeroes a slot nobody can reach any more, before it is handed out again.
    pub fn clear(&self, slot: usize) {
        assert!(slot < self.slots() && slot != SLOT_UNKNOWN as usize);
        unsafe { ptr::write_volatile(self.0.base.add(slot), StackStats::default()) };
    }
}

/// The CFI unwinder's maps, taken out of the object: `UNWIND_ROWS` mapped
/// into our memory (rows are appended with one memcpy) and the per-process
/// mapping tables (`UNWIND_PROCS`).
pub struct UnwindTables {
    rows: Mmapped<UnwindRow>,
    _rows_map: MapData,
    procs: aya::maps::HashMap<MapData, u32, UnwindProc>,
    /// `UNWIND_EPOCH`, and its value: bumped after every change of a
    /// mapping table.
    epoch_map: aya::maps::Array<MapData, u64>,
    epoch: u64,
    /// PIDs that mapped code; taken by whoever reacts to them.
    pub events: Option<EventRing<u64>>,
}

impl UnwindTables {
    pub fn take(loaded: &mut Loaded) -> Result<Self> {
        let Map::Array(rows_map) = loaded.take_map(UNWIND_ROWS)? else {
            return Err(KernelError::map(
                UNWIND_ROWS,
                io::Error::new(io::ErrorKind::InvalidData, "not an array"),
            ));
        };
        let capacity = max_entries(&rows_map, UNWIND_ROWS)?;
        let rows = Mmapped::new(rows_map.fd().as_fd().as_raw_fd(), capacity, UNWIND_ROWS)?;
        let procs = aya::maps::HashMap::try_from(loaded.take_map(UNWIND_PROCS)?)
            .map_err(|e| KernelError::map(UNWIND_PROCS, e))?;
        let events = EventRing::take(loaded, UNWIND_EVENTS)?;
        let epoch_map = aya::maps::Array::try_from(loaded.take_map(UNWIND_EPOCH)?)
            .map_err(|e| KernelError::map(UNWIND_EPOCH, e))?;
        Ok(UnwindTables {
            rows,
            _rows_map: rows_map,
            procs,
            epoch_map,
            epoch: 0,
            events: Some(events),
        })
    }

    /// Rows `UNWIND_ROWS` can hold.
    pub fn row_capacity(&self) -> u32 {
        self.rows.entries as u32
    }

    /// Writes `rows` from row `start` on (the caller keeps them in bounds).
    pub fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) {
        assert!(start as usize + rows.len() <= self.rows.entries);
        unsafe {
            ptr::copy_nonoverlapping(
                rows.as_ptr(),
                self.rows.base.add(start as usize),
                rows.len(),
            )
        };
    }

    /// Replaces process `pid`'s mapping table (one update: a walk sees the
    /// old table or the new one).
    pub fn set_process(&mut self, pid: u32, table: &UnwindProc) -> Result<()> {
        self.procs
            .insert(pid, table, 0)
            .map_err(|e| KernelError::map(UNWIND_PROCS, e))?;
        self.bump_epoch()
    }

    pub fn remove_process(&mut self, pid: u32) {
        if self.procs.remove(&pid).is_ok() {
            // On failure walks could keep the removed table's mappings for
            // a recycled PID: no way to go on exact.
            self.bump_epoch().expect("updating UNWIND_EPOCH");
        }
    }

    /// After a table changed (written first): walks forget the mappings
    /// they kept from before (tracer-ebpf/src/unwind.rs).
    fn bump_epoch(&mut self) -> Result<()> {
        self.epoch += 1;
        self.epoch_map
            .set(0, self.epoch, 0)
            .map_err(|e| KernelError::map(UNWIND_EPOCH, e))
    }
}

/// A ring buffer of records `T` taken out of the object (`MMAP_EVENTS`,
/// `PROC_EVENTS`); its descriptor can be polled.
pub struct EventRing<T> {
    ring: RingBuf<MapData>,
    _records: PhantomData<T>,
}

impl<T: Copy> EventRing<T> {
    pub fn take(loaded: &mut Loaded, name: &'static str) -> Result<Self> {
        let ring =
            RingBuf::try_from(loaded.take_map(name)?).map_err(|e| KernelError::map(name, e))?;
        Ok(EventRing {
            ring,
            _records: PhantomData,
        })
    }

    /// The next record, None when the buffer is empty. Short records (none
    /// are written) are skipped.
    pub fn next_record(&mut self) -> Option<T> {
        loop {
            let item = self.ring.next()?;
            if item.len() >= size_of::<T>() {
                // Safety: at least size_of::<T>() bytes, and T is plain data.
                return Some(unsafe { ptr::read_unaligned(item.as_ptr() as *const T) });
            }
        }
    }
}

impl<T> AsRawFd for EventRing<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
