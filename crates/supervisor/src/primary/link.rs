//! The worker link room: one worker's channel, what is in flight on it, and what waits to be
//! written to it.
//!
//! A link owns the primary's end of the channel (registered with the reactor), the codec (the
//! roundhouse frames, or Node's IPC lines under `--node`), the connections handed and not yet
//! acknowledged (`inflight`, the primary's copies), the connections assigned in this dispatch
//! round (`batch`), and an outbox of control frames the channel could not take yet.
//!
//! **Every write goes through tokio's readiness** (`AsyncFd::try_io`): a `sendmsg` that would
//! block clears the write readiness, so the owner is woken again only when the kernel says the
//! channel has room. (A write that bypassed it would leave the readiness set, and a worker that
//! stops reading would make the owner spin on "writable" wake-ups.)
//!
//! When a link is dropped its connections must already have been taken back
//! ([`Link::take_unacked`]); the owner does that in its one retire path.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::task::Context;
use std::time::Instant;

use roundhouse_proto::frame;
use roundhouse_proto::sys::{self, RecvMeta};
use roundhouse_proto::{ConnRecord, CONNS_MAX};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::Conn;
use crate::node::NodeCodec;

/// Unacknowledged handoffs per worker. Well below the ~1,040 fds in flight at which `sendmsg`
/// fails with `ETOOMANYREFS` for an unprivileged user, and below the ~278 frames a stalled
/// worker's channel holds.
pub(crate) const WINDOW: usize = 128;
/// Bytes of messages queued for a worker that reads its channel slower than they come; past
/// this, new messages for it are dropped (the owner warns once per episode) instead of growing
/// the primary's memory.
pub(crate) const MAX_OUTBOX_BYTES: usize = 1 << 20;

/// A message for a worker other than a connection handoff.
#[derive(Clone, Copy)]
pub(crate) enum Control<'a> {
    Drain,
    Message {
        from: u32,
        json: &'a [u8],
    },
    /// Node only: answer to a handle the app sent the primary.
    HandleAck,
}

/// Why a batch could not be sent. The batch stays in the link; the owner takes it back.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The channel is full: wait for it to become writable.
    Blocked,
    /// Too many fds in flight for this user: try again shortly.
    TooManyRefs,
    /// The channel is broken: the worker cannot be reached.
    Broken(io::Error),
}

/// What became of a control message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Queued {
    /// Written, or queued to be written when the channel has room.
    Yes,
    /// A message dropped because the worker's outbox is over budget; `first` is true for the
    /// first drop of an episode (the owner warns once).
    Dropped { first: bool },
    /// A message the codec cannot carry (Node: not valid JSON).
    Unencodable(String),
    /// Not for this transport (a Node-only answer on a roundhouse channel).
    NotApplicable,
}

pub(crate) struct Link {
    chan: AsyncFd<OwnedFd>,
    node: Option<Box<NodeCodec>>,
    /// Handed, not yet acknowledged (the primary's copies), oldest first.
    inflight: VecDeque<Conn>,
    /// Assigned in this dispatch round, not yet sent.
    batch: Vec<Conn>,
    /// The last write would have blocked: wait for writability before writing again.
    write_blocked: bool,
    /// Frames (Node: byte runs) waiting for the channel to become writable.
    outbox: VecDeque<Vec<u8>>,
    outbox_bytes: usize,
    /// Last time the outbox made progress while not empty, or since when the channel has been
    /// full (`None` when neither).
    outbox_since: Option<Instant>,
    dropping_messages: bool,
}

impl Link {
    /// Registers the primary's end of a new worker's channel.
    pub(crate) fn new(chan: OwnedFd, node: bool) -> io::Result<Link> {
        Ok(Link {
            chan: crate::sys::register(chan, Interest::READABLE | Interest::WRITABLE)?,
            node: node.then(|| Box::new(NodeCodec::new())),
            inflight: VecDeque::with_capacity(WINDOW),
            batch: Vec::with_capacity(CONNS_MAX),
            write_blocked: false,
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            outbox_since: None,
            dropping_messages: false,
        })
    }

    pub(crate) fn node(&mut self) -> Option<&mut NodeCodec> {
        self.node.as_deref_mut()
    }

    /// Can take another connection now: channel writable, window not full, and for Node no
    /// handle in flight (Node's child takes one handle at a time).
    pub(crate) fn can_take(&self) -> bool {
        !self.write_blocked
            && self.inflight.len() + self.batch.len() < WINDOW
            && self
                .node
                .as_ref()
                .is_none_or(|n| n.handle_in_flight().is_none() && self.batch.is_empty())
    }

    /// Connections assigned or handed and not yet acknowledged.
    pub(crate) fn unacked(&self) -> usize {
        self.inflight.len() + self.batch.len()
    }

