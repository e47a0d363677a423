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

/// One object's unwind rows and how its file maps to addresses.
#[derive(Debug, Default)]
struct Object {
    /// The rows until they are written to `UNWIND_ROWS` (then emptied).
    rows: Vec<UnwindRow>,
    row_count: u32,
    /// Where its rows start in `UNWIND_ROWS`; None until written (or if they
    /// did not fit: its frames then use frame pointers).
    row_start: Option<u32>,
    /// PT_LOAD segments: (virtual address, file offset, size in file).
    segments: Segments,
    name: String,
}

/// Objects compiled once each, found by the (path, inode) of a mapping or,
/// for the same file under another path (/lib and /usr/lib), by inode and
/// size. Made before the programs are loaded, so `UNWIND_ROWS` is sized for
/// what the processes map (`rows_to_reserve`).
#[derive(Default)]
pub struct ObjectTables {
    by_mapping: HashMap<(String, u64), Option<usize>>,
    by_identity: HashMap<(u64, usize), usize>,
    objects: Vec<Object>,
    failed: usize,
    verbose: bool,
}

impl ObjectTables {
    pub fn new(verbose: bool) -> Self {
        ObjectTables {
            verbose,
            ..Default::default()
        }
    }

    /// Compiles what `process` maps now.
    pub fn prepare_process(&mut self, process: &Process) {
        if let Ok(maps) = process.maps() {
            for m in maps.iter().filter(|m| m.executable) {
                if let Some(path) = m.file_path() {
                    self.find(path, m.inode, || {
                        crate::target::tasks::mapped_file(process, m, path)
                    });
                }
            }
        }
    }

    /// Compiles files a command will map (its program and libraries).
    pub fn prepare_files(&mut self, paths: &[std::path::PathBuf]) {
        use std::os::unix::fs::MetadataExt as _;
        for path in paths {
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            let name = path.display().to_string();
            self.find(&name, meta.ino(), || std::fs::read(path).ok());
        }
    }

    /// Rows compiled so far.
    pub fn rows(&self) -> u64 {
        self.objects.iter().map(|o| o.row_count as u64).sum()
    }

    /// `UNWIND_ROWS` for what is compiled now and what comes later
    /// (dlopen, programs exec'ed, children): a quarter more, at least
    /// 128 Ki rows (1 MiB). A process mapping 100 libraries has about 2.9
    /// Mi rows (22 MiB; BENCHMARKS.md).
    pub fn rows_to_reserve(&self) -> u32 {
        let rows = self.rows();
        (rows + (rows / 4).max(128 << 10)).min(u32::MAX as u64 / 2) as u32
    }

