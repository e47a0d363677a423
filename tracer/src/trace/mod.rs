//! The processes being traced: the attached probes, each process with its
//! symbolizer, what is known about the run. The report session, the top
//! view, the CI gate and the exporter each drive one; none touches the maps
//! except through it.
//!
//! Several processes can be traced at once (`--pid` repeated, `--comm`,
//! `--follow-forks`): the programs key every block and every stack by
//! process, so each stack belongs to one process and is symbolized with
//! that process's mappings.

pub mod setup;

use std::sync::Mutex;

use anyhow::{Context as _, Result};

use crate::{
    collect,
    collect::mapping_events::{self, MappingTrace},
    kernel::probes::Probes,
    lifecycle::{
        event::{ChangeKind, ProcessChange},
        watch::TargetWatch,
    },
    model::Snapshot,
    report::{self, AllocatorInfo, ProcessInfo, ProcessState, Report, RunInfo},
    symbolize::{Frame, Symbolizer},
    target::allocator::AllocatorObject,
    target::detect,
    target::process::Process,
};

/// How processes found during the run (forks, execs, `--comm`) are probed:
/// as the first ones were.
#[derive(Clone, Debug, Default)]
pub struct ProbeOptions {
    pub symbols_prefix: Vec<String>,
    /// Keep entry probes at function entries (`--entry-probes`).
    pub entry_probes: bool,
    pub sample_rate: Option<u64>,
    pub verbose: bool,
}

/// One traced process.
pub struct Traced {
    pub process: Process,
    pub symbolizer: Symbolizer,
    pub info: ProcessInfo,
    /// What is probed in it (a forked child gets its parent's).
    pub objects: Vec<AllocatorObject>,
}

impl Traced {
    pub fn new(process: Process, info: ProcessInfo, objects: Vec<AllocatorObject>) -> Self {
        let mut symbolizer = Symbolizer::new(process.clone());
        // At once, so addresses in objects it unloads later still resolve.
        symbolizer.note_mappings();
        Traced {
            process,
            symbolizer,
            info,
            objects,
        }
    }

    pub fn is_running(&self) -> bool {
        self.info.state == ProcessState::Running
    }
}

pub struct LiveTrace {
    pub probes: Probes,
    /// The run as a whole; `run.pid` is the first process.
    pub run: RunInfo,
    /// Every process traced so far, the first one first. A pid that
    /// exec'ed is listed once per program, the replaced ones not running.
    pub processes: Vec<Traced>,
    pub probe_options: ProbeOptions,
    /// `--unwind cfi`: the kernel side's unwind tables (first process only).
    pub unwinder: Option<crate::target::unwind::SharedUnwinder>,
    /// The mmap family, when its tracepoints could be attached.
    pub mappings: Option<Mutex<MappingTrace>>,
    /// Ages of live blocks, read a bounded slice per snapshot.
    sweep: collect::AgeSweep,
}

impl LiveTrace {
    /// Also attaches the mmap-family tracepoints (the processes must
    /// already be in the probes' target set); when that fails, says why in
    /// one line and traces the heap alone.
    pub fn new(
        mut probes: Probes,
        processes: Vec<Traced>,
        run: RunInfo,
        probe_options: ProbeOptions,
    ) -> Self {
        let mappings = match MappingTrace::start(&mut probes.ebpf, &processes[0].process) {
            Ok(mut trace) => {
                for traced in &processes[1..] {
                    trace.add(&traced.process);
                }
                Some(Mutex::new(trace))
            }
            Err(e) => {
                eprintln!("tracer: not tracing mmap (heap tracing goes on): {e:#}");
                None
            }
        };
        LiveTrace {
            probes,
            run,
            processes,
            probe_options,
            unwinder: None,
            mappings,
            sweep: collect::AgeSweep::default(),
        }
    }

    pub fn with_unwinder(
        mut self,
        unwinder: Option<crate::target::unwind::SharedUnwinder>,
    ) -> Self {
        self.unwinder = unwinder;
        self
    }

    /// The first process (the one started, or the first `--pid`).
    pub fn primary(&self) -> &Traced {
        &self.processes[0]
    }

