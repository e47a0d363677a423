//! The report: a symbolized selection of a Snapshot, in the shape the JSON
//! output documents (see README "JSON report"). Building it needs the frames
//! of each stack, passed in as a function so this module stays pure.

pub mod diff;
pub mod label;
pub mod memory;
pub mod trend;

use serde::{Deserialize, Serialize};
use tracer_common::is_unknown_stack;

use crate::{
    model::{Counters, Snapshot},
    symbolize::Frame,
};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub pid: u32,
    pub command: String,
    /// Seconds since the probes were attached.
    pub duration_s: f64,
    /// Blocks younger than this were left out.
    pub min_age_s: f64,
    /// The object whose allocator was probed, and the functions probed in it
    /// (the primary allocator: the one `malloc` binds to).
    pub allocator: AllocatorInfo,
    /// Every object probed, the primary allocator first: prefixed
    /// allocators (`je_malloc`, `mi_malloc`...) may live in other objects.
    #[serde(default)]
    pub allocators: Vec<AllocatorInfo>,
    /// Outstanding memory over all stacks (not only those listed).
    pub totals: Totals,
    /// Stacks listed (`--top`), most bytes first.
    pub stacks: Vec<StackReport>,
    /// Number of stacks holding memory, listed or not.
    pub stack_count: usize,
    pub dropped: Dropped,
    pub events: Events,
    /// Anonymous memory the process mapped itself (mmap family), beside
    /// the heap: not part of `totals`.
    #[serde(default)]
    pub mappings: MappingsReport,
    /// Every process traced (several with `--pid` repeated, `--comm` or
    /// `--follow-forks`), the first one `pid`; each stack names its own.
    #[serde(default)]
    pub processes: Vec<ProcessReport>,
    /// Where memory went since attach, over every process (see `memory.rs`).
    #[serde(default)]
    pub memory: memory::MemoryReport,
    /// How stacks were walked, how many were whole, what the unwind tables
    /// take.
    #[serde(default)]
    pub unwinding: UnwindingReport,
}

/// Stack quality and the cost of CFI unwinding.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct UnwindingReport {
    /// "cfi" (the default) or "fp".
    pub mode: String,
    /// Share of allocations whose stacks reached an outermost frame
    /// (`_start`, a thread's start), 0 to 1; null before any allocation.
    /// Lower means stacks were cut (code without CFI or frame pointers).
    pub whole_stacks: Option<f64>,
    /// Kernel memory the unwind tables take (rows allocated at load, plus
    /// one mapping table per process), and the rows in use.
    pub tables_bytes: u64,
    pub rows_bytes_used: u64,
    /// Objects with unwind rows (each compiled once, shared by processes).
    pub objects: usize,
}

/// One traced process: its share of the totals, and what became of it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ProcessReport {
    pub pid: u32,
    /// The process that forked it, when it was followed from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u32>,
    pub command: String,
    /// "running"; "exited" (with `exit_code` when known); "exec": it
    /// replaced its program, whose memory went with it, and is listed again
    /// as the new program.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The object whose allocator was probed in this process.
    pub allocator: AllocatorInfo,
    /// Outstanding heap memory of this process's stacks.
    pub totals: Totals,
    pub stack_count: usize,
    /// Where this process's memory went since attach.
    #[serde(default)]
    pub memory: memory::MemoryReport,
}

