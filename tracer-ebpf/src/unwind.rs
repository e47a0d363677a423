//! CFI stack walking (the default, `--unwind cfi`): unwinds the user stack
//! from the registers at the probe, frame by frame, with the compact rows
//! userspace compiled from each object's `.eh_frame`
//! (`tracer_common::unwind`). Where no row is known (no table for the
//! process or the address, a gap between FDEs) the frame-pointer rule is
//! used.
//!
//! Every `FRAMES_PER_CALL` frames are one call of `tracer_unwind_step`, a
//! *global* BPF function: the verifier checks its body once, on its own
//! (kernels 5.6+), instead of once per frame, and the loop calling it is a
//! plain bounded loop. No
//! `bpf_loop` (5.17+) and no callback (whose `ld_imm64` kernels before 5.13
//! refuse in every program of the object), so the same programs load on
//! 5.10 and on the newest kernels.

use aya_ebpf::{
    bindings::{pt_regs, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use core::ptr::{read_volatile, write_volatile};
use tracer_common::{
    unwind::{
        UnwindMapping, UnwindProc, UnwindRow, DEFAULT_UNWIND_ROWS, MAPPING_SEARCH_STEPS,
        MAX_UNWIND_MAPPINGS, ROW_CFA_RBP, ROW_CFA_RSP, ROW_GAP, ROW_OUTERMOST, ROW_PLT,
        ROW_SEARCH_STEPS, ROW_SIGNAL, SIGNAL_RBP, SIGNAL_RIP, SIGNAL_RSP,
    },
    StackTrace, MAX_FRAMES,
};

/// 0: frame pointers; 1: CFI. Set by userspace at load time (read-only
/// data, so the verifier drops the unused path).
#[unsafe(no_mangle)]
static UNWIND_MODE: u32 = 0;

/// Rows of every object, shared by all processes. Userspace writes them
/// through a shared mapping of the array.
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> =
    Array::with_max_entries(DEFAULT_UNWIND_ROWS, BPF_F_MMAPABLE);

/// Per traced process (tgid): its executable mappings. Not preallocated:
/// each value is 16 KiB and only traced processes have one.
#[map]
pub static UNWIND_PROCS: HashMap<u32, UnwindProc> =
    HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// PIDs (as u64) of traced processes that just mapped code from a file:
/// userspace adds the object to their table at once, rather than at its
/// next look.
/// [0]: bumped by userspace after every change of an `UNWIND_PROCS` table;
/// [1]: bumped here when a traced process exec'ed (`program_replaced`).
/// Both only grow, so their sum changes whenever either does.
#[map]
static UNWIND_EPOCH: Array<u64> = Array::with_max_entries(2, 0);

#[map]
pub static UNWIND_EVENTS: RingBuf = RingBuf::with_byte_size(64 << 10, 0);

/// A traced process mapped code (mmap's exit, tracer-ebpf/src/mmap.rs).
#[inline(always)]
pub fn code_mapped(tgid: u32) {
    if enabled() {
        // Lost when full: the housekeeping tick catches up.
        let _ = UNWIND_EVENTS.output::<u64>(&(tgid as u64), 0);
    }
}

/// Process `tgid` exec'ed (tracer-ebpf/src/proc.rs): its table describes
/// the old program's mappings, and the new program runs (and allocates,
/// probed through the same C library) before userspace has read its maps.
/// The table goes now, so those first stacks are walked by frame pointers
/// rather than with the old program's rows; walks that kept its mappings
/// drop them on the epoch.
#[inline(always)]
pub fn program_replaced(tgid: u32) {
    if !enabled() {
        return;
    }
    let _ = UNWIND_PROCS.remove(&tgid);
    if let Some(execs) = UNWIND_EPOCH.get_ptr_mut(1) {
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                execs, 1,
            )
        };
    }
}

/// The tables' epoch: changes whenever userspace changed a table or a
/// traced process exec'ed (see `UNWIND_EPOCH`).
#[inline(always)]
fn epoch() -> Option<u64> {
    let (tables, execs) = (UNWIND_EPOCH.get_ptr(0)?, UNWIND_EPOCH.get_ptr(1)?);
    Some(unsafe { core::ptr::read_volatile(tables).wrapping_add(core::ptr::read_volatile(execs)) })
}

