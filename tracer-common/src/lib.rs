//! Types shared by the eBPF programs and the userspace loader.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel side writes it into
//! BPF maps and userspace reads the same bytes back. The `user` feature adds
//! `aya::Pod` impls so userspace can use the types as map keys and values.
#![no_std]

pub mod unwind;

/// Deepest user stack the programs record. The kernel caps user stacks at
/// `perf_event_max_stack` (127 by default); deeper stacks are cut there and
/// marked truncated.
pub const MAX_FRAMES: usize = 127;

/// Stack id used when a stack could not be captured or stored (stack map
/// full, unreadable user memory). Allocations under it are still counted so
/// totals stay exact; reports show it as an "unknown stack" entry.
pub const STACK_UNKNOWN: u64 = 0;

/// `STACK_STATS` slot of the unknown stack. It is never handed out or
/// reclaimed; slots 1..=max_stacks belong to real stacks while in use.
pub const SLOT_UNKNOWN: u32 = 0;

/// Stack ids below this are not hashes: the id `tgid` is the unknown stack
/// of process `tgid` (see `unknown_stack`), 0 that of no known process.
/// Hashes are moved above it (`hash_frames`).
pub const UNKNOWN_STACK_IDS: u64 = 1 << 32;

/// The id under which a process's allocations without a stack are counted.
#[inline(always)]
pub fn unknown_stack(tgid: u32) -> u64 {
    tgid as u64
}

/// Whether a stack id stands for "stack not captured" rather than frames.
#[inline(always)]
pub fn is_unknown_stack(stack_id: u64) -> bool {
    stack_id < UNKNOWN_STACK_IDS
}

/// Key of `ALLOCS`: a live block of one process. Processes have their own
/// address spaces, so the same address may be live in several of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllocKey {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

impl AllocKey {
    #[inline(always)]
    pub fn new(tgid: u32, addr: u64) -> Self {
        AllocKey {
            tgid,
            _pad: 0,
            addr,
        }
    }
}

/// Which allocator entry point a call went through. Stored in the per-thread
/// in-flight record between the entry probe and the return probe.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// `malloc(size)`, `valloc(size)`, `memalign(align, size)` and friends:
    /// size known at entry, the new block is the return value.
    Alloc = 1,
    /// `realloc(ptr, size)` and `reallocarray(ptr, n, size)`: the old block is
    /// freed when the call returns a new block (or when size is 0).
    Realloc = 2,
    /// `posix_memalign(&ptr, align, size)`: returns 0 and writes the block
    /// through its first argument.
    PosixMemalign = 3,
}

/// State kept per thread between an allocator call's entry and its return.
///
/// Only the outermost allocator call of a thread is recorded: glibc's
/// `realloc(NULL, n)` calls `malloc`, `posix_memalign` may call `malloc` and
/// `realloc(p, 0)` calls `free`; those inner calls are part of the outer one
/// and must not be counted again. A call is inner when a record exists whose
/// stack pointer is at or above the new call's (the stack grows down).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InFlight {
    /// `CallKind` as u32.
    pub kind: u32,
    /// `IN_FLIGHT_*` bits.
    pub flags: u32,
    /// Stack pointer at the outer call's entry; its return fires at `sp + 8`.
    pub entry_sp: u64,
    /// Requested size in bytes.
    pub size: u64,
    /// Realloc: the block being resized. PosixMemalign: where the result goes.
    pub ptr_arg: u64,
    /// Realloc: non-zero when `old` holds the old block's record.
    pub has_old: u64,
    /// Realloc: the old block's record, taken out of `ALLOCS` at entry. The
    /// caller still owns the block then, so no other thread can be handed
    /// its address and record a new block there; at return, when another
    /// thread may already have got the address, the record is no longer in
    /// the map to be confused with the new one. The return retires it (the
    /// realloc freed the block) or puts it back (the realloc failed).
    pub old: AllocRecord,
}

/// A thread's slot in `CALL_SLOTS`: its call in flight, when `owner` is
/// the thread's pid_tgid (0: free). `busy` counts the holder and the claims
/// in progress: a claimer keeps the slot only if it reads 1 back after its
/// add. See `tracer-ebpf/src/calls.rs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CallSlot {
    pub busy: u64,
    pub owner: u64,
    pub call: InFlight,
}

/// Slots of `CALL_SLOTS` (a power of two): a thread's is its tid modulo
/// this. 8192 x 88 bytes: 704 KiB.
pub const CALL_SLOTS: u32 = 1 << 13;

