//! The raw bpf(2) calls aya 0.14 does not make: batch lookups of hash
//! maps (`BPF_MAP_LOOKUP_BATCH`, kernel 5.6+), and uprobe session programs
//! (kernel 6.13+): loading one (`BPF_PROG_LOAD` with an expected attach
//! type, the program taken from the object with `aya-obj` and its map
//! references pointed at the maps aya created) and attaching it with a
//! `uprobe_multi` link (`BPF_LINK_CREATE`); and the small maps, programs
//! and links `features` makes to learn what the running kernel has.
//!
//! Key-by-key iteration costs two syscalls per entry, which for a million
//! live allocations is most of a second per snapshot; a batch returns
//! thousands of entries per call. Callers fall back to key-by-key
//! iteration when a batch read returns `Unsupported`.

use std::{
    collections::HashSet,
    ffi::CString,
    io,
    mem::{size_of, MaybeUninit},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use anyhow::{anyhow, bail, Context as _, Result};

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
pub fn for_each<K: Copy, V: Copy>(
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
    pub fn read<K: Copy, V: Copy>(
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

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_BTF_LOAD: libc::c_long = 18;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `enum bpf_attach_type` (include/uapi/linux/bpf.h, 6.13+).
pub const BPF_TRACE_UPROBE_SESSION: u32 = 57;

/// `union bpf_attr` for BPF_PROG_LOAD, up to `attach_btf_id`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    /// Explicit, so that no padding byte is read as a field.
    attach_btf_id: u32,
}

/// `union bpf_attr` for BPF_BTF_LOAD.
#[repr(C)]
#[derive(Default)]
struct BtfLoadAttr {
    btf: u64,
    btf_log_buf: u64,
    btf_size: u32,
    btf_log_size: u32,
    btf_log_level: u32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_LINK_CREATE with its `uprobe_multi` part.
#[repr(C)]
#[derive(Default)]
struct UprobeMultiLinkAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: u32,
}

fn bpf(cmd: libc::c_long, attr: *const u8, size: usize) -> std::io::Result<OwnedFd> {
    // Safety: `attr` points at `size` initialized bytes of a bpf_attr.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Safety: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Loads program `name` of the eBPF object `object` as a uprobe session
/// program whose map references point at `maps` (name and descriptor of
/// each map already created from the same object).
pub fn load_session_program(
    maps: &[(String, RawFd)],
    object: &[u8],
    name: &str,
) -> Result<OwnedFd> {
    let mut obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    // The object's BTF, as aya loads it for its own programs: without its
    // function info every function is static to the verifier, so the CFI
    // walk's global `tracer_unwind_step` would be verified again at each
    // call (over the 1M-instruction limit) instead of once on its own.
    let btf = match aya::features().btf() {
        Some(features) => match obj
            .fixup_and_sanitize_btf(features)
            .context("preparing the object's BTF")?
        {
            Some(btf) => Some(load_btf(&btf.to_bytes()).context("loading the object's BTF")?),
            None => None,
        },
        None => None,
    };
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    let defined = obj.maps.clone();
    let maps: Vec<(&str, RawFd, &aya_obj::Map)> = maps
        .iter()
        .filter_map(|(map_name, fd)| {
            defined
                .get(map_name)
                .map(|def| (map_name.as_str(), *fd, def))
        })
        .collect();
    // A map missing here would be resolved to another map of its ELF
    // section by aya-obj: refuse instead. (aya-log takes its map out of
    // `ebpf`, so load before its logger starts.)
    if let Some(missing) = defined
        .keys()
        .find(|name| !maps.iter().any(|(n, _, _)| n == name))
    {
        bail!("map {missing} is not available to the session program");
    }
    obj.relocate_maps(maps.into_iter(), &text_sections)
        .map_err(|e| anyhow!("{e}"))
        .context("relocating map references")?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| anyhow!("{e}"))
        .context("relocating calls")?;
    let program = obj
        .programs
        .get(name)
        .ok_or_else(|| anyhow!("eBPF object has no program {name}"))?;
    let function = obj
        .functions
        .get(&program.function_key())
        .ok_or_else(|| anyhow!("eBPF object has no code for {name}"))?;
    let instructions = &function.instructions;
    let license = CString::new("GPL")?;
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: instructions.len() as u32,
        insns: instructions.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_TRACE_UPROBE_SESSION,
        ..Default::default()
    };
    let func_info = function.func_info.func_info_bytes();
    let line_info = function.line_info.line_info_bytes();
    if let Some(btf) = &btf {
        attr.prog_btf_fd = btf.as_raw_fd() as u32;
        if function.func_info_rec_size > 0 {
            attr.func_info_rec_size = function.func_info_rec_size as u32;
            attr.func_info = func_info.as_ptr() as u64;
            attr.func_info_cnt = function.func_info.len() as u32;
        }
        if function.line_info_rec_size > 0 {
            attr.line_info_rec_size = function.line_info_rec_size as u32;
            attr.line_info = line_info.as_ptr() as u64;
            attr.line_info_cnt = function.line_info.len() as u32;
        }
    }
    for (slot, byte) in attr.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte;
    }
    let size = std::mem::size_of::<ProgLoadAttr>();
    match bpf(BPF_PROG_LOAD, (&raw const attr).cast(), size) {
        Ok(fd) => Ok(fd),
        Err(error) => {
            // Again with the verifier's log, for the message.
            let mut log = vec![0u8; 1 << 20];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = bpf(BPF_PROG_LOAD, (&raw const attr).cast(), size);
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "loading {name} as a uprobe session program: {error}{}",
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(" (verifier: {})", tail.join(" | "))
                }
            )
        }
    }
}

