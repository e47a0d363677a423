#![no_std]
// This file exists so that `tracer` can name this crate as a build-dependency
// (which makes cargo rebuild `tracer` when the programs change). The programs
// themselves are the `tracer-ebpf` binary target, built for bpfel by
// `tracer/build.rs`.