const RUNNING: u32 = 0;
/// Reached the outermost frame (or a zero return address).
const COMPLETE: u32 = 1;
/// Stopped early: unreadable memory, an unsupported rule, no frame pointer.
const CUT: u32 = 2;

/// One walk's state: registers of the frame being unwound and the return
/// addresses so far.
#[repr(C)]
pub struct Walk {
    ip: u64,
    sp: u64,
    bp: u64,
    len: u64,
    status: u32,
    tgid: u32,
    /// `UNWIND_EPOCH` when `last` and `prev` were reset for `tgid`: they
    /// are kept from walk to walk while no table changes.
    epoch: u64,
    /// `ip` is where the frame was interrupted (a signal), not a return
    /// address: look it up as is, not at the call before it.
    exact: u32,
    _pad: u32,
    /// The mapping of the previous frame (callers are mostly in the same
    /// object): no search while frames stay in it. Empty when end = 0.
    last: UnwindMapping,
    /// The one before it (stacks go back and forth between a program and
    /// its C library): taken back without a search either.
    prev: UnwindMapping,
    ips: [u64; MAX_FRAMES],
    /// What the walk read, for `WALK_CACHE` (see `note`): the start's sp,
    /// the words (offsets from it, in words; values), the bytes from sp to
    /// the end of the highest one.
    sp0: u64,
    bp0: u64,
    top: u64,
    nreads: u32,
    /// Zero once the walk did something a cached copy cannot repeat (see
    /// `note`, `uncacheable`).
    cacheable: u32,
    /// `bp` is still the start's register (not yet reloaded from memory).
    bp_live: u32,
    /// The walk's result depended on the start's `bp`.
    bp_dep: u32,
    _pad2: u32,
    /// Where `bp` was read from, while that word is not noted: a saved rbp
    /// matters only if a later frame uses it as a base (code without frame
    /// pointers keeps data there, which changes from call to call).
    bp_addr: u64,
    bp_pending: u64,
    /// A hit's stack id and outermost flag (`tracer_walk_cached`).
    hit_hash: u64,
    hit_outermost: u64,
    offs: [u16; MAX_READS],
    vals: [u64; MAX_READS],
}

/// Entries of `UNWIND_HINTS` (a power of two).
const ROW_HINTS: u32 = 4096;

/// Row hints, shared by all CPUs and walks: for a hash of (object's first
/// row, pc), the index of the row found last time. Allocation call sites
/// repeat, so most frames skip the row search. Only a hint: checked against
/// the rows before use (`tracer_unwind_row`), so a stale or colliding entry,
/// or one another CPU just rewrote, costs a search, never a wrong row.
#[map]
static UNWIND_HINTS: Array<u32> = Array::with_max_entries(ROW_HINTS, 0);

/// Frames unwound per call of `tracer_unwind_step`: its two lookups (the
/// per-CPU walk, the process's table) are paid once for them.
const FRAMES_PER_CALL: usize = 4;

#[map]
static UNWIND_SCRATCH: PerCpuArray<Walk> =
    PerCpuArray::with_max_entries(crate::maps::SCRATCH_SLOTS, 0);

#[inline(always)]
fn enabled() -> bool {
    unsafe { core::ptr::read_volatile(&UNWIND_MODE) != 0 }
}

