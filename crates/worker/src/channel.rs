//! The one task that owns the channel to the primary.
//!
//! Everything that crosses the channel goes through this task, so the rules of the protocol are
//! kept in one place and in one order:
//!
//! - **Acknowledge before serving.** A `CONNS` frame is answered with an `ACK` as soon as the
//!   frames waiting on the socket have been read (one `ACK` covers a burst of at most 32 frames,
//!   which the protocol allows), and the connections are handed to the application only *after*
//!   that `ACK` has been written. So no byte of a connection is read before the primary knows the
//!   worker holds it; if the primary stops reading, the connections wait with their `ACK`.
//! - **Refuse what cannot be served.** While draining, or when the kernel dropped fds
//!   (`MSG_CTRUNC`), every id of the frame is refused and the fds that did arrive are closed at
//!   once, so the primary re-sends them to another worker.
//! - **Drain in order.** A `DRAIN` is queued behind the connections acknowledged before it: the
//!   [`Listener`](crate::Listener) returns every one of those before it reports
//!   [`Drained`](crate::Drained), so no acknowledged connection is dropped unserved.
//! - **Statistics are coalesced.** Counting a request is two atomic operations on the caller's
//!   side; this task sends `STATS` at most every 100 ms and only when a counter moved, and a
//!   `HEARTBEAT` when it has sent nothing for a second.
//! - **Never block.** `recvmsg`/`sendmsg` are non-blocking and driven by tokio readiness
//!   (`AsyncFd`); frames that cannot be written yet wait in a queue, in order. Receive and frame
//!   buffers are allocated once and reused.
//!
//! End of file means the primary is gone: the worker exits at once with status 0. A malformed
//! frame from the primary is a roundhouse bug: logged, exit status 70. (A worker built with
//! [`WorkerBuilder::exit_on_close(false)`](crate::WorkerBuilder::exit_on_close) reports either
//! through [`Worker::closed`](crate::Worker::closed) instead, for tests and embedding.)

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use roundhouse_proto::frame::{self, ConnList, ConnRecord, FrameError, PrimaryFrame, Stats};
use roundhouse_proto::sys::{recv_frame, send_frame, RecvMeta};
use roundhouse_proto::{ACK_MAX_IDS, CONNS_MAX, MAX_FRAME};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::{sleep_until, Instant, Sleep};

use crate::error::Closed;
use crate::listener::{Conn, Item};
use crate::Message;

/// Most `STATS` frames per second: one per this interval.
pub(crate) const STATS_INTERVAL: Duration = Duration::from_millis(100);
/// Under `least-conn` the primary picks by open connections, which it learns from `STATS`:
/// report closes sooner so its view does not lag by a tenth of a second (still coalesced: at
/// most 100 frames a second).
pub(crate) const STATS_INTERVAL_LEAST_CONN: Duration = Duration::from_millis(10);
/// A worker that has sent nothing for this long sends a `HEARTBEAT`: `ROUNDHOUSE_HEARTBEAT_MS`
/// (set by the primary to a quarter of its `--heartbeat-timeout`), else 1 s.
pub(crate) fn heartbeat_interval() -> Duration {
    static INTERVAL: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *INTERVAL.get_or_init(|| {
        std::env::var("ROUNDHOUSE_HEARTBEAT_MS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|ms| Duration::from_millis(ms.clamp(10, 60_000)))
            .unwrap_or(Duration::from_secs(1))
    })
}
/// Most frames read in one go before the `ACK` for them is written (32 × 32 ids = 1024, the most
/// one `ACK` may carry).
const BURST: usize = ACK_MAX_IDS / CONNS_MAX;
/// Messages the application may have queued for the primary before `send` says `QueueFull`.
pub(crate) const MAX_QUEUED_MESSAGES: usize = 1024;
/// Frame buffers kept for reuse.
const POOL: usize = 16;

/// State shared between the application (counters, message budget) and the channel task.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    accepted: AtomicU64,
    closed: AtomicU64,
    requests: AtomicU64,
    /// Set when a counter moved since the last `STATS`; the first setter wakes the task.
    dirty: AtomicBool,
    wake: Notify,
    /// Messages queued by [`Worker::send`](crate::Worker::send) and not yet written.
    pub(crate) queued_messages: AtomicUsize,
    /// A drain began or the channel ended (a plain flag: apps may test it on every request).
    pub(crate) draining: AtomicBool,
}

