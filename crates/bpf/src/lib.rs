//! The eBPF part of `--policy reuseport-rr`: the kernel picks the listener, in strict rotation over
//! the online workers, for every new connection of a reuseport group — rr's fairness with no
//! handoff through the primary.
//!
//! # Theory of operation
//!
//! Under `reuseport-rr` each worker slot has its own `SO_REUSEPORT` listener on the listen
//! address, as under `reuseport`; together they form the kernel's *reuseport group* of that
//! address. Without a program the kernel picks a group member by hashing the connection's
//! 4-tuple. An [`RrGroup`] loads a `BPF_PROG_TYPE_SK_REUSEPORT` program that the kernel runs
//! instead, once per new connection: it takes a ticket from an atomic counter and selects
//! listener number `ticket % n` among the `n` online ones. The program, its maps and why it is
//! written the way it is are in [`program`] (78 instructions, explained one by one).
//!
//! The primary keeps the program's view of "online" in step with its own through
//! [`RrGroup::insert`] and [`RrGroup::remove`] (or [`RrGroup::set_members`]): a worker that is
//! starting, draining or dead is not in the rotation, a restarted slot rejoins when it is online
//! again. Each update is written in an order such that a connection arriving at any moment finds
//! a full rotation: never an empty position (see [`RrGroup::remove`]).
//!
//! The program is loaded with expected attach type `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` (Linux
//! 5.14). With it, closing a listener does not reset the connections queued on it: the kernel
//! calls the program again for each of them, with `migrating_sk` set, and moves them to the
//! listener it selects (the next online one in the rotation), see `reuseport_migrate_sock` and
//! `inet_csk_listen_stop` in the kernel. That is what keeps promise 6 under this policy.
//!
//! Per-slot counters kept by the program ([`RrGroup::count`], [`SlotCount::received`]) give
//! `connections_total` even for workers roundhouse cannot talk to (`--plain`), migrations
//! included: a connection moved off a closing listener counts for the slot that got it.
//!
//! # Using it (the primary's side)
//!
//! One [`RrGroup`] per listen address (each `-l ADDR` is its own reuseport group: a socket can be
//! in one group and one sockarray only, and each address rotates on its own counter).
//!
//! 1. At startup, per address: [`RrGroup::new`]`(max_slots)`, before any worker starts. Every
//!    error here is fatal for the policy; [`BpfError::MissingCapability`] and
//!    [`BpfError::Unsupported`] print as the one line the SPEC asks for (exit 1).
//! 2. Bind and `listen` the slot listeners as under `reuseport`, then [`RrGroup::attach`] on any
//!    one of them *that is listening* (a socket only bound gets a group of its own from the
//!    attach, and its `listen` then fails with `EADDRINUSE` when another listener already has
//!    the address). The program is the group's, not the socket's: the group keeps it while any
//!    member listens, even after that socket is closed; attach again only if every listener of
//!    the address was closed at once.
//! 3. When a worker becomes online: [`RrGroup::insert`]`(slot, listener)` (the listener must be
//!    listening: the kernel refuses anything else). When it leaves online:
//!    [`RrGroup::remove`]`(slot)` — for a drain, scale-down or recycle *before* the worker is
//!    told to stop, so no new connection is steered to it; for an exit or a kill, as soon as it
//!    is reaped (if its listener closed with the process, the kernel already took it out of the
//!    sockarray, and until `remove` the program falls back to hash for that position: counted,
//!    nothing reset). Each call is a few `bpf(2)` syscalls: no blocking, no allocation.
//! 4. To make a slot's queued connections move to other workers (scale-down, a worker gone for
//!    good), close every fd of its listener (the primary's copy included) after `remove`: the
//!    kernel migrates them. If the primary keeps a slot's listener open across a restart, its
//!    queued connections wait there for the slot's next worker instead (nothing is reset either
//!    way).
//! 5. Reload (a new worker for a slot whose old worker still serves): if the new worker has its
//!    own listener, [`RrGroup::insert`]`(slot, new listener)` once it is online swaps the slot's
//!    socket in place (same position in the rotation), then the old worker drains and its
//!    listener closes (its queue migrates). If a slot keeps one listener across generations,
//!    nothing changes in the group: the slot stays in the rotation throughout.
//! 6. For `/stats`: [`RrGroup::count`]`(slot)` (two atomic loads from a shared mapping, no
//!    syscall) and [`RrGroup::fallbacks`]; [`RrGroup::counters`] gives a cloneable handle for a
//!    reader outside the owner loop.
//!
//! ```no_run
//! # fn listener_of(_slot: u32) -> std::net::TcpListener { unimplemented!() }
//! use std::os::fd::AsFd;
//! use roundhouse_bpf::{BpfError, RrGroup};
//!
//! // Startup, once per listen address (worker ids 1..=1024 used as slot ids).
//! let mut group = RrGroup::new(1025)?; // MissingCapability → print it, exit 1
//! group.attach(listener_of(1).as_fd())?; // after the listeners listen
//! // Worker 3 online:
//! group.insert(3, listener_of(3).as_fd())?;
//! // Worker 3 draining (before SIGTERM), or reaped after a crash:
//! group.remove(3)?;
//! // /stats:
//! let connections_total = group.count(3).received();
//! # let _ = connections_total;
//! # Ok::<(), BpfError>(())
//! ```
//!
//! With `n == 0` (no worker online) the program selects nothing and the kernel hashes over the
//! group's listeners: connections wait in the queue of a starting worker's listener. Every such
//! fallback is counted.
//!
//! [`MigrateOnly`] is the same idea reduced to migration for plain `--policy reuseport`: a
//! two-instruction program that selects nothing (so the kernel keeps hashing) but makes the
//! group migrate the queued connections of a closed listener instead of resetting them.
//!
//! # Capabilities
//!
//! Creating the `REUSEPORT_SOCKARRAY` map and loading an `SK_REUSEPORT` program need `CAP_BPF`
//! (or `CAP_SYS_ADMIN`, which implies it); nothing here needs `CAP_NET_ADMIN` or `CAP_PERFMON`
//! (the `only_cap_bpf_is_enough` test runs everything with `CAP_BPF` as the only capability;
//! by hand on 6.18, uid `nobody` with `CAP_BPF` as its only, ambient, capability — what systemd's
//! `AmbientCapabilities=CAP_BPF` gives — passes the rotation test, `CAP_SYS_ADMIN` alone is
//! enough too, and `CAP_NET_ADMIN` with `CAP_PERFMON` but no `CAP_BPF` gets `MissingCapability`).
//! No `RLIMIT_MEMLOCK` is needed (BPF memory is charged to the cgroup since Linux 5.11).
//! Attaching, updating the maps and reading the counters need only the fds.