/// Walks the user stack of the current task from `regs` into `out.ips`.
/// Returns the number of frames (`out.outermost` says whether the walk
/// reached the outermost frame), or None when CFI unwinding is off or has
/// no table for this process (the caller then walks frame pointers).
/// `slot`: the scratch slot the caller claimed (`maps::Scratch`), whose
/// walk state is then the caller's alone.
#[inline(always)]
pub fn walk(regs: *const pt_regs, out: &mut StackTrace, slot: u32) -> Option<usize> {
    if !enabled() {
        return None;
    }
    let (ip, sp, bp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    walk_from::<0>(ip, sp, bp, out, slot)
}

/// Whether CFI unwinding is on (`--unwind cfi`, the default).
#[inline(always)]
pub fn cfi_mode() -> bool {
    enabled()
}

/// `walk` from these register values, leaving out the `SKIP` innermost
/// frames (a syscall's: libc's wrapper). None also when the walk found no
/// more than `SKIP` frames.
#[inline(always)]
pub fn walk_from<const SKIP: usize>(
    ip: u64,
    sp: u64,
    bp: u64,
    out: &mut StackTrace,
    slot: u32,
) -> Option<usize> {
    if !enabled() {
        return None;
    }
    if tracer_unwind_begin(ip, sp, bp, slot) != 0 {
        return None;
    }
    let w = unsafe { &mut *UNWIND_SCRATCH.get_ptr_mut(slot)? };
    for _ in 0..MAX_FRAMES.div_ceil(FRAMES_PER_CALL) {
        if tracer_unwind_step(slot) != 0 {
            break;
        }
    }
    let len = (w.len as usize).min(MAX_FRAMES);
    if len <= SKIP {
        return None;
    }
    let len = len - SKIP;
    for i in 0..MAX_FRAMES - SKIP {
        if i >= len {
            break;
        }
        out.ips[i] = w.ips[i + SKIP];
    }
    out.outermost = (w.status == COMPLETE) as u64;
    Some(len)
}

/// Starts a walk from these registers. Non-zero: no table for this process
/// (or no scratch). A global function, like `tracer_unwind_step`: verified
/// once, not in every program that walks.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tracer_unwind_begin(ip: u64, sp: u64, bp: u64, slot: u32) -> i64 {
    let Some(w) = UNWIND_SCRATCH.get_ptr_mut(slot) else {
        return 1;
    };
    let w = unsafe { &mut *w };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(epoch) = epoch() else {
        return 1;
    };
    // The same process and no table changed since its last walk here: it
    // has a table, and the kept mappings are still its. Otherwise (read
    // after the epoch: a table changing in between only resets the next
    // walk too) look it up and forget them.
    if w.tgid != tgid || w.epoch != epoch {
        if UNWIND_PROCS.get_ptr(tgid).is_none() {
            return 1;
        }
        w.tgid = tgid;
        w.epoch = epoch;
        w.last = UnwindMapping::default();
        w.prev = UnwindMapping::default();
    }
    w.ip = ip;
    w.sp = sp;
    w.bp = bp;
    w.len = 0;
    w.status = RUNNING;
    w.sp0 = sp;
    w.bp0 = bp;
    w.top = 0;
    w.nreads = 0;
    w.cacheable = 1;
    w.bp_live = 1;
    w.bp_dep = 0;
    w.bp_pending = 0;
    // At a return probe, rip is a return address; at a syscall, the
    // instruction after it: both look up the instruction before.
    w.exact = 0;
    0
}

/// The mapping holding `addr` in `table`, if it has one.
#[inline(always)]
fn find_mapping(table: &UnwindProc, addr: u64) -> Option<&UnwindMapping> {
    let count = table.count.min(MAX_UNWIND_MAPPINGS);
    let (mut lo, mut hi) = (0u32, count);
    for _ in 0..MAPPING_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = (lo + hi) / 2;
        let m = table.mappings.get(mid as usize)?;
        if m.start <= addr {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo == 0 {
        return None;
    }
    let m = table.mappings.get(lo as usize - 1)?;
    (addr < m.end).then_some(m)
}

/// The last row at or before `pc` among `count` rows from `start`, as the
/// bits of an `UnwindRow`; 0 (a `ROW_GAP` row) when there is none. A
/// global function: its searches are verified once, not once per frame of
/// `tracer_unwind_step`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tracer_unwind_row(start: u64, count: u64, pc: u64) -> i64 {
    match find_row(start as u32, count as u32, pc as u32) {
        Some(row) => unsafe { core::mem::transmute::<UnwindRow, u64>(row) as i64 },
        None => 0,
    }
}

