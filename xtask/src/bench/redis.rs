//! Part 5: a real server from Debian's packages that uses jemalloc:
//! redis-server (Debian links it against libjemalloc2), driven by its own
//! load client, redis-benchmark, on loopback. Requests/s untraced, with
//! no-op programs (the traps alone), traced exactly, and sampled every
//! 512 KiB.

use std::{
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    command_line::shown,
    options::Sizes,
    process::{reap_detachers, wait_or_kill},
};
use crate::cmd;

/// The command lines, shared with the end-to-end tests.
#[path = "../../../tests/src/redis.rs"]
mod redis_command;

const SERVER: &str = "/usr/bin/redis-server";

/// The variants: a name, the tracer's arguments before the server's command
/// line (none: untraced), and a library to preload. On jemalloc: untraced,
/// the no-op floors (empty programs at the same addresses: what the traps
/// alone cost, exact and sampled), exact with frame-pointer stacks, exact
/// (the default, CFI stacks), sampled; then the same server with glibc's
/// malloc preloaded (the comparison: what the allocator changes).
/// Each traced variant is compared with the untraced one of its allocator
/// (`baseline`).
pub const MODES: [(&str, &[&str], Option<&str>); 10] = [
    ("untraced", &[], None),
    (
        "no-op programs (floor of exact)",
        &["run", "--noop-probes", "-o", "/dev/null", "--"],
        None,
    ),
    (
        "no-op session programs, no return (floor of sampled)",
        &[
            "run",
            "--noop-probes",
            "--sample-rate",
            "512k",
            "-o",
            "/dev/null",
            "--",
        ],
        None,
    ),
    (
        "tracer (exact), --unwind fp",
        &["run", "--unwind", "fp", "-o", "/dev/null", "--"],
        None,
    ),
    ("tracer (exact)", &["run", "-o", "/dev/null", "--"], None),
    (
        "tracer, sampling every 512 KiB",
        &["run", "--sample-rate", "512k", "-o", "/dev/null", "--"],
        None,
    ),
    ("untraced, glibc malloc", &[], Some(GLIBC)),
    (
        "no-op programs (floor of exact), glibc malloc",
        &["run", "--noop-probes", "-o", "/dev/null", "--"],
        Some(GLIBC),
    ),
    (
        "tracer (exact), glibc malloc",
        &["run", "-o", "/dev/null", "--"],
        Some(GLIBC),
    ),
    (
        "tracer, sampling every 512 KiB, glibc malloc",
        &["run", "--sample-rate", "512k", "-o", "/dev/null", "--"],
        Some(GLIBC),
    ),
];

/// Positions in `MODES` the report names.
pub const UNTRACED: usize = 0;
pub const NOOP: usize = 1;
pub const NOOP_SAMPLED: usize = 2;
pub const EXACT_FP: usize = 3;
pub const EXACT: usize = 4;
pub const SAMPLED: usize = 5;
pub const GLIBC_UNTRACED: usize = 6;
pub const GLIBC_NOOP: usize = 7;
pub const GLIBC_EXACT: usize = 8;
pub const GLIBC_SAMPLED: usize = 9;

/// The untraced variant to compare variant `i` with: its allocator's.
pub fn baseline(i: usize) -> usize {
    if MODES[i].2.is_some() {
        GLIBC_UNTRACED
    } else {
        UNTRACED
    }
}

/// Preloading the C library makes its malloc the one redis calls.
const GLIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

pub struct RedisResults {
    /// [mode][run]: requests/s over all of `BENCHMARK_TESTS` (their mean).
    pub rps: Vec<Vec<f64>>,
    /// Per mode: "name: `server command` and `client command`".
    pub commands: Vec<String>,
    pub requests: u64,
}

/// Runs every variant `sizes.reps` times, interleaved; None when
/// redis-server is not installed.
pub fn measure(tracer: &Path, sizes: &Sizes) -> Result<Option<RedisResults>> {
    if !Path::new(SERVER).exists() {
        println!("bench: redis left out: {SERVER} missing (apt-get install redis-server)");
        return Ok(None);
    }
    let requests = sizes.http_seconds * 20_000;
    let mut rps = vec![Vec::new(); MODES.len()];
    let mut commands = Vec::new();
    for rep in 0..sizes.reps {
        for (i, (name, prefix, preload)) in MODES.iter().enumerate() {
            println!("bench: redis {}/{}: {name}", rep + 1, sizes.reps);
            let port = free_port()?;
            let mut server = start(tracer, prefix, *preload, port)?;
            wait_until_listening(&mut server, port, name)?;
            let client = client_args(port, requests);
            rps[i].push(run_client(&client)?);
            stop(&mut server, port)?;
            if rep == 0 {
                commands.push(command_line(tracer, name, prefix, *preload, requests));
            }
        }
    }
    Ok(Some(RedisResults {
        rps,
        commands,
        requests,
    }))
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

use redis_command::{benchmark_args, server_args};

fn start(tracer: &Path, prefix: &[&str], preload: Option<&str>, port: u16) -> Result<Child> {
    let args = server_args(&port.to_string());
    let mut command = if prefix.is_empty() {
        cmd(SERVER)
    } else {
        let mut c = cmd(tracer);
        c.args(prefix).arg(SERVER);
        c
    };
    if let Some(lib) = preload {
        command.env("LD_PRELOAD", lib);
    }
    Ok(command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Waits (up to 30 s) until the server accepts connections.
fn wait_until_listening(server: &mut Child, port: u16, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline || server.try_wait()?.is_some() {
            let _ = server.kill();
            bail!("{name}: redis-server did not start listening");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn client_args(port: u16, requests: u64) -> Vec<String> {
    benchmark_args(&port.to_string(), requests)
}

/// Runs redis-benchmark; the mean of its tests' requests/s.
fn run_client(args: &[String]) -> Result<f64> {
    let out = Command::new("redis-benchmark")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .context("running redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps",... then "SET","98039.22",...
    let rps: Vec<f64> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(1)?.trim_matches('"').parse().ok())
        .collect();
    if rps.is_empty() {
        bail!("no requests/s in redis-benchmark's output: {text}");
    }
    Ok(rps.iter().sum::<f64>() / rps.len() as f64)
}

/// Shuts the server down and waits for it and the tracer's detaching.
fn stop(server: &mut Child, port: u16) -> Result<()> {
    let _ = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "shutdown", "nosave"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    wait_or_kill(server, Duration::from_secs(30))?;
    reap_detachers();
    Ok(())
}

fn command_line(
    tracer: &Path,
    name: &str,
    prefix: &[&str],
    preload: Option<&str>,
    requests: u64,
) -> String {
    let server = shown(Path::new(SERVER), &server_args("$PORT")).replace("--save  ", "--save '' ");
    let server = if prefix.is_empty() {
        server
    } else {
        let prefix: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        format!("{} {server}", shown(tracer, &prefix))
    };
    let server = match preload {
        Some(lib) => format!("LD_PRELOAD={lib} {server}"),
        None => server,
    };
    let client = client_args(0, requests)
        .join(" ")
        .replacen("-p 0", "-p $PORT", 1);
    format!("{name}: `{server}` and `redis-benchmark {client}`")
}
