//! The traced process as seen through /proc: does it exist, what is it
//! called, what is mapped, and how to reach its files (through
//! `/proc/PID/root`, so that a process in another mount namespace works).

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::target::memory_map::{self, Mapping};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no process with PID {0}{hint}", hint = hidden_hint())]
    NoSuchProcess(u32),
    #[error("PID {0} is a kernel thread; only user processes have heap allocations to trace")]
    KernelThread(u32),
    #[error("PID {pid} has exited")]
    Exited { pid: u32 },
    /// The reason is in the message, not in `source()`: `{:#}` would print
    /// it twice.
    #[error("cannot read {}: {}", path.display(), describe_io(error))]
    Unreadable { path: PathBuf, error: io::Error },
    #[error("cannot parse {}: {error}", path.display())]
    Malformed {
        path: PathBuf,
        error: memory_map::ParseError,
    },
}

/// Why the kernel refuses a /proc file or directory of a process: another
/// user's process is readable only with CAP_SYS_PTRACE, and `hidepid`
/// mounts of /proc hide it the same way.
const NEED_PTRACE: &str =
    "another user's process needs CAP_SYS_PTRACE; root has it unless it was dropped";

/// An I/O error as the end of a sentence: "permission denied (why)" rather
/// than "Permission denied (os error 13)".
fn describe_io(error: &io::Error) -> String {
    if error.kind() == io::ErrorKind::PermissionDenied {
        return format!("permission denied ({NEED_PTRACE})");
    }
    let text = error.to_string();
    let text = text.split(" (os error").next().unwrap_or_default();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// When this /proc hides other users' processes from us (`hidepid=2` or
/// `4` without CAP_SYS_PTRACE), says so: a missing PID may only be hidden.
fn hidden_hint() -> String {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let hiding = mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, Some("/proc"), Some("proc"), Some(options)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return None;
        };
        options.split(',').find_map(|o| {
            let mode = o.strip_prefix("hidepid=")?;
            matches!(mode, "invisible" | "2" | "ptraceable" | "4").then(|| mode.to_string())
        })
    });
    match hiding {
        Some(mode) if !has_ptrace_capability() => {
            format!(" (or it is hidden: /proc is mounted with hidepid={mode}, and {NEED_PTRACE})")
        }
        _ => String::new(),
    }
}

/// CAP_SYS_PTRACE is in this process's effective set.
fn has_ptrace_capability() -> bool {
    const CAP_SYS_PTRACE: u32 = 19;
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_PTRACE) != 0)
}

#[derive(Debug, Clone)]
pub struct Process {
    pub pid: u32,
    /// Short command name (`/proc/PID/comm`).
    pub comm: String,
    /// Prefix that turns a path inside the process's mount namespace into a
    /// path this tracer can open: "" when the process shares our root, else
    /// `/proc/PID/root`.
    root_prefix: PathBuf,
    /// The process's root directory as the kernel prints paths for it (in
    /// /proc/PID/maps and exe): relative to its mount namespace's root, so a
    /// chroot inside a container shows up as a prefix to strip.
    root_in_namespace: String,
}

