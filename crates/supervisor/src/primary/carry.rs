//! The upgrade room: `roundhouse upgrade` / `SIGUSR2` as the owner sees it — the refusals, the
//! pre-flight, describing every piece of state for the new image ([`Primary::describe`]), the
//! `execve`, and, in the new image, taking it all back ([`Primary::restore`]). The mechanics
//! (state format, memfd, close-on-exec, signal mask) are in [`crate::upgrade`].
//!
//! An upgrade is refused while the primary stops, reloads (or recycles) or waits for a scale-up,
//! and while another upgrade runs; reloads and scales asked for during one are refused too. The
//! exec happens at the end of a wake-up, after dispatch has settled: every connection is then
//! either held, being peeked at, or in a worker's window, and each is carried with its id.

#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use roundhouse_proto::frame::Stats as WireStats;
use tokio::io::Interest;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, info, warn};

use super::link::Link;
use super::pool::{Counters, Life, Role, Slot, Worker};
use super::{kernel_rr, Conn, Primary};
use crate::api::{OpError, Request};
use crate::events::Event;
use crate::notify;
use crate::output::Stream;
use crate::upgrade::{
    self, after, before, ms_since, ms_until, CarriedConn, CarriedLife, CarriedPipe, CarriedSlot,
    CarriedStart, CarriedWorker, State,
};
use crate::RunError;

type Reply = oneshot::Sender<Result<(), OpError>>;

/// Longest the exec waits for the log thread to write what is queued.
const LOG_FLUSH: Duration = Duration::from_millis(25);

/// What only an upgrade needs: where the binary is, and duplicates of the sockets the
/// admin/control thread serves (so they can be carried without asking that thread).
#[derive(Default)]
pub(crate) struct Surfaces {
    /// The binary to execute: the path the primary was started from (`None`: cannot upgrade,
    /// e.g. an embedding program's test harness).
    pub(crate) self_exe: Option<PathBuf>,
    pub(crate) admin: Option<OwnedFd>,
    pub(crate) control: Option<OwnedFd>,
    pub(crate) control_path: PathBuf,
    pub(crate) node_shim_written: Option<PathBuf>,
}

/// An upgrade whose pre-flight runs.
pub(super) struct Pending {
    check: oneshot::Receiver<Result<String, String>>,
    /// The control client that asked (`None` for `SIGUSR2`): answered by the new image.
    client: Option<OwnedFd>,
    reply: Reply,
}

impl Pending {
    pub(super) fn poll_checked(&mut self, cx: &mut Context<'_>) -> Poll<Result<String, String>> {
        use std::future::Future as _;
        std::pin::Pin::new(&mut self.check)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err("the pre-flight check did not finish".into())))
    }
}

impl Conn {
    pub(super) fn carry(&self, now: Instant) -> CarriedConn {
        CarriedConn {
            id: self.id,
            fd: self.stream.as_raw_fd(),
            listener: self.listener,
            peer: self.peer,
            sent_ms_ago: ms_since(self.sent_at, now),
            key: self.key,
        }
    }

    pub(super) fn adopt(c: CarriedConn, now: Instant) -> Conn {
        Conn {
            id: c.id,
            stream: upgrade::adopt(c.fd).into(),
            listener: c.listener,
            peer: c.peer,
            sent_at: before(now, c.sent_ms_ago),
            key: c.key,
        }
    }
}

fn role_str(r: Role) -> &'static str {
    match r {
        Role::Current => "current",
        Role::Replacement => "replacement",
        Role::Retiring => "retiring",
    }
}

fn role_of(s: &str) -> Role {
    match s {
        "replacement" => Role::Replacement,
        "retiring" => Role::Retiring,
        _ => Role::Current,
    }
}