    /// Assigns a connection to this link's next batch. True if this made the batch non-empty.
    pub(crate) fn assign(&mut self, c: Conn) -> bool {
        self.batch.push(c);
        self.batch.len() == 1
    }

    /// The batch should go now rather than at the end of the dispatch round.
    pub(crate) fn batch_full(&self) -> bool {
        self.batch.len() == CONNS_MAX || (self.node.is_some() && !self.batch.is_empty())
    }

    pub(crate) fn has_batch(&self) -> bool {
        !self.batch.is_empty()
    }

    /// When the oldest unacknowledged handoff was sent.
    pub(crate) fn oldest_unacked(&self) -> Option<Instant> {
        self.inflight.front().map(|c| c.sent_at)
    }

    /// Since when queued frames (or a batch) have made no progress (`None`: not blocked).
    pub(crate) fn stalled_since(&self) -> Option<Instant> {
        self.outbox_since
    }

    /// Removes the acknowledged or refused connection `id` from the window.
    pub(crate) fn take_inflight(&mut self, id: u64) -> Option<Conn> {
        // Acks come in handoff order, so the id is almost always at the front.
        let pos = self.inflight.iter().position(|c| c.id == id)?;
        self.inflight.remove(pos)
    }

    /// Every connection not acknowledged, oldest first (the failed batch's, then the window's:
    /// a batch is assigned after everything already sent).
    pub(crate) fn take_unacked(&mut self) -> Vec<Conn> {
        let mut v: Vec<Conn> = self.inflight.drain(..).collect();
        v.append(&mut self.batch);
        v
    }

