//! The one loop every front end runs in: housekeeping every second, SIGINT
//! and SIGTERM, what happens to the traced processes (a started command's
//! last look before it exits, forks, execs, exits) and ending a started
//! command. A `FrontEnd` brings its own inputs and says what to do with
//! them, at the last look, at the exit, and at the end.

use std::{future::Future, process::ExitCode, time::Duration};

use anyhow::Result;
use tokio::{
    signal::unix::Signal as UnixSignal,
    time::{interval_at, timeout, Instant, MissedTickBehavior},
};

use crate::{
    lifecycle::{event::TargetEvent, watch::TargetWatch},
    signals::{self, Signals},
    trace::LiveTrace,
};

/// How often mappings are re-read and dead threads forgotten, whatever the
/// front end does: this bounds what a target that exits can take with it.
pub const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// How long a started command is given to end after SIGTERM, then SIGKILL.
const END_GRACE: Duration = Duration::from_secs(2);

/// Whether the loop goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// What SIGINT and SIGTERM do to the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnSignal {
    /// End it.
    Stop,
    /// A started command gets the first one (Ctrl-C reaches it through the
    /// process group, SIGTERM is passed on) and the loop waits for it to
    /// exit, so its cleanup is seen; a second one ends the loop. Attached
    /// processes: end it.
    PassOnOnce,
    /// A started command gets every one; the loop waits for it to exit.
    PassOn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    /// What a shell reports for a command this signal ended: 130 or 143.
    pub fn exit_code(self) -> ExitCode {
        let number = match self {
            Signal::Interrupt => libc::SIGINT,
            Signal::Terminate => libc::SIGTERM,
        };
        ExitCode::from(128 + number as u8)
    }
}

/// Why the loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The front end stopped it.
    Stopped,
    /// A signal; `after_passing_on`: an earlier one was passed on to the
    /// started command (`OnSignal::PassOnOnce`).
    Signal {
        signal: Signal,
        after_passing_on: bool,
    },
    /// The traced processes are gone; a started command's exit code, as a
    /// shell reports it, when known.
    Exited(Option<i32>),
}

/// A started command stopped on its way out, its memory still mapped. It
/// goes on exiting when this is dropped: on every way out of `last_look`.
pub struct LastLook<'a>(&'a TargetWatch);

impl Drop for LastLook<'_> {
    fn drop(&mut self) {
        self.0.let_exit();
    }
}

/// What a front end does in the loop.
pub trait FrontEnd {
    /// Its own inputs: timers, keys, connections.
    type Event;
    /// What SIGINT and SIGTERM do.
    const ON_SIGNAL: OnSignal;
    /// A started command still running at the end is ended (SIGTERM, then
    /// SIGKILL after 2 s), as closing its terminal would.
    const ENDS_STARTED_COMMAND: bool = false;

    /// The next input; pending forever if there is none. Cancel-safe: it
    /// races the loop's own sources.
    fn next(&mut self) -> impl Future<Output = Self::Event>;

    fn event(&mut self, trace: &mut LiveTrace, event: Self::Event) -> Result<Flow>;

