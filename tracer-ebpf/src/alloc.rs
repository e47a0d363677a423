//! Uprobes on the allocator's entry points and a shared uretprobe.
//!
//! Entry probes remember the call's arguments per thread (`calls`); the
//! return probe turns them into an `ALLOCS` record and a `STACK_STATS`
//! update. `free` needs no return probe. Only the outermost allocator call on
//! a thread counts (see `tracer_common::InFlight`).
//!
//! Userspace attaches one entry program per calling convention to each
//! distinct function address, and `alloc_return` to the same addresses.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
    },
    macros::{map, uprobe, uretprobe},
    maps::Array,
    programs::{ProbeContext, RetProbeContext},
    EbpfContext as _,
};
use aya_log_ebpf::warn;
use tracer_common::{
    convention, AllocKey, AllocRecord, CallKind, Counter, InFlight, IN_FLIGHT_UNSAMPLED,
};

use crate::{
    calls,
    maps::{
        count, filter_add, filter_maybe, is_target, old_blocks_held, old_blocks_held_add, ALLOCS,
        COUNTERS, STACK_STATS, TARGETS,
    },
    sample, stack,
    taskstack::keep_task_stack,
};

const ENOENT: i32 = 2;
const EEXIST: i32 = 17;

/// A hash map operation, tried again while the kernel refuses it for
/// contention rather than for the map: kernels 6.15+ guard buckets with
/// resilient spinlocks that give up (EDEADLK, ETIMEDOUT; seen under
/// emulation, where a vCPU holding a lock can wait long for its turn), and
/// older ones refuse a bucket re-entered on the same CPU (EBUSY). A lost
/// update would be a block miscounted.
#[inline(always)]
pub(crate) fn retried(op: impl Fn() -> Result<(), i32>) -> Result<(), i32> {
    const EBUSY: i32 = 16;
    const EDEADLK: i32 = 35;
    const ETIMEDOUT: i32 = 110;
    let mut result = op();
    for _ in 0..2 {
        match result {
            Err(err) if err == -EBUSY || err == -EDEADLK || err == -ETIMEDOUT => result = op(),
            _ => break,
        }
    }
    result
}

/// x86_64 page size, for `pvalloc`'s rounding.
const PAGE_SIZE: u64 = 4096;

/// The `ALLOCS` key of block `addr` of the calling thread's process.
#[inline(always)]
fn block(pid_tgid: u64, addr: u64) -> AllocKey {
    AllocKey::new((pid_tgid >> 32) as u32, addr)
}

#[inline(always)]
fn stack_pointer(regs: *mut aya_ebpf::bindings::pt_regs) -> u64 {
    unsafe { (*regs).rsp }
}

/// Argument `n` of the call: in its own register, or where the cookie of a
/// moved probe says it is (`tracer_common::convention::register`; 0 for
/// probes whose arguments did not move).
#[inline(always)]
fn arg(ctx: &ProbeContext, cookie: u64, n: usize) -> u64 {
    match convention::register(cookie, n) {
        None => ctx.arg::<u64>(n).unwrap_or(0),
        Some(r) => register(ctx.regs, r),
    }
}

/// x86 register number `r` (rax 0 ... r15 15) of the probed thread, or the
/// constant 1 (`convention::CONSTANT_ONE`). Read with a helper: LLVM turns
/// a match of field reads into one read at a computed offset, and the
/// verifier refuses a context pointer that is not at a constant offset.
#[inline(always)]
fn register(regs: *mut aya_ebpf::bindings::pt_regs, r: u64) -> u64 {
    use core::ptr::addr_of;
    let field = unsafe {
        match r {
            0 => addr_of!((*regs).rax),
            1 => addr_of!((*regs).rcx),
            2 => addr_of!((*regs).rdx),
            3 => addr_of!((*regs).rbx),
            4 => addr_of!((*regs).rsp),
            5 => addr_of!((*regs).rbp),
            6 => addr_of!((*regs).rsi),
            7 => addr_of!((*regs).rdi),
            8 => addr_of!((*regs).r8),
            9 => addr_of!((*regs).r9),
            10 => addr_of!((*regs).r10),
            11 => addr_of!((*regs).r11),
            12 => addr_of!((*regs).r12),
            13 => addr_of!((*regs).r13),
            14 => addr_of!((*regs).r14),
            15 => addr_of!((*regs).r15),
            convention::CONSTANT_ONE => return 1,
            _ => return 0,
        }
    };
    unsafe { bpf_probe_read_kernel(field) }.unwrap_or(0)
}

