//! Loads the eBPF object, sizes its maps, attaches the allocator probes to
//! one process and owns the links (dropping `Probes` detaches everything).

use std::num::NonZeroU32;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::HashMap as BpfHashMap,
    programs::{
        uprobe::{UProbeAttachLocation, UProbeLink, UProbeLinkId, UProbeScope},
        UProbe,
    },
    Ebpf, EbpfLoader,
};

use tracer_common::TargetInfo;

use crate::{
    kernel::slots::UNKNOWN_SLOTS,
    target::allocator::{AllocatorObject, Entry, ProbePoint, RETURN_PROGRAM},
};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));

/// Capacities of the large maps.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Live allocations tracked at once (`ALLOCS`).
    pub allocations: u32,
    /// Distinct stacks held at once (`STACKS`, and the slots of
    /// `STACK_STATS`); stacks that hold nothing are reclaimed.
    pub stacks: u32,
    /// How stacks are walked, and room for CFI rows (`UNWIND_ROWS`).
    pub unwind: crate::target::unwind::UnwindMode,
    pub unwind_rows: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            allocations: 1 << 20,
            stacks: 65536,
            unwind: crate::target::unwind::UnwindMode::Fp,
            unwind_rows: tracer_common::unwind::DEFAULT_UNWIND_ROWS,
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
    /// A uprobe session program (entry, and return when the entry asks).
    pub session: bool,
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
/// The uprobe session programs (see `uprobe_session`).
const SESSION_PROGRAM: &str = "alloc_session";
const NOOP_SESSION: &str = "noop_session";

/// Which probes an attach step makes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Points {
    All,
    Frees,
    Allocations,
}

pub struct Probes {
    pub ebpf: Ebpf,
    pub variant: Variant,
    pub attached: Vec<Attached>,
    reclaimer: crate::kernel::slots::Reclaimer,
    /// Traced processes, as the programs know them.
    targets: Vec<Target>,
    /// Reserved `STACK_STATS` slots not yet given to a process's unknown stack.
    unknown_slots: Vec<u32>,
    /// What was attached, per process.
    scopes: Vec<Scope>,
    /// The session program and its links, while allocation functions are
    /// to be probed with it (see `load_session`).
    sessions: Option<crate::kernel::sessions::Sessions>,
    /// How allocation returns are probed, for `-v`.
    pub returns: String,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// A traced process in `TARGETS`.
struct Target {
    pid: u32,
    /// The trampoline address last told to the programs.
    trampoline: u64,
    unknown_slot: u32,
}

/// The probes of one process: the objects they are on, the thread they
/// are scoped to (see `follow_scope_thread`) and their links.
struct Scope {
    pid: u32,
    tid: u32,
    objects: Vec<AllocatorObject>,
    links: Vec<(&'static str, UProbeLinkId)>,
}

impl Probes {
    pub fn load(sizes: MapSizes) -> Result<Self> {
        Self::load_variant(sizes, Variant::Full, None, Default::default())
    }

