//! `cargo xtask setup`: make this machine able to build the eBPF programs and
//! run the tests. Each step checks first and only acts (and prints) when
//! something is missing, so a second run is silent.

use std::{env, fs, os::unix::fs::symlink, path::PathBuf};

use anyhow::{bail, Context, Result};

use crate::{cmd, output, run as run_cmd};

/// Needed by the end-to-end tests and the demo: gcc/g++ build the C/C++
/// fixtures, valgrind is the tests' reference leak checker, tmux is used
/// by the tests and the demo, and the profile formats are checked by readers
/// the project did not write: `go tool pprof` (golang-go) reads pprof output,
/// python3-jsonschema validates speedscope output against speedscope's schema,
/// a real Prometheus server scrapes `tracer serve`, and the C fixture is
/// traced under other allocators: jemalloc, tcmalloc and mimalloc
/// (preloaded), musl (musl-gcc, static and dynamic).
const APT_PACKAGES: &[&str] = &[
    "gcc",
    "g++",
    "valgrind",
    "tmux",
    "golang-go",
    "python3-jsonschema",
    "prometheus",
    "libjemalloc2",
    "libtcmalloc-minimal4",
    "libgoogle-perftools4",
    "libmimalloc2.0",
    "musl-tools",
    // A real server built without frame pointers, for the CFI unwinding test.
    "redis-server",
    "redis-tools",
];

/// bpf-linker must be linked against the same LLVM major as rustc nightly.
const BPF_LINKER: &str = "bpf-linker@0.13.0";

pub fn run() -> Result<()> {
    // apt first: building bpf-linker needs a C/C++ toolchain.
    apt_packages()?;
    nightly()?;
    bpf_linker()?;
    tracefs();
    Ok(())
}

fn is_root() -> bool {
    output(cmd("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}

fn apt_packages() -> Result<()> {
    apt_install(APT_PACKAGES)
}

/// Installs the Debian packages of `packages` that are missing (as root).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    if output(cmd("dpkg-query").arg("--version")).is_none() {
        println!(
            "setup: warning: no dpkg here; make sure these are installed: {}",
            packages.join(" ")
        );
        return Ok(());
    }
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| {
            let status = output(cmd("dpkg-query").args(["-W", "-f=${Status}", pkg]));
            status.as_deref() != Some("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!("missing packages: {list}\nrun as root: apt-get update && apt-get install -y {list}");
    }
    println!("setup: installing {list} (apt)");
    run_cmd(cmd("apt-get").args(["update", "-q"]).stdout(quiet()))?;
    run_cmd(
        cmd("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(quiet()),
    )
}

/// apt's progress output is noise on success; its errors go to stderr anyway.
fn quiet() -> std::process::Stdio {
    std::process::Stdio::null()
}

/// The eBPF crate is built with nightly and `-Z build-std=core`, which needs rust-src.
fn nightly() -> Result<()> {
    let toolchains = output(cmd("rustup").args(["toolchain", "list"]))
        .context("rustup not found; install it from https://rustup.rs")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: installing rust nightly toolchain (with rust-src)");
        return run_cmd(cmd("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]));
    }
    let sysroot = nightly_sysroot()?;
    if !sysroot.join("lib/rustlib/src/rust/library").is_dir() {
        println!("setup: installing rust-src for nightly");
        run_cmd(cmd("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = output(cmd("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("`rustc +nightly --print sysroot` failed")?;
    Ok(PathBuf::from(sysroot.trim()))
}

/// bpf-linker from crates.io, built against the nightly's own libLLVM (no
/// system LLVM of the right version exists on Debian 12).
fn bpf_linker() -> Result<()> {
    if output(cmd("bpf-linker").arg("--version")).is_some() {
        return Ok(());
    }
    let version =
        output(cmd("rustc").args(["+nightly", "-vV"])).context("`rustc +nightly -vV` failed")?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("no `LLVM version:` line in `rustc +nightly -vV`")?
        .to_string();

    // The real shared library is libLLVM.so.<major>.*; libLLVM-<major>-rust-*.so
    // next to it is only a linker script, which llvm-sys cannot use.
    let sysroot_lib = nightly_sysroot()?.join("lib");
    let prefix = format!("libLLVM.so.{major}.");
    let lib = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("reading {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .with_context(|| format!("no {prefix}* in {}", sysroot_lib.display()))?;

    // A stable LLVM_PREFIX: the built bpf-linker keeps an rpath to it.
    let home = env::var_os("HOME").context("HOME is not set")?;
    let llvm = PathBuf::from(home).join(".local/share/tracer-toolchain/llvm");
    let llvm_lib = llvm.join("lib");
    fs::create_dir_all(&llvm_lib).with_context(|| format!("creating {}", llvm_lib.display()))?;
    for link in [
        llvm_lib.join("libLLVM.so"),
        llvm_lib.join(lib.file_name().unwrap()),
    ] {
        let _ = fs::remove_file(&link);
        symlink(&lib, &link).with_context(|| format!("linking {}", link.display()))?;
    }

    println!(
        "setup: installing {BPF_LINKER} against nightly's LLVM {major} (takes a minute or two)"
    );
    run_cmd(
        cmd("cargo")
            .args([
                "install",
                "--quiet", // errors still show; the build log does not
                BPF_LINKER,
                "--locked",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &llvm),
    )?;
    if output(cmd("bpf-linker").arg("--version")).is_none() {
        bail!("bpf-linker was installed but does not run; is cargo's bin directory on PATH?");
    }
    Ok(())
}

/// Tracepoints need tracefs, which these machines do not mount at boot.
/// Heap tracing (uprobes) works without it, so failure is only a warning.
fn tracefs() {
    if std::path::Path::new("/sys/kernel/tracing/events").exists() {
        return;
    }
    let mounted = is_root()
        && output(cmd("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])).is_some();
    if mounted {
        println!("setup: mounted tracefs at /sys/kernel/tracing");
    } else {
        println!(
            "setup: warning: tracefs is not mounted (as root: mount -t tracefs tracefs /sys/kernel/tracing); heap tracing works without it"
        );
    }
}
