//! Addresses -> functions, files and lines.
//!
//! blazesym does the ELF/DWARF work (demangling, file:line, inlined
//! functions). This module keeps every mapping the process has shown, so a
//! stack can be symbolized after the process has exited or unloaded a
//! library, and caches each address's frames.

use std::{collections::HashMap, path::PathBuf};

use blazesym::symbolize::{
    source::{Elf, Source},
    Input, Symbolized, Symbolizer as Blazesym,
};

use crate::target::{memory_map::Mapping, process::Process, wrappers::Wrappers};

/// One symbolized frame.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Frame {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Path of the object the address is in.
    pub module: Option<String>,
    /// The address in the process (a return address, for all but inlined
    /// frames, which share their caller's).
    pub address: u64,
    /// This frame was inlined into the next one.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
    /// Its function only calls the allocator (`target::wrappers`): labels
    /// skip it.
    #[serde(skip)]
    pub wraps_allocator: bool,
}

impl Frame {
    /// Short module name for text output.
    pub fn module_name(&self) -> Option<&str> {
        self.module
            .as_deref()
            .map(|m| m.rsplit('/').next().unwrap_or(m))
    }
}

pub struct Symbolizer {
    blazesym: Blazesym,
    process: Process,
    /// Every file mapping seen, newest first.
    mappings: Vec<Mapping>,
    cache: HashMap<u64, Vec<Frame>>,
    wrappers: Wrappers,
}

impl Symbolizer {
    pub fn new(process: Process) -> Self {
        let blazesym = Blazesym::builder()
            .enable_demangling(true)
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .build();
        Symbolizer {
            blazesym,
            process,
            mappings: Vec::new(),
            cache: HashMap::new(),
            wrappers: Wrappers::default(),
        }
    }

    /// Records the process's current mappings. Cheap; call it often while
    /// the process lives so that nothing it maps is missed.
    pub fn note_mappings(&mut self) {
        let Ok(maps) = self.process.maps() else {
            return;
        };
        self.add_mappings(maps);
    }

    pub fn add_mappings(&mut self, maps: Vec<Mapping>) {
        for m in maps.into_iter().rev() {
            if !m.executable || !m.is_file() {
                continue;
            }
            if !self.mappings.contains(&m) {
                // A new mapping over an old range replaces it for lookups.
                self.mappings.insert(0, m);
            }
        }
    }

    fn mapping_of(&self, addr: u64) -> Option<&Mapping> {
        self.mappings.iter().find(|m| m.contains(addr))
    }

    /// Symbolizes a stack of return addresses (innermost first).
    pub fn symbolize_stack(&mut self, ips: &[u64]) -> Vec<Frame> {
        if ips
            .iter()
            .any(|ip| !self.cache.contains_key(ip) && self.mapping_of(*ip).is_none())
        {
            self.note_mappings();
        }
        self.fill_cache(ips);
        ips.iter()
            .flat_map(|ip| self.cache.get(ip).cloned().unwrap_or_default())
            .collect()
    }

    fn fill_cache(&mut self, ips: &[u64]) {
        // Group the uncached addresses by object so each is opened once.
        let mut by_module: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
        for &ip in ips {
            if self.cache.contains_key(&ip) {
                continue;
            }
            match self.mapping_of(ip) {
                Some(m) => {
                    // A return address points after the call; the call itself
                    // is one byte earlier.
                    let offset = m.file_offset(ip.saturating_sub(1));
                    let path = m.file_path().unwrap_or_default().to_string();
                    by_module.entry(path).or_default().push((ip, offset));
                }
                None => {
                    self.cache.insert(
                        ip,
                        vec![Frame {
                            address: ip,
                            ..Frame::default()
                        }],
                    );
                }
            }
        }
        for (module, addrs) in by_module {
            let host_path: PathBuf = self.process.host_path(&module);
            let offsets: Vec<u64> = addrs.iter().map(|(_, off)| *off).collect();
            let src = Source::Elf(Elf::new(host_path.clone()));
            let results = self
                .blazesym
                .symbolize(&src, Input::FileOffset(&offsets))
                .unwrap_or_default();
            for (i, (ip, offset)) in addrs.iter().enumerate() {
                let mut frames = match results.get(i) {
                    Some(Symbolized::Sym(sym)) => frames_of(sym, *ip, &module),
                    _ => vec![Frame {
                        address: *ip,
                        module: Some(module.clone()),
                        ..Frame::default()
                    }],
                };
                if let Some(outer) = frames.last_mut() {
                    outer.wraps_allocator = self.wrappers.only_calls_allocator(&host_path, *offset);
                }
                self.cache.insert(*ip, frames);
            }
        }
    }
}

/// The frames of one address, innermost (deepest inlined) first.
fn frames_of(sym: &blazesym::symbolize::Sym<'_>, address: u64, module: &str) -> Vec<Frame> {
    let location = |info: Option<&blazesym::symbolize::CodeInfo<'_>>| {
        info.map(|ci| (ci.to_path().display().to_string(), ci.line))
    };
    let frame = |name: &str, loc: Option<(String, Option<u32>)>, inlined: bool| {
        let (file, line) = match loc {
            Some((f, l)) => (Some(f), l),
            None => (None, None),
        };
        Frame {
            function: Some(name.to_string()),
            file,
            line,
            module: Some(module.to_string()),
            address,
            inlined,
            wraps_allocator: false,
        }
    };
    // blazesym lists inlined calls outermost first, each with the location of
    // the code inside it; the symbol's own location is where it calls the
    // first inlined function.
    let mut frames: Vec<Frame> = sym
        .inlined
        .iter()
        .rev()
        .map(|f| frame(&f.name, location(f.code_info.as_ref()), true))
        .collect();
    frames.push(frame(&sym.name, location(sym.code_info.as_deref()), false));
    frames
}