    /// `sample_rate`: sample about one allocation every this many bytes
    /// (see `sampling`); None tracks every allocation. `sessions`: when to
    /// probe allocation functions with a uprobe session (`load_session`).
    pub fn load_variant(
        sizes: MapSizes,
        variant: Variant,
        sample_rate: Option<u64>,
        sessions: crate::kernel::sessions::SessionMode,
    ) -> Result<Self> {
        let no_stacks: u8 = (variant == Variant::NoStacks).into();
        let rate: u64 = sample_rate.unwrap_or(0);
        let fork_offset = crate::lifecycle::sched_events::fork_child_pid_offset().unwrap_or(0);
        let mut ebpf = EbpfLoader::new()
            .override_global("FORK_CHILD_PID_OFFSET", &fork_offset, true)
            .override_global("NO_STACKS", &no_stacks, true)
            .override_global("SAMPLE_RATE", &rate, true)
            .map_max_entries("ALLOCS", sizes.allocations)
            .map_max_entries("STACKS", sizes.stacks)
            // Slot 0 is the shared unknown stack's; 1..=stacks are handed
            // out; then one unknown-stack slot per traced process.
            .map_max_entries("STACK_STATS", sizes.stacks + 1 + UNKNOWN_SLOTS)
            .map_max_entries("FREE_SLOTS", sizes.stacks)
            .map_max_entries("TARGETS", UNKNOWN_SLOTS)
            // Frame-pointer mode leaves the CFI tables (allocated up front) empty.
            .map_max_entries(
                "UNWIND_ROWS",
                match sizes.unwind {
                    crate::target::unwind::UnwindMode::Fp => 1,
                    crate::target::unwind::UnwindMode::Cfi => sizes.unwind_rows.max(1),
                },
            )
            .override_global("UNWIND_MODE", &sizes.unwind.global(), true)
            .load(EBPF_OBJECT)
            .map_err(|e| crate::kernel::privileges::explain_load_error(anyhow!(e)))
            .context("loading the eBPF programs")?;
        crate::kernel::slots::fill_free_slots(&mut ebpf, sizes.stacks)?;
        if rate > 0 {
            fill_array(
                &mut ebpf,
                "SAMPLE_DRAWS",
                &crate::sampling::draw_table(rate),
            )?;
            fill_array(
                &mut ebpf,
                "SAMPLE_WEIGHTS",
                &crate::sampling::weight_table(rate),
            )?;
        }
        // Before the logger takes its map out of `ebpf`.
        let session_program = sessions
            .wanted(rate > 0)
            .then(|| Self::load_session(&ebpf, variant));
        // The programs only log rare conditions (a full map); forward them.
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();
        let mut programs: Vec<&str> = crate::target::allocator::FUNCTIONS
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
                .map_err(|e| crate::kernel::privileges::explain_load_error(anyhow!(e)))
                .with_context(|| format!("loading eBPF program {name}"))?;
        }
        let first_reserved = sizes.stacks + 1;
        let mut probes = Probes {
            ebpf,
            variant,
            attached: Vec::new(),
            reclaimer: Default::default(),
            targets: Vec::new(),
            unknown_slots: (first_reserved..first_reserved + UNKNOWN_SLOTS)
                .rev()
                .collect(),
            scopes: Vec::new(),
            sessions: None,
            returns: "uretprobe".to_string(),
            _logger: logger,
        };
        match session_program {
            Some(Ok(sessions)) => probes.sessions = Some(sessions),
            Some(Err(e)) => probes.session_unavailable(&e),
            None => {}
        }
        Ok(probes)
    }

    /// Loads the program that probes the allocation functions as one uprobe
    /// session (kernel 6.13+) instead of a uprobe and a uretprobe each.
    /// Failing is not fatal: they get those (`-v` says which, `returns`).
    fn load_session(ebpf: &Ebpf, variant: Variant) -> Result<crate::kernel::sessions::Sessions> {
        let program = if variant == Variant::Noop {
            NOOP_SESSION
        } else {
            SESSION_PROGRAM
        };
        crate::kernel::sessions::Sessions::load(ebpf, EBPF_OBJECT, program)
    }

    fn session_unavailable(&mut self, error: &anyhow::Error) {
        log::debug!("uprobe sessions: {error:#}");
        self.sessions = None;
        self.returns = format!("uretprobe (uprobe sessions unavailable: {error:#})");
    }

    /// Attaches the session program to every allocation function of
    /// `object` with one link, for process `pid`.
    fn attach_session(&mut self, object: &AllocatorObject, pid: u32) -> Result<()> {
        let Some(sessions) = &mut self.sessions else {
            bail!("no session program");
        };
        let program = sessions.program_name;
        for point in sessions.attach(object, pid)? {
            if !self
                .attached
                .iter()
                .any(|a| a.object == object.path && a.file_offset == point.file_offset && a.session)
            {
                self.attached.push(Attached {
                    object: object.path.clone(),
                    file_offset: point.file_offset,
                    skip: 0,
                    functions: point.functions.clone(),
                    program,
                    is_return: false,
                    session: true,
                });
            }
        }
        self.returns = "uprobe session (a return is trapped only when the entry keeps the \
                        call: with --sample-rate, sampled calls)"
            .to_string();
        Ok(())
    }

