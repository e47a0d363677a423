//! The read side of a trace: snapshots of the per-stack totals, their
//! stacks symbolized with their own process's symbolizer, and reports.

use std::collections::HashMap;

use anyhow::Result;
use tracer_common::is_unknown_stack;

use super::LiveTrace;
use crate::{
    collect::{
        self,
        mapping_events::{self, MappingSample},
    },
    kernel::Kernel,
    model::Snapshot,
    report::{
        self,
        memory::{self, MemoryReport, Traced},
        trend::{self, Trend},
        ProcessState, Report,
    },
    symbolize::{Frame, Symbolizer},
};

impl LiveTrace<Kernel> {
    /// The per-stack totals now. `scan` also reads live blocks, for ages and
    /// the settled bytes growth is measured on: a bounded slice of them per
    /// call (see `collect::Ages::Sweep`), unless a minimum age is set.
    pub fn snapshot(&mut self, scan: bool) -> Result<Snapshot> {
        let rate = self.sample_rate();
        let ages = if scan {
            collect::Ages::Sweep(&mut self.sweep)
        } else {
            collect::Ages::Skip
        };
        let snapshot = collect::snapshot(self.kernel.loaded(), self.run.min_age_ns, ages, rate)?;
        self.record(&snapshot);
        Ok(snapshot)
    }

    /// The per-stack totals now, with every live block read for exact ages
    /// (final reports).
    pub fn snapshot_exact(&mut self) -> Result<Snapshot> {
        let snapshot = collect::snapshot(
            self.kernel.loaded(),
            self.run.min_age_ns,
            collect::Ages::Exact,
            self.sample_rate(),
        )?;
        self.record(&snapshot);
        Ok(snapshot)
    }

    /// Adds a snapshot to the history trends are judged on, each stack
    /// under its allocation site (its innermost frame, read once per stack).
    fn record(&mut self, snapshot: &Snapshot) {
        let loaded = self.kernel.loaded();
        let sites = &mut self.sites;
        let live: std::collections::HashSet<u64> =
            snapshot.stacks.iter().map(|s| s.stack_id).collect();
        sites.retain(|id, _| live.contains(id));
        for s in snapshot.stacks.iter().filter(|s| s.count > 0) {
            sites.entry(s.stack_id).or_insert_with(|| {
                let ip = match collect::stack_frames(loaded, s.stack_id) {
                    Ok(Some((ips, _))) if !is_unknown_stack(s.stack_id) => ips.first().copied(),
                    _ => None,
                };
                ip.map_or(s.stack_id, |ip| site_key(s.pid, ip))
            });
        }
        if self.late_mark.is_none()
            && snapshot.taken_ns >= self.run.attached_ns + (memory::LATE_S * 1e9) as u64
        {
            let c = &snapshot.counters;
            self.late_mark = Some((c.frees, c.unknown_frees));
        }
        let sites = &self.sites;
        self.history.record_by_site(snapshot, |s| {
            sites.get(&s.stack_id).copied().unwrap_or(s.stack_id)
        });
    }

    /// The trend of each stack of `snapshot` (recorded by `snapshot`), by id.
    pub fn trends(&self, snapshot: &Snapshot) -> HashMap<u64, Trend> {
        snapshot
            .stacks
            .iter()
            .filter(|s| s.count > 0)
            .map(|s| {
                let trend = trend::of_stack(&self.history, s.stack_id, snapshot.oldest_age_s(s));
                (s.stack_id, trend)
            })
            .collect()
    }

    /// The symbolizer for the stacks of process `pid`: its current program
    /// (stacks of a replaced program were dropped with it).
    fn symbolizer(&mut self, pid: u32) -> Option<&mut Symbolizer> {
        let index = self
            .processes
            .iter()
            .rposition(|t| t.info.pid == pid)
            .or((pid == 0).then_some(0))?;
        Some(&mut self.processes[index].symbolizer)
    }

    /// Symbolized frames of a stack of process `pid`, innermost first, and
    /// whether the capture was cut short. Empty if the stack is gone from
    /// the map.
    pub fn stack(&mut self, pid: u32, stack_id: u64) -> (Vec<Frame>, bool) {
        let ips = collect::stack_frames(self.kernel.loaded(), stack_id);
        match (ips, self.symbolizer(pid)) {
            (Ok(Some((ips, truncated))), Some(symbolizer)) => {
                (symbolizer.symbolize_stack(&ips), truncated)
            }
            _ => (Vec::new(), false),
        }
    }

    /// A report of the `top` stacks (0: all) of a snapshot, with the
    /// mappings made up to now and where memory went since attach.
    pub fn report(&mut self, snapshot: &Snapshot, top: usize) -> Report {
        self.refresh_states();
        let run = self.run.clone();
        let mut report = report::build(&run, snapshot, top, |pid, id| self.stack(pid, id));
        let trends = self.trends(snapshot);
        report::set_trends(&mut report, |_, id| trends.get(&id).copied());
        report::set_labels(&mut report, &mut self.run.labels);
        let sample = self.mapping_sample(snapshot.taken_ns);
        if let Some(sample) = &sample {
            report.mappings = self.build_mappings(sample, snapshot.taken_ns, top);
        }
        let memory = self.memory_of(snapshot, sample.as_ref());
        // `run.processes`, hence `report.processes`, is `processes` in order.
        for (process, memory) in report.processes.iter_mut().zip(&memory) {
            process.memory = memory.clone();
        }
        report.memory = memory::sum(&memory);
        self.describe_unwinding(&mut report.unwinding);
        report
    }