/// `n * size`, or u64::MAX on overflow (the call then fails). LLVM turns an
/// overflow check into a 128-bit multiply builtin that BPF lacks; the
/// volatile read of the quotient keeps it a division.
#[inline(always)]
fn array_size(n: u64, size: u64) -> u64 {
    if (n | size) >> 32 == 0 || n == 0 {
        return n * size;
    }
    let limit = u64::MAX / n;
    let limit = unsafe { core::ptr::read_volatile(&limit) };
    if size > limit {
        u64::MAX
    } else {
        n * size
    }
}

/// The thread is inside an allocator call that is already being recorded.
/// A record left by a call that can no longer be running is dropped here
/// (see `abandon`).
#[inline(always)]
fn is_inner_call(pid_tgid: u64, sp: u64) -> bool {
    let Some(outer) = calls::get(pid_tgid) else {
        return false;
    };
    let outer = unsafe { *outer };
    if sp <= outer.entry_sp && !left_without_returning(pid_tgid, &outer) {
        return true;
    }
    // The recorded call was left without returning (longjmp out of a
    // signal handler that interrupted it): its record would otherwise
    // silence every later call of this thread from a deeper stack.
    abandon(pid_tgid, &outer);
    false
}

/// A call whose return is hooked keeps the uretprobe trampoline's address in
/// its return-address slot until it returns. Anything else there means the
/// frame was unwound (or the return was never hooked: then its return is
/// not seen either). Only decidable once userspace has told us the
/// trampoline address; until then every call below the record is inner.
#[inline(always)]
fn left_without_returning(pid_tgid: u64, outer: &InFlight) -> bool {
    let Some(target) = TARGETS.get_ptr((pid_tgid >> 32) as u32) else {
        return false;
    };
    let target = unsafe { *target };
    if target.trampoline == 0 {
        return false;
    }
    // The address is only trusted while the code first seen there is still
    // there: an exec replaces the address space, and userspace may take up
    // to a second to notice. (Userspace cannot read the code itself: the
    // trampoline's mapping is VM_IO, closed to /proc/PID/mem.)
    let Ok(code) = (unsafe { bpf_probe_read_user(target.trampoline as *const u64) }) else {
        return false;
    };
    if target.trampoline_code == 0 {
        if let Some(stored) = TARGETS.get_ptr_mut((pid_tgid >> 32) as u32) {
            unsafe { (*stored).trampoline_code = code };
        }
    } else if code != target.trampoline_code {
        return false;
    }
    match unsafe { bpf_probe_read_user(outer.entry_sp as *const u64) } {
        Ok(slot) => slot != target.trampoline,
        Err(_) => false,
    }
}

/// Forgets a call that will never return, putting back the old block's
/// record it had taken (a realloc): nothing says the block was freed.
#[inline(always)]
fn abandon(pid_tgid: u64, call: &InFlight) {
    forget_call(pid_tgid);
    if call.has_old != 0 {
        old_blocks_held_add(1u64.wrapping_neg());
    }
    // If the address is recorded again, the block was freed and handed out
    // anew: retire it instead.
    if call.has_old == 0 {
        return;
    }
    if publish(
        &block(pid_tgid, call.ptr_arg),
        &call.old,
        BPF_NOEXIST as u64,
    )
    .is_err()
    {
        retire(&call.old);
    }
}

/// Inserts block `key`'s record into `ALLOCS`, raising its sampling filter
/// slot first and lowering it again if the insert fails (the filter's
/// rule: `maps::SAMPLED_FILTER`).
#[inline(always)]
fn publish(key: &AllocKey, record: &AllocRecord, flags: u64) -> Result<(), i32> {
    filter_add(key, 1);
    let result = retried(|| ALLOCS.insert(key, record, flags));
    if result.is_err() {
        filter_add(key, u32::MAX);
    }
    result
}

/// Removes block `key`'s record from `ALLOCS`, lowering its sampling
/// filter slot once it is gone.
#[inline(always)]
fn unpublish(key: &AllocKey) -> Result<(), i32> {
    let result = retried(|| ALLOCS.remove(key));
    if result.is_ok() {
        filter_add(key, u32::MAX);
    }
    result
}

