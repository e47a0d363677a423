//! A private apt configuration: its own sources list, package lists and
//! download cache under the kernel cache, so fetching other Debian suites'
//! packages never changes the host's package sources.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{output, run};

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

pub struct Apt {
    dir: PathBuf,
}

impl Apt {
    /// An apt configuration in `dir` that sees `suites` (`suite` or
    /// `suite@mirror-path`, e.g. `bookworm-security@debian-security`).
    pub fn new(dir: PathBuf, suites: &[&str]) -> Result<Apt> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let list: String = suites
            .iter()
            .map(|s| {
                let (suite, path) = s.split_once('@').unwrap_or((s, "debian"));
                format!("deb [signed-by={KEYRING}] http://deb.debian.org/{path} {suite} main\n")
            })
            .collect();
        fs::write(dir.join("sources.list"), list)?;
        Ok(Apt { dir })
    }

    /// `program` (apt-get or apt-cache) with this configuration.
    pub fn command(&self, program: &str) -> Command {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        let mut command = Command::new(program);
        command.args([
            format!("-oDir::Etc::SourceList={}", d("sources.list")),
            "-oDir::Etc::SourceParts=-".into(),
            format!("-oDir::State::Lists={}", d("lists")),
            format!("-oDir::Cache={}", d("cache")),
            // Keep the parsed package cache (Docker images turn it off): without
            // it each apt-cache call re-reads five suites' lists, seconds each.
            "-oDir::Cache::pkgcache=pkgcache.bin".into(),
            "-oDir::Cache::srcpkgcache=srcpkgcache.bin".into(),
            // The cache is root's; apt's download sandbox user cannot write it.
            "-oAPT::Sandbox::User=root".into(),
            // Only the package lists: no translations or AppStream metadata.
            "-oAcquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "-oAcquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "-oAcquire::Languages=none".into(),
            // Other helpers or setup may hold the dpkg lock for a while.
            "-oDPkg::Lock::Timeout=600".into(),
        ]);
        command
    }

    /// Refreshes the package lists when they are missing or older than a day.
    pub fn update(&self, force: bool) -> Result<()> {
        let stamp = self.dir.join("updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() < 24 * 3600);
        if fresh && !force {
            return Ok(());
        }
        println!("kernels: apt-get update ({})", self.dir.display());
        run(self
            .command("apt-get")
            .args(["update", "-qq"])
            .stdout(std::process::Stdio::null()))?;
        fs::write(&stamp, "")?;
        Ok(())
    }

    /// Every package name the configured suites offer that starts with `prefix`.
    pub fn names(&self, prefix: &str) -> Result<Vec<String>> {
        let names = output(self.command("apt-cache").args(["pkgnames", prefix]))
            .context("apt-cache pkgnames failed")?;
        Ok(names.lines().map(str::to_string).collect())
    }

    /// The candidate version of `package`.
    pub fn version(&self, package: &str) -> Option<String> {
        let show = output(
            self.command("apt-cache")
                .args(["show", "--no-all-versions", package]),
        )?;
        show.lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .map(str::to_string)
    }
}
