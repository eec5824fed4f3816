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
    /// By slot id - 1: the online worker serving it (for `sticky`).
    by_slot: Vec<Option<usize>>,
}

impl<C> Dispatch<C> {
    pub(crate) fn new(least_conn: bool, max_held: usize) -> Self {
        Dispatch {
            held: VecDeque::with_capacity(max_held),
            max_held,
            rotation: Vec::new(),
            cursor: 0,
            lc: least_conn.then(LeastConn::default),
            by_slot: Vec::new(),
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
    /// The `i`-th held connection (0 = the next to go).
    pub(crate) fn held_at(&self, i: usize) -> Option<&C> {
        self.held.get(i)
    }
    /// Takes the `i`-th held connection out of the queue.
    pub(crate) fn take_held(&mut self, i: usize) -> Option<C> {
        self.held.remove(i)
    }
    /// Every held connection, the next to go first (an upgrade carries them).
    pub(crate) fn held(&self) -> impl Iterator<Item = &C> {
        self.held.iter()
    }

    /// Where the rotation is (`rr`: the index of the next worker), so an upgrade goes on from
    /// there.
    pub(crate) fn cursor(&self) -> usize {
        self.cursor
    }
    pub(crate) fn set_cursor(&mut self, cursor: usize) {
        self.cursor = cursor;
    }

    // ----- the rotation --------------------------------------------------------------------

    /// Replaces the rotation with `workers` (online, in slot order): (key, load, slot id).
    pub(crate) fn set_rotation(&mut self, workers: impl Iterator<Item = (usize, u64, u32)>) {
        self.rotation.clear();
        self.by_slot.iter_mut().for_each(|s| *s = None);
        if let Some(lc) = &mut self.lc {
            lc.clear();
        }
        for (k, load, slot) in workers {
            let i = (slot as usize).saturating_sub(1);
            if i >= self.by_slot.len() {
                self.by_slot.resize(i + 1, None);
            }
            self.by_slot[i] = Some(k);
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

    /// `sticky`: the worker for affinity key `key` over slots `1..=slots`: the slot chosen by
    /// jump consistent hashing. While that slot has no online worker, the key's next choices
    /// (the same hash, re-seeded) — so a slot that comes back gets its keys back, and scaling
    /// from N to N+1 slots moves about 1/(N+1) of the keys. A slot whose worker is online but
    /// cannot take a connection right now means [`Sticky::Wait`] when `may_wait`, else the next
    /// choice. O(log N) per choice, no allocation; after the choices run out, any eligible
    /// worker in rotation.
    pub(crate) fn pick_sticky(
        &mut self,
        key: u64,
        slots: u32,
        mut eligible: impl FnMut(usize) -> bool,
        may_wait: bool,
    ) -> Sticky {
        let mut k = key;
        for _ in 0..slots.min(64) {
            let slot = jump_hash(k, slots) as usize;
            // `by_slot` holds only online workers.
            if let Some(Some(w)) = self.by_slot.get(slot) {
                if eligible(*w) {
                    return Sticky::To(*w);
                }
                if may_wait {
                    return Sticky::Wait;
                }
            }
            k = mix(k ^ 0x9e37_79b9_7f4a_7c15);
        }
        match self.pick(eligible) {
            Some(w) => Sticky::To(w),
            None => Sticky::Nobody,
        }
    }

    /// Worker `k`'s load (open + unacknowledged connections) changed. Only `least-conn` cares.
    pub(crate) fn set_load(&mut self, k: usize, load: u64) {
        if let Some(lc) = &mut self.lc {
            lc.set_load(k, load);
        }
    }
}

/// Where a sticky connection goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sticky {
    To(usize),
    /// Its worker is online but busy: leave it held for now.
    Wait,
    /// No worker can take a connection.
    Nobody,
}

/// Jump consistent hash (Lamping and Veach, 2014): a bucket in `0..buckets` for `key`, such that
/// growing from n to n+1 buckets moves only the keys that land in the new one.
pub(crate) fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as u32
}

/// A 64-bit mixer (splitmix64's finalizer): spreads close inputs (addresses) over all bits.
pub(crate) fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The affinity key of a client address (its IP, without the port).
pub(crate) fn ip_key(ip: std::net::IpAddr) -> u64 {
    match ip {
        std::net::IpAddr::V4(a) => mix(u64::from(u32::from(a))),
        std::net::IpAddr::V6(a) => {
            let v = u128::from(a);
            mix((v as u64) ^ mix((v >> 64) as u64))
        }
    }
}

/// How many distinct keys a slot has seen, estimated in 256 bytes (HyperLogLog with 256
/// registers: standard error about 6.5 %; exact-ish below a few hundred by linear counting).
#[derive(Clone)]
pub(crate) struct KeySketch([u8; 256]);

impl Default for KeySketch {
    fn default() -> Self {
        KeySketch([0; 256])
    }
}

impl KeySketch {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
    /// A sketch from [`KeySketch::bytes`] (an upgrade); anything else is an empty sketch.
    pub(crate) fn from_bytes(b: &[u8]) -> KeySketch {
        let mut s = KeySketch::default();
        if b.len() == s.0.len() {
            s.0.copy_from_slice(b);
        }
        s
    }
    pub(crate) fn add(&mut self, key: u64) {
        let h = mix(key ^ 0x5bd1_e995);
        let idx = (h >> 56) as usize;
        let rank = ((h << 8) | 0xff).leading_zeros() as u8 + 1;
        if rank > self.0[idx] {
            self.0[idx] = rank;
        }
    }

    pub(crate) fn estimate(&self) -> u64 {
        let m = 256f64;
        let zeros = self.0.iter().filter(|&&r| r == 0).count();
        let sum: f64 = self.0.iter().map(|&r| 2f64.powi(-(r as i32))).sum();
        let raw = 0.7213 / (1.0 + 1.079 / m) * m * m / sum;
        let est = if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        est.round() as u64
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
        d.set_rotation(keys.iter().enumerate().map(|(i, &k)| (k, 0, i as u32 + 1)));
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
        d.set_rotation([(1, 0, 1)].into_iter());
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
        let order: Vec<_> = std::iter::from_fn(|| d.take_held(0)).collect();
        assert_eq!(order, [1, 2, 10, 11]);
    }

    #[test]
    fn least_conn_picks_the_least_loaded_and_rotates_among_equals() {
        let mut d: Dispatch<u32> = Dispatch::new(true, 4);
        d.set_rotation([(0, 5, 1), (1, 2, 2), (2, 2, 3), (3, 9, 4)].into_iter());
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
        d.set_rotation((0..n).map(|k| (k, (k * 7 % 13) as u64, k as u32 + 1)));
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
        d.set_rotation([(5, 1, 1), (9, 0, 2)].into_iter());
        assert_eq!(d.pick(|_| true), Some(9));
        d.set_load(40, 0); // not in the rotation: ignored
        d.set_load(9, 7);
        assert_eq!(d.pick(|_| true), Some(5));
    }

    #[test]
    fn jump_hash_moves_only_what_the_new_slot_takes() {
        let keys: Vec<u64> = (0..10_000u64).map(mix).collect();
        for n in [1u32, 2, 4, 16, 1024] {
            let mut moved = 0;
            for &k in &keys {
                let a = jump_hash(k, n);
                let b = jump_hash(k, n + 1);
                assert!(a < n && b < n + 1);
                if a != b {
                    assert_eq!(b, n, "a key moved between old slots");
                    moved += 1;
                }
            }
            let expect = keys.len() as f64 / f64::from(n + 1);
            assert!(
                (moved as f64 - expect).abs() < expect * 0.2 + 20.0,
                "{n}->{}: moved {moved}, expected about {expect:.0}",
                n + 1
            );
        }
    }

    fn unwrap_to(s: Sticky) -> usize {
        match s {
            Sticky::To(k) => k,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_busy_home_worker_means_wait_not_move() {
        let mut d: Dispatch<u32> = Dispatch::new(false, 4);
        d.set_rotation((0..4).map(|i| (i * 10, 0, i as u32 + 1)));
        let key = ip_key(std::net::Ipv4Addr::new(10, 1, 2, 3).into());
        let home = unwrap_to(d.pick_sticky(key, 4, |_| true, true));
        // Home busy: wait while allowed; after that, the next choice.
        assert_eq!(d.pick_sticky(key, 4, |k| k != home, true), Sticky::Wait);
        let next = unwrap_to(d.pick_sticky(key, 4, |k| k != home, false));
        assert_ne!(next, home);
        assert_eq!(d.pick_sticky(key, 4, |_| false, false), Sticky::Nobody);
    }

    #[test]
    fn sticky_keys_stay_put_and_go_to_their_next_choice_while_their_slot_is_away() {
        let mut d: Dispatch<u32> = Dispatch::new(false, 4);
        d.set_rotation((0..4).map(|i| (i * 10, 0, i as u32 + 1)));
        let keys: Vec<u64> = (0..64u64)
            .map(|i| ip_key(std::net::Ipv4Addr::new(10, 0, 0, i as u8).into()))
            .collect();
        let first: Vec<usize> = keys
            .iter()
            .map(|&k| unwrap_to(d.pick_sticky(k, 4, |_| true, false)))
            .collect();
        // Same key, same worker, every time.
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(d.pick_sticky(k, 4, |_| true, false), Sticky::To(first[i]));
        }
        // Spread over every slot.
        let used: std::collections::BTreeSet<_> = first.iter().collect();
        assert_eq!(used.len(), 4);
        // Slot 2 (worker 10) away: its keys go elsewhere, nobody else's move.
        d.set_rotation([(0, 0, 1), (20, 0, 3), (30, 0, 4)].into_iter());
        for (i, &k) in keys.iter().enumerate() {
            let now = unwrap_to(d.pick_sticky(k, 4, |_| true, false));
            if first[i] == 10 {
                assert_ne!(now, 10);
            } else {
                assert_eq!(now, first[i], "key {i} moved although its slot is online");
            }
        }
        // Back: every key is home again.
        d.set_rotation((0..4).map(|i| (i * 10, 0, i as u32 + 1)));
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(d.pick_sticky(k, 4, |_| true, false), Sticky::To(first[i]));
        }
    }

    #[test]
    fn key_sketch_estimates_distinct_keys() {
        for n in [0u64, 1, 16, 100, 1000, 20_000] {
            let mut s = KeySketch::default();
            for i in 0..n {
                s.add(mix(i));
                s.add(mix(i)); // repeats do not count
            }
            let e = s.estimate() as f64;
            let tolerance = (n as f64 * 0.15).max(2.0);
            assert!(
                (e - n as f64).abs() <= tolerance,
                "{n} keys estimated as {e}"
            );
        }
    }

    #[test]
    fn a_thousand_addresses_spread_evenly_over_four_slots() {
        for (n, bound) in [(16u32, f64::INFINITY), (1000, 1.25)] {
            let mut per = [0u32; 4];
            for i in 0..n {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
                per[jump_hash(ip_key(ip.into()), 4) as usize] += 1;
            }
            let (max, min) = (*per.iter().max().unwrap(), *per.iter().min().unwrap());
            eprintln!(
                "FIGURE sticky {n} addresses over 4 slots: {per:?}, max/min {:.2}",
                f64::from(max) / f64::from(min.max(1))
            );
            assert!(f64::from(max) / f64::from(min.max(1)) <= bound, "{per:?}");
        }
    }
}
