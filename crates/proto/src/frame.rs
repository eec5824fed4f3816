//! Frame encoding and decoding (see `docs/protocol.md`, sections 3 and 5).
//!
//! Decoding never panics on any input and allocates only to check a `MESSAGE`'s JSON (never on
//! the connection path: `CONNS`, `ACK`, `REFUSE`, `STATS`): every length is checked before it is
//! used, and anything that is not exactly a valid frame is a [`FrameError`]. The decoders borrow
//! from the receive buffer, so the per-connection path (a `CONNS` batch, an `ACK` batch) costs a
//! few bounds checks.

#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::BufMut;

/// Largest frame either side may send.
pub const MAX_FRAME: usize = 65536;
/// Every frame starts with an 8-byte header: kind, 3 zero bytes, a u32 argument.
pub const HEADER_LEN: usize = 8;
/// Size of one connection record in a `CONNS` frame.
pub const RECORD_LEN: usize = 32;
/// Most connections (and fds) in one `CONNS` frame.
pub const CONNS_MAX: usize = 32;
/// Most ids in one `ACK` or `REFUSE` frame.
pub const ACK_MAX_IDS: usize = 1024;
/// The protocol version a worker announces in `READY`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Frame kinds. Primary → worker kinds have the high bit clear, worker → primary kinds set.
pub mod kind {
    pub const CONNS: u8 = 0x01;
    pub const DRAIN: u8 = 0x02;
    pub const MESSAGE_TO_WORKER: u8 = 0x03;
    pub const READY: u8 = 0x81;
    pub const ACK: u8 = 0x82;
    pub const REFUSE: u8 = 0x83;
    pub const STATS: u8 = 0x84;
    pub const HEARTBEAT: u8 = 0x85;
    pub const MESSAGE_FROM_WORKER: u8 = 0x86;
}

/// `MESSAGE` recipient value meaning "every worker".
pub const TO_ALL: u32 = u32::MAX;
/// `MESSAGE` recipient / sender value meaning "the primary" (or an outside sender).
pub const PRIMARY: u32 = 0;

/// Why a frame is not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame too short: {0} bytes")]
    Short(usize),
    #[error("frame too long: {0} bytes")]
    Oversized(usize),
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("reserved bytes are not zero")]
    Reserved,
    #[error("frame of kind {kind:#04x} has {len} bytes, expected {expected}")]
    Length {
        kind: u8,
        len: usize,
        expected: usize,
    },
    #[error("bad count {0}")]
    Count(u32),
    #[error("frame of kind {kind:#04x} carries {fds} fds, expected {expected}")]
    Fds {
        kind: u8,
        fds: usize,
        expected: usize,
    },
    #[error("bad address family {0}")]
    Family(u8),
    #[error("unsupported protocol version {0}")]
    Version(u32),
    #[error("message is not valid JSON: {0}")]
    Json(String),
}

/// Who a worker's message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipient {
    Primary,
    Worker(u32),
    All,
}

impl Recipient {
    pub fn to_wire(self) -> u32 {
        match self {
            Recipient::Primary => PRIMARY,
            Recipient::Worker(id) => id,
            Recipient::All => TO_ALL,
        }
    }
    pub fn from_wire(v: u32) -> Self {
        match v {
            PRIMARY => Recipient::Primary,
            TO_ALL => Recipient::All,
            id => Recipient::Worker(id),
        }
    }
}

/// A list of connection ids inside an `ACK`/`REFUSE` frame (borrowed, validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdList<'a>(&'a [u8]);

impl<'a> IdList<'a> {
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = u64> + 'a {
        self.0
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
    }
}

/// One handed-off connection: its id, the listener it came from, the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRecord {
    pub id: u64,
    pub listener: u16,
    pub peer: SocketAddr,
}

