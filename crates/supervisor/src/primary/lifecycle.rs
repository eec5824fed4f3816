//! The lifecycle room: worker slots, worker processes and their states, from fork to reap.
//!
//! A worker's state is [`Life`], whose variants carry their own deadlines and reasons:
//!
//! ```text
//!   fork ──► Spawned ──execve ok──► Starting ──READY──► Online ──drain──► Draining
//!              │ exec failed           │ --ready-timeout     │                │ --grace
//!              ▼                       ▼                     ▼                ▼
//!            Dying ◄──────────────── retire(Kill | Terminate | Lost) ◄────────┘
//!              │ reaped (SIGCHLD)
//!              ▼
//!           removed; the slot restarts it (backoff) if it was the slot's worker
//! ```
//!
//! Every way a worker leaves service goes through [`Primary::retire`]: it sets the state,
//! signals the worker's process group, closes the link and gives every unacknowledged
//! connection back to dispatch, and marks the rotation for rebuilding. Nothing here dispatches.
//!
//! Starting is off the accept path: [`Pool::request_start`] queues a slot, the owner starts at
//! most [`SPAWN_BURST`] workers per wake-up (and only when no connection is waiting), and a
//! start is a `fork` that does not wait for `execve`: the exec-status pipe is watched by the
//! reactor (`Spawned`), so a thousand workers starting cost the accept path microseconds each.

#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use roundhouse_proto::frame::Stats as WireStats;
use roundhouse_proto::sys;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::{debug, error, info, warn};

use super::link::{Control, Link};
use super::{Primary, READ_ON_EXIT};
use crate::config::Policy;
use crate::events::{Event, ExitInfo};
use crate::notify;
use crate::spawn::{self, ExecStatus, SpawnError, SpawnSpec};
use crate::stats::WorkerState;
use crate::RunError;

