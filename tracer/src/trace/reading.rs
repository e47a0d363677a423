//! The read side of a trace: snapshots of the per-stack totals, their
//! stacks symbolized with their own process's symbolizer, and reports.

use std::collections::HashMap;

use anyhow::Result;

use super::LiveTrace;
use crate::{
    collect::{self, mapping_events},
    kernel::Kernel,
    model::Snapshot,
    report::{
        self,
        trend::{self, Trend},
        Report,
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
        self.history.record(&snapshot);
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
        self.history.record(&snapshot);
        Ok(snapshot)
    }

    /// The trend of each stack of `snapshot` (recorded by `snapshot`), by id.
    pub fn trends(&self, snapshot: &Snapshot) -> HashMap<u64, Trend> {
        snapshot
            .stacks
            .iter()
            .filter(|s| s.count > 0)
            .map(|s| {
                let series = self.history.series(s.stack_id);
                (s.stack_id, trend::classify(series, snapshot.oldest_age_s(s)))
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
    /// mappings made up to now.
    pub fn report(&mut self, snapshot: &Snapshot, top: usize) -> Report {
        self.refresh_states();
        let run = self.run.clone();
        let mut report = report::build(&run, snapshot, top, |pid, id| self.stack(pid, id));
        let trends = self.trends(snapshot);
        report::set_trends(&mut report, |_, id| trends.get(&id).copied());
        report.mappings = self.mappings_report(snapshot.taken_ns, top);
        report
    }

    /// The mappings section: outstanding anonymous mappings per stack.
    pub fn mappings_report(&mut self, taken_ns: u64, top: usize) -> report::MappingsReport {
        let Some(mappings) = &self.mappings else {
            return report::MappingsReport::default();
        };
        let cutoff =
            (self.run.min_age_ns > 0).then(|| taken_ns.saturating_sub(self.run.min_age_ns));
        let sample = mappings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sample(self.kernel.loaded(), cutoff);
        let loaded = self.kernel.loaded();
        let processes = &mut self.processes;
        report::build_mappings(&sample, taken_ns, top, |pid, id| {
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
        report::build_every_stack(&run, snapshot, |pid, id| self.stack(pid, id))
    }
}