impl Shared {
    pub(crate) fn count_accepted(&self) {
        self.accepted.fetch_add(1, SeqCst);
        self.mark();
    }
    pub(crate) fn count_closed(&self) {
        self.closed.fetch_add(1, SeqCst);
        self.mark();
    }
    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, SeqCst);
        self.mark();
    }
    /// SeqCst throughout: the task clears `dirty` *then* reads the counters, so an increment it
    /// does not see is one whose `mark` sees `dirty == false` and wakes it again.
    fn mark(&self) {
        if !self.dirty.load(SeqCst) && !self.dirty.swap(true, SeqCst) {
            self.wake.notify_one();
        }
    }
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            accepted: self.accepted.load(SeqCst),
            closed: self.closed.load(SeqCst),
            requests: self.requests.load(SeqCst),
        }
    }
}

/// What the application asks of the channel task.
#[derive(Debug)]
pub(crate) enum Cmd {
    Ready,
    /// A complete worker → primary `MESSAGE` frame.
    Message(Vec<u8>),
    /// Send `STATS` now if anything changed; answer once everything queued so far is written.
    Flush(oneshot::Sender<()>),
}

/// A frame from the primary, validated, with the decision it calls for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming<'a> {
    Eof,
    /// `lost_fds`: the kernel dropped some of the fds (`MSG_CTRUNC`): refuse them all.
    Conns {
        list: ConnList<'a>,
        lost_fds: bool,
    },
    Drain,
    Message {
        from: u32,
        json: &'a [u8],
    },
}

/// Why a frame from the primary is a protocol error.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProtocolError {
    #[error("frame from the primary is larger than {MAX_FRAME} bytes")]
    Oversized,
    #[error("fds were truncated (MSG_CTRUNC) on a frame that carries none")]
    LostFdsOnNonConns,
    #[error("{0}")]
    Frame(#[from] FrameError),
}

/// Classifies one received frame (`buf` is exactly the bytes received, `nfds` how many fds
/// arrived). Pure, so the decisions are unit-tested without sockets.
///
/// With `MSG_CTRUNC` the number of fds that arrived says nothing, so a `CONNS` frame is decoded
/// against the count it declares and then refused whole; any other kind never carries fds, so
/// truncated fds on it mean the primary attached some: malformed.
pub(crate) fn classify(
    buf: &[u8],
    meta: RecvMeta,
    nfds: usize,
) -> Result<Incoming<'_>, ProtocolError> {
    if meta.len == 0 {
        return Ok(Incoming::Eof);
    }
    if meta.truncated {
        return Err(ProtocolError::Oversized);
    }
    if meta.fds_truncated {
        if buf.first() != Some(&frame::kind::CONNS) || buf.len() < 8 {
            return Err(ProtocolError::LostFdsOnNonConns);
        }
        let declared = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
        if nfds > declared {
            return Err(FrameError::Fds {
                kind: frame::kind::CONNS,
                fds: nfds,
                expected: declared,
            }
            .into());
        }
        return match frame::decode_primary_frame(buf, declared)? {
            PrimaryFrame::Conns(list) => Ok(Incoming::Conns {
                list,
                lost_fds: true,
            }),
            _ => Err(ProtocolError::LostFdsOnNonConns),
        };
    }
    Ok(match frame::decode_primary_frame(buf, nfds)? {
        PrimaryFrame::Conns(list) => Incoming::Conns {
            list,
            lost_fds: false,
        },
        PrimaryFrame::Drain => Incoming::Drain,
        PrimaryFrame::Message { from, json } => Incoming::Message { from, json },
    })
}

/// Whether a `CONNS` frame is acknowledged (`true`) or refused.
pub(crate) fn accepts_conns(draining: bool, lost_fds: bool) -> bool {
    !draining && !lost_fds
}

/// Something that happens once the frame it is attached to has been written.
enum After {
    /// Connections whose `ACK` this is: hand them to the application.
    Conns(Vec<(OwnedFd, ConnRecord)>),
    /// Tell the listener no more connections come (after the ones before it).
    Drained,
    Flushed(oneshot::Sender<()>),
}

