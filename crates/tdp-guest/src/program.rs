//! The guest program and the control page it reads, assembled with iced-x86's `CodeAssembler`.
//!
//! The program runs forever at CPL3. Each round it reads the current iteration number from the control
//! page's header and its workload from its vCPU's block, writes the iteration number (and, if asked, its
//! tag) at the start of `batch` pages chosen by the pattern within its range, saves its generator state,
//! counts the batch, and executes `OUT` to [`BATCH_DONE_PORT`] with its tag in EAX. The OUT exits to the
//! host, which decides when to run the vCPU again: so the host can change the iteration number or the
//! workload at batch boundaries, pace the guest, or stop it.
//!
//! The host may rewrite a vCPU's block while it runs, so the block is a seqlock: the host makes
//! [`block::GEN`] odd, writes the fields, and makes it even again; the guest reads `GEN`, the fields, and
//! `GEN` again, and skips the batch (writes nothing, counts it in [`block::SKIPPED`], still sends the
//! `OUT`) if `GEN` was odd or changed. As a second line, it also skips a block whose range is not inside
//! the data slot's bounds in the control page header, so no read can make it fault or write outside the
//! slot.
//!
//! Registers on entry: RDI = control page, RSI = this vCPU's block. The program uses no stack and only
//! instructions that are legal at CPL3 with IOPL 3 (a test decodes it back and checks).

use iced_x86::code_asm::{
    CodeAssembler, CodeLabel, qword_ptr, r8, r9, r10, r11, r12, r13, r14, r15, rax, rbp, rbx, rcx, rdi, rdx,
    rsi,
};
use iced_x86::code_asm::{eax, ebx, ecx, edx, r9d, r15d};

use crate::error::{GuestError, Result};

/// The I/O port the guest writes its tag to after each batch.
pub const BATCH_DONE_PORT: u16 = 0xe0;

/// Offset in the control page of the iteration number (u64, written by the host).
pub const CTL_ITERATION: u64 = 0;
/// Offset in the control page of the data slot's first guest address (u64, written once by the host).
pub const CTL_DATA_START: u64 = 8;
/// Offset in the control page of the data slot's end address, exclusive (u64, written once by the host).
pub const CTL_DATA_END: u64 = 16;
/// Offset in the control page of the data slot's size in pages (u64, written once by the host).
pub const CTL_DATA_PAGES: u64 = 24;
/// Offset in the control page of the first vCPU block.
pub const CTL_VCPU_BLOCKS: u64 = 128;
/// Size of one vCPU block.
pub const CTL_VCPU_BLOCK_SIZE: u64 = 128;

/// Offsets within a vCPU block (all u64). Host-written: pattern, base, pages, batch, hot pages, hot
/// threshold, tag, flags. Guest-written (host may seed): rng state, sequential cursor. Guest-written
/// counters: batches and writes.
pub mod block {
    /// Pattern code: [`PATTERN_SEQUENTIAL`], [`PATTERN_RANDOM`] or [`PATTERN_HOT`].
    pub const PATTERN: u64 = 0;
    /// Guest address of the first page of the vCPU's range.
    pub const BASE: u64 = 8;
    /// Number of pages in the range (at least 1).
    pub const PAGES: u64 = 16;
    /// Pages written per batch.
    pub const BATCH: u64 = 24;
    /// Hot pattern: number of hot pages at the start of the range (at least 1).
    pub const HOT_PAGES: u64 = 32;
    /// Hot pattern: a draw's top 16 bits below this (0..=65536) sends the write to the hot pages.
    pub const HOT_THRESHOLD: u64 = 40;
    /// xorshift64 state (never 0).
    pub const RNG: u64 = 48;
    /// Sequential pattern: next page index in the range.
    pub const CURSOR: u64 = 56;
    /// The vCPU's tag: written after the iteration number when [`FLAG_WRITE_TAG`] is set, and sent with
    /// every `OUT`.
    pub const TAG: u64 = 64;
    /// Flags ([`FLAG_WRITE_TAG`], [`FLAG_FILL_PAGE`]).
    pub const FLAGS: u64 = 72;
    /// Batches completed (guest-incremented).
    pub const BATCHES: u64 = 80;
    /// Page writes completed (guest-incremented by `batch` at the end of each batch).
    pub const WRITES: u64 = 88;
    /// Batches skipped because the block was read while the host rewrote it ([`GEN`] odd or changed) or
    /// failed the guest's range check; such a batch writes nothing but still ends with the `OUT`.
    pub const SKIPPED: u64 = 96;
    /// Sequence counter of the host-written fields: odd while the host rewrites them, bumped to the next
    /// even value when done (a seqlock: the guest skips a batch whose fields it read across a change).
    pub const GEN: u64 = 104;
    /// The guest's copy of [`GEN`] at the start of its current batch; it saves its generator state and
    /// cursor at the end only if the host has not rewritten the block meanwhile.
    pub const SEEN_GEN: u64 = 112;

