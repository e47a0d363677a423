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
    /// `ip` is where the frame was interrupted (a signal), not a return
    /// address: look it up as is, not at the call before it.
    exact: u32,
    _pad: u32,
    /// The mapping of the previous frame (callers are mostly in the same
    /// object): no search while frames stay in it. Empty when end = 0.
    last: UnwindMapping,
    ips: [u64; MAX_FRAMES],
}

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
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    UNWIND_PROCS.get_ptr(tgid)?;
    let w = unsafe { &mut *UNWIND_SCRATCH.get_ptr_mut(slot)? };
    unsafe {
        w.ip = (*regs).rip;
        w.sp = (*regs).rsp;
        w.bp = (*regs).rbp;
    }
    w.len = 0;
    w.status = RUNNING;
    w.tgid = tgid;
    // At a return probe, rip is a return address; at a syscall, the
    // instruction after it: both look up the instruction before.
    w.exact = 0;
    w.last = UnwindMapping::default();
    for _ in 0..MAX_FRAMES.div_ceil(FRAMES_PER_CALL) {
        if tracer_unwind_step(slot) != 0 {
            break;
        }
    }
    let len = (w.len as usize).min(MAX_FRAMES);
    for i in 0..MAX_FRAMES {
        if i >= len {
            break;
        }
        out.ips[i] = w.ips[i];
    }
    out.outermost = (w.status == COMPLETE) as u64;
    Some(len)
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

/// The last row at or before `pc` among `count` rows from `start`.
#[inline(always)]
fn find_row(start: u32, count: u32, pc: u32) -> Option<UnwindRow> {
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

/// The row for the walk's current frame (None: no CFI known there).
#[inline(always)]
fn row_for(w: &mut Walk, table: &UnwindProc) -> Option<UnwindRow> {
    // A return address: the call it returns from is just before it.
    let lookup = if w.exact != 0 {
        w.ip
    } else {
        w.ip.wrapping_sub(1)
    };
    if !(w.last.start <= lookup && lookup < w.last.end) {
        w.last = find_mapping(table, lookup).copied().unwrap_or_default();
    }
    let m = &w.last;
    if m.end == 0 || m.row_count == 0 {
        return None;
    }
    let pc = lookup.wrapping_sub(m.bias);
    if pc > u32::MAX as u64 {
        return None;
    }
    find_row(m.row_start, m.row_count, pc as u32)
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
    let Some(table) = UNWIND_PROCS.get_ptr(w.tgid) else {
        w.status = CUT;
        return 1;
    };
    let table = unsafe { &*table };
    for _ in 0..FRAMES_PER_CALL {
        match step(w, table) {
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
fn step(w: &mut Walk, table: &UnwindProc) -> Option<bool> {
    let n = w.len as usize;
    if n >= MAX_FRAMES {
        return None;
    }
    *w.ips.get_mut(n)? = w.ip;
    w.len = n as u64 + 1;

    let row = row_for(w, table);
    let kind = row.map_or(ROW_GAP, |r| r.kind);
    w.exact = 0;
    // (CFA, caller's rbp, return address if already read)
    let (cfa, bp, ra) = if kind == ROW_CFA_RSP || kind == ROW_CFA_RBP {
        let row = row.unwrap_or_default();
        let base = if kind == ROW_CFA_RSP { w.sp } else { w.bp };
        let cfa = base.wrapping_add(row.cfa_off as i64 as u64);
        let bp = if row.rbp_off == 0 {
            w.bp
        } else {
            read_user(cfa.wrapping_add((row.rbp_off as i64 * 8) as u64))?
        };
        (cfa, bp, None)
    } else if kind == ROW_GAP {
        // No CFI here (or an object built with frame pointers): the
        // frame-pointer rule, [rbp] = caller's rbp, [rbp + 8] = return
        // address, in one read. A zero frame pointer ends the chain
        // (`_start` and the loader's `_dl_start_user` clear rbp).
        if w.bp == 0 {
            w.status = COMPLETE;
            return Some(false);
        }
        let [bp, ra] = read_user_pair(w.bp)?;
        (w.bp.wrapping_add(16), bp, Some(ra))
    } else if kind == ROW_PLT {
        let pushed = if w.ip & 15 >= 11 { 8 } else { 0 };
        (w.sp.wrapping_add(8 + pushed), w.bp, None)
    } else if kind == ROW_SIGNAL {
        // The interrupted frame, whole, from the signal frame.
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
        None => read_user(cfa.wrapping_sub(8))?,
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
