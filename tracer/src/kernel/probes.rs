//! Which probe sits where: the allocator functions of each object, probed
//! for one process at a time, in an order that never records a block whose
//! free could be missed; the links, per process, and their re-scoping when
//! the thread they are bound to exits.

use std::path::Path;

use tracer_common::convention;

use crate::target::{
    allocator::{AllocatorObject, Entry, ProbePoint, FUNCTIONS},
    placement::Placement,
};

use super::{error::Result, programs::UprobeLink, Kernel, Variant};

/// The return program, shared by every allocation function.
const RETURN_PROGRAM: &str = "alloc_return";
/// The entry program of a probe moved where an argument is in another
/// register: it reads the convention and the registers from its attach
/// cookie (kernels 5.15+; see `placement`).
pub const MOVED_ENTRY: &str = "moved_enter";
/// `MOVED_ENTRY` for kernels without attach cookies: it finds the cookie in
/// `MOVED_ARGS` at the probe's page offset (`convention::KEYED`).
pub const MOVED_KEYED: &str = "moved_enter_keyed";
/// The no-op programs of `Variant::Noop`.
const NOOP_ENTRY: &str = "noop_enter";
const NOOP_RETURN: &str = "noop_return";

/// The entry program of a calling convention (tracer-ebpf/src/alloc.rs).
pub fn entry_program(entry: Entry) -> &'static str {
    match entry {
        Entry::Malloc => "malloc_enter",
        Entry::Calloc => "calloc_enter",
        Entry::Realloc => "realloc_enter",
        Entry::Reallocarray => "reallocarray_enter",
        Entry::Memalign => "memalign_enter",
        Entry::PosixMemalign => "posix_memalign_enter",
        Entry::Valloc => "valloc_enter",
        Entry::Pvalloc => "pvalloc_enter",
        Entry::Free => "free_enter",
    }
}

/// The uprobe programs a variant attaches, each once.
pub fn programs(variant: Variant) -> Vec<&'static str> {
    if variant == Variant::Noop {
        return vec![NOOP_ENTRY, NOOP_RETURN];
    }
    // MOVED_ENTRY is loaded only where programs read attach cookies
    // (`Paths::cookies`), MOVED_KEYED only where they do not.
    let mut programs: Vec<&str> = FUNCTIONS.iter().map(|(_, e)| entry_program(*e)).collect();
    programs.push(RETURN_PROGRAM);
    programs.sort_unstable();
    programs.dedup();
    programs
}

/// A probe the tracer attached, for `-v` and reports.
#[derive(Clone, Debug)]
pub struct Attached {
    pub object: String,
    /// Where the probe is, in the file.
    pub file_offset: u64,
    /// Where in its function, the instruction there, and why.
    pub placement: Placement,
    pub functions: Vec<&'static str>,
    /// Not attached: every call goes to this probed function first.
    pub covered_by: Option<&'static str>,
    pub program: &'static str,
    pub is_return: bool,
    /// A uprobe session program (entry, and return when the entry asks).
    pub session: bool,
}

/// Which probes an attach step makes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Points {
    All,
    Frees,
    Allocations,
}

/// The probes of every traced process.
pub struct ProbeSet {
    /// Every probe attached so far (once per place), for `-v`.
    pub attached: Vec<Attached>,
    /// How allocation returns are probed, for `-v`.
    pub returns: String,
    scopes: Vec<Scope>,
    /// Without attach cookies: the `MOVED_ARGS` slots written so far (page
    /// offset -> cookie), never rewritten while probes may read them.
    keyed: std::collections::HashMap<u32, u64>,
}

impl Default for ProbeSet {
    fn default() -> Self {
        ProbeSet {
            attached: Vec::new(),
            returns: "uretprobe".to_string(),
            scopes: Vec::new(),
            keyed: Default::default(),
        }
    }
}

/// The probes of one process: the objects they are on, the thread they
/// are scoped to (see `follow_scope_threads`) and their links.
struct Scope {
    pid: u32,
    tid: u32,
    objects: Vec<AllocatorObject>,
    links: Vec<UprobeLink>,
}

