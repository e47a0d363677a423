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

use anyhow::Result;
use tokio::io::unix::AsyncFd;
use tracer_common::{ProcEvent, PROC_EXEC, PROC_FORK};

use crate::{
    kernel::maps::EventRing,
    lifecycle::event::{ChangeKind, ProcessChange},
    target::tasks,
};

pub struct ProcEvents {
    ring: AsyncFd<EventRing<ProcEvent>>,
    follow_forks: bool,
    pending: VecDeque<ProcessChange>,
}

impl ProcEvents {
    /// Reads the events of `ring` (see `Kernel::start_sched_events`).
    pub fn new(ring: EventRing<ProcEvent>, follow_forks: bool) -> Result<Self> {
        Ok(ProcEvents {
            // Safety: the ring buffer owns its fd, closed only when it drops.
            ring: unsafe { AsyncFd::register(ring) }?,
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
            log::debug!("polling sched events at {}", crate::model::monotonic_ns());
            let mut guard = match self.ring.poll_read_ready_mut(cx) {
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(_)) | Poll::Pending => return Poll::Pending,
            };
            let ring = guard.get_inner_mut();
            while let Some(event) = ring.next_record() {
                log::debug!(
                    "sched event {event:?} read at {}",
                    crate::model::monotonic_ns()
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
        PROC_FORK if follow_forks && tasks::is_process(event.pid) => Some(ProcessChange {
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
