//! Starting a trace: find what each process calls, load the programs,
//! attach them, and hand back the `LiveTrace` and the `TargetWatch` that
//! tells what happens to its processes. Attaching to running processes
//! (`attach`) or starting a command stopped at its exec (`start`).

use std::{ffi::OsString, path::Path, time::Duration};

use anyhow::{bail, Context as _, Result};

use crate::{
    cli::{RunningProcesses, TraceConfig},
    collect::mapping_events::MappingTrace,
    kernel::{
        unwind::{ObjectTables, SharedUnwinder},
        Kernel, KernelOps, LoadOptions, MapSizes, Variant,
    },
    lifecycle::{
        launch::{self, ChildOutput, Credentials},
        sched_events::ProcEvents,
        watch::TargetWatch,
    },
    report::{ProcessInfo, ProcessState, RunInfo},
    target::{allocator::AllocatorObject, detect, process::Process},
    trace::{allocator_infos, LiveTrace, ProbeOptions, Target},
};

/// `unwind_rows`: room for CFI rows (see `unwind_objects`).
fn load_kernel(options: &TraceConfig, unwind_rows: u32) -> Result<Kernel> {
    let variant = if options.noop_probes {
        Variant::Noop
    } else if options.no_stacks {
        Variant::NoStacks
    } else {
        Variant::Full
    };
    Ok(Kernel::load(LoadOptions {
        sizes: MapSizes {
            allocations: options.max_allocations,
            stacks: options.max_stacks,
            unwind: options.unwind,
            unwind_rows,
        },
        variant,
        sample_rate: options.sample_rate,
        sessions: options.uprobe_sessions,
    })?)
}

/// Attaches the probes of every allocator object.
fn attach_all(kernel: &mut Kernel, objects: &[AllocatorObject], pid: u32) -> Result<()> {
    for object in objects {
        kernel.attach(object, pid)?;
    }
    Ok(())
}

fn describe(kernel: &Kernel, verbose: bool) {
    if !verbose {
        return;
    }
    eprintln!(
        "tracer: kernel {}",
        crate::kernel::features::detected().release
    );
    for (what, path) in kernel.paths().describe() {
        eprintln!("tracer: {what}: {path}");
    }
    eprintln!("tracer: allocation returns: {}", kernel.returns());
    for a in kernel.attached() {
        let p = &a.placement;
        let kind = if p.emulated {
            "emulated"
        } else {
            "single-stepped"
        };
        let place = match (p.skip, p.instruction.is_empty()) {
            (_, true) => format!("at the entry: {}", p.reason),
            (0, false) => format!("at the entry, `{}` {kind}: {}", p.instruction, p.reason),
            (skip, false) => format!("entry+{skip}, `{}` {kind}: {}", p.instruction, p.reason),
        };
        let args = crate::target::placement::describe_args(p.args);
        let args = if args.is_empty() || a.covered_by.is_some() {
            String::new()
        } else {
            format!("; {args}")
        };
        if let Some(to) = a.covered_by {
            eprintln!(
                "tracer: not probed: {} at {}+{:#x} goes to {to} first, probed there",
                a.functions.join("/"),
                a.object,
                a.file_offset
            );
            continue;
        }
        eprintln!(
            "tracer: {} {} at {}+{:#x} ({}, {place}{args})",
            if a.session {
                "uprobe session"
            } else if a.is_return {
                "uretprobe"
            } else {
                "uprobe"
            },
            a.program,
            a.object,
            a.file_offset,
            a.functions.join("/")
        );
    }
}

fn probe_options(options: &TraceConfig) -> ProbeOptions {
    ProbeOptions {
        symbols_prefix: options.symbols_prefix.clone(),
        entry_probes: options.entry_probes,
        sample_rate: options.sample_rate,
        verbose: options.verbose,
    }
}

/// The PIDs `--pid` and `--comm` name, each once, in the order given.
fn resolve_targets(targets: &RunningProcesses) -> Result<Vec<u32>> {
    let mut pids = targets.pids.clone();
    for name in &targets.comm {
        let found = crate::target::tasks::pids_by_comm(name);
        if found.is_empty() {
            bail!("no running process is named {name:?} (--comm matches /proc/PID/comm exactly, at most 15 characters)");
        }
        pids.extend(found);
    }
    let mut seen = std::collections::HashSet::new();
    pids.retain(|pid| seen.insert(*pid));
    Ok(pids)
}

