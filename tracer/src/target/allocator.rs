//! Which object provides the allocator the process really calls, and where
//! in it each allocator function starts.
//!
//! Symbol lookup order decides which `malloc` a process calls: the executable
//! first, then LD_PRELOAD objects, then the libraries in load order. The first
//! object that defines both `malloc` and `free` is the one to probe, so an
//! executable with a static allocator, or a preloaded jemalloc, is found the
//! same way as glibc.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::{target::elf::ElfInfo, target::process::TargetError};

/// The calling conventions of the allocator functions (each has its entry
/// program, see `kernel::probes::entry_program`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Entry {
    Malloc,
    Calloc,
    Realloc,
    Reallocarray,
    /// `memalign(align, size)` and `aligned_alloc(align, size)`.
    Memalign,
    PosixMemalign,
    Valloc,
    Pvalloc,
    Free,
}

impl Entry {
    pub fn needs_return(self) -> bool {
        self != Entry::Free
    }
}

/// The allocator API the tracer probes, with each function's convention.
pub const FUNCTIONS: &[(&str, Entry)] = &[
    ("malloc", Entry::Malloc),
    ("calloc", Entry::Calloc),
    ("realloc", Entry::Realloc),
    ("reallocarray", Entry::Reallocarray),
    ("posix_memalign", Entry::PosixMemalign),
    ("aligned_alloc", Entry::Memalign),
    ("memalign", Entry::Memalign),
    ("valloc", Entry::Valloc),
    ("pvalloc", Entry::Pvalloc),
    ("free", Entry::Free),
    // C23; glibc 2.39+ has them. Their first argument is the pointer.
    ("free_sized", Entry::Free),
    ("free_aligned_sized", Entry::Free),
    // jemalloc's own API (also under a prefix: je_mallocx, _rjem_sdallocx).
    ("mallocx", Entry::Malloc),
    ("rallocx", Entry::Realloc),
    ("dallocx", Entry::Free),
    ("sdallocx", Entry::Free),
    // C++ operators, where an allocator object defines them (jemalloc,
    // tcmalloc and mimalloc do, and do not go through `malloc`): new and
    // new[], plain, nothrow, aligned (size first in all), and every delete.
    ("_Znwm", Entry::Malloc),
    ("_Znam", Entry::Malloc),
    ("_ZnwmRKSt9nothrow_t", Entry::Malloc),
    ("_ZnamRKSt9nothrow_t", Entry::Malloc),
    ("_ZnwmSt11align_val_t", Entry::Malloc),
    ("_ZnamSt11align_val_t", Entry::Malloc),
    ("_ZnwmSt11align_val_tRKSt9nothrow_t", Entry::Malloc),
    ("_ZnamSt11align_val_tRKSt9nothrow_t", Entry::Malloc),
    ("_ZdlPv", Entry::Free),
    ("_ZdaPv", Entry::Free),
    ("_ZdlPvm", Entry::Free),
    ("_ZdaPvm", Entry::Free),
    ("_ZdlPvRKSt9nothrow_t", Entry::Free),
    ("_ZdaPvRKSt9nothrow_t", Entry::Free),
    ("_ZdlPvSt11align_val_t", Entry::Free),
    ("_ZdaPvSt11align_val_t", Entry::Free),
    ("_ZdlPvmSt11align_val_t", Entry::Free),
    ("_ZdaPvmSt11align_val_t", Entry::Free),
    ("_ZdlPvSt11align_val_tRKSt9nothrow_t", Entry::Free),
    ("_ZdaPvSt11align_val_tRKSt9nothrow_t", Entry::Free),
];

