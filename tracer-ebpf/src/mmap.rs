//! The mmap family, through syscall tracepoints: anonymous mappings the
//! traced process makes itself, with the stack of the call, and every
//! change that gives memory back (munmap, mremap, a MAP_FIXED mapping over
//! an old one). The ranges are kept in userspace (`tracer/src/collect/mappings.rs`):
//! a munmap that punches a hole in the middle of a mapping cannot be found
//! by key here. The program break is kept here, per process.
//!
//! Calls made while the thread is inside a traced allocator call (its call
//! record exists, see `calls.rs`) are the allocator's own: glibc maps large
//! blocks and arenas for malloc, and those bytes are already counted as the
//! blocks malloc returned. They are left out.

use aya_ebpf::{
    bindings::{pt_regs, BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_get_stack, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
    },
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};
use tracer_common::{
    MmapCall, MmapEvent, MmapKind, StackTrace, MAX_FRAMES, MMAP_EVENTS_LOST, MMAP_STACKS_LOST,
    STACK_UNKNOWN,
};

use crate::maps::{is_target, BRK, MMAP_COUNTERS, MMAP_EVENTS, MMAP_IN_FLIGHT, MMAP_STACKS};

/// 1 when the kernel has `bpf_task_pt_regs` (5.15) and
/// `bpf_get_current_task_btf` (5.11): the user registers at the syscall
/// are read (the CFI walk starts from them; the frame-pointer path finds
/// the wrapper's caller with them). Set by userspace at load time
/// (read-only data: on a kernel without them the verifier sees a constant
/// 0, never walks the branch that calls them, and the programs load;
/// mapping stacks are then the kernel's frame-pointer walk alone).
#[unsafe(no_mangle)]
static TASK_PT_REGS: u8 = 0;

#[inline(always)]
fn have_task_pt_regs() -> bool {
    unsafe { core::ptr::read_volatile(&TASK_PT_REGS) != 0 }
}

const MAP_SHARED: u64 = 0x01;
const MAP_PRIVATE: u64 = 0x02;
const MAP_FIXED: u64 = 0x10;
const MAP_ANONYMOUS: u64 = 0x20;
const PROT_EXEC: u64 = 0x4;

/// Offsets in the syscall tracepoints' records (see their `format` files):
/// the arguments start at 16, one 8-byte slot each; `ret` is at 16.
const ARG0: usize = 16;
const RET: usize = 16;

#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    unsafe { ctx.read_at::<u64>(ARG0 + 8 * n) }.unwrap_or(0)
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    unsafe { ctx.read_at::<i64>(RET) }.unwrap_or(-1)
}

#[inline(always)]
fn failed(ret: i64) -> bool {
    (-4095..0).contains(&ret)
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(n) = MMAP_COUNTERS.get_ptr_mut(slot) {
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                n, 1,
            )
        };
    }
}

/// The thread of a traced process, not inside a traced allocator call.
#[inline(always)]
fn traced_thread() -> Option<u64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_target((pid_tgid >> 32) as u32) {
        return None;
    }
    if crate::calls::get(pid_tgid).is_some() {
        return None;
    }
    Some(pid_tgid)
}

#[inline(always)]
fn begin(kind: MmapKind, addr: u64, len: u64, new_len: u64, flags: u64) {
    let Some(pid_tgid) = traced_thread() else {
        return;
    };
    let call = MmapCall {
        kind: kind as u32,
        prot: 0,
        addr,
        len,
        new_len,
        flags,
        enter_ns: unsafe { bpf_ktime_get_ns() },
    };
    let _ = MMAP_IN_FLIGHT.insert(pid_tgid, call, 0);
}

/// The call this thread started, if it is of `kind` (and is forgotten).
#[inline(always)]
fn finish(kind: MmapKind) -> Option<(u64, MmapCall)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let call = *unsafe { MMAP_IN_FLIGHT.get(pid_tgid) }?;
    let _ = MMAP_IN_FLIGHT.remove(pid_tgid);
    (call.kind == kind as u32).then_some((pid_tgid, call))
}

#[inline(always)]
fn emit(event: &MmapEvent) {
    if MMAP_EVENTS.output::<MmapEvent>(event, 0).is_err() {
        count(MMAP_EVENTS_LOST);
    }
}

#[tracepoint]
pub fn mmap_enter(ctx: TracePointContext) -> u32 {
    let flags = arg(&ctx, 3);
    let prot = arg(&ctx, 2);
    // Code mapped from a file (a library being loaded): the CFI unwinder
    // is told at the exit.
    let code = prot & PROT_EXEC != 0 && flags & MAP_ANONYMOUS == 0;
    // A mapping that is neither anonymous nor fixed changes nothing tracked:
    // it cannot overlap an existing one.
    if !code
        && (flags & (MAP_ANONYMOUS | MAP_FIXED) == 0 || flags & (MAP_SHARED | MAP_PRIVATE) == 0)
    {
        return 0;
    }
    begin(MmapKind::Map, arg(&ctx, 0), arg(&ctx, 1), 0, flags);
    if code {
        if let Some(call) = MMAP_IN_FLIGHT.get_ptr_mut(bpf_get_current_pid_tgid()) {
            unsafe { (*call).prot = prot as u32 };
        }
    }
    0
}