pub mod insn;
pub mod program;
mod sys;

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use program::{RrMaps, COUNT_MIGRATED_IN, COUNT_MIGRATED_OUT, COUNT_STEERED, COUNT_VALUE_SIZE};
use program::{STATE_COUNTER, STATE_FALLBACK_MIGRATED, STATE_FALLBACK_NEW, STATE_VALUE_SIZE};
use sys::MapView;

pub use program::{MIGRATE_ONLY_PROGRAM_LEN, RR_PROGRAM_LEN};

/// The largest `max_slots` accepted: a reuseport group holds at most `u16::MAX` sockets.
pub const MAX_SLOTS: u32 = u16::MAX as u32;

/// The license the programs are declared under. They call no GPL-only helper, so the kernel
/// accepts any string; this is the project's own.
const LICENSE: &CStr = c"MIT OR Apache-2.0";

const NONE: u32 = u32::MAX;

/// Why the BPF part of a policy could not be set up or updated.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The kernel refused for lack of privilege (`EPERM`/`EACCES`).
    #[error(
        "reuseport-rr needs CAP_BPF to load its eBPF program (could not {op}: {err}): run as \
         root or grant CAP_BPF (systemd `AmbientCapabilities=CAP_BPF`, a container's \
         `cap_add: [BPF]`), or use --policy rr"
    )]
    MissingCapability { op: &'static str, err: io::Error },
    /// The kernel has no BPF, or not this map or program type or attach type
    /// (`ENOSYS`/`EINVAL`/`EOPNOTSUPP` with no verifier log).
    #[error(
        "this kernel cannot run reuseport-rr's eBPF program (could not {op}: {err}); it needs \
         Linux 5.14 or later with BPF enabled: use --policy rr"
    )]
    Unsupported { op: &'static str, err: io::Error },
    /// The verifier refused the program; `log` is its own explanation.
    #[error("the kernel verifier refused reuseport-rr's eBPF program ({err}):\n{log}")]
    Verifier { log: String, err: io::Error },
    /// `max_slots` is 0 or more than [`MAX_SLOTS`].
    #[error("a reuseport-rr group needs between 1 and {MAX_SLOTS} slots, not {0}")]
    BadMaxSlots(u32),
    /// A slot id not below the group's `max_slots`.
    #[error("slot {slot} is out of range: this reuseport-rr group has slots 0..{max_slots}")]
    SlotOutOfRange { slot: u32, max_slots: u32 },
    /// The kernel would not put that socket in the group's sockarray: it is not a listening
    /// `SO_REUSEPORT` TCP/UDP socket (`EINVAL`), or already in a sockarray (`EBUSY`).
    #[error("could not put slot {slot}'s listener in the reuseport-rr rotation: {err}")]
    Member { slot: u32, err: io::Error },
    /// Any other failed syscall.
    #[error("could not {op}: {err}")]
    Sys { op: &'static str, err: io::Error },
}

impl BpfError {
    /// Sorts an error of a map or program creation step by errno.
    fn classify(op: &'static str, err: io::Error) -> BpfError {
        match err.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => BpfError::MissingCapability { op, err },
            Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(ENOTSUPP) => {
                BpfError::Unsupported { op, err }
            }
            _ => BpfError::Sys { op, err },
        }
    }
}