    /// Pattern code: pages in order, wrapping at the end of the range.
    pub const PATTERN_SEQUENTIAL: u64 = 0;
    /// Pattern code: uniformly pseudo-random pages (xorshift64).
    pub const PATTERN_RANDOM: u64 = 1;
    /// Pattern code: a share of writes to the hot pages, the rest anywhere in the range.
    pub const PATTERN_HOT: u64 = 2;
    /// Flag: also write the tag at byte 8 of each page.
    pub const FLAG_WRITE_TAG: u64 = 1;
    /// Flag: write the iteration number into all 512 words of the page (`rep stosq`), not just the
    /// first, so every byte of a written page changes (the tag, if written, then replaces word 1).
    pub const FLAG_FILL_PAGE: u64 = 2;
}

/// Assembles the guest program for address `ip` (where the host will place it).
///
/// ```
/// let code = tdp_guest::program::assemble(0x3000)?;
/// assert!(code.len() <= 4096, "fits the code page");
/// // The batch-done OUT (E7 imm8 = out imm8, eax) is in there, with the crate's port.
/// assert!(code.windows(2).any(|w| w == [0xe7, tdp_guest::BATCH_DONE_PORT as u8]));
/// # Ok::<(), tdp_guest::GuestError>(())
/// ```
///
/// # Errors
/// [`GuestError::Assemble`] if iced-x86 rejects an instruction (a bug in this function).
pub fn assemble(ip: u64) -> Result<Vec<u8>> {
    let mut a = build().map_err(GuestError::Assemble)?;
    a.assemble(ip).map_err(GuestError::Assemble)
}