/// What the programs know about a traced process (`TARGETS` value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetInfo {
    /// Address of the process's uretprobe trampoline (the start of its
    /// `[uprobes]` mapping), 0 while unknown. A call whose return is hooked
    /// has this address in its return-address slot, which tells a live
    /// outer allocator call from one that was left without returning.
    pub trampoline: u64,
    /// The first 8 bytes of code at `trampoline`, stored by the first program
    /// that uses it (0 until then); a mismatch (the process exec'ed since)
    /// makes the programs ignore the address.
    pub trampoline_code: u64,
    /// The `STACK_STATS` slot of this process's unknown stack, reserved by
    /// userspace; 0 (`SLOT_UNKNOWN`, shared) when none was left.
    pub unknown_slot: u32,
    pub _pad: u32,
}

/// One live allocation, keyed by its address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AllocRecord {
    pub size: u64,
    pub stack_id: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the block was allocated.
    pub timestamp_ns: u64,
    /// The `STACK_STATS` slot the block was counted in. The free subtracts
    /// there, without looking the stack up again, so a slot is never reused
    /// while a block counted in it is live (see `StackStats`).
    pub slot: u32,
    pub _pad: u32,
}

/// Per-stack aggregates, kept up to date in the kernel on every event, one
/// per slot of the `STACK_STATS` array. The counters are only ever changed
/// with atomic adds.
///
/// Why an array of slots and not a hash map keyed by stack id: stacks whose
/// blocks are all freed must be reclaimed, or a long run over many distinct
/// stacks fills the maps. A BPF program that looked up a hash map element
/// and is about to add to it may find the element deleted and, since the
/// kernel reuses freed hash elements at once, reused for another key: its
/// add would be lost or land on another stack. Array slots are never freed;
/// userspace alone recycles them, and only after an RCU grace period has
/// passed since the last way to reach them (the `STACKS` entry) was removed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StackStats {
    /// The stack this slot belongs to; 0 while the slot is free (and for
    /// `SLOT_UNKNOWN`). Written by the program that claims the slot, before
    /// it publishes the slot in `STACKS`.
    pub stack_id: u64,
    /// The process the stack belongs to (its id is per process too),
    /// written with `stack_id`.
    pub tgid: u32,
    pub _pad: u32,
    /// Bytes allocated from this stack and not yet freed.
    pub outstanding_bytes: u64,
    /// Blocks allocated from this stack and not yet freed.
    pub outstanding_count: u64,
    /// Blocks allocated from this stack since attach.
    pub total_count: u64,
    /// Bytes allocated from this stack since attach.
    pub total_bytes: u64,
}

/// A user stack: return addresses, innermost first.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackTrace {
    /// The `STACK_STATS` slot of this stack.
    pub slot: u64,
    /// Number of valid entries in `ips`.
    pub len: u64,
    /// Non-zero when the walk stopped at `MAX_FRAMES` rather than at the
    /// stack's outermost frame.
    pub truncated: u64,
    /// Non-zero when the walk reached the stack's outermost frame (a CFI
    /// row marking it, or the end of the frame-pointer chain): the stack is
    /// whole. Zero: cut short somewhere (no rule, unreadable memory).
    pub outermost: u64,
    pub ips: [u64; MAX_FRAMES],
}

impl Default for StackTrace {
    fn default() -> Self {
        StackTrace {
            slot: 0,
            len: 0,
            truncated: 0,
            outermost: 0,
            ips: [0; MAX_FRAMES],
        }
    }
}

/// Indices into the per-CPU `COUNTERS` array. Userspace sums across CPUs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Allocations recorded.
    Allocs = 0,
    /// Frees that matched a recorded allocation.
    Frees = 1,
    /// Frees of blocks the tracer never saw (allocated before attach, or
    /// dropped): ignored.
    UnknownFrees = 2,
    /// Allocations not tracked because the per-address map was full.
    AllocMapFull = 3,
    /// Allocations whose stack could not be captured or stored (no free
    /// slot: more distinct live stacks than `--max-stacks`); counted under
    /// `STACK_UNKNOWN`.
    StackLost = 4,
    /// Kept for the report schema; slots and stacks are now one resource, so
    /// a full stack table is counted as `StackLost`.
    StackStatsFull = 5,
    /// An allocation returned an address that was still recorded: the free of
    /// the old block was missed (e.g. freed through a path the tracer does not
    /// probe). The old record is retired so totals do not drift.
    MissedFrees = 6,
    /// Calls whose in-flight record could not be stored (too many threads
    /// inside the allocator at once).
    InFlightFull = 7,
    /// Allocations that failed (returned NULL); not recorded.
    FailedAllocs = 8,
    /// Allocations whose stack was walked to its outermost frame (`_start`,
    /// a thread's start): whole stacks. Against `Allocs`, the share of
    /// stacks that were not cut short.
    WholeStacks = 9,
    /// Frees (and reallocs, exec drops) whose block's stack slot held less
    /// than the block: not subtracted, so that no outstanding counter ever
    /// goes below zero. Non-zero means a count went wrong somewhere.
    UnmatchedFrees = 10,
    /// Frees lost because the kernel refused to remove the block's record
    /// (its hash map lock gave up: kernels with resilient spinlocks, 6.15+,
    /// give up on a deadlock or a long wait); the block stays counted.
    LostFrees = 11,
}