impl Primary {
    /// Why an upgrade cannot start (or go on) now.
    fn upgrade_refused(&self) -> Option<OpError> {
        if self.ops.stopping() {
            return Some(OpError::Stopping);
        }
        if self.ops.reloading() {
            return Some(OpError::Upgrade(
                "a reload is running; upgrade once it has finished".into(),
            ));
        }
        if self.ops.scaling() {
            return Some(OpError::Upgrade(
                "a scale-up is waiting for its workers; upgrade once it has finished".into(),
            ));
        }
        None
    }

    /// `roundhouse upgrade` / `SIGUSR2`: refuse, or start the pre-flight (off this thread).
    pub(super) fn begin_upgrade(&mut self, client: Option<OwnedFd>, reply: Reply) {
        let refuse = |reply: Reply, e: OpError| {
            warn!("upgrade refused: {e}");
            let _ = reply.send(Err(e));
        };
        if self.upgrade.is_some() {
            return refuse(reply, OpError::Upgrading);
        }
        if let Some(e) = self.upgrade_refused() {
            return refuse(reply, e);
        }
        let Some(exe) = self.surfaces.self_exe.clone() else {
            return refuse(
                reply,
                OpError::Upgrade(
                    "this program cannot be upgraded in place (it does not resume an upgrade)"
                        .into(),
                ),
            );
        };
        let client_fd = client.as_ref().map(|c| c.as_raw_fd());
        let bytes = match self.describe(Vec::new(), client_fd).and_then(|s| {
            serde_json::to_vec(&s).map_err(|e| format!("could not write the state: {e}"))
        }) {
            Ok(b) => b,
            Err(e) => return refuse(reply, OpError::Upgrade(e)),
        };
        info!(binary = %exe.display(), "upgrade: checking the new binary");
        let (tx, check) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("roundhouse-preflight".into())
            .spawn(move || {
                let _ = tx.send(upgrade::preflight(&exe, &bytes));
            });
        if let Err(e) = spawned {
            return refuse(
                reply,
                OpError::Upgrade(format!("could not run the pre-flight: {e}")),
            );
        }
        self.upgrade = Some(Pending {
            check,
            client,
            reply,
        });
    }

    /// A stop while an upgrade is pending: the upgrade is off.
    pub(super) fn cancel_upgrade(&mut self, why: OpError) {
        if let Some(p) = self.upgrade.take() {
            let _ = p.reply.send(Err(why));
        }
    }

    /// The pre-flight answered: exec now (returns only if the upgrade failed), or say why not.
    pub(super) fn on_upgrade_checked(&mut self, result: Result<String, String>) {
        let Some(p) = self.upgrade.take() else { return };
        let checked = match result {
            Ok(line) => line,
            Err(why) => {
                error!("upgrade failed: {why}; still serving");
                let _ = p.reply.send(Err(OpError::Upgrade(why)));
                return;
            }
        };
        if let Some(e) = self.upgrade_refused() {
            warn!("upgrade refused: {e}");
            let _ = p.reply.send(Err(e));
            return;
        }
        info!("upgrade: {checked}");
        // Whatever is held goes out first: the fewer connections cross, the better.
        self.settle();
        let why = self.exec_upgrade(p.client.as_ref().map(|c| c.as_raw_fd()));
        error!("upgrade failed: {why}; still serving");
        notify::notify("READY=1");
        let _ = p.reply.send(Err(OpError::Upgrade(why)));
    }

    /// Describes everything, pauses the output thread and executes the new image. Returns
    /// only if that failed, with everything as it was.
    fn exec_upgrade(&mut self, client: Option<RawFd>) -> String {
        let Some(exe) = self.surfaces.self_exe.clone() else {
            return "this primary does not know the binary it runs".into();
        };
        let Some(pipes) = self.output.pause() else {
            return "the output thread did not answer".into();
        };
        let state = match self.describe(pipes, client) {
            Ok(s) => s,
            Err(e) => {
                self.output.resume();
                return e;
            }
        };
        let bytes = match serde_json::to_vec(&state) {
            Ok(b) => b,
            Err(e) => {
                self.output.resume();
                return format!("could not write the state: {e}");
            }
        };
        let fds = state.fds();
        info!(
            binary = %exe.display(),
            workers = state.workers.len(),
            fds = fds.len(),
            "upgrade: executing the new binary"
        );
        notify::reloading();
        // Briefly: a stderr nobody reads must not hold the accept path up (lines still queued
        // are lost with the old image, and counted nowhere; the kernel backlog is not).
        roundhouse_log::flush(LOG_FLUSH);
        let err = upgrade::exec(&exe, &bytes, &fds);
        self.output.resume();
        format!("could not execute {}: {err}", exe.display())
    }