/// A start that stays up this long resets the slot's backoff.
const STABLE_AFTER: Duration = Duration::from_secs(5);
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Longest a worker may leave a handed connection unacknowledged before it is killed as not
/// reading its channel (or `--heartbeat-timeout`, if shorter).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a worker whose channel closed gets to be reaped before it is SIGKILLed.
const CHANNEL_CLOSED_GRACE: Duration = Duration::from_millis(200);
/// Time a hung worker gets between SIGTERM and SIGKILL.
const HUNG_KILL_GRACE: Duration = Duration::from_secs(1);
/// A worker whose queued frames make no progress for this long does not read its channel.
const OUTBOX_STALL: Duration = Duration::from_secs(10);
/// Workers started per wake-up at most, so accepting goes on between bursts.
pub(super) const SPAWN_BURST: usize = 8;

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
    fn public(&self) -> WorkerState {
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

    /// Signals the worker's whole process group (its own children too), unless it is reaped.
    fn signal(&self, sig: Signal) {
        if matches!(self.life, Life::Dying { kill_at: None, .. }) {
            return;
        }
        let pid = self.pid as i32;
        if kill(Pid::from_raw(-pid), sig).is_err() {
            // Not a group leader (yet): the process itself.
            let _ = kill(Pid::from_raw(pid), sig);
        }
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
struct Start {
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
    failures: u32,
    start: Option<Start>,
    /// `reuseport`: this slot's own listeners.
    pub(crate) reuse: Vec<TcpListener>,
    /// The slot's worker has been online at least once.
    pub(crate) was_online: bool,
}

/// The slots and the worker table. Workers are named by their key (index) in the table.
#[derive(Default)]
pub(crate) struct Pool {
    slots: Vec<Slot>,
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
    fn insert(&mut self, w: Worker) -> usize {
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
    fn remove(&mut self, k: usize) -> Option<Worker> {
        let w = self.workers.get_mut(k)?.take()?;
        self.free.push(k);
        Some(w)
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
    fn slot_empty(&self, idx: usize) -> bool {
        let id = self.slots[idx].id;
        !self.workers().any(|w| w.slot == id)
    }

    /// A worker acknowledged a connection.
    pub(crate) fn count_connection(&mut self, slot: u32) {
        if let Some(s) = self.slots.get_mut((slot - 1) as usize) {
            s.counters.connections_total += 1;
        }
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
    fn queue_due(&mut self, now: Instant) {
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
    fn next_due(&mut self) -> Option<(usize, bool)> {
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

impl Primary {
    /// Creates (or revives) slot `id`, binding its own listeners under `reuseport`.
    pub(super) fn add_slot(&mut self, id: u32) -> Result<(), RunError> {
        let mut reuse = Vec::new();
        if self.cfg.policy.per_slot_listeners() {
            for addr in &self.addrs {
                reuse.push(
                    crate::listen::bind(*addr, self.cfg.backlog, true).map_err(RunError::Bind)?,
                );
            }
        }
        let idx = (id - 1) as usize;
        let slots = &mut self.pool.slots;
        if idx < slots.len() {
            let old = &mut slots[idx];
            old.wanted = true;
            if old.reuse.is_empty() {
                old.reuse = reuse;
            }
        } else {
            slots.push(Slot {
                id,
                wanted: true,
                current: None,
                counters: Counters::default(),
                failures: 0,
                start: None,
                reuse,
                was_online: false,
            });
        }
        Ok(())
    }

    /// Forks a worker for slot index `idx` without waiting for its `execve`. Failures are
    /// logged and scheduled for retry.
    pub(super) fn start_worker(&mut self, idx: usize, role: Role) -> Option<usize> {
        let id = self.pool.slots[idx].id;
        // A plain worker has no channel at all.
        let channel = if self.cfg.plain {
            None
        } else {
            let pair = if self.cfg.node {
                sys::stream_pair()
            } else {
                sys::seqpacket_pair()
            };
            match pair.and_then(|(p, c)| {
                // The worker's end is its own open file description: make it blocking, as an
                // inherited fd normally is (protocol.md section 2); the primary's stays
                // non-blocking.
                sys::set_blocking(&c)?;
                Ok((p, c))
            }) {
                Ok(p) => Some(p),
                Err(e) => {
                    error!(worker.id = id, "could not create a channel: {e}");
                    self.schedule_restart(idx, false);
                    return None;
                }
            }
        };
        let (primary_end, child_end) = channel.unzip();
        let listeners: Vec<&TcpListener> = match self.cfg.policy {
            Policy::None => self.shared.iter().collect(),
            Policy::ReusePort | Policy::ReusePortRr => self.pool.slots[idx].reuse.iter().collect(),
            _ => Vec::new(),
        };
        let env = self.worker_env(id, listeners.len());
        let mut fds: Vec<std::os::fd::BorrowedFd<'_>> =
            listeners.iter().map(|l| l.as_fd()).collect();
        fds.extend(child_end.as_ref().map(|c| c.as_fd()));
        let mut argv = vec![self.cfg.command.clone()];
        argv.extend(self.cfg.args.iter().cloned());
        let spec = SpawnSpec {
            path: &self.exe,
            argv: &argv,
            env: &env,
            env_remove: &[
                "NODE_UNIQUE_ID",
                "NODE_CHANNEL_FD",
                "LISTEN_FDS",
                "LISTEN_PID",
                "LISTEN_FDNAMES",
                "NOTIFY_SOCKET",
                "ROUNDHOUSE_SCHED_POLICY",
            ],
            fds: &fds,
            listen_fds: listeners.len(),
        };
        let result = spawn::spawn_nowait(&spec);
        drop(fds);
        drop(child_end);
        let forked = match result {
            Ok(f) => f,
            Err(e) => {
                error!(worker.id = id, "{e}");
                self.schedule_restart(idx, false);
                return None;
            }
        };
        let pid = forked.pid;
        let node = self.cfg.node;
        let registered = crate::sys::register(forked.exec_status, Interest::READABLE)
            .and_then(|exec| Ok((exec, primary_end.map(|c| Link::new(c, node)).transpose()?)));
        let (exec, link) = match registered {
            Ok(r) => r,
            Err(e) => {
                error!(
                    worker.id = id,
                    "could not register the worker's channel: {e}"
                );
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                let _ = waitpid(Pid::from_raw(pid as i32), None);
                self.schedule_restart(idx, false);
                return None;
            }
        };
        let now = Instant::now();
        let recycle_at = self.cfg.max_requests.map(|n| {
            // Jitter up to 10% so workers started together do not all recycle together.
            let jitter = (n / 10).max(1);
            n + (u64::from(pid) * 2654435761 % jitter)
        });
        let k = self.pool.insert(Worker {
            slot: id,
            pid,
            role,
            life: Life::Spawned {
                exec,
                deadline: now + self.cfg.ready_timeout,
            },
            link,
            acked: 0,
            reported: WireStats::default(),
            online_at: None,
            last_seen: now,
            skip_until: None,
            recycle_at,
        });
        if role == Role::Current {
            self.pool.slots[idx].current = Some(k);
        }
        Some(k)
    }

    /// Learns whether a `Spawned` worker's `execve` succeeded (without waiting).
    pub(super) fn resolve_exec(&mut self, k: usize) {
        let Some(w) = self.pool.get_mut(k) else {
            return;
        };
        let Life::Spawned { exec, deadline } = &w.life else {
            return;
        };
        let status = match exec.try_io(Interest::READABLE, |fd| match spawn::exec_status(fd) {
            ExecStatus::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
            s => Ok(s),
        }) {
            Ok(s) => s,
            // Not marked ready by the reactor yet, or really pending: ask the pipe itself.
            Err(_) => spawn::exec_status(exec.get_ref()),
        };
        let deadline = *deadline;
        let (id, pid) = (w.slot, w.pid);
        match status {
            ExecStatus::Pending => {}
            ExecStatus::Done => {
                w.life = Life::Starting { deadline };
                let plain = w.link.is_none();
                info!(worker.id = id, worker.pid = pid, "worker started");
                let _ = self.events.send(Event::Fork { id, pid });
                if plain {
                    // systemd's Type=exec: a plain worker is online once it runs the command.
                    self.on_online(k);
                }
            }
            ExecStatus::Failed(source) => {
                let e = SpawnError::Exec {
                    path: self.exe.display().to_string(),
                    source,
                };
                error!(worker.id = id, "{e}");
                w.life = Life::Dying {
                    kill_at: Some(Instant::now() + CHANNEL_CLOSED_GRACE),
                    why: "it could not execute the command".into(),
                };
                if !self.ops.any_online_ever {
                    self.fatal = Some(RunError::Spawn(e));
                }
                self.close_link(k);
            }
        }
    }

    pub(super) fn on_online(&mut self, k: usize) {
        let now = Instant::now();
        let w = self.pool.get_mut(k).expect("live worker");
        w.life = Life::Online;
        w.online_at = Some(now);
        let (id, pid, role) = (w.slot, w.pid, w.role);
        if role == Role::Current {
            // In the kernel's rotation before anyone is told it is online.
            self.sync_kernel_rotation();
        }
        info!(worker.id = id, worker.pid = pid, "worker online");
        let _ = self.events.send(Event::Online { id, pid });
        self.ops.any_online_ever = true;
        let idx = (id - 1) as usize;
        self.pool.slots[idx].was_online = true;
        if role == Role::Replacement {
            // A reload/recycle step: the new worker takes the slot, the old one drains — unless
            // the slot was scaled away meanwhile: then the newcomer goes too.
            if self.pool.slots[idx].wanted {
                let old = self.pool.slots[idx].current.replace(k);
                self.pool.get_mut(k).expect("live").role = Role::Current;
                if let Some(old) = old.filter(|&o| o != k) {
                    self.retire(old, Retire::Drain);
                }
            } else {
                self.retire(k, Retire::Drain);
            }
            self.reload_step_online(k);
        }
        self.rotation_dirty = true;
        self.scale_slot_online(id);
        if !self.ops.announced_ready
            && self
                .pool
                .slots
                .iter()
                .filter(|s| s.wanted)
                .all(|s| s.was_online)
        {
            self.ops.announced_ready = true;
            info!(
                workers = self.cfg.workers,
                pid = std::process::id(),
                "ready"
            );
            notify::notify("READY=1");
        }
    }

    /// The one way a worker leaves service; see [`Retire`].
    pub(super) fn retire(&mut self, k: usize, how: Retire) {
        let grace = self.cfg.grace;
        let Some(w) = self.pool.get_mut(k) else {
            return;
        };
        let now = Instant::now();
        match how {
            Retire::Drain => match w.life {
                Life::Draining { .. } | Life::Dying { .. } => return,
                Life::Spawned { .. } | Life::Starting { .. } => {
                    // Not ready yet: nothing to drain.
                    w.role = Role::Retiring;
                    return self.retire(k, Retire::Kill("it is no longer needed".into()));
                }
                Life::Online => {
                    w.role = Role::Retiring;
                    w.life = Life::Draining {
                        deadline: now + grace,
                    };
                    info!(worker.id = w.slot, worker.pid = w.pid, "draining worker");
                    let plain = w.link.is_none();
                    // Out of the kernel's rotation before it stops accepting.
                    self.sync_kernel_rotation();
                    if plain {
                        // A plain worker is drained the way socket-activated servers expect.
                        if let Some(w) = self.pool.get(k) {
                            w.signal(Signal::SIGTERM);
                        }
                    } else {
                        self.send_control(k, Control::Drain);
                    }
                    self.rotation_dirty = true;
                    return;
                }
            },
            Retire::Kill(why) => {
                if matches!(w.life, Life::Dying { kill_at: None, .. }) {
                    return;
                }
                warn!(
                    worker.id = w.slot,
                    worker.pid = w.pid,
                    "killing worker: {why}"
                );
                // Signal first, then close the channel: the worker must not see end-of-file
                // and exit "cleanly" before the kill lands.
                w.signal(Signal::SIGKILL);
                w.life = Life::Dying { kill_at: None, why };
            }
            Retire::Terminate { why, grace } => {
                if matches!(w.life, Life::Dying { .. }) {
                    return;
                }
                w.signal(Signal::SIGTERM);
                // SIGTERM does not reach a stopped process; make sure it can act on it.
                w.signal(Signal::SIGCONT);
                w.life = Life::Dying {
                    kill_at: Some(now + grace),
                    why,
                };
            }
            Retire::Lost(why) => {
                if matches!(w.life, Life::Dying { .. }) {
                    return;
                }
                w.life = Life::Dying {
                    kill_at: Some(now + CHANNEL_CLOSED_GRACE),
                    why,
                };
            }
        }
        self.close_link(k);
    }

    /// Closes worker `k`'s channel and gives its unacknowledged connections back to dispatch.
    fn close_link(&mut self, k: usize) {
        if let Some(mut link) = self.pool.get_mut(k).and_then(|w| w.link.take()) {
            self.dispatch.give_back(link.take_unacked().into_iter());
        }
        self.rotation_dirty = true;
    }

    /// The worker's channel reached end-of-file or failed.
    pub(super) fn channel_closed(&mut self, k: usize) {
        self.resolve_exec(k);
        let Some(w) = self.pool.get(k) else { return };
        match w.life {
            // A draining worker closes its channel as it exits; wait for the exit (the grace
            // deadline still applies).
            Life::Draining { .. } | Life::Dying { .. } => self.close_link(k),
            // An exiting process closes its channel just before SIGCHLD arrives; one that keeps
            // running without its channel is broken. Take its connections back now (it can no
            // longer acknowledge them) and give it a moment to be reaped before SIGKILL.
            _ => self.retire(
                k,
                Retire::Lost("it closed its channel but kept running".into()),
            ),
        }
    }

    pub(super) fn reap(&mut self) {
        for k in 0..self.pool.capacity() {
            let Some(w) = self.pool.get(k) else { continue };
            let pid = Pid::from_raw(w.pid as i32);
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(status) => {
                    if let Some(info) = exit_info(status) {
                        self.on_exit(k, info);
                    }
                }
                Err(nix::errno::Errno::ECHILD) => self.on_exit(k, ExitInfo::Unknown),
                Err(e) => debug!("waitpid: {e}"),
            }
        }
    }

    fn on_exit(&mut self, k: usize, info: ExitInfo) {
        // An exec failure is reported on its pipe before the child exits.
        self.resolve_exec(k);
        if let Some(w) = self.pool.get_mut(k) {
            // Reaped: its pid may be reused from now on, so it must never be signalled again.
            w.life = Life::Dying {
                kill_at: None,
                why: "it exited".into(),
            };
        }
        // Read what it wrote before it exited (its final STATS, late acks), so the books are
        // right: a worker that closed every connection has lost none.
        self.read_worker(k, READ_ON_EXIT, true);
        self.close_link(k);
        self.fds_freed();
        let Some(w) = self.pool.remove(k) else { return };
        let policy = self.cfg.policy;
        let id = w.slot;
        let idx = (id - 1) as usize;
        info!(worker.id = id, worker.pid = w.pid, status = %info, "worker exited");
        let _ = self.events.send(Event::Exit {
            id,
            pid: w.pid,
            status: info,
        });
        // Connections it had acknowledged and not closed die with it: count them.
        let lost = w.active(policy);
        if lost > 0 {
            warn!(
                worker.id = id,
                worker.pid = w.pid,
                connections = lost,
                "connections lost with the worker"
            );
        }
        let slot = &mut self.pool.slots[idx];
        slot.counters.connections_lost += lost;
        let was_current = slot.current == Some(k);
        if was_current {
            slot.current = None;
        }
        self.rotation_dirty = true;
        self.reload_step_exited(k, id, info);
        if w.online_at.is_none() && was_current {
            self.scale_slot_failed(id, info);
        }
        if was_current && self.pool.slot_wanted(idx) && !self.ops.stopping() {
            let stable = w.online_at.is_some_and(|t| t.elapsed() >= STABLE_AFTER);
            self.schedule_restart(idx, stable);
        }
        if !self.pool.slots[idx].wanted && self.pool.slot_empty(idx) {
            self.pool.slots[idx].reuse.clear();
            while self
                .pool
                .slots
                .last()
                .is_some_and(|s| !s.wanted && s.current.is_none())
            {
                let last = self.pool.slots.len() - 1;
                if !self.pool.slot_empty(last) {
                    break;
                }
                self.pool.slots.pop();
            }
        }
    }

    pub(super) fn schedule_restart(&mut self, idx: usize, stable: bool) {
        let slot = &mut self.pool.slots[idx];
        if stable {
            slot.failures = 0;
        }
        slot.failures = slot.failures.saturating_add(1);
        let delay = if stable {
            Duration::ZERO
        } else {
            BACKOFF_BASE
                .saturating_mul(1u32 << (slot.failures - 1).min(16))
                .min(BACKOFF_CAP)
        };
        info!(
            worker.id = slot.id,
            delay_ms = delay.as_millis() as u64,
            "restarting worker"
        );
        self.pool.request_start(idx, delay, true);
    }

    /// Starts up to [`SPAWN_BURST`] workers whose start is due.
    pub(super) fn run_due_starts(&mut self) {
        if self.ops.stopping() {
            return;
        }
        for _ in 0..SPAWN_BURST {
            let Some((idx, restart)) = self.pool.next_due() else {
                return;
            };
            if restart {
                self.pool.slots[idx].counters.restarts += 1;
            }
            self.start_worker(idx, Role::Current);
        }
    }

    /// The tick's share of the lifecycle: deadlines, silent and stuck workers, due restarts.
    pub(super) fn check_workers(&mut self, now: Instant) {
        let hb = self.cfg.heartbeat_timeout;
        let ack_timeout = hb.map_or(ACK_TIMEOUT, |t| t.min(ACK_TIMEOUT));
        for k in 0..self.pool.capacity() {
            let Some(w) = self.pool.get(k) else { continue };
            // Stable for a while: forget earlier failures.
            if w.role == Role::Current && w.online_at.is_some_and(|t| now - t >= STABLE_AFTER) {
                let idx = (w.slot - 1) as usize;
                self.pool.slots[idx].failures = 0;
            }
            let w = self.pool.get(k).expect("live");
            let retire = match &w.life {
                Life::Spawned { deadline, .. } | Life::Starting { deadline }
                    if *deadline <= now =>
                {
                    warn!(
                        worker.id = w.slot,
                        worker.pid = w.pid,
                        "worker not ready within --ready-timeout"
                    );
                    Some(Retire::Kill("not ready in time".into()))
                }
                Life::Draining { deadline } if *deadline <= now => Some(Retire::Kill(
                    "did not finish draining within --grace".into(),
                )),
                Life::Dying {
                    kill_at: Some(t),
                    why,
                } if *t <= now => Some(Retire::Kill(why.clone())),
                _ if w
                    .link
                    .as_ref()
                    .and_then(|l| l.stalled_since())
                    .is_some_and(|t| now.duration_since(t) >= OUTBOX_STALL) =>
                {
                    Some(Retire::Kill("it does not read its channel".into()))
                }
                // A live worker acknowledges within milliseconds; one that leaves a handoff
                // unanswered this long is not reading its channel (it may still heartbeat).
                Life::Online | Life::Draining { .. }
                    if w.link
                        .as_ref()
                        .and_then(|l| l.oldest_unacked())
                        .is_some_and(|t| now.duration_since(t) >= ack_timeout) =>
                {
                    Some(Retire::Kill(
                        format!(
                            "it did not acknowledge a connection within {}s",
                            ack_timeout.as_secs_f64()
                        )
                        .into(),
                    ))
                }
                // A plain worker has no channel to be silent on.
                Life::Online
                    if w.link.is_some()
                        && hb.is_some_and(|t| now.duration_since(w.last_seen) >= t) =>
                {
                    warn!(
                        worker.id = w.slot,
                        worker.pid = w.pid,
                        "worker silent for --heartbeat-timeout: hung; terminating"
                    );
                    Some(Retire::Terminate {
                        why: "it did not exit after SIGTERM".into(),
                        grace: HUNG_KILL_GRACE,
                    })
                }
                _ => None,
            };
            if let Some(how) = retire {
                self.retire(k, how);
            }
        }
        self.pool.queue_due(now);
    }

    /// SIGKILLs every worker now (a second stop, the grace period over, a fatal error).
    pub(super) fn kill_all(&mut self) {
        for k in 0..self.pool.capacity() {
            let Some(w) = self.pool.get_mut(k) else {
                continue;
            };
            w.signal(Signal::SIGKILL);
            w.life = Life::Dying {
                kill_at: None,
                why: "stopping at once".into(),
            };
            self.close_link(k);
        }
    }

    pub(super) fn public_state(w: Option<&Worker>) -> WorkerState {
        w.map_or(WorkerState::Stopped, |w| w.life.public())
    }
}

fn exit_info(status: WaitStatus) -> Option<ExitInfo> {
    match status {
        WaitStatus::Exited(_, code) => Some(ExitInfo::Code(code)),
        WaitStatus::Signaled(_, sig, _) => Some(ExitInfo::Signal(sig as i32)),
        _ => None,
    }
}
