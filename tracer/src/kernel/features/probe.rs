//! How `Features` are asked of the running kernel: a tiny map, program or
//! link per capability (made through `sys` and closed at once), whose
//! success or errno says whether the kernel has it, as libbpf's feature
//! probes do; and the files the kernel exports.

use std::{fs, io, os::fd::AsFd as _, path::Path};

use super::{Features, Have, Probe};
use crate::kernel::{privileges, sys, tracefs::TRACEFS};

impl Features {
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
                    TRACEFS
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
            task_pt_regs: ask(|| probe_helper(HELPER_TASK_PT_REGS, "bpf_task_pt_regs")),
            membarrier: probe_membarrier(),
            lockdown: probe_lockdown(),
            perf_event_paranoid: probe_paranoid(privileges.is_yes()),
            privileges,
            bpf_syscall,
        }
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
const HELPER_TASK_PT_REGS: i32 = 175;
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
    [TRACEFS, "/sys/kernel/debug/tracing"]
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
