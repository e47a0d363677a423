//! `tracer run`: starts a command so that it is traced from its first
//! allocation and can be read once more just before it exits.
//!
//! The child is forked, stops itself, is seized with ptrace (PTRACE_SEIZE)
//! and stopped again right after exec, before the dynamic loader has run any
//! of its code; the tracer attaches its probes then and lets it go. PTRACE_O_TRACEEXIT stops it again
//! when it exits, while its memory map still exists, so the final report can
//! be taken and symbolized. Nothing else is changed: signals are passed on,
//! job-control stops stay stops (PTRACE_LISTEN), and if the tracer dies the
//! kernel detaches and the command runs on.
//!
//! ptrace requests must come from the thread that started the child, so one
//! dedicated thread owns the child for its whole life.

use std::{
    ffi::{CString, OsString},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
    thread,
};

use anyhow::{anyhow, Result};
use tokio::sync::mpsc;

use crate::lifecycle::{
    entry::{self, EntryHook},
    event::TargetEvent,
    ptrace,
    tree::Tree,
};

pub struct Launched {
    pub pid: u32,
    go: std_mpsc::Sender<Option<EntryHook>>,
    /// Pids the child's thread may let go on.
    resume: std_mpsc::Sender<u32>,
    pub events: mpsc::UnboundedReceiver<TargetEvent>,
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
        let _ = self.resume.send(self.pid);
    }

    /// Lets process `pid`, stopped for a `Changed` event, go on.
    pub fn resume(&self, pid: u32) {
        let _ = self.resume.send(pid);
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
/// `follow_forks`: the processes the command forks are traced too, each
/// stopped until the tracer has attached to it.
pub fn launch(
    argv: &[OsString],
    credentials: Option<Credentials>,
    output: ChildOutput,
    follow_forks: bool,
) -> Result<Launched> {
    let (pid_tx, pid_rx) = std_mpsc::channel::<Result<u32, String>>();
    let (go_tx, go_rx) = std_mpsc::channel::<Option<EntryHook>>();
    let (ack_tx, ack_rx) = std_mpsc::channel::<u32>();
    let (event_tx, event_rx) = mpsc::unbounded_channel();
    let argv = argv.to_vec();
    thread::Builder::new()
        .name("tracer-child".into())
        .spawn(move || {
            let pid = match start_stopped(&argv, credentials, output, follow_forks) {
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
                    if let Some(code) = entry::run_to_entry(pid, hook) {
                        let _ = event_tx.send(TargetEvent::Exited(Some(code)));
                        return;
                    }
                }
                Ok(None) => {}
            }
            Tree::new(pid, &event_tx, &ack_rx).follow();
        })?;
    let pid = pid_rx
        .recv()
        .map_err(|_| anyhow!("the child thread ended unexpectedly"))?
        .map_err(|e| anyhow!(e))?;
    Ok(Launched {
        pid,
        go: go_tx,
        resume: ack_tx,
        events: event_rx,
    })
}

/// Forks and execs `argv`, seized with ptrace and stopped at the exec,
/// before the new program's first instruction.
fn start_stopped(
    argv: &[OsString],
    credentials: Option<Credentials>,
    output: ChildOutput,
    follow_forks: bool,
) -> Result<u32, String> {
    let program = argv[0].to_string_lossy().into_owned();
    let plan = ExecPlan::new(argv, &program, credentials, &output)?;
    let (err_read, err_write) = cloexec_pipe().map_err(|e| format!("pipe: {e}"))?;
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        plan.stop_and_exec(err_write.as_raw_fd());
    }
    drop(err_write);
    let pid = pid as u32;
    trace_to_exec(pid, follow_forks, &program, || {
        exec_error(&err_read, &program)
    })?;
    Ok(pid)
}

/// Everything the child needs between fork and exec, made before fork:
/// after it, the child may only make async-signal-safe calls.
struct ExecPlan<'a> {
    args: Vec<CString>,
    arg_ptrs: Vec<*const libc::c_char>,
    /// /dev/null for stdin, and the fd for stdout and stderr.
    redirect: Option<(std::fs::File, RawFd)>,
    credentials: Option<Credentials>,
    /// The locked-memory limit the tracer had before lifting its own.
    memlock: Option<libc::rlimit>,
    /// Owns the fd in `redirect`: borrowed so that it stays open.
    _output: &'a ChildOutput,
}