#[tracepoint]
pub fn mmap_exit(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, call)) = finish(MmapKind::Map) else {
        return 0;
    };
    let addr = ret(&ctx);
    if failed(addr) {
        return 0;
    }
    let anonymous = call.flags & MAP_ANONYMOUS != 0;
    let mut event = MmapEvent {
        kind: if anonymous {
            MmapKind::Map
        } else {
            MmapKind::Replace
        } as u32,
        tgid: (pid_tgid >> 32) as u32,
        addr: addr as u64,
        len: call.len,
        flags: call.flags,
        enter_ns: call.enter_ns,
        exit_ns: unsafe { bpf_ktime_get_ns() },
        ..Default::default()
    };
    if anonymous {
        event.stack_id = capture(&ctx);
    }
    emit(&event);
    if call.prot as u64 & PROT_EXEC != 0 {
        crate::unwind::code_mapped(event.tgid);
    }
    0
}

#[tracepoint]
pub fn munmap_enter(ctx: TracePointContext) -> u32 {
    begin(MmapKind::Unmap, arg(&ctx, 0), arg(&ctx, 1), 0, 0);
    0
}

#[tracepoint]
pub fn munmap_exit(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, call)) = finish(MmapKind::Unmap) else {
        return 0;
    };
    if ret(&ctx) != 0 {
        return 0;
    }
    emit(&MmapEvent {
        kind: MmapKind::Unmap as u32,
        tgid: (pid_tgid >> 32) as u32,
        addr: call.addr,
        len: call.len,
        enter_ns: call.enter_ns,
        exit_ns: unsafe { bpf_ktime_get_ns() },
        ..Default::default()
    });
    0
}

#[tracepoint]
pub fn mremap_enter(ctx: TracePointContext) -> u32 {
    // mremap(old_address, old_size, new_size, flags, new_address)
    begin(
        MmapKind::Remap,
        arg(&ctx, 0),
        arg(&ctx, 1),
        arg(&ctx, 2),
        arg(&ctx, 3),
    );
    0
}

#[tracepoint]
pub fn mremap_exit(ctx: TracePointContext) -> u32 {
    let Some((pid_tgid, call)) = finish(MmapKind::Remap) else {
        return 0;
    };
    let addr = ret(&ctx);
    if failed(addr) {
        return 0;
    }
    emit(&MmapEvent {
        kind: MmapKind::Remap as u32,
        tgid: (pid_tgid >> 32) as u32,
        addr: addr as u64,
        len: call.new_len,
        old_addr: call.addr,
        old_len: call.len,
        flags: call.flags,
        stack_id: capture(&ctx),
        enter_ns: call.enter_ns,
        exit_ns: unsafe { bpf_ktime_get_ns() },
    });
    0
}

/// The program break after every brk call (including the `brk(0)` query
/// that C libraries start with), whoever made it: userspace reports its
/// growth since attach as a total of its own, never per stack, so the
/// break malloc moves is not counted twice.
#[tracepoint]
pub fn brk_exit(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let brk = ret(&ctx);
    if brk > 0 {
        let _ = BRK.insert(tgid, brk as u64, 0);
    }
    0
}

/// How far above the user stack pointer the caller's return address is
/// looked for: glibc's mremap keeps 0x58 bytes, musl's mmap 0x38.
const SCAN_WORDS: u64 = 24;

/// The user stack of the syscall, innermost first, stored in `MMAP_STACKS`
/// (hashed as heap stacks are, `stack::hash_frames`), in one of this CPU's
/// scratch slots (`maps::Scratch`, shared with the heap's capture).
#[inline(always)]
fn capture(ctx: &TracePointContext) -> u64 {
    crate::stack::with_scratch(|buf, index| capture_in(ctx, buf, index)).unwrap_or_else(|| {
        // Every slot held by a preempted program on this CPU.
        count(MMAP_STACKS_LOST);
        STACK_UNKNOWN
    })
}

