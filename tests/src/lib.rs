//! Helpers for the end-to-end tests: where the tracer and the fixtures are,
//! how to start them ([`Fixture`], [`TracerCmd`], [`Tracer`]), and how to
//! read what the fixtures say about their own leaks (`EXPECT <function>
//! <bytes> <blocks>` lines on stdout).

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{channel, Receiver},
};

use serde_json::Value;

/// The tracer binary: $TRACER_BIN (set by `cargo xtask test`), else the
/// workspace's release build.
pub fn tracer() -> PathBuf {
    if let Some(path) = std::env::var_os("TRACER_BIN") {
        return PathBuf::from(path);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("target/release/tracer");
    assert!(
        path.exists(),
        "{} not built: run `cargo xtask test` (or set TRACER_BIN)",
        path.display()
    );
    path
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("FIXTURE_DIR")).join(name)
}

/// How many times slower than natively these tests run: 1, except in the
/// kernel matrix's emulated guests (`cargo xtask test-kernels` sets
/// TRACER_TEST_SLOWDOWN). The few time bounds the tests check scale by it.
pub fn slowdown() -> u32 {
    std::env::var("TRACER_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// The end-to-end tests load eBPF programs: they need root.
pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "end-to-end tests load eBPF programs and must run as root"
    );
}

/// Why `tracer doctor --format json` says this kernel goes without the
/// path `key` (under `paths`, e.g. `mmap_tracking`), whose `-v` line
/// starts with `title` (`mmap tracking`): that line. None when the path is
/// taken. Tests of a feature the kernel truly lacks skip
/// themselves with it, and say so.
pub fn path_off(key: &str, title: &str) -> Option<String> {
    let output = TracerCmd::new("doctor").args(["--format", "json"]).output();
    let doc: serde_json::Value = serde_json::from_str(&output.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}{}", output.stdout, output.stderr));
    if doc["paths"][key] != false {
        return None;
    }
    let line = doc["paths"]["described"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.as_str())
        .find(|l| l.starts_with(&format!("{title}: ")))
        .unwrap_or("off");
    Some(line.to_string())
}

/// Skips the test (printing why) when this kernel goes without a path
/// (`path_off`).
#[macro_export]
macro_rules! skip_without_path {
    ($key:expr, $title:expr) => {
        if let Some(why) = $crate::path_off($key, $title) {
            println!("SKIPPED on this kernel: {why}");
            return;
        }
    };
}

/// A scratch file path unique to this test process.
pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tracer-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A JSON file (a report written with `--output`).
pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

/// A JSON lines file (`--interval` reports), one value per line.
pub fn read_json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON ({e}): {l}")))
        .collect()
}

/// The lines of a child's output stream, read by a thread of their own as
/// they come (so the child never blocks on a full pipe) and handed out on
/// demand.
struct Lines {
    lines: Receiver<String>,
    /// Everything handed out so far.
    seen: String,
}

