//! How the report shows the commands the benchmark ran.

use std::path::Path;

use crate::root;

/// Shell-like rendering of a command, for the report.
pub fn shown(program: &Path, args: &[String]) -> String {
    let name = program
        .strip_prefix(root())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| program.display().to_string());
    let mut text = name;
    for a in args {
        text.push(' ');
        let a = a.replace(&(root().display().to_string() + "/"), "");
        if a.contains(' ') {
            text.push_str(&format!("'{a}'"));
        } else {
            text.push_str(&a);
        }
    }
    text
}
