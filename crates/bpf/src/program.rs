//! The two `SK_REUSEPORT` programs, as instructions.
//!
//! # The maps the rotation program reads
//!
//! | map | type | key → value | written by |
//! |---|---|---|---|
//! | `socks` | `REUSEPORT_SOCKARRAY`, `max_slots` entries | slot id → listener | user space (fd in, socket stored) |
//! | `ring` | `ARRAY` of u32, `max_slots + 1` entries | `0` → n; `1 + i` → slot id of the i-th online listener | user space |
//! | `state` | `ARRAY`, 1 entry of 24 bytes, mmapable | `0` → {rotation counter, fallbacks of new connections, fallbacks of migrations} | the program (atomic adds) |
//! | `counts` | `ARRAY`, `max_slots` entries of 24 bytes, mmapable | slot id → {connections steered there, migrated there, migrated away} | the program (atomic adds) |
//! | `origins` | `LRU_HASH`, `4 × max_slots` entries | listener's socket cookie → slot id | user space, at insert |
//!
//! Why a `ring` beside the sockarray rather than a dense sockarray: a socket can sit at only one
//! index of a sockarray at a time (the kernel keeps the index in `sk_user_data` and answers
//! `EBUSY`), so compacting a dense sockarray would mean delete-then-insert, a window in which an
//! index is empty. With the sockarray keyed by slot, a listener's entry never moves; compacting
//! is done on the `ring` of slot ids, where writing an index is one atomic-enough 4-byte store and
//! no index is ever empty (see `RrGroup::remove` for the order of the writes). Keying by slot also
//! makes the per-slot counters free of bookkeeping: the key the program selected with is the key
//! it counts under, whatever position the slot has in the rotation at that moment.
//!
//! Why `origins`: during a migration the program is given the closing listener (`ctx->sk`),
//! not its slot; its socket cookie (the same number as the fd's `SO_COOKIE`, which user space
//! reads when it inserts the listener) leads back to the slot, so the connection can be counted
//! as leaving it. Entries are never deleted (a removed slot's listener may still be closing and
//! migrating); the LRU map forgets the oldest listeners once it holds four per slot.
//!
//! Why `state` is separate from `ring`: user space never writes `state`, so its updates of `n`
//! cannot overwrite an increment of the counter the program made at the same moment.
//!
//! # The rotation program, instruction by instruction ([`RR_PROGRAM_LEN`] = 78)
//!
//! The context is `struct sk_reuseport_md`; the kernel calls the program for each new connection
//! (a SYN reaching the group, `migrating_sk == NULL`) and, because it is loaded with expected
//! attach type `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`, for each connection queued on (or
//! handshaking with) a listener being closed (`migrating_sk != NULL`, see the kernel's
//! `reuseport_migrate_sock`, `inet_csk_listen_stop` and, for a request still in its handshake,
//! the `TCP_NEW_SYN_RECV` branch of `tcp_v4_rcv` and `reqsk_timer_handler`). In both cases the
//! answer is the same: the next online listener in the rotation. Returning `SK_PASS` without having selected a socket
//! lets the kernel choose by hash among the group's listening sockets (that is the fallback);
//! `SK_DROP` would reset a migrating connection, so the program never returns it.
//!
//! ```text
//!  0     r6 = r1                        keep ctx in a callee-saved register
//!  1     r9 = ctx->migrating_sk         (u64 at +48) NULL: new connection; else: migration
//!  2     *(u32 *)(fp - 4) = 0           key 0 on the stack
//!  3-4   r2 = fp - 4
//!  5-6   r1 = &state                    (64-bit immediate: two instruction slots)
//!  7     call bpf_map_lookup_elem       (helper 1; the verifier inlines ARRAY lookups)
//!  8     if r0 == 0 goto pass           cannot happen for an ARRAY and key 0; the verifier
//!                                       insists every lookup result is checked
//!  9     r8 = r0                        r8 = &state, needed on every path to `fallback`
//! 10-11  r2 = fp - 4                    key 0 again (helpers do not write the key)
//! 12-13  r1 = &ring
//! 14     call bpf_map_lookup_elem
//! 15     if r0 == 0 goto fallback       (cannot happen either)
//! 16     r7 = *(u32 *)(r0 + 0)          r7 = n, the number of online listeners
//! 17     if r7 == 0 goto fallback       no listener online: let the kernel hash
//! 18     r1 = 1
//! 19     r1 = atomic_fetch_add(&state->counter, r1)    the rotation: each call gets its own
//!                                       ticket, even on several CPUs at once
//! 20     r1 %= r7                       i = ticket % n
//! 21     r1 += 1                        ring index 1 + i
//! 22     *(u32 *)(fp - 4) = r1
//! 23-24  r2 = fp - 4
//! 25-26  r1 = &ring
//! 27     call bpf_map_lookup_elem
//! 28     if r0 == 0 goto fallback       only if user space let n exceed max_slots
//! 29     r1 = *(u32 *)(r0 + 0)          r1 = slot id of the i-th online listener
//! 30     *(u32 *)(fp - 8) = r1          the slot id is the key of both socks and counts
//! 31     r1 = r6                        arg 1: ctx
//! 32-33  r2 = &socks                    arg 2: the sockarray
//! 34-35  r3 = fp - 8                    arg 3: &slot
//! 36     r4 = 0                         arg 4: flags
//! 37     call bpf_sk_select_reuseport   (helper 82)
//! 38     if r0 != 0 goto fallback       -ENOENT: that listener was closed before user space
//!                                       took it out of the ring; let the kernel hash
//! 39-40  r2 = fp - 8
//! 41-42  r1 = &counts
//! 43     call bpf_map_lookup_elem
//! 44     if r0 == 0 goto pass
//! 45     r1 = 1
//! 46     if r9 != 0 goto +2
//! 47     lock *(u64 *)(r0 + 0) += r1    counts[slot].steered += 1
//! 48     goto pass
//! 49     lock *(u64 *)(r0 + 8) += r1    counts[slot].migrated_in += 1
//! 50     goto pass
//!      fallback:
//! 51     r1 = 1
//! 52     if r9 != 0 goto +2
//! 53     lock *(u64 *)(r8 + 8) += r1    state->fallback_new += 1
//! 54     goto pass
//! 55     lock *(u64 *)(r8 + 16) += r1   state->fallback_migrated += 1
//!      pass:
//! 56     if r9 == 0 goto done           the rest is for migrations only
//! 57     r1 = ctx->sk                   (u64 at +40) the closing listener
//! 58     call bpf_get_socket_cookie     (helper 46)
//! 59     *(u64 *)(fp - 16) = r0
//! 60-61  r2 = fp - 16
//! 62-63  r1 = &origins
//! 64     call bpf_map_lookup_elem
//! 65     if r0 == 0 goto done           a listener user space never inserted
//! 66     r1 = *(u32 *)(r0 + 0)          the slot the connection is leaving
//! 67     *(u32 *)(fp - 4) = r1
//! 68-69  r2 = fp - 4
//! 70-71  r1 = &counts
//! 72     call bpf_map_lookup_elem
//! 73     if r0 == 0 goto done
//! 74     r1 = 1
//! 75     lock *(u64 *)(r0 + 16) += r1   counts[from].migrated_out += 1
//!      done:
//! 76     r0 = 1                         SK_PASS: use the selected listener, or hash if none
//! 77     exit
//! ```
//!
//! The issue's proof of concept was 22 instructions: lookup, fetch-add, modulo, select. The 56
//! more buy: the slot indirection (a second ring lookup) that keeps sockarray entries still while
//! the membership changes; per-slot counters that stay honest through migrations (a connection
//! counts as steered to the slot it was first sent to, as migrated away from it, and as migrated
//! into the slot that serves it, so `steered - migrated_out + migrated_in` is what a slot
//! received); and counted fallbacks, so that "never steered to an empty index" is measured rather
//! than assumed. Every path is straight-line or a forward jump: no loop, so the verifier walks it
//! in about a hundred steps.
//!
//! # The migrate-only program ([`MIGRATE_ONLY_PROGRAM_LEN`] = 2)
//!
//! `r0 = SK_PASS; exit`, loaded with the same expected attach type. It selects nothing, so new
//! connections are spread by the kernel's hash exactly as with no program, but its mere presence
//! with `SELECT_OR_MIGRATE` makes the kernel move a closing listener to the group's "closed"
//! section and migrate its queued connections (by hash) instead of resetting them: plain
//! `reuseport` without the resets on scale-down. (The sysctl `net.ipv4.tcp_migrate_req = 1` does
//! the same without BPF, but for every socket of the network namespace.)

