//! The primary's owner task: one loop that owns every worker, listener and counter.
//!
//! Everything that happens to the primary arrives here as a wake-up of one `poll_fn`: an API
//! request (admin, control, signals, embedding program), a child exit (`SIGCHLD`), the
//! housekeeping tick, a worker channel becoming readable or writable again, or a listener with
//! connections waiting. Nothing else touches the state, so there are no locks; readers get
//! snapshots built on request.
//!
//! The hot path is `accept_from` → `dispatch` → `flush`: accept until `EAGAIN` into a bounded
//! queue (`held`), assign each held connection to the next eligible worker (a per-worker batch,
//! no allocation), then one `sendmsg` per worker carrying up to 32 fds. The primary keeps its copy
//! of every fd in the worker's `inflight` window until the worker acknowledges it, so a worker
//! that dies or refuses before acknowledging costs the client nothing: the connection goes back
//! to the front of `held` and on to the next worker.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::future::poll_fn;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use roundhouse_proto::frame::{self, Stats as WireStats};
use roundhouse_proto::{sys, ConnRecord, Recipient, WorkerFrame, CONNS_MAX, MAX_FRAME};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::api::{Request, Target};
use crate::config::{Config, Policy};
use crate::events::{Event, ExitInfo};
use crate::node::{NodeCodec, NodeEvent};
use crate::notify;
use crate::spawn::{self, SpawnError, SpawnSpec};
use crate::stats::{self, StatsSnapshot, Totals, WorkerState, WorkerStats};
use crate::RunError;

/// Unacknowledged handoffs per worker. Well below the ~1,040 fds in flight at which `sendmsg`
/// fails with `ETOOMANYREFS` for an unprivileged user, and below the ~278 frames a stalled
/// worker's channel holds.
pub(crate) const WINDOW: usize = 128;
/// Connections the primary holds while no worker can take them; past this it stops accepting
/// and the kernel backlog holds the rest.
pub(crate) const MAX_HELD: usize = 1024;
/// Bytes of messages queued for a worker that reads its channel slower than they come; past
/// this, new messages for it are dropped (with one warning per episode) instead of growing the
/// primary's memory.
pub(crate) const MAX_OUTBOX_BYTES: usize = 1 << 20;
/// A worker whose queued frames make no progress for this long does not read its channel: it is
/// killed.
const OUTBOX_STALL: Duration = Duration::from_secs(10);
/// Frames read from a worker that has just exited (its last words).
const READ_ON_EXIT: usize = 1024;
/// Connections accepted per listener per wake-up, so acks and exits are not starved.
const ACCEPT_BURST: usize = 256;
/// Frames read from one worker per wake-up.
const READ_BURST: usize = 64;
/// Housekeeping tick: timeouts, restarts, retries.
const TICK: Duration = Duration::from_millis(50);
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
/// How long a worker that refused a connection while online is skipped.
const REFUSE_COOLDOWN: Duration = Duration::from_millis(100);
/// Pause after `accept` fails for lack of fds (EMFILE and friends), instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A connection the primary has accepted and still owns a copy of.
struct Conn {
    id: u64,
    stream: TcpStream,
    listener: u16,
    peer: SocketAddr,
    /// When it was last handed to a worker (for the ack deadline).
    sent_at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WState {
    /// Spawned, not yet ready.
    Starting,
    /// Ready: takes connections.
    Online,
    /// Told to drain; takes no new connections.
    Draining,
    /// Killed or channel gone; waiting to be reaped.
    Dying,
}

impl WState {
    fn public(self) -> WorkerState {
        match self {
            WState::Starting => WorkerState::Starting,
            WState::Online => WorkerState::Online,
            WState::Draining | WState::Dying => WorkerState::Draining,
        }
    }
}

/// Why a worker is being replaced in a slot (so its exit is not treated as a crash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The slot's worker.
    Current,
    /// A new worker started by a reload or recycle, not yet online; the slot's current worker
    /// keeps serving until it is.
    Replacement,
    /// Drained away (reload, recycle, scale down or stop): its exit is expected.
    Retiring,
}

struct Worker {
    slot: u32,
    pid: u32,
    role: Role,
    chan: Option<AsyncFd<OwnedFd>>,
    /// `--node`: the channel is Node's IPC stream, spoken through this codec.
    node: Option<Box<NodeCodec>>,
    state: WState,
    /// Handed, not yet acknowledged (the primary's copies), oldest first.
    inflight: VecDeque<Conn>,
    /// Assigned in this dispatch round, not yet sent.
    batch: Vec<Conn>,
    write_blocked: bool,
    skip_until: Option<Instant>,
    /// Frames (Node: byte runs) waiting for the channel to become writable.
    outbox: VecDeque<Vec<u8>>,
    outbox_bytes: usize,
    /// Last time the outbox made progress while not empty (None when empty).
    outbox_since: Option<Instant>,
    /// Messages for this worker are being dropped (its outbox is over budget).
    dropping_messages: bool,
    /// Connections this worker acknowledged (handoff policies).
    acked: u64,
    /// Last cumulative counters the worker reported.
    reported: WireStats,
    online_at: Option<Instant>,
    last_seen: Instant,
    /// Ready deadline (Starting), grace deadline (Draining), SIGKILL deadline (Dying).
    deadline: Option<Instant>,
    sigkilled: bool,
    /// `least-conn` heap bookkeeping: position, load and last-pick stamp.
    lc_pos: usize,
    lc_load: u64,
    lc_seq: u64,
    /// Why a `Dying` worker that has not been SIGKILLed yet will be at its deadline.
    dying_reason: &'static str,
    recycle_at: Option<u64>,
}

impl Worker {
    fn clear_outbox(&mut self) {
        self.outbox.clear();
        self.outbox_bytes = 0;
        self.outbox_since = None;
    }
    fn queue(&mut self, f: Vec<u8>) {
        if self.outbox.is_empty() {
            self.outbox_since = Some(Instant::now());
        }
        self.outbox_bytes += f.len();
        self.outbox.push_back(f);
    }
    fn active(&self, policy: Policy) -> u64 {
        let opened = if policy.hands_off() {
            self.acked
        } else {
            self.reported.accepted
        };
        opened.saturating_sub(self.reported.closed)
    }
    fn eligible(&self, now: Instant) -> bool {
        self.state == WState::Online
            && !self.write_blocked
            && self.inflight.len() + self.batch.len() < WINDOW
            && self.skip_until.is_none_or(|t| t <= now)
            && self
                .node
                .as_ref()
                .is_none_or(|n| n.handle_in_flight().is_none() && self.batch.is_empty())
    }
}

#[derive(Default, Clone, Copy)]
struct Counters {
    connections_total: u64,
    requests_total: u64,
    connections_lost: u64,
    restarts: u64,
}

struct Slot {
    id: u32,
    /// False once scaled away; the slot disappears when its workers are gone.
    wanted: bool,
    current: Option<usize>,
    counters: Counters,
    /// Consecutive failed starts, for backoff.
    failures: u32,
    restart_at: Option<Instant>,
    /// `reuseport`: this slot's own listeners.
    reuse: Vec<TcpListener>,
    /// The slot's first worker has been online (for the `ready` line).
    was_online: bool,
}

struct Reload {
    queue: VecDeque<u32>,
    /// (slot id, new worker key) being brought online.
    step: Option<(u32, usize)>,
    replies: Vec<oneshot::Sender<Result<(), String>>>,
    /// A whole reload (SIGHUP / `roundhouse reload`: systemd is told), not a one-slot recycle.
    full: bool,
}

enum Phase {
    Running,
    Stopping {
        deadline: Instant,
        replies: Vec<oneshot::Sender<()>>,
    },
}

/// A message for a worker other than a connection handoff.
#[derive(Clone, Copy)]
enum Control<'a> {
    Drain,
    Message {
        from: u32,
        json: &'a [u8],
    },
    /// Node only: answer to a handle the app sent the primary.
    HandleAck,
}

