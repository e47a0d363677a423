//! The mmap family of the traced processes: the events of the syscall
//! tracepoints (`tracer-ebpf/src/mmap.rs`, attached by `kernel::tracefs`)
//! applied to a `MappingTable` per process, and the program break.
//! Tracepoints need tracefs; without it (and when it cannot be mounted)
//! heap tracing goes on alone.

use std::collections::HashMap;

use anyhow::Result;
use tracer_common::{MmapEvent, MMAP_EVENTS_LOST, MMAP_STACKS_LOST};

use crate::{
    collect::mappings::MappingTable,
    kernel::{
        maps::{self, EventRing},
        programs::Loaded,
    },
    model::StackSample,
    target::{
        process::Process,
        tasks::{loader_code, program_break},
    },
};

pub struct MappingTrace {
    events: EventRing<MmapEvent>,
    processes: std::collections::HashMap<u32, MappedProcess>,
    /// Stack id -> made by the loader.
    by_loader: std::collections::HashMap<u64, bool>,
}

/// The mappings of one traced process.
struct MappedProcess {
    table: MappingTable,
    /// The program break when tracing started.
    brk_at_attach: Option<u64>,
    /// The last break known, kept for after the process is gone.
    brk_last: Option<u64>,
    /// Where the dynamic loader's code is: mappings it makes (library
    /// segments, its own memory) are not the program's.
    loader_code: Vec<(u64, u64)>,
}

impl MappedProcess {
    fn new(process: &Process) -> Self {
        let brk = program_break(process);
        MappedProcess {
            table: MappingTable::default(),
            brk_at_attach: brk,
            brk_last: brk,
            loader_code: loader_code(process),
        }
    }
}

/// Outstanding mappings and the break, at one instant.
#[derive(Clone, Debug, Default)]
pub struct MappingSample {
    pub stacks: Vec<StackSample>,
    /// Over all processes.
    pub brk_growth: i64,
    /// Per process.
    pub brk_growth_by_pid: HashMap<u32, i64>,
    pub lost_events: u64,
    pub lost_stacks: u64,
}

impl MappingTrace {
    /// Follows `process` through the events of `events` (see
    /// `Kernel::start_mapping_events`).
    pub fn new(events: EventRing<MmapEvent>, process: &Process) -> Self {
        let mut trace = MappingTrace {
            events,
            processes: Default::default(),
            by_loader: Default::default(),
        };
        trace.add(process);
        trace
    }

    /// Follows one more process (or a process anew after an exec: what it
    /// had mapped went with its old image).
    pub fn add(&mut self, process: &Process) {
        self.drain();
        self.processes
            .insert(process.pid, MappedProcess::new(process));
    }

    /// Applies every event waiting in the ring buffer.
    pub fn drain(&mut self) {
        while let Some(event) = self.events.next_record() {
            if let Some(process) = self.processes.get_mut(&event.tgid) {
                process.table.apply(&event);
            }
        }
    }

    /// Drains, then samples: per-stack outstanding mappings (those made at
    /// or before `cutoff_ns`, when given) and the break's growth.
    pub fn sample(&mut self, loaded: &Loaded, cutoff_ns: Option<u64>) -> MappingSample {
        self.drain();
        let brk = maps::brk(loaded).ok();
        let (lost_events, lost_stacks) = counters(loaded).unwrap_or((0, 0));
        let mut all = Vec::new();
        let mut brk_growth = 0;
        let mut brk_growth_by_pid = HashMap::new();
        for (pid, process) in &mut self.processes {
            if let Some(value) = brk.as_ref().and_then(|b| b.get(pid).ok().flatten()) {
                process.brk_last = Some(value);
                process.brk_at_attach.get_or_insert(value);
            }
            if let (Some(start), Some(now)) = (process.brk_at_attach, process.brk_last) {
                brk_growth += now as i64 - start as i64;
                brk_growth_by_pid.insert(*pid, now as i64 - start as i64);
            }
            let mut stacks = process.table.samples(cutoff_ns);
            let loader = &process.loader_code;
            let by_loader = &mut self.by_loader;
            stacks.retain(|s| {
                !*by_loader.entry(s.stack_id).or_insert_with(|| {
                    matches!(stack_frames(loaded, s.stack_id), Ok(Some((ips, _)))
                        if ips.first().is_some_and(|ip| loader.iter().any(|(a, b)| a <= ip && ip < b)))
                })
            });
            for stack in &mut stacks {
                stack.pid = *pid;
            }
            all.extend(stacks);
        }
        MappingSample {
            stacks: all,
            brk_growth,
            brk_growth_by_pid,
            lost_events,
            lost_stacks,
        }
    }
}

fn counters(loaded: &Loaded) -> Result<(u64, u64)> {
    let sums = maps::counter_sums(
        loaded,
        maps::MMAP_COUNTERS,
        &[MMAP_EVENTS_LOST, MMAP_STACKS_LOST],
    )?;
    Ok((sums[0], sums[1]))
}

/// The frames of a mapping stack (see `collect::stack_frames`).
pub fn stack_frames(loaded: &Loaded, stack_id: u64) -> Result<Option<(Vec<u64>, bool)>> {
    Ok(maps::stack_frames(&maps::mmap_stacks(loaded)?, stack_id)?)
}
