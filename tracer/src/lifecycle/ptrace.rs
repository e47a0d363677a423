//! The ptrace and waitpid calls the launcher and the entry breakpoint share.

use std::io;

/// waitpid for `pid` (-1: any child), every kind of child included
/// (`__WALL`), again when a signal interrupts it. Returns the pid that
/// changed state and its status.
fn wait_for(pid: libc::pid_t, flags: libc::c_int) -> io::Result<(u32, libc::c_int)> {
    let mut status: libc::c_int = 0;
    loop {
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL | flags) };
        if r >= 0 {
            return Ok((r as u32, status));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The next state change of tracee `pid`.
pub fn wait(pid: u32) -> io::Result<libc::c_int> {
    wait_for(pid as libc::pid_t, 0).map(|(_, status)| status)
}

/// The next state change of child `pid`, not traced yet: WUNTRACED to see
/// it stop.
pub fn wait_untraced(pid: u32) -> io::Result<libc::c_int> {
    wait_for(pid as libc::pid_t, libc::WUNTRACED).map(|(_, status)| status)
}

/// The next tracee state change, of any tracee.
pub fn wait_any() -> io::Result<(u32, libc::c_int)> {
    wait_for(-1, 0)
}

/// The exit code a shell reports for a wait status (128 + signal when
/// killed); None while the process lives.
pub fn exit_code(status: libc::c_int) -> Option<i32> {
    if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Some(128 + libc::WTERMSIG(status))
    } else {
        None
    }
}

/// Lets stopped tracee `pid` go on, delivering `signal` (0: none).
pub fn cont(pid: u32, signal: libc::c_int) {
    unsafe {
        libc::ptrace(
            libc::PTRACE_CONT,
            pid as libc::pid_t,
            0,
            signal as libc::c_long,
        )
    };
}

/// PTRACE_GETEVENTMSG: the new child's pid at a fork event.
pub fn event_message(pid: u32) -> u32 {
    let mut message: libc::c_ulong = 0;
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETEVENTMSG,
            pid as libc::pid_t,
            0,
            &mut message as *mut libc::c_ulong,
        )
    };
    if r < 0 {
        0
    } else {
        message as u32
    }
}
