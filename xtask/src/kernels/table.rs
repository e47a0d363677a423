//! The kernel-by-test table, and the verdict: which kernels failed.

use super::{doctor, subset::Status, Column, Run};

/// Prints the table and a line per kernel; returns what failed (empty: all
/// green, or failing only where expected.rs says so, for now).
pub fn print(columns: &[Column], runs: &[Run], total_seconds: f64) -> Vec<String> {
    let per_column: Vec<Vec<(String, Status)>> = runs.iter().map(results).collect();
    let mut rows: Vec<String> = Vec::new();
    for (name, _) in per_column.iter().flatten() {
        if !rows.contains(name) {
            rows.push(name.clone());
        }
    }
    let first = rows.iter().map(String::len).max().unwrap_or(4).max(4);
    let widths: Vec<usize> = columns.iter().map(|c| c.name.len().max(6)).collect();

    println!();
    print!("{:first$}", "test");
    for (column, width) in columns.iter().zip(&widths) {
        print!("  {:width$}", column.name);
    }
    println!();
    for row in &rows {
        print!("{row:first$}");
        for (results, width) in per_column.iter().zip(&widths) {
            let cell = match results.iter().find(|(n, _)| n == row).map(|(_, s)| *s) {
                Some(Status::Ok) => "ok",
                Some(Status::Failed) => "FAILED",
                Some(Status::Skipped) => "skip",
                None => "-", // never reported: the guest stopped before it
            };
            print!("  {cell:width$}");
        }
        println!();
    }

    let mut failed = Vec::new();
    println!();
    for ((column, run), results) in columns.iter().zip(runs).zip(&per_column) {
        let booted = match &column.boot {
            None => "natively".to_string(),
            Some(_) => {
                let up = run
                    .output
                    .lines()
                    .find_map(|l| l.strip_prefix("MATRIX-KERNEL "))
                    .and_then(|l| l.split(" up ").nth(1))
                    .unwrap_or("?");
                format!("script started {up} after boot")
            }
        };
        let complete = results.len() == rows.len();
        let green =
            run.exit == Some(0) && complete && results.iter().all(|(_, s)| *s != Status::Failed);
        let verdict = match (green, column.expected_failure) {
            (true, None) => "passed".to_string(),
            (false, None) => {
                failed.push(column.name.clone());
                match run.exit {
                    Some(code) => format!("FAILED (exit {code})"),
                    None => "FAILED (no exit code: timeout or crash)".to_string(),
                }
            }
            (false, Some(reason)) => format!("failed as expected for now: {reason}"),
            (true, Some(_)) => {
                failed.push(format!(
                    "{} passes now: remove it from EXPECTED_FAILING in xtask/src/kernels/expected.rs",
                    column.name
                ));
                "passed, but is listed as expected to fail".to_string()
            }
        };
        println!(
            "{}: {verdict}; {:.0} s in all, {booted}",
            column.name, run.seconds
        );
    }
    println!("kernel matrix: {total_seconds:.0} s in all");
    failed
}

/// A run's rows: the tests' own verdicts, and doctor's checked here.
fn results(run: &Run) -> Vec<(String, Status)> {
    let mut rows = super::subset::results(&run.output);
    let release = run
        .output
        .lines()
        .find_map(|l| l.strip_prefix("MATRIX-KERNEL "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("?");
    rows.extend(doctor::check(&run.output, release).unwrap_or_default());
    rows
}
