//! Compact CFI unwind tables shared by userspace (which compiles them from
//! each object's `.eh_frame`) and the eBPF side (which walks user stacks
//! with them). x86_64 only.
//!
//! `UNWIND_ROWS` is one array of rows for all objects, each object's rows
//! sorted by `pc`; `UNWIND_MAPPINGS` lists the process's executable mappings
//! sorted by start address, each pointing at its object's row range. The
//! mapping table has two halves: userspace fills the one not in use and then
//! flips `UnwindConfig::half`, so a walk never sees a half-written table.

/// Row kinds.
/// No FDE covers this address: try the frame-pointer rule.
pub const ROW_GAP: u8 = 0;
/// CFA = rsp + cfa_off.
pub const ROW_CFA_RSP: u8 = 1;
/// CFA = rbp + cfa_off.
pub const ROW_CFA_RBP: u8 = 2;
/// A rule the walker cannot express (DWARF expression, unusual return
/// address rule): the walk stops here and the stack is marked truncated.
pub const ROW_UNSUPPORTED: u8 = 3;
/// The return address is undefined: the outermost frame (`_start`, a
/// thread's start). The walk ends here, complete.
pub const ROW_OUTERMOST: u8 = 4;

/// One unwind row: from `pc` (an object virtual address) up to the next
/// row's `pc`, how to find the caller's frame. The return address is always
/// at CFA - 8 (rows where it is not are `ROW_UNSUPPORTED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct UnwindRow {
    pub pc: u32,
    pub cfa_off: i16,
    /// The caller's rbp is saved at CFA + 8 * rbp_off; 0: rbp is unchanged.
    pub rbp_off: i8,
    pub kind: u8,
}

/// One executable mapping of the traced process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    pub start: u64,
    pub end: u64,
    /// Process address - object virtual address.
    pub bias: u64,
    /// First row of the object in `UNWIND_ROWS`.
    pub row_start: u32,
    /// Number of rows; 0: no CFI known, frame pointers are used.
    pub row_count: u32,
}

/// Slot 0 of `UNWIND_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UnwindConfig {
    /// The process the mapping table describes (tgid); other processes are
    /// walked with frame pointers.
    pub pid: u32,
    /// Which half of `UNWIND_MAPPINGS` is current (0 or 1).
    pub half: u32,
    /// Entries in the current half.
    pub count: u32,
    pub _pad: u32,
}

/// Mappings per half of `UNWIND_MAPPINGS` (the array has twice as many).
pub const MAX_UNWIND_MAPPINGS: u32 = 512;
/// Binary search steps over one half: log2(MAX_UNWIND_MAPPINGS) + 1.
pub const MAPPING_SEARCH_STEPS: u32 = 10;
/// Default capacity of `UNWIND_ROWS` (8 bytes each).
pub const DEFAULT_UNWIND_ROWS: u32 = 1 << 20;
/// Binary search steps over one object's rows: enough for 2^24 rows.
pub const ROW_SEARCH_STEPS: u32 = 25;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for UnwindRow {}
    unsafe impl aya::Pod for UnwindMapping {}
    unsafe impl aya::Pod for UnwindConfig {}
}
