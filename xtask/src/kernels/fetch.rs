//! Debian kernels, fetched once into the cache without being installed:
//! `apt-get download` of the image (and, from 7.x on, its split
//! `linux-binary-*`/`linux-modules-*` packages), `dpkg-deb -x`, then the
//! uncompressed vmlinux (booted through its PVH entry, which skips the
//! decompressor: seconds under emulation) and the few modules the guest needs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use super::apt::Apt;
use crate::{output, run};

/// The suites kernels come from: Debian 11, 12, 13, 13's backports and unstable.
pub const SUITES: &[&str] = &["bullseye", "bookworm", "trixie", "trixie-backports", "sid"];

/// What the guest needs as modules (Debian builds them as modules), in load
/// order; their dependencies are added before them. Missing ones are
/// skipped (built in, or not needed on that version, like netfs before 5.13).
const MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "virtio_console",
    "overlay",
];

/// A kernel resolved to packages in the index.
pub struct Kernel {
    /// Debian's ABI name: `5.10.0-32`, `7.3.4+deb13`.
    pub abi: String,
    /// The package version: `5.10.223-1`.
    pub version: String,
    packages: Vec<String>,
}

/// A fetched kernel, ready to boot.
pub struct Fetched {
    pub vmlinux: PathBuf,
    /// Modules to load, in order (uncompressed).
    pub modules: Vec<PathBuf>,
}

/// The numbers in an ABI name, for ordering: `6.12.117+deb13` -> [6, 12, 117, 13].
fn numbers(abi: &str) -> Vec<u64> {
    abi.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

/// The generic amd64 flavour only (not cloud, which lacks 9p, nor rt).
fn abi_of(package: &str) -> Option<&str> {
    let abi = package
        .strip_prefix("linux-image-")?
        .strip_suffix("-amd64")?;
    let plain = abi.starts_with(|c: char| c.is_ascii_digit())
        && !abi.contains("cloud")
        && !abi.contains("rt")
        && !abi.contains("dbg");
    plain.then_some(abi)
}

/// `spec` is a version prefix (`5.10`, `6.12`, `7.3.4`) or `newest`; the
/// newest matching kernel whose modules are in the index wins.
pub fn resolve(apt: &Apt, spec: &str) -> Result<Kernel> {
    // One apt-cache call: each takes seconds with five suites' lists.
    let names = apt.names("linux-")?;
    let with = |prefix: &'static str| names.iter().filter(move |n| n.starts_with(prefix));
    let binaries: Vec<&String> = with("linux-binary-").collect();
    let module_packages: Vec<&String> = with("linux-modules-").collect();
    let mut candidates: Vec<(&str, Vec<String>)> = with("linux-image-")
        .filter_map(|p| abi_of(p))
        .filter(|abi| spec == "newest" || abi.starts_with(&format!("{spec}.")) || *abi == spec)
        .filter_map(|abi| {
            let binary = format!("linux-binary-{abi}-amd64");
            let modules = format!("linux-modules-{abi}-amd64");
            if binaries.contains(&&binary) {
                // Split packages: without the modules package there is no 9p.
                module_packages
                    .contains(&&modules)
                    .then(|| (abi, vec![binary, modules]))
            } else {
                Some((abi, vec![format!("linux-image-{abi}-amd64")]))
            }
        })
        .collect();
    candidates.sort_by_key(|(abi, _)| numbers(abi));
    let Some((abi, packages)) = candidates.pop() else {
        bail!(
            "no Debian kernel matches '{spec}' (suites: {})",
            SUITES.join(", ")
        );
    };
    let version = apt.version(&packages[0]).unwrap_or_else(|| abi.to_string());
    Ok(Kernel {
        abi: abi.to_string(),
        version,
        packages,
    })
}

/// Downloads and unpacks `kernel` into `cache/<abi>` unless already there.
pub fn fetch(apt: &Apt, kernel: &Kernel, cache: &Path) -> Result<Fetched> {
    let dir = cache.join(&kernel.abi);
    let vmlinux = dir.join("vmlinux");
    let modules_dir = dir.join("modules");
    let order = modules_dir.join("order");
    // Which modules were asked for: a change in MODULES fetches again.
    let wanted = dir.join("wanted");
    if !vmlinux.is_file()
        || !order.is_file()
        || fs::read_to_string(&wanted).ok().as_deref() != Some(&*MODULES.join(","))
    {
        println!(
            "kernels: fetching {} ({})",
            kernel.abi,
            kernel.packages.join(" ")
        );
        let _ = fs::remove_dir_all(&dir);
        let debs = dir.join("debs");
        let root = dir.join("root");
        fs::create_dir_all(&debs)?;
        run(apt
            .command("apt-get")
            .args(["download", "-qq"])
            .args(&kernel.packages)
            .current_dir(&debs))?;
        for deb in fs::read_dir(&debs)? {
            run(Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb?.path())
                .arg(&root))?;
        }
        let modules_root = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| root.join(d).join(format!("{}-amd64", kernel.abi)))
            .find(|d| d.is_dir())
            .context("no lib/modules/<version> in the kernel packages")?;
        let vmlinuz = [
            root.join(format!("boot/vmlinuz-{}-amd64", kernel.abi)),
            modules_root.join("vmlinuz"),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .context("no vmlinuz in the kernel packages")?;
        extract_vmlinux(&vmlinuz, &vmlinux)?;
        fs::create_dir_all(&modules_dir)?;
        let names = copy_modules(&modules_root, &modules_dir)?;
        fs::write(&order, names.join("\n") + "\n")?;
        fs::write(&wanted, MODULES.join(","))?;
        // Only vmlinux and the few modules are kept.
        fs::remove_dir_all(&root)?;
        fs::remove_dir_all(&debs)?;
    }
    let modules = fs::read_to_string(&order)?
        .lines()
        .filter(|l| !l.is_empty())
        .map(|name| modules_dir.join(format!("{name}.ko")))
        .collect();
    Ok(Fetched { vmlinux, modules })
}

