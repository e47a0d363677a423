//! The kernel side: loading the eBPF programs, attaching them, reading and
//! writing their maps.

pub mod batch;
pub mod privileges;
pub mod probes;
pub mod sessions;
pub mod slots;