/// Anonymous mappings (mmap, mremap) the process made outside its
/// allocator, still mapped, per stack; and the program break's growth.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MappingsReport {
    /// False when the syscall tracepoints could not be attached (no
    /// tracefs): everything below is then empty.
    pub traced: bool,
    /// Bytes still mapped, over all stacks.
    pub bytes: u64,
    /// Mappings (mmap or mremap calls) still at least partly mapped.
    pub mappings: u64,
    /// Stacks holding mappings, listed or not.
    pub stack_count: usize,
    /// The `--top` stacks, most bytes first, in the heap stacks' shape:
    /// `allocations` counts mappings, `frames[0]` is the function that
    /// called mmap or mremap.
    pub stacks: Vec<StackReport>,
    /// Program break now minus at attach (brk/sbrk; glibc's main heap grows
    /// there). Its own total: part of neither the heap nor the mappings.
    pub brk_growth_bytes: i64,
    /// Events lost (ring buffer full) and stacks not stored: non-zero
    /// means the mapping totals may be wrong.
    pub lost_events: u64,
    pub lost_stacks: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AllocatorInfo {
    pub object: String,
    pub functions: Vec<String>,
    /// Set with `--sample-rate`: allocations were sampled, one every this
    /// many bytes on average, and every byte and block figure of the report
    /// is an unbiased estimate, not an exact count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_rate_bytes: Option<u64>,
    /// True when the figures are estimates (sampling).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Totals {
    pub bytes: u64,
    pub allocations: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StackReport {
    /// Stable id of the stack within this run (hex), "unknown" for blocks
    /// whose stack could not be captured.
    pub stack_id: String,
    /// The process whose stack it is.
    #[serde(default)]
    pub pid: u32,
    pub bytes: u64,
    pub allocations: u64,
    pub total_allocations: u64,
    pub total_bytes: u64,
    pub oldest_age_s: Option<f64>,
    /// The stack was deeper than the tracer records; outer frames are missing.
    pub truncated: bool,
    /// Innermost first; the first frame is the allocator's caller.
    pub frames: Vec<ReportFrame>,
    /// Is it leaking: judged on the history of its settled bytes since
    /// attach (see `trend.rs`). Absent without history (a single report)
    /// and for mappings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trend: Option<trend::Trend>,
    /// Index in `frames` of the frame one-line labels name: the first past
    /// allocation wrappers (`xmalloc`, `operator new`...; see `label.rs`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub label_frame: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl StackReport {
    /// The frame labels name (None: no frames).
    pub fn label(&self) -> Option<&ReportFrame> {
        self.frames.get(self.label_frame).or(self.frames.first())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReportFrame {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    /// Hex address in the process.
    pub address: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
    /// Its function's code only calls the allocator (see `label.rs`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wraps_allocator: bool,
}

impl From<&Frame> for ReportFrame {
    fn from(f: &Frame) -> Self {
        ReportFrame {
            function: f.function.clone(),
            file: f.file.clone(),
            line: f.line,
            module: f.module.clone(),
            address: format!("{:#x}", f.address),
            inlined: f.inlined,
            wraps_allocator: f.wraps_allocator,
        }
    }
}

/// What the tracer could not track. Non-zero values mean totals are lower
/// bounds.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Dropped {
    /// Allocations not tracked: the per-address map was full (`--max-allocations`).
    pub untracked_allocations: u64,
    /// Allocations tracked under the "unknown" stack: the stack could not be
    /// captured or the stack map was full (`--max-stacks`).
    pub lost_stacks: u64,
    /// Allocations tracked by address but not per stack: the per-stack map was full.
    pub stack_stats_full: u64,
    /// Allocator calls not followed: too many threads inside the allocator at once.
    pub in_flight_full: u64,
    /// A block's address was handed out again without its free being seen;
    /// the old block was retired.
    pub missed_frees: u64,
    /// Frees whose block's stack held less than the block: not subtracted,
    /// so no count goes below zero. (Absent from reports of older tracers.)
    #[serde(default)]
    pub unmatched_frees: u64,
    /// Frees lost because the kernel refused to remove the block's record
    /// (a map lock that gave up, 6.15+ kernels): the block stays counted.
    #[serde(default)]
    pub lost_frees: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Events {
    pub allocations: u64,
    pub frees: u64,
    /// Frees of blocks allocated before attach (ignored). 0 when sampling:
    /// those are among `unsampled_frees`.
    pub untracked_frees: u64,
    pub failed_allocations: u64,
    /// With `--sample-rate`: frees of blocks that were not sampled, most
    /// frees, or allocated before attach (the two look the same). Expected,
    /// not a loss. Absent in exact mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsampled_frees: Option<u64>,
}

impl Dropped {
    pub fn from_counters(c: &Counters) -> Self {
        Dropped {
            untracked_allocations: c.alloc_map_full,
            lost_stacks: c.stack_lost,
            stack_stats_full: c.stack_stats_full,
            in_flight_full: c.in_flight_full,
            missed_frees: c.missed_frees,
            unmatched_frees: c.unmatched_frees,
            lost_frees: c.lost_frees,
        }
    }

    pub fn any(&self) -> bool {
        *self != Dropped::default()
    }
}

/// Everything about the run that is not in the snapshot.
#[derive(Clone, Debug, Default)]
pub struct RunInfo {
    pub pid: u32,
    pub command: String,
    pub attached_ns: u64,
    pub min_age_ns: u64,
    /// Every object probed, the primary allocator first.
    pub allocators: Vec<AllocatorInfo>,
    /// Every process traced, `pid` first (empty: just `pid`).
    pub processes: Vec<ProcessInfo>,
    /// Allocation wrappers, to label stacks past them.
    pub labels: label::Labeler,
}

/// A traced process, as reports describe it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub parent: Option<u32>,
    pub command: String,
    pub allocators: Vec<AllocatorInfo>,
    pub state: ProcessState,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProcessState {
    #[default]
    Running,
    Exited(Option<i32>),
    /// Replaced its program (exec); listed again as the new one.
    Replaced,
}

/// Builds a report of the `top` stacks (0 = all). `frames` returns the
/// symbolized frames of a stack id and whether it was truncated.
pub fn build(
    run: &RunInfo,
    snapshot: &Snapshot,
    top: usize,
    frames: impl FnMut(u32, u64) -> (Vec<Frame>, bool),
) -> Report {
    build_from(run, snapshot, snapshot.top(top), frames)
}

/// A report of every stack that allocated since attach, including those
/// whose blocks were all freed (for pprof's alloc_* values).
pub fn build_every_stack(
    run: &RunInfo,
    snapshot: &Snapshot,
    frames: impl FnMut(u32, u64) -> (Vec<Frame>, bool),
) -> Report {
    build_from(run, snapshot, snapshot.every_stack(), frames)
}

/// One stack of a snapshot, symbolized by `frames`.
fn stack_report(
    snapshot: &Snapshot,
    s: &crate::model::StackSample,
    frames: &mut impl FnMut(u32, u64) -> (Vec<Frame>, bool),
) -> StackReport {
    let (stack_frames, truncated) = if is_unknown_stack(s.stack_id) {
        (Vec::new(), false)
    } else {
        frames(s.pid, s.stack_id)
    };
    StackReport {
        stack_id: if is_unknown_stack(s.stack_id) {
            "unknown".to_string()
        } else {
            format!("{:016x}", s.stack_id)
        },
        pid: s.pid,
        bytes: s.bytes,
        allocations: s.count,
        total_allocations: s.total_count,
        total_bytes: s.total_bytes,
        oldest_age_s: snapshot.oldest_age_s(s).map(round_ms),
        truncated,
        trend: None,
        label_frame: 0,
        frames: stack_frames.iter().map(ReportFrame::from).collect(),
    }
}

fn build_from(
    run: &RunInfo,
    snapshot: &Snapshot,
    selected: Vec<&crate::model::StackSample>,
    mut frames: impl FnMut(u32, u64) -> (Vec<Frame>, bool),
) -> Report {
    let stacks = selected
        .into_iter()
        .map(|s| stack_report(snapshot, s, &mut frames))
        .collect();
    let c = &snapshot.counters;
    Report {
        pid: run.pid,
        command: run.command.clone(),
        duration_s: round_ms(snapshot.taken_ns.saturating_sub(run.attached_ns) as f64 / 1e9),
        min_age_s: run.min_age_ns as f64 / 1e9,
        allocator: run.allocators.first().cloned().unwrap_or_default(),
        allocators: run.allocators.clone(),
        totals: Totals {
            bytes: snapshot.total_bytes(),
            allocations: snapshot.total_count(),
        },
        stacks,
        stack_count: snapshot.stacks.iter().filter(|s| s.count > 0).count(),
        dropped: Dropped::from_counters(c),
        events: events(run, c),
        mappings: MappingsReport::default(),
        processes: process_reports(run, snapshot),
        unwinding: UnwindingReport {
            whole_stacks: c.whole_stack_share().map(|s| (s * 1e4).round() / 1e4),
            ..Default::default()
        },
        memory: memory::MemoryReport::default(),
    }
}

/// The event counts. A free of a block the programs never recorded is a
/// block from before attach in exact mode, but most often an unsampled
/// block when sampling: reported apart, so it does not read as a loss.
fn events(run: &RunInfo, c: &Counters) -> Events {
    let sampling = run
        .allocators
        .iter()
        .chain(run.processes.iter().flat_map(|p| p.allocators.iter()))
        .any(|a| a.sample_rate_bytes.is_some());
    Events {
        allocations: c.allocs,
        frees: c.frees,
        untracked_frees: if sampling { 0 } else { c.unknown_frees },
        failed_allocations: c.failed_allocs,
        unsampled_frees: sampling.then_some(c.unknown_frees),
    }
}

/// Each process's share of a snapshot.
fn process_reports(run: &RunInfo, snapshot: &Snapshot) -> Vec<ProcessReport> {
    let only = [ProcessInfo {
        pid: run.pid,
        command: run.command.clone(),
        allocators: run.allocators.clone(),
        ..Default::default()
    }];
    let processes = if run.processes.is_empty() {
        &only[..]
    } else {
        &run.processes[..]
    };
    processes
        .iter()
        .map(|p| {
            // A pid listed twice (exec) has its live stacks under its
            // current program; the replaced one's records were dropped.
            let current = p.state != ProcessState::Replaced;
            let mine = || {
                snapshot
                    .stacks
                    .iter()
                    .filter(move |s| current && s.pid == p.pid && s.count > 0)
            };
            let (state, exit_code) = match p.state {
                ProcessState::Running => ("running", None),
                ProcessState::Exited(code) => ("exited", code),
                ProcessState::Replaced => ("exec", None),
            };
            ProcessReport {
                pid: p.pid,
                parent: p.parent,
                command: p.command.clone(),
                state: state.to_string(),
                exit_code,
                allocator: p.allocators.first().cloned().unwrap_or_default(),
                totals: Totals {
                    bytes: mine().map(|s| s.bytes).sum(),
                    allocations: mine().map(|s| s.count).sum(),
                },
                stack_count: mine().count(),
                memory: memory::MemoryReport::default(),
            }
        })
        .collect()
}

/// The mappings section from per-stack samples (see `mappings.rs`) taken at
/// `taken_ns`: the `top` stacks (0: all) by outstanding bytes.
pub fn build_mappings(
    sample: &crate::collect::mapping_events::MappingSample,
    taken_ns: u64,
    top: usize,
    mut frames: impl FnMut(u32, u64) -> (Vec<Frame>, bool),
) -> MappingsReport {
    let snapshot = Snapshot {
        taken_ns,
        stacks: sample.stacks.clone(),
        ..Default::default()
    };
    let stacks = snapshot
        .top(top)
        .into_iter()
        .map(|s| stack_report(&snapshot, s, &mut frames))
        .collect();
    MappingsReport {
        traced: true,
        bytes: snapshot.total_bytes(),
        mappings: snapshot.total_count(),
        stack_count: snapshot.stacks.iter().filter(|s| s.count > 0).count(),
        stacks,
        brk_growth_bytes: sample.brk_growth,
        lost_events: sample.lost_events,
        lost_stacks: sample.lost_stacks,
    }
}

/// Learns wrappers from the listed stacks, then sets each one's label frame.
pub fn set_labels(report: &mut Report, labeler: &mut label::Labeler) {
    for stack in &report.stacks {
        labeler.observe(stack.frames.iter().map(|f| f.function.as_deref()));
    }
    for stack in &mut report.stacks {
        stack.label_frame = labeler.pick_marked(
            stack
                .frames
                .iter()
                .map(|f| (f.function.as_deref(), f.wraps_allocator)),
        );
    }
}

/// Sets each listed heap stack's trend from `trend(pid, stack id)`.
pub fn set_trends(report: &mut Report, trend: impl Fn(u32, u64) -> Option<trend::Trend>) {
    for stack in &mut report.stacks {
        if let Ok(id) = u64::from_str_radix(&stack.stack_id, 16) {
            stack.trend = trend(stack.pid, id);
        }
    }
}

fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StackSample;

    #[test]
    fn builds_totals_over_all_stacks_and_lists_top() {
        let snapshot = Snapshot {
            taken_ns: 5_000_000_000,
            stacks: vec![
                StackSample {
                    pid: 42,
                    stack_id: 0xabc << 32,
                    bytes: 100,
                    count: 1,
                    total_count: 9,
                    total_bytes: 900,
                    oldest_ns: Some(4_000_000_000),
                    settled_bytes: None,
                },
                StackSample {
                    pid: 42,
                    stack_id: tracer_common::STACK_UNKNOWN,
                    bytes: 50,
                    count: 2,
                    total_count: 2,
                    total_bytes: 50,
                    oldest_ns: None,
                    settled_bytes: None,
                },
                StackSample {
                    pid: 42,
                    stack_id: 0xdef << 32,
                    bytes: 0,
                    count: 0,
                    total_count: 5,
                    total_bytes: 5,
                    oldest_ns: None,
                    settled_bytes: None,
                },
            ],
            counters: Counters {
                stack_lost: 2,
                ..Default::default()
            },
        };
        let run = RunInfo {
            pid: 42,
            command: "demo".into(),
            attached_ns: 1_000_000_000,
            ..Default::default()
        };
        let report = build(&run, &snapshot, 1, |_, id| {
            (
                vec![Frame {
                    function: Some(format!("f{id:x}")),
                    address: 0x10,
                    ..Default::default()
                }],
                false,
            )
        });
        assert_eq!(
            report.totals,
            Totals {
                bytes: 150,
                allocations: 3
            }
        );
        assert_eq!(report.stack_count, 2);
        assert_eq!(report.stacks.len(), 1);
        assert_eq!(report.stacks[0].stack_id, "00000abc00000000");
        assert_eq!(
            report.stacks[0].frames[0].function.as_deref(),
            Some("fabc00000000")
        );
        assert_eq!(report.stacks[0].oldest_age_s, Some(1.0));
        assert_eq!(report.duration_s, 4.0);
        assert_eq!(report.dropped.lost_stacks, 2);
        let all = build(&run, &snapshot, 0, |_, _| (Vec::new(), false));
        assert_eq!(all.stacks[1].stack_id, "unknown");
        let every = build_every_stack(&run, &snapshot, |_, _| (Vec::new(), false));
        assert_eq!(every.stacks.len(), 3, "the freed stack 0xdef too");
        assert_eq!(every.stack_count, 2);
        assert_eq!(every.totals, all.totals);
    }

    #[test]
    fn unrecorded_frees_are_unsampled_frees_when_sampling() {
        let snapshot = Snapshot {
            counters: Counters {
                frees: 3,
                unknown_frees: 1000,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut run = RunInfo {
            allocators: vec![AllocatorInfo::default()],
            ..Default::default()
        };
        let exact = build(&run, &snapshot, 0, |_, _| (Vec::new(), false));
        assert_eq!(exact.events.untracked_frees, 1000);
        assert_eq!(exact.events.unsampled_frees, None);
        let json = serde_json::to_value(&exact).unwrap();
        assert!(json["events"].get("unsampled_frees").is_none(), "{json}");

        run.allocators[0].sample_rate_bytes = Some(4096);
        run.allocators[0].estimated = true;
        let sampled = build(&run, &snapshot, 0, |_, _| (Vec::new(), false));
        assert_eq!(sampled.events.untracked_frees, 0);
        assert_eq!(sampled.events.unsampled_frees, Some(1000));
        assert_eq!(sampled.events.frees, 3);
    }
}
