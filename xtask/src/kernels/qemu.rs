//! Booting a kernel under qemu with the host's root shared read-only, and
//! collecting what the guest's script printed.
//!
//! qemu comes from bookworm-backports (10.x): Debian 12's own qemu 7.2
//! crashed about one boot in five on 6.18 guests under TCG. It is installed
//! with a private apt configuration (bookworm + bookworm-backports only), so
//! the host's sources list is left as it was; the installed packages then
//! stay like any other.

use std::{
    fs,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::apt::Apt;
use crate::{output, run};

const QEMU: &str = "qemu-system-x86_64";
/// The oldest qemu booted many times here without a crash.
const MIN_MAJOR: u32 = 10;
/// The line init.sh ends the guest's output with.
pub const EXIT_MARKER: &str = "TRACER-MATRIX-EXIT ";

/// Installs qemu 10 from bookworm-backports, and busybox-static, if missing.
pub fn ensure_installed(cache: &Path) -> Result<()> {
    let major = output(Command::new(QEMU).arg("--version")).and_then(|v| {
        let version = v.split("version ").nth(1)?;
        version.split('.').next()?.parse::<u32>().ok()
    });
    let busybox = Path::new("/bin/busybox").is_file();
    if major.is_some_and(|m| m >= MIN_MAJOR) && busybox {
        return Ok(());
    }
    println!("kernels: installing qemu-system-x86 from bookworm-backports and busybox-static");
    let apt = Apt::new(
        cache.join("apt-qemu"),
        &[
            "bookworm",
            "bookworm-updates",
            "bookworm-security@debian-security",
            "bookworm-backports",
        ],
    )?;
    apt.update(true)?;
    run(apt
        .command("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args([
            "-t",
            "bookworm-backports",
            "qemu-system-x86",
            "busybox-static",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null()))?;
    // The downloaded .debs are no use once installed.
    run(apt.command("apt-get").arg("clean"))
}

/// KVM only when it is real: these machines have a /dev/kvm that is PVM
/// (kvm_pvm), which runs stock kernels about 1000x slower than TCG does.
pub fn real_kvm() -> bool {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virt_flags = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    Path::new("/dev/kvm").exists() && virt_flags && !Path::new("/sys/module/kvm_pvm").exists()
}

pub struct Boot<'a> {
    pub vmlinux: &'a Path,
    pub initramfs: &'a Path,
    /// The script the guest runs (a host path, seen in the guest as is).
    pub script: &'a Path,
    /// Where the guest's output goes, and its kernel console.
    pub output: PathBuf,
    pub console: PathBuf,
    pub timeout: Duration,
    pub kvm: bool,
    /// Prefix for the output lines echoed while the guest runs.
    pub label: String,
}

pub struct Outcome {
    /// The script's exit code; None if the guest never said (timeout, crash).
    pub exit: Option<i32>,
    pub output: String,
    pub seconds: f64,
}

impl Boot<'_> {
    /// Boots, echoes the guest's output as it comes, and returns when the
    /// guest powers off or the timeout kills it.
    pub fn run(&self) -> Result<Outcome> {
        fs::write(&self.output, "")?;
        let accel: &[&str] = if self.kvm {
            &["-accel", "kvm", "-cpu", "host"]
        } else {
            // One host thread for all vCPUs: multi-threaded TCG is where the
            // crashes were seen.
            &["-accel", "tcg,thread=single", "-cpu", "max"]
        };
        let mut command = Command::new(QEMU);
        command
            .args(accel)
            .args([
                "-M",
                "pc",
                "-m",
                "4G",
                "-smp",
                "2",
                "-nodefaults",
                "-no-reboot",
            ])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-kernel")
            .arg(self.vmlinux)
            .arg("-initrd")
            .arg(self.initramfs)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet mitigations=off rdinit=/init tracer.run={}",
                self.script.display()
            ))
            .arg("-serial")
            .arg(format!("file:{}", self.console.display()))
            .args([
                "-virtfs",
                "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
            ])
            .args(["-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!("file,id=out,path={}", self.output.display()))
            .args(["-device", "virtserialport,chardev=out,name=out"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = command.spawn().context("starting qemu")?;
        let mut echoed = 0usize;
        let mut pending = String::new();
        let mut hiding = false;
        let status = loop {
            self.echo(&mut echoed, &mut pending, &mut hiding);
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        self.echo(&mut echoed, &mut pending, &mut hiding);
        let seconds = start.elapsed().as_secs_f64();
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        let output = fs::read_to_string(&self.output).unwrap_or_default();
        let exit = output
            .lines()
            .find_map(|l| l.strip_prefix(EXIT_MARKER))
            .and_then(|code| code.trim().parse().ok());
        match status {
            None => println!(
                "{}: timed out after {:.0} s (console: {})",
                self.label,
                seconds,
                self.console.display()
            ),
            Some(status) if exit.is_none() => println!(
                "{}: qemu ended ({status}) before the guest said its exit code; console: {} {}",
                self.label,
                self.console.display(),
                stderr.trim()
            ),
            _ => {}
        }
        if status.is_some_and(|s| !s.success()) && exit.is_none() && !stderr.is_empty() {
            bail!("qemu failed: {}", stderr.trim());
        }
        Ok(Outcome {
            exit,
            output,
            seconds,
        })
    }

    /// Prints the output's complete new lines, prefixed with the label;
    /// doctor's JSON (read from the log later) is left out.
    fn echo(&self, echoed: &mut usize, pending: &mut String, hiding: &mut bool) {
        let Ok(mut file) = fs::File::open(&self.output) else {
            return;
        };
        if file.seek(SeekFrom::Start(*echoed as u64)).is_err() {
            return;
        }
        let mut new = Vec::new();
        if file.read_to_end(&mut new).is_err() {
            return;
        }
        *echoed += new.len();
        pending.push_str(&String::from_utf8_lossy(&new));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            if line.starts_with(super::doctor::BEGIN) {
                *hiding = true;
            }
            if !*hiding {
                println!("{}: {}", self.label, line.trim_end());
            }
            if line.starts_with(super::doctor::END) {
                *hiding = false;
            }
        }
    }
}