/// Attaches to running processes.
pub fn attach(
    targets: &RunningProcesses,
    options: &TraceConfig,
    min_age: Duration,
) -> Result<(LiveTrace, TargetWatch)> {
    let started = std::time::Instant::now();
    crate::kernel::features::require()?;
    let pids = resolve_targets(targets)?;
    // Every process is checked before anything is attached.
    let mut found = Vec::new();
    for &pid in &pids {
        let process = Process::open(pid)?;
        let objects = detect::for_running(&process, &options.symbols_prefix, options.entry_probes)?;
        found.push((process, objects));
    }
    let mut objects = ObjectTables::new(options.verbose);
    if cfi(options) {
        for (process, _) in &found {
            objects.prepare_process(process);
        }
    }
    let located = std::time::Instant::now();
    let mut kernel = load_kernel(options, unwind_rows(options, &objects))?;
    let loaded = std::time::Instant::now();
    // Unwind tables before any probe: an allocation walked before its
    // process has a table gets a frame-pointer stack, a second stack (and
    // metric series) for the same path that then stops growing.
    let all: Vec<&Process> = found.iter().map(|(process, _)| process).collect();
    let unwinder = unwinder(&mut kernel, objects, &all, options)?;
    let mut processes = Vec::new();
    for (process, objects) in found {
        kernel.add_target(process.pid)?;
        attach_all(&mut kernel, &objects, process.pid)?;
        let probed = objects.clone();
        let info = ProcessInfo {
            pid: process.pid,
            parent: None,
            command: process.command_line(),
            allocators: allocator_infos(&objects, options.sample_rate),
            state: ProcessState::Running,
        };
        processes.push(Target::new(process, info, probed));
    }
    if options.timings {
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
        let now = std::time::Instant::now();
        eprintln!(
            "tracer: timing: attach {:.1} ms (find allocator {:.1} ms, load programs {:.1} ms, attach {:.1} ms)",
            ms(started, now),
            ms(started, located),
            ms(located, loaded),
            ms(loaded, now)
        );
    }
    describe(&kernel, options.verbose);
    let run = run_info(&processes, min_age, options);
    let mut watch = TargetWatch::attached(&pids)?;
    let events = kernel
        .start_sched_events()
        .and_then(|ring| ProcEvents::new(ring, options.follow_forks));
    match events {
        Ok(events) => watch = watch.with_events(events),
        Err(e) if options.follow_forks => {
            bail!("--follow-forks needs the sched tracepoints: {e:#}")
        }
        Err(e) => eprintln!("tracer: a target that execs will not be re-probed: {e:#}"),
    }
    // The mmap tracepoints too, before saying so: "attached" means all of it.
    let mappings = start_mappings(&mut kernel, &processes[0].process);
    let trace = LiveTrace::new(kernel, processes, run, probe_options(options), mappings)
        .with_unwinder(unwinder);
    if options.verbose {
        for traced in &trace.processes {
            eprintln!(
                "tracer: attached to PID {} ({})",
                traced.info.pid, traced.info.command
            );
        }
    }
    Ok((trace, watch))
}

/// What reports say about the run, from the processes traced at its start.
fn run_info(processes: &[Target], min_age: Duration, options: &TraceConfig) -> RunInfo {
    let first = &processes[0].info;
    RunInfo {
        pid: first.pid,
        command: first.command.clone(),
        attached_ns: crate::model::monotonic_ns(),
        min_age_ns: min_age.as_nanos() as u64,
        allocators: first.allocators.clone(),
        processes: processes.iter().map(|t| t.info.clone()).collect(),
        labels: crate::report::label::Labeler::new(
            options.wrappers.clone(),
            options.no_wrappers.clone(),
        ),
    }
}

