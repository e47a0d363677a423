//! `tracer top` end to end: the view runs inside a real terminal (tmux), and
//! the tests read the screen with `tmux capture-pane`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use tracer_tests::*;

/// A private tmux server (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `command` (a shell line) in a 160x40 window.
    fn start(name: &str, command: &str) -> Tmux {
        let tmux = Tmux {
            socket: format!("tracer-test-{}-{name}", std::process::id()),
        };
        let status = tmux
            .cmd()
            .args(["new-session", "-d", "-x", "160", "-y", "40", command])
            .status()
            .expect("tmux is installed by `cargo xtask setup`");
        assert!(status.success(), "tmux new-session failed");
        tmux
    }

    fn cmd(&self) -> Command {
        let mut command = Command::new("tmux");
        command.args(["-L", &self.socket]).stdin(Stdio::null());
        command
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        self.cmd().args(["send-keys", keys]).status().unwrap();
    }

    /// Polls the screen until `done` holds; panics with the last screen.
    fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            if start.elapsed() > timeout {
                panic!("timed out waiting for {what}; screen:\n{screen}");
            }
            sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

/// The table's rows: the lines after the column header.
fn table_rows(screen: &str) -> Vec<&str> {
    screen
        .lines()
        .skip_while(|l| !l.starts_with("BYTES"))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect()
}

fn shell_line(save_dir: &Path, seconds: u32) -> String {
    let top = TracerCmd::new("top")
        .arg("--save-dir")
        .arg(save_dir)
        .command(fixture("growing_c"))
        .arg(seconds.to_string());
    format!("{}; echo TOP_EXIT=$?; sleep 60", top.shell_line())
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = temp_path(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_steady_leak_reaches_the_top_ahead_of_heavy_churn() {
    require_root();
    let dir = fresh_dir("top-save");
    let tmux = Tmux::start("steady", &shell_line(&dir, 40));
    // growing.c: leak_steadily leaks 5 KiB/s; churn_heavily often holds
    // 4 MiB at the instant of a refresh; load_big_table holds 2 MiB from the
    // start. The default sort is growth.
    let screen = tmux.wait_for(
        "leak_steadily in the first row",
        Duration::from_secs(15),
        |s| {
            table_rows(s)
                .first()
                .is_some_and(|row| row.contains("leak_steadily") && row.contains("growing.c:"))
        },
    );
    let pid: u32 = screen
        .split("tracer top  PID ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no PID in the header:\n{screen}"));
    assert!(screen.contains("dropped: none"), "{screen}");
    // It stays there over later refreshes.
    sleep(Duration::from_secs(3));
    let screen = tmux.screen();
    let rows = table_rows(&screen);
    assert!(rows[0].contains("leak_steadily"), "{screen}");
    assert!(
        rows.iter()
            .any(|r| r.contains("load_big_table") && r.contains("2.0 MiB")),
        "{screen}"
    );

    // Sort by bytes: the 2 MiB table or the churn (up to 4 MiB) leads.
    tmux.keys("b");
    let screen = tmux.wait_for("bytes sort", Duration::from_secs(3), |s| {
        s.contains("sort: bytes")
    });
    assert!(
        !table_rows(&screen)[0].contains("leak_steadily"),
        "{screen}"
    );

    // The detail pane shows the whole stack of the selected row.
    tmux.keys("r");
    tmux.keys("Enter");
    tmux.wait_for("the detail pane", Duration::from_secs(3), |s| {
        s.contains("#0  leak_steadily") && s.contains("#1  main")
    });

    // f writes a flamegraph of what is on screen, and says where.
    tmux.keys("f");
    let screen = tmux.wait_for("the flamegraph message", Duration::from_secs(5), |s| {
        s.contains("wrote ")
    });
    let svg = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "svg"))
        .unwrap_or_else(|| panic!("no SVG in {}; screen:\n{screen}", dir.display()));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("leak_steadily"), "flamegraph names the leak");

    // q restores the terminal, exits 0 and ends the command it started.
    tmux.keys("q");
    tmux.wait_for("the shell after top", Duration::from_secs(5), |s| {
        s.contains("TOP_EXIT=0")
    });
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the command top started (PID {pid}) is still running"
    );
}

#[test]
fn the_view_freezes_when_the_target_exits() {
    require_root();
    let dir = fresh_dir("top-exit");
    let tmux = Tmux::start("exit", &shell_line(&dir, 2));
    let screen = tmux.wait_for("the end of the target", Duration::from_secs(10), |s| {
        s.contains("process exited (code 0)")
    });
    let rows = table_rows(&screen);
    assert!(
        rows.iter().any(|r| r.contains("leak_steadily")),
        "last snapshot still shown:\n{screen}"
    );
    assert!(!screen.contains("TOP_EXIT"), "waits for q:\n{screen}");
    tmux.keys("q");
    tmux.wait_for("the shell after top", Duration::from_secs(5), |s| {
        s.contains("TOP_EXIT=0")
    });
}

#[test]
fn top_refuses_when_stdout_is_not_a_terminal() {
    // Output captured, stdin /dev/null.
    let out = TracerCmd::new("top").command("true").output();
    assert_eq!(out.status.code(), Some(1));
    let stderr = out.stderr;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("needs a terminal"), "{stderr}");
    assert!(stderr.contains("tracer report"), "{stderr}");
}
