//! Where did the memory go? A process's resident memory now against at
//! attach, set beside what the tracer saw allocated since attach: heap
//! blocks still outstanding, anonymous mappings still mapped, the program
//! break. What they do not explain is outside the tracer's view. Pure.

use serde::{Deserialize, Serialize};

use crate::model::ResidentMemory;

/// Growth of anonymous and shared resident memory below this is no growth.
pub const NO_GROWTH_BYTES: i64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The traced heap explains most of the growth: look at the stacks.
    Heap,
    /// Anonymous mappings the program made (mmap) or its program break do.
    Mappings,
    /// Neither does: allocator retention or fragmentation, shared memory,
    /// file-backed pages, or an allocator that is not probed.
    Outside,
    /// Resident memory did not grow.
    None,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Heap => "heap",
            Verdict::Mappings => "mappings",
            Verdict::Outside => "outside",
            Verdict::None => "none",
        }
    }

    pub const ALL: [Verdict; 4] = [
        Verdict::Heap,
        Verdict::Mappings,
        Verdict::Outside,
        Verdict::None,
    ];
}

/// The memory of a process (or of all, summed) since attach.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Resident memory now (VmRSS; the last known once the process is gone).
    pub rss_bytes: u64,
    /// Now minus at attach.
    pub rss_change_bytes: i64,
    /// Its parts (RssAnon, RssShmem, RssFile), now minus at attach.
    pub rss_anon_change_bytes: i64,
    pub rss_shared_change_bytes: i64,
    pub rss_file_change_bytes: i64,
    /// Heap bytes allocated since attach and still outstanding.
    pub heap_change_bytes: i64,
    /// Anonymous mappings made since attach and still mapped, plus the
    /// growth of the program break beyond what the traced heap accounts
    /// for (glibc's main heap grows there, so that part is already heap).
    pub mappings_change_bytes: i64,
    /// The growth of anonymous and shared resident memory (file-backed
    /// pages are code and files paged in, not allocations) minus heap and
    /// mappings: what the tracer did not see. Negative when allocated
    /// memory is not resident yet.
    pub unexplained_change_bytes: i64,
    pub verdict: Option<Verdict>,
    /// Set when some allocation path is probably not probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage: Option<Coverage>,
}

/// Signs that allocations escape the probes: an allocator inlined into
/// the program, a static or custom one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Coverage {
    /// What points to it, in a sentence.
    pub reason: String,
    /// Mapped objects that define allocator-looking functions and are not
    /// probed: "OBJECT (f1, f2)".
    #[serde(default)]
    pub unprobed_objects: Vec<String>,
}

/// Frees of unseen blocks are counted from this long after attach: before,
/// blocks allocated before attach are expected to be freed.
pub const LATE_S: f64 = 30.0;

/// Why some allocation path is probably not probed, if anything says so.
/// `late_frees`: (frees, frees of blocks never seen) since `LATE_S` after
/// attach, exact mode only (when sampling, most frees are of unsampled
/// blocks).
pub fn coverage_gap(memory: &MemoryReport, late_frees: Option<(u64, u64)>) -> Option<String> {
    if let Some((frees, unseen)) = late_frees {
        if unseen >= 1000 && unseen * 20 >= frees + unseen {
            return Some(format!(
                "{unseen} frees of blocks the tracer never saw allocated came more than {LATE_S:.0} s after attach ({:.0}% of frees)",
                100.0 * unseen as f64 / (frees + unseen) as f64
            ));
        }
    }
    let growth = memory.growth();
    if memory.verdict == Some(Verdict::Outside)
        && 2 * memory.rss_anon_change_bytes >= growth
        && 10 * memory.heap_change_bytes.max(0) < growth
    {
        return Some(format!(
            "RSS grew by {} of anonymous memory with little traced allocation",
            size(growth)
        ));
    }
    None
}

/// What the tracer saw of one process since attach.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traced {
    pub heap_bytes: u64,
    pub mapped_bytes: u64,
    pub brk_growth: i64,
}

/// Judges one process. `at_attach` or `now` None (unreadable): no verdict.
pub fn judge(
    at_attach: Option<ResidentMemory>,
    now: Option<ResidentMemory>,
    traced: Traced,
) -> MemoryReport {
    let heap = traced.heap_bytes as i64;
    let mappings = traced.mapped_bytes as i64 + (traced.brk_growth - heap).max(0);
    let (Some(start), Some(now)) = (at_attach, now) else {
        return MemoryReport {
            rss_bytes: now.map_or(0, |n| n.rss),
            heap_change_bytes: heap,
            mappings_change_bytes: mappings,
            ..Default::default()
        };
    };
    let change = |a: u64, b: u64| b as i64 - a as i64;
    let mut report = MemoryReport {
        rss_bytes: now.rss,
        rss_change_bytes: change(start.rss, now.rss),
        rss_anon_change_bytes: change(start.anon, now.anon),
        rss_shared_change_bytes: change(start.shmem, now.shmem),
        rss_file_change_bytes: change(start.file, now.file),
        heap_change_bytes: heap,
        mappings_change_bytes: mappings,
        ..Default::default()
    };
    report.verdict = Some(verdict(&report));
    report.unexplained_change_bytes = report.growth() - heap - mappings;
    report
}

