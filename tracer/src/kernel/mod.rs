//! The kernel side, and the only module that touches aya or bpf(2):
//! `programs` (load, attach), `maps` (typed handles, the only place that
//! names a map) and `sys` (the raw bpf(2) calls aya lacks); `features`
//! (what the running kernel has, and the paths taken because of it).
//! Everything else
//! here is bookkeeping on top of them: `probes` (which probe sits where, per
//! process), `targets` (the processes the programs count), `sessions`
//! (uprobe session links), `reclaim` (stack slots), `blocks` (records
//! removed from userspace), `unwind` (CFI tables), `tracefs`.
//!
//! `Kernel` owns all of it; the trace drives it through `KernelOps`, the
//! seam its tests replace with a fake.

pub mod blocks;
pub mod error;
pub mod features;
pub mod maps;
pub mod privileges;
pub mod probes;
pub mod programs;
pub mod reclaim;
pub mod sessions;
pub mod sys;
pub mod targets;
pub mod tracefs;
pub mod unwind;

use crate::target::{allocator::AllocatorObject, unwind::UnwindMode};

pub use self::error::{KernelError, Result};
use self::{
    features::Paths,
    maps::FreeSlots,
    probes::{Attached, ProbeSet},
    programs::{Global, Loaded},
    reclaim::{Reclaimer, UNKNOWN_SLOTS},
    sessions::{SessionMode, Sessions},
    targets::Targets,
};

/// Capacities of the large maps.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Live allocations tracked at once (`ALLOCS`).
    pub allocations: u32,
    /// Distinct stacks held at once (`STACKS`, and the slots of
    /// `STACK_STATS`); stacks that hold nothing are reclaimed.
    pub stacks: u32,
    /// How stacks are walked, and room for CFI rows (`UNWIND_ROWS`).
    pub unwind: UnwindMode,
    pub unwind_rows: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            allocations: 1 << 20,
            stacks: 65536,
            unwind: UnwindMode::Cfi,
            unwind_rows: tracer_common::unwind::DEFAULT_UNWIND_ROWS,
        }
    }
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

/// How the programs are loaded for a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    pub sizes: MapSizes,
    pub variant: Variant,
    /// Sample about one allocation every this many bytes (see `sampling`);
    /// None tracks every allocation.
    pub sample_rate: Option<u64>,
    /// When to probe allocation functions with a uprobe session.
    pub sessions: SessionMode,
}

/// What the trace asks of the kernel side while processes come and go.
/// `Kernel` does it with the programs and maps; the trace's tests use a
/// fake that records the calls.
pub trait KernelOps {
    /// Lets the programs count process `pid` (with an unknown-stack slot
    /// of its own while they last).
    fn add_target(&mut self, pid: u32) -> Result<()>;
    /// Stops counting process `pid`; its records stay for the report.
    fn remove_target(&mut self, pid: u32);
    /// Attaches the probes of `object` for process `pid`.
    fn attach(&mut self, object: &AllocatorObject, pid: u32) -> Result<()>;
    /// Whether `object` is already probed for `pid` at the same offsets.
    fn is_attached(&self, object: &AllocatorObject, pid: u32) -> bool;
    /// Detaches every probe of process `pid`.
    fn detach_process(&mut self, pid: u32);
    /// Drops the live blocks `pid` recorded before `before_ns` (its program
    /// was replaced); returns how many.
    fn drop_blocks(&mut self, pid: u32, before_ns: u64, sample_rate: Option<u64>) -> Result<usize>;
    /// Settles in-flight calls of threads of `pid` that no longer exist
    /// (`process_gone`: none is left, see `blocks::forget_dead_threads`).
    fn forget_dead_threads(
        &mut self,
        pid: u32,
        sample_rate: Option<u64>,
        live_tids: &mut dyn FnMut() -> Vec<u32>,
        process_gone: bool,
    ) -> Result<usize>;
    /// Periodic upkeep (probe scopes, trampolines, stack slots).
    fn housekeeping(&mut self);
}

/// The loaded programs and maps, the probes attached, the processes counted.
/// Dropping it detaches everything (see `probes::ProbeSet`'s `Drop`).
pub struct Kernel {
    loaded: Loaded,
    variant: Variant,
    probes: ProbeSet,
    targets: Targets,
    /// The session program and its links, while allocation functions are
    /// to be probed with it.
    sessions: Option<Sessions>,
    reclaimer: Reclaimer,
    /// What this kernel lets the tracer do, and how.
    paths: Paths,
}