/// The hinted row if it is the one, else a binary search (whose answer
/// becomes the hint).
#[inline(always)]
fn find_row(start: u32, count: u32, pc: u32) -> Option<UnwindRow> {
    let key = ((start as u64) << 32) | pc as u64;
    let entry = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 52) as u32 & (ROW_HINTS - 1);
    let hint = UNWIND_HINTS.get_ptr_mut(entry)?;
    // One load: a concurrent writer leaves some index, checked below.
    let i = unsafe { core::ptr::read_volatile(hint) };
    if i < count {
        if let Some(row) = UNWIND_ROWS.get(start.wrapping_add(i)) {
            let row = *row;
            // Rows are sorted by pc: row i is the answer iff it starts at or
            // before pc and the next one (if any) after it.
            if row.pc <= pc
                && (i + 1 >= count
                    || UNWIND_ROWS
                        .get(start.wrapping_add(i + 1))
                        .is_some_and(|next| next.pc > pc))
            {
                return Some(row);
            }
        }
    }
    let (mut lo, mut hi) = (0u32, count);
    for _ in 0..ROW_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = (lo + hi) / 2;
        let row = UNWIND_ROWS.get(start + mid)?;
        if row.pc <= pc {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo == 0 {
        return None;
    }
    unsafe { core::ptr::write_volatile(hint, lo - 1) };
    UNWIND_ROWS.get(start + lo - 1).copied()
}

#[inline(always)]
fn read_user(addr: u64) -> Option<u64> {
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

#[inline(always)]
fn read_user_pair(addr: u64) -> Option<[u64; 2]> {
    unsafe { bpf_probe_read_user(addr as *const [u64; 2]) }.ok()
}

/// Words below CFA `read_saved` reads at most.
const SAVED_WORDS: u32 = 8;

/// [caller's rbp, return address] when rbp was saved `words` words below
/// CFA (1..=SAVED_WORDS; the return address is the word just below CFA):
/// one read of those words.
#[inline(always)]
fn read_saved(cfa: u64, words: u32) -> Option<[u64; 2]> {
    let mut buf = core::mem::MaybeUninit::<[u64; SAVED_WORDS as usize]>::uninit();
    let p = buf.as_mut_ptr() as *mut u64;
    // Written word by word: a plain zeroed array compiles to a byte loop.
    for i in 0..SAVED_WORDS as usize {
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
    }
    let buf = unsafe { buf.assume_init_mut() };
    // Masked after a load the compiler cannot see through, so that the
    // verifier sees the size's bounds (it dropped a mask it could prove).
    let last =
        (unsafe { core::ptr::read_volatile(&words) }.wrapping_sub(1) & (SAVED_WORDS - 1)) as usize;
    let size = (last as u32 + 1) * 8;
    let ret = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            buf.as_mut_ptr() as *mut _,
            size,
            cfa.wrapping_sub(size as u64) as *const _,
        )
    };
    if ret != 0 {
        return None;
    }
    Some([buf[0], *buf.get(last)?])
}

/// The row for the walk's current frame: Some(None) when no CFI is known
/// there, None when the process has no table any more.
#[inline(always)]
fn row_for(w: &mut Walk, slot: u32) -> Option<Option<UnwindRow>> {
    // A return address: the call it returns from is just before it.
    let lookup = if w.exact != 0 {
        w.ip
    } else {
        w.ip.wrapping_sub(1)
    };
    // Volatile: `tracer_unwind_mapping` writes them through its own pointer,
    // which the compiler, seeing `w` as unique, would not reload.
    let (lastp, prevp) = (&raw mut w.last, &raw mut w.prev);
    let mut last = unsafe { core::ptr::read_volatile(lastp) };
    if !(last.start <= lookup && lookup < last.end) {
        let prev = unsafe { core::ptr::read_volatile(prevp) };
        if prev.start <= lookup && lookup < prev.end {
            unsafe {
                core::ptr::write_volatile(prevp, last);
                core::ptr::write_volatile(lastp, prev);
            }
            last = prev;
        } else {
            if tracer_unwind_mapping(lookup, slot) != 0 {
                return None;
            }
            last = unsafe { core::ptr::read_volatile(lastp) };
        }
    }
    let (start, count, bias) = (last.row_start, last.row_count, last.bias);
    if last.end == 0 || count == 0 {
        return Some(None);
    }
    let pc = lookup.wrapping_sub(bias);
    if pc > u32::MAX as u64 {
        return Some(None);
    }
    let row = unsafe {
        core::mem::transmute::<u64, UnwindRow>(
            tracer_unwind_row(start as u64, count as u64, pc) as u64
        )
    };
    Some(Some(row))
}

