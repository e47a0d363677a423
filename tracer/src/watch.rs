//! How a session learns that its target is gone: a pidfd for a process it
//! attached to, the launcher's events for a command it started.

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
    process::ExitCode,
};

use anyhow::{Context as _, Result};
use tokio::io::unix::AsyncFd;

use crate::launch::{ChildEvent, Launched};

pub enum TargetWatch {
    /// An existing process, watched through a pidfd.
    Attached(AsyncFd<OwnedFd>),
    /// A child started by the tracer.
    Child(Launched),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetEvent {
    /// A started command is stopped on its way out, its memory still mapped:
    /// read what is needed, then call `let_exit`.
    Exiting,
    /// Gone, with the exit code a shell would report, when known.
    Exited(Option<i32>),
}

impl TargetWatch {
    pub fn attached(pid: u32) -> Result<Self> {
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("watching PID {pid}"));
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // Safety: the fd is owned by the AsyncFd and closed only when it drops.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(|e| anyhow::anyhow!("watching PID {pid}: {e}"))?;
        Ok(TargetWatch::Attached(fd))
    }

    /// The next thing that happens to the target; pending until then.
    /// Cancel-safe, for use in `select!`.
    pub async fn next(&mut self) -> TargetEvent {
        match self {
            TargetWatch::Attached(fd) => {
                let _ = fd.readable().await;
                TargetEvent::Exited(None)
            }
            TargetWatch::Child(child) => match child.events.recv().await {
                Some(ChildEvent::Exiting) => TargetEvent::Exiting,
                Some(ChildEvent::Exited(code)) => TargetEvent::Exited(Some(code)),
                None => TargetEvent::Exited(None),
            },
        }
    }

    /// The PID of a command the tracer started (None for an attached process).
    pub fn started_pid(&self) -> Option<u32> {
        match self {
            TargetWatch::Child(child) => Some(child.pid),
            TargetWatch::Attached(_) => None,
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
            }
        }
    }
}

/// A shell-style exit code as the tracer's own (0 when unknown).
pub fn exit_code(code: Option<i32>) -> ExitCode {
    ExitCode::from(code.unwrap_or(0).clamp(0, 255) as u8)
}
