//! Where in a function to put an entry probe that reads only the first
//! argument and the stack pointer (the `free` family's).
//!
//! A uprobe costs what the kernel must do with the instruction it replaces:
//! `push reg`, relative jumps and calls and nops are emulated (one trap),
//! anything else is single-stepped out of line (a second trap, measured at
//! ~20× dearer on the project's machines). glibc's `free` starts with its
//! NULL guard, `test %rdi,%rdi; je <return>`, which must be single-stepped;
//! the `push %rbp` right after it is emulated. Probing there sees every
//! non-NULL free with `%rdi` and `%rsp` as at the entry, and skips only the
//! NULL frees, which the tracer ignores anyway.
//!
//! The probe moves past the guard only when that is provably the same:
//! - the skipped instructions are only the guard (`test rdi,rdi` or
//!   `cmp rdi,0`, then `je`), optionally after `endbr64`/nops: none of them
//!   writes `%rdi`, `%rsp` or memory;
//! - the guard's jump leaves the function's prologue (its target is not in
//!   the skipped range nor the chosen address), so it is taken only for NULL;
//! - no instruction of the function (its whole body, by the symbol's size)
//!   branches into the skipped range or to the chosen address, and the body
//!   has no indirect jump that could (a jump table);
//! - the instruction at the chosen address is one the kernel emulates
//!   (`push reg`), or moving would gain nothing.
//!
//! Anything else, including bytes that do not decode, keeps the entry.
//! Return probes always stay at the entry: the return address is at `[rsp]`
//! only there.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// How far past the function's start to put its entry probe, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Bytes from the function's start (0: the entry).
    pub skip: u64,
    pub reason: &'static str,
}

impl Placement {
    fn entry(reason: &'static str) -> Self {
        Placement { skip: 0, reason }
    }
}

/// Leading instructions looked at, at most.
const MAX_PROLOGUE: usize = 6;

/// Decides where to probe the function whose machine code is `code`
/// (exactly the symbol's size), loaded at `address`.
pub fn first_argument_probe(code: &[u8], address: u64) -> Placement {
    if code.is_empty() {
        return Placement::entry("no code");
    }
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut guard_end: Option<u64> = None;
    let mut instr = Instruction::default();
    let mut pending_compare = false;
    for _ in 0..MAX_PROLOGUE {
        if !decoder.can_decode() {
            return Placement::entry("function ends in its prologue");
        }
        decoder.decode_out(&mut instr);
        if instr.is_invalid() {
            return Placement::entry("prologue does not decode");
        }
        if pending_compare {
            // The compare must be followed at once by `je`.
            if instr.mnemonic() != Mnemonic::Je || !has_near_target(&instr) {
                return Placement::entry("compare of rdi not followed by je");
            }
            let end = instr.next_ip();
            if instr.near_branch_target() > address && instr.near_branch_target() <= end {
                return Placement::entry("guard jumps into the prologue");
            }
            guard_end = Some(end);
            pending_compare = false;
            continue;
        }
        if is_rdi_zero_test(&instr) {
            pending_compare = true;
            continue;
        }
        if guard_end.is_none() && is_harmless_filler(&instr) {
            continue;
        }
        // The first instruction that is neither filler nor guard: the
        // candidate, if a guard came before it.
        let Some(end) = guard_end else {
            return Placement::entry("no NULL guard at the entry");
        };
        debug_assert_eq!(instr.ip(), end);
        if !is_emulated(&instr) {
            return Placement::entry("instruction after the guard is single-stepped too");
        }
        return match branch_into(code, address, end) {
            Some(reason) => Placement::entry(reason),
            None => Placement {
                skip: end - address,
                reason: "after the NULL guard",
            },
        };
    }
    Placement::entry("prologue too long")
}

/// `test rdi,rdi` or `cmp rdi,0`: sets ZF exactly when the pointer is NULL,
/// writes nothing but flags.
fn is_rdi_zero_test(instr: &Instruction) -> bool {
    if instr.op_count() != 2 || instr.op0_kind() != OpKind::Register {
        return false;
    }
    if instr.op0_register() != Register::RDI {
        return false;
    }
    match instr.mnemonic() {
        Mnemonic::Test => {
            instr.op1_kind() == OpKind::Register && instr.op1_register() == Register::RDI
        }
        Mnemonic::Cmp => {
            matches!(
                instr.op1_kind(),
                OpKind::Immediate8to64 | OpKind::Immediate32to64
            ) && instr.immediate(1) == 0
        }
        _ => false,
    }
}

