//! `.eh_frame` -> compact unwind rows (`tracer_common::unwind::UnwindRow`).
//! Pure: takes an ELF file's bytes, returns rows sorted by address.
//!
//! For x86_64 the walker needs three rules per address: the CFA (rsp or
//! rbp plus an offset), the return address (always CFA - 8 in practice) and
//! the caller's rbp (unchanged, or saved at CFA + offset). Two DWARF
//! expressions are common enough to have rows of their own: PLT stubs
//! (`ROW_PLT`) and signal trampolines such as `__restore_rt` (`ROW_SIGNAL`,
//! FDEs with the 'S' augmentation). Anything else — other expressions, a
//! CFA on another register, offsets that do not fit — becomes
//! `ROW_UNSUPPORTED`, where the walk stops and the stack is marked
//! truncated.

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, LittleEndian, RegisterRule, UnwindContext,
    UnwindSection, X86_64,
};
use object::{Object, ObjectSection};
use tracer_common::unwind::{
    UnwindRow, ROW_CFA_RBP, ROW_CFA_RSP, ROW_GAP, ROW_OUTERMOST, ROW_PLT, ROW_SIGNAL,
    ROW_UNSUPPORTED,
};

#[derive(Debug, thiserror::Error)]
pub enum CfiError {
    #[error("not an ELF object: {0}")]
    Elf(#[from] object::Error),
    #[error("bad .eh_frame: {0}")]
    Dwarf(#[from] gimli::Error),
    #[error("not an x86_64 object")]
    Architecture,
    #[error("code above 4 GiB in the object's address space")]
    TooHigh,
}

/// What compiling an object gave, for `-v` and the numbers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CfiStats {
    pub fdes: usize,
    pub rows: usize,
    pub unsupported: usize,
    /// FDEs of ordinary functions (not PLT stubs, signal trampolines or
    /// outermost frames such as `_start`), and those of them that set up a
    /// frame pointer (CFA = rbp + 16, the caller's rbp at CFA - 16): see
    /// `keeps_frame_pointers`.
    pub function_fdes: usize,
    pub frame_pointer_fdes: usize,
}

impl CfiStats {
    /// Whether the object was built with frame pointers (nearly every
    /// function sets one up): its frames can be walked by the cheaper
    /// frame-pointer rule. Return addresses lie in function bodies, past
    /// the prologue, where the rule holds.
    pub fn keeps_frame_pointers(&self) -> bool {
        self.function_fdes >= 1 && self.frame_pointer_fdes * 10 >= self.function_fdes * 9
    }
}

/// The rows of an ELF file's `.eh_frame`, sorted by `pc`, one row per change
/// of rule, with `ROW_GAP` rows where no FDE covers the code. An object
/// without `.eh_frame` gives no rows (the walker then uses frame pointers).
pub fn compile(data: &[u8]) -> Result<(Vec<UnwindRow>, CfiStats), CfiError> {
    let file = object::File::parse(data)?;
    if file.architecture() != object::Architecture::X86_64 {
        return Err(CfiError::Architecture);
    }
    let Some(section) = file.section_by_name(".eh_frame") else {
        return Ok((Vec::new(), CfiStats::default()));
    };
    let section_data = section.data()?;
    let mut bases = BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = file.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    // PLT stubs: their CFA is an expression of rip (16-byte entries).
    let plt: Vec<(u64, u64)> = file
        .sections()
        .filter(|s| s.name().is_ok_and(|n| n.starts_with(".plt")))
        .map(|s| (s.address(), s.address() + s.size()))
        .collect();
    let mut eh_frame = EhFrame::new(section_data, LittleEndian);
    eh_frame.set_address_size(8);

    let mut stats = CfiStats::default();
    let mut rows = Vec::new();
    let mut ctx = Box::new(UnwindContext::new());
    let mut entries = eh_frame.entries(&bases);
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) =
            partial.parse(|section, bases, offset| section.cie_from_offset(bases, offset))
        else {
            continue;
        };
        if fde.len() == 0 {
            continue;
        }
        if fde.end_address() > u32::MAX as u64 {
            return Err(CfiError::TooHigh);
        }
        stats.fdes += 1;
        let signal = fde.is_signal_trampoline();
        let in_plt = plt
            .iter()
            .any(|&(start, end)| start <= fde.initial_address() && fde.initial_address() < end);
        let mut table = fde.rows(&eh_frame, &bases, &mut ctx)?;
        let mut frame_pointer = false;
        let mut ordinary = !signal && !in_plt;
        while let Some(row) = table.next_row()? {
            if row.start_address() >= row.end_address() {
                continue;
            }
            let compact = if signal {
                special(ROW_SIGNAL)
            } else if in_plt && matches!(row.cfa(), CfaRule::Expression(_)) {
                special(ROW_PLT)
            } else {
                convert(row)
            };
            if compact.kind == ROW_UNSUPPORTED {
                stats.unsupported += 1;
            }
            frame_pointer |=
                (compact.kind, compact.cfa_off, compact.rbp_off) == (ROW_CFA_RBP, 16, -2);
            ordinary &= compact.kind != ROW_OUTERMOST;
            rows.push(UnwindRow {
                pc: row.start_address() as u32,
                ..compact
            });
        }
        stats.function_fdes += ordinary as usize;
        stats.frame_pointer_fdes += (ordinary && frame_pointer) as usize;
        rows.push(UnwindRow {
            pc: fde.end_address() as u32,
            kind: ROW_GAP,
            ..Default::default()
        });
    }
    let rows = normalize(rows);
    stats.rows = rows.len();
    Ok((rows, stats))
}