struct Out {
    frame: Vec<u8>,
    then: Vec<After>,
    message: bool,
}

/// Everything the task owns besides the socket and the receive buffers.
pub(crate) struct Channel {
    pub(crate) shared: Arc<Shared>,
    pub(crate) conns: mpsc::UnboundedSender<Item>,
    pub(crate) messages: mpsc::Sender<Message>,
    pub(crate) draining: watch::Sender<bool>,
    pub(crate) closed: watch::Sender<Option<Closed>>,
    pub(crate) exit_on_close: bool,
    out: VecDeque<Out>,
    pool: Vec<Vec<u8>>,
    acks: Vec<u64>,
    acked: Vec<(OwnedFd, ConnRecord)>,
    refuses: Vec<u64>,
    is_draining: bool,
    ready: bool,
    last_sent: Instant,
    last_stats: Stats,
    last_stats_at: Instant,
    stats_armed: bool,
    stats_timer: Pin<Box<Sleep>>,
    heartbeat: Pin<Box<Sleep>>,
    /// Least time between two `STATS` frames.
    stats_interval: Duration,
}

impl Channel {
    pub(crate) fn new(
        shared: Arc<Shared>,
        conns: mpsc::UnboundedSender<Item>,
        messages: mpsc::Sender<Message>,
        draining: watch::Sender<bool>,
        closed: watch::Sender<Option<Closed>>,
        exit_on_close: bool,
        stats_interval: Duration,
    ) -> Self {
        let now = Instant::now();
        Channel {
            shared,
            conns,
            messages,
            draining,
            closed,
            exit_on_close,
            stats_interval,
            out: VecDeque::new(),
            pool: Vec::new(),
            acks: Vec::new(),
            acked: Vec::new(),
            refuses: Vec::new(),
            is_draining: false,
            ready: false,
            last_sent: now,
            last_stats: Stats::default(),
            last_stats_at: now,
            stats_armed: false,
            stats_timer: Box::pin(sleep_until(now)),
            heartbeat: Box::pin(sleep_until(now + heartbeat_interval())),
        }
    }

    /// Runs until the channel ends, then records how and (normally) exits the process.
    pub(crate) async fn run(mut self, fd: AsyncFd<OwnedFd>, cmds: mpsc::UnboundedReceiver<Cmd>) {
        let end = self.serve(&fd, cmds).await;
        match &end {
            Closed::Eof => tracing::info!("channel closed by the primary; exiting"),
            Closed::Protocol(e) => tracing::error!(error = %e, "malformed frame from the primary"),
            Closed::Io(e) => tracing::error!(error = %e, "channel to the primary failed"),
        }
        if self.exit_on_close {
            // `exit` runs no destructor: write what is queued (bounded: stderr may be stuck).
            #[cfg(feature = "log")]
            let _ = roundhouse_log::flush(roundhouse_log::DEFAULT_EXIT_FLUSH);
            std::process::exit(end.exit_code());
        }
        self.shared.draining.store(true, SeqCst);
        self.closed.send_replace(Some(end));
        // Dropping `self` closes held fds and ends the accept queue; dropping the draining
        // sender wakes everyone waiting for a drain.
    }

