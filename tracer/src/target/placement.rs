//! Where in an allocator function to put its probes (entry and return).
//!
//! A uprobe costs what the kernel must do with the instruction it replaces:
//! a few kinds are emulated (one trap), anything else is single-stepped out
//! of line (a second trap, measured at ~20× dearer on the project's
//! machines). What arch/x86/kernel/uprobes.c emulates, the same from 4.18 to
//! 6.18 (`branch_setup_xol_ops`, `push_setup_xol_ops`):
//! - `jmp rel8/rel32`, `call rel32`, `jcc rel8/rel32`, without a 0x66 prefix;
//! - `push r64`: one byte, or two with exactly the REX prefix 0x41;
//! - opcode 0x90 (`nop`, `pause`), taken as a nop whatever its prefixes
//!   (so `41 90`, which is `xchg r8,rax`, is never chosen here).
//!
//! Everything else, including `endbr64` and multi-byte nops, is stepped.
//!
//! Jemalloc's `malloc` starts with `cmp $0x1000,%rdi; ja`, tcmalloc's with
//! a rip-relative load, `test` and `jne`, mimalloc's with three `mov`s, a
//! `cmp` and `ja`. So both probes of a function go on the first emulated
//! instruction of its straight-line entry path, when that is provably the
//! same as probing the entry:
//! - every skipped instruction falls through (no branch, call or return:
//!   so no path leaves the function before the chosen instruction), writes
//!   no memory, is on a short list of plain arithmetic and moves, and does
//!   not write the stack pointer: `[rsp]` still holds the return address,
//!   which a uretprobe replaces when its breakpoint is hit, so the return
//!   probe can sit there too, and the entry program sees the entry's `%rsp`;
//! - every argument the program reads is still in a register: its own, or
//!   one a plain 64-bit `mov reg,reg` copied it to (mimalloc's `malloc`
//!   reads the size from `%rsi` at its `ja`). Where one moved, the program
//!   is told by the attach cookie (`tracer_common::convention`); a kernel
//!   without cookies (before 5.15) gets the in-place placement instead
//!   (`relocate` false: only moves that keep every argument where it was);
//! - no instruction of the function (its whole body, by the symbol's size)
//!   branches into the skipped range or to the chosen instruction, and the
//!   body has no indirect jump that could (a jump table): a second hit of
//!   the chosen address in one call would run the programs twice.
//!
//! Anything else, including bytes that do not decode, keeps the entry, and
//! the placement says why (`-v`).

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Formatter as _, GasFormatter, Instruction,
    InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
};
use tracer_common::convention::{ARGS_SHIFT, CONSTANT_ONE, MAX_ARGS};

/// Where a function's probes go, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// Bytes from the function's start (0: the entry).
    pub skip: u64,
    /// Where the arguments are at the probe, as the cookie's bits above the
    /// convention byte (0: each in its own register).
    pub args: u64,
    /// The instruction the probe replaces (AT&T syntax; empty if unknown).
    pub instruction: String,
    /// Whether the kernel emulates it (one trap) or single-steps it (two).
    pub emulated: bool,
    /// Why the probe is here.
    pub reason: String,
}

/// Instructions looked at from the entry, at most.
const MAX_PROLOGUE: usize = 16;

/// The x86 argument registers, in order.
const ARGUMENT_REGISTERS: [Register; MAX_ARGS] = [Register::RDI, Register::RSI, Register::RDX];

/// What the entry program reads of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reads {
    /// The first `args` arguments.
    pub args: usize,
    /// The two arguments it multiplies (calloc's, reallocarray's count and
    /// size), if any: where a `mul` has computed their product already,
    /// the cookie points the first at the product and the second at the
    /// constant 1 (glibc's `reallocarray` multiplies before its `jo`).
    pub product: Option<(usize, usize)>,
}

/// What a register holds, of the call's arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value {
    Argument(usize),
    /// The (low 64 bits of the) product of `Reads::product`.
    Product,
}