    /// Takes back the batch that could not be sent.
    pub(crate) fn take_batch(&mut self) -> std::vec::Drain<'_, Conn> {
        self.batch.drain(..)
    }

    // ----- readiness -------------------------------------------------------------------------

    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> bool {
        // An error is seen by the read itself.
        self.chan.poll_read_ready(cx).is_ready()
    }

    /// Only asked while a write would have blocked.
    pub(crate) fn poll_write_ready(&self, cx: &mut Context<'_>) -> bool {
        self.write_blocked && self.chan.poll_write_ready(cx).is_ready()
    }

    // ----- reading ---------------------------------------------------------------------------

    /// Receives one frame (Node: one run of bytes). `direct` reads without asking the reactor
    /// (after the worker has exited, before the reactor has seen the end of file).
    pub(crate) fn recv(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        direct: bool,
    ) -> io::Result<RecvMeta> {
        if direct {
            sys::recv_frame(self.chan.get_ref().as_fd(), buf, fds)
        } else {
            self.chan.try_io(Interest::READABLE, |fd| {
                sys::recv_frame(fd.as_fd(), buf, fds)
            })
        }
    }

    // ----- writing ---------------------------------------------------------------------------

    fn send(&self, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
        self.chan.try_io(Interest::WRITABLE, |fd| {
            sys::send_frame(fd.as_fd(), data, fds)
        })
    }

    /// Sends the batch (one frame of up to 32 fds; Node: one handle line with its fd). On
    /// success the connections join the window; on error they stay in the batch.
    pub(crate) fn flush(&mut self, scratch: &mut Vec<u8>, now: Instant) -> Result<(), SendError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        if self.write_blocked || !self.outbox.is_empty() {
            // Frames queued earlier go first (a Node line's tail above all).
            return Err(SendError::Blocked);
        }
        scratch.clear();
        let result = if let Some(node) = self.node.as_deref_mut() {
            let c = &self.batch[0];
            let rec = ConnRecord {
                id: c.id,
                listener: c.listener,
                peer: c.peer,
            };
            if !node.encode_conn(scratch, &rec) {
                return Err(SendError::Blocked);
            }
            let fd = c.stream.as_raw_fd();
            match self.send(scratch, &[fd]) {
                Ok(n) => {
                    if n < scratch.len() {
                        // The fd went with the first bytes; the rest follows alone.
                        self.queue(scratch[n..].to_vec());
                    }
                    Ok(())
                }
                Err(e) => {
                    if let Some(node) = self.node.as_deref_mut() {
                        node.cancel_in_flight();
                    }
                    Err(e)
                }
            }
        } else {
            frame::encode_conns_header(scratch, self.batch.len());
            let mut fds = [0 as RawFd; CONNS_MAX];
            for (i, c) in self.batch.iter().enumerate() {
                ConnRecord {
                    id: c.id,
                    listener: c.listener,
                    peer: c.peer,
                }
                .encode(scratch);
                fds[i] = c.stream.as_raw_fd();
            }
            self.send(scratch, &fds[..self.batch.len()]).map(|_| ())
        };
        match result {
            Ok(()) => {
                self.inflight.extend(self.batch.drain(..).map(|mut c| {
                    c.sent_at = now;
                    c
                }));
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.write_blocked = true;
                // A channel that stays full is a stall even with nothing queued.
                self.outbox_since.get_or_insert(now);
                Err(SendError::Blocked)
            }
            Err(e) if e.raw_os_error() == Some(libc::ETOOMANYREFS) => Err(SendError::TooManyRefs),
            Err(e) => Err(SendError::Broken(e)),
        }
    }

    fn queue(&mut self, f: Vec<u8>) {
        if self.outbox.is_empty() {
            self.outbox_since = Some(Instant::now());
        }
        self.outbox_bytes += f.len();
        self.outbox.push_back(f);
        // Wait for writability before anything else goes (order matters on a stream).
        self.write_blocked = true;
    }

    /// Encodes a control message for this link's transport and sends or queues it.
    pub(crate) fn send_control(&mut self, c: Control<'_>) -> Queued {
        let is_message = matches!(c, Control::Message { .. });
        let mut f = Vec::new();
        if self.node.is_some() {
            match c {
                Control::Drain => NodeCodec::encode_drain(&mut f),
                Control::HandleAck => NodeCodec::encode_handle_ack(&mut f),
                Control::Message { from, json } => {
                    if let Err(e) = NodeCodec::encode_message(&mut f, from, json) {
                        return Queued::Unencodable(e);
                    }
                }
            }
        } else {
            match c {
                Control::Drain => frame::encode_drain(&mut f),
                Control::HandleAck => return Queued::NotApplicable,
                Control::Message { from, json } => {
                    frame::encode_message_to_worker(&mut f, from, json)
                }
            }
        }
        if self.outbox.is_empty() && !self.write_blocked {
            match self.send(&f, &[]) {
                // Only a stream (Node) channel writes part of a message: queue the rest.
                Ok(n) if n < f.len() => {
                    f.drain(..n);
                }
                Ok(_) => return Queued::Yes,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.write_blocked = true,
                // A broken channel is seen by the reader; the frame has nowhere to go.
                Err(_) => return Queued::Yes,
            }
        }
        if is_message && self.outbox_bytes + f.len() > MAX_OUTBOX_BYTES {
            let first = !self.dropping_messages;
            self.dropping_messages = true;
            return Queued::Dropped { first };
        }
        self.queue(f);
        Queued::Yes
    }

    /// The channel became writable: write what is queued. Returns false if the channel failed.
    pub(crate) fn on_writable(&mut self) -> bool {
        while let Some(f) = self.outbox.front() {
            match self.send(f, &[]) {
                Ok(n) => {
                    self.outbox_bytes -= n;
                    self.outbox_since = Some(Instant::now());
                    if n < f.len() {
                        self.outbox[0].drain(..n);
                    } else {
                        self.outbox.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => {
                    self.outbox.clear();
                    self.outbox_bytes = 0;
                    self.outbox_since = None;
                    return false;
                }
            }
        }
        self.write_blocked = false;
        self.outbox_since = None;
        self.dropping_messages = false;
        true
    }
}

// ----- upgrade -------------------------------------------------------------------------------

impl Link {
    /// What an upgrade carries of this link (fds by number). The batch is empty between
    /// wake-ups: dispatch flushes it or gives it back.
    pub(crate) fn carry(&self, now: Instant) -> crate::upgrade::CarriedLink {
        debug_assert!(self.batch.is_empty());
        crate::upgrade::CarriedLink {
            fd: self.chan.get_ref().as_raw_fd(),
            node: self.node.as_deref().map(NodeCodec::carried),
            inflight: self.inflight.iter().map(|c| c.carry(now)).collect(),
            write_blocked: self.write_blocked,
            outbox: self.outbox.iter().cloned().collect(),
            stalled_ms_ago: self.outbox_since.map(|t| crate::upgrade::ms_since(t, now)),
            dropping_messages: self.dropping_messages,
        }
    }

    /// The link an upgrade carried, its fds adopted.
    pub(crate) fn restore(c: crate::upgrade::CarriedLink, now: Instant) -> io::Result<Link> {
        let chan = crate::upgrade::adopt(c.fd);
        let mut link = Link::new(chan, false)?;
        link.node = c.node.map(|n| Box::new(NodeCodec::from_carried(n)));
        link.inflight = c
            .inflight
            .into_iter()
            .map(|c| Conn::adopt(c, now))
            .collect();
        link.write_blocked = c.write_blocked;
        link.outbox_bytes = c.outbox.iter().map(Vec::len).sum();
        link.outbox = c.outbox.into();
        link.outbox_since = c.stalled_ms_ago.map(|ms| crate::upgrade::before(now, ms));
        link.dropping_messages = c.dropping_messages;
        Ok(link)
    }
}
