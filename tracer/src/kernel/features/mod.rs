//! What the running kernel offers the tracer, probed rather than read off
//! the version number (distributions backport features, and leave some
//! out): tiny maps, programs and links made and closed at once (`sys`),
//! and the files the kernel exports. `Paths` is what the tracer does
//! because of it; `blockers` what keeps it from running at all.
//! Probed once per run (`detected`); `tracer doctor` shows all of it.
//! `probe` asks the kernel; this file says what follows from the answers.

mod probe;

use std::sync::OnceLock;

use super::error::NEED_PRIVILEGES;

pub use self::probe::lockdown_mode;

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
    /// bpf_task_pt_regs (5.15, with bpf_get_current_task_btf from 5.11):
    /// the mmap programs find the function that called the syscall wrapper
    /// from the user registers.
    pub task_pt_regs: Probe,
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
            (
                "task_pt_regs",
                "bpf_task_pt_regs helper",
                &self.task_pt_regs,
            ),
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
                "task_pt_regs" => &mut self.task_pt_regs,
                "membarrier" => &mut self.membarrier,
                "lockdown" => &mut self.lockdown,
                "perf_event_paranoid" => &mut self.perf_event_paranoid,
                _ => continue,
            };
            *probe = Probe::no("hidden by TRACER_TEST_WITHOUT");
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
    /// Programs read attach cookies (5.15+): a probe placed past where an
    /// argument moved to another register gets a cookie saying which; else
    /// the entry program finds it in `MOVED_ARGS` by the probe's page offset
    /// (`probes::MOVED_KEYED`).
    pub cookies: bool,
    /// Allocation functions may be probed with uprobe sessions (where they
    /// pay: `--sample-rate`), else always with a uprobe and a uretprobe.
    pub sessions: bool,
    /// Slots of stacks that hold nothing are recycled (needs a grace period).
    pub reclaim: bool,
    /// The mmap family is followed (syscall tracepoints).
    pub mappings: bool,
    /// Why not, when not (reports then say mappings were not traced).
    pub mappings_off: &'static str,
    /// The mmap programs read the user registers at the syscall
    /// (bpf_task_pt_regs, 5.15, with bpf_get_current_task_btf, 5.11): a
    /// mapping's stack is walked from them (by CFI in CFI mode) and starts
    /// at the function that called libc's wrapper. Else (a global set at
    /// load time turns the call off, so the programs still load) the
    /// kernel's frame-pointer walk alone, which skips it.
    pub mapping_callers: bool,
    /// Forks and execs are seen (sched tracepoints).
    pub proc_events: bool,
}

impl Paths {
    /// Unknown counts as present where trying costs nothing (a batch read
    /// that fails falls back; a tracepoint that fails is said), and as
    /// absent where a wrong guess would fail later.
    pub fn choose(features: &Features) -> Paths {
        let cookies = features.attach_cookies.is_yes();
        let mappings_off = if features.syscall_tracepoints.is_no() {
            "off (no syscall tracepoints): mmap'ed memory is not traced"
        } else {
            ""
        };
        Paths {
            batch_reads: !features.batch_ops.is_no(),
            cookies,
            sessions: features.uprobe_sessions.is_yes() && cookies,
            reclaim: features.membarrier.is_yes(),
            mappings: mappings_off.is_empty(),
            mappings_off,
            // A wrong guess would refuse to load: only when known.
            mapping_callers: features.task_pt_regs.is_yes(),
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
            // One path on every kernel: a global BPF function per few
            // frames, verified once, from a bounded loop (no bpf_loop).
            (
                "CFI walk",
                "a global BPF function per 4 frames (no bpf_loop needed)",
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
                "probe placement",
                if self.cookies {
                    "past moved arguments where needed (attach cookies)"
                } else {
                    "past moved arguments where their page offsets differ (no attach cookies: a map by page offset says where the arguments are)"
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
                if !self.mappings {
                    self.mappings_off
                } else if self.mapping_callers {
                    "syscall tracepoints; stacks walked from the user registers (bpf_task_pt_regs) as heap stacks are (CFI, or frame pointers plus the function that called mmap with --unwind fp)"
                } else {
                    "syscall tracepoints; stacks by the kernel's frame-pointer walk alone, also in CFI mode (no bpf_task_pt_regs helper, Linux 5.15+): the function that called mmap/mremap is not recovered, its caller's shows"
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
            task_pt_regs: y(),
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
                cookies: true,
                sessions: true,
                reclaim: true,
                mappings: true,
                mappings_off: "",
                mapping_callers: true,
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
        // What 5.10 lacks (kernels.md): bpf_loop, uprobe_multi, sessions,
        // cookies, bpf_task_pt_regs.
        let mut f = everything();
        f.task_pt_regs = Probe::no("");
        f.bpf_loop = Probe::no("");
        f.uprobe_multi = Probe::no("");
        f.uprobe_sessions = Probe::no("");
        f.attach_cookies = Probe::no("");
        f.uretprobe_syscall = Probe::no("");
        f.atomic_fetch = Probe::no("");
        let paths = Paths::choose(&f);
        assert!(paths.batch_reads);
        assert!(!paths.sessions);
        assert!(!paths.cookies);
        // Mappings are traced, their stacks by the kernel's frame-pointer
        // walk alone: the global keeping bpf_task_pt_regs from the verifier.
        assert!(paths.mappings);
        assert!(!paths.mapping_callers);
        assert!(f.blockers().is_empty(), "5.10 can run: {:?}", f.blockers());
        let described = paths.describe();
        assert!(described
            .iter()
            .any(|(what, path)| *what == "CFI walk" && path.contains("no bpf_loop")));
        assert!(described.iter().any(|(what, path)| *what == "mmap tracking"
            && path.starts_with("syscall tracepoints")
            && path.contains("no bpf_task_pt_regs")
            && path.contains("not recovered")));
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
        assert!(paths
            .describe()
            .iter()
            .any(|(what, path)| *what == "mmap tracking" && path.contains("not traced")));
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
}
