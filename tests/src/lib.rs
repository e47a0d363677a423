//! Helpers for the end-to-end tests: where the tracer and the fixtures are,
//! how to run them, and how to read what the fixtures say about their own
//! leaks (`EXPECT <function> <bytes> <blocks>` lines on stdout).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Output},
};

use serde_json::Value;

/// The tracer binary: $TRACER_BIN (set by `cargo xtask test`), else the
/// workspace's release build.
pub fn tracer() -> PathBuf {
    if let Some(path) = std::env::var_os("TRACER_BIN") {
        return PathBuf::from(path);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("target/release/tracer");
    assert!(
        path.exists(),
        "{} not built: run `cargo xtask test` (or set TRACER_BIN)",
        path.display()
    );
    path
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("FIXTURE_DIR")).join(name)
}

/// The end-to-end tests load eBPF programs: they need root.
pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "end-to-end tests load eBPF programs and must run as root"
    );
}

/// A scratch file path unique to this test process.
pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tracer-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// What a fixture announced: site -> (bytes, blocks).
pub fn expectations(stdout: &str) -> BTreeMap<String, (u64, u64)> {
    stdout
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("EXPECT ")?.split_whitespace();
            let site = words.next()?.to_string();
            let bytes = words.next()?.parse().ok()?;
            let blocks = words.next()?.parse().ok()?;
            Some((site, (bytes, blocks)))
        })
        .filter(|(_, (bytes, _))| *bytes > 0)
        .collect()
}

/// The leak site of a stack, given its function names innermost first: the
/// first function that is one of `sites` (a demangled name matches when it
/// is the site or ends with `::site` or starts with `site(`).
pub fn site_of<'a>(functions: &[String], sites: &[&'a str]) -> Option<&'a str> {
    functions.iter().find_map(|f| {
        sites.iter().copied().find(|site| {
            f == site || f.ends_with(&format!("::{site}")) || f.starts_with(&format!("{site}("))
        })
    })
}

