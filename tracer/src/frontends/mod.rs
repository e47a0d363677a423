//! What the user runs: `report` (also `run` and `flamegraph`), `top`,
//! `check`, `serve`, `diff` and `doctor`; `live_view` is what `top` and `serve` both
//! show.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use anyhow::{Context as _, Result};

pub mod check;
pub mod diff;
pub mod doctor;
pub mod live_view;
pub mod report;
pub mod serve;
pub mod top;

/// Standard output, or a new file that is never a symlink planted in the path.
pub fn open_output(path: Option<&Path>) -> Result<Box<dyn Write>> {
    match path {
        None => Ok(Box::new(io::stdout())),
        Some(path) => {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(Box::new(io::BufWriter::new(file)))
        }
    }
}
