//! The accept side: one [`Listener`] whatever the policy, and the [`Conn`] it yields.
//!
//! Under `rr` and `least-conn` connections come from the primary, already accepted, through the
//! channel task (which acknowledged them first). Under `none` and `reuseport` the worker owns
//! listening sockets and accepts on them itself. An application should not care which: it calls
//! [`Listener::accept`] in a loop, exactly as it would on a `tokio::net::TcpListener`, and gets a
//! [`Conn`] that any hyper (or axum) server can serve. The same program then runs unchanged
//! under every policy.
//!
//! The accept stream ends with an error for which [`is_drained`](crate::is_drained) is true: the
//! primary asked the worker to drain, and every connection acknowledged before that has been
//! returned. Stopping at that error, rather than at the drain signal itself, is what guarantees
//! that no acknowledged connection is dropped unserved.
//!
//! A [`Conn`] counts itself: `accepted` when it is handed to the application, `closed` when it is
//! dropped. These are the cumulative totals the primary receives in `STATS`.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::channel::Shared;
use crate::error::drained_error;

/// What the channel task puts in the accept queue.
pub(crate) enum Item {
    Conn(Conn),
    Drained,
}

/// Where a worker's connections come from. Obtained once from
/// [`Worker::take_listener`](crate::Worker::take_listener).
pub struct Listener {
    queue: mpsc::UnboundedReceiver<Item>,
    /// Under `none`/`reuseport`: the inherited listeners, in `-l` order.
    listeners: Vec<tokio::net::TcpListener>,
    /// Listener to try first next time, so one busy listener does not starve the others.
    next: usize,
    drained: bool,
    /// Set when `accept` has reported the end of the stream (see [`Listener::drained`]).
    ended: watch::Sender<bool>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("listeners", &self.listeners)
            .field("drained", &self.drained)
            .finish_non_exhaustive()
    }
}

impl Listener {
    pub(crate) fn new(
        queue: mpsc::UnboundedReceiver<Item>,
        listeners: Vec<tokio::net::TcpListener>,
        shared: Arc<Shared>,
    ) -> Self {
        Listener {
            queue,
            listeners,
            next: 0,
            drained: false,
            ended: watch::Sender::new(false),
            shared,
        }
    }

    /// Resolves once [`accept`](Self::accept) has returned the end of the stream (drained, or
    /// the channel closed), i.e. every acknowledged connection has been handed out. This, not
    /// [`Worker::draining`](crate::Worker::draining), is the signal for a server loop that
    /// stops accepting on a signal of its own, such as axum's `with_graceful_shutdown`:
    /// stopping at the drain itself could drop connections acknowledged just before it. Also
    /// resolves if the listener is dropped.
    pub fn drained(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.ended.subscribe();
        async move {
            let _ = rx.wait_for(|e| *e).await;
        }
    }

