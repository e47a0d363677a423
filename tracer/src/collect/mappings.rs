//! Anonymous mappings a process made itself, kept as address ranges: what
//! the mmap-family tracepoints (`tracer-ebpf/src/mmap.rs`) report, applied
//! in order. Pure: events in, per-stack totals out.
//!
//! Each mmap (or mremap) call is one *mapping*, attributed to the stack of
//! the call. munmap may take any part of it: a hole in the middle leaves two
//! pieces of the same mapping, and its bytes go down by exactly the hole.
//! mremap gives up the old range and records the new one under the stack of
//! the mremap call (as realloc does for heap blocks). A mapping counts as
//! outstanding while any piece of it is left.
//!
//! Ordering: events from different CPUs can reach userspace out of order. A
//! range unmapped by one thread may be mapped again by another before the
//! first thread's event is read; so a removal only takes ranges recorded
//! before the removing syscall started, and a new range replaces any older
//! one it overlaps (the kernel never hands out mapped addresses).

use std::collections::{BTreeMap, HashMap};

use tracer_common::{MmapEvent, MmapKind};

use crate::model::StackSample;

const MREMAP_DONTUNMAP: u64 = 4;

/// A piece of a mapping: `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    end: u64,
    mapping: u64,
}

#[derive(Clone, Copy, Debug)]
struct MappingInfo {
    stack_id: u64,
    /// When it was made (monotonic ns).
    made_ns: u64,
    /// Pieces left.
    pieces: u32,
}

/// Totals since attach, per stack.
#[derive(Clone, Copy, Debug, Default)]
struct Made {
    count: u64,
    bytes: u64,
}

#[derive(Debug, Default)]
pub struct MappingTable {
    /// Pieces by start address; they never overlap.
    pieces: BTreeMap<u64, Piece>,
    mappings: HashMap<u64, MappingInfo>,
    made: HashMap<u64, Made>,
    next_id: u64,
}

impl MappingTable {
    pub fn apply(&mut self, event: &MmapEvent) {
        let kind = event.kind;
        let end = event.addr.saturating_add(page_align(event.len));
        if kind == MmapKind::Map as u32 {
            // Whatever was there is gone (MAP_FIXED), or was already gone.
            self.remove(event.addr, end, event.exit_ns);
            self.insert(event.addr, end, event.stack_id, event.exit_ns);
        } else if kind == MmapKind::Replace as u32 {
            self.remove(event.addr, end, event.exit_ns);
        } else if kind == MmapKind::Unmap as u32 {
            self.remove(event.addr, end, event.enter_ns);
        } else if kind == MmapKind::Remap as u32 {
            let old_end = event.old_addr.saturating_add(page_align(event.old_len));
            let probe_end = old_end.max(event.old_addr + 1);
            // Only a mapping the tracer saw made is followed: a remapped
            // file or a mapping from before attach stays unknown.
            if !self.covers_any(event.old_addr, probe_end, event.enter_ns) {
                return;
            }
            let keeps_old = event.old_len == 0 || event.flags & MREMAP_DONTUNMAP != 0;
            if !keeps_old {
                self.remove(event.old_addr, old_end, event.enter_ns);
            }
            self.remove(event.addr, end, event.exit_ns);
            self.insert(event.addr, end, event.stack_id, event.exit_ns);
        }
    }

    fn insert(&mut self, start: u64, end: u64, stack_id: u64, now: u64) {
        if end <= start {
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.pieces.insert(start, Piece { end, mapping: id });
        self.mappings.insert(
            id,
            MappingInfo {
                stack_id,
                made_ns: now,
                pieces: 1,
            },
        );
        let made = self.made.entry(stack_id).or_default();
        made.count += 1;
        made.bytes += end - start;
    }

    /// Some piece recorded before `before_ns` overlaps `[start, end)`.
    fn covers_any(&self, start: u64, end: u64, before_ns: u64) -> bool {
        self.overlapping(start, end)
            .iter()
            .any(|(_, piece)| self.mappings[&piece.mapping].made_ns < before_ns)
    }

    fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, Piece)> {
        let first = self
            .pieces
            .range(..start)
            .next_back()
            .filter(|(_, p)| p.end > start)
            .map(|(s, p)| (*s, *p));
        first
            .into_iter()
            .chain(self.pieces.range(start..end).map(|(s, p)| (*s, *p)))
            .collect()
    }

