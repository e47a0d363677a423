//! `--unwind cfi`: the unwind tables of what the traced process maps,
//! published to the eBPF stack walker.
//!
//! Rows of each object (compiled by `target::unwind::cfi`) are appended to
//! `UNWIND_ROWS` (written through a shared mapping of the array: one
//! memcpy, no syscall per row) and kept for the whole run, so an object
//! mapped again reuses them. The process's executable mappings, each with
//! its load bias and row range, go to `UNWIND_MAPPINGS`: a sorted table in
//! two halves, the unused one rewritten and then made current in
//! `UNWIND_CONFIG`.
//!
//! `refresh` runs when the probes are attached, when a started command
//! reaches its entry point (every library it links is mapped then) and on
//! every housekeeping tick (libraries loaded with dlopen).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use tracer_common::unwind::{UnwindConfig, UnwindMapping, MAX_UNWIND_MAPPINGS};

use super::{maps::UnwindTables, Kernel};
use crate::target::{
    memory_map::Mapping,
    process::Process,
    unwind::{bias, cfi, segments, Segments},
};

/// Rows of one object in `UNWIND_ROWS`, and how its file maps to addresses.
#[derive(Clone, Debug, Default)]
struct ObjectTable {
    row_start: u32,
    row_count: u32,
    /// PT_LOAD segments: (virtual address, file offset, size in file).
    segments: Segments,
}

/// Sizes, for `-v` and the measurements.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnwindStats {
    pub objects: usize,
    pub rows: u32,
    pub row_capacity: u32,
    pub mappings: usize,
    /// Objects whose rows did not fit or could not be compiled.
    pub failed: usize,
}

pub struct Unwinder {
    process: Process,
    tables: UnwindTables,
    next_row: u32,
    /// By (path, inode): None when the object has no usable CFI.
    objects: HashMap<(String, u64), Option<ObjectTable>>,
    current: Vec<UnwindMapping>,
    half: u32,
    pub stats: UnwindStats,
    verbose: bool,
}

pub type SharedUnwinder = Arc<Mutex<Unwinder>>;

impl Unwinder {
    /// Takes the unwind maps out of `kernel`'s object (the programs keep
    /// using them) for `process`.
    pub fn new(kernel: &mut Kernel, process: Process, verbose: bool) -> Result<Self> {
        let tables = UnwindTables::take(kernel.loaded_mut())?;
        let capacity = tables.row_capacity();
        Ok(Unwinder {
            process,
            tables,
            next_row: 0,
            objects: HashMap::new(),
            current: Vec::new(),
            half: 1,
            stats: UnwindStats {
                row_capacity: capacity,
                ..Default::default()
            },
            verbose,
        })
    }

    pub fn shared(self) -> SharedUnwinder {
        Arc::new(Mutex::new(self))
    }

    /// Re-reads the process's mappings; compiles tables for new objects and
    /// publishes a new mapping table if anything changed.
    pub fn refresh(&mut self) -> Result<()> {
        let maps = self.process.maps()?;
        self.refresh_with(&maps)
    }

    pub fn refresh_with(&mut self, maps: &[Mapping]) -> Result<()> {
        let mut table = Vec::new();
        for m in maps {
            if !m.executable || !m.is_file() {
                continue;
            }
            let Some(path) = m.file_path() else { continue };
            let key = (path.to_string(), m.inode);
            if !self.objects.contains_key(&key) {
                let object = self.load_object(m, path);
                self.objects.insert(key.clone(), object);
            }
            let Some(object) = self.objects[&key].as_ref() else {
                continue;
            };
            let Some(bias) = bias(&object.segments, m) else {
                continue;
            };
            table.push(UnwindMapping {
                start: m.start,
                end: m.end,
                bias,
                row_start: object.row_start,
                row_count: object.row_count,
            });
        }
        table.sort_by_key(|m| m.start);
        table.truncate(MAX_UNWIND_MAPPINGS as usize);
        if table == self.current {
            return Ok(());
        }
        let half = self.half ^ 1;
        for (i, m) in table.iter().enumerate() {
            self.tables
                .set_mapping(half * MAX_UNWIND_MAPPINGS + i as u32, m)?;
        }
        let config = UnwindConfig {
            pid: self.process.pid,
            half,
            count: table.len() as u32,
            _pad: 0,
        };
        self.tables.set_config(config)?;
        self.half = half;
        self.stats.mappings = table.len();
        self.current = table;
        Ok(())
    }

    /// Compiles an object's rows into `UNWIND_ROWS`; None if it has no
    /// usable CFI or the rows do not fit (its frames then use frame pointers).
    fn load_object(&mut self, m: &Mapping, path: &str) -> Option<ObjectTable> {
        let data = crate::target::tasks::mapped_file(&self.process, m, path)?;
        let segments = segments(&data)?;
        let (rows, stats) = match cfi::compile(&data) {
            Ok(r) => r,
            Err(e) => {
                self.stats.failed += 1;
                if self.verbose {
                    eprintln!("tracer: no unwind table for {path}: {e}");
                }
                return None;
            }
        };
        let count = rows.len() as u32;
        let capacity = self.tables.row_capacity();
        if count > capacity - self.next_row {
            self.stats.failed += 1;
            eprintln!(
                "tracer: unwind rows full ({} of {}); {path} is walked with frame pointers \
                 (raise --unwind-rows)",
                self.next_row, capacity
            );
            return None;
        }
        let start = self.next_row;
        self.tables.write_rows(start, &rows);
        self.next_row += count;
        self.stats.objects += 1;
        self.stats.rows = self.next_row;
        if self.verbose {
            eprintln!(
                "tracer: unwind table for {path}: {} FDEs, {count} rows ({} unsupported)",
                stats.fdes, stats.unsupported
            );
        }
        Some(ObjectTable {
            row_start: start,
            row_count: count,
            segments,
        })
    }
}