    /// Periodic upkeep of the kernel side: re-scopes the probes when the
    /// thread they are bound to exited, tells the programs where the
    /// targets' uretprobe trampolines are and reclaims the stack slots of
    /// stacks that hold nothing. Returns how many were reclaimed.
    pub fn housekeeping(&mut self) -> Result<usize> {
        self.follow_scope_threads()?;
        if let Some(sessions) = &mut self.sessions {
            if sessions.clean_forked_children()? {
                log::debug!("uprobe sessions made anew: a target forked");
            }
        }
        self.learn_trampolines()?;
        self.reclaimer.run(&mut self.ebpf)
    }

    fn targets_map(&mut self) -> Result<BpfHashMap<&mut aya::maps::MapData, u32, TargetInfo>> {
        Ok(BpfHashMap::try_from(
            self.ebpf.map_mut("TARGETS").context("TARGETS map")?,
        )?)
    }

    /// Lets the programs count events of this process, with a stack slot
    /// of its own for allocations whose stack is lost.
    pub fn add_target(&mut self, pid: u32) -> Result<()> {
        if self.targets.iter().any(|t| t.pid == pid) {
            return Ok(());
        }
        let unknown_slot = match self.unknown_slots.pop() {
            Some(slot) => {
                crate::kernel::slots::StatsTable::open(&self.ebpf)?
                    .claim_unknown(slot as usize, pid);
                slot
            }
            None => tracer_common::SLOT_UNKNOWN,
        };
        let info = TargetInfo {
            unknown_slot,
            ..TargetInfo::default()
        };
        self.targets_map()?
            .insert(pid, info, 0)
            .with_context(|| format!("adding PID {pid} to the traced processes"))?;
        self.targets.push(Target {
            pid,
            trampoline: 0,
            unknown_slot,
        });
        Ok(())
    }

    /// Stops counting process `pid` (it exited or is being re-probed after
    /// an exec). Its records stay for the final report.
    pub fn remove_target(&mut self, pid: u32) {
        self.targets.retain(|t| t.pid != pid);
        if let Ok(mut map) = self.targets_map() {
            let _ = map.remove(&pid);
        }
    }

    /// Tells the programs where each target's uretprobe trampoline is (the
    /// start of its `[uprobes]` mapping, made at its first probe hit), when
    /// it appeared or moved (exec).
    fn learn_trampolines(&mut self) -> Result<()> {
        let mut updates = Vec::new();
        for target in &mut self.targets {
            let Ok(maps) = std::fs::read_to_string(format!("/proc/{}/maps", target.pid)) else {
                continue;
            };
            let start = maps
                .lines()
                .find(|l| l.ends_with(" [uprobes]"))
                .and_then(|l| l.split('-').next())
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            if let Some(start) = start.filter(|s| *s != target.trampoline) {
                target.trampoline = start;
                updates.push((
                    target.pid,
                    TargetInfo {
                        trampoline: start,
                        trampoline_code: 0,
                        unknown_slot: target.unknown_slot,
                        _pad: 0,
                    },
                ));
            }
        }
        let mut map = self.targets_map()?;
        for (pid, info) in updates {
            map.insert(pid, info, 0).context("updating a target")?;
        }
        Ok(())
    }

    /// Attaches the allocator probes of `object` for process `pid`.
    ///
    /// Order matters while the process runs: `free` first, so that every
    /// block recorded afterwards has its free seen; for each allocation
    /// function the return probe before the entry probe, so that no entry is
    /// recorded without its return (a return without an entry is ignored).
    ///
    /// With sessions (`load_session`) the allocation functions get one
    /// session link after `free`: entry and return come together. If the
    /// kernel refuses it, they get a uprobe and a uretprobe each.
    pub fn attach(&mut self, object: &AllocatorObject, pid: u32) -> Result<()> {
        let links = if self.sessions.is_some() {
            let mut links = self.attach_scoped(object, pid, Points::Frees)?;
            if let Err(e) = self.attach_session(object, pid) {
                self.session_unavailable(&e);
                links.extend(self.attach_scoped(object, pid, Points::Allocations)?);
            }
            links
        } else {
            self.attach_scoped(object, pid, Points::All)?
        };
        match self.scopes.iter_mut().find(|s| s.pid == pid) {
            Some(scope) => {
                scope.objects.push(object.clone());
                scope.links.extend(links);
            }
            None => self.scopes.push(Scope {
                pid,
                tid: pid,
                objects: vec![object.clone()],
                links,
            }),
        }
        Ok(())
    }