pub const COUNTER_SLOTS: u32 = 16;

/// Sampling (`--sample-rate`): equal-probability slices of the exponential
/// distribution; its quantile table has one more entry (both ends of each).
pub const SAMPLE_DRAW_SLOTS: u32 = 4096;
/// Sampling: steps per rate in the weight table (size / rate = i / STEPS).
pub const SAMPLE_WEIGHT_STEPS: u32 = 64;
/// Sampling: weight table slots, covering sizes up to 16 rates.
pub const SAMPLE_WEIGHT_SLOTS: u32 = 16 * SAMPLE_WEIGHT_STEPS + 1;

/// (bytes, blocks) that a sampled block of `size` bytes stands for, at
/// `rate` (0: exact mode, the block itself). `weight(i)` is slot i of the
/// weight table (`SAMPLE_WEIGHTS`); sizes past it weigh 1. The block count
/// is rounded up or down at random in proportion, keyed on `key` (the
/// block's timestamp), so that retiring the block subtracts what was added.
/// One definition for the programs (which count) and userspace (which
/// sometimes retires a block itself).
#[inline(always)]
pub fn sampled_weights(
    size: u64,
    key: u64,
    rate: u64,
    weight: impl Fn(u64) -> Option<u64>,
) -> (u64, u64) {
    if rate == 0 || size == 0 {
        return (size, 1);
    }
    let steps = SAMPLE_WEIGHT_STEPS as u64;
    let last = (SAMPLE_WEIGHT_SLOTS - 1) as u64;
    // Past the table (size >= 16 rates), p > 1 - 1e-7: weight 1.
    if size >= rate * last / steps {
        return (size, 1);
    }
    let scaled = size * steps;
    let i = scaled / rate;
    let frac = scaled - i * rate;
    if i >= last {
        return (size, 1);
    }
    let (Some(w0), Some(w1)) = (weight(i), weight(i + 1)) else {
        return (size, 1);
    };
    let bytes = w0 + w1.saturating_sub(w0) * frac / rate;
    let bytes = if bytes < size { size } else { bytes };
    // Blocks: bytes / size in 16.16 fixed point, rounded at random.
    let blocks_fp = (bytes << 16) / size;
    let coin = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48;
    let blocks = (blocks_fp >> 16) + ((coin < (blocks_fp & 0xffff)) as u64);
    (bytes, blocks)
}

/// `InFlight::flags`: the call's new block was not sampled; its return
/// only settles the old block (realloc) and records nothing.
pub const IN_FLIGHT_UNSAMPLED: u32 = 1;

/// What an `MmapEvent` says happened (see `tracer-ebpf/src/mmap.rs`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmapKind {
    /// An anonymous mapping (private or shared) was made at `addr`, `len`
    /// bytes. With MAP_FIXED it replaced whatever was there.
    Map = 1,
    /// A MAP_FIXED mapping that is not anonymous replaced whatever was at
    /// `addr`, `len` bytes: only a removal for the tracer.
    Replace = 2,
    /// `munmap(addr, len)` succeeded.
    Unmap = 3,
    /// `mremap(old_addr, old_len, len, flags)` succeeded and returned `addr`.
    Remap = 4,
}

/// One change to a traced process's mappings, sent to userspace through a
/// ring buffer: ranges are split and merged there (a hole punched in the
/// middle of a mapping cannot be found by key in a BPF hash map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MmapEvent {
    /// `MmapKind` as u32.
    pub kind: u32,
    pub tgid: u32,
    pub addr: u64,
    pub len: u64,
    /// Remap: the range given up (unless `flags` has MREMAP_DONTUNMAP or
    /// `old_len` is 0, which keep it).
    pub old_addr: u64,
    pub old_len: u64,
    /// mmap or mremap flags.
    pub flags: u64,
    /// Map and Remap: the caller's stack in `MMAP_STACKS`.
    pub stack_id: u64,
    /// When the syscall started: a removal applies only to ranges recorded
    /// before it, since a range unmapped here may be handed to another
    /// thread, whose event can reach userspace first.
    pub enter_ns: u64,
    /// When the syscall returned: the time a new range is recorded with.
    pub exit_ns: u64,
}

