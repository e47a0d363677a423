//! The kernel-by-test table, and the verdict: which kernels failed.

use super::{doctor, expected, subset::Status, Column, Run};

/// One cell: a test's outcome on one kernel, as judged.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cell {
    Ok,
    Skipped,
    Failed,
    /// Never reported: the guest or the test binary stopped before it.
    Missing,
    /// Failed or missing, as expected.rs expects for now.
    ExpectedFailure,
}

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
    let cells: Vec<Vec<Cell>> = columns
        .iter()
        .zip(&per_column)
        .map(|(column, results)| {
            rows.iter()
                .map(|row| {
                    let status = results.iter().find(|(n, _)| n == row).map(|(_, s)| *s);
                    let expected = expected::kernel(&column.abi)
                        .or_else(|| expected::test(&column.abi, row))
                        .is_some();
                    match status {
                        Some(Status::Ok) => Cell::Ok,
                        Some(Status::Skipped) => Cell::Skipped,
                        _ if expected => Cell::ExpectedFailure,
                        Some(Status::Failed) => Cell::Failed,
                        None => Cell::Missing,
                    }
                })
                .collect()
        })
        .collect();

    let first = rows.iter().map(String::len).max().unwrap_or(4).max(4);
    let widths: Vec<usize> = columns.iter().map(|c| c.name.len().max(6)).collect();
    println!();
    print!("{:first$}", "test");
    for (column, width) in columns.iter().zip(&widths) {
        print!("  {:width$}", column.name);
    }
    println!();
    for (r, row) in rows.iter().enumerate() {
        print!("{row:first$}");
        for (column, width) in cells.iter().zip(&widths) {
            let text = match column[r] {
                Cell::Ok => "ok",
                Cell::Skipped => "skip",
                Cell::Failed => "FAILED",
                Cell::Missing => "-",
                Cell::ExpectedFailure => "xfail",
            };
            print!("  {text:width$}");
        }
        println!();
    }

    let mut failed = Vec::new();
    println!();
    for ((column, run), cells) in columns.iter().zip(runs).zip(&cells) {
        let bad = cells
            .iter()
            .filter(|c| matches!(c, Cell::Failed | Cell::Missing))
            .count();
        let expected_failures = cells
            .iter()
            .filter(|c| **c == Cell::ExpectedFailure)
            .count();
        // The guest must have finished its script, whatever the tests said.
        let finished = run.exit.is_some();
        let verdict = match expected::kernel(&column.abi) {
            Some(reason) if expected_failures > 0 || !finished => {
                format!("failed as expected for now: {reason}")
            }
            Some(_) => {
                failed.push(format!(
                    "{} passes now: remove it from EXPECTED_FAILING in xtask/src/kernels/expected.rs",
                    column.name
                ));
                "passed, but is listed as expected to fail".to_string()
            }
            None if bad == 0 && finished => {
                let stale: Vec<&str> = rows
                    .iter()
                    .zip(cells)
                    .filter(|(row, cell)| {
                        **cell == Cell::Ok && expected::test(&column.abi, row).is_some()
                    })
                    .map(|(row, _)| row.as_str())
                    .collect();
                let mut text = "passed".to_string();
                if expected_failures > 0 {
                    text += &format!(" ({expected_failures} expected failure(s), expected.rs)");
                }
                if !stale.is_empty() {
                    text += &format!(
                        "; listed in expected.rs but passed: {} (remove once fixed)",
                        stale.join(", ")
                    );
                }
                text
            }
            None => {
                failed.push(column.name.clone());
                match run.exit {
                    Some(_) => format!("FAILED ({bad} test(s))"),
                    None => "FAILED (the guest never finished: timeout or crash)".to_string(),
                }
            }
        };
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