/// Builds the program's instruction list (not yet encoded).
pub(crate) fn build() -> std::result::Result<CodeAssembler, iced_x86::IcedError> {
    use block::*;
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    let mut done = a.create_label();
    let mut cursor_ok = a.create_label();
    let mut seq_loop = a.create_label();
    let mut hot_loop = a.create_label();
    let mut rand_loop = a.create_label();

    let mut skip = a.create_label();
    let mut counted = a.create_label();
    a.set_label(&mut top)?;
    a.mov(rax, qword_ptr(rsi + GEN as i32))?;
    a.test(eax, 1)?;
    a.jnz(skip)?;
    a.mov(qword_ptr(rsi + SEEN_GEN as i32), rax)?;
    a.mov(r8, qword_ptr(rdi + CTL_ITERATION as i32))?;
    a.mov(r10, qword_ptr(rsi + BASE as i32))?;
    a.mov(r11, qword_ptr(rsi + PAGES as i32))?;
    a.mov(rcx, qword_ptr(rsi + BATCH as i32))?;
    a.mov(r9, rcx)?; // R9: writes this batch will have made when it reaches `done`.
    a.mov(r12, qword_ptr(rsi + HOT_PAGES as i32))?;
    a.mov(r13, qword_ptr(rsi + HOT_THRESHOLD as i32))?;
    a.mov(r14, qword_ptr(rsi + RNG as i32))?;
    a.mov(r15, qword_ptr(rsi + CURSOR as i32))?;
    a.mov(rbx, qword_ptr(rsi + TAG as i32))?;
    a.mov(rbp, qword_ptr(rsi + FLAGS as i32))?;
    a.mov(rdx, qword_ptr(rsi + PATTERN as i32))?;
    // x86 does not reorder loads with loads: equal GEN before and after means one consistent block.
    a.cmp(rax, qword_ptr(rsi + GEN as i32))?;
    a.jne(skip)?;
    // Range check: 1 <= pages <= slot pages, slot start <= base, base + pages * 4096 <= slot end (no
    // carry), 1 <= hot pages <= pages, rng != 0. Anything else: skip the batch.
    a.test(r11, r11)?;
    a.jz(skip)?;
    a.cmp(r11, qword_ptr(rdi + CTL_DATA_PAGES as i32))?;
    a.ja(skip)?;
    a.cmp(r10, qword_ptr(rdi + CTL_DATA_START as i32))?;
    a.jb(skip)?;
    a.mov(rax, r11)?;
    a.shl(rax, 12)?;
    a.add(rax, r10)?;
    a.jc(skip)?;
    a.cmp(rax, qword_ptr(rdi + CTL_DATA_END as i32))?;
    a.ja(skip)?;
    a.test(r12, r12)?;
    a.jz(skip)?;
    a.cmp(r12, r11)?;
    a.ja(skip)?;
    a.test(r14, r14)?;
    a.jz(skip)?;
    a.test(rcx, rcx)?;
    a.jz(done)?;
    // A cursor left over from a larger range restarts at 0.
    a.cmp(r15, r11)?;
    a.jb(cursor_ok)?;
    a.xor(r15d, r15d)?;
    a.set_label(&mut cursor_ok)?;
    a.cmp(rdx, PATTERN_SEQUENTIAL as i32)?;
    a.je(seq_loop)?;
    a.cmp(rdx, PATTERN_HOT as i32)?;
    a.je(hot_loop)?;

    // Random (also any unknown pattern code): page = xorshift() % pages.
    a.set_label(&mut rand_loop)?;
    xorshift(&mut a)?;
    a.mov(rax, r14)?;
    a.xor(edx, edx)?;
    a.div(r11)?;
    write_page(&mut a)?;
    a.dec(rcx)?;
    a.jnz(rand_loop)?;
    a.jmp(done)?;

    // Sequential: page = cursor++, wrapping at pages.
    let mut seq_write = a.create_label();
    a.set_label(&mut seq_loop)?;
    a.mov(rdx, r15)?;
    a.add(r15, 1)?;
    a.cmp(r15, r11)?;
    a.jb(seq_write)?;
    a.xor(r15d, r15d)?;
    a.set_label(&mut seq_write)?;
    write_page(&mut a)?;
    a.dec(rcx)?;
    a.jnz(seq_loop)?;
    a.jmp(done)?;

    // Hot: one draw decides hot or cold (top 16 bits against the threshold), a second picks the page.
    let mut cold = a.create_label();
    let mut hot_write = a.create_label();
    a.set_label(&mut hot_loop)?;
    xorshift(&mut a)?;
    a.mov(rax, r14)?;
    a.shr(rax, 48)?;
    a.cmp(rax, r13)?;
    a.jae(cold)?;
    xorshift(&mut a)?;
    a.mov(rax, r14)?;
    a.xor(edx, edx)?;
    a.div(r12)?;
    a.jmp(hot_write)?;
    a.set_label(&mut cold)?;
    xorshift(&mut a)?;
    a.mov(rax, r14)?;
    a.xor(edx, edx)?;
    a.div(r11)?;
    a.set_label(&mut hot_write)?;
    write_page(&mut a)?;
    a.dec(rcx)?;
    a.jnz(hot_loop)?;

    // Save the generator and cursor, unless the host rewrote the block during the batch (its new seed
    // and cursor win).
    a.set_label(&mut done)?;
    a.mov(rax, qword_ptr(rsi + SEEN_GEN as i32))?;
    a.cmp(rax, qword_ptr(rsi + GEN as i32))?;
    a.jne(counted)?;
    a.mov(qword_ptr(rsi + RNG as i32), r14)?;
    a.mov(qword_ptr(rsi + CURSOR as i32), r15)?;
    // Count, tell the host.
    a.set_label(&mut counted)?;
    a.add(qword_ptr(rsi + BATCHES as i32), 1)?;
    a.add(qword_ptr(rsi + WRITES as i32), r9)?;
    a.mov(eax, ebx)?;
    a.out(u32::from(BATCH_DONE_PORT), eax)?;
    a.jmp(top)?;

    // A block read across a change, or outside the slot: count it, write nothing.
    a.set_label(&mut skip)?;
    a.add(qword_ptr(rsi + SKIPPED as i32), 1)?;
    a.xor(r9d, r9d)?;
    a.mov(rbx, qword_ptr(rsi + TAG as i32))?;
    a.jmp(counted)?;
    Ok(a)
}

/// xorshift64 (Marsaglia, shifts 13/7/17) on R14, using RAX.
fn xorshift(a: &mut CodeAssembler) -> std::result::Result<(), iced_x86::IcedError> {
    for (left, shift) in [(true, 13), (false, 7), (true, 17)] {
        a.mov(rax, r14)?;
        if left {
            a.shl(rax, shift)?;
        } else {
            a.shr(rax, shift)?;
        }
        a.xor(r14, rax)?;
    }
    Ok(())
}