/// Decides where to probe the function whose machine code is `code`
/// (exactly the symbol's size), loaded at `address`, whose entry program
/// reads `reads`. `relocate`: the program can be told that an argument
/// moved to another register (attach cookies).
pub fn place(code: &[u8], address: u64, reads: Reads, relocate: bool) -> Placement {
    let args = reads.args.min(MAX_ARGS);
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut instr = Instruction::default();
    // holder[r]: what register r holds (x86 numbering).
    let mut holder = entry_registers();
    let mut first = String::new();
    let stay = |first: &str, reason: String| Placement {
        skip: 0,
        args: 0,
        instruction: first.to_string(),
        emulated: false,
        reason,
    };
    for _ in 0..MAX_PROLOGUE {
        if !decoder.can_decode() {
            return stay(
                &first,
                "the function ends before any emulated instruction".into(),
            );
        }
        let offset = (decoder.ip() - address) as usize;
        decoder.decode_out(&mut instr);
        if instr.is_invalid() {
            return stay(&first, "its code does not decode".into());
        }
        let bytes = &code[offset..offset + instr.len()];
        let text = format_instruction(&instr);
        if offset == 0 {
            first = text.clone();
        }
        if kernel_emulates(bytes) {
            let at_entry = offset == 0;
            let cookie = match where_arguments_are(&holder, args, reads.product) {
                Ok(cookie) => cookie,
                Err(n) => {
                    return stay(
                        &first,
                        format!("argument {} is overwritten before `{text}`", n + 1),
                    )
                }
            };
            if cookie != 0 && !relocate {
                return stay(
                    &first,
                    format!(
                        "at `{text}` {}, and this kernel has no attach cookies to say so",
                        describe_args(cookie)
                    ),
                );
            }
            if at_entry {
                return Placement {
                    skip: 0,
                    args: 0,
                    instruction: text,
                    emulated: true,
                    reason: "emulated at the entry".into(),
                };
            }
            if let Some(why) = branch_into(code, address, instr.ip()) {
                return stay(&first, why.into());
            }
            return Placement {
                skip: offset as u64,
                args: cookie,
                instruction: text,
                emulated: true,
                reason: if cookie == 0 {
                    "first emulated instruction".into()
                } else {
                    "first emulated instruction; arguments relocated".into()
                },
            };
        }
        if let Err(why) = skippable(&instr, &mut info, &mut holder, reads.product) {
            return stay(&first, format!("`{text}`: {why}"));
        }
    }
    stay(&first, "no emulated instruction early enough".into())
}

/// The registers at the entry: each argument in its own.
fn entry_registers() -> [Option<Value>; 16] {
    let mut holder = [None; 16];
    for (n, reg) in ARGUMENT_REGISTERS.iter().enumerate() {
        holder[number(*reg).unwrap()] = Some(Value::Argument(n));
    }
    holder
}

/// The cookie bits that say where each of the first `args` arguments is
/// (0: all in their own registers), or the first argument lost.
fn where_arguments_are(
    holder: &[Option<Value>; 16],
    args: usize,
    product: Option<(usize, usize)>,
) -> Result<u64, usize> {
    let find = |value| (0..16).find(|&r| holder[r] == Some(value));
    let mut cookie = 0u64;
    let mut lost = None;
    for (n, reg) in ARGUMENT_REGISTERS.iter().enumerate().take(args) {
        if holder[number(*reg).unwrap()] == Some(Value::Argument(n)) {
            continue;
        }
        match find(Value::Argument(n)) {
            Some(r) => cookie |= (r as u64 + 1) << (8 * n),
            None => {
                lost.get_or_insert(n);
            }
        }
    }
    let Some(lost) = lost else {
        return Ok(cookie);
    };
    // Both factors gone, their product kept: the program multiplies it by 1.
    match (product, find(Value::Product)) {
        (Some((a, b)), Some(r)) => {
            for n in [a, b] {
                cookie &= !(0xff << (8 * n));
            }
            let rest = (0..args).filter(|n| *n != a && *n != b);
            for n in rest {
                let own = number(ARGUMENT_REGISTERS[n]).unwrap();
                if holder[own] != Some(Value::Argument(n)) && cookie >> (8 * n) & 0xff == 0 {
                    return Err(n);
                }
            }
            Ok(cookie | (r as u64 + 1) << (8 * a) | (CONSTANT_ONE + 1) << (8 * b))
        }
        _ => Err(lost),
    }
}

/// The placement at the entry, for `reason` (a check outside the function
/// failed: see `branch_targets_in`).
pub fn at_entry(code: &[u8], address: u64, reason: &str) -> Placement {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let first = decoder.decode();
    let bytes = code.get(..first.len()).unwrap_or_default();
    Placement {
        skip: 0,
        args: 0,
        instruction: if first.is_invalid() {
            String::new()
        } else {
            format_instruction(&first)
        },
        emulated: !first.is_invalid() && kernel_emulates(bytes),
        reason: reason.to_string(),
    }
}

