//! The worker table and its slots: the data the lifecycle room works on.
//!
//! A *slot* is a worker id `1..=N` that outlives its processes and keeps their counters; a
//! *worker* is one process in a slot, named by its key in the table. [`Life`] is a worker's
//! state, whose variants carry what only that state has (the exec-status pipe, a deadline, the
//! reason it is leaving). Starting is queued here ([`Pool::request_start`]) and done by the
//! lifecycle room a few at a time.

#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use roundhouse_proto::frame::Stats as WireStats;
use tokio::io::unix::AsyncFd;

use super::link::Link;
use crate::config::Policy;
use crate::stats::WorkerState;

/// Where a worker is in its life. Each variant carries what only that state has.
pub(crate) enum Life {
    /// Forked; `execve` not confirmed yet (the exec-status pipe is watched).
    Spawned {
        exec: AsyncFd<OwnedFd>,
        deadline: Instant,
    },
    /// Running the command, not ready yet.
    Starting { deadline: Instant },
    /// Ready: takes connections.
    Online,
    /// Told to drain; takes no new connections; killed at `deadline`.
    Draining { deadline: Instant },
    /// Leaving: signalled, or its channel is gone. `kill_at`: when to SIGKILL it if it is still
    /// there (`None`: SIGKILLed already, or reaped — never signal it again).
    Dying {
        kill_at: Option<Instant>,
        why: Cow<'static, str>,
    },
}

impl Life {
    pub(crate) fn public(&self) -> WorkerState {
        match self {
            Life::Spawned { .. } | Life::Starting { .. } => WorkerState::Starting,
            Life::Online => WorkerState::Online,
            Life::Draining { .. } | Life::Dying { .. } => WorkerState::Draining,
        }
    }
}

/// Why a worker is in its slot (so a replaced worker's exit is not taken for a crash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The slot's worker.
    Current,
    /// Started by a reload or recycle, not yet online; the slot's current worker keeps serving
    /// until it is.
    Replacement,
    /// Drained or killed away: its exit is expected.
    Retiring,
}