/// The kernel-internal "not supported" errno that `bpf(2)` can leak to user space.
const ENOTSUPP: i32 = 524;

/// What the program counted for one slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCount {
    /// New connections the program steered to this slot's listener: one per connection, since
    /// the kernel runs the program once per SYN that creates a request (a retransmitted SYN
    /// finds the request and does not). Two exceptions make it a little more than accepted
    /// connections: a SYN dropped because the accept queue was full (counted, then counted
    /// again when the client retries), and under SYN cookies (a SYN flood) the final ACK,
    /// which the kernel selects a listener for again.
    pub steered: u64,
    /// Connections moved to this slot's listener from a closing one (already counted, as
    /// `steered`, on the slot they first went to, and there as `migrated_out`).
    pub migrated_in: u64,
    /// Connections queued on (or handshaking with) this slot's listener when it closed, which
    /// the kernel moved elsewhere (to another slot, counted there as `migrated_in`, or, on a
    /// fallback, by hash).
    pub migrated_out: u64,
}

impl SlotCount {
    /// Connections this slot's listeners received and kept: what its workers were given to
    /// accept. The figure for `connections_total`.
    pub fn received(&self) -> u64 {
        (self.steered + self.migrated_in).saturating_sub(self.migrated_out)
    }
}

/// Selections the program left to the kernel's hash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fallbacks {
    /// New connections: no online listener (`n == 0`) or the selected one had just closed.
    pub new: u64,
    /// Migrating connections, for the same reasons. A migrated connection is still not reset:
    /// the kernel hashes it over the listeners left.
    pub migrated: u64,
}

