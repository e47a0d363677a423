//! `tracer diff`: two JSON reports compared (`report::diff`) and written as
//! text, folded lines or a differential flamegraph. Traces nothing.

use std::{io::Write as _, process::ExitCode};

use anyhow::{Context as _, Result};

use crate::{cli::DiffConfig, frontends::open_output, output, report::diff};

/// What the comparison is written as.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Changed stacks by growth.
    Text,
    /// `stack before after` lines.
    Folded,
    /// A differential flamegraph.
    Svg,
}

pub fn run(config: &DiffConfig) -> Result<ExitCode> {
    let diff = diff::compare(&diff::load(&config.before)?, &diff::load(&config.after)?);
    for warning in diff::warnings(&diff) {
        eprintln!("tracer: warning: {warning}");
    }
    let bytes = match config.format {
        Format::Text => output::diff::render_text(&diff, config.top).into_bytes(),
        Format::Folded => output::diff::render_folded(&diff, config.weight).into_bytes(),
        Format::Svg => output::diff::render_svg(&diff, config.weight)?,
    };
    let mut out = open_output(config.output.as_deref())?;
    out.write_all(&bytes)
        .and_then(|()| out.flush())
        .context("writing the diff")?;
    Ok(ExitCode::SUCCESS)
}