    /// Takes `[start, end)` out of every piece recorded before `before_ns`.
    fn remove(&mut self, start: u64, end: u64, before_ns: u64) {
        if end <= start {
            return;
        }
        for (piece_start, piece) in self.overlapping(start, end) {
            let info = self.mappings[&piece.mapping];
            if info.made_ns >= before_ns {
                continue;
            }
            self.pieces.remove(&piece_start);
            let mut left = 0;
            if piece_start < start {
                self.pieces.insert(
                    piece_start,
                    Piece {
                        end: start,
                        mapping: piece.mapping,
                    },
                );
                left += 1;
            }
            if piece.end > end {
                self.pieces.insert(
                    end,
                    Piece {
                        end: piece.end,
                        mapping: piece.mapping,
                    },
                );
                left += 1;
            }
            let info = self.mappings.get_mut(&piece.mapping).expect("known");
            info.pieces = info.pieces - 1 + left;
            if info.pieces == 0 {
                self.mappings.remove(&piece.mapping);
            }
        }
    }

    /// Per-stack samples: outstanding bytes and mappings, totals since
    /// attach, oldest mapping. Stacks whose mappings are all gone are kept
    /// (with zero outstanding) for the since-attach totals.
    pub fn samples(&self, min_made_ns: Option<u64>) -> Vec<StackSample> {
        let mut by_stack: HashMap<u64, StackSample> = HashMap::new();
        for (stack_id, made) in &self.made {
            by_stack.insert(
                *stack_id,
                StackSample {
                    stack_id: *stack_id,
                    total_count: made.count,
                    total_bytes: made.bytes,
                    settled_bytes: Some(0),
                    ..Default::default()
                },
            );
        }
        for (start, piece) in &self.pieces {
            let info = &self.mappings[&piece.mapping];
            if min_made_ns.is_some_and(|cutoff| info.made_ns > cutoff) {
                continue;
            }
            let sample = by_stack.entry(info.stack_id).or_default();
            sample.bytes += piece.end - start;
        }
        for info in self.mappings.values() {
            if min_made_ns.is_some_and(|cutoff| info.made_ns > cutoff) {
                continue;
            }
            let sample = by_stack.entry(info.stack_id).or_default();
            sample.count += 1;
            sample.oldest_ns = Some(
                sample
                    .oldest_ns
                    .map_or(info.made_ns, |t| t.min(info.made_ns)),
            );
        }
        by_stack.into_values().collect()
    }

    /// Outstanding bytes over every mapping.
    pub fn bytes(&self) -> u64 {
        self.pieces.iter().map(|(s, p)| p.end - s).sum()
    }

    pub fn count(&self) -> usize {
        self.mappings.len()
    }
}

