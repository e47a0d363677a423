//! Reading a whole BPF hash map in few syscalls: `BPF_MAP_LOOKUP_BATCH`
//! (kernel 5.6+), which aya 0.14 does not wrap. Key-by-key iteration costs
//! two syscalls per entry (get next key, look up), which for a million live
//! allocations is most of a second per snapshot; a batch returns thousands
//! of entries per call.
//!
//! Callers fall back to key-by-key iteration when this returns `Unsupported`
//! (an older kernel, or a map type without batch ops).

use std::{
    io,
    mem::{size_of, MaybeUninit},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::Pod;

/// `enum bpf_cmd`: BPF_MAP_LOOKUP_BATCH.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

#[derive(Debug)]
pub enum BatchError {
    /// The kernel or map does not support batch lookups: iterate instead.
    Unsupported(io::Error),
    Failed(io::Error),
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Unsupported(e) => write!(f, "batch lookup unsupported: {e}"),
            BatchError::Failed(e) => write!(f, "batch lookup failed: {e}"),
        }
    }
}

impl std::error::Error for BatchError {}

/// Entries per call. Each call must fit at least one whole hash bucket;
/// `ENOSPC` (a bucket larger than this) doubles it.
const CHUNK: usize = 16384;

/// Calls `each(key, value)` for every entry of the hash map `map`, reading
/// it in batches. Entries changed while the map is read may be seen or not,
/// as with key-by-key iteration; none is seen twice.
pub fn for_each<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    mut each: impl FnMut(&K, &V),
) -> Result<(), BatchError> {
    let mut cursor = Cursor::default();
    while !cursor.read(map, usize::MAX, &mut each)? {}
    Ok(())
}

/// A position in a hash map, to read it a slice at a time (a sweep spread
/// over several calls). The position is a bucket index, so it stays valid
/// while the map changes; entries added or removed behind it between two
/// slices are missed or seen as in any iteration of a changing map.
#[derive(Clone, Debug, Default)]
pub struct Cursor {
    /// The kernel's batch token (a bucket index; 8 bytes leave room), or
    /// None at the start of the map.
    token: Option<[u8; 8]>,
}

impl Cursor {
    /// Reads entries from the cursor on, about `limit` of them (whole
    /// buckets: fewer than twice as many), calling `each` for each.
    /// Returns true when the end of the map was reached; the cursor is then
    /// back at the start.
    pub fn read<K: Pod, V: Pod>(
        &mut self,
        map: BorrowedFd<'_>,
        limit: usize,
        mut each: impl FnMut(&K, &V),
    ) -> Result<bool, BatchError> {
        let mut chunk = CHUNK.min(limit.max(64));
        let mut keys: Vec<MaybeUninit<K>> = Vec::new();
        let mut values: Vec<MaybeUninit<V>> = Vec::new();
        let mut seen = 0usize;
        while seen < limit {
            keys.resize_with(chunk, MaybeUninit::uninit);
            values.resize_with(chunk, MaybeUninit::uninit);
            let token_in = self.token;
            let mut token_out = [0u8; 8];
            let mut attr = BatchAttr {
                in_batch: token_in.as_ref().map_or(0, |t| t.as_ptr() as u64),
                out_batch: token_out.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: chunk as u32,
                map_fd: map.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut BatchAttr,
                    size_of::<BatchAttr>() as libc::c_uint,
                )
            };
            let err = (ret < 0).then(io::Error::last_os_error);
            let done = match err.as_ref().and_then(io::Error::raw_os_error) {
                None => false,
                // The end: `count` still tells how many entries this call returned.
                Some(libc::ENOENT) => true,
                Some(libc::ENOSPC) if chunk < (1 << 24) => {
                    chunk *= 2;
                    continue;
                }
                Some(libc::EINVAL | libc::ENOTSUP | libc::EOPNOTSUPP | libc::ENOSYS)
                    if token_in.is_none() && seen == 0 =>
                {
                    return Err(BatchError::Unsupported(err.unwrap()))
                }
                Some(_) => return Err(BatchError::Failed(err.unwrap())),
            };
            let n = (attr.count as usize).min(chunk);
            for i in 0..n {
                // The kernel wrote the first `n` keys and values.
                let (k, v) = unsafe { (keys[i].assume_init_ref(), values[i].assume_init_ref()) };
                each(k, v);
            }
            seen += n;
            if done {
                self.token = None;
                return Ok(true);
            }
            self.token = Some(token_out);
        }
        Ok(false)
    }
}

