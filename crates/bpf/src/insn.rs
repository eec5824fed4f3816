//! A small eBPF assembler: named constructors for the handful of instructions the programs use,
//! and forward labels so no jump offset is counted by hand.
//!
//! The encoding is the kernel's `struct bpf_insn` (`include/uapi/linux/bpf.h`): one opcode byte,
//! the destination register in the low nibble and the source register in the high nibble of the
//! second byte (little-endian bitfields), a signed 16-bit offset and a signed 32-bit immediate.
//! Opcode bytes are built from the class, size, mode, source and operation constants of
//! `include/uapi/linux/bpf_common.h` and `bpf.h`; each constructor below says which.
//!
//! Only what the programs need is here; this is not a general assembler, and it does no
//! verification of its own: the kernel verifier is the judge.

#![forbid(unsafe_code)]

// Instruction classes (bpf_common.h / bpf.h).
const BPF_LD: u8 = 0x00;
const BPF_LDX: u8 = 0x01;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_JMP: u8 = 0x05;
const BPF_ALU64: u8 = 0x07;

// Sizes.
const BPF_W: u8 = 0x00;
const BPF_DW: u8 = 0x18;

// Modes.
const BPF_IMM: u8 = 0x00;
const BPF_MEM: u8 = 0x60;
const BPF_ATOMIC: u8 = 0xc0;

// Operand source: immediate (K) or register (X).
const BPF_K: u8 = 0x00;
const BPF_X: u8 = 0x08;

// ALU operations.
const BPF_ADD: u8 = 0x00;
const BPF_MOD: u8 = 0x90;
const BPF_MOV: u8 = 0xb0;

// Jump operations.
const BPF_JA: u8 = 0x00;
const BPF_JEQ: u8 = 0x10;
const BPF_JNE: u8 = 0x50;
const BPF_CALL: u8 = 0x80;
const BPF_EXIT: u8 = 0x90;

// Atomic operations, carried in the immediate of a BPF_ATOMIC instruction.
const ATOMIC_ADD: i32 = 0x00;
const ATOMIC_FETCH: i32 = 0x01;

/// `src_reg` value of a 64-bit immediate load meaning "the immediate is a map fd": the kernel
/// replaces it with the map's address when it loads the program.
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// A register. r0 holds return values, r1-r5 are helper arguments (clobbered by calls), r6-r9 are
/// callee-saved, r10 is the read-only frame pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reg {
    R0 = 0,
    R1 = 1,
    R2 = 2,
    R3 = 3,
    R4 = 4,
    R6 = 6,
    R7 = 7,
    R8 = 8,
    R9 = 9,
    /// The frame pointer: the stack is the 512 bytes below it.
    R10 = 10,
}

/// Width of a memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// 32 bits; a load zero-extends into the 64-bit register.
    W,
    /// 64 bits.
    DW,
}

impl Size {
    fn bits(self) -> u8 {
        match self {
            Size::W => BPF_W,
            Size::DW => BPF_DW,
        }
    }
}

/// One instruction, laid out exactly as the kernel's `struct bpf_insn` (8 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    /// dst in bits 0-3, src in bits 4-7.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    fn new(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (dst as u8) | ((src as u8) << 4),
            off,
            imm,
        }
    }
}

/// A jump target, bound to a position later with [`Asm::bind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Label(usize);

/// Instructions under construction, with jumps to labels resolved by [`Asm::finish`].
#[derive(Default)]
pub struct Asm {
    insns: Vec<Insn>,
    /// Position each label was bound to, if it was.
    labels: Vec<Option<usize>>,
    /// (instruction index, label) of each jump whose offset is still to be filled in.
    fixups: Vec<(usize, Label)>,
}

impl Asm {
    pub fn new() -> Asm {
        Asm::default()
    }

    /// A new label, not yet bound.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `label` to the next instruction emitted.
    pub fn bind(&mut self, label: Label) {
        assert!(self.labels[label.0].is_none(), "label bound twice");
        self.labels[label.0] = Some(self.insns.len());
    }

    fn push(&mut self, insn: Insn) -> &mut Asm {
        self.insns.push(insn);
        self
    }

