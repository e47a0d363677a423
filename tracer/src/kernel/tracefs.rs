//! Tracepoints: tracefs (mounted if it is not), the two sets the tracer
//! attaches (the mmap-family syscalls, the scheduler's fork and exec), and
//! what their record formats say.

use std::path::Path;

use anyhow::{anyhow, Result};
use tracer_common::{MmapEvent, ProcEvent};

use super::{
    maps::{self, EventRing},
    Kernel,
};

pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Program name -> syscall tracepoint (tracer-ebpf/src/mmap.rs).
const MMAP_TRACEPOINTS: &[(&str, &str)] = &[
    ("mmap_enter", "sys_enter_mmap"),
    ("mmap_exit", "sys_exit_mmap"),
    ("munmap_enter", "sys_enter_munmap"),
    ("munmap_exit", "sys_exit_munmap"),
    ("mremap_enter", "sys_enter_mremap"),
    ("mremap_exit", "sys_exit_mremap"),
    ("brk_exit", "sys_exit_brk"),
];

/// Program name -> sched tracepoint (tracer-ebpf/src/proc.rs).
const SCHED_TRACEPOINTS: &[(&str, &str)] = &[
    ("process_fork", "sched_process_fork"),
    ("process_exec", "sched_process_exec"),
];

impl Kernel {
    /// Attaches the mmap-family tracepoints (the programs filter on the
    /// targets) and hands out their event ring buffer.
    pub fn start_mapping_events(&mut self) -> Result<EventRing<MmapEvent>> {
        if !self.paths.mappings {
            // No tracepoints is most often tracefs not mounted: its error
            // says how to mount it.
            if self.paths.mappings_off.contains("tracepoints") {
                ensure_tracefs()?;
            }
            return Err(anyhow!("mmap tracking {}", self.paths.mappings_off));
        }
        ensure_tracefs()?;
        self.loaded
            .attach_tracepoints("syscalls", MMAP_TRACEPOINTS)?;
        Ok(EventRing::take(&mut self.loaded, maps::MMAP_EVENTS)?)
    }

    /// Attaches the fork and exec tracepoints (their record's layout was
    /// given to the programs at load) and hands out their ring buffer.
    pub fn start_sched_events(&mut self) -> Result<EventRing<ProcEvent>> {
        ensure_tracefs()?;
        if fork_child_pid_offset().is_none() {
            return Err(anyhow!(
                "the sched_process_fork tracepoint's format is unreadable"
            ));
        }
        self.loaded.attach_tracepoints("sched", SCHED_TRACEPOINTS)?;
        Ok(EventRing::take(&mut self.loaded, maps::PROC_EVENTS)?)
    }
}

/// The offset of `child_pid` in the fork tracepoint's record, from its
/// format file (it differs between kernel versions); None if unreadable.
pub fn fork_child_pid_offset() -> Option<u32> {
    let format =
        std::fs::read_to_string(format!("{TRACEFS}/events/sched/sched_process_fork/format"))
            .ok()?;
    format
        .lines()
        .find(|l| l.contains(" child_pid;"))?
        .split(';')
        .find_map(|part| part.trim().strip_prefix("offset:"))?
        .parse()
        .ok()
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