/// Which of `ranges` ((start, chosen]: a function's skipped instructions
/// and the one probed) some direct branch or call in `code` (an object's
/// executable section at `address`, decoded linearly) targets. A function
/// split by the compiler (`malloc.cold`) may jump back into its hot part
/// from outside the symbol's bytes: the check inside the function does not
/// see that.
pub fn branch_targets_in(code: &[u8], address: u64, ranges: &[(u64, u64)]) -> Vec<bool> {
    let mut hit = vec![false; ranges.len()];
    if ranges.is_empty() {
        return hit;
    }
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut instr = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instr);
        if !has_near_target(&instr) {
            continue;
        }
        let target = instr.near_branch_target();
        for (i, (start, chosen)) in ranges.iter().enumerate() {
            if target > *start && target <= *chosen {
                hit[i] = true;
            }
        }
    }
    hit
}

/// Whether the kernel emulates the instruction made of `bytes` (see the
/// module's list), judged on its bytes as the kernel does.
pub fn kernel_emulates(bytes: &[u8]) -> bool {
    let mut i = 0;
    let mut operand_size = false;
    let mut rex = None;
    while i < bytes.len() {
        match bytes[i] {
            0x66 => operand_size = true,
            0x67 | 0xf2 | 0xf3 | 0x64 | 0x65 => {}
            // es/cs/ss/ds and lock: the kernel refuses to probe them at all.
            0x26 | 0x2e | 0x36 | 0x3e | 0xf0 => return false,
            _ => break,
        }
        i += 1;
    }
    if let Some(&b) = bytes.get(i) {
        if (0x40..=0x4f).contains(&b) {
            rex = Some(b);
            i += 1;
        }
    }
    let Some(&op) = bytes.get(i) else {
        return false;
    };
    match op {
        // Only plain `nop`/`pause`: the kernel takes `41 90` (xchg) as a nop.
        0x90 => rex.is_none(),
        0xeb | 0xe9 | 0xe8 | 0x70..=0x7f => !operand_size,
        0x0f => matches!(bytes.get(i + 1), Some(0x80..=0x8f)) && !operand_size,
        0x50..=0x57 => bytes.len() == 1 || (bytes.len() == 2 && rex == Some(0x41)),
        _ => false,
    }
}

/// Whether skipping `instr` is invisible to the programs; updates which
/// register holds which argument.
fn skippable(
    instr: &Instruction,
    info: &mut InstructionInfoFactory,
    holder: &mut [Option<Value>; 16],
    product: Option<(usize, usize)>,
) -> Result<(), &'static str> {
    if instr.flow_control() != FlowControl::Next {
        return Err("a branch, call or return before any emulated instruction");
    }
    if instr.has_lock_prefix() || instr.has_rep_prefix() || instr.has_repne_prefix() {
        return Err("a prefixed instruction");
    }
    use Mnemonic::*;
    if !matches!(
        instr.mnemonic(),
        Mov | Movzx
            | Movsx
            | Movsxd
            | Lea
            | Cmp
            | Test
            | And
            | Or
            | Xor
            | Add
            | Sub
            | Shr
            | Shl
            | Sar
            | Neg
            | Not
            | Inc
            | Dec
            | Mul
            | Imul
            | Cmovne
            | Cmove
            | Nop
            | Endbr64
    ) {
        return Err("not one of the plain instructions skipped");
    }
    let used = info.info(instr);
    if used.used_memory().iter().any(|m| writes(m.access())) {
        return Err("writes memory");
    }
    let copy = plain_copy(instr);
    let multiplied = multiplication(instr, holder, product);
    for r in used.used_registers() {
        if !writes(r.access()) {
            continue;
        }
        let full = r.register().full_register();
        if full == Register::RSP {
            return Err("moves the stack pointer");
        }
        if let Some(n) = number(full) {
            holder[n] = match (copy, multiplied) {
                (Some((dst, src)), _) if dst == n => holder[src],
                (_, Some(dst)) if dst == n => Some(Value::Product),
                _ => None,
            };
        }
    }
    Ok(())
}

