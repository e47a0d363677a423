//! What the running kernel offers the tracer, probed rather than read off
//! the version number (distributions backport features, and leave some
//! out): tiny maps, programs and links made and closed at once (`sys`),
//! and the files the kernel exports. `Paths` is what the tracer does
//! because of it; `blockers` what keeps it from running at all.
//! Probed once per run (`detected`); `tracer doctor` shows all of it.

use std::{fs, io, os::fd::AsFd as _, path::Path, sync::OnceLock};

use super::{error::NEED_PRIVILEGES, privileges, sys};

/// Whether the kernel has something; Unknown when it could not be asked
/// (no privileges, no bpf() system call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Have {
    Yes,
    No,
    Unknown,
}

/// One capability: whether the kernel has it, and what was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub have: Have,
    pub detail: String,
}

impl Probe {
    pub fn yes(detail: impl Into<String>) -> Self {
        Probe {
            have: Have::Yes,
            detail: detail.into(),
        }
    }

    pub fn no(detail: impl Into<String>) -> Self {
        Probe {
            have: Have::No,
            detail: detail.into(),
        }
    }

    pub fn unknown(detail: impl Into<String>) -> Self {
        Probe {
            have: Have::Unknown,
            detail: detail.into(),
        }
    }

    pub fn is_yes(&self) -> bool {
        self.have == Have::Yes
    }

    pub fn is_no(&self) -> bool {
        self.have == Have::No
    }
}

/// Everything the tracer uses that a kernel may lack. Each field says
/// "the tracer can use it" when yes (so `lockdown` is yes when not locked
/// down in a way that stops tracing).
#[derive(Clone, Debug)]
pub struct Features {
    /// `uname -r` and `uname -v`.
    pub release: String,
    pub version: String,
    pub privileges: Probe,
    pub bpf_syscall: Probe,
    /// BPF_F_MMAPABLE arrays (5.5): `STACK_STATS` is read without syscalls.
    pub mmapable_maps: Probe,
    /// BPF_MAP_TYPE_RINGBUF (5.8): mmap and fork/exec events.
    pub ring_buffer: Probe,
    pub uprobes: Probe,
    pub tracefs: Probe,
    pub syscall_tracepoints: Probe,
    pub sched_tracepoints: Probe,
    pub btf: Probe,
    /// The bpf_loop helper (5.17): the CFI walk's loop.
    pub bpf_loop: Probe,
    /// BPF_MAP_LOOKUP_BATCH on hash maps (5.6): snapshots.
    pub batch_ops: Probe,
    /// uprobe_multi links (6.6).
    pub uprobe_multi: Probe,
    /// Uprobe sessions (6.13): one program for entry and return.
    pub uprobe_sessions: Probe,
    /// bpf_get_attach_cookie in uprobe programs (5.15).
    pub attach_cookies: Probe,
    /// Returns trapped through the uretprobe syscall (6.11) instead of int3.
    pub uretprobe_syscall: Probe,
    /// Atomic fetch-and-add and friends (5.12).
    pub atomic_fetch: Probe,
    /// membarrier(MEMBARRIER_CMD_GLOBAL) on 2+ CPUs: an RCU grace period.
    pub membarrier: Probe,
    pub lockdown: Probe,
    pub perf_event_paranoid: Probe,
}

static FEATURES: OnceLock<Features> = OnceLock::new();

/// The features, if they were probed already (errors use them to say why).
pub fn probed() -> Option<&'static Features> {
    FEATURES.get()
}

/// The probed features of this kernel, probed on first use.
pub fn detected() -> &'static Features {
    FEATURES.get_or_init(|| {
        let mut features = Features::probe();
        if let Ok(names) = std::env::var("TRACER_TEST_WITHOUT") {
            features.hide(names.split(',').filter(|n| !n.is_empty()));
        }
        features
    })
}

/// The features, or one line saying what is missing and what would fix it
/// when the tracer cannot run at all. Called before anything is attached.
pub fn require() -> anyhow::Result<&'static Features> {
    let features = detected();
    match features.blockers().into_iter().next() {
        Some(blocker) => Err(anyhow::anyhow!(blocker)),
        None => Ok(features),
    }
}

