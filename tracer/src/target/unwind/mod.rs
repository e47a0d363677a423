//! `--unwind cfi`: unwind tables for the eBPF stack walker.
//!
//! For every executable object the traced process maps, `cfi` compiles the
//! `.eh_frame` into compact rows; they are appended to the `UNWIND_ROWS` map
//! (written through a shared mapping of the array: one memcpy, no syscall
//! per row) and kept for the whole run, so an object mapped again reuses
//! them. The process's executable mappings, each with its load bias and
//! row range, go to `UNWIND_MAPPINGS`: a sorted table in two halves, the
//! unused one rewritten and then made current in `UNWIND_CONFIG`.
//!
//! `refresh` runs when the probes are attached, when a started command
//! reaches its entry point (every library it links is mapped then) and on
//! every housekeeping tick (libraries loaded with dlopen).

pub mod cfi;

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd},
    sync::{Arc, Mutex},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{Array, Map, MapData},
    Ebpf,
};
use object::{Object, ObjectSegment};
use tracer_common::unwind::{UnwindConfig, UnwindMapping, UnwindRow, MAX_UNWIND_MAPPINGS};

use crate::{target::memory_map::Mapping, target::process::Process};

/// How user stacks are walked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnwindMode {
    /// Frame pointers, by the kernel (`bpf_get_stack`): cheap, but code
    /// built without frame pointers hides its caller.
    #[default]
    Fp,
    /// DWARF call frame information (.eh_frame) of every mapped object,
    /// walked in the kernel; frame pointers where an object has none.
    Cfi,
}

/// Value of the eBPF programs' `UNWIND_MODE` global.
impl UnwindMode {
    pub fn global(self) -> u32 {
        match self {
            UnwindMode::Fp => 0,
            UnwindMode::Cfi => 1,
        }
    }
}