/// Strict round-robin over the online listeners of one reuseport group (one listen address).
///
/// Not `Clone`: one owner (the primary's owner loop) updates the membership. Dropping it closes
/// the user-space handles; a program still attached keeps running with the last membership until
/// the group's listeners close or [`RrGroup::detach`] is called.
pub struct RrGroup {
    prog: OwnedFd,
    socks: OwnedFd,
    ring: OwnedFd,
    /// Socket cookie → slot, for the program to tell which slot a migrating connection leaves.
    origins: OwnedFd,
    /// The state and counter maps (mapped in `counters`; kept so an upgrade can carry them).
    state: OwnedFd,
    counts: OwnedFd,
    counters: RrCounters,
    max_slots: u32,
    /// Mirror of `ring[1..=n]`: the online slots in rotation order.
    order: Vec<u32>,
    /// slot → its index in `order`, or NONE.
    position: Vec<u32>,
    /// slot → `SO_COOKIE` of the listener in the sockarray (meaningful while a member).
    cookie: Vec<u64>,
    /// Scratch for `set_members` (slot → listed), kept to avoid allocating per call.
    listed: Vec<bool>,
    verifier_stats: String,
}

impl RrGroup {
    /// Creates the maps and loads the rotation program for slot ids `0..max_slots` (pass the
    /// largest worker id + 1 to key by worker id directly). Nothing is attached yet.
    pub fn new(max_slots: u32) -> Result<RrGroup, BpfError> {
        if max_slots == 0 || max_slots > MAX_SLOTS {
            return Err(BpfError::BadMaxSlots(max_slots));
        }
        let socks = sys::map_create(
            sys::BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
            4,
            8,
            max_slots,
            0,
            "rh_rr_socks",
        )
        .map_err(|e| BpfError::classify("create the BPF sockarray map", e))?;
        let ring = sys::map_create(
            sys::BPF_MAP_TYPE_ARRAY,
            4,
            4,
            max_slots + 1,
            0,
            "rh_rr_ring",
        )
        .map_err(|e| BpfError::classify("create the BPF ring map", e))?;
        let state_map = sys::map_create(
            sys::BPF_MAP_TYPE_ARRAY,
            4,
            STATE_VALUE_SIZE,
            1,
            sys::BPF_F_MMAPABLE,
            "rh_rr_state",
        )
        .map_err(|e| BpfError::classify("create the BPF state map", e))?;
        let counts_map = sys::map_create(
            sys::BPF_MAP_TYPE_ARRAY,
            4,
            COUNT_VALUE_SIZE,
            max_slots,
            sys::BPF_F_MMAPABLE,
            "rh_rr_counts",
        )
        .map_err(|e| BpfError::classify("create the BPF counter map", e))?;
        let origins = sys::map_create(
            sys::BPF_MAP_TYPE_LRU_HASH,
            8,
            4,
            (4 * max_slots).max(64),
            0,
            "rh_rr_origins",
        )
        .map_err(|e| BpfError::classify("create the BPF origins map", e))?;
        let insns = program::rr_program(&RrMaps {
            socks: socks.as_fd(),
            ring: ring.as_fd(),
            state: state_map.as_fd(),
            counts: counts_map.as_fd(),
            origins: origins.as_fd(),
        });
        let (prog, verifier_stats) = load(&insns, "rh_reuseport_rr")?;
        RrGroup::assemble(
            [prog, socks, ring, origins, state_map, counts_map],
            max_slots,
            verifier_stats,
        )
    }

    /// A group of loaded program and maps, `[prog, socks, ring, origins, state, counts]`, with
    /// an empty rotation mirror: maps the counters (the mappings keep their own references).
    fn assemble(
        fds: [OwnedFd; 6],
        max_slots: u32,
        verifier_stats: String,
    ) -> Result<RrGroup, BpfError> {
        let [prog, socks, ring, origins, state_map, counts_map] = fds;
        let state = MapView::new(state_map.as_fd(), STATE_VALUE_SIZE as usize).map_err(|err| {
            BpfError::Sys {
                op: "map the BPF state map",
                err,
            }
        })?;
        let counts = MapView::new(
            counts_map.as_fd(),
            COUNT_VALUE_SIZE as usize * max_slots as usize,
        )
        .map_err(|err| BpfError::Sys {
            op: "map the BPF counter map",
            err,
        })?;
        let n = max_slots as usize;
        Ok(RrGroup {
            prog,
            socks,
            ring,
            origins,
            state: state_map,
            counts: counts_map,
            counters: RrCounters {
                state: Arc::new(state),
                counts: Arc::new(counts),
                max_slots,
            },
            max_slots,
            order: Vec::with_capacity(n),
            position: vec![NONE; n],
            cookie: vec![0; n],
            listed: vec![false; n],
            verifier_stats,
        })
    }

