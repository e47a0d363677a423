//! Turns a parsed command line into a session.

use std::{io::Write as _, process::ExitCode};

use anyhow::{Context as _, Result};

use crate::{
    allocator::{self, AllocatorObject},
    cli::{Cli, Command, DiffFormat, Format, ReportOptions},
    diff,
    launch::{self, Credentials},
    output, privileges,
    probes::{MapSizes, Probes},
    report::{AllocatorInfo, RunInfo},
    session::{open_output, Session, Target},
    target::Process,
};

pub async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Report { pid, options } => attach(pid, options).await,
        Command::Run { options, command } => run_command(command, options).await,
        Command::Flamegraph {
            pid,
            mut options,
            command,
        } => {
            options.format = Format::Svg;
            let path = options
                .output
                .get_or_insert_with(|| "flamegraph.svg".into())
                .clone();
            let code = match pid {
                Some(pid) => attach(pid, options).await?,
                None => run_command(command, options).await?,
            };
            eprintln!("tracer: wrote {}", path.display());
            Ok(code)
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

fn load_probes(options: &ReportOptions) -> Result<Probes> {
    Probes::load(MapSizes {
        allocations: options.max_allocations,
        stacks: options.max_stacks,
    })
}

fn run_info(process: &Process, object: &AllocatorObject, options: &ReportOptions) -> RunInfo {
    RunInfo {
        pid: process.pid,
        command: process.command_line(),
        attached_ns: crate::collect::monotonic_ns(),
        min_age_ns: options.min_age.as_nanos() as u64,
        allocator: AllocatorInfo {
            object: object.path.clone(),
            functions: object
                .points
                .iter()
                .flat_map(|p| p.functions.iter().map(|f| f.to_string()))
                .collect(),
        },
    }
}

fn describe(probes: &Probes, verbose: bool) {
    if !verbose {
        return;
    }
    for a in &probes.attached {
        eprintln!(
            "tracer: {} {} at {}+{:#x} ({})",
            if a.is_return { "uretprobe" } else { "uprobe" },
            a.program,
            a.object,
            a.file_offset,
            a.functions.join("/")
        );
    }
}

async fn attach(pid: u32, options: ReportOptions) -> Result<ExitCode> {
    privileges::check()?;
    let out = open_output(options.output.as_deref())?;
    let process = Process::open(pid)?;
    let maps = process.maps()?;
    let object = allocator::locate(&process, &maps)?;
    let mut probes = load_probes(&options)?;
    probes.add_target(pid)?;
    probes.attach(&object, pid)?;
    describe(&probes, options.verbose);
    let run = run_info(&process, &object, &options);
    if options.verbose {
        eprintln!("tracer: attached to PID {pid} ({})", run.command);
    }
    Session::new(probes, process, run, options, out)?
        .run(Target::Attached)
        .await
}

async fn run_command(argv: Vec<std::ffi::OsString>, options: ReportOptions) -> Result<ExitCode> {
    privileges::check()?;
    let out = open_output(options.output.as_deref())?;
    let exe = launch::resolve_command(std::path::Path::new(&argv[0]))?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let object = allocator::locate_for_command(&exe, &env)?;
    let mut probes = load_probes(&options)?;
    let mut argv = argv;
    argv[0] = exe.clone().into_os_string();
    let child = launch::launch(&argv, Credentials::from_sudo())?;
    let pid = child.pid;
    probes.add_target(pid)?;
    // On error, dropping `child` detaches it, so it is not left stopped.
    probes.attach(&object, pid)?;
    describe(&probes, options.verbose);
    let process = Process::open(pid).with_context(|| format!("started {}", exe.display()))?;
    let mut run = run_info(&process, &object, &options);
    run.command = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let session = Session::new(probes, process, run, options, out)?;
    child.release();
    session.run(Target::Child(child)).await
}
