//! A process's resident memory from /proc/PID/status (VmRSS and its
//! anonymous, file and shared parts), and the objects it maps that look
//! like allocators but are not probed (for the coverage check).

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use regex::Regex;

use super::{
    elf::ElfInfo,
    process::{read_proc_file, status_field, Process},
};
use crate::model::ResidentMemory;

/// The resident memory of process `pid` now; None once it is gone.
pub fn resident(pid: u32) -> Option<ResidentMemory> {
    parse_status(&read_proc_file(pid, "status").ok()?)
}

/// The memory lines of a status file; None without VmRSS (a zombie, a
/// kernel thread).
pub fn parse_status(status: &str) -> Option<ResidentMemory> {
    let kib = |key: &str| -> Option<u64> {
        let value = status_field(status, key)?.trim_end_matches("kB").trim();
        Some(value.parse::<u64>().ok()? * 1024)
    };
    Some(ResidentMemory {
        rss: kib("VmRSS:")?,
        anon: kib("RssAnon:").unwrap_or(0),
        file: kib("RssFile:").unwrap_or(0),
        shmem: kib("RssShmem:").unwrap_or(0),
    })
}

/// Names an allocator entry point would have: malloc and its family, with
/// or without a prefix (`arena_malloc`, `pool_alloc`, `my_calloc`).
const ALLOCATOR_LIKE: &str =
    r"^_*[A-Za-z0-9]*_?(malloc|calloc|realloc|memalign|aligned_alloc|alloc|free)$";

/// The code objects `process` maps, other than `probed` (host paths; the
/// same file under another name, such as /lib and /usr/lib, is the same),
/// that define allocator-looking functions: "OBJECT (f1, f2, ...)", at
/// most five names each. Well-known wrappers of a probed allocator
/// (`is_wrapper`: `g_malloc`, `xmalloc`) do not count.
pub fn unprobed_allocators(
    process: &Process,
    probed: &[&Path],
    is_wrapper: impl Fn(&str) -> bool,
) -> Vec<String> {
    let Ok(maps) = process.maps() else {
        return Vec::new();
    };
    let canonical = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let probed: Vec<PathBuf> = probed.iter().map(|p| canonical(p)).collect();
    let objects: BTreeSet<&str> = maps
        .iter()
        .filter(|m| m.executable)
        .filter_map(|m| m.file_path())
        .filter(|p| !probed.contains(&canonical(&process.host_path(p))))
        .collect();
    let pattern = Regex::new(ALLOCATOR_LIKE).expect("allocator pattern");
    objects
        .into_iter()
        .filter_map(|object| {
            let info = ElfInfo::read(&process.host_path(object)).ok()?;
            let names = allocator_like(info.function_names(), &pattern, &is_wrapper);
            (!names.is_empty()).then(|| format!("{object} ({})", names.join(", ")))
        })
        .collect()
}

fn allocator_like<'a>(
    names: impl Iterator<Item = &'a str>,
    pattern: &Regex,
    is_wrapper: &impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut found: Vec<String> = names
        .filter(|n| pattern.is_match(n) && !is_wrapper(n))
        .map(str::to_string)
        .collect();
    found.sort();
    found.dedup();
    found.truncate(5);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rss_lines() {
        let status = "Name:\tserver\nVmRSS:\t   10240 kB\nRssAnon:\t    6144 kB\n\
                      RssFile:\t    3072 kB\nRssShmem:\t    1024 kB\nThreads:\t1\n";
        assert_eq!(
            parse_status(status),
            Some(ResidentMemory {
                rss: 10 << 20,
                anon: 6 << 20,
                file: 3 << 20,
                shmem: 1 << 20,
            })
        );
        assert_eq!(parse_status("Name:\tkthreadd\nState:\tS\n"), None);
    }

    #[test]
    fn allocator_looking_names_but_not_wrappers() {
        let pattern = Regex::new(ALLOCATOR_LIKE).unwrap();
        let names = [
            "arena_malloc",
            "arena_free",
            "pool_alloc",
            "g_malloc",
            "xmalloc",
            "main",
            "free_list_init",
            "allocate_table",
            "je_calloc",
        ];
        assert_eq!(
            allocator_like(names.into_iter(), &pattern, &|n: &str| {
                n == "g_malloc" || n == "xmalloc"
            }),
            ["arena_free", "arena_malloc", "je_calloc", "pool_alloc"]
        );
    }

    #[test]
    fn reads_our_own() {
        let own = resident(std::process::id()).unwrap();
        assert!(own.rss > 0 && own.rss >= own.anon);
    }
}