    fn jump(&mut self, insn: Insn, to: Label) -> &mut Asm {
        self.fixups.push((self.insns.len(), to));
        self.push(insn)
    }

    /// `dst = src` (64-bit). `BPF_ALU64 | BPF_MOV | BPF_X`.
    pub fn mov64_reg(&mut self, dst: Reg, src: Reg) -> &mut Asm {
        self.push(Insn::new(BPF_ALU64 | BPF_MOV | BPF_X, dst, src, 0, 0))
    }

    /// `dst = imm` (sign-extended to 64 bits). `BPF_ALU64 | BPF_MOV | BPF_K`.
    pub fn mov64_imm(&mut self, dst: Reg, imm: i32) -> &mut Asm {
        self.push(Insn::new(BPF_ALU64 | BPF_MOV | BPF_K, dst, Reg::R0, 0, imm))
    }

    /// `dst += imm` (64-bit). `BPF_ALU64 | BPF_ADD | BPF_K`.
    pub fn add64_imm(&mut self, dst: Reg, imm: i32) -> &mut Asm {
        self.push(Insn::new(BPF_ALU64 | BPF_ADD | BPF_K, dst, Reg::R0, 0, imm))
    }

    /// `dst %= src`, unsigned 64-bit (`x % 0` is defined as `x`). `BPF_ALU64 | BPF_MOD | BPF_X`.
    pub fn mod64_reg(&mut self, dst: Reg, src: Reg) -> &mut Asm {
        self.push(Insn::new(BPF_ALU64 | BPF_MOD | BPF_X, dst, src, 0, 0))
    }

