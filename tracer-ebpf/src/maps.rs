//! All maps of the tracer. Userspace may resize the large ones at load time
//! (`EbpfLoader::set_max_entries`); the sizes here are the defaults.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, Queue},
};
use tracer_common::{
    AllocKey, AllocRecord, InFlight, StackStats, StackTrace, TargetInfo, COUNTER_SLOTS,
};

/// Process ids (tgids) being traced. The uprobes are attached per process
/// already; this filter keeps a shared library's probe from counting a
/// process that happens to share the attachment.
#[map]
pub static TARGETS: HashMap<u32, TargetInfo> = HashMap::with_max_entries(1024, 0);

/// Allocator calls between entry and return, per thread (pid_tgid), of
/// threads whose `calls::CALL_SLOTS` slot is taken. Small: entries live
/// only for the duration of one call.
#[map]
pub static IN_FLIGHT: HashMap<u64, InFlight> = HashMap::with_max_entries(16384, 0);

/// Call records (`calls`) that hold an old block's record (a realloc's),
/// over all threads, counted under `--sample-rate` only: while none does, a
/// free of a block not in `ALLOCS` (an unsampled one) needs no call-record
/// lookup. Records that userspace removes (dead threads) are not
/// subtracted: the count errs high, which only costs that lookup.
#[map]
pub static OLD_BLOCKS_HELD: Array<u64> = Array::with_max_entries(1, 0);

/// Sampling only (`--sample-rate`): a counting filter in front of
/// `ALLOCS`, by a hash of the key. A slot is raised before a record is
/// inserted and lowered only after one is removed by a program, so it is
/// never 0 while `ALLOCS` holds a record of its keys: a free whose slot is
/// 0 is of an unsampled block, known without the lookup in `ALLOCS` (a
/// large hash table whose buckets are cache misses). Records that userspace
/// removes (ended processes) leave their slots raised: the filter errs
/// high, which only costs that lookup. Unused in exact mode, where almost
/// every free finds its record.
#[map]
pub static SAMPLED_FILTER: Array<u32> = Array::with_max_entries(SAMPLED_FILTER_SLOTS, 0);

/// Slots of `SAMPLED_FILTER` (a power of two): 256 KiB, against the
/// few thousand blocks sampled at once in a heap of gigabytes.
const SAMPLED_FILTER_SLOTS: u32 = 1 << 16;

