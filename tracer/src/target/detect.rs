//! Which allocators a process calls, and which object holds each.
//!
//! The standard names (`malloc`, `free`, ...) bind to the first object in the
//! dynamic linker's lookup order that defines them: the executable (a static
//! glibc or musl program, or one that links an allocator statically), then
//! `LD_PRELOAD` objects (a preloaded jemalloc, tcmalloc or mimalloc), then the
//! libraries breadth-first along their `DT_NEEDED` entries (a linked
//! `-ljemalloc` comes before libc), then whatever was loaded later. That
//! object is the *primary* allocator.
//!
//! Allocators built with a symbol prefix live beside it: jemalloc's
//! `je_malloc` (`--with-jemalloc-prefix`), Rust's tikv-jemallocator
//! (`_rjem_malloc`, `_rjem_sdallocx`), mimalloc called by name (`mi_malloc`,
//! `mi_malloc_aligned`, as Rust's mimalloc crate does) and gperftools'
//! `tc_malloc`. The process calls those directly, so they are probed too, in
//! the first object that defines both `<prefix>malloc` and `<prefix>free`.
//! `--symbols-prefix` names more prefixes. Where a prefixed name is an alias
//! of a standard one (tcmalloc's `tc_malloc` is `malloc`), the address is
//! probed once.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectKind};

use crate::{
    target::allocator::{self, AllocatorError, AllocatorObject, Entry, ProbePoint, FUNCTIONS},
    target::elf::ElfInfo,
    target::memory_map::Mapping,
    target::process::Process,
};

/// Prefixes looked for without being asked.
pub const KNOWN_PREFIXES: &[&str] = &["je_", "_rjem_", "mi_", "tc_"];

/// Entry points that only exist under a prefix (mimalloc's own API), with
/// their conventions. The standard names of `allocator::FUNCTIONS` are looked
/// up under every prefix too.
const PREFIXED_ONLY: &[(&str, Entry)] = &[
    ("zalloc", Entry::Malloc),
    ("malloc_aligned", Entry::Malloc),
    ("zalloc_aligned", Entry::Malloc),
    ("calloc_aligned", Entry::Calloc),
    ("mallocn", Entry::Calloc),
    ("realloc_aligned", Entry::Realloc),
    ("rezalloc", Entry::Realloc),
    ("rezalloc_aligned", Entry::Realloc),
    ("reallocn", Entry::Reallocarray),
    ("recalloc", Entry::Reallocarray),
    ("free_size", Entry::Free),
    ("free_aligned", Entry::Free),
    ("free_size_aligned", Entry::Free),
];

/// One object the process has (or will have) loaded, in lookup order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Path inside the process's mount namespace.
    pub path: String,
    /// The same file as the tracer opens it.
    pub host_path: PathBuf,
}

/// The allocators of a running process: the primary one first.
pub fn for_process(
    process: &Process,
    maps: &[Mapping],
    prefixes: &[String],
) -> Result<Vec<AllocatorObject>, AllocatorError> {
    let exe = process.exe()?;
    let preload = process.environ_var("LD_PRELOAD").unwrap_or_default();
    let mapped: Vec<&str> = maps.iter().filter_map(Mapping::file_path).collect();
    let first_guess = allocator::lookup_order(&exe, &preload, &mapped);
    let preloads = first_guess
        .iter()
        .skip(1)
        .take_while(|path| {
            preload
                .split([' ', ':'])
                .filter(|p| !p.is_empty())
                .any(|p| **path == p || file_name(path) == file_name(p))
        })
        .count();
    let mut objects = Objects::default();
    let order = link_order(&first_guess, preloads, &mut objects, &|p| {
        process.host_path(p)
    });
    let candidates: Vec<Candidate> = order
        .iter()
        .map(|p| Candidate {
            path: p.to_string(),
            host_path: process.host_path(p),
        })
        .collect();
    choose(&candidates, prefixes, &mut objects).map_err(|e| match e {
        Missing::Allocator(searched) => AllocatorError::NotFound {
            pid: process.pid,
            searched,
        },
        Missing::Prefix(prefix, searched) => AllocatorError::PrefixNotFound { prefix, searched },
    })
}