impl Lines {
    fn read(stream: impl Read + Send + 'static) -> Lines {
        let (sender, lines) = channel();
        std::thread::spawn(move || {
            let mut stream = BufReader::new(stream);
            loop {
                let mut line = Vec::new();
                match stream.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if sender
                            .send(String::from_utf8_lossy(&line).into_owned())
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
        Lines {
            lines,
            seen: String::new(),
        }
    }

    /// The lines up to and including the first that contains `needle`;
    /// panics if the stream ends before.
    fn until(&mut self, needle: &str) -> String {
        let mut read = String::new();
        loop {
            let Ok(line) = self.lines.recv() else {
                panic!("stream ended before {needle:?}; got: {}", self.seen);
            };
            self.seen.push_str(&line);
            read.push_str(&line);
            if line.contains(needle) {
                return read;
            }
        }
    }

    /// The whole stream, once it has ended.
    fn all(mut self) -> String {
        for line in self.lines.iter() {
            self.seen.push_str(&line);
        }
        self.seen
    }
}

/// A fixture program (or any command that ends by exec'ing one) running
/// beside the test, stdin and stdout piped; killed if dropped while it runs.
///
/// The attach protocol of `attach_c` and `forks_c attach`: it prints READY,
/// waits for a line on stdin, does its work, prints its EXPECT lines and
/// DONE, and waits for stdin to close.
pub struct Fixture {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Lines,
    /// What it printed up to its ready line.
    pub startup: String,
}

impl Fixture {
    /// Starts `program args` and waits for its READY line.
    pub fn start(program: impl AsRef<OsStr>, args: &[&str]) -> Fixture {
        Fixture::spawn(Command::new(program).args(args), "READY")
    }

    /// Starts `command` and waits until it prints a line containing `ready`.
    pub fn spawn(command: &mut Command, ready: &str) -> Fixture {
        command.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = spawn_written(command);
        let stdin = child.stdin.take();
        let mut out = Lines::read(child.stdout.take().unwrap());
        let startup = out.until(ready);
        Fixture {
            child,
            stdin,
            out,
            startup,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes `text` to its stdin.
    pub fn tell(&mut self, text: &str) {
        self.stdin
            .as_mut()
            .expect("stdin still open")
            .write_all(text.as_bytes())
            .unwrap();
    }

    /// What it prints from now up to a line containing `needle`.
    pub fn read_until(&mut self, needle: &str) -> String {
        self.out.until(needle)
    }

    /// Tells it to go on (the tracer is attached); returns what it printed
    /// up to DONE (its EXPECT lines).
    pub fn go(&mut self) -> String {
        self.tell("go\n");
        self.read_until("DONE")
    }

    /// Whether it has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Closes its stdin, which lets it exit.
    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }

    /// Closes its stdin and waits for it to exit.
    pub fn finish(mut self) -> ExitStatus {
        self.close_stdin();
        self.child.wait().unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        kill_if_running(&mut self.child);
    }
}

/// Kills and reaps a child that has not exited yet (a test that failed
/// half-way leaves nothing running).
fn kill_if_running(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A tracer command line, built in the order of the command line:
/// `tracer SUBCOMMAND [options] [-- command [args]]`. Options go before
/// [`TracerCmd::command`]; `arg`s after it are the command's.
pub struct TracerCmd {
    command: Command,
}

impl TracerCmd {
    pub fn new(subcommand: &str) -> TracerCmd {
        let mut command = Command::new(tracer());
        command.arg(subcommand);
        TracerCmd { command }
    }

    /// `tracer run --format json --output REPORT`: the JSON report (or
    /// JSON lines with `--interval`) goes to a file, the command's output
    /// to stdout.
    pub fn run_json(report: impl AsRef<OsStr>) -> TracerCmd {
        TracerCmd::new("run")
            .args(["--format", "json"])
            .output_file(report)
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> TracerCmd {
        self.command.arg(arg);
        self
    }

    pub fn args(mut self, args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> TracerCmd {
        self.command.args(args);
        self
    }

    /// `--pid PID`.
    pub fn pid(self, pid: u32) -> TracerCmd {
        self.arg("--pid").arg(pid.to_string())
    }

    /// `--output PATH`.
    pub fn output_file(self, path: impl AsRef<OsStr>) -> TracerCmd {
        self.arg("--output").arg(path)
    }

    /// `-- PROGRAM`: the command to run; later `arg`s are its arguments.
    pub fn command(self, program: impl AsRef<OsStr>) -> TracerCmd {
        self.arg("--").arg(program)
    }

    /// An environment variable of the tracer (and of the command it runs).
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> TracerCmd {
        self.command.env(key, value);
        self
    }

    /// Anything else about the process (user, process group...).
    pub fn configure(mut self, f: impl FnOnce(&mut Command)) -> TracerCmd {
        f(&mut self.command);
        self
    }

    /// The command line as a shell would read it (for `sh -c`, tmux).
    pub fn shell_line(&self) -> String {
        std::iter::once(self.command.get_program())
            .chain(self.command.get_args())
            .map(shell_quote)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The `Command` itself, to run some other way.
    pub fn into_command(self) -> Command {
        self.command
    }

    /// Runs it to the end, its output captured, stdin /dev/null.
    pub fn output(mut self) -> Finished {
        let output = self
            .command
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", self.command));
        Finished {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Starts it, stdout and stderr piped (read as they come).
    pub fn spawn(mut self) -> Tracer {
        let mut child = self
            .command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", self.command));
        let stdout = Lines::read(child.stdout.take().unwrap());
        let stderr = Lines::read(child.stderr.take().unwrap());
        Tracer {
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }
}

fn shell_quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A running tracer started by [`TracerCmd::spawn`]; killed if dropped
/// while it runs.
pub struct Tracer {
    child: Child,
    stdout: Option<Lines>,
    stderr: Option<Lines>,
}

impl Tracer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stderr from now up to a line containing `needle` (a `-v` line
    /// such as "attached to PID"); panics if it ends before.
    pub fn wait_for(&mut self, needle: &str) -> String {
        self.stderr.as_mut().unwrap().until(needle)
    }

    /// The same on stdout (under `tracer run`, the command's output).
    pub fn wait_for_stdout(&mut self, needle: &str) -> String {
        self.stdout.as_mut().unwrap().until(needle)
    }

    pub fn signal(&self, signal: libc::c_int) {
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    pub fn kill(&mut self) {
        self.child.kill().unwrap();
    }

    /// Whether it has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for it to exit and for its output to end. Its stderr (but the
    /// probe lines) goes to the test's output, shown if the test fails.
    pub fn finish(mut self) -> Finished {
        let status = self.child.wait().unwrap();
        let stdout = self.stdout.take().unwrap().all();
        let stderr = self.stderr.take().unwrap().all();
        for line in stderr.lines().filter(|l| !l.contains("probe ")) {
            eprintln!("tracer stderr: {line}");
        }
        Finished {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        kill_if_running(&mut self.child);
    }
}

/// A tracer that has exited: its status and whole output.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The JSON report it wrote on stdout; it must have succeeded.
    pub fn json(&self) -> Value {
        assert!(
            self.status.success(),
            "tracer: {}\n{}",
            self.status,
            self.stderr
        );
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", self.stdout))
    }
}

/// `tracer report --format json -v` attached to a fixture waiting on its
/// READY line: checks that stacks are walked by CFI, lets the fixture do
/// its work, and returns the report and what the fixture said.
pub fn report_attached_by_cfi(mut fixture: Fixture) -> (Value, String) {
    let mut tracer = TracerCmd::new("report")
        .pid(fixture.pid())
        .args(["--format", "json", "--top", "0", "-v"])
        .spawn();
    let said = tracer.wait_for("attached to PID");
    assert!(said.contains("stack walk: CFI"), "{said}");
    let said = fixture.go();
    fixture.close_stdin();
    let report = tracer.finish().json();
    fixture.finish();
    (report, said)
}

/// What a fixture announced: site -> (bytes, blocks).
pub fn expectations(stdout: &str) -> BTreeMap<String, (u64, u64)> {
    stdout
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("EXPECT ")?.split_whitespace();
            let site = words.next()?.to_string();
            let bytes = words.next()?.parse().ok()?;
            let blocks = words.next()?.parse().ok()?;
            Some((site, (bytes, blocks)))
        })
        .filter(|(_, (bytes, _))| *bytes > 0)
        .collect()
}

/// The leak site of a stack, given its function names innermost first: the
/// first function that is one of `sites` (a demangled name matches when it
/// is the site or ends with `::site` or starts with `site(`).
pub fn site_of<'a>(functions: &[String], sites: &[&'a str]) -> Option<&'a str> {
    functions.iter().find_map(|f| {
        sites.iter().copied().find(|site| {
            f == site || f.ends_with(&format!("::{site}")) || f.starts_with(&format!("{site}("))
        })
    })
}

/// Function names of a JSON report stack, innermost first.
pub fn frame_functions(stack: &Value) -> Vec<String> {
    stack["frames"]
        .as_array()
        .map(|frames| {
            frames
                .iter()
                .map(|f| f["function"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Outstanding (bytes, blocks) per site in a JSON report.
pub fn report_by_site(report: &Value, sites: &[&str]) -> BTreeMap<String, (u64, u64)> {
    let mut by_site = BTreeMap::new();
    for stack in report["stacks"].as_array().expect("stacks array") {
        if let Some(site) = site_of(&frame_functions(stack), sites) {
            let entry: &mut (u64, u64) = by_site.entry(site.to_string()).or_default();
            entry.0 += stack["bytes"].as_u64().unwrap();
            entry.1 += stack["allocations"].as_u64().unwrap();
        }
    }
    by_site
}

/// Runs `tracer run --format json --top 0 --output FILE [extra] -- argv`.
/// Returns the report, the fixture's stdout and the tracer's output.
pub fn trace_run(argv: &[&str], extra: &[&str]) -> (Value, String, Finished) {
    trace_run_with_env(argv, extra, &[])
}

/// `trace_run` with extra environment variables (the command inherits them).
pub fn trace_run_with_env(
    argv: &[&str],
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Value, String, Finished) {
    let report_path = temp_path(&format!(
        "run-{}-{}.json",
        argv[0].rsplit('/').next().unwrap(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut command = TracerCmd::run_json(&report_path)
        .args(["--top", "0"])
        .args(extra)
        .command(argv[0])
        .args(&argv[1..]);
    for (key, value) in env {
        command = command.env(key, value);
    }
    let output = command.output();
    assert!(
        output.status.success(),
        "tracer run failed: {}\nstderr: {}",
        output.status,
        output.stderr
    );
    let report = read_json(&report_path);
    (report, output.stdout.clone(), output)
}

/// What valgrind's memcheck says is in use at exit: totals and per site.
pub struct Valgrind {
    pub bytes: u64,
    pub blocks: u64,
    pub by_site: BTreeMap<String, (u64, u64)>,
}

/// Runs a program under memcheck with the C and C++ runtime's exit-time
/// frees turned off (the tracer sees the process as it really exits).
pub fn valgrind(program: &str, sites: &[&str]) -> Valgrind {
    let output = Command::new("valgrind")
        .args([
            "--leak-check=full",
            "--show-leak-kinds=all",
            "--run-libc-freeres=no",
            "--run-cxx-freeres=no",
            "--num-callers=60",
            "--show-mismatched-frees=no",
        ])
        .arg(program)
        .output()
        .expect("valgrind is installed by `cargo xtask setup`");
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    let mut bytes = None;
    let mut blocks = 0;
    let mut by_site: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let number = |s: &str| s.replace(',', "").parse::<u64>().unwrap();
    // Records look like:
    //   ==1== 1,000 bytes in 10 blocks are definitely lost in loss record 9 of 11
    //   ==1==    at 0x48407B4: malloc (vg_replace_malloc.c:381)
    //   ==1==    by 0x109176: leak_malloc (leaky.c:15)
    let lines: Vec<&str> = log
        .lines()
        .map(|l| l.split_once("== ").map_or(l, |(_, r)| r))
        .collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if let Some(rest) = line.strip_prefix("in use at exit: ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            bytes = Some(number(words[0]));
            blocks = number(words[3]);
        }
        if line.contains(" in loss record ") {
            let words: Vec<&str> = line.split_whitespace().collect();
            // "N bytes in M blocks" or "N (d direct, i indirect) bytes in M blocks"
            let record_bytes = number(words[0]);
            let in_pos = words.iter().position(|w| *w == "in").unwrap();
            let record_blocks = number(words[in_pos + 1]);
            let mut functions = Vec::new();
            let mut j = i + 1;
            while j < lines.len()
                && (lines[j].trim().starts_with("at ") || lines[j].trim().starts_with("by "))
            {
                // "by 0x109176: leak_malloc (leaky.c:15)"
                if let Some((_, f)) = lines[j].split_once(": ") {
                    let name = f.rsplit_once(" (").map_or(f, |(n, _)| n);
                    functions.push(name.trim().to_string());
                }
                j += 1;
            }
            if let Some(site) = site_of(&functions, sites) {
                let e = by_site.entry(site.to_string()).or_default();
                e.0 += record_bytes;
                e.1 += record_blocks;
            }
            i = j;
            continue;
        }
        i += 1;
    }
    Valgrind {
        bytes: bytes.unwrap_or_else(|| panic!("no 'in use at exit' in valgrind output:\n{log}")),
        blocks,
        by_site,
    }
}

/// Runs a fixture with `tracer run` (extra tracer options, extra environment)
/// and holds the report against the fixture's EXPECT lines: every site
/// exact, no memory from the `churn` functions, nothing dropped. Returns the
/// report and the sites (expected ones and churn).
pub fn trace_exact(
    program: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    churn: &[&str],
) -> (Value, Vec<String>) {
    require_root();
    let program = fixture(program);
    let (report, stdout, _) = trace_run_with_env(&[program.to_str().unwrap()], extra, env);
    assert!(stdout.contains("DONE"), "fixture did not finish: {stdout}");
    let expected = expectations(&stdout);
    assert!(!expected.is_empty());
    let mut sites: Vec<String> = expected.keys().cloned().collect();
    sites.extend(churn.iter().map(|c| c.to_string()));
    let site_refs: Vec<&str> = sites.iter().map(String::as_str).collect();
    let found = report_by_site(&report, &site_refs);
    for (site, want) in &expected {
        assert_eq!(
            found.get(site),
            Some(want),
            "site {site} (bytes, blocks); report: {report:#}"
        );
    }
    for c in churn {
        assert!(
            !found.contains_key(*c),
            "freed memory from {c} reported: {:?}",
            found.get(*c)
        );
    }
    for (key, value) in report["dropped"].as_object().unwrap() {
        assert_eq!(value.as_u64(), Some(0), "dropped.{key}");
    }
    (report, sites)
}

/// The `<title>` texts of an SVG (inferno's flamegraph frames), parsed as
/// XML; panics if it is not well-formed. inferno's SVG carries a DOCTYPE.
pub fn svg_titles(svg: &str) -> Vec<String> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(svg, options).expect("well-formed XML");
    doc.descendants()
        .filter(|n| n.has_tag_name("title"))
        .filter_map(|n| n.text())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_expectations() {
        let e = expectations("x\nEXPECT leak_a 100 2\nEXPECT start 0 0\nDONE\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e["leak_a"], (100, 2));
    }

    #[test]
    fn finds_sites_in_c_cpp_and_rust_names() {
        let sites = ["leak_a", "make_widget", "leak_box"];
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            site_of(&f(&["malloc", "leak_a", "main"]), &sites),
            Some("leak_a")
        );
        assert_eq!(
            site_of(
                &f(&["operator new(unsigned long)", "make_widget(long)"]),
                &sites
            ),
            Some("make_widget")
        );
        assert_eq!(
            site_of(&f(&["alloc::alloc::alloc", "leaky::leak_box"]), &sites),
            Some("leak_box")
        );
        assert_eq!(site_of(&f(&["leak_ab"]), &sites), None);
    }
}

/// Spawns `command`, whose program a test may have just written (a fixture
/// copied under another name). While a file is open for writing, exec
/// fails with ETXTBSY, and a child that another test thread forks at that
/// moment holds a copy of the descriptor until its own exec: retry then,
/// as Go's os/exec does.
pub fn spawn_written(command: &mut Command) -> std::process::Child {
    let mut tries = 0;
    loop {
        match command.spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 200 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("cannot start {command:?}: {e}"),
        }
    }
}
pub mod redis;
