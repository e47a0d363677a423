//! RLIMIT_MEMLOCK. Kernels before 5.11 charge BPF maps and programs to the
//! locked-memory limit (per user), whose default (64 KiB, 8 MiB) is far
//! below the tracer's maps: map creation then fails with EPERM. The tracer
//! lifts its own limit at start (harmless where the kernel charges memory
//! cgroups instead), and a command it starts gets the original one back.

use std::sync::OnceLock;

static ORIGINAL: OnceLock<libc::rlimit> = OnceLock::new();

/// Lifts the limit to infinity, remembering the original. Without
/// CAP_SYS_RESOURCE it stays as it was (the privilege checks say why).
pub fn raise() {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut old) } != 0 {
        return;
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        let _ = ORIGINAL.set(old);
    }
}

/// The limit before `raise` changed it, if it did: what a started command
/// is given back.
pub fn original() -> Option<libc::rlimit> {
    ORIGINAL.get().copied()
}
