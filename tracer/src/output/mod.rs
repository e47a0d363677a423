//! Report formats. Each is a pure function of a `Report`.

pub mod json;
pub mod text;
