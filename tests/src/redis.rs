//! The command lines of Debian's redis-server and its load client as the
//! project runs them, shared by the end-to-end tests and `cargo xtask bench`
//! (which includes this file by path: no dependencies here).

/// The server: on loopback at `port`, nothing written to disk, in the
/// foreground.
pub fn server_args(port: &str) -> Vec<String> {
    [
        "--port",
        port,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--loglevel",
        "warning",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The tests redis-benchmark runs.
pub const BENCHMARK_TESTS: &str = "set,get,lpush,lpop";

/// redis-benchmark: 20 clients, `requests` of each of `BENCHMARK_TESTS`,
/// CSV output (one line per test with its requests/s).
pub fn benchmark_args(port: &str, requests: u64) -> Vec<String> {
    [
        "-p",
        port,
        "-c",
        "20",
        "-n",
        &requests.to_string(),
        "-t",
        BENCHMARK_TESTS,
        "--csv",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
