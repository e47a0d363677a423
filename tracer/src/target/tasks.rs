//! Processes and threads by PID, through /proc: which threads live, a
//! process's parent, children and entry point, whether two processes run
//! the same program, where its uprobe trampoline is, which PIDs have a
//! name. (`process::Process` is one opened process.)

use std::{fs, io, os::unix::fs::MetadataExt as _, path::Path};

use super::{
    memory_map::Mapping,
    process::{is_exited_state, stat_is_alive, status_field, task_ids, Process},
};

/// Device and inode of a file: one file can have several paths (/lib and
/// /usr/lib, a container's root).
pub fn file_identity(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Thread `tid` of process `pid` has not exited (the state in
/// /proc/PID/task/TID/stat is not Z or X); false if unreadable.
pub fn is_task_alive(pid: u32, tid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).is_ok_and(|s| stat_is_alive(&s))
}

/// Threads of `pid` other than its main thread are alive and not being
/// killed by an exit_group (which leaves SIGKILL pending on each of them).
pub fn other_threads_run_on(pid: u32) -> bool {
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    task_ids(pid).filter(|&tid| tid != pid).any(|tid| {
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
            return false;
        };
        let pending = status_field(&status, "SigPnd:")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .unwrap_or(0);
        let exited = status_field(&status, "State:").is_some_and(is_exited_state);
        pending & SIGKILL_BIT == 0 && !exited
    })
}

/// The parent process of `pid` (PPid in /proc/PID/status).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field(&status, "PPid:")?.parse().ok()
}

/// Task `tid` is a process (its own thread group's leader), alive.
pub fn is_process(tid: u32) -> bool {
    fs::read_to_string(format!("/proc/{tid}/status")).is_ok_and(|status| {
        status_field(&status, "Tgid:").is_some_and(|tgid| tgid.parse() == Ok(tid))
    })
}

/// The program's entry address (AT_ENTRY in /proc/PID/auxv).
pub fn entry_address(pid: u32) -> io::Result<u64> {
    auxv_value(pid, 9)
}

/// A value of process `pid`'s auxiliary vector (AT_ENTRY, AT_BASE...).
pub fn auxv_value(pid: u32, key: u64) -> io::Result<u64> {
    let auxv = fs::read(format!("/proc/{pid}/auxv"))?;
    auxv.chunks_exact(16)
        .map(|pair| {
            (
                u64::from_ne_bytes(pair[..8].try_into().unwrap()),
                u64::from_ne_bytes(pair[8..].try_into().unwrap()),
            )
        })
        .find(|&(k, _)| k == key)
        .map(|(_, value)| value)
        .ok_or_else(|| io::Error::other(format!("no auxv entry {key}")))
}

/// PIDs of the user processes named `comm` (as /proc/PID/comm says), in
/// ascending order, this tracer excluded.
pub fn pids_by_comm(comm: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid: &u32| pid != me)
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
        })
        // Kernel threads have no memory of their own to trace.
        .filter(|pid| fs::read_link(format!("/proc/{pid}/exe")).is_ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// Some live thread of `pid`.
pub fn live_task(pid: u32) -> Option<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .find(|&tid| is_task_alive(pid, tid))
}

/// The children of process `pid` (of all its threads).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Both processes run the same executable file (compared by inode: a
/// forked child that did not exec, whatever path it was started by).
pub fn same_program(a: u32, b: u32) -> bool {
    let exe = |pid: u32| file_identity(Path::new(&format!("/proc/{pid}/exe")));
    let a = exe(a);
    a.is_some() && a == exe(b)
}

/// The start of the process's `[uprobes]` mapping (the uretprobe
/// trampoline page the kernel maps at its first probe hit), if any.
pub fn uprobes_mapping_start(pid: u32) -> Option<u64> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines()
        .find(|l| l.ends_with(" [uprobes]"))
        .and_then(|l| l.split('-').next())
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
}

/// /proc/PID/cmdline is not empty (it is while a process is inside execve).
pub fn has_command_line(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// Process `pid`, once it is out of execve. Heard of from the exec
/// tracepoint, a process may still be inside execve, where /proc shows it
/// without a memory map (as if it had exited) and with an empty command
/// line: wait a little (up to ~50 ms) for it to come out.
pub fn wait_out_of_execve(pid: u32) -> anyhow::Result<Process> {
    let mut tries = 0;
    loop {
        let opened = Process::open(pid)
            .map_err(anyhow::Error::from)
            .and_then(|p| match p.maps() {
                Ok(maps) if !maps.is_empty() && has_command_line(pid) => Ok(p),
                Ok(_) => Err(anyhow::anyhow!("PID {pid} has no memory map")),
                Err(e) => Err(e.into()),
            });
        match opened {
            Ok(process) => return Ok(process),
            Err(e) if tries == 25 => return Err(e),
            Err(_) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }
}

/// The executable ranges of the process's dynamic loader (its PT_INTERP,
/// matched by inode: musl's loader is a symlink to its libc).
pub fn loader_code(process: &Process) -> Vec<(u64, u64)> {
    let Ok(exe) = process.exe() else {
        return Vec::new();
    };
    let Some(interp) = super::elf::ElfInfo::read(&process.host_path(&exe))
        .ok()
        .and_then(|info| info.interpreter)
    else {
        return Vec::new();
    };
    let Ok(meta) = std::fs::metadata(process.host_path(&interp)) else {
        return Vec::new();
    };
    process
        .maps()
        .unwrap_or_default()
        .iter()
        .filter(|m| m.executable && m.inode == meta.ino())
        .map(|m| (m.start, m.end))
        .collect()
}

/// The program break now: the end of the `[heap]` mapping, or the start of
/// the break area (/proc/PID/stat field 47) while there is none.
pub fn program_break(process: &Process) -> Option<u64> {
    if let Ok(maps) = process.maps() {
        if let Some(heap) = maps.iter().find(|m| m.path.as_deref() == Some("[heap]")) {
            return Some(heap.end);
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", process.pid)).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3 (state); start_brk is field 47.
    rest.split_whitespace().nth(47 - 3)?.parse().ok()
}

/// Effective capability bits of this process (from /proc/self/status).
pub fn own_effective_capabilities() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The bytes of the file behind a mapping of `process`: through
/// map_files, which reaches it even if it was deleted or replaced on disk;
/// `path` (in the process's view) is the fallback.
pub fn mapped_file(process: &Process, mapping: &Mapping, path: &str) -> Option<Vec<u8>> {
    fs::read(format!(
        "/proc/{}/map_files/{:x}-{:x}",
        process.pid, mapping.start, mapping.end
    ))
    .or_else(|_| fs::read(process.host_path(path)))
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_and_thread() {
        let me = std::process::id();
        assert!(is_task_alive(me, me));
        assert_eq!(live_task(me).map(|t| is_task_alive(me, t)), Some(true));
        assert!(same_program(me, me));
        assert!(has_command_line(me));
    }

    #[test]
    fn a_forked_child_runs_our_program_and_is_listed() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id();
        assert!(children(me).contains(&child.id()));
        assert!(!same_program(me, child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    #[test]
    fn task_queries_on_our_own_process() {
        let me = std::process::id();
        assert!(is_task_alive(me, me));
        assert!(is_process(me));
        assert_eq!(parent_pid(me), Some(unsafe { libc::getppid() } as u32));
        assert!(entry_address(me).is_ok_and(|entry| entry != 0));
        assert!(!stat_is_alive("12 (a) b) Z 1 2"));
        assert!(stat_is_alive("12 (a) Z) S 1 2"));
    }
}
