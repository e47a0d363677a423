//! /proc/PID/maps lines: any text parses or is an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tracer::target::memory_map::parse(text);
    }
});