    /// The state an upgrade carries, fds by number (nothing is given up).
    pub(super) fn describe(
        &self,
        output: Vec<CarriedPipe>,
        client: Option<RawFd>,
    ) -> Result<State, String> {
        let now = Instant::now();
        let self_exe = self
            .surfaces
            .self_exe
            .clone()
            .ok_or("this primary does not know the binary it runs")?;
        let control = self
            .surfaces
            .control
            .as_ref()
            .map(|f| f.as_raw_fd())
            .ok_or("this primary has no control socket to carry")?;
        let slots = self
            .pool
            .slots()
            .iter()
            .map(|s| CarriedSlot {
                id: s.id,
                wanted: s.wanted,
                current: s.current,
                connections_total: s.counters.connections_total,
                requests_total: s.counters.requests_total,
                connections_lost: s.counters.connections_lost,
                restarts: s.counters.restarts,
                failures: s.failures,
                start: s.pending_start().map(|(at, restart)| CarriedStart {
                    in_ms: ms_until(at, now),
                    restart,
                }),
                reuse: s.reuse.iter().map(|l| l.as_raw_fd()).collect(),
                was_online: s.was_online,
                keys: s.keys.bytes().to_vec(),
            })
            .collect();
        let mut workers = Vec::new();
        for k in 0..self.pool.capacity() {
            let Some(w) = self.pool.get(k) else { continue };
            let life = match &w.life {
                Life::Spawned { exec, deadline } => CarriedLife::Spawned {
                    exec: exec.get_ref().as_raw_fd(),
                    in_ms: ms_until(*deadline, now),
                },
                Life::Starting { deadline } => CarriedLife::Starting {
                    in_ms: ms_until(*deadline, now),
                },
                Life::Online => CarriedLife::Online,
                Life::Draining { deadline } => CarriedLife::Draining {
                    in_ms: ms_until(*deadline, now),
                },
                Life::Dying { kill_at, why } => CarriedLife::Dying {
                    kill_in_ms: kill_at.map(|t| ms_until(t, now)),
                    why: why.to_string(),
                },
            };
            workers.push(CarriedWorker {
                key: k,
                slot: w.slot,
                pid: w.pid,
                role: role_str(w.role).into(),
                life,
                link: w.link.as_ref().map(|l| l.carry(now)),
                acked: w.acked,
                reported: [w.reported.accepted, w.reported.closed, w.reported.requests],
                online_ms_ago: w.online_at.map(|t| ms_since(t, now)),
                last_seen_ms_ago: ms_since(w.last_seen, now),
                skip_ms: w.skip_until.map(|t| ms_until(t, now)),
                recycle_at: w.recycle_at,
            });
        }
        let kernel_rr = self.kernel_rr.as_ref().map(|kr| {
            let (groups, baseline) = kr.carry();
            upgrade::CarriedKernelRr {
                groups: groups
                    .into_iter()
                    .map(|g| upgrade::CarriedRrGroup {
                        fds: g.fds,
                        max_slots: g.max_slots,
                        members: g.members,
                    })
                    .collect(),
                baseline,
            }
        });
        Ok(State {
            version: upgrade::STATE_VERSION,
            written_by: format!("roundhouse {}", env!("CARGO_PKG_VERSION")),
            self_exe,
            log_json: upgrade::log_json(),
            config: self.cfg.clone(),
            exe: self.exe.clone(),
            uptime_ms: ms_since(self.started, now),
            addrs: self.addrs.clone(),
            accept: self
                .accept
                .on
                .iter()
                .map(|l| l.get_ref().as_raw_fd())
                .collect(),
            shared: self.shared.iter().map(|l| l.as_raw_fd()).collect(),
            admin: self.surfaces.admin.as_ref().map(|f| f.as_raw_fd()),
            control,
            control_path: self.surfaces.control_path.clone(),
            node_shim_written: self.surfaces.node_shim_written.clone(),
            next_conn_id: self.next_conn_id,
            held: self.dispatch.held().map(|c| c.carry(now)).collect(),
            peeking: self.peeking.iter().map(|p| p.conn().carry(now)).collect(),
            sticky_fallbacks: self.sticky_fallbacks,
            cursor: self.dispatch.cursor(),
            slots,
            workers,
            kernel_rr,
            any_online_ever: self.ops.any_online_ever,
            announced_ready: self.ops.announced_ready,
            output,
            client,
        })
    }