/// Instructions that change no register, flag or memory: skipping them
/// changes nothing.
fn is_harmless_filler(instr: &Instruction) -> bool {
    matches!(instr.code(), Code::Endbr64) || instr.mnemonic() == Mnemonic::Nop
}

/// What the x86 uprobe code emulates instead of single-stepping and is
/// worth moving to: `push` of a 64-bit register.
fn is_emulated(instr: &Instruction) -> bool {
    instr.code() == Code::Push_r64
}

fn has_near_target(instr: &Instruction) -> bool {
    matches!(
        instr.op0_kind(),
        OpKind::NearBranch64 | OpKind::NearBranch32 | OpKind::NearBranch16
    )
}

/// Why the range (address, chosen] cannot be skipped, if some instruction
/// of the function may branch into it; None when none can.
fn branch_into(code: &[u8], address: u64, chosen: u64) -> Option<&'static str> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut instr = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instr);
        if instr.is_invalid() {
            // Padding after the last `ret` may be anything; inside the body
            // it means the linear decode lost track.
            return Some("function body does not decode");
        }
        if has_near_target(&instr) {
            let target = instr.near_branch_target();
            if target > address && target <= chosen {
                return Some("a branch in the function targets the skipped range");
            }
        } else if matches!(instr.mnemonic(), Mnemonic::Jmp) && !is_rip_relative_memory(&instr) {
            // `jmp reg` or `jmp [table + reg*8]`: targets unknown.
            return Some("the function has an indirect jump");
        }
    }
    None
}

