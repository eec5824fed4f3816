//! The primary's owner task: one loop that owns every worker, listener and counter, in rooms.
//!
//! # Theory of operation
//!
//! Everything that happens to the primary arrives here as a wake-up of one `poll_fn`
//! ([`Primary::poll_wake`]): an API request (admin, control, signals, an embedding program), a
//! child exit (`SIGCHLD`), the housekeeping tick, a worker's exec-status pipe, a worker channel
//! becoming readable or writable again, a listener with connections waiting, or workers due to
//! be started. Nothing else touches the state, so there are no locks; readers get snapshots.
//! Each wake-up is handled by one room, then [`Primary::settle`] rebuilds the rotation if a
//! worker came or went and hands out what is held. No handler calls back into dispatch: a room
//! that retires a worker only marks the rotation dirty.
//!
//! The rooms, each in its own file, with types at their borders:
//! - **loop** (this file): the wake-ups, the accept path, reading worker frames.
//! - **dispatch** ([`dispatch`]): the held queue, the rotation, the least-conn heap. Pure.
//! - **link** ([`link`]): one worker's channel, its codec (roundhouse or Node), the connections
//!   in flight on it and its outbox; every write goes through the reactor's readiness.
//! - **lifecycle** ([`lifecycle`]): worker states as an enum whose variants carry their
//!   deadlines, starting (fork without waiting for `execve`), the one `retire` path, reaping,
//!   restart backoff.
//! - **operations** ([`ops`]): stop, the reload queue, recycle, scale, statistics.
//!
//! The hot path is `accept_from` → `dispatch` → `flush`: accept until `EAGAIN` into the bounded
//! held queue, assign each held connection to the next eligible worker (a per-worker batch, no
//! allocation), then one `sendmsg` per worker carrying up to 32 fds. Under load ([`pace`]: a
//! burst of 12 or more) the next burst waits until 500 µs after this one started, so that
//! connections are taken, handed and acknowledged in batches rather than a wake-up each. The
//! primary keeps its copy of every fd in the worker's window until the worker acknowledges it,
//! so a worker that dies or refuses before acknowledging costs the client nothing: the
//! connection goes back to the front of the held queue and on to the next worker.

#![forbid(unsafe_code)]

mod carry;
mod dispatch;
mod frames;
mod kernel_rr;
mod lifecycle;
mod link;
mod ops;
mod pace;
mod peek;
mod pool;

use std::ffi::OsString;
use std::future::poll_fn;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use roundhouse_proto::frame::FrameError;
use roundhouse_proto::{CONNS_MAX, MAX_FRAME};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, error, info, warn};

use crate::api::Request;
use crate::config::{Config, Policy};
use crate::events::Event;
use crate::RunError;

pub(crate) use carry::Surfaces;
use dispatch::Dispatch;
use ops::Ops;
use pool::{Life, Pool, Retire, Worker};

/// Connections the primary holds while no worker can take them; past this it stops accepting
/// and the kernel backlog holds the rest.
pub(crate) const MAX_HELD: usize = 1024;
/// Frames read from a worker that has just exited (its last words).
const READ_ON_EXIT: usize = 1024;
/// Connections accepted per listener per wake-up, so acks and exits are not starved.
const ACCEPT_BURST: usize = 256;
/// Frames read from one worker per wake-up.
const READ_BURST: usize = 64;
/// Housekeeping tick: timeouts, restarts, retries.
const TICK: Duration = Duration::from_millis(50);
/// Pause after `accept` fails for lack of fds (EMFILE and friends), unless an fd of ours closes
/// first (a worker acknowledges a connection, a worker goes away).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Longest a sticky connection waits for its own worker while that worker is online but busy,
/// before it goes to its key's next choice.
const STICKY_WAIT: Duration = Duration::from_secs(1);
/// How long a worker that refused a connection while online is skipped.
const REFUSE_COOLDOWN: Duration = Duration::from_millis(100);
/// How long a worker is skipped after `sendmsg` said too many fds are in flight.
const TOO_MANY_REFS_COOLDOWN: Duration = Duration::from_millis(10);

/// A connection the primary has accepted and still owns a copy of.
pub(crate) struct Conn {
    id: u64,
    stream: TcpStream,
    listener: u16,
    peer: SocketAddr,
    /// When it was last handed to a worker (for the ack deadline).
    sent_at: Instant,
    /// `sticky`: its affinity key.
    key: u64,
}