    /// In the new image: the primary the old one described, every fd adopted. Also returns the
    /// admin and control listeners (for the admin/control thread) and the client to answer.
    pub(crate) fn restore(
        state: State,
        requests: mpsc::Receiver<Request>,
        events: broadcast::Sender<Event>,
        spawner: Box<dyn crate::spawner::Spawner>,
    ) -> Result<Restored, RunError> {
        let now = Instant::now();
        let cfg = state.config;
        let listeners: Vec<TcpListener> = if cfg.policy.hands_off() {
            &state.accept
        } else {
            &state.shared
        }
        .iter()
        .map(|&fd| TcpListener::from(upgrade::adopt(fd)))
        .collect();
        let admin = state.admin.map(upgrade::adopt);
        let control = upgrade::adopt(state.control);
        let surfaces = Surfaces {
            self_exe: Some(state.self_exe.clone()),
            admin: admin.as_ref().map(OwnedFd::try_clone).transpose()?,
            control: Some(control.try_clone()?),
            control_path: state.control_path.clone(),
            node_shim_written: state.node_shim_written.clone(),
        };
        if let Some(shim) = &state.node_shim_written {
            crate::node::rewrite_shim(shim);
        }
        let mut p = Primary::new(
            cfg, state.exe, listeners, requests, events, spawner, surfaces,
        )?;
        // Not derived from `listeners`: under `reuseport` the primary keeps none of its own
        // (every slot has its own), and new slots bind theirs on these addresses.
        p.addrs = state.addrs;
        p.started = before(now, state.uptime_ms);
        p.next_conn_id = state.next_conn_id;
        p.sticky_fallbacks = state.sticky_fallbacks;
        for c in state.held {
            p.dispatch.hold(Conn::adopt(c, now));
        }
        for c in state.peeking {
            let conn = Conn::adopt(c, now);
            p.begin_peek(conn);
        }
        for s in state.slots {
            let idx = p.pool.slots.len();
            p.pool.slots.push(Slot {
                id: s.id,
                wanted: s.wanted,
                current: s.current,
                counters: Counters {
                    connections_total: s.connections_total,
                    requests_total: s.requests_total,
                    connections_lost: s.connections_lost,
                    restarts: s.restarts,
                },
                failures: s.failures,
                start: None,
                reuse: s
                    .reuse
                    .into_iter()
                    .map(|fd| TcpListener::from(upgrade::adopt(fd)))
                    .collect(),
                was_online: s.was_online,
                keys: super::dispatch::KeySketch::from_bytes(&s.keys),
            });
            if let Some(st) = s.start {
                p.pool
                    .request_start(idx, Duration::from_millis(st.in_ms), st.restart);
            }
        }
        let mut workers = Vec::with_capacity(state.workers.len());
        for w in state.workers {
            let life = match w.life {
                CarriedLife::Spawned { exec, in_ms } => Life::Spawned {
                    exec: crate::sys::register(upgrade::adopt(exec), Interest::READABLE)?,
                    deadline: after(now, in_ms),
                },
                CarriedLife::Starting { in_ms } => Life::Starting {
                    deadline: after(now, in_ms),
                },
                CarriedLife::Online => Life::Online,
                CarriedLife::Draining { in_ms } => Life::Draining {
                    deadline: after(now, in_ms),
                },
                CarriedLife::Dying { kill_in_ms, why } => Life::Dying {
                    kill_at: kill_in_ms.map(|ms| after(now, ms)),
                    why: Cow::Owned(why),
                },
            };
            let link = w.link.map(|l| Link::restore(l, now)).transpose()?;
            workers.push((
                w.key,
                Worker {
                    slot: w.slot,
                    pid: w.pid,
                    role: role_of(&w.role),
                    life,
                    link,
                    acked: w.acked,
                    reported: WireStats {
                        accepted: w.reported[0],
                        closed: w.reported[1],
                        requests: w.reported[2],
                    },
                    online_at: w.online_ms_ago.map(|ms| before(now, ms)),
                    last_seen: before(now, w.last_seen_ms_ago),
                    skip_until: w.skip_ms.map(|ms| after(now, ms)),
                    recycle_at: w.recycle_at,
                },
            ));
        }
        p.pool.restore(workers);
        p.ops.any_online_ever = state.any_online_ever;
        p.ops.announced_ready = state.announced_ready;
        if let Some(k) = state.kernel_rr {
            let groups = k
                .groups
                .into_iter()
                .map(|g| {
                    let fds = g.fds.map(upgrade::adopt);
                    (
                        roundhouse_bpf::RrCarry {
                            fds: g.fds,
                            max_slots: g.max_slots,
                            members: g.members,
                        },
                        fds,
                    )
                })
                .collect();
            p.kernel_rr =
                Some(kernel_rr::KernelRotation::adopt(groups, k.baseline).map_err(RunError::Bpf)?);
        }
        p.rebuild_rotation();
        p.dispatch.set_cursor(state.cursor);
        for pipe in state.output {
            let stream = if pipe.stderr {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            p.output.capture_with(
                pipe.id,
                pipe.pid,
                stream,
                upgrade::adopt(pipe.fd),
                pipe.partial,
            );
        }
        Ok(Restored {
            primary: p,
            admin: admin.map(TcpListener::from),
            control: std::os::unix::net::UnixListener::from(control),
            client: state.client.map(upgrade::adopt),
        })
    }

    /// The first thing the new image's loop does: reap what exited during the exec, answer the
    /// client that asked, tell systemd.
    pub(super) fn upgraded(&mut self, client: Option<OwnedFd>) {
        self.reap();
        let held = self.dispatch.held_len() + self.peeking.len();
        let inflight: usize = self
            .pool
            .workers()
            .filter_map(|w| w.link.as_ref())
            .map(Link::unacked)
            .sum();
        let workers = self.pool.workers().count();
        let pid = std::process::id();
        info!(
            pid,
            workers,
            held,
            inflight,
            version = env!("CARGO_PKG_VERSION"),
            "upgraded: roundhouse {} serving (same pid, {workers} workers carried)",
            env!("CARGO_PKG_VERSION")
        );
        if let Some(c) = client {
            let line = serde_json::json!({
                "ok": true,
                "pid": pid,
                "version": env!("CARGO_PKG_VERSION"),
                "workers": workers,
            })
            .to_string()
                + "\n";
            let mut f = std::fs::File::from(c);
            let _ = std::io::Write::write_all(&mut f, line.as_bytes());
        }
        notify::notify(&format!("READY=1\nMAINPID={pid}"));
        if self.ops.announced_ready {
            return;
        }
        warn!("upgraded before every first worker was online");
    }
}

/// What [`Primary::restore`] gives back besides the primary.
pub(crate) struct Restored {
    pub(crate) primary: Primary,
    pub(crate) admin: Option<TcpListener>,
    pub(crate) control: std::os::unix::net::UnixListener,
    pub(crate) client: Option<OwnedFd>,
}