    /// What crosses an `execve` (an in-place upgrade of the program that owns the group): the
    /// fds of the program and its maps, and the mirror of the rotation. The program stays
    /// attached and keeps steering meanwhile; [`RrGroup::adopt`] takes it over on the other side.
    pub fn carry(&self) -> RrCarry {
        RrCarry {
            fds: [
                self.prog.as_raw_fd(),
                self.socks.as_raw_fd(),
                self.ring.as_raw_fd(),
                self.origins.as_raw_fd(),
                self.state.as_raw_fd(),
                self.counts.as_raw_fd(),
            ],
            max_slots: self.max_slots,
            members: self
                .order
                .iter()
                .map(|&slot| (slot, self.cookie[slot as usize]))
                .collect(),
        }
    }

    /// The group [`RrGroup::carry`] described, from its fds (in the same order) and rotation.
    /// The counters are mapped again; the program, still attached, is not touched.
    pub fn adopt(
        fds: [OwnedFd; 6],
        max_slots: u32,
        members: &[(u32, u64)],
    ) -> Result<RrGroup, BpfError> {
        if max_slots == 0 || max_slots > MAX_SLOTS {
            return Err(BpfError::BadMaxSlots(max_slots));
        }
        let mut g = RrGroup::assemble(fds, max_slots, String::new())?;
        for &(slot, cookie) in members {
            g.check_slot(slot)?;
            g.position[slot as usize] = g.order.len() as u32;
            g.cookie[slot as usize] = cookie;
            g.order.push(slot);
        }
        Ok(g)
    }

    /// Makes the program the selector of the reuseport group `listener` belongs to. `listener`
    /// must be a *listening* `SO_REUSEPORT` socket of that group: one only bound would get a
    /// group of its own, and its `listen` would then fail with `EADDRINUSE`.
    pub fn attach(&self, listener: BorrowedFd<'_>) -> Result<(), BpfError> {
        sys::attach_reuseport_prog(listener, self.prog.as_fd()).map_err(|err| BpfError::Sys {
            op: "attach the reuseport-rr program (SO_ATTACH_REUSEPORT_EBPF)",
            err,
        })
    }

    /// Takes the program off `listener`'s group: the kernel goes back to hashing (and to
    /// resetting the queue of a closed listener).
    pub fn detach(&self, listener: BorrowedFd<'_>) -> Result<(), BpfError> {
        sys::detach_reuseport_prog(listener).map_err(|err| BpfError::Sys {
            op: "detach the reuseport-rr program (SO_DETACH_REUSEPORT_BPF)",
            err,
        })
    }

    /// Puts `slot` in the rotation with `listener` (a listening `SO_REUSEPORT` socket of this
    /// group), at the end of the rotation; or, if the slot is already in it with another socket,
    /// swaps the socket in place. A no-op if the slot is already in with this very socket.
    ///
    /// Order of the writes: the sockarray entry first, then `ring[1 + n] = slot`, then
    /// `ring[0] = n + 1`: a connection sees either the old rotation or the new one, complete.
    pub fn insert(&mut self, slot: u32, listener: BorrowedFd<'_>) -> Result<(), BpfError> {
        self.check_slot(slot)?;
        let s = slot as usize;
        let cookie = sys::socket_cookie(listener).map_err(|err| BpfError::Member { slot, err })?;
        let present = self.position[s] != NONE;
        if present && self.cookie[s] == cookie {
            return Ok(());
        }
        let fd = listener.as_raw_fd() as u64;
        // The origin first: this listener may close (and migrate) as soon as it is a member.
        sys::map_update(self.origins.as_fd(), &cookie, &slot).map_err(|err| BpfError::Sys {
            op: "update the BPF origins map",
            err,
        })?;
        sys::map_update(self.socks.as_fd(), &slot, &fd)
            .map_err(|err| BpfError::Member { slot, err })?;
        self.cookie[s] = cookie;
        if !present {
            let n = self.order.len() as u32;
            self.write_ring(1 + n, slot)?;
            self.write_ring(0, n + 1)?;
            self.position[s] = n;
            self.order.push(slot);
        }
        Ok(())
    }