    /// The object of a mapping of `path` (inode `inode`), compiled from
    /// `read()`'s bytes the first time; None if it has no usable CFI.
    fn find(
        &mut self,
        path: &str,
        inode: u64,
        read: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Option<usize> {
        let key = (path.to_string(), inode);
        if let Some(found) = self.by_mapping.get(&key) {
            return *found;
        }
        let found = read().and_then(|data| {
            let identity = (inode, data.len());
            if let Some(&index) = self.by_identity.get(&identity) {
                return Some(index);
            }
            let index = self.compile(path, &data)?;
            self.by_identity.insert(identity, index);
            Some(index)
        });
        self.by_mapping.insert(key, found);
        found
    }

    fn compile(&mut self, path: &str, data: &[u8]) -> Option<usize> {
        let segments = segments(data)?;
        let (mut rows, stats) = match cfi::compile(data) {
            Ok(r) => r,
            Err(e) => {
                self.failed += 1;
                if self.verbose {
                    eprintln!("tracer: no unwind table for {path}: {e}");
                }
                return None;
            }
        };
        // Built with frame pointers: walked by them, with no rows (cheaper).
        let frame_pointers = stats.keeps_frame_pointers();
        if frame_pointers {
            rows.clear();
        }
        if self.verbose {
            eprintln!(
                "tracer: unwind table for {path}: {} FDEs, {} rows ({} unsupported){}",
                stats.fdes,
                rows.len(),
                stats.unsupported,
                if frame_pointers {
                    "; keeps frame pointers: walked by them"
                } else {
                    ""
                }
            );
        }
        self.objects.push(Object {
            row_count: rows.len() as u32,
            rows,
            row_start: None,
            segments,
            name: path.to_string(),
        });
        Some(self.objects.len() - 1)
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
    objects: ObjectTables,
    processes: HashMap<u32, Traced>,
}

pub type SharedUnwinder = Arc<Mutex<Unwinder>>;

impl Unwinder {
    /// Takes the unwind maps out of `kernel`'s object (the programs keep
    /// using them) and writes the rows of the objects compiled so far.
    pub fn new(kernel: &mut Kernel, objects: ObjectTables) -> Result<Self> {
        let tables = UnwindTables::take(kernel.loaded_mut())?;
        let mut unwinder = Unwinder {
            tables,
            next_row: 0,
            objects,
            processes: HashMap::new(),
        };
        for index in 0..unwinder.objects.objects.len() {
            unwinder.write_rows(index);
        }
        Ok(unwinder)
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
        let objects = &self.objects.objects;
        UnwindStats {
            objects: objects.iter().filter(|o| o.row_start.is_some()).count(),
            rows: self.next_row,
            row_capacity: self.tables.row_capacity(),
            processes: self.processes.len(),
            mappings: self.processes.values().map(|t| t.current.len()).sum(),
            failed: self.objects.failed + objects.iter().filter(|o| o.row_start.is_none()).count(),
        }
    }

    /// Starts walking `process` with CFI: publishes the table of what it
    /// maps now. A forked child (`parent` traced, same program) gets its
    /// parent's table at once, before its maps are read.
    pub fn add(&mut self, process: &Process, parent: Option<u32>) -> Result<()> {
        let pid = process.pid;
        let inherited = parent
            .and_then(|p| self.processes.get(&p))
            .map(|t| t.current.clone())
            .unwrap_or_default();
        if !inherited.is_empty() {
            self.publish(pid, &inherited)?;
        }
        self.processes.insert(
            pid,
            Traced {
                process: process.clone(),
                current: inherited,
            },
        );
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
            if !m.executable {
                continue;
            }
            let Some(path) = m.file_path() else { continue };
            let known = self.objects.objects.len();
            let Some(index) = self.objects.find(path, m.inode, || {
                crate::target::tasks::mapped_file(process, m, path)
            }) else {
                continue;
            };
            if index >= known {
                self.write_rows(index);
            }
            let object = &self.objects.objects[index];
            let Some(row_start) = object.row_start else {
                continue;
            };
            let Some(bias) = bias(&object.segments, m) else {
                continue;
            };
            table.push(UnwindMapping {
                start: m.start,
                end: m.end,
                bias,
                row_start,
                row_count: object.row_count,
            });
        }
        table.sort_by_key(|m| m.start);
        table.truncate(MAX_UNWIND_MAPPINGS as usize);
        table
    }

    /// Appends an object's rows to `UNWIND_ROWS`, if they fit (otherwise
    /// its frames use frame pointers).
    fn write_rows(&mut self, index: usize) {
        let capacity = self.tables.row_capacity();
        let object = &mut self.objects.objects[index];
        if object.row_start.is_some() {
            return;
        }
        let rows = std::mem::take(&mut object.rows);
        let count = rows.len() as u32;
        if count > capacity - self.next_row {
            eprintln!(
                "tracer: unwind rows full ({} of {capacity}); {} is walked with frame pointers \
                 (raise --unwind-rows)",
                self.next_row, object.name
            );
            return;
        }
        self.tables.write_rows(self.next_row, &rows);
        object.row_start = Some(self.next_row);
        self.next_row += count;
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

#[cfg(test)]
mod tests {
    use object::{Object, ObjectSection, SectionKind};

    use super::*;

    /// Kernels before 5.13 refuse every program of an object holding a
    /// callback reference (`ld_imm64` of a BPF function), and bpf_loop is
    /// 5.17+: the walk must use neither, so that it loads on 5.10.
    #[test]
    fn the_programs_use_no_callback_and_no_bpf_loop() {
        const BPF_LOOP: i32 = 181;
        const BPF_PSEUDO_FUNC: u8 = 4;
        let file = object::File::parse(crate::kernel::programs::EBPF_OBJECT).unwrap();
        let mut checked = 0;
        for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
            let code = section.data().unwrap();
            for insn in code.chunks_exact(8) {
                let (opcode, src) = (insn[0], insn[1] >> 4);
                let imm = i32::from_le_bytes(insn[4..8].try_into().unwrap());
                let name = section.name().unwrap_or("?");
                assert!(
                    !(opcode == 0x18 && src == BPF_PSEUDO_FUNC),
                    "callback reference in {name}"
                );
                assert!(
                    !(opcode == 0x85 && src == 0 && imm == BPF_LOOP),
                    "bpf_loop in {name}"
                );
                checked += 1;
            }
        }
        assert!(checked > 1000, "the programs were read: {checked}");
    }

    #[test]
    fn objects_are_compiled_once_whatever_path_reaches_them() {
        let mut objects = ObjectTables::new(false);
        // Debian's /lib is a link to /usr/lib: the same file twice.
        objects.prepare_files(&[
            "/lib/x86_64-linux-gnu/libc.so.6".into(),
            "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
        ]);
        assert_eq!(objects.objects.len(), 1);
        let rows = objects.rows();
        assert!(rows > 10_000, "{rows}");
        // Room for what comes later: a quarter more, at least 128 Ki rows.
        assert_eq!(
            objects.rows_to_reserve() as u64,
            rows + (rows / 4).max(128 << 10)
        );
    }
}
