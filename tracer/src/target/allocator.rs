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

use crate::target::{elf::ElfInfo, placement, placement::Placement, process::TargetError};

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

    /// What its entry program reads of a call (tracer-ebpf's alloc.rs).
    pub fn reads(self) -> placement::Reads {
        let (args, product) = match self {
            Entry::Malloc | Entry::Valloc | Entry::Pvalloc | Entry::Free => (1, None),
            Entry::Realloc | Entry::Memalign => (2, None),
            Entry::Calloc => (2, Some((0, 1))),
            Entry::PosixMemalign => (3, None),
            Entry::Reallocarray => (3, Some((1, 2))),
        };
        placement::Reads { args, product }
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
    /// Where the function starts in the file.
    pub file_offset: u64,
    /// Where its probes go, entry and return (see `placement`), when the
    /// kernel has attach cookies to say where moved arguments are.
    pub placement: Placement,
    /// Where they go without cookies (kernels before 5.15): moved only
    /// where every argument stays in its own register.
    pub in_place: Placement,
    pub entry: Entry,
    /// Every allocator name at this address.
    pub functions: Vec<&'static str>,
    /// Not probed: every call of the function goes first to this other
    /// probed one, with the same arguments (a tail call, or a call whose
    /// result it returns as is; see `placement::first_transfer`), whose
    /// probes see it: probing both would trap twice per call.
    pub covered_by: Option<&'static str>,
}

impl ProbePoint {
    /// A point probed at the function's entry (until `place_probes`).
    pub fn new(file_offset: u64, entry: Entry, functions: Vec<&'static str>) -> Self {
        let unplaced = Placement {
            reason: "not placed (--entry-probes, or the code could not be read)".into(),
            ..Placement::default()
        };
        ProbePoint {
            file_offset,
            placement: unplaced.clone(),
            in_place: unplaced,
            entry,
            functions,
            covered_by: None,
        }
    }

    /// The placement to use: `cookies` when the kernel has attach cookies.
    pub fn placed(&self, cookies: bool) -> &Placement {
        if cookies {
            &self.placement
        } else {
            &self.in_place
        }
    }
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
            .or_insert(ProbePoint::new(offset, entry, vec![name]));
    }
    Some(by_offset.into_values().collect())
}

