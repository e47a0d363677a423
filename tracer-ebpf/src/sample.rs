//! Sampling by bytes (`--sample-rate BYTES`): a Poisson process over the
//! bytes allocated, one point every BYTES on average. An
//! allocation of `size` bytes is sampled when a point falls in it, which
//! happens with probability p = 1 - exp(-size / BYTES); only sampled
//! allocations walk their stack and enter the maps, and each counts with
//! weight 1/p (bytes: size/p), which makes the per-stack sums unbiased
//! estimates of the exact ones.
//!
//! Per CPU, the distance to the next point is a countdown of bytes over the
//! allocations made on that CPU, whatever thread makes them. By
//! memorylessness it can be drawn afresh after each sample, and any split
//! of the bytes into streams samples each allocation with the same p,
//! independently of the others (a per-thread countdown, as tcmalloc's,
//! would do as well, but costs a hash lookup per call instead of an array
//! read). The draws come
//! from `SAMPLE_DRAWS`, a table of the exponential distribution's quantiles
//! that userspace fills (BPF has no floating point); the weights from
//! `SAMPLE_WEIGHTS`, size/p tabulated against size/BYTES, interpolated.
//! `SAMPLE_RATE` 0 (the default) is exact mode: everything is recorded
//! with weight 1 and none of this runs.

use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{Array, PerCpuArray},
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

/// Per CPU: bytes left before the next sample; 0 until the CPU's first
/// draw. A program preempted by another on the same CPU may lose one
/// update: the stream then skips or repeats a few bytes, which moves where
/// the next point falls but not the probability of any allocation's.
#[map]
static SAMPLE_COUNTDOWN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

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
/// true when `size` bytes do not reach the next sample; the countdown is
/// then advanced. One array read, before the target check and the call
/// record's lookup. It may also skip an inner call (one made inside a
/// recorded realloc), which the full path would skip without counting
/// down: its bytes then use up part of the stream, which by memorylessness
/// biases no later allocation. False means nothing was changed: take the
/// full path.
#[inline(always)]
pub fn skip_fast(size: u64) -> bool {
    if rate() == 0 {
        return false;
    }
    let Some(left) = SAMPLE_COUNTDOWN.get_ptr_mut(0) else {
        return false;
    };
    unsafe {
        if *left <= size {
            return false;
        }
        *left -= size;
    }
    true
}

/// Whether an allocation of `size` bytes is left out (always false in
/// exact mode). Advances the countdown. Called once the call is known not
/// to be an inner one.
#[inline(always)]
pub fn skip(size: u64) -> bool {
    let rate = rate();
    if rate == 0 {
        return false;
    }
    let Some(left) = SAMPLE_COUNTDOWN.get_ptr_mut(0) else {
        return false;
    };
    unsafe {
        if *left == 0 {
            // This CPU's first allocation: start its countdown.
            *left = draw(rate);
        }
        if *left > size {
            *left -= size;
            return true;
        }
        *left = draw(rate);
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