impl Features {
    /// Each capability with a stable key (doctor's JSON) and a title that
    /// reads as a yes/no question (doctor's screen), in a fixed order.
    pub fn list(&self) -> Vec<(&'static str, &'static str, &Probe)> {
        vec![
            (
                "privileges",
                "privileges (CAP_BPF+CAP_PERFMON)",
                &self.privileges,
            ),
            ("bpf_syscall", "bpf() system call", &self.bpf_syscall),
            (
                "mmapable_maps",
                "memory-mapped BPF arrays",
                &self.mmapable_maps,
            ),
            ("ring_buffer", "BPF ring buffer", &self.ring_buffer),
            ("uprobes", "uprobes", &self.uprobes),
            ("tracefs", "tracefs", &self.tracefs),
            (
                "syscall_tracepoints",
                "syscall tracepoints",
                &self.syscall_tracepoints,
            ),
            (
                "sched_tracepoints",
                "sched tracepoints",
                &self.sched_tracepoints,
            ),
            ("btf", "kernel BTF", &self.btf),
            ("bpf_loop", "bpf_loop helper", &self.bpf_loop),
            ("batch_ops", "batch map operations", &self.batch_ops),
            ("uprobe_multi", "uprobe_multi links", &self.uprobe_multi),
            ("uprobe_sessions", "uprobe sessions", &self.uprobe_sessions),
            ("attach_cookies", "attach cookies", &self.attach_cookies),
            (
                "uretprobe_syscall",
                "uretprobe syscall",
                &self.uretprobe_syscall,
            ),
            ("atomic_fetch", "BPF atomic fetch ops", &self.atomic_fetch),
            ("membarrier", "membarrier grace period", &self.membarrier),
            ("lockdown", "not locked down", &self.lockdown),
            (
                "perf_event_paranoid",
                "perf_event_paranoid allows",
                &self.perf_event_paranoid,
            ),
        ]
    }

    /// What keeps the tracer from running at all, one line each: what is
    /// missing and what would fix it. Empty: it can run.
    pub fn blockers(&self) -> Vec<String> {
        let mut blockers = Vec::new();
        if self.privileges.is_no() {
            blockers.push(NEED_PRIVILEGES.to_string());
        }
        if self.bpf_syscall.is_no() {
            blockers.push(format!(
                "the kernel refuses eBPF ({}): {}",
                self.bpf_syscall.detail,
                if self.lockdown.is_no() {
                    "boot without lockdown=confidentiality (or turn Secure Boot's lockdown off)"
                } else if self.privileges.is_yes() {
                    "a kernel built with CONFIG_BPF_SYSCALL, and no security module refusing bpf(), is needed"
                } else {
                    "run as root"
                }
            ));
        }
        if self.uprobes.is_no() {
            blockers.push(format!(
                "the kernel has no uprobes ({}): a kernel built with CONFIG_UPROBE_EVENTS is needed (every major distribution's is)",
                self.uprobes.detail
            ));
        }
        for (probe, what, since) in [
            (&self.ring_buffer, "BPF ring buffer", "5.8"),
            (&self.mmapable_maps, "memory-mapped BPF arrays", "5.5"),
        ] {
            if probe.is_no() {
                blockers.push(format!(
                    "the kernel has no {what} ({}): Linux {since} or newer is needed",
                    probe.detail
                ));
            }
        }
        blockers
    }