/// How a worker leaves service.
pub(crate) enum Retire {
    /// Gracefully: no new connections, told to drain, killed after `--grace`. A worker that is
    /// not online yet has nothing to drain and is killed.
    Drain,
    /// SIGKILL now.
    Kill(Cow<'static, str>),
    /// SIGTERM (and SIGCONT, so a stopped worker can act on it) now, SIGKILL after `grace`.
    Terminate {
        why: Cow<'static, str>,
        grace: Duration,
    },
    /// Its channel closed while it should be serving: it is exiting, or broken; SIGKILL if it
    /// is not reaped shortly.
    Lost(Cow<'static, str>),
}

pub(crate) struct Worker {
    pub(crate) slot: u32,
    pub(crate) pid: u32,
    pub(crate) role: Role,
    pub(crate) life: Life,
    /// The channel; `None` once closed (its connections were given back then).
    pub(crate) link: Option<Link>,
    /// Connections this worker acknowledged (handoff policies).
    pub(crate) acked: u64,
    /// Last cumulative counters the worker reported.
    pub(crate) reported: WireStats,
    pub(crate) online_at: Option<Instant>,
    pub(crate) last_seen: Instant,
    /// Skipped by dispatch until then (it refused a connection, or too many fds in flight).
    pub(crate) skip_until: Option<Instant>,
    /// `--max-requests` with jitter: recycle once it has served this many.
    pub(crate) recycle_at: Option<u64>,
}

impl Worker {
    /// Connections it has open now, as far as the primary knows.
    pub(crate) fn active(&self, policy: Policy) -> u64 {
        let opened = if policy.hands_off() {
            self.acked
        } else {
            self.reported.accepted
        };
        opened.saturating_sub(self.reported.closed)
    }

    /// Open plus unacknowledged connections: what `least-conn` compares.
    pub(crate) fn load(&self, policy: Policy) -> u64 {
        self.active(policy) + self.link.as_ref().map_or(0, |l| l.unacked() as u64)
    }

    /// Can be handed a connection now.
    pub(crate) fn can_take(&self, now: Instant) -> bool {
        matches!(self.life, Life::Online)
            && self.skip_until.is_none_or(|t| t <= now)
            && self.link.as_ref().is_some_and(Link::can_take)
    }

    /// Whether it may still be signalled (not SIGKILLed already, not reaped).
    pub(crate) fn signallable(&self) -> bool {
        !matches!(self.life, Life::Dying { kill_at: None, .. })
    }
}

#[derive(Default, Clone, Copy)]
pub(crate) struct Counters {
    pub(crate) connections_total: u64,
    pub(crate) requests_total: u64,
    pub(crate) connections_lost: u64,
    pub(crate) restarts: u64,
}

/// A pending start of a slot's worker.
pub(crate) struct Start {
    at: Instant,
    /// A restart (counted in `restarts`), not a first start.
    restart: bool,
    /// In the due queue already.
    queued: bool,
}

pub(crate) struct Slot {
    pub(crate) id: u32,
    /// False once scaled away; the slot disappears when its workers are gone.
    pub(crate) wanted: bool,
    pub(crate) current: Option<usize>,
    pub(crate) counters: Counters,
    /// Consecutive failed starts, for backoff.
    pub(crate) failures: u32,
    pub(crate) start: Option<Start>,
    /// `reuseport`: this slot's own listeners.
    pub(crate) reuse: Vec<TcpListener>,
    /// The slot's worker has been online at least once.
    pub(crate) was_online: bool,
    /// `sticky`: the distinct affinity keys its workers were handed (an estimate).
    pub(crate) keys: super::dispatch::KeySketch,
}

impl Slot {
    /// Its pending start, if any: when, and whether it is a restart (an upgrade carries it).
    pub(crate) fn pending_start(&self) -> Option<(Instant, bool)> {
        self.start.as_ref().map(|st| (st.at, st.restart))
    }
}

/// The slots and the worker table. Workers are named by their key (index) in the table.
#[derive(Default)]
pub(crate) struct Pool {
    pub(crate) slots: Vec<Slot>,
    workers: Vec<Option<Worker>>,
    free: Vec<usize>,
    /// Slot indexes whose start is due now, in order.
    due: VecDeque<usize>,
}

impl Pool {
    /// Number of keys (live or free).
    pub(crate) fn capacity(&self) -> usize {
        self.workers.len()
    }
    pub(crate) fn get(&self, k: usize) -> Option<&Worker> {
        self.workers.get(k)?.as_ref()
    }
    pub(crate) fn get_mut(&mut self, k: usize) -> Option<&mut Worker> {
        self.workers.get_mut(k)?.as_mut()
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.workers.iter().all(Option::is_none)
    }
    pub(crate) fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.iter().flatten()
    }
    pub(crate) fn insert(&mut self, w: Worker) -> usize {
        match self.free.pop() {
            Some(k) => {
                self.workers[k] = Some(w);
                k
            }
            None => {
                self.workers.push(Some(w));
                self.workers.len() - 1
            }
        }
    }
    pub(crate) fn remove(&mut self, k: usize) -> Option<Worker> {
        let w = self.workers.get_mut(k)?.take()?;
        self.free.push(k);
        Some(w)
    }

    /// Puts each worker back at its key (an upgrade: slots name their worker by key).
    pub(crate) fn restore(&mut self, workers: Vec<(usize, Worker)>) {
        let len = workers.iter().map(|(k, _)| k + 1).max().unwrap_or(0);
        self.workers = (0..len).map(|_| None).collect();
        for (k, w) in workers {
            self.workers[k] = Some(w);
        }
        self.free = (0..len)
            .rev()
            .filter(|&k| self.workers[k].is_none())
            .collect();
    }

    pub(crate) fn slots(&self) -> &[Slot] {
        &self.slots
    }
    pub(crate) fn slots_mut(&mut self) -> &mut [Slot] {
        &mut self.slots
    }
    pub(crate) fn slot_wanted(&self, idx: usize) -> bool {
        self.slots.get(idx).is_some_and(|s| s.wanted)
    }
    /// The serving worker of slot `id` (1-based), if the slot is wanted and has one.
    pub(crate) fn current_of(&self, id: u32) -> Option<usize> {
        let s = self.slots.get((id as usize).wrapping_sub(1))?;
        s.current.filter(|_| s.wanted)
    }
    pub(crate) fn slot_empty(&self, idx: usize) -> bool {
        let id = self.slots[idx].id;
        !self.workers().any(|w| w.slot == id)
    }

    /// Slot `idx` waiting to restart a worker that failed more than once in a row.
    pub(crate) fn backoff(&self, idx: usize, now: Instant) -> Option<crate::stats::Backoff> {
        let s = self.slots.get(idx)?;
        let st = s.start.as_ref().filter(|st| st.restart)?;
        (s.current.is_none() && s.failures >= 2).then(|| crate::stats::Backoff {
            failures: s.failures,
            next_attempt_in_s: st.at.saturating_duration_since(now).as_secs_f64(),
        })
    }

    /// A worker acknowledged a connection with affinity key `key`.
    pub(crate) fn count_connection(&mut self, slot: u32, key: Option<u64>) {
        if let Some(s) = self.slots.get_mut((slot - 1) as usize) {
            s.counters.connections_total += 1;
            if let Some(key) = key {
                s.keys.add(key);
            }
        }
    }

    /// The ids of the wanted slots, in order (what a reload replaces).
    pub(crate) fn wanted_ids(&self) -> VecDeque<u32> {
        self.slots
            .iter()
            .filter(|s| s.wanted)
            .map(|s| s.id)
            .collect()
    }

    /// A worker reported more requests (and, without handoff, accepted connections).
    pub(crate) fn count_reported(&mut self, slot: u32, requests: u64, accepted: Option<u64>) {
        if let Some(s) = self.slots.get_mut((slot - 1) as usize) {
            s.counters.requests_total += requests;
            s.counters.connections_total += accepted.unwrap_or(0);
        }
    }

    /// Asks for slot `idx`'s worker to be started after `delay` (at once for zero).
    pub(crate) fn request_start(&mut self, idx: usize, delay: Duration, restart: bool) {
        let now = Instant::now();
        let queued = delay.is_zero();
        let Some(s) = self.slots.get_mut(idx) else {
            return;
        };
        if s.start.as_ref().is_some_and(|st| st.queued) {
            return;
        }
        s.start = Some(Start {
            at: now + delay,
            restart,
            queued,
        });
        if queued {
            self.due.push_back(idx);
        }
    }

    /// Forgets slot `idx`'s pending start (scaled away, stopping, or started another way).
    pub(crate) fn cancel_start(&mut self, idx: usize) {
        if let Some(s) = self.slots.get_mut(idx) {
            s.start = None;
        }
    }

    pub(crate) fn starts_due(&self) -> bool {
        !self.due.is_empty()
    }

    /// Moves starts whose time has come to the due queue.
    pub(crate) fn queue_due(&mut self, now: Instant) {
        for (idx, s) in self.slots.iter_mut().enumerate() {
            if let Some(st) = &mut s.start {
                if !st.queued && st.at <= now {
                    st.queued = true;
                    self.due.push_back(idx);
                }
            }
        }
    }

    /// The next slot to start: `(index, is_restart)`.
    pub(crate) fn next_due(&mut self) -> Option<(usize, bool)> {
        while let Some(idx) = self.due.pop_front() {
            let Some(s) = self.slots.get_mut(idx) else {
                continue;
            };
            let Some(st) = s.start.take() else { continue };
            if s.wanted && s.current.is_none() {
                return Some((idx, st.restart));
            }
        }
        None
    }
}
