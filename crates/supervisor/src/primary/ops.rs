//! The operations room: what the outside asks of the primary — stop, reload, recycle, scale,
//! messages, statistics — and when each is answered.
//!
//! - **Reload queue.** One reload runs at a time, slot by slot, each new worker online before
//!   the old one drains. A reload asked for while a full reload runs is *not* merged into it:
//!   it waits, and runs as a reload of its own once the running one ends, so that when it
//!   answers, every serving worker was started after it was asked for. A reload asked for while
//!   a `--max-requests` recycle runs turns the recycle into a full reload of every slot.
//! - **Scale** answers once every added worker is online (or one of them failed to start:
//!   then with that error; the slot keeps restarting with backoff). A scale-down answers once
//!   the removed workers are told to drain.
//! - **Stop** drains every worker within `--grace`; a second stop kills at once.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::time::Instant;

use roundhouse_proto::frame;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::pool::{Life, Retire, Role};
use super::Primary;
use crate::api::{OpError, Request, Target};
use crate::config::MAX_WORKERS;
use crate::events::ExitInfo;
use crate::notify;
use crate::stats::{StatsSnapshot, WorkerStats};

type Reply = oneshot::Sender<Result<(), OpError>>;

#[derive(Default)]
enum Phase {
    #[default]
    Running,
    Stopping {
        deadline: Instant,
        replies: Vec<oneshot::Sender<()>>,
        /// The grace period ran out and every worker was SIGKILLed.
        killed: bool,
    },
}

struct Reload {
    queue: VecDeque<u32>,
    /// (slot id, new worker key) being brought online.
    step: Option<(u32, usize)>,
    replies: Vec<Reply>,
    /// A whole reload (SIGHUP / `roundhouse reload`: systemd is told), not a one-slot recycle.
    full: bool,
}

/// A scale-up waiting for its new workers to come online.
struct ScaleWait {
    ids: Vec<u32>,
    reply: Reply,
}

#[derive(Default)]
pub(crate) struct Ops {
    phase: Phase,
    reload: Option<Reload>,
    /// Reloads asked for while a full reload ran: they run, as one, after it.
    next_reload: Vec<Reply>,
    scales: Vec<ScaleWait>,
    pub(super) any_online_ever: bool,
    pub(super) announced_ready: bool,
}

impl Ops {
    /// Answers (with `result`) and forgets the scale-ups `which` selects.
    fn answer_scales(
        &mut self,
        which: impl Fn(&ScaleWait) -> bool,
        result: impl Fn(&ScaleWait) -> Result<(), OpError>,
    ) {
        let mut i = 0;
        while i < self.scales.len() {
            if which(&self.scales[i]) {
                let w = self.scales.swap_remove(i);
                let r = result(&w);
                let _ = w.reply.send(r);
            } else {
                i += 1;
            }
        }
    }

    pub(super) fn stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }
    pub(super) fn reloading(&self) -> bool {
        self.reload.is_some() || !self.next_reload.is_empty()
    }
    /// A scale-up waits for its workers.
    pub(super) fn scaling(&self) -> bool {
        !self.scales.is_empty()
    }
    /// Answers everyone waiting for the stop.
    pub(super) fn finish_stop(&mut self) {
        if let Phase::Stopping { replies, .. } = std::mem::take(&mut self.phase) {
            for r in replies {
                let _ = r.send(());
            }
        }
    }
}