    /// Testing: `TRACER_TEST_WITHOUT=batch_ops,uprobe_sessions` (keys of
    /// `list`) makes the tracer behave as on a kernel without them, so the
    /// fallbacks are tested on any kernel (tests/tests/doctor.rs).
    pub fn hide<'a>(&mut self, keys: impl Iterator<Item = &'a str>) {
        for key in keys {
            let probe = match key {
                "privileges" => &mut self.privileges,
                "bpf_syscall" => &mut self.bpf_syscall,
                "mmapable_maps" => &mut self.mmapable_maps,
                "ring_buffer" => &mut self.ring_buffer,
                "uprobes" => &mut self.uprobes,
                "tracefs" => &mut self.tracefs,
                "syscall_tracepoints" => &mut self.syscall_tracepoints,
                "sched_tracepoints" => &mut self.sched_tracepoints,
                "btf" => &mut self.btf,
                "bpf_loop" => &mut self.bpf_loop,
                "batch_ops" => &mut self.batch_ops,
                "uprobe_multi" => &mut self.uprobe_multi,
                "uprobe_sessions" => &mut self.uprobe_sessions,
                "attach_cookies" => &mut self.attach_cookies,
                "uretprobe_syscall" => &mut self.uretprobe_syscall,
                "atomic_fetch" => &mut self.atomic_fetch,
                "membarrier" => &mut self.membarrier,
                "lockdown" => &mut self.lockdown,
                "perf_event_paranoid" => &mut self.perf_event_paranoid,
                _ => continue,
            };
            *probe = Probe::no("hidden by TRACER_TEST_WITHOUT");
        }
    }

    /// Probes the running kernel.
    pub fn probe() -> Features {
        let privileges = probe_privileges();
        let bpf_syscall = probe_bpf_syscall(privileges.have);
        let bpf = bpf_syscall.is_yes();
        // Without bpf() nothing below that needs it can be asked.
        let ask = |probe: fn() -> Probe| {
            if bpf {
                probe()
            } else {
                Probe::unknown("cannot tell without the bpf() system call")
            }
        };
        let tracing = tracefs_dir();
        let (release, version) = kernel_release();
        Features {
            release,
            version,
            mmapable_maps: ask(|| {
                probe_map(
                    sys_map::ARRAY,
                    4,
                    8,
                    1,
                    sys_map::F_MMAPABLE,
                    "BPF_F_MMAPABLE",
                )
            }),
            ring_buffer: ask(|| probe_map(sys_map::RINGBUF, 0, 0, page_size(), 0, "RINGBUF")),
            uprobes: probe_uprobes(tracing.as_deref()),
            tracefs: match &tracing {
                Some(dir) => Probe::yes(format!("mounted at {}", dir.display())),
                None => Probe::no(format!(
                    "not mounted (as root the tracer mounts it: mount -t tracefs tracefs {})",
                    super::tracefs::TRACEFS
                )),
            },
            syscall_tracepoints: probe_tracepoint(tracing.as_deref(), "syscalls/sys_enter_mmap"),
            sched_tracepoints: probe_tracepoint(tracing.as_deref(), "sched/sched_process_fork"),
            btf: probe_btf(),
            bpf_loop: ask(|| probe_helper(HELPER_LOOP, "bpf_loop")),
            batch_ops: ask(probe_batch),
            uprobe_multi: ask(|| probe_multi_link(sys::BPF_TRACE_UPROBE_MULTI)),
            uprobe_sessions: ask(|| probe_multi_link(sys::BPF_TRACE_UPROBE_SESSION)),
            attach_cookies: ask(|| probe_helper(HELPER_ATTACH_COOKIE, "bpf_get_attach_cookie")),
            uretprobe_syscall: probe_uretprobe_syscall(tracing.as_deref()),
            atomic_fetch: ask(probe_atomic_fetch),
            membarrier: probe_membarrier(),
            lockdown: probe_lockdown(),
            perf_event_paranoid: probe_paranoid(privileges.is_yes()),
            privileges,
            bpf_syscall,
        }
    }
}

/// The paths the tracer takes on this kernel, one per feature it can do
/// without.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paths {
    /// Maps read in batches (thousands of entries per syscall), else key
    /// by key (two syscalls per entry).
    pub batch_reads: bool,
    /// The CFI walk loops with bpf_loop, else with an unrolled loop.
    pub cfi_bpf_loop: bool,
    /// Allocation functions may be probed with uprobe sessions (where they
    /// pay: `--sample-rate`), else always with a uprobe and a uretprobe.
    pub sessions: bool,
    /// Slots of stacks that hold nothing are recycled (needs a grace period).
    pub reclaim: bool,
    /// The mmap family is followed (syscall tracepoints).
    pub mappings: bool,
    /// Forks and execs are seen (sched tracepoints).
    pub proc_events: bool,
}

