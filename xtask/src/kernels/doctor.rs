//! `tracer doctor --format json` inside each kernel, checked against what
//! that kernel is known to offer: features probed with bpf(2) in these same
//! Debian kernels (../shared/notes/kernels.md) and the releases that brought
//! them upstream. Debian backports nothing of these into the kernels listed,
//! so here, and only here (a test of known kernels), a version says it.

use serde_json::Value;

use super::subset::Status;

/// (capability key in doctor's JSON, first kernel release that has it).
const KNOWN: &[(&str, (u64, u64))] = &[
    ("ring_buffer", (5, 8)),
    ("batch_ops", (5, 6)),
    ("atomic_fetch", (5, 12)),
    ("attach_cookies", (5, 15)),
    ("task_pt_regs", (5, 15)),
    ("bpf_loop", (5, 17)),
    ("uprobe_multi", (6, 6)),
    ("uprobe_sessions", (6, 13)),
];

/// The guest script's lines around `tracer doctor --format json`.
pub const BEGIN: &str = "MATRIX-DOCTOR-BEGIN";
pub const END: &str = "MATRIX-DOCTOR-END ";

/// The doctor rows for one kernel (`release` as uname -r says it): that it
/// says the tracer can run (exit 0), and that what it says each capability
/// is matches the kernel. None when the script did not run doctor (no such
/// subcommand in this checkout). Mismatches are printed.
pub fn check(output: &str, release: &str) -> Option<Vec<(String, Status)>> {
    let start = output.find(BEGIN)? + BEGIN.len();
    let end = start + output[start..].find(END)?;
    let code = output[end + END.len()..].lines().next()?.trim().to_string();
    let mut rows = vec![(
        "tracer::doctor_says_it_can_run".to_string(),
        if code == "0" {
            Status::Ok
        } else {
            Status::Failed
        },
    )];
    let facts = match serde_json::from_str::<Value>(output[start..end].trim()) {
        Ok(doc) => mismatches(&doc, release),
        Err(e) => vec![format!("doctor's JSON does not parse: {e}")],
    };
    for fact in &facts {
        println!("{release}: doctor: {fact}");
    }
    rows.push((
        "tracer::doctor_matches_the_kernel".to_string(),
        if facts.is_empty() {
            Status::Ok
        } else {
            Status::Failed
        },
    ));
    Some(rows)
}

fn mismatches(doc: &Value, release: &str) -> Vec<String> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u64>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let mut wrong = Vec::new();
    if doc["kernel"]["release"] != release {
        wrong.push(format!(
            "kernel release {} (uname: {release})",
            doc["kernel"]["release"]
        ));
    }
    for (key, since) in KNOWN {
        let expected = version >= *since;
        let said = &doc["capabilities"][key]["available"];
        if said.as_bool() != Some(expected) {
            wrong.push(format!(
                "{key}: says {said}, but {release} {} it",
                if expected { "has" } else { "lacks" }
            ));
        }
    }
    // Mappings are traced on every kernel of the matrix (5.10+); their
    // stacks start at mmap's caller where bpf_task_pt_regs is (5.15+).
    if doc["paths"]["mmap_tracking"] != true {
        wrong.push(format!(
            "mmap tracking: says {}, but {release} traces mappings",
            doc["paths"]["mmap_tracking"]
        ));
    }
    let callers = version >= (5, 15);
    if doc["paths"]["mmap_callers"].as_bool() != Some(callers) {
        wrong.push(format!(
            "mmap callers: says {}, but {release} {} bpf_task_pt_regs",
            doc["paths"]["mmap_callers"],
            if callers { "has" } else { "lacks" }
        ));
    }
    wrong
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(release: &str, have: &[&str]) -> String {
        let caps: Vec<String> = KNOWN
            .iter()
            .map(|(k, _)| format!("\"{k}\": {{\"available\": {}}}", have.contains(k)))
            .collect();
        format!(
            "{BEGIN}\n{{\"kernel\": {{\"release\": \"{release}\"}}, \"capabilities\": {{{}}}, \"paths\": {{\"mmap_tracking\": true, \"mmap_callers\": {}}}}}\n{END}0\n",
            caps.join(", "),
            have.contains(&"task_pt_regs")
        )
    }

    #[test]
    fn capabilities_are_checked_against_the_release() {
        let all_but_new = [
            "ring_buffer",
            "batch_ops",
            "atomic_fetch",
            "attach_cookies",
            "task_pt_regs",
            "bpf_loop",
        ];
        let rows = check(&doc("6.1.0-50-amd64", &all_but_new), "6.1.0-50-amd64").unwrap();
        assert!(rows.iter().all(|(_, s)| *s == Status::Ok));
        // 5.10 has no bpf_loop: saying it has is wrong.
        let rows = check(&doc("5.10.0-32-amd64", &all_but_new), "5.10.0-32-amd64").unwrap();
        assert!(rows[1].1 == Status::Failed);
        // What 5.10 has: right, mappings traced without their callers.
        let has_510 = ["ring_buffer", "batch_ops"];
        let rows = check(&doc("5.10.0-32-amd64", &has_510), "5.10.0-32-amd64").unwrap();
        assert!(rows.iter().all(|(_, s)| *s == Status::Ok));
        // Mappings said off on 5.10 is wrong.
        let off = doc("5.10.0-32-amd64", &has_510)
            .replace("\"mmap_tracking\": true", "\"mmap_tracking\": false");
        let rows = check(&off, "5.10.0-32-amd64").unwrap();
        assert!(rows[1].1 == Status::Failed);
        assert!(check("no doctor here", "6.1.0-50-amd64").is_none());
    }
}