/// Rows of one object in `UNWIND_ROWS`, and how its file maps to addresses.
#[derive(Clone, Debug, Default)]
struct ObjectTable {
    row_start: u32,
    row_count: u32,
    /// PT_LOAD segments: (virtual address, file offset, size in file).
    segments: Vec<(u64, u64, u64)>,
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

struct RowsMmap {
    ptr: *mut UnwindRow,
    capacity: u32,
}

// The mapping is only written with the `Unwinder` locked.
unsafe impl Send for RowsMmap {}

impl Drop for RowsMmap {
    fn drop(&mut self) {
        unsafe {
            libc::munmap(
                self.ptr as *mut libc::c_void,
                self.capacity as usize * std::mem::size_of::<UnwindRow>(),
            )
        };
    }
}

pub struct Unwinder {
    process: Process,
    _rows_map: MapData,
    rows: RowsMmap,
    next_row: u32,
    mappings: Array<MapData, UnwindMapping>,
    config: Array<MapData, UnwindConfig>,
    /// By (path, inode): None when the object has no usable CFI.
    objects: HashMap<(String, u64), Option<ObjectTable>>,
    current: Vec<UnwindMapping>,
    half: u32,
    pub stats: UnwindStats,
    verbose: bool,
}

pub type SharedUnwinder = Arc<Mutex<Unwinder>>;

impl Unwinder {
    /// Takes the unwind maps out of the loaded object (the programs keep
    /// using them) for `process`.
    pub fn new(ebpf: &mut Ebpf, process: Process, verbose: bool) -> Result<Self> {
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("eBPF object has no map {name}"))
        };
        let Map::Array(rows_map) = take(ebpf, "UNWIND_ROWS")? else {
            return Err(anyhow!("UNWIND_ROWS is not an array"));
        };
        let capacity = rows_map.info()?.max_entries();
        let bytes = capacity as usize * std::mem::size_of::<UnwindRow>();
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                rows_map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping UNWIND_ROWS");
        }
        let mappings = Array::try_from(take(ebpf, "UNWIND_MAPPINGS")?)?;
        let config = Array::try_from(take(ebpf, "UNWIND_CONFIG")?)?;
        Ok(Unwinder {
            process,
            _rows_map: rows_map,
            rows: RowsMmap {
                ptr: ptr as *mut UnwindRow,
                capacity,
            },
            next_row: 0,
            mappings,
            config,
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
            self.mappings
                .set(half * MAX_UNWIND_MAPPINGS + i as u32, m, 0)
                .context("writing UNWIND_MAPPINGS")?;
        }
        let config = UnwindConfig {
            pid: self.process.pid,
            half,
            count: table.len() as u32,
            _pad: 0,
        };
        self.config
            .set(0, config, 0)
            .context("writing UNWIND_CONFIG")?;
        self.half = half;
        self.stats.mappings = table.len();
        self.current = table;
        Ok(())
    }

    /// Compiles an object's rows into `UNWIND_ROWS`; None if it has no
    /// usable CFI or the rows do not fit (its frames then use frame pointers).
    fn load_object(&mut self, m: &Mapping, path: &str) -> Option<ObjectTable> {
        // map_files reaches the mapped file even if it was deleted or
        // replaced on disk; the path is the fallback.
        let data = std::fs::read(format!(
            "/proc/{}/map_files/{:x}-{:x}",
            self.process.pid, m.start, m.end
        ))
        .or_else(|_| std::fs::read(self.process.host_path(path)))
        .ok()?;
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
        if count > self.rows.capacity - self.next_row {
            self.stats.failed += 1;
            eprintln!(
                "tracer: unwind rows full ({} of {}); {path} is walked with frame pointers \
                 (raise --unwind-rows)",
                self.next_row, self.rows.capacity
            );
            return None;
        }
        let start = self.next_row;
        unsafe {
            std::ptr::copy_nonoverlapping(
                rows.as_ptr(),
                self.rows.ptr.add(start as usize),
                rows.len(),
            )
        };
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

/// Executable PT_LOAD segments.
fn segments(data: &[u8]) -> Option<Vec<(u64, u64, u64)>> {
    let file = object::File::parse(data).ok()?;
    Some(
        file.segments()
            .filter(|s| match s.flags() {
                object::SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                _ => true,
            })
            .map(|s| {
                let (offset, size) = s.file_range();
                (s.address(), offset, size)
            })
            .collect(),
    )
}

const PAGE: u64 = 4096;

/// Process address minus object address for an executable mapping of the
/// object: from the executable PT_LOAD segment whose pages hold the
/// mapping's file offset. The segment need not start on a page (lld and
/// newer binutils lay out code at offset 0x13b30, address 0x14b30; the
/// mapping then starts at offset 0x13000).
fn bias(segments: &[(u64, u64, u64)], m: &Mapping) -> Option<u64> {
    let &(vaddr, offset, _) = segments
        .iter()
        .find(|&&(_, offset, size)| offset & !(PAGE - 1) <= m.offset && m.offset < offset + size)?;
    let object_addr = vaddr.wrapping_add(m.offset).wrapping_sub(offset);
    Some(m.start.wrapping_sub(object_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_comes_from_the_segment_holding_the_mapping() {
        // Code at offset 0x1000 but address 0x2000.
        let segments = [(0x2000, 0x1000, 0x5000)];
        let m = Mapping {
            start: 0x7f00_0000_1000,
            end: 0x7f00_0000_6000,
            offset: 0x1000,
            readable: true,
            executable: true,
            inode: 1,
            path: Some("/x".into()),
        };
        assert_eq!(bias(&segments, &m), Some(0x7f00_0000_1000 - 0x2000));
        let outside = Mapping {
            offset: 0x9000,
            ..m.clone()
        };
        assert_eq!(bias(&segments, &outside), None);
        // Code segment not page aligned in the file (a Rust binary of
        // Debian 12): maps from the page below, bias from the segment.
        let segments = [(0x14b30, 0x13b30, 0x3e590)];
        let m = Mapping {
            start: 0x5555_5556_8000,
            end: 0x5555_555a_7000,
            offset: 0x13000,
            ..m
        };
        assert_eq!(bias(&segments, &m), Some(0x5555_5556_8000 - 0x14000));
    }
}
