//! Placements on the real code of Debian 12's allocators (testdata/placement:
//! one file per function, `name@address.bin`, its whole body, or its first
//! 32 bytes where it starts with what the kernel emulates), and on made-up
//! code for the cases where moving is not safe.

use super::*;
use crate::target::allocator::{Entry, FUNCTIONS};

fn hex(text: &str) -> Vec<u8> {
    let text: String = text.split_whitespace().collect();
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/target/testdata/placement");

/// (function name, address, code) of every function of one allocator.
fn functions(allocator: &str) -> Vec<(String, u64, Vec<u8>)> {
    let dir = format!("{TESTDATA}/{allocator}");
    let mut found: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| {
            let path = entry.unwrap().path();
            let file = path.file_stem().unwrap().to_str().unwrap().to_string();
            let (name, address) = file.split_once('@').unwrap();
            let address = u64::from_str_radix(address, 16).unwrap();
            (name.to_string(), address, std::fs::read(&path).unwrap())
        })
        .collect();
    found.sort();
    found
}

fn convention(name: &str) -> Entry {
    FUNCTIONS
        .iter()
        .find(|(f, _)| *f == name)
        .map(|(_, e)| *e)
        .unwrap_or_else(|| panic!("{name} is not an allocator function"))
}

fn placed(allocator: &str, function: &str, relocate: bool) -> Placement {
    let (_, address, code) = functions(allocator)
        .into_iter()
        .find(|(name, _, _)| name == function)
        .unwrap_or_else(|| panic!("no {function} in {allocator}"));
    place(&code, address, convention(function).reads(), relocate)
}

const ALLOCATORS: &[&str] = &[
    "glibc-2.36",
    "musl-1.2.3",
    "jemalloc-5.3.0",
    "tcmalloc-minimal-2.10",
    "tcmalloc-2.10",
    "mimalloc-2.0.9",
    "libstdc++-12",
];

/// The target: with attach cookies, no allocation or free function
/// of any of these allocators is single-stepped: each is probed on an
/// emulated instruction, or not probed at all because every call goes
/// first to another probed function of the same convention (a direct jump
/// or call to one here; one through a PLT stub is resolved by
/// `allocator::place_probes`, tested on the installed libraries there).
#[test]
fn no_allocator_function_is_single_stepped() {
    let mut stepped = Vec::new();
    for allocator in ALLOCATORS {
        let all = functions(allocator);
        assert!(!all.is_empty(), "{allocator}");
        for (name, address, code) in &all {
            let entry = convention(name);
            let p = place(code, *address, entry.reads(), true);
            if p.emulated {
                continue;
            }
            let covered = first_transfer(code, *address, entry.reads().args).is_some_and(|to| {
                let start = all.iter().find(|(_, a, _)| *a == to);
                let elsewhere = all
                    .iter()
                    .all(|(_, a, c)| to < *a || to >= a + c.len() as u64);
                start.is_some_and(|(n, _, _)| convention(n) == entry) || elsewhere
            });
            if !covered {
                stepped.push(format!(
                    "{allocator} {name}: `{}` ({})",
                    p.instruction, p.reason
                ));
            }
        }
    }
    assert!(
        stepped.is_empty(),
        "single-stepped:\n{}",
        stepped.join("\n")
    );
}

#[test]
fn glibc_reallocarray_is_probed_after_its_multiplication() {
    // mov %rsi,%rax; mul %rdx; mov %rax,%rsi; jo: the size is n * size
    // (in rax and rsi: the first found is taken).
    let p = placed("glibc-2.36", "reallocarray", true);
    assert_eq!(p.skip, 9, "{p:?}");
    assert_eq!(
        describe_args(p.args),
        "argument 2 in rax, argument 3 as 1 (multiplied in)"
    );
}

#[test]
fn jemalloc_malloc_is_probed_at_its_ja() {
    // cmp $0x1000,%rdi; ja: the size stays in rdi.
    let p = placed("jemalloc-5.3.0", "malloc", true);
    assert_eq!((p.skip, p.args), (7, 0), "{p:?}");
    assert!(p.instruction.starts_with("ja"), "{p:?}");
    // No argument moved: the same without cookies.
    assert_eq!(placed("jemalloc-5.3.0", "malloc", false), p);
}

#[test]
fn jemalloc_free_is_probed_where_rdi_is_still_the_pointer() {
    let p = placed("jemalloc-5.3.0", "free", true);
    assert!(p.emulated && p.skip > 0, "{p:?}");
    let p = placed("jemalloc-5.3.0", "sdallocx", true);
    assert!(p.emulated, "{p:?}");
}