impl Paths {
    /// Unknown counts as present where trying costs nothing (a batch read
    /// that fails falls back; a tracepoint that fails is said), and as
    /// absent where a wrong guess would fail later.
    pub fn choose(features: &Features) -> Paths {
        Paths {
            batch_reads: !features.batch_ops.is_no(),
            cfi_bpf_loop: features.bpf_loop.is_yes(),
            sessions: features.uprobe_sessions.is_yes() && features.attach_cookies.is_yes(),
            reclaim: features.membarrier.is_yes(),
            mappings: !features.syscall_tracepoints.is_no(),
            proc_events: !features.sched_tracepoints.is_no(),
        }
    }

    /// Each choice as (what, the path taken), for `-v` and `doctor`.
    pub fn describe(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            (
                "map reads",
                if self.batch_reads {
                    "batch (BPF_MAP_LOOKUP_BATCH)"
                } else {
                    "key by key (no batch map operations)"
                },
            ),
            (
                "CFI walk",
                if self.cfi_bpf_loop {
                    "bpf_loop"
                } else {
                    "unrolled loop (no bpf_loop)"
                },
            ),
            (
                "allocation probes",
                if self.sessions {
                    "uprobe+uretprobe per function; with --sample-rate one uprobe session (uprobe_multi) link per object"
                } else {
                    "uprobe+uretprobe per function (no uprobe sessions)"
                },
            ),
            (
                "stack slot reclamation",
                if self.reclaim {
                    "on (membarrier grace periods)"
                } else {
                    "off (no membarrier grace period): --max-stacks bounds the distinct stacks of a run"
                },
            ),
            (
                "mmap tracking",
                if self.mappings {
                    "syscall tracepoints"
                } else {
                    "off (no syscall tracepoints)"
                },
            ),
            (
                "forks and execs",
                if self.proc_events {
                    "sched tracepoints"
                } else {
                    "off (no sched tracepoints): no --follow-forks, an exec is not re-probed"
                },
            ),
        ]
    }
}

/// The map types and flags the probes create.
mod sys_map {
    pub const HASH: u32 = 1;
    pub const ARRAY: u32 = 2;
    pub const RINGBUF: u32 = 27;
    pub const F_MMAPABLE: u32 = 1 << 10;
}

const PROG_TYPE_KPROBE: u32 = 2;
const HELPER_ATTACH_COOKIE: i32 = 174;
const HELPER_LOOP: i32 = 181;

/// `r0 = 0; exit`.
const RETURN_0: [u64; 2] = [sys::insn(0xb7, 0, 0, 0, 0), sys::insn(0x95, 0, 0, 0, 0)];

fn kernel_release() -> (String, String) {
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut name) } != 0 {
        return ("unknown".into(), String::new());
    }
    let text = |field: &[libc::c_char]| {
        unsafe { std::ffi::CStr::from_ptr(field.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    (text(&name.release), text(&name.version))
}

fn page_size() -> u32 {
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as u32
}

fn errno_name(error: &io::Error) -> String {
    let name = match error.raw_os_error() {
        Some(libc::EPERM) => "EPERM",
        Some(libc::EACCES) => "EACCES",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::ENOSYS) => "ENOSYS",
        Some(libc::EBADF) => "EBADF",
        Some(libc::ENOTSUP) => "EOPNOTSUPP",
        Some(libc::E2BIG) => "E2BIG",
        Some(libc::ENOMEM) => "ENOMEM",
        _ => return error.to_string(),
    };
    format!("{name}: {error}")
}

fn probe_privileges() -> Probe {
    match crate::target::tasks::own_effective_capabilities() {
        Some(caps) if privileges::has_capabilities(caps) => Probe::yes(if caps & (1 << 21) != 0 {
            "CAP_SYS_ADMIN"
        } else {
            "CAP_BPF and CAP_PERFMON"
        }),
        Some(_) => Probe::no("neither CAP_SYS_ADMIN nor CAP_BPF with CAP_PERFMON"),
        None => Probe::unknown("/proc/self/status unreadable"),
    }
}

/// EPERM says something about the kernel only when the tracer has the
/// privileges (then lockdown or a security module refuses).
fn probe_bpf_syscall(privileges: Have) -> Probe {
    match sys::create_map(sys_map::ARRAY, 4, 8, 1, 0) {
        Ok(_) => Probe::yes("maps can be created"),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            Probe::no("not built in (ENOSYS): CONFIG_BPF_SYSCALL")
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) && privileges != Have::Yes => {
            Probe::unknown("refused without privileges (EPERM)")
        }
        Err(e) => Probe::no(format!("creating a map: {}", errno_name(&e))),
    }
}