enum Wake {
    Request(Request),
    RequestsClosed,
    Child,
    Tick,
    Readable(usize),
    Writable(usize),
    Accept(usize),
}

pub(crate) struct Primary {
    cfg: Config,
    exe: PathBuf,
    started: Instant,
    /// Bound addresses, in `-l` order.
    addrs: Vec<SocketAddr>,
    /// Handoff policies: listeners the primary accepts on.
    accept_on: Vec<AsyncFd<TcpListener>>,
    /// `none`: listeners every worker receives.
    shared: Vec<TcpListener>,
    slots: Vec<Slot>,
    workers: Vec<Option<Worker>>,
    free_keys: Vec<usize>,
    /// Online workers in slot order: the rotation.
    rotation: Vec<usize>,
    rr_cursor: usize,
    /// `least-conn`: indexed min-heap of the rotation's workers, and its search scratch.
    lc_heap: Vec<usize>,
    lc_search: std::collections::BinaryHeap<std::cmp::Reverse<((u64, u64), usize)>>,
    lc_seq: u64,
    held: VecDeque<Conn>,
    next_conn_id: u64,
    dirty: Vec<usize>,
    accept_paused_until: Option<Instant>,
    accept_error_logged: bool,
    requests: mpsc::Receiver<Request>,
    requests_open: bool,
    events: broadcast::Sender<Event>,
    sigchld: tokio::signal::unix::Signal,
    tick: tokio::time::Interval,
    phase: Phase,
    reload: Option<Reload>,
    announced_ready: bool,
    last_drop_warning: Option<Instant>,
    any_online_ever: bool,
    fatal: Option<RunError>,
    scratch: Vec<u8>,
    recv_buf: Box<[u8]>,
    recv_fds: Vec<OwnedFd>,
    poll_start: usize,
}

fn exit_info(status: WaitStatus) -> Option<ExitInfo> {
    match status {
        WaitStatus::Exited(_, code) => Some(ExitInfo::Code(code)),
        WaitStatus::Signaled(_, sig, _) => Some(ExitInfo::Signal(sig as i32)),
        _ => None,
    }
}

impl Primary {
    pub(crate) fn new(
        cfg: Config,
        exe: PathBuf,
        listeners: Vec<TcpListener>,
        requests: mpsc::Receiver<Request>,
        events: broadcast::Sender<Event>,
    ) -> io::Result<Self> {
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<io::Result<_>>()?;
        let mut accept_on = Vec::new();
        let mut shared = Vec::new();
        match cfg.policy {
            Policy::RoundRobin | Policy::LeastConn => {
                for l in listeners {
                    accept_on.push(register(l, Interest::READABLE)?);
                }
            }
            Policy::None => shared = listeners,
            // Slot listeners are bound per slot on the real ports; the primary's own sockets
            // must not stay in the reuseport group (the kernel would queue connections on them
            // that nobody accepts), so they are closed once slot 1 has its own.
            Policy::ReusePort => shared = listeners,
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Primary {
            exe,
            started: Instant::now(),
            addrs,
            accept_on,
            shared,
            slots: Vec::new(),
            workers: Vec::new(),
            free_keys: Vec::new(),
            rotation: Vec::new(),
            rr_cursor: 0,
            lc_heap: Vec::new(),
            lc_search: std::collections::BinaryHeap::new(),
            lc_seq: 0,
            held: VecDeque::with_capacity(MAX_HELD),
            next_conn_id: 1,
            dirty: Vec::with_capacity(64),
            accept_paused_until: None,
            accept_error_logged: false,
            requests,
            requests_open: true,
            events,
            sigchld: signal(SignalKind::child())?,
            tick,
            phase: Phase::Running,
            reload: None,
            announced_ready: false,
            last_drop_warning: None,
            any_online_ever: false,
            fatal: None,
            scratch: Vec::with_capacity(MAX_FRAME),
            recv_buf: vec![0u8; MAX_FRAME].into_boxed_slice(),
            recv_fds: Vec::with_capacity(CONNS_MAX + 8),
            poll_start: 0,
            cfg,
        })
    }

    pub(crate) async fn run(mut self) -> Result<(), RunError> {
        for addr in &self.addrs {
            info!(listener.addr = %addr, "listening");
        }
        for id in 1..=self.cfg.workers {
            self.add_slot(id)?;
        }
        for i in 0..self.slots.len() {
            self.start_worker(i, Role::Current);
            if let Some(e) = self.fatal.take() {
                self.kill_all();
                return Err(e);
            }
        }
        if self.cfg.policy == Policy::ReusePort {
            self.shared.clear();
        }
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
                Wake::Readable(k) => self.read_worker(k, READ_BURST, false),
                Wake::Writable(k) => self.on_writable(k),
                Wake::Accept(i) => self.accept_from(i),
            }
            if let Some(e) = self.fatal.take() {
                self.kill_all();
                return Err(e);
            }
            if let Phase::Stopping { .. } = self.phase {
                if self.workers.iter().all(Option::is_none) {
                    if let Phase::Stopping { replies, .. } =
                        std::mem::replace(&mut self.phase, Phase::Running)
                    {
                        for r in replies {
                            let _ = r.send(());
                        }
                    }
                    info!("all workers stopped");
                    return Ok(());
                }
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
        if self.tick.poll_tick(cx).is_ready() {
            return Poll::Ready(Wake::Tick);
        }
        // Worker channels, starting from a rotating index so none is starved.
        let n = self.workers.len();
        for j in 0..n {
            let k = (self.poll_start + j) % n.max(1);
            let Some(w) = &self.workers[k] else { continue };
            let Some(chan) = &w.chan else { continue };
            if let Poll::Ready(r) = chan.poll_read_ready(cx) {
                self.poll_start = k + 1;
                // An error is seen by the read itself.
                let _ = r;
                return Poll::Ready(Wake::Readable(k));
            }
            if w.write_blocked && chan.poll_write_ready(cx).is_ready() {
                return Poll::Ready(Wake::Writable(k));
            }
        }
        if self.can_accept() {
            for (i, l) in self.accept_on.iter().enumerate() {
                if l.poll_read_ready(cx).is_ready() {
                    return Poll::Ready(Wake::Accept(i));
                }
            }
        }
        Poll::Pending
    }

    fn can_accept(&self) -> bool {
        matches!(self.phase, Phase::Running)
            && self.held.len() < MAX_HELD
            && self.accept_paused_until.is_none()
    }

    // ----- the hot path ------------------------------------------------------------------

