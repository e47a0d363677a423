//! Suppression files and their patterns against any text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (file, subject) = text.split_once('\0').unwrap_or((text, "malloc_wrapper"));
    if let Ok(rules) = tracer::frontends::check::suppress::parse(file, "fuzz.supp") {
        for rule in &rules {
            let _ = tracer::frontends::check::suppress::pattern_matches(&rule.pattern, subject);
        }
    }
});