fn probe_map(map_type: u32, key: u32, value: u32, entries: u32, flags: u32, name: &str) -> Probe {
    match sys::create_map(map_type, key, value, entries, flags) {
        Ok(_) => Probe::yes(format!("{name} map created")),
        Err(e) => Probe::no(format!("{name} map refused: {}", errno_name(&e))),
    }
}

/// A program calling helper `id` with whatever is in its registers: a
/// kernel without the helper says so in the verifier log ("invalid func",
/// "unknown func"); one with it loads it or objects to its arguments (as
/// libbpf's `libbpf_probe_bpf_helper`).
fn probe_helper(id: i32, name: &str) -> Probe {
    let insns = [sys::insn(0x85, 0, 0, 0, id), RETURN_0[0], RETURN_0[1]];
    match sys::load_program(PROG_TYPE_KPROBE, 0, &insns) {
        Ok(_) => Probe::yes(format!("{name} verified")),
        Err((e, log))
            if log.contains("invalid func ")
                || log.contains("unknown func ")
                || log.contains("cannot use helper ") =>
        {
            Probe::no(format!(
                "{name} unknown to the verifier ({})",
                errno_name(&e)
            ))
        }
        Err((e, log)) if log.is_empty() => Probe::unknown(format!(
            "program refused without a reason: {}",
            errno_name(&e)
        )),
        Err(_) => Probe::yes(format!("{name} known to the verifier")),
    }
}

fn probe_batch() -> Probe {
    let map = match sys::create_map(sys_map::HASH, 8, 8, 16, 0) {
        Ok(map) => map,
        Err(e) => return Probe::unknown(format!("hash map refused: {}", errno_name(&e))),
    };
    match sys::for_each::<u64, u64>(map.as_fd(), |_, _| {}) {
        Ok(()) => Probe::yes("BPF_MAP_LOOKUP_BATCH on hash maps"),
        Err(sys::BatchError::Unsupported(e)) => {
            Probe::no(format!("BPF_MAP_LOOKUP_BATCH refused: {}", errno_name(&e)))
        }
        Err(sys::BatchError::Failed(e)) => Probe::unknown(format!("batch read: {e}")),
    }
}

/// A `uprobe_multi` link of `attach_type` on "/": a kernel that knows the
/// attach type gets as far as the path and says EBADF (a directory), as
/// libbpf's `probe_uprobe_multi_link` checks.
fn probe_multi_link(attach_type: u32) -> Probe {
    let name = if attach_type == sys::BPF_TRACE_UPROBE_SESSION {
        "uprobe session"
    } else {
        "uprobe_multi"
    };
    let program = match sys::load_program(PROG_TYPE_KPROBE, attach_type, &RETURN_0) {
        Ok(program) => program,
        Err((e, _)) => return Probe::no(format!("{name} program refused: {}", errno_name(&e))),
    };
    match sys::try_uprobe_multi_link(&program, attach_type, c"/") {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => {
            Probe::yes(format!("{name} links (BPF_LINK_CREATE)"))
        }
        Ok(_) => Probe::unknown(format!("{name} link on / was accepted")),
        Err(e) => Probe::no(format!("{name} link refused: {}", errno_name(&e))),
    }
}

/// `r1 = 0; *(u64 *)(r10 - 8) = r1; r1 = 1;
/// r1 = atomic_fetch_add((u64 *)(r10 - 8), r1); r0 = 0; exit`.
fn probe_atomic_fetch() -> Probe {
    let insns = [
        sys::insn(0xb7, 1, 0, 0, 0),
        sys::insn(0x7b, 10, 1, -8, 0),
        sys::insn(0xb7, 1, 0, 0, 1),
        // BPF_STX | BPF_DW | BPF_ATOMIC, imm BPF_ADD | BPF_FETCH.
        sys::insn(0xdb, 10, 1, -8, 1),
        RETURN_0[0],
        RETURN_0[1],
    ];
    match sys::load_program(PROG_TYPE_KPROBE, 0, &insns) {
        Ok(_) => Probe::yes("atomic fetch-and-add verified"),
        Err((e, _)) => Probe::no(format!("refused: {}", errno_name(&e))),
    }
}