/// The ELF kernel inside a bzImage, found as scripts/extract-vmlinux does:
/// try each compressor's magic bytes and keep the first stream that
/// decompresses into an ELF file.
fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    let image = fs::read(vmlinuz)?;
    let formats: [(&[u8], &str); 3] = [
        (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
        (&[0x1f, 0x8b, 0x08], "gzip"),
    ];
    for (magic, tool) in formats {
        for start in image
            .windows(magic.len())
            .enumerate()
            .filter(|(_, w)| *w == magic)
            .map(|(i, _)| i)
        {
            let mut child = Command::new(tool)
                .args(["-dc", "-q"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("running {tool}"))?;
            let mut stdin = child.stdin.take().unwrap();
            let data = image[start..].to_vec();
            // Trailing bytes after the stream make the tool complain; the
            // output is still complete, so its exit status is not checked.
            let writer = std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(&data);
            });
            let result = child.wait_with_output()?;
            let _ = writer.join();
            if result.stdout.starts_with(b"\x7fELF") {
                fs::write(out, &result.stdout)?;
                return Ok(());
            }
        }
    }
    bail!("no compressed ELF kernel found in {}", vmlinuz.display())
}

/// Copies MODULES and their dependencies (by `modinfo -F depends`),
/// dependencies first, uncompressed; returns the load order.
fn copy_modules(modules_root: &Path, out: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    walk(&modules_root.join("kernel"), &mut files)?;
    let mut order: Vec<String> = Vec::new();
    for name in MODULES {
        visit(name, &files, &mut order)?;
    }
    for name in &order {
        let path = module_path(&files, name).unwrap();
        let target = out.join(format!("{name}.ko"));
        let file = path.to_string_lossy();
        if file.ends_with(".ko") {
            fs::copy(path, &target)?;
        } else {
            let tool = if file.ends_with(".zst") { "zstd" } else { "xz" };
            let data = Command::new(tool).args(["-dc"]).arg(path).output()?;
            if !data.status.success() {
                bail!("{tool} -dc {file} failed");
            }
            fs::write(&target, data.stdout)?;
        }
    }
    Ok(order)
}

/// The file of module `name` (`-` and `_` are the same in module names).
fn module_path<'a>(files: &'a [PathBuf], name: &str) -> Option<&'a PathBuf> {
    files.iter().find(|p| {
        let file = p.file_name().unwrap().to_string_lossy();
        let stem = file.split(".ko").next().unwrap_or_default();
        stem.replace('-', "_") == name.replace('-', "_")
    })
}

/// Adds `name`'s dependencies, then `name`, to `order` (once each).
fn visit(name: &str, files: &[PathBuf], order: &mut Vec<String>) -> Result<()> {
    if order.iter().any(|n| n == name) {
        return Ok(());
    }
    let Some(path) = module_path(files, name) else {
        return Ok(()); // built in
    };
    let deps = output(Command::new("modinfo").args(["-F", "depends"]).arg(path))
        .with_context(|| format!("modinfo {}", path.display()))?;
    for dep in deps.trim().split(',').filter(|d| !d.is_empty()) {
        visit(dep, files, order)?;
    }
    order.push(name.to_string());
    Ok(())
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, files)?;
        } else if path.to_string_lossy().contains(".ko") {
            files.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_generic_flavour_and_newest_by_numbers() {
        assert_eq!(abi_of("linux-image-5.10.0-32-amd64"), Some("5.10.0-32"));
        assert_eq!(abi_of("linux-image-7.3.4+deb13-amd64"), Some("7.3.4+deb13"));
        assert_eq!(abi_of("linux-image-6.1.0-50-cloud-amd64"), None);
        assert_eq!(abi_of("linux-image-6.1.0-50-rt-amd64"), None);
        assert_eq!(abi_of("linux-image-amd64"), None);
        assert_eq!(abi_of("linux-image-6.1.0-50-amd64-unsigned"), None);
        assert!(numbers("7.3.4+deb13") > numbers("7.2.13+deb14"));
        assert!(numbers("6.12.117+deb13") > numbers("6.12.95+deb12"));
        assert!(numbers("5.10.0-32") > numbers("5.10.0-30"));
    }
}