/// The file descriptor of a hash map in a loaded object.
pub fn hash_map_fd<'a>(map: &'a aya::maps::Map) -> Option<BorrowedFd<'a>> {
    match map {
        aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data) => Some(data.fd().as_fd()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, OwnedFd};

    use super::*;

    /// A BPF hash map of u64 -> [u64; 3] with `n` entries, made with raw
    /// syscalls; None without the privileges to create one.
    fn hash_map(max_entries: u32, n: u64) -> Option<OwnedFd> {
        #[repr(C)]
        struct Create {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        #[repr(C)]
        struct Update {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let create = Create {
            map_type: 1, // BPF_MAP_TYPE_HASH
            key_size: 8,
            value_size: 24,
            max_entries,
            map_flags: 0,
        };
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0,
                &create as *const Create,
                size_of::<Create>() as u32,
            )
        };
        if fd < 0 {
            eprintln!(
                "skipped: cannot create a BPF map: {}",
                io::Error::last_os_error()
            );
            return None;
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        for key in 0..n {
            let value = [key * 3, key + 7, !key];
            let update = Update {
                map_fd: fd.as_raw_fd() as u32,
                _pad: 0,
                key: &key as *const u64 as u64,
                value: value.as_ptr() as u64,
                flags: 0,
            };
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    2,
                    &update as *const Update,
                    size_of::<Update>() as u32,
                )
            };
            assert_eq!(ret, 0, "update: {}", io::Error::last_os_error());
        }
        Some(fd)
    }

    #[test]
    fn batch_reads_every_entry_once() {
        let n = 50_000;
        let Some(fd) = hash_map(1 << 16, n) else {
            return;
        };
        let mut seen = vec![false; n as usize];
        for_each::<u64, [u64; 3]>(fd.as_fd(), |k, v| {
            assert_eq!(*v, [k * 3, k + 7, !k]);
            assert!(!seen[*k as usize], "{k} twice");
            seen[*k as usize] = true;
        })
        .unwrap();
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn a_sweep_in_slices_sees_every_entry_once_then_starts_over() {
        let n = 40_000;
        let Some(fd) = hash_map(1 << 16, n) else {
            return;
        };
        let mut cursor = Cursor::default();
        let mut seen = vec![0u32; n as usize];
        let mut calls = 0;
        loop {
            calls += 1;
            let mut got = 0;
            let end = cursor
                .read::<u64, [u64; 3]>(fd.as_fd(), 5000, |k, _| {
                    seen[*k as usize] += 1;
                    got += 1;
                })
                .unwrap();
            assert!(got < 2 * 5000, "a slice is bounded: {got}");
            if end {
                break;
            }
        }
        assert!(calls > 1, "read in several slices");
        assert!(seen.iter().all(|s| *s == 1));
        // Back at the start: the next read sees entries again.
        let mut again = 0;
        cursor
            .read::<u64, [u64; 3]>(fd.as_fd(), 1, |_, _| again += 1)
            .unwrap();
        assert!(again > 0);
    }

    #[test]
    fn an_empty_map_is_read_without_error() {
        let Some(fd) = hash_map(1024, 0) else { return };
        let mut count = 0;
        for_each::<u64, [u64; 3]>(fd.as_fd(), |_, _| count += 1).unwrap();
        assert_eq!(count, 0);
    }
}