impl MemoryReport {
    /// What verdicts judge: the change of anonymous and shared resident
    /// memory (RSS without its file-backed pages).
    pub fn growth(&self) -> i64 {
        self.rss_anon_change_bytes + self.rss_shared_change_bytes
    }
}

fn verdict(r: &MemoryReport) -> Verdict {
    let growth = r.growth();
    if growth < NO_GROWTH_BYTES {
        return Verdict::None;
    }
    let (heap, mappings) = (r.heap_change_bytes.max(0), r.mappings_change_bytes.max(0));
    // "Most of it": half the growth or more, the larger of the two first.
    if heap >= mappings && 2 * heap >= growth {
        Verdict::Heap
    } else if mappings > heap && 2 * mappings >= growth {
        Verdict::Mappings
    } else {
        Verdict::Outside
    }
}

/// Several processes as one (the report's top-level `memory`).
pub fn sum(reports: &[MemoryReport]) -> MemoryReport {
    let mut total = MemoryReport::default();
    let mut judged = false;
    for r in reports {
        total.rss_bytes += r.rss_bytes;
        total.rss_change_bytes += r.rss_change_bytes;
        total.rss_anon_change_bytes += r.rss_anon_change_bytes;
        total.rss_shared_change_bytes += r.rss_shared_change_bytes;
        total.rss_file_change_bytes += r.rss_file_change_bytes;
        total.heap_change_bytes += r.heap_change_bytes;
        total.mappings_change_bytes += r.mappings_change_bytes;
        total.unexplained_change_bytes += r.unexplained_change_bytes;
        judged |= r.verdict.is_some();
    }
    if judged {
        total.verdict = Some(verdict(&total));
    }
    total.coverage = reports.iter().find_map(|r| r.coverage.clone());
    total
}

/// One sentence for a human: what grew and where to look.
pub fn sentence(r: &MemoryReport) -> String {
    let Some(verdict) = r.verdict else {
        return "RSS not readable: no verdict on where memory went".to_string();
    };
    let rss = format!("RSS {} since attach", signed(r.rss_change_bytes));
    let heap = size(r.heap_change_bytes.max(0));
    let mappings = size(r.mappings_change_bytes.max(0));
    match verdict {
        Verdict::None if r.rss_file_change_bytes >= NO_GROWTH_BYTES => format!(
            "{rss}, file-backed pages {}: no growth of anonymous or shared memory to explain",
            signed(r.rss_file_change_bytes)
        ),
        Verdict::None => format!("{rss}: no growth to explain"),
        Verdict::Heap => format!(
            "{rss}; the heap traced since attach explains {heap}: the growth is heap memory, see the stacks below"
        ),
        Verdict::Mappings => format!(
            "{rss}; anonymous mappings and the program break traced since attach explain {mappings}: see the mappings below"
        ),
        Verdict::Outside => {
            let part = if r.rss_shared_change_bytes * 2 >= r.growth() {
                format!("shared memory (RssShmem {})", signed(r.rss_shared_change_bytes))
            } else {
                "allocator retention or fragmentation, or an allocator that is not probed"
                    .to_string()
            };
            format!(
                "{rss}; the traced heap explains {heap} and mappings {mappings}: the growth is outside what the tracer sees, most likely {part}"
            )
        }
    }
}

/// The coverage warning, in a sentence.
pub fn coverage_sentence(c: &Coverage) -> String {
    let mut line = format!(
        "{}: some allocation path is probably not probed (an allocator inlined into the program, a static or custom allocator)",
        c.reason
    );
    if c.unprobed_objects.is_empty() {
        line.push_str("; no mapped object defines allocator-looking functions that are not probed");
    } else {
        line.push_str("; not probed but defining allocator-looking functions: ");
        line.push_str(&c.unprobed_objects.join("; "));
    }
    line
}

fn signed(n: i64) -> String {
    format!("{}{}", if n < 0 { "-" } else { "+" }, size(n.abs()))
}

