//! Profile formats checked with readers the project did not write: pprof by
//! `go tool pprof` (the reference reader, which validates the profile), and
//! speedscope against the JSON Schema speedscope publishes.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
use tracer_tests::*;

fn trace_leaky_c(format: &str, out: &Path) {
    require_root();
    let status = TracerCmd::new("run")
        .args(["--format", format])
        .output_file(out)
        .command(fixture("leaky_c"))
        .output()
        .status;
    assert!(status.success());
}

fn go_pprof(args: &[&str], profile: &Path) -> String {
    let output = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(profile)
        .output()
        .expect("go (golang-go) is installed by `cargo xtask setup`");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "go tool pprof {args:?} rejected the profile: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `go tool pprof -raw`, read back: sample types, samples as (values,
/// location ids leaf first), each location's function names (innermost
/// first) and the mappings' lines.
struct Raw {
    sample_types: String,
    samples: Vec<(Vec<u64>, Vec<u64>)>,
    functions: HashMap<u64, Vec<String>>,
    mappings: Vec<String>,
}

fn parse_raw(text: &str) -> Raw {
    let mut raw = Raw {
        sample_types: String::new(),
        samples: Vec::new(),
        functions: HashMap::new(),
        mappings: Vec::new(),
    };
    let mut section = "";
    let mut last_location = 0;
    for line in text.lines() {
        match line {
            "Samples:" | "Locations" | "Mappings" => {
                section = line;
                continue;
            }
            _ => {}
        }
        match section {
            "Samples:" if raw.sample_types.is_empty() => raw.sample_types = line.to_string(),
            "Samples:" => {
                // "     10       1000 ...: 4 5 3 " (labels are on their own lines)
                if let Some((values, locations)) = line.split_once(':') {
                    let values: Option<Vec<u64>> =
                        values.split_whitespace().map(|v| v.parse().ok()).collect();
                    if let Some(values) = values {
                        let ids = locations
                            .split_whitespace()
                            .map(|id| id.parse().unwrap())
                            .collect();
                        raw.samples.push((values, ids));
                    }
                }
            }
            "Locations" => {
                // "     4: 0x5555 M=1 leak_malloc /src/leaky.c:15 s=0", then one
                // indented "function file:line s=0" per further (caller) line.
                let words: Vec<&str> = line.split_whitespace().collect();
                if let Some(id) = words.first().and_then(|w| w.strip_suffix(':')) {
                    last_location = id.parse().unwrap();
                    let name = words.iter().skip(2).find(|w| !w.starts_with("M="));
                    raw.functions
                        .entry(last_location)
                        .or_default()
                        .extend(name.map(|n| n.to_string()));
                } else if let Some(name) = words.first() {
                    raw.functions
                        .get_mut(&last_location)
                        .unwrap()
                        .push(name.to_string());
                }
            }
            "Mappings" => raw.mappings.push(line.to_string()),
            _ => {}
        }
    }
    raw
}

fn build_id(program: &Path) -> String {
    let notes = Command::new("readelf")
        .arg("-n")
        .arg(program)
        .output()
        .unwrap();
    let notes = String::from_utf8_lossy(&notes.stdout);
    notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("gcc links a build id")
        .to_string()
}

#[test]
fn pprof_is_read_by_go_tool_pprof_with_exact_values() {
    let path = temp_path("leaky.pb.gz");
    trace_leaky_c("pprof", &path);
    let raw = parse_raw(&go_pprof(&["-raw"], &path));
    assert_eq!(
        raw.sample_types,
        "alloc_objects/count alloc_space/bytes inuse_objects/count inuse_space/bytes[dflt]"
    );
    let leaf = |sample: &(Vec<u64>, Vec<u64>)| raw.functions[&sample.1[0]][0].clone();
    let leak = raw
        .samples
        .iter()
        .find(|s| leaf(s) == "leak_malloc")
        .unwrap_or_else(|| panic!("no leak_malloc sample in {:?}", raw.samples));
    assert_eq!(leak.0, [10, 1000, 10, 1000]);
    assert_eq!(
        raw.functions[&leak.1[1]],
        ["main"],
        "caller next, leaf first"
    );
    // The churn is gone but was allocated: alloc_* count it, inuse_* do not.
    let churn: Vec<_> = raw.samples.iter().filter(|s| leaf(s) == "churn").collect();
    assert!(!churn.is_empty(), "freed stacks are in the profile");
    for (values, _) in churn {
        assert!(
            values[0] > 0 && values[2] == 0 && values[3] == 0,
            "{values:?}"
        );
    }
    let inuse: u64 = raw.samples.iter().map(|s| s.0[3]).sum();
    assert_eq!(inuse, 8083, "the fixture's total, as in the README");
    let program = fixture("leaky_c");
    let mapping = raw
        .mappings
        .iter()
        .find(|m| m.contains(program.to_str().unwrap()))
        .unwrap_or_else(|| panic!("no mapping for the fixture in {:?}", raw.mappings));
    assert!(mapping.contains(&build_id(&program)), "{mapping}");
    assert!(mapping.contains("[FN][FL][LN][IN]"), "{mapping}");

    // What a person would run: the default view is outstanding bytes.
    let top = go_pprof(&["-top"], &path);
    assert!(top.contains("Type: inuse_space"), "{top}");
    assert!(
        top.lines()
            .any(|l| l.trim_start().starts_with("1000B") && l.ends_with(" leak_malloc")),
        "{top}"
    );
    let lines = go_pprof(
        &[
            "-top",
            "-lines",
            "-nodefraction=0",
            "-sample_index=alloc_objects",
        ],
        &path,
    );
    assert!(
        lines.lines().any(|l| l.trim_start().starts_with("10 ")
            && l.contains("leak_malloc ")
            && l.ends_with("leaky.c:15")),
        "ten blocks allocated at leaky.c:15: {lines}"
    );
}

fn schema() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vendor/speedscope/file-format-schema.json")
}

