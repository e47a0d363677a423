//! Builds the eBPF programs (`tracer-ebpf`, nightly, bpfel target) and puts
//! the object in OUT_DIR, where `kernel/programs.rs` embeds it with `include_bytes_aligned!`.
//!
//! This runs the same nested cargo build as aya-build 0.2.0's `build_ebpf`,
//! but handles its output differently: aya-build forwards every line the
//! nested cargo prints, progress included, as `cargo:warning`, so every fresh
//! build showed hundreds of warnings. Here the output is kept and shown only
//! when the build fails; on success only compiler warnings about the eBPF
//! crate itself are passed on (dependencies' lints are capped by cargo).

use std::{
    env, fs,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

const PACKAGE: &str = "tracer-ebpf";

fn main() -> Result<()> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("tracer has a parent directory")?;
    // The build-dependency on tracer-ebpf reruns this script when its library
    // target or tracer-common change; the programs are its binary target,
    // which that does not cover.
    for crate_dir in [PACKAGE, "tracer-common"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(crate_dir).display()
        );
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let build = run_nested_build(&mut nested_build_command(&out_dir)?)?;
    report(&build)?;
    copy_object(&build, &out_dir.join(PACKAGE))
}

/// A failed build: all its output, and an error. A successful one: its
/// compiler warnings only.
fn report(build: &NestedBuild) -> Result<()> {
    if !build.success {
        // Cargo's progress and summary first, the compiler's messages last,
        // next to the error below.
        eprintln!("{}", build.stderr);
        eprintln!("{}", build.diagnostics.join("\n\n"));
        bail!("building the eBPF programs ({PACKAGE}) failed; its output is above");
    }
    for line in build.diagnostics.iter().flat_map(|d| d.lines()) {
        println!("cargo:warning={line}");
    }
    Ok(())
}

fn copy_object(build: &NestedBuild, dst: &Path) -> Result<()> {
    let object = build
        .executables
        .iter()
        .find(|(name, _)| name == PACKAGE)
        .map(|(_, path)| path)
        .ok_or_else(|| anyhow!("the nested build reported no `{PACKAGE}` binary"))?;
    fs::copy(object, dst)
        .with_context(|| format!("cannot copy {} to {}", object.display(), dst.display()))?;
    Ok(())
}

/// `rustup run nightly cargo build` of the eBPF crate for the BPF target of
/// the host's byte order, with the flags aya-build passes.
fn nested_build_command(out_dir: &Path) -> Result<Command> {
    let endian = env::var("CARGO_CFG_TARGET_ENDIAN").context("CARGO_CFG_TARGET_ENDIAN not set")?;
    let target = match endian.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("unsupported endianness {other}"),
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    // As aya-build: every riscv64 variant is `riscv64` to aya-ebpf's cfg.
    let arch = if arch.starts_with("riscv64") {
        "riscv64"
    } else {
        &arch
    };

    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release"])
        .args(["--package", PACKAGE, "--bins", "--target", target])
        .arg("--message-format=json")
        // Nightly only: core for the BPF target is built from rust-src.
        .args(["-Z", "build-std=core"]);
    // A target dir of its own: the outer cargo holds a lock on its own
    // (rust-lang/cargo#6412). Not OUT_DIR/tracer-ebpf, where the object goes.
    cmd.arg("--target-dir").arg(out_dir.join("ebpf-target"));
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ]
    .join("\x1f");
    cmd.env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The outer cargo's compiler is the stable one; the nested build must
    // pick nightly's.
    cmd.env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    Ok(cmd)
}

/// What the nested cargo build said and produced.
struct NestedBuild {
    success: bool,
    /// Rendered compiler messages (warnings and errors), one per entry.
    diagnostics: Vec<String>,
    /// Cargo's own output: progress, and the summary of a failure.
    stderr: String,
    /// (target name, path) of each binary built.
    executables: Vec<(String, PathBuf)>,
}

fn run_nested_build(cmd: &mut Command) -> Result<NestedBuild> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?} (is rustup on PATH?)"))?;
    // Drained on its own thread so that neither pipe can fill and stall cargo.
    let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    let mut diagnostics = Vec::new();
    let mut executables = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("stdout is piped")).lines() {
        let line = line.context("reading the nested cargo's output")?;
        match serde_json::from_str::<Value>(&line) {
            Ok(message) => read_message(&message, &mut diagnostics, &mut executables),
            // Not a cargo message (a build script's own print): keep it.
            Err(_) => diagnostics.push(line),
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {cmd:?}"))?;
    Ok(NestedBuild {
        success: status.success(),
        diagnostics,
        stderr: stderr.join().unwrap_or_default(),
        executables,
    })
}

/// One line of `--message-format=json`: a compiler message or a built artifact.
fn read_message(
    message: &Value,
    diagnostics: &mut Vec<String>,
    executables: &mut Vec<(String, PathBuf)>,
) {
    match message["reason"].as_str() {
        Some("compiler-message") => {
            if let Some(rendered) = message["message"]["rendered"].as_str() {
                diagnostics.push(rendered.trim_end().to_owned());
            }
        }
        Some("compiler-artifact") => {
            if let (Some(name), Some(path)) = (
                message["target"]["name"].as_str(),
                message["executable"].as_str(),
            ) {
                executables.push((name.to_owned(), PathBuf::from(path)));
            }
        }
        _ => {}
    }
}
