//! `tracer top`: the live full-screen view. `state` is what is shown and how
//! keys change it, `render` draws it, `terminal` owns the screen and the
//! keyboard; this file feeds them snapshots and keys in the driver's loop.

pub mod render;
pub mod state;
pub mod terminal;

use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use tokio::{
    sync::mpsc,
    time::{interval_at, Instant, Interval, MissedTickBehavior},
};

use self::{
    state::{Action, TopState},
    terminal::{spawn_input_reader, Input, Screen},
};
use crate::{
    cli::TopConfig,
    driver::{self, End, Flow, FrontEnd, LastLook, OnSignal},
    frontends::{
        live_view::{self, LiveView},
        open_output,
    },
    lifecycle::{launch::ChildOutput, watch::TargetWatch},
    output::{self, folded::Weight},
    trace::LiveTrace,
};

/// Where a command started by `top` writes: a file the user named, or nowhere.
pub fn command_output(path: Option<&Path>) -> Result<ChildOutput> {
    let file = match path {
        Some(path) => {
            File::create(path).with_context(|| format!("cannot write {}", path.display()))?
        }
        None => File::options()
            .write(true)
            .open("/dev/null")
            .context("opening /dev/null")?,
    };
    Ok(ChildOutput::File(file))
}

pub async fn run(trace: LiveTrace, target: TargetWatch, config: TopConfig) -> Result<ExitCode> {
    let state = TopState::new(LiveView::of(&trace, config.sort, config.group_by_function));
    let screen = Screen::open()?;
    let input = spawn_input_reader();
    let every = config.interval.max(Duration::from_millis(100));
    let mut refreshes = interval_at(Instant::now(), every);
    refreshes.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let top = Top {
        state,
        screen,
        input,
        refreshes,
        save_dir: config.save_dir,
    };
    driver::run(top, trace, target).await
}

struct Top {
    state: TopState,
    screen: Screen,
    input: mpsc::UnboundedReceiver<Input>,
    refreshes: Interval,
    save_dir: PathBuf,
}

enum Event {
    Refresh,
    Input(Input),
}

impl FrontEnd for Top {
    type Event = Event;
    const ON_SIGNAL: OnSignal = OnSignal::Stop;
    // Quitting `top -- CMD` ends the command, as closing its terminal would.
    const ENDS_STARTED_COMMAND: bool = true;

    async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.refreshes.tick(), if self.state.view.ended.is_none() => Event::Refresh,
            Some(input) = self.input.recv() => Event::Input(input),
            else => std::future::pending().await,
        }
    }

    fn event(&mut self, trace: &mut LiveTrace, event: Event) -> Result<Flow> {
        match event {
            Event::Refresh => {
                refresh(trace, &mut self.state)?;
                self.screen.draw(&self.state)?;
            }
            Event::Input(Input::Resize) => self.screen.draw(&self.state)?,
            Event::Input(Input::Key(key)) => match self.state.key(key) {
                Action::Nothing => {}
                Action::Redraw => self.screen.draw(&self.state)?,
                Action::Quit => return Ok(Flow::Stop),
                Action::SaveFlamegraph => {
                    self.state.message = Some(save(trace, &self.state, &self.save_dir, "svg"));
                    self.screen.draw(&self.state)?;
                }
                Action::SaveSnapshot => {
                    self.state.message = Some(save(trace, &self.state, &self.save_dir, "json"));
                    self.screen.draw(&self.state)?;
                }
            },
        }
        Ok(Flow::Continue)
    }

    fn last_look(&mut self, trace: &mut LiveTrace, process: LastLook<'_>) -> Result<Flow> {
        let result = refresh(trace, &mut self.state);
        drop(process);
        result?;
        self.screen.draw(&self.state)?;
        Ok(Flow::Continue)
    }

    // The view freezes on the last snapshot until `q`.
    fn exited(&mut self, trace: &mut LiveTrace, code: Option<i32>) -> Result<Flow> {
        if self.state.view.ended.is_none() {
            // The BPF maps outlive the process: one more read.
            let _ = refresh(trace, &mut self.state);
        }
        self.state.view.end(match code {
            Some(code) => format!("process exited (code {code})"),
            None => "process exited".to_string(),
        });
        self.screen.draw(&self.state)?;
        Ok(Flow::Continue)
    }

    // Dropping the screen gives the terminal back.
    fn end(self, _trace: &mut LiveTrace, _end: End) -> Result<ExitCode> {
        Ok(ExitCode::SUCCESS)
    }
}

/// Takes a snapshot into the view (see `live_view::read`).
fn refresh(trace: &mut LiveTrace, state: &mut TopState) -> Result<()> {
    let snapshot = live_view::read(trace, &mut state.view)?;
    state.update(snapshot);
    Ok(())
}

/// Writes the snapshot on screen as a flamegraph or a JSON report; returns
/// the line to show.
fn save(trace: &mut LiveTrace, state: &TopState, dir: &Path, extension: &str) -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path: PathBuf = dir.join(format!("tracer-{}-{seconds}.{extension}", state.view.pid));
    let report = trace.report(&state.view.shown, 0);
    let written = (|| -> Result<()> {
        let bytes = match extension {
            "svg" => output::flamegraph::render(&report, Weight::Bytes)?,
            _ => output::json::document(&report).into_bytes(),
        };
        let mut out = open_output(Some(&path))?;
        out.write_all(&bytes)?;
        out.flush()?;
        Ok(())
    })();
    match written {
        Ok(()) => format!("wrote {}", path.display()),
        Err(e) => format!("could not write {}: {e:#}", path.display()),
    }
}
