//! A fake primary for in-process tests: the other end of a real `seqpacket_pair`, speaking the
//! protocol through `roundhouse_proto` exactly as the real primary does.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use roundhouse_proto::frame::{self, ConnRecord, Stats, WorkerFrame};
use roundhouse_proto::sys::{recv_frame, send_frame, seqpacket_pair};
use roundhouse_proto::Recipient;
use roundhouse_worker::Worker;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Upper bound for anything a test waits for; generous, it is only hit on failure.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A worker frame, owned, for assertions.
#[derive(Debug, Clone, PartialEq)]
pub enum F {
    Ready,
    Ack(Vec<u64>),
    Refuse(Vec<u64>),
    Stats(Stats),
    Heartbeat,
    Message(Recipient, serde_json::Value),
}

pub struct Primary {
    pub fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

/// A fake primary and a worker on the other end of a fresh channel.
pub fn pair(id: u32) -> (Primary, Worker) {
    let (p, w) = seqpacket_pair().unwrap();
    let worker = Worker::from_fd(w, id).unwrap();
    (Primary::new(p), worker)
}

impl Primary {
    pub fn new(fd: OwnedFd) -> Self {
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open until it is dropped.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(|e| e.into_parts().1)
            .unwrap();
        Primary {
            fd,
            buf: vec![0; frame::MAX_FRAME],
        }
    }

    pub async fn send_raw(&self, data: &[u8], fds: &[i32]) {
        self.fd
            .async_io(Interest::WRITABLE, |s| send_frame(s.as_fd(), data, fds))
            .await
            .unwrap();
    }

    /// Sends one `CONNS` frame for `conns` (id, server-side socket); the caller keeps its copies,
    /// like the primary does until the ack.
    pub async fn send_conns(&self, conns: &[(u64, &TcpStream)]) {
        let mut b = Vec::new();
        frame::encode_conns_header(&mut b, conns.len());
        for (id, s) in conns {
            ConnRecord {
                id: *id,
                listener: 0,
                peer: s.peer_addr().unwrap(),
            }
            .encode(&mut b);
        }
        let fds: Vec<i32> = conns.iter().map(|(_, s)| s.as_raw_fd()).collect();
        self.send_raw(&b, &fds).await;
    }

    pub async fn send_drain(&self) {
        let mut b = Vec::new();
        frame::encode_drain(&mut b);
        self.send_raw(&b, &[]).await;
    }

    pub async fn send_message(&self, from: u32, v: &serde_json::Value) {
        let mut b = Vec::new();
        frame::encode_message_to_worker(&mut b, from, v.to_string().as_bytes());
        self.send_raw(&b, &[]).await;
    }

    /// The next frame, or `None` at end of file. Panics past the deadline.
    pub async fn recv(&mut self) -> Option<F> {
        let buf = &mut self.buf;
        let mut fds = Vec::new();
        let meta = tokio::time::timeout(
            DEADLINE,
            self.fd
                .async_io(Interest::READABLE, |s| recv_frame(s.as_fd(), buf, &mut fds)),
        )
        .await
        .expect("no frame from the worker before the deadline")
        .unwrap();
        if meta.len == 0 {
            return None;
        }
        let f = frame::decode_worker_frame(&self.buf[..meta.len], fds.len())
            .expect("the worker sent a malformed frame");
        Some(match f {
            WorkerFrame::Ready { .. } => F::Ready,
            WorkerFrame::Ack(ids) => F::Ack(ids.iter().collect()),
            WorkerFrame::Refuse(ids) => F::Refuse(ids.iter().collect()),
            WorkerFrame::Stats(s) => F::Stats(s),
            WorkerFrame::Heartbeat => F::Heartbeat,
            WorkerFrame::Message { to, json } => {
                F::Message(to, serde_json::from_slice(json).unwrap())
            }
        })
    }

    /// The next frame that is not a `STATS` or `HEARTBEAT`.
    pub async fn recv_significant(&mut self) -> Option<F> {
        loop {
            match self.recv().await {
                Some(F::Stats(_)) | Some(F::Heartbeat) => continue,
                other => return other,
            }
        }
    }

    /// Reads frames until a `STATS` equal to `want` arrives; returns how many `STATS` came.
    pub async fn wait_stats(&mut self, want: Stats) -> usize {
        let mut n = 0;
        loop {
            match self.recv().await {
                Some(F::Stats(s)) => {
                    n += 1;
                    if s == want {
                        return n;
                    }
                }
                Some(_) => {}
                None => panic!("channel closed while waiting for {want:?}"),
            }
        }
    }
}

/// A connected TCP pair over loopback: (client, server side as the primary would accept it).
pub fn tcp_pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

pub fn local_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

pub fn addr_of(s: &TcpStream) -> SocketAddr {
    s.local_addr().unwrap()
}