#![forbid(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::insn::{Asm, Insn, Reg, Size};

/// `enum bpf_func_id`.
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_GET_SOCKET_COOKIE: i32 = 46;
const BPF_FUNC_SK_SELECT_REUSEPORT: i32 = 82;

/// `enum sk_action`.
const SK_PASS: i32 = 1;

/// Offsets of `sk` and `migrating_sk` in `struct sk_reuseport_md` (after data, data_end, five
/// u32s and padding).
const MD_SK: i16 = 40;
const MD_MIGRATING_SK: i16 = 48;

/// Byte offsets in the `state` value.
pub const STATE_COUNTER: usize = 0;
pub const STATE_FALLBACK_NEW: usize = 8;
pub const STATE_FALLBACK_MIGRATED: usize = 16;
pub const STATE_VALUE_SIZE: u32 = 24;

/// Byte offsets in a `counts` value.
pub const COUNT_STEERED: usize = 0;
pub const COUNT_MIGRATED_IN: usize = 8;
pub const COUNT_MIGRATED_OUT: usize = 16;
pub const COUNT_VALUE_SIZE: u32 = 24;

/// Instructions in the rotation program (a 64-bit immediate load counts as two).
pub const RR_PROGRAM_LEN: usize = 78;
/// Instructions in the migrate-only program.
pub const MIGRATE_ONLY_PROGRAM_LEN: usize = 2;