impl ConnRecord {
    /// Appends the 32-byte wire form.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64_le(self.id);
        out.put_u16_le(self.listener);
        let (family, addr) = match self.peer.ip() {
            IpAddr::V4(v4) => {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&v4.octets());
                (4u8, a)
            }
            IpAddr::V6(v6) => (6u8, v6.octets()),
        };
        out.put_u8(family);
        out.put_u8(0);
        out.put_u16_le(self.peer.port());
        out.put_u16_le(0);
        out.put_slice(&addr);
    }

    /// Decodes one 32-byte record.
    pub fn decode(b: &[u8]) -> Result<Self, FrameError> {
        if b.len() != RECORD_LEN {
            return Err(FrameError::Short(b.len()));
        }
        let id = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
        let listener = u16::from_le_bytes([b[8], b[9]]);
        let family = b[10];
        if b[11] != 0 || b[14] != 0 || b[15] != 0 {
            return Err(FrameError::Reserved);
        }
        let port = u16::from_le_bytes([b[12], b[13]]);
        let a: [u8; 16] = b[16..32].try_into().expect("16 bytes");
        let ip = match family {
            4 => {
                if a[4..].iter().any(|&x| x != 0) {
                    return Err(FrameError::Reserved);
                }
                IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
            }
            6 => IpAddr::V6(Ipv6Addr::from(a)),
            f => return Err(FrameError::Family(f)),
        };
        Ok(ConnRecord {
            id,
            listener,
            peer: SocketAddr::new(ip, port),
        })
    }
}

/// The records of a `CONNS` frame (borrowed, validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnList<'a>(&'a [u8]);

impl<'a> ConnList<'a> {
    pub fn len(&self) -> usize {
        self.0.len() / RECORD_LEN
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Records in order; they were validated when the frame was decoded.
    pub fn iter(&self) -> impl Iterator<Item = ConnRecord> + 'a {
        self.0
            .chunks_exact(RECORD_LEN)
            .filter_map(|c| ConnRecord::decode(c).ok())
    }
    /// Connection ids in order (what an `ACK` or `REFUSE` answers with).
    pub fn ids(&self) -> impl Iterator<Item = u64> + 'a {
        self.0
            .chunks_exact(RECORD_LEN)
            .map(|c| u64::from_le_bytes(c[0..8].try_into().unwrap_or([0; 8])))
    }
}