/// `capture` with scratch slot `index` claimed: `buf` is ours alone.
///
/// In CFI mode, on kernels with `bpf_task_pt_regs`, the stack is walked
/// by CFI from the user registers at the syscall, like a heap stack, and
/// its first frame (libc's wrapper) left out: it starts at the function
/// that called mmap, as on the frame-pointer path below.
///
/// Otherwise (`--unwind fp`, no table for the process, an older kernel)
/// the kernel walks frame pointers from the syscall wrapper (`mmap` in
/// libc), which has no frame of its own: the walk goes from the wrapper
/// straight to its caller's caller, and the function that called mmap is
/// lost. Its return address is on the stack a few words above the user
/// stack pointer; it is the first word there that points just past a call
/// instruction, and it takes the wrapper's place in the stack.
#[inline(always)]
fn capture_in(ctx: &TracePointContext, buf: &mut StackTrace, index: u32) -> u64 {
    let cfi = match walk_from_syscall(buf, index) {
        Some(frames) => {
            buf.len = frames as u64;
            true
        }
        None => false,
    };
    if !cfi {
        buf.outermost = 0;
        let written = unsafe {
            bpf_get_stack(
                ctx.as_ptr(),
                buf.ips.as_mut_ptr() as *mut _,
                (MAX_FRAMES * 8) as u32,
                BPF_F_USER_STACK as u64,
            )
        };
        if written <= 0 {
            count(MMAP_STACKS_LOST);
            return STACK_UNKNOWN;
        }
        let len = (written as usize / 8).min(MAX_FRAMES);
        buf.len = len as u64;
        let caller = caller_of_wrapper();
        if caller != 0 && !(len >= 2 && buf.ips[1] == caller) {
            buf.ips[0] = caller;
        }
    }
    // The length goes through the buffer, read back once: one unknown
    // number for the hash below, not one path per length.
    let len = (unsafe { core::ptr::read_volatile(&buf.len) } as usize).min(MAX_FRAMES);
    if len == 0 {
        count(MMAP_STACKS_LOST);
        return STACK_UNKNOWN;
    }
    buf.len = len as u64;
    // A heap stack's field, left by the slot's last user.
    buf.slot = 0;
    let outermost = unsafe { core::ptr::read_volatile(&buf.outermost) } != 0;
    buf.truncated = (len == MAX_FRAMES || (cfi && !outermost)) as u64;

    let hash = crate::stack::hash_frames(buf, len, (bpf_get_current_pid_tgid() >> 32) as u32);
    if MMAP_STACKS.get_ptr(hash).is_none() {
        if let Err(err) = MMAP_STACKS.insert(hash, &*buf, BPF_NOEXIST as u64) {
            if err != -17 {
                count(MMAP_STACKS_LOST);
                return STACK_UNKNOWN;
            }
        }
    }
    hash
}

/// The CFI walk from the user registers at the syscall, without its first
/// frame (the syscall wrapper). None when CFI unwinding is off, the kernel
/// cannot give the registers, or the process has no table.
#[inline(always)]
fn walk_from_syscall(buf: &mut StackTrace, index: u32) -> Option<usize> {
    if !have_task_pt_regs() || !crate::unwind::cfi_mode() {
        return None;
    }
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    if regs.is_null() {
        return None;
    }
    let ip = unsafe { bpf_probe_read_kernel(&(*regs).rip) }.ok()?;
    let sp = unsafe { bpf_probe_read_kernel(&(*regs).rsp) }.ok()?;
    let bp = unsafe { bpf_probe_read_kernel(&(*regs).rbp) }.ok()?;
    crate::unwind::walk_from::<1>(ip, sp, bp, buf, index)
}

/// The return address into the function that called the syscall wrapper,
/// or 0 when none is found below the caller's frame.
#[inline(always)]
fn caller_of_wrapper() -> u64 {
    if !have_task_pt_regs() {
        return 0;
    }
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    if regs.is_null() {
        return 0;
    }
    let Ok(sp) = (unsafe { bpf_probe_read_kernel(&(*regs).rsp) }) else {
        return 0;
    };
    let bp = unsafe { bpf_probe_read_kernel(&(*regs).rbp) }.unwrap_or(0);
    // The wrapper leaves the frame pointer alone: the return address it
    // was called with lies below the caller's frame.
    let limit = if bp > sp && bp - sp <= SCAN_WORDS * 8 {
        bp
    } else {
        sp + SCAN_WORDS * 8
    };
    for i in 0..SCAN_WORDS {
        let slot = sp + i * 8;
        if slot >= limit {
            break;
        }
        let Ok(word) = (unsafe { bpf_probe_read_user(slot as *const u64) }) else {
            return 0;
        };
        if word < 0x10000 {
            continue;
        }
        let Ok(before) = (unsafe { bpf_probe_read_user((word - 8) as *const [u8; 8]) }) else {
            continue;
        };
        if follows_call(&before) {
            return word;
        }
    }
    0
}

/// The 8 bytes before an address end with a call instruction: `call rel32`
/// (e8), `call *disp32(%rip)` (ff 15: through the GOT), `call *%reg`
/// (ff d0+r, or 41 ff d0+r).
#[inline(always)]
fn follows_call(b: &[u8; 8]) -> bool {
    b[3] == 0xe8 || (b[2] == 0xff && b[3] == 0x15) || (b[6] == 0xff && b[7] & 0xf8 == 0xd0)
}
