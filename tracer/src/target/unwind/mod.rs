//! Unwind tables for CFI unwinding (the default): for every executable object, `cfi`
//! compiles its `.eh_frame` into compact rows, and `bias` places an object's
//! addresses in a process. `kernel::unwind` hands them to the eBPF stack
//! walker.

pub mod cfi;

use object::{Object, ObjectSegment};

use crate::target::memory_map::Mapping;

/// How user stacks are walked.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnwindMode {
    /// Frame pointers: cheap, but code built without frame pointers hides
    /// its caller.
    Fp,
    /// DWARF call frame information (.eh_frame) of every mapped object,
    /// walked in the kernel; frame pointers where an object has none.
    #[default]
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

/// The files a command will map before it runs: the program, the
/// libraries the dynamic loader lists for it (`ld.so --list`, as
/// `detect::for_command` does) and the loader. Empty if they cannot be
/// listed (the tables are then sized by default and filled at exec).
pub fn command_objects(exe: &std::path::Path, env: &[(String, String)]) -> Vec<std::path::PathBuf> {
    let mut paths = vec![exe.to_path_buf()];
    let Ok(info) = crate::target::elf::ElfInfo::read(exe) else {
        return paths;
    };
    if let Some(interp) = &info.interpreter {
        let listed = std::process::Command::new(interp)
            .arg("--list")
            .arg(exe)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output();
        if let Some(output) = listed.ok().filter(|o| o.status.success()) {
            let text = String::from_utf8_lossy(&output.stdout);
            paths.extend(
                crate::target::allocator::parse_ld_list(&text, interp)
                    .into_iter()
                    .map(Into::into),
            );
        }
        paths.push(interp.into());
    }
    paths
}

/// PT_LOAD segments of an object: (virtual address, file offset, size in file).
pub type Segments = Vec<(u64, u64, u64)>;

/// Executable PT_LOAD segments.
pub fn segments(data: &[u8]) -> Option<Segments> {
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
pub fn bias(segments: &[(u64, u64, u64)], m: &Mapping) -> Option<u64> {
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
