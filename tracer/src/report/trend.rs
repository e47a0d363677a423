//! Is a stack leaking? Its trend, from the history of its settled bytes
//! (blocks at least 1 s old, so churn does not count; see `model::History`)
//! and the age of its oldest block. Pure: a series in, a `Trend` out.
//!
//! The recent part of the history (its last third, 8 s to 10 min) is tested
//! for a monotonic trend with Mann-Kendall's statistic (the share of pairs
//! of points that rise, against what noise would give) and its slope is
//! Theil-Sen's (the median of the pairwise slopes): both ignore one-off
//! steps and outliers, so a table loaded once or a burst of churn is not a
//! trend, while a slow leak under noise becomes one as points accumulate.
//! A stack whose level rose earlier in the history but is flat now is a
//! plateau: a cache that filled, or a leak that stopped.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrendKind {
    /// Outstanding bytes rise steadily (and, for full confidence, the old
    /// blocks are not freed).
    Growing,
    /// Rose, then flat: a cache that filled up, or a leak that stopped.
    Plateau,
    /// Flat since first seen.
    Steady,
    /// Falling.
    Shrinking,
    /// Too little history to say.
    New,
}

impl TrendKind {
    pub fn name(self) -> &'static str {
        match self {
            TrendKind::Growing => "growing",
            TrendKind::Plateau => "plateau",
            TrendKind::Steady => "steady",
            TrendKind::Shrinking => "shrinking",
            TrendKind::New => "new",
        }
    }

    pub const ALL: [TrendKind; 5] = [
        TrendKind::Growing,
        TrendKind::Plateau,
        TrendKind::Steady,
        TrendKind::Shrinking,
        TrendKind::New,
    ];

    /// Order of concern, for sorting: growing first.
    pub fn rank(self) -> u8 {
        match self {
            TrendKind::Growing => 4,
            TrendKind::Plateau => 3,
            TrendKind::New => 2,
            TrendKind::Steady => 1,
            TrendKind::Shrinking => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trend {
    pub kind: TrendKind,
    /// Slope of the recent history (Theil-Sen), settled bytes per second.
    pub bytes_per_second: f64,
    /// In [0, 1]: rises with the length of the history, the strength of
    /// the trend against noise and, for `growing`, old blocks kept.
    pub confidence: f64,
}

impl Trend {
    pub fn new_stack(bytes_per_second: f64) -> Trend {
        Trend {
            kind: TrendKind::New,
            bytes_per_second,
            confidence: 0.0,
        }
    }

    /// For sorting: kind first, then rate weighted by confidence.
    pub fn sort_value(&self) -> f64 {
        self.kind.rank() as f64 * 1e18 + self.bytes_per_second * self.confidence
    }

    /// A leak suspect: growing with at least this confidence.
    pub fn is_leak_suspect(&self) -> bool {
        self.kind == TrendKind::Growing && self.confidence >= SUSPECT_CONFIDENCE
    }
}

/// `Trend::is_leak_suspect`'s threshold.
pub const SUSPECT_CONFIDENCE: f64 = 0.5;
/// Below this much history, or this many points, a stack is `new`.
pub const MIN_SPAN_S: f64 = 6.0;
/// (Mann-Kendall cannot reach `Z_TREND` on fewer than 6 points: the
/// recent window always holds at least this many.)
pub const MIN_POINTS: usize = 6;
/// The recent window: the last third of the history, within these bounds.
const RECENT_MIN_S: f64 = 8.0;
const RECENT_MAX_S: f64 = 600.0;
/// A change smaller than this over the recent window is no trend.
const MIN_CHANGE_BYTES: f64 = 1024.0;
/// Mann-Kendall z from which a rise or fall is a trend (p < 0.01 one-sided:
/// the test runs at every refresh of every stack, so chance trends must be rare).
const Z_TREND: f64 = 2.5;
/// History over which confidence reaches its full weight.
const FULL_EVIDENCE_S: f64 = 15.0;

/// The trend of one stack. `points`: (monotonic ns, settled bytes), oldest
/// first; `oldest_age_s`: age of its oldest outstanding block, if known.
pub fn classify(points: &[(u64, u64)], oldest_age_s: Option<f64>) -> Trend {
    let series: Vec<(f64, f64)> = points
        .iter()
        .map(|&(t, v)| (t as f64 / 1e9, v as f64))
        .collect();
    let (Some(first), Some(last)) = (series.first(), series.last()) else {
        return Trend::new_stack(0.0);
    };
    let span = last.0 - first.0;
    if series.len() < MIN_POINTS || span < MIN_SPAN_S {
        return Trend::new_stack(theil_sen(&series).unwrap_or(0.0));
    }
    let window = (span / 3.0).clamp(RECENT_MIN_S, RECENT_MAX_S);
    let from = series
        .iter()
        .position(|p| p.0 >= last.0 - window)
        .unwrap_or(0)
        .min(series.len() - MIN_POINTS);
    let recent = series[from..].to_vec();
    let recent_span = last.0 - recent[0].0;
    let slope = theil_sen(&recent).unwrap_or(0.0);
    let z = mann_kendall_z(&recent);
    let noise = residual_spread(&recent, slope);
    let change = slope * recent_span;
    let significant = change.abs() >= MIN_CHANGE_BYTES.max(noise);
    // Still moving now: the latest half of the window goes the same way at
    // half the pace or more (a cache that filled, a leak that stopped: no).
    let latest: Vec<(f64, f64)> = recent
        .iter()
        .copied()
        .filter(|p| p.0 >= last.0 - recent_span / 2.0)
        .collect();
    let latest_slope = theil_sen(&latest).unwrap_or(0.0);
    // (Under three points there, too few to tell: not held against it.)
    let still = latest.len() < 3 || latest_slope / slope >= 0.5;
    let evidence = (span / FULL_EVIDENCE_S).min(1.0);
    let strength = |z: f64| ((z.abs() - 1.5) / 2.0).clamp(0.0, 1.0);
    let round = |c: f64| (c * 100.0).round() / 100.0;

    if significant && still && slope > 0.0 && z >= Z_TREND {
        // A leak keeps its old blocks: its oldest block is about as old as
        // the rise. A backlog that is drained oldest first is growth too,
        // but less surely a leak.
        let old_kept = oldest_age_s.map_or(0.8, |age| if age >= 0.5 * span { 1.0 } else { 0.4 });
        return Trend {
            kind: TrendKind::Growing,
            bytes_per_second: slope,
            confidence: round(strength(z) * evidence * old_kept),
        };
    }
    if significant && still && slope < 0.0 && z <= -Z_TREND {
        return Trend {
            kind: TrendKind::Shrinking,
            bytes_per_second: slope,
            confidence: round(strength(z) * evidence),
        };
    }
    // No trend now: did it rise before? Compare the recent level with the
    // start of the history (zero at attach, for a stack that allocated
    // since: see `model::History`).
    let start = first.1;
    let now = median(recent.iter().map(|p| p.1).collect());
    let flatness = (1.0 - z.abs() / Z_TREND).clamp(0.0, 1.0);
    let settled_for = (recent_span / RECENT_MIN_S).min(1.0);
    let kind = if now - start >= MIN_CHANGE_BYTES.max(4.0 * noise) {
        TrendKind::Plateau
    } else {
        TrendKind::Steady
    };
    Trend {
        kind,
        bytes_per_second: slope,
        confidence: round(evidence * settled_for * (0.5 + 0.5 * flatness)),
    }
}

/// The trend of a stack of `history`. A stack that grows or shrinks while
/// its allocation site as a whole does not (a cache refilled from another
/// call path than the one that filled it) takes its site's trend.
pub fn of_stack(
    history: &crate::model::History,
    stack_id: u64,
    oldest_age_s: Option<f64>,
) -> Trend {
    let own = classify(history.series(stack_id), oldest_age_s);
    if !matches!(own.kind, TrendKind::Growing | TrendKind::Shrinking) {
        return own;
    }
    match history.site_series(stack_id) {
        Some(site) => {
            let site = classify(site, oldest_age_s);
            if site.kind == own.kind {
                own
            } else {
                site
            }
        }
        None => own,
    }
}

/// Median of the pairwise slopes (per second); None under two distinct times.
fn theil_sen(points: &[(f64, f64)]) -> Option<f64> {
    let mut slopes = Vec::with_capacity(points.len() * points.len() / 2);
    for (i, a) in points.iter().enumerate() {
        for b in &points[i + 1..] {
            if b.0 > a.0 {
                slopes.push((b.1 - a.1) / (b.0 - a.0));
            }
        }
    }
    (!slopes.is_empty()).then(|| median(slopes))
}

/// Mann-Kendall's z: S (rising pairs minus falling pairs) over its
/// standard deviation under no trend, with continuity correction.
fn mann_kendall_z(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let mut s = 0.0;
    for (i, a) in points.iter().enumerate() {
        for b in &points[i + 1..] {
            s += (b.1 - a.1).signum() * ((b.1 != a.1) as u8 as f64);
        }
    }
    let variance = n * (n - 1.0) * (2.0 * n + 5.0) / 18.0;
    if variance <= 0.0 || s == 0.0 {
        return 0.0;
    }
    (s - s.signum()) / variance.sqrt()
}

/// Median absolute deviation from the line of `slope` through the median
/// intercept: how far points stray from the trend.
fn residual_spread(points: &[(f64, f64)], slope: f64) -> f64 {
    let intercept = median(points.iter().map(|p| p.1 - slope * p.0).collect());
    median(
        points
            .iter()
            .map(|p| (p.1 - slope * p.0 - intercept).abs())
            .collect(),
    )
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One point a second for `seconds`, valued by `f(second)`.
    fn series(seconds: u64, f: impl Fn(u64) -> f64) -> Vec<(u64, u64)> {
        (0..=seconds)
            .map(|t| (t * 1_000_000_000 + 7, f(t).max(0.0) as u64))
            .collect()
    }

    /// Deterministic noise in [-1, 1].
    fn noise(t: u64) -> f64 {
        let x = (t.wrapping_mul(2_654_435_761) ^ 0x5bd1e995) % 2001;
        x as f64 / 1000.0 - 1.0
    }

    fn kind(points: &[(u64, u64)], age: Option<f64>) -> TrendKind {
        classify(points, age).kind
    }

    #[test]
    fn too_little_history_is_new() {
        assert_eq!(kind(&[], None), TrendKind::New);
        let short = series(2, |t| t as f64 * 10_000.0);
        let trend = classify(&short, None);
        assert_eq!(trend.kind, TrendKind::New);
        assert_eq!(trend.confidence, 0.0);
        assert_eq!(trend.bytes_per_second, 10_000.0);
    }

    #[test]
    fn a_steady_leak_is_growing_with_confidence_rising_with_time() {
        let leak = |t: u64| 5120.0 * t as f64;
        let early = classify(&series(6, leak), Some(6.0));
        let later = classify(&series(30, leak), Some(30.0));
        assert_eq!(early.kind, TrendKind::Growing);
        assert_eq!(later.kind, TrendKind::Growing);
        assert!(early.confidence < later.confidence, "{early:?} {later:?}");
        assert!(later.confidence >= 0.9, "{later:?}");
        assert!((later.bytes_per_second - 5120.0).abs() < 1.0, "{later:?}");
    }

    #[test]
    fn noise_alone_is_steady() {
        for amplitude in [100.0, 100_000.0] {
            let flat = series(60, |t| 1_000_000.0 + amplitude * noise(t));
            let trend = classify(&flat, Some(60.0));
            assert_eq!(trend.kind, TrendKind::Steady, "{amplitude}: {trend:?}");
            assert!(trend.confidence > 0.5, "{trend:?}");
        }
    }

    #[test]
    fn churn_is_never_growing() {
        // Settled bytes of short-lived blocks: zero most of the time, a
        // burst now and then, from the first second on.
        for seconds in 0..=60 {
            let churn = series(seconds, |t| if noise(t) > 0.6 { 4e6 } else { 0.0 });
            assert_ne!(
                kind(&churn, Some(1.5)),
                TrendKind::Growing,
                "at {seconds} s"
            );
            // Blocks living a few seconds: a level that fills within the
            // first seconds, then stays, noisy.
            let lived = series(seconds, |t| (t.min(3) as f64 / 3.0) * 3e6 + 5e5 * noise(t));
            assert_ne!(
                kind(&lived, Some(3.0)),
                TrendKind::Growing,
                "at {seconds} s"
            );
        }
    }

    #[test]
    fn a_slow_leak_under_churn_is_found_given_time() {
        // 200 B/s under noise of +-20 KiB.
        let slow = |t: u64| 50_000.0 + 200.0 * t as f64 + 20_000.0 * noise(t);
        let soon = classify(&series(10, slow), Some(10.0));
        assert_ne!(soon.kind, TrendKind::Growing, "too soon to tell: {soon:?}");
        let late = classify(&series(600, slow), Some(600.0));
        assert_eq!(late.kind, TrendKind::Growing, "{late:?}");
        assert!((late.bytes_per_second - 200.0).abs() < 60.0, "{late:?}");
    }

    #[test]
    fn a_slow_leak_is_found_through_the_thinned_history() {
        use crate::model::{History, Snapshot, StackSample};
        let mut history = History::since(0);
        for t in 1..=900u64 {
            let bytes = 50_000.0 + 200.0 * t as f64 + 20_000.0 * noise(t);
            history.record(&Snapshot {
                taken_ns: t * 1_000_000_000,
                stacks: vec![StackSample {
                    stack_id: 1,
                    count: 1,
                    settled_bytes: Some(bytes as u64),
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        let trend = classify(history.series(1), Some(900.0));
        assert_eq!(trend.kind, TrendKind::Growing, "{trend:?}");
    }

    #[test]
    fn a_one_off_step_is_a_plateau_not_growth() {
        let step = series(40, |t| if t >= 10 { 2e6 } else { 1e5 });
        for seconds in [12, 20, 40] {
            let trend = classify(&step[..=seconds], Some(seconds as f64));
            assert_ne!(trend.kind, TrendKind::Growing, "{seconds}: {trend:?}");
        }
        assert_eq!(kind(&step, Some(40.0)), TrendKind::Plateau);
    }

    #[test]
    fn a_cache_that_fills_then_replaces_is_a_plateau() {
        // Fills in 2 s, then entries are replaced: the level dips by the
        // young replacements and returns.
        let cache = series(40, |t| {
            let full = 4e6;
            if t < 2 {
                full * t as f64 / 2.0
            } else {
                full - 3e4 * (1.0 + noise(t))
            }
        });
        for seconds in 0..=40 {
            let trend = classify(&cache[..=seconds], Some(1.0));
            assert_ne!(trend.kind, TrendKind::Growing, "at {seconds} s: {trend:?}");
        }
        let trend = classify(&cache, Some(1.0));
        assert_eq!(trend.kind, TrendKind::Plateau, "{trend:?}");
        assert!(trend.confidence > 0.8, "{trend:?}");
    }

    #[test]
    fn a_leak_that_stops_becomes_a_plateau() {
        let stopped = series(90, |t| 10_000.0 * t.min(30) as f64);
        assert_eq!(kind(&stopped[..=25], Some(25.0)), TrendKind::Growing);
        assert_eq!(kind(&stopped, Some(90.0)), TrendKind::Plateau);
    }

    #[test]
    fn a_cache_refilled_from_another_path_is_a_plateau_in_both() {
        use crate::model::{History, Snapshot, StackSample};
        let mut history = History::since(0);
        // Stack 1 fills 1 MiB in 2 s; from then on stack 2 replaces its
        // entries, 20 KiB a second; both allocate at site 7.
        for t in 1..=30u64 {
            let filled = if t <= 2 { (t * 512) << 10 } else { 1 << 20 };
            let replaced = ((t.saturating_sub(2) * 20) << 10).min(filled);
            let stack = |id, bytes| StackSample {
                stack_id: id,
                count: 1,
                settled_bytes: Some(bytes),
                ..Default::default()
            };
            history.record_by_site(
                &Snapshot {
                    taken_ns: t * 1_000_000_000,
                    stacks: vec![stack(1, filled - replaced), stack(2, replaced)],
                    ..Default::default()
                },
                |_| 7,
            );
        }
        assert_eq!(
            classify(history.series(2), Some(28.0)).kind,
            TrendKind::Growing
        );
        for id in [1, 2] {
            let trend = of_stack(&history, id, Some(28.0));
            assert_eq!(trend.kind, TrendKind::Plateau, "{id}: {trend:?}");
        }
        // Alone at its site, a growing stack stays growing.
        let mut alone = History::since(0);
        for t in 1..=30u64 {
            alone.record(&Snapshot {
                taken_ns: t * 1_000_000_000,
                stacks: vec![StackSample {
                    stack_id: 2,
                    count: 1,
                    settled_bytes: Some((t * 20) << 10),
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        assert_eq!(of_stack(&alone, 2, Some(30.0)).kind, TrendKind::Growing);
    }

    #[test]
    fn freeing_is_shrinking() {
        let falling = series(30, |t| 1e6 - 20_000.0 * t as f64);
        let trend = classify(&falling, None);
        assert_eq!(trend.kind, TrendKind::Shrinking, "{trend:?}");
        assert!(trend.bytes_per_second < 0.0);
    }

    #[test]
    fn growth_whose_old_blocks_are_freed_is_less_sure() {
        let rising = series(30, |t| 10_000.0 * t as f64);
        let kept = classify(&rising, Some(30.0));
        let drained = classify(&rising, Some(2.0));
        assert_eq!(drained.kind, TrendKind::Growing);
        assert!(drained.confidence < kept.confidence, "{drained:?} {kept:?}");
        assert!(!drained.is_leak_suspect() || drained.confidence >= SUSPECT_CONFIDENCE);
    }

    #[test]
    fn serializes_as_the_json_report_documents() {
        let trend = Trend {
            kind: TrendKind::Plateau,
            bytes_per_second: 1.5,
            confidence: 0.25,
        };
        assert_eq!(
            serde_json::to_value(trend).unwrap(),
            serde_json::json!({"kind": "plateau", "bytes_per_second": 1.5, "confidence": 0.25})
        );
    }
}