/// The allocators a command will use once started, before it runs: a
/// static executable is its own; otherwise the dynamic loader lists the
/// libraries it would load, in load order (`ld.so --list`, what ldd does; no
/// code of the program runs), with the environment the command will get.
pub fn for_command(
    exe: &Path,
    env: &[(String, String)],
    prefixes: &[String],
) -> Result<Vec<AllocatorObject>, AllocatorError> {
    let command = exe.display().to_string();
    let info = ElfInfo::read(exe).map_err(|e| AllocatorError::ListLibraries {
        command: command.clone(),
        reason: e.to_string(),
    })?;
    let mut paths = vec![command.clone()];
    if let Some(interp) = &info.interpreter {
        let output = std::process::Command::new(interp)
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
        paths.extend(allocator::parse_ld_list(
            &String::from_utf8_lossy(&output.stdout),
            interp,
        ));
        // musl's loader is its libc: last in the order, where glibc's
        // ld.so (which defines no malloc) does no harm either.
        paths.push(interp.clone());
    }
    let mut seen = HashSet::new();
    let candidates: Vec<Candidate> = paths
        .into_iter()
        .filter(|p| seen.insert(p.clone()))
        .map(|p| Candidate {
            host_path: PathBuf::from(&p),
            path: p,
        })
        .collect();
    choose(&candidates, prefixes, &mut Objects::default()).map_err(|e| match e {
        Missing::Allocator(searched) => AllocatorError::NotFoundForCommand { command, searched },
        Missing::Prefix(prefix, searched) => AllocatorError::PrefixNotFound { prefix, searched },
    })
}

/// ELF files read so far, by host path (None: unreadable or not ELF).
#[derive(Default)]
struct Objects {
    read: BTreeMap<PathBuf, Option<Loaded>>,
}

struct Loaded {
    info: ElfInfo,
    soname: Option<String>,
    needed: Vec<String>,
}

impl Objects {
    fn get(&mut self, host_path: &Path) -> Option<&Loaded> {
        self.read
            .entry(host_path.to_path_buf())
            .or_insert_with(|| load(host_path))
            .as_ref()
    }
}

fn load(host_path: &Path) -> Option<Loaded> {
    let data = std::fs::read(host_path).ok()?;
    let info = ElfInfo::parse(&data).ok()?;
    let (soname, needed) = dynamic_names(&data);
    Some(Loaded {
        info,
        soname,
        needed,
    })
}

/// DT_SONAME and the DT_NEEDED entries of an ELF file, in order.
pub fn dynamic_names(data: &[u8]) -> (Option<String>, Vec<String>) {
    let Ok(object::File::Elf64(elf)) = object::File::parse(data) else {
        return (None, Vec::new());
    };
    if elf.kind() == ObjectKind::Unknown {
        return (None, Vec::new());
    }
    let endian = elf.endian();
    let Ok(table) = elf.elf_section_table().dynamic_table(endian, data) else {
        return (None, Vec::new());
    };
    let mut soname = None;
    let mut needed = Vec::new();
    for entry in table.iter() {
        let tag = entry.tag;
        if tag != object::elf::DT_NEEDED && tag != object::elf::DT_SONAME {
            continue;
        }
        let Ok(name) = table.string(entry) else {
            continue;
        };
        let name = String::from_utf8_lossy(name).into_owned();
        if tag == object::elf::DT_SONAME {
            soname = Some(name);
        } else {
            needed.push(name);
        }
    }
    (soname, needed)
}

