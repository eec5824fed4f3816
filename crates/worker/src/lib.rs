//! The roundhouse worker library: be a worker process of a `roundhouse run` primary.
//!
//! roundhouse accepts TCP connections in one process (the primary) and hands each connected
//! socket to one of N worker processes over a Unix `SOCK_SEQPACKET` channel, the way Node's
//! `cluster` does. This crate is the worker's half of that contract (`docs/protocol.md`), so
//! that a Rust HTTP server becomes a roundhouse worker by changing where its connections come
//! from and nothing else.
//!
//! # How to use
//!
//! ```no_run
//! use hyper::{body::Incoming, Request, Response};
//! use hyper_util::rt::TokioIo;
//! use http_body_util::Full;
//! use hyper::body::Bytes;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // Inside a tokio runtime (a current-thread one is enough: one worker process per core).
//! let worker = roundhouse_worker::Worker::from_env()?; // fails clearly outside roundhouse
//! let mut listener = worker.take_listener().expect("taken once");
//! worker.ready(); // the primary hands us connections from now on
//! loop {
//!     let (conn, _peer) = match listener.accept().await {
//!         Ok(c) => c,
//!         Err(e) if roundhouse_worker::is_drained(&e) => break, // every acked conn was served
//!         Err(e) => return Err(e.into()), // (or back off and retry: EMFILE under `none`)
//!     };
//!     let w = worker.clone();
//!     tokio::spawn(async move {
//!         let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
//!             w.count_request();
//!             async { Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hi")))) }
//!         });
//!         let _ = hyper::server::conn::http1::Builder::new()
//!             .serve_connection(TokioIo::new(conn), svc)
//!             .await;
//!     });
//! }
//! // Draining: finish the connections in flight (see `hello-worker` for the graceful version),
//! // then exit 0. The primary kills the worker after `--grace` otherwise.
//! worker.flush().await; // last STATS out before exiting
//! # Ok(()) }
//! ```
//!
//! The `hello-worker` binary of the `roundhouse` package is the complete example: graceful
//! drain with `Connection: close`, messages, statistics.
//!
//! # Theory of operation
//!
//! [`Worker::from_env`] takes the channel fd (and, under the `none`/`reuseport` policies, the
//! listening sockets passed the systemd way) and spawns **one task that owns the channel**
//! (documented in `src/channel.rs`). The application never touches the channel; it
//! talks to that task through cheap handles:
//!
//! - a [`Listener`] yields [`Conn`]s. Under `rr`/`least-conn` they are the connections the
//!   primary handed over, each acknowledged to the primary *before* the application can read a
//!   byte of it (so the primary knows who holds it); under `none`/`reuseport` the listener
//!   accepts on the inherited sockets itself. Same API either way.
//! - [`Worker::ready`] announces the worker (no connection comes before);
//!   [`Worker::count_request`] feeds the statistics (connections are counted by [`Conn`]
//!   itself), which the task reports coalesced, at most every 100 ms, with a heartbeat every
//!   second when idle;
//! - [`Worker::send`] and [`Worker::take_messages`] are `process.send` / `process.on('message')`;
//! - [`Worker::draining`] resolves when the primary asks the worker to stop (reload, scale down,
//!   shutdown). From then on new connections are refused back to the primary, and the accept
//!   stream ends ([`is_drained`]) once the connections acknowledged before the drain are out.
//!
//! When the channel reaches end of file the primary is gone, and the worker process exits at once
//! (status 0); a malformed frame from the primary exits with status 70. Workers built with
//! [`WorkerBuilder`] for tests or embedding can report that through [`Worker::closed`] instead.
//!
//! Everything here must run inside a tokio runtime with I/O and time enabled.
//!
//! # Logging
//!
//! A worker's stderr is the primary's: a full disk or a pipe nobody reads there must not panic
//! or stall the worker either. [`log`] (feature `log`, on by default; the `roundhouse-log`
//! crate) sets tracing up so that it cannot: `let _log = roundhouse_worker::log::init("my-worker");`
//! first thing in `main`. Lines are written off the serving threads, and lines that could not be
//! written are counted and reported once writing works again. When the primary goes away and the
//! library exits the process, queued lines are flushed first (bounded).

use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

mod channel;
mod env;
mod error;
mod listener;

pub use error::{is_drained, Closed, Drained, Error, SendError};
pub use listener::{Conn, Listener};
pub use roundhouse_proto::frame::Stats;
pub use roundhouse_proto::Recipient;

/// Logging that can never panic or block the worker: see the `roundhouse-log` crate.
#[cfg(feature = "log")]
pub use roundhouse_log as log;

use channel::{Channel, Cmd, Shared, MAX_QUEUED_MESSAGES};

/// Messages from the primary waiting for the application before new ones are dropped.
const MESSAGE_QUEUE: usize = 1024;

/// How the primary dispatches connections (`ROUNDHOUSE_POLICY`); shared with the primary.
pub use roundhouse_proto::Policy;

