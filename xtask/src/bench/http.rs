//! Part 2: a small HTTP server (bench/fixtures/http_server.c) driven by wrk
//! on loopback: requests/s untraced and traced.

use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    command_line::shown,
    fixtures::Fixtures,
    options::Sizes,
    process::{reap_detachers, wait_or_kill},
};
use crate::cmd;

/// The variants: a name, and the tracer's arguments before the server's
/// command line (none: the server runs untraced). The report reads them by
/// position: untraced, traced, sampled, sampled with uprobe+uretprobe.
pub const MODES: [(&str, &[&str]); 4] = [
    ("untraced", &[]),
    ("tracer", &["run", "-o", "/dev/null", "--"]),
    (
        "tracer, sampling every 512 KiB",
        &["run", "--sample-rate", "512k", "-o", "/dev/null", "--"],
    ),
    (
        "tracer, sampling every 512 KiB, uprobe+uretprobe",
        &[
            "run",
            "--sample-rate",
            "512k",
            "--uprobe-sessions",
            "never",
            "-o",
            "/dev/null",
            "--",
        ],
    ),
];

pub struct HttpResults {
    /// Per variant of `MODES`: the requests/s of each run.
    pub rps: Vec<Vec<f64>>,
    /// Per variant: "name: `server command` and `wrk command`".
    pub commands: Vec<String>,
}

/// Runs every variant `sizes.reps` times, interleaved.
pub fn measure(tracer: &Path, fixtures: &Fixtures, sizes: &Sizes) -> Result<HttpResults> {
    let mut rps: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    let mut commands: Vec<String> = Vec::new();
    for rep in 0..sizes.reps {
        for (i, (name, prefix)) in MODES.iter().enumerate() {
            println!("bench: http {}/{}: {name}", rep + 1, sizes.reps);
            rps[i].push(run_once(tracer, fixtures, sizes, name, prefix)?);
            if rep == 0 {
                commands.push(command_line(tracer, fixtures, sizes, name, prefix));
            }
        }
    }
    Ok(HttpResults { rps, commands })
}

/// One run of the server under one variant, loaded by wrk: its requests/s.
fn run_once(
    tracer: &Path,
    fixtures: &Fixtures,
    sizes: &Sizes,
    name: &str,
    prefix: &[&str],
) -> Result<f64> {
    let port = free_port()?;
    let mut server = start_server(tracer, fixtures, prefix, port)?;
    wait_until_listening(&mut server, port, name)?;
    let rps = run_wrk(&wrk_args(sizes, port))?;
    stop_server(&mut server, port)?;
    Ok(rps)
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The server on `port`, under the tracer unless `prefix` is empty.
fn start_server(tracer: &Path, fixtures: &Fixtures, prefix: &[&str], port: u16) -> Result<Child> {
    let server = if prefix.is_empty() {
        cmd(&fixtures.http_server)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .spawn()?
    } else {
        cmd(tracer)
            .args(prefix)
            .arg(&fixtures.http_server)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?
    };
    Ok(server)
}

/// Waits (up to 30 s) until the server accepts connections.
fn wait_until_listening(server: &mut Child, port: u16, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline || server.try_wait()?.is_some() {
            let _ = server.kill();
            bail!("{name}: the HTTP server did not start listening");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn wrk_args(sizes: &Sizes, port: u16) -> Vec<String> {
    vec![
        "-t1".to_string(),
        "-c4".to_string(),
        format!("-d{}s", sizes.http_seconds),
        format!("http://127.0.0.1:{port}/"),
    ]
}

/// Runs wrk; its requests/s.
fn run_wrk(args: &[String]) -> Result<f64> {
    let out = Command::new("wrk")
        .args(args)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {text}"))
}

/// Asks the server to quit (GET /quit) and waits for it and, if traced, the
/// tracer's detaching.
fn stop_server(server: &mut Child, port: u16) -> Result<()> {
    if let Ok(mut quit) = TcpStream::connect(("127.0.0.1", port)) {
        let _ = quit.write_all(b"GET /quit HTTP/1.1\r\n\r\n");
    }
    wait_or_kill(server, Duration::from_secs(30))?;
    reap_detachers();
    Ok(())
}

/// "name: `server command` and `wrk command`", the port a variable.
fn command_line(
    tracer: &Path,
    fixtures: &Fixtures,
    sizes: &Sizes,
    name: &str,
    prefix: &[&str],
) -> String {
    let server_cmd = shown(&fixtures.http_server, &["$PORT".to_string()]);
    let server_cmd = if prefix.is_empty() {
        server_cmd
    } else {
        format!(
            "{} {server_cmd}",
            shown(
                tracer,
                &prefix.iter().map(|s| s.to_string()).collect::<Vec<_>>()
            )
        )
    };
    format!(
        "{name}: `{server_cmd}` and `wrk {}`",
        wrk_args(sizes, 0).join(" ").replace(":0/", ":$PORT/")
    )
}