/// The loader's order for a running process: the executable, preloaded
/// objects, then breadth-first along DT_NEEDED (matching each name to a
/// mapped object by its DT_SONAME or file name), then objects loaded later
/// (dlopen), in mapping order. `first_guess` is `allocator::lookup_order`'s:
/// executable, the first `preloads` entries are LD_PRELOAD objects, then
/// every other mapped object in address order (which is not load order:
/// libraries are mapped top-down).
fn link_order<'a>(
    first_guess: &[&'a str],
    preloads: usize,
    objects: &mut Objects,
    host: &dyn Fn(&str) -> PathBuf,
) -> Vec<&'a str> {
    let Some((&exe, rest)) = first_guess.split_first() else {
        return Vec::new();
    };
    let preloads = preloads.min(rest.len());
    // The names each mapped object answers to.
    let mut names: Vec<(&'a str, Vec<String>)> = Vec::new();
    for &path in rest {
        let mut known = vec![file_name(path).to_string()];
        if let Some(soname) = objects.get(&host(path)).and_then(|l| l.soname.clone()) {
            known.push(soname);
        }
        names.push((path, known));
    }
    let mut order: Vec<&'a str> = vec![exe];
    order.extend_from_slice(&rest[..preloads]);
    let mut next = 0;
    while next < order.len() {
        let path = order[next];
        next += 1;
        let needed = objects
            .get(&host(path))
            .map(|l| l.needed.clone())
            .unwrap_or_default();
        for name in needed {
            let found = names
                .iter()
                .find(|(_, known)| known.contains(&name))
                .map(|(p, _)| *p);
            if let Some(found) = found {
                if !order.contains(&found) {
                    order.push(found);
                }
            }
        }
    }
    for &path in rest {
        if !order.contains(&path) {
            order.push(path);
        }
    }
    order
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// What `choose` did not find; each carries the objects searched.
enum Missing {
    Allocator(String),
    Prefix(String, String),
}

/// The allocator objects among `candidates` (in lookup order), the primary
/// one first.
fn choose(
    candidates: &[Candidate],
    prefixes: &[String],
    objects: &mut Objects,
) -> Result<Vec<AllocatorObject>, Missing> {
    let searched = || {
        candidates
            .iter()
            .map(|c| c.path.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut found: Vec<AllocatorObject> = Vec::new();
    for c in candidates {
        let Some(loaded) = objects.get(&c.host_path) else {
            continue;
        };
        if let Some(points) = allocator::probe_points(&loaded.info) {
            found.push(AllocatorObject {
                path: c.path.clone(),
                host_path: c.host_path.clone(),
                points,
            });
            break;
        }
    }
    let mut all_prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
    for p in KNOWN_PREFIXES {
        if !all_prefixes.contains(p) {
            all_prefixes.push(p);
        }
    }
    for prefix in all_prefixes {
        let asked = prefixes.iter().any(|p| p == prefix);
        let hit = candidates.iter().find_map(|c| {
            let loaded = objects.get(&c.host_path)?;
            let points = prefixed_points(&loaded.info, prefix)?;
            Some(AllocatorObject {
                path: c.path.clone(),
                host_path: c.host_path.clone(),
                points,
            })
        });
        match hit {
            Some(object) => merge(&mut found, object),
            None if asked => return Err(Missing::Prefix(prefix.to_string(), searched())),
            None => {}
        }
    }
    if found.is_empty() {
        return Err(Missing::Allocator(searched()));
    }
    Ok(found)
}

/// Adds an object's points to the list, merging with the same file.
fn merge(found: &mut Vec<AllocatorObject>, object: AllocatorObject) {
    let Some(existing) = found.iter_mut().find(|o| o.host_path == object.host_path) else {
        found.push(object);
        return;
    };
    for point in object.points {
        match existing
            .points
            .iter_mut()
            .find(|p| p.file_offset == point.file_offset)
        {
            Some(p) => {
                for f in point.functions {
                    if !p.functions.contains(&f) {
                        p.functions.push(f);
                    }
                }
            }
            None => existing.points.push(point),
        }
    }
    existing.points.sort_by_key(|p| p.file_offset);
}

/// The probe points of a prefixed allocator in one object, or None when it
/// does not define both `<prefix>malloc` and `<prefix>free`. Function names
/// in the points carry the prefix.
pub fn prefixed_points(info: &ElfInfo, prefix: &str) -> Option<Vec<ProbePoint>> {
    if prefix.is_empty() {
        return allocator::probe_points(info);
    }
    let standard: Vec<&str> = FUNCTIONS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !name.starts_with("_Z"))
        .collect();
    let view = info.renamed(|name| {
        let base = name.strip_prefix(prefix)?;
        standard.iter().copied().find(|s| *s == base)
    });
    let mut points = allocator::probe_points(&view)?;
    for point in &mut points {
        for f in &mut point.functions {
            *f = intern(&format!("{prefix}{f}"));
        }
    }
    for &(base, entry) in PREFIXED_ONLY {
        let name = intern(&format!("{prefix}{base}"));
        let Some(offset) = info.function_offset(name) else {
            continue;
        };
        match points.iter_mut().find(|p| p.file_offset == offset) {
            Some(p) => p.functions.push(name),
            None => points.push(ProbePoint::new(offset, entry, vec![name])),
        }
    }
    points.sort_by_key(|p| p.file_offset);
    Some(points)
}

/// Function names are `&'static str` throughout the probes; names made from
/// a prefix are few and live as long as the tracer, so they are leaked once.
fn intern(name: &str) -> &'static str {
    use std::sync::Mutex;
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = names.iter().copied().find(|n| *n == name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.push(leaked);
    leaked
}

/// Moves each object's probes past what the kernel would single-step and
/// marks the functions that only jump to another probed one (see
/// `allocator::place_probes`), unless `entry_probes` (`--entry-probes`)
/// keeps every probe at its function's entry.
pub fn placed(mut objects: Vec<AllocatorObject>, entry_probes: bool) -> Vec<AllocatorObject> {
    if !entry_probes {
        for object in &mut objects {
            crate::target::allocator::place_probes(object);
        }
    }
    objects
}

/// The allocator objects of a running process, placed.
pub fn for_running(
    process: &Process,
    prefixes: &[String],
    entry_probes: bool,
) -> anyhow::Result<Vec<AllocatorObject>> {
    use anyhow::Context as _;
    let maps = process.maps()?;
    let objects = for_process(process, &maps, prefixes)
        .with_context(|| format!("PID {} ({})", process.pid, process.comm))?;
    Ok(placed(objects, entry_probes))
}

/// The allocator objects of a program that has just started or exec'ed,
/// placed. Its dynamic loader may not have mapped its libraries yet (a
/// started command's child is stopped at the exec): then they are found as
/// for a command about to start, from its executable and environment.
///
/// `for_command` runs the loader (`ld.so --list`): safe while the
/// launcher's thread, which waits for any child, waits for this change.
pub fn for_new_program(
    process: &Process,
    prefixes: &[String],
    entry_probes: bool,
) -> anyhow::Result<Vec<AllocatorObject>> {
    use anyhow::Context as _;
    if let Ok(objects) = for_running(process, prefixes, entry_probes) {
        return Ok(objects);
    }
    let exe = process.host_path(&process.exe()?);
    let objects = for_command(&exe, &process.environ(), prefixes)
        .with_context(|| format!("PID {} ({})", process.pid, process.comm))?;
    Ok(placed(objects, entry_probes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn libc() -> (String, ElfInfo) {
        let me = Process::open(std::process::id()).unwrap();
        let path = me
            .maps()
            .unwrap()
            .iter()
            .filter_map(|m| m.file_path().map(str::to_string))
            .find(|p| p.contains("libc.so"))
            .unwrap();
        let info = ElfInfo::read(Path::new(&path)).unwrap();
        (path, info)
    }

    #[test]
    fn a_prefix_is_read_as_the_standard_names_and_keeps_its_own() {
        // glibc's __libc_malloc is malloc under another name: the same
        // addresses, reported with the prefix.
        let (_, info) = libc();
        let plain = allocator::probe_points(&info).unwrap();
        let prefixed = prefixed_points(&info, "__libc_").unwrap();
        let offset_of = |points: &[ProbePoint], name: &str| {
            points
                .iter()
                .find(|p| p.functions.contains(&name))
                .map(|p| p.file_offset)
        };
        for name in ["malloc", "free", "calloc", "realloc"] {
            let with_prefix = format!("__libc_{name}");
            assert_eq!(
                offset_of(&prefixed, &with_prefix),
                offset_of(&plain, name),
                "{name}"
            );
        }
        assert!(prefixed_points(&info, "nosuch_").is_none());
        // Merging the prefixed object into the plain one adds names, not points.
        let mut found = vec![AllocatorObject {
            path: "libc".into(),
            host_path: "libc".into(),
            points: plain.clone(),
        }];
        merge(
            &mut found,
            AllocatorObject {
                path: "libc".into(),
                host_path: "libc".into(),
                points: prefixed,
            },
        );
        assert_eq!(found.len(), 1);
        let malloc = found[0]
            .points
            .iter()
            .find(|p| p.functions.contains(&"malloc"))
            .unwrap();
        assert!(malloc.functions.contains(&"__libc_malloc"), "{malloc:?}");
        assert!(found[0].points.len() >= plain.len());
    }

    #[test]
    fn reads_soname_and_needed() {
        let (path, _) = libc();
        let (soname, needed) = dynamic_names(&std::fs::read(&path).unwrap());
        assert_eq!(soname.as_deref(), Some("libc.so.6"));
        assert!(
            needed.iter().any(|n| n.starts_with("ld-linux")),
            "{needed:?}"
        );
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(dynamic_names(&exe).1.iter().any(|n| n == "libc.so.6"));
        assert_eq!(dynamic_names(b"not elf"), (None, Vec::new()));
    }

    #[test]
    fn link_order_follows_needed_not_addresses() {
        // Address order puts libc (mapped last, lowest) before the library
        // that needs it; the loader's order is breadth-first from the
        // executable. Real files stand in: the test binary needs libc, and
        // libc needs the loader.
        let (libc, _) = libc();
        let exe = std::env::current_exe().unwrap().display().to_string();
        let me = Process::open(std::process::id()).unwrap();
        let loader = me
            .maps()
            .unwrap()
            .iter()
            .filter_map(|m| m.file_path().map(str::to_string))
            .find(|p| p.contains("ld-linux"))
            .unwrap();
        let first_guess = vec![exe.as_str(), loader.as_str(), libc.as_str()];
        let mut objects = Objects::default();
        let order = link_order(&first_guess, 0, &mut objects, &|p| PathBuf::from(p));
        assert_eq!(order, [exe.as_str(), libc.as_str(), loader.as_str()]);
        // A preloaded object stays right after the executable.
        let order = link_order(&first_guess, 1, &mut objects, &|p| PathBuf::from(p));
        assert_eq!(order, [exe.as_str(), loader.as_str(), libc.as_str()]);
    }
}