/// The kernel maps whole pages.
fn page_align(len: u64) -> u64 {
    len.saturating_add(4095) & !4095
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    fn ev(kind: MmapKind, addr: u64, len: u64, t: u64) -> MmapEvent {
        MmapEvent {
            kind: kind as u32,
            addr,
            len,
            stack_id: 7,
            enter_ns: t,
            exit_ns: t + 1,
            ..Default::default()
        }
    }

    fn one(table: &MappingTable) -> (u64, u64) {
        let s = table.samples(None);
        let s: Vec<_> = s.iter().filter(|s| s.count > 0).collect();
        match s.as_slice() {
            [] => (0, 0),
            [s] => (s.bytes, s.count),
            more => panic!("{more:?}"),
        }
    }

    #[test]
    fn a_hole_in_the_middle_takes_exactly_its_bytes() {
        let mut t = MappingTable::default();
        t.apply(&ev(MmapKind::Map, 0x10000, 10 * P, 10));
        assert_eq!(one(&t), (10 * P, 1));
        t.apply(&ev(MmapKind::Unmap, 0x10000 + 3 * P, 2 * P, 20));
        assert_eq!(one(&t), (8 * P, 1), "two pieces, one mapping");
        assert_eq!(t.pieces.len(), 2);
        // Unmapping across the hole and into both pieces.
        t.apply(&ev(MmapKind::Unmap, 0x10000 + 2 * P, 4 * P, 30));
        assert_eq!(one(&t), (6 * P, 1));
        t.apply(&ev(MmapKind::Unmap, 0x10000, 10 * P, 40));
        assert_eq!(one(&t), (0, 0));
        assert!(t.mappings.is_empty());
        let s = &t.samples(None)[0];
        assert_eq!((s.total_count, s.total_bytes), (1, 10 * P));
    }

    #[test]
    fn lengths_are_whole_pages() {
        let mut t = MappingTable::default();
        t.apply(&ev(MmapKind::Map, 0x10000, 100, 1));
        assert_eq!(one(&t), (P, 1));
    }

    #[test]
    fn mremap_grows_shrinks_and_moves() {
        let mut t = MappingTable::default();
        t.apply(&ev(MmapKind::Map, 0x10000, 4 * P, 10));
        let remap = |old: u64, old_len: u64, new: u64, new_len: u64, time: u64| MmapEvent {
            kind: MmapKind::Remap as u32,
            old_addr: old,
            old_len,
            addr: new,
            len: new_len,
            stack_id: 9,
            enter_ns: time,
            exit_ns: time + 1,
            ..Default::default()
        };
        // Grow in place: the mremap's stack owns the result.
        t.apply(&remap(0x10000, 4 * P, 0x10000, 6 * P, 20));
        assert_eq!(t.bytes(), 6 * P);
        assert_eq!(t.count(), 1);
        // Shrink.
        t.apply(&remap(0x10000, 6 * P, 0x10000, 2 * P, 30));
        assert_eq!(t.bytes(), 2 * P);
        // Move.
        t.apply(&remap(0x10000, 2 * P, 0x90000, 5 * P, 40));
        assert_eq!(t.bytes(), 5 * P);
        assert_eq!(t.overlapping(0x10000, 0x20000), vec![]);
        let stacks = t.samples(None);
        let nine = stacks.iter().find(|s| s.stack_id == 9).unwrap();
        assert_eq!((nine.bytes, nine.count), (5 * P, 1));
        let seven = stacks.iter().find(|s| s.stack_id == 7).unwrap();
        assert_eq!((seven.bytes, seven.count, seven.total_bytes), (0, 0, 4 * P));
        // A mapping the tracer never saw made is not followed.
        t.apply(&remap(0x500000, P, 0x600000, 8 * P, 50));
        assert_eq!(t.bytes(), 5 * P);
    }

    #[test]
    fn an_unmap_does_not_take_a_range_mapped_again_after_it_started() {
        let mut t = MappingTable::default();
        t.apply(&ev(MmapKind::Map, 0x10000, 2 * P, 10));
        // Thread A unmaps at t=20; thread B maps the same range at t=25,
        // and B's event is read first.
        let mut b = ev(MmapKind::Map, 0x10000, 2 * P, 24);
        b.stack_id = 8;
        t.apply(&b);
        t.apply(&ev(MmapKind::Unmap, 0x10000, 2 * P, 20));
        let s = t.samples(None);
        let eight = s.iter().find(|s| s.stack_id == 8).unwrap();
        assert_eq!((eight.bytes, eight.count), (2 * P, 1));
        assert_eq!(t.bytes(), 2 * P);
    }

    #[test]
    fn a_fixed_file_mapping_replaces_part_of_an_anonymous_one() {
        let mut t = MappingTable::default();
        t.apply(&ev(MmapKind::Map, 0x10000, 4 * P, 10));
        t.apply(&ev(MmapKind::Replace, 0x10000 + P, P, 20));
        assert_eq!(one(&t), (3 * P, 1));
    }

    #[test]
    fn min_age_leaves_out_young_mappings() {
        let mut t = MappingTable::default();
        t.apply(&ev(MmapKind::Map, 0x10000, P, 10));
        t.apply(&ev(MmapKind::Map, 0x20000, P, 100));
        let s = t.samples(Some(50));
        assert_eq!((s[0].bytes, s[0].count), (P, 1));
        assert_eq!(s[0].oldest_ns, Some(11));
    }
}
