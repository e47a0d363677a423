//! CFI stack walking (`--unwind cfi`): unwinds the user stack from the
//! registers at the allocator's return, frame by frame, with the compact
//! rows userspace compiled from each object's `.eh_frame`
//! (`tracer_common::unwind`). Where no row is known (no mapping table for
//! the address, or a gap between FDEs) the frame-pointer rule is used.
//!
//! The frame loop runs under `bpf_loop`, so the verifier checks one step
//! (two bounded binary searches and three user reads), not 127 of them.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{pt_regs, BPF_F_MMAPABLE},
    helpers::{bpf_get_current_pid_tgid, bpf_loop, bpf_probe_read_user},
    macros::map,
    maps::{Array, PerCpuArray},
};
use tracer_common::{
    unwind::{
        UnwindConfig, UnwindMapping, UnwindRow, DEFAULT_UNWIND_ROWS, MAPPING_SEARCH_STEPS,
        MAX_UNWIND_MAPPINGS, ROW_CFA_RBP, ROW_CFA_RSP, ROW_GAP, ROW_OUTERMOST, ROW_SEARCH_STEPS,
    },
    StackTrace, MAX_FRAMES,
};

/// 0: frame pointers (`bpf_get_stack`); 1: CFI. Set by userspace at load
/// time (read-only data, so the verifier drops the unused path).
#[unsafe(no_mangle)]
static UNWIND_MODE: u32 = 0;

/// Userspace writes the rows through a shared mapping of the array.
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> =
    Array::with_max_entries(DEFAULT_UNWIND_ROWS, BPF_F_MMAPABLE);

#[map]
pub static UNWIND_MAPPINGS: Array<UnwindMapping> =
    Array::with_max_entries(2 * MAX_UNWIND_MAPPINGS, 0);

#[map]
pub static UNWIND_CONFIG: Array<UnwindConfig> = Array::with_max_entries(1, 0);

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
    half: u32,
    count: u32,
    _pad: u32,
    ips: [u64; MAX_FRAMES],
}

#[map]
static UNWIND_SCRATCH: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn enabled() -> bool {
    unsafe { core::ptr::read_volatile(&UNWIND_MODE) != 0 }
}

/// Walks the user stack of the current task from `regs` into `out.ips`.
/// Returns (frames, cut short) or None when CFI unwinding is off or has no
/// table for this process (the caller then uses `bpf_get_stack`).
#[inline(always)]
pub fn walk(regs: *const pt_regs, out: &mut StackTrace) -> Option<(usize, bool)> {
    if !enabled() {
        return None;
    }
    let config = UNWIND_CONFIG.get(0)?;
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if config.pid != tgid || config.count == 0 {
        return None;
    }
    let w = unsafe { &mut *UNWIND_SCRATCH.get_ptr_mut(0)? };
    unsafe {
        w.ip = (*regs).rip;
        w.sp = (*regs).rsp;
        w.bp = (*regs).rbp;
    }
    w.len = 0;
    w.status = RUNNING;
    w.half = config.half & 1;
    w.count = config.count.min(MAX_UNWIND_MAPPINGS);
    unsafe {
        bpf_loop(
            MAX_FRAMES as u32,
            step as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    let len = (w.len as usize).min(MAX_FRAMES);
    for i in 0..MAX_FRAMES {
        if i >= len {
            break;
        }
        out.ips[i] = w.ips[i];
    }
    Some((len, w.status != COMPLETE))
}

/// The mapping holding `addr`, if the table has one.
#[inline(always)]
fn find_mapping(half: u32, count: u32, addr: u64) -> Option<&'static UnwindMapping> {
    let base = half * MAX_UNWIND_MAPPINGS;
    let (mut lo, mut hi) = (0u32, count);
    for _ in 0..MAPPING_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = (lo + hi) / 2;
        let m = UNWIND_MAPPINGS.get(base + mid)?;
        if m.start <= addr {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo == 0 {
        return None;
    }
    let m = UNWIND_MAPPINGS.get(base + lo - 1)?;
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

/// One frame: record the current ip, then find the caller's registers.
/// Returns 1 to stop the loop.
#[inline(never)]
extern "C" fn step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(w) = UNWIND_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    let w = unsafe { &mut *w };
    let n = w.len as usize;
    if n >= MAX_FRAMES {
        w.status = CUT;
        return 1;
    }
    w.ips[n] = w.ip;
    w.len = n as u64 + 1;

    // The ip is a return address: the call it returns from is just before it.
    let lookup = w.ip.wrapping_sub(1);
    let row = match find_mapping(w.half, w.count, lookup) {
        Some(m) if m.row_count > 0 => {
            let pc = lookup.wrapping_sub(m.bias);
            if pc > u32::MAX as u64 {
                None
            } else {
                find_row(m.row_start, m.row_count, pc as u32)
            }
        }
        _ => None,
    };
    let kind = row.map_or(ROW_GAP, |r| r.kind);
    let (cfa, bp) = if kind == ROW_CFA_RSP || kind == ROW_CFA_RBP {
        let row = row.unwrap_or_default();
        let base = if kind == ROW_CFA_RSP { w.sp } else { w.bp };
        let cfa = base.wrapping_add(row.cfa_off as i64 as u64);
        let bp = if row.rbp_off == 0 {
            w.bp
        } else {
            match read_user(cfa.wrapping_add((row.rbp_off as i64 * 8) as u64)) {
                Some(bp) => bp,
                None => {
                    w.status = CUT;
                    return 1;
                }
            }
        };
        (cfa, bp)
    } else if kind == ROW_GAP {
        // No CFI here: frame-pointer rule.
        if w.bp == 0 {
            w.status = CUT;
            return 1;
        }
        let Some(bp) = read_user(w.bp) else {
            w.status = CUT;
            return 1;
        };
        (w.bp.wrapping_add(16), bp)
    } else if kind == ROW_OUTERMOST {
        w.status = COMPLETE;
        return 1;
    } else {
        w.status = CUT;
        return 1;
    };
    let Some(ra) = read_user(cfa.wrapping_sub(8)) else {
        w.status = CUT;
        return 1;
    };
    if ra == 0 {
        w.status = COMPLETE;
        return 1;
    }
    // Callers' frames are above: a CFA at or below sp is garbage.
    if cfa <= w.sp {
        w.status = CUT;
        return 1;
    }
    w.ip = ra;
    w.sp = cfa;
    w.bp = bp;
    0
}