/// Writes the iteration (R8) at the start of page RDX of the range at R10 (or all over it with
/// [`block::FLAG_FILL_PAGE`]), and the tag (RBX) after it with [`block::FLAG_WRITE_TAG`] (flags in RBP).
fn write_page(a: &mut CodeAssembler) -> std::result::Result<(), iced_x86::IcedError> {
    let mut skip: CodeLabel = a.create_label();
    let mut first_word = a.create_label();
    a.shl(rdx, 12)?;
    a.add(rdx, r10)?;
    a.test(rbp, block::FLAG_FILL_PAGE as i32)?;
    a.jz(first_word)?;
    // Fill: `rep stosq` needs RDI, RCX and RAX; save the two that are live on the stack page.
    // RFLAGS.DF is 0 (set by the host), so it fills upwards.
    a.push(rdi)?;
    a.push(rcx)?;
    a.mov(rdi, rdx)?;
    a.mov(ecx, 512)?;
    a.mov(rax, r8)?;
    a.rep().stosq()?;
    a.pop(rcx)?;
    a.pop(rdi)?;
    a.set_label(&mut first_word)?;
    a.mov(qword_ptr(rdx), r8)?;
    a.test(rbp, block::FLAG_WRITE_TAG as i32)?;
    a.jz(skip)?;
    a.mov(qword_ptr(rdx + 8), rbx)?;
    // The label binds to the caller's next instruction (every caller follows with `dec rcx`).
    a.set_label(&mut skip)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};

    fn decoded(ip: u64) -> Vec<iced_x86::Instruction> {
        let code = assemble(ip).unwrap_or_else(|e| panic!("{e}"));
        let mut decoder = Decoder::with_ip(64, &code, ip, DecoderOptions::NONE);
        let mut out = Vec::new();
        while decoder.can_decode() {
            let i = decoder.decode();
            assert!(!i.is_invalid(), "invalid instruction at {:#x}", i.ip());
            out.push(i);
        }
        out
    }

    #[test]
    fn assembled_code_decodes_back_to_the_program() {
        let ip = 0x3000;
        let expected = build().unwrap_or_else(|e| panic!("{e}"));
        let expected = expected.instructions();
        let got = decoded(ip);
        assert_eq!(got.len(), expected.len());
        let boundaries: Vec<u64> = got.iter().map(|i| i.ip()).collect();
        for (g, e) in got.iter().zip(expected) {
            assert_eq!(g.mnemonic(), e.mnemonic(), "at {:#x}", g.ip());
            if g.op0_kind() != OpKind::NearBranch64 {
                assert_eq!(g, e, "at {:#x}", g.ip());
            } else {
                // Branches: the assembler may pick a shorter encoding; the target must be an instruction.
                assert!(
                    boundaries.contains(&g.near_branch_target()),
                    "branch at {:#x} to {:#x} is not an instruction boundary",
                    g.ip(),
                    g.near_branch_target()
                );
            }
        }
    }

    #[test]
    fn program_is_cpl3_clean_and_writes_only_through_rdx_and_rsi() {
        let allowed = [
            Mnemonic::Mov,
            Mnemonic::Xor,
            Mnemonic::Test,
            Mnemonic::Cmp,
            Mnemonic::Je,
            Mnemonic::Jne,
            Mnemonic::Jb,
            Mnemonic::Jae,
            Mnemonic::Ja,
            Mnemonic::Jmp,
            Mnemonic::Shl,
            Mnemonic::Shr,
            Mnemonic::Add,
            Mnemonic::Div,
            Mnemonic::Dec,
            Mnemonic::Out,
            Mnemonic::Push,
            Mnemonic::Pop,
            Mnemonic::Stosq,
        ];
        let program = decoded(0x3000);
        let mut outs = 0;
        for i in &program {
            assert!(allowed.contains(&i.mnemonic()), "{:?} at {:#x}", i.mnemonic(), i.ip());
            if i.mnemonic() == Mnemonic::Out {
                outs += 1;
                assert_eq!(i.immediate8(), BATCH_DONE_PORT as u8);
                assert_eq!(i.op1_register(), Register::EAX);
            }
            if i.op0_kind() == OpKind::Memory && i.mnemonic() != Mnemonic::Cmp {
                let base = i.memory_base();
                assert!(
                    base == Register::RDX || base == Register::RSI,
                    "store via {base:?} at {:#x}",
                    i.ip()
                );
            }
        }
        assert_eq!(outs, 1, "one OUT per batch");
        // Three write loops, each with one `rep stosq` of 512 words into the page at RDI.
        let fills: Vec<_> = program.iter().filter(|i| i.mnemonic() == Mnemonic::Stosq).collect();
        assert_eq!(fills.len(), 3);
        assert!(fills.iter().all(|i| i.has_rep_prefix()));
    }
}