/// Removes the thread's in-flight record once its call is settled (see
/// `calls::forget`).
#[inline(always)]
fn forget_call(pid_tgid: u64) {
    if calls::forget(pid_tgid) {
        sample::set_in_flight(pid_tgid, false);
    }
}

#[inline(always)]
fn enter(ctx: &ProbeContext, kind: CallKind, size: u64, ptr_arg: u64) -> bool {
    // Of the `Alloc` kind, only memalign may call malloc inside
    // (its convention says so itself, in `enter_convention`).
    enter_sampled(ctx, kind, size, ptr_arg, kind != CallKind::Alloc)
}

/// `may_nest`: the function may call another probed one (realloc(NULL, n)
/// calls malloc, memalign with a small alignment too). Such a call is
/// remembered even when not sampled, so that the inner call is known as
/// inner and not sampled on its own.
///
/// True when the call was remembered (`calls`): only then does its
/// return matter (a uprobe session skips the return otherwise).
#[inline(always)]
fn enter_sampled(
    ctx: &ProbeContext,
    kind: CallKind,
    size: u64,
    ptr_arg: u64,
    may_nest: bool,
) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !may_nest && sample::skip_fast(pid_tgid, size) {
        return false;
    }
    if !is_target((pid_tgid >> 32) as u32) {
        return false;
    }
    let sp = stack_pointer(ctx.regs);
    if is_inner_call(pid_tgid, sp) {
        return false;
    }
    let unsampled = sample::skip(pid_tgid, size);
    let old_block = kind == CallKind::Realloc && ptr_arg != 0;
    if unsampled && !may_nest && !old_block {
        return false;
    }
    let mut call = InFlight {
        kind: kind as u32,
        flags: if unsampled { IN_FLIGHT_UNSAMPLED } else { 0 },
        entry_sp: sp,
        size,
        ptr_arg,
        has_old: 0,
        old: AllocRecord::default(),
    };
    let claims_old = kind == CallKind::Realloc && ptr_arg != 0;
    if claims_old && filter_maybe(&block(pid_tgid, ptr_arg)) {
        if let Some(old) = unsafe { ALLOCS.get(&block(pid_tgid, ptr_arg)) } {
            call.old = *old;
            call.has_old = 1;
        }
    }
    if !calls::remember(pid_tgid, &call) {
        count(Counter::InFlightFull);
        return false;
    }
    sample::set_in_flight(pid_tgid, true);
    // Take the old block's record out only once the call is remembered (the
    // return needs it). The caller owns the block until realloc frees it, so
    // the record is still the one read above; if the remove fails anyway (a
    // racing free of the same block in the program), there is nothing to
    // retire at return.
    if call.has_old != 0 {
        // Counted before the block leaves ALLOCS (see `on_free`).
        old_blocks_held_add(1);
        if unpublish(&block(pid_tgid, ptr_arg)).is_err() {
            if let Some(stored) = calls::get(pid_tgid) {
                unsafe { (*stored).has_old = 0 };
            }
            old_blocks_held_add(1u64.wrapping_neg());
        }
    }
    true
}

/// Decodes an allocation call's arguments by its calling convention
/// (`tracer_common::convention`, the low byte of `cookie`; the bytes above
/// say where a moved probe finds them) and enters it; true when its return
/// matters (see `enter_sampled`).
#[inline(always)]
pub(crate) fn enter_convention(ctx: &ProbeContext, cookie: u64) -> bool {
    let a = |n| arg(ctx, cookie, n);
    match convention::of(cookie) {
        convention::MALLOC | convention::VALLOC => enter(ctx, CallKind::Alloc, a(0), 0),
        convention::CALLOC => {
            // An overflowing product makes calloc fail; the NULL result is
            // not recorded.
            let size = array_size(a(0), a(1));
            enter(ctx, CallKind::Alloc, size, 0)
        }
        convention::REALLOC => enter(ctx, CallKind::Realloc, a(1), a(0)),
        convention::REALLOCARRAY => {
            let size = array_size(a(1), a(2));
            enter(ctx, CallKind::Realloc, size, a(0))
        }
        // `memalign(align, size)` and `aligned_alloc(align, size)`.
        convention::MEMALIGN => enter_sampled(ctx, CallKind::Alloc, a(1), 0, true),
        convention::POSIX_MEMALIGN => enter(ctx, CallKind::PosixMemalign, a(2), a(0)),
        // `pvalloc` rounds the request up to whole pages; that is the size
        // the caller owns and must free.
        convention::PVALLOC => {
            let size = a(0).saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
            enter(ctx, CallKind::Alloc, size, 0)
        }
        _ => false,
    }
}

