//! Developer tasks, run as `cargo xtask <command>` (alias in .cargo/config.toml).
//!
//!   setup          install what building and testing need (idempotent, quiet when done)
//!   build          setup, then build target/release/tracer
//!   test [ARGS]    build, run unit tests, then the end-to-end tests (needs root)
//!   demo [ARGS]    build, then trace a small leaking C program; ARGS go to `tracer run`
//!   fuzz [SECONDS] run the parsers' cargo-fuzz targets (tracer/fuzz), SECONDS each
//!   bench [OPTS]   build, measure tracing overhead and the tracer's own cost, write BENCHMARKS.md
//!   test-kernels [OPTS]  the end-to-end subset on other kernels under qemu (kernels/mod.rs)

mod bench;
mod demo;
mod fuzz;
mod kernels;
mod setup;

use std::{
    env,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{bail, Context, Result};

const USAGE: &str =
    "usage: cargo xtask <setup | build | test [cargo test args] | demo [tracer run options] | fuzz [seconds] | bench [--quick] [--reps N] [--output PATH] [--only loop,http,tracer] | test-kernels [--kernel SPEC,..] [more: test-kernels --help]>";

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    prepend_cargo_bin_to_path();
    let mut args = env::args_os().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<OsString> = args.collect();
    match command.to_str().unwrap_or_default() {
        "setup" => setup::run(),
        "build" => build(&rest).map(|bin| println!("tracer binary: {}", bin.display())),
        "test" => test(&rest),
        "demo" => demo::run(&rest),
        "fuzz" => fuzz::run_all(&rest),
        "bench" => bench::run(&rest),
        "test-kernels" => kernels::run(&rest),
        "" | "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command '{other}'\n{USAGE}"),
    }
}

/// CI shells and `sudo` often lack ~/.cargo/bin; cargo, rustup and a freshly
/// installed bpf-linker live there, and tracer/build.rs (run by cargo) needs them too.
/// Set once here so every child process inherits it.
fn prepend_cargo_bin_to_path() {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(cargo_home) = env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(cargo_home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    dirs.dedup();
    if let Ok(path) = env::join_paths(dirs) {
        // Single-threaded at this point, so changing the environment is sound.
        env::set_var("PATH", path);
    }
}

/// The workspace root: xtask lives directly under it.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Cargo's target directory (honours CARGO_TARGET_DIR like cargo does).
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}

/// A command that runs in the workspace root.
pub fn cmd(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    command.current_dir(root());
    command
}

/// Run a command to completion with inherited output; fail if it fails.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("could not start {}", show(command)))?;
    if !status.success() {
        bail!("{} failed ({status})", show(command));
    }
    Ok(())
}

/// Stdout of a command if it ran and succeeded; None otherwise (used for probing).
pub fn output(command: &mut Command) -> Option<String> {
    let out = command
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn show(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    format!("`{text}`")
}

/// setup, then the release build of the tracer; returns the binary's path.
pub fn build(cargo_args: &[OsString]) -> Result<PathBuf> {
    setup::run()?;
    run(cmd("cargo")
        .args(["build", "--release", "-p", "tracer"])
        .args(cargo_args))?;
    let bin = target_dir().join("release/tracer");
    if !bin.is_file() {
        bail!("build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

/// Unit tests, then (if the tests crate exists) the end-to-end tests, which
/// run the built tracer binary as root. Both run even if the first fails.
fn test(extra: &[OsString]) -> Result<()> {
    let bin = build(&[])?;
    // `cargo xtask test NAME -- --nocapture`: cargo args before `--`, test binary args after.
    let split = extra.iter().position(|a| a == "--").unwrap_or(extra.len());
    let (cargo_args, harness_args) = (&extra[..split], extra.get(split + 1..).unwrap_or(&[]));

    let mut failed = Vec::new();
    // `--test NAME` names an end-to-end test file: the unit tests have none.
    let only_e2e = cargo_args.iter().any(|a| a == "--test");
    let mut unit = cmd("cargo");
    unit.args(["test", "--release", "-p", "tracer", "-p", "tracer-common"])
        .args(cargo_args)
        .arg("--")
        .args(harness_args)
        .stdin(Stdio::null());
    if only_e2e {
        println!("xtask: --test given: end-to-end tests only");
    } else if let Err(err) = run(&mut unit) {
        eprintln!("xtask: {err:#}");
        failed.push("unit tests");
    }

    if root().join("tests/Cargo.toml").is_file() {
        let mut e2e = cmd("cargo");
        // Two at a time: each test starts a traced program plus the tracer,
        // and the machines running CI have two cores.
        e2e.args(["test", "--release", "-p", "tracer-tests"])
            .args(cargo_args)
            .arg("--");
        // libtest rejects the option twice; let the caller's choice win.
        if !harness_args
            .iter()
            .any(|a| a.to_string_lossy().starts_with("--test-threads"))
        {
            e2e.arg("--test-threads=2");
        }
        e2e.args(harness_args)
            .env("TRACER_BIN", &bin)
            .stdin(Stdio::null());
        if let Err(err) = run(&mut e2e) {
            eprintln!("xtask: {err:#}");
            failed.push("end-to-end tests");
        }
    } else {
        println!("xtask: no tests/Cargo.toml yet; skipped the end-to-end tests");
    }

    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}