    /// The walk used and what its tables take (stack quality comes from the
    /// counters, in `report::build`).
    fn describe_unwinding(&self, unwinding: &mut report::UnwindingReport) {
        match &self.unwinder {
            Some(unwinder) => {
                let stats = unwinder.lock().unwrap_or_else(|e| e.into_inner()).stats();
                unwinding.mode = "cfi".into();
                unwinding.tables_bytes = stats.bytes();
                unwinding.rows_bytes_used = stats.rows_bytes();
                unwinding.objects = stats.objects;
            }
            None => unwinding.mode = "fp".into(),
        }
    }

    /// Where memory went since attach, over every traced process (`top`'s
    /// header, `serve`'s gauges).
    pub fn memory(&mut self, snapshot: &Snapshot) -> MemoryReport {
        let sample = self.mapping_sample(snapshot.taken_ns);
        memory::sum(&self.memory_of(snapshot, sample.as_ref()))
    }

    /// Each process's memory since attach, in the order of `processes`; a
    /// replaced program's is empty (its memory went with it).
    fn memory_of(
        &mut self,
        snapshot: &Snapshot,
        sample: Option<&MappingSample>,
    ) -> Vec<MemoryReport> {
        // Frees of unseen blocks since LATE_S after attach (the counters
        // are the whole session's: they speak for the first process).
        let late_frees = match (self.late_mark, self.sample_rate()) {
            (Some((frees, unseen)), None) => Some((
                snapshot.counters.frees.saturating_sub(frees),
                snapshot.counters.unknown_frees.saturating_sub(unseen),
            )),
            _ => None,
        };
        let labels = &self.run.labels;
        self.processes
            .iter_mut()
            .enumerate()
            .map(|(index, target)| {
                if target.info.state == ProcessState::Replaced {
                    return MemoryReport::default();
                }
                let pid = target.info.pid;
                if target.is_running() {
                    if let Some(now) = crate::target::memory::resident(pid) {
                        target.memory_last = Some(now);
                    }
                }
                let traced = Traced {
                    heap_bytes: snapshot
                        .stacks
                        .iter()
                        .filter(|s| s.pid == pid)
                        .map(|s| s.bytes)
                        .sum(),
                    mapped_bytes: sample.map_or(0, |m| {
                        m.stacks
                            .iter()
                            .filter(|s| s.pid == pid)
                            .map(|s| s.bytes)
                            .sum()
                    }),
                    brk_growth: sample
                        .and_then(|m| m.brk_growth_by_pid.get(&pid).copied())
                        .unwrap_or(0),
                };
                let mut report = memory::judge(target.memory_at_attach, target.memory_last, traced);
                let late = late_frees.filter(|_| index == 0);
                if let Some(reason) = memory::coverage_gap(&report, late) {
                    let unprobed = target.unprobed.get_or_insert_with(|| {
                        let probed: Vec<&std::path::Path> = target
                            .objects
                            .iter()
                            .map(|o| o.host_path.as_path())
                            .collect();
                        crate::target::memory::unprobed_allocators(&target.process, &probed, |f| {
                            labels.is_wrapper(f)
                        })
                    });
                    report.coverage = Some(memory::Coverage {
                        reason,
                        unprobed_objects: unprobed.clone(),
                    });
                }
                report
            })
            .collect()
    }

    /// The mappings now (None: mmap is not traced), made at or before the
    /// minimum age's cutoff.
    fn mapping_sample(&mut self, taken_ns: u64) -> Option<MappingSample> {
        let mappings = self.mappings.as_ref()?;
        let cutoff =
            (self.run.min_age_ns > 0).then(|| taken_ns.saturating_sub(self.run.min_age_ns));
        Some(
            mappings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .sample(self.kernel.loaded(), cutoff),
        )
    }

    /// The mappings section: outstanding anonymous mappings per stack.
    fn build_mappings(
        &mut self,
        sample: &MappingSample,
        taken_ns: u64,
        top: usize,
    ) -> report::MappingsReport {
        let loaded = self.kernel.loaded();
        let processes = &mut self.processes;
        report::build_mappings(sample, taken_ns, top, |pid, id| {
            let symbolizer = processes
                .iter_mut()
                .rev()
                .find(|t| t.info.pid == pid)
                .map(|t| &mut t.symbolizer);
            match (mapping_events::stack_frames(loaded, id), symbolizer) {
                (Ok(Some((ips, truncated))), Some(symbolizer)) => {
                    (symbolizer.symbolize_stack(&ips), truncated)
                }
                _ => (Vec::new(), false),
            }
        })
    }

    /// A report of every stack seen, including those whose blocks were all
    /// freed (pprof's alloc_* values need them).
    pub fn report_every_stack(&mut self, snapshot: &Snapshot) -> Report {
        self.refresh_states();
        let run = self.run.clone();
        let mut report = report::build_every_stack(&run, snapshot, |pid, id| self.stack(pid, id));
        self.describe_unwinding(&mut report.unwinding);
        report
    }
}

/// An allocation site: a process's innermost frame address.
pub fn site_key(pid: u32, ip: u64) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (pid, ip).hash(&mut hasher);
    hasher.finish()
}
