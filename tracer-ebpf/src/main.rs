//! eBPF programs of the tracer. One file per hook family:
//! - `alloc`: uprobes/uretprobes on the malloc family and free;
//! - `calls`: each thread's allocator call between entry and return;
//! - `mmap`: syscall tracepoints on mmap, munmap, mremap and brk;
//! - `proc`: fork and exec tracepoints (running processes' `--follow-forks`);
//! - `stack`: user stack capture shared by all allocation paths;
//! - `fpwalk`: its frame-pointer walk (the default);
//! - `unwind`: its CFI walk (`--unwind cfi`);
//! - `maps`: every map, in one place, with its sizing rationale;
//! - `sample`: sampling by bytes (`--sample-rate`);
//! - `session`: the allocation probes as one uprobe session program;
//! - `taskstack`: keeps uprobe programs off the per-CPU private stack;
//! - `bench`: no-op programs and switches for measuring the tracer.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod alloc;
mod bench;
mod calls;
mod fpwalk;
mod maps;
mod mmap;
mod proc;
mod sample;
mod session;
mod stack;
mod taskstack;
mod unwind;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that could reach this; it exists only to
    // satisfy the compiler.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
