//! Builds the fixture programs (C, C++, Rust) into OUT_DIR. They are built
//! with frame pointers and debug info: frame-pointer unwinding is what the
//! tracer does today, and file:line checks need DWARF.

use std::{env, path::PathBuf, process::Command};

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("fixtures");
    println!("cargo:rerun-if-changed=fixtures");
    let c_flags = ["-g", "-O1", "-fno-omit-frame-pointer", "-pthread", "-Wall"];
    for name in [
        "leaky",
        "attach",
        "aging",
        "demo",
        "growing",
        "clean",
        "many_stacks",
        "realloc_race",
        "longjmp",
        "main_exits",
        "soak",
        "mapped",
        "sampled",
        "forks",
        "reclaim_storm",
        "behaviours",
    ] {
        run(Command::new("gcc")
            .args(c_flags)
            .arg(dir.join(format!("{name}.c")))
            .arg("-o")
            .arg(out.join(format!("{name}_c"))));
    }
    // The C fixture under other C libraries: glibc linked statically (the
    // allocator is in the executable), musl dynamic (musl's loader is its
    // libc) and musl static.
    let leaky = dir.join("leaky.c");
    run(Command::new("gcc")
        .args(c_flags)
        .arg("-static")
        .arg(&leaky)
        .arg("-o")
        .arg(out.join("leaky_c_static")));
    for (name, extra) in [
        ("leaky_c_musl", None),
        ("leaky_c_musl_static", Some("-static")),
    ] {
        run(Command::new("musl-gcc")
            .args(c_flags)
            .args(extra)
            .arg(&leaky)
            .arg("-o")
            .arg(out.join(name)));
    }
    // Linked with jemalloc (not preloaded): DT_NEEDED puts it before libc.
    run(Command::new("gcc")
        .args(c_flags)
        .arg(dir.join("attach.c"))
        .arg("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
        .arg("-o")
        .arg(out.join("attach_c_jemalloc")));
    run(Command::new("gcc")
        .args(c_flags)
        .arg(dir.join("prefixed.c"))
        .arg("-o")
        .arg(out.join("prefixed_c")));
    run(Command::new("g++")
        .args(c_flags)
        .arg(dir.join("leaky.cpp"))
        .arg("-o")
        .arg(out.join("leaky_cpp")));
    // Without frame pointers, as distributions build release code: for
    // `--unwind cfi`.
    let nofp = ["-g", "-O2", "-fomit-frame-pointer", "-Wall"];
    run(Command::new("gcc")
        .args(nofp)
        .arg(dir.join("nofp.c"))
        .arg("-o")
        .arg(out.join("nofp_c")));
    run(Command::new("g++")
        .args(nofp)
        .arg(dir.join("nofp.cpp"))
        .arg("-o")
        .arg(out.join("nofp_cpp")));
    // Mappings reached through three functions: their stacks by CFI.
    run(Command::new("gcc")
        .args(nofp)
        .arg(dir.join("mapped_deep.c"))
        .arg("-o")
        .arg(out.join("mapped_deep_c")));
    // The attach and fork fixtures too: CFI in attach mode and across forks.
    for name in ["attach", "forks"] {
        run(Command::new("gcc")
            .args(nofp)
            .arg(dir.join(format!("{name}.c")))
            .arg("-o")
            .arg(out.join(format!("{name}_c_nofp")))
            .arg("-lpthread"));
    }
    // A plugin loaded with dlopen after attach, and its host.
    run(Command::new("gcc")
        .args(nofp)
        .args(["-shared", "-fPIC"])
        .arg(dir.join("plugin.c"))
        .arg("-o")
        .arg(out.join("libplugin.so")));
    run(Command::new("gcc")
        .args(nofp)
        .arg(dir.join("dlopen.c"))
        .arg("-o")
        .arg(out.join("dlopen_c"))
        .arg("-ldl"));
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    // The Rust fixture again, optimized and without forced frame pointers.
    run(Command::new(&rustc)
        .args(["-g", "-C", "opt-level=2", "--edition", "2021"])
        .arg(dir.join("leaky.rs"))
        .arg("-o")
        .arg(out.join("leaky_rs_nofp")));
    run(Command::new(rustc)
        .args([
            "-g",
            "-C",
            "opt-level=1",
            "-C",
            "force-frame-pointers=yes",
            "--edition",
            "2021",
        ])
        .arg(dir.join("leaky.rs"))
        .arg("-o")
        .arg(out.join("leaky_rs")));
    println!("cargo:rustc-env=FIXTURE_DIR={}", out.display());
}