impl Kernel {
    /// Creates the maps, fills the tables the programs start from, and
    /// loads the programs.
    pub fn load(options: LoadOptions) -> Result<Self> {
        let sizes = options.sizes;
        let rate = options.sample_rate.unwrap_or(0);
        let paths = Paths::choose(features::detected());
        // The fork record's layout is read from tracefs: mount it first (a
        // fresh machine boots without it), or forks would be misread.
        if let Err(e) = tracefs::ensure_tracefs() {
            log::debug!("{e:#}");
        }
        let fork_offset = tracefs::fork_child_pid_offset().unwrap_or(0);
        let globals = [
            ("FORK_CHILD_PID_OFFSET", Global::U32(fork_offset)),
            (
                "NO_STACKS",
                Global::U8((options.variant == Variant::NoStacks).into()),
            ),
            ("SAMPLE_RATE", Global::U64(rate)),
            ("UNWIND_MODE", Global::U32(sizes.unwind.global())),
            ("TASK_PT_REGS", Global::U8(paths.mapping_callers.into())),
            (
                "CALL_SLOTS_ON",
                Global::U8(maps::call_slot_mask().is_some().into()),
            ),
            (
                "CALL_SLOT_MASK",
                Global::U32(maps::call_slot_mask().unwrap_or(0)),
            ),
        ];
        let map_sizes = [
            (maps::ALLOCS, sizes.allocations),
            (maps::STACKS, sizes.stacks),
            // Slot 0 is the shared unknown stack's; 1..=stacks are handed
            // out; then one unknown-stack slot per traced process.
            (maps::STACK_STATS, sizes.stacks + 1 + UNKNOWN_SLOTS),
            (maps::FREE_SLOTS, sizes.stacks),
            (maps::TARGETS, UNKNOWN_SLOTS),
            // One mapping table per target (not preallocated).
            (maps::UNWIND_PROCS, UNKNOWN_SLOTS),
            // Frame-pointer mode leaves the CFI tables (allocated up front) empty.
            (
                maps::UNWIND_ROWS,
                match sizes.unwind {
                    UnwindMode::Fp => 1,
                    UnwindMode::Cfi => sizes.unwind_rows.max(1),
                },
            ),
        ];
        let mut loaded = Loaded::open(&map_sizes, &globals, paths.batch_reads)?;
        let mut free = FreeSlots::open(&mut loaded)?;
        for slot in 1..=sizes.stacks {
            free.push(slot)?;
        }
        if rate > 0 {
            maps::fill_array(
                &mut loaded,
                maps::SAMPLE_DRAWS,
                &crate::sampling::draw_table(rate),
            )?;
            maps::fill_array(
                &mut loaded,
                maps::SAMPLE_WEIGHTS,
                &crate::sampling::weight_table(rate),
            )?;
        }
        // Before the logger takes its map out of the object. A kernel
        // without sessions is not asked to load one.
        let sessions = options.sessions.wanted(rate > 0).then(|| {
            if paths.sessions {
                Sessions::load(&loaded, options.variant)
            } else {
                Err(anyhow::anyhow!(
                    "the kernel has no uprobe sessions (Linux 6.13+)"
                ))
            }
        });
        loaded.start_logger();
        loaded.load_uprobes(&probes::programs(options.variant))?;
        // MOVED_ENTRY reads its attach cookie: the verifier refuses it
        // before 5.15, where MOVED_KEYED takes its place.
        loaded.load_uprobes(&[if paths.cookies {
            probes::MOVED_ENTRY
        } else {
            probes::MOVED_KEYED
        }])?;
        let mut kernel = Kernel {
            loaded,
            variant: options.variant,
            probes: ProbeSet::default(),
            targets: Targets::new(sizes.stacks + 1),
            sessions: None,
            reclaimer: Reclaimer::new(paths.reclaim),
            paths,
        };
        match sessions {
            Some(Ok(sessions)) => kernel.sessions = Some(sessions),
            Some(Err(e)) => kernel.session_unavailable(&e),
            None => {}
        }
        Ok(kernel)
    }

    /// The loaded object, to read through `maps`' handles (`collect`).
    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    /// Writing is the kernel side's own business.
    pub(super) fn loaded_mut(&mut self) -> &mut Loaded {
        &mut self.loaded
    }

    /// Every probe attached so far, for `-v`.
    pub fn attached(&self) -> &[Attached] {
        &self.probes.attached
    }

    /// How allocation returns are probed, for `-v`.
    pub fn returns(&self) -> &str {
        &self.probes.returns
    }

    /// The paths taken on this kernel, for `-v`.
    pub fn paths(&self) -> Paths {
        self.paths
    }
}

impl KernelOps for Kernel {
    fn add_target(&mut self, pid: u32) -> Result<()> {
        self.targets.add(&mut self.loaded, pid)
    }

    fn remove_target(&mut self, pid: u32) {
        self.targets.remove(&mut self.loaded, pid)
    }

    fn attach(&mut self, object: &AllocatorObject, pid: u32) -> Result<()> {
        Kernel::attach(self, object, pid)
    }

    fn is_attached(&self, object: &AllocatorObject, pid: u32) -> bool {
        self.probes.is_attached(object, pid)
    }

    fn detach_process(&mut self, pid: u32) {
        Kernel::detach_process(self, pid)
    }

    fn drop_blocks(&mut self, pid: u32, before_ns: u64, sample_rate: Option<u64>) -> Result<usize> {
        blocks::drop_process(&mut self.loaded, pid, before_ns, sample_rate)
    }

    fn forget_dead_threads(
        &mut self,
        pid: u32,
        sample_rate: Option<u64>,
        live_tids: &mut dyn FnMut() -> Vec<u32>,
        process_gone: bool,
    ) -> Result<usize> {
        blocks::forget_dead_threads(&mut self.loaded, pid, sample_rate, live_tids, process_gone)
    }

    /// Re-scopes the probes when the thread they are bound to exited, tells
    /// the programs where the targets' uretprobe trampolines are and
    /// reclaims the stack slots of stacks that hold nothing.
    fn housekeeping(&mut self) {
        if let Err(e) = self.follow_scope_threads() {
            log::debug!("probe housekeeping: {e:#}");
        }
        if let Some(sessions) = &mut self.sessions {
            match sessions.clean_forked_children() {
                Ok(true) => log::debug!("uprobe sessions made anew: a target forked"),
                Ok(false) => {}
                Err(e) => log::debug!("uprobe sessions: {e:#}"),
            }
        }
        if let Err(e) = self.targets.learn_trampolines(&mut self.loaded) {
            log::debug!("probe housekeeping: {e:#}");
        }
        if let Err(e) = self.reclaimer.run(&mut self.loaded) {
            log::debug!("probe housekeeping: {e:#}");
        }
    }
}