/// Loads BTF data into the kernel (BPF_BTF_LOAD).
fn load_btf(data: &[u8]) -> std::io::Result<OwnedFd> {
    let attr = BtfLoadAttr {
        btf: data.as_ptr() as u64,
        btf_size: data.len() as u32,
        ..Default::default()
    };
    bpf(
        BPF_BTF_LOAD,
        (&raw const attr).cast(),
        size_of::<BtfLoadAttr>(),
    )
}

/// Attaches session program `program` at `offsets` of the file `path` (its
/// path in the tracer's mount namespace), for process `pid` only, each
/// offset with its cookie. Dropping the descriptor detaches.
pub fn attach_session(
    program: &OwnedFd,
    path: &Path,
    offsets: &[u64],
    cookies: &[u64],
    pid: u32,
) -> std::io::Result<OwnedFd> {
    assert_eq!(offsets.len(), cookies.len());
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    uprobe_multi_link(
        program,
        BPF_TRACE_UPROBE_SESSION,
        &path,
        offsets,
        cookies,
        pid,
    )
}

/// BPF_LINK_CREATE of a `uprobe_multi` link (`attach_type`: plain or
/// session); `cookies` empty or one per offset.
fn uprobe_multi_link(
    program: &OwnedFd,
    attach_type: u32,
    path: &std::ffi::CStr,
    offsets: &[u64],
    cookies: &[u64],
    pid: u32,
) -> std::io::Result<OwnedFd> {
    let attr = UprobeMultiLinkAttr {
        prog_fd: program.as_raw_fd() as u32,
        attach_type,
        path: path.as_ptr() as u64,
        offsets: offsets.as_ptr() as u64,
        cookies: if cookies.is_empty() {
            0
        } else {
            cookies.as_ptr() as u64
        },
        cnt: offsets.len() as u32,
        pid,
        ..Default::default()
    };
    bpf(
        BPF_LINK_CREATE,
        (&raw const attr).cast(),
        std::mem::size_of::<UprobeMultiLinkAttr>(),
    )
}

// --- Feature probes (features/probe.rs): tiny maps and programs, made and closed
// at once, whose success or errno says what the running kernel has.

const BPF_MAP_CREATE: libc::c_long = 0;
/// `enum bpf_attach_type`: BPF_TRACE_UPROBE_MULTI (6.6+).
pub const BPF_TRACE_UPROBE_MULTI: u32 = 48;

/// `union bpf_attr` for BPF_MAP_CREATE, up to `map_flags`.
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// Creates a map; the probe closes it.
pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
) -> io::Result<OwnedFd> {
    let attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags,
    };
    bpf(
        BPF_MAP_CREATE,
        (&raw const attr).cast(),
        size_of::<MapCreateAttr>(),
    )
}

/// One eBPF instruction (`struct bpf_insn`), as the kernel reads it.
pub const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64
        | ((src as u64) << 12)
        | ((dst as u64) << 8)
        | ((off as u16 as u64) << 16)
        | ((imm as u32 as u64) << 32)
}

/// Loads `insns` as a GPL program of `prog_type` (with
/// `expected_attach_type`); on failure, the errno and the verifier's log.
pub fn load_program(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u64],
) -> Result<OwnedFd, (io::Error, String)> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 << 10];
    let attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type,
        ..Default::default()
    };
    bpf(
        BPF_PROG_LOAD,
        (&raw const attr).cast(),
        size_of::<ProgLoadAttr>(),
    )
    .map_err(|error| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        (error, String::from_utf8_lossy(&log[..end]).into_owned())
    })
}

/// Tries a `uprobe_multi` link of `program` on `path` at offset 0 for any
/// process: the errno says whether the kernel knows `attach_type` (EBADF
/// for a directory means it got as far as the path).
pub fn try_uprobe_multi_link(
    program: &OwnedFd,
    attach_type: u32,
    path: &std::ffi::CStr,
) -> io::Result<OwnedFd> {
    uprobe_multi_link(program, attach_type, path, &[0], &[], 0)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

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

    #[test]
    fn attr_layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 112);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_btf_fd), 72);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, func_info), 80);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, line_info), 96);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, attach_btf_id), 108);
        assert_eq!(std::mem::size_of::<BtfLoadAttr>(), 32);
        assert_eq!(std::mem::offset_of!(BtfLoadAttr, btf_log_level), 24);
        assert_eq!(std::mem::offset_of!(UprobeMultiLinkAttr, path), 16);
        assert_eq!(std::mem::offset_of!(UprobeMultiLinkAttr, cnt), 48);
        assert_eq!(std::mem::offset_of!(UprobeMultiLinkAttr, pid), 56);
    }
}
