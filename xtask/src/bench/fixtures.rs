//! The benchmark's programs (bench/fixtures) and the bpftrace peer script
//! (bench/peers), prepared in the bench directory.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::{cmd, output, root};

pub struct Fixtures {
    pub malloc_loop: PathBuf,
    /// The loop built with musl-gcc; None where musl-tools is missing.
    pub malloc_loop_musl: Option<PathBuf>,
    pub http_server: PathBuf,
    pub many_live: PathBuf,
    pub bpftrace_script: PathBuf,
}

/// How the fixtures are built: optimized, with frame pointers (the tracer
/// walks stacks by frame pointer) and debug info (for symbolization).
const CFLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-fno-omit-frame-pointer",
    "-fno-optimize-sibling-calls",
    "-pthread",
    "-Wall",
];

impl Fixtures {
    pub fn compile(dir: &Path) -> Result<Self> {
        let source = root().join("bench/fixtures");
        let compile = |name: &str| -> Result<PathBuf> {
            let out = dir.join(name);
            crate::run(
                cmd("gcc")
                    .args(CFLAGS)
                    .arg("-o")
                    .arg(&out)
                    .arg(source.join(format!("{name}.c"))),
            )?;
            Ok(out)
        };
        // The peer script names the C library by path; use this machine's.
        let libc = libc_path()?;
        let script = fs::read_to_string(root().join("bench/peers/memleak.bt"))?
            .replace("/lib/x86_64-linux-gnu/libc.so.6", &libc);
        let bpftrace_script = dir.join("memleak.bt");
        fs::write(&bpftrace_script, script)?;
        let musl = dir.join("malloc_loop_musl");
        let malloc_loop_musl = crate::run(
            cmd("musl-gcc")
                .args(CFLAGS)
                .arg("-o")
                .arg(&musl)
                .arg(source.join("malloc_loop.c")),
        )
        .ok()
        .map(|_| musl);
        Ok(Fixtures {
            malloc_loop: compile("malloc_loop")?,
            malloc_loop_musl,
            http_server: compile("http_server")?,
            many_live: compile("many_live")?,
            bpftrace_script,
        })
    }
}

/// The C library the fixtures load, from the dynamic loader's list.
fn libc_path() -> Result<String> {
    let list = output(cmd("ldd").arg("/bin/true")).context("ldd /bin/true failed")?;
    list.lines()
        .find_map(|l| {
            let (name, rest) = l.trim().split_once(" => ")?;
            name.starts_with("libc.so")
                .then(|| rest.split(" (").next().unwrap_or(rest).trim().to_string())
        })
        .context("no libc.so in `ldd /bin/true`")
}
