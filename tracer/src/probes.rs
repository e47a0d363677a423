//! Loads the eBPF object, sizes its maps, attaches the allocator probes to
//! one process and owns the links (dropping `Probes` detaches everything).

use std::num::NonZeroU32;

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::HashMap as BpfHashMap,
    programs::{
        uprobe::{UProbeAttachLocation, UProbeScope},
        UProbe,
    },
    Ebpf, EbpfLoader,
};

use crate::allocator::{AllocatorObject, Entry, ProbePoint, RETURN_PROGRAM};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));

/// Capacities of the large maps.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Live allocations tracked at once (`ALLOCS`).
    pub allocations: u32,
    /// Distinct stacks (`STACKS` and `STACK_STATS`).
    pub stacks: u32,
    /// How stacks are walked, and room for CFI rows (`UNWIND_ROWS`).
    pub unwind: crate::unwind::UnwindMode,
    pub unwind_rows: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            allocations: 1 << 20,
            stacks: 65536,
            unwind: crate::unwind::UnwindMode::Fp,
            unwind_rows: tracer_common::unwind::DEFAULT_UNWIND_ROWS,
        }
    }
}

/// A probe the tracer attached, for `-v` and reports.
#[derive(Clone, Debug)]
pub struct Attached {
    pub object: String,
    pub file_offset: u64,
    pub functions: Vec<&'static str>,
    pub program: &'static str,
    pub is_return: bool,
}

pub struct Probes {
    pub ebpf: Ebpf,
    pub attached: Vec<Attached>,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Probes {
    pub fn load(sizes: MapSizes) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("ALLOCS", sizes.allocations)
            .map_max_entries("STACKS", sizes.stacks)
            .map_max_entries("STACK_STATS", sizes.stacks)
            // Frame-pointer mode leaves the CFI tables (allocated up front) empty.
            .map_max_entries(
                "UNWIND_ROWS",
                match sizes.unwind {
                    crate::unwind::UnwindMode::Fp => 1,
                    crate::unwind::UnwindMode::Cfi => sizes.unwind_rows.max(1),
                },
            )
            .override_global("UNWIND_MODE", &sizes.unwind.global(), true)
            .load(EBPF_OBJECT)
            .map_err(|e| crate::privileges::explain_load_error(anyhow!(e)))
            .context("loading the eBPF programs")?;
        // The programs only log rare conditions (a full map); forward them.
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();
        let mut programs: Vec<&str> = crate::allocator::FUNCTIONS
            .iter()
            .map(|(_, entry)| entry.program())
            .collect();
        programs.push(RETURN_PROGRAM);
        programs.sort_unstable();
        programs.dedup();
        for name in programs {
            let program: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("eBPF object has no program {name}"))?
                .try_into()?;
            program
                .load()
                .map_err(|e| crate::privileges::explain_load_error(anyhow!(e)))
                .with_context(|| format!("loading eBPF program {name}"))?;
        }
        Ok(Probes {
            ebpf,
            attached: Vec::new(),
            _logger: logger,
        })
    }

    /// Lets the programs count events of this process.
    pub fn add_target(&mut self, pid: u32) -> Result<()> {
        let mut targets: BpfHashMap<_, u32, u8> =
            BpfHashMap::try_from(self.ebpf.map_mut("TARGETS").context("TARGETS map")?)?;
        targets.insert(pid, 1, 0).context("adding target pid")?;
        Ok(())
    }

    /// Attaches the allocator probes of `object` for process `pid`.
    ///
    /// Order matters while the process runs: `free` first, so that every
    /// block recorded afterwards has its free seen; for each allocation
    /// function the return probe before the entry probe, so that no entry is
    /// recorded without its return (a return without an entry is ignored).
    pub fn attach(&mut self, object: &AllocatorObject, pid: u32) -> Result<()> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).context("pid 0")?);
        let (frees, allocs): (Vec<&ProbePoint>, Vec<&ProbePoint>) =
            object.points.iter().partition(|p| p.entry == Entry::Free);
        for point in frees.into_iter().chain(allocs) {
            if point.entry.needs_return() {
                self.attach_one(object, point, RETURN_PROGRAM, true, scope)?;
            }
            self.attach_one(object, point, point.entry.program(), false, scope)?;
        }
        Ok(())
    }

    fn attach_one(
        &mut self,
        object: &AllocatorObject,
        point: &ProbePoint,
        program: &'static str,
        is_return: bool,
        scope: UProbeScope,
    ) -> Result<()> {
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("eBPF object has no program {program}"))?
            .try_into()?;
        prog.attach(
            UProbeAttachLocation::AbsoluteOffset(point.file_offset),
            &object.host_path,
            scope,
        )
        .map_err(|e| crate::privileges::explain_load_error(anyhow!(e)))
        .with_context(|| {
            format!(
                "attaching {program} to {} at {:#x} ({})",
                object.path,
                point.file_offset,
                point.functions.join("/")
            )
        })?;
        self.attached.push(Attached {
            object: object.path.clone(),
            file_offset: point.file_offset,
            functions: point.functions.clone(),
            program,
            is_return,
        });
        Ok(())
    }
}
