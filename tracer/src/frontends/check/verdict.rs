//! Whether a run leaked more than allowed, after suppressions, and the exit
//! code that says so. Pure: a Report in, a CheckReport out.

use serde::{Deserialize, Serialize};

use super::suppress::{first_match, Rule};
use crate::report::{Report, Totals};

/// The exit code of a check that found leaks over the limits (the one
/// LeakSanitizer uses, so CI scripts that know it keep working).
pub const LEAK_EXIT_CODE: i32 = 23;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes that may leak (None: no limit).
    pub bytes: Option<u64>,
    pub allocations: Option<u64>,
}

impl Limits {
    /// Neither given: nothing may leak. One given: only that one limits.
    pub fn new(bytes: Option<u64>, allocations: Option<u64>) -> Self {
        match (bytes, allocations) {
            (None, None) => Limits {
                bytes: Some(0),
                allocations: Some(0),
            },
            _ => Limits { bytes, allocations },
        }
    }

    fn exceeded_by(&self, leaked: &Totals) -> bool {
        self.bytes.is_some_and(|max| leaked.bytes > max)
            || self.allocations.is_some_and(|max| leaked.allocations > max)
    }
}

/// What one suppression rule hid.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Suppressed {
    pub pattern: String,
    /// "FILE:LINE" or "default".
    pub origin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub bytes: u64,
    pub allocations: u64,
    pub stacks: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckReport {
    pub passed: bool,
    /// The tracer's exit code: the command's when it failed, else
    /// `LEAK_EXIT_CODE` when leaks exceed the limits, else 0.
    pub exit_code: i32,
    /// The command's own exit code (128 + signal when it was killed).
    pub command_exit_code: Option<i32>,
    pub limits: Limits,
    /// Outstanding at exit and not suppressed, over all processes.
    pub leaked: Totals,
    /// Each process traced (several with `--follow-forks`): what it leaked,
    /// and whether that is within the limits, which apply per process.
    #[serde(default)]
    pub processes: Vec<ProcessVerdict>,
    pub suppressed: Vec<Suppressed>,
    /// The final report; its `stacks` are the unsuppressed ones, its
    /// `totals` everything outstanding.
    pub report: Report,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProcessVerdict {
    pub pid: u32,
    pub command: String,
    /// "exited", "exec" (its program was replaced; nothing of it is left), "running".
    pub state: String,
    pub leaked: Totals,
    pub passed: bool,
}

pub fn evaluate(
    mut report: Report,
    rules: &[Rule],
    limits: Limits,
    command_exit_code: Option<i32>,
) -> CheckReport {
    let mut suppressed: Vec<Suppressed> = Vec::new();
    report.stacks.retain(|stack| {
        let Some(rule) = first_match(rules, &stack.frames) else {
            return true;
        };
        let entry = match suppressed
            .iter_mut()
            .position(|s| s.pattern == rule.pattern && s.origin == rule.origin)
        {
            Some(i) => &mut suppressed[i],
            None => {
                suppressed.push(Suppressed {
                    pattern: rule.pattern.clone(),
                    origin: rule.origin.clone(),
                    reason: rule.reason.map(str::to_string),
                    bytes: 0,
                    allocations: 0,
                    stacks: 0,
                });
                suppressed.last_mut().expect("just pushed")
            }
        };
        entry.bytes += stack.bytes;
        entry.allocations += stack.allocations;
        entry.stacks += 1;
        false
    });
    let leaked = Totals {
        bytes: report.stacks.iter().map(|s| s.bytes).sum(),
        allocations: report.stacks.iter().map(|s| s.allocations).sum(),
    };
    let processes: Vec<ProcessVerdict> = report
        .processes
        .iter()
        .map(|p| {
            // A replaced program's blocks were dropped: its stacks are the
            // next program's with the same pid.
            let current = p.state != "exec";
            let mine = report.stacks.iter().filter(|s| current && s.pid == p.pid);
            let leaked = mine.fold(Totals::default(), |t, s| Totals {
                bytes: t.bytes + s.bytes,
                allocations: t.allocations + s.allocations,
            });
            ProcessVerdict {
                pid: p.pid,
                command: p.command.clone(),
                state: p.state.clone(),
                passed: !limits.exceeded_by(&leaked),
                leaked,
            }
        })
        .collect();
    // Limits hold per process; with one process that is the whole run.
    let passed = if processes.is_empty() {
        !limits.exceeded_by(&leaked)
    } else {
        processes.iter().all(|p| p.passed)
    };
    let exit_code = match command_exit_code {
        Some(code) if code != 0 => code,
        _ if !passed => LEAK_EXIT_CODE,
        _ => 0,
    };
    CheckReport {
        passed,
        exit_code,
        command_exit_code,
        limits,
        leaked,
        processes,
        suppressed,
        report,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        frontends::check::suppress,
        output::folded::tests::{frame, sample_report},
        report::StackReport,
    };

    fn report() -> Report {
        let mut report = sample_report();
        report.stacks.push(StackReport {
            frames: vec![frame(Some("_IO_file_doallocate")), frame(Some("main"))],
            bytes: 4096,
            allocations: 1,
            ..report.stacks[0].clone()
        });
        report
    }

    fn leaked_by_sample() -> Totals {
        let r = sample_report();
        Totals {
            bytes: r.stacks.iter().map(|s| s.bytes).sum(),
            allocations: r.stacks.iter().map(|s| s.allocations).sum(),
        }
    }

    #[test]
    fn default_rules_hide_runtime_buffers_and_say_so() {
        let check = evaluate(
            report(),
            &suppress::defaults(),
            Limits::new(None, None),
            Some(0),
        );
        assert_eq!(check.leaked, leaked_by_sample());
        assert_eq!(check.suppressed.len(), 1);
        assert_eq!(check.suppressed[0].pattern, "_IO_file_doallocate");
        assert_eq!(check.suppressed[0].bytes, 4096);
        assert_eq!(
            check.suppressed[0].reason.as_deref(),
            Some("stdio stream buffers")
        );
        assert!(!check.passed);
        assert_eq!(check.exit_code, LEAK_EXIT_CODE);
    }

    #[test]
    fn limits_and_the_commands_own_failure() {
        let leaked = leaked_by_sample();
        let within = Limits::new(Some(leaked.bytes), None);
        let check = evaluate(sample_report(), &[], within, Some(0));
        assert!(check.passed);
        assert_eq!(check.exit_code, 0);
        let below = Limits::new(None, Some(leaked.allocations - 1));
        assert_eq!(
            evaluate(sample_report(), &[], below, Some(0)).exit_code,
            LEAK_EXIT_CODE
        );
        // A failing command's code wins over the leak verdict.
        assert_eq!(evaluate(sample_report(), &[], below, Some(3)).exit_code, 3);
        assert_eq!(evaluate(sample_report(), &[], within, None).exit_code, 0);
    }
}
