//! What the tracer needs from an ELF file: where named functions are (as
//! file offsets, which is what uprobes take), and how the file links.

use std::{collections::HashMap, fs, path::Path};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, ObjectSymbolTable, SymbolKind};

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    // The reasons are in the messages, not in `source()`: `{:#}` would
    // print them twice.
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path} is not an ELF object this tracer can read: {error}")]
    Parse { path: String, error: object::Error },
}

/// The symbols and layout of one ELF file.
#[derive(Debug, Default)]
pub struct ElfInfo {
    /// Defined function symbols: name -> (virtual address, size). Dynamic
    /// symbols win over `.symtab` ones (they are what other objects bind to).
    functions: HashMap<String, (u64, u64)>,
    /// PT_LOAD segments: (virtual address, size in file, file offset).
    segments: Vec<(u64, u64, u64)>,
    /// PT_INTERP: the dynamic loader; None for a static executable.
    pub interpreter: Option<String>,
}

impl ElfInfo {
    pub fn read(path: &Path) -> Result<Self, ElfError> {
        let data = fs::read(path).map_err(|error| ElfError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(&data).map_err(|error| ElfError::Parse {
            path: path.display().to_string(),
            error,
        })
    }

    pub fn parse(data: &[u8]) -> Result<Self, object::Error> {
        let file = object::File::parse(data)?;
        let mut functions = HashMap::new();
        // .symtab first, then .dynsym overwrites: exported addresses win.
        for symbol in file.symbols().chain(file.dynamic_symbols()) {
            if symbol.kind() != SymbolKind::Text || !symbol.is_definition() {
                continue;
            }
            if let Ok(name) = symbol.name() {
                functions.insert(name.to_string(), (symbol.address(), symbol.size()));
            }
        }
        let segments = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (s.address(), size, offset)
            })
            .collect();
        Ok(ElfInfo {
            functions,
            segments,
            interpreter: interpreter(&file),
        })
    }

    /// Names of the defined functions.
    pub fn function_names(&self) -> impl Iterator<Item = &str> {
        self.functions.keys().map(String::as_str)
    }

    pub fn function_address(&self, name: &str) -> Option<u64> {
        self.functions.get(name).map(|(address, _)| *address)
    }

    /// Size of a function's code in bytes, as its symbol says (0: unknown).
    pub fn function_size(&self, name: &str) -> Option<u64> {
        self.functions.get(name).map(|(_, size)| *size)
    }

    /// File offset of a function: what a uprobe is attached at.
    pub fn function_offset(&self, name: &str) -> Option<u64> {
        self.vaddr_to_offset(self.function_address(name)?)
    }

    /// The same file seen under other names: each function whose name
    /// `rename` maps to Some(new name) is kept under the new name, the rest
    /// are left out. Lets a prefixed allocator (`je_malloc`) be read as the
    /// standard one.
    pub fn renamed<'a>(&self, rename: impl Fn(&str) -> Option<&'a str>) -> ElfInfo {
        ElfInfo {
            functions: self
                .functions
                .iter()
                .filter_map(|(name, value)| Some((rename(name)?.to_string(), *value)))
                .collect(),
            segments: self.segments.clone(),
            interpreter: self.interpreter.clone(),
        }
    }

    /// Up to `len` bytes of the file's contents at `vaddr`.
    pub fn code_at<'a>(&self, data: &'a [u8], vaddr: u64, len: usize) -> Option<&'a [u8]> {
        let start = self.vaddr_to_offset(vaddr)? as usize;
        data.get(start..start.checked_add(len)?.min(data.len()))
    }

    /// Every defined function: (name, virtual address, size).
    pub fn functions(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.functions
            .iter()
            .map(|(name, (address, size))| (name.as_str(), *address, *size))
    }

    /// The virtual address a file offset is loaded at.
    pub fn offset_to_vaddr(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|(_, size, start)| *start <= offset && offset < start + size)
            .map(|(addr, _, start)| offset - start + addr)
    }

    pub fn vaddr_to_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|(addr, size, _)| *addr <= vaddr && vaddr < addr + size)
            .map(|(addr, _, offset)| vaddr - addr + offset)
    }
}

