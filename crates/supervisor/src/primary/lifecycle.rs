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

use std::net::TcpListener;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use roundhouse_proto::frame::Stats as WireStats;
use roundhouse_proto::sys;
use tokio::io::Interest;
use tracing::{error, info, warn};

use super::link::{Control, Link};
use super::pool::{Counters, Life, Retire, Role, Slot, Worker};
use super::{Primary, READ_ON_EXIT};
use crate::config::Policy;
use crate::events::{Event, ExitInfo};
use crate::notify;
use crate::output::Stream;
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
                keys: Default::default(),
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
        // Capture pipes for the worker's stdout and stderr (read by the output thread).
        let stdio = match (pipe_cloexec(), pipe_cloexec()) {
            (Ok(out), Ok(err)) => Some((out, err)),
            (Err(e), _) | (_, Err(e)) => {
                warn!(worker.id = id, "could not create output pipes ({e}): the worker writes to the primary's stderr");
                None
            }
        };
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
            stdout: stdio.as_ref().map(|((_, w), _)| w.as_fd()),
            stderr: stdio.as_ref().map(|(_, (_, w))| w.as_fd()),
        };
        let result = self.spawner.spawn(&spec);
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
        if let Some(((out, _), (err, _))) = stdio {
            // The write ends were the child's; closing ours lets the pipes reach end-of-file
            // when the worker (and whatever it started) is gone.
            self.output.capture(id, pid, Stream::Stdout, out);
            self.output.capture(id, pid, Stream::Stderr, err);
        }
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
                self.spawner.signal(pid, Signal::SIGKILL);
                spawn::reap_failed(pid);
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
                        self.signal(k, Signal::SIGTERM);
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
                let pid = w.pid;
                w.life = Life::Dying { kill_at: None, why };
                self.spawner.signal(pid, Signal::SIGKILL);
            }
            Retire::Terminate { why, grace } => {
                if matches!(w.life, Life::Dying { .. }) {
                    return;
                }
                self.signal(k, Signal::SIGTERM);
                // SIGTERM does not reach a stopped process; make sure it can act on it.
                self.signal(k, Signal::SIGCONT);
                let w = self.pool.get_mut(k).expect("live worker");
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
            if let Some(info) = self.spawner.try_wait(w.pid) {
                self.on_exit(k, info);
            }
        }
    }

    /// Signals worker `k` (its process group) unless it was SIGKILLed already or reaped.
    fn signal(&mut self, k: usize, sig: Signal) {
        if let Some(w) = self.pool.get(k).filter(|w| w.signallable()) {
            let pid = w.pid;
            self.spawner.signal(pid, sig);
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
        // A crash loop is said once per doubling of the delay (at WARN), not at every exit: at
        // the cap it goes quiet, and `status` shows the slot in back-off.
        let failures = slot.failures;
        let doubled = failures >= 2 && delay < BACKOFF_CAP
            || delay == BACKOFF_CAP
                && BACKOFF_BASE.saturating_mul(1u32 << (failures - 2).min(16)) < BACKOFF_CAP;
        if failures < 2 {
            info!(
                worker.id = slot.id,
                delay_ms = delay.as_millis() as u64,
                "restarting worker"
            );
        } else if doubled {
            warn!(
                worker.id = slot.id,
                delay_ms = delay.as_millis() as u64,
                failures,
                "restarting worker: it keeps failing; backing off"
            );
        } else {
            tracing::debug!(
                worker.id = slot.id,
                delay_ms = delay.as_millis() as u64,
                failures,
                "restarting worker"
            );
        }
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
            // Before calling a start late: learn what is already there (an execve that
            // succeeded, a READY not read yet, when the loop itself was held up).
            match self.pool.get(k).map(|w| &w.life) {
                Some(Life::Spawned { deadline, .. }) if *deadline <= now => self.resolve_exec(k),
                Some(Life::Starting { deadline }) if *deadline <= now => {
                    self.read_worker(k, super::READ_BURST, true)
                }
                _ => {}
            }
            if let (Some(t), Some(w)) = (hb, self.pool.get(k)) {
                if matches!(w.life, Life::Online)
                    && w.link.is_some()
                    && now.duration_since(w.last_seen) >= t
                    && !self.still_silent(k, now, t)
                {
                    continue;
                }
            }
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

    /// Before calling an online worker hung, reads what its channel holds: under heavy load
    /// the owner may not have read a heartbeat that did arrive. True if it is still silent.
    fn still_silent(&mut self, k: usize, now: Instant, timeout: Duration) -> bool {
        self.read_worker(k, super::READ_BURST, true);
        self.pool.get(k).is_some_and(|w| {
            matches!(w.life, Life::Online) && now.duration_since(w.last_seen) >= timeout
        })
    }

    /// SIGKILLs every worker now (a second stop, the grace period over, a fatal error).
    pub(super) fn kill_all(&mut self) {
        for k in 0..self.pool.capacity() {
            let Some(w) = self.pool.get_mut(k) else {
                continue;
            };
            let (pid, signallable) = (w.pid, w.signallable());
            w.life = Life::Dying {
                kill_at: None,
                why: "stopping at once".into(),
            };
            if signallable {
                self.spawner.signal(pid, Signal::SIGKILL);
            }
            self.close_link(k);
        }
    }

    pub(super) fn public_state(w: Option<&Worker>) -> WorkerState {
        w.map_or(WorkerState::Stopped, |w| w.life.public())
    }
}

/// A pipe, both ends close-on-exec (the child gets the write end by `dup2`).
fn pipe_cloexec() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}