    /// `dst = *(size *)(src + off)`. `BPF_LDX | size | BPF_MEM`.
    pub fn load(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Asm {
        self.push(Insn::new(BPF_LDX | size.bits() | BPF_MEM, dst, src, off, 0))
    }

    /// `*(size *)(dst + off) = imm`. `BPF_ST | size | BPF_MEM`.
    pub fn store_imm(&mut self, size: Size, dst: Reg, off: i16, imm: i32) -> &mut Asm {
        self.push(Insn::new(
            BPF_ST | size.bits() | BPF_MEM,
            dst,
            Reg::R0,
            off,
            imm,
        ))
    }

    /// `*(size *)(dst + off) = src`. `BPF_STX | size | BPF_MEM`.
    pub fn store_reg(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Asm {
        self.push(Insn::new(BPF_STX | size.bits() | BPF_MEM, dst, src, off, 0))
    }

    /// `lock *(u64 *)(dst + off) += src`: an atomic add, no result.
    /// `BPF_STX | BPF_DW | BPF_ATOMIC`, imm `BPF_ADD`.
    pub fn atomic_add64(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Asm {
        self.push(Insn::new(
            BPF_STX | BPF_DW | BPF_ATOMIC,
            dst,
            src,
            off,
            ATOMIC_ADD,
        ))
    }

    /// `src = atomic_fetch_add((u64 *)(dst + off), src)`: atomic add, `src` gets the old value.
    /// `BPF_STX | BPF_DW | BPF_ATOMIC`, imm `BPF_ADD | BPF_FETCH` (Linux 5.12).
    pub fn atomic_fetch_add64(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Asm {
        self.push(Insn::new(
            BPF_STX | BPF_DW | BPF_ATOMIC,
            dst,
            src,
            off,
            ATOMIC_ADD | ATOMIC_FETCH,
        ))
    }

    /// `dst = <address of the map whose fd is map_fd>`: the two-slot 64-bit immediate load
    /// `BPF_LD | BPF_DW | BPF_IMM` with `src_reg = BPF_PSEUDO_MAP_FD`. Counts as two instructions.
    pub fn load_map_fd(&mut self, dst: Reg, map_fd: i32) -> &mut Asm {
        let mut first = Insn::new(BPF_LD | BPF_DW | BPF_IMM, dst, Reg::R0, 0, map_fd);
        first.regs |= BPF_PSEUDO_MAP_FD << 4;
        self.push(first);
        // The second slot carries the upper 32 bits of the immediate: none for an fd.
        self.push(Insn {
            code: 0,
            regs: 0,
            off: 0,
            imm: 0,
        })
    }

    /// `goto to`. `BPF_JMP | BPF_JA`.
    pub fn ja(&mut self, to: Label) -> &mut Asm {
        self.jump(Insn::new(BPF_JMP | BPF_JA, Reg::R0, Reg::R0, 0, 0), to)
    }

    /// `if dst == imm goto to` (64-bit compare). `BPF_JMP | BPF_JEQ | BPF_K`.
    pub fn jeq_imm(&mut self, dst: Reg, imm: i32, to: Label) -> &mut Asm {
        self.jump(
            Insn::new(BPF_JMP | BPF_JEQ | BPF_K, dst, Reg::R0, 0, imm),
            to,
        )
    }

    /// `if dst != imm goto to` (64-bit compare). `BPF_JMP | BPF_JNE | BPF_K`.
    pub fn jne_imm(&mut self, dst: Reg, imm: i32, to: Label) -> &mut Asm {
        self.jump(
            Insn::new(BPF_JMP | BPF_JNE | BPF_K, dst, Reg::R0, 0, imm),
            to,
        )
    }

    /// Calls kernel helper number `helper` (`enum bpf_func_id`); arguments in r1-r5, result in
    /// r0, r1-r5 clobbered. `BPF_JMP | BPF_CALL`.
    pub fn call(&mut self, helper: i32) -> &mut Asm {
        self.push(Insn::new(BPF_JMP | BPF_CALL, Reg::R0, Reg::R0, 0, helper))
    }

    /// Returns r0 to the kernel. `BPF_JMP | BPF_EXIT`.
    pub fn exit(&mut self) -> &mut Asm {
        self.push(Insn::new(BPF_JMP | BPF_EXIT, Reg::R0, Reg::R0, 0, 0))
    }

    /// Resolves every jump (offsets count from the instruction after the jump) and returns the
    /// program. Panics on an unbound label or an offset that does not fit: both are bugs in the
    /// program's source, caught by the unit tests.
    pub fn finish(mut self) -> Vec<Insn> {
        for &(at, label) in &self.fixups {
            let target = self.labels[label.0].expect("jump to an unbound label");
            let off = target as isize - (at as isize + 1);
            self.insns[at].off = i16::try_from(off).expect("jump offset out of range");
        }
        self.insns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insn_is_eight_bytes_like_struct_bpf_insn() {
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }

    #[test]
    fn encodings_match_the_kernel_headers() {
        let mut a = Asm::new();
        a.mov64_reg(Reg::R6, Reg::R1);
        a.load_map_fd(Reg::R1, 7);
        a.atomic_fetch_add64(Reg::R8, Reg::R1, 0);
        a.store_imm(Size::W, Reg::R10, -4, 0);
        a.exit();
        let p = a.finish();
        assert_eq!(
            p[0],
            Insn {
                code: 0xbf,
                regs: 0x16,
                off: 0,
                imm: 0
            }
        );
        assert_eq!(
            p[1],
            Insn {
                code: 0x18,
                regs: 0x11,
                off: 0,
                imm: 7
            }
        );
        assert_eq!(
            p[2],
            Insn {
                code: 0,
                regs: 0,
                off: 0,
                imm: 0
            }
        );
        assert_eq!(
            p[3],
            Insn {
                code: 0xdb,
                regs: 0x18,
                off: 0,
                imm: 1
            }
        );
        assert_eq!(
            p[4],
            Insn {
                code: 0x62,
                regs: 0x0a,
                off: -4,
                imm: 0
            }
        );
        assert_eq!(
            p[5],
            Insn {
                code: 0x95,
                regs: 0,
                off: 0,
                imm: 0
            }
        );
    }

    #[test]
    fn jumps_resolve_forward_and_count_from_the_next_instruction() {
        let mut a = Asm::new();
        let out = a.label();
        a.jeq_imm(Reg::R0, 0, out);
        a.mov64_imm(Reg::R0, 2);
        a.ja(out);
        a.mov64_imm(Reg::R0, 3);
        a.bind(out);
        a.exit();
        let p = a.finish();
        assert_eq!(p[0].off, 3);
        assert_eq!(p[2].off, 1);
    }
}
