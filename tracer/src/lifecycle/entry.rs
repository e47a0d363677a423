//! Stopping a started child at its program's entry point (`AT_ENTRY`), for
//! work that must happen after the dynamic loader mapped the libraries but
//! before the program runs (the CFI unwind tables of those libraries).
//!
//! A classic debugger breakpoint: the child is ptrace-stopped at its exec;
//! an int3 replaces the entry's first byte, the child runs to it, the byte
//! and the instruction pointer are put back, the hook runs, and the caller
//! goes on following the child.

use std::io;

use crate::{lifecycle::ptrace, target::tasks};

/// Run by the child's thread when the started program reaches its entry
/// point, the child stopped there (see `Launched::release_with_entry_hook`).
pub type EntryHook = Box<dyn FnOnce() + Send>;

/// Runs the stopped child to its entry point and calls `hook` there; on any
/// failure the hook still runs (later is better than never) and the child is
/// left as it was. Returns the exit code if the child ended before.
pub fn run_to_entry(pid: u32, hook: EntryHook) -> Option<i32> {
    let p = pid as libc::pid_t;
    let Ok(entry) = tasks::entry_address(pid) else {
        hook();
        return None;
    };
    unsafe { *libc::__errno_location() = 0 };
    let word = unsafe { libc::ptrace(libc::PTRACE_PEEKTEXT, p, entry, 0) };
    if word == -1 && io::Error::last_os_error().raw_os_error() != Some(0) {
        hook();
        return None;
    }
    let trapped = (word & !0xff) | 0xcc;
    if unsafe { libc::ptrace(libc::PTRACE_POKETEXT, p, entry, trapped) } < 0 {
        hook();
        return None;
    }
    let restore = || unsafe { libc::ptrace(libc::PTRACE_POKETEXT, p, entry, word) };
    let mut signal = 0;
    loop {
        ptrace::cont(pid, signal);
        signal = 0;
        let Ok(status) = ptrace::wait(pid) else {
            hook();
            return Some(1);
        };
        if let Some(code) = ptrace::exit_code(status) {
            return Some(code);
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        let stop = libc::WSTOPSIG(status);
        if stop == libc::SIGTRAP && (status >> 16) == 0 {
            let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
            unsafe { libc::ptrace(libc::PTRACE_GETREGS, p, 0, &mut regs) };
            if regs.rip == entry + 1 {
                restore();
                regs.rip = entry;
                unsafe { libc::ptrace(libc::PTRACE_SETREGS, p, 0, &regs) };
                hook();
                // Stopped at the entry; `follow` continues it.
                return None;
            }
            signal = stop;
        } else if stop == libc::SIGTRAP && (status >> 16) != 0 {
            // A ptrace event (exit) before the entry: give up the breakpoint.
            restore();
            hook();
            return None;
        } else {
            signal = stop;
        }
    }
}
