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
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            allocations: 1 << 20,
            stacks: 65536,
        }
    }
}

/// Writes `values` into the array map `name` from index 0.
fn fill_array(ebpf: &mut Ebpf, name: &str, values: &[u64]) -> Result<()> {
    let mut array: aya::maps::Array<_, u64> =
        aya::maps::Array::try_from(ebpf.map_mut(name).with_context(|| format!("{name} map"))?)?;
    for (i, value) in values.iter().enumerate() {
        array
            .set(i as u32, value, 0)
            .with_context(|| format!("filling {name}"))?;
    }
    Ok(())
}

/// A probe the tracer attached, for `-v` and reports.
#[derive(Clone, Debug)]
pub struct Attached {
    pub object: String,
    /// Where the probe is, in the file.
    pub file_offset: u64,
    /// Bytes past the function's start (0: at its entry).
    pub skip: u64,
    pub functions: Vec<&'static str>,
    pub program: &'static str,
    pub is_return: bool,
}

/// What the attached programs do. Anything but `Full` exists to measure the
/// tracer (`cargo xtask bench`); the flags that select them are hidden.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    /// Track every block with its stack.
    #[default]
    Full,
    /// Track every block, but skip the user stack walk (all blocks count
    /// under the unknown stack): what stack capture costs.
    NoStacks,
    /// Programs that return at once, at the very addresses `Full` uses: the
    /// floor any uprobe tool pays there.
    Noop,
}

/// The no-op programs of `Variant::Noop`.
const NOOP_ENTRY: &str = "noop_enter";
const NOOP_RETURN: &str = "noop_return";

pub struct Probes {
    pub ebpf: Ebpf,
    pub variant: Variant,
    pub attached: Vec<Attached>,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Probes {
    pub fn load(sizes: MapSizes) -> Result<Self> {
        Self::load_variant(sizes, Variant::Full, None)
    }

    /// `sample_rate`: sample about one allocation every this many bytes
    /// (see `sampling`); None tracks every allocation.
    pub fn load_variant(sizes: MapSizes, variant: Variant, sample_rate: Option<u64>) -> Result<Self> {
        let no_stacks: u8 = (variant == Variant::NoStacks).into();
        let rate: u64 = sample_rate.unwrap_or(0);
        let mut ebpf = EbpfLoader::new()
            .override_global("NO_STACKS", &no_stacks, true)
            .override_global("SAMPLE_RATE", &rate, true)
            .map_max_entries("ALLOCS", sizes.allocations)
            .map_max_entries("STACKS", sizes.stacks)
            .map_max_entries("STACK_STATS", sizes.stacks)
            .load(EBPF_OBJECT)
            .map_err(|e| crate::privileges::explain_load_error(anyhow!(e)))
            .context("loading the eBPF programs")?;
        if rate > 0 {
            fill_array(&mut ebpf, "SAMPLE_DRAWS", &crate::sampling::draw_table(rate))?;
            fill_array(&mut ebpf, "SAMPLE_WEIGHTS", &crate::sampling::weight_table(rate))?;
        }
        // The programs only log rare conditions (a full map); forward them.
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();
        let mut programs: Vec<&str> = crate::allocator::FUNCTIONS
            .iter()
            .map(|(_, entry)| entry.program())
            .collect();
        programs.push(RETURN_PROGRAM);
        if variant == Variant::Noop {
            programs = vec![NOOP_ENTRY, NOOP_RETURN];
        }
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
            variant,
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
        let noop = self.variant == Variant::Noop;
        for point in frees.into_iter().chain(allocs) {
            if point.entry.needs_return() {
                let program = if noop { NOOP_RETURN } else { RETURN_PROGRAM };
                self.attach_one(object, point, program, true, scope)?;
            }
            let program = if noop {
                NOOP_ENTRY
            } else {
                point.entry.program()
            };
            self.attach_one(object, point, program, false, scope)?;
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
        let skip = if is_return { 0 } else { point.entry_skip };
        let file_offset = point.file_offset + skip;
        prog.attach(
            UProbeAttachLocation::AbsoluteOffset(file_offset),
            &object.host_path,
            scope,
        )
        .map_err(|e| crate::privileges::explain_load_error(anyhow!(e)))
        .with_context(|| {
            format!(
                "attaching {program} to {} at {:#x} ({})",
                object.path,
                file_offset,
                point.functions.join("/")
            )
        })?;
        self.attached.push(Attached {
            object: object.path.clone(),
            file_offset,
            skip,
            functions: point.functions.clone(),
            program,
            is_return,
        });
        Ok(())
    }
}