/// A frame the primary sends to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryFrame<'a> {
    Conns(ConnList<'a>),
    Drain,
    Message { from: u32, json: &'a [u8] },
}

/// A frame a worker sends to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerFrame<'a> {
    Ready { version: u32 },
    Ack(IdList<'a>),
    Refuse(IdList<'a>),
    Stats(Stats),
    Heartbeat,
    Message { to: Recipient, json: &'a [u8] },
}

/// Cumulative counters a worker reports in `STATS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub accepted: u64,
    pub closed: u64,
    pub requests: u64,
}

fn header(buf: &[u8]) -> Result<(u8, u32, &[u8]), FrameError> {
    if buf.len() > MAX_FRAME {
        return Err(FrameError::Oversized(buf.len()));
    }
    if buf.len() < HEADER_LEN {
        return Err(FrameError::Short(buf.len()));
    }
    if buf[1..4] != [0, 0, 0] {
        return Err(FrameError::Reserved);
    }
    let arg = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    Ok((buf[0], arg, &buf[HEADER_LEN..]))
}

fn exact(kind: u8, body: &[u8], expected: usize) -> Result<(), FrameError> {
    if body.len() != expected {
        return Err(FrameError::Length {
            kind,
            len: body.len() + HEADER_LEN,
            expected: expected + HEADER_LEN,
        });
    }
    Ok(())
}

fn no_fds(kind: u8, fds: usize) -> Result<(), FrameError> {
    if fds != 0 {
        return Err(FrameError::Fds {
            kind,
            fds,
            expected: 0,
        });
    }
    Ok(())
}

fn json(body: &[u8]) -> Result<(), FrameError> {
    serde_json_check(body)
}

/// Checks that `body` is one JSON value that every receiver can parse (serde_json also bounds
/// nesting depth). Messages are not on the connection path, so the parse's allocation is fine.
fn serde_json_check(body: &[u8]) -> Result<(), FrameError> {
    // serde_json skips the UTF-8 check of ignored strings; relayed text must be UTF-8.
    std::str::from_utf8(body).map_err(|_| FrameError::Json("not UTF-8".into()))?;
    // A full parse (not `IgnoredAny`): a number like 1e999 is valid JSON syntax but no JSON
    // value any receiver can build, so it must be refused here, once, for everyone.
    serde_json::from_slice::<serde_json::Value>(body)
        .map(|_| ())
        .map_err(|e| FrameError::Json(e.to_string()))
}

/// Decodes a frame received by a worker; `fds` is how many fds arrived with it.
pub fn decode_primary_frame(buf: &[u8], fds: usize) -> Result<PrimaryFrame<'_>, FrameError> {
    let (k, arg, body) = header(buf)?;
    match k {
        kind::CONNS => {
            let n = arg as usize;
            if n == 0 || n > CONNS_MAX {
                return Err(FrameError::Count(arg));
            }
            exact(k, body, n * RECORD_LEN)?;
            for rec in body.chunks_exact(RECORD_LEN) {
                ConnRecord::decode(rec)?;
            }
            if fds != n {
                return Err(FrameError::Fds {
                    kind: k,
                    fds,
                    expected: n,
                });
            }
            Ok(PrimaryFrame::Conns(ConnList(body)))
        }
        kind::DRAIN => {
            exact(k, body, 0)?;
            no_fds(k, fds)?;
            if arg != 0 {
                return Err(FrameError::Reserved);
            }
            Ok(PrimaryFrame::Drain)
        }
        kind::MESSAGE_TO_WORKER => {
            no_fds(k, fds)?;
            json(body)?;
            Ok(PrimaryFrame::Message {
                from: arg,
                json: body,
            })
        }
        other => Err(FrameError::UnknownKind(other)),
    }
}

/// Decodes a frame received by the primary; `fds` is how many fds arrived with it.
pub fn decode_worker_frame(buf: &[u8], fds: usize) -> Result<WorkerFrame<'_>, FrameError> {
    let (k, arg, body) = header(buf)?;
    no_fds(k, fds)?;
    match k {
        kind::READY => {
            exact(k, body, 0)?;
            if arg != PROTOCOL_VERSION {
                return Err(FrameError::Version(arg));
            }
            Ok(WorkerFrame::Ready { version: arg })
        }
        kind::ACK | kind::REFUSE => {
            let n = arg as usize;
            if n == 0 || n > ACK_MAX_IDS {
                return Err(FrameError::Count(arg));
            }
            exact(k, body, n * 8)?;
            let ids = IdList(body);
            Ok(if k == kind::ACK {
                WorkerFrame::Ack(ids)
            } else {
                WorkerFrame::Refuse(ids)
            })
        }
        kind::STATS => {
            exact(k, body, 24)?;
            if arg != 0 {
                return Err(FrameError::Reserved);
            }
            let u = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
            Ok(WorkerFrame::Stats(Stats {
                accepted: u(0),
                closed: u(8),
                requests: u(16),
            }))
        }
        kind::HEARTBEAT => {
            exact(k, body, 0)?;
            if arg != 0 {
                return Err(FrameError::Reserved);
            }
            Ok(WorkerFrame::Heartbeat)
        }
        kind::MESSAGE_FROM_WORKER => {
            json(body)?;
            Ok(WorkerFrame::Message {
                to: Recipient::from_wire(arg),
                json: body,
            })
        }
        other => Err(FrameError::UnknownKind(other)),
    }
}

