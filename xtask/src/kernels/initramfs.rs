//! The guest's initramfs: busybox (static), init.sh as /init, and the
//! kernel's modules, written as an uncompressed newc cpio archive (the kernel
//! reads it directly; no cpio tool needed on the host).

use std::{fs, path::Path};

use anyhow::{Context, Result};

const BUSYBOX: &str = "/bin/busybox";
const INIT: &str = include_str!("init.sh");

/// Writes the initramfs for a kernel with `modules` (loaded in that order).
pub fn write(out: &Path, modules: &[std::path::PathBuf]) -> Result<()> {
    let busybox = fs::read(BUSYBOX)
        .with_context(|| format!("reading {BUSYBOX} (from the busybox-static package)"))?;
    let mut archive = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "modules", "host", "rw", "root"] {
        archive.dir(dir);
    }
    archive.file("bin/busybox", 0o755, &busybox);
    archive.file("init", 0o755, INIT.as_bytes());
    let mut order = String::new();
    for module in modules {
        let name = module.file_stem().unwrap().to_string_lossy().into_owned();
        archive.file(&format!("modules/{name}.ko"), 0o644, &fs::read(module)?);
        order.push_str(&name);
        order.push('\n');
    }
    archive.file("modules/order", 0o644, order.as_bytes());
    fs::write(out, archive.finish()).with_context(|| format!("writing {}", out.display()))
}

/// A newc ("070701") cpio archive in memory.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, contents: &[u8]) {
        self.entry(name, 0o100000 | perm, contents);
    }

    fn entry(&mut self, name: &str, mode: u32, contents: &[u8]) {
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            contents.len() as u32,
            0, // dev major
            0, // dev minor
            0, // rdev major
            0, // rdev minor
            name.len() as u32 + 1,
            0, // check
        ];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(contents);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}
