//! What the user runs: `report` (also `run` and `flamegraph`), `top`,
//! `check` and `serve`; `live_view` is what `top` and `serve` both show.

pub mod check;
pub mod live_view;
pub mod report;
pub mod serve;
pub mod top;
