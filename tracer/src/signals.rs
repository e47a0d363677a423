//! SIGINT and SIGTERM, listened for from the very start. A tokio `Signal`
//! only sees signals that arrive after it was created, and until one exists
//! the default action (death, without a report) applies: so `install` makes
//! the listeners before anything slow (loading programs, attaching, starting
//! a command) and the loop that finally waits on them `take`s the same ones.

use std::sync::Mutex;

use anyhow::Result;
use tokio::signal::unix::{signal, Signal, SignalKind};

pub struct Signals {
    pub interrupt: Signal,
    pub terminate: Signal,
}

static EARLY: Mutex<Option<Signals>> = Mutex::new(None);

/// Starts listening (needs the tokio runtime).
pub fn install() -> Result<()> {
    let signals = Signals {
        interrupt: signal(SignalKind::interrupt())?,
        terminate: signal(SignalKind::terminate())?,
    };
    *EARLY.lock().unwrap_or_else(|e| e.into_inner()) = Some(signals);
    Ok(())
}

/// The listeners made by `install` (with whatever arrived since), or new ones.
pub fn take() -> Result<Signals> {
    if let Some(signals) = EARLY.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Ok(signals);
    }
    Ok(Signals {
        interrupt: signal(SignalKind::interrupt())?,
        terminate: signal(SignalKind::terminate())?,
    })
}