/// Where tracefs is mounted, if it is (the mount table says so to anyone;
/// the directory itself is root's).
fn tracefs_dir() -> Option<std::path::PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mounted: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let (_, dir, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == "tracefs").then_some(dir)
        })
        .collect();
    [super::tracefs::TRACEFS, "/sys/kernel/debug/tracing"]
        .into_iter()
        .find(|dir| mounted.contains(dir))
        .map(std::path::PathBuf::from)
}

fn probe_uprobes(tracing: Option<&Path>) -> Probe {
    let pmu = Path::new("/sys/bus/event_source/devices/uprobe/type");
    if let Ok(kind) = fs::read_to_string(pmu) {
        return Probe::yes(format!("perf uprobe PMU (type {})", kind.trim()));
    }
    let Some(dir) = tracing else {
        return Probe::unknown("no uprobe PMU; tracefs not mounted to look further");
    };
    let events = dir.join("uprobe_events");
    match fs::metadata(&events) {
        Ok(_) => Probe::yes(events.display().to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Probe::no("no uprobe PMU, no uprobe_events in tracefs")
        }
        Err(e) => Probe::unknown(format!("no uprobe PMU; {}: {e}", events.display())),
    }
}

fn probe_tracepoint(tracing: Option<&Path>, event: &str) -> Probe {
    let Some(dir) = tracing else {
        return Probe::unknown("tracefs not mounted (the tracer mounts it as root)");
    };
    let id = dir.join("events").join(event).join("id");
    match fs::read_to_string(&id) {
        Ok(_) => Probe::yes(event.to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Probe::no(format!("no {event}")),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            Probe::unknown(format!("{}: {e}", id.display()))
        }
        Err(e) => Probe::no(format!("{}: {e}", id.display())),
    }
}

fn probe_btf() -> Probe {
    match fs::metadata("/sys/kernel/btf/vmlinux") {
        Ok(m) => Probe::yes(format!(
            "/sys/kernel/btf/vmlinux ({} KiB)",
            m.len() / 1024
        )),
        Err(_) => Probe::no(
            "no /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF); not needed: the programs use no CO-RE",
        ),
    }
}

/// The syscall's own tracepoint, else the kernel's symbol table. (Calling
/// it from anywhere but the trampoline is answered with SIGILL.)
fn probe_uretprobe_syscall(tracing: Option<&Path>) -> Probe {
    if let Some(dir) = tracing {
        if dir.join("events/syscalls/sys_enter_uretprobe").exists() {
            return Probe::yes("sys_uretprobe: returns trapped with a syscall, not int3");
        }
    }
    let Ok(symbols) = fs::read_to_string("/proc/kallsyms") else {
        return Probe::unknown("neither its tracepoint nor /proc/kallsyms readable");
    };
    if symbols
        .lines()
        .any(|l| l.ends_with(" __x64_sys_uretprobe") || l.ends_with(" __do_sys_uretprobe"))
    {
        Probe::yes("sys_uretprobe: returns trapped with a syscall, not int3")
    } else {
        Probe::no("no sys_uretprobe: returns trapped with int3 (slower)")
    }
}

fn probe_membarrier() -> Probe {
    const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let commands = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0) };
    if commands < 0 {
        return Probe::no(format!(
            "membarrier: {}",
            errno_name(&io::Error::last_os_error())
        ));
    }
    if commands & MEMBARRIER_CMD_GLOBAL == 0 {
        return Probe::no("MEMBARRIER_CMD_GLOBAL not offered (nohz_full?)");
    }
    if cpus < 2 {
        return Probe::no("one CPU online: membarrier does not wait");
    }
    Probe::yes("MEMBARRIER_CMD_GLOBAL waits for an RCU grace period")
}

