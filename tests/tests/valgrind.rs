//! The tracer and valgrind's memcheck must agree on what is in use at exit,
//! in total and per leak site, for the same fixture.

use tracer_tests::*;

fn agree(name: &str) {
    require_root();
    let program = fixture(name);
    let program = program.to_str().unwrap();
    let (report, stdout, _) = trace_run(&[program], &[]);
    let expected = expectations(&stdout);
    let sites: Vec<&str> = expected.keys().map(String::as_str).collect();
    let memcheck = valgrind(program, &sites);
    assert_eq!(
        (
            report["totals"]["bytes"].as_u64().unwrap(),
            report["totals"]["allocations"].as_u64().unwrap()
        ),
        (memcheck.bytes, memcheck.blocks),
        "tracer totals vs valgrind 'in use at exit'"
    );
    assert_eq!(
        report_by_site(&report, &sites),
        memcheck.by_site,
        "per site"
    );
    assert_eq!(
        memcheck.by_site, expected,
        "valgrind vs the fixture's own count"
    );
}

#[test]
fn c_fixture_agrees_with_valgrind() {
    agree("leaky_c");
}

#[test]
fn cpp_fixture_agrees_with_valgrind() {
    agree("leaky_cpp");
}

#[test]
fn rust_fixture_agrees_with_valgrind() {
    agree("leaky_rs");
}