/// A worker broke the protocol: it is killed and replaced.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProtocolError {
    #[error("sent an oversized frame")]
    Oversized,
    #[error("sent fds (control data truncated)")]
    FdsTruncated,
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Node(String),
    #[error("sent READY twice")]
    ReadyTwice,
    #[error("{verb} connection {id}, which it does not hold")]
    UnknownConnection { verb: &'static str, id: u64 },
    #[error("reported counters that went backwards")]
    CountersBackwards,
}

enum Wake {
    Request(Request),
    RequestsClosed,
    Child,
    Tick,
    Exec(usize),
    Readable(usize),
    Writable(usize),
    Accept(usize),
    Peek(usize),
    Start,
    /// The pre-flight of an upgrade answered.
    Upgrade(Result<String, String>),
}

/// The listeners the primary accepts on (handoff policies) and the fd-exhaustion pause.
struct Accept {
    on: Vec<AsyncFd<TcpListener>>,
    paused_until: Option<Instant>,
    /// An fd-exhaustion episode is running (logged once, and once when it ends): since when the
    /// last `accept` failed for lack of fds. It ends at a drained backlog at least
    /// [`ACCEPT_BACKOFF`] after the last failure, or after a second of accepting without one.
    starved: Option<Instant>,
    /// An `accept` worked since the last failure of the episode: it returned a connection, or
    /// found the backlog empty.
    accept_worked_since_starved: bool,
}

pub(crate) struct Primary {
    cfg: Config,
    exe: PathBuf,
    started: Instant,
    /// Bound addresses, in `-l` order.
    addrs: Vec<SocketAddr>,
    accept: Accept,
    /// `none`: listeners every worker receives; `reuseport`: the primary's first binds, closed
    /// once the slots have their own.
    shared: Vec<TcpListener>,
    dispatch: Dispatch<Conn>,
    /// `reuseport-rr`: the rotation chosen in the kernel.
    kernel_rr: Option<kernel_rr::KernelRotation>,
    /// A worker came or went (or its state changed): rebuild the rotation before dispatching.
    rotation_dirty: bool,
    pool: Pool,
    ops: Ops,
    /// Forks, signals and reaps workers (real processes, or a test's threads).
    spawner: Box<dyn crate::spawner::Spawner>,
    /// Where workers' stdout and stderr go: the output thread, into the log.
    output: crate::output::Output,
    next_conn_id: u64,
    /// Workers with a batch assigned in this dispatch round.
    dirty: Vec<usize>,
    /// `sticky` with a `header:` key: connections whose request head is awaited.
    peeking: Vec<peek::Peeking>,
    /// ... and how many got the address key instead.
    sticky_fallbacks: u64,
    requests: mpsc::Receiver<Request>,
    requests_open: bool,
    events: broadcast::Sender<Event>,
    sigchld: tokio::signal::unix::Signal,
    tick: tokio::time::Interval,
    last_drop_warning: Option<Instant>,
    fatal: Option<RunError>,
    scratch: Vec<u8>,
    recv_buf: Box<[u8]>,
    recv_fds: Vec<OwnedFd>,
    poll_start: usize,
    /// What an upgrade needs besides the loop's own state.
    surfaces: Surfaces,
    /// An upgrade whose pre-flight runs.
    upgrade: Option<carry::Pending>,
}

impl Primary {
    pub(crate) fn new(
        cfg: Config,
        exe: PathBuf,
        listeners: Vec<TcpListener>,
        requests: mpsc::Receiver<Request>,
        events: broadcast::Sender<Event>,
        spawner: Box<dyn crate::spawner::Spawner>,
        surfaces: Surfaces,
    ) -> io::Result<Self> {
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<io::Result<_>>()?;
        let mut on = Vec::new();
        let mut shared = Vec::new();
        if cfg.policy.hands_off() {
            for l in listeners {
                on.push(crate::sys::register(l, Interest::READABLE)?);
            }
        } else {
            shared = listeners;
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Primary {
            exe,
            started: Instant::now(),
            addrs,
            accept: Accept {
                on,
                paused_until: None,
                starved: None,
                accept_worked_since_starved: false,
            },
            shared,
            dispatch: Dispatch::new(cfg.policy == Policy::LeastConn, MAX_HELD),
            kernel_rr: None,
            rotation_dirty: false,
            pool: Pool::default(),
            ops: Ops::default(),
            spawner,
            output: crate::output::Output::start()?,
            next_conn_id: 1,
            dirty: Vec::with_capacity(64),
            peeking: Vec::new(),
            sticky_fallbacks: 0,
            requests,
            requests_open: true,
            events,
            sigchld: signal(SignalKind::child())?,
            tick,
            last_drop_warning: None,
            fatal: None,
            scratch: Vec::with_capacity(MAX_FRAME),
            recv_buf: vec![0u8; MAX_FRAME].into_boxed_slice(),
            recv_fds: Vec::with_capacity(CONNS_MAX + 8),
            poll_start: 0,
            surfaces,
            upgrade: None,
            cfg,
        })
    }

