//! `tracer run`: starts a command so that it is traced from its first
//! allocation and can be read once more just before it exits.
//!
//! The child is started under ptrace (PTRACE_TRACEME), which stops it right
//! after exec, before the dynamic loader has run any of its code; the tracer
//! attaches its probes then and lets it go. PTRACE_O_TRACEEXIT stops it again
//! when it exits, while its memory map still exists, so the final report can
//! be taken and symbolized. Nothing else is changed: signals are passed on,
//! and if the tracer dies the kernel detaches and the command runs on.
//!
//! ptrace requests must come from the thread that started the child, so one
//! dedicated thread owns the child for its whole life.

use std::{
    ffi::OsString,
    io,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc as std_mpsc,
    thread,
};

use anyhow::{anyhow, Result};
use tokio::sync::mpsc;

/// What happens to the child after it was released.
#[derive(Debug)]
pub enum ChildEvent {
    /// Stopped on its way out, memory still mapped. Send on `ack` to let it go.
    Exiting,
    /// Gone; exit code as a shell reports it (128 + signal when killed).
    Exited(i32),
}

/// Run by the child's thread when the started program reaches its entry
/// point, the child stopped there (see `Launched::release_with_entry_hook`).
pub type EntryHook = Box<dyn FnOnce() + Send>;

pub struct Launched {
    pub pid: u32,
    go: std_mpsc::Sender<Option<EntryHook>>,
    ack: std_mpsc::Sender<()>,
    pub events: mpsc::UnboundedReceiver<ChildEvent>,
}

impl Launched {
    /// Lets the child run (after the probes are attached).
    pub fn release(&self) {
        let _ = self.go.send(None);
    }

    /// Lets the child run, and stops it once more at the program's entry
    /// point — the dynamic loader has mapped every library the program
    /// links by then, and none of the program's own code has run — to call
    /// `hook` there (with a temporary breakpoint).
    pub fn release_with_entry_hook(&self, hook: EntryHook) {
        let _ = self.go.send(Some(hook));
    }

    /// Lets an exiting child finish exiting.
    pub fn let_exit(&self) {
        let _ = self.ack.send(());
    }
}

/// Who the command runs as, when the tracer was started through sudo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Credentials {
    /// The invoking user of `sudo`, if we are root because of it.
    pub fn from_sudo() -> Option<Credentials> {
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let uid: u32 = std::env::var("SUDO_UID").ok()?.parse().ok()?;
        let gid: u32 = std::env::var("SUDO_GID").ok()?.parse().ok()?;
        if uid == 0 {
            return None;
        }
        let groups = std::env::var("SUDO_USER")
            .ok()
            .and_then(|user| group_list(&user, gid))
            .unwrap_or_else(|| vec![gid]);
        Some(Credentials { uid, gid, groups })
    }
}

fn group_list(user: &str, gid: u32) -> Option<Vec<u32>> {
    let name = std::ffi::CString::new(user).ok()?;
    let mut count: libc::c_int = 64;
    let mut groups = vec![0 as libc::gid_t; count as usize];
    let found = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
    if found < 0 {
        groups.resize(count as usize, 0);
        if unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) } < 0 {
            return None;
        }
    }
    groups.truncate(count as usize);
    Some(groups)
}