/// The active mode is the bracketed one: "none [integrity] confidentiality".
pub fn lockdown_mode(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
}

fn probe_lockdown() -> Probe {
    let Ok(text) = fs::read_to_string("/sys/kernel/security/lockdown") else {
        return Probe::yes(
            "no /sys/kernel/security/lockdown (no lockdown LSM, or securityfs not mounted)",
        );
    };
    match lockdown_mode(&text) {
        Some("none") | None => Probe::yes("none"),
        Some("integrity") => Probe::yes("integrity: eBPF and uprobes allowed"),
        Some(mode) => Probe::no(format!(
            "{mode}: tracefs and reads of kernel memory refused; boot with lockdown=none (or without Secure Boot's lockdown)"
        )),
    }
}

fn probe_paranoid(privileged: bool) -> Probe {
    let Ok(text) = fs::read_to_string("/proc/sys/kernel/perf_event_paranoid") else {
        return Probe::unknown("/proc/sys/kernel/perf_event_paranoid unreadable");
    };
    let level: i32 = text.trim().parse().unwrap_or(i32::MAX);
    let detail = format!("level {level}; root and CAP_PERFMON are not bound by it");
    if privileged || level <= 2 {
        Probe::yes(detail)
    } else {
        Probe::no(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel with everything, to take things away from.
    fn everything() -> Features {
        let y = || Probe::yes("");
        Features {
            release: "test".into(),
            version: String::new(),
            privileges: y(),
            bpf_syscall: y(),
            mmapable_maps: y(),
            ring_buffer: y(),
            uprobes: y(),
            tracefs: y(),
            syscall_tracepoints: y(),
            sched_tracepoints: y(),
            btf: y(),
            bpf_loop: y(),
            batch_ops: y(),
            uprobe_multi: y(),
            uprobe_sessions: y(),
            attach_cookies: y(),
            uretprobe_syscall: y(),
            atomic_fetch: y(),
            membarrier: y(),
            lockdown: y(),
            perf_event_paranoid: y(),
        }
    }

    #[test]
    fn a_full_kernel_takes_every_fast_path() {
        let f = everything();
        assert!(f.blockers().is_empty());
        let paths = Paths::choose(&f);
        assert_eq!(
            paths,
            Paths {
                batch_reads: true,
                cfi_bpf_loop: true,
                sessions: true,
                reclaim: true,
                mappings: true,
                proc_events: true
            }
        );
        assert!(paths
            .describe()
            .iter()
            .any(|(what, path)| *what == "map reads" && path.starts_with("batch")));
    }

    #[test]
    fn a_5_10_kernel_reads_batches_and_walks_unrolled() {
        // What 5.10 lacks (kernels.md): bpf_loop, uprobe_multi, sessions, cookies.
        let mut f = everything();
        f.bpf_loop = Probe::no("");
        f.uprobe_multi = Probe::no("");
        f.uprobe_sessions = Probe::no("");
        f.attach_cookies = Probe::no("");
        f.uretprobe_syscall = Probe::no("");
        f.atomic_fetch = Probe::no("");
        let paths = Paths::choose(&f);
        assert!(paths.batch_reads);
        assert!(!paths.cfi_bpf_loop);
        assert!(!paths.sessions);
        assert!(f.blockers().is_empty(), "5.10 can run: {:?}", f.blockers());
        let described = paths.describe();
        assert!(described.contains(&("CFI walk", "unrolled loop (no bpf_loop)")));
        assert!(described.iter().any(
            |(what, path)| *what == "allocation probes" && path.contains("no uprobe sessions")
        ));
    }

    #[test]
    fn sessions_need_cookies_too() {
        let mut f = everything();
        f.attach_cookies = Probe::no("");
        assert!(!Paths::choose(&f).sessions);
        f.attach_cookies = Probe::unknown("");
        assert!(!Paths::choose(&f).sessions, "unknown: not guessed");
    }

    #[test]
    fn without_batch_ops_reads_go_key_by_key() {
        let mut f = everything();
        f.batch_ops = Probe::no("");
        assert!(!Paths::choose(&f).batch_reads);
        // Unknown: try batches, which fall back by themselves.
        f.batch_ops = Probe::unknown("");
        assert!(Paths::choose(&f).batch_reads);
    }

    #[test]
    fn missing_tracepoints_and_membarrier_turn_their_features_off() {
        let mut f = everything();
        f.syscall_tracepoints = Probe::no("");
        f.sched_tracepoints = Probe::no("");
        f.membarrier = Probe::no("");
        let paths = Paths::choose(&f);
        assert!(!paths.mappings && !paths.proc_events && !paths.reclaim);
        assert!(f.blockers().is_empty(), "the heap is traced without them");
    }

    #[test]
    fn what_cannot_be_done_without_is_one_line_each_with_its_fix() {
        let mut f = everything();
        f.privileges = Probe::no("");
        assert_eq!(f.blockers(), [NEED_PRIVILEGES]);

        let mut f = everything();
        f.uprobes = Probe::no("no uprobe PMU");
        let b = f.blockers();
        assert_eq!(b.len(), 1);
        assert!(
            b[0].contains("no uprobes") && b[0].contains("CONFIG_UPROBE_EVENTS"),
            "{b:?}"
        );

        let mut f = everything();
        f.bpf_syscall = Probe::no("creating a map: EPERM");
        f.lockdown = Probe::no("confidentiality");
        let b = f.blockers();
        assert!(
            b[0].contains("refuses eBPF") && b[0].contains("lockdown"),
            "{b:?}"
        );

        let mut f = everything();
        f.ring_buffer = Probe::no("");
        assert!(f.blockers()[0].contains("5.8"));
        for blocker in f.blockers() {
            assert!(!blocker.contains('\n'));
        }
    }

    #[test]
    fn unknown_blocks_nothing() {
        let mut f = everything();
        f.privileges = Probe::unknown("");
        f.ring_buffer = Probe::unknown("");
        f.uprobes = Probe::unknown("");
        assert!(f.blockers().is_empty());
    }

    #[test]
    fn features_can_be_hidden_for_tests() {
        let mut f = everything();
        f.hide(["batch_ops", "uprobe_sessions", "nonsense"].into_iter());
        assert!(f.batch_ops.is_no() && f.uprobe_sessions.is_no());
        assert!(f.bpf_loop.is_yes());
        // Every listed key can be hidden.
        let keys: Vec<&str> = everything().list().iter().map(|(k, _, _)| *k).collect();
        f.hide(keys.iter().copied());
        assert!(f.list().iter().all(|(_, _, p)| p.is_no()));
    }

    #[test]
    fn lockdown_mode_is_the_bracketed_word() {
        assert_eq!(
            lockdown_mode("[none] integrity confidentiality\n"),
            Some("none")
        );
        assert_eq!(
            lockdown_mode("none integrity [confidentiality]"),
            Some("confidentiality")
        );
        assert_eq!(lockdown_mode(""), None);
    }

    #[test]
    fn instructions_are_encoded_as_the_kernel_reads_them() {
        // *(u64 *)(r10 - 8) = r1: code 0x7b, regs 0x1a, off 0xfff8.
        assert_eq!(
            sys::insn(0x7b, 10, 1, -8, 0).to_le_bytes(),
            [0x7b, 0x1a, 0xf8, 0xff, 0, 0, 0, 0]
        );
        assert_eq!(
            sys::insn(0x85, 0, 0, 0, 181).to_le_bytes(),
            [0x85, 0, 0, 0, 181, 0, 0, 0]
        );
    }

    /// On this machine (root, a recent kernel), the probes agree with what
    /// the kernel exports; skipped without privileges.
    #[test]
    fn probes_of_this_kernel() {
        let f = Features::probe();
        if !f.privileges.is_yes() || !f.bpf_syscall.is_yes() {
            eprintln!("skipped: no privileges");
            return;
        }
        assert_eq!(
            f.btf.is_yes(),
            Path::new("/sys/kernel/btf/vmlinux").exists()
        );
        assert!(f.ring_buffer.is_yes() && f.mmapable_maps.is_yes(), "{f:?}");
        assert!(f.batch_ops.is_yes(), "{f:?}");
        assert!(f.blockers().is_empty(), "{:?}", f.blockers());
    }
}