/// The register that gets the product of `product`'s two arguments, if
/// `instr` multiplies them: `mul r64` (rax times it) or `imul r64, r64`.
fn multiplication(
    instr: &Instruction,
    holder: &[Option<Value>; 16],
    product: Option<(usize, usize)>,
) -> Option<usize> {
    let (a, b) = product?;
    let (dst, x, y) = match instr.code() {
        Code::Mul_rm64 if instr.op0_kind() == OpKind::Register => {
            (0, 0, number(instr.op0_register())?)
        }
        Code::Imul_r64_rm64 if instr.op1_kind() == OpKind::Register => {
            let dst = number(instr.op0_register())?;
            (dst, dst, number(instr.op1_register())?)
        }
        _ => return None,
    };
    let factors = (holder[x]?, holder[y]?);
    let wanted = (Value::Argument(a), Value::Argument(b));
    (factors == wanted || (factors.1, factors.0) == wanted).then_some(dst)
}

fn writes(access: OpAccess) -> bool {
    matches!(
        access,
        OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
    )
}

/// `mov r64, r64`: (destination, source) register numbers.
fn plain_copy(instr: &Instruction) -> Option<(usize, usize)> {
    if !matches!(instr.code(), Code::Mov_r64_rm64 | Code::Mov_rm64_r64)
        || instr.op0_kind() != OpKind::Register
        || instr.op1_kind() != OpKind::Register
    {
        return None;
    }
    Some((number(instr.op0_register())?, number(instr.op1_register())?))
}

/// The x86 number of a 64-bit general register (rax 0 ... r15 15).
fn number(reg: Register) -> Option<usize> {
    let n = (reg as usize).checked_sub(Register::RAX as usize)?;
    (n < 16 && reg.is_gpr64()).then_some(n)
}

fn register_name(n: usize) -> &'static str {
    [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ][n]
}

fn format_instruction(instr: &Instruction) -> String {
    let mut formatter = GasFormatter::new();
    formatter.options_mut().set_uppercase_hex(false);
    formatter.options_mut().set_branch_leading_zeros(false);
    let mut out = String::new();
    formatter.format(instr, &mut out);
    out
}

/// Where each argument is, from a placement's `args`, as `-v` says it:
/// e.g. "argument 1 in rsi".
pub fn describe_args(args: u64) -> String {
    (0..MAX_ARGS)
        .filter_map(|n| {
            let cookie = args << ARGS_SHIFT;
            tracer_common::convention::register(cookie, n).map(|r| match r {
                CONSTANT_ONE => format!("argument {} as 1 (multiplied in)", n + 1),
                r => format!("argument {} in {}", n + 1, register_name(r as usize)),
            })
        })
        .collect::<Vec<_>>()
        .join(", ")
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
            return Some("the function body does not decode");
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

/// Where every call of the function goes first, if it does nothing before
/// but stack and register moves that keep the arguments it reads (`args`)
/// in their registers: the target of a `jmp rel` (a tail call), or of a
/// `call rel` after which it only returns what it got (`add rsp`, `pop`,
/// `ret`). The function's callers are then seen by the target's probes,
/// with the same arguments (`allocator::place_probes` checks that the
/// target is probed, with the same convention).
pub fn first_transfer(code: &[u8], address: u64, args: usize) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut holder = entry_registers();
    let mut instr = Instruction::default();
    for _ in 0..MAX_PROLOGUE {
        if !decoder.can_decode() {
            return None;
        }
        decoder.decode_out(&mut instr);
        match instr.code() {
            Code::Jmp_rel8_64 | Code::Jmp_rel32_64 | Code::Call_rel32_64 => {
                where_arguments_are(&holder, args, None)
                    .ok()
                    .filter(|cookie| *cookie == 0)?;
                let target = instr.near_branch_target();
                if instr.code() == Code::Call_rel32_64 && !only_returns(&mut decoder) {
                    return None;
                }
                return Some(target);
            }
            Code::Push_r64 => {}
            Code::Sub_rm64_imm8 | Code::Sub_rm64_imm32
                if instr.op0_kind() == OpKind::Register
                    && instr.op0_register() == Register::RSP => {}
            _ => skippable(&instr, &mut info, &mut holder, None).ok()?,
        }
    }
    None
}

/// The rest of the straight-line code only returns: `add $n,%rsp`, `pop`,
/// `ret`.
fn only_returns(decoder: &mut Decoder) -> bool {
    let mut instr = Instruction::default();
    for _ in 0..MAX_PROLOGUE {
        if !decoder.can_decode() {
            return false;
        }
        decoder.decode_out(&mut instr);
        match instr.code() {
            Code::Retnq => return true,
            Code::Pop_r64 => {}
            Code::Add_rm64_imm8 | Code::Add_rm64_imm32
                if instr.op0_kind() == OpKind::Register
                    && instr.op0_register() == Register::RSP => {}
            _ => return false,
        }
    }
    false
}