impl ProbeSet {
    /// Whether `object` (the same file, by inode: /lib and /usr/lib may
    /// name one file) is already probed for `pid` at the same offsets.
    pub fn is_attached(&self, object: &AllocatorObject, pid: u32) -> bool {
        let wanted = crate::target::tasks::file_identity(&object.host_path);
        self.scopes.iter().any(|s| {
            s.pid == pid
                && s.objects.iter().any(|o| {
                    (o.host_path == object.host_path
                        || (wanted.is_some()
                            && crate::target::tasks::file_identity(&o.host_path) == wanted))
                        && o.points == object.points
                })
        })
    }

    fn describe(&mut self, attached: Attached) {
        if !self.attached.iter().any(|a| {
            a.object == attached.object
                && a.file_offset == attached.file_offset
                && a.program == attached.program
        }) {
            self.attached.push(attached);
        }
    }
}

impl Kernel {
    /// Attaches the allocator probes of `object` for process `pid`.
    ///
    /// Order matters while the process runs: `free` first, so that every
    /// block recorded afterwards has its free seen; for each allocation
    /// function the return probe before the entry probe, so that no entry is
    /// recorded without its return (a return without an entry is ignored).
    ///
    /// With sessions the allocation functions get one session link after
    /// `free`: entry and return come together. If the kernel refuses it,
    /// they get a uprobe and a uretprobe each.
    pub(super) fn attach(&mut self, object: &AllocatorObject, pid: u32) -> Result<()> {
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
        match self.probes.scopes.iter_mut().find(|s| s.pid == pid) {
            Some(scope) => {
                scope.objects.push(object.clone());
                scope.links.extend(links);
            }
            None => self.probes.scopes.push(Scope {
                pid,
                tid: pid,
                objects: vec![object.clone()],
                links,
            }),
        }
        Ok(())
    }

    /// Attaches the session program to every allocation function of
    /// `object` with one link, for process `pid`.
    fn attach_session(&mut self, object: &AllocatorObject, pid: u32) -> anyhow::Result<()> {
        let Some(sessions) = &mut self.sessions else {
            anyhow::bail!("no session program");
        };
        let program = sessions.program_name;
        for point in sessions.attach(object, pid)? {
            let placement = point.placed(true).clone();
            let attached = Attached {
                object: object.path.clone(),
                file_offset: point.file_offset + placement.skip,
                placement,
                functions: point.functions.clone(),
                covered_by: None,
                program,
                is_return: false,
                session: true,
            };
            self.probes.describe(attached);
        }
        self.probes.returns = "uprobe session (a return is trapped only when the entry keeps \
                               the call: with --sample-rate, sampled calls)"
            .to_string();
        Ok(())
    }

    /// Sessions cannot be used: allocation functions get a uprobe and a
    /// uretprobe each (`-v` says why).
    pub(super) fn session_unavailable(&mut self, error: &anyhow::Error) {
        log::debug!("uprobe sessions: {error:#}");
        self.sessions = None;
        self.probes.returns = format!("uretprobe (uprobe sessions unavailable: {error:#})");
    }

    /// Detaches every probe of process `pid`. The kernel takes a while per
    /// probe (see `Drop`), so the links are closed on another thread.
    pub(super) fn detach_process(&mut self, pid: u32) {
        let Some(index) = self.probes.scopes.iter().position(|s| s.pid == pid) else {
            return;
        };
        let scope = self.probes.scopes.remove(index);
        if let Some(sessions) = &mut self.sessions {
            sessions.detach_process(pid);
        }
        close_later(scope.links);
    }

