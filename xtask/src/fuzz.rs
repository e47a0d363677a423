//! `cargo xtask fuzz [SECONDS]`: run every cargo-fuzz target of the parsers
//! that read outside input (tracer/fuzz) for SECONDS each (default 30).
//! Needs the nightly toolchain (setup installs it) and cargo-fuzz (installed
//! here on first use). A crash fails the command and leaves its input in
//! tracer/fuzz/artifacts/.

use std::ffi::OsString;

use anyhow::{Context, Result};

use crate::{cmd, output, root, run, setup};

const TARGETS: &[&str] = &["proc_maps", "elf_symbols", "suppressions", "diff_snapshot"];

pub fn run_all(args: &[OsString]) -> Result<()> {
    setup::run()?;
    let seconds: u64 = match args.first() {
        Some(s) => s
            .to_string_lossy()
            .parse()
            .context("usage: cargo xtask fuzz [SECONDS per target]")?,
        None => 30,
    };
    if output(cmd("cargo").args(["fuzz", "--version"])).is_none() {
        println!("fuzz: installing cargo-fuzz");
        run(cmd("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    for target in TARGETS {
        println!("fuzz: {target} for {seconds} s");
        run(cmd("cargo")
            .current_dir(root().join("tracer"))
            .args(["+nightly", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}")))?;
    }
    println!("fuzz: no crashes in {} targets", TARGETS.len());
    Ok(())
}