/// Sorts rows; where an FDE starts at another's end the real row wins over
/// the gap; consecutive rows with the same rule are merged.
pub fn normalize(mut rows: Vec<UnwindRow>) -> Vec<UnwindRow> {
    // Gaps sort first among rows of one address, so the last one wins below.
    rows.sort_by_key(|r| (r.pc, r.kind != ROW_GAP));
    let mut out: Vec<UnwindRow> = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(last) = out.last_mut() {
            if last.pc == row.pc {
                if row.kind != ROW_GAP || last.kind == ROW_GAP {
                    *last = row;
                }
                continue;
            }
        }
        out.push(row);
    }
    out.dedup_by(|next, prev| {
        (next.kind, next.cfa_off, next.rbp_off) == (prev.kind, prev.cfa_off, prev.rbp_off)
    });
    // Leading gaps say nothing (the search finds no row before the first).
    let first = out
        .iter()
        .position(|r| r.kind != ROW_GAP)
        .unwrap_or(out.len());
    out.drain(..first);
    out
}

/// A row whose rule the walker knows by its kind alone.
fn special(kind: u8) -> UnwindRow {
    UnwindRow {
        kind,
        ..Default::default()
    }
}

fn convert<T: gimli::ReaderOffset>(row: &gimli::UnwindTableRow<T>) -> UnwindRow {
    let unsupported = UnwindRow {
        kind: ROW_UNSUPPORTED,
        ..Default::default()
    };
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => {
            return UnwindRow {
                kind: ROW_OUTERMOST,
                ..Default::default()
            }
        }
        Some(RegisterRule::Offset(-8)) => {}
        _ => return unsupported,
    }
    let (kind, offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RSP => {
            (ROW_CFA_RSP, *offset)
        }
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RBP => {
            (ROW_CFA_RBP, *offset)
        }
        _ => return unsupported,
    };
    let Ok(cfa_off) = i16::try_from(offset) else {
        return unsupported;
    };
    let rbp_off = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue) | Some(RegisterRule::Undefined) => 0,
        Some(RegisterRule::Offset(o)) if o % 8 == 0 && o != 0 => match i8::try_from(o / 8) {
            Ok(v) => v,
            Err(_) => return unsupported,
        },
        _ => return unsupported,
    };
    UnwindRow {
        pc: 0,
        cfa_off,
        rbp_off,
        kind,
    }
}