/// The maps the rotation program refers to (by fd; the kernel swaps in their addresses at load).
pub struct RrMaps<'a> {
    pub socks: BorrowedFd<'a>,
    pub ring: BorrowedFd<'a>,
    pub state: BorrowedFd<'a>,
    pub counts: BorrowedFd<'a>,
    pub origins: BorrowedFd<'a>,
}

/// Assembles the rotation program described in the module doc.
pub fn rr_program(maps: &RrMaps<'_>) -> Vec<Insn> {
    use Reg::*;
    let mut a = Asm::new();
    let fallback = a.label();
    let pass = a.label();
    let migrated = a.label();
    let fallback_migrated = a.label();
    let done = a.label();

    a.mov64_reg(R6, R1);
    a.load(Size::DW, R9, R6, MD_MIGRATING_SK);
    // state = lookup(state, 0)
    a.store_imm(Size::W, R10, -4, 0);
    a.mov64_reg(R2, R10).add64_imm(R2, -4);
    a.load_map_fd(R1, maps.state.as_raw_fd());
    a.call(BPF_FUNC_MAP_LOOKUP_ELEM);
    a.jeq_imm(R0, 0, pass);
    a.mov64_reg(R8, R0);
    // n = ring[0]
    a.mov64_reg(R2, R10).add64_imm(R2, -4);
    a.load_map_fd(R1, maps.ring.as_raw_fd());
    a.call(BPF_FUNC_MAP_LOOKUP_ELEM);
    a.jeq_imm(R0, 0, fallback);
    a.load(Size::W, R7, R0, 0);
    a.jeq_imm(R7, 0, fallback);
    // i = fetch_add(counter, 1) % n; slot = ring[1 + i]
    a.mov64_imm(R1, 1);
    a.atomic_fetch_add64(R8, R1, STATE_COUNTER as i16);
    a.mod64_reg(R1, R7);
    a.add64_imm(R1, 1);
    a.store_reg(Size::W, R10, R1, -4);
    a.mov64_reg(R2, R10).add64_imm(R2, -4);
    a.load_map_fd(R1, maps.ring.as_raw_fd());
    a.call(BPF_FUNC_MAP_LOOKUP_ELEM);
    a.jeq_imm(R0, 0, fallback);
    a.load(Size::W, R1, R0, 0);
    a.store_reg(Size::W, R10, R1, -8);
    // bpf_sk_select_reuseport(ctx, socks, &slot, 0)
    a.mov64_reg(R1, R6);
    a.load_map_fd(R2, maps.socks.as_raw_fd());
    a.mov64_reg(R3, R10).add64_imm(R3, -8);
    a.mov64_imm(R4, 0);
    a.call(BPF_FUNC_SK_SELECT_REUSEPORT);
    a.jne_imm(R0, 0, fallback);
    // counts[slot].steered or .migrated_in += 1
    a.mov64_reg(R2, R10).add64_imm(R2, -8);
    a.load_map_fd(R1, maps.counts.as_raw_fd());
    a.call(BPF_FUNC_MAP_LOOKUP_ELEM);
    a.jeq_imm(R0, 0, pass);
    a.mov64_imm(R1, 1);
    a.jne_imm(R9, 0, migrated);
    a.atomic_add64(R0, R1, COUNT_STEERED as i16);
    a.ja(pass);
    a.bind(migrated);
    a.atomic_add64(R0, R1, COUNT_MIGRATED_IN as i16);
    a.ja(pass);
    // fallback: count it, select nothing
    a.bind(fallback);
    a.mov64_imm(R1, 1);
    a.jne_imm(R9, 0, fallback_migrated);
    a.atomic_add64(R8, R1, STATE_FALLBACK_NEW as i16);
    a.ja(pass);
    a.bind(fallback_migrated);
    a.atomic_add64(R8, R1, STATE_FALLBACK_MIGRATED as i16);
    // pass: a migration also counts as leaving the closing listener's slot
    a.bind(pass);
    a.jeq_imm(R9, 0, done);
    a.load(Size::DW, R1, R6, MD_SK);
    a.call(BPF_FUNC_GET_SOCKET_COOKIE);
    a.store_reg(Size::DW, R10, R0, -16);
    a.mov64_reg(R2, R10).add64_imm(R2, -16);
    a.load_map_fd(R1, maps.origins.as_raw_fd());
    a.call(BPF_FUNC_MAP_LOOKUP_ELEM);
    a.jeq_imm(R0, 0, done);
    a.load(Size::W, R1, R0, 0);
    a.store_reg(Size::W, R10, R1, -4);
    a.mov64_reg(R2, R10).add64_imm(R2, -4);
    a.load_map_fd(R1, maps.counts.as_raw_fd());
    a.call(BPF_FUNC_MAP_LOOKUP_ELEM);
    a.jeq_imm(R0, 0, done);
    a.mov64_imm(R1, 1);
    a.atomic_add64(R0, R1, COUNT_MIGRATED_OUT as i16);
    a.bind(done);
    a.mov64_imm(R0, SK_PASS);
    a.exit();
    a.finish()
}

