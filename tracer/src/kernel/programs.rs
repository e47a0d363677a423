//! The eBPF object through aya: creating its maps with the sizes and
//! globals of this run, loading its programs, attaching them (uprobes to a
//! file offset for one process, tracepoints), and handing out its maps to
//! `maps` by name. One of the three files that use aya (with `maps` and
//! `sys`).

use std::{
    num::NonZeroU32,
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    path::Path,
};

use aya::{
    maps::Map,
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
        TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};

use super::error::{KernelError, Operation, Result};

/// The programs, built by tracer/build.rs.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));

/// A value for one of the programs' globals (`static` in tracer-ebpf).
pub enum Global {
    U8(u8),
    U32(u32),
    U64(u64),
}

/// The loaded object: its maps exist, its programs are loaded on demand.
pub struct Loaded {
    ebpf: Ebpf,
    /// Hash maps are read in batches (the kernel has them, `features`).
    pub(super) batch_reads: bool,
    /// Blocks userspace retired whose slot held less (see `StatsTable::retire`).
    pub(super) unmatched_frees: u64,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// A uprobe attached for one process; dropping it detaches it.
pub struct UprobeLink(#[allow(dead_code)] UProbeLink);

impl Loaded {
    /// Creates the maps (`map_sizes`: name -> max entries) and sets the
    /// globals; loads no program yet. `batch_reads`: read hash maps in
    /// batches.
    pub fn open(
        map_sizes: &[(&str, u32)],
        globals: &[(&str, Global)],
        batch_reads: bool,
    ) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for (name, value) in globals {
            match value {
                Global::U8(v) => loader.override_global(name, v, true),
                Global::U32(v) => loader.override_global(name, v, true),
                Global::U64(v) => loader.override_global(name, v, true),
            };
        }
        for (name, size) in map_sizes {
            loader.map_max_entries(name, *size);
        }
        let ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| KernelError::load("the eBPF programs", e))?;
        Ok(Loaded {
            ebpf,
            batch_reads,
            unmatched_frees: 0,
            _logger: None,
        })
    }

    /// Blocks userspace retired from a slot that held less (not applied).
    pub fn unmatched_frees(&self) -> u64 {
        self.unmatched_frees
    }

    /// Forwards what the programs log (only rare conditions, e.g. a full
    /// map). The logger takes its map out of the object: call it after
    /// anything that needs every map (`map_fds`).
    pub fn start_logger(&mut self) {
        self._logger = aya_log::EbpfLogger::init(&mut self.ebpf).ok();
    }

    /// Name and descriptor of every map still in the object.
    pub fn map_fds(&self) -> Vec<(String, RawFd)> {
        self.ebpf
            .maps()
            .map(|(name, map)| (name.to_string(), map_fd(map)))
            .collect()
    }

    /// Loads the uprobe programs `names` (each once).
    pub fn load_uprobes(&mut self, names: &[&str]) -> Result<()> {
        for name in names {
            self.uprobe(name)?
                .load()
                .map_err(|e| KernelError::load(format!("eBPF program {name}"), e))?;
        }
        Ok(())
    }

    fn uprobe(&mut self, name: &str) -> Result<&mut UProbe> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| KernelError::missing(Operation::Load, &format!("eBPF program {name}")))?
            .try_into()
            .map_err(|e| KernelError::load(format!("eBPF program {name}"), e))
    }

    /// Attaches the loaded uprobe program `program` at `file_offset` of
    /// `file` (with `cookie` for `bpf_get_attach_cookie`, kernels 5.15+),
    /// firing only in the process of task `scope_task` (the kernel
    /// filters by that task's memory map). `describe` names the place for
    /// the error.
    pub fn attach_uprobe(
        &mut self,
        program: &str,
        file: &Path,
        file_offset: u64,
        cookie: Option<u64>,
        scope_task: u32,
        describe: impl Fn() -> String,
    ) -> Result<UprobeLink> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(scope_task).ok_or_else(|| {
            KernelError::attach(describe(), std::io::Error::from_raw_os_error(libc::ESRCH))
        })?);
        let prog = self.uprobe(program)?;
        let id = prog
            .attach(
                UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(file_offset),
                    cookie,
                },
                file,
                scope,
            )
            .map_err(|e| KernelError::attach(describe(), e))?;
        let link = prog
            .take_link(id)
            .map_err(|e| KernelError::attach(describe(), e))?;
        Ok(UprobeLink(link))
    }

    /// Loads each program of `programs` (program name -> tracepoint) and
    /// attaches it to `category/tracepoint` (tracefs must be mounted).
    pub fn attach_tracepoints(&mut self, category: &str, programs: &[(&str, &str)]) -> Result<()> {
        for (program, tracepoint) in programs {
            let what = || format!("eBPF program {program}");
            let prog: &mut TracePoint = self
                .ebpf
                .program_mut(program)
                .ok_or_else(|| KernelError::missing(Operation::Load, &what()))?
                .try_into()
                .map_err(|e| KernelError::load(what(), e))?;
            prog.load().map_err(|e| KernelError::load(what(), e))?;
            prog.attach(category, tracepoint).map_err(|e| {
                KernelError::attach(format!("{program} to {category}/{tracepoint}"), e)
            })?;
        }
        Ok(())
    }

    pub(super) fn map(&self, name: &str) -> Result<&Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| KernelError::missing(Operation::Map, name))
    }

    pub(super) fn map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| KernelError::missing(Operation::Map, name))
    }

    /// Takes a map out of the object, for a handle that lives on its own
    /// (a ring buffer polled elsewhere, a table mapped into memory).
    pub(super) fn take_map(&mut self, name: &str) -> Result<Map> {
        self.ebpf
            .take_map(name)
            .ok_or_else(|| KernelError::missing(Operation::Map, name))
    }
}

/// The descriptor of a map aya created.
pub(super) fn map_fd(map: &Map) -> RawFd {
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
