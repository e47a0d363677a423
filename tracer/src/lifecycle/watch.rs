//! How a session learns what happens to its processes: pidfds for processes
//! it attached to (and fork/exec events from the kernel with
//! `--follow-forks`), the launcher's ptrace events for a command it started.

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
    process::ExitCode,
    task::Poll,
};

use anyhow::{Context as _, Result};
use tokio::io::unix::AsyncFd;

use crate::lifecycle::{
    event::{ChangeKind, ProcessChange, TargetEvent},
    launch::Launched,
    sched_events::ProcEvents,
};

pub enum TargetWatch {
    /// Running processes, each watched through a pidfd; with
    /// `--follow-forks`, also the kernel's fork and exec events.
    Attached {
        pidfds: Vec<(u32, AsyncFd<OwnedFd>)>,
        // Boxed: the ring buffer handle is large, the watch is moved around.
        events: Option<Box<ProcEvents>>,
    },
    /// A command started by the tracer (and, with `--follow-forks`, what
    /// it forks).
    Child(Launched),
}

fn pidfd(pid: u32) -> Result<AsyncFd<OwnedFd>> {
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("watching PID {pid}"));
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // Safety: the fd is owned by the AsyncFd and closed only when it drops.
    unsafe { AsyncFd::register(fd) }.map_err(|e| anyhow::anyhow!("watching PID {pid}: {e}"))
}

impl TargetWatch {
    pub fn attached(pids: &[u32]) -> Result<Self> {
        let pidfds = pids
            .iter()
            .map(|&pid| Ok((pid, pidfd(pid)?)))
            .collect::<Result<_>>()?;
        Ok(TargetWatch::Attached {
            pidfds,
            events: None,
        })
    }

    /// With `--follow-forks` on running processes: hear of their forks and
    /// execs from the kernel.
    pub fn with_events(mut self, new: ProcEvents) -> Self {
        if let TargetWatch::Attached { events, .. } = &mut self {
            *events = Some(Box::new(new));
        }
        self
    }

    /// Watches one more running process (one that a traced process forked).
    pub fn watch(&mut self, pid: u32) {
        if let TargetWatch::Attached { pidfds, .. } = self {
            if pidfds.iter().all(|(p, _)| *p != pid) {
                match pidfd(pid) {
                    Ok(fd) => pidfds.push((pid, fd)),
                    Err(e) => log::debug!("{e:#}"),
                }
            }
        }
    }

    /// The next thing that happens; pending until then. Cancel-safe, for
    /// use in `select!`.
    pub async fn next(&mut self) -> TargetEvent {
        match self {
            TargetWatch::Attached { pidfds, events } => {
                if pidfds.is_empty() {
                    return TargetEvent::Exited(None);
                }
                let ended = std::future::poll_fn(|cx| {
                    if let Some(events) = events.as_mut() {
                        if let Poll::Ready(change) = events.poll_next(cx) {
                            return Poll::Ready(Err(change));
                        }
                    }
                    for (i, (_, fd)) in pidfds.iter().enumerate() {
                        if fd.poll_read_ready(cx).is_ready() {
                            return Poll::Ready(Ok(i));
                        }
                    }
                    Poll::Pending
                })
                .await;
                match ended {
                    Err(change) => TargetEvent::Changed(change),
                    Ok(i) => {
                        let (pid, _) = pidfds.remove(i);
                        if pidfds.is_empty() {
                            TargetEvent::Exited(None)
                        } else {
                            TargetEvent::Changed(ProcessChange {
                                pid,
                                kind: ChangeKind::Ended(None),
                            })
                        }
                    }
                }
            }
            TargetWatch::Child(child) => child
                .events
                .recv()
                .await
                .unwrap_or(TargetEvent::Exited(None)),
        }
    }

    /// Lets a process that waits on a change go on.
    pub fn applied(&self, change: &ProcessChange) {
        if let TargetWatch::Child(child) = self {
            if matches!(
                change.kind,
                ChangeKind::Forked { .. } | ChangeKind::Execed { .. } | ChangeKind::Exiting
            ) {
                child.resume(change.pid);
            }
        }
    }

    /// The PID of a command the tracer started (None for an attached process).
    pub fn started_pid(&self) -> Option<u32> {
        match self {
            TargetWatch::Child(child) => Some(child.pid),
            TargetWatch::Attached { .. } => None,
        }
    }

    /// Lets a command stopped at `Exiting` finish exiting.
    pub fn let_exit(&self) {
        if let TargetWatch::Child(child) = self {
            child.let_exit();
        }
    }

    /// After `let_exit`: waits for the command's exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        loop {
            match self.next().await {
                TargetEvent::Exiting => self.let_exit(),
                TargetEvent::Exited(code) => return code,
                TargetEvent::Changed(change) => self.applied(&change),
            }
        }
    }
}

/// A shell-style exit code as the tracer's own (0 when unknown).
pub fn exit_code(code: Option<i32>) -> ExitCode {
    ExitCode::from(code.unwrap_or(0).clamp(0, 255) as u8)
}