fn put_header(out: &mut impl BufMut, k: u8, arg: u32) {
    out.put_u8(k);
    out.put_slice(&[0, 0, 0]);
    out.put_u32_le(arg);
}

/// Starts a `CONNS` frame for `n` records; append each with [`ConnRecord::encode`].
pub fn encode_conns_header(out: &mut impl BufMut, n: usize) {
    put_header(out, kind::CONNS, n as u32);
}

/// Overwrites the count of a `CONNS` frame built in `frame` (for batches built incrementally).
pub fn set_conns_count(frame: &mut [u8], n: usize) {
    frame[4..8].copy_from_slice(&(n as u32).to_le_bytes());
}

pub fn encode_drain(out: &mut impl BufMut) {
    put_header(out, kind::DRAIN, 0);
}

pub fn encode_message_to_worker(out: &mut impl BufMut, from: u32, json: &[u8]) {
    put_header(out, kind::MESSAGE_TO_WORKER, from);
    out.put_slice(json);
}

pub fn encode_ready(out: &mut impl BufMut) {
    put_header(out, kind::READY, PROTOCOL_VERSION);
}

pub fn encode_ids(out: &mut impl BufMut, refuse: bool, ids: &[u64]) {
    put_header(
        out,
        if refuse { kind::REFUSE } else { kind::ACK },
        ids.len() as u32,
    );
    for id in ids {
        out.put_u64_le(*id);
    }
}

pub fn encode_stats(out: &mut impl BufMut, s: Stats) {
    put_header(out, kind::STATS, 0);
    out.put_u64_le(s.accepted);
    out.put_u64_le(s.closed);
    out.put_u64_le(s.requests);
}

pub fn encode_heartbeat(out: &mut impl BufMut) {
    put_header(out, kind::HEARTBEAT, 0);
}

pub fn encode_message_from_worker(out: &mut impl BufMut, to: Recipient, json: &[u8]) {
    put_header(out, kind::MESSAGE_FROM_WORKER, to.to_wire());
    out.put_slice(json);
}

