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
    process::Command,
};

use crate::{
    elf::ElfInfo,
    procmaps::Mapping,
    target::{Process, TargetError},
};

/// The entry programs in `tracer-ebpf/src/alloc.rs`, by calling convention.
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
    pub fn program(self) -> &'static str {
        match self {
            Entry::Malloc => "malloc_enter",
            Entry::Calloc => "calloc_enter",
            Entry::Realloc => "realloc_enter",
            Entry::Reallocarray => "reallocarray_enter",
            Entry::Memalign => "memalign_enter",
            Entry::PosixMemalign => "posix_memalign_enter",
            Entry::Valloc => "valloc_enter",
            Entry::Pvalloc => "pvalloc_enter",
            Entry::Free => "free_enter",
        }
    }

    /// Allocations need the return value; free does not.
    pub fn needs_return(self) -> bool {
        self != Entry::Free
    }
}

/// The return program shared by every allocation function.
pub const RETURN_PROGRAM: &str = "alloc_return";

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
];

/// One address to probe. Aliases (glibc's `aligned_alloc` and `memalign`
/// are one function) become one point, so a block is never counted twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbePoint {
    /// Where the function starts in the file (return probes go here).
    pub file_offset: u64,
    /// Bytes past the start where the entry probe goes (see `placement`):
    /// non-zero only for probes that need no return value, when skipping a
    /// leading NULL guard is provably the same and cheaper.
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
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("cannot list the libraries of {command}: {reason}")]
    ListLibraries { command: String, reason: String },
}

/// The probe points of one object, or None when it does not define both
/// `malloc` and `free`. `data` is the object's bytes, to place probes past a
/// leading NULL guard where that is safe; without it every probe is at its
/// function's entry.
pub fn probe_points(info: &ElfInfo, data: Option<&[u8]>) -> Option<Vec<ProbePoint>> {
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
            .or_insert_with(|| ProbePoint {
                file_offset: offset,
                entry_skip: if entry.needs_return() {
                    0
                } else {
                    entry_skip(info, data, name, offset)
                },
                entry,
                functions: vec![name],
            });
    }
    Some(by_offset.into_values().collect())
}

/// See `placement::first_argument_probe`.
fn entry_skip(info: &ElfInfo, data: Option<&[u8]>, name: &str, offset: u64) -> u64 {
    let (Some(data), Some(address), Some(size)) = (
        data,
        info.function_address(name),
        info.function_size(name),
    ) else {
        return 0;
    };
    let start = offset as usize;
    let Some(code) = data.get(start..start.saturating_add(size as usize)) else {
        return 0;
    };
    let placement = crate::placement::first_argument_probe(code, address);
    log::debug!("{name}: entry probe at +{} ({})", placement.skip, placement.reason);
    placement.skip
}

fn try_object(path: &str, host_path: PathBuf) -> Option<AllocatorObject> {
    let data = std::fs::read(&host_path).ok()?;
    let info = ElfInfo::parse(&data).ok()?;
    Some(AllocatorObject {
        path: path.to_string(),
        points: probe_points(&info, Some(&data))?,
        host_path,
    })
}

/// Finds the allocator of a running process.
pub fn locate(process: &Process, maps: &[Mapping]) -> Result<AllocatorObject, AllocatorError> {
    let exe = process.exe()?;
    let preload = process.environ_var("LD_PRELOAD").unwrap_or_default();
    let mapped: Vec<&str> = maps.iter().filter_map(Mapping::file_path).collect();
    let candidates = lookup_order(&exe, &preload, &mapped);
    for path in &candidates {
        if let Some(found) = try_object(path, process.host_path(path)) {
            return Ok(found);
        }
    }
    Err(AllocatorError::NotFound {
        pid: process.pid,
        searched: candidates.join(", "),
    })
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

/// Finds the allocator a command will use once started, before it runs:
/// a static executable is its own allocator; otherwise the dynamic loader
/// lists the libraries it would load (`ld.so --list`, what ldd does; no code
/// of the program runs), with the environment the command will get.
pub fn locate_for_command(
    exe: &Path,
    env: &[(String, String)],
) -> Result<AllocatorObject, AllocatorError> {
    let command = exe.display().to_string();
    let info = crate::elf::ElfInfo::read(exe).map_err(|e| AllocatorError::ListLibraries {
        command: command.clone(),
        reason: e.to_string(),
    })?;
    let mut candidates = vec![command.clone()];
    if let Some(interp) = &info.interpreter {
        let output = Command::new(interp)
            .arg("--list")
            .arg(exe)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .map_err(|e| AllocatorError::ListLibraries {
                command: command.clone(),
                reason: format!("{interp}: {e}"),
            })?;
        if !output.status.success() {
            return Err(AllocatorError::ListLibraries {
                command,
                reason: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        candidates.extend(parse_ld_list(
            &String::from_utf8_lossy(&output.stdout),
            interp,
        ));
    }
    for path in &candidates {
        if let Some(found) = try_object(path, PathBuf::from(path)) {
            return Ok(found);
        }
    }
    Err(AllocatorError::NotFoundForCommand {
        command,
        searched: candidates.join(", "),
    })
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
        let me = Process::open(std::process::id()).unwrap();
        let maps = me.maps().unwrap();
        let found = locate(&me, &maps).unwrap();
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
        let free = found
            .points
            .iter()
            .find(|p| p.functions.contains(&"free"))
            .unwrap();
        assert_eq!(free.entry, Entry::Free);
        assert!(free.entry_skip < 16, "{free:?}");
        for p in &found.points {
            if p.entry.needs_return() {
                assert_eq!(p.entry_skip, 0, "return probes stay at the entry: {p:?}");
            }
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
}