    /// The current program of process `pid`.
    fn current_mut(&mut self, pid: u32) -> Option<&mut Traced> {
        self.processes
            .iter_mut()
            .rev()
            .find(|t| t.info.pid == pid && t.info.state != ProcessState::Replaced)
    }

    /// Whether any traced process still runs.
    pub fn any_running(&self) -> bool {
        self.processes.iter().any(Traced::is_running)
    }

    /// Notes every running process's mappings now (before it exits, or
    /// before a report).
    pub fn note_mappings(&mut self) {
        for traced in self.processes.iter_mut().filter(|t| t.is_running()) {
            traced.symbolizer.note_mappings();
        }
    }

    /// The started command is stopped on its way out, its memory still
    /// mapped: a last look at its mappings, and it counts as exited.
    pub fn main_exiting(&mut self) {
        let pid = self.run.pid;
        if let Some(main) = self.current_mut(pid) {
            main.info.state = ProcessState::Exited(None);
        }
        // Children that are still running, too.
        self.note_mappings();
        if let Some(main) = self.current_mut(pid) {
            main.symbolizer.note_mappings();
        }
        self.sync_run();
    }

    /// Starts tracing process `pid` (found by `--comm`, or forked by a
    /// traced process): finds its allocator and attaches to it.
    pub fn add_process(&mut self, pid: u32, parent: Option<u32>) -> Result<()> {
        if self
            .processes
            .iter()
            .any(|t| t.info.pid == pid && t.is_running())
        {
            return Ok(());
        }
        let process = Process::open(pid)?;
        // A forked child runs its parent's program with its parent's
        // libraries: no need to look again (which takes long enough under
        // load for a short-lived child to be gone). A vfork child is
        // announced at its exec, before its libraries are mapped.
        let inherited = parent
            .and_then(|parent| {
                self.processes
                    .iter()
                    .rev()
                    .find(|t| t.info.pid == parent && t.is_running())
            })
            // Still the same program: not exec'ed since the fork.
            .filter(|t| same_program(&t.process, &process))
            .map(|t| t.objects.clone());
        let objects = match inherited {
            Some(objects) => objects,
            None => self.locate_new_program(&process)?,
        };
        let command = self.trace_program(process, parent, objects)?;
        if self.probe_options.verbose {
            eprintln!("tracer: tracing PID {pid} ({command})");
        }
        Ok(())
    }

    /// Process `pid` replaced its program (exec): the old program's memory
    /// went with it, so its blocks are dropped (they are not leaks), and the
    /// new program is probed as a process of its own.
    /// `at_ns`: when it exec'ed; blocks recorded since are the new program's.
    pub fn exec(&mut self, pid: u32, at_ns: u64) -> Result<()> {
        let parent = self.current_mut(pid).and_then(|t| {
            t.info.state = ProcessState::Replaced;
            t.info.parent
        });
        // The process stays a target throughout: the new program's first
        // allocations must not go unseen while it is re-probed.
        let rate = self.sample_rate();
        let dropped = collect::drop_process(&mut self.probes.ebpf, pid, at_ns, rate)?;
        // Heard of from the exec tracepoint, the process may still be
        // inside execve, where /proc shows it without a memory map (as if it
        // had exited): wait a little for it to come out.
        let mut tries = 0;
        let process = loop {
            let opened = Process::open(pid)
                .map_err(anyhow::Error::from)
                .and_then(|p| match p.maps() {
                    // An empty command line too: not out of execve yet.
                    Ok(maps) if !maps.is_empty() && has_command_line(pid) => Ok(p),
                    Ok(_) => Err(anyhow::anyhow!("PID {pid} has no memory map")),
                    Err(e) => Err(e.into()),
                });
            match opened {
                Ok(process) => break process,
                Err(e) if tries == 25 => return Err(e),
                Err(_) => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            }
        };
        let objects = self.locate_new_program(&process)?;
        let command = self.trace_program(process, parent, objects)?;
        if self.probe_options.verbose {
            eprintln!(
                "tracer: PID {pid} exec'ed {command}; dropped the {dropped} blocks of its old program"
            );
        }
        Ok(())
    }