/// Assembles the migrate-only program: `r0 = SK_PASS; exit`.
pub fn migrate_only_program() -> Vec<Insn> {
    let mut a = Asm::new();
    a.mov64_imm(Reg::R0, SK_PASS);
    a.exit();
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn instruction_counts_match_the_doc() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = f.as_fd();
        let maps = RrMaps {
            socks: fd,
            ring: fd,
            state: fd,
            counts: fd,
            origins: fd,
        };
        assert_eq!(rr_program(&maps).len(), RR_PROGRAM_LEN);
        assert_eq!(migrate_only_program().len(), MIGRATE_ONLY_PROGRAM_LEN);
    }

    #[test]
    fn every_jump_lands_inside_the_program() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = f.as_fd();
        let p = rr_program(&RrMaps {
            socks: fd,
            ring: fd,
            state: fd,
            counts: fd,
            origins: fd,
        });
        for (i, insn) in p.iter().enumerate() {
            let class_jmp = insn.code & 0x07 == 0x05;
            let op = insn.code & 0xf0;
            if class_jmp && op != 0x80 && op != 0x90 {
                let target = i as isize + 1 + insn.off as isize;
                assert!(
                    target > i as isize && (target as usize) < p.len(),
                    "jump at {i}"
                );
            }
        }
        // The last instruction is exit, preceded by r0 = SK_PASS.
        assert_eq!(p[p.len() - 1].code, 0x95);
        assert_eq!((p[p.len() - 2].code, p[p.len() - 2].imm), (0xb7, SK_PASS));
    }

    /// The numbered listing in the module doc is the program: spot-check its landmarks.
    #[test]
    fn the_listing_in_the_doc_matches() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = f.as_fd();
        let p = rr_program(&RrMaps {
            socks: fd,
            ring: fd,
            state: fd,
            counts: fd,
            origins: fd,
        });
        let call = |i: usize| (p[i].code, p[i].imm);
        assert_eq!((p[1].code, p[1].off), (0x79, MD_MIGRATING_SK)); // r9 = ctx->migrating_sk
        for i in [5, 12, 25, 32, 41, 62, 70] {
            assert_eq!(p[i].code, 0x18, "ld_imm64 map at {i}");
        }
        assert_eq!((p[57].code, p[57].off), (0x79, MD_SK)); // r1 = ctx->sk
        assert_eq!(call(58), (0x85, BPF_FUNC_GET_SOCKET_COOKIE));
        assert_eq!((p[75].code, p[75].off), (0xdb, 16)); // migrated_out += 1
        for i in [7, 14, 27, 43, 64, 72] {
            assert_eq!(call(i), (0x85, BPF_FUNC_MAP_LOOKUP_ELEM), "lookup at {i}");
        }
        assert_eq!(call(37), (0x85, BPF_FUNC_SK_SELECT_REUSEPORT));
        assert_eq!((p[19].code, p[19].imm), (0xdb, 1)); // fetch-add
        assert_eq!(p[20].code, 0x9f); // r1 %= r7
        for (i, off) in [(47, 0), (49, 8), (53, 8), (55, 16)] {
            assert_eq!(
                (p[i].code, p[i].imm, p[i].off),
                (0xdb, 0, off),
                "atomic add at {i}"
            );
        }
        // Every jump to `fallback` lands on 51, to `pass` on 56, to `done` on 76.
        for (i, target) in [
            (8, 56),
            (15, 51),
            (17, 51),
            (28, 51),
            (38, 51),
            (44, 56),
            (48, 56),
            (50, 56),
            (54, 56),
            (56, 76),
            (65, 76),
            (73, 76),
        ] {
            assert_eq!(i as i16 + 1 + p[i].off, target, "jump at {i}");
        }
    }
}