/// A probe moved past instructions that copied an argument to another
/// register (see tracer/src/target/placement.rs): the convention and where
/// each argument is come in the attach cookie. Only such probes use it, so
/// the others run without the helper (kernels before 5.15 lack it, and the
/// tracer then keeps those probes where the arguments did not move).
#[uprobe]
pub fn moved_enter(ctx: ProbeContext) -> u32 {
    keep_task_stack!(&ctx, NO_PRIV_STACK_MOVED_ENTER);
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    enter_moved(&ctx, cookie);
    0
}

/// A moved probe's call, by its cookie: a free or an allocation.
#[inline(always)]
fn enter_moved(ctx: &ProbeContext, cookie: u64) {
    if convention::of(cookie) == convention::FREE {
        on_free(ctx, arg(ctx, cookie, 0));
    } else {
        enter_convention(ctx, cookie);
    }
}

/// `moved_enter` for kernels without attach cookies (before 5.15): the
/// cookie is read from `MOVED_ARGS` at the probe's page offset (the kernel
/// sets the instruction pointer back to the breakpoint before any handler).
#[uprobe]
pub fn moved_enter_keyed(ctx: ProbeContext) -> u32 {
    keep_task_stack!(&ctx, NO_PRIV_STACK_MOVED_ENTER_KEYED);
    let ip = unsafe { (*ctx.regs).rip };
    let slot = (ip % convention::KEYED_SLOTS as u64) as u32;
    let Some(&cookie) = MOVED_ARGS.get(slot) else {
        return 0;
    };
    if cookie & convention::KEYED == 0 {
        // Never happens: userspace writes the slot before attaching.
        warn!(&ctx, "no MOVED_ARGS entry for the probe at {:x}", ip);
        return 0;
    }
    enter_moved(&ctx, cookie & !convention::KEYED);
    0
}

/// Where moved probes' arguments are, by page offset, for
/// `moved_enter_keyed` (see `convention::KEYED`).
#[map]
static MOVED_ARGS: Array<u64> = Array::with_max_entries(convention::KEYED_SLOTS, 0);

#[uprobe]
pub fn malloc_enter(ctx: ProbeContext) -> u32 {
    keep_task_stack!(&ctx, NO_PRIV_STACK_MALLOC_ENTER);
    enter_convention(&ctx, convention::MALLOC);
    0
}

#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    keep_task_stack!(&ctx, NO_PRIV_STACK_CALLOC_ENTER);
    enter_convention(&ctx, convention::CALLOC);
    0
}

#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    keep_task_stack!(&ctx, NO_PRIV_STACK_REALLOC_ENTER);
    enter_convention(&ctx, convention::REALLOC);
    0
}

#[uprobe]
pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
    keep_task_stack!(&ctx, NO_PRIV_STACK_REALLOCARRAY_ENTER);
    enter_convention(&ctx, convention::REALLOCARRAY);
    0
}

#[uprobe]
pub fn memalign_enter(ctx: ProbeContext) -> u32 {
    keep_task_stack!(&ctx, NO_PRIV_STACK_MEMALIGN_ENTER);
    enter_convention(&ctx, convention::MEMALIGN);
    0
}

#[uprobe]
pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
    keep_task_stack!(&ctx, NO_PRIV_STACK_POSIX_MEMALIGN_ENTER);
    enter_convention(&ctx, convention::POSIX_MEMALIGN);
    0
}

#[uprobe]
pub fn valloc_enter(ctx: ProbeContext) -> u32 {
    keep_task_stack!(&ctx, NO_PRIV_STACK_VALLOC_ENTER);
    enter_convention(&ctx, convention::VALLOC);
    0
}

#[uprobe]
pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
    keep_task_stack!(&ctx, NO_PRIV_STACK_PVALLOC_ENTER);
    enter_convention(&ctx, convention::PVALLOC);
    0
}

#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    keep_task_stack!(&ctx, NO_PRIV_STACK_ALLOC_RETURN);
    on_return(&ctx)
}

