//! eBPF programs of the tracer. One file per hook family:
//! - `alloc`: uprobes/uretprobes on the malloc family and free;
//! - `mmap`: syscall tracepoints on mmap, munmap, mremap and brk;
//! - `stack`: user stack capture shared by all allocation paths;
//! - `maps`: every map, in one place, with its sizing rationale.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod alloc;
mod maps;
mod mmap;
mod stack;
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