    pub(crate) async fn run(mut self) -> Result<(), RunError> {
        for addr in &self.addrs {
            info!(listener.addr = %addr, "listening");
        }
        for id in 1..=self.cfg.workers {
            self.add_slot(id)?;
            self.pool
                .request_start((id - 1) as usize, Duration::ZERO, false);
        }
        if self.cfg.policy == Policy::ReusePortRr {
            let first = &self.pool.slots()[0].reuse;
            self.kernel_rr = Some(kernel_rr::KernelRotation::new(first).map_err(RunError::Bpf)?);
        }
        if self.cfg.policy == Policy::ReusePort {
            if let Err(e) = kernel_rr::attach_migration(&self.pool.slots()[0].reuse) {
                warn!(
                    "reuseport: connections queued on a removed worker's listener will be reset                      on scale-down (the migration program could not be attached: {e})"
                );
            }
        }
        if self.cfg.policy.per_slot_listeners() {
            // Every slot has its own listeners now; the primary's must leave the group (the
            // kernel would queue connections on them that nobody accepts).
            self.shared.clear();
        }
        self.serve().await
    }

    /// The new image of an upgrade: goes on where the old one stopped.
    pub(crate) async fn run_upgraded(mut self, client: Option<OwnedFd>) -> Result<(), RunError> {
        self.upgraded(client);
        self.serve().await
    }

    async fn serve(mut self) -> Result<(), RunError> {
        loop {
            let wake = poll_fn(|cx| self.poll_wake(cx)).await;
            match wake {
                Wake::Request(r) => self.on_request(r),
                Wake::RequestsClosed => {
                    self.requests_open = false;
                    self.begin_stop(None);
                }
                Wake::Child => self.reap(),
                Wake::Tick => self.on_tick(),
                Wake::Exec(k) => self.resolve_exec(k),
                Wake::Readable(k) => self.read_worker(k, READ_BURST, false),
                Wake::Writable(k) => self.on_writable(k),
                Wake::Accept(i) => {
                    let (started, first) = (Instant::now(), self.next_conn_id);
                    self.accept_from(i);
                    // Under load, batch (see `pace`): hand this burst out, then let the next
                    // one gather.
                    let taken = self.next_conn_id - first;
                    if let Some(pause) = pace::after_burst(taken, started, Instant::now()) {
                        self.settle();
                        std::thread::sleep(pause);
                    }
                }
                Wake::Peek(i) => self.on_peek(i),
                Wake::Upgrade(r) => self.on_upgrade_checked(r),
                Wake::Start => {
                    self.run_due_starts();
                    // Starting is the one wake-up that needs no I/O readiness, so it could stay
                    // ready turn after turn without the task ever yielding: the reactor would
                    // not be polled and no connection accepted until every start is done. Yield
                    // after each burst so the runtime polls the reactor.
                    tokio::task::yield_now().await;
                }
            }
            self.settle();
            if let Some(e) = self.fatal.take() {
                self.kill_all();
                return Err(e);
            }
            if self.ops.stopping() && self.pool.is_empty() {
                self.ops.finish_stop();
                info!("all workers stopped");
                return Ok(());
            }
        }
    }