    /// Traces a program (a process's, from its start or its exec): makes
    /// the process a target, attaches what `objects` it does not have yet,
    /// follows its mappings and lists it. Returns its command line.
    fn trace_program(
        &mut self,
        process: Process,
        parent: Option<u32>,
        objects: Vec<AllocatorObject>,
    ) -> Result<String> {
        let pid = process.pid;
        self.probes.add_target(pid)?;
        for object in &objects {
            if !self.probes.is_attached(object, pid) {
                self.attach_soon(object, &process)?;
            }
        }
        if let Some(mappings) = &self.mappings {
            mappings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add(&process);
        }
        let info = ProcessInfo {
            pid,
            parent,
            command: process.command_line(),
            allocators: allocator_infos(&objects, self.probe_options.sample_rate),
            state: ProcessState::Running,
        };
        let command = info.command.clone();
        self.processes.push(Traced::new(process, info, objects));
        self.sync_run();
        Ok(command)
    }

    /// Process `pid` is gone. Its blocks stay: what it held at exit is what
    /// it leaked.
    pub fn ended(&mut self, pid: u32, code: Option<i32>) {
        if let Some(traced) = self.current_mut(pid) {
            if traced.is_running() {
                traced.info.state = ProcessState::Exited(code);
            }
        }
        self.probes.remove_target(pid);
        self.probes.detach_process(pid);
        self.sync_run();
    }

    /// Applies what happened to one process (see `watch::ChangeKind`), then
    /// lets it go on if it waits for that.
    pub fn apply(&mut self, change: ProcessChange, watch: &mut TargetWatch) {
        let pid = change.pid;
        match change.kind {
            ChangeKind::Forked { parent } => match self.add_process(pid, Some(parent)) {
                Ok(()) => watch.watch(pid),
                Err(e) => eprintln!("tracer: not following PID {pid} (forked by {parent}): {e:#}"),
            },
            ChangeKind::Execed { at_ns } => {
                if let Err(e) = self.exec(pid, at_ns) {
                    eprintln!("tracer: PID {pid} exec'ed and cannot be traced further: {e:#}");
                    self.ended(pid, None);
                }
            }
            ChangeKind::Exiting => {
                if let Some(traced) = self.current_mut(pid) {
                    traced.symbolizer.note_mappings();
                }
            }
            ChangeKind::Ended(code) => self.ended(pid, code),
        }
        watch.applied(&change);
    }

