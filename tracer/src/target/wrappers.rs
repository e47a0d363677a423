//! Allocation wrappers found in the code: a function whose every call or
//! jump out of itself goes to the allocator (the malloc family, directly,
//! through its PLT stub or GOT slot) or to another wrapper (found so, or
//! on the built-in list), and that passes some of them a size it did not
//! set itself. `xmalloc`-like functions that call an error routine, take a
//! function pointer or call anything else are not, and neither is a typed
//! constructor (`new_timer`: `malloc(sizeof *t)`, a constant size): the
//! rule must never hide real code. Decoding is `placement`'s (iced-x86); the
//! functions and their sizes are the ELF symbol table's (a stripped object
//! has only its exported ones).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use super::{
    allocator::{Entry, FUNCTIONS},
    elf,
    elf::ElfInfo,
    placement::{self, Destination},
};

/// How deep a chain of wrappers calling wrappers is followed.
const MAX_DEPTH: usize = 4;

/// Per-object verdicts, each object read once.
#[derive(Default)]
pub struct Wrappers {
    objects: HashMap<PathBuf, Option<Object>>,
}

impl Wrappers {
    /// Whether the function holding file offset `offset` of `host_path`
    /// only calls the allocator.
    pub fn only_calls_allocator(&mut self, host_path: &Path, offset: u64) -> bool {
        let object = self
            .objects
            .entry(host_path.to_path_buf())
            .or_insert_with(|| Object::read(host_path));
        let Some(object) = object else {
            return false;
        };
        let Some(vaddr) = object.info.offset_to_vaddr(offset) else {
            return false;
        };
        object.judge_containing(vaddr)
    }
}

/// One object's functions and code.
struct Object {
    info: ElfInfo,
    /// Executable sections: (address, contents).
    code: Vec<(u64, Vec<u8>)>,
    /// Functions by start: (start, size, name), sorted.
    functions: Vec<(u64, u64, String)>,
    /// GOT slot -> bound symbol.
    slots: HashMap<u64, String>,
    verdicts: HashMap<u64, bool>,
}

impl Object {
    fn read(path: &Path) -> Option<Object> {
        let data = std::fs::read(path).ok()?;
        Object::parse(data)
    }

    fn parse(data: Vec<u8>) -> Option<Object> {
        let info = ElfInfo::parse(&data).ok()?;
        let functions = info
            .functions()
            .map(|(name, address, size)| (address, size, name.to_string()))
            .collect();
        let code = elf::code_sections(&data)
            .into_iter()
            .map(|(address, bytes)| (address, bytes.to_vec()))
            .collect();
        let slots = elf::jump_slots(&data).into_iter().collect();
        Some(Object::new(info, code, functions, slots))
    }

    fn new(
        info: ElfInfo,
        code: Vec<(u64, Vec<u8>)>,
        mut functions: Vec<(u64, u64, String)>,
        slots: HashMap<u64, String>,
    ) -> Object {
        functions.retain(|(_, size, _)| *size > 0);
        functions.sort();
        Object {
            info,
            code,
            functions,
            slots,
            verdicts: HashMap::new(),
        }
    }

    /// `len` bytes of code at `vaddr`, or fewer where its section ends.
    fn code_at(&self, vaddr: u64, len: u64) -> Option<&[u8]> {
        let (address, bytes) = self
            .code
            .iter()
            .find(|(a, b)| *a <= vaddr && vaddr < a + b.len() as u64)?;
        let start = (vaddr - address) as usize;
        Some(&bytes[start..(start + len as usize).min(bytes.len())])
    }

    /// The function whose body holds `vaddr`.
    fn containing(&self, vaddr: u64) -> Option<(u64, u64)> {
        let i = self
            .functions
            .partition_point(|(start, _, _)| *start <= vaddr);
        let (start, size, _) = self.functions.get(i.checked_sub(1)?)?;
        (vaddr < start + size).then_some((*start, *size))
    }

    fn name_at(&self, start: u64) -> Option<&str> {
        let i = self.functions.partition_point(|(s, _, _)| *s < start);
        self.functions
            .get(i)
            .filter(|(s, _, _)| *s == start)
            .map(|(_, _, name)| name.as_str())
    }

    fn judge_containing(&mut self, vaddr: u64) -> bool {
        match self.containing(vaddr) {
            Some((start, size)) => self.judge(start, size, 0),
            None => false,
        }
    }

    /// Whether the function at `start` only calls the allocator.
    fn judge(&mut self, start: u64, size: u64, depth: usize) -> bool {
        if let Some(verdict) = self.verdicts.get(&start) {
            return *verdict;
        }
        // Cycles and chains too deep are judged "no" while in progress.
        self.verdicts.insert(start, false);
        let verdict = self.judge_code(start, size, depth);
        self.verdicts.insert(start, verdict);
        verdict
    }

    fn judge_code(&mut self, start: u64, size: u64, depth: usize) -> bool {
        if depth > MAX_DEPTH {
            return false;
        }
        let Some(code) = self.code_at(start, size) else {
            return false;
        };
        if code.len() as u64 != size {
            return false;
        }
        let Some(exits) = placement::exits(code, start) else {
            return false;
        };
        if exits.indirect {
            return false;
        }
        let mut passes_size = false;
        for transfer in &exits.transfers {
            let Some(size_args) = self.callee(transfer.to, depth) else {
                return false;
            };
            passes_size |=
                !size_args.is_empty() && !size_args.iter().all(|&n| transfer.constant[n]);
        }
        passes_size
    }

    /// The size arguments of an allocator or wrapper at `to` (none: it
    /// frees or measures); None if it is neither.
    fn callee(&mut self, to: Destination, depth: usize) -> Option<&'static [usize]> {
        let target = match to {
            Destination::Slot(slot) => return size_arguments(self.slots.get(&slot)?),
            Destination::Direct(target) => target,
        };
        if let Some(name) = self.name_at(target) {
            if let Some(args) = size_arguments(name) {
                return Some(args);
            }
        }
        match self.containing(target) {
            Some((start, size)) if start == target => {
                self.judge(start, size, depth + 1).then_some(&[0][..])
            }
            Some(_) => None,
            // No symbol: a PLT stub, if it jumps through an allocator's slot.
            None => {
                let stub = self.code_at(target, 16).unwrap_or_default();
                let slot = placement::plt_slot(stub, target)?;
                size_arguments(self.slots.get(&slot)?)
            }
        }
    }
}

/// The size arguments (0: the first) of an allocator function or a listed
/// wrapper (taken to take the size first), by symbol name; None for any
/// other function.
fn size_arguments(name: &str) -> Option<&'static [usize]> {
    let name = name.split('@').next().unwrap_or(name);
    if name == "malloc_usable_size" {
        return Some(&[]);
    }
    let Some((_, entry)) = FUNCTIONS.iter().find(|(f, _)| *f == name) else {
        return crate::report::label::is_listed(name).then_some(&[0][..]);
    };
    Some(match entry {
        Entry::Malloc | Entry::Valloc | Entry::Pvalloc => &[0],
        Entry::Calloc => &[0, 1],
        Entry::Realloc | Entry::Memalign => &[1],
        Entry::Reallocarray => &[1, 2],
        Entry::PosixMemalign => &[2],
        Entry::Free => &[],
    })
}

#[cfg(test)]
mod tests;
