//! Report formats. Each is a pure function of a `Report`.

pub mod diff;
pub mod flamegraph;
pub mod folded;
pub mod json;
pub mod pprof;
pub mod protobuf;
pub mod speedscope;
pub mod text;
