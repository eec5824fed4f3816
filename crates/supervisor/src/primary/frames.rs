//! The loop's reading side: frames from a worker's channel (roundhouse frames, or Node's IPC
//! lines through the Node codec) and what each one means — readiness, acknowledgements and
//! refusals, statistics, messages to relay — plus the control messages the primary writes back.
//! A worker that breaks the protocol gets a [`ProtocolError`] and is killed and replaced.

#![forbid(unsafe_code)]

use std::io;
use std::time::{Duration, Instant};

use roundhouse_proto::frame::{self, Stats as WireStats};
use roundhouse_proto::{Recipient, WorkerFrame};
use tracing::{debug, error, info, warn};

use super::link::{Control, Queued};
use super::pool::{Life, Retire};
use super::{Primary, ProtocolError, REFUSE_COOLDOWN};
use crate::config::Policy;
use crate::events::Event;
use crate::node::NodeEvent;

impl Primary {
    // ----- reading worker frames --------------------------------------------------------

    /// Reads and handles up to `burst` frames from worker `k`. `direct` reads without waiting
    /// for the reactor's readiness (used after an exit, before the reactor has seen the EOF).
    pub(super) fn read_worker(&mut self, k: usize, burst: usize, direct: bool) {
        if matches!(
            self.pool.get(k).map(|w| &w.life),
            Some(Life::Spawned { .. })
        ) {
            // It wrote to its channel, so it has exec'd: learn that first.
            self.resolve_exec(k);
        }
        for _ in 0..burst {
            let Some(w) = self.pool.get_mut(k) else {
                return;
            };
            let Some(link) = w.link.as_mut() else { return };
            let r = link.recv(&mut self.recv_buf, &mut self.recv_fds, direct);
            let result = match r {
                Ok(meta) if meta.len == 0 => {
                    self.channel_closed(k);
                    return;
                }
                Ok(meta) => {
                    w.last_seen = Instant::now();
                    // A worker never sends fds the primary keeps (a Node app's handle is
                    // answered, its fd closed): close any at once.
                    let nfds = self.recv_fds.len();
                    self.recv_fds.clear();
                    if let Some(node) = link.node() {
                        node.feed(&self.recv_buf[..meta.len])
                            .map_err(ProtocolError::Node)
                            .and_then(|()| self.node_events(k))
                    } else if meta.truncated {
                        Err(ProtocolError::Oversized)
                    } else if meta.fds_truncated {
                        Err(ProtocolError::FdsTruncated)
                    } else {
                        let buf = std::mem::take(&mut self.recv_buf);
                        let result = frame::decode_worker_frame(&buf[..meta.len], nfds)
                            .map_err(ProtocolError::from)
                            .and_then(|f| self.on_frame(k, f));
                        self.recv_buf = buf;
                        result
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
            };
            if let Err(why) = result {
                self.protocol_error(k, why);
                return;
            }
        }
    }

    fn node_events(&mut self, k: usize) -> Result<(), ProtocolError> {
        loop {
            let Some(node) = self
                .pool
                .get_mut(k)
                .and_then(|w| w.link.as_mut())
                .and_then(|l| l.node())
            else {
                return Ok(());
            };
            let Some(ev) = node.next_event() else {
                return Ok(());
            };
            self.on_node_event(k, ev.map_err(ProtocolError::Node)?)?;
        }
    }

    fn on_frame(&mut self, k: usize, f: WorkerFrame<'_>) -> Result<(), ProtocolError> {
        match f {
            WorkerFrame::Ready { .. } => self.on_ready(k),
            WorkerFrame::Ack(ids) => self.on_ids(k, false, ids.iter()),
            WorkerFrame::Refuse(ids) => self.on_ids(k, true, ids.iter()),
            WorkerFrame::Stats(s) => self.on_stats(k, s),
            WorkerFrame::Heartbeat => Ok(()),
            WorkerFrame::Message { to, json } => {
                let from = self.pool.get(k).expect("live worker").slot;
                self.relay(from, to, json);
                Ok(())
            }
        }
    }

    fn on_node_event(&mut self, k: usize, ev: NodeEvent) -> Result<(), ProtocolError> {
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
                let from = self.pool.get(k).expect("live worker").slot;
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

    fn on_ready(&mut self, k: usize) -> Result<(), ProtocolError> {
        if !matches!(
            self.pool.get(k).map(|w| &w.life),
            Some(Life::Starting { .. })
        ) {
            return Err(ProtocolError::ReadyTwice);
        }
        self.on_online(k);
        Ok(())
    }

    fn on_ids(
        &mut self,
        k: usize,
        refuse: bool,
        ids: impl Iterator<Item = u64>,
    ) -> Result<(), ProtocolError> {
        let policy = self.cfg.policy;
        let mut closed = false;
        for id in ids {
            let w = self.pool.get_mut(k).expect("live worker");
            let Some(conn) = w.link.as_mut().and_then(|l| l.take_inflight(id)) else {
                return Err(ProtocolError::UnknownConnection {
                    verb: if refuse { "refused" } else { "acknowledged" },
                    id,
                });
            };
            if refuse {
                if matches!(w.life, Life::Online) {
                    w.skip_until = Some(Instant::now() + REFUSE_COOLDOWN);
                }
                self.dispatch.give_back(std::iter::once(conn));
            } else {
                w.acked += 1;
                let slot = w.slot;
                let key = (policy == Policy::Sticky).then_some(conn.key);
                self.pool.count_connection(slot, key);
                drop(conn); // the worker has its copy: close ours so its close() sends FIN
                closed = true;
            }
        }
        if let Some(w) = self.pool.get(k) {
            self.dispatch.set_load(k, w.load(policy));
        }
        if closed {
            self.fds_freed();
        }
        Ok(())
    }

    fn on_stats(&mut self, k: usize, s: WireStats) -> Result<(), ProtocolError> {
        let policy = self.cfg.policy;
        let w = self.pool.get_mut(k).expect("live worker");
        let prev = w.reported;
        if s.accepted < prev.accepted || s.closed < prev.closed || s.requests < prev.requests {
            return Err(ProtocolError::CountersBackwards);
        }
        w.reported = s;
        let slot = w.slot;
        let due = matches!(w.life, Life::Online) && w.recycle_at.is_some_and(|n| s.requests >= n);
        let load = w.load(policy);
        self.dispatch.set_load(k, load);
        // Under reuseport-rr the kernel counts connections itself.
        self.pool.count_reported(
            slot,
            s.requests - prev.requests,
            (!policy.hands_off() && policy != Policy::ReusePortRr)
                .then(|| s.accepted - prev.accepted),
        );
        // Recycle once past --max-requests; if a reload is running, retry at the next STATS
        // (or at a tick).
        if due && !self.ops.reloading() {
            let w = self.pool.get_mut(k).expect("live worker");
            w.recycle_at = None;
            info!(
                worker.id = w.slot,
                worker.pid = w.pid,
                requests = s.requests,
                "worker reached --max-requests; recycling"
            );
            self.recycle((slot - 1) as usize);
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
                for id in 1..=self.pool.slots().len() as u32 {
                    if id != from {
                        self.message_slot(id, from, json);
                    }
                }
            }
        }
    }

    /// Queues a MESSAGE for slot `id`'s worker. False if there is no such worker.
    pub(super) fn message_slot(&mut self, id: u32, from: u32, json: &[u8]) -> bool {
        let Some(k) = self.pool.current_of(id) else {
            return false;
        };
        self.send_control(k, Control::Message { from, json });
        true
    }

    /// Sends or queues a control message for worker `k` (nothing if its channel is gone).
    pub(super) fn send_control(&mut self, k: usize, c: Control<'_>) {
        let Some(w) = self.pool.get_mut(k) else {
            return;
        };
        let (id, pid) = (w.slot, w.pid);
        let Some(link) = w.link.as_mut() else { return };
        match link.send_control(c) {
            Queued::Yes | Queued::NotApplicable => {}
            Queued::Dropped { first: true } => warn!(
                worker.id = id,
                worker.pid = pid,
                "worker reads its channel slower than messages arrive: dropping messages for it until it catches up"
            ),
            Queued::Dropped { first: false } => {}
            Queued::Unencodable(e) => warn!(worker.id = id, "message not sent: {e}"),
        }
    }

    pub(super) fn on_writable(&mut self, k: usize) {
        let Some(link) = self.pool.get_mut(k).and_then(|w| w.link.as_mut()) else {
            return;
        };
        if !link.on_writable() {
            // The reader sees the broken channel; nothing more to write.
            debug!(worker.key = k, "channel failed while writing queued frames");
        }
    }

    pub(super) fn protocol_error(&mut self, k: usize, why: ProtocolError) {
        if let Some(w) = self.pool.get(k) {
            error!(
                worker.id = w.slot,
                worker.pid = w.pid,
                "protocol error: worker {why}"
            );
        }
        self.retire(k, Retire::Kill("protocol error".into()));
    }
}