/// One address to probe. Aliases (glibc's `aligned_alloc` and `memalign`
/// are one function) become one point, so a block is never counted twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbePoint {
    /// Where the function starts in the file (return probes go here).
    pub file_offset: u64,
    /// Bytes past the start where the entry probe goes (see `placement` and
    /// `place_entry_probes`): non-zero only for probes that need no return
    /// value, when skipping a leading NULL guard is provably the same and
    /// cheaper.
    pub entry_skip: u64,
    pub entry: Entry,
    /// Every allocator name at this address.
    pub functions: Vec<&'static str>,
}

/// The object to probe and the points in it.
#[derive(Clone, Debug)]
pub struct AllocatorObject {
    /// Path inside the target's mount namespace (for reports).
    pub path: String,
    /// The same file as this tracer opens it (for attaching).
    pub host_path: PathBuf,
    pub points: Vec<ProbePoint>,
}

#[derive(Debug, thiserror::Error)]
pub enum AllocatorError {
    #[error("no allocator found in PID {pid}: none of its objects ({searched}) defines both malloc and free (a stripped static binary has no symbols to probe)")]
    NotFound { pid: u32, searched: String },
    #[error("no allocator found for {command}: none of {searched} defines both malloc and free (a stripped static binary has no symbols to probe)")]
    NotFoundForCommand { command: String, searched: String },
    #[error("--symbols-prefix {prefix}: none of {searched} defines both {prefix}malloc and {prefix}free")]
    PrefixNotFound { prefix: String, searched: String },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("cannot list the libraries of {command}: {reason}")]
    ListLibraries { command: String, reason: String },
}

/// The probe points of one object, or None when it does not define both
/// `malloc` and `free`.
pub fn probe_points(info: &ElfInfo) -> Option<Vec<ProbePoint>> {
    info.function_offset("malloc")?;
    info.function_offset("free")?;
    let mut by_offset: BTreeMap<u64, ProbePoint> = BTreeMap::new();
    for &(name, entry) in FUNCTIONS {
        let Some(offset) = info.function_offset(name) else {
            continue;
        };
        by_offset
            .entry(offset)
            .and_modify(|p| p.functions.push(name))
            .or_insert(ProbePoint {
                file_offset: offset,
                entry_skip: 0,
                entry,
                functions: vec![name],
            });
    }
    Some(by_offset.into_values().collect())
}

/// Moves the entry probes of functions that need no return value (the
/// `free` family) past a leading NULL guard, where `placement` proves that
/// the same calls are seen; every other probe stays at its function's entry.
/// Reads the object's code; on any failure the probes stay where they are.
pub fn place_entry_probes(object: &mut AllocatorObject) {
    if object.points.iter().all(|p| p.entry.needs_return()) {
        return;
    }
    let Ok(data) = std::fs::read(&object.host_path) else {
        return;
    };
    let Ok(info) = ElfInfo::parse(&data) else {
        return;
    };
    for point in &mut object.points {
        if point.entry.needs_return() {
            continue;
        }
        point.entry_skip = point
            .functions
            .iter()
            .find_map(|name| entry_skip(&info, &data, name, point.file_offset))
            .unwrap_or(0);
    }
}

/// See `placement::first_argument_probe`; None when the symbol `name` is
/// not the function at `offset` or its code cannot be read.
fn entry_skip(info: &ElfInfo, data: &[u8], name: &str, offset: u64) -> Option<u64> {
    if info.function_offset(name)? != offset {
        return None;
    }
    let address = info.function_address(name)?;
    let size = info.function_size(name)?;
    let start = offset as usize;
    let code = data.get(start..start.checked_add(size as usize)?)?;
    let placement = crate::target::placement::first_argument_probe(code, address);
    log::debug!(
        "{name}: entry probe at +{} ({})",
        placement.skip,
        placement.reason
    );
    Some(placement.skip)
}

