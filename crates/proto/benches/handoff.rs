//! Micro-benchmarks of the handoff path: what the primary pays per connection besides `accept`.
//!
//! - `frame::encode_conns` / `frame::decode_conns`: a `CONNS` batch of 1, 16 or 32 records
//!   (the primary builds it, the worker validates and walks it);
//! - `frame::encode_ack` / `frame::decode_ack`: an `ACK` batch of 1, 16 or 256 ids (the other
//!   direction);
//! - `channel::conns_roundtrip`: `send_frame` of a `CONNS` frame with 1 or 16 connected TCP fds
//!   attached over a real `seqpacket_pair()`, then `recv_frame` on the other end (the received
//!   duplicates are closed at the next receive, as `recv_frame` clears its vector, so the figure
//!   includes the worker side's close);
//! - `channel::ack_roundtrip`: the same for an `ACK` frame of 1 or 16 ids, no fds.
//!
//! Run with `cargo bench -p roundhouse-proto` (add `-- channel` to filter). Throughput is
//! reported per record / per id / per fd, so batch amortisation is visible directly.

use std::hint::black_box;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use divan::counter::ItemsCount;
use divan::Bencher;
use roundhouse_proto::frame::{self, ConnRecord, PrimaryFrame, WorkerFrame};
use roundhouse_proto::sys::{recv_frame, send_frame, seqpacket_pair};
use roundhouse_proto::MAX_FRAME;

fn main() {
    divan::main();
}

fn records(n: usize) -> Vec<ConnRecord> {
    (0..n)
        .map(|i| ConnRecord {
            id: 1_000_000 + i as u64,
            listener: 0,
            peer: SocketAddr::from(([127, 0, 0, 1], 40_000 + i as u16)),
        })
        .collect()
}

fn conns_frame(recs: &[ConnRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame::HEADER_LEN + recs.len() * frame::RECORD_LEN);
    frame::encode_conns_header(&mut out, recs.len());
    for r in recs {
        r.encode(&mut out);
    }
    out
}

fn ack_frame(n: usize) -> Vec<u8> {
    let ids: Vec<u64> = (0..n as u64).map(|i| 1_000_000 + i).collect();
    let mut out = Vec::new();
    frame::encode_ids(&mut out, false, &ids);
    out
}

mod frame_codec {
    use super::*;

    #[divan::bench(args = [1, 16, 32])]
    fn encode_conns(bencher: Bencher, n: usize) {
        let recs = records(n);
        let mut out = Vec::with_capacity(MAX_FRAME);
        bencher.counter(ItemsCount::new(n)).bench_local(|| {
            out.clear();
            frame::encode_conns_header(&mut out, n);
            for r in black_box(&recs) {
                r.encode(&mut out);
            }
            black_box(out.len())
        });
    }

    #[divan::bench(args = [1, 16, 32])]
    fn decode_conns(bencher: Bencher, n: usize) {
        let buf = conns_frame(&records(n));
        bencher.counter(ItemsCount::new(n)).bench_local(|| {
            match frame::decode_primary_frame(black_box(&buf), n) {
                Ok(PrimaryFrame::Conns(list)) => list.iter().map(|r| r.id).sum::<u64>(),
                other => panic!("decode failed: {other:?}"),
            }
        });
    }

    #[divan::bench(args = [1, 16, 256])]
    fn encode_ack(bencher: Bencher, n: usize) {
        let ids: Vec<u64> = (0..n as u64).collect();
        let mut out = Vec::with_capacity(MAX_FRAME);
        bencher.counter(ItemsCount::new(n)).bench_local(|| {
            out.clear();
            frame::encode_ids(&mut out, false, black_box(&ids));
            black_box(out.len())
        });
    }

    #[divan::bench(args = [1, 16, 256])]
    fn decode_ack(bencher: Bencher, n: usize) {
        let buf = ack_frame(n);
        bencher.counter(ItemsCount::new(n)).bench_local(|| {
            match frame::decode_worker_frame(black_box(&buf), 0) {
                Ok(WorkerFrame::Ack(ids)) => ids.iter().sum::<u64>(),
                other => panic!("decode failed: {other:?}"),
            }
        });
    }
}

mod channel {
    use super::*;

    /// `n` connected TCP sockets on loopback (client ends; the accepted ends are kept alive).
    fn tcp_fds(n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = l.local_addr().expect("local addr");
        let clients: Vec<TcpStream> = (0..n)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        let servers = (0..n).map(|_| l.accept().expect("accept").0).collect();
        (clients, servers)
    }

    #[divan::bench(args = [1, 16])]
    fn conns_roundtrip(bencher: Bencher, n: usize) {
        let (a, b) = seqpacket_pair().expect("socketpair");
        let (_clients, servers) = tcp_fds(n);
        let raw: Vec<RawFd> = servers.iter().map(|s| s.as_raw_fd()).collect();
        let out = conns_frame(&records(n));
        let mut buf = vec![0u8; MAX_FRAME];
        let mut fds: Vec<OwnedFd> = Vec::with_capacity(64);
        bencher.counter(ItemsCount::new(n)).bench_local(|| {
            send_frame(a.as_fd(), black_box(&out), &raw).expect("send_frame");
            let meta = recv_frame(b.as_fd(), &mut buf, &mut fds).expect("recv_frame");
            assert_eq!((meta.len, fds.len()), (out.len(), n));
        });
    }

    #[divan::bench(args = [1, 16])]
    fn ack_roundtrip(bencher: Bencher, n: usize) {
        let (a, b) = seqpacket_pair().expect("socketpair");
        let out = ack_frame(n);
        let mut buf = vec![0u8; MAX_FRAME];
        let mut fds: Vec<OwnedFd> = Vec::new();
        bencher.counter(ItemsCount::new(n)).bench_local(|| {
            send_frame(a.as_fd(), black_box(&out), &[]).expect("send_frame");
            let meta = recv_frame(b.as_fd(), &mut buf, &mut fds).expect("recv_frame");
            assert_eq!(meta.len, out.len());
        });
    }
}
