//! `cargo xtask test-kernels`: the end-to-end subset on other kernels.
//! Debian's kernels are fetched into a cache (private apt configuration),
//! each booted under qemu with the host's root file system shared read-only,
//! and the host-built test binaries run inside unchanged. Prints a
//! kernel-by-test table; fails if any kernel fails (except one listed in
//! expected.rs, and then only while it still fails).

mod apt;
mod doctor;
pub mod expected;
mod fetch;
mod initramfs;
mod qemu;
mod subset;
mod table;

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub const USAGE: &str = "cargo xtask test-kernels [--kernel SPEC[,SPEC..]] [--jobs N] [--timeout MINUTES] [--refresh] [--tracer PATH] [--repeat N]
  SPEC: a Debian kernel version prefix (5.10, 6.1, 6.12, 7.3.4), `newest`, or `host` (natively)
  default kernels: 5.10,6.1,6.12,6.18,newest; --jobs: guests at once (default: the number of CPUs);
  --timeout: per kernel (default 15); --refresh: update the package lists now (else daily);
  --tracer: test this tracer binary instead of building one; --repeat: run the subset N times";

const DEFAULT_KERNELS: &str = "5.10,6.1,6.12,6.18,newest";

struct Options {
    kernels: Vec<String>,
    jobs: usize,
    timeout: Duration,
    refresh: bool,
    tracer: Option<PathBuf>,
    repeat: u32,
}

fn options(args: &[OsString]) -> Result<Options> {
    let mut o = Options {
        kernels: Vec::new(),
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
        timeout: Duration::from_secs(15 * 60),
        refresh: false,
        tracer: None,
        repeat: 1,
    };
    let mut args = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--kernel" => o.kernels.extend(value()?.split(',').map(str::to_string)),
            "--jobs" => o.jobs = value()?.parse().context("--jobs")?,
            "--timeout" => {
                o.timeout = Duration::from_secs(value()?.parse::<u64>().context("--timeout")? * 60)
            }
            "--refresh" => o.refresh = true,
            "--repeat" => o.repeat = value()?.parse().context("--repeat")?,
            "--tracer" => o.tracer = Some(fs::canonicalize(value()?).context("--tracer")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown option '{other}'\n{USAGE}"),
        }
    }
    if o.kernels.is_empty() {
        o.kernels = DEFAULT_KERNELS.split(',').map(str::to_string).collect();
    }
    o.jobs = o.jobs.max(1);
    Ok(o)
}

/// Where fetched kernels and the private apt state are kept across runs.
fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("TRACER_KERNEL_CACHE") {
        return dir.into();
    }
    let base = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(crate::target_dir);
    base.join("tracer-kernels")
}

/// One column of the matrix: a kernel to boot, or the host's own.
pub struct Column {
    /// The column's heading: the kernel's release (`5.10.0-32`, `host 6.18.4`).
    pub name: String,
    /// The kernel's version, as expected.rs matches it (`5.10.0-32`).
    pub abi: String,
    /// (vmlinux, initramfs); None for the host's own kernel.
    pub boot: Option<(PathBuf, PathBuf)>,
    dir: PathBuf,
}

/// What one column's run gave.
pub struct Run {
    pub exit: Option<i32>,
    pub output: String,
    pub seconds: f64,
}