    /// Whether `object` (the same file, by inode: /lib and /usr/lib may
    /// name one file) is already probed for `pid` at the same offsets.
    pub fn is_attached(&self, object: &AllocatorObject, pid: u32) -> bool {
        use std::os::unix::fs::MetadataExt;
        let file =
            |path: &std::path::Path| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let wanted = file(&object.host_path);
        self.scopes.iter().any(|s| {
            s.pid == pid
                && s.objects.iter().any(|o| {
                    (o.host_path == object.host_path
                        || (wanted.is_some() && file(&o.host_path) == wanted))
                        && o.points == object.points
                })
        })
    }

    /// Detaches every probe of process `pid`. The kernel takes a while per
    /// probe (see `Drop`), so the links are closed on another thread.
    pub fn detach_process(&mut self, pid: u32) {
        let Some(index) = self.scopes.iter().position(|s| s.pid == pid) else {
            return;
        };
        let scope = self.scopes.remove(index);
        if let Some(sessions) = &mut self.sessions {
            sessions.detach_process(pid);
        }
        let links = self.take_links(scope.links);
        if !links.is_empty() {
            let _ = std::thread::Builder::new()
                .name("tracer-detach".into())
                .spawn(move || drop(links));
        }
    }

    /// Owned links, to be dropped wherever suits (dropping one detaches it).
    fn take_links(&mut self, links: Vec<(&'static str, UProbeLinkId)>) -> Vec<UProbeLink> {
        let mut owned = Vec::new();
        for (program, link) in links {
            let Some(Ok(prog)) = self.ebpf.program_mut(program).map(<&mut UProbe>::try_from) else {
                continue;
            };
            if let Ok(link) = prog.take_link(link) {
                owned.push(link);
            }
        }
        owned
    }

    /// The probes are scoped to one task: the kernel filters hits by that
    /// task's mm, which the task drops when it exits. So once the thread
    /// the probes were scoped to (at first the main thread) has exited while
    /// other threads run on (`pthread_exit` in main), nothing of the process
    /// would be seen any more. Re-attach them scoped to a live thread, then
    /// drop the old ones. Called from housekeeping: calls made in between
    /// (up to a second) are missed.
    ///
    /// Session links cannot follow (see `uprobe_session::Sessions`): their
    /// functions get a uprobe and a uretprobe each too, and the session goes.
    ///
    /// Why not scope the probes to all processes and rely on the TARGETS
    /// filter: every other process using the same allocator would then take
    /// the uprobe traps too; measured here, an untraced malloc+free loop went
    /// from ~6 ns to ~9-16 us per iteration.
    fn follow_scope_threads(&mut self) -> Result<()> {
        for index in 0..self.scopes.len() {
            let (pid, tid) = (self.scopes[index].pid, self.scopes[index].tid);
            if task_alive(pid, tid) {
                continue;
            }
            let Some(live) = live_task(pid) else {
                continue; // the process is going away
            };
            let objects = self.scopes[index].objects.clone();
            let described = self.attached.len();
            let mut links = Vec::new();
            for object in &objects {
                links.extend(self.attach_scoped(object, live, Points::All)?);
            }
            self.attached.truncate(described);
            let old = std::mem::replace(&mut self.scopes[index].links, links);
            drop(self.take_links(old));
            if let Some(sessions) = &mut self.sessions {
                if sessions.detach_process(pid) {
                    self.returns = format!(
                        "uretprobe (since thread {tid}, the main thread of {pid}, exited: uprobe \
                         sessions follow the main thread's memory map)"
                    );
                    log::debug!("{}", self.returns);
                }
            }
            self.scopes[index].tid = live;
            log::debug!("thread {tid} of {pid} exited; probes now scoped to thread {live}");
        }
        Ok(())
    }

    fn attach_scoped(
        &mut self,
        object: &AllocatorObject,
        scope_task: u32,
        which: Points,
    ) -> Result<Vec<(&'static str, UProbeLinkId)>> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(scope_task).context("pid 0")?);
        let (frees, allocs): (Vec<&ProbePoint>, Vec<&ProbePoint>) =
            object.points.iter().partition(|p| p.entry == Entry::Free);
        let (frees, allocs) = match which {
            Points::All => (frees, allocs),
            Points::Frees => (frees, Vec::new()),
            Points::Allocations => (Vec::new(), allocs),
        };
        let noop = self.variant == Variant::Noop;
        let mut links = Vec::new();
        for point in frees.into_iter().chain(allocs) {
            if point.entry.needs_return() {
                let program = if noop { NOOP_RETURN } else { RETURN_PROGRAM };
                links.push(self.attach_one(object, point, program, true, scope)?);
            }
            let program = if noop {
                NOOP_ENTRY
            } else {
                point.entry.program()
            };
            links.push(self.attach_one(object, point, program, false, scope)?);
        }
        Ok(links)
    }

    fn attach_one(
        &mut self,
        object: &AllocatorObject,
        point: &ProbePoint,
        program: &'static str,
        is_return: bool,
        scope: UProbeScope,
    ) -> Result<(&'static str, UProbeLinkId)> {
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("eBPF object has no program {program}"))?
            .try_into()?;
        let skip = if is_return { 0 } else { point.entry_skip };
        let file_offset = point.file_offset + skip;
        let link = prog
            .attach(
                UProbeAttachLocation::AbsoluteOffset(file_offset),
                &object.host_path,
                scope,
            )
            .map_err(|e| crate::kernel::privileges::explain_load_error(anyhow!(e)))
            .with_context(|| {
                format!(
                    "attaching {program} to {} at {:#x} ({})",
                    object.path,
                    file_offset,
                    point.functions.join("/")
                )
            })?;
        if !self.attached.iter().any(|a| {
            a.object == object.path && a.file_offset == file_offset && a.program == program
        }) {
            self.attached.push(Attached {
                object: object.path.clone(),
                file_offset,
                skip,
                functions: point.functions.clone(),
                program,
                is_return,
                session: false,
            });
        }
        Ok((program, link))
    }
}

/// Detaching a uprobe waits for RCU grace periods in the kernel, about
/// 0.1-0.3 s per probe on these machines and serialized: a dozen probes held
/// the tracer for seconds after the final report, when the target had
/// exited or the user had pressed Ctrl-C. So the detaching is handed to a
/// forked child that holds a copy of every descriptor: it waits until the
/// tracer has exited (EOF on a pipe only the tracer writes to), then closes
/// them, paying the waits; the tracer's own closes are cheap because the
/// child still holds the descriptors. The probes go a moment after the
/// tracer, as if it had been killed.
impl Drop for Probes {
    fn drop(&mut self) {
        let mut pipe = [0; 2];
        // Safety: between fork and _exit the child makes only
        // async-signal-safe system calls.
        unsafe {
            if libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
                return; // fall back to closing them here
            }
            match libc::fork() {
                0 => {
                    libc::close(pipe[1]);
                    // Standard streams first: whoever reads our output sees
                    // its end when the tracer exits, not when this child does.
                    for fd in 0..3 {
                        libc::close(fd);
                    }
                    let mut byte = 0u8;
                    while libc::read(pipe[0], (&mut byte as *mut u8).cast(), 1) < 0 {}
                    libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
                    libc::_exit(0);
                }
                pid if pid > 0 => {
                    // The write end stays open until this process exits.
                    libc::close(pipe[0]);
                }
                _ => {
                    libc::close(pipe[0]);
                    libc::close(pipe[1]);
                }
            }
        }
    }
}

/// Task `tid` of process `pid` exists and is not a zombie.
fn task_alive(pid: u32, tid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .map(|(_, rest)| rest.trim_start())
            .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

/// Some live thread of `pid`.
fn live_task(pid: u32) -> Option<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .find(|&tid| task_alive(pid, tid))
}