/// A mmap-family syscall between its entry and exit, per thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MmapCall {
    /// `MmapKind` of the syscall (Map for every mmap).
    pub kind: u32,
    /// mmap's protection (PROT_EXEC of a file: code, which the CFI unwinder
    /// needs a table for).
    pub prot: u32,
    pub addr: u64,
    pub len: u64,
    /// mremap's new length.
    pub new_len: u64,
    pub flags: u64,
    pub enter_ns: u64,
}

/// Slots of `MMAP_COUNTERS`.
pub const MMAP_EVENTS_LOST: u32 = 0;
pub const MMAP_STACKS_LOST: u32 = 1;
pub const MMAP_COUNTER_SLOTS: u32 = 4;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for MmapEvent {}
    unsafe impl aya::Pod for MmapCall {}
    use super::*;
    unsafe impl aya::Pod for InFlight {}
    unsafe impl aya::Pod for CallSlot {}
    unsafe impl aya::Pod for AllocRecord {}
    unsafe impl aya::Pod for AllocKey {}
    unsafe impl aya::Pod for StackStats {}
    unsafe impl aya::Pod for StackTrace {}
    unsafe impl aya::Pod for TargetInfo {}
    unsafe impl aya::Pod for ProcEvent {}
}

/// What a `ProcEvent` says happened to a traced process.
pub const PROC_FORK: u32 = 1;
pub const PROC_EXEC: u32 = 2;

/// A traced process forked (`pid` is the new task: a process, or a thread
/// that userspace tells apart) or exec'ed; from the `sched` tracepoints,
/// for `--follow-forks` and exec on running processes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcEvent {
    pub kind: u32,
    /// The traced process (the parent, for a fork).
    pub tgid: u32,
    /// Fork: the new task's id. Exec: `tgid`.
    pub pid: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` at the event: an exec drops the blocks recorded
    /// before it, not those the new program made since.
    pub at_ns: u64,
}

/// Calling conventions of the allocation functions: which entry program
/// decodes a call's arguments (`tracer-ebpf/src/alloc.rs`). The uprobe
/// session program, attached to many functions at once, gets its
/// function's convention as the attach cookie.
pub mod convention {
    /// `malloc(size)` and alike (`mallocx`, `operator new`).
    pub const MALLOC: u64 = 0;
    pub const CALLOC: u64 = 1;
    pub const REALLOC: u64 = 2;
    pub const REALLOCARRAY: u64 = 3;
    /// `memalign(align, size)` and `aligned_alloc(align, size)`.
    pub const MEMALIGN: u64 = 4;
    pub const POSIX_MEMALIGN: u64 = 5;
    pub const VALLOC: u64 = 6;
    pub const PVALLOC: u64 = 7;
    /// `free(ptr)` and alike; only in a moved probe's cookie (`moved_enter`).
    pub const FREE: u64 = 8;

    /// A probe moved past the first instructions of its function may find
    /// an argument in another register (mimalloc's `malloc` copies the size
    /// from `rdi` to `rsi`, then overwrites `rdi`). The cookie then carries,
    /// above the convention's byte, one byte per argument (the first at
    /// bits 8..16): 0 for the argument's own register, otherwise 1 + the x86
    /// register number (rax 0, rcx 1, rdx 2, rbx 3, rsp 4, rbp 5, rsi 6,
    /// rdi 7, r8..r15 8..15).
    pub const ARGS_SHIFT: u64 = 8;
    /// The register number that stands for the constant 1: a factor whose
    /// product with the other is in that other's register (glibc's
    /// `reallocarray` multiplies before the probe's place).
    pub const CONSTANT_ONE: u64 = 16;
    /// How many arguments a cookie can relocate.
    pub const MAX_ARGS: usize = 3;

    /// Kernels without attach cookies (before 5.15): `MOVED_ARGS` holds a
    /// moved probe's cookie at the probe's page offset (its address's low
    /// 12 bits: the same in the file and in every process that maps it),
    /// with this bit set; userspace moves only probes whose page offsets
    /// differ.
    pub const KEYED: u64 = 1 << 63;
    /// Entries of `MOVED_ARGS`: one per page offset.
    pub const KEYED_SLOTS: u32 = 4096;

    /// The convention part of a cookie.
    pub const fn of(cookie: u64) -> u64 {
        cookie & 0xff
    }

    /// Where argument `n` is, from a cookie: None for its own register,
    /// otherwise the x86 register number.
    pub const fn register(cookie: u64, n: usize) -> Option<u64> {
        match (cookie >> (ARGS_SHIFT as usize + 8 * n)) & 0xff {
            0 => None,
            r => Some(r - 1),
        }
    }
}