impl Process {
    pub fn open(pid: u32) -> Result<Self, TargetError> {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        if pid == 0 || !proc_dir.exists() {
            return Err(TargetError::NoSuchProcess(pid));
        }
        let comm = read_proc_file(pid, "comm")?.trim_end().to_string();
        let status = read_proc_file(pid, "status")?;
        if status_field(&status, "State:").is_some_and(is_exited_state) {
            return Err(TargetError::Exited { pid });
        }
        // Kernel threads have no mm: no VmSize line and an empty maps file.
        // Neither has a process that is exiting (its mm already released):
        // the PF_KTHREAD flag tells them apart.
        if status_field(&status, "VmSize:").is_none() {
            return Err(if is_kernel_thread(pid) {
                TargetError::KernelThread(pid)
            } else {
                TargetError::Exited { pid }
            });
        }
        let root = proc_dir.join("root");
        // Every file of the process is opened through its root: if that is
        // refused, say so now rather than "no allocator found" later.
        let their_root = match fs::metadata(&root) {
            Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
                return Err(read_error(pid, root, error))
            }
            other => other,
        };
        let same_root = match (their_root, fs::metadata("/")) {
            (Ok(theirs), Ok(ours)) => theirs.dev() == ours.dev() && theirs.ino() == ours.ino(),
            _ => false,
        };
        // `unshare -m` keeps the same root directory but not the same
        // mounts: a path there may name another file, or none, here.
        let same_mounts = match (
            fs::read_link(proc_dir.join("ns/mnt")),
            fs::read_link("/proc/self/ns/mnt"),
        ) {
            (Ok(theirs), Ok(ours)) => theirs == ours,
            _ => false,
        };
        let same_root = same_root && same_mounts;
        let root_in_namespace = if same_root {
            "/".to_string()
        } else {
            fs::read_link(&root)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "/".to_string())
        };
        Ok(Process {
            pid,
            comm,
            root_prefix: if same_root { PathBuf::new() } else { root },
            root_in_namespace,
        })
    }

    /// Some thread of the process is still running. (After the main thread
    /// calls `pthread_exit` it stays a zombie while the others run on.)
    pub fn is_alive(&self) -> bool {
        is_running(self.pid)
    }

    pub fn maps(&self) -> Result<Vec<Mapping>, TargetError> {
        let path = PathBuf::from(format!("/proc/{}/maps", self.pid));
        let text =
            fs::read_to_string(&path).map_err(|error| read_error(self.pid, path.clone(), error))?;
        if text.is_empty() && !self.is_alive() {
            return Err(TargetError::Exited { pid: self.pid });
        }
        memory_map::parse(&text).map_err(|error| TargetError::Malformed { path, error })
    }

    /// A path inside the process's mount namespace, as this tracer can open it.
    pub fn host_path(&self, path: &str) -> PathBuf {
        if self.root_prefix.as_os_str().is_empty() {
            return PathBuf::from(path);
        }
        let root = self.root_in_namespace.trim_end_matches('/');
        let inside = match path.strip_prefix(root) {
            Some(rest) if !root.is_empty() && rest.starts_with('/') => rest,
            _ => path,
        };
        self.root_prefix.join(inside.trim_start_matches('/'))
    }

    /// Path of the executable inside the process's mount namespace.
    pub fn exe(&self) -> Result<String, TargetError> {
        let link = PathBuf::from(format!("/proc/{}/exe", self.pid));
        fs::read_link(&link)
            .map(|p| {
                let s = p.to_string_lossy().into_owned();
                s.strip_suffix(" (deleted)")
                    .map(str::to_string)
                    .unwrap_or(s)
            })
            .map_err(|error| read_error(self.pid, link, error))
    }

    /// The full command line, space separated (for reports).
    pub fn command_line(&self) -> String {
        read_proc_bytes(self.pid, "cmdline")
            .map(|bytes| {
                bytes
                    .split(|b| *b == 0)
                    .filter(|arg| !arg.is_empty())
                    .map(|arg| String::from_utf8_lossy(arg).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| self.comm.clone())
    }

    /// One variable of the process's initial environment.
    pub fn environ_var(&self, name: &str) -> Option<String> {
        let bytes = read_proc_bytes(self.pid, "environ").ok()?;
        bytes.split(|b| *b == 0).find_map(|entry| {
            let entry = std::str::from_utf8(entry).ok()?;
            let (key, value) = entry.split_once('=')?;
            (key == name).then(|| value.to_string())
        })
    }

    /// The process's initial environment (unreadable: empty).
    pub fn environ(&self) -> Vec<(String, String)> {
        let Ok(bytes) = read_proc_bytes(self.pid, "environ") else {
            return Vec::new();
        };
        bytes
            .split(|b| *b == 0)
            .filter_map(|entry| {
                let (key, value) = std::str::from_utf8(entry).ok()?.split_once('=')?;
                Some((key.to_string(), value.to_string()))
            })
            .collect()
    }

    /// Resident set size in bytes (VmRSS), if the process still exists.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = read_proc_file(self.pid, "status").ok()?;
        let kib: u64 = status_field(&status, "VmRSS:")?
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// Thread ids currently alive in the process.
    pub fn thread_ids(&self) -> Vec<u32> {
        task_ids(self.pid).collect()
    }
}

/// A file of a process that exists could not be read: it exited meanwhile,
/// or the kernel refuses.
fn read_error(pid: u32, path: PathBuf, error: io::Error) -> TargetError {
    if !is_running(pid) {
        TargetError::Exited { pid }
    } else {
        TargetError::Unreadable { path, error }
    }
}

fn is_running(pid: u32) -> bool {
    match read_proc_file(pid, "stat") {
        Ok(stat) if stat_is_alive(&stat) => true,
        Ok(_) => task_ids(pid).any(|tid| super::tasks::is_task_alive(pid, tid)),
        // Not ours to read (hidepid=noaccess): it exists, which is all we know.
        Err(TargetError::Unreadable { error, .. })
            if error.kind() == io::ErrorKind::PermissionDenied =>
        {
            true
        }
        Err(_) => false,
    }
}

/// The thread ids listed in /proc/PID/task (none if it is gone).
pub(super) fn task_ids(pid: u32) -> impl Iterator<Item = u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
}

