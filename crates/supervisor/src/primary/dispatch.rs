//! The dispatch room: which worker gets the next connection.
//!
//! It owns the connections the primary holds for no worker yet (`held`, bounded), the rotation
//! (the online workers in slot order) with its cursor, and under `least-conn` an indexed min-heap
//! of the rotation's workers. It does no I/O and reads no clock: the owner asks it for a worker
//! with [`Dispatch::pick`], telling it through a predicate which workers can take a connection
//! right now (window not full, channel writable, not cooling down), and tells it when a worker's
//! load changes ([`Dispatch::set_load`]). So every rule here is unit-tested without a process.
//!
//! Workers are named by their key in the owner's worker table (`usize`), the same key the owner
//! uses everywhere.

#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// Where a worker sits in the least-conn heap when it is not in it.
const OUT: usize = usize::MAX;

pub(crate) struct Dispatch<C> {
    held: VecDeque<C>,
    max_held: usize,
    /// Online workers in slot order.
    rotation: Vec<usize>,
    cursor: usize,
    /// `Some` under `least-conn`.
    lc: Option<LeastConn>,
}

impl<C> Dispatch<C> {
    pub(crate) fn new(least_conn: bool, max_held: usize) -> Self {
        Dispatch {
            held: VecDeque::with_capacity(max_held),
            max_held,
            rotation: Vec::new(),
            cursor: 0,
            lc: least_conn.then(LeastConn::default),
        }
    }

    // ----- the held queue ------------------------------------------------------------------

    /// Room for another accepted connection.
    pub(crate) fn can_hold(&self) -> bool {
        self.held.len() < self.max_held
    }
    pub(crate) fn held_len(&self) -> usize {
        self.held.len()
    }
    /// A newly accepted connection, served after those already held.
    pub(crate) fn hold(&mut self, c: C) {
        self.held.push_back(c);
    }
    /// Connections given back (by a worker that refused them, died or could not be sent to),
    /// oldest first: they go to the front, ahead of newer ones, keeping their order.
    pub(crate) fn give_back(&mut self, returned: impl DoubleEndedIterator<Item = C>) {
        for c in returned.rev() {
            self.held.push_front(c);
        }
    }
    /// The next connection to hand off.
    pub(crate) fn next_held(&mut self) -> Option<C> {
        self.held.pop_front()
    }

    // ----- the rotation --------------------------------------------------------------------

    /// Replaces the rotation with `workers` (online, in slot order), each with its load.
    pub(crate) fn set_rotation(&mut self, workers: impl Iterator<Item = (usize, u64)>) {
        self.rotation.clear();
        if let Some(lc) = &mut self.lc {
            lc.clear();
        }
        for (k, load) in workers {
            self.rotation.push(k);
            if let Some(lc) = &mut self.lc {
                lc.push(k, load);
            }
        }
        if let Some(lc) = &mut self.lc {
            lc.heapify();
        }
        if self.cursor >= self.rotation.len() {
            self.cursor = 0;
        }
    }

    pub(crate) fn rotation(&self) -> &[usize] {
        &self.rotation
    }

    /// Chooses the worker for the next connection among those `eligible` says can take one now,
    /// or `None`. Under `rr` the next in rotation after the last pick; under `least-conn` the
    /// least loaded, and among equals the one picked longest ago.
    pub(crate) fn pick(&mut self, mut eligible: impl FnMut(usize) -> bool) -> Option<usize> {
        if let Some(lc) = &mut self.lc {
            let k = lc.best(&mut eligible)?;
            lc.mark_picked(k);
            return Some(k);
        }
        let n = self.rotation.len();
        for j in 0..n {
            let idx = (self.cursor + j) % n;
            let k = self.rotation[idx];
            if eligible(k) {
                self.cursor = (idx + 1) % n;
                return Some(k);
            }
        }
        None
    }

    /// Worker `k`'s load (open + unacknowledged connections) changed. Only `least-conn` cares.
    pub(crate) fn set_load(&mut self, k: usize, load: u64) {
        if let Some(lc) = &mut self.lc {
            lc.set_load(k, load);
        }
    }
}

/// An indexed min-heap keyed by (load, stamp of last pick): picking and every load change cost
/// O(log workers) and allocate nothing once grown; a worker that is not eligible right now is
/// stepped over by a best-first walk from the root, which visits only workers at least as good.
#[derive(Default)]
struct LeastConn {
    heap: Vec<usize>,
    /// By worker key: position in `heap` (or `OUT`) and key.
    pos: Vec<usize>,
    key: Vec<(u64, u64)>,
    seq: u64,
    search: BinaryHeap<Reverse<((u64, u64), usize)>>,
}

impl LeastConn {
    fn clear(&mut self) {
        for &k in &self.heap {
            self.pos[k] = OUT;
        }
        self.heap.clear();
    }

    fn push(&mut self, k: usize, load: u64) {
        if k >= self.pos.len() {
            self.pos.resize(k + 1, OUT);
            self.key.resize(k + 1, (0, 0));
        }
        self.key[k].0 = load;
        self.pos[k] = self.heap.len();
        self.heap.push(k);
    }

    fn heapify(&mut self) {
        for i in (0..self.heap.len() / 2).rev() {
            self.sift_down(i);
        }
    }

    fn key_at(&self, i: usize) -> (u64, u64) {
        self.key[self.heap[i]]
    }

    fn swap(&mut self, i: usize, j: usize) {
        self.heap.swap(i, j);
        self.pos[self.heap[i]] = i;
        self.pos[self.heap[j]] = j;
    }