/// `jmp [rip+disp]`: a tail call through the GOT, which leaves the function.
fn is_rip_relative_memory(instr: &Instruction) -> bool {
    instr.op0_kind() == OpKind::Memory && instr.memory_base() == Register::RIP
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        let text: String = text.split_whitespace().collect();
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// glibc 2.36 (Debian 12) `free`, all 257 bytes of its symbol.
    const GLIBC_2_36_FREE: &str = "
        4885ff0f84bf00000055488d77f0534883ec18488b1dd69e1300488b47f8648b
        2ba802755b488b155c9e13006448833a000f8499000000488d3d32ad1300a804
        7426488b1537a41300488d04950000000048f7d84885d248c7c2000000fc480f
        44c24821f0488b3831d2e8c1d1ffff64892b4883c4185b5dc30f1f8000000000
        8b1512a4130085d27526483905cfa31300731d483d0000000277154883e0f848
        8905baa313004801c0488905a0a313004889f7e808baffff64892b4883c4185b
        5dc3660f1f440000c30f1f8000000000488b15b99d130048893c2464803a000f
        8552ffffff4889742408e831f2ffff488b3c24488b742408488b47f8e936ffff
        ff";

    #[test]
    fn glibc_free_is_probed_after_its_null_guard() {
        let code = hex(GLIBC_2_36_FREE);
        assert_eq!(code.len(), 257);
        let placement = first_argument_probe(&code, 0x98ef0);
        assert_eq!(placement.skip, 9, "{placement:?}");
    }

    /// test rdi,rdi; je +N (to a ret at the end); push rbp; ...; ret
    fn guarded(after_guard: &str, body: &str) -> Vec<u8> {
        let tail = hex(&format!("{after_guard}{body}5dc3"));
        // je rel32 to the final `c3` appended below.
        let rel = (tail.len()) as i32;
        let mut code = hex("4885ff0f84");
        code.extend_from_slice(&rel.to_le_bytes());
        code.extend_from_slice(&tail);
        code.push(0xc3);
        code
    }

    #[test]
    fn a_plain_guard_then_push_moves() {
        let code = guarded("55", "4889e5");
        assert_eq!(first_argument_probe(&code, 0x1000).skip, 9);
    }

    #[test]
    fn endbr64_before_the_guard_is_skipped_too() {
        let mut code = hex("f30f1efa");
        code.extend(guarded("55", "90"));
        // je's rel32 is relative to its own end, so the bytes still work.
        assert_eq!(first_argument_probe(&code, 0x2000).skip, 13);
    }

    #[test]
    fn cmp_rdi_zero_is_a_guard_too() {
        // cmp rdi,0 (48 83 ff 00); je rel8 +1; push rbp; ret; ret
        let code = hex("4883ff00 7402 55 c3 c3");
        assert_eq!(first_argument_probe(&code, 0x1000).skip, 6);
    }

    #[test]
    fn functions_that_start_with_push_stay_at_the_entry() {
        // glibc malloc's start: push r12; push rbp; push rbx
        let code = hex("4154 55 53 4889fb 5b 5d 415c c3");
        assert_eq!(first_argument_probe(&code, 0).skip, 0);
    }

    #[test]
    fn a_guard_on_another_register_stays() {
        // test rsi,rsi; je; push rbp
        let mut code = guarded("55", "90");
        code[1] = 0x85;
        code[2] = 0xf6;
        assert_eq!(first_argument_probe(&code, 0).skip, 0);
    }

    #[test]
    fn jne_is_not_a_null_guard() {
        let mut code = guarded("55", "90");
        code[4] = 0x85; // 0f 85: jne
        assert_eq!(first_argument_probe(&code, 0).skip, 0);
    }

    #[test]
    fn a_branch_to_the_chosen_address_keeps_the_entry() {
        // ... push rbp; nop; jmp back to the push (at +9): eb f?
        // body after push: 90 (1 byte) then jmp rel8 to +9.
        let mut body = hex("55 90");
        // jmp rel8 at offset 9+2=11, ends at 13: rel = 9 - 13 = -4.
        body.extend(hex("ebfc"));
        let hexbody: String = body[1..].iter().map(|b| format!("{b:02x}")).collect();
        let code = guarded("55", &hexbody);
        let p = first_argument_probe(&code, 0x1000);
        assert_eq!(p.skip, 0, "{p:?}");
        assert!(p.reason.contains("branch"), "{p:?}");
    }

    #[test]
    fn a_branch_into_the_guard_keeps_the_entry() {
        // A later jump to +3 (the je itself): from offset 11, rel = 3 - 13 = -10.
        let code = guarded("55", "90ebf6");
        let p = first_argument_probe(&code, 0);
        assert_eq!(p.skip, 0, "{p:?}");
    }

    #[test]
    fn a_branch_to_the_entry_itself_is_fine() {
        // Recursion-like jump to offset 0 from offset 11: rel = 0 - 13 = -13.
        let code = guarded("55", "90ebf3");
        assert_eq!(first_argument_probe(&code, 0).skip, 9);
    }

    #[test]
    fn an_indirect_jump_keeps_the_entry() {
        // jmp rax (ff e0) in the body.
        let code = guarded("55", "ffe0");
        assert_eq!(first_argument_probe(&code, 0).skip, 0);
    }

    #[test]
    fn a_tail_call_through_the_got_is_fine() {
        // jmp [rip+0] (ff 25 00000000)
        let code = guarded("55", "ff2500000000");
        assert_eq!(first_argument_probe(&code, 0).skip, 9);
    }

    #[test]
    fn an_instruction_after_the_guard_that_would_be_stepped_anyway_stays() {
        // mov rax, rdi after the guard: no gain from moving.
        let code = guarded("4889f8", "55");
        assert_eq!(first_argument_probe(&code, 0).skip, 0);
    }

    #[test]
    fn a_guard_that_writes_rdi_is_not_a_guard() {
        // and rdi,rdi writes rdi (same value, but not on the list).
        let mut code = guarded("55", "90");
        code[1] = 0x21; // 48 21 ff: and rdi,rdi
        assert_eq!(first_argument_probe(&code, 0).skip, 0);
    }

    #[test]
    fn garbage_and_truncated_code_stay_at_the_entry() {
        assert_eq!(first_argument_probe(&[], 0).skip, 0);
        assert_eq!(first_argument_probe(&hex("4885ff0f84"), 0).skip, 0);
        assert_eq!(first_argument_probe(&hex("4885ff"), 0).skip, 0);
        assert_eq!(first_argument_probe(&hex("0f0b0f0b"), 0).skip, 0);
    }
}