/// Makes the mapping holding `lookup` the walk's `last` (empty if there is
/// none), the previous `last` its `prev`. Non-zero: the process has no
/// table any more. Global, like `tracer_unwind_row`; rarely called (most
/// frames stay in the two mappings).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tracer_unwind_mapping(lookup: u64, slot: u32) -> i64 {
    let Some(w) = UNWIND_SCRATCH.get_ptr_mut(slot) else {
        return 1;
    };
    let w = unsafe { &mut *w };
    let Some(table) = UNWIND_PROCS.get_ptr(w.tgid) else {
        return 1;
    };
    let found = find_mapping(unsafe { &*table }, lookup)
        .copied()
        .unwrap_or_default();
    if w.last.end != 0 {
        w.prev = w.last;
    }
    w.last = found;
    0
}

/// One frame: record the current ip, then find the caller's registers.
/// Returns non-zero to stop the walk. A global function (not `static`) on
/// purpose: see the module's comment.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tracer_unwind_step(slot: u32) -> i64 {
    let Some(w) = UNWIND_SCRATCH.get_ptr_mut(slot) else {
        return 1;
    };
    let w = unsafe { &mut *w };
    for _ in 0..FRAMES_PER_CALL {
        match step(w, slot) {
            Some(true) => {}
            Some(false) => return 1,
            None => {
                w.status = CUT;
                return 1;
            }
        }
    }
    0
}

/// Some(true): moved to the caller; Some(false): the walk is over; None:
/// cut short.
#[inline(always)]
fn step(w: &mut Walk, slot: u32) -> Option<bool> {
    let n = w.len as usize;
    if n >= MAX_FRAMES {
        return None;
    }
    *w.ips.get_mut(n)? = w.ip;
    w.len = n as u64 + 1;

    let Some(row) = row_for(w, slot) else {
        uncacheable(w);
        return None;
    };
    let kind = row.map_or(ROW_GAP, |r| r.kind);
    w.exact = 0;
    // (CFA, caller's rbp, return address if already read)
    let (cfa, bp, ra) = if kind == ROW_CFA_RSP || kind == ROW_CFA_RBP {
        let row = row.unwrap_or_default();
        let base = if kind == ROW_CFA_RSP {
            w.sp
        } else {
            uses_bp(w);
            w.bp
        };
        let cfa = base.wrapping_add(row.cfa_off as i64 as u64);
        if row.rbp_off == 0 {
            (cfa, w.bp, None)
        } else if row.rbp_off < 0 && row.rbp_off >= -(SAVED_WORDS as i8) {
            // The saved rbp and the return address in one read: both are
            // in the words the function pushed, up to CFA.
            let words = (-row.rbp_off) as u32;
            let Some([bp, ra]) = read_saved(cfa, words) else {
                uncacheable(w);
                return None;
            };
            note(w, cfa.wrapping_sub(8), ra);
            bp_read(w, cfa.wrapping_sub(words as u64 * 8));
            (cfa, bp, Some(ra))
        } else {
            let addr = cfa.wrapping_add((row.rbp_off as i64 * 8) as u64);
            let Some(bp) = read_user(addr) else {
                uncacheable(w);
                return None;
            };
            bp_read(w, addr);
            (cfa, bp, None)
        }
    } else if kind == ROW_GAP {
        // No CFI here (or an object built with frame pointers): the
        // frame-pointer rule, [rbp] = caller's rbp, [rbp + 8] = return
        // address, in one read. A zero frame pointer ends the chain
        // (`_start` and the loader's `_dl_start_user` clear rbp).
        uses_bp(w);
        if w.bp == 0 {
            w.status = COMPLETE;
            return Some(false);
        }
        // A frame pointer is at or above its frame's stack pointer, and
        // 8-aligned: anything else is a register holding something else
        // (musl's C code keeps no frame pointers: `main` finds argc in rbp).
        // The stack ends here without the read: it would fault (~600 ns on
        // these VMs) and leave the walk uncacheable, every time. (No upper
        // bound, unlike `fpwalk`: a handler on an alternate signal stack
        // below the thread's stack chains up to the interrupted frames.)
        if w.bp < w.sp || w.bp & 7 != 0 {
            return None;
        }
        let Some([bp, ra]) = read_user_pair(w.bp) else {
            uncacheable(w);
            return None;
        };
        note(w, w.bp.wrapping_add(8), ra);
        let addr = w.bp;
        bp_read(w, addr);
        (addr.wrapping_add(16), bp, Some(ra))
    } else if kind == ROW_PLT {
        let pushed = if w.ip & 15 >= 11 { 8 } else { 0 };
        (w.sp.wrapping_add(8 + pushed), w.bp, None)
    } else if kind == ROW_SIGNAL {
        // The interrupted frame, whole, from the signal frame (its stack
        // may be another one: not cached).
        uncacheable(w);
        let ip = read_user(w.sp.wrapping_add(SIGNAL_RIP))?;
        let sp = read_user(w.sp.wrapping_add(SIGNAL_RSP))?;
        let bp = read_user(w.sp.wrapping_add(SIGNAL_RBP))?;
        if ip == 0 {
            return None;
        }
        w.ip = ip;
        w.sp = sp;
        w.bp = bp;
        w.exact = 1;
        return Some(true);
    } else if kind == ROW_OUTERMOST {
        w.status = COMPLETE;
        return Some(false);
    } else {
        return None;
    };
    let ra = match ra {
        Some(ra) => ra,
        None => read_noted(w, cfa.wrapping_sub(8))?,
    };
    if ra == 0 {
        w.status = COMPLETE;
        return Some(false);
    }
    // Callers' frames are above: a CFA at or below sp is garbage.
    if cfa <= w.sp {
        return None;
    }
    w.ip = ra;
    w.sp = cfa;
    w.bp = bp;
    Some(true)
}

