//! The command line of `cargo xtask bench` and how much each part runs.

use std::{ffi::OsString, path::PathBuf};

use anyhow::{bail, Context, Result};

use crate::root;

/// How long and how often each part runs. The loop: each process runs one
/// warm-up and `loop_rounds` timed rounds of `loop_iterations` malloc/free
/// pairs.
pub struct Sizes {
    pub reps: usize,
    pub loop_iterations: u64,
    pub loop_rounds: u64,
    pub http_seconds: u64,
    pub live_blocks: u64,
    pub live_window_s: u64,
}

impl Sizes {
    fn full() -> Self {
        Sizes {
            reps: 5,
            loop_iterations: 100_000,
            loop_rounds: 3,
            http_seconds: 5,
            live_blocks: 1_000_000,
            live_window_s: 10,
        }
    }

    fn quick() -> Self {
        Sizes {
            reps: 2,
            loop_iterations: 20_000,
            loop_rounds: 2,
            http_seconds: 2,
            live_blocks: 200_000,
            live_window_s: 4,
        }
    }
}

pub struct Options {
    pub sizes: Sizes,
    pub output: PathBuf,
    only: Vec<String>,
    pub quick: bool,
}

impl Options {
    /// Whether `part` (loop, http, tracer, allocators, redis) is to run: all do without --only.
    pub fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == part)
    }
}

pub fn parse(args: &[OsString]) -> Result<Options> {
    let mut quick = false;
    let mut reps = None;
    let mut output = root().join("BENCHMARKS.md");
    let mut only = Vec::new();
    let mut args = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--reps" => {
                reps = Some(
                    args.next()
                        .context("--reps needs a number")?
                        .parse::<usize>()
                        .context("--reps needs a number")?,
                )
            }
            "--output" | "-o" => {
                output = PathBuf::from(args.next().context("--output needs a path")?)
            }
            "--only" => {
                only = args
                    .next()
                    .context("--only needs a list: loop,http,tracer,allocators,redis")?
                    .split(',')
                    .map(str::to_string)
                    .collect()
            }
            other => bail!(
                "unknown bench option '{other}' (options: --quick, --reps N, --output PATH, --only loop,http,tracer,allocators,redis)"
            ),
        }
    }
    let mut sizes = if quick { Sizes::quick() } else { Sizes::full() };
    if let Some(reps) = reps {
        sizes.reps = reps.max(1);
    }
    Ok(Options {
        sizes,
        output,
        only,
        quick,
    })
}
