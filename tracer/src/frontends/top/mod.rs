//! `tracer top`: the live full-screen view. `state` is what is shown and how
//! keys change it, `render` draws it, `terminal` owns the screen and the
//! keyboard; this file is the loop that feeds them snapshots.

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
use tokio::time::{interval_at, timeout, Instant, MissedTickBehavior};

use self::{
    state::{Action, TopState},
    terminal::{spawn_input_reader, Input, Screen},
};
use crate::{
    cli::TopConfig,
    frontends::{
        live_view::{self, LiveView},
        open_output,
        report::HOUSEKEEPING,
    },
    lifecycle::launch::ChildOutput,
    lifecycle::watch::{TargetEvent, TargetWatch},
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

pub async fn run(
    mut trace: LiveTrace,
    mut target: TargetWatch,
    options: TopConfig,
) -> Result<ExitCode> {
    let mut state = TopState::new(LiveView::of(
        &trace,
        options.sort,
        options.group_by_function,
    ));
    let mut screen = Screen::open()?;
    let mut input = spawn_input_reader();
    let crate::signals::Signals {
        interrupt: mut sigint,
        terminate: mut sigterm,
    } = crate::signals::take()?;
    let every = options.interval.max(Duration::from_millis(100));
    let started = Instant::now();
    let mut refreshes = interval_at(started, every);
    refreshes.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut housekeeping = interval_at(started + HOUSEKEEPING, HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut target_gone = false;

    loop {
        tokio::select! {
            _ = refreshes.tick(), if state.view.ended.is_none() => {
                refresh(&mut trace, &mut state)?;
                screen.draw(&state)?;
            }
            _ = housekeeping.tick(), if !target_gone => trace.housekeeping(),
            Some(event) = input.recv() => match event {
                Input::Resize => screen.draw(&state)?,
                Input::Key(key) => match state.key(key) {
                    Action::Nothing => {}
                    Action::Redraw => screen.draw(&state)?,
                    Action::Quit => break,
                    Action::SaveFlamegraph => {
                        state.message = Some(save(&mut trace, &state, &options.save_dir, "svg"));
                        screen.draw(&state)?;
                    }
                    Action::SaveSnapshot => {
                        state.message = Some(save(&mut trace, &state, &options.save_dir, "json"));
                        screen.draw(&state)?;
                    }
                },
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            event = target.next(), if !target_gone => match event {
                TargetEvent::Exiting => {
                    // Last look while its memory is still mapped.
                    trace.main_exiting();
                    let result = refresh(&mut trace, &mut state);
                    target.let_exit();
                    result?;
                    screen.draw(&state)?;
                }
                TargetEvent::Changed(change) => trace.apply(change, &mut target),
                TargetEvent::Exited(code) => {
                    target_gone = true;
                    if state.view.ended.is_none() {
                        // The BPF maps outlive the process: one more read.
                        let _ = refresh(&mut trace, &mut state);
                    }
                    state.view.end(match code {
                        Some(code) => format!("process exited (code {code})"),
                        None => "process exited".to_string(),
                    });
                    screen.draw(&state)?;
                }
            },
        }
    }
    drop(screen);
    if !target_gone {
        end_started_command(&mut target).await;
    }
    Ok(ExitCode::SUCCESS)
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

/// Quitting `top -- CMD` ends the command it started (SIGTERM, then SIGKILL
/// after 2 s), as closing its terminal would; a process attached to with
/// --pid is left alone.
async fn end_started_command(target: &mut TargetWatch) {
    let TargetWatch::Child(child) = target else {
        return;
    };
    unsafe { libc::kill(child.pid as libc::pid_t, libc::SIGTERM) };
    let pid = child.pid;
    if timeout(Duration::from_secs(2), target.exit_code())
        .await
        .is_err()
    {
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        let _ = timeout(Duration::from_secs(2), target.exit_code()).await;
    }
}
