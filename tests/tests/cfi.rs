//! `--unwind cfi`: fixtures built without frame pointers (-O2
//! -fomit-frame-pointer, Debian's libc and libstdc++, a Rust binary without
//! forced frame pointers) must have each leak reported under the right
//! function with the exact bytes, and their stacks must be whole.

use serde_json::Value;
use tracer_tests::*;

fn check(name: &str, churn: &[&str]) -> Value {
    let (report, sites) = trace_exact(name, &["--unwind", "cfi"], &[], churn);
    let sites: Vec<&str> = sites.iter().map(String::as_str).collect();
    // Every leak's stack was unwound to the outermost frame.
    for stack in report["stacks"].as_array().unwrap() {
        let functions = frame_functions(stack);
        if site_of(&functions, &sites).is_some() {
            assert_eq!(stack["truncated"], false, "{stack:#}");
            assert!(
                functions.iter().any(|f| f == "main"),
                "stack reaches main: {functions:?}"
            );
        }
    }
    report
}

#[test]
fn c_without_frame_pointers() {
    let report = check("nofp_c", &["churn"]);
    // strdup's caller, not strdup, is the site (libc has no frame pointers).
    let stack = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            let f = frame_functions(s);
            f.iter().any(|f| f.contains("strdup"))
        })
        .expect("a strdup stack");
    let functions = frame_functions(stack);
    let at = functions.iter().position(|f| f.contains("strdup")).unwrap();
    assert_eq!(functions[at + 1], "leak_strdup", "{functions:?}");
}

#[test]
fn cpp_without_frame_pointers_through_libstdcxx_new() {
    let report = check("nofp_cpp", &["churn"]);
    let stack = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| site_of(&frame_functions(s), &["make_widget"]).is_some())
        .unwrap();
    let functions = frame_functions(stack);
    assert!(functions[0].starts_with("operator new"), "{functions:?}");
    assert!(
        stack["frames"][0]["module"]
            .as_str()
            .unwrap()
            .contains("libstdc++"),
        "the stock operator new: {stack:#}"
    );
    assert!(functions[1].starts_with("make_widget"), "{functions:?}");
}

#[test]
fn rust_without_forced_frame_pointers() {
    check("leaky_rs_nofp", &["churn"]);
}

/// The same C fixture with frame pointers loses the sites: this is what the
/// CFI walker is for (and shows the fixture really has no frame pointers).
#[test]
fn frame_pointers_lose_these_sites() {
    require_root();
    let program = fixture("nofp_c");
    let (report, stdout, _) = trace_run(&[program.to_str().unwrap()], &["--unwind", "fp"]);
    let expected = expectations(&stdout);
    let sites: Vec<&str> = expected.keys().map(String::as_str).collect();
    let found = report_by_site(&report, &sites);
    assert_ne!(found.get("leak_strdup"), expected.get("leak_strdup"));
}

/// An object loaded with dlopen after the probes were attached gets its
/// unwind table at the next housekeeping tick: its leak is reported under the
/// right function and the stack reaches main.
#[test]
fn a_library_loaded_later_with_dlopen() {
    require_root();
    let host = fixture("dlopen_c");
    let plugin = fixture("libplugin.so");
    let (report, stdout, _) = trace_run(
        &[host.to_str().unwrap(), plugin.to_str().unwrap()],
        &["--unwind", "cfi"],
    );
    assert!(stdout.contains("DONE"), "fixture did not finish: {stdout}");
    let expected = expectations(&stdout);
    let found = report_by_site(&report, &["plugin_alloc"]);
    assert_eq!(
        found.get("plugin_alloc"),
        expected.get("plugin_alloc"),
        "{report:#}"
    );
    let stack = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            frame_functions(s)
                .first()
                .is_some_and(|f| f == "plugin_alloc")
        })
        .expect("the plugin's stack");
    let functions = frame_functions(stack);
    assert_eq!(
        &functions[..3],
        ["plugin_alloc", "plugin_leak", "main"],
        "{stack:#}"
    );
    assert_eq!(stack["truncated"], false, "{stack:#}");
}