    async fn serve(
        &mut self,
        fd: &AsyncFd<OwnedFd>,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
    ) -> Closed {
        let mut rbuf = vec![0u8; MAX_FRAME];
        let mut rfds: Vec<OwnedFd> = Vec::with_capacity(CONNS_MAX + 8);
        let mut cmds_open = true;
        loop {
            tokio::select! {
                r = fd.readable() => {
                    if let Err(e) = r {
                        return Closed::Io(format!("could not poll the channel: {e}"));
                    }
                    // The guard is dropped without clearing: `try_io` clears readiness when a
                    // read would block, and a burst cut short leaves it set so we come back.
                    for _ in 0..BURST {
                        match fd.try_io(Interest::READABLE, |s| {
                            recv_frame(s.as_fd(), &mut rbuf, &mut rfds)
                        }) {
                            Ok(meta) => {
                                let n = meta.len.min(rbuf.len());
                                if let Err(end) = self.on_frame(&rbuf[..n], meta, &mut rfds) {
                                    return end;
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                                return Closed::Eof
                            }
                            Err(e) => {
                                return Closed::Io(format!("could not read from the channel: {e}"))
                            }
                        }
                    }
                    self.emit_acks();
                    self.emit_refuses();
                }
                r = fd.writable(), if !self.out.is_empty() => {
                    if let Err(e) = r {
                        return Closed::Io(format!("could not poll the channel: {e}"));
                    }
                }
                cmd = cmds.recv(), if cmds_open => match cmd {
                    Some(cmd) => self.on_cmd(cmd),
                    // Every `Worker` handle is gone; the channel still serves the listener.
                    None => cmds_open = false,
                },
                _ = self.shared.wake.notified(), if !self.stats_armed => {
                    self.arm_stats();
                }
                _ = &mut self.stats_timer, if self.stats_armed => {
                    self.stats_armed = false;
                    self.push_stats();
                }
                _ = &mut self.heartbeat, if self.ready => {
                    let due = self.last_sent + heartbeat_interval();
                    if Instant::now() >= due && self.out.is_empty() {
                        let mut b = self.buf();
                        frame::encode_heartbeat(&mut b);
                        self.push(b, false);
                    }
                    let next = self.last_sent.max(Instant::now()) + heartbeat_interval();
                    self.heartbeat.as_mut().reset(next);
                }
            }
            if let Err(end) = self.flush(fd) {
                return end;
            }
        }
    }

    fn on_frame(
        &mut self,
        buf: &[u8],
        meta: RecvMeta,
        rfds: &mut Vec<OwnedFd>,
    ) -> Result<(), Closed> {
        let incoming = match classify(buf, meta, rfds.len()) {
            Ok(i) => i,
            Err(e) => {
                rfds.clear();
                return Err(Closed::Protocol(e.to_string()));
            }
        };
        match incoming {
            Incoming::Eof => return Err(Closed::Eof),
            Incoming::Conns { list, lost_fds } => {
                if accepts_conns(self.is_draining, lost_fds) {
                    if self.acks.len() + list.len() > ACK_MAX_IDS {
                        self.emit_acks();
                    }
                    for (rec, fd) in list.iter().zip(rfds.drain(..)) {
                        self.acks.push(rec.id);
                        self.acked.push((fd, rec));
                    }
                } else {
                    if lost_fds {
                        tracing::warn!(
                            connections = list.len(),
                            arrived = rfds.len(),
                            "fds were lost in transit (MSG_CTRUNC, out of fds?); refusing the batch"
                        );
                    } else {
                        tracing::debug!(connections = list.len(), "draining; refusing");
                    }
                    rfds.clear();
                    if self.refuses.len() + list.len() > ACK_MAX_IDS {
                        self.emit_refuses();
                    }
                    self.refuses.extend(list.ids());
                }
            }
            Incoming::Drain => {
                // Connections acknowledged before the DRAIN are served: the drained mark goes
                // behind them.
                self.emit_acks();
                if !self.is_draining {
                    tracing::info!("drain requested by the primary");
                    self.is_draining = true;
                    self.shared.draining.store(true, SeqCst);
                    self.draining.send_replace(true);
                    self.after_queued(After::Drained);
                }
            }
            Incoming::Message { from, json } => {
                match serde_json::from_slice::<serde_json::Value>(json) {
                    Ok(value) => match self.messages.try_send(Message { from, value }) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tracing::warn!(from, "message queue full; message dropped")
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            tracing::debug!(from, "nobody reads messages; message dropped")
                        }
                    },
                    Err(e) => tracing::warn!(from, error = %e, "undecodable message dropped"),
                }
            }
        }
        Ok(())
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Ready => {
                if !self.ready {
                    let mut b = self.buf();
                    frame::encode_ready(&mut b);
                    self.push(b, false);
                    self.ready = true;
                    self.heartbeat
                        .as_mut()
                        .reset(Instant::now() + heartbeat_interval());
                    // Anything counted before READY goes out with the first STATS.
                    self.arm_stats();
                }
            }
            Cmd::Message(frame) => self.push(frame, true),
            Cmd::Flush(tx) => {
                if self.ready && self.out.is_empty() {
                    self.send_stats_if_changed();
                }
                self.after_queued(After::Flushed(tx));
            }
        }
    }

    fn arm_stats(&mut self) {
        self.stats_armed = true;
        let at = (self.last_stats_at + self.stats_interval).max(Instant::now());
        self.stats_timer.as_mut().reset(at);
    }

    /// The stats timer fired. Before READY, or while earlier frames still wait for the primary
    /// to read, try again later rather than piling up `STATS` frames.
    fn push_stats(&mut self) {
        if !self.ready {
            return; // READY arms the timer again.
        }
        if !self.out.is_empty() {
            self.arm_stats_later();
            return;
        }
        self.send_stats_if_changed();
    }

    fn arm_stats_later(&mut self) {
        self.stats_armed = true;
        self.stats_timer
            .as_mut()
            .reset(Instant::now() + self.stats_interval);
    }

    fn send_stats_if_changed(&mut self) {
        self.shared.dirty.store(false, SeqCst);
        let s = self.shared.snapshot();
        if s != self.last_stats {
            let mut b = self.buf();
            frame::encode_stats(&mut b, s);
            self.push(b, false);
            self.last_stats = s;
            self.last_stats_at = Instant::now();
        }
    }

    fn emit_acks(&mut self) {
        if self.acks.is_empty() {
            return;
        }
        let mut b = self.buf();
        frame::encode_ids(&mut b, false, &self.acks);
        self.acks.clear();
        let conns = std::mem::take(&mut self.acked);
        self.out.push_back(Out {
            frame: b,
            then: vec![After::Conns(conns)],
            message: false,
        });
    }

    fn emit_refuses(&mut self) {
        if self.refuses.is_empty() {
            return;
        }
        let mut b = self.buf();
        frame::encode_ids(&mut b, true, &self.refuses);
        self.refuses.clear();
        self.push(b, false);
    }

    fn buf(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_default()
    }

    fn push(&mut self, frame: Vec<u8>, message: bool) {
        self.out.push_back(Out {
            frame,
            then: Vec::new(),
            message,
        });
    }

    /// Runs `a` once everything queued so far is written (at once if nothing is).
    fn after_queued(&mut self, a: After) {
        match self.out.back_mut() {
            Some(last) => last.then.push(a),
            None => self.release(a),
        }
    }

    /// Writes queued frames until the channel would block.
    fn flush(&mut self, fd: &AsyncFd<OwnedFd>) -> Result<(), Closed> {
        while let Some(front) = self.out.front() {
            match fd.try_io(Interest::WRITABLE, |s| {
                send_frame(s.as_fd(), &front.frame, &[])
            }) {
                Ok(_) => {
                    let Some(out) = self.out.pop_front() else {
                        break;
                    };
                    self.last_sent = Instant::now();
                    if out.message {
                        self.shared.queued_messages.fetch_sub(1, SeqCst);
                    }
                    let mut frame = out.frame;
                    if self.pool.len() < POOL && frame.capacity() <= 4096 {
                        frame.clear();
                        self.pool.push(frame);
                    }
                    for a in out.then {
                        self.release(a);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return Err(Closed::Eof)
                }
                Err(e) => return Err(Closed::Io(format!("could not write to the channel: {e}"))),
            }
        }
        Ok(())
    }

    fn release(&mut self, a: After) {
        match a {
            After::Conns(conns) => {
                for (fd, rec) in conns {
                    match make_stream(fd) {
                        Ok(stream) => {
                            let conn = Conn::new(
                                stream,
                                rec.peer,
                                Some(rec.id),
                                rec.listener,
                                self.shared.clone(),
                            );
                            // A listener that is gone drops the connection (counted closed).
                            let _ = self.conns.send(Item::Conn(conn));
                        }
                        Err(e) => tracing::warn!(
                            conn.id = rec.id,
                            error = %e,
                            "could not use a handed connection; closing it"
                        ),
                    }
                }
            }
            After::Drained => {
                let _ = self.conns.send(Item::Drained);
            }
            After::Flushed(tx) => {
                let _ = tx.send(());
            }
        }
    }
}