    // ----- waking up ---------------------------------------------------------------------

    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        if self.requests_open {
            match self.requests.poll_recv(cx) {
                Poll::Ready(Some(r)) => return Poll::Ready(Wake::Request(r)),
                Poll::Ready(None) => return Poll::Ready(Wake::RequestsClosed),
                Poll::Pending => {}
            }
        }
        if self.sigchld.poll_recv(cx).is_ready() {
            return Poll::Ready(Wake::Child);
        }
        if let Some(p) = &mut self.upgrade {
            if let Poll::Ready(r) = p.poll_checked(cx) {
                return Poll::Ready(Wake::Upgrade(r));
            }
        }
        if self.tick.poll_tick(cx).is_ready() {
            return Poll::Ready(Wake::Tick);
        }
        // Worker channels, starting from a rotating index so none is starved.
        let n = self.pool.capacity();
        for j in 0..n {
            let k = (self.poll_start + j) % n;
            let Some(w) = self.pool.get(k) else { continue };
            if let Life::Spawned { exec, .. } = &w.life {
                if exec.poll_read_ready(cx).is_ready() {
                    return Poll::Ready(Wake::Exec(k));
                }
            }
            let Some(link) = &w.link else { continue };
            if link.poll_read_ready(cx) {
                self.poll_start = k + 1;
                return Poll::Ready(Wake::Readable(k));
            }
            if link.poll_write_ready(cx) {
                return Poll::Ready(Wake::Writable(k));
            }
        }
        for (i, p) in self.peeking.iter().enumerate() {
            if p.poll_ready(cx) {
                return Poll::Ready(Wake::Peek(i));
            }
        }
        if self.can_accept() {
            for (i, l) in self.accept.on.iter().enumerate() {
                if l.poll_read_ready(cx).is_ready() {
                    return Poll::Ready(Wake::Accept(i));
                }
            }
        }
        // Last: starting workers never delays a connection that is waiting.
        if self.pool.starts_due() && !self.ops.stopping() {
            return Poll::Ready(Wake::Start);
        }
        Poll::Pending
    }

    pub(crate) fn max_memory(&self) -> Option<u64> {
        self.cfg.max_memory
    }

    fn can_accept(&self) -> bool {
        !self.ops.stopping()
            && self.dispatch.can_hold()
            && self.peeking.len() < MAX_HELD
            && self.accept.paused_until.is_none()
    }

    // ----- sticky keys from a request header ---------------------------------------------

    /// Whether connections wait for their request head (`sticky`, `header:` key).
    pub(super) fn peeks(&self) -> bool {
        self.cfg.policy == Policy::Sticky
            && matches!(self.cfg.sticky_key, crate::config::StickyKey::Header(_))
    }

    fn begin_peek(&mut self, conn: Conn) {
        match peek::Peeking::new(conn) {
            Ok(p) => self.peeking.push(p),
            Err((conn, e)) => {
                debug!("could not wait for a request head: {e}");
                self.sticky_fallbacks += 1;
                self.dispatch.hold(conn);
            }
        }
    }

    fn on_peek(&mut self, i: usize) {
        let crate::config::StickyKey::Header(name) = &self.cfg.sticky_key else {
            return;
        };
        let p = self.peeking.swap_remove(i);
        match p.peek(name, &mut self.recv_buf) {
            (Some(p), _) => self.peeking.push(p),
            (None, peek::Peeked::Key(c)) => self.dispatch.hold(c),
            (None, peek::Peeked::Fallback(c)) => {
                self.sticky_fallbacks += 1;
                self.dispatch.hold(c)
            }
            (None, peek::Peeked::Pending) => {}
        }
    }

    /// Gives up on heads not complete in time (or on every one, at a stop): address keys.
    pub(super) fn expire_peeks(&mut self, now: Option<Instant>) {
        let mut i = 0;
        while i < self.peeking.len() {
            if now.is_none_or(|t| self.peeking[i].expired(t)) {
                let c = self.peeking.swap_remove(i).fallback();
                self.sticky_fallbacks += 1;
                self.dispatch.hold(c);
            } else {
                i += 1;
            }
        }
    }

    /// After every wake-up: the rotation follows the workers' states, and what is held goes out.
    fn settle(&mut self) {
        self.dispatch();
    }

    // ----- the hot path ------------------------------------------------------------------

    fn accept_from(&mut self, i: usize) {
        let listener_index = i as u16;
        let now = Instant::now();
        let sticky = self.cfg.policy == Policy::Sticky;
        let peeks = self.peeks();
        for _ in 0..ACCEPT_BURST {
            if !self.dispatch.can_hold() {
                break;
            }
            match self.accept.on[i].try_io(Interest::READABLE, |l| l.accept()) {
                Ok((stream, peer)) => {
                    self.accept.accept_worked_since_starved = true;
                    let id = self.next_conn_id;
                    self.next_conn_id += 1;
                    let conn = Conn {
                        id,
                        stream,
                        listener: listener_index,
                        peer,
                        sent_at: now,
                        key: if sticky {
                            dispatch::ip_key(peer.ip())
                        } else {
                            0
                        },
                    };
                    if peeks {
                        self.begin_peek(conn);
                    } else {
                        self.dispatch.hold(conn);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept.accept_worked_since_starved = true;
                    // The backlog drained without running out of fds (and not just between
                    // two failures of a burst): the episode is over. (Drained sooner, the tick
                    // ends it a second after the last failure.)
                    if self
                        .accept
                        .starved
                        .is_some_and(|t| now.duration_since(t) >= ACCEPT_BACKOFF)
                    {
                        self.end_starvation();
                    }
                    break;
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        if self.accept.starved.is_none() {
                            warn!(listener.addr = %self.addrs[i], "could not accept: {e}; pausing accept until fds free up");
                        }
                        self.accept.starved = Some(now);
                        self.accept.accept_worked_since_starved = false;
                        self.accept.paused_until = Some(now + ACCEPT_BACKOFF);
                        break;
                    }
                    // The client went away before we accepted (ECONNABORTED) and similar
                    // per-connection errors: nothing to do but go on.
                    _ => debug!("accept: {e}"),
                },
            }
        }
    }

    /// Ends an fd-exhaustion episode (at a drained backlog, or a second without running out).
    fn end_starvation(&mut self) {
        if self.accept.starved.take().is_some() {
            info!("accepting again: fds available");
        }
    }

    /// One of our fds was closed: if accepting is paused for lack of fds, try again now.
    fn fds_freed(&mut self) {
        if self.accept.paused_until.is_some() {
            self.accept.paused_until = None;
        }
    }

    /// `reuseport-rr`: the kernel's rotation becomes the slots whose worker is online.
    fn sync_kernel_rotation(&mut self) {
        let Some(kr) = &mut self.kernel_rr else {
            return;
        };
        let pool = &self.pool;
        let online = pool.slots().iter().filter(|s| {
            s.current
                .and_then(|k| pool.get(k))
                .is_some_and(|w| matches!(w.life, Life::Online))
        });
        if let Err(e) = kr.sync(online.map(|s| (s.id, s.reuse.as_slice()))) {
            error!("could not update the reuseport-rr rotation: {e}");
        }
    }

    fn rebuild_rotation(&mut self) {
        self.rotation_dirty = false;
        self.sync_kernel_rotation();
        let policy = self.cfg.policy;
        let pool = &self.pool;
        self.dispatch.set_rotation(
            pool.slots()
                .iter()
                .filter_map(|s| Some((s.current?, s.id)))
                .filter(|&(k, _)| pool.get(k).is_some_and(|w| matches!(w.life, Life::Online)))
                .map(|(k, id)| (k, pool.get(k).map_or(0, |w| w.load(policy)), id)),
        );
    }

    /// Hands held connections to eligible workers, then flushes the batches.
    fn dispatch(&mut self) {
        let policy = self.cfg.policy;
        loop {
            if self.rotation_dirty {
                self.rebuild_rotation();
            }
            if self.dispatch.held_len() == 0 || self.dispatch.rotation().is_empty() {
                return;
            }
            let now = Instant::now();
            // The wanted slots are 1..=cfg.workers (scale keeps it so).
            let sticky_slots = (policy == Policy::Sticky).then_some(self.cfg.workers);
            // Under sticky, a connection whose worker is online but busy right now (a Node
            // worker with a handle in flight, a full window) waits for it in the held queue,
            // where it does not hold up the others; after STICKY_WAIT it goes to its key's next
            // choice.
            let mut at = 0;
            loop {
                let pool = &self.pool;
                let eligible = |k| pool.get(k).is_some_and(|w: &Worker| w.can_take(now));
                let picked = match (sticky_slots, self.dispatch.held_at(at)) {
                    (Some(n), Some(c)) => {
                        let (key, may_wait) = (c.key, now.duration_since(c.sent_at) < STICKY_WAIT);
                        match self.dispatch.pick_sticky(key, n, eligible, may_wait) {
                            dispatch::Sticky::To(k) => Some(k),
                            dispatch::Sticky::Wait => {
                                at += 1;
                                continue;
                            }
                            dispatch::Sticky::Nobody => None,
                        }
                    }
                    (Some(_), None) => None,
                    (None, _) => self.dispatch.pick(eligible),
                };
                let Some(k) = picked else {
                    break;
                };
                let Some(conn) = self.dispatch.take_held(at) else {
                    break;
                };
                let w = self.pool.get_mut(k).expect("picked a live worker");
                let link = w.link.as_mut().expect("an eligible worker has a link");
                if link.assign(conn) {
                    self.dirty.push(k);
                }
                let full = link.batch_full();
                self.dispatch.set_load(k, w.load(policy));
                if full && self.flush(k) {
                    // Connections went back to the front: look again from there.
                    at = 0;
                }
                if self.dispatch.held_len() == 0 {
                    break;
                }
            }
            let mut requeued = false;
            while let Some(k) = self.dirty.pop() {
                requeued |= self.flush(k);
            }
            if !requeued {
                return;
            }
        }
    }

    /// Sends worker `k`'s batch. Returns true if connections went back to the held queue.
    fn flush(&mut self, k: usize) -> bool {
        let policy = self.cfg.policy;
        let Some(w) = self.pool.get_mut(k) else {
            return false;
        };
        let Some(link) = w.link.as_mut() else {
            return false;
        };
        if !link.has_batch() {
            return false;
        }
        let now = Instant::now();
        let err = match link.flush(&mut self.scratch, now) {
            Ok(()) => {
                self.dispatch.set_load(k, w.load(policy));
                return false;
            }
            Err(e) => {
                self.dispatch.give_back(link.take_batch());
                e
            }
        };
        self.dispatch.set_load(k, w.load(policy));
        match err {
            link::SendError::Blocked => {}
            link::SendError::TooManyRefs => w.skip_until = Some(now + TOO_MANY_REFS_COOLDOWN),
            link::SendError::Broken(e) => {
                warn!(
                    worker.id = w.slot,
                    worker.pid = w.pid,
                    "could not hand off to worker: {e}"
                );
                self.retire(k, Retire::Kill("its channel failed".into()));
            }
        }
        true
    }

    /// The environment every worker gets on top of the primary's.
    fn worker_env(&self, id: u32, listeners: usize) -> Vec<(OsString, OsString)> {
        let channel_fd = 3 + listeners;
        // Heartbeats at a quarter of the timeout (at most every 100 ms, at least every second),
        // so a healthy worker is never declared hung whatever --heartbeat-timeout is.
        let heartbeat_ms = self
            .cfg
            .heartbeat_timeout
            .map_or(1000, |t| (t.as_millis() / 4).clamp(100, 1000));
        let mut env: Vec<(OsString, OsString)> = vec![
            ("ROUNDHOUSE_WORKER_ID".into(), id.to_string().into()),
            ("ROUNDHOUSE_POLICY".into(), self.cfg.policy.as_str().into()),
            (
                "ROUNDHOUSE_HEARTBEAT_MS".into(),
                heartbeat_ms.to_string().into(),
            ),
            // How long a drain may take before the worker is killed (--grace), for workers
            // that pace their own shutdown (the Node shim tells the app by half of it).
            (
                "ROUNDHOUSE_GRACE_MS".into(),
                self.cfg.grace.as_millis().to_string().into(),
            ),
        ];
        if self.cfg.plain {
            // No channel: nothing to announce but the listeners.
        } else if self.cfg.node {
            env.extend(crate::node::worker_env(
                channel_fd,
                self.cfg.node_shim.as_deref(),
                &self.addrs,
                self.cfg.backlog,
            ));
        } else {
            env.push(("ROUNDHOUSE_FD".into(), channel_fd.to_string().into()));
        }
        if listeners > 0 {
            env.push(("LISTEN_FDS".into(), listeners.to_string().into()));
            let names: Vec<String> = (0..listeners).map(|i| format!("listen{i}")).collect();
            env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
        }
        // `--config`'s `env`, after roundhouse's own, which it never replaces.
        let ours: Vec<OsString> = env.iter().map(|(k, _)| k.clone()).collect();
        env.extend(
            self.cfg
                .env
                .iter()
                .filter(|(k, _)| !ours.contains(k))
                .cloned(),
        );
        env
    }
}