/// The executable sections' contents: (address, bytes).
pub fn code_sections(data: &[u8]) -> Vec<(u64, &[u8])> {
    let Ok(file) = object::File::parse(data) else {
        return Vec::new();
    };
    file.sections()
        .filter(|s| s.kind() == object::SectionKind::Text)
        .filter_map(|s| Some((s.address(), s.data().ok()?)))
        .collect()
}

/// The dynamic relocations that bind a GOT slot to a named symbol: (slot
/// address, symbol name). A PLT stub jumps through such a slot.
pub fn jump_slots(data: &[u8]) -> Vec<(u64, String)> {
    let Ok(file) = object::File::parse(data) else {
        return Vec::new();
    };
    let (Some(relocations), Some(symbols)) =
        (file.dynamic_relocations(), file.dynamic_symbol_table())
    else {
        return Vec::new();
    };
    relocations
        .filter_map(|(slot, relocation)| {
            let object::RelocationTarget::Symbol(index) = relocation.target() else {
                return None;
            };
            let symbol = symbols.symbol_by_index(index).ok()?;
            Some((slot, symbol.name().ok()?.to_string()))
        })
        .collect()
}

/// The GNU build id of an ELF file, in hex, read from its note segments
/// only (a large binary is not read whole). None when there is none.
pub fn build_id(path: &Path) -> Option<String> {
    use object::read::elf::{FileHeader as _, ProgramHeader as _};
    let cache = object::ReadCache::new(fs::File::open(path).ok()?);
    let header = object::elf::FileHeader64::<object::Endianness>::parse(&cache).ok()?;
    let endian = header.endian().ok()?;
    for segment in header.program_headers(endian, &cache).ok()? {
        let Ok(Some(mut notes)) = segment.notes(endian, &cache) else {
            continue;
        };
        while let Ok(Some(note)) = notes.next() {
            if note.name() == object::elf::ELF_NOTE_GNU
                && note.n_type(endian) == object::elf::NT_GNU_BUILD_ID
            {
                return Some(note.desc().iter().map(|b| format!("{b:02x}")).collect());
            }
        }
    }
    None
}

fn interpreter(file: &object::File) -> Option<String> {
    use object::read::elf::ProgramHeader as _;
    let endian = object::Endianness::Little;
    match file {
        object::File::Elf64(elf) => elf.elf_program_headers().iter().find_map(|ph| {
            let interp = ph.interpreter(endian, elf.data()).ok()??;
            let interp = interp.strip_suffix(&[0]).unwrap_or(interp);
            Some(String::from_utf8_lossy(interp).into_owned())
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_malloc_in_our_libc() {
        let me = crate::target::process::Process::open(std::process::id()).unwrap();
        let maps = me.maps().unwrap();
        let libc = maps
            .iter()
            .filter_map(|m| m.file_path())
            .find(|p| p.contains("libc.so"))
            .expect("test binary links libc");
        let info = ElfInfo::read(Path::new(libc)).unwrap();
        let offset = info.function_offset("malloc").expect("libc exports malloc");
        assert!(offset > 0);
        assert!(info.function_offset("free").is_some());
        assert!(info.function_offset("no_such_function_here").is_none());
        assert!(info.interpreter.is_some(), "libc.so.6 has a PT_INTERP");
    }

    #[test]
    fn reads_the_build_id_of_our_own_binary() {
        let exe = std::env::current_exe().unwrap();
        let data = fs::read(&exe).unwrap();
        let expected = object::File::parse(&*data)
            .unwrap()
            .build_id()
            .unwrap()
            .map(|id| id.iter().map(|b| format!("{b:02x}")).collect::<String>());
        assert_eq!(build_id(&exe), expected);
        assert_eq!(build_id(Path::new("/proc/self/status")), None);
        assert_eq!(build_id(Path::new("/nonexistent")), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(ElfInfo::parse(b"not an elf file at all").is_err());
        assert!(ElfInfo::parse(b"\x7fELF\x02\x01\x01").is_err());
    }
}
