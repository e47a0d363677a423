//! Compact CFI unwind tables shared by userspace (which compiles them from
//! each object's `.eh_frame`) and the eBPF side (which walks user stacks
//! with them). x86_64 only.
//!
//! `UNWIND_ROWS` is one array of rows for all objects of all traced
//! processes, each object's rows sorted by `pc` and compiled once however
//! many processes map it; `UNWIND_PROCS` holds, per traced process, its
//! executable mappings sorted by start address, each pointing at its
//! object's row range. Userspace replaces a process's table as a whole (one
//! map update), so a walk never sees a half-written table.

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
/// A signal trampoline (`__restore_rt`): the interrupted frame's registers
/// are in the `ucontext` on the stack (`SIGNAL_*` offsets from rsp).
pub const ROW_SIGNAL: u8 = 5;
/// A PLT stub: CFA = rsp + 8, or rsp + 16 once the stub has pushed its
/// relocation index (at offset 11 and later in the 16-byte entry).
pub const ROW_PLT: u8 = 6;

/// Where x86_64 Linux's `rt_sigframe` keeps the interrupted registers,
/// from rsp at `__restore_rt` (`uc_mcontext` is 40 bytes into the ucontext;
/// `struct sigcontext`: r8..r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip).
pub const SIGNAL_RBP: u64 = 40 + 8 * 10;
pub const SIGNAL_RSP: u64 = 40 + 8 * 15;
pub const SIGNAL_RIP: u64 = 40 + 8 * 16;

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

/// One executable mapping of a traced process.
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

/// The value of `UNWIND_PROCS` for one process (tgid): its executable
/// mappings. Processes without one are walked with frame pointers.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UnwindProc {
    /// Entries of `mappings` in use, sorted by `start`.
    pub count: u32,
    pub _pad: u32,
    pub mappings: [UnwindMapping; MAX_UNWIND_MAPPINGS as usize],
}

impl Default for UnwindProc {
    fn default() -> Self {
        UnwindProc {
            count: 0,
            _pad: 0,
            mappings: [UnwindMapping::default(); MAX_UNWIND_MAPPINGS as usize],
        }
    }
}

/// Executable mappings per process a walk can use (a process mapping 100
/// shared objects has about 100: one code segment each).
pub const MAX_UNWIND_MAPPINGS: u32 = 512;
/// Binary search steps over one process's mappings: log2(MAX_UNWIND_MAPPINGS) + 1.
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
    unsafe impl aya::Pod for UnwindProc {}
}