/// The GOT slot a PLT stub jumps through (`[endbr64;] [bnd] jmp *slot(%rip)`).
pub fn plt_slot(code: &[u8], address: u64) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    for _ in 0..2 {
        let instr = decoder.decode();
        if instr.code() == Code::Endbr64 {
            continue;
        }
        return (instr.mnemonic() == Mnemonic::Jmp && is_rip_relative_memory(&instr))
            .then(|| instr.memory_displacement64());
    }
    None
}

/// Where a function's code goes out of itself: what `wrappers` needs to
/// judge whether it only calls the allocator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exits {
    /// Direct calls and jumps outside the function, and calls and jumps
    /// through a rip-relative slot.
    pub transfers: Vec<Transfer>,
    /// Some call or jump goes through a register or computed memory: its
    /// target is unknown.
    pub indirect: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A code address.
    Direct(u64),
    /// The slot jumped or called through (`call *slot(%rip)`: a GOT entry,
    /// with -fno-plt).
    Slot(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub to: Destination,
    /// Which of the first three argument registers (rdi, rsi, rdx) hold a
    /// constant there: set from an immediate (or zeroed) on the straight
    /// line before it, no branch landing in between.
    pub constant: [bool; MAX_ARGS],
}

/// The exits of the function whose machine code is `code` (exactly the
/// symbol's size), loaded at `address`; None if it does not decode.
pub fn exits(code: &[u8], address: u64) -> Option<Exits> {
    let end = address + code.len() as u64;
    let inside = |target: u64| target >= address && target < end;
    // Where branches land inside: what is known of the registers stops there.
    let mut landings = Vec::new();
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut instr = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instr);
        if instr.is_invalid() {
            return None;
        }
        if has_near_target(&instr) && inside(instr.near_branch_target()) {
            landings.push(instr.near_branch_target());
        }
    }
    let mut info = InstructionInfoFactory::new();
    let mut exits = Exits::default();
    let mut constant = [false; 16];
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    while decoder.can_decode() {
        decoder.decode_out(&mut instr);
        if landings.contains(&instr.ip()) {
            constant = [false; 16];
        }
        let to = match instr.flow_control() {
            FlowControl::Call
            | FlowControl::UnconditionalBranch
            | FlowControl::ConditionalBranch
                if has_near_target(&instr) =>
            {
                let target = instr.near_branch_target();
                (!inside(target)).then_some(Destination::Direct(target))
            }
            FlowControl::IndirectCall | FlowControl::IndirectBranch
                if is_rip_relative_memory(&instr) =>
            {
                Some(Destination::Slot(instr.memory_displacement64()))
            }
            FlowControl::Call
            | FlowControl::UnconditionalBranch
            | FlowControl::ConditionalBranch
            | FlowControl::IndirectCall
            | FlowControl::IndirectBranch => {
                exits.indirect = true;
                None
            }
            _ => None,
        };
        if let Some(to) = to {
            let mut args = [false; MAX_ARGS];
            for (n, reg) in ARGUMENT_REGISTERS.iter().enumerate() {
                args[n] = constant[number(*reg).unwrap()];
            }
            exits.transfers.push(Transfer { to, constant: args });
        }
        if instr.flow_control() != FlowControl::Next {
            // A call clobbers the argument registers.
            constant = [false; 16];
            continue;
        }
        let set = sets_constant(&instr);
        for r in info.info(&instr).used_registers() {
            if writes(r.access()) {
                if let Some(n) = number(r.register().full_register()) {
                    constant[n] = set == Some(n);
                }
            }
        }
    }
    Some(exits)
}

/// The register `instr` sets to a constant: `mov $imm, reg` or
/// `xor reg, reg`.
fn sets_constant(instr: &Instruction) -> Option<usize> {
    let reg = instr.op0_register();
    match instr.code() {
        Code::Mov_r32_imm32 | Code::Mov_r64_imm64 => number(reg.full_register()),
        Code::Mov_rm32_imm32 | Code::Mov_rm64_imm32 if instr.op0_kind() == OpKind::Register => {
            number(reg.full_register())
        }
        Code::Xor_r32_rm32 | Code::Xor_rm32_r32 | Code::Xor_r64_rm64 | Code::Xor_rm64_r64
            if instr.op0_kind() == OpKind::Register
                && instr.op1_kind() == OpKind::Register
                && instr.op1_register() == reg =>
        {
            number(reg.full_register())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
