//! CFI unwinding (the default): the unwind tables of what every traced
//! process maps, published to the eBPF stack walker.
//!
//! Rows of each object (compiled by `target::unwind::cfi`) are appended to
//! `UNWIND_ROWS` (written through a shared mapping of the array: one
//! memcpy, no syscall per row) once per object, by (path, inode), and kept
//! for the whole run: every process mapping the object points at the same
//! rows, as the OpenTelemetry eBPF profiler shares its per-executable stack
//! deltas. Each process's executable mappings, each with its load bias and
//! row range, go to `UNWIND_PROCS` under its PID, replaced as a whole when
//! they change.
//!
//! A process's table is made when it becomes a target (attach, start, fork:
//! the parent's table at once; exec), again when a started command reaches
//! its entry point (every library it links is mapped then), as soon as a
//! traced process maps code from a file (a thread woken by the mmap
//! tracepoint's `UNWIND_EVENTS`: dlopen), and on every housekeeping tick.

use std::{
    collections::{BTreeSet, HashMap},
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use anyhow::Result;
use tracer_common::unwind::{UnwindMapping, UnwindProc, UnwindRow, MAX_UNWIND_MAPPINGS};

use super::{
    maps::{EventRing, UnwindTables},
    Kernel,
};
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

/// Sizes, for `-v`, the report and the measurements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindStats {
    /// Objects with rows, shared by every process that maps them.
    pub objects: usize,
    pub rows: u32,
    pub row_capacity: u32,
    /// Processes with a mapping table, and their mappings in all.
    pub processes: usize,
    pub mappings: usize,
    /// Objects whose rows did not fit or could not be compiled (walked with
    /// frame pointers).
    pub failed: usize,
}

impl UnwindStats {
    /// Bytes of kernel memory the tables take: the rows array (allocated
    /// whole at load) and one mapping table per process.
    pub fn bytes(&self) -> u64 {
        self.row_capacity as u64 * size_of::<UnwindRow>() as u64
            + self.processes as u64 * size_of::<UnwindProc>() as u64
    }

    /// Bytes of rows in use.
    pub fn rows_bytes(&self) -> u64 {
        self.rows as u64 * size_of::<UnwindRow>() as u64
    }
}

/// A traced process and the mapping table last published for it.
struct Traced {
    process: Process,
    current: Vec<UnwindMapping>,
}

pub struct Unwinder {
    tables: UnwindTables,
    next_row: u32,
    /// By (path, inode): None when the object has no usable CFI.
    objects: HashMap<(String, u64), Option<ObjectTable>>,
    processes: HashMap<u32, Traced>,
    failed: usize,
    verbose: bool,
}

pub type SharedUnwinder = Arc<Mutex<Unwinder>>;

impl Unwinder {
    /// Takes the unwind maps out of `kernel`'s object (the programs keep
    /// using them).
    pub fn new(kernel: &mut Kernel, verbose: bool) -> Result<Self> {
        let tables = UnwindTables::take(kernel.loaded_mut())?;
        Ok(Unwinder {
            tables,
            next_row: 0,
            objects: HashMap::new(),
            processes: HashMap::new(),
            failed: 0,
            verbose,
        })
    }

    /// Shares the unwinder, and starts the thread that refreshes a
    /// process's table as soon as it maps code (it ends with the last
    /// `SharedUnwinder`).
    pub fn shared(mut self) -> SharedUnwinder {
        let events = self.tables.events.take();
        let shared = Arc::new(Mutex::new(self));
        if let Some(events) = events {
            let weak = Arc::downgrade(&shared);
            let spawned = std::thread::Builder::new()
                .name("unwind-tables".into())
                .spawn(move || watch_code_mappings(events, weak));
            if let Err(e) = spawned {
                log::debug!("no unwind table thread (tables follow the tick): {e}");
            }
        }
        shared
    }

    pub fn stats(&self) -> UnwindStats {
        UnwindStats {
            objects: self.objects.values().filter(|o| o.is_some()).count(),
            rows: self.next_row,
            row_capacity: self.tables.row_capacity(),
            processes: self.processes.len(),
            mappings: self.processes.values().map(|t| t.current.len()).sum(),
            failed: self.failed,
        }
    }