// --- The walk cache ---
//
// A walk is a function of its start registers (ip, sp, bp), the tables
// (`UNWIND_EPOCH` changes with every table change: rows are only appended)
// and the user words it reads. Each walk notes the words it read; the next
// allocation from the same registers, process and epoch reads the stack
// from sp up to the highest of them in ONE read and compares: all equal,
// the walk would find the same frames, so its stack id is taken as is
// (`stack::capture_in` still checks its slot as for any known stack). Not
// a heuristic: any word that differs, or a start bp that differs when the
// walk used it, and the stack is walked again. (Like a walk that kept the
// mappings of its last walk, a hit in the instant between userspace's
// change of a table and its bump of the epoch finds the old tables.)
//
// Walks that the cache cannot repeat exactly are not kept: a read that
// failed, a lost table, a signal frame, a word outside `WINDOW_BYTES` above
// sp, more than `MAX_READS` words.

/// Words a cacheable walk may read (two per frame: redis's ~20 frames).
const MAX_READS: usize = 64;
/// A cached walk reads at most this many bytes of stack above its sp.
const WINDOW_BYTES: u64 = 8192;
const WINDOW_WORDS: usize = (WINDOW_BYTES / 8) as usize;
/// Cached walks per CPU (a power of two), by a hash of (ip, sp): a request
/// allocates at several call sites.
const CACHE_WAYS: u32 = 64;

/// One remembered walk. `gen` is a sequence count: odd while a program
/// writes the entry, so that a program that preempted it (or that it
/// preempted), reading on the same CPU, sees the entry torn and walks.
/// `writers` admits one writer at a time, as `maps::Scratch::busy` does.
#[repr(C)]
pub struct CachedWalk {
    writers: u64,
    gen: u64,
    tgid: u32,
    bp_dep: u32,
    epoch: u64,
    ip: u64,
    sp: u64,
    bp: u64,
    hash: u64,
    outermost: u64,
    top: u64,
    nreads: u64,
    offs: [u16; MAX_READS],
    vals: [u64; MAX_READS],
}

#[map]
static WALK_CACHE: PerCpuArray<CachedWalk> = PerCpuArray::with_max_entries(CACHE_WAYS, 0);

/// Where a hit's stack words are read to: per CPU, one per scratch slot.
#[repr(C)]
pub struct Window {
    words: [u64; WINDOW_WORDS],
}

#[map]
static WALK_WINDOW: PerCpuArray<Window> =
    PerCpuArray::with_max_entries(crate::maps::SCRATCH_SLOTS, 0);