/// Validates with python's jsonschema (Debian's python3-jsonschema, hence
/// /usr/bin/python3 rather than whichever python3 is first on PATH).
fn validate_speedscope(document: &Path) -> Result<(), String> {
    let script = "import json, sys, jsonschema\n\
        jsonschema.validate(json.load(open(sys.argv[2])), json.load(open(sys.argv[1])))";
    let output = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(schema())
        .arg(document)
        .output()
        .expect("python3-jsonschema is installed by `cargo xtask setup`");
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn speedscope_matches_its_published_schema() {
    let path = temp_path("leaky.speedscope.json");
    trace_leaky_c("speedscope", &path);
    validate_speedscope(&path).unwrap_or_else(|e| panic!("schema says: {e}"));
    let doc = read_json(&path);
    let frames = doc["shared"]["frames"].as_array().unwrap();
    let profile = &doc["profiles"][0];
    assert_eq!(profile["type"], "sampled");
    assert_eq!(profile["unit"], "bytes");
    let samples = profile["samples"].as_array().unwrap();
    let weights = profile["weights"].as_array().unwrap();
    assert_eq!(samples.len(), weights.len());
    let total: u64 = weights.iter().map(|w| w.as_u64().unwrap()).sum();
    assert_eq!(total, 8083);
    assert_eq!(profile["endValue"], 8083);
    let names = |sample: &Value| -> Vec<String> {
        sample
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                frames[i.as_u64().unwrap() as usize]["name"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let leak = samples
        .iter()
        .position(|s| names(s).last().map(String::as_str) == Some("leak_malloc"))
        .expect("a sample whose leaf is leak_malloc");
    assert_eq!(weights[leak], 1000);
    let path_names = names(&samples[leak]);
    assert_eq!(
        path_names[path_names.len() - 2],
        "main",
        "root first: {path_names:?}"
    );
    let leak_frame = &frames[samples[leak]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_u64()
        .unwrap() as usize];
    assert!(
        leak_frame["file"].as_str().unwrap().ends_with("leaky.c"),
        "{leak_frame}"
    );
    assert_eq!(leak_frame["line"], 15);

    // The validator does reject what the schema forbids.
    let mut bad = doc.clone();
    bad["profiles"][0]["unit"] = "kilograms".into();
    let bad_path = temp_path("bad.speedscope.json");
    std::fs::write(&bad_path, bad.to_string()).unwrap();
    assert!(validate_speedscope(&bad_path).is_err());
}
