//! What the user runs: `report` (also `run` and `flamegraph`), `top`,
//! `check` and `serve`.

pub mod check;
pub mod report;
pub mod serve;
pub mod top;