/// An allocation call's return: records its block (see `alloc_return`;
/// the uprobe session program's return half runs it too).
#[inline(always)]
pub(crate) fn on_return(ctx: &RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = calls::get(pid_tgid) else {
        return 0;
    };
    let call = unsafe { *call };
    // After `ret` the stack pointer is one slot above the entry's. Any other
    // value means this is the return of an inner call: the outer one decides.
    if stack_pointer(ctx.regs) != call.entry_sp.wrapping_add(8) {
        return 0;
    }
    forget_call(pid_tgid);
    let ret: u64 = ctx.ret();

    if call.kind == CallKind::PosixMemalign as u32 {
        if call.flags & IN_FLIGHT_UNSAMPLED != 0 {
            return 0;
        }
        if ret as u32 != 0 || call.ptr_arg == 0 {
            count(Counter::FailedAllocs);
            return 0;
        }
        let block_addr = unsafe { bpf_probe_read_user(call.ptr_arg as *const u64) }.unwrap_or(0);
        if block_addr != 0 {
            record_alloc(ctx, pid_tgid, block_addr, call.size);
        }
        return 0;
    }

    if call.has_old != 0 {
        old_blocks_held_add(1u64.wrapping_neg());
        // realloc frees the old block when it returns a new one, and glibc's
        // realloc(p, 0) frees p and returns NULL. A failed realloc frees
        // nothing: the block is recorded again.
        if ret != 0 || call.size == 0 {
            retire(&call.old);
            count(Counter::Frees);
        } else {
            if publish(&block(pid_tgid, call.ptr_arg), &call.old, 0).is_err() {
                retire(&call.old);
                count(Counter::AllocMapFull);
            }
        }
    }
    if ret == 0 {
        if call.size != 0 || call.kind != CallKind::Realloc as u32 {
            count(Counter::FailedAllocs);
        }
        return 0;
    }
    if call.flags & IN_FLIGHT_UNSAMPLED != 0 {
        return 0;
    }
    record_alloc(ctx, pid_tgid, ret, call.size);
    0
}

#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    keep_task_stack!(&ctx, NO_PRIV_STACK_FREE_ENTER);
    on_free(&ctx, arg(&ctx, 0, 0));
    0
}

/// A call that frees block `ptr`.
///
/// The block's record is looked up first: most frees either find one (exact
/// mode) or are of a block never recorded (an unsampled one under
/// `--sample-rate`), and the latter then cost that one lookup. A record is
/// only ever made for a traced process's call, so a found one needs no
/// `TARGETS` check.
#[inline(always)]
fn on_free(ctx: &ProbeContext, ptr: u64) -> u32 {
    if ptr == 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let key = block(pid_tgid, ptr);
    // Sampling: most blocks freed were never sampled, and the filter says
    // so without the lookup.
    let found = if filter_maybe(&key) {
        unsafe { ALLOCS.get(&key) }
    } else {
        None
    };
    let Some(record) = found else {
        // A realloc left without returning (see `abandon`) may hold this
        // block's record: the thread's call record settles it first. (Under
        // sampling, looked up only while some record holds an old block.)
        if old_blocks_held() && calls::get(pid_tgid).is_some() {
            return free_unknown(ctx, pid_tgid, key);
        }
        // Sampling: the programs run only in the processes they are attached
        // to, and most frees there are of unsampled blocks: counted without
        // another lookup. Exact mode counts only a traced process's.
        if sample::rate() != 0 || is_target((pid_tgid >> 32) as u32) {
            count(Counter::UnknownFrees);
        }
        return 0;
    };
    let record = *record;
    // free called from inside realloc: the realloc's return accounts for it.
    if is_inner_call(pid_tgid, stack_pointer(ctx.regs)) {
        return 0;
    }
    settle_free(key, &record);
    0
}

/// A free of a block not found while the thread had a call record: the
/// full check (the record may be an abandoned realloc's, put back here).
#[inline(always)]
fn free_unknown(ctx: &ProbeContext, pid_tgid: u64, key: AllocKey) -> u32 {
    if !is_target((pid_tgid >> 32) as u32) {
        return 0;
    }
    if is_inner_call(pid_tgid, stack_pointer(ctx.regs)) {
        return 0;
    }
    match unsafe { ALLOCS.get(&key) } {
        Some(record) => {
            let record = *record;
            settle_free(key, &record);
        }
        None => count(Counter::UnknownFrees),
    }
    0
}

/// Takes a freed block's record out and its bytes off its stack.
#[inline(always)]
fn settle_free(key: AllocKey, record: &AllocRecord) {
    // Only the caller whose remove succeeds subtracts, so a double free from
    // two threads cannot subtract twice.
    match unpublish(&key) {
        Ok(()) => {
            retire(record);
            count(Counter::Frees);
        }
        // Removed by the other free of a double free.
        Err(err) if err == -ENOENT => {}
        Err(_) => count(Counter::LostFrees),
    }
}