/// A received fd is blocking (the flag is shared with the primary's copy; harmless), and
/// tokio needs it non-blocking.
fn make_stream(fd: OwnedFd) -> io::Result<tokio::net::TcpStream> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(std)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conns_frame(ids: &[u64]) -> Vec<u8> {
        let mut b = Vec::new();
        frame::encode_conns_header(&mut b, ids.len());
        for &id in ids {
            ConnRecord {
                id,
                listener: 0,
                peer: "127.0.0.1:9".parse().unwrap(),
            }
            .encode(&mut b);
        }
        b
    }

    fn meta(len: usize) -> RecvMeta {
        RecvMeta {
            len,
            ..RecvMeta::default()
        }
    }

    #[test]
    fn conns_with_all_fds_are_accepted_unless_draining() {
        let b = conns_frame(&[1, 2, 3]);
        match classify(&b, meta(b.len()), 3).unwrap() {
            Incoming::Conns { list, lost_fds } => {
                assert!(!lost_fds);
                assert_eq!(list.ids().collect::<Vec<_>>(), vec![1, 2, 3]);
            }
            other => panic!("{other:?}"),
        }
        assert!(accepts_conns(false, false));
        assert!(!accepts_conns(true, false));
    }

    #[test]
    fn ctrunc_on_conns_refuses_every_id_even_those_whose_fd_arrived() {
        let b = conns_frame(&[7, 8, 9]);
        let m = RecvMeta {
            fds_truncated: true,
            ..meta(b.len())
        };
        for arrived in 0..=3 {
            match classify(&b, m, arrived).unwrap() {
                Incoming::Conns { list, lost_fds } => {
                    assert!(lost_fds, "arrived={arrived}");
                    assert_eq!(list.ids().collect::<Vec<_>>(), vec![7, 8, 9]);
                    assert!(!accepts_conns(false, lost_fds));
                }
                other => panic!("{other:?}"),
            }
        }
        // More fds than declared is malformed even when truncated.
        assert!(classify(&b, m, 4).is_err());
    }

    #[test]
    fn ctrunc_on_other_kinds_is_malformed() {
        let mut b = Vec::new();
        frame::encode_drain(&mut b);
        let m = RecvMeta {
            fds_truncated: true,
            ..meta(b.len())
        };
        assert_eq!(classify(&b, m, 0), Err(ProtocolError::LostFdsOnNonConns));
        // A CONNS frame that is malformed apart from the truncation is still malformed.
        let mut bad = conns_frame(&[1]);
        bad[1] = 1;
        let m = RecvMeta {
            fds_truncated: true,
            ..meta(bad.len())
        };
        assert!(matches!(classify(&bad, m, 0), Err(ProtocolError::Frame(_))));
    }

    #[test]
    fn eof_oversized_and_malformed() {
        assert_eq!(classify(&[], meta(0), 0), Ok(Incoming::Eof));
        let b = conns_frame(&[1]);
        let m = RecvMeta {
            truncated: true,
            ..meta(b.len())
        };
        assert_eq!(classify(&b, m, 1), Err(ProtocolError::Oversized));
        // Wrong fd count without truncation: malformed.
        assert!(matches!(
            classify(&b, meta(b.len()), 0),
            Err(ProtocolError::Frame(FrameError::Fds { .. }))
        ));
        // A worker → primary kind coming from the primary: malformed.
        let mut r = Vec::new();
        frame::encode_ready(&mut r);
        assert!(classify(&r, meta(r.len()), 0).is_err());
        // DRAIN and MESSAGE decode.
        let mut d = Vec::new();
        frame::encode_drain(&mut d);
        assert_eq!(classify(&d, meta(d.len()), 0), Ok(Incoming::Drain));
        let mut msg = Vec::new();
        frame::encode_message_to_worker(&mut msg, 2, br#"{"ping":1}"#);
        assert_eq!(
            classify(&msg, meta(msg.len()), 0),
            Ok(Incoming::Message {
                from: 2,
                json: br#"{"ping":1}"#
            })
        );
        let mut bad_json = Vec::new();
        frame::encode_message_to_worker(&mut bad_json, 0, b"{nope");
        assert!(classify(&bad_json, meta(bad_json.len()), 0).is_err());
    }

    #[test]
    fn counters_wake_once_until_cleared() {
        let s = Shared::default();
        s.count_request();
        s.count_request();
        s.count_accepted();
        assert!(s.dirty.load(SeqCst));
        assert_eq!(
            s.snapshot(),
            Stats {
                accepted: 1,
                closed: 0,
                requests: 2
            }
        );
        s.dirty.store(false, SeqCst);
        s.count_closed();
        assert!(s.dirty.load(SeqCst));
    }
}
