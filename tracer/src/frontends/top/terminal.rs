//! The terminal side of `top`: refusing when there is none, raw mode and the
//! alternate screen restored on every way out (return, error, panic), and a
//! thread that turns terminal input into channel messages.

use std::io::{stdout, IsTerminal};

use anyhow::{bail, Context as _, Result};
use ratatui::{
    crossterm::event::{self, Event, KeyEvent, KeyEventKind},
    DefaultTerminal,
};
use tokio::sync::mpsc;

use super::{render, state::TopState};

pub fn require_terminal() -> Result<()> {
    if !stdout().is_terminal() {
        bail!(
            "`tracer top` needs a terminal, and standard output is not one; \
             use `tracer report` (text, --format json, folded, svg) for output to a file or pipe"
        );
    }
    Ok(())
}

/// The full-screen terminal; dropping it gives the terminal back as it was.
/// ratatui's init also installs a panic hook that restores it first.
pub struct Screen {
    terminal: DefaultTerminal,
}

impl Screen {
    pub fn open() -> Result<Self> {
        let terminal = ratatui::try_init().context("cannot set up the terminal")?;
        Ok(Screen { terminal })
    }

    pub fn draw(&mut self, state: &TopState) -> Result<()> {
        self.terminal
            .draw(|frame| render::draw(frame, state))
            .context("drawing the screen")?;
        Ok(())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

pub enum Input {
    Key(KeyEvent),
    Resize,
}

/// Reads terminal events on a thread of its own (crossterm's reads block).
/// The thread ends when the receiver is dropped and the next event arrives,
/// or with the process.
pub fn spawn_input_reader() -> mpsc::UnboundedReceiver<Input> {
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = std::thread::Builder::new()
        .name("tracer-keys".into())
        .spawn(move || loop {
            let input = match event::read() {
                Ok(Event::Key(key)) if key.kind != KeyEventKind::Release => Input::Key(key),
                Ok(Event::Resize(..)) => Input::Resize,
                Ok(_) => continue,
                Err(_) => return,
            };
            if tx.send(input).is_err() {
                return;
            }
        });
    rx
}