#[test]
fn mimalloc_malloc_reads_the_size_from_rsi() {
    // mov rip,%rax; mov %rdi,%rsi; mov %fs:(%rax),%rdi; cmp; ja at +0x15.
    let p = placed("mimalloc-2.0.9", "malloc", true);
    assert_eq!(p.skip, 0x15, "{p:?}");
    assert_eq!(describe_args(p.args), "argument 1 in rsi");
    // Without cookies the program could not know: it stays at the entry.
    let p = placed("mimalloc-2.0.9", "malloc", false);
    assert_eq!(p.skip, 0, "{p:?}");
    assert!(!p.emulated);
    assert!(p.reason.contains("rsi"), "{p:?}");
}

#[test]
fn mimalloc_calloc_and_realloc_carry_two_moved_arguments() {
    let p = placed("mimalloc-2.0.9", "calloc", true);
    assert_eq!(describe_args(p.args), "argument 1 in rax", "{p:?}");
    let p = placed("mimalloc-2.0.9", "realloc", true);
    assert_eq!(
        describe_args(p.args),
        "argument 1 in rsi, argument 2 in rdx",
        "{p:?}"
    );
    assert!(p.instruction.starts_with("jmp"), "{p:?}");
}

#[test]
fn tcmalloc_malloc_and_free_skip_a_load_and_a_test() {
    for f in ["malloc", "free"] {
        let p = placed("tcmalloc-minimal-2.10", f, true);
        assert_eq!((p.skip, p.args), (10, 0), "{f}: {p:?}");
        assert!(p.instruction.starts_with("jne"), "{p:?}");
    }
    // lea; or; test; jne: posix_memalign's three arguments stay put.
    let p = placed("tcmalloc-minimal-2.10", "posix_memalign", true);
    assert_eq!((p.skip, p.args), (11, 0), "{p:?}");
}

#[test]
fn glibc_free_is_probed_at_its_null_guard_jump() {
    let p = placed("glibc-2.36", "free", false);
    assert_eq!((p.skip, p.args), (3, 0), "{p:?}");
    assert!(p.instruction.starts_with("je"), "{p:?}");
    // malloc starts with push: the entry.
    let p = placed("glibc-2.36", "malloc", false);
    assert_eq!(p.skip, 0);
    assert!(p.emulated);
}

#[test]
fn the_kernel_list() {
    for (bytes, emulated) in [
        ("55", true),           // push rbp
        ("4154", true),         // push r12
        ("4855", false),        // rex.w push rbp: only 0x41 is taken
        ("90", true),           // nop
        ("f390", true),         // pause
        ("4190", false),        // xchg r8,rax, taken by the kernel as a nop
        ("0f1f4000", false),    // nopl: stepped
        ("f30f1efa", false),    // endbr64
        ("7402", true),         // je rel8
        ("0f8412345678", true), // je rel32
        ("66e90000", false),    // jmp rel16
        ("e800000000", true),   // call rel32
        ("ebfe", true),         // jmp rel8
        ("4885ff", false),      // test rdi,rdi
        ("3e7402", false),      // ds: prefix: refused
    ] {
        assert_eq!(kernel_emulates(&hex(bytes)), emulated, "{bytes}");
    }
}

// Made-up prologues: each ends in `ja` (emulated) after something that
// makes moving there wrong; then `ret`.

fn moved(code: &str, args: usize) -> Placement {
    place(
        &hex(code),
        0x1000,
        Reads {
            args,
            product: None,
        },
        true,
    )
}

#[test]
fn a_memory_write_before_the_jump_keeps_the_entry() {
    // mov %rdi,(%rax); cmp $1,%rdi; ja +1; ret; ret
    let p = moved("488938 4883ff01 7701 c3 c3", 1);
    assert_eq!(p.skip, 0, "{p:?}");
    assert!(p.reason.contains("memory"), "{p:?}");
}

#[test]
fn a_moved_stack_pointer_keeps_the_entry() {
    // sub $8,%rsp; ja; ...
    let p = moved("4883ec08 7701 c3 c3", 1);
    assert_eq!(p.skip, 0, "{p:?}");
    assert!(p.reason.contains("stack pointer"), "{p:?}");
}

#[test]
fn an_overwritten_argument_keeps_the_entry() {
    // xor %edi,%edi; ja
    let p = moved("31ff 7701 c3 c3", 1);
    assert_eq!(p.skip, 0, "{p:?}");
    assert!(p.reason.contains("argument 1"), "{p:?}");
    // ...but a second argument the program does not read may go.
    let p = moved("31f6 7701 c3 c3", 1);
    assert_eq!(p.skip, 2, "{p:?}");
}