#[inline(always)]
fn filter_slot(key: &AllocKey) -> Option<*mut u32> {
    let h = (key.addr ^ ((key.tgid as u64) << 40)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    SAMPLED_FILTER.get_ptr_mut((h >> 48) as u32 & (SAMPLED_FILTER_SLOTS - 1))
}

/// Raises (before an insert into `ALLOCS`) or lowers (after a removal)
/// the filter slot of `key` when sampling.
#[inline(always)]
pub fn filter_add(key: &AllocKey, delta: u32) {
    if crate::sample::rate() == 0 {
        return;
    }
    if let Some(n) = filter_slot(key) {
        unsafe {
            core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(
                n, delta,
            )
        };
    }
}

/// Whether `ALLOCS` may hold a record of `key` (always true in exact mode).
#[inline(always)]
pub fn filter_maybe(key: &AllocKey) -> bool {
    if crate::sample::rate() == 0 {
        return true;
    }
    match filter_slot(key) {
        Some(n) => (unsafe { core::ptr::read_volatile(n) }) != 0,
        None => true,
    }
}

/// Every live allocation by process and address. Preallocated so that inserts on the hot
/// path never allocate kernel memory.
#[map]
pub static ALLOCS: HashMap<AllocKey, AllocRecord> = HashMap::with_max_entries(1 << 20, 0);

/// Outstanding bytes/blocks and totals per stack, by slot (see
/// `tracer_common::StackStats`): slot 0 is the unknown stack, slots
/// 1..=max_stacks are handed out through `FREE_SLOTS`. Memory-mappable so
/// that userspace reads every slot without a system call per entry.
#[map]
pub static STACK_STATS: Array<StackStats> = Array::with_max_entries(65537, BPF_F_MMAPABLE);

/// Slots of `STACK_STATS` not in use. Userspace fills it at load and gives
/// reclaimed slots back.
#[map]
pub static FREE_SLOTS: Queue<u32> = Queue::with_max_entries(65536, 0);

/// Stack id (a 64-bit hash of the frames) -> frames and slot. Not
/// preallocated: each entry is ~1 KiB and most runs see far fewer stacks
/// than the maximum.
#[map]
pub static STACKS: HashMap<u64, StackTrace> = HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// Scratch slots per CPU for capturing stacks (`Scratch`), each with the
/// CFI walk's state of the same index (`unwind::UNWIND_SCRATCH`).
pub const SCRATCH_SLOTS: u32 = 4;

/// Scratch space for capturing one stack (too large for the 512-byte BPF
/// stack), and how many programs count themselves in it.
///
/// Per-CPU is not quite per-program: uprobe programs run with migration
/// disabled but under `rcu_read_lock()`, which on PREEMPT_RCU kernels leaves
/// preemption on. With full or lazy preemption (`preempt=full`, PREEMPT_RT,
/// 7.x's default) a program can be preempted mid-capture and another
/// thread's program can run on the same CPU. So each CPU has
/// `SCRATCH_SLOTS` of them, and `stack::tracer_claim_scratch` claims one for
/// the program alone: add 1 to `busy`, then read it back; 1 means no other
/// program holds it (one that added before us and still holds it would show
/// as 2; one that adds after us reads 2 and goes to the next slot). A
/// non-fetching add and a load (5.10 has no fetching atomics): a preemption
/// between them can only make both programs give the slot up. A stack is
/// lost (`StackLost`) only when every slot of the CPU is held by preempted
/// programs at once.
#[repr(C)]
pub struct Scratch {
    pub busy: u64,
    pub trace: StackTrace,
}

#[map]
pub static STACK_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(SCRATCH_SLOTS, 0);

/// Event and drop counters, indexed by `tracer_common::Counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[inline(always)]
pub fn count(counter: tracer_common::Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot, but uprobe programs may be preempted by another
        // task's on the same CPU (PREEMPT_RCU kernels): add atomically.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, 1,
            )
        };
    }
}

/// Adds `delta` (wrapped: negative) to `OLD_BLOCKS_HELD` when sampling.
#[inline(always)]
pub fn old_blocks_held_add(delta: u64) {
    if crate::sample::rate() == 0 {
        return;
    }
    if let Some(n) = OLD_BLOCKS_HELD.get_ptr_mut(0) {
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                n, delta,
            )
        };
    }
}

/// Whether some call record may hold an old block's record (always true in
/// exact mode, where the count is not kept).
#[inline(always)]
pub fn old_blocks_held() -> bool {
    if crate::sample::rate() == 0 {
        return true;
    }
    match OLD_BLOCKS_HELD.get_ptr(0) {
        Some(n) => (unsafe { core::ptr::read_volatile(n) }) != 0,
        None => true,
    }
}

#[inline(always)]
pub fn is_target(tgid: u32) -> bool {
    TARGETS.get_ptr(tgid).is_some()
}

// --- mmap family (see mmap.rs) ---

/// mmap/munmap/mremap calls between their entry and exit, per thread.
#[map]
pub static MMAP_IN_FLIGHT: HashMap<u64, tracer_common::MmapCall> =
    HashMap::with_max_entries(16384, 0);

/// Changes to the traced processes' mappings, for userspace to apply in
/// order. Resized by userspace.
#[map]
pub static MMAP_EVENTS: aya_ebpf::maps::RingBuf =
    aya_ebpf::maps::RingBuf::with_byte_size(4 << 20, 0);

/// Stacks of mmap and mremap calls (kept apart from the allocator's).
#[map]
pub static MMAP_STACKS: HashMap<u64, StackTrace> =
    HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// Program break (brk) last returned, per traced process.
#[map]
pub static BRK: HashMap<u32, u64> = HashMap::with_max_entries(1024, 0);

/// Lost events and stacks, by `tracer_common::MMAP_*` slot.
#[map]
pub static MMAP_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(tracer_common::MMAP_COUNTER_SLOTS, 0);

/// Forks and execs of traced processes (see proc.rs).
#[map]
pub static PROC_EVENTS: aya_ebpf::maps::RingBuf =
    aya_ebpf::maps::RingBuf::with_byte_size(256 << 10, 0);