    /// A started command is about to exit: read what is needed while its
    /// memory is mapped. `Stop` waits for its exit code and ends with
    /// `End::Exited` (without `exited`).
    fn last_look(&mut self, trace: &mut LiveTrace, process: LastLook<'_>) -> Result<Flow>;

    /// The traced processes are gone. `Continue` keeps the loop going on
    /// the front end's inputs and signals only.
    fn exited(&mut self, trace: &mut LiveTrace, code: Option<i32>) -> Result<Flow>;

    /// The tracer's exit code. Dropping the front end happens before a
    /// started command is ended.
    fn end(self, trace: &mut LiveTrace, end: End) -> Result<ExitCode>;
}

/// Runs `front_end` on `trace` until it, a signal or the processes' exit
/// end the loop. An error from the front end ends it at once.
pub async fn run<F: FrontEnd>(
    mut front_end: F,
    mut trace: LiveTrace,
    mut target: TargetWatch,
) -> Result<ExitCode> {
    let mut housekeeping = interval_at(Instant::now() + HOUSEKEEPING, HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The listeners `signals::install` made at start: what came since is there.
    let Signals {
        interrupt: mut sigint,
        terminate: mut sigterm,
    } = signals::take()?;
    let mut gone = false;
    let mut passed_on = false;

    let end = loop {
        tokio::select! {
            _ = housekeeping.tick(), if !gone => trace.housekeeping(),
            event = front_end.next() => {
                if front_end.event(&mut trace, event)? == Flow::Stop {
                    break End::Stopped;
                }
            }
            signal = next_signal(&mut sigint, &mut sigterm) => {
                match reaction(F::ON_SIGNAL, signal, target.started_pid(), &mut passed_on) {
                    Reaction::Wait => {}
                    Reaction::Forward(pid) => kill(pid, libc::SIGTERM),
                    Reaction::End(end) => break end,
                }
            }
            event = target.next(), if !gone => match event {
                TargetEvent::Exiting => {
                    trace.main_exiting();
                    if front_end.last_look(&mut trace, LastLook(&target))? == Flow::Stop {
                        gone = true;
                        break End::Exited(target.exit_code().await);
                    }
                }
                TargetEvent::Changed(change) => trace.apply(change, &mut target),
                TargetEvent::Exited(code) => {
                    gone = true;
                    trace.all_ended();
                    if front_end.exited(&mut trace, code)? == Flow::Stop {
                        break End::Exited(code);
                    }
                }
            },
        }
    };
    let code = front_end.end(&mut trace, end)?;
    if F::ENDS_STARTED_COMMAND && !gone {
        end_started_command(&mut target).await;
    }
    Ok(code)
}

/// The next SIGINT or SIGTERM. Cancel-safe.
async fn next_signal(sigint: &mut UnixSignal, sigterm: &mut UnixSignal) -> Signal {
    tokio::select! {
        _ = sigint.recv() => Signal::Interrupt,
        _ = sigterm.recv() => Signal::Terminate,
    }
}

/// What the loop does with a signal.
#[derive(Debug, PartialEq, Eq)]
enum Reaction {
    /// Go on: the started command has it, or nothing can take it.
    Wait,
    /// Send SIGTERM to the started command `pid`, and go on.
    Forward(u32),
    End(End),
}

/// What `signal` does under `policy`, with `started` the started
/// command's pid; `passed_on` is set when the command gets it.
fn reaction(
    policy: OnSignal,
    signal: Signal,
    started: Option<u32>,
    passed_on: &mut bool,
) -> Reaction {
    let pass_on = match policy {
        OnSignal::Stop => false,
        OnSignal::PassOnOnce => !*passed_on,
        OnSignal::PassOn => true,
    };
    match started {
        Some(pid) if pass_on => {
            *passed_on = true;
            match signal {
                // Ctrl-C has reached the command already: same process group.
                Signal::Interrupt => Reaction::Wait,
                Signal::Terminate => Reaction::Forward(pid),
            }
        }
        None if policy == OnSignal::PassOn => Reaction::Wait,
        _ => Reaction::End(End::Signal {
            signal,
            after_passing_on: *passed_on,
        }),
    }
}

/// SIGTERM, then SIGKILL if it has not exited after `END_GRACE`; a process
/// attached to is left alone.
async fn end_started_command(target: &mut TargetWatch) {
    let Some(pid) = target.started_pid() else {
        return;
    };
    kill(pid, libc::SIGTERM);
    if timeout(END_GRACE, target.exit_code()).await.is_err() {
        kill(pid, libc::SIGKILL);
        let _ = timeout(END_GRACE, target.exit_code()).await;
    }
}

/// The one place a started command is sent a signal.
fn kill(pid: u32, signal: libc::c_int) {
    // Safety: kill(2) takes plain integers; the pid is our own child's.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use Signal::{Interrupt, Terminate};

    /// The reactions to a run of signals, from a fresh loop.
    fn reactions(policy: OnSignal, started: Option<u32>, signals: &[Signal]) -> Vec<Reaction> {
        let mut passed_on = false;
        signals
            .iter()
            .map(|&signal| reaction(policy, signal, started, &mut passed_on))
            .collect()
    }

    fn end(signal: Signal, after_passing_on: bool) -> Reaction {
        Reaction::End(End::Signal {
            signal,
            after_passing_on,
        })
    }

    #[test]
    fn stop_ends_at_the_first_signal() {
        for started in [None, Some(9)] {
            assert_eq!(
                reactions(OnSignal::Stop, started, &[Terminate]),
                [end(Terminate, false)]
            );
        }
    }

    #[test]
    fn pass_on_once_waits_for_the_command_then_ends() {
        assert_eq!(
            reactions(OnSignal::PassOnOnce, Some(9), &[Interrupt, Interrupt]),
            [Reaction::Wait, end(Interrupt, true)]
        );
        assert_eq!(
            reactions(OnSignal::PassOnOnce, Some(9), &[Terminate, Interrupt]),
            [Reaction::Forward(9), end(Interrupt, true)]
        );
        assert_eq!(
            reactions(OnSignal::PassOnOnce, None, &[Interrupt]),
            [end(Interrupt, false)]
        );
    }

    #[test]
    fn pass_on_never_ends() {
        assert_eq!(
            reactions(
                OnSignal::PassOn,
                Some(9),
                &[Terminate, Interrupt, Terminate]
            ),
            [Reaction::Forward(9), Reaction::Wait, Reaction::Forward(9)]
        );
        assert_eq!(
            reactions(OnSignal::PassOn, None, &[Terminate]),
            [Reaction::Wait]
        );
    }

    #[test]
    fn a_signal_ends_a_command_with_a_shells_code() {
        assert_eq!(Interrupt.exit_code(), ExitCode::from(130));
        assert_eq!(Terminate.exit_code(), ExitCode::from(143));
    }
}