    /// Takes `slot` out of the rotation (a no-op if it is not in it).
    ///
    /// Order of the writes, for a slot at position `p` of `n`: first the last member is copied
    /// over position `p` (`ring[1 + p] = last`; for a moment `last` is in the rotation twice
    /// and `slot` not at all), then `ring[0] = n - 1`, then the sockarray entry is deleted. A
    /// connection racing with these writes is steered to a member of the old or the new
    /// rotation, never to an empty position; at worst `last` gets one connection early.
    pub fn remove(&mut self, slot: u32) -> Result<(), BpfError> {
        self.check_slot(slot)?;
        let s = slot as usize;
        let p = self.position[s];
        if p == NONE {
            return Ok(());
        }
        let n = self.order.len() as u32;
        let last = self.order[n as usize - 1];
        if p != n - 1 {
            self.write_ring(1 + p, last)?;
        }
        self.write_ring(0, n - 1)?;
        self.order.swap_remove(p as usize);
        if last != slot {
            self.position[last as usize] = p;
        }
        self.position[s] = NONE;
        self.cookie[s] = 0;
        match sys::map_delete_u32_key(self.socks.as_fd(), slot) {
            // ENOENT: the listener was closed already, and the kernel took it out itself.
            Err(err) if err.raw_os_error() != Some(libc::ENOENT) => Err(BpfError::Sys {
                op: "take a listener out of the BPF sockarray",
                err,
            }),
            _ => Ok(()),
        }
    }