impl<'a> ExecPlan<'a> {
    fn new(
        argv: &[OsString],
        program: &str,
        credentials: Option<Credentials>,
        output: &'a ChildOutput,
    ) -> Result<Self, String> {
        let to_c = |s: &OsString| {
            CString::new(s.as_bytes())
                .map_err(|_| format!("{program}: argument contains a NUL byte"))
        };
        let args: Vec<CString> = argv.iter().map(to_c).collect::<Result<_, _>>()?;
        let mut arg_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        arg_ptrs.push(std::ptr::null());
        let redirect = match output {
            ChildOutput::Inherit => None,
            ChildOutput::File(file) => {
                let null =
                    std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
                Some((null, file.as_raw_fd()))
            }
        };
        Ok(ExecPlan {
            args,
            arg_ptrs,
            redirect,
            credentials,
            memlock: crate::memlock::original(),
            _output: output,
        })
    }

    /// In the forked child: redirects, drops to the credentials, stops
    /// itself so the tracer can seize it, then execs. A failure's errno
    /// goes to `err_fd`.
    fn stop_and_exec(&self, err_fd: RawFd) -> ! {
        unsafe {
            let fail = || -> ! {
                let errno = *libc::__errno_location();
                libc::write(err_fd, (&errno as *const i32).cast(), 4);
                libc::_exit(127)
            };
            if let Some((null, out)) = &self.redirect {
                if libc::dup2(null.as_raw_fd(), 0) < 0
                    || libc::dup2(*out, 1) < 0
                    || libc::dup2(*out, 2) < 0
                {
                    fail();
                }
            }
            // Lowering a limit cannot fail.
            if let Some(limit) = &self.memlock {
                libc::setrlimit(libc::RLIMIT_MEMLOCK, limit);
            }
            if let Some(c) = &self.credentials {
                if libc::setgroups(c.groups.len(), c.groups.as_ptr()) < 0
                    || libc::setgid(c.gid) < 0
                    || libc::setuid(c.uid) < 0
                {
                    fail();
                }
            }
            libc::raise(libc::SIGSTOP);
            libc::execv(self.args[0].as_ptr(), self.arg_ptrs.as_ptr());
            fail()
        }
    }
}

/// The pipe the child reports a failed exec (or setuid) through; a
/// successful exec closes it. Returns (read end, write end).
fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Why the child ended before its exec stop, from the pipe's read end.
fn exec_error(err_read: &OwnedFd, program: &str) -> String {
    let mut errno = [0u8; 4];
    let n = unsafe { libc::read(err_read.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
    if n == 4 {
        format!(
            "cannot run {program}: {}",
            io::Error::from_raw_os_error(i32::from_ne_bytes(errno))
        )
    } else {
        format!("{program} exited before it could be traced")
    }
}

/// Takes the forked child from its own SIGSTOP to the stop at its exec,
/// seized; `exec_error` says why when it ends instead.
fn trace_to_exec(
    pid: u32,
    follow_forks: bool,
    program: &str,
    exec_error: impl Fn() -> String,
) -> Result<(), String> {
    // 1. The child's own SIGSTOP (not traced yet: needs WUNTRACED to be seen).
    let status = ptrace::wait_untraced(pid).map_err(|e| format!("waiting for {pid}: {e}"))?;
    if !libc::WIFSTOPPED(status) {
        return Err(exec_error());
    }
    // 2. Seize it (not TRACEME: a seized tracee's job-control stops can be
    //    left in place with PTRACE_LISTEN), then let it go on to exec.
    if let Err(e) = seize(pid, follow_forks) {
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        return Err(format!("cannot trace {program}: {e}"));
    }
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
    // 3. Run it up to the exec stop, before the new program's first instruction.
    loop {
        let status = ptrace::wait(pid).map_err(|e| format!("waiting for {pid}: {e}"))?;
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Err(exec_error());
        }
        let event = status >> 16;
        if event == libc::PTRACE_EVENT_EXEC {
            return Ok(());
        }
        // The stop seen on seizing, or a signal (SIGCONT) on its way in.
        let signal = if event == 0 {
            libc::WSTOPSIG(status)
        } else {
            0
        };
        ptrace::cont(pid, signal);
    }
}

/// PTRACE_SEIZE with the options the launcher follows the child by.
fn seize(pid: u32, follow_forks: bool) -> io::Result<()> {
    let mut options = libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_TRACEEXEC;
    if follow_forks {
        // Children are traced from birth, stopped until released (threads,
        // PTRACE_O_TRACECLONE, are not: they share the process's probes).
        options |= libc::PTRACE_O_TRACEFORK | libc::PTRACE_O_TRACEVFORK;
    }
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid as libc::pid_t,
            0,
            options as libc::c_long,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