/// A JSON message from the primary or another worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The sender: `0` for the primary (or `roundhouse send` from outside), else a worker id.
    pub from: u32,
    pub value: serde_json::Value,
}

impl Message {
    /// Where a reply to this message goes.
    pub fn sender(&self) -> Recipient {
        match self.from {
            0 => Recipient::Primary,
            id => Recipient::Worker(id),
        }
    }
}

/// The stream of incoming [`Message`]s, from [`Worker::take_messages`]. Messages are queued
/// (up to 1024) from the moment the worker starts, so none is lost before it is taken; past
/// that, new ones are dropped with a warning.
#[derive(Debug)]
pub struct Messages {
    rx: mpsc::Receiver<Message>,
}

impl Messages {
    /// The next message; `None` once the channel to the primary is closed.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

/// A handle to this worker's side of the channel. Cheap to clone (one `Arc`); every clone talks
/// to the same channel task.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    id: u32,
    policy: Policy,
    shared: Arc<Shared>,
    cmds: mpsc::UnboundedSender<Cmd>,
    ready: AtomicBool,
    draining: watch::Receiver<bool>,
    closed: watch::Receiver<Option<Closed>>,
    listener: Mutex<Option<Listener>>,
    messages: Mutex<Option<Messages>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.inner.id)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Worker`] from an explicit channel, for tests and for programs that set up the
/// channel themselves. [`Worker::from_env`] is the normal way in.
#[derive(Debug)]
pub struct WorkerBuilder {
    channel: OwnedFd,
    id: u32,
    policy: Policy,
    listeners: Vec<std::net::TcpListener>,
    exit_on_close: bool,
}

impl WorkerBuilder {
    /// The dispatch policy (default `rr`). Informational: the listener accepts from the channel
    /// and from any [`listeners`](Self::listeners) whatever the policy.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Listening sockets to accept on (what `none`/`reuseport` pass as `LISTEN_FDS`).
    pub fn listeners(mut self, listeners: Vec<std::net::TcpListener>) -> Self {
        self.listeners = listeners;
        self
    }

    /// Whether the end of the channel ends the process (`exit(0)` on end of file, `exit(70)` on
    /// a malformed frame), as a worker under roundhouse must. Default **false** here, so that
    /// an in-process test cannot be ended by its own fake primary; observe the end with
    /// [`Worker::closed`] instead. [`Worker::from_env`] sets it to true.
    pub fn exit_on_close(mut self, exit: bool) -> Self {
        self.exit_on_close = exit;
        self
    }

    /// Registers the descriptors with tokio and spawns the channel task. Must be called inside
    /// a tokio runtime.
    pub fn start(self) -> Result<Worker, Error> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let _enter = handle.enter();
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open, and so the same open
        // file description, until the AsyncFd is dropped; nothing else owns the descriptor.
        let fd = unsafe { AsyncFd::register(self.channel) }.map_err(|e| Error::Register {
            what: "the roundhouse channel",
            error: e.into_parts().1,
        })?;
        let mut listeners = Vec::with_capacity(self.listeners.len());
        for l in self.listeners {
            let register = |error| Error::Register {
                what: "a listener",
                error,
            };
            l.set_nonblocking(true).map_err(register)?;
            listeners.push(tokio::net::TcpListener::from_std(l).map_err(register)?);
        }

        let shared = Arc::new(Shared::default());
        let (cmds_tx, cmds_rx) = mpsc::unbounded_channel();
        let (conns_tx, conns_rx) = mpsc::unbounded_channel();
        let (msgs_tx, msgs_rx) = mpsc::channel(MESSAGE_QUEUE);
        let (draining_tx, draining_rx) = watch::channel(false);
        let (closed_tx, closed_rx) = watch::channel(None);
        let channel = Channel::new(
            shared.clone(),
            conns_tx,
            msgs_tx,
            draining_tx,
            closed_tx,
            self.exit_on_close,
            if self.policy == Policy::LeastConn {
                channel::STATS_INTERVAL_LEAST_CONN
            } else {
                channel::STATS_INTERVAL
            },
        );
        let span = tracing::info_span!("worker", worker.id = self.id);
        handle.spawn(channel.run(fd, cmds_rx).instrument(span));

        Ok(Worker {
            inner: Arc::new(Inner {
                id: self.id,
                policy: self.policy,
                shared: shared.clone(),
                cmds: cmds_tx,
                ready: AtomicBool::new(false),
                draining: draining_rx,
                closed: closed_rx,
                listener: Mutex::new(Some(Listener::new(conns_rx, listeners, shared))),
                messages: Mutex::new(Some(Messages { rx: msgs_rx })),
            }),
        })
    }
}

impl Worker {
    /// Starts the worker from what roundhouse put in the environment (`ROUNDHOUSE_FD`,
    /// `ROUNDHOUSE_WORKER_ID`, `ROUNDHOUSE_POLICY`, and under `none`/`reuseport` the
    /// `LISTEN_FDS` listeners after checking `LISTEN_PID`). Fails with
    /// [`Error::NotUnderRoundhouse`] when the program was not started by roundhouse.
    ///
    /// The process exits when the channel ends (status 0: the primary is gone) or on a
    /// malformed frame from the primary (status 70). Call once, inside a tokio runtime.
    pub fn from_env() -> Result<Worker, Error> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        let env = env::take()?;
        WorkerBuilder {
            channel: env.channel,
            id: env.id,
            policy: env.policy,
            listeners: env.listeners,
            exit_on_close: true,
        }
        .start()
    }

    /// A worker on an explicit channel end (for in-process tests): policy `rr`, no listeners,
    /// and the process does **not** exit when the channel ends. Shorthand for
    /// `Worker::builder(channel, id).start()`.
    pub fn from_fd(channel: OwnedFd, id: u32) -> Result<Worker, Error> {
        Worker::builder(channel, id).start()
    }

    /// A builder on an explicit channel end; see [`WorkerBuilder`].
    pub fn builder(channel: OwnedFd, id: u32) -> WorkerBuilder {
        WorkerBuilder {
            channel,
            id,
            policy: Policy::RoundRobin,
            listeners: Vec::new(),
            exit_on_close: false,
        }
    }

    /// This worker's slot, `1..=N` (kept across restarts of the slot).
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    pub fn policy(&self) -> Policy {
        self.inner.policy
    }

    /// The accept side. `Some` the first time only: there is one accept queue.
    pub fn take_listener(&self) -> Option<Listener> {
        self.inner
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The incoming messages. `Some` the first time only.
    pub fn take_messages(&self) -> Option<Messages> {
        self.inner
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Tells the primary this worker can serve (`READY`); until then it hands no connection
    /// over. Call once the listener is set up; later calls do nothing.
    pub fn ready(&self) {
        if !self.inner.ready.swap(true, SeqCst) {
            let _ = self.inner.cmds.send(Cmd::Ready);
        }
    }

    /// Counts one HTTP request in the statistics reported to the primary. Two atomic
    /// operations; call it once per request.
    pub fn count_request(&self) {
        self.inner.shared.count_request();
    }

    /// The cumulative counters as they are now (what the next `STATS` will carry).
    pub fn stats(&self) -> Stats {
        self.inner.shared.snapshot()
    }

    /// Sends a JSON message to the primary, one worker, or all workers (the primary relays).
    /// Never waits: the message is queued for the channel task, and refused with
    /// [`SendError::QueueFull`] when 1024 are already waiting for the primary to read.
    pub fn send(&self, to: Recipient, value: &serde_json::Value) -> Result<(), SendError> {
        let json = serde_json::to_vec(value)?;
        if json.len() > roundhouse_proto::frame::MAX_MESSAGE {
            return Err(SendError::TooLarge {
                len: json.len(),
                max: roundhouse_proto::frame::MAX_MESSAGE,
            });
        }
        let queued = &self.inner.shared.queued_messages;
        if queued.fetch_add(1, SeqCst) >= MAX_QUEUED_MESSAGES {
            queued.fetch_sub(1, SeqCst);
            return Err(SendError::QueueFull);
        }
        let mut frame = Vec::with_capacity(roundhouse_proto::HEADER_LEN + json.len());
        roundhouse_proto::frame::encode_message_from_worker(&mut frame, to, &json);
        self.inner.cmds.send(Cmd::Message(frame)).map_err(|_| {
            queued.fetch_sub(1, SeqCst);
            SendError::Closed
        })
    }

    /// True once the primary asked this worker to drain (or the channel closed). One atomic
    /// load: cheap enough to test on every request (e.g. to answer `Connection: close`).
    pub fn is_draining(&self) -> bool {
        self.inner.shared.draining.load(SeqCst)
    }

    /// Resolves when the primary asks this worker to drain (or the channel closes). `'static`,
    /// so it can be handed to a graceful-shutdown API or awaited in many connection tasks.
    pub fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.draining.clone();
        async move {
            // Err: the channel task ended, which is also the end of taking connections.
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// Sends `STATS` now if a counter changed, and waits until everything queued for the
    /// primary so far (messages included) has been written. Call it before exiting so the last
    /// requests are counted. Returns at once if the channel is closed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.cmds.send(Cmd::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Resolves when the channel to the primary has ended, with how. Under [`Worker::from_env`]
    /// the process exits first, so this is for workers built with [`WorkerBuilder`].
    pub async fn closed(&self) -> Closed {
        let mut rx = self.inner.closed.clone();
        let end = match rx.wait_for(|c| c.is_some()).await {
            Ok(c) => c.clone().unwrap_or(Closed::Eof),
            Err(_) => Closed::Io("the channel task ended".into()),
        };
        end
    }
}
