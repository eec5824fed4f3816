//! The kernel-rotation room (`--policy reuseport-rr`): an eBPF `SK_REUSEPORT` program per listen
//! address picks, for every new connection, the next online slot's listener in strict rotation.
//!
//! The program, its maps and every `bpf(2)` call live in the `roundhouse-bpf` crate; this room
//! only keeps the rotation in step with the workers: [`KernelRotation::sync`] is called whenever
//! the set of online workers changes (and, for a worker about to drain, *before* it is told to),
//! so no connection is steered to a worker that is starting, draining or dead. A slot whose
//! worker is gone keeps its listener (its queued connections wait for the restarted worker);
//! a slot scaled away closes it, and the kernel migrates what was queued on it to the others.
//! The program counts what it steers per slot, so `connections_total` is the kernel's own
//! figure under this policy.

#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd};

use roundhouse_bpf::{BpfError, RrGroup};

use crate::config::MAX_WORKERS;

pub(crate) struct KernelRotation {
    /// One group per listen address, in `-l` order.
    groups: Vec<RrGroup>,
    /// Per slot id: the count at the last `/stats/reset`.
    baseline: Vec<u64>,
}

impl KernelRotation {
    /// Loads the program for every address and attaches it to the group through `first`, one
    /// listening socket per address (slot 1's).
    pub(crate) fn new(first: &[TcpListener]) -> Result<KernelRotation, BpfError> {
        let mut groups = Vec::with_capacity(first.len());
        for l in first {
            let g = RrGroup::new(MAX_WORKERS + 1)?;
            g.attach(l.as_fd())?;
            groups.push(g);
        }
        Ok(KernelRotation {
            groups,
            baseline: vec![0; MAX_WORKERS as usize + 1],
        })
    }

    /// What an upgrade carries: each group (fds and rotation) and the reset baselines.
    pub(crate) fn carry(&self) -> (Vec<roundhouse_bpf::RrCarry>, Vec<u64>) {
        (
            self.groups.iter().map(RrGroup::carry).collect(),
            self.baseline.clone(),
        )
    }

    /// In the new image of an upgrade: the groups the old one left, still attached and
    /// steering, taken over with their maps (counts and rotation go on).
    pub(crate) fn adopt(
        groups: Vec<(roundhouse_bpf::RrCarry, [std::os::fd::OwnedFd; 6])>,
        baseline: Vec<u64>,
    ) -> Result<KernelRotation, BpfError> {
        let groups = groups
            .into_iter()
            .map(|(c, fds)| RrGroup::adopt(fds, c.max_slots, &c.members))
            .collect::<Result<_, _>>()?;
        let mut base = vec![0; MAX_WORKERS as usize + 1];
        for (b, v) in base.iter_mut().zip(baseline) {
            *b = v;
        }
        Ok(KernelRotation {
            groups,
            baseline: base,
        })
    }

    /// Makes the rotation exactly `online`: (slot id, that slot's listeners in `-l` order).
    pub(crate) fn sync<'a>(
        &mut self,
        online: impl Iterator<Item = (u32, &'a [TcpListener])> + Clone,
    ) -> Result<(), BpfError> {
        for (i, g) in self.groups.iter_mut().enumerate() {
            let members: Vec<(u32, BorrowedFd<'_>)> = online
                .clone()
                .filter_map(|(id, ls)| ls.get(i).map(|l| (id, l.as_fd())))
                .collect();
            g.set_members(&members)?;
        }
        Ok(())
    }

    /// Connections the kernel gave slot `id`'s listeners since the last reset.
    pub(crate) fn connections(&self, id: u32) -> u64 {
        self.total(id)
            .saturating_sub(self.baseline.get(id as usize).copied().unwrap_or(0))
    }

    fn total(&self, id: u32) -> u64 {
        self.groups.iter().map(|g| g.count(id).received()).sum()
    }

    /// `/stats/reset`: counts start again from zero.
    pub(crate) fn reset(&mut self) {
        for id in 0..self.baseline.len() {
            self.baseline[id] = self.total(id as u32);
        }
    }
}

/// Plain `reuseport`: a 2-instruction program that leaves the choice to the kernel's hash but
/// lets it *migrate* the connections queued on a listener that closes (a slot scaled away)
/// instead of resetting them. Attached once per address, through `first` (slot 1's listeners);
/// the program stays with the group after its handle is dropped.
pub(crate) fn attach_migration(first: &[TcpListener]) -> Result<(), BpfError> {
    for l in first {
        roundhouse_bpf::MigrateOnly::new()?.attach(l.as_fd())?;
    }
    Ok(())
}
