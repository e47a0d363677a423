//! Stopping a started child at its program's entry point (`AT_ENTRY`), for
//! work that must happen after the dynamic loader mapped the libraries but
//! before the program runs (the CFI unwind tables of those libraries) — and
//! on the way, each time the loader has mapped objects and before it runs
//! their constructors: at its debugger rendezvous, `_dl_debug_state`.
//!
//! Classic debugger breakpoints: the child is ptrace-stopped at its exec;
//! an int3 replaces the first byte of the entry (and of `_dl_debug_state`,
//! a lone `ret` that is stepped over by hand: pop the return address), the
//! child runs to them, the hook runs at each, and at the entry the bytes
//! and the instruction pointer are put back and the caller goes on
//! following the child.

use std::io;

use crate::{lifecycle::ptrace, target::tasks};

/// Run by the child's thread when the loader has mapped objects and when
/// the started program reaches its entry point, the child stopped there
/// (see `Launched::release_with_entry_hook`).
pub type EntryHook = Box<dyn FnMut() + Send>;

/// A breakpoint: the address and the word it replaced.
struct Trap {
    at: u64,
    word: libc::c_long,
}

impl Trap {
    fn set(pid: u32, at: u64) -> Option<Trap> {
        let p = pid as libc::pid_t;
        unsafe { *libc::__errno_location() = 0 };
        let word = unsafe { libc::ptrace(libc::PTRACE_PEEKTEXT, p, at, 0) };
        if word == -1 && io::Error::last_os_error().raw_os_error() != Some(0) {
            return None;
        }
        let trapped = (word & !0xff) | 0xcc;
        (unsafe { libc::ptrace(libc::PTRACE_POKETEXT, p, at, trapped) } >= 0)
            .then_some(Trap { at, word })
    }

    fn restore(&self, pid: u32) {
        unsafe {
            libc::ptrace(
                libc::PTRACE_POKETEXT,
                pid as libc::pid_t,
                self.at,
                self.word,
            )
        };
    }
}

/// The address of the dynamic loader's `_dl_debug_state` in process `pid`,
/// if it is a lone `ret` (so it can be stepped over by hand).
fn rendezvous(pid: u32) -> Option<u64> {
    let base = tasks::auxv_value(pid, libc::AT_BASE)
        .ok()
        .filter(|&b| b != 0)?;
    let process = crate::target::process::Process::open(pid).ok()?;
    let maps = process.maps().ok()?;
    let loader = maps.iter().find(|m| m.start == base && m.offset == 0)?;
    let data = crate::target::tasks::mapped_file(&process, loader, loader.file_path()?)?;
    let info = crate::target::elf::ElfInfo::parse(&data).ok()?;
    let offset = info.function_offset("_dl_debug_state")?;
    let at = base + info.function_address("_dl_debug_state")?;
    (data.get(offset as usize) == Some(&0xc3)).then_some(at)
}

/// Runs the stopped child to its entry point and calls `hook` at the
/// loader's rendezvous and there; on any failure the hook still runs
/// (later is better than never) and the child is left as it was. Returns
/// the exit code if the child ended before.
pub fn run_to_entry(pid: u32, mut hook: EntryHook) -> Option<i32> {
    let p = pid as libc::pid_t;
    let Ok(entry) = tasks::entry_address(pid) else {
        hook();
        return None;
    };
    let Some(entry_trap) = Trap::set(pid, entry) else {
        hook();
        return None;
    };
    let loader_trap = rendezvous(pid).and_then(|at| Trap::set(pid, at));
    let restore = || {
        entry_trap.restore(pid);
        if let Some(trap) = &loader_trap {
            trap.restore(pid);
        }
    };
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
            if loader_trap.as_ref().is_some_and(|t| regs.rip == t.at + 1) {
                // The loader mapped objects: tables now, then `ret`.
                hook();
                unsafe { *libc::__errno_location() = 0 };
                let ret = unsafe { libc::ptrace(libc::PTRACE_PEEKDATA, p, regs.rsp, 0) };
                if ret == -1 && io::Error::last_os_error().raw_os_error() != Some(0) {
                    restore();
                    return None;
                }
                regs.rip = ret as u64;
                regs.rsp += 8;
                unsafe { libc::ptrace(libc::PTRACE_SETREGS, p, 0, &regs) };
                continue;
            }
            signal = stop;
        } else if stop == libc::SIGTRAP && (status >> 16) != 0 {
            // A ptrace event (exit) before the entry: give up the breakpoints.
            restore();
            hook();
            return None;
        } else {
            signal = stop;
        }
    }
}