/// Places the probes of every point of `object` (see `placement`), and
/// marks the points whose every call goes first to another probed function
/// of the same convention (`covered_by`). Reads the object's code; on any
/// failure the probes stay at the entries.
pub fn place_probes(object: &mut AllocatorObject) {
    let Ok(data) = std::fs::read(&object.host_path) else {
        return;
    };
    let Ok(info) = ElfInfo::parse(&data) else {
        return;
    };
    let slots = crate::target::elf::jump_slots(&data);
    let starts: Vec<(u64, Entry, &'static str)> = object
        .points
        .iter()
        .filter_map(|p| {
            let name = *p.functions.first()?;
            Some((info.function_address(name)?, p.entry, name))
        })
        .collect();
    for point in &mut object.points {
        let Some((name, code, address)) = point
            .functions
            .iter()
            .find_map(|name| function_code(&info, &data, name, point.file_offset))
        else {
            continue;
        };
        let reads = point.entry.reads();
        point.placement = placement::place(code, address, reads, true);
        point.in_place = placement::place(code, address, reads, false);
        point.covered_by =
            placement::first_transfer(code, address, reads.args).and_then(|target| {
                let reached = match starts.iter().find(|(a, _, _)| *a == target) {
                    Some(&(_, entry, name)) => Some((entry, name)),
                    // A PLT stub: the function its GOT slot is bound to.
                    None => {
                        let stub = info.code_at(&data, target, 16)?;
                        let slot = placement::plt_slot(stub, target)?;
                        let bound = slots.iter().find(|(s, _)| *s == slot)?.1.as_str();
                        starts
                            .iter()
                            .find(|(_, _, n)| *n == bound)
                            .map(|&(_, entry, name)| (entry, name))
                    }
                }?;
                (reached.0 == point.entry && reached.1 != name).then_some(reached.1)
            });
        log::debug!(
            "{name}: probes at +{} ({})",
            point.placement.skip,
            point.placement.reason
        );
    }
    keep_out_of_foreign_branches(object, &info, &data);
}

/// Puts back at the entry any probe whose skipped range some branch from
/// elsewhere in the object targets (see `placement::branch_targets_in`).
fn keep_out_of_foreign_branches(object: &mut AllocatorObject, info: &ElfInfo, data: &[u8]) {
    // (point, which placement, start, chosen address)
    let mut moved: Vec<(usize, bool, u64, u64)> = Vec::new();
    for (i, point) in object.points.iter().enumerate() {
        let Some(start) = point
            .functions
            .iter()
            .find_map(|n| function_code(info, data, n, point.file_offset))
            .map(|(_, _, address)| address)
        else {
            continue;
        };
        for cookies in [true, false] {
            let skip = point.placed(cookies).skip;
            if skip > 0 {
                moved.push((i, cookies, start, start + skip));
            }
        }
    }
    if moved.is_empty() {
        return;
    }
    let ranges: Vec<(u64, u64)> = moved.iter().map(|m| (m.2, m.3)).collect();
    let mut hit = vec![false; ranges.len()];
    for (address, code) in crate::target::elf::code_sections(data) {
        for (h, now) in hit
            .iter_mut()
            .zip(placement::branch_targets_in(code, address, &ranges))
        {
            *h |= now;
        }
    }
    for ((i, cookies, start, _), hit) in moved.into_iter().zip(hit) {
        if !hit {
            continue;
        }
        let point = &mut object.points[i];
        let Some((_, code, _)) = point
            .functions
            .iter()
            .find_map(|n| function_code(info, data, n, point.file_offset))
        else {
            continue;
        };
        let entry = placement::at_entry(
            code,
            start,
            "a branch from elsewhere in the object targets the skipped range",
        );
        if cookies {
            point.placement = entry;
        } else {
            point.in_place = entry;
        }
    }
}

/// The code of function `name` if it is the one at `offset`: (name, code
/// by the symbol's size, its address).
fn function_code<'a>(
    info: &ElfInfo,
    data: &'a [u8],
    name: &'static str,
    offset: u64,
) -> Option<(&'static str, &'a [u8], u64)> {
    if info.function_offset(name)? != offset {
        return None;
    }
    let address = info.function_address(name)?;
    let size = info.function_size(name)?;
    let start = offset as usize;
    let code = data.get(start..start.checked_add(size as usize)?)?;
    Some((name, code, address))
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
    fn every_probe_of_our_libc_sits_on_an_emulated_instruction() {
        let me = crate::target::process::Process::open(std::process::id()).unwrap();
        let maps = me.maps().unwrap();
        let mut found = crate::target::detect::for_process(&me, &maps, &[])
            .unwrap()
            .remove(0);
        place_probes(&mut found);
        for p in &found.points {
            assert!(p.placement.emulated, "{p:?}");
            // Without cookies, only where no argument moved (glibc 2.36's
            // reallocarray multiplies first: it stays at its entry).
            assert!(p.in_place.emulated || p.placement.args != 0, "{p:?}");
            assert_eq!(p.in_place.args, 0, "{p:?}");
        }
        let free = found
            .points
            .iter()
            .find(|p| p.functions.contains(&"free"))
            .unwrap();
        // glibc 2.36: at the `je` of `test rdi,rdi; je`; others may differ.
        assert!(free.in_place.skip < 16, "{free:?}");
    }

    /// The probes of an installed library, placed.
    fn placed_object(path: &str) -> AllocatorObject {
        let info = ElfInfo::read(Path::new(path)).unwrap_or_else(|e| panic!("{e}"));
        // libstdc++ defines no malloc: its operators are probed only where
        // linked into a static program; every name it has makes a point.
        let points = probe_points(&info).unwrap_or_else(|| {
            let mut points: Vec<ProbePoint> = Vec::new();
            for &(name, entry) in FUNCTIONS {
                let Some(offset) = info.function_offset(name) else {
                    continue;
                };
                match points.iter_mut().find(|p| p.file_offset == offset) {
                    Some(p) => p.functions.push(name),
                    None => points.push(ProbePoint::new(offset, entry, vec![name])),
                }
            }
            points
        });
        let mut object = AllocatorObject {
            path: path.to_string(),
            host_path: PathBuf::from(path),
            points,
        };
        place_probes(&mut object);
        object
    }

    /// Every allocator function of the allocators the end-to-end tests
    /// preload (Debian 12's builds) is probed on an emulated instruction,
    /// or not at all because its calls go first to a probed function of
    /// the same convention; and nothing is probed twice for one call.
    #[test]
    fn no_function_of_the_installed_allocators_is_single_stepped() {
        const LIB: &str = "/usr/lib/x86_64-linux-gnu";
        for lib in [
            "libjemalloc.so.2",
            "libtcmalloc_minimal.so.4",
            "libtcmalloc.so.4",
            "libmimalloc.so.2",
            "libstdc++.so.6",
        ] {
            let object = placed_object(&format!("{LIB}/{lib}"));
            assert!(!object.points.is_empty(), "{lib}");
            for p in &object.points {
                assert!(
                    p.covered_by.is_some() || p.placement.emulated,
                    "{lib}: {p:?}"
                );
            }
        }
        let covered = |lib: &str, name: &str| {
            let object = placed_object(&format!("{LIB}/{lib}"));
            let point = object.points.iter().find(|p| p.functions.contains(&name));
            point.unwrap().covered_by
        };
        // jmp free@plt: one trap per unsized delete, in free.
        assert_eq!(covered("libjemalloc.so.2", "_ZdlPv"), Some("free"));
        // jmp _Znwm
        assert_eq!(covered("libjemalloc.so.2", "_Znam"), Some("_Znwm"));
        // sub $8,%rsp; call operator new@plt; add; ret
        assert_eq!(
            covered("libstdc++.so.6", "_ZnwmRKSt9nothrow_t"),
            Some("_Znwm")
        );
        // mimalloc's sized delete jumps to mi_free, which is not probed.
        assert_eq!(covered("libmimalloc.so.2", "_ZdlPvm"), None);
    }
}