/// A task state from /proc (field 3 of stat, `State:` in status) that
/// says it has exited: Z (zombie) or X (dead).
pub(super) fn is_exited_state(state: &str) -> bool {
    state.starts_with('Z') || state.starts_with('X')
}

/// A stat line's state (field 3, after the command in parentheses, which
/// may itself hold ')') is not an exited one.
pub(super) fn stat_is_alive(stat: &str) -> bool {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.trim_start())
        .is_some_and(|state| !is_exited_state(state))
}

fn read_proc_bytes(pid: u32, name: &str) -> Result<Vec<u8>, TargetError> {
    let path = PathBuf::from(format!("/proc/{pid}/{name}"));
    fs::read(&path).map_err(|error| match error.kind() {
        io::ErrorKind::NotFound => TargetError::NoSuchProcess(pid),
        _ => TargetError::Unreadable { path, error },
    })
}

pub(super) fn read_proc_file(pid: u32, name: &str) -> Result<String, TargetError> {
    read_proc_bytes(pid, name).map(|b| String::from_utf8_lossy(&b).into_owned())
}

pub(super) fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .map(str::trim)
}

/// True when `path` names the same file as one of the mappings (used to
/// check that an object found on disk is the one the process has mapped).
pub fn is_mapped(maps: &[Mapping], path: &Path) -> bool {
    maps.iter()
        .any(|m| m.file_path().is_some_and(|p| Path::new(p) == path))
}

/// The task's flags (field 9 of /proc/PID/stat) have PF_KTHREAD.
fn is_kernel_thread(pid: u32) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            // After the comm: state (3), ppid, pgrp, session, tty, tpgid, flags (9).
            rest.split_whitespace().nth(6)?.parse::<u64>().ok()
        })
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_pid_is_a_clear_error() {
        let err = Process::open(u32::MAX - 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("no process with PID {}", u32::MAX - 1)
        );
    }

    #[test]
    fn unreadable_files_say_why_once() {
        let err = TargetError::Unreadable {
            path: "/proc/7/root".into(),
            error: io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(
            format!("{:#}", anyhow::Error::from(err)),
            "cannot read /proc/7/root: permission denied (another user's process needs \
             CAP_SYS_PTRACE; root has it unless it was dropped)"
        );
        let err = TargetError::Unreadable {
            path: "/proc/7/maps".into(),
            error: io::Error::from_raw_os_error(libc::EIO),
        };
        assert_eq!(
            format!("{:#}", anyhow::Error::from(err)),
            "cannot read /proc/7/maps: input/output error"
        );
    }

    #[test]
    fn kernel_thread_is_refused() {
        // PID 2 is kthreadd on every Linux system.
        match Process::open(2) {
            Err(TargetError::KernelThread(2)) => {}
            other => panic!("expected KernelThread, got {other:?}"),
        }
    }

    #[test]
    fn reads_our_own_process() {
        let me = Process::open(std::process::id()).unwrap();
        assert!(me.is_alive());
        let maps = me.maps().unwrap();
        assert!(maps.iter().any(|m| m.executable));
        assert!(!me.exe().unwrap().is_empty());
        assert_eq!(me.host_path("/etc/passwd"), PathBuf::from("/etc/passwd"));
        assert!(me.thread_ids().contains(&std::process::id()));
    }
}
