//! Uprobe sessions (kernel 6.13+), userspace half: loading a session program
//! and attaching it with a `uprobe_multi` link. `tracer-ebpf/src/session.rs`
//! says what the program does and why it is cheaper under `--sample-rate`.
//!
//! aya 0.14 can do neither: it loads `uprobe` programs without an expected
//! attach type and attaches them through perf events only. So the program
//! is taken from the same object file with `aya-obj`, its map references
//! pointed at the maps aya already created (so both kinds of program share
//! every map, and the globals aya set), and loaded and attached with the
//! bpf(2) system call directly.

use std::{collections::HashSet, os::fd::OwnedFd};

use anyhow::{Context as _, Result};

use super::{probes::close_later, programs::Loaded, sys, Variant};
use crate::target::{
    allocator::{AllocatorObject, ProbePoint},
    tasks::{children, same_program},
};

/// When the allocation functions are probed with a session program
/// (`--uprobe-sessions`, hidden: for measuring).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SessionMode {
    /// With `--sample-rate`, where they save the return trap of every
    /// unsampled call; uprobe+uretprobe otherwise.
    #[default]
    Auto,
    /// Whenever the kernel has them (exact mode too).
    Always,
    /// Never: uprobe+uretprobe.
    Never,
}

impl SessionMode {
    pub fn wanted(self, sampling: bool) -> bool {
        match self {
            SessionMode::Auto => sampling,
            SessionMode::Always => true,
            SessionMode::Never => false,
        }
    }
}

/// The attach cookie of an allocation function: its calling convention.
pub fn convention(entry: crate::target::allocator::Entry) -> Option<u64> {
    use crate::target::allocator::Entry;
    use tracer_common::convention;
    Some(match entry {
        Entry::Malloc => convention::MALLOC,
        Entry::Calloc => convention::CALLOC,
        Entry::Realloc => convention::REALLOC,
        Entry::Reallocarray => convention::REALLOCARRAY,
        Entry::Memalign => convention::MEMALIGN,
        Entry::PosixMemalign => convention::POSIX_MEMALIGN,
        Entry::Valloc => convention::VALLOC,
        Entry::Pvalloc => convention::PVALLOC,
        Entry::Free => return None,
    })
}

/// A loaded session program and its links, one per probed object.
///
/// Two kernel behaviours of uprobe_multi links decide the upkeep (both
/// seen on 6.18):
/// - the link's process filter holds the thread group leader, and matches
///   a memory map by the leader's: once the main thread has exited
///   (`pthread_exit`), any other tool or tracer that detaches a probe from
///   the same function makes the kernel drop our breakpoints too, and a new
///   link would get none. The probes then go back to uprobe+uretprobe bound
///   to a live thread (`Probes::follow_scope_thread`).
/// - a forked child inherits the breakpoints, and the kernel does not run
///   the program for it but still traps its entries and returns (perf-based
///   uprobes remove themselves from a child at its first hit): measured,
///   an untraced child's malloc+free went from 6 ns to ~1.1 µs. So when the
///   target has a new child that did not exec, the links are made anew and
///   the old ones closed, which takes the breakpoints out of every memory
///   map the new links do not match.
pub struct Sessions {
    pub program_name: &'static str,
    program: OwnedFd,
    links: Vec<Link>,
    /// Children of the target already cleaned (or exec'd).
    children: HashSet<u32>,
}

struct Link {
    object: AllocatorObject,
    pid: u32,
    /// Held: closing it detaches.
    _fd: OwnedFd,
}

impl Sessions {
    /// Loads the session program of `variant` against the maps of
    /// `loaded` (all of them: before its logger takes one out).
    pub fn load(loaded: &Loaded, variant: Variant) -> Result<Self> {
        let name = super::probes::session_program(variant);
        Ok(Sessions {
            program_name: name,
            program: sys::load_session_program(
                &loaded.map_fds(),
                super::programs::EBPF_OBJECT,
                name,
            )?,
            links: Vec::new(),
            children: HashSet::new(),
        })
    }

    /// Attaches the program to every allocation function of `object` with
    /// one link for process `pid`; returns the points it covers.
    pub fn attach(&mut self, object: &AllocatorObject, pid: u32) -> Result<Vec<ProbePoint>> {
        let (fd, points) = self.link(object, pid)?;
        if let Some(fd) = fd {
            self.links.push(Link {
                object: object.clone(),
                pid,
                _fd: fd,
            });
        }
        Ok(points)
    }

    fn link(
        &self,
        object: &AllocatorObject,
        pid: u32,
    ) -> Result<(Option<OwnedFd>, Vec<ProbePoint>)> {
        // Sessions are 6.13+: cookies are there, so the moved placement,
        // with where the arguments are in the cookie above the convention.
        let points: Vec<(&ProbePoint, u64)> = object
            .points
            .iter()
            .filter(|p| p.covered_by.is_none())
            .filter_map(|p| {
                let args = p.placed(true).args << tracer_common::convention::ARGS_SHIFT;
                Some((p, convention(p.entry)? | args))
            })
            .collect();
        if points.is_empty() {
            return Ok((None, Vec::new()));
        }
        let offsets: Vec<u64> = points
            .iter()
            .map(|(p, _)| p.file_offset + p.placed(true).skip)
            .collect();
        let cookies: Vec<u64> = points.iter().map(|(_, c)| *c).collect();
        let fd = sys::attach_session(&self.program, &object.host_path, &offsets, &cookies, pid)
            .with_context(|| {
                format!(
                    "attaching uprobe session {} to {}",
                    self.program_name, object.path
                )
            })?;
        Ok((
            Some(fd),
            points.into_iter().map(|(p, _)| p.clone()).collect(),
        ))
    }

    /// Detaches the sessions of process `pid` (it is gone, or its functions
    /// are probed another way now); returns whether it had any. The close
    /// waits for the kernel: done on a thread.
    pub fn detach_process(&mut self, pid: u32) -> bool {
        let (gone, kept): (Vec<Link>, Vec<Link>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|l| l.pid == pid);
        self.links = kept;
        let had = !gone.is_empty();
        close_later(gone);
        had
    }

    /// Makes the links anew when a target has a child that forked without
    /// exec'ing since the last call (see `Sessions`). Returns whether it did.
    pub fn clean_forked_children(&mut self) -> Result<bool> {
        let mut pids: Vec<u32> = self.links.iter().map(|l| l.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        let mut now = HashSet::new();
        let mut fresh = false;
        for pid in pids {
            for child in children(pid) {
                now.insert(child);
                if !self.children.contains(&child) && same_program(pid, child) {
                    fresh = true;
                }
            }
        }
        self.children = now;
        if !fresh {
            return Ok(false);
        }
        let mut links = Vec::with_capacity(self.links.len());
        for old in &self.links {
            let (fd, _) = self.link(&old.object, old.pid)?;
            if let Some(fd) = fd {
                links.push(Link {
                    object: old.object.clone(),
                    pid: old.pid,
                    _fd: fd,
                });
            }
        }
        // New first, then the old go: the target's breakpoints stay (a call
        // probed by both is recognised as one, see alloc.rs `is_inner_call`).
        close_later(std::mem::replace(&mut self.links, links));
        Ok(true)
    }
}
