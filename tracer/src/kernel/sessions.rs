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

use crate::target::allocator::{AllocatorObject, ProbePoint};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{maps::Map, Ebpf};

/// When the allocation functions are probed with a session program
/// (`--uprobe-sessions`, hidden: for measuring).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
pub fn convention(entry: crate::target::allocator::Entry) -> Option<u64> {
    use crate::target::allocator::Entry;
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

/// A loaded session program and its links, one per probed object.
///
/// Two kernel behaviours of uprobe_multi links decide the upkeep (both
/// seen on 6.18):
/// - the link's process filter holds the thread group leader, and matches
///   a memory map by the leader's: once the main thread has exited
///   (`pthread_exit`), any other tool or tracer that detaches a probe from
///   the same function makes the kernel drop our breakpoints too, and a new
///   link would get none. The probes then go back to uprobe+uretprobe bound
///   to a live thread (`Probes::follow_scope_thread`).
/// - a forked child inherits the breakpoints, and the kernel does not run
///   the program for it but still traps its entries and returns (perf-based
///   uprobes remove themselves from a child at its first hit): measured,
///   an untraced child's malloc+free went from 6 ns to ~1.1 µs. So when the
///   target has a new child that did not exec, the links are made anew and
///   the old ones closed, which takes the breakpoints out of every memory
///   map the new links do not match.
pub struct Sessions {
    pub program_name: &'static str,
    program: OwnedFd,
    links: Vec<Link>,
    /// Children of the target already cleaned (or exec'd).
    children: HashSet<u32>,
}

struct Link {
    object: AllocatorObject,
    pid: u32,
    /// Held: closing it detaches.
    _fd: OwnedFd,
}

impl Sessions {
    pub fn load(ebpf: &aya::Ebpf, object: &[u8], name: &'static str) -> Result<Self> {
        Ok(Sessions {
            program_name: name,
            program: load(ebpf, object, name)?,
            links: Vec::new(),
            children: HashSet::new(),
        })
    }

    /// Attaches the program to every allocation function of `object` with
    /// one link for process `pid`; returns the points it covers.
    pub fn attach(&mut self, object: &AllocatorObject, pid: u32) -> Result<Vec<ProbePoint>> {
        let (fd, points) = self.link(object, pid)?;
        if let Some(fd) = fd {
            self.links.push(Link {
                object: object.clone(),
                pid,
                _fd: fd,
            });
        }
        Ok(points)
    }

    fn link(
        &self,
        object: &AllocatorObject,
        pid: u32,
    ) -> Result<(Option<OwnedFd>, Vec<ProbePoint>)> {
        let points: Vec<(&ProbePoint, u64)> = object
            .points
            .iter()
            .filter_map(|p| Some((p, convention(p.entry)?)))
            .collect();
        if points.is_empty() {
            return Ok((None, Vec::new()));
        }
        let offsets: Vec<u64> = points.iter().map(|(p, _)| p.file_offset).collect();
        let cookies: Vec<u64> = points.iter().map(|(_, c)| *c).collect();
        let fd = attach(&self.program, &object.host_path, &offsets, &cookies, pid).with_context(
            || {
                format!(
                    "attaching uprobe session {} to {}",
                    self.program_name, object.path
                )
            },
        )?;
        Ok((
            Some(fd),
            points.into_iter().map(|(p, _)| p.clone()).collect(),
        ))
    }

    /// Detaches the sessions of process `pid` (it is gone, or its functions
    /// are probed another way now); returns whether it had any. The close
    /// waits for the kernel: done on a thread.
    pub fn detach_process(&mut self, pid: u32) -> bool {
        let (gone, kept): (Vec<Link>, Vec<Link>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|l| l.pid == pid);
        self.links = kept;
        let had = !gone.is_empty();
        close_later(gone);
        had
    }

    /// Makes the links anew when a target has a child that forked without
    /// exec'ing since the last call (see `Sessions`). Returns whether it did.
    pub fn clean_forked_children(&mut self) -> Result<bool> {
        let mut pids: Vec<u32> = self.links.iter().map(|l| l.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        let mut now = HashSet::new();
        let mut fresh = false;
        for pid in pids {
            for child in children(pid) {
                now.insert(child);
                if !self.children.contains(&child) && same_program(pid, child) {
                    fresh = true;
                }
            }
        }
        self.children = now;
        if !fresh {
            return Ok(false);
        }
        let mut links = Vec::with_capacity(self.links.len());
        for old in &self.links {
            let (fd, _) = self.link(&old.object, old.pid)?;
            if let Some(fd) = fd {
                links.push(Link {
                    object: old.object.clone(),
                    pid: old.pid,
                    _fd: fd,
                });
            }
        }
        // New first, then the old go: the target's breakpoints stay (a call
        // probed by both is recognised as one, see alloc.rs `is_inner_call`).
        close_later(std::mem::replace(&mut self.links, links));
        Ok(true)
    }
}

/// Closing a uprobe link waits for RCU grace periods; not on the caller's time.
fn close_later(links: Vec<Link>) {
    if !links.is_empty() {
        std::thread::spawn(move || drop(links));
    }
}

/// The children of process `pid` (of all its threads).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// A child still runs its parent's program (forked, not exec'd): only then
/// can it hold the parent's breakpoints.
fn same_program(parent: u32, child: u32) -> bool {
    let exe = |pid: u32| std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    match (exe(parent), exe(child)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
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
    if let Some(missing) = defined
        .keys()
        .find(|name| !maps.iter().any(|(n, _, _)| n == name))
    {
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