    /// Makes the rotation exactly `members` (slot, listener): inserts the new ones (and swaps
    /// the socket of a slot whose listener changed), then removes the slots not listed, so the
    /// rotation never shrinks to nothing on the way. A slot listed twice takes its last socket.
    pub fn set_members(&mut self, members: &[(u32, BorrowedFd<'_>)]) -> Result<(), BpfError> {
        for &(slot, _) in members {
            self.check_slot(slot)?;
        }
        for &(slot, listener) in members {
            self.insert(slot, listener)?;
        }
        for &(slot, _) in members {
            self.listed[slot as usize] = true;
        }
        let mut result = Ok(());
        let mut i = 0;
        while i < self.order.len() {
            let slot = self.order[i];
            if self.listed[slot as usize] {
                i += 1;
            } else if let Err(e) = self.remove(slot) {
                result = Err(e);
                break;
            }
            // After a removal, position i holds the former last member: look at it again.
        }
        for &(slot, _) in members {
            self.listed[slot as usize] = false;
        }
        result
    }

    /// The online slots in rotation order.
    pub fn members(&self) -> &[u32] {
        &self.order
    }

    /// Slot ids are `0..max_slots()`.
    pub fn max_slots(&self) -> u32 {
        self.max_slots
    }

    /// What the program counted for `slot`; see [`RrCounters::count`].
    pub fn count(&self, slot: u32) -> SlotCount {
        self.counters.count(slot)
    }

    /// [`RrGroup::count`] of every slot, indexed by slot id.
    pub fn counts(&self) -> Vec<SlotCount> {
        self.counters.counts()
    }

    /// Selections the program left to the kernel's hash.
    pub fn fallbacks(&self) -> Fallbacks {
        self.counters.fallbacks()
    }

    /// Tickets taken from the rotation counter: every selection with at least one member online.
    pub fn tickets(&self) -> u64 {
        self.counters.tickets()
    }

    /// A cheap, cloneable, `Send + Sync` handle on the program's counters, for a reader that
    /// does not own the group (the admin endpoint's snapshot, say). It stays valid after the
    /// group is dropped (it holds the mappings, which hold the maps).
    pub fn counters(&self) -> RrCounters {
        self.counters.clone()
    }

    /// The verifier's statistics line(s) for the loaded program ("processed N insns ...").
    pub fn verifier_stats(&self) -> &str {
        &self.verifier_stats
    }

    fn check_slot(&self, slot: u32) -> Result<(), BpfError> {
        if slot >= self.max_slots {
            return Err(BpfError::SlotOutOfRange {
                slot,
                max_slots: self.max_slots,
            });
        }
        Ok(())
    }

    fn write_ring(&self, index: u32, value: u32) -> Result<(), BpfError> {
        sys::map_update(self.ring.as_fd(), &index, &value).map_err(|err| BpfError::Sys {
            op: "update the BPF ring map",
            err,
        })
    }
}

/// An [`RrGroup`] as it crosses an `execve`: see [`RrGroup::carry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RrCarry {
    /// prog, socks, ring, origins, state, counts.
    pub fds: [std::os::fd::RawFd; 6],
    pub max_slots: u32,
    /// The rotation: (slot, its listener's socket cookie), in order.
    pub members: Vec<(u32, u64)>,
}

/// Read access to an [`RrGroup`]'s counters: atomic loads from the maps' shared mappings, no
/// syscall, no allocation (except [`RrCounters::counts`]'s vector).
#[derive(Clone)]
pub struct RrCounters {
    state: Arc<MapView>,
    counts: Arc<MapView>,
    max_slots: u32,
}

impl RrCounters {
    /// What the program counted for `slot` (zero for a slot out of range). The counters are
    /// never reset: a slot's figures survive its restarts; subtract a baseline for
    /// `POST /stats/reset`.
    pub fn count(&self, slot: u32) -> SlotCount {
        if slot >= self.max_slots {
            return SlotCount::default();
        }
        let base = slot as usize * COUNT_VALUE_SIZE as usize;
        SlotCount {
            steered: self.counts.load_u64(base + COUNT_STEERED),
            migrated_in: self.counts.load_u64(base + COUNT_MIGRATED_IN),
            migrated_out: self.counts.load_u64(base + COUNT_MIGRATED_OUT),
        }
    }

    /// [`RrCounters::count`] of every slot, indexed by slot id.
    pub fn counts(&self) -> Vec<SlotCount> {
        (0..self.max_slots).map(|slot| self.count(slot)).collect()
    }

    /// Selections the program left to the kernel's hash.
    pub fn fallbacks(&self) -> Fallbacks {
        Fallbacks {
            new: self.state.load_u64(STATE_FALLBACK_NEW),
            migrated: self.state.load_u64(STATE_FALLBACK_MIGRATED),
        }
    }

    /// Tickets taken from the rotation counter.
    pub fn tickets(&self) -> u64 {
        self.state.load_u64(STATE_COUNTER)
    }
}

/// For plain `--policy reuseport`: a program that selects nothing (the kernel keeps hashing) but
/// makes the group migrate the queue of a closing listener instead of resetting it.
pub struct MigrateOnly {
    prog: OwnedFd,
    verifier_stats: String,
}

impl MigrateOnly {
    /// Loads the two-instruction program. Needs `CAP_BPF` like [`RrGroup::new`]; a caller
    /// without it can go on without migration (that is plain `reuseport` as it was).
    pub fn new() -> Result<MigrateOnly, BpfError> {
        let (prog, verifier_stats) = load(&program::migrate_only_program(), "rh_reuseport_mg")?;
        Ok(MigrateOnly {
            prog,
            verifier_stats,
        })
    }