/// Objects in the order the dynamic linker searches them for a symbol:
/// executable, LD_PRELOAD objects (separated by spaces or colons), then the
/// rest in mapping order. The dynamic loader itself is skipped.
pub fn lookup_order<'a>(exe: &'a str, preload: &'a str, mapped: &[&'a str]) -> Vec<&'a str> {
    let mut order: Vec<&str> = vec![exe];
    let preloaded = preload.split([' ', ':']).filter(|p| !p.is_empty());
    for p in preloaded {
        // LD_PRELOAD may name a library without a directory; use the mapped path.
        let full = mapped
            .iter()
            .copied()
            .find(|m| *m == p || Path::new(m).file_name() == Path::new(p).file_name());
        if let Some(full) = full {
            if !order.contains(&full) {
                order.push(full);
            }
        }
    }
    for m in mapped {
        let name = Path::new(m)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("");
        if name.starts_with("ld-linux") || name.starts_with("ld-musl") {
            continue;
        }
        if !order.contains(m) {
            order.push(m);
        }
    }
    order
}

/// Paths from `ld.so --list` output, in load order, without the loader itself.
/// Lines look like `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`.
pub fn parse_ld_list(text: &str, interpreter: &str) -> Vec<String> {
    let interp_name = Path::new(interpreter).file_name();
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split(" (0x").next()?.trim();
            if !path.starts_with('/') || Path::new(path).file_name() == interp_name {
                return None;
            }
            Some(path.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_order_puts_exe_then_preload_first_and_skips_loader() {
        let mapped = [
            "/usr/bin/app",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
            "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ];
        let order = lookup_order("/usr/bin/app", "libjemalloc.so.2", &mapped);
        assert_eq!(
            order,
            [
                "/usr/bin/app",
                "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
            ]
        );
    }

    #[test]
    fn parses_ld_list_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibstdc++.so.6 => /lib/x86_64-linux-gnu/libstdc++.so.6 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ld_list(text, "/lib64/ld-linux-x86-64.so.2"),
            [
                "/lib/x86_64-linux-gnu/libstdc++.so.6",
                "/lib/x86_64-linux-gnu/libc.so.6"
            ]
        );
    }

    #[test]
    fn glibc_aliases_become_one_probe_point() {
        let me = crate::target::process::Process::open(std::process::id()).unwrap();
        let maps = me.maps().unwrap();
        let found = crate::target::detect::for_process(&me, &maps, &[])
            .unwrap()
            .remove(0);
        assert!(found.path.contains("libc.so"), "{}", found.path);
        let offsets: Vec<u64> = found.points.iter().map(|p| p.file_offset).collect();
        let mut unique = offsets.clone();
        unique.dedup();
        assert_eq!(offsets, unique, "each address once");
        let names: Vec<&str> = found
            .points
            .iter()
            .flat_map(|p| p.functions.clone())
            .collect();
        for required in [
            "malloc",
            "calloc",
            "realloc",
            "free",
            "posix_memalign",
            "memalign",
        ] {
            assert!(
                names.contains(&required),
                "{required} missing from {names:?}"
            );
        }
        let memalign = found
            .points
            .iter()
            .find(|p| p.functions.contains(&"memalign"))
            .unwrap();
        assert!(
            memalign.functions.contains(&"aligned_alloc"),
            "glibc 2.36 aliases these"
        );
    }

    #[test]
    fn only_free_like_probes_may_move_past_the_entry() {
        let me = crate::target::process::Process::open(std::process::id()).unwrap();
        let maps = me.maps().unwrap();
        let mut found = crate::target::detect::for_process(&me, &maps, &[])
            .unwrap()
            .remove(0);
        place_entry_probes(&mut found);
        let free = found
            .points
            .iter()
            .find(|p| p.functions.contains(&"free"))
            .unwrap();
        assert_eq!(free.entry, Entry::Free);
        // glibc 2.36: 9, past `test rdi,rdi; je`; other versions may differ.
        assert!(free.entry_skip < 16, "{free:?}");
        for p in &found.points {
            if p.entry.needs_return() {
                assert_eq!(p.entry_skip, 0, "return probes stay at the entry: {p:?}");
            }
        }
    }
}