/// Function names of a JSON report stack, innermost first.
pub fn frame_functions(stack: &Value) -> Vec<String> {
    stack["frames"]
        .as_array()
        .map(|frames| {
            frames
                .iter()
                .map(|f| f["function"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Outstanding (bytes, blocks) per site in a JSON report.
pub fn report_by_site(report: &Value, sites: &[&str]) -> BTreeMap<String, (u64, u64)> {
    let mut by_site = BTreeMap::new();
    for stack in report["stacks"].as_array().expect("stacks array") {
        if let Some(site) = site_of(&frame_functions(stack), sites) {
            let entry: &mut (u64, u64) = by_site.entry(site.to_string()).or_default();
            entry.0 += stack["bytes"].as_u64().unwrap();
            entry.1 += stack["allocations"].as_u64().unwrap();
        }
    }
    by_site
}

/// Runs `tracer run --format json --top 0 --output FILE [extra] -- argv`.
/// Returns the report, the fixture's stdout and the tracer's output.
pub fn trace_run(argv: &[&str], extra: &[&str]) -> (Value, String, Output) {
    trace_run_with_env(argv, extra, &[])
}

/// `trace_run` with extra environment variables (the command inherits them).
pub fn trace_run_with_env(
    argv: &[&str],
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Value, String, Output) {
    let report_path = temp_path(&format!(
        "run-{}-{}.json",
        argv[0].rsplit('/').next().unwrap(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let output = Command::new(tracer())
        .args(["run", "--format", "json", "--top", "0", "--output"])
        .arg(&report_path)
        .args(extra)
        .arg("--")
        .args(argv)
        .envs(env.iter().copied())
        .output()
        .expect("run tracer");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "tracer run failed: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&report_path).expect("report file");
    let report: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"));
    (report, stdout, output)
}

/// What valgrind's memcheck says is in use at exit: totals and per site.
pub struct Valgrind {
    pub bytes: u64,
    pub blocks: u64,
    pub by_site: BTreeMap<String, (u64, u64)>,
}

/// Runs a program under memcheck with the C and C++ runtime's exit-time
/// frees turned off (the tracer sees the process as it really exits).
pub fn valgrind(program: &str, sites: &[&str]) -> Valgrind {
    let output = Command::new("valgrind")
        .args([
            "--leak-check=full",
            "--show-leak-kinds=all",
            "--run-libc-freeres=no",
            "--run-cxx-freeres=no",
            "--num-callers=60",
            "--show-mismatched-frees=no",
        ])
        .arg(program)
        .output()
        .expect("valgrind is installed by `cargo xtask setup`");
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    let mut bytes = None;
    let mut blocks = 0;
    let mut by_site: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let number = |s: &str| s.replace(',', "").parse::<u64>().unwrap();
    // Records look like:
    //   ==1== 1,000 bytes in 10 blocks are definitely lost in loss record 9 of 11
    //   ==1==    at 0x48407B4: malloc (vg_replace_malloc.c:381)
    //   ==1==    by 0x109176: leak_malloc (leaky.c:15)
    let lines: Vec<&str> = log
        .lines()
        .map(|l| l.split_once("== ").map_or(l, |(_, r)| r))
        .collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if let Some(rest) = line.strip_prefix("in use at exit: ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            bytes = Some(number(words[0]));
            blocks = number(words[3]);
        }
        if line.contains(" in loss record ") {
            let words: Vec<&str> = line.split_whitespace().collect();
            // "N bytes in M blocks" or "N (d direct, i indirect) bytes in M blocks"
            let record_bytes = number(words[0]);
            let in_pos = words.iter().position(|w| *w == "in").unwrap();
            let record_blocks = number(words[in_pos + 1]);
            let mut functions = Vec::new();
            let mut j = i + 1;
            while j < lines.len()
                && (lines[j].trim().starts_with("at ") || lines[j].trim().starts_with("by "))
            {
                // "by 0x109176: leak_malloc (leaky.c:15)"
                if let Some((_, f)) = lines[j].split_once(": ") {
                    let name = f.rsplit_once(" (").map_or(f, |(n, _)| n);
                    functions.push(name.trim().to_string());
                }
                j += 1;
            }
            if let Some(site) = site_of(&functions, sites) {
                let e = by_site.entry(site.to_string()).or_default();
                e.0 += record_bytes;
                e.1 += record_blocks;
            }
            i = j;
            continue;
        }
        i += 1;
    }
    Valgrind {
        bytes: bytes.unwrap_or_else(|| panic!("no 'in use at exit' in valgrind output:\n{log}")),
        blocks,
        by_site,
    }
}

/// Runs a fixture with `tracer run` (extra tracer options, extra environment)
/// and holds the report against the fixture's EXPECT lines: every site
/// exact, no memory from the `churn` functions, nothing dropped. Returns the
/// report and the sites (expected ones and churn).
pub fn trace_exact(
    program: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    churn: &[&str],
) -> (Value, Vec<String>) {
    require_root();
    let program = fixture(program);
    let (report, stdout, _) = trace_run_with_env(&[program.to_str().unwrap()], extra, env);
    assert!(stdout.contains("DONE"), "fixture did not finish: {stdout}");
    let expected = expectations(&stdout);
    assert!(!expected.is_empty());
    let mut sites: Vec<String> = expected.keys().cloned().collect();
    sites.extend(churn.iter().map(|c| c.to_string()));
    let site_refs: Vec<&str> = sites.iter().map(String::as_str).collect();
    let found = report_by_site(&report, &site_refs);
    for (site, want) in &expected {
        assert_eq!(
            found.get(site),
            Some(want),
            "site {site} (bytes, blocks); report: {report:#}"
        );
    }
    for c in churn {
        assert!(
            !found.contains_key(*c),
            "freed memory from {c} reported: {:?}",
            found.get(*c)
        );
    }
    for (key, value) in report["dropped"].as_object().unwrap() {
        assert_eq!(value.as_u64(), Some(0), "dropped.{key}");
    }
    (report, sites)
}

/// Reads lines from `reader` until one contains `needle`; returns all lines.
pub fn read_until(reader: &mut impl std::io::BufRead, needle: &str) -> String {
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).unwrap();
        assert!(n > 0, "stream ended before {needle:?}; got: {seen}");
        seen.push_str(&line);
        if line.contains(needle) {
            return seen;
        }
    }
}

/// The `<title>` texts of an SVG (inferno's flamegraph frames), parsed as
/// XML; panics if it is not well-formed. inferno's SVG carries a DOCTYPE.
pub fn svg_titles(svg: &str) -> Vec<String> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(svg, options).expect("well-formed XML");
    doc.descendants()
        .filter(|n| n.has_tag_name("title"))
        .filter_map(|n| n.text())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_expectations() {
        let e = expectations("x\nEXPECT leak_a 100 2\nEXPECT start 0 0\nDONE\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e["leak_a"], (100, 2));
    }

    #[test]
    fn finds_sites_in_c_cpp_and_rust_names() {
        let sites = ["leak_a", "make_widget", "leak_box"];
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            site_of(&f(&["malloc", "leak_a", "main"]), &sites),
            Some("leak_a")
        );
        assert_eq!(
            site_of(
                &f(&["operator new(unsigned long)", "make_widget(long)"]),
                &sites
            ),
            Some("make_widget")
        );
        assert_eq!(
            site_of(&f(&["alloc::alloc::alloc", "leaky::leak_box"]), &sites),
            Some("leak_box")
        );
        assert_eq!(site_of(&f(&["leak_ab"]), &sites), None);
    }
}
