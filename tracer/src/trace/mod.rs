//! The processes being traced: the attached probes, each process with its
//! symbolizer, what is known about the run. The report session, the top
//! view, the CI gate and the exporter each drive one; none touches the maps
//! except through it.
//!
//! Several processes can be traced at once (`--pid` repeated, `--comm`,
//! `--follow-forks`): the programs key every block and every stack by
//! process, so each stack belongs to one process and is symbolized with
//! that process's mappings.

mod reading;
pub use reading::site_key;
pub mod setup;

use std::sync::Mutex;

use anyhow::Result;

use crate::{
    collect::{self, mapping_events::MappingTrace},
    kernel::{unwind::SharedUnwinder, Kernel, KernelOps},
    lifecycle::{
        event::{ChangeKind, ProcessChange},
        watch::TargetWatch,
    },
    model::ResidentMemory,
    report::{AllocatorInfo, ProcessInfo, ProcessState, RunInfo},
    symbolize::Symbolizer,
    target::{
        allocator::AllocatorObject,
        detect,
        process::Process,
        tasks::{same_program, wait_out_of_execve},
    },
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
pub struct Target {
    pub process: Process,
    pub symbolizer: Symbolizer,
    pub info: ProcessInfo,
    /// What is probed in it (a forked child gets its parent's).
    pub objects: Vec<AllocatorObject>,
    /// Its resident memory when it was attached to, and the last read
    /// (kept for after it is gone).
    pub memory_at_attach: Option<ResidentMemory>,
    pub memory_last: Option<ResidentMemory>,
    /// Objects it maps that look like allocators and are not probed, found
    /// once a coverage gap shows.
    pub unprobed: Option<Vec<String>>,
}

impl Target {
    pub fn new(process: Process, info: ProcessInfo, objects: Vec<AllocatorObject>) -> Self {
        let mut symbolizer = Symbolizer::new(process.clone());
        // At once, so addresses in objects it unloads later still resolve.
        symbolizer.note_mappings();
        let memory = crate::target::memory::resident(process.pid);
        Target {
            process,
            symbolizer,
            info,
            objects,
            memory_at_attach: memory,
            memory_last: memory,
            unprobed: None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.info.state == ProcessState::Running
    }
}

/// `K`: the kernel side (`Kernel`; a fake in the tests below).
pub struct LiveTrace<K = Kernel> {
    kernel: K,
    /// The run as a whole; `run.pid` is the first process.
    pub run: RunInfo,
    /// Every process traced so far, the first one first. A pid that
    /// exec'ed is listed once per program, the replaced ones not running.
    pub processes: Vec<Target>,
    pub probe_options: ProbeOptions,
    /// CFI unwinding (the default): the unwind tables of every traced
    /// process, shared by object.
    pub unwinder: Option<SharedUnwinder>,
    /// The mmap family, when its tracepoints could be attached.
    pub mappings: Option<Mutex<MappingTrace>>,
    /// Ages of live blocks, read a bounded slice per snapshot.
    sweep: collect::AgeSweep,
    /// Settled bytes per stack at every snapshot, for trends in reports.
    history: crate::model::History,
    /// Each live stack's allocation site (`reading::site_key`).
    sites: std::collections::HashMap<u64, u64>,
    /// (frees, frees of unseen blocks) at the first snapshot `LATE_S`
    /// after attach: the coverage check counts from there.
    late_mark: Option<(u64, u64)>,
}

impl<K: KernelOps> LiveTrace<K> {
    /// `processes` are already targets of `kernel`, their probes attached;
    /// `mappings` follows the first of them (None: mmap is not traced).
    pub fn new(
        kernel: K,
        processes: Vec<Target>,
        run: RunInfo,
        probe_options: ProbeOptions,
        mappings: Option<MappingTrace>,
    ) -> Self {
        let mappings = mappings.map(|mut trace| {
            for traced in &processes[1..] {
                trace.add(&traced.process);
            }
            Mutex::new(trace)
        });
        let history = crate::model::History::since(run.attached_ns);
        LiveTrace {
            kernel,
            run,
            processes,
            probe_options,
            unwinder: None,
            mappings,
            sweep: collect::AgeSweep::default(),
            history,
            sites: Default::default(),
            late_mark: None,
        }
    }

    pub fn with_unwinder(mut self, unwinder: Option<SharedUnwinder>) -> Self {
        self.unwinder = unwinder;
        self
    }

    /// The kernel side.
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// The first process (the one started, or the first `--pid`).
    pub fn primary(&self) -> &Target {
        &self.processes[0]
    }

    /// The current program of process `pid`.
    fn current_mut(&mut self, pid: u32) -> Option<&mut Target> {
        self.processes
            .iter_mut()
            .rev()
            .find(|t| t.info.pid == pid && t.info.state != ProcessState::Replaced)
    }

    /// Whether any traced process still runs.
    pub fn any_running(&self) -> bool {
        self.processes.iter().any(Target::is_running)
    }

    /// Notes every running process's mappings now (before it exits, or
    /// before a report).
    pub fn note_mappings(&mut self) {
        for traced in self.processes.iter_mut().filter(|t| t.is_running()) {
            traced.symbolizer.note_mappings();
            if let Some(memory) = crate::target::memory::resident(traced.info.pid) {
                traced.memory_last = Some(memory);
            }
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
            // Its memory as it ends, for the verdict of the final report.
            if let Some(memory) = crate::target::memory::resident(pid) {
                main.memory_last = Some(memory);
            }
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
            .filter(|t| same_program(t.info.pid, pid))
            .map(|t| t.objects.clone());
        let same_as_parent = inherited.is_some();
        let objects = match inherited {
            Some(objects) => objects,
            None => self.locate_new_program(&process)?,
        };
        let unwind_parent = parent.filter(|_| same_as_parent);
        match self.trace_program(process, parent, unwind_parent, objects) {
            Ok(command) => {
                if self.probe_options.verbose {
                    eprintln!("tracer: tracing PID {pid} ({command})");
                }
                Ok(())
            }
            Err(e) => {
                // Nothing half-attached stays behind for a process not traced.
                self.kernel.detach_process(pid);
                self.kernel.remove_target(pid);
                if let Some(unwinder) = &self.unwinder {
                    unwinder
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(pid);
                }
                Err(e)
            }
        }
    }

    /// Process `pid` replaced its program (exec): the old program's memory
    /// went with it, so its blocks are dropped (they are not leaks), and the
    /// new program is probed as a process of its own.
    /// `at_ns`: when it exec'ed; blocks recorded since are the new program's.
    pub fn exec(&mut self, pid: u32, at_ns: u64) -> Result<()> {
        let old = self
            .processes
            .iter()
            .rposition(|t| t.info.pid == pid && t.info.state != ProcessState::Replaced);
        let parent = old.and_then(|i| self.processes[i].info.parent);
        // The process stays a target throughout: the new program's first
        // allocations must not go unseen while it is re-probed.
        let rate = self.sample_rate();
        let dropped = self.kernel.drop_blocks(pid, at_ns, rate)?;
        let process = wait_out_of_execve(pid)?;
        let objects = self.locate_new_program(&process)?;
        let command = self.trace_program(process, parent, None, objects)?;
        // Listed as replaced once the new program is listed: an exec that
        // cannot be followed leaves the process as it was, to be ended.
        if let Some(i) = old {
            self.processes[i].info.state = ProcessState::Replaced;
            self.sync_run();
        }
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
    /// `unwind_parent`: a forked parent running the same program, whose
    /// unwind table the child starts with.
    fn trace_program(
        &mut self,
        process: Process,
        parent: Option<u32>,
        unwind_parent: Option<u32>,
        objects: Vec<AllocatorObject>,
    ) -> Result<String> {
        let pid = process.pid;
        self.kernel.add_target(pid)?;
        if let Some(unwinder) = &self.unwinder {
            // Before the probes: its first allocations are walked with it.
            let mut unwinder = unwinder.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = unwinder.add(&process, unwind_parent) {
                log::debug!("unwind table of PID {pid}: {e:#}");
            }
        }
        for object in &objects {
            if !self.kernel.is_attached(object, pid) {
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
        self.processes.push(Target::new(process, info, objects));
        self.sync_run();
        Ok(command)
    }

    /// Process `pid` is gone (or exec'ed into what cannot be traced). Its
    /// blocks stay: what it held at exit is what it leaked.
    pub fn ended(&mut self, pid: u32, code: Option<i32>) {
        if let Some(traced) = self.current_mut(pid) {
            if traced.is_running() {
                traced.info.state = ProcessState::Exited(code);
            }
        }
        self.settle_calls(pid);
        self.kernel.remove_target(pid);
        self.kernel.detach_process(pid);
        if let Some(unwinder) = &self.unwinder {
            unwinder
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(pid);
        }
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
        while let Err(e) = self.kernel.attach(object, process.pid) {
            tries += 1;
            if tries == 25 || !process.is_alive() {
                return Err(e.into());
            }
            log::debug!("attaching to PID {}, try {tries}: {e:#}", process.pid);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(())
    }

    /// The allocator objects of a program that has just started or
    /// exec'ed, placed as the options say (see `detect::for_new_program`).
    fn locate_new_program(&self, process: &Process) -> Result<Vec<AllocatorObject>> {
        let options = &self.probe_options;
        detect::for_new_program(process, &options.symbols_prefix, options.entry_probes)
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

    /// Settles the calls that the threads of `pid` were inside when they
    /// ended (a realloc's old block was still the caller's), and frees
    /// their records once the whole process is gone, so that a later
    /// process given the same pid finds none of them. The threads still
    /// alive (an exec the tracer cannot follow ends the tracing, not the
    /// process) keep theirs.
    fn settle_calls(&mut self, pid: u32) {
        let rate = self.sample_rate();
        let Some(traced) = self.processes.iter().rev().find(|t| t.info.pid == pid) else {
            return;
        };
        let process = &traced.process;
        let gone = !process.is_alive();
        if let Err(e) =
            self.kernel
                .forget_dead_threads(pid, rate, &mut || process.thread_ids(), gone)
        {
            log::debug!("settling in-flight calls of {pid}: {e:#}");
        }
    }

    /// The command, or the last attached process, has been reaped: the
    /// calls of every traced process that is gone are settled (front ends
    /// that report at the command's exit, before it is reaped, have
    /// reported already).
    pub fn all_ended(&mut self) {
        // An exec'ed process is listed once per program: settled once.
        let mut pids: Vec<u32> = self.processes.iter().map(|t| t.info.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            self.settle_calls(pid);
        }
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
            if let Some(memory) = crate::target::memory::resident(traced.info.pid) {
                traced.memory_last = Some(memory);
            }
            let process = &traced.process;
            if let Err(e) = self.kernel.forget_dead_threads(
                process.pid,
                rate,
                &mut || process.thread_ids(),
                false,
            ) {
                log::debug!("cleaning in-flight records: {e:#}");
            }
        }
        if let Some(unwinder) = &self.unwinder {
            if let Err(e) = unwinder.lock().unwrap_or_else(|e| e.into_inner()).refresh() {
                log::debug!("refreshing unwind tables: {e:#}");
            }
        }
        self.kernel.housekeeping();
    }

    fn sample_rate(&self) -> Option<u64> {
        self.run
            .allocators
            .first()
            .and_then(|a| a.sample_rate_bytes)
    }
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

#[cfg(test)]
mod tests {
    //! The lifecycle of traced processes against a fake kernel side that
    //! records what it is asked; the processes are real (`sleep` children),
    //! so /proc, allocator detection and symbolizers are the real ones.

    use std::process::{Child, Command};

    use super::*;
    use crate::kernel::{KernelError, Result as KernelResult};

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        AddTarget(u32),
        RemoveTarget(u32),
        Attach(String, u32),
        Detach(u32),
        DropBlocks(u32, u64),
        /// The process, and whether any of its threads was said to live.
        ForgetDeadThreads(u32, bool),
        Housekeeping,
    }

    #[derive(Default)]
    struct FakeKernel {
        calls: Vec<Call>,
        /// (object path, pid) attached so far.
        attached: Vec<(String, u32)>,
        refuse_attach: bool,
    }

    impl KernelOps for FakeKernel {
        fn add_target(&mut self, pid: u32) -> KernelResult<()> {
            self.calls.push(Call::AddTarget(pid));
            Ok(())
        }
        fn remove_target(&mut self, pid: u32) {
            self.calls.push(Call::RemoveTarget(pid));
        }
        fn attach(&mut self, object: &AllocatorObject, pid: u32) -> KernelResult<()> {
            if self.refuse_attach {
                return Err(KernelError::attach(
                    "a probe",
                    std::io::Error::from_raw_os_error(libc::ESRCH),
                ));
            }
            self.calls.push(Call::Attach(object.path.clone(), pid));
            self.attached.push((object.path.clone(), pid));
            Ok(())
        }
        fn is_attached(&self, object: &AllocatorObject, pid: u32) -> bool {
            self.attached.contains(&(object.path.clone(), pid))
        }
        fn detach_process(&mut self, pid: u32) {
            self.calls.push(Call::Detach(pid));
            self.attached.retain(|(_, p)| *p != pid);
        }
        fn drop_blocks(&mut self, pid: u32, before_ns: u64, _: Option<u64>) -> KernelResult<usize> {
            self.calls.push(Call::DropBlocks(pid, before_ns));
            Ok(7)
        }
        fn forget_dead_threads(
            &mut self,
            pid: u32,
            _: Option<u64>,
            live_tids: &mut dyn FnMut() -> Vec<u32>,
            _: bool,
        ) -> KernelResult<usize> {
            self.calls
                .push(Call::ForgetDeadThreads(pid, !live_tids().is_empty()));
            Ok(0)
        }
        fn housekeeping(&mut self) {
            self.calls.push(Call::Housekeeping);
        }
    }

    /// A real process to trace, killed when dropped.
    struct Sleeper(Child);

    impl Sleeper {
        fn start() -> Self {
            let child = Command::new("sleep").arg("60").spawn().expect("sleep");
            // Out of its exec: its libraries are mapped.
            crate::target::tasks::wait_out_of_execve(child.id()).expect("sleep runs");
            while Process::open(child.id())
                .and_then(|p| p.maps())
                .map_or(true, |m| {
                    !m.iter()
                        .any(|m| m.path.as_deref().is_some_and(|p| p.contains("libc")))
                })
            {
                std::thread::yield_now();
            }
            Sleeper(child)
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A trace of `first`, attached as `trace::setup` attaches.
    fn trace_of(first: &Sleeper) -> LiveTrace<FakeKernel> {
        let process = Process::open(first.pid()).unwrap();
        let objects = detect::for_running(&process, &[], false).unwrap();
        let mut kernel = FakeKernel::default();
        kernel.add_target(first.pid()).unwrap();
        for object in &objects {
            kernel.attach(object, first.pid()).unwrap();
        }
        let info = ProcessInfo {
            pid: first.pid(),
            parent: None,
            command: process.command_line(),
            allocators: allocator_infos(&objects, None),
            state: ProcessState::Running,
        };
        let run = RunInfo {
            pid: first.pid(),
            command: info.command.clone(),
            processes: vec![info.clone()],
            ..RunInfo::default()
        };
        kernel.calls.clear();
        LiveTrace::new(
            kernel,
            vec![Target::new(process, info, objects)],
            run,
            ProbeOptions::default(),
            None,
        )
    }

    fn states(trace: &LiveTrace<FakeKernel>) -> Vec<(u32, ProcessState)> {
        trace
            .run
            .processes
            .iter()
            .map(|p| (p.pid, p.state))
            .collect()
    }

    #[test]
    fn a_forked_child_of_the_same_program_reuses_its_parents_objects() {
        let (parent, child) = (Sleeper::start(), Sleeper::start());
        let mut trace = trace_of(&parent);
        trace.add_process(child.pid(), Some(parent.pid())).unwrap();
        let objects = &trace.processes[0].objects;
        assert!(!objects.is_empty());
        let mut expected = vec![Call::AddTarget(child.pid())];
        expected.extend(
            objects
                .iter()
                .map(|o| Call::Attach(o.path.clone(), child.pid())),
        );
        assert_eq!(trace.kernel().calls, expected);
        let paths = |t: &Target| t.objects.iter().map(|o| o.path.clone()).collect::<Vec<_>>();
        assert_eq!(paths(&trace.processes[1]), paths(&trace.processes[0]));
        assert_eq!(trace.processes[1].info.parent, Some(parent.pid()));
        assert_eq!(
            states(&trace),
            vec![
                (parent.pid(), ProcessState::Running),
                (child.pid(), ProcessState::Running)
            ]
        );
        // Heard of twice (the launcher and the tracepoint): traced once.
        trace.add_process(child.pid(), Some(parent.pid())).unwrap();
        assert_eq!(trace.processes.len(), 2);
        assert_eq!(trace.kernel().calls.len(), expected.len());
    }

    #[test]
    fn an_exec_drops_the_old_programs_blocks_and_reprobes_only_what_is_new() {
        let first = Sleeper::start();
        let mut trace = trace_of(&first);
        let pid = first.pid();
        trace.exec(pid, 12345).unwrap();
        // Same libc as before: already probed for this pid, not again.
        assert_eq!(
            trace.kernel().calls,
            vec![Call::DropBlocks(pid, 12345), Call::AddTarget(pid)]
        );
        assert_eq!(
            states(&trace),
            vec![(pid, ProcessState::Replaced), (pid, ProcessState::Running)]
        );
        assert!(trace.any_running());
    }

    #[test]
    fn an_ended_process_keeps_its_records_settles_its_calls_and_loses_its_probes() {
        let (parent, child) = (Sleeper::start(), Sleeper::start());
        let mut trace = trace_of(&parent);
        trace.add_process(child.pid(), Some(parent.pid())).unwrap();
        trace.kernel.calls.clear();
        trace.ended(child.pid(), Some(3));
        assert_eq!(
            trace.kernel().calls,
            vec![
                // The sleep still runs: the fake says so, not the kernel.
                Call::ForgetDeadThreads(child.pid(), true),
                Call::RemoveTarget(child.pid()),
                Call::Detach(child.pid())
            ]
        );
        assert_eq!(
            states(&trace),
            vec![
                (parent.pid(), ProcessState::Running),
                (child.pid(), ProcessState::Exited(Some(3)))
            ]
        );
        assert!(trace.any_running());
        trace.ended(parent.pid(), None);
        assert!(!trace.any_running());
    }

    #[test]
    fn a_process_that_cannot_be_attached_leaves_nothing_behind() {
        let (parent, child) = (Sleeper::start(), Sleeper::start());
        let mut trace = trace_of(&parent);
        trace.kernel.refuse_attach = true;
        assert!(trace.add_process(child.pid(), Some(parent.pid())).is_err());
        assert_eq!(
            trace.kernel().calls,
            vec![
                Call::AddTarget(child.pid()),
                Call::Detach(child.pid()),
                Call::RemoveTarget(child.pid())
            ]
        );
        assert_eq!(trace.processes.len(), 1);
        assert_eq!(trace.run.processes.len(), 1);
    }

    #[test]
    fn housekeeping_cleans_each_running_process_then_the_kernel_side() {
        let (parent, child) = (Sleeper::start(), Sleeper::start());
        let mut trace = trace_of(&parent);
        trace.add_process(child.pid(), Some(parent.pid())).unwrap();
        trace.ended(child.pid(), None);
        trace.kernel.calls.clear();
        trace.housekeeping();
        assert_eq!(
            trace.kernel().calls,
            vec![
                Call::ForgetDeadThreads(parent.pid(), true),
                Call::Housekeeping
            ]
        );
    }

    #[tokio::test]
    async fn changes_are_applied_and_a_failed_exec_ends_the_process() {
        let (parent, child) = (Sleeper::start(), Sleeper::start());
        let mut trace = trace_of(&parent);
        let mut watch = TargetWatch::attached(&[parent.pid()]).unwrap();
        trace.apply(
            ProcessChange {
                pid: child.pid(),
                kind: ChangeKind::Forked {
                    parent: parent.pid(),
                },
            },
            &mut watch,
        );
        assert_eq!(trace.processes.len(), 2);
        // Its program cannot be read any more: it counts as ended.
        let pid = child.pid();
        drop(child);
        trace.kernel.calls.clear();
        trace.apply(
            ProcessChange {
                pid,
                kind: ChangeKind::Execed { at_ns: 1 },
            },
            &mut watch,
        );
        assert_eq!(
            trace.kernel().calls,
            vec![
                Call::DropBlocks(pid, 1),
                Call::ForgetDeadThreads(pid, false),
                Call::RemoveTarget(pid),
                Call::Detach(pid)
            ]
        );
        assert_eq!(
            trace.run.processes.last().unwrap().state,
            ProcessState::Exited(None)
        );
    }
}