/// The row that applies at `pc`, as the eBPF walker finds it (for tests).
pub fn lookup(rows: &[UnwindRow], pc: u32) -> Option<&UnwindRow> {
    let i = rows.partition_point(|r| r.pc <= pc);
    i.checked_sub(1).map(|i| &rows[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pc: u32, kind: u8, cfa_off: i16) -> UnwindRow {
        UnwindRow {
            pc,
            cfa_off,
            rbp_off: 0,
            kind,
        }
    }

    #[test]
    fn normalize_prefers_rows_over_gaps_and_merges_repeats() {
        let rows = normalize(vec![
            row(0x20, ROW_GAP, 0),
            row(0x10, ROW_CFA_RSP, 8),
            row(0x14, ROW_CFA_RSP, 16),
            row(0x18, ROW_CFA_RSP, 16),
            row(0x20, ROW_CFA_RSP, 8),
            row(0x30, ROW_GAP, 0),
            row(0x5, ROW_GAP, 0),
        ]);
        assert_eq!(
            rows,
            vec![
                row(0x10, ROW_CFA_RSP, 8),
                row(0x14, ROW_CFA_RSP, 16),
                row(0x20, ROW_CFA_RSP, 8),
                row(0x30, ROW_GAP, 0),
            ]
        );
        assert_eq!(lookup(&rows, 0x0f), None);
        assert_eq!(lookup(&rows, 0x1f).unwrap().cfa_off, 16);
        assert_eq!(lookup(&rows, 0x40).unwrap().kind, ROW_GAP);
    }

    fn libc() -> Vec<u8> {
        std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").expect("libc")
    }

    fn symbol(data: &[u8], name: &str) -> u64 {
        use object::ObjectSymbol;
        let file = object::File::parse(data).unwrap();
        file.dynamic_symbols()
            .chain(file.symbols())
            .find(|s| s.name() == Ok(name))
            .unwrap_or_else(|| panic!("no symbol {name}"))
            .address()
    }

    #[test]
    fn compiles_libc() {
        let data = libc();
        let (rows, stats) = compile(&data).unwrap();
        assert!(stats.fdes > 1000, "{stats:?}");
        assert!(rows.windows(2).all(|w| w[0].pc < w[1].pc));
        // Almost everything is expressible.
        assert!(stats.unsupported * 100 < stats.rows, "{stats:?}");
        // At a function's first instruction the CFA is rsp + 8 and rbp is the caller's.
        let malloc = symbol(&data, "malloc") as u32;
        let first = lookup(&rows, malloc).unwrap();
        assert_eq!(
            (first.kind, first.cfa_off, first.rbp_off),
            (ROW_CFA_RSP, 8, 0)
        );
        // The outermost frames end the walk cleanly.
        let start_rows = rows.iter().filter(|r| r.kind == ROW_OUTERMOST).count();
        assert!(
            start_rows >= 1,
            "clone/clone3 mark the return address undefined"
        );
        // Signal handlers return through __restore_rt (a local symbol,
        // stripped), whose FDE has the 'S' augmentation.
        let signal: Vec<_> = rows.iter().filter(|r| r.kind == ROW_SIGNAL).collect();
        assert_eq!(signal.len(), 1, "one signal trampoline");
    }

    #[test]
    fn plt_stubs_have_their_own_rows() {
        let data = std::fs::read("/usr/lib/x86_64-linux-gnu/libstdc++.so.6").expect("libstdc++");
        let (rows, _) = compile(&data).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let plt = file.section_by_name(".plt").expect("a .plt");
        // Past PLT0 (which has its own rule), an entry.
        let entry = lookup(&rows, plt.address() as u32 + 0x20).unwrap();
        assert_eq!(entry.kind, ROW_PLT);
    }

    #[test]
    fn tells_objects_built_with_frame_pointers() {
        // Debian's libc is built without them; the tracer's test fixtures
        // are built with -fno-omit-frame-pointer (tests/build.rs).
        let (_, libc) = compile(&libc()).unwrap();
        assert!(!libc.keeps_frame_pointers(), "{libc:?}");
        let fp = CfiStats {
            fdes: 103,
            function_fdes: 100,
            frame_pointer_fdes: 97,
            ..Default::default()
        };
        assert!(fp.keeps_frame_pointers());
    }

    #[test]
    fn rejects_what_is_not_elf() {
        assert!(compile(b"not an elf").is_err());
    }
}