#[test]
fn a_32_bit_copy_is_not_a_copy() {
    // mov %edi,%esi; xor %edi,%edi; ja
    let p = moved("89fe 31ff 7701 c3 c3", 1);
    assert_eq!(p.skip, 0, "{p:?}");
    // mov %rdi,%rsi; xor %edi,%edi; ja: argument 1 in rsi.
    let p = moved("4889fe 31ff 7701 c3 c3", 1);
    assert_eq!(
        (p.skip, describe_args(p.args).as_str()),
        (5, "argument 1 in rsi")
    );
}

#[test]
fn a_branch_into_the_skipped_range_keeps_the_entry() {
    // cmp $1,%rdi (4 bytes); ja +2; ret; jmp back to +0 is fine, to +3 not.
    let to_start = moved("4883ff01 7702 c3 c3 ebf6", 1);
    assert_eq!(to_start.skip, 4, "{to_start:?}");
    let into = moved("4883ff01 7702 c3 c3 ebf9", 1);
    assert_eq!(into.skip, 0, "{into:?}");
    assert!(into.reason.contains("branch"), "{into:?}");
    // A branch to the chosen instruction would hit it twice in one call.
    let again = moved("4883ff01 7702 c3 c3 ebfa", 1);
    assert_eq!(again.skip, 0, "{again:?}");
}

#[test]
fn an_indirect_jump_in_the_body_keeps_the_entry() {
    let p = moved("4883ff01 7702 c3 c3 ffe0", 1);
    assert_eq!(p.skip, 0, "{p:?}");
}

#[test]
fn a_call_or_return_before_any_emulated_instruction_keeps_the_entry() {
    // call *%rax; ja
    let p = moved("ffd0 7701 c3 c3", 1);
    assert_eq!(p.skip, 0, "{p:?}");
    // ret right away
    let p = moved("c3", 1);
    assert_eq!(p.skip, 0, "{p:?}");
}

#[test]
fn unusual_instructions_keep_the_entry() {
    // rdtsc; ja / lock add; ja / cpuid
    for code in ["0f31 7701 c3 c3", "f0480138 7701 c3 c3", "0fa2 7701 c3 c3"] {
        assert_eq!(moved(code, 1).skip, 0, "{code}");
    }
}

#[test]
fn garbage_and_truncated_code_stay_at_the_entry() {
    for code in ["", "4885ff0f84", "4885ff", "0f0b0f0b"] {
        let p = place(
            &hex(code),
            0,
            Reads {
                args: 1,
                product: None,
            },
            true,
        );
        assert_eq!(p.skip, 0, "{code}: {p:?}");
        assert!(!p.emulated, "{code}");
    }
}

#[test]
fn calls_that_go_to_another_function_first_are_recognised() {
    // jemalloc's _ZdlPv: jmp free@plt.
    let (_, address, code) = functions("jemalloc-5.3.0")
        .into_iter()
        .find(|(n, _, _)| n == "_ZdlPv")
        .unwrap();
    assert_eq!(first_transfer(&code[..5], address, 1), Some(0x90c0));
    // libstdc++'s nothrow new: endbr64; sub $8,%rsp; call; add $8,%rsp; ret.
    let code = hex("f30f1efa 4883ec08 e8f0ffffff 4883c408 c3");
    assert_eq!(first_transfer(&code, 0x1000, 1), Some(0x1000 + 13 - 16));
    // ...but not when it does more with the result.
    let code = hex("f30f1efa 4883ec08 e8f0ffffff 4885c0 c3");
    assert_eq!(first_transfer(&code, 0x1000, 1), None);
    // Nor when the argument moved first.
    assert_eq!(first_transfer(&hex("4889fe 31ff e9f0ffffff"), 0, 1), None);
    // malloc is more than a jump.
    assert_eq!(first_transfer(&hex("4883ff01 7702 c3 c3"), 0, 1), None);
    // endbr64; bnd jmp *0x1234(%rip)
    let stub = hex("f30f1efa f2ff2534120000");
    assert_eq!(plt_slot(&stub, 0x1000), Some(0x1000 + 4 + 7 + 0x1234));
    assert_eq!(
        plt_slot(&hex("ff2500100000"), 0x2000),
        Some(0x2000 + 6 + 0x1000)
    );
}

#[test]
fn a_branch_from_outside_the_function_is_found() {
    // Ranges (0x1000, 0x1007] and (0x2000, 0x2003]; a `jmp 0x1007` and a
    // `call 0x2000` (the entry itself: fine) at 0x3000.
    let code = hex("e902e0ffff e8f6efffff");
    let hit = branch_targets_in(&code, 0x3000, &[(0x1000, 0x1007), (0x2000, 0x2003)]);
    assert_eq!(hit, [true, false]);
}