    /// Attaches `object`'s probes for a process just heard of. A process
    /// the sched tracepoints announced may still be inside fork or execve,
    /// where perf_event_open fails for it (ESRCH, seen here under load):
    /// retry for a few tens of milliseconds.
    fn attach_soon(&mut self, object: &AllocatorObject, process: &Process) -> Result<()> {
        let mut tries = 0;
        while let Err(e) = self.probes.attach(object, process.pid) {
            tries += 1;
            if tries == 25 || !process.is_alive() {
                return Err(e);
            }
            log::debug!("attaching to PID {}, try {tries}: {e:#}", process.pid);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(())
    }

    /// The allocator objects of a process, placed as the options say.
    fn locate(&self, process: &Process) -> Result<Vec<AllocatorObject>> {
        let maps = process.maps()?;
        let mut objects = detect::for_process(process, &maps, &self.probe_options.symbols_prefix)
            .with_context(|| format!("PID {} ({})", process.pid, process.comm))?;
        if !self.probe_options.entry_probes {
            for object in &mut objects {
                crate::target::allocator::place_entry_probes(object);
            }
        }
        Ok(objects)
    }

    /// The allocator objects of a program that has just been exec'ed: the
    /// dynamic loader may not have mapped its libraries yet (a started
    /// command's child is stopped at the exec), so they are found as for a
    /// command about to start, from its executable and environment.
    ///
    /// `for_command` runs the loader (`ld.so --list`): safe while the
    /// launcher's thread, which waits for any child, waits for this change.
    fn locate_new_program(&self, process: &Process) -> Result<Vec<AllocatorObject>> {
        if let Ok(objects) = self.locate(process) {
            return Ok(objects);
        }
        let exe = process.host_path(&process.exe()?);
        let mut objects =
            detect::for_command(&exe, &process.environ(), &self.probe_options.symbols_prefix)
                .with_context(|| format!("PID {} ({})", process.pid, process.comm))?;
        if !self.probe_options.entry_probes {
            for object in &mut objects {
                crate::target::allocator::place_entry_probes(object);
            }
        }
        Ok(objects)
    }

    /// Processes that are gone without word (a running process's last
    /// exit, seen through its pidfd) count as exited.
    fn refresh_states(&mut self) {
        for traced in self.processes.iter_mut().filter(|t| t.is_running()) {
            if !traced.process.is_alive() {
                traced.info.state = ProcessState::Exited(None);
            }
        }
        self.sync_run();
    }

    /// Keeps `run.processes` in step with `processes`.
    fn sync_run(&mut self) {
        self.run.processes = self.processes.iter().map(|t| t.info.clone()).collect();
    }

    /// Re-reads the mappings and forgets threads that died inside the
    /// allocator. Run about once a second whatever the view does.
    pub fn housekeeping(&mut self) {
        if let Some(mappings) = &self.mappings {
            mappings.lock().unwrap_or_else(|e| e.into_inner()).drain();
        }
        let rate = self.sample_rate();
        for traced in self.processes.iter_mut().filter(|t| t.is_running()) {
            if !traced.process.is_alive() {
                continue;
            }
            traced.symbolizer.note_mappings();
            let process = &traced.process;
            if let Err(e) =
                collect::forget_dead_threads(&mut self.probes.ebpf, process.pid, rate, || {
                    process.thread_ids()
                })
            {
                log::debug!("cleaning in-flight records: {e:#}");
            }
        }
        if let Some(unwinder) = &self.unwinder {
            if let Err(e) = unwinder.lock().unwrap().refresh() {
                log::debug!("refreshing unwind tables: {e:#}");
            }
        }
        if let Err(e) = self.probes.housekeeping() {
            log::debug!("probe housekeeping: {e:#}");
        }
    }

    fn sample_rate(&self) -> Option<u64> {
        self.run
            .allocators
            .first()
            .and_then(|a| a.sample_rate_bytes)
    }

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
        collect::snapshot(&self.probes.ebpf, self.run.min_age_ns, ages, rate)
    }

    /// The per-stack totals now, with every live block read for exact ages
    /// (final reports).
    pub fn snapshot_exact(&self) -> Result<Snapshot> {
        collect::snapshot(
            &self.probes.ebpf,
            self.run.min_age_ns,
            collect::Ages::Exact,
            self.sample_rate(),
        )
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
        let ips = collect::stack_frames(&self.probes.ebpf, stack_id);
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
        let processes = &mut self.processes;
        report::build_mappings(&sample, taken_ns, top, |pid, id| {
            let symbolizer = processes
                .iter_mut()
                .rev()
                .find(|t| t.info.pid == pid)
                .map(|t| &mut t.symbolizer);
            match (mapping_events::stack_frames(ebpf, id), symbolizer) {
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

/// /proc/PID/cmdline is not empty (it is while a process is inside execve).
fn has_command_line(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// Both processes run the same executable file.
fn same_program(a: &Process, b: &Process) -> bool {
    use std::os::unix::fs::MetadataExt;
    let file = |p: &Process| {
        std::fs::metadata(format!("/proc/{}/exe", p.pid))
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    file(a).is_some() && file(a) == file(b)
}

/// What reports say about the objects probed in a process.
pub fn allocator_infos(
    objects: &[AllocatorObject],
    sample_rate: Option<u64>,
) -> Vec<AllocatorInfo> {
    objects
        .iter()
        .map(|object| AllocatorInfo {
            object: object.path.clone(),
            functions: object
                .points
                .iter()
                .flat_map(|p| p.functions.iter().map(|f| f.to_string()))
                .collect(),
            sample_rate_bytes: sample_rate,
            estimated: sample_rate.is_some(),
        })
        .collect()
}
