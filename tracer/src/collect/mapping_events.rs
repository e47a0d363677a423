//! The mmap family of the traced processes: attaches the syscall tracepoints
//! of `tracer-ebpf/src/mmap.rs`, reads their events into a `MappingTable`,
//! and reads the program break. Tracepoints need tracefs; without it (and
//! when it cannot be mounted) heap tracing goes on alone.

use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf,
};
use tracer_common::{MmapEvent, StackTrace, MMAP_EVENTS_LOST, MMAP_STACKS_LOST};

use crate::{collect::mappings::MappingTable, model::StackSample, target::process::Process};

/// Program name -> syscall tracepoint.
const TRACEPOINTS: &[(&str, &str)] = &[
    ("mmap_enter", "sys_enter_mmap"),
    ("mmap_exit", "sys_exit_mmap"),
    ("munmap_enter", "sys_enter_munmap"),
    ("munmap_exit", "sys_exit_munmap"),
    ("mremap_enter", "sys_enter_mremap"),
    ("mremap_exit", "sys_exit_mremap"),
    ("brk_exit", "sys_exit_brk"),
];

pub const TRACEFS: &str = "/sys/kernel/tracing";

pub struct MappingTrace {
    events: RingBuf<MapData>,
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
        let brk = current_break(process);
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
    pub lost_events: u64,
    pub lost_stacks: u64,
}

/// Mounts tracefs if needed, then loads each program of `programs`
/// (program name -> tracepoint) and attaches it to `category/tracepoint`.
pub fn attach_tracepoints(
    ebpf: &mut Ebpf,
    category: &str,
    programs: &[(&str, &str)],
) -> Result<()> {
    ensure_tracefs()?;
    for (program, tracepoint) in programs {
        let prog: &mut TracePoint = ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("eBPF object has no program {program}"))?
            .try_into()?;
        prog.load()
            .map_err(|e| crate::kernel::privileges::explain_load_error(anyhow!(e)))
            .with_context(|| format!("loading eBPF program {program}"))?;
        prog.attach(category, tracepoint)
            .with_context(|| format!("attaching {program} to {category}/{tracepoint}"))?;
    }
    Ok(())
}

impl MappingTrace {
    /// Attaches the tracepoints (the programs filter on the targets already
    /// added) and takes the event ring buffer out of `ebpf`.
    pub fn start(ebpf: &mut Ebpf, process: &Process) -> Result<Self> {
        attach_tracepoints(ebpf, "syscalls", TRACEPOINTS)?;
        let map = ebpf
            .take_map("MMAP_EVENTS")
            .context("eBPF object has no map MMAP_EVENTS")?;
        let mut trace = MappingTrace {
            events: RingBuf::try_from(map)?,
            processes: Default::default(),
            by_loader: Default::default(),
        };
        trace.add(process);
        Ok(trace)
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
        while let Some(item) = self.events.next() {
            if item.len() < std::mem::size_of::<MmapEvent>() {
                continue;
            }
            let event: MmapEvent =
                unsafe { std::ptr::read_unaligned(item.as_ptr() as *const MmapEvent) };
            if let Some(process) = self.processes.get_mut(&event.tgid) {
                process.table.apply(&event);
            }
        }
    }

    /// Drains, then samples: per-stack outstanding mappings (those made at
    /// or before `cutoff_ns`, when given) and the break's growth.
    pub fn sample(&mut self, ebpf: &Ebpf, cutoff_ns: Option<u64>) -> MappingSample {
        self.drain();
        let brk = ebpf
            .map("BRK")
            .and_then(|map| BpfHashMap::<&MapData, u32, u64>::try_from(map).ok());
        let (lost_events, lost_stacks) = counters(ebpf).unwrap_or((0, 0));
        let mut all = Vec::new();
        let mut brk_growth = 0;
        for (pid, process) in &mut self.processes {
            if let Some(value) = brk.as_ref().and_then(|b| b.get(pid, 0).ok()) {
                process.brk_last = Some(value);
                process.brk_at_attach.get_or_insert(value);
            }
            if let (Some(start), Some(now)) = (process.brk_at_attach, process.brk_last) {
                brk_growth += now as i64 - start as i64;
            }
            let mut stacks = process.table.samples(cutoff_ns);
            let loader = &process.loader_code;
            let by_loader = &mut self.by_loader;
            stacks.retain(|s| {
                !*by_loader.entry(s.stack_id).or_insert_with(|| {
                    matches!(stack_frames(ebpf, s.stack_id), Ok(Some((ips, _)))
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
            lost_events,
            lost_stacks,
        }
    }
}

fn counters(ebpf: &Ebpf) -> Result<(u64, u64)> {
    let array: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map("MMAP_COUNTERS").context("MMAP_COUNTERS")?)?;
    let read = |slot: u32| -> Result<u64> { Ok(array.get(&slot, 0)?.iter().sum()) };
    Ok((read(MMAP_EVENTS_LOST)?, read(MMAP_STACKS_LOST)?))
}

/// The frames of a mapping stack (see `collect::stack_frames`).
pub fn stack_frames(ebpf: &Ebpf, stack_id: u64) -> Result<Option<(Vec<u64>, bool)>> {
    let stacks: BpfHashMap<&MapData, u64, StackTrace> =
        BpfHashMap::try_from(ebpf.map("MMAP_STACKS").context("MMAP_STACKS")?)?;
    match stacks.get(&stack_id, 0) {
        Ok(trace) => {
            let len = (trace.len as usize).min(trace.ips.len());
            Ok(Some((trace.ips[..len].to_vec(), trace.truncated != 0)))
        }
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e).context("reading MMAP_STACKS"),
    }
}

/// The executable ranges of the process's dynamic loader (its PT_INTERP,
/// matched by inode: musl's loader is a symlink to its libc).
fn loader_code(process: &Process) -> Vec<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(exe) = process.exe() else {
        return Vec::new();
    };
    let Some(interp) = crate::target::elf::ElfInfo::read(&process.host_path(&exe))
        .ok()
        .and_then(|info| info.interpreter)
    else {
        return Vec::new();
    };
    let Ok(meta) = std::fs::metadata(process.host_path(&interp)) else {
        return Vec::new();
    };
    process
        .maps()
        .unwrap_or_default()
        .iter()
        .filter(|m| m.executable && m.inode == meta.ino())
        .map(|m| (m.start, m.end))
        .collect()
}

/// The program break now: the end of the `[heap]` mapping, or the start of
/// the break area (/proc/PID/stat field 47) while there is none.
fn current_break(process: &Process) -> Option<u64> {
    if let Ok(maps) = process.maps() {
        if let Some(heap) = maps.iter().find(|m| m.path.as_deref() == Some("[heap]")) {
            return Some(heap.end);
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", process.pid)).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3 (state); start_brk is field 47.
    rest.split_whitespace().nth(47 - 3)?.parse().ok()
}

/// Tracepoints are found through tracefs; mount it (as root) if it is not.
pub fn ensure_tracefs() -> Result<()> {
    let mounted = |dir: &str| {
        Path::new(dir)
            .join("events")
            .join("syscalls")
            .join("sys_enter_mmap")
            .exists()
    };
    if mounted(TRACEFS) || mounted("/sys/kernel/debug/tracing") {
        return Ok(());
    }
    let source = std::ffi::CString::new("tracefs").unwrap();
    let target = std::ffi::CString::new(TRACEFS).unwrap();
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 || !mounted(TRACEFS) {
        return Err(anyhow!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed ({}): as root, mount -t tracefs tracefs {TRACEFS}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
