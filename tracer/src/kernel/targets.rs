//! The processes the programs count (`TARGETS`): each with a reserved
//! unknown-stack slot while they last (allocations whose stack is lost
//! still count under their process) and the address of its uretprobe
//! trampoline (see tracer-ebpf's in-flight records).

use tracer_common::TargetInfo;

use super::{
    error::Result,
    maps::{self, StatsTable},
    programs::Loaded,
    reclaim::UNKNOWN_SLOTS,
};

/// A traced process as the programs know it.
struct TargetEntry {
    pid: u32,
    /// The trampoline address last told to the programs.
    trampoline: u64,
    unknown_slot: u32,
}

pub struct Targets {
    targets: Vec<TargetEntry>,
    /// Reserved `STACK_STATS` slots not yet given to a process's unknown stack.
    unknown_slots: Vec<u32>,
}

impl Targets {
    /// `first_reserved`: the first of the `UNKNOWN_SLOTS` slots reserved
    /// past the stacks' own.
    pub fn new(first_reserved: u32) -> Self {
        Targets {
            targets: Vec::new(),
            unknown_slots: (first_reserved..first_reserved + UNKNOWN_SLOTS)
                .rev()
                .collect(),
        }
    }

    /// Lets the programs count events of this process, with a stack slot
    /// of its own for allocations whose stack is lost.
    pub fn add(&mut self, loaded: &mut Loaded, pid: u32) -> Result<()> {
        if self.targets.iter().any(|t| t.pid == pid) {
            return Ok(());
        }
        let unknown_slot = match self.unknown_slots.pop() {
            Some(slot) => {
                StatsTable::open(loaded)?.claim_unknown(slot as usize, pid);
                slot
            }
            None => tracer_common::SLOT_UNKNOWN,
        };
        let info = TargetInfo {
            unknown_slot,
            ..TargetInfo::default()
        };
        maps::targets_mut(loaded)?.insert(pid, info)?;
        self.targets.push(TargetEntry {
            pid,
            trampoline: 0,
            unknown_slot,
        });
        Ok(())
    }

    /// Stops counting process `pid` (it exited). Its records stay for the
    /// final report.
    pub fn remove(&mut self, loaded: &mut Loaded, pid: u32) {
        self.targets.retain(|t| t.pid != pid);
        if let Ok(mut map) = maps::targets_mut(loaded) {
            map.remove(&pid);
        }
    }

    /// Tells the programs where each target's uretprobe trampoline is (the
    /// start of its `[uprobes]` mapping, made at its first probe hit), when
    /// it appeared or moved (exec).
    pub fn learn_trampolines(&mut self, loaded: &mut Loaded) -> Result<()> {
        let mut updates = Vec::new();
        for target in &mut self.targets {
            let start = crate::target::tasks::uprobes_mapping_start(target.pid);
            if let Some(start) = start.filter(|s| *s != target.trampoline) {
                target.trampoline = start;
                updates.push((
                    target.pid,
                    TargetInfo {
                        trampoline: start,
                        trampoline_code: 0,
                        unknown_slot: target.unknown_slot,
                        _pad: 0,
                    },
                ));
            }
        }
        let mut map = maps::targets_mut(loaded)?;
        for (pid, info) in updates {
            map.insert(pid, info)?;
        }
        Ok(())
    }
}