pub fn run(args: &[OsString]) -> Result<()> {
    let o = options(args)?;
    let tracer = match &o.tracer {
        Some(path) => path.clone(),
        None => crate::build(&[])?,
    };
    let binaries = subset::build_tests()?;
    let cache = cache_dir();
    let out_dir = crate::target_dir().join("kernels");
    let script_path = out_dir.join("subset.sh");
    fs::create_dir_all(&out_dir)?;

    let kvm = qemu::real_kvm();
    let slowdown = if kvm { 3 } else { subset::TCG_SLOWDOWN };
    // Renamed into place: a shell of another run still reading the old one keeps it.
    let new_script = out_dir.join(format!("subset.sh.{}", std::process::id()));
    fs::write(
        &new_script,
        subset::script(&tracer, &binaries, slowdown, o.repeat),
    )?;
    fs::rename(&new_script, &script_path)?;

    let columns = columns(&o, &cache, &out_dir)?;
    println!(
        "kernels: {} column(s), {} at once, {} (timeout {} min each)",
        columns.len(),
        o.jobs,
        if kvm {
            "KVM"
        } else {
            "software emulation (TCG)"
        },
        o.timeout.as_secs() / 60
    );
    let started = Instant::now();
    let runs: Vec<Mutex<Option<Run>>> = columns.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..o.jobs.min(columns.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(column) = columns.get(i) else { break };
                let result = run_column(column, &script_path, o.timeout, kvm);
                let run = result.unwrap_or_else(|err| Run {
                    exit: None,
                    output: format!("xtask: {err:#}\n"),
                    seconds: 0.0,
                });
                *runs[i].lock().unwrap() = Some(run);
            });
        }
    });
    let runs: Vec<Run> = runs
        .into_iter()
        .map(|r| r.into_inner().unwrap().expect("every column ran"))
        .collect();
    let failed = table::print(&columns, &runs, started.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!("kernel matrix failed: {}", failed.join("; "));
    }
    Ok(())
}

/// The columns asked for: Debian kernels fetched (with their initramfs
/// written), then the host's own if `host` was.
fn columns(o: &Options, cache: &Path, out_dir: &Path) -> Result<Vec<Column>> {
    let mut columns = Vec::new();
    if o.kernels.iter().any(|k| k != "host") {
        qemu::ensure_installed(cache)?;
        let apt = apt::Apt::new(cache.join("apt"), fetch::SUITES)?;
        apt.update(o.refresh)?;
        for spec in o.kernels.iter().filter(|k| *k != "host") {
            let mut kernel = fetch::resolve(&apt, spec)?;
            let fetched = match fetch::fetch(&apt, &kernel, cache) {
                Ok(fetched) => fetched,
                Err(err) => {
                    // Lists a day old may name a version the archive has dropped.
                    println!("kernels: {err:#}; updating the package lists and trying again");
                    apt.update(true)?;
                    kernel = fetch::resolve(&apt, spec)?;
                    fetch::fetch(&apt, &kernel, cache)?
                }
            };
            let dir = out_dir.join(&kernel.abi);
            fs::create_dir_all(&dir)?;
            let initrd = dir.join("initramfs.cpio");
            initramfs::write(&initrd, &fetched.modules)?;
            println!("kernels: {spec} is {} ({})", kernel.abi, kernel.version);
            columns.push(Column {
                name: kernel.abi.clone(),
                abi: kernel.abi.clone(),
                boot: Some((fetched.vmlinux, initrd)),
                dir,
            });
        }
    }
    if o.kernels.iter().any(|k| k == "host") {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease")?;
        columns.push(Column {
            name: format!("host {}", release.trim()),
            abi: release.trim().to_string(),
            boot: None,
            dir: out_dir.join("host"),
        });
    }
    Ok(columns)
}

fn run_column(
    column: &Column,
    script: &std::path::Path,
    timeout: Duration,
    kvm: bool,
) -> Result<Run> {
    fs::create_dir_all(&column.dir)?;
    let output = column.dir.join("output.log");
    let Some((vmlinux, initramfs)) = &column.boot else {
        // The host's own kernel: the same script, natively.
        let start = Instant::now();
        let result = std::process::Command::new("sh")
            .arg(script)
            .stdin(std::process::Stdio::null())
            .output()?;
        let mut text = String::from_utf8_lossy(&result.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&result.stderr));
        fs::write(&output, &text)?;
        return Ok(Run {
            exit: result.status.code(),
            output: text,
            seconds: start.elapsed().as_secs_f64(),
        });
    };
    let outcome = qemu::Boot {
        vmlinux,
        initramfs,
        script,
        output,
        console: column.dir.join("console.log"),
        timeout,
        kvm,
        label: column.name.clone(),
    }
    .run()?;
    Ok(Run {
        exit: outcome.exit,
        output: outcome.output,
        seconds: outcome.seconds,
    })
}
