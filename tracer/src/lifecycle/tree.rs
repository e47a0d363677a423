//! Following a started command's process tree under ptrace, on the thread
//! that started it: every stop of every tracee is told to the tracer where
//! it matters and let go on, signals passed on as if we were not here.

use std::{
    collections::HashSet,
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{
    lifecycle::{
        event::{ChangeKind, ProcessChange, TargetEvent},
        ptrace,
    },
    target::tasks,
};

/// How long a stopped process waits for the tracer to deal with a change
/// before it is let go anyway: never hold a process forever.
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);

/// The traced process tree of a started command: the command, and with
/// `--follow-forks` every process it forks (ptrace attaches them at birth,
/// options inherited).
pub struct Tree<'a> {
    main: u32,
    events: &'a mpsc::UnboundedSender<TargetEvent>,
    resume: &'a std_mpsc::Receiver<u32>,
    /// Processes announced to the tracer (forked, or found at their exec).
    known: HashSet<u32>,
    /// Children released before their first stop was seen, and children
    /// whose first stop came before their parent's fork event.
    released: HashSet<u32>,
    unreleased_stops: HashSet<u32>,
}

impl<'a> Tree<'a> {
    pub fn new(
        main: u32,
        events: &'a mpsc::UnboundedSender<TargetEvent>,
        resume: &'a std_mpsc::Receiver<u32>,
    ) -> Self {
        Tree {
            main,
            events,
            resume,
            known: [main].into(),
            released: Default::default(),
            unreleased_stops: Default::default(),
        }
    }

    /// Lets the command (stopped) run, and follows its tree until it exits.
    pub fn follow(mut self) {
        ptrace::cont(self.main, 0);
        loop {
            let (pid, status) = match ptrace::wait_any() {
                Ok(r) => r,
                Err(_) => {
                    let _ = self.events.send(TargetEvent::Exited(Some(1)));
                    return;
                }
            };
            if let Some(code) = ptrace::exit_code(status) {
                if pid == self.main {
                    let _ = self.events.send(TargetEvent::Exited(Some(code)));
                    return;
                }
                self.ended(pid, code);
            } else if libc::WIFSTOPPED(status) {
                self.stopped(pid, status);
            }
        }
    }

    /// A process of the tree other than the command is gone.
    fn ended(&mut self, pid: u32, code: i32) {
        if self.known.remove(&pid) {
            let _ = self.events.send(TargetEvent::Changed(ProcessChange {
                pid,
                kind: ChangeKind::Ended(Some(code)),
            }));
        }
    }

    /// Deals with one stop of `pid` and lets it go on (or leaves it stopped
    /// where it should stay so).
    fn stopped(&mut self, pid: u32, status: libc::c_int) {
        let signal = libc::WSTOPSIG(status);
        match status >> 16 {
            libc::PTRACE_EVENT_EXIT => self.exiting(pid),
            libc::PTRACE_EVENT_FORK => self.forked(pid, true),
            libc::PTRACE_EVENT_VFORK => self.forked(pid, false),
            libc::PTRACE_EVENT_EXEC => self.execed(pid),
            libc::PTRACE_EVENT_STOP => self.group_stop(pid, signal),
            // Signal-delivery stop: deliver the signal as if we were not here.
            0 => ptrace::cont(pid, signal),
            // Another ptrace event: not a signal.
            _ => ptrace::cont(pid, 0),
        }
    }

    /// PTRACE_EVENT_EXIT: `pid` is on its way out, memory still mapped.
    fn exiting(&mut self, pid: u32) {
        if tasks::other_threads_run_on(pid) {
            // The main thread called pthread_exit; the process lives
            // on and is reported when it really ends.
            ptrace::cont(pid, 0);
            return;
        }
        if pid == self.main {
            let _ = self.events.send(TargetEvent::Exiting);
            // Wait (bounded) for the final snapshot.
            while let Ok(p) = self.resume.recv_timeout(RESUME_TIMEOUT) {
                if p == pid {
                    break;
                }
            }
        } else if self.known.contains(&pid) {
            self.announce_and_wait(pid, ChangeKind::Exiting);
        }
        ptrace::cont(pid, 0);
    }

    /// A fork (`fork`, else vfork) event of `parent`.
    fn forked(&mut self, parent: u32, fork: bool) {
        let child = ptrace::event_message(parent);
        // A vfork child borrows its parent's memory until it
        // execs: it is announced at its exec, if it makes one.
        if fork && child != 0 {
            self.known.insert(child);
            self.announce_and_wait(child, ChangeKind::Forked { parent });
            self.released.insert(child);
        } else if child != 0 {
            self.released.insert(child);
        }
        if child != 0 && self.unreleased_stops.remove(&child) {
            self.released.remove(&child);
            ptrace::cont(child, 0);
        }
        ptrace::cont(parent, 0);
    }

    /// PTRACE_EVENT_EXEC: `pid` runs a new program.
    fn execed(&mut self, pid: u32) {
        if self.known.insert(pid) {
            // A vfork child's new program.
            let parent = tasks::parent_pid(pid).unwrap_or(self.main);
            self.announce_and_wait(pid, ChangeKind::Forked { parent });
        } else {
            // Stopped since the exec: every block it has
            // recorded is the old program's.
            let at_ns = crate::model::monotonic_ns();
            self.announce_and_wait(pid, ChangeKind::Execed { at_ns });
        }
        ptrace::cont(pid, 0);
    }

    /// PTRACE_EVENT_STOP: a new child's first stop, or a group stop.
    fn group_stop(&mut self, pid: u32, signal: libc::c_int) {
        if pid != self.main && !self.known.contains(&pid) && !self.released.contains(&pid) {
            // A new child's first stop, before its parent's
            // fork event: it goes on when released.
            self.unreleased_stops.insert(pid);
            return;
        }
        if self.released.remove(&pid) {
            // A new child's first stop, already released.
            ptrace::cont(pid, 0);
            return;
        }
        if matches!(
            signal,
            libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
        ) {
            // A job-control stop (Ctrl-Z, kill -STOP): it stays
            // stopped, and we hear of the SIGCONT that ends it.
            unsafe { libc::ptrace(libc::PTRACE_LISTEN, pid as libc::pid_t, 0, 0) };
        } else {
            ptrace::cont(pid, 0);
        }
    }

    /// Tells the tracer and waits (bounded) until it lets `pid` go on.
    fn announce_and_wait(&self, pid: u32, kind: ChangeKind) {
        let _ = self
            .events
            .send(TargetEvent::Changed(ProcessChange { pid, kind }));
        let deadline = Instant::now() + RESUME_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.resume.recv_timeout(left) {
                Ok(p) if p == pid => return,
                Ok(_) => continue, // a late answer to an earlier wait
                Err(_) => return,
            }
        }
    }
}