    /// The probes are scoped to one task: the kernel filters hits by that
    /// task's mm, which the task drops when it exits. So once the thread
    /// the probes were scoped to (at first the main thread) has exited while
    /// other threads run on (`pthread_exit` in main), nothing of the process
    /// would be seen any more. Re-attach them scoped to a live thread, then
    /// drop the old ones. Called from housekeeping: calls made in between
    /// (up to a second) are missed.
    ///
    /// Session links cannot follow (see `sessions::Sessions`): their
    /// functions get a uprobe and a uretprobe each too, and the session goes.
    ///
    /// Why not scope the probes to all processes and rely on the TARGETS
    /// filter: every other process using the same allocator would then take
    /// the uprobe traps too; measured here, an untraced malloc+free loop went
    /// from ~6 ns to ~9-16 us per iteration.
    pub(super) fn follow_scope_threads(&mut self) -> Result<()> {
        use crate::target::tasks::{is_task_alive, live_task};
        for index in 0..self.probes.scopes.len() {
            let (pid, tid) = (self.probes.scopes[index].pid, self.probes.scopes[index].tid);
            if is_task_alive(pid, tid) {
                continue;
            }
            let Some(live) = live_task(pid) else {
                continue; // the process is going away
            };
            let objects = self.probes.scopes[index].objects.clone();
            let described = self.probes.attached.len();
            let mut links = Vec::new();
            for object in &objects {
                links.extend(self.attach_scoped(object, live, Points::All)?);
            }
            self.probes.attached.truncate(described);
            drop(std::mem::replace(
                &mut self.probes.scopes[index].links,
                links,
            ));
            if let Some(sessions) = &mut self.sessions {
                if sessions.detach_process(pid) {
                    self.probes.returns = format!(
                        "uretprobe (since thread {tid}, the main thread of {pid}, exited: uprobe \
                         sessions follow the main thread's memory map)"
                    );
                    log::debug!("{}", self.probes.returns);
                }
            }
            self.probes.scopes[index].tid = live;
            log::debug!("thread {tid} of {pid} exited; probes now scoped to thread {live}");
        }
        Ok(())
    }

    fn attach_scoped(
        &mut self,
        object: &AllocatorObject,
        scope_task: u32,
        which: Points,
    ) -> Result<Vec<UprobeLink>> {
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
            if let Some(target) = point.covered_by {
                self.describe_covered(object, point, target);
                continue;
            }
            let placement = self.placement(point)?;
            if point.entry.needs_return() {
                let program = if noop { NOOP_RETURN } else { RETURN_PROGRAM };
                links.push(
                    self.attach_one(object, point, &placement, program, None, true, scope_task)?,
                );
            }
            let (program, cookie) = if noop {
                (NOOP_ENTRY, None)
            } else if placement.args != 0 {
                if self.paths.cookies {
                    (MOVED_ENTRY, Some(moved_cookie(point, &placement)))
                } else {
                    (MOVED_KEYED, None)
                }
            } else {
                (entry_program(point.entry), None)
            };
            links.push(self.attach_one(
                object, point, &placement, program, cookie, false, scope_task,
            )?);
        }
        Ok(links)
    }

    /// `-v` lists a function left unprobed: its calls are seen in another.
    fn describe_covered(&mut self, object: &AllocatorObject, point: &ProbePoint, to: &'static str) {
        self.probes.describe(Attached {
            object: object.path.clone(),
            file_offset: point.file_offset,
            placement: point.placed(self.paths.cookies).clone(),
            functions: point.functions.clone(),
            covered_by: Some(to),
            program: "",
            is_return: false,
            session: false,
        });
    }

    /// Where `point`'s probes go on this kernel: past moved arguments where
    /// the entry program can learn where they are (its attach cookie;
    /// without cookies, a `MOVED_ARGS` slot at the probe's page offset that
    /// no other moved probe needs), otherwise where no argument moved.
    fn placement(&mut self, point: &ProbePoint) -> Result<Placement> {
        let moved = &point.placement;
        if self.paths.cookies || moved.args == 0 || self.variant == Variant::Noop {
            return Ok(point.placed(self.paths.cookies).clone());
        }
        let cookie = moved_cookie(point, moved);
        match claim_slot(&self.probes.keyed, point.file_offset + moved.skip, cookie) {
            Slot::Taken => {
                let mut in_place = point.in_place.clone();
                in_place.reason = format!(
                    "{} (no attach cookies, and the slot of its page offset is another moved probe's)",
                    in_place.reason
                );
                return Ok(in_place);
            }
            Slot::Written(_) => {}
            Slot::Free(slot) => {
                super::maps::set_array(
                    &mut self.loaded,
                    super::maps::MOVED_ARGS,
                    slot,
                    cookie | convention::KEYED,
                )?;
                self.probes.keyed.insert(slot, cookie);
            }
        }
        Ok(moved.clone())
    }

    /// Attaches `program` at `placement` (a uretprobe works at any
    /// instruction before the stack pointer first moves).
    #[allow(clippy::too_many_arguments)]
    fn attach_one(
        &mut self,
        object: &AllocatorObject,
        point: &ProbePoint,
        placement: &Placement,
        program: &'static str,
        cookie: Option<u64>,
        is_return: bool,
        scope_task: u32,
    ) -> Result<UprobeLink> {
        let placement = placement.clone();
        let file_offset = point.file_offset + placement.skip;
        let link = self.loaded.attach_uprobe(
            program,
            Path::new(&object.host_path),
            file_offset,
            cookie,
            scope_task,
            || {
                format!(
                    "{program} to {} at {:#x} ({})",
                    object.path,
                    file_offset,
                    point.functions.join("/")
                )
            },
        )?;
        self.probes.describe(Attached {
            object: object.path.clone(),
            file_offset,
            placement,
            functions: point.functions.clone(),
            covered_by: None,
            program,
            is_return,
            session: false,
        });
        Ok(link)
    }
}

