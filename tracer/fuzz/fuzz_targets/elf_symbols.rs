//! ELF files: symbol tables, segments and the interpreter of any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = tracer::target::elf::ElfInfo::parse(data) {
        for name in ["malloc", "free", "calloc", "realloc"] {
            let _ = info.function_offset(name);
        }
        let _ = info.vaddr_to_offset(u64::MAX);
    }
});