    /// Waits for the next connection and returns it with the client's address.
    ///
    /// Errors: one for which [`is_drained`](crate::is_drained) is true once the worker drains
    /// (stop accepting, finish the connections you have); `BrokenPipe` once the channel to the
    /// primary is closed (only seen by workers built not to exit then); under `none`/`reuseport`
    /// the listener's own `accept` errors that deserve a back-off (`EMFILE`, `ENFILE`,
    /// `ENOBUFS`, `ENOMEM`; the transient `ECONNABORTED`-like ones are retried here).
    ///
    /// Cancel safe: a connection is never lost when the future is dropped before completing.
    pub async fn accept(&mut self) -> io::Result<(Conn, SocketAddr)> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// The poll form of [`accept`](Self::accept), for hand-written futures and `Stream`s.
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(Conn, SocketAddr)>> {
        if self.drained {
            return Poll::Ready(Err(drained_error()));
        }
        match self.queue.poll_recv(cx) {
            Poll::Ready(Some(Item::Conn(conn))) => {
                let peer = conn.peer;
                return Poll::Ready(Ok((conn, peer)));
            }
            Poll::Ready(Some(Item::Drained)) => {
                self.drained = true;
                // Under `none`/`reuseport`: close our copies so the kernel stops counting us.
                self.listeners.clear();
                self.ended.send_replace(true);
                return Poll::Ready(Err(drained_error()));
            }
            Poll::Ready(None) => {
                self.ended.send_replace(true);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the channel to the primary is closed",
                )));
            }
            Poll::Pending => {}
        }
        let n = self.listeners.len();
        for i in 0..n {
            let idx = (self.next + i) % n;
            loop {
                match self.listeners[idx].poll_accept(cx) {
                    Poll::Ready(Ok((stream, peer))) => {
                        self.next = (idx + 1) % n;
                        let conn = Conn::new(stream, peer, None, idx as u16, self.shared.clone());
                        return Poll::Ready(Ok((conn, peer)));
                    }
                    Poll::Ready(Err(e)) if is_transient(&e) => continue,
                    Poll::Ready(Err(e)) => {
                        self.next = (idx + 1) % n;
                        return Poll::Ready(Err(e));
                    }
                    Poll::Pending => break,
                }
            }
        }
        Poll::Pending
    }

    /// The addresses of the inherited listeners (empty when the primary hands connections off).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }
}

/// `axum::serve(listener, router)` on a worker. Accept errors are logged and retried after a
/// second, as axum does for a `TcpListener`; once drained, `accept` never completes, so use
/// [`Listener::drained`] as the graceful-shutdown signal:
///
/// ```no_run
/// # async fn run(worker: roundhouse_worker::Worker, router: axum::Router) -> std::io::Result<()> {
/// let listener = worker.take_listener().expect("taken once");
/// let done = listener.drained();
/// worker.ready();
/// axum::serve(listener, router).with_graceful_shutdown(done).await?;
/// worker.flush().await;
/// # Ok(()) }
/// ```
///
/// axum shuts every connection down through hyper-util's graceful shutdown, which closes idle
/// connections at once: that races a keep-alive client's next request (and the first request
/// of a connection handed over just before the drain). `hello-worker` shows how to drain
/// without failing a single request.
#[cfg(feature = "axum")]
impl axum::serve::Listener for Listener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            match Listener::accept(self).await {
                Ok(c) => return c,
                Err(e) if crate::is_drained(&e) || e.kind() == io::ErrorKind::BrokenPipe => {
                    std::future::pending::<()>().await
                }
                Err(e) => {
                    tracing::error!(error = %e, "accept failed; retrying in 1 s");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// The first inherited listener's address; an error when connections are handed over by
    /// the primary (the worker has no listening socket of its own).
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.local_addrs().into_iter().next().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "connections are handed over by the primary: the worker has no listener",
            )
        })
    }
}

/// Accept errors about one connection that died in the backlog, not about the listener.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

/// One client connection. Read and write it like a `TcpStream` (it implements tokio's
/// `AsyncRead` + `AsyncWrite`; wrap it in `hyper_util::rt::TokioIo` for hyper). Dropping it
/// closes the socket and counts the connection as closed in the worker's statistics.
pub struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    id: Option<u64>,
    listener: u16,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.peer)
            .field("id", &self.id)
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl Conn {
    pub(crate) fn new(
        stream: TcpStream,
        peer: SocketAddr,
        id: Option<u64>,
        listener: u16,
        shared: Arc<Shared>,
    ) -> Self {
        shared.count_accepted();
        Conn {
            stream,
            peer,
            id,
            listener,
            shared,
        }
    }

    /// The client's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The primary's id for this connection (`None` when the worker accepted it itself).
    pub fn conn_id(&self) -> Option<u64> {
        self.id
    }

    /// Index of the listener it came in on, in `roundhouse run -l` order.
    pub fn listener_index(&self) -> u16 {
        self.listener
    }

    /// The socket, e.g. for `local_addr` or socket options.
    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }

    pub fn get_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Shorthand for `get_ref().set_nodelay(..)`.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.stream.set_nodelay(nodelay)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.count_closed();
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