/// A `MOVED_ARGS` slot, for a moved probe on a kernel without cookies.
#[derive(Debug, PartialEq, Eq)]
enum Slot {
    /// Nobody's yet: write it.
    Free(u32),
    /// Already holds this cookie (the same probe in another process).
    Written(u32),
    /// Holds another probe's cookie: this one cannot move.
    Taken,
}

/// The slot of the probe at `file_offset` (its page offset: the same in
/// every process that maps the file), given the slots written so far.
fn claim_slot(
    written: &std::collections::HashMap<u32, u64>,
    file_offset: u64,
    cookie: u64,
) -> Slot {
    let slot = (file_offset % convention::KEYED_SLOTS as u64) as u32;
    match written.get(&slot) {
        None => Slot::Free(slot),
        Some(&other) if other == cookie => Slot::Written(slot),
        Some(_) => Slot::Taken,
    }
}

/// The cookie of a probe placed past moved arguments: its convention and
/// where each argument is (`tracer_common::convention`).
fn moved_cookie(point: &ProbePoint, placement: &Placement) -> u64 {
    let convention = super::sessions::convention(point.entry).unwrap_or(convention::FREE);
    convention | placement.args << convention::ARGS_SHIFT
}

/// Closes links on a thread of their own: closing a uprobe link waits for
/// RCU grace periods, not on the caller's time. (If no thread can be made,
/// they close here.)
pub(super) fn close_later<T: Send + 'static>(links: Vec<T>) {
    if !links.is_empty() {
        let _ = std::thread::Builder::new()
            .name("tracer-detach".into())
            .spawn(move || drop(links));
    }
}

/// The session program to load for a variant.
pub(super) fn session_program(variant: Variant) -> &'static str {
    if variant == Variant::Noop {
        "noop_session"
    } else {
        "alloc_session"
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
impl Drop for Kernel {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_probes_share_a_slot_only_with_the_same_cookie() {
        let mut written = std::collections::HashMap::new();
        // mimalloc's malloc, entry+21 at 0x10b85: size in rsi.
        let malloc = convention::MALLOC | (6 + 1) << convention::ARGS_SHIFT;
        assert_eq!(claim_slot(&written, 0x10b85, malloc), Slot::Free(0xb85));
        written.insert(0xb85, malloc);
        // The same probe for another process, or another object whose
        // probe has the same page offset and the same cookie: shared.
        assert_eq!(claim_slot(&written, 0x7b85, malloc), Slot::Written(0xb85));
        // Another convention at the same page offset: it stays in place.
        // Argument 1 in rax (register 0, stored as 1).
        let calloc = convention::CALLOC | 1 << convention::ARGS_SHIFT;
        assert_eq!(claim_slot(&written, 0x22b85, calloc), Slot::Taken);
        assert_eq!(claim_slot(&written, 0x22b86, calloc), Slot::Free(0xb86));
    }
}
