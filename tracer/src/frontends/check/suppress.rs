//! Leak suppressions, in LeakSanitizer's file format so existing files work:
//! one rule per line, `leak:PATTERN` (the `leak:` prefix may be left out),
//! `#` starts a comment. A stack is suppressed when PATTERN matches the
//! function, source file or module of any of its frames. `*` matches any
//! run of characters; otherwise the pattern matches as a substring, or
//! anchored with a leading `^` / trailing `$`.

use crate::report::ReportFrame;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub pattern: String,
    /// Where the rule came from: "FILE:LINE" or "default".
    pub origin: String,
    /// Why a default rule exists.
    pub reason: Option<&'static str>,
}

/// Allocations that the C and C++ runtimes make once and keep for the life
/// of the process on purpose (valgrind calls them "still reachable"); a
/// program that only has these does not leak. `--no-default-suppressions`
/// turns them off.
const DEFAULTS: &[(&str, &str)] = &[
    ("_IO_file_doallocate", "stdio stream buffers"),
    ("^__libc_setlocale", "locale data"),
    ("^_nl_", "locale and message-catalog data"),
    ("^__gconv_open", "iconv conversion tables"),
    (
        "(anonymous namespace)::pool::pool",
        "libstdc++ exception emergency pool",
    ),
    (
        "^__cxa_get_globals",
        "libstdc++ per-thread exception globals",
    ),
    (
        "^allocate_dtv$",
        "thread TLS vectors, kept with glibc's cached thread stacks",
    ),
    ("/ld-linux-x86-64.so", "dynamic loader data (dlopen, TLS)"),
];

pub fn defaults() -> Vec<Rule> {
    DEFAULTS
        .iter()
        .map(|(pattern, reason)| Rule {
            pattern: pattern.to_string(),
            origin: "default".to_string(),
            reason: Some(reason),
        })
        .collect()
}

/// Parses a suppressions file; `name` is used in rule origins and errors.
pub fn parse(text: &str, name: &str) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let pattern = match line.split_once(':') {
            Some(("leak", pattern)) => pattern.trim(),
            // LeakSanitizer's other kinds belong to other sanitizers.
            Some((
                kind @ ("race"
                | "thread"
                | "mutex"
                | "signal"
                | "deadlock"
                | "called_from_lib"
                | "interceptor_via_fun"
                | "interceptor_via_lib"),
                _,
            )) => {
                return Err(format!(
                    "{name}:{}: '{kind}:' is not a leak suppression (use leak:PATTERN)",
                    index + 1
                ))
            }
            // C++ names contain "::": a bare pattern.
            _ => line,
        };
        if pattern.is_empty()
            || pattern == "^"
            || pattern == "$"
            || pattern.chars().all(|c| c == '*')
        {
            return Err(format!(
                "{name}:{}: the pattern would suppress every leak",
                index + 1
            ));
        }
        rules.push(Rule {
            pattern: pattern.to_string(),
            origin: format!("{name}:{}", index + 1),
            reason: None,
        });
    }
    Ok(rules)
}

/// The first rule that suppresses a stack with these frames.
pub fn first_match<'r>(rules: &'r [Rule], frames: &[ReportFrame]) -> Option<&'r Rule> {
    rules.iter().find(|rule| {
        frames.iter().any(|frame| {
            [
                frame.function.as_deref(),
                frame.file.as_deref(),
                frame.module.as_deref(),
            ]
            .into_iter()
            .flatten()
            .any(|text| pattern_matches(&rule.pattern, text))
        })
    })
}

/// LeakSanitizer-style match: `*` wildcards, `^`/`$` anchors, else substring.
pub fn pattern_matches(pattern: &str, text: &str) -> bool {
    let (start, core) = match pattern.strip_prefix('^') {
        Some(rest) => ("", rest),
        None => ("*", pattern),
    };
    let (core, end) = match core.strip_suffix('$') {
        Some(rest) => (rest, ""),
        None => (core, "*"),
    };
    glob(&format!("{start}{core}{end}"), text)
}

/// `*` matches any run of characters; everything else matches itself.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return text == first;
    }
    if !text.starts_with(first) || !text.ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, module: &str) -> ReportFrame {
        ReportFrame {
            function: Some(function.to_string()),
            file: Some("/src/net/conn.c".to_string()),
            line: Some(3),
            module: Some(module.to_string()),
            address: "0x1".to_string(),
            inlined: false,
            wraps_allocator: false,
        }
    }

    #[test]
    fn patterns_match_like_leak_sanitizer() {
        assert!(pattern_matches("conn", "open_conn"));
        assert!(pattern_matches("^open", "open_conn"));
        assert!(!pattern_matches("^conn", "open_conn"));
        assert!(pattern_matches("conn$", "open_conn"));
        assert!(!pattern_matches("open$", "open_conn"));
        assert!(pattern_matches("Cache::*insert", "app::Cache::bulk_insert"));
        assert!(pattern_matches("^app::*::insert$", "app::Cache::insert"));
        assert!(!pattern_matches("^app::*::insert$", "app::Cache::insert2"));
        assert!(pattern_matches("libfoo.so", "/usr/lib/libfoo.so.1"));
    }

    #[test]
    fn parses_files_with_comments_and_reports_bad_lines() {
        let rules = parse(
            "# known leaks\nleak:third_party_init\n\n  leak:libcrypto.so # vendor\nns::Type::make\n",
            "supp.txt",
        )
        .unwrap();
        let patterns: Vec<&str> = rules.iter().map(|r| r.pattern.as_str()).collect();
        assert_eq!(
            patterns,
            ["third_party_init", "libcrypto.so", "ns::Type::make"]
        );
        assert_eq!(rules[1].origin, "supp.txt:4");
        assert_eq!(
            parse("leak:ok\nrace:foo\n", "s").unwrap_err(),
            "s:2: 'race:' is not a leak suppression (use leak:PATTERN)"
        );
        assert!(parse("leak:*\n", "s").unwrap_err().contains("every leak"));
        assert!(parse("leak:\n", "s").is_err());
    }

    #[test]
    fn a_rule_matches_any_frame_function_file_or_module() {
        let rules = parse("leak:libvendor\nleak:conn.c\n", "s").unwrap();
        let frames = [frame("a", "/usr/lib/libvendor.so"), frame("b", "/bin/x")];
        assert_eq!(first_match(&rules, &frames).unwrap().origin, "s:1");
        let frames = [frame("a", "/bin/x")];
        assert_eq!(
            first_match(&rules, &frames).unwrap().origin,
            "s:2",
            "by file"
        );
        assert!(first_match(&parse("leak:zzz", "s").unwrap(), &frames).is_none());
    }
}
