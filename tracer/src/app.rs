//! Turns a parsed command line into a traced process and the front end that
//! shows it (a report session or the top view).

use std::{io::Write as _, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};

use crate::{
    cli::{Cli, Command, DiffFormat, Format},
    frontends::{
        check,
        report::{open_output, Session},
        serve, top,
    },
    lifecycle::launch::ChildOutput,
    output,
    report::diff,
    trace::setup,
};

pub async fn run(cli: Cli) -> Result<ExitCode> {
    // Before anything slow: a Ctrl-C during setup must reach the loop.
    crate::signals::install()?;
    match cli.command {
        Command::Report { targets, options } => {
            let out = open_output(options.output.as_deref())?;
            let (trace, watch) = setup::attach(&targets, &options.trace, options.min_age)?;
            Session::new(trace, options, out).run(watch).await
        }
        Command::Run { options, command } => {
            let out = open_output(options.output.as_deref())?;
            let (trace, watch) = setup::start(
                command,
                &options.trace,
                options.min_age,
                ChildOutput::Inherit,
            )?;
            Session::new(trace, options, out).run(watch).await
        }
        Command::Flamegraph {
            targets,
            mut options,
        } => {
            options.format = Format::Svg;
            let path = options
                .output
                .get_or_insert_with(|| "flamegraph.svg".into())
                .clone();
            let out = open_output(Some(&path))?;
            let (trace, watch) = match targets.attach() {
                Some(attached) => setup::attach(&attached, &options.trace, options.min_age)?,
                None => setup::start(
                    targets.command,
                    &options.trace,
                    options.min_age,
                    ChildOutput::Inherit,
                )?,
            };
            let code = Session::new(trace, options, out).run(watch).await?;
            eprintln!("tracer: wrote {}", path.display());
            Ok(code)
        }
        Command::Check { options, command } => {
            // Bad suppressions or an unwritable report fail before the command runs.
            let rules = check::load_rules(&options)?;
            let out = match &options.report {
                Some(path) => Some(open_output(Some(path))?),
                None => None,
            };
            let (trace, watch) = setup::start(
                command,
                &options.trace,
                options.min_age,
                ChildOutput::Inherit,
            )?;
            check::run(trace, watch, options, rules, out).await
        }
        Command::Top { targets, options } => {
            // Refuse before attaching anything: a redirected top is a mistake.
            top::terminal::require_terminal()?;
            let (trace, watch) = match targets.attach() {
                Some(attached) => setup::attach(&attached, &options.trace, Duration::ZERO)?,
                None => {
                    let output = top::command_output(options.command_output.as_deref())?;
                    setup::start(targets.command, &options.trace, Duration::ZERO, output)?
                }
            };
            top::run(trace, watch, options).await
        }
        Command::Serve { targets, options } => {
            // A bad --push URL or a taken port fails before attaching.
            if let Some(url) = &options.push {
                serve::push::Endpoint::parse(url)?;
            }
            let listener = serve::bind(options.listen).await?;
            let (trace, watch) = setup::attach(&targets, &options.trace, Duration::ZERO)?;
            serve::run(trace, watch, options, listener).await
        }
        Command::Diff {
            before,
            after,
            format,
            top,
            weight,
            output,
        } => diff(&before, &after, format, top, weight, output.as_deref()),
    }
}

fn diff(
    before: &std::path::Path,
    after: &std::path::Path,
    format: DiffFormat,
    top: usize,
    weight: crate::cli::Weight,
    output: Option<&std::path::Path>,
) -> Result<ExitCode> {
    let diff = diff::compare(&diff::load(before)?, &diff::load(after)?);
    for warning in diff::warnings(&diff) {
        eprintln!("tracer: warning: {warning}");
    }
    let bytes = match format {
        DiffFormat::Text => output::diff::render_text(&diff, top).into_bytes(),
        DiffFormat::Folded => output::diff::render_folded(&diff, weight).into_bytes(),
        DiffFormat::Svg => output::diff::render_svg(&diff, weight)?,
    };
    let mut out = open_output(output)?;
    out.write_all(&bytes)
        .and_then(|()| out.flush())
        .context("writing the diff")?;
    Ok(ExitCode::SUCCESS)
}