/// Finds the executable a command name refers to, as execvp would.
pub fn resolve_command(name: &Path) -> Result<PathBuf> {
    let check = |p: &Path| -> Option<PathBuf> {
        let meta = p.metadata().ok()?;
        use std::os::unix::fs::PermissionsExt;
        (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then(|| p.to_path_buf())
    };
    if name.as_os_str().is_empty() {
        return Err(anyhow!("empty command"));
    }
    if name.components().count() > 1 || name.starts_with("/") {
        return check(name)
            .ok_or_else(|| anyhow!("cannot run {}: no such executable file", name.display()));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .find_map(|dir| check(&dir.join(name)))
        .ok_or_else(|| anyhow!("cannot run {}: command not found in PATH", name.display()))
}

/// Where a started command's standard streams go.
#[derive(Debug, Default)]
pub enum ChildOutput {
    /// The tracer's own (for `run`).
    #[default]
    Inherit,
    /// stdin from /dev/null, stdout and stderr to this file (for `top`,
    /// which owns the terminal).
    File(std::fs::File),
}

/// Starts `argv` stopped right after exec. The returned child runs only once
/// `release` is called.
pub fn launch(
    argv: &[OsString],
    credentials: Option<Credentials>,
    output: ChildOutput,
) -> Result<Launched> {
    let (pid_tx, pid_rx) = std_mpsc::channel::<Result<u32, String>>();
    let (go_tx, go_rx) = std_mpsc::channel::<Option<EntryHook>>();
    let (ack_tx, ack_rx) = std_mpsc::channel::<()>();
    let (event_tx, event_rx) = mpsc::unbounded_channel();
    let argv = argv.to_vec();
    thread::Builder::new()
        .name("tracer-child".into())
        .spawn(move || {
            let pid = match start_stopped(&argv, credentials, output) {
                Ok(pid) => pid,
                Err(e) => {
                    let _ = pid_tx.send(Err(e));
                    return;
                }
            };
            let _ = pid_tx.send(Ok(pid));
            match go_rx.recv() {
                Err(_) => {
                    // The tracer gave up before releasing the child: detach, so
                    // it is not left stopped.
                    unsafe { libc::ptrace(libc::PTRACE_DETACH, pid as libc::pid_t, 0, 0) };
                    return;
                }
                Ok(Some(hook)) => {
                    if let Some(code) = crate::launch_entry::run_to_entry(pid, hook) {
                        let _ = event_tx.send(ChildEvent::Exited(code));
                        return;
                    }
                }
                Ok(None) => {}
            }
            follow(pid, &event_tx, &ack_rx);
        })?;
    let pid = pid_rx
        .recv()
        .map_err(|_| anyhow!("the child thread ended unexpectedly"))?
        .map_err(|e| anyhow!(e))?;
    Ok(Launched {
        pid,
        go: go_tx,
        ack: ack_tx,
        events: event_rx,
    })
}

fn start_stopped(
    argv: &[OsString],
    credentials: Option<Credentials>,
    output: ChildOutput,
) -> Result<u32, String> {
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]);
    if let ChildOutput::File(file) = output {
        let err = file
            .try_clone()
            .map_err(|e| format!("command output: {e}"))?;
        command
            .stdin(std::process::Stdio::null())
            .stdout(file)
            .stderr(err);
    }
    unsafe {
        command.pre_exec(move || {
            // Only async-signal-safe calls between fork and exec.
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(c) = &credentials {
                if libc::setgroups(c.groups.len(), c.groups.as_ptr()) < 0
                    || libc::setgid(c.gid) < 0
                    || libc::setuid(c.uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", argv[0].to_string_lossy()))?;
    let pid = child.id();
    // The exec stops the child with SIGTRAP.
    let status = wait(pid).map_err(|e| format!("waiting for {pid}: {e}"))?;
    if !libc::WIFSTOPPED(status) {
        return Err(format!(
            "{} exited before it could be traced",
            argv[0].to_string_lossy()
        ));
    }
    let options = libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_TRACEEXEC;
    unsafe {
        libc::ptrace(
            libc::PTRACE_SETOPTIONS,
            pid as libc::pid_t,
            0,
            options as libc::c_long,
        )
    };
    Ok(pid)
}

fn wait(pid: u32) -> io::Result<libc::c_int> {
    let mut status: libc::c_int = 0;
    loop {
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::__WALL) };
        if r >= 0 {
            return Ok(status);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn cont(pid: u32, signal: libc::c_int) {
    unsafe {
        libc::ptrace(
            libc::PTRACE_CONT,
            pid as libc::pid_t,
            0,
            signal as libc::c_long,
        )
    };
}

fn follow(pid: u32, events: &mpsc::UnboundedSender<ChildEvent>, ack: &std_mpsc::Receiver<()>) {
    cont(pid, 0);
    loop {
        let status = match wait(pid) {
            Ok(s) => s,
            Err(_) => {
                let _ = events.send(ChildEvent::Exited(1));
                return;
            }
        };
        if libc::WIFEXITED(status) {
            let _ = events.send(ChildEvent::Exited(libc::WEXITSTATUS(status)));
            return;
        }
        if libc::WIFSIGNALED(status) {
            let _ = events.send(ChildEvent::Exited(128 + libc::WTERMSIG(status)));
            return;
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        let signal = libc::WSTOPSIG(status);
        if signal == libc::SIGTRAP && (status >> 16) == libc::PTRACE_EVENT_EXIT {
            if other_threads_run_on(pid) {
                // The main thread called pthread_exit; the process lives on
                // and is reported when it really ends.
                cont(pid, 0);
                continue;
            }
            let _ = events.send(ChildEvent::Exiting);
            // Wait (bounded) for the final snapshot; never hold the child forever.
            let _ = ack.recv_timeout(std::time::Duration::from_secs(30));
            cont(pid, 0);
        } else if signal == libc::SIGTRAP && (status >> 16) != 0 {
            // Another ptrace event (exec of a new program): not a signal.
            cont(pid, 0);
        } else {
            // Signal-delivery stop: deliver the signal as if we were not here.
            cont(pid, signal);
        }
    }
}

/// Other threads of `pid` are alive and not being killed by an exit_group
/// (which leaves SIGKILL pending on each of them).
fn other_threads_run_on(pid: u32) -> bool {
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|task| {
        if task.file_name().to_str() == Some(&pid.to_string()) {
            return false;
        }
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            return false;
        };
        let pending = status
            .lines()
            .find_map(|l| l.strip_prefix("SigPnd:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or(0);
        let dying = status
            .lines()
            .any(|l| l.starts_with("State:") && (l.contains("Z") || l.contains("X")));
        pending & SIGKILL_BIT == 0 && !dying
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_commands_like_execvp() {
        assert!(resolve_command(Path::new("sh")).unwrap().is_absolute());
        assert!(resolve_command(Path::new("/bin/sh")).is_ok());
        assert!(resolve_command(Path::new("definitely-not-a-command-xyz")).is_err());
        assert!(
            resolve_command(Path::new("/etc/passwd")).is_err(),
            "not executable"
        );
    }
}