    /// Starts walking `process` with CFI: publishes the table of what it
    /// maps now. A forked child (`parent` traced, same program) gets its
    /// parent's table at once, before its maps are read.
    pub fn add(&mut self, process: &Process, parent: Option<u32>) -> Result<()> {
        let pid = process.pid;
        let inherited = parent
            .and_then(|p| self.processes.get(&p))
            .map(|t| t.current.clone());
        if let Some(table) = inherited.filter(|t| !t.is_empty()) {
            self.publish(pid, &table)?;
            self.processes.insert(
                pid,
                Traced {
                    process: process.clone(),
                    current: table,
                },
            );
        } else {
            self.processes.insert(
                pid,
                Traced {
                    process: process.clone(),
                    current: Vec::new(),
                },
            );
        }
        self.refresh_process(pid)
    }

    /// Forgets process `pid` (ended or replaced by an exec, which `add`
    /// follows).
    pub fn remove(&mut self, pid: u32) {
        if self.processes.remove(&pid).is_some() {
            self.tables.remove_process(pid);
        }
    }

    /// Re-reads every process's mappings.
    pub fn refresh(&mut self) -> Result<()> {
        let pids: Vec<u32> = self.processes.keys().copied().collect();
        let mut first_error = None;
        for pid in pids {
            if let Err(e) = self.refresh_process(pid) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Re-reads process `pid`'s mappings; compiles tables for new objects
    /// and publishes a new mapping table if anything changed.
    pub fn refresh_process(&mut self, pid: u32) -> Result<()> {
        let Some(traced) = self.processes.get(&pid) else {
            return Ok(());
        };
        let process = traced.process.clone();
        let maps = process.maps()?;
        let table = self.table_for(&process, &maps);
        if self.processes.get(&pid).map(|t| &t.current) == Some(&table) {
            return Ok(());
        }
        self.publish(pid, &table)?;
        if let Some(traced) = self.processes.get_mut(&pid) {
            traced.current = table;
        }
        Ok(())
    }

    fn publish(&mut self, pid: u32, table: &[UnwindMapping]) -> Result<()> {
        let mut value = Box::<UnwindProc>::default();
        value.count = table.len() as u32;
        value.mappings[..table.len()].copy_from_slice(table);
        self.tables.set_process(pid, &value)?;
        Ok(())
    }

    /// The sorted mapping table of `maps`, compiling objects not seen yet.
    fn table_for(&mut self, process: &Process, maps: &[Mapping]) -> Vec<UnwindMapping> {
        let mut table = Vec::new();
        for m in maps {
            if !m.executable || !m.is_file() {
                continue;
            }
            let Some(path) = m.file_path() else { continue };
            let key = (path.to_string(), m.inode);
            if !self.objects.contains_key(&key) {
                let object = self.load_object(process, m, path);
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
        table
    }

    /// Compiles an object's rows into `UNWIND_ROWS`; None if it has no
    /// usable CFI or the rows do not fit (its frames then use frame pointers).
    fn load_object(&mut self, process: &Process, m: &Mapping, path: &str) -> Option<ObjectTable> {
        let data = crate::target::tasks::mapped_file(process, m, path)?;
        let segments = segments(&data)?;
        let (rows, stats) = match cfi::compile(&data) {
            Ok(r) => r,
            Err(e) => {
                self.failed += 1;
                if self.verbose {
                    eprintln!("tracer: no unwind table for {path}: {e}");
                }
                return None;
            }
        };
        let count = rows.len() as u32;
        let capacity = self.tables.row_capacity();
        if count > capacity - self.next_row {
            self.failed += 1;
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

/// Refreshes the table of each process that mapped code, as its events
/// come; returns when the unwinder is dropped.
fn watch_code_mappings(mut events: EventRing<u64>, unwinder: Weak<Mutex<Unwinder>>) {
    const POLL: Duration = Duration::from_millis(100);
    loop {
        let mut fd = libc::pollfd {
            fd: events.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        unsafe { libc::poll(&mut fd, 1, POLL.as_millis() as i32) };
        let Some(unwinder) = unwinder.upgrade() else {
            return;
        };
        let mut pids = BTreeSet::new();
        while let Some(pid) = events.next_record() {
            pids.insert(pid as u32);
        }
        if pids.is_empty() {
            continue;
        }
        let mut unwinder = unwinder.lock().unwrap_or_else(|e| e.into_inner());
        for pid in pids {
            if let Err(e) = unwinder.refresh_process(pid) {
                log::debug!("unwind table of PID {pid} after it mapped code: {e:#}");
            }
        }
    }
}