impl Primary {
    pub(super) fn on_request(&mut self, r: Request) {
        match r {
            Request::Stats { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Request::ResetStats { reply } => {
                for s in self.pool.slots_mut() {
                    s.counters = Default::default();
                    s.keys = Default::default();
                }
                if let Some(kr) = &mut self.kernel_rr {
                    kr.reset();
                }
                let _ = reply.send(());
            }
            Request::Reload { reply } | Request::Scale { reply, .. } if self.upgrade.is_some() => {
                let _ = reply.send(Err(OpError::Upgrading));
            }
            Request::Reload { reply } => self.begin_reload(reply),
            Request::Scale { workers, reply } => self.scale(workers, reply),
            Request::Upgrade { client, reply } => self.begin_upgrade(client, reply),
            Request::Send { to, message, reply } => {
                let _ = reply.send(self.send_message(to, &message));
            }
            Request::Stop { reply } => self.begin_stop(Some(reply)),
            Request::OverMemory { id, pid, rss } => self.over_memory(id, pid, rss),
        }
    }

    /// `--max-memory`: recycle slot `id`'s worker if it is still `pid` and serving, now or (while
    /// a reload or another recycle runs) right after it.
    fn over_memory(&mut self, id: u32, pid: u32, rss: u64) {
        let Some(k) = self.pool.current_of(id) else {
            return;
        };
        let reloading = self.ops.reload.is_some();
        let Some(w) = self.pool.get_mut(k) else {
            return;
        };
        if w.pid != pid || !matches!(w.life, Life::Online) || w.role != Role::Current {
            return;
        }
        let limit = self.cfg.max_memory.unwrap_or(0);
        if reloading {
            // Due at the next tick after the running one (as a --max-requests recycle).
            w.recycle_at = Some(0);
            return;
        }
        w.recycle_at = None;
        warn!(
            worker.id = id,
            worker.pid = pid,
            rss_mib = rss >> 20,
            limit_mib = limit >> 20,
            "worker over --max-memory; recycling"
        );
        self.recycle((id - 1) as usize);
    }

    fn send_message(&mut self, to: Target, message: &serde_json::Value) -> Result<(), OpError> {
        let json = message.to_string().into_bytes();
        if json.len() > frame::MAX_MESSAGE {
            return Err(OpError::MessageTooLarge(json.len()));
        }
        match to {
            Target::All => {
                for id in 1..=self.pool.slots().len() as u32 {
                    self.message_slot(id, 0, &json);
                }
                Ok(())
            }
            Target::Worker(id) if self.message_slot(id, 0, &json) => Ok(()),
            Target::Worker(id) => Err(OpError::NoSuchWorker(id)),
        }
    }

    pub(super) fn begin_stop(&mut self, reply: Option<oneshot::Sender<()>>) {
        if let Phase::Stopping { replies, .. } = &mut self.ops.phase {
            // A second stop request: stop at once.
            warn!("second stop request: killing workers now");
            replies.extend(reply);
            self.kill_all();
            return;
        }
        self.cancel_upgrade(crate::api::OpError::Stopping);
        info!("stopping: draining workers");
        notify::notify("STOPPING=1");
        let waiting: Vec<Reply> = self
            .ops
            .reload
            .take()
            .map(|r| r.replies)
            .into_iter()
            .flatten()
            .chain(self.ops.next_reload.drain(..))
            .chain(self.ops.scales.drain(..).map(|s| s.reply))
            .collect();
        for reply in waiting {
            let _ = reply.send(Err(OpError::Stopping));
        }
        // Hand what we hold to workers before they are told to drain, then stop accepting.
        self.expire_peeks(None);
        self.dispatch();
        self.ops.phase = Phase::Stopping {
            deadline: Instant::now() + self.cfg.grace,
            replies: reply.into_iter().collect(),
            killed: false,
        };
        self.accept.on.clear();
        for idx in 0..self.pool.slots().len() {
            self.pool.cancel_start(idx);
        }
        for k in 0..self.pool.capacity() {
            self.retire(k, Retire::Drain);
        }
    }

    fn scale(&mut self, n: u32, reply: Reply) {
        if n == 0 || n > MAX_WORKERS {
            let _ = reply.send(Err(OpError::WorkerCount(n)));
            return;
        }
        if self.ops.stopping() {
            let _ = reply.send(Err(OpError::Stopping));
            return;
        }
        let wanted = self.pool.slots().iter().filter(|s| s.wanted).count() as u32;
        info!(from = wanted, to = n, "scaling");
        if n > wanted {
            let mut ids = Vec::new();
            for id in wanted + 1..=n {
                if let Err(e) = self.add_slot(id) {
                    let _ = reply.send(Err(OpError::Bind {
                        id,
                        why: e.to_string(),
                    }));
                    return;
                }
                let idx = (id - 1) as usize;
                if self.pool.slots()[idx].current.is_none() {
                    self.pool
                        .request_start(idx, std::time::Duration::ZERO, false);
                }
                ids.push(id);
            }
            self.cfg.workers = n;
            self.ops.scales.push(ScaleWait { ids, reply });
            self.scale_progress();
        } else {
            for idx in (n as usize..self.pool.slots().len()).rev() {
                self.pool.cancel_start(idx);
                let s = &mut self.pool.slots_mut()[idx];
                s.wanted = false;
                if let Some(k) = s.current.take() {
                    self.retire(k, Retire::Drain);
                }
            }
            self.rotation_dirty = true;
            self.cfg.workers = n;
            self.scale_progress();
            let _ = reply.send(Ok(()));
        }
    }

    /// Answers the scale-ups whose every added slot is online (or gone).
    fn scale_progress(&mut self) {
        let pool = &self.pool;
        let done = |w: &ScaleWait| {
            w.ids.iter().all(|id| {
                let s = pool.slots().get((*id - 1) as usize);
                s.is_none_or(|s| !s.wanted || (s.was_online && s.current.is_some()))
            })
        };
        self.ops.answer_scales(done, |_| Ok(()));
    }

    pub(super) fn scale_slot_online(&mut self, _id: u32) {
        self.scale_progress();
    }

    /// Slot `id`'s worker exited before it was ever online: a scale-up waiting for it fails.
    pub(super) fn scale_slot_failed(&mut self, id: u32, status: ExitInfo) {
        self.ops.answer_scales(
            |w| w.ids.contains(&id),
            |_| Err(OpError::ExitedBeforeOnline { id, status }),
        );
    }

    fn begin_reload(&mut self, reply: Reply) {
        if self.ops.stopping() {
            let _ = reply.send(Err(OpError::Stopping));
            return;
        }
        if let Some(r) = &mut self.ops.reload {
            if r.full {
                // Not merged: it runs after this one, so every worker serving when it answers
                // was started after it was asked for.
                info!("reload asked for while a reload runs: it will run next");
                self.ops.next_reload.push(reply);
                return;
            }
            // A --max-requests recycle is running: make it a full reload of every slot (the
            // slot being recycled included: its new worker was started before this request).
            info!("reloading workers one by one (after the running recycle)");
            notify::reloading();
            r.full = true;
            r.queue = self.pool.wanted_ids();
            r.replies.push(reply);
            return;
        }
        self.start_reload(vec![reply]);
    }

    fn start_reload(&mut self, replies: Vec<Reply>) {
        info!("reloading workers one by one");
        notify::reloading();
        self.ops.reload = Some(Reload {
            queue: self.pool.wanted_ids(),
            step: None,
            replies,
            full: true,
        });
        self.advance_reload();
    }

    /// Recycles one slot the reload way (new worker online first), outside a full reload.
    pub(super) fn recycle(&mut self, idx: usize) {
        if self.ops.reload.is_some() {
            return;
        }
        let id = self.pool.slots()[idx].id;
        self.ops.reload = Some(Reload {
            queue: VecDeque::from([id]),
            step: None,
            replies: Vec::new(),
            full: false,
        });
        self.advance_reload();
    }

    fn advance_reload(&mut self) {
        loop {
            let Some(r) = &mut self.ops.reload else {
                return;
            };
            if r.step.is_some() {
                return;
            }
            let Some(id) = r.queue.pop_front() else {
                self.finish_reload(Ok(()));
                return;
            };
            let idx = (id - 1) as usize;
            if !self.pool.slot_wanted(idx) {
                continue;
            }
            if self.pool.slots()[idx].current.is_none() {
                // Empty slot (restarting): a start now is the reload of it.
                self.pool.cancel_start(idx);
                self.pool
                    .request_start(idx, std::time::Duration::ZERO, false);
                continue;
            }
            match self.start_worker(idx, Role::Replacement) {
                Some(k) => {
                    if let Some(r) = &mut self.ops.reload {
                        r.step = Some((id, k));
                    }
                    return;
                }
                None => {
                    self.finish_reload(Err(OpError::StartFailed(id)));
                    return;
                }
            }
        }
    }

    fn finish_reload(&mut self, result: Result<(), OpError>) {
        let Some(r) = self.ops.reload.take() else {
            return;
        };
        if let Some((_, k)) = r.step {
            // The new worker never came online: get rid of it; the old one keeps serving.
            self.retire(k, Retire::Kill("reload step abandoned".into()));
        }
        match &result {
            Ok(()) if r.full => info!("reload complete"),
            Ok(()) => {}
            Err(e) => error!("reload failed: {e}"),
        }
        if r.full {
            notify::notify("READY=1");
        }
        for reply in r.replies {
            let _ = reply.send(result.clone());
        }
        if !self.ops.next_reload.is_empty() && !self.ops.stopping() {
            let next = std::mem::take(&mut self.ops.next_reload);
            self.start_reload(next);
        }
    }

    /// A reload step's new worker is online: on to the next slot.
    pub(super) fn reload_step_online(&mut self, k: usize) {
        if let Some(r) = &mut self.ops.reload {
            if r.step.map(|(_, nk)| nk) == Some(k) {
                r.step = None;
                self.advance_reload();
            }
        }
    }

    /// A reload step's new worker died before coming online: the reload failed, the old worker
    /// stays.
    pub(super) fn reload_step_exited(&mut self, k: usize, id: u32, status: ExitInfo) {
        if let Some(r) = &mut self.ops.reload {
            if r.step.map(|(_, nk)| nk) == Some(k) {
                r.step = None;
                self.finish_reload(Err(OpError::ExitedBeforeOnline { id, status }));
            }
        }
    }

    pub(super) fn on_tick(&mut self) {
        let now = Instant::now();
        if self.accept.paused_until.is_some_and(|t| t <= now) {
            self.accept.paused_until = None;
        }
        // A second after the last failure, with accept working since (connections, or an empty
        // backlog that no new client came to refill), the episode is over; a second of not
        // even trying does not end it.
        if self.accept.accept_worked_since_starved
            && self
                .accept
                .starved
                .is_some_and(|t| now.duration_since(t) >= std::time::Duration::from_secs(1))
        {
            self.end_starvation();
        }
        self.check_workers(now);
        self.expire_peeks(Some(now));
        if let Phase::Stopping {
            deadline, killed, ..
        } = &mut self.ops.phase
        {
            if *deadline <= now && !*killed {
                *killed = true;
                warn!("grace period over: killing the workers that are left");
                self.kill_all();
            }
        }
        // A worker that passed --max-requests while another slot was recycling (and has been
        // quiet since, so no STATS brings it up again).
        if self.ops.reload.is_none() && !self.ops.stopping() {
            let due = self.pool.workers().find(|w| {
                matches!(w.life, Life::Online)
                    && w.role == Role::Current
                    && w.recycle_at.is_some_and(|n| w.reported.requests >= n)
            });
            if let Some(w) = due {
                let idx = (w.slot - 1) as usize;
                if let Some(w) = self.pool.slots()[idx]
                    .current
                    .and_then(|k| self.pool.get_mut(k))
                {
                    w.recycle_at = None;
                    info!(
                        worker.id = w.slot,
                        worker.pid = w.pid,
                        requests = w.reported.requests,
                        "worker reached --max-requests; recycling"
                    );
                }
                self.recycle(idx);
            }
        }
    }

    pub(super) fn snapshot(&self) -> StatsSnapshot {
        let policy = self.cfg.policy;
        let plain = self.cfg.plain;
        let slots = self.pool.slots();
        let mut workers = Vec::new();
        // One pass over the processes (a slot may have two during a reload), not one per slot:
        // with 1024 workers a scrape must stay cheap for the owner thread.
        let now = std::time::Instant::now();
        let mut active_by_slot = vec![0u64; slots.len()];
        let mut processes_by_slot = vec![0u32; slots.len()];
        for w in self.pool.workers() {
            if let Some(i) = (w.slot as usize)
                .checked_sub(1)
                .filter(|&i| i < slots.len())
            {
                active_by_slot[i] += w.active(policy);
                processes_by_slot[i] += 1;
            }
        }
        for (i, s) in slots.iter().enumerate() {
            if !s.wanted && s.current.is_none() && processes_by_slot[i] == 0 {
                continue;
            }
            let current = s.current.and_then(|k| self.pool.get(k));
            // What a plain worker never reports is unknown, not 0 (promise 10); under
            // reuseport-rr the kernel counts connections for every worker.
            let connections_total = match &self.kernel_rr {
                Some(kr) => Some(kr.connections(s.id)),
                None => (!plain).then_some(s.counters.connections_total),
            };
            workers.push(WorkerStats {
                id: s.id,
                pid: current.map(|w| w.pid),
                state: Primary::public_state(current),
                connections_total,
                connections_active: (!plain).then_some(active_by_slot[i]),
                requests_total: (!plain).then_some(s.counters.requests_total),
                connections_lost: s.counters.connections_lost,
                restarts: s.counters.restarts,
                rss_bytes: 0, // filled in by ApiClient::stats, off the owner thread
                backoff: self.pool.backoff(i, now),
                keys: (policy == crate::config::Policy::Sticky).then(|| s.keys.estimate()),
            });
        }
        let mut snapshot = StatsSnapshot::new(
            policy.as_str(),
            self.started.elapsed().as_secs_f64(),
            self.addrs.iter().map(|a| a.to_string()).collect(),
            workers,
        );
        if self.peeks() {
            snapshot.sticky_fallbacks = Some(self.sticky_fallbacks);
        }
        snapshot
    }
}
