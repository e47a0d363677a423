//! `tracer serve` end to end: a real Prometheus server (Debian's) scrapes it
//! while it traces a leaking fixture; a PromQL query sees the growth and an
//! alerting rule fires for the leaking stack only.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::*;

/// Kills and reaps a child (Prometheus) when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The growing fixture, once it is past its start (libc loaded, first
/// allocations made): attaching earlier would find no allocator yet.
fn start_growing(seconds: &str) -> Fixture {
    let growing = Fixture::spawn(Command::new(fixture("growing_c")).arg(seconds), "growing:");
    let line = &growing.startup;
    assert!(line.starts_with("growing:"), "{line}");
    growing
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET; None until something answers.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        sleep(Duration::from_millis(500));
    }
}

fn start_serve(fixture_pid: u32, port: u16) -> Tracer {
    TracerCmd::new("serve")
        .pid(fixture_pid)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .spawn()
}

fn start_prometheus(dir: &Path, target_port: u16, port: u16) -> Running {
    std::fs::write(
        dir.join("rules.yml"),
        "groups:\n\
         - name: leaks\n  rules:\n\
         \x20 - alert: MemoryLeakGrowing\n\
         \x20   expr: tracer_stack_growth_bytes_per_second > 1000\n\
         \x20   labels: {severity: page}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [rules.yml]\n\
             scrape_configs:\n\
             - job_name: tracer\n  static_configs:\n  - targets: ['127.0.0.1:{target_port}']\n"
        ),
    )
    .unwrap();
    Running(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed by `cargo xtask setup`"),
    )
}

fn promql(port: u16, query: &str) -> Vec<Value> {
    let (status, body) =
        get(port, &format!("/api/v1/query?query={}", encode(query))).unwrap_or((0, String::new()));
    if status != 200 {
        return Vec::new();
    }
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[test]
fn prometheus_scrapes_growth_and_the_leak_alert_fires() {
    require_root();
    let fixture = start_growing("90");
    let serve_port = free_port();
    let _serve = start_serve(fixture.pid(), serve_port);
    let metrics = wait_for("/metrics", Duration::from_secs(15), || {
        get(serve_port, "/metrics").filter(|(s, b)| *s == 200 && b.contains("leak_steadily"))
    })
    .1;
    assert!(
        metrics.contains("# TYPE tracer_outstanding_bytes gauge"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE tracer_allocations_total counter"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "tracer_target_up{{pid=\"{}\",process=\"growing_c\"}} 1",
            fixture.pid()
        )),
        "{metrics}"
    );
    // The other endpoints answer too.
    let (status, report) = get(serve_port, "/report?top=3").unwrap();
    assert_eq!(status, 200);
    let report: Value = serde_json::from_str(&report).unwrap();
    assert!(report["stacks"].as_array().unwrap().len() <= 3);
    let (status, svg) = get(serve_port, "/flamegraph.svg").unwrap();
    assert_eq!(status, 200);
    assert!(svg.contains("<svg"));
    assert_eq!(get(serve_port, "/nope").unwrap().0, 404);

    let dir = temp_path("prometheus");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let prom_port = free_port();
    let _prometheus = start_prometheus(&dir, serve_port, prom_port);

    // deriv() of the leaking stack's bytes shows about 5 KiB/s (512 B / 100 ms).
    let rate = wait_for("deriv of the leak", Duration::from_secs(60), || {
        let result = promql(
            prom_port,
            "deriv(tracer_stack_outstanding_bytes{function=\"leak_steadily\"}[10s])",
        );
        let value: f64 = result.first()?["value"][1].as_str()?.parse().ok()?;
        (value > 0.0).then_some(value)
    });
    assert!((3000.0..8000.0).contains(&rate), "deriv {rate} B/s");

    // The alert fires for the leaking stack, and only for it.
    let alerts = wait_for("the alert to fire", Duration::from_secs(60), || {
        let (_, body) = get(prom_port, "/api/v1/alerts")?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let alerts = v["data"]["alerts"].as_array()?.clone();
        alerts
            .iter()
            .any(|a| a["state"] == "firing")
            .then_some(alerts)
    });
    let functions: Vec<&str> = alerts
        .iter()
        .map(|a| a["labels"]["function"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(functions, ["leak_steadily"], "{alerts:?}");
}

#[test]
fn serve_refuses_a_port_in_use_before_attaching() {
    require_root();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = TracerCmd::new("serve")
        .pid(std::process::id())
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .output();
    assert_eq!(out.status.code(), Some(1));
    let stderr = out.stderr;
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

/// A stand-in for Pyroscope's `/ingest`: accepts one POST, answers 200, and
/// returns the request line and the multipart `profile` part.
fn receive_one_push(listener: TcpListener) -> (String, Vec<u8>) {
    let (mut stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut data = Vec::new();
    let mut buf = [0u8; 65536];
    let header_end = loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed early");
        data.extend_from_slice(&buf[..n]);
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&data[..header_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .trim()
        .parse()
        .unwrap();
    while data.len() < header_end + length {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0);
        data.extend_from_slice(&buf[..n]);
    }
    stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let boundary = head
        .lines()
        .find_map(|l| l.split_once("boundary=").map(|(_, b)| b.trim().to_string()))
        .expect("multipart boundary");
    let body = &data[header_end..header_end + length];
    // The part's content: after its blank line, up to the closing boundary.
    let start = body.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let end_marker = format!("\r\n--{boundary}--");
    let end = body
        .windows(end_marker.len())
        .position(|w| w == end_marker.as_bytes())
        .unwrap();
    assert!(String::from_utf8_lossy(&body[..start]).contains("name=\"profile\""));
    (
        head.lines().next().unwrap().to_string(),
        body[start..end].to_vec(),
    )
}

#[test]
fn pushed_profiles_decode_as_pprof() {
    require_root();
    let fixture = start_growing("60");
    let receiver = TcpListener::bind("127.0.0.1:0").unwrap();
    let push_port = receiver.local_addr().unwrap().port();
    let _serve = TracerCmd::new("serve")
        .pid(fixture.pid())
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--push")
        .arg(format!("http://127.0.0.1:{push_port}"))
        .args(["--push-interval", "3s"])
        .spawn();
    let (request_line, profile) = receive_one_push(receiver);
    assert!(
        request_line.starts_with("POST /ingest?name=tracer.memory%7Bpid%3D"),
        "{request_line}"
    );
    assert!(request_line.contains("&format=pprof"), "{request_line}");
    let path = temp_path("pushed.pb.gz");
    std::fs::write(&path, &profile).unwrap();
    // Go's pprof is the reference reader; it rejects malformed profiles.
    let out = Command::new("go")
        // -nodefraction=0: the small leak must not be cut next to the churn.
        .args([
            "tool",
            "pprof",
            "-top",
            "-nodefraction=0",
            "-sample_index=inuse_space",
        ])
        .arg(&path)
        .output()
        .expect("go (golang-go) is installed by `cargo xtask setup`");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("leak_steadily"), "{text}");
}

#[test]
fn a_bad_push_url_is_one_clear_line() {
    require_root();
    let out = TracerCmd::new("serve")
        .pid(std::process::id())
        .args(["--push", "https://x"])
        .output();
    assert_eq!(out.status.code(), Some(1));
    let stderr = out.stderr;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("https is not supported"), "{stderr}");
}
