//! Sampling by bytes (`--sample-rate BYTES`): a Poisson process over the
//! bytes each thread allocates, one point every BYTES on average. An
//! allocation of `size` bytes is sampled when a point falls in it, which
//! happens with probability p = 1 - exp(-size / BYTES); only sampled
//! allocations walk their stack and enter the maps, and each counts with
//! weight 1/p (bytes: size/p), which makes the per-stack sums unbiased
//! estimates of the exact ones.
//!
//! Per thread, the distance to the next point is a countdown of bytes. By
//! memorylessness it can be drawn afresh after each sample. The draws come
//! from `SAMPLE_DRAWS`, a table of the exponential distribution's quantiles
//! that userspace fills (BPF has no floating point); the weights from
//! `SAMPLE_WEIGHTS`, size/p tabulated against size/BYTES, interpolated.
//! `SAMPLE_RATE` 0 (the default) is exact mode: everything is recorded
//! with weight 1 and none of this runs.

use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{Array, LruHashMap},
};
use tracer_common::{SAMPLE_DRAW_SLOTS, SAMPLE_WEIGHT_SLOTS};

/// Mean bytes between samples; 0: exact mode. Set by userspace at load.
#[unsafe(no_mangle)]
static SAMPLE_RATE: u64 = 0;

/// Quantiles of the exponential distribution with mean `SAMPLE_RATE`, in
/// bytes: entry k holds -ln(1 - k / SLOTS) * rate (the last, for the
/// unbounded tail slice, its start plus one rate). A draw picks a slice at
/// random and a point in it uniformly: a piecewise-linear inverse CDF, whose
/// density is the exponential's to within a fraction of a percent (a plain
/// table of one value per slice is too coarse in the small residuals that
/// decide whether small blocks are sampled).
#[map]
static SAMPLE_DRAWS: Array<u64> = Array::with_max_entries(SAMPLE_DRAW_SLOTS + 1, 0);

/// Slot i holds rate * f(i / STEPS) with f(x) = x / (1 - exp(-x)): the
/// byte weight size/p of a block of size = rate * i / STEPS.
#[map]
static SAMPLE_WEIGHTS: Array<u64> = Array::with_max_entries(SAMPLE_WEIGHT_SLOTS, 0);

/// Per thread (pid_tgid): bytes left before the next sample, and whether the
/// thread may have a call record (`calls`). LRU: a dead thread's entry
/// ages out.
#[map]
static SAMPLE_COUNTDOWN: LruHashMap<u64, Countdown> = LruHashMap::with_max_entries(16384, 0);

/// `in_flight` is 0 only while the thread has no call record that could
/// make its next call an inner one: set after each record is made, cleared
/// when one is settled or found stale. All of a thread's entries are only
/// written by its own programs, which never run two at a time. An entry
/// that is missing (new thread, evicted) says nothing: the caller then
/// takes the full path.
#[repr(C)]
#[derive(Clone, Copy)]
struct Countdown {
    left: u64,
    in_flight: u64,
}

#[inline(always)]
pub fn rate() -> u64 {
    unsafe { core::ptr::read_volatile(&SAMPLE_RATE) }
}

#[inline(always)]
fn draw(rate: u64) -> u64 {
    let random = unsafe { bpf_get_prandom_u32() };
    // High bits pick the slice, the low 16 the point in it.
    let slot = (random >> 16) % SAMPLE_DRAW_SLOTS;
    let (Some(lo), Some(hi)) = (
        SAMPLE_DRAWS.get(slot).copied(),
        SAMPLE_DRAWS.get(slot + 1).copied(),
    ) else {
        return rate;
    };
    let d = lo + ((hi.saturating_sub(lo) * (random & 0xffff) as u64) >> 16);
    if d == 0 {
        1
    } else {
        d
    }
}

/// The fast path of an unsampled call that cannot nest (sampling only):
/// true when the thread is known to be in no recorded call and `size` bytes
/// do not reach its next sample; the countdown is then advanced. One map
/// lookup, instead of the target check, the call-record lookup and this one.
/// False means nothing was changed: take the full path.
#[inline(always)]
pub fn skip_fast(pid_tgid: u64, size: u64) -> bool {
    if rate() == 0 {
        return false;
    }
    let Some(c) = SAMPLE_COUNTDOWN.get_ptr_mut(pid_tgid) else {
        return false;
    };
    unsafe {
        if (*c).in_flight != 0 || (*c).left <= size {
            return false;
        }
        (*c).left -= size;
    }
    true
}

/// The thread's call record was made (`made`) or settled: see `Countdown`.
#[inline(always)]
pub fn set_in_flight(pid_tgid: u64, made: bool) {
    if rate() == 0 {
        return;
    }
    if let Some(c) = SAMPLE_COUNTDOWN.get_ptr_mut(pid_tgid) {
        unsafe { (*c).in_flight = made as u64 };
    }
}

/// Whether this thread's allocation of `size` bytes is left out (always
/// false in exact mode). Advances the thread's countdown. Called once the
/// call is known not to be an inner one: no live call record is left.
#[inline(always)]
pub fn skip(pid_tgid: u64, size: u64) -> bool {
    let rate = rate();
    if rate == 0 {
        return false;
    }
    let Some(c) = SAMPLE_COUNTDOWN.get_ptr_mut(pid_tgid) else {
        // A thread's first allocation: start its countdown.
        let left = draw(rate);
        if left > size {
            let _ = SAMPLE_COUNTDOWN.insert(
                pid_tgid,
                Countdown {
                    left: left - size,
                    in_flight: 0,
                },
                0,
            );
            return true;
        }
        let _ = SAMPLE_COUNTDOWN.insert(
            pid_tgid,
            Countdown {
                left: draw(rate),
                in_flight: 0,
            },
            0,
        );
        return false;
    };
    unsafe {
        (*c).in_flight = 0;
        if (*c).left > size {
            (*c).left -= size;
            return true;
        }
        (*c).left = draw(rate);
    }
    false
}

/// (bytes, blocks) that a recorded block of `size` bytes stands for: itself
/// in exact mode, its weight 1/p when sampling. The block count is rounded
/// up or down at random in proportion, keyed on `key` (the block's
/// timestamp) so that retiring the block subtracts what was added.
#[inline(always)]
pub fn weights(size: u64, key: u64) -> (u64, u64) {
    tracer_common::sampled_weights(size, key, rate(), |i| SAMPLE_WEIGHTS.get(i as u32).copied())
}