    /// Attaches it to `listener`'s reuseport group (see [`RrGroup::attach`]).
    pub fn attach(&self, listener: BorrowedFd<'_>) -> Result<(), BpfError> {
        sys::attach_reuseport_prog(listener, self.prog.as_fd()).map_err(|err| BpfError::Sys {
            op: "attach the reuseport migration program (SO_ATTACH_REUSEPORT_EBPF)",
            err,
        })
    }

    /// The verifier's statistics for the loaded program.
    pub fn verifier_stats(&self) -> &str {
        &self.verifier_stats
    }
}

/// Loads an `SK_REUSEPORT` program with expected attach type `SELECT_OR_MIGRATE`. The first
/// attempt asks only for the verifier's statistics; if the kernel refuses, a second attempt with
/// the full log tells a verifier refusal (log present) from a kernel that does not know the
/// program or attach type (no log).
fn load(insns: &[insn::Insn], name: &str) -> Result<(OwnedFd, String), BpfError> {
    const OP: &str = "load the SK_REUSEPORT program";
    let mut stats = vec![0u8; 4096];
    let first = sys::prog_load(
        sys::BPF_PROG_TYPE_SK_REUSEPORT,
        sys::BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
        insns,
        LICENSE,
        name,
        Some((sys::BPF_LOG_STATS, &mut stats)),
    );
    let err = match first {
        Ok(fd) => return Ok((fd, log_text(&stats))),
        Err(err) => err,
    };
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::ENOSYS) => return Err(BpfError::classify(OP, err)),
        _ => {}
    }
    let mut log = vec![0u8; 1 << 20];
    let second = sys::prog_load(
        sys::BPF_PROG_TYPE_SK_REUSEPORT,
        sys::BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
        insns,
        LICENSE,
        name,
        Some((sys::BPF_LOG_LEVEL1 | sys::BPF_LOG_STATS, &mut log)),
    );
    match second {
        // Refused once, accepted with a bigger log buffer: the first refusal was ENOSPC.
        Ok(fd) => Ok((fd, log_text(&log))),
        Err(err2) => {
            let log = log_text(&log);
            if log.trim().is_empty() {
                Err(BpfError::classify(OP, err))
            } else {
                Err(BpfError::Verifier { log, err: err2 })
            }
        }
    }
}

/// The NUL-terminated text the kernel wrote into a log buffer.
fn log_text(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capability_is_one_line_naming_cap_bpf() {
        let e = BpfError::classify(
            "create the BPF sockarray map",
            io::Error::from_raw_os_error(1),
        );
        let msg = e.to_string();
        assert!(matches!(e, BpfError::MissingCapability { .. }));
        assert!(
            msg.contains("CAP_BPF") && msg.contains("--policy rr"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn kernel_refusals_are_unsupported() {
        for errno in [libc::ENOSYS, libc::EINVAL, libc::EOPNOTSUPP, ENOTSUPP] {
            let e = BpfError::classify("x", io::Error::from_raw_os_error(errno));
            assert!(matches!(e, BpfError::Unsupported { .. }), "{errno}: {e}");
        }
    }

    /// A program the verifier must refuse (r0 is returned without ever being written): the
    /// error carries the verifier's own words. Needs CAP_BPF, as every kernel test here.
    #[test]
    fn a_refused_program_gives_the_verifier_log() {
        let mut a = insn::Asm::new();
        a.exit();
        match load(&a.finish(), "rh_bad") {
            Err(BpfError::Verifier { log, .. }) => {
                assert!(log.contains("R0 !read_ok"), "{log}");
                let e = load(&[], "rh_bad").unwrap_err();
                assert!(!matches!(e, BpfError::Verifier { .. }), "{e}");
            }
            Err(e @ BpfError::Unsupported { .. }) => {
                eprintln!("SKIPPED: the kernel refuses BPF: {e}")
            }
            Err(e) => panic!("expected a verifier refusal, got: {e}"),
            Ok(_) => panic!("the verifier accepted a program returning an unset r0"),
        }
    }

    #[test]
    fn log_text_stops_at_the_nul() {
        assert_eq!(
            log_text(b"processed 5 insns\n\0garbage"),
            "processed 5 insns"
        );
    }
}
