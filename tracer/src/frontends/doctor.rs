//! `tracer doctor`: what this machine's kernel offers the tracer
//! (`kernel::features`), the paths the tracer takes because of it, and
//! whether it can run here, proven by loading its programs once (with tiny
//! maps) and attaching its tracepoints to no process. One screen, or one
//! JSON object; exit 0 when the tracer can run.

use std::{io::Write as _, process::ExitCode};

use anyhow::Result;
use serde_json::{json, Map, Value};

use crate::{
    kernel::{
        features::{self, Features, Have, Paths},
        Kernel, LoadOptions, MapSizes,
    },
    target::unwind::UnwindMode,
};

/// A check of the tracer's own programs on this kernel.
struct Trial {
    key: &'static str,
    title: &'static str,
    /// None: not tried (the tracer cannot run anyway); else the error, if any.
    outcome: Option<Result<(), String>>,
}

pub fn run(json: bool) -> Result<ExitCode> {
    let features = features::detected();
    let blockers = features.blockers();
    let paths = Paths::choose(features);
    let trials = if blockers.is_empty() {
        trials()
    } else {
        untried()
    };
    // Loading the programs in frame-pointer mode is what every run needs.
    let loads = trials.iter().find(|t| t.key == "load_fp");
    let can_run = blockers.is_empty() && loads.is_some_and(|t| matches!(t.outcome, Some(Ok(()))));
    let text = if json {
        serde_json::to_string_pretty(&document(features, &paths, &trials, &blockers, can_run))?
    } else {
        screen(features, &paths, &trials, &blockers, can_run)
    };
    // A reader that stops early (`| head`) is no error.
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    Ok(if can_run {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn untried() -> Vec<Trial> {
    TRIALS
        .iter()
        .map(|(key, title)| Trial {
            key,
            title,
            outcome: None,
        })
        .collect()
}

const TRIALS: [(&str, &str); 4] = [
    ("load_fp", "programs load (--unwind fp)"),
    ("load_cfi", "programs load (--unwind cfi)"),
    ("mmap_tracepoints", "mmap tracepoints attach"),
    ("sched_tracepoints", "fork/exec tracepoints attach"),
];

/// Loads the programs as a run would, with tiny maps, in each unwind mode,
/// and attaches the tracepoint programs (which count nothing: no target).
fn trials() -> Vec<Trial> {
    let load = |unwind| {
        Kernel::load(LoadOptions {
            sizes: MapSizes {
                allocations: 1024,
                stacks: 64,
                unwind,
                unwind_rows: 1024,
            },
            ..LoadOptions::default()
        })
    };
    let one_line = |e: anyhow::Error| format!("{e:#}").replace('\n', " | ");
    let fp = load(UnwindMode::Fp);
    let cfi = load(UnwindMode::Cfi)
        .map(drop)
        .map_err(|e| one_line(e.into()));
    let (fp, mmap, sched) = match fp {
        Ok(mut kernel) => {
            let mmap = kernel.start_mapping_events().map(drop).map_err(one_line);
            let sched = kernel.start_sched_events().map(drop).map_err(one_line);
            (Ok(()), Some(mmap), Some(sched))
        }
        Err(e) => (Err(one_line(e.into())), None, None),
    };
    let outcomes = [Some(fp), Some(cfi), mmap, sched];
    TRIALS
        .iter()
        .zip(outcomes)
        .map(|((key, title), outcome)| Trial {
            key,
            title,
            outcome,
        })
        .collect()
}

fn have_json(have: Have) -> Value {
    match have {
        Have::Yes => Value::Bool(true),
        Have::No => Value::Bool(false),
        Have::Unknown => Value::Null,
    }
}

fn document(
    features: &Features,
    paths: &Paths,
    trials: &[Trial],
    blockers: &[String],
    can_run: bool,
) -> Value {
    let mut capabilities = Map::new();
    for (key, _, probe) in features.list() {
        capabilities.insert(
            key.into(),
            json!({ "available": have_json(probe.have), "detail": probe.detail }),
        );
    }
    let mut programs = Map::new();
    for trial in trials {
        let (ok, detail) = match &trial.outcome {
            None => (Value::Null, "not tried".to_string()),
            Some(Ok(())) => (Value::Bool(true), String::new()),
            Some(Err(e)) => (Value::Bool(false), e.clone()),
        };
        programs.insert(trial.key.into(), json!({ "ok": ok, "detail": detail }));
    }
    json!({
        "kernel": { "release": features.release, "version": features.version },
        "can_run": can_run,
        "blockers": blockers,
        "capabilities": capabilities,
        "programs": programs,
        "paths": {
            "map_reads": if paths.batch_reads { "batch" } else { "key_by_key" },
            "cfi_walk": "global_function",
            "sampled_allocation_probes": if paths.sessions { "uprobe_session" } else { "uprobe_uretprobe" },
            "moved_probes": if paths.cookies { "attach_cookie" } else { "page_offset_map" },
            "stack_slot_reclamation": paths.reclaim,
            "mmap_tracking": paths.mappings,
            "mmap_callers": paths.mapping_callers,
            "fork_exec_events": paths.proc_events,
            "described": paths
                .describe()
                .into_iter()
                .map(|(what, path)| format!("{what}: {path}"))
                .collect::<Vec<_>>(),
        },
    })
}

fn screen(
    features: &Features,
    paths: &Paths,
    trials: &[Trial],
    blockers: &[String],
    can_run: bool,
) -> String {
    let mut out = format!(
        "tracer doctor: kernel {} {}\n\nWhat the kernel offers\n",
        features.release, features.version
    );
    let width = features
        .list()
        .iter()
        .map(|(_, title, _)| title.len())
        .chain(TRIALS.iter().map(|(_, title)| title.len()))
        .max()
        .unwrap_or(0);
    for (_, title, probe) in features.list() {
        let answer = match probe.have {
            Have::Yes => "yes",
            Have::No => "no",
            Have::Unknown => "?",
        };
        out += format!("  {title:width$}  {answer:3}  {}", probe.detail).trim_end();
        out += "\n";
    }
    out += "\nThe tracer's programs\n";
    for trial in trials {
        let (answer, detail) = match &trial.outcome {
            None => ("-", "not tried".to_string()),
            Some(Ok(())) => ("yes", String::new()),
            Some(Err(e)) => ("no", e.clone()),
        };
        out += format!("  {:width$}  {answer:3}  {detail}", trial.title).trim_end();
        out += "\n";
    }
    out += "\nWhat the tracer does here\n";
    for (what, path) in paths.describe() {
        out += &format!("  {what}: {path}\n");
    }
    out += "\n";
    if can_run {
        out += "The tracer can run here.";
    } else if blockers.is_empty() {
        out += "The tracer cannot run here: its programs do not load (above).";
    } else {
        out += "The tracer cannot run here:";
        for blocker in blockers {
            out += &format!("\n  {blocker}");
        }
    }
    out
}
