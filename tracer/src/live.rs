//! A process while it is being traced: the attached probes, the process, what
//! is known about the run, and the symbolizer. The report session and the
//! top view each drive one; neither touches the maps except through it.

use std::sync::Mutex;

use anyhow::Result;

use crate::{
    collect,
    mapping_trace::{self, MappingTrace},
    model::Snapshot,
    probes::Probes,
    report::{self, Report, RunInfo},
    symbolize::{Frame, Symbolizer},
    target::Process,
};

pub struct LiveTrace {
    pub probes: Probes,
    pub process: Process,
    pub run: RunInfo,
    pub symbolizer: Symbolizer,
    /// `--unwind cfi`: the kernel side's unwind tables, kept up to date.
    pub unwinder: Option<crate::unwind::SharedUnwinder>,
    /// The mmap family, when its tracepoints could be attached.
    pub mappings: Option<Mutex<MappingTrace>>,
    /// Ages of live blocks, read a bounded slice per snapshot.
    sweep: collect::AgeSweep,
}

impl LiveTrace {
    /// Notes the process's mappings at once, so addresses in objects it
    /// unloads later can still be symbolized.
    ///
    /// Also attaches the mmap-family tracepoints (the target must already be
    /// in the probes' target set); when that fails, says why in one line
    /// and traces the heap alone.
    pub fn new(mut probes: Probes, process: Process, run: RunInfo) -> Self {
        let mut symbolizer = Symbolizer::new(process.clone());
        symbolizer.note_mappings();
        let mappings = match MappingTrace::start(&mut probes.ebpf, &process) {
            Ok(trace) => Some(Mutex::new(trace)),
            Err(e) => {
                eprintln!("tracer: not tracing mmap (heap tracing goes on): {e:#}");
                None
            }
        };
        LiveTrace {
            probes,
            process,
            run,
            symbolizer,
            unwinder: None,
            mappings,
            sweep: collect::AgeSweep::default(),
        }
    }

    pub fn with_unwinder(mut self, unwinder: Option<crate::unwind::SharedUnwinder>) -> Self {
        self.unwinder = unwinder;
        self
    }

    /// Re-reads the mappings and forgets threads that died inside the
    /// allocator. Run about once a second whatever the view does.
    pub fn housekeeping(&mut self) {
        if let Some(mappings) = &self.mappings {
            mappings.lock().unwrap_or_else(|e| e.into_inner()).drain();
        }
        if !self.process.is_alive() {
            return;
        }
        self.symbolizer.note_mappings();
        if let Some(unwinder) = &self.unwinder {
            if let Err(e) = unwinder.lock().unwrap().refresh() {
                log::debug!("refreshing unwind tables: {e:#}");
            }
        }
        let process = &self.process;
        let rate = self
            .run
            .allocators
            .first()
            .and_then(|a| a.sample_rate_bytes);
        if let Err(e) =
            collect::forget_dead_threads(&mut self.probes.ebpf, process.pid, rate, || {
                process.thread_ids()
            })
        {
            log::debug!("cleaning in-flight records: {e:#}");
        }
        if let Err(e) = self.probes.housekeeping() {
            log::debug!("probe housekeeping: {e:#}");
        }
    }

    /// The per-stack totals now. `scan` also reads live blocks, for ages and
    /// the settled bytes growth is measured on: a bounded slice of them per
    /// call (see `collect::Ages::Sweep`), unless a minimum age is set.
    pub fn snapshot(&mut self, scan: bool) -> Result<Snapshot> {
        let ages = if scan {
            collect::Ages::Sweep(&mut self.sweep)
        } else {
            collect::Ages::Skip
        };
        let rate = self
            .run
            .allocators
            .first()
            .and_then(|a| a.sample_rate_bytes);
        collect::snapshot(&self.probes.ebpf, self.run.min_age_ns, ages, rate)
    }

    /// The per-stack totals now, with every live block read for exact ages
    /// (final reports).
    pub fn snapshot_exact(&self) -> Result<Snapshot> {
        let rate = self
            .run
            .allocators
            .first()
            .and_then(|a| a.sample_rate_bytes);
        collect::snapshot(
            &self.probes.ebpf,
            self.run.min_age_ns,
            collect::Ages::Exact,
            rate,
        )
    }

    /// Symbolized frames of a stack, innermost first, and whether the
    /// capture was cut short. Empty if the stack is gone from the map.
    pub fn stack(&mut self, stack_id: u64) -> (Vec<Frame>, bool) {
        match collect::stack_frames(&self.probes.ebpf, stack_id) {
            Ok(Some((ips, truncated))) => (self.symbolizer.symbolize_stack(&ips), truncated),
            _ => (Vec::new(), false),
        }
    }

    /// A report of the `top` stacks (0: all) of a snapshot, with the
    /// mappings made up to now.
    pub fn report(&mut self, snapshot: &Snapshot, top: usize) -> Report {
        let run = self.run.clone();
        let mut report = report::build(&run, snapshot, top, |id| self.stack(id));
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
            .sample(&self.probes.ebpf, cutoff);
        let ebpf = &self.probes.ebpf;
        let symbolizer = &mut self.symbolizer;
        report::build_mappings(
            &sample,
            taken_ns,
            top,
            |id| match mapping_trace::stack_frames(ebpf, id) {
                Ok(Some((ips, truncated))) => (symbolizer.symbolize_stack(&ips), truncated),
                _ => (Vec::new(), false),
            },
        )
    }

    /// A report of every stack seen, including those whose blocks were all
    /// freed (pprof's alloc_* values need them).
    pub fn report_every_stack(&mut self, snapshot: &Snapshot) -> Report {
        let run = self.run.clone();
        report::build_every_stack(&run, snapshot, |id| self.stack(id))
    }
}