/// "120 MiB", "512 KiB", "900 B".
fn size(n: i64) -> String {
    let n = n.unsigned_abs();
    match n {
        n if n >= 10 << 20 => format!("{} MiB", n >> 20),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn rss(rss: u64, anon: u64, shmem: u64) -> Option<ResidentMemory> {
        Some(ResidentMemory {
            rss,
            anon,
            file: rss - anon - shmem,
            shmem,
        })
    }

    fn traced(heap: u64, mapped: u64, brk: i64) -> Traced {
        Traced {
            heap_bytes: heap,
            mapped_bytes: mapped,
            brk_growth: brk,
        }
    }

    #[test]
    fn heap_growth_is_heap() {
        let r = judge(
            rss(10 * MIB, 5 * MIB, 0),
            rss(130 * MIB, 125 * MIB, 0),
            traced(118 * MIB, 0, 119 * MIB as i64),
        );
        assert_eq!(r.verdict, Some(Verdict::Heap));
        assert_eq!(r.rss_change_bytes, 120 * MIB as i64);
        assert_eq!(
            r.mappings_change_bytes, MIB as i64,
            "the break beyond the heap"
        );
        assert_eq!(r.unexplained_change_bytes, MIB as i64);
        assert_eq!(
            sentence(&r),
            "RSS +120 MiB since attach; the heap traced since attach explains 118 MiB: \
             the growth is heap memory, see the stacks below"
        );
    }

    #[test]
    fn mapping_growth_is_mappings() {
        let r = judge(
            rss(10 * MIB, 5 * MIB, 0),
            rss(60 * MIB, 55 * MIB, 0),
            traced(MIB, 48 * MIB, 0),
        );
        assert_eq!(r.verdict, Some(Verdict::Mappings));
        assert!(
            sentence(&r).contains("see the mappings below"),
            "{}",
            sentence(&r)
        );
        // A program that moves the break itself (sbrk) grows mappings too.
        let sbrk = judge(
            rss(0, 0, 0),
            rss(40 * MIB, 40 * MIB, 0),
            traced(0, 0, 40 << 20),
        );
        assert_eq!(sbrk.verdict, Some(Verdict::Mappings));
    }

    #[test]
    fn shared_memory_growth_is_outside() {
        let r = judge(
            rss(10 * MIB, 5 * MIB, 0),
            rss(74 * MIB, 5 * MIB, 64 * MIB),
            traced(100 << 10, 0, 0),
        );
        assert_eq!(r.verdict, Some(Verdict::Outside));
        assert_eq!(r.unexplained_change_bytes, 64 * MIB as i64 - (100 << 10));
        assert!(
            sentence(&r).contains("shared memory (RssShmem +64 MiB)"),
            "{}",
            sentence(&r)
        );
        // Anonymous growth nothing traced explains: retention, or an
        // allocator not probed.
        let anon = judge(rss(0, 0, 0), rss(64 * MIB, 64 * MIB, 0), traced(MIB, 0, 0));
        assert_eq!(anon.verdict, Some(Verdict::Outside));
        assert!(sentence(&anon).contains("not probed"));
    }

    #[test]
    fn no_growth_is_none_and_unreadable_is_no_verdict() {
        let flat = judge(
            rss(50 * MIB, 40 * MIB, 0),
            rss(50 * MIB + 4096, 40 * MIB, 0),
            traced(0, 0, 0),
        );
        assert_eq!(flat.verdict, Some(Verdict::None));
        let shrunk = judge(
            rss(50 * MIB, 40 * MIB, 0),
            rss(20 * MIB, 10 * MIB, 0),
            traced(0, 0, 0),
        );
        assert_eq!(shrunk.verdict, Some(Verdict::None));
        // Code paged in is not growth.
        let paged = judge(
            rss(10 * MIB, 5 * MIB, 0),
            Some(ResidentMemory {
                rss: 12 * MIB,
                anon: 5 * MIB,
                file: 7 * MIB,
                shmem: 0,
            }),
            traced(0, 0, 0),
        );
        assert_eq!(paged.verdict, Some(Verdict::None));
        assert!(
            sentence(&paged).contains("file-backed pages +2.0 MiB"),
            "{}",
            sentence(&paged)
        );
        let gone = judge(None, None, traced(5, 0, 0));
        assert_eq!(gone.verdict, None);
        assert_eq!(gone.heap_change_bytes, 5);
    }

    #[test]
    fn coverage_gaps() {
        // A static arena: anonymous RSS growth, nothing traced.
        let arena = judge(rss(0, 0, 0), rss(64 * MIB, 64 * MIB, 0), traced(0, 0, 0));
        let reason = coverage_gap(&arena, None).unwrap();
        assert!(
            reason.contains("RSS grew by 64 MiB of anonymous memory"),
            "{reason}"
        );
        // Shared memory is not an allocator's.
        let shared = judge(rss(0, 0, 0), rss(64 * MIB, 0, 64 * MIB), traced(0, 0, 0));
        assert_eq!(coverage_gap(&shared, None), None);
        // Late frees of unseen blocks: many, and a good share of all frees.
        let flat = judge(rss(MIB, MIB, 0), rss(MIB, MIB, 0), traced(0, 0, 0));
        assert!(coverage_gap(&flat, Some((10_000, 5_000))).is_some());
        assert_eq!(coverage_gap(&flat, Some((1_000_000, 5_000))), None);
        assert_eq!(coverage_gap(&flat, Some((100, 50))), None);
    }

    #[test]
    fn sums_processes_and_judges_the_sum() {
        let a = judge(
            rss(0, 0, 0),
            rss(30 * MIB, 30 * MIB, 0),
            traced(30 * MIB, 0, 0),
        );
        let b = judge(rss(0, 0, 0), rss(MIB / 2, MIB / 2, 0), traced(0, 0, 0));
        let total = sum(&[a, b]);
        assert_eq!(total.rss_change_bytes, (30 * MIB + MIB / 2) as i64);
        assert_eq!(total.verdict, Some(Verdict::Heap));
        let json = serde_json::to_value(&total).unwrap();
        assert_eq!(json["verdict"], "heap");
        assert_eq!(sum(&[]).verdict, None);
    }
}