/// Hits, misses (no entry for these registers), stale entries (a word
/// differed) and walks not kept, per CPU: read with `bpftool map dump name
/// WALK_CACHE_STAT`, to measure the cache.
#[map]
static WALK_CACHE_STAT: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);

const STAT_HIT: u32 = 0;
const STAT_MISS: u32 = 1;
const STAT_STALE: u32 = 2;
const STAT_UNCACHEABLE: u32 = 3;

#[inline(always)]
fn stat(i: u32) {
    if let Some(n) = WALK_CACHE_STAT.get_ptr_mut(i) {
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1) };
    }
}

#[inline(always)]
fn uncacheable(w: &mut Walk) {
    w.cacheable = 0;
}

/// The walk uses `bp` as a base: the result depends on it, so on the
/// start's register if it is still that, or on the word it was read from.
#[inline(always)]
fn uses_bp(w: &mut Walk) {
    if w.bp_live != 0 {
        w.bp_dep = 1;
    } else if w.bp_pending != 0 {
        w.bp_pending = 0;
        let (addr, bp) = (w.bp_addr, w.bp);
        note(w, addr, bp);
    }
}

/// The frame's caller's `bp` (set by the caller of this) was read at
/// `addr`: noted only once used (`uses_bp`).
#[inline(always)]
fn bp_read(w: &mut Walk, addr: u64) {
    w.bp_live = 0;
    w.bp_pending = 1;
    w.bp_addr = addr;
}

/// Notes that the walk read `val` at `addr`.
#[inline(always)]
fn note(w: &mut Walk, addr: u64, val: u64) {
    if w.cacheable == 0 {
        return;
    }
    let off = addr.wrapping_sub(w.sp0);
    let n = w.nreads as usize;
    if off >= WINDOW_BYTES || off & 7 != 0 || n >= MAX_READS {
        w.cacheable = 0;
        return;
    }
    if let (Some(o), Some(v)) = (w.offs.get_mut(n), w.vals.get_mut(n)) {
        *o = (off >> 3) as u16;
        *v = val;
    }
    w.nreads = n as u32 + 1;
    if off + 8 > w.top {
        w.top = off + 8;
    }
}

/// `read_user`, noted.
#[inline(always)]
fn read_noted(w: &mut Walk, addr: u64) -> Option<u64> {
    match read_user(addr) {
        Some(v) => {
            note(w, addr, v);
            Some(v)
        }
        None => {
            uncacheable(w);
            None
        }
    }
}

/// `*next`, then `*next + 1` stored: a loop index the compiler cannot
/// turn into a pointer walk with a down-counter, which 5.10's verifier
/// cannot bound.
#[inline(always)]
fn opaque(next: &mut usize) -> usize {
    let i = unsafe { read_volatile(next) };
    unsafe { write_volatile(next, i + 1) };
    i
}

