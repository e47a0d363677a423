//! Uprobe sessions (kernel 6.13+), userspace half: loading a session program
//! and attaching it with a `uprobe_multi` link. `tracer-ebpf/src/session.rs`
//! says what the program does and why it is cheaper under `--sample-rate`.
//!
//! aya 0.14 can do neither: it loads `uprobe` programs without an expected
//! attach type and attaches them through perf events only. So the program
//! is taken from the same object file with `aya-obj`, its map references
//! pointed at the maps aya already created (so both kinds of program share
//! every map, and the globals aya set), and loaded and attached with the
//! bpf(2) system call directly.

use std::{
    collections::HashSet,
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{maps::Map, Ebpf};

/// When the allocation functions are probed with a session program
/// (`--uprobe-sessions`, hidden: for measuring).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SessionMode {
    /// With `--sample-rate`, where they save the return trap of every
    /// unsampled call; uprobe+uretprobe otherwise.
    #[default]
    Auto,
    /// Whenever the kernel has them (exact mode too).
    Always,
    /// Never: uprobe+uretprobe.
    Never,
}

impl SessionMode {
    pub fn wanted(self, sampling: bool) -> bool {
        match self {
            SessionMode::Auto => sampling,
            SessionMode::Always => true,
            SessionMode::Never => false,
        }
    }
}

/// The attach cookie of an allocation function: its calling convention.
pub fn convention(entry: crate::allocator::Entry) -> Option<u64> {
    use crate::allocator::Entry;
    use tracer_common::convention;
    Some(match entry {
        Entry::Malloc => convention::MALLOC,
        Entry::Calloc => convention::CALLOC,
        Entry::Realloc => convention::REALLOC,
        Entry::Reallocarray => convention::REALLOCARRAY,
        Entry::Memalign => convention::MEMALIGN,
        Entry::PosixMemalign => convention::POSIX_MEMALIGN,
        Entry::Valloc => convention::VALLOC,
        Entry::Pvalloc => convention::PVALLOC,
        Entry::Free => return None,
    })
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `enum bpf_attach_type` (include/uapi/linux/bpf.h, 6.13+).
pub const BPF_TRACE_UPROBE_SESSION: u32 = 57;

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_LINK_CREATE with its `uprobe_multi` part.
#[repr(C)]
#[derive(Default)]
struct UprobeMultiLinkAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: u32,
}

fn bpf(cmd: libc::c_long, attr: *const u8, size: usize) -> std::io::Result<OwnedFd> {
    // Safety: `attr` points at `size` initialized bytes of a bpf_attr.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Safety: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The descriptor of a map aya created.
fn map_fd(map: &Map) -> RawFd {
    let data = match map {
        Map::Array(d)
        | Map::ArrayOfMaps(d)
        | Map::BloomFilter(d)
        | Map::CgroupArray(d)
        | Map::CgroupStorage(d)
        | Map::CgrpStorage(d)
        | Map::CpuMap(d)
        | Map::DevMap(d)
        | Map::DevMapHash(d)
        | Map::HashMap(d)
        | Map::HashOfMaps(d)
        | Map::InodeStorage(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuCgroupStorage(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Queue(d)
        | Map::ReusePortSockArray(d)
        | Map::RingBuf(d)
        | Map::SockHash(d)
        | Map::SockMap(d)
        | Map::SkStorage(d)
        | Map::Stack(d)
        | Map::StackTraceMap(d)
        | Map::Unsupported(d)
        | Map::XskMap(d) => d,
    };
    data.fd().as_fd().as_raw_fd()
}

/// Loads program `name` of the eBPF object `object` (the bytes `ebpf` was
/// loaded from) as a uprobe session program, using `ebpf`'s maps.
pub fn load(ebpf: &Ebpf, object: &[u8], name: &str) -> Result<OwnedFd> {
    let mut obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    let defined = obj.maps.clone();
    let maps: Vec<(&str, RawFd, &aya_obj::Map)> = ebpf
        .maps()
        .filter_map(|(map_name, map)| {
            defined
                .get(map_name)
                .map(|def| (map_name, map_fd(map), def))
        })
        .collect();
    // A map missing here would be resolved to another map of its ELF
    // section by aya-obj: refuse instead. (aya-log takes its map out of
    // `ebpf`, so load before its logger starts.)
    if let Some(missing) = defined.keys().find(|name| !maps.iter().any(|(n, _, _)| n == name)) {
        bail!("map {missing} is not available to the session program");
    }
    obj.relocate_maps(maps.into_iter(), &text_sections)
        .map_err(|e| anyhow!("{e}"))
        .context("relocating map references")?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| anyhow!("{e}"))
        .context("relocating calls")?;
    let program = obj
        .programs
        .get(name)
        .ok_or_else(|| anyhow!("eBPF object has no program {name}"))?;
    let function = obj
        .functions
        .get(&program.function_key())
        .ok_or_else(|| anyhow!("eBPF object has no code for {name}"))?;
    let instructions = &function.instructions;
    let license = CString::new("GPL")?;
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: instructions.len() as u32,
        insns: instructions.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_TRACE_UPROBE_SESSION,
        ..Default::default()
    };
    for (slot, byte) in attr.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte;
    }
    let size = std::mem::size_of::<ProgLoadAttr>();
    match bpf(BPF_PROG_LOAD, (&raw const attr).cast(), size) {
        Ok(fd) => Ok(fd),
        Err(error) => {
            // Again with the verifier's log, for the message.
            let mut log = vec![0u8; 1 << 20];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = bpf(BPF_PROG_LOAD, (&raw const attr).cast(), size);
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "loading {name} as a uprobe session program: {error}{}",
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(" (verifier: {})", tail.join(" | "))
                }
            )
        }
    }
}

/// Attaches session program `program` at `offsets` of the file `path` (its
/// path in the tracer's mount namespace), for process `pid` only, each
/// offset with its cookie. Dropping the descriptor detaches.
pub fn attach(
    program: &OwnedFd,
    path: &Path,
    offsets: &[u64],
    cookies: &[u64],
    pid: u32,
) -> std::io::Result<OwnedFd> {
    assert_eq!(offsets.len(), cookies.len());
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attr = UprobeMultiLinkAttr {
        prog_fd: program.as_raw_fd() as u32,
        attach_type: BPF_TRACE_UPROBE_SESSION,
        path: path.as_ptr() as u64,
        offsets: offsets.as_ptr() as u64,
        cookies: cookies.as_ptr() as u64,
        cnt: offsets.len() as u32,
        pid,
        ..Default::default()
    };
    bpf(
        BPF_LINK_CREATE,
        (&raw const attr).cast(),
        std::mem::size_of::<UprobeMultiLinkAttr>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 72);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::offset_of!(UprobeMultiLinkAttr, path), 16);
        assert_eq!(std::mem::offset_of!(UprobeMultiLinkAttr, cnt), 48);
        assert_eq!(std::mem::offset_of!(UprobeMultiLinkAttr, pid), 56);
    }
}