/// Largest JSON payload of a `MESSAGE` frame.
pub const MAX_MESSAGE: usize = MAX_FRAME - HEADER_LEN;

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, peer: &str) -> ConnRecord {
        ConnRecord {
            id,
            listener: 3,
            peer: peer.parse().unwrap(),
        }
    }

    #[test]
    fn conns_round_trip_v4_and_v6() {
        let recs = [rec(1, "127.0.0.1:5555"), rec(u64::MAX, "[::1]:65535")];
        let mut b = Vec::new();
        encode_conns_header(&mut b, recs.len());
        for r in &recs {
            r.encode(&mut b);
        }
        assert_eq!(b.len(), HEADER_LEN + 2 * RECORD_LEN);
        match decode_primary_frame(&b, 2).unwrap() {
            PrimaryFrame::Conns(list) => {
                assert_eq!(list.iter().collect::<Vec<_>>(), recs);
                assert_eq!(list.ids().collect::<Vec<_>>(), vec![1, u64::MAX]);
            }
            f => panic!("unexpected {f:?}"),
        }
    }

    #[test]
    fn conns_with_wrong_fd_count_is_rejected() {
        let mut b = Vec::new();
        encode_conns_header(&mut b, 1);
        rec(7, "10.0.0.1:1").encode(&mut b);
        assert!(matches!(
            decode_primary_frame(&b, 0),
            Err(FrameError::Fds { .. })
        ));
        assert!(matches!(
            decode_primary_frame(&b, 2),
            Err(FrameError::Fds { .. })
        ));
    }

    #[test]
    fn worker_frames_round_trip() {
        let mut b = Vec::new();
        encode_ready(&mut b);
        assert_eq!(
            decode_worker_frame(&b, 0).unwrap(),
            WorkerFrame::Ready { version: 1 }
        );
        b.clear();
        encode_ids(&mut b, false, &[4, 5, 6]);
        match decode_worker_frame(&b, 0).unwrap() {
            WorkerFrame::Ack(ids) => assert_eq!(ids.iter().collect::<Vec<_>>(), vec![4, 5, 6]),
            f => panic!("unexpected {f:?}"),
        }
        b.clear();
        encode_ids(&mut b, true, &[9]);
        assert!(matches!(
            decode_worker_frame(&b, 0).unwrap(),
            WorkerFrame::Refuse(_)
        ));
        b.clear();
        let s = Stats {
            accepted: 1,
            closed: 2,
            requests: 3,
        };
        encode_stats(&mut b, s);
        assert_eq!(decode_worker_frame(&b, 0).unwrap(), WorkerFrame::Stats(s));
        b.clear();
        encode_message_from_worker(&mut b, Recipient::All, br#"{"ping":1}"#);
        assert_eq!(
            decode_worker_frame(&b, 0).unwrap(),
            WorkerFrame::Message {
                to: Recipient::All,
                json: br#"{"ping":1}"#
            }
        );
    }

    #[test]
    fn truncated_and_oversized_frames_are_rejected() {
        let mut b = Vec::new();
        encode_ids(&mut b, false, &[1, 2]);
        for cut in 0..b.len() {
            assert!(decode_worker_frame(&b[..cut], 0).is_err(), "cut at {cut}");
        }
        let big = vec![0u8; MAX_FRAME + 1];
        assert_eq!(
            decode_worker_frame(&big, 0),
            Err(FrameError::Oversized(MAX_FRAME + 1))
        );
        let mut conns = Vec::new();
        encode_conns_header(&mut conns, 1);
        rec(1, "1.2.3.4:5").encode(&mut conns);
        for cut in 0..conns.len() {
            assert!(decode_primary_frame(&conns[..cut], 1).is_err());
        }
    }

    #[test]
    fn bad_headers_are_rejected() {
        assert_eq!(
            decode_worker_frame(&[0x99, 0, 0, 0, 0, 0, 0, 0], 0),
            Err(FrameError::UnknownKind(0x99))
        );
        assert_eq!(
            decode_worker_frame(&[0x81, 1, 0, 0, 1, 0, 0, 0], 0),
            Err(FrameError::Reserved)
        );
        assert_eq!(
            decode_worker_frame(&[0x81, 0, 0, 0, 2, 0, 0, 0], 0),
            Err(FrameError::Version(2))
        );
        // A heartbeat with an fd attached is malformed.
        assert!(matches!(
            decode_worker_frame(&[0x85, 0, 0, 0, 0, 0, 0, 0], 1),
            Err(FrameError::Fds { .. })
        ));
        // ACK with zero ids, or a count that disagrees with the length.
        assert_eq!(
            decode_worker_frame(&[0x82, 0, 0, 0, 0, 0, 0, 0], 0),
            Err(FrameError::Count(0))
        );
        assert!(matches!(
            decode_worker_frame(&[0x82, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0], 0),
            Err(FrameError::Length { .. })
        ));
    }

    #[test]
    fn json_validation() {
        for ok in [
            &br#"{"a":[1,2.5e3,-0.1,true,false,null,"x\u00e9\n"]}"#[..],
            b" 42 ",
            b"\"s\"",
            b"[]",
            b"{}",
        ] {
            assert!(
                serde_json_check(ok).is_ok(),
                "{:?}",
                std::str::from_utf8(ok)
            );
        }
        for bad in [
            &b""[..],
            b"{",
            b"[1,]",
            b"{\"a\"}",
            b"01",
            b"tru",
            b"\"\x01\"",
            b"1 2",
            b"\"\\x\"",
            b"\xff",
            b"\"\xff\"",
            b"1e999",
        ] {
            assert!(serde_json_check(bad).is_err(), "{:?}", bad);
        }
        // Deep nesting is answered (either way) without overflowing the stack.
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        let _ = serde_json_check(deep.as_bytes());
    }
}