    fn sift_up(&mut self, mut i: usize) -> usize {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.key_at(i) >= self.key_at(parent) {
                break;
            }
            self.swap(i, parent);
            i = parent;
        }
        i
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap.len();
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if l < n && self.key_at(l) < self.key_at(least) {
                least = l;
            }
            if r < n && self.key_at(r) < self.key_at(least) {
                least = r;
            }
            if least == i {
                return;
            }
            self.swap(i, least);
            i = least;
        }
    }

    fn rekey(&mut self, k: usize, key: (u64, u64)) {
        let Some(&pos) = self.pos.get(k) else { return };
        if pos == OUT {
            return;
        }
        self.key[k] = key;
        let pos = self.sift_up(pos);
        self.sift_down(pos);
    }

    fn set_load(&mut self, k: usize, load: u64) {
        if let Some(&(_, seq)) = self.key.get(k) {
            self.rekey(k, (load, seq));
        }
    }

    fn mark_picked(&mut self, k: usize) {
        self.seq += 1;
        let load = self.key[k].0;
        self.rekey(k, (load, self.seq));
    }

    fn best(&mut self, eligible: &mut impl FnMut(usize) -> bool) -> Option<usize> {
        let mut search = std::mem::take(&mut self.search);
        search.clear();
        if !self.heap.is_empty() {
            search.push(Reverse((self.key_at(0), 0)));
        }
        let mut found = None;
        while let Some(Reverse((_, i))) = search.pop() {
            let k = self.heap[i];
            if eligible(k) {
                found = Some(k);
                break;
            }
            for c in [2 * i + 1, 2 * i + 2] {
                if c < self.heap.len() {
                    search.push(Reverse((self.key_at(c), c)));
                }
            }
        }
        self.search = search;
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rr(keys: &[usize]) -> Dispatch<u32> {
        let mut d = Dispatch::new(false, 4);
        d.set_rotation(keys.iter().map(|&k| (k, 0)));
        d
    }

    #[test]
    fn round_robin_is_strict_and_steps_over_ineligible_workers() {
        let mut d = rr(&[3, 5, 7]);
        let picks: Vec<_> = (0..6).map(|_| d.pick(|_| true).unwrap()).collect();
        assert_eq!(picks, [3, 5, 7, 3, 5, 7]);
        // 5 is full: skipped, and the rotation continues after the one picked.
        let picks: Vec<_> = (0..4).map(|_| d.pick(|k| k != 5).unwrap()).collect();
        assert_eq!(picks, [3, 7, 3, 7]);
        assert_eq!(d.pick(|_| false), None);
        assert_eq!(rr(&[]).pick(|_| true), None);
    }

    #[test]
    fn a_smaller_rotation_keeps_a_valid_cursor() {
        let mut d = rr(&[1, 2, 3]);
        d.pick(|_| true);
        d.pick(|_| true);
        d.pick(|_| true);
        d.set_rotation([(1, 0)].into_iter());
        assert_eq!(d.pick(|_| true), Some(1));
        assert_eq!(d.rotation(), &[1]);
    }

    #[test]
    fn held_connections_are_bounded_and_given_back_in_order() {
        let mut d: Dispatch<u32> = Dispatch::new(false, 3);
        d.hold(10);
        d.hold(11);
        assert!(d.can_hold());
        // 1 and 2 came back from a worker that died: they go first, oldest first.
        d.give_back([1, 2].into_iter());
        assert!(!d.can_hold());
        assert_eq!(d.held_len(), 4);
        let order: Vec<_> = std::iter::from_fn(|| d.next_held()).collect();
        assert_eq!(order, [1, 2, 10, 11]);
    }

    #[test]
    fn least_conn_picks_the_least_loaded_and_rotates_among_equals() {
        let mut d: Dispatch<u32> = Dispatch::new(true, 4);
        d.set_rotation([(0, 5), (1, 2), (2, 2), (3, 9)].into_iter());
        // 1 and 2 tie: 1 (never picked; lower stamp wins by position), then 2.
        let a = d.pick(|_| true).unwrap();
        d.set_load(a, 3);
        let b = d.pick(|_| true).unwrap();
        d.set_load(b, 3);
        let mut ab = [a, b];
        ab.sort();
        assert_eq!(ab, [1, 2]);
        // Both at 3 now: the one picked longer ago goes first.
        assert_eq!(d.pick(|_| true), Some(a));
        d.set_load(a, 4);
        assert_eq!(d.pick(|_| true), Some(b));
        d.set_load(b, 4);
        // Load drops on worker 3 below everyone.
        d.set_load(3, 0);
        assert_eq!(d.pick(|_| true), Some(3));
        // Ineligible best workers are stepped over.
        assert_eq!(d.pick(|k| k == 0), Some(0));
        assert_eq!(d.pick(|_| false), None);
    }

    #[test]
    fn least_conn_heap_stays_consistent_through_many_updates() {
        let mut d: Dispatch<u32> = Dispatch::new(true, 4);
        let n = 64;
        d.set_rotation((0..n).map(|k| (k, (k * 7 % 13) as u64)));
        let mut loads: Vec<u64> = (0..n).map(|k| (k * 7 % 13) as u64).collect();
        let mut x = 12345u64;
        for _ in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = (x >> 33) as usize % n;
            loads[k] = (x >> 20) % 50;
            d.set_load(k, loads[k]);
            let picked = d.pick(|_| true).unwrap();
            let min = *loads.iter().min().unwrap();
            assert_eq!(
                loads[picked], min,
                "picked {picked} with load {}",
                loads[picked]
            );
        }
        // Removing workers from the rotation removes them from the heap.
        d.set_rotation([(5, 1), (9, 0)].into_iter());
        assert_eq!(d.pick(|_| true), Some(9));
        d.set_load(40, 0); // not in the rotation: ignored
        d.set_load(9, 7);
        assert_eq!(d.pick(|_| true), Some(5));
    }
}
