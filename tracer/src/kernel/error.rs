//! Errors of the kernel side. Each says what the tracer was doing (which
//! program, map or link) and keeps the kernel's errno, so callers decide on
//! `errno()` (EPERM is a variant of meaning, not a message to search).

use std::{error::Error as StdError, fmt, io};

/// What the tracer asked of the kernel when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Creating the maps and loading the programs.
    Load,
    /// Attaching a program (uprobe, session link, tracepoint).
    Attach,
    /// Reading or writing a map.
    Map,
}

#[derive(Debug)]
pub struct KernelError {
    pub operation: Operation,
    /// What it was done to: "eBPF program alloc_return", "ALLOCS", ...
    pub what: String,
    source: Box<dyn StdError + Send + Sync + 'static>,
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Said when the kernel refuses the tracer for lack of privileges.
pub const NEED_PRIVILEGES: &str =
    "tracer needs root, or the CAP_BPF and CAP_PERFMON capabilities, to load eBPF programs (try: sudo tracer ...)";

impl KernelError {
    pub fn new(
        operation: Operation,
        what: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> Self {
        KernelError {
            operation,
            what: what.into(),
            source: source.into(),
        }
    }

    pub fn load(
        what: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self::new(Operation::Load, what, source)
    }

    pub fn attach(
        what: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self::new(Operation::Attach, what, source)
    }

    pub fn map(
        what: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self::new(Operation::Map, what, source)
    }

    /// A map or program the eBPF object should have and does not (a build
    /// that does not match this tracer).
    pub fn missing(operation: Operation, what: &str) -> Self {
        Self::new(
            operation,
            what,
            io::Error::new(io::ErrorKind::NotFound, "not in the eBPF object"),
        )
    }

    /// The kernel's errno, from the first `io::Error` in the source chain
    /// (aya's errors keep it as their source).
    pub fn errno(&self) -> Option<i32> {
        let mut next: Option<&(dyn StdError + 'static)> = Some(self.source.as_ref());
        while let Some(error) = next {
            if let Some(io) = error.downcast_ref::<io::Error>() {
                if let Some(code) = io.raw_os_error() {
                    return Some(code);
                }
            }
            next = error.source();
        }
        None
    }

    /// The kernel said EPERM: the tracer lacks privileges (or the kernel is
    /// locked down).
    pub fn is_permission_denied(&self) -> bool {
        self.errno() == Some(libc::EPERM)
    }
}

/// What an EPERM means: no privileges, or (the tracer has them) the
/// kernel forbids eBPF to everyone; `lockdown` is what features saw.
fn permission_denied(privileged: bool, lockdown: &str) -> String {
    if privileged {
        format!(
            "the kernel refused eBPF although the tracer has the privileges: lockdown ({lockdown}), \
             a security module (SELinux, AppArmor) or a seccomp filter forbids it"
        )
    } else {
        NEED_PRIVILEGES.to_string()
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_permission_denied() {
            let seen = super::features::probed();
            let privileged = seen.is_some_and(|s| s.privileges.is_yes());
            let lockdown = seen.map_or("", |s| s.lockdown.detail.as_str());
            write!(f, "{}: ", permission_denied(privileged, lockdown))?;
        }
        let doing = match self.operation {
            Operation::Load => "loading",
            Operation::Attach => "attaching",
            Operation::Map => "accessing map",
        };
        write!(f, "{doing} {}", self.what)
    }
}

impl StdError for KernelError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(self.source.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(io::Error);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "the syscall failed")
        }
    }
    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn errno_is_found_through_the_source_chain() {
        let e = KernelError::load(
            "eBPF program alloc_return",
            Wrapper(io::Error::from_raw_os_error(libc::EPERM)),
        );
        assert_eq!(e.errno(), Some(libc::EPERM));
        assert!(e.is_permission_denied());
        assert!(e.to_string().starts_with(NEED_PRIVILEGES), "{e}");
        let e = KernelError::attach("x", io::Error::from_raw_os_error(libc::EINVAL));
        assert_eq!(e.errno(), Some(libc::EINVAL));
        assert!(!e.is_permission_denied());
        assert_eq!(e.to_string(), "attaching x");
        assert_eq!(KernelError::missing(Operation::Map, "ALLOCS").errno(), None);
    }

    #[test]
    fn eperm_with_privileges_blames_the_kernel_not_the_user() {
        assert_eq!(permission_denied(false, ""), NEED_PRIVILEGES);
        let said = permission_denied(true, "confidentiality: ...");
        assert!(said.contains("lockdown (confidentiality"), "{said}");
        assert!(!said.contains("sudo"), "{said}");
    }
}
