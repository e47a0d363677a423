//! The traced process as seen through /proc: does it exist, what is it
//! called, what is mapped, and how to reach its files (through
//! `/proc/PID/root`, so that a process in another mount namespace works).

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::procmaps::{self, Mapping};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no process with PID {0}")]
    NoSuchProcess(u32),
    #[error("PID {0} is a kernel thread; only user processes have heap allocations to trace")]
    KernelThread(u32),
    #[error("PID {pid} has exited")]
    Exited { pid: u32 },
    #[error("cannot read {path}: {source}")]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("cannot parse {path}: {source}")]
    Malformed {
        path: PathBuf,
        source: procmaps::ParseError,
    },
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
        if status_field(&status, "State:").is_some_and(|s| s.starts_with('Z') || s.starts_with('X'))
        {
            return Err(TargetError::Exited { pid });
        }
        // Kernel threads have no mm: no VmSize line and an empty maps file.
        if status_field(&status, "VmSize:").is_none() {
            return Err(TargetError::KernelThread(pid));
        }
        let root = proc_dir.join("root");
        let same_root = match (fs::metadata(&root), fs::metadata("/")) {
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
        // Field 3 is the state; a zombie has exited.
        let running = |stat: &str| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start())
                .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
        };
        match read_proc_file(self.pid, "stat") {
            Ok(stat) if running(&stat) => true,
            Ok(_) => fs::read_dir(format!("/proc/{}/task", self.pid)).is_ok_and(|tasks| {
                tasks.filter_map(Result::ok).any(|task| {
                    fs::read_to_string(task.path().join("stat")).is_ok_and(|s| running(&s))
                })
            }),
            Err(_) => false,
        }
    }

    pub fn maps(&self) -> Result<Vec<Mapping>, TargetError> {
        let path = PathBuf::from(format!("/proc/{}/maps", self.pid));
        let text =
            fs::read_to_string(&path).map_err(|source| self.read_error(path.clone(), source))?;
        if text.is_empty() && !self.is_alive() {
            return Err(TargetError::Exited { pid: self.pid });
        }
        procmaps::parse(&text).map_err(|source| TargetError::Malformed { path, source })
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
            .map_err(|source| self.read_error(link, source))
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
        fs::read_dir(format!("/proc/{}/task", self.pid))
            .map(|dir| {
                dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn read_error(&self, path: PathBuf, source: io::Error) -> TargetError {
        if !self.is_alive() {
            TargetError::Exited { pid: self.pid }
        } else {
            TargetError::Unreadable { path, source }
        }
    }
}

fn read_proc_bytes(pid: u32, name: &str) -> Result<Vec<u8>, TargetError> {
    let path = PathBuf::from(format!("/proc/{pid}/{name}"));
    fs::read(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => TargetError::NoSuchProcess(pid),
        _ => TargetError::Unreadable { path, source },
    })
}

fn read_proc_file(pid: u32, name: &str) -> Result<String, TargetError> {
    read_proc_bytes(pid, name).map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
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
