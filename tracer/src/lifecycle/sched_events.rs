//! Forks and execs of running processes the tracer attached to, from the
//! `sched` tracepoints (`tracer-ebpf/src/proc.rs`): an exec is followed
//! always (the old program's blocks are dropped, the new one is probed), a
//! fork with `--follow-forks`. Unlike a started command's children, which
//! ptrace holds until they are probed, a running process's child runs on
//! while the tracer attaches to it: what it allocates in those first
//! milliseconds is not seen.

use std::{
    collections::VecDeque,
    task::{Context, Poll},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{MapData, RingBuf},
    Ebpf,
};
use tokio::io::unix::AsyncFd;
use tracer_common::{ProcEvent, PROC_EXEC, PROC_FORK};

use crate::{
    lifecycle::event::{ChangeKind, ProcessChange},
    target::process,
};

const TRACEPOINTS: &[(&str, &str)] = &[
    ("process_fork", "sched_process_fork"),
    ("process_exec", "sched_process_exec"),
];

/// The offset of `child_pid` in the fork tracepoint's record, from its
/// format file (it differs between kernel versions); None if unreadable.
pub fn fork_child_pid_offset() -> Option<u32> {
    let format = std::fs::read_to_string(format!(
        "{}/events/sched/sched_process_fork/format",
        crate::collect::mapping_events::TRACEFS
    ))
    .ok()?;
    format
        .lines()
        .find(|l| l.contains(" child_pid;"))?
        .split(';')
        .find_map(|part| part.trim().strip_prefix("offset:"))?
        .parse()
        .ok()
}

pub struct ProcEvents {
    ring: AsyncFd<RingBuf<MapData>>,
    follow_forks: bool,
    pending: VecDeque<ProcessChange>,
}

impl ProcEvents {
    /// Attaches the tracepoints (the offset global was set at load).
    pub fn start(ebpf: &mut Ebpf, follow_forks: bool) -> Result<Self> {
        crate::collect::mapping_events::ensure_tracefs()?;
        if fork_child_pid_offset().is_none() {
            return Err(anyhow!(
                "the sched_process_fork tracepoint's format is unreadable"
            ));
        }
        crate::collect::mapping_events::attach_tracepoints(ebpf, "sched", TRACEPOINTS)?;
        let map = ebpf
            .take_map("PROC_EVENTS")
            .context("eBPF object has no map PROC_EVENTS")?;
        Ok(ProcEvents {
            // Safety: the ring buffer owns its fd, closed only when it drops.
            ring: unsafe { AsyncFd::register(RingBuf::try_from(map)?) }?,
            follow_forks,
            pending: VecDeque::new(),
        })
    }

    /// The next change; registers for a wake-up when there is none.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<ProcessChange> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Poll::Ready(change);
            }
            log::debug!("polling sched events at {}", crate::collect::monotonic_ns());
            let mut guard = match self.ring.poll_read_ready_mut(cx) {
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(_)) | Poll::Pending => return Poll::Pending,
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() < size_of::<ProcEvent>() {
                    continue;
                }
                let event: ProcEvent =
                    unsafe { std::ptr::read_unaligned(item.as_ptr() as *const ProcEvent) };
                log::debug!(
                    "sched event {event:?} read at {}",
                    crate::collect::monotonic_ns()
                );
                if let Some(change) = change(&event, self.follow_forks) {
                    self.pending.push_back(change);
                }
            }
            guard.clear_ready();
        }
    }
}

fn change(event: &ProcEvent, follow_forks: bool) -> Option<ProcessChange> {
    match event.kind {
        // The tracepoint fires for new threads too: only a task that
        // leads its own thread group is a new process.
        PROC_FORK if follow_forks && process::is_process(event.pid) => Some(ProcessChange {
            pid: event.pid,
            kind: ChangeKind::Forked { parent: event.tgid },
        }),
        PROC_EXEC => Some(ProcessChange {
            pid: event.tgid,
            kind: ChangeKind::Execed { at_ns: event.at_ns },
        }),
        _ => None,
    }
}
