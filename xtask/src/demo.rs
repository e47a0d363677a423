//! `cargo xtask demo`: build the tracer and a small leaking C program, then
//! trace the program from its start with interval reports every 2 s.

use std::{ffi::OsString, fs, path::PathBuf};

use anyhow::{bail, Context, Result};

use crate::{build, cmd, root, target_dir};

pub fn run(tracer_args: &[OsString]) -> Result<()> {
    let tracer = build(&[])?;
    let demo = compile_demo()?;
    let status = cmd(&tracer)
        .args(["run", "--interval", "2s"])
        .args(tracer_args)
        .arg("--")
        .arg(&demo)
        .status()
        .context("could not start the tracer")?;
    if !status.success() {
        bail!("tracer exited with {status}");
    }
    Ok(())
}

fn compile_demo() -> Result<PathBuf> {
    let out_dir = target_dir().join("xtask");
    fs::create_dir_all(&out_dir)?;
    // The same program the end-to-end tests build.
    let source = root().join("tests/fixtures/demo.c");
    let binary = out_dir.join("demo");
    // -pthread and -Wall as in tests/build.rs. Frame pointers and -g: the eBPF side walks user stacks by frame pointer,
    // and the report names functions and lines from the debug info.
    crate::run(
        cmd("gcc")
            .args([
                "-g",
                "-O1",
                "-fno-omit-frame-pointer",
                "-pthread",
                "-Wall",
                "-o",
            ])
            .arg(&binary)
            .arg(&source),
    )?;
    Ok(binary)
}
