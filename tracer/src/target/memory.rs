//! A process's resident memory from /proc/PID/status (VmRSS and its
//! anonymous, file and shared parts).

use super::process::{read_proc_file, status_field};
use crate::model::ResidentMemory;

/// The resident memory of process `pid` now; None once it is gone.
pub fn resident(pid: u32) -> Option<ResidentMemory> {
    parse_status(&read_proc_file(pid, "status").ok()?)
}

/// The memory lines of a status file; None without VmRSS (a zombie, a
/// kernel thread).
pub fn parse_status(status: &str) -> Option<ResidentMemory> {
    let kib = |key: &str| -> Option<u64> {
        let value = status_field(status, key)?.trim_end_matches("kB").trim();
        Some(value.parse::<u64>().ok()? * 1024)
    };
    Some(ResidentMemory {
        rss: kib("VmRSS:")?,
        anon: kib("RssAnon:").unwrap_or(0),
        file: kib("RssFile:").unwrap_or(0),
        shmem: kib("RssShmem:").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rss_lines() {
        let status = "Name:\tserver\nVmRSS:\t   10240 kB\nRssAnon:\t    6144 kB\n\
                      RssFile:\t    3072 kB\nRssShmem:\t    1024 kB\nThreads:\t1\n";
        assert_eq!(
            parse_status(status),
            Some(ResidentMemory {
                rss: 10 << 20,
                anon: 6 << 20,
                file: 3 << 20,
                shmem: 1 << 20,
            })
        );
        assert_eq!(parse_status("Name:\tkthreadd\nState:\tS\n"), None);
    }

    #[test]
    fn reads_our_own() {
        let own = resident(std::process::id()).unwrap();
        assert!(own.rss > 0 && own.rss >= own.anon);
    }
}