#[inline(always)]
fn record_alloc(ctx: &RetProbeContext, pid_tgid: u64, addr: u64, size: u64) {
    let key = block(pid_tgid, addr);
    let stack = stack::capture(ctx);
    let record = AllocRecord {
        size,
        stack_id: stack.id,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        slot: stack.slot,
        _pad: 0,
    };
    // Count before the record is published: a free can only find a record
    // whose block is already counted, so a slot's outstanding count is never
    // below its number of live records. Reclamation relies on that: a slot
    // whose count is 0 has no live record that could still subtract from it.
    // Exact mode: (size, 1). Sampling: what the block stands for.
    let (bytes, blocks) = sample::weights(size, record.timestamp_ns);
    add_to_slot(stack.slot, bytes, blocks);
    // Published only if the address is not recorded: the usual case, in one
    // map operation instead of a lookup and an insert.
    let published = match publish(&key, &record, BPF_NOEXIST as u64) {
        Err(err) if err == -EEXIST => {
            // An address that is still recorded was freed behind our back;
            // retire it so its bytes do not stay counted forever.
            if let Some(old) = unsafe { ALLOCS.get(&key) } {
                let old = *old;
                if unpublish(&key).is_ok() {
                    retire(&old);
                    count(Counter::MissedFrees);
                }
            }
            publish(&key, &record, 0)
        }
        other => other,
    };
    if published.is_err() {
        add_to_slot(stack.slot, bytes.wrapping_neg(), blocks.wrapping_neg());
        count(Counter::AllocMapFull);
        warn_once_map_full(ctx);
        return;
    }
    count(Counter::Allocs);
}

#[inline(always)]
fn warn_once_map_full(ctx: &RetProbeContext) {
    let first_on_this_cpu = COUNTERS
        .get(Counter::AllocMapFull as u32)
        .is_some_and(|n| *n == 1);
    if first_on_this_cpu {
        warn!(
            ctx,
            "allocation map full: further allocations are counted, not tracked"
        );
    }
}

/// Adds `bytes`/`blocks` (negative: wrapped) to a slot's outstanding and
/// total counters.
#[inline(always)]
fn add_to_slot(slot: u32, bytes: u64, blocks: u64) {
    let Some(stats) = STACK_STATS.get_ptr_mut(slot) else {
        count(Counter::StackStatsFull);
        return;
    };
    unsafe {
        atomic_add(&raw mut (*stats).outstanding_bytes, bytes);
        atomic_add(&raw mut (*stats).outstanding_count, blocks);
        atomic_add(&raw mut (*stats).total_bytes, bytes);
        atomic_add(&raw mut (*stats).total_count, blocks);
    }
}

/// Takes a freed block out of its stack's outstanding totals, in the slot it
/// was counted in.
///
/// A live block is counted before its record is published, so its slot
/// holds at least the block. If it holds less, some count went wrong: the
/// free is counted as unmatched and not subtracted, so that no outstanding
/// counter goes below zero (and wraps) on any kernel. (Only a check: BPF
/// has no atomic compare-and-subtract before 5.12.)
#[inline(always)]
fn retire(record: &AllocRecord) {
    let Some(stats) = STACK_STATS.get_ptr_mut(record.slot) else {
        count(Counter::UnmatchedFrees);
        return;
    };
    // Exact mode: (size, 1). Sampling: what the block stood for.
    let (bytes, blocks) = sample::weights(record.size, record.timestamp_ns);
    unsafe {
        let held_bytes = core::ptr::read_volatile(&raw const (*stats).outstanding_bytes);
        let held_blocks = core::ptr::read_volatile(&raw const (*stats).outstanding_count);
        if held_bytes < bytes || held_blocks < blocks {
            count(Counter::UnmatchedFrees);
            return;
        }
        atomic_add(&raw mut (*stats).outstanding_bytes, bytes.wrapping_neg());
        atomic_add(&raw mut (*stats).outstanding_count, blocks.wrapping_neg());
    }
}

#[inline(always)]
unsafe fn atomic_add(field: *mut u64, value: u64) {
    // The bpf target has no `AtomicU64::fetch_add`; the intrinsic lowers to
    // the BPF atomic add instruction.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, value) };
}