    fn accept_from(&mut self, i: usize) {
        let listener_index = i as u16;
        let now = Instant::now();
        for _ in 0..ACCEPT_BURST {
            if self.held.len() >= MAX_HELD {
                break;
            }
            match self.accept_on[i].try_io(Interest::READABLE, |l| l.accept()) {
                Ok((stream, peer)) => {
                    let id = self.next_conn_id;
                    self.next_conn_id += 1;
                    self.held.push_back(Conn {
                        id,
                        stream,
                        listener: listener_index,
                        peer,
                        sent_at: now,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The backlog drained without running out of fds: the episode is over.
                    if self.accept_error_logged {
                        info!(listener.addr = %self.addrs[i], "accepting again: fds available");
                        self.accept_error_logged = false;
                    }
                    break;
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        if !self.accept_error_logged {
                            warn!(listener.addr = %self.addrs[i], "could not accept: {e}; pausing accept until fds free up");
                            self.accept_error_logged = true;
                        }
                        self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                        break;
                    }
                    // The client went away before we accepted (ECONNABORTED) and similar
                    // per-connection errors: nothing to do but go on.
                    _ => debug!("accept: {e}"),
                },
            }
        }
        self.dispatch();
    }

    /// Hands held connections to eligible workers, then flushes the batches.
    fn dispatch(&mut self) {
        loop {
            if self.held.is_empty() || self.rotation.is_empty() {
                return;
            }
            let now = Instant::now();
            while let Some(k) = self.pick(now) {
                let Some(conn) = self.held.pop_front() else {
                    break;
                };
                let w = self.workers[k]
                    .as_mut()
                    .expect("rotation holds live workers");
                if w.batch.is_empty() {
                    self.dirty.push(k);
                }
                w.batch.push(conn);
                if self.cfg.policy == Policy::LeastConn {
                    self.lc_seq += 1;
                    w.lc_seq = self.lc_seq;
                    self.lc_update(k);
                }
                let w = self.workers[k].as_mut().expect("picked a live worker");
                if (w.batch.len() == CONNS_MAX || w.node.is_some()) && self.flush(k) {
                    self.lc_update(k);
                }
                if self.held.is_empty() {
                    break;
                }
            }
            let mut requeued = false;
            while let Some(k) = self.dirty.pop() {
                if self.flush(k) {
                    requeued = true;
                    self.lc_update(k);
                }
            }
            if !requeued {
                return;
            }
        }
    }

    /// Chooses the worker for the next connection, or `None` if no worker can take one now.
    fn pick(&mut self, now: Instant) -> Option<usize> {
        let n = self.rotation.len();
        match self.cfg.policy {
            Policy::LeastConn => self.lc_pick(now),
            _ => {
                for j in 0..n {
                    let idx = (self.rr_cursor + j) % n;
                    let k = self.rotation[idx];
                    if self.workers[k].as_ref().is_some_and(|w| w.eligible(now)) {
                        self.rr_cursor = (idx + 1) % n;
                        return Some(k);
                    }
                }
                None
            }
        }
    }

    /// Sends worker `k`'s batch in one frame. Returns true if connections went back to `held`.
    fn flush(&mut self, k: usize) -> bool {
        let Some(w) = self.workers[k].as_mut() else {
            return false;
        };
        if w.batch.is_empty() {
            return false;
        }
        if w.node.is_some() {
            return self.flush_node(k);
        }
        self.scratch.clear();
        frame::encode_conns_header(&mut self.scratch, w.batch.len());
        let mut fds = [0 as RawFd; CONNS_MAX];
        for (i, c) in w.batch.iter().enumerate() {
            ConnRecord {
                id: c.id,
                listener: c.listener,
                peer: c.peer,
            }
            .encode(&mut self.scratch);
            fds[i] = c.stream.as_raw_fd();
        }
        let n = w.batch.len();
        let result = match &w.chan {
            Some(chan) => sys::send_frame(chan.get_ref().as_fd(), &self.scratch, &fds[..n]),
            None => Err(io::Error::from(io::ErrorKind::BrokenPipe)),
        };
        match result {
            Ok(_) => {
                let now = Instant::now();
                w.inflight.extend(w.batch.drain(..).map(|mut c| {
                    c.sent_at = now;
                    c
                }));
                false
            }
            Err(e) => {
                for c in w.batch.drain(..).rev() {
                    self.held.push_front(c);
                }
                match e.kind() {
                    io::ErrorKind::WouldBlock => w.write_blocked = true,
                    _ if e.raw_os_error() == Some(libc::ETOOMANYREFS) => {
                        w.skip_until = Some(Instant::now() + Duration::from_millis(10));
                    }
                    _ => {
                        let slot = w.slot;
                        warn!(
                            worker.id = slot,
                            worker.pid = w.pid,
                            "could not hand off to worker: {e}"
                        );
                        self.kill_worker(k, "its channel failed");
                    }
                }
                true
            }
        }
    }

    /// Node workers: one handle line per `sendmsg`, with exactly its fd, and no next handle
    /// until Node's child has answered (see node/README.md, section 5).
    fn flush_node(&mut self, k: usize) -> bool {
        let w = self.workers[k].as_mut().expect("live worker");
        let node = w.node.as_mut().expect("node worker");
        let c = &w.batch[0];
        let rec = ConnRecord {
            id: c.id,
            listener: c.listener,
            peer: c.peer,
        };
        self.scratch.clear();
        let sent = node.encode_conn(&mut self.scratch, &rec) && {
            let fd = c.stream.as_raw_fd();
            match &w.chan {
                Some(chan) => {
                    match sys::send_frame(chan.get_ref().as_fd(), &self.scratch, &[fd]) {
                        Ok(n) => {
                            if n < self.scratch.len() {
                                // The fd went with the first bytes; the rest follows alone.
                                w.queue(self.scratch[n..].to_vec());
                                w.write_blocked = true;
                            }
                            true
                        }
                        Err(e) => {
                            node.cancel_in_flight();
                            if e.kind() == io::ErrorKind::WouldBlock {
                                w.write_blocked = true;
                            } else {
                                w.chan = None;
                            }
                            false
                        }
                    }
                }
                None => {
                    node.cancel_in_flight();
                    false
                }
            }
        };
        if sent {
            let now = Instant::now();
            w.inflight.extend(w.batch.drain(..).map(|mut c| {
                c.sent_at = now;
                c
            }));
            return false;
        }
        for c in w.batch.drain(..).rev() {
            self.held.push_front(c);
        }
        if w.chan.is_none() {
            self.kill_worker(k, "its channel failed");
        }
        true
    }

    // ----- reading worker frames --------------------------------------------------------

    /// Reads and handles up to `burst` frames from worker `k`. `direct` reads without waiting
    /// for the reactor's readiness (used after an exit, before the reactor has seen the EOF).
    fn read_worker(&mut self, k: usize, burst: usize, direct: bool) {
        for _ in 0..burst {
            let Some(w) = self.workers[k].as_mut() else {
                return;
            };
            let Some(chan) = &w.chan else { return };
            let buf = &mut self.recv_buf;
            let fds = &mut self.recv_fds;
            let r = if direct {
                sys::recv_frame(chan.get_ref().as_fd(), buf, fds)
            } else {
                chan.try_io(Interest::READABLE, |fd| {
                    sys::recv_frame(fd.as_fd(), buf, fds)
                })
            };
            match r {
                Ok(meta) if meta.len == 0 => {
                    self.channel_closed(k);
                    return;
                }
                Ok(meta) if w.node.is_some() => {
                    w.last_seen = Instant::now();
                    // Fds from a Node worker come only with a handle the app sent us
                    // (`WorkerHandle`): close them at once.
                    self.recv_fds.clear();
                    let node = w.node.as_mut().expect("checked");
                    if let Err(why) = node.feed(&self.recv_buf[..meta.len]) {
                        self.protocol_error(k, &why);
                        return;
                    }
                    loop {
                        let Some(node) = self.workers[k].as_mut().and_then(|w| w.node.as_mut())
                        else {
                            return;
                        };
                        let Some(ev) = node.next_event() else { break };
                        if let Err(why) = ev.and_then(|ev| self.on_node_event(k, ev)) {
                            self.protocol_error(k, &why);
                            return;
                        }
                    }
                }
                Ok(meta) => {
                    w.last_seen = Instant::now();
                    if meta.truncated {
                        self.protocol_error(k, "sent an oversized frame");
                        return;
                    }
                    let nfds = self.recv_fds.len();
                    self.recv_fds.clear(); // a worker never sends fds: close any at once
                    if meta.fds_truncated {
                        self.protocol_error(k, "sent fds (control data truncated)");
                        return;
                    }
                    let len = meta.len;
                    let buf = std::mem::take(&mut self.recv_buf);
                    let result = frame::decode_worker_frame(&buf[..len], nfds)
                        .map_err(|e| e.to_string())
                        .and_then(|f| self.on_frame(k, f));
                    self.recv_buf = buf;
                    if let Err(why) = result {
                        self.protocol_error(k, &why);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    let (slot, pid) = (w.slot, w.pid);
                    warn!(
                        worker.id = slot,
                        worker.pid = pid,
                        "could not read worker channel: {e}"
                    );
                    self.channel_closed(k);
                    return;
                }
            }
        }
        self.dispatch();
    }

    fn on_frame(&mut self, k: usize, f: WorkerFrame<'_>) -> Result<(), String> {
        match f {
            WorkerFrame::Ready { .. } => self.on_ready(k),
            WorkerFrame::Ack(ids) => self.on_ids(k, false, ids.iter()),
            WorkerFrame::Refuse(ids) => self.on_ids(k, true, ids.iter()),
            WorkerFrame::Stats(s) => self.on_stats(k, s),
            WorkerFrame::Heartbeat => Ok(()),
            WorkerFrame::Message { to, json } => {
                let from = self.workers[k].as_ref().expect("live worker").slot;
                self.relay(from, to, json);
                Ok(())
            }
        }
    }

    fn on_node_event(&mut self, k: usize, ev: NodeEvent) -> Result<(), String> {
        match ev {
            NodeEvent::Ready => self.on_ready(k),
            NodeEvent::Ack(ids) => self.on_ids(k, false, ids.into_iter()),
            NodeEvent::Refuse(ids) => self.on_ids(k, true, ids.into_iter()),
            // The child never saw the connection (its fd did not arrive): as good as refused.
            NodeEvent::HandleNack(id) => self.on_ids(k, true, std::iter::once(id)),
            // The handle arrived; the shim's own ACK follows. The next handle may go now.
            NodeEvent::HandleAck(_) => Ok(()),
            NodeEvent::Stats(s) => self.on_stats(k, s),
            NodeEvent::Heartbeat => Ok(()),
            NodeEvent::Message { to, json } => {
                let from = self.workers[k].as_ref().expect("live worker").slot;
                self.relay(from, to, &json);
                Ok(())
            }
            // The app sent us a socket: its fd was closed on receipt; answer so that Node's
            // child stops queueing its later messages.
            NodeEvent::WorkerHandle => {
                self.send_control(k, Control::HandleAck);
                Ok(())
            }
        }
    }

    fn on_ready(&mut self, k: usize) -> Result<(), String> {
        if self.workers[k].as_ref().expect("live worker").state != WState::Starting {
            return Err("sent READY twice".into());
        }
        self.on_online(k);
        Ok(())
    }

    fn on_ids(
        &mut self,
        k: usize,
        refuse: bool,
        ids: impl Iterator<Item = u64>,
    ) -> Result<(), String> {
        for id in ids {
            let w = self.workers[k].as_mut().expect("live worker");
            // Acks come in handoff order, so the id is almost always at the front.
            let Some(pos) = w.inflight.iter().position(|c| c.id == id) else {
                return Err(format!(
                    "{} connection {id}, which it does not hold",
                    if refuse { "refused" } else { "acknowledged" }
                ));
            };
            let conn = w.inflight.remove(pos).expect("position is in range");
            if refuse {
                if w.state == WState::Online {
                    w.skip_until = Some(Instant::now() + REFUSE_COOLDOWN);
                }
                self.held.push_front(conn);
            } else {
                w.acked += 1;
                let slot_idx = (w.slot - 1) as usize;
                self.slots[slot_idx].counters.connections_total += 1;
                drop(conn); // the worker has its copy: close ours so its close() sends FIN
            }
        }
        self.lc_update(k);
        Ok(())
    }

    fn on_stats(&mut self, k: usize, s: WireStats) -> Result<(), String> {
        let result = self.apply_stats(k, s);
        self.lc_update(k);
        result
    }

    fn apply_stats(&mut self, k: usize, s: WireStats) -> Result<(), String> {
        let policy = self.cfg.policy;
        let w = self.workers[k].as_mut().expect("live worker");
        let slot_idx = (w.slot - 1) as usize;
        let prev = w.reported;
        if s.accepted < prev.accepted || s.closed < prev.closed || s.requests < prev.requests {
            return Err("reported counters that went backwards".into());
        }
        w.reported = s;
        let c = &mut self.slots[slot_idx].counters;
        c.requests_total += s.requests - prev.requests;
        if !policy.hands_off() {
            c.connections_total += s.accepted - prev.accepted;
        }
        // Recycle once past --max-requests; if a reload is running, retry at the next STATS.
        if let (Some(limit), WState::Online, None) = (w.recycle_at, w.state, &self.reload) {
            if s.requests >= limit {
                w.recycle_at = None;
                info!(
                    worker.id = w.slot,
                    worker.pid = w.pid,
                    requests = s.requests,
                    "worker reached --max-requests; recycling"
                );
                self.recycle(slot_idx);
            }
        }
        Ok(())
    }

    fn relay(&mut self, from: u32, to: Recipient, json: &[u8]) {
        if json.len() > frame::MAX_MESSAGE && to != Recipient::Primary {
            // Only a Node worker's line can be this long; it would not fit a native frame.
            warn!(
                worker.id = from,
                bytes = json.len(),
                "message too large to relay; dropped"
            );
            return;
        }
        match to {
            Recipient::Primary => {
                const LOGGED: usize = 1024;
                let text = String::from_utf8_lossy(&json[..json.len().min(LOGGED)]);
                let more = if json.len() > LOGGED { "…" } else { "" };
                let text = format!("{text}{more}");
                info!(worker.id = from, json = %text, "message from worker");
                if let Ok(value) = serde_json::from_slice(json) {
                    let _ = self.events.send(Event::Message {
                        from,
                        message: value,
                    });
                }
            }
            Recipient::Worker(id) => {
                if !self.message_slot(id, from, json) {
                    // Once a second at most: a flooding worker must not flood the log too.
                    let now = Instant::now();
                    if self
                        .last_drop_warning
                        .is_none_or(|t| now - t >= Duration::from_secs(1))
                    {
                        self.last_drop_warning = Some(now);
                        warn!(
                            worker.id = from,
                            to = id,
                            "message to unknown (or restarting) worker dropped"
                        );
                    }
                }
            }
            Recipient::All => {
                for id in 1..=self.slots.len() as u32 {
                    if id != from {
                        self.message_slot(id, from, json);
                    }
                }
            }
        }
    }

    /// Queues a MESSAGE for slot `id`'s worker. False if there is no such worker.
    fn message_slot(&mut self, id: u32, from: u32, json: &[u8]) -> bool {
        let Some(slot) = self.slots.get((id as usize).wrapping_sub(1)) else {
            return false;
        };
        let Some(k) = slot.current.filter(|_| slot.wanted) else {
            return false;
        };
        self.send_control(k, Control::Message { from, json });
        true
    }

    // ----- writing control frames -------------------------------------------------------

    /// Encodes a control message for worker `k`'s transport and sends or queues it.
    fn send_control(&mut self, k: usize, c: Control<'_>) {
        let Some(w) = self.workers[k].as_mut() else {
            return;
        };
        if w.chan.is_none() {
            return;
        }
        let is_message = matches!(c, Control::Message { .. });
        let mut f = Vec::new();
        if w.node.is_some() {
            match c {
                Control::Drain => NodeCodec::encode_drain(&mut f),
                Control::HandleAck => NodeCodec::encode_handle_ack(&mut f),
                Control::Message { from, json } => {
                    if let Err(e) = NodeCodec::encode_message(&mut f, from, json) {
                        warn!(worker.id = w.slot, "message not sent: {e}");
                        return;
                    }
                }
            }
        } else {
            match c {
                Control::Drain => frame::encode_drain(&mut f),
                Control::HandleAck => return,
                Control::Message { from, json } => {
                    frame::encode_message_to_worker(&mut f, from, json)
                }
            }
        }
        let Some(chan) = &w.chan else { return };
        if w.outbox.is_empty() && !w.write_blocked {
            match sys::send_frame(chan.get_ref().as_fd(), &f, &[]) {
                // Only a stream (Node) channel writes part of a message: queue the rest.
                Ok(n) if n < f.len() => {
                    f.drain(..n);
                    w.write_blocked = true;
                }
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => w.write_blocked = true,
                Err(e) => {
                    debug!(worker.id = w.slot, "control message not sent: {e}");
                    return;
                }
            }
        }
        if is_message && w.outbox_bytes + f.len() > MAX_OUTBOX_BYTES {
            if !w.dropping_messages {
                warn!(
                    worker.id = w.slot,
                    worker.pid = w.pid,
                    "worker reads its channel slower than messages arrive: dropping messages for it until it catches up"
                );
                w.dropping_messages = true;
            }
            return;
        }
        w.queue(f);
    }

    fn on_writable(&mut self, k: usize) {
        let Some(w) = self.workers[k].as_mut() else {
            return;
        };
        let Some(chan) = &w.chan else { return };
        while let Some(f) = w.outbox.front_mut() {
            match chan.try_io(Interest::WRITABLE, |fd| sys::send_frame(fd.as_fd(), f, &[])) {
                Ok(n) if n < f.len() => {
                    f.drain(..n);
                    w.outbox_bytes -= n;
                    w.outbox_since = Some(Instant::now());
                }
                Ok(n) => {
                    w.outbox.pop_front();
                    w.outbox_bytes -= n;
                    w.outbox_since = Some(Instant::now());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    w.clear_outbox();
                    break;
                }
            }
        }
        w.write_blocked = false;
        w.outbox_since = None;
        w.dropping_messages = false;
        self.dispatch();
    }

    // ----- worker lifecycle ---------------------------------------------------------------

    fn add_slot(&mut self, id: u32) -> Result<(), RunError> {
        let mut reuse = Vec::new();
        if self.cfg.policy == Policy::ReusePort {
            for addr in &self.addrs {
                reuse.push(
                    crate::listen::bind(*addr, self.cfg.backlog, true).map_err(RunError::Bind)?,
                );
            }
        }
        let idx = (id - 1) as usize;
        let slot = Slot {
            id,
            wanted: true,
            current: None,
            counters: Counters::default(),
            failures: 0,
            restart_at: None,
            reuse,
            was_online: false,
        };
        if idx < self.slots.len() {
            let old = &mut self.slots[idx];
            old.wanted = true;
            if old.reuse.is_empty() {
                old.reuse = slot.reuse;
            }
        } else {
            self.slots.push(slot);
        }
        Ok(())
    }

    /// Spawns a worker for slot index `idx`. Failures are logged and scheduled for retry (or are
    /// fatal if no worker was ever online and the command cannot be executed).
    fn start_worker(&mut self, idx: usize, role: Role) -> Option<usize> {
        let slot = &self.slots[idx];
        let id = slot.id;
        let pair = if self.cfg.node {
            sys::stream_pair()
        } else {
            sys::seqpacket_pair()
        };
        let (primary_end, child_end) = match pair.and_then(|(p, c)| {
            // The worker's end is its own open file description: make it blocking, as an
            // inherited fd normally is (protocol.md section 2); the primary's stays non-blocking.
            sys::set_blocking(&c)?;
            Ok((p, c))
        }) {
            Ok(p) => p,
            Err(e) => {
                error!(worker.id = id, "could not create a channel: {e}");
                self.schedule_restart(idx, false);
                return None;
            }
        };
        let listeners: Vec<&TcpListener> = match self.cfg.policy {
            Policy::None => self.shared.iter().collect(),
            Policy::ReusePort => slot.reuse.iter().collect(),
            _ => Vec::new(),
        };
        let mut fds: Vec<std::os::fd::BorrowedFd<'_>> =
            listeners.iter().map(|l| l.as_fd()).collect();
        fds.push(child_end.as_fd());
        let channel_fd = 3 + listeners.len();
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
        ];
        if self.cfg.node {
            env.extend(crate::node::worker_env(
                channel_fd,
                self.cfg.node_shim.as_deref(),
                &self.addrs,
                self.cfg.backlog,
            ));
        } else {
            env.push(("ROUNDHOUSE_FD".into(), channel_fd.to_string().into()));
        }
        if !listeners.is_empty() {
            env.push(("LISTEN_FDS".into(), listeners.len().to_string().into()));
            let names: Vec<String> = (0..listeners.len()).map(|i| format!("listen{i}")).collect();
            env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
        }
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
        let result = spawn::spawn(&spec);
        drop(fds);
        drop(child_end);
        let pid = match result {
            Ok(pid) => pid,
            Err(e) => {
                if matches!(e, SpawnError::Exec { .. }) && !self.any_online_ever {
                    error!("{e}");
                    self.fatal = Some(RunError::Spawn(e));
                    return None;
                }
                error!(worker.id = id, "{e}");
                self.schedule_restart(idx, false);
                return None;
            }
        };
        let chan = match register(primary_end, Interest::READABLE | Interest::WRITABLE) {
            Ok(c) => c,
            Err(e) => {
                error!(worker.id = id, "could not register the channel: {e}");
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                None?
            }
        };
        let now = Instant::now();
        let recycle_at = self.cfg.max_requests.map(|n| {
            // Jitter up to 10% so workers started together do not all recycle together.
            let jitter = (n / 10).max(1);
            n + (u64::from(pid) * 2654435761 % jitter)
        });
        let worker = Worker {
            slot: id,
            pid,
            role,
            chan: Some(chan),
            node: self.cfg.node.then(|| Box::new(NodeCodec::new())),
            state: WState::Starting,
            inflight: VecDeque::with_capacity(WINDOW),
            batch: Vec::with_capacity(CONNS_MAX),
            write_blocked: false,
            skip_until: None,
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            outbox_since: None,
            dropping_messages: false,
            acked: 0,
            reported: WireStats::default(),
            online_at: None,
            last_seen: now,
            deadline: Some(now + self.cfg.ready_timeout),
            sigkilled: false,
            lc_pos: usize::MAX,
            lc_load: 0,
            lc_seq: 0,
            dying_reason: "",
            recycle_at,
        };
        let k = match self.free_keys.pop() {
            Some(k) => {
                self.workers[k] = Some(worker);
                k
            }
            None => {
                self.workers.push(Some(worker));
                self.workers.len() - 1
            }
        };
        if role == Role::Current {
            self.slots[idx].current = Some(k);
        }
        info!(worker.id = id, worker.pid = pid, "worker started");
        let _ = self.events.send(Event::Fork { id, pid });
        Some(k)
    }

    fn on_online(&mut self, k: usize) {
        let now = Instant::now();
        let w = self.workers[k].as_mut().expect("live worker");
        w.state = WState::Online;
        w.online_at = Some(now);
        w.deadline = None;
        let (id, pid, role) = (w.slot, w.pid, w.role);
        info!(worker.id = id, worker.pid = pid, "worker online");
        let _ = self.events.send(Event::Online { id, pid });
        self.any_online_ever = true;
        let idx = (id - 1) as usize;
        self.slots[idx].was_online = true;
        if role == Role::Replacement {
            // A reload/recycle step: the new worker takes the slot, the old one drains — unless
            // the slot was scaled away meanwhile: then the newcomer goes too.
            if self.slots[idx].wanted {
                let old = self.slots[idx].current.replace(k);
                self.workers[k].as_mut().expect("live").role = Role::Current;
                if let Some(old) = old.filter(|&o| o != k) {
                    self.drain_worker(old);
                }
            } else {
                self.drain_worker(k);
            }
            if let Some(r) = &mut self.reload {
                if r.step.map(|(_, nk)| nk) == Some(k) {
                    r.step = None;
                    self.advance_reload();
                }
            }
        }
        self.rebuild_rotation();
        if !self.announced_ready && self.slots.iter().filter(|s| s.wanted).all(|s| s.was_online) {
            self.announced_ready = true;
            info!(workers = self.cfg.workers, "ready");
            notify::notify("READY=1");
        }
        self.dispatch();
    }

    fn rebuild_rotation(&mut self) {
        self.rotation.clear();
        for s in &self.slots {
            if let Some(k) = s.current {
                if self.workers[k]
                    .as_ref()
                    .is_some_and(|w| w.state == WState::Online)
                {
                    self.rotation.push(k);
                }
            }
        }
        if self.rr_cursor >= self.rotation.len() {
            self.rr_cursor = 0;
        }
        self.lc_rebuild();
    }

    // ----- least-conn: an indexed min-heap of online workers -----------------------------
    //
    // Keyed by (open + unacknowledged connections, time of last pick): the least loaded worker
    // first, and among equals the one picked longest ago (the rotation). Picking and every load
    // change cost O(log workers) and allocate nothing once the heap has grown; a worker that is
    // not eligible right now (full window, full channel) is stepped over by a best-first walk.

    fn lc_key(&self, k: usize) -> (u64, u64) {
        // A worker reaped since the last rebuild sorts last (and is not eligible).
        self.workers[k]
            .as_ref()
            .map_or((u64::MAX, u64::MAX), |w| (w.lc_load, w.lc_seq))
    }

    fn lc_load_of(&self, k: usize) -> u64 {
        let w = self.workers[k].as_ref().expect("live worker");
        w.active(self.cfg.policy) + (w.inflight.len() + w.batch.len()) as u64
    }

    fn lc_swap(&mut self, i: usize, j: usize) {
        self.lc_heap.swap(i, j);
        for at in [i, j] {
            let k = self.lc_heap[at];
            if let Some(w) = self.workers[k].as_mut() {
                w.lc_pos = at;
            }
        }
    }

    fn lc_sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.lc_key(self.lc_heap[i]) >= self.lc_key(self.lc_heap[parent]) {
                break;
            }
            self.lc_swap(i, parent);
            i = parent;
        }
    }

    fn lc_sift_down(&mut self, mut i: usize) {
        let n = self.lc_heap.len();
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if l < n && self.lc_key(self.lc_heap[l]) < self.lc_key(self.lc_heap[least]) {
                least = l;
            }
            if r < n && self.lc_key(self.lc_heap[r]) < self.lc_key(self.lc_heap[least]) {
                least = r;
            }
            if least == i {
                return;
            }
            self.lc_swap(i, least);
            i = least;
        }
    }

    /// Re-keys worker `k` after its load changed (no-op for other policies).
    fn lc_update(&mut self, k: usize) {
        if self.cfg.policy != Policy::LeastConn {
            return;
        }
        let Some(pos) = self.workers[k].as_ref().map(|w| w.lc_pos) else {
            return;
        };
        if pos >= self.lc_heap.len() || self.lc_heap[pos] != k {
            return;
        }
        let load = self.lc_load_of(k);
        self.workers[k].as_mut().expect("live").lc_load = load;
        self.lc_sift_up(pos);
        let pos = self.workers[k].as_ref().expect("live").lc_pos;
        self.lc_sift_down(pos);
    }

    fn lc_rebuild(&mut self) {
        if self.cfg.policy != Policy::LeastConn {
            return;
        }
        self.lc_heap.clear();
        for i in 0..self.rotation.len() {
            let k = self.rotation[i];
            let load = self.lc_load_of(k);
            let w = self.workers[k]
                .as_mut()
                .expect("rotation holds live workers");
            w.lc_load = load;
            w.lc_pos = self.lc_heap.len();
            self.lc_heap.push(k);
        }
        for i in (0..self.lc_heap.len() / 2).rev() {
            self.lc_sift_down(i);
        }
    }

    /// The eligible worker with the smallest key: best-first from the root, so ineligible
    /// workers near the top are stepped over without visiting the rest.
    fn lc_pick(&mut self, now: Instant) -> Option<usize> {
        use std::cmp::Reverse;
        let mut search = std::mem::take(&mut self.lc_search);
        search.clear();
        if !self.lc_heap.is_empty() {
            search.push(Reverse((self.lc_key(self.lc_heap[0]), 0)));
        }
        let mut found = None;
        while let Some(Reverse((_, i))) = search.pop() {
            let k = self.lc_heap[i];
            if self.workers[k].as_ref().is_some_and(|w| w.eligible(now)) {
                found = Some(k);
                break;
            }
            for c in [2 * i + 1, 2 * i + 2] {
                if c < self.lc_heap.len() {
                    search.push(Reverse((self.lc_key(self.lc_heap[c]), c)));
                }
            }
        }
        self.lc_search = search;
        found
    }

    /// Takes back every connection a worker has not acknowledged, oldest first.
    fn reclaim(&mut self, k: usize) {
        let Some(w) = self.workers[k].as_mut() else {
            return;
        };
        let batch: Vec<Conn> = w.batch.drain(..).collect();
        for c in batch.into_iter().chain(w.inflight.drain(..)).rev() {
            self.held.push_front(c);
        }
    }

    fn drain_worker(&mut self, k: usize) {
        let grace = self.cfg.grace;
        let Some(w) = self.workers[k].as_mut() else {
            return;
        };
        if matches!(w.state, WState::Draining | WState::Dying) {
            return;
        }
        w.role = Role::Retiring;
        if w.state == WState::Starting {
            // Not ready yet: nothing to drain.
            self.kill_worker(k, "it is no longer needed");
            return;
        }
        w.state = WState::Draining;
        w.deadline = Some(Instant::now() + grace);
        info!(worker.id = w.slot, worker.pid = w.pid, "draining worker");
        self.send_control(k, Control::Drain);
        self.rebuild_rotation();
    }

    /// Kills a worker now (SIGKILL), reclaims its unacknowledged connections and stops reading
    /// its channel. Its exit is handled when it is reaped.
    fn kill_worker(&mut self, k: usize, why: &str) {
        let Some(w) = self.workers[k].as_mut() else {
            return;
        };
        if w.state == WState::Dying && w.sigkilled {
            return;
        }
        warn!(
            worker.id = w.slot,
            worker.pid = w.pid,
            "killing worker: {why}"
        );
        // Signal first, then drop the channel: the worker must not see end-of-file and exit
        // "cleanly" before the kill lands.
        let _ = kill(Pid::from_raw(w.pid as i32), Signal::SIGKILL);
        w.sigkilled = true;
        w.state = WState::Dying;
        w.chan = None;
        w.clear_outbox();
        w.write_blocked = false;
        self.reclaim(k);
        self.rebuild_rotation();
        self.dispatch();
    }

    fn protocol_error(&mut self, k: usize, why: &str) {
        if let Some(w) = &self.workers[k] {
            error!(
                worker.id = w.slot,
                worker.pid = w.pid,
                "protocol error: worker {why}"
            );
        }
        self.kill_worker(k, "protocol error");
    }

    fn channel_closed(&mut self, k: usize) {
        let Some(w) = self.workers[k].as_mut() else {
            return;
        };
        w.chan = None;
        w.write_blocked = false;
        match w.state {
            // A draining worker closes its channel as it exits; wait for the exit (the grace
            // deadline still applies).
            WState::Draining | WState::Dying => {
                self.reclaim(k);
                self.dispatch();
            }
            // An exiting process closes its channel just before SIGCHLD arrives; one that keeps
            // running without its channel is broken. Take its connections back now (it can no
            // longer acknowledge them) and give it a moment to be reaped before SIGKILL.
            _ => {
                w.state = WState::Dying;
                w.clear_outbox();
                w.deadline = Some(Instant::now() + CHANNEL_CLOSED_GRACE);
                w.dying_reason = "it closed its channel but kept running";
                self.reclaim(k);
                self.rebuild_rotation();
                self.dispatch();
            }
        }
    }

    fn reap(&mut self) {
        for k in 0..self.workers.len() {
            let Some(w) = &self.workers[k] else { continue };
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
        if let Some(w) = self.workers[k].as_mut() {
            // Reaped: its pid may be reused from now on, so it must never be signalled again.
            w.state = WState::Dying;
            w.sigkilled = true;
        }
        // Read what it wrote before it exited (its final STATS, late acks), so the books are
        // right: a worker that closed every connection has lost none.
        self.read_worker(k, READ_ON_EXIT, true);
        self.reclaim(k);
        let w = self.workers[k].take().expect("live worker");
        self.free_keys.push(k);
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
        let slot = &mut self.slots[idx];
        slot.counters.connections_lost += lost;
        let was_current = slot.current == Some(k);
        if was_current {
            slot.current = None;
        }
        self.rebuild_rotation();
        // A reload whose new worker died before coming online failed: the old one stays.
        if let Some(r) = &mut self.reload {
            if r.step.map(|(_, nk)| nk) == Some(k) {
                let msg =
                    format!("reload failed: new worker {id} exited ({info}) before it was online");
                error!(worker.id = id, "{msg}");
                self.finish_reload(Err(msg));
            }
        }
        let stopping = matches!(self.phase, Phase::Stopping { .. });
        if was_current && slot_wanted(&self.slots, idx) && !stopping {
            let stable = w.online_at.is_some_and(|t| t.elapsed() >= STABLE_AFTER);
            self.schedule_restart(idx, stable);
        }
        if !self.slots[idx].wanted && self.slot_empty(idx) {
            self.slots[idx].reuse.clear();
            while self
                .slots
                .last()
                .is_some_and(|s| !s.wanted && s.current.is_none())
            {
                let last = self.slots.len() - 1;
                if !self.slot_empty(last) {
                    break;
                }
                self.slots.pop();
            }
        }
        self.dispatch();
    }

    fn slot_empty(&self, idx: usize) -> bool {
        let id = self.slots[idx].id;
        !self.workers.iter().flatten().any(|w| w.slot == id)
    }

    fn schedule_restart(&mut self, idx: usize, stable: bool) {
        let slot = &mut self.slots[idx];
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
        slot.restart_at = Some(Instant::now() + delay);
        if delay.is_zero() {
            self.run_due_restarts();
        }
    }

    fn run_due_restarts(&mut self) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let now = Instant::now();
        for idx in 0..self.slots.len() {
            let s = &mut self.slots[idx];
            if s.restart_at.is_some_and(|t| t <= now) && s.wanted && s.current.is_none() {
                s.restart_at = None;
                s.counters.restarts += 1;
                self.start_worker(idx, Role::Current);
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
        }
        let hb = self.cfg.heartbeat_timeout;
        let ack_timeout = hb.map_or(ACK_TIMEOUT, |t| t.min(ACK_TIMEOUT));
        for k in 0..self.workers.len() {
            let Some(w) = self.workers[k].as_mut() else {
                continue;
            };
            // Stable for a while: forget earlier failures.
            if w.online_at.is_some_and(|t| now - t >= STABLE_AFTER) && w.role == Role::Current {
                self.slots[(w.slot - 1) as usize].failures = 0;
            }
            match (w.state, w.deadline) {
                (WState::Starting, Some(d)) if d <= now => {
                    let (id, pid) = (w.slot, w.pid);
                    warn!(
                        worker.id = id,
                        worker.pid = pid,
                        "worker not ready within --ready-timeout"
                    );
                    self.kill_worker(k, "not ready in time");
                    continue;
                }
                (WState::Draining, Some(d)) if d <= now => {
                    self.kill_worker(k, "did not finish draining within --grace");
                    continue;
                }
                (WState::Dying, Some(d)) if d <= now && !w.sigkilled => {
                    warn!(
                        worker.id = w.slot,
                        worker.pid = w.pid,
                        "killing worker: {}",
                        w.dying_reason
                    );
                    w.sigkilled = true;
                    let _ = kill(Pid::from_raw(w.pid as i32), Signal::SIGKILL);
                    continue;
                }
                _ => {}
            }
            if w.outbox_since
                .is_some_and(|t| now.duration_since(t) >= OUTBOX_STALL)
            {
                self.kill_worker(k, "it does not read its channel");
                continue;
            }
            // A live worker acknowledges within milliseconds; one that leaves a handoff
            // unanswered this long is not reading its channel (it may still send heartbeats).
            if matches!(w.state, WState::Online | WState::Draining)
                && w.inflight
                    .front()
                    .is_some_and(|c| now.duration_since(c.sent_at) >= ack_timeout)
            {
                let why = format!(
                    "it did not acknowledge a connection within {}s",
                    ack_timeout.as_secs_f64()
                );
                self.kill_worker(k, &why);
                continue;
            }
            if let (Some(timeout), WState::Online) = (hb, w.state) {
                if now.duration_since(w.last_seen) >= timeout {
                    let (id, pid) = (w.slot, w.pid);
                    warn!(
                        worker.id = id,
                        worker.pid = pid,
                        "worker silent for --heartbeat-timeout: hung; terminating"
                    );
                    w.state = WState::Dying;
                    w.chan = None;
                    w.clear_outbox();
                    w.deadline = Some(now + HUNG_KILL_GRACE);
                    w.dying_reason = "it did not exit after SIGTERM";
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                    // SIGTERM does not reach a stopped process; make sure it can act on it.
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
                    self.reclaim(k);
                    self.rebuild_rotation();
                }
            }
        }
        if let Phase::Stopping { deadline, .. } = &self.phase {
            if *deadline <= now {
                warn!("grace period over: killing the workers that are left");
                self.kill_all();
            }
        }
        // A worker that passed --max-requests while another slot was recycling (and has been
        // quiet since, so no STATS brings it up again).
        if self.reload.is_none() {
            let due = self.workers.iter().flatten().find(|w| {
                w.state == WState::Online
                    && w.role == Role::Current
                    && w.recycle_at.is_some_and(|n| w.reported.requests >= n)
            });
            if let Some(w) = due {
                let idx = (w.slot - 1) as usize;
                let k = self.slots[idx].current;
                if let Some(w) = k.and_then(|k| self.workers[k].as_mut()) {
                    w.recycle_at = None;
                }
                self.recycle(idx);
            }
        }
        self.run_due_restarts();
        // Retry anything held (skipped workers may be eligible again).
        self.dispatch();
    }

    fn kill_all(&mut self) {
        for w in self.workers.iter_mut().flatten() {
            if !w.sigkilled {
                w.sigkilled = true;
                let _ = kill(Pid::from_raw(w.pid as i32), Signal::SIGKILL);
            }
            w.state = WState::Dying;
            w.chan = None;
        }
        self.rotation.clear();
    }

    // ----- requests ---------------------------------------------------------------------

    fn on_request(&mut self, r: Request) {
        match r {
            Request::Stats { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Request::ResetStats { reply } => {
                for s in &mut self.slots {
                    s.counters = Counters::default();
                }
                let _ = reply.send(());
            }
            Request::Reload { reply } => self.begin_reload(reply),
            Request::Scale { workers, reply } => {
                let _ = reply.send(self.scale(workers));
            }
            Request::Send { to, message, reply } => {
                let json = message.to_string().into_bytes();
                if json.len() > frame::MAX_MESSAGE {
                    let _ = reply.send(Err(format!("message too large ({} bytes)", json.len())));
                    return;
                }
                let result = match to {
                    Target::All => {
                        for id in 1..=self.slots.len() as u32 {
                            self.message_slot(id, 0, &json);
                        }
                        Ok(())
                    }
                    Target::Worker(id) => {
                        if self.message_slot(id, 0, &json) {
                            Ok(())
                        } else {
                            Err(format!("no worker with id {id}"))
                        }
                    }
                };
                let _ = reply.send(result);
            }
            Request::Stop { reply } => self.begin_stop(Some(reply)),
        }
    }

    fn begin_stop(&mut self, reply: Option<oneshot::Sender<()>>) {
        if let Phase::Stopping { replies, .. } = &mut self.phase {
            // A second stop request: stop at once.
            warn!("second stop request: killing workers now");
            replies.extend(reply);
            self.kill_all();
            return;
        }
        info!("stopping: draining workers");
        notify::notify("STOPPING=1");
        if let Some(r) = self.reload.take() {
            for reply in r.replies {
                let _ = reply.send(Err("the primary is stopping".into()));
            }
        }
        // Hand what we hold to workers before they are told to drain, then stop accepting.
        self.dispatch();
        self.phase = Phase::Stopping {
            deadline: Instant::now() + self.cfg.grace,
            replies: reply.into_iter().collect(),
        };
        self.accept_on.clear();
        for s in &mut self.slots {
            s.restart_at = None;
        }
        for k in 0..self.workers.len() {
            if self.workers[k].is_some() {
                self.drain_worker(k);
            }
        }
    }

    fn scale(&mut self, n: u32) -> Result<(), String> {
        if n == 0 || n > crate::config::MAX_WORKERS {
            return Err(format!(
                "worker count must be 1..={}",
                crate::config::MAX_WORKERS
            ));
        }
        if !matches!(self.phase, Phase::Running) {
            return Err("the primary is stopping".into());
        }
        let wanted = self.slots.iter().filter(|s| s.wanted).count() as u32;
        info!(from = wanted, to = n, "scaling");
        if n > wanted {
            for id in wanted + 1..=n {
                if let Err(e) = self.add_slot(id) {
                    return Err(e.to_string());
                }
                let idx = (id - 1) as usize;
                if self.slots[idx].current.is_none() {
                    self.start_worker(idx, Role::Current);
                }
            }
        } else {
            for idx in (n as usize..self.slots.len()).rev() {
                let s = &mut self.slots[idx];
                s.wanted = false;
                s.restart_at = None;
                if let Some(k) = s.current.take() {
                    self.drain_worker(k);
                }
            }
            self.rebuild_rotation();
        }
        self.cfg.workers = n;
        Ok(())
    }

    fn begin_reload(&mut self, reply: oneshot::Sender<Result<(), String>>) {
        if !matches!(self.phase, Phase::Running) {
            let _ = reply.send(Err("the primary is stopping".into()));
            return;
        }
        if let Some(r) = &mut self.reload {
            if !r.full {
                // A --max-requests recycle is running: make it a full reload of every slot.
                info!("reloading workers one by one (after the running recycle)");
                notify::reloading();
                r.full = true;
                let stepping = r.step.map(|(id, _)| id);
                for s in self.slots.iter().filter(|s| s.wanted) {
                    if Some(s.id) != stepping && !r.queue.contains(&s.id) {
                        r.queue.push_back(s.id);
                    }
                }
            }
            // Otherwise one reload at a time: this request is answered when it finishes.
            r.replies.push(reply);
            return;
        }
        info!("reloading workers one by one");
        notify::reloading();
        let queue = self
            .slots
            .iter()
            .filter(|s| s.wanted)
            .map(|s| s.id)
            .collect();
        self.reload = Some(Reload {
            queue,
            step: None,
            replies: vec![reply],
            full: true,
        });
        self.advance_reload();
    }

    /// Recycles one slot the reload way (new worker online first), outside a full reload.
    fn recycle(&mut self, idx: usize) {
        if self.reload.is_some() {
            return;
        }
        self.reload = Some(Reload {
            queue: VecDeque::from([self.slots[idx].id]),
            step: None,
            replies: Vec::new(),
            full: false,
        });
        self.advance_reload();
    }

    fn advance_reload(&mut self) {
        loop {
            let Some(r) = &mut self.reload else { return };
            if r.step.is_some() {
                return;
            }
            let Some(id) = r.queue.pop_front() else {
                self.finish_reload(Ok(()));
                return;
            };
            let idx = (id - 1) as usize;
            if !slot_wanted(&self.slots, idx) {
                continue;
            }
            if self.slots[idx].current.is_none() {
                // Empty slot (restarting): a plain start is the reload of it.
                self.slots[idx].restart_at = None;
                self.start_worker(idx, Role::Current);
                continue;
            }
            match self.start_worker(idx, Role::Replacement) {
                Some(k) => {
                    if let Some(r) = &mut self.reload {
                        r.step = Some((id, k));
                    }
                    return;
                }
                None => {
                    self.fatal = None;
                    self.finish_reload(Err(format!(
                        "reload failed: could not start a new worker {id}"
                    )));
                    return;
                }
            }
        }
    }

    fn finish_reload(&mut self, result: Result<(), String>) {
        let Some(r) = self.reload.take() else { return };
        if let Some((_, k)) = r.step {
            // The new worker never came online: get rid of it; the old one keeps serving.
            if self.workers[k].is_some() {
                self.kill_worker(k, "reload step abandoned");
            }
        }
        match &result {
            Ok(()) if r.full => info!("reload complete"),
            Ok(()) => {}
            Err(e) => error!("{e}"),
        }
        if r.full {
            notify::notify("READY=1");
        }
        for reply in r.replies {
            let _ = reply.send(result.clone());
        }
    }

    fn snapshot(&self) -> StatsSnapshot {
        let policy = self.cfg.policy;
        let mut workers = Vec::new();
        let mut totals = Totals::default();
        // One pass over the processes (a slot may have two during a reload), not one per slot:
        // with 1024 workers a scrape must stay cheap for the owner thread.
        let mut active_by_slot = vec![0u64; self.slots.len()];
        let mut processes_by_slot = vec![0u32; self.slots.len()];
        for w in self.workers.iter().flatten() {
            if let Some(i) = (w.slot as usize)
                .checked_sub(1)
                .filter(|&i| i < self.slots.len())
            {
                active_by_slot[i] += w.active(policy);
                processes_by_slot[i] += 1;
            }
        }
        for (i, s) in self.slots.iter().enumerate() {
            if !s.wanted && s.current.is_none() && processes_by_slot[i] == 0 {
                continue;
            }
            let current = s.current.and_then(|k| self.workers[k].as_ref());
            let active = active_by_slot[i];
            let pid = current.map(|w| w.pid);
            workers.push(WorkerStats {
                id: s.id,
                pid,
                state: current.map_or(WorkerState::Stopped, |w| w.state.public()),
                connections_total: s.counters.connections_total,
                connections_active: active,
                requests_total: s.counters.requests_total,
                connections_lost: s.counters.connections_lost,
                restarts: s.counters.restarts,
                rss_bytes: 0, // filled in by ApiClient::stats, off the owner thread
            });
            totals.connections_total += s.counters.connections_total;
            totals.requests_total += s.counters.requests_total;
            totals.connections_lost += s.counters.connections_lost;
        }
        let values: Vec<u64> = workers.iter().map(|w| w.connections_total).collect();
        StatsSnapshot {
            policy: policy.as_str().to_string(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            listeners: self.addrs.iter().map(|a| a.to_string()).collect(),
            workers,
            totals,
            fairness: stats::fairness(&values),
        }
    }
}

/// Registers an fd-owning value with the reactor.
fn register<T: AsRawFd>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its fd (a TcpListener or OwnedFd) and is moved into the AsyncFd, so
    // the fd cannot be closed or replaced while it is registered; dropping the AsyncFd
    // deregisters before the fd is closed.
    unsafe { AsyncFd::register_with_interest(inner, interest) }.map_err(|e| e.into())
}

fn slot_wanted(slots: &[Slot], idx: usize) -> bool {
    slots.get(idx).is_some_and(|s| s.wanted)
}
