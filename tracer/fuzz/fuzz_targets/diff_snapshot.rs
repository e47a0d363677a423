//! JSON snapshots for `tracer diff`: parse any text, diff it with itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(report) = tracer::report::diff::parse_report(text) {
        let diff = tracer::report::diff::compare(&report, &report);
        let _ = tracer::output::diff::render_text(&diff, 10);
        let _ = tracer::report::diff::warnings(&diff);
    }
});