#[inline(always)]
fn way(ip: u64, sp: u64) -> u32 {
    ((ip ^ sp.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as u32 & (CACHE_WAYS - 1)
}

/// The stack id and outermost flag of the current task's walk from `regs`,
/// if this CPU remembers a walk from them whose words are all unchanged.
#[inline(always)]
pub fn cached(regs: *const pt_regs, slot: u32) -> Option<(u64, bool)> {
    if !enabled() {
        return None;
    }
    let (ip, sp, bp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    if tracer_walk_cached(ip, sp, bp, slot) != 0 {
        return None;
    }
    let w = UNWIND_SCRATCH.get_ptr(slot)?;
    let (hash, outermost) = unsafe { ((*w).hit_hash, (*w).hit_outermost) };
    Some((hash, outermost != 0))
}

/// 0 (and the hit in the walk state of `slot`) when a remembered walk
/// applies. A global function: verified once.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tracer_walk_cached(ip: u64, sp: u64, bp: u64, slot: u32) -> i64 {
    let Some(e) = WALK_CACHE.get_ptr_mut(way(ip, sp)) else {
        return 1;
    };
    let Some(window) = WALK_WINDOW.get_ptr_mut(slot) else {
        return 1;
    };
    let Some(w) = UNWIND_SCRATCH.get_ptr_mut(slot) else {
        return 1;
    };
    let Some(epoch) = epoch() else {
        return 1;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    unsafe {
        let gen = read_volatile(&(*e).gen);
        if gen & 1 != 0
            || read_volatile(&(*e).ip) != ip
            || read_volatile(&(*e).sp) != sp
            || read_volatile(&(*e).tgid) != tgid
            || read_volatile(&(*e).epoch) != epoch
            || (read_volatile(&(*e).bp_dep) != 0 && read_volatile(&(*e).bp) != bp)
        {
            stat(STAT_MISS);
            return 1;
        }
        // Masked after a volatile load, so that the verifier sees the
        // size's bounds: 8..=WINDOW_BYTES.
        let top = read_volatile(&(*e).top);
        let size = ((top.wrapping_sub(1) & (WINDOW_BYTES - 1)) | 7) + 1;
        let ret = aya_ebpf::helpers::generated::bpf_probe_read_user(
            window as *mut _,
            size as u32,
            sp as *const _,
        );
        if ret != 0 {
            stat(STAT_MISS);
            return 1;
        }
        let n = read_volatile(&(*e).nreads) as usize;
        let words = &(*window).words;
        let mut next = 0usize;
        for _ in 0..MAX_READS {
            let i = opaque(&mut next);
            if i >= n || i >= MAX_READS {
                break;
            }
            // Offsets are below `top` (an entry torn by a preempted writer
            // may say otherwise: `gen` tells, below).
            let off = read_volatile(&(*e).offs[i]) as usize & (WINDOW_WORDS - 1);
            if words[off] != read_volatile(&(*e).vals[i]) {
                stat(STAT_STALE);
                return 1;
            }
        }
        (*w).hit_hash = read_volatile(&(*e).hash);
        (*w).hit_outermost = read_volatile(&(*e).outermost);
        if read_volatile(&(*e).gen) != gen {
            stat(STAT_MISS);
            return 1;
        }
    }
    stat(STAT_HIT);
    0
}

/// Remembers the walk just done in `slot` (which found stack `hash`), if
/// a cached copy could repeat it.
#[inline(always)]
pub fn remember(slot: u32, hash: u64) {
    if enabled() {
        tracer_walk_remember(slot, hash);
    }
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tracer_walk_remember(slot: u32, hash: u64) -> i64 {
    let Some(w) = UNWIND_SCRATCH.get_ptr(slot) else {
        return 1;
    };
    let w = unsafe { &*w };
    if w.cacheable == 0 || w.top == 0 {
        stat(STAT_UNCACHEABLE);
        return 1;
    }
    // The start's registers: the walk state holds the last frame's now.
    let (ip, sp) = (w.ips[0], w.sp0);
    let Some(e) = WALK_CACHE.get_ptr_mut(way(ip, sp)) else {
        return 1;
    };
    unsafe {
        let writers = &raw mut (*e).writers;
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(writers, 1);
        if read_volatile(writers) != 1 {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(writers, u64::MAX);
            return 1;
        }
        let gen = read_volatile(&(*e).gen);
        write_volatile(&mut (*e).gen, gen | 1);
        write_volatile(&mut (*e).tgid, w.tgid);
        write_volatile(&mut (*e).epoch, w.epoch);
        write_volatile(&mut (*e).ip, ip);
        write_volatile(&mut (*e).sp, sp);
        write_volatile(&mut (*e).bp, w.bp0);
        write_volatile(&mut (*e).bp_dep, w.bp_dep);
        write_volatile(&mut (*e).hash, hash);
        write_volatile(&mut (*e).outermost, (w.status == COMPLETE) as u64);
        write_volatile(&mut (*e).top, w.top);
        let n = (w.nreads as usize).min(MAX_READS);
        let mut next = 0usize;
        for _ in 0..MAX_READS {
            let i = opaque(&mut next);
            if i >= n || i >= MAX_READS {
                break;
            }
            write_volatile(&mut (*e).offs[i], w.offs[i]);
            write_volatile(&mut (*e).vals[i], w.vals[i]);
        }
        write_volatile(&mut (*e).nreads, n as u64);
        write_volatile(&mut (*e).gen, (gen | 1).wrapping_add(1));
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(writers, u64::MAX);
    }
    0
}
