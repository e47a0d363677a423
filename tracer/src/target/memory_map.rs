//! Parsing `/proc/PID/maps`. Pure: takes text, returns mappings.

use std::fmt;

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Offset in the mapped file of `start`.
    pub offset: u64,
    pub readable: bool,
    pub executable: bool,
    pub inode: u64,
    /// The path as the kernel prints it: a file path inside the process's
    /// mount namespace, a pseudo name such as `[heap]`, or None.
    pub path: Option<String>,
}

impl Mapping {
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The mapping is backed by a regular file (not `[heap]`, not anonymous).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }

    /// File path without the kernel's " (deleted)" suffix.
    pub fn file_path(&self) -> Option<&str> {
        if !self.is_file() {
            return None;
        }
        let path = self.path.as_deref()?;
        Some(path.strip_suffix(" (deleted)").unwrap_or(path))
    }

    /// Offset in the file of the byte mapped at `addr`.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr - self.start + self.offset
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub reason: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for ParseError {}

/// Parses the whole text of a maps file.
pub fn parse(text: &str) -> Result<Vec<Mapping>, ParseError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            parse_line(line).map_err(|reason| ParseError {
                line: i + 1,
                reason,
            })
        })
        .collect()
}

/// `start-end perms offset dev inode [path]`, the path possibly containing
/// spaces.
pub fn parse_line(line: &str) -> Result<Mapping, &'static str> {
    let mut rest = line;
    let mut field = || -> Result<&str, &'static str> {
        let trimmed = rest.trim_start_matches(' ');
        let end = trimmed.find(' ').unwrap_or(trimmed.len());
        let (word, tail) = trimmed.split_at(end);
        rest = tail;
        if word.is_empty() {
            Err("missing field")
        } else {
            Ok(word)
        }
    };
    let range = field()?;
    let perms = field()?;
    let offset = field()?;
    let _dev = field()?;
    let inode = field()?;
    let path = rest.trim_start_matches(' ');

    let (start, end) = range.split_once('-').ok_or("address range has no '-'")?;
    let start = u64::from_str_radix(start, 16).map_err(|_| "bad start address")?;
    let end = u64::from_str_radix(end, 16).map_err(|_| "bad end address")?;
    if end < start {
        return Err("end address below start");
    }
    let perms = perms.as_bytes();
    if perms.len() != 4 {
        return Err("permissions are not 4 characters");
    }
    Ok(Mapping {
        start,
        end,
        offset: u64::from_str_radix(offset, 16).map_err(|_| "bad offset")?,
        readable: perms[0] == b'r',
        executable: perms[2] == b'x',
        inode: inode.parse().map_err(|_| "bad inode")?,
        path: (!path.is_empty()).then(|| path.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1311 /usr/bin/demo
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1311 /usr/bin/demo
55d0c1e8e000-55d0c1eaf000 rw-p 00000000 00:00 0                          [heap]
7f3a1c028000-7f3a1c1bd000 r-xp 00028000 fe:01 2621 /usr/lib/x86_64-linux-gnu/libc.so.6
7f3a1c400000-7f3a1c401000 r-xp 00000000 fe:01 99 /tmp/my lib (deleted)
7ffc5e9f0000-7ffc5ea11000 rw-p 00000000 00:00 0                          [stack]
7f3a1c500000-7f3a1c501000 rw-p 00000000 00:00 0
";

    #[test]
    fn parses_every_kind_of_line() {
        let maps = parse(SAMPLE).unwrap();
        assert_eq!(maps.len(), 7);
        let libc = &maps[3];
        assert_eq!(libc.start, 0x7f3a1c028000);
        assert_eq!(libc.offset, 0x28000);
        assert!(libc.executable && libc.readable);
        assert_eq!(
            libc.file_path(),
            Some("/usr/lib/x86_64-linux-gnu/libc.so.6")
        );
        assert_eq!(libc.file_offset(0x7f3a1c028010), 0x28010);
        assert!(!maps[2].is_file());
        assert_eq!(maps[2].path.as_deref(), Some("[heap]"));
        assert_eq!(maps[4].file_path(), Some("/tmp/my lib"));
        assert_eq!(maps[6].path, None);
        assert!(!maps[6].executable);
    }

    #[test]
    fn rejects_malformed_lines_without_panicking() {
        for bad in [
            "",
            "zzzz-1000 r-xp 0 fe:01 1",
            "1000 r-xp 0 fe:01 1",
            "2000-1000 r-xp 0 fe:01 1",
            "1000-2000 r-x 0 fe:01 1",
            "1000-2000 r-xp 0 fe:01",
            "1000-2000 r-xp 0 fe:01 x",
            "1000-2000 r-xp qq fe:01 1",
        ] {
            assert!(parse_line(bad).is_err(), "{bad:?} should not parse");
        }
        let err = parse("1000-2000 r-xp 0 fe:01 1 /a\nnot a line\n").unwrap_err();
        assert_eq!(err.line, 2);
    }
}
