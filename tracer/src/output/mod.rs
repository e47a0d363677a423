//! Report formats. Each is a pure function of a `Report`.

pub mod flamegraph;
pub mod folded;
pub mod json;
pub mod text;