/// Starts a command stopped at its exec, attaches, then lets it run.
pub fn start(
    argv: Vec<OsString>,
    options: &TraceConfig,
    min_age: Duration,
    output: ChildOutput,
) -> Result<(LiveTrace, TargetWatch)> {
    crate::kernel::features::require()?;
    let exe = launch::resolve_command(Path::new(&argv[0]))?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let objects = detect::placed(
        detect::for_command(&exe, &env, &options.symbols_prefix)?,
        options.entry_probes,
    );
    // The program and its libraries' unwind tables, compiled before it runs.
    let mut unwind_objects = ObjectTables::new(options.verbose);
    if cfi(options) {
        unwind_objects.prepare_files(&crate::target::unwind::command_objects(&exe, &env));
    }
    let mut kernel = load_kernel(options, unwind_rows(options, &unwind_objects))?;
    let mut argv = argv;
    argv[0] = exe.clone().into_os_string();
    let child = launch::launch(
        &argv,
        Credentials::from_sudo(),
        output,
        options.follow_forks,
    )?;
    let pid = child.pid;
    kernel.add_target(pid)?;
    // On error, dropping `child` detaches it, so it is not left stopped.
    attach_all(&mut kernel, &objects, pid)?;
    describe(&kernel, options.verbose);
    let process = Process::open(pid).with_context(|| format!("started {}", exe.display()))?;
    let info = ProcessInfo {
        pid,
        parent: None,
        command: argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" "),
        allocators: allocator_infos(&objects, options.sample_rate),
        state: ProcessState::Running,
    };
    let processes = vec![Target::new(process.clone(), info, objects)];
    let run = run_info(&processes, min_age, options);
    let unwinder = unwinder(&mut kernel, unwind_objects, &[&process], options)?;
    let mappings = start_mappings(&mut kernel, &process);
    let trace = LiveTrace::new(kernel, processes, run, probe_options(options), mappings)
        .with_unwinder(unwinder.clone());
    match unwinder {
        // At exec only the program and the dynamic loader are mapped: the
        // libraries' tables are added when the loader has mapped them,
        // before it runs their constructors (its debugger rendezvous), and
        // again at the program's entry point.
        Some(unwinder) => child.release_with_entry_hook(Box::new(move || {
            if let Err(e) = unwinder
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refresh_process(pid)
            {
                log::warn!("unwind tables before the entry point: {e:#}");
            }
        })),
        None => child.release(),
    }
    Ok((trace, TargetWatch::Child(child)))
}

/// Whether stacks are walked with CFI (the default).
fn cfi(options: &TraceConfig) -> bool {
    options.unwind == crate::target::unwind::UnwindMode::Cfi && !options.no_stacks
}

/// Room for CFI rows: `--unwind-rows`, or what the objects compiled before
/// load need and a quarter more (see `ObjectTables::rows_to_reserve`).
fn unwind_rows(options: &TraceConfig, objects: &ObjectTables) -> u32 {
    options
        .unwind_rows
        .unwrap_or_else(|| objects.rows_to_reserve())
}

/// CFI unwinding (the default): the unwind tables of what the processes
/// have mapped, from before their probes fire; `objects` were compiled
/// before the programs were loaded.
fn unwinder(
    kernel: &mut Kernel,
    objects: ObjectTables,
    processes: &[&Process],
    options: &TraceConfig,
) -> Result<Option<SharedUnwinder>> {
    if !cfi(options) {
        if options.verbose && !options.no_stacks {
            eprintln!("tracer: stack walk: frame pointers (--unwind fp)");
        }
        return Ok(None);
    }
    let mut unwinder = crate::kernel::unwind::Unwinder::new(kernel, objects)?;
    for process in processes {
        unwinder.add(process, None).context("unwind tables")?;
    }
    if options.verbose {
        describe_unwinding(&unwinder.stats());
    }
    Ok(Some(unwinder.shared()))
}

/// `-v`: which walk is used and what its tables take.
fn describe_unwinding(stats: &crate::kernel::unwind::UnwindStats) {
    eprintln!(
        "tracer: stack walk: CFI (.eh_frame rows, frame pointers where an object has none); \
         tables: {} objects, {} rows ({:.1} MiB used of {:.1} MiB), {} processes",
        stats.objects,
        stats.rows,
        stats.rows_bytes() as f64 / (1 << 20) as f64,
        stats.bytes() as f64 / (1 << 20) as f64,
        stats.processes
    );
}

/// Follows the mmap family of `first` (and the other processes, which
/// `LiveTrace::new` adds); when its tracepoints cannot be attached, says why
/// in one line and the heap is traced alone.
fn start_mappings(kernel: &mut Kernel, first: &Process) -> Option<MappingTrace> {
    // Missing tracepoints (tracefs not mounted) the user can fix: said below.
    match kernel.start_mapping_events() {
        Ok(events) => Some(MappingTrace::new(events, first)),
        Err(e) => {
            eprintln!("tracer: not tracing mmap (heap tracing goes on): {e:#}");
            None
        }
    }
}
